//! The ViT / DeiT image classifier (timm layout), in `f32` over BLAS: the source of calibration
//! activations and the model the compressed MLPs are evaluated in.
//!
//! Patch embedding (a `p × p` convolution with stride `p`, computed as one GEMM over all patches),
//! a class token and learned position embeddings, `depth` pre-norm blocks
//! `x ← x + proj(MHA(LN₁ x))`, `x ← x + MLP(LN₂ x)`, a final LayerNorm and a linear head on the class
//! token. Attention: `softmax(q kᵀ / √d_h) v` per head, heads of `d_h` consecutive features of the
//! `qkv` projection's `[q | k | v]` output.

use std::ops::Range;

use ndarray::{
    Array1, Array2, Array3, Array4, ArrayView2, ArrayView4, Axis, Zip, linalg::general_mat_mul,
};

use crate::format::checkpoint::Checkpoint;
use crate::format::layout::MlpLayout;
use crate::foundation::error::{FipsError, Result, invalid};
use crate::foundation::float::ensure_finite;
use crate::foundation::kernels::RowSplit;
use crate::foundation::mlp::{DenseMlp, Linear};
use crate::foundation::slicing::s;

mod compact;
mod grad;
#[cfg(test)]
pub(crate) mod test_support;

pub use compact::BlockMlp;
pub use grad::{GradientTape, MAX_TAPE_VALUES, MlpGradient};

/// ImageNet channel means of `pixel / 255`.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations of `pixel / 255`.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Images per internal batch of [`VisionTransformer::forward`] (bounds memory).
const BATCH: usize = 32;

/// Shape of a ViT, read off its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VitConfig {
    /// Embedding width d.
    pub width: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// Patch side p.
    pub patch_size: usize,
    /// Image side (square images).
    pub image_size: usize,
    /// Classes of the head.
    pub num_classes: usize,
    /// LayerNorm ε (1e-6 for timm ViTs).
    pub layer_norm_eps: f32,
}

impl VitConfig {
    /// Tokens per image: the class token and one per patch.
    pub fn tokens(&self) -> usize {
        1 + (self.image_size / self.patch_size).pow(2)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct LayerNorm {
    weight: Array1<f32>,
    bias: Array1<f32>,
    eps: f32,
}

impl LayerNorm {
    fn load(ck: &Checkpoint, prefix: &str, width: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            weight: vector(ck, &format!("{prefix}.weight"), width)?,
            bias: vector(ck, &format!("{prefix}.bias"), width)?,
            eps,
        })
    }

    /// `(x − mean) / √(var + ε) · w + b` along each row (two-pass mean and variance).
    fn apply(&self, x: ArrayView2<'_, f32>) -> Array2<f32> {
        let (mut out, _) = self.normalise(x);
        self.scale(&mut out);
        out
    }

    /// `x̂ = (x − mean) / √(var + ε)` along each row, and each row's `1 / √(var + ε)`.
    fn normalise(&self, x: ArrayView2<'_, f32>) -> (Array2<f32>, Array1<f32>) {
        let mut out = (x.to_owned(), Array1::zeros(x.nrows()));
        self.normalise_in_place(&mut out);
        out
    }

    /// [`Self::normalise`] into `(x̂, 1/σ)` of `x`'s shape.
    fn normalise_into(&self, x: ArrayView2<'_, f32>, out: &mut (Array2<f32>, Array1<f32>)) {
        out.0.assign(&x);
        self.normalise_in_place(out);
    }

    /// `(x, _) ← (x̂, 1/σ)`.
    fn normalise_in_place(&self, (out, inverse): &mut (Array2<f32>, Array1<f32>)) {
        let n = out.ncols() as f32;
        for (mut row, inv_out) in out.rows_mut().into_iter().zip(inverse.iter_mut()) {
            let mean = row.sum() / n;
            let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + self.eps).sqrt();
            row.mapv_inplace(|v| (v - mean) * inv);
            *inv_out = inv;
        }
    }

    /// `x̂ ← x̂ · w + b` along each row.
    fn scale(&self, normalised: &mut Array2<f32>) {
        for mut row in normalised.rows_mut() {
            Zip::from(&mut row)
                .and(&self.weight)
                .and(&self.bias)
                .for_each(|v, &w, &b| *v = *v * w + b);
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear<f32>,
    proj: Linear<f32>,
    norm2: LayerNorm,
    mlp: BlockMlp,
}

/// A ViT / DeiT classifier with timm tensor names.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionTransformer {
    config: VitConfig,
    /// Patch embedding as a `[d, 3 p²]` matrix (input order channel, row, column).
    patch_weight: Array2<f32>,
    patch_bias: Array1<f32>,
    cls_token: Array1<f32>,
    pos_embed: Array2<f32>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear<f32>,
}

