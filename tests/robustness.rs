//! Mutation tests of every reader on real files: a typed error or a correct result, never a panic,
//! an abort, or memory beyond a bound.
//!
//! The base files are real: a one-block ViT cut from the DeiT-tiny checkpoint (its first block,
//! embeddings and the first 10 rows of its head, some tensors stored as F16/BF16), MLP inputs the
//! crate captures from DeiT-tiny on two of the parity images, compressed checkpoints the crate
//! writes from them (FiPS shared basis, SVD low rank, LayerCollapse) in both formats (version 2,
//! and compact version 3: MLP-only, plus a self-contained one of the one-block ViT), and JPEGs of the ImageNet
//! sample. Each is mutated with a seeded RNG: truncated at random points, bytes flipped (mostly in
//! the header), header numbers rewritten (shapes, offsets, the length prefix) to 0, 1, ±1, 2^31,
//! 2^40, 2^63, u64::MAX or larger, tensors renamed (other blocks, huge or non-canonical indices),
//! manifest fields rewritten (sizes to huge, negative or fractional numbers, names to other
//! blocks' tensors, representations swapped), JPEG frame sizes rewritten, `labels.tsv` garbled.
//!
//! **How "never abort, bounded memory" is checked.** The readers run in a child process (this test
//! binary again, entry [`child_process_entry`]) under `ulimit -v` of [`MEMORY_LIMIT_MB`] MiB of
//! virtual memory, one child per batch: an allocation beyond the limit fails, and Rust aborts on
//! a failed allocation, so any unbounded allocation shows up as a crash of the child on the case
//! it was running; panics are caught in the child per case (`catch_unwind`) and reported. The
//! crate forbids `unsafe` code, so a counting global allocator (which needs `unsafe impl
//! GlobalAlloc`) is not used; the address-space limit bounds every allocation, including those of
//! dependencies, without it. On platforms whose shell cannot set the limit (macOS ignores it) the
//! cases still run, without the memory bound. Besides "no panic, no abort", truncated files must
//! be errors (a truncated file is never accepted), and unmutated files must read.
//!
//! The same reader functions are the `cargo fuzz` targets (`fuzz/targets.rs`).
//! `FIPS_ROBUSTNESS_CASES=n` sets the mutations per base file (default 150); setting
//! `FIPS_ROBUSTNESS_CORPUS=dir` also writes the base files there as a seed corpus for `cargo fuzz`.
#![cfg(feature = "app")]

mod common;
#[path = "../fuzz/targets.rs"]
mod targets;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use fips::app::pipeline::{CalibrationSource, Silent, compress_checkpoint};
use fips::app::vit::{VisionTransformer, preprocess};
use fips::format::block_groups::BlockGroups;
use fips::format::checkpoint::{Checkpoint, TensorData, write_safetensors};
use fips::format::compact_file::CompactModel;
use fips::format::layout::MlpLayout;
use fips::format::mlp_inputs::write_mlp_inputs;
use fips::methods::Compressor;
use fips::methods::params::LayerCollapseParams;
use fips::methods::params::SvdParams;
use fips::{Budget, FipsParams, ParamGuard};
use ndarray::{Array4, Ix4, s};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;

/// Virtual-memory limit of the child that runs the readers (MiB). The largest legitimate use is
/// reading the 22 MB DeiT-tiny checkpoint's MLPs and rebuilding two dense blocks.
const MEMORY_LIMIT_MB: u64 = 1536;
const CHILD_ENV: &str = "FIPS_ROBUSTNESS_CHILD";
const ORIGINAL_ENV: &str = "FIPS_ROBUSTNESS_ORIGINAL";
const DEIT_BLOCKS: usize = 12;
const DEIT_SHAPE: (usize, usize) = (192, 768);
/// The blocks captured and compressed.
const GROUP: [usize; 2] = [0, 1];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    Checkpoint,
    MlpInputs,
    Compressed,
    CompressedManifest,
    /// A compact (format 3) file, MLP-only (original beside it) or self-contained.
    Compact,
    Image,
    ImageSet,
    /// Not a reader: allocates 3 GiB, to prove the memory limit turns that into a crash.
    AllocationProbe,
}

