//! Fuzzes the compressed-checkpoint reader: the manifest alone (what `inspect` reads), then, with
//! the DeiT-tiny original (`FIPS_FUZZ_ORIGINAL`, default `../../shared/data/deit-tiny/
//! model.safetensors` from this directory), the manifest checked against it, the factors read and
//! every dense tensor rebuilt (what `densify` and `eval` do).
#![no_main]

#[path = "../targets.rs"]
mod targets;

use std::sync::OnceLock;

use fips::format::checkpoint::Checkpoint;

fn original() -> Option<&'static Checkpoint> {
    static ORIGINAL: OnceLock<Option<Checkpoint>> = OnceLock::new();
    ORIGINAL
        .get_or_init(|| {
            let path = std::env::var_os("FIPS_FUZZ_ORIGINAL").map_or_else(
                || {
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../../shared/data/deit-tiny/model.safetensors")
                },
                std::path::PathBuf::from,
            );
            Checkpoint::open(path).ok()
        })
        .as_ref()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = targets::with_file("compressed", data);
    let _ = targets::compressed_manifest(&path);
    if let Some(original) = original() {
        let _ = targets::compressed(&path, original);
    }
});
