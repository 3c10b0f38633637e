//! Output sets: several files of one run that appear in a directory together or not at all.
//!
//! POSIX renames one name atomically, never several, so a set is made atomic for its readers by
//! a manifest, [`SET_MANIFEST`], that is **removed first and written last**:
//!
//! 1. [`StagedSet::begin`] makes a staging directory `OUT/.fips-staging-{pid}-{16 hex}` inside the
//!    output directory (same file system, so the renames below never copy). The caller writes
//!    every file of the set into it (each one synced by the atomic writer); a directory (a model
//!    folder) is one entry of the set, fingerprinted as a tree and renamed whole.
//! 2. [`StagedSet::commit`] writes the staged manifest (every file's name, length and XXH64
//!    fingerprint, the files of an earlier set this one replaces, the crate version and the BLAS
//!    thread count) into the staging directory and syncs it: from here on the set is complete on
//!    disk and the commit can always be rolled forward.
//! 3. It then removes `OUT/fips-set.json` (the old set is no longer vouched for), removes the old
//!    set's files the new set does not have (so no stale `loss_group7.svg` or densified checkpoint
//!    of an earlier run stays beside the new ones), renames every staged file into `OUT`, syncs
//!    `OUT`, and renames the manifest into `OUT` **last**, syncs again and removes the staging
//!    directory.
//!
//! So at every instant `OUT/fips-set.json` either lists exactly the files beside it, with their
//! fingerprints, or is absent; a reader that trusts only a verified manifest ([`verify`]) never
//! sees a mix of two runs. A run killed before step 2 leaves an incomplete staging directory, which
//! the next [`recover`] removes; killed during step 3 it leaves a complete one, which the next
//! [`recover`] rolls forward (renames the rest, writes the manifest). Either way the previous set
//! stays intact until the new one is complete on disk, and the files in `OUT` are never a blend of
//! two runs once any fips command has touched the directory again. Staging directories of a
//! process that is still running are left alone.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::foundation::error::{FipsError, Result};
use crate::foundation::fingerprint;
use crate::foundation::safe_io::{remove_stale_temporaries, sync_directory, write_atomically};

/// The manifest of the current set of an output directory.
pub const SET_MANIFEST: &str = "fips-set.json";
/// Prefix of the staging directories.
pub const STAGING_PREFIX: &str = ".fips-staging-";
/// The `format` field of a set manifest.
pub const SET_FORMAT: &str = "fips-output-set";

/// One file of a set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetFile {
    /// Its name in the output directory.
    pub name: String,
    /// Its length.
    pub bytes: u64,
    /// XXH64 of its content, 16 hex digits (of a directory: [`fingerprint::of_dir`]).
    pub fingerprint: String,
    /// A directory (a model folder) installed as one entry, not a file.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub directory: bool,
}

impl SetFile {
    fn fingerprint_of(&self, path: &Path) -> Result<(String, u64)> {
        if self.directory {
            fingerprint::of_dir(path)
        } else {
            fingerprint::of_file(path)
        }
    }
}

/// What `fips-set.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetManifest {
    /// Always [`SET_FORMAT`].
    pub format: String,
    /// The version of this crate that wrote the set.
    pub fips_version: String,
    /// The BLAS thread count of the writing process (`null`: the backend's default).
    pub blas_threads: Option<usize>,
    /// The files, sorted by name.
    pub files: Vec<SetFile>,
    /// Files of an earlier set in the directory that this set removes.
    pub replaces: Vec<String>,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> FipsError + '_ {
    move |source| FipsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_error(path: &Path, reason: impl Into<String>) -> FipsError {
    FipsError::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A plain file name: no separators, not `.`/`..`, not hidden.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\'])
        && name != SET_MANIFEST
}

/// A set being staged in an output directory.
#[derive(Debug)]
pub struct StagedSet {
    out_dir: PathBuf,
    staging: PathBuf,
}

