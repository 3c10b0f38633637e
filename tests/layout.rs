//! MLP layout detection on small synthetic checkpoints of every naming scheme, its errors, and on
//! the real DeiT-tiny checkpoint.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use fips::format::checkpoint::{Checkpoint, TensorData, write_safetensors};
use fips::{Activation, DenseMlp, FipsError, MlpKind, MlpLayout, NamingScheme};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use safetensors::Dtype;

/// Model width of the synthetic blocks.
const D: usize = 4;
/// MLP width of the synthetic blocks.
const I: usize = 8;

/// A directory under the system temp directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fips-layout-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A synthetic checkpoint under construction: the encoded tensors and the exact values drawn.
struct Synthetic {
    dtype: Dtype,
    rng: ChaCha8Rng,
    tensors: BTreeMap<String, TensorData>,
    values: BTreeMap<String, Vec<f64>>,
    metadata: HashMap<String, String>,
}

impl Synthetic {
    fn new(dtype: Dtype, seed: u64) -> Self {
        Self {
            dtype,
            rng: ChaCha8Rng::seed_from_u64(seed),
            tensors: BTreeMap::new(),
            values: BTreeMap::new(),
            metadata: HashMap::new(),
        }
    }

    /// A tensor of random values.
    fn add(&mut self, name: &str, shape: &[usize]) {
        let len = shape.iter().product();
        let values: Vec<f64> = (0..len)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        let data = TensorData::from_floats(values.iter().copied(), shape.to_vec(), self.dtype)
            .expect("encode tensor");
        self.tensors.insert(name.into(), data);
        self.values.insert(name.into(), values);
    }

    /// `{module}.weight` `[out, inp]` and, with `bias`, `{module}.bias` `[out]`.
    fn linear(&mut self, module: &str, out: usize, inp: usize, bias: bool) {
        self.add(&format!("{module}.weight"), &[out, inp]);
        if bias {
            self.add(&format!("{module}.bias"), &[out]);
        }
    }

    /// A standard MLP with biases: fc1 `[I, d]`, fc2 `[d, I]`.
    fn standard(&mut self, fc1: &str, fc2: &str) {
        self.linear(fc1, I, D, true);
        self.linear(fc2, D, I, true);
    }

    /// A gated MLP without biases under `{base}.gate_proj|up_proj|down_proj`.
    fn gated(&mut self, base: &str) {
        self.linear(&format!("{base}.gate_proj"), I, D, false);
        self.linear(&format!("{base}.up_proj"), I, D, false);
        self.linear(&format!("{base}.down_proj"), D, I, false);
    }

    fn remove(&mut self, name: &str) {
        self.tensors.remove(name);
        self.values.remove(name);
    }

    fn write(&self, dir: &TempDir, file: &str) -> Checkpoint {
        let path = dir.0.join(file);
        write_safetensors(&path, &self.tensors, self.metadata.clone()).expect("write checkpoint");
        Checkpoint::open(&path).expect("open checkpoint")
    }
}

/// timm names: `{prefix}blocks.{b}.mlp.fc1|fc2` plus attention, norms and head.
fn timm(dtype: Dtype, prefix: &str, blocks: usize) -> Synthetic {
    let mut s = Synthetic::new(dtype, 1);
    s.add(&format!("{prefix}cls_token"), &[1, 1, D]);
    s.add(&format!("{prefix}patch_embed.proj.weight"), &[D, 3, 2, 2]);
    for b in 0..blocks {
        let p = format!("{prefix}blocks.{b}");
        s.linear(&format!("{p}.attn.qkv"), 3 * D, D, true);
        s.linear(&format!("{p}.attn.proj"), D, D, true);
        s.add(&format!("{p}.norm1.weight"), &[D]);
        s.standard(&format!("{p}.mlp.fc1"), &format!("{p}.mlp.fc2"));
    }
    s.linear(&format!("{prefix}head"), 10, D, true);
    s
}

