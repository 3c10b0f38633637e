//! One call from a language-model folder and a text to a compressed model: capture the
//! calibration MLP inputs from the text (streamed to a file in the output directory's work area),
//! compress every group from that file, write the compressed model and the densified folder, and
//! optionally score the dense and the compressed model on an evaluation text.
//!
//! Everything that can be checked cheaply is checked before the long work: the folder (config,
//! shards, index), the tokenizer against the vocabulary, the calibration text (not empty, at least
//! the token budget), the evaluation text, and the groups. Nothing is written before that.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::app::pipeline::{
    CalibrationSource, ModelCompression, Observer, Validation, compress_checkpoint_validated,
};
use crate::app::text::capture::{CaptureOptions, CaptureReport, capture_with_model};
use crate::app::text::model::{LlamaModel, check_supported};
use crate::app::text::perplexity::{Perplexity, perplexity_of_paragraphs};
use crate::app::text::tokenize::{TextTokenizer, read_paragraph_tokens};
use crate::format::block_groups::BlockGroups;
use crate::format::compact_file::CompactModel;
use crate::format::hf::{DensifiedFolder, HfFolder, ModelError};
use crate::format::layout::MlpLayout;
use crate::format::mlp_inputs::MlpInputs;
use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::methods::Compressor;

/// The work area inside the output directory (calibration activations live here).
pub const WORK_DIR: &str = "work";
/// The calibration MLP-input file inside [`WORK_DIR`].
pub const CALIBRATION_FILE: &str = "calibration.safetensors";
/// The held-out validation MLP-input file inside [`WORK_DIR`].
pub const VALIDATION_FILE: &str = "validation.safetensors";
/// The fraction of the calibration paragraphs held out for validation by default.
pub const DEFAULT_VALIDATION_FRACTION: f64 = 0.05;
/// The compressed model inside the output directory (compact format 3, MLPs only).
pub const COMPRESSED_FILE: &str = "compressed.safetensors";
/// The densified model folder inside the output directory.
pub const DENSIFIED_DIR: &str = "densified";

/// What [`compress_text_model`] does besides compressing.
#[derive(Debug, Clone, PartialEq)]
pub struct TextCompressOptions {
    /// Calibration tokens (rows per block, BOS included); `None`: every token of the text (each
    /// paragraph cut to the context length).
    pub tokens: Option<usize>,
    /// Seed of the paragraph order of the capture and of the validation split.
    pub seed: u64,
    /// Fraction of the calibration paragraphs held out (never trained on) to measure the
    /// per-block errors and the perplexity on text the compression has not seen.
    pub validation_fraction: f64,
    /// Explicit groups (e.g. `0-4`); `None`: consecutive groups of `group_size` blocks.
    pub groups: Option<String>,
    /// Blocks per group when `groups` is `None`.
    pub group_size: usize,
    /// The MLP activation; `None`: the one `config.json` names.
    pub activation: Option<Activation>,
    /// Write the densified folder ([`DENSIFIED_DIR`]) beside the compressed model.
    pub densify: bool,
    /// Keep the calibration file after the run (it is removed otherwise).
    pub keep_calibration: bool,
    /// A text to score the dense and the compressed model on (never the calibration text).
    pub eval_text: Option<PathBuf>,
}

/// What [`compress_text_model`] did.
#[derive(Debug)]
pub struct TextCompression {
    /// The capture of the calibration activations.
    pub capture: CaptureReport,
    /// The capture of the held-out validation activations (`None` with no validation split).
    pub validation_capture: Option<CaptureReport>,
    /// Per group, per block: the relative error `‖Ŷ_b − Y_b‖ / ‖Y_b‖` on the calibration tokens.
    pub train_errors: Vec<Vec<f64>>,
    /// Per group, per block: the relative error on the held-out validation tokens.
    pub validation_errors: Vec<Vec<f64>>,
    /// Perplexity of the dense and of the compressed model on the held-out paragraphs.
    pub validation_perplexity: Option<(Perplexity, Perplexity)>,
    /// The model's MLP layout.
    pub layout: MlpLayout,
    /// The compressed groups with their reports.
    pub run: ModelCompression,
    /// Where the compressed model was written.
    pub compressed: PathBuf,
    /// The densified folder, if written.
    pub densified: Option<DensifiedFolder>,
    /// Perplexity of the dense model on the evaluation text, if one was given.
    pub dense_perplexity: Option<Perplexity>,
    /// Perplexity of the compressed model (dense rebuilds of its MLPs) on the evaluation text.
    pub compressed_perplexity: Option<Perplexity>,
    /// Wall time of the whole call.
    pub wall_time: Duration,
}

