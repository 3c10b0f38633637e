//! End to end: calibrate each group of a checkpoint, compress it, write the outputs, evaluate.
//!
//! Memory stays bounded by one group: calibration activations are captured (or read) for the
//! blocks of one group, used, and dropped before the next group. With images, the model's forward
//! pass stops after the group's last block, and (with [`CaptureStreams`]) the next group's capture
//! continues from the residual stream it stopped at, one block's worth of activations, instead of
//! running the earlier blocks again. From an MLP-input file a group larger than the file's
//! memory budget ([`MlpInputs::route`]) is not even held whole: FiPS and SVD read it a batch and a
//! chunk at a time (positioned reads), and only the held-out validation tokens are held in memory.

use std::ops::ControlFlow;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView4, Axis, concatenate};

use crate::app::vit::{CaptureStart, VisionTransformer, preprocess};
use crate::format::block_groups::BlockGroups;
use crate::format::compressed::{CompressedModel, GroupManifest, Manifest};
use crate::format::hf::store::TensorStore;
use crate::format::layout::MlpLayout;
use crate::format::mlp_inputs::{CalibrationRoute, MlpInputs};
use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::slicing::s;
use crate::foundation::thread_plan;
use crate::math::calibration::{Calibration, CalibrationReader};
use crate::math::validation::{
    ValidationSet, holdout_count, holdout_runs, split_reader, split_tokens_at,
};
use crate::methods::{Compressor, MethodOutput, MethodReport, Progress};

/// Tokens per block of data-free (Gaussian) calibration by default.
pub const DATA_FREE_TOKENS: usize = 16384;
/// The split of an image set used for calibration by default.
pub const CALIB_SPLIT: &str = "calib";
/// The split of an image set used for evaluation by default (never the calibration split).
pub const EVAL_SPLIT: &str = "eval";
/// The output directory of a run by default.
pub const OUT_DIR: &str = "out";

/// Images per forward pass when running a ViT over a set of images.
pub const IMAGE_BATCH: usize = 25;

/// Weight of each image's class token among a ViT group's training tokens by default. The head
/// reads only the class token, so an error there reaches the logits directly, while an error on
/// a patch token reaches them only through later attention; with every token alike the class
/// tokens are 1 in 197 of the loss. Chosen on held-out `calib/` images of DeiT-tiny (never
/// `eval/`; `examples/calibration_levers.rs`, `docs/results.md`): weight 10 lowered the mean
/// KL(dense ‖ compressed) of the logits in each of six seeded splits (by 4–20 %) and the relative
/// logit error by 7–10 %, with the same agreement; 200 overfits the few class tokens.
pub const DEFAULT_CLASS_TOKEN_WEIGHT: usize = 10;

/// Largest class-token weight accepted (it multiplies the class-token rows held in memory).
pub const MAX_CLASS_TOKEN_WEIGHT: usize = 1000;

/// Where each group's calibration activations come from.
#[derive(Debug, Clone, Copy)]
pub enum CalibrationSource<'a> {
    /// Run `vit` over `pixels` (`[images, H, W, 3]`, RGB) and capture each block's MLP input.
    Images {
        /// The model to run (the original, dense one).
        vit: &'a VisionTransformer,
        /// The calibration images.
        pixels: ArrayView4<'a, u8>,
        /// Weight of each image's class token among the training tokens (1: every token alike;
        /// `w`: each class-token row appears `w` times, see [`DEFAULT_CLASS_TOKEN_WEIGHT`]).
        class_token_weight: usize,
        /// Where each capture leaves the residual stream for the next group's to continue from
        /// (`None`: every group's capture runs the blocks before it again).
        streams: Option<&'a CaptureStreams>,
    },
    /// MLP inputs read from a file: by [`compress_group`] whole when the group fits the file's
    /// memory budget, a batch and a chunk at a time ([`MlpInputs::stream`]) otherwise
    /// ([`MlpInputs::route`]); by [`group_calibration`] whole.
    File(&'a MlpInputs),
    /// Data-free: standard Gaussian inputs with this many tokens per block.
    Gaussian {
        /// Tokens per block.
        tokens: usize,
        /// Seed of the draw.
        seed: u64,
    },
}

/// The residual streams of the calibration images where the last capture stopped (one
/// `[images · tokens, d]` array in all, batch by batch), so that the next group's capture runs
/// only its own blocks: capturing `G` groups of a model of `L` blocks one at a time then runs `L`
/// blocks per image instead of up to `G · L`, for the same bits. Holds one block's worth of
/// activations at most, and nothing once a capture reaches the last block. A group that does not
/// start at or after the stream's block, or a capture of another model or image set (told apart
/// by their addresses and shape), starts from the images as before.
#[derive(Debug, Default)]
pub struct CaptureStreams {
    state: Mutex<Option<Streams>>,
}

