//! A userspace delay line on one node's link to the switch: every frame
//! crossing it, both ways, is held for a fixed time (and optionally every
//! Nth large frame is dropped), so tests can check what the mesh reports
//! about a slow, lossy link.
//!
//! Why not `tc qdisc add ... netem delay 20ms`: the kernels this runs on
//! may lack `sch_netem` (`CONFIG_NET_SCH_NETEM` unset; only htb, tbf, pfifo
//! and ingress/clsact are there), and nothing else in `tc` delays packets.
//! This does the same in userspace, honestly: in the switch namespace the
//! node's port `n<i>` is taken out of the bridge, a veth pair
//! `dl-n<i>`/`dlp-n<i>` is added with `dl-n<i>` as the bridge port, and two
//! threads per direction move frames between `n<i>` and `dlp-n<i>` through
//! `AF_PACKET` sockets: a reader stamps each frame with its due time, a
//! writer sends it when due. Frames keep their order; the delay is added
//! once per direction, so a TCP round trip over the link gains twice the
//! delay. The sockets use `PACKET_VNET_HDR`, so GSO super-frames and
//! partial checksums pass through as the kernel made them (no offload
//! changes needed), and `PACKET_IGNORE_OUTGOING`, so a socket never reads
//! back what the line itself sent.
//!
//! Everything lives in the switch namespace, which the test bed deletes on
//! teardown (also after a crash, through the stale-resource reaper); dropping
//! the [`DelayLine`] stops its threads and puts the port back on the bridge
//! (so agents can still say goodbye to each other at teardown).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std::{ffi::CString, io};

use crate::error::{Result, TestbedError};
use crate::exec::{in_netns, ip};

/// `PACKET_VNET_HDR` (`linux/if_packet.h`).
const PACKET_VNET_HDR: libc::c_int = 15;
/// `PACKET_IGNORE_OUTGOING` (`linux/if_packet.h`, Linux 4.20).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// `sizeof(struct virtio_net_hdr)`.
const VNET_HDR_LEN: usize = 10;
/// Frames at least this long (without the vnet header) count as data for
/// [`DelaySpec::drop_every`]; ACKs, SYNs and ARP are never dropped.
const LARGE_FRAME: usize = 1000;

/// What the delay line does.
#[derive(Debug, Clone, Copy)]
pub struct DelaySpec {
    /// Added to every frame, each way.
    pub one_way: Duration,
    /// Drop every Nth large frame (each direction counts its own).
    pub drop_every: Option<u32>,
}

/// Frames moved and dropped so far.
#[derive(Debug, Default)]
pub struct DelayCounters {
    /// Frames forwarded (both ways).
    pub forwarded: AtomicU64,
    /// Frames dropped on purpose.
    pub dropped: AtomicU64,
}

/// A running delay line; stops when dropped.
#[derive(Debug)]
pub struct DelayLine {
    switch_ns: String,
    port: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<DelayCounters>,
}

impl DelayLine {
    /// Puts a delay line on `port` (a switch port, e.g. `n2`) of the bridge
    /// `br0` in the switch namespace `switch_ns`.
    pub(crate) fn start(switch_ns: &str, port: &str, spec: DelaySpec) -> Result<Self> {
        let (bridge_side, line_side) = (format!("dl-{port}"), format!("dlp-{port}"));
        ip(["-n", switch_ns, "link", "set", port, "nomaster"])?;
        ip(["-n", switch_ns, "link", "add", &bridge_side, "type", "veth", "peer", "name", &line_side])?;
        ip(["-n", switch_ns, "link", "set", &bridge_side, "master", "br0", "up"])?;
        for dev in [port, line_side.as_str()] {
            ip(["-n", switch_ns, "link", "set", dev, "promisc", "on", "up"])?;
        }
        let netns = Path::new("/run/netns").join(switch_ns);
        let names = [port.to_owned(), line_side.clone()];
        let [node_side, bridge] = in_netns(&netns, move || -> io::Result<[OwnedFd; 2]> {
            Ok([packet_socket(&names[0])?, packet_socket(&names[1])?])
        })?
        .map_err(|e| TestbedError::io(format!("AF_PACKET sockets on {port} in {switch_ns}"), e))?;
        let (node_side, bridge) = (Arc::new(node_side), Arc::new(bridge));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(DelayCounters::default());
        let mut threads = Vec::new();
        for (from, to) in [(&node_side, &bridge), (&bridge, &node_side)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let (from, stop_r, c) = (from.clone(), stop.clone(), counters.clone());
            threads.push(std::thread::spawn(move || {
                read_frames(&from, &tx, spec, &stop_r, &c);
            }));
            let (to, stop_w, c) = (to.clone(), stop.clone(), counters.clone());
            threads.push(std::thread::spawn(move || {
                write_frames(&to, &rx, &stop_w, &c);
            }));
        }
        Ok(Self { switch_ns: switch_ns.to_owned(), port: port.to_owned(), stop, threads, counters })
    }

