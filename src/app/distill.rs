//! End-to-end distillation of a ViT's compressed MLP groups: after every group has been fitted
//! block by block, the shared bases `U`, the kept entries of every sparse factor `V_j` and the
//! biases of all groups are trained together so that the compressed model's class probabilities
//! match the dense model's on the calibration images.
//!
//! Loss over a batch of `B` images with teacher logits `t` and student logits `z`, temperature `τ`:
//! `L = τ² / B · Σ_b KL(softmax(t_b / τ) ‖ softmax(z_b / τ))`, so `∂L/∂z = τ (p_z − p_t) / B`.
//! The gradient reaches each dense weight `W_j` of a compressed block by reverse mode through the
//! whole model ([`VisionTransformer::mlp_gradients`]), then its factors by `W_j = U V_j`:
//! `∂U = Σ_j ∂W_j V_jᵀ`, `∂V_j = (Uᵀ ∂W_j) ⊙ M_j` (up projections' `∂W` transposed to `[d, I]`).
//! The masks `M_j` stay as the block-wise fit left them, so the parameter count does not change.
//! AdamW without weight decay, the learning rate decaying along a cosine.

use ndarray::{Array1, Array2, ArrayView2, ArrayView4, Axis, Zip, linalg::general_mat_mul};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::app::augment::random_view;
use crate::app::vit::{GradientTape, MAX_TAPE_VALUES, MlpGradient, VisionTransformer, preprocess};
use crate::format::compressed::CompressedModel;
use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result, invalid};
use crate::foundation::kernels::RowSplit;
use crate::foundation::mlp::MlpKind;
use crate::foundation::slicing::s;
use crate::foundation::thread_plan;
use crate::math::optim::{AdamW, AdamWStep, Moments};
use crate::methods::guard::ParamGuard;
use crate::repr::CompressedBlocks;
use crate::repr::factors::{SharedBasis, SparseFactor};
use crate::repr::shared_basis::SharedBasisGroup;

/// Most images in one distillation step (each keeps about 22 MB of activations in DeiT-tiny).
pub const MAX_IMAGES_PER_STEP: usize = 256;

/// Settings of end-to-end distillation. The defaults are the best of those tried on held-out
/// DeiT-tiny calibration images (`docs/results.md`, "Where the agreement is lost" and "End-to-end
/// distillation in `fips compress`"): 30 steps (60 gain no more) of 16
/// fresh views (crops of at least 35 % of the area), learning rate 3e-5.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistillParams {
    /// Optimiser steps (0: no distillation).
    pub steps: usize,
    /// Images per step, `1..=`[`MAX_IMAGES_PER_STEP`].
    pub images_per_step: usize,
    /// Peak learning rate η.
    pub learning_rate: f64,
    /// Floor of the cosine decay (`≤ η`).
    pub min_learning_rate: f64,
    /// Softmax temperature τ of teacher and student.
    pub temperature: f64,
    /// Seed of the order in which images are drawn (and of their views).
    pub seed: u64,
    /// With `Some(a)`, every image of a step is a random-resized crop of at least `a` of the image
    /// area, flipped with probability 1/2 ([`crate::app::augment::random_view`]), and the
    /// teacher's logits are those of the view; `None` shows the images as they are.
    pub view_min_area: Option<f64>,
}

impl Default for DistillParams {
    fn default() -> Self {
        Self {
            steps: 30,
            images_per_step: 16,
            learning_rate: 3e-5,
            min_learning_rate: 1e-6,
            temperature: 1.0,
            seed: 0,
            view_min_area: Some(0.35),
        }
    }
}

/// [`DistillParams`] with every setting in range (from [`ParamGuard::check`]); what
/// [`Distiller::new`] takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistillValidParams(DistillParams);

impl DistillValidParams {
    /// The settings.
    pub fn params(&self) -> &DistillParams {
        &self.0
    }
}

impl ParamGuard for DistillParams {
    type Checked = DistillValidParams;

