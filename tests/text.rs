//! Text models end to end on `../shared/data/stories260k`: perplexity against the PyTorch figure,
//! captured MLP inputs against an independent ndarray forward pass, candle's own Llama against
//! ours, and the typed errors for bad text and tokenizers.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fips::FipsError;
use fips::app::text::capture::{CaptureOptions, capture_text};
use fips::app::text::model::LlamaModel;
use fips::app::text::perplexity::perplexity;
use fips::app::text::tokenize::{TextTokenizer, read_paragraph_tokens};
use fips::format::hf::{HfFolder, ModelError, TensorStore};
use fips::format::mlp_inputs::MlpInputs;
use ndarray::{Array1, Array2, ArrayD, Axis, s};

/// PyTorch/transformers float32 figures on `eval.txt` (shared data README).
const PYTORCH_PPL: f64 = 5.067;
const PYTORCH_TOKENS: usize = 38_943;

fn stories(test: &str) -> Option<PathBuf> {
    common::shared_data(test, "stories260k", &["model.safetensors", "eval.txt"])
}

fn scratch(tag: &str) -> PathBuf {
    common::scratch(&format!("text-{tag}"))
}

#[test]
fn stories260k_perplexity_matches_pytorch() {
    let Some(dir) = stories("stories260k_perplexity_matches_pytorch") else {
        return;
    };
    let ppl = perplexity(&dir, dir.join("eval.txt"), &BTreeMap::new(), &mut |_, _| {}).unwrap();
    eprintln!(
        "stories260k eval.txt: perplexity {:.4}, mean NLL {:.5} over {} tokens, {} paragraphs, {:.1} s",
        ppl.perplexity(),
        ppl.mean_nll(),
        ppl.predicted_tokens,
        ppl.paragraphs,
        ppl.seconds
    );
    assert_eq!(ppl.paragraphs, 400);
    assert_eq!(ppl.predicted_tokens, PYTORCH_TOKENS);
    assert_eq!(ppl.truncated, 0);
    assert!(
        (ppl.perplexity() / PYTORCH_PPL - 1.0).abs() < 0.005,
        "perplexity {} vs PyTorch {PYTORCH_PPL}",
        ppl.perplexity()
    );
}

/// RMSNorm of every row, times `g`.
fn rms_norm(x: &Array2<f64>, g: &Array1<f64>, eps: f64) -> Array2<f64> {
    let mut out = x.clone();
    for mut row in out.rows_mut() {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
        let scale = 1.0 / (ms + eps).sqrt();
        row.iter_mut().zip(g).for_each(|(v, gi)| *v *= scale * gi);
    }
    out
}

/// Rotate-half RoPE on `[T, heads·hd]`, in place.
fn rope(x: &mut Array2<f64>, heads: usize, hd: usize, theta: f64) {
    let half = hd / 2;
    for t in 0..x.nrows() {
        for h in 0..heads {
            for i in 0..half {
                let angle = t as f64 * theta.powf(-2.0 * i as f64 / hd as f64);
                let (c, s) = (angle.cos(), angle.sin());
                let a = x[[t, h * hd + i]];
                let b = x[[t, h * hd + i + half]];
                x[[t, h * hd + i]] = a * c - b * s;
                x[[t, h * hd + i + half]] = b * c + a * s;
            }
        }
    }
}

