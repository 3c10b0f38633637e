//! Sparsity of the factors `V`: global magnitude pruning schedules (GMP) and dynamic sparse
//! training (RigL).
//!
//! Masks are global over a group: every decision ranks all entries of all the group's factors
//! together, by `|V|` for pruning and by `|∂L/∂V|` (the dense gradient with respect to the masked
//! factor) for RigL's regrowth. Ties are broken by position, so decisions are deterministic.

use std::fmt;

use ndarray::ArrayView2;

use crate::foundation::error::{FipsError, Result, invalid};
use crate::foundation::float::Float;
use crate::foundation::kernels::RowSplit;
use crate::math::bitmask::BitMask;
use crate::math::budget::nonzeros_for_sparsity;
use crate::math::optim::{AdamWStep, KeptEntries, KeptLayout};
use crate::math::select::kth_smallest;
use crate::math::tiles::{BestTiles, TileGrid};

/// Gradual magnitude pruning on an accelerated cubic schedule.
///
/// With `T` training steps, `t_a = ⌊start_fraction · T⌋` and `t_e = ⌊end_fraction · T⌋`, the
/// factors are pruned to `initial_sparsity` before training, then at every step `t` that is a
/// multiple of `interval` in `[t_a, t_e]`, and at `t_e` itself, to
///
/// ```text
/// s(t) = s + (s_a − s) (1 − (t − t_a) / (t_e − t_a))³
/// ```
///
/// where `s_a` is `accelerated_sparsity` and `s` the target. Pruning is monotone: only active
/// entries are removed. The reference implementation divides by `t_e` instead of `t_e − t_a`, so
/// it never reaches `s` (it ends at 0.71–0.75 for a 0.75 target); this schedule ends at exactly
/// `s` at `t_e`. `initial_sparsity` and `accelerated_sparsity` are capped at the target.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GmpSchedule {
    /// Sparsity applied before training (default 0.05).
    pub initial_sparsity: f64,
    /// Sparsity at `t_a`, where the cubic ramp starts (default 0.5).
    pub accelerated_sparsity: f64,
    /// `t_a / T` (default 0.25).
    pub start_fraction: f64,
    /// `t_e / T`, where the target is reached (default 0.75).
    pub end_fraction: f64,
    /// Steps between pruning events, Δt (default 50).
    pub interval: usize,
}

impl Default for GmpSchedule {
    fn default() -> Self {
        Self {
            initial_sparsity: 0.05,
            accelerated_sparsity: 0.5,
            start_fraction: 0.25,
            end_fraction: 0.75,
            interval: 50,
        }
    }
}

/// RigL: prune to the target before training, then every `interval` steps until
/// `⌊end_fraction · T⌋` drop the fraction `f_t = α/2 (1 + cos(π t / t_e))` of the active entries
/// with the smallest `|V|` and regrow as many inactive entries with the largest `|∂L/∂V|`.
///
/// Regrown entries that were inactive before the update start at zero with fresh Adam moments (the
/// reference code means to do this but keeps their stale values); an entry dropped and regrown
/// in the same update keeps its value.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RiglSchedule {
    /// Initial drop fraction α (default 0.05).
    pub drop_fraction: f64,
    /// Steps between updates, Δt (default 50).
    pub interval: usize,
    /// `t_e / T`, the last update (default 0.75).
    pub end_fraction: f64,
}

impl Default for RiglSchedule {
    fn default() -> Self {
        Self {
            drop_fraction: 0.05,
            interval: 50,
            end_fraction: 0.75,
        }
    }
}

/// How the factors reach their sparsity.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Sparsifier {
    /// Dense factors: only valid with sparsity 0 (pure shared low rank, "basis sharing" without
    /// whitening).
    None,
    /// Gradual magnitude pruning.
    Gmp(GmpSchedule),
    /// RigL dynamic sparse training (the reference DeiT setting and the default).
    Rigl(RiglSchedule),
}

impl Default for Sparsifier {
    fn default() -> Self {
        Self::Rigl(RiglSchedule::default())
    }
}

impl fmt::Display for Sparsifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Gmp(_) => "gmp",
            Self::Rigl(_) => "rigl",
        })
    }
}

fn check_fraction(name: &'static str, x: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&x) {
        return Err(invalid(name, format!("must be in [0, 1], got {x}")));
    }
    Ok(())
}

impl Sparsifier {
    /// This sparsifier with RigL's initial drop fraction set to `drop_fraction` (any other
    /// sparsifier unchanged).
    pub fn with_rigl_drop_fraction(self, drop_fraction: f64) -> Self {
        match self {
            Self::Rigl(r) => Self::Rigl(RiglSchedule { drop_fraction, ..r }),
            other => other,
        }
    }

    /// Validates the schedule against the target sparsity `s`.
    pub(crate) fn check(&self, sparsity: f64) -> Result<()> {
        match self {
            Self::None if sparsity > 0.0 => Err(invalid(
                "sparsifier",
                format!("sparsity {sparsity} needs a sparsifier (gmp or rigl), not none"),
            )),
            Self::None => Ok(()),
            Self::Gmp(g) => {
                if !(0.0..1.0).contains(&g.initial_sparsity) {
                    return Err(invalid(
                        "gmp.initial_sparsity",
                        format!("must be in [0, 1), got {}", g.initial_sparsity),
                    ));
                }
                if !(g.initial_sparsity..1.0).contains(&g.accelerated_sparsity) {
                    return Err(invalid(
                        "gmp.accelerated_sparsity",
                        format!(
                            "must be in [initial_sparsity = {}, 1), got {}",
                            g.initial_sparsity, g.accelerated_sparsity
                        ),
                    ));
                }
                check_fraction("gmp.start_fraction", g.start_fraction)?;
                check_fraction("gmp.end_fraction", g.end_fraction)?;
                if g.start_fraction > g.end_fraction {
                    return Err(invalid(
                        "gmp.start_fraction",
                        format!(
                            "must not exceed end_fraction = {}, got {}",
                            g.end_fraction, g.start_fraction
                        ),
                    ));
                }
                if g.interval == 0 {
                    return Err(invalid("gmp.interval", "must be at least 1"));
                }
                Ok(())
            }
            Self::Rigl(r) => {
                if !(r.drop_fraction > 0.0 && r.drop_fraction < 1.0) {
                    return Err(invalid(
                        "rigl.drop_fraction",
                        format!("must be in (0, 1), got {}", r.drop_fraction),
                    ));
                }
                check_fraction("rigl.end_fraction", r.end_fraction)?;
                if r.interval == 0 {
                    return Err(invalid("rigl.interval", "must be at least 1"));
                }
                Ok(())
            }
        }
    }
}

/// Applies a [`Sparsifier`] to a group's concatenated factor over a training run.
///
/// Selections need no buffer of the size of the factor: the entry at the boundary of a selection
/// is found by [`kth_smallest`] (a radix selection over the bit patterns of the magnitudes), and
/// one pass then applies it. The Adam moments of the kept entries ([`KeptEntries`]), when given,
/// follow every change of the mask: kept entries keep theirs, entries joining start at zero.
///
/// With tiles ([`Self::tiled`]) every selection ranks whole 2×2 tiles by the sum of their
/// entries' scores (one score per tile, `E/4` values, held during the selection) and keeps whole
/// tiles: see [`TileGrid::drop_to`] and [`BestTiles`].
#[derive(Debug)]
pub(crate) struct MaskSchedule {
    sparsifier: Sparsifier,
    target: f64,
    total_entries: usize,
    tiles: Option<TileGrid>,
    /// `t_a` and `t_e` in steps.
    start_step: usize,
    end_step: usize,
    nnz: usize,
}

