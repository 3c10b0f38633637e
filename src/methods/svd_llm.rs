//! SVD-LLM-style activation-aware SVD by whitening: each matrix gets the rank-`r` factors that
//! minimise its output error on the calibration inputs (see [`whitening`](super::whitening)),
//! `r = ⌊p m n / (m + n)⌋`. Closed form, no training. The down projection's inputs are the
//! activated hidden states of the original block, computed from the captured MLP inputs.

use std::ops::ControlFlow;
use std::time::Instant;

use crate::budget::{Budget, rank_for_matrix};
use crate::calibration::Calibration;
use crate::compressor::Progress;
use crate::error::Result;
use crate::float::Float;
use crate::methods::lowrank::LowRankGroup;
use crate::methods::whitening::{WhitenedSvd, block_input_grams};
use crate::methods::{CompressedBlocks, Compressor, MethodOutput, check_group};
use crate::mlp::{DenseMlp, MatrixRole};

/// Settings of SVD-LLM-style whitened SVD.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SvdLlmParams {
    budget: Budget,
}

/// Checked settings of SVD-LLM-style whitened SVD.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SvdLlmCompressor(SvdLlmParams);

impl Default for SvdLlmParams {
    fn default() -> Self {
        Self {
            budget: Budget::Fraction(0.5),
        }
    }
}

impl SvdLlmParams {
    /// Default: p = 0.5.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fraction `p` of each matrix's weights to keep (or an explicit rank).
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }

    /// Validates the settings.
    pub fn build(&self) -> Result<SvdLlmCompressor> {
        self.budget.check()?;
        Ok(SvdLlmCompressor(*self))
    }
}

impl SvdLlmCompressor {
    fn rank(&self, m: usize, n: usize) -> Result<usize> {
        match self.0.budget {
            Budget::Fraction(p) => rank_for_matrix(m, n, p),
            Budget::Rank(r) => crate::limits::low_rank("rank", r, m, n),
        }
    }
}

impl<F: Float> Compressor<F> for SvdLlmCompressor {
    fn method(&self) -> &'static str {
        "svd-llm"
    }

    fn parameters(&self) -> serde_json::Value {
        serde_json::json!({ "budget": self.0.budget.to_json() })
    }

    fn compress(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &Calibration<F>,
        _on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>> {
        let start = Instant::now();
        check_group(blocks, calibration)?;
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
        MethodOutput::measured(
            "svd-llm",
            blocks,
            CompressedBlocks::LowRank(group),
            calibration,
            start,
            (0, Vec::new()),
            serde_json::json!({ "rank": rank, "jitter": jitters }),
        )
    }
}
