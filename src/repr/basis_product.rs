//! The dense products with the shared basis for a few tokens, token-minor, without packing.
//!
//! With `T` tokens, a block's compact forward pass multiplies by the basis twice:
//!
//! ```text
//! Zᵀ = Uᵀ xᵀ   (r × T):  Zᵀ[m, :] = Σ_k U[k, m] xᵀ[k, :]
//! Yᵀ = U Cᵀ    (d × T):  Yᵀ[m, :] = Σ_k U[m, k] Cᵀ[k, :]
//! ```
//!
//! BLAS `sgemm` copies ("packs") the whole of `U` into its own layout on every call; for 16 to
//! 32 tokens that copy is as long as the multiply-adds (measured on DeiT-tiny shapes, one thread:
//! `sgemm`'s packing 15 % and its kernel 15 % of the block's time at 16 tokens; on Llama-7B
//! shapes its two copies took twice the samples of its kernel, reading 117 MB of `U` twice).
//! Here `U` is read in place, in its storage type (a half-precision basis widened by chunks of
//! [`CHUNK`] values of a few rows into a scratch in the first-level cache):
//!
//! - `Yᵀ = U Cᵀ`: a tile of [`ROWS`] output rows keeps its sums for 16 or 32 tokens in vector
//!   registers and reads its rows of `U` from start to end; every `k` costs one load of the
//!   token row `Cᵀ[k, :]`, one broadcast of each row's coefficient and one fused multiply-add per
//!   row and vector.
//! - `Zᵀ = Uᵀ xᵀ`, a basis in the cache (at most [`MAX_TILED`] values of `f32`): the same
//!   tiles, reading [`ROWS`] coefficients of every row of `U`.
//! - `Zᵀ = Uᵀ xᵀ`, any other basis: the output rows in panels whose sums stay in the
//!   second-level cache, [`DEPTH`] rows of `U` at a time read from start to end of the panel
//!   (a tile's eight values per row, a row's length apart, defeat the prefetchers on a basis in
//!   memory). Measured on Llama-7B's basis, 16 tokens, one thread: `Zᵀ` 12.6 ms against BLAS's
//!   20.0 ms, `Yᵀ` 11.8 against 21.8 ms.

use crate::repr::compact::StorageFloat;

/// Output rows per register tile.
const ROWS: usize = 8;
/// Bytes of sums per panel of the streamed product: they stay in the second-level cache, and a
/// panel's rows of `U` are read in runs as long as that (Llama-7B's `r = 7287` at 16 tokens: whole
/// rows). With the sums in the first-level cache instead (16 / 32 KiB panels: runs of 1 / 2 KiB
/// at a row's stride) `Zᵀ` of the 7B basis took 24.6 / 18.4 ms against 11.3 ms, BLAS 19 ms.
const PANEL_BYTES: usize = 512 << 10;
/// Values of a row of `U` taken at a time: a half-precision basis's rows are widened by chunks of
/// this many into a scratch that stays in the first-level cache (4 KiB for [`DEPTH`] rows).
/// Measured on Llama-7B's `bf16` basis, 16 tokens, one thread: `Zᵀ` 14.7–15.4 ms and `Yᵀ`
/// 10.5–10.7 ms with chunks of 128, 17.0–17.9 and 13.2–15.1 ms with 512 (16 KiB), the `f32`
/// basis 12.4–12.8 and 11.5–12.6 ms; 96 measured as 128, 256 as 512 (`docs/results.md`).
const CHUNK: usize = 128;
/// Rows of `U` per pass over a panel of the streamed product: each output row's sums are
/// loaded and stored once per `DEPTH` multiply-adds.
const DEPTH: usize = 8;
/// Floats of scratch for a half-precision basis: a chunk of each of a tile's or a pass's rows.
const SCRATCH: usize = if ROWS > DEPTH { ROWS } else { DEPTH } * CHUNK;

