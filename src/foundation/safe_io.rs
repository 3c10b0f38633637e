//! Writing files without ever destroying an input.
//!
//! Two guarantees, for every file the crate writes:
//!
//! 1. **Atomic, exclusive replacement.** [`write_atomically_with`] writes to a temporary file
//!    created with `O_CREAT | O_EXCL` ([`OpenOptions::create_new`]) in the destination's own
//!    directory, under a name nobody can predict (`.{name}.{pid}.{64 random bits}.fips-tmp`), so a
//!    link or file planted there is never opened, followed or truncated: creation fails instead
//!    and another name is drawn. The temporary is flushed and `fsync`ed, renamed over the
//!    destination (a single `rename(2)`: readers see the old file or the new one, never a mix),
//!    and the directory is `fsync`ed so the rename survives a power cut.
//! 2. **No output is an input.** [`check_outputs`] compares every output path with every input
//!    path of a command *before any work*: the same file after canonicalisation (symbolic links
//!    resolved), or the same device and inode (hard links), or, for an output that does not exist
//!    yet, the same canonical parent directory and file name.
//!
//! **Destinations that are symbolic links are refused** ([`FipsError::UnsafeOutput`]). Renaming
//! over a link would silently replace the link by a regular file (not write through it), which is
//! never what the person who made the link meant, and writing through it is exactly the attack a
//! planted link is for; an explicit error is the only unsurprising answer. Point `--out` at the
//! link's target instead.
//!
//! **Leftovers of a killed run.** A run killed between creating its temporary and renaming it
//! leaves a `.{name}.{pid}.{random}.fips-tmp` file (or, from versions before this module, a
//! `.{name}.{pid}.tmp` file). The next write to the same destination removes such files when
//! that is safe: the name matches the destination's pattern exactly, the entry is a regular file
//! (never a link or a directory), and the process whose id is in the name is not running
//! (Linux: no `/proc/{pid}`; where the platform offers no such check, only files untouched for a
//! day are removed). A concurrent writer's temporary is therefore never touched.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::foundation::error::{FipsError, Result};

/// Suffix of the temporary files of [`write_atomically_with`].
pub const TEMP_SUFFIX: &str = ".fips-tmp";

/// Attempts at drawing an unused temporary name before giving up.
const NAME_ATTEMPTS: usize = 16;

