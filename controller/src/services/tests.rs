//! Table-driven: manifests in, the service table rendered one line per entry out.

use super::*;
use crate::model::parse_documents;

/// `VIP:PORT/PROTO ns/svc[name] affinity -> all backends | selected`, one line per entry.
fn render(table: &ServiceTable) -> Vec<String> {
    let backend = |b: &Backend| {
        let mut s = format!("{}:{}", b.ip, b.port);
        for (flag, name) in [(b.ready, "ready"), (b.serving, "serving"), (b.terminating, "terminating")] {
            if flag {
                s.push(' ');
                s.push_str(name);
            }
        }
        if let Some(pod) = &b.pod {
            s.push_str(&format!(" pod={pod}"));
        }
        if let Some(node) = &b.node {
            s.push_str(&format!(" node={node}"));
        }
        format!("[{s}]")
    };
    table
        .iter()
        .map(|(k, e)| {
            let affinity = match e.affinity {
                SessionAffinity::None => "-".to_string(),
                SessionAffinity::ClientIp { timeout_seconds } => format!("ClientIP/{timeout_seconds}s"),
            };
            let all: Vec<String> = e.backends.iter().map(backend).collect();
            let selected: Vec<String> = e.selected().iter().map(|b| format!("{}:{}", b.ip, b.port)).collect();
            format!(
                "{}:{}/{} {}[{}] {affinity} -> {} | {}",
                k.vip,
                k.port,
                k.protocol,
                e.service,
                e.port_name,
                all.join(" "),
                selected.join(" ")
            )
        })
        .collect()
}

fn table(yaml: &str) -> ServiceTable {
    let objects = parse_documents(yaml, "test.yaml").expect("test manifests parse");
    ServiceTable::from_cluster(&Cluster::from_objects(objects))
}

fn service(ns: &str, name: &str, ip: &str, extra: &str, ports: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  clusterIP: \"{ip}\"\n  ports: {ports}\n{extra}"
    )
}

fn slice(ns: &str, name: &str, svc: &str, ports: &str, endpoints: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
         addressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n"
    )
}

fn ep(ip: &str, pod: &str, conditions: &str) -> String {
    format!(
        "{{addresses: [{ip}], conditions: {{{conditions}}}, nodeName: node-a, \
         targetRef: {{kind: Pod, namespace: x, name: {pod}}}}}"
    )
}

