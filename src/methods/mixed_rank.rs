//! Activation-aware mixed-rank compression with error compensation (the ViT mixed-rank paper's
//! method, reconstructed from its description).
//!
//! 1. Every matrix gets its whitened SVD (the activation-aware optimum, see
//!    [`whitening`](crate::math::whitening)); its lost output energy at rank `r` is
//!    `e(r) = Σ_{i>r} σ_i²` (= `‖Y − Ŷ_r‖²`), or that relative to `Σ_i σ_i²` with
//!    [`EnergyMeasure::Relative`].
//! 2. Greedy allocation over all matrices of the group: start dense; repeatedly lower the rank of the
//!    matrix whose next move loses the least energy per parameter saved, until the total fits the
//!    budget. A factorised matrix costs `(r + q)(m + n)` (the residual included), a dense one
//!    `m n`; ranks are multiples of the grid below break-even. Leaving dense is a jump to the best
//!    rank by that ratio (the cost falls discontinuously at break-even, where one step ahead would
//!    make the greedy strand some matrices dense and crush others); later moves are one grid step.
//!    Slack left by the last move is spent on the best moves back up.
//! 3. Error compensation: per factorised matrix a rank-`q` residual `P Q` (`P` zero, `Q` random,
//!    LoRA style) is trained with Adam on the matrix's own normalised output error
//!    `‖X Wᵀ − X (A B + P Q)ᵀ‖² / ‖X Wᵀ‖²` with `A B` frozen, then merged exactly:
//!    `A' = [A | P]`, `B' = [B; Q]` (rank `r + q`).
//!
//! The allocation spans the matrices of the blocks given: pass all blocks as one group for a
//! model-wide allocation.

use std::ops::ControlFlow;
use std::time::Instant;

use ndarray::{Array2, ArrayView2, Axis, concatenate, linalg::general_mat_mul};
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::foundation::error::{FipsError, Result, invalid};
use crate::foundation::float::Float;
use crate::foundation::mlp::{DenseMlp, MatrixRole, MlpKind};
use crate::math::calibration::{Calibration, CalibrationReader, gather_rows};
use crate::math::optim::{AdamW, AdamWStep, Moments};
use crate::math::subset::read_whole;
use crate::math::whitening::{WhitenedSvd, block_input_grams};
use crate::methods::compressor::{Compressor, MethodOutput, Run};
use crate::methods::engine::{Schedule, Trainable, TrainingLoop};
use crate::methods::params::{EnergyMeasure, MethodParams, MixedRankParams, MixedRankValidParams};
use crate::methods::report::{Method, MethodDetails, MixedRankDetails, Progress, ResidualError};
use crate::repr::{CompressedBlocks, LowRankGroup, LowRankMatrix, validate_group};

/// One matrix's options for the greedy allocation.
#[derive(Debug, Clone, PartialEq)]
pub struct RankCandidate {
    /// Rows m.
    pub rows: usize,
    /// Columns n.
    pub cols: usize,
    /// `lost[r]`: output energy lost at rank `r` (non-increasing in `r`).
    pub lost: Vec<f64>,
}

/// A matrix's allocated form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Kept dense.
    Dense,
    /// Factorised at this rank (plus the residual).
    Rank(usize),
}

