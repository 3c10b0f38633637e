//! A held-out validation split of the calibration data, and the error of a group on it.
//!
//! Training settings (steps, learning rate, early stopping, augmentation) are chosen on data the
//! training never saw but that comes from the calibration source, never on the evaluation set:
//! [`holdout`] draws a seeded subset of items (images, paragraphs or tokens) to hold out, and a
//! [`ValidationSet`] measures `‖Ŷ − Y‖ / ‖Y‖` of a compressed group on the held-out inputs, where
//! `Y` are the original blocks' outputs (the same relative error the reports give for the
//! calibration set).

use std::borrow::Cow;

use ndarray::{Array2, Axis};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::foundation::error::{FipsError, Result, invalid};
use crate::foundation::float::Float;
use crate::foundation::mlp::DenseMlp;
use crate::math::calibration::{Calibration, CalibrationReader, squared_error_chunked};
use crate::math::subset::{RowSubset, read_whole};

/// How many of `n ≥ 2` items [`holdout`] holds out: `round(fraction · n)`, at least one, at
/// most `n − 1`.
pub fn holdout_count(n: usize, fraction: f64) -> usize {
    ((fraction * n as f64).round() as usize).clamp(1, n.saturating_sub(1).max(1))
}

/// Splits `0..n` into `(kept, held_out)`, both sorted: `round(fraction · n)` items (at least one,
/// at most `n − 1`) drawn by a seeded shuffle are held out.
///
/// Errors: `n < 2`, or `fraction` outside `(0, 1)`.
pub fn holdout(n: usize, fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(invalid(
            "validation fraction",
            format!("must be in (0, 1), got {fraction}"),
        ));
    }
    if n < 2 {
        return Err(invalid(
            "validation fraction",
            format!("cannot hold out part of {n} items"),
        ));
    }
    let count = holdout_count(n, fraction);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut held = order[..count].to_vec();
    let mut kept = order[count..].to_vec();
    held.sort_unstable();
    kept.sort_unstable();
    Ok((kept, held))
}

/// Splits `0..n` into `(kept, held_out)` by whole runs of `run` consecutive items (the tokens of
/// one image): [`holdout`] of the `n / run` runs, each run's items kept or held out together, so
/// no held-out image lends a token to training. `run = 1` is [`holdout`].
///
/// Errors: `run` zero or not dividing `n`, fewer than two runs, or `fraction` outside `(0, 1)`.
pub fn holdout_runs(
    n: usize,
    run: usize,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    if run == 0 || !n.is_multiple_of(run) {
        return Err(invalid(
            "validation fraction",
            format!("{n} tokens are not whole runs of {run}"),
        ));
    }
    let (kept, held) = holdout(n / run, fraction, seed)?;
    let items = |runs: Vec<usize>| -> Vec<usize> {
        runs.into_iter()
            .flat_map(|r| r * run..(r + 1) * run)
            .collect()
    };
    Ok((items(kept), items(held)))
}

/// Splits a calibration set by tokens: the same seeded [`holdout`] of token positions for every
/// block, returned as `(training, validation)`. Consumes the set block by block (each block's
/// matrix is dropped once split), so the peak is the set plus one block, not two sets.
pub fn split_tokens<F: Float>(
    calibration: Calibration<F>,
    fraction: f64,
    seed: u64,
) -> Result<(Calibration<F>, Calibration<F>)> {
    let (kept, held) = holdout(calibration.tokens(), fraction, seed)?;
    split_tokens_at(calibration, &kept, &held)
}

/// [`split_tokens`] at given positions: the rows `kept` of every block (and target) train, the
/// rows `held` validate (for a caller that needs the positions of a [`holdout`] too).
pub(crate) fn split_tokens_at<F: Float>(
    calibration: Calibration<F>,
    kept: &[usize],
    held: &[usize],
) -> Result<(Calibration<F>, Calibration<F>)> {
    let tokens = calibration.tokens();
    if let Some(&bad) = kept.iter().chain(held).find(|&&t| t >= tokens) {
        return Err(FipsError::IndexOutOfRange {
            what: "split calibration token",
            index: bad,
            len: tokens,
        });
    }
    // Block by block, each block dropped once split: no second copy of the whole set.
    let split = |arrays: Vec<Array2<F>>| {
        let (mut a, mut b) = (
            Vec::with_capacity(arrays.len()),
            Vec::with_capacity(arrays.len()),
        );
        for z in arrays {
            a.push(z.select(Axis(0), kept));
            b.push(z.select(Axis(0), held));
        }
        (a, b)
    };
    let (inputs, targets) = calibration.into_parts();
    let (train_inputs, held_inputs) = split(inputs);
    let mut train = Calibration::new(train_inputs)?;
    let mut validation = Calibration::new(held_inputs)?;
    if let Some(targets) = targets {
        let (train_targets, held_targets) = split(targets);
        train = train.with_targets(train_targets)?;
        validation = validation.with_targets(held_targets)?;
    }
    Ok((train, validation))
}

