//! Set-up shared by the end-to-end tests: the environment guard, the
//! standard two-node cluster, and flow-record queries.
//!
//! The standard cluster:
//! ```text
//! node-a: client (enrolled)   other (not enrolled)   [peer (enrolled, echo :8080)]
//! node-b: server (enrolled, echo :8080)   plain (not enrolled, echo :8080)
//!         [locked (enrolled, STRICT, echo :8080)]
//!         [vault (namespace vault: STRICT; enrolled, echo :8080)]
//!         [vault-open (namespace vault, itself PERMISSIVE; enrolled, echo :8080)]
//! service demo/server  10.96.0.10:80 -> 8080
//! [mesh CA on node-a, trust domain heddle.test]
//! one agent per node
//! ```
//! Each test builds its own cluster; nothing is shared between tests.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod hostile;
pub mod kube;
pub mod l7;
pub mod mesh;
pub mod scrape;
pub mod waypoint_mesh;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use heddle_tests::agent::describe_flows;
use heddle_tests::podapp::EchoRecord;
use heddle_tests::{
    check_environment, Agent, Ca, CaOptions, ClientSpec, ClientSummary, Direction, Flow, InboundMode, Node, Pod,
    PodSpec, Process, ServiceSpec, Testbed,
};

/// Port of every echo server.
pub const ECHO_PORT: u16 = 8080;
/// The `demo/server` service's VIP.
pub const SERVER_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The `demo/server` service's port.
pub const SERVER_VIP_PORT: u16 = 80;
/// How long to wait for the agents to report something.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long to wait before asserting that something did *not* happen.
pub const SETTLE: Duration = Duration::from_millis(500);

/// Whether namespaced tests can run. Outside CI an unusable environment
/// skips the test with a visible "SKIPPED" line; under `CI=true` it fails.
pub fn environment_ready() -> bool {
    match check_environment() {
        Ok(()) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("end-to-end tests cannot run in CI: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            false
        }
    }
}

/// The trust domain of clusters with mTLS (not the default, so the tests
/// also prove the agents take it from the config).
pub const TRUST_DOMAIN: &str = "heddle.test";

/// What to add to the standard cluster.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Add `peer`, an enrolled pod on node-a running echo.
    pub peer: bool,
    /// Run a mesh CA (mTLS on) with these settings.
    pub mtls: Option<Mtls>,
    /// Add the STRICT pods `locked`, `vault` and `vault-open` on node-b.
    pub strict: bool,
    /// More `mesh-agent run` flags for both agents.
    pub agent_args: &'static [&'static str],
}

/// How the cluster's mesh CA runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mtls {
    /// Certificate lifetime; `None` for the CA's default (a day).
    pub ttl_seconds: Option<u64>,
    /// Stop the CA before the agents start (it has written its state).
    pub ca_down_at_start: bool,
}

impl Options {
    /// The standard cluster with `peer`.
    pub fn peer() -> Self {
        Self { peer: true, ..Self::default() }
    }

    /// The standard cluster with a mesh CA.
    pub fn mtls() -> Self {
        Self { mtls: Some(Mtls::default()), ..Self::default() }
    }
}

/// The pods of [`Options::strict`].
pub struct StrictPods {
    /// `demo/locked`: the pod itself is STRICT.
    pub locked: Pod,
    /// `vault/vault`: STRICT through its namespace.
    pub vault: Pod,
    /// `vault/vault-open`: PERMISSIVE itself in the STRICT namespace.
    pub vault_open: Pod,
}

/// The standard cluster. Fields drop in order: processes, then the test bed.
pub struct Cluster {
    /// Echo servers by qualified pod name.
    echo: Vec<(String, Process)>,
    pub agent_a: Agent,
    pub agent_b: Agent,
    pub client: Pod,
    pub other: Pod,
    pub server: Pod,
    pub plain: Pod,
    pub peer: Option<Pod>,
    pub strict: Option<StrictPods>,
    pub ca: Option<Ca>,
    pub node_a: Node,
    pub node_b: Node,
    pub tb: Testbed,
}

