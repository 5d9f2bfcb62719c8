//! The Bookinfo walkthrough, Istio's tutorial on Heddle, in five steps
//! ([`STEPS`]). Each step acts as a user would (applies a file, sends
//! requests with real clients, runs `heddle`) and judges what it saw;
//! [`Step`] holds both, in order, for a person to read. The demo prints the
//! steps; the e2e test requires every check of every step.
//!
//! 1. Every workload enrolled with its own SPIFFE identity; every hop
//!    (client → waypoint → service, and back out) inside HBONE mTLS, shown
//!    by the agents' flow records and by a packet capture between nodes.
//! 2. Istio's `destination-rule-all.yaml` and `virtual-service-all-v1.yaml`
//!    unchanged (everything to v1), then `virtual-service-reviews-90-10.yaml`
//!    (the canary, measured over 400 requests), then `end-user: jason` to v3.
//! 3. A 2 s delay on ratings for jason: productpage gives up on reviews
//!    after its 1 s and says reviews are unavailable; then Istio's abort file
//!    (ratings answers 500 for jason: "Ratings service is currently
//!    unavailable"), each visible in the waypoint's request records.
//! 4. A DENY `AuthorizationPolicy` for one caller (`curl` calling ratings
//!    directly): 403, with the flow record naming the policy, while
//!    reviews still reaches ratings.
//! 5. `heddle stat`, `heddle graph -o dot` rendered to SVG by Graphviz, and
//!    one request's trace across all four services.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::{Bookinfo, NAMESPACE, PRODUCTPAGE, RATINGS, WAYPOINT};
use crate::env::{asset, TCPDUMP};
use crate::error::{Result, TestbedError};
use crate::{Direction, Flow, FlowEvent, Security};

/// One step: what was done and seen, and the checks, in order.
#[derive(Debug, Default)]
pub struct Step {
    /// Its title.
    pub title: String,
    lines: Vec<(Option<bool>, String)>,
}

impl Step {
    fn new(title: &str) -> Self {
        Self { title: title.to_owned(), lines: Vec::new() }
    }

    /// Text for the reader.
    fn say(&mut self, text: impl Into<String>) {
        self.lines.push((None, text.into()));
    }

    /// A judged observation.
    fn check(&mut self, ok: bool, what: impl Into<String>) -> bool {
        self.lines.push((Some(ok), what.into()));
        ok
    }

    /// Whether it made checks and every one held.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.lines.iter().any(|(c, _)| c.is_some()) && self.lines.iter().all(|(c, _)| *c != Some(false))
    }

    /// The checks that failed.
    #[must_use]
    pub fn failures(&self) -> Vec<&str> {
        self.lines.iter().filter(|(c, _)| *c == Some(false)).map(|(_, t)| t.as_str()).collect()
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\n== {} ==", self.title)?;
        for (check, text) in &self.lines {
            match check {
                None => writeln!(f, "{}", text.trim_end())?,
                Some(true) => writeln!(f, "  [ok] {text}")?,
                Some(false) => writeln!(f, "  [UNEXPECTED] {text}")?,
            }
        }
        Ok(())
    }
}

/// A step of the walkthrough.
pub type StepFn = fn(&Bookinfo) -> Result<Step>;

/// The walkthrough, in order (each step builds on the one before).
pub const STEPS: [StepFn; 5] = [enrolled_and_mtls, routing, faults, deny, observe];

const REQUESTS: usize = 400;
const UNAVAILABLE: &str = "Sorry, product reviews are currently unavailable for this book.";
const RATINGS_UNAVAILABLE: &str = "Ratings service is currently unavailable";
/// The caller context of the traced request.
const TRACE: &str = "5b8efff798038103d269b633813fc60c";
const CALLER_SPAN: &str = "eee19b7ec3c1b174";
const SPAN_SERVER: i64 = 2;
const SPAN_CLIENT: i64 = 3;

fn bookinfo_file(name: &str) -> Result<String> {
    let path = asset(&format!("bookinfo/{name}"));
    std::fs::read_to_string(&path).map_err(|e| TestbedError::io(format!("read {}", path.display()), e))
}

