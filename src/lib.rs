//! # fips — Fine-grained Parameter Sharing for transformer MLPs
//!
//! FiPS compresses the MLP blocks of a transformer group by group. The MLP weights of `n`
//! consecutive blocks (width `d`, MLP width `I`, `f` matrices per block) are oriented to `d × I`
//! and concatenated, `M = [W_1 | … | W_fn]`, then factorised into one dense **shared basis** `U`
//! (`d × r`) and a **sparse factor** `V_j` (`r × I`) per matrix, `W_j ≈ U V_j`. The factors start
//! from a truncated SVD of `M` and are trained with AdamW to reproduce every block's MLP output on
//! calibration activations, while GMP or RigL sparsifies `V` to the target.
//!
//! The package is `fips-compress` on crates.io (`cargo add fips-compress`); the library is `fips`.
//!
//! ```no_run
//! use fips::{Activation, Calibration, DenseMlp, FipsParams, Linear, ParamGuard};
//! use fips::ndarray::Array2;
//! # fn main() -> Result<(), fips::FipsError> {
//! # let (d, i) = (192, 768);
//! // The original blocks (weights in PyTorch [out, in] layout) and their MLP inputs.
//! let blocks: Vec<DenseMlp<f32>> = (0..4)
//!     .map(|_| DenseMlp::standard(
//!         Linear::new(Array2::zeros((i, d)), None)?,
//!         Linear::new(Array2::zeros((d, i)), None)?,
//!         Activation::Gelu,
//!     ))
//!     .collect::<Result<_, _>>()?;
//! let calibration = Calibration::gaussian(4, 8192, d, 0)?;
//! let compressor = FipsParams::new().sparsity(0.75).steps(300).check()?;
//! let out = compressor.compress(&blocks, &calibration)?;
//! println!("{}", out.report);
//! let fc1 = out.group.dense_weight(0, 0)?; // [I, d], ready to write back
//! # Ok(()) }
//! ```
//!
//! ## Rooms
//!
//! The modules are layered; a module imports only from its own room or the rooms below it
//! (`docs/design.md` §0, checked by `tests/layers.rs`):
//!
//! | room | what |
//! |---|---|
//! | [`app`] (feature `app`) | pipeline over a checkpoint, ViT forward, image sets, metrics, plots, run reports |
//! | [`methods`] | how each compressed form is made: [`Compressor`], [`ParamGuard`], reports, the training engine |
//! | [`format`](mod@format) | files: checkpoints, layouts, block groups, MLP-input files, the compressed-model file |
//! | [`repr`] | what a compressed group is: [`CompressedBlocks`] and its three forms |
//! | [`math`] | objective and gradients, AdamW, sparsity schedules, initialisation, budgets, whitening |
//! | [`foundation`] | float trait, errors, activations, dense MLP blocks, BLAS threads |
//!
//! The numerical work runs through BLAS/LAPACK (`ndarray` with its `blas` feature and
//! `ndarray-linalg`); choose the backend with this crate's features (`openblas-system` by default).
//! See `docs/design.md` for the math.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(not(any(
    feature = "openblas-system",
    feature = "openblas-static",
    feature = "netlib-system",
    feature = "netlib-static",
    feature = "intel-mkl-system",
    feature = "intel-mkl-static",
    docsrs
)))]
compile_error!(
    "fips needs a LAPACK/BLAS backend: enable exactly one of the features openblas-system \
     (the default), openblas-static, netlib-system, netlib-static, intel-mkl-system or \
     intel-mkl-static"
);

#[cfg(feature = "app")]
#[cfg_attr(docsrs, doc(cfg(feature = "app")))]
pub mod app;
pub mod format;
pub mod foundation;
pub mod math;
pub mod methods;
pub mod repr;

pub use ndarray;
pub use safetensors;
pub use serde_json;
pub use sprs;

pub use format::block_groups::BlockGroups;
pub use format::checkpoint::Checkpoint;
pub use format::compressed::{CompressedModel, Manifest};
pub use format::layout::{BlockTensors, MlpLayout, NamingScheme};
pub use foundation::activation::Activation;
pub use foundation::error::{FipsError, Result};
pub use foundation::float::Float;
pub use foundation::mlp::{DenseMlp, Linear, MatrixRole, MlpKind};
pub use math::budget::{
    Budget, GroupShape, ParameterCount, nonzeros_for_sparsity, rank_for_budget, rank_for_matrix,
};
pub use math::calibration::{Calibration, CalibrationReader};
pub use math::init::{InitMethod, SharedInit, shared_init};
pub use math::objective::{ContractionOrder, StepShape};
pub use math::optim::AdamW;
pub use math::sparsity::{GmpSchedule, RiglSchedule, Sparsifier};
pub use math::tiles::MaskTiles;
pub use math::validation::{EarlyStopping, ValidationSet};
pub use methods::fips::params::{FipsParams, FipsValidParams};
pub use methods::fips::trainer::{FipsOutput, FipsTrainer};
pub use methods::{
    Compressor, Method, MethodParams, MethodReport, ParamGuard, Progress, ValidationReport,
};
pub use repr::shared_basis::CompressedGroup;
pub use repr::{CompressedBlocks, SharedBasis, SharedBasisGroup, SparseFactor};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
