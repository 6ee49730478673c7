//! Bulkhead's eBPF datapath. The programs live in the `bulkhead-datapath` binary; this
//! library exists so the agent can name the crate as a build-dependency.
#![no_std]
