//! `fips`: compress, evaluate, inspect and densify transformer checkpoints from the command line.

mod progress;
mod text_cmd;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use fips::activations::{MlpInputs, write_mlp_inputs};
use fips::checkpoint::Checkpoint;
use fips::eval::{Accuracy, agreement};
use fips::export::{COMPRESSED_FORMAT, CompressedModel, MANIFEST_KEY};
use fips::groups::{BlockGroups, DEFAULT_GROUP_SIZE};
use fips::imagenet::{LabeledImage, load_image, read_labels, split};
use fips::layout::MlpLayout;
use fips::methods::Compressor;
use fips::methods::basis_sharing::BasisSharingParams;
use fips::methods::layer_collapse::LayerCollapseParams;
use fips::methods::mixed_rank::MixedRankParams;
use fips::methods::svd::SvdParams;
use fips::methods::svd_llm::SvdLlmParams;
use fips::pipeline::{self, CalibrationData, ModelCompression, VIT_DEFAULTS};
use fips::svg::{LineChart, Series};
use fips::vit::VisionTransformer;
use fips::{
    Activation, Budget, ContractionOrder, FipsError, FipsParams, GmpSchedule, InitMethod,
    RiglSchedule, Sparsifier,
};
use ndarray::{Array4, Axis};

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
    /// Evaluate a ViT/DeiT checkpoint (and optionally a compressed one) on labelled images.
    Eval(EvalArgs),
    /// Describe a checkpoint, a compressed checkpoint or an MLP-input file.
    Inspect {
        /// The safetensors file.
        file: PathBuf,
    },
    /// Rebuild the dense checkpoint from a compressed one and its original.
    Densify {
        /// The compressed checkpoint (written by `fips compress`).
        #[arg(long)]
        compressed: PathBuf,
        /// The original checkpoint it was made from.
        #[arg(long)]
        original: PathBuf,
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

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SparsifierArg {
    /// RigL dynamic sparse training (reference DeiT setting).
    Rigl,
    /// Gradual magnitude pruning on a cubic schedule.
    Gmp,
    /// No sparsity (requires --sparsity 0).
    None,
}

#[derive(Debug, Clone, Args)]
struct ImageArgs {
    /// Image set: a directory with `labels.tsv` and the split folders (e.g. ../shared/data/imagenet-sample).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Split of the image set used for calibration.
    #[arg(long, default_value = "calib")]
    calib_split: String,
    /// Use only the first N calibration images (default: all).
    #[arg(long)]
    calib_images: Option<usize>,
}

#[derive(Debug, Args)]
struct CompressArgs {
    /// The checkpoint (safetensors; timm ViT/DeiT, HF BERT/ViT, or Llama-style gated names).
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    images: ImageArgs,
    /// Calibrate from an MLP-input file (`blocks.{b}.mlp_input`, see `fips capture`) instead of images.
    #[arg(long, conflicts_with = "images")]
    activations: Option<PathBuf>,
    /// Calibrate on Gaussian noise (data-free; labelled as such in every report).
    #[arg(long, conflicts_with_all = ["images", "activations"])]
    data_free: bool,
    /// Tokens per block for --data-free.
    #[arg(long, default_value_t = 16384)]
    data_free_tokens: usize,
    /// Compression method.
    #[arg(long, value_enum, default_value_t = MethodArg::Fips)]
    method: MethodArg,
    /// Fraction p of the dense MLP weights to keep (per group; per matrix for svd and svd-llm).
    #[arg(long, default_value_t = 0.5)]
    budget: f64,
    /// Use this rank instead of deriving it from --budget.
    #[arg(long)]
    rank: Option<usize>,
    /// Target sparsity s of the factors V.
    #[arg(long, default_value_t = 0.75)]
    sparsity: f64,
    /// How V reaches its sparsity.
    #[arg(long, value_enum, default_value_t = SparsifierArg::Rigl)]
    sparsifier: SparsifierArg,
    /// Steps between sparsifier updates (GMP pruning events, RigL drop/grow).
    #[arg(long, default_value_t = 50)]
    sparsifier_interval: usize,
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
    #[arg(long, default_value_t = 8)]
    residual_rank: usize,
    /// mixed-rank: step of the candidate ranks.
    #[arg(long, default_value_t = 8)]
    rank_grid: usize,
    /// mixed-rank: Adam steps per residual.
    #[arg(long, default_value_t = 200)]
    residual_steps: usize,
    /// layer-collapse: weight λ of (α − 1)².
    #[arg(long, default_value_t = 0.2)]
    collapse_lambda: f64,
    /// layer-collapse: step limit per block.
    #[arg(long, default_value_t = 2000)]
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
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    /// Seed of the mini-batch sampler (and of --data-free inputs).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Threads (elementwise passes and OpenBLAS); default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Initialisation route.
    #[arg(long, default_value = "gram")]
    init: InitMethod,
    /// Contraction order of the training step: auto, factors-first or weights-first.
    #[arg(long, default_value = "auto")]
    contraction: ContractionOrder,
    /// Override the MLP activation (default: the naming scheme's).
    #[arg(long)]
    activation: Option<Activation>,
    /// Directory for the outputs.
    #[arg(long, default_value = "out")]
    out_dir: PathBuf,
    /// Skip writing the densified checkpoint.
    #[arg(long)]
    no_densified: bool,
    /// Skip the evaluation (ViT/DeiT with --images only).
    #[arg(long)]
    no_eval: bool,
    /// Split of the image set used for evaluation (never the calibration split).
    #[arg(long, default_value = "eval")]
    eval_split: String,
    /// ViT attention heads (default: width / 64).
    #[arg(long)]
    heads: Option<usize>,
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
    #[arg(long, default_value = "eval")]
    split: String,
    /// ViT attention heads (default: width / 64).
    #[arg(long)]
    heads: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(code) = reexec_with_blas_threads(&cli) {
        return code;
    }
    let result = match cli.command {
        Command::Compress(args) => compress(*args),
        Command::Eval(args) => eval(args),
        Command::Inspect { file } => inspect(&file),
        Command::Densify {
            compressed,
            original,
            out,
        } => densify(&compressed, &original, &out),
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

/// OpenBLAS reads its thread count from the environment once, at start-up, and the crate has no
/// unsafe code to call `openblas_set_num_threads`; so `--threads N` re-runs this program with
/// `OPENBLAS_NUM_THREADS=N` when it is not already set to N.
fn reexec_with_blas_threads(cli: &Cli) -> Option<ExitCode> {
    let Command::Compress(args) = &cli.command else {
        return None;
    };
    let n = args.threads?;
    let wanted = n.to_string();
    if std::env::var("OPENBLAS_NUM_THREADS").ok().as_deref() == Some(wanted.as_str()) {
        return None;
    }
    let exe = std::env::current_exe().ok()?;
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("OPENBLAS_NUM_THREADS", &wanted)
        .status()
        .ok()?;
    Some(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

fn fips_params(args: &CompressArgs) -> FipsParams {
    let sparsifier = match args.sparsifier {
        SparsifierArg::Rigl => Sparsifier::Rigl(RiglSchedule {
            interval: args.sparsifier_interval,
            ..RiglSchedule::default()
        }),
        SparsifierArg::Gmp => Sparsifier::Gmp(GmpSchedule {
            interval: args.sparsifier_interval,
            ..GmpSchedule::default()
        }),
        SparsifierArg::None => Sparsifier::None,
    };
    let budget = args
        .rank
        .map_or(Budget::Fraction(args.budget), Budget::Rank);
    let mut params = FipsParams::new()
        .budget(budget)
        .sparsity(args.sparsity)
        .sparsifier(sparsifier)
        .steps(args.steps)
        .batch_tokens(args.batch_tokens)
        .learning_rate(args.lr)
        .min_learning_rate(args.min_lr)
        .weight_decay(args.weight_decay)
        .seed(args.seed)
        .init(args.init)
        .contraction(args.contraction);
    if let Some(t) = args.threads {
        params = params.threads(t);
    }
    params
}

/// Decodes the images of one split (optionally only the first `limit`), with a progress bar.
fn decode_split(
    dir: &Path,
    split_name: &str,
    limit: Option<usize>,
    bars: &Bars,
) -> Result<(Array4<u8>, Vec<usize>), FipsError> {
    let all = read_labels(dir)?;
    let mut items: Vec<LabeledImage> = split(&all, split_name);
    if items.is_empty() {
        return Err(FipsError::InvalidParameter {
            name: "split",
            reason: format!("no images of split {split_name:?} in {}", dir.display()),
        });
    }
    if let Some(n) = limit {
        items.truncate(n);
    }
    let bar = bars.bar(items.len(), &format!("decoding {split_name}"));
    let mut images = Vec::with_capacity(items.len());
    for item in &items {
        images.push(load_image(&item.path)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (h, w, c) = images[0].dim();
    let mut pixels = Array4::zeros((images.len(), h, w, c));
    for (mut dst, img) in pixels.axis_iter_mut(Axis(0)).zip(&images) {
        if img.dim() != (h, w, c) {
            return Err(FipsError::ShapeMismatch {
                what: "decoded image".into(),
                expected: vec![h, w, c],
                got: img.shape().to_vec(),
            });
        }
        dst.assign(img);
    }
    Ok((pixels, items.iter().map(|i| i.label).collect()))
}

/// The chosen method, with its settings validated.
fn compressor(args: &CompressArgs) -> Result<Box<dyn Compressor<f32>>, FipsError> {
    let budget = args
        .rank
        .map_or(Budget::Fraction(args.budget), Budget::Rank);
    let optimizer = fips::AdamW {
        learning_rate: args.lr,
        min_learning_rate: args.min_lr,
        weight_decay: args.weight_decay,
        ..fips::AdamW::default()
    };
    Ok(match args.method {
        MethodArg::Fips => Box::new(fips_params(args).build()?),
        MethodArg::Svd => {
            let mut p = SvdParams::new()
                .budget(budget)
                .steps(if args.svd_train { args.steps } else { 0 })
                .batch_tokens(args.batch_tokens)
                .optimizer(optimizer)
                .seed(args.seed);
            if let Some(t) = args.threads {
                p = p.threads(t);
            }
            Box::new(p.build()?)
        }
        MethodArg::SvdLlm => Box::new(SvdLlmParams::new().budget(budget).build()?),
        MethodArg::BasisSharing => Box::new(BasisSharingParams::new().budget(budget).build()?),
        MethodArg::MixedRank => Box::new(
            MixedRankParams::new()
                .budget(args.budget)
                .residual_rank(args.residual_rank)
                .grid(args.rank_grid)
                .steps(args.residual_steps)
                .batch_tokens(args.batch_tokens)
                .learning_rate(args.lr)
                .seed(args.seed)
                .build()?,
        ),
        MethodArg::LayerCollapse => Box::new(
            LayerCollapseParams::new()
                .lambda(args.collapse_lambda)
                .max_steps(args.collapse_steps)
                .batch_tokens(args.batch_tokens)
                .learning_rate(args.lr)
                .seed(args.seed)
                .build()?,
        ),
    })
}

fn compress(args: CompressArgs) -> Result<(), FipsError> {
    let start = Instant::now();
    let bars = Bars::new();
    let compressor = compressor(&args)?;
    let checkpoint = Checkpoint::open(&args.checkpoint)?;
    let layout = MlpLayout::detect(&checkpoint)?;
    println!("{}: {layout}", args.checkpoint.display());
    let shapes: Vec<(usize, usize)> = (0..layout.blocks())
        .map(|b| layout.block(b).map(|t| (t.width, t.intermediate)))
        .collect::<Result<_, _>>()?;
    let groups = match &args.groups {
        Some(spec) => BlockGroups::parse(spec, &shapes)?,
        None => BlockGroups::consecutive(&shapes, args.group_size)?,
    };
    let activation = args.activation.unwrap_or(layout.default_activation());
    println!(
        "method {}, groups {groups}: {}",
        compressor.method(),
        compressor.parameters()
    );

    let needs_vit = args.images.images.is_some();
    let vit = if needs_vit {
        Some(VisionTransformer::from_checkpoint(&checkpoint, args.heads)?)
    } else {
        None
    };
    let calib_pixels = match &args.images.images {
        Some(dir) => Some(decode_split(
            dir,
            &args.images.calib_split,
            args.images.calib_images,
            &bars,
        )?),
        None => None,
    };
    let inputs_file = args.activations.as_ref().map(MlpInputs::open).transpose()?;
    let calibration = match (&vit, &calib_pixels, &inputs_file) {
        (Some(vit), Some((pixels, _)), _) => CalibrationData::Images {
            vit,
            pixels: pixels.view(),
        },
        (_, _, Some(file)) => CalibrationData::File(file),
        _ if args.data_free => CalibrationData::Gaussian {
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

    let mut observer = bars.observer(groups.len());
    let result = pipeline::compress_checkpoint(
        &checkpoint,
        &layout,
        &groups,
        compressor.as_ref(),
        activation,
        &calibration,
        &mut observer,
    )?;
    drop(observer);
    print_group_table(&result);

    std::fs::create_dir_all(&args.out_dir).map_err(|source| FipsError::Io {
        path: args.out_dir.clone(),
        source,
    })?;
    let compressed_path = args.out_dir.join("compressed.safetensors");
    result.model.write(&compressed_path)?;
    println!("wrote {}", compressed_path.display());
    if !args.no_densified {
        let densified_path = args.out_dir.join("densified.safetensors");
        result.model.densify(&checkpoint, &densified_path)?;
        println!("wrote {}", densified_path.display());
    }
    write_loss_plots(&args.out_dir, &result)?;

    let (mlp_dense, mlp_kept) = pipeline::mlp_parameters(&layout, &result.model);
    let mut summary = serde_json::json!({
        "checkpoint": args.checkpoint.display().to_string(),
        "scheme": layout.scheme().to_string(),
        "method": compressor.method(),
        "parameters": compressor.parameters(),
        "data_free": result.model.manifest.data_free,
        "calibration_seconds": result.calibration_time.as_secs_f64(),
        "groups": result.reports.iter().zip(&result.model.manifest.groups)
            .map(|(r, m)| pipeline::report_json(r, &m.blocks)).collect::<Vec<_>>(),
        "mlp_weights_dense": mlp_dense,
        "mlp_weights_compressed": mlp_kept,
    });
    let mut line = format!(
        "MLP params {} -> {} ({:.1}%)",
        millions(mlp_dense),
        millions(mlp_kept),
        100.0 * mlp_kept as f64 / mlp_dense as f64
    );
    if let (Some(vit), Some(dir), false) = (&vit, &args.images.images, args.no_eval) {
        let total = vit.parameter_count();
        let compressed_total = total - mlp_dense + mlp_kept;
        let (pixels, labels) = decode_split(dir, &args.eval_split, None, &bars)?;
        let compressed_vit = pipeline::with_compressed_mlps(vit, &result.model)?;
        let dense_logits = pipeline::classify(
            vit,
            pixels.view(),
            &mut bars.classify_observer("eval dense"),
        )?;
        let logits = pipeline::classify(
            &compressed_vit,
            pixels.view(),
            &mut bars.classify_observer("eval compressed"),
        )?;
        let dense = Accuracy::new(dense_logits.view(), &labels)?;
        let comp = Accuracy::new(logits.view(), &labels)?;
        let agree = agreement(dense_logits.view(), logits.view())?;
        summary["eval"] = serde_json::json!({
            "split": args.eval_split,
            "images": labels.len(),
            "dense_top1": dense.top1,
            "dense_top5": dense.top5,
            "compressed_top1": comp.top1,
            "compressed_top5": comp.top5,
            "agreement": agree,
            "model_params_dense": total,
            "model_params_compressed": compressed_total,
        });
        line = format!(
            "{} eval images: dense top-1 {:.1}% top-5 {:.1}% | compressed top-1 {:.1}% ({:+.1}) top-5 {:.1}% | agreement {:.1}% | {line} | model params {} -> {} ({:.1}%)",
            labels.len(),
            100.0 * dense.top1,
            100.0 * dense.top5,
            100.0 * comp.top1,
            100.0 * (comp.top1 - dense.top1),
            100.0 * comp.top5,
            100.0 * agree,
            millions(total),
            millions(compressed_total),
            100.0 * compressed_total as f64 / total as f64
        );
    }
    let calib_note = if result.model.manifest.data_free {
        " [data-free calibration]"
    } else {
        ""
    };
    summary["wall_seconds"] = serde_json::json!(start.elapsed().as_secs_f64());
    let report_path = args.out_dir.join("report.json");
    let text =
        serde_json::to_string_pretty(&summary).map_err(|e| FipsError::Numerical(e.to_string()))?;
    fips::checkpoint::write_atomically(&report_path, text.as_bytes())?;
    println!("wrote {}", report_path.display());
    println!("{line} | wall {:.1?}{calib_note}", start.elapsed());
    Ok(())
}

fn millions(n: usize) -> String {
    format!("{:.3}M", n as f64 / 1e6)
}

fn print_group_table(result: &ModelCompression) {
    println!(
        "{:>5} {:>8} {:>11} {:>11} {:>7} {:>9} {:>7} {:>8}  details",
        "group", "blocks", "dense", "kept", "kept%", "rel.err", "steps", "time"
    );
    for (g, (r, m)) in result
        .reports
        .iter()
        .zip(&result.model.manifest.groups)
        .enumerate()
    {
        let p = &r.parameters;
        let blocks = match (m.blocks.first(), m.blocks.last()) {
            (Some(a), Some(b)) => format!("{a}-{b}"),
            _ => String::new(),
        };
        println!(
            "{:>5} {:>8} {:>11} {:>11} {:>6.2}% {:>9.4} {:>7} {:>7.1}s  {}",
            g,
            blocks,
            p.dense_weights,
            p.compressed_weights(),
            100.0 * p.kept_fraction(),
            r.rel_error,
            r.steps,
            r.wall_time.as_secs_f64(),
            summarise_details(&r.details)
        );
    }
}

/// The scalar entries of a report's details, `key=value` (lists and objects omitted).
fn summarise_details(details: &serde_json::Value) -> String {
    let Some(map) = details.as_object() else {
        return String::new();
    };
    map.iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::Number(n) => Some(match n.as_f64() {
                Some(x) if x.fract() != 0.0 => format!("{k}={x:.4}"),
                _ => format!("{k}={n}"),
            }),
            serde_json::Value::String(s) => Some(format!("{k}={s}")),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_loss_plots(dir: &Path, result: &ModelCompression) -> Result<(), FipsError> {
    for (g, (report, m)) in result
        .reports
        .iter()
        .zip(&result.model.manifest.groups)
        .enumerate()
    {
        if report.loss_curve.is_empty() {
            continue;
        }
        let chart = LineChart {
            title: format!(
                "{} group {g} (blocks {}-{}): {}",
                report.method,
                m.blocks.first().copied().unwrap_or(0),
                m.blocks.last().copied().unwrap_or(0),
                summarise_details(&report.details)
            ),
            x_label: "training step".into(),
            y_label: "mini-batch loss".into(),
            log_y: true,
            markers: false,
            series: vec![Series {
                label: format!("group {g}"),
                points: report
                    .loss_curve
                    .iter()
                    .enumerate()
                    .map(|(t, &l)| ((t + 1) as f64, l))
                    .collect(),
            }],
        };
        let path = dir.join(format!("loss_group{g}.svg"));
        fips::checkpoint::write_atomically(&path, chart.to_svg().as_bytes())?;
        println!("wrote {}", path.display());
    }
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
    let bars = Bars::new();
    let checkpoint = Checkpoint::open(checkpoint)?;
    let vit = VisionTransformer::from_checkpoint(&checkpoint, args.heads)?;
    let (pixels, labels) = decode_split(images, &args.split, None, &bars)?;
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
        let model = CompressedModel::read(path)?;
        let compressed_vit = pipeline::with_compressed_mlps(&vit, &model)?;
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
    if ck.metadata().contains_key(MANIFEST_KEY) {
        let model = CompressedModel::read(file)?;
        let m = &model.manifest;
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
        for (g, (gm, group)) in m.groups.iter().zip(&model.groups).enumerate() {
            let p = group.parameter_count();
            println!(
                "group {g}: blocks {:?}, {} {}, d={} I={} rank {} sparsity {:.4} nnz {}, weights {} -> {} ({:.2}%)",
                gm.blocks,
                gm.kind,
                gm.activation,
                gm.width,
                gm.intermediate,
                gm.rank,
                gm.sparsity,
                gm.nnz,
                p.dense_weights,
                p.compressed_weights(),
                100.0 * p.kept_fraction()
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

fn densify(compressed: &Path, original: &Path, out: &Path) -> Result<(), FipsError> {
    let model = CompressedModel::read(compressed)?;
    if original.is_dir() {
        return text_cmd::densify_folder(&model, original, out);
    }
    let original = Checkpoint::open(original)?;
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
    let (pixels, _) = decode_split(dir, &images.calib_split, images.calib_images, &bars)?;
    let shapes: Vec<(usize, usize)> = (0..layout.blocks())
        .map(|b| layout.block(b).map(|t| (t.width, t.intermediate)))
        .collect::<Result<_, _>>()?;
    let spec = blocks.map_or_else(
        || format!("0-{}", layout.blocks().saturating_sub(1)),
        str::to_string,
    );
    let groups = BlockGroups::parse(&spec, &shapes)?;
    let calibration = CalibrationData::Images {
        vit: &vit,
        pixels: pixels.view(),
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
    ]);
    write_mlp_inputs(out, &views, safetensors::Dtype::F32, metadata)?;
    println!("wrote {} ({} blocks)", out.display(), views.len());
    Ok(())
}