/// Tokens a capture of `text_file` can take at most: every paragraph (BOS prepended) cut to the
/// model's context length. Errors as [`capture_text`](crate::app::text::capture::capture_text) for a bad folder, tokenizer or empty text.
pub fn available_tokens(folder: &HfFolder, text_file: &Path) -> Result<usize> {
    check_supported(folder)?;
    let tokenizer = TextTokenizer::for_model(folder)?;
    let paragraphs = read_paragraph_tokens(&tokenizer, text_file)?;
    let context = folder.config().max_position_embeddings.unwrap_or(4096);
    Ok(paragraphs.iter().map(|p| p.len().min(context)).sum())
}

/// Tokenised paragraphs (BOS first).
pub type Paragraphs = Vec<Vec<u32>>;

/// Splits `paragraphs` into (training, held-out) by a seeded shuffle: `round(fraction · n)`
/// paragraphs held out (at least one when `fraction > 0` and there are two or more).
pub fn validation_split(
    paragraphs: Paragraphs,
    fraction: f64,
    seed: u64,
) -> Result<(Paragraphs, Paragraphs)> {
    if !(0.0..0.5).contains(&fraction) {
        return Err(FipsError::InvalidParameter {
            name: "validation_fraction",
            reason: format!("must be in [0, 0.5), got {fraction}"),
        });
    }
    let n = paragraphs.len();
    let mut held = ((fraction * n as f64).round() as usize).min(n.saturating_sub(1));
    if fraction > 0.0 && held == 0 && n >= 2 {
        held = 1;
    }
    let mut order: Vec<usize> = (0..n).collect();
    // A stream apart from the capture's paragraph order.
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x7661_6c69_6461_7465));
    let mut is_held = vec![false; n];
    for &p in &order[..held] {
        is_held[p] = true;
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (p, ids) in paragraphs.into_iter().enumerate() {
        if is_held[p] {
            val.push(ids)
        } else {
            train.push(ids)
        }
    }
    Ok((train, val))
}

