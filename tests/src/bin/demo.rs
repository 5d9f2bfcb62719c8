//! `demo`: Heddle on a two-node, four-pod cluster, explained.
//!
//! Builds (with the test bed library) node-a with `web-client` (enrolled)
//! and `legacy` (not enrolled), node-b with `api` (enrolled, inbound mode
//! STRICT, echo on 8080 and 9090) and `db` (not enrolled, echo on 5432),
//! and the service `demo/api` at 10.96.0.20:80 -> 8080; starts the mesh CA
//! on node-a and both agents with mTLS, sends five kinds of traffic and
//! prints, per step, whether it was delivered (or refused), which agent
//! captured it, the identities of both ends of each tunnelled connection
//! and, for two steps, what a packet capture on node-a's link saw (TLS or
//! the plaintext marker every step sends). Then it applies an authorization
//! policy (ALLOW to `api` only from `web-client`'s identity, only to port
//! 8080) and shows one connection allowed (to 8080) and one denied (to
//! 9090), each with the policy that decided.
//! Then a waypoint (L7) for namespace `shop`: a 90/10 canary of `shop/cart`
//! measured over 400 requests, a header match sending `end-user: jason` to
//! v2, `heddle routes` and the waypoint's L7 flows (see `waypoint`).
//! Then each agent's flows (with the deciding policy), certificates,
//! workload counters and datapath counters, and finally `heddle flows` and
//! `heddle status` as an operator on node-b would run them. Without tcpdump
//! it says so and skips the captures.
//!
//! Everything is removed at the end, on error, on panic (the test bed's
//! `Drop`) and on Ctrl-C/SIGTERM (a signal thread tears the test bed down
//! and exits). `cargo xtask demo` runs it with `HEDDLE_AGENT_BIN` set.
//! Exits 1 if the environment cannot run it or if a step did not behave as
//! expected.

#[path = "demo/waypoint.rs"]
mod waypoint;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::ExitCode;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use heddle_tests::env::TCPDUMP;
use heddle_tests::report::{cert_table, datapath_tables, flow_table, identity_table, workload_table};
use heddle_tests::{
    check_environment, find_tool, Agent, CaOptions, ClientSpec, Direction, Flow, FlowEvent, InboundMode, Node, Pod,
    PodSpec, Security, ServiceSpec, Testbed, TUNNEL_PORT,
};

/// The `demo/api` service's VIP.
const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// Every step's payload: a packet capture looks for it.
const MARKER: &str = "HEDDLE-DEMO-PLAINTEXT/";
/// The policy the demo applies (`ns/name`).
const API_POLICY: &str = "demo/api-allow-web";
/// How long the agents get to obtain their first certificates.
const CERT_WAIT: Duration = Duration::from_secs(15);

/// The test bed to tear down if a signal arrives.
static TEARDOWN: heddle_tests::teardown::InterruptSlot = Mutex::new(None);

fn main() -> ExitCode {
    if let Err(e) = check_environment() {
        eprintln!("demo: cannot run here: {e}");
        eprintln!("demo: run it as root on Linux with cgroup v2 and iproute2 (e.g. `sudo -E cargo xtask demo`)");
        return ExitCode::FAILURE;
    }
    if let Err(e) = heddle_tests::teardown::on_interrupt(&TEARDOWN, "demo") {
        eprintln!("demo: cannot install signal handling: {e}");
        return ExitCode::FAILURE;
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("demo: some steps did not behave as expected (marked UNEXPECTED above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo failed: {e:?}");
            ExitCode::FAILURE
        }
    }
}

/// Blocks SIGINT and SIGTERM in every thread (children get a clean mask from
/// std) and tears the test bed down from a dedicated thread when one comes.
/// What a step should do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Delivered with this security; captured outbound / inbound or not.
    Delivered { security: Option<Security>, outbound: bool, inbound: bool },
    /// Refused by the destination's agent (inbound mode STRICT).
    Refused,
}

