//! Finding the MLP blocks of a safetensors checkpoint by their tensor names.
//!
//! [`MlpLayout::detect`] tries every [`NamingScheme`] on the checkpoint's tensor names. Exactly one
//! scheme must match, under one name prefix, with blocks numbered `0..n` without gaps; every
//! block's matrices must be present and have consistent shapes (`[I, d]` for fc1, gate and up,
//! `[d, I]` for fc2 and down). Only the header is read: [`MlpLayout::load_block`] then reads one
//! block's tensors as a [`DenseMlp`].
//!
//! ```no_run
//! use fips::format::checkpoint::Checkpoint;
//! use fips::format::layout::MlpLayout;
//! # fn main() -> fips::Result<()> {
//! let ck = Checkpoint::open("model.safetensors")?;
//! let layout = MlpLayout::detect(&ck)?;
//! println!("{layout}");
//! let block0 = layout.load_block::<f32>(&ck, 0, layout.default_activation())?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use safetensors::Dtype;

use crate::format::checkpoint::TensorInfo;
use crate::format::hf::store::TensorStore;
use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::Float;
use crate::foundation::mlp::{DenseMlp, Linear, MatrixRole, MlpKind};

/// How many distinct name patterns an [`FipsError::UnknownLayout`] lists.
const MAX_PATTERNS: usize = 20;

/// A convention for naming the MLP tensors of a transformer checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NamingScheme {
    /// timm ViT/DeiT: `[prefix.]blocks.{i}.mlp.fc1|fc2.weight|bias`.
    Timm,
    /// Hugging Face BERT-style encoders (BERT, RoBERTa, …):
    /// `[prefix.]encoder.layer.{i}.intermediate.dense` (fc1) and `….output.dense` (fc2).
    HfBert,
    /// Hugging Face ViT: as [`NamingScheme::HfBert`], under the prefix `vit.`.
    HfVit,
    /// Llama, Mistral, Qwen and Gemma: `[prefix.]layers.{i}.mlp.gate_proj|up_proj|down_proj.weight`.
    LlamaGated,
}

/// Whether a tensor is a weight or a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Param {
    Weight,
    Bias,
}

impl Param {
    fn suffix(self) -> &'static str {
        match self {
            Self::Weight => "weight",
            Self::Bias => "bias",
        }
    }
}

/// One tensor name parsed against a scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hit<'a> {
    prefix: &'a str,
    index: usize,
}

impl NamingScheme {
    /// Every scheme, in the order detection tries them.
    pub const ALL: [NamingScheme; 4] = [Self::Timm, Self::HfBert, Self::HfVit, Self::LlamaGated];

    /// A short identifier (`timm`, `hf-bert`, `hf-vit`, `llama`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Timm => "timm",
            Self::HfBert => "hf-bert",
            Self::HfVit => "hf-vit",
            Self::LlamaGated => "llama",
        }
    }

    /// A human-readable description, as [`fmt::Display`] prints it.
    pub fn description(self) -> &'static str {
        match self {
            Self::Timm => "timm ViT/DeiT",
            Self::HfBert => "Hugging Face BERT-style encoder",
            Self::HfVit => "Hugging Face ViT",
            Self::LlamaGated => "Llama-style gated",
        }
    }

    /// The structure of the scheme's MLP blocks.
    pub fn kind(self) -> MlpKind {
        match self {
            Self::LlamaGated => MlpKind::Gated,
            _ => MlpKind::Standard,
        }
    }

    /// The name component that precedes the block number.
    fn marker(self) -> &'static str {
        match self {
            Self::Timm => "blocks.",
            Self::HfBert | Self::HfVit => "encoder.layer.",
            Self::LlamaGated => "layers.",
        }
    }

    /// The module paths after the block number, in module order.
    fn modules(self) -> &'static [&'static str] {
        match self {
            Self::Timm => &["mlp.fc1", "mlp.fc2"],
            Self::HfBert | Self::HfVit => &["intermediate.dense", "output.dense"],
            Self::LlamaGated => &["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
        }
    }

    /// Whether the text before the marker is a prefix this scheme accepts.
    fn accepts_prefix(self, prefix: &str) -> bool {
        let is_vit = prefix == "vit." || prefix.ends_with(".vit.");
        let well_formed = prefix.is_empty() || prefix.ends_with('.');
        match self {
            Self::HfBert => well_formed && !is_vit,
            Self::HfVit => is_vit,
            Self::Timm | Self::LlamaGated => well_formed,
        }
    }

    /// The full name of one tensor.
    fn tensor_name(self, prefix: &str, index: usize, slot: usize, param: Param) -> String {
        let module = self.modules().get(slot).copied().unwrap_or("?");
        format!(
            "{prefix}{}{index}.{module}.{}",
            self.marker(),
            param.suffix()
        )
    }

    /// Parses `name` as one of this scheme's MLP tensors.
    fn parse(self, name: &str) -> Option<Hit<'_>> {
        self.modules().iter().find_map(|module| {
            [Param::Weight, Param::Bias]
                .iter()
                .find_map(|param| self.parse_as(name, module, *param))
        })
    }

    /// Parses `name` as `{prefix}{marker}{index}.{module}.{param}`.
    fn parse_as<'a>(self, name: &'a str, module: &str, param: Param) -> Option<Hit<'a>> {
        let head = name
            .strip_suffix(param.suffix())?
            .strip_suffix('.')?
            .strip_suffix(module)?
            .strip_suffix('.')?;
        let digits = head.len() - head.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let (rest, number) = head.split_at(head.len() - digits);
        let index = parse_index(number)?;
        let prefix = rest.strip_suffix(self.marker())?;
        self.accepts_prefix(prefix).then_some(Hit { prefix, index })
    }
}

