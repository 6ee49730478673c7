//! XDP programs on links, attached through netlink (`IFLA_XDP`) rather than a BPF link: the
//! attachment belongs to the device, so it outlives the process that made it (enforcement
//! goes on while the agent restarts) and goes with the device (nothing to clean up on DEL),
//! like the TC filters.

use std::os::fd::RawFd;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_route::link::LinkXdp;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

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

/// [`ensure_xdp`] (`prog_fd` ≥ 0) or [`remove_xdp`] (`prog_fd` = -1) on the calling thread:
/// one netlink socket and one request, no runtime and no thread. The agent's path for every
/// CNI ADD, where a runtime and a thread per call cost more than the request (issue 13: 2–5 ms
/// of a 6 ms admission, most of it waiting for the thread to be scheduled). Needs no
/// namespace switch: it acts in the caller's namespace.
pub fn set_xdp_blocking(index: u32, name: &str, prog_fd: RawFd, flags: u32) -> Result<(), NetlinkError> {
    let op = if prog_fd < 0 { "detach xdp" } else { "attach xdp" };
    let io = |source| NetlinkError::Connection {
        netns: "node".into(),
        source,
    };
    let mut attrs = vec![LinkXdp::Fd(prog_fd)];
    if flags != 0 {
        attrs.push(LinkXdp::Flags(flags));
    }
    let link = LinkUnspec::new_with_index(index)
        .append_extra_attribute(LinkAttribute::Xdp(attrs))
        .build();
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::SetLink(link));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_ROUTE).map_err(io)?;
    socket.bind_auto().map_err(io)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
    socket.send(&buf, 0).map_err(io)?;
    loop {
        let (answer, _) = socket.recv_from_full().map_err(io)?;
        let mut offset = 0;
        while offset < answer.len() {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[offset..])
                .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())))?;
            let len = message.header.length as usize;
            match message.payload {
                // The acknowledgement: an error message with code 0.
                NetlinkPayload::Error(e) if e.code.is_none() => return Ok(()),
                NetlinkPayload::Error(e) => return Err(NetlinkError::request(op, name)(rtnetlink::Error::NetlinkError(e))),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
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
