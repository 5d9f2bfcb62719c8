//! End-to-end tests of the waypoint (the L7 proxy): real agents, a real
//! mesh CA, a `mesh-agent waypoint` in its own pod, real HTTP/1.1, HTTP/2
//! and gRPC clients and servers (Python's http.client, curl, nghttp,
//! grpcio; `pod-app http`), across two nodes.
//!
//! ```text
//! node-a: client (enrolled)
//! node-b: waypoint (runs demo/waypoint, sa waypoint)
//!         api-v1, api-v2 (enrolled; app=api, version=v1|v2; HTTP :8080, echo :9090)
//! services demo/api 10.96.0.20 (80->8080, 8000->8080, 9000->9090), demo/api-v1 10.96.0.21, demo/api-v2 10.96.0.22
//! namespace demo: useWaypoint waypoint
//! ```
//!
//! What is asserted is what users observe: which version answered, status
//! codes and headers, bytes delivered, the records in `heddle flows` and
//! the waypoint's `/routes` and `/metrics`. Needs root; fails under
//! `CI=true` when it cannot run.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::l7::{self, count};
use common::waypoint_mesh::{requests, run_waypoint, url, Extras, API_VIP, GRPC_PORT, V1_VIP};
use common::{environment_ready, expect_delivered, TRUST_DOMAIN};
use heddle_tests::env::{asset, NGHTTP};
use heddle_tests::{poll_until, require_tool, Check, ClientSpec, Direction};
use serde_json::{json, Value};