impl Reader {
    fn name(self) -> &'static str {
        match self {
            Self::Checkpoint => "checkpoint",
            Self::MlpInputs => "mlp-inputs",
            Self::Compressed => "compressed",
            Self::CompressedManifest => "compressed-manifest",
            Self::Compact => "compact",
            Self::Image => "image",
            Self::ImageSet => "image-set",
            Self::AllocationProbe => "allocation-probe",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Self::Checkpoint,
            Self::MlpInputs,
            Self::Compressed,
            Self::CompressedManifest,
            Self::Compact,
            Self::Image,
            Self::ImageSet,
            Self::AllocationProbe,
        ]
        .into_iter()
        .find(|r| r.name() == s)
    }
}

/// What a case must give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// An error or a value, but no panic and no abort.
    Anything,
    /// An error (a truncated file).
    Error,
    /// A value (an unmutated file).
    Value,
    /// A crash of the child (the allocation probe, where the limit is enforced).
    Crash,
}

#[derive(Debug, Clone)]
struct Case {
    reader: Reader,
    path: PathBuf,
    expect: Expect,
    what: String,
    /// Text the error must contain (the reason it must fail for).
    mention: Option<&'static str>,
}

// ---------------------------------------------------------------------------------------------
// The child: runs the readers, reports per case on stdout.

fn run_reader(reader: Reader, path: &Path, original: Option<&Checkpoint>) -> Result<(), String> {
    let deit_shapes = vec![DEIT_SHAPE; DEIT_BLOCKS];
    let result = match reader {
        Reader::Checkpoint => targets::checkpoint(path),
        Reader::MlpInputs => targets::mlp_inputs(path, &deit_shapes, &[GROUP.to_vec()]),
        Reader::Compressed => match original {
            Some(o) => targets::compressed(path, o),
            None => return Err("no original".into()),
        },
        Reader::CompressedManifest => targets::compressed_manifest(path),
        Reader::Compact => targets::compact(path, original),
        #[cfg(feature = "images")]
        Reader::Image => targets::image(path),
        #[cfg(feature = "images")]
        Reader::ImageSet => targets::image_set(path),
        #[cfg(not(feature = "images"))]
        Reader::Image | Reader::ImageSet => Ok(()),
        Reader::AllocationProbe => {
            let v = std::hint::black_box(vec![1u8; 3 << 30]);
            let touched: usize = v.iter().step_by(4096).map(|&b| usize::from(b)).sum();
            return Err(format!(
                "allocated and touched {} pages",
                std::hint::black_box(touched)
            ));
        }
    };
    result.map_err(|e| format!("{e:?}").chars().take(200).collect())
}

/// Entry point of the child process (does nothing in a normal test run): runs the cases listed in
/// the file named by `FIPS_ROBUSTNESS_CHILD`, from the index in `FIPS_ROBUSTNESS_START`.
#[test]
fn child_process_entry() {
    let Some(list) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let start: usize = std::env::var("FIPS_ROBUSTNESS_START")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let original = std::env::var_os(ORIGINAL_ENV).map(|p| Checkpoint::open(p).expect("original"));
    std::panic::set_hook(Box::new(|_| {}));
    let text = std::fs::read_to_string(list).expect("case list");
    let mut out = std::io::stdout().lock();
    for (i, line) in text.lines().enumerate().skip(start) {
        let mut parts = line.splitn(2, '\t');
        let reader = parts.next().and_then(Reader::parse).expect("reader");
        let path = PathBuf::from(parts.next().expect("path"));
        writeln!(out, "BEGIN {i}").unwrap();
        out.flush().unwrap();
        let outcome = std::panic::catch_unwind(|| run_reader(reader, &path, original.as_ref()));
        match outcome {
            Ok(Ok(())) => writeln!(out, "OK {i}").unwrap(),
            Ok(Err(e)) => writeln!(out, "ERR {i} {}", e.replace('\n', " ")).unwrap(),
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                writeln!(out, "PANIC {i} {}", msg.replace('\n', " ")).unwrap();
            }
        }
        out.flush().unwrap();
    }
}

/// Outcome of one case in the child.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Ok,
    Err(String),
    Panic(String),
    Crash(String),
}