/// Where the coefficient `a(m, k)` of output row `m` and input row `k` lies in the basis `u`
/// (`d × r`, row-major).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BasisSide {
    /// `a(m, k) = U[k, m]` (`Uᵀ xᵀ`: `m < r`, `k < d`).
    Transposed,
    /// `a(m, k) = U[m, k]` (`U Cᵀ`: `m < d`, `k < r`).
    AsStored,
}

impl BasisSide {
    /// `(rows, depth)` of the product with a basis of `d × r`: output rows `m` and summed `k`.
    fn shape(self, (d, r): (usize, usize)) -> (usize, usize) {
        match self {
            Self::Transposed => (r, d),
            Self::AsStored => (d, r),
        }
    }
}

/// The largest `f32` basis (`d · r` values) whose transposed product runs by register tiles:
/// 1 MiB, a basis that stays in the second-level cache between calls. (On Llama-7B's, 117 MB,
/// the tiles were measured slower than BLAS, 1.43–1.51 of the dense block against 1.19–1.21 at
/// 16 tokens; the streamed product is not.)
const MAX_TILED: usize = 1 << 18;

/// Whether [`basis_times`] runs the products on `tp` tokens: 16 or 32 tokens, on a processor
/// with AVX-512 or AVX2 + FMA (elsewhere, and from 48 tokens on, where packing is a small share
/// of the work, BLAS).
pub(crate) fn basis_times_pays(tp: usize) -> bool {
    (tp == 16 || tp == 32) && vectors_available()
}

