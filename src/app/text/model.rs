//! A Llama-family decoder (Llama, Mistral, Qwen2) run with candle, on the CPU, in `f32`.
//!
//! For token ids `x_0 … x_{T-1}` (BOS first) with embedding `E`:
//! ```text
//! h ← E[x]                                                         [T, d]
//! for each block ℓ:
//!     a ← RMSNorm(h) · g_in                 RMSNorm(v) = v / sqrt(mean(v²) + ε)
//!     q, k, v ← a W_qᵀ (+b_q), a W_kᵀ (+b_k), a W_vᵀ (+b_v)          (H, H_kv heads of width h_d)
//!     q, k ← RoPE(q), RoPE(k)               rotate-half form, θ_i = base^(−2i/h_d)
//!     h ← h + softmax(q kᵀ/√h_d + causal mask) v W_oᵀ               (key/value heads repeated H/H_kv times)
//!     z ← RMSNorm(h) · g_post               ← the block's MLP input (what capture records)
//!     h ← h + W_down (act(W_gate z) ⊙ W_up z)
//! logits ← RMSNorm(h) · g_final W_headᵀ     (W_head = E when the embeddings are tied)
//! ```
//! Mistral's sliding window, when set, also masks keys more than `window − 1` positions back.
//! Weights are read through [`crate::format::hf::TensorStore`] (positioned reads, no memory mapping) and
//! converted to `f32`; any tensor can be replaced at load time (compressed MLPs rebuilt dense).

use std::collections::BTreeMap;

use candle_core::{D, DType, Device, Tensor};
use ndarray::ArrayD;

use crate::app::text::nn::{Dense, Source, attend, check_sequence, rt, split_heads};
use crate::format::hf::{HfFolder, ModelError, ModelFamily, TensorStore};
use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};

/// One transformer block.
#[derive(Debug, Clone)]
struct Block {
    input_norm: Tensor,
    q: Dense,
    k: Dense,
    v: Dense,
    o: Dense,
    post_norm: Tensor,
    gate: Dense,
    up: Dense,
    down: Dense,
}

/// A loaded Llama-family model.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    family: ModelFamily,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    head_t: Tensor,
    cos: Tensor,
    sin: Tensor,
    eps: f32,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
    activation: Activation,
    vocab: usize,
    width: usize,
    max_positions: usize,
}

/// The checks of [`crate::app::text::text_model::check_supported`] for a Llama-family decoder
/// (before anything is loaded): default RoPE, an even head width, a known activation.
pub(crate) fn check_decoder(folder: &HfFolder) -> Result<()> {
    let unsupported = |what: String| -> FipsError {
        ModelError::Unsupported {
            dir: folder.dir().to_path_buf(),
            what,
        }
        .into()
    };
    if !matches!(
        folder.family(),
        ModelFamily::Llama | ModelFamily::Mistral | ModelFamily::Qwen2
    ) {
        return Err(unsupported(format!(
            "{} is not a Llama-family decoder",
            folder.family()
        )));
    }
    let config = folder.config();
    if let Some(scaling) = &config.rope_scaling
        && !scaling.is_null()
    {
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("?");
        if kind != "default" {
            return Err(unsupported(format!("rope_scaling of type {kind:?}")));
        }
    }
    if !config.head_width().is_multiple_of(2) {
        return Err(unsupported(format!(
            "odd head width {}",
            config.head_width()
        )));
    }
    folder.activation()?;
    Ok(())
}

