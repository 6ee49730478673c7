//! The generated nft transaction, as JSON.

use std::net::Ipv4Addr;

use serde_json::{json, Value};

use super::*;

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn config() -> MasqueradeConfig {
    MasqueradeConfig {
        // Host bits, a duplicate and a network inside another: nft would reject the overlap.
        cluster_cidrs: vec![net("10.244.1.7/16"), net("10.244.0.0/16"), net("10.244.3.0/24")],
        non_masquerade_cidrs: vec![net("192.168.50.0/24"), net("172.16.0.0/12")],
        node_ips: vec![
            Ipv4Addr::new(198, 51, 100, 2),
            Ipv4Addr::new(198, 51, 100, 1),
            Ipv4Addr::new(198, 51, 100, 2),
        ],
    }
}

/// The transaction's commands as JSON values.
fn commands(n: &Nftables<'_>) -> Vec<Value> {
    let v = serde_json::to_value(n).unwrap();
    v["nftables"].as_array().unwrap().clone()
}

fn prefixes(set: &Value) -> Vec<String> {
    match set.get("elem") {
        None => Vec::new(),
        Some(elems) => elems
            .as_array()
            .unwrap()
            .iter()
            .map(|e| format!("{}/{}", e["prefix"]["addr"].as_str().unwrap(), e["prefix"]["len"]))
            .collect(),
    }
}

#[test]
fn replace_deletes_whatever_the_table_held_then_adds_it_in_one_transaction() {
    let cmds = commands(&masquerade_ruleset("bh-test", &config()));
    let table = json!({"family": "inet", "name": "bh-test"});
    assert_eq!(
        cmds[0],
        json!({"add": {"table": table}}),
        "add first: delete cannot fail on a fresh node"
    );
    assert_eq!(cmds[1], json!({"delete": {"table": table}}));
    assert_eq!(cmds[2], json!({"add": {"table": table}}));
    let kinds: Vec<String> = cmds
        .iter()
        .map(|c| {
            let (verb, obj) = c.as_object().unwrap().iter().next().unwrap();
            let (kind, _) = obj.as_object().unwrap().iter().next().unwrap();
            format!("{verb} {kind}")
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "add table",
            "delete table",
            "add table",
            "add set",
            "add set",
            "add set",
            "add chain",
            "add rule",
            "add chain",
            "add rule"
        ]
    );
    // Everything after the delete lives in the same table and family.
    for c in &cmds[3..] {
        let obj = c["add"].as_object().unwrap().values().next().unwrap();
        assert_eq!((obj["family"].as_str(), obj["table"].as_str()), (Some("inet"), Some("bh-test")));
    }
}

#[test]
fn sets_hold_normalised_networks() {
    let cmds = commands(&masquerade_ruleset(TABLE, &config()));
    let sets: Vec<&Value> = cmds.iter().filter_map(|c| c["add"].get("set")).collect();
    let by_name = |name: &str| *sets.iter().find(|s| s["name"] == name).unwrap();
    for s in &sets {
        assert_eq!(s["type"], "ipv4_addr");
        assert_eq!(s["flags"], json!(["interval"]));
    }
    assert_eq!(prefixes(by_name(SET_CLUSTER)), ["10.244.0.0/16"]);
    assert_eq!(prefixes(by_name(SET_NON_MASQUERADE)), ["172.16.0.0/12", "192.168.50.0/24"]);
    assert_eq!(prefixes(by_name(SET_NODES)), ["198.51.100.1/32", "198.51.100.2/32"]);
}

#[test]
fn an_empty_list_is_an_empty_set_not_a_missing_one() {
    let cmds = commands(&masquerade_ruleset(
        TABLE,
        &MasqueradeConfig {
            cluster_cidrs: vec![net("10.244.0.0/16")],
            ..MasqueradeConfig::default()
        },
    ));
    let sets: Vec<&Value> = cmds.iter().filter_map(|c| c["add"].get("set")).collect();
    assert_eq!(sets.len(), 3, "the rule refers to all three");
    let empty: Vec<&str> = sets
        .iter()
        .filter(|s| s.get("elem").is_none())
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(empty, [SET_NON_MASQUERADE, SET_NODES]);
}

#[test]
fn one_srcnat_rule_masquerades_cluster_sources_to_outside_destinations() {
    let cmds = commands(&masquerade_ruleset(TABLE, &config()));
    let chain = cmds.iter().find_map(|c| c["add"].get("chain")).unwrap();
    assert_eq!(
        (&chain["name"], &chain["type"], &chain["hook"], &chain["prio"], &chain["policy"]),
        (&json!(CHAIN), &json!("nat"), &json!("postrouting"), &json!(100), &json!("accept"))
    );
    let rules: Vec<&Value> = cmds
        .iter()
        .filter_map(|c| c["add"].get("rule"))
        .filter(|r| r["chain"] == CHAIN)
        .collect();
    assert_eq!(rules.len(), 1);
    let m = |field: &str, op: &str, set: &str| json!({"match": {"left": {"payload": {"protocol": "ip", "field": field}}, "right": format!("@{set}"), "op": op}});
    assert_eq!(
        rules[0]["expr"],
        json!([
            m("saddr", "==", SET_CLUSTER),
            m("daddr", "!=", SET_CLUSTER),
            m("daddr", "!=", SET_NON_MASQUERADE),
            m("daddr", "!=", SET_NODES),
            {"masquerade": {"flags": ["fully-random"]}}
        ])
    );
    assert_eq!(rules[0]["chain"], CHAIN);
}

#[test]
fn removal_is_add_then_delete_so_an_absent_table_is_done() {
    let cmds = commands(&removal_ruleset("gone"));
    let table = json!({"family": "inet", "name": "gone"});
    assert_eq!(cmds, [json!({"add": {"table": table}}), json!({"delete": {"table": table}})]);
}

#[test]
fn every_packet_the_node_source_nated_gets_the_snat_mark_after_srcnat() {
    let cmds = commands(&masquerade_ruleset(TABLE, &MasqueradeConfig::default()));
    let chain = cmds
        .iter()
        .filter_map(|c| c["add"].get("chain"))
        .find(|c| c["name"] == MARK_CHAIN)
        .unwrap();
    assert_eq!(
        (&chain["type"], &chain["hook"], &chain["prio"]),
        (&json!("filter"), &json!("postrouting"), &json!(101)),
        "after kube-proxy's and our own srcnat (100)"
    );
    let rule = cmds
        .iter()
        .filter_map(|c| c["add"].get("rule"))
        .find(|r| r["chain"] == MARK_CHAIN)
        .unwrap();
    assert_eq!(bulkhead_common::SNAT_MARK, 0x1000);
    assert_eq!(
        rule["expr"],
        json!([
            {"match": {"left": {"ct": {"key": "direction"}}, "right": "original", "op": "=="}},
            {"match": {"left": {"ct": {"key": "status"}}, "right": "snat", "op": "in"}},
            {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, 0x1000]}}}
        ])
    );
}
