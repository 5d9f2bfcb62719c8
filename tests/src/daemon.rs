//! A long-running test bed process that is started, signalled and restarted
//! by its owner: the node agent ([`crate::Agent`]) and the mesh CA
//! ([`crate::Ca`]).
//!
//! The process runs in a given netns and cgroup; stdout and stderr are
//! appended to one log file (a header line marks every start, so a restart's
//! output follows the previous run's). Stopping is SIGTERM, then SIGKILL at
//! a deadline. Teardown calls [`Daemon::terminate`] on every daemon first and
//! [`Daemon::reap_by`] with one shared deadline, so stopping N daemons takes
//! one grace period, not N.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::error::{Result, TestbedError};
use crate::exec::{command_line, signal, spawn_in, wait_timeout};

/// One restartable background process.
#[derive(Debug)]
pub(crate) struct Daemon {
    /// For messages, e.g. "agent on node-a".
    label: String,
    netns: PathBuf,
    cgroup: PathBuf,
    log: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Daemon {
    pub(crate) fn new(label: String, netns: PathBuf, cgroup: PathBuf, log: PathBuf) -> Self {
        Self { label, netns, cgroup, log, child: Mutex::new(None) }
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What this daemon is, for messages.
    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    /// Its log file.
    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// Starts `cmd` (not waiting for readiness); fails if it already runs.
    pub(crate) fn start(&self, cmd: Command) -> Result<()> {
        let mut child = self.child();
        if let Some(c) = child.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                return Err(TestbedError::Environment(format!("{} is already running", self.label)));
            }
        }
        *child = Some(self.spawn(cmd)?);
        Ok(())
    }

    /// Starts `cmd` while the running process goes on (an upgrade): the new
    /// process becomes this daemon's, the previous one is returned for its
    /// owner to reap.
    pub(crate) fn start_successor(&self, cmd: Command) -> Result<Option<Child>> {
        let mut child = self.child();
        let new = self.spawn(cmd)?;
        Ok(child.replace(new))
    }

    fn spawn(&self, mut cmd: Command) -> Result<Child> {
        let log_err = |e| TestbedError::io(format!("open {}", self.log.display()), e);
        let mut log = OpenOptions::new().create(true).append(true).open(&self.log).map_err(log_err)?;
        let _ = writeln!(log, "===== heddle-tests: starting `{}` =====", command_line(&cmd));
        let log2: File = log.try_clone().map_err(log_err)?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2).env("RUST_BACKTRACE", "1");
        spawn_in(cmd, &self.netns, &self.cgroup)
    }

    /// The process id while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        let mut child = self.child();
        let c = child.as_mut()?;
        matches!(c.try_wait(), Ok(None)).then(|| c.id())
    }

    /// `Ok` while it runs, else its exit status (or "never started").
    pub(crate) fn running(&self) -> std::result::Result<(), String> {
        let mut child = self.child();
        match child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(status))) => Err(status.to_string()),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("never started".to_owned()),
        }
    }

    /// Sends `sig` to the running process; `None` if it does not run.
    pub(crate) fn send(&self, sig: libc::c_int, name: &str) -> Option<Result<()>> {
        let pid = self.pid()?;
        Some(signal(pid, sig).map_err(|e| TestbedError::io(format!("{name} {} ({pid})", self.label), e)))
    }

    /// SIGKILLs and reaps the process (a crash, as far as it can tell).
    pub(crate) fn kill(&self) -> Result<()> {
        let mut child = self.child();
        if let Some(c) = child.as_mut() {
            let ctx = |e| TestbedError::io(format!("kill {}", self.label), e);
            c.kill().map_err(ctx)?;
            c.wait().map_err(ctx)?;
        }
        Ok(())
    }

    /// Sends SIGTERM if it runs (stop, step one).
    pub(crate) fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = signal(pid, libc::SIGTERM);
        }
    }

    /// Waits for the process until `deadline`, then SIGKILLs and reaps it.
    pub(crate) fn reap_by(&self, deadline: Instant) {
        let mut child = self.child();
        if let Some(c) = child.as_mut() {
            let left = deadline.saturating_duration_since(Instant::now());
            if !matches!(wait_timeout(c, left), Ok(Some(_))) {
                eprintln!("{} did not exit within {left:?} of SIGTERM; sending SIGKILL", self.label);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// The last `lines` lines of the log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}
