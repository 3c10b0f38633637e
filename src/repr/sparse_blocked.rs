//! The inference layout of a bitmask-encoded sparse matrix: rows in blocks of [`BLOCK_ROWS`], each
//! block stored column by column.
//!
//! For block `k` (rows `[128 k, 128 k + 128)`) and column `c`, two 64-bit words say which of the
//! block's rows keep an entry in column `c` (bit `i mod 64` of word `i / 64` for row `128 k + i`),
//! and the block's values follow in that order: column by column, rows increasing within a column.
//! It holds exactly the bits and values of the row-major bitmask form (one bit per entry, the last
//! block padded to 128 rows), in another order.
//!
//! Why: a product `out[i, :] += S[i, c] · x[c, :]` over a tile of 16 tokens then reads the inputs
//! `x[c, :]` once per block in increasing `c` (a stream the prefetchers follow) and keeps the
//! block's 128 accumulators of 32 lanes (16 KiB) in the first-level cache, instead of fetching a
//! random input row for every kept entry.

use std::ops::Range;

use crate::foundation::error::Result;
use crate::repr::compact::{CompactMatrix, SparsePattern, StorageFloat};

/// Rows per block.
pub const BLOCK_ROWS: usize = 128;
const WORDS: usize = BLOCK_ROWS / 64;
/// Zeros held after the last value: a one-token kernel reads at most this many values from a
/// column half's first (its 64 rows' values and one vector's worth more).
const VALUE_PAD: usize = 72;

/// A sparse matrix in the blocked column-major inference layout.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockedMatrix<S> {
    rows: usize,
    cols: usize,
    /// Per block, `cols × 4` words.
    masks: Vec<u64>,
    /// Kept values, block by block, column-major within a block, then [`VALUE_PAD`] zeros (the
    /// one-token kernels load whole vectors from a chunk's first value).
    values: Vec<S>,
    /// Position of each block's first value; `blocks + 1` entries.
    block_offsets: Vec<usize>,
}

impl<S: StorageFloat> BlockedMatrix<S> {
    /// The blocked layout of `m` (any pattern encoding).
    pub fn from_compact(m: &CompactMatrix<S>) -> Self {
        let (rows, cols) = (m.rows(), m.cols());
        let blocks = rows.div_ceil(BLOCK_ROWS);
        let mut masks = vec![0u64; blocks * cols * WORDS];
        let mut values = vec![S::default(); m.nnz() + VALUE_PAD];
        let mut block_offsets = Vec::with_capacity(blocks + 1);
        let offsets = m.pattern().offsets();
        let mut columns = Vec::new();
        let mut slot = vec![0usize; cols];
        for k in 0..blocks {
            let r0 = k * BLOCK_ROWS;
            let r1 = (r0 + BLOCK_ROWS).min(rows);
            let base = offsets[r0];
            block_offsets.push(base);
            let bm = &mut masks[k * cols * WORDS..(k + 1) * cols * WORDS];
            for i in r0..r1 {
                m.pattern().row_columns(i, &mut columns);
                for &c in &columns {
                    bm[c as usize * WORDS + (i - r0) / 64] |= 1 << ((i - r0) % 64);
                }
            }
            // Position of each column's first value within the block.
            let mut next = base;
            for (c, s) in slot.iter_mut().enumerate() {
                *s = next;
                next += bm[c * WORDS..(c + 1) * WORDS]
                    .iter()
                    .map(|w| w.count_ones() as usize)
                    .sum::<usize>();
            }
            // Rows in increasing order fill each column's run in increasing row order.
            for i in r0..r1 {
                m.pattern().row_columns(i, &mut columns);
                for (&c, &v) in columns.iter().zip(m.row_values(i)) {
                    values[slot[c as usize]] = v;
                    slot[c as usize] += 1;
                }
            }
        }
        block_offsets.push(m.nnz());
        Self {
            rows,
            cols,
            masks,
            values,
            block_offsets,
        }
    }

    /// The row-major compact form (smallest pattern encoding).
    pub fn to_compact(&self) -> Result<CompactMatrix<S>> {
        let (rows, cols) = (self.rows, self.cols);
        let mut counts = vec![0usize; rows + 1];
        self.for_each(|i, _, _| counts[i + 1] += 1);
        for i in 0..rows {
            counts[i + 1] += counts[i];
        }
        let offsets = counts.clone();
        let mut next = counts;
        let nnz = self.nnz();
        let mut columns = vec![0u32; nnz];
        let mut values = vec![S::default(); nnz];
        self.for_each(|i, c, v| {
            columns[next[i]] = c as u32;
            values[next[i]] = v;
            next[i] += 1;
        });
        let pattern = SparsePattern::from_csr(rows, cols, &offsets, &columns, None)?;
        CompactMatrix::new(pattern, values)
    }

    /// Calls `f(row, column, value)` for every kept entry, block by block, column by column
    /// (rows increasing within a column, so each row's columns come in increasing order).
    fn for_each(&self, mut f: impl FnMut(usize, usize, S)) {
        for k in 0..self.blocks() {
            self.for_each_in_block(k, |i, c, v| f(k * BLOCK_ROWS + i, c, v));
        }
    }

    /// Block `k`'s first row, its row count and its column masks (`cols × 2` words).
    #[inline(always)]
    fn block(&self, k: usize) -> (usize, usize, &[u64]) {
        let r0 = k * BLOCK_ROWS;
        let masks = &self.masks[k * self.cols * WORDS..(k + 1) * self.cols * WORDS];
        (r0, BLOCK_ROWS.min(self.rows - r0), masks)
    }

