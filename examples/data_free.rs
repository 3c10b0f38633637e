//! The library API end to end on the real DeiT-tiny weights, data-free: Gaussian calibration
//! inputs, three groups of four blocks, p = 0.5, s = 0.75, one report per group.
//!
//! ```sh
//! cargo run --release --example data_free -- [path/to/model.safetensors]
//! ```
//!
//! Gaussian inputs lack the structure of real MLP inputs (LayerNorm outputs), so the errors here
//! say little about accuracy; `make demo` calibrates on real images.

use std::ops::ControlFlow;

use fips::ParamGuard;
use fips::format::block_groups::BlockGroups;
use fips::format::checkpoint::Checkpoint;
use fips::format::layout::MlpLayout;
use fips::{Budget, Calibration, FipsParams};

fn main() -> fips::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "../shared/data/deit-tiny/model.safetensors".into());
    let checkpoint = Checkpoint::open(&path)?;
    let layout = MlpLayout::detect(&checkpoint)?;
    println!("{path}: {layout}");
    let shapes = layout.block_shapes()?;
    let groups = BlockGroups::consecutive(&shapes, 4)?;
    let compressor = FipsParams::new()
        .budget(Budget::Fraction(0.5))
        .sparsity(0.75)
        .steps(300)
        .batch_tokens(2048)
        .learning_rate(1e-3)
        .check()?;
    for (g, blocks) in groups.groups().iter().enumerate() {
        let dense = blocks
            .iter()
            .map(|&b| layout.load_block::<f32>(&checkpoint, b, layout.default_activation()))
            .collect::<fips::Result<Vec<_>>>()?;
        let calibration = Calibration::gaussian(blocks.len(), 16_384, dense[0].width(), g as u64)?;
        let out = compressor.compress_with_progress(&dense, &calibration, |p| {
            if p.step.is_multiple_of(100) {
                eprintln!(
                    "group {g} step {}/{}: loss {:.3e}",
                    p.step, p.total_steps, p.loss
                );
            }
            ControlFlow::Continue(())
        })?;
        println!("{}", out.report);
    }
    Ok(())
}
