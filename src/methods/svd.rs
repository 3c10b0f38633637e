//! Per-layer truncated SVD: the reference code's own baseline.
//!
//! Every matrix `W` (`[m, n]`) is replaced by its best rank-`r` approximation, `r = ⌊p m n /
//! (m + n)⌋`, stored as `A B` (`[m, r] · [r, n]`, the singular values folded into the factor on the
//! `d`-side as in FiPS). Optionally the factors are then trained with FiPS's block-wise
//! reconstruction loss and optimiser (each matrix keeping its own basis; no sharing, no sparsity).

use std::ops::ControlFlow;

use crate::budget::{Budget, rank_for_matrix};
use crate::calibration::Calibration;
use crate::compressor::Progress;
use crate::error::{Result, invalid};
use crate::float::Float;
use crate::methods::{CompressedBlocks, Compressor, MethodOutput, MethodReport, check_group};
use crate::mlp::DenseMlp;
use crate::optim::AdamW;
use crate::params::FipsParams;
use crate::sparsity::Sparsifier;

/// Settings of the per-layer SVD baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct SvdParams {
    budget: Budget,
    steps: usize,
    batch_tokens: usize,
    optimizer: AdamW,
    seed: u64,
    threads: Option<usize>,
}

/// Checked settings of the per-layer SVD baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct SvdCompressor(SvdParams);

impl Default for SvdParams {
    fn default() -> Self {
        Self {
            budget: Budget::Fraction(0.5),
            steps: 0,
            batch_tokens: 1024,
            optimizer: AdamW::default(),
            seed: 0,
            threads: None,
        }
    }
}

impl SvdParams {
    /// Defaults: p = 0.5, no training.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fraction `p` of each matrix's weights to keep (or an explicit rank).
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }

    /// Steps of reconstruction training after the SVD (0: none, the plain baseline).
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }

    /// Tokens per training mini-batch.
    pub fn batch_tokens(mut self, batch_tokens: usize) -> Self {
        self.batch_tokens = batch_tokens;
        self
    }

    /// The optimiser of the training.
    pub fn optimizer(mut self, optimizer: AdamW) -> Self {
        self.optimizer = optimizer;
        self
    }

    /// Seed of the mini-batch sampler.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Threads of the elementwise passes.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }

    /// Validates the settings.
    pub fn build(&self) -> Result<SvdCompressor> {
        self.budget.check()?;
        if self.batch_tokens == 0 {
            return Err(invalid("batch_tokens", "must be at least 1"));
        }
        self.optimizer.check()?;
        if self.threads == Some(0) {
            return Err(invalid("threads", "must be at least 1"));
        }
        Ok(SvdCompressor(self.clone()))
    }
}

impl SvdCompressor {
    /// The rank of a `[m, n]` matrix under these settings.
    pub fn rank(&self, m: usize, n: usize) -> Result<usize> {
        match self.0.budget {
            Budget::Fraction(p) => rank_for_matrix(m, n, p),
            Budget::Rank(r) => crate::limits::low_rank("rank", r, m, n),
        }
    }

    /// The FiPS settings that run the SVD and its optional training with one basis per matrix.
    fn fips_params(&self, rank: usize) -> Result<crate::compressor::FipsCompressor> {
        let p = &self.0;
        let mut params = FipsParams::new()
            .budget(Budget::Rank(rank))
            .sparsity(0.0)
            .sparsifier(Sparsifier::None)
            .steps(p.steps)
            .batch_tokens(p.batch_tokens)
            .optimizer(p.optimizer)
            .seed(p.seed);
        if let Some(t) = p.threads {
            params = params.threads(t);
        }
        params.build()
    }
}

impl<F: Float> Compressor<F> for SvdCompressor {
    fn method(&self) -> &'static str {
        "svd"
    }

    fn parameters(&self) -> serde_json::Value {
        let p = &self.0;
        serde_json::json!({
            "budget": p.budget.to_json(),
            "steps": p.steps,
            "batch_tokens": p.batch_tokens,
            "learning_rate": p.optimizer.learning_rate,
            "min_learning_rate": p.optimizer.min_learning_rate,
            "weight_decay": p.optimizer.weight_decay,
            "seed": p.seed,
        })
    }

    fn steps(&self) -> usize {
        self.0.steps
    }

    fn compress(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &Calibration<F>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>> {
        check_group(blocks, calibration)?;
        let first = &blocks[0];
        let rank = self.rank(first.intermediate(), first.width())?;
        let compressor = self.fips_params(rank)?;
        let mut trainer = compressor.per_matrix_trainer(blocks, calibration)?;
        while let Some(progress) = trainer.step()? {
            if on_step(&progress).is_break() {
                break;
            }
        }
        let (group, r) = trainer.finish_low_rank()?;
        let report = MethodReport {
            method: "svd",
            parameters: group.parameter_count(),
            rel_error: r.rel_error_final,
            block_rel_error: r.block_rel_error_final.clone(),
            steps: r.steps_run,
            loss_curve: r.loss_curve.clone(),
            wall_time: r.wall_time,
            details: serde_json::json!({
                "rank": rank,
                "rel_error_svd": r.rel_error_init,
            }),
        };
        Ok(MethodOutput {
            blocks: CompressedBlocks::LowRank(group),
            report,
        })
    }
}
