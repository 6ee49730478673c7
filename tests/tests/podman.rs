//! A real container runtime: Debian's podman (CNI backend, runc) attaches containers through
//! `bulkhead-cni`, with the real agent in local-files mode enforcing NetworkPolicy.
//!
//! Everything runs inside a node network namespace of its own: the agent, podman and hence
//! every CNI call, so the host veths and pod routes never touch the host's root namespace.
//! podman keeps its storage, configuration and CNI plugin directory in a temporary directory.
//! Needs root, `cargo build` at the workspace root, and the packages scripts/setup.sh installs
//! (podman, runc, conmon, containernetworking-plugins, busybox-static).
#![expect(clippy::expect_used, reason = "tests assert by panicking (STYLE 14)")]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bulkhead_e2e::binary;
use bulkhead_hostnet::netns;
use serde_json::{json, Value};

/// The network podman attaches containers to; its plugin is `bulkhead-cni`.
const NETWORK: &str = "bhpodman";
/// The pod namespace of every container: podman's CNI backend sends no `K8S_POD_NAMESPACE`,
/// so the conflist's `defaultNamespace` supplies it.
const POD_NAMESPACE: &str = "bhpodman";

/// A node netns, a temp dir with podman's world, the agent; all removed on drop.
struct Node {
    id: String,
    netns: PathBuf,
    dir: PathBuf,
    bpffs: PathBuf,
    subnet: String,
    agent: Option<Child>,
}

