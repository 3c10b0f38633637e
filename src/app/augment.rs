//! Extra calibration views of images: seeded random-resized crops and horizontal flips, the
//! augmentation ImageNet training uses, so that a few hundred calibration images give more
//! distinct MLP inputs.
//!
//! A view of a `224 × 224` image takes a crop of area `a · 224²` with `a` uniform in
//! `[min_area, 1]` and aspect ratio `ρ` log-uniform in `[3/4, 4/3]` (side `√(a ρ)` by `√(a / ρ)`,
//! clipped to the image), at a uniform position, resizes it back to `224 × 224` (bilinear), and
//! mirrors it with probability 1/2.

use image::{RgbImage, imageops};
use ndarray::{Array3, Array4, ArrayView3, ArrayView4, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::foundation::error::{FipsError, Result, invalid};

/// One random-resized-crop-and-flip view of `pixels` (`[H, W, 3]`, RGB), same size as the input.
pub fn random_view(
    pixels: ArrayView3<'_, u8>,
    min_area: f64,
    rng: &mut impl Rng,
) -> Result<Array3<u8>> {
    let (h, w, c) = pixels.dim();
    if c != 3 || h == 0 || w == 0 {
        return Err(invalid(
            "pixels",
            format!("expected [H, W, 3] RGB, got {:?}", pixels.shape()),
        ));
    }
    if !(min_area > 0.0 && min_area <= 1.0) {
        return Err(invalid(
            "min_area",
            format!("must be in (0, 1], got {min_area}"),
        ));
    }
    let image = RgbImage::from_raw(w as u32, h as u32, pixels.iter().copied().collect())
        .ok_or_else(|| FipsError::Numerical("pixel buffer size".into()))?;
    let area = rng.random_range(min_area..=1.0) * (h * w) as f64;
    let log_ratio = rng.random_range((3.0f64 / 4.0).ln()..=(4.0f64 / 3.0).ln());
    let ratio = log_ratio.exp();
    let cw = ((area * ratio).sqrt().round() as usize).clamp(1, w);
    let ch = ((area / ratio).sqrt().round() as usize).clamp(1, h);
    let x = rng.random_range(0..=w - cw);
    let y = rng.random_range(0..=h - ch);
    let crop = imageops::crop_imm(&image, x as u32, y as u32, cw as u32, ch as u32).to_image();
    let mut view = imageops::resize(&crop, w as u32, h as u32, imageops::FilterType::Triangle);
    if rng.random_bool(0.5) {
        imageops::flip_horizontal_in_place(&mut view);
    }
    Array3::from_shape_vec((h, w, 3), view.into_raw())
        .map_err(|e| FipsError::Numerical(e.to_string()))
}

/// `views` random views of every image of `pixels` (`[n, H, W, 3]`), seeded: `[n · views, H, W, 3]`,
/// the views of image `k` at rows `k · views ..`.
pub fn random_views(
    pixels: ArrayView4<'_, u8>,
    views: usize,
    min_area: f64,
    seed: u64,
) -> Result<Array4<u8>> {
    let (n, h, w, c) = pixels.dim();
    let mut out = Array4::zeros((n * views, h, w, c));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (k, image) in pixels.axis_iter(Axis(0)).enumerate() {
        for v in 0..views {
            out.index_axis_mut(Axis(0), k * views + v)
                .assign(&random_view(image, min_area, &mut rng)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_seeded_same_sized_and_whole_crops_can_only_flip() {
        let pixels = Array4::from_shape_fn((2, 32, 40, 3), |(n, y, x, c)| {
            ((n * 31 + y * 7 + x * 3 + c * 11) % 251) as u8
        });
        let a = random_views(pixels.view(), 3, 0.3, 9).unwrap();
        assert_eq!(a.dim(), (6, 32, 40, 3));
        assert_eq!(a, random_views(pixels.view(), 3, 0.3, 9).unwrap());
        assert_ne!(a, random_views(pixels.view(), 3, 0.3, 10).unwrap());
        // Any crop, resize or mirror of a constant image is the same constant image.
        let flat = Array3::from_elem((32, 40, 3), 77u8);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..8 {
            assert_eq!(random_view(flat.view(), 0.2, &mut rng).unwrap(), flat);
        }
        assert!(random_view(flat.view(), 0.0, &mut rng).is_err());
    }
}