#[test]
fn http1_and_http2_through_the_waypoint_are_balanced_per_request_and_recorded_with_both_identities() {
    run_waypoint("waypoint_basic", Extras::default(), |m| {
        // 40 requests on ONE keep-alive connection reach both versions: the
        // waypoint balances requests, not connections.
        let r = m.load(&url("/hello"), 40, &[])?;
        ensure!(r["errors"] == 0 && r["status"]["200"] == 40, "HTTP/1.1 load: {r}");
        ensure!(count(&r, "api-v1") > 0 && count(&r, "api-v2") > 0, "one connection, both endpoints: {r}");
        // ... over pooled upstream connections: they went back to the pool,
        // and the destination agent saw a few tunnel streams from the
        // waypoint, not one per request.
        let pool = m.waypoint.stats()?;
        ensure!(pool["upstreamIdleHttp1"].as_u64().is_some_and(|n| n >= 1), "no pooled upstream: {pool}");
        let from_waypoint = m
            .agent_b
            .flows()?
            .iter()
            .filter(|f| {
                f.direction == Direction::Inbound && f.src_identity.as_deref() == Some(waypoint_identity().as_str())
            })
            .count();
        ensure!(from_waypoint <= 8, "40 requests opened {from_waypoint} upstream connections: the pool is not reused");
        // curl, HTTP/1.1.
        let out = m.client.run({
            let mut c = Command::new("curl");
            c.args(["-sS", "--max-time", "10", "-D", "-", &url("/curl?x=1")]);
            c
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success() && text.contains("200") && text.contains("x-served-by: api-v"), "curl: {text}");
        // The backend sees the client's identity in x-forwarded-client-cert.
        ensure!(text.contains(&format!("URI={}", m.client.spiffe_id())), "XFCC at the backend: {text}");
        // nghttp, HTTP/2 with prior knowledge (h2c).
        require_tool(NGHTTP)?;
        let out = m.client.run({
            let mut c = Command::new("nghttp");
            c.args(["-v", "-t", "10", &url("/h2"), &url("/h2b")]);
            c
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.contains(":status: 200") && text.contains("\"version\":\"HTTP/2.0\""),
            "nghttp: {text}"
        );
        // Records: the waypoint's per request, with method, path, status,
        // upstream, both identities.
        let h2 = requests(&m.waypoint, 2, |f| f["http"]["protocol"] == "HTTP/2")?;
        let rec = &h2[0];
        ensure!(
            rec["http"]["method"] == "GET"
                && rec["http"]["status"] == 200
                && rec["src_identity"] == json!(m.client.spiffe_id())
                && rec["dst_identity"].as_str().is_some_and(|d| d.contains("/ns/demo/sa/api-v"))
                && rec["http"]["upstream"].as_str().is_some_and(|u| u.ends_with(":8080")),
            "waypoint record: {rec}"
        );
        // The source agent sent the connection to the waypoint, as the client.
        let out = m.agent_a.wait_for_flows("outbound to the waypoint", Duration::from_secs(10), |fs| {
            fs.iter().any(|f| {
                f.direction == Direction::Outbound && f.dst_identity.as_deref() == Some(waypoint_identity().as_str())
            })
        })?;
        ensure!(!out.is_empty(), "agent a flows");
        // The destination agent saw the waypoint's identity, over mTLS.
        m.agent_b.wait_for_flows("inbound from the waypoint", Duration::from_secs(10), |fs| {
            fs.iter().any(|f| {
                f.direction == Direction::Inbound
                    && f.src_identity.as_deref() == Some(waypoint_identity().as_str())
                    && f.is_mutual_tls()
            })
        })?;
        // Istio's L7 metric names, reporter=waypoint.
        let metrics = m.waypoint.metrics()?;
        ensure!(
            metrics.lines().any(|l| l.starts_with("heddle_requests_total{")
                && l.contains("reporter=\"waypoint\"")
                && l.contains("response_code=\"200\"")
                && l.contains("destination_workload=\"api-v")),
            "metrics: {metrics}"
        );
        ensure!(metrics.contains("heddle_request_duration_seconds_bucket"), "duration histogram missing");
        // `heddle flows --follow` on the waypoint: its request records as
        // they happen, with the L7 filters applied to the stream.
        let mut cmd = Command::new(heddle_tests::heddle_binary()?);
        cmd.args(["--agent", "http://127.0.0.1:15000", "flows", "--follow", "--last", "0", "-o", "jsonl"]);
        cmd.args(["--path", "/follow", "--http-status", "2xx"]);
        let mut follower = m.waypoint.pod.spawn(cmd)?;
        std::thread::sleep(Duration::from_millis(300));
        let r = m.load(&url("/follow"), 3, &[])?;
        ensure!(r["status"]["200"] == 3, "{r}");
        m.load(&url("/not-followed"), 2, &[])?;
        let lines = heddle_tests::poll_until(
            "three request records on the waypoint's --follow stream",
            Duration::from_secs(10),
            Duration::from_millis(100),
            || {
                let text = follower.log_text();
                let recs: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
                let done = recs.iter().filter(|r| r["event"] == "request").count() >= 3;
                Ok(if done { heddle_tests::Check::Ready(recs) } else { heddle_tests::Check::Pending(text) })
            },
        )?;
        ensure!(
            lines.iter().all(|r| r["http"]["path"] == "/follow" && r["http"]["status"] == 200),
            "the stream's filters: {lines:?}"
        );
        ensure!(follower.try_wait()?.is_none(), "heddle flows --follow exited");
        follower.stop(Duration::from_secs(2))?;
        // `heddle flows` L7 filters against the waypoint's admin API.
        let status = m.waypoint.flows("http_status=2xx&method=get&path=/h2")?;
        ensure!(
            status.len() >= 2
                && status.iter().all(|f| f["http"]["path"].as_str().is_some_and(|p| p.starts_with("/h2"))),
            "filtered: {status:?}"
        );
        Ok(())
    });
}

const CANARY: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-canary, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: api, port: 80}]
  rules:
  - backendRefs:
    - {name: api-v1, port: 80, weight: W1}
    - {name: api-v2, port: 80, weight: W2}
";

fn canary(w1: u32, w2: u32) -> String {
    CANARY.replace("W1", &w1.to_string()).replace("W2", &w2.to_string())
}

