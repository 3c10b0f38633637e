//! How much each block's MLP output matters to the prediction, by token position and by channel
//! (issue 14, item 2): the diagonal Fisher information of every block's MLP output of DeiT-tiny on
//! `calib/` images.
//!
//! ```sh
//! cargo run --release --features images --example output_sensitivity -- [IMAGES]
//! ```
//!
//! For each image a class `k` is drawn from the dense model's own prediction `p` (seeded), and
//! `∂(−log p_k)/∂y_b` (`p − e_k` at the logits) is taken by reverse mode through the whole ViT
//! (`VisionTransformer::mlp_gradients_observed`) at every block's MLP output `y_b`. Its square,
//! summed over images, estimates `F_b[t, c]`, the diagonal of the Fisher information: to second
//! order an error `e` in `y_b[t, c]` alone costs `½ F_b[t, c] e²` of KL(dense ‖ compressed).
//! Printed per block: over channels (summed over tokens) the largest and smallest against the
//! median and the share of the ten largest; over tokens (summed over channels) the class token
//! against the mean patch token, and the patch positions' spread. The first `IMAGES` (default 64)
//! calibration images are used; `eval/` is never read.

use std::path::PathBuf;

use fips::Checkpoint;
use fips::app::images::{load_pixels, read_labels, split};
use fips::app::vit::{VisionTransformer, preprocess};
use ndarray::{Array2, ArrayView1, Axis, s};
use rand::{Rng, SeedableRng};

/// `p − e_k` for a class `k` drawn from `p = softmax(logits)` by the uniform draw `u`.
fn sampled_nll_gradient(logits: ArrayView1<'_, f32>, u: f64) -> Vec<f32> {
    let max = logits.fold(f32::MIN, |m, &v| m.max(v));
    let e: Vec<f64> = logits.iter().map(|&v| f64::from(v - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    let mut acc = 0.0;
    let k = e
        .iter()
        .position(|v| {
            acc += v / sum;
            acc >= u
        })
        .unwrap_or(e.len() - 1);
    e.iter()
        .enumerate()
        .map(|(i, v)| (v / sum) as f32 - if i == k { 1.0 } else { 0.0 })
        .collect()
}

/// `(largest, smallest)` of `values` against their median.
fn spread(values: &[f64]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    (sorted[sorted.len() - 1] / median, sorted[0] / median)
}

fn main() -> fips::Result<()> {
    let data = PathBuf::from(std::env::var("FIPS_DATA_DIR").unwrap_or("../shared/data".into()));
    let checkpoint = Checkpoint::open(data.join("deit-tiny/model.safetensors"))?;
    let vit = VisionTransformer::from_checkpoint(&checkpoint, None)?;
    let calib = load_pixels(&split(&read_labels(data.join("imagenet-sample"))?, "calib"))?;
    let images: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(64usize)
        .clamp(1, calib.len_of(Axis(0)));
    let (t, d) = (vit.config().tokens(), vit.config().width);
    let blocks = vit.config().depth;
    let mut by_channel = vec![vec![0f64; d]; blocks];
    let mut by_token = vec![vec![0f64; t]; blocks];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for start in (0..images).step_by(8) {
        let batch = preprocess(calib.slice(s![start..(start + 8).min(images), .., .., ..]));
        let draws: Vec<f64> = (0..batch.len_of(Axis(0))).map(|_| rng.random()).collect();
        vit.mlp_gradients_observed(
            batch.view(),
            |logits| {
                let mut g = Array2::zeros(logits.raw_dim());
                for ((mut row, z), &u) in g.rows_mut().into_iter().zip(logits.rows()).zip(&draws) {
                    row.assign(&ArrayView1::from(&sampled_nll_gradient(z, u)));
                }
                Ok(g)
            },
            |b, dy| {
                for (row, g) in dy.rows().into_iter().enumerate() {
                    for (c, &v) in g.iter().enumerate() {
                        let v2 = f64::from(v) * f64::from(v);
                        by_channel[b][c] += v2;
                        by_token[b][row % t] += v2;
                    }
                }
            },
        )?;
    }
    println!(
        "{images} calib images; Fisher of each block's MLP output\n\
         block | channels: max/median  min/median  top-10 share | class token / mean patch | patches: max/median  min/median"
    );
    for b in 0..blocks {
        let (c_max, c_min) = spread(&by_channel[b]);
        let mut sorted = by_channel[b].clone();
        sorted.sort_by(|x, y| y.total_cmp(x));
        let top10 = sorted.iter().take(10).sum::<f64>() / sorted.iter().sum::<f64>();
        let patches = &by_token[b][1..];
        let mean_patch = patches.iter().sum::<f64>() / patches.len() as f64;
        let tokens = if mean_patch > 0.0 {
            let (p_max, p_min) = spread(patches);
            format!(
                "{:>10.1} | {p_max:>8.1} {p_min:>10.2}",
                by_token[b][0] / mean_patch
            )
        } else {
            "only the class token reaches the logits".into()
        };
        println!("{b:>5} | {c_max:>8.1} {c_min:>10.2} {top10:>12.2} | {tokens}");
    }
    Ok(())
}
