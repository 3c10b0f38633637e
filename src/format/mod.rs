//! Files: safetensors checkpoints (read and atomic write), MLP layout detection, block groups,
//! MLP-input files and the compressed-model file. Imports foundation, math and repr; knows nothing
//! of how a compressed form is made.

pub mod block_groups;
pub mod checkpoint;
pub mod compact_file;
pub mod compressed;
pub mod hf;
pub mod layout;
pub mod mlp_input_writer;
pub mod mlp_inputs;