#[test]
fn canary_weights_hold_within_binomial_tolerance_and_changing_them_under_load_loses_no_request() {
    run_waypoint("waypoint_canary", Extras::default(), |m| {
        m.routes(&canary(90, 10), "httproute/demo/api-canary")?;
        let r = m.load(&url("/canary"), 2000, &[])?;
        let v2 = count(&r, "api-v2");
        // 2,000 draws at p = 0.1: mean 200, sd 13.4; ±4.5 sd.
        ensure!(r["errors"] == 0 && r["status"]["200"] == 2000, "canary load: {r}");
        ensure!((140..=260).contains(&v2), "90/10 split gave {v2} of 2000 to v2: {r}");
        eprintln!("90/10 over 2000 requests: v1 {} v2 {v2}", count(&r, "api-v1"));
        // Shift 50/50 then 0/100 while 3,000 requests run.
        let client = m.client.clone();
        let load = std::thread::spawn(move || {
            let mut cmd = Command::new("python3");
            cmd.arg(asset("httpc.py")).args(["load", &url("/shift"), "3000"]);
            client.run(cmd)
        });
        std::thread::sleep(Duration::from_millis(300));
        m.routes(&canary(50, 50), "httproute/demo/api-canary")?;
        std::thread::sleep(Duration::from_millis(500));
        m.tb.set_routes("routes", &canary(0, 100))?;
        std::thread::sleep(Duration::from_millis(1500));
        let out = load.join().expect("load thread")?;
        let r: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(r["errors"] == 0 && r["status"]["200"] == 3000, "requests lost while weights changed: {r}");
        // 0/100 is in force: everything goes to v2.
        let r = m.load(&url("/after"), 200, &[])?;
        ensure!(count(&r, "api-v2") == 200, "after 0/100: {r}");
        // `heddle routes` counts the rule's requests.
        let routes = m.waypoint.routes()?;
        let hits: u64 =
            routes["routes"][0]["hits"].as_array().into_iter().flatten().filter_map(|h| h["requests"].as_u64()).sum();
        ensure!(hits >= 5200, "rule hits after 5,200 requests: {routes}");
        Ok(())
    });
}

/// Routes modelled on the Gateway API mesh conformance tests
/// (conformance/tests/mesh-*.yaml): matching, redirects, rewrites, header
/// modifiers, ports.
const CONFORMANCE: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mesh-matching, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: version, value: two}]}]
    backendRefs: [{name: api-v2, port: 80}]
  - matches: [{path: {type: Exact, value: /exact}}, {queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: api-v2, port: 80}]
  - matches: [{method: POST, path: {type: PathPrefix, value: /method}}]
    backendRefs: [{name: api-v2, port: 80}]
  - matches: [{path: {type: RegularExpression, value: '/re/[0-9]+'}}]
    backendRefs: [{name: api-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /redirect}}]
    filters:
    - {type: RequestRedirect, requestRedirect: {hostname: example.org, statusCode: 301}}
  - matches: [{path: {type: PathPrefix, value: /redirect-path}}]
    filters:
    - {type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /moved}}}
  - matches: [{path: {type: PathPrefix, value: /rewrite}}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}
    backendRefs: [{name: api-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /headers}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-set, value: set}], add: [{name: x-add, value: added}], remove: [x-remove]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-resp, value: from-route}]}
    backendRefs: [{name: api-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /scheme}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
  - matches: [{path: {type: PathPrefix, value: /port}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083, statusCode: 308}}]
  - matches: [{path: {type: PathPrefix, value: /full-redirect}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}, statusCode: 307}
  - matches: [{path: {type: PathPrefix, value: /see-other}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: other.example, port: 8080, statusCode: 303}}]
  - matches: [{path: {type: PathPrefix, value: /rewrite-full}}]
    filters:
    - {type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplaceFullPath, replaceFullPath: /one}}}
    backendRefs: [{name: api-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /strip/}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: api-v1, port: 80}]
  - backendRefs: [{name: api-v1, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mesh-ports, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: api, port: 8000}]
  rules:
  - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-port, value: '8000'}]}}]
    backendRefs: [{name: api-v2, port: 80}]
";

fn waypoint_identity() -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/demo/sa/waypoint")
}

