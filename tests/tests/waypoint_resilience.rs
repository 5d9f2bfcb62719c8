//! End-to-end tests of the waypoint's resilience features against real
//! servers (`pod-app http`, whose `/when/POD/...` paths make one endpoint
//! fail), a real client (Python's http.client) and the waypoint cluster of
//! [`common::waypoint_mesh`]: retries on another endpoint within the retry
//! budget, and request mirroring to a shadow Service.
//!
//! What is asserted is what users observe: the statuses the client gets,
//! which pod served, how long it took, the requests the shadow received,
//! the request records (`retries`, response flags) and the metrics. Needs
//! root; fails under `CI=true` when it cannot run.

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::l7::{count, wait_for};
use common::waypoint_mesh::{requests, run_waypoint, url, Extras, Mesh, V1_VIP, V2_VIP};
use heddle_tests::{poll_until, Check};
use serde_json::Value;

const RETRIES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: retry, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  # One rule per kind of failure: each rule has its own retry budget.
  - matches: [{path: {type: PathPrefix, value: /when}}, {path: {type: PathPrefix, value: /status}}]
    timeouts: {backendRequest: 300ms}
    retry: {attempts: 2, codes: [503], backoff: 10ms}
  - matches: [{path: {type: RegularExpression, value: "/once/s.*"}}]
    retry: {attempts: 2, codes: [503], backoff: 10ms}
  - matches: [{path: {type: RegularExpression, value: "/once/r.*"}}]
    retry: {attempts: 2, codes: [503], backoff: 10ms}
  - matches: [{path: {type: RegularExpression, value: "/once/d.*"}}]
    timeouts: {backendRequest: 300ms}
    retry: {attempts: 2, codes: [503], backoff: 10ms}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: outage, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /status}, headers: [{name: x-outage, value: "1"}]}]
    retry: {attempts: 10, codes: [503], backoff: 1ms}
"#;

