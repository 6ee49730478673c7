//! The node's part of the cluster network, kept in step with the model's Nodes: routes
//! to the other nodes' pod CIDRs ([`crate::routing`]) and masquerade for pod traffic that
//! leaves the cluster ([`crate::nat`]). The agent owns both; nothing is touched before the
//! source's first full sync (an empty model would remove every route).

use std::net::Ipv4Addr;

use bulkhead_hostnet::netlink;
use ipnetwork::Ipv4Network;

use crate::config::{AgentConfig, RoutingKind};
use crate::model::Cluster;
use crate::nat::{Masquerade, MasqueradeConfig};
use crate::routing::{LocalNode, Peer, Router, RoutingMode, VxlanConfig};

/// What the network needs from the kernel, behind a trait so the agent's use of it is
/// unit-tested without root.
pub(super) trait NodeNetwork: Send {
    /// Makes this node's routes to `peers` exactly those of `mode`; returns the MTU pod
    /// interfaces need when it is lower than the link's (the VXLAN device's).
    fn routes(&mut self, local: &LocalNode, mode: &RoutingMode, peers: &[Peer]) -> Result<Option<u32>, String>;
    /// Makes the masquerade table exactly `config`.
    fn masquerade(&mut self, config: &MasqueradeConfig) -> Result<(), String>;
}

/// The kernel: netlink routes and an nftables table, in the agent's own namespace.
pub(super) struct KernelNetwork;

impl NodeNetwork for KernelNetwork {
    fn routes(&mut self, local: &LocalNode, mode: &RoutingMode, peers: &[Peer]) -> Result<Option<u32>, String> {
        let changes = Router::new(local.clone(), mode.clone())
            .reconcile_in(None, peers)
            .map_err(|e| crate::error_chain(&e))?;
        tracing::debug!(changes = changes.len(), "routes reconciled");
        let RoutingMode::Vxlan(vxlan) = mode else {
            return Ok(None);
        };
        let device = vxlan.device.clone();
        let link =
            netlink::with_handle(None, |h| async move { netlink::vxlan_by_name(&h, &device).await }).map_err(|e| crate::error_chain(&e))?;
        Ok(link.map(|l| l.spec.mtu))
    }

    fn masquerade(&mut self, config: &MasqueradeConfig) -> Result<(), String> {
        Masquerade::new().reconcile(config).map_err(|e| crate::error_chain(&e))
    }
}

/// The network settings and what was last applied.
pub(super) struct Network {
    kernel: Box<dyn NodeNetwork>,
    /// `None`: routing off.
    mode: Option<RoutingMode>,
    /// `None`: masquerade off.
    cluster_cidr: Option<Ipv4Network>,
    non_masquerade: Vec<Ipv4Network>,
    applied_routes: Option<(LocalNode, Vec<Peer>)>,
    applied_masquerade: Option<MasqueradeConfig>,
    /// The last reason routing could not run, logged once.
    last_problem: Option<String>,
    /// The MTU pod interfaces need, when routing lowers it.
    pod_mtu: Option<u32>,
}

/// What the model asks of the network now.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Desired {
    /// This node and its peers, when this node can be routed to.
    pub(super) routes: Result<(LocalNode, Vec<Peer>), String>,
    /// Nodes skipped, with why.
    pub(super) skipped: Vec<(String, &'static str)>,
    /// Every node's InternalIP.
    pub(super) node_ips: Vec<Ipv4Addr>,
}

/// This node and the routable others, from the model.
pub(super) fn desired(cluster: &Cluster, node_name: &str) -> Desired {
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    let mut local = Err(format!("node {node_name} is not in the model yet"));
    for node in cluster.nodes() {
        match (node.route(), node.name == node_name) {
            (Some((pod_cidr, internal_ip)), true) => {
                local = Ok(LocalNode {
                    name: node.name.clone(),
                    internal_ip,
                    pod_cidr,
                })
            }
            (None, true) => local = Err(format!("node {node_name}: {}", node.unroutable().unwrap_or("unroutable"))),
            (Some((pod_cidr, internal_ip)), false) => peers.push(Peer {
                name: node.name.clone(),
                pod_cidr,
                internal_ip,
            }),
            (None, false) => skipped.push((node.name.clone(), node.unroutable().unwrap_or("unroutable"))),
        }
    }
    Desired {
        routes: local.map(|l| (l, peers)),
        skipped,
        node_ips: cluster.nodes().filter_map(|n| n.internal_ip).collect(),
    }
}

