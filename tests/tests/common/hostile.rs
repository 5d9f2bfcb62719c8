//! Running `tests/assets/hostile.py` (hostile and long-lived clients of
//! the tunnel port, in Python with python-hyper's h2) in a test-bed pod.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use heddle_tests::env::asset;
use heddle_tests::{Pod, Process, TUNNEL_PORT};
use serde_json::Value;

use super::Cluster;

/// `hostile.py MODE <server ip> <tunnel port>`, then `extra`, presenting
/// the mesh certificate in `creds` if given.
pub fn tunnel_args(c: &Cluster, mode: &str, creds: Option<&Path>, extra: &[&str]) -> Vec<String> {
    let mut args = vec![mode.to_owned(), ip(&c.server), TUNNEL_PORT.to_string()];
    if let Some(dir) = creds {
        args.extend(["--cert", path(&dir.join("cert.pem")), "--key", path(&dir.join("key.pem"))].map(str::to_owned));
    }
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

/// `python3 hostile.py args`.
pub fn hostile_command<S: AsRef<str>>(args: &[S]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(asset("hostile.py")).args(args.iter().map(AsRef::as_ref));
    cmd
}

/// Runs `hostile.py args` in `pod`; its JSON line.
pub fn run_hostile<S: AsRef<str> + std::fmt::Debug>(pod: &Pod, args: &[S]) -> Result<Value> {
    let out = pod.run(hostile_command(args))?;
    ensure!(out.status.success(), "hostile.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("hostile.py {args:?}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Starts `hostile.py args` in `pod` in the background.
pub fn spawn_hostile(pod: &Pod, args: &[&str]) -> Result<Process> {
    Ok(pod.spawn(hostile_command(args))?)
}

/// Waits for a background `hostile.py`; its JSON line.
pub fn wait_hostile(mut p: Process, timeout: Duration) -> Result<Value> {
    let start = Instant::now();
    while p.try_wait()?.is_none() {
        ensure!(start.elapsed() < timeout, "{} still running after {timeout:?}", p.description());
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = p.log_text();
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .with_context(|| format!("{} printed no result: {text}", p.description()))
}

/// `pod`'s address, as an argument.
pub fn ip(pod: &Pod) -> String {
    pod.ip().to_string()
}

/// `p` as an argument.
pub fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}