/// The value of the sample of `name` carrying every one of `labels` (0
/// when absent), whatever the order the exposition writes labels in.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')))
        .find(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn retries_of(r: &Value) -> u64 {
    r["http"]["retries"].as_u64().unwrap_or(0)
}

/// Request records for paths starting with `prefix`, `n` of them.
fn records(m: &Mesh, prefix: &str, n: usize) -> Result<Vec<Value>> {
    requests(&m.waypoint, n, |r| r["http"]["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
}

#[test]
fn failed_attempts_are_retried_on_another_endpoint_within_the_budget_and_recorded() {
    run_waypoint("wp_retry", Extras::default(), |m| {
        m.routes(RETRIES, "httproute/demo/retry")?;
        m.waypoint.wait_route("httproute/demo/outage", true)?;
        let v2 = m.v2.name();

        // api-v1 answers 503: every request still succeeds, from api-v2.
        let r = m.load(&url("/when/api-v1/status/503"), 60, &[])?;
        ensure!(r["status"]["200"] == 60 && count(&r, v2) == 60, "503 on v1, retried: {r}");
        let recs = records(m, "/when/api-v1/status", 60)?;
        ensure!(recs.iter().all(|r| r["http"]["status"] == 200 && r["http"]["response_flags"] == "-"), "{recs:?}");

        // Every endpoint fails each request once (503, a reset, a reply
        // slower than the 300 ms per-try timeout): the first retry goes to
        // the other endpoint (which fails too), the second succeeds. A retry
        // to the same endpoint would have succeeded after one.
        for (what, path, n) in [
            ("503", "/once/s{i}/status/503", 30),
            ("reset", "/once/r{i}/reset", 30),
            ("slow", "/once/d{i}/delay/3000", 4),
        ] {
            let r = m.load(&url(path), n, &[])?;
            let prefix = &path[..7];
            let recs = records(m, prefix, n)?;
            let failed: Vec<&Value> = recs.iter().filter(|r| r["http"]["status"] != 200).collect();
            ensure!(r["status"]["200"] == n && r["errors"] == 0, "{what} once per endpoint, retried: {r}; {failed:?}");
            ensure!(recs.iter().all(|r| retries_of(r) == 2), "{what}: two retries, on both endpoints: {recs:?}");
            if what == "slow" {
                let slowest = r["max_ms"].as_f64().unwrap_or(f64::MAX);
                ensure!(slowest < 1500.0, "two 300 ms tries, not a 3 s wait: {r}");
                eprintln!("per-try timeout then retry: slowest of {n} requests {slowest:.0} ms");
            }
        }

        // POST is not idempotent: not retried, the 503 reaches the client.
        let posts = m.httpc(&["load", &url("/status/503"), "20", "--method", "POST", "--body", "100"])?;
        ensure!(posts["status"]["503"] == 20, "POSTs are not retried: {posts}");
        let recs = requests(&m.waypoint, 20, |r| r["http"]["method"] == "POST")?;
        ensure!(recs.iter().all(|r| retries_of(r) == 0 && r["http"]["response_flags"] == "-"), "{recs:?}");

        // Both endpoints always fail: two retries, then the 503 with URX,
        // which `heddle flows --response-flag URX` finds.
        let r = m.load(&url("/status/503"), 10, &[])?;
        ensure!(r["status"]["503"] == 10, "every endpoint fails: {r}");
        let urx = m.waypoint.flows("response_flag=URX&path=/status/503")?;
        ensure!(urx.len() == 10, "retries exhausted are flagged URX: {urx:?}");
        ensure!(urx.iter().all(|r| retries_of(r) == 2 && r["http"]["method"] == "GET"), "two retries each: {urx:?}");

        // A full outage with 10 attempts per request: the budget (20% of
        // requests + 10/s over 10 s) bounds the retries, not `attempts`.
        let started = Instant::now();
        let n = 300;
        let r = m.load(&url("/status/503"), n, &["x-outage:1"])?;
        let secs = started.elapsed().as_secs_f64();
        ensure!(r["status"]["503"] == n, "full outage: {r}");
        let text = m.waypoint.metrics()?;
        let route = ("route", "httproute/demo/outage");
        let retried = metric(&text, "heddle_retries_total", &[route, ("outcome", "retried")]);
        let refused = metric(&text, "heddle_retries_total", &[route, ("outcome", "budget_exhausted")]);
        #[allow(clippy::cast_precision_loss)]
        let allowed = n as f64 * 0.2 + 10.0 * (10.0 + secs);
        ensure!(
            retried >= 100.0 && retried <= allowed,
            "retries {retried} within the budget {allowed:.0} ({n} requests in {secs:.1} s)"
        );
        ensure!(refused > 0.0, "the budget refused retries: {text}");

        // A RetryBudgetPolicy on the route: no share, 1 retry/s over 5 s.
        let tight = r"
---
apiVersion: heddle.dev/v1alpha1
kind: RetryBudgetPolicy
metadata: {name: tight, namespace: demo}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: outage}]
  retryRatio: 0
  minRetriesPerSecond: 1
  ttl: 5s
";
        m.tb.set_routes("routes", &format!("{RETRIES}{tight}"))?;
        m.waypoint.wait_route("retrybudgetpolicy/demo/tight", true)?;
        let r = m.load(&url("/status/503"), 100, &["x-outage:1"])?;
        ensure!(r["status"]["503"] == 100, "full outage: {r}");
        let after = metric(&m.waypoint.metrics()?, "heddle_retries_total", &[route, ("outcome", "retried")]);
        ensure!(after - retried <= 6.0, "the policy's budget allows 5 retries in 5 s: {} more", after - retried);
        eprintln!(
            "full outage: {n} requests, {retried} retries, {refused} refused by the budget (10 attempts would be {})",
            n * 10
        );
        Ok(())
    });
}

const MIRROR: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirror, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: api-v1, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /half}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: api-v2, port: 80}, percent: 50}}]
    backendRefs: [{name: api-v1, port: 80}]
  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: api-v2, port: 80}}}]
    backendRefs: [{name: api-v1, port: 80}]
"#;