#[test]
fn service_tables_resolve_as_kube_proxy_does() {
    let http = "[{name: http, port: 80, targetPort: 8080}]";
    let slice_http = "[{name: http, port: 8080, protocol: TCP}]";
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "one Service's endpoints split over two slices merge; other Services' slices and \
             the same name in another namespace do not",
            [
                service("x", "web", "10.96.0.20", "", http),
                slice(
                    "x",
                    "web-abc",
                    "web",
                    slice_http,
                    &format!("[{}, {}]", ep("10.244.1.2", "a", ""), ep("10.244.1.3", "b", "ready: true")),
                ),
                slice(
                    "x",
                    "web-def",
                    "web",
                    slice_http,
                    &format!("[{}]", ep("10.244.2.4", "c", "ready: true")),
                ),
                slice("x", "other-1", "other", slice_http, &format!("[{}]", ep("10.244.9.9", "z", ""))),
                slice("y", "web-xyz", "web", slice_http, &format!("[{}]", ep("10.244.9.8", "z", ""))),
            ]
            .concat(),
            vec![
                "10.96.0.20:80/TCP x/web[http] - -> \
                 [10.244.1.2:8080 ready serving pod=x/a node=node-a] \
                 [10.244.1.3:8080 ready serving pod=x/b node=node-a] \
                 [10.244.2.4:8080 ready serving pod=x/c node=node-a] | 10.244.1.2:8080 10.244.1.3:8080 10.244.2.4:8080",
            ],
        ),
        (
            "terminating endpoints: ignored while one is ready; serving ones used when none is; \
             non-serving ones never",
            [
                service("x", "mixed", "10.96.0.21", "", http),
                slice(
                    "x",
                    "mixed-1",
                    "mixed",
                    slice_http,
                    &format!(
                        "[{}, {}]",
                        ep("10.244.1.2", "a", "ready: true"),
                        ep("10.244.1.3", "b", "ready: false, serving: true, terminating: true")
                    ),
                ),
                service("x", "draining", "10.96.0.22", "", http),
                slice(
                    "x",
                    "draining-1",
                    "draining",
                    slice_http,
                    &format!(
                        "[{}, {}]",
                        ep("10.244.1.4", "c", "ready: false, serving: true, terminating: true"),
                        ep("10.244.1.5", "d", "ready: false, serving: false, terminating: true")
                    ),
                ),
                service("x", "gone", "10.96.0.23", "", http),
                slice(
                    "x",
                    "gone-1",
                    "gone",
                    slice_http,
                    &format!(
                        "[{}, {}]",
                        ep("10.244.1.6", "e", "ready: false, serving: false, terminating: true"),
                        ep("10.244.1.7", "f", "ready: false, serving: false")
                    ),
                ),
            ]
            .concat(),
            vec![
                "10.96.0.21:80/TCP x/mixed[http] - -> [10.244.1.2:8080 ready serving pod=x/a node=node-a] \
                 [10.244.1.3:8080 serving terminating pod=x/b node=node-a] | 10.244.1.2:8080",
                "10.96.0.22:80/TCP x/draining[http] - -> [10.244.1.4:8080 serving terminating pod=x/c node=node-a] \
                 [10.244.1.5:8080 terminating pod=x/d node=node-a] | 10.244.1.4:8080",
                "10.96.0.23:80/TCP x/gone[http] - -> [10.244.1.6:8080 terminating pod=x/e node=node-a] \
                 [10.244.1.7:8080 pod=x/f node=node-a] | ",
            ],
        ),
        (
            "a named targetPort resolves per pod: one slice per distinct port set",
            [
                service("x", "api", "10.96.0.30", "", "[{name: http, port: 80, targetPort: web}]"),
                slice(
                    "x",
                    "api-p8080",
                    "api",
                    "[{name: http, port: 8080}]",
                    &format!("[{}]", ep("10.244.1.2", "old", "")),
                ),
                slice(
                    "x",
                    "api-p9090",
                    "api",
                    "[{name: http, port: 9090}]",
                    &format!("[{}]", ep("10.244.1.3", "new", "")),
                ),
            ]
            .concat(),
            vec![
                "10.96.0.30:80/TCP x/api[http] - -> [10.244.1.2:8080 ready serving pod=x/old node=node-a] \
                 [10.244.1.3:9090 ready serving pod=x/new node=node-a] | 10.244.1.2:8080 10.244.1.3:9090",
            ],
        ),
        (
            "a selector-less Service with a hand-written slice: unnamed ports match, no pod",
            [
                service("x", "external-db", "10.96.0.40", "", "[{port: 5432}]"),
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {name: external-db-1, namespace: x, labels: {kubernetes.io/service-name: external-db}}\n\
                 addressType: IPv4\nports: [{port: 5432}]\nendpoints: [{addresses: [192.0.2.10, 192.0.2.11]}]\n"
                    .to_string(),
            ]
            .concat(),
            vec!["10.96.0.40:5432/TCP x/external-db[] - -> [192.0.2.10:5432 ready serving] | 192.0.2.10:5432"],
        ),
        (
            "headless and unallocated Services have no entries",
            [
                service("x", "db", "None", "  selector: {app: db}\n", http),
                slice("x", "db-1", "db", slice_http, &format!("[{}]", ep("10.244.1.2", "db-0", ""))),
                service("x", "pending", "", "", http),
            ]
            .concat(),
            vec![],
        ),
        (
            "ports match by name and protocol; a port without endpoints is an empty entry; \
             session affinity with and without a timeout",
            [
                service(
                    "kube-system",
                    "dns",
                    "10.96.0.10",
                    "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
                    "[{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}, \
                     {name: metrics, port: 9153, protocol: TCP}]",
                ),
                slice(
                    "kube-system",
                    "dns-1",
                    "dns",
                    "[{name: dns-tcp, port: 53, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]",
                    "[{addresses: [10.244.1.2]}]",
                ),
                service("x", "sticky", "10.96.0.50", "  sessionAffinity: ClientIP\n", http),
            ]
            .concat(),
            vec![
                "10.96.0.10:53/TCP kube-system/dns[dns-tcp] ClientIP/60s -> [10.244.1.2:53 ready serving] | 10.244.1.2:53",
                "10.96.0.10:53/UDP kube-system/dns[dns] ClientIP/60s -> [10.244.1.2:5353 ready serving] | 10.244.1.2:5353",
                "10.96.0.10:9153/TCP kube-system/dns[metrics] ClientIP/60s ->  | ",
                "10.96.0.50:80/TCP x/sticky[http] ClientIP/10800s ->  | ",
            ],
        ),
        (
            "an address in two slices (mid-move) is one backend, its most usable copy",
            [
                service("x", "moving", "10.96.0.60", "", http),
                slice(
                    "x",
                    "moving-1",
                    "moving",
                    slice_http,
                    &format!("[{}]", ep("10.244.1.2", "a", "ready: false, serving: true, terminating: true")),
                ),
                slice(
                    "x",
                    "moving-2",
                    "moving",
                    slice_http,
                    &format!("[{}]", ep("10.244.1.2", "a", "ready: true")),
                ),
            ]
            .concat(),
            vec!["10.96.0.60:80/TCP x/moving[http] - -> [10.244.1.2:8080 ready serving pod=x/a node=node-a] | 10.244.1.2:8080"],
        ),
    ];
    for (what, yaml, want) in cases {
        let got = render(&table(&yaml));
        let want: Vec<String> = want
            .into_iter()
            .map(|w| w.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        let got: Vec<String> = got
            .into_iter()
            .map(|w| w.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn lookups_by_key_and_by_service() {
    let t = table(
        &[
            service("x", "web", "10.96.0.20", "", "[{name: http, port: 80}, {name: https, port: 443}]"),
            service("x", "db", "10.96.0.21", "", "[{port: 5432}]"),
        ]
        .concat(),
    );
    assert_eq!(t.len(), 3);
    assert!(!t.is_empty());
    let key = ServiceKey {
        vip: Ipv4Addr::new(10, 96, 0, 20),
        port: 443,
        protocol: Protocol::TCP,
    };
    assert_eq!(t.get(&key).map(|e| e.port_name.as_str()), Some("https"));
    assert!(t
        .get(&ServiceKey {
            protocol: Protocol::UDP,
            ..key
        })
        .is_none());
    let web = NamespacedName::new("x", "web");
    assert_eq!(t.of_service(&web).map(|(k, _)| k.port).collect::<Vec<_>>(), [80, 443]);
    assert!(ServiceTable::from_cluster(&Cluster::new()).is_empty());
}

#[test]
fn diffs_name_new_changed_and_removed_keys() {
    let http = "[{name: http, port: 80}]";
    let before = table(
        &[
            service("x", "a", "10.96.0.1", "", http),
            service("x", "b", "10.96.0.2", "", http),
            service("x", "c", "10.96.0.3", "", http),
        ]
        .concat(),
    );
    let after = table(
        &[
            service("x", "a", "10.96.0.1", "", http),
            service("x", "b", "10.96.0.2", "", http),
            slice("x", "b-1", "b", "[{name: http, port: 80}]", "[{addresses: [10.244.1.2]}]"),
            service("x", "d", "10.96.0.4", "", http),
        ]
        .concat(),
    );
    let key = |last: u8| ServiceKey {
        vip: Ipv4Addr::new(10, 96, 0, last),
        port: 80,
        protocol: Protocol::TCP,
    };
    assert_eq!(
        after.diff(&before),
        ServiceTableDiff {
            upserted: vec![key(2), key(4)],
            removed: vec![key(3)],
        }
    );
    assert_eq!(after.diff(&after), ServiceTableDiff::default());
}
