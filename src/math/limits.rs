//! Bounds on every number that sizes an allocation and comes from a file or an argument.
//!
//! Each number is checked against the bytes of the file it came from, the model it applies to, or
//! one of the documented limits below *before* anything is allocated from it; a violation is a
//! typed error ([`FipsError::Format`] for files, [`FipsError::InvalidParameter`] for arguments,
//! [`FipsError::Image`] for images), never a panic or an abort. `docs/limits.md` lists them all,
//! with the memory each one bounds.

use std::cell::Cell;
use std::path::Path;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::foundation::error::{FipsError, Result, invalid};
use crate::math::budget::{GroupShape, rank_for_budget};

/// Most tensors a safetensors header may describe. Headers are parsed into about 1 KB of memory
/// per tensor, so this bounds a header's parsed form to about 130 MB whatever its size; the
/// largest real single-file checkpoints hold a few thousand tensors (a 405B Llama: ~1,100 per
/// shard; a 256-expert MoE layer stack: tens of thousands across shards).
pub const MAX_TENSORS: usize = 131_072;

/// Largest image file read (bytes).
pub const MAX_IMAGE_FILE_BYTES: u64 = 64 << 20;

/// Largest image side (pixels), read from the JPEG frame header before decoding.
pub const MAX_IMAGE_SIDE: u32 = 16_384;

/// Most pixels of one image (width × height), read from the header before decoding: decoded
/// RGB takes 3 bytes a pixel, so at most ~100 MB per image (plus the decoder's own buffers).
pub const MAX_IMAGE_PIXELS: u64 = 1 << 25;

/// Largest ratio of the longer side to the shorter one. The evaluation transform scales the
/// shorter side to 248 pixels, so the resized image has `248² × ratio` pixels: a 1 × 30000 image
/// would need 7.4 million × 248 pixels; at ratio 16 the resize stays under 3 MB.
pub const MAX_ASPECT_RATIO: u32 = 16;

/// Most tokens (class token + patches) per image for the ViT. Attention holds
/// `images × heads × tokens²` scores per batch (25 images): at 1025 tokens (a 32 × 32 grid, e.g.
/// patch 14 at 448 px or patch 7 at 224 px) and 12 heads that is 1.3 GB; patch size 1 at 224 px
/// (50,177 tokens) would be 750 GB.
pub const MAX_VIT_TOKENS: usize = 1025;

/// Most entries of a dense `r × I` factor rebuilt per nonzero stored in a file (the legacy
/// format-2 reader builds dense masked factors): 128 allows sparsities up to 99.2 % and keeps the
/// allocation within ~55× the stored bytes, whatever `intermediate` a manifest claims.
pub const MAX_DENSE_PER_NONZERO: usize = 128;

/// Most elements of generated (data-free) calibration inputs, `blocks × tokens × width`: 4 GiB of
/// `f32`.
pub const MAX_GENERATED_ELEMENTS: usize = 1 << 30;

/// Counts the entries of a safetensors header (tensors plus the entries of `__metadata__`)
/// without building them, and refuses more than [`MAX_TENSORS`], so a header of a million
/// empty tensors (or metadata strings) is rejected before any of them is allocated. Syntax errors
/// are left to the real parse.
pub(crate) fn check_header_entries(header: &[u8], path: &Path) -> Result<()> {
    const TOO_MANY: &str = "fips: too many header entries";
    let count = Cell::new(0usize);
    let mut de = serde_json::Deserializer::from_slice(header);
    match (EntryCounter {
        count: &count,
        top: true,
    })
    .deserialize(&mut de)
    {
        Err(e) if e.to_string().starts_with(TOO_MANY) => Err(FipsError::Format {
            path: path.to_path_buf(),
            reason: format!(
                "the header describes more than {MAX_TENSORS} tensors and metadata entries (limit MAX_TENSORS)"
            ),
        }),
        _ => Ok(()),
    }
}

/// Whether a map key is `__metadata__` (no allocation: the key is only compared).
struct IsMetadata(bool);

impl<'de> Deserialize<'de> for IsMetadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = IsMetadata;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<IsMetadata, E> {
                Ok(IsMetadata(v == "__metadata__"))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Counts the entries of a JSON object (and of its `__metadata__` object at the top level) into
/// `count`, failing once there are more than [`MAX_TENSORS`].
struct EntryCounter<'a> {
    count: &'a Cell<usize>,
    top: bool,
}

