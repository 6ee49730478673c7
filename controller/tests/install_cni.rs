//! `bulkhead install-cni` end to end, into a temporary directory (never the host's
//! /opt/cni or /etc/cni).
#![expect(clippy::unwrap_used, reason = "tests and their helpers assert by panicking (STYLE 14)")]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique temporary directory, removed on drop even when the test fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("bulkhead-install-{test}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fake plugin binary: install-cni copies bytes, it never runs them.
fn fake_plugin(dir: &Path, content: &[u8]) -> PathBuf {
    let p = dir.join("src-bulkhead-cni");
    std::fs::write(&p, content).unwrap();
    p
}

fn install(dir: &Path, cni_bin: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .arg("install-cni")
        .arg("--bin-dir")
        .arg(dir.join("opt/cni/bin"))
        .arg("--conf-dir")
        .arg(dir.join("etc/cni/net.d"))
        .arg("--cni-bin")
        .arg(cni_bin)
        .args(extra)
        .env_remove("BULKHEAD_POD_CIDR")
        .output()
        .unwrap()
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "install-cni failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Entries of `dir` other than the expected file: a leftover temporary file is a bug.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn installs_binary_and_conflist_idempotently() {
    let tmp = TempDir::new("basic");
    let src = fake_plugin(&tmp.0, b"#!/bin/sh\necho v1\n");
    let out = install(&tmp.0, &src, &["--pod-cidr", "10.244.7.0/24"]);
    assert_ok(&out);
    let bin = tmp.0.join("opt/cni/bin/bulkhead-cni");
    let conf = tmp.0.join("etc/cni/net.d/10-bulkhead.conflist");
    assert_eq!(std::fs::read(&bin).unwrap(), b"#!/bin/sh\necho v1\n");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(mode(&conf), 0o644);
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(&conf).unwrap()).unwrap();
    assert_eq!(c["cniVersion"], "1.0.0");
    assert_eq!(c["name"], "bulkhead");
    assert_eq!(c["plugins"][0]["type"], "bulkhead-cni");
    assert_eq!(c["plugins"][0]["subnet"], "10.244.7.0/24");
    assert_eq!(c["plugins"][0]["agentSocket"], "/run/bulkhead/agent.sock");
    assert_eq!(c["plugins"][1]["type"], "portmap");
    assert_eq!(c["plugins"][1]["capabilities"]["portMappings"], true);

    // A rerun changes nothing: same inode, so nothing was rewritten.
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let (bin_ino, conf_ino) = (ino(&bin), ino(&conf));
    assert_ok(&install(&tmp.0, &src, &["--pod-cidr", "10.244.7.0/24"]));
    assert_eq!((ino(&bin), ino(&conf)), (bin_ino, conf_ino));

    // A new binary replaces the old one by rename (a running plugin keeps its inode).
    let src2 = fake_plugin(&tmp.0, b"#!/bin/sh\necho v2\n");
    assert_ok(&install(&tmp.0, &src2, &["--pod-cidr", "10.244.7.0/24"]));
    assert_eq!(std::fs::read(&bin).unwrap(), b"#!/bin/sh\necho v2\n");
    assert_ne!(ino(&bin), bin_ino);
    assert_eq!(ino(&conf), conf_ino);

    // A wrong mode is repaired.
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_ok(&install(&tmp.0, &src2, &["--pod-cidr", "10.244.7.0/24"]));
    assert_eq!(mode(&bin), 0o755);

    assert_eq!(entries(&tmp.0.join("opt/cni/bin")), ["bulkhead-cni"]);
    assert_eq!(entries(&tmp.0.join("etc/cni/net.d")), ["10-bulkhead.conflist"]);
}

#[test]
fn template_and_env_pod_cidr() {
    let tmp = TempDir::new("template");
    let src = fake_plugin(&tmp.0, b"bin");
    let template = tmp.0.join("template.conflist");
    std::fs::write(
        &template,
        r#"{"cniVersion":"1.1.0","name":"bh","plugins":[{"type":"bulkhead-cni","mtu":1400},{"type":"portmap","capabilities":{"portMappings":true}},{"type":"bandwidth","capabilities":{"bandwidth":true}}]}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["install-cni", "--conflist-name", "05-bh.conflist", "--conflist-template"])
        .arg(&template)
        .arg("--bin-dir")
        .arg(tmp.0.join("bin"))
        .arg("--conf-dir")
        .arg(tmp.0.join("net.d"))
        .arg("--cni-bin")
        .arg(&src)
        .env("BULKHEAD_POD_CIDR", "10.99.0.0/24")
        .output()
        .unwrap();
    assert_ok(&out);
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.0.join("net.d/05-bh.conflist")).unwrap()).unwrap();
    assert_eq!(c["cniVersion"], "1.1.0");
    assert_eq!(c["plugins"][0]["subnet"], "10.99.0.0/24");
    assert_eq!(c["plugins"][0]["mtu"], 1400);
    assert_eq!(c["plugins"][2]["type"], "bandwidth");
}

#[test]
fn failures_are_clear_and_leave_nothing_behind() {
    let tmp = TempDir::new("fail");
    let src = fake_plugin(&tmp.0, b"bin");
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // A bad pod CIDR: nothing is installed, not even the binary.
    let out = install(&tmp.0, &src, &["--pod-cidr", "10.1.0.0/31"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("too small"), "{}", stderr(&out));
    assert!(!tmp.0.join("opt").exists() && !tmp.0.join("etc").exists());

    // A missing plugin binary names its path.
    let out = install(&tmp.0, &tmp.0.join("nope"), &["--pod-cidr", "10.1.0.0/24"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("read plugin binary") && stderr(&out).contains("nope"),
        "{}",
        stderr(&out)
    );

    // A template whose first plugin is not ours.
    let template = tmp.0.join("bad.conflist");
    std::fs::write(&template, r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}"#).unwrap();
    let out = install(
        &tmp.0,
        &src,
        &["--pod-cidr", "10.1.0.0/24", "--conflist-template", template.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("first plugin must be bulkhead-cni"), "{}", stderr(&out));

    // A bad pod CIDR is rejected by the flag parser.
    let out = install(&tmp.0, &src, &["--pod-cidr", "10.1.0.0/33"]);
    assert!(!out.status.success());

    // A conf dir that is a file.
    std::fs::write(tmp.0.join("file"), b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead"))
        .args(["install-cni", "--pod-cidr", "10.1.0.0/24", "--cni-bin"])
        .arg(&src)
        .arg("--bin-dir")
        .arg(tmp.0.join("bin"))
        .arg("--conf-dir")
        .arg(tmp.0.join("file"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&tmp.0.join("file").display().to_string()), "{}", stderr(&out));
}
