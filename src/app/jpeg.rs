//! A JPEG file's structure, checked before decoding: frame size and completeness.
//!
//! The decoder the `image` crate uses for JPEG (zune-jpeg, in its lenient mode) accepts a file cut
//! short and fills the missing part of the picture with grey, and allocates for whatever size the
//! frame header claims. [`inspect_jpeg`] walks the file's marker segments first, without
//! allocating: it reads the frame header (`SOFn`: sides and components), steps over every entropy
//! coded scan (byte stuffing `FF 00` and restart markers `FF D0`–`FF D7` stay inside a scan), and
//! requires the end-of-image marker `FF D9` after at least one scan. A file cut anywhere before
//! that marker, a segment whose length runs past the end, or a second frame is an error; bytes
//! after the end-of-image marker are ignored, as decoders do. The declared size is then checked
//! against the limits of [`crate::math::limits::check_image_size`] before the decoder runs.

/// What the frame header of a JPEG file declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegFrame {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Colour components (1 grey, 3 YCbCr, 4 CMYK).
    pub components: u8,
    /// The `SOFn` marker's `n` (0 baseline, 1 extended, 2 progressive, …).
    pub process: u8,
}

fn be16(bytes: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes([
        *bytes.get(at)?,
        *bytes.get(at + 1)?,
    ])))
}

/// Checks the structure of a complete JPEG file held in `bytes` and returns its frame header, or
/// says what is wrong (not a JPEG, truncated, malformed segment, no frame, no scan).
pub fn inspect_jpeg(bytes: &[u8]) -> Result<JpegFrame, String> {
    if bytes.get(..2) != Some(&[0xFF, 0xD8]) {
        return Err(
            "not a JPEG file (no start-of-image marker); only JPEG images are supported".into(),
        );
    }
    let truncated = |at: usize, what: &str| {
        format!(
            "truncated or corrupt JPEG: {what} at byte {at} of {} (no end-of-image marker)",
            bytes.len()
        )
    };
    let mut pos = 2;
    let mut frame: Option<JpegFrame> = None;
    let mut scans = 0usize;
    loop {
        // A marker: 0xFF, optional fill bytes 0xFF, then the code.
        match bytes.get(pos) {
            None => return Err(truncated(pos, "the file ends")),
            Some(0xFF) => {}
            Some(b) => {
                return Err(format!(
                    "corrupt JPEG: expected a marker at byte {pos}, found 0x{b:02X}"
                ));
            }
        }
        while bytes.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        let Some(&marker) = bytes.get(pos) else {
            return Err(truncated(pos, "the file ends inside a marker"));
        };
        pos += 1;
        match marker {
            0xD9 => {
                let frame =
                    frame.ok_or("corrupt JPEG: no frame header before the end of the image")?;
                if scans == 0 {
                    return Err("corrupt JPEG: the image has no scan (no pixel data)".into());
                }
                return Ok(frame);
            }
            0x00 | 0xD8 => {
                return Err(format!(
                    "corrupt JPEG: unexpected marker 0xFF{marker:02X} at byte {}",
                    pos - 2
                ));
            }
            // Standalone markers: TEM and restarts.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let length = be16(bytes, pos).ok_or_else(|| truncated(pos, "a segment length is cut"))?;
        if length < 2 {
            return Err(format!(
                "corrupt JPEG: segment length {length} at byte {pos}"
            ));
        }
        let end = pos + length;
        if end > bytes.len() {
            return Err(truncated(pos, "a segment runs past the end"));
        }
        let segment = &bytes[pos + 2..end];
        // SOF0–SOF15 except DHT (C4), JPG (C8) and DAC (CC).
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            if frame.is_some() {
                return Err("unsupported JPEG: more than one frame (hierarchical JPEG)".into());
            }
            let (Some(&precision), Some(height), Some(width), Some(&components)) = (
                segment.first(),
                be16(segment, 1),
                be16(segment, 3),
                segment.get(5),
            ) else {
                return Err("corrupt JPEG: short frame header".into());
            };
            if segment.len() < 6 + 3 * usize::from(components) || components == 0 {
                return Err(format!(
                    "corrupt JPEG: frame header for {components} components is {} bytes",
                    segment.len()
                ));
            }
            if precision != 8 && precision != 12 && precision != 16 {
                return Err(format!("corrupt JPEG: sample precision {precision}"));
            }
            frame = Some(JpegFrame {
                width: width as u32,
                height: height as u32,
                components,
                process: marker - 0xC0,
            });
        }
        pos = end;
        if marker == 0xDA {
            if frame.is_none() {
                return Err("corrupt JPEG: a scan comes before the frame header".into());
            }
            scans += 1;
            // Entropy-coded data runs to the next marker that is not a stuffed 0xFF or a restart.
            loop {
                let Some(offset) = bytes
                    .get(pos..)
                    .and_then(|rest| rest.iter().position(|&b| b == 0xFF))
                else {
                    return Err(truncated(bytes.len(), "the file ends inside a scan"));
                };
                pos += offset;
                match bytes.get(pos + 1) {
                    None => return Err(truncated(pos, "the file ends inside a scan")),
                    Some(0x00 | 0xD0..=0xD7) => pos += 2,
                    Some(0xFF) => pos += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal structurally valid JPEG: SOI, SOF0 (2 × 3, 1 component), SOS, data, EOI.
    fn minimal() -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8];
        v.extend([0xFF, 0xC0, 0, 11, 8, 0, 3, 0, 2, 1, 1, 0x11, 0]);
        v.extend([0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 63, 0]);
        v.extend([0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56]);
        v.extend([0xFF, 0xD9]);
        v
    }

    #[test]
    fn a_complete_file_gives_its_frame() {
        let f = inspect_jpeg(&minimal()).unwrap();
        assert_eq!((f.width, f.height, f.components, f.process), (2, 3, 1, 0));
        let mut trailing = minimal();
        trailing.extend([0, 0, 0]);
        assert!(inspect_jpeg(&trailing).is_ok());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let v = minimal();
        for cut in 0..v.len() {
            assert!(inspect_jpeg(&v[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn structural_errors() {
        let mut no_scan = minimal();
        no_scan.drain(15..32);
        assert!(inspect_jpeg(&no_scan).is_err());
        let mut bad_len = minimal();
        bad_len[5] = 1;
        assert!(inspect_jpeg(&bad_len).is_err());
        assert!(inspect_jpeg(b"\x89PNG\r\n").is_err());
    }
}
