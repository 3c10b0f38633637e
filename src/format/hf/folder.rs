//! A Hugging Face model folder: `config.json`, the safetensors weights (one file or shards with
//! an index), and the tokenizer files; and the densified copy of such a folder.
//!
//! ```no_run
//! use fips::format::hf::HfFolder;
//! use fips::format::layout::MlpLayout;
//! # fn main() -> fips::Result<()> {
//! let folder = HfFolder::open("models/llama")?;
//! let layout = folder.mlp_layout()?;          // blocks found across all shards
//! let block0 = layout.load_block::<f32>(folder.tensors(), 0, folder.activation()?)?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use ndarray::ArrayD;

use crate::format::checkpoint::{TensorData, TensorSource, write_safetensors_from};
use crate::format::compressed::CompressedModel;
use crate::format::hf::config::{HfConfig, ModelFamily, unknown_architecture};
use crate::format::hf::store::{ShardedCheckpoint, TensorStore};
use crate::format::layout::MlpLayout;
use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::model_error::ModelError;

/// The file name of a folder's configuration.
pub const CONFIG_FILE: &str = "config.json";
/// The file name of single-file weights.
pub const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
/// The file name of a shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The file name of a fast tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Weight files of other formats, never copied into a densified folder (they would hold the
/// original weights, and a loader could pick them instead of the densified safetensors).
const OTHER_WEIGHT_EXTENSIONS: [&str; 9] = [
    "bin",
    "pt",
    "pth",
    "ckpt",
    "h5",
    "msgpack",
    "onnx",
    "gguf",
    "safetensors",
];

/// An open model folder whose configuration and weight headers have been validated.
#[derive(Debug)]
pub struct HfFolder {
    dir: PathBuf,
    config: HfConfig,
    family: ModelFamily,
    weights: ShardedCheckpoint,
}

