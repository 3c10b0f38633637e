//! AdamW with decoupled weight decay and a per-step cosine learning-rate schedule.

use ndarray::{Array, ArrayView, ArrayView2, ArrayViewMut, ArrayViewMut2, Dimension, Zip};

use crate::foundation::error::{FipsError, Result, invalid};
use crate::foundation::float::Float;
use crate::foundation::kernels::RowSplit;
use crate::math::bitmask::BitMask;

/// AdamW hyper-parameters (PyTorch semantics) and the cosine schedule's floor.
///
/// Step `t` (1-based) with learning rate `η_t`:
/// `m ← β₁ m + (1 − β₁) g`, `v ← β₂ v + (1 − β₂) g²`, `θ ← θ (1 − η_t λ)`,
/// `θ ← θ − η_t m̂ / (√v̂ + ε)` with `m̂ = m / (1 − β₁ᵗ)`, `v̂ = v / (1 − β₂ᵗ)`, and
/// `η_t = η_min + (η − η_min)(1 + cos(π (t − 1) / T)) / 2` over `T` steps.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AdamW {
    /// Peak learning rate η (default 1e-4).
    pub learning_rate: f64,
    /// Floor of the cosine decay η_min (default 1e-5).
    pub min_learning_rate: f64,
    /// First-moment decay β₁ (default 0.9).
    pub beta1: f64,
    /// Second-moment decay β₂ (default 0.999).
    pub beta2: f64,
    /// Denominator guard ε (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay λ (default 0.05).
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        Self {
            learning_rate: 1e-4,
            min_learning_rate: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

impl AdamW {
    pub(crate) fn check(&self) -> Result<()> {
        let Self {
            learning_rate: lr,
            min_learning_rate: min_lr,
            beta1,
            beta2,
            eps,
            weight_decay: wd,
        } = *self;
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(invalid(
                "learning_rate",
                format!("must be positive and finite, got {lr}"),
            ));
        }
        if !(min_lr >= 0.0 && min_lr <= lr) {
            return Err(invalid(
                "min_learning_rate",
                format!("must be in [0, learning_rate = {lr}], got {min_lr}"),
            ));
        }
        for (name, b) in [("beta1", beta1), ("beta2", beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(invalid(name, format!("must be in [0, 1), got {b}")));
            }
        }
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(invalid(
                "eps",
                format!("must be positive and finite, got {eps}"),
            ));
        }
        if !(wd >= 0.0 && wd.is_finite()) {
            return Err(invalid(
                "weight_decay",
                format!("must be non-negative and finite, got {wd}"),
            ));
        }
        Ok(())
    }

    /// The cosine-decayed learning rate of step `step` (1-based) out of `total`.
    pub fn learning_rate_at(&self, step: usize, total: usize) -> f64 {
        let total = total.max(1) as f64;
        let progress = (step.saturating_sub(1)) as f64 / total;
        let cos = (std::f64::consts::PI * progress).cos();
        self.min_learning_rate + (self.learning_rate - self.min_learning_rate) * 0.5 * (1.0 + cos)
    }
}

/// Adam's moment estimates for one parameter tensor.
#[derive(Debug, Clone)]
pub(crate) struct Moments<F, D: Dimension> {
    m: Array<F, D>,
    v: Array<F, D>,
}

impl<F: Float, D: Dimension> Moments<F, D> {
    pub(crate) fn zeros(dim: D) -> Self {
        Self {
            m: Array::zeros(dim.clone()),
            v: Array::zeros(dim),
        }
    }

    /// Both moments, for tests.
    #[cfg(test)]
    pub(crate) fn parts(&self) -> (&Array<F, D>, &Array<F, D>) {
        (&self.m, &self.v)
    }
}

/// The kept entries of a masked parameter only: their values and Adam's moment estimates, entry
/// `j` belonging to the `j`-th kept position in row-major order of the mask (all positions
/// without a mask). `3 × nnz` values instead of `3 × len`: at sparsity `s`, `12 (1 − s)` bytes
/// per `f32` entry instead of 12 (plus the mask). An entry outside the mask is zero and has, in
/// the dense layout, zero moments (see [`AdamWStep::apply_masked`]), so nothing is lost: an entry
/// that joins the mask starts at zero.
///
/// Each of the three arrays is either empty or holds one element per kept entry: the values are
/// absent where the parameter is held dense elsewhere (the tests' reference paths), the moments
/// where nothing is trained (a trainer without steps, or after its last step).
#[derive(Debug, Clone)]
pub(crate) struct KeptEntries<F> {
    p: Vec<F>,
    m: Vec<F>,
    v: Vec<F>,
}

impl<F: Float> KeptEntries<F> {
    /// Zero moments for `kept` entries, without values (the tests' dense reference paths).
    #[cfg(test)]
    pub(crate) fn zeros(kept: usize) -> Self {
        Self {
            p: Vec::new(),
            m: vec![F::zero(); kept],
            v: vec![F::zero(); kept],
        }
    }

