//! The one interface of every method: dense blocks and their calibration inputs in, a compressed
//! form and a report out.

use std::ops::ControlFlow;
use std::time::Instant;

use crate::foundation::error::Result;
use crate::foundation::float::Float;
use crate::foundation::mlp::DenseMlp;
use crate::math::calibration::{Calibration, CalibrationReader};
use crate::math::validation::ValidationSet;
use crate::methods::params::MethodParams;
use crate::methods::report::{Method, MethodDetails, MethodReport, Progress, ValidationReport};
use crate::repr::{CompressedBlocks, GroupSpec};

/// The result of compressing one group.
#[derive(Debug, Clone)]
pub struct MethodOutput<F> {
    /// The compressed blocks.
    pub blocks: CompressedBlocks<F>,
    /// Measurements.
    pub report: MethodReport,
}

/// A compression method for groups of MLP blocks: implemented by every method's valid params
/// (`XParams` → [`ParamGuard::check`](super::ParamGuard::check) → `XValidParams`).
pub trait Compressor<F: Float> {
    /// The method.
    fn method(&self) -> Method;

    /// The method's settings, for manifests and reports.
    fn parameters(&self) -> MethodParams;

    /// Training steps per run (0 for closed-form methods), for progress displays.
    fn steps(&self) -> usize {
        0
    }

    /// Compresses `blocks` given each block's MLP inputs; `on_step` sees every training step of
    /// methods that train, and `Break` ends the current training run early.
    ///
    /// `calibration` is a [`Calibration`] in memory or any other [`CalibrationReader`] (e.g. a
    /// file's rows, `format::mlp_inputs::MlpInputs::stream`, or the kept rows of
    /// [`split_reader`](crate::math::validation::split_reader)). FiPS and SVD (trained or not)
    /// read it a batch and a chunk at a time, never whole; the closed-form baselines (SVD-LLM,
    /// basis sharing, mixed rank, layer collapse) read it whole into memory first
    /// ([`read_whole`](crate::math::subset::read_whole)), which keeps their Gram matrices
    /// `ZᵀZ` the bits of one product over every token.
    fn compress(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &dyn CalibrationReader<F>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>>;

    /// As [`Self::compress`], and measures the result on `validation` (held-out inputs of the
    /// same blocks, never trained on) into [`MethodReport::validation`]. Methods that can stop
    /// training on the validation error (FiPS with early stopping) also use it while training.
    fn compress_validated(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &dyn CalibrationReader<F>,
        validation: Option<&ValidationSet<F>>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>> {
        let mut out = self.compress(blocks, calibration, on_step)?;
        if let Some(set) = validation {
            out.report.validation = Some(ValidationReport::measure(
                &out.blocks,
                set,
                Vec::new(),
                None,
            )?);
        }
        Ok(out)
    }
}

/// What a method hands to [`MethodOutput::measured`] besides its blocks.
pub(crate) struct Run {
    pub method: Method,
    pub spec: GroupSpec,
    pub start: Instant,
    pub steps: usize,
    pub loss_curve: Vec<f64>,
    pub details: MethodDetails,
}

impl<F: Float> MethodOutput<F> {
    /// Measures `blocks` against the `originals` on the calibration inputs and wraps them with
    /// their report (the closed-form methods, which hold the calibration in memory).
    pub(crate) fn measured(
        run: Run,
        originals: &[DenseMlp<F>],
        blocks: CompressedBlocks<F>,
        calibration: &Calibration<F>,
    ) -> Result<Self> {
        let errors = blocks.errors(originals, calibration)?;
        let report = MethodReport {
            method: run.method,
            kind: run.spec.kind,
            shape: run.spec.shape,
            parameters: blocks.parameter_count(),
            rel_error: errors.overall(),
            block_rel_error: errors.per_block(),
            steps: run.steps,
            loss_curve: run.loss_curve,
            calibration_tokens: calibration.tokens(),
            data_free: calibration.is_data_free(),
            wall_time: run.start.elapsed(),
            validation: None,
            details: run.details,
        };
        Ok(Self { blocks, report })
    }
}
