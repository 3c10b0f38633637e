//! Fuzzes the safetensors checkpoint reader: header, every tensor, the MLP layout, the ViT.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = targets::with_file("checkpoint", data);
    let _ = targets::checkpoint(&path);
});
