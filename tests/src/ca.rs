//! The mesh CA under test (`mesh-agent ca`), which turns mTLS on for a
//! test bed.
//!
//! [`crate::Testbed::start_ca`] runs one CA per test bed inside a node's
//! network namespace, listening on that node's transit address port
//! [`CA_PORT`], which every node reaches over the switch. Its state (root
//! key, trust bundle, one token per node) lives in `<temp dir>/ca/`, so a
//! stopped CA started again keeps its root and tokens, as a restarted CA pod
//! would. Agents started after the CA get its flags (see [`AgentCaFlags`]);
//! agents started before it (or in a test bed without one) forward in
//! plaintext, which is what the capture tests rely on.
//!
//! Cgroup: `heddle-test-<id>/ca`, a sibling of the nodes' cgroups and so
//! outside every agent's attach point. The CA is control plane, not a
//! workload: no agent's `connect4`/`sock_ops` should ever see its sockets
//! (the tests would otherwise also depend on the capture path leaving a
//! non-enrolled process alone, which the capture tests already prove for
//! the agent itself). It is killed with the rest of the subtree at teardown,
//! after a SIGTERM with the agents.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::daemon::Daemon;
use crate::error::{Result, TestbedError};
use crate::handles::{listening_ports, Node};
use crate::wait::{poll_until, Check};

/// The CA's port on its node's transit address.
pub const CA_PORT: u16 = 15012;
/// How long the CA gets to write its state and listen.
pub const CA_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Grace period between SIGTERM and SIGKILL.
pub const CA_STOP_GRACE: Duration = Duration::from_secs(5);

/// How to run the CA.
#[derive(Debug, Clone, Copy, Default)]
pub struct CaOptions {
    /// Lifetime of workload certificates (`--ttl-seconds`); agents rotate at
    /// half of it. `None`: the CA's default (a day).
    pub ttl_seconds: Option<u64>,
}

/// What an agent needs to use the CA.
#[derive(Debug, Clone)]
pub struct AgentCaFlags {
    /// `--ca-addr`.
    pub ca_addr: SocketAddr,
    /// `--ca-token-file`: this node's token.
    pub token_file: PathBuf,
    /// `--trust-bundle`.
    pub trust_bundle: PathBuf,
}

impl AgentCaFlags {
    /// Fails unless the token and bundle exist: the CA writes them when it
    /// first starts, and only for nodes that had workloads then.
    pub(crate) fn check_present(&self) -> Result<()> {
        for (what, path) in [("CA token", &self.token_file), ("trust bundle", &self.trust_bundle)] {
            if !path.is_file() {
                return Err(TestbedError::Environment(format!(
                    "{what} {} does not exist: start the CA before the agents, after \
                     adding a pod to every node (it creates tokens only for nodes with workloads)",
                    path.display()
                )));
            }
        }
        Ok(())
    }
}

/// The test bed's mesh CA; cheap to clone (all clones control one process).
#[derive(Debug, Clone)]
pub struct Ca {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: Node,
    bin: PathBuf,
    options: CaOptions,
    state_dir: PathBuf,
    addr: SocketAddr,
    daemon: Daemon,
}

impl Ca {
    pub(crate) fn new(node: Node, bin: PathBuf, options: CaOptions, cgroup: PathBuf) -> Self {
        let shared = node.shared();
        let state_dir = shared.tmp.join("ca");
        let log = shared.tmp.join("ca.log");
        let addr = SocketAddr::V4(SocketAddrV4::new(node.transit_ip(), CA_PORT));
        let daemon = Daemon::new(format!("mesh CA on {}", node.name()), node.netns_path(), cgroup, log);
        Self { inner: Arc::new(Inner { node, bin, options, state_dir, addr, daemon }) }
    }

