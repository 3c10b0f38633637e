//! Math: the FiPS objective and its hand-written gradients, AdamW, sparsity schedules, the SVD
//! initialisation and basis layouts, budgets, whitening, and calibration sets. Imports only the
//! foundation.

pub mod bases;
pub(crate) mod bitmask;
pub mod budget;
pub mod calibration;
pub mod init;
pub mod limits;
pub mod objective;
pub mod optim;
pub(crate) mod select;
pub mod sparsity;
pub mod subset;
pub mod tiles;
pub mod validation;
pub mod whitening;