/// An independent Llama forward pass in f64 with ndarray: every block's MLP input `[T, d]`.
fn reference_mlp_inputs(folder: &HfFolder, ids: &[u32]) -> Vec<Array2<f64>> {
    let store = folder.tensors();
    let c = folder.config();
    let (heads, kv, hd) = (c.num_attention_heads, c.key_value_heads(), c.head_width());
    let eps = c.rms_norm_eps.unwrap();
    let theta = c.rope_base();
    let m = |n: &str| -> Array2<f64> { store.read_matrix::<f64>(n).unwrap() };
    let v = |n: &str| -> Array1<f64> { store.read_vector::<f64>(n).unwrap() };
    let embed = m("model.embed_tokens.weight");
    let t = ids.len();
    let mut h = Array2::from_shape_fn((t, c.hidden_size), |(i, j)| embed[[ids[i] as usize, j]]);
    let mut out = Vec::new();
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let a = rms_norm(&h, &v(&format!("{p}.input_layernorm.weight")), eps);
        let mut q = a.dot(&m(&format!("{p}.self_attn.q_proj.weight")).t());
        let mut k = a.dot(&m(&format!("{p}.self_attn.k_proj.weight")).t());
        let vv = a.dot(&m(&format!("{p}.self_attn.v_proj.weight")).t());
        rope(&mut q, heads, hd, theta);
        rope(&mut k, kv, hd, theta);
        let mut att = Array2::<f64>::zeros((t, heads * hd));
        for head in 0..heads {
            let g = head / (heads / kv);
            let qh = q.slice(s![.., head * hd..(head + 1) * hd]);
            let kh = k.slice(s![.., g * hd..(g + 1) * hd]);
            let vh = vv.slice(s![.., g * hd..(g + 1) * hd]);
            let mut scores = qh.dot(&kh.t()) / (hd as f64).sqrt();
            for i in 0..t {
                let row = scores.slice(s![i, ..=i]).to_owned();
                let max = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                let e = row.mapv(|x| (x - max).exp());
                let z = e.sum();
                for j in 0..t {
                    scores[[i, j]] = if j <= i { e[j] / z } else { 0.0 };
                }
            }
            att.slice_mut(s![.., head * hd..(head + 1) * hd])
                .assign(&scores.dot(&vh));
        }
        h = h + att.dot(&m(&format!("{p}.self_attn.o_proj.weight")).t());
        let z = rms_norm(&h, &v(&format!("{p}.post_attention_layernorm.weight")), eps);
        let gate = z.dot(&m(&format!("{p}.mlp.gate_proj.weight")).t());
        let up = z.dot(&m(&format!("{p}.mlp.up_proj.weight")).t());
        let act = gate.mapv(|x| x / (1.0 + (-x).exp())) * up;
        h = h + act.dot(&m(&format!("{p}.mlp.down_proj.weight")).t());
        out.push(z);
    }
    out
}

#[test]
fn captured_mlp_inputs_match_an_independent_forward() {
    let Some(dir) = stories("captured_mlp_inputs_match_an_independent_forward") else {
        return;
    };
    let tmp = scratch("capture");
    let out = tmp.join("inputs.safetensors");
    let budget = 700;
    let mut calls = 0;
    let report = capture_text(
        &dir,
        dir.join("calib.txt"),
        &CaptureOptions::new(budget, 11),
        &out,
        &mut |done, total| {
            calls += 1;
            assert!(done <= total);
        },
    )
    .unwrap();
    assert_eq!(
        (report.tokens, report.blocks, report.width),
        (budget, 5, 64)
    );
    assert_eq!(calls, report.paragraphs_used);
    // The README's count of calib.txt paragraphs.
    assert_eq!(report.paragraphs_available, 1500);
    let file = MlpInputs::open(&out).unwrap();
    assert_eq!(file.blocks(), vec![0, 1, 2, 3, 4]);
    let plan: Vec<(usize, usize)> = serde_json::from_str(&file.metadata()["paragraphs"]).unwrap();
    assert_eq!(plan.iter().map(|p| p.1).sum::<usize>(), budget);
    assert_eq!(plan.len(), report.paragraphs_used);

    let folder = HfFolder::open(&dir).unwrap();
    let tokenizer = TextTokenizer::for_model(&folder).unwrap();
    let paragraphs = read_paragraph_tokens(&tokenizer, &dir.join("calib.txt")).unwrap();
    let captured: Vec<Array2<f64>> = (0..5).map(|b| file.read::<f64>(b).unwrap()).collect();
    let mut row = 0;
    let mut worst: f64 = 0.0;
    for &(p, take) in &plan {
        let reference = reference_mlp_inputs(&folder, &paragraphs[p][..take]);
        for (b, r) in reference.iter().enumerate() {
            let got = captured[b].slice(s![row..row + take, ..]);
            let scale = r.iter().fold(0.0f64, |a, &x| a.max(x.abs()));
            let err = (&got - r).iter().fold(0.0f64, |a, &x| a.max(x.abs())) / scale;
            worst = worst.max(err);
        }
        row += take;
    }
    eprintln!("captured MLP inputs vs ndarray f64 reference: max relative error {worst:.2e}");
    assert!(worst < 1e-4, "max relative error {worst}");

    // The same seed gives the same file; another seed other paragraphs.
    let again = tmp.join("again.safetensors");
    capture_text(
        &dir,
        dir.join("calib.txt"),
        &CaptureOptions::new(budget, 11),
        &again,
        &mut |_, _| {},
    )
    .unwrap();
    let again = MlpInputs::open(&again).unwrap();
    assert_eq!(
        again.metadata()["paragraphs"],
        file.metadata()["paragraphs"]
    );
    for b in 0..5 {
        assert!(
            again.read::<f32>(b).unwrap() == file.read::<f32>(b).unwrap(),
            "block {b} differs"
        );
    }
    let other = tmp.join("other.safetensors");
    capture_text(
        &dir,
        dir.join("calib.txt"),
        &CaptureOptions::new(budget, 12),
        &other,
        &mut |_, _| {},
    )
    .unwrap();
    let other_plan: Vec<(usize, usize)> =
        serde_json::from_str(&MlpInputs::open(&other).unwrap().metadata()["paragraphs"]).unwrap();
    assert_ne!(other_plan, plan);
    // The file feeds compression directly.
    let calibration = file.calibration::<f32>(&[0, 1, 2, 3, 4]).unwrap();
    assert_eq!(calibration.blocks(), 5);
    std::fs::remove_dir_all(tmp).ok();
}