    /// The kept values `values` (row-major order of the mask), without moments.
    pub(crate) fn from_values(values: Vec<F>) -> Self {
        Self {
            p: values,
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    /// Gives every kept entry zero moments (training starts).
    pub(crate) fn start_moments(&mut self) {
        let kept = self.p.len();
        self.m = vec![F::zero(); kept];
        self.v = vec![F::zero(); kept];
    }

    /// Drops the moments and their memory (training ended).
    pub(crate) fn release_moments(&mut self) {
        self.m = Vec::new();
        self.v = Vec::new();
    }

    /// Kept entries.
    pub(crate) fn len(&self) -> usize {
        self.p.len().max(self.m.len())
    }

    /// The kept values (empty without values).
    pub(crate) fn values(&self) -> &[F] {
        &self.p
    }

    /// One AdamW update of the kept entry `index` (its gradient `g`) with its value; `false` if
    /// there is no such entry.
    pub(crate) fn apply_one(&mut self, step: &AdamWStep<F>, index: usize, g: F) -> bool {
        match (
            self.p.get_mut(index),
            self.m.get_mut(index),
            self.v.get_mut(index),
        ) {
            (Some(p), Some(m), Some(v)) => {
                step.update(p, g, m, v);
                true
            }
            _ => false,
        }
    }

    /// Moments from their two arrays, for tests.
    #[cfg(test)]
    pub(crate) fn from_parts(m: Vec<F>, v: Vec<F>) -> Self {
        Self {
            p: Vec::new(),
            m,
            v,
        }
    }

    /// The moments in the dense layout of `mask` (zero outside it), for tests.
    #[cfg(test)]
    pub(crate) fn scattered(&self, mask: &[bool]) -> (Vec<F>, Vec<F>) {
        (scatter(&self.m, mask), scatter(&self.v, mask))
    }

    /// Elements reserved by the largest of the three arrays, for tests.
    #[cfg(test)]
    pub(crate) fn reserved(&self) -> usize {
        self.p
            .capacity()
            .max(self.m.capacity())
            .max(self.v.capacity())
    }

    /// The values in the dense layout of `mask` (zero outside it), for tests.
    #[cfg(test)]
    pub(crate) fn scattered_values(&self, mask: &[bool]) -> Vec<F> {
        scatter(&self.p, mask)
    }

    /// Returns the memory reserved beyond the kept entries (after a pruning that only shrinks).
    pub(crate) fn release_unused(&mut self) {
        self.p.shrink_to_fit();
        self.m.shrink_to_fit();
        self.v.shrink_to_fit();
    }

    /// Starts a forward pass that drops entries leaving the mask: call
    /// [`Compaction::next`] once per entry kept before, in order, then [`Compaction::finish`].
    pub(crate) fn compaction(&mut self) -> Compaction<'_, F> {
        Compaction {
            entries: self,
            read: 0,
            write: 0,
        }
    }

    /// Starts a backward pass that inserts zero entries (value and moments) for entries joining
    /// the mask, growing to `kept` entries: call [`Expansion::next_back`] once per entry kept
    /// after, last first.
    pub(crate) fn expansion(&mut self, kept: usize) -> Expansion<'_, F> {
        let read = self.len();
        for x in [&mut self.p, &mut self.m, &mut self.v] {
            if !x.is_empty() {
                x.resize(kept.max(read), F::zero());
            }
        }
        Expansion {
            entries: self,
            read,
            write: kept,
        }
    }

    /// Moves the kept entries of segment `[from, from + count)` to `[to, to + count)`, `to ≤ from`
    /// (a compaction by whole segments).
    pub(crate) fn move_down(&mut self, from: usize, to: usize, count: usize) {
        for x in [&mut self.p, &mut self.m, &mut self.v] {
            if !x.is_empty() && to < from {
                x.copy_within(from..from + count, to);
            }
        }
    }

    /// Keeps the first `kept` entries.
    pub(crate) fn truncate(&mut self, kept: usize) {
        for x in [&mut self.p, &mut self.m, &mut self.v] {
            x.truncate(kept);
        }
    }

    /// Keeps the kept entries `i` (position `k` in `mask`, value `x`) with `keep(i, k, x)` and
    /// takes the others out of `mask` (row-major order: the `i`-th kept position is entry `i`).
    /// Needs the values.
    pub(crate) fn retain(
        &mut self,
        mask: &mut BitMask,
        mut keep: impl FnMut(usize, usize, F) -> bool,
    ) {
        let (mut read, mut write) = (0, 0);
        for k in 0..mask.len() {
            if !mask.get(k) {
                continue;
            }
            let Some(&x) = self.p.get(read) else {
                break;
            };
            if keep(read, k, x) {
                for y in [&mut self.p, &mut self.m, &mut self.v] {
                    if let Some(&z) = y.get(read) {
                        y[write] = z;
                    }
                }
                write += 1;
            } else {
                mask.set(k, false);
            }
            read += 1;
        }
        self.truncate(write);
    }

