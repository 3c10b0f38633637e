//! Sparsity of the factors `V`: global magnitude pruning schedules (GMP) and dynamic sparse
//! training (RigL).
//!
//! Masks are global over a group: every decision ranks all entries of all the group's factors
//! together, by `|V|` for pruning and by `|∂L/∂V|` (the dense gradient with respect to the masked
//! factor) for RigL's regrowth. Ties are broken by position, so decisions are deterministic.

use std::fmt;

use crate::foundation::error::{Result, invalid};
use crate::foundation::float::Float;
use crate::math::budget::nonzeros_for_sparsity;

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
#[derive(Debug)]
pub(crate) struct MaskSchedule {
    sparsifier: Sparsifier,
    target: f64,
    total_entries: usize,
    /// `t_a` and `t_e` in steps.
    start_step: usize,
    end_step: usize,
    nnz: usize,
    /// Reusable index buffers (no allocation after the first mask update).
    scratch: Vec<u32>,
    dropped: Vec<u32>,
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
            start_step: start,
            end_step: end,
            nnz: total_entries,
            scratch: Vec::new(),
            dropped: Vec::new(),
        }
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
            self.prune_to(values, mask, keep);
        }
    }

    /// The sparsifier's work at step `t` (1-based), before the optimiser step. `grad` is the dense
    /// gradient with respect to the masked factor. Returns whether the mask changed.
    pub(crate) fn step<F: Float>(
        &mut self,
        t: usize,
        values: &mut [F],
        mask: &mut [bool],
        grad: &[F],
    ) -> bool {
        if let Some(s) = self.gmp_sparsity_at(t) {
            let keep = nonzeros_for_sparsity(self.total_entries, s);
            return self.prune_to(values, mask, keep);
        }
        if let Some(fraction) = self.rigl_drop_fraction_at(t) {
            let count = (fraction * self.nnz as f64).round() as usize;
            return self.drop_and_grow(values, mask, grad, count);
        }
        false
    }

    /// Ensures the final sparsity equals the target (after an early stop, or a schedule that had
    /// no pruning step left).
    pub(crate) fn finish<F: Float>(&mut self, values: &mut [F], mask: &mut [bool]) {
        if self.is_sparse() {
            let keep = self.target_nnz();
            self.prune_to(values, mask, keep);
        }
    }

    /// Keeps the `keep` active entries of largest `|v|` (monotone: inactive entries stay inactive).
    fn prune_to<F: Float>(&mut self, values: &mut [F], mask: &mut [bool], keep: usize) -> bool {
        collect_indices(&mut self.scratch, mask, true);
        let active = self.scratch.len();
        if active <= keep {
            self.nnz = active;
            return false;
        }
        let drop = active - keep;
        let key = |k: &u32| values[*k as usize].abs_();
        let smallest_first = |a: &u32, b: &u32| key(a).total_cmp_(&key(b)).then(a.cmp(b));
        self.scratch
            .select_nth_unstable_by(drop - 1, smallest_first);
        for &k in &self.scratch[..drop] {
            mask[k as usize] = false;
            values[k as usize] = F::zero();
        }
        self.nnz = keep;
        true
    }

    /// Drops the `count` smallest-|v| active entries and regrows `count` entries, inactive after
    /// the drop, with the largest `|grad|`; entries inactive before the update start at zero.
    fn drop_and_grow<F: Float>(
        &mut self,
        values: &mut [F],
        mask: &mut [bool],
        grad: &[F],
        count: usize,
    ) -> bool {
        collect_indices(&mut self.scratch, mask, true);
        let count = count.min(self.scratch.len());
        if count == 0 {
            return false;
        }
        let magnitude = |k: &u32| values[*k as usize].abs_();
        self.scratch.select_nth_unstable_by(count - 1, |a, b| {
            magnitude(a).total_cmp_(&magnitude(b)).then(a.cmp(b))
        });
        self.dropped.clear();
        self.dropped.extend_from_slice(&self.scratch[..count]);
        for &k in &self.dropped {
            mask[k as usize] = false;
        }
        collect_indices(&mut self.scratch, mask, false);
        let score = |k: &u32| grad[*k as usize].abs_();
        self.scratch.select_nth_unstable_by(count - 1, |a, b| {
            score(b).total_cmp_(&score(a)).then(a.cmp(b))
        });
        for &k in &self.scratch[..count] {
            mask[k as usize] = true;
        }
        // Dropped and not regrown: zero. Regrown after being inactive: already zero. Dropped and
        // regrown: keeps its value.
        for &k in &self.dropped {
            if !mask[k as usize] {
                values[k as usize] = F::zero();
            }
        }
        true
    }
}

/// Fills `out` with the indices whose mask equals `active`.
fn collect_indices(out: &mut Vec<u32>, mask: &[bool], active: bool) {
    out.clear();
    out.extend(
        mask.iter()
            .enumerate()
            .filter(|&(_, &m)| m == active)
            .map(|(k, _)| k as u32),
    );
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
        assert!(s.drop_and_grow(&mut v, &mut mask, &grad, 1));
        assert_eq!(mask, vec![false, true, true, true, false, false]);
        assert_eq!(v, vec![0.0, -5.0, 0.0, 2.0, 0.0, 0.0]);
        // A dropped entry with the largest gradient is regrown and keeps its value.
        let mut v = vec![0.0f64, -5.0, 0.0, 2.0, 0.0, 1.0];
        let mut mask = vec![false, true, false, true, false, true];
        let grad = vec![0.1, 0.0, 0.2, 0.0, 0.3, 7.0];
        s.drop_and_grow(&mut v, &mut mask, &grad, 1);
        assert_eq!(mask, vec![false, true, false, true, false, true]);
        assert_eq!(v[5], 1.0);
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
