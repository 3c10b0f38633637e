//! Compressed and densified checkpoints, and MLP-input files: round trips and bad files.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use common::{Dictionary, gaussian_calibration, shared_dictionary_group};
use fips::ParamGuard;
use fips::format::checkpoint::{Checkpoint, TensorData, write_safetensors};
use fips::format::compressed::{CompressedModel, GroupManifest, MANIFEST_KEY, Manifest};
use std::ops::ControlFlow;

use fips::CompressedBlocks;
use fips::methods::BasisSharingParams;
use fips::methods::Compressor;
use fips::methods::LayerCollapseParams;
use fips::methods::MixedRankParams;
use fips::methods::SvdLlmParams;
use fips::methods::SvdParams;
use fips::{Activation, DenseMlp, FipsError, FipsParams, MlpKind};
use safetensors::Dtype;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("fips-outputs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small "model" checkpoint in `dtype`: two blocks of timm-named MLPs plus an unrelated tensor.
fn write_model(path: &PathBuf, blocks: &[DenseMlp<f32>], dtype: Dtype) {
    let mut t = BTreeMap::new();
    for (b, mlp) in blocks.iter().enumerate() {
        for (layer, role) in mlp.layers().iter().zip(["fc1", "fc2"]) {
            let w = layer.weight();
            t.insert(
                format!("blocks.{b}.mlp.{role}.weight"),
                TensorData::from_floats(w.iter().copied(), w.shape().to_vec(), dtype).unwrap(),
            );
            let bias = layer.bias().unwrap();
            t.insert(
                format!("blocks.{b}.mlp.{role}.bias"),
                TensorData::from_floats(bias.iter().copied(), vec![bias.len()], dtype).unwrap(),
            );
        }
    }
    t.insert(
        "head.weight".into(),
        TensorData::from_floats((0..6).map(|x| x as f32), vec![2, 3], Dtype::F32).unwrap(),
    );
    write_safetensors(
        path,
        &t,
        HashMap::from([("origin".to_string(), "test".to_string())]),
    )
    .unwrap();
}

/// The group's blocks compressed by `method`, with a manifest naming the original tensors.
fn compressed_with(
    method: &dyn Compressor<f32>,
    blocks: &[DenseMlp<f32>],
    dtype: Dtype,
) -> CompressedModel {
    let calib = gaussian_calibration::<f32>(blocks.len(), 256, 16, 3);
    let out = method
        .compress(blocks, &calib, &mut |_| ControlFlow::Continue(()))
        .unwrap();
    let originals = (0..blocks.len())
        .flat_map(|b| {
            blocks[b]
                .layers()
                .iter()
                .zip(["fc1", "fc2"])
                .map(move |(l, role)| {
                    (
                        format!("blocks.{b}.mlp.{role}.weight"),
                        Some(format!("blocks.{b}.mlp.{role}.bias")),
                        l.weight().shape().to_vec(),
                        dtype,
                    )
                })
        })
        .collect();
    let blocks_idx: Vec<usize> = (0..blocks.len()).collect();
    let mut manifest = Manifest::new(method.method().name(), &method.parameters()).unwrap();
    manifest.groups.push(
        GroupManifest::describe(&out.blocks, &blocks_idx, MlpKind::Standard, originals).unwrap(),
    );
    CompressedModel {
        manifest,
        groups: vec![out.blocks],
    }
}

fn compressed(blocks: &[DenseMlp<f32>], dtype: Dtype) -> CompressedModel {
    let fips = FipsParams::new()
        .steps(20)
        .batch_tokens(64)
        .check()
        .unwrap();
    compressed_with(&fips, blocks, dtype)
}

/// One compressor per representation (and with shared, owned and dense low-rank matrices).
fn every_method() -> Vec<Box<dyn Compressor<f32>>> {
    vec![
        Box::new(
            FipsParams::new()
                .steps(10)
                .batch_tokens(64)
                .check()
                .unwrap(),
        ),
        Box::new(SvdParams::new().check().unwrap()),
        Box::new(SvdLlmParams::new().check().unwrap()),
        Box::new(BasisSharingParams::new().check().unwrap()),
        Box::new(
            MixedRankParams::new()
                .budget(0.7)
                .residual_rank(2)
                .grid(1)
                .steps(5)
                .batch_tokens(64)
                .check()
                .unwrap(),
        ),
        Box::new(
            LayerCollapseParams::new()
                .max_steps(20)
                .batch_tokens(64)
                .check()
                .unwrap(),
        ),
    ]
}

fn blocks() -> Vec<DenseMlp<f32>> {
    shared_dictionary_group(Dictionary {
        kind: MlpKind::Standard,
        activation: Activation::Gelu,
        d: 16,
        i: 32,
        n: 2,
        atoms: 20,
        density: 0.3,
        seed: 5,
    })
}

#[test]
fn compressed_checkpoint_round_trips_exactly() {
    let dir = TempDir::new("round");
    let model = compressed(&blocks(), Dtype::F32);
    let path = dir.join("c.safetensors");
    model.write(&path).unwrap();
    let back = CompressedModel::read(&path).unwrap();
    assert_eq!(back, model, "groups and manifest must survive bit for bit");
    assert_eq!(
        back.manifest.groups[0].matrices[1].weight,
        "blocks.0.mlp.fc2.weight"
    );
    // The factors are stored as CSR: U, then per matrix nnz values, nnz column indices, r + 1 row
    // offsets, and the bias; nothing else.
    let CompressedBlocks::SharedBasis(g) = &model.groups[0] else {
        panic!("FiPS gives a shared basis");
    };
    let expected = 16 * g.rank() + 2 * g.nnz() + 4 * (g.rank() + 1) + 2 * (32 + 16);
    let ck = Checkpoint::open(&path).unwrap();
    let elements: usize = ck.tensors().map(|t| t.len()).sum();
    assert_eq!(elements, expected);
}

#[test]
fn every_method_round_trips_and_densifies_to_the_same_model() {
    let dir = TempDir::new("methods");
    let blocks = blocks();
    let original_path = dir.join("model.safetensors");
    write_model(&original_path, &blocks, Dtype::F32);
    let original = Checkpoint::open(&original_path).unwrap();
    let x = common::randn::<f32>(
        &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(9),
        32,
        16,
        1.0,
    );
    for method in every_method() {
        let name = method.method();
        let model = compressed_with(method.as_ref(), &blocks, Dtype::F32);
        let path = dir.join(&format!("{name}.safetensors"));
        model.write(&path).unwrap();
        let back = CompressedModel::read(&path).unwrap();
        assert_eq!(back.manifest.method, name.name());
        assert_eq!(
            back.groups, model.groups,
            "{name}: factors must survive bit for bit"
        );
        assert_eq!(back.manifest, model.manifest, "{name}");
        // The densified checkpoint computes what the compressed blocks compute.
        let dense_path = dir.join(&format!("{name}-dense.safetensors"));
        back.densify(&original, &dense_path).unwrap();
        let dense = Checkpoint::open(&dense_path).unwrap();
        let layout = fips::format::layout::MlpLayout::detect(&dense).unwrap();
        for b in 0..blocks.len() {
            let rebuilt = layout
                .load_block::<f32>(&dense, b, Activation::Gelu)
                .unwrap();
            let want = model.groups[0]
                .to_dense_mlp(b)
                .unwrap()
                .forward(x.view())
                .unwrap();
            let got = rebuilt.forward(x.view()).unwrap();
            let err = (&got - &want).mapv(f32::abs).fold(0.0f32, |a, &v| a.max(v));
            assert!(
                err < 1e-4,
                "{name} block {b}: densified output differs by {err}"
            );
        }
    }
}

#[test]
fn densified_checkpoint_replaces_only_mlp_tensors_in_their_dtype() {
    for dtype in [Dtype::F32, Dtype::BF16] {
        let dir = TempDir::new(&format!("dense-{dtype:?}"));
        let blocks = blocks();
        let original_path = dir.join("model.safetensors");
        write_model(&original_path, &blocks, dtype);
        let original = Checkpoint::open(&original_path).unwrap();
        let model = compressed(&blocks, dtype);
        let out = dir.join("dense.safetensors");
        model.densify(&original, &out).unwrap();
        let dense = Checkpoint::open(&out).unwrap();
        assert_eq!(
            dense.names().collect::<Vec<_>>(),
            original.names().collect::<Vec<_>>()
        );
        assert_eq!(
            dense.read_bytes("head.weight").unwrap(),
            original.read_bytes("head.weight").unwrap()
        );
        assert_eq!(
            dense.metadata().get("origin").map(String::as_str),
            Some("test")
        );
        let tol = if dtype == Dtype::F32 { 1e-6 } else { 1e-2 };
        for b in 0..2 {
            for (m, role) in ["fc1", "fc2"].iter().enumerate() {
                let name = format!("blocks.{b}.mlp.{role}.weight");
                let info = dense.info(&name).unwrap();
                assert_eq!(info.dtype, dtype);
                assert_eq!(&info.shape, original.info(&name).unwrap().shape.as_slice());
                let got: ndarray::Array2<f32> = dense.read_matrix(&name).unwrap();
                let want = model.groups[0].to_dense_mlp(b).unwrap().layers()[m]
                    .weight()
                    .clone();
                let err = (&got - &want).mapv(f32::abs).fold(0.0f32, |a, &x| a.max(x));
                let scale = want.mapv(f32::abs).fold(0.0f32, |a, &x| a.max(x));
                assert!(err <= tol * scale, "{name}: {err} vs scale {scale}");
            }
        }
    }
}

#[test]
fn mismatched_and_corrupted_files_are_typed_errors() {
    let dir = TempDir::new("bad");
    let blocks = blocks();
    let model = compressed(&blocks, Dtype::F32);

    // Densifying against a checkpoint that lacks a tensor, or holds it with another shape.
    let plain = dir.join("plain.safetensors");
    write_model(&plain, &blocks, Dtype::F32);
    let plain_ck = Checkpoint::open(&plain).unwrap();
    let out = dir.join("never.safetensors");
    let mut t = BTreeMap::new();
    for info in plain_ck.tensors() {
        t.insert(
            info.name.clone(),
            TensorData::new(
                info.dtype,
                info.shape.clone(),
                plain_ck.read_bytes(&info.name).unwrap(),
            )
            .unwrap(),
        );
    }
    t.insert(
        "blocks.1.mlp.fc2.weight".to_string(),
        TensorData::from_floats([0.0f32; 4], vec![2, 2], Dtype::F32).unwrap(),
    );
    let reshaped = dir.join("reshaped.safetensors");
    write_safetensors(&reshaped, &t, HashMap::new()).unwrap();
    let reshaped = Checkpoint::open(&reshaped).unwrap();
    assert!(matches!(
        model.densify(&reshaped, &out),
        Err(FipsError::ShapeMismatch { .. })
    ));
    t.remove("blocks.1.mlp.fc2.weight");
    let missing = dir.join("missing.safetensors");
    write_safetensors(&missing, &t, HashMap::new()).unwrap();
    let missing = Checkpoint::open(&missing).unwrap();
    assert!(matches!(
        model.densify(&missing, &out),
        Err(FipsError::MissingTensor { .. })
    ));
    assert!(!out.exists(), "a failed write leaves no file");

    // A plain checkpoint is not a compressed one.
    assert!(matches!(
        CompressedModel::read(&plain),
        Err(FipsError::Format { .. })
    ));

    // A manifest that does not match the factors.
    let mut wrong = model.clone();
    wrong.manifest.groups[0].rank = wrong.manifest.groups[0].rank.map(|r| r + 1);
    assert!(wrong.write(dir.join("wrong.safetensors")).is_err());

    // Corrupted CSR structure: column indices out of range.
    let path = dir.join("c.safetensors");
    model.write(&path).unwrap();
    let ck = Checkpoint::open(&path).unwrap();
    let mut tensors = BTreeMap::new();
    for info in ck.tensors() {
        let mut bytes = ck.read_bytes(&info.name).unwrap();
        if info.name == "group.0.matrix.0.columns" {
            bytes[..4].copy_from_slice(&9999u32.to_le_bytes());
        }
        tensors.insert(
            info.name.clone(),
            TensorData::new(info.dtype, info.shape.clone(), bytes).unwrap(),
        );
    }
    let manifest = ck.metadata().get(MANIFEST_KEY).unwrap().clone();
    let broken = dir.join("broken.safetensors");
    write_safetensors(
        &broken,
        &tensors,
        HashMap::from([(MANIFEST_KEY.to_string(), manifest)]),
    )
    .unwrap();
    assert!(matches!(
        CompressedModel::read(&broken),
        Err(FipsError::Format { .. })
    ));

    // A truncated compressed file.
    let bytes = std::fs::read(&path).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        CompressedModel::read(&truncated),
        Err(FipsError::Format { .. })
    ));
}

