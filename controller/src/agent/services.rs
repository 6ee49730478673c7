//! The agent's side of ClusterIP Services: the model's service table written into the
//! datapath state, with ids kept across compiles and across agent restarts (open
//! connections carry their Service port's id in conntrack), and the `services` switch.

use std::sync::Arc;

use crate::datapath::services::{LeftOut, ServiceIds};
use crate::datapath::DatapathState;
use crate::metrics::Metrics;
use crate::model::Cluster;
use crate::services::ServiceTable;

/// Services as the agent translates them.
pub(crate) struct Services {
    /// `services: false` turns translation off: no entries, egress to a VIP is decided on
    /// the VIP (and kube-proxy translates it after).
    enabled: bool,
    ids: ServiceIds,
    /// The table last written.
    table: Arc<ServiceTable>,
    /// What the last write could not fit, logged when it changes.
    left_out: LeftOut,
}

impl Services {
    /// Starts from the ids the pinned maps `held` already use.
    pub(crate) fn new(enabled: bool, held: &DatapathState) -> Services {
        Services {
            enabled,
            ids: ServiceIds::from_state(held),
            table: Arc::default(),
            left_out: LeftOut::default(),
        }
    }

    /// Adds the model's Service entries to `state` (none when disabled).
    pub(crate) fn add_to(&mut self, cluster: &Cluster, state: &mut DatapathState, metrics: &Metrics) {
        if !self.enabled {
            return;
        }
        let table = ServiceTable::from_cluster(cluster);
        let left_out = self.ids.write(&table, state);
        if left_out != self.left_out {
            match left_out.is_empty() {
                true => tracing::info!("every Service port fits the service maps again"),
                false => tracing::warn!(
                    service_ports = left_out.service_ports,
                    backends = left_out.backends,
                    untranslatable = left_out.untranslatable,
                    "Service ports or backends left out of the service maps"
                ),
            }
            self.left_out = left_out;
        }
        metrics.set_services(
            table.len().saturating_sub(left_out.service_ports + left_out.untranslatable),
            left_out,
        );
        self.table = Arc::new(table);
    }

    /// Whether ClusterIPs are translated.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// The table last written.
    pub(crate) fn table(&self) -> &ServiceTable {
        &self.table
    }

    /// The datapath's Service port ids, by id.
    pub(crate) fn ids(&self) -> std::collections::BTreeMap<u32, crate::services::ServiceKey> {
        self.ids.by_id()
    }
}