impl MaskSchedule {
    /// A schedule for `total_entries` entries, target sparsity `target`, over `total_steps` steps.
    pub(crate) fn new(
        sparsifier: Sparsifier,
        target: f64,
        total_entries: usize,
        total_steps: usize,
    ) -> Self {
        let (start, end) = match sparsifier {
            Sparsifier::None => (0, 0),
            Sparsifier::Gmp(g) => (
                (g.start_fraction * total_steps as f64).floor() as usize,
                (g.end_fraction * total_steps as f64).floor() as usize,
            ),
            Sparsifier::Rigl(r) => (0, (r.end_fraction * total_steps as f64).floor() as usize),
        };
        Self {
            sparsifier: if target > 0.0 {
                sparsifier
            } else {
                Sparsifier::None
            },
            target,
            total_entries,
            tiles: None,
            start_step: start,
            end_step: end,
            nnz: total_entries,
        }
    }

    /// The schedule keeping and dropping the entries of `tiles` together (`None`: entry-wise);
    /// the grid covers `total_entries`.
    pub(crate) fn tiled(mut self, tiles: Option<TileGrid>) -> Self {
        debug_assert!(tiles.is_none_or(|g| g.entries() == self.total_entries));
        self.tiles = tiles.filter(|g| g.entries() == self.total_entries);
        self
    }

    /// Sets the kept count from the mask after a mask update (a RigL update of tiles may change
    /// it by up to 3 entries; an entry-wise update leaves the count it planned).
    pub(crate) fn recount(&mut self, mask: &BitMask) {
        self.nnz = mask.count();
    }

    /// Whether the factors carry a mask at all.
    pub(crate) fn is_sparse(&self) -> bool {
        !matches!(self.sparsifier, Sparsifier::None)
    }

    /// Current kept entries.
    #[cfg(test)]
    pub(crate) fn nnz(&self) -> usize {
        self.nnz
    }

    /// Current sparsity.
    pub(crate) fn sparsity(&self) -> f64 {
        1.0 - self.nnz as f64 / self.total_entries as f64
    }

    /// Nonzeros at the target sparsity.
    pub(crate) fn target_nnz(&self) -> usize {
        nonzeros_for_sparsity(self.total_entries, self.target)
    }

    /// The sparsity the factors start training at.
    pub(crate) fn initial_sparsity(&self) -> f64 {
        match self.sparsifier {
            Sparsifier::None => 0.0,
            Sparsifier::Gmp(g) if self.end_step > 0 => g.initial_sparsity.min(self.target),
            Sparsifier::Gmp(_) | Sparsifier::Rigl(_) => self.target,
        }
    }

    /// GMP's scheduled sparsity at step `t` (1-based), if `t` is a pruning step.
    pub(crate) fn gmp_sparsity_at(&self, t: usize) -> Option<f64> {
        let Sparsifier::Gmp(g) = self.sparsifier else {
            return None;
        };
        let (ta, te) = (self.start_step, self.end_step);
        let due = t == te || (t.is_multiple_of(g.interval) && t >= ta && t < te);
        if !due || t < ta || t > te || te == 0 {
            return None;
        }
        let s_a = g.accelerated_sparsity.min(self.target);
        if te == ta {
            return Some(self.target);
        }
        let remaining = 1.0 - (t - ta) as f64 / (te - ta) as f64;
        Some(self.target + (s_a - self.target) * remaining.powi(3))
    }

    /// RigL's drop fraction at step `t` (1-based), if `t` is an update step.
    pub(crate) fn rigl_drop_fraction_at(&self, t: usize) -> Option<f64> {
        let Sparsifier::Rigl(r) = self.sparsifier else {
            return None;
        };
        if t == 0 || t > self.end_step || !t.is_multiple_of(r.interval) {
            return None;
        }
        let cos = (std::f64::consts::PI * t as f64 / self.end_step as f64).cos();
        Some(r.drop_fraction / 2.0 * (1.0 + cos))
    }

    /// Prunes the fresh factors to the initial sparsity.
    pub(crate) fn prepare<F: Float>(&mut self, values: &mut [F], mask: &mut [bool]) {
        mask.fill(true);
        self.nnz = values.len();
        if self.is_sparse() {
            let keep = nonzeros_for_sparsity(self.total_entries, self.initial_sparsity());
            if let Some(grid) = self.tiles {
                drop_dense_tiles(&grid, values, mask, keep);
                for (v, &m) in values.iter_mut().zip(mask.iter()) {
                    if !m {
                        *v = F::zero();
                    }
                }
                self.nnz = mask.iter().filter(|&&m| m).count();
                return;
            }
            self.prune_to(values, mask, keep, None);
        }
    }

    /// The mask the fresh factors `values` would have at the target sparsity, leaving `values`
    /// as they are (values outside the returned mask are the ones pruning would zero).
    pub(crate) fn target_mask<F: Float>(&self, values: &[F]) -> Vec<bool> {
        let mut mask = vec![true; values.len()];
        if self.is_sparse() {
            let keep = self.target_nnz();
            if let Some(grid) = self.tiles {
                drop_dense_tiles(&grid, values, &mut mask, keep);
            } else {
                select_and_drop(values, &mut mask, values.len(), keep, None);
            }
        }
        mask
    }

    /// A copy of `mask` pruned to the target sparsity by the magnitudes of its kept values
    /// `values` (row-major order of `mask`; as [`Self::finish`] would prune), leaving both as they
    /// are.
    pub(crate) fn pruned_mask<F: Float>(&self, values: &[F], mask: &BitMask) -> BitMask {
        let mut pruned = mask.clone();
        if let Some(grid) = self.tiles.filter(|_| self.is_sparse()) {
            if let Some((dropped, _)) = drop_kept_tiles(&grid, values, mask, self.target_nnz()) {
                for k in mask.ones() {
                    if dropped.get(grid.tile_of(k)) {
                        pruned.set(k, false);
                    }
                }
            }
        } else if self.is_sparse()
            && let Some(at) = drop_boundary(values, self.target_nnz())
        {
            for ((i, x), k) in values.iter().enumerate().zip(mask.ones()) {
                if drops(at, i, *x) {
                    pruned.set(k, false);
                }
            }
        }
        pruned
    }

    /// The sparsifier's work at step `t` (1-based), before the optimiser step. `grad` is the dense
    /// gradient with respect to the masked factor; `moments`, the kept entries' Adam moments,
    /// follow the mask. Returns whether the mask changed. (The trainer never holds the dense
    /// gradient: it runs [`Self::begin_step`] and [`StepPlan`]; this form is the tests' reference.)
    #[cfg(test)]
    pub(crate) fn step<F: Float>(
        &mut self,
        t: usize,
        values: &mut [F],
        mask: &mut [bool],
        grad: &[F],
        moments: Option<&mut KeptEntries<F>>,
    ) -> bool {
        if let Some(grid) = self.tiles {
            return self.tiled_step(&grid, t, values, mask, grad, moments);
        }
        if let Some(s) = self.gmp_sparsity_at(t) {
            let keep = nonzeros_for_sparsity(self.total_entries, s);
            return self.prune_to(values, mask, keep, moments);
        }
        if let Some(fraction) = self.rigl_drop_fraction_at(t) {
            let count = (fraction * self.nnz as f64).round() as usize;
            return self.drop_and_grow(values, mask, grad, count, moments);
        }
        false
    }

