//! Compiling Gateway API documents: what is accepted, what is reported, and
//! the conditions each parent gets.

use std::path::Path;

use crate::{
    config,
    registry::{ObjectRef, Registry},
    waypoint::routes::{model::BackendTarget, RouteSet, Source},
};

const CLUSTER: &str = r#"
namespaces: [{name: demo, useWaypoint: wp}]
waypoints: [{name: wp, namespace: demo}]
workloads:
  - {name: wp-1, namespace: demo, node: n1, ips: ["10.0.0.9"], enrolled: false, labels: {gateway.networking.k8s.io/gateway-name: wp}}
  - {name: v1, namespace: demo, node: n1, ips: ["10.0.0.1"], enrolled: false, labels: {app: api, version: v1}}
services:
  - {name: api, namespace: demo, vip: 10.96.0.1, ports: [{port: 80, targetPort: 8080}], selector: {app: api}}
  - {name: api-v1, namespace: demo, vip: 10.96.0.2, ports: [{port: 80, targetPort: 8080}], selector: {version: v1}}
  - {name: l4-only, namespace: demo, vip: 10.96.0.3, ports: [{port: 80}], selector: {app: api}, useWaypoint: none}
  - {name: store, namespace: shared, vip: 10.96.0.4, ports: [{port: 80}], selector: {app: store}}
"#;

fn build(text: &str) -> RouteSet {
    let reg = Registry::from_config(&config::parse(Path::new("c.yaml"), CLUSTER).unwrap());
    let wp = ObjectRef { namespace: "demo".into(), name: "wp".into() };
    RouteSet::build(
        &[Source { file: "r.yaml".into(), text: text.into() }],
        &reg,
        &wp,
        crate::policy::DEFAULT_ROOT_NAMESPACE,
    )
}

const GOOD: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v1/}}]
    timeouts: {request: 2s, backendRequest: 500ms}
    backendRefs: [{name: api-v1, port: 80, weight: 9}, {name: api, port: 80}]
";

#[test]
fn a_valid_route_is_accepted_on_its_service_with_resolved_backends() {
    let set = build(GOOD);
    let s = &set.statuses()[0];
    assert!(s.accepted, "{s:?}");
    assert_eq!(s.route, "httproute/demo/split");
    assert_eq!(s.parents[0].conditions[0].reason, "Accepted");
    assert_eq!(s.parents[0].conditions[1].reason, "ResolvedRefs");
    assert!(s.problems.is_empty() && s.rules == 1, "{s:?}");
    assert!(set.table.has_routes(&ObjectRef { namespace: "demo".into(), name: "api".into() }));
}

#[test]
fn the_parsed_rule_keeps_weights_timeouts_and_a_normalised_prefix() {
    let set = build(GOOD);
    let rule = v1_rule(&set);
    let weights: Vec<u32> = rule.backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [9, 1], "weight defaults to 1");
    assert!(matches!(&rule.backends[0].target, BackendTarget::Service { port: 80, .. }));
    assert_eq!(rule.timeouts.request, Some(std::time::Duration::from_secs(2)));
    assert_eq!(rule.timeouts.backend_request, Some(std::time::Duration::from_millis(500)));
    assert!(rule.retry.is_none() && rule.filters.mirrors.is_empty());
}

/// The rule of `set` that a GET of `/v1/x` on `demo/api` matches.
fn v1_rule(set: &RouteSet) -> std::sync::Arc<crate::waypoint::routes::model::Rule> {
    let hdr = hyper::HeaderMap::new();
    let svc = ObjectRef { namespace: "demo".into(), name: "api".into() };
    let facts = crate::waypoint::routes::matching::RequestFacts {
        service: &svc,
        port: 80,
        client_namespace: Some("demo"),
        method: "GET",
        path: "/v1/x",
        query: None,
        headers: &hdr,
        grpc: false,
    };
    set.table.find(&facts).expect("matches /v1/x").rule.clone()
}

#[test]
fn an_experimental_retry_is_read_with_defaults_and_the_non_idempotent_annotation() {
    let with_retry = |retry: &str, meta: &str| {
        build(
            &GOOD
                .replace("    timeouts:", &format!("    retry: {retry}\n    timeouts:"))
                .replace("namespace: demo}", meta),
        )
    };
    let set = with_retry("{attempts: 3, codes: [503, 502], backoff: 50ms}", "namespace: demo}");
    assert!(set.statuses()[0].accepted, "{:?}", set.statuses()[0]);
    let r = v1_rule(&set).retry.clone().expect("retry compiled");
    assert_eq!((r.attempts, r.codes.as_slice(), r.backoff), (3, &[503, 502][..], std::time::Duration::from_millis(50)));
    assert!(!r.non_idempotent);
    let set = with_retry("{}", "namespace: demo, annotations: {heddle.dev/retry-non-idempotent: 'true'}}");
    let r = v1_rule(&set).retry.clone().expect("retry compiled");
    assert_eq!((r.attempts, r.codes.len(), r.backoff), (2, 0, std::time::Duration::from_millis(25)), "defaults");
    assert!(r.non_idempotent);
}

