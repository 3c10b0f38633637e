//! BLAS threads.
//!
//! The GEMMs and LAPACK calls run in the BLAS backend's own threads; the crate's elementwise passes
//! run in its own (`FipsParams::threads`). OpenBLAS reads its thread count once, when the library
//! is loaded at process start, from the environment variable `OPENBLAS_NUM_THREADS` (MKL:
//! `MKL_NUM_THREADS`; both fall back to `OMP_NUM_THREADS`). Changing it later takes a C call
//! (`openblas_set_num_threads`) that this crate cannot make: it has no `unsafe` code, and no
//! maintained dependency offers a safe wrapper without pulling in a second linear-algebra stack.
//!
//! So the count is set where OpenBLAS reads it — in the environment of the process — and this
//! module reads it back and sets it for child processes:
//!
//! ```sh
//! OPENBLAS_NUM_THREADS=1 fips compress …   # or export it before starting your program
//! ```
//!
//! Results are bit-identical for a given seed, crate thread count and BLAS thread count.

use std::process::Command;

/// The environment variables the supported backends read their thread count from, in the order
/// they are consulted.
pub const THREAD_VARIABLES: [&str; 3] =
    ["OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"];

/// The BLAS thread count this process was started with, if the environment sets one (the first of
/// [`THREAD_VARIABLES`] that holds a positive integer); `None`: the backend's default (all cores).
pub fn configured_threads() -> Option<usize> {
    THREAD_VARIABLES.iter().find_map(|var| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
    })
}

/// Sets the BLAS thread count of a child process (every variable of [`THREAD_VARIABLES`]).
pub fn set_for_child(command: &mut Command, threads: usize) -> &mut Command {
    for var in THREAD_VARIABLES {
        command.env(var, threads.to_string());
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_sees_the_thread_count() {
        let mut cmd = Command::new("sh");
        set_for_child(&mut cmd, 3);
        let envs: Vec<_> = cmd.get_envs().collect();
        for var in THREAD_VARIABLES {
            assert!(
                envs.iter()
                    .any(|(k, v)| *k == var && v.and_then(|v| v.to_str()) == Some("3")),
                "{var}"
            );
        }
    }
}
