//! The FiPS compressor: validate, initialise by SVD, train by AdamW under a sparsity schedule.

use std::fmt;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use ndarray::{Array2, Axis, Ix1, Ix2, s};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::activation::Activation;
use crate::budget::{Budget, GroupShape, ParameterCount, rank_for_budget};
use crate::calibration::{CHUNK_TOKENS, Calibration, forward_chunked, gather_rows};
use crate::error::{FipsError, Result, invalid};
use crate::factors::{SharedBasis, SparseFactor};
use crate::float::Float;
use crate::group::CompressedGroup;
use crate::init::shared_init;
use crate::methods::LowRankGroup;
use crate::mlp::{DenseMlp, MatrixRole, MlpKind};
use crate::objective::{ContractionOrder, GroupParams, Objective, StepShape};
use crate::optim::{AdamWStep, Moments};
use crate::params::FipsValidParams;
use crate::sparsity::{MaskSchedule, Sparsifier};

/// What the progress callback sees after every training step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// The step just finished (1-based).
    pub step: usize,
    /// Steps planned.
    pub total_steps: usize,
    /// The mini-batch loss `Σ_b mean((Ŷ_b − Y_b)²)` of this step.
    pub loss: f64,
    /// The learning rate this step used.
    pub learning_rate: f64,
    /// The sparsity of `V` after this step.
    pub sparsity: f64,
}

/// The outcome of compressing one group.
#[derive(Debug, Clone)]
pub struct FipsOutput<F> {
    /// The compressed blocks.
    pub group: CompressedGroup<F>,
    /// Measurements of the run.
    pub report: GroupReport,
}

/// Measurements of one group's compression.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupReport {
    /// Block structure.
    pub kind: MlpKind,
    /// Width d, MLP width I, blocks n, matrices per block f.
    pub shape: GroupShape,
    /// Rank r of the shared basis.
    pub rank: usize,
    /// Target and achieved sparsity of `V`.
    pub target_sparsity: f64,
    /// Achieved sparsity `1 − nnz / (r f n I)`.
    pub sparsity: f64,
    /// Nonzeros of `V`.
    pub nnz: usize,
    /// Parameters before (dense weights) and after (basis + nonzeros); biases separately.
    pub parameters: ParameterCount,
    /// The sparsifier used.
    pub sparsifier: Sparsifier,
    /// The contraction order the training step used.
    pub contraction: ContractionOrder,
    /// Relative reconstruction error `‖Ŷ − Y‖ / ‖Y‖` over the calibration set of the SVD
    /// initialisation magnitude-pruned to the target sparsity (the untrained model at the same
    /// budget).
    pub rel_error_init: f64,
    /// The same after training.
    pub rel_error_final: f64,
    /// Per-block relative errors of the initialisation.
    pub block_rel_error_init: Vec<f64>,
    /// Per-block relative errors after training.
    pub block_rel_error_final: Vec<f64>,
    /// Mini-batch loss of every step run.
    pub loss_curve: Vec<f64>,
    /// Steps planned and steps run (fewer if the callback stopped the run).
    pub steps_planned: usize,
    /// Steps actually run.
    pub steps_run: usize,
    /// Calibration tokens per block and whether they were synthetic (data-free).
    pub calibration_tokens: usize,
    /// Whether the calibration inputs were synthetic Gaussian noise.
    pub data_free: bool,
    /// Time of the initialisation (SVD or Gram eigendecomposition), of the training loop, and of
    /// the whole call (targets and error evaluation included).
    pub init_time: Duration,
    /// Time of the training loop.
    pub train_time: Duration,
    /// Wall time of the whole call.
    pub wall_time: Duration,
}

