//! Register-blocked products over the row-major bitmask form (the file's own layout).
//!
//! For token-minor inputs `x` (`cols × tp`, `tp` a multiple of 16) and output rows `i`:
//!
//! ```text
//! out[i, t0..t0+L] = bias[i] + Σ_{c ∈ row i} m[i, c] · x[c, t0..t0+L]
//! ```
//!
//! The columns are taken in panels whose inputs (`panel × tp` floats, about 384 KiB) stay in the
//! core's second-level cache. For each row and panel the row's kept columns are decoded once
//! from its mask bytes (a table look-up per byte, into a panel-sized buffer: no index array of
//! `nnz` size), then reused for every tile of `L` tokens: the tile's accumulators (`K × L`
//! lanes, eight 256-bit registers) stay in registers while each kept entry broadcasts its value
//! and multiply-adds one contiguous input row `x[c, t0..t0+L]`. So a kept entry costs `L / 8`
//! fused multiply-adds and one broadcast, with no load or store of accumulators.

use std::ops::Range;

use pulp::Simd;

use crate::repr::compact::{CompactMatrix, StorageFloat};

/// Bytes of one tile's inputs a column panel holds (small in tests, so that they cross panels).
const PANEL_BYTES: usize = if cfg!(test) { 2 << 10 } else { 128 << 10 };
/// Rows per block (small in tests, so that they cross blocks).
const ROW_BLOCK: usize = if cfg!(test) { 7 } else { 512 };

