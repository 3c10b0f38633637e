//! Classifies the ImageNet evaluation images with DeiT-tiny run straight from its self-contained
//! compressed file (format 3, no original checkpoint), and compares it with the densified
//! checkpoint and the dense model: top-1, top-5, agreement with the dense model, file size and
//! resident memory of each, each path in a fresh process (so that its peak resident memory,
//! `VmHWM` of `/proc/self/status`, is its own).
//!
//! ```sh
//! cargo run --release --features cli --bin fips -- compress \
//!     --checkpoint ../shared/data/deit-tiny/model.safetensors \
//!     --images ../shared/data/imagenet-sample --self-contained --out-dir out/deit-self
//! cargo run --release --features images --example classify_compressed -- \
//!     --compressed out/deit-self/compressed.safetensors \
//!     --dense ../shared/data/deit-tiny/model.safetensors
//! ```
//!
//! Options: `--densified FILE` (default: written from the compressed file alone into a temporary
//! directory, as `fips densify --compressed FILE --out …` does), `--images DIR` (default
//! `$FIPS_DATA_DIR/imagenet-sample` or `../shared/data/imagenet-sample`), `--split NAME` (default
//! `eval`), `--limit N` (first N images). One path alone: `--path dense|densified|compressed
//! --file FILE [--logits OUT]` prints its figures as one `RESULT {json}` line.
//!
//! Images are decoded and classified 25 at a time, so the resident memory is the model's plus
//! one batch's activations.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use fips::app::images::{LabeledImage, load_pixels, read_labels, split};
use fips::app::metrics::{Accuracy, agreement};
use fips::app::pipeline::{IMAGE_BATCH, Silent, classify};
use fips::app::vit::{BlockMlp, VisionTransformer};
use fips::format::checkpoint::Checkpoint;
use fips::format::compact_file::CompactModel;
use ndarray::{Array2, Axis, concatenate};

mod support;
use support::memory_kib;

type Res<T> = std::result::Result<T, Box<dyn Error>>;

const PATHS: [&str; 3] = ["dense", "densified", "compressed"];

struct Args {
    values: Vec<(String, String)>,
}