impl HfFolder {
    /// Opens `dir`: parses `config.json` and recognises the architecture, then opens
    /// `model.safetensors.index.json` and its shards, or else `model.safetensors`. Only JSON and
    /// the safetensors headers are read.
    ///
    /// Errors: [`ModelError::MissingConfig`], [`ModelError::UnknownArchitecture`],
    /// [`ModelError::MissingWeights`], [`ModelError::MissingShard`],
    /// [`ModelError::IndexMissingTensor`], and format errors of the files.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(FipsError::Io {
                path: dir,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
            });
        }
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(ModelError::MissingConfig { dir }.into());
        }
        let config = HfConfig::read(&config_path)?;
        let family =
            ModelFamily::detect(&config).map_err(|found| unknown_architecture(&dir, found))?;
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_WEIGHTS_FILE);
        let weights = if index.is_file() {
            ShardedCheckpoint::open_index(&index)?
        } else if single.is_file() {
            ShardedCheckpoint::single(&single)?
        } else {
            let seen = list_files(&dir);
            let hint = if seen
                .iter()
                .any(|f| f.ends_with(".bin") || f.ends_with(".pth"))
            {
                ": the weights are PyTorch pickles; save them as safetensors first \
                 (`model.save_pretrained(dir, safe_serialization=True)`)"
            } else {
                ""
            };
            return Err(ModelError::MissingWeights {
                dir,
                hint: hint.into(),
                seen: seen.join(", "),
            }
            .into());
        };
        Ok(Self {
            dir,
            config,
            family,
            weights,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &HfConfig {
        &self.config
    }

    /// The model family.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// The weights, across all shards.
    pub fn tensors(&self) -> &ShardedCheckpoint {
        &self.weights
    }

    /// The MLP activation `config.json` names.
    pub fn activation(&self) -> Result<Activation> {
        self.config.activation(self.family)
    }

    /// The files a run reads from the folder: `config.json`, the tokenizer (if any), the shard
    /// index (if any) and every shard — what an output must never replace.
    pub fn input_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.dir.join("config.json")];
        files.extend(self.tokenizer_file());
        files.extend(self.weights.index_file().map(Path::to_path_buf));
        files.extend(self.weights.shard_names().iter().map(|n| self.dir.join(n)));
        files
    }

    /// `tokenizer.json`, when the folder has one.
    pub fn tokenizer_file(&self) -> Option<PathBuf> {
        let path = self.dir.join(TOKENIZER_FILE);
        path.is_file().then_some(path)
    }

    /// The MLP blocks of the weights, checked against `config.json` (number of blocks, d, I).
    pub fn mlp_layout(&self) -> Result<MlpLayout> {
        let layout = MlpLayout::detect(&self.weights)?;
        let mismatch = |reason: String| -> FipsError {
            ModelError::ConfigMismatch {
                dir: self.dir.clone(),
                reason,
            }
            .into()
        };
        if layout.blocks() != self.config.num_hidden_layers {
            return Err(mismatch(format!(
                "num_hidden_layers is {} but the weights hold {} MLP blocks",
                self.config.num_hidden_layers,
                layout.blocks()
            )));
        }
        for block in layout.block_tensors() {
            if block.width != self.config.hidden_size
                || block.intermediate != self.config.intermediate_size
            {
                return Err(mismatch(format!(
                    "block {} has d = {}, I = {}; config.json says hidden_size {}, intermediate_size {}",
                    block.index,
                    block.width,
                    block.intermediate,
                    self.config.hidden_size,
                    self.config.intermediate_size
                )));
            }
        }
        Ok(layout)
    }

    /// Writes a copy of this folder at `dest` in which every tensor named in `replacements` is
    /// replaced (encoded in the original tensor's dtype, same shape) and every other tensor is
    /// copied byte for byte, shard by shard: the same shard files, the same index, and every
    /// other file of the folder (configuration, tokenizer, generation config, …) copied, so that a
    /// `from_pretrained` loader reads it unchanged. Weight files of other formats (`.bin`, other
    /// `.safetensors` files not in the weights, …) and subfolders are not copied; the report
    /// lists them.
    ///
    /// The folder is written in a temporary directory beside `dest` (in its parent) and renamed
    /// into place at the end, after syncing every file: a crash leaves no partial `dest`. An
    /// existing `dest` is an error ([`ModelError::DestinationExists`]) unless `overwrite`, in which
    /// case it is replaced after the new folder is complete. All replacements are checked against
    /// the weights (names, shapes) before anything is written.
    pub fn write_densified(
        &self,
        replacements: &BTreeMap<String, ArrayD<f32>>,
        note: &str,
        dest: impl AsRef<Path>,
        overwrite: bool,
    ) -> Result<DensifiedFolder> {
        let dest = dest.as_ref().to_path_buf();
        for (name, values) in replacements {
            let info = TensorStore::info(&self.weights, name)?;
            if info.shape != values.shape() {
                return Err(FipsError::ShapeMismatch {
                    what: format!("replacement for {name}"),
                    expected: info.shape.clone(),
                    got: values.shape().to_vec(),
                });
            }
        }
        if dest.exists() && !overwrite {
            return Err(ModelError::DestinationExists { path: dest }.into());
        }
        if same_dir(&dest, &self.dir) {
            return Err(FipsError::InvalidParameter {
                name: "dest",
                reason: format!(
                    "{} is the source folder itself; write the densified folder elsewhere",
                    dest.display()
                ),
            });
        }
        let (parent, name) = split_dest(&dest)?;
        let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        let result = self.fill_densified(replacements, note, &tmp);
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        sync_dir(&tmp);
        let swap = || -> Result<()> {
            if dest.exists() {
                let old = parent.join(format!(".{name}.{}.old", std::process::id()));
                std::fs::rename(&dest, &old).map_err(io(&dest))?;
                std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
                let removed = if old.is_dir() {
                    std::fs::remove_dir_all(&old)
                } else {
                    std::fs::remove_file(&old)
                };
                removed.map_err(io(&old))?;
            } else {
                std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
            }
            sync_dir(&parent);
            Ok(())
        };
        if let Err(e) = swap() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok(DensifiedFolder {
            dir: dest,
            ..report
        })
    }

    /// Writes the densified copy of this folder for a compressed model of it: every compressed MLP
    /// tensor replaced by its exact dense rebuild ([`CompressedModel::dense_tensors`]), as
    /// [`Self::write_densified`] describes.
    pub fn densify_compressed(
        &self,
        model: &CompressedModel,
        dest: impl AsRef<Path>,
        overwrite: bool,
    ) -> Result<DensifiedFolder> {
        let replacements = model.dense_tensors()?;
        let note = format!("{} compression", model.manifest.method);
        self.write_densified(&replacements, &note, dest, overwrite)
    }

    /// Writes the shards and copies the other files into `tmp`.
    fn fill_densified(
        &self,
        replacements: &BTreeMap<String, ArrayD<f32>>,
        note: &str,
        tmp: &Path,
    ) -> Result<DensifiedFolder> {
        let mut report = DensifiedFolder {
            dir: tmp.to_path_buf(),
            replaced: 0,
            shards: self.weights.shard_names().to_vec(),
            copied: Vec::new(),
            skipped: Vec::new(),
        };
        for (shard_name, shard) in self.weights.shard_names().iter().zip(self.weights.shards()) {
            let mut encoded = BTreeMap::new();
            for name in shard.names() {
                if let Some(values) = replacements.get(name)
                    && self
                        .weights
                        .shard_of(name)
                        .is_some_and(|at| self.weights.shard_names().get(at) == Some(shard_name))
                {
                    let info = shard.info(name)?;
                    let data = TensorData::from_floats(
                        values.iter().copied(),
                        info.shape.clone(),
                        info.dtype,
                    )?;
                    encoded.insert(name.to_string(), data);
                }
            }
            report.replaced += encoded.len();
            let sources = shard
                .names()
                .map(|n| {
                    let src = match encoded.get(n) {
                        Some(data) => TensorSource::Data(data),
                        None => TensorSource::Copy(shard, n),
                    };
                    (n.to_string(), src)
                })
                .collect();
            let mut metadata: HashMap<String, String> = shard.metadata().clone();
            if !encoded.is_empty() {
                metadata.insert(
                    "fips.densified".into(),
                    format!(
                        "{} tensors rebuilt{}{} by fips {}",
                        encoded.len(),
                        if note.is_empty() { "" } else { ": " },
                        note,
                        env!("CARGO_PKG_VERSION")
                    ),
                );
            }
            write_safetensors_from(tmp.join(shard_name), sources, metadata)?;
        }
        let entries = std::fs::read_dir(&self.dir).map_err(io(&self.dir))?;
        let mut names: Vec<(String, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        names.sort();
        for (file_name, path) in names {
            if self.weights.shard_names().contains(&file_name) {
                continue;
            }
            let is_index = self.weights.index_file().is_some_and(|i| {
                i.file_name().map(|f| f.to_string_lossy()) == Some((&file_name).into())
            });
            let extension = Path::new(&file_name)
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            let other_weights = OTHER_WEIGHT_EXTENSIONS.contains(&extension.as_str());
            let is_temporary = file_name.starts_with('.');
            if !path.is_file() || is_temporary || (other_weights && !is_index) {
                report.skipped.push(file_name);
                continue;
            }
            let target = tmp.join(&file_name);
            std::fs::copy(&path, &target).map_err(io(&path))?;
            File::open(&target)
                .and_then(|f| f.sync_all())
                .map_err(io(&target))?;
            report.copied.push(file_name);
        }
        Ok(report)
    }
}

/// What [`HfFolder::write_densified`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DensifiedFolder {
    /// The folder written.
    pub dir: PathBuf,
    /// Number of tensors replaced.
    pub replaced: usize,
    /// The shard files written (names as in the source).
    pub shards: Vec<String>,
    /// Other files copied unchanged (configuration, index, tokenizer, …).
    pub copied: Vec<String>,
    /// Entries not copied: weights of other formats, subfolders, hidden files.
    pub skipped: Vec<String>,
}

/// The regular files of `dir`, sorted.
fn list_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `(parent, file name)` of a destination path.
fn split_dest(dest: &Path) -> Result<(PathBuf, String)> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| FipsError::InvalidParameter {
            name: "dest",
            reason: format!("{} has no final component", dest.display()),
        })?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

/// Whether two paths name the same existing directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Syncs a directory's entries where the platform allows it.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FipsError + '_ {
    move |source| FipsError::Io {
        path: path.to_path_buf(),
        source,
    }
}
