//! `heddle stat`, `heddle graph` and `heddle top`: golden signals, the
//! service graph and the busiest paths,
//! computed by the CLI from the flow records of every agent and waypoint it
//! is given (`--from`), over a window (`--window`, the records' `since`).
//!
//! Pure functions over the records as the admin API serves them (JSON), so
//! merging many sources is concatenation: a connection seen by both its
//! agents (the client's outbound record and the server's inbound one, same
//! source address and original destination) is counted once; a waypoint
//! request is one `request` record. Success is a status below 500 and, for
//! gRPC, status 0 (Linkerd's and Istio's definition). Latency percentiles
//! are nearest-rank over the window's requests.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::cli_flows::short_identity;

/// What `heddle stat` groups by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    /// The destination workload (its identity, `ns/serviceaccount`).
    #[value(alias = "deployment", alias = "workload")]
    Deploy,
    /// The destination Service.
    #[value(alias = "service")]
    Svc,
    /// The route that matched (waypoint requests only).
    Route,
}

/// One row of `heddle stat`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Row {
    /// `ns/name` of the workload, Service or route.
    pub name: String,
    /// Distinct pods seen serving it.
    pub meshed: usize,
    /// Requests (waypoint) in the window.
    pub requests: u64,
    /// Share of them that succeeded (none: no requests).
    pub success_rate: Option<f64>,
    /// Requests per second over the window.
    pub rps: f64,
    /// Latency percentiles, milliseconds.
    pub p50_ms: Option<f64>,
    /// 95th percentile.
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// Connections that ended in the window.
    pub tcp_connections: u64,
    /// Bytes both ways of those connections.
    pub tcp_bytes: u64,
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Whether a waypoint request succeeded.
fn succeeded(http: &Value) -> bool {
    let status = http["status"].as_u64().unwrap_or(0);
    let grpc_ok = http["grpc_status"].as_u64().is_none_or(|g| g == 0);
    (1..500).contains(&status) && grpc_ok
}

/// The L4 close and error records, a connection counted once.
fn connections(records: &[Value]) -> Vec<&Value> {
    let mut seen = HashSet::new();
    records
        .iter()
        .filter(|r| matches!(str_of(r, "event"), Some("close" | "error")))
        .filter(|r| seen.insert((str_of(r, "src").map(str::to_owned), str_of(r, "orig_dst").map(str::to_owned))))
        .collect()
}

fn requests(records: &[Value]) -> impl Iterator<Item = &Value> {
    records.iter().filter(|r| str_of(r, "event") == Some("request"))
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted.get(rank - 1).copied()
}

#[derive(Default)]
struct Acc {
    pods: HashSet<String>,
    requests: u64,
    ok: u64,
    latencies: Vec<f64>,
    connections: u64,
    bytes: u64,
}

impl Acc {
    #[allow(clippy::cast_precision_loss)]
    fn row(mut self, name: String, window: Duration) -> Row {
        self.latencies.sort_by(f64::total_cmp);
        let secs = window.as_secs_f64().max(1.0);
        Row {
            name,
            meshed: self.pods.len(),
            requests: self.requests,
            success_rate: (self.requests > 0).then(|| self.ok as f64 / self.requests as f64),
            rps: self.requests as f64 / secs,
            p50_ms: percentile(&self.latencies, 50.0),
            p95_ms: percentile(&self.latencies, 95.0),
            p99_ms: percentile(&self.latencies, 99.0),
            tcp_connections: self.connections,
            tcp_bytes: self.bytes,
        }
    }
}

/// The destination of a waypoint request, as `by` names it.
fn request_key(r: &Value, by: GroupBy) -> Option<String> {
    let http = &r["http"];
    match by {
        GroupBy::Svc => str_of(http, "backend").or_else(|| str_of(r, "service")).map(str::to_owned),
        GroupBy::Deploy => str_of(r, "dst_identity").map(short_identity),
        GroupBy::Route => str_of(http, "route").map(str::to_owned),
    }
}

