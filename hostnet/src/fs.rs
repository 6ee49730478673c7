//! Files that readers must never see half-written: written beside their destination,
//! fsynced, renamed into place, and the directory fsynced so the rename survives a crash.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why an atomic write failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}")]
pub struct WriteError {
    /// What was attempted.
    pub op: &'static str,
    /// The file or directory involved.
    pub path: PathBuf,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

/// Whether [`write_atomic_if_changed`] had to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The file was written.
    Written,
    /// It already held exactly these bytes with this mode.
    Unchanged,
}

/// Replaces `path` with `bytes` (mode `mode`) atomically: readers see the old file or the
/// new one, never a mix, and after a crash the new one or the old one. The temporary file
/// is a uniquely named dot file in the same directory (a runtime only reads `*.conf`-like
/// names, and two writers never share one); it is removed on any failure.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    let err = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteError { op, path, source }
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(err("create directory", dir))?;
    let prefix = format!(".{}.", path.file_name().unwrap_or_default().to_string_lossy());
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(err("create a temporary file in", dir))?;
    tmp.write_all(bytes).map_err(err("write", tmp.path()))?;
    // The umask may have narrowed the mode given at creation.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err("chmod", tmp.path()))?;
    tmp.as_file().sync_all().map_err(err("fsync", tmp.path()))?;
    tmp.persist(path).map_err(|e| WriteError {
        op: "rename into place",
        path: path.to_path_buf(),
        source: e.error,
    })?;
    // The rename is durable only once the directory entry is.
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err("fsync", dir))
}

/// [`write_atomic`], unless `path` already holds exactly `bytes` with `mode`.
pub fn write_atomic_if_changed(path: &Path, bytes: &[u8], mode: u32) -> Result<Outcome, WriteError> {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.is_file() && meta.permissions().mode() & 0o7777 == mode && std::fs::read(path).is_ok_and(|b| b == bytes) {
            return Ok(Outcome::Unchanged);
        }
    }
    write_atomic(path, bytes, mode).map(|()| Outcome::Written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(name).tempdir().unwrap()
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = scratch("bh-fs-");
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o644);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
    }

    #[test]
    fn unchanged_content_is_not_rewritten() {
        let dir = scratch("bh-fs-");
        let path = dir.path().join("b");
        assert_eq!(write_atomic_if_changed(&path, b"x", 0o644).unwrap(), Outcome::Written);
        assert_eq!(write_atomic_if_changed(&path, b"x", 0o644).unwrap(), Outcome::Unchanged);
        assert_eq!(write_atomic_if_changed(&path, b"x", 0o600).unwrap(), Outcome::Written);
        assert_eq!(write_atomic_if_changed(&path, b"y", 0o600).unwrap(), Outcome::Written);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = scratch("bh-fs-");
        // The destination is a non-empty directory: the rename fails after the data is written.
        let path = dir.path().join("c");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inner"), b"keep").unwrap();
        let e = write_atomic(&path, b"new", 0o644).unwrap_err();
        assert_eq!(e.op, "rename into place");
        assert_eq!(std::fs::read(path.join("inner")).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "the temporary file is removed");
    }
}
