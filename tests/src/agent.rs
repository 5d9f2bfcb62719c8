//! The node agent under test: its process and its admin API.
//!
//! An [`Agent`] runs `mesh-agent run` inside its node's netns and in the
//! cgroup `<node>/agent`, so the programs it attaches at `<node>` also cover
//! its own sockets (the tests prove they are never redirected). Its stdout
//! and stderr are appended to `agent-<node>.log` in the temp dir; the tail is
//! quoted in errors and printed when a test fails. SIGHUP reloads the config,
//! SIGTERM stops it cleanly (detach, unpin); teardown sends SIGTERM and
//! SIGKILLs after five seconds.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::admin::{AdminClient, Datapath, Flow, Stats, Workload};
use crate::error::{Result, TestbedError};
use crate::exec::{command_line, signal, spawn_in, wait_timeout};
use crate::handles::Node;
use crate::wait::{poll_until, Check};

/// Where the admin API listens inside the node's netns.
pub const ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Grace period between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// A node agent; cheap to clone (all clones control the same process).
#[derive(Debug, Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: Node,
    bin: PathBuf,
    log: PathBuf,
    admin: AdminClient,
    child: Mutex<Option<Child>>,
}

impl Agent {
    pub(crate) fn new(node: Node, bin: PathBuf) -> Self {
        let log = node.shared().tmp.join(format!("agent-{}.log", node.name()));
        let admin = AdminClient {
            node: node.name().to_owned(),
            netns: node.netns_path(),
            cgroup: node.tools_cgroup(),
            addr: ADMIN_ADDR.to_owned(),
        };
        Self {
            inner: Arc::new(Inner {
                node,
                bin,
                log,
                admin,
                child: Mutex::new(None),
            }),
        }
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.inner
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The node this agent serves.
    #[must_use]
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// Its log file.
    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.inner.log
    }

    /// The command line it is started with.
    #[must_use]
    pub fn command(&self) -> Command {
        let node = &self.inner.node;
        let shared = node.shared();
        let mut cmd = Command::new(&self.inner.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&shared.config_path)
            .args(["--node", node.name()])
            .arg("--cgroup")
            .arg(node.cgroup())
            .arg("--pin-dir")
            .arg(node.pin_dir())
            .args(["--admin-addr", ADMIN_ADDR]);
        cmd
    }

