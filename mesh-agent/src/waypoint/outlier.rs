//! Circuit breaking and outlier detection for a backend, from a
//! `DestinationRule`'s `trafficPolicy` (Envoy's semantics, per waypoint
//! replica).
//!
//! * [`Breaker`] (`connectionPool`): at most `limit` requests in flight to
//!   the backend (`tcp.maxConnections`, `http.http2MaxRequests`: the
//!   smaller), at most `pending` more waiting for one to finish
//!   (`http.http1MaxPendingRequests`); beyond, the request is answered
//!   `503` with the flag `UO` at once.
//! * [`Outliers`] (`outlierDetection`): an endpoint answering
//!   `consecutive5xxErrors` 5xx in a row (connect failures and resets
//!   count), or `consecutiveGatewayErrors` 502/503/504 in a row, is ejected
//!   for `baseEjectionTime` times the number of times it was ejected, as
//!   long as at most `maxEjectionPercent` of the backend's endpoints are
//!   ejected (one always may be, as in Envoy); it is re-admitted when that
//!   time is over. Pure over (`now`, outcomes), so tested without sockets.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Envoy's and Istio's default ejection time.
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
/// Istio's default share of endpoints that may be ejected.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// Istio's default `consecutive5xxErrors`.
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
/// Longest ejection, however often an endpoint was ejected (Envoy's
/// default `max_ejection_time`).
pub const MAX_EJECTION: Duration = Duration::from_mins(5);

/// `connectionPool` limits of one backend, with their counters.
#[derive(Debug)]
pub struct Breaker {
    permits: Arc<Semaphore>,
    /// Requests waiting for a permit, at most `pending`.
    waiting: AtomicUsize,
    pending: usize,
}

impl Breaker {
    /// At most `limit` in flight and `pending` waiting.
    #[must_use]
    pub fn new(limit: usize, pending: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(limit.max(1))), waiting: AtomicUsize::new(0), pending }
    }

    /// A permit to send (held until the response ends), or `None`: over
    /// the limits, answer `503 UO`.
    pub async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return Some(p);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.pending {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let permit = self.permits.clone().acquire_owned().await.ok();
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        permit
    }
}

/// `outlierDetection` settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierConfig {
    /// 5xx (and connect failures, resets) in a row that eject (`None`: off).
    pub consecutive_5xx: Option<u32>,
    /// 502, 503, 504 (and connect failures, resets) in a row that eject.
    pub consecutive_gateway: Option<u32>,
    /// First ejection time; the n-th ejection lasts n times this.
    pub base_ejection: Duration,
    /// Share of the backend's endpoints that may be ejected at once.
    pub max_ejection_percent: u32,
}

/// One attempt's outcome, as outlier detection counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500 (or one the detector does not count).
    Success,
    /// A 5xx response other than 502, 503, 504.
    ServerError,
    /// 502, 503, 504, a connect failure or a reset before the response.
    GatewayError,
}

