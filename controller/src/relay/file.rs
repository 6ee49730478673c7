//! The relay's append-only file: every stored record and gap, one JSON object per line,
//! so a restarted relay has its history back and resumes each node exactly where it was.
//!
//! Lines: `{"node","epoch","seq","flow"}` for a record, `{"gap":{…}}` for a gap and
//! `{"cursor":{"node","epoch","seq"}}` for a node whose records have all left the history.
//! The file is rewritten from the history (atomically) once it holds about twice as many
//! lines as the history, so it stays bounded. A torn last line (a kill mid-write) is
//! skipped: its record was not acknowledged anywhere, and the relay asks the agent again.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use bulkhead_api::{Flow, Gap, StreamCursor};
use serde::{Deserialize, Serialize};

use super::store::{Entry, Record, RelayStore};

/// Why the file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("relay store {path}: {op}")]
pub struct FileError {
    /// What was attempted.
    pub op: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

#[derive(Serialize)]
struct FlowLine<'a> {
    node: &'a str,
    epoch: u64,
    seq: u64,
    flow: &'a Flow,
}

#[derive(Serialize)]
struct GapRef<'a> {
    gap: &'a Gap,
}

#[derive(Serialize, Deserialize)]
struct CursorLine {
    node: String,
    epoch: u64,
    seq: u64,
}

#[derive(Serialize)]
struct CursorRef<'a> {
    cursor: &'a CursorLine,
}

/// Any line, read back.
#[derive(Deserialize)]
struct AnyLine {
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    epoch: Option<u64>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    flow: Option<Flow>,
    #[serde(default)]
    gap: Option<Gap>,
    #[serde(default)]
    cursor: Option<CursorLine>,
}

/// The open file.
pub struct RelayFile {
    path: PathBuf,
    out: BufWriter<File>,
    lines: usize,
    capacity: usize,
}

fn line_of(store: &RelayStore, e: &Entry) -> Option<Vec<u8>> {
    let mut line = match &e.record {
        Record::Flow(flow) => serde_json::to_vec(&FlowLine {
            node: store.node_name(e.key.node),
            epoch: e.epoch,
            seq: e.key.seq,
            flow,
        }),
        Record::Gap(gap) => serde_json::to_vec(&GapRef { gap }),
    }
    .ok()?;
    line.push(b'\n');
    Some(line)
}

impl RelayFile {
    /// Reads `path` into `store` (when it exists) and opens it for appending. Returns the
    /// file and how many unreadable lines were skipped.
    pub fn open(path: &Path, store: &mut RelayStore, capacity: usize) -> Result<(Self, usize), FileError> {
        let err = |op| {
            let path = path.to_path_buf();
            move |source| FileError { op, path, source }
        };
        let mut lines = 0;
        let mut skipped = 0;
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).split(b'\n') {
                    let line = line.map_err(err("read"))?;
                    if line.is_empty() {
                        continue;
                    }
                    lines += 1;
                    match serde_json::from_slice::<AnyLine>(&line) {
                        Ok(AnyLine { cursor: Some(c), .. }) => store.restore_cursor(
                            &c.node,
                            StreamCursor {
                                epoch: c.epoch,
                                seq: c.seq,
                            },
                        ),
                        Ok(AnyLine { gap: Some(g), .. }) => {
                            let (node, epoch, from) = (g.node.clone(), g.epoch, g.from);
                            store.restore(&node, epoch, from, Record::Gap(g));
                        }
                        Ok(AnyLine {
                            node: Some(node),
                            epoch: Some(epoch),
                            seq: Some(seq),
                            flow: Some(flow),
                            ..
                        }) => store.restore(&node, epoch, seq, Record::Flow(flow)),
                        _ => skipped += 1,
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("open")(e)),
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(err("open"))?;
        let mut me = RelayFile {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            lines,
            capacity,
        };
        // A torn last line would glue onto the next append: start it on a line of its own.
        if skipped > 0 {
            me.out.write_all(b"\n").map_err(err("write"))?;
        }
        Ok((me, skipped))
    }

    /// Appends an entry (buffered until [`RelayFile::flush`]).
    pub fn append(&mut self, store: &RelayStore, e: &Entry) -> Result<(), FileError> {
        let Some(line) = line_of(store, e) else { return Ok(()) };
        self.lines += 1;
        self.out.write_all(&line).map_err(|source| FileError {
            op: "write",
            path: self.path.clone(),
            source,
        })
    }

    /// Writes what is buffered; rewrites the file from `store` when it has grown to about
    /// twice the history.
    pub fn flush(&mut self, store: &RelayStore) -> Result<(), FileError> {
        let err = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| FileError { op, path, source }
        };
        self.out.flush().map_err(err("write", &self.path))?;
        if self.lines <= self.capacity.saturating_mul(2).saturating_add(1024) {
            return Ok(());
        }
        let tmp = self.path.with_extension("compact");
        let mut out = BufWriter::new(File::create(&tmp).map_err(err("create", &tmp))?);
        let mut lines = 0;
        for (node, c) in store.cursors() {
            let cursor = CursorLine {
                node,
                epoch: c.epoch,
                seq: c.seq,
            };
            let mut line = serde_json::to_vec(&CursorRef { cursor: &cursor }).map_err(|e| err("encode", &tmp)(e.into()))?;
            line.push(b'\n');
            out.write_all(&line).map_err(err("write", &tmp))?;
            lines += 1;
        }
        for e in store.entries() {
            if let Some(line) = line_of(store, e) {
                out.write_all(&line).map_err(err("write", &tmp))?;
                lines += 1;
            }
        }
        let file = out.into_inner().map_err(|e| err("write", &tmp)(e.into_error()))?;
        file.sync_all().map_err(err("sync", &tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(err("rename", &self.path))?;
        let file = OpenOptions::new().append(true).open(&self.path).map_err(err("open", &self.path))?;
        self.out = BufWriter::new(file);
        self.lines = lines;
        Ok(())
    }
}
