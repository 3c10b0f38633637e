//! One shape for every method's settings: unchecked params become valid params through
//! [`ParamGuard::check`], and only valid params compress (as linfa's `ParamGuard`).

use crate::foundation::error::Result;

/// Settings that are checked once, before any work, into their valid form.
///
/// Every method has a pair `XParams` (a builder, serde-derived, possibly invalid) and
/// `XValidParams` (every value in range; implements [`Compressor`](super::Compressor)). `check`
/// names the first bad value in a typed [`FipsError::InvalidParameter`](crate::FipsError).
pub trait ParamGuard {
    /// The valid form.
    type Checked;

    /// Validates every setting.
    fn check(&self) -> Result<Self::Checked>;
}