/// For every byte value, the positions of its set bits (least significant first), padded with 0.
const BIT_POSITIONS: [[u8; 8]; 256] = {
    let mut table = [[0u8; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut n = 0;
        let mut bit = 0;
        while bit < 8 {
            if b & (1 << bit) != 0 {
                table[b][n] = bit as u8;
                n += 1;
            }
            bit += 1;
        }
        b += 1;
    }
    table
};

/// Writes the indices of the set bits of a bitmask row into `out`, increasing, and returns how
/// many; `out` must have room for the set bits plus 8 (a byte's 8 candidate slots are written
/// before advancing by its popcount). Branch-free: one table look-up and 8 stores per byte.
#[inline(always)]
pub(crate) fn fill_set_bits(row: &[u8], out: &mut [u32]) -> usize {
    let mut p = 0usize;
    for (k, &byte) in row.iter().enumerate() {
        let base = (k * 8) as u32;
        let positions = &BIT_POSITIONS[byte as usize];
        if let Some(slots) = out.get_mut(p..p + 8) {
            for (slot, &pos) in slots.iter_mut().zip(positions) {
                *slot = base + u32::from(pos);
            }
        }
        p += byte.count_ones() as usize;
    }
    p
}

/// `out[i - range.start, :] = bias[i] + Σ_c m[i, c] x[c, :]` for the rows of `range`, `x` and
/// `out` token-minor (`cols × tp`, `rows × tp`), `tp` a multiple of 16. Rows of `m` that are not
/// bitmask-encoded are left at their bias (callers pass bitmask-encoded matrices only).
///
/// Loops: blocks of [`ROW_BLOCK`] rows (their output tiles stay in the second-level cache, their
/// values in the shared cache), tiles of 8 vectors of tokens (then 4, 2, 1 for the rest), panels
/// of columns whose inputs for the tile ([`PANEL_BYTES`]) are copied contiguous, rows.
#[inline(always)]
pub(crate) fn bitmask_rows_tiled<V: Simd, S: StorageFloat>(
    simd: V,
    m: &CompactMatrix<S>,
    x: &[f32],
    tp: usize,
    out: &mut [f32],
    bias: Option<&[S]>,
    range: Range<usize>,
) {
    for (o, i) in out.chunks_exact_mut(tp).zip(range.clone()) {
        o.fill(bias.map_or(0.0, |b| b[i].to_f32()));
    }
    if m.pattern().bitmask().is_none() {
        return;
    }
    let first = range.start;
    for r0 in range.clone().step_by(std::env::var("FIPS_RB").ok().and_then(|v| v.parse().ok()).unwrap_or(ROW_BLOCK)) {
        let rb: usize = std::env::var("FIPS_RB").ok().and_then(|v| v.parse().ok()).unwrap_or(ROW_BLOCK);
        let rows = r0..(r0 + rb).min(range.end);
        let o = &mut out[(r0 - first) * tp..(rows.end - first) * tp];
        let topn: usize = std::env::var("FIPS_TOPN").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
        let mut t0 = if topn == 4 {
            0
        } else if V::F32_LANES >= 16 {
            tiles::<V, S, 8, 2>(simd, m, x, tp, o, rows.clone(), 0)
        } else {
            tiles::<V, S, 8, 1>(simd, m, x, tp, o, rows.clone(), 0)
        };
        t0 = tiles::<V, S, 4, 2>(simd, m, x, tp, o, rows.clone(), t0);
        t0 = tiles::<V, S, 2, 4>(simd, m, x, tp, o, rows.clone(), t0);
        tiles::<V, S, 1, 8>(simd, m, x, tp, o, rows, t0);
    }
}

/// The tiles of `N` vectors of tokens from `t_start` on (as many as fit in `tp`) for the rows
/// `rows` (`out` starts at the first of them); returns where they end. `K` sets of `N`
/// accumulator vectors stay in registers, entry `p` of a row going into set `p mod K`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tiles<V: Simd, S: StorageFloat, const N: usize, const K: usize>(
    simd: V,
    m: &CompactMatrix<S>,
    x: &[f32],
    tp: usize,
    out: &mut [f32],
    rows: Range<usize>,
    t_start: usize,
) -> usize {
    let w = N * V::F32_LANES;
    if t_start + w > tp {
        return t_start;
    }
    let pattern = m.pattern();
    let Some(bits) = pattern.bitmask() else {
        return t_start;
    };
    let cols = m.cols();
    let row_bytes = cols.div_ceil(8);
    let offsets = pattern.offsets();
    let values = m.values();
    let pb: usize = std::env::var("FIPS_PANEL").ok().and_then(|v| v.parse().ok()).unwrap_or(PANEL_BYTES);
    let panel = (pb / 4 / w / 8 * 8)
        .max(8)
        .min(cols.next_multiple_of(8));
    let zero = simd.splat_f32s(0.0);
    let mut xbuf: Vec<[V::f32s; N]> = vec![[zero; N]; panel];
    let mut idx = vec![0u32; panel + 8];
    let _ = PANEL_BYTES;
    let mut pos: Vec<usize> = Vec::with_capacity(rows.len());
    let mut widened: Vec<f32> = Vec::new();
    let mut t0 = t_start;
    while t0 + w <= tp {
        pos.clear();
        pos.extend_from_slice(&offsets[rows.clone()]);
        for c0 in (0..cols).step_by(panel) {
            let c1 = (c0 + panel).min(cols);
            for (c, xb) in (c0..c1).zip(xbuf.iter_mut()) {
                let (xv, _) = V::as_simd_f32s(&x[c * tp + t0..c * tp + t0 + w]);
                for (d, &s) in xb.iter_mut().zip(xv) {
                    *d = s;
                }
            }
            let xs = &xbuf[..c1 - c0];
            for ((o, i), p) in out.chunks_exact_mut(tp).zip(rows.clone()).zip(&mut pos) {
                let row = &bits[i * row_bytes + c0 / 8..i * row_bytes + c1.div_ceil(8)];
                let n = fill_set_bits(row, &mut idx);
                if n == 0 {
                    continue;
                }
                let stored = &values[*p..*p + n];
                *p += n;
                let vals: &[f32] = match S::as_f32_slice(stored) {
                    Some(v) => v,
                    None => {
                        widened.resize(n, 0.0);
                        S::widen(stored, &mut widened);
                        &widened
                    }
                };
                let (ov, _) = V::as_mut_simd_f32s(&mut o[t0..t0 + w]);
                row_tile::<V, N, K>(simd, &idx[..n], vals, xs, ov);
            }
        }
        t0 += w;
    }
    t0
}

