//! How fast a kernel over an unstructured sparse factor can be on this machine, against sgemm:
//! the bound behind issue 11's 197-token target.
//!
//! ```sh
//! OPENBLAS_NUM_THREADS=1 cargo run --release --example sparse_ceiling -- [ROUNDS]
//! ```
//!
//! With many tokens the compact block runs `x U` and `(h Vᵀ) Uᵀ` as GEMMs and the sparse
//! products `h Vᵀ` over each factor's kept entries. With tokens in the vector lanes, every kept
//! entry `(i, c)` is a multiply-add of the vector `x[c, tokens]` into row `i`'s accumulators;
//! at 25 % unstructured density two rows of a register tile rarely keep the same column, so each
//! multiply-add loads its own input vector (a GEMM reuses each load across a register tile).
//! This measures, one thread, wall time, in rounds that alternate the cases:
//!
//! - `sgemm`: OpenBLAS on the dense block's shapes at 197 tokens (DeiT-tiny `197×192 · 192×768`,
//!   Llama-7B `197×4096 · 4096×11008`);
//! - `madd, registers`: fused multiply-adds on vectors held in registers (the arithmetic peak);
//! - `madd, one load each`: the same, each multiply-add loading its own vector from a 16 KiB
//!   buffer in the first-level cache — the best case of any such sparse kernel (no index to
//!   decode, no accumulator to load or store, every load a cache hit);
//!
//! - `listed entries`: the register kernel's inner loop (`many_tokens` in
//!   `src/repr/sparse_blocked.rs`) with its entries listed in advance: 128 rows, a quarter of the
//!   input rows kept at random, two rows at a time, 8 vectors (128 tokens) per row in registers,
//!   inputs of 32 KiB (the first-level cache), 64 KiB (the kernel's segment) and 170 KiB;
//!
//! and prints the fewest CPU seconds a compact pass could take against the dense one: the basis
//! GEMMs at sgemm's rate plus the kept entries at the one-load rate, or at the listed-entry rate
//! from the first-level cache, over the dense block's multiply-adds at sgemm's rate (p = 0.5,
//! s = 0.75, groups of 4, as the benchmark; the listing of entries and the activation left out).

use std::hint::black_box;
use std::time::Instant;

use fips::{GroupShape, MlpKind, rank_for_budget};
use ndarray::Array2;
use ndarray::linalg::general_mat_mul;
use pulp::{Arch, Simd, WithSimd};

/// Accumulator vectors of the multiply-add loops (independent chains, enough to cover the
/// multiply-add latency on either vector unit).
const CHAINS: usize = 16;

/// The sum of every lane of `acc` (so that no loop's work can be dropped).
#[inline(always)]
fn sum_all<S: Simd>(simd: S, acc: &[S::f32s]) -> f32 {
    let total = acc
        .iter()
        .fold(simd.splat_f32s(0.0), |s, v| simd.add_f32s(s, *v));
    simd.reduce_sum_f32s(total)
}

/// `n` rounds of [`CHAINS`] multiply-adds on registers.
struct InRegisters {
    n: usize,
    a: f32,
    b: f32,
}

impl WithSimd for InRegisters {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        let a = simd.splat_f32s(self.a);
        let b = simd.splat_f32s(self.b);
        let mut acc = [simd.splat_f32s(1.0); CHAINS];
        for _ in 0..self.n {
            for v in acc.iter_mut() {
                *v = simd.mul_add_f32s(*v, a, b);
            }
        }
        sum_all(simd, &acc)
    }
}

/// `reps` passes over `x`, each vector of it loaded for one multiply-add.
struct OneLoadEach<'a> {
    x: &'a [f32],
    reps: usize,
    a: f32,
}

impl WithSimd for OneLoadEach<'_> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        let (vectors, _) = S::as_simd_f32s(self.x);
        let a = simd.splat_f32s(self.a);
        let mut acc = [simd.splat_f32s(0.0); CHAINS];
        for _ in 0..self.reps {
            for chunk in vectors.chunks_exact(CHAINS) {
                for (v, x) in acc.iter_mut().zip(chunk) {
                    *v = simd.mul_add_f32s(a, *x, *v);
                }
            }
        }
        sum_all(simd, &acc)
    }
}

/// The register kernel's inner loop with its entries listed in advance: two rows at a time, each
/// entry `(offset, value)` a multiply-add of the 8 vectors (128 tokens) of input row `offset`
/// into the row's 8 accumulators; `reps` passes over `rows`.
struct ListedEntries<'a> {
    x: &'a [f32],
    rows: &'a [Vec<(usize, f32)>],
    reps: usize,
}