#[test]
fn route_matching_and_filters_behave_as_the_gateway_api_mesh_conformance_cases_expect() {
    run_waypoint("waypoint_matching", Extras::default(), |m| {
        // (method, path, headers) -> (status, served by, path the backend saw, extra check)
        type Case = (
            &'static str,
            &'static str,
            Vec<(&'static str, &'static str)>,
            u16,
            Option<&'static str>,
            Option<&'static str>,
        );
        m.routes(CONFORMANCE, "httproute/demo/mesh-matching")?;
        let cases: Vec<Case> = vec![
            ("GET", "/", vec![], 200, Some("api-v1"), Some("/")),
            ("GET", "/v2", vec![], 200, Some("api-v2"), Some("/v2")),
            ("GET", "/v2/deeper", vec![], 200, Some("api-v2"), Some("/v2/deeper")),
            ("GET", "/v2x", vec![], 200, Some("api-v1"), Some("/v2x")),
            ("GET", "/", vec![("version", "two")], 200, Some("api-v2"), Some("/")),
            ("GET", "/exact", vec![], 200, Some("api-v2"), Some("/exact")),
            ("GET", "/exact/no", vec![], 200, Some("api-v1"), Some("/exact/no")),
            ("GET", "/q?animal=whale", vec![], 200, Some("api-v2"), Some("/q?animal=whale")),
            ("GET", "/q?animal=dolphin", vec![], 200, Some("api-v1"), Some("/q?animal=dolphin")),
            ("POST", "/method", vec![], 200, Some("api-v2"), Some("/method")),
            ("GET", "/method", vec![], 200, Some("api-v1"), Some("/method")),
            ("GET", "/re/42", vec![], 200, Some("api-v2"), Some("/re/42")),
            ("GET", "/re/x", vec![], 200, Some("api-v1"), Some("/re/x")),
            ("GET", "/redirect", vec![], 301, None, None),
            ("GET", "/redirect-path/a", vec![], 302, None, None),
            ("GET", "/rewrite/one?k=v", vec![], 200, Some("api-v1"), Some("/new/one?k=v")),
            ("GET", "/headers", vec![("x-remove", "gone"), ("x-set", "client")], 200, Some("api-v1"), Some("/headers")),
            // MeshHTTPRouteSchemeRedirect, -RedirectPort, -RedirectPath,
            // -RedirectHostAndStatus (303, 307, 308), -RewritePath and
            // -RewriteHost: the Location or what the backend saw.
            ("GET", "/scheme/x", vec![], 302, None, None),
            ("GET", "/port?k=v", vec![], 308, None, None),
            ("GET", "/full-redirect/deep", vec![], 307, None, None),
            ("GET", "/see-other", vec![], 303, None, None),
            ("GET", "/rewrite-full/x?k=v", vec![], 200, Some("api-v2"), Some("/one?k=v")),
            ("GET", "/strip/three", vec![], 200, Some("api-v1"), Some("/three")),
            ("GET", "/strip", vec![], 200, Some("api-v1"), Some("/")),
            // MeshPorts: the route attached to port 8000 only.
            ("GET", "http://10.96.0.20:8000/ports", vec![], 200, Some("api-v2"), Some("/ports")),
        ];
        let list: Vec<Value> = cases
            .iter()
            .map(|(method, path, headers, ..)| {
                let h: BTreeMap<&str, &str> = headers.iter().copied().collect();
                json!({"method": method, "url": url(path), "headers": h, "body": if *method == "POST" { Some("x") } else { None }})
            })
            .collect();
        let file = m.tb.temp_dir().join("cases.json");
        std::fs::write(&file, serde_json::to_vec(&list)?)?;
        let results = m.httpc(&["cases", &file.display().to_string()])?;
        let results = results.as_array().context("results")?;
        for ((method, path, _, status, served, seen), got) in cases.iter().zip(results) {
            let what = format!("{method} {path}: {got}");
            ensure!(got["status"] == *status, "status: {what}");
            if let Some(pod) = served {
                ensure!(got["headers"]["x-served-by"] == *pod, "backend: {what}");
            }
            if let Some(seen) = seen {
                ensure!(got["body"]["path"] == *seen, "path at the backend: {what}");
            }
        }
        let loc = |i: usize| results[i]["headers"]["location"].as_str().unwrap_or("").to_owned();
        ensure!(loc(13) == "http://example.org/redirect", "redirect hostname: {}", loc(13));
        ensure!(loc(14) == format!("http://{API_VIP}/moved/a"), "redirect path: {}", loc(14));
        let hdrs = &results[16]["body"]["headers"];
        ensure!(
            hdrs["x-set"] == "set" && hdrs["x-add"] == "added" && hdrs.get("x-remove").is_none(),
            "request headers: {hdrs}"
        );
        ensure!(results[16]["headers"]["x-resp"] == "from-route", "response header: {}", results[16]);
        for (i, location) in [
            (17, format!("https://{API_VIP}/scheme/x")),
            (18, format!("http://{API_VIP}:8083/port?k=v")),
            (19, format!("http://{API_VIP}/full-path-replacement")),
            (20, "http://other.example:8080/see-other".to_owned()),
        ] {
            ensure!(loc(i) == location, "{} {}: Location {}", cases[i].0, cases[i].1, loc(i));
        }
        ensure!(results[21]["body"]["host"] == "rewritten.example", "rewritten host: {}", results[21]);
        ensure!(results[24]["headers"]["x-port"] == "8000", "port 8000's route: {}", results[24]);
        ensure!(
            results.iter().take(24).all(|r| r["headers"].get("x-port").is_none()),
            "port 8000's route applied to port 80"
        );
        // Every request is recorded with the route and rule that matched.
        let recs = requests(&m.waypoint, cases.len(), |_| true)?;
        ensure!(
            recs.iter().any(|r| r["http"]["route"] == "httproute/demo/mesh-matching"
                && r["http"]["rule"] == 3
                && r["http"]["path"] == "/re/42"),
            "records name route and rule: {recs:?}"
        );
        Ok(())
    });
}

