//! End-to-end tests of the observability issue's remaining parts, against
//! real agents in the network-namespace test bed:
//! - TCP health: over a link with 20 ms added each way (a userspace delay
//!   line, [`heddle_tests::delay_line`], because the kernel may lack
//!   `sch_netem`), tunnelled flows report an RTT near 40 ms and count the
//!   retransmits the line's drops cause; the RTT, connect and TLS handshake
//!   histograms have observations in `/metrics`.
//! - A stalled flow stream subscriber does not slow traffic; the agent
//!   drops its records, counts them (`/stats`, metrics) and tells it.
//! - The JSON access log: off by default, one line per ended connection
//!   with `--access-log`.
//! - `heddle flows` shows the TCP health in each output format.
//!
//! Needs root; skipped visibly (or fails under `CI=true`) where it cannot
//! run. Run with `cargo test -p heddle-tests --test observability` after
//! building the binaries (`cargo build -p mesh-agent -p heddle-tests --bins`).

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::scrape::{sample, value};
use common::{expect_delivered, heddle, run_e2e, wait_finished, Cluster, Options, ECHO_PORT, WAIT};
use heddle_tests::{poll_until, Agent, Check, ClientSpec, DelaySpec, Direction, Flow, FlowEvent, FlowStreamClient};
use prometheus_parse::{Scrape, Value};

/// Added to every frame on node-b's link, each way.
const ONE_WAY: Duration = Duration::from_millis(20);
/// The RTT that delay makes (the test bed's own RTT is tens of µs).
const EXPECTED_RTT_US: u32 = 40_000;

#[test]
fn tunnelled_flows_report_the_rtt_and_retransmits_of_a_delayed_lossy_link() {
    run_e2e("obs-rtt", Options::mtls(), |c| {
        let line = c.tb.delay_link(&c.node_b, DelaySpec { one_way: ONE_WAY, drop_every: Some(12) })?;
        let to = c.server.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(to).bytes(300_000).conns(3))?;
        let out = wait_finished(&c.agent_a, Direction::Outbound, "demo/client", to, 3)?;
        let inb = wait_finished(&c.agent_b, Direction::Inbound, "demo/server", to, 3)?;
        let (forwarded, dropped) = line.counters();
        eprintln!("delay line: {forwarded} frames forwarded, {dropped} dropped");
        ensure!(dropped > 0, "the delay line dropped nothing");
        let mut retransmits = 0;
        for f in out.iter().chain(&inb) {
            ensure!(f.event == FlowEvent::Close && f.is_mutual_tls(), "{f}");
            let rtt = f.rtt_us.with_context(|| format!("no rtt_us: {f}"))?;
            eprintln!(
                "{:?} conn {:?}: rtt {rtt} µs, retransmits {:?}, connect {:?} ms",
                f.direction, f.conn, f.retransmits, f.connect_ms
            );
            ensure!(
                (EXPECTED_RTT_US * 9 / 10..=EXPECTED_RTT_US * 2).contains(&rtt),
                "rtt {rtt} µs is not near {EXPECTED_RTT_US} µs: {f}"
            );
            retransmits += f.retransmits.with_context(|| format!("no retransmits: {f}"))?;
        }
        ensure!(retransmits > 0, "no retransmits reported although the line dropped {dropped} frames");
        // Open records carry the RTT known at open (the tunnel's).
        let opens: Vec<Flow> =
            c.agent_a.flows()?.into_iter().filter(|f| f.event == FlowEvent::Open && f.orig_dst == Some(to)).collect();
        ensure!(opens.iter().all(|f| f.rtt_us.is_some_and(|r| r > 0)), "open records without an RTT: {opens:?}");
        expect_histograms(&c.agent_a, "source", "client", 3, Some(ONE_WAY * 2))?;
        expect_histograms(&c.agent_b, "destination", "server", 3, Some(ONE_WAY * 2))?;
        drop(line);
        Ok(())
    });
}

