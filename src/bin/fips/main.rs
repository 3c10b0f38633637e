//! `fips`: compress, evaluate, inspect and densify transformer checkpoints from the command line.

mod progress;
mod text_cmd;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use fips::app::distill::{
    DistillParams, DistillRecord, DistillValidParams, check_teacher, distill_model,
};
use fips::app::images::decode_split;
use fips::app::metrics::{Accuracy, agreement};
use fips::app::pipeline::{
    self, CALIB_SPLIT, CalibrationSource, CaptureStreams, DATA_FREE_TOKENS, EVAL_SPLIT, OUT_DIR,
};
use fips::app::report::{Evaluation, RunReport};
use fips::app::run_dir::{
    self, CalibrationSettings, ImageSetContext, OutputOptions, Resume, RunContext, RunSettings,
    WorkArea,
};
use fips::app::vit::VisionTransformer;
use fips::format::block_groups::DEFAULT_GROUP_SIZE;
use fips::format::compact_file::{CompactModel, is_compact, read_manifest, size_breakdown};
use fips::format::compressed::{COMPRESSED_FORMAT, MANIFEST_KEY};
use fips::format::mlp_inputs::{MlpInputs, write_mlp_inputs};
use fips::foundation::thread_plan;
use fips::math::budget::{DEFAULT_BUDGET_FRACTION, DEFAULT_SPARSITY};
use fips::methods::options::{DEFAULT_SEED, MethodOptions, SparsifierKind, VIT_DEFAULTS};
use fips::methods::params::{
    DEFAULT_COLLAPSE_LAMBDA, DEFAULT_COLLAPSE_STEPS, DEFAULT_RANK_GRID, DEFAULT_RESIDUAL_RANK,
    DEFAULT_RESIDUAL_STEPS,
};
use fips::{
    Activation, AdamW, BlockGroups, Checkpoint, CompressedModel, ContractionOrder, FipsError,
    InitMethod, MaskTiles, Method, MlpLayout, ParamGuard,
};
use ndarray::Array4;

use progress::Bars;

/// Fine-grained Parameter Sharing: compress the MLPs of a transformer checkpoint into a shared
/// basis and sparse factors per group of blocks.
#[derive(Debug, Parser)]
#[command(name = "fips", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compress a checkpoint's MLPs; write the compressed and densified checkpoints; evaluate.
    Compress(Box<CompressArgs>),
    /// Write the outputs of a scattered run once every group's part is in its work area.
    Assemble(AssembleArgs),
    /// Evaluate a ViT/DeiT checkpoint (and optionally a compressed one) on labelled images.
    Eval(EvalArgs),
    /// Describe a checkpoint, a compressed checkpoint or an MLP-input file.
    Inspect {
        /// The safetensors file.
        file: PathBuf,
    },
    /// Rebuild the dense checkpoint from a compressed one (and its original, unless the
    /// compressed file is self-contained).
    Densify {
        /// The compressed checkpoint (written by `fips compress`).
        #[arg(long)]
        compressed: PathBuf,
        /// The original checkpoint it was made from (not needed for a self-contained file).
        #[arg(long)]
        original: Option<PathBuf>,
        /// Where to write the densified checkpoint.
        #[arg(long)]
        out: PathBuf,
    },
    /// Capture the MLP inputs of a ViT/DeiT on images (or of a language model on text, with
    /// --model and --text) and write them as an MLP-input file.
    Capture {
        /// The ViT/DeiT checkpoint (timm names).
        #[arg(long, required_unless_present = "model")]
        checkpoint: Option<PathBuf>,
        #[command(flatten)]
        text: text_cmd::TextCaptureArgs,
        #[command(flatten)]
        images: ImageArgs,
        /// Blocks to capture, e.g. `0-3` or `0-11` (default: all).
        #[arg(long)]
        blocks: Option<String>,
        /// Where to write the file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MethodArg {
    /// Fine-grained Parameter Sharing: shared basis + sparse factors per group.
    Fips,
    /// Per-layer truncated SVD (add --svd-train to train it with FiPS's loss).
    Svd,
    /// SVD-LLM-style whitened SVD per layer.
    SvdLlm,
    /// Basis sharing: one whitened input basis per matrix type and group.
    BasisSharing,
    /// Activation-aware mixed ranks (greedy over the group) with trained residuals.
    MixedRank,
    /// LayerCollapse: linearise every block of the groups and merge fc2 · fc1.
    LayerCollapse,
}