impl StagedSet {
    /// Recovers what killed runs left in `out_dir` ([`recover`]), then makes a fresh staging
    /// directory inside it (creating `out_dir` if needed).
    pub fn begin(out_dir: impl AsRef<Path>) -> Result<Self> {
        let out_dir = out_dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&out_dir).map_err(io_error(&out_dir))?;
        recover(&out_dir)?;
        for _ in 0..16 {
            let staging = out_dir.join(format!(
                "{STAGING_PREFIX}{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            match std::fs::create_dir(&staging) {
                Ok(()) => return Ok(Self { out_dir, staging }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_error(&staging)(e)),
            }
        }
        Err(io_error(&out_dir)(std::io::Error::other(
            "could not create a staging directory",
        )))
    }

    /// The staging directory: write the set's files here.
    pub fn dir(&self) -> &Path {
        &self.staging
    }

    /// Where the file `name` of the set is staged.
    pub fn path(&self, name: &str) -> PathBuf {
        self.staging.join(name)
    }

    /// Installs the staged files as the set of the output directory (see the module
    /// documentation). `owned(name)` says which existing files of the directory belong to the
    /// kind of set being written (the names this command writes): those the new set lacks are
    /// removed with the old set. Returns the final paths of the files.
    pub fn commit(self, owned: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.staging).map_err(io_error(&self.staging))? {
            let entry = entry.map_err(io_error(&self.staging))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !plain_name(&name) {
                continue;
            }
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(io_error(&path))?;
            if !meta.is_file() && !meta.is_dir() {
                return Err(format_error(
                    &path,
                    "a staged output is neither a regular file nor a directory",
                ));
            }
            let (fingerprint, bytes) = if meta.is_dir() {
                fingerprint::of_dir(&path)?
            } else {
                fingerprint::of_file(&path)?
            };
            files.push(SetFile {
                name,
                bytes,
                fingerprint,
                directory: meta.is_dir(),
            });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        // A directory of the output directory goes with the old set only if that set's manifest
        // lists it as one of its entries (never a folder of the user's that merely has the name).
        let old_dirs: Vec<String> = std::fs::read_to_string(self.out_dir.join(SET_MANIFEST))
            .ok()
            .and_then(|text| serde_json::from_str::<SetManifest>(&text).ok())
            .map(|m| {
                m.files
                    .into_iter()
                    .filter(|f| f.directory)
                    .map(|f| f.name)
                    .collect()
            })
            .unwrap_or_default();
        let mut replaces = Vec::new();
        for entry in std::fs::read_dir(&self.out_dir).map_err(io_error(&self.out_dir))? {
            let entry = entry.map_err(io_error(&self.out_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_file = entry
                .file_type()
                .is_ok_and(|t| t.is_file() || (t.is_dir() && old_dirs.contains(&name)));
            if is_file && plain_name(&name) && owned(&name) && !files.iter().any(|f| f.name == name)
            {
                replaces.push(name);
            }
        }
        replaces.sort();
        let manifest = SetManifest {
            format: SET_FORMAT.into(),
            fips_version: env!("CARGO_PKG_VERSION").into(),
            blas_threads: crate::foundation::blas::configured_threads(),
            files,
            replaces,
        };
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| format_error(&self.staging, e.to_string()))?;
        write_atomically(self.staging.join(SET_MANIFEST), text.as_bytes())?;
        sync_directory(&self.staging)?;
        apply(&self.out_dir, &self.staging, &manifest)?;
        Ok(manifest
            .files
            .iter()
            .map(|f| self.out_dir.join(&f.name))
            .collect())
    }

    /// Removes the staging directory without installing anything.
    pub fn abandon(self) {
        let _ = std::fs::remove_dir_all(&self.staging);
    }
}

/// Step 3 of the commit: idempotent, so a killed commit is finished by running it again.
fn apply(out_dir: &Path, staging: &Path, manifest: &SetManifest) -> Result<()> {
    let current = out_dir.join(SET_MANIFEST);
    match std::fs::remove_file(&current) {
        Ok(()) => sync_directory(out_dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&current)(e)),
    }
    for name in &manifest.replaces {
        let path = out_dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => std::fs::remove_file(&path).map_err(io_error(&path))?,
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path).map_err(io_error(&path))?,
            _ => {}
        }
    }
    for file in &manifest.files {
        // Temporaries that killed writers of this name left in the directory (older versions
        // wrote there directly).
        remove_stale_temporaries(out_dir, std::ffi::OsStr::new(&file.name));
        let (from, to) = (staging.join(&file.name), out_dir.join(&file.name));
        if std::fs::symlink_metadata(&from).is_ok() {
            match std::fs::symlink_metadata(&to) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(FipsError::UnsafeOutput {
                        path: to,
                        reason: "the destination is a symbolic link (refused)".into(),
                    });
                }
                // A directory is not replaced by a rename: the old one goes first (the new set
                // is complete on disk, so a kill here is rolled forward by `recover`).
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&to).map_err(io_error(&to))?,
                Ok(_) if file.directory => std::fs::remove_file(&to).map_err(io_error(&to))?,
                _ => {}
            }
            std::fs::rename(&from, &to).map_err(io_error(&to))?;
        } else if !(to.is_file() || (file.directory && to.is_dir())) {
            return Err(format_error(
                staging,
                format!("{} is neither staged nor installed", file.name),
            ));
        }
    }
    sync_directory(out_dir)?;
    let staged_manifest = staging.join(SET_MANIFEST);
    std::fs::rename(&staged_manifest, &current).map_err(io_error(&current))?;
    sync_directory(out_dir)?;
    std::fs::remove_dir_all(staging).map_err(io_error(staging))
}

