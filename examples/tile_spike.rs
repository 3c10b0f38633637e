//! Spike: multiply-add rate of a 2×2-tiled sparse product against an unstructured one and sgemm.
//! `OPENBLAS_NUM_THREADS=1 cargo run --release --features avx512 --example tile_spike -- R C T`

use fips as _;
use ndarray::Array2;
use pulp::x86::V4;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::arch::x86_64::__m512;

fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

const TT: usize = 64;

struct Tiled {
    pairs: usize,
    offs: Vec<usize>,
    cols: Vec<u32>,
    vals: Vec<[f32; 4]>,
}

struct Rows {
    rows: usize,
    offs: Vec<usize>,
    cols: Vec<u32>,
    vals: Vec<f32>,
}

/// x tile-major: tile t, column c, 64 lanes.
#[inline(always)]
fn tiled_v4(
    simd: V4,
    m: &Tiled,
    x: &[f32],
    ncols: usize,
    tiles: usize,
    out: &mut [f32],
    tp: usize,
) {
    let f = simd.avx512f;
    for t in 0..tiles {
        let xt = &x[t * ncols * TT..(t + 1) * ncols * TT];
        for p in 0..m.pairs {
            let z = f._mm512_setzero_ps();
            let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
            let (mut b0, mut b1, mut b2, mut b3) = (z, z, z, z);
            for e in m.offs[p]..m.offs[p + 1] {
                let c = m.cols[e] as usize;
                let Some(xs) = xt.get(c * 2 * TT..c * 2 * TT + 2 * TT) else {
                    continue;
                };
                let xs: &[f32; 128] = xs.try_into().unwrap_or(&[0.0; 128]);
                let [x0, x1, x2, x3, y0, y1, y2, y3]: [__m512; 8] = pulp::cast(*xs);
                let v = m.vals[e];
                let v00 = f._mm512_set1_ps(v[0]);
                let v01 = f._mm512_set1_ps(v[1]);
                let v10 = f._mm512_set1_ps(v[2]);
                let v11 = f._mm512_set1_ps(v[3]);
                a0 = f._mm512_fmadd_ps(v00, x0, a0);
                a1 = f._mm512_fmadd_ps(v00, x1, a1);
                a2 = f._mm512_fmadd_ps(v00, x2, a2);
                a3 = f._mm512_fmadd_ps(v00, x3, a3);
                b0 = f._mm512_fmadd_ps(v10, x0, b0);
                b1 = f._mm512_fmadd_ps(v10, x1, b1);
                b2 = f._mm512_fmadd_ps(v10, x2, b2);
                b3 = f._mm512_fmadd_ps(v10, x3, b3);
                a0 = f._mm512_fmadd_ps(v01, y0, a0);
                a1 = f._mm512_fmadd_ps(v01, y1, a1);
                a2 = f._mm512_fmadd_ps(v01, y2, a2);
                a3 = f._mm512_fmadd_ps(v01, y3, a3);
                b0 = f._mm512_fmadd_ps(v11, y0, b0);
                b1 = f._mm512_fmadd_ps(v11, y1, b1);
                b2 = f._mm512_fmadd_ps(v11, y2, b2);
                b3 = f._mm512_fmadd_ps(v11, y3, b3);
            }
            let ra: [f32; 64] = pulp::cast([a0, a1, a2, a3]);
            let rb: [f32; 64] = pulp::cast([b0, b1, b2, b3]);
            let o = 2 * p * tp + t * TT;
            out[o..o + TT].copy_from_slice(&ra);
            let o = (2 * p + 1) * tp + t * TT;
            out[o..o + TT].copy_from_slice(&rb);
        }
    }
}

