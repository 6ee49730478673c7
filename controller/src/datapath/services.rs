//! The service table as the datapath's Service maps: a header and backend slots per
//! `{vip, port, protocol}`, one backend per `{ip, port}`, one reverse-NAT entry per Service
//! port (layouts in `bulkhead_common`, design in datapath-ebpf/SERVICES.md).
//!
//! Ids are stable while their key lives, so a sync rewrites only what changed and the
//! translation records of open connections (which name the `service_id`) stay valid. Freed
//! ids are reused as late as possible (allocation runs on, wrapping): the reverse-NAT index
//! of a connection that outlived its Service then still names nothing, not a newcomer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use bulkhead_common::{service_flags, Backend, RevNat, ServiceKey, ServiceValue, MAX_SERVICE_BACKENDS, MAX_SERVICE_ID};

use bulkhead_api::Protocol;

use crate::datapath::DatapathState;
use crate::model::SessionAffinity;
use crate::services::{self, ServiceTable};

/// Service and backend ids, kept from one compile to the next.
#[derive(Clone, Debug, Default)]
pub struct ServiceIds {
    services: BTreeMap<services::ServiceKey, u32>,
    backends: BTreeMap<(Ipv4Addr, u16), u32>,
    next_service: u32,
    next_backend: u32,
}

/// What [`ServiceIds::write`] could not fit (the agent reports it; STYLE: a full map is an
/// error and a metric, never silent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeftOut {
    /// Service ports without an id (more than `MAX_SERVICE_ID`).
    pub service_ports: usize,
    /// Backends beyond `MAX_SERVICE_BACKENDS` of one Service port.
    pub backends: usize,
    /// SCTP Service ports left to kube-proxy: a backend's port differs from the Service
    /// port, and rewriting an SCTP port means recomputing CRC32c over the whole packet,
    /// which the datapath does not do (an address-only rewrite needs no checksum change).
    pub untranslatable: usize,
}

impl LeftOut {
    /// Whether everything fitted.
    pub fn is_empty(&self) -> bool {
        *self == LeftOut::default()
    }
}

/// The next free id after `*next` in `1..=max`, wrapping; `None` when all are taken.
fn allocate(next: &mut u32, max: u32, taken: impl Fn(u32) -> bool) -> Option<u32> {
    for _ in 0..max {
        *next = if *next >= max { 1 } else { *next + 1 };
        if !taken(*next) {
            return Some(*next);
        }
    }
    None
}

impl ServiceIds {
    /// The ids the maps already use (a restarted agent's baseline): open connections carry
    /// their Service port's id in conntrack, so a new agent must keep every id it finds.
    pub fn from_state(state: &DatapathState) -> ServiceIds {
        let mut ids = ServiceIds::default();
        for (key, value) in state.services.iter().filter(|(k, _)| k.slot == 0) {
            let protocol = Protocol::from_number(key.protocol);
            let service_key = services::ServiceKey {
                vip: Ipv4Addr::from(key.vip),
                port: u16::from_be_bytes(key.dport),
                protocol,
            };
            ids.services.insert(service_key, value.service_id);
            ids.next_service = ids.next_service.max(value.service_id);
        }
        for (id, backend) in &state.backends {
            ids.backends
                .insert((Ipv4Addr::from(backend.ip), u16::from_be_bytes(backend.port)), *id);
            ids.next_backend = ids.next_backend.max(*id);
        }
        ids
    }

    /// The Service port an id names, as last written.
    pub fn key_of(&self, id: u32) -> Option<services::ServiceKey> {
        self.services.iter().find(|(_, v)| **v == id).map(|(k, _)| *k)
    }

    /// Every Service port's id, by id.
    pub fn by_id(&self) -> BTreeMap<u32, services::ServiceKey> {
        self.services.iter().map(|(k, v)| (*v, *k)).collect()
    }