/// Hugging Face encoder names under `{prefix}encoder.layer.{b}`, with the attention output
/// projection `attention.output.dense` (`[d, d]`) that is not part of the MLP.
fn hf_encoder(dtype: Dtype, prefix: &str, blocks: usize) -> Synthetic {
    let mut s = Synthetic::new(dtype, 2);
    s.add(
        &format!("{prefix}embeddings.word_embeddings.weight"),
        &[16, D],
    );
    for b in 0..blocks {
        let p = format!("{prefix}encoder.layer.{b}");
        s.linear(&format!("{p}.attention.self.query"), D, D, true);
        s.linear(&format!("{p}.attention.output.dense"), D, D, true);
        s.add(&format!("{p}.attention.output.LayerNorm.weight"), &[D]);
        s.standard(
            &format!("{p}.intermediate.dense"),
            &format!("{p}.output.dense"),
        );
        s.add(&format!("{p}.output.LayerNorm.weight"), &[D]);
    }
    s.linear(&format!("{prefix}pooler.dense"), D, D, true);
    s
}

/// Llama-style names: `model.layers.{b}.mlp.*_proj` without biases, plus attention and norms.
fn llama(dtype: Dtype, blocks: usize) -> Synthetic {
    let mut s = Synthetic::new(dtype, 3);
    s.add("model.embed_tokens.weight", &[16, D]);
    for b in 0..blocks {
        let p = format!("model.layers.{b}");
        s.linear(&format!("{p}.self_attn.q_proj"), D, D, false);
        s.add(&format!("{p}.input_layernorm.weight"), &[D]);
        s.add(&format!("{p}.post_attention_layernorm.weight"), &[D]);
        s.gated(&format!("{p}.mlp"));
    }
    s.add("model.norm.weight", &[D]);
    s.add("lm_head.weight", &[16, D]);
    s
}

fn names(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

/// Writes `s` to a fresh file and returns the reason of the `FipsError::Format` its detection
/// must give.
fn format_error_of(s: &Synthetic, name: &str) -> String {
    let dir = TempDir::new(name);
    let ck = s.write(&dir, &format!("{name}.safetensors"));
    match MlpLayout::detect(&ck) {
        Err(FipsError::Format { reason, .. }) => reason,
        other => panic!("expected Format, got {other:?}"),
    }
}

/// Checks every block's loaded layers against the values written, within `rel` relative error.
fn assert_blocks_load(
    layout: &MlpLayout,
    ck: &Checkpoint,
    s: &Synthetic,
    act: Activation,
    rel: f64,
) {
    for b in 0..layout.blocks() {
        let block = layout.block(b).expect("block in range");
        let mlp: DenseMlp<f64> = layout.load_block(ck, b, act).expect("load block");
        assert_eq!(mlp.kind(), layout.kind());
        assert_eq!(mlp.activation(), act);
        assert_eq!(
            (mlp.width(), mlp.intermediate()),
            (block.width, block.intermediate)
        );
        let tensors = block.weights.iter().zip(&block.biases);
        for (layer, (weight, bias)) in mlp.layers().iter().zip(tensors) {
            assert_close(
                layer.weight().iter().copied(),
                &s.values[weight],
                rel,
                weight,
            );
            match (layer.bias(), bias) {
                (Some(loaded), Some(name)) => {
                    assert_close(loaded.iter().copied(), &s.values[name], rel, name)
                }
                (None, None) => {}
                _ => panic!(
                    "bias of {weight} loaded as {:?}, named {bias:?}",
                    layer.bias()
                ),
            }
        }
    }
}

fn assert_close(got: impl Iterator<Item = f64>, want: &[f64], rel: f64, what: &str) {
    let got: Vec<f64> = got.collect();
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * w.abs().max(1e-3),
            "{what}[{k}]: loaded {g}, wrote {w}"
        );
    }
}

#[test]
fn timm_f32() {
    let dir = TempDir::new("timm");
    let s = timm(Dtype::F32, "", 3);
    let ck = s.write(&dir, "timm.safetensors");
    let layout = MlpLayout::detect(&ck).expect("detect");
    assert_eq!(layout.scheme(), NamingScheme::Timm);
    assert_eq!(layout.prefix(), "");
    assert_eq!(layout.kind(), MlpKind::Standard);
    assert_eq!(layout.default_activation(), Activation::Gelu);
    assert_eq!(layout.blocks(), 3);
    for b in 0..3 {
        let block = layout.block(b).expect("block");
        assert_eq!(block.index, b);
        assert_eq!(
            (block.width, block.intermediate, block.dtype),
            (D, I, Dtype::F32)
        );
        assert_eq!(
            names(&block.weights),
            [
                format!("blocks.{b}.mlp.fc1.weight"),
                format!("blocks.{b}.mlp.fc2.weight")
            ]
        );
        assert_eq!(
            block.biases,
            [
                Some(format!("blocks.{b}.mlp.fc1.bias")),
                Some(format!("blocks.{b}.mlp.fc2.bias"))
            ]
        );
    }
    assert_eq!(layout.mlp_weight_count(), 3 * 2 * D * I);
    assert_blocks_load(&layout, &ck, &s, Activation::Gelu, 1e-6);
    let mlp = layout
        .load_block::<f32>(&ck, 2, Activation::Relu)
        .expect("f32 load");
    assert_eq!(mlp.layers()[1].weight().dim(), (D, I));
}