/// What [`CaptureStreams`] holds.
#[derive(Debug)]
struct Streams {
    /// The model and images they come from: addresses (compared, never followed) and shape.
    source: (usize, usize, Vec<usize>),
    /// The block they enter.
    block: usize,
    /// One per batch of [`IMAGE_BATCH`] images.
    streams: Vec<Array2<f32>>,
}

impl CaptureStreams {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The block the cached streams enter, if any.
    pub fn block(&self) -> Option<usize> {
        self.lock().as_ref().map(|s| s.block)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Streams>> {
        // A panic elsewhere while the lock was held leaves a cache that is at worst stale in
        // position, which `take_for` checks: recover the guard.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn source(vit: &VisionTransformer, pixels: ArrayView4<'_, u8>) -> (usize, usize, Vec<usize>) {
        let vit: *const VisionTransformer = vit;
        (
            vit as usize,
            pixels.as_ptr() as usize,
            pixels.shape().to_vec(),
        )
    }

    /// The streams of `vit` on `pixels`, taken out, if they enter block `first` or an earlier
    /// one; with the block they enter.
    fn take_for(
        &self,
        vit: &VisionTransformer,
        pixels: ArrayView4<'_, u8>,
        first: usize,
    ) -> Option<(usize, Vec<Array2<f32>>)> {
        let batches = pixels.len_of(Axis(0)).div_ceil(IMAGE_BATCH);
        match self.lock().take() {
            Some(s)
                if s.source == Self::source(vit, pixels)
                    && s.block <= first
                    && s.streams.len() == batches =>
            {
                Some((s.block, s.streams))
            }
            _ => None,
        }
    }

    fn store(
        &self,
        vit: &VisionTransformer,
        pixels: ArrayView4<'_, u8>,
        block: usize,
        streams: Vec<Array2<f32>>,
    ) {
        *self.lock() = Some(Streams {
            source: Self::source(vit, pixels),
            block,
            streams,
        });
    }
}

/// Where each group's held-out validation tokens (never trained on) come from.
#[derive(Debug, Clone, Copy, Default)]
pub enum Validation<'a> {
    /// No validation set: reports carry no validation errors and early stopping is unavailable.
    #[default]
    None,
    /// Hold out a seeded fraction of each group's calibration tokens (the same token positions
    /// for every block of the group); with images, a fraction of the images, each with all its
    /// tokens ([`holdout_runs`]), so that no held-out image lends a token to training.
    Holdout {
        /// Fraction of the tokens held out, in (0, 1).
        fraction: f64,
        /// Seed of the draw.
        seed: u64,
    },
    /// Held-out inputs from their own source (e.g. held-out paragraphs of a text).
    Source(CalibrationSource<'a>),
}

impl CalibrationSource<'_> {
    /// Calibration tokens of block `block` this source gives (images × tokens per image, the
    /// file's rows, the Gaussian draw); `None` when the file lacks the block.
    pub fn tokens(&self, block: usize) -> Option<usize> {
        match self {
            Self::Images { vit, pixels, .. } => {
                Some(pixels.shape()[0].saturating_mul(vit.config().tokens()))
            }
            Self::File(file) => file.shape(block).map(|(tokens, _)| tokens),
            Self::Gaussian { tokens, .. } => Some(*tokens),
        }
    }

    /// Tokens per image for images (a validation split holds out whole images); `None` for
    /// the other sources, whose tokens are held out one by one.
    fn tokens_per_image(&self) -> Option<usize> {
        match *self {
            Self::Images { vit, .. } => Some(vit.config().tokens()),
            _ => None,
        }
    }

    /// `(tokens per image, weight)` when the training tokens weight class tokens (images, a
    /// weight above 1); `None` otherwise.
    fn class_tokens(&self) -> Option<(usize, usize)> {
        match *self {
            Self::Images {
                vit,
                class_token_weight,
                ..
            } if class_token_weight > 1 => Some((vit.config().tokens(), class_token_weight)),
            _ => None,
        }
    }

    /// Checks the source's own settings: a class-token weight in `1..=`[`MAX_CLASS_TOKEN_WEIGHT`].
    pub fn check(&self) -> Result<()> {
        match *self {
            Self::Images {
                class_token_weight, ..
            } if !(1..=MAX_CLASS_TOKEN_WEIGHT).contains(&class_token_weight) => {
                Err(FipsError::InvalidParameter {
                    name: "class-token-weight",
                    reason: format!(
                        "must be in 1..={MAX_CLASS_TOKEN_WEIGHT}, got {class_token_weight}"
                    ),
                })
            }
            _ => Ok(()),
        }
    }
}

