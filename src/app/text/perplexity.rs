//! Perplexity of a causal language model on a text.
//!
//! Every paragraph is scored on its own with BOS prepended: with `n_p` tokens after BOS, the
//! model predicts tokens `1..=n_p` of paragraph `p` from their prefixes, and
//! ```text
//! mean NLL = Σ_p Σ_{t=1}^{n_p} −ln p(x_t | x_0..x_{t−1}) / Σ_p n_p,      perplexity = exp(mean NLL).
//! ```
//! Paragraphs longer than the model's context are cut to it (and counted).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use ndarray::ArrayD;

use crate::app::text::model::LlamaModel;
use crate::app::text::text_model::{check_supported, is_causal, not_causal};
use crate::app::text::tokenize::{TextTokenizer, read_paragraph_tokens};
use crate::format::hf::HfFolder;
use crate::foundation::error::Result;

/// A perplexity measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// Paragraphs scored.
    pub paragraphs: usize,
    /// Tokens predicted (BOS is never predicted).
    pub predicted_tokens: usize,
    /// Sum of the negative log-likelihoods, nats.
    pub total_nll: f64,
    /// Paragraphs cut to the context length.
    pub truncated: usize,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl Perplexity {
    /// Mean negative log-likelihood per predicted token, nats.
    pub fn mean_nll(&self) -> f64 {
        self.total_nll / self.predicted_tokens.max(1) as f64
    }

    /// `exp(mean NLL)`.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// Scores tokenised paragraphs (BOS first) with a loaded model; `progress(done, total)` after each.
pub fn perplexity_of_paragraphs(
    model: &LlamaModel,
    paragraphs: &[Vec<u32>],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    let start = Instant::now();
    let context = model.max_positions();
    let mut out = Perplexity {
        paragraphs: 0,
        predicted_tokens: 0,
        total_nll: 0.0,
        truncated: 0,
        seconds: 0.0,
    };
    for (k, ids) in paragraphs.iter().enumerate() {
        if ids.len() > context {
            out.truncated += 1;
        }
        let (nll, n) = model.sequence_nll(&ids[..ids.len().min(context)])?;
        out.total_nll += nll;
        out.predicted_tokens += n;
        out.paragraphs += 1;
        progress(k + 1, paragraphs.len());
    }
    out.seconds = start.elapsed().as_secs_f64();
    Ok(out)
}

/// The perplexity of the model in `model_dir` on `text_file`, with the tensors named in
/// `replacements` (for example a compressed model's dense rebuilds,
/// [`crate::format::compressed::CompressedModel::dense_tensors`]) used instead of the folder's. A densified
/// folder is scored by passing its directory and no replacements.
///
/// The folder, the tokenizer and the text are checked before the model is loaded.
pub fn perplexity(
    model_dir: impl AsRef<Path>,
    text_file: impl AsRef<Path>,
    replacements: &BTreeMap<String, ArrayD<f32>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    let folder = HfFolder::open(model_dir)?;
    check_supported(&folder)?;
    if !is_causal(&folder) {
        return Err(not_causal(&folder));
    }
    let tokenizer = TextTokenizer::for_model(&folder)?;
    let paragraphs = read_paragraph_tokens(&tokenizer, text_file.as_ref())?;
    let model = LlamaModel::load(&folder, replacements)?;
    perplexity_of_paragraphs(&model, &paragraphs, progress)
}
