//! One call from a language-model folder and a text to a compressed model: capture the
//! calibration MLP inputs from the text (streamed to a file in the output directory's work area),
//! compress every group from that file, write the compressed model and the densified folder, and
//! optionally score the dense and the compressed model on an evaluation text.
//!
//! Never lose work (as [`run_dir`] for the other paths): the work area `OUT/.fips-work` holds the
//! run's settings (the model folder's config, tokenizer, index and shards by content, the text by
//! content, the token budget, the seed, the validation fraction, the method's parameters, the
//! groups), the captures (`calibration.safetensors`, `validation.safetensors`, each written
//! atomically, then `capture.json` recording their fingerprints) and one part per finished group.
//! A killed run rerun with the same settings reuses the captures and the parts; with other
//! settings it is refused before any work (naming what differs) unless started afresh. The
//! outputs (`compressed.safetensors`, the folder `densified`, `report.json`) are assembled from
//! the parts read back from disk and installed as one output set
//! ([`output_set`](crate::foundation::output_set), the folder as one entry).
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

use crate::app::pipeline::{CalibrationSource, ModelCompression, Observer, Validation};
use crate::app::report::RunReport;
use crate::app::run_dir::{
    self, CAPTURE_FILES, CalibrationSettings, InputFile, Resume, RunContext, RunSettings, WorkArea,
};
use crate::app::text::capture::{CaptureOptions, CaptureReport, capture_with_model};
use crate::app::text::perplexity::{Perplexity, perplexity_of_paragraphs};
use crate::app::text::text_model::{TextModel, check_supported, is_causal, not_causal};
use crate::app::text::tokenize::{TextTokenizer, read_paragraph_tokens};
use crate::format::block_groups::BlockGroups;
use crate::format::compact_file::CompactModel;
use crate::format::hf::store::TensorStore;
use crate::format::hf::{DensifiedFolder, HfFolder, ModelError};
use crate::format::layout::MlpLayout;
use crate::format::mlp_inputs::MlpInputs;
use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::fingerprint;
use crate::foundation::output_set::StagedSet;
use crate::foundation::safe_io::{check_outputs, write_atomically};
use crate::methods::Compressor;

/// The work area inside the output directory (captures and per-group parts live here).
pub const WORK_DIR: &str = run_dir::WORK_DIR;
/// The calibration MLP-input file inside [`WORK_DIR`].
pub const CALIBRATION_FILE: &str = CAPTURE_FILES[0];
/// The held-out validation MLP-input file inside [`WORK_DIR`].
pub const VALIDATION_FILE: &str = CAPTURE_FILES[1];
/// The report inside the output directory.
pub const REPORT_FILE: &str = run_dir::REPORT_FILE;
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
    /// Memory in bytes a group's captured calibration may take to be read whole (inputs and
    /// targets, `8 n T d`); larger groups are streamed from the capture, 0 always streams
    /// ([`MlpInputs::with_memory_budget`]; default
    /// [`DEFAULT_CALIBRATION_MEMORY`](crate::format::mlp_inputs::DEFAULT_CALIBRATION_MEMORY)). Not part of
    /// the run's settings: both routes give the same bits.
    pub calibration_memory: u64,
    /// Explicit groups (e.g. `0-4`); `None`: consecutive groups of `group_size` blocks.
    pub groups: Option<String>,
    /// Blocks per group when `groups` is `None`.
    pub group_size: usize,
    /// The MLP activation; `None`: the one `config.json` names.
    pub activation: Option<Activation>,
    /// Write the densified folder ([`DENSIFIED_DIR`]) beside the compressed model.
    pub densify: bool,
    /// Keep the work area (captures and parts) after the run (it is removed otherwise; a
    /// `work_dir` given explicitly is always kept).
    pub keep_calibration: bool,
    /// The work area; `None`: `out_dir/.fips-work`. Scattered runs
    /// ([`compress_text_group`] per group, then [`assemble_text_model`]) share one.
    pub work_dir: Option<PathBuf>,
    /// What to do with the work area of an earlier run.
    pub resume: Resume,
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
    /// The run's report (written as `report.json` into the output set).
    pub report: RunReport,
    /// Whether the captures were those of an earlier run with the same settings (resumed).
    pub capture_reused: bool,
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
    let work_dir = options
        .work_dir
        .clone()
        .unwrap_or_else(|| out_dir.join(run_dir::WORK_DIR));
    let prepared = prepare(
        model_dir,
        text_file,
        options,
        compressor,
        &work_dir,
        Job::Whole { out_dir },
        progress,
    )?;
    prepared.compress_parts(compressor, observer, None, options.calibration_memory)?;
    let keep = options.keep_calibration || options.work_dir.is_some();
    prepared.finish(
        out_dir,
        options.densify,
        options.eval_text.as_deref(),
        keep,
        start,
    )
}

