//! SVD initialisation of the shared factorisation `M ≈ U V`.
//!
//! `M = [W_1 | … | W_k]` (`d × N`, `N = Σ I_j`) has the thin SVD `M = U_s Σ Vhᵀ`. FiPS keeps `U_s`
//! orthonormal and folds every singular value into `V = Σ Vh` (so `V = U_sᵀ M`). For rank `r ≤ q`
//! (`q = min(d, N)`) it keeps the top `r` triplets, the best rank-`r` approximation of `M`. For
//! `r > q` (the usual case at high sparsity) `U` is padded with zero columns and `V` with copies of
//! its top rows divided by `τ` (row `q + i` is `V[i mod q] / τ`), so `U V = M` exactly at the start
//! while the padded columns of `U` receive gradient.
//!
//! Two routes give the same `U` (up to the sign of each column, which is normalised):
//! - [`InitMethod::Gram`]: eigendecomposition of the `d × d` Gram matrix `M Mᵀ = Σ_j W_j W_jᵀ`,
//!   accumulated in `f64`, then `V = Uᵀ M`. Costs `O(d² N + d³)` and never forms `M`.
//! - [`InitMethod::Svd`]: LAPACK divide-and-conquer SVD of the concatenated `M`, `O(d² N)` with a
//!   larger constant and `d × N` of extra memory.

use std::fmt;
use std::str::FromStr;

use ndarray::{Array1, Array2, ArrayView2, Axis, concatenate, linalg::general_mat_mul};
use ndarray_linalg::{Eigh, JobSvd, SVDDC, UPLO};

use crate::foundation::error::{FipsError, Result, invalid};
use crate::foundation::float::{Float, cast_array};
use crate::foundation::slicing::s;

/// Padding divisor for the extra rows of `V` when `r > min(d, N)` (reference value).
pub const DEFAULT_TAU: f64 = 32.0;

/// How the initial factorisation is computed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum InitMethod {
    /// Eigendecomposition of the `d × d` Gram matrix in `f64` (fast; the default).
    #[default]
    Gram,
    /// Thin SVD of the concatenated `d × N` matrix.
    Svd,
}

impl fmt::Display for InitMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Gram => "gram",
            Self::Svd => "svd",
        })
    }
}

impl FromStr for InitMethod {
    type Err = FipsError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gram" | "eigh" => Ok(Self::Gram),
            "svd" => Ok(Self::Svd),
            other => Err(invalid(
                "init",
                format!("unknown init method {other:?} (gram or svd)"),
            )),
        }
    }
}

/// The initial shared factors of `M = [W_1 | … | W_k]`.
#[derive(Debug, Clone)]
pub struct SharedInit<F> {
    /// `d × r`, orthonormal columns (zero columns past `min(d, N)`).
    pub basis: Array2<F>,
    /// `r × N`, singular values folded in.
    pub factors: Array2<F>,
    /// The singular values of `M`, descending (`min(d, N)` of them).
    pub singular_values: Array1<f64>,
}

