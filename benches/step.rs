//! Speed of FiPS on the reference shapes, against the machine's own GEMM speed.
//!
//! `cargo bench --bench step` times, for a DeiT-tiny group (d = 192, I = 768, n = 4, 2048 tokens)
//! and a DeiT-B group (d = 768, I = 3072, n = 4, 1024 tokens), both at p = 0.5, s = 0.75 (RigL):
//! - `step/*`: one full training step (batch gather, forward, backward, sparsifier, AdamW);
//! - `init/*`: the shared SVD initialisation by the Gram route and the SVD route;
//! - `sgemm/*`: one plain BLAS sgemm of the step's dominant shape (T × d by d × I), same threads.
//!
//! Throughput is reported in "elem/s" where one element is one floating-point operation: for
//! `step/*` the FLOPs of the GEMMs the step really executes in the contraction order it chose
//! (`StepShape::flops`), for `sgemm/*` `2 m k n`. Their ratio is the step's fraction of the GEMM
//! speed. The dense-equivalent rate is `3 · 2 · T d I f n / time` (printed at start for scaling).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fips::ParamGuard;
use fips::{
    Activation, Budget, Calibration, DenseMlp, FipsParams, InitMethod, Linear, MatrixRole, MlpKind,
    StepShape, shared_init,
};
use ndarray::{Array1, Array2, linalg::general_mat_mul};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

struct Case {
    name: &'static str,
    width: usize,
    intermediate: usize,
    tokens: usize,
}

const CASES: [Case; 2] = [
    Case {
        name: "deit-tiny",
        width: 192,
        intermediate: 768,
        tokens: 2048,
    },
    Case {
        name: "deit-base",
        width: 768,
        intermediate: 3072,
        tokens: 1024,
    },
];
const BLOCKS: usize = 4;

fn randn(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || {
        let z: f32 = StandardNormal.sample(rng);
        scale * z
    })
}

fn blocks(case: &Case) -> Vec<DenseMlp<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (d, i) = (case.width, case.intermediate);
    (0..BLOCKS)
        .map(|_| {
            let fc1 = Linear::new(
                randn(&mut rng, i, d, 1.0 / (d as f32).sqrt()),
                Some(Array1::zeros(i)),
            )
            .unwrap();
            let fc2 = Linear::new(
                randn(&mut rng, d, i, 1.0 / (i as f32).sqrt()),
                Some(Array1::zeros(d)),
            )
            .unwrap();
            DenseMlp::standard(fc1, fc2, Activation::Gelu).unwrap()
        })
        .collect()
}

fn params() -> FipsParams {
    FipsParams::new()
        .budget(Budget::Fraction(0.5))
        .sparsity(0.75)
}

fn bench_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("step");
    group.sample_size(20);
    for case in &CASES {
        let blocks = blocks(case);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let calibration = Calibration::new(
            (0..BLOCKS)
                .map(|_| randn(&mut rng, 4 * case.tokens, case.width, 1.0))
                .collect(),
        )
        .unwrap();
        // Effectively endless: the cosine schedule and RigL's updates run as in a long training.
        let compressor = params()
            .steps(1 << 30)
            .batch_tokens(case.tokens)
            .check()
            .unwrap();
        let mut trainer = compressor.trainer(&blocks, &calibration).unwrap();
        let shape = StepShape {
            tokens: case.tokens,
            width: case.width,
            intermediate: case.intermediate,
            rank: trainer.trained_rank(),
            blocks: BLOCKS,
            matrices_per_block: 2,
        };
        let flops = shape.flops(trainer.contraction());
        println!(
            "{}: rank {} (trained {}), {} order, {:.2} GFLOP per step ({:.2} dense-equivalent)",
            case.name,
            trainer.rank(),
            trainer.trained_rank(),
            trainer.contraction(),
            flops / 1e9,
            shape.dense_equivalent_flops() / 1e9
        );
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(BenchmarkId::from_parameter(case.name), |b| {
            b.iter(|| trainer.step().unwrap().unwrap())
        });
    }
    group.finish();
}

fn bench_sgemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("sgemm");
    group.sample_size(50);
    for case in &CASES {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (m, k, n) = (case.tokens, case.width, case.intermediate);
        let a = randn(&mut rng, m, k, 1.0);
        let b = randn(&mut rng, k, n, 1.0);
        let mut out = Array2::<f32>::zeros((m, n));
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        group.bench_function(
            BenchmarkId::from_parameter(format!("{}-{m}x{k}x{n}", case.name)),
            |bch| bch.iter(|| general_mat_mul(1.0, &a, &b, 0.0, &mut out)),
        );
    }
    group.finish();
}

fn bench_init(c: &mut Criterion) {
    let mut group = c.benchmark_group("init");
    group.sample_size(10);
    for case in &CASES {
        let blocks = blocks(case);
        let shape = fips::GroupShape {
            width: case.width,
            intermediate: case.intermediate,
            blocks: BLOCKS,
            matrices_per_block: 2,
        };
        let rank = fips::rank_for_budget(shape, 0.5, 0.75).unwrap();
        let oriented: Vec<Array2<f32>> = blocks
            .iter()
            .flat_map(|b| {
                b.layers().iter().zip(MlpKind::Standard.matrix_roles()).map(
                    |(l, role)| match role {
                        MatrixRole::Up => l.weight().t().to_owned(),
                        MatrixRole::Down => l.weight().clone(),
                    },
                )
            })
            .collect();
        let views: Vec<_> = oriented.iter().map(|w| w.view()).collect();
        for method in [InitMethod::Gram, InitMethod::Svd] {
            group.bench_function(BenchmarkId::new(method.to_string(), case.name), |b| {
                b.iter(|| shared_init(&views, rank, 32.0, method).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_sgemm, bench_step, bench_init);
criterion_main!(benches);
