//! The report of a whole compression run (`report.json`), its evaluation on labelled images, the
//! per-group table, the summary line and the loss plots: what the `fips` command prints and
//! writes, as library calls.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ndarray::ArrayView4;
use serde::{Serialize, Serializer};

use crate::app::metrics::{Accuracy, agreement};
use crate::app::pipeline::{
    ModelCompression, Observer, classify, mlp_parameters, with_compressed_mlps,
};
use crate::app::svg::{LineChart, Series};
use crate::app::vit::VisionTransformer;
use crate::format::checkpoint::write_atomically;
use crate::format::layout::MlpLayout;
use crate::foundation::error::{FipsError, Result};
use crate::methods::{Compressor, Method, MethodParams, MethodReport};

fn seconds<S: Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// One group of a run: its blocks and its method report (flattened in JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupEntry {
    /// The group's blocks.
    pub blocks: Vec<usize>,
    /// The method's report.
    #[serde(flatten)]
    pub report: MethodReport,
}

/// Dense and compressed model on a labelled split.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    /// The split evaluated on.
    pub split: String,
    /// Number of images.
    pub images: usize,
    /// Top-1 accuracy of the dense model.
    pub dense_top1: f64,
    /// Top-5 accuracy of the dense model.
    pub dense_top5: f64,
    /// Top-1 accuracy of the compressed model.
    pub compressed_top1: f64,
    /// Top-5 accuracy of the compressed model.
    pub compressed_top5: f64,
    /// Fraction of images on which both models predict the same class.
    pub agreement: f64,
    /// All parameters of the dense model.
    pub model_params_dense: usize,
    /// All parameters of the compressed model.
    pub model_params_compressed: usize,
}

impl Evaluation {
    /// Classifies `pixels` with `vit` and with `vit` carrying the compressed MLPs of `run`;
    /// `dense` and `compressed` observe the two passes.
    pub fn measure(
        vit: &VisionTransformer,
        run: &ModelCompression,
        layout: &MlpLayout,
        (pixels, labels, split): (ArrayView4<'_, u8>, &[usize], &str),
        dense: &mut dyn Observer,
        compressed: &mut dyn Observer,
    ) -> Result<Self> {
        let (mlp_dense, mlp_kept) = mlp_parameters(layout, &run.model);
        let total = vit.parameter_count();
        let compressed_vit = with_compressed_mlps(vit, &run.model)?;
        let dense_logits = classify(vit, pixels, dense)?;
        let logits = classify(&compressed_vit, pixels, compressed)?;
        let d = Accuracy::new(dense_logits.view(), labels)?;
        let c = Accuracy::new(logits.view(), labels)?;
        Ok(Self {
            split: split.to_string(),
            images: labels.len(),
            dense_top1: d.top1,
            dense_top5: d.top5,
            compressed_top1: c.top1,
            compressed_top5: c.top5,
            agreement: agreement(dense_logits.view(), logits.view())?,
            model_params_dense: total,
            model_params_compressed: total - mlp_dense + mlp_kept,
        })
    }
}

/// The report of one compression run, written as `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// The checkpoint compressed.
    pub checkpoint: String,
    /// Its MLP naming scheme.
    pub scheme: String,
    /// The method.
    pub method: Method,
    /// The method's settings.
    pub parameters: MethodParams,
    /// Whether the calibration inputs were synthetic.
    pub data_free: bool,
    /// Time spent capturing or reading calibration activations (`calibration_seconds`).
    #[serde(rename = "calibration_seconds", serialize_with = "seconds")]
    pub calibration_time: Duration,
    /// One entry per group (the errors those of the block-wise fits, before any distillation).
    pub groups: Vec<GroupEntry>,
    /// The end-to-end distillation after the block-wise fits, as the compressed file's manifest
    /// records it (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distillation: Option<serde_json::Value>,
    /// MLP weights of the dense model.
    pub mlp_weights_dense: usize,
    /// MLP weights after compression (uncompressed blocks at their dense size).
    pub mlp_weights_compressed: usize,
    /// The evaluation, if one ran.
    pub eval: Option<Evaluation>,
    /// Wall time of the run (`wall_seconds`).
    #[serde(rename = "wall_seconds", serialize_with = "seconds")]
    pub wall_time: Duration,
    /// The version of this crate that made the run.
    pub fips_version: String,
    /// The cores this process could use (the default of the methods' `threads` setting, which
    /// `parameters` records when given).
    pub cores: usize,
    /// The BLAS thread count from the environment (`null`: the backend's default, all cores);
    /// results are bit-identical for equal seeds, `threads` and `blas_threads`.
    pub blas_threads: Option<usize>,
}