fn productpage_url() -> String {
    format!("http://{PRODUCTPAGE}/productpage")
}

/// `n` productpage requests from `curl`, on one keep-alive connection.
fn load(b: &Bookinfo, n: usize, user: Option<&str>) -> Result<Value> {
    let n = n.to_string();
    let url = productpage_url();
    let header = user.map(|u| format!("end-user: {u}"));
    let mut args = vec!["load", url.as_str(), n.as_str(), "--host", "productpage:9080"];
    if let Some(h) = &header {
        args.extend(["--header", h.as_str()]);
    }
    b.client(&args)
}

/// One productpage request from `curl` with `headers`.
fn page(b: &Bookinfo, headers: &[String]) -> Result<Value> {
    let url = productpage_url();
    let mut args = vec!["get", url.as_str(), "--host", "productpage:9080"];
    for h in headers {
        args.extend(["--header", h.as_str()]);
    }
    b.client(&args)
}

fn jason() -> Vec<String> {
    vec!["end-user: jason".to_owned()]
}

fn counts(v: &Value, key: &str) -> BTreeMap<String, u64> {
    v[key]
        .as_object()
        .map(|m| m.iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

fn only(v: &Value, key: &str, what: &str, n: u64) -> bool {
    counts(v, key) == BTreeMap::from([(what.to_owned(), n)]) && v["errors"] == 0
}

/// Polls `probe` every 200 ms for up to 10 s, until it answers.
fn until<T>(what: &str, mut probe: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    crate::poll_until(what, Duration::from_secs(10), Duration::from_millis(200), || {
        Ok(match probe()? {
            Some(v) => crate::Check::Ready(v),
            None => crate::Check::Pending(String::new()),
        })
    })
}

/// The short form of a SPIFFE ID: `ns/sa`.
fn short(id: &str) -> String {
    id.rsplit_once("/ns/").map_or_else(|| id.to_owned(), |(_, rest)| rest.replacen("/sa/", "/", 1))
}

fn enrolled_and_mtls(b: &Bookinfo) -> Result<Step> {
    let mut s = Step::new("1. Every Bookinfo workload enrolled; mTLS between all of them");
    let mut table = crate::report::Table::new(&["workload", "node", "identity", "enrolled", "captured"]);
    let mut all = true;
    let mut seen = 0;
    for agent in &b.agents {
        let node = agent.node().name();
        for w in
            agent.workloads()?.into_iter().filter(|w| w.namespace == NAMESPACE && w.name != WAYPOINT && w.node == node)
        {
            seen += 1;
            all &= w.enrolled && w.captured;
            table.row(vec![
                w.name.clone(),
                w.node.clone(),
                format!("spiffe://cluster.local/ns/{}/sa/{}", w.namespace, w.service_account),
                w.enrolled.to_string(),
                w.captured.to_string(),
            ]);
        }
    }
    s.say(format!("The agents' workloads (namespace {NAMESPACE}, each with its own service account):\n{table}"));
    s.check(all && seen == 7, format!("{seen} of 7 workloads (six services' pods and curl) enrolled and captured"));

    crate::env::require_tool(TCPDUMP)?;
    let capture = b.tb.capture_link(&b.nodes[0], "tcp")?;
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "10", "-H", "Host: productpage:9080", &productpage_url()]);
    let out = b.curl.run(curl)?;
    let body: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    s.say(format!("$ curl http://productpage:9080/productpage   (from pod curl, to {PRODUCTPAGE})"));
    s.check(
        body["product"]["title"] == "The Comedy of Errors" && body["details"]["author"] == "William Shakespeare",
        format!(
            "the page: {:?} by {:?}, reviews from {}",
            body["product"]["title"].as_str().unwrap_or("?"),
            body["details"]["author"].as_str().unwrap_or("?"),
            body["reviews"]["podname"].as_str().unwrap_or("nobody")
        ),
    );
    let spread = load(b, 30, None)?;
    s.check(
        spread["statuses"]["200"] == 30,
        format!(
            "30 more requests, no routes yet: reviews versions {:?} (balanced per request)",
            counts(&spread, "reviews")
        ),
    );
    let report = capture.stop()?;
    let tls = report.tls_on_port(crate::TUNNEL_PORT);
    s.check(
        tls.all_tls() && tls.application_data_records() > 0 && !report.contains(b"Shakespeare"),
        format!("on node-a's link: {}", report.describe(crate::TUNNEL_PORT, "Shakespeare")),
    );

    hops(b, &mut s)?;
    Ok(s)
}

