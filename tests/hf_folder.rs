//! Hugging Face model folders: sharded and single-file weights, typed errors for broken folders,
//! densified copies that keep the shard layout, dtypes and side files.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use fips::format::checkpoint::{Checkpoint, TensorData, write_safetensors};
use fips::format::hf::{HfFolder, ModelError, ModelFamily, TensorStore};
use fips::format::layout::MlpLayout;
use fips::{Activation, FipsError, MlpKind};
use ndarray::{ArrayD, IxDyn};
use safetensors::Dtype;

const D: usize = 8;
const I: usize = 12;
const LAYERS: usize = 3;
const VOCAB: usize = 20;

/// A fresh, empty directory for one test.
fn scratch(tag: &str) -> PathBuf {
    common::scratch(&format!("hf-{tag}"))
}

fn config_json(arch: &str) -> String {
    format!(
        r#"{{"architectures": ["{arch}"], "model_type": "llama", "hidden_size": {D},
            "intermediate_size": {I}, "num_hidden_layers": {LAYERS}, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": {VOCAB}, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": false,
            "bos_token_id": 1, "eos_token_id": [2, 3], "torch_dtype": "bfloat16",
            "some_future_field": {{"x": 1}}}}"#
    )
}

/// Deterministic values for a tensor named `name`.
fn values(name: &str, len: usize) -> Vec<f32> {
    let seed = name
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (0..len)
        .map(|k| {
            ((seed.wrapping_add((k as u32).wrapping_mul(2_654_435_761)) >> 8) % 1000) as f32 / 500.0
                - 1.0
        })
        .collect()
}

/// Every tensor of the small Llama-style model: (name, shape).
fn tensor_list() -> Vec<(String, Vec<usize>)> {
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![VOCAB, D]),
        ("model.norm.weight".to_string(), vec![D]),
        ("lm_head.weight".to_string(), vec![VOCAB, D]),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![D]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![D]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![D, D]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![D / 2, D]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![D / 2, D]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![D, D]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![I, D]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![I, D]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![D, I]));
    }
    out
}

/// Which of `shards` shard files a tensor goes to: layers spread over the shards, so that one
/// block's matrices may sit in different shards.
fn shard_for(name: &str, k: usize, shards: usize) -> usize {
    if name.starts_with("lm_head") {
        shards - 1
    } else {
        k % shards
    }
}

/// Writes a model folder with `shards` shard files (1 = single `model.safetensors`) in bf16, with
/// config, tokenizer files and a stale PyTorch file; returns the tensors written.
fn make_folder(dir: &Path, shards: usize) -> BTreeMap<String, ArrayD<f32>> {
    std::fs::write(dir.join("config.json"), config_json("LlamaForCausalLM")).unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{\"version\": \"1.0\"}").unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        b"{\"bos_token\": \"<s>\"}",
    )
    .unwrap();
    std::fs::write(dir.join("generation_config.json"), b"{}").unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"stale pickle").unwrap();
    let mut all = BTreeMap::new();
    let mut per_shard: Vec<BTreeMap<String, TensorData>> = vec![BTreeMap::new(); shards];
    let mut weight_map = serde_json::Map::new();
    let names: Vec<String> = (1..=shards)
        .map(|s| {
            if shards == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{s:05}-of-{shards:05}.safetensors")
            }
        })
        .collect();
    for (k, (name, shape)) in tensor_list().into_iter().enumerate() {
        let len = shape.iter().product();
        let v = values(&name, len);
        // Round through bf16 so the expected values are exactly what the file holds.
        let v: Vec<f32> = v
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        let s = shard_for(&name, k, shards);
        per_shard[s].insert(
            name.clone(),
            TensorData::from_floats(v.iter().copied(), shape.clone(), Dtype::BF16).unwrap(),
        );
        weight_map.insert(name.clone(), names[s].clone().into());
        all.insert(name, ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap());
    }
    for (s, tensors) in per_shard.iter().enumerate() {
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(dir.join(&names[s]), tensors, meta).unwrap();
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {"total_size": 1234}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec_pretty(&index).unwrap(),
        )
        .unwrap();
    }
    all
}

fn model_error(r: Result<HfFolder, FipsError>) -> ModelError {
    match r {
        Err(FipsError::Model(e)) => e,
        other => panic!("expected a model-folder error, got {other:?}"),
    }
}

