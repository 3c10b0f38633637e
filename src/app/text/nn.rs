//! The candle building blocks both text forward passes use: tensors read from a folder (with
//! replacements), linear layers, multi-head attention, sequence checks.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use ndarray::ArrayD;

use crate::format::hf::{HfFolder, ModelError, TensorStore};
use crate::foundation::error::{FipsError, Result};

/// Converts a candle error.
pub(crate) fn rt(e: candle_core::Error) -> FipsError {
    ModelError::Runtime(e.to_string()).into()
}

/// One linear layer, `y = x Wᵀ + b`, with `Wᵀ` stored `[in, out]`.
#[derive(Debug, Clone)]
pub(crate) struct Dense {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Dense {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight_t).map_err(rt)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b).map_err(rt),
            None => Ok(y),
        }
    }
}

/// Where the model's tensors come from: the folder, with some replaced.
pub(crate) struct Source<'a> {
    pub(crate) folder: &'a HfFolder,
    pub(crate) replacements: &'a BTreeMap<String, ArrayD<f32>>,
    pub(crate) device: &'a Device,
}

impl Source<'_> {
    pub(crate) fn tensor(&self, name: &str) -> Result<Tensor> {
        let array = match self.replacements.get(name) {
            Some(a) => a.clone(),
            None => self.folder.tensors().read::<f32>(name)?,
        };
        let shape = array.shape().to_vec();
        let (values, offset) = array.into_raw_vec_and_offset();
        if offset.unwrap_or(0) != 0 {
            return Err(ModelError::Runtime(format!("tensor {name}: unexpected layout")).into());
        }
        Tensor::from_vec(values, shape, self.device).map_err(rt)
    }

    pub(crate) fn optional(&self, name: &str) -> Result<Option<Tensor>> {
        if self.replacements.contains_key(name) || self.folder.tensors().contains(name) {
            self.tensor(name).map(Some)
        } else {
            Ok(None)
        }
    }

    pub(crate) fn dense(&self, prefix: &str, out: usize, input: usize) -> Result<Dense> {
        let w = self.tensor(&format!("{prefix}.weight"))?;
        if w.dims() != [out, input] {
            return Err(FipsError::ShapeMismatch {
                what: format!("{prefix}.weight"),
                expected: vec![out, input],
                got: w.dims().to_vec(),
            });
        }
        let bias = self.optional(&format!("{prefix}.bias"))?;
        Ok(Dense {
            weight_t: w.t().and_then(|t| t.contiguous()).map_err(rt)?,
            bias,
        })
    }

    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        let v = self.tensor(name)?;
        if v.dims() != [len] {
            return Err(FipsError::ShapeMismatch {
                what: name.into(),
                expected: vec![len],
                got: v.dims().to_vec(),
            });
        }
        Ok(v)
    }
}

/// Checks one sequence against a model's context length and vocabulary.
pub(crate) fn check_sequence(ids: &[u32], max_positions: usize, vocab: usize) -> Result<()> {
    let t = ids.len();
    if t == 0 || t > max_positions {
        return Err(FipsError::InvalidParameter {
            name: "ids",
            reason: format!("a sequence of {t} tokens (the model takes 1 to {max_positions})"),
        });
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(FipsError::IndexOutOfRange {
            what: "token id",
            index: bad as usize,
            len: vocab,
        });
    }
    Ok(())
}

/// `[T, H h_d]` → `[1, H, T, h_d]` (contiguous).
pub(crate) fn split_heads(x: Tensor, t: usize, heads: usize, hd: usize) -> Result<Tensor> {
    x.reshape((1, t, heads, hd))
        .and_then(|x| x.transpose(1, 2))
        .and_then(|x| x.contiguous())
        .map_err(rt)
}

/// `softmax(q kᵀ/√h_d + mask) v` over heads `[1, H, T, h_d]`, merged back to `[T, H h_d]`.
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    t: usize,
) -> Result<Tensor> {
    let (_, heads, _, hd) = q.dims4().map_err(rt)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut scores = q
        .matmul(&k.t().map_err(rt)?)
        .and_then(|s| s * scale)
        .map_err(rt)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask).map_err(rt)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores).map_err(rt)?;
    probs
        .matmul(v)
        .and_then(|x| x.transpose(1, 2))
        .and_then(|x| x.reshape((t, heads * hd)))
        .map_err(rt)
}
