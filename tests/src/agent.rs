//! The node agent under test: its process and its admin API.
//!
//! An [`Agent`] runs `mesh-agent run` inside its node's netns and in the
//! cgroup `<node>/agent`, so the programs it attaches at `<node>` also cover
//! its own sockets (the tests prove they are never redirected). Its stdout
//! and stderr are appended to `agent-<node>.log` in the temp dir; the tail is
//! quoted in errors and printed when a test fails. SIGHUP reloads the config,
//! SIGTERM stops it cleanly (detach, unpin); teardown sends SIGTERM and
//! SIGKILLs after five seconds.
//!
//! An agent created while the test bed has a mesh CA ([`crate::Ca`]) gets
//! the CA flags (`--ca-addr`, `--ca-token-file`, `--trust-bundle`) and so
//! tunnels mesh traffic over mTLS; so does one whose node was given flags
//! with [`crate::Testbed::set_agent_ca_flags`] (the Kubernetes-mode CA,
//! [`crate::kube_ca`]); without either it forwards in plaintext.
//! Every agent reads the test bed's policies file (`--policies`, empty
//! until [`crate::Testbed::set_policies`] writes it).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::admin::{AdminClient, Certificate, Certs, Datapath, Flow, Policies, Stats, Workload};
use crate::ca::AgentCaFlags;
use crate::daemon::Daemon;
use crate::error::{Result, TestbedError};
use crate::handles::Node;
use crate::wait::{poll_until, Check};

/// Where the admin API listens inside the node's netns.
pub const ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Where the Prometheus endpoint is reached inside the node's netns (the
/// agent's default, `0.0.0.0:15020`).
pub const METRICS_ADDR: &str = "127.0.0.1:15020";
/// Grace period between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// What a new agent logs once the running one released its listeners.
pub const TOOK_OVER: &str = "took over: the previous agent stopped accepting";
/// What an agent logs once it handed over and stopped accepting.
pub const HANDED_OVER: &str = "handed over to the successor: not accepting; draining";

/// A node agent; cheap to clone (all clones control the same process).
#[derive(Debug, Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: Node,
    bin: PathBuf,
    ca: Option<AgentCaFlags>,
    admin: AdminClient,
    metrics: AdminClient,
    daemon: Daemon,
    /// Agents that handed over to a successor ([`Agent::upgrade`]) and
    /// drain, until reaped.
    retired: Mutex<Vec<Child>>,
    /// Extra environment of the process ([`Agent::set_env`]).
    env: Mutex<Vec<(String, String)>>,
}

