//! Network namespaces: the only module that calls `setns` or `unshare`.
//!
//! Work inside a namespace runs on a dedicated OS thread that enters the namespace and
//! then ends, so no thread (and no tokio worker) is ever left in the wrong namespace.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where named network namespaces live, as with `ip netns`.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Why a namespace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("cannot open netns {netns}")]
    Open {
        /// Namespace path.
        netns: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{op} failed for netns {netns}")]
    Sys {
        /// Which call.
        op: &'static str,
        /// Namespace path.
        netns: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// The worker thread panicked.
    #[error("worker thread for netns {netns} panicked")]
    Panicked {
        /// Namespace path.
        netns: PathBuf,
    },
}

/// Path of a named namespace.
pub fn named_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Runs `f` on a fresh OS thread inside the network namespace at `netns`.
///
/// Processes spawned by `f` inherit that namespace.
pub fn run_in<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let file = File::open(netns).map_err(|source| NetnsError::Open {
        netns: netns.to_path_buf(),
        source,
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Sys {
                    op: "setns",
                    netns: netns.to_path_buf(),
                    source,
                })?;
                Ok(f())
            })
            .join()
            .map_err(|_| NetnsError::Panicked {
                netns: netns.to_path_buf(),
            })?
    })
}

/// Creates the named namespace `name` (as `ip netns add` does); an existing one is kept.
pub fn create_named(name: &str) -> Result<PathBuf, NetnsError> {
    let path = named_path(name);
    if is_netns_mount(&path) {
        return Ok(path);
    }
    let sys = |op, source| NetnsError::Sys {
        op,
        netns: path.clone(),
        source,
    };
    let dir = Path::new(NETNS_RUN_DIR);
    std::fs::create_dir_all(dir).map_err(|source| NetnsError::Open {
        netns: path.clone(),
        source,
    })?;
    // Make /run/netns a shared mount point so the bind mounts propagate to other mount
    // namespaces (containers, other runtimes), like iproute2 does.
    if let Err(nix::Error::EINVAL) = mount(None::<&str>, dir, None::<&str>, MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>) {
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .map_err(|e| sys("bind mount /run/netns", e))?;
        mount(None::<&str>, dir, None::<&str>, MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>)
            .map_err(|e| sys("make /run/netns shared", e))?;
    }
    File::create(&path).map_err(|source| NetnsError::Open {
        netns: path.clone(),
        source,
    })?;
    let target = path.clone();
    let result = std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<(), NetnsError> {
                unshare(CloneFlags::CLONE_NEWNET).map_err(|e| sys("unshare", e))?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| sys("bind mount", e))
            })
            .join()
            .map_err(|_| NetnsError::Panicked { netns: path.clone() })?
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    result.map(|()| path)
}

/// Deletes the named namespace at `path`; an absent one is success.
pub fn delete(path: &Path) -> Result<(), NetnsError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(source) => {
            return Err(NetnsError::Sys {
                op: "umount",
                netns: path.to_path_buf(),
                source,
            })
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetnsError::Open {
            netns: path.to_path_buf(),
            source,
        }),
    }
}

/// True when `path` is a mounted network namespace.
pub fn is_netns_mount(path: &Path) -> bool {
    // A bind-mounted nsfs file reports the nsfs magic; a plain file does not.
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_enter_delete() {
        let name = format!("bhtest-netns-{}", std::process::id());
        let path = create_named(&name).unwrap();
        assert!(is_netns_mount(&path));
        let inside = run_in(&path, || std::fs::read_link("/proc/thread-self/ns/net").unwrap()).unwrap();
        let outside = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        assert_ne!(inside, outside);
        delete(&path).unwrap();
        assert!(!path.exists());
        delete(&path).unwrap();
    }
}