impl fmt::Display for GroupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.parameters;
        writeln!(
            f,
            "{} group: n={} blocks, d={}, I={}, f={}, rank r={}{}",
            self.kind,
            self.shape.blocks,
            self.shape.width,
            self.shape.intermediate,
            self.shape.matrices_per_block,
            self.rank,
            if self.data_free {
                " [data-free calibration]"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "  V sparsity {:.4} (target {:.4}, {}), nnz {}; weights {} -> {} ({:.2}% kept), biases {}",
            self.sparsity,
            self.target_sparsity,
            self.sparsifier,
            self.nnz,
            p.dense_weights,
            p.compressed_weights(),
            100.0 * p.kept_fraction(),
            p.biases
        )?;
        writeln!(
            f,
            "  rel. error ||Y^-Y||/||Y||: init {:.4} -> trained {:.4} over {} tokens",
            self.rel_error_init, self.rel_error_final, self.calibration_tokens
        )?;
        let per_block: Vec<String> = self
            .block_rel_error_init
            .iter()
            .zip(&self.block_rel_error_final)
            .map(|(a, b)| format!("{a:.4}->{b:.4}"))
            .collect();
        writeln!(f, "  per block: {}", per_block.join("  "))?;
        write!(
            f,
            "  {}/{} steps ({}), init {:.2?}, training {:.2?}, total {:.2?}",
            self.steps_run,
            self.steps_planned,
            self.contraction,
            self.init_time,
            self.train_time,
            self.wall_time
        )
    }
}

/// Compresses a group of consecutive MLP blocks with FiPS.
#[derive(Debug, Clone)]
pub struct FipsCompressor {
    params: FipsValidParams,
}

/// The validated structure of a group of blocks.
#[derive(Debug, Clone, Copy)]
struct GroupSpec {
    kind: MlpKind,
    activation: Activation,
    shape: GroupShape,
}

impl FipsCompressor {
    /// A compressor with checked settings.
    pub fn new(params: FipsValidParams) -> Self {
        Self { params }
    }

    /// The settings.
    pub fn params(&self) -> &FipsValidParams {
        &self.params
    }

    /// The rank these settings give a group of `shape`.
    pub fn rank_for(&self, shape: GroupShape) -> Result<usize> {
        match self.params.budget() {
            Budget::Fraction(p) => rank_for_budget(shape, p, self.params.sparsity()),
            Budget::Rank(r) => Ok(r),
        }
    }

    /// Compresses `blocks` (consecutive, same structure) using `calibration` (one input array per
    /// block).
    pub fn compress<F: Float>(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &Calibration<F>,
    ) -> Result<FipsOutput<F>> {
        self.compress_with_progress(blocks, calibration, |_| ControlFlow::Continue(()))
    }

    /// As [`Self::compress`], calling `on_step` after every training step; returning
    /// `ControlFlow::Break(())` stops training early (the result is still pruned to the target
    /// sparsity and evaluated).
    pub fn compress_with_progress<F, C>(
        &self,
        blocks: &[DenseMlp<F>],
        calibration: &Calibration<F>,
        mut on_step: C,
    ) -> Result<FipsOutput<F>>
    where
        F: Float,
        C: FnMut(&Progress) -> ControlFlow<()>,
    {
        let mut trainer = self.trainer(blocks, calibration)?;
        while let Some(progress) = trainer.step()? {
            if on_step(&progress).is_break() {
                break;
            }
        }
        trainer.finish()
    }

    /// Validates the group, computes the targets and the SVD initialisation, and returns a trainer
    /// to drive step by step (what [`Self::compress`] does in a loop).
    pub fn trainer<'a, F: Float>(
        &self,
        blocks: &'a [DenseMlp<F>],
        calibration: &'a Calibration<F>,
    ) -> Result<FipsTrainer<'a, F>> {
        FipsTrainer::new(self.params.clone(), blocks, calibration, false)
    }

    /// A trainer in which every matrix has its own basis (the per-layer low-rank baseline trained
    /// with FiPS's loss); finish it with `finish_low_rank`. Requires sparsity 0.
    pub(crate) fn per_matrix_trainer<'a, F: Float>(
        &self,
        blocks: &'a [DenseMlp<F>],
        calibration: &'a Calibration<F>,
    ) -> Result<FipsTrainer<'a, F>> {
        FipsTrainer::new(self.params.clone(), blocks, calibration, true)
    }
}

