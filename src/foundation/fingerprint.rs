//! Content fingerprints: XXH64 (seed 0) of bytes and files, for recognising the inputs, settings
//! and parts of a run without trusting names or timestamps.
//!
//! XXH64 is not a cryptographic hash: it detects accidental change (another checkpoint, edited
//! settings, a truncated part), not a forger. Per 32-byte stripe, four lanes
//! `v ← rotl(v + w·P₂, 31)·P₁`; then the tail and the usual avalanche (Collet's specification).

use std::io::Read;
use std::path::Path;

use crate::foundation::error::{FipsError, Result};

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, lane: u64) -> u64 {
    (acc ^ round(0, lane)).wrapping_mul(P1).wrapping_add(P4)
}

fn word(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(w)
}

/// A streaming XXH64 hasher (seed 0).
#[derive(Debug, Clone)]
pub struct Fingerprint {
    lanes: [u64; 4],
    buffer: [u8; 32],
    buffered: usize,
    total: u64,
}

impl Default for Fingerprint {
    fn default() -> Self {
        Self::new()
    }
}

impl Fingerprint {
    /// An empty hasher.
    pub fn new() -> Self {
        Self {
            lanes: [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)],
            buffer: [0; 32],
            buffered: 0,
            total: 0,
        }
    }

    fn stripe(&mut self, stripe: &[u8]) {
        for (k, lane) in self.lanes.iter_mut().enumerate() {
            *lane = round(*lane, word(stripe, 8 * k));
        }
    }

    /// Adds `bytes`.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total = self.total.wrapping_add(bytes.len() as u64);
        if self.buffered > 0 {
            let take = (32 - self.buffered).min(bytes.len());
            self.buffer[self.buffered..self.buffered + take].copy_from_slice(&bytes[..take]);
            self.buffered += take;
            bytes = &bytes[take..];
            if self.buffered < 32 {
                return;
            }
            let stripe = self.buffer;
            self.stripe(&stripe);
            self.buffered = 0;
        }
        let mut chunks = bytes.chunks_exact(32);
        for stripe in &mut chunks {
            self.stripe(stripe);
        }
        let rest = chunks.remainder();
        self.buffer[..rest.len()].copy_from_slice(rest);
        self.buffered = rest.len();
    }

    /// The hash of everything added.
    pub fn finish(&self) -> u64 {
        let [v1, v2, v3, v4] = self.lanes;
        let mut h = if self.total >= 32 {
            let h = v1
                .rotate_left(1)
                .wrapping_add(v2.rotate_left(7))
                .wrapping_add(v3.rotate_left(12))
                .wrapping_add(v4.rotate_left(18));
            [v1, v2, v3, v4].into_iter().fold(h, merge)
        } else {
            P5
        };
        h = h.wrapping_add(self.total);
        let tail = &self.buffer[..self.buffered];
        let mut at = 0;
        while at + 8 <= tail.len() {
            h = (h ^ round(0, word(tail, at)))
                .rotate_left(27)
                .wrapping_mul(P1)
                .wrapping_add(P4);
            at += 8;
        }
        if at + 4 <= tail.len() {
            let mut w = [0u8; 4];
            w.copy_from_slice(&tail[at..at + 4]);
            h = (h ^ u64::from(u32::from_le_bytes(w)).wrapping_mul(P1))
                .rotate_left(23)
                .wrapping_mul(P2)
                .wrapping_add(P3);
            at += 4;
        }
        for &b in &tail[at..] {
            h = (h ^ u64::from(b).wrapping_mul(P5))
                .rotate_left(11)
                .wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^ (h >> 32)
    }

    /// The hash as 16 lowercase hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.finish())
    }
}

/// The fingerprint of `bytes` as 16 hex digits.
pub fn of_bytes(bytes: &[u8]) -> String {
    let mut f = Fingerprint::new();
    f.update(bytes);
    f.hex()
}

/// The fingerprint of a file's content and its length in bytes, read in 1 MiB chunks.
pub fn of_file(path: impl AsRef<Path>) -> Result<(String, u64)> {
    let path = path.as_ref();
    let io = |source| FipsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut f = Fingerprint::new();
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        f.update(&buffer[..n]);
        total = total.wrapping_add(n as u64);
    }
    Ok((f.hex(), total))
}

/// The fingerprint of a directory tree and the total length of its files: XXH64 over every
/// regular file's relative path (`/`-separated, sorted), length and content fingerprint. Links
/// and other entries are refused ([`FipsError::Format`]).
pub fn of_dir(dir: impl AsRef<Path>) -> Result<(String, u64)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, std::path::PathBuf)>) -> Result<()> {
        let io = |source| FipsError::Io {
            path: dir.to_path_buf(),
            source,
        };
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let meta = std::fs::symlink_metadata(&path).map_err(|source| FipsError::Io {
                path: path.clone(),
                source,
            })?;
            if meta.is_dir() {
                walk(root, &path, out)?;
            } else if meta.is_file() {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let name: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push((name.join("/"), path));
            } else {
                return Err(FipsError::Format {
                    path,
                    reason: "neither a regular file nor a directory".into(),
                });
            }
        }
        Ok(())
    }
    let dir = dir.as_ref();
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    files.sort();
    let mut f = Fingerprint::new();
    let mut total = 0u64;
    for (name, path) in &files {
        let (hex, bytes) = of_file(path)?;
        f.update(format!("{name}\0{bytes}\0{hex}\n").as_bytes());
        total = total.wrapping_add(bytes);
    }
    Ok((f.hex(), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_vectors_and_streams() {
        // Reference values of XXH64 with seed 0.
        assert_eq!(of_bytes(b""), "ef46db3751d8e999");
        assert_eq!(of_bytes(b"a"), "d24ec4f1a98c6e5b");
        assert_eq!(of_bytes(b"abc"), "44bc2cf5ad770999");
        let data: Vec<u8> = (0..1000u32)
            .map(|i| (i.wrapping_mul(31) % 251) as u8)
            .collect();
        let whole = of_bytes(&data);
        for split in [1, 7, 31, 32, 33, 500, 999] {
            let mut f = Fingerprint::new();
            f.update(&data[..split]);
            f.update(&data[split..]);
            assert_eq!(f.hex(), whole, "split at {split}");
        }
        let mut changed = data.clone();
        changed[500] ^= 1;
        assert_ne!(of_bytes(&changed), whole);
    }
}
