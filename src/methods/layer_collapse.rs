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
//! Densified form: a linear map fits the original architecture exactly when `I ≥ 2d`, because
//! every supported activation satisfies `act(z) − act(−z) = z` (GELU, tanh GELU, ReLU and SiLU
//! are `z g(z)` with `g(z) + g(−z) = 1`): `fc1 = [I_d; −I_d; 0]`, `fc2 = [W, −W, 0]`, `b₂ = b`.
//!
//! Only standard (fc1 → act → fc2) MLPs collapse; a gated MLP is bilinear at any slope.

use std::ops::ControlFlow;
use std::time::Instant;

use ndarray::{Array1, Array2, ArrayView2, Zip, s};
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

use crate::activation::Activation;
use crate::budget::ParameterCount;
use crate::calibration::{Calibration, forward_chunked, gather_rows};
use crate::compressor::Progress;
use crate::error::{FipsError, Result, invalid};
use crate::float::{Float, ensure_finite};
use crate::methods::{CompressedBlocks, Compressor, MethodOutput, check_group};
use crate::mlp::{DenseMlp, Linear, MlpKind};
use crate::optim::{AdamW, AdamWStep, Moments};

/// One collapsed block's linear map `y = M x + b`.
#[derive(Debug, Clone, PartialEq)]
pub enum CollapsedMap<F> {
    /// `M` as one `[d, d]` matrix (when `I ≥ d`).
    Full(Array2<F>),
    /// `M = left · right` (`[d, I] · [I, d]`, when `I < d`: fewer parameters than `d²`).
    Factored {
        /// `W₂`, `[d, I]`.
        left: Array2<F>,
        /// `W₁`, `[I, d]`.
        right: Array2<F>,
    },
}

/// A collapsed block.
#[derive(Debug, Clone, PartialEq)]
pub struct CollapsedBlock<F> {
    /// The linear map.
    pub map: CollapsedMap<F>,
    /// Its bias `W₂ b₁ + b₂`, `[d]`.
    pub bias: Array1<F>,
    /// The PReLU slope reached before the merge (the merge sets it to 1).
    pub slope: f64,
    /// Whether the slope came within the tolerance of 1.
    pub converged: bool,
}

impl<F: Float> CollapsedBlock<F> {
    /// `M` as a `[d, d]` matrix.
    pub fn matrix(&self) -> Array2<F> {
        match &self.map {
            CollapsedMap::Full(m) => m.clone(),
            CollapsedMap::Factored { left, right } => left.dot(right),
        }
    }

    fn weight_count(&self) -> usize {
        match &self.map {
            CollapsedMap::Full(m) => m.len(),
            CollapsedMap::Factored { left, right } => left.len() + right.len(),
        }
    }
}

/// A group of collapsed blocks of width `d` (originally MLP width `I`).
#[derive(Debug, Clone, PartialEq)]
pub struct CollapsedGroup<F> {
    width: usize,
    intermediate: usize,
    activation: Activation,
    blocks: Vec<CollapsedBlock<F>>,
}

