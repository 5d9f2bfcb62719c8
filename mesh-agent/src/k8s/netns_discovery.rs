//! Finds the network namespace of each pod on this node, with no help from
//! the container runtime: the agent runs with `hostPID`, so every pod's
//! namespace is reachable as `/proc/<pid>/ns/net` of one of its processes
//! (the sandbox's pause process at least).
//!
//! A scan lists the candidate namespaces (each once by inode, the agent's
//! own skipped), enters each on the calling thread ([`Netns::run`]) and
//! checks which wanted pod IPs are local there: binding a socket to `ip:0`
//! succeeds only where the address is assigned (`EADDRNOTAVAIL` elsewhere).
//!
//! An IP alone does not prove which pod a namespace belongs to: a pod with
//! `CAP_NET_ADMIN` in its own namespace can assign itself a neighbour's IP,
//! and the agent would then bind the neighbour's listeners — and present the
//! neighbour's certificate — in the wrong pod. So:
//! - by default only `/proc/<pid>/ns/net` is searched, and a match counts
//!   only if that process's cgroup path names the pod's UID (the kubelet puts
//!   every container of a pod under `.../pod<uid>/` with the cgroupfs driver,
//!   `...-pod<uid_with_underscores>.slice/` with the systemd driver);
//! - with `--netns-dir` (named namespaces the operator vouches for, as the
//!   test bed does) there is no UID to check;
//! - either way, an IP found in more than one namespace is ambiguous and
//!   left unresolved, with an error in the log, rather than guessed.
//!
//! Results are cached by IP with the namespace's inode; a cached path whose
//! inode changed (the process exited, the pod was recreated with the same
//! IP) is dropped and found again.
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

/// Where runtimes and CNI plugins name namespaces (bind mounts that live as
/// long as the pod sandbox).
const NAMED_NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// `NSFS_MAGIC` from include/uapi/linux/magic.h.
const NSFS_MAGIC: libc::__fsword_t = 0x6e73_6673;

/// A namespace's identity: device and inode of its nsfs file.
type NsKey = (u64, u64);

/// A pod IP to find, and the pod's UID when known.
#[derive(Clone, Debug)]
pub struct Wanted {
    /// The pod IP.
    pub ip: IpAddr,
    /// `metadata.uid` of the pod.
    pub pod_uid: Option<String>,
}

/// A candidate namespace.
struct Candidate {
    path: PathBuf,
    key: NsKey,
    /// The process it was reached through (`/proc` candidates).
    pid: Option<u32>,
}

/// The finder and its cache.
#[derive(Debug)]
pub struct NetnsFinder {
    home: Arc<File>,
    home_key: Option<NsKey>,
    /// Directories of named namespaces to search (`--netns-dir`).
    dirs: Vec<PathBuf>,
    /// `/proc`, searched when no `dirs` are given.
    proc_root: Option<PathBuf>,
    /// IP to (path, namespace, pod UID) found for it.
    cache: HashMap<IpAddr, (PathBuf, NsKey, Option<String>)>,
    /// IPs last reported ambiguous, to log each once.
    ambiguous: HashSet<IpAddr>,
}

impl NetnsFinder {
    /// A finder that searches every process's namespace and accepts a match
    /// only from a process of the pod itself; it returns threads to `home`
    /// (the agent's namespace) and never reports `home`.
    #[must_use]
    pub fn new(home: Arc<File>) -> Self {
        Self::with_search(home, Vec::new(), Some(PathBuf::from("/proc")))
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
        Self { home, home_key, dirs, proc_root, cache: HashMap::new(), ambiguous: HashSet::new() }
    }

