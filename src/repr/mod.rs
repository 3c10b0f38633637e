//! What a compressed group IS, whatever made it: the three compressed forms, their dense rebuild,
//! forward pass and parameter counts, and one measurement of their error against the original
//! blocks. Imports foundation and math only; methods, the file format and the application build on
//! it.
//!
//! | form | type | made by |
//! |---|---|---|
//! | shared basis `U` + sparse `V_j` per matrix | [`SharedBasisGroup`] | FiPS |
//! | low rank `A_j B_u(j)`, right factors possibly shared | [`LowRankGroup`] | SVD, SVD-LLM, basis sharing, mixed rank |
//! | one linear map per block | [`CollapsedGroup`] | LayerCollapse |

pub(crate) mod basis_product;
pub mod collapsed;
pub mod compact;
pub mod factors;
pub mod low_rank;
pub mod measure;
pub mod shared_basis;
pub mod sparse_blocked;
pub mod sparse_mlp;
pub mod sparse_tiled;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::foundation::error::Result;
use crate::foundation::float::Float;
use crate::foundation::mlp::DenseMlp;
use crate::math::budget::ParameterCount;
use crate::math::calibration::Calibration;

pub use collapsed::{CollapsedBlock, CollapsedGroup, CollapsedMap};
pub use factors::{SharedBasis, SparseFactor};
pub use low_rank::{LowRankGroup, LowRankMatrix};
pub use measure::{BlockErrors, GroupSpec, block_errors, validate_group};
pub(crate) use measure::{block_errors_one_at_a_time, block_errors_streamed};
pub use shared_basis::SharedBasisGroup;

/// Which of the three forms a group is stored in (the manifest's `representation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Representation {
    /// A shared basis and sparse factors ([`SharedBasisGroup`]).
    SharedBasis,
    /// Low-rank factors per matrix ([`LowRankGroup`]).
    LowRank,
    /// One linear map per block ([`CollapsedGroup`]).
    Collapsed,
}

impl Representation {
    /// The name in manifests: `shared-basis`, `low-rank` or `collapsed`.
    pub fn name(self) -> &'static str {
        match self {
            Self::SharedBasis => "shared-basis",
            Self::LowRank => "low-rank",
            Self::Collapsed => "collapsed",
        }
    }
}

impl fmt::Display for Representation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A group of blocks in one of the three compressed forms.
#[derive(Debug, Clone, PartialEq)]
pub enum CompressedBlocks<F> {
    /// A shared basis and sparse factors (FiPS).
    SharedBasis(SharedBasisGroup<F>),
    /// Per-matrix low-rank factors, right factors possibly shared (SVD, SVD-LLM, basis sharing,
    /// mixed rank).
    LowRank(LowRankGroup<F>),
    /// One linear map per block (LayerCollapse).
    Collapsed(CollapsedGroup<F>),
}

impl<F: Float> CompressedBlocks<F> {
    /// The same blocks with a shared basis' unused rank components dropped
    /// ([`SharedBasisGroup::without_unused_rank`]); the other forms unchanged.
    pub fn without_unused_rank(self) -> Result<Self> {
        match self {
            Self::SharedBasis(g) => Ok(Self::SharedBasis(g.without_unused_rank()?.0)),
            other => Ok(other),
        }
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        match self {
            Self::SharedBasis(g) => g.blocks(),
            Self::LowRank(g) => g.blocks(),
            Self::Collapsed(g) => g.blocks(),
        }
    }

    /// Block `block` as a dense MLP of the original architecture (exactly equivalent).
    pub fn to_dense_mlp(&self, block: usize) -> Result<DenseMlp<F>> {
        match self {
            Self::SharedBasis(g) => g.to_dense_mlp(block),
            Self::LowRank(g) => g.to_dense_mlp(block),
            Self::Collapsed(g) => g.to_dense_mlp(block),
        }
    }

    /// Every block as a dense MLP of the original architecture.
    pub fn to_dense_mlps(&self) -> Result<Vec<DenseMlp<F>>> {
        (0..self.blocks()).map(|b| self.to_dense_mlp(b)).collect()
    }

    /// Parameters kept against the dense original (weights; biases separately).
    pub fn parameter_count(&self) -> ParameterCount {
        match self {
            Self::SharedBasis(g) => g.parameter_count(),
            Self::LowRank(g) => g.parameter_count(),
            Self::Collapsed(g) => g.parameter_count(),
        }
    }

    /// The form.
    pub fn representation(&self) -> Representation {
        match self {
            Self::SharedBasis(_) => Representation::SharedBasis,
            Self::LowRank(_) => Representation::LowRank,
            Self::Collapsed(_) => Representation::Collapsed,
        }
    }

    /// Errors of the rebuilt blocks against `originals` on the calibration inputs (targets
    /// `Y_b = MLP_b(Z_b)` computed here; see [`block_errors`]).
    pub fn errors(
        &self,
        originals: &[DenseMlp<F>],
        calibration: &Calibration<F>,
    ) -> Result<BlockErrors> {
        let targets = measure::targets(originals, calibration)?;
        block_errors(&self.to_dense_mlps()?, calibration, &targets)
    }
}