/// One job of a scattered run (a Slurm array task, a Ray task, …): compresses group `group` of
/// the run `options` describes into the work area `work_dir` (capturing the calibration first if
/// the work area does not hold this run's captures yet) and returns; [`assemble_text_model`]
/// writes the outputs once every group's part is there. The parts are the bytes a single-process
/// run makes, so the assembled outputs are too. Jobs started together each capture (the same
/// bytes, each installed atomically); run one job first to capture once.
#[allow(clippy::too_many_arguments)]
pub fn compress_text_group(
    model_dir: &Path,
    text_file: &Path,
    options: &TextCompressOptions,
    compressor: &dyn Compressor<f32>,
    work_dir: &Path,
    group: usize,
    progress: &mut dyn FnMut(usize, usize),
    observer: &mut dyn Observer,
) -> Result<TextPart> {
    let prepared = prepare(
        model_dir,
        text_file,
        options,
        compressor,
        work_dir,
        Job::Group(group),
        progress,
    )?;
    let computed = prepared.compress_parts(
        compressor,
        observer,
        Some(group),
        options.calibration_memory,
    )?;
    Ok(TextPart {
        group,
        computed: !computed.is_empty(),
        missing: prepared.work.missing(),
        capture_reused: prepared.capture_reused,
    })
}

/// What [`compress_text_group`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextPart {
    /// The group.
    pub group: usize,
    /// Whether it was compressed now (`false`: its part was already in the work area).
    pub computed: bool,
    /// The groups whose parts are still missing.
    pub missing: Vec<usize>,
    /// Whether the captures were those of an earlier job with the same settings.
    pub capture_reused: bool,
}

/// What [`assemble_text_model`] writes besides the compressed model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TextAssembleOptions {
    /// The model folder; `None`: the path the parts' run recorded (its content must match).
    pub model_dir: Option<PathBuf>,
    /// The calibration text; `None`: the path the parts' run recorded (its content must match).
    pub text: Option<PathBuf>,
    /// Write the densified folder.
    pub densify: bool,
    /// A text to score the dense and the compressed model on.
    pub eval_text: Option<PathBuf>,
}