/// The process id in a staging directory's name.
fn staging_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(STAGING_PREFIX)?;
    let (pid, random) = rest.split_once('-')?;
    (random.len() == 16 && random.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| pid.parse().ok())
        .flatten()
}

fn running(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    // Where the platform cannot tell (no /proc), assume the writer is gone: staging directories
    // carry a random part, so two live writers never share one.
    Path::new("/proc/self").exists() && Path::new("/proc").join(pid.to_string()).exists()
}

/// What [`recover`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Complete staged sets that were installed (a commit killed half way).
    pub rolled_forward: usize,
    /// Incomplete staging directories that were removed (a run killed while writing its set).
    pub removed: usize,
}

/// Finishes or removes what killed runs left in `out_dir`: every staging directory of a process
/// that is no longer running is rolled forward if its manifest was written (the set was complete)
/// and removed otherwise. Links and other entries are never followed.
pub fn recover(out_dir: impl AsRef<Path>) -> Result<Recovery> {
    let out_dir = out_dir.as_ref();
    let mut done = Recovery::default();
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return Ok(done);
    };
    let mut stale: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| {
            staging_owner(&e.file_name().to_string_lossy()).is_some_and(|pid| !running(pid))
        })
        .map(|e| e.path())
        .collect();
    stale.sort();
    for staging in stale {
        let manifest_path = staging.join(SET_MANIFEST);
        match std::fs::read_to_string(&manifest_path) {
            Ok(text) => {
                let manifest: SetManifest = serde_json::from_str(&text)
                    .map_err(|e| format_error(&manifest_path, e.to_string()))?;
                apply(out_dir, &staging, &manifest)?;
                done.rolled_forward += 1;
            }
            Err(_) => {
                std::fs::remove_dir_all(&staging).map_err(io_error(&staging))?;
                done.removed += 1;
            }
        }
    }
    Ok(done)
}

