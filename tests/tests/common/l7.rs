//! HTTP through the waypoint, as the waypoint tests drive it: the real
//! client `httpc.py` (Python's http.client) run in a pod, and the
//! waypoint's request records.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use heddle_tests::env::asset;
use heddle_tests::waypoint::Waypoint;
use heddle_tests::{poll_until, Check, Pod};
use serde_json::Value;

/// `probe` again every 200 ms until it answers, for up to 10 s (a probe
/// that runs clients, whose errors are `anyhow`'s).
pub fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = probe()? {
            return Ok(v);
        }
        ensure!(std::time::Instant::now() < deadline, "{what}: not after 10 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs `httpc.py ARGS` in `pod` and parses its JSON output.
pub fn httpc(pod: &Pod, args: &[&str]) -> Result<Value> {
    let mut cmd = Command::new("python3");
    cmd.arg(asset("httpc.py")).args(args);
    let out = pod.run(cmd)?;
    ensure!(out.status.success(), "httpc {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("httpc output: {}", String::from_utf8_lossy(&out.stdout)))
}

/// `n` keep-alive requests from `pod` to `url`: (`served_by` counts, statuses, errors).
pub fn load(pod: &Pod, url: &str, n: usize, headers: &[&str]) -> Result<Value> {
    let n = n.to_string();
    let mut args = vec!["load", url, n.as_str()];
    for h in headers {
        args.extend(["--header", h]);
    }
    httpc(pod, &args)
}

/// [`load`] again every 200 ms until its result satisfies `done`, for up to
/// `wait` (a configuration change that takes effect at the next reload).
pub fn load_until(pod: &Pod, url: &str, n: usize, wait: Duration, done: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let r = load(pod, url, n, &[])?;
        if done(&r) {
            return Ok(r);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "{n} requests to {url} after {wait:?}: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How many of a [`load`]'s requests `pod` served.
pub fn count(v: &Value, pod: &str) -> u64 {
    v["served_by"][pod].as_u64().unwrap_or(0)
}

/// The waypoint's request records matching `pred`, waiting up to `wait`
/// until there are `n`.
pub fn requests(wp: &Waypoint, n: usize, wait: Duration, pred: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
    Ok(poll_until("waypoint request records", wait, Duration::from_millis(100), || {
        let flows = wp.flows("last=100000")?;
        let got: Vec<Value> = flows.into_iter().filter(|f| f["event"] == "request" && pred(f)).collect();
        Ok(if got.len() >= n { Check::Ready(got) } else { Check::Pending(format!("{} of {n}", got.len())) })
    })?)
}
