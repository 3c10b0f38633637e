//! The one training-loop engine of every method that trains (FiPS and the trained SVD,
//! LayerCollapse's slope, mixed rank's residuals).
//!
//! A method describes one optimisation step as a [`Trainable`]: compute the mini-batch loss and
//! its gradients, then apply an update at a learning rate. The engine owns what is common: the step
//! count and its limit, the learning-rate schedule, the non-finite-loss check (before any update),
//! early stopping on convergence, on the validation error ([`EarlyStopping`]: the method scores
//! its current state on held-out tokens every `interval` steps) or on the callback's `Break`, the
//! loss curve and the time spent.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::foundation::error::{FipsError, Result};
use crate::math::optim::AdamW;
use crate::math::validation::{EarlyStop, EarlyStopping};
use crate::methods::report::Progress;

/// One method's training problem, stepped by [`TrainingLoop`].
pub(crate) trait Trainable {
    /// Draws the mini-batch of `step` (1-based) and computes its loss and gradients; `lr` is the
    /// step's learning rate, for problems that apply part of their update during the backward
    /// pass (the rest is applied by [`Trainable::update`] at the same `lr`).
    fn loss_and_gradients(&mut self, step: usize, lr: f64) -> Result<f64>;

    /// Applies the update of `step` at learning rate `lr` with the gradients just computed.
    fn update(&mut self, step: usize, lr: f64) -> Result<()>;

    /// Whether training may stop before the step limit (checked before every step).
    fn converged(&self) -> bool {
        false
    }

    /// The error of the current state on held-out validation data; `None` when the method has
    /// none to score on (then early stopping never triggers).
    fn validation_error(&mut self) -> Result<Option<f64>> {
        Ok(None)
    }

    /// Fills the method-specific fields of the progress after a step.
    fn observe(&self, progress: &mut Progress) {
        let _ = progress;
    }
}

/// The learning rate of step `t` of `T`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Schedule {
    /// Cosine decay from the optimiser's peak to its floor ([`AdamW::learning_rate_at`]).
    Cosine(AdamW),
    /// A constant rate.
    Constant(f64),
}

impl Schedule {
    fn at(&self, step: usize, total: usize) -> f64 {
        match self {
            Self::Cosine(adam) => adam.learning_rate_at(step, total),
            Self::Constant(lr) => *lr,
        }
    }
}

/// A training run in progress: at most `total` steps of a [`Trainable`].
#[derive(Debug, Clone)]
pub(crate) struct TrainingLoop {
    total: usize,
    schedule: Schedule,
    step: usize,
    losses: Vec<f64>,
    time: Duration,
    validation: Option<Validation>,
}

/// Early stopping in progress.
#[derive(Debug, Clone)]
struct Validation {
    stop: EarlyStop,
    interval: usize,
    curve: Vec<(usize, f64)>,
    stopped_at: Option<usize>,
}

impl TrainingLoop {
    /// A run of at most `total` steps.
    pub(crate) fn new(total: usize, schedule: Schedule) -> Self {
        Self {
            total,
            schedule,
            step: 0,
            losses: Vec::with_capacity(total.min(1 << 16)),
            time: Duration::ZERO,
            validation: None,
        }
    }

    /// Stops the run early on the validation error (see [`EarlyStopping`]). Errors: invalid
    /// settings.
    pub(crate) fn early_stopping(mut self, settings: Option<EarlyStopping>) -> Result<Self> {
        self.validation = match settings {
            Some(e) => Some(Validation {
                stop: e.check()?,
                interval: e.interval,
                curve: Vec::new(),
                stopped_at: None,
            }),
            None => None,
        };
        Ok(self)
    }

