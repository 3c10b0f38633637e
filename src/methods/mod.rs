//! How each compressed form is MADE: the [`Compressor`] trait, the [`ParamGuard`] pattern for
//! settings, one report and one progress type, one training-loop engine, and the methods.
//!
//! Every method takes the dense MLP blocks of a group and their calibration inputs and returns
//! [`CompressedBlocks`](crate::repr::CompressedBlocks) with a [`MethodReport`]; the parameter
//! budget is part of each method's validated parameters. Methods:
//!
//! | method | settings | what is stored | training |
//! |---|---|---|---|
//! | `fips` | [`FipsParams`](fips::params::FipsParams) | shared basis `U` + sparse `V_j` per matrix | AdamW, GMP/RigL |
//! | `svd` | [`SvdParams`] | per-matrix truncated SVD `A B` | optional (same loss as FiPS) |
//! | `svd-llm` | [`SvdLlmParams`] | per-matrix whitened SVD `A B` | none |
//! | `basis-sharing` | [`BasisSharingParams`] | one whitened input basis per matrix type and group, per-matrix coefficients | none |
//! | `mixed-rank` | [`MixedRankParams`] | whitened `A B` at greedily allocated ranks + trained rank-`q` residual | residual only |
//! | `layer-collapse` | [`LayerCollapseParams`] | one linear map per block | PReLU slope to 1, then exact merge |
//!
//! Methods that need no training never run a training loop; those that train share
//! one training loop (the crate-internal `engine` module).

pub mod basis_sharing;
pub mod compressor;
pub(crate) mod engine;
pub mod fips;
pub mod guard;
pub mod layer_collapse;
pub mod mixed_rank;
pub mod options;
pub mod params;
pub mod report;
pub mod svd;
pub mod svd_llm;

pub use compressor::{Compressor, MethodOutput};
pub use guard::ParamGuard;
pub use params::{
    BasisSharingParams, BasisSharingValidParams, EnergyMeasure, LayerCollapseParams,
    LayerCollapseValidParams, MethodParams, MixedRankParams, MixedRankValidParams, SvdLlmParams,
    SvdLlmValidParams, SvdParams, SvdValidParams,
};
pub use report::{Method, MethodDetails, MethodReport, Progress, ValidationReport};
