//! The sibling methods on small synthetic problems with known answers, and their bad inputs.

mod common;

use std::ops::ControlFlow;

use common::{Dictionary, gaussian_calibration, relative_error, shared_dictionary_group};
use fips::CompressedBlocks;
use fips::ParamGuard;
use fips::methods::basis_sharing::shared_rank;
use fips::methods::report::MethodDetails;
use fips::methods::{
    BasisSharingParams, Compressor, LayerCollapseParams, MethodOutput, MixedRankParams,
    SvdLlmParams, SvdParams,
};
use fips::{Activation, Budget, Calibration, DenseMlp, FipsError, MlpKind, rank_for_matrix};

const D: usize = 16;
const I: usize = 48;

fn group(kind: MlpKind, n: usize) -> Vec<DenseMlp<f64>> {
    shared_dictionary_group(Dictionary {
        kind,
        activation: if kind == MlpKind::Gated {
            Activation::Silu
        } else {
            Activation::Gelu
        },
        d: D,
        i: I,
        n,
        atoms: 24,
        density: 0.3,
        seed: 2,
    })
}

fn run(
    method: &dyn Compressor<f64>,
    blocks: &[DenseMlp<f64>],
    calib: &Calibration<f64>,
) -> MethodOutput<f64> {
    method
        .compress(blocks, calib, &mut |_| ControlFlow::Continue(()))
        .unwrap()
}

fn rebuilt(out: &MethodOutput<f64>) -> Vec<DenseMlp<f64>> {
    (0..out.blocks.blocks())
        .map(|b| out.blocks.to_dense_mlp(b).unwrap())
        .collect()
}

#[test]
fn full_rank_reproduces_every_layer_exactly() {
    for kind in [MlpKind::Standard, MlpKind::Gated] {
        let blocks = group(kind, 2);
        let calib = gaussian_calibration(2, 400, D, 1);
        // Rank I is full rank for every matrix, and for every stacked type of basis sharing
        // (min(g m, n) ≤ I).
        let full = Budget::Rank(I);
        let methods: Vec<Box<dyn Compressor<f64>>> = vec![
            Box::new(SvdParams::new().budget(full).check().unwrap()),
            Box::new(SvdLlmParams::new().budget(full).check().unwrap()),
            Box::new(BasisSharingParams::new().budget(full).check().unwrap()),
        ];
        for m in methods {
            let out = run(m.as_ref(), &blocks, &calib);
            assert!(
                out.report.rel_error < 1e-9,
                "{kind} {}: {}",
                m.method(),
                out.report.rel_error
            );
            for (orig, new) in blocks.iter().zip(rebuilt(&out)) {
                for (a, b) in orig.layers().iter().zip(new.layers()) {
                    let err = (a.weight() - b.weight())
                        .mapv(f64::abs)
                        .fold(0.0, |x: f64, &y| x.max(y));
                    assert!(err < 1e-9, "{kind} {}: weight error {err}", m.method());
                }
            }
        }
    }
}

#[test]
fn per_layer_methods_use_the_rank_formula_and_count_parameters_exactly() {
    let blocks = group(MlpKind::Standard, 3);
    let calib = gaussian_calibration(3, 400, D, 2);
    let r = rank_for_matrix(I, D, 0.5).unwrap();
    assert_eq!(r, 6);
    for m in [
        Box::new(SvdParams::new().check().unwrap()) as Box<dyn Compressor<f64>>,
        Box::new(SvdLlmParams::new().check().unwrap()),
    ] {
        let out = run(m.as_ref(), &blocks, &calib);
        let p = out.report.parameters;
        assert_eq!(
            p.compressed_weights(),
            3 * 2 * r * (D + I),
            "{}",
            m.method()
        );
        assert!(p.kept_fraction() <= 0.5);
        assert_eq!(p.dense_weights, 3 * 2 * D * I);
    }
}

