//! The compact file format (version 3): exact round trips, self-contained files, version errors,
//! crafted files, size targets and the Python reader of `docs/format.md`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use fips::format::checkpoint::{Checkpoint, TensorData, write_safetensors};
use fips::format::compact_file::{CompactBlocks, CompactModel, FORMAT_VERSION_KEY};
use fips::format::compressed::{CompressedModel, GroupManifest, MANIFEST_KEY, Manifest};
use fips::repr::CompressedBlocks;
use fips::repr::collapsed::{CollapsedBlock, CollapsedGroup, CollapsedMap};
use fips::repr::low_rank::{LowRankGroup, LowRankMatrix};
use fips::{
    Activation, CompressedGroup, FipsError, GroupShape, MatrixRole, MlpKind, SharedBasis,
    SparseFactor, nonzeros_for_sparsity, rank_for_budget,
};
use ndarray::{Array1, Array2};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fips-compact-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || scale * rng.random_range(-1.0f32..1.0))
}

/// A shared-basis group with exactly `nnz[j]` kept entries in factor `j`.
fn exact_group(
    kind: MlpKind,
    (d, i, n, r): (usize, usize, usize, usize),
    nnz: &[usize],
    biases: bool,
    seed: u64,
) -> CompressedGroup<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let f = kind.matrices_per_block();
    let u = random(&mut rng, d, r, 1.0 / (d as f32).sqrt());
    let mut positions: Vec<usize> = (0..r * i).collect();
    let factors = (0..f * n)
        .map(|j| {
            positions.shuffle(&mut rng);
            let mut mask = Array2::from_elem((r, i), false);
            for &p in &positions[..nnz[j]] {
                mask[[p / i, p % i]] = true;
            }
            SparseFactor::new(random(&mut rng, r, i, 1.0), mask).unwrap()
        })
        .collect();
    let bias = (0..f * n)
        .map(|j| {
            let len = match kind.matrix_roles()[j % f] {
                MatrixRole::Up => i,
                MatrixRole::Down => d,
            };
            biases.then(|| Array1::from_shape_fn(len, |k| ((k + j) as f32 * 0.37).sin()))
        })
        .collect();
    let act = match kind {
        MlpKind::Standard => Activation::Gelu,
        MlpKind::Gated => Activation::Silu,
    };
    CompressedGroup::new(kind, act, SharedBasis::new(u).unwrap(), factors, bias).unwrap()
}

/// Names of the original tensors, timm style for standard blocks, Llama style for gated ones.
fn original_names(kind: MlpKind, block: usize, m: usize, bias: bool) -> (String, Option<String>) {
    let base = match kind {
        MlpKind::Standard => format!("blocks.{block}.mlp.{}", ["fc1", "fc2"][m]),
        MlpKind::Gated => format!(
            "model.layers.{block}.mlp.{}",
            ["gate_proj", "up_proj", "down_proj"][m]
        ),
    };
    (
        format!("{base}.weight"),
        bias.then(|| format!("{base}.bias")),
    )
}

/// A v1 compressed model of `groups` (each with its blocks), originals in `dtype`.
fn model(groups: Vec<(CompressedBlocks<f32>, Vec<usize>)>, dtype: Dtype) -> CompressedModel {
    let mut manifest = Manifest::new("fips", &serde_json::json!({"p": 0.5})).unwrap();
    manifest.scheme = Some("test".into());
    let mut out = Vec::new();
    for (group, blocks) in groups {
        let (kind, d, i) = match &group {
            CompressedBlocks::SharedBasis(g) => (g.kind(), g.width(), g.intermediate()),
            CompressedBlocks::LowRank(g) => (g.kind(), g.width(), g.intermediate()),
            CompressedBlocks::Collapsed(g) => (MlpKind::Standard, g.width(), g.intermediate()),
        };
        let has_bias = match &group {
            CompressedBlocks::SharedBasis(g) => g.biases()[0].is_some(),
            CompressedBlocks::LowRank(g) => g.matrices()[0].bias.is_some(),
            CompressedBlocks::Collapsed(_) => true,
        };
        let f = kind.matrices_per_block();
        let originals = (0..f * blocks.len())
            .map(|j| {
                let (w, b) = original_names(kind, blocks[j / f], j % f, has_bias);
                let shape = match kind.matrix_roles()[j % f] {
                    MatrixRole::Up => vec![i, d],
                    MatrixRole::Down => vec![d, i],
                };
                (w, b, shape, dtype)
            })
            .collect();
        manifest
            .groups
            .push(GroupManifest::describe(&group, &blocks, kind, originals).unwrap());
        out.push(group);
    }
    CompressedModel {
        manifest,
        groups: out,
    }
}