    /// Runs one step; `Ok(None)` once the limit is reached or the problem has converged. A
    /// non-finite loss is an error, raised before the update.
    pub(crate) fn step(&mut self, problem: &mut dyn Trainable) -> Result<Option<Progress>> {
        let stopped = self
            .validation
            .as_ref()
            .is_some_and(|v| v.stopped_at.is_some());
        if stopped || self.step >= self.total || problem.converged() {
            return Ok(None);
        }
        let started = Instant::now();
        let step = self.step + 1;
        let lr = self.schedule.at(step, self.total);
        let loss = problem.loss_and_gradients(step, lr)?;
        if !loss.is_finite() {
            return Err(FipsError::NonFiniteLoss { step, loss });
        }
        problem.update(step, lr)?;
        self.step = step;
        self.losses.push(loss);
        // Score on the held-out tokens every `interval` steps (and after the last step).
        let mut validation_error = None;
        if let Some(v) = self.validation.as_mut()
            && (step.is_multiple_of(v.interval) || step == self.total)
            && let Some(error) = problem.validation_error()?
        {
            validation_error = Some(error);
            v.curve.push((step, error));
            if v.stop.observe(step, error) {
                v.stopped_at = Some(step);
            }
        }
        self.time += started.elapsed();
        let mut progress = Progress {
            step,
            total_steps: self.total,
            loss,
            learning_rate: lr,
            sparsity: None,
            slope: None,
            validation_error,
        };
        problem.observe(&mut progress);
        Ok(Some(progress))
    }

