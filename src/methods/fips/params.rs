//! FiPS hyper-parameters: a builder checked into valid parameters before any work.

use serde::{Deserialize, Serialize};

use crate::foundation::error::{Result, invalid};
use crate::math::budget::{Budget, DEFAULT_BUDGET_FRACTION, DEFAULT_SPARSITY, check_sparsity};
use crate::math::init::{DEFAULT_TAU, InitMethod};
use crate::math::objective::ContractionOrder;
use crate::math::optim::AdamW;
use crate::math::sparsity::Sparsifier;
use crate::math::tiles::MaskTiles;
use crate::math::validation::EarlyStopping;
use crate::methods::guard::ParamGuard;

/// Training steps per group of the library's defaults (the reference code's DeiT-B setting).
pub const DEFAULT_STEPS: usize = 600;
/// Calibration tokens per mini-batch of the library's defaults.
pub const DEFAULT_BATCH_TOKENS: usize = 2048;

/// FiPS settings, unchecked. Build with the methods below, then [`ParamGuard::check`] validates
/// every value and names the first bad one.
///
/// ```
/// use fips::{Budget, FipsParams, GmpSchedule, ParamGuard, Sparsifier};
/// let compressor = FipsParams::new()
///     .budget(Budget::Fraction(0.5))
///     .sparsity(0.75)
///     .sparsifier(Sparsifier::Gmp(GmpSchedule::default()))
///     .steps(400)
///     .check()?;
/// assert_eq!(compressor.steps(), 400);
/// # Ok::<(), fips::FipsError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FipsParams {
    budget: Budget,
    sparsity: f64,
    sparsifier: Sparsifier,
    steps: usize,
    batch_tokens: usize,
    optimizer: AdamW,
    init: InitMethod,
    tau: f64,
    seed: u64,
    contraction: ContractionOrder,
    threads: Option<usize>,
    early_stop: Option<EarlyStopping>,
    /// Left out of the serialised settings when entry-wise, so that earlier settings (and their
    /// fingerprints) read and hash as before.
    #[serde(skip_serializing_if = "MaskTiles::is_entries")]
    mask_tiles: MaskTiles,
    /// Settings written before this field existed read as `false` (how they were trained), so a
    /// work area trained otherwise is not reused.
    #[serde(default)]
    spend_unused_rank: bool,
}

/// Checked FiPS settings: every value is in range. They compress (see
/// [`FipsValidParams::compress`] and the [`Compressor`](crate::methods::Compressor) trait).
#[derive(Debug, Clone, PartialEq)]
pub struct FipsValidParams(FipsParams);

impl FipsParams {
    /// Training steps (as set, before validation).
    pub(crate) fn training_steps(&self) -> usize {
        self.steps
    }
    /// Tokens per mini-batch (as set, before validation).
    pub(crate) fn training_batch_tokens(&self) -> usize {
        self.batch_tokens
    }
}

impl Default for FipsParams {
    fn default() -> Self {
        Self {
            budget: Budget::Fraction(DEFAULT_BUDGET_FRACTION),
            sparsity: DEFAULT_SPARSITY,
            sparsifier: Sparsifier::default(),
            steps: DEFAULT_STEPS,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            optimizer: AdamW::default(),
            init: InitMethod::default(),
            tau: DEFAULT_TAU,
            seed: 0,
            contraction: ContractionOrder::Auto,
            threads: None,
            early_stop: None,
            mask_tiles: MaskTiles::Entries,
            spend_unused_rank: true,
        }
    }
}

