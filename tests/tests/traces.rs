//! End-to-end tests of tracing. At the waypoint: a request through two
//! services (the client calls `api`, whose pod calls `api-v1` forwarding
//! the trace headers, as Bookinfo's services do), both behind the
//! waypoint, exported over OTLP/gRPC to a receiver that decodes the real
//! protobuf (Python's opentelemetry-proto on grpcio).
//!
//! Asserted as a user of a tracing backend sees it: one trace per request
//! with every hop (server and client span per waypoint pass) linked
//! parent to child, continuing the caller's W3C or B3 context; the
//! context and `x-request-id` the last service received; an unsampled
//! request propagated but not recorded; `heddle stat`, `heddle graph` and
//! `heddle top` over the same traffic, gathered from an agent and the waypoint; and
//! spans a collector never got counted as dropped. At L4 (`--trace-l4`): one span per connection on
//! each node, the destination's a child of the source's. Needs root; fails under `CI=true` when it cannot run.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::l7::wait_for;
use common::waypoint_mesh::{run_waypoint, url, Extras, Mesh, OTLP_PORT, V1_VIP};
use heddle_tests::env::asset;
use serde_json::{json, Value};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const SPAN_SERVER: i64 = 2;
const SPAN_CLIENT: i64 = 3;

/// Spans the receiver wrote so far.
fn spans(file: &std::path::Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).context("receiver line")).collect()
}

/// The spans of `trace`, once there are `n`.
fn trace_spans(file: &std::path::Path, trace: &str, n: usize) -> Result<Vec<Value>> {
    wait_for(&format!("{n} spans of trace {trace}"), || {
        let got: Vec<Value> = spans(file)?.into_iter().filter(|s| s["trace_id"] == trace).collect();
        ensure!(got.len() <= n, "more than {n} spans for trace {trace}: {got:#?}");
        Ok((got.len() == n).then_some(got))
    })
}

/// One GET from the client with `headers`: the status and the body (the
/// echo of what `api-v1`'s pod received).
fn get(m: &Mesh, name: &str, path: &str, headers: &Value) -> Result<(u64, Value)> {
    let file = m.tb.temp_dir().join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_vec(&json!([{"method": "GET", "url": url(path), "headers": headers}]))?)?;
    let out = m.httpc(&["cases", &file.display().to_string()])?;
    let first = out.get(0).context("one case")?;
    Ok((first["status"].as_u64().unwrap_or(0), first["body"].clone()))
}

/// Checks the four spans of a request through `api` then `api-v1`:
/// server and client span at each pass, each one's parent the one before.
fn assert_chain(spans: &[Value], root_parent: &str) -> Result<HashMap<&'static str, Value>> {
    let by = |kind: i64, service: &str| {
        spans
            .iter()
            .find(|s| s["kind"] == kind && s["attributes"]["heddle.destination.service"] == service)
            .cloned()
            .with_context(|| format!("no kind {kind} span for {service}: {spans:#?}"))
    };
    let find_client = |server: &Value| {
        spans
            .iter()
            .find(|s| s["kind"] == SPAN_CLIENT && s["parent_span_id"] == server["span_id"])
            .cloned()
            .with_context(|| format!("no client span under {}: {spans:#?}", server["name"]))
    };
    let s1 = by(SPAN_SERVER, "demo/api")?;
    let c1 = find_client(&s1)?;
    let s2 = by(SPAN_SERVER, "demo/api-v1")?;
    let c2 = find_client(&s2)?;
    ensure!(s1["parent_span_id"] == root_parent, "the first server span's parent: {s1}");
    ensure!(s2["parent_span_id"] == c1["span_id"], "api-v1's server span is a child of api's client span: {s2} {c1}");
    for s in [&s1, &c1, &s2, &c2] {
        ensure!(s["service"] == "waypoint.demo", "resource service.name: {s}");
        ensure!(s["attributes"]["http.response.status_code"] == 200, "status attribute: {s}");
        ensure!(s["start"].as_u64() <= s["end"].as_u64(), "start before end: {s}");
    }
    ensure!(s1["name"] == "GET demo/api" && s2["name"] == "GET demo/api-v1", "span names: {s1} {s2}");
    ensure!(c2["attributes"]["heddle.backend"] == "demo/api-v1", "the client span names the backend: {c2}");
    ensure!(
        s1["attributes"]["heddle.source.principal"].as_str().is_some_and(|p| p.ends_with("/sa/client")),
        "the caller's identity: {s1}"
    );
    ensure!(
        s1["start"].as_u64() <= c1["start"].as_u64() && c1["start"].as_u64() <= s2["start"].as_u64(),
        "hops in time order"
    );
    Ok(HashMap::from([("s1", s1), ("c1", c1), ("s2", s2), ("c2", c2)]))
}