impl<F: Float> CollapsedGroup<F> {
    /// A group from its blocks (checked against `d` and `I`).
    pub fn new(
        width: usize,
        intermediate: usize,
        activation: Activation,
        blocks: Vec<CollapsedBlock<F>>,
    ) -> Result<Self> {
        if blocks.is_empty() {
            return Err(FipsError::EmptyGroup);
        }
        for (b, block) in blocks.iter().enumerate() {
            let ok = match &block.map {
                CollapsedMap::Full(m) => m.dim() == (width, width),
                CollapsedMap::Factored { left, right } => {
                    left.dim() == (width, intermediate) && right.dim() == (intermediate, width)
                }
            };
            if !ok || block.bias.len() != width {
                return Err(FipsError::ShapeMismatch {
                    what: format!("collapsed block {b}"),
                    expected: vec![width, width],
                    got: vec![
                        block.matrix().nrows(),
                        block.matrix().ncols(),
                        block.bias.len(),
                    ],
                });
            }
            ensure_finite(&block.matrix(), || format!("collapsed block {b}"))?;
        }
        Ok(Self {
            width,
            intermediate,
            activation,
            blocks,
        })
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Model width d.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The original MLP width I.
    pub fn intermediate(&self) -> usize {
        self.intermediate
    }

    /// The original activation (used by the densified form).
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Block `b`.
    pub fn block(&self, b: usize) -> Result<&CollapsedBlock<F>> {
        self.blocks.get(b).ok_or(FipsError::IndexOutOfRange {
            what: "block",
            index: b,
            len: self.blocks.len(),
        })
    }

    /// `d² ` (or `2 d I`) per block against `2 d I`; biases `d` per block.
    pub fn parameter_count(&self) -> ParameterCount {
        ParameterCount {
            dense_weights: 2 * self.width * self.intermediate * self.blocks.len(),
            basis: 0,
            factor_nonzeros: self.blocks.iter().map(CollapsedBlock::weight_count).sum(),
            biases: self.width * self.blocks.len(),
        }
    }

    /// Block `b`'s output `x Mᵀ + b` for inputs `[tokens, d]`.
    pub fn forward(&self, b: usize, x: ArrayView2<'_, F>) -> Result<Array2<F>> {
        let block = self.block(b)?;
        if x.ncols() != self.width {
            return Err(FipsError::ShapeMismatch {
                what: "collapsed block input".into(),
                expected: vec![x.nrows(), self.width],
                got: x.shape().to_vec(),
            });
        }
        let mut y = match &block.map {
            CollapsedMap::Full(m) => x.dot(&m.t()),
            CollapsedMap::Factored { left, right } => x.dot(&right.t()).dot(&left.t()),
        };
        y += &block.bias;
        Ok(y)
    }

    /// Block `b` in the original architecture, exactly: `fc1 = [I_d; −I_d; 0]`,
    /// `fc2 = [M, −M, 0]`, `b₂ = b` (needs `I ≥ 2d`).
    pub fn to_dense_mlp(&self, b: usize) -> Result<DenseMlp<F>> {
        let block = self.block(b)?;
        let (d, i) = (self.width, self.intermediate);
        if i < 2 * d {
            return Err(invalid(
                "layer-collapse",
                format!(
                    "a collapsed block fits the original architecture only when I ≥ 2d (I = {i}, d = {d})"
                ),
            ));
        }
        let m = block.matrix();
        let mut fc1 = Array2::zeros((i, d));
        let mut fc2 = Array2::zeros((d, i));
        for k in 0..d {
            fc1[[k, k]] = F::one();
            fc1[[d + k, k]] = -F::one();
        }
        fc2.slice_mut(s![.., ..d]).assign(&m);
        fc2.slice_mut(s![.., d..2 * d]).assign(&m.mapv(|x| -x));
        DenseMlp::standard(
            Linear::new(fc1, Some(Array1::zeros(i)))?,
            Linear::new(fc2, Some(block.bias.clone()))?,
            self.activation,
        )
    }
}

/// Settings of LayerCollapse.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerCollapseParams {
    lambda: f64,
    lambda_doubling_steps: usize,
    initial_slope: f64,
    tolerance: f64,
    max_steps: usize,
    batch_tokens: usize,
    learning_rate: f64,
    seed: u64,
}

/// Checked settings of LayerCollapse.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerCollapseCompressor(LayerCollapseParams);

