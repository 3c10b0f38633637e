//! Language models from Hugging Face folders (feature `text`): candle forward passes of the
//! Llama family and of BERT-style encoders, calibration capture from text, and perplexity (of the
//! decoders).
//!
//! - [`capture_text`]: streams every block's MLP input for a token budget of a text to an
//!   MLP-input file ([`crate::format::mlp_inputs`]), ready for compression.
//! - [`compress_text_model`]: capture and compression in one call (calibration streamed to a
//!   file in the output directory's work area), with perplexity before and after;
//!   [`compress_text_group`] and [`assemble_text_model`]: the same run scattered as one job per
//!   group over a shared work area, then assembled (byte-identical outputs).
//! - [`perplexity()`]: per-paragraph perplexity (BOS prepended) of a folder, optionally with
//!   replaced (compressed, rebuilt dense) MLP tensors.

pub mod bert;
pub mod capture;
pub mod compress;
pub mod model;
pub mod nn;
pub mod perplexity;
pub mod text_model;
pub mod tokenize;

pub use bert::BertModel;
pub use capture::{CaptureOptions, CaptureReport, capture_text};
pub use compress::{
    TextAssembleOptions, TextCompressOptions, TextCompression, TextPart, assemble_text_model,
    compress_text_group, compress_text_model,
};
pub use model::LlamaModel;
pub use perplexity::{Perplexity, perplexity, perplexity_of_paragraphs};
pub use text_model::TextModel;
pub use tokenize::{TextTokenizer, paragraphs};