#[test]
fn a_bad_retry_rejects_the_route_naming_every_problem() {
    let set = build(&GOOD.replace(
        "    timeouts:",
        "    retry: {attempts: 99, codes: [200, 503], backoff: soon, jitter: 1}\n    timeouts:",
    ));
    let s = &set.statuses()[0];
    assert!(!s.accepted);
    let all = s.problems.join("\n");
    for want in [
        "spec.rules[0].retry.jitter: unknown field",
        "spec.rules[0].retry.attempts: 99 is not within 0-10",
        "spec.rules[0].retry.codes[0]: 200 is not an HTTP status within 400-599",
        "spec.rules[0].retry.backoff: \"soon\" is not a duration",
    ] {
        assert!(all.contains(want), "{want:?} in {all}");
    }
    let set = build(
        &GOOD.replace("namespace: demo}", "namespace: demo, annotations: {heddle.dev/retry-non-idempotent: yes}}"),
    );
    assert!(set.statuses()[0].problems.join("").contains("heddle.dev/retry-non-idempotent"), "{:?}", set.statuses());
}

#[test]
fn request_mirrors_resolve_their_backend_and_share() {
    let mirror = |m: &str| {
        build(&GOOD.replace(
            "    timeouts:",
            &format!("    filters: [{{type: RequestMirror, requestMirror: {m}}}]\n    timeouts:"),
        ))
    };
    for (m, per_million) in [
        ("{backendRef: {name: api-v1, port: 80}}", 1_000_000),
        ("{backendRef: {name: api-v1, port: 80}, percent: 25}", 250_000),
        ("{backendRef: {name: api-v1, port: 80}, fraction: {numerator: 1, denominator: 8}}", 125_000),
    ] {
        let set = mirror(m);
        assert!(set.statuses()[0].accepted, "{m}: {:?}", set.statuses()[0]);
        let rule = v1_rule(&set);
        assert_eq!(rule.filters.mirrors.len(), 1);
        assert_eq!(rule.filters.mirrors[0].per_million, per_million, "{m}");
        assert!(matches!(&rule.filters.mirrors[0].target, BackendTarget::Service { port: 80, .. }));
    }
    for (m, want) in [
        ("{backendRef: {name: api-v1, port: 80}, percent: 101}", "requestMirror.percent: 101 is not within 0-100"),
        (
            "{backendRef: {name: api-v1, port: 80}, fraction: {numerator: 3, denominator: 2}}",
            "requestMirror.fraction: 3/2",
        ),
        (
            "{backendRef: {name: api-v1, port: 80}, percent: 5, fraction: {numerator: 1}}",
            "percent and fraction cannot both be set",
        ),
    ] {
        let set = mirror(m);
        assert!(!set.statuses()[0].accepted, "{m}");
        assert!(set.statuses()[0].problems.join("").contains(want), "{want:?}: {:?}", set.statuses()[0]);
    }
    // A shadow that does not exist leaves the route in force with ResolvedRefs=False.
    let set = mirror("{backendRef: {name: gone, port: 80}}");
    let s = &set.statuses()[0];
    assert!(s.accepted);
    assert_eq!(s.parents[0].conditions[1].reason, "BackendNotFound", "{s:?}");
}

#[test]
fn unsupported_filters_and_unknown_fields_reject_the_route_naming_the_field() {
    let set = build(&GOOD.replace(
        "    timeouts:",
        "    filters: [{type: ExtensionRef, extensionRef: {group: x.io, kind: Thing, name: t}}]\n    colour: blue\n    timeouts:",
    ));
    let s = &set.statuses()[0];
    assert!(!s.accepted);
    let all = s.problems.join("\n");
    assert!(all.contains("spec.rules[0].filters[0]: filter type ExtensionRef is not supported"), "{all}");
    assert!(all.contains("spec.rules[0].colour: unknown field"), "{all}");
    assert_eq!(s.parents[0].conditions[0].reason, "UnsupportedValue");
    assert!(!set.table.has_routes(&ObjectRef { namespace: "demo".into(), name: "api".into() }), "nothing applied");
}

