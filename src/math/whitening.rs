//! Activation-aware (whitened) low-rank factorisation, the primitive of SVD-LLM, basis sharing and
//! the mixed-rank method.
//!
//! For a layer `y = W x` (`W`: `[m, n]`) with calibration inputs `X` (`[N, n]`) and Gram matrix
//! `G = Xᵀ X = L Lᵀ` (Cholesky), take the SVD `W L = U Σ Vᵀ`. Then `X L⁻ᵀ` has orthonormal
//! columns, so the output error of the rank-`r` factors `A = U_r Σ_r^{1/2}`,
//! `B = Σ_r^{1/2} V_rᵀ L⁻¹` is exactly
//!
//! ```text
//! ‖X Wᵀ − X (A B)ᵀ‖_F² = Σ_{i>r} σ_i²
//! ```
//!
//! the minimum over all rank-`r` matrices (and `Σ σ_i² = ‖X Wᵀ‖²`). `B` comes from a triangular
//! solve, never from an explicit inverse. Statistics and factorisations run in `f64`.

use ndarray::{Array1, Array2, ArrayView2, Axis, linalg::general_mat_mul};
use ndarray_linalg::{Cholesky, Diag, EigValsh, JobSvd, SVDDC, SolveTriangular, UPLO};

use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::{Float, cast_array};
use crate::foundation::mlp::DenseMlp;
use crate::foundation::slicing::s;

/// Rows converted to `f64` per GEMM when accumulating a Gram matrix.
const GRAM_CHUNK: usize = 4096;

/// A streaming accumulator of `G = Σ_t x_t x_tᵀ` in `f64`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gram {
    g: Array2<f64>,
    tokens: usize,
}

impl Gram {
    /// An empty `n × n` accumulator.
    pub fn new(n: usize) -> Self {
        Self {
            g: Array2::zeros((n, n)),
            tokens: 0,
        }
    }

    /// Adds the rows of `x` (`[tokens, n]`).
    pub fn add<F: Float>(&mut self, x: ArrayView2<'_, F>) -> Result<()> {
        if x.ncols() != self.g.nrows() {
            return Err(FipsError::ShapeMismatch {
                what: "rows added to a Gram matrix".into(),
                expected: vec![x.nrows(), self.g.nrows()],
                got: x.shape().to_vec(),
            });
        }
        for chunk in x.axis_chunks_iter(Axis(0), GRAM_CHUNK) {
            let c: Array2<f64> = cast_array(&chunk);
            general_mat_mul(1.0, &c.t(), &c, 1.0, &mut self.g);
        }
        self.tokens += x.nrows();
        Ok(())
    }

    /// Adds another accumulator (pooled statistics of several layers).
    pub fn merge(&mut self, other: &Gram) -> Result<()> {
        if other.g.dim() != self.g.dim() {
            return Err(FipsError::ShapeMismatch {
                what: "Gram matrices to pool".into(),
                expected: self.g.shape().to_vec(),
                got: other.g.shape().to_vec(),
            });
        }
        self.g += &other.g;
        self.tokens += other.tokens;
        Ok(())
    }

    /// The accumulated matrix.
    pub fn matrix(&self) -> &Array2<f64> {
        &self.g
    }