/// `calib` (a group's training tokens) with the class tokens of `class` (`(tokens per image,
/// weight)`) weighted by repetition. `kept`: the positions in the whole capture of `calib`'s rows
/// when it is the training part of a split (so a held-out image's class token is never copied
/// into training); `None` when `calib` is the whole capture.
fn weight_class_tokens(
    calib: Calibration<f32>,
    kept: Option<&[usize]>,
    class: Option<(usize, usize)>,
) -> Result<Calibration<f32>> {
    let Some((per_image, weight)) = class else {
        return Ok(calib);
    };
    let rows: Vec<usize> = match kept {
        Some(kept) => kept
            .iter()
            .enumerate()
            .filter(|&(_, &t)| t % per_image == 0)
            .map(|(j, _)| j)
            .collect(),
        None => (0..calib.tokens()).step_by(per_image).collect(),
    };
    calib.with_repeated_rows(&rows, weight - 1)
}

/// Refuses, before any work, settings whose training batch is larger than the tokens some group
/// of `groups` would train on (its calibration tokens less the ones `validation` holds out):
/// the trainer would fail with the same [`FipsError::BatchTooLarge`] only once that group's
/// turn came.
pub fn check_batch(
    compressor: &dyn Compressor<f32>,
    calibration: &CalibrationSource<'_>,
    validation: &Validation<'_>,
    groups: &[Vec<usize>],
) -> Result<()> {
    calibration.check()?;
    let Some(batch) = compressor.parameters().required_batch_tokens() else {
        return Ok(());
    };
    for &block in groups.iter().flatten() {
        let Some(tokens) = calibration.tokens(block) else {
            continue;
        };
        let training = match validation {
            Validation::Holdout { fraction, .. } if tokens >= 2 => {
                let run = calibration
                    .tokens_per_image()
                    .filter(|&run| run > 0 && tokens.is_multiple_of(run) && tokens / run >= 2)
                    .unwrap_or(1);
                tokens - run * holdout_count(tokens / run, *fraction)
            }
            _ => tokens,
        };
        if batch > training {
            return Err(FipsError::BatchTooLarge {
                batch,
                tokens: training,
            });
        }
    }
    Ok(())
}

/// The fraction of the calibration tokens the `fips` command holds out by default.
pub const DEFAULT_VALIDATION_FRACTION: f64 = 0.05;

/// Receives progress from [`compress_checkpoint`] and [`classify`]; every method has a no-op
/// default.
pub trait Observer {
    /// Calibration of group `group`: `done` of `total` images (or blocks) processed.
    fn calibration(&mut self, _group: usize, _done: usize, _total: usize) {}
    /// Compression of group `group` (blocks `blocks`) starts; `steps` training steps at most.
    fn group_started(&mut self, _group: usize, _blocks: &[usize], _steps: usize) {}
    /// A training step of group `group` finished; `Break` stops that group's training early.
    fn step(&mut self, _group: usize, _progress: &Progress) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
    /// Group `group` is done.
    fn group_finished(&mut self, _group: usize, _report: &MethodReport) {}
    /// Group `group` was not run: its part from an earlier run (same settings) is reused.
    fn group_reused(&mut self, _group: usize, _report: &MethodReport) {}
    /// Classification: `done` of `total` images.
    fn classification(&mut self, _done: usize, _total: usize) {}
}

/// An [`Observer`] that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Observer for Silent {}

/// The result of compressing a checkpoint.
#[derive(Debug, Clone)]
pub struct ModelCompression {
    /// The compressed groups and their manifest (ready to write or densify).
    pub model: CompressedModel,
    /// One report per group.
    pub reports: Vec<MethodReport>,
    /// Time spent capturing or reading calibration activations.
    pub calibration_time: Duration,
    /// Wall time of the whole compression.
    pub wall_time: Duration,
}

