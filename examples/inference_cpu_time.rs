//! CPU time of one MLP block's forward pass, dense against compact, for a machine shared with
//! other work: wall-clock benchmarks (`cargo bench --bench inference`) scatter by ±50 % when other
//! processes take the cores, while the thread's own CPU time (`/proc/thread-self/schedstat`,
//! Linux) only sees cache interference.
//!
//! ```sh
//! OPENBLAS_NUM_THREADS=1 cargo run --release --example inference_cpu_time -- deit 1,16,197 7
//! OPENBLAS_NUM_THREADS=1 cargo run --release --example inference_cpu_time -- 7b 1,16 3
//! OPENBLAS_NUM_THREADS=1 cargo run --release --example inference_cpu_time -- \
//!     file out/deit/compressed.safetensors 1,16,197 5
//! ```
//!
//! Arguments: shape (`deit`: d = 192, I = 768, standard GELU; `7b`: d = 4096, I = 11008, gated
//! SiLU; both groups of 4 at p = 0.5, s = 0.75, random weights as in the benchmark), token
//! counts, rounds. Every round runs each case for 0.4 s (DeiT) or 2 s (7B; `FIPS_CASE_SECONDS`
//! sets another time, `0` one pass), the cases one after the other: `dense`, `compact-f32` and
//! `compact-bf16` (fresh buffers per pass), `compact-f32-buf`, `compact-bf16-buf` and
//! `compact-f16-buf` (buffers reused; `FIPS_ONLY_CASE=dense,compact-f32-buf` keeps the named
//! ones); printed: the median over rounds
//! of the CPU time per pass (`FIPS_WALL_CLOCK=1`: wall time) and of its ratio to the dense pass
//! of the same round. One thread (sparse kernels; give BLAS one with
//! `OPENBLAS_NUM_THREADS=1`). At one token the AVX2 kernel is also run on its own
//! (`compact-*-v3`); `OPENBLAS_CORETYPE=Haswell` makes OpenBLAS use its AVX2 kernels as well.

#[path = "support/mod.rs"]
mod support;

use fips::repr::sparse_blocked::KernelChoice;
use fips::repr::sparse_mlp::{CompactGroup, ForwardBuffers};
use fips::{Activation, DenseMlp, FipsError, GroupShape, Linear, MlpKind, rank_for_budget};
use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

type Result<T> = std::result::Result<T, FipsError>;

/// This thread's CPU time in ns.
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Whether passes are timed by the wall clock (`FIPS_WALL_CLOCK=1`) instead of the thread's CPU
/// time, which advances in scheduler ticks (4 ms here): for rounds of a few ms.
fn wall_clock() -> bool {
    std::env::var_os("FIPS_WALL_CLOCK").is_some()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

type Case<'a> = (&'static str, Box<dyn Fn() -> Result<()> + 'a>);

/// Runs every case for `seconds` per round (at least one pass; each case's first pass, untimed,
/// in the first round), `rounds` times, and prints the median CPU (or wall) time per pass and the
/// median ratio to the first case (dense) of the same round.
fn measure(label: &str, t: usize, cases: &[Case<'_>], rounds: usize, seconds: f64) -> Result<()> {
    let wall = wall_clock();
    let mut per_pass: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for (k, (_, run)) in cases.iter().enumerate() {
            if round == 0 {
                run()?;
            }
            let start = std::time::Instant::now();
            let c0 = cpu_ns();
            let mut n = 0u32;
            loop {
                run()?;
                n += 1;
                if start.elapsed().as_secs_f64() >= seconds {
                    break;
                }
            }
            let ns = if wall {
                start.elapsed().as_nanos() as f64
            } else {
                cpu_ns().saturating_sub(c0) as f64
            };
            per_pass[k].push(ns / f64::from(n.max(1)) / 1e3);
        }
    }
    for (k, (name, _)) in cases.iter().enumerate() {
        let ratios = per_pass[k]
            .iter()
            .zip(&per_pass[0])
            .map(|(a, b)| a / b)
            .collect::<Vec<_>>();
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &r| (l.min(r), h.max(r)));
        println!(
            "{label} t={t:4} {name:16} {} per pass: median {:10.1} µs; ratio to dense: \
             median {:.3} (range {lo:.3}–{hi:.3})",
            if wall { "wall time" } else { "CPU time" },
            median(per_pass[k].clone()),
            median(ratios),
        );
    }
    Ok(())
}

