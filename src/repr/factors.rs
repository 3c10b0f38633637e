//! The two factor types of FiPS: the dense shared basis `U` and the sparse per-matrix factors `V_j`.

use ndarray::{Array2, ArrayView2, Zip};
use sprs::{CsMat, TriMat};

use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::{Float, ensure_finite};

/// The dense basis `U` (`d × r`) shared by every matrix of a group: `W_j = U V_j`.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedBasis<F> {
    u: Array2<F>,
}

impl<F: Float> SharedBasis<F> {
    /// A basis from a finite, non-empty `d × r` array.
    pub fn new(u: Array2<F>) -> Result<Self> {
        if u.is_empty() {
            return Err(FipsError::ShapeMismatch {
                what: "shared basis".into(),
                expected: vec![1, 1],
                got: u.shape().to_vec(),
            });
        }
        ensure_finite(&u, || "shared basis".into())?;
        Ok(Self { u })
    }

    /// Model width d (rows).
    pub fn width(&self) -> usize {
        self.u.nrows()
    }

    /// Rank r (columns).
    pub fn rank(&self) -> usize {
        self.u.ncols()
    }

    /// The `d × r` matrix.
    pub fn view(&self) -> ArrayView2<'_, F> {
        self.u.view()
    }

    /// The `d × r` matrix, by value.
    pub fn into_inner(self) -> Array2<F> {
        self.u
    }
}

/// One matrix's sparse factor `V_j` (`r × I`): values and the boolean mask of kept entries.
///
/// Entries outside the mask are exactly zero. The mask, not the value, decides what is stored:
/// a kept entry whose value happens to be zero still counts as a nonzero (it is trainable).
#[derive(Debug, Clone, PartialEq)]
pub struct SparseFactor<F> {
    values: Array2<F>,
    mask: Array2<bool>,
}

impl<F: Float> SparseFactor<F> {
    /// A factor from `r × I` values and a mask of the same shape; values outside the mask are set
    /// to zero.
    pub fn new(mut values: Array2<F>, mask: Array2<bool>) -> Result<Self> {
        if values.dim() != mask.dim() {
            return Err(FipsError::ShapeMismatch {
                what: "sparse factor mask".into(),
                expected: values.shape().to_vec(),
                got: mask.shape().to_vec(),
            });
        }
        if values.is_empty() {
            return Err(FipsError::ShapeMismatch {
                what: "sparse factor".into(),
                expected: vec![1, 1],
                got: values.shape().to_vec(),
            });
        }
        ensure_finite(&values, || "sparse factor values".into())?;
        Zip::from(&mut values).and(&mask).for_each(|v, &keep| {
            if !keep {
                *v = F::zero();
            }
        });
        Ok(Self { values, mask })
    }

    /// A factor with every entry kept.
    pub fn dense(values: Array2<F>) -> Result<Self> {
        let mask = Array2::from_elem(values.raw_dim(), true);
        Self::new(values, mask)
    }

    /// A factor from a CSR matrix: its stored entries become the mask.
    pub fn from_csr(csr: &CsMat<F>) -> Result<Self> {
        let (rows, cols) = csr.shape();
        let mut values = Array2::zeros((rows, cols));
        let mut mask = Array2::from_elem((rows, cols), false);
        for (&v, (i, j)) in csr.iter() {
            values[[i, j]] = v;
            mask[[i, j]] = true;
        }
        Self::new(values, mask)
    }

    /// Rank r (rows).
    pub fn rank(&self) -> usize {
        self.values.nrows()
    }

    /// MLP width I (columns).
    pub fn cols(&self) -> usize {
        self.values.ncols()
    }

    /// The `r × I` values (zero outside the mask).
    pub fn values(&self) -> ArrayView2<'_, F> {
        self.values.view()
    }

    /// The `r × I` mask of kept entries.
    pub fn mask(&self) -> ArrayView2<'_, bool> {
        self.mask.view()
    }

    /// Number of kept entries.
    pub fn nnz(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }

    /// Fraction of entries kept, `nnz / (r I)`.
    pub fn density(&self) -> f64 {
        self.nnz() as f64 / self.mask.len() as f64
    }

    /// The kept entries as a `sprs` CSR matrix (row-major, sorted column indices).
    pub fn to_csr(&self) -> CsMat<F> {
        let mut tri = TriMat::with_capacity(self.values.dim(), self.nnz());
        for ((i, j), &keep) in self.mask.indexed_iter() {
            if keep {
                tri.add_triplet(i, j, self.values[[i, j]]);
            }
        }
        tri.to_csr()
    }

    /// `(values, mask)` by value.
    pub fn into_parts(self) -> (Array2<F>, Array2<bool>) {
        (self.values, self.mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn mask_zeroes_values_and_csr_round_trips() {
        let values = array![[1.0, 2.0, 0.0], [-3.0, 4.0, 5.0]];
        let mask = array![[true, false, true], [false, true, true]];
        let f = SparseFactor::new(values, mask.clone()).unwrap();
        assert_eq!(f.values(), array![[1.0, 0.0, 0.0], [0.0, 4.0, 5.0]]);
        assert_eq!(f.nnz(), 4);
        assert!((f.density() - 4.0 / 6.0).abs() < 1e-15);
        let csr = f.to_csr();
        assert_eq!(csr.nnz(), 4, "a kept zero is still stored");
        assert_eq!(csr.indptr().raw_storage(), &[0, 2, 4]);
        assert_eq!(csr.indices(), &[0, 2, 1, 2]);
        let back = SparseFactor::from_csr(&csr).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn shape_errors() {
        assert!(
            SparseFactor::new(
                Array2::<f32>::zeros((2, 3)),
                Array2::from_elem((3, 2), true)
            )
            .is_err()
        );
        assert!(SharedBasis::new(Array2::<f32>::zeros((0, 3))).is_err());
        assert!(SharedBasis::new(array![[f64::NAN]]).is_err());
    }
}
