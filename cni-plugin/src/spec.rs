//! CNI specification types: versions, error codes, and the JSON the plugin prints.

use std::net::Ipv4Addr;

use bulkhead_api::mac::{self, MacAddr6};
use serde_json::{json, Value};

/// The newest spec version this plugin implements.
pub const LATEST_VERSION: &str = "1.1.0";

/// Every spec version this plugin accepts, as VERSION reports them.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The link-local gateway every pod routes through; the host veth answers for it.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

pub use bulkhead_api::code;

/// A spec version a configuration may request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    /// 0.3.0.
    V0_3_0,
    /// 0.3.1.
    V0_3_1,
    /// 0.4.0.
    V0_4_0,
    /// 1.0.0.
    V1_0_0,
    /// 1.1.0.
    V1_1_0,
}

impl CniVersion {
    /// Parses a supported version string.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "0.3.0" => Self::V0_3_0,
            "0.3.1" => Self::V0_3_1,
            "0.4.0" => Self::V0_4_0,
            "1.0.0" => Self::V1_0_0,
            "1.1.0" => Self::V1_1_0,
            _ => return None,
        })
    }

    /// The version string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// CHECK exists from 0.4.0 on.
    pub fn supports_check(self) -> bool {
        self >= Self::V0_4_0
    }
}

/// One interface in a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// MAC, printed `aa:bb:cc:dd:ee:ff`.
    pub mac: MacAddr6,
    /// The netns path for interfaces inside the container.
    pub sandbox: Option<String>,
    /// MTU, reported from 1.1.0 on.
    pub mtu: Option<u32>,
}

/// What ADD attached, in spec-neutral form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddResult {
    /// The host-side veth.
    pub host: Interface,
    /// The pod-side interface.
    pub pod: Interface,
    /// The pod's address.
    pub ip: Ipv4Addr,
}

impl AddResult {
    /// Renders the result JSON in `version`'s format.
    pub fn to_json(&self, version: CniVersion) -> Value {
        let iface = |i: &Interface| {
            let mut v = json!({ "name": i.name, "mac": mac::to_text(i.mac) });
            if let Some(s) = &i.sandbox {
                v["sandbox"] = json!(s);
            }
            if let (Some(mtu), CniVersion::V1_1_0) = (i.mtu, version) {
                v["mtu"] = json!(mtu);
            }
            v
        };
        let mut ip = json!({ "address": format!("{}/32", self.ip), "gateway": GATEWAY.to_string(), "interface": 1 });
        if version < CniVersion::V1_0_0 {
            // 0.x results name the IP family; 1.0 dropped the field.
            ip["version"] = json!("4");
        }
        json!({
            "cniVersion": version.as_str(),
            "interfaces": [iface(&self.host), iface(&self.pod)],
            "ips": [ip],
            "routes": [{ "dst": "0.0.0.0/0", "gw": GATEWAY.to_string() }],
            "dns": {},
        })
    }
}

/// Appends `ours` to a chain's `prevResult`, as the spec asks of a plugin that is not first:
/// the output carries everything earlier plugins reported plus this plugin's additions.
///
/// Our `ips[].interface` indices are shifted past the earlier interfaces; identical routes
/// are listed once; earlier DNS settings win over our empty ones. A `prevResult` that is not
/// a JSON object carries nothing to keep.
pub fn chain_result(prev: Option<&Value>, ours: Value) -> Value {
    let Some(Value::Object(prev)) = prev else {
        return ours;
    };
    let list = |v: &Value, key: &str| v.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
    let prev = Value::Object(prev.clone());
    let mut interfaces = list(&prev, "interfaces");
    let offset = interfaces.len() as u64;
    interfaces.extend(list(&ours, "interfaces"));
    let mut ips = list(&prev, "ips");
    ips.extend(list(&ours, "ips").into_iter().map(|mut ip| {
        if let Some(i) = ip.get("interface").and_then(Value::as_u64) {
            ip["interface"] = json!(i + offset);
        }
        ip
    }));
    let mut routes = list(&prev, "routes");
    for r in list(&ours, "routes") {
        if !routes.contains(&r) {
            routes.push(r);
        }
    }
    let mut out = prev;
    out["cniVersion"] = ours["cniVersion"].clone();
    out["interfaces"] = json!(interfaces);
    out["ips"] = json!(ips);
    out["routes"] = json!(routes);
    let prev_dns_empty = out.get("dns").and_then(Value::as_object).is_none_or(serde_json::Map::is_empty);
    if prev_dns_empty {
        out["dns"] = ours["dns"].clone();
    }
    out
}

/// The VERSION result.
pub fn version_result() -> Value {
    json!({ "cniVersion": LATEST_VERSION, "supportedVersions": SUPPORTED_VERSIONS })
}

/// The spec's error JSON.
pub fn error_json(version: &str, code: u32, msg: &str, details: &str) -> Value {
    json!({ "cniVersion": version, "code": code, "msg": msg, "details": details })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AddResult {
        AddResult {
            host: Interface {
                name: "bh0123456789a".into(),
                mac: "02:00:00:00:00:01".parse().unwrap(),
                sandbox: None,
                mtu: None,
            },
            pod: Interface {
                name: "eth0".into(),
                mac: "02:00:00:00:00:02".parse().unwrap(),
                sandbox: Some("/run/netns/p".into()),
                mtu: None,
            },
            ip: Ipv4Addr::new(10, 244, 0, 2),
        }
    }

    #[test]
    fn results_follow_the_requested_version() {
        let v1 = sample().to_json(CniVersion::V1_1_0);
        assert_eq!(v1["cniVersion"], "1.1.0");
        assert_eq!(
            v1["ips"][0],
            json!({"address":"10.244.0.2/32","gateway":"169.254.1.1","interface":1})
        );
        assert_eq!(v1["interfaces"][1]["sandbox"], "/run/netns/p");
        assert!(v1["interfaces"][0].get("sandbox").is_none());
        assert_eq!(v1["routes"], json!([{"dst":"0.0.0.0/0","gw":"169.254.1.1"}]));
        let v0 = sample().to_json(CniVersion::V0_3_1);
        assert_eq!(v0["ips"][0]["version"], "4");
        assert_eq!(v0["cniVersion"], "0.3.1");
    }

    #[test]
    fn chained_results_keep_earlier_plugins_output() {
        let ours = sample().to_json(CniVersion::V1_0_0);
        assert_eq!(chain_result(None, ours.clone()), ours);
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "lo0", "mac": "00:00:00:00:00:00", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "10.1.0.5/24", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
            "dns": {"nameservers": ["10.0.0.10"]},
        });
        let out = chain_result(Some(&prev), ours);
        assert_eq!(out["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(out["interfaces"][2]["name"], "eth0");
        assert_eq!(out["ips"][0]["interface"], 0);
        assert_eq!(out["ips"][1]["interface"], 2);
        assert_eq!(out["ips"][1]["address"], "10.244.0.2/32");
        assert_eq!(out["routes"].as_array().unwrap().len(), 1);
        assert_eq!(out["dns"]["nameservers"][0], "10.0.0.10");
    }

    #[test]
    fn macs_are_lowercase_colon_separated() {
        let mut r = sample();
        r.pod.mac = "AA:0B:00:01:02:FF".parse().unwrap();
        assert_eq!(r.to_json(CniVersion::V1_0_0)["interfaces"][1]["mac"], "aa:0b:00:01:02:ff");
    }
}
