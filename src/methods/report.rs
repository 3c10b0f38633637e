//! What every method reports: one progress type for training steps and one report per group, with
//! the method's own details as a typed enum.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::Float;
use crate::foundation::mlp::MlpKind;
use crate::math::budget::{GroupShape, ParameterCount};
use crate::math::objective::ContractionOrder;
use crate::math::sparsity::Sparsifier;
use crate::math::validation::ValidationSet;
use crate::repr::CompressedBlocks;

/// The compression methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Fine-grained Parameter Sharing: shared basis + sparse factors per group.
    Fips,
    /// Per-layer truncated SVD (optionally trained with FiPS's loss).
    Svd,
    /// SVD-LLM-style whitened SVD per layer.
    SvdLlm,
    /// One whitened input basis per matrix type and group.
    BasisSharing,
    /// Activation-aware mixed ranks with trained residuals.
    MixedRank,
    /// Linearise every block and merge its two layers.
    LayerCollapse,
}

impl Method {
    /// Every method, in the order of the documentation.
    pub const ALL: [Method; 6] = [
        Self::Fips,
        Self::Svd,
        Self::SvdLlm,
        Self::BasisSharing,
        Self::MixedRank,
        Self::LayerCollapse,
    ];

    /// The method's name (`fips`, `svd`, `svd-llm`, `basis-sharing`, `mixed-rank`,
    /// `layer-collapse`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Fips => "fips",
            Self::Svd => "svd",
            Self::SvdLlm => "svd-llm",
            Self::BasisSharing => "basis-sharing",
            Self::MixedRank => "mixed-rank",
            Self::LayerCollapse => "layer-collapse",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = FipsError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| FipsError::InvalidParameter {
                name: "method",
                reason: format!(
                    "unknown method {s:?} (one of {})",
                    Self::ALL.map(Method::name).join(", ")
                ),
            })
    }
}

/// What a progress callback sees after every training step, for every method that trains.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Progress {
    /// The step just finished (1-based, counted per training run: per group for FiPS and the
    /// trained SVD, per block for LayerCollapse, per residual for mixed rank).
    pub step: usize,
    /// Steps planned for this run (a limit for runs that stop on convergence).
    pub total_steps: usize,
    /// The mini-batch loss of this step.
    pub loss: f64,
    /// The learning rate this step used.
    pub learning_rate: f64,
    /// FiPS: the sparsity of `V` after this step.
    pub sparsity: Option<f64>,
    /// LayerCollapse: the PReLU slope `α` after this step.
    pub slope: Option<f64>,
    /// The error on the held-out validation tokens, on the steps it was scored (early stopping).
    pub validation_error: Option<f64>,
}

/// Serialises a duration as seconds.
pub(crate) fn seconds<S: Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Reads a duration written by [`seconds`] (work-area parts read their reports back).
pub(crate) fn from_seconds<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Duration, D::Error> {
    let s = f64::deserialize(d)?;
    Duration::try_from_secs_f64(s).map_err(serde::de::Error::custom)
}

/// What a method reports for one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodReport {
    /// The method.
    pub method: Method,
    /// Block structure of the original group.
    pub kind: MlpKind,
    /// Width d, MLP width I, blocks n, matrices per block f.
    pub shape: GroupShape,
    /// Parameters before (dense weights) and after; biases separately.
    pub parameters: ParameterCount,
    /// Relative reconstruction error `‖Ŷ − Y‖ / ‖Y‖` over the group's calibration set.
    pub rel_error: f64,
    /// The same per block.
    pub block_rel_error: Vec<f64>,
    /// Training steps run (0 for closed-form methods).
    pub steps: usize,
    /// Mini-batch loss of every training step run.
    pub loss_curve: Vec<f64>,
    /// Calibration tokens per block.
    pub calibration_tokens: usize,
    /// Whether the calibration inputs were synthetic Gaussian noise (data-free).
    pub data_free: bool,
    /// Wall time of the compression of this group (serialised as `wall_seconds`).
    #[serde(
        rename = "wall_seconds",
        serialize_with = "seconds",
        deserialize_with = "from_seconds"
    )]
    pub wall_time: Duration,
    /// The errors on held-out validation tokens the method never trained on (`None`: no
    /// validation set was given).
    pub validation: Option<ValidationReport>,
    /// What only this method measures.
    pub details: MethodDetails,
}

