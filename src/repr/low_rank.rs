//! Low-rank groups: every matrix `W_j ≈ A_j B_{u(j)}` (`[out, k] · [k, in]`), where right factors
//! may be shared by several matrices (basis sharing) or owned by one (SVD, SVD-LLM, mixed rank); a
//! matrix may also be kept dense (`W_j = A_j`, no right factor).

use ndarray::{Array1, Array2};

use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::{Float, ensure_finite};
use crate::foundation::mlp::{DenseMlp, Linear, MatrixRole, MlpKind};
use crate::math::budget::{GroupShape, ParameterCount};

/// One matrix of a low-rank group: its left factor, which right factor it uses, and its bias.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRankMatrix<F> {
    /// `A_j`, `[out, k]`.
    pub left: Array2<F>,
    /// Index of its right factor in [`LowRankGroup::bases`]; `None` keeps the matrix dense
    /// (`left` is then the whole `[out, in]` weight).
    pub basis: Option<usize>,
    /// Its bias, `[out]`.
    pub bias: Option<Array1<F>>,
}

/// One matrix's own factors `(A, B, bias)`.
pub type OwnedFactors<F> = (Array2<F>, Array2<F>, Option<Array1<F>>);

/// A group of blocks whose matrices are low-rank products, in module order.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRankGroup<F> {
    kind: MlpKind,
    activation: Activation,
    width: usize,
    intermediate: usize,
    bases: Vec<Array2<F>>,
    matrices: Vec<LowRankMatrix<F>>,
}

impl<F: Float> LowRankGroup<F> {
    /// A group of `d`-wide blocks with MLP width `I`; checks every shape (`A_j B_u` must have the
    /// matrix's original `[out, in]` shape) and that every basis is used.
    pub fn new(
        kind: MlpKind,
        activation: Activation,
        (width, intermediate): (usize, usize),
        bases: Vec<Array2<F>>,
        matrices: Vec<LowRankMatrix<F>>,
    ) -> Result<Self> {
        let f = kind.matrices_per_block();
        if matrices.is_empty() || !matrices.len().is_multiple_of(f) {
            return Err(FipsError::ShapeMismatch {
                what: format!("number of matrices of a {kind} group (a positive multiple of {f})"),
                expected: vec![f],
                got: vec![matrices.len()],
            });
        }
        let mut used = vec![false; bases.len()];
        for (j, m) in matrices.iter().enumerate() {
            let (out, input) = match kind.matrix_roles()[j % f] {
                MatrixRole::Up => (intermediate, width),
                MatrixRole::Down => (width, intermediate),
            };
            match m.basis {
                Some(u) => {
                    let basis = bases.get(u).ok_or(FipsError::IndexOutOfRange {
                        what: "basis",
                        index: u,
                        len: bases.len(),
                    })?;
                    used[u] = true;
                    let k = basis.nrows();
                    if m.left.dim() != (out, k) || basis.ncols() != input {
                        return Err(FipsError::ShapeMismatch {
                            what: format!("factors of matrix {j} ([out, k] and [k, in])"),
                            expected: vec![out, k, k, input],
                            got: vec![m.left.nrows(), m.left.ncols(), basis.nrows(), basis.ncols()],
                        });
                    }
                }
                None if m.left.dim() != (out, input) => {
                    return Err(FipsError::ShapeMismatch {
                        what: format!("dense matrix {j}"),
                        expected: vec![out, input],
                        got: m.left.shape().to_vec(),
                    });
                }
                None => {}
            }
            ensure_finite(&m.left, || format!("left factor of matrix {j}"))?;
            if let Some(b) = &m.bias
                && b.len() != out
            {
                return Err(FipsError::ShapeMismatch {
                    what: format!("bias of matrix {j}"),
                    expected: vec![out],
                    got: vec![b.len()],
                });
            }
        }
        if let Some(unused) = used.iter().position(|u| !u) {
            return Err(FipsError::InvalidParameter {
                name: "bases",
                reason: format!("basis {unused} is used by no matrix"),
            });
        }
        for (u, b) in bases.iter().enumerate() {
            ensure_finite(b, || format!("basis {u}"))?;
        }
        Ok(Self {
            kind,
            activation,
            width,
            intermediate,
            bases,
            matrices,
        })
    }

