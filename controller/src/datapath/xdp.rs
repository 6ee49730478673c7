//! Attaching the XDP programs (`xdp_from_pod` on host veths, `xdp_prefilter` on uplinks)
//! through netlink, so that, like the TC filters, they belong to their device: they outlive
//! the agent and go with the device (`bulkhead_hostnet::netlink::ensure_xdp`).

use std::os::fd::RawFd;

use bulkhead_hostnet::netlink::{self, XDP_FLAGS_DRV_MODE};

use super::DatapathError;

/// Which XDP mode a program is attached in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// Native (`XDP_FLAGS_DRV_MODE`): the driver runs it before an skb exists; an error when
    /// the driver has no XDP.
    Native,
    /// Native when the driver has it, else generic (no flags: the kernel chooses).
    Auto,
}

impl XdpMode {
    fn flags(self) -> u32 {
        match self {
            XdpMode::Native => XDP_FLAGS_DRV_MODE,
            XdpMode::Auto => 0,
        }
    }
}

/// Attaches program `fd` to `ifname` in `mode`, replacing whatever program is there.
pub(super) fn attach(ifname: &str, fd: RawFd, mode: XdpMode, program: &'static str) -> Result<(), DatapathError> {
    set(ifname, fd, mode, program, "attach")
}

/// Takes the program attached in `mode` off `ifname`; none there is success.
pub(super) fn detach(ifname: &str, mode: XdpMode, program: &'static str) -> Result<(), DatapathError> {
    set(ifname, -1, mode, program, "detach")
}

/// One request on the calling thread (`netlink::set_xdp_blocking`): every CNI ADD comes here.
fn set(ifname: &str, fd: RawFd, mode: XdpMode, program: &'static str, op: &'static str) -> Result<(), DatapathError> {
    let err = |source| DatapathError::Xdp {
        op,
        program,
        ifname: ifname.to_string(),
        source: Box::new(source),
    };
    let index = nix::net::if_::if_nametoindex(ifname).map_err(|_| {
        err(netlink::NetlinkError::LinkNotFound {
            ifname: ifname.to_string(),
            netns: "node".into(),
        })
    })?;
    netlink::set_xdp_blocking(index, ifname, fd, mode.flags()).map_err(err)
}