impl LlamaModel {
    /// Loads the model of `folder`, with the tensors named in `replacements` taken from there
    /// instead of the weights (same names and shapes).
    pub fn load(folder: &HfFolder, replacements: &BTreeMap<String, ArrayD<f32>>) -> Result<Self> {
        check_decoder(folder)?;
        let device = Device::Cpu;
        let src = Source {
            folder,
            replacements,
            device: &device,
        };
        let config = folder.config();
        let family = folder.family();
        let d = config.hidden_size;
        let inter = config.intermediate_size;
        let heads = config.num_attention_heads;
        let kv_heads = config.key_value_heads();
        let head_dim = config.head_width();
        let prefix = if folder.tensors().contains("model.embed_tokens.weight") {
            "model."
        } else {
            ""
        };
        let embed = src.tensor(&format!("{prefix}embed_tokens.weight"))?;
        let (vocab, width) = embed.dims2().map_err(rt)?;
        if width != d {
            return Err(ModelError::ConfigMismatch {
                dir: folder.dir().to_path_buf(),
                reason: format!("the embedding is {vocab} × {width}, hidden_size is {d}"),
            }
            .into());
        }
        let blocks = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("{prefix}layers.{l}");
                Ok(Block {
                    input_norm: src.vector(&format!("{p}.input_layernorm.weight"), d)?,
                    q: src.dense(&format!("{p}.self_attn.q_proj"), heads * head_dim, d)?,
                    k: src.dense(&format!("{p}.self_attn.k_proj"), kv_heads * head_dim, d)?,
                    v: src.dense(&format!("{p}.self_attn.v_proj"), kv_heads * head_dim, d)?,
                    o: src.dense(&format!("{p}.self_attn.o_proj"), d, heads * head_dim)?,
                    post_norm: src.vector(&format!("{p}.post_attention_layernorm.weight"), d)?,
                    gate: src.dense(&format!("{p}.mlp.gate_proj"), inter, d)?,
                    up: src.dense(&format!("{p}.mlp.up_proj"), inter, d)?,
                    down: src.dense(&format!("{p}.mlp.down_proj"), d, inter)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = src.vector(&format!("{prefix}norm.weight"), d)?;
        let head = match src.optional("lm_head.weight")? {
            Some(h) => h,
            None if config.tied_embeddings(family) => embed.clone(),
            None => {
                return Err(FipsError::MissingTensor {
                    path: folder.tensors().path().to_path_buf(),
                    name: "lm_head.weight (tie_word_embeddings is false)".into(),
                });
            }
        };
        if head.dims() != [vocab, d] {
            return Err(FipsError::ShapeMismatch {
                what: "lm_head.weight".into(),
                expected: vec![vocab, d],
                got: head.dims().to_vec(),
            });
        }
        let head_t = head.t().and_then(|t| t.contiguous()).map_err(rt)?;
        let max_positions = config.max_position_embeddings.unwrap_or(4096);
        let (cos, sin) = rope_tables(config.rope_base(), head_dim, max_positions, &device)?;
        let window = match family {
            ModelFamily::Mistral => config.sliding_window,
            ModelFamily::Qwen2
                if config
                    .extra
                    .get("use_sliding_window")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false) =>
            {
                config.sliding_window
            }
            _ => None,
        };
        Ok(Self {
            family,
            embed,
            blocks,
            norm,
            head_t,
            cos,
            sin,
            eps: config.norm_eps(family) as f32,
            heads,
            kv_heads,
            head_dim,
            window,
            activation: folder.activation()?,
            vocab,
            width: d,
            max_positions,
        })
    }

    /// Number of transformer blocks.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Model width d.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Vocabulary size (rows of the embedding).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The longest sequence the position tables cover (`max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The model family.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// Runs blocks `0..=last_block` on `ids` (one sequence), handing each block's MLP input
    /// `[T, d]` to `on_mlp_input(block, z)`, and returns the final hidden state `[T, d]` (before
    /// the final norm) when every block ran.
    pub fn forward_hidden(
        &self,
        ids: &[u32],
        last_block: Option<usize>,
        on_mlp_input: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let t = ids.len();
        check_sequence(ids, self.max_positions, self.vocab)?;
        let device = self.embed.device();
        let index = Tensor::new(ids, device).map_err(rt)?;
        let mut h = self.embed.index_select(&index, 0).map_err(rt)?;
        let mask = self.mask(t, device)?;
        let cos = self.cos.narrow(0, 0, t).map_err(rt)?;
        let sin = self.sin.narrow(0, 0, t).map_err(rt)?;
        let last = last_block
            .unwrap_or(self.blocks.len() - 1)
            .min(self.blocks.len() - 1);
        for (l, block) in self.blocks.iter().enumerate().take(last + 1) {
            let a = candle_nn::ops::rms_norm(&h, &block.input_norm, self.eps).map_err(rt)?;
            let attended = self.attention(block, &a, &mask, &cos, &sin, t)?;
            h = (h + attended).map_err(rt)?;
            let z = candle_nn::ops::rms_norm(&h, &block.post_norm, self.eps).map_err(rt)?;
            on_mlp_input(l, &z)?;
            if l == last && last + 1 < self.blocks.len() {
                return Ok(h);
            }
            let mlp = self.mlp(block, &z)?;
            h = (h + mlp).map_err(rt)?;
        }
        Ok(h)
    }

    /// The logits `[T, vocab]` of a sequence (every position), handing each block's MLP input to
    /// `on_mlp_input`.
    pub fn forward_logits(
        &self,
        ids: &[u32],
        on_mlp_input: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(ids, None, on_mlp_input)?;
        let h = candle_nn::ops::rms_norm(&h, &self.norm, self.eps).map_err(rt)?;
        h.matmul(&self.head_t).map_err(rt)
    }

    /// Sum of `−log p(x_{t+1} | x_0..x_t)` over `t = 0..T−2` (natural log), and the number of
    /// predicted tokens `T − 1`.
    pub fn sequence_nll(&self, ids: &[u32]) -> Result<(f64, usize)> {
        if ids.len() < 2 {
            return Ok((0.0, 0));
        }
        let logits = self.forward_logits(ids, &mut |_, _| Ok(()))?;
        let t = ids.len();
        let log_probs =
            candle_nn::ops::log_softmax(&logits.narrow(0, 0, t - 1).map_err(rt)?, D::Minus1)
                .map_err(rt)?;
        let targets = Tensor::new(&ids[1..], logits.device())
            .and_then(|x| x.unsqueeze(1))
            .map_err(rt)?;
        let picked: Vec<f32> = log_probs
            .gather(&targets, 1)
            .and_then(|x| x.squeeze(1))
            .and_then(|x| x.to_vec1())
            .map_err(rt)?;
        let nll = picked.iter().map(|&lp| -f64::from(lp)).sum();
        Ok((nll, t - 1))
    }

    /// The additive attention mask `[T, T]`: 0 where key `j` may be seen from query `i`, −∞ elsewhere.
    fn mask(&self, t: usize, device: &Device) -> Result<Tensor> {
        let window = self.window.unwrap_or(usize::MAX);
        let values: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..t).map(move |j| {
                    if j > i || i - j >= window {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        Tensor::from_vec(values, (t, t), device).map_err(rt)
    }

    fn attention(
        &self,
        block: &Block,
        a: &Tensor,
        mask: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        t: usize,
    ) -> Result<Tensor> {
        let hd = self.head_dim;
        let q = split_heads(block.q.forward(a)?, t, self.heads, hd)?;
        let k = split_heads(block.k.forward(a)?, t, self.kv_heads, hd)?;
        let v = split_heads(block.v.forward(a)?, t, self.kv_heads, hd)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin).map_err(rt)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin).map_err(rt)?;
        let rep = self.heads / self.kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, rep)
            .and_then(|x| x.contiguous())
            .map_err(rt)?;
        let v = candle_transformers::utils::repeat_kv(v, rep)
            .and_then(|x| x.contiguous())
            .map_err(rt)?;
        block.o.forward(&attend(&q, &k, &v, Some(mask), t)?)
    }

    fn mlp(&self, block: &Block, z: &Tensor) -> Result<Tensor> {
        let g = block.gate.forward(z)?;
        let g = match self.activation {
            Activation::Silu => candle_nn::ops::silu(&g),
            Activation::GeluTanh => g.gelu(),
            Activation::Gelu => g.gelu_erf(),
            Activation::Relu => g.relu(),
        }
        .map_err(rt)?;
        let u = block.up.forward(z)?;
        block.down.forward(&(g * u).map_err(rt)?)
    }
}

/// `cos` and `sin` tables `[positions, h_d/2]` of θ_i = base^(−2i/h_d).
fn rope_tables(
    base: f64,
    head_dim: usize,
    positions: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / base.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for &f in &inv {
            // HF computes the angle in f32; do the same so long sequences agree.
            let angle = (p as f32) * (f as f32);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let make = |v: Vec<f32>| {
        Tensor::from_vec(v, (positions, half), device)
            .and_then(|x| x.to_dtype(DType::F32))
            .map_err(rt)
    };
    Ok((make(cos)?, make(sin)?))
}
