//! The settings of every method but FiPS (whose settings are in [`fips::params`](super::fips::params)),
//! each as an unchecked `XParams` builder and its checked `XValidParams` (which compresses), plus
//! [`MethodParams`], the settings of any method as one serde-derived value.
//!
//! Every default is a public constant, so front ends (the `fips` command) show and use the
//! library's values.

use serde::{Deserialize, Serialize};

use crate::foundation::error::{Result, invalid};
use crate::math::budget::{Budget, DEFAULT_BUDGET_FRACTION, rank_for_matrix};
use crate::math::optim::AdamW;
use crate::methods::fips::params::FipsParams;
use crate::methods::guard::ParamGuard;
use crate::methods::report::Method;

/// Tokens per mini-batch of the baselines that train (trained SVD, mixed rank, LayerCollapse).
pub const DEFAULT_BATCH_TOKENS: usize = 1024;

/// The settings of any method, serde-derived (tagged by `method`), for manifests and reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum MethodParams {
    /// FiPS.
    Fips(FipsParams),
    /// Per-layer SVD.
    Svd(SvdParams),
    /// SVD-LLM.
    SvdLlm(SvdLlmParams),
    /// Basis sharing.
    BasisSharing(BasisSharingParams),
    /// Mixed rank.
    MixedRank(MixedRankParams),
    /// LayerCollapse.
    LayerCollapse(LayerCollapseParams),
}

impl MethodParams {
    /// The method these settings are for.
    pub fn method(&self) -> Method {
        match self {
            Self::Fips(_) => Method::Fips,
            Self::Svd(_) => Method::Svd,
            Self::SvdLlm(_) => Method::SvdLlm,
            Self::BasisSharing(_) => Method::BasisSharing,
            Self::MixedRank(_) => Method::MixedRank,
            Self::LayerCollapse(_) => Method::LayerCollapse,
        }
    }

    /// The tokens one training step draws, where these settings need at least that many
    /// calibration tokens per block (FiPS training, mixed rank's trained residuals); `None` where
    /// any calibration will do. Lets a caller refuse a too-small calibration before capturing it.
    pub fn required_batch_tokens(&self) -> Option<usize> {
        match self {
            Self::Fips(p) => (p.training_steps() > 0).then_some(p.training_batch_tokens()),
            Self::MixedRank(p) => (p.steps > 0 && p.residual_rank > 0).then_some(p.batch_tokens),
            _ => None,
        }
    }
}

/// The rank of a `[m, n]` matrix under a per-matrix budget.
fn matrix_rank(budget: Budget, m: usize, n: usize) -> Result<usize> {
    match budget {
        Budget::Fraction(p) => rank_for_matrix(m, n, p),
        Budget::Rank(r) => crate::math::limits::low_rank("rank", r, m, n),
    }
}

// ---------------------------------------------------------------------------------------------
// Per-layer SVD

/// Settings of the per-layer SVD baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
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
pub struct SvdValidParams(SvdParams);

