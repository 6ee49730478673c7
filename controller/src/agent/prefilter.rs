//! The uplink prefilter's lists kept current (issue 13.4a): the deny list re-read from its
//! file when the file changes, the never-drop list from this node's addresses, on a thread of
//! its own so that it never waits for the agent's state (and the other way round).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_hostnet::netlink::{self, with_handle};
use ipnetwork::Ipv4Network;

use crate::config::AgentConfig;
use crate::datapath::prefilter::{keep_list, parse_deny_list, PrefilterError, PrefilterMaps};
use crate::datapath::Datapath;
use crate::error_chain;
use crate::metrics::{ErrorKind, Metrics};

use super::AgentError;

/// The prefilter as the agent keeps it.
pub(super) struct Prefilter {
    maps: PrefilterMaps,
    devices: Vec<String>,
    deny_file: Option<PathBuf>,
    ranges: Vec<Ipv4Network>,
    /// The deny file's text last seen (applied or refused): re-parsed only when it changes.
    last_text: Option<String>,
    /// The never-drop list in the maps; `None` until it was first written (no deny entry is
    /// written before it).
    keep: Option<BTreeSet<Ipv4Network>>,
    /// A deny list waiting for the never-drop list.
    pending_deny: Option<BTreeSet<Ipv4Network>>,
    metrics: Arc<Metrics>,
}

impl Prefilter {
    /// Attaches the prefilter to the configured devices; `None` when there are none.
    pub(super) fn start(datapath: &mut Datapath, args: &AgentConfig, metrics: Arc<Metrics>) -> Result<Option<Self>, AgentError> {
        if args.prefilter_devices.is_empty() {
            return Ok(None);
        }
        let maps = datapath.start_prefilter(&args.prefilter_devices)?;
        tracing::info!(devices = ?args.prefilter_devices, deny_file = ?args.prefilter_deny_file, "uplink prefilter attached");
        Ok(Some(Prefilter {
            maps,
            devices: args.prefilter_devices.clone(),
            deny_file: args.prefilter_deny_file.clone(),
            ranges: args.cluster_cidr.into_iter().chain(args.pod_cidr).collect(),
            last_text: None,
            keep: None,
            pending_deny: None,
            metrics,
        }))
    }

    /// Runs [`Prefilter::tick`] every `every` on a thread of its own, for the agent's life.
    pub(super) fn spawn(mut self, every: Duration) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("prefilter".into())
            .spawn(move || loop {
                self.tick();
                std::thread::sleep(every);
            })
            .map(|_| ())
    }

    /// Brings both lists up to date; errors are logged and counted, and leave the lists in
    /// force as they were.
    pub(super) fn tick(&mut self) {
        match self.node_addresses() {
            Ok(addresses) => {
                let keep = keep_list(&addresses, &self.ranges);
                if self.keep.as_ref() != Some(&keep) {
                    match self.maps.set_keep(&keep) {
                        Ok(()) => self.keep = Some(keep),
                        Err(e) => self.fail("write the prefilter's never-drop list", &e),
                    }
                }
            }
            Err(e) => self.fail("read this node's addresses for the prefilter", &e),
        }
        if let Some(deny) = self.read_deny() {
            self.pending_deny = Some(deny);
        }
        if self.keep.is_some() {
            if let Some(deny) = self.pending_deny.take() {
                match self.maps.set_deny(&deny) {
                    Ok(()) => tracing::info!(entries = deny.len(), "prefilter deny list applied"),
                    Err(e) => {
                        self.fail("write the prefilter deny list", &e);
                        self.pending_deny = Some(deny);
                    }
                }
            }
        }
    }

    /// The deny list when the file changed and parses; `None` when it did not change or is
    /// refused (logged: the list in force stays). No file configured: the empty list, once.
    fn read_deny(&mut self) -> Option<BTreeSet<Ipv4Network>> {
        let Some(path) = &self.deny_file else {
            if self.last_text.is_none() {
                self.last_text = Some(String::new());
                return Some(BTreeSet::new());
            }
            return None;
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(source) => {
                let e = PrefilterError::Read {
                    path: path.clone(),
                    source,
                };
                // Once per kind of failure, not every second.
                if self.last_text.as_deref() != Some("\0unreadable") {
                    self.last_text = Some("\0unreadable".into());
                    self.fail("keep the prefilter deny list in force", &e);
                }
                return None;
            }
        };
        if self.last_text.as_deref() == Some(text.as_str()) {
            return None;
        }
        let parsed = parse_deny_list(path, &text);
        self.last_text = Some(text);
        match parsed {
            Ok(list) => Some(list),
            Err(e) => {
                self.fail("refuse the prefilter deny list, keeping the one in force", &e);
                None
            }
        }
    }

    /// Each address on this node (as a host), and each on a prefilter device with its
    /// subnet.
    fn node_addresses(&self) -> Result<Vec<(Ipv4Addr, u8)>, netlink::NetlinkError> {
        let devices = self.devices.clone();
        with_handle(None, |h| async move {
            let mut out: Vec<(Ipv4Addr, u8)> = netlink::all_ipv4_addresses(&h).await?.into_iter().map(|a| (a, 32)).collect();
            for device in devices {
                if let Some(link) = netlink::link_by_name(&h, &device).await? {
                    out.extend(netlink::ipv4_addresses(&h, link.index).await?);
                }
            }
            Ok(out)
        })
    }

    fn fail(&self, what: &str, e: &dyn std::error::Error) {
        tracing::error!(error = %error_chain(e), "cannot {what}");
        self.metrics.error(ErrorKind::Io);
    }
}