    /// The namespace path holding each wanted IP that can be found without
    /// doubt. Scans only when some IP is not in the (still valid) cache.
    pub fn find(&mut self, wanted: &[Wanted]) -> HashMap<IpAddr, PathBuf> {
        let mut found = HashMap::new();
        let mut missing: Vec<&Wanted> = Vec::new();
        for w in wanted {
            // A hit must be the same pod (PIDs and nsfs inodes are reused).
            match self.cache.get(&w.ip) {
                Some((path, key, uid)) if *uid == w.pod_uid && ns_key(path) == Some(*key) => {
                    found.insert(w.ip, path.clone());
                }
                _ => missing.push(w),
            }
        }
        if missing.is_empty() {
            return found;
        }
        let ips: Vec<IpAddr> = missing.iter().map(|w| w.ip).collect();
        let mut matches: HashMap<IpAddr, Vec<(PathBuf, NsKey)>> = HashMap::new();
        for c in self.candidates() {
            let Ok(ns) = Netns::open(&c.path, self.home.clone()) else {
                continue; // the process exited meanwhile
            };
            let Ok(local) = ns.run(|| local_ips(&ips)) else {
                continue;
            };
            for ip in local {
                let uid = missing.iter().find(|w| w.ip == ip).and_then(|w| w.pod_uid.as_deref());
                if let (Some(pid), Some(root)) = (c.pid, self.proc_root.as_deref()) {
                    // Reached through a process: it must be the pod's own
                    // (a pod without a UID cannot be tied to one).
                    if !uid.is_some_and(|uid| process_of_pod(root, pid, uid)) {
                        continue;
                    }
                }
                let seen = matches.entry(ip).or_default();
                if !seen.iter().any(|(_, k)| *k == c.key) {
                    seen.push((c.path.clone(), c.key));
                }
            }
        }
        let named = self.named_by_key();
        for (ip, candidates) in matches {
            if let [(path, key)] = candidates.as_slice() {
                // The runtime's name for the namespace outlives any one
                // process (CRI-O without a pause process, container
                // restarts): prefer it to `/proc/<pid>/ns/net`.
                let path = named.get(key).unwrap_or(path).clone();
                let uid = missing.iter().find(|w| w.ip == ip).and_then(|w| w.pod_uid.clone());
                self.ambiguous.remove(&ip);
                self.cache.insert(ip, (path.clone(), *key, uid));
                found.insert(ip, path);
            } else if self.ambiguous.insert(ip) {
                let paths: Vec<String> = candidates.iter().map(|(p, _)| p.display().to_string()).collect();
                tracing::error!(%ip, namespaces = ?paths, "pod IP assigned in more than one network namespace; not enrolling it");
            }
        }
        found
    }

    /// Namespaces the runtime named (`/run/netns`, `/var/run/netns`), by
    /// inode: aliases for namespaces found through `/proc`.
    fn named_by_key(&self) -> HashMap<NsKey, PathBuf> {
        if self.proc_root.is_none() {
            return HashMap::new();
        }
        NAMED_NETNS_DIRS
            .iter()
            .flat_map(|d| read_dir_sorted(Path::new(d)))
            .filter_map(|p| Some((ns_key(&p)?, p)))
            .collect()
    }

    /// Candidate namespaces, each once.
    fn candidates(&self) -> Vec<Candidate> {
        let mut seen: HashSet<NsKey> = self.home_key.into_iter().collect();
        let mut out = Vec::new();
        let mut push = |path: PathBuf, pid: Option<u32>| {
            if let Some(key) = ns_key(&path) {
                if seen.insert(key) {
                    out.push(Candidate { path, key, pid });
                }
            }
        };
        for dir in &self.dirs {
            for entry in read_dir_sorted(dir) {
                push(entry, None);
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
            push(proc_root.join(pid.to_string()).join("ns/net"), Some(pid));
        }
        out
    }
}

/// Whether process `pid` belongs to the pod with `uid`, by its cgroup path.
fn process_of_pod(proc_root: &Path, pid: u32, uid: &str) -> bool {
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))
        .is_ok_and(|cgroups| cgroup_names_pod(&cgroups, uid))
}

