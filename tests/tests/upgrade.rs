//! End-to-end test of the zero-downtime agent upgrade (`mesh-agent`'s
//! handover): real agents on two nodes with mTLS, a real load in an
//! enrolled pod, and each agent replaced three times while the load runs.
//!
//! What a user would observe, and what is asserted:
//! * not one new connection fails (500 short connections/s, each echoed
//!   byte-exact) across six upgrades;
//! * not one byte of the 20 long streams is corrupted, and none is reset:
//!   a long stream either goes on (it is served by an agent that is not
//!   being replaced) or is ended cleanly (end of stream) at the drain
//!   deadline of the agent that accepted it, as documented (ARCHITECTURE.md,
//!   "Upgrades");
//! * each replaced agent hands over, drains and exits 0, leaving the
//!   programs to its successor: still one set of links, pinned once.
//!
//! Needs root; skipped visibly (or failing under `CI=true`) elsewhere.

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{environment_ready, expect_delivered, run_e2e, Options, ECHO_PORT};
use heddle_tests::agent::{HANDED_OVER, TOOK_OVER};
use heddle_tests::churn::ChurnReport;
use heddle_tests::{Agent, ClientSpec};

/// Short connections per second.
const RATE: u32 = 500;
/// Long streams.
const STREAMS: u32 = 20;
/// Seconds of load: long enough for six upgrades and their drains, and short
/// enough to stay within what one source address can open to one server
/// port at this rate: with 60 s of `TIME_WAIT` and ~28,000 ephemeral ports a
/// (source, destination) pair sustains ~470 new connections/s, and beyond
/// about 15,000 connections the test bed's path stalls even without any
/// upgrade (see the closing note of the reliability issue).
const SECONDS: u64 = 22;
/// The agents' drain deadline after a handover.
const DRAIN_SECONDS: u64 = 2;
/// Pause between upgrades.
const BETWEEN: Duration = Duration::from_secs(2);

#[test]
fn agents_upgraded_three_times_under_load_fail_no_connection_and_corrupt_no_byte() {
    if !environment_ready() {
        return;
    }
    let options = Options { agent_args: &["--handover-drain-seconds", "2"], ..Options::mtls() };
    run_e2e("upgrade", options, |c| {
        let to = c.server.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(to))?;
        let mut cmd = c.client.pod_app()?;
        cmd.args(["churn", "--to", &to.to_string()]);
        cmd.args(["--rate", &RATE.to_string(), "--streams", &STREAMS.to_string(), "--seconds", &SECONDS.to_string()]);
        let mut load = c.client.spawn(cmd)?;
        let started = Instant::now();
        std::thread::sleep(BETWEEN);
        for round in 1..=3 {
            for agent in [&c.agent_a, &c.agent_b] {
                agent.upgrade().with_context(|| format!("upgrade {round} of the agent on {}", agent.node().name()))?;
                std::thread::sleep(BETWEEN);
            }
        }
        ensure!(started.elapsed() < Duration::from_secs(SECONDS), "the upgrades outlasted the load");
        let status = wait_exit(&mut load, Duration::from_secs(SECONDS + 30))?;
        let out = load.log_text();
        let report: ChurnReport = out
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("no report from pod-app churn")
            .and_then(|l| serde_json::from_str(l).context("parsing the churn report"))
            .with_context(|| format!("pod-app churn ({status}) printed:\n{out}"))?;
        eprintln!("churn report: {}", serde_json::to_string_pretty(&report)?);

        let short = &report.short;
        ensure!(short.failed.total() == 0, "new connections failed during the upgrades: {:?}", short.failed);
        let expected = u64::from(RATE) * SECONDS * 9 / 10;
        ensure!(short.ok >= expected, "only {} short connections succeeded (expected at least {expected})", short.ok);
        let streams = &report.streams;
        ensure!(streams.corrupted_bytes == 0, "{} corrupted bytes on the long streams", streams.corrupted_bytes);
        ensure!(streams.failed.total() == 0, "long streams failed (not a clean end): {:?}", streams.failed);
        ensure!(streams.clean_ends >= 1, "no long stream met a drain deadline: the rule was not exercised");
        ensure!(
            streams.clean_ends + streams.open_at_end == streams.connections,
            "every long-stream connection ends cleanly or lasts the run: {streams:?}"
        );
        ensure!(streams.bytes_verified > 1 << 20, "only {} bytes verified on the long streams", streams.bytes_verified);

        for agent in [&c.agent_a, &c.agent_b] {
            check_handovers(agent)?;
        }
        // The last agents serve on: one more connection, and one set of links.
        expect_delivered(&c.client, &ClientSpec::to(to).conns(3))?;
        for agent in [&c.agent_a, &c.agent_b] {
            let programs = agent.datapath()?.programs;
            let cgroup =
                programs.iter().filter(|p| p["attach"].as_str().is_some_and(|a| a.starts_with("cgroup/"))).count();
            ensure!(cgroup == 3, "{} reports {cgroup} cgroup attachments, not 3: {programs:?}", agent.node().name());
        }
        Ok(())
    });
}

/// Three handovers on `agent`'s node: three successors took over, three
/// incumbents handed over, drained and exited 0.
fn check_handovers(agent: &Agent) -> Result<()> {
    let node = agent.node().name().to_owned();
    let exits = agent.retired_exits(Duration::from_secs(DRAIN_SECONDS + 10))?;
    ensure!(exits.len() == 3, "{node}: {} agents retired, not 3", exits.len());
    ensure!(exits.iter().all(std::process::ExitStatus::success), "{node}: retired agents exited {exits:?}");
    for (what, text) in [("took over", TOOK_OVER), ("handed over", HANDED_OVER)] {
        let n = agent.log_count(text);
        ensure!(n == 3, "{node}: {n} agents {what}, not 3:\n{}", agent.log_tail(60));
    }
    Ok(())
}

fn wait_exit(process: &mut heddle_tests::Process, timeout: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = process.try_wait()? {
            return Ok(status);
        }
        ensure!(Instant::now() < deadline, "pod-app churn still running after {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
