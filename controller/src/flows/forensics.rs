//! The forensic store: the flows of deleted and quarantined pods, kept on disk beyond the
//! in-memory history (bounded), so `bulkhead observe --pod` and `bulkhead forensics` still
//! answer after the pod is gone and after the agent restarts.
//!
//! One file per pod under `<state-dir>/forensics/`, named `<namespace>_<pod>.jsonl` (bytes
//! other than `[A-Za-z0-9.-]` written as `%XX`). Each line is one JSON object: a pod record
//! `{"record":{…}}` (a [`ForensicsBundle`] without flows or anomalies; the last one wins) or a
//! flow `{"epoch","seq","flow"}` (its node's sequence number: the same flow seen again is kept
//! once). A pod's deletion rewrites its file atomically; a quarantined pod's new flows are
//! appended as they arrive. A last line without its newline is a torn write (a kill
//! mid-append) and is skipped; any other line that does not parse makes the file
//! unreadable: it is logged, counted (`bulkhead_forensics_errors_total{op="corrupt"}`) and
//! every question about that pod is answered with an error naming the file, never as if
//! nothing were kept.
//!
//! Bounds ([`Limits`]): at most `records_per_pod` flows per pod (the newest), at most
//! `pods` files and `bytes` in all; past those, the pod written least recently is evicted
//! first (`bulkhead_forensics_evicted_total`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bulkhead_api::{Flow, FlowFilter, ForensicsBundle, NamespacedName, QuarantineInfo};
use serde::{Deserialize, Serialize};

use crate::model::Cluster;
use crate::policy::evaluate::isolation;
use crate::policy::identity::Direction;

/// The store's directory in the agent's state directory.
pub const DIR_NAME: &str = "forensics";
/// A pod file's extension.
const EXTENSION: &str = "jsonl";

/// How much the store keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Flows kept per pod (the newest).
    pub records_per_pod: usize,
    /// Pods kept.
    pub pods: usize,
    /// Bytes on disk in all.
    pub bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            records_per_pod: 4096,
            pods: 512,
            bytes: 64 << 20,
        }
    }
}

/// Why the forensic store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum ForensicsError {
    /// A file or directory operation failed.
    #[error("forensic store {path}: {op}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An atomic rewrite failed.
    #[error("forensic store: rewrite")]
    Write(#[from] bulkhead_hostnet::fs::WriteError),
    /// A record could not be encoded.
    #[error("forensic record {path}: encode")]
    Encode {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A pod's file is kept but cannot be read: nothing about the pod is answered from it.
    #[error("forensic record {path} of {pod} cannot be read: {reason}")]
    Unreadable {
        /// The pod.
        pod: NamespacedName,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl ForensicsError {
    /// The `op` label of `bulkhead_forensics_errors_total`.
    pub fn op(&self) -> &'static str {
        match self {
            ForensicsError::Io { .. } | ForensicsError::Write(_) | ForensicsError::Encode { .. } => "write",
            ForensicsError::Unreadable { .. } => "read",
        }
    }
}

/// A kept flow with its node's sequence number.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeptFlow {
    /// The sequence's epoch on the reporting node.
    pub epoch: u64,
    /// The sequence number.
    pub seq: u64,
    /// The flow.
    pub flow: Flow,
}

impl KeptFlow {
    fn key(&self) -> (u64, u64) {
        (self.epoch, self.seq)
    }
}

/// Orders flows by time (then sequence) and keeps each sequence number once.
pub fn merge(flows: &mut Vec<KeptFlow>) {
    flows.sort_by_key(|a| (a.flow.time, a.epoch, a.seq));
    let mut seen = BTreeSet::new();
    flows.retain(|f| seen.insert(f.key()));
}

#[derive(Serialize)]
struct RecordRef<'a> {
    record: &'a ForensicsBundle,
}

/// Any line of a pod file.
#[derive(Deserialize)]
struct AnyLine {
    #[serde(default)]
    record: Option<ForensicsBundle>,
    #[serde(default)]
    epoch: Option<u64>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    flow: Option<Flow>,
}

