//! Polling with a deadline.
//!
//! Everything the tests observe through the agent (readiness, flow records,
//! counters) settles asynchronously, so assertions poll: a probe reports
//! [`Check::Ready`] with a value or [`Check::Pending`] with what it saw, and
//! the timeout error quotes the last observation.

use std::time::{Duration, Instant};

use crate::error::{Result, TestbedError};

/// One observation of a probe.
#[derive(Debug)]
pub enum Check<T> {
    /// The condition holds; stop polling with this value.
    Ready(T),
    /// Not yet; the text describes what was observed (for the timeout error).
    Pending(String),
}

/// Calls `probe` every `interval` until it reports [`Check::Ready`] or
/// `timeout` passes. A probe error ends the wait immediately.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Result<Check<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        let last = match probe()? {
            Check::Ready(value) => return Ok(value),
            Check::Pending(last) => last,
        };
        if start.elapsed() >= timeout {
            return Err(TestbedError::Timeout { what: what.to_owned(), waited_ms: start.elapsed().as_millis(), last });
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_the_probe_is_ready() {
        let mut n = 0;
        let v = poll_until("n to reach 3", Duration::from_secs(5), Duration::ZERO, || {
            n += 1;
            Ok(if n == 3 { Check::Ready(n) } else { Check::Pending(format!("n={n}")) })
        })
        .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn times_out_quoting_the_last_observation() {
        let err = poll_until::<()>("never", Duration::from_millis(30), Duration::from_millis(5), || {
            Ok(Check::Pending("still no".into()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("still no"), "{err}");
    }
}
