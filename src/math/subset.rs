//! A calibration reader over some of another reader's tokens, and the whole of a reader in memory.
//!
//! The seeded hold-out of a calibration set ([`crate::math::validation::holdout`]) takes token
//! positions out of every block; [`RowSubset`] gives the kept (or the held-out) positions of any
//! [`CalibrationReader`] — in memory or streamed from a file — as a reader of its own, without
//! copying a row: row `k` of the subset is row `indices[k]` of the source, in every block.

use std::borrow::Cow;
use std::ops::Range;

use ndarray::Array2;

use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::Float;
use crate::foundation::slicing::s;
use crate::math::calibration::{Calibration, CalibrationReader};

/// Tokens `indices` of a reader, in that order: row `k` of every block is row `indices[k]` of the
/// source's block. Reads go to the source (positioned reads when it is a file): the subset holds
/// only its indices.
#[derive(Debug)]
pub struct RowSubset<'a, F: Float> {
    source: &'a dyn CalibrationReader<F>,
    indices: Vec<usize>,
}

impl<'a, F: Float> RowSubset<'a, F> {
    /// Tokens `indices` of `source` (repeats allowed, any order).
    ///
    /// Errors: no indices ([`FipsError::EmptyCalibration`]), an index `≥ source.tokens()`
    /// ([`FipsError::IndexOutOfRange`]), a source with explicit targets (it reads inputs only:
    /// split such a set with `split_tokens`).
    pub fn new(source: &'a dyn CalibrationReader<F>, indices: Vec<usize>) -> Result<Self> {
        crate::math::calibration::refuse_targets(source, "a row subset (read by its inputs)")?;
        if indices.is_empty() {
            return Err(FipsError::EmptyCalibration {
                reason: format!(
                    "a subset of none of the {} calibration tokens",
                    source.tokens()
                ),
            });
        }
        let tokens = source.tokens();
        if let Some(&bad) = indices.iter().find(|&&t| t >= tokens) {
            return Err(FipsError::IndexOutOfRange {
                what: "calibration token of a subset",
                index: bad,
                len: tokens,
            });
        }
        Ok(Self { source, indices })
    }

    /// The source's token positions, row `k` of the subset being `indices()[k]`.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

impl<F: Float> CalibrationReader<F> for RowSubset<'_, F> {
    fn blocks(&self) -> usize {
        self.source.blocks()
    }

    fn tokens(&self) -> usize {
        self.indices.len()
    }

    fn width(&self) -> usize {
        self.source.width()
    }

    fn is_data_free(&self) -> bool {
        self.source.is_data_free()
    }

    fn gather_valid(&self, block: usize, indices: &[usize], dst: &mut Array2<F>) -> Result<()> {
        let mapped: Vec<usize> = indices.iter().map(|&k| self.indices[k]).collect();
        self.source.gather(block, &mapped, dst)
    }

    /// Each run of consecutive source rows (the kept part of a hold-out is mostly such runs) is
    /// one [`CalibrationReader::rows`] of the source: one read from a file, not one per row.
    fn rows_valid(&self, block: usize, range: Range<usize>) -> Result<Array2<F>> {
        let mut out = Array2::zeros((range.len(), self.width()));
        let wanted = &self.indices[range];
        let mut k = 0;
        while let Some(&first) = wanted.get(k) {
            let len = 1 + wanted[k + 1..]
                .iter()
                .zip(1..)
                .take_while(|&(&t, step)| first.checked_add(step) == Some(t))
                .count();
            let run = self.source.rows(block, first, len)?;
            out.slice_mut(s![k..k + len, ..]).assign(&run);
            k += len;
        }
        Ok(out)
    }
}

