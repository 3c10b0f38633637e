//! Application (feature `app`): the end-to-end pipeline over a checkpoint, the ViT/DeiT forward
//! pass, classification metrics, SVG plots, run reports, and (feature `images`) labelled image sets.
//! Nothing below imports it.

#[cfg(feature = "images")]
#[cfg_attr(docsrs, doc(cfg(feature = "images")))]
pub mod augment;
#[cfg(feature = "images")]
#[cfg_attr(docsrs, doc(cfg(feature = "images")))]
pub mod distill;
#[cfg(feature = "images")]
#[cfg_attr(docsrs, doc(cfg(feature = "images")))]
pub mod images;
#[cfg(feature = "images")]
#[cfg_attr(docsrs, doc(cfg(feature = "images")))]
pub mod jpeg;
pub mod metrics;
pub mod pipeline;
pub mod report;
pub mod run_dir;
pub mod svg;
#[cfg(feature = "text")]
#[cfg_attr(docsrs, doc(cfg(feature = "text")))]
pub mod text;
pub mod vit;
