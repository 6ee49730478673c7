//! The lab's own plumbing with stand-ins for the agent and CNI plugin (tests/fixtures/*.py,
//! which need python3 and iproute2): nodes, pods, servers, probe, exec and cleanup work
//! independently of the datapath. Policy is not enforced here; `lab.rs` proves that.

use bulkhead_e2e::{scenario_bad_input, scenario_exec, scenario_three_by_three, scenario_up_down, Lab};

#[test]
fn up_down_leaves_nothing() {
    scenario_up_down(&Lab::with_stand_ins("plumb-updown"));
}

#[test]
fn three_by_three_all_allowed() {
    scenario_three_by_three(&Lab::with_stand_ins("plumb-3x3"), false);
}

#[test]
fn bad_input_changes_nothing() {
    scenario_bad_input(&Lab::with_stand_ins("plumb-badinput"));
}

#[test]
fn exec_passes_exit_code() {
    scenario_exec(&Lab::with_stand_ins("plumb-exec"));
}

#[test]
fn cni_error_names_pod_and_message() {
    let lab = Lab::with_stand_ins("plumb-cnierr");
    lab.ok(&["up", "-f", &lab.file("empty.yaml", "")]);
    // The stand-in plugin fails for container ids ending in "-x-fail".
    let pod = lab.file("fail.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: fail, namespace: x}\n");
    let out = lab.run(&["apply", "-f", &pod]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("x/fail") && stderr.contains("agent rejected the endpoint"),
        "{stderr}"
    );
}
