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

use crate::foundation::blas::configured_threads;
use crate::foundation::error::{FipsError, Result};

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

/// Workers the `blocks` of a group's factors-first step (`tokens × width × intermediate` GEMMs)
/// run on, each block's GEMMs on one thread: up to `threads` (at most one per block) when the BLAS
/// backend runs on one thread ([`configured_threads`]) and the GEMMs are below
/// [`BLOCK_PARALLEL_MACS`], else one (the blocks one after the other). Blocks are independent but
/// for the sum of their `∂U`, so a worker per core keeps every core on a whole GEMM; measured on
/// DeiT-tiny at 384 tokens, two one-thread workers did a step in 0.68 of the time two-thread GEMMs
/// took (`docs/results.md`, "Blocks in parallel"). Each extra worker holds its own `T × I` and
/// `T × r` buffers and `∂U`, and the step holds `V` whole: the size bound keeps that small.
pub fn block_workers(
    tokens: usize,
    width: usize,
    intermediate: usize,
    blocks: usize,
    threads: usize,
) -> usize {
    let per_call = tokens.saturating_mul(width).saturating_mul(intermediate);
    if configured_threads() == Some(1) && per_call < BLOCK_PARALLEL_MACS {
        threads.clamp(1, blocks.max(1))
    } else {
        1
    }
}

/// Training GEMMs of fewer multiply-adds per call than this (`2²⁷`) run faster whole, one per
/// core, with the blocks of a group in parallel ([`block_workers`]), than split across cores by
/// OpenBLAS: measured on DeiT-tiny (`T × 192 × 768`, 4 blocks, two cores) the step took 24 ms
/// against 36 ms at 384 tokens (57 M multiply-adds per call), while at 1024 tokens (151 M) the
/// two-thread GEMMs were faster (51 against 58 ms).
pub const BLOCK_PARALLEL_MACS: usize = 1 << 27;

/// OpenBLAS threads a program that trains groups of up to `blocks` blocks with mini-batches of
/// `tokens` tokens through `width × intermediate` MLPs should run with, `available` cores
/// allowed: one when the typical GEMM is too small to split ([`SERIAL_GEMM_MACS`]) or when there
/// are cores and blocks to spread and it is below [`BLOCK_PARALLEL_MACS`] (the blocks then run in
/// parallel instead, [`block_workers`]); else `available`.
pub fn planned_blas_threads(
    tokens: usize,
    width: usize,
    intermediate: usize,
    blocks: usize,
    available: usize,
) -> usize {
    let per_call = tokens.saturating_mul(width).saturating_mul(intermediate);
    if per_call < SERIAL_GEMM_MACS
        || (available > 1 && blocks > 1 && per_call < BLOCK_PARALLEL_MACS)
    {
        1
    } else {
        available.max(1)
    }
}

/// Workers for work made of independent whole GEMMs (image batches through a ViT, chunks of
/// calibration tokens through an MLP): one per core when the BLAS backend runs on one thread
/// ([`configured_threads`]), else one (OpenBLAS splits each GEMM itself).
pub fn pass_workers() -> usize {
    if configured_threads() == Some(1) {
        available_threads()
    } else {
        1
    }
}

/// `work` on every item, `workers` items at a time (the first of a round on the calling thread,
/// the others on scoped threads), each round's results handed to `each` in item order before the
/// next round starts: at most `workers` results exist at once. Items are moved into `work`, so
/// they may carry mutable borrows (each worker's own buffers).
pub fn map_in_rounds<I: Send, T: Send>(
    items: impl IntoIterator<Item = I>,
    workers: usize,
    work: impl Fn(I) -> Result<T> + Sync,
    mut each: impl FnMut(T) -> Result<()>,
) -> Result<()> {
    let work = &work;
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        let mut round = items.by_ref().take(workers.max(1));
        let first = round.next();
        let results: Vec<Result<T>> = std::thread::scope(|scope| {
            let others: Vec<_> = round.map(|item| scope.spawn(move || work(item))).collect();
            let mut results = Vec::with_capacity(others.len() + 1);
            results.extend(first.map(work));
            results.extend(others.into_iter().map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(FipsError::Numerical("a worker thread panicked".into()))
                })
            }));
            results
        });
        for r in results {
            each(r?)?;
        }
    }
    Ok(())
}

/// The cores this process may use (`std::thread::available_parallelism`, 1 if unknown), asked
/// once per process: the standard library reads the cgroup's CPU quota from `/sys` on every call
/// (7 `read` calls on a cgroup-v2 Linux, about a third of a one-token DeiT-tiny MLP pass when the
/// dense block asked for every activation).
pub fn available_threads() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
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

    #[test]
    fn rounds_keep_the_item_order_and_stop_at_the_first_error() {
        let items: Vec<usize> = (0..7).collect();
        for workers in [1, 2, 3, 8] {
            let mut seen = Vec::new();
            map_in_rounds(
                items.iter().copied(),
                workers,
                |i| Ok(i * i),
                |v| {
                    seen.push(v);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(seen, vec![0, 1, 4, 9, 16, 25, 36], "{workers} workers");
            let mut seen = Vec::new();
            let err = map_in_rounds(
                items.iter().copied(),
                workers,
                |i| {
                    if i == 4 {
                        Err(FipsError::Numerical("item 4".into()))
                    } else {
                        Ok(i)
                    }
                },
                |v| {
                    seen.push(v);
                    Ok(())
                },
            );
            assert!(matches!(err, Err(FipsError::Numerical(m)) if m == "item 4"));
            assert_eq!(seen, (0..4).collect::<Vec<_>>(), "{workers} workers");
        }
    }

    #[test]
    fn small_gemms_of_several_blocks_get_one_blas_thread_and_the_blocks_in_parallel() {
        // DeiT-tiny groups of 4 blocks: 384 tokens (57 M multiply-adds per call) one BLAS thread,
        // 1024 tokens (151 M) every core; DeiT-B always every core.
        assert_eq!(planned_blas_threads(384, 192, 768, 4, 2), 1);
        assert_eq!(planned_blas_threads(1024, 192, 768, 4, 2), 2);
        assert_eq!(planned_blas_threads(384, 768, 3072, 4, 8), 8);
        // Nothing to spread: one core, or one block per group.
        assert_eq!(planned_blas_threads(384, 192, 768, 4, 1), 1);
        assert_eq!(planned_blas_threads(384, 192, 768, 1, 4), 4);
        // Too small to split at all (stories260k: 1024 × 64 × 172): one, even for one block.
        assert_eq!(planned_blas_threads(1024, 64, 172, 1, 4), 1);
        // The line sits at BLOCK_PARALLEL_MACS.
        assert_eq!(
            planned_blas_threads(BLOCK_PARALLEL_MACS / 64, 8, 8, 2, 2),
            2
        );
        assert_eq!(
            planned_blas_threads(BLOCK_PARALLEL_MACS / 64 - 1, 8, 8, 2, 2),
            1
        );
    }
}