    /// Calls `f(row within the block, column, value)` for every kept entry of block `k`, column
    /// by column (rows increasing within a column).
    #[inline(always)]
    fn for_each_in_block(&self, k: usize, mut f: impl FnMut(usize, usize, S)) {
        let masks = &self.masks[k * self.cols * WORDS..(k + 1) * self.cols * WORDS];
        let values = &self.values[self.block_offsets[k]..self.block_offsets[k + 1]];
        let mut values = values.iter();
        for (c, words) in masks.chunks_exact(WORDS).enumerate() {
            for (w, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let i = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    if let Some(&v) = values.next() {
                        f(i, c, v);
                    }
                }
            }
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of row blocks.
    pub fn blocks(&self) -> usize {
        self.block_offsets.len() - 1
    }

    /// Kept entries.
    pub fn nnz(&self) -> usize {
        self.block_offsets[self.blocks()]
    }

    /// Kept entries of the blocks in `blocks`.
    pub fn block_nnz(&self, blocks: Range<usize>) -> usize {
        self.block_offsets[blocks.end] - self.block_offsets[blocks.start]
    }

    /// Bytes held: masks and values.
    pub fn stored_bytes(&self) -> usize {
        self.masks.len() * 8 + self.nnz() * S::DTYPE.size()
    }
}

/// Tokens per tile of the rearranged inputs of the many-token kernels.
pub const TILE_TOKENS: usize = 128;

/// Tokens from which [`many_tokens`] runs (see [`many_tokens_pay`]).
const MANY_TOKENS: usize = 128;

/// Vectors of accumulators per row in [`many_tokens`]: a pair of rows holds `2 ×` this many.
const MAX_ROW_VECTORS: usize = 8;

/// Rearranges token-minor `x` (`cols × tp`, `tp` a multiple of 16) tile-major: the tile of
/// tokens `[f, f + TILE_TOKENS)` (`f` a multiple of [`TILE_TOKENS`]) holds `x[c, f + l]` at
/// `f · cols + c · TILE_TOKENS + l` (the last tile padded to the full width), written into `out`
/// (at least [`tile_major_len`] values). For `tp ≤ TILE_TOKENS` this is a plain copy (one tile of
/// width `tp`): the column walk then reads `x` itself, the register kernel an aligned copy.
pub(crate) fn tile_major(x: &[f32], cols: usize, tp: usize, out: &mut [f32]) {
    for (c, row) in x.chunks_exact(tp).enumerate().take(cols) {
        for (t, chunk) in row.chunks(TILE_TOKENS).enumerate() {
            let s = (t * cols + c) * TILE_TOKENS;
            if let Some(dst) = out.get_mut(s..s + chunk.len()) {
                dst.copy_from_slice(chunk);
            }
        }
    }
}

/// Values [`tile_major`] writes.
pub(crate) fn tile_major_len(cols: usize, tp: usize) -> usize {
    cols * tp.next_multiple_of(TILE_TOKENS)
}

/// Distance between consecutive input rows within a tile of the kernels' inputs.
#[inline(always)]
fn tile_stride(tp: usize) -> usize {
    tp.min(TILE_TOKENS)
}

/// Where the 16 tokens `16 s ..` of input row `c` start in the kernels' inputs.
#[inline(always)]
fn slab_start(s: usize, cols: usize, tp: usize, c: usize) -> usize {
    let first = (16 * s) / TILE_TOKENS * TILE_TOKENS;
    first * cols + c * tile_stride(tp) + (16 * s - first)
}

/// `out[i, :] = bias[i] + Σ_c m[i, c] x[c, :]` for the rows of `blocks` (`out` starts at the first
/// of them) and token-minor `out` (`rows × tp`), `tp` = 1 or a multiple of 16. The inputs are
/// given tile-major ([`tile_major`]; for `tp = 1`, simply `x[c]`), so each tile's inputs are
/// read as one sequential stream.
#[inline(always)]
pub(crate) fn blocked_rows<S: StorageFloat, const FUSED: bool>(
    m: &BlockedMatrix<S>,
    x: &[f32],
    tp: usize,
    out: &mut [f32],
    bias: Option<&[S]>,
    blocks: Range<usize>,
) {
    blocked_rows_with::<S, FUSED>(m, x, tp, out, bias, blocks, &mut BitWalk);
}

/// [`blocked_rows`], visiting each column's kept rows with `rows`.
#[inline(always)]
fn blocked_rows_with<S: StorageFloat, const FUSED: bool>(
    m: &BlockedMatrix<S>,
    x: &[f32],
    tp: usize,
    out: &mut [f32],
    bias: Option<&[S]>,
    blocks: Range<usize>,
    rows: &mut impl ColumnRows,
) {
    let cols = m.cols;
    let first_row = blocks.start * BLOCK_ROWS;
    let mut widened: Vec<f32> = Vec::new();
    for k in blocks {
        let (r0, nr, masks) = m.block(k);
        let stored = &m.values[m.block_offsets[k]..m.block_offsets[k + 1]];
        // Half-precision values are widened a block at a time into an f32 scratch (vector
        // conversions, once per block), so that the tiles broadcast every value straight from
        // memory as for f32: converting a bf16 value per kept entry in the loop (a shift and
        // a move to a vector register) made 16 tokens 1.1–1.5× slower than f32.
        let widen = S::DTYPE != crate::repr::compact::StorageDtype::F32;
        if widen {
            widened.resize(stored.len(), 0.0);
            S::widen(stored, &mut widened);
        }
        let b = |i: usize| bias.map_or(0.0, |b| b[r0 + i].to_f32());
        let o = r0 - first_row;
        if widen {
            block_product::<_, FUSED>(masks, &widened, x, cols, tp, nr, &b, out, o, rows);
        } else {
            block_product::<_, FUSED>(masks, stored, x, cols, tp, nr, &b, out, o, rows);
        }
    }
}

/// One block of [`blocked_rows`], its kept values in `vals` (column by column): its `nr` rows of
/// `out` from row `out_row` on. One token: one walk with the block's accumulators in an array;
/// more: tiles of 32 tokens (two 16-token slabs), then one of 16 if the count is odd.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block_product<T: StorageFloat, const FUSED: bool>(
    masks: &[u64],
    vals: &[T],
    x: &[f32],
    cols: usize,
    tp: usize,
    nr: usize,
    bias: &impl Fn(usize) -> f32,
    out: &mut [f32],
    out_row: usize,
    rows: &mut impl ColumnRows,
) {
    if tp == 1 {
        let madd = |a: f32, b: f32, c: f32| if FUSED { a.mul_add(b, c) } else { a * b + c };
        let mut acc = [0.0f32; BLOCK_ROWS];
        for (i, a) in acc.iter_mut().enumerate().take(nr) {
            *a = bias(i);
        }
        let mut p = 0usize;
        for (c, words) in masks.chunks_exact(WORDS).enumerate() {
            let xc = x[c];
            let next = rows.visit(words, vals, p, |i, v| {
                acc[i] = madd(v.to_f32(), xc, acc[i]);
            });
            let Some(next) = next else {
                break;
            };
            p = next;
        }
        out[out_row..out_row + nr].copy_from_slice(&acc[..nr]);
        return;
    }
    let slabs = tp / 16;
    let mut t = 0;
    while t + 2 <= slabs {
        block_tile::<_, 32, FUSED>(masks, vals, x, cols, t, nr, bias, out, out_row, tp, rows);
        t += 2;
    }
    if t < slabs {
        block_tile::<_, 16, FUSED>(masks, vals, x, cols, t, nr, bias, out, out_row, tp, rows);
    }
}

/// How the column walk visits a column's kept rows: `f(i, v)` for each kept row `i` and its
/// value `v`, rows increasing, the values from `vals[p..]`; the position after the column's
/// values, or `None` when `vals` ends first.
trait ColumnRows {
    fn visit<T>(
        &mut self,
        words: &[u64],
        vals: &[T],
        p: usize,
        f: impl FnMut(usize, &T),
    ) -> Option<usize>;
}

/// Bit by bit, one loop per 64-row word.
struct BitWalk;

impl ColumnRows for BitWalk {
    #[inline(always)]
    fn visit<T>(
        &mut self,
        words: &[u64],
        vals: &[T],
        mut p: usize,
        mut f: impl FnMut(usize, &T),
    ) -> Option<usize> {
        for (w, &word) in words.iter().enumerate() {
            // One bounds check per word: its kept values are the next `count_ones` of `vals`.
            let n = word.count_ones() as usize;
            let run = vals.get(p..p + n)?;
            p += n;
            let mut bits = word;
            for v in run {
                let i = (w * 64 + bits.trailing_zeros() as usize) % BLOCK_ROWS;
                bits &= bits.wrapping_sub(1);
                f(i, v);
            }
        }
        Some(p)
    }
}