    /// Where it listens: its node's transit address, port [`CA_PORT`].
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The node whose network namespace it runs in.
    #[must_use]
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// Its state directory (root key, bundle, tokens).
    #[must_use]
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// The trust bundle agents are given.
    #[must_use]
    pub fn bundle_path(&self) -> PathBuf {
        self.inner.state_dir.join("bundle.pem")
    }

    /// The token file of `node`.
    #[must_use]
    pub fn token_path(&self, node: &str) -> PathBuf {
        self.inner.state_dir.join("nodes").join(format!("{node}.token"))
    }

    /// Its log file.
    #[must_use]
    pub fn log_path(&self) -> &Path {
        self.inner.daemon.log_path()
    }

    /// The flags for the agent of `node`.
    #[must_use]
    pub fn agent_flags(&self, node: &Node) -> AgentCaFlags {
        AgentCaFlags {
            ca_addr: self.addr(),
            token_file: self.token_path(node.name()),
            trust_bundle: self.bundle_path(),
        }
    }

    /// The command line it runs.
    #[must_use]
    pub fn command(&self) -> Command {
        let shared = self.inner.node.shared();
        let mut cmd = Command::new(&self.inner.bin);
        cmd.arg("ca")
            .arg("--config")
            .arg(&shared.config_path)
            .arg("--state-dir")
            .arg(&self.inner.state_dir)
            .arg("--listen")
            .arg(self.addr().to_string());
        if let Some(ttl) = self.inner.options.ttl_seconds {
            cmd.args(["--ttl-seconds", &ttl.to_string()]);
        }
        cmd
    }

    /// Starts the CA (again, after [`Ca::stop`]) and waits until it serves.
    pub fn start(&self) -> Result<()> {
        self.inner.daemon.start(self.command())?;
        self.wait_ready(CA_READY_TIMEOUT)
    }

    /// Stops it: SIGTERM, then SIGKILL after [`CA_STOP_GRACE`]. Its state
    /// stays, so [`Ca::start`] resumes with the same root and tokens.
    pub fn stop(&self) {
        self.terminate();
        self.reap_by(Instant::now() + CA_STOP_GRACE);
    }

    /// Whether the process runs.
    #[must_use]
    pub fn is_running(&self) -> bool {
        self.inner.daemon.pid().is_some()
    }

    /// The last `lines` lines of its log.
    #[must_use]
    pub fn log_tail(&self, lines: usize) -> String {
        self.inner.daemon.log_tail(lines)
    }

    pub(crate) fn terminate(&self) {
        self.inner.daemon.terminate();
    }

    pub(crate) fn reap_by(&self, deadline: Instant) {
        self.inner.daemon.reap_by(deadline);
    }

    /// Waits until the bundle and every expected node token exist and the
    /// CA listens; fails early (with its log) if the process exits.
    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let what = format!("{} to serve on {}", self.inner.daemon.label(), self.addr());
        let nodes = self.nodes_with_workloads();
        poll_until(&what, timeout, Duration::from_millis(100), || {
            if let Err(status) = self.inner.daemon.running() {
                return Err(TestbedError::Environment(format!(
                    "{} exited ({status}); log tail:\n{}",
                    self.inner.daemon.label(),
                    self.log_tail(30)
                )));
            }
            let mut missing: Vec<String> = nodes
                .iter()
                .map(|n| self.token_path(n))
                .chain([self.bundle_path()])
                .filter(|p| !p.is_file())
                .map(|p| p.display().to_string())
                .collect();
            let ports = listening_ports(&self.inner.node.netns_path())?;
            if !ports.contains(&CA_PORT) {
                missing.push(format!("a listener on port {CA_PORT}"));
            }
            Ok(if missing.is_empty() {
                Check::Ready(())
            } else {
                Check::Pending(format!("missing {}", missing.join(", ")))
            })
        })
    }

    /// Nodes that have a pod in the config now (the CA makes their tokens).
    fn nodes_with_workloads(&self) -> Vec<String> {
        self.inner.node.shared().lock().pod_nodes()
    }
}
