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
//! `sgemm`'s packing 15 % and its kernel 15 % of the block's time at 16 tokens). Here `U` is
//! read in place: a tile of [`ROWS`] output rows keeps its sums for 16 or 32 tokens in vector
//! registers, and every `k` costs one load of the token row `xᵀ[k, :]`, one broadcast of each
//! row's coefficient and one fused multiply-add per row and vector.

/// Output rows per register tile.
const ROWS: usize = 8;

/// Where the coefficient `a(m, k)` of output row `m` and input row `k` lies in the basis `u`
/// (`d × r`, row-major).
#[derive(Debug, Clone, Copy)]
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

/// The largest basis (`d · r` values) [`basis_times`] takes: 1 MiB of `f32`, a basis that stays
/// in the second-level cache between calls, where BLAS's copy of it is as long as the
/// multiply-adds. (Llama-7B's, 88 MB, does not: there the tiles, reading `U` with a stride of a
/// row, were measured slower than BLAS, 1.43–1.51 of the dense block against 1.19–1.21 at 16
/// tokens.)
pub(crate) const MAX_BASIS: usize = 1 << 18;

/// Whether [`basis_times`] runs a product of a basis of `values` values on `tp` tokens: 16 or 32
/// tokens, a basis of at most [`MAX_BASIS`] values, a processor with AVX-512 or AVX2 + FMA
/// (elsewhere, and from 48 tokens on, where packing is a small share of the work, BLAS).
pub(crate) fn basis_times_pays(values: usize, tp: usize) -> bool {
    (tp == 16 || tp == 32) && values <= MAX_BASIS && vectors_available()
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
/// added in increasing `k`, fused.
pub(crate) fn basis_times(
    u: &[f32],
    (d, r): (usize, usize),
    side: BasisSide,
    b: &[f32],
    tp: usize,
    out: &mut [f32],
) {
    let (rows, depth) = side.shape((d, r));
    if d == 0 || r == 0 || u.len() < d * r || b.len() < depth * tp || out.len() < rows * tp {
        return;
    }
    let ops = Operands {
        u: &u[..d * r],
        r,
        rows,
        b: &b[..depth * tp],
    };
    let out = &mut out[..rows * tp];
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(simd) = pulp::x86::V4::try_new() {
            run_with(simd, ops, side, tp, out);
        } else if let Some(simd) = pulp::x86::V3::try_new() {
            run_with(simd, ops, side, tp, out);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ops, side, tp, out);
}

/// The product compiled for `simd`'s instructions.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn run_with<V: pulp::Simd>(
    simd: V,
    ops: Operands<'_>,
    side: BasisSide,
    tp: usize,
    out: &mut [f32],
) {
    simd.vectorize(Product {
        simd,
        ops,
        side,
        tp,
        out,
    });
}

/// Everything a product reads.
#[derive(Clone, Copy)]
struct Operands<'a> {
    u: &'a [f32],
    r: usize,
    rows: usize,
    b: &'a [f32],
}

struct Product<'a, V> {
    simd: V,
    ops: Operands<'a>,
    side: BasisSide,
    tp: usize,
    out: &'a mut [f32],
}

impl<V: pulp::Simd> pulp::NullaryFnOnce for Product<'_, V> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        let Product {
            simd,
            ops,
            side,
            tp,
            out,
        } = self;
        let lanes = V::F32_LANES;
        let transposed = matches!(side, BasisSide::Transposed);
        match (transposed, tp / lanes, tp % lanes) {
            (true, 1, 0) => ops.run::<V, 1, true>(simd, out),
            (true, 2, 0) => ops.run::<V, 2, true>(simd, out),
            (true, 4, 0) => ops.run::<V, 4, true>(simd, out),
            (false, 1, 0) => ops.run::<V, 1, false>(simd, out),
            (false, 2, 0) => ops.run::<V, 2, false>(simd, out),
            (false, 4, 0) => ops.run::<V, 4, false>(simd, out),
            _ => {}
        }
    }
}

