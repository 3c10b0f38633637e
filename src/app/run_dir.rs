//! Resumable runs, groups as independent jobs, and atomic output sets.
//!
//! **Work area.** A run keeps a work area (by default `OUT/.fips-work/`, or any `--work-dir`):
//!
//! - `settings.json`: everything that determines a group's result ([`RunSettings`]: the crate
//!   version, the checkpoint's name, length and XXH64 content fingerprint, the naming scheme, the
//!   method and all its parameters, the groups, the activation, the calibration data (fingerprint
//!   of the decoded calibration pixels and the ViT's heads, of the MLP-input file, of the
//!   calibration text with its token budget, seed and validation fraction, or the data-free
//!   token count and seed), the BLAS thread count, and the cores unless both thread
//!   counts are given) and its fingerprint;
//! - per finished group `g`: `group-{g}.safetensors` (a one-group compressed checkpoint: factors,
//!   biases and manifest entry) and then `group-{g}.json` (the settings fingerprint, the group's
//!   blocks, the fingerprint of the `.safetensors`, the calibration time and the method's report).
//!   Each is written atomically ([`safe_io`](crate::foundation::safe_io)), the `.json` last, so a
//!   part is there whole or not at all.
//!
//! A run with the same settings reuses every part whose record checks out and computes only the
//! others; a run with other settings refuses ([`FipsError::WorkArea`], naming what differs) unless
//! asked to start afresh ([`Resume::Fresh`]). Groups depend on nothing but the settings (see
//! [`compress_group`]), and the outputs are always assembled from the parts read back from disk,
//! so a resumed or scattered run writes the same bytes as an uninterrupted one.
//!
//! **Scale-out.** [`compress_parts`] with `only = Some(k)` runs one group into a shared work area
//! (a Slurm array task, a Ray task, a Kubernetes job); [`WorkArea::assemble`] builds the model once
//! every part is there and names the missing ones otherwise ([`FipsError::MissingParts`]).
//!
//! **Output set.** [`write_outputs`] stages the compressed file, the densified checkpoint, the
//! loss plots and `report.json` in a staging directory inside the output directory and installs
//! them as one set ([`output_set`](crate::foundation::output_set): a manifest `fips-set.json`
//! removed first and written last, killed commits rolled forward by the next run).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::app::pipeline::{
    CalibrationSource, GroupResult, ModelCompression, Observer, Validation, assemble,
    compress_group,
};
use crate::app::report::{Evaluation, RunReport};
use crate::format::block_groups::BlockGroups;
use crate::format::checkpoint::Checkpoint;
use crate::format::compact_file::CompactModel;
use crate::format::compressed::{CompressedModel, Manifest};
use crate::format::hf::store::TensorStore;
use crate::format::layout::MlpLayout;
use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::fingerprint;
use crate::foundation::output_set::StagedSet;
use crate::foundation::safe_io::{TEMP_SUFFIX, write_atomically};
use crate::math::validation::holdout;
use crate::methods::{Compressor, MethodParams, MethodReport};

/// The work area inside an output directory by default.
pub const WORK_DIR: &str = ".fips-work";
/// The settings record of a work area.
pub const SETTINGS_FILE: &str = "settings.json";
/// The `format` field of a settings record.
pub const WORK_FORMAT: &str = "fips-work-area";
/// The file name of the compressed checkpoint of a run.
pub const COMPRESSED_FILE: &str = "compressed.safetensors";
/// The file name of the densified checkpoint of a run.
pub const DENSIFIED_FILE: &str = "densified.safetensors";
/// The file name of a run's report.
pub const REPORT_FILE: &str = "report.json";

/// Whether `name` is a file `fips compress` writes into its output directory (the members of its
/// output set: compressed and densified checkpoints, `report.json`, `loss_group{g}.svg`).
pub fn is_run_output(name: &str) -> bool {
    let plot = name
        .strip_prefix("loss_group")
        .and_then(|r| r.strip_suffix(".svg"))
        .is_some_and(|g| !g.is_empty() && g.chars().all(|c| c.is_ascii_digit()));
    plot || [COMPRESSED_FILE, DENSIFIED_FILE, REPORT_FILE].contains(&name)
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> FipsError + '_ {
    move |source| FipsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An input file as a run's settings know it: its name, length and content fingerprint (not its
/// directory or time stamps, so copies on other machines match).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    /// The file name (the compressed file's manifest records it).
    pub name: String,
    /// Its length in bytes.
    pub bytes: u64,
    /// XXH64 of its content, 16 hex digits.
    pub fingerprint: String,
}

impl InputFile {
    /// Reads and fingerprints `path`.
    pub fn of(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let (fingerprint, bytes) = fingerprint::of_file(path)?;
        Ok(Self {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes,
            fingerprint,
        })
    }
}

