//! A language model of any family the text path runs: a Llama-family decoder
//! ([`LlamaModel`]) or a BERT-style encoder ([`BertModel`]). Capture runs either; perplexity
//! needs a decoder.

use std::collections::BTreeMap;

use candle_core::Tensor;
use ndarray::ArrayD;

use crate::app::text::bert::{BertModel, check_encoder};
use crate::app::text::model::{LlamaModel, check_decoder};
use crate::format::hf::{HfFolder, ModelError, ModelFamily};
use crate::foundation::error::Result;

/// A loaded text model.
#[derive(Debug, Clone)]
pub enum TextModel {
    /// A causal decoder (Llama, Mistral, Qwen2).
    Decoder(LlamaModel),
    /// A bidirectional encoder (BERT, RoBERTa).
    Encoder(BertModel),
}

impl TextModel {
    /// Loads the model of `folder` (its family decides which), with the tensors named in
    /// `replacements` taken from there instead of the weights.
    pub fn load(folder: &HfFolder, replacements: &BTreeMap<String, ArrayD<f32>>) -> Result<Self> {
        match folder.family() {
            ModelFamily::Bert => BertModel::load(folder, replacements).map(Self::Encoder),
            _ => LlamaModel::load(folder, replacements).map(Self::Decoder),
        }
    }

    /// The decoder, or [`ModelError::Unsupported`] for an encoder (no next-token prediction,
    /// hence no perplexity).
    pub fn causal(&self, folder: &HfFolder) -> Result<&LlamaModel> {
        match self {
            Self::Decoder(m) => Ok(m),
            Self::Encoder(_) => Err(not_causal(folder)),
        }
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        match self {
            Self::Decoder(m) => m.blocks(),
            Self::Encoder(m) => m.blocks(),
        }
    }

    /// Model width d.
    pub fn width(&self) -> usize {
        match self {
            Self::Decoder(m) => m.width(),
            Self::Encoder(m) => m.width(),
        }
    }

    /// The longest sequence the model takes.
    pub fn max_positions(&self) -> usize {
        match self {
            Self::Decoder(m) => m.max_positions(),
            Self::Encoder(m) => m.max_positions(),
        }
    }

    /// Runs blocks `0..=last_block` on one sequence, handing each block's MLP input `[T, d]` to
    /// `on_mlp_input`; see [`LlamaModel::forward_hidden`] and [`BertModel::forward_hidden`].
    pub fn forward_hidden(
        &self,
        ids: &[u32],
        last_block: Option<usize>,
        on_mlp_input: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        match self {
            Self::Decoder(m) => m.forward_hidden(ids, last_block, on_mlp_input),
            Self::Encoder(m) => m.forward_hidden(ids, last_block, on_mlp_input),
        }
    }
}

/// Checks that the folder is a model a text forward pass runs (before anything is loaded): a
/// Llama-family decoder or a BERT-style encoder, with the settings that pass supports.
pub fn check_supported(folder: &HfFolder) -> Result<()> {
    match folder.family() {
        ModelFamily::Llama | ModelFamily::Mistral | ModelFamily::Qwen2 => check_decoder(folder),
        ModelFamily::Bert => check_encoder(folder),
        other => Err(ModelError::Unsupported {
            dir: folder.dir().to_path_buf(),
            what: format!(
                "the text forward pass runs Llama, Mistral and Qwen2 decoders and BERT-style \
                 encoders, not {other}"
            ),
        }
        .into()),
    }
}

/// Whether the folder's model predicts the next token (has a perplexity).
pub fn is_causal(folder: &HfFolder) -> bool {
    folder.family() != ModelFamily::Bert
}

/// The error for asking an encoder's perplexity.
pub(crate) fn not_causal(folder: &HfFolder) -> crate::foundation::error::FipsError {
    ModelError::Unsupported {
        dir: folder.dir().to_path_buf(),
        what: format!(
            "perplexity of a {} encoder: it predicts no next token (score it on its task instead)",
            folder.family()
        ),
    }
    .into()
}
