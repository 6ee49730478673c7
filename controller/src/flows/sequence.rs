//! Per-node flow sequence numbers that outlive the agent: `(epoch, counter)` kept in the
//! state directory, so a restarted agent continues where the last one stopped and never
//! hands out a number twice.
//!
//! The file is 16 bytes, little-endian: the epoch (random, chosen when the file is
//! created), then the next sequence number. The counter is written (one `pwrite`, no
//! fsync) before the records it numbers become visible: a killed agent's page-cache write
//! survives, so its successor starts after every number anyone may have seen. Only losing
//! the file (a reboot empties `/run`) starts a new epoch, which a reader sees as a reset.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The file's name in the state directory.
pub const FILE_NAME: &str = "flow-seq";

/// Why the sequence file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("flow sequence file {path}: {op}")]
pub struct SequenceError {
    /// What was attempted.
    pub op: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

/// The epoch and the next number, and where they are kept.
#[derive(Debug)]
pub struct Sequence {
    epoch: u64,
    next: u64,
    file: Option<File>,
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_err() {
        // Without /dev/urandom the time still tells two epochs apart.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        return now ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_le_bytes(bytes)
}

impl Sequence {
    /// A sequence kept only in memory (tests; an agent without a state directory).
    pub fn in_memory() -> Self {
        Sequence {
            epoch: random_u64(),
            next: 0,
            file: None,
        }
    }

    /// Opens (or creates, with a new epoch) the sequence file in `state_dir`. A file that
    /// is not 16 bytes is replaced by a new epoch: readers then see a reset, never a reuse.
    pub fn open(state_dir: &Path) -> Result<Self, SequenceError> {
        let path = state_dir.join(FILE_NAME);
        let err = |op| {
            let path = path.clone();
            move |source| SequenceError { op, path, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err("open"))?;
        let mut buf = [0u8; 16];
        let (epoch, next) = match file.read_exact_at(&mut buf, 0) {
            Ok(()) => {
                let (e, n) = buf.split_at(8);
                let epoch = u64::from_le_bytes(e.try_into().unwrap_or_default());
                let next = u64::from_le_bytes(n.try_into().unwrap_or_default());
                (epoch, next)
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => (random_u64(), 0),
            Err(e) => return Err(err("read")(e)),
        };
        let mut seq = Sequence {
            epoch,
            next,
            file: Some(file),
        };
        seq.write().map_err(err("write"))?;
        Ok(seq)
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The number the next record gets.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Takes `count` numbers; returns the first. They are on disk when this returns; a
    /// failed write is logged (the numbers are still never reused by this process).
    pub fn take(&mut self, count: u64) -> u64 {
        let first = self.next;
        self.next += count;
        if let Err(e) = self.write() {
            tracing::warn!(error = %e, "cannot persist the flow sequence; a restarted agent may reuse numbers");
        }
        first
    }

    fn write(&mut self) -> std::io::Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        let mut buf = [0u8; 16];
        buf[..8].copy_from_slice(&self.epoch.to_le_bytes());
        buf[8..].copy_from_slice(&self.next.to_le_bytes());
        file.write_all_at(&buf, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_continue_across_reopen_and_a_lost_file_is_a_new_epoch() {
        let dir = std::env::temp_dir().join(format!("bulkhead-seq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut a = Sequence::open(&dir).unwrap();
        assert_eq!(a.take(3), 0);
        assert_eq!(a.take(2), 3);
        let epoch = a.epoch();
        // Not dropped cleanly: a killed agent's writes are in the file already.
        std::mem::forget(a);
        let mut b = Sequence::open(&dir).unwrap();
        assert_eq!((b.epoch(), b.next()), (epoch, 5));
        assert_eq!(b.take(1), 5);
        drop(b);
        std::fs::write(dir.join(FILE_NAME), b"short").unwrap();
        let c = Sequence::open(&dir).unwrap();
        assert_ne!(c.epoch(), epoch, "a damaged file starts a new epoch");
        assert_eq!(c.next(), 0);
        std::fs::remove_file(dir.join(FILE_NAME)).unwrap();
        let d = Sequence::open(&dir).unwrap();
        assert_ne!(d.epoch(), epoch);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