fn vectors_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        pulp::x86::V4::try_new().is_some() || pulp::x86::V3::try_new().is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[m, :] = Σ_k a(m, k) b[k, :]` for `m < rows`, `k < depth`, with `a` read from the basis
/// `u` (`d × r`) as `side` says, `b` (`depth × tp`) and `out` (`rows × tp`) token-minor, `tp`
/// 16 or 32 (see [`basis_times_pays`]; otherwise nothing is written). The terms of each sum are
/// added in increasing `k`, fused, from zero. `scratch` holds a half-precision basis's widened
/// chunks ([`SCRATCH`] floats; untouched for `f32`).
pub(crate) fn basis_times<T: StorageFloat>(
    u: &[T],
    (d, r): (usize, usize),
    side: BasisSide,
    b: &[f32],
    tp: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (rows, depth) = side.shape((d, r));
    if d == 0 || r == 0 || u.len() < d * r || b.len() < depth * tp || out.len() < rows * tp {
        return;
    }
    let u = &u[..d * r];
    let way = match side {
        BasisSide::AsStored => Way::Tiles,
        BasisSide::Transposed if T::as_f32_slice(u).is_some() && d * r <= MAX_TILED => Way::Tiles,
        BasisSide::Transposed => Way::Streamed,
    };
    if T::as_f32_slice(u).is_none() && scratch.len() < SCRATCH {
        scratch.resize(SCRATCH, 0.0);
    }
    let ops = Operands {
        u,
        r,
        rows,
        b: &b[..depth * tp],
    };
    let out = &mut out[..rows * tp];
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(simd) = pulp::x86::V4::try_new() {
            run_with(simd, ops, side, way, tp, out, scratch);
        } else if let Some(simd) = pulp::x86::V3::try_new() {
            run_with(simd, ops, side, way, tp, out, scratch);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ops, way, tp, out, scratch);
}

/// Output rows per panel of the streamed product.
fn panel_rows(tp: usize) -> usize {
    (PANEL_BYTES / 4 / tp.max(1)).max(1)
}

/// How a product walks the basis.
#[derive(Debug, Clone, Copy)]
enum Way {
    /// Register tiles of [`ROWS`] output rows.
    Tiles,
    /// Panels of output rows in the cache, `U` streamed row after row.
    Streamed,
}

/// The product compiled for `simd`'s instructions.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn run_with<V: pulp::Simd, T: StorageFloat>(
    simd: V,
    ops: Operands<'_, T>,
    side: BasisSide,
    way: Way,
    tp: usize,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    simd.vectorize(Product {
        simd,
        ops,
        side,
        way,
        tp,
        out,
        scratch,
    });
}

/// Everything a product reads.
#[derive(Clone, Copy)]
struct Operands<'a, T> {
    u: &'a [T],
    r: usize,
    rows: usize,
    b: &'a [f32],
}

struct Product<'a, V, T> {
    simd: V,
    ops: Operands<'a, T>,
    side: BasisSide,
    way: Way,
    tp: usize,
    out: &'a mut [f32],
    scratch: &'a mut [f32],
}

impl<V: pulp::Simd, T: StorageFloat> pulp::NullaryFnOnce for Product<'_, V, T> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let Product {
            simd,
            ops,
            side,
            way,
            tp,
            out,
            scratch,
        } = self;
        let lanes = V::F32_LANES;
        if tp % lanes != 0 {
            return;
        }
        let transposed = side == BasisSide::Transposed;
        match (way, transposed, tp / lanes) {
            (Way::Streamed, _, 1) => ops.streamed::<V, 1>(simd, out, scratch),
            (Way::Streamed, _, 2) => ops.streamed::<V, 2>(simd, out, scratch),
            (Way::Streamed, _, 4) => ops.streamed::<V, 4>(simd, out, scratch),
            (Way::Tiles, true, 1) => ops.tiles::<V, 1, true>(simd, out, scratch),
            (Way::Tiles, true, 2) => ops.tiles::<V, 2, true>(simd, out, scratch),
            (Way::Tiles, true, 4) => ops.tiles::<V, 4, true>(simd, out, scratch),
            (Way::Tiles, false, 1) => ops.tiles::<V, 1, false>(simd, out, scratch),
            (Way::Tiles, false, 2) => ops.tiles::<V, 2, false>(simd, out, scratch),
            (Way::Tiles, false, 4) => ops.tiles::<V, 4, false>(simd, out, scratch),
            _ => {}
        }
    }
}

/// `N` vectors from `x`'s first `N · lanes` values.
#[inline(always)]
fn load<V: pulp::Simd, const N: usize>(x: &[f32]) -> [V::f32s; N] {
    let lanes = V::F32_LANES;
    std::array::from_fn(|n| {
        pulp::bytemuck::pod_read_unaligned(pulp::bytemuck::cast_slice(
            &x[n * lanes..(n + 1) * lanes],
        ))
    })
}

/// `len` values of `u` from `start` as `f32`: in place for `f32`, else widened into `scratch`
/// (empty when either is too short).
#[inline(always)]
fn as_f32<'a, T: StorageFloat>(
    u: &'a [T],
    start: usize,
    len: usize,
    scratch: &'a mut [f32],
) -> &'a [f32] {
    let Some(src) = u.get(start..start + len) else {
        return &[];
    };
    match T::as_f32_slice(src) {
        Some(values) => values,
        None => match scratch.get_mut(..len) {
            Some(dst) => {
                T::widen(src, dst);
                dst
            }
            None => &[],
        },
    }
}

impl<T: StorageFloat> Operands<'_, T> {
    /// Tiles of [`ROWS`] rows, then the last rows one at a time; `N` vectors of tokens,
    /// `TRANSPOSED`: `a(m, k) = U[k, m]` (`f32` only), else `U[m, k]`.
    #[inline(always)]
    fn tiles<V: pulp::Simd, const N: usize, const TRANSPOSED: bool>(
        self,
        simd: V,
        out: &mut [f32],
        scratch: &mut [f32],
    ) {
        let tp = N * V::F32_LANES;
        let full = self.rows / ROWS * ROWS;
        let (tiles, rest) = out.split_at_mut(full * tp);
        for (t, out) in tiles.chunks_exact_mut(ROWS * tp).enumerate() {
            self.tile::<V, N, TRANSPOSED, ROWS>(simd, t * ROWS, out, scratch);
        }
        for (i, out) in rest.chunks_exact_mut(tp).enumerate() {
            self.tile::<V, N, TRANSPOSED, 1>(simd, full + i, out, scratch);
        }
    }

    /// Rows `m0 .. m0 + R` into `out` (`R × tp`), each row's sums in `N` vector registers;
    /// `AsStored`: the rows of `U` taken by chunks of [`CHUNK`] values.
    #[inline(always)]
    fn tile<V: pulp::Simd, const N: usize, const TRANSPOSED: bool, const R: usize>(
        &self,
        simd: V,
        m0: usize,
        out: &mut [f32],
        scratch: &mut [f32],
    ) {
        let (r, tp) = (self.r, N * V::F32_LANES);
        let mut acc = [[simd.splat_f32s(0.0); N]; R];
        let fma = |acc: &mut [[V::f32s; N]; R], coefs: [f32; R], bv: [V::f32s; N]| {
            for (a, c) in acc.iter_mut().zip(coefs) {
                let c = simd.splat_f32s(c);
                for (a, &x) in a.iter_mut().zip(&bv) {
                    *a = simd.mul_add_f32s(c, x, *a);
                }
            }
        };
        if TRANSPOSED {
            let u = T::as_f32_slice(self.u).unwrap_or(&[]);
            for (k, bk) in self.b.chunks_exact(tp).enumerate() {
                let Some(c) = u.get(k * r + m0..k * r + m0 + R) else {
                    return;
                };
                fma(&mut acc, std::array::from_fn(|i| c[i]), load::<V, N>(bk));
            }
        } else {
            for (q, bq) in self.b.chunks(CHUNK * tp).enumerate() {
                let (k0, len) = (q * CHUNK, bq.len() / tp);
                let mut parts = scratch.chunks_mut(CHUNK);
                let rows: [&[f32]; R] = std::array::from_fn(|i| {
                    let part = parts.next().unwrap_or_default();
                    as_f32(self.u, (m0 + i) * r + k0, len, part)
                });
                if rows.iter().any(|row| row.len() != len) {
                    return;
                }
                for (k, bk) in bq.chunks_exact(tp).enumerate() {
                    fma(
                        &mut acc,
                        std::array::from_fn(|i| rows[i][k]),
                        load::<V, N>(bk),
                    );
                }
            }
        }
        for (dst, a) in out.chunks_exact_mut(tp).zip(&acc) {
            dst.copy_from_slice(pulp::bytemuck::cast_slice(a));
        }
    }

    /// `Zᵀ = Uᵀ xᵀ` with `U` read row after row: the output rows in panels of [`PANEL_BYTES`]
    /// of sums; for every [`DEPTH`] rows of `U` and every output row of the panel, the row's
    /// sums loaded once, `DEPTH` fused multiply-adds per vector (a broadcast `U[k, m]` times the
    /// token row `xᵀ[k, :]`), stored once.
    #[inline(always)]
    fn streamed<V: pulp::Simd, const N: usize>(
        self,
        simd: V,
        out: &mut [f32],
        scratch: &mut [f32],
    ) {
        let tp = N * V::F32_LANES;
        let depth = self.b.len() / tp;
        let panel = panel_rows(tp);
        out.fill(0.0);
        for (p, out) in out.chunks_mut(panel * tp).enumerate() {
            let m0 = p * panel;
            let mut k = 0;
            while k + DEPTH <= depth {
                self.streamed_rows::<V, N, DEPTH>(simd, k, m0, out, scratch);
                k += DEPTH;
            }
            for k in k..depth {
                self.streamed_rows::<V, N, 1>(simd, k, m0, out, scratch);
            }
        }
    }

    /// Rows `k .. k + D` of `U`, columns `m0 ..` (as many as the panel `out` has rows), added
    /// into the panel, by chunks of [`CHUNK`] columns.
    #[inline(always)]
    fn streamed_rows<V: pulp::Simd, const N: usize, const D: usize>(
        &self,
        simd: V,
        k: usize,
        m0: usize,
        out: &mut [f32],
        scratch: &mut [f32],
    ) {
        let tp = N * V::F32_LANES;
        let bv: [[V::f32s; N]; D] = std::array::from_fn(|i| load::<V, N>(&self.b[(k + i) * tp..]));
        for (q, out) in out.chunks_mut(CHUNK * tp).enumerate() {
            let (c0, len) = (m0 + q * CHUNK, out.len() / tp);
            let mut parts = scratch.chunks_mut(CHUNK);
            let us: [&[f32]; D] = std::array::from_fn(|i| {
                let part = parts.next().unwrap_or_default();
                as_f32(self.u, (k + i) * self.r + c0, len, part)
            });
            if us.iter().any(|u| u.len() != len) {
                return;
            }
            for (j, acc) in out.chunks_exact_mut(tp).enumerate() {
                let mut a = load::<V, N>(acc);
                for (u, b) in us.iter().zip(&bv) {
                    let c = simd.splat_f32s(u[j]);
                    for (a, &x) in a.iter_mut().zip(b) {
                        *a = simd.mul_add_f32s(c, x, *a);
                    }
                }
                acc.copy_from_slice(pulp::bytemuck::cast_slice(&a));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The fused dot products over `k` in increasing order, one lane at a time.
    fn reference<T: StorageFloat>(
        u: &[T],
        (d, r): (usize, usize),
        side: BasisSide,
        b: &[f32],
        tp: usize,
    ) -> Vec<f32> {
        let (rows, depth) = side.shape((d, r));
        let mut out = vec![0.0f32; rows * tp];
        for m in 0..rows {
            for t in 0..tp {
                let mut acc = 0.0f32;
                for k in 0..depth {
                    let a = match side {
                        BasisSide::Transposed => u[k * r + m],
                        BasisSide::AsStored => u[m * r + k],
                    };
                    acc = a.to_f32().mul_add(b[k * tp + t], acc);
                }
                out[m * tp + t] = acc;
            }
        }
        out
    }

    fn check<T: StorageFloat>(rng: &mut ChaCha8Rng, (d, r): (usize, usize)) {
        let u: Vec<T> = (0..d * r)
            .map(|_| T::from_f32(rng.random_range(-1.0..1.0)))
            .collect();
        // A scratch left holding other values must not leak into the sums.
        let mut scratch = vec![f32::NAN; 3];
        for side in [BasisSide::Transposed, BasisSide::AsStored] {
            let (rows, depth) = side.shape((d, r));
            for tp in [16, 32] {
                let b: Vec<f32> = (0..depth * tp)
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                let mut out = vec![f32::NAN; rows * tp];
                basis_times(&u, (d, r), side, &b, tp, &mut out, &mut scratch);
                let want = reference(&u, (d, r), side, &b, tp);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&out),
                    bits(&want),
                    "{:?}, d {d}, r {r}, {side:?}, {tp} tokens",
                    T::DTYPE
                );
            }
        }
    }

    /// Both sides, 16 and 32 tokens, `f32` and half precision, row counts with and without a
    /// last partial tile, chunk, panel or pass of [`DEPTH`] rows, and an `f32` basis past
    /// [`MAX_TILED`] (streamed): the bits of the fused reference (fails if a tile's or panel's
    /// row, token or `k` is shifted by one).
    #[test]
    fn basis_products_give_the_bits_of_fused_dot_products() {
        if !basis_times_pays(16) {
            eprintln!("skipped: no AVX-512 or AVX2 + FMA here, products go through BLAS");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for shape in [(5, 13), (24, 19), (16, 8), (1, 1), (19, CHUNK + 300)] {
            check::<f32>(&mut rng, shape);
            check::<half::bf16>(&mut rng, shape);
            check::<half::f16>(&mut rng, shape);
        }
        // Streamed in two panels at 32 tokens, chunks of `CHUNK`, the last pass shorter than
        // `DEPTH`.
        let (d, r) = (70, 4100);
        assert!(d * r > MAX_TILED && r > panel_rows(32) && d % DEPTH != 0);
        check::<f32>(&mut rng, (d, r));
    }

    #[test]
    fn only_sixteen_or_thirty_two_tokens_skip_blas() {
        for tp in [1, 8, 48, 64, 128] {
            assert!(!basis_times_pays(tp), "{tp} tokens");
        }
    }
}