/// A FiPS run in progress: call [`FipsTrainer::step`] until it returns `None` (or stop earlier),
/// then [`FipsTrainer::finish`].
///
/// One step draws a mini-batch (the same token indices for every block), computes the loss and
/// its gradients, lets the sparsifier update the mask, and applies AdamW at the cosine-decayed
/// learning rate. All buffers are allocated when the trainer is created.
#[derive(Debug)]
pub struct FipsTrainer<'a, F: Float> {
    config: FipsValidParams,
    spec: GroupSpec,
    /// One basis per matrix instead of one per group (the per-layer baseline, crate-internal).
    per_matrix: bool,
    rank: usize,
    calibration: &'a Calibration<F>,
    targets: Vec<Array2<F>>,
    params: GroupParams<F>,
    mask: Array2<bool>,
    schedule: MaskSchedule,
    init_errors: BlockErrors,
    training: Option<TrainingState<F>>,
    step: usize,
    loss_curve: Vec<f64>,
    start: Instant,
    init_time: Duration,
    train_time: Duration,
}

/// Buffers that exist only when there are steps to run.
#[derive(Debug)]
struct TrainingState<F: Float> {
    objective: Objective<F>,
    grads: GroupParams<F>,
    moments_u: Moments<F, Ix2>,
    moments_v: Moments<F, Ix2>,
    moments_b: Vec<Option<Moments<F, Ix1>>>,
    sampler: TokenSampler,
    xs: Vec<Array2<F>>,
    ys: Vec<Array2<F>>,
}

impl<'a, F: Float> FipsTrainer<'a, F> {
    fn new(
        config: FipsValidParams,
        blocks: &[DenseMlp<F>],
        calibration: &'a Calibration<F>,
        per_matrix: bool,
    ) -> Result<Self> {
        let start = Instant::now();
        let spec = validate_group(blocks)?;
        let shape = spec.shape;
        if calibration.blocks() != shape.blocks {
            return Err(FipsError::ShapeMismatch {
                what: "calibration (one input array per block)".into(),
                expected: vec![shape.blocks],
                got: vec![calibration.blocks()],
            });
        }
        if calibration.width() != shape.width {
            return Err(FipsError::ShapeMismatch {
                what: "calibration inputs".into(),
                expected: vec![calibration.tokens(), shape.width],
                got: vec![calibration.tokens(), calibration.width()],
            });
        }
        if per_matrix && config.sparsity() > 0.0 {
            return Err(invalid(
                "sparsity",
                "per-matrix bases are the dense low-rank baseline: the sparsity must be 0",
            ));
        }
        // With per-matrix bases the budget applies to each matrix alone (f = n = 1).
        let rank_shape = if per_matrix {
            GroupShape {
                blocks: 1,
                matrices_per_block: 1,
                ..shape
            }
        } else {
            shape
        };
        let rank = match config.budget() {
            Budget::Fraction(p) => rank_for_budget(rank_shape, p, config.sparsity())?,
            Budget::Rank(r) => r,
        };
        let batch = config.batch_tokens();
        let steps = config.steps();
        if steps > 0 && batch > calibration.tokens() {
            return Err(FipsError::BatchTooLarge {
                batch,
                tokens: calibration.tokens(),
            });
        }
        let entries = shape.factor_entries(rank);
        if entries > u32::MAX as usize {
            return Err(invalid(
                "budget",
                format!(
                    "V would have {entries} entries; at most {} are supported",
                    u32::MAX
                ),
            ));
        }

        // Targets Y_b from the original blocks.
        let targets = blocks
            .iter()
            .zip(calibration.inputs())
            .map(|(mlp, z)| forward_chunked(mlp, z.view()))
            .collect::<Result<Vec<_>>>()?;

        // SVD initialisation.
        let init_start = Instant::now();
        let oriented: Vec<_> = blocks
            .iter()
            .flat_map(|b| (0..shape.matrices_per_block).map(move |j| b.oriented(j)))
            .collect();
        let (u, v) = if per_matrix {
            // U = [U_1 | … | U_fn], V = [V_1 | … | V_fn], each pair the SVD of one matrix.
            let inits = oriented
                .iter()
                .map(|w| shared_init(std::slice::from_ref(w), rank, config.tau(), config.init()))
                .collect::<Result<Vec<_>>>()?;
            let us: Vec<_> = inits.iter().map(|i| i.basis.view()).collect();
            let vs: Vec<_> = inits.iter().map(|i| i.factors.view()).collect();
            // (Concatenating along columns yields a column-major array: the trainer needs row-major.)
            let cat = |parts: &[ndarray::ArrayView2<'_, F>]| {
                ndarray::concatenate(Axis(1), parts)
                    .map(|a| a.as_standard_layout().into_owned())
                    .map_err(|e| FipsError::Numerical(e.to_string()))
            };
            (cat(&us)?, cat(&vs)?)
        } else {
            let init = shared_init(&oriented, rank, config.tau(), config.init())?;
            (init.basis, init.factors)
        };
        let init_time = init_start.elapsed();
        let mut params = GroupParams {
            u,
            v,
            biases: blocks
                .iter()
                .flat_map(|b| b.layers().iter().map(|l| l.bias().cloned()))
                .collect(),
        };

        let target = config.sparsity();
        let mut schedule = MaskSchedule::new(config.sparsifier(), target, entries, steps);
        let mut mask = Array2::from_elem(params.v.raw_dim(), true);

        // The untrained model at the budget: the initialisation pruned to the target sparsity.
        let init_errors = {
            let mut v = params.v.clone();
            let mut m = mask.clone();
            MaskSchedule::new(config.sparsifier(), target, entries, 0)
                .prepare(contiguous(&mut v)?, contiguous(&mut m)?);
            let rebuilt =
                Representation::build(&spec, rank, per_matrix, &params.u, &v, &m, &params.biases)?;
            block_errors(
                &rebuilt.dense_blocks(spec.shape.blocks)?,
                calibration,
                &targets,
            )?
        };
        schedule.prepare(contiguous(&mut params.v)?, contiguous(&mut mask)?);

        let training = (steps > 0).then(|| {
            let step_shape = StepShape {
                tokens: batch,
                width: shape.width,
                intermediate: shape.intermediate,
                rank,
                blocks: shape.blocks,
                matrices_per_block: shape.matrices_per_block,
            };
            let xs = vec![Array2::<F>::zeros((batch, shape.width)); shape.blocks];
            let objective = Objective::new(
                spec.kind,
                spec.activation,
                step_shape,
                config.contraction(),
                config.threads(),
            );
            TrainingState {
                objective: if per_matrix {
                    objective.with_per_matrix_bases()
                } else {
                    objective
                },
                grads: params.zeros_like(),
                moments_u: Moments::zeros(params.u.raw_dim()),
                moments_v: Moments::zeros(params.v.raw_dim()),
                moments_b: params
                    .biases
                    .iter()
                    .map(|b| b.as_ref().map(|b| Moments::zeros(b.raw_dim())))
                    .collect(),
                sampler: TokenSampler::new(calibration.tokens(), batch, config.seed()),
                ys: xs.clone(),
                xs,
            }
        });
        Ok(Self {
            spec,
            per_matrix,
            rank,
            calibration,
            targets,
            params,
            mask,
            schedule,
            init_errors,
            training,
            step: 0,
            loss_curve: Vec::with_capacity(steps.min(1 << 16)),
            start,
            init_time,
            train_time: Duration::ZERO,
            config,
        })
    }

