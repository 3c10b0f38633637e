//! One regression test per defect of issue 13's "Why" that the hardening covers, named after the
//! defect. Library-level tests run in every build; the command-line ones need the `cli` feature;
//! tests on the real DeiT-tiny data skip with a visible message when it is absent.
#![cfg(feature = "app")]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use fips::format::block_groups::BlockGroups;
use fips::format::checkpoint::{Checkpoint, TensorData, write_safetensors};
use fips::{FipsError, FipsParams, ParamGuard};
use safetensors::Dtype;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("fips-hardening-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn st_bytes(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let mut text = serde_json::to_vec(header).unwrap();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend_from_slice(data);
    out
}

fn read_st(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

/// A baseline greyscale JPEG of uniform grey, written by hand (every 8 × 8 block codes DC
/// difference 0 and end-of-block with one-symbol Huffman tables), of any declared size.
#[cfg(feature = "images")]
fn grey_jpeg(width: u16, height: u16) -> Vec<u8> {
    let seg = |marker: u8, body: &[u8]| {
        let mut v = vec![0xFF, marker];
        v.extend(((body.len() + 2) as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    };
    let mut out = vec![0xFF, 0xD8];
    out.extend(seg(0xDB, &[[0u8].as_slice(), &[1u8; 64]].concat()));
    let mut sof = vec![8];
    sof.extend(height.to_be_bytes());
    sof.extend(width.to_be_bytes());
    sof.extend([1, 1, 0x11, 0]);
    out.extend(seg(0xC0, &sof));
    let mut counts = vec![1u8];
    counts.extend([0u8; 15]);
    out.extend(seg(0xC4, &[[0x00].as_slice(), &counts, &[0]].concat()));
    out.extend(seg(0xC4, &[[0x10].as_slice(), &counts, &[0]].concat()));
    out.extend(seg(0xDA, &[1, 1, 0, 0, 0x3F, 0]));
    let blocks = usize::from(width).div_ceil(8) * usize::from(height).div_ceil(8);
    let bits = 2 * blocks;
    out.extend(std::iter::repeat_n(0u8, bits / 8));
    if bits % 8 != 0 {
        out.push((1u8 << (8 - bits % 8)) - 1);
    }
    out.extend([0xFF, 0xD9]);
    out
}

// ---------------------------------------------------------------------------------------------
// Library level.

/// "A symlink planted at the predictable temp name `.x.safetensors.<pid>.tmp` makes the writer
/// write through it into another file."
#[cfg(unix)]
#[test]
fn defect_symlink_at_predictable_temp_name_is_not_written_through() {
    let dir = TempDir::new("planted");
    let victim = dir.join("victim.bin");
    std::fs::write(&victim, b"precious").unwrap();
    let out = dir.join("x.safetensors");
    std::os::unix::fs::symlink(
        &victim,
        dir.join(format!(".x.safetensors.{}.tmp", std::process::id())),
    )
    .unwrap();
    let t = BTreeMap::from([(
        "w".to_string(),
        TensorData::from_floats([1.0f32, 2.0], vec![2], Dtype::F32).unwrap(),
    )]);
    write_safetensors(&out, &t, HashMap::new()).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(
        Checkpoint::open(&out)
            .unwrap()
            .read_bytes("w")
            .unwrap()
            .len(),
        8
    );
    // A destination that is itself a link is refused, its target untouched.
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    assert!(matches!(
        write_safetensors(&link, &t, HashMap::new()),
        Err(FipsError::UnsafeOutput { .. })
    ));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

/// "`--groups 0-4000000000` aborts, `0-18446744073709551615` panics (capacity overflow)."
#[test]
fn defect_huge_group_ranges_are_typed_errors() {
    let shapes = vec![(192, 768); 12];
    for spec in ["0-4000000000", "0-18446744073709551615", "3-12", "11-11,12"] {
        assert!(
            matches!(
                BlockGroups::parse(spec, &shapes),
                Err(FipsError::IndexOutOfRange { what: "block", .. })
            ),
            "{spec}"
        );
    }
    assert!(BlockGroups::parse("99999999999999999999999", &shapes).is_err());
    assert_eq!(BlockGroups::parse("0-11", &shapes).unwrap().len(), 1);
}

/// "An 89 MB header of 1.5 M empty tensors takes 1.58 GB."
#[test]
fn defect_header_of_many_empty_tensors_is_refused_before_parsing() {
    let dir = TempDir::new("empty-tensors");
    let n = fips::math::limits::MAX_TENSORS + 1;
    let mut header = serde_json::Map::new();
    for i in 0..n {
        header.insert(
            format!("t{i}"),
            serde_json::json!({"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}),
        );
    }
    let path = dir.join("empty.safetensors");
    std::fs::write(&path, st_bytes(&serde_json::Value::Object(header), &[])).unwrap();
    match Checkpoint::open(&path) {
        Err(FipsError::Format { reason, .. }) => {
            assert!(reason.contains("MAX_TENSORS"), "{reason}")
        }
        other => panic!("expected a format error, got {:?}", other.map(|_| ())),
    }
}

/// Empty tensors with huge other extents: every dimension is bounded by the file's data bytes.
#[test]
fn defect_empty_tensor_with_huge_extent_is_refused() {
    let dir = TempDir::new("extent");
    let header = serde_json::json!({
        "blocks.0.mlp.fc1.weight": {"dtype": "F32", "shape": [0, 4294967296u64], "data_offsets": [0, 0]},
    });
    let path = dir.join("extent.safetensors");
    std::fs::write(&path, st_bytes(&header, &[])).unwrap();
    assert!(matches!(
        Checkpoint::open(&path),
        Err(FipsError::Format { .. })
    ));
}

/// "`--rank 100000` runs on at 6.7 GB (fips) or 'succeeds' with a file 109× the dense size (svd)."
#[test]
fn defect_rank_above_its_bound_is_refused() {
    use fips::methods::Compressor;
    use fips::methods::params::SvdParams;
    let blocks = common::shared_dictionary_group::<f32>(common::Dictionary {
        kind: fips::MlpKind::Standard,
        activation: fips::Activation::Gelu,
        d: 8,
        i: 16,
        n: 2,
        atoms: 8,
        density: 0.5,
        seed: 1,
    });
    let calib = common::gaussian_calibration::<f32>(2, 64, 8, 3);
    let fips = FipsParams::new()
        .budget(fips::Budget::Rank(100_000))
        .steps(1)
        .batch_tokens(16)
        .check()
        .unwrap();
    assert!(matches!(
        fips.compress(&blocks, &calib),
        Err(FipsError::InvalidParameter { name: "rank", .. })
    ));
    let svd = SvdParams::new()
        .budget(fips::Budget::Rank(100_000))
        .check()
        .unwrap();
    assert!(matches!(
        Compressor::<f32>::compress(&svd, &blocks, &calib, &mut |_| {
            std::ops::ControlFlow::Continue(())
        }),
        Err(FipsError::InvalidParameter { name: "rank", .. })
    ));
    // The bounds themselves are usable ranks.
    let ok = SvdParams::new()
        .budget(fips::Budget::Rank(8))
        .check()
        .unwrap();
    assert!(
        Compressor::<f32>::compress(&ok, &blocks, &calib, &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .is_ok()
    );
}

/// A tiny timm-named ViT with patch size `patch` on 224-pixel images.
fn write_vit(path: &Path, width: usize, patch: usize) {
    let grid = 224 / patch;
    let tokens = 1 + grid * grid;
    let hidden = 2 * width;
    let f = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        TensorData::from_floats(
            (0..n).map(|k| ((k % 7) as f32 - 3.0) * 0.01),
            shape.to_vec(),
            Dtype::F32,
        )
        .unwrap()
    };
    let mut t = BTreeMap::new();
    t.insert(
        "patch_embed.proj.weight".to_string(),
        f(&[width, 3, patch, patch]),
    );
    t.insert("patch_embed.proj.bias".to_string(), f(&[width]));
    t.insert("cls_token".to_string(), f(&[1, 1, width]));
    t.insert("pos_embed".to_string(), f(&[1, tokens, width]));
    let p = "blocks.0";
    for norm in ["norm1", "norm2"] {
        t.insert(format!("{p}.{norm}.weight"), f(&[width]));
        t.insert(format!("{p}.{norm}.bias"), f(&[width]));
    }
    for (name, out, input) in [
        ("attn.qkv", 3 * width, width),
        ("attn.proj", width, width),
        ("mlp.fc1", hidden, width),
        ("mlp.fc2", width, hidden),
    ] {
        t.insert(format!("{p}.{name}.weight"), f(&[out, input]));
        t.insert(format!("{p}.{name}.bias"), f(&[out]));
    }
    t.insert("norm.weight".to_string(), f(&[width]));
    t.insert("norm.bias".to_string(), f(&[width]));
    t.insert("head.weight".to_string(), f(&[3, width]));
    t.insert("head.bias".to_string(), f(&[3]));
    write_safetensors(path, &t, HashMap::new()).unwrap();
}

/// "A checkpoint with patch size 1 makes the ViT allocate 241 GB and abort."
#[test]
fn defect_vit_with_patch_size_one_is_refused() {
    let dir = TempDir::new("patch1");
    let path = dir.join("vit.safetensors");
    write_vit(&path, 4, 1);
    let ck = Checkpoint::open(&path).unwrap();
    match fips::app::vit::VisionTransformer::from_checkpoint(&ck, Some(1)) {
        Err(FipsError::InvalidParameter {
            name: "pos_embed",
            reason,
        }) => {
            assert!(reason.contains("MAX_VIT_TOKENS"), "{reason}")
        }
        other => panic!("expected a typed error, got {:?}", other.map(|_| ())),
    }
    // Patch 16 (197 tokens) is fine.
    write_vit(&path, 4, 16);
    assert!(
        fips::app::vit::VisionTransformer::from_checkpoint(
            &Checkpoint::open(&path).unwrap(),
            Some(1)
        )
        .is_ok()
    );
}

/// "A truncated JPEG is accepted silently."
#[cfg(feature = "images")]
#[test]
fn defect_truncated_jpeg_is_an_error() {
    let Some(data) = common::data_dir("defect_truncated_jpeg_is_an_error") else {
        return;
    };
    let dir = TempDir::new("truncated-jpeg");
    let labels = std::fs::read_to_string(data.join("imagenet-sample/labels.tsv")).unwrap();
    let first = labels.lines().nth(1).unwrap().split('\t').next().unwrap();
    let bytes = std::fs::read(data.join("imagenet-sample").join(first)).unwrap();
    assert_eq!(
        fips::app::images::load_image(data.join("imagenet-sample").join(first))
            .unwrap()
            .dim(),
        (224, 224, 3)
    );
    for fraction in [0.1, 0.5, 0.9, 0.999] {
        let cut = dir.join("cut.jpg");
        std::fs::write(&cut, &bytes[..(bytes.len() as f64 * fraction) as usize]).unwrap();
        match fips::app::images::load_image(&cut) {
            Err(FipsError::Image { reason, .. }) => {
                assert!(reason.contains("truncated"), "{reason}")
            }
            other => panic!(
                "a JPEG cut at {fraction} must be an error, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}

/// "An 8 KB JPEG of 1×30000 pixels reaches 5.5 GB."
#[cfg(feature = "images")]
#[test]
fn defect_extreme_jpeg_sizes_are_refused_before_decoding() {
    let dir = TempDir::new("wide-jpeg");
    let path = dir.join("w.jpg");
    // The hand-written encoder is right: a normal size decodes.
    std::fs::write(&path, grey_jpeg(300, 250)).unwrap();
    let px = fips::app::images::load_image(&path).unwrap();
    assert!(px.iter().all(|&p| (120..=136).contains(&p)), "uniform grey");
    for (w, h) in [(1, 30000), (30000, 1), (17, 1), (1000, 40), (20000, 20000)] {
        std::fs::write(&path, grey_jpeg(w, h)).unwrap();
        assert!(
            matches!(
                fips::app::images::load_image(&path),
                Err(FipsError::Image { .. })
            ),
            "{w} × {h}"
        );
    }
}

/// "A missing block in an MLP-input file is reported only after all the compression before it."
#[test]
fn defect_missing_block_of_mlp_input_file_is_found_before_work() {
    let dir = TempDir::new("mlp-inputs");
    let path = dir.join("acts.safetensors");
    let z = ndarray::Array2::<f32>::from_shape_fn((6, 4), |(i, j)| (i + j) as f32);
    fips::format::mlp_inputs::write_mlp_inputs(
        &path,
        &[(0, z.view()), (1, z.view()), (3, z.view())],
        Dtype::F32,
        HashMap::new(),
    )
    .unwrap();
    let file = fips::format::mlp_inputs::MlpInputs::open(&path).unwrap();
    let shapes = vec![(4, 16); 4];
    file.check_groups(&[vec![0, 1]], &shapes).unwrap();
    match file.check_groups(&[vec![0, 1], vec![2, 3]], &shapes) {
        Err(FipsError::MissingTensor { name, .. }) => assert_eq!(name, "blocks.2.mlp_input"),
        other => panic!("expected the missing block, got {other:?}"),
    }
    // Wrong width, and different token counts, are found too.
    assert!(matches!(
        file.check_groups(&[vec![0]], &[(5, 16)]),
        Err(FipsError::ShapeMismatch { .. })
    ));
    let short = ndarray::Array2::<f32>::zeros((5, 4));
    fips::format::mlp_inputs::write_mlp_inputs(
        &path,
        &[(0, z.view()), (1, short.view())],
        Dtype::F32,
        HashMap::new(),
    )
    .unwrap();
    let file = fips::format::mlp_inputs::MlpInputs::open(&path).unwrap();
    assert!(file.check_groups(&[vec![0, 1]], &shapes).is_err());
}

/// "`densify` gave 2 different hashes in 6 identical runs, `capture` 5 in 6 (metadata in a
/// `HashMap`)."
#[test]
fn defect_metadata_order_made_outputs_differ_between_runs() {
    let dir = TempDir::new("determinism");
    let t = BTreeMap::from([(
        "w".to_string(),
        TensorData::from_floats([1.0f32, 2.0, 3.0], vec![3], Dtype::F32).unwrap(),
    )]);
    let mut hashes = std::collections::BTreeSet::new();
    for run in 0..6 {
        // A fresh HashMap each time: its iteration order is randomised per map.
        let meta: HashMap<String, String> = (0..12)
            .map(|k| (format!("key{k}"), format!("v{k}")))
            .collect();
        let path = dir.join(format!("out{run}.safetensors"));
        write_safetensors(&path, &t, meta).unwrap();
        hashes.insert(std::fs::read(&path).unwrap());
    }
    assert_eq!(
        hashes.len(),
        1,
        "identical inputs must give identical bytes"
    );
    // And the safetensors crate reads the result.
    let bytes = hashes.into_iter().next().unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap().len(), 12);
}

/// "A manifest whose tensor names point at another block makes `densify` write block 0's weights
/// into block 5 and exit 0", and "a compressed file whose manifest says `intermediate = 2^40`
/// aborts `eval`/`densify`".
#[test]
fn defect_manifest_not_matching_the_original_is_refused_before_reading_factors() {
    let Some(data) = common::data_dir(
        "defect_manifest_not_matching_the_original_is_refused_before_reading_factors",
    ) else {
        return;
    };
    let dir = TempDir::new("manifest");
    let original = Checkpoint::open(data.join("deit-tiny/model.safetensors")).unwrap();
    let compressed = dir.join("c.safetensors");
    small_compressed(&original, &compressed);
    fips::format::compressed_check::check_against_original(
        &Checkpoint::open(&compressed).unwrap(),
        &original,
    )
    .unwrap();
    let (header, raw) = read_st(&compressed);
    let rewrite = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut h = header.clone();
        let mut m: serde_json::Value =
            serde_json::from_str(h["__metadata__"]["fips.manifest"].as_str().unwrap()).unwrap();
        f(&mut m);
        h["__metadata__"]["fips.manifest"] = serde_json::Value::String(m.to_string());
        let path = dir.join("bad.safetensors");
        std::fs::write(&path, st_bytes(&h, &raw)).unwrap();
        fips::format::compressed_check::check_against_original(
            &Checkpoint::open(&path).unwrap(),
            &original,
        )
    };
    let other_block = rewrite(&|m| {
        for x in m["groups"][0]["matrices"].as_array_mut().unwrap() {
            let w = x["weight"]
                .as_str()
                .unwrap()
                .replace("blocks.0.", "blocks.5.");
            x["weight"] = w.into();
        }
    });
    assert!(
        matches!(other_block, Err(FipsError::Format { .. })),
        "{other_block:?}"
    );
    for value in [300_000u64, 1 << 40] {
        let huge = rewrite(&|m| m["groups"][0]["intermediate"] = value.into());
        assert!(matches!(huge, Err(FipsError::Format { .. })), "{huge:?}");
    }
    let moved = rewrite(&|m| m["groups"][0]["blocks"][0] = 7.into());
    assert!(moved.is_err());
}

/// A FiPS compression of DeiT-tiny's blocks 0-1 on Gaussian inputs, two steps.
fn small_compressed(original: &Checkpoint, path: &Path) {
    let layout = fips::format::layout::MlpLayout::detect(original).unwrap();
    let groups = BlockGroups::parse("0-1", &[(192, 768); 12]).unwrap();
    let compressor = FipsParams::new().steps(2).batch_tokens(64).check().unwrap();
    let result = fips::app::pipeline::compress_checkpoint(
        original,
        &layout,
        &groups,
        &compressor,
        layout.default_activation(),
        &fips::app::pipeline::CalibrationSource::Gaussian {
            tokens: 256,
            seed: 1,
        },
        &mut fips::app::pipeline::Silent,
    )
    .unwrap();
    result.model.write(path).unwrap();
}

/// Reading a format-2 compressed file *without* its original trusted the manifest's
/// `intermediate` and allocated dense factors of that width (2^40 aborted). The reader now bounds
/// each rebuilt factor by the nonzeros the file stores (`limits::MAX_DENSE_PER_NONZERO`).
#[test]
fn defect_bare_compressed_reader_trusts_manifest_intermediate() {
    let Some(data) = common::data_dir("defect_bare_compressed_reader_trusts_manifest_intermediate")
    else {
        return;
    };
    let dir = TempDir::new("bare-reader");
    let original = Checkpoint::open(data.join("deit-tiny/model.safetensors")).unwrap();
    let compressed = dir.join("c.safetensors");
    small_compressed(&original, &compressed);
    let (mut header, raw) = read_st(&compressed);
    let mut m: serde_json::Value =
        serde_json::from_str(header["__metadata__"]["fips.manifest"].as_str().unwrap()).unwrap();
    m["groups"][0]["intermediate"] = (1u64 << 40).into();
    header["__metadata__"]["fips.manifest"] = serde_json::Value::String(m.to_string());
    std::fs::write(&compressed, st_bytes(&header, &raw)).unwrap();
    let err = fips::format::compressed::CompressedModel::read(&compressed).unwrap_err();
    assert!(
        matches!(err, fips::FipsError::Format { .. }),
        "expected a typed format error, got {err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Command line.

#[cfg(feature = "cli")]
mod cli {
    use super::*;
    use std::process::{Command, Output};

    fn fips(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_fips"))
            .args(args.iter().map(|a| a.as_ref()))
            .env("OPENBLAS_NUM_THREADS", "1")
            .output()
            .unwrap()
    }

    fn sha(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    /// Standard error of a run that must end in a typed error (exit code 1), from its first line
    /// that is not a note (such as the one on OpenBLAS's kernels, `fips::foundation::blas`).
    fn refused(out: &Output) -> String {
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(
            out.status.code(),
            Some(1),
            "a typed error, not a crash: {stderr}"
        );
        stderr
            .lines()
            .skip_while(|line| line.starts_with("note:"))
            .map(|line| format!("{line}\n"))
            .collect()
    }

    /// A data-free SVD compression of DeiT-tiny's blocks 0-1 into `out_dir`.
    fn quick_compress(model: &Path, out_dir: &Path) -> Output {
        fips(&[
            &"compress",
            &"--checkpoint",
            &model,
            &"--data-free",
            &"--data-free-tokens",
            &"256",
            &"--method",
            &"svd",
            &"--groups",
            &"0-1",
            &"--no-eval",
            &"--out-dir",
            &out_dir,
        ])
    }

    /// "`fips densify --out` equal to `--original` or `--compressed` replaces the input and exits 0"
    /// (also through a hard link).
    #[test]
    fn defect_densify_out_equal_to_an_input_destroys_it() {
        let Some(data) = common::data_dir("defect_densify_out_equal_to_an_input_destroys_it")
        else {
            return;
        };
        let dir = TempDir::new("cli-densify");
        let model = dir.join("model.safetensors");
        std::fs::copy(data.join("deit-tiny/model.safetensors"), &model).unwrap();
        assert!(quick_compress(&model, &dir.join("run")).status.success());
        let compressed = dir.join("run/compressed.safetensors");
        let (m0, c0) = (sha(&model), sha(&compressed));
        let hard = dir.join("hard.safetensors");
        std::fs::hard_link(&model, &hard).unwrap();
        for out in [&model, &compressed, &hard] {
            let o = fips(&[
                &"densify",
                &"--compressed",
                &compressed,
                &"--original",
                &model,
                &"--out",
                out,
            ]);
            assert!(refused(&o).contains("refusing to write"));
        }
        assert_eq!(sha(&model), m0);
        assert_eq!(sha(&compressed), c0);
        // A fresh output works, and twice gives the same bytes.
        let a = dir.join("a.safetensors");
        let b = dir.join("b.safetensors");
        for out in [&a, &b] {
            let o = fips(&[
                &"densify",
                &"--compressed",
                &compressed,
                &"--original",
                &model,
                &"--out",
                out,
            ]);
            assert!(o.status.success());
        }
        assert_eq!(sha(&a), sha(&b), "densify is byte-identical across runs");
    }

    /// "`fips capture --out` equal to `--checkpoint` turns a 22 MB model into a 300 KB activations
    /// file"; and "capture gave 5 hashes in 6 runs".
    #[test]
    fn defect_capture_out_equal_to_checkpoint_destroys_it() {
        let Some(data) = common::data_dir("defect_capture_out_equal_to_checkpoint_destroys_it")
        else {
            return;
        };
        let dir = TempDir::new("cli-capture");
        let model = dir.join("model.safetensors");
        std::fs::copy(data.join("deit-tiny/model.safetensors"), &model).unwrap();
        let images = data.join("imagenet-sample");
        let capture = |out: &Path| {
            fips(&[
                &"capture",
                &"--checkpoint",
                &model,
                &"--images",
                &images,
                &"--calib-images",
                &"1",
                &"--blocks",
                &"0",
                &"--out",
                &out,
            ])
        };
        let before = sha(&model);
        assert!(refused(&capture(&model)).contains("refusing to write"));
        assert_eq!(sha(&model), before);
        let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
        assert!(capture(&a).status.success());
        assert!(capture(&b).status.success());
        assert_eq!(sha(&a), sha(&b), "capture is byte-identical across runs");
        let meta = Checkpoint::open(&a).unwrap().metadata().clone();
        assert_eq!(
            meta.get("fips_version").map(String::as_str),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(meta.get("blas_threads").map(String::as_str), Some("1"));
    }

    /// "compress with a checkpoint named `densified.safetensors` inside the out-dir overwrites it";
    /// and the report records the crate version and thread counts.
    #[test]
    fn defect_compress_checkpoint_inside_out_dir_is_overwritten() {
        let Some(data) =
            common::data_dir("defect_compress_checkpoint_inside_out_dir_is_overwritten")
        else {
            return;
        };
        let dir = TempDir::new("cli-outdir");
        let model = dir.join("densified.safetensors");
        std::fs::copy(data.join("deit-tiny/model.safetensors"), &model).unwrap();
        let before = sha(&model);
        assert!(refused(&quick_compress(&model, &dir.0)).contains("refusing to write"));
        assert_eq!(sha(&model), before);
        assert!(
            !dir.join("compressed.safetensors").exists(),
            "refused before any work"
        );
        let out = dir.join("run");
        assert!(quick_compress(&model, &out).status.success());
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        assert_eq!(report["fips_version"], env!("CARGO_PKG_VERSION"));
        assert!(report["cores"].as_u64().is_some_and(|t| t >= 1));
        assert_eq!(report["blas_threads"], 1);

        // Readers trust the set manifest: a member changed after the set was written is refused.
        let compressed = out.join("compressed.safetensors");
        assert!(fips(&[&"inspect", &compressed]).status.success());
        let mut bytes = std::fs::read(&compressed).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&compressed, bytes).unwrap();
        let stderr = refused(&fips(&[&"inspect", &compressed]));
        assert!(stderr.contains("changed after the output set"), "{stderr}");
    }

    /// "`--groups 0-4000000000` aborts, `0-18446744073709551615` panics"; "`--rank 100000` runs on
    /// at 6.7 GB"; "`--calib-images 0` panics"; "`--eval-split calib` is accepted"; a 10^12-token
    /// data-free calibration.
    #[test]
    fn defect_hostile_arguments_are_typed_errors() {
        let Some(data) = common::data_dir("defect_hostile_arguments_are_typed_errors") else {
            return;
        };
        let dir = TempDir::new("cli-args");
        let model = data.join("deit-tiny/model.safetensors");
        let images = data.join("imagenet-sample");
        let out = dir.join("out");
        let base: [&dyn AsRef<std::ffi::OsStr>; 7] = [
            &"compress",
            &"--checkpoint",
            &model,
            &"--no-eval",
            &"--out-dir",
            &out,
            &"--data-free",
        ];
        for extra in [
            vec!["--groups", "0-4000000000"],
            vec!["--groups", "0-18446744073709551615"],
            vec!["--rank", "100000", "--groups", "0-3", "--steps", "1"],
            vec!["--rank", "100000", "--method", "svd", "--groups", "0"],
            vec![
                "--data-free-tokens",
                "1000000000000",
                "--method",
                "svd",
                "--groups",
                "0",
            ],
        ] {
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = base.to_vec();
            for e in &extra {
                args.push(e);
            }
            let stderr = refused(&fips(&args));
            assert!(stderr.starts_with("error:"), "{extra:?}: {stderr}");
        }
        // A training batch larger than the calibration (less the 5 % held out): refused before
        // the first group, not when its turn comes.
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = base.to_vec();
        let extra = [
            "--data-free-tokens",
            "300",
            "--batch-tokens",
            "512",
            "--groups",
            "0-3,4-7",
        ];
        for e in &extra {
            args.push(e);
        }
        let stderr = refused(&fips(&args));
        assert!(
            stderr.contains("batch of 512 tokens is larger than the calibration set (285 tokens)"),
            "{stderr}"
        );
        for extra in [vec!["--calib-images", "0"], vec!["--eval-split", "calib"]] {
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
                &"compress",
                &"--checkpoint",
                &model,
                &"--images",
                &images,
                &"--out-dir",
                &out,
                &"--method",
                &"svd",
            ];
            for e in &extra {
                args.push(e);
            }
            let stderr = refused(&fips(&args));
            assert!(
                stderr.starts_with("error: invalid parameter"),
                "{extra:?}: {stderr}"
            );
        }
        assert!(!out.exists(), "nothing was written");
    }

    /// "A compressed file whose manifest says `intermediate = 2^40` aborts `inspect`/`eval`/
    /// `densify`"; "a manifest whose tensor names point at another block makes `densify` write
    /// block 0's weights into block 5 and exit 0".
    #[test]
    fn defect_hostile_manifests_abort_or_corrupt_densify() {
        let Some(data) = common::data_dir("defect_hostile_manifests_abort_or_corrupt_densify")
        else {
            return;
        };
        let dir = TempDir::new("cli-manifest");
        let model = data.join("deit-tiny/model.safetensors");
        let compressed = dir.join("c.safetensors");
        small_compressed(&Checkpoint::open(&model).unwrap(), &compressed);
        let (header, raw) = read_st(&compressed);
        let write = |f: &dyn Fn(&mut serde_json::Value), name: &str| {
            let mut h = header.clone();
            let mut m: serde_json::Value =
                serde_json::from_str(h["__metadata__"]["fips.manifest"].as_str().unwrap()).unwrap();
            f(&mut m);
            h["__metadata__"]["fips.manifest"] = serde_json::Value::String(m.to_string());
            let path = dir.join(name);
            std::fs::write(&path, st_bytes(&h, &raw)).unwrap();
            path
        };
        let huge = write(
            &|m| m["groups"][0]["intermediate"] = (1u64 << 40).into(),
            "huge.safetensors",
        );
        let moved = write(
            &|m| {
                for x in m["groups"][0]["matrices"].as_array_mut().unwrap() {
                    for key in ["weight", "bias"] {
                        if let Some(s) = x[key].as_str() {
                            x[key] = s.replace("blocks.0.", "blocks.5.").into();
                        }
                    }
                }
            },
            "moved.safetensors",
        );
        let out = dir.join("dense.safetensors");
        for bad in [&huge, &moved] {
            let o = fips(&[
                &"densify",
                &"--compressed",
                bad,
                &"--original",
                &model,
                &"--out",
                &out,
            ]);
            assert!(refused(&o).contains("does not match the original"));
            assert!(!out.exists());
        }
        // `inspect` describes the file from its header without allocating the claimed sizes.
        let o = fips(&[&"inspect", &huge]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("I=1099511627776"));
    }

    /// "An unwritable out-dir … a missing block in an MLP-input file is reported only after all
    /// the compression before it": the missing block is reported before any group starts.
    #[test]
    fn defect_missing_mlp_input_block_reported_after_compression() {
        let Some(data) =
            common::data_dir("defect_missing_mlp_input_block_reported_after_compression")
        else {
            return;
        };
        let dir = TempDir::new("cli-missing-block");
        let model = data.join("deit-tiny/model.safetensors");
        let acts = dir.join("acts.safetensors");
        let z = ndarray::Array2::<f32>::from_shape_fn((64, 192), |(i, j)| {
            ((i * 7 + j) % 13) as f32 * 0.1
        });
        // Block 0 holds a NaN: a run that starts compressing fails on it at once; the check of
        // the whole file before any work reports the missing block 8 instead.
        let mut z0 = z.clone();
        z0[[3, 5]] = f32::NAN;
        let views: Vec<_> = (0..12)
            .filter(|&b| b != 8)
            .map(|b| (b, if b == 0 { z0.view() } else { z.view() }))
            .collect();
        fips::format::mlp_inputs::write_mlp_inputs(&acts, &views, Dtype::F32, HashMap::new())
            .unwrap();
        let o = fips(&[
            &"compress",
            &"--checkpoint",
            &model,
            &"--activations",
            &acts,
            &"--steps",
            &"50",
            &"--batch-tokens",
            &"32",
            &"--no-eval",
            &"--out-dir",
            &dir.join("out"),
        ]);
        let stderr = refused(&o);
        assert!(
            stderr.contains("blocks.8.mlp_input") && !stderr.contains("non-finite"),
            "the file is checked before group 0 starts: {stderr}"
        );
    }
}