/// AVX-512: the column's rows listed first, per 16 rows one `vpcompressd` of the row numbers
/// under the column's mask bits (no branch on the bits), then one loop over the column. The
/// loop over a word ends after an unpredictable count of entries; this ends half as many loops.
#[cfg(target_arch = "x86_64")]
struct ListedRows {
    simd: pulp::x86::V4,
    /// Row numbers 16 q .. 16 q + 16.
    numbers: [std::arch::x86_64::__m512i; BLOCK_ROWS / 16],
    /// The column's kept rows, and 16 spare (each compress stores 16 lanes).
    listed: Aligned<[u32; BLOCK_ROWS + 16]>,
}

#[cfg(target_arch = "x86_64")]
impl ListedRows {
    #[inline(always)]
    fn new(simd: pulp::x86::V4) -> Self {
        let numbers = std::array::from_fn(|q| {
            pulp::cast::<[u32; 16], std::arch::x86_64::__m512i>(std::array::from_fn(|l| {
                (16 * q + l) as u32
            }))
        });
        Self {
            simd,
            numbers,
            listed: Aligned([0; BLOCK_ROWS + 16]),
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl ColumnRows for ListedRows {
    #[inline(always)]
    fn visit<T>(
        &mut self,
        words: &[u64],
        vals: &[T],
        p: usize,
        mut f: impl FnMut(usize, &T),
    ) -> Option<usize> {
        let avx = self.simd.avx512f;
        let listed = &mut self.listed.0;
        let mut n = 0usize;
        for (q, numbers) in self.numbers.iter().enumerate() {
            let bits = (words.get(q / 4).copied().unwrap_or(0) >> (16 * (q % 4))) as u16;
            let e = avx._mm512_maskz_compress_epi32(bits, *numbers);
            if let Some(dst) = listed.get_mut(n..n + 16) {
                dst.copy_from_slice(&pulp::cast::<std::arch::x86_64::__m512i, [u32; 16]>(e));
            }
            n += bits.count_ones() as usize;
        }
        let run = vals.get(p..p + n)?;
        for (v, &i) in run.iter().zip(&listed[..n]) {
            f(i as usize % BLOCK_ROWS, v);
        }
        Some(p + n)
    }
}

/// Which kernel computes one-token products (`tp = 1`). Not part of the stable interface: it
/// exists so that tests and benchmarks can run the AVX2 and generic kernels on a processor that
/// has AVX-512.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelChoice {
    /// The best the processor offers: AVX-512 (`vexpandps`), else AVX2 + FMA (permutation
    /// table), else the generic walk.
    #[default]
    Auto,
    /// AVX2 + FMA when the processor has them, else the generic walk.
    V3,
    /// The generic walk (scalar accumulators, compiled for the detected vector extensions).
    Generic,
}

/// Runs a one-token block kernel `kernel(values, p, sums)` on block `k`'s values (from
/// `values[p]`, with at least [`VALUE_PAD`] readable values past the block's last): f32 and bf16
/// (a shift) in place, f16 from a zero-padded f32 copy in `widened`. Exactly one call site of
/// the kernel survives per storage type: with two (in place and copied) the accumulators were
/// kept in memory instead of registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn with_block_values<S: StorageFloat, A: ?Sized>(
    m: &BlockedMatrix<S>,
    k: usize,
    widened: &mut Vec<f32>,
    sums: &mut A,
    kernel_s: impl FnOnce(&[S], usize, &mut A),
    kernel_f32: impl FnOnce(&[f32], usize, &mut A),
) {
    let (start, end) = (m.block_offsets[k], m.block_offsets[k + 1]);
    if matches!(S::DTYPE, crate::repr::compact::StorageDtype::F16) {
        let stored = &m.values[start..end];
        widened.clear();
        widened.resize(stored.len() + VALUE_PAD, 0.0);
        S::widen(stored, &mut widened[..stored.len()]);
        kernel_f32(widened, 0, sums);
    } else {
        kernel_s(&m.values, start, sums);
    }
}

/// The block's bias, zero-padded to [`BLOCK_ROWS`] lanes: the starting value of its
/// accumulators (so that every one-token kernel adds the same terms in the same order).
#[inline(always)]
fn block_bias<S: StorageFloat>(bias: Option<&[S]>, r0: usize, nr: usize) -> [f32; BLOCK_ROWS] {
    let mut b = [0.0f32; BLOCK_ROWS];
    if let Some(bias) = bias {
        for (d, s) in b.iter_mut().zip(&bias[r0..r0 + nr]) {
            *d = s.to_f32();
        }
    }
    b
}

/// Eight values cast one by one, with constant indices only: any loop over an accumulator
/// array (`from_fn`, `into_iter`) kept the accumulators in memory instead of registers.
#[inline(always)]
fn pack8<A: pulp::bytemuck::Pod, V: pulp::bytemuck::Pod>(a: [A; 8]) -> [V; 8] {
    let [a0, a1, a2, a3, a4, a5, a6, a7] = a;
    let c = pulp::cast::<A, V>;
    [c(a0), c(a1), c(a2), c(a3), c(a4), c(a5), c(a6), c(a7)]
}

/// One token, AVX-512: `out[i] = bias[i] + Σ_c m[i, c] x[c]` for the rows of `blocks`. Each
/// block's 128 accumulators stay in eight 16-lane registers; for every column and 16-row chunk of
/// the block the chunk's kept values are expanded into their rows' lanes (`vexpandps` under the
/// chunk's 16 mask bits) and multiply-added with the broadcast input `x[c]`, so a kept entry
/// costs about a quarter of a vector instruction, with no scatter. Same sums, in the same order
/// (bias, then the kept entries by increasing column, fused), as [`one_token_v3`] and the
/// generic walk of [`blocked_rows`] with fused multiply-adds: identical results.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn one_token_v4<S: StorageFloat>(
    simd: pulp::x86::V4,
    m: &BlockedMatrix<S>,
    x: &[f32],
    out: &mut [f32],
    bias: Option<&[S]>,
    blocks: Range<usize>,
) {
    let first_row = blocks.start * BLOCK_ROWS;
    let mut widened = Vec::new();
    for k in blocks {
        let (r0, nr, masks) = m.block(k);
        let init = block_bias(bias, r0, nr);
        let mut sums = [0.0f32; BLOCK_ROWS];
        with_block_values(
            m,
            k,
            &mut widened,
            &mut sums,
            |vals, p, sums| one_token_chunks(simd, masks, x, vals, p, &init, sums, nr),
            |vals, p, sums| one_token_chunks(simd, masks, x, vals, p, &init, sums, nr),
        );
        out[r0 - first_row..r0 - first_row + nr].copy_from_slice(&sums[..nr]);
    }
}

