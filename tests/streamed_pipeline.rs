//! The pipeline trains from an MLP-input file without holding the group's inputs (issue 12,
//! item 5): the seeded hold-out takes rows out of the streamed file ([`split_reader`]) and every
//! method gets the reader; the results are the bits of the old route, which read the whole
//! calibration and split it with [`split_tokens`].

mod common;

use std::collections::HashMap;
use std::ops::ControlFlow;

use fips::app::pipeline::{CalibrationSource, Silent, Validation, compress_group};
use fips::format::mlp_inputs::{CalibrationRoute, MlpInputs, write_mlp_inputs};
use fips::math::calibration::CalibrationReader;
use fips::math::subset::RowSubset;
use fips::math::validation::{ValidationSet, split_reader, split_tokens};
use fips::methods::params::{SvdLlmParams, SvdParams};
use fips::methods::{Compressor, MethodOutput};
use fips::safetensors::Dtype;
use fips::{
    Activation, Budget, Calibration, Checkpoint, EarlyStopping, FipsError, FipsParams, MlpKind,
    MlpLayout, ParamGuard,
};

/// A report as JSON without its timings (`*_seconds`) and with `data_free` dropped (a Gaussian
/// source is labelled data-free, the same rows from a file are not).
fn comparable(report: &fips::MethodReport) -> fips::serde_json::Value {
    fn strip(v: &mut fips::serde_json::Value) {
        match v {
            fips::serde_json::Value::Object(map) => {
                map.retain(|k, _| !k.ends_with("_seconds") && k != "data_free");
                map.values_mut().for_each(strip);
            }
            fips::serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = fips::serde_json::to_value(report).unwrap();
    strip(&mut v);
    v
}

/// Writes `calibration` as an MLP-input file at `path`, block `b` under the name of block
/// `b + first`, and opens it.
fn write_file(path: &std::path::Path, calibration: &Calibration<f32>, first: usize) -> MlpInputs {
    let views: Vec<_> = calibration
        .inputs()
        .iter()
        .enumerate()
        .map(|(b, z)| (b + first, z.view()))
        .collect();
    write_mlp_inputs(path, &views, Dtype::F32, HashMap::new()).unwrap();
    MlpInputs::open(path).unwrap()
}

fn methods() -> Vec<Box<dyn Compressor<f32>>> {
    vec![
        Box::new(
            FipsParams::new()
                .budget(Budget::Fraction(0.5))
                .steps(12)
                .batch_tokens(64)
                .early_stop(Some(EarlyStopping::new(8)))
                .check()
                .unwrap(),
        ),
        Box::new(
            SvdParams::new()
                .budget(Budget::Fraction(0.5))
                .steps(6)
                .batch_tokens(64)
                .check()
                .unwrap(),
        ),
        Box::new(
            SvdLlmParams::new()
                .budget(Budget::Fraction(0.5))
                .check()
                .unwrap(),
        ),
    ]
}

/// Old route against new, on synthetic data (no shared files needed): the file read whole and
/// split by `split_tokens`, against the file streamed and split by `split_reader`, for FiPS with
/// early stopping (training and validation), trained SVD and SVD-LLM (read whole).
#[test]
fn streamed_split_gives_the_bits_of_the_whole_split() {
    let dir = common::scratch("streamed-split");
    let group = common::shared_dictionary_group::<f32>(common::Dictionary {
        kind: MlpKind::Gated,
        activation: Activation::Silu,
        d: 12,
        i: 24,
        n: 2,
        atoms: 16,
        density: 0.3,
        seed: 5,
    });
    let calibration = common::gaussian_calibration::<f32>(2, 300, 12, 9);
    let file = write_file(&dir.join("acts.safetensors"), &calibration, 3);
    let (fraction, seed) = (0.1, 7);
    for compressor in methods() {
        let run = |calib: &dyn CalibrationReader<f32>, set: &ValidationSet<f32>| {
            compressor
                .compress_validated(&group, calib, Some(set), &mut |_| ControlFlow::Continue(()))
                .unwrap()
        };
        // Old: everything in memory.
        let whole = file.calibration::<f32>(&[3, 4]).unwrap();
        let (train, held) = split_tokens(whole, fraction, seed).unwrap();
        let old: MethodOutput<f32> = run(&train, &ValidationSet::new(&group, &held).unwrap());
        // New: the kept rows read from the file as the trainer asks for them.
        let streamed = file.stream(&[3, 4]).unwrap();
        let (train_rows, held_rows) = split_reader(&streamed, fraction, seed).unwrap();
        assert_eq!(train_rows.tokens(), train.tokens());
        assert!(train_rows.in_memory().is_none());
        let new = run(
            &train_rows,
            &ValidationSet::from_reader(&group, &held_rows).unwrap(),
        );
        let name = compressor.method();
        assert!(old.blocks == new.blocks, "{name}: blocks differ");
        assert_eq!(comparable(&old.report), comparable(&new.report), "{name}");
        let v = new.report.validation.as_ref().expect("a validation report");
        assert_eq!(v.tokens, 30, "{name}");
        assert!(v.rel_error.is_finite() && v.rel_error > 0.0, "{name}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// A subset of a streamed file: out-of-range and empty subsets are typed errors, rows map
/// through the subset to the file's rows.
#[test]
fn row_subset_of_a_file_checks_its_indices() {
    let dir = common::scratch("row-subset");
    let calibration: Calibration<f32> = common::gaussian_calibration(2, 20, 4, 1);
    let file = write_file(&dir.join("acts.safetensors"), &calibration, 0);
    let streamed = file.stream(&[0, 1]).unwrap();
    assert!(matches!(
        RowSubset::<f32>::new(&streamed, vec![]),
        Err(FipsError::EmptyCalibration { .. })
    ));
    assert!(matches!(
        RowSubset::<f32>::new(&streamed, vec![3, 20]),
        Err(FipsError::IndexOutOfRange {
            index: 20,
            len: 20,
            ..
        })
    ));
    let sub = RowSubset::<f32>::new(&streamed, vec![19, 2, 7]).unwrap();
    let rows = sub.rows(1, 0, 3).unwrap();
    for (k, &t) in [19, 2, 7].iter().enumerate() {
        assert_eq!(rows.row(k), calibration.inputs()[1].row(t));
    }
    let mut dst = ndarray::Array2::zeros((1, 4));
    assert!(matches!(
        sub.gather(0, &[3], &mut dst),
        Err(FipsError::IndexOutOfRange { .. })
    ));
    // No hold-out of fewer than 2 tokens, nor outside (0, 1).
    assert!(split_reader::<f32>(&sub, 0.0, 1).is_err());
    let one = RowSubset::<f32>::new(&streamed, vec![4]).unwrap();
    assert!(split_reader::<f32>(&one, 0.5, 1).is_err());
    std::fs::remove_dir_all(dir).ok();
}

/// Through `compress_group` on DeiT-tiny's blocks 0–1: the Gaussian source (produced and held in
/// memory, split by `split_tokens`) against the same rows written to an MLP-input file, streamed
/// (budget 0, split by `split_reader`) and read whole (a budget that fits), with a hold-out,
/// without a validation set and with the held-out inputs from their own file (the text path):
/// the same compressed blocks, manifest and report.
#[test]
fn compress_group_from_a_file_gives_the_bits_of_the_rows_in_memory() {
    let Some(data) =
        common::data_dir("compress_group_from_a_file_gives_the_bits_of_the_rows_in_memory")
    else {
        return;
    };
    let ck = Checkpoint::open(data.join("deit-tiny/model.safetensors")).unwrap();
    let layout = MlpLayout::detect(&ck).unwrap();
    let width = layout.block_tensors()[0].width;
    let dir = common::scratch("streamed-group");
    let (tokens, seed) = (400, 11);
    // Group 0 of the Gaussian source: one draw, the same for both blocks, seeded by `seed + 0`.
    let drawn = Calibration::<f32>::gaussian(2, tokens, width, seed).unwrap();
    let write = |name: &str, calib: &Calibration<f32>| write_file(&dir.join(name), calib, 0);
    let file = write("train.safetensors", &drawn);
    let held_file = write(
        "held.safetensors",
        &Calibration::<f32>::gaussian(2, 50, width, 99).unwrap(),
    );
    // The same file under two budgets: 0 streams it, the default (well above the group's
    // 8 n T d bytes) reads it whole.
    let whole_file = MlpInputs::open(dir.join("train.safetensors")).unwrap();
    let file = file.with_memory_budget(0);
    assert_eq!(file.route(&[0, 1]), CalibrationRoute::Stream);
    assert_eq!(whole_file.route(&[0, 1]), CalibrationRoute::Whole);
    let memory = CalibrationSource::Gaussian { tokens, seed };
    let streamed = CalibrationSource::File(&file);
    let whole = CalibrationSource::File(&whole_file);
    let validations = [
        Validation::Holdout {
            fraction: 0.1,
            seed: 3,
        },
        Validation::None,
        Validation::Source(CalibrationSource::File(&held_file)),
    ];
    for compressor in methods() {
        for validation in &validations {
            if matches!(validation, Validation::None) && compressor.method() == fips::Method::Fips {
                continue; // early stopping needs a validation set
            }
            let run = |source: &CalibrationSource<'_>| {
                compress_group(
                    &ck,
                    &layout,
                    0,
                    &[0, 1],
                    compressor.as_ref(),
                    layout.default_activation(),
                    source,
                    validation,
                    &mut Silent,
                )
                .unwrap()
            };
            let old = run(&memory);
            for (route, source) in [("streamed", &streamed), ("whole", &whole)] {
                let new = run(source);
                let name = format!("{} with {validation:?}, {route}", compressor.method());
                assert!(old.blocks == new.blocks, "{name}: blocks differ");
                assert_eq!(old.manifest, new.manifest, "{name}");
                assert_eq!(comparable(&old.report), comparable(&new.report), "{name}");
                assert!(
                    !new.report.data_free,
                    "{name}: rows read from a file are data"
                );
                assert_eq!(
                    new.report.validation.is_some(),
                    !matches!(validation, Validation::None),
                    "{name}"
                );
            }
        }
    }
    std::fs::remove_dir_all(dir).ok();
}