    /// The three arrays (each empty or one element per kept entry).
    pub(crate) fn parts_mut(&mut self) -> (&mut [F], &mut [F], &mut [F]) {
        (&mut self.p, &mut self.m, &mut self.v)
    }
}

/// `kept` (one element per kept entry of `mask`, or empty) in the dense layout of `mask`.
#[cfg(test)]
fn scatter<F: Float>(kept: &[F], mask: &[bool]) -> Vec<F> {
    let mut kept = kept.iter();
    let mut out = vec![F::zero(); mask.len()];
    for (o, &keep) in out.iter_mut().zip(mask) {
        if keep && let Some(&x) = kept.next() {
            *o = x;
        }
    }
    out
}

/// Where the kept entries of each matrix's rows start among a [`KeptEntries`]: the parameter is
/// `rows × (matrices · width)`, row-major, matrix `j` in columns `j · width..(j + 1) · width`;
/// `starts[k · matrices + j]` counts the mask's kept entries before row `k` of matrix `j`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KeptLayout {
    rows: usize,
    matrices: usize,
    width: usize,
    starts: Vec<usize>,
}

impl KeptLayout {
    /// The layout of `mask` (`rows × matrices · width`, row-major).
    pub(crate) fn new(mask: &BitMask, rows: usize, matrices: usize, width: usize) -> Self {
        let mut layout = Self {
            rows,
            matrices,
            width,
            starts: Vec::with_capacity(rows * matrices + 1),
        };
        layout.refresh(mask);
        layout
    }

    /// Recounts after a change of the mask.
    pub(crate) fn refresh(&mut self, mask: &BitMask) {
        self.starts.clear();
        let mut kept = 0;
        let width = self.width.max(1);
        for s in 0..mask.len().div_ceil(width) {
            self.starts.push(kept);
            kept += mask.count_range(s * width, (s + 1) * width);
        }
        self.starts.push(kept);
    }

    /// Columns of the parameter, `matrices · width`.
    pub(crate) fn columns(&self) -> usize {
        self.matrices * self.width
    }

    /// Kept entries before row `k` of matrix `j`.
    pub(crate) fn start(&self, k: usize, j: usize) -> usize {
        self.starts.get(k * self.matrices + j).copied().unwrap_or(0)
    }

    /// Columns of each matrix.
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// Kept entries before segment `s` (row `s / matrices` of matrix `s % matrices`).
    pub(crate) fn segment_start(&self, s: usize) -> usize {
        self.starts.get(s).copied().unwrap_or(0)
    }

    /// Kept entries in all.
    pub(crate) fn kept(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Matrix `j` (`rows × width`, rows contiguous) of the parameter held as the kept values
    /// `values` of `mask` (this layout's): `out[k, c] = values[start(k, j) + #kept before c in
    /// the row]` where `mask` keeps the entry, else 0. Each row is zeroed, then its kept values
    /// are written at the mask's set bits.
    pub(crate) fn decode<F: Float>(
        &self,
        values: &[F],
        mask: &BitMask,
        j: usize,
        mut out: ArrayViewMut2<'_, F>,
    ) -> Result<()> {
        let (rows, width, matrices) = (self.rows, self.width, self.matrices);
        if j >= matrices
            || out.dim() != (rows, width)
            || mask.len() != rows * matrices * width
            || values.len() != self.kept()
        {
            return Err(internal("decode shapes"));
        }
        for (k, mut row) in out.rows_mut().into_iter().enumerate() {
            let s = k * matrices + j;
            let kept = values
                .get(self.starts[s]..self.starts[s + 1])
                .ok_or_else(|| internal("decode"))?;
            let at = s * width;
            let row = row.as_slice_mut().ok_or_else(|| internal("decode rows"))?;
            row.fill(F::zero());
            for (k, &x) in mask.ones_in(at, at + width).zip(kept) {
                if let Some(o) = row.get_mut(k - at) {
                    *o = x;
                }
            }
        }
        Ok(())
    }
}

/// `rest[skip..skip + len]`, leaving what follows it in `rest`.
fn take_segment<'a, F>(rest: &mut &'a mut [F], skip: usize, len: usize) -> Result<&'a mut [F]> {
    let (_, after) = std::mem::take(rest)
        .split_at_mut_checked(skip)
        .ok_or_else(|| internal("entries"))?;
    let (here, after) = after
        .split_at_mut_checked(len)
        .ok_or_else(|| internal("entries"))?;
    *rest = after;
    Ok(here)
}

