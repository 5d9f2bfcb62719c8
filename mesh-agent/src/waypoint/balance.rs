//! Per-request load balancing: a weighted pick among a rule's backends,
//! then power of two choices over peak-EWMA latency among the chosen
//! backend's endpoints (Linkerd's balancer).
//!
//! Peak EWMA: each endpoint's cost is its latency estimate times (requests
//! in flight + 1). A sample above the estimate replaces it at once (peak);
//! a lower one decays into it with weight `exp(-elapsed / DECAY)`. Two
//! endpoints are drawn at random and the cheaper wins, which avoids herding
//! on one "best" endpoint while steering away from slow or busy ones. The
//! selection is pure over (candidates, stats, random draws, now), so it is
//! table-tested without sockets.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// How fast old latency samples fade (Linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// The estimate of an endpoint never measured: zero, so every new
/// endpoint is tried at once and measured, instead of waiting until the
/// measured ones look slower than a guess.
pub const DEFAULT_RTT: Duration = Duration::ZERO;
/// Endpoints not used for this long are forgotten (bounded memory).
const FORGET_AFTER: Duration = Duration::from_mins(5);

/// Picks index `i` of `weights` with probability `weights[i] / sum`, from a
/// uniform draw `r` in `0..sum`; `None` when every weight is 0.
#[must_use]
pub fn pick_weighted(weights: &[u32], r: u64) -> Option<usize> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut r = r % total;
    for (i, w) in weights.iter().enumerate() {
        let w = u64::from(*w);
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

#[derive(Clone, Copy, Debug)]
struct Stats {
    ewma_ns: f64,
    updated: Instant,
    pending: u32,
}

impl Stats {
    fn new(now: Instant) -> Self {
        Self { ewma_ns: DEFAULT_RTT.as_secs_f64() * 1e9, updated: now, pending: 0 }
    }

    /// The cost at `now`: the estimate decays while no sample comes (as in
    /// Linkerd's and tower's peak EWMA), so an endpoint avoided after one
    /// slow answer is tried again once the estimate has faded, instead of
    /// being starved for good.
    fn cost(&self, now: Instant) -> f64 {
        let idle = now.saturating_duration_since(self.updated).as_secs_f64();
        let estimate = self.ewma_ns * (-idle / DECAY.as_secs_f64()).exp();
        // One nanosecond added so that in-flight requests still order
        // endpoints not measured yet (estimate zero).
        (estimate + 1.0) * f64::from(self.pending + 1)
    }

    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_secs_f64() * 1e9;
        if rtt > self.ewma_ns {
            self.ewma_ns = rtt;
        } else {
            let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            self.ewma_ns = self.ewma_ns * w + rtt * (1.0 - w);
        }
        self.updated = now;
    }
}

/// Latency and load of every endpoint the waypoint sends to.
#[derive(Default)]
pub struct Balancer {
    stats: Mutex<HashMap<SocketAddr, Stats>>,
}

/// A request in flight to an endpoint; [`InFlight::finish`] records its
/// latency, dropping it without finishing only ends the in-flight count.
pub struct InFlight<'a> {
    balancer: &'a Balancer,
    addr: SocketAddr,
    started: Instant,
    done: bool,
}

impl Balancer {
    /// Chooses among `candidates` (non-empty) with two draws `r1`, `r2`.
    #[must_use]
    pub fn choose(&self, candidates: &[SocketAddr], r1: u64, r2: u64, now: Instant) -> SocketAddr {
        if candidates.len() == 1 {
            return candidates[0];
        }
        let n = candidates.len() as u64;
        let a = (r1 % n) as usize;
        // The second draw is over the others, so the two differ.
        let mut b = (r2 % (n - 1)) as usize;
        if b >= a {
            b += 1;
        }
        let stats = self.stats.lock().expect("balancer lock");
        let cost = |addr: &SocketAddr| stats.get(addr).map_or_else(|| Stats::new(now).cost(now), |s| s.cost(now));
        if cost(&candidates[b]) < cost(&candidates[a]) {
            candidates[b]
        } else {
            candidates[a]
        }
    }

    /// Marks a request to `addr` in flight.
    pub fn start(&self, addr: SocketAddr) -> InFlight<'_> {
        let now = Instant::now();
        let mut stats = self.stats.lock().expect("balancer lock");
        if stats.len() > 4096 {
            stats.retain(|_, s| s.pending > 0 || now.saturating_duration_since(s.updated) < FORGET_AFTER);
        }
        stats.entry(addr).or_insert_with(|| Stats::new(now)).pending += 1;
        InFlight { balancer: self, addr, started: now, done: false }
    }

    fn end(&self, addr: SocketAddr, rtt: Option<Duration>) {
        let now = Instant::now();
        let mut stats = self.stats.lock().expect("balancer lock");
        if let Some(s) = stats.get_mut(&addr) {
            s.pending = s.pending.saturating_sub(1);
            if let Some(rtt) = rtt {
                s.observe(rtt, now);
            }
        }
    }

    #[cfg(test)]
    fn observe_at(&self, addr: SocketAddr, rtt: Duration, now: Instant) {
        self.stats.lock().unwrap().entry(addr).or_insert_with(|| Stats::new(now)).observe(rtt, now);
    }
}

