//! End-to-end behaviour of `FipsValidParams` on synthetic groups with known structure.

mod common;

use std::ops::ControlFlow;

use common::{Dictionary, gaussian_calibration, relative_error, shared_dictionary_group};
use fips::ParamGuard;
use fips::{
    Activation, Budget, Calibration, ContractionOrder, DenseMlp, FipsError, FipsParams,
    GmpSchedule, InitMethod, Linear, MlpKind, RiglSchedule, Sparsifier, nonzeros_for_sparsity,
    shared_init,
};
use ndarray::{Array2, Axis};

const D: usize = 32;
const I: usize = 64;
const N: usize = 4;

fn group_f64() -> Vec<DenseMlp<f64>> {
    shared_dictionary_group(Dictionary {
        kind: MlpKind::Standard,
        activation: Activation::Gelu,
        d: D,
        i: I,
        n: N,
        atoms: 48,
        density: 0.2,
        seed: 1,
    })
}

/// Per-matrix truncated SVD at the same budget: rank ⌊p d I / (d + I)⌋ for every matrix.
fn per_matrix_svd(blocks: &[DenseMlp<f64>], p: f64) -> Vec<DenseMlp<f64>> {
    let r = (p * (D * I) as f64 / (D + I) as f64).floor() as usize;
    blocks
        .iter()
        .map(|mlp| {
            let layers = mlp
                .layers()
                .iter()
                .map(|l| {
                    let init = shared_init(&[l.weight().view()], r, 32.0, InitMethod::Svd).unwrap();
                    Linear::new(init.basis.dot(&init.factors), l.bias().cloned()).unwrap()
                })
                .collect();
            DenseMlp::from_layers(mlp.kind(), layers, mlp.activation()).unwrap()
        })
        .collect()
}

#[test]
fn training_beats_svd_init_and_per_matrix_svd() {
    let blocks = group_f64();
    let calib = gaussian_calibration(N, 2048, D, 5);
    let baseline = relative_error(&blocks, &per_matrix_svd(&blocks, 0.5), &calib);
    for sparsifier in [
        Sparsifier::Rigl(RiglSchedule::default()),
        Sparsifier::Gmp(GmpSchedule::default()),
    ] {
        let out = FipsParams::new()
            .budget(Budget::Fraction(0.5))
            .sparsity(0.75)
            .sparsifier(sparsifier)
            .steps(600)
            .batch_tokens(512)
            .learning_rate(2e-3)
            .min_learning_rate(1e-4)
            .check()
            .unwrap()
            .compress(&blocks, &calib)
            .unwrap();
        let r = &out.report;
        println!("{sparsifier}: {r}\nper-matrix SVD at the same budget: {baseline:.4}");
        assert!(
            r.parameters.compressed_weights() as f64 <= 0.5 * r.parameters.dense_weights as f64
        );
        assert!(
            r.rel_error < 0.5 * r.fips().unwrap().rel_error_init,
            "{sparsifier}: training should at least halve the budget-matched SVD error ({} -> {})",
            r.fips().unwrap().rel_error_init,
            r.rel_error
        );
        assert!(
            r.rel_error < 0.8 * baseline,
            "{sparsifier}: FiPS {} should beat per-matrix SVD {baseline} at the same budget",
            r.rel_error
        );
        // The report's error is the error of the returned group.
        let rebuilt: Vec<_> = (0..N).map(|b| out.group.to_dense_mlp(b).unwrap()).collect();
        let direct = relative_error(&blocks, &rebuilt, &calib);
        assert!(
            (direct - r.rel_error).abs() < 1e-9,
            "{direct} vs {}",
            r.rel_error
        );
        // RigL trains at the target sparsity from the start, so its loss must go down (GMP's rises
        // while it prunes from 5 % to 75 %).
        if matches!(sparsifier, Sparsifier::Rigl(_)) {
            let first: f64 = r.loss_curve[..20].iter().sum();
            let last: f64 = r.loss_curve[r.loss_curve.len() - 20..].iter().sum();
            assert!(last < 0.5 * first, "loss {first} -> {last}");
        }
    }
}