/// Who talked to whom, from both agents' records: every hop of the call
/// graph must be there, in mTLS, and nothing in plaintext.
fn hops(b: &Bookinfo, s: &mut Step) -> Result<()> {
    // Open records count too: the waypoint keeps its upstream connections.
    let mut pairs: BTreeMap<(String, String, String), BTreeSet<u64>> = BTreeMap::new();
    let mut plaintext = Vec::new();
    for agent in &b.agents {
        let flows = agent.flows()?;
        for f in flows.iter().filter(|f| f.event != FlowEvent::Error && f.workload.starts_with("default/")) {
            if f.security != Security::MutualTls {
                plaintext.push(describe(f));
                continue;
            }
            let key = (
                short(f.src_identity.as_deref().unwrap_or("?")),
                short(f.dst_identity.as_deref().unwrap_or("?")),
                match f.direction {
                    Direction::Outbound => format!("out@{}", agent.node().name()),
                    Direction::Inbound => format!("in@{}", agent.node().name()),
                },
            );
            pairs.entry(key).or_default().insert(f.conn.unwrap_or(f.id));
        }
    }
    let mut table = crate::report::Table::new(&["client identity", "server identity", "recorded", "connections"]);
    for ((src, dst, at), conns) in &pairs {
        table.row(vec![src.clone(), dst.clone(), at.clone(), conns.len().to_string()]);
    }
    s.say(format!("Connections the agents recorded, all inside HBONE mTLS (port 15008):\n{table}"));
    let hops: BTreeSet<(String, String)> = pairs.keys().map(|(a, z, _)| (a.clone(), z.clone())).collect();
    let wp = format!("{NAMESPACE}/{WAYPOINT}");
    let expected = [
        ("default/curl", wp.as_str()),
        (wp.as_str(), "default/bookinfo-productpage"),
        ("default/bookinfo-productpage", wp.as_str()),
        (wp.as_str(), "default/bookinfo-details"),
        (wp.as_str(), "default/bookinfo-reviews"),
        ("default/bookinfo-reviews", wp.as_str()),
        (wp.as_str(), "default/bookinfo-ratings"),
    ];
    let missing: Vec<String> = expected
        .iter()
        .filter(|(a, z)| !hops.contains(&((*a).to_owned(), (*z).to_owned())))
        .map(|(a, z)| format!("{a} -> {z}"))
        .collect();
    s.check(missing.is_empty(), format!("every hop of the call graph authenticated both ways (missing: {missing:?})"));
    s.check(plaintext.is_empty(), format!("no Bookinfo connection in plaintext ({plaintext:?})"));
    Ok(())
}

fn describe(f: &Flow) -> String {
    format!("{} {:?} -> {:?}", f.workload, f.src, f.orig_dst)
}

