//! The files source: a directory of manifests, what the lab and file deployments use.
//!
//! Each poll lists the directory and re-reads only the files whose stamp (modification and
//! change times, size, inode) moved; the objects they no longer hold are deleted, the others
//! applied. The model is the one a full re-read would give: every `*.yaml`/`*.yml` file in
//! name order, an object defined twice taken from the last file (and the last document) that
//! defines it. A file that cannot be read or parsed fails the poll and changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Change, Source, SourceError, SourceUpdate};
use crate::model::{parse_documents, Cluster, Object, ObjectRef};

/// What tells a file's new contents from its old: a rewrite in place moves the change time
/// (nanoseconds) and an atomic replacement the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: (i64, i64),
    changed: (i64, i64),
    len: u64,
    inode: (u64, u64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            modified: (meta.mtime(), meta.mtime_nsec()),
            changed: (meta.ctime(), meta.ctime_nsec()),
            len: meta.len(),
            inode: (meta.dev(), meta.ino()),
        }
    }
}

/// What the source remembers of one file: its stamp and the objects it defines, in
/// document order (the parsed objects themselves live only in the model).
#[derive(Debug)]
struct FileState {
    stamp: Stamp,
    refs: Vec<ObjectRef>,
}

/// Every `*.yaml`/`*.yml` file of a directory, multi-document, read in name order.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    /// The files as last delivered; `None` before the first successful poll.
    files: Option<BTreeMap<Arc<Path>, FileState>>,
    /// Which files define each object; the last one (in name order) wins.
    defined_in: BTreeMap<ObjectRef, Definers>,
}

/// The files that define one object, in name order: nearly always one, so a sorted vector
/// (one small allocation) rather than a set.
#[derive(Debug, Default)]
struct Definers(Vec<Arc<Path>>);

impl Definers {
    fn insert(&mut self, path: Arc<Path>) {
        if let Err(at) = self.0.binary_search(&path) {
            self.0.insert(at, path);
        }
    }

    fn remove(&mut self, path: &Arc<Path>) {
        if let Ok(at) = self.0.binary_search(path) {
            self.0.remove(at);
        }
    }

    /// The winning file: the last in name order.
    fn last(&self) -> Option<&Arc<Path>> {
        self.0.last()
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<Path>> {
        self.0.iter()
    }
}

impl FileSource {
    /// Watches `dir`.
    pub fn new(dir: &Path) -> Self {
        FileSource {
            dir: dir.to_path_buf(),
            files: None,
            defined_in: BTreeMap::new(),
        }
    }

    fn list(&self) -> Result<BTreeMap<PathBuf, Stamp>, SourceError> {
        let read = |source| SourceError::Read {
            path: self.dir.clone(),
            source,
        };
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(read)? {
            let path = entry.map_err(read)?.path();
            let yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
            if !yaml {
                continue;
            }
            let meta = std::fs::metadata(&path).map_err(|source| SourceError::Read {
                path: path.clone(),
                source,
            })?;
            files.insert(path, Stamp::of(&meta));
        }
        Ok(files)
    }

