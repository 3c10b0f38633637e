//! Errors specific to model folders and text data.

use std::path::PathBuf;

use thiserror::Error;

/// What can be wrong with a Hugging Face model folder or with the text fed to a language model.
///
/// Every one of these is detected before any long work starts (only headers, `config.json` and
/// the tokenizer are read) and before anything is written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The folder has no `config.json`.
    #[error(
        "{dir}: not a Hugging Face model folder: no config.json (expected config.json beside \
         model.safetensors or model.safetensors.index.json)"
    )]
    MissingConfig {
        /// The folder.
        dir: PathBuf,
    },

    /// `config.json` names an architecture this crate does not know.
    #[error("{dir}: unknown architecture {found:?} in config.json (supported: {supported})")]
    UnknownArchitecture {
        /// The folder.
        dir: PathBuf,
        /// What `architectures` / `model_type` say.
        found: String,
        /// The architectures this operation supports.
        supported: &'static str,
    },

    /// The folder holds no safetensors weights.
    #[error(
        "{dir}: no model.safetensors or model.safetensors.index.json{hint} (files seen: {seen})"
    )]
    MissingWeights {
        /// The folder.
        dir: PathBuf,
        /// Advice, e.g. about PyTorch `.bin` weights.
        hint: String,
        /// The file names that were seen.
        seen: String,
    },

    /// The shard index names a shard file that is not in the folder.
    #[error("{index}: shard {shard:?} is listed in the weight map but missing from the folder")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The missing shard's file name.
        shard: String,
    },

    /// The shard index maps a tensor to a shard whose header does not hold it.
    #[error(
        "{index}: the weight map puts tensor {tensor:?} in {shard:?}, which has no such tensor"
    )]
    IndexMissingTensor {
        /// The index file.
        index: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The shard file it is mapped to.
        shard: String,
    },

    /// `config.json` and the weights disagree (sizes, layer count).
    #[error("{dir}: config.json and the weights disagree: {reason}")]
    ConfigMismatch {
        /// The folder.
        dir: PathBuf,
        /// What differs.
        reason: String,
    },

    /// The destination of a folder to write already exists.
    #[error("{path}: already exists (remove it or ask for overwriting)")]
    DestinationExists {
        /// The destination.
        path: PathBuf,
    },

    /// The tokenizer cannot be loaded, or does not fit the model.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The tokenizer produces token ids the model's embedding has no row for.
    #[error(
        "{path}: the tokenizer has {tokenizer_vocab} tokens but the model's vocabulary has only \
         {model_vocab} (wrong tokenizer for this model?)"
    )]
    VocabularyMismatch {
        /// The tokenizer file.
        path: PathBuf,
        /// Vocabulary size of the tokenizer (special tokens included).
        tokenizer_vocab: usize,
        /// Vocabulary size of the model (`vocab_size`, rows of the embedding).
        model_vocab: usize,
    },

    /// The text holds no paragraph (or no token).
    #[error("{path}: the text is empty (no paragraph with a token)")]
    EmptyText {
        /// The text file.
        path: PathBuf,
    },

    /// The text has fewer tokens than the budget asks for.
    #[error(
        "{path}: the text has {available} tokens (BOS included), fewer than the budget of {budget}"
    )]
    TextTooShort {
        /// The text file.
        path: PathBuf,
        /// Tokens available.
        available: usize,
        /// Tokens asked for.
        budget: usize,
    },

    /// The folder uses a feature the operation does not support (a RoPE scaling, an architecture
    /// without a text forward pass, …).
    #[error("{dir}: not supported: {what}")]
    Unsupported {
        /// The folder.
        dir: PathBuf,
        /// What is not supported.
        what: String,
    },

    /// The model runtime (candle) failed.
    #[error("model runtime: {0}")]
    Runtime(String),
}
