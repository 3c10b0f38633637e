//! The FiPS trainer: validate, initialise by SVD, train by AdamW under a sparsity schedule.
//!
//! The crate-internal `FactorTrainer` trains factors `W̃_j = U_j V_j` of a group under a
//! [`BasisLayout`] (one shared basis, or one per matrix) with
//! FiPS's block-wise loss, optimiser and sparsifier, stepped by the shared
//! training engine (`methods::engine`). It hands its factors to an assembler supplied by the
//! caller, which turns them into a compressed form: FiPS assembles a shared-basis group
//! ([`FipsTrainer`]); the trained per-layer SVD assembles low-rank factors in its own module. The
//! trainer knows no method but its caller.

use std::time::{Duration, Instant};

use ndarray::{Array1, Array2, Ix1, Ix2};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::foundation::error::{FipsError, Result, invalid};
use crate::foundation::float::Float;
use crate::foundation::kernels::RowSplit;
use crate::foundation::mlp::DenseMlp;
use crate::foundation::slicing::s;
use crate::math::bases::BasisLayout;
use crate::math::bitmask::BitMask;
use crate::math::budget::{Budget, GroupShape, nonzeros_for_sparsity, rank_for_budget};
use crate::math::calibration::{Calibration, CalibrationReader, gather_rows};
use crate::math::objective::{
    BasisGradients, BasisParams, ContractionOrder, FactorStore, Objective, StepShape,
};
use crate::math::optim::{AdamWStep, KeptEntries, KeptLayout, Moments};
use crate::math::sparsity::{MaskSchedule, StepPlan};
use crate::math::tiles::TileGrid;
use crate::math::validation::ValidationSet;
use crate::methods::engine::{Schedule, Trainable, TrainingLoop};
use crate::methods::fips::params::FipsValidParams;
use crate::methods::report::{
    FipsDetails, Method, MethodDetails, MethodReport, Progress, ValidationReport,
};
use crate::repr::measure::targets;
use crate::repr::{
    BlockErrors, CompressedBlocks, GroupSpec, SharedBasis, SharedBasisGroup, SparseFactor,
    block_errors_one_at_a_time, block_errors_streamed, validate_group,
};

/// Trained factors of a group, split into its matrices by an [`Assembler`].
#[derive(Debug)]
pub(crate) struct Factors<'p, F> {
    /// The group's structure.
    pub spec: &'p GroupSpec,
    /// Rank of each basis.
    pub rank: usize,
    /// `U` (`d × r`, or `d × r f n` with per-matrix bases).
    pub u: &'p Array2<F>,
    /// The values of `V = [V_1 | … | V_fn]` (`r × fnI`).
    pub v: FactorValues<'p, F>,
    /// The mask of `V` (`r × fnI`, row-major, one bit per entry): entries outside it count as zero
    /// (`v` need not hold zeros there).
    pub mask: &'p BitMask,
    /// One bias slot per matrix.
    pub biases: &'p [Option<Array1<F>>],
}

/// How [`Factors`] hold the values of `V`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum FactorValues<'p, F> {
    /// `V` dense.
    Dense(&'p Array2<F>),
    /// The kept values of `mask` (row-major order; `layout` of `mask`): every entry of the
    /// factors' mask lies in `mask`.
    Kept {
        values: &'p [F],
        mask: &'p BitMask,
        layout: &'p KeptLayout,
    },
}

impl<F: Float> Factors<'_, F> {
    /// `V_j` (`r × I`, zero outside the mask) and its mask: one matrix at a time, so that an
    /// assembler never holds `V` dense.
    pub(crate) fn factor(&self, j: usize) -> Result<(Array2<F>, Array2<bool>)> {
        let (r, i) = (self.rank, self.spec.shape.intermediate);
        let matrices = self.spec.shape.matrices();
        let columns = matrices * i;
        if self.mask.len() != r * columns {
            return Err(FipsError::ShapeMismatch {
                what: "mask of the factors".into(),
                expected: vec![r * columns],
                got: vec![self.mask.len()],
            });
        }
        if j >= matrices {
            return Err(FipsError::IndexOutOfRange {
                what: "factor",
                index: j,
                len: matrices,
            });
        }
        let mask = Array2::from_shape_fn((r, i), |(k, c)| self.mask.get(k * columns + j * i + c));
        let mut v = Array2::zeros((r, i));
        match self.v {
            FactorValues::Dense(dense) => v.assign(&dense.slice(s![.., j * i..(j + 1) * i])),
            FactorValues::Kept {
                values,
                mask: kept,
                layout,
            } => layout.decode(values, kept, j, v.view_mut())?,
        }
        v.zip_mut_with(&mask, |x, &keep| {
            if !keep {
                *x = F::zero();
            }
        });
        Ok((v, mask))
    }
}

/// Turns trained factors into a compressed form.
pub(crate) type Assembler<F> = fn(&Factors<'_, F>) -> Result<CompressedBlocks<F>>;

/// What a finished [`FactorTrainer`] hands back.
#[derive(Debug)]
pub(crate) struct Trained<F> {
    pub blocks: CompressedBlocks<F>,
    pub spec: GroupSpec,
    pub rank: usize,
    pub nnz: usize,
    pub entries: usize,
    pub contraction: ContractionOrder,
    pub init_errors: BlockErrors,
    pub final_errors: BlockErrors,
    pub steps_run: usize,
    pub steps_planned: usize,
    pub loss_curve: Vec<f64>,
    pub calibration_tokens: usize,
    pub data_free: bool,
    pub init_time: Duration,
    pub train_time: Duration,
    pub wall_time: Duration,
    /// The trained group on the validation set, if one was given.
    pub validation: Option<ValidationReport>,
}

/// A training run of factors under a basis layout; see the module documentation.
#[derive(Debug)]
pub(crate) struct FactorTrainer<'a, F: Float> {
    problem: FactorProblem<'a, F>,
    run: TrainingLoop,
    assemble: Assembler<F>,
    spec: GroupSpec,
    /// Components trained: the budget's rank less a tail left out of training (see `new`).
    trained_rank: usize,
    /// The budget's rank, of the group handed back.
    rank: usize,
    /// Entries of `V` at the budget's rank (`r f n I`).
    entries: usize,
    /// Dead components whose basis parameters `V` keeps as entries instead
    /// ([`respent_sparsity`]).
    spent_components: usize,
    init_errors: BlockErrors,
    start: Instant,
    init_time: Duration,
}

/// The state one step reads and writes.
#[derive(Debug)]
struct FactorProblem<'a, F: Float> {
    config: FipsValidParams,
    source: Source<'a, F>,
    /// `U` (`d × r`, or `d × r f n` with per-matrix bases).
    u: Array2<F>,
    /// `V`'s kept entries, row-major order of the mask: their values, and their AdamW moments
    /// while training. `V` is never held dense: each matrix is decoded when a product reads it.
    kept: KeptEntries<F>,
    /// The mask of `V` (`r × fnI`, row-major), one bit per entry.
    mask: BitMask,
    /// Where each matrix's rows start among the kept entries.
    layout: KeptLayout,
    /// One bias slot per matrix.
    biases: Vec<Option<Array1<F>>>,
    schedule: MaskSchedule,
    training: Option<TrainingState<F>>,
    validator: Option<Validator<'a, F>>,
}

/// Where a batch's inputs and targets come from.
#[derive(Debug)]
enum Source<'a, F: Float> {
    /// The calibration in memory, with every target `Y_b = MLP_b(Z_b)` computed once.
    Memory {
        calibration: &'a Calibration<F>,
        targets: std::borrow::Cow<'a, [Array2<F>]>,
    },
    /// Inputs read per batch and per chunk; each batch's targets recomputed by the dense blocks.
    Streamed {
        reader: &'a dyn CalibrationReader<F>,
        blocks: &'a [DenseMlp<F>],
    },
}

