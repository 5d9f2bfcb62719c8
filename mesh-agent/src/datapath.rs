//! The eBPF datapath: loading the programs, attaching them, pinning their
//! links, and the map operations the agent needs.
//!
//! Lifecycle (see ARCHITECTURE.md, "Crash, restart, shutdown (decision)"):
//! * links are pinned under the pin directory and the maps under its
//!   `maps/`, so programs and their state stay if the agent dies: enrolled
//!   pods then fail closed (outbound connects are refused, inbound
//!   connections dropped) rather than bypass the mesh;
//! * on start, the pinned maps are reused (when their layout is this
//!   agent's) and links left by a previous instance are adopted: the new
//!   program replaces the old one inside the link (`BPF_LINK_UPDATE`), so
//!   exactly one set is ever active and there is no moment without one (an
//!   upgrade, [`crate::handover`], or a restart after a crash). Pod links
//!   nobody adopts in the first reconcile are detached then ([`Datapath::sweep`]);
//! * on a clean exit either everything is detached and the pins removed
//!   ([`Datapath::shutdown`]: pods go direct again), or, with
//!   `--keep-attached-on-exit` and pods still enrolled, everything is left
//!   attached and pinned ([`Datapath::release`]: pods fail closed as after a
//!   crash until the next agent takes over).

mod pins;

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{HashMap, MapData, MapError, MapType, PerCpuArray, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps,
    },
    Ebpf, EbpfLoader,
};
use mesh_common::{capacity, maps, ConnKey, EnrolledNetns, OrigDst, PendingConnect, Reason};
use serde::Serialize;

/// The compiled eBPF object, embedded at build time by `build.rs`.
#[cfg(not(heddle_no_ebpf))]
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

const PROG_CONNECT4: &str = "heddle_connect4";
const PROG_CONNECT6: &str = "heddle_connect6";
const PROG_SOCKOPS: &str = "heddle_sockops";
const PROG_SK_LOOKUP: &str = "heddle_sk_lookup";
/// Cgroup links are always multi-attach (they coexist with other programs on
/// the same cgroup); the kernel rejects `BPF_F_ALLOW_MULTI` on `BPF_LINK_CREATE`.
const CGROUP_ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;
/// `BPF_FS_MAGIC` from include/uapi/linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where the maps are pinned, inside the pin directory.
const MAPS_DIR: &str = "maps";
/// Prefix of a pod's `sk_lookup` link pin; the netns cookie follows.
const SK_LOOKUP_PIN: &str = "sk_lookup-";

