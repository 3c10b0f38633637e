//! Reverse mode through the whole ViT: the gradient of a loss on the logits with respect to every
//! block's MLP weights and biases (what end-to-end distillation of compressed MLPs trains).
//!
//! Rules, row by row over tokens:
//! - linear `y = x Wᵀ + b`: `∂W = ∂yᵀ x`, `∂b = Σ_rows ∂y`, `∂x = ∂y W`;
//! - LayerNorm `y = x̂ ⊙ w + b`, `x̂ = (x − μ) / σ`: with `g = ∂y ⊙ w`,
//!   `∂x = (g − mean(g) − x̂ · mean(g ⊙ x̂)) / σ`;
//! - attention `a = P v`, `P = softmax(s)`, `s = q kᵀ / √d_h`: `∂v = Pᵀ ∂a`, `∂P = ∂a vᵀ`,
//!   `∂s = P ⊙ (∂P − rowsum(∂P ⊙ P))`, `∂q = ∂s k / √d_h`, `∂k = ∂sᵀ q / √d_h`.
//!
//! The activations kept for the backward pass are, per block and token, `x̂₁`, `q k v`, a row of
//! attention probabilities per head, `x̂₂`, the MLP input and its pre-activation: about
//! `(6d + heads · T + I)` floats (≈ 22 MB per DeiT-tiny image over its 12 blocks).

use ndarray::{Array1, Array2, Array3, ArrayView2, ArrayView4, Axis, Zip, linalg::general_mat_mul};

use super::{LayerNorm, VisionTransformer, VitConfig};
use crate::foundation::error::{FipsError, Result, invalid};
use crate::foundation::kernels::RowSplit;
use crate::foundation::mlp::MlpKind;
use crate::foundation::slicing::s;

/// Most activation values [`VisionTransformer::mlp_gradients`] keeps for its backward pass at
/// once (4 GiB of `f32`): `images · T · Σ_blocks (6d + heads · T + I_b)`.
pub const MAX_TAPE_VALUES: usize = 1 << 30;

/// `∂L/∂θ` of one block's MLP, each in its parameter's own layout.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpGradient {
    /// `∂L/∂W_fc1`, `[I, d]`.
    pub fc1_weight: Array2<f32>,
    /// `∂L/∂b_fc1`, `[I]`.
    pub fc1_bias: Array1<f32>,
    /// `∂L/∂W_fc2`, `[d, I]`.
    pub fc2_weight: Array2<f32>,
    /// `∂L/∂b_fc2`, `[d]`.
    pub fc2_bias: Array1<f32>,
}

impl MlpGradient {
    /// `self ← self + other` (gradients of two parts of a batch).
    pub(crate) fn add(&mut self, other: &MlpGradient) {
        self.fc1_weight += &other.fc1_weight;
        self.fc1_bias += &other.fc1_bias;
        self.fc2_weight += &other.fc2_weight;
        self.fc2_bias += &other.fc2_bias;
    }
}

/// The buffers of [`VisionTransformer::mlp_gradients_with`]: what the forward pass keeps for
/// the backward pass and the passes' temporaries, kept between calls so that a training loop
/// allocates them once (a pass of another shape reallocates them).
#[derive(Debug, Default)]
pub struct GradientTape {
    blocks: Vec<BlockTape>,
    /// Temporaries `[B · T, d]`: `LN₁ x`, the heads' outputs, projections and gradients.
    h: Array2<f32>,
    attended: Array2<f32>,
    projected: Array2<f32>,
    /// Temporaries `[B · T, I]`: the activation and `∂L/∂(pre-activation)`.
    hidden: Array2<f32>,
    dpre: Array2<f32>,
    /// `∂L/∂[q | k | v]`, `[B · T, 3d]`, and one head's `∂L/∂P`, `[T, T]`.
    dqkv: Array2<f32>,
    dp: Array2<f32>,
}

/// `a`, reallocated (zeros) when its shape is not `shape`.
fn fit2(a: &mut Array2<f32>, shape: (usize, usize)) {
    if a.dim() != shape {
        *a = Array2::zeros(shape);
    }
}