impl<F: Float> Source<'_, F> {
    fn tokens(&self) -> usize {
        match self {
            Self::Memory { calibration, .. } => calibration.tokens(),
            Self::Streamed { reader, .. } => reader.tokens(),
        }
    }

    fn is_data_free(&self) -> bool {
        match self {
            Self::Memory { calibration, .. } => calibration.is_data_free(),
            Self::Streamed { reader, .. } => reader.is_data_free(),
        }
    }

    /// Errors of the blocks `rebuild(b)` against the targets on the whole calibration, one dense
    /// block at a time (chunk by chunk when streamed).
    fn errors(&self, rebuild: impl FnMut(usize) -> Result<DenseMlp<F>>) -> Result<BlockErrors> {
        match self {
            Self::Memory {
                calibration,
                targets,
            } => block_errors_one_at_a_time(rebuild, calibration, targets),
            Self::Streamed { reader, blocks } => block_errors_streamed(rebuild, blocks, *reader),
        }
    }

    /// Rows `indices` of every block's inputs into `xs` and of its targets into `ys`.
    fn batch(&self, indices: &[usize], xs: &mut [Array2<F>], ys: &mut [Array2<F>]) -> Result<()> {
        match self {
            Self::Memory {
                calibration,
                targets,
            } => {
                for (b, (x, y)) in xs.iter_mut().zip(ys.iter_mut()).enumerate() {
                    gather_rows(calibration.inputs()[b].view(), indices, x);
                    gather_rows(targets[b].view(), indices, y);
                }
            }
            Self::Streamed { reader, blocks } => {
                for (b, (x, y)) in xs.iter_mut().zip(ys.iter_mut()).enumerate() {
                    reader.gather(b, indices, x)?;
                    let mlp = blocks.get(b).ok_or_else(internal_layout)?;
                    *y = mlp.forward(x.view())?;
                }
            }
        }
        Ok(())
    }
}

/// What scoring the current state on the validation set needs.
#[derive(Debug)]
struct Validator<'a, F: Float> {
    set: &'a ValidationSet<F>,
    spec: GroupSpec,
    rank: usize,
    assemble: Assembler<F>,
}

/// Buffers that exist only when there are steps to run (`V`'s moments live with its kept
/// values). `V`'s gradient is never held whole: the objective hands it over one matrix at a time
/// and each matrix's kept entries get their AdamW update then ([`VUpdate`]).
#[derive(Debug)]
struct TrainingState<F: Float> {
    objective: Objective<F>,
    grads: BasisGradients<F>,
    moments_u: Moments<F, Ix2>,
    moments_b: Vec<Option<Moments<F, Ix1>>>,
    sampler: TokenSampler,
    xs: Vec<Array2<F>>,
    ys: Vec<Array2<F>>,
}

impl<'a, F: Float> FactorTrainer<'a, F> {
    /// Validates the group, computes the targets and the initialisation, and measures the
    /// initialisation pruned to the target sparsity. With `validation`, the trained group is
    /// measured on it, and early stopping (if configured) scores the training state on it.
    pub(crate) fn new(
        config: FipsValidParams,
        layout: BasisLayout,
        assemble: Assembler<F>,
        blocks: &'a [DenseMlp<F>],
        calibration: &'a dyn CalibrationReader<F>,
        validation: Option<&'a ValidationSet<F>>,
    ) -> Result<Self> {
        let start = Instant::now();
        let spec = validate_group(blocks, calibration.in_memory())?;
        if calibration.blocks() != blocks.len() || calibration.width() != spec.shape.width {
            return Err(FipsError::ShapeMismatch {
                what: "calibration inputs (blocks, width)".into(),
                expected: vec![blocks.len(), spec.shape.width],
                got: vec![calibration.blocks(), calibration.width()],
            });
        }
        if let Some(set) = validation
            && (set.blocks() != blocks.len() || set.width() != Some(spec.shape.width))
        {
            return Err(FipsError::ShapeMismatch {
                what: "validation inputs (blocks, width)".into(),
                expected: vec![blocks.len(), spec.shape.width],
                got: vec![set.blocks(), set.width().unwrap_or(0)],
            });
        }
        if config.early_stop().is_some() && config.steps() > 0 && validation.is_none() {
            return Err(invalid(
                "early_stop",
                "early stopping needs a validation set (held-out calibration tokens)",
            ));
        }
        let shape = spec.shape;
        if layout == BasisLayout::PerMatrix && config.sparsity() > 0.0 {
            return Err(invalid(
                "sparsity",
                "per-matrix bases are the dense low-rank baseline: the sparsity must be 0",
            ));
        }
        let rank = match config.budget() {
            Budget::Fraction(p) => {
                rank_for_budget(layout.budget_shape(shape), p, config.sparsity())?
            }
            Budget::Rank(r) if layout == BasisLayout::PerMatrix => {
                crate::math::limits::low_rank("rank", r, shape.width, shape.intermediate)?
            }
            Budget::Rank(r) => {
                crate::math::limits::check_shared_rank(
                    r,
                    layout.budget_shape(shape),
                    config.sparsity(),
                )?;
                r
            }
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

        // Targets Y_b from the original blocks: all of them now if the calibration is in memory,
        // else per batch and per chunk.
        let source = match calibration.in_memory() {
            Some(calibration) => Source::Memory {
                calibration,
                targets: match calibration.targets() {
                    Some(given) => std::borrow::Cow::Borrowed(given),
                    None => std::borrow::Cow::Owned(targets(blocks, calibration)?),
                },
            },
            None => Source::Streamed {
                reader: calibration,
                blocks,
            },
        };

        // SVD initialisation.
        let init_start = Instant::now();
        let oriented: Vec<_> = blocks
            .iter()
            .flat_map(|b| (0..shape.matrices_per_block).map(move |j| b.oriented(j)))
            .collect();
        let (mut u, mut v) = layout.init(&oriented, rank, config.tau(), config.init())?;
        let init_time = init_start.elapsed();
        let biases: Vec<_> = blocks
            .iter()
            .flat_map(|b| b.layers().iter().map(|l| l.bias().cloned()))
            .collect();

        let matrices = shape.blocks * shape.matrices_per_block;
        let (target, spent_components) = if config.spend_unused_rank()
            && layout == BasisLayout::Shared
            && config.mask_tiles().is_entries()
        {
            respent_sparsity(&config, &u, &v, entries, steps, shape.width)?
        } else {
            (config.sparsity(), 0)
        };
        let mut schedule = MaskSchedule::new(config.sparsifier(), target, entries, steps).tiled(
            TileGrid::of(config.mask_tiles(), rank, matrices, shape.intermediate),
        );

        // The untrained model at the budget: the initialisation pruned to the target sparsity
        // (only a mask is copied: the assembled factors zero the values outside it), measured
        // one dense block at a time, each block assembled alone when its error is measured.
        let init_errors = {
            let m = BitMask::from_bools(
                &schedule.target_mask(v.as_slice().ok_or_else(internal_layout)?),
            );
            let pruned = Factors {
                spec: &spec,
                rank,
                u: &u,
                v: FactorValues::Dense(&v),
                mask: &m,
                biases: &biases,
            };
            source.errors(|b| rebuild_block(assemble, layout, &pruned, b))?
        };
        let mut bools = vec![true; v.len()];
        schedule.prepare(contiguous(&mut v)?, &mut bools);
        // RigL prunes straight to the target, and takes every padded component's row (the
        // padding is the top rows over τ): a component with a zero column of `U` and no kept
        // entry never receives gradient again (`∂V_k = U_kᵀ ∂W = 0`, `∂U_k = ∂W V_kᵀ = 0`).
        // The tail of such components is left out of training (every step multiplies through
        // `rank` components only); the group handed back is padded to the budget's rank again.
        // Their rows hold no kept entry: the kept values are the same without them, and only
        // the mask is cut (no copy of `V`).
        let budget_rank = rank;
        let cols = v.ncols();
        let rank = if layout == BasisLayout::Shared
            && config.mask_tiles().is_entries()
            && !keeps_padded_rank()
        {
            let live = (0..rank)
                .rev()
                .find(|&k| component_used(&u, &bools, cols, k))
                .map_or(1, |k| k + 1);
            if live < rank {
                u = u.slice(s![.., ..live]).to_owned();
            }
            live
        } else {
            rank
        };
        // From here on V is held as its kept values only (compacted in its own buffer), its mask
        // as bits.
        let mut kept = KeptEntries::from_values(compact(v, &bools)?);
        bools.truncate(rank * cols);
        let mask = BitMask::from_bools(&bools);
        drop(bools);
        let kept_layout = KeptLayout::new(&mask, rank, matrices, shape.intermediate);
        if steps > 0 {
            kept.start_moments();
        }

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
                objective: match layout {
                    BasisLayout::Shared => objective,
                    BasisLayout::PerMatrix => objective.with_per_matrix_bases(),
                },
                grads: BasisGradients::zeros_like(&u, &biases),
                moments_u: Moments::zeros(u.raw_dim()),
                moments_b: biases
                    .iter()
                    .map(|b| b.as_ref().map(|b| Moments::zeros(b.raw_dim())))
                    .collect(),
                sampler: TokenSampler::new(calibration.tokens(), batch, config.seed()),
                ys: xs.clone(),
                xs,
            }
        });
        let run = TrainingLoop::new(steps, Schedule::Cosine(*config.optimizer()))
            .early_stopping(config.early_stop())?;
        let validator = validation.map(|set| Validator {
            set,
            spec,
            rank,
            assemble,
        });
        Ok(Self {
            problem: FactorProblem {
                config,
                source,
                u,
                kept,
                mask,
                layout: kept_layout,
                biases,
                schedule,
                training,
                validator,
            },
            run,
            assemble,
            spec,
            trained_rank: rank,
            rank: budget_rank,
            entries,
            spent_components,
            init_errors,
            start,
            init_time,
        })
    }

    /// Rank of each basis (the budget's).
    pub(crate) fn rank(&self) -> usize {
        self.rank
    }

    /// Components trained: the budget's rank less the unused tail left out (see `new`).
    pub(crate) fn trained_rank(&self) -> usize {
        self.trained_rank
    }

    /// The group's dense shape.
    pub(crate) fn shape(&self) -> GroupShape {
        self.spec.shape
    }

    /// The contraction order the step uses.
    pub(crate) fn contraction(&self) -> ContractionOrder {
        match &self.problem.training {
            Some(t) => t.objective.order(),
            None => self.problem.config.contraction(),
        }
    }

    /// Steps run so far.
    pub(crate) fn steps_run(&self) -> usize {
        self.run.steps_run()
    }

    /// Runs one training step; `Ok(None)` once every planned step has run.
    pub(crate) fn step(&mut self) -> Result<Option<Progress>> {
        self.run.step(&mut self.problem)
    }

    /// Prunes to the target sparsity (if the schedule has not yet), assembles the factors and
    /// evaluates them on the whole calibration set.
    pub(crate) fn finish(self) -> Result<Trained<F>> {
        let contraction = self.contraction();
        let Self {
            mut problem,
            run,
            assemble,
            spec,
            trained_rank: rank,
            rank: budget_rank,
            entries,
            spent_components: _,
            init_errors,
            start,
            init_time,
        } = self;
        if let Some(bad) = first_non_finite(&problem.u, problem.kept.values(), &problem.biases) {
            return Err(FipsError::NonFiniteLoss {
                step: run.steps_run(),
                loss: bad,
            });
        }
        // The training state (gradients, moments, batch buffers) is not needed any more: release
        // it before the factors are assembled (from the kept values, one matrix at a time), then
        // the factors themselves once assembled.
        problem.training = None;
        problem.kept.release_moments();
        problem
            .schedule
            .finish(&mut problem.kept, &mut problem.mask);
        let mask = &problem.mask;
        problem.layout.refresh(mask);
        let blocks = assemble(&Factors {
            spec: &spec,
            rank,
            u: &problem.u,
            v: FactorValues::Kept {
                values: problem.kept.values(),
                mask,
                layout: &problem.layout,
            },
            mask: &problem.mask,
            biases: &problem.biases,
        })?;
        let blocks = with_budget_rank(blocks, budget_rank)?;
        let nnz = problem.mask.count();
        problem.kept = KeptEntries::from_values(Vec::new());
        problem.mask = BitMask::from_bools(&[]);
        let final_errors = problem.source.errors(|b| blocks.to_dense_mlp(b))?;
        let validation = problem
            .validator
            .as_ref()
            .map(|v| {
                ValidationReport::measure(
                    &blocks,
                    v.set,
                    run.validation_curve().to_vec(),
                    run.stopped_at(),
                )
            })
            .transpose()?;
        let (steps_run, steps_planned, train_time) = (run.steps_run(), run.total(), run.time());
        Ok(Trained {
            blocks,
            spec,
            rank: budget_rank,
            nnz,
            entries,
            contraction,
            init_errors,
            final_errors,
            steps_run,
            steps_planned,
            loss_curve: run.into_losses(),
            calibration_tokens: problem.source.tokens(),
            data_free: problem.source.is_data_free(),
            init_time,
            train_time,
            wall_time: start.elapsed(),
            validation,
        })
    }
}