fn millions(n: usize) -> String {
    format!("{:.3}M", n as f64 / 1e6)
}

impl RunReport {
    /// The report of `run` (compressing `checkpoint` laid out as `layout` with `compressor`);
    /// add the evaluation and the final wall time afterwards.
    pub fn new(
        checkpoint: &Path,
        layout: &MlpLayout,
        compressor: &dyn Compressor<f32>,
        run: &ModelCompression,
    ) -> Self {
        Self::from_parts(checkpoint, layout, compressor.parameters(), run)
    }

    /// The report of `run` made with the method settings `parameters` (what [`RunReport::new`]
    /// reads from the compressor; a run assembled from a work area has only its settings).
    pub fn from_parts(
        checkpoint: &Path,
        layout: &MlpLayout,
        parameters: MethodParams,
        run: &ModelCompression,
    ) -> Self {
        let (mlp_weights_dense, mlp_weights_compressed) = mlp_parameters(layout, &run.model);
        Self {
            checkpoint: checkpoint.display().to_string(),
            scheme: layout.scheme().to_string(),
            method: parameters.method(),
            parameters,
            data_free: run.model.manifest.data_free,
            calibration_time: run.calibration_time,
            groups: run
                .reports
                .iter()
                .zip(&run.model.manifest.groups)
                .map(|(r, m)| GroupEntry {
                    blocks: m.blocks.clone(),
                    report: r.clone(),
                })
                .collect(),
            distillation: run.model.manifest.distillation.clone(),
            mlp_weights_dense,
            mlp_weights_compressed,
            eval: None,
            wall_time: run.wall_time,
            fips_version: env!("CARGO_PKG_VERSION").into(),
            cores: crate::foundation::thread_plan::available_threads(),
            blas_threads: crate::foundation::blas::configured_threads(),
        }
    }

    /// One line per group: blocks, parameters, error on the calibration (training) tokens and on
    /// the held-out validation tokens (`-` without a validation set), steps, time and the
    /// method's details; then, with a validation set, one line per block with both errors.
    pub fn group_table(&self) -> String {
        let mut out = format!(
            "{:>5} {:>8} {:>11} {:>11} {:>7} {:>9} {:>9} {:>7} {:>8}  details",
            "group", "blocks", "dense", "kept", "kept%", "train.err", "valid.err", "steps", "time"
        );
        for (g, entry) in self.groups.iter().enumerate() {
            let (r, p) = (&entry.report, &entry.report.parameters);
            let blocks = match (entry.blocks.first(), entry.blocks.last()) {
                (Some(a), Some(b)) => format!("{a}-{b}"),
                _ => String::new(),
            };
            let valid = r
                .validation
                .as_ref()
                .map_or_else(|| "-".to_string(), |v| format!("{:.4}", v.rel_error));
            let stopped = r
                .validation
                .as_ref()
                .and_then(|v| v.stopped_at)
                .map_or_else(String::new, |s| format!(" early-stop@{s}"));
            let _ = write!(
                out,
                "\n{:>5} {:>8} {:>11} {:>11} {:>6.2}% {:>9.4} {:>9} {:>7} {:>7.1}s  {}{}",
                g,
                blocks,
                p.dense_weights,
                p.compressed_weights(),
                100.0 * p.kept_fraction(),
                r.rel_error,
                valid,
                r.steps,
                r.wall_time.as_secs_f64(),
                r.details,
                stopped
            );
        }
        if self.groups.iter().any(|e| e.report.validation.is_some()) {
            let _ = write!(
                out,
                "\n{:>5} {:>6} {:>9} {:>9} {:>8}",
                "group", "block", "train.err", "valid.err", "tokens"
            );
            for (g, entry) in self.groups.iter().enumerate() {
                let Some(v) = &entry.report.validation else {
                    continue;
                };
                for ((b, train), valid) in entry
                    .blocks
                    .iter()
                    .zip(&entry.report.block_rel_error)
                    .zip(&v.block_rel_error)
                {
                    let _ = write!(
                        out,
                        "\n{g:>5} {b:>6} {train:>9.4} {valid:>9.4} {:>8}",
                        v.tokens
                    );
                }
            }
        }
        out
    }