impl Network {
    /// From the agent's settings.
    pub(super) fn new(config: &AgentConfig, kernel: Box<dyn NodeNetwork>) -> Self {
        let mode = match config.routing {
            RoutingKind::Native => Some(RoutingMode::Native),
            RoutingKind::Vxlan => Some(RoutingMode::Vxlan(VxlanConfig {
                vni: config.vxlan_vni,
                port: config.vxlan_port,
                ..VxlanConfig::default()
            })),
            RoutingKind::None => None,
        };
        let cluster_cidr = config.cluster_cidr.filter(|_| config.masquerade);
        if config.masquerade && cluster_cidr.is_none() {
            tracing::warn!("masquerade is on but no cluster-cidr is set: nothing is masqueraded");
        }
        Network {
            kernel,
            mode,
            cluster_cidr,
            non_masquerade: config.non_masquerade_cidrs.clone(),
            applied_routes: None,
            applied_masquerade: None,
            last_problem: None,
            pod_mtu: None,
        }
    }

    /// The MTU pod interfaces need, when routing lowers it (VXLAN).
    pub(super) fn pod_mtu(&self) -> Option<u32> {
        self.pod_mtu
    }

    /// Routing and masquerade both off (tests of the rest of the agent).
    #[cfg(test)]
    pub(super) fn off() -> Self {
        Network {
            kernel: Box::new(KernelNetwork),
            mode: None,
            cluster_cidr: None,
            non_masquerade: Vec::new(),
            applied_routes: None,
            applied_masquerade: None,
            last_problem: None,
            pod_mtu: None,
        }
    }

