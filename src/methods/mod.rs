//! Compression methods behind one interface, for comparisons at matched parameter budgets.
//!
//! Every method takes the dense MLP blocks of a group and their calibration inputs and returns
//! [`CompressedBlocks`] with a [`MethodReport`]; the parameter budget is part of each method's
//! validated parameters. Methods:
//!
//! | method | what is stored | training |
//! |---|---|---|
//! | [`fips`](crate::FipsCompressor) | shared basis `U` + sparse `V_j` per matrix | AdamW, GMP/RigL |
//! | [`svd`](svd::SvdParams) | per-matrix truncated SVD `A B` | optional (same loss as FiPS) |
//! | [`svd-llm`](svd_llm::SvdLlmParams) | per-matrix whitened SVD `A B` | none |
//! | [`basis-sharing`](basis_sharing::BasisSharingParams) | one whitened input basis per matrix type and group, per-matrix coefficients | none |
//! | [`mixed-rank`](mixed_rank::MixedRankParams) | whitened `A B` at greedily allocated ranks + trained rank-`q` residual | residual only |
//! | [`layer-collapse`](layer_collapse::LayerCollapseParams) | one linear map per block | PReLU slope to 1, then exact merge |
//!
//! Methods that need no training never run a training loop.

pub mod basis_sharing;
pub mod layer_collapse;
pub mod lowrank;
pub mod mixed_rank;
pub mod svd;
pub mod svd_llm;
pub mod whitening;

use std::ops::ControlFlow;
use std::time::Duration;

use ndarray::{Array2, Axis};

use crate::budget::ParameterCount;
use crate::calibration::{CHUNK_TOKENS, Calibration};
use crate::compressor::{FipsCompressor, Progress};
use crate::error::{FipsError, Result};
use crate::float::Float;
use crate::group::CompressedGroup;
use crate::mlp::DenseMlp;

pub use layer_collapse::CollapsedGroup;
pub use lowrank::LowRankGroup;

/// A group of blocks compressed by one of the methods.
#[derive(Debug, Clone, PartialEq)]
pub enum CompressedBlocks<F> {
    /// FiPS: a shared basis and sparse factors.
    SharedBasis(CompressedGroup<F>),
    /// Per-matrix low-rank factors, right factors possibly shared (SVD, SVD-LLM, basis sharing,
    /// mixed rank).
    LowRank(LowRankGroup<F>),
    /// LayerCollapse: one linear map per block.
    Collapsed(CollapsedGroup<F>),
}

impl<F: Float> CompressedBlocks<F> {
    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        match self {
            Self::SharedBasis(g) => g.blocks(),
            Self::LowRank(g) => g.blocks(),
            Self::Collapsed(g) => g.blocks(),
        }
    }

    /// Block `block` as a dense MLP of the original architecture (exactly equivalent).
    pub fn to_dense_mlp(&self, block: usize) -> Result<DenseMlp<F>> {
        match self {
            Self::SharedBasis(g) => g.to_dense_mlp(block),
            Self::LowRank(g) => g.to_dense_mlp(block),
            Self::Collapsed(g) => g.to_dense_mlp(block),
        }
    }

    /// Parameters kept against the dense original (weights; biases separately).
    pub fn parameter_count(&self) -> ParameterCount {
        match self {
            Self::SharedBasis(g) => g.parameter_count(),
            Self::LowRank(g) => g.parameter_count(),
            Self::Collapsed(g) => g.parameter_count(),
        }
    }

    /// The representation's name in manifests.
    pub fn representation(&self) -> &'static str {
        match self {
            Self::SharedBasis(_) => "shared-basis",
            Self::LowRank(_) => "low-rank",
            Self::Collapsed(_) => "collapsed",
        }
    }
}

/// What a method reports for one group.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodReport {
    /// The method's name.
    pub method: &'static str,
    /// Parameters kept.
    pub parameters: ParameterCount,
    /// Relative reconstruction error `‖Ŷ − Y‖ / ‖Y‖` over the group's calibration set.
    pub rel_error: f64,
    /// The same per block.
    pub block_rel_error: Vec<f64>,
    /// Training steps run (0 for closed-form methods).
    pub steps: usize,
    /// Loss curve of the training, if any.
    pub loss_curve: Vec<f64>,
    /// Wall time of the compression of this group.
    pub wall_time: Duration,
    /// Method-specific details (ranks, slopes, …).
    pub details: serde_json::Value,
}

/// The result of compressing one group.
#[derive(Debug, Clone)]
pub struct MethodOutput<F> {
    /// The compressed blocks.
    pub blocks: CompressedBlocks<F>,
    /// Measurements.
    pub report: MethodReport,
}

/// A compression method for groups of MLP blocks.
pub trait Compressor<F: Float> {
    /// The method's name (`fips`, `svd`, `svd-llm`, `basis-sharing`, `mixed-rank`,
    /// `layer-collapse`).
    fn method(&self) -> &'static str;

