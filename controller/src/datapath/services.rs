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
    fn ids_wrap_and_skip_taken_ones() {
        let mut next = 0;
        assert_eq!(allocate(&mut next, 3, |_| false), Some(1));
        assert_eq!(allocate(&mut next, 3, |i| i == 2), Some(3));
        assert_eq!(allocate(&mut next, 3, |i| i == 3), Some(1));
        assert_eq!(allocate(&mut next, 3, |_| true), None);
    }
}