    /// Checks every setting (typed errors naming it).
    fn check(&self) -> Result<DistillValidParams> {
        if !(1..=MAX_IMAGES_PER_STEP).contains(&self.images_per_step) {
            return Err(invalid(
                "images_per_step",
                format!(
                    "must be in 1..={MAX_IMAGES_PER_STEP}, got {}",
                    self.images_per_step
                ),
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(invalid(
                "learning_rate",
                format!("must be positive and finite, got {}", self.learning_rate),
            ));
        }
        if !(self.min_learning_rate.is_finite()
            && (0.0..=self.learning_rate).contains(&self.min_learning_rate))
        {
            return Err(invalid(
                "min_learning_rate",
                format!(
                    "must be in 0..={}, got {}",
                    self.learning_rate, self.min_learning_rate
                ),
            ));
        }
        if !(self.temperature.is_finite() && (0.01..=100.0).contains(&self.temperature)) {
            return Err(invalid(
                "temperature",
                format!("must be in 0.01..=100, got {}", self.temperature),
            ));
        }
        if let Some(a) = self.view_min_area
            && !(a > 0.0 && a <= 1.0)
        {
            return Err(invalid(
                "view_min_area",
                format!("must be in (0, 1], got {a}"),
            ));
        }
        Ok(DistillValidParams(*self))
    }
}

impl DistillParams {
    fn optimiser(&self) -> AdamW {
        AdamW {
            learning_rate: self.learning_rate,
            min_learning_rate: self.min_learning_rate,
            weight_decay: 0.0,
            ..AdamW::default()
        }
    }
}

/// A compressed group in its model: the blocks it replaces (consecutive positions of the
/// group's blocks) and its shared-basis form.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacedGroup {
    /// The model's block of each of the group's blocks, in order.
    pub blocks: Vec<usize>,
    /// The group.
    pub group: SharedBasisGroup<f32>,
}

/// One matrix's trained state: the factor's values (zero outside the mask), its mask, moments.
struct FactorState {
    values: Array2<f32>,
    mask: Array2<bool>,
    moments: Moments<f32, ndarray::Ix2>,
    bias: Option<(Array1<f32>, Moments<f32, ndarray::Ix1>)>,
}

/// One group's trained state.
struct GroupState {
    blocks: Vec<usize>,
    kind: MlpKind,
    activation: Activation,
    u: Array2<f32>,
    u_moments: Moments<f32, ndarray::Ix2>,
    factors: Vec<FactorState>,
}

impl GroupState {
    fn new(placed: PlacedGroup) -> Self {
        let PlacedGroup { blocks, group } = placed;
        let kind = group.kind();
        let activation = group.activation();
        let factors = group
            .factors()
            .iter()
            .zip(group.biases())
            .map(|(f, b)| {
                let (values, mask) = f.clone().into_parts();
                FactorState {
                    moments: Moments::zeros(values.raw_dim()),
                    values,
                    mask,
                    bias: b.clone().map(|b| {
                        let m = Moments::zeros(b.raw_dim());
                        (b, m)
                    }),
                }
            })
            .collect();
        let u = group.basis().view().to_owned();
        Self {
            blocks,
            kind,
            activation,
            u_moments: Moments::zeros(u.raw_dim()),
            u,
            factors,
        }
    }

    fn group(&self) -> Result<SharedBasisGroup<f32>> {
        SharedBasisGroup::new(
            self.kind,
            self.activation,
            SharedBasis::new(self.u.clone())?,
            self.factors
                .iter()
                .map(|f| SparseFactor::new(f.values.clone(), f.mask.clone()))
                .collect::<Result<_>>()?,
            self.factors
                .iter()
                .map(|f| f.bias.as_ref().map(|(b, _)| b.clone()))
                .collect(),
        )
    }

    /// `∂L/∂U`, `∂L/∂V_j` (zero outside `M_j`) and the biases' gradients from the model's MLP
    /// gradients (block order).
    fn gradients(&self, model: &[MlpGradient]) -> Result<GroupGradients> {
        let mut basis = Array2::<f32>::zeros(self.u.raw_dim());
        let mut factors = Vec::with_capacity(self.factors.len());
        let mut biases = Vec::with_capacity(self.factors.len());
        for (k, &block) in self.blocks.iter().enumerate() {
            let g = model.get(block).ok_or(FipsError::IndexOutOfRange {
                what: "block of a distilled group",
                index: block,
                len: model.len(),
            })?;
            // ∂W_j oriented `[d, I]`: fc1's gradient (`[I, d]`) transposed.
            for (m, (dw, db)) in [
                (g.fc1_weight.t(), &g.fc1_bias),
                (g.fc2_weight.view(), &g.fc2_bias),
            ]
            .into_iter()
            .enumerate()
            {
                let factor = &self.factors[k * self.kind.matrices_per_block() + m];
                general_mat_mul(1.0, &dw, &factor.values.t(), 1.0, &mut basis);
                let mut dv = self.u.t().dot(&dw);
                Zip::from(&mut dv)
                    .and(&factor.mask)
                    .for_each(|g, &keep| *g = if keep { *g } else { 0.0 });
                factors.push(dv);
                biases.push(db.clone());
            }
        }
        Ok(GroupGradients {
            basis,
            factors,
            biases,
        })
    }

    /// One AdamW step of every parameter.
    fn apply(&mut self, gradients: &GroupGradients, step: &AdamWStep<f32>) {
        let split = RowSplit::available();
        for ((factor, dv), db) in self
            .factors
            .iter_mut()
            .zip(&gradients.factors)
            .zip(&gradients.biases)
        {
            step.apply_split(
                &split,
                factor.values.view_mut(),
                dv.view(),
                &mut factor.moments,
                Some(factor.mask.view()),
            );
            if let Some((b, moments)) = &mut factor.bias {
                step.apply_split(&split, b.view_mut(), db.view(), moments, None);
            }
        }
        step.apply_split(
            &split,
            self.u.view_mut(),
            gradients.basis.view(),
            &mut self.u_moments,
            None,
        );
    }
}

/// A group's gradients: `∂L/∂U`, and per matrix `∂L/∂V_j` (masked) and its bias's.
struct GroupGradients {
    basis: Array2<f32>,
    factors: Vec<Array2<f32>>,
    biases: Vec<Array1<f32>>,
}

/// End-to-end distillation of compressed groups in a ViT, one step at a time (the caller can
/// score [`Distiller::student`] between steps).
pub struct Distiller<'a> {
    params: DistillParams,
    teacher: &'a VisionTransformer,
    pixels: ArrayView4<'a, u8>,
    /// The teacher's logits of `pixels`, when the images are shown as they are (with views,
    /// each step computes the logits of its views).
    teacher_logits: Option<Array2<f32>>,
    student: VisionTransformer,
    groups: Vec<GroupState>,
    order: Vec<usize>,
    next: usize,
    rng: ChaCha8Rng,
    step: usize,
    /// One gradient tape per worker, kept between steps (allocated once).
    tapes: Vec<GradientTape>,
}