/// The destination of a connection, as `by` names it (routes: none).
fn connection_key(r: &Value, by: GroupBy) -> Option<String> {
    match by {
        GroupBy::Svc => str_of(r, "service").map(str::to_owned),
        // An inbound record's workload is the destination: its name when
        // the connection carried no identity.
        GroupBy::Deploy => str_of(r, "dst_identity").map(short_identity).or_else(|| {
            (str_of(r, "direction") == Some("inbound")).then(|| str_of(r, "workload").map(str::to_owned)).flatten()
        }),
        GroupBy::Route => None,
    }
}

/// `heddle stat`: one row per destination, in `namespace` if given.
#[must_use]
pub fn stat(records: &[Value], by: GroupBy, namespace: Option<&str>, window: Duration) -> Vec<Row> {
    let mut acc: BTreeMap<String, Acc> = BTreeMap::new();
    let in_ns = |name: &str| {
        namespace.is_none_or(|ns| {
            // Routes are `kind/ns/name`; the rest `ns/name`.
            let parts: Vec<&str> = name.split('/').collect();
            parts.len() >= 2 && parts[parts.len() - 2] == ns
        })
    };
    for r in requests(records) {
        let Some(key) = request_key(r, by).filter(|k| in_ns(k)) else { continue };
        let a = acc.entry(key).or_default();
        a.requests += 1;
        a.ok += u64::from(succeeded(&r["http"]));
        if let Some(d) = r["duration_ms"].as_f64() {
            a.latencies.push(d);
        }
        if let Some(up) = str_of(&r["http"], "upstream") {
            a.pods.insert(up.to_owned());
        }
    }
    for r in connections(records) {
        let Some(key) = connection_key(r, by).filter(|k| in_ns(k)) else { continue };
        let a = acc.entry(key).or_default();
        a.connections += 1;
        a.bytes += r["bytes_sent"].as_u64().unwrap_or(0) + r["bytes_received"].as_u64().unwrap_or(0);
        if let Some(dst) = str_of(r, "dst") {
            a.pods.insert(dst.to_owned());
        }
    }
    acc.into_iter().map(|(name, a)| a.row(name, window)).collect()
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| if v < 10.0 { format!("{v:.1}ms") } else { format!("{v:.0}ms") })
}

/// The `heddle stat` table.
#[must_use]
pub fn stat_text(rows: &[Row], by: GroupBy) -> String {
    let mut out = String::new();
    let first = match by {
        GroupBy::Deploy => "WORKLOAD",
        GroupBy::Svc => "SERVICE",
        GroupBy::Route => "ROUTE",
    };
    let _ = writeln!(
        out,
        "{first:<36} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "MESHED", "SUCCESS", "RPS", "P50", "P95", "P99", "TCP_CONN", "TCP_BYTES"
    );
    for r in rows {
        let success = r.success_rate.map_or_else(|| "-".to_owned(), |s| format!("{:.2}%", s * 100.0));
        let _ = writeln!(
            out,
            "{:<36} {:>6} {:>8} {:>8.1} {:>8} {:>8} {:>8} {:>8} {:>10}",
            r.name,
            r.meshed,
            success,
            r.rps,
            ms(r.p50_ms),
            ms(r.p95_ms),
            ms(r.p99_ms),
            r.tcp_connections,
            r.tcp_bytes
        );
    }
    if rows.is_empty() {
        out.push_str("(no traffic in the window)\n");
    }
    out
}

/// One edge of the service graph.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Edge {
    /// The caller: the Service its identity serves when the window shows
    /// it serving exactly one, else `ns/serviceaccount`, a workload, or an
    /// address.
    pub from: String,
    /// The callee (a Service when one was dialled, else a workload).
    pub to: String,
    /// The callee's subset (version) when a route chose one: one edge per
    /// subset between the same two nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Requests (through a waypoint).
    pub requests: u64,
    /// Requests per second over the window.
    pub rps: f64,
    /// Share of requests that failed.
    pub error_ratio: Option<f64>,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: Option<f64>,
    /// Connections.
    pub connections: u64,
    /// Whether every connection on this edge was mutual TLS.
    pub mtls: bool,
}