/// Age after which a leftover temporary is removed where liveness of its writer cannot be checked.
const STALE_AGE: Duration = Duration::from_secs(24 * 3600);

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> FipsError + '_ {
    move |source| FipsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn unsafe_output(path: &Path, reason: impl Into<String>) -> FipsError {
    FipsError::UnsafeOutput {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The directory holding `path` (`.` for a bare file name) and the file name.
fn split(path: &Path) -> Result<(PathBuf, &OsStr)> {
    let name = path
        .file_name()
        .ok_or_else(|| unsafe_output(path, "not a file path (no file name)"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// Refuses destinations that are symbolic links or anything but a regular file.
fn check_destination(path: &Path) -> Result<Option<std::fs::Metadata>> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(unsafe_output(
            path,
            "the destination is a symbolic link (refused: replacing it would not write where it \
             points, writing through it could overwrite any file); give the link's target instead",
        )),
        Ok(meta) if !meta.is_file() => Err(unsafe_output(
            path,
            "the destination exists and is not a regular file",
        )),
        Ok(meta) => Ok(Some(meta)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Creates a fresh temporary beside the destination, exclusively, under an unpredictable name.
fn create_temporary(dir: &Path, name: &OsStr) -> Result<(File, PathBuf)> {
    let mut last_error = None;
    for _ in 0..NAME_ATTEMPTS {
        let tmp = dir.join(format!(
            ".{}.{}.{:016x}{TEMP_SUFFIX}",
            name.to_string_lossy(),
            std::process::id(),
            rand::random::<u64>()
        ));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => return Ok((file, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => return Err(io_error(&tmp)(e)),
        }
    }
    Err(io_error(dir)(last_error.unwrap_or_else(|| {
        std::io::Error::other("could not create a temporary file")
    })))
}

/// Runs `write` on a buffered temporary file beside `path`; on success syncs it, renames it over
/// `path` and syncs the directory; on failure removes it. A crash at any point leaves either the
/// old file or the new one (and at worst a temporary that the next write removes).
///
/// Errors: [`FipsError::UnsafeOutput`] when `path` is a symbolic link or not a regular file,
/// [`FipsError::Io`] for the operating system's failures (missing directory, no space, …), and
/// whatever `write` returns.
pub fn write_atomically_with(
    path: impl AsRef<Path>,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let (dir, name) = split(path)?;
    let existing = check_destination(path)?;
    remove_stale_temporaries(&dir, name);
    let (file, tmp) = create_temporary(&dir, name)?;
    let io = io_error(path);
    let result = (|| {
        let mut out = BufWriter::new(file);
        write(&mut out)?;
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        if let Some(meta) = &existing {
            // Keep the permissions of the file being replaced.
            file.set_permissions(meta.permissions()).map_err(&io)?;
        }
        file.sync_all().map_err(&io)?;
        drop(file);
        // The destination may have become a link while we wrote: check again just before.
        check_destination(path)?;
        std::fs::rename(&tmp, path).map_err(&io)?;
        sync_directory(&dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A temporary beside `path` for a writer that fills it in place (seeks and positioned writes),
/// created as [`write_atomically_with`] creates its own: exclusively, under an unpredictable name,
/// after refusing a destination that is a link and removing stale leftovers. Put it in place with
/// [`install_temporary`]; on failure remove it.
pub fn create_temporary_for(path: &Path) -> Result<(File, PathBuf)> {
    let (dir, name) = split(path)?;
    check_destination(path)?;
    remove_stale_temporaries(&dir, name);
    create_temporary(&dir, name)
}

/// Syncs `file` (the temporary `tmp` of [`create_temporary_for`]), renames it over `path` (checked
/// again not to be a link) and syncs the directory.
pub fn install_temporary(file: File, tmp: &Path, path: &Path) -> Result<()> {
    let (dir, _) = split(path)?;
    file.sync_all().map_err(io_error(tmp))?;
    drop(file);
    check_destination(path)?;
    std::fs::rename(tmp, path).map_err(io_error(path))?;
    sync_directory(&dir)
}

/// Writes `bytes` to `path` atomically (see [`write_atomically_with`]).
pub fn write_atomically(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    write_atomically_with(path, |out| out.write_all(bytes).map_err(io_error(path)))
}

/// Makes a rename in `dir` durable (Unix: `fsync` of the directory; elsewhere a no-op).
pub(crate) fn sync_directory(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(dir))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Whether the process `pid` is running: `Some` where the platform tells (Linux's `/proc`),
/// `None` where it cannot be known.
fn process_running(pid: u32) -> Option<bool> {
    if pid == std::process::id() {
        return Some(true);
    }
    let proc_root = Path::new("/proc/self");
    if proc_root.exists() {
        Some(Path::new("/proc").join(pid.to_string()).exists())
    } else {
        None
    }
}

/// The writer's process id if `entry` is a temporary of destination `name`: either
/// `.{name}.{pid}.{16 hex digits}.fips-tmp` or the older `.{name}.{pid}.tmp`.
fn temporary_owner(entry: &str, name: &str) -> Option<u32> {
    let rest = entry
        .strip_prefix('.')?
        .strip_prefix(name)?
        .strip_prefix('.')?;
    let digits = |s: &str, hex: bool| {
        !s.is_empty()
            && s.chars().all(|c| {
                if hex {
                    c.is_ascii_hexdigit()
                } else {
                    c.is_ascii_digit()
                }
            })
    };
    if let Some(body) = rest.strip_suffix(TEMP_SUFFIX) {
        let (pid, random) = body.split_once('.')?;
        (digits(pid, false) && random.len() == 16 && digits(random, true))
            .then(|| pid.parse().ok())
            .flatten()
    } else {
        let pid = rest.strip_suffix(".tmp")?;
        digits(pid, false).then(|| pid.parse().ok()).flatten()
    }
}

/// Removes the temporaries that killed writers of `dir/name` left behind, where safe (see the
/// module documentation); returns how many were removed. Failures are ignored: a leftover that
/// cannot be removed does no harm.
pub fn remove_stale_temporaries(dir: &Path, name: &OsStr) -> usize {
    let Some(name) = name.to_str() else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str().and_then(|f| temporary_owner(f, name)) else {
            continue;
        };
        let path = entry.path();
        // Never follow or remove a link or a directory.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let stale = match process_running(pid) {
            Some(running) => !running,
            None => meta
                .modified()
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .is_some_and(|age| age > STALE_AGE),
        };
        if stale && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// What identifies a file on disk for [`check_outputs`].
#[derive(Debug, Clone)]
struct Identity {
    /// The canonical path (links resolved); for a file that does not exist, the canonical parent
    /// joined with the file name.
    canonical: PathBuf,
    /// `(device, inode)` of an existing file (Unix).
    file_id: Option<(u64, u64)>,
}

impl Identity {
    fn of(path: &Path) -> Result<Self> {
        match std::fs::metadata(path) {
            Ok(meta) => Ok(Self {
                canonical: std::fs::canonicalize(path).map_err(io_error(path))?,
                file_id: file_id(&meta),
            }),
            // Missing (or a dangling link): the canonical parent and the name.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (dir, name) = split(path)?;
                let dir = std::fs::canonicalize(&dir).unwrap_or_else(|_| absolute(&dir));
                Ok(Self {
                    canonical: dir.join(name),
                    file_id: None,
                })
            }
            Err(e) => Err(io_error(path)(e)),
        }
    }

    fn same(&self, other: &Self) -> bool {
        self.canonical == other.canonical
            || (self.file_id.is_some() && self.file_id == other.file_id)
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn file_id(_meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// Checks, before any work, that no output of a command is one of its inputs or a directory
/// holding one, and that no two outputs are the same file.
///
/// Two paths name the same file when their canonical forms are equal (symbolic links resolved),
/// when they have the same device and inode (hard links), or, for an output that does not exist
/// yet, when its canonical parent directory and name equal the other's. Returns
/// [`FipsError::UnsafeOutput`] naming both paths; I/O failures while canonicalising are
/// [`FipsError::Io`].
pub fn check_outputs<I, O>(inputs: I, outputs: O) -> Result<()>
where
    I: IntoIterator,
    I::Item: AsRef<Path>,
    O: IntoIterator,
    O::Item: AsRef<Path>,
{
    let inputs = inputs
        .into_iter()
        .map(|p| {
            let p = p.as_ref().to_path_buf();
            Identity::of(&p).map(|id| (p, id))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut seen: Vec<(PathBuf, Identity)> = Vec::new();
    for output in outputs {
        let output = output.as_ref();
        let id = Identity::of(output)?;
        if let Some((input, _)) = inputs.iter().find(|(_, i)| i.same(&id)) {
            return Err(unsafe_output(
                output,
                format!(
                    "it is the input {} (the same file{}); choose another output path",
                    input.display(),
                    if input == output {
                        String::new()
                    } else {
                        format!(
                            ", reached through a link or another path: {}",
                            id.canonical.display()
                        )
                    }
                ),
            ));
        }
        // An output directory replaced whole (a densified model folder) must hold no input.
        if let Some((input, _)) = inputs
            .iter()
            .find(|(_, i)| i.canonical.starts_with(&id.canonical))
        {
            return Err(unsafe_output(
                output,
                format!(
                    "it holds the input {} (writing it would replace that input); choose another \
                     output path",
                    input.display()
                ),
            ));
        }
        if let Some((other, _)) = seen.iter().find(|(_, o)| o.same(&id)) {
            return Err(unsafe_output(
                output,
                format!("it is also the output {}", other.display()),
            ));
        }
        seen.push((output.to_path_buf(), id));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fips-safeio-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_output_directory_holding_an_input_is_refused() {
        let dir = temp_dir("holds");
        let model = dir.join("out/densified");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("model.safetensors"), b"weights").unwrap();
        let inputs = [model.join("model.safetensors")];
        assert!(matches!(
            check_outputs(&inputs, [dir.join("out/densified")]),
            Err(FipsError::UnsafeOutput { .. })
        ));
        assert!(matches!(
            check_outputs(&inputs, [dir.join("out")]),
            Err(FipsError::UnsafeOutput { .. })
        ));
        check_outputs(
            &inputs,
            [dir.join("out/densified2"), dir.join("out/report.json")],
        )
        .unwrap();
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn temporary_names_are_recognised_exactly() {
        assert_eq!(
            temporary_owner(
                ".a.safetensors.123.0123456789abcdef.fips-tmp",
                "a.safetensors"
            ),
            Some(123)
        );
        assert_eq!(
            temporary_owner(".a.safetensors.77.tmp", "a.safetensors"),
            Some(77)
        );
        for other in [
            "a.safetensors",
            ".a.safetensors.x.tmp",
            ".a.safetensors.1.2.tmp",
            ".a.safetensors.12.0123.fips-tmp",
            ".b.safetensors.12.tmp",
            ".a.safetensors.12.0123456789abcdeg.fips-tmp",
            ".a.safetensors..tmp",
        ] {
            assert_eq!(temporary_owner(other, "a.safetensors"), None, "{other}");
        }
    }

    #[test]
    fn writes_replace_atomically_keep_permissions_and_leave_nothing() {
        let dir = temp_dir("write");
        let path = dir.join("out.bin");
        write_atomically(&path, b"first").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        }
        write_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o640);
        }
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.bin")]);
        // A failing writer leaves the old file and no temporary.
        let failed = write_atomically_with(&path, |out| {
            out.write_all(b"partial").unwrap();
            Err(FipsError::Numerical("stop".into()))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        assert!(matches!(
            write_atomically(dir.join("missing/x"), b"x"),
            Err(FipsError::Io { .. })
        ));
        std::fs::remove_dir_all(dir).ok();
    }

    #[cfg(unix)]
    #[test]
    fn links_are_never_written_through() {
        let dir = temp_dir("links");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let out = dir.join("out.safetensors");
        // A link planted at the old, predictable temporary name, and a destination that is a link.
        let planted = dir.join(format!(".out.safetensors.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        write_atomically(&out, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        assert!(
            std::fs::symlink_metadata(&planted)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let link = dir.join("link.safetensors");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(matches!(
            write_atomically(&link, b"evil"),
            Err(FipsError::UnsafeOutput { .. })
        ));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn stale_temporaries_of_dead_writers_are_removed_live_ones_kept() {
        let dir = temp_dir("stale");
        // A pid far above any real one on Linux (pid_max ≤ 2^22) is not running.
        let dead = dir.join(".m.safetensors.4294967294.00000000000000aa.fips-tmp");
        let legacy = dir.join(".m.safetensors.4294967293.tmp");
        let mine = dir.join(format!(
            ".m.safetensors.{}.00000000000000bb.fips-tmp",
            std::process::id()
        ));
        let other = dir.join(".n.safetensors.4294967294.tmp");
        for p in [&dead, &legacy, &mine, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        let removed = remove_stale_temporaries(&dir, OsStr::new("m.safetensors"));
        if process_running(4_294_967_294) == Some(false) {
            assert_eq!(removed, 2);
            assert!(!dead.exists() && !legacy.exists());
        }
        assert!(mine.exists() && other.exists());
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn outputs_equal_to_inputs_are_refused() {
        let dir = temp_dir("clash");
        let input = dir.join("model.safetensors");
        std::fs::write(&input, b"weights").unwrap();
        let fresh = dir.join("new.safetensors");
        check_outputs([&input], [&fresh]).unwrap();
        assert!(matches!(
            check_outputs([&input], [&input]),
            Err(FipsError::UnsafeOutput { .. })
        ));
        // Another spelling of the same path.
        let dotted = dir.join(".").join("model.safetensors");
        assert!(check_outputs([&input], [&dotted]).is_err());
        // Two outputs that are one file.
        assert!(check_outputs([&input], [&fresh, &dir.join("./new.safetensors")]).is_err());
        #[cfg(unix)]
        {
            let hard = dir.join("hard.safetensors");
            std::fs::hard_link(&input, &hard).unwrap();
            assert!(check_outputs([&input], [&hard]).is_err());
            let soft = dir.join("soft.safetensors");
            std::os::unix::fs::symlink(&input, &soft).unwrap();
            assert!(check_outputs([&input], [&soft]).is_err());
            // A missing output in a directory reached through a link.
            let dir_link = dir.join("dirlink");
            std::os::unix::fs::symlink(&dir, &dir_link).unwrap();
            assert!(check_outputs([&input], [dir_link.join("model.safetensors")]).is_err());
            assert!(check_outputs([dir_link.join("x")], [dir.join("x")]).is_err());
        }
        std::fs::remove_dir_all(dir).ok();
    }
}
