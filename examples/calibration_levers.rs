//! Calibration levers scored end to end on held-out calibration images (issue 14, item 2): does
//! calibrating each group on the partly compressed model, or sharing the budget unevenly between
//! the groups, keep more of the dense model's predictions?
//!
//! ```sh
//! cargo run --release --features images --example calibration_levers -- \
//!     [--modes independent,inputs,residual] [--steps N] [--budgets P0,P1,P2] [--holdout F] \
//!     [--cls-weight W] [--split-seed S] [--group-size G]
//! ```
//!
//! Holds out a seeded 20 % of the `calib/` images (never `eval/`); trains every DeiT-tiny group
//! of 4 blocks on the rest with the `fips compress` defaults (s = 0.75, `VIT_DEFAULTS`; p = 0.5
//! per group unless
//! `--budgets` gives each group its own, e.g. `0.55,0.475,0.475`, the same total) in one of
//! three ways, and after each group scores the model on the held-out images (top-1 agreement with
//! the dense model, mean KL(dense ‖ compressed) of the class probabilities, relative logit
//! error):
//! - `independent`: every group's inputs and targets from the dense model (today);
//! - `inputs`: group g's inputs captured from the model with groups < g compressed, targets the
//!   dense blocks on those inputs;
//! - `residual`: the same inputs, targets the dense model's block output less the compressed
//!   model's residual stream after attention (the MLP also corrects the upstream error).
//!
//! `--cls-weight W` weighs each image's class token as `W` tokens in training (default: the
//! `fips compress` default, [`DEFAULT_CLASS_TOKEN_WEIGHT`]; 1 weighs every token alike);
//! `--split-seed S` draws another held-out split (default 2024); `--group-size G` puts `G`
//! consecutive blocks in a group (default 4).

use std::path::PathBuf;
use std::time::Instant;

use fips::app::images::{load_pixels, read_labels, split};
use fips::app::pipeline::{DEFAULT_CLASS_TOKEN_WEIGHT, IMAGE_BATCH, Silent, classify};
use fips::app::vit::{VisionTransformer, preprocess};
use fips::math::calibration::Calibration;
use fips::math::validation::holdout;
use fips::methods::options::{MethodOptions, VIT_DEFAULTS};
use fips::{BlockGroups, Checkpoint, MlpLayout, ParamGuard};
use ndarray::{Array2, ArrayView4, Axis, concatenate, s};

fn cat(parts: &[Array2<f32>]) -> fips::Result<Array2<f32>> {
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    concatenate(Axis(0), &views).map_err(|e| fips::FipsError::Numerical(e.to_string()))
}

/// Index of the largest value.
fn argmax(row: ndarray::ArrayView1<'_, f32>) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |best, (i, &v)| if v > best.1 { (i, v) } else { best },
        )
        .0
}