fn low_rank_group(d: usize, i: usize, seed: u64) -> CompressedBlocks<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let k = 5;
    // Block 0: fc1 and fc2 share nothing; block 1: fc1 uses basis 0 too, fc2 stays dense.
    let bases = vec![random(&mut rng, k, d, 0.5), random(&mut rng, k, i, 0.5)];
    let matrices = vec![
        LowRankMatrix {
            left: random(&mut rng, i, k, 0.5),
            basis: Some(0),
            bias: Some(Array1::from_elem(i, 0.25)),
        },
        LowRankMatrix {
            left: random(&mut rng, d, k, 0.5),
            basis: Some(1),
            bias: Some(Array1::from_elem(d, -0.5)),
        },
        LowRankMatrix {
            left: random(&mut rng, i, k, 0.5),
            basis: Some(0),
            bias: Some(Array1::from_elem(i, 0.125)),
        },
        LowRankMatrix {
            left: random(&mut rng, d, i, 0.1),
            basis: None,
            bias: Some(Array1::from_elem(d, 1.0)),
        },
    ];
    CompressedBlocks::LowRank(
        LowRankGroup::new(MlpKind::Standard, Activation::Gelu, (d, i), bases, matrices).unwrap(),
    )
}

fn collapsed_group(d: usize, i: usize, seed: u64) -> CompressedBlocks<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let blocks = (0..2)
        .map(|_| CollapsedBlock {
            map: CollapsedMap::Full(random(&mut rng, d, d, 0.3)),
            bias: Array1::from_elem(d, 0.1),
            slope: 0.99,
            converged: true,
        })
        .collect();
    CompressedBlocks::Collapsed(CollapsedGroup::new(d, i, Activation::Gelu, blocks).unwrap())
}

/// A mixed model: a 25 %-dense shared-basis group, a 2 %-dense one (row-gaps), a full one,
/// a low-rank group and a collapsed group, on disjoint blocks.
fn mixed_model(dtype: Dtype) -> CompressedModel {
    let (d, i, r) = (24, 50, 30);
    let quarter = vec![r * i / 4; 4];
    let sparse = vec![r * i / 50; 4];
    let full = vec![7 * i; 2];
    model(
        vec![
            (
                CompressedBlocks::SharedBasis(exact_group(
                    MlpKind::Standard,
                    (d, i, 2, r),
                    &quarter,
                    true,
                    1,
                )),
                vec![0, 1],
            ),
            (
                CompressedBlocks::SharedBasis(exact_group(
                    MlpKind::Standard,
                    (d, i, 2, r),
                    &sparse,
                    true,
                    2,
                )),
                vec![2, 3],
            ),
            (
                CompressedBlocks::SharedBasis(exact_group(
                    MlpKind::Standard,
                    (d, i, 1, 7),
                    &full,
                    false,
                    3,
                )),
                vec![4],
            ),
            (low_rank_group(d, i, 4), vec![5, 6]),
            (collapsed_group(d, i, 5), vec![7, 8]),
        ],
        dtype,
    )
}