/// The service graph.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Graph {
    /// Every node, sorted.
    pub nodes: Vec<String>,
    /// Every edge, sorted by (from, to).
    pub edges: Vec<Edge>,
}

fn source_of(r: &Value) -> String {
    str_of(r, "src_identity")
        .map(short_identity)
        .or_else(|| {
            (str_of(r, "direction") == Some("outbound")).then(|| str_of(r, "workload").map(str::to_owned)).flatten()
        })
        .or_else(|| str_of(r, "src").and_then(|s| s.rsplit_once(':')).map(|(ip, _)| ip.to_owned()))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn target_of(r: &Value) -> String {
    str_of(&r["http"], "backend")
        .or_else(|| str_of(r, "service"))
        .map(str::to_owned)
        .or_else(|| str_of(r, "dst_identity").map(short_identity))
        .or_else(|| str_of(r, "orig_dst").map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// A backend name's Service and subset: `ns/name@subset`.
fn split_subset(backend: &str) -> (&str, Option<&str>) {
    backend.split_once('@').map_or((backend, None), |(service, subset)| (service, Some(subset)))
}

/// The Service each identity serves, from the requests whose upstream
/// answered as it (L7 records: an L4 record's server may be a waypoint):
/// only identities that served exactly one Service in the window.
fn served_services(records: &[Value]) -> BTreeMap<String, String> {
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in requests(records) {
        let (Some(id), Some(backend)) =
            (str_of(r, "dst_identity"), str_of(&r["http"], "backend").or_else(|| str_of(r, "service")))
        else {
            continue;
        };
        seen.entry(short_identity(id)).or_default().insert(split_subset(backend).0.to_owned());
    }
    seen.into_iter()
        .filter(|(_, services)| services.len() == 1)
        .filter_map(|(id, services)| Some((id, services.into_iter().next()?)))
        .collect()
}

/// `heddle graph`: who talks to whom, from requests and connections.
/// Callers are drawn as the Service they serve when the records show one
/// (so `a -> b -> c` is a chain, not pairs), callees as the Service
/// dialled; a route's subsets are separate edges into the same node.
#[must_use]
#[allow(clippy::cast_precision_loss)]
pub fn graph(records: &[Value], window: Duration) -> Graph {
    #[derive(Default)]
    struct E {
        requests: u64,
        failed: u64,
        latencies: Vec<f64>,
        connections: u64,
        plaintext: bool,
    }
    let serves = served_services(records);
    let from = |r: &Value| {
        let s = source_of(r);
        serves.get(&s).cloned().unwrap_or(s)
    };
    let mut edges: BTreeMap<(String, String, Option<String>), E> = BTreeMap::new();
    for r in requests(records) {
        let target = target_of(r);
        let (to, subset) = split_subset(&target);
        let e = edges.entry((from(r), to.to_owned(), subset.map(str::to_owned))).or_default();
        e.requests += 1;
        e.failed += u64::from(!succeeded(&r["http"]));
        if let Some(d) = r["duration_ms"].as_f64() {
            e.latencies.push(d);
        }
    }
    for r in connections(records) {
        let e = edges.entry((from(r), target_of(r), None)).or_default();
        e.connections += 1;
        e.plaintext |= str_of(r, "security") != Some("mutual_tls");
    }
    let secs = window.as_secs_f64().max(1.0);
    let mut nodes: Vec<String> = edges.keys().flat_map(|(a, b, _)| [a.clone(), b.clone()]).collect();
    nodes.sort();
    nodes.dedup();
    let edges = edges
        .into_iter()
        .map(|((from, to, subset), mut e)| {
            e.latencies.sort_by(f64::total_cmp);
            Edge {
                from,
                to,
                subset,
                requests: e.requests,
                rps: e.requests as f64 / secs,
                error_ratio: (e.requests > 0).then(|| e.failed as f64 / e.requests as f64),
                p99_ms: percentile(&e.latencies, 99.0),
                connections: e.connections,
                mtls: !e.plaintext,
            }
        })
        .collect();
    Graph { nodes, edges }
}

fn dot_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The graph in Graphviz's DOT language (`dot -Tsvg`): edges labelled
/// with request rate, error ratio and p99, dashed red when plaintext.
#[must_use]
pub fn graph_dot(g: &Graph) -> String {
    let mut out = String::from("digraph heddle {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    for n in &g.nodes {
        let _ = writeln!(out, "  {};", dot_quote(n));
    }
    for e in &g.edges {
        let mut label: Vec<String> = e.subset.iter().cloned().collect();
        if e.requests > 0 {
            label.push(format!("{:.1} rps", e.rps));
            if let Some(r) = e.error_ratio {
                label.push(format!("{:.1}% err", r * 100.0));
            }
            label.push(format!("p99 {}", ms(e.p99_ms)));
        }
        if e.connections > 0 {
            label.push(format!("{} conn", e.connections));
        }
        label.push(if e.mtls { "mTLS".to_owned() } else { "plaintext".to_owned() });
        let style = if e.mtls { "" } else { ", style=dashed, color=red" };
        // `\n` is DOT's line break inside a label: not escaped.
        let label = label.join("\\n").replace('"', "\\\"");
        let _ = writeln!(out, "  {} -> {} [label=\"{label}\"{style}];", dot_quote(&e.from), dot_quote(&e.to));
    }
    out.push_str("}\n");
    out
}

/// One row of `heddle top`: a (source, destination, method, path).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TopRow {
    /// The caller.
    pub source: String,
    /// The Service or workload called.
    pub destination: String,
    /// Method.
    pub method: String,
    /// Path, without the query.
    pub path: String,
    /// Requests.
    pub count: u64,
    /// Fastest, milliseconds.
    pub best_ms: f64,
    /// Slowest, milliseconds.
    pub worst_ms: f64,
    /// Share that succeeded.
    pub success_rate: f64,
}

/// `heddle top`: the `limit` busiest paths among the waypoint requests.
#[must_use]
#[allow(clippy::cast_precision_loss)]
pub fn top(records: &[Value], limit: usize) -> Vec<TopRow> {
    let mut rows: BTreeMap<(String, String, String, String), (TopRow, u64)> = BTreeMap::new();
    for r in requests(records) {
        let http = &r["http"];
        let path = str_of(http, "path").unwrap_or("/");
        let path = path.split_once('?').map_or(path, |(p, _)| p).to_owned();
        let method = str_of(http, "method").unwrap_or("-").to_owned();
        let key = (source_of(r), target_of(r), method, path);
        let ms = r["duration_ms"].as_f64().unwrap_or(0.0);
        let (row, ok) = rows.entry(key.clone()).or_insert_with(|| {
            let row = TopRow {
                source: key.0.clone(),
                destination: key.1.clone(),
                method: key.2.clone(),
                path: key.3.clone(),
                best_ms: f64::INFINITY,
                ..TopRow::default()
            };
            (row, 0)
        });
        row.count += 1;
        row.best_ms = row.best_ms.min(ms);
        row.worst_ms = row.worst_ms.max(ms);
        *ok += u64::from(succeeded(http));
        row.success_rate = *ok as f64 / row.count as f64;
    }
    let mut out: Vec<TopRow> = rows.into_values().map(|(r, _)| r).collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.path.cmp(&b.path)));
    out.truncate(limit);
    out
}

