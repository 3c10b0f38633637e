//! BERT-style encoders on the text path (issue 12, item 2): our candle forward matches
//! candle-transformers' `BertModel`, RoBERTa's position offset is honoured, and `fips compress
//! --model DIR --text FILE` captures and compresses an encoder end to end (no perplexity: an
//! encoder predicts no next token, which is a typed error).
//!
//! The model is a small random BERT written by the test (2 blocks, d = 32, I = 64, WordPiece
//! tokenizer of 44 tokens): no shared data needed.

#![cfg(feature = "text")]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fips::FipsError;
use fips::app::text::{TextModel, TextTokenizer};
use fips::format::checkpoint::{TensorData, write_safetensors};
use fips::format::hf::{HfFolder, ModelError, TensorStore};
use safetensors::Dtype;

const D: usize = 32;
const I: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const POSITIONS: usize = 40;
const WORDS: [&str; 40] = [
    "the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "and", "then", "it",
    "was", "happy", "sad", "big", "small", "red", "blue", "sun", "moon", "day", "night", "saw",
    "bird", "fish", "swam", "flew", "home", "went", "to", "park", "with", "friend", "play", "ball",
    "jumped", "over", "fence",
];

fn vocab_size() -> usize {
    4 + WORDS.len()
}

/// Deterministic values in about ±`scale` (a 64-bit LCG per tensor name).
fn values(name: &str, len: usize, scale: f32) -> Vec<f32> {
    let mut state = name.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| {
        h.wrapping_mul(0x100_0000_01b3).wrapping_add(u64::from(b))
    });
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The tensors of the model under `prefix` (`bert.`, `roberta.`), position rows shifted down by
/// `offset` (RoBERTa counts positions from `pad + 1`: row `offset + t` holds BERT's row `t`).
fn tensors(prefix: &str, offset: usize) -> BTreeMap<String, (Vec<f32>, Vec<usize>)> {
    let mut out = BTreeMap::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, shift: f32| {
        let len = shape.iter().product();
        // Values keyed by the name without its prefix: both folders hold the same model.
        let key = name.trim_start_matches(prefix).to_string();
        let v = values(&key, len, scale)
            .into_iter()
            .map(|x| x + shift)
            .collect();
        out.insert(name, (v, shape));
    };
    let e = format!("{prefix}embeddings");
    add(
        format!("{e}.word_embeddings.weight"),
        vec![vocab_size(), D],
        1.0,
        0.0,
    );
    add(
        format!("{e}.token_type_embeddings.weight"),
        vec![2, D],
        0.2,
        0.0,
    );
    add(format!("{e}.LayerNorm.weight"), vec![D], 0.1, 1.0);
    add(format!("{e}.LayerNorm.bias"), vec![D], 0.1, 0.0);
    for l in 0..LAYERS {
        let p = format!("{prefix}encoder.layer.{l}");
        for (name, out_dim, in_dim) in [
            ("attention.self.query", D, D),
            ("attention.self.key", D, D),
            ("attention.self.value", D, D),
            ("attention.output.dense", D, D),
            ("intermediate.dense", I, D),
            ("output.dense", D, I),
        ] {
            let scale = 1.0 / (in_dim as f32).sqrt();
            add(
                format!("{p}.{name}.weight"),
                vec![out_dim, in_dim],
                scale,
                0.0,
            );
            add(format!("{p}.{name}.bias"), vec![out_dim], 0.05, 0.0);
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{p}.{norm}.weight"), vec![D], 0.1, 1.0);
            add(format!("{p}.{norm}.bias"), vec![D], 0.1, 0.0);
        }
    }
    let positions = values("embeddings.position_embeddings.weight", POSITIONS * D, 0.5);
    let mut shifted = values("padding rows", offset * D, 0.5);
    shifted.extend(positions);
    out.insert(
        format!("{e}.position_embeddings.weight"),
        (shifted, vec![POSITIONS + offset, D]),
    );
    out
}

fn tokenizer_json() -> String {
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"];
    let vocab: serde_json::Map<String, serde_json::Value> = specials
        .iter()
        .chain(WORDS.iter())
        .enumerate()
        .map(|(i, w)| (w.to_string(), i.into()))
        .collect();
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, w)| {
            serde_json::json!({"id": i, "content": w, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true,
            "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": null,
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab}
    })
    .to_string()
}