/// Splits any calibration reader by tokens without reading a row: `(training, validation)` are
/// the kept and the held-out token positions of the same seeded [`holdout`] as
/// [`split_tokens`], in the same (ascending) order, so training on the first and validating on
/// the second gives the bits of [`split_tokens`] on the whole set — with a reader of an
/// MLP-input file, neither part is ever held whole.
pub fn split_reader<'a, F: Float>(
    calibration: &'a dyn CalibrationReader<F>,
    fraction: f64,
    seed: u64,
) -> Result<(RowSubset<'a, F>, RowSubset<'a, F>)> {
    let (kept, held) = holdout(calibration.tokens(), fraction, seed)?;
    Ok((
        RowSubset::new(calibration, kept)?,
        RowSubset::new(calibration, held)?,
    ))
}

/// Held-out inputs of every block of a group and the original blocks' outputs on them.
#[derive(Debug, Clone)]
pub struct ValidationSet<F> {
    inputs: Vec<Array2<F>>,
    targets: Vec<Array2<F>>,
}

impl<F: Float> ValidationSet<F> {
    /// The validation set of `blocks` on `inputs` (one `[tokens, d]` array per block), measured
    /// against the inputs' explicit targets if they have them.
    pub fn new(blocks: &[DenseMlp<F>], inputs: &Calibration<F>) -> Result<Self> {
        let targets = inputs.targets().map(<[Array2<F>]>::to_vec);
        Self::from_parts(blocks, inputs.inputs().to_vec(), targets)
    }

    /// [`Self::new`] on inputs read from `inputs` (e.g. the held-out part of
    /// [`split_reader`]): the set is held in memory, `2 n T_val d` values for `T_val` held-out
    /// tokens (the inputs and their targets), and the rows read are moved in, not copied.
    pub fn from_reader(blocks: &[DenseMlp<F>], inputs: &dyn CalibrationReader<F>) -> Result<Self> {
        match read_whole(inputs)? {
            Cow::Borrowed(calibration) => Self::new(blocks, calibration),
            Cow::Owned(calibration) => {
                let (inputs, targets) = calibration.into_parts();
                Self::from_parts(blocks, inputs, targets)
            }
        }
    }