#[test]
fn a_missing_backend_keeps_the_route_with_resolved_refs_false() {
    let set = build(&GOOD.replace("name: api-v1, port: 80", "name: gone, port: 80"));
    let s = &set.statuses()[0];
    assert!(s.accepted);
    let resolved = &s.parents[0].conditions[1];
    assert_eq!((resolved.status, resolved.reason), ("False", "BackendNotFound"), "{s:?}");
}

const GRANT: &str = r"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: from-demo, namespace: shared}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: demo}]
  to: [{group: '', kind: Service, name: store}]
";

fn cross_namespace_route() -> String {
    GOOD.replace("name: api-v1, port: 80", "name: store, namespace: shared, port: 80")
}

#[test]
fn a_backend_in_another_namespace_needs_a_reference_grant_there() {
    let set = build(&cross_namespace_route());
    let s = &set.statuses()[0];
    let resolved = &s.parents[0].conditions[1];
    assert_eq!((resolved.status, resolved.reason), ("False", "RefNotPermitted"), "{s:?}");
    assert!(s.accepted && s.problems[0].contains("no ReferenceGrant in shared permits it"), "{s:?}");
    // The grant after the route in the same file still counts: grants are
    // read first.
    let set = build(&format!("{}---{GRANT}", cross_namespace_route()));
    assert_eq!(set.statuses().len(), 1, "a grant has no route status: {:?}", set.statuses());
    let resolved = &set.statuses()[0].parents[0].conditions[1];
    assert_eq!((resolved.status, resolved.reason), ("True", "ResolvedRefs"), "{:?}", set.statuses());
    // A grant for another Service does not.
    let set = build(&format!("{}---{}", cross_namespace_route(), GRANT.replace("name: store", "name: other")));
    assert_eq!(set.statuses()[0].parents[0].conditions[1].reason, "RefNotPermitted");
}

#[test]
fn a_reference_grant_with_unknown_fields_is_rejected_and_grants_nothing() {
    let set = build(&format!("{}---{}", cross_namespace_route(), GRANT.replace("  to:", "  too: []\n  to:")));
    let grant = set.statuses().iter().find(|s| s.route == "referencegrant/shared/from-demo").expect("grant status");
    assert!(!grant.accepted && grant.problems[0].contains("spec.too: unknown field"), "{grant:?}");
    let route = set.statuses().iter().find(|s| s.route.starts_with("httproute/")).expect("route status");
    assert_eq!(route.parents[0].conditions[1].reason, "RefNotPermitted");
}

#[test]
fn parents_this_waypoint_does_not_own_are_not_attached() {
    for (parent, why) in [
        ("{group: '', kind: Service, name: l4-only}", "does not use waypoint demo/wp"),
        ("{group: '', kind: Service, name: nope}", "does not exist"),
        ("{name: some-gateway}", "is not a mesh parent"),
        ("{group: '', kind: Service, name: api, port: 81}", "has no port 81"),
    ] {
        let text = GOOD.replace("{group: '', kind: Service, name: api, port: 80}", parent);
        let set = build(&text);
        let s = &set.statuses()[0];
        assert!(!s.accepted, "{parent}: {s:?}");
        assert!(s.parents[0].conditions[0].message.contains(why), "{parent}: {s:?}");
    }
}

#[test]
fn bad_documents_are_rejected_alone_with_their_position() {
    let text = format!(
        "{GOOD}---\nkind: ConfigMap\napiVersion: v1\n---\n{}\n---\n: [\n",
        GOOD.replace("name: split", "name: second")
    );
    let set = build(&text);
    let st = set.statuses();
    assert_eq!(st.len(), 4);
    assert!(st[0].accepted && st[2].accepted);
    assert!(
        st[1].problems[0].contains("is not a gateway.networking.k8s.io HTTPRoute, GRPCRoute or ReferenceGrant"),
        "{:?}",
        st[1]
    );
    assert_eq!(st[3].source, "r.yaml#4");
    assert!(st[3].problems[0].contains("invalid YAML"), "{:?}", st[3]);
}