#[inline(always)]
fn rows_v4(simd: V4, m: &Rows, x: &[f32], ncols: usize, tiles: usize, out: &mut [f32], tp: usize) {
    let f = simd.avx512f;
    for t in 0..tiles {
        let xt = &x[t * ncols * TT..(t + 1) * ncols * TT];
        for i in 0..m.rows {
            let z = f._mm512_setzero_ps();
            let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
            for e in m.offs[i]..m.offs[i + 1] {
                let c = m.cols[e] as usize;
                let Some(xs) = xt.get(c * TT..c * TT + TT) else {
                    continue;
                };
                let xs: &[f32; 64] = xs.try_into().unwrap_or(&[0.0; 64]);
                let [x0, x1, x2, x3]: [__m512; 4] = pulp::cast(*xs);
                let v = f._mm512_set1_ps(m.vals[e]);
                a0 = f._mm512_fmadd_ps(v, x0, a0);
                a1 = f._mm512_fmadd_ps(v, x1, a1);
                a2 = f._mm512_fmadd_ps(v, x2, a2);
                a3 = f._mm512_fmadd_ps(v, x3, a3);
            }
            let ra: [f32; 64] = pulp::cast([a0, a1, a2, a3]);
            let o = i * tp + t * TT;
            out[o..o + TT].copy_from_slice(&ra);
        }
    }
}

#[inline(always)]
fn tiled_gen<const NV: usize>(
    simd: V4,
    m: &Tiled,
    x: &[f32],
    ncols: usize,
    tp: usize,
    out: &mut [f32],
) {
    let f = simd.avx512f;
    let w = NV * 16;
    let tiles = tp / w;
    for t in 0..tiles {
        let xt = &x[t * ncols * w..(t + 1) * ncols * w];
        for p in 0..m.pairs {
            let z = f._mm512_setzero_ps();
            let mut a = [z; NV];
            let mut b = [z; NV];
            for e in m.offs[p]..m.offs[p + 1] {
                let c = m.cols[e] as usize;
                let Some(xs) = xt.get(c * 2 * w..c * 2 * w + 2 * w) else {
                    continue;
                };
                let v = m.vals[e];
                let v00 = f._mm512_set1_ps(v[0]);
                let v01 = f._mm512_set1_ps(v[1]);
                let v10 = f._mm512_set1_ps(v[2]);
                let v11 = f._mm512_set1_ps(v[3]);
                for i in 0..NV {
                    let x0: &[f32; 16] = xs[16 * i..16 * i + 16].try_into().unwrap_or(&[0.0; 16]);
                    let y0: &[f32; 16] = xs[w + 16 * i..w + 16 * i + 16]
                        .try_into()
                        .unwrap_or(&[0.0; 16]);
                    let x0: __m512 = pulp::cast(*x0);
                    let y0: __m512 = pulp::cast(*y0);
                    a[i] = f._mm512_fmadd_ps(v00, x0, a[i]);
                    b[i] = f._mm512_fmadd_ps(v10, x0, b[i]);
                    a[i] = f._mm512_fmadd_ps(v01, y0, a[i]);
                    b[i] = f._mm512_fmadd_ps(v11, y0, b[i]);
                }
            }
            for i in 0..NV {
                let ra: [f32; 16] = pulp::cast(a[i]);
                let rb: [f32; 16] = pulp::cast(b[i]);
                let o = 2 * p * tp + t * w + 16 * i;
                out[o..o + 16].copy_from_slice(&ra);
                let o = (2 * p + 1) * tp + t * w + 16 * i;
                out[o..o + 16].copy_from_slice(&rb);
            }
        }
    }
}

