//! # fips — Fine-grained Parameter Sharing for transformer MLPs
//!
//! FiPS compresses the MLP blocks of a transformer group by group. The MLP weights of `n`
//! consecutive blocks (width `d`, MLP width `I`, `f` matrices per block) are oriented to `d × I`
//! and concatenated, `M = [W_1 | … | W_fn]`, then factorised into one dense **shared basis** `U`
//! (`d × r`) and a **sparse factor** `V_j` (`r × I`) per matrix, `W_j ≈ U V_j`. The factors start
//! from a truncated SVD of `M` and are trained with AdamW to reproduce every block's MLP output on
//! calibration activations, while GMP or RigL sparsifies `V` to the target.
//!
//! ```no_run
//! use fips::{Activation, Calibration, DenseMlp, FipsParams, Linear};
//! use ndarray::Array2;
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
//! let compressor = FipsParams::new().sparsity(0.75).steps(300).build()?;
//! let out = compressor.compress(&blocks, &calibration)?;
//! println!("{}", out.report);
//! let fc1 = out.group.dense_weight(0, 0)?; // [I, d], ready to write back
//! # Ok(()) }
//! ```
//!
//! The numerical work runs through BLAS/LAPACK (`ndarray` with its `blas` feature and
//! `ndarray-linalg`); choose the backend with this crate's features (`openblas-system` by default).
//! See `docs/design.md` for the math.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod activation;
pub mod activations;
#[cfg(feature = "images")]
pub mod augment;
pub mod budget;
pub mod calibration;
pub mod checkpoint;
pub mod compressor;
pub mod error;
pub mod eval;
pub mod export;
pub mod factors;
pub mod float;
pub mod group;
pub mod groups;
#[cfg(feature = "images")]
pub mod imagenet;
pub mod init;
mod kernels;
pub mod layout;
pub mod methods;
pub mod mlp;
pub mod objective;
pub mod optim;
pub mod params;
pub mod pipeline;
pub mod sparsity;
pub mod svg;
pub mod thread_plan;
pub mod validation;
pub mod vit;

pub use activation::Activation;
pub use budget::{
    Budget, GroupShape, ParameterCount, nonzeros_for_sparsity, rank_for_budget, rank_for_matrix,
};
pub use calibration::Calibration;
pub use compressor::{FipsCompressor, FipsOutput, FipsTrainer, GroupReport, Progress};
pub use error::{FipsError, Result};
pub use factors::{SharedBasis, SparseFactor};
pub use float::Float;
pub use group::CompressedGroup;
pub use init::{InitMethod, SharedInit, shared_init};
pub use layout::{BlockTensors, MlpLayout, NamingScheme};
pub use mlp::{DenseMlp, Linear, MatrixRole, MlpKind};
pub use objective::{ContractionOrder, StepShape};
pub use optim::AdamW;
pub use params::{FipsParams, FipsValidParams};
pub use sparsity::{GmpSchedule, RiglSchedule, Sparsifier};

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
