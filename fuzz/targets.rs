//! The reader targets shared by the cargo-fuzz harnesses (`fuzz/fuzz_targets/*.rs`) and the
//! stable-Rust mutation tests (`tests/robustness.rs`, which includes this file with `#[path]`).
//!
//! Each target runs one reader the way the `fips` command does, end to end, on a file: a typed
//! error or a value is fine; a panic, an abort or an allocation beyond the documented limits
//! (`docs/limits.md`) is a finding.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use fips::FipsError;
use fips::app::vit::VisionTransformer;
use fips::format::checkpoint::Checkpoint;
use fips::format::compact_file::CompactModel;
use fips::format::compressed::CompressedModel;
use fips::format::layout::MlpLayout;
use fips::format::mlp_inputs::MlpInputs;
use safetensors::Dtype;

/// A safetensors checkpoint: header, every tensor decoded, the MLP layout, and (when it has the
/// tensors of one) the ViT.
pub fn checkpoint(path: &Path) -> Result<(), FipsError> {
    let ck = Checkpoint::open(path)?;
    let names: Vec<String> = ck.names().map(str::to_string).collect();
    for name in &names {
        match ck.info(name)?.dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => {
                ck.read::<f32>(name)?;
            }
            Dtype::U8 | Dtype::I32 | Dtype::U32 | Dtype::I64 => {
                ck.read_integers(name)?;
            }
            _ => {
                ck.read_bytes(name)?;
            }
        }
    }
    let layout = MlpLayout::detect(&ck)?;
    for b in 0..layout.blocks() {
        layout.load_block::<f32>(&ck, b, layout.default_activation())?;
    }
    if ck.contains("patch_embed.proj.weight") {
        VisionTransformer::from_checkpoint(&ck, None)?;
    }
    Ok(())
}

/// An MLP-input file as `fips compress --activations` reads it for a model of block shapes
/// `shapes` (`(d, I)` per block) grouped as `groups`: opened, checked against the model before any
/// work, then each group's calibration read.
pub fn mlp_inputs(
    path: &Path,
    shapes: &[(usize, usize)],
    groups: &[Vec<usize>],
) -> Result<(), FipsError> {
    let file = MlpInputs::open(path)?;
    file.check_groups(groups, shapes)?;
    for blocks in groups {
        file.calibration::<f32>(blocks)?;
    }
    Ok(())
}

/// A compressed checkpoint as `densify` and `eval` read it: the manifest checked against the
/// original, the factors read, every dense tensor rebuilt.
pub fn compressed(path: &Path, original: &Checkpoint) -> Result<(), FipsError> {
    fips::format::compressed_check::check_against_original(&Checkpoint::open(path)?, original)?;
    let model = CompressedModel::read(path)?;
    model.dense_tensors()?;
    Ok(())
}

/// A compressed checkpoint as `inspect` reads it: the header and the manifest only.
pub fn compressed_manifest(path: &Path) -> Result<(), FipsError> {
    fips::format::compressed_check::read_manifest(&Checkpoint::open(path)?)?;
    Ok(())
}

/// A compact compressed file (format 3) as `inspect`, `densify`, `eval` and inference read it:
/// the manifest and the size breakdown; the groups read (biases marked `original` from
/// `original`, or from the file itself when it is self-contained); every dense tensor rebuilt;
/// one token through every block from the compressed form; and, for a self-contained file of a
/// ViT, the model loaded from the file alone.
pub fn compact(path: &Path, original: Option<&Checkpoint>) -> Result<(), FipsError> {
    let file = Checkpoint::open(path)?;
    fips::format::compact_file::read_manifest(&file)?;
    fips::format::compact_file::size_breakdown(path)?;
    let model = CompactModel::read_from(&file, original)?;
    model.dense_tensors()?;
    for group in &model.groups {
        if let fips::format::compact_file::CompactBlocks::SharedBasis(g) = group {
            let x = fips::ndarray::Array2::<f32>::from_elem((1, g.width()), 0.5);
            for b in 0..g.blocks() {
                g.forward(b, x.view())?;
            }
        }
    }
    if model.manifest.self_contained && file.contains("patch_embed.proj.weight") {
        VisionTransformer::from_compact(&file, None, None)?;
    }
    Ok(())
}

/// One image: its structure and size checked, then decoded and cropped to 224 × 224.
#[cfg(feature = "images")]
pub fn image(path: &Path) -> Result<(), FipsError> {
    let pixels = fips::app::images::load_image(path)?;
    assert_eq!(
        pixels.dim(),
        (224, 224, 3),
        "a decoded image is 224 × 224 × 3"
    );
    Ok(())
}

/// An image set directory: `labels.tsv` parsed, every image of every split loaded.
#[cfg(feature = "images")]
pub fn image_set(dir: &Path) -> Result<(), FipsError> {
    let items = fips::app::images::read_labels(dir)?;
    for item in items.iter().take(64) {
        fips::app::images::load_image(&item.path)?;
    }
    Ok(())
}

/// A per-process, per-thread scratch file for the fuzz harnesses (in `/dev/shm` when present).
pub fn scratch(tag: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("fips-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{tag}-{:?}", std::thread::current().id()).replace(['(', ')'], ""))
}

/// Writes `data` to the scratch file of `tag` and returns its path.
pub fn with_file(tag: &str, data: &[u8]) -> PathBuf {
    let path = scratch(tag);
    std::fs::write(&path, data).expect("scratch file");
    path
}
