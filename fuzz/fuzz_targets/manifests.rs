//! Manifests from arbitrary text, through the whole policy pipeline: `parse_documents`,
//! the objects added to the conformance cluster (so that fuzzed selectors have pods and
//! namespaces to select), `Compiler::compile` for two local endpoints, the service table,
//! the map diff (`sync`) into memory, and the spec evaluator and `explain` on a few flows.
//! Nothing panics; the model reads back what it writes (`Cluster::to_yaml`); compiling is
//! deterministic; a sync from nothing leaves exactly the compiled state in the maps.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::OnceLock;

use bulkhead::datapath::services::ServiceIds;
use bulkhead::datapath::sync::{sync, MemoryMaps};
use bulkhead::datapath::DatapathState;
use bulkhead::model::{parse_documents, Cluster, Object};
use bulkhead::policy::explain::explain;
use bulkhead::policy::{evaluate, Compiler, LocalEndpoint};
use bulkhead::services::ServiceTable;
use bulkhead_api::{NamespacedName, Protocol};
use libfuzzer_sys::fuzz_target;

const BASE: &str = include_str!("../../tests/conformance/cluster/three-by-three.yaml");

fn base() -> &'static [Object] {
    static OBJECTS: OnceLock<Vec<Object>> = OnceLock::new();
    OBJECTS.get_or_init(|| parse_documents(BASE, "three-by-three.yaml").expect("the conformance cluster parses"))
}

fn local(endpoint_id: u32, namespace: &str, pod: &str, ip: [u8; 4]) -> LocalEndpoint {
    LocalEndpoint {
        endpoint_id,
        host_ifindex: 100 + endpoint_id,
        namespace: namespace.into(),
        pod: pod.into(),
        ipv4: Ipv4Addr::from(ip),
        mac: [2, 0, 0, 0, 0, ip[3]],
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let objects = match parse_documents(&text, "fuzz.yaml") {
        Ok(objects) => objects,
        Err(e) => {
            // The message names where; building it must not panic either.
            let _ = bulkhead::error_chain(&e);
            return;
        }
    };
    for o in &objects {
        let _ = (o.kind(), o.namespace(), o.name(), o.to_ref().to_string());
    }
    let cluster = Cluster::from_objects(base().iter().cloned().chain(objects));

    // What the model holds, written out, reads back to the same model.
    let yaml = cluster.to_yaml();
    let again =
        parse_documents(&yaml, "to_yaml").unwrap_or_else(|e| panic!("to_yaml does not parse back: {}\n{yaml}", bulkhead::error_chain(&e)));
    assert_eq!(Cluster::from_objects(again).to_yaml(), yaml, "to_yaml is not a fixed point");

    let locals = [local(1, "x", "a", [10, 0, 0, 1]), local(2, "y", "b", [10, 0, 0, 2])];
    let mut compiler = Compiler::new();
    let mut state = compiler.compile(&cluster, &locals);
    assert_eq!(Compiler::new().compile(&cluster, &locals), state, "compiling is not deterministic");
    // A second compile with the same compiler keeps identities and rule ids.
    assert_eq!(compiler.compile(&cluster, &locals), state, "a recompile changed the state");
    let _ = compiler.over_cap();

    let table = ServiceTable::from_cluster(&cluster);
    let _ = table.diff(&ServiceTable::default());
    let _ = ServiceIds::default().write(&table, &mut state);

    let mut maps = MemoryMaps::default();
    sync(&mut maps, &DatapathState::default(), &state).expect("memory maps do not fail");
    assert_eq!(maps.state, state, "sync from empty");
    sync(&mut maps, &state, &DatapathState::default()).expect("memory maps do not fail");
    assert_eq!(maps.state, DatapathState::default(), "sync back to empty");

    let pods: Vec<(String, String)> = cluster.pods().keys().take(4).cloned().collect();
    for from in &pods {
        for to in &pods {
            for (protocol, port) in [(Protocol::TCP, 80), (Protocol::UDP, 53), (Protocol::SCTP, 81)] {
                let _ = evaluate(&cluster, (&from.0, &from.1), (&to.0, &to.1), &protocol.to_string(), port);
                let (f, t) = (NamespacedName::new(&from.0, &from.1), NamespacedName::new(&to.0, &to.1));
                let _ = explain(&cluster, &f, &t, port, protocol);
            }
        }
    }
});