    /// The summary: accuracy (if evaluated), MLP and model parameters, wall time.
    pub fn summary_line(&self) -> String {
        let (dense, kept) = (self.mlp_weights_dense, self.mlp_weights_compressed);
        let mut line = format!(
            "MLP params {} -> {} ({:.1}%)",
            millions(dense),
            millions(kept),
            100.0 * kept as f64 / dense as f64
        );
        if let Some(e) = &self.eval {
            line = format!(
                "{} eval images: dense top-1 {:.1}% top-5 {:.1}% | compressed top-1 {:.1}% ({:+.1}) top-5 {:.1}% | agreement {:.1}% | {line} | model params {} -> {} ({:.1}%)",
                e.images,
                100.0 * e.dense_top1,
                100.0 * e.dense_top5,
                100.0 * e.compressed_top1,
                100.0 * (e.compressed_top1 - e.dense_top1),
                100.0 * e.compressed_top5,
                100.0 * e.agreement,
                millions(e.model_params_dense),
                millions(e.model_params_compressed),
                100.0 * e.model_params_compressed as f64 / e.model_params_dense as f64
            );
        }
        let note = if self.data_free {
            " [data-free calibration]"
        } else {
            ""
        };
        format!("{line} | wall {:.1?}{note}", self.wall_time)
    }

    /// Writes the report as pretty JSON, atomically.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| FipsError::Format {
            path: path.as_ref().to_path_buf(),
            reason: format!("cannot serialise the report: {e}"),
        })?;
        write_atomically(path, text.as_bytes())
    }

    /// Writes one loss curve per group that trained (`loss_group{g}.svg` in `dir`); returns the
    /// files written.
    pub fn write_loss_plots(&self, dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
        let mut written = Vec::new();
        for (g, entry) in self.groups.iter().enumerate() {
            let Some(chart) = loss_chart(g, entry) else {
                continue;
            };
            let path = dir.as_ref().join(format!("loss_group{g}.svg"));
            write_atomically(&path, chart.to_svg().as_bytes())?;
            written.push(path);
        }
        Ok(written)
    }
}

/// The loss curve of group `g`, if it trained.
pub fn loss_chart(g: usize, entry: &GroupEntry) -> Option<LineChart> {
    let report = &entry.report;
    if report.loss_curve.is_empty() {
        return None;
    }
    Some(LineChart {
        title: format!(
            "{} group {g} (blocks {}-{}): {}",
            report.method,
            entry.blocks.first().copied().unwrap_or(0),
            entry.blocks.last().copied().unwrap_or(0),
            report.details
        ),
        x_label: "training step".into(),
        y_label: "mini-batch loss".into(),
        log_y: true,
        markers: false,
        series: vec![Series {
            label: format!("group {g}"),
            points: report
                .loss_curve
                .iter()
                .enumerate()
                .map(|(t, &l)| ((t + 1) as f64, l))
                .collect(),
        }],
    })
}
