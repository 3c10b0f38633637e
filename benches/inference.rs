//! Inference from the compact form against the dense block, same run, same threads.
//!
//! `cargo bench --bench inference` times one MLP block's forward pass for 1, 16 and 197 tokens:
//! - `deit-tiny/*`: DeiT-tiny shapes (d = 192, I = 768, standard GELU, groups of 4, p = 0.5,
//!   s = 0.75, rank from the budget formula: 341);
//! - `llama7b/*`: one Llama-7B-sized gated block (d = 4096, I = 11008, SiLU; rank from the budget
//!   formula for a group of 4 at p = 0.5, s = 0.75: 7288). Only one block's basis and three factors
//!   are built (a block's forward reads exactly those); the rest of the group would not change
//!   the time.
//!
//! Each shape runs `dense` (the crate's `DenseMlp::forward`, f32 BLAS), `compact-f32` and
//! `compact-bf16` (`CompactGroup::forward_with`, reusing its buffers, values and basis stored as
//! f32 or bf16), and `compact-tiled-{f32,bf16}`: the same with masks kept in whole 2×2 tiles
//! (FiPS with `--mask-tiles 2x2`), which take the tiled layout. Weights are random; masks keep
//! each entry (or tile) with probability 1 − s. Throughput is in bytes of weights read
//! per pass (dense: the three or two matrices and biases; compact: the basis twice, the block's
//! values, patterns and biases), so criterion's GiB/s is directly comparable with:
//! - `machine/read-bandwidth`: summing a 512 MiB buffer over the same threads;
//! - `machine/sgemm`: one f32 GEMM of the 7B block's up shape (197 × 4096 by 4096 × 11008),
//!   throughput in floating-point operations.
//!
//! At one token `compact-{f32,bf16}-v3` and `compact-{f32,bf16}-generic` force the AVX2 + FMA
//! and the generic one-token kernels (what a processor without AVX-512, or without AVX2, runs);
//! `compact-*` alone takes the best the processor has (AVX-512 here).
//!
//! Filter cases with a regular expression, e.g.
//! `cargo bench --bench inference -- 'deit-tiny/(dense|compact-f32)/1$'`.
//! `FIPS_BENCH_SMALL=1` skips the 7B shapes. `FIPS_BENCH_THREADS=n` sets the sparse kernels'
//! threads (default: all cores); give BLAS the same with `OPENBLAS_NUM_THREADS=n`.

#[path = "../examples/support/mod.rs"]
mod support;

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use fips::repr::compact::StorageFloat;
use fips::repr::sparse_blocked::KernelChoice;
use fips::repr::sparse_mlp::{CompactGroup, ForwardBuffers};
use fips::{
    Activation, DenseMlp, GroupShape, Linear, MlpKind, nonzeros_for_sparsity, rank_for_budget,
};
use ndarray::{Array1, Array2, linalg::general_mat_mul};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const TOKENS: [usize; 3] = [1, 16, 197];

struct Shape {
    name: &'static str,
    kind: MlpKind,
    act: Activation,
    width: usize,
    intermediate: usize,
    blocks: usize,
}

fn dense_block(rng: &mut ChaCha8Rng, s: &Shape) -> DenseMlp<f32> {
    let (d, i) = (s.width, s.intermediate);
    let mut lin = |rows: usize, cols: usize| {
        let w = Array2::from_shape_vec(
            (rows, cols),
            support::random_values::<f32>(rng, rows * cols, 0.02),
        )
        .expect("shape");
        Linear::new(w, Some(Array1::zeros(rows))).expect("finite")
    };
    match s.kind {
        MlpKind::Standard => DenseMlp::standard(lin(i, d), lin(d, i), s.act),
        MlpKind::Gated => DenseMlp::gated(lin(i, d), lin(i, d), lin(d, i), s.act),
    }
    .expect("dense block")
}

fn compact_block(rng: &mut ChaCha8Rng, s: &Shape, rank: usize, tiles: bool) -> CompactGroup<f32> {
    let (d, i) = (s.width, s.intermediate);
    let basis = support::random_values::<f32>(rng, d * rank, 1.0 / (d as f32).sqrt());
    let f = s.kind.matrices_per_block();
    let factors: Vec<_> = (0..f)
        .map(|j| {
            let (rows, cols) = if j + 1 < f { (i, rank) } else { (rank, i) };
            if tiles {
                support::random_quarter_tiles::<f32>(rng, rows, cols).expect("valid bitmask")
            } else {
                support::random_quarter::<f32>(rng, rows, cols).expect("valid bitmask")
            }
        })
        .collect();
    let biases = (0..f)
        .map(|j| Some(vec![0.0f32; if j + 1 < f { i } else { d }]))
        .collect();
    CompactGroup::new(s.kind, s.act, (d, rank), basis, factors, biases).expect("compact block")
}