/// Reads `out_dir/fips-set.json` and checks every file it lists (length and fingerprint): the set
/// a reader may trust. Errors: [`FipsError::Io`] when there is no manifest (no complete set),
/// [`FipsError::Format`] when a file is missing or differs.
pub fn verify(out_dir: impl AsRef<Path>) -> Result<SetManifest> {
    let out_dir = out_dir.as_ref();
    let path = out_dir.join(SET_MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    let manifest: SetManifest =
        serde_json::from_str(&text).map_err(|e| format_error(&path, e.to_string()))?;
    if manifest.format != SET_FORMAT {
        return Err(format_error(&path, "not a fips output-set manifest"));
    }
    for file in &manifest.files {
        let p = out_dir.join(&file.name);
        let (fingerprint, bytes) = file.fingerprint_of(&p)?;
        if fingerprint != file.fingerprint || bytes != file.bytes {
            return Err(format_error(
                &p,
                "differs from the set manifest (changed after the set was written)",
            ));
        }
    }
    Ok(manifest)
}

/// Checks, for a reader, that the file or folder `path` is not a member of a half-installed or
/// altered output set: when its directory holds a set manifest naming it, its length and
/// fingerprint must match (only this member is hashed); when the directory holds no manifest but
/// a complete staging directory of a writer that is gone (a commit killed in step 3), the set is
/// refused until a fips command that writes there rolls it forward. A path outside any set (no
/// manifest, no staging directory, or a manifest that does not list it) passes.
pub fn check_member(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let name = name.to_string_lossy();
    let manifest_path = dir.join(SET_MANIFEST);
    match std::fs::read_to_string(&manifest_path) {
        Ok(text) => {
            let manifest: SetManifest = serde_json::from_str(&text)
                .map_err(|e| format_error(&manifest_path, e.to_string()))?;
            if let Some(file) = manifest.files.iter().find(|f| f.name == name) {
                let (fingerprint, bytes) = file.fingerprint_of(path)?;
                if fingerprint != file.fingerprint || bytes != file.bytes {
                    return Err(format_error(
                        path,
                        format!(
                            "differs from {} (changed after the output set was written)",
                            manifest_path.display()
                        ),
                    ));
                }
            }
            Ok(())
        }
        Err(_) => {
            let interrupted = std::fs::read_dir(dir)
                .ok()
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    e.file_type().is_ok_and(|t| t.is_dir())
                        && staging_owner(&e.file_name().to_string_lossy())
                            .is_some_and(|pid| !running(pid))
                        && e.path().join(SET_MANIFEST).is_file()
                });
            if interrupted {
                return Err(format_error(
                    path,
                    format!(
                        "{} holds an output set whose installation was interrupted (its files may \
                         be a mix of two runs); rerun the command that wrote it, which finishes \
                         the installation first",
                        dir.display()
                    ),
                ));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fips-set-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_directory_is_one_entry_of_a_set() {
        let dir = temp_dir("folder");
        let owned = |n: &str| n.starts_with("out");
        let stage = |files: &[(&str, &[u8])]| {
            let set = StagedSet::begin(&dir).unwrap();
            write_atomically(set.path("out-file"), b"f").unwrap();
            std::fs::create_dir_all(set.path("out-dir").join("sub")).unwrap();
            for (name, bytes) in files {
                write_atomically(set.path("out-dir").join(name), bytes).unwrap();
            }
            set.commit(owned).unwrap();
        };
        stage(&[("a", b"one"), ("sub/b", b"two")]);
        let m = verify(&dir).unwrap();
        let entry = m.files.iter().find(|f| f.name == "out-dir").unwrap();
        assert!(entry.directory);
        assert_eq!(entry.bytes, 6);
        // The new folder replaces the old one whole: no file of the old one stays.
        stage(&[("c", b"three")]);
        verify(&dir).unwrap();
        assert!(!dir.join("out-dir/a").exists());
        assert_eq!(std::fs::read(dir.join("out-dir/c")).unwrap(), b"three");
        // A changed file inside the folder no longer verifies.
        std::fs::write(dir.join("out-dir/c"), b"tampered").unwrap();
        assert!(verify(&dir).is_err());
        // A set without the folder removes it.
        let set = StagedSet::begin(&dir).unwrap();
        write_atomically(set.path("out-file"), b"g").unwrap();
        let m = {
            set.commit(owned).unwrap();
            verify(&dir).unwrap()
        };
        assert_eq!(m.replaces, vec!["out-dir".to_string()]);
        assert_eq!(names(&dir), vec!["fips-set.json", "out-file"]);
        // A folder no set listed is never removed, even with a name the command owns.
        std::fs::create_dir(dir.join("out-mine")).unwrap();
        let set = StagedSet::begin(&dir).unwrap();
        write_atomically(set.path("out-file"), b"h").unwrap();
        set.commit(owned).unwrap();
        assert!(dir.join("out-mine").is_dir());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_set_replaces_the_previous_one_whole() {
        let dir = temp_dir("commit");
        std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
        let owned = |n: &str| n.starts_with("out");
        let set = StagedSet::begin(&dir).unwrap();
        for n in ["out-a", "out-b", "out-c"] {
            write_atomically(set.path(n), n.as_bytes()).unwrap();
        }
        set.commit(owned).unwrap();
        assert_eq!(verify(&dir).unwrap().files.len(), 3);
        let set = StagedSet::begin(&dir).unwrap();
        write_atomically(set.path("out-a"), b"new a").unwrap();
        set.commit(owned).unwrap();
        let m = verify(&dir).unwrap();
        assert_eq!(m.replaces, vec!["out-b".to_string(), "out-c".to_string()]);
        assert_eq!(names(&dir), vec!["fips-set.json", "notes.txt", "out-a"]);
        assert_eq!(std::fs::read(dir.join("out-a")).unwrap(), b"new a");
        // A changed file no longer verifies.
        std::fs::write(dir.join("out-a"), b"tampered").unwrap();
        assert!(verify(&dir).is_err());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn killed_commits_roll_forward_and_killed_stagings_vanish() {
        let dir = temp_dir("recover");
        let owned = |_: &str| true;
        let set = StagedSet::begin(&dir).unwrap();
        write_atomically(set.path("x"), b"old x").unwrap();
        write_atomically(set.path("y"), b"old y").unwrap();
        set.commit(owned).unwrap();
        // A dead writer's complete staging, killed after installing `x` only: the manifest gone
        // from OUT, `x` new, `y` still old (a mix, not vouched for).
        let dead = dir.join(format!("{STAGING_PREFIX}4294967294-00000000000000aa"));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("y"), b"new y").unwrap();
        let manifest = SetManifest {
            format: SET_FORMAT.into(),
            fips_version: "t".into(),
            blas_threads: None,
            files: [("x", b"new x".as_slice()), ("y", b"new y".as_slice())]
                .iter()
                .map(|(n, b)| SetFile {
                    name: n.to_string(),
                    bytes: b.len() as u64,
                    fingerprint: fingerprint::of_bytes(b),
                    directory: false,
                })
                .collect(),
            replaces: vec![],
        };
        std::fs::write(
            dead.join(SET_MANIFEST),
            serde_json::to_string(&manifest).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join("x"), b"new x").unwrap();
        std::fs::remove_file(dir.join(SET_MANIFEST)).unwrap();
        assert!(
            verify(&dir).is_err(),
            "a half-installed set is not vouched for"
        );
        // An incomplete staging of another dead writer.
        let partial = dir.join(format!("{STAGING_PREFIX}4294967293-00000000000000bb"));
        std::fs::create_dir(&partial).unwrap();
        std::fs::write(partial.join("x"), b"half").unwrap();
        if running(4_294_967_294) {
            return;
        }
        let r = recover(&dir).unwrap();
        assert_eq!((r.rolled_forward, r.removed), (1, 1));
        verify(&dir).unwrap();
        assert_eq!(std::fs::read(dir.join("y")).unwrap(), b"new y");
        assert_eq!(names(&dir), vec!["fips-set.json", "x", "y"]);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn readers_refuse_altered_members_and_half_installed_sets() {
        let dir = temp_dir("member");
        let set = StagedSet::begin(&dir).unwrap();
        write_atomically(set.path("a"), b"first").unwrap();
        set.commit(|_| false).unwrap();
        check_member(dir.join("a")).unwrap();
        check_member(dir.join("elsewhere")).unwrap();
        std::fs::write(dir.join("a"), b"other").unwrap();
        assert!(matches!(
            check_member(dir.join("a")),
            Err(FipsError::Format { .. })
        ));
        // An unreadable manifest: a typed error, not a panic.
        std::fs::write(dir.join(SET_MANIFEST), b"{\"files\": [1, 2").unwrap();
        assert!(matches!(
            check_member(dir.join("a")),
            Err(FipsError::Format { .. })
        ));
        // A complete staging directory of a dead writer and no manifest: refused.
        std::fs::remove_file(dir.join(SET_MANIFEST)).unwrap();
        let staged = dir.join(format!("{STAGING_PREFIX}999999999-0123456789abcdef"));
        std::fs::create_dir_all(&staged).unwrap();
        std::fs::write(staged.join(SET_MANIFEST), b"{}").unwrap();
        let err = check_member(dir.join("a")).unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
