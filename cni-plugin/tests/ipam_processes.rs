//! Concurrent allocation from many plugin-like processes sharing one IPAM store.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use bulkhead_cni::ipam::{Owner, Store};

const CHILD_DIR: &str = "BH_IPAM_TEST_CHILD_DIR";
const CHILD_ID: &str = "BH_IPAM_TEST_CHILD_ID";
const PER_CHILD: usize = 10;
const CHILDREN: usize = 8;

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn concurrent_processes_get_distinct_addresses() {
    if let (Ok(dir), Ok(id)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_ID)) {
        // In a child (the re-executed test binary): allocate and print the addresses.
        let store = Store::open(PathBuf::from(dir).as_path(), "procs", "10.252.0.0/24".parse().unwrap()).unwrap();
        for i in 0..PER_CHILD {
            let ip = store
                .allocate(&Owner {
                    container_id: format!("p{id}-{i}"),
                    ifname: "eth0".into(),
                })
                .unwrap()
                .ip;
            println!("ALLOCATED {ip}");
        }
        return;
    }
    let tmp = TempDir(std::env::temp_dir().join(format!("bh-ipam-procs-{}", std::process::id())));
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..CHILDREN)
        .map(|id| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "concurrent_processes_get_distinct_addresses",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_DIR, &tmp.0)
                .env(CHILD_ID, id.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ips = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "child failed");
        // The harness may print its "test ... " prefix on the same line as our first output.
        let text = String::from_utf8(out.stdout).unwrap();
        ips.extend(
            text.lines()
                .filter_map(|l| l.split_once("ALLOCATED ").map(|(_, ip)| ip))
                .map(|s| s.parse::<Ipv4Addr>().unwrap()),
        );
    }
    assert_eq!(ips.len(), CHILDREN * PER_CHILD);
    assert_eq!(
        ips.iter().collect::<HashSet<_>>().len(),
        ips.len(),
        "an address was handed out twice: {ips:?}"
    );
    let store = Store::open(&tmp.0, "procs", "10.252.0.0/24".parse().unwrap()).unwrap();
    assert_eq!(store.allocations().unwrap().len(), ips.len());
}
