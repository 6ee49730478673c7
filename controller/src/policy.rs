// TEMPORARY stand-in until the policy branch merges.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathState {
    pub endpoints: BTreeMap<u32, bulkhead_common::EndpointInfo>,
    pub ipcache: BTreeMap<(Ipv4Addr, u8), bulkhead_common::IpcacheValue>,
    pub policy: BTreeMap<(bulkhead_common::PolicyKey, u32), bulkhead_common::PolicyValue>,
}