impl Cluster {
    /// Builds the standard cluster and waits until both agents are ready.
    pub fn new(name: &str, options: Options) -> Result<Self> {
        let tb = Testbed::new(name)?;
        let node_a = tb.add_node("node-a")?;
        let node_b = tb.add_node("node-b")?;
        let client = tb.add_pod(&node_a, PodSpec::new("client").enrolled(true))?;
        let other = tb.add_pod(&node_a, PodSpec::new("other"))?;
        let peer = if options.peer { Some(tb.add_pod(&node_a, PodSpec::new("peer").enrolled(true))?) } else { None };
        let server = tb.add_pod(&node_b, PodSpec::new("server").enrolled(true))?;
        let plain = tb.add_pod(&node_b, PodSpec::new("plain"))?;
        tb.add_service(ServiceSpec::new("server", SERVER_VIP).port(SERVER_VIP_PORT, ECHO_PORT))?;
        let strict = if options.strict { Some(add_strict_pods(&tb, &node_b)?) } else { None };
        let mut echo = Vec::new();
        for pod in [&server, &plain]
            .into_iter()
            .chain(&peer)
            .chain(strict.iter().flat_map(|s| [&s.locked, &s.vault, &s.vault_open]))
        {
            echo.push((pod.qualified_name(), pod.start_echo(ECHO_PORT)?));
        }
        let ca = match options.mtls {
            Some(mtls) => {
                tb.set_trust_domain(TRUST_DOMAIN)?;
                let ca = tb.start_ca(&node_a, CaOptions { ttl_seconds: mtls.ttl_seconds })?;
                if mtls.ca_down_at_start {
                    ca.stop();
                }
                Some(ca)
            }
            None => None,
        };
        tb.set_agent_args(options.agent_args);
        let mut agents = tb.start_agents(&[&node_a, &node_b])?.into_iter();
        let (agent_a, agent_b) = (agents.next().context("agent a")?, agents.next().context("agent b")?);
        let cluster =
            Self { echo, agent_a, agent_b, client, other, server, plain, peer, strict, ca, node_a, node_b, tb };
        if cluster.ca.as_ref().is_some_and(Ca::is_running) {
            cluster.wait_certificates()?;
        }
        Ok(cluster)
    }

    /// What the echo server of `pod` logged about the connections it served.
    pub fn echo_records(&self, pod: &Pod) -> Vec<EchoRecord> {
        self.echo
            .iter()
            .filter(|(name, _)| *name == pod.qualified_name())
            .flat_map(|(_, p)| EchoRecord::parse_log(&p.log_text()))
            .collect()
    }

    /// The raw log of the echo server of `pod` (errors included, e.g. a
    /// connection reset).
    pub fn echo_log(&self, pod: &Pod) -> String {
        self.echo.iter().filter(|(name, _)| *name == pod.qualified_name()).map(|(_, p)| p.log_text()).collect()
    }

    /// Waits until each agent holds a certificate for each enrolled pod on
    /// its node (the tunnel server of each one asks for it at enrollment).
    pub fn wait_certificates(&self) -> Result<()> {
        let config = self.tb.config();
        for agent in [&self.agent_a, &self.agent_b] {
            let ids: Vec<String> = self
                .tb
                .pods()
                .iter()
                .filter(|p| p.node_name() == agent.node().name())
                .filter(|p| config.workloads.iter().any(|w| w.name == p.name() && w.enrolled))
                .map(Pod::spiffe_id)
                .collect();
            agent.wait_certificates(&ids, WAIT)?;
        }
        Ok(())
    }
}

/// `locked` (STRICT itself), and in namespace `vault` (STRICT) `vault`
/// and `vault-open` (PERMISSIVE itself).
fn add_strict_pods(tb: &Testbed, node: &Node) -> Result<StrictPods> {
    tb.set_namespace_inbound_mode("vault", InboundMode::Strict)?;
    let locked = tb.add_pod(node, PodSpec::new("locked").enrolled(true).inbound_mode(InboundMode::Strict))?;
    let vault = tb.add_pod(node, PodSpec::new("vault").namespace("vault").enrolled(true))?;
    let vault_open = tb.add_pod(
        node,
        PodSpec::new("vault-open").namespace("vault").enrolled(true).inbound_mode(InboundMode::Permissive),
    )?;
    Ok(StrictPods { locked, vault, vault_open })
}