/// One kind of traffic.
struct Step {
    from: Pod,
    label: String,
    to: SocketAddr,
    /// The pod the traffic ends up at (for inbound matching).
    target: Pod,
    expect: Expect,
    /// Capture node-a's link during this step.
    capture: bool,
    /// The policy the destination agent must name as deciding, if any.
    policy: Option<&'static str>,
}

/// The cluster of the demo.
struct Demo {
    tb: Testbed,
    node_a: Node,
    agents: Vec<Agent>,
    steps: Vec<Step>,
    /// Run after the policy is applied.
    policy_steps: Vec<Step>,
    /// The policy applied before `policy_steps`.
    policy: String,
    /// Whether tcpdump is installed (the wire captures need it).
    tcpdump: bool,
    _servers: Vec<heddle_tests::Process>,
}

fn build() -> Result<Demo> {
    let tb = Testbed::new("demo")?;
    *TEARDOWN.lock().unwrap_or_else(PoisonError::into_inner) = Some(tb.teardown_handle());
    let a = tb.add_node("node-a")?;
    let b = tb.add_node("node-b")?;
    let web = tb.add_pod(&a, PodSpec::new("web-client").enrolled(true))?;
    let legacy = tb.add_pod(&a, PodSpec::new("legacy"))?;
    let api = tb.add_pod(&b, PodSpec::new("api").enrolled(true).inbound_mode(InboundMode::Strict))?;
    let db = tb.add_pod(&b, PodSpec::new("db"))?;
    tb.add_service(ServiceSpec::new("api", API_VIP).port(80, 8080))?;
    let servers = vec![api.start_echo(8080)?, api.start_echo(9090)?, db.start_echo(5432)?];
    println!("Starting the mesh CA on node-a, then agents on node-a and node-b (mTLS on)…");
    tb.start_ca(&a, CaOptions::default())?;
    let agents = tb.start_agents(&[&a, &b])?;
    agents[0].wait_certificates(&[web.spiffe_id()], CERT_WAIT)?;
    agents[1].wait_certificates(&[api.spiffe_id()], CERT_WAIT)?;
    let vip = SocketAddr::V4(SocketAddrV4::new(API_VIP, 80));
    let step = |from: &Pod, label: &str, to: SocketAddr, target: &Pod, expect, capture| Step {
        from: from.clone(),
        label: label.to_owned(),
        to,
        target: target.clone(),
        expect,
        capture,
        policy: None,
    };
    let delivered = |security, outbound, inbound| Expect::Delivered { security, outbound, inbound };
    let mtls = Some(Security::MutualTls);
    let steps = vec![
        step(&web, "web-client -> api (pod IP)", api.addr(8080), &api, delivered(mtls, true, true), true),
        step(&web, "web-client -> api (service VIP)", vip, &api, delivered(mtls, true, true), false),
        step(&web, "web-client -> db", db.addr(5432), &db, delivered(Some(Security::Plaintext), true, false), true),
        step(&legacy, "legacy -> api (STRICT)", api.addr(8080), &api, Expect::Refused, false),
        step(&legacy, "legacy -> db", db.addr(5432), &db, delivered(None, false, false), false),
    ];
    let (policy_steps, policy) = policy_phase(&web, &api);
    Ok(Demo {
        tb,
        node_a: a,
        agents,
        steps,
        policy_steps,
        policy,
        tcpdump: find_tool(TCPDUMP).is_some(),
        _servers: servers,
    })
}