fn routing(b: &Bookinfo) -> Result<Step> {
    let mut s = Step::new("2. Traffic shifting: all to v1, a 90/10 canary, then jason to v3");
    b.apply(&bookinfo_file("destination-rule-all.yaml")?)?;
    b.apply(&bookinfo_file("virtual-service-all-v1.yaml")?)?;
    b.waypoint.wait_route("destinationrule/default/reviews", true)?;
    b.waypoint.wait_route("virtualservice/default/reviews", true)?;
    s.say("$ apply destination-rule-all.yaml virtual-service-all-v1.yaml   (Istio's files, unchanged)");
    let v1 = until("all of reviews on v1", || {
        let r = load(b, 30, None)?;
        Ok(only(&r, "reviews", "v1", 30).then_some(r))
    })?;
    s.check(
        only(&v1, "stars", "none", 30),
        format!("30 requests: reviews {:?}, stars {:?} (v1 shows none)", counts(&v1, "reviews"), counts(&v1, "stars")),
    );

    b.apply(&bookinfo_file("virtual-service-reviews-90-10.yaml")?)?;
    s.say("$ apply virtual-service-reviews-90-10.yaml");
    until("the canary in force", || Ok((counts(&load(b, 50, None)?, "reviews").contains_key("v2")).then_some(())))?;
    let canary = load(b, REQUESTS, None)?;
    let c = counts(&canary, "reviews");
    let (n1, n2) = (c.get("v1").copied().unwrap_or(0), c.get("v2").copied().unwrap_or(0));
    // 400 draws at p = 0.1: mean 40, sd 6; a 4-sd band.
    s.check(
        canary["errors"] == 0 && n1 + n2 == 400 && (16..=64).contains(&n2),
        format!(
            "{REQUESTS} requests: v1 {n1} ({:.1}%), v2 {n2} ({:.1}%), no errors; p50 {} ms",
            pct(n1, REQUESTS),
            pct(n2, REQUESTS),
            canary["p50_ms"]
        ),
    );

    b.apply(&bookinfo_file("virtual-service-reviews-jason-v3.yaml")?)?;
    s.say("$ apply virtual-service-reviews-jason-v3.yaml   (end-user: jason -> v3, everyone else -> v1)");
    let j = until("jason on v3", || {
        let r = load(b, 20, Some("jason"))?;
        Ok(only(&r, "reviews", "v3", 20).then_some(r))
    })?;
    let others = load(b, 20, None)?;
    s.check(
        only(&j, "stars", "red", 20),
        format!("jason: reviews {:?}, stars {:?}", counts(&j, "reviews"), counts(&j, "stars")),
    );
    s.check(
        only(&others, "reviews", "v1", 20),
        format!("everyone else: reviews {:?}, stars {:?}", counts(&others, "reviews"), counts(&others, "stars")),
    );
    Ok(s)
}

#[allow(clippy::cast_precision_loss)]
fn pct(n: u64, of: usize) -> f64 {
    n as f64 * 100.0 / of as f64
}

/// The waypoint's newest request record for `path` whose flags satisfy `pred`.
fn record(b: &Bookinfo, path: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    until(&format!("a request record for {path}"), || {
        let flows = b.waypoint.flows("last=300")?;
        Ok(flows.into_iter().rev().find(|f| f["event"] == "request" && f["http"]["path"] == path && pred(f)))
    })
}

fn record_line(r: &Value) -> String {
    let h = &r["http"];
    format!(
        "{} {} -> {} flags {} route {} from {} ({:.1} ms)",
        h["method"].as_str().unwrap_or("?"),
        h["path"].as_str().unwrap_or("?"),
        h["status"],
        h["response_flags"].as_str().unwrap_or("?"),
        h["route"].as_str().unwrap_or("-"),
        r["src_identity"].as_str().map_or_else(|| "?".to_owned(), short),
        r["duration_ms"].as_f64().unwrap_or(0.0)
    )
}

