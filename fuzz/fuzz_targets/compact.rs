//! Fuzzes the compact compressed-file reader (format 3): manifest and size breakdown (what
//! `inspect` reads), the groups read with the DeiT-tiny original beside them
//! (`FIPS_FUZZ_ORIGINAL`, default `../../shared/data/deit-tiny/model.safetensors` from this
//! directory) or alone when self-contained, every dense tensor rebuilt (`densify`, `eval`), one
//! token through every compressed block, and a self-contained ViT loaded from the file alone.
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
    let path = targets::with_file("compact", data);
    let _ = targets::compact(&path, original());
});