/// Writes the model folder: `roberta` names it a RoBERTa (prefix `roberta.`, pad id 1, two
/// position rows before BERT's).
fn make_folder(dir: &Path, roberta: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let (prefix, arch, model_type, pad, offset) = if roberta {
        ("roberta.", "RobertaForMaskedLM", "roberta", 1, 2)
    } else {
        ("bert.", "BertForMaskedLM", "bert", 0, 0)
    };
    let config = serde_json::json!({
        "architectures": [arch], "model_type": model_type, "vocab_size": vocab_size(),
        "hidden_size": D, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "intermediate_size": I, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "max_position_embeddings": POSITIONS + offset, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": pad,
        "position_embedding_type": "absolute", "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json()).unwrap();
    let data: BTreeMap<String, TensorData> = tensors(prefix, offset)
        .into_iter()
        .map(|(n, (v, shape))| (n, TensorData::from_floats(v, shape, Dtype::F32).unwrap()))
        .collect();
    write_safetensors(dir.join("model.safetensors"), &data, HashMap::new()).unwrap();
}

/// `paragraphs` paragraphs of 4–15 words drawn from the vocabulary (seeded).
fn text(paragraphs: usize, seed: u64) -> String {
    let mut state = seed.wrapping_add(1);
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) as usize) % n
    };
    (0..paragraphs)
        .map(|_| {
            let len = 4 + next(12);
            (0..len)
                .map(|_| WORDS[next(WORDS.len())])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn scratch(tag: &str) -> PathBuf {
    common::scratch(&format!("bert-{tag}"))
}

fn last_hidden(model: &TextModel, ids: &[u32]) -> Vec<f32> {
    model
        .forward_hidden(ids, None, &mut |_, _| Ok(()))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_relative(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f32, |m, &x| m.max(x.abs())) as f64;
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs() as f64))
        / scale
}