/// [`one_token_block`] over the block's first `⌈nr / 16⌉` chunks only: the chunks past a
/// block's last row (in the last block of a matrix whose rows are not a multiple of 128) keep
/// nothing and are skipped.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn one_token_chunks<T: StorageFloat>(
    simd: pulp::x86::V4,
    masks: &[u64],
    x: &[f32],
    vals: &[T],
    p: usize,
    init: &[f32; BLOCK_ROWS],
    sums: &mut [f32; BLOCK_ROWS],
    nr: usize,
) {
    match nr.div_ceil(16) {
        1 => one_token_block::<T, 1>(simd, masks, x, vals, p, init, sums),
        2 => one_token_block::<T, 2>(simd, masks, x, vals, p, init, sums),
        3 => one_token_block::<T, 3>(simd, masks, x, vals, p, init, sums),
        4 => one_token_block::<T, 4>(simd, masks, x, vals, p, init, sums),
        5 => one_token_block::<T, 5>(simd, masks, x, vals, p, init, sums),
        6 => one_token_block::<T, 6>(simd, masks, x, vals, p, init, sums),
        7 => one_token_block::<T, 7>(simd, masks, x, vals, p, init, sums),
        _ => one_token_block::<T, 8>(simd, masks, x, vals, p, init, sums),
    }
}

/// One block of [`one_token_v4`]: `sums` = the 128 row sums (eight 16-lane registers, starting
/// at `init`) of the block with column masks `masks`, its values read from `vals[p..]` (16 from
/// each chunk's first, of which the chunk's mask keeps its own), over the first `CHUNKS` 16-row
/// chunks (the others must keep nothing).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn one_token_block<T: StorageFloat, const CHUNKS: usize>(
    simd: pulp::x86::V4,
    masks: &[u64],
    x: &[f32],
    vals: &[T],
    mut p: usize,
    init: &[f32; BLOCK_ROWS],
    sums: &mut [f32; BLOCK_ROWS],
) {
    use std::arch::x86_64::__m512;
    let f = simd.avx512f;
    let mut acc: [__m512; 8] = pack8(pulp::cast::<_, [[f32; 16]; 8]>(*init));
    for (c, words) in masks.chunks_exact(WORDS).enumerate() {
        let xc = f._mm512_set1_ps(x[c]);
        for (h, &word) in words.iter().enumerate().take(CHUNKS.div_ceil(4)) {
            // One bounds check per word: every chunk's 16 values lie in these 72.
            let Ok(run) = <&[T; VALUE_PAD]>::try_from(&vals[p..p + VALUE_PAD]) else {
                break;
            };
            let mut o = 0usize;
            for q in 0..4.min(CHUNKS - 4 * h) {
                let bits = (word >> (16 * q)) as u16;
                // `o` (the kept entries of the word's rows above the chunk) is at most 48.
                let s = &run[o % 64..o % 64 + 16];
                let chunk: [f32; 16] = std::array::from_fn(|l| s[l].to_f32());
                let e = f._mm512_maskz_expand_ps(bits, pulp::cast::<[f32; 16], __m512>(chunk));
                acc[h * 4 + q] = f._mm512_fmadd_ps(e, xc, acc[h * 4 + q]);
                o += bits.count_ones() as usize;
            }
            p += o;
        }
    }
    *sums = pulp::cast(pack8::<_, [f32; 16]>(acc));
}

/// Whether [`slabs_v4`] runs a product of `m` on `tp` tokens: below [`MANY_TOKENS`], for
/// factors at least [`SLAB_DENSITY`] dense. Its cost is set by the slots (sixteen multiply-adds
/// per 16 rows, column and 16 tokens, kept or not), the column walk's by the kept entries (one
/// accumulator load, fused multiply-add and store each), so the walk wins on sparse factors and
/// the slabs on denser ones. Measured on an Intel Xeon (DeiT-tiny shapes): at 16 tokens,
/// entry-wise random masks at density 0.25 took 1.26–1.28 of the dense block with the slabs
/// against 1.15–1.18 with the walk, the trained file's factors (density 0.44–0.55) 0.66–0.68
/// against 0.68–1.02; on those, at 32 / 64 / 96 tokens, 0.97–1.00 / 1.26–1.33 / 1.46–1.50
/// against up to 1.25 / 1.69 / 1.90. From 128 tokens the register kernel ([`many_tokens`]) is
/// faster.
pub(crate) fn slabs_pay<S: StorageFloat>(m: &BlockedMatrix<S>, tp: usize) -> bool {
    let slots = m.rows as f64 * m.cols as f64;
    tp.is_multiple_of(16)
        && tp < MANY_TOKENS
        && slots > 0.0
        && m.nnz() as f64 >= SLAB_DENSITY * slots
}

/// Density of kept entries from which [`slabs_v4`] runs (see [`slabs_pay`]).
const SLAB_DENSITY: f64 = 0.3;

/// Tokens in slabs of 16 (`tp` a multiple of 16), AVX-512:
/// `out[i, :] = bias[i] + Σ_c m[i, c] x[c, :]` for the rows of `blocks`, inputs and outputs
/// token-minor (`x`: `cols × tp`, `out`: rows × `tp`). For every 16-token slab and 16-row chunk of
/// a block, the chunk's accumulators for the slab's 16 tokens stay in sixteen registers (lanes:
/// rows); for every column the chunk's kept values are expanded into their rows' lanes
/// (`vexpandps`, as in [`one_token_v4`]) and multiply-added with each token's broadcast input:
/// sixteen fused multiply-adds per 16 slots, no accumulator loads or stores in the walk (the
/// column walk of [`blocked_rows`] loads and stores a row's accumulators for every kept entry).
/// Same sums in the same order (bias, then the kept entries by increasing column, fused).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn slabs_v4<S: StorageFloat>(
    simd: pulp::x86::V4,
    m: &BlockedMatrix<S>,
    x: &[f32],
    tp: usize,
    out: &mut [f32],
    bias: Option<&[S]>,
    blocks: Range<usize>,
) {
    let cols = m.cols;
    let first_row = blocks.start * BLOCK_ROWS;
    let mut widened = Vec::new();
    // Position of every (column, word)'s first value within its block.
    let mut starts = Vec::with_capacity(cols * WORDS);
    for k in blocks {
        let (r0, nr, masks) = m.block(k);
        starts.clear();
        let mut p = 0usize;
        for &word in masks {
            starts.push(p);
            p += word.count_ones() as usize;
        }
        let init = block_bias(bias, r0, nr);
        let Some(block_out) = out.get_mut((r0 - first_row) * tp..(r0 - first_row + nr) * tp) else {
            continue;
        };
        let slab = SlabBlock {
            masks,
            starts: &starts,
            x,
            tp,
            init: &init,
            nr,
        };
        with_block_values(
            m,
            k,
            &mut widened,
            block_out,
            |vals, p, o| slab.run(simd, vals, p, o),
            |vals, p, o| slab.run(simd, vals, p, o),
        );
    }
}

