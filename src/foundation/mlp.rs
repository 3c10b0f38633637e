//! Dense transformer MLP blocks: the uncompressed originals.

use std::fmt;

use ndarray::{Array1, Array2, ArrayView2, Zip, linalg::general_mat_mul};

use crate::foundation::activation::Activation;
use crate::foundation::error::{FipsError, Result};
use crate::foundation::float::{Float, ensure_finite};
use crate::foundation::kernels::RowSplit;

/// A linear layer `y = x Wᵀ + b` with the weight in PyTorch `nn.Linear` layout `[out, in]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear<F> {
    weight: Array2<F>,
    bias: Option<Array1<F>>,
}

impl<F: Float> Linear<F> {
    /// A layer from its `[out, in]` weight and optional `[out]` bias; both must be finite.
    pub fn new(weight: Array2<F>, bias: Option<Array1<F>>) -> Result<Self> {
        if weight.is_empty() {
            return Err(FipsError::ShapeMismatch {
                what: "linear weight".into(),
                expected: vec![1, 1],
                got: weight.shape().to_vec(),
            });
        }
        ensure_finite(&weight, || "linear weight".into())?;
        if let Some(b) = &bias {
            if b.len() != weight.nrows() {
                return Err(FipsError::ShapeMismatch {
                    what: "linear bias".into(),
                    expected: vec![weight.nrows()],
                    got: vec![b.len()],
                });
            }
            ensure_finite(b, || "linear bias".into())?;
        }
        Ok(Self { weight, bias })
    }

    /// The `[out, in]` weight.
    pub fn weight(&self) -> &Array2<F> {
        &self.weight
    }

    /// The `[out]` bias, if the layer has one.
    pub fn bias(&self) -> Option<&Array1<F>> {
        self.bias.as_ref()
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.nrows()
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.ncols()
    }

    /// `y = x Wᵀ + b` for `x` of shape `[tokens, in]`.
    pub fn forward(&self, x: ArrayView2<'_, F>) -> Result<Array2<F>> {
        if x.ncols() != self.in_features() {
            return Err(FipsError::ShapeMismatch {
                what: "linear input".into(),
                expected: vec![x.nrows(), self.in_features()],
                got: x.shape().to_vec(),
            });
        }
        let mut y = Array2::zeros((x.nrows(), self.out_features()));
        self.forward_into(x, &mut y);
        Ok(y)
    }

    /// `out = x Wᵀ + b`, shapes already checked.
    pub(crate) fn forward_into(&self, x: ArrayView2<'_, F>, out: &mut Array2<F>) {
        general_mat_mul(F::one(), &x, &self.weight.t(), F::zero(), out);
        if let Some(b) = &self.bias {
            *out += b;
        }
    }

    /// The layer as `(weight, bias)`.
    pub fn into_parts(self) -> (Array2<F>, Option<Array1<F>>) {
        (self.weight, self.bias)
    }
}

/// The structure of an MLP block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MlpKind {
    /// `fc2(act(fc1 x))`: two matrices, fc1 `[I, d]` and fc2 `[d, I]` (ViT, BERT, GPT-2).
    Standard,
    /// `down(act(gate x) ⊙ up x)`: three matrices, gate and up `[I, d]`, down `[d, I]` (Llama, Gemma, Qwen).
    Gated,
}

/// How a matrix enters the block, which fixes its orientation in the shared layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatrixRole {
    /// Maps the width d up to I (fc1, gate, up); stored `[I, d]`, oriented as its transpose `[d, I]`.
    Up,
    /// Maps I back down to d (fc2, down); stored `[d, I]` and used as is.
    Down,
}

impl MlpKind {
    /// Number of weight matrices per block (the `f` of the budget formula).
    pub fn matrices_per_block(self) -> usize {
        match self {
            Self::Standard => 2,
            Self::Gated => 3,
        }
    }

    /// The matrices' names in module order.
    pub fn matrix_names(self) -> &'static [&'static str] {
        match self {
            Self::Standard => &["fc1", "fc2"],
            Self::Gated => &["gate", "up", "down"],
        }
    }

    /// The matrices' roles in module order.
    pub fn matrix_roles(self) -> &'static [MatrixRole] {
        match self {
            Self::Standard => &[MatrixRole::Up, MatrixRole::Down],
            Self::Gated => &[MatrixRole::Up, MatrixRole::Up, MatrixRole::Down],
        }
    }

    /// The name used in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Gated => "gated",
        }
    }
}

impl fmt::Display for MlpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One transformer block's original MLP: standard or gated, with its activation.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseMlp<F> {
    kind: MlpKind,
    activation: Activation,
    /// The linear layers in module order (fc1, fc2 or gate, up, down).
    layers: Vec<Linear<F>>,
}

impl<F: Float> DenseMlp<F> {
    /// A standard MLP `fc2(act(fc1 x))`; fc1 must be `[I, d]` and fc2 `[d, I]`.
    pub fn standard(fc1: Linear<F>, fc2: Linear<F>, activation: Activation) -> Result<Self> {
        let (i, d) = fc1.weight.dim();
        check_layer_shape("fc2 weight", &fc2, [d, i])?;
        Ok(Self {
            kind: MlpKind::Standard,
            activation,
            layers: vec![fc1, fc2],
        })
    }