const MIRRORED: &str = "heddle_mirror_requests_total";
const SHADOW: (&str, &str) = ("backend", "demo/api-v2");

/// What api-v2 received with a `-shadow` authority, by path prefix.
fn shadowed(m: &Mesh, prefix: &str) -> Result<Vec<Value>> {
    let out = m.httpc(&["cases", &write_case(m, &format!("http://{V2_VIP}:80/_seen"))?])?;
    let seen = out[0]["body"].as_array().context("/_seen answers a list")?;
    Ok(seen
        .iter()
        .filter(|s| s["host"].as_str().is_some_and(|h| h.contains("-shadow")))
        .filter(|s| s["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
        .cloned()
        .collect())
}

fn write_case(m: &Mesh, url: &str) -> Result<String> {
    let path = m.tb.temp_dir().join("seen-case.json");
    std::fs::write(&path, serde_json::json!([{"method": "GET", "url": url}]).to_string())?;
    Ok(path.display().to_string())
}

#[test]
fn mirrored_copies_reach_the_shadow_and_a_slow_or_failing_shadow_never_touches_the_primary() {
    run_waypoint("wp_mirror", Extras::default(), |m| {
        m.routes(MIRROR, "httproute/demo/mirror")?;
        let v1 = m.v1.name();
        let primary = |path: &str| format!("http://{V1_VIP}:80{path}");

        let r = m.load(&primary("/copy"), 20, &[])?;
        ensure!(r["status"]["200"] == 20 && count(&r, v1) == 20, "the primary answers: {r}");
        let copies = wait_for("20 copies at the shadow", || {
            let s = shadowed(m, "/copy")?;
            Ok((s.len() >= 20).then_some(s))
        })?;
        ensure!(copies.len() == 20, "one copy per request: {copies:?}");
        let host = copies[0]["host"].as_str().unwrap_or_default();
        ensure!(host == format!("{V1_VIP}-shadow"), "the copy's authority gets -shadow: {host}");

        // A shadow that answers after 3 s, or drops the request: the
        // primary neither waits nor fails.
        let r = m.load(&primary("/when/api-v2/delay/3000"), 10, &[])?;
        ensure!(r["status"]["200"] == 10, "slow shadow: {r}");
        let slowest = r["max_ms"].as_f64().unwrap_or(f64::MAX);
        ensure!(slowest < 1000.0, "the primary did not wait for the shadow: {r}");
        let r = m.load(&primary("/when/api-v2/reset"), 10, &[])?;
        ensure!(r["status"]["200"] == 10 && r["errors"] == 0, "failing shadow: {r}");

        // percent: 50 over 400 requests: 200 expected, sd 10; 5 sd either way.
        let r = m.load(&primary("/half"), 400, &[])?;
        ensure!(r["status"]["200"] == 400, "{r}");
        std::thread::sleep(Duration::from_secs(1));
        let half = shadowed(m, "/half")?.len();
        ensure!((150..=250).contains(&half), "50% of 400 requests mirrored within binomial tolerance: {half}");

        let text = poll_until("mirror metrics", Duration::from_secs(10), Duration::from_millis(200), || {
            let t = m.waypoint.metrics()?;
            let failed = metric(&t, MIRRORED, &[SHADOW, ("outcome", "failed")]);
            Ok(if failed >= 10.0 { Check::Ready(t) } else { Check::Pending(format!("{failed} failed copies")) })
        })?;
        let sent = metric(&text, MIRRORED, &[SHADOW, ("outcome", "sent")]);
        ensure!(sent >= 20.0 + 10.0 + 150.0, "copies answered counted: {sent}");
        eprintln!("mirror: 20/20 copies, {half}/400 at 50%, slowest primary beside a 3 s shadow {slowest:.1} ms");
        Ok(())
    });
}

const LIMITS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: slow-lane, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /lane}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: open, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
---
apiVersion: heddle.dev/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: per-client, namespace: demo}
spec:
  targetRefs: [{group: "", kind: Service, name: api-v1}]
  identity: {requestsPerSecond: 5}
