//! The training step against the machine's own GEMM, on one shape, with CPU time as well as wall
//! time (so that the ratio survives a machine shared with other work).
//!
//! ```sh
//! cargo run --release --example step_speed -- CASE [STEPS] [THREADS|auto] [TOKENS] [ORDER]
//! OPENBLAS_NUM_THREADS=1 cargo run --release --example step_speed -- stories 200 1
//! ```
//!
//! `CASE` is `tiny` (DeiT-tiny group: d 192, I 768, GELU, 4 blocks, 2048 tokens), `base` (DeiT-B
//! group: d 768, I 3072, 4 blocks, 1024 tokens) or `stories` (stories260k: d 64, I 172, gated SiLU,
//! 5 blocks, 1024 tokens); all at p = 0.5, s = 0.75 (RigL). `THREADS` is the step's thread setting
//! ([`fips::FipsParams::threads`]); BLAS threads come from `OPENBLAS_NUM_THREADS`; `auto` applies
//! [`fips::foundation::thread_plan::step_threads`] to both (re-running itself with the variable set).
//! `ORDER` is the contraction order (`auto`, the default, `factors-first` or `weights-first`).
//!
//! It prints, for the step and for one plain sgemm of the dominant shape (T × d by d × I), the
//! median wall time and the process CPU time per call, the GFLOP/s of both, and the step/sgemm
//! ratio (GEMM FLOPs the step executes in its contraction order over the sgemm's rate). Steps and
//! sgemm calls are interleaved in rounds so that both see the same machine load.

use std::time::Instant;

use fips::{
    Activation, Budget, Calibration, DenseMlp, FipsParams, Linear, MlpKind, ParamGuard, StepShape,
};
use ndarray::{Array1, Array2, linalg::general_mat_mul};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn randn(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || {
        let z: f32 = StandardNormal.sample(rng);
        scale * z
    })
}

fn linear(rng: &mut ChaCha8Rng, out: usize, inp: usize) -> fips::Result<Linear<f32>> {
    Linear::new(
        randn(rng, out, inp, 1.0 / (inp as f32).sqrt()),
        Some(Array1::zeros(out)),
    )
}

