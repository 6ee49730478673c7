//! The files source: a directory of manifests, what the lab and file deployments use.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{Source, SourceError};
use crate::model::{parse_documents, Cluster};

/// Every `*.yaml`/`*.yml` file of a directory, multi-document, read in name order.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    seen: Option<Vec<(PathBuf, SystemTime, u64)>>,
}

impl FileSource {
    /// Watches `dir`.
    pub fn new(dir: &Path) -> Self {
        FileSource {
            dir: dir.to_path_buf(),
            seen: None,
        }
    }

    fn files(&self) -> Result<Vec<(PathBuf, SystemTime, u64)>, SourceError> {
        let read = |source| SourceError::Read {
            path: self.dir.clone(),
            source,
        };
        let mut files = Vec::new();
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
            files.push((path, meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len()));
        }
        files.sort();
        Ok(files)
    }
}

impl Source for FileSource {
    fn poll(&mut self, force: bool) -> Result<Option<Cluster>, SourceError> {
        let files = self.files()?;
        if !force && self.seen.as_ref() == Some(&files) {
            return Ok(None);
        }
        let mut objects = Vec::new();
        for (path, _, _) in &files {
            let text = std::fs::read_to_string(path).map_err(|source| SourceError::Read {
                path: path.clone(),
                source,
            })?;
            objects.extend(parse_documents(&text, &path.display().to_string())?);
        }
        self.seen = Some(files);
        Ok(Some(Cluster::from_objects(objects)))
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
        let cluster = source.poll(false).expect("valid manifests").expect("a first model");
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
        let cluster = source.poll(false).expect("valid manifests").expect("a first model");
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