#[test]
fn our_forward_matches_candle_transformers_llama() {
    use candle_core::{DType, Device, Tensor};
    let Some(dir) = stories("our_forward_matches_candle_transformers_llama") else {
        return;
    };
    let folder = HfFolder::open(&dir).unwrap();
    let tokenizer = TextTokenizer::for_model(&folder).unwrap();
    let paragraphs = read_paragraph_tokens(&tokenizer, &dir.join("eval.txt")).unwrap();
    let ours = LlamaModel::load(&folder, &BTreeMap::new()).unwrap();

    // candle-transformers' Llama, built from the same tensors.
    let device = Device::Cpu;
    let tensors: std::collections::HashMap<String, Tensor> = folder
        .tensors()
        .names()
        .map(|n| {
            let a: ArrayD<f32> = folder.tensors().read(n).unwrap();
            let shape = a.shape().to_vec();
            (
                n.to_string(),
                Tensor::from_vec(a.into_raw_vec_and_offset().0, shape, &device).unwrap(),
            )
        })
        .collect();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &device);
    let config: candle_transformers::models::llama::LlamaConfig =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let config = config.into_config(false);
    let theirs = candle_transformers::models::llama::Llama::load(vb, &config).unwrap();
    let mut worst: f64 = 0.0;
    for ids in paragraphs.iter().take(6) {
        let t = ids.len().min(60);
        let mut cache =
            candle_transformers::models::llama::Cache::new(false, DType::F32, &config, &device)
                .unwrap();
        let input = Tensor::new(&ids[..t], &device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let reference: Vec<f32> = theirs
            .forward(&input, 0, &mut cache)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let logits = ours.forward_logits(&ids[..t], &mut |_, _| Ok(())).unwrap();
        let last: Vec<f32> = logits.get(t - 1).unwrap().to_vec1().unwrap();
        let scale = reference.iter().fold(0.0f32, |a, &x| a.max(x.abs())) as f64;
        let err = last
            .iter()
            .zip(&reference)
            .fold(0.0f64, |a, (x, y)| a.max((x - y).abs() as f64));
        worst = worst.max(err / scale);
    }
    eprintln!("last-position logits vs candle-transformers Llama: max relative error {worst:.2e}");
    assert!(worst < 1e-4, "{worst}");
}

