//! `demo`: Heddle on a two-node, four-pod cluster, explained.
//!
//! Builds (with the test bed library) node-a with `web-client` (enrolled) and
//! `legacy` (not enrolled), node-b with `api` (enrolled, echo on 8080) and
//! `db` (not enrolled, echo on 5432), and the service `demo/api` at
//! 10.96.0.20:80 -> 8080; starts both agents, sends five kinds of traffic
//! and prints, per step, whether it was delivered and which agent captured
//! it, then each agent's flows, workload counters and datapath counters.
//!
//! Everything is removed at the end, on error, on panic (the test bed's
//! `Drop`) and on Ctrl-C/SIGTERM (a signal thread tears the test bed down
//! and exits). `cargo xtask demo` runs it with `HEDDLE_AGENT_BIN` set.
//! Exits 1 if the environment cannot run it or if a step did not behave as
//! expected.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::ExitCode;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use heddle_tests::report::{datapath_tables, flow_table, workload_table};
use heddle_tests::{
    check_environment, Agent, ClientSpec, Direction, Flow, Pod, PodSpec, ServiceSpec,
    TeardownHandle, Testbed,
};

/// The `demo/api` service's VIP.
const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

/// The test bed to tear down if a signal arrives.
static TEARDOWN: Mutex<Option<TeardownHandle>> = Mutex::new(None);

fn main() -> ExitCode {
    if let Err(e) = check_environment() {
        eprintln!("demo: cannot run here: {e}");
        eprintln!("demo: run it as root on Linux with cgroup v2 and iproute2 (e.g. `sudo -E cargo xtask demo`)");
        return ExitCode::FAILURE;
    }
    if let Err(e) = handle_signals() {
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
fn handle_signals() -> std::io::Result<()> {
    // SAFETY: plain libc signal-set calls on a zeroed, then initialised set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised; sigwait writes the signal number.
        unsafe { libc::sigwait(&raw const set, &raw mut sig) };
        eprintln!("\ndemo: interrupted, cleaning up…");
        if let Some(handle) = TEARDOWN
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            handle.teardown();
        }
        std::process::exit(130);
    });
    Ok(())
}

/// One kind of traffic.
struct Step {
    from: Pod,
    label: String,
    to: SocketAddr,
    /// The pod the traffic ends up at (for inbound matching).
    target: Pod,
    expect_outbound: bool,
    expect_inbound: bool,
}

/// The cluster of the demo.
struct Demo {
    tb: Testbed,
    agents: Vec<Agent>,
    steps: Vec<Step>,
    _servers: Vec<heddle_tests::Process>,
}

fn build() -> Result<Demo> {
    let tb = Testbed::new("demo")?;
    *TEARDOWN.lock().unwrap_or_else(PoisonError::into_inner) = Some(tb.teardown_handle());
    let a = tb.add_node("node-a")?;
    let b = tb.add_node("node-b")?;
    let web = tb.add_pod(&a, PodSpec::new("web-client").enrolled(true))?;
    let legacy = tb.add_pod(&a, PodSpec::new("legacy"))?;
    let api = tb.add_pod(&b, PodSpec::new("api").enrolled(true))?;
    let db = tb.add_pod(&b, PodSpec::new("db"))?;
    tb.add_service(ServiceSpec::new("api", API_VIP).port(80, 8080))?;
    let servers = vec![api.start_echo(8080)?, db.start_echo(5432)?];
    println!("Starting agents on node-a and node-b…");
    let agents = tb.start_agents(&[&a, &b])?;
    let vip = SocketAddr::V4(SocketAddrV4::new(API_VIP, 80));
    let step = |from: &Pod, label: &str, to: SocketAddr, target: &Pod, out: bool, inb: bool| Step {
        from: from.clone(),
        label: label.to_owned(),
        to,
        target: target.clone(),
        expect_outbound: out,
        expect_inbound: inb,
    };
    let steps = vec![
        step(
            &web,
            "web-client -> api (pod IP)",
            api.addr(8080),
            &api,
            true,
            true,
        ),
        step(
            &web,
            "web-client -> api (service VIP)",
            vip,
            &api,
            true,
            true,
        ),
        step(&web, "web-client -> db", db.addr(5432), &db, true, false),
        step(&legacy, "legacy -> api", api.addr(8080), &api, false, true),
        step(&legacy, "legacy -> db", db.addr(5432), &db, false, false),
    ];
    Ok(Demo {
        tb,
        agents,
        steps,
        _servers: servers,
    })
}