    /// The sparsifier's work at step `t` (1-based) when `V` is held as its kept entries
    /// (`entries`, values and moments, row-major order of `mask`) and its gradient arrives one
    /// matrix at a time during the step ([`StepPlan`]), with the same outcome, bit for bit, as
    /// [`Self::step`] on the dense gradient followed by the optimiser's update. Called before the
    /// step's loss, it changes nothing: the loss is computed with every kept value. GMP's pruning
    /// selects the entries to drop now (by their values before the update: the `(|v|, position)`
    /// boundary) and drops them as each matrix is updated; RigL selects the entries to drop now
    /// and what to regrow once every gradient was seen ([`StepPlan::finish`]).
    pub(crate) fn begin_step<F: Float>(
        &mut self,
        t: usize,
        entries: &KeptEntries<F>,
        mask: &BitMask,
    ) -> StepPlan<F> {
        if let Some(grid) = self.tiles {
            return self.begin_tiled_step(&grid, t, entries, mask);
        }
        let values = entries.values();
        let active = values.len();
        if let Some(s) = self.gmp_sparsity_at(t) {
            let keep = nonzeros_for_sparsity(self.total_entries, s);
            self.nnz = active.min(keep);
            return match drop_boundary(values, keep) {
                Some(at) => StepPlan::Prune(at),
                None => StepPlan::Unchanged,
            };
        }
        let Some(count) = self.rigl_count(t, active, mask) else {
            return StepPlan::Unchanged;
        };
        let Some(drop_at) = drop_boundary(values, active - count) else {
            return StepPlan::Unchanged;
        };
        let dropped: Vec<u32> = values
            .iter()
            .enumerate()
            .zip(mask.ones())
            .filter(|((i, x), _)| drops(drop_at, *i, **x))
            .map(|(_, k)| k as u32)
            .collect();
        StepPlan::Regrow(Regrowth {
            active,
            dropped_gradients: vec![F::zero(); dropped.len()],
            dropped,
            best: Best::Entries(BestScores::new(count)),
        })
    }

    /// RigL's count of entries to drop at step `t` from `active` kept ones, if `t` is an update
    /// step that drops any (positions and tiles are kept as `u32`: the trainer refuses larger
    /// factors).
    fn rigl_count(&self, t: usize, active: usize, mask: &BitMask) -> Option<usize> {
        let fraction = self.rigl_drop_fraction_at(t)?;
        let count = ((fraction * self.nnz as f64).round() as usize).min(active);
        (count > 0 && u32::try_from(mask.len()).is_ok()).then_some(count)
    }

    /// [`Self::begin_step`] with tiles: GMP drops the kept tiles of smallest `Σ |v|` down to the
    /// scheduled count; RigL drops the kept tiles of smallest `Σ |v|` holding the update's count
    /// (up to 3 entries more), and regrows, as whole tiles of largest `Σ |∂L/∂V|` among the
    /// inactive and dropped ones, as many entries as bring the count back to at most the target
    /// (the same number of entries when all tiles are 2×2 and the count is at the target).
    fn begin_tiled_step<F: Float>(
        &mut self,
        grid: &TileGrid,
        t: usize,
        entries: &KeptEntries<F>,
        mask: &BitMask,
    ) -> StepPlan<F> {
        let values = entries.values();
        let active = values.len();
        if let Some(s) = self.gmp_sparsity_at(t) {
            let keep = nonzeros_for_sparsity(self.total_entries, s);
            return match drop_kept_tiles(grid, values, mask, keep) {
                Some((dropped, weight)) => {
                    self.nnz = active - weight;
                    StepPlan::PruneTiles(*grid, dropped)
                }
                None => StepPlan::Unchanged,
            };
        }
        let Some(count) = self.rigl_count(t, active, mask) else {
            return StepPlan::Unchanged;
        };
        let Some((tiles, weight)) = drop_kept_tiles(grid, values, mask, active - count) else {
            return StepPlan::Unchanged;
        };
        let dropped: Vec<u32> = mask
            .ones()
            .filter(|&k| tiles.get(grid.tile_of(k)))
            .map(|k| k as u32)
            .collect();
        let budget = self
            .target_nnz()
            .max(active)
            .saturating_sub(active - weight);
        StepPlan::Regrow(Regrowth {
            active,
            dropped_gradients: vec![F::zero(); dropped.len()],
            dropped,
            best: Best::Tiles(BestTiles::new(*grid, budget)),
        })
    }

    /// Ensures the final sparsity equals the target (after an early stop, or a schedule that had
    /// no pruning step left): keeps the target's count of kept entries (`entries`, with values,
    /// row-major order of `mask`) of largest `|v|` (with tiles: the whole tiles of largest `Σ |v|`,
    /// up to 3 entries short of the target).
    pub(crate) fn finish<F: Float>(&mut self, entries: &mut KeptEntries<F>, mask: &mut BitMask) {
        if !self.is_sparse() {
            return;
        }
        let keep = self.target_nnz();
        self.nnz = entries.len().min(keep);
        if let Some(grid) = self.tiles {
            if let Some((dropped, weight)) = drop_kept_tiles(&grid, entries.values(), mask, keep) {
                self.nnz = entries.len() - weight;
                entries.retain(mask, |_, k, _| !dropped.get(grid.tile_of(k)));
                entries.release_unused();
            }
            return;
        }
        if let Some(at) = drop_boundary(entries.values(), keep) {
            entries.retain(mask, |i, _, x| !drops(at, i, x));
            entries.release_unused();
        }
    }

    /// [`Self::step`] with tiles, on the dense gradient: the reference of the streamed tiled
    /// update ([`Self::begin_step`], [`StepPlan`]). Growth sorts the candidate tiles (an
    /// independent check of [`BestTiles`]).
    #[cfg(test)]
    fn tiled_step<F: Float>(
        &mut self,
        grid: &TileGrid,
        t: usize,
        values: &mut [F],
        mask: &mut [bool],
        grad: &[F],
        moments: Option<&mut KeptEntries<F>>,
    ) -> bool {
        let len = values.len();
        let active = mask.iter().filter(|&&m| m).count();
        let kept_tile = |mask: &[bool], t: usize| grid.kept_by(t, |k| mask[k]);
        let value_scores =
            |mask: &[bool]| grid.scores((0..len).filter(|&k| mask[k]).map(|k| (k, values[k])));
        let (keep, count) = if let Some(s) = self.gmp_sparsity_at(t) {
            (nonzeros_for_sparsity(self.total_entries, s), None)
        } else if let Some(fraction) = self.rigl_drop_fraction_at(t) {
            let count = ((fraction * self.nnz as f64).round() as usize).min(active);
            if count == 0 {
                return false;
            }
            (active - count, Some(count))
        } else {
            return false;
        };
        let scores = value_scores(mask);
        let Some((dropped, weight)) = grid.drop_to(&scores, |t| kept_tile(mask, t), keep) else {
            return false;
        };
        // Growth (RigL): the candidate tiles by (largest Σ |g|, lower tile), as many whole tiles
        // as fit in the budget.
        let mut grown = BitMask::zeros(grid.len());
        if count.is_some() {
            let budget = self.target_nnz().max(active) - (active - weight);
            let gradients = grid.scores((0..len).map(|k| (k, grad[k])));
            let mut candidates: Vec<usize> = (0..grid.len())
                .filter(|&t| !kept_tile(mask, t) || dropped.get(t))
                .collect();
            let flip = u64::MAX >> (64 - F::KEY_BITS);
            candidates.sort_by_key(|&t| (gradients[t].magnitude_key() ^ flip, t));
            let mut used = 0;
            for t in candidates {
                if used + grid.weight(t) > budget {
                    break;
                }
                used += grid.weight(t);
                grown.set(t, true);
            }
        }
        let mut moments = moments;
        let mut compaction = moments.as_deref_mut().map(KeptEntries::compaction);
        for k in 0..len {
            if mask[k] {
                let tile = grid.tile_of(k);
                let stays = !dropped.get(tile) || grown.get(tile);
                if let Some(c) = compaction.as_mut() {
                    c.next(stays);
                }
                if !stays {
                    mask[k] = false;
                    values[k] = F::zero();
                }
            }
        }
        if let Some(c) = compaction {
            c.finish();
        }
        let joining = (0..len)
            .filter(|&k| !mask[k] && grown.get(grid.tile_of(k)))
            .count();
        let after = mask.iter().filter(|&&m| m).count() + joining;
        let mut expansion = moments.as_deref_mut().map(|m| m.expansion(after));
        for k in (0..len).rev() {
            let join = !mask[k] && grown.get(grid.tile_of(k));
            if let Some(e) = expansion.as_mut()
                && (mask[k] || join)
            {
                e.next_back(mask[k]);
            }
            if join {
                mask[k] = true;
            }
        }
        if let Some(m) = moments {
            m.release_unused();
        }
        self.nnz = after;
        true
    }