/// One block of [`slabs_v4`].
#[cfg(target_arch = "x86_64")]
struct SlabBlock<'a> {
    masks: &'a [u64],
    starts: &'a [usize],
    x: &'a [f32],
    tp: usize,
    init: &'a [f32; BLOCK_ROWS],
    nr: usize,
}

#[cfg(target_arch = "x86_64")]
impl SlabBlock<'_> {
    /// The block's `nr × tp` outputs into `out`, its values read from `vals[p..]`.
    #[inline(always)]
    fn run<T: StorageFloat>(&self, simd: pulp::x86::V4, vals: &[T], p: usize, out: &mut [f32]) {
        use std::arch::x86_64::__m512;
        let f = simd.avx512f;
        let tp = self.tp;
        let cols = self.masks.len() / WORDS;
        for s in 0..tp / 16 {
            for q in 0..self.nr.div_ceil(16) {
                let (h, shift) = (q / 4, 16 * (q % 4));
                let below = (1u64 << shift) - 1;
                let start: [f32; 16] = std::array::from_fn(|l| self.init[16 * q + l]);
                let mut acc = [pulp::cast::<[f32; 16], __m512>(start); 16];
                for (c, (words, starts)) in self
                    .masks
                    .chunks_exact(WORDS)
                    .zip(self.starts.chunks_exact(WORDS))
                    .enumerate()
                {
                    let word = words[h];
                    let bits = (word >> shift) as u16;
                    let o = p + starts[h] + (word & below).count_ones() as usize;
                    let xs = slab_start(s, cols, tp, c);
                    let (Some(v), Some(xs)) = (vals.get(o..o + 16), self.x.get(xs..xs + 16)) else {
                        break;
                    };
                    let chunk: [f32; 16] = std::array::from_fn(|l| v[l].to_f32());
                    let e = f._mm512_maskz_expand_ps(bits, pulp::cast::<[f32; 16], __m512>(chunk));
                    for (a, &xt) in acc.iter_mut().zip(xs) {
                        *a = f._mm512_fmadd_ps(e, f._mm512_set1_ps(xt), *a);
                    }
                }
                // Lanes are rows, registers tokens: written transposed.
                let sums = pulp::cast::<[__m512; 16], [[f32; 16]; 16]>(acc);
                for l in 0..16.min(self.nr - 16 * q) {
                    let o = (16 * q + l) * tp + 16 * s;
                    if let Some(row) = out.get_mut(o..o + 16) {
                        for (d, t) in row.iter_mut().zip(&sums) {
                            *d = t[l];
                        }
                    }
                }
            }
        }
    }
}

/// For each byte `b` of a mask: the permutation that moves the byte's kept values (contiguous,
/// in lane order) into their rows' lanes (lane `l` reads value `popcount(b & (2^l − 1))`), and
/// the lanes' keep mask (all ones where bit `l` is set, zero elsewhere).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Expand8 {
    index: [u32; 8],
    keep: [u32; 8],
}

static EXPAND8: [Expand8; 256] = {
    let mut t = [Expand8 {
        index: [0; 8],
        keep: [0; 8],
    }; 256];
    let mut b = 0;
    while b < 256 {
        let mut l = 0;
        let mut k = 0u32;
        while l < 8 {
            if b & (1 << l) != 0 {
                t[b].index[l] = k;
                t[b].keep[l] = u32::MAX;
                k += 1;
            }
            l += 1;
        }
        b += 1;
    }
    t
};

/// One token, AVX2 + FMA: the computation of [`one_token_v4`] with 8-lane registers. A block's
/// 128 accumulators would take all sixteen registers, so the block's columns are walked twice,
/// once per 64-row half (eight accumulators in registers; the second walk finds the block's
/// values in the second-level cache). For every column and 8-row chunk the chunk's kept values
/// are loaded (8 from the chunk's first), moved into their rows' lanes by `vpermps` with the
/// index vector [`EXPAND8`] gives for the chunk's mask byte, the lanes of clear bits zeroed by
/// its keep mask, and multiply-added with the broadcast input: about eight instructions per 8
/// rows, no scatter. Same sums in the same order as [`one_token_v4`]: identical results.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn one_token_v3<S: StorageFloat>(
    simd: pulp::x86::V3,
    m: &BlockedMatrix<S>,
    x: &[f32],
    out: &mut [f32],
    bias: Option<&[S]>,
    blocks: Range<usize>,
) {
    let first_row = blocks.start * BLOCK_ROWS;
    let mut widened = Vec::new();
    for k in blocks {
        let (r0, nr, masks) = m.block(k);
        let init = block_bias(bias, r0, nr);
        let mut sums = [0.0f32; BLOCK_ROWS];
        with_block_values(
            m,
            k,
            &mut widened,
            &mut sums,
            |vals, p, sums| one_token_block_v3(simd, masks, x, vals, p, &init, sums, nr),
            |vals, p, sums| one_token_block_v3(simd, masks, x, vals, p, &init, sums, nr),
        );
        out[r0 - first_row..r0 - first_row + nr].copy_from_slice(&sums[..nr]);
    }
}

/// One block of [`one_token_v3`]: `sums` = the first `nr` of the 128 row sums, starting at
/// `init`, of the block with column masks `masks`, its values read from `vals[p..]` (the second
/// half walked only when the block has rows there).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn one_token_block_v3<T: StorageFloat>(
    simd: pulp::x86::V3,
    masks: &[u64],
    x: &[f32],
    vals: &[T],
    p: usize,
    init: &[f32; BLOCK_ROWS],
    sums: &mut [f32; BLOCK_ROWS],
    nr: usize,
) {
    v3_half::<T, 0>(simd, masks, x, vals, p, init, sums);
    if nr > 64 {
        v3_half::<T, 1>(simd, masks, x, vals, p, init, sums);
    }
}