/// What one block keeps from the forward pass for the backward pass.
#[derive(Debug, Default)]
struct BlockTape {
    /// `x̂` of `norm1` and its rows' `1/σ`.
    normalised1: (Array2<f32>, Array1<f32>),
    /// `[q | k | v]`, `[B · T, 3d]`.
    qkv: Array2<f32>,
    /// Attention probabilities `[B · heads, T, T]`.
    probs: Array3<f32>,
    /// `x̂` of `norm2` and its rows' `1/σ`.
    normalised2: (Array2<f32>, Array1<f32>),
    /// The MLP input `LN₂ x`, `[B · T, d]`.
    mlp_input: Array2<f32>,
    /// fc1's output before the activation, `[B · T, I]`.
    pre_activation: Array2<f32>,
}

impl BlockTape {
    /// Buffers for `rows` tokens of `images` images, `heads` heads, `t` tokens per image, width
    /// `d` and MLP width `i` (kept when they already have these shapes).
    fn fit(&mut self, (rows, images, heads, t, d, i): (usize, usize, usize, usize, usize, usize)) {
        for n in [&mut self.normalised1, &mut self.normalised2] {
            fit2(&mut n.0, (rows, d));
            if n.1.len() != rows {
                n.1 = Array1::zeros(rows);
            }
        }
        fit2(&mut self.qkv, (rows, 3 * d));
        if self.probs.dim() != (images * heads, t, t) {
            self.probs = Array3::zeros((images * heads, t, t));
        }
        fit2(&mut self.mlp_input, (rows, d));
        fit2(&mut self.pre_activation, (rows, i));
    }
}

impl LayerNorm {
    /// `dx ← dx + ∂L/∂x`, from `∂L/∂y` for the rows normalised as `(x̂, 1/σ)`; `dy` is
    /// overwritten.
    fn backward_add(
        &self,
        (normalised, inverse): &(Array2<f32>, Array1<f32>),
        dy: &mut Array2<f32>,
        dx: &mut Array2<f32>,
    ) {
        let n = normalised.ncols() as f32;
        for (((mut g_row, x_row), mut dx_row), &inv) in dy
            .rows_mut()
            .into_iter()
            .zip(normalised.rows())
            .zip(dx.rows_mut())
            .zip(inverse)
        {
            g_row *= &self.weight;
            let mean_g = g_row.sum() / n;
            let mean_gx = g_row.iter().zip(x_row).map(|(&g, &x)| g * x).sum::<f32>() / n;
            Zip::from(&mut dx_row)
                .and(&g_row)
                .and(&x_row)
                .for_each(|d, &g, &x| *d += (g - mean_g - x * mean_gx) * inv);
        }
    }

    /// `∂L/∂x` from `∂L/∂y` for the rows normalised as `(x̂, 1/σ)`.
    fn backward(
        &self,
        normalised: &(Array2<f32>, Array1<f32>),
        dy: ArrayView2<'_, f32>,
    ) -> Array2<f32> {
        let mut dx = Array2::zeros(normalised.0.raw_dim());
        self.backward_add(normalised, &mut dy.to_owned(), &mut dx);
        dx
    }
}

