//! What the agent's core does to the host, behind small traits so its failure paths are
//! unit-tested without root: attaching programs, host links, the endpoint registry file.
//! Map writes go through [`MapWriter`]. Production implementations wrap the datapath,
//! netlink and the state directory; the tests' ones live in memory and can be told to fail.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use bulkhead_common::{Backend, EndpointInfo, IpcacheValue, PolicyKey, PolicyValue, RevNat, ServiceKey, ServiceValue};
use bulkhead_hostnet::netlink::{self as cni_netlink, with_handle};

use crate::datapath::sync::{MapWriter, MapsError};
use crate::datapath::{Datapath, DatapathError, DatapathState};

use super::registry::{self, EndpointRecord, Endpoints};
use super::AgentError;

/// The programs side of the datapath.
pub(super) trait Programs {
    /// Attaches the programs to the host-side veth `ifname`.
    fn attach(&mut self, ifname: &str) -> Result<(), DatapathError>;
    /// Flow records lost so far.
    fn flows_lost(&self) -> Result<u64, DatapathError>;
}

/// The whole datapath as the agent drives it: maps and programs.
pub(super) trait Dataplane: MapWriter + Programs + Send {}

impl<T: MapWriter + Programs + Send> Dataplane for T {}

impl Programs for Datapath {
    fn attach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        Datapath::attach(self, ifname)
    }
    fn flows_lost(&self) -> Result<u64, DatapathError> {
        Datapath::flows_lost(self)
    }
}

impl MapWriter for Datapath {
    fn prepare_endpoints(&mut self, values: &[EndpointInfo]) -> Result<(), MapsError> {
        self.maps.prepare_endpoints(values)
    }
    fn reserve_conntrack(&mut self, ids: std::ops::RangeInclusive<u32>) -> Result<(), MapsError> {
        self.maps.reserve_conntrack(ids)
    }
    fn set_endpoint(&mut self, ifindex: u32, value: &EndpointInfo) -> Result<(), MapsError> {
        self.maps.set_endpoint(ifindex, value)
    }
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), MapsError> {
        self.maps.remove_endpoint(ifindex)
    }
    fn set_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8, value: &IpcacheValue) -> Result<(), MapsError> {
        self.maps.set_ipcache(addr, prefix_len, value)
    }
    fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8) -> Result<(), MapsError> {
        self.maps.remove_ipcache(addr, prefix_len)
    }
    fn set_policy(&mut self, key: &PolicyKey, prefix_len: u32, value: &PolicyValue) -> Result<(), MapsError> {
        self.maps.set_policy(key, prefix_len, value)
    }
    fn remove_policy(&mut self, key: &PolicyKey, prefix_len: u32) -> Result<(), MapsError> {
        self.maps.remove_policy(key, prefix_len)
    }
    fn read_state(&self) -> Result<DatapathState, MapsError> {
        self.maps.read_state()
    }
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapsError> {
        self.maps.set_service(key, value)
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapsError> {
        self.maps.remove_service(key)
    }
    fn set_backend(&mut self, id: u32, value: &Backend) -> Result<(), MapsError> {
        self.maps.set_backend(id, value)
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), MapsError> {
        self.maps.remove_backend(id)
    }
    fn set_rev_nat(&mut self, id: u32, value: &RevNat) -> Result<(), MapsError> {
        self.maps.set_rev_nat(id, value)
    }
    fn remove_rev_nat(&mut self, id: u32) -> Result<(), MapsError> {
        self.maps.remove_rev_nat(id)
    }
    fn set_quarantine(&mut self, addr: Ipv4Addr, value: u32) -> Result<(), MapsError> {
        self.maps.set_quarantine(addr, value)
    }
    fn remove_quarantine(&mut self, addr: Ipv4Addr) -> Result<(), MapsError> {
        self.maps.remove_quarantine(addr)
    }
    fn set_quarantine_count(&mut self, count: u32) -> Result<(), MapsError> {
        self.maps.set_quarantine_count(count)
    }
}

/// The host's links and addresses, in the agent's network namespace.
pub(super) trait HostLinks: Send {
    /// This node's own IPv4 addresses. An error is never an empty list: the caller keeps
    /// the last good set (an empty one would drop kubelet's probes until the next read).
    fn addresses(&self) -> Result<Vec<Ipv4Addr>, AgentError>;
    /// The ifindex of each of `names` that exists.
    fn live(&self, names: Vec<String>) -> Result<BTreeMap<String, u32>, AgentError>;
    /// Deletes each of `names` that exists; absence is success.
    fn delete(&self, names: Vec<String>) -> Result<(), AgentError>;
}

/// [`HostLinks`] over netlink.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct NetlinkLinks;

impl HostLinks for NetlinkLinks {
    fn addresses(&self) -> Result<Vec<Ipv4Addr>, AgentError> {
        with_handle(None, |h| async move { cni_netlink::all_ipv4_addresses(&h).await }).map_err(|e| AgentError::Link {
            op: "list addresses",
            source: Box::new(e),
        })
    }

    fn live(&self, names: Vec<String>) -> Result<BTreeMap<String, u32>, AgentError> {
        with_handle(None, |h| async move {
            let mut live = BTreeMap::new();
            for name in names {
                if let Some(link) = cni_netlink::link_by_name(&h, &name).await? {
                    live.insert(name, link.index);
                }
            }
            Ok(live)
        })
        .map_err(|e| AgentError::Link {
            op: "list",
            source: Box::new(e),
        })
    }

    fn delete(&self, names: Vec<String>) -> Result<(), AgentError> {
        with_handle(None, |h| async move {
            for name in &names {
                cni_netlink::delete_link(&h, name).await?;
            }
            Ok(())
        })
        .map_err(|e| AgentError::Link {
            op: "delete",
            source: Box::new(e),
        })
    }
}

/// Where the endpoint registry persists.
pub(super) trait RegistryStore: Send {
    /// Every persisted endpoint; none when nothing was ever saved. A store that cannot be
    /// read or parsed is an error, never an empty registry.
    fn load(&self) -> Result<Endpoints, AgentError>;
    /// Replaces the persisted endpoints with `records`.
    fn save(&mut self, records: &[&EndpointRecord]) -> Result<(), AgentError>;
}

/// [`RegistryStore`] in a JSON file, replaced atomically.
#[derive(Clone, Debug)]
pub(super) struct RegistryFile {
    /// The file.
    pub(super) path: PathBuf,
}

impl RegistryStore for RegistryFile {
    fn load(&self) -> Result<Endpoints, AgentError> {
        registry::load_registry(&self.path)
    }

    fn save(&mut self, records: &[&EndpointRecord]) -> Result<(), AgentError> {
        let text = serde_json::to_vec_pretty(records).map_err(|e| AgentError::Io {
            op: "write",
            path: self.path.clone(),
            source: e.into(),
        })?;
        bulkhead_hostnet::fs::write_atomic(&self.path, &text, 0o600).map_err(Into::into)
    }
}