impl Args {
    fn parse() -> Res<Self> {
        let raw: Vec<String> = std::env::args().skip(1).collect();
        let mut values = Vec::new();
        let mut it = raw.into_iter();
        while let Some(flag) = it.next() {
            let key = flag
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {flag:?}"))?
                .to_string();
            let value = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            values.push((key, value));
        }
        Ok(Self { values })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn default_images() -> PathBuf {
    std::env::var_os("FIPS_DATA_DIR")
        .map_or_else(|| PathBuf::from("../shared/data"), PathBuf::from)
        .join("imagenet-sample")
}

fn images(args: &Args) -> Res<(PathBuf, Vec<LabeledImage>)> {
    let dir = args
        .get("images")
        .map_or_else(default_images, PathBuf::from);
    let mut items = split(&read_labels(&dir)?, args.get("split").unwrap_or("eval"));
    if let Some(limit) = args.get("limit") {
        items.truncate(limit.parse()?);
    }
    if items.is_empty() {
        return Err(format!("no images in {}", dir.display()).into());
    }
    Ok((dir, items))
}

/// One path in this process: load, classify batch by batch, report.
fn run_one(args: &Args, path: &str) -> Res<()> {
    let file = PathBuf::from(args.get("file").ok_or("--path needs --file FILE")?);
    let (_, items) = images(args)?;
    let (rss_start, _) = memory_kib();
    let start = Instant::now();
    let ck = Checkpoint::open(&file)?;
    let vit = match path {
        "dense" | "densified" => VisionTransformer::from_checkpoint(&ck, None)?,
        "compressed" => VisionTransformer::from_compact(&ck, None, None)?,
        other => return Err(format!("unknown --path {other:?}").into()),
    };
    let load_s = start.elapsed().as_secs_f64();
    let (rss_loaded, hwm_loaded) = memory_kib();
    let compact_blocks = (0..vit.config().depth)
        .filter(|&b| matches!(vit.block_mlp(b), Ok(BlockMlp::Compact { .. })))
        .count();
    // Factors of the groups (each counted at its first block) held in the tiled layout.
    let (mut tiled, mut factors) = (0, 0);
    for b in 0..vit.config().depth {
        if let Ok(BlockMlp::Compact { group, position: 0 }) = vit.block_mlp(b) {
            tiled += group.tiled_factor_count();
            factors += group.factor_count();
        }
    }
    let start = Instant::now();
    let mut parts = Vec::new();
    for chunk in items.chunks(IMAGE_BATCH) {
        let pixels = load_pixels(chunk)?;
        parts.push(classify(&vit, pixels.view(), &mut Silent)?);
    }
    let classify_s = start.elapsed().as_secs_f64();
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    let logits = concatenate(Axis(0), &views)?;
    let labels: Vec<usize> = items.iter().map(|i| i.label).collect();
    let acc = Accuracy::new(logits.view(), &labels)?;
    let (_, hwm_end) = memory_kib();
    if let Some(out) = args.get("logits") {
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(out, bytes)?;
    }
    let result = serde_json::json!({
        "path": path,
        "file": file.display().to_string(),
        "file_bytes": std::fs::metadata(&file)?.len(),
        "parameters": vit.parameter_count(),
        "compact_blocks": compact_blocks,
        "tiled_factors": format!("{tiled}/{factors}"),
        "depth": vit.config().depth,
        "images": labels.len(),
        "top1": acc.top1,
        "top5": acc.top5,
        "load_s": load_s,
        "classify_s": classify_s,
        "rss_start_kib": rss_start,
        "rss_loaded_kib": rss_loaded,
        "hwm_loaded_kib": hwm_loaded,
        "hwm_end_kib": hwm_end,
    });
    println!("RESULT {result}");
    Ok(())
}

fn read_logits(path: &Path, rows: usize) -> Res<Array2<f32>> {
    let bytes = std::fs::read(path)?;
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let cols = values.len() / rows.max(1);
    Ok(Array2::from_shape_vec((rows, cols), values)?)
}

fn main() -> Res<()> {
    // OpenBLAS's kernels for this processor (it may not know it: `fips::foundation::blas`).
    fips::foundation::blas::use_native_kernels();
    let args = Args::parse()?;
    if let Some(path) = args.get("path") {
        return run_one(&args, path);
    }
    let compressed = PathBuf::from(
        args.get("compressed")
            .ok_or("give --compressed FILE (a self-contained compact file)")?,
    );
    let dense = PathBuf::from(
        args.get("dense")
            .ok_or("give --dense FILE (the original checkpoint)")?,
    );
    let (image_dir, items) = images(&args)?;
    let work = std::env::temp_dir().join(format!("fips-classify-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let densified = match args.get("densified") {
        Some(p) => PathBuf::from(p),
        None => {
            // From the compressed file alone, as `fips densify --compressed FILE --out …`.
            let file = Checkpoint::open(&compressed)?;
            let model = CompactModel::read_from(&file, None)?;
            let out = work.join("densified.safetensors");
            model.densify(&file, &out)?;
            out
        }
    };
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    for (path, file) in PATHS.iter().zip([&dense, &densified, &compressed]) {
        let logits = work.join(format!("{path}.logits"));
        let mut cmd = Command::new(&exe);
        cmd.args(["--path", path, "--file"])
            .arg(file)
            .arg("--images")
            .arg(&image_dir)
            .args(["--split", args.get("split").unwrap_or("eval")])
            .arg("--logits")
            .arg(&logits);
        if let Some(limit) = args.get("limit") {
            cmd.args(["--limit", limit]);
        }
        let out = cmd.output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(
                format!("{path}: {}{}", stdout, String::from_utf8_lossy(&out.stderr)).into(),
            );
        }
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .ok_or_else(|| format!("{path}: no result in {stdout:?}"))?;
        let json: serde_json::Value = serde_json::from_str(line)?;
        results.push((json, read_logits(&logits, items.len())?));
    }
    let dense_logits = results[0].1.clone();
    println!(
        "DeiT-tiny on {} images of {}; each path in its own process ({} threads available)",
        items.len(),
        image_dir.display(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "| path | file | file bytes | top-1 | top-5 | agreement with dense | load s | classify s | RSS at start MiB | peak RSS after load MiB | peak RSS MiB | peak − start MiB |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mib = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / 1024.0;
    for (json, logits) in &results {
        println!(
            "| {} | {} | {} | {:.2} % | {:.2} % | {:.2} % | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} |",
            json["path"].as_str().unwrap_or("?"),
            json["file"].as_str().unwrap_or("?"),
            json["file_bytes"],
            100.0 * json["top1"].as_f64().unwrap_or(f64::NAN),
            100.0 * json["top5"].as_f64().unwrap_or(f64::NAN),
            100.0 * agreement(dense_logits.view(), logits.view())?,
            json["load_s"].as_f64().unwrap_or(f64::NAN),
            json["classify_s"].as_f64().unwrap_or(f64::NAN),
            mib(&json["rss_start_kib"]),
            mib(&json["hwm_loaded_kib"]),
            mib(&json["hwm_end_kib"]),
            mib(&json["hwm_end_kib"]) - mib(&json["rss_start_kib"]),
        );
    }
    let (densified_logits, compressed_logits) = (&results[1].1, &results[2].1);
    let max_diff = densified_logits
        .iter()
        .zip(compressed_logits.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = densified_logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    println!(
        "compressed vs densified: predictions agree on {:.2} % of the images, largest logit difference {max_diff:.3e} (largest |logit| {scale:.2}); {} of {} blocks ran from the compressed form",
        100.0 * agreement(densified_logits.view(), compressed_logits.view())?,
        results[2].0["compact_blocks"],
        results[2].0["depth"]
    );
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}
