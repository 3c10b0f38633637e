//! `fips capture --model DIR --text FILE` and `fips eval --model DIR --text FILE`: the language
//! model commands (feature `text`). Kept apart from the image commands so that they can be moved
//! as a unit.

use std::path::{Path, PathBuf};

use clap::Args;
use fips::FipsError;

/// Arguments of `fips capture` for language models.
#[derive(Debug, Clone, Args)]
pub struct TextCaptureArgs {
    /// A Hugging Face model folder (config.json, safetensors weights, tokenizer.json); with --text,
    /// captures from text instead of images.
    #[arg(long, requires = "text")]
    pub model: Option<PathBuf>,
    /// Text to calibrate on: paragraphs separated by blank lines.
    #[arg(long, requires = "model")]
    pub text: Option<PathBuf>,
    /// Tokens to capture (rows per block), BOS tokens included.
    #[arg(long, default_value_t = 16384)]
    pub tokens: usize,
    /// Seed of the paragraph order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Store the activations in half precision (bf16) to halve the file.
    #[arg(long)]
    pub bf16: bool,
}

/// Arguments of `fips eval` for language models.
#[derive(Debug, Clone, Args)]
pub struct TextEvalArgs {
    /// A Hugging Face model folder; with --text, prints its perplexity.
    #[arg(long, requires = "text")]
    pub model: Option<PathBuf>,
    /// Text to score: paragraphs separated by blank lines, each scored with BOS prepended.
    #[arg(long, requires = "model")]
    pub text: Option<PathBuf>,
    /// A densified model folder (written by fips) to score beside the dense model.
    #[arg(long, requires = "model")]
    pub densified: Option<PathBuf>,
}

#[cfg(not(feature = "text"))]
fn no_text_feature() -> FipsError {
    FipsError::InvalidParameter {
        name: "model",
        reason: "this fips was built without the `text` feature (cargo build --features cli,text)"
            .into(),
    }
}