fn bits(m: &BTreeMap<String, ndarray::ArrayD<f32>>) -> BTreeMap<String, Vec<u32>> {
    m.iter()
        .map(|(k, v)| (k.clone(), v.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

#[test]
fn round_trips_are_bit_exact_for_every_dtype_and_representation() {
    let dir = temp_dir("roundtrip");
    for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
        let m = mixed_model(dtype);
        let compact = CompactModel::from_model(&m, None).unwrap();
        // Every pattern encoding occurs.
        let encodings: std::collections::BTreeSet<String> = compact
            .manifest
            .groups
            .iter()
            .flat_map(|g| g.matrices.iter())
            .filter_map(|x| x.factor.as_ref().map(|f| f.encoding.clone()))
            .collect();
        assert_eq!(encodings.len(), 3, "{encodings:?}");
        let path = dir.join(format!("{dtype:?}.safetensors"));
        compact.write(&path).unwrap();
        let back = CompactModel::read(&path, None).unwrap();
        assert_eq!(back, compact);
        assert_eq!(
            bits(&back.dense_tensors().unwrap()),
            bits(&compact.dense_tensors().unwrap())
        );
        // Writing what was read gives the same tensors and manifest.
        let again = dir.join(format!("{dtype:?}-again.safetensors"));
        back.write(&again).unwrap();
        let (p, q) = (
            Checkpoint::open(&path).unwrap(),
            Checkpoint::open(&again).unwrap(),
        );
        assert_eq!(p.metadata(), q.metadata());
        let names: Vec<&str> = p.names().collect();
        assert_eq!(names, q.names().collect::<Vec<_>>());
        for n in names {
            assert!(
                p.read_bytes(n).unwrap() == q.read_bytes(n).unwrap(),
                "{n} differs"
            );
        }
        // Inference from the file's groups equals inference from memory, bit for bit.
        let x = random(&mut ChaCha8Rng::seed_from_u64(9), 5, 24, 1.0);
        for (a, b) in back.groups.iter().zip(&compact.groups) {
            if let (CompactBlocks::SharedBasis(a), CompactBlocks::SharedBasis(b)) = (a, b) {
                let (ya, yb) = (
                    a.forward(0, x.view()).unwrap(),
                    b.forward(0, x.view()).unwrap(),
                );
                assert!(ya.iter().zip(&yb).all(|(p, q)| p.to_bits() == q.to_bits()));
            }
        }
        if dtype == Dtype::F32 {
            // In f32 the rebuild equals the training representation's (version 1's) exactly.
            let v1 = m.dense_tensors().unwrap();
            assert_eq!(bits(&back.dense_tensors().unwrap()), bits(&v1));
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Writes an "original" checkpoint for `m`: random MLP weights, the biases of `m`'s first group
/// equal to the compressed ones (so they are stored as `original`), others different, plus
/// non-MLP tensors.
fn write_original(path: &Path, m: &CompressedModel, dtype: Dtype) {
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let mut tensors = BTreeMap::new();
    for (g, gm) in m.manifest.groups.iter().enumerate() {
        let biases: Vec<Option<Array1<f32>>> = match &m.groups[g] {
            CompressedBlocks::SharedBasis(s) => s.biases().to_vec(),
            _ => vec![None; gm.matrices.len()],
        };
        for (j, x) in gm.matrices.iter().enumerate() {
            let w = random(&mut rng, x.shape[0], x.shape[1], 1.0);
            tensors.insert(
                x.weight.clone(),
                TensorData::from_floats(w.iter().copied(), x.shape.clone(), dtype).unwrap(),
            );
            if let Some(b) = &x.bias {
                let values = match (&biases[j], g) {
                    (Some(v), 0) => v.clone(),
                    _ => Array1::from_elem(x.shape[0], 3.0),
                };
                tensors.insert(
                    b.clone(),
                    TensorData::from_floats(values.iter().copied(), vec![values.len()], dtype)
                        .unwrap(),
                );
            }
        }
    }
    for name in ["cls_token", "head.weight", "norm.bias"] {
        let w = random(&mut rng, 3, 4, 1.0);
        tensors.insert(
            name.into(),
            TensorData::from_floats(w.iter().copied(), vec![3, 4], dtype).unwrap(),
        );
    }
    write_safetensors(path, &tensors, HashMap::from([("k".into(), "v".into())])).unwrap();
}

#[test]
fn self_contained_and_mlp_only_files_densify_identically() {
    let dir = temp_dir("selfcontained");
    for dtype in [Dtype::F32, Dtype::BF16] {
        let m = mixed_model(dtype);
        let original_path = dir.join("original.safetensors");
        write_original(&original_path, &m, dtype);
        let original = Checkpoint::open(&original_path).unwrap();
        let compact = CompactModel::from_model(&m, Some(&original)).unwrap();
        let sources: Vec<&str> = compact.manifest.groups[0]
            .matrices
            .iter()
            .map(|x| x.bias_source.as_str())
            .collect();
        assert!(sources.iter().all(|&s| s == "original"), "{sources:?}");
        assert_eq!(compact.manifest.groups[1].matrices[0].bias_source, "stored");

        let mlp_only = dir.join("mlp.safetensors");
        let whole = dir.join("whole.safetensors");
        compact.write(&mlp_only).unwrap();
        compact.write_self_contained(&whole, &original).unwrap();
        // The MLP-only file needs the original for its `original` biases.
        assert!(matches!(
            CompactModel::read(&mlp_only, None),
            Err(FipsError::Format { .. })
        ));
        let a = CompactModel::read(&mlp_only, Some(&original)).unwrap();
        let b = CompactModel::read(&whole, None).unwrap();
        assert!(b.manifest.self_contained && !a.manifest.self_contained);
        assert_eq!(a.groups, b.groups);
        assert_eq!(a.groups, compact.groups);
        // The self-contained file holds the untouched tensors, not the replaced ones.
        let whole_ck = Checkpoint::open(&whole).unwrap();
        assert!(whole_ck.contains("cls_token") && whole_ck.contains("blocks.0.mlp.fc1.bias"));
        assert!(!whole_ck.contains("blocks.0.mlp.fc1.weight"));
        assert!(!whole_ck.contains("blocks.2.mlp.fc1.bias"));
        assert!(
            std::fs::metadata(&whole).unwrap().len()
                < std::fs::metadata(&original_path).unwrap().len()
                    + std::fs::metadata(&mlp_only).unwrap().len()
        );

        let from_original = dir.join("dense-a.safetensors");
        let from_whole = dir.join("dense-b.safetensors");
        a.densify(&original, &from_original).unwrap();
        b.densify(&whole_ck, &from_whole).unwrap();
        let (x, y) = (
            Checkpoint::open(&from_original).unwrap(),
            Checkpoint::open(&from_whole).unwrap(),
        );
        let names: Vec<_> = x.names().map(String::from).collect();
        assert_eq!(names, y.names().map(String::from).collect::<Vec<_>>());
        assert_eq!(
            names,
            original.names().map(String::from).collect::<Vec<_>>()
        );
        for n in &names {
            assert_eq!(x.read_bytes(n).unwrap(), y.read_bytes(n).unwrap(), "{n}");
            assert_eq!(x.info(n).unwrap().dtype, dtype);
        }
        assert_eq!(
            x.read_bytes("cls_token").unwrap(),
            original.read_bytes("cls_token").unwrap()
        );
        if dtype == Dtype::F32 {
            // Same as version 1's densified checkpoint.
            let v1 = dir.join("dense-v1.safetensors");
            m.densify(&original, &v1).unwrap();
            let z = Checkpoint::open(&v1).unwrap();
            for n in &names {
                assert_eq!(x.read_bytes(n).unwrap(), z.read_bytes(n).unwrap(), "{n}");
            }
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn files_of_other_versions_get_a_version_error() {
    let dir = temp_dir("version");
    let m = mixed_model(Dtype::F32);
    // The previous compressed format (version 2, and version 1 before it).
    let v1 = dir.join("v1.safetensors");
    m.write(&v1).unwrap();
    match CompactModel::read(&v1, None) {
        Err(FipsError::UnsupportedVersion {
            found, supported, ..
        }) => {
            assert_eq!(
                (found, supported),
                (fips::format::compressed::FORMAT_VERSION, 3)
            );
        }
        other => panic!("expected a version error, got {other:?}"),
    }
    let v2 = dir.join("v2.safetensors");
    CompactModel::from_model(&m, None)
        .unwrap()
        .write(&v2)
        .unwrap();
    let v3 = dir.join("v3.safetensors");
    rewrite(&v2, &v3, |meta, _, _| {
        meta.insert(FORMAT_VERSION_KEY.into(), "4".into());
    });
    assert!(matches!(
        CompactModel::read(&v3, None),
        Err(FipsError::UnsupportedVersion { found: 4, .. })
    ));
    // And the version-2 reader refuses version 3 rather than misreading it.
    assert!(CompressedModel::read(&v2).is_err());
    std::fs::remove_dir_all(dir).ok();
}

/// Copies `src` to `dst` after `edit` changes its metadata, manifest JSON and tensors.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(
        &mut HashMap<String, String>,
        &mut serde_json::Value,
        &mut BTreeMap<String, TensorData>,
    ),
) {
    let ck = Checkpoint::open(src).unwrap();
    let mut tensors: BTreeMap<String, TensorData> = ck
        .tensors()
        .map(|t| {
            (
                t.name.clone(),
                TensorData::new(t.dtype, t.shape.clone(), ck.read_bytes(&t.name).unwrap()).unwrap(),
            )
        })
        .collect();
    let mut meta = ck.metadata().clone();
    let mut manifest: serde_json::Value = serde_json::from_str(&meta[MANIFEST_KEY]).unwrap();
    edit(&mut meta, &mut manifest, &mut tensors);
    meta.insert(MANIFEST_KEY.into(), manifest.to_string());
    write_safetensors(dst, &tensors, meta).unwrap();
}

#[test]
fn crafted_files_are_typed_errors_before_any_allocation() {
    let dir = temp_dir("crafted");
    let m = mixed_model(Dtype::F32);
    let good = dir.join("good.safetensors");
    CompactModel::from_model(&m, None)
        .unwrap()
        .write(&good)
        .unwrap();
    assert!(CompactModel::read(&good, None).is_ok());
    fn huge() -> serde_json::Value {
        serde_json::json!(1u64 << 40)
    }
    type Edit = Box<
        dyn FnOnce(
            &mut HashMap<String, String>,
            &mut serde_json::Value,
            &mut BTreeMap<String, TensorData>,
        ),
    >;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "rank 2^40",
            Box::new(|_, j, _| j["groups"][0]["rank"] = huge()),
        ),
        (
            "intermediate 2^40",
            Box::new(|_, j, _| j["groups"][0]["intermediate"] = huge()),
        ),
        (
            "width 2^40",
            Box::new(|_, j, _| j["groups"][0]["width"] = huge()),
        ),
        (
            "factor rows 2^40",
            Box::new(|_, j, _| j["groups"][0]["matrices"][0]["factor"]["rows"] = huge()),
        ),
        (
            "factor nnz 2^40",
            Box::new(|_, j, _| j["groups"][0]["matrices"][1]["factor"]["nnz"] = huge()),
        ),
        (
            "mask too short",
            Box::new(|_, _, t| {
                let mask = t.get_mut("group.0.matrix.0.mask").unwrap();
                mask.bytes.truncate(mask.bytes.len() - 3);
                mask.shape = vec![mask.bytes.len()];
            }),
        ),
        (
            "mask disagrees with nnz",
            Box::new(|_, _, t| {
                let mask = t.get_mut("group.0.matrix.0.mask").unwrap();
                mask.bytes[0] ^= 1;
            }),
        ),
        (
            "column gap out of range",
            Box::new(|_, _, t| {
                let gaps = t.get_mut("group.1.matrix.1.gaps").unwrap();
                gaps.bytes[0] = 0xff;
                gaps.bytes[1] = 0xff;
            }),
        ),
        (
            "row count beyond the gaps",
            Box::new(|_, _, t| {
                let counts = t.get_mut("group.1.matrix.3.counts").unwrap();
                counts.bytes[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
            }),
        ),
        (
            "weight name pointing at another block",
            Box::new(|_, j, _| {
                j["groups"][0]["matrices"][0]["weight"] = "blocks.1.mlp.fc1.weight".into()
            }),
        ),
        (
            "the same weight named twice",
            Box::new(|_, j, _| {
                let w = j["groups"][0]["matrices"][1]["weight"].clone();
                j["groups"][0]["matrices"][3]["weight"] = w;
            }),
        ),
        (
            "matrix of another block",
            Box::new(|_, j, _| j["groups"][0]["matrices"][0]["block"] = 1.into()),
        ),
        (
            "low-rank basis index out of range",
            Box::new(|_, j, _| j["groups"][3]["structure"]["bases"][0] = 7.into()),
        ),
        (
            "dtype differs from the tensors",
            Box::new(|_, j, _| j["groups"][0]["dtype"] = "BF16".into()),
        ),
        (
            "unknown encoding",
            Box::new(|_, j, _| j["groups"][0]["matrices"][0]["factor"]["encoding"] = "zip".into()),
        ),
        (
            "extra tensor in an MLP-only file",
            Box::new(|_, _, t| {
                t.insert(
                    "stray".into(),
                    TensorData::new(Dtype::U8, vec![1], vec![0]).unwrap(),
                );
            }),
        ),
        (
            "missing tensor",
            Box::new(|_, _, t| {
                t.remove("group.0.matrix.2.values");
            }),
        ),
        (
            "bias from the original without a name",
            Box::new(|_, j, _| {
                j["groups"][0]["matrices"][0]["bias"] = serde_json::Value::Null;
                j["groups"][0]["matrices"][0]["bias_source"] = "original".into();
            }),
        ),
        (
            "rank 2^40 of a full-pattern group",
            Box::new(|_, j, _| j["groups"][2]["rank"] = huge()),
        ),
        (
            "low-rank intermediate 2^40",
            Box::new(|_, j, _| j["groups"][3]["intermediate"] = huge()),
        ),
        (
            "collapsed width 2^40",
            Box::new(|_, j, _| j["groups"][4]["width"] = huge()),
        ),
        (
            "low-rank factor reshaped (same bytes)",
            Box::new(|_, _, t| {
                let left = t.get_mut("group.3.matrix.0.left").unwrap();
                let n: usize = left.shape.iter().product();
                left.shape = vec![1, n];
            }),
        ),
        (
            "collapsed block marked factored",
            Box::new(|_, j, _| j["groups"][4]["structure"]["factored"][0] = true.into()),
        ),
        (
            "bias name pointing at another block",
            Box::new(|_, j, _| {
                j["groups"][0]["matrices"][0]["bias"] = "blocks.1.mlp.fc1.bias".into()
            }),
        ),
        (
            "factor nnz beyond the values tensor",
            Box::new(|_, j, _| j["groups"][1]["matrices"][0]["factor"]["nnz"] = 100_000.into()),
        ),
        (
            "unreadable manifest",
            Box::new(|meta, _, _| {
                meta.insert(MANIFEST_KEY.into(), "{not json".into());
            }),
        ),
    ];
    for (what, edit) in cases {
        let bad = dir.join("bad.safetensors");
        rewrite(&good, &bad, |meta, json, tensors| {
            edit(meta, json, tensors);
            if what == "unreadable manifest" {
                *json = serde_json::Value::String("{not json".into());
            }
        });
        match CompactModel::read(&bad, None) {
            Err(
                FipsError::Format { .. }
                | FipsError::Corrupt { .. }
                | FipsError::MissingTensor { .. }
                | FipsError::ShapeMismatch { .. }
                | FipsError::InvalidParameter { .. },
            ) => {}
            other => panic!("{what}: expected a typed format error, got {other:?}"),
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

/// FiPS groups of the given shape at p = 0.5, s = 0.75, with the budget's exact rank and nnz.
fn budget_model(
    kind: MlpKind,
    (d, i): (usize, usize),
    groups: usize,
    dtype: Dtype,
    biases: bool,
) -> CompressedModel {
    let n = 4;
    let f = kind.matrices_per_block();
    let shape = GroupShape {
        width: d,
        intermediate: i,
        blocks: n,
        matrices_per_block: f,
    };
    let r = rank_for_budget(shape, 0.5, 0.75).unwrap();
    let total = nonzeros_for_sparsity(shape.factor_entries(r), 0.75);
    let mut nnz = vec![total / (f * n); f * n];
    nnz[0] += total - nnz.iter().sum::<usize>();
    model(
        (0..groups)
            .map(|g| {
                (
                    CompressedBlocks::SharedBasis(exact_group(
                        kind,
                        (d, i, n, r),
                        &nnz,
                        biases,
                        g as u64,
                    )),
                    (g * n..(g + 1) * n).collect(),
                )
            })
            .collect(),
        dtype,
    )
}

#[test]
fn file_sizes_meet_the_targets() {
    let dir = temp_dir("sizes");
    // DeiT-tiny: 12 standard f32 blocks, d = 192, I = 768, biases stored.
    let deit = budget_model(MlpKind::Standard, (192, 768), 3, Dtype::F32, true);
    let path = dir.join("deit.safetensors");
    let compact = CompactModel::from_model(&deit, None).unwrap();
    compact.write(&path).unwrap();
    let size = std::fs::metadata(&path).unwrap().len() as f64;
    let dense = (12 * 2 * 192 * 768 * 4) as f64;
    let v1 = dir.join("deit-v1.safetensors");
    deit.write(&v1).unwrap();
    let v1_size = std::fs::metadata(&v1).unwrap().len() as f64;
    eprintln!(
        "DeiT-tiny shapes, f32, p = 0.5, s = 0.75 (r = {}): format 2 {size} B = {:.4} of the dense MLP \
         ({dense} B); format 1 {v1_size} B = {:.4}",
        deit.manifest.groups[0].rank.unwrap_or(0),
        size / dense,
        v1_size / dense
    );
    assert!(size <= 0.57 * dense, "{size} vs {dense}");
    // Llama-style, bf16: one group of 4 gated blocks, d = 128, I = 344, no biases.
    let llama = budget_model(MlpKind::Gated, (128, 344), 1, Dtype::BF16, false);
    let path = dir.join("llama.safetensors");
    CompactModel::from_model(&llama, None)
        .unwrap()
        .write(&path)
        .unwrap();
    let size = std::fs::metadata(&path).unwrap().len() as f64;
    let dense = (12 * 128 * 344 * 2) as f64;
    let v1 = dir.join("llama-v1.safetensors");
    llama.write(&v1).unwrap();
    let v1_size = std::fs::metadata(&v1).unwrap().len() as f64;
    eprintln!(
        "Llama-style shapes, bf16 (r = {}): format 2 {size} B = {:.4} of the dense bf16 MLP ({dense} B); \
         format 1 {v1_size} B = {:.4}",
        llama.manifest.groups[0].rank.unwrap_or(0),
        size / dense,
        v1_size / dense
    );
    assert!(size <= 0.63 * dense, "{size} vs {dense}");
    std::fs::remove_dir_all(dir).ok();
}

/// The Python reader of docs/format.md rebuilds every dense weight as the crate does.
#[test]
fn the_documented_python_reader_rebuilds_every_dense_weight() {
    let has_numpy = std::process::Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_numpy {
        eprintln!("SKIPPED: python3 with numpy is not installed");
        return;
    }
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/format.md")).unwrap();
    let start = doc.find("<!-- reader:start -->").unwrap();
    let end = doc.find("<!-- reader:end -->").unwrap();
    let reader = doc[start..end]
        .lines()
        .skip_while(|l| !l.starts_with("```python"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");
    let dir = temp_dir("python");
    let script = dir.join("check.py");
    std::fs::write(
        &script,
        format!(
            "{reader}\n\nimport sys\nref, _ = load(sys.argv[2])\ngot = dense_weights(sys.argv[1])\n\
             worst = 0.0\nfor name, w in ref.items():\n    if name.endswith('.weight') and name in got:\n        \
             scale = max(float(np.abs(w).max()), 1e-30)\n        worst = max(worst, float(np.abs(got[name] - w).max()) / scale)\n\
             missing = [n for n in ref if n.endswith('.weight') and n not in got]\n\
             print(len(got), 'weights, worst relative difference', worst, 'missing', missing)\n\
             sys.exit(0 if worst < 1e-5 and len(missing) == 2 * 2 else 1)\n"
        ),
    )
    .unwrap();
    for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
        let mut m = mixed_model(dtype);
        // Gated blocks too.
        let gated = budget_model(MlpKind::Gated, (16, 40), 1, dtype, false);
        let mut gm = gated.manifest.groups[0].clone();
        let shift = 20;
        gm.blocks.iter_mut().for_each(|b| *b += shift);
        for (k, x) in gm.matrices.iter_mut().enumerate() {
            x.block += shift;
            x.weight = original_names(MlpKind::Gated, x.block, k % 3, false).0;
        }
        m.manifest.groups.push(gm);
        m.groups.push(gated.groups[0].clone());
        let compact = CompactModel::from_model(&m, None).unwrap();
        let file = dir.join("model.safetensors");
        compact.write(&file).unwrap();
        let reference = dir.join("reference.safetensors");
        let dense = compact.dense_tensors().unwrap();
        let tensors: BTreeMap<String, TensorData> = dense
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    TensorData::from_floats(v.iter().copied(), v.shape().to_vec(), Dtype::F32)
                        .unwrap(),
                )
            })
            .collect();
        write_safetensors(&reference, &tensors, HashMap::new()).unwrap();
        let out = std::process::Command::new("python3")
            .arg(&script)
            .arg(&file)
            .arg(&reference)
            .output()
            .unwrap();
        eprintln!(
            "{dtype:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "the Python reader disagrees ({dtype:?})"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Every method's form, written compact from real compressor output: the stored values are
/// exactly the form's parameters (weights and biases) in the source dtype, the baselines store no
/// pattern, FiPS's patterns take at most one bit per entry of each V, and the header is small.
#[test]
fn every_form_stores_exactly_its_parameters_in_the_source_dtype() {
    use common::{Dictionary, gaussian_calibration, shared_dictionary_group};
    use fips::format::compact_file::size_breakdown;
    use fips::methods::{
        BasisSharingParams, Compressor, LayerCollapseParams, MixedRankParams, SvdLlmParams,
        SvdParams,
    };
    use fips::{FipsParams, ParamGuard};
    let dir = temp_dir("every-form");
    let blocks = shared_dictionary_group::<f32>(Dictionary {
        kind: MlpKind::Standard,
        activation: Activation::Gelu,
        d: 16,
        i: 40,
        n: 2,
        atoms: 20,
        density: 0.3,
        seed: 9,
    });
    let calib = gaussian_calibration::<f32>(blocks.len(), 256, 16, 4);
    let methods: Vec<Box<dyn Compressor<f32>>> = vec![
        Box::new(FipsParams::new().steps(6).batch_tokens(64).check().unwrap()),
        Box::new(SvdParams::new().check().unwrap()),
        Box::new(SvdLlmParams::new().check().unwrap()),
        Box::new(BasisSharingParams::new().check().unwrap()),
        Box::new(
            MixedRankParams::new()
                .budget(0.6)
                .residual_rank(2)
                .grid(1)
                .steps(4)
                .batch_tokens(64)
                .check()
                .unwrap(),
        ),
        Box::new(
            LayerCollapseParams::new()
                .max_steps(6)
                .batch_tokens(64)
                .check()
                .unwrap(),
        ),
    ];
    for method in &methods {
        let out = method
            .compress(
                &blocks,
                &calib,
                &mut |_| std::ops::ControlFlow::Continue(()),
            )
            .unwrap();
        let count = out.blocks.parameter_count();
        // Bytes of a bitmask of every V (one bit per entry, rows padded to whole bytes in
        // either orientation).
        let (factor_entries, mask_bound) = match &out.blocks {
            CompressedBlocks::SharedBasis(g) => g.factors().iter().fold((0, 0), |(e, b), v| {
                let (r, i) = v.mask().dim();
                (e + r * i, b + (r * i).div_ceil(8) + r + i)
            }),
            _ => (0usize, 0usize),
        };
        for (dtype, size) in [(Dtype::F32, 4), (Dtype::BF16, 2), (Dtype::F16, 2)] {
            let m = model(vec![(out.blocks.clone(), vec![0, 1])], dtype);
            let path = dir.join(format!("{}-{dtype:?}.safetensors", method.method().name()));
            CompactModel::from_model(&m, None)
                .unwrap()
                .write(&path)
                .unwrap();
            let sizes = size_breakdown(&path).unwrap();
            let what = format!("{} {dtype:?}", method.method().name());
            assert_eq!(
                sizes.values,
                (count.compressed_weights() + count.biases) * size,
                "{what}: {sizes:?} for {count:?}"
            );
            assert_eq!(sizes.copied, 0, "{what}");
            if factor_entries == 0 {
                assert_eq!(sizes.patterns, 0, "{what}");
            } else {
                assert!(sizes.patterns <= mask_bound, "{what}: {sizes:?}");
            }
            assert!(sizes.header < 8192, "{what}: header {}", sizes.header);
            // And the file rebuilds what the form (rounded to the dtype) rebuilds.
            let back = CompactModel::read(&path, None).unwrap();
            assert_eq!(back.groups.len(), 1, "{what}");
        }
    }
    std::fs::remove_dir_all(dir).ok();
}