fn machine(c: &mut Criterion, threads: usize) {
    let mut group = c.benchmark_group("machine");
    group.sample_size(10);
    let n: usize = 128 << 20; // 512 MiB of f32
    let buffer: Vec<f32> = (0..n).map(|k| (k % 7) as f32).collect();
    group.throughput(Throughput::Bytes((n * 4) as u64));
    group.bench_function("read-bandwidth", |b| {
        b.iter(|| {
            let chunk = n.div_ceil(threads);
            std::thread::scope(|scope| {
                let handles: Vec<_> = buffer
                    .chunks(chunk)
                    .map(|part| {
                        scope.spawn(move || {
                            let mut acc = [0.0f32; 16];
                            for c in part.chunks_exact(16) {
                                for l in 0..16 {
                                    acc[l] += c[l];
                                }
                            }
                            acc.iter().sum::<f32>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or(0.0))
                    .sum::<f32>()
            })
        })
    });
    drop(buffer);
    let (m, k, nn) = (197, 4096, 11008);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let a = Array2::from_shape_vec((m, k), support::random_values::<f32>(&mut rng, m * k, 1.0))
        .expect("shape");
    let w = Array2::from_shape_vec(
        (nn, k),
        support::random_values::<f32>(&mut rng, nn * k, 1.0),
    )
    .expect("shape");
    let mut out = Array2::<f32>::zeros((m, nn));
    group.throughput(Throughput::Elements((2 * m * k * nn) as u64));
    group.bench_function("sgemm", |b| {
        b.iter(|| general_mat_mul(1.0, &a, &w.t(), 0.0, &mut out))
    });
    group.finish();
}

fn bench_shape(c: &mut Criterion, s: &Shape, threads: usize) {
    let shape = GroupShape {
        width: s.width,
        intermediate: s.intermediate,
        blocks: s.blocks,
        matrices_per_block: s.kind.matrices_per_block(),
    };
    let rank = rank_for_budget(shape, 0.5, 0.75).expect("rank");
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let dense = dense_block(&mut rng, s);
    let compact = compact_block(&mut rng, s, rank, false).with_threads(threads);
    let bf16 = support::to_storage::<half::bf16>(&compact)
        .expect("converted block")
        .with_threads(threads);
    let tiled = compact_block(&mut rng, s, rank, true).with_threads(threads);
    let tiled_bf16 = support::to_storage::<half::bf16>(&tiled)
        .expect("converted block")
        .with_threads(threads);
    let dense_bytes = (dense.weight_count() + dense.bias_count()) * 4;
    let expected_nnz = nonzeros_for_sparsity(shape.factor_entries(rank), 0.75) / s.blocks;
    eprintln!(
        "{}: d = {}, I = {}, r = {rank}, block nnz {} (budget {expected_nnz}), dense {:.1} MB, \
         compact f32 {:.1} MB read ({:.3} of dense), bf16 {:.1} MB read",
        s.name,
        s.width,
        s.intermediate,
        compact.nnz(),
        dense_bytes as f64 / 1e6,
        compact.block_bytes_read() as f64 / 1e6,
        compact.block_bytes_read() as f64 / dense_bytes as f64,
        bf16.block_bytes_read() as f64 / 1e6,
    );
    let mut group = c.benchmark_group(s.name);
    group.sample_size(10);
    for &t in &TOKENS {
        let x = Array2::from_shape_vec(
            (t, s.width),
            support::random_values::<f32>(&mut rng, t * s.width, 1.0),
        )
        .expect("shape");
        group.throughput(Throughput::Bytes(dense_bytes as u64));
        group.bench_with_input(BenchmarkId::new("dense", t), &x, |b, x| {
            b.iter(|| dense.forward(x.view()).expect("dense forward"))
        });
        bench_compact(&mut group, "compact-f32", &compact, &x);
        bench_compact(&mut group, "compact-tiled-f32", &tiled, &x);
        bench_compact(&mut group, "compact-bf16", &bf16, &x);
        bench_compact(&mut group, "compact-tiled-bf16", &tiled_bf16, &x);
        if t == 1 {
            for (name, kernel) in [("v3", KernelChoice::V3), ("generic", KernelChoice::Generic)] {
                let f32_k = compact.clone().with_kernel(kernel);
                group.throughput(Throughput::Bytes(f32_k.block_bytes_read() as u64));
                group.bench_with_input(
                    BenchmarkId::new(format!("compact-f32-{name}"), t),
                    &x,
                    |b, x| b.iter(|| f32_k.forward(0, x.view()).expect("compact forward")),
                );
                let bf16_k = bf16.clone().with_kernel(kernel);
                group.throughput(Throughput::Bytes(bf16_k.block_bytes_read() as u64));
                group.bench_with_input(
                    BenchmarkId::new(format!("compact-bf16-{name}"), t),
                    &x,
                    |b, x| b.iter(|| bf16_k.forward(0, x.view()).expect("bf16 forward")),
                );
            }
        }
    }
    group.finish();
}

/// One compact block's forward pass, its buffers reused from pass to pass.
fn bench_compact<S: StorageFloat>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    block: &CompactGroup<S>,
    x: &Array2<f32>,
) {
    group.throughput(Throughput::Bytes(block.block_bytes_read() as u64));
    group.bench_with_input(BenchmarkId::new(name, x.nrows()), x, |b, x| {
        let mut buffers = ForwardBuffers::default();
        b.iter(|| {
            block
                .forward_with(0, x.view(), &mut buffers)
                .expect("compact forward")
        })
    });
}

fn inference(c: &mut Criterion) {
    let threads = std::env::var("FIPS_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    eprintln!(
        "threads: {threads} for the sparse kernels; BLAS: OPENBLAS_NUM_THREADS={}",
        std::env::var("OPENBLAS_NUM_THREADS").unwrap_or_else(|_| "unset (all cores)".into())
    );
    machine(c, threads);
    bench_shape(
        c,
        &Shape {
            name: "deit-tiny",
            kind: MlpKind::Standard,
            act: Activation::Gelu,
            width: 192,
            intermediate: 768,
            blocks: 4,
        },
        threads,
    );
    if std::env::var_os("FIPS_BENCH_SMALL").is_none() {
        bench_shape(
            c,
            &Shape {
                name: "llama7b",
                kind: MlpKind::Gated,
                act: Activation::Silu,
                width: 4096,
                intermediate: 11008,
                blocks: 4,
            },
            threads,
        );
    }
}

criterion_group!(benches, inference);
criterion_main!(benches);