#[test]
fn sparsity_and_parameter_count_are_exact() {
    let blocks = group_f64();
    let calib = gaussian_calibration(N, 256, D, 2);
    for target in [0.5, 0.75, 0.9] {
        for sparsifier in [
            Sparsifier::Rigl(RiglSchedule {
                interval: 7,
                ..Default::default()
            }),
            Sparsifier::Gmp(GmpSchedule {
                interval: 7,
                ..Default::default()
            }),
        ] {
            for steps in [0, 1, 53] {
                let compress = |spend: bool| {
                    FipsParams::new()
                        .spend_unused_rank(spend)
                        .sparsity(target)
                        .sparsifier(sparsifier)
                        .steps(steps)
                        .batch_tokens(64)
                        .learning_rate(1e-3)
                        .check()
                        .unwrap()
                        .compress(&blocks, &calib)
                        .unwrap()
                };
                // The reference's count: the padded components' parameters are not given to V.
                let out = compress(false);
                let g = &out.group;
                let entries = g.rank() * N * 2 * I;
                assert_eq!(
                    g.nnz(),
                    nonzeros_for_sparsity(entries, target),
                    "{sparsifier} s={target} steps={steps}"
                );
                assert!(g.sparsity() >= target && g.sparsity() < target + 1.0 / entries as f64);
                let count = g.parameter_count();
                assert_eq!(count.basis, D * g.rank());
                assert_eq!(count.compressed_weights(), D * g.rank() + g.nnz());
                let budget = 0.5 * count.dense_weights as f64;
                assert!(count.compressed_weights() as f64 <= budget);
                // Less than one more rank unit below the budget.
                assert!(budget - (count.compressed_weights() as f64) < (D + 2 * N * I) as f64);
                for v in g.factors() {
                    let outside = v
                        .values()
                        .iter()
                        .zip(v.mask().iter())
                        .filter(|&(&x, &m)| !m && x != 0.0)
                        .count();
                    assert_eq!(outside, 0, "masked entries must be zero");
                    assert_eq!(v.to_csr().nnz(), v.nnz());
                }
                assert_eq!(out.report.fips().unwrap().sparsity, g.sparsity());
                assert_eq!(out.report.fips().unwrap().nnz, g.nnz());
                // The default gives the parameters of components that can never train to V:
                // at least the reference's count, never above the budget, and the report counts
                // the group handed back.
                let spent = compress(true);
                let spent_count = spent.group.parameter_count();
                let (written, _) = g.clone().without_unused_rank().unwrap();
                assert!(spent_count.compressed_weights() as f64 <= budget);
                assert!(
                    spent_count.compressed_weights()
                        >= written.parameter_count().compressed_weights()
                );
                assert_eq!(spent.report.parameters, spent_count);
                assert_eq!(spent.report.fips().unwrap().nnz, spent.group.nnz());
            }
        }
    }
}

#[test]
fn dense_full_rank_reproduces_the_blocks() {
    let blocks = group_f64();
    let calib = gaussian_calibration(N, 128, D, 3);
    for rank in [D, D + 20, 3 * D] {
        let out = FipsParams::new()
            .budget(Budget::Rank(rank))
            .sparsity(0.0)
            .steps(0)
            .check()
            .unwrap()
            .compress(&blocks, &calib)
            .unwrap();
        assert_eq!(out.group.rank(), rank);
        assert!(
            out.report.rel_error < 1e-12,
            "rank {rank}: {}",
            out.report.rel_error
        );
        for (b, mlp) in blocks.iter().enumerate() {
            for (m, layer) in mlp.layers().iter().enumerate() {
                let w = out.group.dense_weight(b, m).unwrap();
                let err = (&w - layer.weight())
                    .mapv(f64::abs)
                    .fold(0.0, |a: f64, &x| a.max(x));
                assert!(err < 1e-12, "block {b} matrix {m}: {err}");
            }
        }
    }
}

