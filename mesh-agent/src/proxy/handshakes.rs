//! A node-wide bound on tunnel connections still in their handshake, per
//! source address.
//!
//! Until its TLS and HTTP/2 handshakes are done, a connection on the tunnel
//! port is unauthenticated: anyone who can reach a pod's IP can open one
//! and hold it for the handshake timeout, and each holds a file descriptor
//! and a task. Without a bound, one hostile pod could spend the agent's
//! descriptors (shared by every pod on the node) on idle connections.
//! Each source IP may hold [`PER_SOURCE`] connections in their handshake at
//! once, over all the node's pods; one more is closed at once (and counted,
//! `heddle_tunnel_refusals_total{reason="handshake_limit"}`). A source
//! agent's tunnels are pooled per destination pod, so a well-behaved source
//! needs about one handshake per destination pod, and a cold start that
//! reaches every pod of a full node (110 by default in Kubernetes) fits.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

/// Connections one source IP may hold in their handshake at once.
pub const PER_SOURCE: usize = 256;

/// Handshakes in progress, per source IP.
#[derive(Debug)]
pub struct HandshakeSlots {
    per_source: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One handshake's place; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<HandshakeSlots>,
    ip: IpAddr,
}

impl HandshakeSlots {
    /// Room for `per_source` handshakes per source IP.
    #[must_use]
    pub fn new(per_source: usize) -> Arc<Self> {
        Arc::new(Self { per_source, held: Mutex::new(HashMap::new()) })
    }

    /// A place for one more handshake from `ip`, unless it already holds
    /// its share.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let n = held.entry(ip).or_insert(0);
        if *n >= self.per_source {
            return None;
        }
        *n += 1;
        Some(Slot { slots: self.clone(), ip })
    }

    /// The limit per source IP.
    #[must_use]
    pub fn per_source(&self) -> usize {
        self.per_source
    }

    /// Handshakes in progress, over all sources.
    #[must_use]
    pub fn in_progress(&self) -> usize {
        self.held.lock().unwrap_or_else(PoisonError::into_inner).values().sum()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_share_and_no_more() {
        let slots = HandshakeSlots::new(2);
        let a = slots.try_acquire(ip("10.0.0.1"));
        let b = slots.try_acquire(ip("10.0.0.1"));
        assert!(a.is_some() && b.is_some());
        assert!(slots.try_acquire(ip("10.0.0.1")).is_none());
        assert_eq!(slots.in_progress(), 2);
    }

    #[test]
    fn one_source_at_its_limit_does_not_hold_back_another() {
        let slots = HandshakeSlots::new(1);
        let _a = slots.try_acquire(ip("10.0.0.1")).unwrap();
        assert!(slots.try_acquire(ip("10.0.0.1")).is_none());
        assert!(slots.try_acquire(ip("10.0.0.2")).is_some());
    }

    #[test]
    fn a_finished_handshake_gives_its_place_back() {
        let slots = HandshakeSlots::new(1);
        let a = slots.try_acquire(ip("10.0.0.1")).unwrap();
        drop(a);
        assert_eq!(slots.in_progress(), 0);
        assert!(slots.held.lock().unwrap().is_empty(), "no entry is kept for a source with none in progress");
        assert!(slots.try_acquire(ip("10.0.0.1")).is_some());
    }
}
