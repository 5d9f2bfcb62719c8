//! Removing a test bed, and leftovers of test processes that died.
//!
//! Order matters: agents and the mesh CA first (SIGTERM so the agents
//! detach and unpin; SIGKILL after the grace period), then every other process (`cgroup.kill` on the
//! test bed's subtree), then the network namespaces (which takes every veth
//! and bridge with them), the pins, the cgroups bottom-up and the temp dir.
//! Each step is best-effort: a failure is printed and the next step still
//! runs, because this runs from `Drop`, possibly while a test panics.
//!
//! [`reap_stale_once`] cleans up after test processes that were killed with SIGKILL
//! (no `Drop` ran): any `heddle-test-<pid>-<n>` cgroup or pin dir and any
//! `ht-<pid>-<n>-*` netns whose `<pid>` no longer exists.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::agent::STOP_GRACE;
use crate::cgroup::{self, CGROUP_ROOT};
use crate::env::BPFFS;
use crate::network::delete_netns;
use crate::testbed::Shared;

/// Environment variable: keep the temp dir (config, logs) after teardown.
pub const KEEP_TMP_ENV: &str = "HEDDLE_KEEP_TMP";

/// Tears the test bed down; idempotent.
pub(crate) fn teardown(shared: &Shared) {
    let (agents, ca, netns) = {
        let mut state = shared.lock();
        if state.torn_down {
            return;
        }
        state.torn_down = true;
        (std::mem::take(&mut state.agents), state.ca.take(), std::mem::take(&mut state.netns))
    };
    for agent in &agents {
        agent.terminate();
    }
    if let Some(ca) = &ca {
        ca.terminate();
    }
    let deadline = Instant::now() + STOP_GRACE;
    for agent in &agents {
        agent.reap_by(deadline);
    }
    if let Some(ca) = &ca {
        ca.reap_by(deadline);
    }
    let failed = shared.failed.load(Ordering::Relaxed) || std::thread::panicking();
    if failed {
        for agent in &agents {
            eprintln!(
                "----- testbed {} ({}): last 50 lines of {} -----\n{}\n-----",
                shared.name,
                shared.id,
                agent.log_path().display(),
                agent.log_tail(50)
            );
        }
        if let Some(ca) = &ca {
            eprintln!(
                "----- testbed {} ({}): last 30 lines of {} -----\n{}\n-----",
                shared.name,
                shared.id,
                ca.log_path().display(),
                ca.log_tail(30)
            );
        }
    }
    remove_resources(&shared.id, &netns);
    let keep = std::env::var_os(KEEP_TMP_ENV).is_some();
    if keep {
        eprintln!("testbed {}: kept {}", shared.name, shared.tmp.display());
    } else if let Err(e) = std::fs::remove_dir_all(&shared.tmp) {
        eprintln!("testbed teardown: remove {}: {e}", shared.tmp.display());
    }
}

/// Kills the processes of test bed `id`, deletes `netns`, its pins and its
/// cgroups, printing (not failing on) errors.
fn remove_resources(id: &str, netns: &[String]) {
    let cgroup_root = Path::new(CGROUP_ROOT).join(format!("heddle-test-{id}"));
    if cgroup_root.exists() {
        warn(cgroup::kill_all(&cgroup_root, Duration::from_secs(5)));
    }
    for ns in netns.iter().rev() {
        if Path::new("/run/netns").join(ns).exists() {
            warn(delete_netns(ns));
        }
    }
    let pins = Path::new(BPFFS).join(format!("heddle-test-{id}"));
    if pins.exists() {
        if let Err(e) = std::fs::remove_dir_all(&pins) {
            eprintln!("testbed teardown: remove {}: {e}", pins.display());
        }
    }
    warn(cgroup::remove_tree(&cgroup_root));
}

fn warn<E: std::fmt::Display>(r: Result<(), E>) {
    if let Err(e) = r {
        eprintln!("testbed teardown: {e}");
    }
}

/// Runs [`reap_stale`] once per process.
pub(crate) fn reap_stale_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(reap_stale);
}

/// Removes what dead test processes left behind.
pub fn reap_stale() {
    let mut ids = BTreeSet::new();
    let mut netns_by_id: Vec<(String, String)> = Vec::new();
    for (dir, prefix) in [(CGROUP_ROOT, "heddle-test-"), (BPFFS, "heddle-test-")] {
        for name in dir_names(dir) {
            if let Some(id) = name.strip_prefix(prefix).and_then(parse_id) {
                ids.insert(id);
            }
        }
    }
    for name in dir_names("/run/netns") {
        if let Some(id) = name.strip_prefix("ht-").and_then(parse_id) {
            ids.insert(id.clone());
            netns_by_id.push((id, name));
        }
    }
    for id in ids {
        let pid = id.split('-').next().unwrap_or_default();
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        eprintln!("testbed: removing leftovers of dead test bed {id}");
        let netns: Vec<String> = netns_by_id.iter().filter(|(i, _)| *i == id).map(|(_, n)| n.clone()).collect();
        remove_resources(&id, &netns);
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("heddle-test-{id}")));
    }
}

/// Names in `dir` (empty if unreadable).
fn dir_names(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

/// `<pid>-<n>` at the start of `rest` (followed by the end or a dash).
fn parse_id(rest: &str) -> Option<String> {
    let mut parts = rest.splitn(3, '-');
    let pid: u32 = parts.next()?.parse().ok()?;
    let n: u32 = parts.next()?.parse().ok()?;
    Some(format!("{pid}-{n}"))
}

/// Where a binary keeps the handle [`on_interrupt`] tears down.
pub type InterruptSlot = std::sync::Mutex<Option<crate::testbed::TeardownHandle>>;

/// Blocks SIGINT and SIGTERM in every thread and waits for them on a
/// thread of its own, which tears down the test bed in `slot` (if any),
/// prints `who: interrupted` and exits 130: a demo interrupted with Ctrl-C
/// leaves nothing behind. Call before starting other threads.
pub fn on_interrupt(slot: &'static InterruptSlot, who: &'static str) -> std::io::Result<()> {
    // SAFETY: plain libc signal-set calls on a zeroed, then initialised set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised; sigwait writes the signal number.
        unsafe { libc::sigwait(&raw const set, &raw mut sig) };
        eprintln!("\n{who}: interrupted, cleaning up…");
        if let Some(handle) = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            handle.teardown();
        }
        std::process::exit(130);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_id;

    #[test]
    fn parses_ids_from_cgroup_and_netns_names() {
        assert_eq!(parse_id("123-4").as_deref(), Some("123-4"));
        assert_eq!(parse_id("123-4-client").as_deref(), Some("123-4"));
        assert_eq!(parse_id("123-4--sw").as_deref(), Some("123-4"));
        assert_eq!(parse_id("foo-4"), None);
        assert_eq!(parse_id("123"), None);
    }
}
