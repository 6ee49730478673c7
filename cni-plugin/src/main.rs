//! `bulkhead-cni`: placeholder until the plugin lands.
fn main() {}