    /// The method's parameters, for manifests.
    fn parameters(&self) -> serde_json::Value;

    /// Training steps per group (0 for closed-form methods), for progress displays.
    fn steps(&self) -> usize {
        0
    }

    /// Compresses `blocks` given each block's MLP inputs; `on_step` sees every training step of
    /// methods that train (and may stop them early).
    fn compress(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &Calibration<F>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>>;
}

impl<F: Float> Compressor<F> for FipsCompressor {
    fn method(&self) -> &'static str {
        "fips"
    }

    fn parameters(&self) -> serde_json::Value {
        crate::pipeline::describe_params(self.params())
    }

    fn steps(&self) -> usize {
        self.params().steps()
    }

    fn compress(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &Calibration<F>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>> {
        let out = self.compress_with_progress(blocks, calibration, |p| on_step(p))?;
        let r = &out.report;
        let report = MethodReport {
            method: "fips",
            parameters: r.parameters,
            rel_error: r.rel_error_final,
            block_rel_error: r.block_rel_error_final.clone(),
            steps: r.steps_run,
            loss_curve: r.loss_curve.clone(),
            wall_time: r.wall_time,
            details: serde_json::json!({
                "rank": r.rank,
                "sparsity": r.sparsity,
                "nnz": r.nnz,
                "rel_error_init": r.rel_error_init,
                "sparsifier": r.sparsifier.to_string(),
            }),
        };
        Ok(MethodOutput {
            blocks: CompressedBlocks::SharedBasis(out.group),
            report,
        })
    }
}

impl<F: Float> MethodOutput<F> {
    /// Measures `blocks` against the `originals` on the calibration inputs and wraps them with
    /// their report (for methods that compute their own factors; `start` is when the method began).
    pub(crate) fn measured(
        method: &'static str,
        originals: &[DenseMlp<F>],
        blocks: CompressedBlocks<F>,
        calibration: &Calibration<F>,
        start: std::time::Instant,
        training: (usize, Vec<f64>),
        details: serde_json::Value,
    ) -> Result<Self> {
        let (rel_error, block_rel_error) = reconstruction_errors(originals, &blocks, calibration)?;
        let (steps, loss_curve) = training;
        let report = MethodReport {
            method,
            parameters: blocks.parameter_count(),
            rel_error,
            block_rel_error,
            steps,
            loss_curve,
            wall_time: start.elapsed(),
            details,
        };
        Ok(Self { blocks, report })
    }
}

/// Checks that a group is non-empty, uniform, and matches its calibration.
pub(crate) fn check_group<F: Float>(
    blocks: &[DenseMlp<F>],
    calibration: &Calibration<F>,
) -> Result<()> {
    let first = blocks.first().ok_or(FipsError::EmptyGroup)?;
    for (b, mlp) in blocks.iter().enumerate().skip(1) {
        if mlp.kind() != first.kind()
            || mlp.activation() != first.activation()
            || mlp.width() != first.width()
            || mlp.intermediate() != first.intermediate()
        {
            return Err(FipsError::GroupMismatch {
                block: b,
                reason: "kind, activation, d and I must equal block 0's".into(),
            });
        }
    }
    if calibration.blocks() != blocks.len() || calibration.width() != first.width() {
        return Err(FipsError::ShapeMismatch {
            what: "calibration (blocks, width)".into(),
            expected: vec![blocks.len(), first.width()],
            got: vec![calibration.blocks(), calibration.width()],
        });
    }
    Ok(())
}

/// Relative errors `‖Ŷ_b − Y_b‖ / ‖Y_b‖` of `compressed` against `originals` on the calibration
/// inputs: `(overall, per block)`.
pub fn reconstruction_errors<F: Float>(
    originals: &[DenseMlp<F>],
    compressed: &CompressedBlocks<F>,
    calibration: &Calibration<F>,
) -> Result<(f64, Vec<f64>)> {
    let (mut e_all, mut n_all) = (0.0, 0.0);
    let mut per_block = Vec::with_capacity(originals.len());
    for (b, (orig, z)) in originals.iter().zip(calibration.inputs()).enumerate() {
        let rebuilt = compressed.to_dense_mlp(b)?;
        let (mut e, mut n) = (0.0f64, 0.0f64);
        for chunk in z.axis_chunks_iter(Axis(0), CHUNK_TOKENS) {
            let y: Array2<F> = orig.forward(chunk)?;
            let yhat = rebuilt.forward(chunk)?;
            for (p, t) in yhat.iter().zip(y.iter()) {
                let (p, t) = (p.as_f64(), t.as_f64());
                e += (p - t) * (p - t);
                n += t * t;
            }
        }
        per_block.push(if n > 0.0 { (e / n).sqrt() } else { e.sqrt() });
        e_all += e;
        n_all += n;
    }
    let overall = if n_all > 0.0 {
        (e_all / n_all).sqrt()
    } else {
        e_all.sqrt()
    };
    Ok((overall, per_block))
}
