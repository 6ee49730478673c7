//! Pod attachments, as the CNI plugin registers them.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

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
    /// The pod-side MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The CNI network (`name` of the config) the attachment belongs to; GC of one network
    /// leaves the others' endpoints alone. Empty in records from before it existed.
    #[serde(default)]
    pub network: String,
}