    /// The first poll: every file read, the whole model delivered.
    fn snapshot(&mut self, listing: BTreeMap<PathBuf, Stamp>) -> Result<SourceUpdate, SourceError> {
        let mut objects = Vec::new();
        let mut files = BTreeMap::new();
        for (path, stamp) in listing {
            let parsed = read(&path)?;
            let refs = parsed.iter().map(Object::to_ref).collect();
            objects.extend(parsed);
            files.insert(Arc::from(path), FileState { stamp, refs });
        }
        self.defined_in = index(&files);
        self.files = Some(files);
        Ok(SourceUpdate::Snapshot(Box::new(Cluster::from_objects(objects))))
    }
}

fn read(path: &Path) -> Result<Vec<Object>, SourceError> {
    let text = std::fs::read_to_string(path).map_err(|source| SourceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_documents(&text, &path.display().to_string())?)
}

fn index(files: &BTreeMap<Arc<Path>, FileState>) -> BTreeMap<ObjectRef, Definers> {
    let mut defined_in: BTreeMap<ObjectRef, Definers> = BTreeMap::new();
    for (path, file) in files {
        for r in &file.refs {
            defined_in.entry(r.clone()).or_default().insert(path.clone());
        }
    }
    defined_in
}

/// The last definition of `r` among `objects` (a file may define an object twice).
fn last_definition(objects: &[Object], r: &ObjectRef) -> Option<Object> {
    objects
        .iter()
        .rev()
        .find(|o| o.kind() == r.kind && o.name() == r.name && o.namespace() == r.namespace.as_deref())
        .cloned()
}

impl Source for FileSource {
    fn poll(&mut self, _force: bool) -> Result<Option<SourceUpdate>, SourceError> {
        let listing = self.list()?;
        let Some(files) = &self.files else {
            return self.snapshot(listing).map(Some);
        };
        let changed: Vec<&PathBuf> = listing
            .iter()
            .filter(|(path, stamp)| files.get(path.as_path()).is_none_or(|f| f.stamp != **stamp))
            .map(|(path, _)| path)
            .collect();
        let removed: Vec<Arc<Path>> = files.keys().filter(|p| !listing.contains_key(&***p)).cloned().collect();
        if changed.is_empty() && removed.is_empty() {
            return Ok(None);
        }
        // Everything is read before anything changes: one bad file fails the whole poll.
        let mut parsed: BTreeMap<Arc<Path>, Vec<Object>> = BTreeMap::new();
        for path in changed {
            let objects = read(path)?;
            let key = files
                .get_key_value(path.as_path())
                .map_or_else(|| Arc::from(path.as_path()), |(k, _)| k.clone());
            parsed.insert(key, objects);
        }

        // The objects whose winning definition may have moved or changed.
        let mut affected: BTreeSet<ObjectRef> = BTreeSet::new();
        for path in parsed.keys().chain(&removed) {
            if let Some(old) = files.get(path) {
                affected.extend(old.refs.iter().cloned());
            }
        }
        for objects in parsed.values() {
            affected.extend(objects.iter().map(Object::to_ref));
        }
        // Each one's winning file before and after, worked out before anything changes.
        let replaced = |path: &Arc<Path>| parsed.contains_key(path) || removed.contains(path);
        let mut defines: BTreeMap<&ObjectRef, BTreeSet<Arc<Path>>> = BTreeMap::new();
        for (path, objects) in &parsed {
            for o in objects {
                if let Some(r) = affected.get(&o.to_ref()) {
                    defines.entry(r).or_default().insert(path.clone());
                }
            }
        }
        let mut winners = Vec::new();
        let mut reread: BTreeMap<Arc<Path>, Vec<Object>> = BTreeMap::new();
        for r in &affected {
            let before = self.defined_in.get(r);
            let old = before.and_then(|s| s.last().cloned());
            let kept = before.into_iter().flat_map(Definers::iter).filter(|p| !replaced(p));
            let new = kept.chain(defines.get(r).into_iter().flatten()).max().cloned();
            if let Some(path) = &new {
                // An unchanged file wins again (a later definition went): read it again.
                if !parsed.contains_key(path) && old.as_ref() != Some(path) && !reread.contains_key(path) {
                    reread.insert(path.clone(), read(path)?);
                }
            }
            winners.push((r, old, new));
        }

        let mut deletes = Vec::new();
        let mut applies = Vec::new();
        for (r, old, new) in winners {
            match new {
                None if old.is_some() => deletes.push(Change::Delete(r.clone())),
                None => {}
                // Its file is unchanged and it won before: nothing to deliver.
                Some(path) if old.as_ref() == Some(&path) && !parsed.contains_key(&path) => {}
                Some(path) => {
                    let objects = parsed.get(&path).or_else(|| reread.get(&path));
                    applies.extend(objects.and_then(|o| last_definition(o, r)).map(|o| Change::Apply(Box::new(o))));
                }
            }
        }

        // Only now the file table and the index move to the new state.
        let Some(files) = self.files.as_mut() else {
            return Ok(None);
        };
        for path in parsed.keys().chain(&removed) {
            if let Some(old) = files.remove(path) {
                for r in old.refs {
                    if let Some(set) = self.defined_in.get_mut(&r) {
                        set.remove(path);
                        if set.0.is_empty() {
                            self.defined_in.remove(&r);
                        }
                    }
                }
            }
        }
        for (path, objects) in parsed {
            let refs: Vec<ObjectRef> = objects.iter().map(Object::to_ref).collect();
            for r in &refs {
                self.defined_in.entry(r.clone()).or_default().insert(path.clone());
            }
            if let Some(stamp) = listing.get(&*path) {
                files.insert(path, FileState { stamp: *stamp, refs });
            }
        }
        deletes.extend(applies);
        Ok((!deletes.is_empty()).then_some(SourceUpdate::Changes(deletes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Removes its directory when dropped, whether the test passed or not.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn snapshot(update: Option<SourceUpdate>) -> Cluster {
        match update {
            Some(SourceUpdate::Snapshot(cluster)) => *cluster,
            other => panic!("expected a first model, got {other:?}"),
        }
    }

    fn temp_dir(name: &str) -> TempDir {
        let dir = TempDir(std::env::temp_dir().join(format!("bulkhead-files-{name}-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        dir
    }

    /// The model a fresh source reads from the directory: what a full re-read gives.
    fn full_read(dir: &Path) -> Result<Cluster, SourceError> {
        FileSource::new(dir).poll(false).map(snapshot)
    }

    /// One document of the pool the random edits draw from: namespaces with and without
    /// labels, pods and policies in them (and in the default namespace), a node, and an
    /// EndpointSlice that is IPv4 or IPv6 under one name.
    fn document(n: u64) -> String {
        let v = n / 16;
        match n % 16 {
            0 => format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: x, labels: {{team: t{}}}}}\n",
                v % 3
            ),
            1 => "apiVersion: v1\nkind: Namespace\nmetadata: {name: y}\n".into(),
            2..=7 => format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{}, namespace: {}, labels: {{app: a{}}}}}\n\
                 spec: {{nodeName: n{}, containers: [{{name: c, ports: [{{name: http, containerPort: {}}}]}}]}}\n\
                 status: {{podIP: 10.0.0.{}}}\n",
                n % 16,
                ["x", "y", "default"][(n % 3) as usize],
                v % 2,
                v % 2,
                80 + v % 2,
                n % 16
            ),
            8..=11 => format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np{}, namespace: {}}}\n\
                 spec: {{podSelector: {{matchLabels: {{app: a{}}}}}}}\n",
                n % 4,
                ["x", "y", "z"][(n % 3) as usize],
                v % 2
            ),
            12 => format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\nspec: {{podCIDR: 10.244.{}.0/24}}\n",
                v % 2
            ),
            13 => format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s, namespace: w}}\n\
                 addressType: {}\nendpoints: [{{addresses: [{}]}}]\n",
                ["IPv4", "IPv6"][(v % 2) as usize],
                ["10.1.0.1", "\"fd00::1\""][(v % 2) as usize]
            ),
            14 => "apiVersion: v1\nkind: Pod\nmetadata: {name: lone, namespace: z}\n".into(),
            _ => "apiVersion: v1\nkind: Service\nmetadata: {name: svc, namespace: y}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n"
                .into(),
        }
    }

    /// Random edits of a few files (rewrites in place and atomic, removals, broken files):
    /// after each, the model the changes build equals a full re-read, and a broken file
    /// fails the poll and changes nothing.
    #[test]
    fn changes_build_the_model_a_full_re_read_gives() {
        let dir = temp_dir("incremental");
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut source = FileSource::new(&dir.0);
        let mut model = snapshot(source.poll(false).expect("an empty directory"));
        assert_eq!(model, Cluster::new());
        let mut broken: Option<PathBuf> = None;
        for step in 0..400 {
            let file = dir.0.join(format!("{}.yaml", ["a", "b", "c", "d", "e"][(next() % 5) as usize]));
            match next() % 10 {
                0 => {
                    let _ = std::fs::remove_file(&file);
                }
                1 if broken.is_none() => {
                    std::fs::write(&file, "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, labels: {\"a b\": c}}\n").expect("write");
                    broken = Some(file.clone());
                }
                k => {
                    let docs: Vec<String> = (0..next() % 5).map(|_| document(next() % 64)).collect();
                    let text = docs.join("---\n");
                    if k % 2 == 0 {
                        std::fs::write(&file, text).expect("write");
                    } else {
                        let tmp = dir.0.join("tmp.part");
                        std::fs::write(&tmp, text).expect("write");
                        std::fs::rename(&tmp, &file).expect("rename");
                    }
                    if broken.as_ref() == Some(&file) {
                        broken = None;
                    }
                }
            }
            if broken.as_ref().is_some_and(|b| !b.exists()) {
                broken = None;
            }
            match source.poll(false) {
                Ok(Some(SourceUpdate::Changes(changes))) => {
                    for change in changes {
                        model.apply_change(change);
                    }
                }
                Ok(Some(SourceUpdate::Snapshot(_))) => panic!("step {step}: a second snapshot"),
                Ok(None) => {}
                Err(e) => assert!(broken.is_some(), "step {step}: {}", crate::error_chain(&e)),
            }
            match full_read(&dir.0) {
                Ok(full) => {
                    assert!(broken.is_none(), "step {step}: the broken file parsed");
                    assert_eq!(model, full, "step {step}");
                    assert!(source.poll(false).expect("nothing changed").is_none(), "step {step}");
                }
                Err(_) => assert!(broken.is_some(), "step {step}"),
            }
        }
    }

    /// A new policy file is one change; an untouched directory none; a rewrite with the same
    /// objects changes nothing in the model.
    #[test]
    fn only_changed_files_are_read_again() {
        let dir = temp_dir("one-change");
        std::fs::write(dir.0.join("pods.yaml"), document(2) + "---\n" + &document(3)).expect("write");
        let mut source = FileSource::new(&dir.0);
        let mut model = snapshot(source.poll(false).expect("valid"));
        assert_eq!(model.pods().len(), 2);
        assert!(source.poll(true).expect("unchanged").is_none());
        std::fs::write(dir.0.join("policy.yaml"), document(8)).expect("write");
        let Some(SourceUpdate::Changes(changes)) = source.poll(false).expect("valid") else {
            panic!("expected changes");
        };
        let refs: Vec<String> = changes.iter().map(|c| c.object_ref().to_string()).collect();
        assert_eq!(refs, ["NetworkPolicy z/np0"]);
        // The pods file, rewritten as it was: its objects are applied again, and change nothing.
        std::fs::write(dir.0.join("pods.yaml"), document(2) + "---\n" + &document(3)).expect("write");
        let Some(SourceUpdate::Changes(changes)) = source.poll(false).expect("valid") else {
            panic!("expected changes");
        };
        assert_eq!(changes.len(), 2);
        assert!(changes.into_iter().all(|c| !model.apply_change(c)));
        // Unreadable: the poll fails, and the model it built stays.
        std::fs::write(dir.0.join("policy.yaml"), "kind: [").expect("write");
        assert!(source.poll(false).is_err());
        assert!(source.poll(false).is_err(), "still broken: still an error");
        std::fs::remove_file(dir.0.join("policy.yaml")).expect("remove");
        let Some(SourceUpdate::Changes(changes)) = source.poll(false).expect("valid") else {
            panic!("expected changes");
        };
        assert_eq!(
            changes,
            [Change::Delete(ObjectRef {
                kind: crate::model::Kind::NetworkPolicy,
                namespace: Some("z".into()),
                name: "np0".into(),
            })]
        );
    }

    #[test]
    fn nodes_in_manifests_reach_the_model_and_bad_ones_fail_the_poll() {
        let dir = TempDir(std::env::temp_dir().join(format!("bulkhead-files-nodes-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        let nodes = "apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\nspec: {podCIDR: 10.244.2.0/24}\n\
                     status: {addresses: [{type: InternalIP, address: 192.168.0.2}]}\n---\n\
                     apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDRs: [10.244.1.0/24]}\n";
        std::fs::write(dir.0.join("nodes.yaml"), nodes).expect("write");
        let mut source = FileSource::new(&dir.0);
        let cluster = snapshot(source.poll(false).expect("valid manifests"));
        let table: Vec<String> = cluster
            .nodes()
            .map(|n| format!("{} {:?} {:?}", n.name, n.pod_cidr.map(|c| c.to_string()), n.internal_ip))
            .collect();
        assert_eq!(
            table,
            [
                "node-a Some(\"10.244.1.0/24\") None",
                "node-b Some(\"10.244.2.0/24\") Some(192.168.0.2)",
            ]
        );
        assert_eq!(cluster.node("node-a").and_then(|n| n.unroutable()), Some("no IPv4 InternalIP"));

        std::fs::write(
            dir.0.join("nodes.yaml"),
            "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {podCIDR: x}\n",
        )
        .expect("write");
        let err = source.poll(true).expect_err("an invalid pod cidr");
        let msg = crate::error_chain(&err);
        assert!(msg.contains("Node n: spec.podCIDR: \"x\" is not an IPv4 or IPv6 CIDR"), "{msg}");
    }

    #[test]
    fn services_and_slices_in_manifests_reach_the_model_and_the_service_table() {
        let dir = TempDir(std::env::temp_dir().join(format!("bulkhead-files-services-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&dir.0);
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        let manifests = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: x}\n\
                         spec: {clusterIP: 10.96.0.5, ports: [{port: 5432}]}\n---\n\
                         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                         metadata: {name: db-1, namespace: x, labels: {kubernetes.io/service-name: db}}\n\
                         addressType: IPv4\nports: [{port: 5432}]\nendpoints: [{addresses: [192.0.2.10]}]\n";
        std::fs::write(dir.0.join("db.yaml"), manifests).expect("write");
        let mut source = FileSource::new(&dir.0);
        let cluster = snapshot(source.poll(false).expect("valid manifests"));
        assert_eq!(cluster.services().count(), 1);
        assert_eq!(cluster.endpoint_slices_of("x", "db").count(), 1);
        let table = crate::services::ServiceTable::from_cluster(&cluster);
        let backends: Vec<String> = table
            .iter()
            .flat_map(|(k, e)| {
                e.selected()
                    .into_iter()
                    .map(move |b| format!("{}:{} -> {}:{}", k.vip, k.port, b.ip, b.port))
            })
            .collect();
        assert_eq!(backends, ["10.96.0.5:5432 -> 192.0.2.10:5432"]);

        std::fs::write(
            dir.0.join("db.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: x}\nspec: {clusterIP: x}\n",
        )
        .expect("write");
        let err = source.poll(true).expect_err("an invalid cluster ip");
        let msg = crate::error_chain(&err);
        assert!(
            msg.contains("Service x/db: spec.clusterIP: \"x\" is not an IPv4 address or None"),
            "{msg}"
        );
    }
}
