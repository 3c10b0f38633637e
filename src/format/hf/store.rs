//! Tensor lookups over one safetensors file or over the shards of a Hugging Face index.
//!
//! [`TensorStore`] is what the layout detection and block loading need from a checkpoint: names,
//! descriptions, metadata and reads. [`Checkpoint`] implements it for one file;
//! [`ShardedCheckpoint`] implements it over the shards listed by a `model.safetensors.index.json`
//! (`{"metadata": {...}, "weight_map": {tensor name: shard file name}}`), so every tensor is read
//! from its own shard with a positioned read and nothing else is loaded.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, ArrayD};
use serde::Deserialize;

use crate::format::checkpoint::{Checkpoint, TensorInfo};
use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::Float;
use crate::foundation::model_error::ModelError;

/// Read access to named tensors, from one safetensors file or from several shards.
pub trait TensorStore {
    /// The file that names the tensors (the safetensors file, or the shard index).
    fn path(&self) -> &Path;

    /// Every tensor name, sorted.
    fn names(&self) -> impl Iterator<Item = &str>;

    /// One tensor's description ([`FipsError::MissingTensor`] when absent).
    fn info(&self, name: &str) -> Result<&TensorInfo>;

    /// Whether a tensor of that name exists.
    fn contains(&self, name: &str) -> bool {
        self.info(name).is_ok()
    }

    /// Free-form string metadata of the header(s).
    fn metadata(&self) -> &HashMap<String, String>;

    /// The raw little-endian bytes of one tensor.
    fn read_bytes(&self, name: &str) -> Result<Vec<u8>>;

    /// A floating-point tensor converted to `F`.
    fn read<F: Float>(&self, name: &str) -> Result<ArrayD<F>>;

    /// A floating-point matrix, checked to be 2-D.
    fn read_matrix<F: Float>(&self, name: &str) -> Result<Array2<F>> {
        let a = self.read::<F>(name)?;
        let shape = a.shape().to_vec();
        a.into_dimensionality()
            .map_err(|_| FipsError::ShapeMismatch {
                what: format!("tensor {name:?} (a matrix)"),
                expected: vec![0, 0],
                got: shape,
            })
    }

    /// A floating-point vector, checked to be 1-D.
    fn read_vector<F: Float>(&self, name: &str) -> Result<Array1<F>> {
        let a = self.read::<F>(name)?;
        let shape = a.shape().to_vec();
        a.into_dimensionality()
            .map_err(|_| FipsError::ShapeMismatch {
                what: format!("tensor {name:?} (a vector)"),
                expected: vec![0],
                got: shape,
            })
    }
}

impl TensorStore for Checkpoint {
    fn path(&self) -> &Path {
        Checkpoint::path(self)
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        Checkpoint::names(self)
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        Checkpoint::info(self, name)
    }

    fn metadata(&self) -> &HashMap<String, String> {
        Checkpoint::metadata(self)
    }

    fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        Checkpoint::read_bytes(self, name)
    }

    fn read<F: Float>(&self, name: &str) -> Result<ArrayD<F>> {
        Checkpoint::read(self, name)
    }
}

/// The JSON of a `model.safetensors.index.json`.
#[derive(Debug, Deserialize)]
struct IndexFile {
    #[serde(default)]
    metadata: HashMap<String, serde_json::Value>,
    weight_map: BTreeMap<String, String>,
}

/// The tensors of one or several safetensors files, addressed by name as one checkpoint.
#[derive(Debug)]
pub struct ShardedCheckpoint {
    path: PathBuf,
    index_file: Option<PathBuf>,
    shard_names: Vec<String>,
    shards: Vec<Checkpoint>,
    location: BTreeMap<String, usize>,
    metadata: HashMap<String, String>,
    index_metadata: HashMap<String, serde_json::Value>,
}