impl fmt::Display for NamingScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

/// A block number in canonical decimal form (no sign, no leading zeros).
fn parse_index(digits: &str) -> Option<usize> {
    let canonical = !digits.is_empty() && (digits == "0" || !digits.starts_with('0'));
    canonical.then(|| digits.parse().ok()).flatten()
}

/// The tensors of one MLP block, as found in the checkpoint's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTensors {
    /// The block number.
    pub index: usize,
    /// Weight names in module order (fc1, fc2 or gate, up, down).
    pub weights: Vec<String>,
    /// Bias names, parallel to `weights` (`None` where the layer has no bias).
    pub biases: Vec<Option<String>>,
    /// Model width d.
    pub width: usize,
    /// MLP width I.
    pub intermediate: usize,
    /// The weights' dtype.
    pub dtype: Dtype,
}

impl BlockTensors {
    /// Number of weight entries (biases excluded).
    pub fn weight_count(&self) -> usize {
        self.weights.len() * self.width * self.intermediate
    }

    /// The `[out, in]` shape of a weight with `role`.
    fn weight_shape(&self, role: MatrixRole) -> [usize; 2] {
        match role {
            MatrixRole::Up => [self.intermediate, self.width],
            MatrixRole::Down => [self.width, self.intermediate],
        }
    }
}

/// The MLP blocks of a checkpoint: their naming scheme and every block's tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlpLayout {
    scheme: NamingScheme,
    prefix: String,
    default_activation: Activation,
    blocks: Vec<BlockTensors>,
}

impl MlpLayout {
    /// Finds the MLP blocks of `ck`: exactly one scheme must match, under one prefix, with blocks
    /// `0..n` all present and consistently shaped.
    pub fn detect(ck: &impl TensorStore) -> Result<Self> {
        let mut matched: Vec<(NamingScheme, Vec<Hit<'_>>)> = NamingScheme::ALL
            .iter()
            .map(|&scheme| {
                let hits = ck.names().filter_map(|n| scheme.parse(n));
                (scheme, hits.collect::<Vec<_>>())
            })
            .filter(|(_, hits)| !hits.is_empty())
            .collect();
        if matched.len() > 1 {
            let list: Vec<String> = matched
                .iter()
                .map(|(s, hits)| format!("{s} ({} tensors)", hits.len()))
                .collect();
            let reason = format!(
                "the tensor names match several MLP layouts: {}",
                list.join(", ")
            );
            return Err(format_error(ck, reason));
        }
        match matched.pop() {
            Some((scheme, hits)) => Self::from_hits(ck, scheme, &hits),
            None => Err(FipsError::UnknownLayout {
                path: ck.path().to_path_buf(),
                seen: summarize_names(ck.names()),
            }),
        }
    }

    /// Builds the layout of `scheme` from the names it matched.
    fn from_hits(ck: &impl TensorStore, scheme: NamingScheme, hits: &[Hit<'_>]) -> Result<Self> {
        let prefix = single_prefix(ck, scheme, hits)?;
        let indices: BTreeSet<usize> = hits.iter().map(|h| h.index).collect();
        // `indices` holds `len` distinct numbers: they are 0..len exactly unless one is missing.
        if let Some(gap) = (0..indices.len()).find(|i| !indices.contains(i)) {
            let missing = scheme.tensor_name(prefix, gap, 0, Param::Weight);
            let reason = format!(
                "{scheme} MLP block {gap} is missing (no tensor such as {missing:?}); \
                 blocks found: {}",
                list_indices(&indices)
            );
            return Err(format_error(ck, reason));
        }
        let blocks = (0..indices.len())
            .map(|index| resolve_block(ck, scheme, prefix, index))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            scheme,
            prefix: prefix.to_string(),
            default_activation: default_activation(ck, scheme, prefix),
            blocks,
        })
    }