/// The calibration activations of one group.
pub fn group_calibration(
    data: &CalibrationSource<'_>,
    group: usize,
    blocks: &[usize],
    width: usize,
    observer: &mut dyn Observer,
) -> Result<Calibration<f32>> {
    match *data {
        CalibrationSource::Images {
            vit,
            pixels,
            streams,
            ..
        } => {
            let (first, last) = match (blocks.first(), blocks.last()) {
                (Some(&a), Some(&b)) => (a, b),
                _ => return Err(FipsError::EmptyGroup),
            };
            if blocks
                .iter()
                .zip(first..)
                .any(|(&b, expected)| b != expected)
            {
                return Err(FipsError::InvalidParameter {
                    name: "groups",
                    reason: format!(
                        "capturing from images needs consecutive blocks, got {blocks:?}"
                    ),
                });
            }
            let total = pixels.len_of(Axis(0));
            let mut chunks: Vec<Vec<Array2<f32>>> = vec![Vec::new(); blocks.len()];
            observer.calibration(group, 0, total);
            let range = first..last + 1;
            let batches = match streams {
                None => over_image_batches(
                    pixels,
                    |done| observer.calibration(group, done, total),
                    |batch| vit.forward_capture(preprocess(batch).view(), range.clone()),
                )?,
                Some(cache) => {
                    // Each batch continues from its cached stream when there is one.
                    let starts: Vec<Option<(usize, Array2<f32>)>> =
                        match cache.take_for(vit, pixels, first) {
                            Some((block, cached)) => {
                                cached.into_iter().map(|x| Some((block, x))).collect()
                            }
                            None => vec![None; total.div_ceil(IMAGE_BATCH)],
                        };
                    let (results, ends): (Vec<_>, Vec<_>) = over_image_batches_with(
                        pixels,
                        starts,
                        |done| observer.calibration(group, done, total),
                        |batch, cached| match cached {
                            Some((block, stream)) => vit.forward_capture_from(
                                CaptureStart::Stream { stream, block },
                                range.clone(),
                            ),
                            None => vit.forward_capture_from(
                                CaptureStart::Images(preprocess(batch).view()),
                                range.clone(),
                            ),
                        },
                    )?
                    .into_iter()
                    .unzip();
                    // Past the last block no group can continue: the cache is left empty.
                    if let Some(ends) = ends.into_iter().collect::<Option<Vec<_>>>() {
                        cache.store(vit, pixels, last + 1, ends);
                    }
                    results
                }
            };
            for captured in batches {
                for (dst, z) in chunks.iter_mut().zip(captured) {
                    dst.push(z);
                }
            }
            let inputs = chunks
                .iter()
                .map(|parts| {
                    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
                    concatenate(Axis(0), &views).map_err(|e| FipsError::Numerical(e.to_string()))
                })
                .collect::<Result<Vec<_>>>()?;
            Calibration::new(inputs)
        }
        CalibrationSource::File(file) => {
            observer.calibration(group, 0, blocks.len());
            let calibration = file.calibration(blocks)?;
            observer.calibration(group, blocks.len(), blocks.len());
            Ok(calibration)
        }
        CalibrationSource::Gaussian { tokens, seed } => {
            Calibration::gaussian(blocks.len(), tokens, width, seed.wrapping_add(group as u64))
        }
    }
}

/// One compressed group: its compressed form, its manifest entry, its report and the time its
/// calibration activations took. What [`compress_group`] returns and a work-area part holds.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupResult {
    /// The compressed blocks.
    pub blocks: crate::repr::CompressedBlocks<f32>,
    /// Its entry of the compressed file's manifest.
    pub manifest: GroupManifest,
    /// The method's report.
    pub report: MethodReport,
    /// Time spent capturing or reading the group's calibration activations.
    pub calibration_time: Duration,
}

/// The manifest of a compression of `checkpoint` with `compressor`, without groups.
pub fn model_manifest(
    checkpoint: &impl TensorStore,
    layout: &MlpLayout,
    compressor: &dyn Compressor<f32>,
    calibration: &CalibrationSource<'_>,
) -> Result<Manifest> {
    let mut manifest = Manifest::new(compressor.method().name(), &compressor.parameters())?;
    manifest.source = checkpoint
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    manifest.scheme = Some(layout.scheme().to_string());
    manifest.data_free = matches!(calibration, CalibrationSource::Gaussian { .. });
    Ok(manifest)
}

