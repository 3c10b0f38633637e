//! The `fips` binary end to end on a tiny random ViT and synthetic JPEG images.
#![cfg(feature = "cli")]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fips::format::checkpoint::{TensorData, write_safetensors};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;

const WIDTH: usize = 16;
const HIDDEN: usize = 32;
const PATCH: usize = 56; // 224 / 56 = 4 × 4 patches
const TOKENS: usize = 17;
const CLASSES: usize = 5;
const BLOCKS: usize = 4;

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn random(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> TensorData {
    let n: usize = shape.iter().product();
    TensorData::from_floats(
        (0..n).map(|_| scale * (rng.random::<f32>() - 0.5)),
        shape.to_vec(),
        Dtype::F32,
    )
    .unwrap()
}

/// A timm-named ViT with random weights.
fn write_tiny_vit(path: &Path) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut t = BTreeMap::new();
    t.insert(
        "patch_embed.proj.weight".into(),
        random(&mut rng, &[WIDTH, 3, PATCH, PATCH], 0.02),
    );
    t.insert(
        "patch_embed.proj.bias".into(),
        random(&mut rng, &[WIDTH], 0.1),
    );
    t.insert("cls_token".into(), random(&mut rng, &[1, 1, WIDTH], 0.5));
    t.insert(
        "pos_embed".into(),
        random(&mut rng, &[1, TOKENS, WIDTH], 0.5),
    );
    for b in 0..BLOCKS {
        let p = format!("blocks.{b}");
        for norm in ["norm1", "norm2"] {
            t.insert(
                format!("{p}.{norm}.weight"),
                TensorData::from_floats([1.0f32; WIDTH], vec![WIDTH], Dtype::F32).unwrap(),
            );
            t.insert(format!("{p}.{norm}.bias"), random(&mut rng, &[WIDTH], 0.1));
        }
        for (name, out, inp) in [
            ("attn.qkv", 3 * WIDTH, WIDTH),
            ("attn.proj", WIDTH, WIDTH),
            ("mlp.fc1", HIDDEN, WIDTH),
            ("mlp.fc2", WIDTH, HIDDEN),
        ] {
            t.insert(
                format!("{p}.{name}.weight"),
                random(&mut rng, &[out, inp], 1.0 / (inp as f32).sqrt()),
            );
            t.insert(format!("{p}.{name}.bias"), random(&mut rng, &[out], 0.1));
        }
    }
    t.insert(
        "norm.weight".into(),
        TensorData::from_floats([1.0f32; WIDTH], vec![WIDTH], Dtype::F32).unwrap(),
    );
    t.insert("norm.bias".into(), random(&mut rng, &[WIDTH], 0.1));
    t.insert(
        "head.weight".into(),
        random(&mut rng, &[CLASSES, WIDTH], 1.0),
    );
    t.insert("head.bias".into(), random(&mut rng, &[CLASSES], 0.1));
    write_safetensors(path, &t, HashMap::new()).unwrap();
}

/// An image set with `calib` and `eval` splits of smooth random 224 × 224 JPEGs.
fn write_images(dir: &Path) {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut tsv = String::from("file\tlabel\tsynset\tsplit\n");
    for split in ["calib", "eval"] {
        std::fs::create_dir_all(dir.join(split)).unwrap();
        for k in 0..6 {
            let (a, b, c): (f32, f32, f32) = (rng.random(), rng.random(), rng.random());
            let img = image::RgbImage::from_fn(224, 224, |x, y| {
                let v = |s: f32| {
                    ((s * (x as f32 / 20.0 + y as f32 / 31.0)).sin() * 120.0 + 128.0) as u8
                };
                image::Rgb([v(a), v(b), v(c)])
            });
            let file = format!("{split}/img{k}.jpg");
            img.save(dir.join(&file)).unwrap();
            tsv.push_str(&format!("{file}\t{}\tn0\t{split}\n", k % CLASSES));
        }
    }
    std::fs::write(dir.join("labels.tsv"), tsv).unwrap();
}

