//! Never lose work on the text path: `fips compress --model DIR --text FILE` killed (SIGKILL)
//! after its first group's part and rerun writes the same bytes as an uninterrupted run (the
//! compressed file, every file of the densified folder, the report up to its timings), and a
//! rerun with other settings is refused before any work, naming what differs.
//!
//! Runs the real `fips` binary on `../shared/data/stories260k` (five blocks, one group each,
//! 20 steps, 512 calibration tokens, 1% of the paragraphs held out).

#![cfg(all(feature = "cli", feature = "text"))]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fips::foundation::output_set;

/// `../shared/data/stories260k`, or `None` with a visible message.
fn stories(test: &str) -> Option<PathBuf> {
    common::shared_data(test, "stories260k", &["config.json", "calib.txt"])
}

fn scratch(tag: &str) -> PathBuf {
    common::scratch(&format!("text-resume-{tag}"))
}

/// Small settings: five one-block groups, 20 steps, `tokens` calibration tokens.
fn run_args(model: &Path, tokens: usize, out: &Path) -> Vec<String> {
    let tokens = tokens.to_string();
    [
        "compress",
        "--model",
        &model.display().to_string(),
        "--text",
        &model.join("calib.txt").display().to_string(),
        "--tokens",
        &tokens,
        "--validation-fraction",
        "0.01",
        "--batch-tokens",
        "256",
        "--group-size",
        "1",
        "--threads",
        "1",
        "--steps",
        "20",
        "--out-dir",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn command(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fips"));
    c.args(args).env("OPENBLAS_NUM_THREADS", "1");
    c
}

fn run(args: &[String]) -> Output {
    command(args).output().unwrap()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "fips failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every regular file under `dir` (relative paths, sorted) with its bytes.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The set in `got` is the set in `want`: the same file names (every file of `densified/`
/// included), the same bytes for all but the report and the set manifest, and the same report up
/// to its timings. Returns the file names.
fn same_set(want: &Path, got: &Path, context: &str) -> Vec<String> {
    let want_tree = tree(want);
    let got_tree = tree(got);
    let names = |t: &[(String, Vec<u8>)]| t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got_tree), names(&want_tree), "{context}");
    for ((name, a), (_, b)) in want_tree.iter().zip(&got_tree) {
        if name == "report.json" || name == "fips-set.json" {
            continue;
        }
        assert!(a == b, "{name} differs ({context})");
    }
    assert_eq!(
        common::report_without_timings(want),
        common::report_without_timings(got)
    );
    names(&want_tree)
}

#[test]
fn a_killed_text_run_resumes_to_the_bytes_of_an_uninterrupted_run() {
    let Some(model) = stories("a_killed_text_run_resumes_to_the_bytes_of_an_uninterrupted_run")
    else {
        return;
    };
    let root = scratch("kill");
    let (want, got) = (root.join("want"), root.join("got"));
    let started = Instant::now();
    ok(&run(&run_args(&model, 512, &want)));
    let uninterrupted = started.elapsed();
    output_set::verify(&want).unwrap();

    // Killed once the first group's part is there (the captures are then complete).
    let first_part = got.join(".fips-work/group-0.json");
    let mut child = command(&run_args(&model, 512, &got))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let killed = loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            break false;
        }
        if first_part.is_file() || started.elapsed() > uninterrupted * 3 + Duration::from_secs(60) {
            child.kill().unwrap();
            child.wait().unwrap();
            break true;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(killed, "the run finished before its first part was seen");
    assert!(first_part.is_file(), "killed before the first part");
    assert!(got.join(".fips-work/capture.json").is_file());
    assert!(
        !got.join("compressed.safetensors").exists(),
        "no output before the set is complete"
    );
    let part = std::fs::read(got.join(".fips-work/group-0.safetensors")).unwrap();

    // Other settings (another token budget): refused before any work, naming the setting; the
    // part and the captures stay.
    let changed = run(&run_args(&model, 384, &got));
    assert!(!changed.status.success());
    let message = String::from_utf8_lossy(&changed.stderr);
    assert!(
        message.contains("calibration.tokens") && message.contains("--fresh"),
        "{message}"
    );
    assert_eq!(
        std::fs::read(got.join(".fips-work/group-0.safetensors")).unwrap(),
        part
    );
    assert!(!got.join("compressed.safetensors").exists());

    // The same settings again: resumes (reusing the captures and group 0) to the same bytes.
    let resumed = run(&run_args(&model, 512, &got));
    ok(&resumed);
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(
        stdout.contains("earlier run with the same settings, reused"),
        "the captures were not reused: {stdout}"
    );
    assert!(
        stderr.contains("finished by an earlier run with the same settings, reused"),
        "group 0 was not reused: {stderr}"
    );
    let names = same_set(&want, &got, &stdout);
    assert!(names.iter().any(|n| n == "densified/model.safetensors"));
    let manifest = output_set::verify(&got).unwrap();
    assert!(
        manifest
            .files
            .iter()
            .any(|f| f.name == "densified" && f.directory)
    );
    assert!(!got.join(".fips-work").exists(), "the work area is removed");

    // --fresh with changed settings is accepted and replaces the set whole.
    ok(&run(
        &[run_args(&model, 384, &got), vec!["--fresh".into()]].concat()
    ));
    output_set::verify(&got).unwrap();
    assert_ne!(
        std::fs::read(got.join("compressed.safetensors")).unwrap(),
        std::fs::read(want.join("compressed.safetensors")).unwrap()
    );
    std::fs::remove_dir_all(root).ok();
}

/// Issue 13, item 5 on the text path: one job per group (`--only-group K --work-dir DIR`, three of
/// them at once, so their captures race), then `fips assemble`, writes the bytes of a
/// single-process run, whichever calibration route each job takes; assembling early names the
/// missing groups, and another calibration text is refused.
#[test]
fn a_scattered_text_run_assembles_to_the_bytes_of_a_single_run() {
    let Some(model) = stories("a_scattered_text_run_assembles_to_the_bytes_of_a_single_run") else {
        return;
    };
    let root = scratch("scatter");
    let (want, got, work) = (root.join("want"), root.join("got"), root.join("work"));
    ok(&run(&run_args(&model, 512, &want)));
    let job = |k: usize| {
        let mut args = run_args(&model, 512, &root.join("unused"));
        args.extend([
            "--only-group".into(),
            k.to_string(),
            "--work-dir".into(),
            work.display().to_string(),
        ]);
        // The calibration budget is no setting of the run: the first jobs stream their groups,
        // the later ones and the single run read them whole, in one work area, to the same bytes.
        if k < 3 {
            args.extend(["--calibration-memory".into(), "0".into()]);
        }
        command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let assemble = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "assemble",
            "--work-dir",
            &work.display().to_string(),
            "--out-dir",
            &got.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        run(&args)
    };
    // A group that does not exist: refused before anything is captured.
    let out = job(5).wait_with_output().unwrap();
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("out of range (there are 5)"), "{message}");
    assert!(!work.join("calibration.safetensors").exists());
    let first: Vec<_> = [0, 1, 2].into_iter().map(job).collect();
    for child in first {
        ok(&child.wait_with_output().unwrap());
    }
    let early = assemble(&[]);
    assert!(!early.status.success());
    let message = String::from_utf8_lossy(&early.stderr);
    assert!(message.contains("[3, 4]"), "{message}");
    assert!(
        !got.exists(),
        "nothing is written before every part is there"
    );

    let rest: Vec<_> = [3, 4].into_iter().map(job).collect();
    for child in rest {
        let out = child.wait_with_output().unwrap();
        ok(&out);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("captures of an earlier job"),
            "a later job captured again"
        );
    }
    // Another calibration text (a copy with one more paragraph): refused, nothing written.
    let other = root.join("other.txt");
    let mut text = std::fs::read_to_string(model.join("calib.txt")).unwrap();
    text.push_str("\n\nOne more paragraph.\n");
    std::fs::write(&other, text).unwrap();
    let refused = assemble(&["--text", &other.display().to_string()]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("calibration text"), "{message}");
    assert!(!got.exists());

    let assembled = assemble(&[]);
    ok(&assembled);
    same_set(&want, &got, "the scattered and the single run");
    output_set::verify(&got).unwrap();
    assert!(work.join("group-4.json").is_file(), "the work area is kept");
    std::fs::remove_dir_all(root).ok();
}