impl<F: Float> FactorProblem<'_, F> {
    /// The factors as they stand, pruned to the target sparsity if the schedule is not there yet
    /// (on a copy of the mask only: the assembled factors zero the values outside it; training
    /// goes on undisturbed), assembled by `assemble`.
    fn assemble_pruned(
        &self,
        spec: &GroupSpec,
        rank: usize,
        assemble: Assembler<F>,
    ) -> Result<CompressedBlocks<F>> {
        let values = self.kept.values();
        let mask = &self.mask;
        let pruned = self.schedule.pruned_mask(values, mask);
        assemble(&Factors {
            spec,
            rank,
            u: &self.u,
            v: FactorValues::Kept {
                values,
                mask,
                layout: &self.layout,
            },
            mask: &pruned,
            biases: &self.biases,
        })
    }
}

/// `V` as the objective sees it during a step: its kept entries, each matrix decoded when a
/// product reads it, and their AdamW update one matrix at a time as the objective hands its
/// gradient over (after the step's last read of that matrix), under the sparsifier's plan for the
/// step.
struct VUpdate<'s, F: Float> {
    step: AdamWStep<F>,
    split: RowSplit,
    plan: &'s mut StepPlan<F>,
    entries: &'s mut KeptEntries<F>,
    mask: &'s mut BitMask,
    layout: &'s KeptLayout,
}

impl<F: Float> FactorStore<F> for VUpdate<'_, F> {
    fn decode(&self, j: usize, out: ndarray::ArrayViewMut2<'_, F>) -> Result<()> {
        self.layout.decode(self.entries.values(), self.mask, j, out)
    }

    fn consume(&mut self, j: usize, grad: ndarray::ArrayView2<'_, F>) -> Result<()> {
        self.plan.update_matrix(
            &self.step,
            &self.split,
            j,
            grad,
            self.entries,
            self.mask,
            self.layout,
        )
    }
}

impl<F: Float> Trainable for FactorProblem<'_, F> {
    /// The loss, `∂U` and the biases' gradients, and, fused into the backward pass, the whole
    /// update of `V` (sparsifier and AdamW at the step's learning rate `lr`) on its kept entries:
    /// the numbers of the dense-gradient step on a dense `V`, bit for bit. After a non-finite loss
    /// (an error that ends the run) `V` may be partly updated.
    fn loss_and_gradients(&mut self, step: usize, lr: f64) -> Result<f64> {
        let state = self.training.as_mut().ok_or_else(internal_layout)?;
        let indices = state.sampler.next_batch();
        self.source.batch(indices, &mut state.xs, &mut state.ys)?;
        let adam = AdamWStep::<F>::new(self.config.optimizer(), lr, step);
        let mask = &mut self.mask;
        let mut plan = self.schedule.begin_step(step, &self.kept, mask);
        let loss = state.objective.loss_and_gradients(
            BasisParams {
                u: &self.u,
                biases: &self.biases,
            },
            &mut VUpdate {
                step: adam,
                split: state.objective.split(),
                plan: &mut plan,
                entries: &mut self.kept,
                mask: &mut *mask,
                layout: &self.layout,
            },
            &state.xs,
            &state.ys,
            &mut state.grads,
        )?;
        if !matches!(plan, StepPlan::Unchanged) {
            plan.finish(&adam, &mut self.kept, mask, &self.layout)?;
            self.layout.refresh(mask);
            self.schedule.recount(mask);
        }
        Ok(loss)
    }

    /// The update of `U` and the biases (`V`'s was fused into the backward pass).
    fn update(&mut self, step: usize, lr: f64) -> Result<()> {
        let state = self.training.as_mut().ok_or_else(internal_layout)?;
        let update = AdamWStep::<F>::new(self.config.optimizer(), lr, step);
        let split = state.objective.split();
        update.apply_split(
            &split,
            self.u.view_mut(),
            state.grads.u.view(),
            &mut state.moments_u,
            None,
        );
        for ((b, g), m) in self
            .biases
            .iter_mut()
            .zip(&state.grads.biases)
            .zip(&mut state.moments_b)
        {
            if let (Some(b), Some(g), Some(m)) = (b.as_mut(), g.as_ref(), m.as_mut()) {
                update.apply(b.view_mut(), g.view(), m);
            }
        }
        Ok(())
    }

    fn validation_error(&mut self) -> Result<Option<f64>> {
        let Some(v) = &self.validator else {
            return Ok(None);
        };
        let blocks = self.assemble_pruned(&v.spec, v.rank, v.assemble)?;
        v.set
            .relative_error_one_at_a_time(|b| blocks.to_dense_mlp(b))
            .map(Some)
    }

    fn observe(&self, progress: &mut Progress) {
        progress.sparsity = Some(self.schedule.sparsity());
    }
}

