//! Choosing a method and its settings from a front end's options (the `fips` command's flags).
//!
//! [`MethodOptions`] holds every option a front end may collect, each `None` when not given; a
//! given option the chosen method does not use is a typed error
//! ([`FipsError::UnusedParameter`]), never silently ignored. Options not given take the
//! [`TrainingDefaults`] passed in (for FiPS and the training settings of the baselines) or the
//! method's own defaults.

use serde::{Deserialize, Serialize};

use crate::foundation::error::{FipsError, Result};
use crate::math::budget::{Budget, DEFAULT_BUDGET_FRACTION};
use crate::math::init::InitMethod;
use crate::math::objective::ContractionOrder;
use crate::math::optim::AdamW;
use crate::math::sparsity::{GmpSchedule, RiglSchedule, Sparsifier};
use crate::math::tiles::MaskTiles;
use crate::math::validation::EarlyStopping;
use crate::methods::compressor::Compressor;
use crate::methods::fips::params::FipsParams;
use crate::methods::guard::ParamGuard;
use crate::methods::params::{
    BasisSharingParams, LayerCollapseParams, MixedRankParams, SvdLlmParams, SvdParams,
};
use crate::methods::report::Method;

/// Training settings of a compression run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainingDefaults {
    /// Steps per group.
    pub steps: usize,
    /// Tokens per mini-batch.
    pub batch_tokens: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Final learning rate of the cosine decay.
    pub min_learning_rate: f64,
    /// Decoupled weight decay of AdamW.
    pub weight_decay: f64,
    /// How FiPS's factors reach their sparsity.
    pub sparsifier: SparsifierKind,
    /// Steps between sparsifier updates (GMP pruning events, RigL drop/grow).
    pub sparsifier_interval: usize,
    /// RigL's initial drop fraction α (the share of kept entries swapped at its first update).
    pub rigl_drop_fraction: f64,
}

/// Settings for small ViTs calibrated on a few hundred images (~50k tokens per block), chosen on
/// DeiT-tiny's held-out calibration images (never on `eval/`): the `fips` command's defaults
/// (DeiT-tiny in about a minute on two cores with `OPENBLAS_NUM_THREADS=1`): 800 steps of 384
/// tokens with RigL swapping up to 5 % of the kept entries every 10 steps, lr 1e-3. The
/// schedule was chosen on the held-out tokens' error, where lr 3e-3 and α 0.15 reach a lower
/// error than 900 steps of 1024 tokens with the reference's RigL (α 0.05, Δt 50) in under a
/// third of the time (`docs/results.md`, "Blocks in parallel"); the learning rate and α on the
/// held-out images' predictions, where lr 1e-3 gives a KL(dense ‖ compressed) 17 % lower in three
/// of three splits though its token error ends 2–5 % higher ("Learning rate on the predictions"),
/// and α 0.05 a KL 2–9 % lower than 0.15 in seven of seven splits and budgets ("RigL's drop
/// fraction on the predictions"). (The library's own defaults, [`FipsParams::new`], are the
/// reference code's DeiT-B settings.)
pub const VIT_DEFAULTS: TrainingDefaults = TrainingDefaults {
    steps: 800,
    batch_tokens: 384,
    learning_rate: 1e-3,
    min_learning_rate: 1e-5,
    weight_decay: 0.05,
    sparsifier: SparsifierKind::Rigl,
    sparsifier_interval: 10,
    rigl_drop_fraction: 0.05,
};

/// Settings for small language models calibrated on all of a text's tokens (~120k per block for
/// `stories260k`'s `calib.txt`): the `fips compress --model` defaults. Chosen on the perplexity of
/// a seeded 5 % held-out part of the calibration text (never on the evaluation text): there GMP
/// beats RigL at both p = 0.5 and p = 0.75; see `docs/results.md`.
pub const TEXT_DEFAULTS: TrainingDefaults = TrainingDefaults {
    steps: 4000,
    batch_tokens: 1024,
    learning_rate: 3e-3,
    min_learning_rate: 1e-5,
    weight_decay: 0.0,
    sparsifier: SparsifierKind::Gmp,
    sparsifier_interval: DEFAULT_SPARSIFIER_INTERVAL,
    rigl_drop_fraction: DEFAULT_RIGL_DROP_FRACTION,
};

