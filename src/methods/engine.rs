//! The one training-loop engine of every method that trains (FiPS and the trained SVD,
//! LayerCollapse's slope, mixed rank's residuals).
//!
//! A method describes one optimisation step as a [`Trainable`]: compute the mini-batch loss and
//! its gradients, then apply an update at a learning rate. The engine owns what is common: the step
//! count and its limit, the learning-rate schedule, the non-finite-loss check (before any update),
//! early stopping on convergence or on the callback's `Break`, the loss curve and the time spent.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::foundation::error::{FipsError, Result};
use crate::math::optim::AdamW;
use crate::methods::report::Progress;

/// One method's training problem, stepped by [`TrainingLoop`].
pub(crate) trait Trainable {
    /// Draws the mini-batch of `step` (1-based) and computes its loss and gradients.
    fn loss_and_gradients(&mut self, step: usize) -> Result<f64>;

    /// Applies the update of `step` at learning rate `lr` with the gradients just computed.
    fn update(&mut self, step: usize, lr: f64) -> Result<()>;

    /// Whether training may stop before the step limit (checked before every step).
    fn converged(&self) -> bool {
        false
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
        }
    }

    /// Runs one step; `Ok(None)` once the limit is reached or the problem has converged. A
    /// non-finite loss is an error, raised before the update.
    pub(crate) fn step(&mut self, problem: &mut dyn Trainable) -> Result<Option<Progress>> {
        if self.step >= self.total || problem.converged() {
            return Ok(None);
        }
        let started = Instant::now();
        let step = self.step + 1;
        let loss = problem.loss_and_gradients(step)?;
        if !loss.is_finite() {
            return Err(FipsError::NonFiniteLoss { step, loss });
        }
        let lr = self.schedule.at(step, self.total);
        problem.update(step, lr)?;
        self.step = step;
        self.losses.push(loss);
        self.time += started.elapsed();
        let mut progress = Progress {
            step,
            total_steps: self.total,
            loss,
            learning_rate: lr,
            sparsity: None,
            slope: None,
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

    /// Time spent in steps.
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
        fn loss_and_gradients(&mut self, _step: usize) -> Result<f64> {
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

    #[test]
    fn a_non_finite_loss_stops_before_the_update() {
        struct Bad(f64);
        impl Trainable for Bad {
            fn loss_and_gradients(&mut self, _: usize) -> Result<f64> {
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