/// Greedy rank allocation: from all-dense, lower the rank of the matrix that loses the least
/// energy per parameter saved (leaving dense by the best jump, then one grid step at a time) until
/// `Σ cost ≤ budget`, then spend any slack on the moves back up that regain the most energy per
/// parameter. A rank-`r` matrix costs `(r + residual)(m + n)`, a dense one `m n`. Returns each
/// matrix's allocation and the total cost, or an error if even the smallest ranks do not fit.
pub fn allocate_ranks(
    candidates: &[RankCandidate],
    budget: usize,
    grid: usize,
    residual: usize,
) -> Result<(Vec<Allocation>, usize)> {
    if grid == 0 {
        return Err(invalid("grid", "must be at least 1"));
    }
    let cost = |c: &RankCandidate, a: Allocation| match a {
        Allocation::Dense => c.rows * c.cols,
        Allocation::Rank(r) => (r + residual) * (c.rows + c.cols),
    };
    let lost = |c: &RankCandidate, a: Allocation| match a {
        Allocation::Dense => 0.0,
        Allocation::Rank(r) => c.lost.get(r).copied().unwrap_or(0.0),
    };
    // The next lower allocation: from dense, the jump to the grid rank with the best loss per
    // parameter saved (the cost drops discontinuously at break-even, so one step ahead is not
    // enough); afterwards one grid step (the lost energy is convex in the rank).
    let next = |c: &RankCandidate, a: Allocation| -> Option<Allocation> {
        match a {
            Allocation::Dense => {
                let max_rank = c.lost.len().saturating_sub(1);
                let ratio = |n| (lost(c, n) - lost(c, a)) / (cost(c, a) - cost(c, n)) as f64;
                (1..=max_rank / grid)
                    .map(|k| Allocation::Rank(k * grid))
                    .filter(|&n| cost(c, n) < cost(c, a))
                    .min_by(|&x, &y| ratio(x).total_cmp(&ratio(y)))
            }
            Allocation::Rank(r) => r
                .checked_sub(grid)
                .filter(|&r| r >= grid)
                .map(Allocation::Rank),
        }
    };
    let mut state = vec![Allocation::Dense; candidates.len()];
    let mut total: usize = candidates.iter().map(|c| cost(c, Allocation::Dense)).sum();
    while total > budget {
        let mut best: Option<(usize, Allocation, f64, usize)> = None;
        for (l, (c, &a)) in candidates.iter().zip(&state).enumerate() {
            let Some(n) = next(c, a) else { continue };
            let saved = cost(c, a) - cost(c, n);
            let ratio = (lost(c, n) - lost(c, a)) / saved as f64;
            let better = match best {
                None => true,
                Some((_, _, r, s)) => ratio < r || (ratio == r && saved > s),
            };
            if better {
                best = Some((l, n, ratio, saved));
            }
        }
        let (l, n, _, saved) = best.ok_or_else(|| {
            invalid(
                "budget",
                format!("{budget} parameters cannot hold the matrices even at rank {grid} with residual rank {residual}"),
            )
        })?;
        state[l] = n;
        total -= saved;
    }
    // The last move may overshoot: spend the slack on the moves back up (one grid step, or back to
    // dense) that regain the most energy per parameter.
    loop {
        let slack = budget - total;
        let mut best: Option<(usize, Allocation, f64, usize)> = None;
        for (l, (c, &a)) in candidates.iter().zip(&state).enumerate() {
            let Allocation::Rank(r) = a else { continue };
            let up = Allocation::Rank(r + grid);
            let n = if r + grid < c.lost.len() && cost(c, up) < cost(c, Allocation::Dense) {
                up
            } else {
                Allocation::Dense
            };
            let extra = cost(c, n) - cost(c, a);
            if extra > slack {
                continue;
            }
            let ratio = (lost(c, a) - lost(c, n)) / extra.max(1) as f64;
            if best.is_none_or(|(_, _, b, _)| ratio > b) {
                best = Some((l, n, ratio, extra));
            }
        }
        match best {
            Some((l, n, ratio, extra)) if ratio > 0.0 => {
                state[l] = n;
                total += extra;
            }
            _ => break,
        }
    }
    Ok((state, total))
}

impl<F: Float> Compressor<F> for MixedRankValidParams {
    fn method(&self) -> Method {
        Method::MixedRank
    }

    fn parameters(&self) -> MethodParams {
        MethodParams::MixedRank(*self.params())
    }

    fn steps(&self) -> usize {
        let p = self.params();
        if p.residual_rank > 0 { p.steps } else { 0 }
    }