/// Observations of `heddle_tcp_rtt_seconds` and
/// `heddle_tcp_connect_duration_seconds` for `reporter`, at least `conns`;
/// with `rtt_at_least`, none of the RTTs below 90 % of it; and at least one
/// TLS handshake on the agent's side of the tunnel.
fn expect_histograms(
    agent: &Agent,
    reporter: &str,
    side_workload: &str,
    conns: u32,
    rtt_at_least: Option<Duration>,
) -> Result<()> {
    let scrape = agent.metrics()?;
    let node = agent.node().name();
    let workload_label = if reporter == "source" { "source_workload" } else { "destination_workload" };
    for metric in ["heddle_tcp_rtt_seconds", "heddle_tcp_connect_duration_seconds"] {
        let buckets = histogram(&scrape, metric, &[("reporter", reporter), (workload_label, side_workload)])?;
        let total = buckets.last().map_or(0.0, |b| b.1);
        ensure!(total >= f64::from(conns), "{node}: {metric} observed {total}, expected at least {conns}");
        if let (Some(rtt), "heddle_tcp_rtt_seconds") = (rtt_at_least, metric) {
            let floor = rtt.as_secs_f64() * 0.9;
            let below = buckets.iter().filter(|(le, _)| *le < floor).map(|b| b.1).fold(0.0, f64::max);
            ensure!(below == 0.0, "{node}: {below} RTTs below {floor} s: {buckets:?}");
        }
    }
    let side = if reporter == "source" { "client" } else { "server" };
    let handshakes = histogram(&scrape, "heddle_tls_handshake_duration_seconds", &[("side", side)])?;
    ensure!(handshakes.last().is_some_and(|b| b.1 >= 1.0), "{node}: no {side} TLS handshake observed: {handshakes:?}");
    Ok(())
}

/// The cumulative buckets `(le, count)` of the one histogram series of
/// `metric` whose labels include `labels`.
fn histogram(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Result<Vec<(f64, f64)>> {
    let one = sample(scrape, metric, labels)?;
    match &one.value {
        Value::Histogram(b) => Ok(b.iter().map(|b| (b.less_than, b.count)).collect()),
        other => anyhow::bail!("{metric} is not a histogram: {other:?}"),
    }
}

/// Connections per traffic round in the stalled-subscriber test.
const ROUND: usize = 1000;

#[test]
fn a_stalled_flow_subscriber_loses_records_but_does_not_slow_traffic() {
    run_e2e("obs-stall", Options::default(), |c| {
        let to = c.server.addr(ECHO_PORT);
        let spec = ClientSpec::to(to).bytes(100).conns(ROUND).parallel(4);
        expect_delivered(&c.client, &spec)?; // warm up
        let started = Instant::now();
        expect_delivered(&c.client, &spec)?;
        let baseline = started.elapsed();

        // A subscriber with a 16-record queue and a 4 KiB socket buffer
        // that never reads.
        let mut stalled = FlowStreamClient::open(c.agent_a.node(), "follow=true&last=0&queue=16", 4096)?;
        poll_until("the agent to list the subscriber", WAIT, Duration::from_millis(100), || {
            let stats = c.agent_a.stats()?;
            Ok(if stats.flow_subscribers.len() == 1 {
                Check::Ready(())
            } else {
                Check::Pending(format!("{:?}", stats.flow_subscribers))
            })
        })?;
        let started = Instant::now();
        expect_delivered(&c.client, &spec)?;
        let stalled_time = started.elapsed();
        eprintln!("{ROUND} connections: {baseline:?} without a subscriber, {stalled_time:?} with a stalled one");
        ensure!(
            stalled_time <= baseline * 2 + Duration::from_secs(1),
            "traffic slowed down by a stalled subscriber: {stalled_time:?} vs {baseline:?}"
        );
        let stats = poll_until("the stalled subscriber to lose records", WAIT, Duration::from_millis(100), || {
            let stats = c.agent_a.stats()?;
            let lost = stats.flow_subscribers.first().map_or(0, |s| s.lost);
            Ok(if stats.active_connections == 0 && lost > 0 {
                Check::Ready(stats)
            } else {
                Check::Pending(format!("{stats:?}"))
            })
        })?;
        eprintln!("stats: {stats:?}");
        let sub = stats.flow_subscribers.first().context("subscriber gone")?;
        ensure!(stats.flow_subscriber_dropped >= sub.lost, "total below the subscriber's losses: {stats:?}");
        let scrape = c.agent_a.metrics()?;
        let dropped = value(&scrape, "heddle_flow_subscriber_dropped_total", &[])?;
        ensure!(dropped >= 1.0, "heddle_flow_subscriber_dropped_total is {dropped}");

        // Reading now, the subscriber is told how many it lost.
        let text = stalled.read_until("\"lost\":", WAIT)?;
        ensure!(
            text.contains("\"lost\":") && text.contains("\"event\""),
            "no loss notice in the stream: {}",
            &text[..text.len().min(2000)]
        );
        // `heddle status` shows the losses.
        let (code, out, err) = heddle(&c.agent_a, &["status"])?;
        ensure!(code == 0, "heddle status: {err}");
        ensure!(out.contains("records lost by slow subscribers"), "{out}");
        Ok(())
    });
}

#[test]
fn the_access_log_is_off_by_default_and_one_json_line_per_connection_when_on() {
    run_e2e("obs-access", Options::mtls(), |c| {
        let to = c.server.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(to).conns(2))?;
        wait_finished(&c.agent_a, Direction::Outbound, "demo/client", to, 2)?;
        let log = std::fs::read_to_string(c.agent_a.log_path())?;
        ensure!(!log.lines().any(|l| l.contains("\"event\":\"close\"")), "access lines without --access-log:\n{log}");

        let path = c.tb.temp_dir().join("access-node-a.jsonl");
        c.tb.set_agent_args(&["--access-log", path.to_str().context("utf-8 path")?]);
        c.agent_a.restart()?;
        c.wait_certificates()?;
        let before = c.agent_a.flows()?.len();
        expect_delivered(&c.client, &ClientSpec::to(to).bytes(5000).conns(3))?;
        c.agent_a.wait_for_flows("3 new closes", WAIT, |f| {
            f.len() >= before + 6
                && f.iter().filter(|f| f.event == FlowEvent::Close && f.orig_dst == Some(to)).count() >= 3
        })?;
        // The access log is written by its own thread: wait for the lines.
        let text = heddle_tests::poll_until("3 access-log lines", WAIT, std::time::Duration::from_millis(50), || {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            Ok(if text.lines().count() >= 3 {
                heddle_tests::Check::Ready(text)
            } else {
                heddle_tests::Check::Pending(text)
            })
        })?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| format!("access log is not JSON Lines:\n{text}"))?;
        ensure!(lines.len() == 3, "3 connections, {} lines:\n{text}", lines.len());
        for l in &lines {
            ensure!(
                l["event"] == "close"
                    && l["verdict"] == "forwarded"
                    && l["src_identity"] == c.client.spiffe_id().as_str()
                    && l["dst_identity"] == c.server.spiffe_id().as_str()
                    && l["bytes_sent"] == 5000
                    && l["bytes_received"] == 5000
                    && l["rtt_us"].as_u64().is_some_and(|r| r > 0),
                "access line: {l}"
            );
        }
        expect_histograms(&c.agent_a, "source", "client", 3, None)?;
        expect_histograms(&c.agent_b, "destination", "server", 5, None)?;
        expect_cli_shows_tcp_health(c)?;
        Ok(())
    });
}

