//! A fingerprint of small training runs, to check that a change of the trainer's memory layout
//! leaves its results bit for bit the same: build this example from two commits and compare the
//! printed lines.
//!
//! ```sh
//! cargo run --release --example train_hash
//! ```
//!
//! Each line hashes (FNV-1a over the bit patterns) every weight and bias of the trained blocks
//! rebuilt dense, the trained factors and masks (FiPS), the loss curve, and the initial and final
//! errors, of one run on a gated group (d 48, I 130, 3 blocks, 600 Gaussian calibration tokens,
//! random weights): RigL with 11 mask updates, GMP with pruning steps, GMP over 3 steps, dense
//! (s = 0), each in both contraction orders, and the trained per-layer SVD.

use std::ops::ControlFlow;

use fips::{
    Calibration, CompressedBlocks, Compressor, ContractionOrder, FipsParams, GmpSchedule,
    MethodReport, ParamGuard, RiglSchedule, Sparsifier, methods::SvdParams,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

mod support;

/// FNV-1a over 64-bit words.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn word(&mut self, x: u64) {
        for byte in x.to_le_bytes() {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn floats<'a>(&mut self, xs: impl IntoIterator<Item = &'a f32>) {
        for x in xs {
            self.word(u64::from(x.to_bits()));
        }
    }
}

fn fingerprint(blocks: &CompressedBlocks<f32>, report: &MethodReport) -> fips::Result<u64> {
    let mut h = Fnv::new();
    for b in 0..blocks.blocks() {
        for layer in blocks.to_dense_mlp(b)?.layers() {
            h.floats(layer.weight().iter());
            if let Some(bias) = layer.bias() {
                h.floats(bias.iter());
            }
        }
    }
    if let CompressedBlocks::SharedBasis(group) = blocks {
        h.floats(group.basis().view().iter());
        for factor in group.factors() {
            h.floats(factor.values().iter());
            for &m in factor.mask().iter() {
                h.word(u64::from(m));
            }
        }
    }
    for loss in &report.loss_curve {
        h.word(loss.to_bits());
    }
    h.word(report.rel_error.to_bits());
    for e in &report.block_rel_error {
        h.word(e.to_bits());
    }
    if let Some(fips) = report.fips() {
        h.word(fips.rel_error_init.to_bits());
        h.word(fips.nnz as u64);
    }
    Ok(h.0)
}

fn main() -> fips::Result<()> {
    let (d, i, n, tokens) = (48, 130, 3, 600);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let blocks = support::random_gated_blocks(&mut rng, n, d, i)?;
    let calibration = Calibration::<f32>::gaussian(n, tokens, d, 3)?;
    let rigl = Sparsifier::Rigl(RiglSchedule {
        drop_fraction: 0.3,
        interval: 10,
        end_fraction: 0.75,
    });
    let gmp = Sparsifier::Gmp(GmpSchedule {
        interval: 8,
        ..GmpSchedule::default()
    });
    let runs: [(&str, Sparsifier, f64, usize); 4] = [
        ("rigl, 11 updates", rigl, 0.75, 150),
        ("gmp, 300 steps", gmp, 0.75, 300),
        ("gmp, 3 steps", gmp, 0.6, 3),
        ("dense", Sparsifier::None, 0.0, 60),
    ];
    for (name, sparsifier, s, steps) in runs {
        for order in [
            ContractionOrder::FactorsFirst,
            ContractionOrder::WeightsFirst,
        ] {
            let out = FipsParams::new()
                .sparsity(s)
                .sparsifier(sparsifier)
                .steps(steps)
                .batch_tokens(64)
                .learning_rate(3e-3)
                .contraction(order)
                .check()?
                .compress_with_validation(&blocks, &calibration, None, |_| {
                    ControlFlow::Continue(())
                })?;
            let group = CompressedBlocks::SharedBasis(out.group);
            println!(
                "{name:<18} {order:<14} error {:.6} hash {:016x}",
                out.report.rel_error,
                fingerprint(&group, &out.report)?
            );
        }
    }
    let svd = SvdParams::new()
        .steps(40)
        .batch_tokens(64)
        .check()?
        .compress(&blocks, &calibration, &mut |_| ControlFlow::Continue(()))?;
    println!(
        "{:<18} {:<14} error {:.6} hash {:016x}",
        "trained svd",
        "weights-first",
        svd.report.rel_error,
        fingerprint(&svd.blocks, &svd.report)?
    );
    Ok(())
}
