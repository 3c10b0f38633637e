//! LayerCollapse: linearise an MLP, then merge its two layers into one.
//!
//! The activation of each block is replaced by a PReLU `max(0, h) + α min(0, h)` with one slope `α`
//! (starting at 0.01), and the block is trained on its normalised reconstruction error plus
//! `λ (α − 1)²` (λ = 0.2) until `|α − 1| < 0.05` (or a step limit). At `α = 1` the MLP is linear and
//! collapses exactly: `W = W₂ W₁` (`d × d`), `b = W₂ b₁ + b₂`; when `I < d` the product is kept
//! factored.
//!
//! With a fixed λ the slope settles where the reconstruction term's pull balances `2λ(1 − α)`,
//! which can stay short of the tolerance; so λ doubles every `lambda_doubling_steps` steps (200 by
//! default; 0 keeps it fixed, as the reference does over its much longer fine-tuning).
//!
//! The collapsed form, its dense rebuild in the original architecture (when `I ≥ 2d`) and its
//! parameter count are in [`repr::collapsed`](crate::repr::collapsed).
//!
//! Only standard (fc1 → act → fc2) MLPs collapse; a gated MLP is bilinear at any slope.

use std::ops::ControlFlow;
use std::time::Instant;

use ndarray::{Array1, Array2, ArrayView2, Ix1, Ix2, Zip};
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

use crate::foundation::error::{FipsError, Result, invalid};
use crate::foundation::float::Float;
use crate::foundation::mlp::{DenseMlp, MlpKind};
use crate::math::calibration::{Calibration, CalibrationReader, forward_chunked, gather_rows};
use crate::math::optim::{AdamW, AdamWStep, Moments};
use crate::math::subset::read_whole;
use crate::methods::compressor::{Compressor, MethodOutput, Run};
use crate::methods::engine::{Schedule, Trainable, TrainingLoop};
use crate::methods::params::{LayerCollapseParams, LayerCollapseValidParams, MethodParams};
use crate::methods::report::{
    CollapsedBlockReport, LayerCollapseDetails, Method, MethodDetails, Progress,
};
use crate::repr::{CollapsedBlock, CollapsedGroup, CollapsedMap, CompressedBlocks, validate_group};

/// A standard MLP with a PReLU activation of one slope: the trainable form of LayerCollapse.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PreluMlp<F> {
    pub w1: Array2<F>,
    pub b1: Array1<F>,
    pub w2: Array2<F>,
    pub b2: Array1<F>,
    pub alpha: Array1<F>,
}

impl<F: Float> PreluMlp<F> {
    fn from_mlp(mlp: &DenseMlp<F>, alpha: f64) -> Self {
        let (fc1, fc2) = (&mlp.layers()[0], &mlp.layers()[1]);
        Self {
            w1: fc1.weight().clone(),
            b1: fc1
                .bias()
                .cloned()
                .unwrap_or_else(|| Array1::zeros(fc1.out_features())),
            w2: fc2.weight().clone(),
            b2: fc2
                .bias()
                .cloned()
                .unwrap_or_else(|| Array1::zeros(fc2.out_features())),
            alpha: Array1::from_elem(1, F::cast(alpha)),
        }
    }

