//! Finds the network namespace of each pod on this node from its IP, with no
//! help from the container runtime: the agent runs with `hostPID`, so every
//! pod's namespace is reachable as `/proc/<pid>/ns/net` of one of its
//! processes (the sandbox's pause process at least), and CNI plugins that
//! name namespaces bind-mount them under `/run/netns` (mounted into the
//! agent when present).
//!
//! A scan lists the candidate namespaces (named ones first, then `/proc`,
//! de-duplicated by inode, the agent's own namespace skipped), enters each
//! on the calling thread ([`Netns::run`]) and checks which of the wanted IPs
//! are local there: binding a socket to `ip:0` succeeds only where the
//! address is assigned (`EADDRNOTAVAIL` elsewhere). Results are cached by
//! IP with the namespace's inode; a cached path whose inode changed (the
//! process exited, the pod was recreated with the same IP) is dropped and
//! found again.
//!
//! When no namespace holds a pod's IP (the sandbox is still starting, or
//! the agent lacks `hostPID`/`CAP_SYS_PTRACE`) the pod stays un-enrolled —
//! its traffic is not captured, it is not broken — and the source retries
//! every second; `GET /workloads` shows it without a netns.
//!
//! This is blocking work (filesystem and `setns`); callers run it on a
//! blocking thread.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::netns::Netns;

/// Directories where CNI plugins bind-mount named namespaces.
const NAMED_NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// `NSFS_MAGIC` from include/uapi/linux/magic.h.
const NSFS_MAGIC: libc::__fsword_t = 0x6e73_6673;

/// A namespace's identity: device and inode of its nsfs file.
type NsKey = (u64, u64);

/// The finder and its cache.
#[derive(Debug)]
pub struct NetnsFinder {
    home: Arc<File>,
    home_key: Option<NsKey>,
    /// Directories of named namespaces to search.
    dirs: Vec<PathBuf>,
    /// `/proc`, searched after `dirs`; `None` when only `dirs` are searched.
    proc_root: Option<PathBuf>,
    cache: HashMap<IpAddr, (PathBuf, NsKey)>,
}

impl NetnsFinder {
    /// A finder that searches `/run/netns`, `/var/run/netns`, then every
    /// process's namespace; it returns threads to `home` (the agent's
    /// namespace) and never reports `home` itself.
    #[must_use]
    pub fn new(home: Arc<File>) -> Self {
        let dirs = NAMED_NETNS_DIRS.iter().map(PathBuf::from).collect();
        Self::with_search(home, dirs, Some(PathBuf::from("/proc")))
    }

    /// A finder that searches only the named namespaces in `dirs` (files
    /// or symlinks to namespaces), as the runtime that names them does
    /// (`--netns-dir`; the test bed, where every node shares one `/proc`).
    #[must_use]
    pub fn in_dirs(home: Arc<File>, dirs: Vec<PathBuf>) -> Self {
        Self::with_search(home, dirs, None)
    }

    fn with_search(home: Arc<File>, dirs: Vec<PathBuf>, proc_root: Option<PathBuf>) -> Self {
        let home_key = home.metadata().ok().map(|m| (m.dev(), m.ino()));
        Self {
            home,
            home_key,
            dirs,
            proc_root,
            cache: HashMap::new(),
        }
    }

    /// The namespace path holding each of `ips` that can be found. Scans
    /// only when some IP is not in the (still valid) cache.
    pub fn find(&mut self, ips: &[IpAddr]) -> HashMap<IpAddr, PathBuf> {
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        for ip in ips {
            match self.cache.get(ip) {
                Some((path, key)) if ns_key(path) == Some(*key) => {
                    found.insert(*ip, path.clone());
                }
                _ => missing.push(*ip),
            }
        }
        if missing.is_empty() {
            return found;
        }
        for ip in &missing {
            self.cache.remove(ip);
        }
        for (path, key) in self.candidates() {
            let Ok(ns) = Netns::open(&path, self.home.clone()) else {
                continue; // the process exited meanwhile
            };
            let Ok(local) = ns.run(|| local_ips(&missing)) else {
                continue;
            };
            for ip in local {
                self.cache.insert(ip, (path.clone(), key));
                found.insert(ip, path.clone());
            }
            missing.retain(|ip| !found.contains_key(ip));
            if missing.is_empty() {
                break;
            }
        }
        found
    }

    /// Candidate namespaces, named ones first (stable paths), each once.
    fn candidates(&self) -> Vec<(PathBuf, NsKey)> {
        let mut seen: HashSet<NsKey> = self.home_key.into_iter().collect();
        let mut out = Vec::new();
        let mut push = |path: PathBuf| {
            if let Some(key) = ns_key(&path) {
                if seen.insert(key) {
                    out.push((path, key));
                }
            }
        };
        for dir in &self.dirs {
            for entry in read_dir_sorted(dir) {
                push(entry);
            }
        }
        let Some(proc_root) = &self.proc_root else {
            return out;
        };
        let mut pids: Vec<u32> = std::fs::read_dir(proc_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        // Lowest PID first: the pod's oldest process, usually the sandbox.
        pids.sort_unstable();
        for pid in pids {
            push(proc_root.join(pid.to_string()).join("ns/net"));
        }
        out
    }
}

fn read_dir_sorted(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Device and inode of the namespace a path refers to (following the
/// `/proc/<pid>/ns/net` magic link), if it is a network namespace.
fn ns_key(path: &Path) -> Option<NsKey> {
    if !is_netns(path) {
        return None;
    }
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Whether `path` (followed through symlinks and `/proc/<pid>/ns/net`
/// magic links) is a namespace file: its filesystem is nsfs. Only network
/// namespaces are looked at (`ns/net`, or what a CNI bind-mounted).
fn is_netns(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid out-parameter; `c` is a valid
    // NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above; `st` is valid for writes.
    let rc = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
    rc == 0 && st.f_type == NSFS_MAGIC
}

/// Which of `ips` are assigned in the calling thread's namespace.
fn local_ips(ips: &[IpAddr]) -> Vec<IpAddr> {
    ips.iter()
        .copied()
        .filter(|ip| {
            let domain = socket2::Domain::for_address(SocketAddr::new(*ip, 0));
            socket2::Socket::new(domain, socket2::Type::DGRAM, None)
                .and_then(|s| s.bind(&SocketAddr::new(*ip, 0).into()))
                .is_ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_reports_the_agents_own_namespace() {
        let home = Arc::new(Netns::current().unwrap());
        let mut finder = NetnsFinder::new(home);
        // 127.0.0.1 is local in every namespace with lo up, including ours;
        // the finder must not answer with the agent's own namespace.
        let found = finder.find(&["127.0.0.1".parse().unwrap()]);
        if let Some(path) = found.get(&"127.0.0.1".parse().unwrap()) {
            assert_ne!(ns_key(path), finder.home_key, "{}", path.display());
        }
    }

    #[test]
    fn does_not_find_an_address_no_namespace_holds() {
        let home = Arc::new(Netns::current().unwrap());
        let mut finder = NetnsFinder::new(home);
        // TEST-NET-3, never assigned on a test machine.
        assert!(finder.find(&["203.0.113.254".parse().unwrap()]).is_empty());
    }
}
