//! `config.json` of a Hugging Face model folder, as a typed value.
//!
//! Only the fields this crate uses are typed; every other field is kept in
//! [`HfConfig::extra`]. Defaults follow the `transformers` config classes of each family where a
//! field is absent (for example `tie_word_embeddings` is `false` for Llama, Mistral and Qwen2 and
//! `true` for Gemma and BERT; `rope_theta` is 10000).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::model_error::ModelError;

/// The model families whose folders this crate understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ModelFamily {
    /// Llama (`LlamaForCausalLM`): gated SiLU MLP, RMSNorm, RoPE, grouped-query attention.
    Llama,
    /// Mistral (`MistralForCausalLM`): as Llama, with an optional sliding attention window.
    Mistral,
    /// Qwen2 (`Qwen2ForCausalLM`): as Llama, with biases on the query, key and value projections.
    Qwen2,
    /// Gemma 1/2/3 (`Gemma*ForCausalLM`): gated tanh-GELU MLP (MLP layout only; no text forward).
    Gemma,
    /// BERT-style encoders (`Bert*`, `Roberta*`, `XLMRoberta*`): post-norm GELU MLP; text forward
    /// (capture), no perplexity.
    Bert,
    /// Vision transformers (`ViT*`, `DeiT*`) (MLP layout only).
    Vit,
}

/// The architectures [`ModelFamily::detect`] accepts, for error messages.
pub const SUPPORTED_ARCHITECTURES: &str =
    "Llama, Mistral, Qwen2, Gemma (1/2/3), BERT/RoBERTa, ViT/DeiT";

impl ModelFamily {
    /// The family of an architecture class name (`LlamaForCausalLM`) or `model_type` (`llama`).
    pub fn from_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        let starts = |p: &str| lower.starts_with(p);
        if starts("llama") {
            Some(Self::Llama)
        } else if starts("mistral") {
            Some(Self::Mistral)
        } else if starts("qwen2")
            && !starts("qwen2moe")
            && !starts("qwen2_moe")
            && !starts("qwen2vl")
            && !starts("qwen2_vl")
        {
            Some(Self::Qwen2)
        } else if starts("gemma") {
            Some(Self::Gemma)
        } else if starts("bert")
            || starts("roberta")
            || starts("xlmroberta")
            || starts("xlm-roberta")
        {
            Some(Self::Bert)
        } else if starts("vit") || starts("deit") {
            Some(Self::Vit)
        } else {
            None
        }
    }

    /// The family of a config: its first `architectures` entry, else its `model_type`.
    pub fn detect(config: &HfConfig) -> std::result::Result<Self, String> {
        let named = config
            .architectures
            .first()
            .cloned()
            .or_else(|| config.model_type.clone());
        match named {
            Some(n) => Self::from_name(&n).ok_or(n),
            None => Err("(none: config.json has neither architectures nor model_type)".into()),
        }
    }

    /// Whether the family's MLP is gated (`down(act(gate x) ⊙ up x)`).
    pub fn is_gated(self) -> bool {
        matches!(
            self,
            Self::Llama | Self::Mistral | Self::Qwen2 | Self::Gemma
        )
    }

    /// Whether this crate has a text forward pass for the family (capture; perplexity for the
    /// decoders).
    pub fn has_text_forward(self) -> bool {
        matches!(self, Self::Llama | Self::Mistral | Self::Qwen2 | Self::Bert)
    }

    /// `tie_word_embeddings` when `config.json` does not say.
    fn default_tied(self) -> bool {
        matches!(self, Self::Gemma | Self::Bert)
    }
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Llama => "Llama",
            Self::Mistral => "Mistral",
            Self::Qwen2 => "Qwen2",
            Self::Gemma => "Gemma",
            Self::Bert => "BERT",
            Self::Vit => "ViT",
        })
    }
}

/// A token id field, which `config.json` may give as a number, a list (several EOS ids) or null.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The first id.
    pub fn first(&self) -> Option<u32> {
        match self {
            Self::One(id) => Some(*id),
            Self::Many(ids) => ids.first().copied(),
        }
    }
}