    /// A gated MLP `down(act(gate x) ⊙ up x)`; gate and up must be `[I, d]`, down `[d, I]`.
    pub fn gated(
        gate: Linear<F>,
        up: Linear<F>,
        down: Linear<F>,
        activation: Activation,
    ) -> Result<Self> {
        let (i, d) = gate.weight.dim();
        check_layer_shape("up weight", &up, [i, d])?;
        check_layer_shape("down weight", &down, [d, i])?;
        Ok(Self {
            kind: MlpKind::Gated,
            activation,
            layers: vec![gate, up, down],
        })
    }

    /// Builds a block of `kind` from its layers in module order.
    pub fn from_layers(
        kind: MlpKind,
        layers: Vec<Linear<F>>,
        activation: Activation,
    ) -> Result<Self> {
        let expected = kind.matrices_per_block();
        if layers.len() != expected {
            return Err(FipsError::ShapeMismatch {
                what: format!("number of layers of a {kind} MLP"),
                expected: vec![expected],
                got: vec![layers.len()],
            });
        }
        let mut it = layers.into_iter();
        let mut next = || it.next().ok_or(FipsError::EmptyGroup);
        match kind {
            MlpKind::Standard => Self::standard(next()?, next()?, activation),
            MlpKind::Gated => Self::gated(next()?, next()?, next()?, activation),
        }
    }

    /// Standard or gated.
    pub fn kind(&self) -> MlpKind {
        self.kind
    }

    /// The activation.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Model width d (input and output of the block).
    pub fn width(&self) -> usize {
        self.layers[0].in_features()
    }

    /// MLP width I (the hidden layer).
    pub fn intermediate(&self) -> usize {
        self.layers[0].out_features()
    }

    /// The linear layers in module order.
    pub fn layers(&self) -> &[Linear<F>] {
        &self.layers
    }

    /// Weight parameters (biases excluded): `f d I`.
    pub fn weight_count(&self) -> usize {
        self.layers.iter().map(|l| l.weight.len()).sum()
    }

    /// Bias parameters.
    pub fn bias_count(&self) -> usize {
        self.layers
            .iter()
            .filter_map(|l| l.bias.as_ref())
            .map(|b| b.len())
            .sum()
    }

    /// The block's output for inputs `x` of shape `[tokens, d]`.
    pub fn forward(&self, x: ArrayView2<'_, F>) -> Result<Array2<F>> {
        if x.ncols() != self.width() {
            return Err(FipsError::ShapeMismatch {
                what: "MLP input".into(),
                expected: vec![x.nrows(), self.width()],
                got: x.shape().to_vec(),
            });
        }
        let hidden = self.hidden(x);
        let mut y = Array2::zeros((x.nrows(), self.width()));
        self.layers[self.layers.len() - 1].forward_into(hidden.view(), &mut y);
        Ok(y)
    }

    /// The activated hidden state fed to fc2 / down, `[tokens, I]`; shapes already checked.
    pub(crate) fn hidden(&self, x: ArrayView2<'_, F>) -> Array2<F> {
        let mut h = Array2::zeros((x.nrows(), self.intermediate()));
        self.layers[0].forward_into(x, &mut h);
        let act = self.activation;
        let split = RowSplit::available();
        let width = self.intermediate();
        match self.kind {
            MlpKind::Standard => match h.as_slice_mut() {
                Some(hs) => split.activate_values(act, hs, width),
                None => h.mapv_inplace(|v| act.apply(v)),
            },
            MlpKind::Gated => {
                let mut up = Array2::zeros(h.raw_dim());
                self.layers[1].forward_into(x, &mut up);
                match (h.as_slice_mut(), up.as_slice()) {
                    (Some(hs), Some(us)) => split.activate_gated_values(act, hs, us, width),
                    _ => Zip::from(&mut h)
                        .and(&up)
                        .for_each(|g, &u| *g = act.apply(*g) * u),
                }
            }
        }
        h
    }

    /// The hidden state fed to fc2 / down for inputs `[tokens, d]` (the activations a whitening
    /// method needs for the down projection).
    pub fn hidden_activations(&self, x: ArrayView2<'_, F>) -> Result<Array2<F>> {
        if x.ncols() != self.width() {
            return Err(FipsError::ShapeMismatch {
                what: "MLP input".into(),
                expected: vec![x.nrows(), self.width()],
                got: x.shape().to_vec(),
            });
        }
        Ok(self.hidden(x))
    }

    /// The weight of matrix `j` (module order) oriented to `[d, I]`: up-projections transposed.
    pub(crate) fn oriented(&self, j: usize) -> ArrayView2<'_, F> {
        let w = self.layers[j].weight.view();
        match self.kind.matrix_roles()[j] {
            MatrixRole::Up => w.reversed_axes(),
            MatrixRole::Down => w,
        }
    }
}