#[test]
fn grpc_method_matches_become_paths() {
    let text = r"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: demo}
spec:
  parentRefs: [{group: '', kind: Service, name: api}]
  rules:
  - matches: [{method: {service: pkg.Svc, method: Call}}, {method: {service: pkg.Other}}]
    backendRefs: [{name: api-v1, port: 80}]
";
    let set = build(text);
    assert!(set.statuses()[0].accepted, "{:?}", set.statuses()[0]);
    let hdr = hyper::HeaderMap::new();
    let svc = ObjectRef { namespace: "demo".into(), name: "api".into() };
    let find = |path: &str| {
        let facts = crate::waypoint::routes::matching::RequestFacts {
            service: &svc,
            port: 80,
            client_namespace: Some("demo"),
            method: "POST",
            path,
            query: None,
            headers: &hdr,
            grpc: true,
        };
        set.table.find(&facts).is_some()
    };
    assert!(find("/pkg.Svc/Call") && find("/pkg.Other/Any"));
    assert!(!find("/pkg.Svc/Other"));
}

const LIMIT: &str = r"
apiVersion: heddle.dev/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: limit, namespace: demo}
spec:
  targetRefs:
  - {group: '', kind: Service, name: api}
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: split}
  total: {requestsPerSecond: 100}
  identity: {requestsPerSecond: 2}
  overrides:
  - requestsPerSecond: 50
    clientRefs: [{kind: ServiceAccount, name: batch}]
";

#[test]
fn a_rate_limit_policy_attaches_to_its_service_and_route_and_limits_per_identity() {
    let set = build(&format!("{GOOD}---{LIMIT}"));
    let s = set.statuses().iter().find(|s| s.route == "httplocalratelimitpolicy/demo/limit").expect("policy status");
    assert!(s.accepted && s.problems.is_empty(), "{s:?}");
    assert!(s.parents.iter().all(|p| p.attached), "{s:?}");
    let api = ObjectRef { namespace: "demo".into(), name: "api".into() };
    let limiter = &set.limits.of_service(&api)[0];
    assert_eq!(set.limits.of_route("httproute/demo/split").len(), 1);
    let now = std::time::Instant::now();
    let web = crate::identity::SpiffeId::new("td", "demo", "web");
    let batch = crate::identity::SpiffeId::new("td", "demo", "batch");
    assert_eq!((0..10).filter(|_| limiter.check(&web, now).is_ok()).count(), 2);
    assert_eq!((0..10).filter(|_| limiter.check(&batch, now).is_ok()).count(), 10, "batch's override");
}

#[test]
fn a_bad_rate_limit_policy_is_rejected_naming_every_problem_and_limits_nothing() {
    let bad = LIMIT
        .replace("requestsPerSecond: 100", "requestsPerSecond: 0")
        .replace("kind: ServiceAccount", "kind: Deployment")
        .replace("name: split}", "name: gone}")
        .replace("  total:", "  burst: 3\n  total:");
    let set = build(&format!("{GOOD}---{bad}"));
    let s = set.statuses().iter().find(|s| s.route == "httplocalratelimitpolicy/demo/limit").expect("policy status");
    assert!(!s.accepted);
    let all = s.problems.join("\n");
    for want in [
        "spec.burst: unknown field",
        "spec.total.requestsPerSecond: 0 is not a rate of at least 1",
        "spec.overrides[0].clientRefs[0].kind: Deployment is not ServiceAccount",
    ] {
        assert!(all.contains(want), "{want:?} in {all}");
    }
    assert!(s.parents[1].conditions[0].message.contains("HTTPRoute demo/gone does not exist"), "{s:?}");
    assert!(set.limits.is_empty(), "nothing applied");
}

#[test]
fn a_retry_budget_policy_attaches_to_a_route_and_bad_values_are_named() {
    let budget = r"
apiVersion: heddle.dev/v1alpha1
kind: RetryBudgetPolicy
metadata: {name: tight, namespace: demo}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: split}]
  retryRatio: 0
  minRetriesPerSecond: 1
  ttl: 5s
";
    let set = build(&format!("{GOOD}---{budget}"));
    let s = set.statuses().iter().find(|s| s.route == "retrybudgetpolicy/demo/tight").expect("status");
    assert!(s.accepted && s.problems.is_empty(), "{s:?}");
    let b = &set.budgets.of_route("httproute/demo/split")[0];
    let now = std::time::Instant::now();
    assert_eq!((0..20).filter(|_| b.try_retry(now)).count(), 5, "1/s over 5 s, no share");
    let bad = budget.replace("retryRatio: 0", "retryRatio: 2").replace("ttl: 5s", "ttl: 5m");
    let set = build(&format!("{GOOD}---{bad}"));
    let s = set.statuses().iter().find(|s| s.route == "retrybudgetpolicy/demo/tight").expect("status");
    let all = s.problems.join("\n");
    assert!(!s.accepted && all.contains("spec.retryRatio: 2 is not within 0-1") && all.contains("spec.ttl"), "{all}");
    assert!(set.budgets.is_empty());
}