/// Whether a `/proc/<pid>/cgroup` text puts the process in the pod `uid`'s
/// cgroup. The kubelet names one path segment after the pod —
/// `pod<uid>` (cgroupfs driver) or `kubepods-<qos>-pod<uid_with_underscores>.slice`
/// (systemd driver) — and containers live below it. Only the *first*
/// segment naming a pod counts, and it must name exactly this pod: a
/// container may create sub-cgroups below its own, never rename the ones
/// above it, so a nested `.../pod<other>/` proves nothing.
fn cgroup_names_pod(cgroups: &str, uid: &str) -> bool {
    let systemd_uid = uid.replace('-', "_");
    cgroups.lines().any(|l| {
        let path = l.splitn(3, ':').nth(2).unwrap_or("");
        path.split('/').find_map(pod_of_segment).is_some_and(|named| named == uid || named == systemd_uid)
    })
}

/// The pod UID a cgroup path segment names, if it is a pod's segment.
fn pod_of_segment(segment: &str) -> Option<&str> {
    if let Some(slice) = segment.strip_suffix(".slice") {
        // kubepods-besteffort-pod<uid_>.slice, kubepods-pod<uid_>.slice
        let (_, uid) = slice.rsplit_once("-pod")?;
        return slice.starts_with("kubepods").then_some(uid);
    }
    segment.strip_prefix("pod").filter(|uid| uid.len() == 36)
}

fn read_dir_sorted(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
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
        let found = finder.find(&[Wanted { ip: "127.0.0.1".parse().unwrap(), pod_uid: None }]);
        if let Some(path) = found.get(&"127.0.0.1".parse().unwrap()) {
            assert_ne!(ns_key(path), finder.home_key, "{}", path.display());
        }
    }

    #[test]
    fn does_not_find_an_address_no_namespace_holds() {
        let home = Arc::new(Netns::current().unwrap());
        let mut finder = NetnsFinder::new(home);
        // TEST-NET-3, never assigned on a test machine.
        let wanted = Wanted { ip: "203.0.113.254".parse().unwrap(), pod_uid: None };
        assert!(finder.find(&[wanted]).is_empty());
    }

    #[test]
    fn ties_a_process_to_its_pod_by_cgroup_path_with_either_driver() {
        let uid = "3f1c2a9e-5b7d-4c1e-9f00-aa11bb22cc33";
        let cgroupfs = "0::/kubepods/besteffort/pod3f1c2a9e-5b7d-4c1e-9f00-aa11bb22cc33/0123abcd\n";
        let systemd = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3f1c2a9e_5b7d_4c1e_9f00_aa11bb22cc33.slice/cri-containerd-0123.scope\n";
        let pause_only = "0::/kubepods/pod3f1c2a9e-5b7d-4c1e-9f00-aa11bb22cc33\n";
        let v1 = "12:memory:/kubepods/burstable/pod3f1c2a9e-5b7d-4c1e-9f00-aa11bb22cc33/abc\n0::/\n";
        assert!(cgroup_names_pod(cgroupfs, uid));
        assert!(cgroup_names_pod(systemd, uid));
        assert!(cgroup_names_pod(pause_only, uid));
        assert!(cgroup_names_pod(v1, uid));
        let other = "0::/kubepods/besteffort/pod99999999-5b7d-4c1e-9f00-aa11bb22cc33/0123abcd\n";
        assert!(!cgroup_names_pod(other, uid));
        // A longer UID that starts with this one is not a match.
        assert!(!cgroup_names_pod("0::/kubepods/pod3f1c2a9e-5b7d-4c1e-9f00-aa11bb22cc334/x\n", uid));
        assert!(!cgroup_names_pod("0::/system.slice/kubelet.service\n", uid));
        // A pod that nests a cgroup named after another pod below its own
        // proves nothing: only the first pod segment counts.
        let nested = "0::/kubepods/besteffort/pod99999999-5b7d-4c1e-9f00-aa11bb22cc33/c1/pod3f1c2a9e-5b7d-4c1e-9f00-aa11bb22cc33/x\n";
        assert!(!cgroup_names_pod(nested, uid));
        let nested_systemd = "0::/kubepods.slice/kubepods-pod99999999_5b7d_4c1e_9f00_aa11bb22cc33.slice/c/kubepods-pod3f1c2a9e_5b7d_4c1e_9f00_aa11bb22cc33.slice/x\n";
        assert!(!cgroup_names_pod(nested_systemd, uid));
    }
}
