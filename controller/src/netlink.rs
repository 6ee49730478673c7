//! Idempotent rtnetlink operations, each named for the state it ensures.
//!
//! A netlink socket is bound to the network namespace of the thread that opens it, so a
//! [`Netlink`] must be created inside `bulkhead_cni::netns::run_in` for the namespace it is
//! meant to change, and used on that thread.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// Why a netlink operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket or its runtime could not be created.
    #[error("cannot open a netlink socket")]
    Connect {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A request failed.
    #[error("netlink {op} failed for {ifname}")]
    Request {
        /// What was being done.
        op: &'static str,
        /// Interface (or route) concerned.
        ifname: String,
        /// Cause (boxed: netlink errors carry a whole message).
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// An interface that must exist does not.
    #[error("interface {ifname} not found")]
    NoSuchLink {
        /// Interface name.
        ifname: String,
    },
}

/// A netlink connection bound to the calling thread's network namespace.
pub struct Netlink {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
}

/// `EEXIST`, which netlink reports as a negative errno.
const EEXIST: i32 = libc::EEXIST;

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.map(|c| c.get().abs()) == Some(EEXIST))
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace.
    pub fn connect() -> Result<Self, NetlinkError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| NetlinkError::Connect { source })?;
        let handle = runtime.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            Ok::<_, std::io::Error>(handle)
        });
        let handle = handle.map_err(|source| NetlinkError::Connect { source })?;
        Ok(Self { runtime, handle })
    }

    /// The ifindex of `ifname`, or `None` when it does not exist.
    pub fn link_index(&self, ifname: &str) -> Result<Option<u32>, NetlinkError> {
        self.runtime.block_on(async {
            let mut links = self.handle.link().get().match_name(ifname.to_string()).execute();
            match links.try_next().await {
                Ok(Some(link)) => Ok(Some(link.header.index)),
                Ok(None) => Ok(None),
                Err(rtnetlink::Error::NetlinkError(m)) if m.code.map(|c| c.get().abs()) == Some(libc::ENODEV) => Ok(None),
                Err(source) => Err(NetlinkError::Request {
                    op: "get link",
                    ifname: ifname.to_string(),
                    source: Box::new(source),
                }),
            }
        })
    }

    fn require(&self, ifname: &str) -> Result<u32, NetlinkError> {
        self.link_index(ifname)?.ok_or_else(|| NetlinkError::NoSuchLink {
            ifname: ifname.to_string(),
        })
    }

    /// Brings `ifname` up.
    pub fn ensure_link_up(&self, ifname: &str) -> Result<(), NetlinkError> {
        let index = self.require(ifname)?;
        self.runtime
            .block_on(self.handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute())
            .map_err(|source| NetlinkError::Request {
                op: "set link up",
                ifname: ifname.to_string(),
                source: Box::new(source),
            })
    }

    /// Creates the veth pair `ifname`/`peer` unless `ifname` exists.
    pub fn ensure_veth(&self, ifname: &str, peer: &str) -> Result<(), NetlinkError> {
        if self.link_index(ifname)?.is_some() {
            return Ok(());
        }
        match self
            .runtime
            .block_on(self.handle.link().add(LinkVeth::new(ifname, peer).build()).execute())
        {
            Ok(()) => Ok(()),
            Err(e) if is_exists(&e) => Ok(()),
            Err(source) => Err(NetlinkError::Request {
                op: "add veth",
                ifname: ifname.to_string(),
                source: Box::new(source),
            }),
        }
    }

    /// Creates the bridge `ifname` unless it exists.
    pub fn ensure_bridge(&self, ifname: &str) -> Result<(), NetlinkError> {
        if self.link_index(ifname)?.is_some() {
            return Ok(());
        }
        match self
            .runtime
            .block_on(self.handle.link().add(LinkBridge::new(ifname).build()).execute())
        {
            Ok(()) => Ok(()),
            Err(e) if is_exists(&e) => Ok(()),
            Err(source) => Err(NetlinkError::Request {
                op: "add bridge",
                ifname: ifname.to_string(),
                source: Box::new(source),
            }),
        }
    }

    /// Attaches `ifname` to the bridge `bridge`.
    pub fn ensure_bridge_port(&self, ifname: &str, bridge: &str) -> Result<(), NetlinkError> {
        let index = self.require(ifname)?;
        let controller = self.require(bridge)?;
        self.runtime
            .block_on(
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).controller(controller).build())
                    .execute(),
            )
            .map_err(|source| NetlinkError::Request {
                op: "set bridge port",
                ifname: ifname.to_string(),
                source: Box::new(source),
            })
    }

    /// Moves `ifname`, when it is in this namespace, into the namespace open as `netns`.
    pub fn ensure_moved_to_netns(&self, ifname: &str, netns: &File) -> Result<(), NetlinkError> {
        let Some(index) = self.link_index(ifname)? else {
            return Ok(());
        };
        self.runtime
            .block_on(
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).setns_by_fd(netns.as_raw_fd()).build())
                    .execute(),
            )
            .map_err(|source| NetlinkError::Request {
                op: "move link to netns",
                ifname: ifname.to_string(),
                source: Box::new(source),
            })
    }

    /// Renames `from` to `to` unless `to` already exists.
    pub fn ensure_link_name(&self, from: &str, to: &str) -> Result<(), NetlinkError> {
        if self.link_index(to)?.is_some() {
            return Ok(());
        }
        let index = self.require(from)?;
        self.runtime
            .block_on(
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).name(to.to_string()).build())
                    .execute(),
            )
            .map_err(|source| NetlinkError::Request {
                op: "rename link",
                ifname: from.to_string(),
                source: Box::new(source),
            })
    }

    /// Adds `address/prefix` to `ifname` unless present.
    pub fn ensure_address(&self, ifname: &str, address: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        let index = self.require(ifname)?;
        match self
            .runtime
            .block_on(self.handle.address().add(index, IpAddr::V4(address), prefix).execute())
        {
            Ok(()) => Ok(()),
            Err(e) if is_exists(&e) => Ok(()),
            Err(source) => Err(NetlinkError::Request {
                op: "add address",
                ifname: ifname.to_string(),
                source: Box::new(source),
            }),
        }
    }

    /// Routes `destination` via `gateway`, replacing any route to the same destination.
    pub fn ensure_route(&self, destination: Ipv4Network, gateway: Ipv4Addr) -> Result<(), NetlinkError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination.network(), destination.prefix())
            .gateway(gateway)
            .build();
        self.runtime
            .block_on(self.handle.route().add(route).replace().execute())
            .map_err(|source| NetlinkError::Request {
                op: "add route",
                ifname: destination.to_string(),
                source: Box::new(source),
            })
    }
}