#[test]
fn timm_summary_reports_what_was_found() {
    let dir = TempDir::new("summary");
    let ck = timm(Dtype::F32, "model.", 2).write(&dir, "timm.safetensors");
    let layout = MlpLayout::detect(&ck).expect("detect");
    assert_eq!(layout.prefix(), "model.");
    assert_eq!(
        layout.block(1).expect("block").weights[0],
        "model.blocks.1.mlp.fc1.weight"
    );
    assert_eq!(
        layout.summary(),
        "timm ViT/DeiT MLP layout (prefix \"model.\"): 2 blocks of standard MLPs (fc1, fc2), \
         d = 4, I = 8, F32, default activation gelu, 128 MLP weights"
    );
    assert_eq!(layout.to_string(), layout.summary());
}

/// Checks what every Hugging Face encoder layout (BERT-style, ViT) must find in `hf_encoder`'s
/// file: `blocks` standard GELU MLPs under `{prefix}encoder.layer.{b}`, the attention's
/// `output.dense` left alone, every tensor in `dtype`.
fn assert_hf_encoder_layout(
    layout: &MlpLayout,
    scheme: NamingScheme,
    prefix: &str,
    blocks: usize,
    dtype: Dtype,
) {
    assert_eq!(layout.scheme(), scheme);
    assert_eq!(layout.prefix(), prefix);
    assert_eq!(layout.kind(), MlpKind::Standard);
    assert_eq!(layout.default_activation(), Activation::Gelu);
    assert_eq!(layout.blocks(), blocks);
    for b in 0..blocks {
        let block = layout.block(b).expect("block");
        let p = format!("{prefix}encoder.layer.{b}");
        assert_eq!(
            names(&block.weights),
            [
                format!("{p}.intermediate.dense.weight"),
                format!("{p}.output.dense.weight")
            ]
        );
        assert_eq!(
            block.biases,
            [
                Some(format!("{p}.intermediate.dense.bias")),
                Some(format!("{p}.output.dense.bias"))
            ]
        );
        assert!(block.weights.iter().all(|w| !w.contains("attention")));
        assert_eq!(
            (block.width, block.intermediate, block.dtype),
            (D, I, dtype)
        );
    }
    assert_eq!(layout.mlp_weight_count(), blocks * 2 * D * I);
}

#[test]
fn bert_with_prefix_skips_attention_output_dense() {
    let dir = TempDir::new("bert");
    let s = hf_encoder(Dtype::F32, "bert.", 2);
    let ck = s.write(&dir, "bert.safetensors");
    let layout = MlpLayout::detect(&ck).expect("detect");
    assert_hf_encoder_layout(&layout, NamingScheme::HfBert, "bert.", 2, Dtype::F32);
    assert_blocks_load(&layout, &ck, &s, Activation::Gelu, 1e-6);
}

#[test]
fn bert_without_prefix() {
    let dir = TempDir::new("bert-bare");
    let s = hf_encoder(Dtype::F64, "", 3);
    let ck = s.write(&dir, "bert.safetensors");
    let layout = MlpLayout::detect(&ck).expect("detect");
    assert_eq!(layout.scheme(), NamingScheme::HfBert);
    assert_eq!(layout.prefix(), "");
    assert_eq!(layout.blocks(), 3);
    let block = layout.block(2).expect("block");
    assert_eq!(
        names(&block.weights),
        [
            "encoder.layer.2.intermediate.dense.weight",
            "encoder.layer.2.output.dense.weight"
        ]
    );
    assert_eq!(
        (block.width, block.intermediate, block.dtype),
        (D, I, Dtype::F64)
    );
    assert_blocks_load(&layout, &ck, &s, Activation::Gelu, 0.0);
}