impl InFlight<'_> {
    /// The response head arrived `latency` after the request was sent:
    /// record it (connection set-up is not the endpoint's latency).
    pub fn finish(mut self, latency: Duration) {
        self.done = true;
        self.balancer.end(self.addr, Some(latency));
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Failed or cancelled: a failure is as slow as the timeout that
            // ended it, so count its time too.
            self.balancer.end(self.addr, Some(self.started.elapsed()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n).map(|i| SocketAddr::from(([10, 0, 0, i], 80))).collect()
    }

    #[test]
    fn weighted_pick_follows_the_weights_exactly_over_a_full_cycle() {
        let mut counts = [0; 3];
        for r in 0..100 {
            counts[pick_weighted(&[90, 10, 0], r).unwrap()] += 1;
        }
        assert_eq!(counts, [90, 10, 0]);
        assert_eq!(pick_weighted(&[0, 0], 7), None);
        assert_eq!(pick_weighted(&[], 7), None);
    }

    #[test]
    fn prefers_the_faster_of_two_endpoints() {
        let b = Balancer::default();
        let now = Instant::now();
        let eps = addrs(2);
        b.observe_at(eps[0], Duration::from_millis(50), now);
        b.observe_at(eps[1], Duration::from_millis(2), now);
        for (r1, r2) in [(0, 0), (1, 0), (5, 3)] {
            assert_eq!(b.choose(&eps, r1, r2, now), eps[1]);
        }
    }

    #[test]
    fn in_flight_requests_raise_an_endpoints_cost() {
        let b = Balancer::default();
        let now = Instant::now();
        let eps = addrs(2);
        // Never measured: the one with requests in flight is the dearer.
        let busy: Vec<_> = (0..3).map(|_| b.start(eps[0])).collect();
        assert_eq!(b.choose(&eps, 0, 0, now), eps[1]);
        assert_eq!(b.choose(&eps, 1, 0, now), eps[1]);
        drop(busy);
        // Measured alike: three in flight cost more than a 2x latency.
        b.observe_at(eps[0], Duration::from_millis(5), now);
        b.observe_at(eps[1], Duration::from_millis(10), now);
        let busy: Vec<_> = (0..3).map(|_| b.start(eps[0])).collect();
        assert_eq!(b.choose(&eps, 0, 0, now), eps[1]);
        drop(busy);
        assert_eq!(b.choose(&eps, 0, 0, now), eps[0]);
    }

    #[test]
    fn a_peak_is_taken_at_once_and_decays_slowly() {
        let now = Instant::now();
        let mut s = Stats::new(now);
        s.observe(Duration::from_millis(100), now);
        assert!((s.ewma_ns - 100e6).abs() < 1.0);
        s.observe(Duration::from_millis(1), now + Duration::from_secs(1));
        // exp(-0.1) of the peak remains after one second.
        assert!(s.ewma_ns > 85e6 && s.ewma_ns < 95e6, "{}", s.ewma_ns);
    }

    #[test]
    fn an_endpoint_avoided_after_a_slow_answer_is_tried_again_once_its_estimate_fades() {
        let b = Balancer::default();
        let now = Instant::now();
        let eps = addrs(2);
        b.observe_at(eps[0], Duration::from_millis(50), now);
        b.observe_at(eps[1], Duration::from_millis(2), now);
        assert_eq!(b.choose(&eps, 0, 0, now), eps[1]);
        // No new sample for eps[0]; eps[1] keeps answering in 2 ms.
        let later = now + Duration::from_secs(40);
        b.observe_at(eps[1], Duration::from_millis(2), later);
        assert_eq!(b.choose(&eps, 1, 0, later), eps[0], "50 ms * exp(-4) < 2 ms: eps[0] is tried again");
    }

    #[test]
    fn the_two_draws_are_distinct_endpoints() {
        let b = Balancer::default();
        let now = Instant::now();
        let eps = addrs(3);
        b.observe_at(eps[0], Duration::from_millis(1), now);
        b.observe_at(eps[1], Duration::from_millis(9), now);
        b.observe_at(eps[2], Duration::from_millis(9), now);
        // r1 = r2 = 0 would compare eps[0] with itself; it is compared with eps[1].
        assert_eq!(b.choose(&eps, 1, 0, now), eps[0]);
    }
}
