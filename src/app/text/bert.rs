//! A BERT-style encoder (BERT, RoBERTa, XLM-RoBERTa) run with candle, on the CPU, in `f32`.
//!
//! For token ids `x_0 … x_{T-1}` of one unpadded sequence (the tokenizer's own `[CLS] … [SEP]` or
//! `<s> … </s>`):
//! ```text
//! h ← LayerNorm(E_word[x] + E_pos[o + t] + E_type[0])              [T, d]   o = 0 (BERT), pad + 1 (RoBERTa)
//! for each block ℓ:
//!     a ← softmax(q kᵀ/√h_d) v W_oᵀ + b_o      q, k, v ← h W_{q,k,v}ᵀ + b   (bidirectional, no mask)
//!     z ← LayerNorm(h + a)                      ← the block's MLP input (what capture records)
//!     h ← LayerNorm(z + act(z W_1ᵀ + b_1) W_2ᵀ + b_2)
//! ```
//! Post-norm blocks: unlike a Llama block, the MLP's output is normalised with its residual, so
//! the MLP itself (`W_1`, act, `W_2`, biases) is exactly what FiPS compresses and `z` its input.
//! An encoder predicts no next token: it has no perplexity (its models are scored by their tasks).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use ndarray::ArrayD;

use crate::app::text::nn::{Dense, Source, attend, check_sequence, rt, split_heads};
use crate::format::hf::{HfFolder, ModelError, ModelFamily};
use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};

/// Weight and bias of a LayerNorm.
#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn forward(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        candle_nn::ops::layer_norm(x, &self.weight, &self.bias, eps).map_err(rt)
    }
}

/// One post-norm encoder block.
#[derive(Debug, Clone)]
struct EncoderBlock {
    q: Dense,
    k: Dense,
    v: Dense,
    o: Dense,
    attention_norm: Norm,
    fc1: Dense,
    fc2: Dense,
    output_norm: Norm,
}

/// A loaded BERT-style encoder.
#[derive(Debug, Clone)]
pub struct BertModel {
    word: Tensor,
    positions: Tensor,
    token_type: Option<Tensor>,
    embedding_norm: Norm,
    blocks: Vec<EncoderBlock>,
    eps: f32,
    heads: usize,
    head_dim: usize,
    activation: Activation,
    position_offset: usize,
    vocab: usize,
    width: usize,
    max_positions: usize,
}

/// The checks of [`crate::app::text::text_model::check_supported`] for an encoder: absolute position
/// embeddings, a width the heads divide.
pub(crate) fn check_encoder(folder: &HfFolder) -> Result<()> {
    let config = folder.config();
    let unsupported = |what: String| -> FipsError {
        ModelError::Unsupported {
            dir: folder.dir().to_path_buf(),
            what,
        }
        .into()
    };
    if let Some(kind) = config
        .extra
        .get("position_embedding_type")
        .and_then(|v| v.as_str())
        && kind != "absolute"
    {
        return Err(unsupported(format!("position_embedding_type {kind:?}")));
    }
    if config.num_attention_heads == 0
        || !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
    {
        return Err(unsupported(format!(
            "{} attention heads for a width of {}",
            config.num_attention_heads, config.hidden_size
        )));
    }
    folder.activation()?;
    Ok(())
}

/// The first position id: RoBERTa-style models count positions from `pad_token_id + 1`.
fn position_offset(folder: &HfFolder) -> usize {
    let config = folder.config();
    let roberta = config
        .model_type
        .as_deref()
        .is_some_and(|t| t.contains("roberta"))
        || config
            .architectures
            .iter()
            .any(|a| a.to_ascii_lowercase().contains("roberta"));
    if roberta {
        config
            .extra
            .get("pad_token_id")
            .and_then(|v| v.as_u64())
            .map_or(2, |pad| pad as usize + 1)
    } else {
        0
    }
}

