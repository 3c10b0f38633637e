//! The inference layout of a sparse matrix whose kept entries come in whole 2×2 tiles (FiPS
//! trained with [`crate::MaskTiles::Square2`] masks, `fips compress --mask-tiles 2x2`): row pairs, each a list of kept tiles.
//!
//! Tile `(p, q)` covers rows `2p, 2p + 1` and columns `2q, 2q + 1`; its four values are stored
//! together as `[m[2p, 2q], m[2p, 2q + 1], m[2p + 1, 2q], m[2p + 1, 2q + 1]]` (zero where the
//! tile reaches past an odd last row or column). A product `out = m x` over a window of `w`
//! tokens then keeps both output rows' `w` accumulators in registers, and every input vector it
//! loads (`x[2q, ·]`, `x[2q + 1, ·]`) feeds two multiply-adds instead of one: with unstructured
//! masks each kept entry costs a vector load per multiply-add and the kernel is bound by the
//! cache's load bandwidth (about a third of sgemm's rate); with tiles it runs at about 0.7.
//!
//! Sums: every output is the sum of two chains of fused multiply-adds over its tiles in
//! increasing column order, one over the tiles' even columns starting at the bias and one over
//! their odd columns starting at zero (`(b + Σ m[i, 2q] x[2q]) + Σ m[i, 2q + 1] x[2q + 1]`),
//! whatever the token count or thread count: the products agree bit for bit across kernels,
//! and the two chains let the multiply-adds of consecutive tiles overlap.

use std::ops::Range;

use crate::foundation::error::Result;
use crate::repr::compact::{CompactMatrix, SparsePattern, StorageFloat};
use crate::repr::sparse_blocked::KernelChoice;

/// Most 16-token vectors per window: a window's two output rows take four chains of this many
/// 16-lane registers (24 of 32 with AVX-512), plus two inputs and four broadcast values.
const MAX_WINDOW_VECTORS: usize = 6;

/// The token windows `(start, width)` of `tp` tokens (a multiple of 16): windows of four
/// vectors (64 tokens) while more than six vectors remain, then one of the rest (four to six
/// vectors, or the whole of fewer than four), so that no short window re-reads every value for a
/// few tokens.
fn windows(tp: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut start = 0;
    std::iter::from_fn(move || {
        let left = (tp - start) / 16;
        if left == 0 {
            return None;
        }
        let n = if left > MAX_WINDOW_VECTORS { 4 } else { left };
        let window = (start, 16 * n);
        start += 16 * n;
        Some(window)
    })
}

/// A sparse matrix stored as kept 2×2 tiles, row pair by row pair.
#[derive(Debug, Clone, PartialEq)]
pub struct TiledMatrix<S> {
    rows: usize,
    cols: usize,
    /// First tile of each row pair; `pairs + 1` entries.
    offsets: Vec<usize>,
    /// Column pair `q` of each tile, increasing within a row pair.
    columns: Vec<u16>,
    /// Each tile's four values (see the module documentation).
    values: Vec<[S; 4]>,
    nnz: usize,
}

impl<S: StorageFloat> TiledMatrix<S> {
    /// The tiled layout of `m`, or `None` when some 2×2 tile is kept only in part (or the
    /// column pairs do not fit 16 bits).
    pub fn from_compact(m: &CompactMatrix<S>) -> Option<Self> {
        let (rows, cols) = (m.rows(), m.cols());
        if cols.div_ceil(2) > usize::from(u16::MAX) + 1 {
            return None;
        }
        let pairs = rows.div_ceil(2);
        let mut offsets = Vec::with_capacity(pairs + 1);
        offsets.push(0);
        let (mut columns, mut values) = (Vec::new(), Vec::new());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for p in 0..pairs {
            m.pattern().row_columns(2 * p, &mut a);
            let top = m.row_values(2 * p);
            let bottom = if 2 * p + 1 < rows {
                m.pattern().row_columns(2 * p + 1, &mut b);
                if a != b {
                    return None;
                }
                Some(m.row_values(2 * p + 1))
            } else {
                None
            };
            let mut k = 0;
            while k < a.len() {
                let c = a[k] as usize;
                if !c.is_multiple_of(2) {
                    return None;
                }
                let wide = c + 1 < cols;
                if wide && a.get(k + 1).is_none_or(|&n| n as usize != c + 1) {
                    return None;
                }
                let n = if wide { 2 } else { 1 };
                let z = S::default();
                let pick = |row: &[S], j: usize| if j < n { row[k + j] } else { z };
                let (t0, t1) = (pick(top, 0), pick(top, 1));
                let (b0, b1) = bottom.map_or((z, z), |r| (pick(r, 0), pick(r, 1)));
                columns.push((c / 2) as u16);
                values.push([t0, t1, b0, b1]);
                k += n;
            }
            offsets.push(columns.len());
        }
        Some(Self {
            rows,
            cols,
            offsets,
            columns,
            values,
            nnz: m.nnz(),
        })
    }