---
apiVersion: heddle.dev/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: lane, namespace: demo}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: slow-lane}]
  total: {requestsPerSecond: 3}
"#;

#[test]
fn over_a_local_rate_limit_requests_get_429_with_retry_after_per_identity_and_per_route() {
    run_waypoint("wp_ratelimit", Extras::default(), |m| {
        m.routes(LIMITS, "httproute/demo/slow-lane")?;
        m.waypoint.wait_route("httplocalratelimitpolicy/demo/per-client", true)?;
        m.waypoint.wait_route("httplocalratelimitpolicy/demo/lane", true)?;

        // 5/s per identity on api-v1: 40 quick requests, about 5 pass.
        let started = Instant::now();
        let r = m.load(&format!("http://{V1_VIP}:80/limited"), 40, &[])?;
        let secs = started.elapsed().as_secs_f64();
        let ok = r["status"]["200"].as_u64().unwrap_or(0);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let most = 5 + (secs * 5.0).ceil() as u64;
        ensure!(ok >= 5 && ok <= most && r["status"]["429"] == 40 - ok, "5/s per identity over {secs:.2} s: {r}");
        let limited = m.waypoint.flows("response_flag=RL&path=/limited")?;
        ensure!(limited.len() as u64 == 40 - ok, "every 429 is flagged RL: {limited:?}");
        let why = limited[0]["http"]["error"].as_str().unwrap_or_default();
        ensure!(
            why.contains("HTTPLocalRateLimitPolicy demo/per-client (identity limit)"),
            "the policy is named: {why}"
        );

        // The 429 says when to come back.
        let one = serde_json::json!({"method": "GET", "url": format!("http://{V1_VIP}:80/limited")});
        let file = m.tb.temp_dir().join("limited.json");
        std::fs::write(&file, Value::Array(vec![one; 20]).to_string())?;
        let out = m.httpc(&["cases", &file.display().to_string()])?;
        let refused = out.as_array().and_then(|a| a.iter().find(|c| c["status"] == 429)).context("a 429 among 20")?;
        ensure!(refused["headers"]["retry-after"] == "1", "Retry-After: {refused}");

        // A route's limit applies to its requests only: /lane is capped at
        // 3/s in total, another route of the same Service is not.
        let lane = m.load(&url("/lane"), 20, &[])?;
        let lane_ok = lane["status"]["200"].as_u64().unwrap_or(0);
        ensure!((3..=8).contains(&lane_ok) && lane["status"]["429"] == 20 - lane_ok, "3/s on the route: {lane}");
        let other = m.load(&url("/free"), 40, &[])?;
        ensure!(other["status"]["200"] == 40, "the rest of the Service is not limited: {other}");

        // An override for the client's service account lifts its limit.
        let client_sa = r"
  overrides:
  - requestsPerSecond: 1000
    clientRefs: [{kind: ServiceAccount, name: client, namespace: demo}]";
        let lifted = LIMITS
            .replace("  identity: {requestsPerSecond: 5}", &format!("  identity: {{requestsPerSecond: 5}}{client_sa}"));
        m.tb.set_routes("routes", &lifted)?;
        let r = common::l7::load_until(
            &m.client,
            &format!("http://{V1_VIP}:80/lifted"),
            40,
            Duration::from_secs(10),
            |r| r["status"]["200"] == 40,
        )?;
        eprintln!("rate limits: {ok}/40 at 5/s per identity, {lane_ok}/20 at 3/s on a route, override: {r}");
        Ok(())
    });
}

const SUBSETS: &str = r"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: demo}
spec:
  host: api
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
";

fn virtual_service(http: &str) -> String {
    format!(
        "{SUBSETS}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: demo}}
spec:
  hosts: [api]
  http:
{http}"
    )
}

const ALL_V1: &str = "  - route: [{destination: {host: api, subset: v1}}]\n";
const CANARY_90_10: &str =
    "  - route: [{destination: {host: api, subset: v1}, weight: 90}, {destination: {host: api, subset: v2}, weight: 10}]\n";