    /// Rank r of the shared basis.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The group's dense shape.
    pub fn shape(&self) -> GroupShape {
        self.spec.shape
    }

    /// The contraction order the step uses.
    pub fn contraction(&self) -> ContractionOrder {
        match &self.training {
            Some(t) => t.objective.order(),
            None => self.config.contraction(),
        }
    }

    /// Steps run so far.
    pub fn steps_run(&self) -> usize {
        self.step
    }

    /// Runs one training step; `Ok(None)` once every planned step has run.
    pub fn step(&mut self) -> Result<Option<Progress>> {
        let total = self.config.steps();
        let Some(state) = self.training.as_mut() else {
            return Ok(None);
        };
        if self.step >= total {
            return Ok(None);
        }
        let started = Instant::now();
        let step = self.step + 1;
        let indices = state.sampler.next_batch();
        for (b, (x, y)) in state.xs.iter_mut().zip(state.ys.iter_mut()).enumerate() {
            gather_rows(self.calibration.inputs()[b].view(), indices, x);
            gather_rows(self.targets[b].view(), indices, y);
        }
        let loss = state.objective.loss_and_gradients(
            &self.params,
            &state.xs,
            &state.ys,
            &mut state.grads,
        )?;
        if !loss.is_finite() {
            return Err(FipsError::NonFiniteLoss { step, loss });
        }
        let grad_v = state.grads.v.as_slice().ok_or_else(internal_layout)?;
        self.schedule.step(
            step,
            contiguous(&mut self.params.v)?,
            contiguous(&mut self.mask)?,
            grad_v,
        );
        let adam = self.config.optimizer();
        let lr = adam.learning_rate_at(step, total);
        let update = AdamWStep::<F>::new(adam, lr, step);
        let split = state.objective.split();
        update.apply_split(
            &split,
            self.params.u.view_mut(),
            state.grads.u.view(),
            &mut state.moments_u,
            None,
        );
        update.apply_split(
            &split,
            self.params.v.view_mut(),
            state.grads.v.view(),
            &mut state.moments_v,
            self.schedule.is_sparse().then(|| self.mask.view()),
        );
        for ((b, g), m) in self
            .params
            .biases
            .iter_mut()
            .zip(&state.grads.biases)
            .zip(&mut state.moments_b)
        {
            if let (Some(b), Some(g), Some(m)) = (b.as_mut(), g.as_ref(), m.as_mut()) {
                update.apply(b.view_mut(), g.view(), m);
            }
        }
        self.step = step;
        self.loss_curve.push(loss);
        self.train_time += started.elapsed();
        Ok(Some(Progress {
            step,
            total_steps: total,
            loss,
            learning_rate: lr,
            sparsity: self.schedule.sparsity(),
        }))
    }