/// `o[j] += Σ_p vals[p] xs[idx[p]][j]` for the `N` vectors `j`: `K` sets of `N` accumulator
/// vectors in registers, entry `p` into set `p mod K`.
#[inline(always)]
fn row_tile<V: Simd, const N: usize, const K: usize>(
    simd: V,
    idx: &[u32],
    vals: &[f32],
    xs: &[[V::f32s; N]],
    o: &mut [V::f32s],
) {
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; N]; K];
    for (a, &v) in acc[0].iter_mut().zip(o.iter()) {
        *a = v;
    }
    let entry = |a: &mut [V::f32s; N], c: u32, v: f32| {
        if let Some(xr) = xs.get(c as usize) {
            let vb = simd.splat_f32s(v);
            for (a, &x) in a.iter_mut().zip(xr) {
                *a = simd.mul_add_e_f32s(vb, x, *a);
            }
        }
    };
    let n = idx.len() / K * K;
    for (c, v) in idx[..n].chunks_exact(K).zip(vals[..n].chunks_exact(K)) {
        for (k, a) in acc.iter_mut().enumerate() {
            entry(a, c[k], v[k]);
        }
    }
    for (&c, &v) in idx[n..].iter().zip(&vals[n..]) {
        entry(&mut acc[0], c, v);
    }
    for (j, o) in o.iter_mut().enumerate().take(N) {
        let mut s = acc[0][j];
        for a in acc.iter().skip(1) {
            s = simd.add_f32s(s, a[j]);
        }
        *o = s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repr::sparse_mlp::spmm;
    use ndarray::Array2;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A random `rows × cols` matrix of the given density with row 1 and column 2 empty and
    /// row 0 full.
    fn random_matrix<S: StorageFloat>(
        rng: &mut ChaCha8Rng,
        rows: usize,
        cols: usize,
        density: f64,
    ) -> (CompactMatrix<S>, Array2<f32>) {
        let mut mask = Array2::from_shape_simple_fn((rows, cols), || rng.random_bool(density));
        if rows > 2 && cols > 2 {
            mask.row_mut(1).fill(false);
            mask.column_mut(2).fill(false);
            mask.row_mut(0).fill(true);
        }
        let values = Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-1.0f32..1.0));
        let m = CompactMatrix::<S>::from_dense(values.view(), mask.view()).unwrap();
        let dense = m.to_dense();
        (m, dense)
    }

    fn check<S: StorageFloat>(rows: usize, cols: usize, density: f64, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (m, dense) = random_matrix::<S>(&mut rng, rows, cols, density);
        let bias: Vec<S> = (0..rows)
            .map(|i| S::from_f32((i as f32 * 0.37).sin()))
            .collect();
        for t in [1usize, 15, 16, 17, 197] {
            let tp = if t == 1 { 1 } else { t.next_multiple_of(16) };
            let x: Vec<f32> = (0..cols * tp).map(|_| rng.random_range(-1.0..1.0)).collect();
            for threads in [1, 3] {
                let mut out = vec![f32::NAN; rows * tp];
                spmm(&m, &x, tp, &mut out, Some(&bias), threads);
                for i in 0..rows {
                    for l in 0..t {
                        let want = f64::from(bias[i].to_f32())
                            + (0..cols)
                                .map(|c| f64::from(dense[[i, c]]) * f64::from(x[c * tp + l]))
                                .sum::<f64>();
                        let got = out[i * tp + l];
                        assert!(
                            (f64::from(got) - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{rows}×{cols} density {density} t={t} threads {threads} \
                             row {i} token {l}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bitmask_products_match_the_dense_product() {
        for (rows, cols, density) in [
            (1, 1, 1.0),
            (3, 5, 0.5),
            (37, 130, 0.25),
            (130, 71, 0.0),
            (65, 300, 0.9),
        ] {
            check::<f32>(rows, cols, density, 11);
        }
        check::<half::bf16>(37, 130, 0.25, 12);
        check::<half::f16>(37, 130, 0.25, 13);
    }

    #[test]
    fn fill_set_bits_lists_the_set_bits() {
        let row = [0b1010_0001u8, 0, 0xff, 0b1000_0000];
        let mut out = [0u32; 40];
        let n = fill_set_bits(&row, &mut out);
        assert_eq!(&out[..n], &[0, 5, 7, 16, 17, 18, 19, 20, 21, 22, 23, 31]);
    }
}