    /// Keeps the `keep` active entries of largest `|v|` (monotone: inactive entries stay
    /// inactive); ties in `|v|` drop the lower position first.
    fn prune_to<F: Float>(
        &mut self,
        values: &mut [F],
        mask: &mut [bool],
        keep: usize,
        moments: Option<&mut KeptEntries<F>>,
    ) -> bool {
        let active = mask.iter().filter(|&&m| m).count();
        self.nnz = active.min(keep);
        if active <= keep {
            return false;
        }
        let mut moments = moments;
        select_and_drop(values, mask, active, keep, moments.as_deref_mut());
        for (v, &m) in values.iter_mut().zip(mask.iter()) {
            if !m {
                *v = F::zero();
            }
        }
        if let Some(moments) = moments {
            moments.release_unused();
        }
        true
    }

    /// Drops the `count` smallest-|v| active entries and regrows `count` entries, inactive after
    /// the drop, with the largest `|grad|`; entries inactive before the update start at zero.
    /// Ties drop the lower position first and regrow the lower position first.
    #[cfg(test)]
    fn drop_and_grow<F: Float>(
        &mut self,
        values: &mut [F],
        mask: &mut [bool],
        grad: &[F],
        count: usize,
        moments: Option<&mut KeptEntries<F>>,
    ) -> bool {
        let active = mask.iter().filter(|&&m| m).count();
        let count = count.min(active);
        if count == 0 {
            return false;
        }
        let len = values.len();
        let key = |k: usize| values[k].magnitude_key();
        let Some(drop_at) = kth_smallest(len, count - 1, F::KEY_BITS, |k| mask[k].then(|| key(k)))
        else {
            return false;
        };
        let dropped = |k: usize| mask[k] && (key(k), k) <= drop_at;
        // Largest |grad| first, then the lower position: ascending in the complemented key.
        let flip = u64::MAX >> (64 - F::KEY_BITS);
        let score = |k: usize| grad[k].magnitude_key() ^ flip;
        let Some(grow_at) = kth_smallest(len, count - 1, F::KEY_BITS, |k| {
            (!mask[k] || dropped(k)).then(|| score(k))
        }) else {
            return false;
        };
        let grown = |k: usize| (score(k), k) <= grow_at;
        // Forward: drop the entries that leave (dropped and not regrown); their values go to zero.
        let mut moments = moments;
        let mut compaction = moments.as_deref_mut().map(KeptEntries::compaction);
        let mut leaving = 0;
        for (k, m) in mask.iter_mut().enumerate() {
            if *m {
                let stays = (key(k), k) > drop_at || grown(k);
                if let Some(c) = compaction.as_mut() {
                    c.next(stays);
                }
                if !stays {
                    *m = false;
                    leaving += 1;
                }
            }
        }
        if let Some(c) = compaction {
            c.finish();
        }
        for (v, &m) in values.iter_mut().zip(mask.iter()) {
            if !m {
                *v = F::zero();
            }
        }
        // Backward: the entries that join (every inactive entry is a candidate now; those that
        // left rank below the boundary) get zero moments. Their values are already zero.
        let mut expansion = moments.map(|m| m.expansion(active));
        let mut joining = 0;
        for k in (0..len).rev() {
            let join = !mask[k] && grown(k);
            if let Some(e) = expansion.as_mut()
                && (mask[k] || join)
            {
                e.next_back(mask[k]);
            }
            if join {
                mask[k] = true;
                joining += 1;
            }
        }
        debug_assert_eq!(leaving, joining);
        true
    }
}

/// What a step of the sparsifier does while the gradient of `V` arrives one matrix at a time
/// (from [`MaskSchedule::begin_step`]): every matrix's kept entries get their AdamW update as its
/// gradient arrives ([`StepPlan::update_matrix`]), except, at a GMP pruning step, the entries
/// chosen to drop (they leave the mask then), and at a RigL update, the entries chosen to drop
/// (they may be regrown): those, and the entries that join, are updated by [`StepPlan::finish`]
/// once the regrown set is known.
#[derive(Debug)]
pub(crate) enum StepPlan<F> {
    /// The mask stays.
    Unchanged,
    /// GMP prunes the kept entries at or below this `(|v| key, kept index)` boundary.
    Prune((u64, usize)),
    /// GMP prunes the entries of these tiles (a set over the grid's tiles).
    PruneTiles(TileGrid, BitMask),
    /// A RigL update in progress.
    Regrow(Regrowth<F>),
}

/// A RigL update in progress: the entries chosen to drop (positions, ascending) and the
/// candidates for regrowth with the largest `|∂L/∂V|` seen so far.
#[derive(Debug)]
pub(crate) struct Regrowth<F> {
    active: usize,
    dropped: Vec<u32>,
    dropped_gradients: Vec<F>,
    best: Best<F>,
}

/// The candidates for regrowth: entries, or whole tiles.
#[derive(Debug)]
enum Best<F> {
    Entries(BestScores<F>),
    Tiles(BestTiles<F>),
}