/// Writes the outputs of a scattered text run from its work area (every group's part and the
/// captures there): the same output set, byte for byte, as [`compress_text_model`] with the same
/// settings (the report up to its timings). The model folder and the calibration text are checked
/// against the fingerprints the run recorded before any work;
/// [`FipsError::MissingParts`] names the groups not done yet. The work area is kept.
pub fn assemble_text_model(
    work_dir: &Path,
    out_dir: &Path,
    options: &TextAssembleOptions,
) -> Result<TextCompression> {
    let start = Instant::now();
    let work = WorkArea::load(work_dir)?;
    let missing = work.missing();
    if !missing.is_empty() {
        return Err(FipsError::MissingParts {
            dir: work_dir.to_path_buf(),
            missing,
        });
    }
    let settings = work.settings().clone();
    let CalibrationSettings::Text {
        text: recorded_text,
        seed,
        validation_fraction,
        ..
    } = &settings.calibration
    else {
        return Err(FipsError::WorkArea {
            dir: work_dir.to_path_buf(),
            reason: "its parts were not calibrated on text (assemble it with --checkpoint)".into(),
        });
    };
    let mismatch = |what: &str, path: &Path| FipsError::WorkArea {
        dir: work_dir.to_path_buf(),
        reason: format!(
            "{} is not the {what} the parts were made from",
            path.display()
        ),
    };
    let model_dir = options
        .model_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&work.context().checkpoint));
    let text_file = match (&options.text, &work.context().text) {
        (Some(t), _) => t.clone(),
        (None, Some(t)) => PathBuf::from(t),
        (None, None) => {
            return Err(FipsError::WorkArea {
                dir: work_dir.to_path_buf(),
                reason: "it does not record its calibration text: give it (--text FILE)".into(),
            });
        }
    };
    let folder = HfFolder::open(&model_dir)?;
    check_supported(&folder)?;
    if folder_input(&folder)? != settings.checkpoint {
        return Err(mismatch("model folder", &model_dir));
    }
    if &InputFile::of(&text_file)? != recorded_text {
        return Err(mismatch("calibration text", &text_file));
    }
    check_texts_and_outputs(
        &folder,
        &text_file,
        options.eval_text.as_deref(),
        OUTPUT_SET.map(|f| out_dir.join(f)).to_vec(),
    )?;
    run_dir::check_writable(out_dir)?;
    let layout = folder.mlp_layout()?;
    let tokenizer = TextTokenizer::for_model(&folder)?;
    let paragraphs = read_paragraph_tokens(&tokenizer, &text_file)?;
    let (_, held_out) = validation_split(paragraphs, *validation_fraction, *seed)?;
    let record =
        read_capture_record(&work, &work_dir.join(CAPTURE_FILES[2]))?.ok_or_else(|| {
            FipsError::WorkArea {
                dir: work_dir.to_path_buf(),
                reason: "its captures are missing or do not match its settings".into(),
            }
        })?;
    let dense_model = TextModel::load(&folder, &BTreeMap::new())?;
    let prepared = Prepared {
        folder,
        layout,
        activation: settings.activation,
        tokenizer,
        held_out,
        dense_model,
        work,
        capture: record.capture,
        validation_capture: record.validation_capture,
        capture_reused: true,
    };
    prepared.finish(
        out_dir,
        options.densify,
        options.eval_text.as_deref(),
        true,
        start,
    )
}

/// A text run up to its parts: checked, its work area open, its captures on disk.
struct Prepared {
    folder: HfFolder,
    layout: MlpLayout,
    activation: Activation,
    tokenizer: TextTokenizer,
    held_out: Paragraphs,
    dense_model: TextModel,
    work: WorkArea,
    capture: CaptureReport,
    validation_capture: Option<CaptureReport>,
    capture_reused: bool,
}

/// What [`prepare`] prepares for: a whole run writing its output set into `out_dir`, or one
/// group's job (its index checked before any work).
#[derive(Debug, Clone, Copy)]
enum Job<'a> {
    Whole { out_dir: &'a Path },
    Group(usize),
}

