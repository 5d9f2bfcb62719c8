//! Per-source-IP connection slots of the CA server: at most `max` connections
//! from one IP at once, so one pod cannot hold every global slot. A slot is a
//! [`PeerSlot`] guard held by the connection's task; dropping it frees the
//! slot, and an IP with no connection left has no entry (the map holds only
//! IPs with open connections, at most the global cap of them).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

/// Connections open per source IP.
pub(super) struct PeerSlots {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection's slot; frees it when dropped.
pub(super) struct PeerSlot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PeerSlots {
    /// At most `max` connections per source IP.
    pub(super) fn new(max: usize) -> Self {
        Self { max, open: Arc::default() }
    }

    /// A slot for a connection from `ip`, or `None` when `ip` already holds
    /// `max`. An IPv4-mapped IPv6 source counts as its IPv4 address.
    pub(super) fn try_acquire(&self, ip: IpAddr) -> Option<PeerSlot> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.get(&ip).copied().unwrap_or(0) >= self.max {
            return None;
        }
        *open.entry(ip).or_default() += 1;
        Some(PeerSlot { ip, open: self.open.clone() })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ip_at_its_cap_is_refused_until_one_of_its_slots_is_dropped() {
        let slots = PeerSlots::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = slots.try_acquire(a).unwrap();
        let _second = slots.try_acquire(a).unwrap();
        assert!(slots.try_acquire(a).is_none());
        assert!(slots.try_acquire(b).is_some(), "another IP is not limited");
        // The same IP, IPv4-mapped, shares the cap.
        assert!(slots.try_acquire("::ffff:10.0.0.1".parse().unwrap()).is_none());
        drop(first);
        assert!(slots.try_acquire(a).is_some());
    }

    #[test]
    fn an_ip_without_connections_leaves_the_map() {
        let slots = PeerSlots::new(1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        drop(slots.try_acquire(a).unwrap());
        // A refused attempt must not leave an entry behind either.
        let held = slots.try_acquire(a).unwrap();
        assert!(slots.try_acquire(a).is_none());
        drop(held);
        assert!(slots.open.lock().unwrap().is_empty());
    }
}