#[test]
fn roberta_prefix_is_bert_style() {
    let dir = TempDir::new("roberta");
    let ck = hf_encoder(Dtype::F32, "roberta.", 2).write(&dir, "roberta.safetensors");
    let layout = MlpLayout::detect(&ck).expect("detect");
    assert_eq!(layout.scheme(), NamingScheme::HfBert);
    assert_eq!(layout.prefix(), "roberta.");
    assert_eq!(layout.blocks(), 2);
}

#[test]
fn hf_vit_f16() {
    let dir = TempDir::new("hf-vit");
    let s = hf_encoder(Dtype::F16, "vit.", 2);
    let ck = s.write(&dir, "vit.safetensors");
    let layout = MlpLayout::detect(&ck).expect("detect");
    assert_hf_encoder_layout(&layout, NamingScheme::HfVit, "vit.", 2, Dtype::F16);
    assert!(layout.summary().contains("F16"));
    assert_blocks_load(&layout, &ck, &s, Activation::Gelu, 1e-3);
}

#[test]
fn llama_gated_bf16_without_biases() {
    let dir = TempDir::new("llama");
    let s = llama(Dtype::BF16, 3);
    let ck = s.write(&dir, "llama.safetensors");
    let layout = MlpLayout::detect(&ck).expect("detect");
    assert_eq!(layout.scheme(), NamingScheme::LlamaGated);
    assert_eq!(layout.prefix(), "model.");
    assert_eq!(layout.kind(), MlpKind::Gated);
    assert_eq!(layout.default_activation(), Activation::Silu);
    assert_eq!(layout.blocks(), 3);
    for b in 0..3 {
        let block = layout.block(b).expect("block");
        let p = format!("model.layers.{b}.mlp");
        assert_eq!(
            names(&block.weights),
            [
                format!("{p}.gate_proj.weight"),
                format!("{p}.up_proj.weight"),
                format!("{p}.down_proj.weight")
            ]
        );
        assert_eq!(block.biases, [None, None, None]);
        assert_eq!(
            (block.width, block.intermediate, block.dtype),
            (D, I, Dtype::BF16)
        );
    }
    assert_eq!(layout.mlp_weight_count(), 3 * 3 * D * I);
    assert_blocks_load(&layout, &ck, &s, Activation::Silu, 1e-2);
    // The caller may override the activation.
    assert_blocks_load(&layout, &ck, &s, Activation::GeluTanh, 1e-2);
}

#[test]
fn gemma_detected_by_pre_feedforward_norm() {
    let dir = TempDir::new("gemma");
    let mut s = llama(Dtype::BF16, 2);
    for b in 0..2 {
        s.add(
            &format!("model.layers.{b}.pre_feedforward_layernorm.weight"),
            &[D],
        );
        s.add(
            &format!("model.layers.{b}.post_feedforward_layernorm.weight"),
            &[D],
        );
    }
    let ck = s.write(&dir, "gemma.safetensors");
    let layout = MlpLayout::detect(&ck).expect("detect");
    assert_eq!(layout.scheme(), NamingScheme::LlamaGated);
    assert_eq!(layout.kind(), MlpKind::Gated);
    assert_eq!(layout.default_activation(), Activation::GeluTanh);
    assert_eq!(layout.blocks(), 2);
    assert!(layout.summary().contains("default activation gelu_tanh"));
    assert_blocks_load(&layout, &ck, &s, Activation::GeluTanh, 1e-2);
    let mlp = layout
        .load_block::<f32>(&ck, 1, Activation::Silu)
        .expect("override");
    assert_eq!(mlp.activation(), Activation::Silu);
}

#[test]
fn gemma_detected_by_metadata() {
    let dir = TempDir::new("gemma-meta");
    let mut s = llama(Dtype::F32, 2);
    s.metadata.insert("model_type".into(), "Gemma".into());
    let ck = s.write(&dir, "gemma.safetensors");
    let layout = MlpLayout::detect(&ck).expect("detect");
    assert_eq!(layout.default_activation(), Activation::GeluTanh);
}

#[test]
fn blocks_of_different_widths_are_allowed() {
    let dir = TempDir::new("widths");
    let mut s = timm(Dtype::F32, "", 2);
    s.linear("blocks.2.mlp.fc1", 2 * I, D, true);
    s.linear("blocks.2.mlp.fc2", D, 2 * I, true);
    let ck = s.write(&dir, "widths.safetensors");
    let layout = MlpLayout::detect(&ck).expect("detect");
    assert_eq!(layout.blocks(), 3);
    assert_eq!(layout.block(2).expect("block").intermediate, 2 * I);
    assert_eq!(layout.mlp_weight_count(), 2 * (2 * D * I) + 2 * D * 2 * I);
    assert!(
        layout.summary().contains("I = 8/16 (varies by block)"),
        "{layout}"
    );
    assert_blocks_load(&layout, &ck, &s, Activation::Gelu, 1e-6);
}

