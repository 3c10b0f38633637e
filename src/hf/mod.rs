//! Hugging Face model folders: typed `config.json`, weights in one safetensors file or in shards
//! behind `model.safetensors.index.json`, and densified copies of such folders.
//!
//! [`HfFolder::open`] validates the configuration, the index and every shard header before any
//! long work; [`TensorStore`] gives the layout detection ([`crate::layout::MlpLayout`]) the same
//! lookups over shards as over one file; [`HfFolder::write_densified`] writes a folder that a
//! `from_pretrained` loader reads unchanged (same shard layout and index, dtypes kept, the other
//! files copied), atomically.

pub mod config;
pub mod error;
pub mod folder;
pub mod store;

pub use config::{HfConfig, ModelFamily, TokenIds};
pub use error::ModelError;
pub use folder::{DensifiedFolder, HfFolder};
pub use store::{ShardedCheckpoint, TensorStore};