const BROKEN: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cors, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: api-v1}]
  rules:
  - filters: [{type: CORS, cors: {allowOrigins: ['https://a.example']}}]
    backendRefs: [{name: api-v1, port: 80}]
    retryy: {attempts: 3}
    retry: {attempts: 99}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: missing-backend, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: api}]
  rules:
  - backendRefs: [{name: does-not-exist, port: 80}]
---
kind: HTTPRoute
apiVersion: gateway.networking.k8s.io/v1
metadata: {name: bad-enum, namespace: demo}
spec:
  rules: [{matches: [{path: {type: Glob, value: /x}}]}]
";

#[test]
fn routes_heddle_cannot_honour_are_reported_with_conditions_and_never_half_applied() {
    run_waypoint("waypoint_status", Extras::default(), |m| {
        m.tb.set_routes("routes", BROKEN)?;
        let cors = m.waypoint.wait_route("httproute/demo/cors", false)?;
        let problems = cors["problems"].to_string();
        ensure!(
            problems.contains("filter type CORS is not supported")
                && problems.contains("retryy: unknown field")
                && problems.contains("retry.attempts: 99 is not within 0-10"),
            "cors: {cors}"
        );
        ensure!(cors["parents"][0]["conditions"][0]["reason"] == "UnsupportedValue", "condition: {cors}");
        // Not applied: api-v1 traffic is untouched (no route).
        let r = m.load(&format!("http://{V1_VIP}/"), 5, &[])?;
        ensure!(count(&r, "api-v1") == 5, "{r}");
        // A missing backend: accepted, ResolvedRefs=False, and 500 for its share.
        let missing = m.waypoint.wait_route("httproute/demo/missing-backend", true)?;
        ensure!(missing.to_string().contains("BackendNotFound"), "missing backend: {missing}");
        let r = m.load(&url("/"), 5, &[])?;
        ensure!(r["status"]["500"] == 5, "requests to a missing backend: {r}");
        // A document that does not parse is named with its file and position.
        let routes = m.waypoint.routes()?;
        let bad = routes["routes"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["problems"].to_string().contains("Glob")))
            .cloned();
        ensure!(
            bad.is_some_and(|b| b["source"].as_str().is_some_and(|s| s.ends_with("routes.yaml#3"))),
            "bad document: {routes}"
        );
        // `heddle routes` shows the same, as a person reads it.
        let mut cmd = Command::new(heddle_tests::heddle_binary()?);
        cmd.args(["--agent", "http://127.0.0.1:15000", "routes"]);
        let out = m.waypoint.pod.run(cmd)?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success()
                && text.contains("httproute/demo/cors")
                && text.contains("NO")
                && text.contains("BackendNotFound"),
            "heddle routes:\n{text}"
        );
        Ok(())
    });
}

const GRPC_ROUTE: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: api, port: 50051}]
  rules:
  - matches: [{method: {service: heddle.test.Echo, method: Chat}}]
    backendRefs: [{name: api-v2, port: 50051}]
  - backendRefs: [{name: api-v1, port: 50051}]
";