/// The tests' dense reference of `V`: its values dense (zero outside the mask, but for GMP's
/// entries pruned before a step's loss), its mask, and the moments of its kept entries.
#[cfg(test)]
#[derive(Debug)]
struct DenseV<F> {
    v: Array2<F>,
    mask: Array2<bool>,
    moments: KeptEntries<F>,
}

#[cfg(test)]
impl<F: Float> FactorProblem<'_, F> {
    /// `V` decoded whole (`r × fnI`), one matrix at a time from the kept values.
    fn decoded_v(&self) -> Result<Array2<F>> {
        let i = self.layout.width();
        let columns = self.layout.columns();
        let mask = &self.mask;
        let mut v = Array2::zeros((mask.len() / columns.max(1), columns));
        for j in 0..self.layout.columns() / i.max(1) {
            self.layout.decode(
                self.kept.values(),
                mask,
                j,
                v.slice_mut(s![.., j * i..(j + 1) * i]),
            )?;
        }
        Ok(v)
    }

    /// A dense copy of `V`'s state, for [`Self::reference_step`].
    fn dense_reference(&self) -> Result<DenseV<F>> {
        Ok(DenseV {
            v: self.decoded_v()?,
            mask: Array2::from_shape_vec(
                (
                    self.mask.len() / self.layout.columns().max(1),
                    self.layout.columns(),
                ),
                self.mask.to_bools(),
            )
            .map_err(|e| FipsError::Numerical(e.to_string()))?,
            moments: KeptEntries::zeros(self.kept.len()),
        })
    }

    /// Replaces `V`'s kept values and mask by those of `dense` (moments not carried).
    fn load_dense(&mut self, dense: &DenseV<F>) {
        let values = dense
            .v
            .iter()
            .zip(&dense.mask)
            .filter(|(_, m)| **m)
            .map(|(x, _)| *x)
            .collect();
        self.kept = KeptEntries::from_values(values);
        self.mask = BitMask::from_bools(dense.mask.as_slice().unwrap_or(&[]));
        self.layout.refresh(&self.mask);
    }

    /// The step as it was before `V`'s update was fused into the backward pass and `V` held as
    /// its kept entries: `V` dense (`dense`), the dense gradient of `V`, the sparsifier on it,
    /// then AdamW on `U`, `V` (whole) and the biases. The reference of
    /// `fused_update_of_v_equals_the_dense_gradient_step_bitwise` (this problem's own `V` is
    /// left as it is).
    fn reference_step(&mut self, step: usize, dense: &mut DenseV<F>) -> Result<f64> {
        use crate::math::objective::GroupParams;
        let state = self.training.as_mut().ok_or_else(internal_layout)?;
        let indices = state.sampler.next_batch();
        self.source.batch(indices, &mut state.xs, &mut state.ys)?;
        let params = GroupParams {
            u: self.u.clone(),
            v: dense.v.clone(),
            biases: self.biases.clone(),
        };
        let mut grads = params.zeros_like();
        let loss = state
            .objective
            .loss_and_dense_gradients(&params, &state.xs, &state.ys, &mut grads)?;
        let lr = self
            .config
            .optimizer()
            .learning_rate_at(step, self.config.steps());
        let grad_v = grads.v.as_slice().ok_or_else(internal_layout)?;
        self.schedule.step(
            step,
            contiguous(&mut dense.v)?,
            contiguous(&mut dense.mask)?,
            grad_v,
            Some(&mut dense.moments),
        );
        let update = AdamWStep::<F>::new(self.config.optimizer(), lr, step);
        let split = state.objective.split();
        update.apply_split(
            &split,
            self.u.view_mut(),
            grads.u.view(),
            &mut state.moments_u,
            None,
        );
        let mask = dense.mask.as_slice().ok_or_else(internal_layout)?;
        update.apply_kept(
            &split,
            contiguous(&mut dense.v)?,
            grad_v,
            &mut dense.moments,
            self.schedule.is_sparse().then_some(mask),
        );
        for ((b, g), m) in self
            .biases
            .iter_mut()
            .zip(&grads.biases)
            .zip(&mut state.moments_b)
        {
            if let (Some(b), Some(g), Some(m)) = (b.as_mut(), g.as_ref(), m.as_mut()) {
                update.apply(b.view_mut(), g.view(), m);
            }
        }
        Ok(loss)
    }
}

/// A FiPS run in progress: call [`FipsTrainer::step`] until it returns `None` (or stop earlier),
/// then [`FipsTrainer::finish`].
///
/// One step draws a mini-batch (the same token indices for every block), computes the loss and
/// its gradients, lets the sparsifier update the mask, and applies AdamW at the cosine-decayed
/// learning rate. All buffers are allocated when the trainer is created (with a streamed
/// calibration, each batch's rows are read and its targets computed by the dense blocks per step).
#[derive(Debug)]
pub struct FipsTrainer<'a, F: Float>(FactorTrainer<'a, F>);

/// The outcome of compressing one group with FiPS.
#[derive(Debug, Clone)]
pub struct FipsOutput<F> {
    /// The compressed blocks.
    pub group: SharedBasisGroup<F>,
    /// Measurements of the run (details: [`MethodReport::fips`]).
    pub report: MethodReport,
}

impl<'a, F: Float> FipsTrainer<'a, F> {
    pub(crate) fn new(
        config: FipsValidParams,
        blocks: &'a [DenseMlp<F>],
        calibration: &'a dyn CalibrationReader<F>,
        validation: Option<&'a ValidationSet<F>>,
    ) -> Result<Self> {
        FactorTrainer::new(
            config,
            BasisLayout::Shared,
            assemble_shared,
            blocks,
            calibration,
            validation,
        )
        .map(Self)
    }

    /// Rank r of the shared basis (the budget's; the finished group's).
    pub fn rank(&self) -> usize {
        self.0.rank()
    }

    /// Components being trained: [`Self::rank`] less the padded components that RigL's first
    /// pruning left with no kept entry (they can never receive gradient, so the steps leave them
    /// out; the finished group carries them as zero columns of `U` and empty rows of `V`).
    pub fn trained_rank(&self) -> usize {
        self.0.trained_rank()
    }

    /// The group's dense shape.
    pub fn shape(&self) -> GroupShape {
        self.0.shape()
    }

    /// The contraction order the step uses.
    pub fn contraction(&self) -> ContractionOrder {
        self.0.contraction()
    }

    /// Steps run so far.
    pub fn steps_run(&self) -> usize {
        self.0.steps_run()
    }

    /// Runs one training step; `Ok(None)` once every planned step has run.
    pub fn step(&mut self) -> Result<Option<Progress>> {
        self.0.step()
    }

    /// The group as it stands after the steps run so far, pruned to the target sparsity if the
    /// schedule is not there yet (a copy: training goes on undisturbed). For validation during
    /// training (see [`crate::math::validation`]).
    pub fn snapshot(&self) -> Result<SharedBasisGroup<F>> {
        let t = &self.0;
        match with_budget_rank(
            t.problem
                .assemble_pruned(&t.spec, t.trained_rank, assemble_shared)?,
            t.rank,
        )? {
            CompressedBlocks::SharedBasis(group) => Ok(group),
            _ => Err(FipsError::Numerical(
                "the shared-basis assembler returned another form".into(),
            )),
        }
    }

    /// Prunes to the target sparsity (if the schedule has not yet), evaluates the trained group on
    /// the whole calibration set and returns it with its report: at the budget's rank, or, where
    /// [`FipsParams::spend_unused_rank`](crate::FipsParams::spend_unused_rank) (the default) gave
    /// dead components' parameters to `V`, without its unused components.
    pub fn finish(self) -> Result<FipsOutput<F>> {
        let config = self.0.problem.config.clone();
        let spent = self.0.spent_components;
        let t = self.0.finish()?;
        let CompressedBlocks::SharedBasis(group) = t.blocks else {
            return Err(FipsError::Numerical(
                "the shared-basis assembler returned another form".into(),
            ));
        };
        let unused_rank = group.unused_rank();
        // Dead components' parameters went to `V`: the group is handed back without them, so
        // that its count is what it holds (within the budget).
        let group = if spent > 0 && unused_rank > 0 {
            group.without_unused_rank()?.0
        } else {
            group
        };
        let report = MethodReport {
            method: Method::Fips,
            kind: t.spec.kind,
            shape: t.spec.shape,
            parameters: group.parameter_count(),
            rel_error: t.final_errors.overall(),
            block_rel_error: t.final_errors.per_block(),
            steps: t.steps_run,
            loss_curve: t.loss_curve,
            calibration_tokens: t.calibration_tokens,
            data_free: t.data_free,
            wall_time: t.wall_time,
            validation: t.validation,
            details: MethodDetails::Fips(FipsDetails {
                rank: t.rank,
                unused_rank,
                target_sparsity: config.sparsity(),
                sparsity: 1.0 - t.nnz as f64 / t.entries as f64,
                nnz: t.nnz,
                sparsifier: config.sparsifier(),
                contraction: t.contraction,
                rel_error_init: t.init_errors.overall(),
                block_rel_error_init: t.init_errors.per_block(),
                steps_planned: t.steps_planned,
                init_time: t.init_time,
                train_time: t.train_time,
            }),
        };
        Ok(FipsOutput { group, report })
    }
}