/// `heddle flows` shows `rtt_us`/`retransmits` in JSON and JSON Lines and
/// the RTT column in the table.
fn expect_cli_shows_tcp_health(c: &Cluster) -> Result<()> {
    let (code, out, err) = heddle(&c.agent_a, &["flows", "--pod", "client", "-o", "jsonl"])?;
    ensure!(code == 0, "heddle flows: {err}");
    let closes: Vec<serde_json::Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<serde_json::Value>, _>>()?
        .into_iter()
        .filter(|r| r["event"] == "close")
        .collect();
    ensure!(
        !closes.is_empty() && closes.iter().all(|r| r["rtt_us"].is_u64() && r["retransmits"].is_u64()),
        "jsonl without TCP health: {out}"
    );
    let (code, out, _) = heddle(&c.agent_a, &["flows", "--pod", "client", "-o", "json"])?;
    let all: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        code == 0 && all.as_array().is_some_and(|a| a.iter().any(|r| r["rtt_us"].is_u64())),
        "json without rtt_us: {out}"
    );
    let (code, out, _) = heddle(&c.agent_a, &["flows", "--pod", "client", "--last", "4"])?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(code == 0 && lines.len() == 5, "header + 4 rows: {out}");
    ensure!(lines[0].contains("RTT") && lines[0].contains("RTX"), "table header: {out}");
    ensure!(lines.iter().all(|l| l.chars().count() <= 120), "table wider than 120 columns: {out}");
    ensure!(lines[1..].iter().all(|l| l.contains("µs") || l.contains("ms")), "rows without a humanised RTT: {out}");
    Ok(())
}