/// Half `H` (rows `64 H .. 64 H + 64`) of [`one_token_block_v3`]: eight 8-lane accumulators
/// starting at that half of `init`, written to that half of `sums`, the block's values starting
/// at `vals[p]`. Each half reads its own part of `init`: with both halves' starting values
/// loaded before the first walk, its accumulators were spilled.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn v3_half<T: StorageFloat, const H: usize>(
    simd: pulp::x86::V3,
    masks: &[u64],
    x: &[f32],
    vals: &[T],
    mut p: usize,
    init: &[f32; BLOCK_ROWS],
    sums: &mut [f32; BLOCK_ROWS],
) {
    use std::arch::x86_64::{__m256, __m256i};
    let half =
        |a: &[f32; BLOCK_ROWS]| -> [[f32; 8]; 8] { pulp::cast::<_, [[[f32; 8]; 8]; 2]>(*a)[H] };
    let mut acc: [__m256; 8] = pack8(half(init));
    // The masks' bytes read one by one from memory (one load each, no shifts), the chunk
    // offsets by a running sum of their counts.
    let bytes: &[u8] = pulp::bytemuck::cast_slice(masks);
    for (column, &xc) in bytes.chunks_exact(8 * WORDS).zip(x) {
        let Ok(column) = <&[u8; 8 * WORDS]>::try_from(column) else {
            break;
        };
        let [w0, w1] = pulp::cast::<_, [u64; WORDS]>(*column);
        let xc = simd.avx._mm256_set1_ps(xc);
        if H == 1 {
            p += w0.count_ones() as usize;
        }
        // One bounds check per column: every chunk's 8 values lie in these 72.
        let Ok(run) = <&[T; VALUE_PAD]>::try_from(&vals[p..p + VALUE_PAD]) else {
            break;
        };
        let mut o = 0usize;
        for b in 0..8 {
            let byte = column[8 * H + b];
            // `o` (the kept entries of the half's rows above the chunk) is at most 56.
            let s = &run[o % 64..o % 64 + 8];
            let chunk: [f32; 8] = std::array::from_fn(|l| s[l].to_f32());
            let e = &EXPAND8[byte as usize];
            let moved = simd.avx2._mm256_permutevar8x32_ps(
                pulp::cast::<[f32; 8], __m256>(chunk),
                pulp::cast::<[u32; 8], __m256i>(e.index),
            );
            let kept = simd
                .avx
                ._mm256_and_ps(moved, pulp::cast::<[u32; 8], __m256>(e.keep));
            acc[b] = simd.fma._mm256_fmadd_ps(kept, xc, acc[b]);
            o += byte.count_ones() as usize;
        }
        p += o;
        if H == 0 {
            p += w1.count_ones() as usize;
        }
    }
    let done: [[f32; 8]; 8] = pack8(acc);
    sums[64 * H..64 * H + 64].copy_from_slice(&pulp::cast::<_, [f32; 64]>(done));
}

/// One block's product for the `L` tokens of the 16-token slabs `t, t + L/16 − 1`: the block's
/// `L`-lane accumulators live in the first-level cache while the inputs stream by column.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block_tile<T: StorageFloat, const L: usize, const FUSED: bool>(
    masks: &[u64],
    vals: &[T],
    x: &[f32],
    cols: usize,
    t: usize,
    nr: usize,
    bias: &impl Fn(usize) -> f32,
    out: &mut [f32],
    out_row: usize,
    tp: usize,
    rows: &mut impl ColumnRows,
) {
    let madd = |a: f32, b: f32, c: f32| if FUSED { a.mul_add(b, c) } else { a * b + c };
    let mut acc = Aligned([[0.0f32; L]; BLOCK_ROWS]);
    let acc = &mut acc.0;
    for (i, a) in acc.iter_mut().enumerate().take(nr) {
        *a = [bias(i); L];
    }
    let mut p = 0usize;
    for (c, words) in masks.chunks_exact(WORDS).enumerate() {
        let mut xr = [0.0f32; L];
        for (h, part) in xr.chunks_exact_mut(16).enumerate() {
            let s = slab_start(t + h, cols, tp, c);
            if let Some(xs) = x.get(s..s + 16) {
                part.copy_from_slice(xs);
            }
        }
        let next = rows.visit(words, vals, p, |i, v| {
            let v = v.to_f32();
            let a = &mut acc[i];
            for l in 0..L {
                a[l] = madd(v, xr[l], a[l]);
            }
        });
        let Some(next) = next else {
            break;
        };
        p = next;
    }
    for (i, a) in acc.iter().enumerate().take(nr) {
        let o = (out_row + i) * tp + t * 16;
        if let Some(dst) = out.get_mut(o..o + L) {
            dst.copy_from_slice(a);
        }
    }
}

/// Whether [`column_walk_v4`] runs a product on `tp` tokens: 16 (one slab). Measured on the
/// Intel Xeon of `docs/results.md` (DeiT-tiny and 7B shapes, density 0.25): 16 tokens 1.05–1.09
/// of the dense block against 1.25–1.31 with [`blocked_rows`]; from 32 tokens on it was slower in
/// two of three pairs (64 tokens 1.42 against 1.26), so the walk of [`blocked_rows`] stays there.
pub(crate) fn column_walk_v4_pays(tp: usize) -> bool {
    tp == 16
}

/// 16 tokens, AVX-512: the column walk of [`blocked_rows`] with each column's rows listed
/// first by `vpcompressd` (per 16 rows, no branch on the bits) and then walked in one loop per
/// column, instead of one loop per 64-row word: the end of each loop comes after an
/// unpredictable count of entries, and those mispredicted branches were about 40 % of a
/// 16-token pass; this halves them. Same sums in the same order (bias, then the kept entries
/// by increasing column, fused): the bits of [`blocked_rows`] with `FUSED`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn column_walk_v4<S: StorageFloat>(
    simd: pulp::x86::V4,
    m: &BlockedMatrix<S>,
    x: &[f32],
    tp: usize,
    out: &mut [f32],
    bias: Option<&[S]>,
    blocks: Range<usize>,
) {
    blocked_rows_with::<S, true>(m, x, tp, out, bias, blocks, &mut ListedRows::new(simd));
}

/// A block's accumulators on a cache-line boundary, so that no access splits a line: on the
/// stack they could start anywhere, and at 64 tokens (32-lane rows) split rows made the DeiT-tiny
/// block 1.2× slower (1.56 → 1.30 of the dense block, Intel Xeon).
#[repr(align(64))]
struct Aligned<A>(A);

/// Input columns per segment of [`BlockRows`]: a segment's inputs for a tile of
/// [`TILE_TOKENS`] tokens (64 KiB in `f32`) stay in the first- and second-level caches while its
/// rows walk them.
const SEGMENT_COLS: usize = 128;

/// One block's kept entries by column segment ([`SEGMENT_COLS`] inputs), then row: segment `s`
/// of row `i` has its entries at `starts[s · BLOCK_ROWS + i] .. starts[s · BLOCK_ROWS + i + 1]`,
/// columns increasing, each as (position of its input row in a tile, value as `f32`). Scratch
/// of [`many_tokens`], refilled per block.
#[derive(Debug, Default)]
struct BlockRows {
    starts: Vec<usize>,
    entries: Vec<(u32, f32)>,
}

/// `counts[s · BLOCK_ROWS + i]` = the kept entries of row `i` among the columns of segment `s`,
/// for a block with column masks `masks`. Counted bit-sliced: per 64-row word, eight 64-bit
/// planes hold the 64 counts' binary digits, and each column's word is added to them with a
/// ripple of carries, a few word operations per column instead of a few per kept entry.
fn count_rows(masks: &[u64], counts: &mut [usize]) {
    for (s, segment) in masks.chunks(SEGMENT_COLS * WORDS).enumerate() {
        for w in 0..WORDS {
            // A count is at most SEGMENT_COLS = 128 < 2⁸.
            let mut planes = [0u64; 8];
            for words in segment.chunks_exact(WORDS) {
                let mut carry = words[w];
                for plane in planes.iter_mut() {
                    if carry == 0 {
                        break;
                    }
                    let next = *plane & carry;
                    *plane ^= carry;
                    carry = next;
                }
            }
            let first = s * BLOCK_ROWS + w * 64;
            if let Some(out) = counts.get_mut(first..first + 64) {
                for (b, count) in out.iter_mut().enumerate() {
                    *count = planes
                        .iter()
                        .enumerate()
                        .map(|(p, plane)| (((plane >> b) & 1) as usize) << p)
                        .sum();
                }
            }
        }
    }
}

