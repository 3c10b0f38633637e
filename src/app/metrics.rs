//! Classification metrics: top-k accuracy and agreement between two models.

use ndarray::{ArrayView1, ArrayView2};

use crate::foundation::error::{FipsError, Result};

/// Top-1 and top-5 accuracy over a labelled set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accuracy {
    /// Fraction of rows whose highest logit is the label.
    pub top1: f64,
    /// Fraction of rows whose label is among the five highest logits.
    pub top5: f64,
    /// Number of rows.
    pub count: usize,
}

impl Accuracy {
    /// Accuracy of `logits` (`[rows, classes]`) against `labels`.
    pub fn new(logits: ArrayView2<'_, f32>, labels: &[usize]) -> Result<Self> {
        Ok(Self {
            top1: top_k_accuracy(logits, labels, 1)?,
            top5: top_k_accuracy(logits, labels, 5)?,
            count: labels.len(),
        })
    }
}

/// Indices of the `k` largest entries, largest first; ties go to the lower index.
fn top_k(row: ArrayView1<'_, f32>, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Fraction of rows whose label is among their `k` highest logits.
pub fn top_k_accuracy(logits: ArrayView2<'_, f32>, labels: &[usize], k: usize) -> Result<f64> {
    let (rows, classes) = logits.dim();
    if rows != labels.len() || rows == 0 {
        return Err(FipsError::ShapeMismatch {
            what: "logits rows and labels".into(),
            expected: vec![labels.len().max(1)],
            got: vec![rows],
        });
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= classes) {
        return Err(FipsError::IndexOutOfRange {
            what: "label",
            index: bad,
            len: classes,
        });
    }
    let hits = logits
        .rows()
        .into_iter()
        .zip(labels)
        .filter(|(row, label)| top_k(*row, k).contains(label))
        .count();
    Ok(hits as f64 / rows as f64)
}

/// Fraction of rows on which `a` and `b` predict the same class (top-1 agreement).
pub fn agreement(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Result<f64> {
    if a.dim() != b.dim() || a.nrows() == 0 {
        return Err(FipsError::ShapeMismatch {
            what: "logits of the two models".into(),
            expected: a.shape().to_vec(),
            got: b.shape().to_vec(),
        });
    }
    let same = a
        .rows()
        .into_iter()
        .zip(b.rows())
        .filter(|(x, y)| top_k(*x, 1) == top_k(*y, 1))
        .count();
    Ok(same as f64 / a.nrows() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn hand_made_logits() {
        let logits = array![
            [0.1f32, 0.9, 0.0, 0.0, 0.0, 0.0],
            [0.5, 0.1, 0.2, 0.3, 0.4, 0.0],
            [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
        ];
        // Row 0: label 1 is top-1. Row 1: label 5 is last (not in top 5). Row 2: tie goes to 0.
        let labels = [1, 5, 1];
        assert!((top_k_accuracy(logits.view(), &labels, 1).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert!((top_k_accuracy(logits.view(), &labels, 5).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        let acc = Accuracy::new(logits.view(), &labels).unwrap();
        assert_eq!(acc.count, 3);
        let other = array![
            [0.0f32, 1.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
            [2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        ];
        assert!((agreement(logits.view(), other.view()).unwrap() - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn mismatches_are_errors() {
        let logits = array![[0.0f32, 1.0]];
        assert!(top_k_accuracy(logits.view(), &[0, 1], 1).is_err());
        assert!(top_k_accuracy(logits.view(), &[2], 1).is_err());
        assert!(agreement(logits.view(), array![[0.0f32, 1.0, 2.0]].view()).is_err());
    }
}
