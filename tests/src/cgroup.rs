//! The test bed's cgroup v2 subtree.
//!
//! Layout under [`CGROUP_ROOT`]:
//! ```text
//! heddle-test-<id>/            one per test bed, created with an atomic mkdir
//!   tools/                     admin-API probes (curl): outside every node
//!   <node>/                    the agent's programs are attached here
//!     agent/                   the agent process
//!     host/                    other processes "on the node"
//!     pods/<pod>/              one per pod
//! ```
//! Teardown writes `1` to the subtree's `cgroup.kill` (kills every process
//! in it, recursively), waits until `cgroup.events` says `populated 0`, and
//! removes the directories bottom-up.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Result, TestbedError};

/// Where cgroup v2 is mounted on the test machines.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";

/// Creates `dir` (and missing parents).
pub(crate) fn create(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| TestbedError::io(format!("create cgroup {}", dir.display()), e))
}

/// Kills every process in the subtree at `dir` and waits (up to `timeout`)
/// until it is empty.
pub(crate) fn kill_all(dir: &Path, timeout: Duration) -> Result<()> {
    let kill = dir.join("cgroup.kill");
    fs::write(&kill, "1").map_err(|e| TestbedError::io(format!("write {}", kill.display()), e))?;
    let deadline = Instant::now() + timeout;
    loop {
        if !is_populated(dir)? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(TestbedError::Timeout {
                what: format!("cgroup {} to become empty", dir.display()),
                waited_ms: timeout.as_millis(),
                last: "still populated".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether any process lives in the subtree at `dir`.
fn is_populated(dir: &Path) -> Result<bool> {
    let events = dir.join("cgroup.events");
    let text = fs::read_to_string(&events).map_err(|e| TestbedError::io(format!("read {}", events.display()), e))?;
    Ok(text.lines().any(|l| l.trim() == "populated 1"))
}

/// Removes the cgroup directory tree at `dir`, children first. A missing
/// directory is not an error.
pub(crate) fn remove_tree(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TestbedError::io(format!("list {}", dir.display()), e)),
    };
    let children: Vec<PathBuf> = entries
        .filter_map(std::result::Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    for child in children {
        remove_tree(&child)?;
    }
    // A cgroup whose last process just died can be briefly busy.
    let mut attempts = 0;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(TestbedError::io(format!("remove cgroup {}", dir.display()), e)),
        }
    }
}