fn internal(what: &str) -> FipsError {
    FipsError::Numerical(format!("internal layout of the kept entries: {what}"))
}

/// A forward pass over the entries kept before a mask update (see [`KeptEntries::compaction`]).
#[derive(Debug)]
pub(crate) struct Compaction<'a, F: Float> {
    entries: &'a mut KeptEntries<F>,
    read: usize,
    write: usize,
}

impl<F: Float> Compaction<'_, F> {
    /// The next previously kept entry: it stays (its value and moments move down) or leaves.
    #[inline]
    pub(crate) fn next(&mut self, stays: bool) {
        if stays {
            for x in [
                &mut self.entries.p,
                &mut self.entries.m,
                &mut self.entries.v,
            ] {
                if let Some(&y) = x.get(self.read) {
                    x[self.write] = y;
                }
            }
            self.write += 1;
        }
        self.read += 1;
    }

    /// Ends the pass: the entries that left are dropped (their memory stays reserved; see
    /// [`KeptEntries::release_unused`]).
    pub(crate) fn finish(self) {
        let kept = self.write;
        self.entries.truncate(kept);
    }
}

/// A backward pass over the entries kept after a mask update (see [`KeptEntries::expansion`]).
#[derive(Debug)]
pub(crate) struct Expansion<'a, F: Float> {
    entries: &'a mut KeptEntries<F>,
    read: usize,
    write: usize,
}

impl<F: Float> Expansion<'_, F> {
    /// The previous kept entry, going backwards: one kept before (`existing`, its value and
    /// moments move up) or one joining the mask (zero value and moments).
    #[inline]
    pub(crate) fn next_back(&mut self, existing: bool) {
        self.write -= 1;
        if existing {
            self.read -= 1;
        }
        for x in [
            &mut self.entries.p,
            &mut self.entries.m,
            &mut self.entries.v,
        ] {
            if x.is_empty() {
                continue;
            }
            x[self.write] = if existing { x[self.read] } else { F::zero() };
        }
    }
}

/// Per-step constants of one AdamW update.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWStep<F> {
    beta1: F,
    one_minus_beta1: F,
    beta2: F,
    one_minus_beta2: F,
    decay: F,
    step_size: F,
    inv_sqrt_bc2: F,
    eps: F,
}

impl<F: Float> AdamWStep<F> {
    /// Constants for step `step` (1-based) at learning rate `lr`.
    pub(crate) fn new(cfg: &AdamW, lr: f64, step: usize) -> Self {
        let t = step.max(1) as i32;
        let bc1 = 1.0 - cfg.beta1.powi(t);
        let bc2 = 1.0 - cfg.beta2.powi(t);
        Self {
            beta1: F::cast(cfg.beta1),
            one_minus_beta1: F::cast(1.0 - cfg.beta1),
            beta2: F::cast(cfg.beta2),
            one_minus_beta2: F::cast(1.0 - cfg.beta2),
            decay: F::cast(1.0 - lr * cfg.weight_decay),
            step_size: F::cast(lr / bc1),
            inv_sqrt_bc2: F::cast(1.0 / bc2.sqrt()),
            eps: F::cast(cfg.eps),
        }
    }

    /// One entry's update.
    #[inline(always)]
    pub(crate) fn update(&self, p: &mut F, g: F, m: &mut F, v: &mut F) {
        *m = self.beta1 * *m + self.one_minus_beta1 * g;
        *v = self.beta2 * *v + self.one_minus_beta2 * g * g;
        *p = *p * self.decay - self.step_size * *m / ((*v).sqrt_() * self.inv_sqrt_bc2 + self.eps);
    }

    /// Updates a dense parameter in place.
    pub(crate) fn apply<D: Dimension>(
        &self,
        param: ArrayViewMut<'_, F, D>,
        grad: ArrayView<'_, F, D>,
        moments: &mut Moments<F, D>,
    ) {
        Zip::from(param)
            .and(grad)
            .and(&mut moments.m)
            .and(&mut moments.v)
            .for_each(|p, &g, m, v| self.update(p, g, m, v));
    }