/// `blocks` with a shared basis trained at a lower rank padded to the budget's `rank` (zero
/// columns of `U`, empty rows of every factor: the components left out of training, as they
/// would have stayed).
fn with_budget_rank<F: Float>(
    blocks: CompressedBlocks<F>,
    rank: usize,
) -> Result<CompressedBlocks<F>> {
    match blocks {
        CompressedBlocks::SharedBasis(g) if g.rank() < rank => {
            Ok(CompressedBlocks::SharedBasis(g.with_rank(rank)?))
        }
        other => Ok(other),
    }
}

/// Splits the factors into per-matrix [`SparseFactor`]s, one matrix decoded at a time, and builds
/// the shared-basis group.
fn assemble_shared<F: Float>(f: &Factors<'_, F>) -> Result<CompressedBlocks<F>> {
    let factors = (0..f.spec.shape.matrices())
        .map(|j| {
            let (v, mask) = f.factor(j)?;
            SparseFactor::new(v, mask)
        })
        .collect::<Result<Vec<_>>>()?;
    SharedBasisGroup::new(
        f.spec.kind,
        f.spec.activation,
        SharedBasis::new(f.u.clone())?,
        factors,
        f.biases.to_vec(),
    )
    .map(CompressedBlocks::SharedBasis)
}