    /// The row-major compact form (smallest pattern encoding).
    pub fn to_compact(&self) -> Result<CompactMatrix<S>> {
        let (rows, cols) = (self.rows, self.cols);
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0usize);
        let mut columns = Vec::with_capacity(self.nnz);
        let mut values = Vec::with_capacity(self.nnz);
        for i in 0..rows {
            let p = i / 2;
            for t in self.offsets[p]..self.offsets[p + 1] {
                let c = 2 * usize::from(self.columns[t]);
                let v = &self.values[t];
                for j in 0..2 {
                    if c + j < cols {
                        columns.push((c + j) as u32);
                        values.push(v[2 * (i % 2) + j]);
                    }
                }
            }
            offsets.push(columns.len());
        }
        let pattern = SparsePattern::from_csr(rows, cols, &offsets, &columns, None)?;
        CompactMatrix::new(pattern, values)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row pairs (`⌈rows / 2⌉`).
    pub fn pairs(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Kept entries.
    pub fn nnz(&self) -> usize {
        self.nnz
    }

    /// Kept tiles of the row pairs in `pairs`.
    pub fn pair_tiles(&self, pairs: Range<usize>) -> usize {
        self.offsets[pairs.end] - self.offsets[pairs.start]
    }

    /// Bytes held: four values and a 16-bit column pair per tile, an offset per row pair.
    pub fn stored_bytes(&self) -> usize {
        self.values.len() * (4 * S::DTYPE.size() + 2) + self.offsets.len() * 8
    }
}

/// Token-minor `x` (`cols × tp`) rearranged window-major for [`tiled_rows`]: the windows of
/// [`windows`], window `k` starting at
/// `start_k · cols'` with `x[c, start_k + l]` at `c · w_k + l`; `cols'` is `cols` rounded up to
/// even, the padding row zero. One token (`tp = 1`) is `x` padded to `cols'`. Written into
/// `out` (at least `cols' · tp` values, the first `cols' · tp` all rewritten).
pub(crate) fn window_major(x: &[f32], cols: usize, tp: usize, out: &mut [f32]) {
    let even = cols.next_multiple_of(2);
    if tp == 1 {
        out[..cols].copy_from_slice(&x[..cols]);
        out[cols..even].fill(0.0);
        return;
    }
    for (start, w) in windows(tp) {
        let base = start * even;
        for (c, row) in x.chunks_exact(tp).enumerate().take(cols) {
            out[base + c * w..base + c * w + w].copy_from_slice(&row[start..start + w]);
        }
        out[base + cols * w..base + even * w].fill(0.0);
    }
}

/// The value row `i`'s sum starts from: its bias, or zero without one or past the last row
/// (the partner of an odd last row).
#[inline(always)]
fn start_value<S: StorageFloat>(bias: Option<&[S]>, rows: usize, i: usize) -> f32 {
    match bias {
        Some(b) if i < rows => b[i].to_f32(),
        _ => 0.0,
    }
}

/// `out[i, :] = bias[i] + Σ_c m[i, c] x[c, :]` for the rows of the row pairs `pairs` (`out`
/// starts at row `2 · pairs.start`, token-minor `rows × tp`), `x` from [`window_major`], `tp` = 1
/// or a multiple of 16. Fused multiply-adds when `FUSED` (the vector paths), plain ones
/// otherwise (the scalar fallback, where a fused multiply-add is a library call). Several
/// tokens run the AVX-512 kernel where the processor has it and `kernel` is
/// [`KernelChoice::Auto`], the portable one otherwise; both give the same bits.
///
/// Token windows outermost, row pairs within: a window's inputs (`4 · cols · 64` bytes) are
/// read from the second-level cache by every pair. (Walking column panels with the windows
/// innermost, so that each pair's values are read once instead of once per window, was slower
/// on both the DeiT-tiny and the Llama-7B shapes.)
#[inline(always)]
pub(crate) fn tiled_rows<S: StorageFloat, const FUSED: bool>(
    m: &TiledMatrix<S>,
    x: &[f32],
    tp: usize,
    out: &mut [f32],
    bias: Option<&[S]>,
    pairs: Range<usize>,
    kernel: KernelChoice,
) {
    let first_row = 2 * pairs.start;
    let madd = |a: f32, b: f32, c: f32| if FUSED { a.mul_add(b, c) } else { a * b + c };
    let widen = |v: &[S; 4]| -> [f32; 4] { std::array::from_fn(|j| v[j].to_f32()) };
    if tp == 1 {
        // Four row pairs at a time, each with its four chains (even and odd columns of both
        // rows), so that sixteen independent multiply-adds are in flight.
        const LANES: usize = 4;
        let mut p0 = pairs.start;
        while p0 < pairs.end {
            let n = LANES.min(pairs.end - p0);
            let mut acc = [[0.0f32; 4]; LANES];
            let mut next = [0usize; LANES];
            let mut end = [0usize; LANES];
            for j in 0..n {
                let (i0, i1) = (2 * (p0 + j), 2 * (p0 + j) + 1);
                acc[j][0] = start_value(bias, m.rows, i0);
                acc[j][2] = start_value(bias, m.rows, i1);
                next[j] = m.offsets[p0 + j];
                end[j] = m.offsets[p0 + j + 1];
            }
            let longest = (0..n).map(|j| end[j] - next[j]).max().unwrap_or(0);
            for _ in 0..longest {
                for j in 0..LANES {
                    let t = next[j];
                    if t < end[j] {
                        let c = 2 * usize::from(m.columns[t]);
                        let v = widen(&m.values[t]);
                        let (x0, x1) = (x[c], x[c + 1]);
                        let a = &mut acc[j];
                        a[0] = madd(v[0], x0, a[0]);
                        a[1] = madd(v[1], x1, a[1]);
                        a[2] = madd(v[2], x0, a[2]);
                        a[3] = madd(v[3], x1, a[3]);
                        next[j] = t + 1;
                    }
                }
            }
            for (j, a) in acc.iter().enumerate().take(n) {
                let (i0, i1) = (2 * (p0 + j), 2 * (p0 + j) + 1);
                out[i0 - first_row] = a[0] + a[1];
                if i1 < m.rows {
                    out[i1 - first_row] = a[2] + a[3];
                }
            }
            p0 += n;
        }
        return;
    }
    let even = m.cols.next_multiple_of(2);
    #[cfg(target_arch = "x86_64")]
    let v4 = if FUSED && kernel == KernelChoice::Auto {
        pulp::x86::V4::try_new()
    } else {
        None
    };
    for (start, w) in windows(tp) {
        let xw = &x[start * even..(start + w) * even];
        let window = Window {
            m,
            x: xw,
            tp,
            start,
            out: &mut *out,
            first_row,
            bias,
            pairs: pairs.clone(),
        };
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = v4 {
            match w / 16 {
                1 => window.run_v4::<1>(simd),
                2 => window.run_v4::<2>(simd),
                3 => window.run_v4::<3>(simd),
                4 => window.run_v4::<4>(simd),
                5 => window.run_v4::<5>(simd),
                _ => window.run_v4::<6>(simd),
            }
            continue;
        }
        window.run::<FUSED>();
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernel;
}

/// [`Window::run_v4`]'s call handed to `pulp`'s `vectorize`: a struct whose `call` is
/// `#[inline(always)]`, so that the kernel is compiled inside the target-feature function (a
/// closure there is not always inlined; see `sparse_mlp`'s one-token kernels).
#[cfg(target_arch = "x86_64")]
struct WindowV4<'a, S, const NV: usize> {
    simd: pulp::x86::V4,
    window: Window<'a, S>,
}

#[cfg(target_arch = "x86_64")]
impl<S: StorageFloat, const NV: usize> pulp::NullaryFnOnce for WindowV4<'_, S, NV> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        self.window.kernel_v4::<NV>(self.simd);
    }
}