    /// The naming scheme found.
    pub fn scheme(&self) -> NamingScheme {
        self.scheme
    }

    /// The text before the scheme's block marker (`""`, `"model."`, `"bert."`, …).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The blocks' structure.
    pub fn kind(&self) -> MlpKind {
        self.scheme.kind()
    }

    /// The activation this kind of model uses: exact GELU for the encoders, SiLU for Llama-style
    /// models, tanh GELU where the checkpoint is evidently Gemma (a `pre_feedforward_layernorm`
    /// tensor, or "gemma" in the header metadata).
    pub fn default_activation(&self) -> Activation {
        self.default_activation
    }

    /// Number of MLP blocks.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Every block's `(d, I)`, the shapes [`BlockGroups`](crate::format::block_groups::BlockGroups)
    /// groups by.
    pub fn block_shapes(&self) -> Result<Vec<(usize, usize)>> {
        (0..self.blocks())
            .map(|b| self.block(b).map(|t| (t.width, t.intermediate)))
            .collect()
    }

    /// One block's tensors.
    pub fn block(&self, b: usize) -> Result<&BlockTensors> {
        self.blocks.get(b).ok_or(FipsError::IndexOutOfRange {
            what: "block",
            index: b,
            len: self.blocks.len(),
        })
    }

    /// Every block's tensors, in block order.
    pub fn block_tensors(&self) -> &[BlockTensors] {
        &self.blocks
    }

    /// Reads block `b` from `ck` (the checkpoint it was detected in) as a dense MLP.
    pub fn load_block<F: Float>(
        &self,
        ck: &impl TensorStore,
        b: usize,
        activation: Activation,
    ) -> Result<DenseMlp<F>> {
        let block = self.block(b)?;
        let layers = block
            .weights
            .iter()
            .zip(&block.biases)
            .zip(self.kind().matrix_roles())
            .map(|((weight, bias), &role)| {
                load_linear(ck, weight, bias.as_deref(), block.weight_shape(role))
            })
            .collect::<Result<Vec<_>>>()?;
        DenseMlp::from_layers(self.kind(), layers, activation)
    }

    /// Number of MLP weight entries over all blocks (biases excluded).
    pub fn mlp_weight_count(&self) -> usize {
        self.blocks.iter().map(BlockTensors::weight_count).sum()
    }

    /// A one-line report of what was found (the same text as [`fmt::Display`]).
    pub fn summary(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for MlpLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MLP layout", self.scheme)?;
        if !self.prefix.is_empty() {
            write!(f, " (prefix {:?})", self.prefix)?;
        }
        write!(
            f,
            ": {} blocks of {} MLPs ({}), d = {}, I = {}, {}, default activation {}, {} MLP weights",
            self.blocks.len(),
            self.kind(),
            self.kind().matrix_names().join(", "),
            distinct(self.blocks.iter().map(|b| b.width)),
            distinct(self.blocks.iter().map(|b| b.intermediate)),
            distinct(self.blocks.iter().map(|b| b.dtype)),
            self.default_activation,
            self.mlp_weight_count()
        )
    }
}

/// The distinct values in order of appearance, `/`-separated, marked when they vary.
fn distinct<T: PartialEq + fmt::Display>(values: impl Iterator<Item = T>) -> String {
    let mut seen: Vec<T> = Vec::new();
    for v in values {
        if !seen.contains(&v) {
            seen.push(v);
        }
    }
    let text: Vec<String> = seen.iter().map(ToString::to_string).collect();
    match text.len() {
        0 => "-".into(),
        1 => text.join(""),
        _ => format!("{} (varies by block)", text.join("/")),
    }
}

