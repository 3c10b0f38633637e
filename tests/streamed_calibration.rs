//! Calibration streamed from an MLP-input file (issue 12, item 5): the trainer reads each batch's
//! rows with positioned reads and recomputes their targets, and gives the weights of the run with
//! the whole calibration in memory; hostile files are typed errors.

use std::collections::HashMap;
use std::path::PathBuf;

use fips::format::mlp_inputs::{MlpInputs, write_mlp_inputs};
use fips::math::calibration::CalibrationReader;
use fips::safetensors::Dtype;
use fips::{
    Activation, DenseMlp, FipsError, FipsParams, GmpSchedule, Linear, ParamGuard, RiglSchedule,
    Sparsifier,
};
use ndarray::{Array2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn randn(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || {
        let z: f32 = StandardNormal.sample(rng);
        scale * z
    })
}

fn gated_group(rng: &mut ChaCha8Rng, n: usize, d: usize, i: usize) -> Vec<DenseMlp<f32>> {
    let (sd, si) = (1.0 / (d as f32).sqrt(), 1.0 / (i as f32).sqrt());
    (0..n)
        .map(|_| {
            DenseMlp::gated(
                Linear::new(randn(rng, i, d, sd), None).unwrap(),
                Linear::new(randn(rng, i, d, sd), None).unwrap(),
                Linear::new(randn(rng, d, i, si), None).unwrap(),
                Activation::Silu,
            )
            .unwrap()
        })
        .collect()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fips-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// Writes `inputs` (block `b` at index `b`) to `path` in `dtype`.
fn write(path: &PathBuf, inputs: &[Array2<f32>], dtype: Dtype) {
    let views: Vec<_> = inputs.iter().map(|z| z.view()).enumerate().collect();
    write_mlp_inputs(path, &views, dtype, HashMap::new()).unwrap();
}

/// The same seed draws the same tokens from the file as from memory, and the per-batch targets
/// recomputed from the dense blocks equal the precomputed ones, so the trained group, the loss
/// curve and the errors are the same bits (RigL with mask updates, and GMP).
///
/// The bits are the same where the BLAS gives a row of `x Wᵀ` the same bits whatever the other
/// rows of `x` (checked first: OpenBLAS's blocked kernels do; a BLAS with a separate small-matrix
/// kernel need not). Elsewhere the trained weights must agree to a tight tolerance. The errors
/// are computed from the same chunks by the same calls in both modes: the same bits always.
#[test]
fn streamed_training_gives_the_in_memory_weights_bit_for_bit() {
    let dir = TempDir::new("streamed-equal");
    let (n, d, i, tokens) = (3, 48, 130, 600);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let group = gated_group(&mut rng, n, d, i);
    let inputs: Vec<_> = (0..n).map(|_| randn(&mut rng, tokens, d, 1.0)).collect();
    let path = dir.0.join("inputs.safetensors");
    write(&path, &inputs, Dtype::F32);
    let picks: Vec<usize> = (0..128).map(|k| (k * 277 + 5) % tokens).collect();
    let whole = group[1].forward(inputs[1].view()).unwrap();
    let batch = group[1]
        .forward(inputs[1].select(Axis(0), &picks).view())
        .unwrap();
    let rows_exact = batch == whole.select(Axis(0), &picks);
    if !rows_exact {
        eprintln!(
            "this BLAS rounds a row differently in a batch: comparing the weights to a tolerance"
        );
    }
    let close = |a: &[f32], b: &[f32], what: &str| {
        if rows_exact {
            assert_eq!(a, b, "{what}");
        } else {
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            let scale = a.iter().map(|x| x.abs()).fold(0.0, f32::max);
            assert!(diff <= 1e-3 * scale, "{what}: max difference {diff}");
        }
    };
    let file = MlpInputs::open(&path).unwrap();
    let ids = [0, 1, 2];
    let in_memory = file.calibration::<f32>(&ids).unwrap();
    let streamed = file.stream(&ids).unwrap();
    assert_eq!(
        CalibrationReader::<f32>::tokens(&streamed),
        in_memory.tokens()
    );
    for sparsifier in [
        Sparsifier::Rigl(RiglSchedule {
            interval: 10,
            ..RiglSchedule::default()
        }),
        Sparsifier::Gmp(GmpSchedule::default()),
    ] {
        let compressor = FipsParams::new()
            .sparsity(0.5)
            .sparsifier(sparsifier)
            .steps(60)
            .batch_tokens(128)
            .learning_rate(1e-2)
            .seed(5)
            .check()
            .unwrap();
        let a = compressor.compress(&group, &in_memory).unwrap();
        let b = compressor.compress(&group, &streamed).unwrap();
        assert!(
            a.report.rel_error < a.report.fips().unwrap().rel_error_init,
            "{sparsifier}: training lowers the error"
        );
        for blk in 0..n {
            for j in 0..3 {
                let (wa, wb) = (
                    a.group.dense_weight(blk, j).unwrap(),
                    b.group.dense_weight(blk, j).unwrap(),
                );
                close(
                    &wa.iter().copied().collect::<Vec<_>>(),
                    &wb.iter().copied().collect::<Vec<_>>(),
                    &format!("{sparsifier}: block {blk} matrix {j}"),
                );
            }
        }
        if rows_exact {
            assert_eq!(a.group, b.group, "{sparsifier}: trained group");
            assert_eq!(a.report.loss_curve, b.report.loss_curve, "{sparsifier}");
            assert_eq!(
                a.report.rel_error.to_bits(),
                b.report.rel_error.to_bits(),
                "{sparsifier}"
            );
            assert_eq!(a.report.block_rel_error, b.report.block_rel_error);
        } else {
            assert!((a.report.rel_error - b.report.rel_error).abs() <= 1e-4);
        }
        let (ai, bi) = (a.report.fips().unwrap(), b.report.fips().unwrap());
        assert_eq!(ai.rel_error_init.to_bits(), bi.rel_error_init.to_bits());
        assert_eq!(ai.block_rel_error_init, bi.block_rel_error_init);
        assert_eq!(a.report.calibration_tokens, b.report.calibration_tokens);
        assert!(!b.report.data_free);
    }
}

/// Reads agree with the whole read, in every float dtype the format allows; indices out of range,
/// a wrong buffer and a block not in the file are typed errors.
#[test]
fn streamed_reads_equal_the_whole_read_and_check_their_requests() {
    let dir = TempDir::new("streamed-reads");
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let inputs: Vec<_> = (0..2).map(|_| randn(&mut rng, 37, 5, 1.0)).collect();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
        let path = dir.0.join(format!("{dtype:?}.safetensors"));
        write(&path, &inputs, dtype);
        let file = MlpInputs::open(&path).unwrap();
        let whole = file.read::<f64>(1).unwrap();
        let streamed = file.stream(&[1]).unwrap();
        let reader: &dyn CalibrationReader<f64> = &streamed;
        assert_eq!(
            (reader.blocks(), reader.tokens(), reader.width()),
            (1, 37, 5)
        );
        assert_eq!(reader.rows(0, 0, 37).unwrap(), whole);
        assert_eq!(
            reader.rows(0, 30, 7).unwrap(),
            whole.slice(ndarray::s![30..37, ..])
        );
        let picks = [36, 0, 17, 17];
        let mut dst = Array2::<f64>::zeros((6, 5));
        reader.gather(0, &picks, &mut dst).unwrap();
        for (k, &t) in picks.iter().enumerate() {
            assert_eq!(dst.row(k), whole.row(t), "{dtype:?} row {t}");
        }
        assert!(dst.row(4).iter().all(|&x| x == 0.0));
        let out_of_range = [
            reader.gather(0, &[37], &mut dst),
            reader.gather(1, &[0], &mut dst),
            reader.rows(0, 30, 8).map(|_| ()),
            reader.rows(0, usize::MAX, 2).map(|_| ()),
        ];
        for r in out_of_range {
            assert!(
                matches!(r, Err(FipsError::IndexOutOfRange { .. })),
                "{dtype:?}: {r:?}"
            );
        }
        let mut narrow = Array2::<f64>::zeros((6, 4));
        assert!(matches!(
            reader.gather(0, &[1], &mut narrow),
            Err(FipsError::ShapeMismatch { .. })
        ));
    }
    let file = MlpInputs::open(dir.0.join("F32.safetensors")).unwrap();
    assert!(matches!(
        file.stream(&[2]),
        Err(FipsError::MissingTensor { .. })
    ));
    assert!(matches!(
        file.stream(&[]),
        Err(FipsError::EmptyCalibration { .. })
    ));
}