impl<'a> Distiller<'a> {
    /// Starts distilling `groups` (placed in `teacher`'s blocks; two-matrix MLPs) on the images
    /// `pixels` (`[N, H, W, 3]`, `u8`): computes the teacher's logits once.
    pub fn new(
        teacher: &'a VisionTransformer,
        groups: Vec<PlacedGroup>,
        pixels: ArrayView4<'a, u8>,
        params: DistillValidParams,
    ) -> Result<Self> {
        check_teacher(teacher, &params)?;
        let DistillValidParams(params) = params;
        let n = pixels.len_of(Axis(0));
        if n == 0 {
            return Err(invalid("images", "distillation needs at least one image"));
        }
        let depth = teacher.config().depth;
        let mut student = teacher.clone();
        let mut seen = vec![false; depth];
        for placed in &groups {
            if placed.group.kind() != MlpKind::Standard {
                return Err(invalid(
                    "groups",
                    "distillation of a ViT needs two-matrix (fc1, fc2) MLPs".to_string(),
                ));
            }
            if placed.blocks.len() != placed.group.blocks() {
                return Err(FipsError::ShapeMismatch {
                    what: "blocks of a distilled group".into(),
                    expected: vec![placed.group.blocks()],
                    got: vec![placed.blocks.len()],
                });
            }
            for (k, &b) in placed.blocks.iter().enumerate() {
                match seen.get_mut(b) {
                    Some(s) if !*s => *s = true,
                    Some(_) => {
                        return Err(invalid(
                            "groups",
                            format!("block {b} is in more than one group"),
                        ));
                    }
                    None => {
                        return Err(FipsError::IndexOutOfRange {
                            what: "block of a distilled group",
                            index: b,
                            len: depth,
                        });
                    }
                }
                student.set_mlp(b, placed.group.to_dense_mlp(k)?)?;
            }
        }
        let teacher_logits = match params.view_min_area {
            Some(_) => None,
            None => Some(logits_of(teacher, pixels)?),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        Ok(Self {
            params,
            teacher,
            pixels,
            teacher_logits,
            student,
            groups: groups.into_iter().map(GroupState::new).collect(),
            order,
            next: 0,
            rng,
            step: 0,
            tapes: Vec::new(),
        })
    }

    /// The model with the groups as trained so far.
    pub fn student(&self) -> &VisionTransformer {
        &self.student
    }

    /// Steps taken.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// One step; the batch's loss `L` before it, or `None` once all steps are done.
    pub fn step(&mut self) -> Result<Option<f64>> {
        if self.step >= self.params.steps {
            return Ok(None);
        }
        let batch = self.next_batch();
        let mut pixels = self.pixels.select(Axis(0), &batch);
        if let Some(min_area) = self.params.view_min_area {
            for mut image in pixels.outer_iter_mut() {
                let view = random_view(image.view(), min_area, &mut self.rng)?;
                image.assign(&view);
            }
        }
        // The batch in one part per worker (one per core when BLAS runs on one thread), each
        // part's loss and gradients weighted by its share of the batch and summed in order.
        let total = batch.len();
        let workers = thread_plan::pass_workers().clamp(1, total);
        let chunk = total.div_ceil(workers);
        self.tapes.resize_with(workers, GradientTape::default);
        let parts: Vec<_> = (0..total)
            .step_by(chunk)
            .map(|start| start..(start + chunk).min(total))
            .zip(self.tapes.iter_mut())
            .collect();
        let (student, teacher, stored) = (&self.student, self.teacher, &self.teacher_logits);
        let tau = self.params.temperature;
        let mut loss = 0.0;
        let mut gradients: Vec<MlpGradient> = Vec::new();
        thread_plan::map_in_rounds(
            parts,
            workers,
            |(range, tape)| {
                let images = preprocess(pixels.slice(s![range.clone(), .., .., ..]));
                let t = match stored {
                    Some(logits) => logits.select(Axis(0), &batch[range.clone()]),
                    None => teacher.forward(images.view())?,
                };
                let share = range.len() as f64 / total as f64;
                let mut part_loss = 0.0;
                let (_, g) = student.mlp_gradients_with(tape, images.view(), |z| {
                    let (l, g) = distillation_loss(t.view(), z, tau);
                    part_loss = l * share;
                    Ok(g * share as f32)
                })?;
                Ok((part_loss, g))
            },
            |(part_loss, g)| {
                loss += part_loss;
                if gradients.is_empty() {
                    gradients = g;
                } else {
                    for (sum, part) in gradients.iter_mut().zip(&g) {
                        sum.add(part);
                    }
                }
                Ok(())
            },
        )?;
        self.step += 1;
        let cfg = self.params.optimiser();
        let lr = cfg.learning_rate_at(self.step, self.params.steps);
        let step = AdamWStep::new(&cfg, lr, self.step);
        for group in &mut self.groups {
            let g = group.gradients(&gradients)?;
            group.apply(&g, &step);
            let rebuilt = group.group()?;
            for (k, &b) in group.blocks.iter().enumerate() {
                self.student.set_mlp(b, rebuilt.to_dense_mlp(k)?)?;
            }
        }
        Ok(Some(loss))
    }

    /// The distilled groups, in the order given.
    pub fn finish(self) -> Result<Vec<PlacedGroup>> {
        self.groups
            .iter()
            .map(|g| {
                Ok(PlacedGroup {
                    blocks: g.blocks.clone(),
                    group: g.group()?,
                })
            })
            .collect()
    }

    /// The next `images_per_step` images of a seeded order, reshuffled after each pass.
    fn next_batch(&mut self) -> Vec<usize> {
        let want = self.params.images_per_step.min(self.order.len());
        let mut batch = Vec::with_capacity(want);
        while batch.len() < want {
            if self.next == self.order.len() {
                self.order.shuffle(&mut self.rng);
                self.next = 0;
            }
            batch.push(self.order[self.next]);
            self.next += 1;
        }
        batch
    }
}

/// Checks, before any work, that `teacher` can be distilled from with `params`: every MLP of it
/// dense (the student's gradients need them) and a step's activations within
/// [`MAX_TAPE_VALUES`].
pub fn check_teacher(teacher: &VisionTransformer, params: &DistillValidParams) -> Result<()> {
    for b in 0..teacher.config().depth {
        teacher.mlp(b)?;
    }
    let per_step = params.params().images_per_step;
    if teacher
        .tape_values(per_step)
        .is_none_or(|v| v > MAX_TAPE_VALUES)
    {
        return Err(invalid(
            "images_per_step",
            format!(
                "{per_step} images of this model keep more than {MAX_TAPE_VALUES} activation \
                 values for the backward pass (MAX_TAPE_VALUES); take fewer images per step"
            ),
        ));
    }
    Ok(())
}

/// What distilling a whole compressed model did ([`distill_model`]): its settings, how many
/// images it drew from, the loss `L` of its first and last batch, and the check on held-out
/// images (no timings, so reruns write the same bytes). Recorded in the compressed file's
/// manifest (`distillation`) and the run's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillRecord {
    /// The settings.
    #[serde(flatten)]
    pub params: DistillParams,
    /// Images drawn from.
    pub images: usize,
    /// `L` of the first batch, before any step (`null` with no steps).
    pub first_loss: Option<f64>,
    /// `L` of the last batch, before the last step (`null` with no steps).
    pub last_loss: Option<f64>,
    /// The check on images never distilled on (`null`: none were given).
    pub held_out: Option<HeldOutCheck>,
    /// Whether the distilled groups were kept: false when they raised the held-out KL, and the
    /// block-wise fits were kept instead.
    pub kept: bool,
}