impl Node {
    fn new() -> Self {
        for tool in ["podman", "runc", "conmon", "tar"] {
            let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/libexec/podman")])
                .any(|d| d.join(tool).is_file());
            assert!(found, "{tool} is missing: run scripts/setup.sh");
        }
        assert!(
            Path::new("/bin/busybox").is_file(),
            "busybox-static is missing: run scripts/setup.sh"
        );
        let pid = std::process::id();
        let id = format!("{pid}");
        let dir = std::env::temp_dir().join(format!("bulkhead-e2e-podman-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        let netns = netns::create_named(&format!("bhpodman-{id}")).expect("creating a netns needs root");
        // A /24 of 10.252/16 picked by pid; the node netns has no route out anyway.
        let subnet = format!("10.252.{}.0/24", pid % 250 + 1);
        let mut node = Node {
            id,
            netns,
            dir,
            bpffs: PathBuf::from(format!("/sys/fs/bpf/bulkhead-e2e-podman-{pid}")),
            subnet,
            agent: None,
        };
        node.prepare();
        node
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn socket(&self) -> PathBuf {
        self.path("state/agent.sock")
    }

    /// Node netns setup, manifests, podman config, the logging CNI shim and the image.
    fn prepare(&mut self) {
        for d in ["net.d", "cni-bin", "state", "manifests", "tmp", "storage", "run", "data", "rootfs"] {
            std::fs::create_dir_all(self.path(d)).expect("create dir");
        }
        let out = Command::new("ip")
            .args(["-n", &self.netns_name(), "link", "set", "lo", "up"])
            .output()
            .expect("ip");
        assert!(out.status.success(), "lo up: {out:?}");
        // Pod to pod traffic is routed by the node: forwarding on, in this netns only.
        netns::run_in(&self.netns, || std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
            .expect("enter node netns")
            .expect("enable forwarding in the node netns");

        // The plugin dir: the reference plugins, plus a shim that logs every call and its
        // exit code, then runs the real `bulkhead-cni`.
        for entry in std::fs::read_dir("/usr/lib/cni").expect("/usr/lib/cni: run scripts/setup.sh") {
            let entry = entry.expect("read /usr/lib/cni");
            std::os::unix::fs::symlink(entry.path(), self.path("cni-bin").join(entry.file_name())).expect("symlink plugin");
        }
        let shim = format!(
            "#!/bin/sh\nIN=$(cat)\n{{ echo \"=== $CNI_COMMAND $CNI_CONTAINERID $CNI_IFNAME $CNI_NETNS [$CNI_ARGS]\"; echo \"stdin: $IN\"; }} >>'{log}'\n\
             OUT=$(printf '%s' \"$IN\" | BULKHEAD_CNI_LOG=info '{bin}' 2>>'{log}'); RC=$?\n\
             echo \"rc=$RC $CNI_COMMAND $CNI_CONTAINERID out: $OUT\" >>'{log}'\n\
             [ -n \"$OUT\" ] && printf '%s\\n' \"$OUT\"\nexit $RC\n",
            log = self.path("cni-calls.log").display(),
            bin = binary("bulkhead-cni").display()
        );
        let shim_path = self.path("cni-bin/bulkhead-cni");
        std::fs::write(&shim_path, shim).expect("write shim");
        Command::new("chmod").arg("755").arg(&shim_path).status().expect("chmod");
        // podman 4.3's libcni cannot parse 1.1.0 results: 1.0.0 is its newest version.
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [{
                "type": "bulkhead-cni",
                "subnet": self.subnet,
                "agentSocket": self.socket(),
                "dataDir": self.path("data"),
                "agentTimeoutSeconds": 20,
                "defaultNamespace": POD_NAMESPACE,
            }],
        });
        std::fs::write(self.path(&format!("net.d/{NETWORK}.conflist")), conflist.to_string()).expect("write conflist");
        self.write_manifests(ALLOW_POLICY);
        // No CAP_SYS_RESOURCE here: podman's default rlimits would make runc fail with EPERM.
        // crun refuses some cgroup setups; runc works on v1 and v2.
        let conf = format!(
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\ntmp_dir = \"{tmp}\"\n\
             [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{bin}\"]\nnetwork_config_dir = \"{netd}\"\ndefault_network = \"{NETWORK}\"\n",
            tmp = self.path("tmp").display(),
            bin = self.path("cni-bin").display(),
            netd = self.path("net.d").display(),
        );
        std::fs::write(self.path("containers.conf"), conf).expect("write containers.conf");
        let storage = format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            self.path("storage").display(),
            self.path("run").display()
        );
        std::fs::write(self.path("storage.conf"), storage).expect("write storage.conf");

        // A busybox image, imported without a registry.
        let rootfs = self.path("rootfs");
        for d in ["bin", "etc", "www", "tmp", "proc", "sys", "dev"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("rootfs dir");
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
        for applet in ["sh", "httpd", "nc", "sleep", "ip", "printf", "cat"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).expect("applet link");
        }
        std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").expect("group");
        std::fs::write(rootfs.join("www/index.html"), format!("hello-from-{}\n", self.id)).expect("index");
        let import = format!(
            "tar -C '{}' -cf - . | podman import -q --change 'CMD [\"/bin/sh\"]' - {}",
            rootfs.display(),
            self.image()
        );
        let out = self.in_node(Command::new("sh").args(["-c", &import]));
        assert!(out.status.success(), "podman import: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn netns_name(&self) -> String {
        self.netns.file_name().expect("netns name").to_string_lossy().into_owned()
    }

    fn image(&self) -> String {
        format!("localhost/bulkhead-e2e-{}:latest", self.id)
    }

    fn container(&self, role: &str) -> String {
        format!("bhpm-{role}-{}", self.id)
    }

    /// Namespace, the three pods podman will run (pod name = container name) and `policy`.
    fn write_manifests(&self, policy: &str) {
        let mut text = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {POD_NAMESPACE}, labels: {{test: podman}}}}\n");
        for role in ["srv", "cli", "gc"] {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {POD_NAMESPACE}, labels: {{app: {role}}}}}\n\
                 spec: {{containers: [{{name: c, image: busybox, ports: [{{containerPort: 8080}}]}}]}}\n",
                self.container(role)
            ));
        }
        text.push_str(&policy.replace("@NS@", POD_NAMESPACE));
        // Written aside and renamed, so the agent never reads half a file.
        let tmp = self.path("manifests/.cluster.yaml.tmp");
        std::fs::write(&tmp, text).expect("write manifests");
        std::fs::rename(&tmp, self.path("manifests/cluster.yaml")).expect("rename manifests");
    }

    /// Runs `cmd` inside the node netns with podman's configuration in its environment.
    fn in_node(&self, cmd: &mut Command) -> Output {
        cmd.env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.path("storage.conf"));
        netns::run_in(&self.netns, || cmd.output())
            .expect("enter node netns")
            .expect("spawn")
    }

    fn podman(&self, args: &[&str]) -> Output {
        self.in_node(Command::new("podman").args(args))
    }

    /// `podman ARGS` that must succeed; returns trimmed stdout.
    fn podman_ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed ({}):\nstdout: {}\nstderr: {}\nCNI calls:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.calls()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.path("cni-calls.log")).unwrap_or_default()
    }

    /// Starts `bulkhead agent` in the node netns and waits for its socket to answer.
    fn start_agent(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("agent.log"))
            .expect("agent log");
        let err = log.try_clone().expect("agent log");
        let mut cmd = Command::new(binary("bulkhead"));
        cmd.arg("agent")
            .arg("--node-name")
            .arg(format!("podman-{}", self.id))
            .arg("--manifests")
            .arg(self.path("manifests"))
            .arg("--state-dir")
            .arg(self.path("state"))
            .arg("--bpffs")
            .arg(&self.bpffs)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        let child = netns::run_in(&self.netns, || cmd.spawn())
            .expect("enter node netns")
            .expect("spawn agent");
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.try_status() {
                if status["ready"] == true {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("agent never became ready:\n{}", self.agent_log());
    }

    /// SIGTERM to the agent, then waits for it.
    fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            // SIGTERM: the agent's clean shutdown path (it removes its socket).
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// One request to the agent socket (the JSON-line protocol of `agent_api`).
    fn agent_call(&self, request: &Value) -> Option<Value> {
        let mut stream = UnixStream::connect(self.socket()).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        stream.write_all(format!("{request}\n").as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    fn try_status(&self) -> Option<Value> {
        self.agent_call(&json!({"op": "status"}))
    }

    fn endpoints(&self) -> u64 {
        let status = self.try_status().expect("agent status");
        status["endpoints"]
            .as_u64()
            .unwrap_or_else(|| panic!("status without endpoints: {status}"))
    }

    fn reload(&self) {
        let answer = self.agent_call(&json!({"op": "reload"})).expect("agent reload");
        assert_eq!(answer["result"], "ok", "{answer}");
    }

    /// Our host veths in the node netns.
    fn host_veths(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.netns_name(), "-o", "link", "show"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            .filter(|n| n.starts_with("bh"))
            .collect()
    }

    /// Addresses held in the IPAM store.
    fn allocations(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.path(&format!("data/ipam/{NETWORK}"))) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
            .collect()
    }

    fn ip_of(&self, container: &str) -> String {
        let format = format!("{{{{(index .NetworkSettings.Networks \"{NETWORK}\").IPAddress}}}}");
        let ip = self.podman_ok(&["inspect", "-f", &format, container]);
        assert!(ip.starts_with("10.252."), "{container} got {ip:?}");
        ip
    }

    fn run_detached(&self, role: &str, command: &[&str]) -> String {
        let name = self.container(role);
        let image = self.image();
        let mut args = vec!["run", "-d", "--pull", "never", "--name", &name, "--network", NETWORK, &image];
        args.extend_from_slice(command);
        self.podman_ok(&args)
    }

    /// An HTTP GET from the client container to `ip:8080`; true when the page came back.
    fn http_from_client(&self, ip: &str) -> bool {
        let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 8080");
        let out = self.podman(&["exec", &self.container("cli"), "sh", "-c", &script]);
        let page = String::from_utf8_lossy(&out.stdout);
        let ok = page.contains(&format!("hello-from-{}", self.id));
        if !ok {
            eprintln!(
                "GET {ip}:8080 from the client: {} {page} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ok
    }

    /// The CNI calls that exited non-zero.
    fn failed_calls(&self) -> Vec<String> {
        self.calls()
            .lines()
            .filter(|l| l.starts_with("rc=") && !l.starts_with("rc=0 "))
            .map(str::to_string)
            .collect()
    }

    /// Runs `bulkhead-cni` GC directly, as a spec 1.1 runtime would, in the node netns.
    fn gc(&self, valid: &[String]) -> Output {
        let conf = json!({
            "cniVersion": "1.1.0", "name": NETWORK, "type": "bulkhead-cni",
            "subnet": self.subnet, "agentSocket": self.socket(), "dataDir": self.path("data"),
            "cni.dev/valid-attachments": valid.iter().map(|c| json!({"containerID": c, "ifname": "eth0"})).collect::<Vec<_>>(),
        });
        let mut cmd = Command::new(binary("bulkhead-cni"));
        cmd.env_clear()
            .env("CNI_COMMAND", "GC")
            .env("CNI_PATH", self.path("cni-bin"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        netns::run_in(&self.netns, || {
            let mut child = cmd.spawn().expect("spawn bulkhead-cni");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(conf.to_string().as_bytes())
                .expect("write conf");
            child.wait_with_output().expect("wait bulkhead-cni")
        })
        .expect("enter node netns")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-a", "-f", "-t", "0"]);
        let _ = self.podman(&["rmi", "-a", "-f"]);
        self.stop_agent();
        // Overlay and shm mounts podman left below our dir, deepest first.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let dir = self.dir.display().to_string();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&dir))
            .collect();
        ours.sort_unstable_by(|a, b| b.cmp(a));
        for m in ours {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        // libcni's result cache for our network.
        if let Ok(entries) = std::fs::read_dir("/var/lib/cni/results") {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&format!("{NETWORK}-")) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = netns::delete(&self.netns);
        let _ = std::fs::remove_dir_all(&self.bpffs);
        if std::env::var_os("BULKHEAD_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The server accepts the client on 8080, nothing else.
const ALLOW_POLICY: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: srv-ingress, namespace: "@NS@"}
spec:
  podSelector: {matchLabels: {app: srv}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: cli}}}]
    ports: [{protocol: TCP, port: 8080}]
"#;

/// The server accepts nothing.
const DENY_POLICY: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: srv-ingress, namespace: "@NS@"}
spec:
  podSelector: {matchLabels: {app: srv}}
  policyTypes: [Ingress]
"#;

/// Polls `f` until it returns `want` or 10 s pass; returns the last value.
fn eventually(want: bool, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = f();
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn podman_containers_get_addresses_policy_and_clean_deletes() {
    let mut node = Node::new();
    node.start_agent();
    let info = node.podman_ok(&["info", "--format", "{{.Host.NetworkBackend}}"]);
    assert_eq!(info, "cni", "podman must use its CNI backend");

    // Two containers get addresses from bulkhead-cni.
    let srv = node.run_detached("srv", &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]);
    let cli = node.run_detached("cli", &["/bin/sleep", "3600"]);
    let srv_ip = node.ip_of(&node.container("srv"));
    let cli_ip = node.ip_of(&node.container("cli"));
    assert_ne!(srv_ip, cli_ip);
    let calls = node.calls();
    assert!(calls.contains(&format!("=== ADD {srv} eth0")), "{calls}");
    assert!(
        calls.contains(&format!("[IgnoreUnknown=1;K8S_POD_NAME={}]", node.container("srv"))),
        "{calls}"
    );
    assert_eq!(node.endpoints(), 2);
    assert_eq!(node.host_veths().len(), 2, "{:?}", node.host_veths());

    // Allowed by policy: the client reaches the server.
    assert!(
        eventually(true, || node.http_from_client(&srv_ip)),
        "client -> server:8080 should be allowed\nagent log:\n{}",
        node.agent_log()
    );

    // A deny-all ingress policy through the manifests dir and Reload: blocked.
    node.write_manifests(DENY_POLICY);
    node.reload();
    assert!(
        !eventually(false, || node.http_from_client(&srv_ip)),
        "client -> server:8080 should be denied"
    );
    // And allowed again.
    node.write_manifests(ALLOW_POLICY);
    node.reload();
    assert!(eventually(true, || node.http_from_client(&srv_ip)), "allowed again after reload");

    // Stopping a container runs DEL: its veth, address and endpoint are gone.
    node.podman_ok(&["stop", "-t", "0", &cli]);
    assert!(node.calls().contains(&format!("=== DEL {cli} eth0")), "{}", node.calls());
    assert_eq!(node.endpoints(), 1);
    assert_eq!(node.host_veths().len(), 1, "{:?}", node.host_veths());
    assert_eq!(node.allocations().len(), 1, "{:?}", node.allocations());

    // DEL while the agent is down still succeeds and frees everything local; the agent
    // drops the stale endpoint when it comes back.
    node.stop_agent();
    node.podman_ok(&["stop", "-t", "0", &srv]);
    assert!(node.calls().contains(&format!("=== DEL {srv} eth0")), "{}", node.calls());
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    node.start_agent();
    assert_eq!(node.endpoints(), 0, "agent kept an endpoint whose veth is gone");

    // GC (spec 1.1, which podman 4.3 does not send): an attachment the runtime no longer
    // lists loses its endpoint, veth and address; the runtime's later DEL still succeeds.
    let gc = node.run_detached("gc", &["/bin/sleep", "3600"]);
    assert_eq!(node.endpoints(), 1);
    let out = node.gc(&[]);
    assert!(out.status.success(), "GC: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(node.endpoints(), 0);
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    node.podman_ok(&["rm", "-f", "-t", "0", &gc]);
    node.podman_ok(&["rm", "-f", &srv, &cli]);

    let failed = node.failed_calls();
    assert!(failed.is_empty(), "CNI calls failed: {failed:?}\n{}", node.calls());
    for id in [&srv, &cli, &gc] {
        let calls = node.calls();
        assert!(calls.contains(&format!("=== DEL {id} eth0")), "no DEL for {id}:\n{calls}");
    }
}