/// Block `b` of the group `f` (bases arranged as `layout`) as a dense MLP: its factors alone
/// (`V`'s and the mask's columns of its `f` matrices, their biases, `U` or its bases) assembled as a
/// one-block group, so that only one block's factors are ever copied. Each matrix is rebuilt as
/// `U V_j` (or `U_j V_j`) from the same values as in the whole group's assembly: bit-identical.
fn rebuild_block<F: Float>(
    assemble: Assembler<F>,
    layout: BasisLayout,
    f: &Factors<'_, F>,
    b: usize,
) -> Result<DenseMlp<F>> {
    let shape = f.spec.shape;
    let (i, m, r) = (shape.intermediate, shape.matrices_per_block, f.rank);
    if b >= shape.blocks {
        return Err(FipsError::IndexOutOfRange {
            what: "block",
            index: b,
            len: shape.blocks,
        });
    }
    let spec = GroupSpec {
        shape: GroupShape { blocks: 1, ..shape },
        ..*f.spec
    };
    let biases = f
        .biases
        .get(b * m..(b + 1) * m)
        .ok_or_else(internal_layout)?;
    // The slices are dropped once assembled, before the block is rebuilt dense.
    let block = {
        let mut v = Array2::zeros((r, m * i));
        let mask = {
            let mut mask = Array2::from_elem((r, m * i), false);
            for k in 0..m {
                let (vk, mk) = f.factor(b * m + k)?;
                let cols = s![.., k * i..(k + 1) * i];
                v.slice_mut(cols).assign(&vk);
                mask.slice_mut(cols).assign(&mk);
            }
            BitMask::from_bools(mask.as_slice().ok_or_else(internal_layout)?)
        };
        let bases;
        let u = match layout {
            BasisLayout::Shared => f.u,
            BasisLayout::PerMatrix => {
                bases = f.u.slice(s![.., b * m * r..(b + 1) * m * r]).to_owned();
                &bases
            }
        };
        assemble(&Factors {
            spec: &spec,
            rank: r,
            u,
            v: FactorValues::Dense(&v),
            mask: &mask,
            biases,
        })?
    };
    block.to_dense_mlp(0)
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
fn first_non_finite<F: Float>(
    u: &Array2<F>,
    kept: &[F],
    biases: &[Option<Array1<F>>],
) -> Option<f64> {
    u.iter()
        .chain(kept)
        .chain(biases.iter().flatten().flat_map(|b| b.iter()))
        .find(|x| !x.is_finite_())
        .map(|x| x.as_f64())
}

/// The kept values of `v` (row-major order of `mask`), compacted within `v`'s own buffer (no second
/// `V`-sized buffer).
fn compact<F: Float>(v: Array2<F>, mask: &[bool]) -> Result<Vec<F>> {
    if v.len() != mask.len() {
        return Err(internal_layout());
    }
    let mut raw = if v.is_standard_layout() {
        match v.into_raw_vec_and_offset() {
            (raw, Some(0) | None) => raw,
            (_, Some(_)) => return Err(internal_layout()),
        }
    } else {
        v.iter().copied().collect()
    };
    let mut write = 0;
    for (read, &keep) in mask.iter().enumerate() {
        if keep {
            raw[write] = raw[read];
            write += 1;
        }
    }
    raw.truncate(write);
    raw.shrink_to_fit();
    Ok(raw)
}

/// The sparsity of `V` once the basis parameters of dead components are given to `V`, and how
/// many components' parameters were given.
///
/// With `r > min(d, f n I)` the initialisation pads `U` with zero columns; a padded component
/// whose row of `V` keeps no entry under the starting mask can never receive gradient
/// (`∂V_k = U_kᵀ ∂W = 0`, `∂U_k = ∂W V_kᵀ = 0`), so its `d` basis parameters would be counted in
/// the budget and never used. With `k` such components `V` keeps `nnz + k d` entries instead of
/// `nnz` (chosen by the same global magnitude rule), so the trained group holds the budget's
/// `r d + nnz` parameters. A larger keep may wake some padded rows; `k` is taken at the larger
/// keep (`k' ≤ k`), which keeps the total within the budget: `(r − k'') d + nnz + k' d ≤ r d + nnz`
/// for `k'' ≥ k'` dead at `nnz + k' d`. Only where the mask starts at the target (RigL, or no
/// training); GMP starts dense and keeps every component alive.
fn respent_sparsity<F: Float>(
    config: &FipsValidParams,
    u: &Array2<F>,
    v: &Array2<F>,
    entries: usize,
    steps: usize,
    width: usize,
) -> Result<(f64, usize)> {
    let target = config.sparsity();
    let probe = |sparsity: f64| MaskSchedule::new(config.sparsifier(), sparsity, entries, steps);
    let at_target = probe(target);
    if !at_target.is_sparse() || at_target.initial_sparsity() < target {
        return Ok((target, 0));
    }
    let values = v.as_slice().ok_or_else(internal_layout)?;
    let cols = v.ncols();
    let dead = |sparsity: f64| {
        let mask = probe(sparsity).target_mask(values);
        (0..v.nrows())
            .filter(|&k| !component_used(u, &mask, cols, k))
            .count()
    };
    let base = nonzeros_for_sparsity(entries, target);
    let sparsity_of = |dead: usize| {
        let keep = base.saturating_add(dead.saturating_mul(width)).min(entries);
        1.0 - keep as f64 / entries as f64
    };
    let first = dead(target);
    if first == 0 {
        return Ok((target, 0));
    }
    let given = dead(sparsity_of(first));
    Ok((sparsity_of(given), given))
}

/// Whether component `k` can take part in training: a nonzero column of `U`, or a kept entry in
/// its row of `V` (mask `mask`, row-major with `cols` columns). A component with neither never
/// receives gradient (`∂V_k = U_kᵀ ∂W = 0`, `∂U_k = ∂W V_kᵀ = 0`).
fn component_used<F: Float>(u: &Array2<F>, mask: &[bool], cols: usize, k: usize) -> bool {
    u.column(k).iter().any(|&x| x != F::zero())
        || mask
            .get(k * cols..(k + 1) * cols)
            .is_some_and(|r| r.contains(&true))
}

/// Whether training keeps an unused padded tail of components (only tests do, to compare).
fn keeps_padded_rank() -> bool {
    #[cfg(test)]
    {
        tests::KEEP_PADDED_RANK.with(std::cell::Cell::get)
    }
    #[cfg(not(test))]
    {
        false
    }
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

#[cfg(test)]
mod tests {
    thread_local! {
        /// Set by a test to train an unused padded tail as well ([`super::keeps_padded_rank`]).
        pub(super) static KEEP_PADDED_RANK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// With `r > d` RigL's first pruning empties every padded component; training leaves them
    /// out (fewer multiply-adds per step) and hands back the group at the budget's rank. The
    /// result equals training them: the same masks, the same loss curve and weights to
    /// rounding (only zero terms leave the sums), the padded components still zero and empty.
    #[test]
    fn an_empty_padded_tail_is_left_out_of_training_without_changing_the_result() {
        use crate::math::sparsity::{RiglSchedule, Sparsifier};
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let (d, i) = (12, 20);
        let group = blocks(&mut rng, 3, d, i);
        let calibration = Calibration::<f64>::gaussian(3, 300, d, 8).unwrap();
        let compressor = FipsParams::new()
            .sparsity(0.75)
            .sparsifier(Sparsifier::Rigl(RiglSchedule {
                interval: 10,
                ..RiglSchedule::default()
            }))
            .steps(60)
            .batch_tokens(48)
            .learning_rate(1e-2)
            .check()
            .unwrap();
        let run = |keep: bool| {
            KEEP_PADDED_RANK.with(|k| k.set(keep));
            let mut t = compressor.trainer(&group, &calibration).unwrap();
            let ranks = (t.rank(), t.trained_rank());
            while t.step().unwrap().is_some() {}
            KEEP_PADDED_RANK.with(|k| k.set(false));
            (ranks, t.finish().unwrap())
        };
        let ((rank, trained), left_out) = run(false);
        let ((rank_kept, trained_kept), kept) = run(true);
        assert!(rank > d, "the budget pads the basis: rank {rank}");
        assert_eq!((rank_kept, trained_kept), (rank, rank));
        assert_eq!(
            trained, d,
            "every padded component is empty after the first pruning"
        );
        let (a, b) = (&left_out.group, &kept.group);
        assert_eq!((a.rank(), a.nnz()), (b.rank(), b.nnz()));
        for (fa, fb) in a.factors().iter().zip(b.factors()) {
            assert_eq!(fa.mask(), fb.mask());
            assert!(
                fa.mask()
                    .rows()
                    .into_iter()
                    .skip(d)
                    .all(|r| !r.iter().any(|&m| m))
            );
        }
        assert!(
            a.basis()
                .view()
                .columns()
                .into_iter()
                .skip(d)
                .all(|c| c.iter().all(|&x| x == 0.0))
        );
        crate::repr::shared_basis::tests::assert_same_weights(a, b, 1e-9);
        let (la, lb) = (&left_out.report.loss_curve, &kept.report.loss_curve);
        assert_eq!(la.len(), 60);
        for (p, q) in la.iter().zip(lb) {
            assert!((p - q).abs() <= 1e-9 * q.abs(), "loss {p} vs {q}");
        }
        let details = left_out.report.fips().unwrap();
        assert_eq!((details.rank, details.unused_rank), (rank, rank - d));
        assert_eq!(details.sparsity, kept.report.fips().unwrap().sparsity);
    }

    /// With `r > d` the padded components RigL never wakes hold `(r − d) d` parameters of `U`
    /// the budget counts; by default `V` keeps that many more entries instead, so the written
    /// group (unused rank dropped) holds the budget's `r d + nnz` parameters and no more, while
    /// `spend_unused_rank(false)` keeps the reference's count (sparsity exactly the target).
    #[test]
    fn unused_basis_parameters_are_given_to_v_within_the_budget() {
        use crate::math::sparsity::{RiglSchedule, Sparsifier};
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let (d, i, blocks_n) = (12, 20, 3);
        let group = blocks(&mut rng, blocks_n, d, i);
        let calibration = Calibration::<f64>::gaussian(blocks_n, 300, d, 8).unwrap();
        let params = FipsParams::new()
            .sparsity(0.75)
            .sparsifier(Sparsifier::Rigl(RiglSchedule {
                interval: 10,
                ..RiglSchedule::default()
            }))
            .steps(30)
            .batch_tokens(48)
            .learning_rate(1e-2);
        let run = |spend: bool| {
            let compressor = params.clone().spend_unused_rank(spend).check().unwrap();
            let mut t = compressor.trainer(&group, &calibration).unwrap();
            let trained = t.trained_rank();
            while t.step().unwrap().is_some() {}
            let out = t.finish().unwrap();
            (trained, out)
        };
        let (trained_ref, reference) = run(false);
        let (trained, spent) = run(true);
        let rank = reference.group.rank();
        assert!(rank > d, "the budget pads the basis: rank {rank}");
        assert_eq!(trained_ref, d, "RigL empties every padded component");
        let entries = rank * 2 * blocks_n * i;
        let base = nonzeros_for_sparsity(entries, 0.75);
        assert_eq!(
            reference.group.nnz(),
            base,
            "the reference keeps the target's count"
        );
        assert_eq!(
            reference.report.fips().unwrap().sparsity,
            reference.group.sparsity()
        );
        let budget = rank * d + base;
        let written = |g: &SharedBasisGroup<f64>| {
            let (g, _) = g.clone().without_unused_rank().unwrap();
            g.parameter_count().basis + g.nnz()
        };
        assert_eq!(written(&reference.group), d * d + base);
        // V got `d` entries for each component dead at its larger keep; the group, its dead
        // components dropped, is within the budget and above the reference.
        let extra = spent.group.nnz() - base;
        assert!(
            extra > 0 && extra.is_multiple_of(d),
            "extra entries {extra}"
        );
        assert!(
            extra / d <= rank - trained,
            "{extra} entries for {} dead",
            rank - trained
        );
        assert!(written(&spent.group) <= budget);
        assert_eq!(
            written(&spent.group),
            budget - (rank - trained - extra / d) * d
        );
        let details = spent.report.fips().unwrap();
        assert_eq!(details.target_sparsity, 0.75);
        assert!(details.sparsity < 0.75);
        assert_eq!(details.nnz, spent.group.nnz());
    }

    use super::*;
    use crate::foundation::activation::Activation;
    use crate::foundation::mlp::Linear;
    use crate::math::validation::ValidationSet;
    use crate::methods::fips::params::FipsParams;
    use crate::methods::guard::ParamGuard;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn dense(group: &SharedBasisGroup<f64>) -> Vec<DenseMlp<f64>> {
        (0..group.blocks())
            .map(|b| group.to_dense_mlp(b).unwrap())
            .collect()
    }

    fn blocks(rng: &mut ChaCha8Rng, n: usize, d: usize, i: usize) -> Vec<DenseMlp<f64>> {
        let mut randn = |r: usize, c: usize| {
            Array2::from_shape_simple_fn((r, c), || {
                let z: f64 = StandardNormal.sample(rng);
                z / (c as f64).sqrt()
            })
        };
        (0..n)
            .map(|_| {
                DenseMlp::standard(
                    Linear::new(randn(i, d), None).unwrap(),
                    Linear::new(randn(d, i), None).unwrap(),
                    Activation::Gelu,
                )
                .unwrap()
            })
            .collect()
    }

    fn gated_blocks(rng: &mut ChaCha8Rng, n: usize, d: usize, i: usize) -> Vec<DenseMlp<f32>> {
        let mut randn = |r: usize, c: usize| {
            Array2::from_shape_simple_fn((r, c), || {
                let z: f32 = StandardNormal.sample(rng);
                z / (c as f32).sqrt()
            })
        };
        (0..n)
            .map(|_| {
                DenseMlp::gated(
                    Linear::new(randn(i, d), None).unwrap(),
                    Linear::new(randn(i, d), None).unwrap(),
                    Linear::new(randn(d, i), None).unwrap(),
                    Activation::Silu,
                )
                .unwrap()
            })
            .collect()
    }

    /// The update of `V` fused into the backward pass, one matrix at a time (no dense gradient of
    /// `V`), on `V` held as its kept entries (each matrix decoded when read), gives the dense
    /// step's loss, `U`, `V`, mask, biases and moments bit for bit at every step: RigL with
    /// several mask updates, GMP with pruning steps, dense, both sparsifiers again with 2×2 tiles
    /// (against the tiled dense reference), in both contraction orders. At every
    /// step the trainer holds exactly one value and two moments per kept entry.
    /// RigL and GMP schedules that change the mask several times within a few dozen steps.
    fn short_schedules() -> (
        crate::math::sparsity::Sparsifier,
        crate::math::sparsity::Sparsifier,
    ) {
        use crate::math::sparsity::{GmpSchedule, RiglSchedule, Sparsifier};
        let rigl = Sparsifier::Rigl(RiglSchedule {
            drop_fraction: 0.3,
            interval: 5,
            end_fraction: 0.75,
        });
        let gmp = Sparsifier::Gmp(GmpSchedule {
            interval: 4,
            ..GmpSchedule::default()
        });
        (rigl, gmp)
    }

    #[test]
    fn fused_update_of_v_equals_the_dense_gradient_step_bitwise() {
        use crate::math::objective::ContractionOrder as Order;
        use crate::math::sparsity::Sparsifier;
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let group = gated_blocks(&mut rng, 3, 12, 20);
        let calibration = Calibration::<f32>::gaussian(3, 200, 12, 4).unwrap();
        let (rigl, gmp) = short_schedules();
        use crate::math::tiles::MaskTiles::{Entries, Square2, Tall2, Wide2};
        for (sparsifier, s, tiles) in [
            (rigl, 0.75, Entries),
            (gmp, 0.75, Entries),
            (Sparsifier::None, 0.0, Entries),
            (rigl, 0.75, Square2),
            (gmp, 0.75, Square2),
            (rigl, 0.75, Wide2),
            (gmp, 0.75, Tall2),
        ] {
            for order in [Order::FactorsFirst, Order::WeightsFirst] {
                let compressor = FipsParams::new()
                    .sparsity(s)
                    .mask_tiles(tiles)
                    .sparsifier(sparsifier)
                    .steps(60)
                    .batch_tokens(32)
                    .learning_rate(1e-2)
                    .contraction(order)
                    .check()
                    .unwrap();
                let mut fused = compressor.trainer(&group, &calibration).unwrap();
                let mut reference = compressor.trainer(&group, &calibration).unwrap();
                let mut dense = reference.0.problem.dense_reference().unwrap();
                assert_eq!(fused.contraction(), order);
                let mut mask_changes = 0;
                let (r, i) = (fused.trained_rank(), 20);
                for step in 1..=60 {
                    let before = dense.mask.clone();
                    let expected = reference
                        .0
                        .problem
                        .reference_step(step, &mut dense)
                        .unwrap();
                    let loss = fused.step().unwrap().unwrap().loss;
                    let (a, b) = (&fused.0.problem, &reference.0.problem);
                    let what = format!("{sparsifier} {tiles} {order} step {step}");
                    assert_eq!(loss.to_bits(), expected.to_bits(), "{what}: loss");
                    let mask = a.mask.to_bools();
                    assert_eq!(&mask[..], dense.mask.as_slice().unwrap(), "{what}: mask");
                    let bits = |x: &Array2<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a.u), bits(&b.u), "{what}: U");
                    // Decoding one matrix at a time gives the dense reference's V.
                    let (va, vb) = (bits(&a.decoded_v().unwrap()), bits(&dense.v));
                    let first = va.iter().zip(&vb).position(|(x, y)| x != y);
                    assert_eq!(first, None, "{what}: V differs first at this entry");
                    assert_eq!(va.len(), vb.len(), "{what}: V");
                    let (m1, v1) = a.kept.scattered(&mask);
                    let (m2, v2) = dense.moments.scattered(&mask);
                    assert_eq!((m1, v1), (m2, v2), "{what}: moments of V");
                    // Bounded memory: one value and two moments per kept entry, nothing reserved
                    // beyond them, and no buffer of V's size in the step (factors first).
                    let kept = mask.iter().filter(|&&m| m).count();
                    assert_eq!(a.mask.count(), kept, "{what}: bits");
                    assert!(
                        a.mask.bytes() <= mask.len().div_ceil(64) * 8,
                        "{what}: bits"
                    );
                    assert_eq!(a.kept.values().len(), kept, "{what}: values");
                    assert_eq!(a.kept.len(), kept, "{what}: moments");
                    assert_eq!(a.kept.reserved(), kept, "{what}: reserved");
                    assert_eq!(a.layout.kept(), kept, "{what}: layout");
                    let buffer = a.training.as_ref().unwrap().objective.factor_buffer();
                    match order {
                        Order::FactorsFirst => assert_eq!(buffer, r * i, "{what}"),
                        _ => assert_eq!(buffer, r * i * 9, "{what}"),
                    }
                    if s > 0.0 {
                        assert!(kept < mask.len(), "{what}: sparse");
                    }
                    mask_changes += usize::from(before != dense.mask);
                }
                match sparsifier {
                    // Updates at 5, 10, …, 45 = t_e; the drop fraction is 0 at t_e.
                    Sparsifier::Rigl(_) => assert_eq!(mask_changes, 8, "RigL updates"),
                    Sparsifier::Gmp(_) => assert!(mask_changes >= 5, "GMP: {mask_changes}"),
                    Sparsifier::None => assert_eq!(mask_changes, 0),
                }
                // The biases are absent here; U's moments follow from U's equality.
                let (a, b) = (fused.finish().unwrap(), {
                    reference.0.run = TrainingLoop::new(0, Schedule::Constant(0.0));
                    reference.0.problem.load_dense(&dense);
                    reference.finish().unwrap()
                });
                assert_eq!(
                    a.report.rel_error.to_bits(),
                    b.report.rel_error.to_bits(),
                    "{sparsifier} {order}: final error"
                );
            }
        }
    }

    /// With 2×2, 1×2 or 2×1 tiles (odd rank and odd `I`: edge tiles too) every mask of `V`, after the
    /// initial pruning, after every RigL and GMP update, and after the final pruning of a run
    /// stopped early, keeps or drops each tile whole, holds `target − 3 ≤ nnz ≤ target` entries
    /// once at the target (never more), reports the actual sparsity, and the decoded `V` is zero
    /// outside it.
    #[test]
    fn tiled_masks_stay_tile_closed_at_every_update() {
        use crate::math::budget::{Budget, nonzeros_for_sparsity};
        use crate::math::sparsity::Sparsifier;
        use crate::math::tiles::MaskTiles;
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let (d, i) = (12, 21);
        let group = gated_blocks(&mut rng, 2, d, i);
        let calibration = Calibration::<f32>::gaussian(2, 200, d, 4).unwrap();
        let (rigl, gmp) = short_schedules();
        let kinds = [MaskTiles::Square2, MaskTiles::Wide2, MaskTiles::Tall2];
        let runs = [(rigl, 40), (gmp, 40), (gmp, 12)];
        for (kind, (sparsifier, stop)) in kinds.into_iter().flat_map(|k| runs.map(|r| (k, r))) {
            let compressor = FipsParams::new()
                .budget(Budget::Rank(7))
                .sparsity(0.7)
                .sparsifier(sparsifier)
                .steps(40)
                .batch_tokens(32)
                .learning_rate(1e-2)
                .mask_tiles(kind)
                .check()
                .unwrap();
            assert_eq!(compressor.mask_tiles(), kind);
            let mut t = compressor.trainer(&group, &calibration).unwrap();
            let rank = t.rank();
            let grid = TileGrid::of(kind, rank, 2 * 3, i).unwrap();
            let entries = rank * 2 * 3 * i;
            let target = nonzeros_for_sparsity(entries, 0.7);
            let check = |p: &FactorProblem<'_, f32>, what: &str, at_target: bool| {
                assert_eq!(p.mask.len(), entries, "{what}");
                assert!(grid.closed(&p.mask), "{what}: a tile is split");
                let nnz = p.mask.count();
                assert_eq!(p.kept.len(), nnz, "{what}");
                assert!(nnz < entries, "{what}: sparse");
                if at_target {
                    assert!(
                        nnz <= target && target - nnz < 4,
                        "{what}: {nnz} vs {target}"
                    );
                }
                let v = p.decoded_v().unwrap();
                let bools = p.mask.to_bools();
                for (x, &m) in v.iter().zip(&bools) {
                    assert!(m || *x == 0.0, "{what}: a value outside the mask");
                }
                let sparsity = 1.0 - nnz as f64 / entries as f64;
                assert_eq!(p.schedule.sparsity(), sparsity, "{what}: reported sparsity");
            };
            let is_rigl = matches!(sparsifier, Sparsifier::Rigl(_));
            check(
                &t.0.problem,
                &format!("{kind} {sparsifier} prepare"),
                is_rigl,
            );
            let (mut changes, mut joined) = (0, 0);
            for step in 1..=stop {
                let before = t.0.problem.mask.clone();
                t.step().unwrap();
                let what = format!("{kind} {sparsifier} step {step}");
                check(&t.0.problem, &what, is_rigl || step >= 30);
                changes += usize::from(before != t.0.problem.mask);
                // Entries that joined started at zero with zero moments: after one AdamW step
                // from there `m = (1 − β₁) g` and `v = (1 − β₂) g²`, so `v = 0.1 m²` (β defaults).
                let p = &t.0.problem;
                let (mask, before) = (p.mask.to_bools(), before.to_bools());
                let (m, v) = p.kept.scattered(&mask);
                for k in (0..entries).filter(|&k| mask[k] && !before[k]) {
                    let fresh = 0.1 * m[k] * m[k];
                    assert!(
                        (v[k] - fresh).abs() <= 1e-3 * fresh,
                        "{what}: entry {k} moments"
                    );
                    joined += 1;
                }
                assert!(is_rigl || joined == 0, "{what}: GMP only prunes");
            }
            assert!(!is_rigl || joined > 0, "RigL regrew nothing new");
            let least = if stop == 40 { 5 } else { 1 };
            assert!(changes >= least, "{sparsifier}: {changes} mask updates");
            // The final pruning (early stop: GMP short of the target).
            let p = &mut t.0.problem;
            assert_eq!(stop < 30, p.mask.count() > target, "{sparsifier} {stop}");
            p.schedule.finish(&mut p.kept, &mut p.mask);
            p.layout.refresh(&p.mask);
            check(p, &format!("{kind} {sparsifier} finish after {stop}"), true);
            let report = t.finish().unwrap().report;
            let details = report.fips().unwrap();
            assert!(details.nnz <= target && target - details.nnz < 4);
            assert_eq!(details.sparsity, 1.0 - details.nnz as f64 / entries as f64);
        }
    }

    /// Early stopping needs a validation set; with one, the report carries the final validation
    /// errors (equal to measuring the returned group), the curve, and the step it stopped at.
    #[test]
    fn early_stopping_stops_on_the_validation_error_and_reports_it() {
        use crate::math::validation::EarlyStopping;
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let group = blocks(&mut rng, 2, 8, 16);
        let calibration = Calibration::gaussian(2, 200, 8, 1).unwrap();
        let held = Calibration::gaussian(2, 100, 8, 2).unwrap();
        let set = ValidationSet::new(&group, &held).unwrap();
        let settings = EarlyStopping {
            patience: 20,
            tolerance: 0.05,
            interval: 10,
        };
        let compressor = FipsParams::new()
            .sparsity(0.5)
            .steps(400)
            .batch_tokens(64)
            .learning_rate(1e-2)
            .early_stop(Some(settings))
            .check()
            .unwrap();
        assert!(matches!(
            compressor.trainer(&group, &calibration),
            Err(FipsError::InvalidParameter {
                name: "early_stop",
                ..
            })
        ));
        let out = compressor
            .compress_with_validation(&group, &calibration, Some(&set), |_| {
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        let v = out.report.validation.clone().unwrap();
        let measured = set.errors(&dense(&out.group)).unwrap();
        assert!((v.rel_error - measured.0).abs() <= 1e-12);
        assert_eq!(v.block_rel_error, measured.1);
        assert_eq!(v.tokens, 100);
        let stop = v
            .stopped_at
            .expect("a 5 % tolerance over 20 steps stops before 400");
        assert!(stop < 400 && stop.is_multiple_of(10), "stopped at {stop}");
        assert_eq!(out.report.steps, stop);
        assert_eq!(v.curve.len(), stop / 10);
        assert_eq!(v.curve.last().map(|c| c.0), Some(stop));
        // The same run without early stopping runs every step and still reports validation.
        let full = compressor
            .clone()
            .into_params()
            .early_stop(None)
            .check()
            .unwrap()
            .compress_with_validation(&group, &calibration, Some(&set), |_| {
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(full.report.steps, 400);
        let fv = full.report.validation.unwrap();
        assert_eq!((fv.stopped_at, fv.curve.len()), (None, 0));
    }

    /// Measuring one rebuilt block at a time gives the all-at-once errors bit for bit, on the
    /// calibration set and on a validation set.
    #[test]
    fn errors_one_block_at_a_time_equal_all_blocks_at_once() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let group = blocks(&mut rng, 3, 6, 10);
        let other = blocks(&mut rng, 3, 6, 10);
        let calibration = Calibration::gaussian(3, 50, 6, 2).unwrap();
        let targets = targets(&group, &calibration).unwrap();
        let all = crate::repr::block_errors(&other, &calibration, &targets).unwrap();
        let one =
            block_errors_one_at_a_time(|b| Ok(other[b].clone()), &calibration, &targets).unwrap();
        assert!(all.overall() > 0.1, "the blocks differ: {}", all.overall());
        assert_eq!((&all.error2, &all.norm2), (&one.error2, &one.norm2));
        let set = ValidationSet::new(&group, &Calibration::gaussian(3, 30, 6, 3).unwrap()).unwrap();
        let v_all = set.relative_error(&other).unwrap();
        let v_one = set
            .relative_error_one_at_a_time(|b| Ok(other[b].clone()))
            .unwrap();
        assert!(v_all > 0.1);
        assert_eq!(v_all.to_bits(), v_one.to_bits());
    }

    /// A snapshot evaluated on the calibration set itself gives the error the report gives for
    /// the same state, before and after training.
    #[test]
    fn snapshot_error_on_the_calibration_set_equals_the_reported_error() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let group = blocks(&mut rng, 2, 8, 16);
        let calibration = Calibration::gaussian(2, 300, 8, 5).unwrap();
        let same = ValidationSet::new(&group, &calibration).unwrap();
        assert_eq!(same.tokens(), 300);
        for steps in [0, 30] {
            let compressor = FipsParams::new()
                .sparsity(0.5)
                .steps(steps)
                .batch_tokens(64)
                .learning_rate(1e-2)
                .check()
                .unwrap();
            let mut trainer = compressor.trainer(&group, &calibration).unwrap();
            while trainer.step().unwrap().is_some() {}
            let snapshot = same
                .relative_error(&dense(&trainer.snapshot().unwrap()))
                .unwrap();
            let report = trainer.finish().unwrap().report;
            assert!(
                (snapshot - report.rel_error).abs() <= 1e-12,
                "{steps} steps: snapshot {snapshot} vs report {}",
                report.rel_error
            );
        }
    }

    /// Explicit targets equal to the blocks' own outputs train the same bits as none; other
    /// targets are what the trainer fits (and reports its errors against), and the closed-form
    /// baselines refuse them.
    #[test]
    fn explicit_targets_are_what_the_group_is_trained_to_reproduce() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let group = blocks(&mut rng, 2, 8, 16);
        let other = blocks(&mut rng, 2, 8, 16);
        let calibration = Calibration::gaussian(2, 300, 8, 6).unwrap();
        let own = targets(&group, &calibration).unwrap();
        let shifted = targets(&other, &calibration).unwrap();
        let compressor = FipsParams::new()
            .sparsity(0.5)
            .steps(60)
            .batch_tokens(64)
            .learning_rate(1e-2)
            .check()
            .unwrap();
        let run = |calibration: &Calibration<f64>| {
            compressor
                .compress_with_validation(&group, calibration, None, |_| {
                    std::ops::ControlFlow::Continue(())
                })
                .unwrap()
        };
        let plain = run(&calibration);
        let same = run(&calibration.clone().with_targets(own.clone()).unwrap());
        assert_eq!(plain.group, same.group);
        assert_eq!(
            plain.report.rel_error.to_bits(),
            same.report.rel_error.to_bits()
        );
        let given = calibration.clone().with_targets(shifted.clone()).unwrap();
        let toward = run(&given);
        // The report measures the trained group against the given targets ...
        let trained = dense(&toward.group);
        let against_given = crate::repr::block_errors(&trained, &calibration, &shifted).unwrap();
        assert!((toward.report.rel_error - against_given.overall()).abs() <= 1e-12);
        // ... which it fits better than the group trained on the blocks' own outputs does.
        let plain_vs_given =
            crate::repr::block_errors(&dense(&plain.group), &calibration, &shifted).unwrap();
        assert!(
            against_given.overall() < 0.8 * plain_vs_given.overall(),
            "{} vs {}",
            against_given.overall(),
            plain_vs_given.overall()
        );
        use crate::methods::params::{BasisSharingParams, SvdLlmParams};
        use crate::methods::{Compressor, ParamGuard};
        let baselines: [Box<dyn Compressor<f64>>; 2] = [
            Box::new(SvdLlmParams::new().check().unwrap()),
            Box::new(BasisSharingParams::new().check().unwrap()),
        ];
        for baseline in baselines {
            assert!(matches!(
                baseline.compress(&group, &given, &mut |_| std::ops::ControlFlow::Continue(())),
                Err(FipsError::InvalidParameter {
                    name: "targets",
                    ..
                })
            ));
        }
    }
}