impl Default for LayerCollapseParams {
    fn default() -> Self {
        Self {
            lambda: 0.2,
            lambda_doubling_steps: 200,
            initial_slope: 0.01,
            tolerance: 0.05,
            max_steps: 2000,
            batch_tokens: 1024,
            learning_rate: 1e-3,
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

    /// Validates the settings.
    pub fn build(&self) -> Result<LayerCollapseCompressor> {
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
        Ok(LayerCollapseCompressor(*self))
    }

    fn optimizer(&self) -> AdamW {
        AdamW {
            learning_rate: self.learning_rate,
            min_learning_rate: self.learning_rate,
            weight_decay: 0.0,
            ..AdamW::default()
        }
    }
}

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

impl LayerCollapseCompressor {
    fn train_block<F: Float>(
        &self,
        mlp: &DenseMlp<F>,
        z: ArrayView2<'_, F>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<BlockTraining<F>> {
        let p = &self.0;
        let y = forward_chunked(mlp, z)?;
        let mut model = PreluMlp::from_mlp(mlp, p.initial_slope);
        let batch = p.batch_tokens.min(z.nrows());
        let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
        let (mut xb, mut yb) = (
            Array2::zeros((batch, z.ncols())),
            Array2::zeros((batch, y.ncols())),
        );
        let mut moments = (
            Moments::zeros(model.w1.raw_dim()),
            Moments::zeros(model.b1.raw_dim()),
            Moments::zeros(model.w2.raw_dim()),
            Moments::zeros(model.b2.raw_dim()),
            Moments::zeros(model.alpha.raw_dim()),
        );
        let adam = p.optimizer();
        let mut losses = Vec::new();
        let mut steps = 0;
        let converged = |m: &PreluMlp<F>| (m.alpha[0].as_f64() - 1.0).abs() < p.tolerance;
        while steps < p.max_steps && !converged(&model) {
            steps += 1;
            let rows = sample(&mut rng, z.nrows(), batch).into_vec();
            gather_rows(z, &rows, &mut xb);
            gather_rows(y.view(), &rows, &mut yb);
            let doublings = (steps - 1)
                .checked_div(p.lambda_doubling_steps)
                .unwrap_or(0);
            let lambda = p.lambda * 2f64.powi(doublings.min(60) as i32);
            let (loss, g) = model.loss_and_gradients(xb.view(), yb.view(), lambda);
            if !loss.is_finite() {
                return Err(FipsError::NonFiniteLoss { step: steps, loss });
            }
            losses.push(loss);
            let update = AdamWStep::new(&adam, adam.learning_rate, steps);
            update.apply(model.w1.view_mut(), g.w1.view(), &mut moments.0);
            update.apply(model.b1.view_mut(), g.b1.view(), &mut moments.1);
            update.apply(model.w2.view_mut(), g.w2.view(), &mut moments.2);
            update.apply(model.b2.view_mut(), g.b2.view(), &mut moments.3);
            update.apply(model.alpha.view_mut(), g.alpha.view(), &mut moments.4);
            let progress = Progress {
                step: steps,
                total_steps: p.max_steps,
                loss,
                learning_rate: adam.learning_rate,
                sparsity: model.alpha[0].as_f64(),
            };
            if on_step(&progress).is_break() {
                break;
            }
        }
        let slope = model.alpha[0].as_f64();
        Ok(BlockTraining {
            block: model.collapse(slope, converged(&model)),
            steps,
            losses,
        })
    }
}

impl<F: Float> Compressor<F> for LayerCollapseCompressor {
    fn method(&self) -> &'static str {
        "layer-collapse"
    }

    fn parameters(&self) -> serde_json::Value {
        let p = &self.0;
        serde_json::json!({
            "lambda": p.lambda,
            "lambda_doubling_steps": p.lambda_doubling_steps,
            "initial_slope": p.initial_slope,
            "tolerance": p.tolerance,
            "max_steps": p.max_steps,
            "batch_tokens": p.batch_tokens,
            "learning_rate": p.learning_rate,
            "seed": p.seed,
        })
    }

    fn steps(&self) -> usize {
        self.0.max_steps
    }

    /// Collapses every block given (choose the blocks, e.g. the last k, through the grouping).
    fn compress(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &Calibration<F>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>> {
        let start = Instant::now();
        check_group(blocks, calibration)?;
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
            details.push(serde_json::json!({
                "slope": t.block.slope,
                "converged": t.block.converged,
                "steps": t.steps,
            }));
            steps += t.steps;
            loss_curve.extend(t.losses);
            collapsed.push(t.block);
        }
        let (d, i) = (blocks[0].width(), blocks[0].intermediate());
        let group = CollapsedGroup::new(d, i, blocks[0].activation(), collapsed)?;
        MethodOutput::measured(
            "layer-collapse",
            blocks,
            CompressedBlocks::Collapsed(group),
            calibration,
            start,
            (steps, loss_curve),
            serde_json::json!({ "blocks": details }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