/// Checks everything that can be checked cheaply, opens the work area (a run with other settings
/// is refused before any work) and captures the calibration unless the work area holds this
/// run's captures already.
fn prepare(
    model_dir: &Path,
    text_file: &Path,
    options: &TextCompressOptions,
    compressor: &dyn Compressor<f32>,
    work_dir: &Path,
    job: Job<'_>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Prepared> {
    // Cheap checks first: folder, layout, groups, tokenizer, texts.
    let folder = HfFolder::open(model_dir)?;
    check_supported(&folder)?;
    let layout = folder.mlp_layout()?;
    let shapes = layout.block_shapes()?;
    let groups = match &options.groups {
        Some(spec) => BlockGroups::parse(spec, &shapes)?,
        None => BlockGroups::consecutive(&shapes, options.group_size)?,
    };
    if let Job::Group(k) = job
        && k >= groups.len()
    {
        return Err(FipsError::IndexOutOfRange {
            what: "group (--only-group)",
            index: k,
            len: groups.len(),
        });
    }
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
    if tokens == 0 {
        return Err(FipsError::InvalidParameter {
            name: "tokens",
            reason: "the calibration token budget must be positive".into(),
        });
    }
    if tokens > available {
        return Err(ModelError::TextTooShort {
            path: text_file.to_path_buf(),
            available,
            budget: tokens,
        }
        .into());
    }
    if let Some(batch) = compressor
        .parameters()
        .required_batch_tokens()
        .filter(|&b| b > tokens)
    {
        return Err(FipsError::BatchTooLarge { batch, tokens });
    }
    // No output (the captures, the parts' area, the output set) may be or hold an input.
    let mut outputs: Vec<PathBuf> = CAPTURE_FILES.iter().map(|f| work_dir.join(f)).collect();
    if let Job::Whole { out_dir } = job {
        outputs.extend(OUTPUT_SET.map(|f| out_dir.join(f)));
    }
    check_texts_and_outputs(&folder, text_file, options.eval_text.as_deref(), outputs)?;

    // The work area: settings first (a run with other settings is refused before any work),
    // then the captures, then one part per group; the outputs are assembled from the parts.
    let settings = text_run_settings(
        &folder,
        &layout,
        compressor,
        &groups,
        activation,
        CalibrationSettings::Text {
            text: InputFile::of(text_file)?,
            tokens,
            seed: options.seed,
            validation_fraction: options.validation_fraction,
        },
    )?;
    let run_context = RunContext {
        checkpoint: model_dir.display().to_string(),
        text: Some(text_file.display().to_string()),
        ..RunContext::default()
    };
    let work = WorkArea::open(work_dir, settings, run_context, options.resume)?;
    // As on the other paths, the settings record comes with the first part: a run that fails
    // before leaves only its captures, which a rerun with the same settings reuses and one with
    // other settings captures again.
    std::fs::create_dir_all(work_dir).map_err(|source| FipsError::Io {
        path: work_dir.to_path_buf(),
        source,
    })?;
    let dense_model = TextModel::load(&folder, &BTreeMap::new())?;
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
    let [calibration_name, validation_name, record_name] = CAPTURE_FILES;
    let calibration_path = work_dir.join(calibration_name);
    let validation_path = work_dir.join(validation_name);
    let record_path = work_dir.join(record_name);
    let recorded = read_capture_record(&work, &record_path)?;
    let capture_reused = recorded.is_some();
    let (capture, validation_capture) = match recorded {
        Some(record) => (record.capture, record.validation_capture),
        None => {
            let capture = capture_with_model(
                &dense_model,
                &train,
                &CaptureOptions::new(tokens, options.seed),
                &calibration_path,
                metadata("training"),
                progress,
            )?;
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
            let record = CaptureRecord {
                settings: work.fingerprint().to_string(),
                calibration: InputFile::of(&calibration_path)?,
                validation: validation_capture
                    .as_ref()
                    .map(|_| InputFile::of(&validation_path))
                    .transpose()?,
                capture,
                validation_capture,
            };
            let text = serde_json::to_string_pretty(&record)
                .map_err(|e| FipsError::Numerical(format!("cannot serialise a capture: {e}")))?;
            write_atomically(&record_path, text.as_bytes())?;
            (record.capture, record.validation_capture)
        }
    };
    Ok(Prepared {
        folder,
        layout,
        activation,
        tokenizer,
        held_out,
        dense_model,
        work,
        capture,
        validation_capture,
        capture_reused,
    })
}