fn faults(b: &Bookinfo) -> Result<Step> {
    let mut s = Step::new("3. Fault injection: a 2 s delay on ratings for jason, then an abort");
    b.apply(&bookinfo_file("virtual-service-ratings-test-delay-2s.yaml")?)?;
    s.say("$ apply virtual-service-ratings-test-delay-2s.yaml   (Istio's delay file, 2 s instead of 7 s)");
    until("the delay in force", || Ok(page(b, &jason())?["body"].get("reviews_error").map(|_| ())))?;
    let slow = page(b, &jason())?;
    let ms = slow["elapsed_ms"].as_f64().unwrap_or(0.0);
    s.check(
        slow["status"] == 200
            && slow["body"]["reviews_error"] == UNAVAILABLE
            && slow["body"]["reviews_status"] == "timeout"
            && (900.0..1900.0).contains(&ms),
        format!(
            "jason: productpage gave up on reviews after {ms:.0} ms (its timeout is 1 s): {:?}",
            slow["body"]["reviews_error"].as_str().unwrap_or("no error shown")
        ),
    );
    let fast = page(b, &[])?;
    let fast_ms = fast["elapsed_ms"].as_f64().unwrap_or(f64::MAX);
    s.check(
        fast["body"]["reviews"]["version"] == "v1" && fast_ms < 900.0,
        format!("everyone else: reviews v1 in {fast_ms:.0} ms"),
    );
    // productpage gave up, so reviews-v3 did too: the waypoint records
    // the abandoned requests (status 0, flag DC), ratings' with the delay.
    let abandoned = |r: &Value| {
        r["http"]["status"] == 0 && r["duration_ms"].as_f64().is_some_and(|ms| (900.0..1900.0).contains(&ms))
    };
    let delayed = record(b, "/ratings/0", |r| r["http"]["response_flags"] == "DI,DC")?;
    s.check(abandoned(&delayed), format!("the waypoint's record of reviews-v3 -> ratings: {}", record_line(&delayed)));
    let gave_up = record(b, "/reviews/0", |r| r["http"]["response_flags"] == "DC")?;
    s.check(abandoned(&gave_up), format!("and of productpage -> reviews: {}", record_line(&gave_up)));

    b.apply(&bookinfo_file("virtual-service-ratings-test-abort.yaml")?)?;
    s.say("$ apply virtual-service-ratings-test-abort.yaml   (Istio's file, unchanged: HTTP 500 for jason)");
    let aborted = until("the abort in force", || {
        let p = page(b, &jason())?;
        let errors = p["body"]["reviews"]["reviews"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|r| r["rating"]["error"] == RATINGS_UNAVAILABLE).count());
        Ok((errors == 2).then_some(p))
    })?;
    s.check(
        aborted["status"] == 200 && aborted["body"]["reviews"]["version"] == "v3",
        format!("jason: the page still renders reviews v3, each rating says {RATINGS_UNAVAILABLE:?}"),
    );
    let fi = record(b, "/ratings/0", |r| r["http"]["response_flags"] == "FI")?;
    s.check(fi["http"]["status"] == 500, format!("the waypoint's record: {}", record_line(&fi)));
    let others = load(b, 10, None)?;
    s.check(only(&others, "stars", "none", 10), format!("everyone else unaffected: {:?}", counts(&others, "reviews")));
    // Back to plain ratings for the next steps.
    b.apply(&Bookinfo::only(&bookinfo_file("virtual-service-all-v1.yaml")?, "VirtualService", "ratings"))?;
    until("ratings restored", || {
        let p = page(b, &jason())?;
        Ok(p["body"]["reviews"]["reviews"][0]["rating"]["color"].eq("red").then_some(()))
    })?;
    s.say("$ apply virtual-service-all-v1.yaml   (ratings' VirtualService only: faults removed)");
    Ok(s)
}

fn deny(b: &Bookinfo) -> Result<Step> {
    let mut s = Step::new("4. Authorization: DENY one caller (curl calling ratings directly)");
    let url = format!("http://{RATINGS}/ratings/0");
    let direct = |b: &Bookinfo| b.client(&["get", &url, "--host", "ratings:9080"]);
    let before = direct(b)?;
    s.check(before["status"] == 200, format!("before: curl -> ratings answers {}", before["status"]));
    b.apply(&bookinfo_file("authorization-policy-ratings-deny-curl.yaml")?)?;
    s.say(
        "$ apply authorization-policy-ratings-deny-curl.yaml   (DENY from principal cluster.local/ns/default/sa/curl)",
    );
    let denied = until("the policy in force", || {
        let r = direct(b)?;
        Ok((r["status"] == 403).then_some(r))
    })?;
    s.check(
        denied["body"].as_str().is_some_and(|t| t.contains("RBAC: access denied")),
        format!("curl -> ratings: {} {:?}", denied["status"], denied["body"].as_str().unwrap_or("")),
    );
    let p = page(b, &jason())?;
    s.check(
        p["body"]["reviews"]["reviews"][0]["rating"]["color"] == "red",
        "reviews-v3 -> ratings still allowed: jason's page shows red stars",
    );
    let rec = record(b, "/ratings/0", |r| r["http"]["status"] == 403)?;
    s.check(
        rec["verdict"] == "denied" && rec["policy"] == "default/ratings-deny-curl",
        format!("the flow record: verdict {}, policy {}, {}", rec["verdict"], rec["policy"], record_line(&rec)),
    );
    let wp_admin = format!("http://{}:15000", b.waypoint.pod.ip());
    let (_, text) = b.heddle(
        &b.nodes[1],
        &["--agent", &wp_admin, "flows", "--http-status", "403", "--path", "/ratings/0", "--last", "1"],
    )?;
    s.say(format!("$ heddle flows --http-status 403 --path /ratings/0 --last 1   (the waypoint's records)\n{text}"));
    Ok(s)
}

