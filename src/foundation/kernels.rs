//! Elementwise passes of the training step over row-major `[tokens, width]` buffers, split by rows
//! across scoped threads.
//!
//! Every pass is one sweep over its buffers with a branch-free body that vectorises, compiled for
//! the widest instruction set the CPU offers (AVX-512 or AVX2 with FMA, detected at run time through
//! `pulp`'s safe dispatch; plain x86-64 otherwise). Column sums
//! (bias gradients) are fused into the sweep that produces the summed values; each thread sums its
//! rows and the partial sums are added in thread order, so results depend on the thread count but
//! never on scheduling.

use crate::foundation::activation::Activation;
use crate::foundation::float::Float;

/// Row-parallel executor for the elementwise passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowSplit {
    threads: usize,
}

/// Below this many elements per thread a pass runs on the calling thread alone: about 50 µs of
/// vectorised GELU, well above the cost of starting a scoped thread on a quiet machine, and the
/// small passes of a 64-wide model (stories260k: `1024 × 172` elements) stay on one thread.
const MIN_ELEMENTS_PER_THREAD: usize = 1 << 17;

impl RowSplit {
    pub(crate) fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
        }
    }

    /// Elements per chunk (a whole number of rows) for `len` elements of rows of `width`.
    pub(crate) fn chunk(&self, len: usize, width: usize) -> usize {
        let rows = len / width.max(1);
        let threads = self.threads.min((len / MIN_ELEMENTS_PER_THREAD).max(1));
        rows.div_ceil(threads).max(1) * width.max(1)
    }

    /// Runs `work` on every part, the first on the calling thread and the rest on scoped threads,
    /// each through [`vectorized`].
    pub(crate) fn run<T: Send>(parts: Vec<T>, work: impl Fn(T) + Sync) {
        let mut parts = parts.into_iter();
        let Some(first) = parts.next() else {
            return;
        };
        let work = &work;
        if parts.len() == 0 {
            vectorized(
                #[inline(always)]
                || work(first),
            );
            return;
        }
        std::thread::scope(|scope| {
            for part in parts {
                scope.spawn(move || {
                    vectorized(
                        #[inline(always)]
                        || work(part),
                    )
                });
            }
            vectorized(
                #[inline(always)]
                || work(first),
            );
        });
    }

    /// Splits over the available cores.
    pub(crate) fn available() -> Self {
        Self::new(crate::foundation::thread_plan::available_threads())
    }

    /// `h ← act(h)` (value only).
    pub(crate) fn activate_values<F: Float>(&self, act: Activation, h: &mut [F], width: usize) {
        let n = self.chunk(h.len(), width);
        Self::run(
            h.chunks_mut(n).collect(),
            #[inline(always)]
            |h| act.apply_slice(h),
        );
    }

    /// `gate ← act(gate) ⊙ up` (value only).
    pub(crate) fn activate_gated_values<F: Float>(
        &self,
        act: Activation,
        gate: &mut [F],
        up: &[F],
        width: usize,
    ) {
        let n = self.chunk(gate.len(), width);
        Self::run(
            gate.chunks_mut(n).zip(up.chunks(n)).collect(),
            #[inline(always)]
            |(g, u)| act.apply_gated_slice(g, u),
        );
    }

    /// Numerically stable softmax of every row of width `width`, in place (the ViT's attention).
    #[cfg(feature = "app")]
    pub(crate) fn softmax_rows<F: Float>(&self, a: &mut [F], width: usize) {
        let n = self.chunk(a.len(), width);
        Self::run(
            a.chunks_mut(n).collect(),
            #[inline(always)]
            |chunk| {
                for row in chunk.chunks_exact_mut(width) {
                    let max = row
                        .iter()
                        .fold(F::cast(f64::NEG_INFINITY), |m, &v| m.max_(v));
                    row.iter_mut().for_each(|v| *v = (*v - max).exp_act());
                    let inv = F::one() / row.iter().fold(F::zero(), |s, &v| s + v);
                    row.iter_mut().for_each(|v| *v *= inv);
                }
            },
        );
    }

    /// `h ← act(h)`, `slope ← act'(h)`.
    pub(crate) fn activate<F: Float>(
        &self,
        act: Activation,
        h: &mut [F],
        slope: &mut [F],
        width: usize,
    ) {
        let n = self.chunk(h.len(), width);
        let parts: Vec<_> = h.chunks_mut(n).zip(slope.chunks_mut(n)).collect();
        Self::run(
            parts,
            #[inline(always)]
            |(h, s)| act.forward_slices(h, s),
        );
    }

    /// Gated: `gate ← act(gate)`, `a = act(gate) ⊙ up`, `slope = act'(gate) ⊙ up`.
    pub(crate) fn activate_gated<F: Float>(
        &self,
        act: Activation,
        gate: &mut [F],
        up: &[F],
        a: &mut [F],
        slope: &mut [F],
        width: usize,
    ) {
        let n = self.chunk(gate.len(), width);
        let parts: Vec<_> = gate
            .chunks_mut(n)
            .zip(up.chunks(n))
            .zip(a.chunks_mut(n))
            .zip(slope.chunks_mut(n))
            .collect();
        Self::run(
            parts,
            #[inline(always)]
            |(((g, u), a), s)| act.gated_slices(g, u, a, s),
        );
    }

    /// Fills every row of `out` with `row`.
    pub(crate) fn fill_rows<F: Float>(&self, out: &mut [F], row: &[F]) {
        let n = self.chunk(out.len(), row.len());
        let parts: Vec<_> = out.chunks_mut(n).collect();
        Self::run(
            parts,
            #[inline(always)]
            |chunk| {
                for r in chunk.chunks_exact_mut(row.len()) {
                    r.copy_from_slice(row);
                }
            },
        );
    }

    /// Turns `yhat` into `G = scale (ŷ − y)` and returns `Σ (ŷ − y)²`; adds the column sums of `G`
    /// to `col_sums` when given (which must start at zero).
    pub(crate) fn output_gradient<F: Float>(
        &self,
        yhat: &mut [F],
        y: &[F],
        scale: F,
        width: usize,
        col_sums: Option<&mut [F]>,
    ) -> f64 {
        let n = self.chunk(yhat.len(), width);
        let with_sums = col_sums.is_some();
        let mut parts: Vec<_> = yhat
            .chunks_mut(n)
            .zip(y.chunks(n))
            .map(|(g, t)| {
                (
                    g,
                    t,
                    0.0f64,
                    vec![F::zero(); if with_sums { width } else { 0 }],
                )
            })
            .collect();
        Self::run(
            parts.iter_mut().collect(),
            #[inline(always)]
            |(g, t, sum, sums)| {
                for (g_row, t_row) in g.chunks_exact_mut(width).zip(t.chunks_exact(width)) {
                    // f32 row sums are exact enough (a row is at most a few thousand terms) and keep the
                    // inner loop vectorised; rows are accumulated in f64.
                    let mut row_sum = F::zero();
                    for (g, &t) in g_row.iter_mut().zip(t_row) {
                        let diff = *g - t;
                        row_sum += diff * diff;
                        *g = diff * scale;
                    }
                    *sum += row_sum.as_f64();
                    if !sums.is_empty() {
                        sums.iter_mut()
                            .zip(g_row.iter())
                            .for_each(|(s, &g)| *s += g);
                    }
                }
            },
        );
        if let Some(col_sums) = col_sums {
            for (_, _, _, sums) in &parts {
                col_sums.iter_mut().zip(sums).for_each(|(c, &s)| *c += s);
            }
        }
        parts.iter().map(|p| p.2).sum()
    }

    /// Standard MLP: `∂H = ∂A ⊙ slope` in place; adds the column sums of `∂H` to `col_sums`.
    pub(crate) fn backprop_activation<F: Float>(
        &self,
        da: &mut [F],
        slope: &[F],
        width: usize,
        col_sums: Option<&mut [F]>,
    ) {
        let n = self.chunk(da.len(), width);
        let with_sums = col_sums.is_some();
        let mut parts: Vec<_> = da
            .chunks_mut(n)
            .zip(slope.chunks(n))
            .map(|(d, s)| (d, s, vec![F::zero(); if with_sums { width } else { 0 }]))
            .collect();
        Self::run(
            parts.iter_mut().collect(),
            #[inline(always)]
            |(d, s, sums)| {
                for (d_row, s_row) in d.chunks_exact_mut(width).zip(s.chunks_exact(width)) {
                    d_row.iter_mut().zip(s_row).for_each(|(d, &s)| *d *= s);
                    if !sums.is_empty() {
                        sums.iter_mut()
                            .zip(d_row.iter())
                            .for_each(|(c, &d)| *c += d);
                    }
                }
            },
        );
        if let Some(col_sums) = col_sums {
            for (_, _, sums) in &parts {
                col_sums.iter_mut().zip(sums).for_each(|(c, &s)| *c += s);
            }
        }
    }

    /// Gated MLP: `∂H_u = ∂A ⊙ act(H_g)` into `up`, `∂H_g = ∂A ⊙ slope` in place in `da`.
    /// (Bias gradients of gated MLPs, rare in practice, are summed by the caller.)
    pub(crate) fn backprop_gate<F: Float>(
        &self,
        up: &mut [F],
        da: &mut [F],
        gate: &[F],
        slope: &[F],
        width: usize,
    ) {
        let n = self.chunk(da.len(), width);
        let parts: Vec<_> = up
            .chunks_mut(n)
            .zip(da.chunks_mut(n))
            .zip(gate.chunks(n))
            .zip(slope.chunks(n))
            .collect();
        Self::run(
            parts,
            #[inline(always)]
            |(((u, d), g), s)| {
                for (((u, d), &g), &s) in u.iter_mut().zip(d.iter_mut()).zip(g).zip(s) {
                    *u = *d * g;
                    *d *= s;
                }
            },
        );
    }
}