/// CPU time of every thread of this process so far (Linux: the sum of `/proc/self/task/*/schedstat`,
/// nanosecond resolution; zero elsewhere), spinning BLAS threads included.
fn cpu_time() -> std::time::Duration {
    let mut ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) {
                ns += s
                    .split_whitespace()
                    .next()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0);
            }
        }
    }
    std::time::Duration::from_nanos(ns)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> fips::Result<()> {
    // OpenBLAS's kernels for this processor (it may not know it: `fips::foundation::blas`).
    fips::foundation::blas::use_native_kernels();
    let mut args = std::env::args().skip(1);
    let case = args.next().unwrap_or_else(|| "tiny".into());
    let steps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(40);
    let threads_arg = args.next().unwrap_or_else(|| "2".into());
    let (d, i, n, kind, act, default_tokens) = match case.as_str() {
        "tiny" => (192, 768, 4, MlpKind::Standard, Activation::Gelu, 2048),
        "base" => (768, 3072, 4, MlpKind::Standard, Activation::Gelu, 1024),
        "stories" => (64, 172, 5, MlpKind::Gated, Activation::Silu, 1024),
        other => {
            eprintln!("unknown case {other:?}: tiny, base or stories");
            std::process::exit(2);
        }
    };
    let tokens: usize = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_tokens);
    let order: fips::ContractionOrder = match args.next() {
        Some(o) => o.parse()?,
        None => fips::ContractionOrder::Auto,
    };
    // `auto`: the thread plan for this shape on this machine, OpenBLAS included (re-runs itself
    // with OPENBLAS_NUM_THREADS set).
    let threads = match threads_arg.as_str() {
        "auto" => {
            let planned = fips::foundation::thread_plan::step_threads(
                tokens,
                d,
                i,
                fips::foundation::thread_plan::available_threads(),
            );
            match fips::foundation::thread_plan::run_with_blas_threads(planned) {
                Ok(Some(code)) => std::process::exit(code),
                Ok(None) => planned,
                Err(e) => {
                    eprintln!("cannot re-run with OPENBLAS_NUM_THREADS={planned}: {e}");
                    std::process::exit(1);
                }
            }
        }
        t => t.parse().unwrap_or(2),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let blocks = (0..n)
        .map(|_| match kind {
            MlpKind::Standard => {
                DenseMlp::standard(linear(&mut rng, i, d)?, linear(&mut rng, d, i)?, act)
            }
            MlpKind::Gated => DenseMlp::gated(
                linear(&mut rng, i, d)?,
                linear(&mut rng, i, d)?,
                linear(&mut rng, d, i)?,
                act,
            ),
        })
        .collect::<fips::Result<Vec<_>>>()?;
    let calibration = Calibration::new(
        (0..n)
            .map(|_| randn(&mut rng, 4 * tokens, d, 1.0))
            .collect(),
    )?;
    let compressor = FipsParams::new()
        .budget(Budget::Fraction(0.5))
        .sparsity(0.75)
        .steps(1 << 30)
        .batch_tokens(tokens)
        .threads(threads)
        .contraction(order)
        .check()?;
    let mut trainer = compressor.trainer(&blocks, &calibration)?;
    let shape = StepShape {
        tokens,
        width: d,
        intermediate: i,
        rank: trainer.trained_rank(),
        blocks: n,
        matrices_per_block: kind.matrices_per_block(),
    };
    let flops = shape.flops(trainer.contraction());
    let (a, b) = (randn(&mut rng, tokens, d, 1.0), randn(&mut rng, d, i, 1.0));
    let mut c = Array2::<f32>::zeros((tokens, i));
    let gemm_flops = 2.0 * (tokens * d * i) as f64;
    // Enough sgemm calls per round to take about as long as one step.
    let per_round = ((flops / gemm_flops).round() as usize).max(1);
    for _ in 0..3 {
        trainer.step()?;
        general_mat_mul(1.0, &a, &b, 0.0, &mut c);
    }
    let (mut step_wall, mut step_cpu, mut gemm_wall, mut gemm_cpu) =
        (vec![], vec![], vec![], vec![]);
    for _ in 0..steps {
        let (t, c0) = (Instant::now(), cpu_time());
        trainer.step()?;
        step_wall.push(t.elapsed().as_secs_f64());
        step_cpu.push((cpu_time() - c0).as_secs_f64());
        let (t, c0) = (Instant::now(), cpu_time());
        for _ in 0..per_round {
            general_mat_mul(1.0, &a, &b, 0.0, &mut c);
        }
        gemm_wall.push(t.elapsed().as_secs_f64() / per_round as f64);
        gemm_cpu.push((cpu_time() - c0).as_secs_f64() / per_round as f64);
    }
    let (sw, sc, gw, gc) = (
        median(step_wall),
        median(step_cpu),
        median(gemm_wall),
        median(gemm_cpu),
    );
    let blas = std::env::var("OPENBLAS_NUM_THREADS").unwrap_or_else(|_| "default".into());
    println!(
        "case {case}: d {d}, I {i}, n {n}, {kind}, T {tokens}, rank {} (trained {}), {} order, \
         {:.3} GFLOP/step; step threads {threads}, OPENBLAS_NUM_THREADS {blas}, {steps} rounds",
        trainer.rank(),
        trainer.trained_rank(),
        trainer.contraction(),
        flops / 1e9
    );
    println!(
        "step  wall {:8.2} ms ({:6.1} GFLOP/s)  cpu {:8.2} ms",
        sw * 1e3,
        flops / sw / 1e9,
        sc * 1e3
    );
    println!(
        "sgemm wall {:8.3} ms ({:6.1} GFLOP/s)  cpu {:8.3} ms   [{tokens}x{d} * {d}x{i}]",
        gw * 1e3,
        gemm_flops / gw / 1e9,
        gc * 1e3
    );
    println!(
        "step/sgemm: wall {:.3}  cpu {:.3}",
        (flops / sw) / (gemm_flops / gw),
        (flops / sc) / (gemm_flops / gc)
    );
    Ok(())
}
