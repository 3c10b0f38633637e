//! Held-out validation inside compression (issue 12, item 4): every group's report carries its
//! errors on tokens it never trained on, for every method, through the pipeline; FiPS's early
//! stopping reads them.

mod common;

use fips::app::pipeline::{CalibrationSource, Silent, Validation, compress_checkpoint_validated};
use fips::format::block_groups::BlockGroups;
use fips::methods::Compressor;
use fips::methods::params::SvdLlmParams;
use fips::{Budget, Checkpoint, EarlyStopping, FipsParams, MlpLayout, ParamGuard};

/// DeiT-tiny's checkpoint, its MLP layout and one group of its first two blocks.
fn first_two_deit_blocks(data: &std::path::Path) -> (Checkpoint, MlpLayout, BlockGroups) {
    let ck = Checkpoint::open(data.join("deit-tiny/model.safetensors")).unwrap();
    let layout = MlpLayout::detect(&ck).unwrap();
    let shapes: Vec<(usize, usize)> = layout
        .block_tensors()
        .iter()
        .map(|b| (b.width, b.intermediate))
        .collect();
    let groups = BlockGroups::parse("0-1", &shapes).unwrap();
    (ck, layout, groups)
}

/// DeiT-tiny's first two blocks on Gaussian calibration with 10 % of the tokens held out: the
/// reports of FiPS (with early stopping) and of SVD-LLM carry validation errors on exactly the
/// held-out tokens; without a validation set they carry none.
#[test]
fn every_method_reports_the_error_on_held_out_tokens() {
    let Some(data) = common::data_dir("every_method_reports_the_error_on_held_out_tokens") else {
        return;
    };
    let (ck, layout, groups) = first_two_deit_blocks(&data);
    let calibration = CalibrationSource::Gaussian {
        tokens: 600,
        seed: 3,
    };
    let fips = FipsParams::new()
        .budget(Budget::Fraction(0.5))
        .steps(12)
        .batch_tokens(128)
        .early_stop(Some(EarlyStopping::new(8)))
        .check()
        .unwrap();
    let svd_llm = SvdLlmParams::new()
        .budget(Budget::Fraction(0.5))
        .check()
        .unwrap();
    let compressors: [&dyn Compressor<f32>; 2] = [&fips, &svd_llm];
    for compressor in compressors {
        let run = compress_checkpoint_validated(
            &ck,
            &layout,
            &groups,
            compressor,
            layout.default_activation(),
            &calibration,
            &Validation::Holdout {
                fraction: 0.1,
                seed: 7,
            },
            &mut Silent,
        )
        .unwrap();
        let report = &run.reports[0];
        assert_eq!(report.calibration_tokens, 540, "{}", compressor.method());
        let v = report.validation.as_ref().expect("a validation report");
        assert_eq!(v.tokens, 60);
        assert_eq!(v.block_rel_error.len(), 2);
        for e in v.block_rel_error.iter().chain([&v.rel_error]) {
            assert!(e.is_finite() && *e > 0.0 && *e < 2.0, "{e}");
        }
        // Held-out Gaussian tokens are other tokens: their error is not the training error.
        assert_ne!(v.rel_error, report.rel_error);
        if compressor.method() == fips::Method::Fips {
            // Scored every 2 steps (patience 8 / 4) until the run ended.
            assert_eq!(v.curve.first().map(|c| c.0), Some(2));
            assert_eq!(v.curve.last().map(|c| c.0), Some(report.steps));
        }
        let json = fips::serde_json::to_value(report).unwrap();
        assert_eq!(json["validation"]["tokens"], 60);
    }
    // Early stopping without a validation set is a typed error before any training.
    let err = compress_checkpoint_validated(
        &ck,
        &layout,
        &groups,
        &fips,
        layout.default_activation(),
        &calibration,
        &Validation::None,
        &mut Silent,
    )
    .unwrap_err();
    assert!(err.to_string().contains("early"), "{err}");
}

/// With images, a validation split holds out whole images: 10 % of 8 DeiT-tiny images is one
/// image's 197 tokens (a split of the tokens would hold out 158 of 1,576), training sees the
/// other seven, and the batch check counts the same training tokens before any work.
#[cfg(feature = "images")]
#[test]
fn image_calibration_holds_out_whole_images() {
    use fips::app::images::{load_pixels, read_labels, split};
    use fips::app::pipeline::check_batch;
    use fips::app::vit::VisionTransformer;
    let Some(data) = common::data_dir("image_calibration_holds_out_whole_images") else {
        return;
    };
    let (ck, layout, groups) = first_two_deit_blocks(&data);
    let vit = VisionTransformer::from_checkpoint(&ck, None).unwrap();
    let calib = split(&read_labels(data.join("imagenet-sample")).unwrap(), "calib");
    let pixels = load_pixels(&calib[..8]).unwrap();
    let calibration = CalibrationSource::Images {
        vit: &vit,
        pixels: pixels.view(),
        class_token_weight: 1,
        streams: None,
    };
    let validation = Validation::Holdout {
        fraction: 0.1,
        seed: 7,
    };
    let svd_llm = SvdLlmParams::new()
        .budget(Budget::Fraction(0.5))
        .check()
        .unwrap();
    let run = compress_checkpoint_validated(
        &ck,
        &layout,
        &groups,
        &svd_llm,
        layout.default_activation(),
        &calibration,
        &validation,
        &mut Silent,
    )
    .unwrap();
    let report = &run.reports[0];
    assert_eq!(report.calibration_tokens, 7 * 197);
    assert_eq!(report.validation.as_ref().map(|v| v.tokens), Some(197));

    let batch = |tokens| {
        FipsParams::new()
            .budget(Budget::Fraction(0.5))
            .batch_tokens(tokens)
            .check()
            .unwrap()
    };
    check_batch(&batch(7 * 197), &calibration, &validation, groups.groups()).unwrap();
    let err = check_batch(
        &batch(7 * 197 + 1),
        &calibration,
        &validation,
        groups.groups(),
    )
    .unwrap_err();
    assert!(
        matches!(err, fips::FipsError::BatchTooLarge { tokens: 1379, .. }),
        "{err}"
    );
}