/// `log Σ exp(row)`.
fn log_sum_exp(row: ndarray::ArrayView1<'_, f32>) -> f64 {
    let max = row.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// `(MLP input, residual stream after attention)` of every block of `range`, over all `pixels`.
fn streams(
    vit: &VisionTransformer,
    pixels: ArrayView4<'_, u8>,
    range: std::ops::Range<usize>,
) -> fips::Result<Vec<(Array2<f32>, Array2<f32>)>> {
    let n = pixels.len_of(Axis(0));
    let k = range.len();
    let mut zs: Vec<Vec<Array2<f32>>> = vec![Vec::new(); k];
    let mut ms: Vec<Vec<Array2<f32>>> = vec![Vec::new(); k];
    let mut done = 0;
    while done < n {
        let end = (done + IMAGE_BATCH).min(n);
        let batch = preprocess(pixels.slice(s![done..end, .., .., ..]));
        for (i, (z, m)) in vit
            .forward_capture_streams(batch.view(), range.clone())?
            .into_iter()
            .enumerate()
        {
            zs[i].push(z);
            ms[i].push(m);
        }
        done = end;
    }
    zs.iter()
        .zip(&ms)
        .map(|(z, m)| Ok((cat(z)?, cat(m)?)))
        .collect()
}

/// `(agreement, mean KL(dense ‖ other), relative logit error)` of `other` logits against `dense`.
fn metrics(dense: &Array2<f32>, other: &Array2<f32>) -> (f64, f64, f64) {
    let n = dense.nrows() as f64;
    let mut agree = 0.0;
    let mut kl = 0.0;
    for (a, b) in dense.outer_iter().zip(other.outer_iter()) {
        if argmax(a) == argmax(b) {
            agree += 1.0;
        }
        let (la, lb) = (log_sum_exp(a), log_sum_exp(b));
        kl += a
            .iter()
            .zip(b.iter())
            .map(|(&x, &y)| {
                let log_p = x as f64 - la;
                log_p.exp() * (log_p - (y as f64 - lb))
            })
            .sum::<f64>();
    }
    let diff = (dense - other).mapv(|v| (v as f64).powi(2)).sum();
    let norm = dense.mapv(|v| (v as f64).powi(2)).sum();
    (agree / n, kl / n, (diff / norm).sqrt())
}

fn main() -> fips::Result<()> {
    let data = PathBuf::from(std::env::var("FIPS_DATA_DIR").unwrap_or("../shared/data".into()));
    let mut modes = vec![
        "independent".to_string(),
        "inputs".into(),
        "residual".into(),
    ];
    let mut steps = VIT_DEFAULTS.steps;
    let mut fraction = 0.2;
    let mut budgets: Vec<f64> = Vec::new();
    let mut cls_weight = DEFAULT_CLASS_TOKEN_WEIGHT;
    let mut split_seed = 2024u64;
    let mut group_size = 4usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        let parsed = match a.as_str() {
            "--modes" => {
                modes = v.split(',').map(String::from).collect();
                true
            }
            "--steps" => v.parse().map(|s| steps = s).is_ok(),
            "--holdout" => v.parse().map(|f| fraction = f).is_ok(),
            "--cls-weight" => v.parse().map(|k| cls_weight = k).is_ok(),
            "--split-seed" => v.parse().map(|k| split_seed = k).is_ok(),
            "--group-size" => v.parse().map(|k| group_size = k).is_ok(),
            "--budgets" => v
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<f64>, _>>()
                .map(|b| budgets = b)
                .is_ok(),
            _ => false,
        };
        if !parsed {
            eprintln!("bad argument {a} {v:?} (see the example's documentation)");
            std::process::exit(2);
        }
    }
    if let Some(m) = modes
        .iter()
        .find(|m| !["independent", "inputs", "residual"].contains(&m.as_str()))
    {
        eprintln!("unknown mode {m:?}: independent, inputs or residual");
        std::process::exit(2);
    }
    let checkpoint = Checkpoint::open(data.join("deit-tiny/model.safetensors"))?;
    let layout = MlpLayout::detect(&checkpoint)?;
    let vit = VisionTransformer::from_checkpoint(&checkpoint, None)?;
    let set = data.join("imagenet-sample");
    let labels = read_labels(&set)?;
    let calib = load_pixels(&split(&labels, "calib"))?;
    let (train_idx, val_idx) = holdout(calib.len_of(Axis(0)), fraction, split_seed)?;
    let train = calib.select(Axis(0), &train_idx);
    let val = calib.select(Axis(0), &val_idx);
    let shapes: Vec<_> = (0..layout.blocks())
        .map(|b| layout.block(b).map(|t| (t.width, t.intermediate)))
        .collect::<fips::Result<_>>()?;
    let groups = BlockGroups::consecutive(&shapes, group_size)?;
    if budgets.is_empty() {
        budgets = vec![0.5; groups.len()];
    }
    if budgets.len() != groups.len() {
        eprintln!("--budgets needs {} values", groups.len());
        std::process::exit(2);
    }
    let dense_logits = classify(&vit, val.view(), &mut Silent)?;
    println!(
        "{} training images, {} held out, {steps} steps, budgets {budgets:?}",
        train_idx.len(),
        val_idx.len()
    );
    for mode in &modes {
        let start = Instant::now();
        let mut student = vit.clone();
        for (g, blocks) in groups.groups().iter().enumerate() {
            let (Some(&first), Some(&last)) = (blocks.first(), blocks.last()) else {
                continue;
            };
            let range = first..last + 1;
            let dense: Vec<_> = blocks
                .iter()
                .map(|&b| layout.load_block::<f32>(&checkpoint, b, layout.default_activation()))
                .collect::<fips::Result<_>>()?;
            let source = if mode == "independent" {
                &vit
            } else {
                &student
            };
            let captured = streams(source, train.view(), range.clone())?;
            let inputs: Vec<_> = captured.iter().map(|(z, _)| z.clone()).collect();
            let mut cal = Calibration::new(inputs)?;
            if mode == "residual" {
                let teacher = streams(&vit, train.view(), range.clone())?;
                let targets = teacher
                    .iter()
                    .zip(&captured)
                    .zip(&dense)
                    .map(|(((zt, mt), (_, ms)), mlp)| Ok(mt + &mlp.forward(zt.view())? - ms))
                    .collect::<fips::Result<Vec<_>>>()?;
                cal = cal.with_targets(targets)?;
            }
            // Each image's class token weighs `--cls-weight` tokens (as in `fips compress`).
            let class_rows: Vec<usize> = (0..cal.tokens()).step_by(vit.config().tokens()).collect();
            let cal = cal.with_repeated_rows(&class_rows, cls_weight.saturating_sub(1))?;
            // The `fips compress` defaults for images, with this group's budget.
            let params = MethodOptions {
                budget: Some(budgets[g]),
                steps: Some(steps),
                ..MethodOptions::default()
            }
            .fips_params(&VIT_DEFAULTS)
            .check()?;
            let mut trainer = params.trainer(&dense, &cal)?;
            while trainer.step()?.is_some() {}
            let group = trainer.finish()?.group;
            for (p, &b) in blocks.iter().enumerate() {
                student.set_mlp(b, group.to_dense_mlp(p)?)?;
            }
            let logits = classify(&student, val.view(), &mut Silent)?;
            let (agree, kl, rel) = metrics(&dense_logits, &logits);
            println!(
                "{mode:<12} after group {g}: agreement {:.1} %  KL {kl:.4}  logit rel {rel:.4}  ({:.0} s)",
                agree * 100.0,
                start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