/// A pod file read back.
#[derive(Debug)]
struct Parsed {
    record: ForensicsBundle,
    flows: Vec<KeptFlow>,
    lines: usize,
    torn: bool,
}

/// Reads a pod file's text: a torn last line is skipped, anything else wrong is an error.
fn parse(text: &[u8]) -> Result<Parsed, String> {
    let mut record = None;
    let mut flows = Vec::new();
    let mut lines = 0;
    let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let torn = complete < text.len();
    for (n, line) in text[..complete].split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        lines += 1;
        let any: AnyLine = serde_json::from_slice(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        match any {
            AnyLine { record: Some(r), .. } => record = Some(r),
            AnyLine {
                epoch: Some(epoch),
                seq: Some(seq),
                flow: Some(flow),
                ..
            } => flows.push(KeptFlow { epoch, seq, flow }),
            _ => return Err(format!("line {}: neither a pod record nor a flow", n + 1)),
        }
    }
    let record = record.ok_or_else(|| "no pod record".to_string())?;
    merge(&mut flows);
    Ok(Parsed {
        record,
        flows,
        lines,
        torn,
    })
}

/// A pod file's name: `<namespace>_<pod>.jsonl`, bytes outside `[A-Za-z0-9.-]` as `%XX`.
pub fn file_name(pod: &NamespacedName) -> String {
    fn escape(out: &mut String, text: &str) {
        for b in text.bytes() {
            if b.is_ascii_alphanumeric() || b == b'-' || (b == b'.' && !out.is_empty()) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    let mut out = String::new();
    escape(&mut out, &pod.namespace);
    out.push('_');
    escape(&mut out, &pod.name);
    out.push('.');
    out.push_str(EXTENSION);
    out
}

/// The pod a file name stands for, if it is one of ours.
fn pod_of(file: &str) -> Option<NamespacedName> {
    fn unescape(text: &str) -> Option<String> {
        let mut out = Vec::new();
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).ok()
    }
    let stem = file.strip_suffix(EXTENSION)?.strip_suffix('.')?;
    let (ns, name) = stem.split_once('_')?;
    Some(NamespacedName::new(unescape(ns)?, unescape(name)?))
}

/// What the store knows of one pod's file.
#[derive(Clone, Debug)]
struct Entry {
    path: PathBuf,
    bytes: u64,
    lines: usize,
    /// When it was last written (Unix ns): eviction goes oldest first.
    written: i128,
    /// Why it cannot be read, if it cannot.
    unreadable: Option<String>,
}

#[derive(Default)]
struct Inner {
    pods: BTreeMap<NamespacedName, Entry>,
    /// Quarantined pods whose new flows are appended as they arrive.
    kept: BTreeMap<NamespacedName, QuarantineInfo>,
    /// Deleted pods whose record could not be written yet: retried.
    pending: BTreeMap<NamespacedName, (ForensicsBundle, Vec<KeptFlow>)>,
    stats: ForensicStats,
}

/// Counts for metrics and tests; a snapshot from [`ForensicStore::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForensicStats {
    /// Pods with a file.
    pub pods: usize,
    /// Bytes in all files.
    pub bytes: u64,
    /// Pods evicted to stay within the limits.
    pub evicted: u64,
    /// Errors by op: `read` (a question about an unreadable file), `write`, `corrupt` (a
    /// file found unreadable).
    pub errors: BTreeMap<&'static str, u64>,
    /// Torn last lines skipped.
    pub torn: u64,
    /// Deleted pods whose record waits for a retry.
    pub pending: usize,
}

