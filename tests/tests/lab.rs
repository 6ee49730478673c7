//! `bulkhead lab` end to end with the real agent, datapath and CNI plugin.
//!
//! Needs `cargo build` at the workspace root first; runs as root.

use bulkhead_e2e::{scenario_bad_input, scenario_exec, scenario_three_by_three, scenario_up_down, Lab};

#[test]
fn up_down_leaves_nothing() {
    scenario_up_down(&Lab::new("updown"));
}

#[test]
fn three_by_three_policy_matrix() {
    scenario_three_by_three(&Lab::new("3x3"), true);
}

#[test]
fn bad_input_changes_nothing() {
    scenario_bad_input(&Lab::new("badinput"));
}

#[test]
fn exec_passes_exit_code() {
    scenario_exec(&Lab::new("exec"));
}
