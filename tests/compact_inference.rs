//! DeiT-tiny classifying from its self-contained compact file (format 3) alone, its FiPS MLPs run
//! from the compressed form, against the densified checkpoint of the same file.
#![cfg(feature = "app")]

mod common;

use std::path::PathBuf;

use fips::app::pipeline::{CalibrationSource, Silent, compress_checkpoint};
use fips::app::vit::{BlockMlp, VisionTransformer, preprocess};
use fips::format::block_groups::BlockGroups;
use fips::format::checkpoint::Checkpoint;
use fips::format::compact_file::CompactModel;
use fips::format::layout::MlpLayout;
use fips::{FipsError, FipsParams, ParamGuard};
use ndarray::{Array2, Array4, s};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn argmax(row: ndarray::ArrayView1<'_, f32>) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv { (i, v) } else { (bi, bv) }
        })
        .0
}

#[test]
fn a_self_contained_file_classifies_as_its_densified_checkpoint() {
    let Some(data) =
        common::data_dir("a_self_contained_file_classifies_as_its_densified_checkpoint")
    else {
        return;
    };
    let dir =
        TempDir(std::env::temp_dir().join(format!("fips-compact-vit-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let original_path = data.join("deit-tiny/model.safetensors");
    let original = Checkpoint::open(&original_path).unwrap();
    let layout = MlpLayout::detect(&original).unwrap();
    // Blocks 4-7 stay dense: the file mixes compressed and copied MLPs.
    let groups = BlockGroups::parse("0-3,8-11", &layout.block_shapes().unwrap()).unwrap();
    let fips = FipsParams::new().steps(3).batch_tokens(64).check().unwrap();
    let run = compress_checkpoint(
        &original,
        &layout,
        &groups,
        &fips,
        layout.default_activation(),
        &CalibrationSource::Gaussian {
            tokens: 256,
            seed: 7,
        },
        &mut Silent,
    )
    .unwrap();
    let compact = CompactModel::from_model(&run.model, Some(&original)).unwrap();
    let self_contained = dir.0.join("self.safetensors");
    compact
        .write_self_contained(&self_contained, &original)
        .unwrap();
    let mlp_only = dir.0.join("mlp.safetensors");
    compact.write(&mlp_only).unwrap();

    // The self-contained file holds none of the compressed weights and is read alone.
    let file = Checkpoint::open(&self_contained).unwrap();
    assert!(!file.contains("blocks.0.mlp.fc1.weight"));
    assert!(file.contains("blocks.5.mlp.fc1.weight"));
    let densified = dir.0.join("densified.safetensors");
    CompactModel::read_from(&file, None)
        .unwrap()
        .densify(&file, &densified)
        .unwrap();
    let compressed_vit = VisionTransformer::from_compact(&file, None, None).unwrap();
    let compact_blocks: Vec<usize> = (0..12)
        .filter(|&b| {
            matches!(
                compressed_vit.block_mlp(b).unwrap(),
                BlockMlp::Compact { .. }
            )
        })
        .collect();
    assert_eq!(compact_blocks, vec![0, 1, 2, 3, 8, 9, 10, 11]);
    assert!(compressed_vit.mlp(0).is_err() && compressed_vit.mlp(5).is_ok());
    let densified_vit =
        VisionTransformer::from_checkpoint(&Checkpoint::open(&densified).unwrap(), None).unwrap();
    // An MLP-only file needs the original beside it, and then gives the same model.
    let mlp_file = Checkpoint::open(&mlp_only).unwrap();
    assert!(matches!(
        VisionTransformer::from_compact(&mlp_file, None, None),
        Err(FipsError::Format { .. } | FipsError::InvalidParameter { .. })
    ));
    let mlp_vit = VisionTransformer::from_compact(&mlp_file, Some(&original), None).unwrap();

    let parity = Checkpoint::open(data.join("deit-tiny/parity.safetensors")).unwrap();
    let pixels: Array4<u8> = {
        let info = parity.info("pixels_u8_nhwc").unwrap().clone();
        let bytes = parity.read_bytes("pixels_u8_nhwc").unwrap();
        Array4::from_shape_vec(
            (info.shape[0], info.shape[1], info.shape[2], info.shape[3]),
            bytes,
        )
        .unwrap()
    };
    let images = preprocess(pixels.slice(s![..3, .., .., ..]));
    let from_file: Array2<f32> = compressed_vit.forward(images.view()).unwrap();
    let from_densified = densified_vit.forward(images.view()).unwrap();
    let from_mlp_only = mlp_vit.forward(images.view()).unwrap();
    assert_eq!(from_file, from_mlp_only);
    let scale = from_densified.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = from_file
        .iter()
        .zip(&from_densified)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "compressed-form vs densified logits: largest difference {diff:.3e}, largest |logit| {scale:.2}"
    );
    assert!(
        diff <= 1e-5 * scale,
        "logits differ by {diff} (scale {scale})"
    );
    for (a, b) in from_file.rows().into_iter().zip(from_densified.rows()) {
        assert_eq!(argmax(a), argmax(b));
    }
    // The compression changed the model: the test would notice a path that ignored the file.
    let dense_vit = VisionTransformer::from_checkpoint(&original, None).unwrap();
    let dense = dense_vit.forward(images.view()).unwrap();
    let moved = dense
        .iter()
        .zip(&from_densified)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        moved > 1e-3,
        "compression left the logits unchanged ({moved})"
    );
}