    /// The set of `blocks` on `inputs` (checked `[tokens, d]` arrays, one per block), with the
    /// given targets (checked against the inputs by [`Calibration::with_targets`]) or else
    /// `Y_b = MLP_b(Z_b)`.
    fn from_parts(
        blocks: &[DenseMlp<F>],
        inputs: Vec<Array2<F>>,
        targets: Option<Vec<Array2<F>>>,
    ) -> Result<Self> {
        if blocks.len() != inputs.len() {
            return Err(FipsError::ShapeMismatch {
                what: "validation inputs (one array per block)".into(),
                expected: vec![blocks.len()],
                got: vec![inputs.len()],
            });
        }
        let targets = match targets {
            Some(targets) => targets,
            None => blocks
                .iter()
                .zip(&inputs)
                .map(|(mlp, z)| mlp.forward(z.view()))
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(Self { inputs, targets })
    }

    /// Blocks.
    pub fn blocks(&self) -> usize {
        self.inputs.len()
    }

    /// Model width `d` (`None` without blocks).
    pub fn width(&self) -> Option<usize> {
        self.inputs.first().map(|z| z.ncols())
    }

    /// Tokens per block.
    pub fn tokens(&self) -> usize {
        self.inputs.first().map_or(0, |z| z.nrows())
    }

    /// `‖Ŷ − Y‖ / ‖Y‖` over every block of `blocks` (a compressed group rebuilt dense, e.g. by
    /// `SharedBasisGroup::to_dense_mlps`).
    pub fn relative_error(&self, blocks: &[DenseMlp<F>]) -> Result<f64> {
        self.errors(blocks).map(|(overall, _)| overall)
    }

    /// `(√(Σ_b ‖Ŷ_b − Y_b‖² / Σ_b ‖Y_b‖²), [‖Ŷ_b − Y_b‖ / ‖Y_b‖ per block])`: the overall and
    /// the per-block relative errors of `blocks` on the held-out inputs.
    pub fn errors(&self, blocks: &[DenseMlp<F>]) -> Result<(f64, Vec<f64>)> {
        if blocks.len() != self.inputs.len() {
            return Err(FipsError::ShapeMismatch {
                what: "compressed group (blocks)".into(),
                expected: vec![self.inputs.len()],
                got: vec![blocks.len()],
            });
        }
        self.errors_with(|b, z, y| squared_error_chunked(&blocks[b], z, y))
    }

    /// [`Self::relative_error`] with one dense block at a time: `rebuild(b)` gives block `b`,
    /// dropped once measured (at most one block's dense weights exist at once).
    pub(crate) fn relative_error_one_at_a_time(
        &self,
        mut rebuild: impl FnMut(usize) -> Result<DenseMlp<F>>,
    ) -> Result<f64> {
        self.errors_with(|b, z, y| squared_error_chunked(&rebuild(b)?, z, y))
            .map(|(overall, _)| overall)
    }

    /// The errors from `squared(b, z_b, y_b) = (‖Ŷ_b − Y_b‖², ‖Y_b‖²)` of every block.
    fn errors_with(
        &self,
        mut squared: impl FnMut(usize, &Array2<F>, &Array2<F>) -> Result<(f64, f64)>,
    ) -> Result<(f64, Vec<f64>)> {
        let relative = |e: f64, n: f64| if n > 0.0 { (e / n).sqrt() } else { e.sqrt() };
        let (mut error2, mut norm2) = (0.0f64, 0.0f64);
        let mut per_block = Vec::with_capacity(self.inputs.len());
        for (b, (z, y)) in self.inputs.iter().zip(&self.targets).enumerate() {
            let (e, n) = squared(b, z, y)?;
            per_block.push(relative(e, n));
            error2 += e;
            norm2 += n;
        }
        Ok((relative(error2, norm2), per_block))
    }
}

/// Early stopping of a training run on its validation error: every `interval` steps the run's
/// current state is scored on the held-out tokens and the run stops once [`EarlyStop`] says so
/// (the best error improved by less than the relative `tolerance` over the last `patience`
/// steps).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EarlyStopping {
    /// Steps without enough improvement before stopping.
    pub patience: usize,
    /// Relative improvement that counts (0: any improvement).
    pub tolerance: f64,
    /// Steps between validation scores.
    pub interval: usize,
}

impl EarlyStopping {
    /// Scores every `max(1, patience / 4)` steps and stops on no improvement at all over
    /// `patience` steps.
    pub fn new(patience: usize) -> Self {
        Self {
            patience,
            tolerance: 0.0,
            interval: (patience / 4).max(1),
        }
    }

    /// The same with a relative tolerance.
    pub fn tolerance(self, tolerance: f64) -> Self {
        Self { tolerance, ..self }
    }

    /// Validates the settings: `patience ≥ 1`, `tolerance ∈ [0, 1)`, `1 ≤ interval ≤ patience`.
    pub fn check(&self) -> Result<EarlyStop> {
        if self.interval == 0 || self.interval > self.patience.max(1) {
            return Err(invalid(
                "early stop interval",
                format!(
                    "must be between 1 and the patience ({}), got {}",
                    self.patience, self.interval
                ),
            ));
        }
        EarlyStop::new(self.patience, self.tolerance)
    }
}

/// Early stopping on the validation error: stop once the best error has improved by less than
/// the relative `tolerance` (or not at all) over the last `patience` steps (scored steps need not be evenly
/// spaced; a decision needs a score at least `patience` steps old).
#[derive(Debug, Clone)]
pub struct EarlyStop {
    patience: usize,
    tolerance: f64,
    /// `(step, best error up to and including that step)`, in step order.
    best: Vec<(usize, f64)>,
}

impl EarlyStop {
    /// Stops when `best(now) ≥ (1 − tolerance) · best(now − patience)` (with tolerance 0: when
    /// the best error has not improved at all in `patience` steps).
    ///
    /// Errors: `patience` 0 or `tolerance` outside `[0, 1)`.
    pub fn new(patience: usize, tolerance: f64) -> Result<Self> {
        if patience == 0 {
            return Err(invalid("early stop patience", "must be at least 1 step"));
        }
        if !(0.0..1.0).contains(&tolerance) {
            return Err(invalid(
                "early stop tolerance",
                format!("must be in [0, 1), got {tolerance}"),
            ));
        }
        Ok(Self {
            patience,
            tolerance,
            best: Vec::new(),
        })
    }

