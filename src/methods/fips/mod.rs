//! FiPS: one shared basis and sparse factors per group, trained on the blocks' outputs.
//!
//! [`FipsParams`](params::FipsParams) → [`ParamGuard::check`](crate::methods::ParamGuard::check)
//! → [`FipsValidParams`], which compresses a group in one call
//! ([`FipsValidParams::compress`]) or step by step ([`FipsValidParams::trainer`]).

pub mod params;
pub mod trainer;

use std::ops::ControlFlow;

use crate::foundation::error::Result;
use crate::foundation::float::Float;
use crate::foundation::mlp::DenseMlp;
use crate::math::budget::{Budget, GroupShape, rank_for_budget};
use crate::math::calibration::CalibrationReader;
use crate::math::validation::ValidationSet;
use crate::methods::compressor::{Compressor, MethodOutput};
use crate::methods::params::MethodParams;
use crate::methods::report::{Method, Progress};
use crate::repr::CompressedBlocks;

use params::FipsValidParams;
use trainer::{FipsOutput, FipsTrainer};

impl FipsValidParams {
    /// The rank these settings give a group of `shape`.
    pub fn rank_for(&self, shape: GroupShape) -> Result<usize> {
        match self.budget() {
            Budget::Fraction(p) => rank_for_budget(shape, p, self.sparsity()),
            Budget::Rank(r) => {
                crate::math::limits::check_shared_rank(r, shape, self.sparsity()).map(|()| r)
            }
        }
    }

    /// Compresses `blocks` (consecutive, same structure) using `calibration` (one input array per
    /// block): a [`Calibration`](crate::math::calibration::Calibration) in memory, or a reader of
    /// an MLP-input file
    /// ([`crate::format::mlp_inputs::MlpInputs::stream`]) that reads each mini-batch and each
    /// evaluation chunk from disk and recomputes their targets, so the calibration is never held
    /// whole (for the same seed, the same tokens are drawn and the same weights come out).
    pub fn compress<F: Float>(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &dyn CalibrationReader<F>,
    ) -> Result<FipsOutput<F>> {
        self.compress_with_progress(blocks, calibration, |_| ControlFlow::Continue(()))
    }

    /// As [`Self::compress`], calling `on_step` after every training step; returning
    /// `ControlFlow::Break(())` stops training early (the result is still pruned to the target
    /// sparsity and evaluated).
    pub fn compress_with_progress<F, C>(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &dyn CalibrationReader<F>,
        on_step: C,
    ) -> Result<FipsOutput<F>>
    where
        F: Float,
        C: FnMut(&Progress) -> ControlFlow<()>,
    {
        self.compress_with_validation(blocks, calibration, None, on_step)
    }

    /// As [`Self::compress_with_progress`], measuring the trained group on `validation` (held-out
    /// inputs of the same blocks) into the report's `validation`; with early stopping set, the
    /// training state is scored on it every `interval` steps and training stops once it stops
    /// improving.
    pub fn compress_with_validation<F, C>(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &dyn CalibrationReader<F>,
        validation: Option<&ValidationSet<F>>,
        mut on_step: C,
    ) -> Result<FipsOutput<F>>
    where
        F: Float,
        C: FnMut(&Progress) -> ControlFlow<()>,
    {
        let mut trainer = self.trainer_validated(blocks, calibration, validation)?;
        while let Some(progress) = trainer.step()? {
            if on_step(&progress).is_break() {
                break;
            }
        }
        trainer.finish()
    }

    /// Validates the group, computes the targets and the SVD initialisation, and returns a trainer
    /// to drive step by step (what [`Self::compress`] does in a loop).
    pub fn trainer<'a, F: Float>(
        &self,
        blocks: &'a [DenseMlp<F>],
        calibration: &'a dyn CalibrationReader<F>,
    ) -> Result<FipsTrainer<'a, F>> {
        FipsTrainer::new(self.clone(), blocks, calibration, None)
    }

    /// As [`Self::trainer`], with a validation set for the report and for early stopping.
    pub fn trainer_validated<'a, F: Float>(
        &self,
        blocks: &'a [DenseMlp<F>],
        calibration: &'a dyn CalibrationReader<F>,
        validation: Option<&'a ValidationSet<F>>,
    ) -> Result<FipsTrainer<'a, F>> {
        FipsTrainer::new(self.clone(), blocks, calibration, validation)
    }
}

impl<F: Float> Compressor<F> for FipsValidParams {
    fn method(&self) -> Method {
        Method::Fips
    }

    fn parameters(&self) -> MethodParams {
        MethodParams::Fips(self.clone().into_params())
    }

    fn steps(&self) -> usize {
        FipsValidParams::steps(self)
    }

    fn compress(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &dyn CalibrationReader<F>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>> {
        self.compress_validated(blocks, calibration, None, on_step)
    }

    fn compress_validated(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &dyn CalibrationReader<F>,
        validation: Option<&ValidationSet<F>>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>> {
        let out = self.compress_with_validation(blocks, calibration, validation, |p| on_step(p))?;
        Ok(MethodOutput {
            blocks: CompressedBlocks::SharedBasis(out.group),
            report: out.report,
        })
    }
}