    /// Starts the process (not waiting for readiness); fails if it runs.
    pub(crate) fn start(&self) -> Result<()> {
        let mut child = self.child();
        if let Some(c) = child.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                return Err(TestbedError::Environment(format!(
                    "agent on {} is already running",
                    self.inner.node.name()
                )));
            }
        }
        let log_err = |e| TestbedError::io(format!("open {}", self.inner.log.display()), e);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.inner.log)
            .map_err(log_err)?;
        let mut cmd = self.command();
        let _ = writeln!(
            log,
            "===== heddle-tests: starting `{}` =====",
            command_line(&cmd)
        );
        let log2: File = log.try_clone().map_err(log_err)?;
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .env("RUST_BACKTRACE", "1");
        let node = &self.inner.node;
        *child = Some(spawn_in(cmd, &node.netns_path(), &node.agent_cgroup())?);
        Ok(())
    }

    /// Restarts the agent with the same arguments (stopping it first if it
    /// runs) and waits until it is ready.
    pub fn restart(&self) -> Result<()> {
        if self.is_running() {
            self.stop()?;
        }
        self.start()?;
        self.wait_ready(crate::testbed::AGENT_READY_TIMEOUT)
    }

    /// The process id while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        let mut child = self.child();
        let c = child.as_mut()?;
        matches!(c.try_wait(), Ok(None)).then(|| c.id())
    }

    /// Whether the process runs.
    #[must_use]
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Sends SIGHUP: reload the config file now.
    pub fn reload(&self) -> Result<()> {
        self.send(libc::SIGHUP, "SIGHUP")
    }

    /// Sends `sig` to the running process.
    fn send(&self, sig: libc::c_int, name: &str) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| self.not_running("not started or exited"))?;
        signal(pid, sig).map_err(|e| TestbedError::io(format!("{name} agent {pid}"), e))
    }

    /// SIGKILLs the agent (simulating a crash) and reaps it. Its pinned
    /// programs and maps stay behind.
    pub fn kill(&self) -> Result<()> {
        let mut child = self.child();
        if let Some(c) = child.as_mut() {
            let ctx = |e| TestbedError::io("kill agent", e);
            c.kill().map_err(ctx)?;
            c.wait().map_err(ctx)?;
        }
        Ok(())
    }

    /// Stops the agent: SIGTERM, then SIGKILL after [`STOP_GRACE`].
    pub fn stop(&self) -> Result<()> {
        self.terminate();
        self.reap_by(Instant::now() + STOP_GRACE);
        Ok(())
    }

    /// Sends SIGTERM if running (teardown step one).
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
                eprintln!(
                    "agent on {} did not exit within {STOP_GRACE:?} of SIGTERM; sending SIGKILL",
                    self.inner.node.name()
                );
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Waits until `GET /ready` answers 200; fails early if the process
    /// exits, and quotes the log tail on timeout.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let what = format!("agent on {} to become ready", self.inner.node.name());
        poll_until(&what, timeout, Duration::from_millis(200), || {
            self.check_alive()?;
            Ok(match self.inner.admin.get("/ready") {
                Ok((200, _)) => Check::Ready(()),
                Ok((code, body)) => {
                    Check::Pending(format!("/ready returned {code}: {}", body.trim()))
                }
                Err(e) => Check::Pending(e.to_string()),
            })
        })
        .map_err(|e| match e {
            TestbedError::Timeout {
                what,
                waited_ms,
                last,
            } => TestbedError::Timeout {
                what,
                waited_ms,
                last: format!("{last}\nagent log tail:\n{}", self.log_tail(50)),
            },
            other => other,
        })
    }

    /// Fails with the exit status and log tail if the process is not running.
    fn check_alive(&self) -> Result<()> {
        let status = {
            let mut child = self.child();
            match child.as_mut().map(Child::try_wait) {
                Some(Ok(None)) => return Ok(()),
                Some(Ok(Some(status))) => status.to_string(),
                Some(Err(e)) => e.to_string(),
                None => "never started".to_owned(),
            }
        };
        Err(self.not_running(&status))
    }

    fn not_running(&self, status: &str) -> TestbedError {
        TestbedError::AgentNotRunning {
            node: self.inner.node.name().to_owned(),
            status: status.to_owned(),
            log_tail: self.log_tail(50),
        }
    }

    /// The last `lines` lines of the agent's log.
    #[must_use]
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.inner.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Number of open file descriptors, counted in `/proc/<pid>/fd`.
    pub fn open_fds(&self) -> Result<usize> {
        let pid = self.pid().ok_or_else(|| self.not_running("not running"))?;
        let dir = format!("/proc/{pid}/fd");
        Ok(std::fs::read_dir(&dir)
            .map_err(|e| TestbedError::io(format!("list {dir}"), e))?
            .count())
    }

    /// `GET /flows`: every flow record, oldest first.
    pub fn flows(&self) -> Result<Vec<Flow>> {
        self.inner.admin.get_json("/flows")
    }

    /// `GET /flows?last=n`: the newest `n` records, oldest first.
    pub fn flows_last(&self, n: usize) -> Result<Vec<Flow>> {
        self.inner.admin.get_json(&format!("/flows?last={n}"))
    }

    /// `GET /workloads`.
    pub fn workloads(&self) -> Result<Vec<Workload>> {
        self.inner.admin.get_json("/workloads")
    }

    /// The `/workloads` entry for `namespace/name`, if listed.
    pub fn workload(&self, qualified_name: &str) -> Result<Option<Workload>> {
        Ok(self
            .workloads()?
            .into_iter()
            .find(|w| w.qualified_name() == qualified_name))
    }

    /// `GET /datapath`.
    pub fn datapath(&self) -> Result<Datapath> {
        self.inner.admin.get_json("/datapath")
    }

    /// `GET /stats`.
    pub fn stats(&self) -> Result<Stats> {
        self.inner.admin.get_json("/stats")
    }

    /// `GET path` on the admin API: status code and raw body.
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        self.inner.admin.get(path)
    }

    /// Polls `/flows` until `done` holds for the records, returning them. The
    /// timeout error lists the newest records.
    pub fn wait_for_flows(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Flow]) -> bool,
    ) -> Result<Vec<Flow>> {
        let what = format!("{what} (agent on {})", self.inner.node.name());
        poll_until(&what, timeout, Duration::from_millis(100), || {
            self.check_alive()?;
            let flows = self.flows()?;
            Ok(if done(&flows) {
                Check::Ready(flows)
            } else {
                Check::Pending(describe_flows(&flows, 20))
            })
        })
    }
}

/// The newest `max` records, one per line, for error messages.
#[must_use]
pub fn describe_flows(flows: &[Flow], max: usize) -> String {
    let shown = &flows[flows.len().saturating_sub(max)..];
    let mut out = format!("{} flow records", flows.len());
    if shown.len() < flows.len() {
        let _ = write!(out, ", newest {}", shown.len());
    }
    out.push(':');
    for f in shown {
        out.push_str("\n  ");
        out.push_str(&f.to_string());
    }
    out
}