fn run() -> Result<bool> {
    let demo = build()?;
    println!("\nCluster (id {}):", demo.tb.id());
    for pod in demo.tb.pods() {
        let enrolled = demo
            .tb
            .config()
            .workloads
            .iter()
            .any(|w| w.name == pod.name() && w.enrolled);
        println!(
            "  {:<12} {:<7} {:<11} {}",
            pod.name(),
            pod.node_name(),
            pod.ip(),
            if enrolled { "enrolled" } else { "not enrolled" }
        );
    }
    println!("  service demo/api {API_VIP}:80 -> 8080\n\nTraffic:");
    let mut all_as_expected = true;
    for step in &demo.steps {
        all_as_expected &= run_step(&demo, step)?;
    }
    for agent in &demo.agents {
        print_agent(agent)?;
    }
    Ok(all_as_expected)
}

/// Sends one step's traffic and says who captured it.
fn run_step(demo: &Demo, step: &Step) -> Result<bool> {
    let before: Vec<u64> = demo
        .agents
        .iter()
        .map(|a| Ok(a.flows()?.last().map_or(0, |f| f.id)))
        .collect::<Result<_>>()?;
    let summary = step.from.run_client(&ClientSpec::to(step.to).bytes(4096))?;
    let new_flows = settle(&demo.agents, &before)?;
    let mut outbound_by = Vec::new();
    let mut inbound_by = Vec::new();
    for (agent, flows) in demo.agents.iter().zip(&new_flows) {
        let node = agent.node().name();
        if flows
            .iter()
            .any(|f| f.direction == Direction::Outbound && f.workload == step.from.qualified_name())
        {
            outbound_by.push(node.to_owned());
        }
        if flows.iter().any(|f| {
            f.direction == Direction::Inbound
                && f.workload == step.target.qualified_name()
                && f.src_ip() == Some(step.from.ip().into())
        }) {
            inbound_by.push(node.to_owned());
        }
    }
    let delivered = summary.all_ok();
    let captured = match (outbound_by.is_empty(), inbound_by.is_empty()) {
        (true, true) => "not captured".to_owned(),
        (false, true) => format!("captured outbound by {}", outbound_by.join(",")),
        (true, false) => format!("captured inbound by {}", inbound_by.join(",")),
        (false, false) => format!(
            "captured outbound by {}, inbound by {}",
            outbound_by.join(","),
            inbound_by.join(",")
        ),
    };
    let as_expected = delivered
        && outbound_by.is_empty() != step.expect_outbound
        && inbound_by.is_empty() != step.expect_inbound;
    println!(
        "  {:<34} {:<22} {:<10} {}{}",
        step.label,
        step.to,
        if delivered { "delivered" } else { "FAILED" },
        captured,
        if as_expected { "" } else { "   <-- UNEXPECTED" }
    );
    if !delivered {
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
            .map(|(a, b)| {
                Ok(a.flows()?
                    .into_iter()
                    .filter(|f| f.id > *b && f.is_terminal())
                    .collect())
            })
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
    println!("\nWorkloads:");
    print!("{}", workload_table(&agent.workloads()?));
    let (reasons, maps) = datapath_tables(&agent.datapath()?);
    println!("\nDatapath decisions:");
    print!("{reasons}");
    println!("\nDatapath maps:");
    print!("{maps}");
    Ok(())
}