#[test]
fn block_index_out_of_range() {
    let dir = TempDir::new("range");
    let ck = timm(Dtype::F32, "", 2).write(&dir, "timm.safetensors");
    let layout = MlpLayout::detect(&ck).expect("detect");
    assert!(matches!(
        layout.block(2),
        Err(FipsError::IndexOutOfRange {
            index: 2,
            len: 2,
            ..
        })
    ));
    assert!(layout.load_block::<f64>(&ck, 5, Activation::Gelu).is_err());
}

#[test]
fn unknown_layout_summarises_names() {
    let dir = TempDir::new("unknown");
    let mut s = Synthetic::new(Dtype::F32, 4);
    s.add("foo.weight", &[2, 2]);
    let ck = s.write(&dir, "foo.safetensors");
    match MlpLayout::detect(&ck) {
        Err(FipsError::UnknownLayout { path, seen }) => {
            assert_eq!(path, ck.path());
            assert_eq!(seen, "1 tensor in 1 name pattern: foo.weight");
        }
        other => panic!("expected UnknownLayout, got {other:?}"),
    }
}

#[test]
fn unknown_layout_replaces_block_numbers() {
    let dir = TempDir::new("unknown-clip");
    let mut s = Synthetic::new(Dtype::F32, 5);
    for b in 0..3 {
        s.linear(
            &format!("vision_model.encoder.layers.{b}.mlp.fc1"),
            I,
            D,
            true,
        );
    }
    let ck = s.write(&dir, "clip.safetensors");
    let err = MlpLayout::detect(&ck).expect_err("unknown");
    let FipsError::UnknownLayout { seen, .. } = &err else {
        panic!("expected UnknownLayout, got {err:?}");
    };
    assert_eq!(
        seen,
        "6 tensors in 2 name patterns: vision_model.encoder.layers.{i}.mlp.fc1.bias (x3), \
         vision_model.encoder.layers.{i}.mlp.fc1.weight (x3)"
    );
    assert!(err.to_string().contains("no supported MLP layout"));
}

#[test]
fn empty_file_is_unknown_layout() {
    let dir = TempDir::new("empty");
    let ck = Synthetic::new(Dtype::F32, 6).write(&dir, "empty.safetensors");
    assert_eq!(ck.names().count(), 0);
    match MlpLayout::detect(&ck) {
        Err(FipsError::UnknownLayout { seen, .. }) => assert_eq!(seen, "no tensors"),
        other => panic!("expected UnknownLayout, got {other:?}"),
    }
}

#[test]
fn missing_fc2_is_a_format_error_naming_it() {
    let mut s = timm(Dtype::F32, "", 3);
    s.remove("blocks.1.mlp.fc2.weight");
    s.remove("blocks.1.mlp.fc2.bias");
    let reason = format_error_of(&s, "missing");
    assert!(reason.contains("block 1"), "{reason}");
    assert!(reason.contains("\"blocks.1.mlp.fc2.weight\""), "{reason}");
}

#[test]
fn missing_weight_with_its_bias_present_is_an_error() {
    let mut s = hf_encoder(Dtype::F32, "bert.", 2);
    s.remove("bert.encoder.layer.0.intermediate.dense.weight");
    let reason = format_error_of(&s, "bias-only");
    assert!(reason.contains("block 0"), "{reason}");
    assert!(
        reason.contains("bert.encoder.layer.0.intermediate.dense.weight"),
        "{reason}"
    );
}

#[test]
fn block_gap_is_a_format_error() {
    let mut s = llama(Dtype::F32, 2);
    s.gated("model.layers.3.mlp");
    let reason = format_error_of(&s, "gap");
    assert!(reason.contains("block 2 is missing"), "{reason}");
    assert!(
        reason.contains("model.layers.2.mlp.gate_proj.weight"),
        "{reason}"
    );
    assert!(reason.contains("blocks found: 0, 1, 3"), "{reason}");
}

#[test]
fn huge_block_number_is_a_gap_not_a_panic() {
    let mut s = timm(Dtype::F32, "", 2);
    s.standard(
        &format!("blocks.{}.mlp.fc1", usize::MAX),
        &format!("blocks.{}.mlp.fc2", usize::MAX),
    );
    let reason = format_error_of(&s, "huge");
    assert!(reason.contains("block 2 is missing"), "{reason}");
}