impl Default for SvdParams {
    fn default() -> Self {
        Self {
            budget: Budget::Fraction(DEFAULT_BUDGET_FRACTION),
            steps: 0,
            batch_tokens: DEFAULT_BATCH_TOKENS,
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
}

impl ParamGuard for SvdParams {
    type Checked = SvdValidParams;

    fn check(&self) -> Result<SvdValidParams> {
        self.budget.check()?;
        if self.batch_tokens == 0 {
            return Err(invalid("batch_tokens", "must be at least 1"));
        }
        self.optimizer.check()?;
        if self.threads == Some(0) {
            return Err(invalid("threads", "must be at least 1"));
        }
        Ok(SvdValidParams(self.clone()))
    }
}

impl SvdValidParams {
    /// The unchecked settings.
    pub fn params(&self) -> &SvdParams {
        &self.0
    }

    /// The rank of a `[m, n]` matrix under these settings.
    pub fn rank(&self, m: usize, n: usize) -> Result<usize> {
        matrix_rank(self.0.budget, m, n)
    }

    /// Training steps after the SVD.
    pub fn steps(&self) -> usize {
        self.0.steps
    }

    /// The FiPS settings that train the factors (rank `rank`, no sparsity): the same loss and
    /// optimiser as FiPS.
    pub(crate) fn training_params(&self, rank: usize) -> FipsParams {
        let p = &self.0;
        let mut params = FipsParams::new()
            .budget(Budget::Rank(rank))
            .sparsity(0.0)
            .sparsifier(crate::math::sparsity::Sparsifier::None)
            .steps(p.steps)
            .batch_tokens(p.batch_tokens)
            .optimizer(p.optimizer)
            .seed(p.seed);
        if let Some(t) = p.threads {
            params = params.threads(t);
        }
        params
    }
}

// ---------------------------------------------------------------------------------------------
// SVD-LLM

/// Settings of SVD-LLM-style whitened SVD.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SvdLlmParams {
    budget: Budget,
}

/// Checked settings of SVD-LLM-style whitened SVD.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SvdLlmValidParams(SvdLlmParams);

impl Default for SvdLlmParams {
    fn default() -> Self {
        Self {
            budget: Budget::Fraction(DEFAULT_BUDGET_FRACTION),
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
}

impl ParamGuard for SvdLlmParams {
    type Checked = SvdLlmValidParams;

    fn check(&self) -> Result<SvdLlmValidParams> {
        self.budget.check()?;
        Ok(SvdLlmValidParams(*self))
    }
}

impl SvdLlmValidParams {
    /// The unchecked settings.
    pub fn params(&self) -> &SvdLlmParams {
        &self.0
    }

    /// The rank of a `[m, n]` matrix under these settings.
    pub fn rank(&self, m: usize, n: usize) -> Result<usize> {
        matrix_rank(self.0.budget, m, n)
    }
}

// ---------------------------------------------------------------------------------------------
// Basis sharing

/// Settings of basis sharing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BasisSharingParams {
    budget: Budget,
}

/// Checked settings of basis sharing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BasisSharingValidParams(BasisSharingParams);

impl Default for BasisSharingParams {
    fn default() -> Self {
        Self {
            budget: Budget::Fraction(DEFAULT_BUDGET_FRACTION),
        }
    }
}

impl BasisSharingParams {
    /// Default: p = 0.5.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fraction `p` of each type's weights to keep over the group (or an explicit shared rank).
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }
}

impl ParamGuard for BasisSharingParams {
    type Checked = BasisSharingValidParams;

    fn check(&self) -> Result<BasisSharingValidParams> {
        self.budget.check()?;
        Ok(BasisSharingValidParams(*self))
    }
}

impl BasisSharingValidParams {
    /// The unchecked settings.
    pub fn params(&self) -> &BasisSharingParams {
        &self.0
    }

    /// The budget.
    pub fn budget(&self) -> Budget {
        self.0.budget
    }
}

// ---------------------------------------------------------------------------------------------
// Mixed rank

/// Rank `q` of each mixed-rank residual.
pub const DEFAULT_RESIDUAL_RANK: usize = 8;
/// Step of mixed rank's candidate ranks.
pub const DEFAULT_RANK_GRID: usize = 8;
/// Adam steps per mixed-rank residual.
pub const DEFAULT_RESIDUAL_STEPS: usize = 200;
/// Peak learning rate of the mixed-rank residuals and of LayerCollapse.
pub const DEFAULT_BASELINE_LEARNING_RATE: f64 = 1e-3;

/// How the greedy allocation weighs the output energy a matrix loses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnergyMeasure {
    /// The loss carried to the block's output (the default): exact for down projections; for an
    /// up projection, `s Σ_{i>r} σ_i²` with `s = (1/I) Σ_k E[c_k²] ‖W_down[:, k]‖²`, where
    /// `c = ∂A/∂H` (`act'(h)`; gated: `act'(g) ⊙ u` for gate, `act(g)` for up), the linearised
    /// gain from an isotropic hidden-state error to the block output. Comparable across all
    /// matrices of all blocks.
    #[default]
    BlockOutput,
    /// `Σ_{i>r} σ_i²`: each matrix's own output error.
    Absolute,
    /// `Σ_{i>r} σ_i² / Σ_i σ_i²`: every matrix's loss relative to its own output (the reference
    /// notes' reconstruction).
    Relative,
}