    /// Records the validation error after `step` steps; `true` means stop now.
    pub fn observe(&mut self, step: usize, error: f64) -> bool {
        let best = self
            .best
            .last()
            .map_or(error, |&(_, b)| if error < b { error } else { b });
        self.best.push((step, best));
        let Some(horizon) = step.checked_sub(self.patience) else {
            return false;
        };
        // The best error as of `patience` steps ago (the latest score at or before it).
        match self.best.iter().rev().find(|&&(s, _)| s <= horizon) {
            Some(&(_, then)) => best >= (1.0 - self.tolerance) * then,
            None => false,
        }
    }

    /// The lowest error observed so far.
    pub fn best(&self) -> Option<f64> {
        self.best.last().map(|&(_, b)| b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, StandardNormal};

    #[test]
    fn holdout_is_seeded_disjoint_and_complete() {
        let (kept, held) = holdout(250, 0.05, 7).unwrap();
        assert_eq!(held.len(), 13);
        assert_eq!(kept.len() + held.len(), 250);
        let mut all: Vec<usize> = kept.iter().chain(&held).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..250).collect::<Vec<_>>());
        assert_eq!(holdout(250, 0.05, 7).unwrap().1, held);
        assert_ne!(holdout(250, 0.05, 8).unwrap().1, held);
        assert_eq!(holdout(3, 0.01, 0).unwrap().1.len(), 1);
        assert_eq!(holdout(3, 0.99, 0).unwrap().1.len(), 2);
        assert!(holdout(1, 0.5, 0).is_err());
        assert!(holdout(10, 0.0, 0).is_err());
        assert!(holdout(10, 1.0, 0).is_err());
    }

    /// Whole runs are held out together, the runs drawn as `holdout` draws items, and a length
    /// that is not whole runs is refused.
    #[test]
    fn holdout_runs_keeps_every_run_whole() {
        let (run, runs) = (197, 250);
        let (kept, held) = holdout_runs(run * runs, run, 0.05, 7).unwrap();
        let (_, held_runs) = holdout(runs, 0.05, 7).unwrap();
        assert_eq!(held.len(), 13 * run);
        assert_eq!(kept.len() + held.len(), run * runs);
        for r in 0..runs {
            let in_held = held.iter().filter(|&&t| t / run == r).count();
            let in_kept = kept.iter().filter(|&&t| t / run == r).count();
            assert!(
                (in_held, in_kept) == (run, 0) || (in_held, in_kept) == (0, run),
                "run {r} split: {in_held} held, {in_kept} kept"
            );
            assert_eq!(in_held == run, held_runs.contains(&r));
        }
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        assert!(held.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            holdout_runs(50, 1, 0.2, 3).unwrap(),
            holdout(50, 0.2, 3).unwrap()
        );
        assert!(holdout_runs(10, 3, 0.2, 0).is_err());
        assert!(holdout_runs(10, 0, 0.2, 0).is_err());
        assert!(holdout_runs(5, 5, 0.2, 0).is_err());
    }

    #[test]
    fn early_stop_waits_for_patience_and_compares_bests() {
        // The defaults' group-0 validation curve (docs/results.md), every 100 steps.
        let curve = [
            (100, 0.1587),
            (200, 0.1446),
            (300, 0.1357),
            (400, 0.1287),
            (500, 0.1242),
            (600, 0.1222),
            (700, 0.1215),
            (800, 0.1212),
            (900, 0.1212),
        ];
        let mut stop = EarlyStop::new(100, 0.003).unwrap();
        let first = curve
            .iter()
            .find(|&&(s, e)| stop.observe(s, e))
            .map(|&(s, _)| s);
        // 0.1212 > 0.997 · 0.1215 at step 800: the first step with < 0.3 % gain in 100 steps.
        assert_eq!(first, Some(800));
        assert_eq!(stop.best(), Some(0.1212));
        // A worse score does not reset the best; no decision before `patience` steps of history.
        let mut stop = EarlyStop::new(50, 0.01).unwrap();
        assert!(!stop.observe(25, 1.0));
        assert!(!stop.observe(50, 0.5));
        assert!(
            !stop.observe(75, 2.0),
            "best 0.5 vs 1.0 at step 25: improving"
        );
        assert!(stop.observe(100, 0.499), "0.499 vs 0.5 at step 50: < 1 %");
        assert!(EarlyStop::new(0, 0.1).is_err());
        assert!(EarlyStop::new(10, 1.0).is_err());
    }

    /// Split positions past the set are a typed error, not a panic in `select`.
    #[test]
    fn split_positions_past_the_set_are_an_error() {
        let cal = Calibration::new(vec![Array2::<f64>::zeros((4, 2))]).unwrap();
        assert!(matches!(
            split_tokens_at(cal.clone(), &[0, 1], &[4]),
            Err(FipsError::IndexOutOfRange {
                index: 4,
                len: 4,
                ..
            })
        ));
        let (train, held) = split_tokens_at(cal, &[0, 3], &[1]).unwrap();
        assert_eq!((train.tokens(), held.tokens()), (2, 1));
    }

    #[test]
    fn token_split_keeps_rows_aligned_across_blocks() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let z: Array2<f64> =
            Array2::from_shape_simple_fn((50, 3), || StandardNormal.sample(&mut rng));
        let calibration = Calibration::new(vec![z.clone(), z.mapv(|x| 2.0 * x)]).unwrap();
        let (train, val) = split_tokens(calibration.clone(), 0.2, 4).unwrap();
        assert_eq!((train.tokens(), val.tokens()), (40, 10));
        assert_eq!(val.inputs()[1], val.inputs()[0].mapv(|x| 2.0 * x));
        let (_, held) = holdout(50, 0.2, 4).unwrap();
        assert_eq!(val.inputs()[0].row(0), z.row(held[0]));
        // The reader split takes the same rows, in the same order.
        let (train_rows, val_rows) = split_reader(&calibration, 0.2, 4).unwrap();
        for b in 0..2 {
            assert_eq!(train_rows.rows(b, 0, 40).unwrap(), train.inputs()[b]);
            assert_eq!(val_rows.rows(b, 0, 10).unwrap(), val.inputs()[b]);
        }
        let blocks = [crate::foundation::mlp::DenseMlp::standard(
            crate::foundation::mlp::Linear::new(Array2::eye(3), None).unwrap(),
            crate::foundation::mlp::Linear::new(Array2::eye(3), None).unwrap(),
            crate::foundation::activation::Activation::Relu,
        )
        .unwrap()];
        let one = Calibration::new(vec![z.clone()]).unwrap();
        let (_, one_val) = split_tokens(one.clone(), 0.2, 4).unwrap();
        let (_, one_rows) = split_reader(&one, 0.2, 4).unwrap();
        let a = ValidationSet::new(&blocks, &one_val).unwrap();
        let b = ValidationSet::from_reader(&blocks, &one_rows).unwrap();
        assert_eq!((a.inputs, a.targets), (b.inputs, b.targets));
        assert!(split_reader(&one, 1.0, 4).is_err());
    }

    /// A split keeps explicit targets aligned with their inputs, the validation set measures
    /// against them, and the reader split (inputs only) refuses them.
    #[test]
    fn token_split_carries_explicit_targets() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let z: Array2<f64> =
            Array2::from_shape_simple_fn((40, 3), || StandardNormal.sample(&mut rng));
        let y = z.mapv(|x| x * x - 1.0);
        let calibration = Calibration::new(vec![z.clone()])
            .unwrap()
            .with_targets(vec![y.clone()])
            .unwrap();
        let (train, val) = split_tokens(calibration.clone(), 0.25, 9).unwrap();
        let (kept, held) = holdout(40, 0.25, 9).unwrap();
        assert_eq!(train.targets().unwrap()[0], y.select(Axis(0), &kept));
        assert_eq!(val.targets().unwrap()[0], y.select(Axis(0), &held));
        assert_eq!(val.inputs()[0], z.select(Axis(0), &held));
        let identity = [crate::foundation::mlp::DenseMlp::standard(
            crate::foundation::mlp::Linear::new(Array2::eye(3), None).unwrap(),
            crate::foundation::mlp::Linear::new(Array2::eye(3), None).unwrap(),
            crate::foundation::activation::Activation::Relu,
        )
        .unwrap()];
        let set = ValidationSet::new(&identity, &val).unwrap();
        assert_eq!(set.targets[0], y.select(Axis(0), &held));
        // The identity-ReLU block's error against the given targets, not against its own output.
        assert!(set.relative_error(&identity).unwrap() > 0.1);
        assert!(matches!(
            split_reader(&calibration, 0.25, 9),
            Err(FipsError::InvalidParameter {
                name: "targets",
                ..
            })
        ));
    }
}