/// Runs `cases` in child processes under the memory limit; restarts after a crash.
fn run_children(cases: &[Case], dir: &Path, original: &Path) -> Vec<Outcome> {
    let list = dir.join("cases.tsv");
    let text: String = cases
        .iter()
        .map(|c| format!("{}\t{}\n", c.reader.name(), c.path.display()))
        .collect();
    std::fs::write(&list, text).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; cases.len()];
    let mut start = 0;
    while start < cases.len() {
        let limit = if cfg!(target_os = "linux") {
            format!("ulimit -v {} 2>/dev/null; ", MEMORY_LIMIT_MB * 1024)
        } else {
            String::new()
        };
        let output = Command::new("sh")
            .arg("-c")
            .arg(format!("{limit}exec \"$0\" \"$@\""))
            .arg(&exe)
            .args([
                "--exact",
                "child_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &list)
            .env(ORIGINAL_ENV, original)
            .env("FIPS_ROBUSTNESS_START", start.to_string())
            .env("OPENBLAS_NUM_THREADS", "1")
            .env("MALLOC_ARENA_MAX", "2")
            .output()
            .expect("spawn the child");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let mut last_begin = None;
        for line in stdout.lines() {
            let mut parts = line.splitn(3, ' ');
            let (Some(tag), Some(i)) = (
                parts.next(),
                parts.next().and_then(|i| i.parse::<usize>().ok()),
            ) else {
                continue;
            };
            let rest = parts.next().unwrap_or("").to_string();
            match tag {
                "BEGIN" => last_begin = Some(i),
                "OK" => outcomes[i] = Some(Outcome::Ok),
                "ERR" => outcomes[i] = Some(Outcome::Err(rest)),
                "PANIC" => outcomes[i] = Some(Outcome::Panic(rest)),
                _ => {}
            }
        }
        match last_begin {
            Some(i) if outcomes[i].is_none() => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let cause = stderr
                    .lines()
                    .find(|l| {
                        l.contains("memory allocation")
                            || l.contains("panicked")
                            || l.contains("fatal")
                    })
                    .map_or_else(
                        || stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | "),
                        str::to_string,
                    );
                outcomes[i] = Some(Outcome::Crash(format!("{:?}: {cause}", output.status)));
                start = i + 1;
            }
            Some(_) => break,
            None => panic!(
                "the child ran nothing: {:?} {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Outcome::Crash("never ran".into())))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Base files.

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A one-block ViT cut from DeiT-tiny: embeddings, block 0, final norm, 10 head rows; the MLP
/// weights of block 0 stored as F16 and its norms as BF16 (the readers convert every float dtype).
fn write_vit_slice(deit: &Checkpoint, path: &Path) {
    let mut t = BTreeMap::new();
    for name in deit.names() {
        let keep = !name.starts_with("blocks.") || name.starts_with("blocks.0.");
        if !keep {
            continue;
        }
        let info = deit.info(name).unwrap();
        let values = deit.read::<f32>(name).unwrap();
        let (shape, values): (Vec<usize>, Vec<f32>) = if name.starts_with("head.") {
            let rows = 10;
            let shape = [vec![rows], info.shape[1..].to_vec()].concat();
            let n: usize = shape.iter().product();
            (shape, values.iter().copied().take(n).collect())
        } else {
            (info.shape.clone(), values.iter().copied().collect())
        };
        let dtype = if name.starts_with("blocks.0.mlp.") {
            Dtype::F16
        } else if name.starts_with("blocks.0.norm") {
            Dtype::BF16
        } else {
            Dtype::F32
        };
        t.insert(
            name.to_string(),
            TensorData::from_floats(values, shape, dtype).unwrap(),
        );
    }
    let meta =
        std::collections::HashMap::from([("source".to_string(), "deit-tiny slice".to_string())]);
    write_safetensors(path, &t, meta).unwrap();
}

fn parity_pixels(data: &Path, images: usize) -> Array4<u8> {
    let parity = Checkpoint::open(data.join("deit-tiny/parity.safetensors")).unwrap();
    parity
        .read_integers("pixels_u8_nhwc")
        .unwrap()
        .mapv(|p| p as u8)
        .into_dimensionality::<Ix4>()
        .unwrap()
        .slice(s![..images, .., .., ..])
        .to_owned()
}

struct Bases {
    vit: PathBuf,
    mlp_inputs: PathBuf,
    compressed: Vec<PathBuf>,
    /// Compact (format 3) files: MLP-only of each representation, and a self-contained one of the
    /// one-block ViT (its F16 MLP stored as F16).
    compact: Vec<PathBuf>,
    jpegs: Vec<PathBuf>,
    image_set: Option<PathBuf>,
}

fn make_bases(data: &Path, dir: &Path) -> Bases {
    let model = data.join("deit-tiny/model.safetensors");
    let deit = Checkpoint::open(&model).unwrap();
    let vit_path = dir.join("vit-slice.safetensors");
    write_vit_slice(&deit, &vit_path);

    // MLP inputs of blocks 0-1, captured from DeiT-tiny on two real images.
    let vit = VisionTransformer::from_checkpoint(&deit, None).unwrap();
    let pixels = parity_pixels(data, 2);
    let captured = vit
        .forward_capture(preprocess(pixels.view()).view(), 0..GROUP.len())
        .unwrap();
    let mlp_path = dir.join("mlp-inputs.safetensors");
    let views: Vec<_> = GROUP
        .iter()
        .copied()
        .zip(captured.iter().map(|z| z.view()))
        .collect();
    write_mlp_inputs(&mlp_path, &views, Dtype::F32, Default::default()).unwrap();

    // Compressed checkpoints of blocks 0-1 from those inputs, one per representation.
    let inputs = fips::format::mlp_inputs::MlpInputs::open(&mlp_path).unwrap();
    let layout = MlpLayout::detect(&deit).unwrap();
    let groups = BlockGroups::parse("0-1", &[DEIT_SHAPE; DEIT_BLOCKS]).unwrap();
    let compressors: Vec<(&str, Box<dyn Compressor<f32>>)> = vec![
        (
            "fips",
            Box::new(
                FipsParams::new()
                    .budget(Budget::Fraction(0.5))
                    .steps(4)
                    .batch_tokens(128)
                    .check()
                    .unwrap(),
            ),
        ),
        (
            "svd",
            Box::new(
                SvdParams::new()
                    .budget(Budget::Fraction(0.5))
                    .check()
                    .unwrap(),
            ),
        ),
        (
            "collapse",
            Box::new(
                LayerCollapseParams::new()
                    .max_steps(4)
                    .batch_tokens(128)
                    .check()
                    .unwrap(),
            ),
        ),
    ];
    let mut compressed = Vec::new();
    let mut compact = Vec::new();
    for (name, c) in &compressors {
        let result = compress_checkpoint(
            &deit,
            &layout,
            &groups,
            c.as_ref(),
            layout.default_activation(),
            &CalibrationSource::File(&inputs),
            &mut Silent,
        )
        .unwrap();
        let path = dir.join(format!("compressed-{name}.safetensors"));
        result.model.write(&path).unwrap();
        compressed.push(path);
        let path = dir.join(format!("compact-{name}.safetensors"));
        CompactModel::from_model(&result.model, Some(&deit))
            .unwrap()
            .write(&path)
            .unwrap();
        compact.push(path);
    }
    let slice = Checkpoint::open(&vit_path).unwrap();
    let slice_layout = MlpLayout::detect(&slice).unwrap();
    let result = compress_checkpoint(
        &slice,
        &slice_layout,
        &BlockGroups::parse("0", &[DEIT_SHAPE]).unwrap(),
        compressors[0].1.as_ref(),
        slice_layout.default_activation(),
        &CalibrationSource::File(&inputs),
        &mut Silent,
    )
    .unwrap();
    let path = dir.join("compact-self-contained.safetensors");
    CompactModel::from_model(&result.model, Some(&slice))
        .unwrap()
        .write_self_contained(&path, &slice)
        .unwrap();
    compact.push(path);

    let labels = std::fs::read_to_string(data.join("imagenet-sample/labels.tsv")).unwrap();
    let jpegs: Vec<PathBuf> = labels
        .lines()
        .skip(1)
        .take(3)
        .map(|l| {
            data.join("imagenet-sample")
                .join(l.split('\t').next().unwrap())
        })
        .collect();
    let image_set = cfg!(feature = "images").then(|| {
        let set = dir.join("image-set");
        std::fs::create_dir_all(set.join("calib")).unwrap();
        let mut tsv = String::from("file\tlabel\tsynset\tsplit\n");
        for (k, j) in jpegs.iter().enumerate() {
            std::fs::copy(j, set.join(format!("calib/{k}.jpg"))).unwrap();
            tsv.push_str(&format!("calib/{k}.jpg\t{k}\tn0\tcalib\n"));
        }
        std::fs::write(set.join("labels.tsv"), tsv).unwrap();
        set
    });
    Bases {
        vit: vit_path,
        mlp_inputs: mlp_path,
        compressed,
        compact,
        jpegs,
        image_set,
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/// Numbers that break sizes and offsets.
const HOSTILE_NUMBERS: &[&str] = &[
    "0",
    "1",
    "2",
    "7",
    "255",
    "65535",
    "2147483648",
    "4294967297",
    "1099511627776",
    "9223372036854775808",
    "18446744073709551615",
    "99999999999999999999999",
    "-1",
    "-9223372036854775808",
    "0.5",
    "1e300",
];

fn hostile_number(rng: &mut ChaCha8Rng, n: Option<u64>) -> String {
    match (rng.random_range(0..4), n) {
        (0, Some(n)) => n.saturating_add(1).to_string(),
        (1, Some(n)) => n.saturating_sub(1).to_string(),
        (2, Some(n)) => n.saturating_mul(2).to_string(),
        _ => HOSTILE_NUMBERS[rng.random_range(0..HOSTILE_NUMBERS.len())].to_string(),
    }
}

/// `(header JSON, data)` of a safetensors file.
fn split_st(bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (bytes[8..8 + n].to_vec(), bytes[8 + n..].to_vec())
}

fn join_st(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

fn truncate(rng: &mut ChaCha8Rng, bytes: &[u8]) -> Vec<u8> {
    // Half the cuts inside the first 4 KB (length prefix and header), half anywhere.
    let end = if rng.random_bool(0.5) {
        bytes.len().min(4096)
    } else {
        bytes.len()
    };
    bytes[..rng.random_range(0..end)].to_vec()
}

fn flip(rng: &mut ChaCha8Rng, bytes: &[u8], hot: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for _ in 0..rng.random_range(1..=8) {
        let limit = if rng.random_bool(0.7) {
            hot.min(out.len())
        } else {
            out.len()
        };
        let i = rng.random_range(0..limit.max(1));
        if let Some(b) = out.get_mut(i) {
            *b ^= 1 << rng.random_range(0..8);
        }
    }
    out
}

/// Rewrites one run of digits of the header (a shape, an offset, a digit of a name, a number in
/// the manifest) to a hostile number.
fn rewrite_header_number(rng: &mut ChaCha8Rng, bytes: &[u8]) -> Vec<u8> {
    let (header, data) = split_st(bytes);
    let runs: Vec<(usize, usize)> = {
        let mut v = Vec::new();
        let mut i = 0;
        while i < header.len() {
            if header[i].is_ascii_digit() {
                let j = i + header[i..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                v.push((i, j));
                i = j;
            } else {
                i += 1;
            }
        }
        v
    };
    if runs.is_empty() {
        return bytes.to_vec();
    }
    let (a, b) = runs[rng.random_range(0..runs.len())];
    let old = std::str::from_utf8(&header[a..b])
        .unwrap()
        .parse::<u64>()
        .ok();
    let new = hostile_number(rng, old);
    let header = [&header[..a], new.as_bytes(), &header[b..]].concat();
    join_st(&header, &data)
}

fn rewrite_length_prefix(rng: &mut ChaCha8Rng, bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let new = match rng.random_range(0..5) {
        0 => n + 1,
        1 => n.saturating_sub(1),
        2 => bytes.len() as u64,
        3 => u64::MAX - rng.random_range(0..16),
        _ => rng.random::<u64>() >> rng.random_range(0..64),
    };
    out[..8].copy_from_slice(&new.to_le_bytes());
    out
}

/// Renames one tensor of the header.
fn rename_tensor(rng: &mut ChaCha8Rng, bytes: &[u8], names: &[&str]) -> Vec<u8> {
    let (header, data) = split_st(bytes);
    let mut json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).unwrap();
    let keys: Vec<String> = json
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let old = &keys[rng.random_range(0..keys.len())];
    let new = names[rng.random_range(0..names.len())].to_string();
    let value = json.remove(old).unwrap();
    json.insert(new, value);
    join_st(&serde_json::to_vec(&json).unwrap(), &data)
}

/// Rewrites one leaf of the compressed file's manifest (numbers to hostile numbers, strings to
/// other blocks' names or other representations).
fn rewrite_manifest(rng: &mut ChaCha8Rng, bytes: &[u8]) -> Vec<u8> {
    let (header, data) = split_st(bytes);
    let mut json: serde_json::Value = serde_json::from_slice(&header).unwrap();
    let text = json["__metadata__"]["fips.manifest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut leaves = Vec::new();
    fn collect(v: &serde_json::Value, path: String, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    collect(x, format!("{path}/{k}"), out);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    collect(x, format!("{path}/{i}"), out);
                }
            }
            _ => out.push(path),
        }
    }
    collect(&manifest, String::new(), &mut leaves);
    let leaf = &leaves[rng.random_range(0..leaves.len())];
    let slot = manifest.pointer_mut(leaf).unwrap();
    let strings = [
        "blocks.5.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
        "blocks.11.mlp.fc2.bias",
        "shared-basis",
        "low-rank",
        "collapsed",
        "gated",
        "standard",
        "",
        "relu",
        "bitmask",
        "row-gaps",
        "full",
        "stored",
        "original",
        "none",
        "F16",
        "BF16",
    ];
    *slot = match slot {
        serde_json::Value::String(_) if rng.random_bool(0.8) => {
            serde_json::Value::String(strings[rng.random_range(0..strings.len())].into())
        }
        serde_json::Value::Number(n) => {
            let new = hostile_number(rng, n.as_u64());
            serde_json::from_str(&new).unwrap_or(serde_json::Value::Null)
        }
        _ => serde_json::from_str(&hostile_number(rng, None)).unwrap_or(serde_json::Value::Null),
    };
    json["__metadata__"]["fips.manifest"] = serde_json::Value::String(manifest.to_string());
    join_st(&serde_json::to_vec(&json).unwrap(), &data)
}

/// Rewrites the frame size of a JPEG (the first SOFn segment).
fn rewrite_jpeg_size(rng: &mut ChaCha8Rng, bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let sizes: [(u16, u16); 8] = [
        (1, 30000),
        (30000, 1),
        (65535, 65535),
        (0, 224),
        (224, 0),
        (16384, 16384),
        (8000, 8000),
        (1, 1),
    ];
    if let Some(i) = (0..out.len().saturating_sub(9))
        .find(|&i| out[i] == 0xFF && matches!(out[i + 1], 0xC0..=0xC2))
    {
        let (w, h) = if rng.random_bool(0.7) {
            sizes[rng.random_range(0..sizes.len())]
        } else {
            (rng.random(), rng.random())
        };
        out[i + 5..i + 7].copy_from_slice(&h.to_be_bytes());
        out[i + 7..i + 9].copy_from_slice(&w.to_be_bytes());
    }
    out
}

/// Every mutated case of one base file.
fn mutate(
    rng: &mut ChaCha8Rng,
    reader: Reader,
    base: &Path,
    dir: &Path,
    count: usize,
    cases: &mut Vec<Case>,
) {
    let bytes = std::fs::read(base).unwrap();
    let stem = base.file_stem().unwrap().to_string_lossy().to_string();
    let safetensors = reader != Reader::Image;
    let header_end = if safetensors {
        8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
    } else {
        bytes.len().min(1024)
    };
    cases.push(Case {
        reader,
        path: base.to_path_buf(),
        expect: Expect::Value,
        what: "unmutated".into(),
        mention: None,
    });
    let block_names = [
        "blocks.5.mlp_input",
        "blocks.01.mlp_input",
        "blocks.99999999999999999999.mlp_input",
        "blocks.18446744073709551615.mlp_input",
        "blocks.-1.mlp_input",
        "blocks.1.mlp_input",
        "weight",
    ];
    for k in 0..count {
        let choice = rng.random_range(0..6);
        let (mutated, expect, what) = match (choice, reader) {
            (0, _) => (truncate(rng, &bytes), Expect::Error, "truncated"),
            (1, _) => (
                flip(rng, &bytes, header_end),
                Expect::Anything,
                "bytes flipped",
            ),
            (2, Reader::Image) => (
                rewrite_jpeg_size(rng, &bytes),
                Expect::Anything,
                "frame size rewritten",
            ),
            (2, _) | (5, Reader::Checkpoint) => (
                rewrite_header_number(rng, &bytes),
                Expect::Anything,
                "header number rewritten",
            ),
            (3, Reader::Image) => (
                {
                    let mut t = truncate(rng, &bytes);
                    t.extend_from_slice(&[0xFF, 0xD9]);
                    t
                },
                Expect::Anything,
                "cut, end marker appended",
            ),
            (3, _) => (
                rewrite_length_prefix(rng, &bytes),
                Expect::Anything,
                "length prefix rewritten",
            ),
            (4, Reader::MlpInputs) => (
                rename_tensor(rng, &bytes, &block_names),
                Expect::Anything,
                "tensor renamed",
            ),
            (4 | 5, Reader::Compressed | Reader::CompressedManifest | Reader::Compact) => (
                rewrite_manifest(rng, &bytes),
                Expect::Anything,
                "manifest field rewritten",
            ),
            (_, Reader::Image) => (
                flip(rng, &bytes, bytes.len()),
                Expect::Anything,
                "bytes flipped",
            ),
            _ => (
                rewrite_header_number(rng, &bytes),
                Expect::Anything,
                "header number rewritten",
            ),
        };
        let expect = if expect == Expect::Error && mutated.len() == bytes.len() {
            Expect::Anything
        } else {
            expect
        };
        let path = dir.join(format!("{stem}-{}-{k}", reader.name()));
        std::fs::write(&path, &mutated).unwrap();
        cases.push(Case {
            reader,
            path,
            expect,
            what: what.into(),
            mention: None,
        });
    }
}

/// Hand-written hostile cases: a header of more than `MAX_TENSORS` empty tensors, and garbled
/// `labels.tsv` files.
fn special_cases(bases: &Bases, dir: &Path, cases: &mut Vec<Case>) {
    let n = fips::math::limits::MAX_TENSORS + 1;
    let mut header = String::from("{");
    for i in 0..n {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"t{i}\":{{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}"
        ));
    }
    header.push('}');
    let path = dir.join("many-empty-tensors.safetensors");
    std::fs::write(&path, join_st(header.as_bytes(), &[])).unwrap();
    cases.push(Case {
        reader: Reader::Checkpoint,
        path,
        expect: Expect::Error,
        what: format!("{n} empty tensors"),
        mention: Some("MAX_TENSORS"),
    });
    if let Some(set) = &bases.image_set {
        let original = std::fs::read_to_string(set.join("labels.tsv")).unwrap();
        let variants = [
            original.replace("\t0\t", "\t99999999999999999999999\t"),
            original.replace("\tcalib\n", "\n"),
            original.replace("calib/1.jpg", "calib/missing.jpg"),
            original.replace("calib/1.jpg", "calib"),
            original.replace("calib/1.jpg", "labels.tsv"),
            original.replace("file\tlabel", "file label"),
            String::new(),
            "\u{0}\u{0}\u{0}".into(),
        ];
        for (k, v) in variants.iter().enumerate() {
            let sub = dir.join(format!("set-{k}"));
            std::fs::create_dir_all(sub.join("calib")).unwrap();
            for entry in std::fs::read_dir(set.join("calib")).unwrap() {
                let e = entry.unwrap();
                std::fs::copy(e.path(), sub.join("calib").join(e.file_name())).unwrap();
            }
            std::fs::write(sub.join("labels.tsv"), v).unwrap();
            cases.push(Case {
                reader: Reader::ImageSet,
                path: sub,
                expect: if k == 0 {
                    Expect::Anything
                } else {
                    Expect::Error
                },
                what: format!("labels.tsv variant {k}"),
                mention: None,
            });
        }
    }
}

#[test]
fn every_reader_survives_mutated_real_files() {
    let Some(data) = common::data_dir("every_reader_survives_mutated_real_files") else {
        return;
    };
    let count: usize = std::env::var("FIPS_ROBUSTNESS_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let root = std::env::temp_dir().join(format!("fips-robustness-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let _guard = TempDir(root.clone());
    let started = std::time::Instant::now();
    let bases = make_bases(&data, &root);
    if let Some(corpus) = std::env::var_os("FIPS_ROBUSTNESS_CORPUS") {
        let corpus = PathBuf::from(corpus);
        let copy = |target: &str, files: &[&PathBuf]| {
            let d = corpus.join(target);
            std::fs::create_dir_all(&d).unwrap();
            for f in files {
                std::fs::copy(f, d.join(f.file_name().unwrap())).unwrap();
            }
        };
        copy("checkpoint", &[&bases.vit]);
        copy("mlp_inputs", &[&bases.mlp_inputs]);
        copy("compressed", &bases.compressed.iter().collect::<Vec<_>>());
        copy("compact", &bases.compact.iter().collect::<Vec<_>>());
        copy("image", &bases.jpegs.iter().collect::<Vec<_>>());
    }
    let mutated = root.join("mutated");
    std::fs::create_dir_all(&mutated).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0x13);
    let mut cases = Vec::new();
    mutate(
        &mut rng,
        Reader::Checkpoint,
        &bases.vit,
        &mutated,
        count,
        &mut cases,
    );
    mutate(
        &mut rng,
        Reader::MlpInputs,
        &bases.mlp_inputs,
        &mutated,
        count,
        &mut cases,
    );
    for c in &bases.compressed {
        mutate(&mut rng, Reader::Compressed, c, &mutated, count, &mut cases);
        mutate(
            &mut rng,
            Reader::CompressedManifest,
            c,
            &mutated,
            count / 4,
            &mut cases,
        );
    }
    for c in &bases.compact {
        mutate(
            &mut rng,
            Reader::Compact,
            c,
            &mutated,
            count / 2,
            &mut cases,
        );
    }
    if cfg!(feature = "images") {
        for j in &bases.jpegs {
            mutate(&mut rng, Reader::Image, j, &mutated, count, &mut cases);
        }
    }
    special_cases(&bases, &mutated, &mut cases);
    // Proof that the bound is enforced: a 3 GiB allocation must crash the child.
    cases.push(Case {
        reader: Reader::AllocationProbe,
        path: root.clone(),
        expect: if cfg!(target_os = "linux") {
            Expect::Crash
        } else {
            Expect::Anything
        },
        what: "allocation probe".into(),
        mention: None,
    });

    let original = data.join("deit-tiny/model.safetensors");
    let outcomes = run_children(&cases, &root, &original);
    let mut failures = Vec::new();
    let mut tally: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (case, outcome) in cases.iter().zip(&outcomes) {
        let kind = match outcome {
            Outcome::Ok => "ok",
            Outcome::Err(_) => "typed error",
            Outcome::Panic(_) => "PANIC",
            Outcome::Crash(_) if case.expect == Expect::Crash => "crash (expected)",
            Outcome::Crash(_) => "CRASH",
        };
        *tally.entry((case.reader.name(), kind)).or_default() += 1;
        let bad = match (outcome, case.expect) {
            (Outcome::Crash(_), Expect::Crash) => false,
            (_, Expect::Crash) => true,
            (Outcome::Panic(_) | Outcome::Crash(_), _) => true,
            (Outcome::Ok, Expect::Error) => true,
            (Outcome::Err(_), Expect::Value) => true,
            (Outcome::Err(e), _) => case.mention.is_some_and(|m| !e.contains(m)),
            _ => false,
        };
        if bad {
            // Keep the file for reproduction.
            let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("robustness-failures");
            std::fs::create_dir_all(&keep).unwrap();
            let kept = keep.join(case.path.file_name().unwrap());
            if case.path.is_file() {
                let _ = std::fs::copy(&case.path, &kept);
            }
            failures.push(format!(
                "{} ({}, expected {:?}) -> {outcome:?}; kept as {}",
                case.path.display(),
                case.what,
                case.expect,
                kept.display()
            ));
        }
    }
    let summary: Vec<String> = tally
        .iter()
        .map(|((r, k), n)| format!("{r}: {n} {k}"))
        .collect();
    let _ = writeln!(
        std::io::stderr(),
        "robustness: {} cases in {:.1?} under a {MEMORY_LIMIT_MB} MiB address-space limit: {}",
        cases.len(),
        started.elapsed(),
        summary.join(", ")
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
