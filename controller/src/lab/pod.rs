//! Lab pods: namespaces wired by the real CNI plugin, each running a small server.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use bulkhead_hostnet::netns;

use super::model::{Kind, Object, ObjectRef, PodInfo};
use super::serve::{self, Ports};
use super::services;
use super::state::{LabPaths, LabState, NodeState, PodState};
use super::LabError;

/// A pod that CNI ADD wired: its record, server pid and IP.
type CreatedPod = (PodState, Option<u32>, Ipv4Addr);

/// The ports a pod declares: (TCP ports, UDP ports).
/// SCTP ports are left out: SCTP sockets do not exist on the lab's kernel.
pub(super) fn declared_ports(pod: &PodInfo) -> (Vec<u16>, Vec<u16>) {
    pod.declared_ports()
}

/// FNV-1a, for short stable name suffixes.
pub(super) fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// The netns name of a pod: `bh<id>-<ns>-<pod>`, hashed when long or ambiguous.
fn pod_netns_name(id: &str, namespace: &str, name: &str) -> String {
    let plain = format!("bh{id}-{namespace}-{name}");
    // A '-' in the namespace makes `a-b/c` and `a/b-c` collide; long names are unwieldy.
    if plain.len() <= 40 && !namespace.contains('-') {
        return plain;
    }
    let short: String = plain.chars().take(30).collect();
    format!("{short}-{:08x}", fnv1a(&format!("{namespace}/{name}")))
}

fn object_ref(object: &Object) -> ObjectRef {
    object.to_ref()
}

fn pod_key(pod: &PodInfo) -> (String, String) {
    (pod.namespace.clone(), pod.name.clone())
}