/// Runs `f` compiled for the best instruction set of this CPU: AVX-512 (x86-64-v4) or AVX2 with FMA
/// (x86-64-v3) where present, detected at run time; the baseline instruction set otherwise. The
/// closure (which callers mark `#[inline(always)]`) is inlined into the dispatched copy, so its
/// loops are auto-vectorised with those instructions. Results are bitwise the same on every path for the elementwise loops here (no
/// reassociation; FMA contraction is not enabled by Rust).
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// Adds the column sums of the row-major `[rows, width]` buffer `a` to `col_sums`.
pub(crate) fn add_column_sums<F: Float>(a: &[F], width: usize, col_sums: &mut [F]) {
    for row in a.chunks_exact(width) {
        col_sums.iter_mut().zip(row).for_each(|(c, &x)| *c += x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_do_not_depend_on_the_split_except_for_sum_order() {
        // Enough rows that every thread count below gets its own split.
        let (rows, width) = (4099, 257);
        let y: Vec<f64> = (0..rows * width)
            .map(|k| ((k * 7919) % 1000) as f64 / 500.0 - 1.0)
            .collect();
        let base: Vec<f64> = (0..rows * width)
            .map(|k| ((k * 104_729) % 997) as f64 / 400.0 - 1.2)
            .collect();
        let mut reference: Option<(Vec<f64>, f64, Vec<f64>)> = None;
        for threads in [1, 2, 3, 8] {
            let split = RowSplit::new(threads);
            let mut g = base.clone();
            let mut sums = vec![0.0; width];
            let loss = split.output_gradient(&mut g, &y, 0.5, width, Some(&mut sums));
            let mut slope = vec![0.0; g.len()];
            let mut h = base.clone();
            split.activate(Activation::Gelu, &mut h, &mut slope, width);
            let mut dh_sums = vec![0.0; width];
            split.backprop_activation(&mut g, &slope, width, Some(&mut dh_sums));
            match &reference {
                None => reference = Some((g, loss, dh_sums)),
                Some((g0, l0, s0)) => {
                    assert_eq!(&g, g0, "elementwise results are exact for any split");
                    assert!((loss - l0).abs() < 1e-9 * l0);
                    for (a, b) in dh_sums.iter().zip(s0) {
                        assert!((a - b).abs() < 1e-9);
                    }
                }
            }
        }
        // Against a direct computation.
        let (g, loss, dh_sums) = reference.unwrap();
        let direct: f64 = base.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum();
        assert!((loss - direct).abs() < 1e-9 * direct);
        let mut col = vec![0.0; width];
        add_column_sums(&g, width, &mut col);
        for (a, b) in col.iter().zip(&dh_sums) {
            assert!((a - b).abs() < 1e-9);
        }
    }
}