impl DistillRecord {
    /// One line for a run's log: steps, first and last batch loss, the held-out check.
    pub fn summary(&self) -> String {
        let loss = |l: Option<f64>| l.map_or_else(|| "-".into(), |l| format!("{l:.4}"));
        let check = self.held_out.map_or_else(String::new, |c| {
            format!(
                ", held-out KL {:.4} -> {:.4} on {} images: {}",
                c.kl_before,
                c.kl_after,
                c.images,
                if self.kept { "kept" } else { "not kept" }
            )
        });
        format!(
            "distilled end to end: {} steps, batch loss {} -> {}{check} (the group errors are the \
             block-wise fits')",
            self.params.steps,
            loss(self.first_loss),
            loss(self.last_loss)
        )
    }
}

/// Mean KL(dense ‖ compressed) of the class probabilities on held-out images, before and after
/// the distillation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldOutCheck {
    /// Held-out images.
    pub images: usize,
    /// KL with the block-wise fits.
    pub kl_before: f64,
    /// KL with the distilled groups.
    pub kl_after: f64,
}

/// Distils every group of `model` end to end in `teacher` (each placed at its manifest's
/// blocks) on the images `pixels`, calling `on_step(done, steps, L)` after each step, and checks
/// the result on the images `held_out` (never distilled on; may be empty): when the distilled
/// groups raise KL(dense ‖ compressed) there, the block-wise fits are kept. Returns the model
/// (masks, ranks and parameter counts unchanged; the manifest records the distillation under
/// `distillation`) and the record. Every group must be a shared basis of two-matrix MLPs.
pub fn distill_model(
    teacher: &VisionTransformer,
    model: &CompressedModel,
    pixels: ArrayView4<'_, u8>,
    held_out: ArrayView4<'_, u8>,
    params: DistillValidParams,
    on_step: &mut dyn FnMut(usize, usize, f64),
) -> Result<(CompressedModel, DistillRecord)> {
    if model.manifest.groups.len() != model.groups.len() {
        return Err(FipsError::ShapeMismatch {
            what: "groups of the manifest and of the model".into(),
            expected: vec![model.manifest.groups.len()],
            got: vec![model.groups.len()],
        });
    }
    let placed = model
        .manifest
        .groups
        .iter()
        .zip(&model.groups)
        .enumerate()
        .map(|(g, (manifest, blocks))| match blocks {
            CompressedBlocks::SharedBasis(group) => Ok(PlacedGroup {
                blocks: manifest.blocks.clone(),
                group: group.clone(),
            }),
            _ => Err(invalid(
                "method",
                format!(
                    "end-to-end distillation trains shared-basis (fips) groups; group {g} is \
                     {}",
                    manifest.representation
                ),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let steps = params.params().steps;
    let mut distiller = Distiller::new(teacher, placed, pixels, params)?;
    let checked = held_out.len_of(Axis(0)) > 0;
    let teacher_held = if checked {
        Some(logits_of(teacher, held_out)?)
    } else {
        None
    };
    let held_out_kl = |student: &VisionTransformer| -> Result<f64> {
        Ok(match &teacher_held {
            Some(t) => distillation_loss(t.view(), logits_of(student, held_out)?.view(), 1.0).0,
            None => 0.0,
        })
    };
    let kl_before = held_out_kl(distiller.student())?;
    let (mut first_loss, mut last_loss) = (None, None);
    while let Some(loss) = distiller.step()? {
        first_loss.get_or_insert(loss);
        last_loss = Some(loss);
        on_step(distiller.steps_done(), steps, loss);
    }
    let kl_after = held_out_kl(distiller.student())?;
    let kept = kl_after <= kl_before;
    let record = DistillRecord {
        params: *params.params(),
        images: pixels.len_of(Axis(0)),
        first_loss,
        last_loss,
        held_out: checked.then_some(HeldOutCheck {
            images: held_out.len_of(Axis(0)),
            kl_before,
            kl_after,
        }),
        kept,
    };
    let groups = if kept {
        distiller
            .finish()?
            .into_iter()
            .map(|p| CompressedBlocks::SharedBasis(p.group))
            .collect()
    } else {
        model.groups.clone()
    };
    let mut distilled = CompressedModel {
        manifest: model.manifest.clone(),
        groups,
    };
    distilled.manifest.distillation =
        Some(serde_json::to_value(&record).map_err(|e| {
            FipsError::Numerical(format!("cannot serialise the distillation: {e}"))
        })?);
    Ok((distilled, record))
}

/// `vit`'s logits of `pixels`, 32 images at a time (bounding the preprocessed copy).
fn logits_of(vit: &VisionTransformer, pixels: ArrayView4<'_, u8>) -> Result<Array2<f32>> {
    let mut logits = Array2::zeros((pixels.len_of(Axis(0)), vit.config().num_classes));
    for (chunk, mut out) in pixels
        .axis_chunks_iter(Axis(0), 32)
        .zip(logits.axis_chunks_iter_mut(Axis(0), 32))
    {
        out.assign(&vit.forward(preprocess(chunk).view())?);
    }
    Ok(logits)
}

/// `(L, ∂L/∂z)` of `L = τ² / B · Σ_b KL(softmax(t_b / τ) ‖ softmax(z_b / τ))`.
pub fn distillation_loss(
    teacher: ArrayView2<'_, f32>,
    student: ArrayView2<'_, f32>,
    temperature: f64,
) -> (f64, Array2<f32>) {
    let b = teacher.nrows().max(1) as f64;
    let mut gradient = Array2::zeros(student.raw_dim());
    let mut loss = 0.0;
    for ((t, z), mut g) in teacher
        .rows()
        .into_iter()
        .zip(student.rows())
        .zip(gradient.rows_mut())
    {
        let log_pt = log_softmax(t.iter().map(|&v| v as f64 / temperature));
        let log_pz = log_softmax(z.iter().map(|&v| v as f64 / temperature));
        for ((g, &lt), &lz) in g.iter_mut().zip(&log_pt).zip(&log_pz) {
            loss += lt.exp() * (lt - lz);
            *g = (temperature * (lz.exp() - lt.exp()) / b) as f32;
        }
    }
    (loss * temperature * temperature / b, gradient)
}

/// `log softmax` of a row, in `f64`.
fn log_softmax(row: impl Iterator<Item = f64> + Clone) -> Vec<f64> {
    let max = row.clone().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + row.clone().map(|v| (v - max).exp()).sum::<f64>().ln();
    row.map(|v| v - lse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::pipeline::{Silent, classify};
    use crate::app::vit::VitConfig;
    use crate::app::vit::test_support::{HIDDEN, WIDTH, random_vit, tiny_vit};
    use ndarray::{Array4, array};
    use rand::Rng;

    /// A random shared-basis group of rank 6 for both blocks of [`tiny_vit`], factors half dense.
    fn random_group(seed: u64, kind: MlpKind) -> SharedBasisGroup<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let rank = 6;
        let mut r = |scale: f32| scale * (rng.random::<f32>() - 0.5);
        let u = Array2::from_shape_fn((WIDTH, rank), |_| r(1.0));
        let per_block = kind.matrices_per_block();
        let factors = (0..2 * per_block)
            .map(|_| {
                let mask = Array2::from_shape_fn((rank, HIDDEN), |(i, j)| (i * 7 + j * 3) % 2 == 0);
                let values = Array2::from_shape_fn((rank, HIDDEN), |_| r(1.0));
                SparseFactor::new(values, mask).unwrap()
            })
            .collect();
        let biases = (0..2 * per_block)
            .map(|j| {
                let len = if j % per_block == per_block - 1 {
                    WIDTH
                } else {
                    HIDDEN
                };
                Some(Array1::from_shape_fn(len, |_| r(0.2)))
            })
            .collect();
        SharedBasisGroup::new(
            kind,
            Activation::Gelu,
            SharedBasis::new(u).unwrap(),
            factors,
            biases,
        )
        .unwrap()
    }

    fn pixels(seed: u64, n: usize) -> Array4<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array4::from_shape_fn((n, 8, 8, 3), |_| rng.random::<u8>())
    }

    /// `L` of the whole image set, the student against the teacher.
    fn loss_on(teacher: &VisionTransformer, student: &VisionTransformer, px: &Array4<u8>) -> f64 {
        let t = classify(teacher, px.view(), &mut Silent).unwrap();
        let z = classify(student, px.view(), &mut Silent).unwrap();
        distillation_loss(t.view(), z.view(), 1.0).0
    }

    #[test]
    fn distillation_lowers_the_loss_and_keeps_every_mask() {
        let teacher = tiny_vit(11);
        let group = random_group(12, MlpKind::Standard);
        let px = pixels(13, 8);
        let params = plain_params(40);
        let placed = vec![PlacedGroup {
            blocks: vec![0, 1],
            group: group.clone(),
        }];
        let mut distiller =
            Distiller::new(&teacher, placed, px.view(), params.check().unwrap()).unwrap();
        let before = loss_on(&teacher, distiller.student(), &px);
        let mut first = None;
        while let Some(l) = distiller.step().unwrap() {
            first.get_or_insert(l);
        }
        assert_eq!(distiller.steps_done(), 40);
        // The loss of the first step is the whole set's (one batch holds every image).
        assert!((first.unwrap() - before).abs() < 1e-6 * before.max(1.0));
        let after = loss_on(&teacher, distiller.student(), &px);
        assert!(after < 0.5 * before, "loss {before} -> {after}");
        let out = distiller.finish().unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].blocks, vec![0, 1]);
        let trained = &out[0].group;
        assert_eq!(trained.parameter_count(), group.parameter_count());
        for (new, old) in trained.factors().iter().zip(group.factors()) {
            assert_eq!(new.mask(), old.mask());
            assert_ne!(new.values(), old.values());
        }
        assert_ne!(trained.basis().view(), group.basis().view());
    }

    /// `∂L/∂U` and `∂L/∂V_j` against central differences of `L` (f32 model, f64 sums).
    #[test]
    fn factor_gradients_match_finite_differences() {
        let teacher = tiny_vit(21);
        let group = random_group(22, MlpKind::Standard);
        let px = pixels(23, 3);
        let placed = vec![PlacedGroup {
            blocks: vec![0, 1],
            group: group.clone(),
        }];
        let params = DistillParams::default().check().unwrap();
        let d = Distiller::new(&teacher, placed, px.view(), params).unwrap();
        let t = classify(&teacher, px.view(), &mut Silent).unwrap();
        let images = preprocess(px.view());
        let (_, model) = d
            .student()
            .mlp_gradients(images.view(), |z| Ok(distillation_loss(t.view(), z, 1.0).1))
            .unwrap();
        let g = d.groups[0].gradients(&model).unwrap();
        let loss_with = |edit: &dyn Fn(&mut GroupState)| {
            let mut state = GroupState::new(PlacedGroup {
                blocks: vec![0, 1],
                group: group.clone(),
            });
            edit(&mut state);
            let rebuilt = state.group().unwrap();
            let mut student = teacher.clone();
            for b in 0..2 {
                student
                    .set_mlp(b, rebuilt.to_dense_mlp(b).unwrap())
                    .unwrap();
            }
            let z = student.forward(images.view()).unwrap();
            distillation_loss(t.view(), z.view(), 1.0).0
        };
        let h = 1e-2f32;
        let mut worst = 0.0f64;
        let mut largest = 0.0f64;
        let mut check = |analytic: f32, edit: &dyn Fn(&mut GroupState, f32)| {
            let numeric =
                (loss_with(&|s| edit(s, h)) - loss_with(&|s| edit(s, -h))) / (2.0 * h as f64);
            worst = worst.max((numeric - analytic as f64).abs());
            largest = largest.max((analytic as f64).abs());
        };
        for ((i, j), &a) in g.basis.indexed_iter() {
            check(a, &|s, e| s.u[[i, j]] += e);
        }
        for (f, dv) in g.factors.iter().enumerate() {
            for ((i, j), &a) in dv.indexed_iter() {
                if group.factors()[f].mask()[[i, j]] {
                    check(a, &|s, e| s.factors[f].values[[i, j]] += e);
                } else {
                    assert_eq!(a, 0.0);
                }
            }
        }
        assert!(largest > 1e-2, "gradients too small to test: {largest}");
        assert!(
            worst < 2e-3 * largest.max(0.1),
            "worst difference {worst}, largest gradient {largest}"
        );
    }

    #[test]
    fn views_draw_fresh_teacher_logits_and_still_learn() {
        let teacher = tiny_vit(11);
        let px = pixels(13, 8);
        let params = DistillParams {
            view_min_area: Some(0.5),
            ..plain_params(30)
        };
        let placed = vec![PlacedGroup {
            blocks: vec![0, 1],
            group: random_group(12, MlpKind::Standard),
        }];
        let mut distiller =
            Distiller::new(&teacher, placed, px.view(), params.check().unwrap()).unwrap();
        let before = loss_on(&teacher, distiller.student(), &px);
        while distiller.step().unwrap().is_some() {}
        let after = loss_on(&teacher, distiller.student(), &px);
        assert!(after < 0.7 * before, "loss {before} -> {after}");
    }

    /// `steps` steps of all 8 test images as they are, learning rate 10⁻².
    fn plain_params(steps: usize) -> DistillParams {
        DistillParams {
            steps,
            images_per_step: 8,
            learning_rate: 1e-2,
            view_min_area: None,
            ..DistillParams::default()
        }
    }

    /// A compressed model of one group placed at blocks 0 and 1 of [`tiny_vit`].
    fn one_group_model(group: SharedBasisGroup<f32>) -> CompressedModel {
        use crate::format::compressed::{GroupManifest, Manifest};
        let blocks = CompressedBlocks::SharedBasis(group);
        let originals = (0..2)
            .flat_map(|b| {
                ["fc1", "fc2"].map(|m| {
                    let name = format!("blocks.{b}.mlp.{m}.weight");
                    (name, None, vec![1, 1], safetensors::Dtype::F32)
                })
            })
            .collect();
        let described =
            GroupManifest::describe(&blocks, &[0, 1], MlpKind::Standard, originals).unwrap();
        let mut manifest = Manifest::with_parameters("fips", serde_json::json!({}));
        manifest.groups.push(described);
        CompressedModel {
            manifest,
            groups: vec![blocks],
        }
    }

    #[test]
    fn a_whole_model_is_distilled_with_its_masks_and_recorded() {
        let teacher = tiny_vit(11);
        let group = random_group(12, MlpKind::Standard);
        let model = one_group_model(group.clone());
        let px = pixels(13, 8);
        let params = plain_params(5).check().unwrap();
        let mut calls = Vec::new();
        // Checked on the training images themselves, where the loss falls.
        let (distilled, record) = distill_model(
            &teacher,
            &model,
            px.view(),
            px.view(),
            params,
            &mut |done, steps, loss| calls.push((done, steps, loss)),
        )
        .unwrap();
        let check = record.held_out.unwrap();
        assert_eq!(check.images, 8);
        assert!(check.kl_after < check.kl_before, "{check:?}");
        assert!(record.kept);
        // The same steps as the distiller run by hand.
        let placed = vec![PlacedGroup {
            blocks: vec![0, 1],
            group: group.clone(),
        }];
        let mut by_hand = Distiller::new(&teacher, placed, px.view(), params).unwrap();
        let mut losses = Vec::new();
        while let Some(l) = by_hand.step().unwrap() {
            losses.push(l);
        }
        let expected = by_hand.finish().unwrap().remove(0).group;
        assert_eq!(
            calls.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert!(calls.iter().all(|c| c.1 == 5));
        assert_eq!(calls.iter().map(|c| c.2).collect::<Vec<_>>(), losses);
        assert_eq!(record.first_loss, losses.first().copied());
        assert_eq!(record.last_loss, losses.last().copied());
        assert_eq!(record.images, 8);
        let CompressedBlocks::SharedBasis(trained) = &distilled.groups[0] else {
            panic!("the distilled group is not a shared basis");
        };
        assert_eq!(trained, &expected);
        assert_ne!(trained.basis(), group.basis());
        for (after, before) in trained.factors().iter().zip(group.factors()) {
            assert_eq!(after.mask(), before.mask());
        }
        assert_eq!(distilled.manifest.groups, model.manifest.groups);
        let written = distilled.manifest.distillation.as_ref().unwrap();
        assert_eq!(written["steps"], 5);
        assert_eq!(written["last_loss"], serde_json::json!(record.last_loss));
        // Distillation that raises the held-out KL (a learning rate far too large) is not kept.
        let wild = DistillParams {
            learning_rate: 10.0,
            ..*params.params()
        }
        .check()
        .unwrap();
        let held = pixels(14, 4);
        let (undone, record) = distill_model(
            &teacher,
            &model,
            px.view(),
            held.view(),
            wild,
            &mut |_, _, _| {},
        )
        .unwrap();
        let check = record.held_out.unwrap();
        assert!(check.kl_after > check.kl_before, "{check:?}");
        assert!(!record.kept);
        assert_eq!(undone.groups, model.groups);
        assert_eq!(undone.manifest.distillation.unwrap()["kept"], false);
        // Without held-out images nothing is checked.
        let empty = Array4::<u8>::zeros((0, 8, 8, 3));
        let (_, record) = distill_model(
            &teacher,
            &model,
            px.view(),
            empty.view(),
            params,
            &mut |_, _, _| {},
        )
        .unwrap();
        assert!(record.held_out.is_none() && record.kept);
        // A manifest that does not describe the groups is refused.
        let mut broken = model.clone();
        broken.manifest.groups.clear();
        assert!(matches!(
            distill_model(
                &teacher,
                &broken,
                px.view(),
                empty.view(),
                params,
                &mut |_, _, _| {}
            ),
            Err(FipsError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn misplaced_groups_are_typed_errors() {
        let teacher = tiny_vit(11);
        let px = pixels(13, 2);
        let group = random_group(12, MlpKind::Standard);
        let params = DistillParams::default().check().unwrap();
        for blocks in [vec![0], vec![1, 2], vec![0, 0]] {
            let placed = vec![PlacedGroup {
                blocks: blocks.clone(),
                group: group.clone(),
            }];
            assert!(
                Distiller::new(&teacher, placed, px.view(), params).is_err(),
                "{blocks:?}"
            );
        }
        let gated = vec![PlacedGroup {
            blocks: vec![0, 1],
            group: random_group(12, MlpKind::Gated),
        }];
        assert!(matches!(
            Distiller::new(&teacher, gated, px.view(), params),
            Err(FipsError::InvalidParameter { .. })
        ));
        let none = Array4::<u8>::zeros((0, 8, 8, 3));
        let placed = vec![PlacedGroup {
            blocks: vec![0, 1],
            group,
        }];
        assert!(Distiller::new(&teacher, placed, none.view(), params).is_err());
    }

    #[test]
    fn loss_gradient_matches_finite_differences_in_f64() {
        let t = array![[1.0f32, -0.5, 2.0], [0.3, 0.1, -1.0]];
        let z = array![[0.5f32, 0.5, 1.0], [-0.2, 0.4, 0.0]];
        for tau in [1.0, 2.5] {
            let (l, g) = distillation_loss(t.view(), z.view(), tau);
            assert!(l > 0.0);
            for i in 0..2 {
                for j in 0..3 {
                    let h = 1e-3f32;
                    let mut up = z.clone();
                    up[[i, j]] += h;
                    let mut down = z.clone();
                    down[[i, j]] -= h;
                    let numeric = (distillation_loss(t.view(), up.view(), tau).0
                        - distillation_loss(t.view(), down.view(), tau).0)
                        / (2.0 * h as f64);
                    assert!(
                        (numeric - g[[i, j]] as f64).abs() < 1e-4,
                        "τ {tau}, ({i}, {j}): {numeric} vs {}",
                        g[[i, j]]
                    );
                }
            }
        }
        let (same, g) = distillation_loss(t.view(), t.view(), 1.0);
        assert!(same.abs() < 1e-12 && g.iter().all(|v| v.abs() < 1e-7));
    }

    #[test]
    fn the_activations_kept_for_the_backward_pass_are_counted_and_bounded() {
        let deit_tiny = random_vit(
            1,
            VitConfig {
                width: 192,
                depth: 12,
                heads: 3,
                patch_size: 16,
                image_size: 224,
                num_classes: 1000,
                layer_norm_eps: 1e-6,
            },
            768,
        );
        // 197 tokens × (3 · 197 + 6 · 192 + 768) = 197 × 2511 per block and image.
        assert_eq!(deit_tiny.tape_values(1), Some(12 * 197 * 2511));
        // 256 images of DeiT-tiny (1.5 · 10⁹ values) are refused; 16 (95 · 10⁶) are not.
        assert!(deit_tiny.tape_values(MAX_IMAGES_PER_STEP).unwrap() > MAX_TAPE_VALUES);
        assert!(deit_tiny.tape_values(16).unwrap() < MAX_TAPE_VALUES);
        assert_eq!(deit_tiny.tape_values(usize::MAX / 2), None);
        // The distiller refuses such a step before any work.
        let px = Array4::<u8>::zeros((1, 224, 224, 3));
        let group = PlacedGroup {
            blocks: vec![0],
            group: SharedBasisGroup::new(
                MlpKind::Standard,
                Activation::Gelu,
                SharedBasis::new(Array2::zeros((192, 4))).unwrap(),
                vec![
                    SparseFactor::dense(Array2::zeros((4, 768))).unwrap(),
                    SparseFactor::dense(Array2::zeros((4, 768))).unwrap(),
                ],
                vec![None, None],
            )
            .unwrap(),
        };
        let params = DistillParams {
            images_per_step: MAX_IMAGES_PER_STEP,
            ..DistillParams::default()
        };
        assert!(matches!(
            Distiller::new(&deit_tiny, vec![group], px.view(), params.check().unwrap()),
            Err(FipsError::InvalidParameter {
                name: "images_per_step",
                ..
            })
        ));
    }

    #[test]
    fn bad_settings_are_typed_errors() {
        let ok = DistillParams::default();
        assert!(ok.check().is_ok());
        for bad in [
            DistillParams {
                images_per_step: 0,
                ..ok
            },
            DistillParams {
                images_per_step: MAX_IMAGES_PER_STEP + 1,
                ..ok
            },
            DistillParams {
                learning_rate: f64::NAN,
                ..ok
            },
            DistillParams {
                min_learning_rate: 1.0,
                ..ok
            },
            DistillParams {
                temperature: 0.0,
                ..ok
            },
            DistillParams {
                view_min_area: Some(0.0),
                ..ok
            },
            DistillParams {
                view_min_area: Some(f64::NAN),
                ..ok
            },
        ] {
            assert!(matches!(
                bad.check(),
                Err(FipsError::InvalidParameter { .. })
            ));
        }
    }
}