/// The one prefix all hits share, or a `Format` error listing the prefixes.
fn single_prefix<'a>(
    ck: &impl TensorStore,
    scheme: NamingScheme,
    hits: &[Hit<'a>],
) -> Result<&'a str> {
    let prefixes: BTreeSet<&str> = hits.iter().map(|h| h.prefix).collect();
    match prefixes.first() {
        Some(&p) if prefixes.len() == 1 => Ok(p),
        _ => {
            let list: Vec<String> = prefixes.iter().map(|p| format!("{p:?}")).collect();
            Err(format_error(
                ck,
                format!(
                    "{scheme} MLP tensors appear under several prefixes ({}); expected one",
                    list.join(", ")
                ),
            ))
        }
    }
}

/// Looks up and validates the tensors of one block.
fn resolve_block(
    ck: &impl TensorStore,
    scheme: NamingScheme,
    prefix: &str,
    index: usize,
) -> Result<BlockTensors> {
    let slots = 0..scheme.modules().len();
    let weights = slots
        .clone()
        .map(|slot| {
            let name = scheme.tensor_name(prefix, index, slot, Param::Weight);
            ck.info(&name).map_err(|_| {
                format_error(
                    ck,
                    format!("{scheme} MLP block {index} is incomplete: no tensor {name:?}"),
                )
            })
        })
        .collect::<Result<Vec<&TensorInfo>>>()?;
    let biases: Vec<Option<&TensorInfo>> = slots
        .map(|slot| {
            ck.info(&scheme.tensor_name(prefix, index, slot, Param::Bias))
                .ok()
        })
        .collect();
    let first = weights
        .first()
        .ok_or_else(|| format_error(ck, format!("{scheme} has no matrices")))?;
    let (intermediate, width) = matrix_dims(ck, first)?;
    let dtype = first.dtype;
    let block = BlockTensors {
        index,
        weights: weights.iter().map(|w| w.name.clone()).collect(),
        biases: biases.iter().map(|b| b.map(|b| b.name.clone())).collect(),
        width,
        intermediate,
        dtype,
    };
    for ((weight, bias), &role) in weights
        .iter()
        .zip(&biases)
        .zip(scheme.kind().matrix_roles())
    {
        let [out, input] = block.weight_shape(role);
        expect_shape(weight, &[out, input], "weight", index)?;
        expect_float(weight)?;
        if weight.dtype != dtype {
            return Err(format_error(
                ck,
                format!(
                    "{scheme} MLP block {index} mixes weight dtypes: {:?} is {}, {:?} is {}",
                    first.name, dtype, weight.name, weight.dtype
                ),
            ));
        }
        if let Some(bias) = bias {
            expect_shape(bias, &[out], "bias", index)?;
            expect_float(bias)?;
        }
    }
    Ok(block)
}

/// The `(rows, cols)` of the block's first weight, which must be a non-empty matrix.
fn matrix_dims(ck: &impl TensorStore, info: &TensorInfo) -> Result<(usize, usize)> {
    match *info.shape.as_slice() {
        [rows, cols] if rows > 0 && cols > 0 => Ok((rows, cols)),
        [_, _] => Err(format_error(
            ck,
            format!("tensor {:?} is empty: shape {:?}", info.name, info.shape),
        )),
        _ => Err(FipsError::ShapeMismatch {
            what: format!("tensor {:?} (an MLP weight matrix)", info.name),
            expected: vec![0, 0],
            got: info.shape.clone(),
        }),
    }
}

/// A `ShapeMismatch` naming the tensor unless it has `expected` shape.
fn expect_shape(info: &TensorInfo, expected: &[usize], what: &str, block: usize) -> Result<()> {
    if info.shape == expected {
        return Ok(());
    }
    Err(FipsError::ShapeMismatch {
        what: format!("tensor {:?} (MLP {what} of block {block})", info.name),
        expected: expected.to_vec(),
        got: info.shape.clone(),
    })
}

/// An `UnsupportedDtype` unless the tensor holds floats this crate reads.
fn expect_float(info: &TensorInfo) -> Result<()> {
    match info.dtype {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => Ok(()),
        other => Err(FipsError::UnsupportedDtype {
            name: info.name.clone(),
            dtype: other.to_string(),
            expected: "F32, F16, BF16 or F64",
        }),
    }
}

