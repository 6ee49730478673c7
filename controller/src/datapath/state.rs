//! What the eBPF maps must hold: the compiler's output and the map writer's input.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use bulkhead_common::{Backend, EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, RevNat, ServiceKey, ServiceValue};

/// Exactly what the eBPF maps must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathState {
    /// Host-side ifindex → endpoint.
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    /// (address, prefix length) → identity; address host bits are zero.
    pub ipcache: BTreeMap<(Ipv4Addr, u8), IpcacheValue>,
    /// (key, LPM prefix length) → verdict; key bits past the prefix are zero.
    pub policy: BTreeMap<(PolicyKey, u32), PolicyValue>,
    /// Service ports and their backend slots: for each `{vip, port, protocol}`, slot 0
    /// (the header: `backend_count`, affinity, `service_id`) and slots `1..=backend_count`
    /// (each a `backend_id`). See [`ServiceKey`].
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Backend id → address and port, for every id a slot names.
    pub backends: BTreeMap<u32, Backend>,
    /// Service id → the VIP and port replies get back, for every `service_id` a header
    /// names (1..=`MAX_SERVICE_ID`).
    pub rev_nat: BTreeMap<u32, RevNat>,
    /// Every quarantined pod's address (cluster-wide) → the reserved value (0). Not the
    /// compiler's: the agent lays it on top, with the endpoints' quarantine flags.
    pub quarantine: BTreeMap<Ipv4Addr, u32>,
    /// What the quarantine count (`bh_quarn_v1`) holds: `quarantine.len()` once written.
    pub quarantine_count: u32,
}

/// The changes one incremental compile makes to the endpoint, ipcache and policy maps (and
/// the agent's quarantine on top of them):
/// each touched key with its new value, `None` to remove it. Keys whose value did not
/// change are not listed, so a sync writes exactly these.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathDelta {
    /// Host-side ifindex → new endpoint, or `None` to remove it.
    pub endpoints: BTreeMap<u32, Option<EndpointInfo>>,
    /// (address, prefix length) → new identity, or `None` to remove the prefix.
    pub ipcache: BTreeMap<(Ipv4Addr, u8), Option<IpcacheValue>>,
    /// (key, LPM prefix length) → new verdict, or `None` to remove the entry.
    pub policy: BTreeMap<(PolicyKey, u32), Option<PolicyValue>>,
    /// Quarantined address → new value, or `None` to remove it.
    pub quarantine: BTreeMap<Ipv4Addr, Option<u32>>,
    /// The quarantine count to write, if it changes.
    pub quarantine_count: Option<u32>,
}

impl DatapathDelta {
    /// The changes that turn `old`'s endpoint, ipcache and policy maps into `new`'s
    /// (the Service maps are not part of a delta).
    pub fn between(old: &DatapathState, new: &DatapathState) -> Self {
        DatapathDelta {
            endpoints: diff_map(&old.endpoints, &new.endpoints),
            ipcache: diff_map(&old.ipcache, &new.ipcache),
            policy: diff_map(&old.policy, &new.policy),
            quarantine: diff_map(&old.quarantine, &new.quarantine),
            quarantine_count: (old.quarantine_count != new.quarantine_count).then_some(new.quarantine_count),
        }
    }

    /// The quarantine half of [`DatapathDelta::between`] alone.
    pub fn between_quarantine(old: &DatapathState, new: &DatapathState) -> Self {
        DatapathDelta {
            quarantine: diff_map(&old.quarantine, &new.quarantine),
            quarantine_count: (old.quarantine_count != new.quarantine_count).then_some(new.quarantine_count),
            ..DatapathDelta::default()
        }
    }

    /// Applies the changes to `state`.
    pub fn apply_to(&self, state: &mut DatapathState) {
        apply_map(&mut state.endpoints, &self.endpoints);
        apply_map(&mut state.ipcache, &self.ipcache);
        apply_map(&mut state.policy, &self.policy);
        apply_map(&mut state.quarantine, &self.quarantine);
        if let Some(n) = self.quarantine_count {
            state.quarantine_count = n;
        }
    }

    /// How many keys change.
    pub fn len(&self) -> usize {
        self.endpoints.len() + self.ipcache.len() + self.policy.len() + self.quarantine.len() + usize::from(self.quarantine_count.is_some())
    }

    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn diff_map<K: Ord + Clone, V: PartialEq + Clone>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> BTreeMap<K, Option<V>> {
    let mut out = BTreeMap::new();
    for (k, v) in new {
        if old.get(k) != Some(v) {
            out.insert(k.clone(), Some(v.clone()));
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            out.insert(k.clone(), None);
        }
    }
    out
}

fn apply_map<K: Ord + Clone, V: Clone>(map: &mut BTreeMap<K, V>, changes: &BTreeMap<K, Option<V>>) {
    for (k, v) in changes {
        match v {
            Some(v) => map.insert(k.clone(), v.clone()),
            None => map.remove(k),
        };
    }
}
