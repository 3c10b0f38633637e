//! Labelled image sets laid out as `labels.tsv` plus split folders, decoded to RGB pixels.
//!
//! `labels.tsv` is tab-separated with a header `file  label  synset  split`; `file` is relative to
//! the set's directory. Images of exactly 224 × 224 are used as they are; any other size is resized
//! (Catmull-Rom) so that its shorter side is 248 and centre-cropped to 224 × 224, the usual
//! ImageNet evaluation transform.

use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4, Axis};

use crate::app::vit::preprocess;
use crate::foundation::error::{FipsError, Result};

const SIDE: u32 = 224;
const RESIZE_SHORTER: u32 = 248;

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabeledImage {
    /// Absolute or set-relative path of the image file.
    pub path: PathBuf,
    /// The `file` column.
    pub file: String,
    /// Class index.
    pub label: usize,
    /// The `split` column (`calib`, `eval`, …).
    pub split: String,
}

/// Reads `dir/labels.tsv`.
pub fn read_labels(dir: impl AsRef<Path>) -> Result<Vec<LabeledImage>> {
    let dir = dir.as_ref();
    let path = dir.join("labels.tsv");
    let text = std::fs::read_to_string(&path).map_err(|source| FipsError::Io {
        path: path.clone(),
        source,
    })?;
    let mut lines = text.lines().enumerate();
    let format = |line: usize, reason: String| FipsError::Format {
        path: path.clone(),
        reason: format!("line {}: {reason}", line + 1),
    };
    match lines.next() {
        Some((_, header))
            if header
                .split('\t')
                .take(4)
                .eq(["file", "label", "synset", "split"]) => {}
        _ => {
            return Err(format(
                0,
                "expected the header `file\tlabel\tsynset\tsplit`".into(),
            ));
        }
    }
    lines
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, line)| {
            let fields: Vec<&str> = line.split('\t').collect();
            let [file, label, _synset, split] = fields[..] else {
                return Err(format(
                    n,
                    format!("expected 4 tab-separated fields, got {}", fields.len()),
                ));
            };
            let label = label
                .trim()
                .parse()
                .map_err(|_| format(n, format!("label {label:?} is not a class index")))?;
            Ok(LabeledImage {
                path: dir.join(file),
                file: file.to_string(),
                label,
                split: split.trim().to_string(),
            })
        })
        .collect()
}

/// The images of one split, in file order.
pub fn split(items: &[LabeledImage], name: &str) -> Vec<LabeledImage> {
    items.iter().filter(|i| i.split == name).cloned().collect()
}

/// Decodes an image to `[224, 224, 3]` RGB pixels.
pub fn load_image(path: impl AsRef<Path>) -> Result<Array3<u8>> {
    let path = path.as_ref();
    let error = |reason: String| FipsError::Image {
        path: path.to_path_buf(),
        reason,
    };
    let decoded = image::ImageReader::open(path)
        .map_err(|e| error(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| error(e.to_string()))?
        .decode()
        .map_err(|e| error(e.to_string()))?;
    let mut rgb = decoded.to_rgb8();
    let (w, h) = rgb.dimensions();
    if w == 0 || h == 0 {
        return Err(error("the image is empty".into()));
    }
    if (w, h) != (SIDE, SIDE) {
        let scale = f64::from(RESIZE_SHORTER) / f64::from(w.min(h));
        let (nw, nh) = (
            ((f64::from(w) * scale).round() as u32).max(SIDE),
            ((f64::from(h) * scale).round() as u32).max(SIDE),
        );
        let resized =
            image::imageops::resize(&rgb, nw, nh, image::imageops::FilterType::CatmullRom);
        rgb = image::imageops::crop_imm(&resized, (nw - SIDE) / 2, (nh - SIDE) / 2, SIDE, SIDE)
            .to_image();
    }
    Array3::from_shape_vec((SIDE as usize, SIDE as usize, 3), rgb.into_raw())
        .map_err(|e| error(e.to_string()))
}

/// Decodes `items` into one `[n, 224, 224, 3]` pixel array.
pub fn load_pixels(items: &[LabeledImage]) -> Result<Array4<u8>> {
    let side = SIDE as usize;
    let mut out = Array4::zeros((items.len(), side, side, 3));
    for (mut dst, item) in out.axis_iter_mut(Axis(0)).zip(items) {
        dst.assign(&load_image(&item.path)?);
    }
    Ok(out)
}

/// Decodes split `name` of the labelled set in `dir` (only the first `limit` images if given):
/// `[n, 224, 224, 3]` pixels and their labels; `on_image(done, total)` follows the decoding.
pub fn decode_split(
    dir: impl AsRef<Path>,
    name: &str,
    limit: Option<usize>,
    on_image: &mut dyn FnMut(usize, usize),
) -> Result<(Array4<u8>, Vec<usize>)> {
    let dir = dir.as_ref();
    let mut items = split(&read_labels(dir)?, name);
    if items.is_empty() {
        return Err(FipsError::InvalidParameter {
            name: "split",
            reason: format!("no images of split {name:?} in {}", dir.display()),
        });
    }
    if let Some(n) = limit {
        items.truncate(n);
    }
    let side = SIDE as usize;
    let mut pixels = Array4::zeros((items.len(), side, side, 3));
    on_image(0, items.len());
    for (k, (mut dst, item)) in pixels.axis_iter_mut(Axis(0)).zip(&items).enumerate() {
        dst.assign(&load_image(&item.path)?);
        on_image(k + 1, items.len());
    }
    Ok((pixels, items.iter().map(|i| i.label).collect()))
}

/// Decodes `items` into a normalised `[n, 3, 224, 224]` model input.
pub fn load_batch(items: &[LabeledImage]) -> Result<ndarray::Array4<f32>> {
    Ok(preprocess(load_pixels(items)?.view()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_malformed_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("fips-labels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("labels.tsv"),
            "file\tlabel\tsynset\tsplit\na/x.jpg\t3\tn1\tcalib\nb/y.jpg\t7\tn2\teval\n",
        )
        .unwrap();
        let items = read_labels(&dir).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(split(&items, "eval")[0].label, 7);
        assert_eq!(items[0].path, dir.join("a/x.jpg"));
        std::fs::write(
            dir.join("labels.tsv"),
            "file\tlabel\tsynset\tsplit\na.jpg\tseven\tn\teval\n",
        )
        .unwrap();
        match read_labels(&dir) {
            Err(FipsError::Format { reason, .. }) => assert!(reason.contains("line 2"), "{reason}"),
            other => panic!("expected a format error, got {other:?}"),
        }
        std::fs::write(dir.join("labels.tsv"), "oops\n").unwrap();
        assert!(read_labels(&dir).is_err());
        assert!(matches!(
            load_image(dir.join("labels.tsv")),
            Err(FipsError::Image { .. })
        ));
        std::fs::remove_dir_all(dir).ok();
    }
}
