//! Dense DeiT-tiny accuracy on the real ImageNet evaluation images.
#![cfg(feature = "images")]

mod common;

use std::time::Instant;

use fips::app::images::{load_pixels, read_labels, split};
use fips::app::metrics::{Accuracy, agreement};
use fips::app::pipeline::{Silent, classify};
use fips::app::vit::VisionTransformer;
use fips::format::checkpoint::Checkpoint;
use ndarray::Array2;

#[test]
fn dense_deit_tiny_reaches_its_reference_accuracy_on_eval() {
    let Some(dir) = common::data_dir("dense_deit_tiny_reaches_its_reference_accuracy_on_eval")
    else {
        return;
    };
    let model = Checkpoint::open(dir.join("deit-tiny/model.safetensors")).unwrap();
    let vit = VisionTransformer::from_checkpoint(&model, None).unwrap();
    let set = dir.join("imagenet-sample");
    let all = read_labels(&set).unwrap();
    let eval = split(&all, "eval");
    assert_eq!(eval.len(), 250);
    let pixels = load_pixels(&eval).unwrap();
    let labels: Vec<usize> = eval.iter().map(|i| i.label).collect();
    let start = Instant::now();
    let logits = classify(&vit, pixels.view(), &mut Silent).unwrap();
    let elapsed = start.elapsed();
    let acc = Accuracy::new(logits.view(), &labels).unwrap();

    // The reference logits (PIL decoding) are rows in labels.tsv order.
    let reference = Checkpoint::open(set.join("reference_logits.safetensors")).unwrap();
    let ref_all: Array2<f32> = reference.read_matrix("logits").unwrap();
    let rows: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, i)| i.split == "eval")
        .map(|(k, _)| k)
        .collect();
    let ref_eval = ref_all.select(ndarray::Axis(0), &rows);
    let agree = agreement(logits.view(), ref_eval.view()).unwrap();
    println!(
        "dense DeiT-tiny on eval: top-1 {:.1}%, top-5 {:.1}%, agreement with PIL-decoded reference {:.1}%, 250 images in {elapsed:.2?}",
        100.0 * acc.top1,
        100.0 * acc.top5,
        100.0 * agree
    );
    assert!(
        (acc.top1 - 0.732).abs() <= 0.01,
        "top-1 {} is not within 1 point of 73.2 %",
        acc.top1
    );
    assert!(
        agree >= 0.98,
        "agreement with the reference predictions {agree}"
    );
}