#[test]
fn whitening_beats_plain_svd_and_training_improves_svd() {
    let blocks = group(MlpKind::Standard, 2);
    // Anisotropic inputs: whitening has something to exploit.
    let mut calib_inputs = gaussian_calibration::<f64>(2, 2000, D, 3).inputs().to_vec();
    for z in &mut calib_inputs {
        for (j, mut col) in z.columns_mut().into_iter().enumerate() {
            col *= 0.2 + 0.3 * j as f64;
        }
    }
    let calib = Calibration::new(calib_inputs).unwrap();
    let svd = run(&SvdParams::new().check().unwrap(), &blocks, &calib);
    let llm = run(&SvdLlmParams::new().check().unwrap(), &blocks, &calib);
    assert!(
        llm.report.rel_error < svd.report.rel_error,
        "{} vs {}",
        llm.report.rel_error,
        svd.report.rel_error
    );
    let trained = run(
        &SvdParams::new()
            .steps(300)
            .batch_tokens(256)
            .optimizer(fips::AdamW {
                learning_rate: 3e-3,
                ..fips::AdamW::default()
            })
            .check()
            .unwrap(),
        &blocks,
        &calib,
    );
    assert_eq!(trained.report.parameters, svd.report.parameters);
    assert!(
        trained.report.rel_error < 0.8 * svd.report.rel_error,
        "training {} vs plain {}",
        trained.report.rel_error,
        svd.report.rel_error
    );
    assert_eq!(trained.report.loss_curve.len(), 300);
    // The reported error is the error of the returned blocks.
    let direct = relative_error(&blocks, &rebuilt(&trained), &calib);
    assert!((direct - trained.report.rel_error).abs() < 1e-9);
}

#[test]
fn basis_sharing_shares_one_basis_per_type() {
    let blocks = group(MlpKind::Gated, 3);
    let calib = gaussian_calibration(3, 500, D, 4);
    let out = run(&BasisSharingParams::new().check().unwrap(), &blocks, &calib);
    let CompressedBlocks::LowRank(g) = &out.blocks else {
        panic!("basis sharing is low rank");
    };
    assert_eq!(g.bases().len(), 3, "one basis for gate, up and down");
    let k_up = shared_rank(I, D, 3, 0.5).unwrap();
    let k_down = shared_rank(D, I, 3, 0.5).unwrap();
    // gate and up: basis [k, d] + 3 coefficients [I, k]; down: basis [k, I] + 3 × [d, k].
    let expected = 2 * (k_up * D + 3 * k_up * I) + (k_down * I + 3 * k_down * D);
    assert_eq!(out.report.parameters.compressed_weights(), expected);
    assert!(out.report.parameters.kept_fraction() <= 0.5);
    for (j, m) in g.matrices().iter().enumerate() {
        assert_eq!(m.basis, Some(j % 3));
    }
    assert!(matches!(
        shared_rank(4, 4, 1, 0.01),
        Err(FipsError::ZeroRank { .. })
    ));
}

#[test]
fn mixed_rank_meets_its_budget_and_more_budget_never_hurts() {
    let blocks = group(MlpKind::Standard, 3);
    let calib = gaussian_calibration(3, 600, D, 5);
    let dense = 3 * 2 * D * I;
    let mut last = f64::INFINITY;
    for p in [0.3, 0.45, 0.6, 0.8] {
        let method = MixedRankParams::new()
            .budget(p)
            .residual_rank(0)
            .grid(1)
            .check()
            .unwrap();
        let out = run(&method, &blocks, &calib);
        let kept = out.report.parameters.compressed_weights();
        assert!(
            kept as f64 <= p * dense as f64,
            "p = {p}: {kept} over the budget"
        );
        // Tight: within one rank step of the largest matrix of the budget.
        assert!(
            p * dense as f64 - kept as f64 <= (D * I) as f64,
            "p = {p}: {kept} far below the budget"
        );
        assert!(
            out.report.rel_error <= last + 1e-12,
            "p = {p}: error {} rose above {last}",
            out.report.rel_error
        );
        last = out.report.rel_error;
    }
    // With residuals: the budget includes them and the residual training lowers each matrix's error.
    let method = MixedRankParams::new()
        .budget(0.5)
        .residual_rank(2)
        .grid(2)
        .steps(150)
        .batch_tokens(128)
        .check()
        .unwrap();
    let out = run(&method, &blocks, &calib);
    assert!(out.report.parameters.compressed_weights() as f64 <= 0.5 * dense as f64);
    let MethodDetails::MixedRank(details) = &out.report.details else {
        panic!("mixed-rank reports its details");
    };
    assert!(!details.residual_errors.is_empty());
    for r in &details.residual_errors {
        assert!(r.after < r.before, "{r:?}");
    }
}