impl<'de> DeserializeSeed<'de> for EntryCounter<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        if self.top {
            d.deserialize_map(self)
        } else {
            d.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for EntryCounter<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        while let Some(IsMetadata(meta)) = map.next_key()? {
            if meta && self.top {
                // Its entries count, the key itself does not.
                map.next_value_seed(EntryCounter {
                    count: self.count,
                    top: false,
                })?;
                continue;
            }
            map.next_value::<IgnoredAny>()?;
            self.count.set(self.count.get() + 1);
            if self.count.get() > MAX_TENSORS {
                return Err(serde::de::Error::custom("fips: too many header entries"));
            }
        }
        Ok(())
    }
    // A `__metadata__` value that is not an object is left to the real parse.
    fn visit_str<E>(self, _: &str) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> std::result::Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// Checks that no tensor's shape, with its zero extents dropped, describes more elements than the
/// file has data bytes (at least 1): every dimension read from a header is then bounded by the
/// file's size, even for empty tensors whose other extents the format does not constrain.
pub(crate) fn check_extents<'a>(
    shapes: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    data_bytes: u64,
    path: &Path,
) -> Result<()> {
    let bound = data_bytes.max(1);
    for (name, shape) in shapes {
        let extent = shape
            .iter()
            .filter(|&&s| s > 0)
            .try_fold(1u64, |acc, &s| acc.checked_mul(s as u64));
        if extent.is_none_or(|e| e > bound) {
            return Err(FipsError::Format {
                path: path.to_path_buf(),
                reason: format!(
                    "tensor {name:?} has shape {shape:?}, larger than the file's {data_bytes} data bytes allow"
                ),
            });
        }
    }
    Ok(())
}

/// Checks an image's declared size before it is decoded: sides in `1..=MAX_IMAGE_SIDE`, at most
/// [`MAX_IMAGE_PIXELS`] pixels, and an aspect ratio of at most [`MAX_ASPECT_RATIO`].
pub fn check_image_size(width: u32, height: u32) -> std::result::Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("the image is empty ({width} × {height})"));
    }
    if width.max(height) > MAX_IMAGE_SIDE {
        return Err(format!(
            "{width} × {height} pixels: a side is larger than {MAX_IMAGE_SIDE} (MAX_IMAGE_SIDE)"
        ));
    }
    if u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS {
        return Err(format!(
            "{width} × {height} pixels: more than {MAX_IMAGE_PIXELS} (MAX_IMAGE_PIXELS)"
        ));
    }
    let (long, short) = (width.max(height), width.min(height));
    if long > short.saturating_mul(MAX_ASPECT_RATIO) {
        return Err(format!(
            "{width} × {height} pixels: aspect ratio above {MAX_ASPECT_RATIO}:1 (MAX_ASPECT_RATIO)"
        ));
    }
    Ok(())
}

/// Checks the token count of a ViT read from a checkpoint against [`MAX_VIT_TOKENS`].
pub fn check_vit_tokens(tokens: usize, patch: usize) -> Result<()> {
    if tokens > MAX_VIT_TOKENS {
        return Err(invalid(
            "pos_embed",
            format!(
                "{tokens} tokens per image (patch size {patch}): more than {MAX_VIT_TOKENS} \
                 (MAX_VIT_TOKENS); attention would need tokens² scores per head and image"
            ),
        ));
    }
    Ok(())
}

/// Checks an explicit rank of a factorisation `[m, n] ≈ [m, r] · [r, n]` (or a residual of that
/// rank): `r ≤ max(m, n)`. A rank above both sides cannot belong to any matrix of the model and is
/// a mistake (`--rank 100000` ran on at 6.7 GB, or wrote a file 109 times the dense size); ranks
/// between `min(m, n)` and `max(m, n)` are accepted as "full rank", which one rank for matrices of
/// several shapes (`[I, d]` and `[d, I]`, or stacked ones) needs. See [`low_rank`] for the rank
/// actually used.
pub fn check_low_rank(name: &'static str, rank: usize, m: usize, n: usize) -> Result<()> {
    let max = m.max(n);
    if rank > max {
        return Err(invalid(
            name,
            format!(
                "rank {rank} is larger than both sides of a {m} × {n} matrix (at most {}: full rank)",
                m.min(n)
            ),
        ));
    }
    Ok(())
}

/// The rank used for an `[m, n]` matrix given an explicit rank: checked by [`check_low_rank`],
/// then `min(rank, m, n)` — full rank is `min(m, n)`, and factors are never padded beyond it.
pub fn low_rank(name: &'static str, rank: usize, m: usize, n: usize) -> Result<usize> {
    check_low_rank(name, rank, m, n)?;
    Ok(rank.min(m).min(n))
}