/// The pinned maps and the layout each must have to be reused.
fn map_shapes() -> [(&'static str, pins::Shape); 6] {
    use std::mem::size_of;
    let shape = |kind, key: usize, value: usize, max_entries| pins::Shape {
        kind,
        key_size: key as u32,
        value_size: value as u32,
        max_entries,
    };
    [
        (
            maps::ENROLLED_NETNS,
            shape(MapType::Hash, size_of::<u64>(), size_of::<EnrolledNetns>(), capacity::ENROLLED_NETNS),
        ),
        (maps::PENDING, shape(MapType::LruHash, size_of::<u64>(), size_of::<PendingConnect>(), capacity::PENDING)),
        (maps::ORIG_DST, shape(MapType::LruHash, size_of::<ConnKey>(), size_of::<OrigDst>(), capacity::ORIG_DST)),
        (maps::INBOUND_LISTENERS, shape(MapType::SockHash, size_of::<u32>(), size_of::<u32>(), capacity::INBOUND)),
        (maps::INBOUND_ENROLLED, shape(MapType::Hash, size_of::<u32>(), size_of::<u32>(), capacity::INBOUND)),
        (maps::STATS, shape(MapType::PerCpuArray, size_of::<u32>(), size_of::<u64>(), Reason::COUNT)),
    ]
}

/// Errors of the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The agent binary carries no eBPF object.
    #[error("this mesh-agent was built without eBPF (AYA_BUILD_SKIP); rebuild with `cargo xtask build`")]
    NoObject,
    /// The object could not be loaded.
    #[error("cannot load the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program is missing or has the wrong type.
    #[error("eBPF program {0} missing from the object")]
    MissingProgram(&'static str),
    /// A program could not be loaded (verifier) or attached.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// Cause.
        #[source]
        source: Box<ProgramError>,
    },
    /// A map is missing or an operation on it failed.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// Cause.
        #[source]
        source: Box<MapError>,
    },
    /// A link could not be converted for pinning.
    #[error("eBPF link of {name}: {source}")]
    Link {
        /// The program.
        name: &'static str,
        /// Cause.
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// A map is missing from the object.
    #[error("eBPF map {0} missing from the object")]
    MissingMap(&'static str),
    /// Pinning or unpinning failed.
    #[error("bpffs {path}: {message}")]
    Pin {
        /// Path of the pin.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The cgroup to attach to could not be opened.
    #[error("cannot open cgroup {path}: {source} (is cgroup v2 mounted there?)")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source: Box::new(source) }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source: Box::new(source) }
}

/// An attached program, as reported by the admin API.
#[derive(Clone, Debug, Serialize)]
pub struct Attachment {
    /// Program name.
    pub program: &'static str,
    /// Attach type.
    pub attach: &'static str,
    /// Cgroup path or network namespace path.
    pub target: String,
    /// Pin path of the link.
    pub pin: PathBuf,
}

/// Occupancy of one map.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct MapUsage {
    /// Entries now.
    pub entries: usize,
    /// Capacity.
    pub capacity: u32,
}

/// The loaded datapath. Map operations are short syscalls behind std mutexes.
pub struct Datapath {
    pin_dir: PathBuf,
    ebpf: Mutex<Ebpf>,
    /// Pods' `sk_lookup` links left pinned by a previous agent, by netns
    /// cookie, until this agent adopts them (or sweeps them away).
    adoptable: Mutex<BTreeMap<u64, PathBuf>>,
    cgroup_links: Mutex<Vec<(Attachment, PinnedLink)>>,
    enrolled: Mutex<HashMap<MapData, u64, EnrolledNetns>>,
    pending: Mutex<HashMap<MapData, u64, PendingConnect>>,
    orig_dst: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
    inbound: Mutex<SockHash<MapData, u32>>,
    inbound_ips: Mutex<HashMap<MapData, u32, u32>>,
    stats: PerCpuArray<MapData, u64>,
}

/// A pod's `sk_lookup` attachment; detached when [`Datapath::detach_netns`] is called.
pub struct NetnsLink {
    link: PinnedLink,
    attachment: Attachment,
}

impl NetnsLink {
    /// What is attached where.
    #[must_use]
    pub fn attachment(&self) -> &Attachment {
        &self.attachment
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

impl Datapath {
    /// Loads the programs on the pinned maps (created and pinned on a first
    /// start), adopts the links a previous instance left in `pin_dir` or
    /// attaches new ones to `cgroup`.
    pub fn start(cgroup: &Path, pin_dir: &Path) -> Result<Self, DatapathError> {
        ensure_bpffs(pin_dir)?;
        let maps_dir = pin_dir.join(MAPS_DIR);
        std::fs::create_dir_all(&maps_dir)
            .map_err(|e| DatapathError::Pin { path: maps_dir.clone(), message: e.to_string() })?;
        drop_incompatible_maps(&maps_dir)?;
        let adoptable = scan_pins(pin_dir)?;
        let mut ebpf = load_object(&maps_dir)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_ebpf_logger(logger),
            Err(e) => tracing::debug!(error = %e, "no eBPF log buffer"),
        }
        let cgroup_file =
            File::open(cgroup).map_err(|source| DatapathError::Cgroup { path: cgroup.to_owned(), source })?;
        let mut links = Vec::new();
        for (name, attach) in [(PROG_CONNECT4, "cgroup/connect4"), (PROG_CONNECT6, "cgroup/connect6")] {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(prog_err(name))?;
            prog.load().map_err(prog_err(name))?;
            let pin = pin_dir.join(name);
            let adopted = adopt(&pin, prog.fd().map_err(prog_err(name))?.as_fd());
            let link = if let Some(link) = adopted {
                link
            } else {
                let id = prog.attach(&cgroup_file, CGROUP_ATTACH_MODE).map_err(prog_err(name))?;
                let link = FdLink::try_from(prog.take_link(id).map_err(prog_err(name))?)
                    .map_err(|source| DatapathError::Link { name, source })?;
                pin_link(link, &pin)?
            };
            links.push((attachment(name, attach, cgroup, pin), link));
        }
        {
            let prog: &mut SockOps = ebpf
                .program_mut(PROG_SOCKOPS)
                .ok_or(DatapathError::MissingProgram(PROG_SOCKOPS))?
                .try_into()
                .map_err(prog_err(PROG_SOCKOPS))?;
            prog.load().map_err(prog_err(PROG_SOCKOPS))?;
            let pin = pin_dir.join(PROG_SOCKOPS);
            let adopted = adopt(&pin, prog.fd().map_err(prog_err(PROG_SOCKOPS))?.as_fd());
            let link = if let Some(link) = adopted {
                link
            } else {
                let id = prog.attach(&cgroup_file, CGROUP_ATTACH_MODE).map_err(prog_err(PROG_SOCKOPS))?;
                let link = FdLink::try_from(prog.take_link(id).map_err(prog_err(PROG_SOCKOPS))?)
                    .map_err(|source| DatapathError::Link { name: PROG_SOCKOPS, source })?;
                pin_link(link, &pin)?
            };
            links.push((attachment(PROG_SOCKOPS, "cgroup/sock_ops", cgroup, pin), link));
        }
        {
            let prog: &mut SkLookup = ebpf
                .program_mut(PROG_SK_LOOKUP)
                .ok_or(DatapathError::MissingProgram(PROG_SK_LOOKUP))?
                .try_into()
                .map_err(prog_err(PROG_SK_LOOKUP))?;
            prog.load().map_err(prog_err(PROG_SK_LOOKUP))?;
        }
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            adoptable: Mutex::new(adoptable),
            enrolled: Mutex::new(take(&mut ebpf, maps::ENROLLED_NETNS)?),
            pending: Mutex::new(take(&mut ebpf, maps::PENDING)?),
            orig_dst: Mutex::new(take(&mut ebpf, maps::ORIG_DST)?),
            inbound: Mutex::new(take(&mut ebpf, maps::INBOUND_LISTENERS)?),
            inbound_ips: Mutex::new(take(&mut ebpf, maps::INBOUND_ENROLLED)?),
            stats: take(&mut ebpf, maps::STATS)?,
            cgroup_links: Mutex::new(links),
            ebpf: Mutex::new(ebpf),
        })
    }

    /// Attaches `sk_lookup` to a pod's network namespace, or adopts the link
    /// a previous agent left there.
    pub fn attach_netns(
        &self,
        netns: BorrowedFd<'_>,
        netns_path: &Path,
        cookie: u64,
    ) -> Result<NetnsLink, DatapathError> {
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        let prog: &mut SkLookup = ebpf
            .program_mut(PROG_SK_LOOKUP)
            .ok_or(DatapathError::MissingProgram(PROG_SK_LOOKUP))?
            .try_into()
            .map_err(prog_err(PROG_SK_LOOKUP))?;
        let pin = self.pin_dir.join(format!("{SK_LOOKUP_PIN}{cookie}"));
        let attachment = attachment(PROG_SK_LOOKUP, "sk_lookup", netns_path, pin.clone());
        if self.adoptable.lock().expect("pins lock").remove(&cookie).is_some() {
            if let Some(link) = adopt(&pin, prog.fd().map_err(prog_err(PROG_SK_LOOKUP))?.as_fd()) {
                return Ok(NetnsLink { link, attachment });
            }
        }
        let id = prog.attach(netns).map_err(prog_err(PROG_SK_LOOKUP))?;
        let link = FdLink::from(prog.take_link(id).map_err(prog_err(PROG_SK_LOOKUP))?);
        Ok(NetnsLink { link: pin_link(link, &pin)?, attachment })
    }

    /// After the first enrollment: detaches the pod links a previous agent
    /// left that nobody adopted (their pods are gone or no longer enrolled),
    /// and removes from the maps the network namespaces and pod IPs not
    /// enrolled now, so a reused map holds no pod that would fail closed
    /// forever.
    pub fn sweep(&self, enrolled: &HashSet<u64>, inbound_ips: &HashSet<Ipv4Addr>) {
        for (cookie, pin) in std::mem::take(&mut *self.adoptable.lock().expect("pins lock")) {
            tracing::info!(pin = %pin.display(), cookie, "detaching a pod link nobody adopted");
            if let Ok(link) = PinnedLink::from_pin(&pin) {
                unpin_and_detach(link, &pin);
            }
        }
        {
            let mut map = self.enrolled.lock().expect("map lock");
            let stale: Vec<u64> = map.keys().flatten().filter(|c| !enrolled.contains(c)).collect();
            for cookie in stale {
                tracing::info!(cookie, "removing a network namespace left enrolled by a previous agent");
                let _ = map.remove(&cookie);
            }
        }
        let keys: HashSet<u32> = inbound_ips.iter().map(|ip| u32::from_ne_bytes(ip.octets())).collect();
        let mut map = self.inbound_ips.lock().expect("map lock");
        let stale: Vec<u32> = map.keys().flatten().filter(|k| !keys.contains(k)).collect();
        for key in stale {
            tracing::info!(ip = %Ipv4Addr::from(key.to_ne_bytes()), "removing a pod IP left enrolled by a previous agent");
            let _ = map.remove(&key);
            let _ = self.inbound.lock().expect("map lock").remove(&key);
        }
    }

    /// Detaches a pod's `sk_lookup` and removes its pin.
    pub fn detach_netns(&self, link: NetnsLink) {
        unpin_and_detach(link.link, &link.attachment.pin);
    }

    /// Marks a network namespace enrolled: its connects are captured.
    pub fn enroll_netns(&self, cookie: u64) -> Result<(), DatapathError> {
        self.enrolled
            .lock()
            .expect("map lock")
            .insert(cookie, EnrolledNetns::default(), 0)
            .map_err(map_err(maps::ENROLLED_NETNS))
    }

    /// Removes a network namespace: its new connects go direct.
    pub fn unenroll_netns(&self, cookie: u64) {
        let _ = self.enrolled.lock().expect("map lock").remove(&cookie);
    }

    /// Steers inbound connections to `ip` to `listener` (a socket in the pod's netns).
    pub fn add_inbound(&self, ip: Ipv4Addr, listener: &impl AsRawFd) -> Result<(), DatapathError> {
        let key = u32::from_ne_bytes(ip.octets());
        self.inbound
            .lock()
            .expect("map lock")
            .insert(key, listener.as_raw_fd(), 0)
            .map_err(map_err(maps::INBOUND_LISTENERS))?;
        self.inbound_ips.lock().expect("map lock").insert(key, 1, 0).map_err(map_err(maps::INBOUND_ENROLLED))
    }

    /// Stops steering inbound connections to `ip`.
    pub fn remove_inbound(&self, ip: Ipv4Addr) {
        let key = u32::from_ne_bytes(ip.octets());
        let _ = self.inbound_ips.lock().expect("map lock").remove(&key);
        let _ = self.inbound.lock().expect("map lock").remove(&key);
    }

    /// Takes the original destination of a redirected connection accepted
    /// from `peer` in the namespace `netns_cookie`.
    pub fn take_orig_dst(&self, netns_cookie: u64, peer: SocketAddrV4) -> Option<SocketAddrV4> {
        let key =
            ConnKey { netns_cookie, src_ip4: u32::from_ne_bytes(peer.ip().octets()), src_port: peer.port(), pad: 0 };
        let mut map = self.orig_dst.lock().expect("map lock");
        let dst = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(SocketAddrV4::new(Ipv4Addr::from(dst.ip4.to_ne_bytes()), u16::from_be(dst.port)))
    }

    /// Per-reason counters, summed over CPUs.
    #[must_use]
    pub fn reasons(&self) -> Vec<(&'static str, u64)> {
        Reason::ALL
            .iter()
            .map(|r| {
                let total = self.stats.get(&(*r as u32), 0).map_or(0, |v| v.iter().sum());
                (r.name(), total)
            })
            .collect()
    }

    /// Occupancy of each map.
    #[must_use]
    pub fn map_usage(&self) -> Vec<(&'static str, MapUsage)> {
        let usage = |entries, capacity| MapUsage { entries, capacity };
        vec![
            (
                maps::ENROLLED_NETNS,
                usage(self.enrolled.lock().expect("map lock").keys().count(), capacity::ENROLLED_NETNS),
            ),
            (maps::PENDING, usage(self.pending.lock().expect("map lock").keys().count(), capacity::PENDING)),
            (maps::ORIG_DST, usage(self.orig_dst.lock().expect("map lock").keys().count(), capacity::ORIG_DST)),
            (maps::INBOUND_LISTENERS, usage(self.inbound.lock().expect("map lock").keys().count(), capacity::INBOUND)),
            (
                maps::INBOUND_ENROLLED,
                usage(self.inbound_ips.lock().expect("map lock").keys().count(), capacity::INBOUND),
            ),
        ]
    }

    /// The node-wide attachments (cgroup programs).
    #[must_use]
    pub fn attachments(&self) -> Vec<Attachment> {
        self.cgroup_links.lock().expect("links lock").iter().map(|(a, _)| a.clone()).collect()
    }

    /// Detaches the cgroup programs, unpins the maps and removes the pin
    /// directory. Pod attachments must have been detached first.
    pub fn shutdown(&self) {
        for (att, link) in self.cgroup_links.lock().expect("links lock").drain(..) {
            unpin_and_detach(link, &att.pin);
        }
        let maps_dir = self.pin_dir.join(MAPS_DIR);
        for (name, _) in map_shapes() {
            let _ = std::fs::remove_file(maps_dir.join(name));
        }
        let _ = std::fs::remove_dir(&maps_dir);
        if let Err(e) = std::fs::remove_dir(&self.pin_dir) {
            tracing::warn!(dir = %self.pin_dir.display(), error = %e, "cannot remove pin directory");
        }
    }

    /// Leaves the cgroup programs attached and pinned (and with them the
    /// maps they reference, pod entries included): only this process's
    /// handles are closed, the pins keep the links and maps alive. The next
    /// agent adopts them at start ([`Datapath::start`]).
    pub fn release(&self) {
        for (att, link) in self.cgroup_links.lock().expect("links lock").drain(..) {
            tracing::debug!(pin = %att.pin.display(), "leaving link attached");
            // Dropping a `PinnedLink` closes its fd; the pin holds the link.
            drop(link);
        }
    }
}