impl FipsParams {
    /// The defaults: p = 0.5, s = 0.75 with RigL, 600 steps of 2048 tokens, AdamW (lr 1e-4 → 1e-5,
    /// betas 0.9/0.999, eps 1e-8, wd 0.05), Gram initialisation with τ = 32, seed 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The parameter budget: a fraction `p` of the dense MLP weights, or an explicit rank.
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }

    /// Target sparsity `s ∈ [0, 1)` of the factors `V` (also used by the budget formula).
    pub fn sparsity(mut self, sparsity: f64) -> Self {
        self.sparsity = sparsity;
        self
    }

    /// How the sparsity is reached (GMP, RigL, or none for `s = 0`).
    pub fn sparsifier(mut self, sparsifier: Sparsifier) -> Self {
        self.sparsifier = sparsifier;
        self
    }

    /// Training steps (0 keeps the budget-matched SVD initialisation).
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }

    /// Calibration tokens per mini-batch (the same token indices for every block).
    pub fn batch_tokens(mut self, batch_tokens: usize) -> Self {
        self.batch_tokens = batch_tokens;
        self
    }

    /// All optimiser settings at once.
    pub fn optimizer(mut self, optimizer: AdamW) -> Self {
        self.optimizer = optimizer;
        self
    }

    /// Peak learning rate.
    pub fn learning_rate(mut self, lr: f64) -> Self {
        self.optimizer.learning_rate = lr;
        self
    }

    /// Floor of the cosine learning-rate decay.
    pub fn min_learning_rate(mut self, lr: f64) -> Self {
        self.optimizer.min_learning_rate = lr;
        self
    }

    /// Decoupled weight decay.
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.optimizer.weight_decay = wd;
        self
    }

    /// How the initial factorisation is computed.
    pub fn init(mut self, init: InitMethod) -> Self {
        self.init = init;
        self
    }

    /// Padding divisor τ for ranks above `min(d, f n I)`.
    pub fn tau(mut self, tau: f64) -> Self {
        self.tau = tau;
        self
    }

    /// Seed of the mini-batch sampler.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Contraction order of the training step.
    pub fn contraction(mut self, order: ContractionOrder) -> Self {
        self.contraction = order;
        self
    }

    /// Threads for the elementwise passes of the training step (default: the available
    /// parallelism). BLAS keeps its own setting (for OpenBLAS, the `OPENBLAS_NUM_THREADS`
    /// environment variable). Results are reproducible for a given seed and thread counts.
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }

    /// Stops a group's training once its error on the held-out validation tokens stops
    /// improving (`None`: run every step). Needs a validation set
    /// ([`Compressor::compress_validated`](crate::methods::Compressor::compress_validated) or
    /// [`FipsValidParams::trainer_validated`]).
    pub fn early_stop(mut self, early_stop: Option<EarlyStopping>) -> Self {
        self.early_stop = early_stop;
        self
    }

    /// How the mask of the sparse factors is structured (default [`MaskTiles::Entries`]; with
    /// [`MaskTiles::Square2`] entries are kept or dropped in 2×2 tiles of `V`).
    pub fn mask_tiles(mut self, tiles: MaskTiles) -> Self {
        self.mask_tiles = tiles;
        self
    }

    /// Whether the basis parameters of components that can never train are given to `V`
    /// (default `true`). With `r > d` the initialisation pads `U` with zero columns; under RigL a
    /// padded component whose row of `V` keeps no entry at the start never receives gradient, so
    /// its `d` parameters of `U` would count against the budget unused. With this set `V` keeps
    /// `d` more entries for each such component (its sparsity ends slightly below the target,
    /// reported as `FipsDetails::sparsity`), so the group holds the budget's parameters; `false`
    /// keeps the reference's count (sparsity exactly the target, the padded parameters unused).
    /// Entry-wise masks with one shared basis only.
    pub fn spend_unused_rank(mut self, spend: bool) -> Self {
        self.spend_unused_rank = spend;
        self
    }
}

impl ParamGuard for FipsParams {
    type Checked = FipsValidParams;

    /// Validates every setting.
    fn check(&self) -> Result<FipsValidParams> {
        self.budget.check()?;
        check_sparsity(self.sparsity)?;
        self.sparsifier.check(self.sparsity)?;
        if self.batch_tokens == 0 {
            return Err(invalid("batch_tokens", "must be at least 1"));
        }
        self.optimizer.check()?;
        if let Some(e) = &self.early_stop {
            e.check()?;
        }
        if self.threads == Some(0) {
            return Err(invalid("threads", "must be at least 1"));
        }
        if !(self.tau > 0.0 && self.tau.is_finite()) {
            return Err(invalid(
                "tau",
                format!("must be positive and finite, got {}", self.tau),
            ));
        }
        Ok(FipsValidParams(self.clone()))
    }
}