/// Settings of the mixed-rank method.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MixedRankParams {
    pub(crate) budget: f64,
    pub(crate) energy: EnergyMeasure,
    pub(crate) residual_rank: usize,
    pub(crate) grid: usize,
    pub(crate) steps: usize,
    pub(crate) batch_tokens: usize,
    pub(crate) learning_rate: f64,
    pub(crate) seed: u64,
}

/// Checked settings of the mixed-rank method.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixedRankValidParams(pub(crate) MixedRankParams);

impl Default for MixedRankParams {
    fn default() -> Self {
        Self {
            budget: DEFAULT_BUDGET_FRACTION,
            energy: EnergyMeasure::BlockOutput,
            residual_rank: DEFAULT_RESIDUAL_RANK,
            grid: DEFAULT_RANK_GRID,
            steps: DEFAULT_RESIDUAL_STEPS,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            learning_rate: DEFAULT_BASELINE_LEARNING_RATE,
            seed: 0,
        }
    }
}

impl MixedRankParams {
    /// Defaults: p = 0.5, residual rank q = 8, rank grid 8, 200 Adam steps of 1024 tokens at
    /// lr 1e-3 per matrix.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fraction `p` of the group's dense MLP weights to keep (residuals included).
    pub fn budget(mut self, p: f64) -> Self {
        self.budget = p;
        self
    }

    /// How lost energy is compared across matrices.
    pub fn energy(mut self, energy: EnergyMeasure) -> Self {
        self.energy = energy;
        self
    }

    /// Rank `q` of each residual (0: no error compensation).
    pub fn residual_rank(mut self, q: usize) -> Self {
        self.residual_rank = q;
        self
    }

    /// Step of the candidate ranks.
    pub fn grid(mut self, grid: usize) -> Self {
        self.grid = grid;
        self
    }

    /// Adam steps per residual.
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }

    /// Tokens per residual mini-batch.
    pub fn batch_tokens(mut self, batch_tokens: usize) -> Self {
        self.batch_tokens = batch_tokens;
        self
    }

    /// Peak learning rate of the residual training (cosine decay to a tenth of it).
    pub fn learning_rate(mut self, lr: f64) -> Self {
        self.learning_rate = lr;
        self
    }

    /// Seed of the residual initialisation and batches.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub(crate) fn optimizer(&self) -> AdamW {
        AdamW {
            learning_rate: self.learning_rate,
            min_learning_rate: self.learning_rate / 10.0,
            weight_decay: 0.0,
            ..AdamW::default()
        }
    }
}

impl ParamGuard for MixedRankParams {
    type Checked = MixedRankValidParams;

    fn check(&self) -> Result<MixedRankValidParams> {
        Budget::Fraction(self.budget).check()?;
        if self.grid == 0 {
            return Err(invalid("grid", "must be at least 1"));
        }
        if self.batch_tokens == 0 {
            return Err(invalid("batch_tokens", "must be at least 1"));
        }
        self.optimizer().check()?;
        Ok(MixedRankValidParams(*self))
    }
}

impl MixedRankValidParams {
    /// The unchecked settings.
    pub fn params(&self) -> &MixedRankParams {
        &self.0
    }
}

// ---------------------------------------------------------------------------------------------
// LayerCollapse