#[cfg(not(heddle_no_ebpf))]
fn load_object(maps_dir: &Path) -> Result<Ebpf, DatapathError> {
    let mut loader = EbpfLoader::new();
    for (name, _) in map_shapes() {
        loader.map_pin_path(name, maps_dir.join(name));
    }
    loader.load(EBPF_OBJECT).map_err(|e| DatapathError::Load(Box::new(e)))
}

#[cfg(heddle_no_ebpf)]
fn load_object(_maps_dir: &Path) -> Result<Ebpf, DatapathError> {
    let _ = EbpfLoader::new;
    Err(DatapathError::NoObject)
}

fn attachment(program: &'static str, attach: &'static str, target: &Path, pin: PathBuf) -> Attachment {
    Attachment { program, attach, target: target.display().to_string(), pin }
}

fn pin_link(link: FdLink, path: &Path) -> Result<PinnedLink, DatapathError> {
    link.pin(path).map_err(|e| DatapathError::Pin { path: path.to_owned(), message: e.to_string() })
}

/// Adopts the link pinned at `pin`, if there is one: `program` replaces
/// whatever it ran, atomically. A link that cannot be adopted is detached
/// (the caller attaches a new one).
fn adopt(pin: &Path, program: BorrowedFd<'_>) -> Option<PinnedLink> {
    if !pin.exists() {
        return None;
    }
    match pins::replace_program(pin, program)
        .map_err(|e| e.to_string())
        .and_then(|()| PinnedLink::from_pin(pin).map_err(|e| e.to_string()))
    {
        Ok(link) => {
            tracing::info!(pin = %pin.display(), "adopted the link left by a previous agent (program replaced in place)");
            Some(link)
        }
        Err(e) => {
            tracing::warn!(pin = %pin.display(), error = %e, "cannot adopt the link left by a previous agent; detaching it");
            match PinnedLink::from_pin(pin) {
                Ok(link) => unpin_and_detach(link, pin),
                Err(_) => {
                    let _ = std::fs::remove_file(pin);
                }
            }
            None
        }
    }
}

