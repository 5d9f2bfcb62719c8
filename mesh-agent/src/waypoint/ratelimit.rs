//! Local rate limits (Heddle's `HTTPLocalRateLimitPolicy`, in Linkerd's
//! shape): a total requests-per-second limit and a per-client-identity one,
//! with overrides for named service accounts. Token buckets with a burst of
//! one second's worth; a request over a limit is answered `429` with
//! `Retry-After` (gRPC `RESOURCE_EXHAUSTED`) and the flag `RL`.
//!
//! Limits are per waypoint replica: two replicas let twice the rate
//! through (documented; a global limit needs a shared counter service).
//! The decision is pure over (buckets, identity, now), so it is tested
//! without a network.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::identity::SpiffeId;

/// Per-identity buckets kept per limiter, at most; beyond, full (idle)
/// buckets are forgotten, and if none is idle the new identity shares one
/// overflow bucket, so a flood of identities cannot take memory.
pub const MAX_IDENTITIES: usize = 10_000;

/// A token bucket: `rate` tokens per second, holding at most `rate`.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// A full bucket of `rps` requests per second.
    #[must_use]
    pub fn new(rps: u32, now: Instant) -> Self {
        let rate = f64::from(rps.max(1));
        Self { rate, tokens: rate, updated: now }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        self.updated = now;
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    fn is_full(&self, now: Instant) -> bool {
        let mut b = *self;
        b.refill(now);
        b.tokens >= b.rate
    }
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `total`.
    Total,
    /// `identity` (or an override) for the client's identity.
    Identity,
}

/// A refusal: which limit, and when to come back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The policy, `ns/name`.
    pub policy: Arc<str>,
    /// Which of its limits.
    pub limit: Limit,
    /// Time until a request would be let through.
    pub retry_after: Duration,
}

/// One compiled policy, with its buckets.
#[derive(Debug)]
pub struct Limiter {
    /// `ns/name`.
    pub name: Arc<str>,
    total: Option<Mutex<Bucket>>,
    /// Requests per second per identity (`identity`), if set.
    per_identity: Option<u32>,
    /// Per service account (`namespace`, `name`): its own rate (a short
    /// list, scanned without allocating).
    overrides: Vec<((String, String), u32)>,
    identities: Mutex<HashMap<Arc<str>, Bucket>>,
}

impl Limiter {
    /// A limiter for `name` with the given rates.
    #[must_use]
    pub fn new(
        name: Arc<str>,
        total: Option<u32>,
        per_identity: Option<u32>,
        overrides: HashMap<(String, String), u32>,
    ) -> Self {
        let now = Instant::now();
        Self {
            name,
            total: total.map(|r| Mutex::new(Bucket::new(r, now))),
            per_identity,
            overrides: overrides.into_iter().collect(),
            identities: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a request from `client` at `now`, or says which limit refused.
    /// The identity limit is checked first, so one noisy client spends its
    /// own tokens, not the shared total.
    pub fn check(&self, client: &SpiffeId, now: Instant) -> Result<(), Refused> {
        let refused = |limit, retry_after| Refused { policy: self.name.clone(), limit, retry_after };
        let (ns, sa) = (client.namespace(), client.service_account());
        let own = self.overrides.iter().find(|((n, s), _)| n == ns && s == sa).map(|(_, r)| *r);
        if let Some(rate) = own.or(self.per_identity) {
            let mut ids = self.identities.lock().expect("rate limit lock");
            if ids.len() >= MAX_IDENTITIES && !ids.contains_key(&*client.name()) {
                ids.retain(|_, b| !b.is_full(now));
            }
            let name = if ids.len() >= MAX_IDENTITIES && !ids.contains_key(&*client.name()) {
                Arc::from("*overflow*")
            } else {
                client.name()
            };
            let bucket = ids.entry(name).or_insert_with(|| Bucket::new(rate, now));
            bucket.take(now).map_err(|wait| refused(Limit::Identity, wait))?;
        }
        if let Some(total) = &self.total {
            total.lock().expect("rate limit lock").take(now).map_err(|wait| refused(Limit::Total, wait))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("heddle.test", ns, sa)
    }

    fn admitted(l: &Limiter, who: &SpiffeId, n: usize, now: Instant) -> usize {
        (0..n).filter(|_| l.check(who, now).is_ok()).count()
    }

    #[test]
    fn a_bucket_lets_a_second_of_burst_through_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, t0);
        assert_eq!((0..20).filter(|_| b.take(t0).is_ok()).count(), 10);
        let wait = b.take(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..20).filter(|_| b.take(t1).is_ok()).count(), 5);
    }

    #[test]
    fn identities_have_their_own_buckets_overrides_theirs_and_the_total_caps_all() {
        let t0 = Instant::now();
        let overrides = [(("demo".to_owned(), "batch".to_owned()), 50)].into_iter().collect();
        let l = Limiter::new("demo/limit".into(), Some(60), Some(10), overrides);
        let (web, api, batch) = (id("demo", "web"), id("demo", "api"), id("demo", "batch"));
        assert_eq!(admitted(&l, &web, 30, t0), 10, "identity limit");
        assert_eq!(admitted(&l, &api, 30, t0), 10, "another identity has its own bucket");
        assert_eq!(admitted(&l, &batch, 45, t0), 40, "its override is 50/s, the total's 40 left cap it");
        let refused = l.check(&web, t0).unwrap_err();
        assert_eq!((refused.limit, &*refused.policy), (Limit::Identity, "demo/limit"));
        let refused = l.check(&batch, t0).unwrap_err();
        assert_eq!(refused.limit, Limit::Total, "batch has tokens of its own, the total has not");
    }

    #[test]
    fn a_flood_of_identities_is_bounded() {
        let t0 = Instant::now();
        let l = Limiter::new("demo/limit".into(), None, Some(1), HashMap::new());
        for i in 0..(MAX_IDENTITIES + 500) {
            let _ = l.check(&id("demo", &format!("sa-{i}")), t0);
        }
        assert!(l.identities.lock().unwrap().len() <= MAX_IDENTITIES + 1);
    }
}