/// Initialises `U` (`d × rank`) and `V` (`rank × Σ I_j`) from the column blocks `W_j` (`d × I_j`)
/// of `M`, padding with `τ = tau` when `rank > min(d, N)`.
pub fn shared_init<F: Float>(
    blocks: &[ArrayView2<'_, F>],
    rank: usize,
    tau: f64,
    method: InitMethod,
) -> Result<SharedInit<F>> {
    let Some(first) = blocks.first() else {
        return Err(FipsError::EmptyGroup);
    };
    let d = first.nrows();
    for (j, w) in blocks.iter().enumerate() {
        if w.nrows() != d || w.ncols() == 0 {
            return Err(FipsError::ShapeMismatch {
                what: format!("column block {j} of the concatenated matrix"),
                expected: vec![d, w.ncols().max(1)],
                got: w.shape().to_vec(),
            });
        }
    }
    if rank == 0 {
        return Err(invalid("rank", "the rank must be at least 1"));
    }
    if !(tau > 0.0 && tau.is_finite()) {
        return Err(invalid(
            "tau",
            format!("the padding divisor must be positive and finite, got {tau}"),
        ));
    }
    let (mut u, mut v, sigma) = match method {
        InitMethod::Gram => gram_route(blocks, rank)?,
        InitMethod::Svd => svd_route(blocks, rank)?,
    };
    normalise_signs(&mut u, &mut v);
    let q = u.ncols();
    if rank > q {
        pad(&mut u, &mut v, rank, F::cast(tau));
    }
    Ok(SharedInit {
        basis: u,
        factors: v,
        singular_values: sigma,
    })
}

/// Top `min(rank, q)` eigenvectors of `Σ_j W_j W_jᵀ` (f64) and `V = Uᵀ M`.
type Triplet<F> = (Array2<F>, Array2<F>, Array1<f64>);

fn gram_route<F: Float>(blocks: &[ArrayView2<'_, F>], rank: usize) -> Result<Triplet<F>> {
    let d = blocks[0].nrows();
    let n_total: usize = blocks.iter().map(|w| w.ncols()).sum();
    let mut gram = Array2::<f64>::zeros((d, d));
    for w in blocks {
        let w64: Array2<f64> = cast_array(w);
        general_mat_mul(1.0, &w64, &w64.t(), 1.0, &mut gram);
    }
    let (eigenvalues, eigenvectors) = gram.eigh(UPLO::Lower)?;
    let q = d.min(n_total);
    let keep = rank.min(q);
    // Eigenvalues ascend: the top `keep` eigenvectors are the last columns, reversed.
    let u64 = eigenvectors.slice(s![.., d - keep..;-1]).to_owned();
    let sigma = eigenvalues
        .slice(s![d - q..;-1])
        .mapv(|l: f64| l.max(0.0).sqrt());
    let mut v = Array2::<F>::zeros((keep, n_total));
    let mut col = 0;
    for w in blocks {
        let w64: Array2<f64> = cast_array(w);
        let vj = u64.t().dot(&w64);
        v.slice_mut(s![.., col..col + w.ncols()])
            .assign(&cast_array::<f64, F, _, _>(&vj));
        col += w.ncols();
    }
    Ok((cast_array(&u64), v, sigma))
}

/// Thin SVD of the concatenated `M`, truncated to `min(rank, q)`.
fn svd_route<F: Float>(blocks: &[ArrayView2<'_, F>], rank: usize) -> Result<Triplet<F>> {
    let m = concatenate(Axis(1), blocks).map_err(|e| FipsError::ShapeMismatch {
        what: format!("concatenated matrix ({e})"),
        expected: vec![],
        got: vec![],
    })?;
    let (u, sigma, vt) = m.svddc(JobSvd::Some)?;
    let (Some(u), Some(vt)) = (u, vt) else {
        return Err(FipsError::Numerical(
            "the SVD returned no singular vectors".into(),
        ));
    };
    let keep = rank.min(sigma.len());
    let u = u.slice(s![.., ..keep]).to_owned();
    let mut v = vt.slice(s![..keep, ..]).to_owned();
    for (mut row, &sv) in v.axis_iter_mut(Axis(0)).zip(sigma.iter()) {
        row *= sv;
    }
    Ok((u, v, sigma.mapv(|x| x.as_f64())))
}

/// Makes the largest-magnitude entry of every column of `U` positive, flipping the matching row of
/// `V`, so that both routes (and repeated runs) give identical signs.
fn normalise_signs<F: Float>(u: &mut Array2<F>, v: &mut Array2<F>) {
    for (k, mut col) in u.axis_iter_mut(Axis(1)).enumerate() {
        let pivot =
            col.iter().copied().fold(
                F::zero(),
                |best, x| if x.abs_() > best.abs_() { x } else { best },
            );
        if pivot < F::zero() {
            col.mapv_inplace(|x| -x);
            v.row_mut(k).mapv_inplace(|x| -x);
        }
    }
}

/// Pads `U` with zero columns and `V` with rows `V[i mod q] / τ` up to `rank`.
fn pad<F: Float>(u: &mut Array2<F>, v: &mut Array2<F>, rank: usize, tau: F) {
    let (d, q) = u.dim();
    let n = v.ncols();
    let mut u_padded = Array2::zeros((d, rank));
    u_padded.slice_mut(s![.., ..q]).assign(u);
    let mut v_padded = Array2::zeros((rank, n));
    v_padded.slice_mut(s![..q, ..]).assign(v);
    for i in q..rank {
        let src = v.row((i - q) % q);
        v_padded
            .row_mut(i)
            .zip_mut_with(&src, |dst, &x| *dst = x / tau);
    }
    *u = u_padded;
    *v = v_padded;
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::Array2;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn random(rows: usize, cols: usize, seed: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_simple_fn((rows, cols), || StandardNormal.sample(&mut rng))
    }

    fn blocks(d: usize, i: usize, k: usize) -> Vec<Array2<f64>> {
        (0..k).map(|j| random(d, i, 100 + j as u64)).collect()
    }

    fn product(init: &SharedInit<f64>) -> Array2<f64> {
        init.basis.dot(&init.factors)
    }

    #[test]
    fn routes_agree_truncated() {
        let ws = blocks(12, 20, 3);
        let views: Vec<_> = ws.iter().map(|w| w.view()).collect();
        let a = shared_init(&views, 7, DEFAULT_TAU, InitMethod::Gram).unwrap();
        let b = shared_init(&views, 7, DEFAULT_TAU, InitMethod::Svd).unwrap();
        assert_abs_diff_eq!(a.basis, b.basis, epsilon = 1e-9);
        assert_abs_diff_eq!(a.factors, b.factors, epsilon = 1e-8);
        assert_abs_diff_eq!(a.singular_values, b.singular_values, epsilon = 1e-9);
    }

    #[test]
    fn truncated_is_best_rank_r() {
        let ws = blocks(10, 15, 2);
        let views: Vec<_> = ws.iter().map(|w| w.view()).collect();
        let m = concatenate(Axis(1), &views).unwrap();
        let init = shared_init(&views, 4, DEFAULT_TAU, InitMethod::Gram).unwrap();
        let err2 = (&m - &product(&init)).mapv(|x| x * x).sum();
        let tail: f64 = init.singular_values.iter().skip(4).map(|s| s * s).sum();
        assert_abs_diff_eq!(err2, tail, epsilon = 1e-9 * tail);
        // U orthonormal.
        let utu = init.basis.t().dot(&init.basis);
        assert_abs_diff_eq!(utu, Array2::eye(4), epsilon = 1e-12);
    }

    #[test]
    fn exact_at_full_and_padded_rank() {
        let ws = blocks(8, 16, 4);
        let views: Vec<_> = ws.iter().map(|w| w.view()).collect();
        let m = concatenate(Axis(1), &views).unwrap();
        // r = d, r = 1.5 d (pad once), r = 2.5 d (pad rows repeat).
        for rank in [8, 12, 20] {
            for method in [InitMethod::Gram, InitMethod::Svd] {
                let init = shared_init(&views, rank, DEFAULT_TAU, method).unwrap();
                assert_eq!(init.basis.dim(), (8, rank));
                assert_eq!(init.factors.dim(), (rank, 64));
                assert_abs_diff_eq!(product(&init), m, epsilon = 1e-10);
                for i in 8..rank {
                    assert!(init.basis.column(i).iter().all(|&x| x == 0.0));
                    let expected = init.factors.row((i - 8) % 8).mapv(|x| x / DEFAULT_TAU);
                    assert_abs_diff_eq!(init.factors.row(i), expected, epsilon = 0.0);
                }
            }
        }
    }

    #[test]
    fn f32_routes_agree() {
        let ws: Vec<Array2<f32>> = blocks(16, 32, 2)
            .iter()
            .map(|w| w.mapv(|x| x as f32))
            .collect();
        let views: Vec<_> = ws.iter().map(|w| w.view()).collect();
        let a = shared_init(&views, 24, DEFAULT_TAU, InitMethod::Gram).unwrap();
        let b = shared_init(&views, 24, DEFAULT_TAU, InitMethod::Svd).unwrap();
        let m = concatenate(Axis(1), &views).unwrap();
        assert_abs_diff_eq!(a.basis.dot(&a.factors), m, epsilon = 1e-4);
        assert_abs_diff_eq!(b.basis.dot(&b.factors), m, epsilon = 1e-4);
        assert_abs_diff_eq!(a.basis, b.basis, epsilon = 1e-3);
    }

    #[test]
    fn bad_inputs() {
        let w = Array2::<f64>::zeros((4, 5));
        let v = Array2::<f64>::zeros((3, 5));
        assert!(shared_init::<f64>(&[], 2, 32.0, InitMethod::Gram).is_err());
        assert!(shared_init(&[w.view(), v.view()], 2, 32.0, InitMethod::Gram).is_err());
        assert!(shared_init(&[w.view()], 0, 32.0, InitMethod::Gram).is_err());
        assert!(shared_init(&[w.view()], 2, 0.0, InitMethod::Gram).is_err());
    }
}