    /// `L = ‖Ŷ − Y‖² / ‖Y‖² + λ (α − 1)²` on a batch, and its gradients (same layout as `self`).
    pub(crate) fn loss_and_gradients(
        &self,
        x: ArrayView2<'_, F>,
        y: ArrayView2<'_, F>,
        lambda: f64,
    ) -> (f64, Self) {
        let alpha = self.alpha[0];
        let mut h = x.dot(&self.w1.t());
        h += &self.b1;
        let a = h.mapv(|v| if v > F::zero() { v } else { alpha * v });
        let mut e = a.dot(&self.w2.t());
        e += &self.b2;
        e -= &y;
        let norm = y
            .iter()
            .map(|v| v.as_f64() * v.as_f64())
            .sum::<f64>()
            .max(f64::MIN_POSITIVE);
        let a64 = alpha.as_f64();
        let loss = e.iter().map(|v| v.as_f64() * v.as_f64()).sum::<f64>() / norm
            + lambda * (a64 - 1.0).powi(2);
        let g = e.mapv(|v| v * F::cast(2.0 / norm));
        let dw2 = g.t().dot(&a);
        let db2 = g.sum_axis(ndarray::Axis(0));
        let mut da = g.dot(&self.w2);
        let mut dalpha = 2.0 * lambda * (a64 - 1.0);
        Zip::from(&mut da).and(&h).for_each(|d, &hv| {
            if hv <= F::zero() {
                dalpha += (*d * hv).as_f64();
                *d *= alpha;
            }
        });
        let dw1 = da.t().dot(&x);
        let db1 = da.sum_axis(ndarray::Axis(0));
        let grads = Self {
            w1: dw1,
            b1: db1,
            w2: dw2,
            b2: db2,
            alpha: Array1::from_elem(1, F::cast(dalpha)),
        };
        (loss, grads)
    }

    /// The exact merge at α = 1.
    fn collapse(&self, slope: f64, converged: bool) -> CollapsedBlock<F> {
        let (d, i) = self.w2.dim();
        let bias = self.w2.dot(&self.b1) + &self.b2;
        let map = if i >= d {
            CollapsedMap::Full(self.w2.dot(&self.w1))
        } else {
            CollapsedMap::Factored {
                left: self.w2.clone(),
                right: self.w1.clone(),
            }
        };
        CollapsedBlock {
            map,
            bias,
            slope,
            converged,
        }
    }
}

/// Per-block outcome of the slope training.
struct BlockTraining<F> {
    block: CollapsedBlock<F>,
    steps: usize,
    losses: Vec<f64>,
}

/// Adam moments of `W₁`, `b₁`, `W₂`, `b₂` and `α`.
type PreluMoments<F> = (
    Moments<F, Ix2>,
    Moments<F, Ix1>,
    Moments<F, Ix2>,
    Moments<F, Ix1>,
    Moments<F, Ix1>,
);

/// One block's slope training, stepped by the engine.
struct SlopeProblem<'a, F: Float> {
    params: &'a LayerCollapseParams,
    model: PreluMlp<F>,
    z: ArrayView2<'a, F>,
    y: Array2<F>,
    batch: usize,
    rng: ChaCha8Rng,
    xb: Array2<F>,
    yb: Array2<F>,
    grads: Option<PreluMlp<F>>,
    moments: PreluMoments<F>,
    adam: AdamW,
}

impl<F: Float> SlopeProblem<'_, F> {
    fn converged(&self) -> bool {
        (self.model.alpha[0].as_f64() - 1.0).abs() < self.params.tolerance
    }
}

impl<F: Float> Trainable for SlopeProblem<'_, F> {
    fn loss_and_gradients(&mut self, step: usize, _lr: f64) -> Result<f64> {
        let p = self.params;
        let rows = sample(&mut self.rng, self.z.nrows(), self.batch).into_vec();
        gather_rows(self.z, &rows, &mut self.xb);
        gather_rows(self.y.view(), &rows, &mut self.yb);
        let doublings = (step - 1).checked_div(p.lambda_doubling_steps).unwrap_or(0);
        let lambda = p.lambda * 2f64.powi(doublings.min(60) as i32);
        let (loss, g) = self
            .model
            .loss_and_gradients(self.xb.view(), self.yb.view(), lambda);
        self.grads = Some(g);
        Ok(loss)
    }

    fn update(&mut self, step: usize, lr: f64) -> Result<()> {
        let g = self
            .grads
            .take()
            .ok_or_else(|| FipsError::Numerical("slope update before its gradients".into()))?;
        let update = AdamWStep::new(&self.adam, lr, step);
        let (m, moments) = (&mut self.model, &mut self.moments);
        update.apply(m.w1.view_mut(), g.w1.view(), &mut moments.0);
        update.apply(m.b1.view_mut(), g.b1.view(), &mut moments.1);
        update.apply(m.w2.view_mut(), g.w2.view(), &mut moments.2);
        update.apply(m.b2.view_mut(), g.b2.view(), &mut moments.3);
        update.apply(m.alpha.view_mut(), g.alpha.view(), &mut moments.4);
        Ok(())
    }

    fn converged(&self) -> bool {
        SlopeProblem::converged(self)
    }

    fn observe(&self, progress: &mut Progress) {
        progress.slope = Some(self.model.alpha[0].as_f64());
    }
}

