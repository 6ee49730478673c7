//! Loading the eBPF object, pinning its maps, and attaching its programs to pod veths.
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::tc::{self, NlOptions, SchedClassifier, SchedClassifierLink, TcAttachOptions, TcAttachType, TcHandle};
use aya::programs::Xdp;
use aya::{Ebpf, EbpfLoader};
use bulkhead_common::{counter_index, direction, map_names, program_names, Counter, DropReason};

use crate::datapath::conntrack;
use crate::datapath::prefilter::PrefilterMaps;
use crate::datapath::sync::BpfMaps;
use crate::datapath::xdp;

/// The datapath object, built from `datapath-ebpf/` by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead-datapath"));

/// The tc priority of Bulkhead's filter on a veth (lower runs first: ahead of any filter an
/// earlier version attached at a kernel-chosen priority, 49152 and up).
pub const FILTER_PRIORITY: u16 = 1;
/// The handle of Bulkhead's filter at [`FILTER_PRIORITY`].
pub const FILTER_HANDLE: TcHandle = TcHandle::new(0, 1);

/// `statfs` magic of bpffs (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why loading or attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// bpffs could not be mounted or the pin directory made.
    #[error("cannot prepare bpffs pin directory {path}")]
    Bpffs {
        /// Pin directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the object.
    #[error("cannot load the datapath object (pins under {path})")]
    Load {
        /// Pin directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program or map is missing or of the wrong type.
    #[error("datapath object: {what}")]
    Object {
        /// What is wrong.
        what: String,
    },
    /// A program could not be loaded or attached.
    #[error("{op} program {program} on {ifname} failed")]
    Program {
        /// What was attempted.
        op: &'static str,
        /// Program name.
        program: &'static str,
        /// Interface, or "-" when loading.
        ifname: String,
        /// Cause.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// An XDP program could not be attached or detached (netlink).
    #[error("{op} xdp program {program} on {ifname} failed")]
    Xdp {
        /// What was attempted.
        op: &'static str,
        /// Program name.
        program: &'static str,
        /// Interface.
        ifname: String,
        /// Cause.
        #[source]
        source: Box<bulkhead_hostnet::netlink::NetlinkError>,
    },
    /// A map could not be read.
    #[error("reading map {map} failed")]
    Map {
        /// Map name.
        map: &'static str,
        /// Cause.
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// The loaded datapath: programs ready to attach and the maps the agent writes.
pub struct Datapath {
    ebpf: Ebpf,
    /// Maps the compiler's output is synced into.
    pub maps: BpfMaps,
    counters: PerCpuArray<MapData, Counter>,
    flows_lost: PerCpuArray<MapData, u64>,
    flow_ring: Option<RingBuf<MapData>>,
    pin_dir: PathBuf,
    xdp_counters: PerCpuArray<MapData, Counter>,
    prefilter_counters: PerCpuArray<MapData, Counter>,
    pod_xdp: bool,
}

/// Mounts bpffs at `/sys/fs/bpf` when it is not there (a fresh machine) and creates `dir`.
pub fn ensure_pin_dir(dir: &Path) -> Result<(), DatapathError> {
    let err = |source| DatapathError::Bpffs {
        path: dir.to_path_buf(),
        source,
    };
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) {
        let mounted = nix::sys::statfs::statfs(root)
            .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
            .unwrap_or(false);
        if !mounted {
            std::fs::create_dir_all(root).map_err(err)?;
            nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), Some("mode=0700"))
                .map_err(|e| err(std::io::Error::from(e)))?;
        }
    }
    std::fs::create_dir_all(dir).map_err(err)
}

impl Datapath {
    /// Loads the object; its maps are pinned under `pin_dir` (reused when already pinned, so
    /// state survives an agent restart).
    pub fn load(pin_dir: &Path) -> Result<Self, DatapathError> {
        ensure_pin_dir(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            // A BTF map (map-in-map) has no pinning attribute: pinned by name here.
            .map_pin_path(map_names::CONNTRACK, pin_dir.join(map_names::CONNTRACK))
            .load(OBJECT)
            .map_err(|source| DatapathError::Load {
                path: pin_dir.to_path_buf(),
                source: Box::new(source),
            })?;
        for name in [program_names::FROM_POD, program_names::TO_POD] {
            classifier(&mut ebpf, name)?.load().map_err(|source| DatapathError::Program {
                op: "load",
                program: name,
                ifname: "-".into(),
                source: Box::new(source),
            })?;
        }
        for name in [program_names::XDP_FROM_POD, program_names::PREFILTER] {
            xdp_program(&mut ebpf, name)?.load().map_err(|source| DatapathError::Program {
                op: "load",
                program: name,
                ifname: "-".into(),
                source: Box::new(source),
            })?;
        }
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or_else(|| DatapathError::Object {
                what: format!("no map {name}"),
            })
        };
        let (endpoints, ipcache, policy, counters, flows, flows_lost) = (
            take(map_names::ENDPOINTS)?,
            take(map_names::IPCACHE)?,
            take(map_names::POLICY)?,
            take(map_names::COUNTERS)?,
            take(map_names::FLOWS)?,
            take(map_names::FLOWS_LOST)?,
        );
        let (services, backends, rev_nat) = (take(map_names::SERVICES)?, take(map_names::BACKENDS)?, take(map_names::REV_NAT)?);
        let (conntrack, flow_budget) = (take(map_names::CONNTRACK)?, take(map_names::FLOW_BUDGET)?);
        let (quarantine, quarantine_count) = (take(map_names::QUARANTINE)?, take(map_names::QUARANTINE_COUNT)?);
        let wrong = |map: &'static str| {
            move |source| DatapathError::Map {
                map,
                source: Box::new(source),
            }
        };
        let conntrack_fd = match &conntrack {
            aya::maps::Map::HashOfMaps(data) => data.fd().as_fd().try_clone_to_owned().map_err(|e| DatapathError::Object {
                what: format!("cannot duplicate the descriptor of {}: {e}", map_names::CONNTRACK),
            })?,
            _ => {
                return Err(DatapathError::Object {
                    what: format!("{} is not a hash of maps", map_names::CONNTRACK),
                })
            }
        };
        let mut maps = BpfMaps {
            conntrack_fd,
            endpoints: endpoints.try_into().map_err(wrong(map_names::ENDPOINTS))?,
            ipcache: ipcache.try_into().map_err(wrong(map_names::IPCACHE))?,
            policy: policy.try_into().map_err(wrong(map_names::POLICY))?,
            services: services.try_into().map_err(wrong(map_names::SERVICES))?,
            backends: backends.try_into().map_err(wrong(map_names::BACKENDS))?,
            rev_nat: rev_nat.try_into().map_err(wrong(map_names::REV_NAT))?,
            conntrack: conntrack.try_into().map_err(wrong(map_names::CONNTRACK))?,
            flow_budget: flow_budget.try_into().map_err(wrong(map_names::FLOW_BUDGET))?,
            quarantine: quarantine.try_into().map_err(wrong(map_names::QUARANTINE))?,
            quarantine_count: quarantine_count.try_into().map_err(wrong(map_names::QUARANTINE_COUNT))?,
        };
        adopt_conntrack(&mut maps, pin_dir)?;
        let counters = counters.try_into().map_err(wrong(map_names::COUNTERS))?;
        let flows_lost = flows_lost.try_into().map_err(wrong(map_names::FLOWS_LOST))?;
        let flow_ring = Some(flows.try_into().map_err(wrong(map_names::FLOWS))?);
        let xdp_counters = take_map(&mut ebpf, map_names::XDP_COUNTERS)?
            .try_into()
            .map_err(wrong(map_names::XDP_COUNTERS))?;
        let prefilter_counters = take_map(&mut ebpf, map_names::PREFILTER_COUNTERS)?
            .try_into()
            .map_err(wrong(map_names::PREFILTER_COUNTERS))?;
        Ok(Datapath {
            ebpf,
            maps,
            counters,
            flows_lost,
            flow_ring,
            pin_dir: pin_dir.to_path_buf(),
            xdp_counters,
            prefilter_counters,
            pod_xdp: false,
        })
    }

    /// Where the maps are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Whether [`Datapath::attach`] puts `xdp_from_pod` on the veth too, or takes it off
    /// (TC alone then decides every packet: the default).
    pub fn set_pod_xdp(&mut self, on: bool) {
        self.pod_xdp = on;
    }

    /// Attaches both programs to the host-side veth `ifname` (clsact, direct action), or
    /// replaces the ones attached there.
    ///
    /// Netlink filters, not TCX links: a filter stays in the kernel when the agent exits, so
    /// pods stay enforced across agent restarts; deleting the veth removes it. Every veth has
    /// one Bulkhead filter per direction at a fixed priority and handle ([`FILTER_PRIORITY`],
    /// [`FILTER_HANDLE`]), so a new agent swaps in its programs atomically (the kernel replaces
    /// the filter's program in place: no packet sees no program or two).
    pub fn attach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        if let Err(e) = tc::qdisc_add_clsact(ifname) {
            // EEXIST: the qdisc is there already (a repeated ADD).
            let exists = matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
            if !exists {
                return Err(DatapathError::Object {
                    what: format!("cannot add clsact qdisc to {ifname}: {e}"),
                });
            }
        }
        for (name, attach_type) in [
            (program_names::FROM_POD, TcAttachType::Ingress),
            (program_names::TO_POD, TcAttachType::Egress),
        ] {
            let prog = classifier(&mut self.ebpf, name)?;
            let err = |op, source| DatapathError::Program {
                op,
                program: name,
                ifname: ifname.to_string(),
                source: Box::new(source),
            };
            let options = NlOptions {
                priority: FILTER_PRIORITY,
                handle: FILTER_HANDLE,
                classid: None,
            };
            let id = match prog.attach_with_options(ifname, attach_type, TcAttachOptions::Netlink(options)) {
                Ok(id) => id,
                // Ours is there already (an agent restart or upgrade, a repeated ADD): replace it.
                Err(aya::programs::ProgramError::TcError(tc::TcError::NetlinkError(e))) if e.raw_os_error() == Some(libc::EEXIST) => {
                    let existing = SchedClassifierLink::attached(ifname, attach_type, FILTER_PRIORITY, FILTER_HANDLE, None)
                        .map_err(|e| err("find", aya::programs::ProgramError::TcError(tc::TcError::IoError(e))))?;
                    prog.attach_to_link(existing).map_err(|e| err("replace", e))?
                }
                Err(e) => return Err(err("attach", e)),
            };
            let link = prog.take_link(id).map_err(|e| err("take link", e))?;
            // Dropping the link would detach the filter; the kernel owns it from here.
            std::mem::forget(link);
        }
        // After TC: XDP only ever drops what TC would, so TC must be in place first.
        let fd = xdp_program(&mut self.ebpf, program_names::XDP_FROM_POD)?
            .fd()
            .map_err(|source| DatapathError::Program {
                op: "attach",
                program: program_names::XDP_FROM_POD,
                ifname: ifname.to_string(),
                source: Box::new(source),
            })?
            .as_fd()
            .as_raw_fd();
        // Native mode: on a veth the program then runs in the veth's NAPI poll, before the
        // kernel builds an skb for what the pod sent (drivers/net/veth.c, veth_xdp_rcv).
        let mode = xdp::XdpMode::Native;
        if self.pod_xdp {
            xdp::attach(ifname, fd, mode, program_names::XDP_FROM_POD)
        } else {
            xdp::detach(ifname, mode, program_names::XDP_FROM_POD)
        }
    }

    /// Attaches the prefilter to each of `devices` (native XDP where the driver has it, else
    /// generic), replacing a program an earlier agent attached; returns its lists to write.
    /// Call once: the lists' maps are handed over.
    pub fn start_prefilter(&mut self, devices: &[String]) -> Result<PrefilterMaps, DatapathError> {
        let fd = xdp_program(&mut self.ebpf, program_names::PREFILTER)?
            .fd()
            .map_err(|source| DatapathError::Program {
                op: "attach",
                program: program_names::PREFILTER,
                ifname: devices.join(","),
                source: Box::new(source),
            })?
            .as_fd()
            .as_raw_fd();
        let wrong = |map: &'static str| {
            move |source| DatapathError::Map {
                map,
                source: Box::new(source),
            }
        };
        let deny = take_map(&mut self.ebpf, map_names::PREFILTER_DENY)?
            .try_into()
            .map_err(wrong(map_names::PREFILTER_DENY))?;
        let keep = take_map(&mut self.ebpf, map_names::PREFILTER_KEEP)?
            .try_into()
            .map_err(wrong(map_names::PREFILTER_KEEP))?;
        for device in devices {
            xdp::attach(device, fd, xdp::XdpMode::Auto, program_names::PREFILTER)?;
        }
        Ok(PrefilterMaps::new(deny, keep))
    }

    /// An XDP program, for `BPF_PROG_TEST_RUN`.
    pub fn xdp_program(&mut self, name: &'static str) -> Result<&mut Xdp, DatapathError> {
        xdp_program(&mut self.ebpf, name)
    }

    /// Pod packets `xdp_from_pod` dropped for `reason`, summed over CPUs.
    pub fn xdp_counter(&self, reason: DropReason) -> Result<Counter, DatapathError> {
        sum_slot(&self.xdp_counters, reason as u32, map_names::XDP_COUNTERS)
    }

    /// Packets the uplink prefilter dropped, summed over CPUs.
    pub fn prefilter_drops(&self) -> Result<Counter, DatapathError> {
        sum_slot(&self.prefilter_counters, 0, map_names::PREFILTER_COUNTERS)
    }

    /// A program, for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        classifier(&mut self.ebpf, name)
    }

    /// Packets and bytes per (reason, direction), summed over CPUs.
    pub fn counter(&self, reason: DropReason, dir: u8) -> Result<Counter, DatapathError> {
        let values = self
            .counters
            .get(&counter_index(reason, dir), 0)
            .map_err(|source| DatapathError::Map {
                map: map_names::COUNTERS,
                source: Box::new(source),
            })?;
        Ok(values.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    }

    /// The flow-record ring buffer, for the one reader that consumes it; `None` once taken.
    pub fn take_flow_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.flow_ring.take()
    }

    /// Flow records the ring buffer could not take since the maps were created (summed
    /// over CPUs; the count survives agent restarts with the pinned map).
    pub fn flows_lost(&self) -> Result<u64, DatapathError> {
        let values = self.flows_lost.get(&0, 0).map_err(|source| DatapathError::Map {
            map: map_names::FLOWS_LOST,
            source: Box::new(source),
        })?;
        Ok(values.iter().sum())
    }

    /// Every non-zero counter, by reason and direction.
    pub fn counters(&self) -> Result<Vec<(DropReason, u8, Counter)>, DatapathError> {
        let mut out = Vec::new();
        for dir in [direction::INGRESS, direction::EGRESS] {
            for reason in DropReason::ALL {
                let c = self.counter(reason, dir)?;
                if c.packets > 0 {
                    out.push((reason, dir, c));
                }
            }
        }
        Ok(out)
    }
}