    /// Frames forwarded and dropped so far.
    #[must_use]
    pub fn counters(&self) -> (u64, u64) {
        (self.counters.forwarded.load(Ordering::Relaxed), self.counters.dropped.load(Ordering::Relaxed))
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let (ns, port) = (self.switch_ns.as_str(), self.port.as_str());
        let bridge_side = format!("dl-{port}");
        for args in
            [["-n", ns, "link", "del", bridge_side.as_str(), "", ""], ["-n", ns, "link", "set", port, "master", "br0"]]
        {
            let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
            if let Err(e) = ip(args) {
                eprintln!("delay line: restoring {port}: {e}");
            }
        }
    }
}

fn setsockopt_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).expect("small");
    // SAFETY: `fd` is a live socket; the option value is a c_int of `len` bytes.
    let rc = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (&raw const value).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An `AF_PACKET` socket bound to `dev` (all protocols), with vnet headers,
/// without its own outgoing frames, a large receive buffer and a 100 ms
/// receive timeout (to notice the stop flag).
fn packet_socket(dev: &str) -> io::Result<OwnedFd> {
    let all = i32::from(u16::try_from(libc::ETH_P_ALL).expect("16-bit").to_be());
    // SAFETY: plain socket(2) call; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, all) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    setsockopt_int(&fd, libc::SOL_PACKET, PACKET_VNET_HDR, 1)?;
    setsockopt_int(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)?;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20)?;
    let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).expect("small");
    // SAFETY: `fd` is live; the value is a timeval of `len` bytes.
    if unsafe {
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const timeout).cast(), len)
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let name = CString::new(dev).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid C string; this thread is in the switch netns.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain old data, valid when zeroed.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).expect("16-bit");
    addr.sll_protocol = u16::try_from(libc::ETH_P_ALL).expect("16-bit").to_be();
    addr.sll_ifindex = i32::try_from(index).map_err(io::Error::other)?;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).expect("small");
    // SAFETY: `addr` is a sockaddr_ll of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn read_frames(
    from: &OwnedFd,
    tx: &mpsc::Sender<(Instant, Vec<u8>)>,
    spec: DelaySpec,
    stop: &AtomicBool,
    counters: &DelayCounters,
) {
    let mut buf = vec![0u8; 70_000];
    let mut large = 0u32;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `buf` is writable for its length; `from` is a live socket.
        let n = unsafe { libc::recv(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else {
            continue; // timeout (EAGAIN) or EINTR: check the stop flag
        };
        if n <= VNET_HDR_LEN {
            continue;
        }
        if n - VNET_HDR_LEN >= LARGE_FRAME {
            large = large.wrapping_add(1);
            if spec.drop_every.is_some_and(|every| every > 0 && large.is_multiple_of(every)) {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        if tx.send((Instant::now() + spec.one_way, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

fn write_frames(to: &OwnedFd, rx: &mpsc::Receiver<(Instant, Vec<u8>)>, stop: &AtomicBool, counters: &DelayCounters) {
    while !stop.load(Ordering::Relaxed) {
        let Ok((due, frame)) = rx.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        let wait = due.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        // SAFETY: `frame` is readable for its length; `to` is a live bound
        // socket (the frame starts with its vnet header, as PACKET_VNET_HDR
        // requires).
        let sent = unsafe { libc::send(to.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if sent >= 0 {
            counters.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }
}