    fn compress(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &dyn CalibrationReader<F>,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<MethodOutput<F>> {
        // Every token in memory at once (see `Compressor::compress`).
        crate::math::calibration::refuse_targets(calibration, "mixed rank")?;
        let whole = read_whole(calibration)?;
        let calibration: &Calibration<F> = &whole;
        let start = Instant::now();
        let spec = validate_group(blocks, Some(calibration))?;
        let p = &self.0;
        if p.steps > 0 && p.residual_rank > 0 && p.batch_tokens > calibration.tokens() {
            return Err(FipsError::BatchTooLarge {
                batch: p.batch_tokens,
                tokens: calibration.tokens(),
            });
        }
        let first = &blocks[0];
        let (d, i) = (first.width(), first.intermediate());
        crate::math::limits::check_low_rank("residual_rank", p.residual_rank, d, i)?;
        // Stage 1: whitened SVD of every matrix (and, per matrix, the gain to the block output).
        let mut svds = Vec::new();
        let mut gains = Vec::new();
        for (mlp, z) in blocks.iter().zip(calibration.inputs()) {
            gains.extend(output_gains(mlp, z.view(), p.energy)?);
            let (up, down) = block_input_grams(mlp, z.view())?;
            for (layer, role) in mlp.layers().iter().zip(mlp.kind().matrix_roles()) {
                let gram = if *role == MatrixRole::Up { &up } else { &down };
                svds.push(WhitenedSvd::new(layer.weight().view(), gram)?);
            }
        }
        // Stage 2: greedy allocation.
        let weights: Vec<&Array2<F>> = blocks
            .iter()
            .flat_map(|b| b.layers().iter().map(|l| l.weight()))
            .collect();
        let candidates: Vec<RankCandidate> = svds
            .iter()
            .zip(&weights)
            .zip(&gains)
            .map(|((svd, w), &gain)| {
                let scale = match p.energy {
                    EnergyMeasure::Relative => 1.0 / svd.energy().max(f64::MIN_POSITIVE),
                    EnergyMeasure::Absolute | EnergyMeasure::BlockOutput => gain,
                };
                RankCandidate {
                    rows: w.nrows(),
                    cols: w.ncols(),
                    lost: (0..=svd.sigma.len())
                        .map(|r| scale * svd.tail_energy(r))
                        .collect(),
                }
            })
            .collect();
        let dense_total: usize = weights.iter().map(|w| w.len()).sum();
        let budget = (p.budget * dense_total as f64).floor() as usize;
        let (allocation, _) = allocate_ranks(&candidates, budget, p.grid, p.residual_rank)?;
        // Stage 3: factors, residuals, merge.
        let f = first.kind().matrices_per_block();
        let mut bases = Vec::new();
        let mut matrices = Vec::new();
        let mut residual_errors = Vec::new();
        for (j, (svd, alloc)) in svds.iter().zip(&allocation).enumerate() {
            let (b, m) = (j / f, j % f);
            let layer = &blocks[b].layers()[m];
            let bias = layer.bias().cloned();
            let Allocation::Rank(r) = *alloc else {
                matrices.push(LowRankMatrix {
                    left: layer.weight().clone(),
                    basis: None,
                    bias,
                });
                continue;
            };
            let (a, basis) = svd.factors::<F>(r)?;
            let (a, basis) = if p.residual_rank > 0 {
                let inputs = LayerInputs {
                    mlp: &blocks[b],
                    z: calibration.inputs()[b].view(),
                    down: m + 1 == f,
                };
                let mut residual = Residual::new(
                    a.view(),
                    basis.view(),
                    p.residual_rank,
                    p.seed.wrapping_add(j as u64),
                );
                let (before, after) = residual.train(layer.weight().view(), &inputs, p, on_step)?;
                residual_errors.push(ResidualError {
                    matrix: j,
                    before,
                    after,
                });
                residual.merged(a.view(), basis.view())?
            } else {
                (a, basis)
            };
            matrices.push(LowRankMatrix {
                left: a,
                basis: Some(bases.len()),
                bias,
            });
            bases.push(basis);
        }
        let group = LowRankGroup::new(first.kind(), first.activation(), (d, i), bases, matrices)?;
        let ranks = allocation
            .iter()
            .map(|a| match a {
                Allocation::Dense => None,
                Allocation::Rank(r) => Some(r + p.residual_rank),
            })
            .collect();
        let run = Run {
            method: Method::MixedRank,
            spec,
            start,
            steps: p.steps,
            loss_curve: Vec::new(),
            details: MethodDetails::MixedRank(MixedRankDetails {
                ranks,
                residual_rank: p.residual_rank,
                residual_errors,
            }),
        };
        MethodOutput::measured(run, blocks, CompressedBlocks::LowRank(group), calibration)
    }
}

/// Per matrix of `mlp` (module order), the factor from its own output energy to the block's output
/// energy under `measure` (1 for down projections and for the per-matrix measures).
fn output_gains<F: Float>(
    mlp: &DenseMlp<F>,
    z: ArrayView2<'_, F>,
    measure: EnergyMeasure,
) -> Result<Vec<f64>> {
    let f = mlp.kind().matrices_per_block();
    let mut gains = vec![1.0; f];
    if measure != EnergyMeasure::BlockOutput {
        return Ok(gains);
    }
    let layers = mlp.layers();
    let i = mlp.intermediate();
    let act = mlp.activation();
    // E[c_k²] per hidden unit k, for each up projection.
    let mut mean_sq = vec![vec![0.0f64; i]; f - 1];
    for chunk in z.axis_chunks_iter(Axis(0), 4096) {
        let h0 = layers[0].forward(chunk)?;
        match mlp.kind() {
            MlpKind::Standard => {
                for row in h0.rows() {
                    for (acc, &h) in mean_sq[0].iter_mut().zip(row) {
                        *acc += act.derivative(h).as_f64().powi(2);
                    }
                }
            }
            MlpKind::Gated => {
                let up = layers[1].forward(chunk)?;
                for (g_row, u_row) in h0.rows().into_iter().zip(up.rows()) {
                    for (k, (&g, &u)) in g_row.iter().zip(u_row).enumerate() {
                        let (value, slope) = act.apply_with_derivative(g);
                        mean_sq[0][k] += (slope * u).as_f64().powi(2);
                        mean_sq[1][k] += value.as_f64().powi(2);
                    }
                }
            }
        }
    }
    let tokens = z.nrows().max(1) as f64;
    let down = layers[f - 1].weight();
    let column_norms: Vec<f64> = down
        .columns()
        .into_iter()
        .map(|c| c.iter().map(|w| w.as_f64().powi(2)).sum())
        .collect();
    for (gain, sq) in gains.iter_mut().zip(&mean_sq) {
        *gain = sq
            .iter()
            .zip(&column_norms)
            .map(|(s, n)| s / tokens * n)
            .sum::<f64>()
            / i as f64;
    }
    Ok(gains)
}

/// Where a matrix's inputs come from: the block's MLP inputs, or its hidden activations.
struct LayerInputs<'a, F> {
    mlp: &'a DenseMlp<F>,
    z: ArrayView2<'a, F>,
    down: bool,
}