const FAULTS: &str = r"  - match: [{headers: {end-user: {exact: jason}}}]
    fault: {delay: {percentage: {value: 100.0}, fixedDelay: 1s}}
    route: [{destination: {host: api, subset: v1}}]
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {percentage: {value: 50.0}, httpStatus: 503}}
    retries: {attempts: 0}
    route: [{destination: {host: api, subset: v1}}]
  - match: [{uri: {prefix: /sometimes-slow}}]
    fault: {delay: {percentage: {value: 30.0}, fixedDelay: 2ms}}
    route: [{destination: {host: api, subset: v1}}]
  - route: [{destination: {host: api, subset: v1}}]
";

/// Waits until the waypoint shows `route` accepted with `rules` rules.
fn wait_rules(m: &Mesh, route: &str, rules: u64) -> Result<()> {
    let mut last = Value::Null;
    let found = wait_for(route, || {
        let routes = m.waypoint.routes()?;
        last = routes["routes"]
            .as_array()
            .and_then(|rs| rs.iter().rev().find(|r| r["route"] == route))
            .cloned()
            .unwrap_or(Value::Null);
        Ok((last["accepted"] == true && last["rules"] == rules).then_some(()))
    });
    found.with_context(|| format!("{route} with {rules} rules: {last}"))
}

#[test]
fn istio_virtual_services_route_subsets_split_and_inject_faults_as_istio_does() {
    run_waypoint("wp_istio", Extras::default(), |m| {
        // destination-rule-all + virtual-service-all-v1, in Bookinfo's shape.
        m.routes(&virtual_service(ALL_V1), "virtualservice/demo/api")?;
        m.waypoint.wait_route("destinationrule/demo/api", true)?;
        let r = m.load(&url("/all-v1"), 40, &[])?;
        ensure!(count(&r, m.v1.name()) == 40, "every request to subset v1: {r}");

        // The 90/10 canary: v2's share within 4 sd of 10% over 1,000 requests.
        m.tb.set_routes("routes", &virtual_service(CANARY_90_10))?;
        common::l7::load_until(&m.client, &url("/canary-wait"), 20, Duration::from_secs(10), |r| {
            count(r, m.v2.name()) > 0
        })?;
        let r = m.load(&url("/canary"), 1000, &[])?;
        let v2 = count(&r, m.v2.name());
        ensure!(r["status"]["200"] == 1000 && (62..=138).contains(&v2), "90/10 over 1,000 requests: v2 {v2}: {r}");
        let recs = records(m, "/canary", 1000)?;
        ensure!(recs.iter().any(|r| r["http"]["backend"] == "demo/api@v2"), "records name the subset");

        // ratings-test-delay and -abort, in the api's shape: jason waits,
        // others do not; /abort fails half the requests with 503 FI.
        m.tb.set_routes("routes", &virtual_service(FAULTS))?;
        wait_rules(m, "virtualservice/demo/api", 4)?;
        let jason = m.load(&url("/delayed"), 3, &["end-user:jason"])?;
        let bob = m.load(&url("/delayed"), 3, &["end-user:bob"])?;
        let (slow, fast) = (jason["max_ms"].as_f64().unwrap_or(0.0), bob["max_ms"].as_f64().unwrap_or(f64::MAX));
        ensure!(jason["status"]["200"] == 3 && slow >= 1000.0, "jason is delayed 1 s: {jason}");
        ensure!(bob["status"]["200"] == 3 && fast < 500.0, "bob is not: {bob}");
        let delayed = m.waypoint.flows("response_flag=DI&path=/delayed")?;
        ensure!(delayed.len() == 3, "delays are flagged DI: {delayed:?}");

        // A 30% delay: the delayed share of 1,000 requests (sd 14.5, 5 sd either way).
        let r = m.load(&url("/sometimes-slow"), 1000, &[])?;
        ensure!(r["status"]["200"] == 1000, "delays never fail a request: {r}");
        let slowed = m.waypoint.flows("response_flag=DI&path=/sometimes-slow&last=100000")?.len();
        ensure!((228..=372).contains(&slowed), "30% of 1,000 requests delayed: {slowed}");

        let r = m.load(&url("/abort/measure"), 1000, &[])?;
        let aborted = r["status"]["503"].as_u64().unwrap_or(0);
        // 50% of 1,000: sd 15.8, 5 sd either way.
        ensure!((421..=579).contains(&aborted) && r["status"]["200"] == 1000 - aborted, "50% aborts: {r}");
        let flagged = m.waypoint.flows("response_flag=FI&path=/abort/measure&last=100000")?;
        ensure!(flagged.len() as u64 == aborted, "every abort is flagged FI: {} of {aborted}", flagged.len());

        // An edit whose weights do not sum to 100 is rejected, with its
        // problem named, and the last good version (the faults) stays in force.
        let bad = virtual_service(CANARY_90_10).replace("weight: 10", "weight: 5");
        m.tb.set_routes("routes", &bad)?;
        let status = wait_for("the rejected edit reported", || {
            let routes = m.waypoint.routes()?;
            let vs = routes["routes"]
                .as_array()
                .and_then(|l| l.iter().find(|r| r["route"] == "virtualservice/demo/api"))
                .cloned();
            Ok(vs.filter(|v| v["problems"].to_string().contains("weights sum to 95, not 100")))
        })?;
        ensure!(
            status["accepted"] == true && status["notes"].to_string().contains("last good version stays in force"),
            "{status}"
        );
        let still = m.load(&url("/abort/still"), 200, &[])?;
        let aborted_still = still["status"]["503"].as_u64().unwrap_or(0);
        ensure!((50..=150).contains(&aborted_still), "the faults stay in force: {still}");
        eprintln!("istio: 40/40 to v1; 90/10 canary v2 {v2}/1000; jason delayed {slow:.0} ms, bob {fast:.0} ms; aborts {aborted}/1000, delays {slowed}/1000");
        Ok(())
    });
}