#[test]
fn grpc_unary_and_bidirectional_streaming_cross_the_waypoint_routed_by_grpcroute() {
    if environment_ready() {
        let probe = Command::new("python3").args(["-c", "import grpc"]).status();
        assert!(probe.is_ok_and(|s| s.success()), "grpcio is not installed (cargo xtask setup installs it)");
    }
    run_waypoint("waypoint_grpc", Extras { grpc: true, ..Extras::default() }, |m| {
        m.routes(GRPC_ROUTE, "grpcroute/demo/echo")?;
        let mut cmd = Command::new("python3");
        cmd.arg(asset("grpc_app.py")).args(["call", &format!("{API_VIP}:{GRPC_PORT}"), "20", "50"]);
        let out = m.client.run(cmd)?;
        ensure!(out.status.success(), "grpc client: {}", String::from_utf8_lossy(&out.stderr));
        let r: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(r["unary"]["api-v1"] == 20, "unary calls go to v1 (rule 1): {r}");
        ensure!(
            r["chat_ok"] == true && r["chat"][0].as_str().is_some_and(|c| c.starts_with("api-v2:")),
            "Chat streams to v2 (rule 0): {r}"
        );
        ensure!(r["failed_status"] == "UNAVAILABLE", "a server's gRPC status reaches the client: {r}");
        let recs = requests(&m.waypoint, 22, |f| f["http"]["protocol"] == "HTTP/2")?;
        ensure!(
            recs.iter().any(|f| f["http"]["path"] == "/heddle.test.Echo/Chat"
                && f["http"]["grpc_status"] == 0
                && f["http"]["rule"] == 0)
                && recs.iter().any(|f| f["http"]["path"] == "/heddle.test.Echo/Fail" && f["http"]["grpc_status"] == 14),
            "gRPC records: {recs:?}"
        );
        let metrics = m.waypoint.metrics()?;
        ensure!(
            metrics.lines().any(|l| l.starts_with("heddle_requests_total{")
                && l.contains("request_protocol=\"grpc\"")
                && l.contains("grpc_response_status=\"14\"")),
            "grpc metrics: {metrics}"
        );
        Ok(())
    });
}

#[test]
fn non_http_bytes_and_websocket_upgrades_pass_through_and_removing_the_label_restores_the_l4_path() {
    run_waypoint("waypoint_passthrough", Extras::default(), |m| {
        // Not HTTP on a waypoint service's port: passed through as L4.
        let to = SocketAddr::from((API_VIP, 9000));
        expect_delivered(&m.client, &ClientSpec::to(to).bytes(100_000).conns(3))?;
        let pass = poll_until("passthrough records", Duration::from_secs(10), Duration::from_millis(100), || {
            let fs = m.waypoint.flows("last=1000")?;
            let got: Vec<Value> =
                fs.into_iter().filter(|f| f["passthrough"].is_string() && f["event"] == "close").collect();
            Ok(if got.len() >= 3 { Check::Ready(got) } else { Check::Pending(format!("{}", got.len())) })
        })?;
        ensure!(
            pass[0]["bytes_sent"] == 100_000 && pass[0]["passthrough"].as_str().is_some_and(|p| p.contains("not HTTP")),
            "{}",
            pass[0]
        );
        // A WebSocket-style upgrade: 101, then raw bytes both ways.
        let r = m.httpc(&["upgrade", &API_VIP.to_string(), "80", "hello-upgraded-bytes"])?;
        ensure!(
            r["status_line"].as_str().is_some_and(|s| s.contains("101")) && r["echo"] == "hello-upgraded-bytes",
            "upgrade: {r}"
        );
        // Remove the namespace's waypoint: new connections take the L4 path.
        m.tb.set_namespace_waypoint("demo", None)?;
        m.agent_a.reload()?;
        let before = m.waypoint.flows("last=100000")?.len();
        // The agents re-read the configuration: poll until a new connection
        // goes straight to an endpoint (its tunnel names the endpoint).
        let mut direct = false;
        for _ in 0..50 {
            let r = m.load(&url("/l4"), 1, &[])?;
            ensure!(r["errors"] == 0, "{r}");
            let fs = m.agent_a.flows()?;
            direct = fs.iter().rev().take(3).any(|f| {
                f.direction == Direction::Outbound && f.dst_identity.as_deref().is_some_and(|d| d.contains("/sa/api-v"))
            });
            if direct {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        ensure!(direct, "traffic did not return to the L4 path after the label was removed");
        let r = m.load(&url("/l4"), 10, &[])?;
        ensure!(r["status"]["200"] == 10, "{r}");
        let after = m.waypoint.flows("last=100000")?.len();
        ensure!(after == before, "the waypoint saw traffic after the label was removed ({before} -> {after} records)");
        Ok(())
    });
}

#[test]
fn hostile_http_gets_a_4xx_or_a_closed_connection_and_the_waypoint_keeps_serving_others() {
    run_waypoint("waypoint_hostile", Extras::default(), |m| {
        let script = format!(
            r#"
import socket, json, time
def send(data, wait=3):
    s = socket.create_connection(("{API_VIP}", 80), timeout=15)
    s.sendall(data)
    s.settimeout(wait + 12)
    try:
        got = s.recv(200)
    except Exception as e:
        got = repr(e).encode()
    s.close()
    return got.decode("latin-1")
out = {{}}
out["garbage_request_line"] = send(b"GET /\x00\x01 HTTP/1.1\r\n\r\n")
out["oversized_headers"] = send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 200000 + b"\r\n\r\n")
s = socket.create_connection(("{API_VIP}", 80), timeout=30)
s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
t = time.time()
try:
    got = s.recv(100)
except Exception as e:
    got = b""
out["slowloris_closed_after_s"] = round(time.time() - t, 1)
print(json.dumps(out))
"#
        );
        let mut cmd = Command::new("python3");
        cmd.args(["-c", &script]);
        let slow = {
            let client = m.client.clone();
            std::thread::spawn(move || client.run(cmd))
        };
        // Meanwhile, well-behaved requests are served.
        let r = m.load(&url("/ok"), 200, &[])?;
        ensure!(r["status"]["200"] == 200, "others during the attack: {r}");
        let out = slow.join().expect("attack thread")?;
        let r: Value =
            serde_json::from_slice(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
        ensure!(r["garbage_request_line"].as_str().is_some_and(|s| s.starts_with("HTTP/1.1 400")), "garbage: {r}");
        ensure!(
            r["oversized_headers"]
                .as_str()
                .is_some_and(|s| s.starts_with("HTTP/1.1 431") || s.is_empty() || s.contains("Reset")),
            "oversized: {r}"
        );
        let closed = r["slowloris_closed_after_s"].as_f64().unwrap_or(0.0);
        ensure!(
            (8.0..20.0).contains(&closed),
            "slowloris connection closed after {closed} s (header timeout 10 s): {r}"
        );
        let r = m.load(&url("/after"), 20, &[])?;
        ensure!(r["status"]["200"] == 20, "after the attack: {r}");
        Ok(())
    });
}

const CROSS_NAMESPACE: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-store, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /store}}]
    backendRefs: [{name: store, namespace: shared, port: 80}]
  - backendRefs: [{name: api-v1, port: 80}]