impl<F: Float> LayerInputs<'_, F> {
    fn tokens(&self) -> usize {
        self.z.nrows()
    }

    /// The layer inputs of the tokens `rows`.
    fn batch(&self, rows: &[usize], buffer: &mut Array2<F>) -> Result<Array2<F>> {
        gather_rows(self.z, rows, buffer);
        if self.down {
            self.mlp.hidden_activations(buffer.view())
        } else {
            Ok(buffer.clone())
        }
    }
}

/// One residual's training, stepped by the engine.
struct ResidualProblem<'r, 'a, F: Float> {
    residual: &'r mut Residual<F>,
    w: ArrayView2<'a, F>,
    inputs: &'r LayerInputs<'a, F>,
    batch: usize,
    rng: ChaCha8Rng,
    buffer: Array2<F>,
    grads: Option<(Array2<F>, Array2<F>)>,
    moments: (Moments<F, ndarray::Ix2>, Moments<F, ndarray::Ix2>),
    adam: AdamW,
    first: f64,
    last: f64,
}

impl<F: Float> Trainable for ResidualProblem<'_, '_, F> {
    fn loss_and_gradients(&mut self, step: usize, _lr: f64) -> Result<f64> {
        let rows = sample(&mut self.rng, self.inputs.tokens(), self.batch).into_vec();
        let x = self.inputs.batch(&rows, &mut self.buffer)?;
        let (loss, dp, dq) = self.residual.loss_and_gradients(x.view(), self.w);
        if loss.is_finite() {
            if step == 1 {
                self.first = loss;
            }
            self.last = loss;
        }
        self.grads = Some((dp, dq));
        Ok(loss)
    }

    fn update(&mut self, step: usize, lr: f64) -> Result<()> {
        let (dp, dq) = self
            .grads
            .take()
            .ok_or_else(|| FipsError::Numerical("residual update before its gradients".into()))?;
        let update = AdamWStep::new(&self.adam, lr, step);
        update.apply(self.residual.p.view_mut(), dp.view(), &mut self.moments.0);
        update.apply(self.residual.q.view_mut(), dq.view(), &mut self.moments.1);
        Ok(())
    }
}

/// A rank-`q` residual `P Q` on top of frozen factors `A B`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Residual<F> {
    /// `P`, `[m, q]`, starts at zero.
    pub p: Array2<F>,
    /// `Q`, `[q, n]`, starts random.
    pub q: Array2<F>,
    /// `A B` of the frozen base, `[m, n]`.
    base: Array2<F>,
}