#[test]
fn sharded_folder_reads_config_and_blocks_across_shards() {
    let dir = scratch("sharded");
    let tensors = make_folder(&dir, 3);
    let folder = HfFolder::open(&dir).unwrap();
    let config = folder.config();
    assert_eq!(folder.family(), ModelFamily::Llama);
    assert_eq!((config.hidden_size, config.intermediate_size), (D, I));
    assert_eq!(
        (config.num_attention_heads, config.key_value_heads()),
        (2, 1)
    );
    assert_eq!(config.rope_base(), 500_000.0);
    assert_eq!(config.norm_eps(folder.family()), 1e-5);
    assert!(!config.tied_embeddings(folder.family()));
    assert_eq!(config.bos(), Some(1));
    assert_eq!(folder.activation().unwrap(), Activation::Silu);
    assert!(config.extra.contains_key("some_future_field"));
    assert_eq!(folder.tensors().shard_names().len(), 3);

    let layout = folder.mlp_layout().unwrap();
    assert_eq!(layout.blocks(), LAYERS);
    assert_eq!(layout.kind(), MlpKind::Gated);
    // Block 1's matrices are spread over several shards; each is read from its own.
    let shards_of_block: std::collections::BTreeSet<usize> = layout
        .block(1)
        .unwrap()
        .weights
        .iter()
        .map(|w| folder.tensors().shard_of(w).unwrap())
        .collect();
    assert!(
        shards_of_block.len() > 1,
        "the test folder should split a block over shards"
    );
    for b in 0..LAYERS {
        let mlp = layout
            .load_block::<f32>(folder.tensors(), b, Activation::Silu)
            .unwrap();
        for (layer, name) in mlp.layers().iter().zip(&layout.block(b).unwrap().weights) {
            assert_eq!(layer.weight().clone().into_dyn(), tensors[name], "{name}");
        }
    }
    // The same lookups as a single checkpoint: names, info, bytes.
    assert_eq!(folder.tensors().names().count(), tensors.len());
    let info = folder.tensors().info("lm_head.weight").unwrap();
    assert_eq!(
        (info.dtype, info.shape.clone()),
        (Dtype::BF16, vec![VOCAB, D])
    );
    assert!(matches!(
        folder.tensors().read::<f32>("nope"),
        Err(FipsError::MissingTensor { .. })
    ));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn single_file_folders_and_plain_checkpoints_keep_working() {
    let dir = scratch("single");
    let tensors = make_folder(&dir, 1);
    let folder = HfFolder::open(&dir).unwrap();
    assert!(folder.tensors().index_file().is_none());
    let layout = folder.mlp_layout().unwrap();
    // The file on its own gives the same layout through `Checkpoint`.
    let ck = Checkpoint::open(dir.join("model.safetensors")).unwrap();
    assert_eq!(MlpLayout::detect(&ck).unwrap(), layout);
    let w = layout.block(2).unwrap().weights[2].clone();
    assert_eq!(ck.read::<f32>(&w).unwrap(), tensors[&w]);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn broken_folders_are_typed_errors() {
    // No config.json.
    let dir = scratch("noconfig");
    make_folder(&dir, 2);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert!(matches!(
        model_error(HfFolder::open(&dir)),
        ModelError::MissingConfig { .. }
    ));

    // Unknown architecture.
    std::fs::write(dir.join("config.json"), config_json("MambaForCausalLM")).unwrap();
    match model_error(HfFolder::open(&dir)) {
        ModelError::UnknownArchitecture { found, .. } => assert_eq!(found, "MambaForCausalLM"),
        other => panic!("{other:?}"),
    }

    // A shard listed in the index is missing.
    std::fs::write(dir.join("config.json"), config_json("MistralForCausalLM")).unwrap();
    assert_eq!(HfFolder::open(&dir).unwrap().family(), ModelFamily::Mistral);
    std::fs::rename(
        dir.join("model-00002-of-00002.safetensors"),
        dir.join("moved"),
    )
    .unwrap();
    match model_error(HfFolder::open(&dir)) {
        ModelError::MissingShard { shard, .. } => {
            assert_eq!(shard, "model-00002-of-00002.safetensors")
        }
        other => panic!("{other:?}"),
    }
    std::fs::rename(
        dir.join("moved"),
        dir.join("model-00002-of-00002.safetensors"),
    )
    .unwrap();

    // The index points a tensor at a shard that does not hold it.
    let index_path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] =
        "model-00001-of-00002.safetensors".into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    match model_error(HfFolder::open(&dir)) {
        ModelError::IndexMissingTensor { tensor, shard, .. } => {
            assert_eq!(tensor, "model.layers.9.mlp.up_proj.weight");
            assert_eq!(shard, "model-00001-of-00002.safetensors");
        }
        other => panic!("{other:?}"),
    }
    // A shard name that leaves the folder is refused.
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "../elsewhere.safetensors".into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    assert!(matches!(
        HfFolder::open(&dir),
        Err(FipsError::Format { .. })
    ));

    // No weights at all, with a hint about PyTorch files.
    std::fs::remove_file(&index_path).unwrap();
    match model_error(HfFolder::open(&dir)) {
        ModelError::MissingWeights { hint, .. } => assert!(hint.contains("safetensors")),
        other => panic!("{other:?}"),
    }

    // config.json disagreeing with the weights.
    let dir2 = scratch("mismatch");
    make_folder(&dir2, 1);
    let wrong = config_json("LlamaForCausalLM")
        .replace("\"num_hidden_layers\": 3", "\"num_hidden_layers\": 4");
    std::fs::write(dir2.join("config.json"), wrong).unwrap();
    assert!(matches!(
        HfFolder::open(&dir2).unwrap().mlp_layout(),
        Err(FipsError::Model(ModelError::ConfigMismatch { .. }))
    ));
    // Unreadable config.json is a format error.
    std::fs::write(dir2.join("config.json"), b"{ not json").unwrap();
    assert!(matches!(
        HfFolder::open(&dir2),
        Err(FipsError::Format { .. })
    ));
    std::fs::remove_dir_all(dir).ok();
    std::fs::remove_dir_all(dir2).ok();
}

/// Each tensor of a file: dtype, shape and bytes.
type RawTensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// The tensors and metadata of one safetensors file, as the `safetensors` crate reads them.
fn raw_tensors(path: &Path) -> (RawTensors, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = parsed
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    (tensors, meta.metadata().clone().unwrap_or_default())
}

#[test]
fn densified_folder_keeps_shards_index_dtypes_and_side_files() {
    let root = scratch("densify");
    let src = root.join("model");
    std::fs::create_dir_all(&src).unwrap();
    let tensors = make_folder(&src, 3);
    let folder = HfFolder::open(&src).unwrap();
    let layout = folder.mlp_layout().unwrap();
    // Replace every MLP weight of blocks 0 and 2 by new values.
    let mut replacements = BTreeMap::new();
    for b in [0, 2] {
        for w in &layout.block(b).unwrap().weights {
            let shape = tensors[w].shape().to_vec();
            let v: Vec<f32> = values(&format!("new {w}"), shape.iter().product());
            replacements.insert(w.clone(), ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap());
        }
    }
    let dest = root.join("densified");
    let report = folder
        .write_densified(&replacements, "test", &dest, false)
        .unwrap();
    assert_eq!(report.replaced, replacements.len());
    assert_eq!(report.shards, folder.tensors().shard_names());
    assert!(report.skipped.contains(&"pytorch_model.bin".to_string()));
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(src.join(f)).unwrap(),
            std::fs::read(dest.join(f)).unwrap(),
            "{f}"
        );
    }
    // The index is copied byte for byte; no stale weights and no temporaries.
    assert_eq!(
        std::fs::read(src.join("model.safetensors.index.json")).unwrap(),
        std::fs::read(dest.join("model.safetensors.index.json")).unwrap()
    );
    assert!(!dest.join("pytorch_model.bin").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Shard by shard: the same tensor names, dtypes and shapes; replaced tensors hold the new values
    // in bf16, the others the original bytes.
    for shard in folder.tensors().shard_names() {
        let (before, meta_before) = raw_tensors(&src.join(shard));
        let (after, meta_after) = raw_tensors(&dest.join(shard));
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>()
        );
        assert_eq!(meta_after.get("format").map(String::as_str), Some("pt"));
        assert_eq!(meta_before.get("format"), meta_after.get("format"));
        for (name, (dtype, shape, bytes)) in &before {
            let (dtype2, shape2, bytes2) = &after[name];
            assert_eq!((dtype, shape), (dtype2, shape2), "{name}");
            match replacements.get(name) {
                Some(new) => {
                    let expected: Vec<u8> = new
                        .iter()
                        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                        .collect();
                    assert_eq!(bytes2, &expected, "{name}");
                }
                None => assert_eq!(bytes, bytes2, "{name}"),
            }
        }
    }
    // The result opens as a model folder again.
    let again = HfFolder::open(&dest).unwrap();
    assert_eq!(again.mlp_layout().unwrap(), layout);

    // An existing destination is refused unless overwriting; overwriting replaces it whole.
    assert!(matches!(
        folder.write_densified(&replacements, "", &dest, false),
        Err(FipsError::Model(ModelError::DestinationExists { .. }))
    ));
    folder
        .write_densified(&BTreeMap::new(), "", &dest, true)
        .unwrap();
    let (after, _) = raw_tensors(&dest.join(&folder.tensors().shard_names()[0]));
    let (before, _) = raw_tensors(&src.join(&folder.tensors().shard_names()[0]));
    assert_eq!(after, before);

    // Bad replacements fail before anything is written.
    let bad_dest = root.join("bad");
    let mut bad = replacements.clone();
    let first = bad.keys().next().unwrap().clone();
    bad.insert(first, ArrayD::zeros(IxDyn(&[2, 2])));
    assert!(matches!(
        folder.write_densified(&bad, "", &bad_dest, false),
        Err(FipsError::ShapeMismatch { .. })
    ));
    let mut unknown = BTreeMap::new();
    unknown.insert("no.such.tensor".to_string(), ArrayD::zeros(IxDyn(&[1])));
    assert!(matches!(
        folder.write_densified(&unknown, "", &bad_dest, false),
        Err(FipsError::MissingTensor { .. })
    ));
    assert!(!bad_dest.exists());
    // Writing over the source folder is refused.
    assert!(
        folder
            .write_densified(&BTreeMap::new(), "", &src, true)
            .is_err()
    );
    assert!(src.join("config.json").is_file());
    std::fs::remove_dir_all(root).ok();
}