impl From<MethodArg> for Method {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::Fips => Method::Fips,
            MethodArg::Svd => Method::Svd,
            MethodArg::SvdLlm => Method::SvdLlm,
            MethodArg::BasisSharing => Method::BasisSharing,
            MethodArg::MixedRank => Method::MixedRank,
            MethodArg::LayerCollapse => Method::LayerCollapse,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SparsifierArg {
    /// RigL dynamic sparse training (reference DeiT setting).
    Rigl,
    /// Gradual magnitude pruning on a cubic schedule.
    Gmp,
    /// No sparsity (requires --sparsity 0).
    None,
}

impl From<SparsifierArg> for SparsifierKind {
    fn from(s: SparsifierArg) -> Self {
        match s {
            SparsifierArg::Rigl => SparsifierKind::Rigl,
            SparsifierArg::Gmp => SparsifierKind::Gmp,
            SparsifierArg::None => SparsifierKind::None,
        }
    }
}

#[derive(Debug, Clone, Args)]
struct ImageArgs {
    /// Image set: a directory with `labels.tsv` and the split folders (e.g. ../shared/data/imagenet-sample).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Split of the image set used for calibration.
    #[arg(long, default_value = CALIB_SPLIT)]
    calib_split: String,
    /// Use only the first N calibration images (default: all).
    #[arg(long)]
    calib_images: Option<usize>,
}

#[derive(Debug, Args)]
struct CompressArgs {
    /// The checkpoint (safetensors; timm ViT/DeiT, HF BERT/ViT, or Llama-style gated names).
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    checkpoint: Option<PathBuf>,
    #[command(flatten)]
    text: text_cmd::TextCompressArgs,
    #[command(flatten)]
    images: ImageArgs,
    /// With --images: how much each image's class token weighs among the training tokens (the
    /// head reads only it; 1 weighs every token alike). Chosen on held-out calibration images
    /// [default: 10].
    #[arg(long, requires = "images")]
    class_token_weight: Option<usize>,
    /// Calibrate from an MLP-input file (`blocks.{b}.mlp_input`, see `fips capture`) instead of images.
    #[arg(long, conflicts_with = "images")]
    activations: Option<PathBuf>,
    /// Calibrate on Gaussian noise (data-free; labelled as such in every report).
    #[arg(long, conflicts_with_all = ["images", "activations"])]
    data_free: bool,
    /// Tokens per block for --data-free.
    #[arg(long, default_value_t = DATA_FREE_TOKENS)]
    data_free_tokens: usize,
    /// Compression method.
    #[arg(long, value_enum, default_value_t = MethodArg::Fips)]
    method: MethodArg,
    /// Fraction p of the dense MLP weights to keep (per group; per matrix for svd and svd-llm).
    #[arg(long, default_value_t = DEFAULT_BUDGET_FRACTION)]
    budget: f64,
    /// Use this rank instead of deriving it from --budget.
    #[arg(long)]
    rank: Option<usize>,
    /// Target sparsity s of the factors V.
    #[arg(long, default_value_t = DEFAULT_SPARSITY)]
    sparsity: f64,
    /// How V reaches its sparsity [default: rigl; gmp with --model, the text defaults].
    #[arg(long, value_enum)]
    sparsifier: Option<SparsifierArg>,
    /// Steps between sparsifier updates (GMP pruning events, RigL drop/grow) [50 with --model,
    /// the text defaults].
    #[arg(long, default_value_t = VIT_DEFAULTS.sparsifier_interval)]
    sparsifier_interval: usize,
    /// RigL's initial drop fraction: the share of kept entries of V swapped at its first update,
    /// decaying to 0 by 3/4 of the steps (also 0.05 with --model, the text defaults).
    #[arg(long, default_value_t = VIT_DEFAULTS.rigl_drop_fraction)]
    rigl_drop_fraction: f64,
    /// Consecutive blocks per group (groups never mix shapes).
    #[arg(long, default_value_t = DEFAULT_GROUP_SIZE, conflicts_with = "groups")]
    group_size: usize,
    /// Explicit groups, e.g. `0-3,4-7,8-11` (blocks not listed stay dense).
    #[arg(long)]
    groups: Option<String>,
    /// Training steps per group (fips; svd with --svd-train).
    #[arg(long, default_value_t = VIT_DEFAULTS.steps)]
    steps: usize,
    /// svd: train the factors with FiPS's loss and optimiser (--steps, --lr, …).
    #[arg(long)]
    svd_train: bool,
    /// mixed-rank: rank q of each trained residual.
    #[arg(long, default_value_t = DEFAULT_RESIDUAL_RANK)]
    residual_rank: usize,
    /// mixed-rank: step of the candidate ranks.
    #[arg(long, default_value_t = DEFAULT_RANK_GRID)]
    rank_grid: usize,
    /// mixed-rank: Adam steps per residual.
    #[arg(long, default_value_t = DEFAULT_RESIDUAL_STEPS)]
    residual_steps: usize,
    /// layer-collapse: weight λ of (α − 1)².
    #[arg(long, default_value_t = DEFAULT_COLLAPSE_LAMBDA)]
    collapse_lambda: f64,
    /// layer-collapse: step limit per block.
    #[arg(long, default_value_t = DEFAULT_COLLAPSE_STEPS)]
    collapse_steps: usize,
    /// Calibration tokens per mini-batch.
    #[arg(long, default_value_t = VIT_DEFAULTS.batch_tokens)]
    batch_tokens: usize,
    /// Peak learning rate of AdamW (cosine decay to --min-lr).
    #[arg(long, default_value_t = VIT_DEFAULTS.learning_rate)]
    lr: f64,
    /// Final learning rate of the cosine decay.
    #[arg(long, default_value_t = VIT_DEFAULTS.min_learning_rate)]
    min_lr: f64,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = AdamW::default().weight_decay)]
    weight_decay: f64,
    /// Seed of the mini-batch sampler (and of --data-free inputs).
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Threads of the elementwise passes (fips, trained svd); default: all cores. BLAS threads
    /// follow OPENBLAS_NUM_THREADS in the environment.
    #[arg(long)]
    threads: Option<usize>,
    /// Initialisation route.
    #[arg(long, default_value_t = InitMethod::default())]
    init: InitMethod,
    /// Contraction order of the training step: auto, factors-first or weights-first.
    #[arg(long, default_value_t = ContractionOrder::default())]
    contraction: ContractionOrder,
    /// fips: stop a group's training once its error on the held-out validation tokens has not
    /// improved for this many steps (scored every PATIENCE/4 steps; needs
    /// --validation-fraction > 0).
    #[arg(long, value_name = "PATIENCE")]
    early_stop: Option<usize>,
    /// fips: relative improvement of the validation error that counts for --early-stop.
    #[arg(long, requires = "early_stop")]
    early_stop_tolerance: Option<f64>,
    /// fips: structure of the factors' mask: entries, or 2x2 (entries of V kept or dropped in
    /// 2×2 tiles, for faster sparse inference at many tokens; the kept count may fall up to 3
    /// short of the target). 2x2 costs accuracy: DeiT-tiny at p = 0.5 loses 11.2 points of
    /// top-1 against 0.8 with entries. 1x2 and 2x1 (pairs along a row or a column of V) are
    /// for experiments: no inference kernel uses them, and they cost accuracy too.
    #[arg(long, default_value_t = MaskTiles::default())]
    mask_tiles: MaskTiles,
    /// fips: keep the reference's parameter count. By default, when the rank exceeds the width
    /// (DeiT-tiny at p = 0.5, s = 0.75), the basis parameters of padded components that RigL can
    /// never train are given to V, so the group holds the whole budget; with this flag they stay
    /// unused and are dropped from the file (it then holds about 95 % of the budget).
    #[arg(long)]
    keep_unused_rank: bool,
    /// fips with --images: steps of end-to-end distillation after the block-wise fits (the
    /// bases, the kept entries of every factor and the biases of all groups trained together so
    /// that the compressed model's class probabilities match the dense model's on fresh random
    /// views of the calibration images; masks and size unchanged). 0 skips it
    /// [default: 30 with fips and --images].
    #[arg(long)]
    distill_steps: Option<usize>,
    /// Peak learning rate of the distillation (cosine decay) [default: 3e-5].
    #[arg(long)]
    distill_lr: Option<f64>,
    /// Override the MLP activation (default: the naming scheme's).
    #[arg(long)]
    activation: Option<Activation>,
    /// Directory for the outputs.
    #[arg(long, default_value = OUT_DIR)]
    out_dir: PathBuf,
    /// Skip writing the densified checkpoint.
    #[arg(long)]
    no_densified: bool,
    /// Write the compressed model as one self-contained file (every other tensor of the
    /// checkpoint copied in), loadable without the original.
    #[arg(long)]
    self_contained: bool,
    /// Skip the evaluation (ViT/DeiT with --images only).
    #[arg(long)]
    no_eval: bool,
    /// Split of the image set used for evaluation (never the calibration split).
    #[arg(long, default_value = EVAL_SPLIT)]
    eval_split: String,
    /// ViT attention heads (default: width / 64).
    #[arg(long)]
    heads: Option<usize>,
    #[command(flatten)]
    work: WorkArgs,
}

