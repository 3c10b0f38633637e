//! Fuzzes the MLP-input file reader as `fips compress --activations` uses it for DeiT-tiny
//! (12 blocks of (d, I) = (192, 768)), group 0-1.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = targets::with_file("mlp_inputs", data);
    let _ = targets::mlp_inputs(&path, &[(192, 768); 12], &[vec![0, 1]]);
});