/// `../shared/data/stories260k`, or `None` with a visible message.
fn stories(test: &str) -> Option<PathBuf> {
    common::shared_data(test, "stories260k", &["model.safetensors"])
}

#[test]
fn stories260k_folder_opens_and_densifies_to_identical_bytes() {
    let Some(dir) = stories("stories260k_folder_opens_and_densifies_to_identical_bytes") else {
        return;
    };
    let folder = HfFolder::open(&dir).unwrap();
    let config = folder.config();
    assert_eq!(folder.family(), ModelFamily::Llama);
    assert_eq!(
        (
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers
        ),
        (64, 172, 5)
    );
    assert_eq!(
        (
            config.num_attention_heads,
            config.key_value_heads(),
            config.head_width()
        ),
        (8, 4, 8)
    );
    assert!(config.tied_embeddings(folder.family()));
    assert_eq!(config.norm_eps(folder.family()), 1e-5);
    assert_eq!(folder.activation().unwrap(), Activation::Silu);
    let layout = folder.mlp_layout().unwrap();
    assert_eq!((layout.blocks(), layout.kind()), (5, MlpKind::Gated));
    assert_eq!(layout.prefix(), "model.");
    // Rewriting every MLP weight with its own values gives the same tensor bytes.
    let mut same = BTreeMap::new();
    for block in layout.block_tensors() {
        for w in &block.weights {
            same.insert(w.clone(), folder.tensors().read::<f32>(w).unwrap());
        }
    }
    let root = scratch("stories");
    let dest = root.join("stories-densified");
    let report = folder
        .write_densified(&same, "identity", &dest, false)
        .unwrap();
    assert_eq!(report.replaced, 15);
    let (before, _) = raw_tensors(&dir.join("model.safetensors"));
    let (after, meta) = raw_tensors(&dest.join("model.safetensors"));
    assert_eq!(before, after);
    assert!(meta.contains_key("fips.densified"));
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(dest.join(f).is_file(), "{f} copied");
    }
    std::fs::remove_dir_all(root).ok();
}