/// Compresses group `g` (`blocks`) of `checkpoint`, measuring it on the group's held-out
/// `validation` tokens. Depends on nothing but its arguments: no state carries over from earlier
/// groups (every method seeds its draws from its parameters, and data-free inputs and hold-outs
/// from the seed and `g`), so a group run alone, in another process or after a restart gives the
/// same bits.
///
/// From [`CalibrationSource::File`] the group's calibration is read whole when its inputs and
/// targets (`8 n T d` bytes) fit the file's memory budget, and streamed from the file otherwise
/// (see [`Compressor::compress`] for which methods still read it whole): the same bits either
/// way. The other sources are produced, and held, in memory.
#[allow(clippy::too_many_arguments)]
pub fn compress_group(
    checkpoint: &impl TensorStore,
    layout: &MlpLayout,
    g: usize,
    blocks: &[usize],
    compressor: &dyn Compressor<f32>,
    activation: Activation,
    calibration: &CalibrationSource<'_>,
    validation: &Validation<'_>,
    observer: &mut dyn Observer,
) -> Result<GroupResult> {
    calibration.check()?;
    let dense = blocks
        .iter()
        .map(|&b| layout.load_block::<f32>(checkpoint, b, activation))
        .collect::<Result<Vec<_>>>()?;
    let width = dense.first().map_or(0, |m| m.width());
    let run = GroupRun {
        g,
        blocks,
        dense: &dense,
        compressor,
        calibration_start: Instant::now(),
    };
    let (out, calibration_time) = match calibration {
        CalibrationSource::File(file) if file.route(blocks) == CalibrationRoute::Stream => {
            // Streamed: the group's inputs are read from the file a batch and a chunk at a time.
            observer.calibration(g, 0, blocks.len());
            let reader = file.stream(blocks)?;
            observer.calibration(g, blocks.len(), blocks.len());
            match validation {
                Validation::None => run.compress(&reader, None, observer)?,
                Validation::Holdout { fraction, seed } => {
                    // Training reads the rows `split_tokens` would keep, in the same order; only
                    // the held-out rows are read into memory, for the validation set (the same
                    // bits as the split of the whole calibration).
                    let (train, held) = split_reader(&reader, *fraction, *seed)?;
                    let set = ValidationSet::from_reader(&dense, &held)?;
                    run.compress(&train, Some(&set), observer)?
                }
                Validation::Source(source) => {
                    let set = source_validation(source, g, blocks, &dense)?;
                    run.compress(&reader, Some(&set), observer)?
                }
            }
        }
        _ => {
            let calib = group_calibration(calibration, g, blocks, width, observer)?;
            let class = calibration.class_tokens();
            match validation {
                Validation::None => {
                    run.compress(&weight_class_tokens(calib, None, class)?, None, observer)?
                }
                Validation::Holdout { fraction, seed } => {
                    let per_image = calibration.tokens_per_image().unwrap_or(1);
                    let (kept, held) = holdout_runs(calib.tokens(), per_image, *fraction, *seed)?;
                    // The split consumes `calib` block by block: no second copy of the calibration.
                    let (train, held) = split_tokens_at(calib, &kept, &held)?;
                    let set = ValidationSet::new(&dense, &held)?;
                    drop(held);
                    let train = weight_class_tokens(train, Some(&kept), class)?;
                    run.compress(&train, Some(&set), observer)?
                }
                Validation::Source(source) => {
                    let set = source_validation(source, g, blocks, &dense)?;
                    let calib = weight_class_tokens(calib, None, class)?;
                    run.compress(&calib, Some(&set), observer)?
                }
            }
        }
    };
    // Rank components that contribute nothing are not written (the rebuilt weights keep their
    // values; FiPS's report counts them as `unused_rank`): the report counts the parameters
    // written.
    let compressed = out.blocks.without_unused_rank()?;
    let mut report = out.report;
    report.parameters = compressed.parameter_count();
    observer.group_finished(g, &report);
    let originals = blocks
        .iter()
        .map(|&b| layout.block(b))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flat_map(|t| {
            let dtype = t.dtype;
            t.weights
                .iter()
                .zip(&t.biases)
                .map(|(w, bias)| (w.clone(), bias.clone(), dtype))
                .collect::<Vec<_>>()
        })
        .map(|(w, bias, dtype)| Ok((w.clone(), bias, checkpoint.info(&w)?.shape.clone(), dtype)))
        .collect::<Result<Vec<_>>>()?;
    let manifest = GroupManifest::describe(&compressed, blocks, layout.kind(), originals)?;
    Ok(GroupResult {
        blocks: compressed,
        manifest,
        report,
        calibration_time,
    })
}

/// One group's compression once its calibration and validation set are at hand: what
/// [`compress_group`] does the same way for every calibration route.
struct GroupRun<'a> {
    g: usize,
    blocks: &'a [usize],
    dense: &'a [crate::foundation::mlp::DenseMlp<f32>],
    compressor: &'a dyn Compressor<f32>,
    calibration_start: Instant,
}

impl GroupRun<'_> {
    /// Compresses the group from `train`, measured on `set`; returns the output and the time
    /// the calibration and validation inputs took.
    fn compress(
        &self,
        train: &dyn CalibrationReader<f32>,
        set: Option<&ValidationSet<f32>>,
        observer: &mut dyn Observer,
    ) -> Result<(MethodOutput<f32>, Duration)> {
        let calibration_time = self.calibration_start.elapsed();
        observer.group_started(self.g, self.blocks, self.compressor.steps());
        let out = self
            .compressor
            .compress_validated(self.dense, train, set, &mut |p| observer.step(self.g, p))?;
        Ok((out, calibration_time))
    }
}