const BREAKER: &str = r"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: demo}
spec:
  host: api
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
    outlierDetection:
      consecutive5xxErrors: 3
      baseEjectionTime: 2s
      maxEjectionPercent: 50
";

/// `h2load --h1 -c C -n N URL` in `pod`: (2xx, 5xx) counts.
fn h2load(pod: &heddle_tests::Pod, conns: usize, n: usize, url: &str) -> Result<(u64, u64)> {
    let mut cmd = std::process::Command::new("h2load");
    cmd.args(["--h1", "-c", &conns.to_string(), "-n", &n.to_string(), url]);
    let out = pod.run(cmd)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "h2load: {text}{}", String::from_utf8_lossy(&out.stderr));
    // "status codes: 20 2xx, 0 3xx, 0 4xx, 180 5xx"
    let line = text.lines().find_map(|l| l.trim().strip_prefix("status codes: ")).context("h2load status codes")?;
    let class = |c: &str| -> u64 { line.split(", ").find_map(|p| p.strip_suffix(c)?.trim().parse().ok()).unwrap_or(0) };
    Ok((class(" 2xx"), class(" 5xx")))
}

#[test]
fn a_destination_rule_breaks_the_circuit_over_its_limits_and_ejects_a_failing_endpoint_for_a_while() {
    run_waypoint("wp_breaker", Extras { slow_v2: true, ..Extras::default() }, |m| {
        heddle_tests::require_tool(heddle_tests::env::H2LOAD)?;
        m.routes(BREAKER, "destinationrule/demo/api")?;
        let (v1, v2) = (m.v1.name(), m.v2.name());

        // Outlier detection: api-v1 answers 500 (and is the faster one, so
        // the balancer prefers it): after 3 in a row it is ejected for 2 s.
        let r = m.load(&url("/when/api-v1/status/500"), 40, &[])?;
        ensure!(r["status"]["500"] == 3 && count(&r, v2) == 37, "three 500s, then only v2: {r}");
        let ejected = |t: &str| metric(t, "heddle_outlier_ejections_total", &[("backend", "demo/api")]);
        ensure!((ejected(&m.waypoint.metrics()?) - 1.0).abs() < 0.5, "one ejection counted");
        let events: Vec<Value> =
            m.waypoint.flows("last=100000")?.into_iter().filter(|f| f["event"] == "ejection").collect();
        ensure!(
            events.len() == 1 && events[0]["error"].as_str().is_some_and(|e| e.contains("of demo/api for 2 s")),
            "the ejection is a flow record: {events:?}"
        );
        // After the ejection time it is back, fails three more, and is
        // ejected again (for 4 s, the second time).
        std::thread::sleep(Duration::from_millis(2500));
        let r = m.load(&url("/when/api-v1/status/500"), 40, &[])?;
        ensure!(r["status"]["500"] == 3 && count(&r, v1) == 3, "re-admitted, then ejected again: {r}");
        ensure!((ejected(&m.waypoint.metrics()?) - 2.0).abs() < 0.5, "two ejections counted");

        // Circuit breaking: one request in flight and one waiting; 8
        // concurrent clients of a 50 ms endpoint overflow it: 503 UO.
        let (ok, refused) = h2load(&m.client, 8, 200, &url("/delay/50"))?;
        ensure!(ok > 0 && refused > 0 && ok + refused == 200, "some served, some refused: {ok} 2xx, {refused} 5xx");
        let uo = m.waypoint.flows("response_flag=UO&last=100000")?;
        ensure!(uo.len() as u64 == refused, "every refusal is flagged UO: {} of {refused}", uo.len());
        // One client at a time stays within the limits.
        let (ok, failed) = h2load(&m.client, 1, 50, &url("/delay/5"))?;
        ensure!(ok == 50 && failed == 0, "sequential requests are never refused: {ok} 2xx, {failed} 5xx");
        eprintln!("circuit breaker: 8 clients, {refused} of 200 refused with UO; outlier: 3 x 500 then ejected, twice");
        Ok(())
    });
}

const TIMEOUTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: timeouts, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /delay}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: api-v1, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: grpc-timeouts, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 50051}]
  rules:
  - timeouts: {request: 300ms}
    backendRefs: [{name: api-v1, port: 50051}]
"#;

#[test]
fn a_request_timeout_ends_slow_requests_with_504_or_deadline_exceeded() {
    run_waypoint("wp_timeouts", Extras { grpc: true, ..Extras::default() }, |m| {
        m.routes(TIMEOUTS, "httproute/demo/timeouts")?;
        m.waypoint.wait_route("httproute/demo/grpc-timeouts", true)?;
        let r = m.load(&url("/delay/2000"), 3, &[])?;
        let slowest = r["max_ms"].as_f64().unwrap_or(f64::MAX);
        ensure!(r["status"]["504"] == 3 && slowest < 1500.0, "504 after 300 ms, not the backend's 2 s: {r}");
        let timed_out = m.waypoint.flows("response_flag=UT&path=/delay/2000")?;
        ensure!(timed_out.len() == 3, "timeouts are flagged UT: {timed_out:?}");

        let mut cmd = std::process::Command::new("python3");
        cmd.arg(heddle_tests::env::asset("grpc_app.py"))
            .args(["slow", &format!("{}:{}", common::waypoint_mesh::API_VIP, common::waypoint_mesh::GRPC_PORT)]);
        let out = m.client.run(cmd)?;
        ensure!(out.status.success(), "grpc client: {}", String::from_utf8_lossy(&out.stderr));
        let g: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(
            g["status"] == "DEADLINE_EXCEEDED" && g["ms"].as_f64().unwrap_or(f64::MAX) < 1500.0,
            "gRPC gets DEADLINE_EXCEEDED after 300 ms: {g}"
        );
        let rec = requests(&m.waypoint, 1, |f| f["http"]["path"] == "/heddle.test.Echo/Slow")?;
        ensure!(rec[0]["http"]["grpc_status"] == 4 && rec[0]["http"]["response_flags"] == "UT", "{}", rec[0]);
        Ok(())
    });
}
