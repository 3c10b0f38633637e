//! How many threads a training step is worth, chosen by problem size.
//!
//! A GEMM split across threads pays a fixed cost per call: waking the other threads and waiting
//! for the slowest. OpenBLAS's threads spin between calls, so on a machine shared with other work a
//! descheduled helper thread stalls every call for a scheduler tick. For the small matrices of a
//! 64-wide model (stories260k: `T × d × I = 1024 × 64 × 172`, 11 M multiply-adds, about 0.1 ms per
//! call on one core) that cost exceeds the arithmetic: measured under load, one thread ran the
//! step in half the wall time of two. From DeiT-tiny's size up (`2048 × 192 × 768`, 302 M
//! multiply-adds per call) the split pays. [`step_threads`] draws the line between the two at
//! [`SERIAL_GEMM_MACS`] multiply-adds per call.
//!
//! The elementwise passes of the step already run on one thread below a work threshold (see the
//! `kernels` module). OpenBLAS reads its thread count once, from `OPENBLAS_NUM_THREADS`, when the
//! process starts, and this crate has no unsafe code to change it later: a program applies the plan
//! with [`run_with_blas_threads`], which re-runs it with the variable set.

/// GEMMs of fewer multiply-adds per call than this (`2²⁵`, about 0.3 ms on one core) run on one
/// thread.
pub const SERIAL_GEMM_MACS: usize = 1 << 25;

/// Threads worth using for a training step of `tokens` tokens through a `width × intermediate`
/// MLP when `available` are allowed: one when its typical GEMM (`T × d × I` multiply-adds, the
/// size of every dense-weight product of the step) is below [`SERIAL_GEMM_MACS`], else
/// `available`.
pub fn step_threads(tokens: usize, width: usize, intermediate: usize, available: usize) -> usize {
    let per_call = tokens.saturating_mul(width).saturating_mul(intermediate);
    if per_call < SERIAL_GEMM_MACS {
        1
    } else {
        available.max(1)
    }
}

/// The cores this process may use (`std::thread::available_parallelism`, 1 if unknown).
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Makes OpenBLAS use `threads` threads: if `OPENBLAS_NUM_THREADS` already equals `threads`,
/// returns `Ok(None)` and the caller carries on; otherwise runs the current executable again with
/// the same arguments and the variable set, waits, and returns its exit code (the caller should
/// exit with it).
pub fn run_with_blas_threads(threads: usize) -> std::io::Result<Option<i32>> {
    let wanted = threads.max(1).to_string();
    if std::env::var("OPENBLAS_NUM_THREADS").ok().as_deref() == Some(wanted.as_str()) {
        return Ok(None);
    }
    let exe = std::env::current_exe()?;
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("OPENBLAS_NUM_THREADS", &wanted)
        .status()?;
    Ok(Some(status.code().unwrap_or(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(tokens: usize, width: usize, intermediate: usize, _rank: usize) -> [usize; 3] {
        [tokens, width, intermediate]
    }

    fn threads([t, d, i]: [usize; 3], available: usize) -> usize {
        step_threads(t, d, i, available)
    }

    #[test]
    fn small_models_get_one_thread_and_larger_ones_all() {
        // stories260k (d 64, I 172) at 1024 tokens: one thread whatever is allowed.
        assert_eq!(threads(shape(1024, 64, 172, 116), 2), 1);
        assert_eq!(threads(shape(1024, 64, 172, 116), 16), 1);
        // DeiT-tiny and DeiT-B groups: everything allowed.
        assert_eq!(threads(shape(2048, 192, 768, 341), 2), 2);
        assert_eq!(threads(shape(1024, 768, 3072, 1365), 8), 8);
        // Never zero.
        assert_eq!(threads(shape(2048, 192, 768, 341), 0), 1);
        // The line sits at SERIAL_GEMM_MACS multiply-adds per call.
        let at = shape(SERIAL_GEMM_MACS / (64 * 64), 64, 64, 64);
        assert_eq!(threads(at, 2), 2);
        let below = shape(SERIAL_GEMM_MACS / (64 * 64) - 1, 64, 64, 64);
        assert_eq!(threads(below, 2), 1);
    }
}
