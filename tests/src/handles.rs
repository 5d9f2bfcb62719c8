//! Handles to a test bed's nodes and pods, and running processes in them.
//!
//! A handle is cheap to clone and knows its network namespace and cgroup.
//! `spawn` starts a background [`Process`] whose stdout and stderr go to a
//! log file in the test bed's temp dir; `run` waits and captures the output.
//! Processes started in a pod live in the pod's cgroup, which is below the
//! node's cgroup where the agent attaches its programs, so their sockets are
//! subject to capture exactly like a real pod's.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::env::pod_app_binary;
use crate::error::{Result, TestbedError};
use crate::exec::{command_line, in_netns, spawn_in, Process};
use crate::network;
use crate::podapp::{parse_summary, ClientSpec, ClientSummary};
use crate::spec::PodSpec;
use crate::testbed::Shared;
use crate::wait::{poll_until, Check};

/// A node: a network namespace with a pod bridge, where the agent runs.
#[derive(Debug, Clone)]
pub struct Node {
    shared: Arc<Shared>,
    name: String,
    index: u8,
    netns: String,
    cgroup: PathBuf,
}

impl Node {
    pub(crate) fn new(shared: Arc<Shared>, name: &str, index: u8) -> Self {
        Self {
            netns: shared.netns_name(name),
            cgroup: shared.cgroup_root.join(name),
            name: name.to_owned(),
            index,
            shared,
        }
    }

    /// The node's name, e.g. `node-a`.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its index `i` (1-based): pods get 10.44.`i`.0/24.
    #[must_use]
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Its network namespace's name.
    #[must_use]
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// Its network namespace's file, `/run/netns/<name>`.
    #[must_use]
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// A directory of symlinks to the network namespaces of this node's
    /// pods, as a CNI plugin's `/run/netns` on a real node: what an agent
    /// in Kubernetes mode searches (`--netns-dir`), since every node of
    /// every test bed shares this machine's `/run/netns` and `/proc`.
    #[must_use]
    pub fn pod_netns_dir(&self) -> PathBuf {
        self.shared.tmp.join(format!("netns-{}", self.name))
    }

    /// The cgroup the agent attaches its programs to (covers the node's
    /// pods and the agent itself).
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The cgroup the agent process runs in.
    #[must_use]
    pub fn agent_cgroup(&self) -> PathBuf {
        self.cgroup.join("agent")
    }

    /// The agent's bpffs pin directory.
    #[must_use]
    pub fn pin_dir(&self) -> PathBuf {
        self.shared.pin_root.join(&self.name)
    }

    /// Address on the inter-node network, 10.250.0.`i`.
    #[must_use]
    pub fn transit_ip(&self) -> Ipv4Addr {
        network::transit_ip(self.index)
    }

    /// The pods' default gateway, 10.44.`i`.1.
    #[must_use]
    pub fn gateway_ip(&self) -> Ipv4Addr {
        network::gateway_ip(self.index)
    }

    /// Spawns `cmd` on the node (its netns, cgroup `<node>/host`), logging
    /// stdout and stderr to a file.
    pub fn spawn(&self, cmd: Command) -> Result<Process> {
        spawn_logged(&self.shared, cmd, &self.netns_path(), &self.cgroup.join("host"), &self.name)
    }

    /// Runs `cmd` on the node to completion, capturing its output.
    pub fn run(&self, cmd: Command) -> Result<Output> {
        run_captured(cmd, &self.netns_path(), &self.cgroup.join("host"))
    }