/// Weight λ of LayerCollapse's linearity regulariser `λ (α − 1)²`.
pub const DEFAULT_COLLAPSE_LAMBDA: f64 = 0.2;
/// Step limit per collapsed block.
pub const DEFAULT_COLLAPSE_STEPS: usize = 2000;

/// Settings of LayerCollapse.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LayerCollapseParams {
    pub(crate) lambda: f64,
    pub(crate) lambda_doubling_steps: usize,
    pub(crate) initial_slope: f64,
    pub(crate) tolerance: f64,
    pub(crate) max_steps: usize,
    pub(crate) batch_tokens: usize,
    pub(crate) learning_rate: f64,
    pub(crate) seed: u64,
}

/// Checked settings of LayerCollapse.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerCollapseValidParams(pub(crate) LayerCollapseParams);

impl Default for LayerCollapseParams {
    fn default() -> Self {
        Self {
            lambda: DEFAULT_COLLAPSE_LAMBDA,
            lambda_doubling_steps: 200,
            initial_slope: 0.01,
            tolerance: 0.05,
            max_steps: DEFAULT_COLLAPSE_STEPS,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            learning_rate: DEFAULT_BASELINE_LEARNING_RATE,
            seed: 0,
        }
    }
}

impl LayerCollapseParams {
    /// Defaults: λ = 0.2 doubling every 200 steps, α₀ = 0.01, tolerance 0.05, at most 2000 Adam
    /// steps of 1024 tokens at lr 1e-3.
    pub fn new() -> Self {
        Self::default()
    }

    /// Weight λ of the linearity regulariser `λ (α − 1)²`.
    pub fn lambda(mut self, lambda: f64) -> Self {
        self.lambda = lambda;
        self
    }

    /// Steps after which λ doubles (0: λ stays fixed).
    pub fn lambda_doubling_steps(mut self, steps: usize) -> Self {
        self.lambda_doubling_steps = steps;
        self
    }

    /// Starting PReLU slope α₀.
    pub fn initial_slope(mut self, alpha: f64) -> Self {
        self.initial_slope = alpha;
        self
    }

    /// Training stops once `|α − 1|` is below this.
    pub fn tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Step limit per block (the block is merged at α = 1 even if the slope has not converged;
    /// the report says so).
    pub fn max_steps(mut self, steps: usize) -> Self {
        self.max_steps = steps;
        self
    }

    /// Tokens per mini-batch.
    pub fn batch_tokens(mut self, batch_tokens: usize) -> Self {
        self.batch_tokens = batch_tokens;
        self
    }

    /// Adam learning rate (constant).
    pub fn learning_rate(mut self, lr: f64) -> Self {
        self.learning_rate = lr;
        self
    }

    /// Seed of the mini-batches.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub(crate) fn optimizer(&self) -> AdamW {
        AdamW {
            learning_rate: self.learning_rate,
            min_learning_rate: self.learning_rate,
            weight_decay: 0.0,
            ..AdamW::default()
        }
    }
}

impl ParamGuard for LayerCollapseParams {
    type Checked = LayerCollapseValidParams;

    fn check(&self) -> Result<LayerCollapseValidParams> {
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) {
            return Err(invalid(
                "lambda",
                format!("must be non-negative, got {}", self.lambda),
            ));
        }
        if !self.initial_slope.is_finite() {
            return Err(invalid("initial_slope", "must be finite"));
        }
        if !(self.tolerance > 0.0 && self.tolerance.is_finite()) {
            return Err(invalid(
                "tolerance",
                format!("must be positive, got {}", self.tolerance),
            ));
        }
        if self.batch_tokens == 0 {
            return Err(invalid("batch_tokens", "must be at least 1"));
        }
        self.optimizer().check()?;
        Ok(LayerCollapseValidParams(*self))
    }
}

impl LayerCollapseValidParams {
    /// The unchecked settings.
    pub fn params(&self) -> &LayerCollapseParams {
        &self.0
    }
}