impl VisionTransformer {
    /// The logits `[B, classes]` of normalised images `[B, 3, H, W]` and, with
    /// `∂L/∂logits = loss_gradient(logits)`, the gradient of `L` with respect to every block's MLP
    /// (block order). Every MLP must be dense with two matrices (fc1, fc2).
    pub fn mlp_gradients(
        &self,
        images: ArrayView4<'_, f32>,
        loss_gradient: impl FnOnce(ArrayView2<'_, f32>) -> Result<Array2<f32>>,
    ) -> Result<(Array2<f32>, Vec<MlpGradient>)> {
        self.reverse_mode(
            &mut GradientTape::default(),
            images,
            loss_gradient,
            |_, _| {},
        )
    }

    /// [`Self::mlp_gradients`] in the buffers of `tape` (the same bits): a loop that passes the
    /// same tape to every call of the same shape allocates its activations once.
    pub fn mlp_gradients_with(
        &self,
        tape: &mut GradientTape,
        images: ArrayView4<'_, f32>,
        loss_gradient: impl FnOnce(ArrayView2<'_, f32>) -> Result<Array2<f32>>,
    ) -> Result<(Array2<f32>, Vec<MlpGradient>)> {
        self.reverse_mode(tape, images, loss_gradient, |_, _| {})
    }

    /// [`Self::mlp_gradients`], handing `observe(b, ∂L/∂y_b)` the gradient with respect to block
    /// `b`'s MLP output (`[B · T, d]`, the residual stream's gradient right after that MLP) as the
    /// backward pass reaches it.
    pub fn mlp_gradients_observed(
        &self,
        images: ArrayView4<'_, f32>,
        loss_gradient: impl FnOnce(ArrayView2<'_, f32>) -> Result<Array2<f32>>,
        observe: impl FnMut(usize, ArrayView2<'_, f32>),
    ) -> Result<(Array2<f32>, Vec<MlpGradient>)> {
        self.reverse_mode(&mut GradientTape::default(), images, loss_gradient, observe)
    }

    /// The forward pass with its tape, then the backward pass, calling `observe` per block.
    fn reverse_mode(
        &self,
        tape: &mut GradientTape,
        images: ArrayView4<'_, f32>,
        loss_gradient: impl FnOnce(ArrayView2<'_, f32>) -> Result<Array2<f32>>,
        mut observe: impl FnMut(usize, ArrayView2<'_, f32>),
    ) -> Result<(Array2<f32>, Vec<MlpGradient>)> {
        self.check_images(images)?;
        // Each block's `(fc1, fc2, activation)`, checked once.
        let mlps = (0..self.blocks.len())
            .map(|b| match self.mlp(b)?.layers() {
                [fc1, fc2] if self.mlp(b)?.kind() == MlpKind::Standard => {
                    Ok((fc1, fc2, self.mlp(b)?.activation()))
                }
                _ => Err(invalid(
                    "block",
                    format!("block {b}'s MLP is gated; gradients need fc1 and fc2"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let values = self.tape_values(images.len_of(Axis(0)));
        if values.is_none_or(|v| v > MAX_TAPE_VALUES) {
            return Err(invalid(
                "images",
                format!(
                    "{} images keep more than {MAX_TAPE_VALUES} activation values for the \
                     backward pass (MAX_TAPE_VALUES); pass fewer at once",
                    images.len_of(Axis(0))
                ),
            ));
        }
        let VitConfig {
            width: d, heads, ..
        } = self.config;
        let t = self.config.tokens();
        let mut x = self.embed(images);
        let rows = x.nrows();
        let GradientTape {
            blocks: tapes,
            h,
            attended,
            projected,
            hidden,
            dpre,
            dqkv,
            dp,
        } = tape;
        tapes.resize_with(self.blocks.len(), BlockTape::default);
        for a in [&mut *h, &mut *attended, &mut *projected] {
            fit2(a, (rows, d));
        }
        fit2(dqkv, (rows, 3 * d));
        fit2(dp, (t, t));
        for ((block, &(fc1, fc2, act)), tape) in self.blocks.iter().zip(&mlps).zip(tapes.iter_mut())
        {
            let i = fc1.out_features();
            tape.fit((rows, rows / t, heads, t, d, i));
            block.norm1.normalise_into(x.view(), &mut tape.normalised1);
            h.assign(&tape.normalised1.0);
            block.norm1.scale(h);
            self.attention_into(block, h.view(), &mut tape.qkv, &mut tape.probs, attended);
            block.proj.forward_into(attended.view(), projected);
            x += &*projected;
            block.norm2.normalise_into(x.view(), &mut tape.normalised2);
            tape.mlp_input.assign(&tape.normalised2.0);
            block.norm2.scale(&mut tape.mlp_input);
            fc1.forward_into(tape.mlp_input.view(), &mut tape.pre_activation);
            fit2(hidden, (rows, i));
            hidden.assign(&tape.pre_activation);
            match hidden.as_slice_mut() {
                // The vectorised loop, compiled for the CPU's widest vectors, on this thread.
                Some(v) => RowSplit::new(1).activate_values(act, v, i),
                None => hidden.mapv_inplace(|v| act.apply(v)),
            }
            // The MLP's output, in `projected`.
            fc2.forward_into(hidden.view(), projected);
            x += &*projected;
        }
        let normalised = self.norm.normalise(x.slice(s![..;t, ..]));
        let mut cls = normalised.0.clone();
        self.norm.scale(&mut cls);
        let logits = self.head.forward(cls.view())?;
        let dlogits = loss_gradient(logits.view())?;
        if dlogits.dim() != logits.dim() {
            return Err(FipsError::ShapeMismatch {
                what: "gradient of the loss with respect to the logits".into(),
                expected: logits.shape().to_vec(),
                got: dlogits.shape().to_vec(),
            });
        }
        let dcls = self
            .norm
            .backward(&normalised, dlogits.dot(self.head.weight()).view());
        let mut dx = Array2::<f32>::zeros(x.raw_dim());
        dx.slice_mut(s![..;t, ..]).assign(&dcls);
        let mut gradients = Vec::with_capacity(self.blocks.len());
        for (b, ((block, &(fc1, fc2, act)), tape)) in self
            .blocks
            .iter()
            .zip(&mlps)
            .zip(tapes.iter_mut())
            .enumerate()
            .rev()
        {
            observe(b, dx.view());
            // The MLP: x ← x + fc2(act(fc1 z)). One pass gives the activation (recomputed, not
            // kept) and its slope, which replaces the pre-activation in the tape.
            fit2(hidden, tape.pre_activation.dim());
            hidden.assign(&tape.pre_activation);
            match (hidden.as_slice_mut(), tape.pre_activation.as_slice_mut()) {
                // The vectorised loop: `hidden ← act(a)`, `a ← act'(a)`.
                (Some(h), Some(a)) => RowSplit::new(1).activate(act, h, a, fc1.out_features()),
                _ => Zip::from(&mut *hidden)
                    .and(&mut tape.pre_activation)
                    .for_each(|h, a| (*h, *a) = act.apply_with_derivative(*a)),
            }
            let slope = &tape.pre_activation;
            let fc2_weight = dx.t().dot(&*hidden);
            let fc2_bias = dx.sum_axis(Axis(0));
            fit2(dpre, slope.dim());
            general_mat_mul(1.0, &dx, fc2.weight(), 0.0, dpre);
            *dpre *= slope;
            let fc1_weight = dpre.t().dot(&tape.mlp_input);
            let fc1_bias = dpre.sum_axis(Axis(0));
            gradients.push(MlpGradient {
                fc1_weight,
                fc1_bias,
                fc2_weight,
                fc2_bias,
            });
            if b == 0 {
                // Nothing below the first MLP is trained: its input gradient is not needed.
                break;
            }
            // `∂L/∂z` in `h`, then through norm2 into the stream's gradient.
            general_mat_mul(1.0, &*dpre, fc1.weight(), 0.0, h);
            block.norm2.backward_add(&tape.normalised2, h, &mut dx);
            // Attention: x ← x + proj(MHA(LN₁ x)); `∂L/∂(heads' outputs)` in `attended`,
            // `∂L/∂h` in `h`.
            general_mat_mul(1.0, &dx, block.proj.weight(), 0.0, attended);
            self.attention_backward(&tape.qkv, &tape.probs, attended.view(), dqkv, dp);
            general_mat_mul(1.0, &*dqkv, block.qkv.weight(), 0.0, h);
            block.norm1.backward_add(&tape.normalised1, h, &mut dx);
        }
        gradients.reverse();
        Ok((logits, gradients))
    }

    /// The activation values [`Self::mlp_gradients`] keeps for its backward pass on `images`
    /// images: `images · T · Σ_blocks (6d + heads · T + I_b)` (`x̂₁`, `q k v`, `x̂₂`, the MLP input,
    /// a row of attention probabilities per head, the pre-activation); `None` on overflow or when
    /// a block's MLP is not dense (no gradients then).
    pub(crate) fn tape_values(&self, images: usize) -> Option<usize> {
        let VitConfig { width, heads, .. } = self.config;
        let tokens = self.config.tokens();
        let per_token = tokens
            .checked_mul(heads)?
            .checked_add(width.checked_mul(6)?)?;
        let mut total = 0usize;
        for b in 0..self.blocks.len() {
            let intermediate = self.mlp(b).ok()?.intermediate();
            total = total.checked_add(per_token.checked_add(intermediate)?)?;
        }
        total.checked_mul(tokens)?.checked_mul(images)
    }

    /// `∂L/∂[q | k | v]` into `dqkv` from `∂L/∂(heads' outputs)`, `[B · T, d]` (`dp`: a
    /// `[T, T]` buffer).
    fn attention_backward(
        &self,
        qkv: &Array2<f32>,
        probs: &Array3<f32>,
        dattended: ArrayView2<'_, f32>,
        dqkv: &mut Array2<f32>,
        dp: &mut Array2<f32>,
    ) {
        let VitConfig {
            width: d, heads, ..
        } = self.config;
        let t = self.config.tokens();
        let dh = d / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        for (k, p) in probs.outer_iter().enumerate() {
            let (b, head) = (k / heads, k % heads);
            let rows = b * t..(b + 1) * t;
            let cols = |part: usize| part * d + head * dh..part * d + (head + 1) * dh;
            let da = dattended.slice(s![rows.clone(), head * dh..(head + 1) * dh]);
            let v = qkv.slice(s![rows.clone(), cols(2)]);
            general_mat_mul(
                1.0,
                &p.t(),
                &da,
                0.0,
                &mut dqkv.slice_mut(s![rows.clone(), cols(2)]),
            );
            general_mat_mul(1.0, &da, &v.t(), 0.0, dp);
            for (mut g, p_row) in dp.rows_mut().into_iter().zip(p.rows()) {
                let dot = g.iter().zip(p_row).map(|(&g, &p)| g * p).sum::<f32>();
                Zip::from(&mut g)
                    .and(&p_row)
                    .for_each(|g, &p| *g = p * (*g - dot) * scale);
            }
            let q = qkv.slice(s![rows.clone(), cols(0)]);
            let key = qkv.slice(s![rows.clone(), cols(1)]);
            general_mat_mul(
                1.0,
                dp,
                &key,
                0.0,
                &mut dqkv.slice_mut(s![rows.clone(), cols(0)]),
            );
            general_mat_mul(
                1.0,
                &dp.t(),
                &q,
                0.0,
                &mut dqkv.slice_mut(s![rows, cols(1)]),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{CLASSES, tiny_vit};
    use super::*;
    use crate::foundation::mlp::{DenseMlp, Linear};
    use ndarray::{Array4, array};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, shape: (usize, usize), scale: f32) -> Array2<f32> {
        Array2::from_shape_fn(shape, |_| scale * (rng.random::<f32>() - 0.5))
    }

    fn images(seed: u64, n: usize) -> Array4<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array4::from_shape_fn((n, 3, 8, 8), |_| rng.random::<f32>() * 2.0 - 1.0)
    }

    /// `L = Σ c ⊙ logits` (so `∂L/∂logits = c`) in `f64`.
    fn loss(vit: &VisionTransformer, x: &Array4<f32>, c: &Array2<f32>) -> f64 {
        let logits = vit.forward(x.view()).unwrap();
        logits
            .iter()
            .zip(c)
            .map(|(&l, &c)| l as f64 * c as f64)
            .sum()
    }

    fn with_weight(
        vit: &VisionTransformer,
        block: usize,
        layer: usize,
        edit: impl Fn(&mut Array2<f32>, &mut Array1<f32>),
    ) -> VisionTransformer {
        let mlp = vit.mlp(block).unwrap();
        let mut layers: Vec<Linear<f32>> = mlp.layers().to_vec();
        let (mut w, b) = layers[layer].clone().into_parts();
        let mut b = b.unwrap();
        edit(&mut w, &mut b);
        layers[layer] = Linear::new(w, Some(b)).unwrap();
        let mut out = vit.clone();
        out.set_mlp(
            block,
            DenseMlp::from_layers(MlpKind::Standard, layers, mlp.activation()).unwrap(),
        )
        .unwrap();
        out
    }

    /// A tape kept between calls, of one shape and then of another, gives the bits of a fresh
    /// pass every time (no value of an earlier pass leaks into a later one).
    #[test]
    fn a_reused_tape_gives_the_bits_of_a_fresh_pass() {
        let vit = tiny_vit(3);
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let mut tape = GradientTape::default();
        for (seed, n) in [(4, 2), (5, 2), (6, 3), (7, 3)] {
            let x = images(seed, n);
            let c = random(&mut rng, (n, CLASSES), 2.0);
            let fresh = vit.mlp_gradients(x.view(), |_| Ok(c.clone())).unwrap();
            let reused = vit
                .mlp_gradients_with(&mut tape, x.view(), |_| Ok(c.clone()))
                .unwrap();
            assert_eq!(fresh, reused, "{n} images");
        }
    }

    #[test]
    fn forward_is_unchanged_by_the_gradient_pass() {
        let vit = tiny_vit(1);
        let x = images(2, 3);
        let (logits, grads) = vit
            .mlp_gradients(x.view(), |l| Ok(Array2::zeros(l.raw_dim())))
            .unwrap();
        assert_eq!(logits, vit.forward(x.view()).unwrap());
        assert_eq!(grads.len(), 2);
        assert!(grads.iter().all(|g| g.fc1_weight.iter().all(|&v| v == 0.0)));
    }

    /// Every MLP weight's and bias's gradient against central differences of `L` (`f32` model,
    /// `f64` sums, step 1e-2): wrong signs, a missing LayerNorm or softmax term or a transposed
    /// product each break it by far more than the tolerance.
    #[test]
    fn mlp_gradients_match_finite_differences() {
        let vit = tiny_vit(3);
        let x = images(4, 2);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let c = random(&mut rng, (2, CLASSES), 2.0);
        let (_, grads) = vit.mlp_gradients(x.view(), |_| Ok(c.clone())).unwrap();
        let h = 1e-2f32;
        let mut worst = 0.0f64;
        let mut largest = 0.0f64;
        for (block, g) in grads.iter().enumerate() {
            for layer in 0..2 {
                let (gw, gb) = if layer == 0 {
                    (&g.fc1_weight, &g.fc1_bias)
                } else {
                    (&g.fc2_weight, &g.fc2_bias)
                };
                let entries: Vec<Option<(usize, usize)>> = (0..gw.nrows())
                    .flat_map(|i| (0..gw.ncols()).map(move |j| Some((i, j))))
                    .chain((0..gb.len()).map(|_| None))
                    .collect();
                for (k, entry) in entries.into_iter().enumerate() {
                    let bump = |sign: f32| {
                        with_weight(&vit, block, layer, |w, b| match entry {
                            Some(ij) => w[ij] += sign * h,
                            None => b[k - gw.len()] += sign * h,
                        })
                    };
                    let numeric =
                        (loss(&bump(1.0), &x, &c) - loss(&bump(-1.0), &x, &c)) / (2.0 * h as f64);
                    let analytic = match entry {
                        Some(ij) => gw[ij],
                        None => gb[k - gw.len()],
                    } as f64;
                    worst = worst.max((numeric - analytic).abs());
                    largest = largest.max(analytic.abs());
                }
            }
        }
        assert!(largest > 0.1, "gradients too small to test: {largest}");
        assert!(
            worst < 2e-3 * largest.max(1.0),
            "worst difference {worst}, largest gradient {largest}"
        );
    }

    /// The observer sees each block's `∂L/∂y_b` once, last block first, and it is the gradient
    /// the block's fc2 bias sums (`∂b_fc2 = Σ_rows ∂y`); the gradients equal `mlp_gradients`'.
    #[test]
    fn the_observer_sees_each_blocks_output_gradient() {
        let vit = tiny_vit(3);
        let x = images(4, 2);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let c = random(&mut rng, (2, CLASSES), 2.0);
        let mut seen = Vec::new();
        let (_, grads) = vit
            .mlp_gradients_observed(
                x.view(),
                |_| Ok(c.clone()),
                |b, dy| seen.push((b, dy.to_owned())),
            )
            .unwrap();
        let (_, plain) = vit.mlp_gradients(x.view(), |_| Ok(c.clone())).unwrap();
        assert_eq!(grads, plain);
        let order: Vec<usize> = seen.iter().map(|(b, _)| *b).collect();
        assert_eq!(order, (0..grads.len()).rev().collect::<Vec<_>>());
        for (b, dy) in &seen {
            assert_eq!(dy.nrows(), 2 * vit.config().tokens());
            let sums = dy.sum_axis(Axis(0));
            let expected = &grads[*b].fc2_bias;
            assert!(expected.iter().any(|&v| v != 0.0));
            for (s, e) in sums.iter().zip(expected) {
                assert!(
                    (s - e).abs() <= 1e-5 * e.abs().max(1.0),
                    "block {b}: {s} vs {e}"
                );
            }
        }
    }

    #[test]
    fn a_wrong_loss_gradient_shape_is_an_error() {
        let vit = tiny_vit(1);
        let x = images(2, 2);
        let err = vit
            .mlp_gradients(x.view(), |_| Ok(array![[1.0f32]]))
            .unwrap_err();
        assert!(matches!(err, FipsError::ShapeMismatch { .. }), "{err}");
    }
}