impl<F: Float> Residual<F> {
    pub(crate) fn new(a: ArrayView2<'_, F>, b: ArrayView2<'_, F>, q: usize, seed: u64) -> Self {
        let (m, n) = (a.nrows(), b.ncols());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let scale = 1.0 / (n as f64).sqrt();
        Self {
            p: Array2::zeros((m, q)),
            q: Array2::from_shape_simple_fn((q, n), || {
                let z: f64 = StandardNormal.sample(&mut rng);
                F::cast(scale * z)
            }),
            base: a.dot(&b),
        }
    }

    /// Normalised loss `‖X Wᵀ − X (A B + P Q)ᵀ‖² / ‖X Wᵀ‖²` on a batch and its gradients.
    pub(crate) fn loss_and_gradients(
        &self,
        x: ArrayView2<'_, F>,
        w: ArrayView2<'_, F>,
    ) -> (f64, Array2<F>, Array2<F>) {
        let y = x.dot(&w.t());
        let xq = x.dot(&self.q.t());
        let mut e = x.dot(&self.base.t());
        general_mat_mul(F::one(), &xq, &self.p.t(), F::one(), &mut e);
        e -= &y;
        let norm: f64 = y
            .iter()
            .map(|v| v.as_f64() * v.as_f64())
            .sum::<f64>()
            .max(f64::MIN_POSITIVE);
        let loss = e.iter().map(|v| v.as_f64() * v.as_f64()).sum::<f64>() / norm;
        // ∂L/∂Ŷ = 2 E / ‖Y‖²; ∂P = Gᵀ (X Qᵀ), ∂Q = (G P)ᵀ X.
        let g = e.mapv(|v| v * F::cast(2.0 / norm));
        let dp = g.t().dot(&xq);
        let dq = g.dot(&self.p).t().dot(&x);
        (loss, dp, dq)
    }

    /// Trains `P` and `Q` with Adam on batches of the layer's calibration inputs (through the
    /// training engine; `on_step` sees every step and may end the training); returns the
    /// normalised error on the first and the last batch.
    fn train<'a>(
        &mut self,
        w: ArrayView2<'a, F>,
        inputs: &LayerInputs<'a, F>,
        params: &MixedRankParams,
        on_step: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<(f64, f64)> {
        let batch = params.batch_tokens.min(inputs.tokens());
        let adam = params.optimizer();
        let mut problem = ResidualProblem {
            moments: (
                Moments::zeros(self.p.raw_dim()),
                Moments::zeros(self.q.raw_dim()),
            ),
            residual: self,
            w,
            inputs,
            batch,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            buffer: Array2::zeros((batch, inputs.z.ncols())),
            grads: None,
            adam,
            first: f64::NAN,
            last: f64::NAN,
        };
        let mut run = TrainingLoop::new(params.steps, Schedule::Cosine(adam));
        run.run(&mut problem, on_step)?;
        Ok((problem.first, problem.last))
    }