impl LayerCollapseValidParams {
    fn train_block<F: Float>(
        &self,
        mlp: &DenseMlp<F>,
        z: ArrayView2<'_, F>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<BlockTraining<F>> {
        let p = &self.0;
        let y = forward_chunked(mlp, z)?;
        let model = PreluMlp::from_mlp(mlp, p.initial_slope);
        let batch = p.batch_tokens.min(z.nrows());
        let mut problem = SlopeProblem {
            params: p,
            moments: (
                Moments::zeros(model.w1.raw_dim()),
                Moments::zeros(model.b1.raw_dim()),
                Moments::zeros(model.w2.raw_dim()),
                Moments::zeros(model.b2.raw_dim()),
                Moments::zeros(model.alpha.raw_dim()),
            ),
            model,
            z,
            xb: Array2::zeros((batch, z.ncols())),
            yb: Array2::zeros((batch, y.ncols())),
            y,
            batch,
            rng: ChaCha8Rng::seed_from_u64(p.seed),
            grads: None,
            adam: p.optimizer(),
        };
        let mut run = TrainingLoop::new(p.max_steps, Schedule::Constant(p.learning_rate));
        run.run(&mut problem, on_step)?;
        let slope = problem.model.alpha[0].as_f64();
        let converged = problem.converged();
        Ok(BlockTraining {
            block: problem.model.collapse(slope, converged),
            steps: run.steps_run(),
            losses: run.into_losses(),
        })
    }
}

impl<F: Float> Compressor<F> for LayerCollapseValidParams {
    fn method(&self) -> Method {
        Method::LayerCollapse
    }

    fn parameters(&self) -> MethodParams {
        MethodParams::LayerCollapse(*self.params())
    }

    fn steps(&self) -> usize {
        self.0.max_steps
    }

