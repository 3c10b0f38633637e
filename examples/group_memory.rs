//! Peak memory of a few FiPS training steps on one gated group (Llama-shaped, random weights),
//! with the calibration written to an MLP-input file on disk first and streamed from it (each
//! mini-batch and each evaluation chunk read with positioned reads, never the whole file), against
//! the formula that predicts it (issue 12, item 5).
//!
//! ```sh
//! # one quarter of a Llama-7B group's width (d 1024, I 2752), 4 blocks, 512 tokens per batch:
//! cargo run --release --example group_memory -- 1024 2752 4 2048 512 0.5 0.75 3 gmp
//! # the Llama-7B group itself (d 4096, I 11008): needs the memory the formula prints
//! cargo run --release --example group_memory -- 4096 11008 4 2048 512 0.5 0.75 3 gmp
//! ```
//!
//! Arguments: `d I n TOKENS BATCH p s STEPS {gmp|rigl}`. Prints the process's peak resident set
//! (`VmHWM` from `/proc/self/status`) after each stage and the prediction of the trainer's
//! layout (everything `f32`; `W = f n d I` dense weights, `r` the rank of the budget,
//! `E = r f n I` entries of `V`, `B` tokens per batch, `C = min(T, 4096)` tokens per evaluation
//! chunk, `s₀` the sparsity training starts at: the target for RigL, GMP's initial sparsity, 0.05
//! by default, for GMP). The `T` calibration tokens appear nowhere: they stay on disk.
//!
//! ```text
//! training:  blocks 4W + batch inputs and targets 8 n B d + E / 8 + 12 (1 − s₀) E + 4 E / (f n)
//!   + 16 d r (V held as its kept entries only: value and two Adam moments, 3 × 4 B each; the mask
//!   one bit per entry; one matrix of V, r × I, decoded and then its gradient, at a time; U, its
//!   gradient and its moments 16 d r)
//! start:     4W + 8 d r (U, copy) + max(5 E + E / 8, 4 E + E / 8 + max(10 E / n, 5 E / n + 4W / n,
//!   4W / n + 4 C (3d + 2I))) (V 4E dense from the initialisation, the target's mask as bits next
//!   to it, and one block at a time: its values and mask and their assembled copy, then the block
//!   rebuilt dense, then one chunk: inputs, targets, the rebuilt block's output and hidden state;
//!   then V is compacted within its own buffer)
//! end:       4W + 8 d r + max(4 (1 − s) E + E / 8 + 5 E + 5 E / (f n), 5 E + 4W / n + 4 C (3d + 2I))
//!   (the kept values and the mask next to the assembled result, built one matrix at a time, the
//!   training state released first; then they are dropped and the error measured one dense block
//!   at a time)
//! ```
//!
//! plus the step's other batch buffers (a few `B × I` arrays per block). The initialisation's
//! transients (`V` before and after padding, 4.6E) stay below these. A RigL update step (every 50
//! steps by default; none in the first 49) adds `24 c` bytes for its `c = f_t (1 − s) E` dropped
//! entries and regrowth candidates (0.3E at the default α = 0.05, s = 0.75).

use std::collections::HashMap;