#[test]
fn a_request_through_two_services_is_one_trace_with_every_hop_linked_and_stat_and_graph_show_it() {
    run_waypoint("wp_tracing", Extras { trace_sampling: Some(100), ..Extras::default() }, |m| {
        let out = m.tb.temp_dir().join("spans.jsonl");
        let mut cmd = Command::new("python3");
        cmd.arg(asset("otlp_receiver.py")).args([
            "grpc",
            &format!("127.0.0.1:{OTLP_PORT}"),
            &out.display().to_string(),
        ]);
        let mut receiver = m.waypoint.pod.spawn(cmd)?;
        m.waypoint.pod.wait_listening(OTLP_PORT, Duration::from_secs(15))?;
        let call = format!("/call/{V1_VIP}:80/hello");

        // 1. The caller's W3C context is continued across both services.
        let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");
        let (status, echoed) = get(m, "w3c", &call, &json!({"traceparent": traceparent, "x-request-id": "req-w3c"}))?;
        ensure!(status == 200, "status {status}: {echoed}");
        let chain = assert_chain(&trace_spans(&out, TRACE, 4)?, CALLER_SPAN)?;
        let at_v1 = &echoed["headers"];
        let c2 = chain["c2"]["span_id"].as_str().context("span id")?;
        ensure!(
            at_v1["traceparent"] == format!("00-{TRACE}-{c2}-01"),
            "api-v1 got the last client span as its parent: {at_v1}"
        );
        ensure!(at_v1["x-b3-traceid"] == TRACE && at_v1["x-b3-spanid"] == c2, "B3 too: {at_v1}");
        ensure!(at_v1["x-request-id"] == "req-w3c", "x-request-id forwarded: {at_v1}");
        for s in chain.values() {
            ensure!(s["attributes"]["guid:x-request-id"] == "req-w3c", "request id on every span: {s}");
        }

        // 2. B3 alone (what many applications forward) is continued too.
        let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
        let (status, _) = get(
            m,
            "b3",
            &call,
            &json!({"x-b3-traceid": b3_trace, "x-b3-spanid": "e457b5a2e4d86bd1", "x-b3-sampled": "1"}),
        )?;
        ensure!(status == 200, "b3 status {status}");
        assert_chain(&trace_spans(&out, b3_trace, 4)?, "e457b5a2e4d86bd1")?;

        // 3. No context: a new trace, the same shape, with a made request id.
        let before: std::collections::HashSet<String> =
            spans(&out)?.iter().filter_map(|s| s["trace_id"].as_str().map(str::to_owned)).collect();
        let (status, echoed) = get(m, "new", &call, &json!({}))?;
        ensure!(status == 200, "new trace status {status}");
        let new_trace = echoed["headers"]["x-b3-traceid"].as_str().context("a trace id reached api-v1")?.to_owned();
        ensure!(!before.contains(&new_trace), "a new trace id");
        let chain = assert_chain(&trace_spans(&out, &new_trace, 4)?, "")?;
        let rid = echoed["headers"]["x-request-id"].as_str().context("x-request-id made")?;
        ensure!(rid.len() == 36 && chain["s1"]["attributes"]["guid:x-request-id"] == rid, "made request id {rid}");

        // 4. An unsampled caller: propagated, never recorded.
        let quiet = "0af7651916cd43dd8448eb211c80319c";
        let (status, echoed) =
            get(m, "quiet", &call, &json!({"traceparent": format!("00-{quiet}-b7ad6b7169203331-00")}))?;
        ensure!(status == 200, "unsampled status {status}");
        let tp = echoed["headers"]["traceparent"].as_str().context("traceparent reached api-v1")?;
        ensure!(tp.starts_with(&format!("00-{quiet}-")) && tp.ends_with("-00"), "unsampled context kept: {tp}");
        // A sampled request after it: once its spans are in, the unsampled
        // one's would have been too.
        let marker = "11111111111111111111111111111111";
        get(m, "marker", &call, &json!({"traceparent": format!("00-{marker}-{CALLER_SPAN}-01")}))?;
        trace_spans(&out, marker, 4)?;
        ensure!(!spans(&out)?.iter().any(|s| s["trace_id"] == quiet), "an unsampled request made no span");

        // 5. The golden signals, the graph and top of the same traffic.
        cli_views(m, &call)?;

        // 6. Without a collector, spans are dropped and counted, and
        //    requests are served as before.
        receiver.stop(Duration::from_secs(2))?;
        let (status, _) = get(m, "nocollector", &call, &json!({}))?;
        ensure!(status == 200, "served without a collector: {status}");
        wait_for("spans counted as dropped (export_failed)", || {
            let text = m.waypoint.metrics()?;
            let dropped = text
                .lines()
                .find(|l| l.starts_with("heddle_trace_spans_dropped_total{reason=\"export_failed\"}"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0);
            let exported = text
                .lines()
                .find(|l| l.starts_with("heddle_trace_spans_exported_total"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0);
            ensure!(exported >= 16.0, "16 spans (four traces of four) exported before: {exported}");
            Ok((dropped >= 4.0).then_some(()))
        })?;
        Ok(())
    });
}

/// `heddle stat`, `heddle graph` and `heddle top` over the traffic of
/// [`a_request_through_two_services_is_one_trace_with_every_hop_linked_and_stat_and_graph_show_it`],
/// gathered by the CLI from node-b's agent and the waypoint.
fn cli_views(m: &Mesh, call: &str) -> Result<()> {
    let wp_admin = format!("http://{}:15000", m.waypoint.pod.ip());
    let from = ["--from", "http://127.0.0.1:15000", "--from", wp_admin.as_str()];
    let run = |args: &[&str]| -> Result<String> {
        let (code, out, err) = common::heddle(&m.agent_b, &[args, &from[..]].concat())?;
        ensure!(code == 0, "heddle {args:?}: exit {code}: {err}");
        Ok(out)
    };
    let rows: Value = serde_json::from_str(&run(&["-o", "json", "stat", "svc", "-n", "demo"])?)?;
    let row = |name: &str| rows.as_array().and_then(|r| r.iter().find(|r| r["name"] == name)).cloned();
    let api = row("demo/api").with_context(|| format!("a demo/api row: {rows}"))?;
    let v1 = row("demo/api-v1").with_context(|| format!("a demo/api-v1 row: {rows}"))?;
    ensure!(api["requests"] == 5 && v1["requests"] == 5, "five requests each: {rows}");
    ensure!(api["success_rate"] == 1.0 && api["p99_ms"].as_f64() > Some(0.0), "success and latency: {api}");
    let table = run(&["stat", "svc", "-n", "demo"])?;
    ensure!(table.starts_with("SERVICE") && table.contains("100.00%"), "stat table:\n{table}");
    let dot = run(&["-o", "dot", "graph"])?;
    ensure!(
        dot.contains("\"demo/client\" -> \"demo/api\" [label=\"") && dot.contains("mTLS"),
        "graph edge from the client to api, over mTLS:\n{dot}"
    );

    // `heddle top` on the waypoint: the busiest paths, counted.
    let (code, top, err) = common::heddle(&m.agent_b, &["--agent", wp_admin.as_str(), "top", "--duration", "2s"])?;
    ensure!(code == 0, "heddle top: exit {code}: {err}");
    let line = |path: &str| top.lines().find(|l| l.contains(path)).map(str::to_owned);
    let client_line = line(call).with_context(|| format!("a row for {call}:\n{top}"))?;
    ensure!(
        client_line.starts_with("demo/client") && client_line.split_whitespace().nth(4) == Some("5"),
        "five requests from the client: {client_line}"
    );
    ensure!(line(" /hello ").is_some(), "a row for api-v1's /hello:\n{top}");
    Ok(())
}

#[test]
fn with_trace_l4_each_agent_exports_a_span_per_connection() {
    const ARGS: &[&str] = &[
        "--trace-l4",
        "--otlp-endpoint",
        "http://127.0.0.1",
        "--otlp-protocol",
        "http/protobuf",
        "--trace-sampling",
        "100",
    ];
    let options = common::Options { agent_args: ARGS, ..common::Options::mtls() };
    common::run_e2e("l4_tracing", options, |c| {
        // OTLP/HTTP with protobuf bodies here (the waypoint test uses gRPC).
        let mut receivers = Vec::new();
        let mut files = Vec::new();
        for node in [&c.node_a, &c.node_b] {
            let out = c.tb.temp_dir().join(format!("spans-{}.jsonl", node.name()));
            let mut cmd = Command::new("python3");
            cmd.arg(asset("otlp_receiver.py")).args(["http", "127.0.0.1:4318", &out.display().to_string()]);
            receivers.push(node.spawn(cmd)?);
            files.push(out);
        }
        for r in &receivers {
            wait_for("the OTLP receiver listening", || Ok(r.log_text().contains("receiver on").then_some(())))?;
        }
        let to = c.server.addr(common::ECHO_PORT);
        common::expect_delivered(&c.client, &heddle_tests::ClientSpec::to(to).bytes(100))?;
        let span_to = |file: &std::path::Path, kind: i64| -> Result<Option<Value>> {
            Ok(spans(file)?
                .into_iter()
                .find(|s| s["kind"] == kind && s["attributes"]["server.address"] == to.ip().to_string()))
        };
        let client_side = wait_for("node-a's client span", || span_to(&files[0], SPAN_CLIENT))?;
        let server_side = wait_for("node-b's server span", || span_to(&files[1], SPAN_SERVER))?;
        for (s, node) in [(&client_side, "node-a"), (&server_side, "node-b")] {
            ensure!(s["service"] == format!("heddle-agent.{node}"), "resource service.name: {s}");
            ensure!(s["attributes"]["heddle.mtls"] == true, "mTLS: {s}");
            ensure!(s["attributes"]["heddle.bytes.to_server"].as_i64() >= Some(100), "bytes: {s}");
            ensure!(
                s["attributes"]["heddle.source.principal"].as_str().is_some_and(|p| p.ends_with("/sa/client")),
                "the client's identity: {s}"
            );
        }
        ensure!(server_side["name"] == format!("tcp {to}"), "span name: {server_side}");
        // The source agent sent its span in the CONNECT: one trace.
        ensure!(
            server_side["trace_id"] == client_side["trace_id"]
                && server_side["parent_span_id"] == client_side["span_id"]
                && client_side["parent_span_id"] == "",
            "node-b's span is a child of node-a's: {client_side} {server_side}"
        );
        Ok(())
    });
}
