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

/// Reads a JPEG file and checks it before decoding: at most
/// [`MAX_IMAGE_FILE_BYTES`](crate::math::limits::MAX_IMAGE_FILE_BYTES), complete (see
/// [`inspect_jpeg`](crate::app::jpeg::inspect_jpeg): a truncated file is an error, not a grey
/// picture) and of a size within [`check_image_size`](crate::math::limits::check_image_size). Returns
/// the bytes and the declared frame.
pub fn read_checked_jpeg(path: impl AsRef<Path>) -> Result<(Vec<u8>, crate::app::jpeg::JpegFrame)> {
    use std::io::Read;
    let path = path.as_ref();
    let error = |reason: String| FipsError::Image {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| error(e.to_string()))?;
    let limit = crate::math::limits::MAX_IMAGE_FILE_BYTES;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| error(e.to_string()))?;
    if bytes.len() as u64 > limit {
        return Err(error(format!(
            "larger than {limit} bytes (MAX_IMAGE_FILE_BYTES)"
        )));
    }
    let frame = crate::app::jpeg::inspect_jpeg(&bytes).map_err(&error)?;
    crate::math::limits::check_image_size(frame.width, frame.height).map_err(&error)?;
    Ok((bytes, frame))
}

/// Decodes an image to `[224, 224, 3]` RGB pixels (after [`read_checked_jpeg`]).
pub fn load_image(path: impl AsRef<Path>) -> Result<Array3<u8>> {
    let path = path.as_ref();
    let error = |reason: String| FipsError::Image {
        path: path.to_path_buf(),
        reason,
    };
    let (bytes, frame) = read_checked_jpeg(path)?;
    let mut reader =
        image::ImageReader::with_format(std::io::Cursor::new(bytes), image::ImageFormat::Jpeg);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(crate::math::limits::MAX_IMAGE_SIDE);
    limits.max_image_height = Some(crate::math::limits::MAX_IMAGE_SIDE);
    reader.limits(limits);
    let decoded = reader.decode().map_err(|e| error(e.to_string()))?;
    if (decoded.width(), decoded.height()) != (frame.width, frame.height) {
        return Err(error(format!(
            "decoded {} × {} pixels, the header declares {} × {}",
            decoded.width(),
            decoded.height(),
            frame.width,
            frame.height
        )));
    }
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
    if limit == Some(0) {
        return Err(FipsError::InvalidParameter {
            name: "calib_images",
            reason: "must be at least 1".into(),
        });
    }
    if let Some(n) = limit {
        items.truncate(n);
    }
    let side = SIDE as usize;
    let mut pixels = Array4::zeros((items.len(), side, side, 3));
    on_image(0, items.len());
    // A few images per core at once; progress after each.
    let mut rows = pixels.axis_chunks_iter_mut(Axis(0), DECODE_CHUNK);
    let mut done = 0;
    crate::foundation::thread_plan::map_in_rounds(
        items.chunks(DECODE_CHUNK),
        crate::foundation::thread_plan::available_threads(),
        |part| {
            part.iter()
                .map(|item| load_image(&item.path))
                .collect::<Result<Vec<_>>>()
        },
        |images| {
            if let Some(mut dst) = rows.next() {
                for (mut d, image) in dst.axis_iter_mut(Axis(0)).zip(&images) {
                    d.assign(image);
                }
            }
            done += images.len();
            on_image(done, items.len());
            Ok(())
        },
    )?;
    Ok((pixels, items.iter().map(|i| i.label).collect()))
}

/// Images each core decodes at once in [`decode_split`].
const DECODE_CHUNK: usize = 8;

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
