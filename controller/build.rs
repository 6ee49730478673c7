//! Builds the eBPF datapath from source (nightly + bpf-linker) and leaves the object in
//! OUT_DIR, where the agent embeds it.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../datapath-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "bulkhead-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
