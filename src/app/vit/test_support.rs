//! A tiny random ViT for the tests of the ViT's modules.

use ndarray::{Array1, Array2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Block, BlockMlp, LayerNorm, VisionTransformer, VitConfig};
use crate::foundation::activation::Activation;
use crate::foundation::mlp::{DenseMlp, Linear};

/// Width of [`tiny_vit`].
pub(crate) const WIDTH: usize = 8;
/// MLP width of [`tiny_vit`].
pub(crate) const HIDDEN: usize = 12;
/// Classes of [`tiny_vit`].
pub(crate) const CLASSES: usize = 5;

fn random(rng: &mut ChaCha8Rng, shape: (usize, usize), scale: f32) -> Array2<f32> {
    Array2::from_shape_fn(shape, |_| scale * (rng.random::<f32>() - 0.5))
}

fn vector(rng: &mut ChaCha8Rng, len: usize, scale: f32, offset: f32) -> Array1<f32> {
    Array1::from_shape_fn(len, |_| offset + scale * (rng.random::<f32>() - 0.5))
}

fn linear(rng: &mut ChaCha8Rng, out: usize, input: usize) -> Linear<f32> {
    let scale = 2.0 / (input as f32).sqrt();
    let bias = vector(rng, out, 0.2, 0.0);
    match Linear::new(random(rng, (out, input), scale), Some(bias)) {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    }
}

fn norm(rng: &mut ChaCha8Rng, width: usize) -> LayerNorm {
    LayerNorm {
        weight: vector(rng, width, 0.4, 1.0),
        bias: vector(rng, width, 0.2, 0.0),
        eps: 1e-6,
    }
}

/// A two-block ViT of width 8 with two heads, 4 × 4 patches of 8 × 8 images (5 tokens), random
/// weights.
pub(crate) fn tiny_vit(seed: u64) -> VisionTransformer {
    random_vit(
        seed,
        VitConfig {
            width: WIDTH,
            depth: 2,
            heads: 2,
            patch_size: 4,
            image_size: 8,
            num_classes: CLASSES,
            layer_norm_eps: 1e-6,
        },
        HIDDEN,
    )
}

/// A ViT of shape `config` with MLPs `hidden` wide and random weights.
pub(crate) fn random_vit(seed: u64, config: VitConfig, hidden: usize) -> VisionTransformer {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let width = config.width;
    let blocks = (0..config.depth)
        .map(|_| {
            let norm1 = norm(&mut rng, width);
            let qkv = linear(&mut rng, 3 * width, width);
            let proj = linear(&mut rng, width, width);
            let norm2 = norm(&mut rng, width);
            let fc1 = linear(&mut rng, hidden, width);
            let fc2 = linear(&mut rng, width, hidden);
            let mlp = match DenseMlp::standard(fc1, fc2, Activation::Gelu) {
                Ok(m) => m,
                Err(e) => panic!("{e}"),
            };
            Block {
                norm1,
                qkv,
                proj,
                norm2,
                mlp: BlockMlp::Dense(mlp),
            }
        })
        .collect();
    let patch_inputs = 3 * config.patch_size * config.patch_size;
    VisionTransformer {
        patch_weight: random(&mut rng, (width, patch_inputs), 0.5),
        patch_bias: vector(&mut rng, width, 0.2, 0.0),
        cls_token: vector(&mut rng, width, 1.0, 0.0),
        pos_embed: random(&mut rng, (config.tokens(), width), 1.0),
        blocks,
        norm: norm(&mut rng, width),
        head: linear(&mut rng, config.num_classes, width),
        config,
    }
}
