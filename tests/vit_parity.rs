//! The built-in DeiT forward pass against PyTorch/timm logits on exactly the same pixels.
#![cfg(feature = "app")]

mod common;

use fips::app::vit::{VisionTransformer, preprocess};
use fips::format::checkpoint::Checkpoint;
use ndarray::{Array4, Axis, Ix4, s};

fn parity_inputs(dir: &std::path::Path) -> (Array4<u8>, ndarray::Array2<f32>) {
    let parity = Checkpoint::open(dir.join("deit-tiny/parity.safetensors")).unwrap();
    let pixels = parity
        .read_integers("pixels_u8_nhwc")
        .unwrap()
        .mapv(|p| p as u8)
        .into_dimensionality::<Ix4>()
        .unwrap();
    (pixels, parity.read_matrix("logits").unwrap())
}

#[test]
fn deit_tiny_matches_timm_logits() {
    let Some(dir) = common::data_dir("deit_tiny_matches_timm_logits") else {
        return;
    };
    let model = Checkpoint::open(dir.join("deit-tiny/model.safetensors")).unwrap();
    let vit = VisionTransformer::from_checkpoint(&model, None).unwrap();
    assert_eq!(vit.config().heads, 3);
    assert_eq!(vit.config().depth, 12);
    assert_eq!(vit.parameter_count(), 5_717_416);
    assert_eq!(vit.mlp_weight_count(), 12 * 2 * 192 * 768);
    let (pixels, reference) = parity_inputs(&dir);
    let logits = vit.forward(preprocess(pixels.view()).view()).unwrap();
    let max_diff = (&logits - &reference)
        .mapv(f32::abs)
        .fold(0.0f32, |a, &x| a.max(x));
    println!("max |logit difference| vs timm: {max_diff:.3e}");
    assert!(max_diff <= 1e-3, "max |logit difference| {max_diff}");
}

#[test]
fn captured_mlp_inputs_are_what_the_forward_pass_uses() {
    let Some(dir) = common::data_dir("captured_mlp_inputs_are_what_the_forward_pass_uses") else {
        return;
    };
    let model = Checkpoint::open(dir.join("deit-tiny/model.safetensors")).unwrap();
    let vit = VisionTransformer::from_checkpoint(&model, None).unwrap();
    let (pixels, _) = parity_inputs(&dir);
    let images = preprocess(pixels.slice(s![..3, .., .., ..]));
    let all = vit.forward_capture(images.view(), 0..12).unwrap();
    assert_eq!(all.len(), 12);
    for z in &all {
        assert_eq!(z.dim(), (3 * 197, 192));
        assert!(z.iter().all(|x| x.is_finite()));
    }
    // A sub-range captures the same activations (it stops after block 4).
    let some = vit.forward_capture(images.view(), 3..5).unwrap();
    assert_eq!(some.len(), 2);
    for (a, b) in some.iter().zip(&all[3..5]) {
        assert_eq!(a, b);
    }
    // Replacing an MLP changes the activations downstream of it, not upstream.
    let mut changed = vit.clone();
    let mlp = vit.mlp(5).unwrap().clone();
    let scaled = fips::DenseMlp::standard(
        fips::Linear::new(
            mlp.layers()[0].weight().mapv(|w| 0.5 * w),
            mlp.layers()[0].bias().cloned(),
        )
        .unwrap(),
        mlp.layers()[1].clone(),
        mlp.activation(),
    )
    .unwrap();
    changed.set_mlp(5, scaled).unwrap();
    let after = changed.forward_capture(images.view(), 0..12).unwrap();
    assert_eq!(after[5], all[5]);
    assert_ne!(after[6], all[6]);
    assert!(changed.set_mlp(12, vit.mlp(0).unwrap().clone()).is_err());
    assert!(vit.forward_capture(images.view(), 5..13).is_err());
    assert!(vit.forward(images.slice(s![.., ..2, .., ..])).is_err());
    let _ = images.len_of(Axis(0));
}

/// `LN(x)` row by row with the checkpoint's affine `name.weight`, `name.bias` (timm's ε = 1e-6).
fn layer_norm(
    model: &Checkpoint,
    name: &str,
    x: ndarray::ArrayView2<'_, f32>,
) -> ndarray::Array2<f32> {
    let gamma = model.read_vector::<f32>(&format!("{name}.weight")).unwrap();
    let beta = model.read_vector::<f32>(&format!("{name}.bias")).unwrap();
    let mut out = x.to_owned();
    for mut row in out.rows_mut() {
        let n = row.len() as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + 1e-6).sqrt();
        for ((v, g), b) in row.iter_mut().zip(&gamma).zip(&beta) {
            *v = (((*v as f64 - mean) * inv) as f32) * g + b;
        }
    }
    out
}

#[test]
fn captured_streams_are_the_mlp_inputs_and_the_residual_they_join() {
    let Some(dir) =
        common::data_dir("captured_streams_are_the_mlp_inputs_and_the_residual_they_join")
    else {
        return;
    };
    let model = Checkpoint::open(dir.join("deit-tiny/model.safetensors")).unwrap();
    let vit = VisionTransformer::from_checkpoint(&model, None).unwrap();
    let (pixels, _) = parity_inputs(&dir);
    let images = preprocess(pixels.slice(s![..2, .., .., ..]));
    let inputs = vit.forward_capture(images.view(), 0..12).unwrap();
    let streams = vit.forward_capture_streams(images.view(), 0..12).unwrap();
    assert_eq!(streams.len(), 12);
    let close = |a: &ndarray::Array2<f32>, b: &ndarray::Array2<f32>, tol: f32| {
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = (a - b).iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(diff <= tol * scale.max(1.0), "{diff} vs scale {scale}");
    };
    for (b, ((z, mid), captured)) in streams.iter().zip(&inputs).enumerate() {
        // The MLP input is the captured one, bit for bit, and it is norm2 of the stream beside it.
        assert_eq!(z, captured);
        close(
            &layer_norm(&model, &format!("blocks.{b}.norm2"), mid.view()),
            z,
            1e-4,
        );
    }
    // The last block's output `x + MLP(LN₂ x)`, normed, through the head, is the model's logits.
    let (z, mid) = &streams[11];
    let out = mid + &vit.mlp(11).unwrap().forward(z.view()).unwrap();
    let cls = out.slice(s![..;197, ..]);
    let normed = layer_norm(&model, "norm", cls);
    let head = model.read_matrix::<f32>("head.weight").unwrap();
    let bias = model.read_vector::<f32>("head.bias").unwrap();
    let logits = normed.dot(&head.t()) + &bias;
    close(&logits, &vit.forward(images.view()).unwrap(), 1e-4);
}