#[test]
fn wrongly_shaped_fc2_is_a_shape_mismatch() {
    let dir = TempDir::new("shape");
    let mut s = timm(Dtype::F32, "", 2);
    s.add("blocks.1.mlp.fc2.weight", &[D, I + 1]);
    let ck = s.write(&dir, "shape.safetensors");
    match MlpLayout::detect(&ck) {
        Err(FipsError::ShapeMismatch {
            what,
            expected,
            got,
        }) => {
            assert!(what.contains("\"blocks.1.mlp.fc2.weight\""), "{what}");
            assert_eq!(expected, [D, I]);
            assert_eq!(got, [D, I + 1]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn wrongly_shaped_bias_and_non_matrix_weight_are_shape_mismatches() {
    let dir = TempDir::new("bias-shape");
    let mut s = hf_encoder(Dtype::F32, "", 2);
    s.add("encoder.layer.0.output.dense.bias", &[I]);
    let ck = s.write(&dir, "bias.safetensors");
    match MlpLayout::detect(&ck) {
        Err(FipsError::ShapeMismatch {
            what,
            expected,
            got,
        }) => {
            assert!(
                what.contains("\"encoder.layer.0.output.dense.bias\""),
                "{what}"
            );
            assert_eq!((expected, got), (vec![D], vec![I]));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let mut s = llama(Dtype::F32, 1);
    s.add("model.layers.0.mlp.gate_proj.weight", &[I * D]);
    let ck = s.write(&dir, "vector.safetensors");
    match MlpLayout::detect(&ck) {
        Err(FipsError::ShapeMismatch { what, .. }) => {
            assert!(what.contains("gate_proj.weight"), "{what}")
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn integer_weights_are_unsupported() {
    let dir = TempDir::new("dtype");
    let mut s = timm(Dtype::F32, "", 1);
    let ints = TensorData::from_u32(&[0; D * I], vec![D, I]).expect("u32 tensor");
    s.tensors.insert("blocks.0.mlp.fc2.weight".into(), ints);
    let ck = s.write(&dir, "ints.safetensors");
    match MlpLayout::detect(&ck) {
        Err(FipsError::UnsupportedDtype { name, .. }) => {
            assert_eq!(name, "blocks.0.mlp.fc2.weight")
        }
        other => panic!("expected UnsupportedDtype, got {other:?}"),
    }
}

#[test]
fn two_prefixes_are_an_error() {
    let mut s = timm(Dtype::F32, "", 2);
    s.standard("model.blocks.2.mlp.fc1", "model.blocks.2.mlp.fc2");
    let reason = format_error_of(&s, "prefixes");
    assert!(reason.contains("several prefixes"), "{reason}");
    assert!(reason.contains("\"model.\""), "{reason}");
}

#[test]
fn two_schemes_are_an_error() {
    let mut s = timm(Dtype::F32, "", 2);
    s.gated("model.layers.0.mlp");
    let reason = format_error_of(&s, "schemes");
    assert!(reason.contains("several MLP layouts"), "{reason}");
    assert!(reason.contains("timm ViT/DeiT"), "{reason}");
    assert!(reason.contains("Llama-style gated"), "{reason}");
}

#[test]
fn deit_tiny_is_timm() {
    let Some(data) = common::data_dir("deit_tiny_is_timm") else {
        return;
    };
    let ck = Checkpoint::open(data.join("deit-tiny/model.safetensors")).expect("open DeiT-tiny");
    let layout = MlpLayout::detect(&ck).expect("detect");
    assert_eq!(layout.scheme(), NamingScheme::Timm);
    assert_eq!(layout.kind(), MlpKind::Standard);
    assert_eq!(layout.blocks(), 12);
    for block in layout.block_tensors() {
        assert_eq!(
            (block.width, block.intermediate, block.dtype),
            (192, 768, Dtype::F32)
        );
        assert!(block.biases.iter().all(Option::is_some));
    }
    assert_eq!(layout.mlp_weight_count(), 12 * 2 * 192 * 768);
    let last = layout
        .load_block::<f32>(&ck, 11, layout.default_activation())
        .expect("load");
    assert_eq!(last.layers()[0].weight().dim(), (768, 192));
    println!("{layout}");
}
