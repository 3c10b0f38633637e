//! Peak resident memory of inference from the compressed form against the dense group: one
//! group of 4 blocks held in memory and run, each case in a fresh process, measured as the rise of
//! `VmHWM` (`/proc/self/status`) over the resident size after a BLAS warm-up.
//!
//! ```sh
//! cargo run --release --example inference_memory            # DeiT-tiny and Llama-7B shapes
//! cargo run --release --example inference_memory -- deit    # DeiT-tiny shapes only
//! ```
//!
//! Shapes: DeiT-tiny (d = 192, I = 768, standard GELU) and Llama-7B (d = 4096, I = 11008, gated
//! SiLU), a group of 4 blocks at p = 0.5, s = 0.75 (rank from the budget formula), random weights,
//! masks keeping each entry with probability 1/4. Cases: `dense` (four `DenseMlp`s, f32), `compact-f32`
//! and `compact-bf16` (one `CompactGroup`, built straight in compact form: no dense `V` or `W` is
//! ever made). Each case builds its group, then runs every block on 1 and on 197 tokens; it
//! reports the peak rise after building and after each forward pass, against the dense group's f32
//! weight bytes (the compact-bf16 case also against the dense bf16 bytes, half of them).
//! The 7B dense case holds 2.2 GB.

use std::process::Command;

mod support;

use fips::repr::compact::StorageFloat;
use fips::repr::sparse_mlp::CompactGroup;
use fips::{Activation, DenseMlp, GroupShape, Linear, MlpKind, rank_for_budget};
use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use support::{memory_kib, random_quarter, random_values};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const BLOCKS: usize = 4;
const TOKENS: [usize; 2] = [1, 197];

#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    kind: MlpKind,
    act: Activation,
    width: usize,
    intermediate: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "deit",
        kind: MlpKind::Standard,
        act: Activation::Gelu,
        width: 192,
        intermediate: 768,
    },
    Shape {
        name: "7b",
        kind: MlpKind::Gated,
        act: Activation::Silu,
        width: 4096,
        intermediate: 11008,
    },
];

fn compact_group<S: StorageFloat>(s: Shape, rank: usize) -> Res<CompactGroup<S>> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (d, i) = (s.width, s.intermediate);
    let f = s.kind.matrices_per_block();
    let basis = random_values(&mut rng, d * rank, 1.0 / (d as f32).sqrt());
    let mut factors = Vec::with_capacity(f * BLOCKS);
    for j in 0..f * BLOCKS {
        factors.push(if j % f + 1 < f {
            random_quarter(&mut rng, i, rank)?
        } else {
            random_quarter(&mut rng, rank, i)?
        });
    }
    let biases = vec![None; f * BLOCKS];
    Ok(CompactGroup::new(
        s.kind,
        s.act,
        (d, rank),
        basis,
        factors,
        biases,
    )?)
}

fn dense_group(s: Shape) -> Res<Vec<DenseMlp<f32>>> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (d, i) = (s.width, s.intermediate);
    let mut lin = |rows: usize, cols: usize| -> Res<Linear<f32>> {
        let w = Array2::from_shape_vec((rows, cols), random_values(&mut rng, rows * cols, 0.02))?;
        Ok(Linear::new(w, None::<Array1<f32>>)?)
    };
    (0..BLOCKS)
        .map(|_| {
            Ok(match s.kind {
                MlpKind::Standard => DenseMlp::standard(lin(i, d)?, lin(d, i)?, s.act)?,
                MlpKind::Gated => DenseMlp::gated(lin(i, d)?, lin(i, d)?, lin(d, i)?, s.act)?,
            })
        })
        .collect()
}

fn child(shape: Shape, case: &str) -> Res<()> {
    let group = GroupShape {
        width: shape.width,
        intermediate: shape.intermediate,
        blocks: BLOCKS,
        matrices_per_block: shape.kind.matrices_per_block(),
    };
    let rank = rank_for_budget(group, 0.5, 0.75)?;
    // Warm BLAS up (its buffers) so that the baseline includes them.
    let a = Array2::<f32>::from_elem((256, 256), 0.5);
    std::hint::black_box(a.dot(&a));
    let (base, _) = memory_kib();
    let mut peaks = Vec::new();
    let held;
    let mut inputs = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for &t in &TOKENS {
        inputs.push(Array2::from_shape_vec(
            (t, shape.width),
            random_values::<f32>(&mut rng, t * shape.width, 1.0),
        )?);
    }
    let (after_inputs, _) = memory_kib();
    let base = base.max(after_inputs);
    match case {
        "dense" => {
            let blocks = dense_group(shape)?;
            held = blocks
                .iter()
                .map(|b| 4 * (b.weight_count() + b.bias_count()))
                .sum::<usize>();
            peaks.push(memory_kib().1);
            for x in &inputs {
                for b in &blocks {
                    std::hint::black_box(b.forward(x.view())?);
                }
                peaks.push(memory_kib().1);
            }
        }
        "compact-f32" | "compact-bf16" => {
            macro_rules! run {
                ($s:ty) => {{
                    let g = compact_group::<$s>(shape, rank)?;
                    held = g.stored_bytes();
                    peaks.push(memory_kib().1);
                    for x in &inputs {
                        for b in 0..BLOCKS {
                            std::hint::black_box(g.forward(b, x.view())?);
                        }
                        peaks.push(memory_kib().1);
                    }
                }};
            }
            if case == "compact-f32" {
                run!(f32)
            } else {
                run!(half::bf16)
            }
        }
        other => return Err(format!("unknown case {other}").into()),
    }
    let json = serde_json::json!({
        "rank": rank,
        "held_bytes": held,
        "base_kib": base,
        "peaks_kib": peaks,
    });
    println!("RESULT {json}");
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, shape, case] = args.as_slice()
        && flag == "--child"
    {
        let s = SHAPES
            .iter()
            .find(|s| s.name == shape)
            .ok_or("unknown shape")?;
        return child(*s, case);
    }
    let only = args.first().map(String::as_str);
    let exe = std::env::current_exe()?;
    println!(
        "| shape | case | rank | weights held | peak rise after building | after 1 token | after 197 tokens | peak / dense f32 weights |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for s in SHAPES.iter().filter(|s| only.is_none_or(|o| o == s.name)) {
        let dense_bytes =
            (s.kind.matrices_per_block() * BLOCKS * s.width * s.intermediate * 4) as f64;
        for case in ["dense", "compact-f32", "compact-bf16"] {
            let out = Command::new(&exe)
                .args(["--child", s.name, case])
                .output()?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let Some(line) = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
                return Err(format!(
                    "{} {case}: {}",
                    s.name,
                    String::from_utf8_lossy(&out.stderr)
                )
                .into());
            };
            let j: serde_json::Value = serde_json::from_str(line)?;
            let base = j["base_kib"].as_f64().unwrap_or(0.0);
            let peaks: Vec<f64> = j["peaks_kib"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
                .unwrap_or_default();
            let rise = |k: usize| peaks.get(k).map_or(f64::NAN, |p| (p - base) * 1024.0);
            let mb = |b: f64| format!("{:.2} MB", b / 1e6);
            let peak = rise(peaks.len().saturating_sub(1));
            println!(
                "| {} | {case} | {} | {} | {} | {} | {} | {:.3} |",
                s.name,
                j["rank"],
                mb(j["held_bytes"].as_f64().unwrap_or(0.0)),
                mb(rise(0)),
                mb(rise(1)),
                mb(rise(2)),
                peak / dense_bytes
            );
        }
    }
    Ok(())
}
