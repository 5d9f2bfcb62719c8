//! Set-up shared by the end-to-end tests: the environment guard, the
//! standard two-node cluster, and flow-record queries.
//!
//! The standard cluster:
//! ```text
//! node-a: client (enrolled)   other (not enrolled)   [peer (enrolled, echo :8080)]
//! node-b: server (enrolled, echo :8080)   plain (not enrolled, echo :8080)
//! service demo/server  10.96.0.10:80 -> 8080
//! one agent per node
//! ```
//! Each test builds its own cluster; nothing is shared between tests.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use heddle_tests::agent::describe_flows;
use heddle_tests::{
    check_environment, Agent, ClientSpec, ClientSummary, Direction, Flow, Node, Pod, PodSpec,
    Process, ServiceSpec, Testbed,
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

/// What to add to the standard cluster.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Add `peer`, an enrolled pod on node-a running echo.
    pub peer: bool,
}

/// The standard cluster. Fields drop in order: processes, then the test bed.
pub struct Cluster {
    echo: Vec<Process>,
    pub agent_a: Agent,
    pub agent_b: Agent,
    pub client: Pod,
    pub other: Pod,
    pub server: Pod,
    pub plain: Pod,
    pub peer: Option<Pod>,
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
        let peer = if options.peer {
            Some(tb.add_pod(&node_a, PodSpec::new("peer").enrolled(true))?)
        } else {
            None
        };
        let server = tb.add_pod(&node_b, PodSpec::new("server").enrolled(true))?;
        let plain = tb.add_pod(&node_b, PodSpec::new("plain"))?;
        tb.add_service(ServiceSpec::new("server", SERVER_VIP).port(SERVER_VIP_PORT, ECHO_PORT))?;
        let mut echo = vec![server.start_echo(ECHO_PORT)?, plain.start_echo(ECHO_PORT)?];
        if let Some(peer) = &peer {
            echo.push(peer.start_echo(ECHO_PORT)?);
        }
        let mut agents = tb.start_agents(&[&node_a, &node_b])?.into_iter();
        let (agent_a, agent_b) = (
            agents.next().context("agent a")?,
            agents.next().context("agent b")?,
        );
        Ok(Self {
            echo,
            agent_a,
            agent_b,
            client,
            other,
            server,
            plain,
            peer,
            node_a,
            node_b,
            tb,
        })
    }
}

/// Runs an end-to-end test: skips if the environment cannot host it, builds
/// the cluster, runs `body`, and on failure prints every agent's log tail
/// (teardown does that for a failed test bed) before panicking.
pub fn run_e2e(name: &str, options: Options, body: impl FnOnce(&Cluster) -> Result<()>) {
    if !environment_ready() {
        return;
    }
    let cluster = match Cluster::new(name, options) {
        Ok(c) => c,
        Err(e) => panic!("{name}: set-up failed: {e:?}"),
    };
    let result = body(&cluster);
    if result.is_err() {
        cluster.tb.mark_failed();
    }
    drop(cluster);
    if let Err(e) = result {
        panic!("{name}: {e:?}");
    }
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
pub fn finished<'a>(
    flows: &'a [Flow],
    direction: Direction,
    workload: &str,
    orig_dst: SocketAddr,
) -> Vec<&'a Flow> {
    flows
        .iter()
        .filter(|f| {
            f.is_terminal()
                && f.direction == direction
                && f.workload == workload
                && f.orig_dst == Some(orig_dst)
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
    let flows = agent.wait_for_flows(&what, WAIT, |flows| {
        finished(flows, direction, workload, orig_dst).len() >= count
    })?;
    Ok(finished(&flows, direction, workload, orig_dst)
        .into_iter()
        .cloned()
        .collect())
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
    let matching: Vec<Flow> = finished(&flows, direction, workload, orig_dst)
        .into_iter()
        .cloned()
        .collect();
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
        hits.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(())
}