    /// Applies what `cluster` asks, where it differs from what was applied; a failure is
    /// returned and retried by the next call (nothing is recorded as applied).
    pub(super) fn sync(&mut self, cluster: &Cluster, node_name: &str) -> Result<(), String> {
        let want = desired(cluster, node_name);
        let mut errors = Vec::new();
        if let Some(mode) = &self.mode {
            match want.routes {
                Ok(routes) if self.applied_routes.as_ref() != Some(&routes) => {
                    for (name, why) in &want.skipped {
                        tracing::info!(node = %name, reason = why, "no route to node");
                    }
                    match self.kernel.routes(&routes.0, mode, &routes.1) {
                        Ok(pod_mtu) => {
                            tracing::info!(peers = routes.1.len(), pod_mtu, "routes to other nodes in step");
                            self.pod_mtu = pod_mtu;
                            self.applied_routes = Some(routes);
                            self.last_problem = None;
                        }
                        Err(e) => errors.push(format!("routes: {e}")),
                    }
                }
                Ok(_) => {}
                Err(problem) => {
                    // Keep whatever routes exist: a node that lost its CIDR or InternalIP for
                    // a moment must not cut the others off.
                    if self.last_problem.as_ref() != Some(&problem) {
                        tracing::warn!(reason = %problem, "routes to other nodes left as they are");
                        self.last_problem = Some(problem);
                    }
                }
            }
        }
        if let Some(cidr) = self.cluster_cidr {
            let config = MasqueradeConfig {
                cluster_cidrs: vec![cidr],
                non_masquerade_cidrs: self.non_masquerade.clone(),
                node_ips: want.node_ips,
            };
            if self.applied_masquerade.as_ref() != Some(&config) {
                match self.kernel.masquerade(&config) {
                    Ok(()) => {
                        tracing::info!(cluster_cidr = %cidr, nodes = config.node_ips.len(), "masquerade in step");
                        self.applied_masquerade = Some(config);
                    }
                    Err(e) => errors.push(format!("masquerade: {e}")),
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::model::parse_documents;

    #[derive(Default)]
    struct Calls {
        routes: Vec<(String, Vec<String>)>,
        masquerade: Vec<MasqueradeConfig>,
        fail: bool,
    }

    struct Fake(Arc<Mutex<Calls>>);

    impl NodeNetwork for Fake {
        fn routes(&mut self, local: &LocalNode, _: &RoutingMode, peers: &[Peer]) -> Result<Option<u32>, String> {
            let mut c = self.0.lock().unwrap();
            if c.fail {
                return Err("netlink says no".into());
            }
            c.routes.push((
                local.name.clone(),
                peers
                    .iter()
                    .map(|p| format!("{} {} {}", p.name, p.pod_cidr, p.internal_ip))
                    .collect(),
            ));
            Ok(None)
        }

        fn masquerade(&mut self, config: &MasqueradeConfig) -> Result<(), String> {
            let mut c = self.0.lock().unwrap();
            if c.fail {
                return Err("nft says no".into());
            }
            c.masquerade.push(config.clone());
            Ok(())
        }
    }

    fn node(name: &str, cidr: &str, ip: &str) -> String {
        let spec = if cidr.is_empty() {
            String::new()
        } else {
            format!("spec: {{podCIDR: {cidr}}}\n")
        };
        let status = if ip.is_empty() {
            String::new()
        } else {
            format!("status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n")
        };
        format!("---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n{spec}{status}")
    }

    fn cluster(nodes: &[(&str, &str, &str)]) -> Cluster {
        let text: String = nodes.iter().map(|(n, c, i)| node(n, c, i)).collect();
        Cluster::from_objects(parse_documents(&text, "test").unwrap())
    }

    fn network(calls: &Arc<Mutex<Calls>>, cluster_cidr: Option<&str>) -> Network {
        let config = AgentConfig {
            node_name: "a".into(),
            source: crate::config::SourceKind::None,
            kubeconfig: None,
            manifests: None,
            state_dir: "/tmp".into(),
            bpffs: "/tmp".into(),
            pod_cidr: None,
            metrics_address: "none".into(),
            flow_history: 1,
            routing: RoutingKind::Native,
            vxlan_vni: 1,
            vxlan_port: 4789,
            cluster_cidr: cluster_cidr.map(|c| c.parse().unwrap()),
            non_masquerade_cidrs: vec!["192.168.0.0/16".parse().unwrap()],
            masquerade: true,
            services: true,
            flow_address: None,
            flow_token_file: None,
            pod_xdp: true,
            quarantine_allow_node: true,
            prefilter_devices: Vec::new(),
            prefilter_deny_file: None,
        };
        Network::new(&config, Box::new(Fake(calls.clone())))
    }

    #[test]
    fn peers_are_the_other_routable_nodes_and_unchanged_models_write_nothing() {
        let calls = Arc::new(Mutex::new(Calls::default()));
        let mut net = network(&calls, Some("10.244.0.0/16"));
        let c = cluster(&[
            ("a", "10.244.0.0/24", "172.20.0.1"),
            ("b", "10.244.1.0/24", "172.20.0.2"),
            ("c", "", "172.20.0.3"),
            ("d", "10.244.3.0/24", ""),
        ]);
        net.sync(&c, "a").unwrap();
        net.sync(&c, "a").unwrap();
        let calls = calls.lock().unwrap();
        assert_eq!(
            calls.routes,
            vec![("a".to_string(), vec!["b 10.244.1.0/24 172.20.0.2".to_string()])]
        );
        assert_eq!(calls.masquerade.len(), 1, "written once");
        let m = &calls.masquerade[0];
        assert_eq!(m.cluster_cidrs, vec!["10.244.0.0/16".parse::<Ipv4Network>().unwrap()]);
        assert_eq!(m.non_masquerade_cidrs, vec!["192.168.0.0/16".parse::<Ipv4Network>().unwrap()]);
        let ips: Vec<String> = m.node_ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["172.20.0.1", "172.20.0.2", "172.20.0.3"]);
    }

    #[test]
    fn a_node_change_reaches_the_routes_and_a_removed_node_leaves_them() {
        let calls = Arc::new(Mutex::new(Calls::default()));
        let mut net = network(&calls, None);
        net.sync(
            &cluster(&[("a", "10.244.0.0/24", "172.20.0.1"), ("b", "10.244.1.0/24", "172.20.0.2")]),
            "a",
        )
        .unwrap();
        net.sync(
            &cluster(&[("a", "10.244.0.0/24", "172.20.0.1"), ("b", "10.244.9.0/24", "172.20.0.2")]),
            "a",
        )
        .unwrap();
        net.sync(&cluster(&[("a", "10.244.0.0/24", "172.20.0.1")]), "a").unwrap();
        let calls = calls.lock().unwrap();
        let peers: Vec<_> = calls.routes.iter().map(|(_, p)| p.clone()).collect();
        assert_eq!(
            peers,
            vec![
                vec!["b 10.244.1.0/24 172.20.0.2".to_string()],
                vec!["b 10.244.9.0/24 172.20.0.2".to_string()],
                vec![]
            ]
        );
        assert!(calls.masquerade.is_empty(), "no cluster-cidr: no masquerade");
    }

    #[test]
    fn without_this_node_in_the_model_routes_are_left_alone() {
        let calls = Arc::new(Mutex::new(Calls::default()));
        let mut net = network(&calls, None);
        // This node has no pod CIDR yet: nothing may be removed on its account.
        net.sync(&cluster(&[("a", "", "172.20.0.1"), ("b", "10.244.1.0/24", "172.20.0.2")]), "a")
            .unwrap();
        net.sync(&cluster(&[("b", "10.244.1.0/24", "172.20.0.2")]), "a").unwrap();
        assert!(calls.lock().unwrap().routes.is_empty());
    }

    #[test]
    fn a_failure_is_reported_and_retried() {
        let calls = Arc::new(Mutex::new(Calls {
            fail: true,
            ..Calls::default()
        }));
        let mut net = network(&calls, Some("10.244.0.0/16"));
        let c = cluster(&[("a", "10.244.0.0/24", "172.20.0.1"), ("b", "10.244.1.0/24", "172.20.0.2")]);
        let e = net.sync(&c, "a").unwrap_err();
        assert!(
            e.contains("routes: netlink says no") && e.contains("masquerade: nft says no"),
            "{e}"
        );
        calls.lock().unwrap().fail = false;
        net.sync(&c, "a").unwrap();
        let calls = calls.lock().unwrap();
        assert_eq!((calls.routes.len(), calls.masquerade.len()), (1, 1), "retried after the failure");
    }
}