/// Gives every endpoint already pinned a conntrack table and copies the layout-1 shared
/// table and the layout-2 tables into them (`conntrack::adopt`): an agent upgraded on a
/// running node keeps its pods' connections when their programs are replaced.
fn adopt_conntrack(maps: &mut BpfMaps, pin_dir: &Path) -> Result<(), DatapathError> {
    let wrong = |source| DatapathError::Map {
        map: map_names::CONNTRACK,
        source: Box::new(source),
    };
    let mut endpoints = Vec::new();
    for item in maps.endpoints.iter() {
        let (_, ep) = item.map_err(|source| DatapathError::Map {
            map: map_names::ENDPOINTS,
            source: Box::new(source),
        })?;
        endpoints.push(ep);
    }
    let done = conntrack::adopt(
        &mut maps.conntrack,
        &endpoints,
        &pin_dir.join(map_names::CONNTRACK_V1),
        &pin_dir.join(map_names::CONNTRACK_V2),
    )
    .map_err(wrong)?;
    if done != conntrack::Adopted::default() {
        tracing::info!(
            tables_created = done.tables_created,
            entries_copied = done.entries_copied,
            entries_orphaned = done.entries_orphaned,
            "conntrack adopted into per-endpoint tables"
        );
    }
    Ok(())
}

/// Slot `index` of a per-CPU counter array, summed over CPUs.
fn sum_slot(map: &PerCpuArray<MapData, Counter>, index: u32, name: &'static str) -> Result<Counter, DatapathError> {
    let values = map.get(&index, 0).map_err(|source| DatapathError::Map {
        map: name,
        source: Box::new(source),
    })?;
    Ok(values.iter().fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets.wrapping_add(c.packets),
        bytes: acc.bytes.wrapping_add(c.bytes),
    }))
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    ebpf.take_map(name).ok_or_else(|| DatapathError::Object {
        what: format!("no map {name}"),
    })
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DatapathError> {
    program(ebpf, name)
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, DatapathError> {
    program(ebpf, name)
}

/// The object's program `name`, as the program type `P` it must be.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| DatapathError::Object {
            what: format!("no program {name}"),
        })?
        .try_into()
        .map_err(|source| DatapathError::Program {
            op: "find",
            program: name,
            ifname: "-".into(),
            source: Box::new(source),
        })
}