fn observe(b: &Bookinfo) -> Result<Step> {
    let mut s = Step::new("5. Golden signals, the service graph, one trace");
    let wp_admin = format!("http://{}:15000", b.waypoint.pod.ip());
    let from = ["--from", "http://127.0.0.1:15000", "--from", wp_admin.as_str()];
    let cli = |args: &[&str]| -> Result<String> {
        let (ok, text) = b.heddle(&b.nodes[1], &[args, &from[..]].concat())?;
        if ok {
            Ok(text)
        } else {
            Err(TestbedError::Environment(format!("heddle {args:?}: {text}")))
        }
    };
    let table = cli(&["stat", "deploy", "-n", NAMESPACE, "--window", "5m"])?;
    s.say(format!("$ heddle stat deploy -n {NAMESPACE}   (node-b's agent and the waypoint)\n{table}"));
    let rows: Value = serde_json::from_str(&cli(&["-o", "json", "stat", "deploy", "-n", NAMESPACE, "--window", "5m"])?)
        .map_err(|e| TestbedError::Environment(format!("stat json: {e}")))?;
    let row = |name: &str| rows.as_array().and_then(|r| r.iter().find(|r| r["name"] == name)).cloned();
    for service in ["productpage", "details", "reviews", "ratings"] {
        let name = format!("{NAMESPACE}/bookinfo-{service}");
        let r = row(&name).unwrap_or(Value::Null);
        s.check(
            r["requests"].as_u64() > Some(0) && r["p99_ms"].as_f64() > Some(0.0),
            format!("{name}: {} requests, success {}, p99 {} ms", r["requests"], r["success_rate"], r["p99_ms"]),
        );
    }
    let svc_table = cli(&["stat", "svc", "-n", NAMESPACE, "--window", "5m"])?;
    s.say(format!("$ heddle stat svc -n {NAMESPACE}\n{svc_table}"));
    let svcs: Value = serde_json::from_str(&cli(&["-o", "json", "stat", "svc", "-n", NAMESPACE, "--window", "5m"])?)
        .map_err(|e| TestbedError::Environment(format!("stat json: {e}")))?;
    let ratings = svcs.as_array().and_then(|r| r.iter().find(|r| r["name"] == "default/ratings")).cloned();
    let rate = ratings.as_ref().and_then(|r| r["success_rate"].as_f64());
    s.check(
        rate.is_some_and(|r| r < 1.0),
        format!("service default/ratings: success {rate:?}, showing the injected aborts (the failing service found)"),
    );
    let dot = cli(&["-o", "dot", "graph", "--window", "5m"])?;
    let dot_file = b.out_dir.join("bookinfo-graph.dot");
    let svg_file = b.out_dir.join("bookinfo-graph.svg");
    std::fs::write(&dot_file, &dot).map_err(|e| TestbedError::io(format!("write {}", dot_file.display()), e))?;
    let rendered =
        Command::new("dot").arg("-Tsvg").arg("-o").arg(&svg_file).arg(&dot_file).status().is_ok_and(|st| st.success());
    let svg = std::fs::read_to_string(&svg_file).unwrap_or_default();
    s.check(
        rendered && svg.contains("<svg") && svg.contains("default/ratings"),
        format!("$ heddle graph -o dot | dot -Tsvg > {}   (Graphviz)", svg_file.display()),
    );
    let edges: Vec<&str> = dot.lines().filter(|l| l.contains("->")).collect();
    s.say(format!("the graph's edges:\n{}", edges.join("\n")));
    // Callers are drawn as the Service they serve: one chain.
    for (from, to) in [
        ("default/curl", "default/productpage"),
        ("default/productpage", "default/details"),
        ("default/productpage", "default/reviews"),
        ("default/reviews", "default/ratings"),
    ] {
        let found = edges.iter().any(|l| l.contains(&format!("\"{from}\" -> \"{to}\"")) && l.contains("mTLS"));
        s.check(found, format!("edge {from} -> {to}, over mTLS"));
    }

    trace(b, &mut s)?;
    Ok(s)
}