use fips::format::mlp_input_writer::MlpInputWriter;
use fips::format::mlp_inputs::MlpInputs;
use fips::{Budget, FipsParams, GmpSchedule, GroupShape, ParamGuard, RiglSchedule, Sparsifier};
mod support;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// `VmHWM` and `VmRSS` in bytes (Linux; zero elsewhere).
fn memory() -> (u64, u64) {
    let (rss, hwm) = support::memory_kib();
    (hwm * 1024, rss * 1024)
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn stage(name: &str) {
    let (hwm, rss) = memory();
    println!(
        "{name:<32} peak {:>7.3} GiB   now {:>7.3} GiB",
        gib(hwm),
        gib(rss)
    );
}

fn main() -> fips::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let num = |i: usize, default: &str| -> fips::Result<f64> {
        arg(i, default)
            .parse::<f64>()
            .map_err(|e| fips::FipsError::InvalidParameter {
                name: "arguments",
                reason: format!("argument {}: {e}", i + 1),
            })
    };
    let d = num(0, "1024")? as usize;
    let i = num(1, "2752")? as usize;
    let n = num(2, "4")? as usize;
    let tokens = num(3, "2048")? as usize;
    let batch = num(4, "512")? as usize;
    let p = num(5, "0.5")?;
    let s = num(6, "0.75")?;
    let steps = num(7, "3")? as usize;
    let sparsifier = match arg(8, "gmp").as_str() {
        "rigl" => Sparsifier::Rigl(RiglSchedule::default()),
        _ => Sparsifier::Gmp(GmpSchedule::default()),
    };

    let compressor = FipsParams::new()
        .budget(Budget::Fraction(p))
        .sparsity(s)
        .sparsifier(sparsifier)
        .steps(steps)
        .batch_tokens(batch)
        .check()?;
    let shape = GroupShape {
        width: d,
        intermediate: i,
        blocks: n,
        matrices_per_block: 3,
    };
    let rank = compressor.rank_for(shape)?;
    let w = shape.dense_weights() as u64;
    let e = shape.factor_entries(rank) as u64;
    let calib = 2 * 4 * (n * batch * d) as u64;
    let chunk = 4 * (tokens.min(4096) * (3 * d + 2 * i)) as u64;
    let start_sparsity = match sparsifier {
        Sparsifier::Gmp(g) if steps * 3 / 4 > 0 => g.initial_sparsity.min(s),
        _ => s,
    };
    let kept = (12.0 * (1.0 - start_sparsity) * e as f64) as u64;
    let kept_end = (4.0 * (1.0 - s) * e as f64) as u64;
    let bits = e / 8;
    let basis = (d * rank) as u64;
    let matrices = (3 * n) as u64;
    let training = 4 * w + calib + bits + kept + 4 * e / matrices + 16 * basis;
    let (block, nn) = (4 * w / n as u64, n as u64);
    let start = 4 * w
        + 8 * basis
        + (5 * e + bits)
            .max(4 * e + bits + (10 * e / nn).max(5 * e / nn + block).max(block + chunk));
    let end =
        4 * w + 8 * basis + (kept_end + bits + 5 * e + 5 * e / matrices).max(5 * e + block + chunk);
    let predicted = training.max(start).max(end);
    println!(
        "group: d {d}, I {i}, n {n} gated, p {p}, s {s}, rank {rank}, {tokens} calibration tokens, {batch} per batch, {steps} steps, {}",
        sparsifier
    );
    println!(
        "prediction: blocks 4W {:.3} GiB + batch inputs/targets 8nBd {:.3} GiB + mask bits E/8 {:.3} GiB + kept values and moments 12(1 - {start_sparsity})E {:.3} GiB + one matrix of V, then its gradient 4E/(fn) {:.3} GiB + U 16dr {:.3} GiB = {:.3} GiB while training; {:.3} GiB at the start (max(5E + E/8, 4E + E/8 + max(10E/n, 5E/n + a block, a block + a chunk {:.3} GiB))), {:.3} GiB at the end (max(4(1 - s)E + E/8 + 5E + 5E/(fn), 5E + a block + a chunk))",
        gib(4 * w),
        gib(calib),
        gib(bits),
        gib(kept),
        gib(4 * e / matrices),
        gib(16 * basis),
        gib(training),
        gib(start),
        gib(chunk),
        gib(end),
    );
    stage("start");

    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let blocks = support::random_gated_blocks(&mut rng, n, d, i)?;
    stage("blocks built");

    // Calibration streamed to a file in chunks of 256 rows, then streamed from it.
    let path = std::env::temp_dir().join(format!(
        "fips-group-memory-{}.safetensors",
        std::process::id()
    ));
    let ids: Vec<usize> = (0..n).collect();
    let mut writer = MlpInputWriter::create(
        &path,
        &ids,
        tokens,
        d,
        fips::safetensors::Dtype::F32,
        HashMap::new(),
    )?;
    for b in 0..n {
        let mut done = 0;
        while done < tokens {
            let rows = 256.min(tokens - done);
            let chunk: Vec<f32> = (0..rows * d)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            writer.append(b, &chunk)?;
            done += rows;
        }
    }
    writer.finish()?;
    let file = MlpInputs::open(&path)?;
    let calibration = file.stream(&ids)?;
    stage("calibration file opened");

    let started = std::time::Instant::now();
    let mut trainer = compressor.trainer(&blocks, &calibration)?;
    stage("trainer (targets, init)");
    let init = started.elapsed();
    while let Some(progress) = trainer.step()? {
        println!("step {} loss {:.4e}", progress.step, progress.loss);
    }
    stage("after the steps");
    let out = trainer.finish()?;
    stage("finished (pruned, measured)");
    let _ = std::fs::remove_file(&path);
    let (hwm, _) = memory();
    println!(
        "peak RSS {:.3} GiB, predicted {:.3} GiB ({:+.1} %); init {:.1} s, total {:.1} s, rel. error {:.4}",
        gib(hwm),
        gib(predicted),
        100.0 * (hwm as f64 / predicted as f64 - 1.0),
        init.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        out.report.rel_error
    );
    Ok(())
}