";

const STORE_GRANT: &str = r"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: demo-routes, namespace: shared}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: demo}]
  to: [{group: '', kind: Service, name: store}]
";

#[test]
fn a_backend_in_another_namespace_is_served_only_once_a_reference_grant_there_permits_it() {
    run_waypoint("waypoint_refgrant", Extras { shared_store: true, ..Extras::default() }, |m| {
        // Without a grant: the route is in force, its cross-namespace
        // backend is RefNotPermitted and its requests get 500.
        let status = m.routes(CROSS_NAMESPACE, "httproute/demo/to-store")?;
        ensure!(status.to_string().contains("RefNotPermitted"), "status without a grant: {status}");
        let r = m.load(&url("/store/item"), 5, &[])?;
        ensure!(r["status"]["500"] == 5, "without a grant: {r}");
        let r = m.load(&url("/other"), 5, &[])?;
        ensure!(r["status"]["200"] == 5 && count(&r, "api-v1") == 5, "the other rule: {r}");
        // The grant, in its own file: the same route now reaches the store.
        m.tb.set_routes("grants", STORE_GRANT)?;
        let served =
            l7::load_until(&m.client, &url("/store/item"), 5, Duration::from_secs(10), |r| r["status"]["200"] == 5)?;
        ensure!(count(&served, "store") == 5, "served by the store: {served}");
        let routes = m.waypoint.routes()?;
        let to_store = routes["routes"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["route"] == "httproute/demo/to-store"))
            .cloned()
            .unwrap_or_default();
        ensure!(!to_store.to_string().contains("RefNotPermitted"), "status with the grant: {to_store}");
        // Removing the grant takes the permission back.
        m.tb.set_routes("grants", "")?;
        l7::load_until(&m.client, &url("/store/item"), 2, Duration::from_secs(10), |r| r["status"]["500"] == 2)?;
        Ok(())
    });
}

/// A raw HTTP/2 (h2c) client in Python: frames written by hand, so it can
/// misbehave in ways a real client library refuses to.
const H2_FLOOD: &str = r#"
import json, socket, struct, sys, time
VIP = sys.argv[1]
def frame(kind, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload
def connect():
    s = socket.create_connection((VIP, 80), timeout=20)
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0))
    return s
def drain(s, limit):
    """Reads until the server closes or `limit` s pass: (closed, GOAWAY code, SETTINGS acks)."""
    buf, closed, t = b"", False, time.time()
    s.settimeout(0.5)
    while time.time() - t < limit:
        try:
            d = s.recv(1 << 20)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            closed = True
            break
        if not d:
            closed = True
            break
        buf += d
    goaway, acks, i = None, 0, 0
    while i + 9 <= len(buf):
        n = int.from_bytes(buf[i:i + 3], "big")
        kind, flags = buf[i + 3], buf[i + 4]
        if kind == 7 and i + 17 <= len(buf):
            goaway = int.from_bytes(buf[i + 13:i + 17], "big")
        if kind == 4 and flags & 1:
            acks += 1
        i += 9 + n
    return closed, goaway, acks