/// The `heddle top` table.
#[must_use]
pub fn top_text(rows: &[TopRow]) -> String {
    let mut out = format!(
        "{:<24} {:<24} {:<6} {:<32} {:>7} {:>8} {:>8} {:>8}\n",
        "SOURCE", "DESTINATION", "METHOD", "PATH", "COUNT", "BEST", "WORST", "SUCCESS"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<24} {:<24} {:<6} {:<32} {:>7} {:>8} {:>8} {:>7.1}%",
            r.source,
            r.destination,
            r.method,
            r.path,
            r.count,
            ms(Some(r.best_ms)),
            ms(Some(r.worst_ms)),
            r.success_rate * 100.0
        );
    }
    if rows.is_empty() {
        out.push_str("(no requests yet)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(status: u64, ms: f64, backend: &str) -> Value {
        json!({"event": "request", "direction": "inbound", "workload": "demo/waypoint",
               "src_identity": "spiffe://td/ns/demo/sa/web", "dst_identity": "spiffe://td/ns/demo/sa/api",
               "service": "demo/api", "duration_ms": ms, "security": "mutual_tls",
               "http": {"status": status, "backend": backend, "route": "httproute/demo/api", "upstream": "10.0.0.9:8080"}})
    }

    fn conn(direction: &str, src: &str, security: &str) -> Value {
        json!({"event": "close", "direction": direction, "workload": "demo/db-0", "src": src,
               "orig_dst": "10.0.0.5:5432", "dst": "10.0.0.5:5432", "service": "demo/db",
               "src_identity": "spiffe://td/ns/demo/sa/api", "dst_identity": "spiffe://td/ns/demo/sa/db",
               "security": security, "bytes_sent": 100, "bytes_received": 50})
    }

    fn records() -> Vec<Value> {
        let mut r: Vec<Value> = (0..99).map(|i| request(200, f64::from(i + 1), "demo/api")).collect();
        r.push(request(503, 500.0, "demo/api"));
        // One connection seen by both agents, one by the server only.
        r.push(conn("outbound", "10.0.0.2:40000", "mutual_tls"));
        r.push(conn("inbound", "10.0.0.2:40000", "mutual_tls"));
        r.push(conn("inbound", "10.0.0.3:40001", "mutual_tls"));
        r
    }

    #[test]
    fn services_get_success_rate_rate_latency_and_connections() {
        let rows = stat(&records(), GroupBy::Svc, None, Duration::from_secs(10));
        assert_eq!(rows.len(), 2);
        let api = &rows[0];
        assert_eq!(api.name, "demo/api");
        assert_eq!(api.requests, 100);
        assert_eq!(api.success_rate, Some(0.99));
        assert!((api.rps - 10.0).abs() < 1e-9);
        assert_eq!((api.p50_ms, api.p99_ms), (Some(50.0), Some(99.0)));
        assert_eq!(api.meshed, 1);
        let db = &rows[1];
        assert_eq!((db.name.as_str(), db.tcp_connections, db.tcp_bytes), ("demo/db", 2, 300));
        assert_eq!(db.success_rate, None);
    }

    #[test]
    fn workloads_and_routes_group_by_their_names_and_namespaces_filter() {
        let rows = stat(&records(), GroupBy::Deploy, Some("demo"), Duration::from_secs(10));
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["demo/api", "demo/db"]);
        let routes = stat(&records(), GroupBy::Route, None, Duration::from_secs(10));
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].name, "httproute/demo/api");
        assert!(stat(&records(), GroupBy::Svc, Some("other"), Duration::from_secs(10)).is_empty());
        assert!(stat_text(&rows, GroupBy::Deploy).contains("demo/api"));
    }

    #[test]
    fn top_ranks_paths_by_count_with_best_worst_and_success() {
        let mut r = records();
        let mut other = request(200, 3.0, "demo/api");
        other["http"]["path"] = json!("/other?x=1");
        other["http"]["method"] = json!("POST");
        r.push(other);
        for x in &mut r {
            if x["http"]["method"].is_null() && x["event"] == "request" {
                x["http"]["method"] = json!("GET");
                x["http"]["path"] = json!("/items");
            }
        }
        let rows = top(&r, 10);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].path.as_str(), rows[0].count, rows[0].method.as_str()), ("/items", 100, "GET"));
        assert_eq!((rows[0].best_ms, rows[0].worst_ms, rows[0].success_rate), (1.0, 500.0, 0.99));
        assert_eq!((rows[1].path.as_str(), rows[1].source.as_str()), ("/other", "demo/web"));
        assert_eq!(top(&r, 1).len(), 1);
        assert!(top_text(&rows).contains("/items"));
    }

    #[test]
    fn the_graph_has_one_edge_per_pair_with_rates_errors_and_security() {
        let mut r = records();
        r.push(json!({"event": "close", "direction": "outbound", "workload": "demo/api-0", "src": "10.0.0.2:40002",
                      "orig_dst": "93.184.216.34:80", "security": "plaintext"}));
        let g = graph(&r, Duration::from_secs(10));
        assert_eq!(g.nodes, ["93.184.216.34:80", "demo/api", "demo/api-0", "demo/db", "demo/web"]);
        let web = g.edges.iter().find(|e| e.from == "demo/web").unwrap();
        assert_eq!((web.to.as_str(), web.requests, web.error_ratio), ("demo/api", 100, Some(0.01)));
        assert_eq!(web.p99_ms, Some(99.0));
        let db = g.edges.iter().find(|e| e.to == "demo/db").unwrap();
        assert_eq!((db.connections, db.mtls), (2, true));
        let out = g.edges.iter().find(|e| e.to.starts_with("93.")).unwrap();
        assert!(!out.mtls);
        let dot = graph_dot(&g);
        assert!(dot.starts_with("digraph heddle {"));
        assert!(
            dot.contains("\"demo/web\" -> \"demo/api\" [label=\"10.0 rps\\n1.0% err\\np99 99ms\\nmTLS\"];"),
            "{dot}"
        );
        assert!(dot.contains("style=dashed, color=red"));
    }

    #[test]
    fn a_caller_that_serves_one_service_is_drawn_as_it_and_subsets_share_a_node() {
        let hop = |src: &str, dst: &str, backend: &str| {
            json!({"event": "request", "direction": "inbound", "workload": "default/waypoint",
                   "src_identity": format!("spiffe://td/ns/default/sa/{src}"),
                   "dst_identity": format!("spiffe://td/ns/default/sa/{dst}"),
                   "duration_ms": 2.0, "security": "mutual_tls", "http": {"status": 200, "backend": backend}})
        };
        let r = vec![
            hop("curl", "bookinfo-productpage", "default/productpage@v1"),
            hop("bookinfo-productpage", "bookinfo-reviews", "default/reviews@v1"),
            hop("bookinfo-productpage", "bookinfo-reviews", "default/reviews@v3"),
            hop("bookinfo-reviews", "bookinfo-ratings", "default/ratings"),
            // An identity serving two Services stays an identity.
            hop("shared", "multi", "default/a"),
            hop("shared", "multi", "default/b"),
            hop("multi", "bookinfo-ratings", "default/ratings"),
        ];
        let g = graph(&r, Duration::from_secs(10));
        let edges: Vec<(&str, &str, Option<&str>)> =
            g.edges.iter().map(|e| (e.from.as_str(), e.to.as_str(), e.subset.as_deref())).collect();
        assert_eq!(
            edges,
            [
                ("default/curl", "default/productpage", Some("v1")),
                ("default/multi", "default/ratings", None),
                ("default/productpage", "default/reviews", Some("v1")),
                ("default/productpage", "default/reviews", Some("v3")),
                ("default/reviews", "default/ratings", None),
                ("default/shared", "default/a", None),
                ("default/shared", "default/b", None),
            ]
        );
        assert!(graph_dot(&g).contains("\"default/productpage\" -> \"default/reviews\" [label=\"v3\\n"));
    }
}
