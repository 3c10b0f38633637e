//! Parameter budgets: rank from a budget, sparsity to a nonzero count, and parameter counts.
//!
//! A group of `n` blocks with `f` matrices each (f = 2 for fc1/fc2, 3 for gate/up/down), width `d`
//! and MLP width `I` holds `f n d I` dense MLP weights. FiPS stores a dense basis `U` (`d × r`) and
//! sparse factors `V_j` (`r × I`, sparsity `s`), so it keeps `d r + (1 − s) r f n I` parameters.
//! For a budget fraction `p` of the dense weights the rank is
//!
//! ```text
//! r = ⌊ p f n d I / ((1 − s) f n I + d) ⌋
//! ```
//!
//! with the true `I` (the reference code assumes `I = 4d`). Biases are counted separately.

use crate::foundation::error::{FipsError, Result, invalid};

/// The default budget fraction `p` of every method: keep half the dense MLP weights.
pub const DEFAULT_BUDGET_FRACTION: f64 = 0.5;
/// The default target sparsity `s` of FiPS's factors `V`.
pub const DEFAULT_SPARSITY: f64 = 0.75;

/// How large the compressed group may be (serialised as `{"fraction": p}` or `{"rank": r}`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Budget {
    /// Keep this fraction `p ∈ (0, 1]` of the group's dense MLP weights; the rank follows.
    Fraction(f64),
    /// Use this rank `r ≥ 1` for the shared basis.
    Rank(usize),
}

impl Budget {
    pub(crate) fn check(self) -> Result<Self> {
        match self {
            Self::Fraction(p) if !(p > 0.0 && p <= 1.0) => Err(invalid(
                "budget",
                format!("the budget fraction p must be in (0, 1], got {p}"),
            )),
            Self::Rank(0) => Err(invalid("budget", "the rank must be at least 1")),
            ok => Ok(ok),
        }
    }
}

/// Shape of the dense weights of a group: what the budget formula needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupShape {
    /// Model width d.
    pub width: usize,
    /// MLP width I.
    pub intermediate: usize,
    /// Blocks in the group, n.
    pub blocks: usize,
    /// Matrices per block, f.
    pub matrices_per_block: usize,
}

impl GroupShape {
    /// Number of weight matrices, `f n`.
    pub fn matrices(&self) -> usize {
        self.blocks * self.matrices_per_block
    }

    /// Dense MLP weights of the group, `f n d I`.
    pub fn dense_weights(&self) -> usize {
        self.matrices() * self.width * self.intermediate
    }

    /// Entries of the concatenated factor `V`, `r f n I`.
    pub fn factor_entries(&self, rank: usize) -> usize {
        rank * self.matrices() * self.intermediate
    }
}

/// The FiPS rank for budget fraction `p` and V sparsity `s`:
/// `⌊ p f n d I / ((1 − s) f n I + d) ⌋`.
///
/// Returns [`FipsError::ZeroRank`] when the budget cannot pay for rank 1, and an error for `p`
/// outside `(0, 1]` or `s` outside `[0, 1)`.
pub fn rank_for_budget(shape: GroupShape, p: f64, sparsity: f64) -> Result<usize> {
    Budget::Fraction(p).check()?;
    check_sparsity(sparsity)?;
    let fni = shape.matrices() as f64 * shape.intermediate as f64;
    let numerator = p * fni * shape.width as f64;
    let denominator = (1.0 - sparsity) * fni + shape.width as f64;
    // The relative nudge absorbs rounding of exactly-integral quotients (e.g. 0.3·10/1.5 = 2).
    let r = (numerator / denominator * (1.0 + 1e-12)).floor() as usize;
    if r == 0 {
        return Err(FipsError::ZeroRank {
            budget: p,
            sparsity,
            d: shape.width,
            intermediate: shape.intermediate,
            matrices: shape.matrices(),
        });
    }
    Ok(r)
}

/// The rank of a per-matrix factorisation `[m, n] ≈ [m, r] · [r, n]` keeping the fraction `p` of
/// its `m n` weights: `r = ⌊p m n / (m + n)⌋` (an error if that is 0).
pub fn rank_for_matrix(m: usize, n: usize, p: f64) -> Result<usize> {
    Budget::Fraction(p).check()?;
    let r = (p * m as f64 * n as f64 / (m + n) as f64 * (1.0 + 1e-12)).floor() as usize;
    if r == 0 {
        return Err(FipsError::ZeroRank {
            budget: p,
            sparsity: 0.0,
            d: m.min(n),
            intermediate: m.max(n),
            matrices: 1,
        });
    }
    Ok(r)
}

