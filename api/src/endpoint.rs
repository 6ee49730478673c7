//! Pod attachments, as the CNI plugin registers them.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::mac::{self, MacAddr6};

/// Names one attachment: a container's interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EndpointRef {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

/// Everything the agent needs to enforce policy on a new pod interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME` inside the pod.
    pub ifname: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub pod_namespace: String,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub pod_name: String,
    /// Name of the host-side veth, in the agent's network namespace.
    pub host_ifname: String,
    /// Ifindex of the host-side veth.
    pub host_ifindex: u32,
    /// The pod's address.
    pub ipv4: Ipv4Addr,
    /// The pod-side MAC, `aa:bb:cc:dd:ee:ff` on the wire.
    #[serde(with = "mac::text")]
    pub mac: MacAddr6,
    /// The CNI network (`name` of the config) the attachment belongs to; GC of one network
    /// leaves the others' endpoints alone. Empty in records from before it existed.
    #[serde(default)]
    pub network: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_records_keep_their_mac_strings() {
        // As the registry and the CNI plugin have always written it.
        let text = r#"{"container_id":"c1","ifname":"eth0","netns":"/run/netns/p","pod_namespace":"x","pod_name":"a","host_ifname":"bh0123456789a","host_ifindex":7,"ipv4":"10.0.0.3","mac":"02:0a:bc:00:00:ff","network":"bh"}"#;
        let spec: EndpointSpec = serde_json::from_str(text).unwrap();
        assert_eq!(spec.mac, MacAddr6::new(0x02, 0x0a, 0xbc, 0, 0, 0xff));
        assert_eq!(serde_json::to_string(&spec).unwrap(), text);
        let upper = text.replace("02:0a:bc:00:00:ff", "02:0A:BC:00:00:FF");
        assert_eq!(serde_json::from_str::<EndpointSpec>(&upper).unwrap(), spec);
        let bad = text.replace("02:0a:bc:00:00:ff", "02:0a:bc");
        let e = serde_json::from_str::<EndpointSpec>(&bad).unwrap_err();
        assert!(e.to_string().contains("malformed mac"), "{e}");
    }
}