#[test]
fn replaced_mlps_and_densified_folders_are_scored() {
    let Some(dir) = stories("replaced_mlps_and_densified_folders_are_scored") else {
        return;
    };
    // A short text keeps this test quick: the first 40 paragraphs of eval.txt.
    let tmp = scratch("replaced");
    let text: Vec<String> =
        fips::app::text::paragraphs(&std::fs::read_to_string(dir.join("eval.txt")).unwrap())
            .into_iter()
            .take(40)
            .collect();
    let short = tmp.join("short.txt");
    std::fs::write(&short, text.join("\n\n")).unwrap();
    let dense = perplexity(&dir, &short, &BTreeMap::new(), &mut |_, _| {}).unwrap();

    let folder = HfFolder::open(&dir).unwrap();
    let layout = folder.mlp_layout().unwrap();
    let mut same = BTreeMap::new();
    for block in layout.block_tensors() {
        for w in &block.weights {
            same.insert(w.clone(), folder.tensors().read::<f32>(w).unwrap());
        }
    }
    let identical = perplexity(&dir, &short, &same, &mut |_, _| {}).unwrap();
    assert_eq!(identical.total_nll, dense.total_nll);

    // Zeroing block 2's MLP changes the model: the perplexity rises.
    let down = &layout.block(2).unwrap().weights[2];
    let mut broken = BTreeMap::new();
    broken.insert(
        down.clone(),
        folder.tensors().read::<f32>(down).unwrap().mapv(|_| 0.0),
    );
    let worse = perplexity(&dir, &short, &broken, &mut |_, _| {}).unwrap();
    assert!(
        worse.perplexity() > dense.perplexity() * 1.01,
        "{} vs {}",
        worse.perplexity(),
        dense.perplexity()
    );

    // A densified folder with the same replacement scores the same as the replacement in memory.
    let densified = tmp.join("densified");
    folder
        .write_densified(&broken, "test", &densified, false)
        .unwrap();
    let from_folder = perplexity(&densified, &short, &BTreeMap::new(), &mut |_, _| {}).unwrap();
    assert_eq!(from_folder.total_nll, worse.total_nll);
    assert_eq!(from_folder.predicted_tokens, dense.predicted_tokens);
    let _ = Axis(0);
    std::fs::remove_dir_all(tmp).ok();
}

fn model_error<T: std::fmt::Debug>(r: Result<T, FipsError>) -> ModelError {
    match r {
        Err(FipsError::Model(e)) => e,
        other => panic!("expected a model error, got {other:?}"),
    }
}