    /// The group as it stands after the steps run so far, pruned to the target sparsity if the
    /// schedule is not there yet (a copy: training goes on undisturbed). For validation during
    /// training (see [`crate::validation`]); shared-basis runs only.
    pub fn snapshot(&self) -> Result<CompressedGroup<F>> {
        if self.per_matrix {
            return Err(FipsError::Numerical(
                "a per-matrix run has no shared basis to snapshot".into(),
            ));
        }
        let (mut v, mut mask) = (self.params.v.clone(), self.mask.clone());
        MaskSchedule::new(self.config.sparsifier(), self.config.sparsity(), v.len(), 1)
            .finish(contiguous(&mut v)?, contiguous(&mut mask)?);
        assemble(&self.spec, &self.params.u, &v, &mask, &self.params.biases)
    }

    /// Prunes to the target sparsity (if the schedule has not yet), evaluates the trained group on
    /// the whole calibration set and returns it with its report.
    pub fn finish(self) -> Result<FipsOutput<F>> {
        match self.finish_inner()? {
            (Representation::Shared(group), report) => Ok(FipsOutput { group, report }),
            (Representation::PerMatrix(_), _) => Err(FipsError::Numerical(
                "a per-matrix run has no shared basis: use finish_low_rank".into(),
            )),
        }
    }

    /// The result of a per-matrix run, as low-rank factors `A_j B_j`.
    pub(crate) fn finish_low_rank(self) -> Result<(LowRankGroup<F>, GroupReport)> {
        match self.finish_inner()? {
            (Representation::PerMatrix(group), report) => Ok((group, report)),
            (Representation::Shared(_), _) => Err(FipsError::Numerical(
                "a shared-basis run has no per-matrix factors: use finish".into(),
            )),
        }
    }

    fn finish_inner(mut self) -> Result<(Representation<F>, GroupReport)> {
        if let Some(bad) = first_non_finite(&self.params) {
            return Err(FipsError::NonFiniteLoss {
                step: self.step,
                loss: bad,
            });
        }
        self.schedule
            .finish(contiguous(&mut self.params.v)?, contiguous(&mut self.mask)?);
        let p = &self.params;
        let built = Representation::build(
            &self.spec,
            self.rank,
            self.per_matrix,
            &p.u,
            &p.v,
            &self.mask,
            &p.biases,
        )?;
        let final_errors = block_errors(
            &built.dense_blocks(self.spec.shape.blocks)?,
            self.calibration,
            &self.targets,
        )?;
        let parameters = built.parameter_count();
        let nnz = self.mask.iter().filter(|&&m| m).count();
        let entries = self.mask.len();
        let report = GroupReport {
            kind: self.spec.kind,
            shape: self.spec.shape,
            rank: self.rank,
            target_sparsity: self.config.sparsity(),
            sparsity: 1.0 - nnz as f64 / entries as f64,
            nnz,
            parameters,
            sparsifier: self.config.sparsifier(),
            contraction: self.contraction(),
            rel_error_init: self.init_errors.overall(),
            rel_error_final: final_errors.overall(),
            block_rel_error_init: self.init_errors.per_block(),
            block_rel_error_final: final_errors.per_block(),
            steps_planned: self.config.steps(),
            steps_run: self.step,
            loss_curve: self.loss_curve,
            calibration_tokens: self.calibration.tokens(),
            data_free: self.calibration.is_data_free(),
            init_time: self.init_time,
            train_time: self.train_time,
            wall_time: self.start.elapsed(),
        };
        Ok((built, report))
    }
}