impl TrainingDefaults {
    /// `params` with these settings.
    pub fn apply(&self, params: FipsParams) -> FipsParams {
        params
            .steps(self.steps)
            .batch_tokens(self.batch_tokens)
            .learning_rate(self.learning_rate)
            .min_learning_rate(self.min_learning_rate)
            .weight_decay(self.weight_decay)
            .sparsifier(
                self.sparsifier
                    .schedule(self.sparsifier_interval)
                    .with_rigl_drop_fraction(self.rigl_drop_fraction),
            )
    }
}

/// How FiPS's factors reach their sparsity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SparsifierKind {
    /// RigL dynamic sparse training (the reference DeiT setting).
    #[default]
    Rigl,
    /// Gradual magnitude pruning on a cubic schedule.
    Gmp,
    /// No sparsity (requires sparsity 0).
    None,
}

impl SparsifierKind {
    /// The sparsifier of this kind, updating every `interval` steps (the other settings are the
    /// schedule's defaults).
    pub fn schedule(self, interval: usize) -> Sparsifier {
        match self {
            Self::Rigl => Sparsifier::Rigl(RiglSchedule {
                interval,
                ..RiglSchedule::default()
            }),
            Self::Gmp => Sparsifier::Gmp(GmpSchedule {
                interval,
                ..GmpSchedule::default()
            }),
            Self::None => Sparsifier::None,
        }
    }
}

/// The seed of every method's random draws by default.
pub const DEFAULT_SEED: u64 = 0;

/// Steps between sparsifier updates of the library's schedules (GMP pruning events, RigL
/// drop/grow) and of the text defaults.
pub const DEFAULT_SPARSIFIER_INTERVAL: usize = 50;

/// RigL's initial drop fraction in the library's schedule and the text defaults (the reference
/// code's DeiT setting).
pub const DEFAULT_RIGL_DROP_FRACTION: f64 = 0.05;

/// Every option of a compression run; `None` (or `false`) when not given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MethodOptions {
    /// Fraction p of the dense MLP weights to keep (all methods but layer-collapse).
    pub budget: Option<f64>,
    /// An explicit rank instead of the budget (fips, svd, svd-llm, basis-sharing).
    pub rank: Option<usize>,
    /// Target sparsity of FiPS's factors.
    pub sparsity: Option<f64>,
    /// FiPS's sparsifier.
    pub sparsifier: Option<SparsifierKind>,
    /// Steps between sparsifier updates (fips).
    pub sparsifier_interval: Option<usize>,
    /// RigL's initial drop fraction (fips with RigL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rigl_drop_fraction: Option<f64>,
    /// Training steps per group (fips; svd with `svd_train`).
    pub steps: Option<usize>,
    /// svd: train the factors with FiPS's loss and optimiser.
    pub svd_train: bool,
    /// mixed-rank: rank q of each residual.
    pub residual_rank: Option<usize>,
    /// mixed-rank: step of the candidate ranks.
    pub rank_grid: Option<usize>,
    /// mixed-rank: Adam steps per residual.
    pub residual_steps: Option<usize>,
    /// layer-collapse: weight λ of `(α − 1)²`.
    pub collapse_lambda: Option<f64>,
    /// layer-collapse: step limit per block.
    pub collapse_steps: Option<usize>,
    /// Calibration tokens per mini-batch (methods that train).
    pub batch_tokens: Option<usize>,
    /// Peak learning rate (methods that train).
    pub learning_rate: Option<f64>,
    /// Final learning rate of the cosine decay (fips, trained svd).
    pub min_learning_rate: Option<f64>,
    /// Decoupled weight decay (fips, trained svd).
    pub weight_decay: Option<f64>,
    /// Seed of the mini-batch sampler (every method accepts it; front ends also seed data-free
    /// inputs with it).
    pub seed: Option<u64>,
    /// Threads of the elementwise passes (fips, trained svd).
    pub threads: Option<usize>,
    /// Initialisation route (fips).
    pub init: Option<InitMethod>,
    /// Contraction order of the training step (fips).
    pub contraction: Option<ContractionOrder>,
    /// Early stopping patience in steps: stop a group once its validation error has not improved
    /// for this many steps (fips; needs a validation set).
    pub early_stop: Option<usize>,
    /// Relative improvement that counts for early stopping (fips; default 0).
    pub early_stop_tolerance: Option<f64>,
    /// How the mask of FiPS's factors is structured (fips; default entry-wise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_tiles: Option<MaskTiles>,
    /// fips: keep the reference's parameter count, leaving the basis parameters of padded
    /// components that can never train unused instead of giving them to `V`
    /// ([`FipsParams::spend_unused_rank`]`(false)`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_unused_rank: bool,
}