/// Panels of `pc` column pairs; `po[p * panels + k]` = first tile of pair p in panel k.
#[inline(always)]
fn tiled_panel<const NV: usize>(
    simd: V4,
    m: &Tiled,
    po: &[usize],
    panels: usize,
    pc: usize,
    x: &[f32],
    ncols: usize,
    tp: usize,
    out: &mut [f32],
) {
    let f = simd.avx512f;
    let w = NV * 16;
    let tiles = tp / w;
    for t in 0..tiles {
        let xt = &x[t * ncols * w..(t + 1) * ncols * w];
        for k in 0..panels {
            for p in 0..m.pairs {
                let z = f._mm512_setzero_ps();
                let mut a = [z; NV];
                let mut b = [z; NV];
                let o0 = 2 * p * tp + t * w;
                let o1 = (2 * p + 1) * tp + t * w;
                if k > 0 {
                    for i in 0..NV {
                        let s0: &[f32; 16] = out[o0 + 16 * i..o0 + 16 * i + 16]
                            .try_into()
                            .unwrap_or(&[0.0; 16]);
                        let s1: &[f32; 16] = out[o1 + 16 * i..o1 + 16 * i + 16]
                            .try_into()
                            .unwrap_or(&[0.0; 16]);
                        a[i] = pulp::cast(*s0);
                        b[i] = pulp::cast(*s1);
                    }
                }
                let end = if k + 1 < panels {
                    po[p * panels + k + 1]
                } else {
                    m.offs[p + 1]
                };
                for e in po[p * panels + k]..end {
                    let c = m.cols[e] as usize;
                    let Some(xs) = xt.get(c * 2 * w..c * 2 * w + 2 * w) else {
                        continue;
                    };
                    let v = m.vals[e];
                    let v00 = f._mm512_set1_ps(v[0]);
                    let v01 = f._mm512_set1_ps(v[1]);
                    let v10 = f._mm512_set1_ps(v[2]);
                    let v11 = f._mm512_set1_ps(v[3]);
                    for i in 0..NV {
                        let x0: &[f32; 16] =
                            xs[16 * i..16 * i + 16].try_into().unwrap_or(&[0.0; 16]);
                        let y0: &[f32; 16] = xs[w + 16 * i..w + 16 * i + 16]
                            .try_into()
                            .unwrap_or(&[0.0; 16]);
                        let x0: __m512 = pulp::cast(*x0);
                        let y0: __m512 = pulp::cast(*y0);
                        a[i] = f._mm512_fmadd_ps(v00, x0, a[i]);
                        b[i] = f._mm512_fmadd_ps(v10, x0, b[i]);
                        a[i] = f._mm512_fmadd_ps(v01, y0, a[i]);
                        b[i] = f._mm512_fmadd_ps(v11, y0, b[i]);
                    }
                }
                for i in 0..NV {
                    let ra: [f32; 16] = pulp::cast(a[i]);
                    let rb: [f32; 16] = pulp::cast(b[i]);
                    out[o0 + 16 * i..o0 + 16 * i + 16].copy_from_slice(&ra);
                    out[o1 + 16 * i..o1 + 16 * i + 16].copy_from_slice(&rb);
                }
            }
        }
        let _ = pc;
    }
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let (r, c, tp) = (a[0], a[1], a[2]);
    let tiles = tp / TT;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // Tiled 2x2 at density 0.25.
    let mut t = Tiled {
        pairs: r / 2,
        offs: vec![0],
        cols: vec![],
        vals: vec![],
    };
    let mut dense = Array2::<f32>::zeros((r, c));
    for p in 0..r / 2 {
        for q in 0..c / 2 {
            if rng.random_bool(0.25) {
                let v: [f32; 4] = std::array::from_fn(|_| rng.random_range(-1.0..1.0));
                t.cols.push(q as u32);
                t.vals.push(v);
                dense[[2 * p, 2 * q]] = v[0];
                dense[[2 * p, 2 * q + 1]] = v[1];
                dense[[2 * p + 1, 2 * q]] = v[2];
                dense[[2 * p + 1, 2 * q + 1]] = v[3];
            }
        }
        t.offs.push(t.cols.len());
    }
    let mut u = Rows {
        rows: r,
        offs: vec![0],
        cols: vec![],
        vals: vec![],
    };
    for _ in 0..r {
        for q in 0..c {
            if rng.random_bool(0.25) {
                u.cols.push(q as u32);
                u.vals.push(rng.random_range(-1.0..1.0));
            }
        }
        u.offs.push(u.cols.len());
    }
    let xd = Array2::from_shape_fn((c, tp), |_| rng.random_range(-1.0f32..1.0));
    let mut xt = vec![0.0f32; c * tp];
    for cc in 0..c {
        for tok in 0..tp {
            xt[(tok / TT) * c * TT + cc * TT + tok % TT] = xd[[cc, tok]];
        }
    }
    let simd = V4::try_new().expect("avx512");
    let mk = |w: usize| {
        let mut o = vec![0.0f32; c * tp];
        for cc in 0..c {
            for tok in 0..tp {
                o[(tok / w) * c * w + cc * w + tok % w] = xd[[cc, tok]];
            }
        }
        o
    };
    let x128 = mk(128);
    let x192 = mk(192);
    let mut out = vec![0.0f32; r * tp];
    // check
    simd.vectorize(|| tiled_v4(simd, &t, &xt, c, tiles, &mut out, tp));
    let refm = dense.dot(&xd);
    let err = out
        .iter()
        .zip(refm.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("max err tiled {err}");
    let nnz_t = t.vals.len() * 4;
    let nnz_u = u.vals.len();
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    for round in 0..3 {
        let g = |macs: usize, ns: u64| (macs * tp * reps) as f64 / ns as f64;
        let t0 = cpu_ns();
        for _ in 0..reps {
            simd.vectorize(|| tiled_v4(simd, &t, &xt, c, tiles, &mut out, tp));
        }
        let t1 = cpu_ns();
        for _ in 0..reps {
            simd.vectorize(|| rows_v4(simd, &u, &xt, c, tiles, &mut out, tp));
        }
        let t2 = cpu_ns();
        let mut o = Array2::<f32>::zeros((r, tp));
        for _ in 0..reps {
            ndarray::linalg::general_mat_mul(1.0, &dense, &xd, 0.0, &mut o);
        }
        let t3 = cpu_ns();
        for _ in 0..reps {
            simd.vectorize(|| tiled_gen::<4>(simd, &t, &xt, c, tp, &mut out));
        }
        let t4 = cpu_ns();
        for _ in 0..reps {
            simd.vectorize(|| tiled_gen::<8>(simd, &t, &x128, c, tp, &mut out));
        }
        let t5 = cpu_ns();
        for _ in 0..reps {
            simd.vectorize(|| tiled_gen::<12>(simd, &t, &x192, c, tp, &mut out));
        }
        let t6 = cpu_ns();
        let mut pres = Vec::new();
        for pc in std::env::var("PCS")
            .ok()
            .map(|s| {
                s.split(",")
                    .map(|x| x.parse::<usize>().unwrap())
                    .collect::<Vec<_>>()
            })
            .unwrap_or(vec![16usize, 32, 48, 64, 96])
        {
            let panels = (c / 2).div_ceil(pc);
            let mut po = vec![0usize; t.pairs * panels];
            for p in 0..t.pairs {
                for k in 0..panels {
                    po[p * panels + k] = t.offs[p]
                        + t.cols[t.offs[p]..t.offs[p + 1]]
                            .iter()
                            .filter(|&&q| (q as usize) < k * pc)
                            .count();
                }
            }
            let s0 = cpu_ns();
            for _ in 0..reps {
                simd.vectorize(|| {
                    tiled_panel::<4>(simd, &t, &po, panels, pc, &xt, c, tp, &mut out)
                });
            }
            let s1 = cpu_ns();
            for _ in 0..reps {
                simd.vectorize(|| {
                    tiled_panel::<8>(simd, &t, &po, panels, pc, &x128, c, tp, &mut out)
                });
            }
            let s2 = cpu_ns();
            pres.push(format!(
                "pc{pc}: {:.1}/{:.1}",
                g(nnz_t, s1 - s0),
                g(nnz_t, s2 - s1)
            ));
        }
        println!(
            "round {round}: tiled {:.1} GMAC/s ({:.3} ms), rows {:.1} GMAC/s ({:.3} ms), sgemm {:.1} GMAC/s ({:.3} ms)",
            g(nnz_t, t1 - t0),
            (t1 - t0) as f64 / reps as f64 / 1e6,
            g(nnz_u, t2 - t1),
            (t2 - t1) as f64 / reps as f64 / 1e6,
            g(r * c, t3 - t2),
            (t3 - t2) as f64 / reps as f64 / 1e6
        );
        println!("   {}", pres.join("  "));
        println!(
            "   gen4 {:.1} gen8 {:.1} gen12 {:.1}",
            g(nnz_t, t4 - t3),
            g(nnz_t, t5 - t4),
            g(nnz_t, t6 - t5)
        );
    }
}