/// The typed fields of `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HfConfig {
    /// Model class names (`["LlamaForCausalLM"]`).
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `model_type` (`llama`, `bert`, …).
    #[serde(default)]
    pub model_type: Option<String>,
    /// Model width d.
    pub hidden_size: usize,
    /// MLP width I.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); absent means as many as query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; absent means `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Vocabulary size (rows of the embedding).
    #[serde(default)]
    pub vocab_size: Option<usize>,
    /// Longest sequence the position encoding was trained for.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// RMSNorm epsilon (Llama family).
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    /// LayerNorm epsilon (BERT, ViT).
    #[serde(default)]
    pub layer_norm_eps: Option<f64>,
    /// RoPE base θ.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (Llama 3 style and others); kept as given.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// The MLP activation's name (`silu`, `gelu`, …).
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Gemma's name for the MLP activation.
    #[serde(default)]
    pub hidden_activation: Option<String>,
    /// Whether the output head shares the embedding's weights.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Biases on the attention projections (Llama's `attention_bias`).
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Biases on the MLP projections (Llama's `mlp_bias`).
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    /// Mistral's attention window.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence token id(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// The dtype the weights were saved in (`float32`, `bfloat16`, …).
    #[serde(default)]
    pub torch_dtype: Option<String>,
    /// Every other field, unchanged.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl HfConfig {
    /// Parses `config.json` text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let config: Self = serde_json::from_str(text).map_err(|e| FipsError::Format {
            path: path.to_path_buf(),
            reason: format!("unreadable config.json: {e}"),
        })?;
        let bad = |reason: String| FipsError::Format {
            path: path.to_path_buf(),
            reason,
        };
        if config.hidden_size == 0 || config.intermediate_size == 0 || config.num_hidden_layers == 0
        {
            return Err(bad(format!(
                "hidden_size {}, intermediate_size {} and num_hidden_layers {} must be positive",
                config.hidden_size, config.intermediate_size, config.num_hidden_layers
            )));
        }
        let heads = config.num_attention_heads;
        let kv = config.key_value_heads();
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(bad(format!(
                "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv}"
            )));
        }
        if config.head_dim.is_none() && !config.hidden_size.is_multiple_of(heads) {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {heads} and head_dim is absent",
                config.hidden_size
            )));
        }
        Ok(config)
    }

    /// Reads and parses a `config.json` file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| FipsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Number of key/value heads.
    pub fn key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_width(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The normalisation epsilon (`rms_norm_eps`, else `layer_norm_eps`, else 1e-6 for RMSNorm
    /// families and 1e-12 for BERT).
    pub fn norm_eps(&self, family: ModelFamily) -> f64 {
        self.rms_norm_eps
            .or(self.layer_norm_eps)
            .unwrap_or(match family {
                ModelFamily::Bert => 1e-12,
                ModelFamily::Vit => 1e-12,
                _ => 1e-6,
            })
    }

    /// RoPE θ (default 10000).
    pub fn rope_base(&self) -> f64 {
        self.rope_theta.unwrap_or(10_000.0)
    }

    /// Whether the output head is the embedding matrix.
    pub fn tied_embeddings(&self, family: ModelFamily) -> bool {
        self.tie_word_embeddings
            .unwrap_or_else(|| family.default_tied())
    }

    /// The MLP activation named by `hidden_act` (or Gemma's `hidden_activation`), or the family's
    /// default when absent. Errors on a name this crate has no activation for.
    pub fn activation(&self, family: ModelFamily) -> Result<Activation> {
        let name = self
            .hidden_activation
            .as_deref()
            .or(self.hidden_act.as_deref());
        match name {
            Some(n) => n.parse(),
            None => Ok(match family {
                ModelFamily::Llama | ModelFamily::Mistral | ModelFamily::Qwen2 => Activation::Silu,
                ModelFamily::Gemma => Activation::GeluTanh,
                ModelFamily::Bert | ModelFamily::Vit => Activation::Gelu,
            }),
        }
    }

    /// The BOS token id, if the config gives one.
    pub fn bos(&self) -> Option<u32> {
        self.bos_token_id.as_ref().and_then(TokenIds::first)
    }
}

/// An [`ModelError::UnknownArchitecture`] for `dir`.
pub(crate) fn unknown_architecture(dir: &Path, found: String) -> FipsError {
    ModelError::UnknownArchitecture {
        dir: dir.to_path_buf(),
        found,
        supported: SUPPORTED_ARCHITECTURES,
    }
    .into()
}