    /// Rows added so far.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// The Gram matrices of a block's layer inputs over calibration inputs `z` (`[tokens, d]`): of `z`
/// itself (the input of fc1, gate and up; `d × d`) and of the hidden activations fed to fc2 / down
/// (`I × I`), computed chunk by chunk so the hidden state is never held whole.
pub fn block_input_grams<F: Float>(
    mlp: &DenseMlp<F>,
    z: ArrayView2<'_, F>,
) -> Result<(Gram, Gram)> {
    let mut up = Gram::new(mlp.width());
    let mut down = Gram::new(mlp.intermediate());
    for chunk in z.axis_chunks_iter(Axis(0), GRAM_CHUNK) {
        up.add(chunk)?;
        down.add(mlp.hidden_activations(chunk)?.view())?;
    }
    Ok((up, down))
}

/// The lower Cholesky factor `L` of `G` (`G = L Lᵀ`). When `G` is not numerically positive definite
/// (fewer tokens than dimensions, dead features), retries with `G + (−λ_min + ε) I` where
/// `ε = 1e-6 · max(1, tr G / n)`; returns `L` and the jitter added (0 when none was needed).
pub fn cholesky_with_jitter(g: ArrayView2<'_, f64>) -> Result<(Array2<f64>, f64)> {
    let n = g.nrows();
    if g.ncols() != n || n == 0 {
        return Err(FipsError::ShapeMismatch {
            what: "Gram matrix (square)".into(),
            expected: vec![n.max(1), n.max(1)],
            got: g.shape().to_vec(),
        });
    }
    let lower = |mut l: Array2<f64>| {
        for i in 0..n {
            for j in i + 1..n {
                l[[i, j]] = 0.0;
            }
        }
        l
    };
    if let Ok(l) = g.cholesky(UPLO::Lower) {
        return Ok((lower(l), 0.0));
    }
    let min_eig = g
        .eigvalsh(UPLO::Lower)?
        .iter()
        .fold(f64::INFINITY, |m, &x| m.min(x));
    let eps = 1e-6 * (g.diag().sum() / n as f64).max(1.0);
    let mut jitter = (-min_eig).max(0.0) + eps;
    for _ in 0..8 {
        let mut shifted = g.to_owned();
        shifted.diag_mut().mapv_inplace(|x| x + jitter);
        if let Ok(l) = shifted.cholesky(UPLO::Lower) {
            return Ok((lower(l), jitter));
        }
        jitter *= 10.0;
    }
    Err(FipsError::Numerical(
        "the Gram matrix stays indefinite after adding jitter".into(),
    ))
}

/// The whitened SVD `W L = U Σ Vᵀ` of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct WhitenedSvd {
    /// `U`, `[m, q]`.
    pub u: Array2<f64>,
    /// `σ`, descending, `q = min(m, n)` of them.
    pub sigma: Array1<f64>,
    /// `Vᵀ`, `[q, n]`.
    pub vt: Array2<f64>,
    /// The Cholesky factor `L` of the (jittered) Gram matrix.
    pub l: Array2<f64>,
    /// Jitter added to the Gram matrix's diagonal.
    pub jitter: f64,
}

impl WhitenedSvd {
    /// Factorises `W` (`[out, in]`) for inputs with Gram matrix `gram` (`[in, in]`).
    pub fn new<F: Float>(w: ArrayView2<'_, F>, gram: &Gram) -> Result<Self> {
        let (l, jitter) = cholesky_with_jitter(gram.matrix().view())?;
        Self::with_cholesky(w, l, jitter)
    }

    /// As [`WhitenedSvd::new`] with a Cholesky factor already computed (shared inputs).
    pub fn with_cholesky<F: Float>(
        w: ArrayView2<'_, F>,
        l: Array2<f64>,
        jitter: f64,
    ) -> Result<Self> {
        if w.ncols() != l.nrows() {
            return Err(FipsError::ShapeMismatch {
                what: "weight [out, in] against the Gram matrix [in, in]".into(),
                expected: vec![w.nrows(), l.nrows()],
                got: w.shape().to_vec(),
            });
        }
        let w64: Array2<f64> = cast_array(&w);
        let wl = w64.dot(&l);
        let (u, sigma, vt) = wl.svddc(JobSvd::Some)?;
        let (Some(u), Some(vt)) = (u, vt) else {
            return Err(FipsError::Numerical(
                "the SVD returned no singular vectors".into(),
            ));
        };
        Ok(Self {
            u,
            sigma,
            vt,
            l,
            jitter,
        })
    }

    /// `Σ_i σ_i²`: the output energy `‖X Wᵀ‖²` (of the jittered problem).
    pub fn energy(&self) -> f64 {
        self.sigma.iter().map(|s| s * s).sum()
    }

    /// `Σ_{i>r} σ_i²`: the output error of the rank-`r` factors.
    pub fn tail_energy(&self, r: usize) -> f64 {
        self.sigma.iter().skip(r).map(|s| s * s).sum()
    }

    /// The balanced rank-`r` factors `A = U_r Σ_r^{1/2}` (`[m, r]`) and
    /// `B = Σ_r^{1/2} V_rᵀ L⁻¹` (`[r, n]`), by the triangular solve `Lᵀ Bᵀ = V_r Σ_r^{1/2}`.
    pub fn factors<F: Float>(&self, r: usize) -> Result<(Array2<F>, Array2<F>)> {
        let r = r.min(self.sigma.len());
        let sigma = self.sigma.to_vec();
        let (a, b_unwhitened) = balanced_factors(self.u.view(), &sigma, self.vt.view(), r);
        let rhs = b_unwhitened.t().to_owned();
        let bt = self
            .l
            .t()
            .solve_triangular(UPLO::Upper, Diag::NonUnit, &rhs)?;
        Ok((cast_array(&a), cast_array(&bt.t())))
    }
}

