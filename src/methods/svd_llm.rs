//! SVD-LLM-style activation-aware SVD by whitening: each matrix gets the rank-`r` factors that
//! minimise its output error on the calibration inputs (see [`whitening`](crate::math::whitening)),
//! `r = ⌊p m n / (m + n)⌋`. Closed form, no training. The down projection's inputs are the
//! activated hidden states of the original block, computed from the captured MLP inputs.

use std::ops::ControlFlow;
use std::time::Instant;

use crate::foundation::error::Result;
use crate::foundation::float::Float;
use crate::foundation::mlp::{DenseMlp, MatrixRole};
use crate::math::calibration::{Calibration, CalibrationReader};
use crate::math::subset::read_whole;
use crate::math::whitening::{WhitenedSvd, block_input_grams};
use crate::methods::compressor::{Compressor, MethodOutput, Run};
use crate::methods::params::{MethodParams, SvdLlmValidParams};
use crate::methods::report::{Method, MethodDetails, Progress, SvdLlmDetails};
use crate::repr::{CompressedBlocks, LowRankGroup, validate_group};

impl<F: Float> Compressor<F> for SvdLlmValidParams {
    fn method(&self) -> Method {
        Method::SvdLlm
    }

    fn parameters(&self) -> MethodParams {
        MethodParams::SvdLlm(*self.params())
    }

    fn compress(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &dyn CalibrationReader<F>,
        _on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>> {
        // Every token in memory at once (see `Compressor::compress`).
        crate::math::calibration::refuse_targets(calibration, "SVD-LLM")?;
        let whole = read_whole(calibration)?;
        let calibration: &Calibration<F> = &whole;
        let start = Instant::now();
        let spec = validate_group(blocks, Some(calibration))?;
        let (d, i) = (blocks[0].width(), blocks[0].intermediate());
        let rank = self.rank(i, d)?;
        let mut factors = Vec::new();
        let mut jitters = Vec::new();
        for (mlp, z) in blocks.iter().zip(calibration.inputs()) {
            let (up_gram, down_gram) = block_input_grams(mlp, z.view())?;
            for (layer, role) in mlp.layers().iter().zip(mlp.kind().matrix_roles()) {
                let gram = match role {
                    MatrixRole::Up => &up_gram,
                    MatrixRole::Down => &down_gram,
                };
                let svd = WhitenedSvd::new(layer.weight().view(), gram)?;
                jitters.push(svd.jitter);
                let (a, b) = svd.factors::<F>(rank)?;
                factors.push((a, b, layer.bias().cloned()));
            }
        }
        let group =
            LowRankGroup::independent(blocks[0].kind(), blocks[0].activation(), (d, i), factors)?;
        let run = Run {
            method: Method::SvdLlm,
            spec,
            start,
            steps: 0,
            loss_curve: Vec::new(),
            details: MethodDetails::SvdLlm(SvdLlmDetails {
                rank,
                jitter: jitters,
            }),
        };
        MethodOutput::measured(run, blocks, CompressedBlocks::LowRank(group), calibration)
    }
}