fn vector(ck: &Checkpoint, name: &str, len: usize) -> Result<Array1<f32>> {
    let v: Array1<f32> = ck.read_vector(name)?;
    if v.len() != len {
        return Err(FipsError::ShapeMismatch {
            what: name.into(),
            expected: vec![len],
            got: vec![v.len()],
        });
    }
    Ok(v)
}

fn linear(ck: &Checkpoint, prefix: &str, out: usize, input: usize) -> Result<Linear<f32>> {
    let w: Array2<f32> = ck.read_matrix(&format!("{prefix}.weight"))?;
    if w.dim() != (out, input) {
        return Err(FipsError::ShapeMismatch {
            what: format!("{prefix}.weight"),
            expected: vec![out, input],
            got: w.shape().to_vec(),
        });
    }
    Linear::new(w, Some(vector(ck, &format!("{prefix}.bias"), out)?))
}

/// Where [`VisionTransformer::forward_capture_from`] starts.
#[derive(Debug, Clone)]
pub enum CaptureStart<'a> {
    /// Normalised images `[B, 3, H, W]` (see [`preprocess`]): from the embedding.
    Images(ArrayView4<'a, f32>),
    /// The residual stream `[B · tokens, d]` entering block `block`, as an earlier capture
    /// returned it.
    Stream {
        /// The stream.
        stream: Array2<f32>,
        /// The block it enters.
        block: usize,
    },
}

/// What [`VisionTransformer::forward_capture_from`] returns: the MLP inputs of the captured
/// blocks, and the residual stream a next capture continues from (`None` past the last block).
pub type ContinuedCapture = (Vec<Array2<f32>>, Option<Array2<f32>>);

impl VisionTransformer {
    /// Loads a timm-named ViT/DeiT (`patch_embed.proj`, `cls_token`, `pos_embed`,
    /// `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `head`). The number
    /// of heads cannot be read off the shapes: `heads` defaults to `width / 64`.
    pub fn from_checkpoint(ck: &Checkpoint, heads: Option<usize>) -> Result<Self> {
        let layout = MlpLayout::detect(ck)?;
        let activation = layout.default_activation();
        Self::load(ck, heads, layout.blocks(), |b| {
            Ok(BlockMlp::Dense(layout.load_block(ck, b, activation)?))
        })
    }