/// Compresses the language model in `model_dir` calibrated on `text_file`: the paragraphs are
/// split (seeded) into training and held-out validation paragraphs; every block's MLP inputs on
/// the training paragraphs are captured into `out_dir/work/calibration.safetensors` (and on the
/// held-out ones into `validation.safetensors`); each group is compressed with `compressor`
/// reading its blocks' rows from that file; `out_dir/compressed.safetensors` and (with
/// `options.densify`) the folder `out_dir/densified` are written; the per-block errors on the
/// training and the held-out tokens and the held-out perplexity are measured, and both models are
/// scored on `options.eval_text` if given. `progress(tokens, budget)` follows the capture;
/// `observer` the compression.
pub fn compress_text_model(
    model_dir: &Path,
    text_file: &Path,
    options: &TextCompressOptions,
    compressor: &dyn Compressor<f32>,
    out_dir: &Path,
    progress: &mut dyn FnMut(usize, usize),
    observer: &mut dyn Observer,
) -> Result<TextCompression> {
    let start = Instant::now();
    // Cheap checks first: folder, layout, groups, tokenizer, texts.
    let folder = HfFolder::open(model_dir)?;
    check_supported(&folder)?;
    let layout = folder.mlp_layout()?;
    let shapes = layout.block_shapes()?;
    let groups = match &options.groups {
        Some(spec) => BlockGroups::parse(spec, &shapes)?,
        None => BlockGroups::consecutive(&shapes, options.group_size)?,
    };
    let activation = match options.activation {
        Some(a) => a,
        None => folder.activation()?,
    };
    let tokenizer = TextTokenizer::for_model(&folder)?;
    let paragraphs = read_paragraph_tokens(&tokenizer, text_file)?;
    let (train, held_out) =
        validation_split(paragraphs, options.validation_fraction, options.seed)?;
    let context = folder.config().max_position_embeddings.unwrap_or(4096);
    let count = |ps: &[Vec<u32>]| -> usize { ps.iter().map(|p| p.len().min(context)).sum() };
    let available = count(&train);
    let tokens = options.tokens.unwrap_or(available);
    if tokens == 0 || tokens > available {
        return Err(ModelError::TextTooShort {
            path: text_file.to_path_buf(),
            available,
            budget: tokens.max(1),
        }
        .into());
    }
    if let Some(eval) = &options.eval_text {
        if eval == text_file {
            return Err(FipsError::InvalidParameter {
                name: "eval_text",
                reason: "the evaluation text must not be the calibration text".into(),
            });
        }
        available_tokens(&folder, eval)?;
    }

    let work = out_dir.join(WORK_DIR);
    std::fs::create_dir_all(&work).map_err(|source| FipsError::Io {
        path: work.clone(),
        source,
    })?;
    let dense_model = LlamaModel::load(&folder, &BTreeMap::new())?;
    let metadata = |part: &str| {
        HashMap::from([
            ("source".to_string(), folder.dir().display().to_string()),
            ("text".to_string(), text_file.display().to_string()),
            ("seed".to_string(), options.seed.to_string()),
            ("split".to_string(), part.to_string()),
            (
                "validation_fraction".to_string(),
                options.validation_fraction.to_string(),
            ),
        ])
    };
    let calibration_path = work.join(CALIBRATION_FILE);
    let capture = capture_with_model(
        &dense_model,
        &train,
        &CaptureOptions::new(tokens, options.seed),
        &calibration_path,
        metadata("training"),
        progress,
    )?;
    let validation_path = work.join(VALIDATION_FILE);
    let validation_capture = if held_out.is_empty() {
        None
    } else {
        Some(capture_with_model(
            &dense_model,
            &held_out,
            &CaptureOptions::new(count(&held_out), options.seed),
            &validation_path,
            metadata("validation"),
            &mut |_, _| {},
        )?)
    };
    let inputs = MlpInputs::open(&calibration_path)?;
    let validation = validation_capture
        .as_ref()
        .map(|_| MlpInputs::open(&validation_path))
        .transpose()?;
    // Every group's report carries its per-block errors on the held-out tokens (which also
    // drive early stopping when it is set).
    let run = compress_checkpoint_validated(
        folder.tensors(),
        &layout,
        &groups,
        compressor,
        activation,
        &CalibrationSource::File(&inputs),
        &validation.as_ref().map_or(Validation::None, |v| {
            Validation::Source(CalibrationSource::File(v))
        }),
        observer,
    )?;
    let train_errors = run
        .reports
        .iter()
        .map(|r| r.block_rel_error.clone())
        .collect();
    let validation_errors = run
        .reports
        .iter()
        .filter_map(|r| r.validation.as_ref().map(|v| v.block_rel_error.clone()))
        .collect();
    drop((inputs, validation));
    if !options.keep_calibration {
        // The activation files are a cache of this run: removing them is tidying, not a result.
        let _ = std::fs::remove_file(&calibration_path);
        let _ = std::fs::remove_file(&validation_path);
        let _ = std::fs::remove_dir(&work);
    }
    // The compact file (format 3, values in the checkpoint's dtype); the densified folder and the
    // scores below use exactly what it holds.
    let compressed = out_dir.join(COMPRESSED_FILE);
    let compact = CompactModel::from_model(&run.model, None)?;
    compact.write(&compressed)?;
    let replacements = compact.dense_tensors()?;
    let densified = if options.densify {
        let note = format!("{} compression", run.model.manifest.method);
        Some(folder.write_densified(&replacements, &note, out_dir.join(DENSIFIED_DIR), true)?)
    } else {
        None
    };
    let compressed_model = LlamaModel::load(&folder, &replacements)?;
    let validation_perplexity = if held_out.is_empty() {
        None
    } else {
        Some((
            perplexity_of_paragraphs(&dense_model, &held_out, &mut |_, _| {})?,
            perplexity_of_paragraphs(&compressed_model, &held_out, &mut |_, _| {})?,
        ))
    };
    let (dense_perplexity, compressed_perplexity) = match &options.eval_text {
        Some(eval) => {
            let paragraphs = read_paragraph_tokens(&tokenizer, eval)?;
            (
                Some(perplexity_of_paragraphs(
                    &dense_model,
                    &paragraphs,
                    &mut |_, _| {},
                )?),
                Some(perplexity_of_paragraphs(
                    &compressed_model,
                    &paragraphs,
                    &mut |_, _| {},
                )?),
            )
        }
        None => (None, None),
    };
    Ok(TextCompression {
        capture,
        validation_capture,
        train_errors,
        validation_errors,
        validation_perplexity,
        layout,
        run,
        compressed,
        densified,
        dense_perplexity,
        compressed_perplexity,
        wall_time: start.elapsed(),
    })
}