/// The number of nonzeros kept out of `total` entries at sparsity `s`: `⌊(1 − s) total⌋`.
///
/// The achieved sparsity `1 − nnz/total` is then in `[s, s + 1/total)`.
pub fn nonzeros_for_sparsity(total: usize, sparsity: f64) -> usize {
    let keep = ((1.0 - sparsity) * total as f64 * (1.0 + 1e-12)).floor() as usize;
    keep.min(total)
}

pub(crate) fn check_sparsity(s: f64) -> Result<()> {
    if !(0.0..1.0).contains(&s) {
        return Err(invalid(
            "sparsity",
            format!("the sparsity s must be in [0, 1), got {s}"),
        ));
    }
    Ok(())
}

/// Parameters of a compressed group, with the dense original for comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParameterCount {
    /// Dense MLP weights of the original group, `f n d I`.
    pub dense_weights: usize,
    /// Entries of the shared basis, `d r`.
    pub basis: usize,
    /// Nonzeros of the sparse factors.
    pub factor_nonzeros: usize,
    /// Bias parameters (the same before and after compression).
    pub biases: usize,
}

impl ParameterCount {
    /// Compressed weight parameters: basis entries plus factor nonzeros.
    pub fn compressed_weights(&self) -> usize {
        self.basis + self.factor_nonzeros
    }

    /// Compressed weights as a fraction of the dense weights.
    pub fn kept_fraction(&self) -> f64 {
        self.compressed_weights() as f64 / self.dense_weights as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deit_b() -> GroupShape {
        GroupShape {
            width: 768,
            intermediate: 3072,
            blocks: 4,
            matrices_per_block: 2,
        }
    }

    #[test]
    fn reference_ranks() {
        assert_eq!(rank_for_budget(deit_b(), 0.5, 0.75).unwrap(), 1365);
        assert_eq!(rank_for_budget(deit_b(), 0.25, 0.75).unwrap(), 682);
        assert_eq!(rank_for_budget(deit_b(), 0.5, 0.0).unwrap(), 372);
        let gemma = GroupShape {
            width: 2304,
            intermediate: 9216,
            blocks: 8,
            matrices_per_block: 3,
        };
        assert_eq!(rank_for_budget(gemma, 0.5, 0.75).unwrap(), 4423);
    }

    #[test]
    fn rank_respects_budget_and_is_maximal() {
        for &(p, s) in &[
            (0.5, 0.75),
            (0.25, 0.5),
            (0.35, 0.0),
            (0.75, 0.9),
            (1.0, 0.0),
        ] {
            let shape = GroupShape {
                width: 192,
                intermediate: 768,
                blocks: 4,
                matrices_per_block: 2,
            };
            let r = rank_for_budget(shape, p, s).unwrap();
            let budget = p * shape.dense_weights() as f64;
            let cost = |r: usize| {
                (shape.width * r + nonzeros_for_sparsity(shape.factor_entries(r), s)) as f64
            };
            assert!(
                cost(r) <= budget,
                "p={p} s={s}: rank {r} exceeds the budget"
            );
            assert!(
                cost(r + 1) > budget,
                "p={p} s={s}: rank {} would still fit",
                r + 1
            );
        }
    }

    #[test]
    fn zero_rank_and_bad_values_are_errors() {
        let tiny = GroupShape {
            width: 4,
            intermediate: 4,
            blocks: 1,
            matrices_per_block: 2,
        };
        assert!(matches!(
            rank_for_budget(tiny, 0.01, 0.0),
            Err(FipsError::ZeroRank { .. })
        ));
        assert!(rank_for_budget(tiny, 0.0, 0.0).is_err());
        assert!(rank_for_budget(tiny, 1.5, 0.0).is_err());
        assert!(rank_for_budget(tiny, f64::NAN, 0.0).is_err());
        assert!(rank_for_budget(tiny, 0.5, 1.0).is_err());
        assert!(rank_for_budget(tiny, 0.5, -0.1).is_err());
    }

    #[test]
    fn per_matrix_rank() {
        // DeiT-B fc1, p = 0.5: ⌊0.5 · 768 · 3072 / 3840⌋ = 307.
        assert_eq!(rank_for_matrix(3072, 768, 0.5).unwrap(), 307);
        assert_eq!(rank_for_matrix(768, 192, 0.25).unwrap(), 38);
        assert!(matches!(
            rank_for_matrix(4, 4, 0.1),
            Err(FipsError::ZeroRank { .. })
        ));
        assert!(rank_for_matrix(4, 4, 0.0).is_err());
    }

    #[test]
    fn nonzeros_floor() {
        assert_eq!(nonzeros_for_sparsity(100, 0.75), 25);
        assert_eq!(nonzeros_for_sparsity(10, 0.1), 9);
        assert_eq!(nonzeros_for_sparsity(7, 0.0), 7);
        assert_eq!(nonzeros_for_sparsity(3, 0.5), 1);
    }
}