#[test]
fn bad_text_and_tokenizers_are_typed_errors_and_write_nothing() {
    let Some(dir) = stories("bad_text_and_tokenizers_are_typed_errors_and_write_nothing") else {
        return;
    };
    let tmp = scratch("errors");
    let out = tmp.join("never.safetensors");
    let empty = tmp.join("empty.txt");
    std::fs::write(&empty, "\n\n   \n").unwrap();
    let opts = CaptureOptions::new(100, 0);
    assert!(matches!(
        model_error(capture_text(&dir, &empty, &opts, &out, &mut |_, _| {})),
        ModelError::EmptyText { .. }
    ));
    assert!(matches!(
        model_error(perplexity(&dir, &empty, &BTreeMap::new(), &mut |_, _| {})),
        ModelError::EmptyText { .. }
    ));
    let short = tmp.join("short.txt");
    std::fs::write(&short, "Once upon a time.\n\nThe end.").unwrap();
    match model_error(capture_text(&dir, &short, &opts, &out, &mut |_, _| {})) {
        ModelError::TextTooShort {
            available, budget, ..
        } => {
            assert!(available < 100);
            assert_eq!(budget, 100);
        }
        other => panic!("{other:?}"),
    }
    // A copy of the model whose vocabulary is smaller than its tokenizer's.
    let model = tmp.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(dir.join(f), model.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        model.join("config.json"),
        config.replace("\"vocab_size\": 512", "\"vocab_size\": 300"),
    )
    .unwrap();
    assert!(matches!(
        model_error(capture_text(
            &model,
            dir.join("calib.txt"),
            &opts,
            &out,
            &mut |_, _| {}
        )),
        ModelError::VocabularyMismatch {
            tokenizer_vocab: 512,
            model_vocab: 300,
            ..
        }
    ));
    // No tokenizer at all.
    std::fs::write(model.join("config.json"), &config).unwrap();
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    assert!(matches!(
        model_error(perplexity(
            &model,
            dir.join("eval.txt"),
            &BTreeMap::new(),
            &mut |_, _| {}
        )),
        ModelError::Tokenizer { .. }
    ));
    // An architecture without a text forward pass.
    std::fs::write(
        model.join("config.json"),
        config
            .replace("LlamaForCausalLM", "GemmaForCausalLM")
            .replace("\"llama\"", "\"gemma\""),
    )
    .unwrap();
    assert!(matches!(
        model_error(capture_text(
            &model,
            dir.join("calib.txt"),
            &opts,
            &out,
            &mut |_, _| {}
        )),
        ModelError::Unsupported { .. }
    ));
    assert!(!out.exists());
    let leftovers = std::fs::read_dir(&tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(leftovers, 0);
    std::fs::remove_dir_all(tmp).ok();
}

#[test]
fn text_capture_compression_and_scoring_end_to_end() {
    use fips::app::pipeline::{CalibrationSource, Silent, compress_checkpoint};
    use fips::format::block_groups::BlockGroups;
    use fips::{Budget, FipsParams, ParamGuard};
    let Some(dir) = stories("text_capture_compression_and_scoring_end_to_end") else {
        return;
    };
    let tmp = scratch("e2e");
    let inputs = tmp.join("calib.safetensors");
    capture_text(
        &dir,
        dir.join("calib.txt"),
        &CaptureOptions::new(4096, 1),
        &inputs,
        &mut |_, _| {},
    )
    .unwrap();
    let file = MlpInputs::open(&inputs).unwrap();
    let folder = HfFolder::open(&dir).unwrap();
    let layout = folder.mlp_layout().unwrap();
    let shapes: Vec<(usize, usize)> = layout
        .block_tensors()
        .iter()
        .map(|b| (b.width, b.intermediate))
        .collect();
    // All five blocks as one group, half the MLP weights, a short training run.
    let groups = BlockGroups::parse("0-4", &shapes).unwrap();
    let compressor = FipsParams::new()
        .budget(Budget::Fraction(0.5))
        .sparsity(0.75)
        .steps(60)
        .batch_tokens(512)
        .check()
        .unwrap();
    let result = compress_checkpoint(
        folder.tensors(),
        &layout,
        &groups,
        &compressor,
        folder.activation().unwrap(),
        &CalibrationSource::File(&file),
        &mut Silent,
    )
    .unwrap();
    let compressed_path = tmp.join("compressed.safetensors");
    result.model.write(&compressed_path).unwrap();
    let model = fips::format::compressed::CompressedModel::read(&compressed_path).unwrap();

    let text = tmp.join("eval-short.txt");
    let eval: Vec<String> =
        fips::app::text::paragraphs(&std::fs::read_to_string(dir.join("eval.txt")).unwrap())
            .into_iter()
            .take(30)
            .collect();
    std::fs::write(&text, eval.join("\n\n")).unwrap();
    let dense = perplexity(&dir, &text, &BTreeMap::new(), &mut |_, _| {}).unwrap();
    let replaced =
        perplexity(&dir, &text, &model.dense_tensors().unwrap(), &mut |_, _| {}).unwrap();
    let densified = tmp.join("densified");
    let report = folder
        .densify_compressed(&model, &densified, false)
        .unwrap();
    assert_eq!(report.replaced, 15);
    let from_folder = perplexity(&densified, &text, &BTreeMap::new(), &mut |_, _| {}).unwrap();
    eprintln!(
        "end to end (60 steps, p = 0.5, s = 0.75): dense {:.3}, compressed {:.3}",
        dense.perplexity(),
        replaced.perplexity()
    );
    assert!(replaced.perplexity().is_finite());
    assert!(replaced.perplexity() > dense.perplexity());
    // f32 rebuilds written as f32: the folder scores exactly as the in-memory replacement.
    assert_eq!(from_folder.total_nll, replaced.total_nll);
    std::fs::remove_dir_all(tmp).ok();
}

#[test]
fn a_sharded_copy_of_the_model_scores_and_captures_identically() {
    use fips::format::checkpoint::{Checkpoint, TensorSource, write_safetensors_from};
    let Some(dir) = stories("a_sharded_copy_of_the_model_scores_and_captures_identically") else {
        return;
    };
    let tmp = scratch("sharded");
    let sharded = tmp.join("model");
    std::fs::create_dir_all(&sharded).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), sharded.join(f)).unwrap();
    }
    // Three shards, tensors dealt round-robin (so one block's matrices land in different shards).
    let ck = Checkpoint::open(dir.join("model.safetensors")).unwrap();
    let names: Vec<String> = ck.names().map(str::to_string).collect();
    let shard_name = |s: usize| format!("model-{:05}-of-00003.safetensors", s + 1);
    let mut weight_map = serde_json::Map::new();
    for s in 0..3 {
        let sources = names
            .iter()
            .enumerate()
            .filter(|(k, _)| k % 3 == s)
            .map(|(_, n)| {
                weight_map.insert(n.clone(), shard_name(s).into());
                (n.clone(), TensorSource::Copy(&ck, n))
            })
            .collect();
        write_safetensors_from(sharded.join(shard_name(s)), sources, Default::default()).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    assert_eq!(
        HfFolder::open(&sharded)
            .unwrap()
            .tensors()
            .shard_names()
            .len(),
        3
    );
    let text: Vec<String> =
        fips::app::text::paragraphs(&std::fs::read_to_string(dir.join("eval.txt")).unwrap())
            .into_iter()
            .take(25)
            .collect();
    let short = tmp.join("short.txt");
    std::fs::write(&short, text.join("\n\n")).unwrap();
    let single = perplexity(&dir, &short, &BTreeMap::new(), &mut |_, _| {}).unwrap();
    let split = perplexity(&sharded, &short, &BTreeMap::new(), &mut |_, _| {}).unwrap();
    assert_eq!(single.total_nll, split.total_nll);
    let a = tmp.join("a.safetensors");
    let b = tmp.join("b.safetensors");
    let opts = CaptureOptions::new(300, 5);
    capture_text(&dir, &short, &opts, &a, &mut |_, _| {}).unwrap();
    capture_text(&sharded, &short, &opts, &b, &mut |_, _| {}).unwrap();
    let (a, b) = (MlpInputs::open(&a).unwrap(), MlpInputs::open(&b).unwrap());
    for block in 0..5 {
        assert!(a.read::<f32>(block).unwrap() == b.read::<f32>(block).unwrap());
    }
    std::fs::remove_dir_all(tmp).ok();
}