impl Prepared {
    /// Compresses the groups (all, or only `only`) whose parts the work area lacks, from the
    /// captures (each group read whole when it fits `budget` bytes, streamed otherwise); returns
    /// the groups computed now.
    fn compress_parts(
        &self,
        compressor: &dyn Compressor<f32>,
        observer: &mut dyn Observer,
        only: Option<usize>,
        budget: u64,
    ) -> Result<Vec<usize>> {
        let dir = self.work.dir();
        let open = |name: &str| {
            Ok::<_, FipsError>(MlpInputs::open(dir.join(name))?.with_memory_budget(budget))
        };
        let inputs = open(CAPTURE_FILES[0])?;
        let validation = self
            .validation_capture
            .as_ref()
            .map(|_| open(CAPTURE_FILES[1]))
            .transpose()?;
        // Every group's report carries its per-block errors on the held-out tokens (which also
        // drive early stopping when it is set).
        run_dir::compress_parts_validated(
            self.folder.tensors(),
            &self.layout,
            compressor,
            self.activation,
            &CalibrationSource::File(&inputs),
            &validation.as_ref().map_or(Validation::None, |v| {
                Validation::Source(CalibrationSource::File(v))
            }),
            observer,
            &self.work,
            only,
        )
    }

    /// Assembles the parts and installs the output set (the compact file, the densified folder
    /// when `densify`, the report), scoring the held-out paragraphs and `eval_text`; removes the
    /// work area unless `keep`.
    fn finish(
        self,
        out_dir: &Path,
        densify: bool,
        eval_text: Option<&Path>,
        keep: bool,
        start: Instant,
    ) -> Result<TextCompression> {
        let Prepared {
            folder,
            layout,
            tokenizer,
            held_out,
            dense_model,
            work,
            capture,
            validation_capture,
            capture_reused,
            ..
        } = self;
        let run = work.assemble(start.elapsed())?;
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
        // The output set, staged and installed whole: the compact file (format 3, values in the
        // checkpoint's dtype), the densified folder and the report; the scores use exactly what
        // the compact file holds.
        let set = StagedSet::begin(out_dir)?;
        let staged = (|| {
            let compact = CompactModel::from_model(&run.model, None)?;
            compact.write(set.path(COMPRESSED_FILE))?;
            let replacements = compact.dense_tensors()?;
            let densified = if densify {
                let note = format!("{} compression", run.model.manifest.method);
                Some(folder.write_densified(&replacements, &note, set.path(DENSIFIED_DIR), true)?)
            } else {
                None
            };
            // Perplexities of a decoder only (an encoder predicts no next token).
            let models = match &dense_model {
                TextModel::Decoder(dense) => match TextModel::load(&folder, &replacements)? {
                    TextModel::Decoder(compressed) => Some((dense, compressed)),
                    TextModel::Encoder(_) => None,
                },
                TextModel::Encoder(_) => None,
            };
            let validation_perplexity = match &models {
                Some((dense_model, compressed_model)) if !held_out.is_empty() => Some((
                    perplexity_of_paragraphs(dense_model, &held_out, &mut |_, _| {})?,
                    perplexity_of_paragraphs(compressed_model, &held_out, &mut |_, _| {})?,
                )),
                _ => None,
            };
            let scores = match (eval_text, &models) {
                (Some(eval), Some((dense_model, compressed_model))) => {
                    let paragraphs = read_paragraph_tokens(&tokenizer, eval)?;
                    (
                        Some(perplexity_of_paragraphs(
                            dense_model,
                            &paragraphs,
                            &mut |_, _| {},
                        )?),
                        Some(perplexity_of_paragraphs(
                            compressed_model,
                            &paragraphs,
                            &mut |_, _| {},
                        )?),
                    )
                }
                _ => (None, None),
            };
            let mut report = work.report(&layout, &run)?;
            report.wall_time = start.elapsed();
            report.write(set.path(REPORT_FILE))?;
            Ok((densified, validation_perplexity, scores, report))
        })();
        let (densified, validation_perplexity, (dense_perplexity, compressed_perplexity), report) =
            match staged {
                Ok(staged) => staged,
                Err(e) => {
                    set.abandon();
                    return Err(e);
                }
            };
        set.commit(|name| OUTPUT_SET.contains(&name))?;
        let densified = densified.map(|mut d| {
            d.dir = out_dir.join(DENSIFIED_DIR);
            d
        });
        if !keep {
            // The work area is a cache of this run once the set is installed.
            work.remove()?;
        }
        let compressed = out_dir.join(COMPRESSED_FILE);
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
            report,
            capture_reused,
            wall_time: start.elapsed(),
        })
    }
}