impl Outcome {
    /// Classifies a response status (`None`: no response, the waypoint's
    /// own `UF`/`UR`/`UT`).
    #[must_use]
    pub fn of(status: Option<u16>) -> Self {
        match status {
            None | Some(502..=504) => Outcome::GatewayError,
            Some(500..=599) => Outcome::ServerError,
            Some(_) => Outcome::Success,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// Endpoint health at this waypoint, by endpoint address.
#[derive(Debug, Default)]
pub struct Outliers {
    endpoints: Mutex<HashMap<SocketAddr, Health>>,
}

impl Outliers {
    /// The endpoints of `candidates` not ejected at `now`; all of them when
    /// every one is (sending somewhere beats sending nowhere: Envoy's panic
    /// mode).
    #[must_use]
    pub fn healthy(&self, candidates: &[SocketAddr], now: Instant) -> Vec<SocketAddr> {
        let map = self.endpoints.lock().expect("outlier lock");
        let ok: Vec<SocketAddr> = candidates
            .iter()
            .copied()
            .filter(|a| map.get(a).and_then(|h| h.ejected_until).is_none_or(|t| t <= now))
            .collect();
        if ok.is_empty() {
            candidates.to_vec()
        } else {
            ok
        }
    }

    /// Records an outcome of `addr` (one of `backend`'s endpoints) under
    /// `cfg`; returns the ejection time when this outcome ejected it.
    pub fn observe(
        &self,
        addr: SocketAddr,
        outcome: Outcome,
        cfg: &OutlierConfig,
        backend: &[SocketAddr],
        now: Instant,
    ) -> Option<Duration> {
        let mut map = self.endpoints.lock().expect("outlier lock");
        if map.len() > 4096 {
            map.retain(|_, h| {
                h.ejected_until.is_some_and(|t| t > now) || h.consecutive_5xx + h.consecutive_gateway > 0
            });
        }
        let h = map.entry(addr).or_default();
        if h.ejected_until.is_some_and(|t| t <= now) {
            h.ejected_until = None;
        }
        match outcome {
            Outcome::Success => {
                h.consecutive_5xx = 0;
                h.consecutive_gateway = 0;
                return None;
            }
            Outcome::ServerError => {
                h.consecutive_5xx += 1;
                h.consecutive_gateway = 0;
            }
            Outcome::GatewayError => {
                h.consecutive_5xx += 1;
                h.consecutive_gateway += 1;
            }
        }
        let tripped = cfg.consecutive_5xx.is_some_and(|n| h.consecutive_5xx >= n)
            || cfg.consecutive_gateway.is_some_and(|n| h.consecutive_gateway >= n);
        if !tripped || h.ejected_until.is_some() {
            return None;
        }
        let ejected =
            backend.iter().filter(|a| map.get(a).and_then(|h| h.ejected_until).is_some_and(|t| t > now)).count();
        let allowed = (backend.len() * cfg.max_ejection_percent as usize / 100).max(1);
        if ejected >= allowed {
            return None;
        }
        let h = map.get_mut(&addr).expect("entry made above");
        h.ejections += 1;
        h.consecutive_5xx = 0;
        h.consecutive_gateway = 0;
        let time = cfg.base_ejection.saturating_mul(h.ejections).min(MAX_EJECTION.max(cfg.base_ejection));
        h.ejected_until = Some(now + time);
        Some(time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n).map(|i| SocketAddr::from(([10, 0, 0, i], 80))).collect()
    }

    const CFG: OutlierConfig = OutlierConfig {
        consecutive_5xx: Some(3),
        consecutive_gateway: None,
        base_ejection: Duration::from_secs(10),
        max_ejection_percent: 50,
    };

    #[test]
    fn consecutive_errors_eject_for_a_growing_time_and_the_endpoint_comes_back() {
        let (o, eps, t0) = (Outliers::default(), addrs(2), Instant::now());
        assert_eq!(o.observe(eps[0], Outcome::ServerError, &CFG, &eps, t0), None);
        assert_eq!(o.observe(eps[0], Outcome::Success, &CFG, &eps, t0), None, "a success resets the count");
        for _ in 0..2 {
            assert_eq!(o.observe(eps[0], Outcome::GatewayError, &CFG, &eps, t0), None);
        }
        assert_eq!(o.observe(eps[0], Outcome::ServerError, &CFG, &eps, t0), Some(Duration::from_secs(10)));
        assert_eq!(o.healthy(&eps, t0), [eps[1]]);
        let back = t0 + Duration::from_secs(11);
        assert_eq!(o.healthy(&eps, back), eps, "re-admitted after the ejection time");
        for _ in 0..3 {
            o.observe(eps[0], Outcome::ServerError, &CFG, &eps, back);
        }
        assert_eq!(o.healthy(&eps, back + Duration::from_secs(15)), [eps[1]], "second ejection: 20 s");
    }

    #[test]
    fn at_most_max_ejection_percent_is_ejected_and_never_every_endpoint() {
        let (o, eps, t0) = (Outliers::default(), addrs(2), Instant::now());
        for a in &eps {
            for _ in 0..3 {
                o.observe(*a, Outcome::ServerError, &CFG, &eps, t0);
            }
        }
        assert_eq!(o.healthy(&eps, t0).len(), 1, "50% of 2: one ejected");
        let gw = OutlierConfig { consecutive_5xx: None, consecutive_gateway: Some(1), ..CFG };
        let o = Outliers::default();
        o.observe(eps[0], Outcome::ServerError, &gw, &eps, t0);
        assert_eq!(o.healthy(&eps, t0).len(), 2, "a 500 is not a gateway error");
        o.observe(eps[0], Outcome::GatewayError, &gw, &eps, t0);
        assert_eq!(o.healthy(&eps, t0), [eps[1]]);
    }

    #[tokio::test]
    async fn the_breaker_admits_the_limit_queues_the_pending_and_refuses_the_rest() {
        let b = Arc::new(Breaker::new(1, 1));
        let first = b.admit().await.expect("in flight");
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.admit().await.is_some() })
        };
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(b.admit().await.is_none(), "one in flight, one waiting: the third is refused");
        drop(first);
        assert!(waiter.await.unwrap(), "the waiting one gets the permit");
    }
}