impl Agent {
    pub(crate) fn new(node: Node, bin: PathBuf, ca: Option<AgentCaFlags>) -> Self {
        let log = node.shared().tmp.join(format!("agent-{}.log", node.name()));
        let admin = AdminClient {
            node: node.name().to_owned(),
            netns: node.netns_path(),
            cgroup: node.tools_cgroup(),
            addr: ADMIN_ADDR.to_owned(),
        };
        let metrics = AdminClient { addr: METRICS_ADDR.to_owned(), ..admin.clone() };
        let daemon = Daemon::new(format!("agent on {}", node.name()), node.netns_path(), node.agent_cgroup(), log);
        Self {
            inner: Arc::new(Inner {
                node,
                bin,
                ca,
                admin,
                metrics,
                daemon,
                retired: Mutex::new(Vec::new()),
                env: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The node this agent serves.
    #[must_use]
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// Its log file.
    #[must_use]
    pub fn log_path(&self) -> &Path {
        self.inner.daemon.log_path()
    }

    /// Whether it was started with the mesh CA flags (mTLS on).
    #[must_use]
    pub fn mtls(&self) -> bool {
        self.inner.ca.is_some()
    }

    /// The command line it is started with.
    #[must_use]
    pub fn command(&self) -> Command {
        let node = &self.inner.node;
        let shared = node.shared();
        let mut cmd = Command::new(&self.inner.bin);
        cmd.arg("run");
        let kubernetes = shared.lock().kubernetes.clone();
        if let Some(k) = kubernetes {
            cmd.arg("--kubernetes")
                .args(["--trust-domain", &k.trust_domain])
                .arg("--netns-dir")
                .arg(node.pod_netns_dir())
                .env("KUBECONFIG", &k.kubeconfig);
        } else {
            cmd.arg("--config").arg(&shared.config_path).arg("--policies").arg(shared.policies_path());
        }
        cmd.args(["--node", node.name()])
            .arg("--cgroup")
            .arg(node.cgroup())
            .arg("--pin-dir")
            .arg(node.pin_dir())
            .arg("--handover-socket")
            .arg(shared.tmp.join(format!("handover-{}.sock", node.name())))
            .args(["--admin-addr", ADMIN_ADDR])
            .args(shared.lock().agent_args.clone());
        cmd.envs(self.inner.env.lock().expect("env lock").iter().map(|(k, v)| (k, v)));
        if let Some(ca) = &self.inner.ca {
            cmd.arg("--ca-addr")
                .arg(ca.ca_addr.to_string())
                .arg("--ca-token-file")
                .arg(&ca.token_file)
                .arg("--trust-bundle")
                .arg(&ca.trust_bundle);
        }
        cmd
    }

    /// Sets the environment the process gets from its next (re)start on,
    /// replacing what an earlier call set (e.g. a `LD_PRELOAD`ed fake clock).
    pub fn set_env(&self, vars: &[(&str, &str)]) {
        *self.inner.env.lock().expect("env lock") =
            vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    }

    /// Starts the process (not waiting for readiness); fails if it runs.
    pub(crate) fn start(&self) -> Result<()> {
        if let Some(ca) = &self.inner.ca {
            ca.check_present()?;
        }
        self.inner.daemon.start(self.command())
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

    /// Upgrades the agent without stopping it: starts a new process with the
    /// same arguments, which takes the running one's listeners over
    /// (`mesh-agent`'s handover), and waits until it says it took over. The
    /// previous process drains and exits by itself ([`Agent::retired_exits`]).
    pub fn upgrade(&self) -> Result<()> {
        let before = self.log_count(TOOK_OVER);
        let previous = self.inner.daemon.start_successor(self.command())?;
        self.retired().extend(previous);
        let what = format!("the new agent on {} to take over", self.inner.node.name());
        poll_until(&what, crate::testbed::AGENT_READY_TIMEOUT, Duration::from_millis(100), || {
            self.check_alive()?;
            let now = self.log_count(TOOK_OVER);
            Ok(if now > before { Check::Ready(()) } else { Check::Pending(self.log_tail(3)) })
        })
    }

    /// Waits for every agent that handed over to exit (SIGKILL at
    /// `timeout`) and returns their exit statuses, oldest first.
    pub fn retired_exits(&self, timeout: Duration) -> Result<Vec<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut statuses = Vec::new();
        for mut child in std::mem::take(&mut *self.retired()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(Some(status)) = crate::exec::wait_timeout(&mut child, left) {
                statuses.push(status);
            } else {
                let _ = child.kill();
                let _ = child.wait();
                let pid = child.id();
                return Err(self.not_running(&format!("a retired agent (pid {pid}) did not exit within {timeout:?}")));
            }
        }
        Ok(statuses)
    }

    fn retired(&self) -> std::sync::MutexGuard<'_, Vec<Child>> {
        self.inner.retired.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many lines of the log contain `text`.
    #[must_use]
    pub fn log_count(&self, text: &str) -> usize {
        std::fs::read_to_string(self.log_path()).unwrap_or_default().lines().filter(|l| l.contains(text)).count()
    }

    /// The process id while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.inner.daemon.pid()
    }

    /// Whether the process runs.
    #[must_use]
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Sends SIGHUP: reload the config file now.
    pub fn reload(&self) -> Result<()> {
        self.inner.daemon.send(libc::SIGHUP, "SIGHUP").unwrap_or_else(|| Err(self.not_running("not started or exited")))
    }

    /// SIGKILLs the agent (simulating a crash) and reaps it. Its pinned
    /// programs and maps stay behind.
    pub fn kill(&self) -> Result<()> {
        self.inner.daemon.kill()
    }

    /// Stops the agent: SIGTERM, then SIGKILL after [`STOP_GRACE`].
    pub fn stop(&self) -> Result<()> {
        self.terminate();
        self.reap_by(Instant::now() + STOP_GRACE);
        Ok(())
    }

    /// Sends SIGTERM if running (teardown step one).
    pub(crate) fn terminate(&self) {
        self.inner.daemon.terminate();
    }

    /// Waits for the process (and retired ones) until `deadline`, then
    /// SIGKILLs and reaps them.
    pub(crate) fn reap_by(&self, deadline: Instant) {
        self.inner.daemon.reap_by(deadline);
        for mut child in std::mem::take(&mut *self.retired()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if !matches!(crate::exec::wait_timeout(&mut child, left), Ok(Some(_))) {
                let _ = child.kill();
                let _ = child.wait();
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
                Ok((code, body)) => Check::Pending(format!("/ready returned {code}: {}", body.trim())),
                Err(e) => Check::Pending(e.to_string()),
            })
        })
        .map_err(|e| match e {
            TestbedError::Timeout { what, waited_ms, last } => TestbedError::Timeout {
                what,
                waited_ms,
                last: format!("{last}\nagent log tail:\n{}", self.log_tail(50)),
            },
            other => other,
        })
    }

    /// Fails with the exit status and log tail if the process is not running.
    fn check_alive(&self) -> Result<()> {
        self.inner.daemon.running().map_err(|status| self.not_running(&status))
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
        self.inner.daemon.log_tail(lines)
    }

    /// Number of open file descriptors, counted in `/proc/<pid>/fd`.
    pub fn open_fds(&self) -> Result<usize> {
        let pid = self.pid().ok_or_else(|| self.not_running("not running"))?;
        let dir = format!("/proc/{pid}/fd");
        Ok(std::fs::read_dir(&dir).map_err(|e| TestbedError::io(format!("list {dir}"), e))?.count())
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
        Ok(self.workloads()?.into_iter().find(|w| w.qualified_name() == qualified_name))
    }

    /// `GET /datapath`.
    pub fn datapath(&self) -> Result<Datapath> {
        self.inner.admin.get_json("/datapath")
    }

    /// `GET /stats`.
    pub fn stats(&self) -> Result<Stats> {
        self.inner.admin.get_json("/stats")
    }

    /// `GET /policies`: the authorization policies in force, rejected ones
    /// and decision counters.
    pub fn policies(&self) -> Result<Policies> {
        self.inner.admin.get_json("/policies")
    }

    /// Waits until the agent has read the policy content whose hash is
    /// `content_hash` (`fnv1a64:<hex>`), and returns what it shows.
    pub fn wait_policies(&self, content_hash: &str, timeout: Duration) -> Result<Policies> {
        let what = format!("agent on {} to read policies {content_hash}", self.inner.node.name());
        poll_until(&what, timeout, Duration::from_millis(50), || {
            self.check_alive()?;
            let policies = self.policies()?;
            Ok(if policies.content_hash.as_deref() == Some(content_hash) {
                Check::Ready(policies)
            } else {
                Check::Pending(policies.to_string())
            })
        })
    }

    /// `GET /certs`: the certificates this agent holds for its workloads.
    pub fn certs(&self) -> Result<Certs> {
        self.inner.admin.get_json("/certs")
    }

    /// Waits until the agent holds a certificate for every identity in
    /// `identities` (SPIFFE IDs) and returns them in that order.
    pub fn wait_certificates(&self, identities: &[String], timeout: Duration) -> Result<Vec<Certificate>> {
        let what = format!("agent on {} to hold certificates for {identities:?}", self.inner.node.name());
        poll_until(&what, timeout, Duration::from_millis(100), || {
            self.check_alive()?;
            let certs = self.certs()?;
            let found: Vec<Option<&Certificate>> =
                identities.iter().map(|id| certs.certificate(id).filter(|c| c.ready)).collect();
            Ok(if found.iter().all(Option::is_some) {
                Check::Ready(found.into_iter().flatten().cloned().collect())
            } else {
                Check::Pending(certs.to_string())
            })
        })
    }

    /// `GET /metrics`, parsed by a Prometheus text-format parser.
    pub fn metrics(&self) -> Result<prometheus_parse::Scrape> {
        let (code, body) = self.inner.metrics.get("/metrics")?;
        let problem = |problem: String| TestbedError::Admin {
            node: self.inner.node.name().to_owned(),
            path: format!("{METRICS_ADDR}/metrics"),
            problem,
        };
        if code != 200 {
            return Err(problem(format!("returned {code}")));
        }
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
            .map_err(|e| problem(format!("not the Prometheus text format: {e}")))
    }

    /// `GET path` on the metrics endpoint: status code and raw body.
    pub fn metrics_get(&self, path: &str) -> Result<(u16, String)> {
        self.inner.metrics.get(path)
    }

    /// `GET path` on the admin API: status code and raw body.
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        self.inner.admin.get(path)
    }

    /// Polls `/flows` until `done` holds for the records, returning them. The
    /// timeout error lists the newest records.
    pub fn wait_for_flows(&self, what: &str, timeout: Duration, done: impl Fn(&[Flow]) -> bool) -> Result<Vec<Flow>> {
        let what = format!("{what} (agent on {})", self.inner.node.name());
        poll_until(&what, timeout, Duration::from_millis(100), || {
            self.check_alive()?;
            let flows = self.flows()?;
            Ok(if done(&flows) { Check::Ready(flows) } else { Check::Pending(describe_flows(&flows, 20)) })
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