/// Where the calibration activations come from, as far as it determines the result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case")]
pub enum CalibrationSettings {
    /// Captured by the ViT on decoded images.
    Images {
        /// Number of images.
        images: usize,
        /// XXH64 of the decoded `[n, 224, 224, 3]` pixels.
        pixels: String,
        /// The ViT's attention heads.
        heads: usize,
        /// Weight of the class tokens among the training tokens (absent in settings written
        /// before it existed, which all used 1).
        #[serde(default = "one", skip_serializing_if = "is_one")]
        class_token_weight: usize,
    },
    /// Read from an MLP-input file.
    File {
        /// The file.
        file: InputFile,
    },
    /// Captured from a text by the language model being compressed (into [`CAPTURE_FILES`] of
    /// the work area); the model itself is the run's checkpoint.
    Text {
        /// The calibration text.
        text: InputFile,
        /// Calibration tokens per block.
        tokens: usize,
        /// Seed of the paragraph order and of the validation split.
        seed: u64,
        /// Fraction of the paragraphs held out for validation.
        validation_fraction: f64,
    },
    /// Data-free Gaussian inputs.
    Gaussian {
        /// Tokens per block.
        tokens: usize,
        /// The seed of the draw.
        seed: u64,
    },
}

impl CalibrationSettings {
    /// The settings of `source`; `file` is the MLP-input file's path for
    /// [`CalibrationSource::File`].
    pub fn of(source: &CalibrationSource<'_>, file: Option<&Path>) -> Result<Self> {
        Ok(match *source {
            CalibrationSource::Images {
                vit,
                pixels,
                class_token_weight,
                ..
            } => {
                let mut f = fingerprint::Fingerprint::new();
                match pixels.as_slice() {
                    Some(bytes) => f.update(bytes),
                    None => f.update(&pixels.iter().copied().collect::<Vec<u8>>()),
                }
                Self::Images {
                    images: pixels.shape()[0],
                    pixels: f.hex(),
                    heads: vit.config().heads,
                    class_token_weight,
                }
            }
            CalibrationSource::File(_) => Self::File {
                file: InputFile::of(file.ok_or_else(|| FipsError::InvalidParameter {
                    name: "activations",
                    reason: "the MLP-input file's path is needed for the run's settings".into(),
                })?)?,
            },
            CalibrationSource::Gaussian { tokens, seed } => Self::Gaussian { tokens, seed },
        })
    }
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// The held-out validation tokens of a run: a seeded fraction of each group's calibration tokens
/// ([`Validation::Holdout`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HoldoutSettings {
    /// Fraction of the tokens held out, in (0, 1).
    pub fraction: f64,
    /// Seed of the draw.
    pub seed: u64,
    /// Whole images held out (image calibration); absent in settings written before images
    /// were held out whole, whose split was by tokens, so such a work area is not reused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whole_images: bool,
}

impl HoldoutSettings {
    /// The settings of `validation` of the tokens `calibration` gives (whole images held out
    /// from images); a held-out source of its own cannot be fingerprinted here.
    pub fn of(
        validation: &Validation<'_>,
        calibration: &CalibrationSettings,
    ) -> Result<Option<Self>> {
        match *validation {
            Validation::None => Ok(None),
            Validation::Holdout { fraction, seed } => Ok(Some(Self {
                fraction,
                seed,
                whole_images: matches!(calibration, CalibrationSettings::Images { .. }),
            })),
            Validation::Source(_) => Err(FipsError::InvalidParameter {
                name: "validation",
                reason: "a resumable run holds out a fraction of its calibration tokens; \
                         a separate validation source is not supported here"
                    .into(),
            }),
        }
    }

    /// `(training, held out)` of `images` calibration images: with whole images held out, the
    /// images whose tokens [`holdout_runs`](crate::math::validation::holdout_runs) holds out
    /// (the same seeded draw over the images); otherwise every image for training.
    pub fn image_split(&self, images: usize) -> Result<(Vec<usize>, Vec<usize>)> {
        if self.whole_images {
            holdout(images, self.fraction, self.seed)
        } else {
            Ok(((0..images).collect(), Vec::new()))
        }
    }

    /// The pipeline's form of `settings`.
    pub fn validation(settings: Option<Self>) -> Validation<'static> {
        settings.map_or(Validation::None, |h| Validation::Holdout {
            fraction: h.fraction,
            seed: h.seed,
        })
    }
}

