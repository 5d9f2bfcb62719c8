//! Source ports for the agent's connections to a pod's own addresses.
//!
//! Delivering a connection to the application, the destination agent
//! connects from inside the pod, from the pod's IP to the pod's IP. It
//! relays the client's FIN, so it closes first and the `TIME_WAIT` lands on
//! its socket, and every client of the pod shares that one source address.
//! With kernel-chosen ports that caps delivery at the ephemeral range over
//! the `TIME_WAIT` period (28,232 ports / 60 s ≈ 470 connections/s per pod
//! port), where the direct path has that budget per *client*: the soak hit
//! it. `tcp_tw_reuse` defaults to loopback traffic only, and changing a
//! pod's sysctls is not the agent's business.
//!
//! A socket that binds its port explicitly (with `SO_REUSEADDR`) before
//! connecting may take over a `TIME_WAIT` 4-tuple whenever TCP timestamps
//! protect the old segments (PAWS; the kernel's `tcp_twsk_unique`), so the
//! agent cycles through a fixed pool of ports and never runs out. The pool
//! is the top quarter of the namespace's ephemeral range (at most
//! [`MAX_POOL`] ports), minus `ip_local_reserved_ports`: the kernel's
//! autobind skips explicitly bound ports, so the application's own
//! connections keep the other three quarters.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use tokio::net::TcpStream;

use super::sockets::{self, SocketError};
use crate::netns::Netns;

/// The most ports the agent takes from a pod's ephemeral range.
pub const MAX_POOL: usize = 8192;
/// Ports tried per connection before falling back to a kernel-chosen one.
const PORT_TRIES: usize = 16;
/// Linux's default `ip_local_port_range`.
const DEFAULT_RANGE: (u16, u16) = (32768, 60999);

/// A pod's pool of source ports for deliveries to its own addresses.
#[derive(Debug)]
pub struct LocalPorts {
    ports: Box<[u16]>,
    next: AtomicUsize,
}

impl LocalPorts {
    /// Reads the pool from the namespace's `ip_local_port_range` and
    /// `ip_local_reserved_ports` (sysctl files resolve to the reading
    /// thread's namespace); Linux's defaults when they cannot be read.
    #[must_use]
    pub fn read_in(netns: &Netns) -> Self {
        let read = |name: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).unwrap_or_default();
        let (range, reserved) =
            netns.run(|| (read("ip_local_port_range"), read("ip_local_reserved_ports"))).unwrap_or_default();
        Self::from_sysctls(&range, &reserved)
    }

    /// The pool for a range (`"32768\t60999"`) and a reserved list
    /// (`"8080,9000-9010"`); the default range when `range` does not parse.
    #[must_use]
    pub fn from_sysctls(range: &str, reserved: &str) -> Self {
        let mut bounds = range.split_whitespace().map(str::parse::<u16>);
        let (low, high) = match (bounds.next(), bounds.next()) {
            (Some(Ok(low)), Some(Ok(high))) if low <= high && low > 0 => (low, high),
            _ => DEFAULT_RANGE,
        };
        let reserved = parse_port_list(reserved);
        let span = usize::from(high - low) + 1;
        let want = (span / 4).clamp(1, MAX_POOL);
        let ports: Box<[u16]> =
            (low..=high).rev().filter(|p| !reserved.iter().any(|r| r.contains(p))).take(want).collect();
        // Start somewhere new each time, so a restarted agent does not walk
        // the previous one's ports in step.
        let start = usize::try_from(std::process::id()).unwrap_or(0).wrapping_mul(7919);
        Self { ports, next: AtomicUsize::new(start) }
    }

    /// How many ports the pool holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    /// Whether the pool is empty (a range wholly reserved).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// The next port, round robin; `None` for an empty pool.
    pub fn next(&self) -> Option<u16> {
        let n = self.ports.len();
        (n > 0).then(|| self.ports[self.next.fetch_add(1, Ordering::Relaxed) % n])
    }

    /// Connects to `addr`, an address of the pod itself, from `addr`'s IP
    /// and a port of the pool: a port that is taken (bound, or the same
    /// 4-tuple still live) moves on to the next; after [`PORT_TRIES`] the
    /// kernel chooses.
    ///
    /// # Errors
    /// As [`sockets::connect_in`].
    pub async fn connect(&self, netns: &Netns, addr: SocketAddr) -> Result<TcpStream, SocketError> {
        for _ in 0..PORT_TRIES {
            let Some(port) = self.next() else { break };
            match sockets::connect_from(netns, SocketAddr::new(addr.ip(), port), addr).await {
                Err(SocketError::Io { source, .. })
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                    ) => {}
                r => return r,
            }
        }
        sockets::connect_in(netns, addr).await
    }
}

/// Parses `ip_local_reserved_ports`: comma-separated ports and ranges.
fn parse_port_list(text: &str) -> Vec<std::ops::RangeInclusive<u16>> {
    text.trim()
        .split(',')
        .filter_map(|item| {
            let item = item.trim();
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            Some(a.trim().parse().ok()?..=b.trim().parse().ok()?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_the_top_quarter_of_the_range() {
        let p = LocalPorts::from_sysctls("32768\t60999\n", "\n");
        assert_eq!(p.len(), 7058);
        let all: Vec<u16> = (0..p.len()).filter_map(|_| p.next()).collect();
        assert_eq!(all.iter().max(), Some(&60999));
        assert_eq!(all.iter().min(), Some(&(60999 - 7057)));
    }

    #[test]
    fn pool_is_capped_and_skips_reserved_ports() {
        let p = LocalPorts::from_sysctls("1024 65535", "65000-65100,64000");
        assert_eq!(p.len(), MAX_POOL);
        for _ in 0..p.len() {
            let port = p.next().unwrap();
            assert!(!(65000..=65100).contains(&port) && port != 64000, "{port} is reserved");
        }
    }

    #[test]
    fn bad_range_falls_back_to_the_default() {
        assert_eq!(LocalPorts::from_sysctls("garbage", "").len(), 7058);
        assert_eq!(LocalPorts::from_sysctls("60000 50000", "").len(), 7058);
    }

    #[test]
    fn wholly_reserved_range_gives_no_port() {
        let p = LocalPorts::from_sysctls("40000 40003", "40000-40003");
        assert!(p.is_empty());
        assert_eq!(p.next(), None);
    }
}