impl<F: Float> StepPlan<F> {
    /// The update of matrix `j` (its gradient `grad`) of the kept entries `entries` (values and
    /// moments; `layout` of `mask` as the step began): [`AdamWStep::apply_kept_matrix`]; at a GMP
    /// pruning step, the same but the entries chosen to drop leave `mask` (their entries are
    /// moved out at [`Self::finish`]); at a RigL update, the same but for the entries chosen to
    /// drop, with every candidate for regrowth scored.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn update_matrix(
        &mut self,
        step: &AdamWStep<F>,
        split: &RowSplit,
        j: usize,
        grad: ArrayView2<'_, F>,
        entries: &mut KeptEntries<F>,
        mask: &mut BitMask,
        layout: &KeptLayout,
    ) -> Result<()> {
        let (rows, width) = grad.dim();
        let cols = layout.columns();
        if mask.len() != rows * cols || entries.len() != layout.kept() {
            return Err(FipsError::Numerical("sparsifier update: shapes".into()));
        }
        let r = match self {
            Self::Unchanged => {
                return step.apply_kept_matrix(split, grad, entries, mask, layout, j);
            }
            Self::Prune(at) => {
                let at = *at;
                return prune_matrix(step, j, grad, entries, mask, layout, |read, _, x| {
                    drops(at, read, x)
                });
            }
            Self::PruneTiles(grid, dropped) => {
                return prune_matrix(step, j, grad, entries, mask, layout, |_, pos, _| {
                    dropped.get(grid.tile_of(pos))
                });
            }
            Self::Regrow(r) => r,
        };
        // Positions ascend over the rows of the matrix: a cursor into the dropped ones.
        let mut d = r.dropped.partition_point(|&x| (x as usize) < j * width);
        for (k, g_row) in grad.rows().into_iter().enumerate() {
            let mut index = layout.start(k, j);
            let at = k * cols + j * width;
            for (c, &g) in g_row.iter().enumerate() {
                let pos = at + c;
                if mask.get(pos) {
                    while r.dropped.get(d).is_some_and(|&x| (x as usize) < pos) {
                        d += 1;
                    }
                    if r.dropped.get(d).is_some_and(|&x| x as usize == pos) {
                        r.dropped_gradients[d] = g;
                        if let Best::Entries(best) = &mut r.best {
                            best.offer(g, pos);
                        }
                    } else if !entries.apply_one(step, index, g) {
                        return Err(FipsError::Numerical("RigL update: moments".into()));
                    }
                    index += 1;
                } else if let Best::Entries(best) = &mut r.best {
                    best.offer(g, pos);
                }
            }
        }
        if let Best::Tiles(best) = &mut r.best {
            // Every inactive or dropped tile of this matrix is a candidate, scored by `Σ |g|`.
            let grid = *best.grid();
            for (t, tile_rows, tile_cols) in grid.tiles_of_matrix(j) {
                let first = tile_rows.start * cols + j * width + tile_cols.start;
                if mask.get(first) && r.dropped.binary_search(&(first as u32)).is_err() {
                    continue;
                }
                let mut gradients = [F::zero(); 4];
                let mut score = F::zero();
                let cells = tile_rows.flat_map(|k| tile_cols.clone().map(move |c| (k, c)));
                for (slot, (k, c)) in gradients.iter_mut().zip(cells) {
                    let g = grad[(k, c)];
                    *slot = g;
                    score += g.abs_();
                }
                best.offer(t, score, gradients);
            }
        }
        Ok(())
    }

    /// Ends the step once every matrix was updated (`layout` still that of the mask as the step
    /// began; refresh it after). At a GMP pruning step, moves the staying entries of every
    /// segment together. At a RigL update, regrows the `count` candidates (inactive or dropped)
    /// of largest `|∂L/∂V|` (ties: the lower position), drops the other dropped entries (value and
    /// moments removed), gives joining entries zero value and moments, and applies the update to
    /// the regrown entries; the same as [`MaskSchedule::step`]'s drop and growth followed by the
    /// update of every kept entry.
    pub(crate) fn finish(
        self,
        step: &AdamWStep<F>,
        entries: &mut KeptEntries<F>,
        mask: &mut BitMask,
        layout: &KeptLayout,
    ) -> Result<()> {
        let r = match self {
            Self::Unchanged => return Ok(()),
            Self::Prune(_) | Self::PruneTiles(..) => {
                let width = layout.width().max(1);
                let mut write = 0;
                for s in 0..mask.len().div_ceil(width) {
                    let count = mask.count_range(s * width, (s + 1) * width);
                    entries.move_down(layout.segment_start(s), write, count);
                    write += count;
                }
                entries.truncate(write);
                entries.release_unused();
                return Ok(());
            }
            Self::Regrow(r) => r,
        };
        let Regrowth {
            active,
            dropped,
            dropped_gradients,
            best,
        } = r;
        // With fewer candidates than `count` nothing changes (never: the dropped are candidates).
        let tiled = matches!(best, Best::Tiles(_));
        let best = match best {
            Best::Entries(best) => best.into_sorted(),
            Best::Tiles(best) => Some(best.into_entries()),
        };
        let pending: Vec<(usize, F)> = match best {
            Some(grown) => {
                // One pass over the kept positions, with cursors into the (ascending) dropped
                // and grown positions.
                let (mut d, mut g) = (0, 0);
                let mut cleared = Vec::with_capacity(dropped.len());
                let mut compaction = entries.compaction();
                for k in mask.ones() {
                    while dropped.get(d).is_some_and(|&x| (x as usize) < k) {
                        d += 1;
                    }
                    let stays = dropped.get(d).is_none_or(|&x| x as usize != k) || {
                        while grown.get(g).is_some_and(|&(x, _)| x < k) {
                            g += 1;
                        }
                        grown.get(g).is_some_and(|&(x, _)| x == k)
                    };
                    compaction.next(stays);
                    if !stays {
                        cleared.push(k);
                    }
                }
                compaction.finish();
                for k in cleared {
                    mask.set(k, false);
                }
                // Entry-wise, as many join as left; tiles may regrow a few entries more.
                let after = if tiled {
                    entries.len() + grown.iter().filter(|&&(k, _)| !mask.get(k)).count()
                } else {
                    active
                };
                // Descending over the kept positions and the grown ones that join them.
                let kept: Vec<usize> = mask.ones().collect();
                let mut expansion = entries.expansion(after);
                let (mut a, mut b) = (kept.len(), grown.len());
                loop {
                    let existing = a.checked_sub(1).map(|i| kept[i]);
                    let joining = b.checked_sub(1).map(|i| grown[i].0);
                    match (existing, joining) {
                        (None, None) => break,
                        (Some(x), Some(y)) if y > x => {
                            expansion.next_back(false);
                            mask.set(y, true);
                            b -= 1;
                        }
                        (Some(x), y) => {
                            expansion.next_back(true);
                            a -= 1;
                            if y == Some(x) {
                                b -= 1;
                            }
                        }
                        (None, Some(y)) => {
                            expansion.next_back(false);
                            mask.set(y, true);
                            b -= 1;
                        }
                    }
                }
                grown
            }
            None => dropped
                .into_iter()
                .map(|k| k as usize)
                .zip(dropped_gradients)
                .collect(),
        };
        // The regrown entries' update, at their index among the kept entries.
        let mut next = pending.iter().peekable();
        for (index, k) in mask.ones().enumerate() {
            let Some(&&(pos, g)) = next.peek() else {
                break;
            };
            if pos < k {
                break;
            }
            if pos == k {
                if !entries.apply_one(step, index, g) {
                    return Err(FipsError::Numerical("RigL update: regrown entry".into()));
                }
                next.next();
            }
        }
        if next.peek().is_some() {
            return Err(FipsError::Numerical("RigL update: regrown entry".into()));
        }
        Ok(())
    }
}

/// The `count` smallest `(score, position)` pairs offered, with each one's gradient, where the
/// score is `|g|`'s key complemented (largest `|g|` first, then the lower position): a buffer of
/// at most `2 count` entries (`u32` position and gradient: 8 bytes each in `f32`), cut back to
/// the best `count` when full.
#[derive(Debug)]
struct BestScores<F> {
    count: usize,
    items: Vec<(u32, F)>,
    /// The worst pair kept at the last cut: nothing above it can be among the best.
    bound: Option<(u64, u32)>,
}