/// Reads one layer, checking the weight against the shape recorded at detection.
fn load_linear<F: Float>(
    ck: &impl TensorStore,
    weight: &str,
    bias: Option<&str>,
    shape: [usize; 2],
) -> Result<Linear<F>> {
    let w = ck.read_matrix::<F>(weight)?;
    if w.shape() != shape {
        return Err(FipsError::ShapeMismatch {
            what: format!("tensor {weight:?}"),
            expected: shape.to_vec(),
            got: w.shape().to_vec(),
        });
    }
    let b = bias.map(|name| ck.read_vector::<F>(name)).transpose()?;
    Linear::new(w, b)
}

/// The activation a checkpoint of `scheme` most likely uses.
fn default_activation(ck: &impl TensorStore, scheme: NamingScheme, prefix: &str) -> Activation {
    match scheme.kind() {
        MlpKind::Standard => Activation::Gelu,
        MlpKind::Gated if looks_like_gemma(ck, scheme, prefix) => Activation::GeluTanh,
        MlpKind::Gated => Activation::Silu,
    }
}

/// Whether the checkpoint is evidently Gemma: a `pre_feedforward_layernorm` tensor (Gemma 2 and
/// 3) or "gemma" in a metadata value.
fn looks_like_gemma(ck: &impl TensorStore, scheme: NamingScheme, prefix: &str) -> bool {
    let layers = format!("{prefix}{}", scheme.marker());
    let has_norm = ck.names().any(|n| {
        n.strip_prefix(layers.as_str())
            .and_then(|rest| rest.split_once('.'))
            .is_some_and(|(i, rest)| {
                parse_index(i).is_some() && rest == "pre_feedforward_layernorm.weight"
            })
    });
    has_norm
        || ck
            .metadata()
            .values()
            .any(|v| v.to_ascii_lowercase().contains("gemma"))
}

/// A `Format` error about `ck`.
fn format_error(ck: &impl TensorStore, reason: String) -> FipsError {
    FipsError::Format {
        path: ck.path().to_path_buf(),
        reason,
    }
}

/// Block numbers as a short list (`0, 1, 3`), abbreviated past a dozen.
fn list_indices(indices: &BTreeSet<usize>) -> String {
    let shown: Vec<String> = indices.iter().take(12).map(ToString::to_string).collect();
    let more = indices.len().saturating_sub(shown.len());
    if more == 0 {
        shown.join(", ")
    } else {
        format!("{}, … ({more} more)", shown.join(", "))
    }
}