/// The `file PATH` mode: block 0 of each shared-basis group of a compressed file.
fn from_file(path: &str, tokens: &[usize], rounds: usize) -> Result<()> {
    use fips::format::compact_file::{CompactBlocks, CompactModel};
    let model = CompactModel::read(path, None)?;
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    for (g, blocks) in model.groups.iter().enumerate() {
        let CompactBlocks::SharedBasis(group) = blocks else {
            continue;
        };
        let group = group.clone().with_threads(1);
        let dense = blocks.to_dense_mlp(0)?;
        println!(
            "group {g}: rank {}, {:?} storage, {} of {} factors tiled",
            group.rank(),
            group.dtype(),
            group.tiled_factor_count(),
            group.factor_count()
        );
        let buffers = std::cell::RefCell::new(ForwardBuffers::default());
        for &t in tokens {
            let d = dense.width();
            let x =
                Array2::from_shape_vec((t, d), support::random_values::<f32>(&mut rng, t * d, 1.0))
                    .map_err(|e| FipsError::Numerical(e.to_string()))?;
            let x = x.view();
            let cases: Vec<Case<'_>> = vec![
                ("dense", Box::new(|| dense.forward(x).map(drop))),
                (
                    "compact-buf",
                    Box::new(|| {
                        group
                            .forward_with(0, x, &mut buffers.borrow_mut())
                            .map(drop)
                    }),
                ),
            ];
            measure(&format!("group {g}"), t, &cases, rounds, 0.4)?;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    // OpenBLAS's kernels for this processor (it may not know it: `fips::foundation::blas`).
    fips::foundation::blas::use_native_kernels();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "file") {
        let path = args.get(2).map_or("compressed.safetensors", String::as_str);
        let tokens: Vec<usize> = args.get(3).map_or(vec![1, 16, 197], |t| {
            t.split(',').filter_map(|x| x.parse().ok()).collect()
        });
        let rounds = args.get(4).and_then(|r| r.parse().ok()).unwrap_or(5);
        return from_file(path, &tokens, rounds);
    }
    let big = args.get(1).is_some_and(|a| a == "7b");
    let tokens: Vec<usize> = args.get(2).map_or(vec![1, 16, 197], |t| {
        t.split(',').filter_map(|x| x.parse().ok()).collect()
    });
    let rounds: usize = args.get(3).and_then(|r| r.parse().ok()).unwrap_or(5);
    let tiles = args.get(4).is_some_and(|a| a == "tiles");
    let (kind, act, d, i) = if big {
        (MlpKind::Gated, Activation::Silu, 4096, 11008)
    } else {
        (MlpKind::Standard, Activation::Gelu, 192, 768)
    };
    let shape = GroupShape {
        width: d,
        intermediate: i,
        blocks: 4,
        matrices_per_block: kind.matrices_per_block(),
    };
    let rank = rank_for_budget(shape, 0.5, 0.75)?;
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut lin = |rows: usize, cols: usize| -> Result<Linear<f32>> {
        let w = support::random_values::<f32>(&mut rng, rows * cols, 0.02);
        let w = Array2::from_shape_vec((rows, cols), w)
            .map_err(|e| FipsError::Numerical(e.to_string()))?;
        Linear::new(w, Some(Array1::zeros(rows)))
    };
    let dense = match kind {
        MlpKind::Standard => DenseMlp::standard(lin(i, d)?, lin(d, i)?, act)?,
        MlpKind::Gated => DenseMlp::gated(lin(i, d)?, lin(i, d)?, lin(d, i)?, act)?,
    };
    let basis = support::random_values::<f32>(&mut rng, d * rank, 1.0 / (d as f32).sqrt());
    let f = kind.matrices_per_block();
    let factors = (0..f)
        .map(|j| {
            let (rows, cols) = if j + 1 < f { (i, rank) } else { (rank, i) };
            if tiles {
                support::random_quarter_tiles::<f32>(&mut rng, rows, cols)
            } else {
                support::random_quarter::<f32>(&mut rng, rows, cols)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let biases = (0..f)
        .map(|j| Some(vec![0.0f32; if j + 1 < f { i } else { d }]))
        .collect();
    let c32 = CompactGroup::new(kind, act, (d, rank), basis, factors, biases)?.with_threads(1);
    let cbf = support::to_storage::<half::bf16>(&c32)?.with_threads(1);
    let cf16 = support::to_storage::<half::f16>(&c32)?.with_threads(1);
    let c32v3 = c32.clone().with_kernel(KernelChoice::V3);
    let cbfv3 = cbf.clone().with_kernel(KernelChoice::V3);
    let seconds = std::env::var("FIPS_CASE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if big { 2.0 } else { 0.4 });
    let buf32 = std::cell::RefCell::new(ForwardBuffers::default());
    let buf16 = std::cell::RefCell::new(ForwardBuffers::default());
    let buf_f16 = std::cell::RefCell::new(ForwardBuffers::default());
    for &t in &tokens {
        let x = Array2::from_shape_vec((t, d), support::random_values::<f32>(&mut rng, t * d, 1.0))
            .map_err(|e| FipsError::Numerical(e.to_string()))?;
        let x = x.view();
        let mut cases: Vec<Case<'_>> = vec![
            ("dense", Box::new(|| dense.forward(x).map(drop))),
            ("compact-f32", Box::new(|| c32.forward(0, x).map(drop))),
            ("compact-bf16", Box::new(|| cbf.forward(0, x).map(drop))),
            (
                "compact-f32-buf",
                Box::new(|| c32.forward_with(0, x, &mut buf32.borrow_mut()).map(drop)),
            ),
            (
                "compact-bf16-buf",
                Box::new(|| cbf.forward_with(0, x, &mut buf16.borrow_mut()).map(drop)),
            ),
            (
                "compact-f16-buf",
                Box::new(|| cf16.forward_with(0, x, &mut buf_f16.borrow_mut()).map(drop)),
            ),
        ];
        if t == 1 {
            cases.push(("compact-f32-v3", Box::new(|| c32v3.forward(0, x).map(drop))));
            cases.push((
                "compact-bf16-v3",
                Box::new(|| cbfv3.forward(0, x).map(drop)),
            ));
        }
        if let Ok(only) = std::env::var("FIPS_ONLY_CASE") {
            cases.retain(|(name, _)| only.split(',').any(|o| o == *name));
        }
        let label = if big { "7b" } else { "deit-tiny" };
        measure(label, t, &cases, rounds, seconds)?;
    }
    Ok(())
}
