//! Where the agent's cluster model comes from. The lab and file deployments use
//! [`FileSource`]; a cluster uses [`KubeSource`] (kube-rs watchers).

mod files;
pub mod kubernetes;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::model::{Cluster, ModelError};

pub use crate::model::Change;

pub use files::FileSource;
pub use kubernetes::{KubeSource, KubeSourceOptions};

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

/// What a source delivers: the whole model once (and after a resync), then its changes.
#[derive(Debug)]
pub enum SourceUpdate {
    /// The whole model: the first sync, or a resync the source could not express as changes.
    Snapshot(Box<Cluster>),
    /// What changed since the last update, in order. Applying them to the model the source
    /// delivered before gives the model it holds now.
    Changes(Vec<Change>),
}

/// A source of the cluster model.
pub trait Source: Send {
    /// What changed since the last successful call: `Ok(None)` when nothing did. With `force`
    /// the source checks again even where it would otherwise trust a notification (a
    /// `Reload`); an update is still only what changed. An error changes nothing: the next
    /// successful call delivers everything since the last one.
    fn poll(&mut self, force: bool) -> Result<Option<SourceUpdate>, SourceError>;

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

    /// Signalled whenever the model may have changed, so the agent reacts at once; `None`
    /// (the default) means the source must be polled instead.
    fn changes(&self) -> Option<Arc<Notify>> {
        None
    }
}

/// No source: an empty cluster (an agent that only enforces fail-closed isolation).
#[derive(Debug, Default)]
pub struct EmptySource {
    served: bool,
}

impl Source for EmptySource {
    fn poll(&mut self, _force: bool) -> Result<Option<SourceUpdate>, SourceError> {
        let first = !self.served;
        self.served = true;
        Ok(first.then(|| SourceUpdate::Snapshot(Box::default())))
    }
}
