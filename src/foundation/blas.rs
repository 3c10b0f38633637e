//! BLAS threads, and OpenBLAS's kernels on a processor it does not know.
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
//!
//! A `DYNAMIC_ARCH` OpenBLAS (Debian's and Ubuntu's) picks its kernels by processor model when it
//! loads; a processor newer than the library gets its generic `Prescott` (SSE3) kernels, several
//! times slower (Debian 12's 0.3.21 on an Intel Xeon of model 207: sgemm 18 against 105–139 GFLOP/s,
//! the training step 4.7–6.2× slower). `OPENBLAS_CORETYPE` overrides the choice, again only at
//! load; [`run_with_native_kernels`] asks a probe of the current program which kernels OpenBLAS
//! picks and, when they are generic, runs the program again with the kernels the processor's
//! instructions allow ([`native_kernels`]).

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

/// OpenBLAS's kernel sets without AVX2 (names as its `OPENBLAS_VERBOSE=2` line prints them).
const GENERIC_KERNELS: [&str; 10] = [
    "Prescott",
    "Core2",
    "Penryn",
    "Dunnington",
    "Nehalem",
    "Atom",
    "Katmai",
    "Coppermine",
    "Northwood",
    "Banias",
];

/// Set on the probe of [`run_with_native_kernels`], which then ends at once.
const PROBE_VARIABLE: &str = "FIPS_BLAS_PROBE";

/// The kernel set OpenBLAS reported choosing: the name on its `Core: NAME` line (printed to
/// standard error when it loads with `OPENBLAS_VERBOSE=2`).
pub fn reported_kernels(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .find_map(|line| line.trim().strip_prefix("Core:"))
        .map(str::trim)
        .filter(|name| !name.is_empty())
}

/// The kernel set to ask OpenBLAS for (`OPENBLAS_CORETYPE`) when it chose `chosen`: `None` unless
/// `chosen` is one of its generic sets and the processor has more — `SkylakeX` with AVX-512
/// (F, BW, DQ, VL), `Haswell` with AVX2 and FMA.
pub fn native_kernels(chosen: &str, avx512: bool, avx2_fma: bool) -> Option<&'static str> {
    if !GENERIC_KERNELS
        .iter()
        .any(|g| g.eq_ignore_ascii_case(chosen))
    {
        return None;
    }
    if avx512 {
        Some("SkylakeX")
    } else if avx2_fma {
        Some("Haswell")
    } else {
        None
    }
}

/// Whether this processor has AVX-512 (F, BW, DQ, VL) and AVX2 with FMA.
fn vector_support() -> (bool, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl");
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        (avx512, avx2)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        (false, false)
    }
}

/// For a program linked against OpenBLAS, called first thing in `main`: unless
/// `OPENBLAS_CORETYPE` is set, runs the current executable as a probe (with
/// `OPENBLAS_VERBOSE=2`; in the probe this call ends the process at once) to learn the kernels
/// OpenBLAS picks; when they are generic and the processor allows better ([`native_kernels`]),
/// says so on standard error and runs the program again with the same arguments and
/// `OPENBLAS_CORETYPE` set — on Unix in place of this process (so this returns only on failure),
/// elsewhere as a child whose exit code it returns (`Ok(Some(code))`; the caller exits with it).
/// `Ok(None)`: carry on (the kernels are fine, or the backend is not OpenBLAS).
pub fn run_with_native_kernels() -> std::io::Result<Option<i32>> {
    if std::env::var_os(PROBE_VARIABLE).is_some() {
        // The probe: OpenBLAS has printed its choice while loading; nothing else to do.
        std::process::exit(0);
    }
    if std::env::var_os("OPENBLAS_CORETYPE").is_some() {
        return Ok(None);
    }
    // Nothing better to ask for without AVX2: no probe.
    let (avx512, avx2_fma) = vector_support();
    if !avx512 && !avx2_fma {
        return Ok(None);
    }
    let exe = std::env::current_exe()?;
    let probe = Command::new(&exe)
        .env(PROBE_VARIABLE, "1")
        .env("OPENBLAS_VERBOSE", "2")
        .stdin(std::process::Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&probe.stderr);
    let Some(chosen) = reported_kernels(&stderr) else {
        return Ok(None);
    };
    let Some(kernels) = native_kernels(chosen, avx512, avx2_fma) else {
        return Ok(None);
    };
    eprintln!(
        "note: OpenBLAS does not know this processor and would run its generic '{chosen}' \
         kernels; running with OPENBLAS_CORETYPE={kernels} (set OPENBLAS_CORETYPE to choose)"
    );
    let mut again = Command::new(exe);
    again
        .args(std::env::args_os().skip(1))
        .env("OPENBLAS_CORETYPE", kernels);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        Err(again.exec())
    }
    #[cfg(not(unix))]
    {
        Ok(Some(again.status()?.code().unwrap_or(1)))
    }
}

/// [`run_with_native_kernels`] as a program's `main` uses it: exits with the run's code where it
/// ran the program again as a child, says on standard error why it could not choose, and
/// otherwise returns (the program carries on, with the kernels chosen where they were generic).
pub fn use_native_kernels() {
    match run_with_native_kernels() {
        Ok(Some(code)) => std::process::exit(code),
        Ok(None) => {}
        Err(e) => eprintln!("note: could not choose OpenBLAS's kernels for this processor: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_line_is_read_from_openblas_output() {
        let out = "some warning\nCore: Prescott\n";
        assert_eq!(reported_kernels(out), Some("Prescott"));
        assert_eq!(reported_kernels("  Core:  SkylakeX \n"), Some("SkylakeX"));
        assert_eq!(reported_kernels("Core:\n"), None);
        assert_eq!(reported_kernels("no such line"), None);
    }

    #[test]
    fn only_generic_kernels_are_replaced_and_by_what_the_processor_allows() {
        for generic in ["Prescott", "prescott", "Nehalem", "Core2"] {
            assert_eq!(native_kernels(generic, true, true), Some("SkylakeX"));
            assert_eq!(native_kernels(generic, false, true), Some("Haswell"));
            assert_eq!(native_kernels(generic, false, false), None);
        }
        for known in ["SkylakeX", "Cooperlake", "Haswell", "Zen", "SapphireRapids"] {
            assert_eq!(native_kernels(known, true, true), None, "{known}");
        }
    }

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
