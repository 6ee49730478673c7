//! Host-local IPAM: an on-disk store of allocations, safe across concurrent plugin processes.
//!
//! `<dataDir>/ipam/<network>/` holds one file per allocated address (named by the address,
//! content `container id\nifname\n`), `last_reserved_ip` (where the next scan starts, so a
//! freed address is not reused at once) and `lock`, which every operation holds with
//! `flock(LOCK_EX)` for its whole duration.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use nix::fcntl::{Flock, FlockArg};

use crate::spec::code;

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_FILE: &str = "last_reserved_ip";

/// Why an IPAM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// No free address is left.
    #[error("address pool {subnet} of network {network} is exhausted")]
    Exhausted {
        /// Network name.
        network: String,
        /// The pool.
        subnet: Ipv4Network,
    },
    /// The store was opened without its pool (to find or release), then asked to allocate.
    #[error("ipam store of network {network} has no address pool to allocate from")]
    NoPool {
        /// Network name.
        network: String,
    },
    /// A file operation on the store failed.
    #[error("ipam store: {op} {path} failed")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Taking the store lock failed.
    #[error("ipam store: cannot lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
}

impl IpamError {
    /// The CNI error code for this failure.
    pub fn code(&self) -> u32 {
        match self {
            Self::Exhausted { .. } => code::POOL_EXHAUSTED,
            Self::Io { .. } | Self::Lock { .. } | Self::NoPool { .. } => code::IPAM_STORE,
        }
    }
}

/// Who holds an address: one interface of one container.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

impl Owner {
    fn encode(&self) -> String {
        format!("{}\n{}\n", self.container_id, self.ifname)
    }

    fn decode(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        let container_id = lines.next()?.trim().to_string();
        let ifname = lines.next()?.trim().to_string();
        Some(Self { container_id, ifname })
    }
}

/// The outcome of [`Store::allocate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// The owner's address.
    pub ip: Ipv4Addr,
    /// False when the owner already held it (a repeated ADD).
    pub created: bool,
}

/// First and last allocatable addresses of `subnet`: skips network, broadcast and the first host.
fn range(subnet: Ipv4Network) -> (Ipv4Addr, Ipv4Addr) {
    let network = u32::from(subnet.network());
    let broadcast = u32::from(subnet.broadcast());
    (Ipv4Addr::from(network + 2), Ipv4Addr::from(broadcast - 1))
}

/// The allocation store of one network.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
    network: String,
    /// The pool `allocate` draws from; `None` for a store opened only to find or release.
    subnet: Option<Ipv4Network>,
}

impl Store {
    /// Opens (creating if needed) the store of `network` under `data_dir`, allocating from `subnet`.
    pub fn open(data_dir: &Path, network: &str, subnet: Ipv4Network) -> Result<Self, IpamError> {
        Self::open_with(data_dir, network, Some(subnet))
    }

    /// Opens the store to find, list or release addresses: DEL, CHECK and GC need no pool, so
    /// they work even when the node's pod CIDR is not known (the agent is gone).
    pub fn open_without_pool(data_dir: &Path, network: &str) -> Result<Self, IpamError> {
        Self::open_with(data_dir, network, None)
    }