    /// The test bed's `tools` cgroup, which no agent program covers (used
    /// for admin-API probes run in this node's netns).
    pub(crate) fn tools_cgroup(&self) -> PathBuf {
        self.shared.tools_cgroup()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// A pod: a network namespace behind a node's bridge, with its own cgroup.
#[derive(Debug, Clone)]
pub struct Pod {
    shared: Arc<Shared>,
    name: String,
    namespace: String,
    service_account: String,
    node: String,
    ip: Ipv4Addr,
    netns: String,
    cgroup: PathBuf,
}

impl Pod {
    pub(crate) fn new(shared: Arc<Shared>, spec: &PodSpec, node: &Node, ip: Ipv4Addr) -> Self {
        Self {
            netns: shared.netns_name(&spec.name),
            cgroup: node.cgroup().join("pods").join(&spec.name),
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            service_account: spec.service_account_name().to_owned(),
            node: node.name().to_owned(),
            ip,
            shared,
        }
    }

    /// The pod's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pod's Kubernetes namespace.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `namespace/name`, as the agent reports workloads.
    #[must_use]
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its service account.
    #[must_use]
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// Its mesh identity, `spiffe://<trust domain>/ns/<namespace>/sa/<service
    /// account>`, with the test bed's trust domain as it stands.
    #[must_use]
    pub fn spiffe_id(&self) -> String {
        let trust_domain = self.shared.lock().trust_domain();
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", self.namespace, self.service_account)
    }

    /// The node it runs on.
    #[must_use]
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// Its IP, 10.44.`i`.`k`.
    #[must_use]
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ip:port` on this pod.
    #[must_use]
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip, port))
    }

    /// Its network namespace's name.
    #[must_use]
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// Its network namespace's file, `/run/netns/<name>`.
    #[must_use]
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }

    /// Its cgroup.
    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Spawns `cmd` in the pod, logging stdout and stderr to a file.
    pub fn spawn(&self, cmd: Command) -> Result<Process> {
        spawn_logged(&self.shared, cmd, &self.netns_path(), &self.cgroup, &self.name)
    }

    /// Runs `cmd` in the pod to completion, capturing its output.
    pub fn run(&self, cmd: Command) -> Result<Output> {
        run_captured(cmd, &self.netns_path(), &self.cgroup)
    }

    /// A `pod-app` command (not yet started).
    pub fn pod_app(&self) -> Result<Command> {
        Ok(Command::new(pod_app_binary()?))
    }

    /// Starts `pod-app echo` on `0.0.0.0:port` and waits until it listens.
    pub fn start_echo(&self, port: u16) -> Result<Process> {
        let mut cmd = self.pod_app()?;
        cmd.args(["echo", "--listen", &format!("0.0.0.0:{port}")]);
        let process = self.spawn(cmd)?;
        self.wait_listening(port, Duration::from_secs(10))?;
        Ok(process)
    }

    /// Starts `pod-app http` (HTTP/1.1 and h2c, answering as this pod's
    /// name) on `port` and waits until it listens.
    pub fn start_http(&self, port: u16) -> Result<Process> {
        self.start_http_delayed(port, Duration::ZERO)
    }

    /// [`Pod::start_http`] answering every request `delay` late.
    pub fn start_http_delayed(&self, port: u16, delay: Duration) -> Result<Process> {
        let mut cmd = self.pod_app()?;
        cmd.args(["http", "--listen", &format!("0.0.0.0:{port}"), "--name", &self.name]);
        cmd.args(["--delay-ms", &delay.as_millis().to_string()]);
        let process = self.spawn(cmd)?;
        self.wait_listening(port, Duration::from_secs(10))?;
        Ok(process)
    }

    /// Waits until some socket in the pod listens on TCP `port`.
    pub fn wait_listening(&self, port: u16, timeout: Duration) -> Result<()> {
        let what = format!("a listener on port {port} in pod {}", self.name);
        poll_until(&what, timeout, Duration::from_millis(50), || {
            let ports = listening_ports(&self.netns_path())?;
            Ok(if ports.contains(&port) { Check::Ready(()) } else { Check::Pending(format!("listening: {ports:?}")) })
        })
    }

    /// Runs `pod-app client` in the pod and returns its summary (whether or
    /// not every connection succeeded).
    pub fn run_client(&self, spec: &ClientSpec) -> Result<ClientSummary> {
        let mut cmd = self.pod_app()?;
        cmd.args(spec.args());
        let out = self.run(cmd)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        parse_summary(&stdout).ok_or_else(|| TestbedError::ClientOutput {
            pod: self.qualified_name(),
            status: out.status,
            stdout: stdout.trim().to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    /// Starts `pod-app client` in the background (e.g. a long-lived
    /// connection that must survive something the test does meanwhile).
    pub fn spawn_client(&self, spec: &ClientSpec) -> Result<BackgroundClient> {
        let mut cmd = self.pod_app()?;
        cmd.args(spec.args());
        Ok(BackgroundClient { process: self.spawn(cmd)?, pod: self.qualified_name() })
    }
}

/// A `pod-app client` running in the background; killed if dropped.
#[derive(Debug)]
pub struct BackgroundClient {
    process: Process,
    pod: String,
}

impl BackgroundClient {
    /// Whether it is still running.
    pub fn is_running(&mut self) -> Result<bool> {
        Ok(self.process.try_wait()?.is_none())
    }

    /// Waits up to `timeout` for it to finish and returns its summary.
    pub fn wait(mut self, timeout: Duration) -> Result<ClientSummary> {
        let what = format!("pod-app client in {} to finish", self.pod);
        let status = poll_until(&what, timeout, Duration::from_millis(50), || {
            Ok(match self.process.try_wait()? {
                Some(status) => Check::Ready(status),
                None => Check::Pending("still running".into()),
            })
        })?;
        let log = self.process.log_text();
        parse_summary(&log).ok_or_else(|| TestbedError::ClientOutput {
            pod: self.pod.clone(),
            status,
            stdout: log.trim().to_owned(),
            stderr: String::new(),
        })
    }
}

/// Spawns with stdout and stderr appended to a fresh log file.
pub(crate) fn spawn_logged(
    shared: &Shared,
    mut cmd: Command,
    netns: &Path,
    cgroup: &Path,
    label: &str,
) -> Result<Process> {
    let log = shared.log_file(label);
    let file = File::create(&log).map_err(|e| TestbedError::io(format!("create {}", log.display()), e))?;
    let err_file = file.try_clone().map_err(|e| TestbedError::io(format!("dup {}", log.display()), e))?;
    cmd.stdin(Stdio::null()).stdout(file).stderr(err_file);
    let what = format!("`{}` in {label} (log {})", command_line(&cmd), log.display());
    let child = spawn_in(cmd, netns, cgroup)?;
    Ok(Process::new(child, what).with_log(log))
}

/// Runs to completion with piped output.
fn run_captured(mut cmd: Command, netns: &Path, cgroup: &Path) -> Result<Output> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let line = command_line(&cmd);
    spawn_in(cmd, netns, cgroup)?.wait_with_output().map_err(|e| TestbedError::io(format!("wait for `{line}`"), e))
}

/// TCP ports in LISTEN state in the network namespace `netns`, read from
/// `/proc/thread-self/net/tcp` and `tcp6` (dual-stack listeners, as gRPC
/// servers open) on a thread that joined it.
pub(crate) fn listening_ports(netns: &Path) -> Result<Vec<u16>> {
    const TCP_LISTEN: &str = "0A";
    let text = in_netns(netns, || {
        let v4 = std::fs::read_to_string("/proc/thread-self/net/tcp")?;
        // tcp6 is absent when IPv6 is disabled.
        let v6 = std::fs::read_to_string("/proc/thread-self/net/tcp6").unwrap_or_default();
        Ok::<_, std::io::Error>(v6.lines().skip(1).fold(v4, |mut all, l| {
            all.push_str(l);
            all.push('\n');
            all
        }))
    })?
    .map_err(|e| TestbedError::io("read /proc/thread-self/net/tcp", e))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            let port = local.rsplit_once(':')?.1;
            (state == TCP_LISTEN).then(|| u16::from_str_radix(port, 16).ok())?
        })
        .collect())
}