fn fips(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fips"))
        .args(args)
        .env("OPENBLAS_NUM_THREADS", "1")
        .output()
        .expect("the fips binary runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Two groups of two blocks of the tiny ViT, small batches, half-dense factors.
const TWO_SMALL_GROUPS: [&str; 6] = [
    "--batch-tokens",
    "32",
    "--groups",
    "0-1,2-3",
    "--sparsity",
    "0.5",
];

/// A scratch directory `fips-{tag}-{pid}` holding the tiny ViT and its image set.
fn tiny_vit_and_images(tag: &str) -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir(std::env::temp_dir().join(format!("fips-{tag}-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let model = dir.0.join("model.safetensors");
    write_tiny_vit(&model);
    let images = dir.0.join("images");
    write_images(&images);
    (dir, model, images)
}

#[test]
fn compress_inspect_densify_and_eval_a_tiny_vit() {
    let (dir, model, images) = tiny_vit_and_images("cli");
    let out_dir = dir.0.join("out");
    let s = |p: &Path| p.to_string_lossy().into_owned();

    let out = fips(&[
        "compress",
        "--checkpoint",
        &s(&model),
        "--images",
        &s(&images),
        "--heads",
        "1",
        "--steps",
        "30",
        "--batch-tokens",
        "32",
        "--groups",
        "0-1,2-3",
        "--budget",
        "0.5",
        "--sparsity",
        "0.5",
        "--out-dir",
        &s(&out_dir),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert!(log.contains("timm ViT/DeiT"), "{log}");
    assert!(log.contains("6 eval images"), "{log}");
    for f in [
        "compressed.safetensors",
        "densified.safetensors",
        "loss_group0.svg",
        "loss_group1.svg",
        "report.json",
    ] {
        assert!(out_dir.join(f).is_file(), "{f} missing");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["groups"].as_array().unwrap().len(), 2);
    assert_eq!(report["groups"][1]["blocks"], serde_json::json!([2, 3]));
    assert!(report["eval"]["agreement"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        report["groups"][0]["loss_curve"].as_array().unwrap().len(),
        30
    );

    let out = fips(&["inspect", &s(&out_dir.join("compressed.safetensors"))]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("fips-compressed version 3")
            && text(&out).contains("group 1: blocks [2, 3]")
            && text(&out).contains("bytes: values")
            && text(&out).contains("x the dense MLP weights"),
        "{}",
        text(&out)
    );
    let out = fips(&["inspect", &s(&model)]);
    assert!(
        text(&out).contains("4 blocks of standard MLPs"),
        "{}",
        text(&out)
    );

    let again = dir.0.join("again.safetensors");
    let out = fips(&[
        "densify",
        "--compressed",
        &s(&out_dir.join("compressed.safetensors")),
        "--original",
        &s(&model),
        "--out",
        &s(&again),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(out_dir.join("densified.safetensors")).unwrap(),
        "densify reproduces the densified checkpoint byte for byte"
    );

    let out = fips(&[
        "eval",
        "--checkpoint",
        &s(&model),
        "--images",
        &s(&images),
        "--heads",
        "1",
        "--compressed",
        &s(&out_dir.join("compressed.safetensors")),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("agreement with dense"),
        "{}",
        text(&out)
    );

    let acts = dir.0.join("acts.safetensors");
    let out = fips(&[
        "capture",
        "--checkpoint",
        &s(&model),
        "--images",
        &s(&images),
        "--blocks",
        "0-3",
        "--out",
        &s(&acts),
    ]);
    // `capture` uses the default head count (width / 64 = 0 → 1 head here).
    assert!(out.status.success(), "{}", text(&out));
    let out = fips(&[
        "compress",
        "--checkpoint",
        &s(&model),
        "--activations",
        &s(&acts),
        "--steps",
        "5",
        "--batch-tokens",
        "16",
        "--group-size",
        "2",
        "--out-dir",
        &s(&dir.0.join("from-file")),
        "--threads",
        "1",
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

/// `--mask-tiles 2x2` trains with tiled masks (the report's parameters say so and the achieved
/// sparsity is within 3 entries of the target), and is part of the work area's settings: a rerun
/// without it never resumes the tiled parts.
#[test]
fn mask_tiles_reach_the_report_and_the_work_area_settings() {
    let dir = TempDir(std::env::temp_dir().join(format!("fips-cli-tiles-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let model = dir.0.join("model.safetensors");
    write_tiny_vit(&model);
    let model = model.to_string_lossy().into_owned();
    let run = |out_dir: &Path, tiles: bool, only: bool| {
        let out_dir = out_dir.to_string_lossy().into_owned();
        let mut a = vec![
            "compress",
            "--checkpoint",
            &model,
            "--data-free",
            "--steps",
            "20",
            "--out-dir",
            &out_dir,
        ];
        a.extend_from_slice(&TWO_SMALL_GROUPS);
        if tiles {
            a.extend(["--mask-tiles", "2x2"]);
        }
        if only {
            a.extend(["--only-group", "0"]);
        }
        fips(&a)
    };
    let out_dir = dir.0.join("out");
    let out = run(&out_dir, true, false);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["parameters"]["mask_tiles"], "2x2", "{report}");
    for group in report["groups"].as_array().unwrap() {
        let details = &group["details"];
        let nnz = details["nnz"].as_u64().unwrap();
        let sparsity = details["sparsity"].as_f64().unwrap();
        let entries = (nnz as f64 / (1.0 - sparsity)).round() as u64;
        let target = entries / 2;
        assert!(nnz <= target && target - nnz < 4, "{nnz} of {entries}");
    }
    // A part of a tiled run is never taken by a run without tiles.
    let parts = dir.0.join("parts");
    assert!(run(&parts, true, true).status.success());
    let changed = run(&parts, false, false);
    assert!(!changed.status.success());
    let log = text(&changed);
    assert!(
        log.contains("mask_tiles") && log.contains("--fresh"),
        "{log}"
    );
}

#[test]
fn bad_input_gives_an_error_message_not_a_panic() {
    let dir = TempDir(std::env::temp_dir().join(format!("fips-cli-bad-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let missing = dir.0.join("missing.safetensors");
    let out = fips(&[
        "compress",
        "--checkpoint",
        &missing.to_string_lossy(),
        "--data-free",
    ]);
    assert!(!out.status.success());
    let log = text(&out);
    assert!(log.contains("error:") && !log.contains("panicked"), "{log}");

    let garbage = dir.0.join("garbage.safetensors");
    std::fs::write(&garbage, b"definitely not a safetensors file").unwrap();
    let out = fips(&["inspect", &garbage.to_string_lossy()]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("error:") && !text(&out).contains("panicked"),
        "{}",
        text(&out)
    );

    let model = dir.0.join("model.safetensors");
    write_tiny_vit(&model);
    let out = fips(&[
        "compress",
        "--checkpoint",
        &model.to_string_lossy(),
        "--data-free",
        "--budget",
        "1.5",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("budget"), "{}", text(&out));
    let out = fips(&[
        "compress",
        "--checkpoint",
        &model.to_string_lossy(),
        "--data-free",
        "--groups",
        "0-1,1-2",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("block 1 is in group 0 and in group 1"),
        "{}",
        text(&out)
    );

    // The class-token weight belongs to image calibration and has a range.
    let out = fips(&[
        "compress",
        "--checkpoint",
        &model.to_string_lossy(),
        "--data-free",
        "--class-token-weight",
        "3",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("class-token-weight") && !text(&out).contains("panicked"),
        "{}",
        text(&out)
    );
    let images = dir.0.join("images");
    write_images(&images);
    let out = fips(&[
        "compress",
        "--checkpoint",
        &model.to_string_lossy(),
        "--images",
        &images.to_string_lossy(),
        "--heads",
        "1",
        "--class-token-weight",
        "0",
        "--out-dir",
        &dir.0.join("out-weight").to_string_lossy(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("`class-token-weight`: must be in 1..=1000, got 0"),
        "{}",
        text(&out)
    );

    // A flag the chosen method does not use is an error that names it, not silently ignored.
    for (method, flag, value) in [
        ("svd", "--sparsity", "0.5"),
        ("mixed-rank", "--rank", "8"),
        ("layer-collapse", "--budget", "0.5"),
        ("svd", "--mask-tiles", "2x2"),
    ] {
        let out = fips(&[
            "compress",
            "--checkpoint",
            &model.to_string_lossy(),
            "--data-free",
            "--method",
            method,
            flag,
            value,
        ]);
        assert!(!out.status.success(), "{method} {flag}");
        let log = text(&out);
        assert!(
            log.contains(&format!(
                "`{}` is not a setting of method {method}",
                &flag[2..]
            )),
            "{log}"
        );
    }

    // The calibration memory budget applies to a calibration read from a file only.
    let out = fips(&[
        "compress",
        "--checkpoint",
        &model.to_string_lossy(),
        "--data-free",
        "--calibration-memory",
        "0",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("calibration-memory"), "{}", text(&out));
    // A budget whose bytes overflow 64 bits is a typed error, not a wrap-around.
    let out = fips(&[
        "compress",
        "--checkpoint",
        &model.to_string_lossy(),
        "--activations",
        &dir.0.join("missing-acts.safetensors").to_string_lossy(),
        "--calibration-memory",
        "18446744073709551615",
    ]);
    assert!(!out.status.success());
    let log = text(&out);
    assert!(
        log.contains("calibration-memory")
            && log.contains("does not fit")
            && !log.contains("panicked"),
        "{log}"
    );
}

/// End-to-end distillation follows the block-wise fits of `fips compress` (fips with `--images`):
/// the manifest and the report record it, the parameter count is unchanged, a kept work area
/// reuses it, `fips assemble` of a scattered run distils the same way to the same bytes, and a
/// run that cannot distil refuses the flags before any work.
#[test]
fn distillation_follows_the_fits_resumes_and_assembles_to_the_same_bytes() {
    let (dir, model, images) = tiny_vit_and_images("cli-distil");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let (model_s, images_s) = (s(&model), s(&images));
    let compress = |out: &str, extra: &[&str]| -> Output {
        let mut args = vec![
            "compress",
            "--checkpoint",
            &model_s,
            "--images",
            &images_s,
            "--heads",
            "1",
            "--steps",
            "10",
            "--no-eval",
            "--out-dir",
            out,
        ];
        if !extra.contains(&"--validation-fraction") {
            // Every image distilled on and nothing held out to check it: kept whatever the
            // tiny model does (the check is tested below and in `distill::tests`).
            args.extend_from_slice(&["--validation-fraction", "0"]);
        }
        args.extend_from_slice(&TWO_SMALL_GROUPS);
        args.extend_from_slice(extra);
        fips(&args)
    };
    let report = |out: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
    };
    let compressed = |out: &Path| std::fs::read(out.join("compressed.safetensors")).unwrap();
    let (a, b, c, d) = (
        dir.0.join("a"),
        dir.0.join("b"),
        dir.0.join("c"),
        dir.0.join("d"),
    );
    let (work1, work2) = (s(&dir.0.join("work1")), s(&dir.0.join("work2")));

    let out = compress(&s(&a), &["--distill-steps", "4", "--work-dir", &work1]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("distilling every group"),
        "{}",
        text(&out)
    );
    let distilled = report(&a);
    assert_eq!(distilled["distillation"]["steps"], 4);
    assert_eq!(distilled["distillation"]["images"], 6);
    assert!(distilled["distillation"]["last_loss"].as_f64().unwrap() >= 0.0);
    let file = fips::Checkpoint::open(a.join("compressed.safetensors")).unwrap();
    let manifest = fips::format::compact_file::read_manifest(&file).unwrap();
    assert_eq!(
        manifest.distillation.as_ref().unwrap()["learning_rate"],
        3e-5
    );
    assert!(dir.0.join("work1/distilled.json").is_file());
    let out = fips(&["inspect", &s(&a.join("compressed.safetensors"))]);
    assert!(
        text(&out).contains("distilled end to end after the block-wise fits: {"),
        "{}",
        text(&out)
    );

    // Without distillation: other values, the same parameter count, nothing recorded.
    let out = compress(&s(&b), &["--distill-steps", "0"]);
    assert!(out.status.success(), "{}", text(&out));
    let plain = report(&b);
    assert!(plain.get("distillation").is_none(), "{plain}");
    assert_eq!(
        plain["mlp_weights_compressed"],
        distilled["mlp_weights_compressed"]
    );
    assert!(
        compressed(&a) != compressed(&b),
        "distillation changed nothing"
    );

    // A rerun on the kept work area reuses the distilled model.
    let out = compress(&s(&c), &["--distill-steps", "4", "--work-dir", &work1]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is reused"), "{}", text(&out));
    assert!(compressed(&a) == compressed(&c), "the reused model differs");
    // A damaged distilled stage is never trusted: a record that does not parse, or a file that
    // differs from its record, is distilled again, to the same bytes.
    let work1_dir = dir.0.join("work1");
    for (name, damage) in [
        ("distilled.json", b"{ not json".as_slice()),
        ("distilled.safetensors", b"truncated".as_slice()),
    ] {
        let out = compress(&s(&c), &["--distill-steps", "4", "--work-dir", &work1]);
        assert!(out.status.success(), "{}", text(&out));
        std::fs::write(work1_dir.join(name), damage).unwrap();
        let out = compress(&s(&c), &["--distill-steps", "4", "--work-dir", &work1]);
        assert!(out.status.success(), "{name}: {}", text(&out));
        assert!(
            text(&out).contains("distilling every group"),
            "{name}: {}",
            text(&out)
        );
        assert!(
            compressed(&a) == compressed(&c),
            "{name}: the model differs"
        );
    }
    // Other distillation settings distil the same parts again (the parts are reused).
    let out = compress(&s(&c), &["--distill-steps", "5", "--work-dir", &work1]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("distilling every group") && text(&out).contains("resuming from"),
        "{}",
        text(&out)
    );
    assert_eq!(report(&c)["distillation"]["steps"], 5);

    // Scattered: the groups as separate jobs, then `fips assemble` distils from the recorded
    // calibration images to the same bytes.
    for k in ["0", "1"] {
        let out = compress(
            &s(&d),
            &[
                "--distill-steps",
                "4",
                "--work-dir",
                &work2,
                "--only-group",
                k,
            ],
        );
        assert!(out.status.success(), "{}", text(&out));
    }
    let out = fips(&["assemble", "--work-dir", &work2, "--out-dir", &s(&d)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("distilling every group"),
        "{}",
        text(&out)
    );
    assert!(
        compressed(&a) == compressed(&d),
        "the assembled model differs"
    );
    // Unreadable distillation settings in the work area are a typed error, nothing written.
    let settings_path = dir.0.join("work2/settings.json");
    let mut record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&settings_path).unwrap()).unwrap();
    record["context"]["distillation"] = serde_json::json!({"steps": "many"});
    std::fs::write(&settings_path, record.to_string()).unwrap();
    let refused = dir.0.join("refused");
    let out = fips(&["assemble", "--work-dir", &work2, "--out-dir", &s(&refused)]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("distillation settings are unreadable"),
        "{}",
        text(&out)
    );
    assert!(!refused.join("compressed.safetensors").exists());

    // With the default validation split, the held-out image checks the distillation.
    let checked = dir.0.join("checked");
    let out = compress(
        &s(&checked),
        &["--distill-steps", "4", "--validation-fraction", "0.05"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("held-out KL"), "{}", text(&out));
    let record = &report(&checked)["distillation"];
    assert_eq!(record["images"], 5);
    assert_eq!(record["held_out"]["images"], 1);
    let (before, after) = (
        record["held_out"]["kl_before"].as_f64().unwrap(),
        record["held_out"]["kl_after"].as_f64().unwrap(),
    );
    assert_eq!(record["kept"], after <= before);

    // Refused before any work where it cannot run, or with bad settings.
    for (extra, needle) in [
        (
            &["--method", "svd", "--distill-steps", "4"][..],
            "distillation",
        ),
        (&["--distill-lr", "0"][..], "learning_rate"),
        (
            &["--distill-steps", "0", "--distill-lr", "1e-4"][..],
            "distill-lr",
        ),
    ] {
        let e = dir.0.join("e");
        let out = compress(&s(&e), extra);
        assert!(!out.status.success(), "{extra:?}: {}", text(&out));
        assert!(text(&out).contains(needle), "{extra:?}: {}", text(&out));
        assert!(!e.exists(), "{extra:?} left {}", e.display());
    }
}

/// `fips` runs OpenBLAS's kernels for this processor even where the library does not know the
/// processor and would pick its generic (SSE3) ones: the last kernel set OpenBLAS reports loading
/// (`OPENBLAS_VERBOSE=2`) is never a generic one on a processor with AVX2 and FMA, and a set the
/// user chose with `OPENBLAS_CORETYPE` is kept. (Skipped where the backend is not OpenBLAS.)
#[test]
fn fips_runs_openblas_kernels_for_this_processor() {
    let run = |coretype: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fips"));
        cmd.arg("--version")
            .env("OPENBLAS_VERBOSE", "2")
            .env_remove("OPENBLAS_CORETYPE");
        if let Some(c) = coretype {
            cmd.env("OPENBLAS_CORETYPE", c);
        }
        let out = cmd.output().expect("the fips binary runs");
        assert!(out.status.success(), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let last = stderr
            .lines()
            .rev()
            .find_map(fips::foundation::blas::reported_kernels)
            .map(str::to_owned);
        (last, stderr)
    };
    let (Some(last), stderr) = run(None) else {
        eprintln!("SKIPPED: the BLAS backend reports no OpenBLAS kernel set");
        return;
    };
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        assert_eq!(
            fips::foundation::blas::native_kernels(&last, true, true),
            None,
            "fips ran OpenBLAS's generic '{last}' kernels:\n{stderr}"
        );
    }
    let (chosen, stderr) = run(Some("Haswell"));
    assert_eq!(chosen.as_deref(), Some("Haswell"), "{stderr}");
    assert!(!stderr.contains("note: OpenBLAS"), "{stderr}");
}
