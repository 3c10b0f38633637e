//! The shared-basis form (FiPS): one shared basis, the sparse factor of every matrix, and the biases.

use ndarray::{Array1, Array2, ArrayView2, Axis, Zip, linalg::general_mat_mul};

use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::{Float, ensure_finite};
use crate::foundation::mlp::{DenseMlp, Linear, MatrixRole, MlpKind};
use crate::foundation::slicing::s;
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

    /// The rank components [`Self::without_unused_rank`] keeps: `k` such that column `k` of `U`
    /// is nonzero and some factor keeps an entry in its row `k` (component 0 if there is none).
    fn kept_components(&self) -> Vec<usize> {
        let u = self.basis.view();
        let used: Vec<usize> = (0..self.rank())
            .filter(|&k| {
                u.column(k).iter().any(|&x| x != F::zero())
                    && self
                        .factors
                        .iter()
                        .any(|v| v.mask().row(k).iter().any(|&m| m))
            })
            .collect();
        if used.is_empty() { vec![0] } else { used }
    }

    /// How many rank components contribute nothing: the count [`Self::without_unused_rank`]
    /// drops.
    pub fn unused_rank(&self) -> usize {
        self.rank() - self.kept_components().len()
    }

    /// The same group without the rank components that contribute nothing: component `k` goes
    /// when no factor keeps an entry in its row `k`, or when column `k` of `U` is zero. Every
    /// rebuilt weight `U V_j` keeps its value (only zero terms leave each sum), the factors keep
    /// every kept entry of the other rows, and the basis loses `d` parameters per component
    /// dropped. Returns the group and the number of components dropped; at least one stays.
    ///
    /// FiPS's over-complete initialisation (`r > d`) pads `U` with zero columns; when the
    /// sparsifier prunes every entry of their rows at the start (RigL does: the padded rows hold
    /// the top rows divided by `τ`) they never receive gradient again. The `fips` command drops
    /// them before it writes a group; the library's [`crate::FipsTrainer::finish`] returns the
    /// group as trained (rank and sparsity those of the budget) and reports the count.
    pub fn without_unused_rank(self) -> Result<(Self, usize)> {
        let r = self.rank();
        let keep = self.kept_components();
        if keep.len() == r {
            return Ok((self, 0));
        }
        let basis = SharedBasis::new(self.basis.view().select(Axis(1), &keep))?;
        let factors = self
            .factors
            .iter()
            .map(|v| {
                SparseFactor::new(
                    v.values().select(Axis(0), &keep),
                    v.mask().select(Axis(0), &keep),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let dropped = r - keep.len();
        let group = Self::new(self.kind, self.activation, basis, factors, self.biases)?;
        Ok((group, dropped))
    }

    /// The same group at rank `rank ≥ r`: `U` padded with zero columns and every factor with
    /// empty rows (components that contribute nothing; [`Self::without_unused_rank`] undoes it).
    pub fn with_rank(self, rank: usize) -> Result<Self> {
        let (d, r) = (self.width(), self.rank());
        if rank < r {
            return Err(FipsError::ShapeMismatch {
                what: "padded rank (at least the group's)".into(),
                expected: vec![r],
                got: vec![rank],
            });
        }
        if rank == r {
            return Ok(self);
        }
        let mut u = Array2::zeros((d, rank));
        u.slice_mut(s![.., ..r]).assign(&self.basis.view());
        let factors = self
            .factors
            .iter()
            .map(|v| {
                let i = v.cols();
                let mut values = Array2::zeros((rank, i));
                values.slice_mut(s![..r, ..]).assign(&v.values());
                let mut mask = Array2::from_elem((rank, i), false);
                mask.slice_mut(s![..r, ..]).assign(&v.mask());
                SparseFactor::new(values, mask)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(
            self.kind,
            self.activation,
            SharedBasis::new(u)?,
            factors,
            self.biases,
        )
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every rebuilt weight `U V_j` of `a` is within `tol` (relative, plus `tol` absolute) of
    /// `b`'s.
    pub(crate) fn assert_same_weights(
        a: &SharedBasisGroup<f64>,
        b: &SharedBasisGroup<f64>,
        tol: f64,
    ) {
        assert_eq!((a.blocks(), a.kind()), (b.blocks(), b.kind()));
        for block in 0..a.blocks() {
            for m in 0..a.kind().matrices_per_block() {
                let (x, y) = (
                    a.dense_weight(block, m).unwrap(),
                    b.dense_weight(block, m).unwrap(),
                );
                for (p, q) in x.iter().zip(&y) {
                    assert!(
                        (p - q).abs() <= tol * (1.0 + q.abs()),
                        "block {block} matrix {m}: {p} vs {q}"
                    );
                }
            }
        }
    }
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A factor's values and mask.
    type Factor = (Array2<f64>, Array2<bool>);

    /// A standard two-block group (`d = 4`, `r = 7`, `I = 5`) with random values and masks.
    fn group(rng: &mut ChaCha8Rng) -> (Array2<f64>, Vec<Factor>) {
        let u = Array2::from_shape_simple_fn((4, 7), || rng.random_range(-1.0..1.0));
        let factors = (0..4)
            .map(|_| {
                let v = Array2::from_shape_simple_fn((7, 5), || rng.random_range(-1.0..1.0));
                let m = Array2::from_shape_simple_fn((7, 5), || rng.random_bool(0.5));
                (v, m)
            })
            .collect();
        (u, factors)
    }

    fn assemble(u: Array2<f64>, factors: &[Factor]) -> SharedBasisGroup<f64> {
        let factors = factors
            .iter()
            .map(|(v, m)| SparseFactor::new(v.clone(), m.clone()).unwrap())
            .collect();
        let biases = vec![None; 4];
        let basis = SharedBasis::new(u).unwrap();
        SharedBasisGroup::new(MlpKind::Standard, Activation::Gelu, basis, factors, biases).unwrap()
    }

    /// Components with an empty row in every factor or a zero column of `U` go, and nothing
    /// else: every dense weight keeps its value, the kept entries of the other rows stay, and
    /// the basis loses `d` parameters per component.
    #[test]
    fn unused_rank_is_dropped_and_the_weights_keep_their_values() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (mut u, mut factors) = group(&mut rng);
        // Row 3: no kept entry anywhere. Row 1: empty in one factor only (it stays). Column 6 of
        // U: zero, while row 6 keeps entries (they go with it).
        for (j, (_, m)) in factors.iter_mut().enumerate() {
            m.row_mut(3).fill(false);
            if j == 0 {
                m.row_mut(1).fill(false);
            }
            m[[6, 0]] = true;
        }
        factors[2].1.row_mut(1).fill(true);
        u.column_mut(6).fill(0.0);
        let whole = assemble(u, &factors);
        let row6: usize = factors
            .iter()
            .map(|(_, m)| m.row(6).iter().filter(|&&x| x).count())
            .sum();
        assert_eq!(whole.unused_rank(), 2);
        let (compact, dropped) = whole.clone().without_unused_rank().unwrap();
        assert_eq!(dropped, 2);
        assert_eq!(compact.rank(), 5);
        assert_eq!(compact.nnz(), whole.nnz() - row6);
        let (before, after) = (whole.parameter_count(), compact.parameter_count());
        assert_eq!(before.basis - after.basis, 2 * 4);
        assert_same_weights(&compact, &whole, 1e-12);
        // The kept rows, in order: 0, 1, 2, 4, 5.
        for (j, (v, m)) in factors.iter().enumerate() {
            let f = &compact.factors()[j];
            for (new, old) in [0, 1, 2, 4, 5].into_iter().enumerate() {
                assert_eq!(f.mask().row(new), m.row(old));
                for ((&a, &b), &k) in f.values().row(new).iter().zip(v.row(old)).zip(m.row(old)) {
                    assert_eq!(a, if k { b } else { 0.0 });
                }
            }
        }
        // Nothing to drop: the same group back; everything unused: one component stays.
        let (again, none) = compact.clone().without_unused_rank().unwrap();
        assert_eq!((none, &again), (0, &compact));
        for (_, m) in factors.iter_mut() {
            m.fill(false);
        }
        let empty = assemble(Array2::ones((4, 7)), &factors);
        assert_eq!(empty.unused_rank(), 6);
        let (one, dropped) = empty.without_unused_rank().unwrap();
        assert_eq!((one.rank(), dropped), (1, 6));
    }
}
