//! Per-layer truncated SVD: the reference code's own baseline.
//!
//! Every matrix `W` (`[m, n]`) is replaced by its best rank-`r` approximation, `r = ⌊p m n /
//! (m + n)⌋`, stored as `A B` (`[m, r] · [r, n]`, the singular values folded into the factor on the
//! `d`-side as in FiPS). Optionally the factors are then trained with FiPS's block-wise
//! reconstruction loss and optimiser: the FiPS trainer with one basis per matrix
//! ([`BasisLayout::PerMatrix`]), no sharing, no sparsity; this module assembles its factors into
//! the low-rank form.

use std::ops::ControlFlow;

use crate::foundation::error::Result;
use crate::foundation::float::Float;
use crate::foundation::mlp::{DenseMlp, MatrixRole};
use crate::foundation::slicing::s;
use crate::math::bases::BasisLayout;
use crate::math::calibration::CalibrationReader;
use crate::methods::compressor::{Compressor, MethodOutput};
use crate::methods::fips::trainer::{FactorTrainer, Factors};
use crate::methods::guard::ParamGuard;
use crate::methods::params::{MethodParams, SvdValidParams};
use crate::methods::report::{Method, MethodDetails, MethodReport, Progress, SvdDetails};
use crate::repr::{CompressedBlocks, LowRankGroup, validate_group};

/// Splits per-matrix factors `U = [U_1 | …]`, `V = [V_1 | …]` into low-rank matrices
/// (`W̃_j = U_j V_j` is `d × I`; up projections store its transpose).
fn assemble_low_rank<F: Float>(f: &Factors<'_, F>) -> Result<CompressedBlocks<F>> {
    let (spec, rank) = (f.spec, f.rank);
    let (i, m) = (spec.shape.intermediate, spec.shape.matrices_per_block);
    let factors = (0..spec.shape.matrices())
        .map(|j| {
            let uj = f.u.slice(s![.., j * rank..(j + 1) * rank]);
            let (vj, _) = f.factor(j)?;
            Ok(match spec.kind.matrix_roles()[j % m] {
                MatrixRole::Up => (vj.t().to_owned(), uj.t().to_owned(), f.biases[j].clone()),
                MatrixRole::Down => (uj.to_owned(), vj, f.biases[j].clone()),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    LowRankGroup::independent(spec.kind, spec.activation, (spec.shape.width, i), factors)
        .map(CompressedBlocks::LowRank)
}

impl<F: Float> Compressor<F> for SvdValidParams {
    fn method(&self) -> Method {
        Method::Svd
    }

    fn parameters(&self) -> MethodParams {
        MethodParams::Svd(self.params().clone())
    }

    fn steps(&self) -> usize {
        SvdValidParams::steps(self)
    }

    fn compress(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &dyn CalibrationReader<F>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>> {
        let spec = validate_group(blocks, calibration.in_memory())?;
        let rank = self.rank(spec.shape.intermediate, spec.shape.width)?;
        let config = self.training_params(rank).check()?;
        let mut trainer = FactorTrainer::new(
            config,
            BasisLayout::PerMatrix,
            assemble_low_rank,
            blocks,
            calibration,
            None,
        )?;
        while let Some(progress) = trainer.step()? {
            if on_step(&progress).is_break() {
                break;
            }
        }
        let t = trainer.finish()?;
        let report = MethodReport {
            method: Method::Svd,
            kind: t.spec.kind,
            shape: t.spec.shape,
            parameters: t.blocks.parameter_count(),
            rel_error: t.final_errors.overall(),
            block_rel_error: t.final_errors.per_block(),
            steps: t.steps_run,
            loss_curve: t.loss_curve,
            calibration_tokens: t.calibration_tokens,
            data_free: t.data_free,
            wall_time: t.wall_time,
            validation: t.validation,
            details: MethodDetails::Svd(SvdDetails {
                rank,
                rel_error_svd: t.init_errors.overall(),
                steps_planned: t.steps_planned,
            }),
        };
        Ok(MethodOutput {
            blocks: t.blocks,
            report,
        })
    }
}