impl BlockRows {
    /// Fills the rows of block `k` of `m` for inputs `stride` apart: a count per segment and
    /// row, then one walk of the block's column-major entries that drops each into its place
    /// (so columns arrive increasing).
    fn fill<S: StorageFloat>(&mut self, m: &BlockedMatrix<S>, k: usize, stride: usize) {
        let masks = &m.masks[k * m.cols * WORDS..(k + 1) * m.cols * WORDS];
        let slots = m.cols.div_ceil(SEGMENT_COLS) * BLOCK_ROWS;
        let next = &mut self.starts;
        next.clear();
        next.resize(slots + 1, 0);
        count_rows(masks, &mut next[1..]);
        for s in 0..slots {
            next[s + 1] += next[s];
        }
        let entries = &mut self.entries;
        entries.resize(m.block_nnz(k..k + 1), (0, 0.0));
        // `next[s]` walks slot `s`'s range; afterwards it holds the range's end, the start of
        // slot `s + 1`, so shifting by one slot restores the starts.
        m.for_each_in_block(k, |i, c, v| {
            let slot = c / SEGMENT_COLS * BLOCK_ROWS + i;
            if let Some(n) = next.get_mut(slot)
                && let Some(e) = entries.get_mut(*n)
            {
                *e = ((c * stride) as u32, v.to_f32());
                *n += 1;
            }
        });
        next.copy_within(0..slots, 1);
        next[0] = 0;
    }

    /// Segments.
    fn segments(&self) -> usize {
        (self.starts.len() - 1) / BLOCK_ROWS
    }

    /// Entries of segment `s` of row `i`.
    #[inline(always)]
    fn entries(&self, s: usize, i: usize) -> &[(u32, f32)] {
        let slot = s * BLOCK_ROWS + i;
        &self.entries[self.starts[slot]..self.starts[slot + 1]]
    }
}

/// Whether [`many_tokens`] runs a product with `cols` inputs on `tp` tokens: from
/// [`MANY_TOKENS`] on, where listing each block's entries by row (once per product) costs less than
/// it saves. Measured on DeiT-tiny shapes (`examples/inference_cpu_time`): at 64 tokens the
/// column walk of [`blocked_rows`] is faster, at 128 the register kernel. (And only while every
/// input position fits the entries' `u32`.)
pub(crate) fn many_tokens_pay(cols: usize, tp: usize) -> bool {
    tp >= MANY_TOKENS
        && cols
            .checked_mul(TILE_TOKENS)
            .is_some_and(|n| u32::try_from(n).is_ok())
}

/// Many tokens, vector registers: `out[i, :] = bias[i] + Σ_c m[i, c] x[c, :]` for the rows of
/// `blocks`, `tp` a multiple of 16, inputs tile-major ([`tile_major`]). Each block's entries are
/// first listed by column segment and row ([`BlockRows`]); then for every tile of up to
/// [`TILE_TOKENS`] tokens (in passes of at most [`MAX_ROW_VECTORS`] vectors per row), every
/// segment and every pair of rows, the rows' accumulators (vector registers, two independent
/// chains of fused multiply-adds) take one multiply-add per kept entry and vector with the input
/// row `x[c, pass]` (in the caches) and are stored once per segment. The column-major walk of [`blocked_rows`] loads and stores a row's accumulators
/// for every kept entry, which bounds it by the store rate. Same sums in the same order (bias,
/// then the kept entries by increasing column, fused): the bits of [`blocked_rows`] with `FUSED`.
#[inline(always)]
pub(crate) fn many_tokens<S: StorageFloat, V: pulp::Simd>(
    simd: V,
    m: &BlockedMatrix<S>,
    x: &[f32],
    tp: usize,
    out: &mut [f32],
    bias: Option<&[S]>,
    blocks: Range<usize>,
) {
    let cols = m.cols;
    let first_row = blocks.start * BLOCK_ROWS;
    let lanes = V::F32_LANES;
    let stride = tile_stride(tp);
    // Each tile in passes of at most `MAX_ROW_VECTORS` vectors per row (AVX-512: a whole tile
    // of 128 tokens, so each entry is read once per tile; AVX2: 64 tokens); without vectors
    // (one lane), the whole tile a lane at a time.
    let pass = if lanes > 1 {
        MAX_ROW_VECTORS * lanes
    } else {
        TILE_TOKENS
    };
    let mut rows = BlockRows::default();
    for k in blocks {
        let (r0, nr, _) = m.block(k);
        rows.fill(m, k, stride);
        let bias = |i: usize| bias.map_or(0.0, |b| b[r0 + i].to_f32());
        for first in (0..tp).step_by(TILE_TOKENS) {
            let width = TILE_TOKENS.min(tp - first);
            let Some(tile) = x.get(first * cols..first * cols + cols * stride) else {
                continue;
            };
            for lane0 in (0..width).step_by(pass) {
                let w = pass.min(width - lane0);
                for segment in 0..rows.segments() {
                    let t = Tile {
                        rows: &rows,
                        segment,
                        x: &tile[lane0..],
                        width: w,
                        nr,
                        first_out: (r0 - first_row) * tp + first + lane0,
                        tp,
                    };
                    match w / lanes {
                        1 => t.run::<V, 1>(simd, &bias, out),
                        2 => t.run::<V, 2>(simd, &bias, out),
                        3 => t.run::<V, 3>(simd, &bias, out),
                        4 => t.run::<V, 4>(simd, &bias, out),
                        5 => t.run::<V, 5>(simd, &bias, out),
                        6 => t.run::<V, 6>(simd, &bias, out),
                        7 => t.run::<V, 7>(simd, &bias, out),
                        8 => t.run::<V, 8>(simd, &bias, out),
                        _ => t.run_scalar(&bias, out),
                    }
                }
            }
        }
    }
}

/// One pass over a tile of tokens (`width` of them) and one column segment of one block in
/// [`many_tokens`].
struct Tile<'a> {
    rows: &'a BlockRows,
    segment: usize,
    /// The pass's inputs: input row `c`, token `l` of the pass at `c · stride + l` (the
    /// positions the entries hold).
    x: &'a [f32],
    width: usize,
    nr: usize,
    /// Position in `out` of the block's first row, first token of the pass.
    first_out: usize,
    tp: usize,
}