    /// [`Self::apply`] (no mask) or [`Self::apply_masked`], split over `split`'s threads and
    /// vectorised when every array is contiguous (the trainer's case); the same values either way.
    pub(crate) fn apply_split<D: Dimension>(
        &self,
        split: &RowSplit,
        mut param: ArrayViewMut<'_, F, D>,
        grad: ArrayView<'_, F, D>,
        moments: &mut Moments<F, D>,
        mask: Option<ArrayView<'_, bool, D>>,
    ) {
        let flat_mask = mask.as_ref().map(|m| m.as_slice());
        let all_flat = param.as_slice().is_some()
            && grad.as_slice().is_some()
            && moments.m.as_slice().is_some()
            && moments.v.as_slice().is_some()
            && !matches!(flat_mask, Some(None));
        if !all_flat {
            match mask {
                Some(mask) => self.apply_masked(param, grad, moments, mask),
                None => self.apply(param, grad, moments),
            }
            return;
        }
        let (Some(p), Some(g), Some(m), Some(v)) = (
            param.as_slice_mut(),
            grad.as_slice(),
            moments.m.as_slice_mut(),
            moments.v.as_slice_mut(),
        ) else {
            return;
        };
        let keep = flat_mask.flatten();
        let n = split.chunk(p.len(), 1);
        let parts: Vec<_> = p
            .chunks_mut(n)
            .zip(g.chunks(n))
            .zip(m.chunks_mut(n))
            .zip(v.chunks_mut(n))
            .enumerate()
            .map(|(k, (((p, g), m), v))| (p, g, m, v, keep.map(|keep| &keep[k * n..])))
            .collect();
        RowSplit::run(
            parts,
            #[inline(always)]
            |(p, g, m, v, keep)| match keep {
                Some(keep) => {
                    for ((((p, &g), m), v), &keep) in p
                        .iter_mut()
                        .zip(g)
                        .zip(m.iter_mut())
                        .zip(v.iter_mut())
                        .zip(keep)
                    {
                        // Branch-free select, so the loop vectorises.
                        let (mut p2, mut m2, mut v2) = (*p, *m, *v);
                        self.update(&mut p2, g, &mut m2, &mut v2);
                        *p = if keep { p2 } else { F::zero() };
                        *m = if keep { m2 } else { F::zero() };
                        *v = if keep { v2 } else { F::zero() };
                    }
                }
                None => {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                    {
                        self.update(p, g, m, v);
                    }
                }
            },
        );
    }

    /// [`Self::apply_split`] with moments of the kept entries only ([`KeptEntries`]): the same
    /// values as the dense layout, bit for bit. `param`, `grad` and `mask` are flat in the same
    /// order; entries outside `mask` are set to zero. (The trainer updates one matrix at a time,
    /// [`Self::apply_kept_matrix`]; this whole-parameter form is the reference of the tests.)
    #[cfg(test)]
    pub(crate) fn apply_kept(
        &self,
        split: &RowSplit,
        param: &mut [F],
        grad: &[F],
        moments: &mut KeptEntries<F>,
        mask: Option<&[bool]>,
    ) {
        let n = split.chunk(param.len(), 1).max(1);
        let (mut m, mut v) = (moments.m.as_mut_slice(), moments.v.as_mut_slice());
        let mut parts = Vec::new();
        for (k, (p, g)) in param.chunks_mut(n).zip(grad.chunks(n)).enumerate() {
            let keep = mask.map(|mask| &mask[k * n..k * n + p.len()]);
            let kept = keep.map_or(p.len(), |keep| keep.iter().filter(|&&b| b).count());
            let (km, kv) = (kept.min(m.len()), kept.min(v.len()));
            let (m_here, m_rest) = std::mem::take(&mut m).split_at_mut(km);
            let (v_here, v_rest) = std::mem::take(&mut v).split_at_mut(kv);
            (m, v) = (m_rest, v_rest);
            parts.push((p, g, m_here, v_here, keep));
        }
        RowSplit::run(
            parts,
            #[inline(always)]
            |(p, g, m, v, keep)| match keep {
                Some(keep) => {
                    let mut moments = m.iter_mut().zip(v.iter_mut());
                    for ((p, &g), &keep) in p.iter_mut().zip(g).zip(keep) {
                        if !keep {
                            *p = F::zero();
                        } else if let Some((m, v)) = moments.next() {
                            self.update(p, g, m, v);
                        }
                    }
                }
                None => {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                    {
                        self.update(p, g, m, v);
                    }
                }
            },
        );
    }