    /// Steps until done or until `on_step` returns `Break`.
    pub(crate) fn run(
        &mut self,
        problem: &mut dyn Trainable,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<()> {
        while let Some(progress) = self.step(problem)? {
            if on_step(&progress).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Steps run.
    pub(crate) fn steps_run(&self) -> usize {
        self.step
    }

    /// The step limit.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// The validation errors scored during the run, `(step, error)`.
    pub(crate) fn validation_curve(&self) -> &[(usize, f64)] {
        self.validation.as_ref().map_or(&[], |v| &v.curve)
    }

    /// The step after which early stopping ended the run, if it did.
    pub(crate) fn stopped_at(&self) -> Option<usize> {
        self.validation.as_ref().and_then(|v| v.stopped_at)
    }

    /// Time spent in steps (validation scoring included).
    pub(crate) fn time(&self) -> Duration {
        self.time
    }

    /// The loss of every step run.
    pub(crate) fn into_losses(self) -> Vec<f64> {
        self.losses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimises `(x − 3)²` by gradient descent.
    struct Quadratic {
        x: f64,
        grad: f64,
        tolerance: f64,
    }

    impl Trainable for Quadratic {
        fn loss_and_gradients(&mut self, _step: usize, _lr: f64) -> Result<f64> {
            self.grad = 2.0 * (self.x - 3.0);
            Ok((self.x - 3.0).powi(2))
        }
        fn update(&mut self, _step: usize, lr: f64) -> Result<()> {
            self.x -= lr * self.grad;
            Ok(())
        }
        fn converged(&self) -> bool {
            (self.x - 3.0).abs() < self.tolerance
        }
        fn observe(&self, progress: &mut Progress) {
            progress.slope = Some(self.x);
        }
    }

    #[test]
    fn runs_to_the_limit_stops_on_convergence_and_on_break() {
        let mut q = Quadratic {
            x: 0.0,
            grad: 0.0,
            tolerance: 0.0,
        };
        let mut run = TrainingLoop::new(5, Schedule::Constant(0.25));
        let mut seen = Vec::new();
        run.run(&mut q, &mut |p| {
            seen.push(*p);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(run.steps_run(), 5);
        assert_eq!(seen.len(), 5);
        assert_eq!(seen[0].loss, 9.0);
        assert_eq!(seen[0].slope, Some(1.5));
        // x halves its distance to 3 each step: losses 9, 2.25, …
        let losses = run.clone().into_losses();
        for w in losses.windows(2) {
            assert_eq!(w[1], w[0] / 4.0);
        }

        let mut q = Quadratic {
            x: 0.0,
            grad: 0.0,
            tolerance: 0.5,
        };
        let mut run = TrainingLoop::new(100, Schedule::Constant(0.25));
        run.run(&mut q, &mut |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(run.steps_run(), 3, "|x − 3| = 3/8 < 0.5 after three steps");

        let mut run = TrainingLoop::new(100, Schedule::Constant(0.25));
        run.run(&mut q, &mut |p| {
            if p.step == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_or(());
        assert_eq!(run.steps_run(), 0, "already converged: no step");
    }

    /// A problem whose validation error follows `curve(step)`.
    struct Scored {
        step: usize,
        curve: fn(usize) -> f64,
        scored: usize,
    }

    impl Trainable for Scored {
        fn loss_and_gradients(&mut self, step: usize, _: f64) -> Result<f64> {
            self.step = step;
            Ok(1.0)
        }
        fn update(&mut self, _: usize, _: f64) -> Result<()> {
            Ok(())
        }
        fn validation_error(&mut self) -> Result<Option<f64>> {
            self.scored += 1;
            Ok(Some((self.curve)(self.step)))
        }
    }

    #[test]
    fn early_stopping_stops_once_the_validation_error_worsens() {
        // Improves until step 40, then worsens: with patience 20 scored every 5 steps the best
        // (step 40) is not beaten by step 60, where the run stops.
        let mut p = Scored {
            step: 0,
            curve: |t| (t as f64 - 40.0).abs() + 1.0,
            scored: 0,
        };
        let settings = EarlyStopping {
            patience: 20,
            tolerance: 0.0,
            interval: 5,
        };
        let mut run = TrainingLoop::new(1000, Schedule::Constant(0.1))
            .early_stopping(Some(settings))
            .unwrap();
        let mut validated = Vec::new();
        run.run(&mut p, &mut |pr| {
            if let Some(e) = pr.validation_error {
                validated.push((pr.step, e));
            }
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(run.stopped_at(), Some(60));
        assert_eq!(run.steps_run(), 60);
        assert_eq!(p.scored, 12, "scored every 5 steps");
        assert_eq!(run.validation_curve(), validated.as_slice());
        assert_eq!(run.validation_curve()[7], (40, 1.0));
        // A stopped run takes no further step.
        assert!(run.step(&mut p).unwrap().is_none());
    }

    #[test]
    fn early_stopping_never_stops_a_run_that_keeps_improving() {
        let mut p = Scored {
            step: 0,
            curve: |t| 1.0 / (1.0 + t as f64),
            scored: 0,
        };
        let mut run = TrainingLoop::new(300, Schedule::Constant(0.1))
            .early_stopping(Some(EarlyStopping::new(8)))
            .unwrap();
        run.run(&mut p, &mut |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(run.stopped_at(), None);
        assert_eq!(run.steps_run(), 300);
        assert_eq!(p.scored, 150, "every max(1, 8 / 4) = 2 steps");
        // Without early stopping nothing is scored.
        let mut p = Scored {
            step: 0,
            curve: |_| 1.0,
            scored: 0,
        };
        let mut run = TrainingLoop::new(50, Schedule::Constant(0.1));
        run.run(&mut p, &mut |_| ControlFlow::Continue(())).unwrap();
        assert_eq!((run.steps_run(), p.scored), (50, 0));
        assert!(
            TrainingLoop::new(5, Schedule::Constant(0.1))
                .early_stopping(Some(EarlyStopping {
                    patience: 4,
                    tolerance: 0.0,
                    interval: 5,
                }))
                .is_err(),
            "interval above the patience"
        );
    }

    #[test]
    fn a_non_finite_loss_stops_before_the_update() {
        struct Bad(f64);
        impl Trainable for Bad {
            fn loss_and_gradients(&mut self, _: usize, _: f64) -> Result<f64> {
                Ok(f64::NAN)
            }
            fn update(&mut self, _: usize, _: f64) -> Result<()> {
                self.0 += 1.0;
                Ok(())
            }
        }
        let mut bad = Bad(0.0);
        let mut run = TrainingLoop::new(3, Schedule::Cosine(AdamW::default()));
        assert!(matches!(
            run.step(&mut bad),
            Err(FipsError::NonFiniteLoss { step: 1, .. })
        ));
        assert_eq!(bad.0, 0.0);
    }
}