/// Splits `W ≈ U diag(σ) Vᵀ` (top `k` triplets) into balanced factors `A = U √σ`, `B = √σ Vᵀ`.
pub(crate) fn balanced_factors<F: Float>(
    u: ndarray::ArrayView2<'_, F>,
    sigma: &[F],
    vt: ndarray::ArrayView2<'_, F>,
    k: usize,
) -> (Array2<F>, Array2<F>) {
    let mut a = u.slice(s![.., ..k]).to_owned();
    let mut b = vt.slice(s![..k, ..]).to_owned();
    for (i, &s) in sigma.iter().take(k).enumerate() {
        let root = s.max_(F::zero()).sqrt_();
        a.column_mut(i).mapv_inplace(|x| x * root);
        b.row_mut(i).mapv_inplace(|x| x * root);
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn randn(rows: usize, cols: usize, seed: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_simple_fn((rows, cols), || StandardNormal.sample(&mut rng))
    }

    /// Correlated inputs with very different scales per feature (where whitening matters).
    fn inputs(tokens: usize, n: usize, seed: u64) -> Array2<f64> {
        let mix = randn(n, n, seed + 1);
        let mut x = randn(tokens, n, seed).dot(&mix);
        for (j, mut col) in x.axis_iter_mut(Axis(1)).enumerate() {
            col *= 0.1 + j as f64;
        }
        x
    }

    #[test]
    fn output_error_equals_the_dropped_singular_values() {
        let (m, n) = (7, 9);
        let w = randn(m, n, 3);
        let x = inputs(200, n, 5);
        let mut gram = Gram::new(n);
        gram.add(x.view()).unwrap();
        let svd = WhitenedSvd::new(w.view(), &gram).unwrap();
        assert_eq!(svd.jitter, 0.0);
        let y = x.dot(&w.t());
        assert_abs_diff_eq!(
            svd.energy(),
            y.mapv(|v| v * v).sum(),
            epsilon = 1e-8 * svd.energy()
        );
        for r in 0..=m {
            let (a, b): (Array2<f64>, Array2<f64>) = svd.factors(r).unwrap();
            let err2 = (&y - &x.dot(&a.dot(&b).t())).mapv(|v| v * v).sum();
            assert_abs_diff_eq!(err2, svd.tail_energy(r), epsilon = 1e-8 * svd.energy());
        }
        // Full rank reproduces the layer.
        let (a, b): (Array2<f64>, Array2<f64>) = svd.factors(m).unwrap();
        assert_abs_diff_eq!(a.dot(&b), w, epsilon = 1e-9);
    }

    #[test]
    fn whitening_beats_plain_svd_on_the_output() {
        let (m, n, r) = (8, 10, 3);
        let w = randn(m, n, 11);
        let x = inputs(300, n, 12);
        let mut gram = Gram::new(n);
        gram.add(x.view()).unwrap();
        let (a, b): (Array2<f64>, Array2<f64>) = WhitenedSvd::new(w.view(), &gram)
            .unwrap()
            .factors(r)
            .unwrap();
        let (u, s, vt) = w.svddc(JobSvd::Some).unwrap();
        let plain = u
            .unwrap()
            .slice(s![.., ..r])
            .dot(&Array2::from_diag(&s.slice(s![..r])))
            .dot(&vt.unwrap().slice(s![..r, ..]));
        let y = x.dot(&w.t());
        let whitened_err = (&y - &x.dot(&a.dot(&b).t())).mapv(|v| v * v).sum();
        let plain_err = (&y - &x.dot(&plain.t())).mapv(|v| v * v).sum();
        assert!(whitened_err < plain_err, "{whitened_err} vs {plain_err}");
    }

    #[test]
    fn singular_gram_gets_jitter() {
        // Fewer tokens than dimensions: G has rank 3 of 6.
        let x = randn(3, 6, 2);
        let mut gram = Gram::new(6);
        gram.add(x.view()).unwrap();
        let (l, jitter) = cholesky_with_jitter(gram.matrix().view()).unwrap();
        assert!(jitter > 0.0);
        let mut shifted = gram.matrix().clone();
        shifted.diag_mut().mapv_inplace(|v| v + jitter);
        assert_abs_diff_eq!(l.dot(&l.t()), shifted, epsilon = 1e-9);
        assert!(gram.add(Array2::<f64>::zeros((2, 5)).view()).is_err());
        assert!(cholesky_with_jitter(Array2::zeros((2, 3)).view()).is_err());
    }

    #[test]
    fn chunked_and_pooled_accumulation() {
        let x = randn(10_000, 4, 9);
        let mut whole = Gram::new(4);
        whole.add(x.view()).unwrap();
        let mut a = Gram::new(4);
        a.add(x.slice(s![..5000, ..])).unwrap();
        let mut b = Gram::new(4);
        b.add(x.slice(s![5000.., ..])).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.tokens(), 10_000);
        assert_abs_diff_eq!(a.matrix(), whole.matrix(), epsilon = 1e-7);
        assert_abs_diff_eq!(whole.matrix(), &x.t().dot(&x), epsilon = 1e-7);
    }
}