    /// A group where every matrix owns its right factor: `factors[j] = (A_j, B_j, bias_j)`.
    pub fn independent(
        kind: MlpKind,
        activation: Activation,
        shape: (usize, usize),
        factors: Vec<OwnedFactors<F>>,
    ) -> Result<Self> {
        let (bases, matrices) = factors
            .into_iter()
            .enumerate()
            .map(|(j, (left, right, bias))| {
                (
                    right,
                    LowRankMatrix {
                        left,
                        basis: Some(j),
                        bias,
                    },
                )
            })
            .unzip();
        Self::new(kind, activation, shape, bases, matrices)
    }

    /// Standard or gated.
    pub fn kind(&self) -> MlpKind {
        self.kind
    }

    /// The activation.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.matrices.len() / self.kind.matrices_per_block()
    }

    /// Model width d.
    pub fn width(&self) -> usize {
        self.width
    }

    /// MLP width I.
    pub fn intermediate(&self) -> usize {
        self.intermediate
    }

    /// The right factors `B_u`, `[k_u, in]`.
    pub fn bases(&self) -> &[Array2<F>] {
        &self.bases
    }

    /// The matrices, module order.
    pub fn matrices(&self) -> &[LowRankMatrix<F>] {
        &self.matrices
    }

    /// The rank of matrix `j` (module order over the group); `None` for a dense matrix.
    pub fn rank(&self, j: usize) -> Option<usize> {
        self.matrices
            .get(j)
            .and_then(|m| m.basis.map(|u| self.bases[u].nrows()))
    }

    /// The dense shapes the group replaces.
    pub fn shape(&self) -> GroupShape {
        GroupShape {
            width: self.width,
            intermediate: self.intermediate,
            blocks: self.blocks(),
            matrices_per_block: self.kind.matrices_per_block(),
        }
    }

    /// Parameters: `basis` counts the right factors (each shared one once), `factor_nonzeros` the
    /// left factors.
    pub fn parameter_count(&self) -> ParameterCount {
        ParameterCount {
            dense_weights: self.shape().dense_weights(),
            basis: self.bases.iter().map(|b| b.len()).sum(),
            factor_nonzeros: self.matrices.iter().map(|m| m.left.len()).sum(),
            biases: self
                .matrices
                .iter()
                .filter_map(|m| m.bias.as_ref())
                .map(|b| b.len())
                .sum(),
        }
    }

    /// Matrix `matrix` of block `block` rebuilt in its original `[out, in]` layout.
    pub fn dense_weight(&self, block: usize, matrix: usize) -> Result<Array2<F>> {
        let j = self.index(block, matrix)?;
        let m = &self.matrices[j];
        Ok(match m.basis {
            Some(u) => m.left.dot(&self.bases[u]),
            None => m.left.clone(),
        })
    }

    /// Block `block` as a dense MLP.
    pub fn to_dense_mlp(&self, block: usize) -> Result<DenseMlp<F>> {
        let f = self.kind.matrices_per_block();
        let layers = (0..f)
            .map(|m| {
                let j = self.index(block, m)?;
                Linear::new(self.dense_weight(block, m)?, self.matrices[j].bias.clone())
            })
            .collect::<Result<Vec<_>>>()?;
        DenseMlp::from_layers(self.kind, layers, self.activation)
    }

    fn index(&self, block: usize, matrix: usize) -> Result<usize> {
        let f = self.kind.matrices_per_block();
        if block >= self.blocks() || matrix >= f {
            return Err(FipsError::IndexOutOfRange {
                what: "block or matrix",
                index: block * f + matrix,
                len: self.matrices.len(),
            });
        }
        Ok(block * f + matrix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn shared_bases_are_counted_once_and_rebuild_exactly() {
        // Two standard blocks, d = 2, I = 3, rank 1; fc1 of both blocks share basis 0.
        let b0 = array![[1.0, 2.0]]; // [1, d]
        let b_fc2 = array![[1.0, 0.0, -1.0]]; // [1, I]
        let fc1 = |s: f64| LowRankMatrix {
            left: array![[s], [2.0 * s], [0.5]],
            basis: Some(0),
            bias: None,
        };
        let fc2 = |u: usize| LowRankMatrix {
            left: array![[1.0], [3.0]],
            basis: Some(u),
            bias: Some(array![0.1, 0.2]),
        };
        let g = LowRankGroup::new(
            MlpKind::Standard,
            Activation::Relu,
            (2, 3),
            vec![b0, b_fc2.clone(), b_fc2],
            vec![fc1(1.0), fc2(1), fc1(-1.0), fc2(2)],
        )
        .unwrap();
        let p = g.parameter_count();
        assert_eq!(p.dense_weights, 2 * 2 * 2 * 3);
        assert_eq!(p.basis, 2 + 3 + 3);
        assert_eq!(p.factor_nonzeros, 3 + 2 + 3 + 2);
        assert_eq!(
            g.dense_weight(1, 0).unwrap(),
            array![[-1.0, -2.0], [-2.0, -4.0], [0.5, 1.0]]
        );
        let y = g
            .to_dense_mlp(0)
            .unwrap()
            .forward(array![[1.0, 1.0]].view())
            .unwrap();
        // h = relu([3, 6, 1.5]) ; y = [1, 3]ᵀ (3 − 1.5) + b
        assert!((y[[0, 0]] - 1.6).abs() < 1e-12 && (y[[0, 1]] - 4.7).abs() < 1e-12);
    }

    #[test]
    fn bad_shapes_and_unused_bases_are_errors() {
        let ok = LowRankMatrix {
            left: Array2::<f64>::zeros((3, 1)),
            basis: Some(0),
            bias: None,
        };
        let down = LowRankMatrix {
            left: Array2::<f64>::zeros((2, 1)),
            basis: Some(1),
            bias: None,
        };
        // A dense fc2 ([d, I]) needs no basis.
        let dense_down = LowRankMatrix {
            left: Array2::<f64>::zeros((2, 3)),
            basis: None,
            bias: None,
        };
        let g = LowRankGroup::new(
            MlpKind::Standard,
            Activation::Gelu,
            (2, 3),
            vec![Array2::zeros((1, 2))],
            vec![ok.clone(), dense_down.clone()],
        )
        .unwrap();
        assert_eq!(g.rank(1), None);
        assert_eq!(g.parameter_count().compressed_weights(), 3 + 2 + 6);
        let bases = vec![Array2::zeros((1, 2)), Array2::zeros((1, 3))];
        let shape = (2, 3);
        assert!(
            LowRankGroup::new(
                MlpKind::Standard,
                Activation::Gelu,
                shape,
                bases.clone(),
                vec![ok.clone(), down.clone()]
            )
            .is_ok()
        );
        let mut unused = bases.clone();
        unused.push(Array2::zeros((1, 3)));
        assert!(
            LowRankGroup::new(
                MlpKind::Standard,
                Activation::Gelu,
                shape,
                unused,
                vec![ok.clone(), down.clone()]
            )
            .is_err()
        );
        assert!(
            LowRankGroup::new(
                MlpKind::Standard,
                Activation::Gelu,
                shape,
                bases.clone(),
                vec![down.clone(), ok.clone()]
            )
            .is_err()
        );
        assert!(
            LowRankGroup::new(MlpKind::Standard, Activation::Gelu, shape, bases, vec![ok]).is_err()
        );
    }
}
