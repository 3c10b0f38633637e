//! Calibration activations from text: every block's MLP input, streamed to an MLP-input file.
//!
//! The paragraphs of the text are shuffled with the seed and taken in that order, each with BOS
//! prepended and cut to the model's context length, until the token budget is reached (the last
//! paragraph is cut to fill it exactly). Every position counts as a token, BOS included. Each
//! paragraph runs through the model once; each block's MLP input rows (the output of
//! `post_attention_layernorm`) go straight to the file ([`crate::format::mlp_input_writer`]), so memory
//! holds one paragraph's activations, not the calibration set. Row `t` of every block comes from
//! the same token.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;

use crate::app::text::nn::rt;
use crate::app::text::text_model::{TextModel, check_supported};
use crate::app::text::tokenize::{TextTokenizer, read_paragraph_tokens};
use crate::format::hf::{HfFolder, ModelError};
use crate::format::mlp_input_writer::MlpInputWriter;
use crate::foundation::error::{FipsError, Result};

/// What to capture.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureOptions {
    /// Tokens (rows per block) to capture.
    pub budget: usize,
    /// Seed of the paragraph order.
    pub seed: u64,
    /// Storage type of the file (`F32`, `F16` or `BF16`).
    pub dtype: Dtype,
}

impl CaptureOptions {
    /// `budget` tokens in `f32`, paragraph order from `seed`.
    pub fn new(budget: usize, seed: u64) -> Self {
        Self {
            budget,
            seed,
            dtype: Dtype::F32,
        }
    }
}

/// What a capture wrote.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CaptureReport {
    /// The MLP-input file.
    pub path: PathBuf,
    /// Rows per block.
    pub tokens: usize,
    /// Blocks captured (all of the model's).
    pub blocks: usize,
    /// Model width d.
    pub width: usize,
    /// Paragraphs used (the last one possibly cut); the file's `paragraphs` metadata lists them as
    /// JSON `[[paragraph index, tokens taken], …]` in row order.
    pub paragraphs_used: usize,
    /// Paragraphs in the text.
    pub paragraphs_available: usize,
    /// Paragraphs cut to the model's context length.
    pub paragraphs_truncated: usize,
    /// Wall time of the forward passes and writes, seconds.
    pub seconds: f64,
}

/// Captures `options.budget` tokens of MLP inputs of every block of the model in `model_dir`
/// from the paragraphs of `text_file`, into the MLP-input file `out_file` (written atomically).
/// `progress(tokens done, budget)` is called after each paragraph.
///
/// Before loading the model: the folder, its tokenizer (against the vocabulary) and the text are
/// checked — an empty text ([`ModelError::EmptyText`]) or one with fewer tokens than the budget
/// ([`ModelError::TextTooShort`]) is an error, and nothing is written.
pub fn capture_text(
    model_dir: impl AsRef<Path>,
    text_file: impl AsRef<Path>,
    options: &CaptureOptions,
    out_file: impl AsRef<Path>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CaptureReport> {
    let folder = HfFolder::open(model_dir)?;
    check_supported(&folder)?;
    let text_file = text_file.as_ref();
    let mut inputs = folder.input_files();
    inputs.push(text_file.to_path_buf());
    crate::foundation::safe_io::check_outputs(&inputs, [out_file.as_ref()])?;
    let tokenizer = TextTokenizer::for_model(&folder)?;
    let paragraphs = read_paragraph_tokens(&tokenizer, text_file)?;
    let context = folder.config().max_position_embeddings.unwrap_or(4096);
    let available: usize = paragraphs.iter().map(|p| p.len().min(context)).sum();
    if options.budget == 0 {
        return Err(FipsError::InvalidParameter {
            name: "budget",
            reason: "the token budget must be positive".into(),
        });
    }
    if available < options.budget {
        return Err(ModelError::TextTooShort {
            path: text_file.to_path_buf(),
            available,
            budget: options.budget,
        }
        .into());
    }
    let model = TextModel::load(&folder, &BTreeMap::new())?;
    capture_with_model(
        &model,
        &paragraphs,
        options,
        out_file.as_ref(),
        metadata(&folder, text_file, options),
        progress,
    )
}

/// The header metadata of a capture.
fn metadata(folder: &HfFolder, text: &Path, options: &CaptureOptions) -> HashMap<String, String> {
    HashMap::from([
        ("source".to_string(), folder.dir().display().to_string()),
        ("text".to_string(), text.display().to_string()),
        ("seed".to_string(), options.seed.to_string()),
        ("tokens".to_string(), options.budget.to_string()),
        (
            "capture".to_string(),
            "post_attention_layernorm output per block; paragraphs shuffled by seed, BOS prepended"
                .to_string(),
        ),
    ])
}

/// Captures from already tokenised paragraphs (BOS first) with a loaded model.
pub fn capture_with_model(
    model: &TextModel,
    paragraphs: &[Vec<u32>],
    options: &CaptureOptions,
    out_file: &Path,
    metadata: HashMap<String, String>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CaptureReport> {
    let start = Instant::now();
    let context = model.max_positions();
    let budget = options.budget;
    let available: usize = paragraphs.iter().map(|p| p.len().min(context)).sum();
    if available < budget {
        return Err(ModelError::TextTooShort {
            path: out_file.to_path_buf(),
            available,
            budget,
        }
        .into());
    }
    let plan = plan(paragraphs, budget, context, options.seed);
    let mut metadata = metadata;
    metadata.insert(
        "paragraphs".into(),
        serde_json::to_string(&plan).map_err(|e| ModelError::Runtime(e.to_string()))?,
    );
    let blocks: Vec<usize> = (0..model.blocks()).collect();
    let mut writer = MlpInputWriter::create(
        out_file,
        &blocks,
        budget,
        model.width(),
        options.dtype,
        metadata,
    )?;
    let mut done = 0;
    for &(p, take) in &plan {
        model.forward_hidden(&paragraphs[p][..take], None, &mut |block, z| {
            let rows: Vec<f32> = z.flatten_all().and_then(|x| x.to_vec1()).map_err(rt)?;
            writer.append(block, &rows)
        })?;
        done += take;
        progress(done, budget);
    }
    let path = writer.finish()?;
    let truncated = plan
        .iter()
        .filter(|&&(p, _)| paragraphs[p].len() > context)
        .count();
    Ok(CaptureReport {
        path,
        tokens: budget,
        blocks: blocks.len(),
        width: model.width(),
        paragraphs_used: plan.len(),
        paragraphs_available: paragraphs.len(),
        paragraphs_truncated: truncated,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `(paragraph index, tokens taken from its start)` in capture order: the paragraphs shuffled by
/// `seed`, each cut to `context`, the last one cut to fill `budget` exactly.
pub fn plan(
    paragraphs: &[Vec<u32>],
    budget: usize,
    context: usize,
    seed: u64,
) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = (0..paragraphs.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut out = Vec::new();
    let mut done = 0;
    for p in order {
        if done == budget {
            break;
        }
        let take = paragraphs[p].len().min(context).min(budget - done);
        if take > 0 {
            out.push((p, take));
            done += take;
        }
    }
    out
}