/// `path` rewritten with its manifest as version 1 wrote it: 0 for "not applicable".
fn as_version_1(path: &PathBuf, out: &PathBuf) {
    let ck = Checkpoint::open(path).unwrap();
    let mut tensors = BTreeMap::new();
    for info in ck.tensors() {
        let bytes = ck.read_bytes(&info.name).unwrap();
        tensors.insert(
            info.name.clone(),
            TensorData::new(info.dtype, info.shape.clone(), bytes).unwrap(),
        );
    }
    let mut manifest: serde_json::Value =
        serde_json::from_str(ck.metadata().get(MANIFEST_KEY).unwrap()).unwrap();
    manifest["format_version"] = serde_json::json!(1);
    for group in manifest["groups"].as_array_mut().unwrap() {
        for field in ["rank", "nnz"] {
            if group[field].is_null() {
                group[field] = serde_json::json!(0);
            }
        }
        if group["sparsity"].is_null() {
            group["sparsity"] = serde_json::json!(0.0);
        }
    }
    write_safetensors(
        out,
        &tensors,
        HashMap::from([(MANIFEST_KEY.to_string(), manifest.to_string())]),
    )
    .unwrap();
}

#[test]
fn files_of_format_version_1_are_still_read() {
    let dir = TempDir::new("v1");
    let blocks = blocks();
    for method in every_method() {
        let name = method.method();
        let model = compressed_with(method.as_ref(), &blocks, Dtype::F32);
        let (path, old) = (
            dir.join(&format!("{name}.safetensors")),
            dir.join(&format!("{name}-v1.safetensors")),
        );
        model.write(&path).unwrap();
        as_version_1(&path, &old);
        let back = CompressedModel::read(&old).unwrap();
        assert_eq!(back.groups, model.groups, "{name}");
        assert_eq!(
            back.manifest, model.manifest,
            "{name}: zeros read as absent"
        );
        let shared =
            back.manifest.groups[0].representation == fips::repr::Representation::SharedBasis;
        assert_eq!(back.manifest.groups[0].rank.is_some(), shared, "{name}");
    }
    // A version this crate does not know is a typed error.
    let path = dir.join("fips.safetensors");
    let ck = Checkpoint::open(&path).unwrap();
    let text = ck
        .metadata()
        .get(MANIFEST_KEY)
        .unwrap()
        .replace("\"format_version\":2", "\"format_version\":99");
    let mut tensors = BTreeMap::new();
    for info in ck.tensors() {
        let bytes = ck.read_bytes(&info.name).unwrap();
        tensors.insert(
            info.name.clone(),
            TensorData::new(info.dtype, info.shape.clone(), bytes).unwrap(),
        );
    }
    let future = dir.join("future.safetensors");
    write_safetensors(
        &future,
        &tensors,
        HashMap::from([(MANIFEST_KEY.to_string(), text)]),
    )
    .unwrap();
    assert!(matches!(
        CompressedModel::read(&future),
        Err(FipsError::Format { .. })
    ));
}