/// A compressed group measured on held-out validation tokens (never trained on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationReport {
    /// Validation tokens per block.
    pub tokens: usize,
    /// `‖Ŷ − Y‖ / ‖Y‖` over the group's validation tokens.
    pub rel_error: f64,
    /// The same per block.
    pub block_rel_error: Vec<f64>,
    /// Validation errors scored during training, `(step, error)` (with early stopping).
    pub curve: Vec<(usize, f64)>,
    /// The step at which early stopping ended training, if it did.
    pub stopped_at: Option<usize>,
}

impl ValidationReport {
    /// `blocks` measured on `set`, with the curve of a training run.
    pub fn measure<F: Float>(
        blocks: &CompressedBlocks<F>,
        set: &ValidationSet<F>,
        curve: Vec<(usize, f64)>,
        stopped_at: Option<usize>,
    ) -> Result<Self> {
        let (rel_error, block_rel_error) = set.errors(&blocks.to_dense_mlps()?)?;
        Ok(Self {
            tokens: set.tokens(),
            rel_error,
            block_rel_error,
            curve,
            stopped_at,
        })
    }

    /// The per-block validation errors, `0.1234  0.2345 …`.
    fn per_block(&self) -> String {
        let per_block: Vec<String> = self
            .block_rel_error
            .iter()
            .map(|e| format!("{e:.4}"))
            .collect();
        per_block.join("  ")
    }
}

impl MethodReport {
    /// The validation line of the display, if there is a validation set.
    fn fmt_validation(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(v) = &self.validation else {
            return Ok(());
        };
        write!(
            f,
            "  validation error {:.4} over {} held-out tokens; per block: {}",
            v.rel_error,
            v.tokens,
            v.per_block()
        )?;
        if let Some(step) = v.stopped_at {
            write!(f, " (early stop at step {step})")?;
        }
        writeln!(f)
    }

    /// FiPS's details, if this is a FiPS report.
    pub fn fips(&self) -> Option<&FipsDetails> {
        match &self.details {
            MethodDetails::Fips(d) => Some(d),
            _ => None,
        }
    }
}

/// Method-specific measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MethodDetails {
    /// FiPS.
    Fips(FipsDetails),
    /// Per-layer SVD.
    Svd(SvdDetails),
    /// SVD-LLM.
    SvdLlm(SvdLlmDetails),
    /// Basis sharing.
    BasisSharing(BasisSharingDetails),
    /// Mixed rank.
    MixedRank(MixedRankDetails),
    /// LayerCollapse.
    LayerCollapse(LayerCollapseDetails),
}

/// FiPS's measurements of one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FipsDetails {
    /// Rank r of the shared basis as trained (the budget's).
    pub rank: usize,
    /// Components of the trained basis that contribute nothing (no kept entry in their row of
    /// any `V_j`, or a zero column of `U`); [`crate::SharedBasisGroup::without_unused_rank`]
    /// drops them (the `fips` command does before writing the group).
    #[serde(default)]
    pub unused_rank: usize,
    /// Target sparsity of `V`.
    pub target_sparsity: f64,
    /// Achieved sparsity `1 − nnz / (r f n I)`.
    pub sparsity: f64,
    /// Nonzeros of `V`.
    pub nnz: usize,
    /// The sparsifier used.
    pub sparsifier: Sparsifier,
    /// The contraction order the training step used.
    pub contraction: ContractionOrder,
    /// Relative error of the SVD initialisation magnitude-pruned to the target sparsity (the
    /// untrained model at the same budget).
    pub rel_error_init: f64,
    /// The same per block.
    pub block_rel_error_init: Vec<f64>,
    /// Steps planned (more than run if the callback stopped the run).
    pub steps_planned: usize,
    /// Time of the initialisation (SVD or Gram eigendecomposition), as `init_seconds`.
    #[serde(
        rename = "init_seconds",
        serialize_with = "seconds",
        deserialize_with = "from_seconds"
    )]
    pub init_time: Duration,
    /// Time of the training loop, as `train_seconds`.
    #[serde(
        rename = "train_seconds",
        serialize_with = "seconds",
        deserialize_with = "from_seconds"
    )]
    pub train_time: Duration,
}

/// Per-layer SVD's measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SvdDetails {
    /// Rank of every matrix.
    pub rank: usize,
    /// Relative error of the plain truncated SVD (before any training).
    pub rel_error_svd: f64,
    /// Training steps planned.
    pub steps_planned: usize,
}