/// The trained factors in their public form.
enum Representation<F> {
    Shared(CompressedGroup<F>),
    PerMatrix(LowRankGroup<F>),
}

impl<F: Float> Representation<F> {
    /// Splits the concatenated factors into the group's matrices.
    fn build(
        spec: &GroupSpec,
        rank: usize,
        per_matrix: bool,
        u: &Array2<F>,
        v: &Array2<F>,
        mask: &Array2<bool>,
        biases: &[Option<ndarray::Array1<F>>],
    ) -> Result<Self> {
        if !per_matrix {
            return assemble(spec, u, v, mask, biases).map(Self::Shared);
        }
        let (i, f) = (spec.shape.intermediate, spec.shape.matrices_per_block);
        let factors = (0..spec.shape.matrices())
            .map(|j| {
                let uj = u.slice(s![.., j * rank..(j + 1) * rank]);
                let vj = v.slice(s![.., j * i..(j + 1) * i]);
                // W̃_j = U_j V_j is d × I; up projections store its transpose.
                let (left, right) = match spec.kind.matrix_roles()[j % f] {
                    MatrixRole::Up => (vj.t().to_owned(), uj.t().to_owned()),
                    MatrixRole::Down => (uj.to_owned(), vj.to_owned()),
                };
                (left, right, biases[j].clone())
            })
            .collect();
        LowRankGroup::independent(spec.kind, spec.activation, (spec.shape.width, i), factors)
            .map(Self::PerMatrix)
    }

    fn dense_blocks(&self, blocks: usize) -> Result<Vec<DenseMlp<F>>> {
        (0..blocks)
            .map(|b| match self {
                Self::Shared(g) => g.to_dense_mlp(b),
                Self::PerMatrix(g) => g.to_dense_mlp(b),
            })
            .collect()
    }

    fn parameter_count(&self) -> ParameterCount {
        match self {
            Self::Shared(g) => g.parameter_count(),
            Self::PerMatrix(g) => g.parameter_count(),
        }
    }
}