    fn open_with(data_dir: &Path, network: &str, subnet: Option<Ipv4Network>) -> Result<Self, IpamError> {
        let dir = data_dir.join("ipam").join(network);
        fs::create_dir_all(&dir).map_err(|source| IpamError::Io {
            op: "create directory",
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            dir,
            network: network.to_string(),
            subnet,
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns the owner's address, allocating a free one if it has none.
    pub fn allocate(&self, owner: &Owner) -> Result<Allocation, IpamError> {
        let _lock = self.lock()?;
        if let Some(ip) = self.find_locked(owner)? {
            return Ok(Allocation { ip, created: false });
        }
        let subnet = self.subnet.ok_or_else(|| IpamError::NoPool {
            network: self.network.clone(),
        })?;
        let (first, last) = range(subnet);
        let size = u32::from(last) - u32::from(first) + 1;
        // Start after the last address handed out (host-local's round robin), so a freed
        // address rests while stale state about it (conntrack, ipcache) ages out.
        let start = match self.read_last_reserved()? {
            Some(ip) if (u32::from(first)..=u32::from(last)).contains(&u32::from(ip)) => u32::from(ip) - u32::from(first) + 1,
            _ => 0,
        };
        for step in 0..size {
            let ip = Ipv4Addr::from(u32::from(first) + (start + step) % size);
            let path = self.dir.join(ip.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    let written = file.write_all(owner.encode().as_bytes()).and_then(|()| file.sync_all());
                    if let Err(source) = written {
                        let _ = fs::remove_file(&path);
                        return Err(IpamError::Io { op: "write", path, source });
                    }
                    self.write_last_reserved(ip)?;
                    return Ok(Allocation { ip, created: true });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(IpamError::Io {
                        op: "create",
                        path,
                        source,
                    })
                }
            }
        }
        Err(IpamError::Exhausted {
            network: self.network.clone(),
            subnet,
        })
    }

    /// The owner's address, if it has one.
    pub fn find(&self, owner: &Owner) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        self.find_locked(owner)
    }

    /// Frees the owner's address; returns it, or `None` if it held none.
    pub fn release(&self, owner: &Owner) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        let mut freed = None;
        for (ip, holder) in self.list_locked()? {
            if &holder == owner {
                let path = self.dir.join(ip.to_string());
                match fs::remove_file(&path) {
                    Ok(()) => freed = Some(ip),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(IpamError::Io {
                            op: "remove",
                            path,
                            source,
                        })
                    }
                }
            }
        }
        Ok(freed)
    }

    /// Every allocation, for GC and diagnostics.
    pub fn allocations(&self) -> Result<Vec<(Ipv4Addr, Owner)>, IpamError> {
        let _lock = self.lock()?;
        self.list_locked()
    }

    fn lock(&self) -> Result<Flock<File>, IpamError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| IpamError::Io {
                op: "open",
                path: path.clone(),
                source,
            })?;
        // flock locks belong to the open file description: a second open (another process
        // or thread) blocks until this one is dropped.
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| IpamError::Lock { path, source })
    }

    fn find_locked(&self, owner: &Owner) -> Result<Option<Ipv4Addr>, IpamError> {
        Ok(self
            .list_locked()?
            .into_iter()
            .find(|(_, holder)| holder == owner)
            .map(|(ip, _)| ip))
    }

    fn list_locked(&self) -> Result<Vec<(Ipv4Addr, Owner)>, IpamError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| IpamError::Io {
            op: "read directory",
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| IpamError::Io {
                op: "read directory",
                path: self.dir.clone(),
                source,
            })?;
            let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            let path = entry.path();
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(IpamError::Io { op: "read", path, source }),
            };
            match Owner::decode(&text) {
                Some(owner) => out.push((ip, owner)),
                // A torn file keeps its address reserved (we never hand it out twice) but
                // belongs to no one we could match.
                None => tracing::warn!(path = %path.display(), "ipam: unreadable allocation file"),
            }
        }
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }

    fn read_last_reserved(&self) -> Result<Option<Ipv4Addr>, IpamError> {
        let path = self.dir.join(LAST_RESERVED_FILE);
        match fs::read_to_string(&path) {
            Ok(t) => Ok(t.trim().parse().ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(IpamError::Io { op: "read", path, source }),
        }
    }

    fn write_last_reserved(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let path = self.dir.join(LAST_RESERVED_FILE);
        fs::write(&path, ip.to_string()).map_err(|source| IpamError::Io { op: "write", path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicU32, Ordering};

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    /// A unique scratch directory, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new() -> Self {
            let p = std::env::temp_dir().join(format!(
                "bh-ipam-unit-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            ));
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn owner(c: &str) -> Owner {
        Owner {
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn allocate_is_idempotent_and_release_frees() {
        let tmp = TempDir::new();
        let store = Store::open(&tmp.0, "net", "10.9.0.0/24".parse().unwrap()).unwrap();
        let a = store.allocate(&owner("a")).unwrap();
        assert_eq!(
            a,
            Allocation {
                ip: Ipv4Addr::new(10, 9, 0, 2),
                created: true
            }
        );
        assert_eq!(store.allocate(&owner("a")).unwrap(), Allocation { ip: a.ip, created: false });
        let b = store.allocate(&owner("b")).unwrap();
        assert_ne!(a.ip, b.ip);
        assert_eq!(store.find(&owner("a")).unwrap(), Some(a.ip));
        assert_eq!(store.release(&owner("a")).unwrap(), Some(a.ip));
        assert_eq!(store.release(&owner("a")).unwrap(), None);
        assert_eq!(store.find(&owner("a")).unwrap(), None);
        assert!(!store.dir().join(a.ip.to_string()).exists());
        // Same container, other interface: a separate allocation.
        let other = Owner {
            container_id: "b".into(),
            ifname: "eth1".into(),
        };
        assert_ne!(store.allocate(&other).unwrap().ip, b.ip);
    }

    #[test]
    fn exhaustion_is_code_100_and_reserved_addresses_are_skipped() {
        let tmp = TempDir::new();
        // /29: .0 network, .1 reserved, .7 broadcast: .2 to .6 usable.
        let store = Store::open(&tmp.0, "small", "10.9.1.0/29".parse().unwrap()).unwrap();
        let got: Vec<Ipv4Addr> = (0..5).map(|i| store.allocate(&owner(&format!("c{i}"))).unwrap().ip).collect();
        assert_eq!(got, (2..=6).map(|h| Ipv4Addr::new(10, 9, 1, h)).collect::<Vec<_>>());
        let err = store.allocate(&owner("late")).unwrap_err();
        assert_eq!(err.code(), 100);
        // A freed address is found again even though the scan starts past it.
        store.release(&owner("c1")).unwrap();
        assert_eq!(store.allocate(&owner("late")).unwrap().ip, Ipv4Addr::new(10, 9, 1, 3));
    }

    #[test]
    fn freed_addresses_rest_before_reuse() {
        let tmp = TempDir::new();
        let store = Store::open(&tmp.0, "rr", "10.9.2.0/24".parse().unwrap()).unwrap();
        let a = store.allocate(&owner("a")).unwrap().ip;
        store.release(&owner("a")).unwrap();
        assert_ne!(store.allocate(&owner("b")).unwrap().ip, a);
    }

    #[test]
    fn concurrent_threads_get_distinct_addresses() {
        let tmp = TempDir::new();
        let subnet: Ipv4Network = "10.9.3.0/24".parse().unwrap();
        let ips: Vec<Ipv4Addr> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|t| {
                    let dir = tmp.0.clone();
                    s.spawn(move || {
                        // Each thread opens its own store, hence its own lock file description.
                        let store = Store::open(&dir, "conc", subnet).unwrap();
                        (0..8)
                            .map(|i| store.allocate(&owner(&format!("t{t}-{i}"))).unwrap().ip)
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ips.len(), 128);
        assert_eq!(ips.iter().collect::<HashSet<_>>().len(), 128);
        let store = Store::open(&tmp.0, "conc", subnet).unwrap();
        assert_eq!(store.allocations().unwrap().len(), 128);
    }
}