/// One request (jason's, so reviews v3 calls ratings) continued from the
/// caller's W3C context: every service's server and client span, linked.
fn trace(b: &Bookinfo, s: &mut Step) -> Result<()> {
    let headers = vec!["end-user: jason".to_owned(), format!("traceparent: 00-{TRACE}-{CALLER_SPAN}-01")];
    let p = page(b, &headers)?;
    s.say(format!(
        "$ curl -H 'traceparent: 00-{TRACE}-{CALLER_SPAN}-01' -H 'end-user: jason' http://productpage:9080/productpage -> {}",
        p["status"]
    ));
    let spans = until("the trace's eight spans", || {
        let got: Vec<Value> = b.spans()?.into_iter().filter(|s| s["trace_id"] == TRACE).collect();
        Ok((got.len() >= 8).then_some(got))
    })?;
    let server_of = |service: &str| {
        spans
            .iter()
            .find(|s| s["kind"] == SPAN_SERVER && s["attributes"]["heddle.destination.service"] == service)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let hop = |service: &str| {
        let server = server_of(service);
        let client = spans
            .iter()
            .find(|s| s["kind"] == SPAN_CLIENT && !server.is_null() && s["parent_span_id"] == server["span_id"])
            .cloned()
            .unwrap_or(Value::Null);
        (server, client)
    };
    let (page_srv, page_cli) = hop("default/productpage");
    let (details_srv, details_cli) = hop("default/details");
    let (reviews_srv, reviews_cli) = hop("default/reviews");
    let (ratings_srv, ratings_cli) = hop("default/ratings");
    let child =
        |c: &Value, parent: &Value| !c.is_null() && !parent.is_null() && c["parent_span_id"] == parent["span_id"];
    let links = [
        ("productpage's server span <- the caller", !page_srv.is_null() && page_srv["parent_span_id"] == CALLER_SPAN),
        ("productpage client <- server", child(&page_cli, &page_srv)),
        ("details server <- productpage client", child(&details_srv, &page_cli)),
        ("details client <- server", child(&details_cli, &details_srv)),
        ("reviews server <- productpage client", child(&reviews_srv, &page_cli)),
        ("reviews client <- server", child(&reviews_cli, &reviews_srv)),
        ("ratings server <- reviews client", child(&ratings_srv, &reviews_cli)),
        ("ratings client <- server", child(&ratings_cli, &ratings_srv)),
    ];
    let broken: Vec<&str> = links.iter().filter(|(_, ok)| !ok).map(|(what, _)| *what).collect();
    let mut tree = String::new();
    print_tree(&spans, CALLER_SPAN, 1, &mut tree);
    s.say(format!("trace {TRACE} as the OTLP receiver decoded it:\n{tree}"));
    s.check(
        spans.len() == 8 && broken.is_empty(),
        format!(
            "one trace: {} spans, server and client at each of productpage, details, reviews and ratings, \
             each linked to its parent (broken links: {broken:?})",
            spans.len()
        ),
    );
    Ok(())
}

fn print_tree(spans: &[Value], parent: &str, depth: usize, out: &mut String) {
    for s in spans.iter().filter(|s| s["parent_span_id"] == parent) {
        let ms = (s["end"].as_u64().unwrap_or(0).saturating_sub(s["start"].as_u64().unwrap_or(0))) / 1_000_000;
        let _ = writeln!(
            out,
            "{}{} [{}] {} ms, status {}",
            "  ".repeat(depth),
            s["name"].as_str().unwrap_or("?"),
            if s["kind"] == SPAN_SERVER { "server" } else { "client" },
            ms,
            s["attributes"]["http.response.status_code"]
        );
        if let Some(id) = s["span_id"].as_str() {
            print_tree(spans, id, depth + 1, out);
        }
    }
}
