//! Retry decisions, kept pure so they are tested without a network: which
//! methods may be retried, how long to wait before a retry, and the retry
//! budget that keeps retries from multiplying an outage.
//!
//! The budget is Finagle's and Linkerd's: over a sliding window of ten one
//! second slots, a rule may retry 20% of its requests plus ten retries per
//! second. Under a full outage every request fails, and the budget, not
//! `attempts`, bounds the extra load on the backends: about 1.2 attempts per
//! request instead of `1 + attempts`.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use hyper::Method;

/// Retries allowed per request, in percent.
pub const BUDGET_PERCENT: u64 = 20;
/// Retries allowed per second whatever the request rate (so a quiet rule
/// still retries its rare failures).
pub const BUDGET_FLOOR_PER_SECOND: u64 = 10;
/// Seconds the budget remembers.
pub const BUDGET_WINDOW_SECONDS: usize = 10;

/// Whether `method` is idempotent (RFC 9110 §9.2.2), so a retry cannot
/// repeat an effect the first attempt may already have had.
#[must_use]
pub fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// The wait before retry number `retry` (1 for the first): `base` doubled
/// per retry up to ten times `base`, plus up to half of it again as jitter
/// (`jitter` in 0..1), so it is never shorter than `base`, as GEP-1731
/// requires.
#[must_use]
pub fn backoff(base: Duration, retry: u32, jitter: f64) -> Duration {
    let doubled = base.saturating_mul(1 << retry.saturating_sub(1).min(4));
    let capped = doubled.min(base.saturating_mul(10));
    capped + capped.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

/// A retry budget: a rule's own (the defaults), or one a
/// `RetryBudgetPolicy` gives a Service or route (shared by their requests).
#[derive(Debug)]
pub struct Budget {
    /// Retries allowed per 100 requests.
    percent: u64,
    /// Retries allowed per second whatever the rate.
    floor_per_second: u64,
    window: Mutex<Window>,
}

impl Default for Budget {
    fn default() -> Self {
        Self::new(BUDGET_PERCENT, BUDGET_FLOOR_PER_SECOND, BUDGET_WINDOW_SECONDS)
    }
}

impl Budget {
    /// `percent` retries per 100 requests plus `floor_per_second`, over
    /// `window_seconds` (1-60) one-second slots.
    #[must_use]
    pub fn new(percent: u64, floor_per_second: u64, window_seconds: usize) -> Self {
        let window = Window::new(Instant::now(), window_seconds.clamp(1, 60));
        Self { percent, floor_per_second, window: Mutex::new(window) }
    }

    /// Counts a request (its first attempt).
    pub fn request(&self, now: Instant) {
        let mut w = self.window.lock().expect("budget lock");
        w.slot(now).0 += 1;
    }

    /// Whether one more retry is within budget; if so it is counted.
    pub fn try_retry(&self, now: Instant) -> bool {
        let mut w = self.window.lock().expect("budget lock");
        w.slot(now);
        let (requests, retries) = w.totals();
        let allowed = requests * self.percent / 100 + self.floor_per_second * w.slots.len() as u64;
        if retries >= allowed {
            return false;
        }
        w.slot(now).1 += 1;
        true
    }
}

/// (requests, retries) per one-second slot, a ring over the window.
#[derive(Debug)]
struct Window {
    start: Instant,
    /// Seconds since `start` of the newest slot.
    newest: u64,
    slots: Vec<(u64, u64)>,
}

impl Window {
    fn new(start: Instant, seconds: usize) -> Self {
        Self { start, newest: 0, slots: vec![(0, 0); seconds] }
    }

    /// The slot for `now`, clearing the slots that fell out of the window.
    fn slot(&mut self, now: Instant) -> &mut (u64, u64) {
        let second = now.saturating_duration_since(self.start).as_secs();
        let len = self.slots.len() as u64;
        if second > self.newest {
            for s in (self.newest + 1)..=second.min(self.newest + len) {
                self.slots[(s % len) as usize] = (0, 0);
            }
            self.newest = second;
        }
        &mut self.slots[(self.newest % len) as usize]
    }

    fn totals(&self) -> (u64, u64) {
        self.slots.iter().fold((0, 0), |(a, b), (r, t)| (a + r, b + t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idempotent_methods_are_retried_by_default() {
        assert!(is_idempotent(&Method::GET) && is_idempotent(&Method::PUT) && is_idempotent(&Method::DELETE));
        assert!(!is_idempotent(&Method::POST) && !is_idempotent(&Method::PATCH));
    }

    #[test]
    fn backoff_doubles_is_capped_and_never_shorter_than_the_minimum() {
        let b = Duration::from_millis(25);
        assert_eq!(backoff(b, 1, 0.0), b);
        assert_eq!(backoff(b, 2, 0.0), Duration::from_millis(50));
        assert_eq!(backoff(b, 3, 0.0), Duration::from_millis(100));
        assert_eq!(backoff(b, 9, 0.0), Duration::from_millis(250));
        assert_eq!(backoff(b, 1, 1.0), Duration::from_micros(37_500));
        assert!(backoff(b, 40, 0.5) >= b);
    }

    #[test]
    fn the_budget_allows_a_floor_plus_a_share_of_requests_and_forgets_old_seconds() {
        let t0 = Instant::now();
        let budget = Budget { percent: 20, floor_per_second: 10, window: Mutex::new(Window::new(t0, 10)) };
        for _ in 0..1000 {
            budget.request(t0);
        }
        let granted = (0..1000).filter(|_| budget.try_retry(t0)).count();
        assert_eq!(granted, 200 + 100, "20% of 1000 requests plus 10/s over 10 s");
        // Eleven seconds on, the old slots are gone: only the floor is left.
        let later = t0 + Duration::from_secs(11);
        let granted = (0..1000).filter(|_| budget.try_retry(later)).count();
        assert_eq!(granted, 100);
    }

    #[test]
    fn a_configured_budget_has_its_own_share_floor_and_window() {
        let t0 = Instant::now();
        let budget = Budget { percent: 0, floor_per_second: 1, window: Mutex::new(Window::new(t0, 5)) };
        for _ in 0..1000 {
            budget.request(t0);
        }
        assert_eq!((0..100).filter(|_| budget.try_retry(t0)).count(), 5, "no share, 1/s over 5 s");
    }
}