impl BertModel {
    /// Loads the encoder of `folder`, with the tensors named in `replacements` taken from there
    /// instead of the weights (same names and shapes).
    pub fn load(folder: &HfFolder, replacements: &BTreeMap<String, ArrayD<f32>>) -> Result<Self> {
        if folder.family() != ModelFamily::Bert {
            return Err(ModelError::Unsupported {
                dir: folder.dir().to_path_buf(),
                what: format!("{} is not a BERT-style encoder", folder.family()),
            }
            .into());
        }
        check_encoder(folder)?;
        let device = Device::Cpu;
        let src = Source {
            folder,
            replacements,
            device: &device,
        };
        let config = folder.config();
        let d = config.hidden_size;
        let inter = config.intermediate_size;
        let heads = config.num_attention_heads;
        let layout = folder.mlp_layout()?;
        let prefix = layout.prefix().to_string();
        let e = format!("{prefix}embeddings");
        let word = src.tensor(&format!("{e}.word_embeddings.weight"))?;
        let (vocab, width) = word.dims2().map_err(rt)?;
        if width != d {
            return Err(ModelError::ConfigMismatch {
                dir: folder.dir().to_path_buf(),
                reason: format!("the embedding is {vocab} × {width}, hidden_size is {d}"),
            }
            .into());
        }
        let positions = src.tensor(&format!("{e}.position_embeddings.weight"))?;
        let (rows, pos_width) = positions.dims2().map_err(rt)?;
        let offset = position_offset(folder);
        if pos_width != d || rows <= offset {
            return Err(FipsError::ShapeMismatch {
                what: format!("{e}.position_embeddings.weight"),
                expected: vec![
                    config
                        .max_position_embeddings
                        .unwrap_or(rows)
                        .max(offset + 1),
                    d,
                ],
                got: vec![rows, pos_width],
            });
        }
        let token_type = src
            .optional(&format!("{e}.token_type_embeddings.weight"))?
            .map(|t| {
                if t.dims().len() != 2 || t.dims()[1] != d || t.dims()[0] == 0 {
                    return Err(FipsError::ShapeMismatch {
                        what: format!("{e}.token_type_embeddings.weight"),
                        expected: vec![2, d],
                        got: t.dims().to_vec(),
                    });
                }
                t.get(0).map_err(rt)
            })
            .transpose()?;
        let norm = |name: &str| -> Result<Norm> {
            Ok(Norm {
                weight: src.vector(&format!("{name}.weight"), d)?,
                bias: src.vector(&format!("{name}.bias"), d)?,
            })
        };
        let embedding_norm = norm(&format!("{e}.LayerNorm"))?;
        let blocks = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("{prefix}encoder.layer.{l}");
                Ok(EncoderBlock {
                    q: src.dense(&format!("{p}.attention.self.query"), d, d)?,
                    k: src.dense(&format!("{p}.attention.self.key"), d, d)?,
                    v: src.dense(&format!("{p}.attention.self.value"), d, d)?,
                    o: src.dense(&format!("{p}.attention.output.dense"), d, d)?,
                    attention_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    fc1: src.dense(&format!("{p}.intermediate.dense"), inter, d)?,
                    fc2: src.dense(&format!("{p}.output.dense"), d, inter)?,
                    output_norm: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word,
            positions,
            token_type,
            embedding_norm,
            blocks,
            eps: config.norm_eps(ModelFamily::Bert) as f32,
            heads,
            head_dim: d / heads,
            activation: folder.activation()?,
            position_offset: offset,
            vocab,
            width: d,
            max_positions: rows - offset,
        })
    }

    /// Number of encoder blocks.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Model width d.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Vocabulary size (rows of the word embedding).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The longest sequence the position embeddings cover (less RoBERTa's offset).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Runs blocks `0..=last_block` on `ids` (one sequence), handing each block's MLP input
    /// `[T, d]` to `on_mlp_input(block, z)`, and returns the hidden state `[T, d]` after the last
    /// block run.
    pub fn forward_hidden(
        &self,
        ids: &[u32],
        last_block: Option<usize>,
        on_mlp_input: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let t = ids.len();
        check_sequence(ids, self.max_positions, self.vocab)?;
        let device = self.word.device();
        let index = Tensor::new(ids, device).map_err(rt)?;
        let mut h = self.word.index_select(&index, 0).map_err(rt)?;
        let positions = self
            .positions
            .narrow(0, self.position_offset, t)
            .map_err(rt)?;
        h = (h + positions).map_err(rt)?;
        if let Some(token_type) = &self.token_type {
            h = h.broadcast_add(token_type).map_err(rt)?;
        }
        h = self.embedding_norm.forward(&h, self.eps)?;
        let last = last_block
            .unwrap_or(self.blocks.len().saturating_sub(1))
            .min(self.blocks.len().saturating_sub(1));
        for (l, block) in self.blocks.iter().enumerate().take(last + 1) {
            let attended = self.attention(block, &h, t)?;
            let z = block
                .attention_norm
                .forward(&(h + attended).map_err(rt)?, self.eps)?;
            on_mlp_input(l, &z)?;
            let mlp = self.mlp(block, &z)?;
            h = block
                .output_norm
                .forward(&(z + mlp).map_err(rt)?, self.eps)?;
        }
        Ok(h)
    }

    fn attention(&self, block: &EncoderBlock, h: &Tensor, t: usize) -> Result<Tensor> {
        let (heads, hd) = (self.heads, self.head_dim);
        let q = split_heads(block.q.forward(h)?, t, heads, hd)?;
        let k = split_heads(block.k.forward(h)?, t, heads, hd)?;
        let v = split_heads(block.v.forward(h)?, t, heads, hd)?;
        block.o.forward(&attend(&q, &k, &v, None, t)?)
    }

    fn mlp(&self, block: &EncoderBlock, z: &Tensor) -> Result<Tensor> {
        let a = block.fc1.forward(z)?;
        let a = match self.activation {
            Activation::Gelu => a.gelu_erf(),
            Activation::GeluTanh => a.gelu(),
            Activation::Relu => a.relu(),
            Activation::Silu => candle_nn::ops::silu(&a),
        }
        .map_err(rt)?;
        block.fc2.forward(&a)
    }
}
