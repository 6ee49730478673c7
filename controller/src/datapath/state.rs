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
}