/// Resuming and scattering a run (see docs/scale-out.md).
#[derive(Debug, Args)]
struct WorkArgs {
    /// Work area holding each finished group's part (default: OUT_DIR/.fips-work, removed after
    /// a successful run; a directory given here is kept).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Compress only group K (0-based) into the work area and stop (one job of a scattered run;
    /// `fips assemble` writes the outputs once every group is done).
    #[arg(long, value_name = "K")]
    only_group: Option<usize>,
    /// Continue a run from its work area and fail if there is none (a rerun of the same command
    /// resumes anyway).
    #[arg(long, conflicts_with = "fresh")]
    resume: bool,
    /// Discard the parts in the work area and start afresh (needed when the settings changed).
    #[arg(long)]
    fresh: bool,
}

#[derive(Debug, Args)]
struct AssembleArgs {
    /// The work area every group's part was written to (`fips compress --only-group K --work-dir DIR`).
    #[arg(long)]
    work_dir: PathBuf,
    /// Directory for the outputs.
    #[arg(long, default_value = OUT_DIR)]
    out_dir: PathBuf,
    /// The checkpoint (default: the path the parts' run recorded; its content must match).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Skip writing the densified checkpoint.
    #[arg(long)]
    no_densified: bool,
    /// Write the compressed model as one self-contained file.
    #[arg(long)]
    self_contained: bool,
    /// Evaluate on this labelled image set (ViT/DeiT).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Split of the image set used for evaluation.
    #[arg(long, default_value = EVAL_SPLIT)]
    eval_split: String,
    /// ViT attention heads (default: width / 64).
    #[arg(long)]
    heads: Option<usize>,
    /// A text run: the model folder (default: the path the parts' run recorded; its content must
    /// match).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A text run: the calibration text (default: the path the parts' run recorded; its content
    /// must match).
    #[arg(long)]
    text: Option<PathBuf>,
    /// A text run: a text to score the dense and the compressed model on (perplexity).
    #[arg(long)]
    eval_text: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct EvalArgs {
    /// The ViT/DeiT checkpoint (timm names): the dense model.
    #[arg(long, required_unless_present = "model")]
    checkpoint: Option<PathBuf>,
    #[command(flatten)]
    text: text_cmd::TextEvalArgs,
    /// A compressed checkpoint of it to evaluate too.
    #[arg(long)]
    compressed: Option<PathBuf>,
    /// Image set directory (with labels.tsv).
    #[arg(long, required_unless_present = "model")]
    images: Option<PathBuf>,
    /// Split to evaluate on.
    #[arg(long, default_value = EVAL_SPLIT)]
    split: String,
    /// ViT attention heads (default: width / 64).
    #[arg(long)]
    heads: Option<usize>,
}

fn main() -> ExitCode {
    // OpenBLAS's kernels for this processor, also where the library is older than the processor
    // (it picks them when it loads, so this may run the command again with them set).
    fips::foundation::blas::use_native_kernels();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Compress(args) => {
            let given = matches
                .subcommand_matches("compress")
                .map(explicit_options)
                .unwrap_or_default();
            compress(*args, &given)
        }
        Command::Assemble(args) => assemble(args),
        Command::Eval(args) => eval(args),
        Command::Inspect { file } => inspect(&file),
        Command::Densify {
            compressed,
            original,
            out,
        } => densify(&compressed, original.as_deref(), &out),
        Command::Capture {
            checkpoint,
            text,
            images,
            blocks,
            out,
        } => match (&text.model, checkpoint) {
            (Some(model), _) => text_cmd::capture(model, &text, &out),
            (None, Some(checkpoint)) => capture(&checkpoint, &images, blocks.as_deref(), &out),
            (None, None) => Err(FipsError::InvalidParameter {
                name: "checkpoint",
                reason: "capture needs --checkpoint (images) or --model and --text".into(),
            }),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Says which BLAS thread count suits this run when the environment sets none
/// ([`thread_plan::planned_blas_threads`]; OpenBLAS reads it only at start-up, so it is the
/// caller's to set): with small training GEMMs, one BLAS thread and the blocks of a group in
/// parallel is faster than OpenBLAS's default of every core.
fn blas_thread_hint(
    tokens: usize,
    shapes: &[(usize, usize)],
    groups: &BlockGroups,
    threads: Option<usize>,
) {
    if fips::foundation::blas::configured_threads().is_some() {
        return;
    }
    let cores = threads.unwrap_or_else(thread_plan::available_threads);
    let blocks = groups.groups().iter().map(Vec::len).max().unwrap_or(1);
    let (width, intermediate) = shapes
        .iter()
        .fold((0, 0), |(d, i), &(w, m)| (d.max(w), i.max(m)));
    if thread_plan::planned_blas_threads(tokens, width, intermediate, blocks, cores) == 1 {
        println!(
            "note: the training GEMMs are small ({tokens} x {width} x {intermediate}): with \
             OPENBLAS_NUM_THREADS=1 in the environment the blocks of a group train in parallel, \
             one core each, which is faster here than OpenBLAS's default of every core"
        );
    }
}

/// The ids of the compress flags given on the command line (not defaulted).
fn explicit_options(matches: &ArgMatches) -> Vec<String> {
    matches
        .ids()
        .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.as_str().to_string())
        .collect()
}

/// The method options given on the command line; flags left at their defaults stay `None`, so the
/// library applies its defaults and rejects only what was asked for.
fn method_options(args: &CompressArgs, given: &[String]) -> MethodOptions {
    let set = |id: &str| given.iter().any(|g| g == id);
    MethodOptions {
        budget: pick(given, "budget", args.budget),
        rank: args.rank,
        sparsity: pick(given, "sparsity", args.sparsity),
        sparsifier: args.sparsifier.map(Into::into),
        sparsifier_interval: pick(given, "sparsifier_interval", args.sparsifier_interval),
        rigl_drop_fraction: pick(given, "rigl_drop_fraction", args.rigl_drop_fraction),
        steps: pick(given, "steps", args.steps),
        svd_train: args.svd_train,
        residual_rank: pick(given, "residual_rank", args.residual_rank),
        rank_grid: pick(given, "rank_grid", args.rank_grid),
        residual_steps: pick(given, "residual_steps", args.residual_steps),
        collapse_lambda: pick(given, "collapse_lambda", args.collapse_lambda),
        collapse_steps: pick(given, "collapse_steps", args.collapse_steps),
        batch_tokens: pick(given, "batch_tokens", args.batch_tokens),
        learning_rate: pick(given, "lr", args.lr),
        min_learning_rate: pick(given, "min_lr", args.min_lr),
        weight_decay: pick(given, "weight_decay", args.weight_decay),
        seed: pick(given, "seed", args.seed),
        threads: args.threads,
        init: set("init").then_some(args.init),
        contraction: set("contraction").then_some(args.contraction),
        early_stop: args.early_stop,
        early_stop_tolerance: args.early_stop_tolerance,
        mask_tiles: set("mask_tiles").then_some(args.mask_tiles),
        keep_unused_rank: args.keep_unused_rank,
    }
}

/// `value` if flag `id` was given on the command line.
fn pick<T>(given: &[String], id: &str, value: T) -> Option<T> {
    given.iter().any(|g| g == id).then_some(value)
}

/// Decodes one split with a progress bar.
fn decode(
    dir: &Path,
    split: &str,
    limit: Option<usize>,
    bars: &Bars,
) -> Result<(Array4<u8>, Vec<usize>), FipsError> {
    let mut bar = None;
    let decoded = decode_split(dir, split, limit, &mut |done, total| {
        let bar = bar.get_or_insert_with(|| bars.bar(total, &format!("decoding {split}")));
        bar.set_position(done as u64);
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    decoded
}

fn compress(args: CompressArgs, given: &[String]) -> Result<(), FipsError> {
    if args.class_token_weight.is_some() && args.images.images.is_none() {
        return Err(FipsError::InvalidParameter {
            name: "class-token-weight",
            reason: "it weighs the class tokens of images captured with --images".into(),
        });
    }
    let distillation = distill_params(&args)?;
    if let Some(model) = &args.text.model {
        let options = method_options(&args, given);
        let settings = text_cmd::CompressSettings {
            method: args.method.into(),
            options: &options,
            groups: args.groups.as_deref(),
            group_size: args.group_size,
            activation: args.activation,
            densify: !args.no_densified,
            seed: args.seed,
            out_dir: &args.out_dir,
            resume: if args.work.fresh {
                Resume::Fresh
            } else if args.work.resume {
                Resume::Require
            } else {
                Resume::Auto
            },
            work_dir: args.work.work_dir.as_deref(),
            only_group: args.work.only_group,
        };
        return text_cmd::compress(model, &args.text, &settings);
    }
    let Some(checkpoint_path) = &args.checkpoint else {
        return Err(FipsError::InvalidParameter {
            name: "checkpoint",
            reason: "compress needs --checkpoint FILE or --model DIR --text FILE".into(),
        });
    };
    if args.activations.is_none() && given.iter().any(|g| g == "calibration_memory") {
        // Like a method flag the method does not use: refused, not silently ignored.
        return Err(FipsError::InvalidParameter {
            name: "calibration-memory",
            reason: "applies to calibration read from a file (--activations, or --model with \
                     --text); this run calibrates from images or Gaussian inputs in memory"
                .into(),
        });
    }
    let start = Instant::now();
    let bars = Bars::new();
    if args.images.images.is_some() && !args.no_eval && args.eval_split == args.images.calib_split {
        return Err(FipsError::InvalidParameter {
            name: "eval_split",
            reason: format!(
                "{:?} is also the calibration split: evaluate on images not used for calibration",
                args.eval_split
            ),
        });
    }
    let compressor = method_options(&args, given).compressor(args.method.into(), &VIT_DEFAULTS)?;
    let checkpoint = Checkpoint::open(checkpoint_path)?;
    let layout = MlpLayout::detect(&checkpoint)?;
    let shapes = layout.block_shapes()?;
    let groups = match &args.groups {
        Some(spec) => BlockGroups::parse(spec, &shapes)?,
        None => BlockGroups::consecutive(&shapes, args.group_size)?,
    };
    if compressor.steps() > 0 {
        blas_thread_hint(args.batch_tokens, &shapes, &groups, args.threads);
    }
    println!("{}: {layout}", checkpoint_path.display());
    let activation = args.activation.unwrap_or(layout.default_activation());
    // No output may be an input (checked before any work).
    let mut outputs = vec![
        args.out_dir.join(run_dir::COMPRESSED_FILE),
        args.out_dir.join(run_dir::REPORT_FILE),
    ];
    if !args.no_densified {
        outputs.push(args.out_dir.join(run_dir::DENSIFIED_FILE));
    }
    outputs.extend((0..groups.len()).map(|g| args.out_dir.join(format!("loss_group{g}.svg"))));
    let mut inputs = vec![checkpoint_path.to_path_buf()];
    inputs.extend(args.activations.clone());
    inputs.extend(args.images.images.as_ref().map(|d| d.join("labels.tsv")));
    fips::foundation::safe_io::check_outputs(&inputs, &outputs)?;
    let parameters = serde_json::to_string(&compressor.parameters())
        .map_err(|e| FipsError::Numerical(e.to_string()))?;
    println!(
        "method {}, groups {groups}: {parameters}",
        compressor.method()
    );
    // Everything that can fail is checked before the first training step.
    let only = args.work.only_group;
    let evaluate = args.images.images.is_some() && !args.no_eval && only.is_none();
    let work_dir = args
        .work
        .work_dir
        .clone()
        .unwrap_or_else(|| args.out_dir.join(run_dir::WORK_DIR));
    match &args.work.work_dir {
        Some(dir) => run_dir::check_writable(dir)?,
        None => run_dir::check_writable(&args.out_dir)?,
    }
    if only.is_none() && args.work.work_dir.is_some() {
        run_dir::check_writable(&args.out_dir)?;
    }
    if let Some(k) = only.filter(|&k| k >= groups.len()) {
        return Err(FipsError::IndexOutOfRange {
            what: "group (--only-group)",
            index: k,
            len: groups.len(),
        });
    }
    if let Some(dir) = &args.images.images {
        run_dir::check_split(dir, &args.images.calib_split, args.images.calib_images)?;
        if evaluate {
            run_dir::check_split(dir, &args.eval_split, None)?;
        }
    }

    let vit = match args.images.images {
        Some(_) => Some(VisionTransformer::from_checkpoint(&checkpoint, args.heads)?),
        None => None,
    };
    if let (Some(params), Some(vit)) = (&distillation, &vit) {
        check_teacher(vit, params)?;
    }
    let calib_pixels = match &args.images.images {
        Some(dir) => Some(decode(
            dir,
            &args.images.calib_split,
            args.images.calib_images,
            &bars,
        )?),
        None => None,
    };
    let budget = args.text.calibration_memory_bytes()?;
    let inputs_file = args
        .activations
        .as_ref()
        .map(|p| Ok::<_, FipsError>(MlpInputs::open(p)?.with_memory_budget(budget)))
        .transpose()?;
    if let Some(file) = &inputs_file {
        file.check_groups(groups.groups(), &shapes)?;
    }
    // Each group's capture continues from where the previous group's stopped.
    let streams = CaptureStreams::new();
    let calibration = match (&vit, &calib_pixels, &inputs_file) {
        (Some(vit), Some((pixels, _)), _) => CalibrationSource::Images {
            vit,
            pixels: pixels.view(),
            class_token_weight: args
                .class_token_weight
                .unwrap_or(pipeline::DEFAULT_CLASS_TOKEN_WEIGHT),
            streams: Some(&streams),
        },
        (_, _, Some(file)) => CalibrationSource::File(file),
        _ if args.data_free => CalibrationSource::Gaussian {
            tokens: args.data_free_tokens,
            seed: args.seed,
        },
        _ => {
            return Err(FipsError::InvalidParameter {
                name: "calibration",
                reason: "give --images DIR, --activations FILE, or --data-free".into(),
            });
        }
    };

    let fraction = args.text.validation_fraction;
    let validation = if fraction != 0.0 {
        pipeline::Validation::Holdout {
            fraction,
            seed: args.seed,
        }
    } else {
        pipeline::Validation::None
    };
    pipeline::check_batch(
        compressor.as_ref(),
        &calibration,
        &validation,
        groups.groups(),
    )?;
    let settings = RunSettings::new(
        checkpoint_path,
        &layout,
        compressor.as_ref(),
        &groups,
        activation,
        CalibrationSettings::of(&calibration, args.activations.as_deref())?,
        &validation,
    )?;
    let resume = if args.work.fresh {
        Resume::Fresh
    } else if args.work.resume {
        Resume::Require
    } else {
        Resume::Auto
    };
    let context = RunContext {
        checkpoint: checkpoint_path.display().to_string(),
        text: None,
        images: args.images.images.as_ref().map(|dir| ImageSetContext {
            dir: dir.display().to_string(),
            calib_split: args.images.calib_split.clone(),
        }),
        distillation: distillation
            .as_ref()
            .map(|p| serde_json::to_value(p.params()))
            .transpose()
            .map_err(|e| FipsError::Numerical(e.to_string()))?,
    };
    let work = WorkArea::open(&work_dir, settings, context, resume)?;
    let mut observer = bars.observer(groups.len());
    pipeline_parts(
        &checkpoint,
        &layout,
        compressor.as_ref(),
        activation,
        &calibration,
        &mut observer,
        &work,
        only,
    )?;
    drop(observer);
    if let Some(k) = only {
        println!("wrote the part of group {k} to {}", work.dir().display());
        let missing = work.missing();
        if missing.is_empty() {
            println!(
                "every group is done: fips assemble --work-dir {} --out-dir DIR",
                work.dir().display()
            );
        } else {
            println!("groups still missing: {missing:?}");
        }
        return Ok(());
    }
    let mut run = work.assemble(start.elapsed())?;
    if let (Some(params), Some(vit), Some((pixels, _))) = (distillation, &vit, &calib_pixels) {
        run.model = distill(&work, vit, &run.model, pixels.view(), params, &bars)?;
    }
    let mut report = RunReport::new(checkpoint_path, &layout, compressor.as_ref(), &run);
    println!("{}", report.group_table());
    let written = write_run(
        &args.out_dir,
        &run,
        &mut report,
        &checkpoint,
        &layout,
        evaluate
            .then_some(())
            .and(vit.as_ref().zip(args.images.images.as_deref())),
        &args.eval_split,
        OutputOptions {
            densified: !args.no_densified,
            self_contained: args.self_contained,
        },
        &bars,
        start,
    )?;
    if args.work.work_dir.is_none() {
        work.remove()?;
    }
    for path in written {
        println!("wrote {}", path.display());
    }
    report.wall_time = start.elapsed();
    println!("{}", report.summary_line());
    Ok(())
}

/// The end-to-end distillation `fips compress` runs after the block-wise fits: with fips and
/// `--images`, [`DistillParams::default`] unless `--distill-steps` or `--distill-lr` say
/// otherwise (`--distill-steps 0`: none). Either flag on a run that cannot distil (another
/// method, text, activations from a file, data-free) is refused, not ignored.
fn distill_params(args: &CompressArgs) -> Result<Option<DistillValidParams>, FipsError> {
    let given = args.distill_steps.is_some_and(|n| n > 0) || args.distill_lr.is_some();
    let possible = args.method == MethodArg::Fips && args.images.images.is_some();
    if !possible {
        if given {
            return Err(FipsError::InvalidParameter {
                name: "distill-steps",
                reason: "end-to-end distillation trains fips groups of a ViT/DeiT calibrated on \
                         images (--images)"
                    .into(),
            });
        }
        return Ok(None);
    }
    let defaults = DistillParams::default();
    let learning_rate = args.distill_lr.unwrap_or(defaults.learning_rate);
    let params = DistillParams {
        steps: args.distill_steps.unwrap_or(defaults.steps),
        learning_rate,
        // The floor of the cosine decay never above the peak.
        min_learning_rate: defaults.min_learning_rate.min(learning_rate),
        seed: args.seed,
        ..defaults
    };
    if params.steps == 0 {
        if args.distill_lr.is_some() {
            return Err(FipsError::InvalidParameter {
                name: "distill-lr",
                reason: "there is no distillation to apply it to (--distill-steps 0)".into(),
            });
        }
        return Ok(None);
    }
    params.check().map(Some)
}

/// The model distilled end to end from `model` (the run's parts) on the calibration images
/// `pixels`; reused from the work area when an earlier run distilled the same parts with the
/// same settings, and kept there until the outputs are written.
fn distill(
    work: &WorkArea,
    vit: &VisionTransformer,
    model: &CompressedModel,
    pixels: ndarray::ArrayView4<'_, u8>,
    params: DistillValidParams,
    bars: &Bars,
) -> Result<CompressedModel, FipsError> {
    let settings =
        serde_json::to_value(params.params()).map_err(|e| FipsError::Numerical(e.to_string()))?;
    if let Some(distilled) = work.read_distilled(&settings)? {
        println!(
            "distillation: the model distilled by an earlier run from the same parts with the \
             same settings is reused"
        );
        if let Some(record) = &distilled.manifest.distillation {
            let record: DistillRecord = serde_json::from_value(record.clone())
                .map_err(|e| FipsError::Numerical(format!("unreadable distillation: {e}")))?;
            println!("{}", record.summary());
        }
        return Ok(distilled);
    }
    let (train, held) = work
        .settings()
        .held_out_images(pixels.len_of(ndarray::Axis(0)))?;
    let (train, held) = (
        pixels.select(ndarray::Axis(0), &train),
        pixels.select(ndarray::Axis(0), &held),
    );
    let p = params.params();
    println!(
        "distilling every group end to end: {} steps of {} views of {} calibration images, lr \
         {:e}, checked on the {} held-out images",
        p.steps,
        p.images_per_step,
        train.len_of(ndarray::Axis(0)),
        p.learning_rate,
        held.len_of(ndarray::Axis(0))
    );
    let start = Instant::now();
    let (distilled, record) = distill_model(
        vit,
        model,
        train.view(),
        held.view(),
        params,
        &mut bars.distill_progress(),
    )?;
    work.write_distilled(&settings, &distilled)?;
    println!("distilled in {:.1} s", start.elapsed().as_secs_f64());
    println!("{}", record.summary());
    Ok(distilled)
}

/// Writes the output set of `run` into `out_dir`, evaluating it first on the `eval_split` images
/// when `eval` gives the dense ViT and the image folder.
#[allow(clippy::too_many_arguments)]
fn write_run(
    out_dir: &Path,
    run: &fips::app::pipeline::ModelCompression,
    report: &mut RunReport,
    checkpoint: &Checkpoint,
    layout: &MlpLayout,
    eval: Option<(&VisionTransformer, &Path)>,
    eval_split: &str,
    options: OutputOptions,
    bars: &Bars,
    start: Instant,
) -> Result<Vec<PathBuf>, FipsError> {
    let measure = |vit: &VisionTransformer, dir: &Path| -> Result<Evaluation, FipsError> {
        let (pixels, labels) = decode(dir, eval_split, None, bars)?;
        Evaluation::measure(
            vit,
            run,
            layout,
            (pixels.view(), &labels, eval_split),
            &mut bars.classify_observer("eval dense"),
            &mut bars.classify_observer("eval compressed"),
        )
    };
    let mut evaluate = eval.map(|(vit, dir)| move || measure(vit, dir));
    run_dir::write_outputs(
        out_dir,
        run,
        report,
        checkpoint,
        options,
        evaluate
            .as_mut()
            .map(|f| f as &mut dyn FnMut() -> Result<Evaluation, FipsError>),
        start,
    )
}

/// Runs the groups whose parts the work area lacks (all, or only one).
#[allow(clippy::too_many_arguments)]
fn pipeline_parts(
    checkpoint: &Checkpoint,
    layout: &MlpLayout,
    compressor: &dyn fips::methods::Compressor<f32>,
    activation: Activation,
    calibration: &CalibrationSource<'_>,
    observer: &mut dyn pipeline::Observer,
    work: &WorkArea,
    only: Option<usize>,
) -> Result<(), FipsError> {
    let before: Vec<usize> = (0..work.settings().groups.len())
        .filter(|&g| work.has_part(g))
        .collect();
    if !before.is_empty() && only.is_none() {
        println!(
            "resuming from {}: groups {before:?} were finished by an earlier run with the same settings",
            work.dir().display()
        );
    }
    run_dir::compress_parts(
        checkpoint,
        layout,
        compressor,
        activation,
        calibration,
        observer,
        work,
        only,
    )?;
    Ok(())
}

/// The calibration images of the run in `work`, decoded again for its distillation: from its
/// recorded image set (or `images`, when given) and split, checked to be the pixels its parts
/// were made from.
fn recorded_calibration(
    work: &WorkArea,
    images: Option<&Path>,
    vit: &VisionTransformer,
    bars: &Bars,
) -> Result<Array4<u8>, FipsError> {
    let refuse = |reason: String| FipsError::WorkArea {
        dir: work.dir().to_path_buf(),
        reason,
    };
    let (
        Some(set),
        CalibrationSettings::Images {
            images: count,
            class_token_weight,
            ..
        },
    ) = (&work.context().images, &work.settings().calibration)
    else {
        return Err(refuse(
            "its run distils on calibration images but records none".into(),
        ));
    };
    let dir = images.map_or_else(|| PathBuf::from(&set.dir), Path::to_path_buf);
    let (pixels, _) = decode(&dir, &set.calib_split, Some(*count), bars)?;
    let found = CalibrationSettings::of(
        &CalibrationSource::Images {
            vit,
            pixels: pixels.view(),
            class_token_weight: *class_token_weight,
            streams: None,
        },
        None,
    )?;
    if found != work.settings().calibration {
        return Err(refuse(format!(
            "the first {count} images of split {:?} in {} are not those its parts were \
             calibrated on (give the image set with --images)",
            set.calib_split,
            dir.display()
        )));
    }
    Ok(pixels)
}

/// `fips assemble`: the outputs of a scattered run from its work area.
fn assemble(args: AssembleArgs) -> Result<(), FipsError> {
    let start = Instant::now();
    let bars = Bars::new();
    let work = WorkArea::load(&args.work_dir)?;
    if let run_dir::CalibrationSettings::Text { seed, .. } = &work.settings().calibration {
        let model = args
            .model
            .clone()
            .unwrap_or_else(|| PathBuf::from(&work.context().checkpoint));
        let text = args
            .text
            .clone()
            .or_else(|| work.context().text.as_ref().map(PathBuf::from))
            .ok_or_else(|| FipsError::InvalidParameter {
                name: "text",
                reason: "the work area does not record its calibration text: give --text FILE"
                    .into(),
            })?;
        return text_cmd::assemble(
            &args.work_dir,
            &args.out_dir,
            &model,
            &text,
            !args.no_densified,
            args.eval_text.as_deref(),
            *seed,
        );
    }
    let missing = work.missing();
    if !missing.is_empty() {
        return Err(FipsError::MissingParts {
            dir: args.work_dir.clone(),
            missing,
        });
    }
    let checkpoint_path = args
        .checkpoint
        .clone()
        .unwrap_or_else(|| PathBuf::from(&work.context().checkpoint));
    let found = run_dir::InputFile::of(&checkpoint_path)?;
    if found != work.settings().checkpoint {
        return Err(FipsError::WorkArea {
            dir: args.work_dir.clone(),
            reason: format!(
                "{} is not the checkpoint the parts were made from ({:?}, {} bytes, fingerprint {})",
                checkpoint_path.display(),
                work.settings().checkpoint.name,
                work.settings().checkpoint.bytes,
                work.settings().checkpoint.fingerprint
            ),
        });
    }
    let mut outputs = vec![
        args.out_dir.join(run_dir::COMPRESSED_FILE),
        args.out_dir.join(run_dir::REPORT_FILE),
    ];
    if !args.no_densified {
        outputs.push(args.out_dir.join(run_dir::DENSIFIED_FILE));
    }
    let mut inputs = vec![checkpoint_path.clone()];
    inputs.extend(args.images.as_ref().map(|d| d.join("labels.tsv")));
    fips::foundation::safe_io::check_outputs(&inputs, &outputs)?;
    run_dir::check_writable(&args.out_dir)?;
    if let Some(dir) = &args.images {
        run_dir::check_split(dir, &args.eval_split, None)?;
    }
    let checkpoint = Checkpoint::open(&checkpoint_path)?;
    let layout = MlpLayout::detect(&checkpoint)?;
    let distillation = work
        .context()
        .distillation
        .as_ref()
        .map(|settings| {
            serde_json::from_value::<DistillParams>(settings.clone())
                .map_err(|e| FipsError::WorkArea {
                    dir: args.work_dir.clone(),
                    reason: format!("its distillation settings are unreadable: {e}"),
                })?
                .check()
        })
        .transpose()?;
    let vit = match (&args.images, &distillation) {
        (None, None) => None,
        _ => Some(VisionTransformer::from_checkpoint(&checkpoint, args.heads)?),
    };
    let mut run = work.assemble(start.elapsed())?;
    if let (Some(params), Some(vit)) = (distillation, &vit) {
        check_teacher(vit, &params)?;
        let pixels = recorded_calibration(&work, args.images.as_deref(), vit, &bars)?;
        run.model = distill(&work, vit, &run.model, pixels.view(), params, &bars)?;
    }
    let mut report = work.report(&layout, &run)?;
    println!("{}", report.group_table());
    let written = write_run(
        &args.out_dir,
        &run,
        &mut report,
        &checkpoint,
        &layout,
        vit.as_ref().zip(args.images.as_deref()),
        &args.eval_split,
        OutputOptions {
            densified: !args.no_densified,
            self_contained: args.self_contained,
        },
        &bars,
        start,
    )?;
    for path in written {
        println!("wrote {}", path.display());
    }
    println!("{}", report.summary_line());
    Ok(())
}

fn eval(args: EvalArgs) -> Result<(), FipsError> {
    if let Some(model) = &args.text.model {
        return text_cmd::eval(model, &args.text, args.compressed.as_deref());
    }
    let (Some(checkpoint), Some(images)) = (&args.checkpoint, &args.images) else {
        return Err(FipsError::InvalidParameter {
            name: "checkpoint",
            reason: "eval needs --checkpoint and --images (or --model and --text)".into(),
        });
    };
    if let Some(path) = &args.compressed {
        fips::foundation::output_set::check_member(path)?;
    }
    let bars = Bars::new();
    let checkpoint = Checkpoint::open(checkpoint)?;
    let vit = VisionTransformer::from_checkpoint(&checkpoint, args.heads)?;
    let (pixels, labels) = decode(images, &args.split, None, &bars)?;
    let dense_logits =
        pipeline::classify(&vit, pixels.view(), &mut bars.classify_observer("dense"))?;
    let dense = Accuracy::new(dense_logits.view(), &labels)?;
    println!(
        "dense: top-1 {:.2}%  top-5 {:.2}%  ({} images of {:?})",
        100.0 * dense.top1,
        100.0 * dense.top5,
        labels.len(),
        args.split
    );
    if let Some(path) = &args.compressed {
        let compressed_vit = if is_compact(&Checkpoint::open(path)?) {
            pipeline::with_compact_mlps(&vit, &CompactModel::read(path, Some(&checkpoint))?)?
        } else {
            fips::format::compressed_check::check_against_original(
                &Checkpoint::open(path)?,
                &checkpoint,
            )?;
            pipeline::with_compressed_mlps(&vit, &CompressedModel::read(path)?)?
        };
        let logits = pipeline::classify(
            &compressed_vit,
            pixels.view(),
            &mut bars.classify_observer("compressed"),
        )?;
        let acc = Accuracy::new(logits.view(), &labels)?;
        println!(
            "compressed: top-1 {:.2}%  top-5 {:.2}%  agreement with dense {:.2}%",
            100.0 * acc.top1,
            100.0 * acc.top5,
            100.0 * agreement(dense_logits.view(), logits.view())?
        );
    }
    Ok(())
}

fn inspect(file: &Path) -> Result<(), FipsError> {
    fips::foundation::output_set::check_member(file)?;
    let ck = Checkpoint::open(file)?;
    let count: usize = ck.tensors().map(|t| t.len()).sum();
    let mut dtypes: HashMap<String, usize> = HashMap::new();
    for t in ck.tensors() {
        *dtypes.entry(format!("{:?}", t.dtype)).or_default() += 1;
    }
    let mut dtypes: Vec<_> = dtypes
        .into_iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    dtypes.sort();
    println!(
        "{}: {} tensors ({}), {} elements",
        file.display(),
        ck.tensors().count(),
        dtypes.join(", "),
        count
    );
    if is_compact(&ck) {
        inspect_compact(file, &ck)?;
    } else if ck.metadata().contains_key(MANIFEST_KEY) {
        // Described from the header alone: rebuilding the factors would allocate whatever sizes
        // the manifest claims (`densify` and `eval` check them against the original first).
        let m = &fips::format::compressed_check::read_manifest(&ck)?;
        println!(
            "{COMPRESSED_FORMAT} (fips {}): method {}, source {}, scheme {}{}",
            m.crate_version,
            m.method,
            m.source.as_deref().unwrap_or("?"),
            m.scheme.as_deref().unwrap_or("?"),
            if m.data_free {
                ", data-free calibration"
            } else {
                ""
            }
        );
        println!("parameters: {}", m.parameters);
        for (g, gm) in m.groups.iter().enumerate() {
            let dense = gm.matrices.len() as f64 * gm.width as f64 * gm.intermediate as f64;
            let shared = match (gm.rank, gm.sparsity, gm.nnz) {
                (Some(r), Some(s), Some(n)) => format!(" rank {r} sparsity {s:.4} nnz {n},"),
                _ => String::new(),
            };
            println!(
                "group {g}: blocks {:?}, {} {} {}, d={} I={}{shared} weights {} -> {} ({:.2}%)",
                gm.blocks,
                gm.representation,
                gm.kind,
                gm.activation,
                gm.width,
                gm.intermediate,
                dense,
                gm.kept_weights,
                100.0 * gm.kept_weights as f64 / dense
            );
        }
    } else if let Ok(inputs) = MlpInputs::open(file) {
        let blocks = inputs.blocks();
        let shape = blocks.first().and_then(|&b| inputs.shape(b));
        println!("MLP-input file: blocks {blocks:?}, [tokens, d] = {shape:?}");
    } else {
        match MlpLayout::detect(&ck) {
            Ok(layout) => println!("{layout}"),
            Err(e) => println!("{e}"),
        }
    }
    Ok(())
}

/// Prints a compact file's manifest summary and where its bytes go.
fn inspect_compact(file: &Path, ck: &Checkpoint) -> Result<(), FipsError> {
    let m = read_manifest(ck)?;
    println!(
        "{COMPRESSED_FORMAT} version {} (fips {}): method {}, {}",
        m.format_version,
        m.crate_version,
        m.method,
        if m.self_contained {
            "self-contained"
        } else {
            "MLPs only (needs the original checkpoint)"
        }
    );
    if let Some(d) = &m.distillation {
        println!("distilled end to end after the block-wise fits: {d}");
    }
    for (g, gm) in m.groups.iter().enumerate() {
        println!(
            "group {g}: blocks {:?}, {} {} {}, d={} I={}, stored as {}{}",
            gm.blocks,
            gm.representation,
            gm.kind,
            gm.activation,
            gm.width,
            gm.intermediate,
            gm.dtype,
            if gm.rank > 0 {
                format!(", rank {}", gm.rank)
            } else {
                String::new()
            }
        );
    }
    let sizes = size_breakdown(file)?;
    let dense = m.dense_weight_bytes();
    let mlp = sizes.values + sizes.patterns + sizes.header;
    println!(
        "bytes: values {} + patterns {} + header {}{} = file {}",
        sizes.values,
        sizes.patterns,
        sizes.header,
        if sizes.copied > 0 {
            format!(" + copied tensors {}", sizes.copied)
        } else {
            String::new()
        },
        sizes.file
    );
    println!(
        "compressed MLPs {mlp} B = {:.4} x the dense MLP weights ({dense} B)",
        mlp as f64 / dense.max(1) as f64
    );
    Ok(())
}

fn densify(compressed: &Path, original: Option<&Path>, out: &Path) -> Result<(), FipsError> {
    let inputs: Vec<&Path> = std::iter::once(compressed).chain(original).collect();
    fips::foundation::safe_io::check_outputs(inputs, [out])?;
    fips::foundation::output_set::check_member(compressed)?;
    if let Some(folder) = original.filter(|p| p.is_dir()) {
        return text_cmd::densify_folder(compressed, folder, out);
    }
    let file = Checkpoint::open(compressed)?;
    if is_compact(&file) {
        let original = original.map(Checkpoint::open).transpose()?;
        let model = CompactModel::read_from(&file, original.as_ref())?;
        model.densify(original.as_ref().unwrap_or(&file), out)?;
        println!("wrote {}", out.display());
        return Ok(());
    }
    let original = original.ok_or_else(|| FipsError::InvalidParameter {
        name: "original",
        reason: "this compressed file holds only the MLPs: give --original".into(),
    })?;
    let original = Checkpoint::open(original)?;
    fips::format::compressed_check::check_against_original(
        &Checkpoint::open(compressed)?,
        &original,
    )?;
    let model = CompressedModel::read(compressed)?;
    model.densify(&original, out)?;
    println!("wrote {}", out.display());
    Ok(())
}

fn capture(
    checkpoint: &Path,
    images: &ImageArgs,
    blocks: Option<&str>,
    out: &Path,
) -> Result<(), FipsError> {
    let bars = Bars::new();
    let mut inputs = vec![checkpoint.to_path_buf()];
    inputs.extend(images.images.as_ref().map(|d| d.join("labels.tsv")));
    fips::foundation::safe_io::check_outputs(&inputs, [out])?;
    let ck = Checkpoint::open(checkpoint)?;
    let layout = MlpLayout::detect(&ck)?;
    let vit = VisionTransformer::from_checkpoint(&ck, None)?;
    let dir = images
        .images
        .as_ref()
        .ok_or_else(|| FipsError::InvalidParameter {
            name: "images",
            reason: "capture needs --images DIR".into(),
        })?;
    let (pixels, _) = decode(dir, &images.calib_split, images.calib_images, &bars)?;
    let shapes = layout.block_shapes()?;
    let groups = match blocks {
        Some(spec) => BlockGroups::parse(spec, &shapes)?,
        None => BlockGroups::consecutive(&shapes, shapes.len().max(1))?,
    };
    // The file holds every token once (a weight belongs to the run that trains on it).
    let streams = CaptureStreams::new();
    let calibration = CalibrationSource::Images {
        vit: &vit,
        pixels: pixels.view(),
        class_token_weight: 1,
        streams: Some(&streams),
    };
    let mut observer = bars.observer(groups.len());
    let mut captured = Vec::new();
    for (g, blocks) in groups.groups().iter().enumerate() {
        let calib = pipeline::group_calibration(
            &calibration,
            g,
            blocks,
            vit.config().width,
            &mut observer,
        )?;
        captured.extend(blocks.iter().copied().zip(calib.inputs().to_vec()));
    }
    drop(observer);
    let views: Vec<_> = captured.iter().map(|(b, z)| (*b, z.view())).collect();
    let metadata = HashMap::from([
        ("source".to_string(), checkpoint.display().to_string()),
        (
            "images".to_string(),
            format!("{} ({})", dir.display(), images.calib_split),
        ),
        (
            "fips_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        (
            "blas_threads".to_string(),
            std::env::var("OPENBLAS_NUM_THREADS").unwrap_or_else(|_| "default".into()),
        ),
    ]);
    write_mlp_inputs(out, &views, fips::safetensors::Dtype::F32, metadata)?;
    println!("wrote {} ({} blocks)", out.display(), views.len());
    Ok(())
}
