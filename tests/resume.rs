//! Never lose work: a `fips compress` killed (SIGKILL) at several points and rerun writes the same
//! bytes as an uninterrupted run; groups run as separate processes and assembled give the same
//! bytes; changed settings never reuse parts silently; leftovers of killed runs are cleaned; and
//! the output directory only ever holds one complete, verified set.
//!
//! Runs the real `fips` binary on the real DeiT-tiny checkpoint with data-free calibration and a
//! handful of steps (a few seconds per run in a debug build).

#![cfg(feature = "cli")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fips::FipsError;
use fips::app::run_dir::WorkArea;
use fips::foundation::output_set;

/// `../shared/data/deit-tiny/model.safetensors`, or `None` with a visible message.
fn deit(test: &str) -> Option<PathBuf> {
    common::shared_data(test, "deit-tiny", &["model.safetensors"])
        .map(|d| d.join("model.safetensors"))
}

fn scratch(tag: &str) -> PathBuf {
    common::scratch(&format!("resume-{tag}"))
}

/// Small settings: three one-block groups, `steps` steps each.
fn run_args(checkpoint: &Path, steps: usize) -> Vec<String> {
    let steps = steps.to_string();
    [
        "compress",
        "--checkpoint",
        &checkpoint.display().to_string(),
        "--data-free",
        "--data-free-tokens",
        "128",
        "--batch-tokens",
        "64",
        "--budget",
        "0.2",
        "--groups",
        "0-0,1-1,2-2",
        "--threads",
        "1",
        "--steps",
        &steps,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn command(args: &[String], extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fips"));
    c.args(args).args(extra).env("OPENBLAS_NUM_THREADS", "1");
    c
}

fn fips(args: &[String], extra: &[&str]) -> Output {
    command(args, extra).output().unwrap()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "fips failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The outputs of `got` are those of `want`: the same bytes for every file of the set but the
/// report, and the same report up to its timings; the set verifies and nothing else is left.
fn same_outputs(want: &Path, got: &Path) {
    let expected = names(want);
    assert_eq!(names(got), expected, "{}", got.display());
    for name in &expected {
        if name == "report.json" || name == "fips-set.json" {
            continue;
        }
        let (a, b) = (
            std::fs::read(want.join(name)).unwrap(),
            std::fs::read(got.join(name)).unwrap(),
        );
        assert!(
            a == b,
            "{name} differs between {} and {}",
            want.display(),
            got.display()
        );
    }
    assert_eq!(
        common::report_without_timings(want),
        common::report_without_timings(got)
    );
    output_set::verify(got).unwrap();
}

/// A kill point: true once the run has got there.
type Ready = Box<dyn Fn(&Path) -> bool>;

/// Starts a run and kills it with SIGKILL once `ready(out_dir)` holds (or after `timeout`).
fn kill_when(args: &[String], out: &Path, ready: impl Fn(&Path) -> bool) -> bool {
    let mut child = command(args, &["--out-dir", &out.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            // Finished before the kill point: nothing to test at this point.
            assert!(status.success());
            return false;
        }
        if ready(out) || start.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn killed_runs_resume_to_the_bytes_of_an_uninterrupted_run() {
    let Some(checkpoint) = deit("killed_runs_resume_to_the_bytes_of_an_uninterrupted_run") else {
        return;
    };
    let root = scratch("kill");
    let args = run_args(&checkpoint, 4);
    let reference = root.join("reference");
    let start = Instant::now();
    let out = fips(&args, &["--out-dir", &reference.display().to_string()]);
    ok(&out);
    let uninterrupted = start.elapsed();
    // stderr is a pipe here, not a terminal: progress comes as plain lines, up to each group's
    // last step.
    let log = String::from_utf8_lossy(&out.stderr);
    let last = |g: usize| format!("group {g}/3: step 4/4 loss");
    assert!(
        (1..=3).all(|g| log.contains(&last(g))),
        "no plain progress lines in:\n{log}"
    );
    assert!(!reference.join(".fips-work").exists(), "work area removed");

    let part =
        |g: usize| move |out: &Path| out.join(format!(".fips-work/group-{g}.json")).is_file();
    let staged = |out: &Path| {
        std::fs::read_dir(out).is_ok_and(|mut d| {
            d.any(|e| {
                e.is_ok_and(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(".fips-staging-")
                })
            })
        })
    };
    let points: [(&str, Ready); 4] = [
        ("early, before any part", {
            let start = Instant::now();
            Box::new(move |_: &Path| start.elapsed() > Duration::from_millis(60))
        }),
        ("after group 0", Box::new(part(0))),
        ("after group 1", Box::new(part(1))),
        ("while staging the set", Box::new(staged)),
    ];
    for (k, (label, ready)) in points.iter().enumerate() {
        let out = root.join(format!("killed-{k}"));
        // An earlier, different set in the directory must never mix with the new one.
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("report.json"), b"{\"old\": true}").unwrap();
        std::fs::write(out.join("loss_group7.svg"), b"<svg/>").unwrap();
        std::fs::write(out.join("notes.txt"), b"the user's own file").unwrap();
        let killed = kill_when(&args, &out, ready);
        if killed {
            match output_set::verify(&out) {
                // The commit had finished: the manifest vouches for the whole new set.
                Ok(m) => {
                    let listed: Vec<String> = m.files.iter().map(|f| f.name.clone()).collect();
                    let mut want = names(&reference);
                    want.retain(|n| n != "fips-set.json");
                    assert_eq!(listed, want, "{label}");
                }
                // Killed before the commit: the previous set is untouched.
                Err(_) if k < 3 => {
                    assert_eq!(
                        std::fs::read(out.join("report.json")).unwrap(),
                        b"{\"old\": true}"
                    );
                    assert!(out.join("loss_group7.svg").is_file());
                    assert!(!out.join("compressed.safetensors").exists());
                }
                // Killed inside the commit: no manifest vouches for what is there.
                Err(_) => {}
            }
        }
        let start = Instant::now();
        let resumed = fips(&args, &["--out-dir", &out.display().to_string()]);
        ok(&resumed);
        let resume_time = start.elapsed();
        assert_eq!(
            std::fs::read(out.join("notes.txt")).unwrap(),
            b"the user's own file"
        );
        std::fs::remove_file(out.join("notes.txt")).unwrap();
        same_outputs(&reference, &out);
        eprintln!(
            "kill {label}: killed={killed}, resume {resume_time:.2?} (uninterrupted {uninterrupted:.2?})"
        );
    }
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn scattered_groups_assemble_to_the_same_bytes_and_missing_parts_are_named() {
    let Some(checkpoint) =
        deit("scattered_groups_assemble_to_the_same_bytes_and_missing_parts_are_named")
    else {
        return;
    };
    let root = scratch("scatter");
    let args = run_args(&checkpoint, 4);
    let (reference, work, out) = (root.join("reference"), root.join("work"), root.join("out"));
    ok(&fips(
        &args,
        &["--out-dir", &reference.display().to_string()],
    ));
    let work_s = work.display().to_string();
    // Groups 0 and 2 as two concurrent processes; group 1 not yet.
    let children: Vec<_> = ["0", "2"]
        .iter()
        .map(|k| {
            command(&args, &["--only-group", k, "--work-dir", &work_s])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let out_s = out.display().to_string();
    let assemble = |out: &str| {
        Command::new(env!("CARGO_BIN_EXE_fips"))
            .args(["assemble", "--work-dir", &work_s, "--out-dir", out])
            .output()
            .unwrap()
    };
    let missing = assemble(&out_s);
    assert!(!missing.status.success());
    let message = String::from_utf8_lossy(&missing.stderr);
    assert!(
        message.contains("[1]") && message.contains("missing"),
        "{message}"
    );
    assert!(!out.join("compressed.safetensors").exists());
    match WorkArea::load(&work).unwrap().assemble(Duration::ZERO) {
        Err(FipsError::MissingParts { missing, .. }) => assert_eq!(missing, vec![1]),
        other => panic!("expected MissingParts, got {other:?}"),
    }
    // An out-of-range group is refused before any work.
    let bad = fips(&args, &["--only-group", "3", "--work-dir", &work_s]);
    assert!(!bad.status.success());
    ok(&fips(&args, &["--only-group", "1", "--work-dir", &work_s]));
    ok(&assemble(&out_s));
    same_outputs(&reference, &out);
    let settings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.join("settings.json")).unwrap()).unwrap();
    assert!(
        settings["settings"]["cores"].is_null(),
        "both thread counts given: the core count does not matter"
    );
    assert_eq!(settings["settings"]["blas_threads"], 1);
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn changed_settings_never_reuse_parts_and_leftovers_are_cleaned() {
    let Some(checkpoint) = deit("changed_settings_never_reuse_parts_and_leftovers_are_cleaned")
    else {
        return;
    };
    let root = scratch("settings");
    let args = run_args(&checkpoint, 4);
    let out = root.join("out");
    let out_s = out.display().to_string();
    ok(&fips(&args, &["--out-dir", &out_s, "--only-group", "0"]));
    let part = out.join(".fips-work/group-0.safetensors");
    let before = std::fs::read(&part).unwrap();
    // Another step count: refused, naming the setting, parts untouched, nothing written.
    let changed = fips(&run_args(&checkpoint, 3), &["--out-dir", &out_s]);
    assert!(!changed.status.success());
    let message = String::from_utf8_lossy(&changed.stderr);
    assert!(
        message.contains("steps") && message.contains("--fresh"),
        "{message}"
    );
    assert_eq!(std::fs::read(&part).unwrap(), before);
    assert!(!out.join("compressed.safetensors").exists());
    // --resume with nothing to resume is an error.
    let nothing = fips(
        &args,
        &[
            "--out-dir",
            &root.join("empty").display().to_string(),
            "--resume",
        ],
    );
    assert!(!nothing.status.success());
    // Leftovers of killed runs: an incomplete staging directory of a dead process and a dead
    // writer's temporary; both go, the user's files stay.
    let staging = out.join(".fips-staging-4294967294-00000000000000aa");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("compressed.safetensors"), b"half").unwrap();
    let temp = out.join(".report.json.4294967294.00000000000000aa.fips-tmp");
    std::fs::write(&temp, b"half").unwrap();
    ok(&fips(
        &run_args(&checkpoint, 3),
        &["--out-dir", &out_s, "--fresh"],
    ));
    let left = names(&out);
    assert!(
        !left.iter().any(|n| n.starts_with('.')),
        "leftovers remain: {left:?}"
    );
    output_set::verify(&out).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("fips-set.json")).unwrap()).unwrap();
    assert_eq!(manifest["blas_threads"], 1);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["blas_threads"], 1);
    assert_eq!(report["parameters"]["steps"], 3);
    let compressed = fips::Checkpoint::open(out.join("compressed.safetensors")).unwrap();
    let manifest = fips::format::compact_file::read_manifest(&compressed).unwrap();
    assert_eq!(manifest.blas_threads, Some(1));
    assert_eq!(manifest.crate_version, env!("CARGO_PKG_VERSION"));
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn bad_inputs_fail_before_any_group_runs() {
    let Some(checkpoint) = deit("bad_inputs_fail_before_any_group_runs") else {
        return;
    };
    let images = checkpoint.parent().unwrap().join("../imagenet-sample");
    if !images.join("labels.tsv").is_file() {
        eprintln!("SKIPPED bad_inputs_fail_before_any_group_runs: no imagenet-sample");
        return;
    }
    let root = scratch("validate");
    // An image set of two real calibration images and one truncated evaluation image.
    let set = root.join("images");
    std::fs::create_dir_all(set.join("calib")).unwrap();
    std::fs::create_dir_all(set.join("eval")).unwrap();
    let labels = std::fs::read_to_string(images.join("labels.tsv")).unwrap();
    let mut lines = vec!["file\tlabel\tsynset\tsplit".to_string()];
    let calib: Vec<&str> = labels
        .lines()
        .filter(|l| l.ends_with("\tcalib"))
        .take(3)
        .collect();
    for (k, line) in calib.iter().enumerate() {
        let fields: Vec<&str> = line.split('\t').collect();
        let bytes = std::fs::read(images.join(fields[0])).unwrap();
        let (split, bytes) = if k < 2 {
            ("calib", bytes)
        } else {
            ("eval", bytes[..bytes.len() / 2].to_vec())
        };
        let name = format!("{split}/{k}.jpg");
        std::fs::write(set.join(&name), bytes).unwrap();
        lines.push(format!("{name}\t{}\t{}\t{split}", fields[1], fields[2]));
    }
    std::fs::write(set.join("labels.tsv"), lines.join("\n")).unwrap();
    let args: Vec<String> = [
        "compress",
        "--checkpoint",
        &checkpoint.display().to_string(),
        "--images",
        &set.display().to_string(),
        "--steps",
        "4",
        "--batch-tokens",
        "128",
        "--groups",
        "0-0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = root.join("out");
    let out_s = out.display().to_string();
    let no_part = || !out.join(".fips-work/group-0.json").exists();
    // The truncated evaluation image is found before any training.
    let truncated = fips(&args, &["--out-dir", &out_s]);
    assert!(!truncated.status.success());
    let message = String::from_utf8_lossy(&truncated.stderr);
    assert!(message.contains("2.jpg"), "{message}");
    assert!(no_part());
    // A missing evaluation split, likewise.
    let missing = fips(&args, &["--out-dir", &out_s, "--eval-split", "test"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("\"test\""));
    assert!(no_part());
    // An output directory that cannot be made (its parent is a file).
    std::fs::write(root.join("file"), b"x").unwrap();
    let blocked = root.join("file/out").display().to_string();
    let unwritable = fips(&args, &["--out-dir", &blocked, "--no-eval"]);
    assert!(!unwritable.status.success());
    // Without the bad evaluation image the same run works.
    ok(&fips(&args, &["--out-dir", &out_s, "--no-eval"]));
    output_set::verify(&out).unwrap();
    std::fs::remove_dir_all(root).ok();
}