    /// Loads every tensor but the MLPs from `ck` (timm names, `depth` blocks); block `b`'s MLP is
    /// `mlp(b)`.
    fn load(
        ck: &Checkpoint,
        heads: Option<usize>,
        depth: usize,
        mut mlp: impl FnMut(usize) -> Result<BlockMlp>,
    ) -> Result<Self> {
        let patch = ck.read::<f32>("patch_embed.proj.weight")?;
        let &[width, channels, p, p2] = patch.shape() else {
            return Err(FipsError::ShapeMismatch {
                what: "patch_embed.proj.weight".into(),
                expected: vec![0, 3, 0, 0],
                got: patch.shape().to_vec(),
            });
        };
        if channels != 3 || p != p2 || p == 0 {
            return Err(FipsError::ShapeMismatch {
                what: "patch_embed.proj.weight (RGB, square patches)".into(),
                expected: vec![width, 3, p, p],
                got: patch.shape().to_vec(),
            });
        }
        let patch_weight = patch
            .into_shape_with_order((width, 3 * p * p))
            .map_err(|e| FipsError::Numerical(e.to_string()))?;
        let pos = ck.read::<f32>("pos_embed")?;
        let tokens = match pos.shape() {
            &[1, t, w] if w == width && t >= 2 => t,
            other => {
                return Err(FipsError::ShapeMismatch {
                    what: "pos_embed".into(),
                    expected: vec![1, 0, width],
                    got: other.to_vec(),
                });
            }
        };
        crate::math::limits::check_vit_tokens(tokens, p)?;
        let grid = ((tokens - 1) as f64).sqrt().round() as usize;
        if grid * grid != tokens - 1 {
            return Err(invalid(
                "pos_embed",
                format!(
                    "{} patch positions do not form a square grid (a distillation token is not supported)",
                    tokens - 1
                ),
            ));
        }
        let pos_embed = pos
            .into_shape_with_order((tokens, width))
            .map_err(|e| FipsError::Numerical(e.to_string()))?;
        let cls = ck.read::<f32>("cls_token")?;
        if cls.len() != width {
            return Err(FipsError::ShapeMismatch {
                what: "cls_token".into(),
                expected: vec![1, 1, width],
                got: cls.shape().to_vec(),
            });
        }
        let cls_token = Array1::from_iter(cls.iter().copied());
        let heads = heads.unwrap_or((width / 64).max(1));
        if heads == 0 || width % heads != 0 {
            return Err(invalid(
                "heads",
                format!("width {width} is not divisible by {heads} heads"),
            ));
        }
        let eps = 1e-6;
        let blocks = (0..depth)
            .map(|b| {
                let prefix = format!("blocks.{b}");
                Ok(Block {
                    norm1: LayerNorm::load(ck, &format!("{prefix}.norm1"), width, eps)?,
                    qkv: linear(ck, &format!("{prefix}.attn.qkv"), 3 * width, width)?,
                    proj: linear(ck, &format!("{prefix}.attn.proj"), width, width)?,
                    norm2: LayerNorm::load(ck, &format!("{prefix}.norm2"), width, eps)?,
                    mlp: mlp(b)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head_weight: Array2<f32> = ck.read_matrix("head.weight")?;
        let num_classes = head_weight.nrows();
        let head = linear(ck, "head", num_classes, width)?;
        Ok(Self {
            config: VitConfig {
                width,
                depth: blocks.len(),
                heads,
                patch_size: p,
                image_size: grid * p,
                num_classes,
                layer_norm_eps: eps,
            },
            patch_weight,
            patch_bias: vector(ck, "patch_embed.proj.bias", width)?,
            cls_token,
            pos_embed,
            blocks,
            norm: LayerNorm::load(ck, "norm", width, eps)?,
            head,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// Block `block`'s MLP (an error for a block that runs from a compressed form: see
    /// [`VisionTransformer::block_mlp`]).
    pub fn mlp(&self, block: usize) -> Result<&DenseMlp<f32>> {
        match self.block_mlp(block)? {
            BlockMlp::Dense(m) => Ok(m),
            BlockMlp::Compact { .. } => Err(invalid(
                "block",
                format!("block {block}'s MLP runs from its compressed form, not a dense MLP"),
            )),
        }
    }

    /// Block `block`'s MLP, dense or compressed.
    pub fn block_mlp(&self, block: usize) -> Result<&BlockMlp> {
        self.blocks
            .get(block)
            .map(|b| &b.mlp)
            .ok_or(FipsError::IndexOutOfRange {
                what: "block",
                index: block,
                len: self.blocks.len(),
            })
    }

    /// Replaces block `block`'s MLP (for example by a compressed block rebuilt dense); its width
    /// must be the model's.
    pub fn set_mlp(&mut self, block: usize, mlp: DenseMlp<f32>) -> Result<()> {
        let len = self.blocks.len();
        let width = self.config.width;
        let slot = self
            .blocks
            .get_mut(block)
            .ok_or(FipsError::IndexOutOfRange {
                what: "block",
                index: block,
                len,
            })?;
        if mlp.width() != width {
            return Err(FipsError::ShapeMismatch {
                what: format!("MLP of block {block}"),
                expected: vec![width],
                got: vec![mlp.width()],
            });
        }
        slot.mlp = BlockMlp::Dense(mlp);
        Ok(())
    }

    /// All parameters.
    pub fn parameter_count(&self) -> usize {
        let ln = |n: &LayerNorm| n.weight.len() + n.bias.len();
        let lin = |l: &Linear<f32>| l.weight().len() + l.bias().map_or(0, |b| b.len());
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                ln(&b.norm1)
                    + lin(&b.qkv)
                    + lin(&b.proj)
                    + ln(&b.norm2)
                    + b.mlp.weight_count()
                    + b.mlp.bias_count()
            })
            .sum();
        self.patch_weight.len()
            + self.patch_bias.len()
            + self.cls_token.len()
            + self.pos_embed.len()
            + blocks
            + ln(&self.norm)
            + lin(&self.head)
    }

    /// MLP weights (fc1 and fc2 of every block, biases excluded).
    pub fn mlp_weight_count(&self) -> usize {
        self.blocks.iter().map(|b| b.mlp.weight_count()).sum()
    }

    /// Logits `[B, classes]` of normalised images `[B, 3, H, W]` (see [`preprocess`]).
    pub fn forward(&self, images: ArrayView4<'_, f32>) -> Result<Array2<f32>> {
        self.check_images(images)?;
        let n = images.len_of(Axis(0));
        let mut logits = Array2::zeros((n, self.config.num_classes));
        for (chunk, mut out) in images
            .axis_chunks_iter(Axis(0), BATCH)
            .zip(logits.axis_chunks_iter_mut(Axis(0), BATCH))
        {
            let mut x = self.embed(chunk);
            for block in &self.blocks {
                let z = self.attention_residual(block, &mut x);
                x += &block.mlp.forward(z.view())?;
            }
            let t = self.config.tokens();
            let cls = x.slice(s![..;t, ..]);
            let normed = self.norm.apply(cls);
            out.assign(&self.head.forward(normed.view())?);
        }
        Ok(logits)
    }

    /// The MLP inputs (outputs of `norm2`) of the blocks in `blocks`, each `[B · tokens, d]` with
    /// rows image by image. Computation stops after the last requested block.
    pub fn forward_capture(
        &self,
        images: ArrayView4<'_, f32>,
        blocks: Range<usize>,
    ) -> Result<Vec<Array2<f32>>> {
        self.capture(images, blocks, |z, _| z)
    }

    /// As [`Self::forward_capture`], with each block's residual stream after attention beside
    /// its MLP input: `(LN₂ x, x)`, the block's output being `x + MLP(LN₂ x)`.
    pub fn forward_capture_streams(
        &self,
        images: ArrayView4<'_, f32>,
        blocks: Range<usize>,
    ) -> Result<Vec<(Array2<f32>, Array2<f32>)>> {
        self.capture(images, blocks, |z, x| (z, x.clone()))
    }

    /// As [`Self::forward_capture`], continuing from where an earlier capture stopped:
    /// `start` is the images or the residual stream entering some block, and the residual stream
    /// entering block `blocks.end` (`[B · tokens, d]`, the last block's MLP included) comes back
    /// beside the captures, ready to start the next group's capture; `None` when `blocks` ends
    /// at the model's last block (no capture can continue, and that MLP is not run). A capture
    /// continued this way gives the same bits as one from the images (the same operations on the
    /// same rows).
    pub fn forward_capture_from(
        &self,
        start: CaptureStart<'_>,
        blocks: Range<usize>,
    ) -> Result<ContinuedCapture> {
        self.check_blocks(&blocks)?;
        let (x, from) = match start {
            CaptureStart::Images(images) => {
                self.check_images(images)?;
                (self.embed(images), 0)
            }
            CaptureStart::Stream { stream, block } => {
                let t = self.config.tokens();
                let (rows, width) = stream.dim();
                if block > blocks.start || width != self.config.width || rows == 0 || rows % t != 0
                {
                    return Err(invalid(
                        "stream",
                        format!(
                            "a [{rows}, {width}] stream entering block {block} cannot start a \
                             capture of blocks {blocks:?} (needs [images · {t}, {}] entering \
                             block {} at the latest)",
                            self.config.width, blocks.start
                        ),
                    ));
                }
                (stream, block)
            }
        };
        let continues = blocks.end < self.blocks.len();
        let (captured, x) = self.run_blocks(x, from, blocks, continues, |z, _| z)?;
        Ok((captured, continues.then_some(x)))
    }

    /// Runs the blocks up to the last of `blocks` and keeps `keep(z, x)` for each block in
    /// `blocks`: its MLP input `z = LN₂ x` and the residual stream `x` after attention (only
    /// what `keep` takes is copied).
    fn capture<T>(
        &self,
        images: ArrayView4<'_, f32>,
        blocks: Range<usize>,
        keep: impl FnMut(Array2<f32>, &Array2<f32>) -> T,
    ) -> Result<Vec<T>> {
        self.check_images(images)?;
        self.check_blocks(&blocks)?;
        let (captured, _) = self.run_blocks(self.embed(images), 0, blocks, false, keep)?;
        Ok(captured)
    }

    fn check_blocks(&self, blocks: &Range<usize>) -> Result<()> {
        if blocks.is_empty() || blocks.end > self.blocks.len() {
            return Err(invalid(
                "blocks",
                format!(
                    "{blocks:?} is not a non-empty range of the {} blocks",
                    self.blocks.len()
                ),
            ));
        }
        Ok(())
    }

    /// Blocks `from..blocks.end` on the residual stream `x` entering block `from`, keeping
    /// `keep(z, x)` for the blocks in `blocks`; the last block's MLP runs only when `whole`
    /// (the stream returned is then the one entering block `blocks.end`).
    fn run_blocks<T>(
        &self,
        mut x: Array2<f32>,
        from: usize,
        blocks: Range<usize>,
        whole: bool,
        mut keep: impl FnMut(Array2<f32>, &Array2<f32>) -> T,
    ) -> Result<(Vec<T>, Array2<f32>)> {
        let mut captured = Vec::with_capacity(blocks.len());
        for (b, block) in self.blocks[..blocks.end].iter().enumerate().skip(from) {
            let z = self.attention_residual(block, &mut x);
            let y = if whole || b + 1 < blocks.end {
                Some(block.mlp.forward(z.view())?)
            } else {
                None
            };
            if blocks.contains(&b) {
                captured.push(keep(z, &x));
            }
            if let Some(y) = y {
                x += &y;
            }
        }
        Ok((captured, x))
    }

    fn check_images(&self, images: ArrayView4<'_, f32>) -> Result<()> {
        let s = self.config.image_size;
        let (n, c, h, w) = images.dim();
        if c != 3 || h != s || w != s || n == 0 {
            return Err(FipsError::ShapeMismatch {
                what: "images [batch, 3, height, width]".into(),
                expected: vec![n.max(1), 3, s, s],
                got: vec![n, c, h, w],
            });
        }
        ensure_finite(&images, || "images".into())
    }

    /// Tokens `[B · T, d]`: class token and patch embeddings, plus position embeddings.
    fn embed(&self, images: ArrayView4<'_, f32>) -> Array2<f32> {
        let (n, _, _, _) = images.dim();
        let p = self.config.patch_size;
        let grid = self.config.image_size / p;
        let patches_per_image = grid * grid;
        let mut patches = Array2::<f32>::zeros((n * patches_per_image, 3 * p * p));
        for (b, image) in images.outer_iter().enumerate() {
            for gy in 0..grid {
                for gx in 0..grid {
                    let mut row = patches.row_mut(b * patches_per_image + gy * grid + gx);
                    for c in 0..3 {
                        let window = image.slice(s![c, gy * p..(gy + 1) * p, gx * p..(gx + 1) * p]);
                        for (dst, &v) in row
                            .slice_mut(s![c * p * p..(c + 1) * p * p])
                            .iter_mut()
                            .zip(window.iter())
                        {
                            *dst = v;
                        }
                    }
                }
            }
        }
        let t = self.config.tokens();
        let d = self.config.width;
        let mut x = Array2::<f32>::zeros((n * t, d));
        for b in 0..n {
            let mut tokens = x.slice_mut(s![b * t..(b + 1) * t, ..]);
            tokens.assign(&self.pos_embed);
            let mut cls = tokens.row_mut(0);
            cls += &self.cls_token;
            let mut body = tokens.slice_mut(s![1.., ..]);
            body += &self.patch_bias;
            let rows = patches.slice(s![b * patches_per_image..(b + 1) * patches_per_image, ..]);
            general_mat_mul(1.0, &rows, &self.patch_weight.t(), 1.0, &mut body);
        }
        x
    }

    /// `x ← x + proj(MHA(LN₁ x))`; returns `LN₂ x`, the MLP input.
    fn attention_residual(&self, block: &Block, x: &mut Array2<f32>) -> Array2<f32> {
        let h = block.norm1.apply(x.view());
        let Attention { attended, .. } = self.attention(block, h.view());
        let mut projected = Array2::zeros((x.nrows(), self.config.width));
        block.proj.forward_into(attended.view(), &mut projected);
        *x += &projected;
        block.norm2.apply(x.view())
    }

    /// Multi-head self-attention of `h = LN₁ x` (`[B · T, d]`), before the output projection.
    fn attention(&self, block: &Block, h: ArrayView2<'_, f32>) -> Attention {
        let VitConfig {
            width: d, heads, ..
        } = self.config;
        let t = self.config.tokens();
        let mut out = Attention {
            qkv: Array2::zeros((h.nrows(), 3 * d)),
            probs: Array3::zeros((h.nrows() / t * heads, t, t)),
            attended: Array2::zeros((h.nrows(), d)),
        };
        self.attention_into(block, h, &mut out.qkv, &mut out.probs, &mut out.attended);
        out
    }

    /// [`Self::attention`] into buffers of its shapes.
    fn attention_into(
        &self,
        block: &Block,
        h: ArrayView2<'_, f32>,
        qkv: &mut Array2<f32>,
        probs: &mut Array3<f32>,
        attended: &mut Array2<f32>,
    ) {
        let VitConfig {
            width: d, heads, ..
        } = self.config;
        let t = self.config.tokens();
        let dh = d / heads;
        block.qkv.forward_into(h, qkv);
        // Scores of every (image, head) pair: the GEMMs run on this thread (BLAS parallelises
        // them), the softmax over all of them is split across threads.
        let scale = 1.0 / (dh as f32).sqrt();
        let qkv_of = |b: usize, head: usize, part: usize| {
            let c = part * d + head * dh;
            qkv.slice(s![b * t..(b + 1) * t, c..c + dh])
        };
        for (k, mut sc) in probs.outer_iter_mut().enumerate() {
            let (b, head) = (k / heads, k % heads);
            general_mat_mul(
                scale,
                &qkv_of(b, head, 0),
                &qkv_of(b, head, 1).t(),
                0.0,
                &mut sc,
            );
        }
        if let Some(flat) = probs.as_slice_mut() {
            RowSplit::available().softmax_rows(flat, t);
        }
        for (k, sc) in probs.outer_iter().enumerate() {
            let (b, head) = (k / heads, k % heads);
            let mut out = attended.slice_mut(s![b * t..(b + 1) * t, head * dh..(head + 1) * dh]);
            general_mat_mul(1.0, &sc, &qkv_of(b, head, 2), 0.0, &mut out);
        }
    }
}

/// One block's attention: the `[q | k | v]` projection `[B · T, 3d]`, the attention
/// probabilities `[B · heads, T, T]` (image-major) and the heads' outputs `[B · T, d]`.
struct Attention {
    qkv: Array2<f32>,
    probs: Array3<f32>,
    attended: Array2<f32>,
}

/// NHWC `u8` pixels → NCHW `f32` model input `(pixel / 255 − mean) / std` with ImageNet statistics.
pub fn preprocess(pixels: ArrayView4<'_, u8>) -> Array4<f32> {
    let (n, h, w, c) = pixels.dim();
    let mut out = Array4::zeros((n, c, h, w));
    for ch in 0..c.min(3) {
        let (mean, std) = (IMAGENET_MEAN[ch], IMAGENET_STD[ch]);
        Zip::from(out.slice_mut(s![.., ch, .., ..]))
            .and(pixels.slice(s![.., .., .., ch]))
            .for_each(|o, &p| *o = (f32::from(p) / 255.0 - mean) / std);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_rows_sum_to_one_and_keep_order() {
        let mut a = ndarray::array![[1.0f32, 2.0, 3.0], [1000.0, 1000.0, -1000.0]];
        RowSplit::new(2).softmax_rows(a.as_slice_mut().unwrap(), 3);
        for row in a.rows() {
            assert!((row.sum() - 1.0).abs() < 1e-6);
        }
        assert!(a[[0, 2]] > a[[0, 1]] && a[[0, 1]] > a[[0, 0]]);
        assert!((a[[1, 0]] - 0.5).abs() < 1e-6 && a[[1, 2]] < 1e-30);
    }

    #[test]
    fn preprocess_normalises_per_channel() {
        let mut px = Array4::<u8>::zeros((1, 2, 2, 3));
        px[[0, 1, 0, 2]] = 255;
        let x = preprocess(px.view());
        assert_eq!(x.dim(), (1, 3, 2, 2));
        assert!((x[[0, 0, 0, 0]] - (-0.485 / 0.229)).abs() < 1e-6);
        assert!((x[[0, 2, 1, 0]] - ((1.0 - 0.406) / 0.225)).abs() < 1e-6);
    }
}