#[test]
fn same_seed_same_result_in_f32() {
    let blocks: Vec<DenseMlp<f32>> = shared_dictionary_group(Dictionary {
        kind: MlpKind::Gated,
        activation: Activation::Silu,
        d: D,
        i: I,
        n: 2,
        atoms: 40,
        density: 0.3,
        seed: 9,
    });
    let calib: Calibration<f32> = gaussian_calibration(2, 512, D, 4);
    let params = FipsParams::new()
        .steps(60)
        .batch_tokens(128)
        .learning_rate(1e-3)
        .seed(42);
    let a = params.check().unwrap().compress(&blocks, &calib).unwrap();
    let b = params.check().unwrap().compress(&blocks, &calib).unwrap();
    assert_eq!(a.group, b.group);
    assert_eq!(a.report.loss_curve, b.report.loss_curve);
    let c = params
        .clone()
        .seed(43)
        .check()
        .unwrap()
        .compress(&blocks, &calib)
        .unwrap();
    assert_ne!(a.report.loss_curve, c.report.loss_curve);
    assert!(a.report.rel_error < a.report.fips().unwrap().rel_error_init);
}

#[test]
fn contraction_orders_train_identically() {
    let blocks = group_f64();
    let calib = gaussian_calibration(N, 256, D, 8);
    let run = |order| {
        FipsParams::new()
            .steps(30)
            .batch_tokens(64)
            .contraction(order)
            .check()
            .unwrap()
            .compress(&blocks, &calib)
            .unwrap()
    };
    let a = run(ContractionOrder::WeightsFirst);
    let b = run(ContractionOrder::FactorsFirst);
    assert_eq!(
        a.report.fips().unwrap().contraction,
        ContractionOrder::WeightsFirst
    );
    assert_eq!(
        b.report.fips().unwrap().contraction,
        ContractionOrder::FactorsFirst
    );
    for (x, y) in a.report.loss_curve.iter().zip(&b.report.loss_curve) {
        assert!((x - y).abs() <= 1e-9 * x.abs(), "{x} vs {y}");
    }
}

#[test]
fn f32_and_f64_agree() {
    let blocks64 = group_f64();
    let blocks32: Vec<DenseMlp<f32>> = shared_dictionary_group(Dictionary {
        kind: MlpKind::Standard,
        activation: Activation::Gelu,
        d: D,
        i: I,
        n: N,
        atoms: 48,
        density: 0.2,
        seed: 1,
    });
    let calib64: Calibration<f64> = gaussian_calibration(N, 256, D, 6);
    let calib32 = Calibration::new(
        calib64
            .inputs()
            .iter()
            .map(|z| z.mapv(|x| x as f32))
            .collect(),
    )
    .unwrap();
    let params = FipsParams::new()
        .sparsity(0.0)
        .steps(20)
        .batch_tokens(64)
        .learning_rate(1e-3);
    let a = params
        .check()
        .unwrap()
        .compress(&blocks64, &calib64)
        .unwrap();
    let b = params
        .check()
        .unwrap()
        .compress(&blocks32, &calib32)
        .unwrap();
    assert!((a.report.rel_error - b.report.rel_error).abs() < 1e-3);
}