/// Runs an end-to-end test: skips if the environment cannot host it, builds
/// the cluster, runs `body`, and on failure prints every agent's log tail
/// (teardown does that for a failed test bed) before panicking.
pub fn run_e2e(name: &str, options: Options, body: impl FnOnce(&Cluster) -> Result<()>) {
    run_on(name, || Cluster::new(name, options), |c| c.tb.mark_failed(), body);
}

/// [`run_e2e`] for any cluster: `build` makes it, `failed` is called when
/// `body` fails (mark the test bed failed, print extra logs), and the
/// cluster is dropped (torn down) before the panic.
pub fn run_on<C>(
    name: &str,
    build: impl FnOnce() -> Result<C>,
    failed: impl FnOnce(&C),
    body: impl FnOnce(&C) -> Result<()>,
) {
    if !environment_ready() {
        return;
    }
    let cluster = match build() {
        Ok(c) => c,
        Err(e) => panic!("{name}: set-up failed: {e:?}"),
    };
    let result = body(&cluster);
    if result.is_err() {
        failed(&cluster);
    }
    drop(cluster);
    if let Err(e) = result {
        panic!("{name}: {e:?}");
    }
}

/// Runs `heddle <args>` on `agent`'s node (so it reaches that agent's admin
/// API on localhost); returns (exit code, stdout, stderr).
pub fn heddle(agent: &Agent, args: &[&str]) -> Result<(i32, String, String)> {
    let mut cmd = std::process::Command::new(heddle_tests::heddle_binary()?);
    cmd.args(args);
    let out = agent.node().run(cmd)?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs `pod-app client` in `pod` and requires every connection to succeed.
pub fn expect_delivered(pod: &Pod, spec: &ClientSpec) -> Result<ClientSummary> {
    let summary = pod.run_client(spec)?;
    ensure!(
        summary.all_ok() && summary.ok == spec.connection_count() as u64,
        "{} {:?}: not every connection was delivered: {summary}",
        pod.qualified_name(),
        spec.args()
    );
    Ok(summary)
}

/// `ip:port` as a [`SocketAddr`].
pub fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Finished connections handled for `workload` in `direction` whose original
/// destination was `orig_dst`.
pub fn finished<'a>(flows: &'a [Flow], direction: Direction, workload: &str, orig_dst: SocketAddr) -> Vec<&'a Flow> {
    flows
        .iter()
        .filter(|f| {
            f.is_terminal() && f.direction == direction && f.workload == workload && f.orig_dst == Some(orig_dst)
        })
        .collect()
}

/// Waits until `agent` has at least `count` finished flows matching, and
/// returns them.
pub fn wait_finished(
    agent: &Agent,
    direction: Direction,
    workload: &str,
    orig_dst: SocketAddr,
    count: usize,
) -> Result<Vec<Flow>> {
    let what = format!("{count} finished {direction:?} flows of {workload} to {orig_dst}");
    let flows =
        agent.wait_for_flows(&what, WAIT, |flows| finished(flows, direction, workload, orig_dst).len() >= count)?;
    Ok(finished(&flows, direction, workload, orig_dst).into_iter().cloned().collect())
}

/// Like [`wait_finished`], then waits [`SETTLE`] and requires exactly `count`.
pub fn expect_exactly(
    agent: &Agent,
    direction: Direction,
    workload: &str,
    orig_dst: SocketAddr,
    count: usize,
) -> Result<Vec<Flow>> {
    wait_finished(agent, direction, workload, orig_dst, count)?;
    std::thread::sleep(SETTLE);
    let flows = agent.flows()?;
    let matching: Vec<Flow> = finished(&flows, direction, workload, orig_dst).into_iter().cloned().collect();
    ensure!(
        matching.len() == count,
        "agent on {}: expected exactly {count} finished {direction:?} flows of {workload} to {orig_dst}, got {}; {}",
        agent.node().name(),
        matching.len(),
        describe_flows(&flows, 30)
    );
    Ok(matching)
}

/// Requires that no flow record on `agent` satisfies `involves`.
pub fn expect_none(agent: &Agent, what: &str, involves: impl Fn(&Flow) -> bool) -> Result<()> {
    let flows = agent.flows()?;
    let hits: Vec<&Flow> = flows.iter().filter(|f| involves(f)).collect();
    ensure!(
        hits.is_empty(),
        "agent on {} recorded {what}: {}",
        agent.node().name(),
        hits.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    );
    Ok(())
}