/// Applies objects: policies and namespaces go to the model, new pods are created.
pub fn apply(paths: &LabPaths, state: &mut LabState, mut objects: Vec<Object>) -> Result<(), LabError> {
    // Check what the model cannot: that a pinned node exists. Nothing has changed yet.
    for object in &objects {
        if let Object::Pod(pod) = object {
            if let Some(node) = pod.node.as_deref() {
                if state.node(node).is_none() {
                    let (ns, name) = pod_key(pod);
                    return Err(LabError::Unsupported {
                        object: format!("Pod {ns}/{name}"),
                        message: format!("spec.nodeName: no lab node named \"{node}\""),
                    });
                }
            }
        }
    }
    let mut cluster = super::load_cluster(paths)?;
    // ClusterIPs are checked and allocated, as the API server does, before anything changes.
    let service_cidr = services::service_cidr(state)?;
    services::admit(&cluster, &mut objects, service_cidr)?;
    let mut created: Vec<PodState> = Vec::new();
    let mut restarted: Vec<PodState> = Vec::new();
    for object in objects {
        let Object::Pod(mut pod) = object else {
            cluster.apply(object);
            continue;
        };
        let (namespace, name) = pod_key(&pod);
        let (tcp_ports, udp_ports) = declared_ports(&pod);
        let node = if let Some(existing) = state.pod_mut(&namespace, &name) {
            // Same pod, new spec: labels change in place, the IP stays.
            if existing.tcp_ports != tcp_ports || existing.udp_ports != udp_ports {
                existing.tcp_ports = tcp_ports;
                existing.udp_ports = udp_ports;
                restarted.push(existing.clone());
            }
            existing.node.clone()
        } else {
            let node = match pod.node.as_deref() {
                Some(node) => node.to_string(),
                None => least_loaded(state),
            };
            let lab_pod = PodState {
                netns: pod_netns_name(&state.id, &namespace, &name),
                container_id: format!("bulkhead-lab-{}-{namespace}-{name}", state.id),
                namespace: namespace.clone(),
                name: name.clone(),
                node: node.clone(),
                ip: None,
                server_pid: None,
                tcp_ports,
                udp_ports,
            };
            state.pods.push(lab_pod.clone());
            created.push(lab_pod);
            node
        };
        pod.node = Some(node.into());
        pod.ipv4 = state.pod(&namespace, &name).and_then(|p| p.ip.as_deref()?.parse().ok());
        cluster.apply(Object::Pod(pod));
    }
    // Recorded before anything is created, so `down` finds it after a crash.
    paths.save(state)?;
    super::publish(paths, state, &mut cluster)?;

    let results: Vec<Result<CreatedPod, LabError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = created
            .iter()
            .map(|pod| {
                let node = state.node(&pod.node).cloned().unwrap_or_default();
                scope.spawn(move || create_pod(paths, &node, pod).map(|(pid, ip)| (pod.clone(), pid, ip)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(LabError::Cni {
                        command: "ADD",
                        pod: "?".into(),
                        message: "pod thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut first_error = None;
    for result in results {
        match result {
            Ok((pod, pid, ip)) => {
                if let Some(p) = state.pod_mut(&pod.namespace, &pod.name) {
                    p.server_pid = pid;
                    p.ip = Some(ip.to_string());
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    for pod in &restarted {
        kill_server(paths, pod);
        let pid = start_server(paths, pod)?;
        if let Some(p) = state.pod_mut(&pod.namespace, &pod.name) {
            p.server_pid = pid;
        }
    }
    paths.save(state)?;
    if !created.is_empty() {
        for object in cluster.objects() {
            if let Object::Pod(mut pod) = object {
                let (ns, name) = pod_key(&pod);
                if let Some(ip) = state.pod(&ns, &name).and_then(|p| p.ip.as_deref()?.parse().ok()) {
                    pod.ipv4 = Some(ip);
                    cluster.apply(Object::Pod(pod));
                }
            }
        }
        super::publish(paths, state, &mut cluster)?;
    }
    first_error.map_or(Ok(()), Err)
}

/// The node with the fewest pods (the first on a tie).
fn least_loaded(state: &LabState) -> String {
    state
        .nodes
        .iter()
        .min_by_key(|n| state.pods.iter().filter(|p| p.node == n.name).count())
        .map(|n| n.name.clone())
        .unwrap_or_default()
}

/// Creates a pod's namespace, starts its server and wires it with CNI ADD.
fn create_pod(paths: &LabPaths, node: &NodeState, pod: &PodState) -> Result<(Option<u32>, Ipv4Addr), LabError> {
    netns::create_named(&pod.netns).map_err(|source| LabError::Netns {
        netns: pod.netns.clone(),
        source,
    })?;
    let pid = start_server(paths, pod)?;
    let result = cni(paths, node, pod, "ADD")?;
    let ip = serde_json::from_str::<serde_json::Value>(&result)
        .ok()
        .and_then(|v| {
            v.pointer("/ips/0/address")
                .and_then(|a| a.as_str())
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok())
        })
        .ok_or_else(|| LabError::Cni {
            command: "ADD",
            pod: pod.key(),
            message: format!("result has no ips[0].address: {result}"),
        })?;
    Ok((pid, ip))
}

/// The CNI plugin: `BULKHEAD_CNI`, or `bulkhead-cni` next to this binary.
fn cni_binary() -> Result<PathBuf, LabError> {
    if let Some(p) = std::env::var_os("BULKHEAD_CNI") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|source| LabError::Spawn {
        what: "bulkhead-cni: cannot find own executable".into(),
        source,
    })?;
    Ok(exe.with_file_name("bulkhead-cni"))
}

/// Runs the CNI plugin as a runtime does, from the node's namespace; returns its stdout.
fn cni(paths: &LabPaths, node: &NodeState, pod: &PodState, command: &'static str) -> Result<String, LabError> {
    let bin = cni_binary()?;
    let state_dir = paths.node_dir(&node.name);
    let config = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "bulkhead",
        "type": "bulkhead-cni",
        "subnet": node.pod_cidr,
        "agentSocket": state_dir.join("agent.sock"),
        "dataDir": state_dir.join("cni"),
    });
    let mut cmd = Command::new(&bin);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", netns::named_path(&pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                pod.namespace, pod.name, pod.container_id
            ),
        )
        .env("CNI_PATH", bin.parent().unwrap_or(&bin))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |source| LabError::Spawn {
        what: format!("{} ({command} for pod {})", bin.display(), pod.key()),
        source,
    };
    let output = netns::run_in(&netns::named_path(&node.netns), move || {
        let mut child = cmd.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(config.to_string().as_bytes())?;
        }
        child.wait_with_output()
    })
    .map_err(|source| LabError::Netns {
        netns: node.netns.clone(),
        source,
    })?
    .map_err(spawn_err)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    // The spec's error JSON: {cniVersion, code, msg, details}.
    let message = match serde_json::from_str::<serde_json::Value>(&stdout) {
        Ok(v) if v.get("msg").is_some() => {
            let msg = v["msg"].as_str().unwrap_or_default();
            let details = v.get("details").and_then(|d| d.as_str()).filter(|d| !d.is_empty());
            let code = v.get("code").and_then(|c| c.as_u64()).unwrap_or_default();
            match details {
                Some(d) => format!("{msg}: {d} (code {code})"),
                None => format!("{msg} (code {code})"),
            }
        }
        _ => format!(
            "{} exited with {}: {}{}",
            bin.display(),
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    };
    Err(LabError::Cni {
        command,
        pod: pod.key(),
        message,
    })
}

/// Starts the pod's server inside its namespace, detached; `None` when it serves nothing.
fn start_server(paths: &LabPaths, pod: &PodState) -> Result<Option<u32>, LabError> {
    let ports = Ports {
        tcp: pod.tcp_ports.clone(),
        udp: pod.udp_ports.clone(),
        ..Ports::default()
    };
    if ports.is_empty() {
        return Ok(None);
    }
    serve::spawn(paths, &pod.netns, &pod.key(), &ports, &paths.pod_log(pod)).map(Some)
}

/// Stops a pod's server.
fn kill_server(paths: &LabPaths, pod: &PodState) {
    if let Some(pid) = pod.server_pid {
        super::node::terminate(&[pid], &paths.dir);
    }
}

/// Deletes the objects named: pods are unwired and removed, namespaces take theirs along.
pub fn delete(paths: &LabPaths, state: &mut LabState, objects: &[Object]) -> Result<(), LabError> {
    services::check_delete(objects)?;
    let mut cluster = super::load_cluster(paths)?;
    let mut doomed: Vec<PodState> = Vec::new();
    for object in objects {
        let victims: Vec<PodState> = match object {
            Object::Namespace(_) => state.pods.iter().filter(|p| p.namespace == object.name()).cloned().collect(),
            Object::Pod(pod) => {
                let (ns, name) = pod_key(pod);
                state.pod(&ns, &name).cloned().into_iter().collect()
            }
            Object::NetworkPolicy(_) | Object::Node(_) | Object::Service(_) | Object::EndpointSlice(_) => Vec::new(),
        };
        doomed.extend(victims);
        // `lab delete` of a Namespace takes everything in it along.
        let r = object_ref(object);
        if r.kind == Kind::Namespace {
            cluster.delete_namespace(&r.name);
        } else {
            cluster.delete(&r);
        }
    }
    doomed.sort_by_key(PodState::key);
    doomed.dedup_by_key(|p| p.key());
    for pod in &doomed {
        if let Some(node) = state.node(&pod.node) {
            // DEL tells the agent and frees the address; a failure must not block the rest.
            if let Err(e) = cni(paths, node, pod, "DEL") {
                eprintln!("bulkhead lab: {e}");
            }
        }
        kill_server(paths, pod);
        netns::delete(&netns::named_path(&pod.netns)).map_err(|source| LabError::Netns {
            netns: pod.netns.clone(),
            source,
        })?;
        state.pods.retain(|p| p.key() != pod.key());
        paths.save(state)?;
    }
    super::publish(paths, state, &mut cluster)
}

/// `bulkhead lab exec NS/POD -- CMD...`: runs CMD in the pod's namespace, passing its exit code.
/// `world` (no namespace) is the outside host; `default/world` is a pod of that name.
pub fn exec(paths: &LabPaths, target: &str, command: &[String]) -> Result<i32, LabError> {
    let state = paths.load_up()?;
    let netns_name = if target == super::world::WORLD {
        state.world.as_ref().map(|w| w.netns.clone()).ok_or_else(|| LabError::UnknownPod {
            pod: format!("{target} (this lab has no outside host)"),
        })?
    } else {
        let (ns, name) = target.split_once('/').unwrap_or(("default", target));
        let pod = state.pod(ns, name).ok_or_else(|| LabError::UnknownPod {
            pod: format!("{ns}/{name}"),
        })?;
        pod.netns.clone()
    };
    let Some((program, args)) = command.split_first() else {
        return Err(LabError::UnknownPod { pod: target.to_string() });
    };
    let status = netns::run_in(&netns::named_path(&netns_name), || Command::new(program).args(args).status())
        .map_err(|source| LabError::Netns {
            netns: netns_name.clone(),
            source,
        })?
        .map_err(|source| LabError::Spawn {
            what: program.clone(),
            source,
        })?;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_names_are_short_and_distinct() {
        assert_eq!(pod_netns_name("ab12", "x", "a"), "bhab12-x-a");
        let a = pod_netns_name("ab12", "a-b", "c");
        let b = pod_netns_name("ab12", "a", "b-c");
        assert_ne!(a, b);
        assert!(pod_netns_name("ab12", &"n".repeat(63), &"p".repeat(63)).len() <= 40);
    }

    #[test]
    fn ports_default_to_tcp() {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"containers": [{"name": "c", "ports": [
                {"containerPort": 80}, {"containerPort": 80, "protocol": "UDP"}, {"containerPort": 81, "protocol": "TCP"}]}]}
        }))
        .unwrap();
        assert_eq!(declared_ports(&PodInfo::from_pod(&pod)), (vec![80, 81], vec![80]));
    }
}
