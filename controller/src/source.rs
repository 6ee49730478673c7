//! Where the agent's cluster model comes from. The lab and file deployments use
//! [`FileSource`]; a cluster uses [`crate::kube_source::KubeSource`] (kube-rs watchers).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::model::{parse_documents, Cluster, ModelError};

/// Why the model could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A manifests file or directory could not be read.
    #[error("cannot read manifests {path}")]
    Read {
        /// What was read.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A manifests file is invalid; the previous model stays in force.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// No Kubernetes client configuration could be loaded (kubeconfig or in-cluster).
    #[error("cannot load the kubernetes client configuration{}", .kubeconfig.as_ref().map(|p| format!(" from {}", p.display())).unwrap_or_default())]
    KubeConfig {
        /// The kubeconfig file named by the operator, if any.
        kubeconfig: Option<PathBuf>,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The Kubernetes client could not be built from its configuration.
    #[error("cannot build the kubernetes client")]
    KubeClient(#[source] kube::Error),
}

/// A source of the whole cluster model.
pub trait Source: Send {
    /// The model, when it changed since the last successful call or when `force` is set.
    fn poll(&mut self, force: bool) -> Result<Option<Cluster>, SourceError>;

    /// Whether the source holds a complete view of the cluster (its first full sync is done).
    /// Until then `poll` returns `Ok(None)` and the agent reports not ready.
    fn synced(&self) -> bool {
        true
    }

    /// This node's pod CIDR, when the source knows it (the Kubernetes Node's `spec.podCIDRs`).
    fn pod_cidr(&self) -> Option<ipnetwork::Ipv4Network> {
        None
    }

    /// Errors the source recovered from by itself so far (a Kubernetes watch that failed
    /// and retried), for the agent's error metric; `poll` reports the others.
    fn failures(&self) -> u64 {
        0
    }
}

/// No source: an empty cluster (an agent that only enforces fail-closed isolation).
#[derive(Debug, Default)]
pub struct EmptySource {
    served: bool,
}

impl Source for EmptySource {
    fn poll(&mut self, force: bool) -> Result<Option<Cluster>, SourceError> {
        let first = !self.served;
        self.served = true;
        Ok((first || force).then(Cluster::new))
    }
}

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