impl MethodOptions {
    /// The options given, by name, in declaration order.
    fn given(&self) -> Vec<&'static str> {
        let flags = [
            ("budget", self.budget.is_some()),
            ("rank", self.rank.is_some()),
            ("sparsity", self.sparsity.is_some()),
            ("sparsifier", self.sparsifier.is_some()),
            ("sparsifier-interval", self.sparsifier_interval.is_some()),
            ("rigl-drop-fraction", self.rigl_drop_fraction.is_some()),
            ("steps", self.steps.is_some()),
            ("svd-train", self.svd_train),
            ("residual-rank", self.residual_rank.is_some()),
            ("rank-grid", self.rank_grid.is_some()),
            ("residual-steps", self.residual_steps.is_some()),
            ("collapse-lambda", self.collapse_lambda.is_some()),
            ("collapse-steps", self.collapse_steps.is_some()),
            ("batch-tokens", self.batch_tokens.is_some()),
            ("lr", self.learning_rate.is_some()),
            ("min-lr", self.min_learning_rate.is_some()),
            ("weight-decay", self.weight_decay.is_some()),
            ("seed", self.seed.is_some()),
            ("threads", self.threads.is_some()),
            ("init", self.init.is_some()),
            ("contraction", self.contraction.is_some()),
            ("early-stop", self.early_stop.is_some()),
            ("early-stop-tolerance", self.early_stop_tolerance.is_some()),
            ("mask-tiles", self.mask_tiles.is_some()),
            ("keep-unused-rank", self.keep_unused_rank),
        ];
        flags
            .into_iter()
            .filter_map(|(name, given)| given.then_some(name))
            .collect()
    }

    /// The options `method` uses, and what to say about the others.
    fn accepted(&self, method: Method) -> (&'static [&'static str], &'static str) {
        const TRAIN: &[&str] = &[
            "budget",
            "rank",
            "svd-train",
            "steps",
            "batch-tokens",
            "lr",
            "min-lr",
            "weight-decay",
            "seed",
            "threads",
        ];
        match method {
            Method::Fips => (
                &[
                    "budget",
                    "rank",
                    "sparsity",
                    "sparsifier",
                    "sparsifier-interval",
                    "rigl-drop-fraction",
                    "steps",
                    "batch-tokens",
                    "lr",
                    "min-lr",
                    "weight-decay",
                    "seed",
                    "threads",
                    "init",
                    "contraction",
                    "early-stop",
                    "early-stop-tolerance",
                    "mask-tiles",
                    "keep-unused-rank",
                ],
                "fips has no residuals and no collapse; --svd-train belongs to svd",
            ),
            Method::Svd if self.svd_train => (TRAIN, "svd has no sparsity"),
            Method::Svd => (
                &["budget", "rank", "svd-train", "seed"],
                "the plain svd does not train: add --svd-train for the training options",
            ),
            Method::SvdLlm | Method::BasisSharing => (
                &["budget", "rank", "seed"],
                "a closed-form method: only the budget (or rank) applies",
            ),
            Method::MixedRank => (
                &[
                    "budget",
                    "residual-rank",
                    "rank-grid",
                    "residual-steps",
                    "batch-tokens",
                    "lr",
                    "seed",
                ],
                "mixed-rank allocates its ranks from --budget and trains residuals for --residual-steps",
            ),
            Method::LayerCollapse => (
                &[
                    "collapse-lambda",
                    "collapse-steps",
                    "batch-tokens",
                    "lr",
                    "seed",
                ],
                "layer-collapse collapses whole blocks: no budget, rank or sparsity",
            ),
        }
    }

    /// Rejects the options `method` does not use.
    pub fn check_for(&self, method: Method) -> Result<()> {
        let (accepted, hint) = self.accepted(method);
        match self.given().into_iter().find(|g| !accepted.contains(g)) {
            Some(name) => Err(FipsError::UnusedParameter {
                method: method.name(),
                name,
                hint,
            }),
            None => Ok(()),
        }
    }

    fn budget_or_rank(&self) -> Budget {
        self.rank.map_or(
            Budget::Fraction(self.budget.unwrap_or(DEFAULT_BUDGET_FRACTION)),
            Budget::Rank,
        )
    }

    /// `defaults` with every training setting these options give put in its place.
    fn training(&self, defaults: &TrainingDefaults) -> TrainingDefaults {
        TrainingDefaults {
            steps: self.steps.unwrap_or(defaults.steps),
            batch_tokens: self.batch_tokens.unwrap_or(defaults.batch_tokens),
            learning_rate: self.learning_rate.unwrap_or(defaults.learning_rate),
            min_learning_rate: self.min_learning_rate.unwrap_or(defaults.min_learning_rate),
            weight_decay: self.weight_decay.unwrap_or(defaults.weight_decay),
            sparsifier: self.sparsifier.unwrap_or(defaults.sparsifier),
            sparsifier_interval: self
                .sparsifier_interval
                .unwrap_or(defaults.sparsifier_interval),
            rigl_drop_fraction: self
                .rigl_drop_fraction
                .unwrap_or(defaults.rigl_drop_fraction),
        }
    }

    fn optimizer(&self, defaults: &TrainingDefaults) -> AdamW {
        let t = self.training(defaults);
        AdamW {
            learning_rate: t.learning_rate,
            min_learning_rate: t.min_learning_rate,
            weight_decay: t.weight_decay,
            ..AdamW::default()
        }
    }

    /// FiPS's settings from these options (defaults from `defaults` and the library).
    pub fn fips_params(&self, defaults: &TrainingDefaults) -> FipsParams {
        let mut params = self
            .training(defaults)
            .apply(FipsParams::new())
            .budget(self.budget_or_rank())
            .sparsity(
                self.sparsity
                    .unwrap_or(crate::math::budget::DEFAULT_SPARSITY),
            )
            .seed(self.seed.unwrap_or(DEFAULT_SEED))
            .init(self.init.unwrap_or_default())
            .contraction(self.contraction.unwrap_or_default())
            .early_stop(self.early_stop.map(|patience| {
                EarlyStopping::new(patience).tolerance(self.early_stop_tolerance.unwrap_or(0.0))
            }));
        if let Some(t) = self.threads {
            params = params.threads(t);
        }
        if let Some(tiles) = self.mask_tiles {
            params = params.mask_tiles(tiles);
        }
        if self.keep_unused_rank {
            params = params.spend_unused_rank(false);
        }
        params
    }

    /// The chosen method with its settings checked; options it does not use are rejected.
    pub fn compressor(
        &self,
        method: Method,
        defaults: &TrainingDefaults,
    ) -> Result<Box<dyn Compressor<f32>>> {
        self.check_for(method)?;
        if self.rigl_drop_fraction.is_some()
            && self.sparsifier.unwrap_or(defaults.sparsifier) != SparsifierKind::Rigl
        {
            return Err(FipsError::UnusedParameter {
                method: method.name(),
                name: "rigl-drop-fraction",
                hint: "the drop fraction belongs to the RigL sparsifier (--sparsifier rigl)",
            });
        }
        let seed = self.seed.unwrap_or(DEFAULT_SEED);
        let batch_tokens = self.batch_tokens.unwrap_or(defaults.batch_tokens);
        let learning_rate = self.learning_rate.unwrap_or(defaults.learning_rate);
        Ok(match method {
            Method::Fips => Box::new(self.fips_params(defaults).check()?),
            Method::Svd => {
                let mut p = SvdParams::new()
                    .budget(self.budget_or_rank())
                    .steps(if self.svd_train {
                        self.steps.unwrap_or(defaults.steps)
                    } else {
                        0
                    })
                    .batch_tokens(batch_tokens)
                    .optimizer(self.optimizer(defaults))
                    .seed(seed);
                if let Some(t) = self.threads {
                    p = p.threads(t);
                }
                Box::new(p.check()?)
            }
            Method::SvdLlm => Box::new(SvdLlmParams::new().budget(self.budget_or_rank()).check()?),
            Method::BasisSharing => Box::new(
                BasisSharingParams::new()
                    .budget(self.budget_or_rank())
                    .check()?,
            ),
            Method::MixedRank => {
                let base = MixedRankParams::new();
                Box::new(
                    base.budget(self.budget.unwrap_or(DEFAULT_BUDGET_FRACTION))
                        .residual_rank(self.residual_rank.unwrap_or(base.residual_rank))
                        .grid(self.rank_grid.unwrap_or(base.grid))
                        .steps(self.residual_steps.unwrap_or(base.steps))
                        .batch_tokens(batch_tokens)
                        .learning_rate(learning_rate)
                        .seed(seed)
                        .check()?,
                )
            }
            Method::LayerCollapse => {
                let base = LayerCollapseParams::new();
                Box::new(
                    base.lambda(self.collapse_lambda.unwrap_or(base.lambda))
                        .max_steps(self.collapse_steps.unwrap_or(base.max_steps))
                        .batch_tokens(batch_tokens)
                        .learning_rate(learning_rate)
                        .seed(seed)
                        .check()?,
                )
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_a_method_does_not_use_are_rejected_by_name() {
        let unused = |o: MethodOptions, m: Method, name: &str| match o.compressor(m, &VIT_DEFAULTS)
        {
            Err(FipsError::UnusedParameter { name: got, .. }) => assert_eq!(got, name, "{m}"),
            Err(other) => panic!("{m}: expected {name} to be rejected, got {other}"),
            Ok(_) => panic!("{m}: expected {name} to be rejected"),
        };
        let sparsity = MethodOptions {
            sparsity: Some(0.5),
            ..Default::default()
        };
        for m in [
            Method::Svd,
            Method::SvdLlm,
            Method::BasisSharing,
            Method::MixedRank,
            Method::LayerCollapse,
        ] {
            unused(sparsity.clone(), m, "sparsity");
        }
        let rank = MethodOptions {
            rank: Some(8),
            ..Default::default()
        };
        unused(rank.clone(), Method::MixedRank, "rank");
        unused(rank, Method::LayerCollapse, "rank");
        let steps = MethodOptions {
            steps: Some(10),
            ..Default::default()
        };
        unused(steps.clone(), Method::Svd, "steps");
        unused(steps.clone(), Method::MixedRank, "steps");
        let trained = MethodOptions {
            svd_train: true,
            ..steps
        };
        assert_eq!(
            trained
                .compressor(Method::Svd, &VIT_DEFAULTS)
                .unwrap()
                .steps(),
            10
        );
        // Every method accepts no options at all, and the defaults are valid.
        for m in Method::ALL {
            let c = MethodOptions::default()
                .compressor(m, &VIT_DEFAULTS)
                .unwrap();
            assert_eq!(c.method(), m);
            assert_eq!(c.parameters().method(), m);
        }
    }

    #[test]
    fn fips_options_default_to_the_given_training_defaults() {
        let p = MethodOptions::default()
            .fips_params(&VIT_DEFAULTS)
            .check()
            .unwrap();
        assert_eq!(p.steps(), VIT_DEFAULTS.steps);
        assert_eq!(p.batch_tokens(), VIT_DEFAULTS.batch_tokens);
        assert_eq!(p.optimizer().learning_rate, VIT_DEFAULTS.learning_rate);
        assert_eq!(
            p.optimizer().min_learning_rate,
            VIT_DEFAULTS.min_learning_rate
        );
        assert_eq!(p, VIT_DEFAULTS.apply(FipsParams::new()).check().unwrap());
        assert_eq!(
            p.sparsifier(),
            Sparsifier::Rigl(RiglSchedule {
                interval: VIT_DEFAULTS.sparsifier_interval,
                drop_fraction: VIT_DEFAULTS.rigl_drop_fraction,
                ..RiglSchedule::default()
            })
        );
        // A drop fraction or interval given replaces the defaults'.
        let given = MethodOptions {
            rigl_drop_fraction: Some(0.2),
            sparsifier_interval: Some(7),
            ..Default::default()
        };
        assert_eq!(
            given
                .fips_params(&VIT_DEFAULTS)
                .check()
                .unwrap()
                .sparsifier(),
            Sparsifier::Rigl(RiglSchedule {
                interval: 7,
                drop_fraction: 0.2,
                ..RiglSchedule::default()
            })
        );
        // Every training setting given replaces the defaults' one.
        let all = MethodOptions {
            steps: Some(3),
            batch_tokens: Some(17),
            learning_rate: Some(0.25),
            min_learning_rate: Some(0.125),
            weight_decay: Some(0.5),
            sparsifier: Some(SparsifierKind::Gmp),
            sparsifier_interval: Some(9),
            ..Default::default()
        }
        .fips_params(&VIT_DEFAULTS)
        .check()
        .unwrap();
        assert_eq!((all.steps(), all.batch_tokens()), (3, 17));
        let o = all.optimizer();
        assert_eq!(
            (o.learning_rate, o.min_learning_rate, o.weight_decay),
            (0.25, 0.125, 0.5)
        );
        assert_eq!(
            (o.beta1, o.beta2),
            (AdamW::default().beta1, AdamW::default().beta2)
        );
        assert!(matches!(
            all.sparsifier(),
            Sparsifier::Gmp(GmpSchedule { interval: 9, .. })
        ));
        // A drop fraction where RigL does not run is rejected by name.
        for (options, defaults) in [
            (given.clone(), &TEXT_DEFAULTS),
            (
                MethodOptions {
                    sparsifier: Some(SparsifierKind::Gmp),
                    ..given.clone()
                },
                &VIT_DEFAULTS,
            ),
        ] {
            assert!(matches!(
                options.compressor(Method::Fips, defaults),
                Err(FipsError::UnusedParameter {
                    name: "rigl-drop-fraction",
                    ..
                })
            ));
        }
        assert!(matches!(
            given.compressor(Method::Svd, &VIT_DEFAULTS),
            Err(FipsError::UnusedParameter { .. })
        ));
        // An out-of-range drop fraction is a typed error of the checked settings.
        let bad = MethodOptions {
            rigl_drop_fraction: Some(1.5),
            ..Default::default()
        };
        assert!(bad.compressor(Method::Fips, &VIT_DEFAULTS).is_err());
        // The text defaults sparsify by GMP unless a sparsifier is given.
        let text = MethodOptions::default().fips_params(&TEXT_DEFAULTS);
        assert_eq!(text, TEXT_DEFAULTS.apply(FipsParams::new()));
        assert!(matches!(
            text.check().unwrap().sparsifier(),
            Sparsifier::Gmp(GmpSchedule { interval: 50, .. })
        ));
        let rigl = MethodOptions {
            sparsifier: Some(SparsifierKind::Rigl),
            ..Default::default()
        };
        assert!(matches!(
            rigl.fips_params(&TEXT_DEFAULTS)
                .check()
                .unwrap()
                .sparsifier(),
            Sparsifier::Rigl(_)
        ));
    }

    /// `--keep-unused-rank` turns off spending the unused rank, is serialised only when given
    /// (the settings and fingerprints of runs without it stay as before), reads back, and
    /// belongs to fips alone.
    #[test]
    fn keep_unused_rank_is_a_fips_option_in_the_settings() {
        let keep = MethodOptions {
            keep_unused_rank: true,
            ..Default::default()
        };
        assert!(
            !keep
                .fips_params(&VIT_DEFAULTS)
                .check()
                .unwrap()
                .spend_unused_rank()
        );
        let plain = MethodOptions::default();
        assert!(
            plain
                .fips_params(&VIT_DEFAULTS)
                .check()
                .unwrap()
                .spend_unused_rank()
        );
        let json = |o: &MethodOptions| serde_json::to_value(o).unwrap();
        assert_eq!(json(&keep)["keep_unused_rank"], true);
        assert!(json(&plain).get("keep_unused_rank").is_none());
        let back: MethodOptions = serde_json::from_value(json(&keep)).unwrap();
        assert!(back.keep_unused_rank);
        let back: MethodOptions = serde_json::from_value(json(&plain)).unwrap();
        assert!(!back.keep_unused_rank);
        assert!(keep.compressor(Method::Fips, &VIT_DEFAULTS).is_ok());
        for method in [Method::Svd, Method::MixedRank, Method::LayerCollapse] {
            assert!(matches!(
                keep.compressor(method, &VIT_DEFAULTS),
                Err(FipsError::UnusedParameter {
                    name: "keep-unused-rank",
                    ..
                })
            ));
        }
    }

    /// `--mask-tiles` reaches FiPS's settings, is serialised only when given (so that the
    /// settings and fingerprints of runs without it read and hash as before, and a tiled run's
    /// differ), and belongs to fips alone.
    #[test]
    fn mask_tiles_is_a_fips_option_in_the_settings() {
        use crate::math::tiles::MaskTiles;
        let tiled = MethodOptions {
            mask_tiles: Some(MaskTiles::Square2),
            ..Default::default()
        };
        let p = tiled.fips_params(&VIT_DEFAULTS);
        assert_eq!(p.clone().check().unwrap().mask_tiles(), MaskTiles::Square2);
        let plain = MethodOptions::default().fips_params(&VIT_DEFAULTS);
        assert_eq!(
            plain.clone().check().unwrap().mask_tiles(),
            MaskTiles::Entries
        );
        let json = |p: &FipsParams| serde_json::to_value(p).unwrap();
        assert_eq!(json(&p)["mask_tiles"], "2x2");
        assert!(json(&plain).get("mask_tiles").is_none());
        let mut without = json(&p);
        without.as_object_mut().unwrap().remove("mask_tiles");
        assert_eq!(without, json(&plain), "the only difference");
        let back: FipsParams = serde_json::from_value(json(&p)).unwrap();
        assert_eq!(back, p);
        let back: FipsParams = serde_json::from_value(json(&plain)).unwrap();
        assert_eq!(back, plain);
        assert!(
            serde_json::to_value(MethodOptions::default())
                .unwrap()
                .get("mask_tiles")
                .is_none()
        );
        assert!(matches!(
            tiled.compressor(Method::Svd, &VIT_DEFAULTS),
            Err(FipsError::UnusedParameter {
                name: "mask-tiles",
                ..
            })
        ));
        for (text, tiles) in [
            ("entries", MaskTiles::Entries),
            ("2x2", MaskTiles::Square2),
            ("1x2", MaskTiles::Wide2),
            ("2x1", MaskTiles::Tall2),
        ] {
            assert_eq!(text.parse::<MaskTiles>().unwrap(), tiles);
            assert_eq!(tiles.to_string(), text);
        }
        assert!("4x4".parse::<MaskTiles>().is_err());
    }

    #[test]
    fn early_stop_is_a_fips_option() {
        let es = MethodOptions {
            early_stop: Some(200),
            early_stop_tolerance: Some(0.001),
            ..Default::default()
        };
        let p = es.fips_params(&TEXT_DEFAULTS).check().unwrap();
        let e = p.early_stop().unwrap();
        assert_eq!((e.patience, e.tolerance, e.interval), (200, 0.001, 50));
        assert!(matches!(
            es.compressor(Method::Svd, &TEXT_DEFAULTS),
            Err(FipsError::UnusedParameter {
                name: "early-stop",
                ..
            })
        ));
        assert_eq!(
            MethodOptions::default()
                .fips_params(&TEXT_DEFAULTS)
                .check()
                .unwrap()
                .early_stop(),
            None
        );
    }
}