/// Checks that every block of a group has the structure of block 0.
fn validate_group<F: Float>(blocks: &[DenseMlp<F>]) -> Result<GroupSpec> {
    let first = blocks.first().ok_or(FipsError::EmptyGroup)?;
    for (b, mlp) in blocks.iter().enumerate().skip(1) {
        let reason = if mlp.kind() != first.kind() {
            Some(format!("kind {} differs from {}", mlp.kind(), first.kind()))
        } else if mlp.activation() != first.activation() {
            Some(format!(
                "activation {} differs from {}",
                mlp.activation(),
                first.activation()
            ))
        } else if mlp.width() != first.width() || mlp.intermediate() != first.intermediate() {
            Some(format!(
                "d = {}, I = {} differ from d = {}, I = {}",
                mlp.width(),
                mlp.intermediate(),
                first.width(),
                first.intermediate()
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(FipsError::GroupMismatch { block: b, reason });
        }
    }
    Ok(GroupSpec {
        kind: first.kind(),
        activation: first.activation(),
        shape: GroupShape {
            width: first.width(),
            intermediate: first.intermediate(),
            blocks: blocks.len(),
            matrices_per_block: first.kind().matrices_per_block(),
        },
    })
}

fn internal_layout() -> FipsError {
    FipsError::Numerical("internal buffer is not contiguous".into())
}

/// A standard-layout array as a flat slice.
fn contiguous<T>(a: &mut Array2<T>) -> Result<&mut [T]> {
    a.as_slice_mut().ok_or_else(internal_layout)
}

/// The first non-finite trained value, if any (weight decay and Adam keep finite inputs finite, but
/// an overflow in `f32` would surface here rather than in a silently broken model).
fn first_non_finite<F: Float>(p: &GroupParams<F>) -> Option<f64> {
    p.u.iter()
        .chain(p.v.iter())
        .chain(p.biases.iter().flatten().flat_map(|b| b.iter()))
        .find(|x| !x.is_finite_())
        .map(|x| x.as_f64())
}

/// Splits the concatenated factor into per-matrix [`SparseFactor`]s and builds the group.
fn assemble<F: Float>(
    spec: &GroupSpec,
    u: &Array2<F>,
    v: &Array2<F>,
    mask: &Array2<bool>,
    biases: &[Option<ndarray::Array1<F>>],
) -> Result<CompressedGroup<F>> {
    let i = spec.shape.intermediate;
    let factors = (0..spec.shape.matrices())
        .map(|j| {
            let cols = s![.., j * i..(j + 1) * i];
            SparseFactor::new(v.slice(cols).to_owned(), mask.slice(cols).to_owned())
        })
        .collect::<Result<Vec<_>>>()?;
    CompressedGroup::new(
        spec.kind,
        spec.activation,
        SharedBasis::new(u.clone())?,
        factors,
        biases.to_vec(),
    )
}

/// Squared errors and squared target norms per block.
#[derive(Debug)]
struct BlockErrors {
    error2: Vec<f64>,
    norm2: Vec<f64>,
}

impl BlockErrors {
    fn overall(&self) -> f64 {
        let e: f64 = self.error2.iter().sum();
        let n: f64 = self.norm2.iter().sum();
        relative(e, n)
    }

    fn per_block(&self) -> Vec<f64> {
        self.error2
            .iter()
            .zip(&self.norm2)
            .map(|(&e, &n)| relative(e, n))
            .collect()
    }
}

fn relative(error2: f64, norm2: f64) -> f64 {
    if norm2 > 0.0 {
        (error2 / norm2).sqrt()
    } else {
        error2.sqrt()
    }
}

/// `‖Ŷ_b − Y_b‖²` and `‖Y_b‖²` of every block over the whole calibration set, in chunks, with the
/// blocks rebuilt dense (each weight is formed once, not once per chunk).
fn block_errors<F: Float>(
    blocks: &[DenseMlp<F>],
    calibration: &Calibration<F>,
    targets: &[Array2<F>],
) -> Result<BlockErrors> {
    let mut error2 = Vec::with_capacity(targets.len());
    let mut norm2 = Vec::with_capacity(targets.len());
    for (mlp, (z, y)) in blocks.iter().zip(calibration.inputs().iter().zip(targets)) {
        let (mut e, mut n) = (0.0f64, 0.0f64);
        for (zc, yc) in z
            .axis_chunks_iter(Axis(0), CHUNK_TOKENS)
            .zip(y.axis_chunks_iter(Axis(0), CHUNK_TOKENS))
        {
            let yhat = mlp.forward(zc)?;
            ndarray::Zip::from(&yhat).and(&yc).for_each(|&p, &t| {
                let (p, t) = (p.as_f64(), t.as_f64());
                e += (p - t) * (p - t);
                n += t * t;
            });
        }
        error2.push(e);
        norm2.push(n);
    }
    Ok(BlockErrors { error2, norm2 })
}

/// Draws mini-batches of token indices: a seeded shuffle of all tokens, consumed in batches and
/// reshuffled when fewer than a batch remain (every token is seen once per epoch).
#[derive(Debug)]
struct TokenSampler {
    order: Vec<usize>,
    position: usize,
    batch: usize,
    rng: ChaCha8Rng,
}

impl TokenSampler {
    fn new(tokens: usize, batch: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..tokens).collect();
        order.shuffle(&mut rng);
        Self {
            order,
            position: 0,
            batch,
            rng,
        }
    }

    fn next_batch(&mut self) -> &[usize] {
        if self.position + self.batch > self.order.len() {
            self.order.shuffle(&mut self.rng);
            self.position = 0;
        }
        let batch = &self.order[self.position..self.position + self.batch];
        self.position += self.batch;
        batch
    }
}