    /// Writes `table` into `state`'s Service maps (replacing what they held), allocating
    /// ids for new keys and freeing those of keys gone.
    pub fn write(&mut self, table: &ServiceTable, state: &mut DatapathState) -> LeftOut {
        let mut left_out = LeftOut::default();
        state.services.clear();
        state.backends.clear();
        state.rev_nat.clear();
        self.services.retain(|k, _| table.get(k).is_some());
        let live: BTreeSet<(Ipv4Addr, u16)> = table
            .iter()
            .flat_map(|(_, e)| e.selected().into_iter().map(|b| (b.ip, b.port)))
            .collect();
        self.backends.retain(|k, _| live.contains(k));
        // Taken ids, kept up to date as ids are handed out (one set, not one per allocation).
        let mut used_services: BTreeSet<u32> = self.services.values().copied().collect();
        let mut used_backends: BTreeSet<u32> = self.backends.values().copied().collect();
        for (key, entry) in table.iter() {
            if key.protocol == Protocol::SCTP && entry.selected().iter().any(|b| b.port != key.port) {
                left_out.untranslatable += 1;
                continue;
            }
            let id = match self.services.get(key) {
                Some(id) => *id,
                None => {
                    let Some(id) = allocate(&mut self.next_service, MAX_SERVICE_ID, |i| used_services.contains(&i)) else {
                        left_out.service_ports += 1;
                        continue;
                    };
                    self.services.insert(*key, id);
                    used_services.insert(id);
                    id
                }
            };
            let vip = key.vip.octets();
            let protocol = key.protocol.number();
            let selected = entry.selected();
            let count = selected.len().min(usize::from(MAX_SERVICE_BACKENDS));
            left_out.backends += selected.len() - count;
            for (i, b) in selected.iter().take(count).enumerate() {
                let backend_id = match self.backends.get(&(b.ip, b.port)) {
                    Some(id) => *id,
                    None => {
                        let Some(id) = allocate(&mut self.next_backend, u32::MAX, |i| used_backends.contains(&i)) else {
                            left_out.backends += 1;
                            continue;
                        };
                        self.backends.insert((b.ip, b.port), id);
                        used_backends.insert(id);
                        id
                    }
                };
                let slot = ServiceValue {
                    backend_id,
                    service_id: id,
                    ..Default::default()
                };
                // i < MAX_SERVICE_BACKENDS, which fits a u16 slot.
                state
                    .services
                    .insert(ServiceKey::new(vip, key.port, protocol, (i + 1) as u16), slot);
                let backend = Backend {
                    ip: b.ip.octets(),
                    port: b.port.to_be_bytes(),
                    ..Default::default()
                };
                state.backends.insert(backend_id, backend);
            }
            let (flags, affinity_timeout_s) = match entry.affinity {
                SessionAffinity::None => (0, 0),
                SessionAffinity::ClientIp { timeout_seconds } => (service_flags::AFFINITY_CLIENT_IP, timeout_seconds),
            };
            let header = ServiceValue {
                backend_id: 0,
                backend_count: count as u16,
                flags,
                _pad: 0,
                affinity_timeout_s,
                service_id: id,
            };
            state.services.insert(ServiceKey::new(vip, key.port, protocol, 0), header);
            let rev = RevNat {
                vip,
                port: key.port.to_be_bytes(),
                _pad: [0; 2],
            };
            state.rev_nat.insert(id, rev);
        }
        left_out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_documents, Cluster};