/// The validation set of group `g` (`blocks`, dense `dense`) on held-out inputs from their own
/// `source` (e.g. the held-out paragraphs' captures of the text path): read from a file straight
/// into the set, produced in memory otherwise.
fn source_validation(
    source: &CalibrationSource<'_>,
    g: usize,
    blocks: &[usize],
    dense: &[crate::foundation::mlp::DenseMlp<f32>],
) -> Result<ValidationSet<f32>> {
    match source {
        CalibrationSource::File(file) => ValidationSet::from_reader(dense, &file.stream(blocks)?),
        _ => {
            let width = dense.first().map_or(0, |m| m.width());
            let held = group_calibration(source, g, blocks, width, &mut Silent)?;
            ValidationSet::new(dense, &held)
        }
    }
}

/// The compression of a whole model from its manifest (without groups) and its groups in order.
pub fn assemble(
    mut manifest: Manifest,
    groups: Vec<GroupResult>,
    wall_time: Duration,
) -> ModelCompression {
    let mut compressed = Vec::with_capacity(groups.len());
    let mut reports = Vec::with_capacity(groups.len());
    let mut calibration_time = Duration::ZERO;
    for group in groups {
        manifest.groups.push(group.manifest);
        compressed.push(group.blocks);
        reports.push(group.report);
        calibration_time += group.calibration_time;
    }
    ModelCompression {
        model: CompressedModel {
            manifest,
            groups: compressed,
        },
        reports,
        calibration_time,
        wall_time,
    }
}

/// Compresses every group of `checkpoint` with `compressor` (any method), one group at a time,
/// without a validation set (see [`compress_checkpoint_validated`]).
pub fn compress_checkpoint(
    checkpoint: &impl TensorStore,
    layout: &MlpLayout,
    groups: &BlockGroups,
    compressor: &dyn Compressor<f32>,
    activation: Activation,
    calibration: &CalibrationSource<'_>,
    observer: &mut dyn Observer,
) -> Result<ModelCompression> {
    compress_checkpoint_validated(
        checkpoint,
        layout,
        groups,
        compressor,
        activation,
        calibration,
        &Validation::None,
        observer,
    )
}