/// Everything that determines the parts of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// The crate version.
    pub fips_version: String,
    /// The checkpoint.
    pub checkpoint: InputFile,
    /// Its MLP naming scheme.
    pub scheme: String,
    /// The method's settings (every parameter, defaults included).
    pub parameters: serde_json::Value,
    /// The groups, as block lists.
    pub groups: Vec<Vec<usize>>,
    /// The MLP activation.
    pub activation: Activation,
    /// The calibration data.
    pub calibration: CalibrationSettings,
    /// The held-out validation tokens (`null`: none).
    pub validation: Option<HoldoutSettings>,
    /// The cores the process may use, where they matter: when the method's `threads` or the
    /// BLAS thread count is left to default to them (`null` when both are given, so nodes with
    /// other core counts still match).
    pub cores: Option<usize>,
    /// The BLAS thread count from the environment (`null`: the backend's default).
    pub blas_threads: Option<usize>,
}

impl RunSettings {
    /// The settings of compressing `checkpoint` (at `checkpoint_path`) with `compressor`.
    pub fn new(
        checkpoint_path: &Path,
        layout: &MlpLayout,
        compressor: &dyn Compressor<f32>,
        groups: &BlockGroups,
        activation: Activation,
        calibration: CalibrationSettings,
        validation: &Validation<'_>,
    ) -> Result<Self> {
        let parameters = serde_json::to_value(compressor.parameters())
            .map_err(|e| FipsError::Numerical(format!("cannot serialise the parameters: {e}")))?;
        let blas_threads = crate::foundation::blas::configured_threads();
        let threads_given = parameters.get("threads").is_some_and(|t| t.is_u64());
        let cores = (!threads_given || blas_threads.is_none())
            .then(crate::foundation::thread_plan::available_threads);
        let validation = HoldoutSettings::of(validation, &calibration)?;
        Ok(Self {
            fips_version: env!("CARGO_PKG_VERSION").into(),
            checkpoint: InputFile::of(checkpoint_path)?,
            scheme: layout.scheme().to_string(),
            parameters,
            groups: groups.groups().to_vec(),
            activation,
            calibration,
            validation,
            cores,
            blas_threads,
        })
    }

    /// XXH64 of the settings' JSON (keys in a fixed order).
    pub fn fingerprint(&self) -> Result<String> {
        let text = serde_json::to_vec(self).map_err(|e| FipsError::Numerical(e.to_string()))?;
        Ok(fingerprint::of_bytes(&text))
    }

    /// `(training, held out)` of `images` calibration images
    /// ([`HoldoutSettings::image_split`]; every image for training without a validation split).
    pub fn held_out_images(&self, images: usize) -> Result<(Vec<usize>, Vec<usize>)> {
        match self.validation {
            Some(h) => h.image_split(images),
            None => Ok(((0..images).collect(), Vec::new())),
        }
    }

    /// The method's typed settings.
    pub fn method_params(&self) -> Result<MethodParams> {
        serde_json::from_value(self.parameters.clone()).map_err(|e| FipsError::InvalidParameter {
            name: "parameters",
            reason: format!("unreadable method settings: {e}"),
        })
    }

    /// The compressed file's manifest without groups, as [`model_manifest`] makes it.
    ///
    /// [`model_manifest`]: crate::app::pipeline::model_manifest
    pub fn base_manifest(&self) -> Result<Manifest> {
        let method = self.method_params()?.method();
        let mut manifest = Manifest::with_parameters(method.name(), self.parameters.clone());
        manifest.source = Some(self.checkpoint.name.clone());
        manifest.scheme = Some(self.scheme.clone());
        manifest.data_free = matches!(self.calibration, CalibrationSettings::Gaussian { .. });
        manifest.blas_threads = self.blas_threads;
        Ok(manifest)
    }
}

/// What a run records beside its settings without comparing it: how to find its inputs again,
/// and what follows the parts (`fips assemble` does the same).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunContext {
    /// The checkpoint's path as given (`fips assemble` opens it unless told otherwise).
    pub checkpoint: String,
    /// The calibration text's path as given, on the text path (`None` elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The image set and its calibration split, on the image path (`None` elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<ImageSetContext>,
    /// The settings of the end-to-end distillation that follows the parts (`None`: none).
    /// Not compared with an existing work area's: the parts do not depend on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distillation: Option<serde_json::Value>,
}

/// Where a run's calibration images are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSetContext {
    /// The image set's directory as given.
    pub dir: String,
    /// Its calibration split.
    pub calib_split: String,
}

/// The content of `settings.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SettingsRecord {
    format: String,
    fingerprint: String,
    settings: RunSettings,
    context: RunContext,
}

/// The record of a finished group, `group-{g}.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PartRecord {
    settings: String,
    group: usize,
    blocks: Vec<usize>,
    factors: InputFile,
    calibration_seconds: f64,
    report: MethodReport,
}

