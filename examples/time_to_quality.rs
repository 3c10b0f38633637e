//! Time to quality on DeiT-tiny: for every group, the wall time each training setting needs to
//! reach the held-out validation error that today's defaults reach at the end of their 900 steps,
//! and the validation error every setting ends at (the levers table).
//!
//! ```sh
//! cargo run --release --features images --example time_to_quality -- \
//!     [--data ../shared/data] [--configs defaults,s300,...] [--groups 0,1,2] [--every 25] \
//!     [--eval NAME|auto] [--target ERROR] [--early-stop PATIENCE,TOLERANCE] [--pair-coverage]
//! ```
//!
//! The defaults (the `fips` command's defaults before they were re-chosen with this example:
//! 900 steps of 1024 tokens, lr 1e-3 → 1e-5, RigL with drop fraction 0.05 every 50 steps) always
//! run first, unless `--target ERROR` (one group) gives their validation error directly; the
//! setting `defaults-es` then stands for them. `--early-stop` stops every other setting by
//! [`fips::math::validation::EarlyStop`]. A setting is spelled as dash-separated changes to the
//! defaults: `sN` steps, `bN` tokens per step, `lrX` peak and `minX` final learning rate, `riglN`
//! RigL's steps between updates, `dropX` its initial drop fraction, `endX` its last update as a
//! share of the steps, `gmp` (GMP's default schedule) or `gmpN` (GMP every N steps), `viewsN`
//! extra random views per image, `beta2` (Adam β₂ 0.99), `2x2`, `1x2`, `2x1` (the factors' mask
//! in 2×2 tiles or pairs along a row or a column of `V`, [`fips::MaskTiles`]); e.g.
//! `s800-b384-lr3e-3-rigl10-drop0.15` (the `fips` command's defaults; run it with
//! `OPENBLAS_NUM_THREADS=1` to train the blocks of a group in parallel, as `make demo` does, and the
//! reference defaults with two BLAS threads, their fastest). Without `--configs` the levers of the
//! first table in `docs/results.md` run. Results of these runs are in `docs/results.md`.
//!
//! Validation: a seeded 5 % of the 250 `calib/` images (13 images, 2561 tokens per block) is held
//! out ([`fips::math::validation::holdout`]); every setting trains on the other 237 (and, for the
//! augmented settings, on seeded random-resized-crop + flip views of them as well). Every
//! `--every` steps the trainer's current group ([`fips::FipsTrainer::snapshot`]) is scored on the
//! held-out tokens; scoring is not timed. `eval/` is touched only with `--eval NAME`, once, at the
//! end: the model with every group trained by setting NAME, and by `defaults`, is classified on
//! `eval/` (top-1 and agreement with the dense model). `--eval auto` picks on validation alone the
//! fastest setting that reaches the defaults' validation error in every group and the setting with
//! the lowest mean validation error.
//!
//! Times: "setup" is the trainer's construction (targets on the calibration tokens and the SVD
//! initialisation), "to reach" is setup plus the training steps up to the first scored step at or
//! below the defaults' final validation error. Capturing the calibration activations is reported
//! per data variant (plain, or with views), once per group.
//!
//! `--pair-coverage` prints, for every trained factor `V_j` (`r × I`), the share of its kept
//! entries whose partner is also kept when its columns (hidden units) or its rows (rank) are
//! paired: neighbours `(2b, 2b + 1)`, and a greedy matching that pairs the most-overlapping
//! supports first (hidden units and rank rows can be permuted freely, so this bounds what a
//! pairing chosen after training could make pair-closed). Independent entries at density `ρ`
//! give `ρ`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fips::BlockGroups;
use fips::Checkpoint;
use fips::MlpLayout;
use fips::app::augment::random_views;
use fips::app::images::{load_pixels, read_labels, split};
use fips::app::metrics::{Accuracy, agreement};
use fips::app::pipeline::{self, CalibrationSource, Silent};
use fips::app::vit::VisionTransformer;
use fips::math::validation::{ValidationSet, holdout};
use fips::{
    Budget, CompressedGroup, FipsParams, GmpSchedule, MaskTiles, ParamGuard, RiglSchedule,
    Sparsifier,
};
use ndarray::{Array4, Axis, concatenate};