/// The forensic store of one agent.
pub struct ForensicStore {
    dir: PathBuf,
    limits: Limits,
    inner: Mutex<Inner>,
    /// Some pod is kept (quarantined): new flows are checked against them.
    watching: AtomicBool,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ns() -> i128 {
    jiff::Timestamp::now().as_nanosecond()
}

fn encode_line(path: &Path, out: &mut Vec<u8>, value: &impl Serialize) -> Result<(), ForensicsError> {
    serde_json::to_writer(&mut *out, value).map_err(|source| ForensicsError::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    out.push(b'\n');
    Ok(())
}

/// What a pod's record says when it holds no flows: the bundle's identity fields only.
fn bare(record: &ForensicsBundle) -> ForensicsBundle {
    ForensicsBundle {
        flows: Vec::new(),
        anomalies: Vec::new(),
        ..record.clone()
    }
}

impl ForensicStore {
    /// Opens the store in `dir` (created if missing), reading what every pod file holds.
    /// Files that cannot be read are kept, logged and counted, and answered as errors.
    pub fn open(dir: &Path, limits: Limits, metrics: Option<Arc<crate::metrics::Metrics>>) -> Result<Self, ForensicsError> {
        let io = |op| {
            let path = dir.to_path_buf();
            move |source| ForensicsError::Io { op, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("create"))?;
        let store = ForensicStore {
            dir: dir.to_path_buf(),
            limits,
            inner: Mutex::new(Inner::default()),
            watching: AtomicBool::new(false),
            metrics,
        };
        let mut inner = lock(&store.inner);
        for entry in std::fs::read_dir(dir).map_err(io("list"))? {
            let entry = entry.map_err(io("list"))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            // Dot files are write_atomic's temporaries (a rewrite cut short).
            if file.starts_with('.') {
                continue;
            }
            let Some(pod) = pod_of(&file) else {
                tracing::warn!(file = %entry.path().display(), "not a forensic record; left alone");
                continue;
            };
            let path = entry.path();
            let written = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| jiff::Timestamp::try_from(t).ok())
                .map_or(0, |t| t.as_nanosecond());
            let (bytes, lines, unreadable) = match std::fs::read(&path) {
                Ok(text) => match parse(&text) {
                    Ok(p) if p.record.pod == pod => {
                        if p.torn {
                            inner.stats.torn += 1;
                            tracing::info!(file = %path.display(), "forensic record ends in a torn line; skipped");
                        }
                        (text.len() as u64, p.lines, None)
                    }
                    Ok(p) => (text.len() as u64, p.lines, Some(format!("it holds the record of {}", p.record.pod))),
                    Err(reason) => (text.len() as u64, 0, Some(reason)),
                },
                Err(e) => (0, 0, Some(e.to_string())),
            };
            if let Some(reason) = &unreadable {
                store.count_error(&mut inner, "corrupt");
                tracing::warn!(file = %path.display(), %pod, %reason, "forensic record cannot be read; questions about this pod fail until it is replaced or evicted");
            }
            inner.pods.insert(
                pod,
                Entry {
                    path,
                    bytes,
                    lines,
                    written,
                    unreadable,
                },
            );
        }
        store.evict(&mut inner, None);
        store.publish(&mut inner);
        drop(inner);
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn count_error(&self, inner: &mut Inner, op: &'static str) {
        *inner.stats.errors.entry(op).or_default() += 1;
        if let Some(m) = &self.metrics {
            m.forensics_error(op);
        }
    }

    fn publish(&self, inner: &mut Inner) {
        inner.stats.pods = inner.pods.len();
        inner.stats.bytes = inner.pods.values().map(|e| e.bytes).sum();
        inner.stats.pending = inner.pending.len();
        if let Some(m) = &self.metrics {
            m.set_forensics(inner.stats.pods, inner.stats.bytes);
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ForensicStats {
        lock(&self.inner).stats.clone()
    }

    /// Whether some pod is kept (quarantined).
    pub fn watching(&self) -> bool {
        self.watching.load(Ordering::Relaxed)
    }

    /// The pods whose flows are kept as they arrive, and their quarantine.
    pub fn kept(&self) -> BTreeMap<NamespacedName, QuarantineInfo> {
        lock(&self.inner).kept.clone()
    }

    /// The pods with a record on disk.
    pub fn pods(&self) -> Vec<NamespacedName> {
        lock(&self.inner).pods.keys().cloned().collect()
    }

    /// Evicts the least recently written pods (never `keep`) until within the limits.
    fn evict(&self, inner: &mut Inner, keep: Option<&NamespacedName>) {
        loop {
            let bytes: u64 = inner.pods.values().map(|e| e.bytes).sum();
            if inner.pods.len() <= self.limits.pods && bytes <= self.limits.bytes {
                return;
            }
            let oldest = inner
                .pods
                .iter()
                .filter(|(p, _)| Some(*p) != keep)
                .min_by_key(|(_, e)| e.written)
                .map(|(p, _)| p.clone());
            let Some(pod) = oldest else { return };
            let Some(entry) = inner.pods.remove(&pod) else { return };
            match std::fs::remove_file(&entry.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    // Still on disk: counted and kept in the index, so the bound holds.
                    self.count_error(inner, "write");
                    tracing::warn!(file = %entry.path.display(), error = %e, "cannot evict a forensic record");
                    inner.pods.insert(pod, entry);
                    return;
                }
                _ => {}
            }
            inner.stats.evicted += 1;
            if let Some(m) = &self.metrics {
                m.forensics_evicted();
            }
            tracing::info!(%pod, bytes = entry.bytes, "forensic record evicted (oldest first)");
        }
    }

    /// Reads a pod's file as the index knows it: `None` when nothing is kept.
    fn read_locked(&self, inner: &mut Inner, pod: &NamespacedName) -> Result<Option<Parsed>, ForensicsError> {
        let Some(entry) = inner.pods.get(pod) else {
            return Ok(None);
        };
        let unreadable = |reason: String| ForensicsError::Unreadable {
            pod: pod.clone(),
            path: entry.path.clone(),
            reason,
        };
        let result = match &entry.unreadable {
            Some(reason) => Err(unreadable(reason.clone())),
            None => match std::fs::read(&entry.path) {
                Ok(text) => parse(&text).map(Some).map_err(unreadable),
                Err(e) => Err(unreadable(e.to_string())),
            },
        };
        if result.is_err() {
            self.count_error(inner, "read");
        }
        result
    }

    /// Rewrites a pod's file atomically with `record` and `flows` (the newest within the
    /// limit), then evicts others past the limits.
    fn rewrite(&self, inner: &mut Inner, record: &ForensicsBundle, mut flows: Vec<KeptFlow>) -> Result<(), ForensicsError> {
        let pod = record.pod.clone();
        let path = self.dir.join(file_name(&pod));
        merge(&mut flows);
        flows.drain(..flows.len().saturating_sub(self.limits.records_per_pod));
        let mut text = Vec::new();
        encode_line(&path, &mut text, &RecordRef { record: &bare(record) })?;
        for f in &flows {
            encode_line(&path, &mut text, f)?;
        }
        bulkhead_hostnet::fs::write_atomic(&path, &text, 0o600)?;
        inner.pods.insert(
            pod.clone(),
            Entry {
                path,
                bytes: text.len() as u64,
                lines: flows.len() + 1,
                written: now_ns(),
                unreadable: None,
            },
        );
        self.evict(inner, Some(&pod));
        self.publish(inner);
        Ok(())
    }

    /// What is on disk for `pod` merged with `record` and `flows`; an unreadable file is
    /// replaced (logged: its content is lost).
    fn merged(&self, inner: &mut Inner, pod: &NamespacedName, flows: &mut Vec<KeptFlow>) {
        match self.read_locked(inner, pod) {
            Ok(Some(old)) => flows.extend(old.flows),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %crate::error_chain(&e), "replacing an unreadable forensic record"),
        }
    }

    /// Keeps a deleted pod's record and flows (merged with what is already kept for it).
    /// A failure is logged, counted and kept for [`ForensicStore::retry`].
    pub fn save_deleted(&self, record: ForensicsBundle, mut flows: Vec<KeptFlow>) -> Result<(), ForensicsError> {
        let mut inner = lock(&self.inner);
        let pod = record.pod.clone();
        let mut record = record;
        if let Some(q) = inner.kept.remove(&pod) {
            record.quarantine.get_or_insert(q);
            self.watching.store(!inner.kept.is_empty(), Ordering::Relaxed);
        }
        self.merged(&mut inner, &pod, &mut flows);
        let result = self.rewrite(&mut inner, &record, flows.clone());
        match &result {
            Ok(()) => {
                inner.pending.remove(&pod);
            }
            Err(e) => {
                self.count_error(&mut inner, e.op());
                tracing::warn!(%pod, error = %crate::error_chain(e), "cannot keep the flows of a deleted pod; retried");
                inner.pending.insert(pod, (record, flows));
            }
        }
        self.publish(&mut inner);
        result
    }

    /// Retries the records that could not be written; returns how many are still waiting.
    pub fn retry(&self) -> usize {
        let pending: Vec<_> = std::mem::take(&mut lock(&self.inner).pending).into_values().collect();
        for (record, flows) in pending {
            // A failure puts it back (and is logged and counted there).
            let _ = self.save_deleted(record, flows);
        }
        lock(&self.inner).pending.len()
    }

    /// The seam quarantine calls: from now on `record.pod`'s flows are kept on disk as they
    /// arrive ([`ForensicStore::append`]), starting with `flows` (what the history holds);
    /// until [`ForensicStore::release`] or its deletion.
    pub fn keep(&self, mut record: ForensicsBundle, quarantine: QuarantineInfo, mut flows: Vec<KeptFlow>) -> Result<(), ForensicsError> {
        let mut inner = lock(&self.inner);
        let pod = record.pod.clone();
        record.quarantine = Some(quarantine.clone());
        inner.kept.insert(pod.clone(), quarantine);
        self.watching.store(true, Ordering::Relaxed);
        self.merged(&mut inner, &pod, &mut flows);
        let result = self.rewrite(&mut inner, &record, flows);
        if let Err(e) = &result {
            self.count_error(&mut inner, e.op());
        }
        result
    }

    /// Stops keeping `pod`'s new flows (its quarantine was lifted); what is kept stays,
    /// with the record's quarantine cleared.
    pub fn release(&self, pod: &NamespacedName) -> Result<(), ForensicsError> {
        let mut inner = lock(&self.inner);
        if inner.kept.remove(pod).is_none() {
            return Ok(());
        }
        self.watching.store(!inner.kept.is_empty(), Ordering::Relaxed);
        let result = match self.read_locked(&mut inner, pod) {
            Ok(Some(old)) => {
                let record = ForensicsBundle {
                    quarantine: None,
                    ..old.record
                };
                self.rewrite(&mut inner, &record, old.flows)
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.count_error(&mut inner, e.op());
        }
        result
    }

    /// Appends the flows of kept pods among `flows` to their files (as they arrive); a file
    /// past its limit is compacted to the newest flows. Failures are logged and counted.
    pub fn append(&self, flows: &[KeptFlow]) {
        if !self.watching() {
            return;
        }
        let mut inner = lock(&self.inner);
        let kept: Vec<NamespacedName> = inner.kept.keys().cloned().collect();
        for pod in kept {
            let filter = FlowFilter {
                pod: Some(pod.clone()),
                ..FlowFilter::default()
            };
            let mine: Vec<&KeptFlow> = flows.iter().filter(|f| filter.matches(&f.flow)).collect();
            if mine.is_empty() {
                continue;
            }
            if let Err(e) = self.append_pod(&mut inner, &pod, &mine) {
                self.count_error(&mut inner, e.op());
                tracing::warn!(%pod, error = %crate::error_chain(&e), "cannot keep the flows of a quarantined pod");
            }
        }
        self.publish(&mut inner);
    }

    fn append_pod(&self, inner: &mut Inner, pod: &NamespacedName, flows: &[&KeptFlow]) -> Result<(), ForensicsError> {
        let Some(entry) = inner.pods.get(pod).filter(|e| e.unreadable.is_none()).cloned() else {
            // No readable file (evicted, or never written): start one from what arrives.
            let record = ForensicsBundle {
                pod: pod.clone(),
                labels: BTreeMap::new(),
                ip: None,
                node: None,
                deleted: None,
                quarantine: inner.kept.get(pod).cloned(),
                policies: Vec::new(),
                flows: Vec::new(),
                anomalies: Vec::new(),
            };
            return self.rewrite(inner, &record, flows.iter().map(|f| (*f).clone()).collect());
        };
        let mut text = Vec::new();
        for f in flows {
            encode_line(&entry.path, &mut text, f)?;
        }
        let io = |op| {
            let path = entry.path.clone();
            move |source| ForensicsError::Io { op, path, source }
        };
        std::fs::OpenOptions::new()
            .append(true)
            .open(&entry.path)
            .and_then(|mut f| f.write_all(&text))
            .map_err(io("append"))?;
        let lines = entry.lines + flows.len();
        if let Some(e) = inner.pods.get_mut(pod) {
            e.bytes += text.len() as u64;
            e.lines = lines;
            e.written = now_ns();
        }
        // A quarter over the limit before compacting, so appends do not rewrite each time.
        if lines > self.limits.records_per_pod + self.limits.records_per_pod / 4 + 1 {
            if let Some(old) = self.read_locked(inner, pod)? {
                self.rewrite(inner, &old.record, old.flows)?;
            }
        }
        self.evict(inner, Some(pod));
        Ok(())
    }

    /// What is kept for `pod`: its record (without flows) and its flows, oldest first.
    pub fn read(&self, pod: &NamespacedName) -> Result<Option<(ForensicsBundle, Vec<KeptFlow>)>, ForensicsError> {
        let mut inner = lock(&self.inner);
        if let Some((record, flows)) = inner.pending.get(pod) {
            return Ok(Some((bare(record), flows.clone())));
        }
        Ok(self.read_locked(&mut inner, pod)?.map(|p| (p.record, p.flows)))
    }

    /// The kept flows `filter` names by pod (`pod`, `from_pod`, `to_pod`) that match it;
    /// empty when it names no pod.
    pub fn flows_for(&self, filter: &FlowFilter) -> Result<Vec<KeptFlow>, ForensicsError> {
        let pods: BTreeSet<&NamespacedName> = [&filter.pod, &filter.from_pod, &filter.to_pod].into_iter().flatten().collect();
        let mut out = Vec::new();
        for pod in pods {
            if let Some((_, flows)) = self.read(pod)? {
                out.extend(flows.into_iter().filter(|f| filter.matches(&f.flow)));
            }
        }
        merge(&mut out);
        Ok(out)
    }
}

/// A live pod's record from the model: labels, address, node, and the policies that select
/// it (ingress or egress, enforcing or audit), with no flows.
pub fn describe(cluster: &Cluster, pod: &NamespacedName) -> Option<ForensicsBundle> {
    let info = cluster.pod(&pod.namespace, &pod.name)?;
    let labels = crate::model::pod_labels(info);
    let mut policies = BTreeSet::new();
    for dir in [Direction::Ingress, Direction::Egress] {
        let iso = isolation(cluster, &pod.namespace, &labels, dir);
        for (ns, name) in iso.enforcing.into_iter().chain(iso.audit) {
            policies.insert(NamespacedName::new(ns, name));
        }
    }
    Some(ForensicsBundle {
        pod: pod.clone(),
        labels,
        ip: info.ipv4,
        node: info.node.as_deref().map(str::to_string),
        deleted: None,
        quarantine: None,
        policies: policies.into_iter().collect(),
        flows: Vec::new(),
        anomalies: Vec::new(),
    })
}

#[cfg(test)]
#[path = "forensics_tests.rs"]
mod tests;
