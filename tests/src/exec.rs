//! Running processes inside the test bed's network namespaces and cgroups.
//!
//! [`spawn_in`] is the only place that moves a child into a netns and a
//! cgroup. Both files are opened in the parent before `fork`, and the
//! `pre_exec` closure only calls `write(2)`, `setns(2)` and `sigprocmask(2)`
//! (the child gets an empty signal mask), all async-signal-safe: the test
//! process is multi-threaded (tests run in parallel) and anything else
//! (allocation, locks) may deadlock in the child. Every child gets its own
//! process group so a terminal's Ctrl-C reaches only the test bed's owner,
//! which then tears everything down.
//!
//! [`Process`] owns a background child and kills it when dropped; the test
//! bed additionally kills its whole cgroup subtree on teardown.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Result, TestbedError};

/// Runs a helper command to completion (stdout/stderr captured) and fails
/// with its stderr if it exits unsuccessfully.
pub(crate) fn run_checked<I, S>(program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let line = command_line(&cmd);
    let out = cmd.output().map_err(|e| TestbedError::io(format!("run `{line}`"), e))?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            command: line,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// Runs `ip` with the given arguments; see [`run_checked`].
pub(crate) fn ip<I, S>(args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_checked("ip", args).map(|_| ())
}

/// Renders a command line for error messages.
pub(crate) fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Spawns `cmd` with its network namespace set to the netns file `netns`
/// (e.g. `/run/netns/ht-1-2-client`) and its cgroup set to `cgroup` (a
/// cgroup v2 directory).
pub(crate) fn spawn_in(mut cmd: Command, netns: &Path, cgroup: &Path) -> Result<Child> {
    let ns = File::open(netns).map_err(|e| TestbedError::io(format!("open netns {}", netns.display()), e))?;
    let procs_path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .map_err(|e| TestbedError::io(format!("open {}", procs_path.display()), e))?;
    let ns_fd = ns.as_raw_fd();
    let procs_fd = procs.as_raw_fd();
    let line = command_line(&cmd);
    cmd.process_group(0);
    // std leaves the signal mask as the parent's; the demo blocks SIGINT and
    // SIGTERM in all its threads, and agents must still receive SIGTERM.
    // SAFETY: sigemptyset initialises the zeroed set.
    let empty_mask = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        set
    };
    // SAFETY: the closure runs in the forked child before exec. It only uses
    // two raw fds that stay open in the parent until `spawn` returns (the
    // `File`s are dropped after it) and a signal set built before the fork,
    // and calls `write(2)`, `setns(2)` and `sigprocmask(2)`, all
    // async-signal-safe. `last_os_error` only reads errno.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sigprocmask(libc::SIG_SETMASK, &raw const empty_mask, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            // "0" means "the writing process" (cgroup v2, cgroup.procs).
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| TestbedError::io(format!("spawn `{line}` in {} / {}", netns.display(), cgroup.display()), e));
    drop(ns);
    drop(procs);
    child
}

/// Sends `signal` to `pid`; an already-gone process is not an error.
pub(crate) fn signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err)
    }
}

/// Waits for `child` up to `timeout`; `None` if it is still running.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on a fresh thread whose network namespace is `netns`, and returns
/// its result. Only that thread changes namespace; it exits afterwards.
pub(crate) fn in_netns<T, F>(netns: &Path, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = File::open(netns).map_err(|e| TestbedError::io(format!("open netns {}", netns.display()), e))?;
    let handle = std::thread::spawn(move || {
        // SAFETY: setns(2) on a valid fd; it affects only the calling thread,
        // which is this short-lived one.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| TestbedError::io("netns helper thread", io::Error::other("panicked")))?
        .map_err(|e| TestbedError::io(format!("setns into {}", netns.display()), e))
}

/// A background process inside the test bed. Killed (SIGKILL) and reaped when
/// dropped; use [`Process::stop`] for a graceful SIGTERM first.
#[must_use = "the process is killed when this handle is dropped"]
#[derive(Debug)]
pub struct Process {
    child: Child,
    what: String,
    log: Option<PathBuf>,
}

impl Process {
    pub(crate) fn new(child: Child, what: String) -> Self {
        Self { child, what, log: None }
    }

    /// Records the file its stdout and stderr go to.
    pub(crate) fn with_log(mut self, log: PathBuf) -> Self {
        self.log = Some(log);
        self
    }

    /// The file its stdout and stderr go to, if they are logged.
    #[must_use]
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Everything it has logged so far (empty if it logs nowhere).
    #[must_use]
    pub fn log_text(&self) -> String {
        self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What this process is, e.g. "pod-app echo in demo/server".
    #[must_use]
    pub fn description(&self) -> &str {
        &self.what
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child.try_wait().map_err(|e| TestbedError::io(format!("wait for {}", self.what), e))
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILLs; returns the status.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        let ctx = |e| TestbedError::io(format!("stop {}", self.what), e);
        signal(self.child.id(), libc::SIGTERM).map_err(ctx)?;
        if let Some(status) = wait_timeout(&mut self.child, grace).map_err(ctx)? {
            return Ok(status);
        }
        self.child.kill().map_err(ctx)?;
        self.child.wait().map_err(ctx)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