/// One training setting.
#[derive(Debug, Clone)]
struct Setting {
    name: String,
    steps: usize,
    batch: usize,
    lr: f64,
    min_lr: f64,
    sparsifier: Sparsifier,
    /// Extra random views per training image (0: the images alone).
    views: usize,
    /// Adam's second-moment decay.
    beta2: f64,
    /// The structure of the factors' mask.
    tiles: MaskTiles,
}

impl Setting {
    /// The reference of issue 14's time to quality, the `fips` command's defaults when it was
    /// filed: 900 steps of 1024 tokens, lr 1e-3 → 1e-5, RigL (Δt 50, α 0.05, end 0.75).
    fn defaults() -> Self {
        Self {
            name: "defaults".into(),
            steps: 900,
            batch: 1024,
            lr: 1e-3,
            min_lr: 1e-5,
            sparsifier: Sparsifier::Rigl(RiglSchedule::default()),
            views: 0,
            beta2: 0.999,
            tiles: MaskTiles::Entries,
        }
    }

    /// The defaults changed by the dash-separated parts of `name` (see the module documentation).
    fn parse(name: &str) -> Result<Self, String> {
        let mut s = Self::defaults();
        s.name = name.to_string();
        // Split at dashes, but keep exponents whole: `lr2e-3` is one part.
        let mut parts: Vec<String> = Vec::new();
        for piece in name.split('-') {
            match parts.last_mut() {
                Some(last)
                    if last.ends_with('e')
                        && !piece.is_empty()
                        && piece.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    last.push('-');
                    last.push_str(piece);
                }
                _ => parts.push(piece.to_string()),
            }
        }
        for part in parts.iter().map(String::as_str).filter(|p| !p.is_empty()) {
            let num = |prefix: &str| -> Option<f64> { part.strip_prefix(prefix)?.parse().ok() };
            let count = |prefix: &str| -> Option<usize> { part.strip_prefix(prefix)?.parse().ok() };
            let rigl = |s: &Setting| match s.sparsifier {
                Sparsifier::Rigl(r) => r,
                _ => RiglSchedule::default(),
            };
            match part {
                "defaults" | "es" => {}
                "2x2" => s.tiles = MaskTiles::Square2,
                "1x2" => s.tiles = MaskTiles::Wide2,
                "2x1" => s.tiles = MaskTiles::Tall2,
                "gmp" => s.sparsifier = Sparsifier::Gmp(GmpSchedule::default()),
                "beta2" => s.beta2 = 0.99,
                _ => {
                    if let Some(v) = count("views") {
                        s.views = v;
                    } else if let Some(v) = count("rigl") {
                        s.sparsifier = Sparsifier::Rigl(RiglSchedule {
                            interval: v.max(1),
                            ..rigl(&s)
                        });
                    } else if let Some(v) = num("drop") {
                        s.sparsifier = Sparsifier::Rigl(RiglSchedule {
                            drop_fraction: v,
                            ..rigl(&s)
                        });
                    } else if let Some(v) = num("end") {
                        s.sparsifier = Sparsifier::Rigl(RiglSchedule {
                            end_fraction: v,
                            ..rigl(&s)
                        });
                    } else if let Some(v) = count("gmp") {
                        s.sparsifier = Sparsifier::Gmp(GmpSchedule {
                            interval: v.max(1),
                            ..GmpSchedule::default()
                        });
                    } else if let Some(v) = num("min") {
                        s.min_lr = v;
                    } else if let Some(v) = num("lr") {
                        s.lr = v;
                    } else if let Some(v) = count("s") {
                        s.steps = v;
                    } else if let Some(v) = count("b") {
                        s.batch = v;
                    } else {
                        return Err(format!("unknown part {part:?} of setting {name:?}"));
                    }
                }
            }
        }
        Ok(s)
    }
}

/// The settings of a run without `--configs`: the levers of `docs/results.md`.
const LEVERS: &[&str] = &[
    "defaults-es",
    "s300",
    "s300-lr2e-3",
    "s300-lr3e-3",
    "s300-lr2e-3-rigl25",
    "s300-lr2e-3-gmp25",
    "s450-lr2e-3",
    "s300-lr2e-3-views1",
    "s600-b512-lr2e-3",
    "s900-b512-lr2e-3",
    "s900-b256-lr2e-3",
    "s300-lr2e-3-beta2",
    "s450-lr2e-3-views2",
];

/// Validation error after `step` steps, and the time spent to get there.
#[derive(Debug, Clone, Copy)]
struct Point {
    step: usize,
    time: Duration,
    error: f64,
}