/// What to do with a work area that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resume {
    /// Reuse its parts if its settings are this run's; refuse otherwise; start one if none.
    #[default]
    Auto,
    /// As `Auto`, but there must be one to resume.
    Require,
    /// Discard whatever is there and start afresh.
    Fresh,
}

/// The paths of key `a.b` where two JSON values differ (objects compared key by key).
fn differences(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let null = serde_json::Value::Null;
                differences(
                    &sub,
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("{path}: {a} -> {b}")),
        _ => {}
    }
}

/// The files a text run captures into its work area: the calibration and the held-out MLP
/// inputs, and their record (written last).
pub const CAPTURE_FILES: [&str; 3] = [
    "calibration.safetensors",
    "validation.safetensors",
    "capture.json",
];

/// The files of the model distilled end to end from a run's parts: its factors, then its record
/// (written last).
pub const DISTILLED_FILES: [&str; 2] = ["distilled.safetensors", "distilled.json"];

/// The record of the distilled model, `distilled.json`: what it was distilled from and with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DistilledRecord {
    /// The fingerprint of the run's settings.
    settings: String,
    /// Each part's factors file, as it was when distilled.
    parts: Vec<InputFile>,
    /// The distillation's settings.
    distillation: serde_json::Value,
    /// The distilled model's file.
    factors: InputFile,
}

/// Whether `name` is a file a work area holds (its settings, parts, captures, distilled model
/// and their temporaries).
fn is_work_file(name: &str) -> bool {
    if name == SETTINGS_FILE || CAPTURE_FILES.contains(&name) || DISTILLED_FILES.contains(&name) {
        return true;
    }
    let part = |n: &str| {
        n.strip_prefix("group-")
            .and_then(|r| {
                r.strip_suffix(".json")
                    .or_else(|| r.strip_suffix(".safetensors"))
            })
            .is_some_and(|g| !g.is_empty() && g.chars().all(|c| c.is_ascii_digit()))
    };
    part(name) || (name.starts_with('.') && name.ends_with(TEMP_SUFFIX))
}

/// A run's work area.
#[derive(Debug, Clone)]
pub struct WorkArea {
    dir: PathBuf,
    record: SettingsRecord,
}