#[test]
fn compress_from_text_in_one_call_holds_out_validation_and_checks_first() {
    use fips::app::pipeline::Silent;
    use fips::app::text::compress::{TextCompressOptions, compress_text_model, validation_split};
    use fips::{Budget, FipsParams, ParamGuard};
    let Some(dir) = stories("compress_from_text_in_one_call_holds_out_validation_and_checks_first")
    else {
        return;
    };
    // The split: seeded, disjoint, complete, about the fraction asked for.
    let paragraphs: Vec<Vec<u32>> = (0..100u32).map(|k| vec![1, k + 3]).collect();
    let (train, held) = validation_split(paragraphs.clone(), 0.05, 7).unwrap();
    assert_eq!((train.len(), held.len()), (95, 5));
    let mut all: Vec<_> = train.iter().chain(&held).cloned().collect();
    all.sort();
    assert_eq!(all, paragraphs);
    assert_eq!(
        validation_split(paragraphs.clone(), 0.05, 7).unwrap().1,
        held
    );
    assert_ne!(validation_split(paragraphs, 0.05, 8).unwrap().1, held);

    let compressor = FipsParams::new()
        .budget(Budget::Fraction(0.5))
        .sparsity(0.75)
        .steps(40)
        .batch_tokens(512)
        .check()
        .unwrap();
    let calib = dir.join("calib.txt");
    let options = TextCompressOptions {
        tokens: Some(4096),
        seed: 3,
        validation_fraction: 0.05,
        calibration_memory: fips::format::mlp_inputs::DEFAULT_CALIBRATION_MEMORY,
        groups: Some("0-4".into()),
        group_size: 5,
        activation: None,
        densify: true,
        keep_calibration: false,
        work_dir: None,
        eval_text: None,
        resume: fips::app::run_dir::Resume::Auto,
    };
    // Bad input: typed errors and nothing written.
    let tmp = scratch("one-call");
    let out = tmp.join("out");
    let refused = |options: &TextCompressOptions, text: &Path| {
        compress_text_model(
            &dir,
            text,
            options,
            &compressor,
            &out,
            &mut |_, _| {},
            &mut Silent,
        )
        .unwrap_err()
    };
    let too_many = TextCompressOptions {
        tokens: Some(10_000_000),
        ..options.clone()
    };
    let err = refused(&too_many, &calib);
    assert!(
        matches!(err, FipsError::Model(ModelError::TextTooShort { .. })),
        "{err}"
    );
    let zero = TextCompressOptions {
        tokens: Some(0),
        ..options.clone()
    };
    let err = refused(&zero, &calib);
    assert!(
        matches!(err, FipsError::InvalidParameter { name: "tokens", .. }),
        "{err}"
    );
    // A batch larger than the token budget: refused before the capture.
    let small = TextCompressOptions {
        tokens: Some(256),
        ..options.clone()
    };
    let err = refused(&small, &calib);
    assert!(
        matches!(
            err,
            FipsError::BatchTooLarge {
                batch: 512,
                tokens: 256
            }
        ),
        "{err}"
    );
    let same = TextCompressOptions {
        eval_text: Some(calib.clone()),
        ..options.clone()
    };
    let err = refused(&same, &calib);
    assert!(
        matches!(
            err,
            FipsError::InvalidParameter {
                name: "eval_text",
                ..
            }
        ),
        "{err}"
    );
    let empty = tmp.join("empty.txt");
    std::fs::write(&empty, "\n\n  \n").unwrap();
    let err = refused(&options, &empty);
    assert!(
        matches!(err, FipsError::Model(ModelError::EmptyText { .. })),
        "{err}"
    );
    assert!(
        !out.exists(),
        "nothing may be written before the checks pass"
    );

    let result = compress_text_model(
        &dir,
        &calib,
        &options,
        &compressor,
        &out,
        &mut |_, _| {},
        &mut Silent,
    )
    .unwrap();
    assert_eq!(result.capture.tokens, 4096);
    let held = result.validation_capture.as_ref().unwrap();
    assert!(held.tokens > 0 && held.paragraphs_used == 75, "{held:?}");
    assert_eq!(result.train_errors.len(), 1);
    assert_eq!(result.train_errors[0].len(), 5);
    assert_eq!(result.validation_errors[0].len(), 5);
    for e in result.train_errors[0]
        .iter()
        .chain(&result.validation_errors[0])
    {
        assert!(e.is_finite() && *e > 0.0 && *e < 2.0, "{e}");
    }
    let (dense, compressed) = result.validation_perplexity.as_ref().unwrap();
    assert!(compressed.perplexity() > dense.perplexity());
    assert!(out.join("compressed.safetensors").is_file());
    assert!(out.join("densified").join("model.safetensors").is_file());
    assert!(
        !out.join(".fips-work").exists(),
        "the work area (calibration cache and parts) is removed"
    );
    fips::foundation::output_set::verify(&out).unwrap();
    // The written model is a compact (format 3) file with the run's groups.
    let model =
        fips::format::compact_file::CompactModel::read(out.join("compressed.safetensors"), None)
            .unwrap();
    assert_eq!(model.groups.len(), 1);
    assert_eq!(model.manifest.format_version, 3);
    std::fs::remove_dir_all(tmp).ok();
}
