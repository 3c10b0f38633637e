//! Calibration levers scored end to end on held-out calibration images (issue 14, item 2): does
//! calibrating each group on the partly compressed model, or sharing the budget unevenly between
//! the groups, keep more of the dense model's predictions?
//!
//! ```sh
//! cargo run --release --features images --example calibration_levers -- \
//!     [--modes independent,inputs,residual] [--steps N] [--budgets P0,P1,P2] [--holdout F] \
//!     [--cls-weight W[,W1,W2]] [--split-seed S] [--group-size G] [--views N] [--view-area A] \
//!     [--train-images N] [--cls-views N] [--cls-view-weight K[,K1,K2]] [--sparsifier gmp|rigl] \
//!     [--distill-steps N] [--distill-images B] [--distill-lr LR[,LR...]] [--distill-views A[,A...]] \
//!     [--distill-min-lr LR] [--distill-temperature T] [--score-every K] [--weight-decay WD] \
//!     [--lr LR] [--batch-tokens B] [--min-lr LR] [--sparsity S] [--rigl-drop A] [--interval K] \
//!     [--noise C,S] [--mix C]
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
//! `fips compress` default, [`DEFAULT_CLASS_TOKEN_WEIGHT`]; 1 weighs every token alike; a list
//! gives each group its own, the last repeated);
//! `--split-seed S` draws another held-out split (default 2024); `--group-size G` puts `G`
//! consecutive blocks in a group (default 4). `--views N` fits the groups on the training images
//! and `N` seeded random-resized-crop-and-flip views of each (crops of at least `--view-area` of
//! the image, default 0.35). `--train-images N` fits on a seeded `N` of the split's training
//! images (the same held-out images). `--cls-views N` adds the class-token rows (only those) of
//! `N` seeded random views of every training image to each block's calibration, each weighing
//! `--cls-view-weight K` tokens (default 1; a list gives each group its own); `independent` only.
//! `--sparsifier gmp` trains with GMP instead of the image default (RigL). `--weight-decay`,
//! `--lr` and `--batch-tokens` replace the `fips compress` defaults' AdamW decay, peak learning
//! rate and tokens per step; `--min-lr` the cosine decay's final rate, `--sparsity` the sparsity
//! of the factors (the rank follows from the budget), `--rigl-drop` RigL's initial drop
//! fraction and `--interval` the steps between sparsifier updates. `--noise C,S` adds to every
//! block's calibration `C` copies of its training tokens with Gaussian noise of `S` times each
//! channel's standard deviation, `--mix C` adds `C` random convex mixtures of two training tokens
//! per token (targets: the dense block's outputs on them).
//!
//! `--distill-steps N` then distills all groups end to end (`fips::app::distill`) on the training
//! images (`DistillParams::default()` unless given), once per learning rate × view setting
//! (`--distill-views 0` the images as they are, `A` a fresh random view of at least `A` of the
//! area per image and step), scoring the held-out
//! images every `--score-every` steps. Every run also scores the compressed model on its training
//! images (the gap to the held-out images is what the block-wise fit overfits).

use std::path::PathBuf;
use std::time::Instant;

use fips::app::augment::random_views;
use fips::app::distill::{DistillParams, Distiller, PlacedGroup};
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

