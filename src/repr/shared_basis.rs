//! The shared-basis form (FiPS): one shared basis, the sparse factor of every matrix, and the biases.

use ndarray::{Array1, Array2, ArrayView2, Zip, linalg::general_mat_mul};

use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::{Float, ensure_finite};
use crate::foundation::mlp::{DenseMlp, Linear, MatrixRole, MlpKind};
use crate::math::budget::{GroupShape, ParameterCount};
use crate::repr::factors::{SharedBasis, SparseFactor};

/// The FiPS form of `n` consecutive MLP blocks: `W_j = U V_j` for every matrix `j` (module order:
/// fc1, fc2 of block 0, fc1, fc2 of block 1, … or gate, up, down per block), stored with up
/// projections transposed (`W_fc1 = (U V_j)ᵀ`).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedBasisGroup<F> {
    kind: MlpKind,
    activation: Activation,
    basis: SharedBasis<F>,
    factors: Vec<SparseFactor<F>>,
    biases: Vec<Option<Array1<F>>>,
}

impl<F: Float> SharedBasisGroup<F> {
    /// Assembles a group, checking that every factor is `r × I` for the basis' `r`, that the number
    /// of factors is a multiple of the matrices per block, and that biases fit (`I` for up
    /// projections, `d` for down projections).
    pub fn new(
        kind: MlpKind,
        activation: Activation,
        basis: SharedBasis<F>,
        factors: Vec<SparseFactor<F>>,
        biases: Vec<Option<Array1<F>>>,
    ) -> Result<Self> {
        let f = kind.matrices_per_block();
        if factors.is_empty() || !factors.len().is_multiple_of(f) {
            return Err(FipsError::ShapeMismatch {
                what: format!("number of factors of a {kind} group (a positive multiple of {f})"),
                expected: vec![f * (factors.len() / f).max(1)],
                got: vec![factors.len()],
            });
        }
        if biases.len() != factors.len() {
            return Err(FipsError::ShapeMismatch {
                what: "number of bias slots (one per factor)".into(),
                expected: vec![factors.len()],
                got: vec![biases.len()],
            });
        }
        let (d, r) = (basis.width(), basis.rank());
        let i = factors[0].cols();
        for (j, v) in factors.iter().enumerate() {
            if v.rank() != r || v.cols() != i {
                return Err(FipsError::ShapeMismatch {
                    what: format!("factor {j}"),
                    expected: vec![r, i],
                    got: vec![v.rank(), v.cols()],
                });
            }
        }
        for (j, b) in biases.iter().enumerate() {
            if let Some(b) = b {
                let expected = match kind.matrix_roles()[j % f] {
                    MatrixRole::Up => i,
                    MatrixRole::Down => d,
                };
                if b.len() != expected {
                    return Err(FipsError::ShapeMismatch {
                        what: format!("bias {j}"),
                        expected: vec![expected],
                        got: vec![b.len()],
                    });
                }
                ensure_finite(b, || format!("bias {j}"))?;
            }
        }
        Ok(Self {
            kind,
            activation,
            basis,
            factors,
            biases,
        })
    }

    /// Standard or gated blocks.
    pub fn kind(&self) -> MlpKind {
        self.kind
    }

    /// The blocks' activation.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Number of blocks n.
    pub fn blocks(&self) -> usize {
        self.factors.len() / self.kind.matrices_per_block()
    }

    /// Model width d.
    pub fn width(&self) -> usize {
        self.basis.width()
    }

    /// MLP width I.
    pub fn intermediate(&self) -> usize {
        self.factors[0].cols()
    }

    /// Rank r of the shared basis.
    pub fn rank(&self) -> usize {
        self.basis.rank()
    }

    /// The dense shapes the group replaces.
    pub fn shape(&self) -> GroupShape {
        GroupShape {
            width: self.width(),
            intermediate: self.intermediate(),
            blocks: self.blocks(),
            matrices_per_block: self.kind.matrices_per_block(),
        }
    }

    /// The shared basis `U`.
    pub fn basis(&self) -> &SharedBasis<F> {
        &self.basis
    }

    /// All factors in module order.
    pub fn factors(&self) -> &[SparseFactor<F>] {
        &self.factors
    }

    /// All bias slots in module order.
    pub fn biases(&self) -> &[Option<Array1<F>>] {
        &self.biases
    }

    /// Index of matrix `matrix` of block `block` in module order, checked.
    fn index(&self, block: usize, matrix: usize) -> Result<usize> {
        let f = self.kind.matrices_per_block();
        if block >= self.blocks() {
            return Err(FipsError::IndexOutOfRange {
                what: "block",
                index: block,
                len: self.blocks(),
            });
        }
        if matrix >= f {
            return Err(FipsError::IndexOutOfRange {
                what: "matrix",
                index: matrix,
                len: f,
            });
        }
        Ok(block * f + matrix)
    }

