//! Language models from Hugging Face folders (feature `text`): a candle forward pass of the
//! Llama family, calibration capture from text, and perplexity.
//!
//! - [`capture_text`]: streams every block's MLP input for a token budget of a text to an
//!   MLP-input file ([`crate::format::mlp_inputs`]), ready for compression.
//! - [`compress_text_model`]: capture and compression in one call (calibration streamed to a
//!   file in the output directory's work area), with perplexity before and after.
//! - [`perplexity()`]: per-paragraph perplexity (BOS prepended) of a folder, optionally with
//!   replaced (compressed, rebuilt dense) MLP tensors.

pub mod capture;
pub mod compress;
pub mod model;
pub mod perplexity;
pub mod tokenize;

pub use capture::{CaptureOptions, CaptureReport, capture_text};
pub use compress::{TextCompressOptions, TextCompression, compress_text_model};
pub use model::LlamaModel;
pub use perplexity::{Perplexity, perplexity, perplexity_of_paragraphs};
pub use tokenize::{TextTokenizer, paragraphs};