    /// `A' = [A | P]`, `B' = [B; Q]`: one factorisation of rank `r + q` with `A' B' = A B + P Q`.
    pub(crate) fn merged(
        &self,
        a: ArrayView2<'_, F>,
        b: ArrayView2<'_, F>,
    ) -> Result<(Array2<F>, Array2<F>)> {
        let left = concatenate(Axis(1), &[a, self.p.view()])
            .map(|l| l.as_standard_layout().into_owned())
            .map_err(|e| FipsError::Numerical(e.to_string()))?;
        let right = concatenate(Axis(0), &[b, self.q.view()])
            .map_err(|e| FipsError::Numerical(e.to_string()))?;
        Ok((left, right))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;

    fn spectrum(rows: usize, cols: usize, decay: f64) -> RankCandidate {
        let k = rows.min(cols);
        let s2: Vec<f64> = (0..k).map(|i| decay.powi(i as i32)).collect();
        let total: f64 = s2.iter().sum();
        RankCandidate {
            rows,
            cols,
            lost: (0..=k)
                .map(|r| s2[r..].iter().sum::<f64>() / total)
                .collect(),
        }
    }

    fn total_lost(c: &[RankCandidate], a: &[Allocation]) -> f64 {
        c.iter()
            .zip(a)
            .map(|(c, a)| match a {
                Allocation::Dense => 0.0,
                Allocation::Rank(r) => c.lost[*r],
            })
            .sum()
    }

    #[test]
    fn greedy_meets_the_budget_tightly_and_more_budget_never_hurts() {
        let candidates = vec![
            spectrum(64, 32, 0.9),
            spectrum(32, 64, 0.6),
            spectrum(48, 48, 0.97),
        ];
        let dense: usize = candidates.iter().map(|c| c.rows * c.cols).sum();
        let mut last_error = f64::INFINITY;
        for budget in (dense / 5..=dense).step_by(97) {
            let (alloc, total) = allocate_ranks(&candidates, budget, 1, 2).unwrap();
            let cost: usize = candidates
                .iter()
                .zip(&alloc)
                .map(|(c, a)| match a {
                    Allocation::Dense => c.rows * c.cols,
                    Allocation::Rank(r) => (r + 2) * (c.rows + c.cols),
                })
                .sum();
            assert_eq!(cost, total);
            assert!(total <= budget, "over budget: {total} > {budget}");
            // Tight: at grid 1 the slack is below the largest single step.
            let max_step = candidates.iter().map(|c| c.rows * c.cols).max().unwrap();
            assert!(
                budget - total < max_step,
                "slack {} at budget {budget}",
                budget - total
            );
            let error = total_lost(&candidates, &alloc);
            assert!(
                error <= last_error + 1e-12,
                "error rose from {last_error} to {error} with more budget"
            );
            last_error = error;
        }
        let (alloc, total) = allocate_ranks(&candidates, dense, 1, 2).unwrap();
        assert_eq!(total, dense);
        assert!(
            alloc.iter().all(|a| *a == Allocation::Dense),
            "the full budget keeps everything dense"
        );
        // Local optimality (the problem is a knapsack, so not global): with equal cost per rank,
        // no swap of one rank between two factorised matrices lowers the lost energy.
        for budget in [dense / 4, dense / 3, dense / 2, 2 * dense / 3] {
            let (alloc, _) = allocate_ranks(&candidates, budget, 1, 0).unwrap();
            for (i, (a, ca)) in alloc.iter().zip(&candidates).enumerate() {
                for (j, (b, cb)) in alloc.iter().zip(&candidates).enumerate() {
                    if let (Allocation::Rank(ra), Allocation::Rank(rb)) = (*a, *b)
                        && ra > 1
                        && rb + 1 < cb.lost.len()
                        && i != j
                    {
                        let give = ca.lost[ra - 1] - ca.lost[ra];
                        let gain = cb.lost[rb] - cb.lost[rb + 1];
                        assert!(
                            gain <= give + 1e-12,
                            "budget {budget}: moving a rank would help ({alloc:?})"
                        );
                    }
                }
            }
        }
        assert!(allocate_ranks(&candidates, 10, 8, 0).is_err());
    }

    #[test]
    fn residual_gradients_match_finite_differences_and_merge_is_exact() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut randn = |r: usize, c: usize| {
            Array2::from_shape_simple_fn((r, c), || StandardNormal.sample(&mut rng))
        };
        let (a, b, w, x): (Array2<f64>, Array2<f64>, Array2<f64>, Array2<f64>) =
            (randn(5, 2), randn(2, 6), randn(5, 6), randn(9, 6));
        let mut res = Residual::new(a.view(), b.view(), 3, 1);
        res.p = randn(5, 3);
        let (_, dp, dq) = res.loss_and_gradients(x.view(), w.view());
        let h = 1e-6;
        for (which, grad) in [(0, &dp), (1, &dq)] {
            for idx in 0..grad.len() {
                let mut plus = res.clone();
                let mut minus = res.clone();
                let (r, c) = (idx / grad.ncols(), idx % grad.ncols());
                fn target(s: &mut Residual<f64>, which: usize, r: usize, c: usize) -> &mut f64 {
                    if which == 0 {
                        &mut s.p[[r, c]]
                    } else {
                        &mut s.q[[r, c]]
                    }
                }
                *target(&mut plus, which, r, c) += h;
                *target(&mut minus, which, r, c) -= h;
                let fd = (plus.loss_and_gradients(x.view(), w.view()).0
                    - minus.loss_and_gradients(x.view(), w.view()).0)
                    / (2.0 * h);
                assert!(
                    (grad[[r, c]] - fd).abs() < 1e-6 * fd.abs().max(1e-3),
                    "{which} [{r},{c}]: {} vs {fd}",
                    grad[[r, c]]
                );
            }
        }
        let (a2, b2) = res.merged(a.view(), b.view()).unwrap();
        assert_eq!(a2.dim(), (5, 5));
        assert_abs_diff_eq!(a2.dot(&b2), a.dot(&b) + res.p.dot(&res.q), epsilon = 1e-12);
    }
}