#[test]
fn progress_reports_every_step_and_can_stop_early() {
    let blocks = group_f64();
    let calib = gaussian_calibration(N, 256, D, 2);
    let mut seen = Vec::new();
    let out = FipsParams::new()
        .sparsifier(Sparsifier::Gmp(GmpSchedule::default()))
        .steps(100)
        .batch_tokens(64)
        .check()
        .unwrap()
        .compress_with_progress(&blocks, &calib, |p| {
            seen.push(*p);
            if p.step == 7 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(seen.len(), 7);
    assert_eq!(
        seen.iter().map(|p| p.step).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    assert!(
        seen.iter()
            .all(|p| p.total_steps == 100 && p.loss.is_finite())
    );
    assert!(
        (seen[0].sparsity.unwrap() - 0.05).abs() < 1e-3,
        "GMP starts at its initial sparsity"
    );
    assert!(seen[0].learning_rate > seen[6].learning_rate);
    assert_eq!(out.report.steps, 7);
    assert_eq!(out.report.loss_curve.len(), 7);
    // Stopped early, still at the target sparsity.
    assert!((out.group.sparsity() - 0.75).abs() < 1e-4);
}

fn standard_block(d: usize, i: usize, act: Activation) -> DenseMlp<f64> {
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    DenseMlp::standard(
        Linear::new(common::randn(&mut rng, i, d, 0.1), None).unwrap(),
        Linear::new(common::randn(&mut rng, d, i, 0.1), None).unwrap(),
        act,
    )
    .unwrap()
}

#[test]
fn bad_inputs_are_typed_errors() {
    let compressor = FipsParams::new().steps(5).batch_tokens(16).check().unwrap();
    let calib = gaussian_calibration::<f64>(2, 64, 8, 0);

    let empty: Vec<DenseMlp<f64>> = vec![];
    assert!(matches!(
        compressor.compress(&empty, &calib),
        Err(FipsError::EmptyGroup)
    ));

    let mixed_width = vec![
        standard_block(8, 16, Activation::Gelu),
        standard_block(9, 16, Activation::Gelu),
    ];
    assert!(matches!(
        compressor.compress(&mixed_width, &calib),
        Err(FipsError::GroupMismatch { block: 1, .. })
    ));
    let mixed_i = vec![
        standard_block(8, 16, Activation::Gelu),
        standard_block(8, 24, Activation::Gelu),
    ];
    assert!(matches!(
        compressor.compress(&mixed_i, &calib),
        Err(FipsError::GroupMismatch { block: 1, .. })
    ));
    let mixed_act = vec![
        standard_block(8, 16, Activation::Gelu),
        standard_block(8, 16, Activation::Relu),
    ];
    assert!(matches!(
        compressor.compress(&mixed_act, &calib),
        Err(FipsError::GroupMismatch { block: 1, .. })
    ));

    let ok = vec![
        standard_block(8, 16, Activation::Gelu),
        standard_block(8, 16, Activation::Gelu),
    ];
    let three_blocks = gaussian_calibration::<f64>(3, 64, 8, 0);
    assert!(matches!(
        compressor.compress(&ok, &three_blocks),
        Err(FipsError::ShapeMismatch { .. })
    ));
    let wrong_width = gaussian_calibration::<f64>(2, 64, 7, 0);
    assert!(matches!(
        compressor.compress(&ok, &wrong_width),
        Err(FipsError::ShapeMismatch { .. })
    ));
    let few_tokens = gaussian_calibration::<f64>(2, 10, 8, 0);
    assert!(matches!(
        compressor.compress(&ok, &few_tokens),
        Err(FipsError::BatchTooLarge {
            batch: 16,
            tokens: 10
        })
    ));

    let zero_rank = FipsParams::new()
        .budget(Budget::Fraction(0.01))
        .steps(5)
        .batch_tokens(16)
        .check()
        .unwrap();
    assert!(matches!(
        zero_rank.compress(&ok, &calib),
        Err(FipsError::ZeroRank { .. })
    ));

    let mut z = Array2::<f64>::zeros((64, 8));
    z[[3, 4]] = f64::NAN;
    assert!(matches!(
        Calibration::new(vec![z.clone(), z]),
        Err(FipsError::NonFinite { .. })
    ));
    let mut w = Array2::<f64>::zeros((16, 8));
    w[[0, 0]] = f64::INFINITY;
    assert!(matches!(
        Linear::new(w, None),
        Err(FipsError::NonFinite { .. })
    ));

    // A learning rate that blows the loss up names the step instead of returning garbage.
    let calib32: Calibration<f32> = gaussian_calibration(2, 64, 8, 0);
    let ok32: Vec<DenseMlp<f32>> = shared_dictionary_group(Dictionary {
        kind: MlpKind::Standard,
        activation: Activation::Relu,
        d: 8,
        i: 16,
        n: 2,
        atoms: 8,
        density: 0.5,
        seed: 3,
    });
    let diverging = FipsParams::new()
        .learning_rate(1e30)
        .min_learning_rate(1e30)
        .weight_decay(0.0)
        .steps(50)
        .batch_tokens(16)
        .check()
        .unwrap();
    match diverging.compress(&ok32, &calib32) {
        Err(FipsError::NonFiniteLoss { step, .. }) => assert!((1..=50).contains(&step)),
        other => panic!("expected a NonFiniteLoss error, got {other:?}"),
    }
}

#[test]
fn gated_groups_compress() {
    let blocks: Vec<DenseMlp<f64>> = shared_dictionary_group(Dictionary {
        kind: MlpKind::Gated,
        activation: Activation::Silu,
        d: D,
        i: I,
        n: 3,
        atoms: 48,
        density: 0.2,
        seed: 4,
    });
    let calib = gaussian_calibration(3, 1024, D, 1);
    let out = FipsParams::new()
        .steps(300)
        .batch_tokens(256)
        .learning_rate(2e-3)
        .check()
        .unwrap()
        .compress(&blocks, &calib)
        .unwrap();
    println!("{}", out.report);
    assert_eq!(out.group.factors().len(), 9);
    assert!(out.report.rel_error < 0.7 * out.report.fips().unwrap().rel_error_init);
    let y = out.group.forward(2, calib.input(2).unwrap()).unwrap();
    let y_dense = out
        .group
        .to_dense_mlp(2)
        .unwrap()
        .forward(calib.input(2).unwrap())
        .unwrap();
    let diff = (&y - &y_dense).mapv(f64::abs).sum_axis(Axis(0)).sum();
    assert!(diff < 1e-8, "forward paths disagree by {diff}");
}

/// With `r > d` the initialisation pads `U` with zero columns; RigL prunes their rows of `V` at
/// the start and they never receive gradient, so they stay unused. The report counts them, and
/// dropping them leaves every rebuilt weight, the kept entries of the other rows and the error
/// as they were, with `d` fewer parameters per component.
#[test]
fn unused_rank_is_reported_and_dropping_it_changes_no_weight() {
    let blocks = group_f64();
    let calib = gaussian_calibration(N, 256, D, 2);
    let out = FipsParams::new()
        .spend_unused_rank(false)
        .sparsity(0.75)
        .sparsifier(Sparsifier::Rigl(RiglSchedule {
            interval: 7,
            ..Default::default()
        }))
        .steps(40)
        .batch_tokens(64)
        .learning_rate(1e-3)
        .check()
        .unwrap()
        .compress(&blocks, &calib)
        .unwrap();
    let trained = out.group;
    let details = out.report.fips().unwrap();
    assert!(
        trained.rank() > D,
        "the budget pads the basis: rank {}",
        trained.rank()
    );
    let padded = trained.rank() - D;
    assert_eq!(details.unused_rank, trained.unused_rank());
    assert_eq!(
        details.unused_rank, padded,
        "every padded component stays unused"
    );
    let (compact, dropped) = trained.clone().without_unused_rank().unwrap();
    assert_eq!(dropped, details.unused_rank);
    assert_eq!(compact.rank(), trained.rank() - dropped);
    assert_eq!(compact.nnz(), trained.nnz());
    let (before, after) = (trained.parameter_count(), compact.parameter_count());
    assert_eq!(
        before.compressed_weights() - after.compressed_weights(),
        D * dropped
    );
    for b in 0..N {
        for m in 0..2 {
            let (w, c) = (
                trained.dense_weight(b, m).unwrap(),
                compact.dense_weight(b, m).unwrap(),
            );
            for (x, y) in w.iter().zip(&c) {
                assert!((x - y).abs() <= 1e-12 * (1.0 + x.abs()), "{x} vs {y}");
            }
        }
    }
    let error = relative_error(
        &blocks,
        &(0..N)
            .map(|b| compact.to_dense_mlp(b).unwrap())
            .collect::<Vec<_>>(),
        &calib,
    );
    assert!(
        (error - out.report.rel_error).abs() <= 1e-9,
        "{error} vs {}",
        out.report.rel_error
    );
}