#[test]
fn layer_collapse_merges_linearised_blocks() {
    let blocks = group(MlpKind::Standard, 2);
    let calib = gaussian_calibration(2, 800, D, 6);
    let out = run(
        &LayerCollapseParams::new()
            .learning_rate(1e-2)
            .batch_tokens(256)
            .check()
            .unwrap(),
        &blocks,
        &calib,
    );
    let CompressedBlocks::Collapsed(g) = &out.blocks else {
        panic!("layer collapse gives collapsed blocks");
    };
    for b in 0..2 {
        let block = g.block(b).unwrap();
        assert!(block.converged, "slope {}", block.slope);
        assert!((block.slope - 1.0).abs() < 0.05);
    }
    assert_eq!(out.report.parameters.compressed_weights(), 2 * D * D);
    // The densified form computes the collapsed linear map.
    let z = calib.input(1).unwrap();
    let linear = g.forward(1, z).unwrap();
    let dense = out.blocks.to_dense_mlp(1).unwrap().forward(z).unwrap();
    let err = (&linear - &dense)
        .mapv(f64::abs)
        .fold(0.0, |a: f64, &x| a.max(x));
    assert!(err < 1e-9, "{err}");
    // A linear map cannot be perfect, but it is a real fit, far better than dropping the MLP.
    assert!(out.report.rel_error < 0.9, "{}", out.report.rel_error);
}

#[test]
fn bad_inputs_are_typed_errors() {
    assert!(
        SvdParams::new()
            .budget(Budget::Fraction(0.0))
            .check()
            .is_err()
    );
    assert!(SvdParams::new().budget(Budget::Rank(0)).check().is_err());
    assert!(SvdParams::new().batch_tokens(0).check().is_err());
    assert!(
        SvdLlmParams::new()
            .budget(Budget::Fraction(1.5))
            .check()
            .is_err()
    );
    assert!(
        BasisSharingParams::new()
            .budget(Budget::Fraction(f64::NAN))
            .check()
            .is_err()
    );
    assert!(MixedRankParams::new().grid(0).check().is_err());
    assert!(MixedRankParams::new().budget(0.0).check().is_err());
    assert!(MixedRankParams::new().learning_rate(-1.0).check().is_err());
    assert!(LayerCollapseParams::new().lambda(-1.0).check().is_err());
    assert!(LayerCollapseParams::new().tolerance(0.0).check().is_err());

    let blocks = group(MlpKind::Standard, 2);
    let calib = gaussian_calibration(2, 100, D, 7);
    let wrong_blocks = gaussian_calibration(3, 100, D, 7);
    let wrong_width = gaussian_calibration(2, 100, D + 1, 7);
    let methods: Vec<Box<dyn Compressor<f64>>> = vec![
        Box::new(SvdParams::new().check().unwrap()),
        Box::new(SvdLlmParams::new().check().unwrap()),
        Box::new(BasisSharingParams::new().check().unwrap()),
        Box::new(
            MixedRankParams::new()
                .steps(2)
                .batch_tokens(50)
                .check()
                .unwrap(),
        ),
        Box::new(
            LayerCollapseParams::new()
                .max_steps(2)
                .batch_tokens(50)
                .check()
                .unwrap(),
        ),
    ];
    let cont = &mut |_: &fips::Progress| ControlFlow::Continue(());
    for m in &methods {
        assert!(
            matches!(m.compress(&[], &calib, cont), Err(FipsError::EmptyGroup)),
            "{}",
            m.method()
        );
        assert!(matches!(
            m.compress(&blocks, &wrong_blocks, cont),
            Err(FipsError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            m.compress(&blocks, &wrong_width, cont),
            Err(FipsError::ShapeMismatch { .. })
        ));
        let mixed = vec![blocks[0].clone(), group(MlpKind::Gated, 1).remove(0)];
        assert!(matches!(
            m.compress(&mixed, &calib, cont),
            Err(FipsError::GroupMismatch { .. })
        ));
    }
    // A budget too small for one rank.
    let tiny = SvdParams::new()
        .budget(Budget::Fraction(0.01))
        .check()
        .unwrap();
    assert!(matches!(
        Compressor::<f64>::compress(&tiny, &blocks, &calib, cont),
        Err(FipsError::ZeroRank { .. })
    ));
    // LayerCollapse refuses gated MLPs.
    let gated = group(MlpKind::Gated, 2);
    let collapse = LayerCollapseParams::new().check().unwrap();
    assert!(matches!(
        Compressor::<f64>::compress(&collapse, &gated, &calib, cont),
        Err(FipsError::InvalidParameter { .. })
    ));
    // Mixed rank with a batch larger than the calibration set.
    let big = MixedRankParams::new().batch_tokens(10_000).check().unwrap();
    assert!(matches!(
        Compressor::<f64>::compress(&big, &blocks, &calib, cont),
        Err(FipsError::BatchTooLarge { .. })
    ));
}