/// Captures MLP inputs from text.
#[cfg(feature = "text")]
pub fn capture(model: &Path, args: &TextCaptureArgs, out: &Path) -> Result<(), FipsError> {
    use fips::app::text::capture::{CaptureOptions, capture_text};
    let text = args.text.as_deref().ok_or_else(no_text)?;
    let mut options = CaptureOptions::new(args.tokens, args.seed);
    if args.bf16 {
        options.dtype = safetensors::Dtype::BF16;
    }
    let bar = super::progress::Bars::new().bar(args.tokens, "capturing tokens");
    let report = capture_text(model, text, &options, out, &mut |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    println!(
        "wrote {}: {} tokens × {} blocks × d = {} from {} of {} paragraphs (seed {}) in {:.1} s{}",
        report.path.display(),
        report.tokens,
        report.blocks,
        report.width,
        report.paragraphs_used,
        report.paragraphs_available,
        args.seed,
        report.seconds,
        if report.paragraphs_truncated > 0 {
            format!(
                ", {} paragraphs cut to the context length",
                report.paragraphs_truncated
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Captures MLP inputs from text (unavailable: built without `text`).
#[cfg(not(feature = "text"))]
pub fn capture(_model: &Path, _args: &TextCaptureArgs, _out: &Path) -> Result<(), FipsError> {
    Err(no_text_feature())
}

#[cfg(feature = "text")]
fn no_text() -> FipsError {
    FipsError::InvalidParameter {
        name: "text",
        reason: "--model needs --text FILE".into(),
    }
}

/// Prints the perplexity of the model (and of a compressed or densified version of it).
#[cfg(feature = "text")]
pub fn eval(model: &Path, args: &TextEvalArgs, compressed: Option<&Path>) -> Result<(), FipsError> {
    use std::collections::BTreeMap;

    use fips::app::text::perplexity::{Perplexity, perplexity};
    let text = args.text.as_deref().ok_or_else(no_text)?;
    // Read the compressed model first: a bad file fails before the long dense pass.
    let compressed = compressed
        .map(|p| dense_replacements(p).map(|r| r.0))
        .transpose()?;
    let bars = super::progress::Bars::new();
    let score = |dir: &Path, replacements: &BTreeMap<String, ndarray::ArrayD<f32>>, label: &str| {
        let bar = bars.bar(0, label);
        let result = perplexity(dir, text, replacements, &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        });
        bar.finish_and_clear();
        result
    };
    let line = |label: &str, p: &Perplexity, dense: Option<&Perplexity>| {
        let change = dense
            .map(|d| {
                format!(
                    "  ({:+.2}% vs dense)",
                    100.0 * (p.perplexity() / d.perplexity() - 1.0)
                )
            })
            .unwrap_or_default();
        println!(
            "{label:>10}: perplexity {:.4}  mean NLL {:.5} nats over {} tokens, {} paragraphs, {:.1} s{change}",
            p.perplexity(),
            p.mean_nll(),
            p.predicted_tokens,
            p.paragraphs,
            p.seconds
        );
    };
    let dense = score(model, &BTreeMap::new(), "dense")?;
    line("dense", &dense, None);
    if let Some(replacements) = &compressed {
        let p = score(model, replacements, "compressed")?;
        line("compressed", &p, Some(&dense));
    }
    if let Some(dir) = &args.densified {
        fips::foundation::output_set::check_member(dir)?;
        let p = score(dir, &BTreeMap::new(), "densified")?;
        line("densified", &p, Some(&dense));
    }
    Ok(())
}

/// Prints perplexities (unavailable: built without `text`).
#[cfg(not(feature = "text"))]
pub fn eval(
    _model: &Path,
    _args: &TextEvalArgs,
    _compressed: Option<&Path>,
) -> Result<(), FipsError> {
    Err(no_text_feature())
}

/// The dense rebuilds of a compressed file's MLP tensors (compact format 3, or the older
/// layouts), by original tensor name, and the compression method.
pub fn dense_replacements(
    compressed: &Path,
) -> Result<
    (
        std::collections::BTreeMap<String, ndarray::ArrayD<f32>>,
        String,
    ),
    FipsError,
> {
    use fips::format::checkpoint::Checkpoint;
    use fips::format::compact_file::{CompactModel, is_compact};
    fips::foundation::output_set::check_member(compressed)?;
    let file = Checkpoint::open(compressed)?;
    if is_compact(&file) {
        let model = CompactModel::read_from(&file, None)?;
        Ok((model.dense_tensors()?, model.manifest.method))
    } else {
        let model = fips::format::compressed::CompressedModel::read(compressed)?;
        Ok((model.dense_tensors()?, model.manifest.method))
    }
}

/// Writes the densified copy of a Hugging Face model folder (same shards, index, dtypes and side
/// files) for a compressed model of it.
pub fn densify_folder(compressed: &Path, original: &Path, out: &Path) -> Result<(), FipsError> {
    let (replacements, method) = dense_replacements(compressed)?;
    let folder = fips::format::hf::HfFolder::open(original)?;
    let report =
        folder.write_densified(&replacements, &format!("{method} compression"), out, false)?;
    println!(
        "wrote {}: {} tensors rebuilt in {} shard file(s); copied {}{}",
        report.dir.display(),
        report.replaced,
        report.shards.len(),
        report.copied.join(", "),
        if report.skipped.is_empty() {
            String::new()
        } else {
            format!("; not copied: {}", report.skipped.join(", "))
        }
    );
    Ok(())
}

/// Arguments of `fips compress` for language models.
#[derive(Debug, Clone, Args)]
pub struct TextCompressArgs {
    /// A Hugging Face model folder; with --text, captures calibration from text and compresses.
    #[arg(long, requires = "text")]
    pub model: Option<PathBuf>,
    /// Calibration text: paragraphs separated by blank lines.
    #[arg(long, requires = "model")]
    pub text: Option<PathBuf>,
    /// Calibration tokens per block (default: all of the text).
    #[arg(long, requires = "model")]
    pub tokens: Option<usize>,
    /// A text to score the dense and the compressed model on (perplexity).
    #[arg(long, requires = "model")]
    pub eval_text: Option<PathBuf>,
    /// Fraction of the calibration held out (seeded, never trained on) for the validation errors
    /// (and early stopping): paragraphs with --model (also scored by perplexity), whole images
    /// with --images, tokens of each group otherwise; 0 holds out nothing.
    #[arg(long, default_value_t = 0.05)]
    pub validation_fraction: f64,
    /// Memory in MiB a group's calibration may take to be read whole from an MLP-input file
    /// (--activations, and the text path's capture): inputs and targets, 8 × blocks × tokens ×
    /// width bytes. A larger group is streamed from the file (memory independent of the tokens,
    /// more CPU: targets recomputed per batch); 0 always streams. The bits are the same either way.
    #[arg(long, value_name = "MIB", default_value_t = fips::format::mlp_inputs::DEFAULT_CALIBRATION_MEMORY >> 20)]
    pub calibration_memory: u64,
    /// Keep the work area (out-dir/.fips-work: the captured calibration.safetensors and the
    /// groups' parts).
    #[arg(long, requires = "model")]
    pub keep_calibration: bool,
}

impl TextCompressArgs {
    /// `--calibration-memory` in bytes.
    pub fn calibration_memory_bytes(&self) -> Result<u64, FipsError> {
        self.calibration_memory
            .checked_mul(1 << 20)
            .ok_or_else(|| FipsError::InvalidParameter {
                name: "calibration-memory",
                reason: format!(
                    "{} MiB does not fit in 64-bit bytes",
                    self.calibration_memory
                ),
            })
    }
}

/// The general compress settings the text command uses (read only with the `text` feature).
#[cfg_attr(not(feature = "text"), allow(dead_code))]
pub struct CompressSettings<'a> {
    pub method: fips::Method,
    pub options: &'a fips::methods::options::MethodOptions,
    pub groups: Option<&'a str>,
    pub group_size: usize,
    pub activation: Option<fips::Activation>,
    pub densify: bool,
    pub seed: u64,
    pub out_dir: &'a Path,
    pub resume: fips::app::run_dir::Resume,
    /// `--work-dir`: the work area (kept); default `out_dir/.fips-work`.
    pub work_dir: Option<&'a Path>,
    /// `--only-group K`: compress group K into the work area and stop.
    pub only_group: Option<usize>,
}

/// Captures calibration from text and compresses (unavailable: built without `text`).
#[cfg(not(feature = "text"))]
pub fn compress(
    _model: &Path,
    _args: &TextCompressArgs,
    _settings: &CompressSettings<'_>,
) -> Result<(), FipsError> {
    Err(no_text_feature())
}

/// Captures calibration from text, compresses, writes the outputs and prints the report.
#[cfg(feature = "text")]
pub fn compress(
    model: &Path,
    args: &TextCompressArgs,
    settings: &CompressSettings<'_>,
) -> Result<(), FipsError> {
    use fips::app::text::compress::{
        TextCompressOptions, compress_text_group, compress_text_model,
    };
    use fips::methods::options::TEXT_DEFAULTS;
    let text = args.text.as_deref().ok_or_else(no_text)?;
    let compressor = settings
        .options
        .compressor(settings.method, &TEXT_DEFAULTS)?;
    let shapes = fips::format::hf::HfFolder::open(model)?
        .mlp_layout()?
        .block_shapes()?;
    let groups = match settings.groups {
        Some(spec) => fips::format::block_groups::BlockGroups::parse(spec, &shapes)?,
        None => fips::format::block_groups::BlockGroups::consecutive(&shapes, settings.group_size)?,
    };
    if compressor.steps() > 0 {
        let tokens = settings
            .options
            .batch_tokens
            .unwrap_or(TEXT_DEFAULTS.batch_tokens);
        super::blas_thread_hint(tokens, &shapes, &groups, settings.options.threads);
    }
    let parameters = serde_json::to_string(&compressor.parameters())
        .map_err(|e| FipsError::Numerical(e.to_string()))?;
    println!("method {}: {parameters}", compressor.method());
    let options = TextCompressOptions {
        tokens: args.tokens,
        seed: settings.seed,
        validation_fraction: args.validation_fraction,
        calibration_memory: args.calibration_memory_bytes()?,
        groups: settings.groups.map(str::to_string),
        group_size: settings.group_size,
        activation: settings.activation,
        densify: settings.densify,
        keep_calibration: args.keep_calibration,
        work_dir: settings.work_dir.map(Path::to_path_buf),
        eval_text: args.eval_text.clone(),
        resume: settings.resume,
    };
    let bars = super::progress::Bars::new();
    let bar = bars.bar(0, "capturing tokens");
    let mut observer = bars.observer(groups.len());
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    if let Some(group) = settings.only_group {
        let work_dir = settings
            .work_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| settings.out_dir.join(fips::app::run_dir::WORK_DIR));
        let part = compress_text_group(
            model,
            text,
            &options,
            compressor.as_ref(),
            &work_dir,
            group,
            &mut progress,
            &mut observer,
        );
        bar.finish_and_clear();
        drop(observer);
        let part = part?;
        println!(
            "{} the part of group {group} in {}{}",
            if part.computed { "wrote" } else { "found" },
            work_dir.display(),
            if part.capture_reused {
                " (captures of an earlier job with the same settings reused)"
            } else {
                ""
            }
        );
        if part.missing.is_empty() {
            println!(
                "every group is done: fips assemble --work-dir {} --out-dir DIR",
                work_dir.display()
            );
        } else {
            println!("groups still missing: {:?}", part.missing);
        }
        return Ok(());
    }
    let result = compress_text_model(
        model,
        text,
        &options,
        compressor.as_ref(),
        settings.out_dir,
        &mut progress,
        &mut observer,
    );
    bar.finish_and_clear();
    drop(observer);
    print_result(
        &result?,
        model,
        text,
        settings.seed,
        settings.out_dir,
        args.eval_text.as_deref(),
    );
    Ok(())
}

/// Prints what a text compression did (capture, groups, perplexities, outputs).
#[cfg(feature = "text")]
fn print_result(
    result: &fips::app::text::TextCompression,
    model: &Path,
    text: &Path,
    seed: u64,
    out_dir: &Path,
    eval_text: Option<&Path>,
) {
    let c = &result.capture;
    println!(
        "calibration: {} tokens × {} blocks from {} of {} paragraphs of {} (seed {}) in {:.1} s{}",
        c.tokens,
        c.blocks,
        c.paragraphs_used,
        c.paragraphs_available,
        text.display(),
        seed,
        c.seconds,
        if result.capture_reused {
            " (captured by an earlier run with the same settings, reused)"
        } else {
            ""
        }
    );
    println!("{}: {}", model.display(), result.layout);
    if let Some(v) = &result.validation_capture {
        println!(
            "held out: {} tokens from {} paragraphs (never trained on)",
            v.tokens, v.paragraphs_used
        );
    }
    let report = &result.report;
    println!("{}", report.group_table());
    if let Some((dense, comp)) = &result.validation_perplexity {
        println!(
            "perplexity on the held-out paragraphs: dense {:.4}, compressed {:.4} ({:+.2}%)",
            dense.perplexity(),
            comp.perplexity(),
            100.0 * (comp.perplexity() / dense.perplexity() - 1.0)
        );
    }
    let bytes = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({} bytes)",
        result.compressed.display(),
        bytes(&result.compressed)
    );
    if let Some(d) = &result.densified {
        println!("wrote {}", d.dir.display());
    }
    if let (Some(dense), Some(comp)) = (&result.dense_perplexity, &result.compressed_perplexity) {
        println!(
            "perplexity on {}: dense {:.4}, compressed {:.4} ({:+.2}%) over {} tokens",
            eval_text
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            dense.perplexity(),
            comp.perplexity(),
            100.0 * (comp.perplexity() / dense.perplexity() - 1.0),
            dense.predicted_tokens
        );
    }
    let report_path = out_dir.join(fips::app::run_dir::REPORT_FILE);
    println!("wrote {}", report_path.display());
    println!("{}", report.summary_line());
}

/// `fips assemble` of a scattered text run: the outputs from the work area's parts and captures
/// (`model` and `text` must be the folder and text the parts were made from).
#[cfg(feature = "text")]
pub fn assemble(
    work_dir: &Path,
    out_dir: &Path,
    model: &Path,
    text: &Path,
    densify: bool,
    eval_text: Option<&Path>,
    seed: u64,
) -> Result<(), FipsError> {
    use fips::app::text::{TextAssembleOptions, assemble_text_model};
    let options = TextAssembleOptions {
        model_dir: Some(model.to_path_buf()),
        text: Some(text.to_path_buf()),
        densify,
        eval_text: eval_text.map(Path::to_path_buf),
    };
    let result = assemble_text_model(work_dir, out_dir, &options)?;
    print_result(&result, model, text, seed, out_dir, eval_text);
    Ok(())
}

/// `fips assemble` of a text run (unavailable: built without `text`).
#[cfg(not(feature = "text"))]
pub fn assemble(
    _work_dir: &Path,
    _out_dir: &Path,
    _model: &Path,
    _text: &Path,
    _densify: bool,
    _eval_text: Option<&Path>,
    _seed: u64,
) -> Result<(), FipsError> {
    Err(no_text_feature())
}