impl Tile<'_> {
    /// The accumulators row `i` starts the segment from: its bias in the first segment, the
    /// sums so far (in `out`) in the others.
    #[inline(always)]
    fn start<V: pulp::Simd, const N: usize>(
        &self,
        simd: V,
        i: usize,
        bias: &impl Fn(usize) -> f32,
        out: &[f32],
    ) -> [V::f32s; N] {
        let lanes = V::F32_LANES;
        let mut acc = [simd.splat_f32s(bias(i)); N];
        let o = self.first_out + i * self.tp;
        if self.segment > 0
            && let Some(sums) = out.get(o..o + N * lanes)
        {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = load::<V>(&sums[j * lanes..(j + 1) * lanes]);
            }
        }
        acc
    }

    /// Stores row `i`'s accumulators.
    #[inline(always)]
    fn store<V: pulp::Simd, const N: usize>(&self, i: usize, acc: &[V::f32s; N], out: &mut [f32]) {
        let o = self.first_out + i * self.tp;
        if let Some(dst) = out.get_mut(o..o + N * V::F32_LANES) {
            dst.copy_from_slice(pulp::bytemuck::cast_slice(acc));
        }
    }

    /// `acc += v · x[c, tile]`, the tile in `N` vectors of `V`.
    #[inline(always)]
    fn madd<V: pulp::Simd, const N: usize>(
        &self,
        simd: V,
        (o, v): (u32, f32),
        acc: &mut [V::f32s; N],
    ) {
        let lanes = V::F32_LANES;
        let o = o as usize;
        let Some(xs) = self.x.get(o..o + N * lanes) else {
            return;
        };
        let v = simd.splat_f32s(v);
        for (j, a) in acc.iter_mut().enumerate() {
            *a = simd.mul_add_f32s(v, load::<V>(&xs[j * lanes..(j + 1) * lanes]), *a);
        }
    }

    /// The segment's rows, two at a time (independent chains), in `N` vectors of `V` per row
    /// (`N · lanes = width`).
    #[inline(always)]
    fn run<V: pulp::Simd, const N: usize>(
        &self,
        simd: V,
        bias: &impl Fn(usize) -> f32,
        out: &mut [f32],
    ) {
        let mut i = 0;
        while i < self.nr {
            let ea = self.rows.entries(self.segment, i);
            let mut a = self.start::<V, N>(simd, i, bias, out);
            if i + 1 < self.nr {
                let eb = self.rows.entries(self.segment, i + 1);
                let mut b = self.start::<V, N>(simd, i + 1, bias, out);
                let both = ea.len().min(eb.len());
                for (&ta, &tb) in ea[..both].iter().zip(&eb[..both]) {
                    self.madd::<V, N>(simd, ta, &mut a);
                    self.madd::<V, N>(simd, tb, &mut b);
                }
                for &t in &eb[both..] {
                    self.madd::<V, N>(simd, t, &mut b);
                }
                self.store::<V, N>(i + 1, &b, out);
                for &t in &ea[both..] {
                    self.madd::<V, N>(simd, t, &mut a);
                }
            } else {
                for &t in ea {
                    self.madd::<V, N>(simd, t, &mut a);
                }
            }
            self.store::<V, N>(i, &a, out);
            i += 2;
        }
    }

    /// The pass one lane at a time (without vector registers, or for a vector width that does
    /// not divide the pass's).
    fn run_scalar(&self, bias: &impl Fn(usize) -> f32, out: &mut [f32]) {
        for i in 0..self.nr {
            let entries = self.rows.entries(self.segment, i);
            let o = self.first_out + i * self.tp;
            let Some(dst) = out.get_mut(o..o + self.width) else {
                continue;
            };
            for (l, d) in dst.iter_mut().enumerate() {
                let mut a = if self.segment == 0 { bias(i) } else { *d };
                for &(c, v) in entries {
                    if let Some(&x) = self.x.get(c as usize + l) {
                        a = v.mul_add(x, a);
                    }
                }
                *d = a;
            }
        }
    }
}

/// One vector of `V` from the first lanes of `xs` (any alignment).
#[inline(always)]
fn load<V: pulp::Simd>(xs: &[f32]) -> V::f32s {
    pulp::bytemuck::pod_read_unaligned(pulp::bytemuck::cast_slice(&xs[..V::F32_LANES]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `many_tokens` with pulp's portable vectors of 1, 8 and 16 lanes (so every arm of its
    /// width match runs, the one-lane fallback included) gives the bits of the fused column walk
    /// on 128 to 256 tokens (a full tile of 128, then last tiles of 16 to 128: every count of
    /// vectors per row from 1 to 8), several segments, a ragged last block.
    #[test]
    fn register_kernel_gives_the_bits_of_the_column_walk_at_every_vector_width() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (rows, cols) = (200, 300);
        let mask = Array2::from_shape_simple_fn((rows, cols), || rng.random_bool(0.25));
        let values = Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-1.0f32..1.0));
        let m = BlockedMatrix::from_compact(
            &CompactMatrix::<f32>::from_dense(values.view(), mask.view()).unwrap(),
        );
        let bias: Vec<f32> = (0..rows).map(|i| (i as f32).cos()).collect();
        for tp in [128, 144, 160, 176, 192, 208, 224, 240, 256] {
            let x: Vec<f32> = (0..cols * tp)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let mut tiles = vec![0.0; tile_major_len(cols, tp)];
            tile_major(&x, cols, tp, &mut tiles);
            let blocks = 0..m.blocks();
            let mut walk = vec![f32::NAN; rows * tp];
            blocked_rows::<f32, true>(&m, &tiles, tp, &mut walk, Some(&bias), blocks.clone());
            let mut one = vec![f32::NAN; rows * tp];
            many_tokens(
                pulp::Scalar,
                &m,
                &tiles,
                tp,
                &mut one,
                Some(&bias),
                blocks.clone(),
            );
            let mut eight = vec![f32::NAN; rows * tp];
            many_tokens(
                pulp::Scalar256b,
                &m,
                &tiles,
                tp,
                &mut eight,
                Some(&bias),
                blocks.clone(),
            );
            let mut sixteen = vec![f32::NAN; rows * tp];
            many_tokens(
                pulp::Scalar512b,
                &m,
                &tiles,
                tp,
                &mut sixteen,
                Some(&bias),
                blocks,
            );
            for got in [&one, &eight, &sixteen] {
                assert!(
                    got.iter()
                        .zip(&walk)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "tp {tp}"
                );
            }
        }
    }

    #[test]
    fn blocked_layout_round_trips_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for &(rows, cols) in &[(1, 1), (255, 3), (256, 7), (257, 64), (600, 33)] {
            for density in [0.0, 0.1, 0.25, 1.0] {
                let mask = Array2::from_shape_simple_fn((rows, cols), || rng.random_bool(density));
                let values =
                    Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-1.0f32..1.0));
                let m =
                    CompactMatrix::<half::bf16>::from_dense(values.view(), mask.view()).unwrap();
                let b = BlockedMatrix::from_compact(&m);
                assert_eq!(b.blocks(), rows.div_ceil(BLOCK_ROWS));
                assert_eq!(b.block_nnz(0..b.blocks()), m.nnz());
                let back = b.to_compact().unwrap();
                assert_eq!(back.to_dense(), m.to_dense());
                assert_eq!(back.pattern().to_mask(), mask);
                // One bit per entry (last block padded), values unchanged in number.
                assert_eq!(
                    b.stored_bytes(),
                    b.blocks() * BLOCK_ROWS * cols / 8 + 2 * m.nnz()
                );
            }
        }
    }
}