impl<F: Float> BestScores<F> {
    fn new(count: usize) -> Self {
        Self {
            count,
            items: Vec::with_capacity(2 * count),
            bound: None,
        }
    }

    #[inline]
    fn rank((pos, g): (u32, F)) -> (u64, u32) {
        let flip = u64::MAX >> (64 - F::KEY_BITS);
        (g.magnitude_key() ^ flip, pos)
    }

    /// Offers the candidate at `pos` (below `u32::MAX`, see [`MaskSchedule::begin_step`]).
    fn offer(&mut self, g: F, pos: usize) {
        let item = (pos as u32, g);
        if self.bound.is_some_and(|b| Self::rank(item) > b) {
            return;
        }
        self.items.push(item);
        if self.items.len() >= 2 * self.count {
            self.cut();
        }
    }

    fn cut(&mut self) {
        if self.items.len() > self.count {
            self.items
                .select_nth_unstable_by_key(self.count - 1, |&item| Self::rank(item));
            self.items.truncate(self.count);
        }
        self.bound = self.items.iter().map(|&item| Self::rank(item)).max();
    }

    /// The best `count` as `(position, gradient)` in ascending position, or `None` if fewer were
    /// offered.
    fn into_sorted(mut self) -> Option<Vec<(usize, F)>> {
        if self.items.len() < self.count {
            return None;
        }
        self.cut();
        let mut best: Vec<(usize, F)> = self
            .items
            .into_iter()
            .map(|(p, g)| (p as usize, g))
            .collect();
        best.sort_unstable_by_key(|&(p, _)| p);
        Some(best)
    }
}

/// GMP's update of matrix `j` (its gradient `grad`) of the kept entries: the entries for which
/// `drop(kept index, position, value)` holds leave `mask` (their entries are moved out at
/// [`StepPlan::finish`]); every other kept entry gets its AdamW update and moves to the front of
/// its row's segment.
fn prune_matrix<F: Float>(
    step: &AdamWStep<F>,
    j: usize,
    grad: ArrayView2<'_, F>,
    entries: &mut KeptEntries<F>,
    mask: &mut BitMask,
    layout: &KeptLayout,
    drop: impl Fn(usize, usize, F) -> bool,
) -> Result<()> {
    let (cols, width) = (layout.columns(), grad.dim().1);
    let (p, m, v) = entries.parts_mut();
    if p.len() != m.len() || p.len() != v.len() {
        return Err(FipsError::Numerical("GMP update: moments".into()));
    }
    for (k, g_row) in grad.rows().into_iter().enumerate() {
        let (mut read, mut write) = (layout.start(k, j), layout.start(k, j));
        let at_row = k * cols + j * width;
        for (c, &g) in g_row.iter().enumerate() {
            if !mask.get(at_row + c) {
                continue;
            }
            if drop(read, at_row + c, p[read]) {
                mask.set(at_row + c, false);
            } else {
                let (mut x, mut a, mut b) = (p[read], m[read], v[read]);
                step.update(&mut x, g, &mut a, &mut b);
                (p[write], m[write], v[write]) = (x, a, b);
                write += 1;
            }
            read += 1;
        }
    }
    Ok(())
}

/// Drops the tiles of smallest `Σ |v|` from the dense `mask` (tile-closed) of `values` so that at
/// most `keep` entries stay ([`TileGrid::drop_to`]); leaves `values` as they are.
fn drop_dense_tiles<F: Float>(grid: &TileGrid, values: &[F], mask: &mut [bool], keep: usize) {
    let active = |k: usize| mask.get(k).copied().unwrap_or(false);
    let scores = grid.scores(
        values
            .iter()
            .enumerate()
            .filter(|&(k, _)| active(k))
            .map(|(k, &x)| (k, x)),
    );
    let Some((dropped, _)) = grid.drop_to(&scores, |t| grid.kept_by(t, active), keep) else {
        return;
    };
    drop(scores);
    for (k, m) in mask.iter_mut().enumerate() {
        if dropped.get(grid.tile_of(k)) {
            *m = false;
        }
    }
}

/// The tiles of smallest `Σ |v|` to drop from `mask` (tile-closed; `values` its kept values in
/// row-major order) so that at most `keep` entries stay, and their entries
/// ([`TileGrid::drop_to`]).
fn drop_kept_tiles<F: Float>(
    grid: &TileGrid,
    values: &[F],
    mask: &BitMask,
    keep: usize,
) -> Option<(BitMask, usize)> {
    let scores = grid.scores(mask.ones().zip(values.iter().copied()));
    grid.drop_to(&scores, |t| grid.kept(mask, t), keep)
}

/// The `(|v| key, index)` boundary at or below which the `values.len() − keep` entries of
/// smallest `|v|` lie (ties: the lower index first), or `None` if none need to go.
fn drop_boundary<F: Float>(values: &[F], keep: usize) -> Option<(u64, usize)> {
    let len = values.len();
    if len <= keep {
        return None;
    }
    kth_smallest(len, len - keep - 1, F::KEY_BITS, |i| {
        values.get(i).map(|x| x.magnitude_key())
    })
}

/// Whether the kept entry `i` of value `x` lies at or below the boundary `at`
/// ([`drop_boundary`]). Indices among the kept entries order as their positions do, so the
/// selection is the one by `(|v|, position)`.
#[inline]
fn drops<F: Float>(at: (u64, usize), i: usize, x: F) -> bool {
    (x.magnitude_key(), i) <= at
}