    /// Service `web` (10.96.0.20:80/TCP → 8080, `extra` spec lines) with ready endpoints `ips`.
    fn table(extra: &str, ips: &[&str]) -> ServiceTable {
        let endpoints: Vec<String> = ips
            .iter()
            .map(|ip| format!("{{addresses: [{ip}], conditions: {{ready: true}}}}"))
            .collect();
        let yaml = format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: x}}\n\
             spec:\n  clusterIP: \"10.96.0.20\"\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n{extra}\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-1, namespace: x, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{}]\n",
            endpoints.join(", ")
        );
        ServiceTable::from_cluster(&Cluster::from_objects(parse_documents(&yaml, "test.yaml").unwrap()))
    }

    #[test]
    fn a_service_port_becomes_a_header_slots_backends_and_a_reverse_nat_entry() {
        let mut ids = ServiceIds::default();
        let mut state = DatapathState::default();
        let affinity = "  sessionAffinity: ClientIP\n";
        let left = ids.write(&table(affinity, &["10.244.1.2", "10.244.1.3"]), &mut state);
        assert_eq!(left, LeftOut::default());
        let vip = [10, 96, 0, 20];
        let header = state.services[&ServiceKey::new(vip, 80, 6, 0)];
        assert_eq!(
            (header.backend_count, header.flags, header.affinity_timeout_s, header.service_id),
            (2, service_flags::AFFINITY_CLIENT_IP, 10_800, 1)
        );
        let slot1 = state.services[&ServiceKey::new(vip, 80, 6, 1)];
        let slot2 = state.services[&ServiceKey::new(vip, 80, 6, 2)];
        assert_eq!((slot1.service_id, slot2.service_id), (1, 1));
        let b = |id: u32| (Ipv4Addr::from(state.backends[&id].ip), u16::from_be_bytes(state.backends[&id].port));
        assert_eq!(b(slot1.backend_id), (Ipv4Addr::new(10, 244, 1, 2), 8080));
        assert_eq!(b(slot2.backend_id), (Ipv4Addr::new(10, 244, 1, 3), 8080));
        assert_eq!(
            state.rev_nat[&1],
            RevNat {
                vip,
                port: 80u16.to_be_bytes(),
                _pad: [0; 2]
            }
        );

        // A backend leaves: ids of what stays are kept; the gone backend's entry goes.
        let kept = slot2.backend_id;
        let mut next = state.clone();
        ids.write(&table(affinity, &["10.244.1.3"]), &mut next);
        assert_eq!(next.services[&ServiceKey::new(vip, 80, 6, 0)].backend_count, 1);
        assert_eq!(next.services[&ServiceKey::new(vip, 80, 6, 1)].backend_id, kept);
        assert_eq!(next.backends.keys().copied().collect::<Vec<_>>(), [kept]);
        assert_eq!(next.rev_nat.keys().copied().collect::<Vec<_>>(), [1]);

        // No endpoint: the header stays, with no backend (the datapath refuses at once).
        ids.write(&table("", &[]), &mut next);
        let header = next.services[&ServiceKey::new(vip, 80, 6, 0)];
        assert_eq!((header.backend_count, header.flags, header.service_id), (0, 0, 1));
        assert!(next.backends.is_empty());
    }

    #[test]
    fn a_restarted_agent_keeps_the_ids_the_maps_hold() {
        let mut ids = ServiceIds::default();
        let mut state = DatapathState::default();
        ids.write(&table("", &["10.244.1.2", "10.244.1.3"]), &mut state);
        // A new agent: same table, ids read from the maps, so nothing is rewritten.
        let mut restarted = ServiceIds::from_state(&state);
        let mut again = DatapathState::default();
        assert_eq!(
            restarted.write(&table("", &["10.244.1.2", "10.244.1.3"]), &mut again),
            LeftOut::default()
        );
        assert_eq!(again, state);
        let key = services::ServiceKey {
            vip: Ipv4Addr::new(10, 96, 0, 20),
            port: 80,
            protocol: Protocol::TCP,
        };
        assert_eq!(restarted.key_of(1), Some(key));
        assert_eq!(restarted.by_id().into_iter().collect::<Vec<_>>(), [(1, key)]);
        // A new backend gets a fresh id, not one in use.
        restarted.write(&table("", &["10.244.1.2", "10.244.1.3", "10.244.1.4"]), &mut again);
        assert_eq!(again.backends.len(), 3);
    }

    #[test]
    fn an_sctp_port_with_a_different_target_port_is_left_to_kube_proxy() {
        let yaml = "---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: x}\n\
                    spec:\n  clusterIP: \"10.96.0.30\"\n  ports: [{name: a, port: 9, protocol: SCTP, targetPort: 9}, \
                    {name: b, port: 10, protocol: SCTP, targetPort: 11}]\n\
                    ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                    metadata: {name: s-1, namespace: x, labels: {kubernetes.io/service-name: s}}\n\
                    addressType: IPv4\nports: [{name: a, port: 9, protocol: SCTP}, {name: b, port: 11, protocol: SCTP}]\n\
                    endpoints: [{addresses: [10.244.1.2]}]\n";
        let table = ServiceTable::from_cluster(&Cluster::from_objects(parse_documents(yaml, "t.yaml").unwrap()));
        let mut state = DatapathState::default();
        let left = ServiceIds::default().write(&table, &mut state);
        assert_eq!(left.untranslatable, 1);
        let headers: Vec<u16> = state
            .services
            .keys()
            .filter(|k| k.slot == 0)
            .map(|k| u16::from_be_bytes(k.dport))
            .collect();
        assert_eq!(headers, [9]);
    }

    #[test]
    fn ids_wrap_and_skip_taken_ones() {
        let mut next = 0;
        assert_eq!(allocate(&mut next, 3, |_| false), Some(1));
        assert_eq!(allocate(&mut next, 3, |i| i == 2), Some(3));
        assert_eq!(allocate(&mut next, 3, |i| i == 3), Some(1));
        assert_eq!(allocate(&mut next, 3, |_| true), None);
    }
}