#[test]
fn our_encoder_matches_candle_transformers_bert_and_honours_roberta_positions() {
    let root = scratch("forward");
    let (bert_dir, roberta_dir) = (root.join("bert"), root.join("roberta"));
    make_folder(&bert_dir, false);
    make_folder(&roberta_dir, true);
    let folder = HfFolder::open(&bert_dir).unwrap();
    let tokenizer = TextTokenizer::for_model(&folder).unwrap();
    let ids = tokenizer
        .encode_paragraph("The cat sat on the mat and then it saw a bird")
        .unwrap();
    // The tokenizer's own framing: [CLS] … [SEP], no extra BOS.
    assert_eq!(ids.first(), Some(&2));
    assert_eq!(ids.last(), Some(&3));
    assert_eq!(ids.len(), 14);
    let ours = TextModel::load(&folder, &BTreeMap::new()).unwrap();
    assert!(matches!(ours, TextModel::Encoder(_)));
    let mut inputs = Vec::new();
    let got = ours
        .forward_hidden(&ids, None, &mut |b, z| {
            inputs.push((b, z.dims().to_vec()));
            Ok(())
        })
        .unwrap();
    assert_eq!(inputs, vec![(0, vec![14, D]), (1, vec![14, D])]);
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();

    // candle-transformers' BertModel from the same tensors.
    let device = Device::Cpu;
    let tensors: HashMap<String, Tensor> = folder
        .tensors()
        .names()
        .map(|n| {
            let a: ndarray::ArrayD<f32> = folder.tensors().read(n).unwrap();
            let shape = a.shape().to_vec();
            (
                n.to_string(),
                Tensor::from_vec(a.into_raw_vec_and_offset().0, shape, &device).unwrap(),
            )
        })
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &device);
    let config: candle_transformers::models::bert::Config =
        serde_json::from_slice(&std::fs::read(bert_dir.join("config.json")).unwrap()).unwrap();
    let theirs = candle_transformers::models::bert::BertModel::load(vb, &config).unwrap();
    let input = Tensor::new(&ids[..], &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let reference: Vec<f32> = theirs
        .forward(&input, &input.zeros_like().unwrap(), None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let err = max_relative(&got, &reference);
    eprintln!("final hidden states vs candle-transformers BertModel: max relative error {err:.2e}");
    assert!(err < 1e-5, "{err}");

    // RoBERTa: the same model with positions counted from pad + 1 = 2.
    let roberta =
        TextModel::load(&HfFolder::open(&roberta_dir).unwrap(), &BTreeMap::new()).unwrap();
    assert_eq!(roberta.max_positions(), POSITIONS);
    let shifted = max_relative(&last_hidden(&roberta, &ids), &got);
    assert!(shifted < 1e-6, "{shifted}");
    std::fs::remove_dir_all(root).ok();
}

fn fips_bin(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fips"))
        .args(args)
        .env("OPENBLAS_NUM_THREADS", "1")
        .output()
        .unwrap()
}

#[cfg(feature = "cli")]
#[test]
fn an_encoder_is_captured_and_compressed_from_text_end_to_end() {
    let root = scratch("e2e");
    let model = root.join("bert");
    make_folder(&model, false);
    let calib = root.join("calib.txt");
    std::fs::write(&calib, text(120, 1)).unwrap();
    let eval = root.join("eval.txt");
    std::fs::write(&eval, text(10, 2)).unwrap();

    // Perplexity is not defined for an encoder: typed errors, before any work.
    let out = fips_bin(&[&"eval", &"--model", &model, &"--text", &eval]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("predicts no next token"), "{stderr}");
    let out_dir = root.join("out");
    let common_args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"compress",
        &"--model",
        &model,
        &"--text",
        &calib,
        &"--tokens",
        &"768",
        &"--steps",
        &"30",
        &"--batch-tokens",
        &"256",
        &"--group-size",
        &"2",
        &"--threads",
        &"1",
        &"--out-dir",
        &out_dir,
    ];
    let mut with_eval = common_args.clone();
    with_eval.extend([&"--eval-text" as &dyn AsRef<std::ffi::OsStr>, &eval]);
    let out = fips_bin(&with_eval);
    assert_eq!(out.status.code(), Some(1));
    assert!(!out_dir.exists(), "nothing written before the checks pass");

    let out = fips_bin(&common_args);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    let group = &report["groups"][0];
    let train = group["block_rel_error"].as_array().unwrap();
    let held = group["validation"]["block_rel_error"].as_array().unwrap();
    assert_eq!((train.len(), held.len()), (LAYERS, LAYERS));
    for e in train.iter().chain(held) {
        let e = e.as_f64().unwrap();
        assert!(e.is_finite() && e > 0.0 && e < 1.0, "{report}");
    }

    // The densified folder is the same encoder with its MLPs rebuilt: it loads, keeps every other
    // tensor, and its hidden states stay close to the dense model's.
    let dense_folder = HfFolder::open(&model).unwrap();
    let densified = HfFolder::open(out_dir.join("densified")).unwrap();
    let mut changed = 0;
    for name in dense_folder.tensors().names() {
        let a: ndarray::ArrayD<f32> = dense_folder.tensors().read(name).unwrap();
        let b: ndarray::ArrayD<f32> = densified.tensors().read(name).unwrap();
        assert_eq!(a.shape(), b.shape(), "{name}");
        if a != b {
            changed += 1;
            assert!(
                name.contains("intermediate.dense") || name.contains("output.dense"),
                "{name} changed"
            );
            assert!(!name.contains("attention"), "{name} changed");
        }
    }
    assert!(changed >= 2 * LAYERS, "the MLP weights were replaced");
    let tokenizer = TextTokenizer::for_model(&dense_folder).unwrap();
    let ids = tokenizer
        .encode_paragraph("the dog ran to the park with a friend")
        .unwrap();
    let dense = last_hidden(
        &TextModel::load(&dense_folder, &BTreeMap::new()).unwrap(),
        &ids,
    );
    let compressed = last_hidden(
        &TextModel::load(&densified, &BTreeMap::new()).unwrap(),
        &ids,
    );
    let err = max_relative(&compressed, &dense);
    assert!(err > 0.0 && err < 1.0, "{err}");
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn an_encoder_has_no_perplexity() {
    let root = scratch("ppl");
    let model = root.join("bert");
    make_folder(&model, false);
    let eval = root.join("eval.txt");
    std::fs::write(&eval, text(3, 5)).unwrap();
    let err =
        fips::app::text::perplexity(&model, &eval, &BTreeMap::new(), &mut |_, _| {}).unwrap_err();
    assert!(
        matches!(err, FipsError::Model(ModelError::Unsupported { .. })),
        "{err}"
    );
    std::fs::remove_dir_all(root).ok();
}

/// Issue 13 on the text path: `fips capture --out` naming a file of the model folder, and `fips
/// compress` whose densified output folder would hold the model, are refused before any work.
#[cfg(feature = "cli")]
#[test]
fn text_outputs_never_replace_the_model() {
    let root = scratch("clobber");
    let model = root.join("out").join("densified");
    make_folder(&model, false);
    let calib = root.join("calib.txt");
    std::fs::write(&calib, text(60, 3)).unwrap();
    let weights = model.join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    for target in [weights.clone(), model.join("config.json"), calib.clone()] {
        let out = fips_bin(&[
            &"capture",
            &"--model",
            &model,
            &"--text",
            &calib,
            &"--tokens",
            &"64",
            &"--out",
            &target,
        ]);
        assert_eq!(out.status.code(), Some(1), "{target:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("refusing") || stderr.contains("input"),
            "{stderr}"
        );
    }
    let out = fips_bin(&[
        &"compress",
        &"--model",
        &model,
        &"--text",
        &calib,
        &"--tokens",
        &"256",
        &"--steps",
        &"5",
        &"--batch-tokens",
        &"128",
        &"--out-dir",
        &root.join("out"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holds the input"), "{stderr}");
    assert_eq!(std::fs::read(&weights).unwrap(), before);
    assert!(!root.join("out").join(".fips-work").exists());
    std::fs::remove_dir_all(root).ok();
}
