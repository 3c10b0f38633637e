//! Foundation: what every other room builds on — the float trait, the error type, activations,
//! dense MLP blocks, row-split kernels and BLAS thread settings. Imports nothing else of the crate.

pub mod activation;
pub mod blas;
pub mod error;
pub mod fingerprint;
pub mod float;
pub(crate) mod kernels;
pub mod mlp;
pub mod model_error;
pub mod output_set;
pub mod safe_io;
pub(crate) mod slicing;
pub mod thread_plan;