fn unpin_and_detach(link: PinnedLink, path: &Path) {
    match link.unpin() {
        // Dropping the last reference detaches the link.
        Ok(fd_link) => drop(fd_link),
        Err(e) => tracing::warn!(pin = %path.display(), error = %e, "cannot unpin link"),
    }
}

/// Unpins maps whose layout is not this agent's (an upgrade that changed a
/// map): the programs then start on new, empty maps.
fn drop_incompatible_maps(maps_dir: &Path) -> Result<(), DatapathError> {
    for (name, shape) in map_shapes() {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        if let Some(why) = pins::mismatch(&path, shape) {
            tracing::warn!(map = name, reason = %why, "not reusing the pinned map; starting with an empty one");
            std::fs::remove_file(&path)
                .map_err(|e| DatapathError::Pin { path: path.clone(), message: e.to_string() })?;
        }
    }
    Ok(())
}

/// The pins a previous agent left in `dir`: the pods' `sk_lookup` links by
/// netns cookie, to adopt. The cgroup links are adopted by name; anything
/// else is removed.
fn scan_pins(dir: &Path) -> Result<BTreeMap<u64, PathBuf>, DatapathError> {
    let mut pods = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(pods);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == MAPS_DIR || [PROG_CONNECT4, PROG_CONNECT6, PROG_SOCKOPS].contains(&name.as_str()) {
            continue;
        }
        if let Some(cookie) = name.strip_prefix(SK_LOOKUP_PIN).and_then(|c| c.parse().ok()) {
            pods.insert(cookie, path);
            continue;
        }
        tracing::info!(pin = %path.display(), "removing stale pin");
        std::fs::remove_file(&path).map_err(|e| DatapathError::Pin { path: path.clone(), message: e.to_string() })?;
    }
    Ok(pods)
}