/// As [`compress_checkpoint`], with each group measured on held-out validation tokens (every
/// report's `validation`), which also drive early stopping when the method has it.
#[allow(clippy::too_many_arguments)]
pub fn compress_checkpoint_validated(
    checkpoint: &impl TensorStore,
    layout: &MlpLayout,
    groups: &BlockGroups,
    compressor: &dyn Compressor<f32>,
    activation: Activation,
    calibration: &CalibrationSource<'_>,
    validation: &Validation<'_>,
    observer: &mut dyn Observer,
) -> Result<ModelCompression> {
    let start = Instant::now();
    let manifest = model_manifest(checkpoint, layout, compressor, calibration)?;
    let results = groups
        .groups()
        .iter()
        .enumerate()
        .map(|(g, blocks)| {
            compress_group(
                checkpoint,
                layout,
                g,
                blocks,
                compressor,
                activation,
                calibration,
                validation,
                observer,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(assemble(manifest, results, start.elapsed()))
}

/// `vit` with the MLPs of every compressed group replaced by their dense rebuilds.
pub fn with_compressed_mlps(
    vit: &VisionTransformer,
    model: &CompressedModel,
) -> Result<VisionTransformer> {
    let mut out = vit.clone();
    for (m, group) in model.manifest.groups.iter().zip(&model.groups) {
        for (position, &block) in m.blocks.iter().enumerate() {
            out.set_mlp(block, group.to_dense_mlp(position)?)?;
        }
    }
    Ok(out)
}

/// `vit` with the MLPs of a compact compressed model (format version 3) swapped in, each rebuilt
/// exactly as a dense MLP.
pub fn with_compact_mlps(
    vit: &VisionTransformer,
    model: &crate::format::compact_file::CompactModel,
) -> Result<VisionTransformer> {
    let mut out = vit.clone();
    for (m, group) in model.manifest.groups.iter().zip(&model.groups) {
        for (position, &block) in m.blocks.iter().enumerate() {
            out.set_mlp(block, group.to_dense_mlp(position)?)?;
        }
    }
    Ok(out)
}

/// The logits of `vit` on `pixels` (`[images, H, W, 3]`), in batches of [`IMAGE_BATCH`].
pub fn classify(
    vit: &VisionTransformer,
    pixels: ArrayView4<'_, u8>,
    observer: &mut dyn Observer,
) -> Result<Array2<f32>> {
    let total = pixels.len_of(Axis(0));
    observer.classification(0, total);
    let parts = over_image_batches(
        pixels,
        |done| observer.classification(done, total),
        |batch| vit.forward(preprocess(batch).view()),
    )?;
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    concatenate(Axis(0), &views).map_err(|e| FipsError::Numerical(e.to_string()))
}

/// `work` on every batch of [`IMAGE_BATCH`] images of `pixels`, the results in order; `progress`
/// gets the images done after each batch. With OpenBLAS on one thread, one batch per core at once
/// ([`thread_plan::pass_workers`]: the ViT's GEMMs then whole on a core each).
fn over_image_batches<T: Send>(
    pixels: ArrayView4<'_, u8>,
    progress: impl FnMut(usize),
    work: impl Fn(ArrayView4<'_, u8>) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    over_image_batches_with(pixels, std::iter::repeat(()), progress, |batch, ()| {
        work(batch)
    })
}

/// [`over_image_batches`] with an item of `items` handed to each batch's `work` beside its
/// images, in order (`items` holds one per batch at least).
fn over_image_batches_with<I: Send, T: Send>(
    pixels: ArrayView4<'_, u8>,
    items: impl IntoIterator<Item = I>,
    mut progress: impl FnMut(usize),
    work: impl Fn(ArrayView4<'_, u8>, I) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let total = pixels.len_of(Axis(0));
    let mut out = Vec::with_capacity(total.div_ceil(IMAGE_BATCH));
    thread_plan::map_in_rounds(
        (0..total).step_by(IMAGE_BATCH).zip(items),
        thread_plan::pass_workers(),
        |(start, item)| {
            let end = (start + IMAGE_BATCH).min(total);
            work(pixels.slice(s![start..end, .., .., ..]), item)
        },
        |r| {
            out.push(r);
            progress((out.len() * IMAGE_BATCH).min(total));
            Ok(())
        },
    )?;
    Ok(out)
}

/// MLP weight parameters before and after: `(dense, compressed)` over every block of the layout
/// (uncompressed blocks count at their dense size).
pub fn mlp_parameters(layout: &MlpLayout, model: &CompressedModel) -> (usize, usize) {
    let dense = layout.mlp_weight_count();
    let replaced: usize = model
        .groups
        .iter()
        .map(|g| g.parameter_count().dense_weights)
        .sum();
    let kept: usize = model
        .groups
        .iter()
        .map(|g| g.parameter_count().compressed_weights())
        .sum();
    (dense, dense - replaced + kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::validation::{holdout, split_tokens};

    /// Row `t` of every block holds `t`, so the rows of a set name their capture positions.
    fn numbered(tokens: usize) -> Calibration<f32> {
        let z = Array2::from_shape_fn((tokens, 2), |(t, _)| t as f32);
        Calibration::new(vec![z.clone(), z]).unwrap()
    }

    fn positions(c: &Calibration<f32>) -> Vec<usize> {
        c.input(1)
            .unwrap()
            .column(0)
            .iter()
            .map(|&v| v as usize)
            .collect()
    }

    /// Class tokens (every `per_image`-th capture position) are repeated `weight − 1` more times;
    /// in the training part of a split only the kept images' class tokens are, so no held-out
    /// token reaches training; weight 1 or no images leaves the set as it was.
    #[test]
    fn class_tokens_are_weighted_in_the_training_tokens_only() {
        let (per_image, images) = (4, 5);
        let n = per_image * images;
        let whole = weight_class_tokens(numbered(n), None, Some((per_image, 3))).unwrap();
        let mut expected: Vec<usize> = (0..n).collect();
        for _ in 0..2 {
            expected.extend((0..n).step_by(per_image));
        }
        assert_eq!(positions(&whole), expected);

        let (kept, held) = holdout(n, 0.3, 7).unwrap();
        let (train, _) = split_tokens(numbered(n), 0.3, 7).unwrap();
        assert_eq!(positions(&train), kept);
        let weighted = weight_class_tokens(train, Some(&kept), Some((per_image, 3))).unwrap();
        let got = positions(&weighted);
        let class_kept: Vec<usize> = kept
            .iter()
            .copied()
            .filter(|t| t % per_image == 0)
            .collect();
        assert!(!class_kept.is_empty());
        let mut expected = kept.clone();
        expected.extend(&class_kept);
        expected.extend(&class_kept);
        assert_eq!(got, expected);
        assert!(got.iter().all(|t| !held.contains(t)));

        assert_eq!(
            positions(&weight_class_tokens(numbered(n), None, None).unwrap()),
            (0..n).collect::<Vec<_>>()
        );
    }

    /// Calibration of `blocks` from 30 random 8 × 8 images (two batches of [`IMAGE_BATCH`]).
    fn tiny_capture(
        vit: &VisionTransformer,
        pixels: &ndarray::Array4<u8>,
        blocks: &[usize],
        streams: Option<&CaptureStreams>,
    ) -> Calibration<f32> {
        let source = CalibrationSource::Images {
            vit,
            pixels: pixels.view(),
            class_token_weight: 1,
            streams,
        };
        group_calibration(&source, 0, blocks, vit.config().width, &mut Silent).unwrap()
    }

    /// Each group's capture continues from the stream the previous one left, with the same bits
    /// as a capture from the images; a group before the cached stream starts from the images.
    #[test]
    fn captures_continued_from_the_cached_streams_match_captures_from_the_images() {
        use crate::app::vit::VitConfig;
        use crate::app::vit::test_support::random_vit;
        use rand::{Rng, SeedableRng};
        let config = VitConfig {
            width: 8,
            depth: 5,
            heads: 2,
            patch_size: 4,
            image_size: 8,
            num_classes: 3,
            layer_norm_eps: 1e-6,
        };
        let vit = random_vit(3, config, 12);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let pixels = ndarray::Array4::from_shape_fn((30, 8, 8, 3), |_| rng.random::<u8>());
        assert!(pixels.len_of(Axis(0)) > IMAGE_BATCH);
        let streams = CaptureStreams::new();
        // Past the last block (5) nothing is kept.
        for (blocks, next) in [
            (vec![0, 1], Some(2)),
            (vec![3], Some(4)),
            (vec![4], None),
            (vec![1, 2], Some(3)),
        ] {
            let continued = tiny_capture(&vit, &pixels, &blocks, Some(&streams));
            let fresh = tiny_capture(&vit, &pixels, &blocks, None);
            assert_eq!(continued.inputs(), fresh.inputs(), "blocks {blocks:?}");
            assert_eq!(continued.tokens(), 30 * 5);
            assert_eq!(streams.block(), next);
        }
        // The stream entering block 3 continues to block 4's capture (running block 3 whole).
        let from_stream = tiny_capture(&vit, &pixels, &[4], Some(&streams));
        assert_eq!(
            from_stream.inputs(),
            tiny_capture(&vit, &pixels, &[4], None).inputs()
        );
        // The cache is what the capture starts from: other streams, other inputs.
        let zeros = vec![Array2::zeros((25 * 5, 8)), Array2::zeros((5 * 5, 8))];
        streams.store(&vit, pixels.view(), 4, zeros);
        let from_zeros = tiny_capture(&vit, &pixels, &[4], Some(&streams));
        assert_ne!(from_zeros.inputs(), from_stream.inputs());
        // A cache with the wrong number of batches, or of other images, is not used.
        streams.store(&vit, pixels.view(), 4, vec![Array2::zeros((30 * 5, 8))]);
        let recaptured = tiny_capture(&vit, &pixels, &[4], Some(&streams));
        assert_eq!(recaptured.inputs(), from_stream.inputs());
        let other = pixels.clone();
        let zeros = vec![Array2::zeros((25 * 5, 8)), Array2::zeros((5 * 5, 8))];
        streams.store(&vit, other.view(), 4, zeros);
        let recaptured = tiny_capture(&vit, &pixels, &[4], Some(&streams));
        assert_eq!(recaptured.inputs(), from_stream.inputs());
    }

    /// A stream that does not fit the model, or enters after the first block asked for, is an
    /// error, not a wrong capture.
    #[test]
    fn a_stream_that_cannot_start_the_capture_is_refused() {
        use crate::app::vit::CaptureStart;
        use crate::app::vit::test_support::tiny_vit;
        let vit = tiny_vit(1);
        let d = vit.config().width;
        let t = vit.config().tokens();
        for (rows, width, block, blocks) in [
            (2 * t, d + 1, 0, 0..1),
            (2 * t + 1, d, 0, 0..1),
            (0, d, 0, 0..1),
            (2 * t, d, 1, 0..2),
        ] {
            let start = CaptureStart::Stream {
                stream: Array2::zeros((rows, width)),
                block,
            };
            assert!(vit.forward_capture_from(start, blocks).is_err());
        }
        let ok = CaptureStart::Stream {
            stream: Array2::zeros((2 * t, d)),
            block: 1,
        };
        let (captured, end) = vit.forward_capture_from(ok, 1..2).unwrap();
        assert_eq!(captured.len(), 1);
        // Block 1 is the last: no stream to continue from.
        assert!(end.is_none());
        let images = ndarray::Array4::zeros((2, 3, 8, 8));
        let (captured, end) = vit
            .forward_capture_from(CaptureStart::Images(images.view()), 0..1)
            .unwrap();
        assert_eq!(captured.len(), 1);
        assert_eq!(end.map(|e| e.dim()), Some((2 * t, d)));
    }
}