/// The policy the demo applies (ALLOW to `api`, port 8080, only from
/// `web-client`'s identity) and the two steps run under it.
fn policy_phase(web: &Pod, api: &Pod) -> (Vec<Step>, String) {
    let step = |from: &Pod, label: &str, port: u16, expect| Step {
        from: from.clone(),
        label: label.to_owned(),
        to: api.addr(port),
        target: api.clone(),
        expect,
        capture: false,
        policy: Some(API_POLICY),
    };
    let steps = vec![
        step(
            web,
            "web-client -> api:8080 (policy)",
            8080,
            Expect::Delivered { security: Some(Security::MutualTls), outbound: true, inbound: true },
        ),
        step(web, "web-client -> api:9090 (policy)", 9090, Expect::Refused),
    ];
    let principal = web.spiffe_id().trim_start_matches("spiffe://").to_owned();
    let policy = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: api-allow-web, namespace: demo}}\n\
         spec:\n  selector: {{matchLabels: {{app: api}}}}\n  action: ALLOW\n  rules:\n  \
         - from: [{{source: {{principals: [\"{principal}\"]}}}}]\n    to: [{{operation: {{ports: [\"8080\"]}}}}]\n"
    );
    (steps, policy)
}

fn run() -> Result<bool> {
    let demo = build()?;
    println!("\nCluster (id {}):", demo.tb.id());
    let config = demo.tb.config();
    for pod in demo.tb.pods() {
        let w = config.workloads.iter().find(|w| w.name == pod.name());
        let enrolled = w.is_some_and(|w| w.enrolled);
        let strict = w.is_some_and(|w| w.inbound_mode == Some(InboundMode::Strict));
        println!(
            "  {:<12} {:<7} {:<11} {:<17} {}",
            pod.name(),
            pod.node_name(),
            pod.ip(),
            match (enrolled, strict) {
                (true, true) => "enrolled, STRICT",
                (true, false) => "enrolled",
                _ => "not enrolled",
            },
            if enrolled { pod.spiffe_id() } else { String::new() }
        );
    }
    if let Some(ca) = demo.tb.ca() {
        println!("  mesh CA on {} at {}", ca.node().name(), ca.addr());
    }
    println!("  service demo/api {API_VIP}:80 -> 8080\n\nTraffic (each payload is {MARKER:?} repeated):");
    if !demo.tcpdump {
        println!(
            "  (tcpdump is not installed, so the wire captures are skipped: install the Debian package `{}`)",
            TCPDUMP.package
        );
    }
    let mut all_as_expected = true;
    for step in &demo.steps {
        all_as_expected &= run_step(&demo, step)?;
    }
    println!(
        "\nAuthorization policy, enforced by the destination's agent (written to {}, then SIGHUP):",
        demo.tb.policies_path().display()
    );
    for line in demo.policy.lines() {
        println!("    {line}");
    }
    let shown = demo.tb.set_policies(&demo.policy)?;
    if let Some(node_b) = shown.get(1) {
        let loaded: Vec<String> =
            node_b.loaded.iter().map(|p| format!("{} ({}, {} rule(s))", p.policy, p.action, p.rules)).collect();
        println!(
            "  node-b's agent loaded: {}; rejected: {}",
            loaded.join(", "),
            if node_b.errors.is_empty() { "none".to_owned() } else { node_b.errors.join("; ") }
        );
    }
    for step in &demo.policy_steps {
        all_as_expected &= run_step(&demo, step)?;
    }
    // L7: a waypoint for namespace shop, a canary, a header match.
    let node_b = demo.tb.nodes().into_iter().nth(1).context("node-b")?;
    let web = demo.steps.first().map(|s| s.from.clone()).context("web-client")?;
    let shop = waypoint::build(&demo.tb, &node_b)?;
    all_as_expected &= waypoint::run(&demo.tb, &shop, &web)?;
    for agent in &demo.agents {
        print_agent(agent)?;
    }
    // What an operator on node-b types: the CLI against its local agent.
    if let Some(agent) = demo.agents.get(1) {
        for args in [&["flows", "--last", "12"][..], &["status"][..]] {
            println!("\n$ heddle {}   (on {})", args.join(" "), agent.node().name());
            print!("{}", heddle_cli(agent, args)?);
        }
    }
    Ok(all_as_expected)
}

/// Runs the `heddle` CLI (next to the agent binary) on `agent`'s node.
fn heddle_cli(agent: &Agent, args: &[&str]) -> Result<String> {
    let mut cmd = std::process::Command::new(heddle_tests::heddle_binary()?);
    cmd.args(args);
    let out = agent.node().run(cmd)?;
    if !out.status.success() {
        anyhow::bail!("heddle {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the agents recorded about one step.
#[derive(Default)]
struct Seen {
    outbound_by: Vec<String>,
    inbound_by: Vec<String>,
    refused_by: Vec<String>,
    security: Option<Security>,
    identities: Option<String>,
    /// The deciding policy the destination agent recorded, with the rule.
    policy: Option<String>,
}

impl Seen {
    fn of(demo: &Demo, step: &Step, new_flows: &[Vec<Flow>]) -> Self {
        let mut seen = Self::default();
        for (agent, flows) in demo.agents.iter().zip(new_flows) {
            let node = agent.node().name().to_owned();
            if let Some(f) =
                flows.iter().find(|f| f.direction == Direction::Outbound && f.workload == step.from.qualified_name())
            {
                seen.outbound_by.push(node.clone());
                seen.security = Some(f.security);
                if f.is_mutual_tls() {
                    seen.identities = Some(format!(
                        "{} -> {}",
                        f.src_identity.as_deref().unwrap_or("?"),
                        f.dst_identity.as_deref().unwrap_or("?")
                    ));
                }
            }
            for f in flows.iter().filter(|f| {
                f.direction == Direction::Inbound
                    && f.workload == step.target.qualified_name()
                    && f.src_ip() == Some(step.from.ip().into())
            }) {
                if let Some(p) = &f.policy {
                    seen.policy = Some(match f.policy_rule {
                        Some(rule) => format!("{p} rule {rule}"),
                        None => p.clone(),
                    });
                }
                if f.event == FlowEvent::Error {
                    seen.refused_by.push(format!("{node} ({})", f.error.as_deref().unwrap_or("?")));
                    continue;
                }
                seen.inbound_by.push(node.clone());
                seen.security = seen.security.or(Some(f.security));
                if let Some(serial) = &f.peer_cert_serial {
                    let ids = seen.identities.get_or_insert_with(|| {
                        format!(
                            "{} -> {}",
                            f.src_identity.as_deref().unwrap_or("?"),
                            f.dst_identity.as_deref().unwrap_or("?")
                        )
                    });
                    let _ = write!(ids, " (client certificate serial {serial})");
                }
            }
        }
        seen
    }

    fn captured(&self) -> String {
        match (self.outbound_by.is_empty(), self.inbound_by.is_empty()) {
            (true, true) => "not captured".to_owned(),
            (false, true) => format!("captured outbound by {}", self.outbound_by.join(",")),
            (true, false) => format!("captured inbound by {}", self.inbound_by.join(",")),
            (false, false) => {
                format!("captured outbound by {}, inbound by {}", self.outbound_by.join(","), self.inbound_by.join(","))
            }
        }
    }
}

/// Sends one step's traffic and says what happened to it.
fn run_step(demo: &Demo, step: &Step) -> Result<bool> {
    let before: Vec<u64> =
        demo.agents.iter().map(|a| Ok(a.flows()?.last().map_or(0, |f| f.id))).collect::<Result<_>>()?;
    let capture = if step.capture && demo.tcpdump { Some(demo.tb.capture_link(&demo.node_a, "tcp")?) } else { None };
    let summary = step.from.run_client(&ClientSpec::to(step.to).bytes(4096).pattern(MARKER))?;
    let wire = capture.map(heddle_tests::WireCapture::stop).transpose()?;
    let new_flows = settle(&demo.agents, &before)?;
    let seen = Seen::of(demo, step, &new_flows);
    let delivered = summary.all_ok();
    let policy_as_expected = step.policy.is_none_or(|p| seen.policy.as_deref().is_some_and(|s| s.starts_with(p)));
    let as_expected = policy_as_expected
        && match step.expect {
            Expect::Delivered { security, outbound, inbound } => {
                delivered
                    && seen.outbound_by.is_empty() != outbound
                    && seen.inbound_by.is_empty() != inbound
                    && seen.security == security
            }
            Expect::Refused => !delivered && !seen.refused_by.is_empty(),
        };
    let (outcome, how) = if delivered {
        let how = match seen.security {
            Some(Security::MutualTls) => "mTLS",
            Some(Security::Plaintext) => "plaintext",
            None => "direct",
        };
        ("delivered", how)
    } else if seen.refused_by.is_empty() {
        ("FAILED", "")
    } else {
        ("REFUSED", "")
    };
    let detail =
        if seen.refused_by.is_empty() { seen.captured() } else { format!("reset by {}", seen.refused_by.join(", ")) };
    println!(
        "  {:<32} {:<18} {:<9} {:<10} {}{}",
        step.label,
        step.to,
        outcome,
        how,
        detail,
        if as_expected { "" } else { "   <-- UNEXPECTED" }
    );
    if let Some(ids) = &seen.identities {
        println!("      identities: {ids}");
    }
    if step.policy.is_some() {
        let decided = seen.policy.as_deref().unwrap_or("no policy recorded");
        let verdict = if delivered { "allowed" } else { "denied" };
        println!("      {verdict} by node-b's agent, deciding policy: {decided}");
    }
    if let Some(wire) = wire {
        let port = if seen.security == Some(Security::MutualTls) { TUNNEL_PORT } else { step.to.port() };
        println!("      on the wire (node-a's link): {}", wire.describe(port, MARKER));
    }
    if !delivered && step.expect != Expect::Refused {
        println!("      client: {summary}");
    }
    Ok(as_expected)
}

/// Waits until no agent records anything new for a moment, and returns each
/// agent's finished flows newer than `before`.
fn settle(agents: &[Agent], before: &[u64]) -> Result<Vec<Vec<Flow>>> {
    let snapshot = || -> Result<Vec<Vec<Flow>>> {
        agents
            .iter()
            .zip(before)
            .map(|(a, b)| Ok(a.flows()?.into_iter().filter(|f| f.id > *b && f.is_terminal()).collect()))
            .collect()
    };
    let mut last = snapshot()?;
    let counts = |s: &[Vec<Flow>]| s.iter().map(Vec::len).collect::<Vec<_>>();
    for round in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        let now = snapshot()?;
        // Stable, and either something arrived or long enough that nothing will.
        if counts(&now) == counts(&last) && (now.iter().any(|f| !f.is_empty()) || round >= 3) {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

fn print_agent(agent: &Agent) -> Result<()> {
    let node = agent.node().name();
    println!("\n==================== agent on {node} ====================");
    let flows = agent.flows().with_context(|| format!("flows of {node}"))?;
    let table = flow_table(&flows);
    println!("\nCaptured connections:");
    if table.is_empty() {
        println!("  (none)");
    } else {
        print!("{table}");
    }
    let ids = identity_table(&flows);
    if !ids.is_empty() {
        println!("\nTunnelled connections (mTLS identities):");
        print!("{ids}");
    }
    let certs = agent.certs()?;
    println!("\nCertificates ({} pooled tunnel connections):", certs.pooled_tunnels.unwrap_or(0));
    print!("{}", cert_table(&certs));
    println!("\nWorkloads:");
    print!("{}", workload_table(&agent.workloads()?));
    let (reasons, maps) = datapath_tables(&agent.datapath()?);
    println!("\nDatapath decisions:");
    print!("{reasons}");
    println!("\nDatapath maps:");
    print!("{maps}");
    Ok(())
}