def send_all(s, data):
    try:
        s.sendall(data)
        return True
    except (ConnectionResetError, BrokenPipeError):
        return False
out = {}
# Rapid reset: requests opened and cancelled at once, 1,000 of them.
s = connect()
headers = b"\x82\x84\x86\x41\x08api.demo"
burst = b"".join(frame(1, 0x5, sid, headers) + frame(3, 0, sid, struct.pack(">I", 8)) for sid in range(1, 2001, 2))
send_all(s, burst)
closed, goaway, _ = drain(s, 10)
out["rapid_reset"] = {"closed": closed, "goaway": goaway}
s.close()
# SETTINGS flood: 100,000 frames, acknowledgements left unread, then read.
s = connect()
t = time.time()
sent = send_all(s, frame(4, 0, 0) * 100000)
out["settings_flood"] = {"sent": sent, "send_s": round(time.time() - t, 1)}
closed, goaway, acks = drain(s, 5)
out["settings_flood"].update({"closed": closed, "goaway": goaway, "acks": acks})
s.close()
print(json.dumps(out))
"#;

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

#[test]
fn h2_rapid_reset_and_settings_floods_close_or_stall_only_the_hostile_connection() {
    run_waypoint("waypoint_h2flood", Extras::default(), |m| {
        let before = rss_kib(m.waypoint.pid())?;
        let attack = {
            let client = m.client.clone();
            let mut cmd = Command::new("python3");
            cmd.args(["-c", H2_FLOOD, &API_VIP.to_string()]);
            std::thread::spawn(move || client.run(cmd))
        };
        // Meanwhile, well-behaved clients (HTTP/1.1 and HTTP/2) are served.
        let r = m.load(&url("/during"), 300, &[])?;
        ensure!(r["status"]["200"] == 300, "others during the floods: {r}");
        let out = attack.join().expect("attack thread")?;
        let r: Value =
            serde_json::from_slice(&out.stdout).with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
        // Rapid reset: the connection is closed with GOAWAY ENHANCE_YOUR_CALM (0xb).
        ensure!(
            r["rapid_reset"]["closed"] == true && r["rapid_reset"]["goaway"] == 0xb,
            "rapid reset not stopped: {r}"
        );
        // SETTINGS flood: acknowledged (the protocol requires it) without
        // the waypoint buffering them beyond flow control.
        ensure!(r["settings_flood"]["acks"].as_u64().is_some_and(|n| n > 0), "settings flood: {r}");
        let after = rss_kib(m.waypoint.pid())?;
        ensure!(after < before + 64 * 1024, "waypoint RSS grew from {before} to {after} KiB during the floods");
        let metrics = m.waypoint.metrics()?;
        ensure!(metrics.contains("heddle_requests_total"), "waypoint metrics after the floods");
        require_tool(NGHTTP)?;
        let out = m.client.run({
            let mut c = Command::new("nghttp");
            c.args(["-t", "10", &url("/h2-after")]);
            c
        })?;
        ensure!(out.status.success(), "HTTP/2 after the floods: {}", String::from_utf8_lossy(&out.stderr));
        let r = m.load(&url("/after"), 20, &[])?;
        ensure!(r["status"]["200"] == 20, "after the floods: {r}");
        Ok(())
    });
}

#[test]
fn a_slow_endpoint_gets_few_requests_under_peak_ewma_balancing() {
    run_waypoint("waypoint_p2c", Extras { slow_v2: true, ..Extras::default() }, |m| {
        let r = m.load(&url("/p2c"), 200, &[])?;
        let (fast, slow) = (count(&r, m.v1.name()), count(&r, m.v2.name()));
        ensure!(r["status"]["200"] == 200, "{r}");
        // The slow endpoint is tried (a new endpoint costs nothing), then
        // avoided while its latency estimate stays high.
        ensure!(slow >= 1 && fast >= 180, "200 requests, v2 20 ms slower: v1 {fast}, v2 {slow}");
        eprintln!("peak EWMA: fast endpoint {fast}, slow endpoint {slow} of 200");
        Ok(())
    });
}