    /// Collapses every block given (choose the blocks, e.g. the last k, through the grouping).
    fn compress(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &dyn CalibrationReader<F>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>> {
        // Every token in memory at once (see `Compressor::compress`).
        crate::math::calibration::refuse_targets(calibration, "LayerCollapse")?;
        let whole = read_whole(calibration)?;
        let calibration: &Calibration<F> = &whole;
        let start = Instant::now();
        let spec = validate_group(blocks, Some(calibration))?;
        if blocks[0].kind() != MlpKind::Standard {
            return Err(invalid(
                "layer-collapse",
                "only standard fc1 → act → fc2 MLPs collapse; a gated MLP stays bilinear at any slope",
            ));
        }
        let mut collapsed = Vec::with_capacity(blocks.len());
        let mut details = Vec::with_capacity(blocks.len());
        let mut loss_curve = Vec::new();
        let mut steps = 0;
        for (mlp, z) in blocks.iter().zip(calibration.inputs()) {
            let t = self.train_block(mlp, z.view(), on_step)?;
            details.push(CollapsedBlockReport {
                slope: t.block.slope,
                converged: t.block.converged,
                steps: t.steps,
            });
            steps += t.steps;
            loss_curve.extend(t.losses);
            collapsed.push(t.block);
        }
        let (d, i) = (blocks[0].width(), blocks[0].intermediate());
        let group = CollapsedGroup::new(d, i, blocks[0].activation(), collapsed)?;
        let run = Run {
            method: Method::LayerCollapse,
            spec,
            start,
            steps,
            loss_curve,
            details: MethodDetails::LayerCollapse(LayerCollapseDetails { blocks: details }),
        };
        MethodOutput::measured(run, blocks, CompressedBlocks::Collapsed(group), calibration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::foundation::activation::Activation;
    use approx::assert_abs_diff_eq;
    use rand_distr::{Distribution, StandardNormal};

    fn randn(rng: &mut ChaCha8Rng, r: usize, c: usize) -> Array2<f64> {
        Array2::from_shape_simple_fn((r, c), || StandardNormal.sample(rng))
    }

    #[test]
    fn prelu_gradients_match_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let model = PreluMlp {
            w1: randn(&mut rng, 6, 4),
            b1: Array1::from_shape_simple_fn(6, || StandardNormal.sample(&mut rng)),
            w2: randn(&mut rng, 4, 6),
            b2: Array1::from_shape_simple_fn(4, || StandardNormal.sample(&mut rng)),
            alpha: Array1::from_elem(1, 0.3),
        };
        let (x, y) = (randn(&mut rng, 9, 4), randn(&mut rng, 9, 4));
        let (_, g) = model.loss_and_gradients(x.view(), y.view(), 0.2);
        let h = 1e-6;
        let fd = |edit: &dyn Fn(&mut PreluMlp<f64>, f64)| {
            let (mut plus, mut minus) = (model.clone(), model.clone());
            edit(&mut plus, h);
            edit(&mut minus, -h);
            (plus.loss_and_gradients(x.view(), y.view(), 0.2).0
                - minus.loss_and_gradients(x.view(), y.view(), 0.2).0)
                / (2.0 * h)
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6 * b.abs().max(1e-3);
        for r in 0..6 {
            for c in 0..4 {
                assert!(close(g.w1[[r, c]], fd(&|m, e| m.w1[[r, c]] += e)));
                assert!(close(g.w2[[c, r]], fd(&|m, e| m.w2[[c, r]] += e)));
            }
            assert!(close(g.b1[r], fd(&|m, e| m.b1[r] += e)));
        }
        for c in 0..4 {
            assert!(close(g.b2[c], fd(&|m, e| m.b2[c] += e)));
        }
        assert!(
            close(g.alpha[0], fd(&|m, e| m.alpha[0] += e)),
            "{} vs {}",
            g.alpha[0],
            fd(&|m, e| m.alpha[0] += e)
        );
    }

    #[test]
    fn collapse_at_unit_slope_reproduces_the_linear_mlp_and_embeds_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (d, i) = (3, 7);
        let model = PreluMlp {
            w1: randn(&mut rng, i, d),
            b1: Array1::from_shape_simple_fn(i, || StandardNormal.sample(&mut rng)),
            w2: randn(&mut rng, d, i),
            b2: Array1::from_shape_simple_fn(d, || StandardNormal.sample(&mut rng)),
            alpha: Array1::from_elem(1, 1.0),
        };
        let x = randn(&mut rng, 11, d);
        // At α = 1 the PReLU MLP is x W₁ᵀ W₂ᵀ + (W₂ b₁ + b₂).
        let linear_mlp = (x.dot(&model.w1.t()) + &model.b1).dot(&model.w2.t()) + &model.b2;
        for act in Activation::ALL {
            let group = CollapsedGroup::new(d, i, act, vec![model.collapse(1.0, true)]).unwrap();
            let y = group.forward(0, x.view()).unwrap();
            assert_abs_diff_eq!(y, linear_mlp, epsilon = 1e-12);
            // The densified block of the original architecture computes the same map.
            let dense = group.to_dense_mlp(0).unwrap();
            assert_abs_diff_eq!(dense.forward(x.view()).unwrap(), linear_mlp, epsilon = 1e-9);
            assert_eq!(group.parameter_count().compressed_weights(), d * d);
        }
        // I < 2d cannot be embedded; I < d is kept factored.
        let narrow = PreluMlp {
            w1: randn(&mut rng, 2, d),
            b1: Array1::zeros(2),
            w2: randn(&mut rng, d, 2),
            b2: Array1::zeros(d),
            alpha: Array1::from_elem(1, 1.0),
        };
        let group =
            CollapsedGroup::new(d, 2, Activation::Gelu, vec![narrow.collapse(1.0, true)]).unwrap();
        assert_eq!(group.parameter_count().compressed_weights(), 2 * 2 * d);
        assert!(group.to_dense_mlp(0).is_err());
    }
}