/// Hostile files: truncated before opening, truncated after the reader was made, a width that
/// is not the model's, blocks with different token counts, a non-finite value: each a typed error
/// from opening, streaming or training, never a panic or a short read.
#[test]
fn hostile_files_are_typed_errors() {
    let dir = TempDir::new("streamed-hostile");
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (n, d, i, tokens) = (2, 8, 20, 64);
    let group = gated_group(&mut rng, n, d, i);
    let inputs: Vec<_> = (0..n).map(|_| randn(&mut rng, tokens, d, 1.0)).collect();
    let compressor = FipsParams::new()
        .sparsity(0.5)
        .steps(4)
        .batch_tokens(16)
        .check()
        .unwrap();

    // Truncated on disk before it is opened: the header no longer fits the data.
    let path = dir.0.join("truncated.safetensors");
    write(&path, &inputs, Dtype::F32);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 4)
        .unwrap();
    assert!(matches!(
        MlpInputs::open(&path),
        Err(FipsError::Format { .. })
    ));

    // Truncated after the reader was made: the next read says so.
    let path = dir.0.join("shrinks.safetensors");
    write(&path, &inputs, Dtype::F32);
    let file = MlpInputs::open(&path).unwrap();
    let streamed = file.stream(&[0, 1]).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let r = compressor.compress(&group, &streamed);
    assert!(matches!(r, Err(FipsError::Format { .. })), "{r:?}");

    // A width that is not the model's.
    let path = dir.0.join("wide.safetensors");
    let wide: Vec<_> = (0..n)
        .map(|_| randn(&mut rng, tokens, d + 1, 1.0))
        .collect();
    write(&path, &wide, Dtype::F32);
    let file = MlpInputs::open(&path).unwrap();
    let streamed = file.stream(&[0, 1]).unwrap();
    let r = compressor.compress(&group, &streamed);
    assert!(matches!(r, Err(FipsError::ShapeMismatch { .. })), "{r:?}");
    // Fewer blocks than the group.
    let one = file.stream(&[0]).unwrap();
    assert!(matches!(
        compressor.compress(&group, &one),
        Err(FipsError::ShapeMismatch { .. })
    ));

    // Blocks with different token counts.
    let path = dir.0.join("ragged.safetensors");
    let ragged = [inputs[0].clone(), randn(&mut rng, tokens - 1, d, 1.0)];
    write(&path, &ragged, Dtype::F32);
    let file = MlpInputs::open(&path).unwrap();
    assert!(matches!(
        file.stream(&[0, 1]),
        Err(FipsError::ShapeMismatch { .. })
    ));

    // A non-finite value, found when its chunk is read (before any training step).
    let path = dir.0.join("nan.safetensors");
    let mut bad = inputs.clone();
    bad[1][[tokens - 1, 3]] = f32::NAN;
    write(&path, &bad, Dtype::F32);
    let file = MlpInputs::open(&path).unwrap();
    let streamed = file.stream(&[0, 1]).unwrap();
    let r = compressor.compress(&group, &streamed);
    assert!(matches!(r, Err(FipsError::NonFinite { .. })), "{r:?}");
}
