//! Hugging Face model folders: typed `config.json`, weights in one safetensors file or in shards
//! behind `model.safetensors.index.json`, and densified copies of such folders.
//!
//! [`HfFolder::open`] validates the configuration, the index and every shard header before any
//! long work; [`TensorStore`] gives the layout detection ([`crate::format::layout::MlpLayout`]) the same
//! lookups over shards as over one file; [`HfFolder::write_densified`] writes a folder that a
//! `from_pretrained` loader reads unchanged (same shard layout and index, dtypes kept, the other
//! files copied), atomically.

pub mod config;
pub mod folder;
pub mod store;

pub use crate::foundation::model_error::ModelError;
pub use config::{HfConfig, ModelFamily, TokenIds};
pub use folder::{DensifiedFolder, HfFolder};
pub use store::{ShardedCheckpoint, TensorStore};