/// The whole of `reader` in memory: borrowed when it already is ([`CalibrationReader::in_memory`]),
/// otherwise read block by block (`n T d` values; for the closed-form methods that need every
/// token at once).
pub fn read_whole<'a, F: Float>(
    reader: &'a dyn CalibrationReader<F>,
) -> Result<Cow<'a, Calibration<F>>> {
    if let Some(calibration) = reader.in_memory() {
        return Ok(Cow::Borrowed(calibration));
    }
    let inputs = (0..reader.blocks())
        .map(|b| reader.rows(b, 0, reader.tokens()))
        .collect::<Result<Vec<_>>>()?;
    let mut calibration = Calibration::new(inputs)?;
    if reader.is_data_free() {
        calibration = calibration.labelled_data_free();
    }
    Ok(Cow::Owned(calibration))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calibration() -> Calibration<f64> {
        let z = Array2::from_shape_fn((6, 2), |(i, j)| (10 * i + j) as f64);
        Calibration::new(vec![z.clone(), -z]).unwrap()
    }

    #[test]
    fn subset_maps_rows_and_checks_requests() {
        let calib = calibration();
        let sub = RowSubset::new(&calib, vec![4, 1, 5]).unwrap();
        let reader: &dyn CalibrationReader<f64> = &sub;
        assert_eq!(
            (reader.blocks(), reader.tokens(), reader.width()),
            (2, 3, 2)
        );
        assert!(reader.in_memory().is_none());
        let rows = reader.rows(1, 1, 2).unwrap();
        assert_eq!(rows.row(0), calib.inputs()[1].row(1));
        assert_eq!(rows.row(1), calib.inputs()[1].row(5));
        let mut dst = Array2::zeros((2, 2));
        reader.gather(0, &[2, 0], &mut dst).unwrap();
        assert_eq!(dst.row(0), calib.inputs()[0].row(5));
        assert_eq!(dst.row(1), calib.inputs()[0].row(4));
        // Indices of the subset, not of the source: 3 is past its end.
        assert!(matches!(
            reader.gather(0, &[3], &mut dst),
            Err(FipsError::IndexOutOfRange {
                index: 3,
                len: 3,
                ..
            })
        ));
        assert!(matches!(
            reader.rows(0, 2, 2),
            Err(FipsError::IndexOutOfRange { .. })
        ));
        assert!(matches!(
            reader.rows(2, 0, 1),
            Err(FipsError::IndexOutOfRange { .. })
        ));
        assert!(matches!(
            reader.gather(0, &[0, 1, 2], &mut dst),
            Err(FipsError::ShapeMismatch { .. })
        ));
        let whole = read_whole(reader).unwrap();
        assert_eq!(whole.tokens(), 3);
        assert_eq!(whole.inputs()[1].row(2), calib.inputs()[1].row(5));
        // Runs of consecutive rows, read one run at a time, in any order and with repeats.
        let order = vec![1, 2, 3, 5, 0, 4, 5, 5, 2, 3];
        let runs = RowSubset::new(&calib, order.clone()).unwrap();
        for (start, len) in [(0, 10), (2, 5), (9, 1), (4, 0)] {
            let got = runs.rows(1, start, len).unwrap();
            assert_eq!(got.dim(), (len, 2));
            for (k, &t) in order[start..start + len].iter().enumerate() {
                assert_eq!(
                    got.row(k),
                    calib.inputs()[1].row(t),
                    "row {k} of {start}+{len}"
                );
            }
        }
    }

    #[test]
    fn subset_rejects_empty_and_out_of_range_indices() {
        let calib = calibration();
        assert!(matches!(
            RowSubset::new(&calib, vec![]),
            Err(FipsError::EmptyCalibration { .. })
        ));
        assert!(matches!(
            RowSubset::new(&calib, vec![0, 6]),
            Err(FipsError::IndexOutOfRange {
                index: 6,
                len: 6,
                ..
            })
        ));
        // A subset of a subset maps through both.
        let outer = RowSubset::new(&calib, vec![5, 3, 1]).unwrap();
        let inner = RowSubset::new(&outer, vec![2, 0]).unwrap();
        let rows = CalibrationReader::rows(&inner, 0, 0, 2).unwrap();
        assert_eq!(rows.row(0), calib.inputs()[0].row(1));
        assert_eq!(rows.row(1), calib.inputs()[0].row(5));
        assert!(matches!(read_whole(&calib).unwrap(), Cow::Borrowed(_)));
    }
}
