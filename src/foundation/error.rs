//! The crate's error type.

use thiserror::Error;

/// Every failure a caller can cause, as a typed value that says what and why.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FipsError {
    /// A parameter is outside its valid range.
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParameter {
        /// The parameter's name, as in the builder method.
        name: &'static str,
        /// Why the value is rejected, with the value itself.
        reason: String,
    },

    /// A setting was given that the chosen method does not use.
    #[error("`{name}` is not a setting of method {method}: {hint}")]
    UnusedParameter {
        /// The method.
        method: &'static str,
        /// The setting, as the option is named.
        name: &'static str,
        /// What the method uses instead.
        hint: &'static str,
    },

    /// An array does not have the shape its role requires.
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// Which array.
        what: String,
        /// The shape it must have.
        expected: Vec<usize>,
        /// The shape it has.
        got: Vec<usize>,
    },

    /// The blocks of one group do not all have the same structure.
    #[error("block {block} of the group does not match block 0: {reason}")]
    GroupMismatch {
        /// Index of the offending block within the group.
        block: usize,
        /// What differs.
        reason: String,
    },

    /// A group has no blocks.
    #[error("a group needs at least one block")]
    EmptyGroup,

    /// An array holds NaN or infinite values.
    #[error("{what} contains a non-finite value (NaN or infinity) at index {index:?}")]
    NonFinite {
        /// Which array.
        what: String,
        /// Index of the first non-finite entry.
        index: Vec<usize>,
    },

    /// Calibration data holds no tokens (or no blocks).
    #[error("calibration data is empty: {reason}")]
    EmptyCalibration {
        /// What is empty.
        reason: String,
    },

    /// The budget and sparsity leave no room for a single rank.
    #[error(
        "the budget gives rank 0: p = {budget} with sparsity {sparsity} cannot pay for one column of U plus one row of V \
         (d = {d}, I = {intermediate}, {matrices} matrices)"
    )]
    ZeroRank {
        /// The budget fraction p.
        budget: f64,
        /// The V sparsity s.
        sparsity: f64,
        /// Model width.
        d: usize,
        /// MLP width.
        intermediate: usize,
        /// Number of matrices in the group (f * n).
        matrices: usize,
    },

    /// The mini-batch asks for more tokens than the calibration set holds.
    #[error("batch of {batch} tokens is larger than the calibration set ({tokens} tokens)")]
    BatchTooLarge {
        /// Requested batch size.
        batch: usize,
        /// Tokens available.
        tokens: usize,
    },

    /// The training loss became NaN or infinite.
    #[error("training diverged: loss is {loss} at step {step} (lower the learning rate)")]
    NonFiniteLoss {
        /// The 1-based training step.
        step: usize,
        /// The offending loss value.
        loss: f64,
    },

    /// An index (block, matrix) is out of range.
    #[error("{what} index {index} is out of range (there are {len})")]
    IndexOutOfRange {
        /// What was indexed.
        what: &'static str,
        /// The index given.
        index: usize,
        /// The number of items.
        len: usize,
    },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// A file is not what it claims to be: corrupted, truncated, or of the wrong format.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A tensor the operation needs is not in the file.
    #[error("{path}: no tensor named {name:?}")]
    MissingTensor {
        /// The file.
        path: std::path::PathBuf,
        /// The missing tensor.
        name: String,
    },

    /// A tensor has a dtype the operation cannot use.
    #[error("tensor {name:?} has dtype {dtype}, expected {expected}")]
    UnsupportedDtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
        /// What would have worked.
        expected: &'static str,
    },

    /// No known MLP naming scheme matches a checkpoint.
    #[error(
        "{path}: no supported MLP layout found (timm ViT/DeiT, Hugging Face BERT or ViT, Llama-style gated); \
         tensors seen: {seen}"
    )]
    UnknownLayout {
        /// The checkpoint.
        path: std::path::PathBuf,
        /// A summary of the tensor names that were seen.
        seen: String,
    },

    /// An image could not be decoded or has an unusable size.
    #[error("image {path}: {reason}")]
    Image {
        /// The image file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// An output path would replace or write through a file that must not change: an input of
    /// the same command (same file after resolving links, or a hard link to it), another output,
    /// a symbolic link, or something that is not a regular file.
    #[error("refusing to write {path}: {reason}")]
    UnsafeOutput {
        /// The output path.
        path: std::path::PathBuf,
        /// Why it is refused.
        reason: String,
    },

    /// A work area (the per-group parts of a resumable or scaled-out run) holds parts made with
    /// other settings, or parts that do not check out; nothing is reused silently.
    #[error("work area {dir}: {reason}")]
    WorkArea {
        /// The work area.
        dir: std::path::PathBuf,
        /// What does not match, and what to do about it.
        reason: String,
    },

    /// Assembling the outputs of a run needs every group's part, and some are not there yet.
    #[error(
        "work area {dir}: the parts of group(s) {missing:?} are missing (run `fips compress ... \
         --only-group K --work-dir {dir}` for each of them first)"
    )]
    MissingParts {
        /// The work area.
        dir: std::path::PathBuf,
        /// The groups (0-based, in run order) whose parts are missing.
        missing: Vec<usize>,
    },

    /// A numerical routine could not produce a result.
    #[error("numerical failure: {0}")]
    Numerical(String),

    /// Encoded data (a byte buffer or a tensor of a file) contradicts its own declared sizes.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// What was being decoded.
        what: String,
        /// Which count, length or index is inconsistent.
        reason: String,
    },

    /// A file declares a format version this build does not read.
    #[error(
        "{path}: {format} version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// The file.
        path: std::path::PathBuf,
        /// The format's name.
        format: String,
        /// The version the file declares.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },

    /// A model folder or the text for a language model is unusable (see [`ModelError`](crate::foundation::model_error::ModelError)).
    #[error(transparent)]
    Model(#[from] crate::foundation::model_error::ModelError),

    /// LAPACK failed (for example an SVD that did not converge).
    #[error("linear algebra failure: {0}")]
    Linalg(#[from] ndarray_linalg::error::LinalgError),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, FipsError>;

/// Builds an [`FipsError::InvalidParameter`].
pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> FipsError {
    FipsError::InvalidParameter {
        name,
        reason: reason.into(),
    }
}