impl Operands<'_> {
    /// Tiles of [`ROWS`] rows, then the last rows one at a time; `N` vectors of tokens,
    /// `TRANSPOSED`: `a(m, k) = U[k, m]`, else `U[m, k]`.
    #[inline(always)]
    fn run<V: pulp::Simd, const N: usize, const TRANSPOSED: bool>(self, simd: V, out: &mut [f32]) {
        let tp = N * V::F32_LANES;
        let full = self.rows / ROWS * ROWS;
        let (tiles, rest) = out.split_at_mut(full * tp);
        for (t, out) in tiles.chunks_exact_mut(ROWS * tp).enumerate() {
            self.tile::<V, N, TRANSPOSED, ROWS>(simd, t * ROWS, out);
        }
        for (i, out) in rest.chunks_exact_mut(tp).enumerate() {
            self.tile::<V, N, TRANSPOSED, 1>(simd, full + i, out);
        }
    }

    /// Rows `m0 .. m0 + R` into `out` (`R × tp`), each row's sums in `N` vector registers.
    #[inline(always)]
    fn tile<V: pulp::Simd, const N: usize, const TRANSPOSED: bool, const R: usize>(
        &self,
        simd: V,
        m0: usize,
        out: &mut [f32],
    ) {
        let (r, lanes) = (self.r, V::F32_LANES);
        let tp = N * lanes;
        let mut acc = [[simd.splat_f32s(0.0); N]; R];
        // `U[m, ·]` of the tile's rows (`AsStored`), each `r` long.
        let rows: [&[f32]; R] = std::array::from_fn(|i| {
            let m = m0 + i;
            match TRANSPOSED {
                true => &[][..],
                false => self.u.get(m * r..(m + 1) * r).unwrap_or(&[]),
            }
        });
        if !TRANSPOSED && rows.iter().any(|row| row.len() != r) {
            return;
        }
        for (k, bk) in self.b.chunks_exact(tp).enumerate() {
            let bv: [V::f32s; N] = std::array::from_fn(|j| {
                pulp::bytemuck::pod_read_unaligned(pulp::bytemuck::cast_slice(
                    &bk[j * lanes..(j + 1) * lanes],
                ))
            });
            let coefs: [f32; R] = if TRANSPOSED {
                match self.u.get(k * r + m0..k * r + m0 + R) {
                    Some(c) => std::array::from_fn(|i| c[i]),
                    None => return,
                }
            } else {
                if k >= r {
                    return;
                }
                std::array::from_fn(|i| rows[i][k])
            };
            for (a, &c) in acc.iter_mut().zip(&coefs) {
                let c = simd.splat_f32s(c);
                for (a, &x) in a.iter_mut().zip(&bv) {
                    *a = simd.mul_add_f32s(c, x, *a);
                }
            }
        }
        for (dst, a) in out.chunks_exact_mut(tp).zip(&acc) {
            dst.copy_from_slice(pulp::bytemuck::cast_slice(a));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The fused dot products over `k` in increasing order, one lane at a time.
    fn reference(
        u: &[f32],
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
                    acc = a.mul_add(b[k * tp + t], acc);
                }
                out[m * tp + t] = acc;
            }
        }
        out
    }

    /// Both sides, 16 and 32 tokens, row counts with and without a last partial tile: the bits of
    /// the fused reference (fails if a tile's row, token or `k` is shifted by one).
    #[test]
    fn basis_products_give_the_bits_of_fused_dot_products() {
        if !basis_times_pays(1, 16) {
            eprintln!("skipped: no AVX-512 or AVX2 + FMA here, products go through BLAS");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (d, r) in [(5, 13), (24, 19), (16, 8), (1, 1)] {
            let u: Vec<f32> = (0..d * r).map(|_| rng.random_range(-1.0..1.0)).collect();
            for side in [BasisSide::Transposed, BasisSide::AsStored] {
                let (rows, depth) = side.shape((d, r));
                for tp in [16, 32] {
                    let b: Vec<f32> = (0..depth * tp)
                        .map(|_| rng.random_range(-1.0..1.0))
                        .collect();
                    let mut out = vec![f32::NAN; rows * tp];
                    basis_times(&u, (d, r), side, &b, tp, &mut out);
                    let want = reference(&u, (d, r), side, &b, tp);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&out),
                        bits(&want),
                        "d {d}, r {r}, {side:?}, {tp} tokens"
                    );
                }
            }
        }
    }

    #[test]
    fn only_small_bases_on_sixteen_or_thirty_two_tokens_take_the_register_tiles() {
        for tp in [1, 8, 48, 64, 128] {
            assert!(!basis_times_pays(1, tp), "{tp} tokens");
        }
        assert!(
            !basis_times_pays(MAX_BASIS + 1, 16),
            "a basis past the cache"
        );
    }
}
