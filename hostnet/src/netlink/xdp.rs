//! XDP programs on links, attached through netlink (`IFLA_XDP`) rather than a BPF link: the
//! attachment belongs to the device, so it outlives the process that made it (enforcement
//! goes on while the agent restarts) and goes with the device (nothing to clean up on DEL),
//! like the TC filters.

use std::os::fd::RawFd;

use netlink_packet_route::link::LinkXdp;

use super::*;

/// `XDP_FLAGS_SKB_MODE` (uapi/linux/if_link.h): generic XDP, run by the stack on the skb.
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `XDP_FLAGS_DRV_MODE`: native XDP, run by the driver before an skb exists.
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// Attaches the XDP program `prog_fd` to link `index` in the mode `flags` asks for (0: native
/// when the driver has it, else generic), replacing the program attached there in that mode
/// atomically (no packet sees none). The kernel holds its own reference on the program.
pub async fn ensure_xdp(handle: &Handle, index: u32, name: &str, prog_fd: RawFd, flags: u32) -> Result<(), NetlinkError> {
    set_xdp(handle, index, name, prog_fd, flags, "attach xdp").await
}

/// Detaches the XDP program attached in the mode `flags` names from link `index`; a link
/// without one is left as it is.
pub async fn remove_xdp(handle: &Handle, index: u32, name: &str, flags: u32) -> Result<(), NetlinkError> {
    set_xdp(handle, index, name, -1, flags, "detach xdp").await
}

async fn set_xdp(handle: &Handle, index: u32, name: &str, fd: RawFd, flags: u32, op: &'static str) -> Result<(), NetlinkError> {
    let mut attrs = vec![LinkXdp::Fd(fd)];
    if flags != 0 {
        attrs.push(LinkXdp::Flags(flags));
    }
    handle
        .link()
        .change(
            LinkUnspec::new_with_index(index)
                .append_extra_attribute(LinkAttribute::Xdp(attrs))
                .build(),
        )
        .execute()
        .await
        .map_err(NetlinkError::request(op, name))
}

/// The id of the program attached to link `index` in native (`drv`) or generic mode; `None`
/// when none is.
pub async fn xdp_program_id(handle: &Handle, index: u32, drv: bool) -> Result<Option<u32>, NetlinkError> {
    let message = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
        .map_err(NetlinkError::request("get", index.to_string()))?;
    let Some(message) = message else {
        return Ok(None);
    };
    for attr in message.attributes {
        if let LinkAttribute::Xdp(xdp) = attr {
            for x in xdp {
                match x {
                    LinkXdp::DrvProgId(id) if drv => return Ok(Some(id)),
                    LinkXdp::SkbProgId(id) if !drv => return Ok(Some(id)),
                    _ => {}
                }
            }
        }
    }
    Ok(None)
}