/// The output set's entries inside the output directory.
const OUTPUT_SET: [&str; 3] = [COMPRESSED_FILE, REPORT_FILE, DENSIFIED_DIR];

/// Checks, before any work, the evaluation text (a decoder's, not the calibration text, readable
/// with tokens) and that no output is or holds one of the run's inputs (the folder's files, the
/// texts).
fn check_texts_and_outputs(
    folder: &HfFolder,
    text_file: &Path,
    eval_text: Option<&Path>,
    outputs: Vec<PathBuf>,
) -> Result<()> {
    if let Some(eval) = eval_text {
        if !is_causal(folder) {
            return Err(not_causal(folder));
        }
        if eval == text_file {
            return Err(FipsError::InvalidParameter {
                name: "eval_text",
                reason: "the evaluation text must not be the calibration text".into(),
            });
        }
        available_tokens(folder, eval)?;
    }
    let mut inputs = folder.input_files();
    inputs.push(text_file.to_path_buf());
    inputs.extend(eval_text.map(Path::to_path_buf));
    check_outputs(&inputs, &outputs)
}

/// What `capture.json` in the work area holds: the captures of a run with these settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CaptureRecord {
    settings: String,
    calibration: InputFile,
    validation: Option<InputFile>,
    capture: CaptureReport,
    validation_capture: Option<CaptureReport>,
}

/// The captures recorded in the work area, if the record is this run's and the files check out
/// (`None`: capture again, over whatever is there).
fn read_capture_record(work: &WorkArea, path: &Path) -> Result<Option<CaptureRecord>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    let Ok(record) = serde_json::from_str::<CaptureRecord>(&text) else {
        return Ok(None);
    };
    let dir = work.dir();
    let same = |recorded: &InputFile| {
        InputFile::of(dir.join(&recorded.name)).is_ok_and(|found| &found == recorded)
    };
    let fine = record.settings == work.fingerprint()
        && same(&record.calibration)
        && record.validation.as_ref().is_none_or(same)
        && record.validation.is_some() == record.validation_capture.is_some();
    Ok(fine.then_some(record))
}

/// The run settings of compressing the model of `folder`: as [`RunSettings::new`], with the
/// checkpoint standing for the whole folder (its name is the weights' file name; its length and
/// fingerprint cover `config.json`, the tokenizer, the index and every shard).
fn text_run_settings(
    folder: &HfFolder,
    layout: &MlpLayout,
    compressor: &dyn Compressor<f32>,
    groups: &BlockGroups,
    activation: Activation,
    calibration: CalibrationSettings,
) -> Result<RunSettings> {
    let weights = folder.tensors().path();
    let mut settings = RunSettings::new(
        weights,
        layout,
        compressor,
        groups,
        activation,
        calibration,
        &Validation::None,
    )?;
    settings.checkpoint = folder_input(folder)?;
    Ok(settings)
}

/// The model folder as one input: the weights' file name, and a length and fingerprint covering
/// `config.json`, the tokenizer, the index and every shard.
fn folder_input(folder: &HfFolder) -> Result<InputFile> {
    let files = folder.input_files();
    let mut f = fingerprint::Fingerprint::new();
    let mut total = 0u64;
    for file in &files {
        let found = InputFile::of(file)?;
        f.update(format!("{}\0{}\0{}\n", found.name, found.bytes, found.fingerprint).as_bytes());
        total = total.wrapping_add(found.bytes);
    }
    Ok(InputFile {
        name: folder
            .tensors()
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        bytes: total,
        fingerprint: f.hex(),
    })
}