/// Drops the `active − keep` active entries of smallest `|v|` (ties: lower position first) from
/// `mask`, and their moments; `active` is the current count of the mask. Leaves `values` as
/// they are.
fn select_and_drop<F: Float>(
    values: &[F],
    mask: &mut [bool],
    active: usize,
    keep: usize,
    moments: Option<&mut KeptEntries<F>>,
) {
    if active <= keep {
        return;
    }
    let key = |k: usize| values[k].magnitude_key();
    let Some(at) = kth_smallest(values.len(), active - keep - 1, F::KEY_BITS, |k| {
        mask[k].then(|| key(k))
    }) else {
        return;
    };
    let mut compaction = moments.map(KeptEntries::compaction);
    for (k, m) in mask.iter_mut().enumerate() {
        if *m {
            let stays = (key(k), k) > at;
            if let Some(c) = compaction.as_mut() {
                c.next(stays);
            }
            *m = stays;
        }
    }
    if let Some(c) = compaction {
        c.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gmp_schedule_reaches_target_exactly() {
        let gmp = Sparsifier::Gmp(GmpSchedule::default());
        let s = MaskSchedule::new(gmp, 0.75, 1000, 1000);
        assert_eq!(s.initial_sparsity(), 0.05);
        assert_eq!(s.gmp_sparsity_at(200), None, "before t_a nothing happens");
        assert_eq!(s.gmp_sparsity_at(250), Some(0.5));
        assert_eq!(s.gmp_sparsity_at(275), None);
        let mid = s.gmp_sparsity_at(500).unwrap();
        assert!((mid - (0.75 - 0.25 * 0.125)).abs() < 1e-12, "{mid}");
        assert_eq!(s.gmp_sparsity_at(750), Some(0.75));
        assert_eq!(s.gmp_sparsity_at(800), None);
        // t_e not a multiple of the interval: it still prunes at t_e.
        let s = MaskSchedule::new(gmp, 0.75, 1000, 130);
        assert_eq!(s.gmp_sparsity_at(97), Some(0.75));
        // Monotone non-decreasing schedule.
        let s = MaskSchedule::new(gmp, 0.75, 1000, 3000);
        let mut last = 0.0;
        for t in 1..=3000 {
            if let Some(x) = s.gmp_sparsity_at(t) {
                assert!(x >= last);
                last = x;
            }
        }
        assert_eq!(last, 0.75);
    }

    #[test]
    fn gmp_caps_at_low_targets() {
        let s = MaskSchedule::new(Sparsifier::Gmp(GmpSchedule::default()), 0.3, 100, 1000);
        assert_eq!(s.gmp_sparsity_at(250), Some(0.3));
        let s = MaskSchedule::new(Sparsifier::Gmp(GmpSchedule::default()), 0.02, 100, 1000);
        assert_eq!(s.initial_sparsity(), 0.02);
    }

    #[test]
    fn rigl_drop_fraction_decays() {
        let s = MaskSchedule::new(Sparsifier::Rigl(RiglSchedule::default()), 0.75, 100, 1000);
        assert_eq!(s.rigl_drop_fraction_at(49), None);
        let f50 = s.rigl_drop_fraction_at(50).unwrap();
        assert!((f50 - 0.025 * (1.0 + (std::f64::consts::PI * 50.0 / 750.0).cos())).abs() < 1e-15);
        assert!(s.rigl_drop_fraction_at(750).unwrap() < 1e-15);
        assert_eq!(s.rigl_drop_fraction_at(800), None);
    }

    #[test]
    fn prune_keeps_largest_and_zeroes_the_rest() {
        let mut s = MaskSchedule::new(Sparsifier::Rigl(RiglSchedule::default()), 0.5, 6, 10);
        let mut v = vec![0.1f64, -5.0, 0.3, 2.0, -0.2, 1.0];
        let mut mask = vec![true; 6];
        s.prepare(&mut v, &mut mask);
        assert_eq!(mask, vec![false, true, false, true, false, true]);
        assert_eq!(v, vec![0.0, -5.0, 0.0, 2.0, 0.0, 1.0]);
        assert_eq!(s.nnz(), 3);
    }

    #[test]
    fn rigl_update_keeps_count_and_zeroes_new_entries() {
        let mut s = MaskSchedule::new(Sparsifier::Rigl(RiglSchedule::default()), 0.5, 6, 10);
        let mut v = vec![0.0f64, -5.0, 0.0, 2.0, 0.0, 1.0];
        let mut mask = vec![false, true, false, true, false, true];
        s.nnz = 3;
        // Drop 1: the entry 1.0 at index 5. Grow 1: the largest |grad| among inactive {0, 2, 4, 5}.
        let grad = vec![0.1, 0.0, -9.0, 0.0, 3.0, 0.5];
        assert!(s.drop_and_grow(&mut v, &mut mask, &grad, 1, None));
        assert_eq!(mask, vec![false, true, true, true, false, false]);
        assert_eq!(v, vec![0.0, -5.0, 0.0, 2.0, 0.0, 0.0]);
        // A dropped entry with the largest gradient is regrown and keeps its value.
        let mut v = vec![0.0f64, -5.0, 0.0, 2.0, 0.0, 1.0];
        let mut mask = vec![false, true, false, true, false, true];
        let grad = vec![0.1, 0.0, 0.2, 0.0, 0.3, 7.0];
        s.drop_and_grow(&mut v, &mut mask, &grad, 1, None);
        assert_eq!(mask, vec![false, true, false, true, false, true]);
        assert_eq!(v[5], 1.0);
    }

    /// The selection as it was before the radix selection (index buffers sorted by
    /// `select_nth_unstable_by`), as the reference: prune to `keep` by magnitude.
    fn reference_prune<F: Float>(values: &mut [F], mask: &mut [bool], keep: usize) {
        let mut active: Vec<u32> = (0..mask.len() as u32)
            .filter(|&k| mask[k as usize])
            .collect();
        if active.len() <= keep {
            return;
        }
        let drop = active.len() - keep;
        let key = |k: &u32| values[*k as usize].abs_();
        active.select_nth_unstable_by(drop - 1, |a, b| key(a).total_cmp_(&key(b)).then(a.cmp(b)));
        for &k in &active[..drop] {
            mask[k as usize] = false;
            values[k as usize] = F::zero();
        }
    }

    /// The former RigL update, as the reference.
    fn reference_drop_and_grow<F: Float>(
        values: &mut [F],
        mask: &mut [bool],
        grad: &[F],
        count: usize,
    ) {
        let mut active: Vec<u32> = (0..mask.len() as u32)
            .filter(|&k| mask[k as usize])
            .collect();
        let count = count.min(active.len());
        if count == 0 {
            return;
        }
        let magnitude = |k: &u32| values[*k as usize].abs_();
        active.select_nth_unstable_by(count - 1, |a, b| {
            magnitude(a).total_cmp_(&magnitude(b)).then(a.cmp(b))
        });
        let dropped = active[..count].to_vec();
        for &k in &dropped {
            mask[k as usize] = false;
        }
        let mut inactive: Vec<u32> = (0..mask.len() as u32)
            .filter(|&k| !mask[k as usize])
            .collect();
        let score = |k: &u32| grad[*k as usize].abs_();
        inactive.select_nth_unstable_by(count - 1, |a, b| {
            score(b).total_cmp_(&score(a)).then(a.cmp(b))
        });
        for &k in &inactive[..count] {
            mask[k as usize] = true;
        }
        for &k in &dropped {
            if !mask[k as usize] {
                values[k as usize] = F::zero();
            }
        }
    }

    /// Random values with many ties (a few distinct magnitudes, both signs, ±0, an infinity).
    fn tied<F: Float>(rng: &mut impl rand::Rng, n: usize, distinct: u32) -> Vec<F> {
        (0..n)
            .map(|_| match rng.random_range(0..distinct + 3) {
                0 => F::cast(-0.0),
                1 => F::cast(f64::INFINITY),
                k => F::cast(f64::from(k) * if rng.random_bool(0.5) { 0.25 } else { -0.25 }),
            })
            .collect()
    }

    #[test]
    fn kth_smallest_is_the_element_of_that_rank_in_key_then_position_order() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for trial in 0..40 {
            let n = rng.random_range(1..400);
            let bits = if trial % 2 == 0 { 32 } else { 64 };
            let spread: u64 = if trial % 3 == 0 {
                5
            } else {
                u64::MAX >> (64 - bits)
            };
            let keys: Vec<Option<u64>> = (0..n)
                .map(|_| rng.random_bool(0.7).then(|| rng.random_range(0..=spread)))
                .collect();
            let mut sorted: Vec<(u64, usize)> = keys
                .iter()
                .enumerate()
                .filter_map(|(k, x)| x.map(|x| (x, k)))
                .collect();
            sorted.sort();
            for rank in [
                0,
                sorted.len() / 3,
                sorted.len().saturating_sub(1),
                sorted.len(),
            ] {
                let got = kth_smallest(n, rank, bits, |k| keys[k]);
                assert_eq!(got, sorted.get(rank).copied(), "trial {trial}, rank {rank}");
            }
        }
    }

    fn same_selection_as_before<F: Float>(seed: u64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for trial in 0..30 {
            let n = rng.random_range(2..600);
            let distinct = if trial % 2 == 0 { 3 } else { 1000 };
            let values: Vec<F> = tied(&mut rng, n, distinct);
            let grad: Vec<F> = tied(&mut rng, n, distinct);
            let mask: Vec<bool> = (0..n).map(|_| rng.random_bool(0.8)).collect();
            let mut values = values;
            for (v, &m) in values.iter_mut().zip(&mask) {
                if !m {
                    *v = F::zero();
                }
            }
            let active = mask.iter().filter(|&&m| m).count();
            let keep = rng.random_range(0..=active);
            let (mut v1, mut m1) = (values.clone(), mask.clone());
            reference_prune(&mut v1, &mut m1, keep);
            let mut s = MaskSchedule::new(Sparsifier::Rigl(RiglSchedule::default()), 0.5, n, 10);
            let mut moments = KeptEntries::<F>::zeros(active);
            let (mut v2, mut m2) = (values.clone(), mask.clone());
            s.prune_to(&mut v2, &mut m2, keep, Some(&mut moments));
            assert_eq!(m1, m2, "prune mask, trial {trial}");
            assert_eq!(
                v1.iter().map(|x| x.as_f64().to_bits()).collect::<Vec<_>>(),
                v2.iter().map(|x| x.as_f64().to_bits()).collect::<Vec<_>>(),
                "pruned values, trial {trial}"
            );
            assert_eq!(moments.len(), keep.min(active));
            assert_eq!(s.nnz(), keep.min(active));

            let count = rng.random_range(0..=active);
            let (mut v1, mut m1) = (values.clone(), mask.clone());
            reference_drop_and_grow(&mut v1, &mut m1, &grad, count);
            let (mut v2, mut m2) = (values.clone(), mask.clone());
            s.nnz = active;
            s.drop_and_grow(&mut v2, &mut m2, &grad, count, None);
            assert_eq!(m1, m2, "regrown mask, trial {trial}");
            assert_eq!(
                v1.iter().map(|x| x.as_f64().to_bits()).collect::<Vec<_>>(),
                v2.iter().map(|x| x.as_f64().to_bits()).collect::<Vec<_>>(),
                "regrown values, trial {trial}"
            );
        }
    }

    /// The radix selection chooses exactly the entries the former index-buffer selection chose,
    /// ties included (by position), in `f32` and `f64`.
    #[test]
    fn selection_is_the_same_as_the_index_buffer_selection() {
        same_selection_as_before::<f32>(1);
        same_selection_as_before::<f64>(2);
    }

    /// Over a run of mask updates, the kept moments equal the dense layout's moments with the
    /// entries outside the mask reset (what the masked dense update did): kept entries keep
    /// theirs, an entry dropped and regrown in one update keeps its own, new entries start at 0.
    #[test]
    fn kept_moments_follow_the_mask() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let n = 2000;
        for sparsifier in [
            Sparsifier::Gmp(GmpSchedule {
                interval: 3,
                ..Default::default()
            }),
            Sparsifier::Rigl(RiglSchedule {
                interval: 2,
                drop_fraction: 0.3,
                ..Default::default()
            }),
        ] {
            let mut s = MaskSchedule::new(sparsifier, 0.75, n, 40);
            let mut values: Vec<f32> = tied(&mut rng, n, 50);
            let mut mask = vec![true; n];
            s.prepare(&mut values, &mut mask);
            // Distinct moment values per entry, set in the dense layout.
            let mut dense_m: Vec<f32> = (0..n).map(|k| k as f32 + 1.0).collect();
            let mut dense_v: Vec<f32> = (0..n).map(|k| -(k as f32) - 1.0).collect();
            let mut changes = 0;
            for t in 1..=40 {
                for k in 0..n {
                    if !mask[k] {
                        (dense_m[k], dense_v[k]) = (0.0, 0.0);
                    }
                }
                let mut moments = {
                    let gather = |x: &[f32]| -> Vec<f32> {
                        x.iter()
                            .zip(&mask)
                            .filter(|(_, m)| **m)
                            .map(|(x, _)| *x)
                            .collect()
                    };
                    KeptEntries::from_parts(gather(&dense_m), gather(&dense_v))
                };
                let before = mask.clone();
                let grad: Vec<f32> = tied(&mut rng, n, 50);
                if s.step(t, &mut values, &mut mask, &grad, Some(&mut moments)) {
                    changes += 1;
                }
                assert_eq!(moments.len(), mask.iter().filter(|&&m| m).count());
                let (m, v) = moments.scattered(&mask);
                for k in 0..n {
                    let expected = if mask[k] && before[k] {
                        (dense_m[k], dense_v[k])
                    } else {
                        (0.0, 0.0)
                    };
                    assert_eq!((m[k], v[k]), expected, "{sparsifier} step {t} entry {k}");
                }
                // Training moves the kept values and moments.
                for k in 0..n {
                    if mask[k] {
                        values[k] += rng.random_range(-1.0..1.0);
                        dense_m[k] += 0.5;
                    }
                }
            }
            assert!(changes >= 5, "{sparsifier}: only {changes} mask updates");
        }
    }

    /// The bounded buffer keeps exactly the `count` candidates a full sort by (largest `|g|`,
    /// lower position) puts first, on inputs full of ties, offered in a shuffled order.
    #[test]
    fn best_scores_are_the_first_count_of_the_full_order() {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (n, distinct) in [(1, 2), (50, 3), (1000, 7), (3000, 1000)] {
            let g: Vec<f32> = tied(&mut rng, n, distinct);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&k| (std::cmp::Reverse(g[k].magnitude_key()), k));
            for count in [1, 2.min(n), n / 3 + 1, n] {
                let mut offered: Vec<usize> = (0..n).collect();
                offered.shuffle(&mut rng);
                let mut best = BestScores::new(count);
                for &k in &offered {
                    best.offer(g[k], k);
                }
                let mut expected: Vec<usize> = order[..count].to_vec();
                expected.sort_unstable();
                let got: Vec<usize> = best.into_sorted().unwrap().iter().map(|b| b.0).collect();
                assert_eq!(got, expected, "n {n}, count {count}");
            }
            let mut short = BestScores::<f32>::new(n + 1);
            (0..n).for_each(|k| short.offer(g[k], k));
            assert!(short.into_sorted().is_none());
        }
    }

    #[test]
    fn schedules_validate() {
        assert!(Sparsifier::None.check(0.5).is_err());
        assert!(Sparsifier::None.check(0.0).is_ok());
        let bad_gmp = [
            GmpSchedule {
                initial_sparsity: 1.0,
                ..Default::default()
            },
            GmpSchedule {
                accelerated_sparsity: 0.01,
                ..Default::default()
            },
            GmpSchedule {
                start_fraction: 0.9,
                ..Default::default()
            },
            GmpSchedule {
                end_fraction: 1.5,
                ..Default::default()
            },
            GmpSchedule {
                interval: 0,
                ..Default::default()
            },
        ];
        for g in bad_gmp {
            assert!(Sparsifier::Gmp(g).check(0.75).is_err(), "{g:?}");
        }
        let bad_rigl = [
            RiglSchedule {
                drop_fraction: 0.0,
                ..Default::default()
            },
            RiglSchedule {
                drop_fraction: 1.0,
                ..Default::default()
            },
            RiglSchedule {
                interval: 0,
                ..Default::default()
            },
            RiglSchedule {
                end_fraction: -0.1,
                ..Default::default()
            },
        ];
        for r in bad_rigl {
            assert!(Sparsifier::Rigl(r).check(0.75).is_err(), "{r:?}");
        }
    }
}