/// SVD-LLM's measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SvdLlmDetails {
    /// Rank of every matrix.
    pub rank: usize,
    /// Cholesky jitter added to each matrix's input Gram matrix (0 when none was needed).
    pub jitter: Vec<f64>,
}

/// Basis sharing's measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BasisSharingDetails {
    /// Shared rank per matrix type (fc1, fc2 or gate, up, down).
    pub shared_ranks: Vec<usize>,
    /// Blocks sharing each basis.
    pub group_size: usize,
}

/// Mixed rank's measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixedRankDetails {
    /// Rank of every matrix, residual included; `None` for a matrix kept dense.
    pub ranks: Vec<Option<usize>>,
    /// Rank q of each residual.
    pub residual_rank: usize,
    /// Normalised output error of each trained residual on its first and last batch.
    pub residual_errors: Vec<ResidualError>,
}

/// One trained residual's error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ResidualError {
    /// The matrix (module order).
    pub matrix: usize,
    /// Normalised error on the first batch.
    pub before: f64,
    /// Normalised error on the last batch.
    pub after: f64,
}

/// LayerCollapse's measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerCollapseDetails {
    /// One entry per block.
    pub blocks: Vec<CollapsedBlockReport>,
}

/// One collapsed block's training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CollapsedBlockReport {
    /// The PReLU slope reached before the merge.
    pub slope: f64,
    /// Whether the slope came within the tolerance of 1.
    pub converged: bool,
    /// Steps run.
    pub steps: usize,
}

impl fmt::Display for MethodDetails {
    /// The scalar details, `key=value`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fips(d) => write!(
                f,
                "nnz={} rank={} unused_rank={} rel_error_init={:.4} sparsifier={} sparsity={:.4}",
                d.nnz, d.rank, d.unused_rank, d.rel_error_init, d.sparsifier, d.sparsity
            ),
            Self::Svd(d) => write!(f, "rank={} rel_error_svd={:.4}", d.rank, d.rel_error_svd),
            Self::SvdLlm(d) => write!(f, "rank={}", d.rank),
            Self::BasisSharing(d) => write!(f, "group_size={}", d.group_size),
            Self::MixedRank(d) => write!(f, "residual_rank={}", d.residual_rank),
            Self::LayerCollapse(d) => {
                let converged = d.blocks.iter().filter(|b| b.converged).count();
                write!(f, "converged={converged}/{}", d.blocks.len())
            }
        }
    }
}

impl fmt::Display for MethodReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.parameters;
        writeln!(
            f,
            "{} {} group: n={} blocks, d={}, I={}, f={}{}",
            self.method,
            self.kind,
            self.shape.blocks,
            self.shape.width,
            self.shape.intermediate,
            self.shape.matrices_per_block,
            if self.data_free {
                " [data-free calibration]"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "  weights {} -> {} ({:.2}% kept), biases {}; {}",
            p.dense_weights,
            p.compressed_weights(),
            100.0 * p.kept_fraction(),
            p.biases,
            self.details
        )?;
        match &self.details {
            MethodDetails::Fips(d) => {
                writeln!(
                    f,
                    "  rel. error ||Y^-Y||/||Y||: init {:.4} -> trained {:.4} over {} tokens",
                    d.rel_error_init, self.rel_error, self.calibration_tokens
                )?;
                let per_block: Vec<String> = d
                    .block_rel_error_init
                    .iter()
                    .zip(&self.block_rel_error)
                    .map(|(a, b)| format!("{a:.4}->{b:.4}"))
                    .collect();
                writeln!(f, "  per block: {}", per_block.join("  "))?;
                self.fmt_validation(f)?;
                write!(
                    f,
                    "  {}/{} steps ({}), init {:.2?}, training {:.2?}, total {:.2?}",
                    self.steps,
                    d.steps_planned,
                    d.contraction,
                    d.init_time,
                    d.train_time,
                    self.wall_time
                )
            }
            _ => {
                let per_block: Vec<String> = self
                    .block_rel_error
                    .iter()
                    .map(|e| format!("{e:.4}"))
                    .collect();
                writeln!(
                    f,
                    "  rel. error ||Y^-Y||/||Y|| {:.4} over {} tokens; per block: {}",
                    self.rel_error,
                    self.calibration_tokens,
                    per_block.join("  ")
                )?;
                self.fmt_validation(f)?;
                write!(f, "  {} steps, total {:.2?}", self.steps, self.wall_time)
            }
        }
    }
}