    /// [`Self::apply_kept`] on matrix `j` of a `rows × (matrices · width)` parameter held as its
    /// kept entries only (`entries`, with values; `layout`), with that matrix's gradient `grad`
    /// (`rows × width`, rows contiguous): the same values, bit for bit, as the dense update of
    /// the whole parameter restricted to the matrix's kept entries (the others are zero and stay
    /// so). Rows are split over `split`'s threads.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply_kept_matrix(
        &self,
        split: &RowSplit,
        grad: ArrayView2<'_, F>,
        entries: &mut KeptEntries<F>,
        mask: &BitMask,
        layout: &KeptLayout,
        j: usize,
    ) -> Result<()> {
        let KeptLayout {
            rows,
            matrices,
            width,
            ref starts,
        } = *layout;
        let cols = matrices * width;
        let kept = layout.kept();
        if j >= matrices
            || grad.dim() != (rows, width)
            || mask.len() != rows * cols
            || entries.p.len() != kept
            || entries.m.len() != kept
            || entries.v.len() != kept
        {
            return Err(internal("shapes"));
        }
        let (mut p_rest, mut m_rest, mut v_rest) = (
            entries.p.as_mut_slice(),
            entries.m.as_mut_slice(),
            entries.v.as_mut_slice(),
        );
        let mut consumed = 0;
        let mut row_parts = Vec::with_capacity(rows);
        for (k, g_row) in grad.rows().into_iter().enumerate() {
            let (start, end) = (starts[k * matrices + j], starts[k * matrices + j + 1]);
            let skip = start
                .checked_sub(consumed)
                .ok_or_else(|| internal("order"))?;
            let len = end - start;
            let (p_here, m_here, v_here) = (
                take_segment(&mut p_rest, skip, len)?,
                take_segment(&mut m_rest, skip, len)?,
                take_segment(&mut v_rest, skip, len)?,
            );
            consumed = end;
            let g = g_row.to_slice().ok_or_else(|| internal("gradient rows"))?;
            let at = k * cols + j * width;
            row_parts.push((g, at, p_here, m_here, v_here));
        }
        let per_part = (split.chunk(rows * width, width) / width.max(1)).max(1);
        let mut parts = Vec::new();
        let mut row_parts = row_parts.into_iter();
        loop {
            let part: Vec<_> = row_parts.by_ref().take(per_part).collect();
            if part.is_empty() {
                break;
            }
            parts.push(part);
        }
        RowSplit::run(
            parts,
            #[inline(always)]
            |part| {
                for (g, at, p, m, v) in part {
                    let kept = p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut());
                    for (k, ((p, m), v)) in mask.ones_in(at, at + g.len()).zip(kept) {
                        if let Some(&g) = g.get(k - at) {
                            self.update(p, g, m, v);
                        }
                    }
                }
            },
        );
        Ok(())
    }

    /// Updates a masked parameter: entries outside `mask` stay zero and their moments are reset
    /// (so a regrown entry starts with fresh moments).
    pub(crate) fn apply_masked<D: Dimension>(
        &self,
        param: ArrayViewMut<'_, F, D>,
        grad: ArrayView<'_, F, D>,
        moments: &mut Moments<F, D>,
        mask: ArrayView<'_, bool, D>,
    ) {
        Zip::from(param)
            .and(grad)
            .and(&mut moments.m)
            .and(&mut moments.v)
            .and(mask)
            .for_each(|p, &g, m, v, &keep| {
                if keep {
                    self.update(p, g, m, v);
                } else {
                    *p = F::zero();
                    *m = F::zero();
                    *v = F::zero();
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::{Array1, array};

    #[test]
    fn matches_pytorch_adamw_by_hand() {
        // Two steps of torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        // on θ = [1.0, -2.0] with gradients [0.5, 0.25] then [-1.0, 0.5], computed by hand.
        let cfg = AdamW {
            learning_rate: 0.1,
            min_learning_rate: 0.1,
            weight_decay: 0.01,
            ..AdamW::default()
        };
        let mut p: Array1<f64> = array![1.0, -2.0];
        let mut mom = Moments::zeros(p.raw_dim());
        let grads = [array![0.5, 0.25], array![-1.0, 0.5]];
        let mut m = [0.0; 2];
        let mut v = [0.0; 2];
        let mut expected = [1.0, -2.0];
        for (t, g) in grads.iter().enumerate() {
            let step = t + 1;
            AdamWStep::new(&cfg, 0.1, step).apply(p.view_mut(), g.view(), &mut mom);
            for k in 0..2 {
                m[k] = 0.9 * m[k] + 0.1 * g[k];
                v[k] = 0.999 * v[k] + 0.001 * g[k] * g[k];
                let mhat = m[k] / (1.0 - 0.9f64.powi(step as i32));
                let vhat = v[k] / (1.0 - 0.999f64.powi(step as i32));
                expected[k] = expected[k] * (1.0 - 0.1 * 0.01) - 0.1 * mhat / (vhat.sqrt() + 1e-8);
            }
        }
        assert_abs_diff_eq!(p, Array1::from(expected.to_vec()), epsilon = 1e-12);
    }

    #[test]
    fn masked_entries_stay_zero_and_reset_moments() {
        let cfg = AdamW::default();
        let mut p = array![[1.0f32, 0.0], [0.0, 2.0]];
        let mask = array![[true, false], [false, true]];
        let mut mom = Moments::zeros(p.raw_dim());
        mom.m[[0, 1]] = 3.0;
        AdamWStep::new(&cfg, 1e-3, 1).apply_masked(
            p.view_mut(),
            array![[1.0, 1.0], [1.0, 1.0]].view(),
            &mut mom,
            mask.view(),
        );
        assert_eq!(p[[0, 1]], 0.0);
        assert_eq!(p[[1, 0]], 0.0);
        assert_eq!(mom.m[[0, 1]], 0.0);
        assert!(p[[0, 0]] < 1.0);
    }

    #[test]
    fn split_vectorised_update_equals_the_plain_one_bitwise() {
        // Large enough that two threads each take a part.
        let (rows, cols) = (700, 600);
        let f = |k: usize, m: usize| ((k * m) % 1009) as f32 / 500.0 - 1.0;
        let p0 = ndarray::Array2::from_shape_fn((rows, cols), |(a, b)| f(a * cols + b, 7));
        let g = ndarray::Array2::from_shape_fn((rows, cols), |(a, b)| f(a * cols + b, 13));
        let mask =
            ndarray::Array2::from_shape_fn((rows, cols), |(a, b)| (a * 31 + b * 17) % 4 == 0);
        let step = AdamWStep::<f32>::new(&AdamW::default(), 1e-3, 3);
        for masked in [false, true] {
            let (mut p1, mut p2) = (p0.clone(), p0.clone());
            let (mut m1, mut m2) = (Moments::zeros(p0.raw_dim()), Moments::zeros(p0.raw_dim()));
            for _ in 0..2 {
                if masked {
                    step.apply_masked(p1.view_mut(), g.view(), &mut m1, mask.view());
                } else {
                    step.apply(p1.view_mut(), g.view(), &mut m1);
                }
                step.apply_split(
                    &RowSplit::new(2),
                    p2.view_mut(),
                    g.view(),
                    &mut m2,
                    masked.then(|| mask.view()),
                );
            }
            assert_eq!(p1, p2);
            assert_eq!((m1.m, m1.v), (m2.m, m2.v));
        }
    }

    /// Moments of the kept entries only give the dense layout's values bit for bit, over steps
    /// whose mask changes (an entry joining starts at zero moments in both), with and without a
    /// mask, on one and two threads.
    #[test]
    fn kept_moments_update_equals_the_dense_masked_update_bitwise() {
        let (rows, cols) = (300, 500);
        let f = |k: usize, m: usize| ((k * m) % 1009) as f32 / 500.0 - 1.0;
        let p0 = ndarray::Array2::from_shape_fn((rows, cols), |(a, b)| f(a * cols + b, 7));
        let masks: Vec<ndarray::Array2<bool>> = (0..3)
            .map(|t| {
                ndarray::Array2::from_shape_fn((rows, cols), |(a, b)| {
                    (a * 31 + b * 17 + t) % 4 == 0
                })
            })
            .collect();
        for threads in [1, 2] {
            for masked in [false, true] {
                let mut p1 = p0.clone();
                let mut dense = Moments::zeros(p0.raw_dim());
                let mut p2 = p0.clone();
                let mut kept: Option<(KeptEntries<f32>, &ndarray::Array2<bool>)> = None;
                for step in 1..=6 {
                    let g = ndarray::Array2::from_shape_fn((rows, cols), |(a, b)| {
                        f(a * cols + b, 13 + step)
                    });
                    let update = AdamWStep::<f32>::new(&AdamW::default(), 1e-3, step);
                    let mask = &masks[step % masks.len()];
                    if masked {
                        update.apply_masked(p1.view_mut(), g.view(), &mut dense, mask.view());
                    } else {
                        update.apply(p1.view_mut(), g.view(), &mut dense);
                    }
                    // Remap the kept moments to the new mask as the sparsifier does.
                    let mut moments = match kept.take() {
                        None if masked => KeptEntries::zeros(mask.iter().filter(|&&b| b).count()),
                        None => KeptEntries::zeros(p0.len()),
                        Some((old, _)) if !masked => old,
                        Some((old, old_mask)) => {
                            let (m, v) = old.scattered(old_mask.as_slice().unwrap());
                            let gathered = |x: &[f32]| -> Vec<f32> {
                                x.iter()
                                    .zip(mask.iter())
                                    .filter(|(_, keep)| **keep)
                                    .map(|(x, _)| *x)
                                    .collect()
                            };
                            KeptEntries::from_parts(gathered(&m), gathered(&v))
                        }
                    };
                    update.apply_kept(
                        &RowSplit::new(threads),
                        p2.as_slice_mut().unwrap(),
                        g.as_slice().unwrap(),
                        &mut moments,
                        masked.then(|| mask.as_slice().unwrap()),
                    );
                    assert_eq!(p1, p2, "values, step {step}, masked {masked}");
                    let all = vec![true; p0.len()];
                    let layout = if masked {
                        mask.as_slice().unwrap()
                    } else {
                        &all
                    };
                    let (m, v) = moments.scattered(layout);
                    let (dm, dv) = dense.parts();
                    assert_eq!(dm.as_slice().unwrap(), &m[..], "first moments, step {step}");
                    assert_eq!(
                        dv.as_slice().unwrap(),
                        &v[..],
                        "second moments, step {step}"
                    );
                    kept = Some((moments, mask));
                }
            }
        }
    }

    /// A parameter held as its kept values and moments only, updated one matrix at a time
    /// ([`AdamWStep::apply_kept_matrix`]), equals the dense masked update bit for bit, and each
    /// matrix decoded from it ([`KeptLayout::decode`]) equals the dense matrix.
    #[test]
    fn kept_values_updated_per_matrix_equal_the_dense_update_and_decode_to_it() {
        use crate::foundation::slicing::s;
        use ndarray::Array2;
        let (rows, matrices, width) = (40, 5, 60);
        let cols = matrices * width;
        let f = |k: usize, m: usize| ((k * m) % 1009) as f32 / 500.0 - 1.0;
        let mask = Array2::from_shape_fn((rows, cols), |(a, b)| (a * 31 + b * 17) % 3 == 0);
        let flat_mask = mask.as_slice().unwrap();
        let bitmask = BitMask::from_bools(flat_mask);
        let mut dense = Array2::from_shape_fn((rows, cols), |(a, b)| {
            if mask[[a, b]] {
                f(a * cols + b, 7)
            } else {
                0.0
            }
        });
        let mut moments = Moments::zeros(dense.raw_dim());
        let kept: Vec<f32> = dense
            .iter()
            .zip(flat_mask)
            .filter(|(_, m)| **m)
            .map(|(x, _)| *x)
            .collect();
        let mut entries = KeptEntries::from_values(kept);
        entries.start_moments();
        let layout = KeptLayout::new(&bitmask, rows, matrices, width);
        assert_eq!(layout.kept(), entries.len());
        for threads in [1, 2] {
            for step in 1..=4 {
                let g = Array2::from_shape_fn((rows, cols), |(a, b)| f(a * cols + b, 13 + step));
                let update = AdamWStep::<f32>::new(&AdamW::default(), 1e-2, step);
                update.apply_masked(dense.view_mut(), g.view(), &mut moments, mask.view());
                for j in (0..matrices).rev() {
                    let gj = g.slice(s![.., j * width..(j + 1) * width]).to_owned();
                    update
                        .apply_kept_matrix(
                            &RowSplit::new(threads),
                            gj.view(),
                            &mut entries,
                            &bitmask,
                            &layout,
                            j,
                        )
                        .unwrap();
                }
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                let values = entries.scattered_values(flat_mask);
                assert_eq!(
                    bits(&values),
                    bits(dense.as_slice().unwrap()),
                    "step {step}"
                );
                let (m, v) = entries.scattered(flat_mask);
                let (dm, dv) = moments.parts();
                assert_eq!(
                    (&m[..], &v[..]),
                    (dm.as_slice().unwrap(), dv.as_slice().unwrap())
                );
                for j in 0..matrices {
                    let mut out = Array2::from_elem((rows, width), f32::NAN);
                    layout
                        .decode(entries.values(), &bitmask, j, out.view_mut())
                        .unwrap();
                    let expected = dense.slice(s![.., j * width..(j + 1) * width]).to_owned();
                    assert_eq!(
                        bits(out.as_slice().unwrap()),
                        bits(expected.as_slice().unwrap())
                    );
                }
            }
        }
        // A wrong shape is an error, not a panic.
        let mut out = Array2::zeros((rows, width + 1));
        assert!(
            layout
                .decode(entries.values(), &bitmask, 0, out.view_mut())
                .is_err()
        );
        assert!(
            layout
                .decode(entries.values(), &bitmask, matrices, out.view_mut())
                .is_err()
        );
    }

    #[test]
    fn cosine_schedule_endpoints() {
        let cfg = AdamW::default();
        assert_abs_diff_eq!(cfg.learning_rate_at(1, 100), 1e-4, epsilon = 1e-18);
        assert_abs_diff_eq!(cfg.learning_rate_at(51, 100), 5.5e-5, epsilon = 1e-15);
        assert!(cfg.learning_rate_at(100, 100) > 1e-5);
        assert_abs_diff_eq!(cfg.learning_rate_at(101, 100), 1e-5, epsilon = 1e-15);
    }

    #[test]
    fn invalid_hyper_parameters() {
        let bad = [
            AdamW {
                learning_rate: 0.0,
                ..AdamW::default()
            },
            AdamW {
                learning_rate: f64::NAN,
                ..AdamW::default()
            },
            AdamW {
                min_learning_rate: 1.0,
                ..AdamW::default()
            },
            AdamW {
                beta1: 1.0,
                ..AdamW::default()
            },
            AdamW {
                beta2: -0.1,
                ..AdamW::default()
            },
            AdamW {
                eps: 0.0,
                ..AdamW::default()
            },
            AdamW {
                weight_decay: -1.0,
                ..AdamW::default()
            },
        ];
        for cfg in bad {
            assert!(cfg.check().is_err(), "{cfg:?} should be rejected");
        }
        assert!(AdamW::default().check().is_ok());
    }
}
