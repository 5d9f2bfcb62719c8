//! Micro-benchmark of [`authorize`] against 10,000 DENY policies of which
//! only a few select the destination (issue 4: ztunnel's linear scan takes
//! 15 ms per connection for this shape; Heddle's target is under 1 µs).
//!
//! `cargo bench -p mesh-agent --bench policy` runs 1,000,000 evaluations per
//! shape and prints ns/evaluation. Under `cargo test --benches` (no `--bench`
//! argument) it runs a short smoke pass so the harness stays cheap. No
//! criterion: `std::time::Instant` and `std::hint::black_box` are enough for
//! a figure this coarse.

use std::{
    collections::BTreeMap,
    hint::black_box,
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_agent::policy::{
    authorize, AuthorizationPolicy, Connection, Destination, OrigDst, PeerIdentity, PolicySet, SrcIp, Verdict,
    DEFAULT_ROOT_NAMESPACE,
};

const POLICIES: usize = 10_000;

fn deny(namespace: &str, name: &str, selector: Option<(&str, &str)>, rule: &serde_json::Value) -> AuthorizationPolicy {
    let mut spec = serde_json::json!({ "action": "DENY", "rules": [rule] });
    if let Some((k, v)) = selector {
        spec["selector"] = serde_json::json!({ "matchLabels": { k: v } });
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec,
    }))
    .expect("valid object")
}

/// A realistic rule: peer namespaces, an IP block and ports.
fn rule(i: usize) -> serde_json::Value {
    serde_json::json!({
        "from": [{ "source": { "namespaces": [format!("team-{i}")], "notIpBlocks": ["10.0.0.0/8"] } }],
        "to": [{ "operation": { "ports": ["8080", "9000-9100"] } }],
    })
}

/// The few policies that do select the destination (`demo`, app=web); the
/// last one matches the benchmark's peer.
fn selecting() -> Vec<AuthorizationPolicy> {
    vec![
        deny("demo", "deny-a", None, &rule(1)),
        deny("demo", "deny-b", Some(("app", "web")), &rule(2)),
        deny(DEFAULT_ROOT_NAMESPACE, "mesh-deny", None, &rule(3)),
        deny(
            "demo",
            "deny-client",
            Some(("app", "web")),
            &serde_json::json!({
                "from": [{ "source": { "principals": ["cluster.local/ns/client/sa/curl"] } }],
            }),
        ),
    ]
}

/// 10,000 DENY policies in 1,000 other namespaces, plus the selecting few.
fn other_namespaces() -> Vec<AuthorizationPolicy> {
    let mut objects: Vec<_> =
        (0..POLICIES).map(|i| deny(&format!("ns-{}", i % 1000), &format!("deny-{i}"), None, &rule(i))).collect();
    objects.extend(selecting());
    objects
}

/// 10,000 DENY policies in the destination's own namespace, each selecting
/// another app, plus the selecting few.
fn same_namespace() -> Vec<AuthorizationPolicy> {
    let mut objects: Vec<_> = (0..POLICIES)
        .map(|i| deny("demo", &format!("deny-app-{i}"), Some(("app", &format!("app-{i}"))), &rule(i)))
        .collect();
    objects.extend(selecting());
    objects
}

fn measure(shape: &str, objects: Vec<AuthorizationPolicy>, iterations: u32) {
    let built = Instant::now();
    let (set, errors) = PolicySet::from_objects(objects, DEFAULT_ROOT_NAMESPACE);
    assert!(errors.is_empty(), "{errors:?}");
    let build_time = built.elapsed();
    let labels = BTreeMap::from([
        ("app".to_owned(), "web".to_owned()),
        ("version".to_owned(), "v1".to_owned()),
        ("pod-template-hash".to_owned(), "5d8f7c9b6".to_owned()),
    ]);
    let allowed_peer = PeerIdentity::new("cluster.local", "client", "wget");
    let denied_peer = PeerIdentity::new("cluster.local", "client", "curl");
    let conn = |peer| Connection {
        dst: Destination { namespace: "demo", labels: &labels, addr: OrigDst(SocketAddr::from(([10, 0, 0, 2], 8080))) },
        src: SrcIp("10.1.0.5".parse().unwrap()),
        peer: Some(peer),
    };
    let (allowed, denied) = (conn(&allowed_peer), conn(&denied_peer));
    assert_eq!(authorize(&set, &allowed).verdict, Verdict::Allow);
    assert_eq!(authorize(&set, &denied).verdict, Verdict::Deny);

    let start = Instant::now();
    for i in 0..iterations {
        let c = if i % 2 == 0 { &allowed } else { &denied };
        black_box(authorize(black_box(&set), black_box(c)));
    }
    let per_eval = start.elapsed().as_secs_f64() * 1e9 / f64::from(iterations);
    println!(
        "{shape}: {} policies ({} applicable), built in {}, {per_eval:.0} ns/eval over {iterations} evaluations",
        set.len(),
        set.applicable("demo", &labels).len(),
        fmt_duration(build_time),
    );
}

fn fmt_duration(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let iterations = if full { 1_000_000 } else { 1_000 };
    measure("10,000 DENY policies in 1,000 other namespaces", other_namespaces(), iterations);
    measure("10,000 DENY policies selecting other apps of the same namespace", same_namespace(), iterations);
}
