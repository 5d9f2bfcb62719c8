//! End-to-end test of the Prometheus endpoint (port 15020): real agents with
//! a real mesh CA, real pods, known traffic, then each agent's `/metrics`
//! parsed by a Prometheus text-format parser (`prometheus-parse`) and the
//! series an operator's dashboard reads asserted by name, labels and value.
//! Needs root; skipped visibly (or fails under `CI=true`) where it cannot
//! run.
//!
//! Run with `cargo test -p heddle-tests --test metrics` after building the
//! agent (`cargo xtask build`), as root.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use common::scrape::{number, sample, value};
use common::{expect_delivered, run_e2e, wait_finished, Cluster, Options, ECHO_PORT};
use heddle_tests::admin::maps;
use heddle_tests::{Agent, ClientSpec, Direction};
use prometheus_parse::{Sample, Scrape, Value};

/// Connections of the known traffic.
const CONNS: u32 = 5;
/// Bytes each way per connection.
const BYTES: u32 = 10_000;
/// A port nothing listens on.
const CLOSED_PORT: u16 = 9999;

#[test]
fn metrics_count_known_mutual_tls_traffic_on_both_reporters_with_istio_labels() {
    run_e2e("metrics", Options::mtls(), |c| {
        let to = c.server.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(to).bytes(BYTES as usize).conns(CONNS as usize))?;
        let refused = c.server.addr(CLOSED_PORT);
        let summary = c.client.run_client(&ClientSpec::to(refused))?;
        ensure!(summary.failed == 1, "closed port: {summary}");
        wait_finished(&c.agent_a, Direction::Outbound, "demo/client", to, CONNS as usize)?;
        wait_finished(&c.agent_b, Direction::Inbound, "demo/server", to, CONNS as usize)?;
        wait_finished(&c.agent_a, Direction::Outbound, "demo/client", refused, 1)?;
        wait_finished(&c.agent_b, Direction::Inbound, "demo/server", refused, 1)?;

        for (agent, reporter) in [(&c.agent_a, "source"), (&c.agent_b, "destination")] {
            let scrape = agent.metrics()?;
            expect_connection_series(c, &scrape, reporter)?;
            expect_internals(agent, &scrape)?;
        }
        let decisions = c.agent_b.metrics()?;
        let allowed = value(&decisions, "heddle_policy_decisions_total", &[("policy", "none"), ("verdict", "allow")])?;
        ensure!(
            allowed >= f64::from(CONNS),
            "destination agent counted {allowed} allow decisions for {CONNS} connections"
        );
        let (code, body) = c.agent_a.metrics_get("/healthz")?;
        ensure!(code == 200, "/healthz on 15020: {code} {body}");
        Ok(())
    });
}

/// The `heddle_tcp_*` series of the known traffic as `reporter` saw it.
fn expect_connection_series(c: &Cluster, scrape: &Scrape, reporter: &str) -> Result<()> {
    let (client_id, server_id) = (c.client.spiffe_id(), c.server.spiffe_id());
    let conn = [
        ("reporter", reporter),
        ("source_workload", "client"),
        ("source_workload_namespace", "demo"),
        ("source_principal", client_id.as_str()),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "demo"),
        ("destination_principal", server_id.as_str()),
        ("destination_service", "unknown"),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ];
    for metric in ["heddle_tcp_connections_opened_total", "heddle_tcp_connections_closed_total"] {
        let v = value(scrape, metric, &conn)?;
        ensure!(is(v, CONNS), "{reporter}: {metric} is {v}, expected {CONNS}");
    }
    for metric in ["heddle_tcp_received_bytes_total", "heddle_tcp_sent_bytes_total"] {
        // The echo server returns every byte: each direction carries them all.
        let v = value(scrape, metric, &conn)?;
        ensure!(is(v, CONNS * BYTES), "{reporter}: {metric} is {v}, expected {}", CONNS * BYTES);
    }
    let duration = sample(scrape, "heddle_tcp_connection_duration_seconds", &conn[..3])?;
    let observed = match &duration.value {
        Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
        other => anyhow::bail!("{reporter}: duration is not a histogram: {other:?}"),
    };
    ensure!(is(observed, CONNS), "{reporter}: duration histogram observed {observed} connections, expected {CONNS}");
    let failed = value(
        scrape,
        "heddle_tcp_connections_failed_total",
        &[("reporter", reporter), ("destination_workload", "server"), ("response_flags", "CONNECT_FAILED")],
    )?;
    ensure!(is(failed, 1), "{reporter}: {failed} CONNECT_FAILED connections, expected 1 (the closed port)");
    Ok(())
}

/// Agent internals: map capacity as `/datapath` reports it, certificates
/// valid into the future, no connection left open.
fn expect_internals(agent: &Agent, scrape: &Scrape) -> Result<()> {
    let node = agent.node().name();
    let datapath = agent.datapath()?;
    for map in [maps::PENDING, maps::ORIG_DST, maps::ENROLLED] {
        let want = datapath.maps.get(map).context("map in /datapath")?.capacity;
        let got = value(scrape, "heddle_ebpf_map_capacity", &[("map", map)])?;
        ensure!(
            u32::try_from(want).is_ok_and(|w| w > 0 && is(got, w)),
            "{node}: {map} capacity {got}, /datapath says {want}"
        );
    }
    let enrolled = value(scrape, "heddle_ebpf_map_entries", &[("map", maps::ENROLLED)])?;
    ensure!(enrolled >= 1.0, "{node}: {enrolled} enrolled netns entries");
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let expiries: Vec<&Sample> =
        scrape.samples.iter().filter(|s| s.metric == "heddle_certificate_expiry_timestamp_seconds").collect();
    ensure!(!expiries.is_empty(), "{node}: no certificate expiry series");
    for s in expiries {
        let v = number(&s.value);
        ensure!(v > now + 60.0, "{node}: certificate {:?} expires at {v}, now is {now}", s.labels.get("identity"));
    }
    let active = value(scrape, "heddle_active_connections", &[])?;
    ensure!(is(active, 0), "{node}: {active} connections still active");
    ensure!(
        scrape.samples.iter().any(|s| s.metric == "heddle_datapath_decisions_total"),
        "{node}: no heddle_datapath_decisions_total series"
    );
    Ok(())
}

/// Whether a sample value is the count `n`.
fn is(v: f64, n: u32) -> bool {
    (v - f64::from(n)).abs() < 0.5
}