/// One token window of [`tiled_rows`].
struct Window<'a, S> {
    m: &'a TiledMatrix<S>,
    x: &'a [f32],
    tp: usize,
    start: usize,
    out: &'a mut [f32],
    first_row: usize,
    bias: Option<&'a [S]>,
    pairs: Range<usize>,
}

impl<S: StorageFloat> Window<'_, S> {
    /// [`Window::run`] on AVX-512 for a window of `NV` vectors: each row's sums in two chains
    /// of `NV` registers, each input vector loaded once for two fused multiply-adds. Same sums
    /// in the same order.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn run_v4<const NV: usize>(self, simd: pulp::x86::V4) {
        simd.vectorize(WindowV4::<S, NV> { simd, window: self });
    }

    /// The body of [`Window::run_v4`], compiled inside `vectorize`'s target-feature function
    /// through [`WindowV4`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn kernel_v4<const NV: usize>(self, simd: pulp::x86::V4) {
        use std::arch::x86_64::__m512;
        let Window {
            m,
            x,
            tp,
            start,
            out,
            first_row,
            bias,
            pairs,
        } = self;
        let f = simd.avx512f;
        let load = |s: &[f32]| -> __m512 {
            let a: [f32; 16] = s.try_into().unwrap_or([0.0; 16]);
            pulp::cast(a)
        };
        for p in pairs {
            let (i0, i1) = (2 * p, 2 * p + 1);
            let z0 = f._mm512_set1_ps(start_value(bias, m.rows, i0));
            let z1 = f._mm512_set1_ps(start_value(bias, m.rows, i1));
            let zero = f._mm512_setzero_ps();
            let (mut a, mut a_odd) = ([z0; NV], [zero; NV]);
            let (mut c, mut c_odd) = ([z1; NV], [zero; NV]);
            let w = 16 * NV;
            for t in m.offsets[p]..m.offsets[p + 1] {
                let q = 2 * usize::from(m.columns[t]);
                let Some(xs) = x.get(q * w..q * w + 2 * w) else {
                    continue;
                };
                let v = m.values[t];
                let v0 = f._mm512_set1_ps(v[0].to_f32());
                let v1 = f._mm512_set1_ps(v[1].to_f32());
                let v2 = f._mm512_set1_ps(v[2].to_f32());
                let v3 = f._mm512_set1_ps(v[3].to_f32());
                for k in 0..NV {
                    let x0 = load(&xs[16 * k..16 * k + 16]);
                    let x1 = load(&xs[w + 16 * k..w + 16 * k + 16]);
                    a[k] = f._mm512_fmadd_ps(v0, x0, a[k]);
                    a_odd[k] = f._mm512_fmadd_ps(v1, x1, a_odd[k]);
                    c[k] = f._mm512_fmadd_ps(v2, x0, c[k]);
                    c_odd[k] = f._mm512_fmadd_ps(v3, x1, c_odd[k]);
                }
            }
            let o0 = (i0 - first_row) * tp + start;
            let o1 = (i1 - first_row) * tp + start;
            for k in 0..NV {
                let ra: [f32; 16] = pulp::cast(f._mm512_add_ps(a[k], a_odd[k]));
                out[o0 + 16 * k..o0 + 16 * k + 16].copy_from_slice(&ra);
                if i1 < m.rows {
                    let rc: [f32; 16] = pulp::cast(f._mm512_add_ps(c[k], c_odd[k]));
                    out[o1 + 16 * k..o1 + 16 * k + 16].copy_from_slice(&rc);
                }
            }
        }
    }

    /// The window 16 tokens at a time (one vector per chain), two chains per row: the
    /// portable path (nested accumulator arrays wider than this were kept in memory by LLVM).
    #[inline(always)]
    fn run<const FUSED: bool>(self) {
        let Window {
            m,
            x,
            tp,
            start,
            out,
            first_row,
            bias,
            pairs,
        } = self;
        let w = x.len() / m.cols.next_multiple_of(2);
        let madd = |a: f32, b: f32, c: f32| if FUSED { a.mul_add(b, c) } else { a * b + c };
        for slice in 0..w / 16 {
            for p in pairs.clone() {
                let (i0, i1) = (2 * p, 2 * p + 1);
                let mut a0 = [start_value(bias, m.rows, i0); 16];
                let mut a1 = [start_value(bias, m.rows, i1); 16];
                let (mut a0_odd, mut a1_odd) = ([0.0f32; 16], [0.0f32; 16]);
                for t in m.offsets[p]..m.offsets[p + 1] {
                    let c = 2 * usize::from(m.columns[t]);
                    let (Some(x0), Some(x1)) = (
                        x.get(c * w + 16 * slice..c * w + 16 * slice + 16),
                        x.get((c + 1) * w + 16 * slice..(c + 1) * w + 16 * slice + 16),
                    ) else {
                        continue;
                    };
                    let v = m.values[t];
                    let (v0, v1, v2, v3) =
                        (v[0].to_f32(), v[1].to_f32(), v[2].to_f32(), v[3].to_f32());
                    for l in 0..16 {
                        a0[l] = madd(v0, x0[l], a0[l]);
                        a0_odd[l] = madd(v1, x1[l], a0_odd[l]);
                        a1[l] = madd(v2, x0[l], a1[l]);
                        a1_odd[l] = madd(v3, x1[l], a1_odd[l]);
                    }
                }
                let o0 = (i0 - first_row) * tp + start + 16 * slice;
                for l in 0..16 {
                    out[o0 + l] = a0[l] + a0_odd[l];
                }
                if i1 < m.rows {
                    let o1 = (i1 - first_row) * tp + start + 16 * slice;
                    for l in 0..16 {
                        out[o1 + l] = a1[l] + a1_odd[l];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A `rows × cols` matrix keeping whole 2×2 tiles with probability `density`.
    fn tiled_matrix(rows: usize, cols: usize, density: f64, seed: u64) -> CompactMatrix<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let keep = Array2::from_shape_simple_fn((rows.div_ceil(2), cols.div_ceil(2)), || {
            rng.random_bool(density)
        });
        let mask = Array2::from_shape_fn((rows, cols), |(i, c)| keep[[i / 2, c / 2]]);
        let values = Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-1.0f32..1.0));
        CompactMatrix::from_dense(values.view(), mask.view()).unwrap()
    }

    /// [`window_major`] into a buffer holding stale NaNs beyond what it needs: every value the
    /// kernels read must be rewritten.
    fn windows(x: &[f32], cols: usize, tp: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; cols.next_multiple_of(2) * tp + 9];
        window_major(x, cols, tp, &mut out[..]);
        out
    }

    fn to_storage<S: StorageFloat>(m: &CompactMatrix<f32>) -> CompactMatrix<S> {
        let values = m.values().iter().map(|&v| S::from_f32(v)).collect();
        CompactMatrix::new(m.pattern().clone(), values).unwrap()
    }

    /// `bias + m x` in f64 from the dense form, token-minor `x` (`cols × tp`).
    fn reference(m: &CompactMatrix<f32>, x: &[f32], tp: usize, bias: &[f32]) -> Vec<f64> {
        let dense = m.to_dense();
        let mut out = vec![0.0f64; m.rows() * tp];
        for i in 0..m.rows() {
            for t in 0..tp {
                let mut s = f64::from(bias[i]);
                for c in 0..m.cols() {
                    s += f64::from(dense[[i, c]]) * f64::from(x[c * tp + t]);
                }
                out[i * tp + t] = s;
            }
        }
        out
    }

    fn check<S: StorageFloat>(rows: usize, cols: usize, density: f64, tp: usize, seed: u64) {
        let m32 = tiled_matrix(rows, cols, density, seed);
        let m = to_storage::<S>(&m32);
        let widened = CompactMatrix::new(
            m.pattern().clone(),
            m.values().iter().map(|v| v.to_f32()).collect(),
        )
        .unwrap();
        let t = TiledMatrix::from_compact(&m).expect("whole tiles");
        assert_eq!(t.nnz(), m.nnz());
        assert_eq!(t.to_compact().unwrap(), m, "round trip {rows}×{cols}");
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 7);
        let x: Vec<f32> = (0..cols * tp)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let bias_s: Vec<S> = (0..rows)
            .map(|i| S::from_f32((i as f32 * 0.3).sin()))
            .collect();
        let bias: Vec<f32> = bias_s.iter().map(|b| b.to_f32()).collect();
        let want = reference(&widened, &x, tp, &bias);
        let xw = windows(&x, cols, tp);
        for fused in [false, true] {
            let mut out = vec![f32::NAN; rows * tp];
            let pairs = 0..t.pairs();
            if fused {
                tiled_rows::<S, true>(
                    &t,
                    &xw,
                    tp,
                    &mut out,
                    Some(&bias_s),
                    pairs,
                    KernelChoice::Auto,
                );
            } else {
                tiled_rows::<S, false>(
                    &t,
                    &xw,
                    tp,
                    &mut out,
                    Some(&bias_s),
                    pairs,
                    KernelChoice::Auto,
                );
            }
            for (k, (&o, &w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(o) - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{rows}×{cols} d{density} tp {tp} fused {fused}: entry {k}: {o} vs {w}"
                );
            }
        }
    }

    #[test]
    fn tiled_products_match_the_dense_product() {
        for &(rows, cols) in &[(1, 1), (2, 2), (7, 5), (64, 33), (130, 96)] {
            for density in [0.0, 0.25, 1.0] {
                for tp in [1, 16, 48, 64, 80, 208] {
                    check::<f32>(rows, cols, density, tp, rows as u64 * 31 + tp as u64);
                }
                check::<half::bf16>(rows, cols, density, 208, 3);
                check::<half::f16>(rows, cols, density, 1, 4);
            }
        }
    }

    #[test]
    fn windows_and_threads_give_the_same_bits() {
        // The full-window AVX-512 kernel, the generic windows and one token on the same matrix:
        // the same sums in the same order, so each token's column equals the one-token product.
        let m = tiled_matrix(96, 70, 0.3, 9);
        let t = TiledMatrix::from_compact(&m).unwrap();
        let tp = 208;
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let x: Vec<f32> = (0..70 * tp).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut out = vec![0.0f32; 96 * tp];
        let xw = windows(&x, 70, tp);
        tiled_rows::<f32, true>(
            &t,
            &xw,
            tp,
            &mut out,
            None,
            0..t.pairs(),
            KernelChoice::Auto,
        );
        // The portable kernel (forced where AVX-512 exists) gives the same bits.
        let mut portable = vec![0.0f32; 96 * tp];
        tiled_rows::<f32, true>(
            &t,
            &xw,
            tp,
            &mut portable,
            None,
            0..t.pairs(),
            KernelChoice::Generic,
        );
        assert_eq!(out, portable);
        // Two parts of the row pairs write the same values as one.
        let mut split = vec![0.0f32; 96 * tp];
        let (head, tail) = split.split_at_mut(40 * tp);
        tiled_rows::<f32, true>(&t, &xw, tp, head, None, 0..20, KernelChoice::Auto);
        tiled_rows::<f32, true>(&t, &xw, tp, tail, None, 20..t.pairs(), KernelChoice::Auto);
        assert_eq!(out, split);
        for tok in [0, 63, 64, 200] {
            let col: Vec<f32> = (0..70).map(|c| x[c * tp + tok]).collect();
            let mut one = vec![0.0f32; 96];
            let xo = windows(&col, 70, 1);
            tiled_rows::<f32, true>(&t, &xo, 1, &mut one, None, 0..t.pairs(), KernelChoice::Auto);
            let got: Vec<f32> = (0..96).map(|i| out[i * tp + tok]).collect();
            assert_eq!(one, got, "token {tok}");
        }
    }

    #[test]
    fn partial_tiles_keep_the_blocked_layout() {
        let mut mask = Array2::from_elem((4, 4), false);
        mask[[0, 0]] = true;
        mask[[0, 1]] = true;
        mask[[1, 0]] = true;
        let values = Array2::from_elem((4, 4), 1.0f32);
        let m = CompactMatrix::<f32>::from_dense(values.view(), mask.view()).unwrap();
        assert!(
            TiledMatrix::from_compact(&m).is_none(),
            "three of a tile's four"
        );
        mask[[1, 1]] = true;
        let m = CompactMatrix::<f32>::from_dense(values.view(), mask.view()).unwrap();
        assert!(TiledMatrix::from_compact(&m).is_some());
        mask[[2, 1]] = true;
        mask[[3, 1]] = true;
        let m = CompactMatrix::<f32>::from_dense(values.view(), mask.view()).unwrap();
        assert!(TiledMatrix::from_compact(&m).is_none(), "odd column alone");
    }
}