/// Makes sure the pin directory is on a bpffs, mounting one at /sys/fs/bpf
/// when nothing is mounted there.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    let root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        let rc = {
            let src = c"bpf";
            let target = c"/sys/fs/bpf";
            // SAFETY: valid NUL-terminated strings; no data argument.
            unsafe { libc::mount(src.as_ptr(), target.as_ptr(), src.as_ptr(), 0, std::ptr::null()) }
        };
        if rc != 0 {
            return Err(DatapathError::Pin {
                path: root.to_owned(),
                message: format!("cannot mount bpffs: {}", std::io::Error::last_os_error()),
            });
        }
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    std::fs::create_dir_all(parent)
        .map_err(|e| DatapathError::Pin { path: parent.to_owned(), message: e.to_string() })?;
    if !is_bpffs(parent) {
        return Err(DatapathError::Pin { path: parent.to_owned(), message: "not on a bpffs".into() });
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid path string and a buffer of the right type.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    // SAFETY: initialised by a successful statfs.
    rc == 0 && unsafe { st.assume_init() }.f_type == BPF_FS_MAGIC
}

fn spawn_ebpf_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    tokio::spawn(async move {
        // SAFETY: the AsyncFd owns the logger, so its ring buffer fd stays
        // open for as long as it is registered.
        let Ok(mut fd) =
            (unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) })
        else {
            return;
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