/// Vectors per row of [`ListedEntries`] (AVX-512: 128 tokens, the register kernel's tile).
const ROW_VECTORS: usize = 8;

impl WithSimd for ListedEntries<'_> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) -> f32 {
        let (vectors, _) = S::as_simd_f32s(self.x);
        let madd = |(o, v), acc: &mut _| madd::<S>(simd, vectors, o, v, acc);
        let mut total = simd.splat_f32s(0.0);
        for _ in 0..self.reps {
            for pair in self.rows.chunks_exact(2) {
                let mut a = [simd.splat_f32s(0.0); ROW_VECTORS];
                let mut b = a;
                let both = pair[0].len().min(pair[1].len());
                for (&ea, &eb) in pair[0][..both].iter().zip(&pair[1][..both]) {
                    madd(ea, &mut a);
                    madd(eb, &mut b);
                }
                for &e in &pair[0][both..] {
                    madd(e, &mut a);
                }
                for &e in &pair[1][both..] {
                    madd(e, &mut b);
                }
                for (x, y) in a.iter().zip(&b) {
                    total = simd.add_f32s(total, simd.add_f32s(*x, *y));
                }
            }
        }
        simd.reduce_sum_f32s(total)
    }
}

/// Each row's kept entries: (offset of the input row in vectors, value).
type Rows = Vec<Vec<(usize, f32)>>;

/// `acc += v · x[o .. o + ROW_VECTORS]`.
#[inline(always)]
fn madd<S: Simd>(simd: S, x: &[S::f32s], o: usize, v: f32, acc: &mut [S::f32s; ROW_VECTORS]) {
    if let Some(xs) = x.get(o..o + ROW_VECTORS) {
        let v = simd.splat_f32s(v);
        for (a, x) in acc.iter_mut().zip(xs) {
            *a = simd.mul_add_f32s(v, *x, *a);
        }
    }
}

/// 128 rows keeping each of `cols` input rows (of [`ROW_VECTORS`] vectors of `lanes`) with
/// probability 1/4 (a fixed pseudo-random draw), as vector offsets and values.
fn random_rows(cols: usize, lanes: usize) -> Rows {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..128)
        .map(|_| {
            (0..cols)
                .filter(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state.is_multiple_of(4)
                })
                .map(|c| (c * ROW_VECTORS * 16 / lanes.max(1), 0.5))
                .collect()
        })
        .collect()
}

