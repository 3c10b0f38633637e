//! FiPS on DeiT-tiny over a grid of budgets and sparsities: accuracy, parameters and time.
//!
//! ```sh
//! cargo run --release --features images --example sweep -- [DATA_DIR] [OUT.md]
//! ```
//!
//! Calibrates on `imagenet-sample/calib`, evaluates on `imagenet-sample/eval`, with the `fips`
//! command's defaults (RigL for s > 0, none for s = 0), and writes a Markdown table (default
//! `docs/sweep.md`). Twelve runs of two to three minutes each on two cores.

use std::path::PathBuf;
use std::time::Instant;

use fips::ParamGuard;
use fips::app::images::{load_pixels, read_labels, split};
use fips::app::metrics::{Accuracy, agreement};
use fips::app::pipeline::{self, CalibrationSource, CaptureStreams, Silent};
use fips::app::vit::VisionTransformer;
use fips::format::block_groups::BlockGroups;
use fips::format::checkpoint::{Checkpoint, write_atomically};
use fips::format::layout::MlpLayout;
use fips::methods::options::VIT_DEFAULTS;
use fips::{Budget, FipsParams, RiglSchedule, Sparsifier};

const BUDGETS: [f64; 4] = [0.75, 0.5, 0.35, 0.25];
const SPARSITIES: [f64; 3] = [0.0, 0.5, 0.75];

fn main() -> fips::Result<()> {
    let mut args = std::env::args().skip(1);
    let data = PathBuf::from(args.next().unwrap_or_else(|| "../shared/data".into()));
    let out = PathBuf::from(args.next().unwrap_or_else(|| "docs/sweep.md".into()));
    let checkpoint = Checkpoint::open(data.join("deit-tiny/model.safetensors"))?;
    let layout = MlpLayout::detect(&checkpoint)?;
    let vit = VisionTransformer::from_checkpoint(&checkpoint, None)?;
    let set = data.join("imagenet-sample");
    let labels = read_labels(&set)?;
    let calib = load_pixels(&split(&labels, "calib"))?;
    let eval_items = split(&labels, "eval");
    let eval = load_pixels(&eval_items)?;
    let eval_labels: Vec<usize> = eval_items.iter().map(|i| i.label).collect();
    let shapes = layout.block_shapes()?;
    let groups = BlockGroups::consecutive(&shapes, 4)?;
    let dense_logits = pipeline::classify(&vit, eval.view(), &mut Silent)?;
    let dense = Accuracy::new(dense_logits.view(), &eval_labels)?;
    let total = vit.parameter_count();

    let mut table = format!(
        "# FiPS sweep on DeiT-tiny\n\nCalibration: 250 `calib/` images; evaluation: 250 `eval/` images \
         (dense top-1 {:.1} %, {} parameters, {} of them MLP weights). Groups {groups}, {} steps of {} \
         tokens, AdamW lr {} → {}, RigL for s > 0. Command: `cargo run --release --features images \
         --example sweep`.\n\n| p | s | rank | MLP params | model params | rel. error (mean of groups) | top-1 | Δ top-1 | \
         agreement | wall time |\n|---|---|---|---|---|---|---|---|---|---|\n",
        100.0 * dense.top1,
        total,
        layout.mlp_weight_count(),
        VIT_DEFAULTS.steps,
        VIT_DEFAULTS.batch_tokens,
        VIT_DEFAULTS.learning_rate,
        VIT_DEFAULTS.min_learning_rate,
    );
    for p in BUDGETS {
        for s in SPARSITIES {
            let start = Instant::now();
            let sparsifier = if s > 0.0 {
                Sparsifier::Rigl(RiglSchedule::default())
            } else {
                Sparsifier::None
            };
            let params = VIT_DEFAULTS.apply(
                FipsParams::new()
                    .budget(Budget::Fraction(p))
                    .sparsity(s)
                    .sparsifier(sparsifier),
            );
            let compressor = params.check()?;
            let calibration = CalibrationSource::Images {
                vit: &vit,
                pixels: calib.view(),
                class_token_weight: pipeline::DEFAULT_CLASS_TOKEN_WEIGHT,
                streams: Some(&CaptureStreams::new()),
            };
            let result = pipeline::compress_checkpoint(
                &checkpoint,
                &layout,
                &groups,
                &compressor,
                layout.default_activation(),
                &calibration,
                &mut Silent,
            )?;
            let compressed_vit = pipeline::with_compressed_mlps(&vit, &result.model)?;
            let logits = pipeline::classify(&compressed_vit, eval.view(), &mut Silent)?;
            let acc = Accuracy::new(logits.view(), &eval_labels)?;
            let agree = agreement(dense_logits.view(), logits.view())?;
            let (mlp_dense, mlp_kept) = pipeline::mlp_parameters(&layout, &result.model);
            let mean_error = result.reports.iter().map(|r| r.rel_error).sum::<f64>()
                / result.reports.len() as f64;
            let row = format!(
                "| {p} | {s} | {} | {} ({:.1} %) | {} ({:.1} %) | {:.4} | {:.1} % | {:+.1} | {:.1} % | {:.0} s |\n",
                result.reports[0].fips().map_or(0, |d| d.rank),
                mlp_kept,
                100.0 * mlp_kept as f64 / mlp_dense as f64,
                total - mlp_dense + mlp_kept,
                100.0 * (total - mlp_dense + mlp_kept) as f64 / total as f64,
                mean_error,
                100.0 * acc.top1,
                100.0 * (acc.top1 - dense.top1),
                100.0 * agree,
                start.elapsed().as_secs_f64(),
            );
            print!("{row}");
            table.push_str(&row);
            write_atomically(&out, table.as_bytes())?;
        }
    }
    println!("wrote {}", out.display());
    Ok(())
}