/// A comma-separated list of values, `None` if any does not parse.
fn list<T: std::str::FromStr>(v: &str) -> Option<Vec<T>> {
    v.split(',').map(|x| x.parse().ok()).collect()
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

/// `z` (MLP-input tokens, one per row) followed by extra tokens made from them: `noise = (C, S)`
/// adds `C` copies of every row with Gaussian noise of `S` times each channel's standard
/// deviation; `mix = C` adds `C` convex mixtures `λ z_i + (1 − λ) z_j` per row (`j` random,
/// `λ ~ U(0, 1)`). The targets are the dense block's outputs on them, as for every calibration
/// token.
fn with_augmented_tokens(
    z: Array2<f32>,
    noise: Option<(usize, f32)>,
    mix: Option<usize>,
    seed: u64,
) -> fips::Result<Array2<f32>> {
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1000 + seed);
    let (n, d) = z.dim();
    let mut parts = Vec::new();
    if let Some((copies, scale)) = noise {
        let std = z.std_axis(Axis(0), 0.0);
        for _ in 0..copies {
            let mut c = z.clone();
            for mut row in c.rows_mut() {
                for (x, s) in row.iter_mut().zip(&std) {
                    let e: f32 = StandardNormal.sample(&mut rng);
                    *x += scale * s * e;
                }
            }
            parts.push(c);
        }
    }
    for _ in 0..mix.unwrap_or(0) {
        let mut c = Array2::zeros((n, d));
        for (i, mut row) in c.rows_mut().into_iter().enumerate() {
            let j = rng.random_range(0..n);
            let l: f32 = rng.random();
            row.assign(&(&z.row(i) * l + &z.row(j) * (1.0 - l)));
        }
        parts.push(c);
    }
    parts.insert(0, z);
    cat(&parts)
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
    let mut cls_weights = vec![DEFAULT_CLASS_TOKEN_WEIGHT];
    let mut split_seed = 2024u64;
    let mut group_size = 4usize;
    let mut distill = DistillParams {
        steps: 0,
        ..DistillParams::default()
    };
    let mut score_every = 25usize;
    let mut views = 0usize;
    let mut train_images = usize::MAX;
    let mut view_area = 0.35f64;
    let mut cls_views = 0usize;
    let mut gmp = false;
    let mut weight_decay = None;
    let mut learning_rate = None;
    let mut batch_tokens = None;
    let mut sparsity = None;
    let mut rigl_drop_fraction = None;
    let mut sparsifier_interval = None;
    let mut min_learning_rate = None;
    let mut noise: Option<(usize, f32)> = None;
    let mut mix: Option<usize> = None;
    let mut cls_view_weights = vec![1usize];
    let mut distill_lrs = vec![distill.learning_rate];
    let mut distill_views: Vec<f64> = vec![distill.view_min_area.unwrap_or(0.0)];
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
            "--cls-weight" => list::<usize>(&v).map(|k| cls_weights = k).is_some(),
            "--split-seed" => v.parse().map(|k| split_seed = k).is_ok(),
            "--group-size" => v.parse().map(|k| group_size = k).is_ok(),
            "--distill-steps" => v.parse().map(|k| distill.steps = k).is_ok(),
            "--distill-images" => v.parse().map(|k| distill.images_per_step = k).is_ok(),
            "--distill-lr" => list::<f64>(&v).map(|k| distill_lrs = k).is_some(),
            "--distill-views" => list::<f64>(&v).map(|k| distill_views = k).is_some(),
            "--distill-min-lr" => v.parse().map(|k| distill.min_learning_rate = k).is_ok(),
            "--distill-temperature" => v.parse().map(|k| distill.temperature = k).is_ok(),
            "--views" => v.parse().map(|k| views = k).is_ok(),
            "--train-images" => v.parse().map(|k| train_images = k).is_ok(),
            "--view-area" => v.parse().map(|k| view_area = k).is_ok(),
            "--cls-views" => v.parse().map(|k| cls_views = k).is_ok(),
            "--sparsifier" => match v.as_str() {
                "gmp" | "rigl" => {
                    gmp = v == "gmp";
                    true
                }
                _ => false,
            },
            "--cls-view-weight" => list::<usize>(&v).map(|k| cls_view_weights = k).is_some(),
            "--score-every" => v.parse().map(|k| score_every = k).is_ok(),
            "--budgets" => list::<f64>(&v).map(|b| budgets = b).is_some(),
            "--weight-decay" => v.parse().map(|k| weight_decay = Some(k)).is_ok(),
            "--lr" => v.parse().map(|k| learning_rate = Some(k)).is_ok(),
            "--batch-tokens" => v.parse().map(|k| batch_tokens = Some(k)).is_ok(),
            "--sparsity" => v.parse().map(|k| sparsity = Some(k)).is_ok(),
            "--rigl-drop" => v.parse().map(|k| rigl_drop_fraction = Some(k)).is_ok(),
            "--interval" => v.parse().map(|k| sparsifier_interval = Some(k)).is_ok(),
            "--min-lr" => v.parse().map(|k| min_learning_rate = Some(k)).is_ok(),
            "--noise" => list::<f64>(&v)
                .filter(|k| k.len() == 2)
                .map(|k| noise = Some((k[0] as usize, k[1] as f32)))
                .is_some(),
            "--mix" => v.parse().map(|k| mix = Some(k)).is_ok(),
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
    if cls_views > 0 && modes.iter().any(|m| m != "independent") {
        eprintln!("--cls-views runs with --modes independent only");
        std::process::exit(2);
    }
    let checkpoint = Checkpoint::open(data.join("deit-tiny/model.safetensors"))?;
    let layout = MlpLayout::detect(&checkpoint)?;
    let vit = VisionTransformer::from_checkpoint(&checkpoint, None)?;
    let set = data.join("imagenet-sample");
    let labels = read_labels(&set)?;
    let calib = load_pixels(&split(&labels, "calib"))?;
    let (mut train_idx, val_idx) = holdout(calib.len_of(Axis(0)), fraction, split_seed)?;
    if train_images < train_idx.len() {
        use rand::{SeedableRng, seq::SliceRandom};
        train_idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(5));
        train_idx.truncate(train_images);
        train_idx.sort_unstable();
    }
    let train = calib.select(Axis(0), &train_idx);
    let val = calib.select(Axis(0), &val_idx);
    // Block-wise calibration images: the training images and `--views` random views of each.
    let fit = if views == 0 {
        train.clone()
    } else {
        let extra = random_views(train.view(), views, view_area, 7)?;
        concatenate(Axis(0), &[train.view(), extra.view()])
            .map_err(|e| fips::FipsError::Numerical(e.to_string()))?
    };
    // Class-token rows (MLP inputs) of `--cls-views` random views of every training image, per block.
    let view_cls: Vec<Array2<f32>> = if cls_views == 0 {
        Vec::new()
    } else {
        let extra = random_views(train.view(), cls_views, view_area, 13)?;
        let t = vit.config().tokens();
        let mut per_block: Vec<Vec<Array2<f32>>> = vec![Vec::new(); layout.blocks()];
        let mut done = 0;
        while done < extra.len_of(Axis(0)) {
            let end = (done + 64).min(extra.len_of(Axis(0)));
            let captured = streams(
                &vit,
                extra.slice(s![done..end, .., .., ..]),
                0..layout.blocks(),
            )?;
            for (b, (z, _)) in captured.into_iter().enumerate() {
                per_block[b].push(z.slice(s![..;t, ..]).to_owned());
            }
            done = end;
        }
        per_block
            .iter()
            .map(|p| cat(p))
            .collect::<fips::Result<_>>()?
    };
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
        let mut placed = Vec::new();
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
            let captured = streams(source, fit.view(), range.clone())?;
            let mut inputs: Vec<_> = captured.iter().map(|(z, _)| z.clone()).collect();
            let real_rows = inputs.first().map_or(0, |z| z.nrows());
            if !view_cls.is_empty() {
                for (z, &b) in inputs.iter_mut().zip(blocks) {
                    *z = cat(&[z.clone(), view_cls[b].clone()])?;
                }
            }
            if noise.is_some() || mix.is_some() {
                for (i, z) in inputs.iter_mut().enumerate() {
                    let real = std::mem::replace(z, Array2::zeros((0, 0)));
                    *z = with_augmented_tokens(real, noise, mix, i as u64)?;
                }
            }
            let mut cal = Calibration::new(inputs)?;
            if mode == "residual" {
                let teacher = streams(&vit, fit.view(), range.clone())?;
                let targets = teacher
                    .iter()
                    .zip(&captured)
                    .zip(&dense)
                    .map(|(((zt, mt), (_, ms)), mlp)| Ok(mt + &mlp.forward(zt.view())? - ms))
                    .collect::<fips::Result<Vec<_>>>()?;
                cal = cal.with_targets(targets)?;
            }
            // Each image's class token weighs `--cls-weight` tokens (as in `fips compress`).
            let class_rows: Vec<usize> = (0..real_rows).step_by(vit.config().tokens()).collect();
            let cls_weight = cls_weights[g.min(cls_weights.len() - 1)];
            let view_rows: Vec<usize> = (real_rows..cal.tokens()).collect();
            let cal = cal
                .with_repeated_rows(&class_rows, cls_weight.saturating_sub(1))?
                .with_repeated_rows(
                    &view_rows,
                    cls_view_weights[g.min(cls_view_weights.len() - 1)].saturating_sub(1),
                )?;
            // The `fips compress` defaults for images, with this group's budget.
            let params = MethodOptions {
                budget: Some(budgets[g]),
                steps: Some(steps),
                sparsifier: gmp.then_some(fips::methods::options::SparsifierKind::Gmp),
                weight_decay,
                learning_rate,
                batch_tokens,
                sparsity,
                rigl_drop_fraction,
                sparsifier_interval,
                min_learning_rate,
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
            placed.push(PlacedGroup {
                blocks: blocks.clone(),
                group,
            });
            let logits = classify(&student, val.view(), &mut Silent)?;
            let (agree, kl, rel) = metrics(&dense_logits, &logits);
            println!(
                "{mode:<12} after group {g}: agreement {:.1} %  KL {kl:.4}  logit rel {rel:.4}  ({:.0} s)",
                agree * 100.0,
                start.elapsed().as_secs_f64()
            );
        }
        let (agree, kl, rel) = metrics(
            &classify(&vit, train.view(), &mut Silent)?,
            &classify(&student, train.view(), &mut Silent)?,
        );
        println!(
            "{mode:<12} on the training images: agreement {:.1} %  KL {kl:.4}  logit rel {rel:.4}",
            agree * 100.0
        );
        if distill.steps == 0 {
            continue;
        }

        for (&lr, &views) in distill_lrs
            .iter()
            .flat_map(|lr| distill_views.iter().map(move |v| (lr, v)))
        {
            let params = DistillParams {
                learning_rate: lr,
                view_min_area: (views > 0.0).then_some(views),
                ..distill
            };
            let start = Instant::now();
            let mut distiller =
                Distiller::new(&vit, placed.clone(), train.view(), params.check()?)?;
            let mut losses = Vec::new();
            while let Some(loss) = distiller.step()? {
                losses.push(loss);
                let done = distiller.steps_done();
                if done % score_every == 0 || done == distill.steps {
                    let logits = classify(distiller.student(), val.view(), &mut Silent)?;
                    let (agree, kl, rel) = metrics(&dense_logits, &logits);
                    let mean = losses.iter().sum::<f64>() / losses.len() as f64;
                    losses.clear();
                    println!(
                        "{mode:<12} lr {lr:e} views {views}: distilled {done:>4} steps: agreement {:.1} %  KL {kl:.4}  logit rel {rel:.4}  (train loss {mean:.4}, {:.0} s)",
                        agree * 100.0,
                        start.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
    Ok(())
}