/// Checks an explicit FiPS rank against the largest rank the budget formula
/// `r = ⌊ p f n d I / ((1 − s) f n I + d) ⌋` can give for any valid `p ≤ 1` and `s < 1`: its
/// supremum (p = 1, s → 1) is `f n I`, the number of columns of the stacked factors `V`, beyond
/// which extra basis columns cannot be used. (At the run's own sparsity the rank that keeps as
/// many parameters as the dense group is smaller — 682 for DeiT-tiny groups of 4 at `s = 0.75` —
/// but ranks up to `d` and beyond at `s = 0` are legitimate exact factorisations, so only the
/// formula's supremum is enforced; the error names both.) Memory then stays below `(f n I)²`
/// factor entries.
pub fn check_shared_rank(rank: usize, shape: GroupShape, sparsity: f64) -> Result<()> {
    let max = shape.matrices().saturating_mul(shape.intermediate);
    if rank > max {
        let dense_size_rank = rank_for_budget(shape, 1.0, sparsity).unwrap_or(0);
        return Err(invalid(
            "rank",
            format!(
                "rank {rank} is above f n I = {max}, the largest rank the budget formula gives \
                 (d = {}, I = {}, {} matrices); at sparsity {sparsity}, rank {dense_size_rank} already \
                 keeps as many parameters as the dense group",
                shape.width,
                shape.intermediate,
                shape.matrices()
            ),
        ));
    }
    Ok(())
}

/// Checks the size of generated calibration inputs against [`MAX_GENERATED_ELEMENTS`].
pub(crate) fn check_generated(blocks: usize, tokens: usize, width: usize) -> Result<()> {
    let elements = blocks
        .checked_mul(tokens)
        .and_then(|x| x.checked_mul(width));
    if elements.is_none_or(|e| e > MAX_GENERATED_ELEMENTS) {
        return Err(invalid(
            "tokens",
            format!(
                "{blocks} blocks × {tokens} tokens × width {width} is more than {MAX_GENERATED_ELEMENTS} \
                 generated values (MAX_GENERATED_ELEMENTS)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_entry_count_is_bounded_without_parsing_entries() {
        let path = Path::new("h");
        let small = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{}}"#;
        check_header_entries(small, path).unwrap();
        let mut big = String::from("{");
        for i in 0..=MAX_TENSORS {
            big.push_str(&format!("\"{i}\":0,"));
        }
        big.pop();
        big.push('}');
        assert!(matches!(
            check_header_entries(big.as_bytes(), path),
            Err(FipsError::Format { .. })
        ));
        // Malformed JSON is left to the real parser.
        check_header_entries(b"{\"a\":", path).unwrap();
    }

    #[test]
    fn extents_are_bounded_by_data_bytes() {
        let p = Path::new("x");
        check_extents([("a", &[2usize, 3][..])], 24, p).unwrap();
        check_extents([("a", &[0usize, 24][..])], 24, p).unwrap();
        assert!(check_extents([("a", &[0usize, 25][..])], 24, p).is_err());
        assert!(check_extents([("a", &[0usize, usize::MAX, usize::MAX][..])], 24, p).is_err());
        check_extents([("a", &[0usize][..])], 0, p).unwrap();
        assert!(check_extents([("a", &[0usize, 2][..])], 0, p).is_err());
    }

    #[test]
    fn image_sizes() {
        check_image_size(224, 224).unwrap();
        check_image_size(4000, 3000).unwrap();
        check_image_size(16, 1).unwrap();
        for (w, h) in [(0, 5), (1, 30000), (17, 1), (20000, 20000), (16384, 4096)] {
            assert!(check_image_size(w, h).is_err(), "{w} × {h}");
        }
    }

    #[test]
    fn ranks() {
        assert_eq!(low_rank("rank", 100, 192, 768).unwrap(), 100);
        assert_eq!(low_rank("rank", 768, 192, 768).unwrap(), 192);
        assert!(low_rank("rank", 769, 192, 768).is_err());
        assert!(check_low_rank("rank", 100_000, 768, 192).is_err());
        let shape = GroupShape {
            width: 192,
            intermediate: 768,
            blocks: 4,
            matrices_per_block: 2,
        };
        let max = 8 * 768;
        check_shared_rank(max, shape, 0.75).unwrap();
        check_shared_rank(3 * 192, shape, 0.0).unwrap();
        assert!(check_shared_rank(max + 1, shape, 0.75).is_err());
        assert!(check_shared_rank(100_000, shape, 0.75).is_err());
    }

    #[test]
    fn generated_sizes() {
        check_generated(4, 16384, 192).unwrap();
        assert!(check_generated(4, usize::MAX, 192).is_err());
        assert!(check_generated(4, 1 << 28, 192).is_err());
    }
}