impl FipsValidParams {
    /// The parameter budget.
    pub fn budget(&self) -> Budget {
        self.0.budget
    }
    /// Target sparsity of `V`.
    pub fn sparsity(&self) -> f64 {
        self.0.sparsity
    }
    /// The sparsifier (reported as none when the sparsity is 0).
    pub fn sparsifier(&self) -> Sparsifier {
        if self.0.sparsity > 0.0 {
            self.0.sparsifier
        } else {
            Sparsifier::None
        }
    }
    /// Training steps.
    pub fn steps(&self) -> usize {
        self.0.steps
    }
    /// Tokens per mini-batch.
    pub fn batch_tokens(&self) -> usize {
        self.0.batch_tokens
    }
    /// Optimiser settings.
    pub fn optimizer(&self) -> &AdamW {
        &self.0.optimizer
    }
    /// Initialisation route.
    pub fn init(&self) -> InitMethod {
        self.0.init
    }
    /// Padding divisor τ.
    pub fn tau(&self) -> f64 {
        self.0.tau
    }
    /// Sampler seed.
    pub fn seed(&self) -> u64 {
        self.0.seed
    }
    /// Contraction order.
    pub fn contraction(&self) -> ContractionOrder {
        self.0.contraction
    }
    /// Threads of the elementwise passes.
    pub fn threads(&self) -> usize {
        self.0
            .threads
            .unwrap_or_else(crate::foundation::thread_plan::available_threads)
    }
    /// Early stopping on the validation error, if set.
    pub fn early_stop(&self) -> Option<EarlyStopping> {
        self.0.early_stop
    }
    /// How the mask of the sparse factors is structured.
    pub fn mask_tiles(&self) -> MaskTiles {
        self.0.mask_tiles
    }
    /// Whether the basis parameters of components that can never train go to `V`.
    pub fn spend_unused_rank(&self) -> bool {
        self.0.spend_unused_rank
    }
    /// The unchecked settings, to modify and check again.
    pub fn into_params(self) -> FipsParams {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::foundation::error::FipsError;
    use crate::math::sparsity::GmpSchedule;
    use crate::math::validation::EarlyStopping;

    fn rejected(p: FipsParams, name: &str) {
        match p.check() {
            Err(FipsError::InvalidParameter { name: got, .. }) => assert_eq!(got, name),
            other => panic!("expected {name} to be rejected, got {other:?}"),
        }
    }

    #[test]
    fn every_bad_value_is_named() {
        rejected(FipsParams::new().budget(Budget::Fraction(0.0)), "budget");
        rejected(FipsParams::new().budget(Budget::Fraction(1.01)), "budget");
        rejected(FipsParams::new().budget(Budget::Rank(0)), "budget");
        rejected(FipsParams::new().sparsity(1.0), "sparsity");
        rejected(FipsParams::new().sparsity(-0.5), "sparsity");
        rejected(FipsParams::new().sparsifier(Sparsifier::None), "sparsifier");
        rejected(FipsParams::new().batch_tokens(0), "batch_tokens");
        rejected(FipsParams::new().learning_rate(-1.0), "learning_rate");
        rejected(
            FipsParams::new().min_learning_rate(1.0),
            "min_learning_rate",
        );
        rejected(
            FipsParams::new().weight_decay(f64::INFINITY),
            "weight_decay",
        );
        rejected(FipsParams::new().tau(0.0), "tau");
        rejected(FipsParams::new().threads(0), "threads");
        rejected(
            FipsParams::new().early_stop(Some(EarlyStopping::new(0))),
            "early stop patience",
        );
        rejected(
            FipsParams::new().early_stop(Some(EarlyStopping::new(100).tolerance(1.0))),
            "early stop tolerance",
        );
        rejected(
            FipsParams::new().sparsifier(Sparsifier::Gmp(GmpSchedule {
                interval: 0,
                ..Default::default()
            })),
            "gmp.interval",
        );
    }

    /// Settings written before `spend_unused_rank` existed read as `false` (how they trained),
    /// while new settings default to `true` and round-trip.
    #[test]
    fn older_settings_read_without_spending_the_unused_rank() {
        let mut old = serde_json::to_value(FipsParams::new()).unwrap();
        old.as_object_mut().unwrap().remove("spend_unused_rank");
        let read: FipsParams = serde_json::from_value(old).unwrap();
        assert!(!read.check().unwrap().spend_unused_rank());
        assert!(FipsParams::new().check().unwrap().spend_unused_rank());
        let text = serde_json::to_string(&FipsParams::new().spend_unused_rank(false)).unwrap();
        let back: FipsParams = serde_json::from_str(&text).unwrap();
        assert_eq!(back, FipsParams::new().spend_unused_rank(false));
    }

    #[test]
    fn defaults_are_valid_and_dense_needs_no_sparsifier() {
        let v = FipsParams::new().check().unwrap();
        assert_eq!(v.budget(), Budget::Fraction(0.5));
        assert_eq!(v.sparsity(), 0.75);
        let dense = FipsParams::new()
            .sparsity(0.0)
            .sparsifier(Sparsifier::None)
            .check()
            .unwrap();
        assert_eq!(dense.sparsifier(), Sparsifier::None);
        let dense = FipsParams::new().sparsity(0.0).check().unwrap();
        assert_eq!(dense.sparsifier(), Sparsifier::None);
    }
}