    /// The factor `V_j` of matrix `matrix` (module order within the block) of block `block`.
    pub fn factor(&self, block: usize, matrix: usize) -> Result<&SparseFactor<F>> {
        Ok(&self.factors[self.index(block, matrix)?])
    }

    /// Total kept entries of the factors.
    pub fn nnz(&self) -> usize {
        self.factors.iter().map(SparseFactor::nnz).sum()
    }

    /// Achieved sparsity of the factors, `1 − nnz / (r f n I)`.
    pub fn sparsity(&self) -> f64 {
        let total = self.shape().factor_entries(self.rank());
        1.0 - self.nnz() as f64 / total as f64
    }

    /// Parameters kept, against the dense original.
    pub fn parameter_count(&self) -> ParameterCount {
        ParameterCount {
            dense_weights: self.shape().dense_weights(),
            basis: self.width() * self.rank(),
            factor_nonzeros: self.nnz(),
            biases: self.biases.iter().flatten().map(|b| b.len()).sum(),
        }
    }

    /// The rebuilt dense weight of one matrix in its original layout: `(U V_j)ᵀ` (`[I, d]`) for fc1,
    /// gate and up, `U V_j` (`[d, I]`) for fc2 and down.
    pub fn dense_weight(&self, block: usize, matrix: usize) -> Result<Array2<F>> {
        let j = self.index(block, matrix)?;
        let w = self.basis.view().dot(&self.factors[j].values());
        Ok(match self.kind.matrix_roles()[matrix] {
            MatrixRole::Up => w.reversed_axes().as_standard_layout().into_owned(),
            MatrixRole::Down => w,
        })
    }

    /// Block `block` rebuilt as a dense MLP (the densified checkpoint's weights).
    pub fn to_dense_mlp(&self, block: usize) -> Result<DenseMlp<F>> {
        let f = self.kind.matrices_per_block();
        let layers = (0..f)
            .map(|m| {
                let j = self.index(block, m)?;
                Linear::new(self.dense_weight(block, m)?, self.biases[j].clone())
            })
            .collect::<Result<Vec<_>>>()?;
        DenseMlp::from_layers(self.kind, layers, self.activation)
    }

    /// Block `block`'s output for inputs `x` (`[tokens, d]`), evaluating each projection as
    /// `(x U) V_j` or `x (U V_j)`, whichever needs fewer multiply-adds for this many tokens.
    pub fn forward(&self, block: usize, x: ArrayView2<'_, F>) -> Result<Array2<F>> {
        self.index(block, 0)?;
        let (d, r, i) = (self.width(), self.rank(), self.intermediate());
        if x.ncols() != d {
            return Err(FipsError::ShapeMismatch {
                what: "MLP input".into(),
                expected: vec![x.nrows(), d],
                got: x.shape().to_vec(),
            });
        }
        let t = x.nrows();
        let factors_first = factors_first_is_cheaper(t, d, r, i);
        let f = self.kind.matrices_per_block();
        let base = block * f;
        let u = self.basis.view();
        // x U, shared by every up projection of the block.
        let xu = factors_first.then(|| x.dot(&u));
        let up = |j: usize| -> Array2<F> {
            let v = self.factors[j].values();
            let mut h = match &xu {
                Some(xu) => xu.dot(&v),
                None => x.dot(&u.dot(&v)),
            };
            if let Some(b) = &self.biases[j] {
                h += b;
            }
            h
        };
        let act = self.activation;
        let hidden = match self.kind {
            MlpKind::Standard => up(base).mapv_into(|v| act.apply(v)),
            MlpKind::Gated => {
                let mut g = up(base);
                let u_proj = up(base + 1);
                Zip::from(&mut g)
                    .and(&u_proj)
                    .for_each(|g, &u| *g = act.apply(*g) * u);
                g
            }
        };
        let jd = base + f - 1;
        let v = self.factors[jd].values();
        let mut y = Array2::zeros((t, d));
        if factors_first {
            let c = hidden.dot(&v.t());
            general_mat_mul(F::one(), &c, &u.t(), F::zero(), &mut y);
        } else {
            let w = u.dot(&v);
            general_mat_mul(F::one(), &hidden, &w.t(), F::zero(), &mut y);
        }
        if let Some(b) = &self.biases[jd] {
            y += b;
        }
        Ok(y)
    }
}

/// Whether `(x U) V` (`T r (d + I)` multiply-adds) beats `x (U V)` (`d r I + T d I`) for one matrix.
pub(crate) fn factors_first_is_cheaper(tokens: usize, d: usize, r: usize, i: usize) -> bool {
    let factors_first = tokens as f64 * r as f64 * (d + i) as f64;
    let weights_first = d as f64 * r as f64 * i as f64 + tokens as f64 * d as f64 * i as f64;
    factors_first < weights_first
}

/// The former name of [`SharedBasisGroup`].
pub type CompressedGroup<F> = SharedBasisGroup<F>;