impl WorkArea {
    /// Opens (or starts) the work area `dir` for a run with `settings`; see [`Resume`]. A work area
    /// made with other settings is an error naming every setting that differs.
    pub fn open(
        dir: impl AsRef<Path>,
        settings: RunSettings,
        context: RunContext,
        resume: Resume,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let record = SettingsRecord {
            format: WORK_FORMAT.into(),
            fingerprint: settings.fingerprint()?,
            settings,
            context,
        };
        let path = dir.join(SETTINGS_FILE);
        let existing = match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error(&path)(e)),
        };
        let area = Self { dir, record };
        match (existing, resume) {
            (Some(_), Resume::Fresh) => area.clear()?,
            (Some(text), _) => {
                let old: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| FipsError::WorkArea {
                        dir: area.dir.clone(),
                        reason: format!(
                            "{SETTINGS_FILE} is unreadable ({e}); remove the work area or start \
                             afresh (--fresh)"
                        ),
                    })?;
                let new = serde_json::to_value(&area.record.settings)
                    .map_err(|e| FipsError::Numerical(e.to_string()))?;
                let mut diff = Vec::new();
                differences(
                    "",
                    old.get("settings").unwrap_or(&serde_json::Value::Null),
                    &new,
                    &mut diff,
                );
                if !diff.is_empty() {
                    return Err(FipsError::WorkArea {
                        dir: area.dir.clone(),
                        reason: format!(
                            "it holds parts of a run with other settings ({}); nothing is reused \
                             silently: start afresh with --fresh (discards those parts) or use \
                             another output or work directory",
                            diff.join("; ")
                        ),
                    });
                }
                return Ok(area);
            }
            (None, Resume::Require) => {
                return Err(FipsError::WorkArea {
                    dir: area.dir.clone(),
                    reason: "there is no run to resume here".into(),
                });
            }
            (None, _) => {}
        }
        // Nothing is written until the first part is: a run that fails before leaves no trace.
        Ok(area)
    }

    /// Creates the work area and its settings record if they are not there yet.
    fn ensure_settings(&self) -> Result<()> {
        let path = self.dir.join(SETTINGS_FILE);
        if path.is_file() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir).map_err(io_error(&self.dir))?;
        let text = serde_json::to_string_pretty(&self.record)
            .map_err(|e| FipsError::Numerical(e.to_string()))?;
        write_atomically(&path, text.as_bytes())
    }

    /// Opens an existing work area as it is (for assembling its parts).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(SETTINGS_FILE);
        let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
        let record: SettingsRecord =
            serde_json::from_str(&text).map_err(|e| FipsError::WorkArea {
                dir: dir.clone(),
                reason: format!("{SETTINGS_FILE} is unreadable: {e}"),
            })?;
        if record.format != WORK_FORMAT || record.fingerprint != record.settings.fingerprint()? {
            return Err(FipsError::WorkArea {
                dir,
                reason: format!("{SETTINGS_FILE} is not a fips work-area record or was edited"),
            });
        }
        Ok(Self { dir, record })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The fingerprint of the run's settings.
    pub fn fingerprint(&self) -> &str {
        &self.record.fingerprint
    }

    /// The run's settings.
    pub fn settings(&self) -> &RunSettings {
        &self.record.settings
    }

    /// The run's context.
    pub fn context(&self) -> &RunContext {
        &self.record.context
    }

    /// Removes the work area's own files (settings, parts, temporaries), nothing else.
    fn clear(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_work_file(&name) && entry.file_type().is_ok_and(|t| t.is_file()) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(io_error(&path))?;
            }
        }
        Ok(())
    }

    /// Removes the work area: its own files, then the directory if nothing else is left in it.
    pub fn remove(self) -> Result<()> {
        self.clear()?;
        let _ = std::fs::remove_dir(&self.dir);
        Ok(())
    }

    fn part_paths(&self, g: usize) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("group-{g}.safetensors")),
            self.dir.join(format!("group-{g}.json")),
        )
    }

    /// Whether group `g`'s part is there (its record written; [`WorkArea::read_part`] checks it).
    pub fn has_part(&self, g: usize) -> bool {
        self.part_paths(g).1.is_file()
    }

    /// The groups whose parts are missing.
    pub fn missing(&self) -> Vec<usize> {
        (0..self.record.settings.groups.len())
            .filter(|&g| !self.has_part(g))
            .collect()
    }

    /// Persists group `g`'s result: the factors file, then the record (each atomically).
    pub fn write_part(&self, g: usize, result: &GroupResult) -> Result<()> {
        self.ensure_settings()?;
        let (factors, record_path) = self.part_paths(g);
        let mut manifest = self.record.settings.base_manifest()?;
        manifest.groups.push(result.manifest.clone());
        CompressedModel {
            manifest,
            groups: vec![result.blocks.clone()],
        }
        .write(&factors)?;
        let record = PartRecord {
            settings: self.record.fingerprint.clone(),
            group: g,
            blocks: result.manifest.blocks.clone(),
            factors: InputFile::of(&factors)?,
            calibration_seconds: result.calibration_time.as_secs_f64(),
            report: result.report.clone(),
        };
        let text = serde_json::to_string_pretty(&record)
            .map_err(|e| FipsError::Numerical(format!("cannot serialise a part: {e}")))?;
        write_atomically(&record_path, text.as_bytes())
    }

    /// Group `g`'s part, checked against the settings (`None` if it is not there).
    pub fn read_part(&self, g: usize) -> Result<Option<GroupResult>> {
        let factors = self.part_paths(g).0;
        let bad = |reason: String| self.bad_part(g, reason);
        let Some(record) = self.part_record(g)? else {
            return Ok(None);
        };
        let expected = self.record.settings.groups.get(g);
        if record.settings != self.record.fingerprint
            || record.group != g
            || Some(&record.blocks) != expected
        {
            return Err(bad("was made with other settings".into()));
        }
        if InputFile::of(&factors)? != record.factors {
            return Err(bad("has a factors file that differs from its record".into()));
        }
        let mut model = CompressedModel::read(&factors)?;
        let (Some(manifest), Some(blocks), 1) = (
            model.manifest.groups.pop(),
            model.groups.pop(),
            model.manifest.groups.len() + 1,
        ) else {
            return Err(bad("does not hold exactly one group".into()));
        };
        if manifest.blocks != record.blocks {
            return Err(bad("describes other blocks".into()));
        }
        Ok(Some(GroupResult {
            blocks,
            manifest,
            report: record.report,
            calibration_time: Duration::try_from_secs_f64(record.calibration_seconds)
                .unwrap_or_default(),
        }))
    }

    /// The error for group `g`'s part, naming its record.
    fn bad_part(&self, g: usize, reason: String) -> FipsError {
        FipsError::WorkArea {
            dir: self.dir.clone(),
            reason: format!(
                "the part of group {g} {reason}; remove {} or start afresh (--fresh)",
                self.part_paths(g).1.display()
            ),
        }
    }

    /// Group `g`'s record as written (`None` if it is not there), unchecked.
    fn part_record(&self, g: usize) -> Result<Option<PartRecord>> {
        let record_path = self.part_paths(g).1;
        let text = match std::fs::read_to_string(&record_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&record_path)(e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| self.bad_part(g, format!("is unreadable ({e})")))
    }

    /// The factors files of every part as their records give them (each checked against its
    /// file by [`WorkArea::read_part`], which assembling runs first): no part is read again.
    fn part_files(&self) -> Result<Vec<InputFile>> {
        (0..self.record.settings.groups.len())
            .map(|g| {
                self.part_record(g)?
                    .map(|r| r.factors)
                    .ok_or_else(|| FipsError::MissingParts {
                        dir: self.dir.clone(),
                        missing: vec![g],
                    })
            })
            .collect()
    }

    /// Persists `model`, distilled end to end from the run's parts with the settings
    /// `distillation`: its file, then its record (each atomically), replacing one distilled
    /// with other settings. Every part must be there.
    pub fn write_distilled(
        &self,
        distillation: &serde_json::Value,
        model: &CompressedModel,
    ) -> Result<()> {
        self.ensure_settings()?;
        let missing = self.missing();
        if !missing.is_empty() {
            return Err(FipsError::MissingParts {
                dir: self.dir.clone(),
                missing,
            });
        }
        let (file, record_path) = (
            self.dir.join(DISTILLED_FILES[0]),
            self.dir.join(DISTILLED_FILES[1]),
        );
        // The old record goes first, so a crash in between leaves no record vouching for
        // another file.
        match std::fs::remove_file(&record_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_error(&record_path)(e));
            }
            _ => {}
        }
        model.write(&file)?;
        let record = DistilledRecord {
            settings: self.record.fingerprint.clone(),
            parts: self.part_files()?,
            distillation: distillation.clone(),
            factors: InputFile::of(&file)?,
        };
        let text = serde_json::to_string_pretty(&record)
            .map_err(|e| FipsError::Numerical(format!("cannot serialise a record: {e}")))?;
        write_atomically(&record_path, text.as_bytes())
    }

    /// The model distilled from the run's parts as they are now with the settings
    /// `distillation`, if the work area holds it (`None` if not, or if it was distilled from
    /// other parts or with other settings).
    pub fn read_distilled(
        &self,
        distillation: &serde_json::Value,
    ) -> Result<Option<CompressedModel>> {
        let (file, record_path) = (
            self.dir.join(DISTILLED_FILES[0]),
            self.dir.join(DISTILLED_FILES[1]),
        );
        let text = match std::fs::read_to_string(&record_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&record_path)(e)),
        };
        let Ok(record) = serde_json::from_str::<DistilledRecord>(&text) else {
            return Ok(None);
        };
        if record.settings != self.record.fingerprint
            || &record.distillation != distillation
            || !self.missing().is_empty()
            || record.parts != self.part_files()?
            || !file.is_file()
            || InputFile::of(&file)? != record.factors
        {
            return Ok(None);
        }
        let model = CompressedModel::read(&file)?;
        let expected: Vec<&Vec<usize>> = self.record.settings.groups.iter().collect();
        let found: Vec<&Vec<usize>> = model.manifest.groups.iter().map(|g| &g.blocks).collect();
        if found != expected {
            return Err(FipsError::WorkArea {
                dir: self.dir.clone(),
                reason: format!(
                    "{} describes other groups than the run's; remove it or start afresh \
                     (--fresh)",
                    file.display()
                ),
            });
        }
        Ok(Some(model))
    }

    /// The whole model from the parts, read back from disk (so every run, resumed or not, writes
    /// from the same bytes). [`FipsError::MissingParts`] names the groups not there yet.
    pub fn assemble(&self, wall_time: Duration) -> Result<ModelCompression> {
        let missing = self.missing();
        if !missing.is_empty() {
            return Err(FipsError::MissingParts {
                dir: self.dir.clone(),
                missing,
            });
        }
        let parts = (0..self.record.settings.groups.len())
            .map(|g| {
                self.read_part(g)?.ok_or_else(|| FipsError::MissingParts {
                    dir: self.dir.clone(),
                    missing: vec![g],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(assemble(
            self.record.settings.base_manifest()?,
            parts,
            wall_time,
        ))
    }

    /// The report of an assembled run (as [`RunReport::new`] makes it), from the settings: the
    /// cores and BLAS threads recorded are those the parts were made with.
    pub fn report(&self, layout: &MlpLayout, run: &ModelCompression) -> Result<RunReport> {
        let settings = &self.record.settings;
        let mut report = RunReport::from_parts(
            Path::new(&self.record.context.checkpoint),
            layout,
            settings.method_params()?,
            run,
        );
        if let Some(cores) = settings.cores {
            report.cores = cores;
        }
        report.blas_threads = settings.blas_threads;
        Ok(report)
    }
}

/// Compresses the groups of a run whose parts `work` does not hold yet (only group `k` with
/// `only = Some(k)`), persisting each one as soon as it is done; a part already there is checked
/// and reported through [`Observer::group_reused`]. Returns the groups computed now.
#[allow(clippy::too_many_arguments)]
pub fn compress_parts(
    checkpoint: &impl TensorStore,
    layout: &MlpLayout,
    compressor: &dyn Compressor<f32>,
    activation: Activation,
    calibration: &CalibrationSource<'_>,
    observer: &mut dyn Observer,
    work: &WorkArea,
    only: Option<usize>,
) -> Result<Vec<usize>> {
    let validation = HoldoutSettings::validation(work.settings().validation);
    compress_parts_validated(
        checkpoint,
        layout,
        compressor,
        activation,
        calibration,
        &validation,
        observer,
        work,
        only,
    )
}

/// [`compress_parts`] with the validation given: a held-out source of its own (the text path's
/// held-out paragraphs, whose capture the settings fingerprint) or the settings' hold-out.
#[allow(clippy::too_many_arguments)]
pub fn compress_parts_validated(
    checkpoint: &impl TensorStore,
    layout: &MlpLayout,
    compressor: &dyn Compressor<f32>,
    activation: Activation,
    calibration: &CalibrationSource<'_>,
    validation: &Validation<'_>,
    observer: &mut dyn Observer,
    work: &WorkArea,
    only: Option<usize>,
) -> Result<Vec<usize>> {
    let groups = &work.settings().groups;
    let todo: Vec<usize> = match only {
        Some(k) if k >= groups.len() => {
            return Err(FipsError::IndexOutOfRange {
                what: "group (--only-group)",
                index: k,
                len: groups.len(),
            });
        }
        Some(k) => vec![k],
        None => (0..groups.len()).collect(),
    };
    let mut computed = Vec::new();
    for g in todo {
        if let Some(part) = work.read_part(g)? {
            observer.group_reused(g, &part.report);
            continue;
        }
        let result = compress_group(
            checkpoint,
            layout,
            g,
            &groups[g],
            compressor,
            activation,
            calibration,
            validation,
            observer,
        )?;
        work.write_part(g, &result)?;
        computed.push(g);
    }
    Ok(computed)
}

/// How the outputs of a run are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutputOptions {
    /// Write the densified checkpoint too.
    pub densified: bool,
    /// Write the compressed model as one self-contained file.
    pub self_contained: bool,
}

/// Writes the output set of `run` into `out_dir` (see the module documentation): the compressed
/// file, the densified checkpoint (if asked), the loss plots and `report.json` (after `evaluate`,
/// if given, fills in the evaluation; `start` gives the wall time). Everything is staged first;
/// nothing of the previous set in `out_dir` changes until the new set is complete on disk.
/// Returns the files installed.
pub fn write_outputs(
    out_dir: &Path,
    run: &ModelCompression,
    report: &mut RunReport,
    checkpoint: &Checkpoint,
    options: OutputOptions,
    evaluate: Option<&mut dyn FnMut() -> Result<Evaluation>>,
    start: Instant,
) -> Result<Vec<PathBuf>> {
    let set = StagedSet::begin(out_dir)?;
    let result = (|| {
        let compact = CompactModel::from_model(&run.model, Some(checkpoint))?;
        if options.self_contained {
            compact.write_self_contained(set.path(COMPRESSED_FILE), checkpoint)?;
        } else {
            compact.write(set.path(COMPRESSED_FILE))?;
        }
        if options.densified {
            compact.densify(checkpoint, set.path(DENSIFIED_FILE))?;
        }
        report.write_loss_plots(set.dir())?;
        if let Some(evaluate) = evaluate {
            report.eval = Some(evaluate()?);
        }
        report.wall_time = start.elapsed();
        report.write(set.path(REPORT_FILE))
    })();
    match result {
        Ok(()) => set.commit(is_run_output),
        Err(e) => {
            set.abandon();
            Err(e)
        }
    }
}

/// Checks that `dir` can be written before any long work, without creating it: creates and
/// removes a probe file in `dir` or, if it does not exist yet, in its nearest existing ancestor
/// (which must be a directory).
pub fn check_writable(dir: &Path) -> Result<()> {
    let absolute = std::path::absolute(dir).map_err(io_error(dir))?;
    let existing = absolute
        .ancestors()
        .find(|a| std::fs::symlink_metadata(a).is_ok())
        .unwrap_or(&absolute);
    if !existing.is_dir() {
        return Err(FipsError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!("{} is not a directory", existing.display()),
            ),
        });
    }
    let probe = existing.join(format!(
        ".fips-probe-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(io_error(&probe))?;
    std::fs::remove_file(&probe).map_err(io_error(&probe))
}

/// Checks split `name` of the labelled image set `dir` before any long work: the split has
/// images, and every one (the first `limit` if given) is a complete JPEG whose header declares a
/// usable size (without decoding the pixels). Returns the number of images.
#[cfg(feature = "images")]
pub fn check_split(dir: &Path, name: &str, limit: Option<usize>) -> Result<usize> {
    let mut items = crate::app::images::split(&crate::app::images::read_labels(dir)?, name);
    if items.is_empty() {
        return Err(FipsError::InvalidParameter {
            name: "split",
            reason: format!("no images of split {name:?} in {}", dir.display()),
        });
    }
    if let Some(n) = limit {
        items.truncate(n);
    }
    for item in &items {
        crate::app::images::read_checked_jpeg(&item.path)?;
    }
    Ok(items.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_outputs_and_work_files_are_recognised_exactly() {
        for yes in [
            "compressed.safetensors",
            "densified.safetensors",
            "report.json",
            "loss_group0.svg",
            "loss_group12.svg",
        ] {
            assert!(is_run_output(yes), "{yes}");
        }
        for no in [
            "loss_group.svg",
            "loss_groupx.svg",
            "model.safetensors",
            "notes.txt",
        ] {
            assert!(!is_run_output(no), "{no}");
        }
        for yes in [
            "settings.json",
            "group-0.json",
            "group-11.safetensors",
            "calibration.safetensors",
            "validation.safetensors",
            "capture.json",
            "distilled.safetensors",
            "distilled.json",
        ] {
            assert!(is_work_file(yes), "{yes}");
        }
        for no in [
            "group-.json",
            "group-1.txt",
            "model.safetensors",
            "x.json",
            "distilled.txt",
        ] {
            assert!(!is_work_file(no), "{no}");
        }
    }

    /// A split written before images were held out whole reads as a split by tokens, so it
    /// differs from an image run's split now (the work area is not reused); a split by tokens
    /// is written as before.
    #[test]
    fn holdout_by_tokens_and_by_images_differ() {
        let old: HoldoutSettings =
            serde_json::from_str(r#"{"fraction":0.05,"seed":2024}"#).unwrap();
        assert!(!old.whole_images);
        let images = HoldoutSettings {
            whole_images: true,
            ..old
        };
        assert_ne!(old, images);
        let mut out = Vec::new();
        differences(
            "validation",
            &serde_json::to_value(old).unwrap(),
            &serde_json::to_value(images).unwrap(),
            &mut out,
        );
        assert_eq!(out, ["validation.whole_images: null -> true"]);
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"fraction":0.05,"seed":2024}"#
        );
        // The images held out are those whose tokens the pipeline holds out.
        let (run, n) = (197, 250);
        let (kept, held) = images.image_split(n).unwrap();
        let (kept_tokens, held_tokens) =
            crate::math::validation::holdout_runs(run * n, run, 0.05, 2024).unwrap();
        let first_tokens = |ims: &[usize]| ims.iter().map(|i| i * run).collect::<Vec<_>>();
        let starts = |tokens: &[usize]| {
            tokens
                .iter()
                .copied()
                .filter(|t| t % run == 0)
                .collect::<Vec<_>>()
        };
        assert_eq!(held.len(), 13);
        assert_eq!(first_tokens(&held), starts(&held_tokens));
        assert_eq!(first_tokens(&kept), starts(&kept_tokens));
        assert_eq!(old.image_split(4).unwrap(), (vec![0, 1, 2, 3], vec![]));
    }

    #[test]
    fn differences_name_the_changed_keys() {
        let a = serde_json::json!({"x": 1, "p": {"steps": 10, "seed": 0}});
        let b = serde_json::json!({"x": 1, "p": {"steps": 20, "seed": 0}, "y": true});
        let mut out = Vec::new();
        differences("", &a, &b, &mut out);
        assert_eq!(out, vec!["p.steps: 10 -> 20", "y: null -> true"]);
    }

    /// The class-token weight is part of an image run's settings (so a work area trained with
    /// another weight is not reused); settings written before it existed read as weight 1, and
    /// weight 1 writes them as before.
    #[test]
    fn class_token_weight_is_in_the_image_settings() {
        let images = |w| CalibrationSettings::Images {
            images: 2,
            pixels: "ab".into(),
            heads: 3,
            class_token_weight: w,
        };
        let old = serde_json::json!({"source": "images", "images": 2, "pixels": "ab", "heads": 3});
        assert_eq!(serde_json::to_value(images(1)).unwrap(), old);
        let parsed: CalibrationSettings = serde_json::from_value(old).unwrap();
        assert_eq!(parsed, images(1));
        let ten = serde_json::to_value(images(10)).unwrap();
        assert_eq!(ten["class_token_weight"], 10);
        assert_ne!(
            serde_json::from_value::<CalibrationSettings>(ten).unwrap(),
            images(1)
        );
    }
}
