//! Fuzzes the image reader: the JPEG structure check on the bytes, then the checked decode and
//! the 224 × 224 crop.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fips::app::jpeg::inspect_jpeg(data);
    let path = targets::with_file("image", data);
    let _ = targets::image(&path);
});