/// A name with every all-digit component replaced by `{i}`: `blocks.3.mlp.fc1.weight` →
/// `blocks.{i}.mlp.fc1.weight`.
fn name_pattern(name: &str) -> String {
    name.split('.')
        .map(|part| {
            let numeric = !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
            if numeric { "{i}" } else { part }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Summarises tensor names for an error message: the distinct name patterns (digits as `{i}`) in
/// order of first appearance with their counts, the first [`MAX_PATTERNS`] of them.
fn summarize_names<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let mut patterns: Vec<(String, usize)> = Vec::new();
    let mut position: HashMap<String, usize> = HashMap::new();
    let mut total = 0;
    for name in names {
        total += 1;
        let pattern = name_pattern(name);
        match position.get(&pattern).and_then(|&at| patterns.get_mut(at)) {
            Some((_, count)) => *count += 1,
            None => {
                position.insert(pattern.clone(), patterns.len());
                patterns.push((pattern, 1));
            }
        }
    }
    if total == 0 {
        return "no tensors".into();
    }
    let listed: Vec<String> = patterns
        .iter()
        .take(MAX_PATTERNS)
        .map(|(p, n)| {
            if *n > 1 {
                format!("{p} (x{n})")
            } else {
                p.clone()
            }
        })
        .collect();
    let mut text = format!(
        "{} in {}: {}",
        plural(total, "tensor"),
        plural(patterns.len(), "name pattern"),
        listed.join(", ")
    );
    if patterns.len() > MAX_PATTERNS {
        text.push_str(&format!(", … and {} more", patterns.len() - MAX_PATTERNS));
    }
    text
}

/// `1 tensor`, `2 tensors`.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_replaces_numeric_components_only() {
        assert_eq!(
            name_pattern("blocks.11.mlp.fc1.weight"),
            "blocks.{i}.mlp.fc1.weight"
        );
        assert_eq!(
            name_pattern("model.layers.0.experts.7.w1.weight"),
            "model.layers.{i}.experts.{i}.w1.weight"
        );
        assert_eq!(name_pattern("foo.weight"), "foo.weight");
        assert_eq!(name_pattern("a..b"), "a..b");
        assert_eq!(name_pattern("12"), "{i}");
    }

    #[test]
    fn summary_counts_patterns_in_order_of_appearance() {
        let names = [
            "blocks.0.attn.qkv.weight",
            "blocks.0.norm1.weight",
            "blocks.1.attn.qkv.weight",
            "blocks.1.norm1.weight",
            "cls_token",
        ];
        assert_eq!(
            summarize_names(names),
            "5 tensors in 3 name patterns: blocks.{i}.attn.qkv.weight (x2), \
             blocks.{i}.norm1.weight (x2), cls_token"
        );
    }

    #[test]
    fn summary_of_one_and_of_none() {
        assert_eq!(
            summarize_names(["foo.weight"]),
            "1 tensor in 1 name pattern: foo.weight"
        );
        assert_eq!(summarize_names(std::iter::empty()), "no tensors");
    }

    #[test]
    fn summary_lists_at_most_twenty_patterns() {
        let names: Vec<String> = (0..25).map(|k| format!("t{k}.weight")).collect();
        let text = summarize_names(names.iter().map(String::as_str));
        assert!(text.starts_with("25 tensors in 25 name patterns: t0.weight, t1.weight"));
        assert!(text.contains("t19.weight"));
        assert!(!text.contains("t20.weight"));
        assert!(text.ends_with("… and 5 more"), "{text}");
    }

    #[test]
    fn parses_each_scheme() {
        let hit = |s: NamingScheme, n: &'static str| s.parse(n).map(|h| (h.prefix, h.index));
        use NamingScheme::*;
        assert_eq!(hit(Timm, "blocks.3.mlp.fc2.bias"), Some(("", 3)));
        assert_eq!(
            hit(Timm, "model.blocks.10.mlp.fc1.weight"),
            Some(("model.", 10))
        );
        assert_eq!(hit(Timm, "xblocks.1.mlp.fc1.weight"), None);
        assert_eq!(hit(Timm, "blocks.01.mlp.fc1.weight"), None);
        assert_eq!(hit(Timm, "blocks..mlp.fc1.weight"), None);
        assert_eq!(
            hit(HfBert, "bert.encoder.layer.2.output.dense.weight"),
            Some(("bert.", 2))
        );
        assert_eq!(
            hit(HfBert, "encoder.layer.0.intermediate.dense.bias"),
            Some(("", 0))
        );
        assert_eq!(
            hit(HfBert, "bert.encoder.layer.2.attention.output.dense.weight"),
            None
        );
        assert_eq!(hit(HfBert, "vit.encoder.layer.0.output.dense.weight"), None);
        assert_eq!(
            hit(HfVit, "vit.encoder.layer.0.output.dense.weight"),
            Some(("vit.", 0))
        );
        assert_eq!(hit(HfVit, "encoder.layer.0.output.dense.weight"), None);
        assert_eq!(
            hit(LlamaGated, "model.layers.31.mlp.down_proj.weight"),
            Some(("model.", 31))
        );
        assert_eq!(
            hit(LlamaGated, "model.layers.1.self_attn.q_proj.weight"),
            None
        );
    }

    #[test]
    fn tensor_names_round_trip_through_the_parser() {
        for scheme in NamingScheme::ALL {
            let prefix = if scheme == NamingScheme::HfVit {
                "vit."
            } else {
                "m."
            };
            for slot in 0..scheme.modules().len() {
                for param in [Param::Weight, Param::Bias] {
                    let name = scheme.tensor_name(prefix, 7, slot, param);
                    assert_eq!(
                        scheme.parse(&name),
                        Some(Hit { prefix, index: 7 }),
                        "{name}"
                    );
                }
            }
        }
    }

    #[test]
    fn distinct_marks_varying_values() {
        assert_eq!(distinct([4, 4, 4].into_iter()), "4");
        assert_eq!(distinct([8, 16, 8].into_iter()), "8/16 (varies by block)");
        assert_eq!(distinct(std::iter::empty::<usize>()), "-");
    }
}