#[derive(Debug)]
struct Run {
    setup: Duration,
    curve: Vec<Point>,
    group: CompressedGroup<f32>,
}

impl Run {
    fn final_error(&self) -> f64 {
        self.curve.last().map_or(f64::NAN, |p| p.error)
    }
    /// Setup plus training time to the first scored point at or below `target`.
    fn time_to(&self, target: f64) -> Option<(usize, Duration)> {
        self.curve
            .iter()
            .find(|p| p.error <= target)
            .map(|p| (p.step, self.setup + p.time))
    }
    fn total(&self) -> Duration {
        self.setup + self.curve.last().map_or(Duration::ZERO, |p| p.time)
    }
}

fn list(arg: &str) -> Vec<String> {
    arg.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Every block of `group` rebuilt dense.
fn dense_blocks(group: &CompressedGroup<f32>) -> fips::Result<Vec<fips::DenseMlp<f32>>> {
    (0..group.blocks()).map(|b| group.to_dense_mlp(b)).collect()
}

fn main() -> fips::Result<()> {
    let mut data = PathBuf::from("../shared/data");
    let mut wanted: Option<Vec<String>> = None;
    let mut groups_wanted: Option<Vec<usize>> = None;
    let mut every = 25usize;
    let mut eval_setting: Option<String> = None;
    let mut fixed_target: Option<f64> = None;
    let mut early: Option<(usize, f64)> = None;
    let mut pair_coverage = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match a.as_str() {
            "--data" => data = PathBuf::from(value()),
            "--configs" => wanted = Some(list(&value())),
            "--groups" => {
                groups_wanted = Some(
                    list(&value())
                        .iter()
                        .filter_map(|s| s.parse().ok())
                        .collect(),
                )
            }
            "--pair-coverage" => pair_coverage = true,
            "--every" => every = value().parse().unwrap_or(25).max(1),
            "--eval" => eval_setting = Some(value()),
            // Skip the defaults' run and take this validation error as the target (one group).
            "--target" => fixed_target = value().parse().ok(),
            // Early stopping of every setting but the defaults: PATIENCE_STEPS,TOLERANCE.
            "--early-stop" => {
                let v = value();
                let mut it = v.split(',');
                early = match (
                    it.next().and_then(|p| p.parse().ok()),
                    it.next().and_then(|t| t.parse().ok()),
                ) {
                    (Some(p), Some(t)) => Some((p, t)),
                    _ => {
                        eprintln!("--early-stop PATIENCE,TOLERANCE (e.g. 100,0.003)");
                        std::process::exit(2);
                    }
                };
            }
            other => {
                eprintln!("unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let names: Vec<String> = match &wanted {
        None => LEVERS.iter().map(|n| n.to_string()).collect(),
        Some(names) => names.clone(),
    };
    let mut chosen = vec![Setting::defaults()];
    for n in names.iter().filter(|n| n.as_str() != "defaults") {
        match Setting::parse(n) {
            Ok(s) => chosen.push(s),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        }
    }

    let checkpoint = Checkpoint::open(data.join("deit-tiny/model.safetensors"))?;
    let layout = MlpLayout::detect(&checkpoint)?;
    let vit = VisionTransformer::from_checkpoint(&checkpoint, None)?;
    let set = data.join("imagenet-sample");
    let labels = read_labels(&set)?;
    let calib = load_pixels(&split(&labels, "calib"))?;
    let (train_idx, val_idx) = holdout(calib.len_of(Axis(0)), 0.05, 2024)?;
    let train = calib.select(Axis(0), &train_idx);
    let val = calib.select(Axis(0), &val_idx);
    let shapes: Vec<_> = (0..layout.blocks())
        .map(|b| layout.block(b).map(|t| (t.width, t.intermediate)))
        .collect::<fips::Result<_>>()?;
    let groups = BlockGroups::consecutive(&shapes, 4)?;
    let group_ids: Vec<usize> = groups_wanted.unwrap_or_else(|| (0..groups.len()).collect());
    println!(
        "time to quality: {} training images, {} held out ({} tokens per block), scored every {every} steps; \
         OPENBLAS_NUM_THREADS={}",
        train_idx.len(),
        val_idx.len(),
        val_idx.len() * vit.config().tokens(),
        std::env::var("OPENBLAS_NUM_THREADS").unwrap_or_else(|_| "default".into())
    );

    // Training pixels per number of views (0: the images alone).
    let mut pixel_sets: BTreeMap<usize, Array4<u8>> = BTreeMap::new();
    for s in &chosen {
        if pixel_sets.contains_key(&s.views) {
            continue;
        }
        let pixels = if s.views == 0 {
            train.clone()
        } else {
            let extra = random_views(train.view(), s.views, 0.25, 7)?;
            concatenate(Axis(0), &[train.view(), extra.view()])
                .map_err(|e| fips::FipsError::Numerical(e.to_string()))?
        };
        pixel_sets.insert(s.views, pixels);
    }

    // runs[setting][group]
    let mut runs: Vec<BTreeMap<usize, Run>> = chosen.iter().map(|_| BTreeMap::new()).collect();
    for &g in &group_ids {
        let blocks = &groups.groups()[g];
        let dense = blocks
            .iter()
            .map(|&b| layout.load_block::<f32>(&checkpoint, b, layout.default_activation()))
            .collect::<fips::Result<Vec<_>>>()?;
        let width = dense[0].width();
        let val_cal = pipeline::group_calibration(
            &CalibrationSource::Images {
                vit: &vit,
                pixels: val.view(),
                // Every token alike: the validation error here is a per-token mean (the class-token
                // weight is a whole-model lever, scored by `calibration_levers`).
                class_token_weight: 1,
                streams: None,
            },
            g,
            blocks,
            width,
            &mut Silent,
        )?;
        let validation = ValidationSet::new(&dense, &val_cal)?;
        let mut calibrations = BTreeMap::new();
        for (&views, pixels) in &pixel_sets {
            let start = Instant::now();
            let cal = pipeline::group_calibration(
                &CalibrationSource::Images {
                    vit: &vit,
                    pixels: pixels.view(),
                    // Every token alike: the validation error here is a per-token mean (the class-token
                    // weight is a whole-model lever, scored by `calibration_levers`).
                    class_token_weight: 1,
                    streams: None,
                },
                g,
                blocks,
                width,
                &mut Silent,
            )?;
            println!(
                "group {g}: captured {} tokens per block ({} views per image) in {:.1} s",
                cal.tokens(),
                views,
                start.elapsed().as_secs_f64()
            );
            calibrations.insert(views, cal);
        }
        for (k, s) in chosen.iter().enumerate() {
            let Some(cal) = calibrations.get(&s.views) else {
                continue;
            };
            if k == 0 && fixed_target.is_some() {
                continue;
            }
            let compressor = FipsParams::new()
                .budget(Budget::Fraction(0.5))
                .sparsity(0.75)
                .sparsifier(s.sparsifier)
                .steps(s.steps)
                .batch_tokens(s.batch)
                .learning_rate(s.lr)
                .min_learning_rate(s.min_lr)
                .optimizer(fips::AdamW {
                    learning_rate: s.lr,
                    min_learning_rate: s.min_lr,
                    beta2: s.beta2,
                    ..fips::AdamW::default()
                })
                .mask_tiles(s.tiles)
                .check()?;
            let start = Instant::now();
            let mut trainer = compressor.trainer(&dense, cal)?;
            let setup = start.elapsed();
            let mut curve = Vec::new();
            let mut trained = Duration::ZERO;
            let mut stopper = match early {
                Some((patience, tolerance)) if k > 0 => {
                    Some(fips::math::validation::EarlyStop::new(patience, tolerance)?)
                }
                _ => None,
            };
            loop {
                let t = Instant::now();
                let Some(progress) = trainer.step()? else {
                    break;
                };
                trained += t.elapsed();
                if progress.step % every == 0 || progress.step == s.steps {
                    let error = validation.relative_error(&dense_blocks(&trainer.snapshot()?)?)?;
                    curve.push(Point {
                        step: progress.step,
                        time: trained,
                        error,
                    });
                    if stopper
                        .as_mut()
                        .is_some_and(|e| e.observe(progress.step, error))
                    {
                        println!("  early stop at step {}", progress.step);
                        break;
                    }
                }
            }
            let group = trainer.finish()?.group;
            if pair_coverage {
                for f in group.factors() {
                    let rows = f.mask();
                    let columns = rows.t();
                    let past_width = rows.slice(ndarray::s![group.width().min(f.rank()).., ..]);
                    println!(
                        "  pair coverage of V ({} × {}): columns neighbours {:.3} greedy {:.3} | \
                         rows neighbours {:.3} greedy {:.3} | kept in rows past the width {:.3}",
                        f.rank(),
                        f.cols(),
                        pair_coverage_of(columns, false),
                        pair_coverage_of(columns, true),
                        pair_coverage_of(rows, false),
                        pair_coverage_of(rows, true),
                        past_width.iter().filter(|&&x| x).count() as f64 / f.nnz().max(1) as f64
                    );
                }
            }
            let run = Run {
                setup,
                curve,
                group,
            };
            println!(
                "group {g} {:<22} setup {:5.1} s, {} steps in {:6.1} s, validation error {:.4}",
                s.name,
                run.setup.as_secs_f64(),
                s.steps,
                trained.as_secs_f64(),
                run.final_error()
            );
            println!(
                "  curve: {}",
                run.curve
                    .iter()
                    .filter(|p| p.step % 100 == 0 || p.step == s.steps)
                    .map(|p| format!(
                        "{}:{:.4}@{:.0}s",
                        p.step,
                        p.error,
                        (run.setup + p.time).as_secs_f64()
                    ))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            runs[k].insert(g, run);
        }
    }

    // Table 1: time to the defaults' final validation error.
    println!("\n## Time to the defaults' validation error (per group)\n");
    let mut header = String::from("| setting |");
    let mut rule = String::from("|---|");
    for g in &group_ids {
        header.push_str(&format!(
            " group {g}: to reach (step) | × faster | final error |"
        ));
        rule.push_str("---|---|---|");
    }
    println!("{header}\n{rule}");
    for (k, s) in chosen.iter().enumerate() {
        let mut row = format!("| {} |", s.name);
        for g in &group_ids {
            let Some(run) = runs[k].get(g) else {
                row.push_str(" – | – | – |");
                continue;
            };
            let (target, base_time) = match (runs[0].get(g), fixed_target) {
                (Some(base), _) => {
                    let target = base.final_error();
                    (
                        target,
                        base.time_to(target).map_or(base.total(), |(_, t)| t),
                    )
                }
                // Without the defaults' run, `defaults-es` (the same setting) gives their time.
                (None, Some(target)) => (
                    target,
                    chosen
                        .iter()
                        .position(|s| s.name == "defaults-es")
                        .and_then(|k| runs[k].get(g)?.time_to(target))
                        .map_or(Duration::MAX, |(_, t)| t),
                ),
                (None, None) => {
                    row.push_str(" – | – | – |");
                    continue;
                }
            };
            match run.time_to(target) {
                Some((step, t)) => row.push_str(&format!(
                    " {:.1} s ({step}) | {:.2} | {:.4} |",
                    t.as_secs_f64(),
                    if base_time == Duration::MAX {
                        f64::NAN
                    } else {
                        base_time.as_secs_f64() / t.as_secs_f64()
                    },
                    run.final_error()
                )),
                None => row.push_str(&format!(
                    " not reached ({:.1} s) | – | {:.4} |",
                    run.total().as_secs_f64(),
                    run.final_error()
                )),
            }
        }
        println!("{row}");
    }

    // Table 2: levers, on validation only.
    println!("\n## Levers (held-out validation error per group; nothing here looks at eval/)\n");
    println!(
        "| setting | steps × tokens | lr | sparsifier | views | mean validation error | per group | training time (all groups) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (k, s) in chosen.iter().enumerate() {
        if runs[k].is_empty() {
            continue;
        }
        let errors: Vec<f64> = group_ids
            .iter()
            .filter_map(|g| runs[k].get(g).map(Run::final_error))
            .collect();
        let mean = errors.iter().sum::<f64>() / errors.len().max(1) as f64;
        let total: f64 = runs[k].values().map(|r| r.total().as_secs_f64()).sum();
        println!(
            "| {} | {} × {} | {:e} → {:e} | {} | {} | {:.4} | {} | {:.0} s |",
            s.name,
            s.steps,
            s.batch,
            s.lr,
            s.min_lr,
            s.sparsifier,
            s.views,
            mean,
            errors
                .iter()
                .map(|e| format!("{e:.4}"))
                .collect::<Vec<_>>()
                .join(" / "),
            total
        );
    }

    // Once, at the end: eval/ for the chosen setting against the defaults.
    if let Some(name) = eval_setting {
        // `auto`: chosen on validation only: the fastest setting that reaches the defaults'
        // validation error in every group ("speed"), and the lowest mean validation error
        // ("quality").
        let mean_error = |k: usize| {
            runs[k].values().map(Run::final_error).sum::<f64>() / runs[k].len().max(1) as f64
        };
        let reach_time = |k: usize| -> Option<f64> {
            runs[k]
                .iter()
                .map(|(g, r)| {
                    let target = runs[0].get(g).map(Run::final_error).or(fixed_target)?;
                    r.time_to(target).map(|(_, t)| t.as_secs_f64())
                })
                .sum()
        };
        let mut picks: Vec<usize> = vec![0];
        if name == "auto" {
            let speed = (0..chosen.len())
                .filter_map(|k| reach_time(k).map(|t| (k, t)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(0, |(k, _)| k);
            let quality = (0..chosen.len())
                .min_by(|&a, &b| mean_error(a).total_cmp(&mean_error(b)))
                .unwrap_or(0);
            println!(
                "\nchosen on validation: speed {}, quality {}",
                chosen[speed].name, chosen[quality].name
            );
            picks.extend([speed, quality]);
        } else {
            let Some(k) = chosen.iter().position(|s| s.name == name) else {
                eprintln!("--eval {name}: not among the settings run");
                std::process::exit(2);
            };
            picks.push(k);
        }
        picks.dedup();
        let mut seen = Vec::new();
        picks.retain(|k| {
            let new = !seen.contains(k);
            seen.push(*k);
            new
        });
        if group_ids.len() != groups.len() {
            eprintln!("--eval needs every group (run without --groups)");
            std::process::exit(2);
        }
        let eval_items = split(&labels, "eval");
        let eval = load_pixels(&eval_items)?;
        let eval_labels: Vec<usize> = eval_items.iter().map(|i| i.label).collect();
        let dense_logits = pipeline::classify(&vit, eval.view(), &mut Silent)?;
        let dense = Accuracy::new(dense_logits.view(), &eval_labels)?;
        println!("\n## eval/ (250 images), once\n");
        println!("| setting | top-1 | Δ top-1 | agreement with dense |\n|---|---|---|---|");
        println!("| dense | {:.1} % | – | – |", 100.0 * dense.top1);
        for idx in picks {
            let label = &chosen[idx].name;
            if runs[idx].len() != group_ids.len() {
                continue;
            }
            let mut model = vit.clone();
            for &g in &group_ids {
                for (pos, &block) in groups.groups()[g].iter().enumerate() {
                    model.set_mlp(block, runs[idx][&g].group.to_dense_mlp(pos)?)?;
                }
            }
            let logits = pipeline::classify(&model, eval.view(), &mut Silent)?;
            let acc = Accuracy::new(logits.view(), &eval_labels)?;
            println!(
                "| {label} | {:.1} % | {:+.1} | {:.1} % |",
                100.0 * acc.top1,
                100.0 * (acc.top1 - dense.top1),
                100.0 * agreement(dense_logits.view(), logits.view())?
            );
        }
    }
    Ok(())
}

/// The share of the kept entries of `lines` (one row per paired line) whose partner in a pairing
/// of the lines is kept too: `2 Σ |A ∩ B| / nnz` over the pairs `(A, B)`; the pairs are
/// neighbours `(2b, 2b + 1)`, or (`greedy`) chosen by largest overlap first.
fn pair_coverage_of(lines: ndarray::ArrayView2<'_, bool>, greedy: bool) -> f64 {
    let n = lines.nrows();
    let overlap = |a: usize, b: usize| {
        lines
            .row(a)
            .iter()
            .zip(lines.row(b))
            .filter(|&(&x, &y)| x && y)
            .count()
    };
    let pairs: Vec<(usize, usize)> = if greedy {
        let mut candidates: Vec<(usize, usize, usize)> = (0..n)
            .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
            .map(|(a, b)| (overlap(a, b), a, b))
            .collect();
        candidates.sort_unstable_by(|x, y| y.cmp(x));
        let mut used = vec![false; n];
        let mut pairs = Vec::new();
        for (_, a, b) in candidates {
            if !used[a] && !used[b] {
                used[a] = true;
                used[b] = true;
                pairs.push((a, b));
            }
        }
        pairs
    } else {
        (0..n / 2).map(|b| (2 * b, 2 * b + 1)).collect()
    };
    let nnz = lines.iter().filter(|&&x| x).count().max(1);
    2.0 * pairs.iter().map(|&(a, b)| overlap(a, b)).sum::<usize>() as f64 / nnz as f64
}