fn check_layer_shape<F: Float>(what: &str, layer: &Linear<F>, expected: [usize; 2]) -> Result<()> {
    if layer.weight.shape() != expected {
        return Err(FipsError::ShapeMismatch {
            what: what.into(),
            expected: expected.to_vec(),
            got: layer.weight.shape().to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;
    use ndarray::array;

    #[test]
    fn standard_forward_matches_hand_computation() {
        let fc1 = Linear::new(
            array![[1.0, 2.0], [0.5, -1.0], [0.0, 1.0]],
            Some(array![0.1, 0.2, -0.3]),
        )
        .unwrap();
        let fc2 = Linear::new(
            array![[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5]],
            Some(array![0.0, 1.0]),
        )
        .unwrap();
        let mlp = DenseMlp::standard(fc1, fc2, Activation::Relu).unwrap();
        let x = array![[1.0, 1.0]];
        // h = [3.1, -0.3, 0.7] -> relu [3.1, 0, 0.7]; y = [3.1 + 1.4, -3.1 + 0.35 + 1]
        let y = mlp.forward(x.view()).unwrap();
        assert_abs_diff_eq!(y, array![[4.5, -1.75]], epsilon = 1e-12);
    }

    /// This thread's read system calls so far (`syscr` of `/proc/thread-self/io`, Linux).
    #[cfg(target_os = "linux")]
    fn thread_reads() -> u64 {
        use std::io::Read;
        // One `read` per call whatever the counters' digits (`read_to_string` grows its buffer
        // in steps, so its count of reads could change with the file's length).
        let mut buf = [0u8; 4096];
        let n = std::fs::File::open("/proc/thread-self/io")
            .and_then(|mut f| f.read(&mut buf))
            .unwrap_or(0);
        let io = std::str::from_utf8(&buf[..n]).unwrap_or("");
        io.lines()
            .find_map(|l| l.strip_prefix("syscr: "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_forward_pass_reads_no_files() {
        // The standard library reads the cgroup's CPU quota on every
        // `available_parallelism` call; asked once per activation, that was a third of a
        // one-token DeiT-tiny pass. Reading the counter costs the same reads each time.
        let fc1 = Linear::new(Array2::from_elem((32, 8), 0.1), Some(Array1::zeros(32))).unwrap();
        let fc2 = Linear::new(Array2::from_elem((8, 32), 0.1), None).unwrap();
        let mlp = DenseMlp::standard(fc1, fc2, Activation::Gelu).unwrap();
        let x = Array2::from_elem((1, 8), 1.0);
        mlp.forward(x.view()).unwrap();
        let (a, b) = (thread_reads(), thread_reads());
        if a == 0 {
            eprintln!("skipped: no /proc/thread-self/io");
            return;
        }
        for _ in 0..20 {
            mlp.forward(x.view()).unwrap();
        }
        let c = thread_reads();
        assert_eq!(
            c - b,
            b - a,
            "20 forward passes made {} reads",
            c - b - (b - a)
        );
    }

    #[test]
    fn gated_forward_matches_hand_computation() {
        let gate = Linear::new(array![[1.0], [-1.0]], None).unwrap();
        let up = Linear::new(array![[2.0], [3.0]], None).unwrap();
        let down = Linear::new(array![[1.0, 1.0]], None).unwrap();
        let mlp = DenseMlp::gated(gate, up, down, Activation::Relu).unwrap();
        // x = 2: gate [2, -2] -> relu [2, 0]; up [4, 6]; a = [8, 0]; y = 8.
        let y = mlp.forward(array![[2.0]].view()).unwrap();
        assert_abs_diff_eq!(y[[0, 0]], 8.0, epsilon = 1e-12);
    }

    #[test]
    fn bad_shapes_and_values_are_errors() {
        let fc1 = Linear::new(Array2::<f64>::zeros((4, 2)), None).unwrap();
        let fc2 = Linear::new(Array2::<f64>::zeros((3, 4)), None).unwrap();
        assert!(matches!(
            DenseMlp::standard(fc1, fc2, Activation::Gelu),
            Err(FipsError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            Linear::new(Array2::<f64>::zeros((2, 2)), Some(Array1::zeros(3))),
            Err(FipsError::ShapeMismatch { .. })
        ));
        let mut w = Array2::<f32>::zeros((2, 2));
        w[[1, 0]] = f32::NAN;
        match Linear::new(w, None) {
            Err(FipsError::NonFinite { index, .. }) => assert_eq!(index, vec![1, 0]),
            other => panic!("expected NonFinite, got {other:?}"),
        }
        let fc1 = Linear::new(Array2::<f64>::zeros((4, 2)), None).unwrap();
        let fc2 = Linear::new(Array2::<f64>::zeros((2, 4)), None).unwrap();
        let mlp = DenseMlp::standard(fc1, fc2, Activation::Gelu).unwrap();
        assert!(mlp.forward(Array2::zeros((3, 5)).view()).is_err());
    }
}