/// GFLOP/s of `run` (which does `flop` floating-point operations; each case here runs for
/// 0.1–0.5 s). Wall time: the thread's CPU time (`/proc/thread-self/schedstat`) advances in
/// scheduler ticks, too coarse for these runs.
fn rate(flop: f64, run: impl FnOnce()) -> f64 {
    let start = Instant::now();
    run();
    flop / start.elapsed().as_secs_f64().max(1e-9) / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// sgemm `t × k · k × n` GFLOP/s (a few calls).
fn sgemm(t: usize, k: usize, n: usize, calls: usize) -> f64 {
    let a = Array2::from_shape_fn((t, k), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.01);
    let b = Array2::from_shape_fn((k, n), |(i, j)| ((i * 5 + j) % 13) as f32 * 0.01);
    let mut c = Array2::<f32>::zeros((t, n));
    general_mat_mul(1.0, &a, &b, 0.0, &mut c);
    rate((2 * t * k * n * calls) as f64, || {
        for _ in 0..calls {
            general_mat_mul(1.0, &a, &b, 0.0, &mut c);
        }
        black_box(&c);
    })
}

/// Multiply-adds per token of one dense block, of its basis GEMMs and of its factors' kept
/// entries, for a group of 4 blocks at p = 0.5, s = 0.75.
fn block_macs(kind: MlpKind, d: usize, i: usize) -> fips::Result<(f64, f64, f64)> {
    let f = kind.matrices_per_block();
    let shape = GroupShape {
        width: d,
        intermediate: i,
        blocks: 4,
        matrices_per_block: f,
    };
    let r = rank_for_budget(shape, 0.5, 0.75)?;
    let dense = (f * d * i) as f64;
    let basis = (2 * d * r) as f64;
    let kept = f as f64 * 0.25 * (r * i) as f64;
    Ok((dense, basis, kept))
}

fn main() -> fips::Result<()> {
    // OpenBLAS's kernels for this processor (it may not know it: `fips::foundation::blas`).
    fips::foundation::blas::use_native_kernels();
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let arch = Arch::new();
    let lanes = arch.dispatch(Lanes);
    let x: Vec<f32> = (0..4096 + 16).map(|k| (k % 17) as f32 * 0.01).collect();
    let x = &x[x.as_ptr().align_offset(64).min(16)..][..4096];
    let (mut tiny, mut big, mut peak, mut one_load) = (vec![], vec![], vec![], vec![]);
    // Input rows of 128 tokens: 64 of them fill 32 KiB (first-level cache), 128 fill 64 KiB
    // (the register kernel's segment), 341 (DeiT-tiny's rank) 170 KiB.
    let listed_cols = [64, 128, 341];
    let listed: Vec<(Vec<f32>, Rows)> = listed_cols
        .iter()
        .map(|&cols| {
            // Padded, so that the rows can start on a cache line (as the kernel's inputs do).
            let x = (0..cols * 128 + 16)
                .map(|k| (k % 13) as f32 * 0.01)
                .collect();
            (x, random_rows(cols, lanes))
        })
        .collect();
    let mut listed_rates = vec![Vec::new(); listed.len()];
    for _ in 0..rounds {
        tiny.push(sgemm(197, 192, 768, 1000));
        big.push(sgemm(197, 4096, 11008, 3));
        let n = 100_000_000;
        peak.push(rate((2 * CHAINS * lanes * n) as f64, || {
            black_box(arch.dispatch(InRegisters {
                n,
                a: black_box(0.999),
                b: black_box(1e-4),
            }));
        }));
        let reps = 4_000_000;
        one_load.push(rate((2 * x.len() * reps) as f64, || {
            black_box(arch.dispatch(OneLoadEach {
                x,
                reps,
                a: black_box(0.5),
            }));
        }));
        for ((x, rows), rates) in listed.iter().zip(listed_rates.iter_mut()) {
            let start = x.as_ptr().align_offset(64).min(16);
            let x = &x[start..];
            let kept: usize = rows.iter().map(Vec::len).sum();
            let reps = 20_000_000_000 / (kept * 256).max(1) + 1;
            rates.push(rate((2 * kept * 128 * reps) as f64, || {
                black_box(arch.dispatch(ListedEntries { x, rows, reps }));
            }));
        }
    }
    let (tiny, big, peak, one_load) = (median(tiny), median(big), median(peak), median(one_load));
    println!("vector lanes (f32): {lanes}; {rounds} rounds, medians, one thread, wall time");
    println!("sgemm 197x192 * 192x768       {tiny:7.1} GFLOP/s");
    println!("sgemm 197x4096 * 4096x11008   {big:7.1} GFLOP/s");
    println!("madd, registers               {peak:7.1} GFLOP/s");
    println!(
        "madd, one load each (16 KiB)  {one_load:7.1} GFLOP/s  ({:.2} of DeiT-tiny sgemm, {:.2} of 7B sgemm)",
        one_load / tiny,
        one_load / big
    );
    let listed: Vec<f64> = listed_rates.into_iter().map(median).collect();
    for (cols, r) in listed_cols.iter().zip(&listed) {
        println!(
            "listed entries, 128 tokens, {cols:3} input rows ({:3} KiB)  {r:7.1} GFLOP/s  ({:.2} of DeiT-tiny sgemm)",
            cols * 128 * 4 / 1024,
            r / tiny
        );
    }
    let in_l1 = listed.first().copied().unwrap_or(f64::NAN);
    println!(
        "fewest CPU seconds of a compact pass against the dense one (basis GEMMs at sgemm's rate, \
         kept entries at the rate named; no listing, no activation):"
    );
    for (name, kind, d, i, gemm) in [
        ("DeiT-tiny", MlpKind::Standard, 192, 768, tiny),
        ("Llama-7B", MlpKind::Gated, 4096, 11008, big),
    ] {
        let (dense, basis, kept) = block_macs(kind, d, i)?;
        let bound = |sparse: f64| (basis / gemm + kept / sparse) / (dense / gemm);
        println!(
            "  {name} (basis {:.3}, kept entries {:.3} of the dense multiply-adds): \
             one load each {:.2}, listed entries in 32 KiB {:.2}",
            basis / dense,
            kept / dense,
            bound(one_load),
            bound(in_l1)
        );
    }
    Ok(())
}

/// The `f32` lanes of the dispatched vectors.
struct Lanes;

impl WithSimd for Lanes {
    type Output = usize;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> usize {
        S::F32_LANES
    }
}