impl ShardedCheckpoint {
    /// One safetensors file, as a store of one shard.
    pub fn single(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let shard = Checkpoint::open(&path)?;
        let location = Checkpoint::names(&shard)
            .map(|n| (n.to_string(), 0))
            .collect();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self {
            metadata: Checkpoint::metadata(&shard).clone(),
            path,
            index_file: None,
            shard_names: vec![name],
            shards: vec![shard],
            location,
            index_metadata: HashMap::new(),
        })
    }

    /// The shards listed by an index file (`model.safetensors.index.json`), which must lie beside
    /// it. Every shard's header is validated and every tensor of the weight map looked up in its
    /// shard, so a missing shard ([`ModelError::MissingShard`]) or a tensor missing from its shard
    /// ([`ModelError::IndexMissingTensor`]) is reported here.
    pub fn open_index(index: impl AsRef<Path>) -> Result<Self> {
        let index = index.as_ref().to_path_buf();
        let format = |reason: String| FipsError::Format {
            path: index.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&index).map_err(|source| FipsError::Io {
            path: index.clone(),
            source,
        })?;
        let parsed: IndexFile = serde_json::from_str(&text)
            .map_err(|e| format(format!("unreadable shard index: {e}")))?;
        if parsed.weight_map.is_empty() {
            return Err(format("the weight map is empty".into()));
        }
        let dir = index.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut shard_names: Vec<String> = parsed.weight_map.values().cloned().collect();
        shard_names.sort();
        shard_names.dedup();
        for name in &shard_names {
            let plain = !name.is_empty()
                && Path::new(name).file_name().map(|f| f.to_string_lossy()) == Some(name.into())
                && name != ".."
                && name != ".";
            if !plain {
                return Err(format(format!(
                    "shard {name:?} is not a plain file name beside the index"
                )));
            }
        }
        for name in &shard_names {
            if !dir.join(name).is_file() {
                return Err(ModelError::MissingShard {
                    index: index.clone(),
                    shard: name.clone(),
                }
                .into());
            }
        }
        let shards = shard_names
            .iter()
            .map(|name| Checkpoint::open(dir.join(name)))
            .collect::<Result<Vec<_>>>()?;
        let mut location = BTreeMap::new();
        for (tensor, shard) in &parsed.weight_map {
            let at = shard_names
                .binary_search(shard)
                .map_err(|_| format(format!("internal: shard {shard:?} not in the shard list")))?;
            if !shards[at].contains(tensor) {
                return Err(ModelError::IndexMissingTensor {
                    index: index.clone(),
                    tensor: tensor.clone(),
                    shard: shard.clone(),
                }
                .into());
            }
            location.insert(tensor.clone(), at);
        }
        let mut metadata = HashMap::new();
        for shard in &shards {
            for (k, v) in Checkpoint::metadata(shard) {
                metadata.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        Ok(Self {
            path: index.clone(),
            index_file: Some(index),
            shard_names,
            shards,
            location,
            metadata,
            index_metadata: parsed.metadata,
        })
    }

    /// The index file, when the weights are sharded.
    pub fn index_file(&self) -> Option<&Path> {
        self.index_file.as_deref()
    }

    /// The shard file names, sorted (one entry for a single file).
    pub fn shard_names(&self) -> &[String] {
        &self.shard_names
    }

    /// The open shards, parallel to [`Self::shard_names`].
    pub fn shards(&self) -> &[Checkpoint] {
        &self.shards
    }

    /// The shard that holds `name` (its position in [`Self::shards`]).
    pub fn shard_of(&self, name: &str) -> Option<usize> {
        self.location.get(name).copied()
    }

    /// The index's own `metadata` object (`total_size`, …); empty for a single file.
    pub fn index_metadata(&self) -> &HashMap<String, serde_json::Value> {
        &self.index_metadata
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.location.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.location.is_empty()
    }

    fn shard_for(&self, name: &str) -> Result<&Checkpoint> {
        self.location
            .get(name)
            .and_then(|&at| self.shards.get(at))
            .ok_or_else(|| FipsError::MissingTensor {
                path: self.path.clone(),
                name: name.into(),
            })
    }
}

impl TensorStore for ShardedCheckpoint {
    fn path(&self) -> &Path {
        &self.path
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        Checkpoint::info(self.shard_for(name)?, name)
    }

    fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        Checkpoint::read_bytes(self.shard_for(name)?, name)
    }

    fn read<F: Float>(&self, name: &str) -> Result<ArrayD<F>> {
        Checkpoint::read(self.shard_for(name)?, name)
    }
}
