//! Hostile input, property-tested (issue 14's fuzzing, bounded for CI):
//! every parser that takes bytes from outside is fed arbitrary text and
//! structure-aware near-misses of what it expects, and must answer with a
//! value or an error, never a panic. proptest keeps any failing input in
//! `proptest-regressions/` next to this file, so a found crash stays a
//! regression test. Cases per target: [`CASES`] (structure-aware) and
//! [`CASES_RAW`] (arbitrary strings).
//!
//! Targets: the local configuration, authorization policy documents, the
//! waypoint's route documents (Gateway API, Istio, Heddle policies), the
//! HBONE `CONNECT` authority, L7 path normalisation (which must also be
//! idempotent: policy and routing see the normalised path, so a second
//! pass must change nothing), trace context headers, and the admin API's
//! query strings. Each property feeds its generated input to the fuzz
//! target of the same parser ([`crate::fuzzing`]), so both drive one body
//! of checks; the `CONNECT` authority's has no fuzz twin.

use proptest::prelude::*;

use crate::fuzzing;

/// Cases per structure-aware target.
const CASES: u32 = 1500;
/// Cases per arbitrary-string target.
const CASES_RAW: u32 = 3000;

/// YAML made of the tokens the parsers look for, in any order: deep
/// enough to reach the typed conversions, wrong often enough to reach
/// every error path.
fn yaml_like(words: &'static [&'static str]) -> impl Strategy<Value = String> {
    let token = prop_oneof![
        4 => proptest::sample::select(words).prop_map(str::to_owned),
        2 => proptest::sample::select(&[": ", "\n", "\n  ", "\n  - ", "- ", "[", "]", "{", "}", ", ", "---\n", "\"", "'", "*", "&a ", "*a", "!!str ", "~"][..]).prop_map(str::to_owned),
        2 => "[a-z0-9./:*_-]{0,12}",
        1 => "[0-9]{1,6}",
        1 => any::<String>().prop_map(|s| s.chars().take(8).collect()),
    ];
    proptest::collection::vec(token, 0..60).prop_map(|t| t.concat())
}

const CONFIG_WORDS: &[&str] = &[
    "workloads:",
    "services:",
    "namespaces:",
    "waypoints:",
    "name:",
    "namespace:",
    "node:",
    "ips:",
    "netns:",
    "enrolled:",
    "labels:",
    "serviceAccount:",
    "inboundMode:",
    "STRICT",
    "PERMISSIVE",
    "vip:",
    "ports:",
    "port:",
    "targetPort:",
    "selector:",
    "useWaypoint:",
    "trustDomain:",
    "10.0.0.1",
    "\"10.96.0.1\"",
    "true",
    "false",
    "/run/netns/x",
    "gateway.networking.k8s.io/gateway-name:",
];

const POLICY_WORDS: &[&str] = &[
    "apiVersion:",
    "security.istio.io/v1",
    "heddle.dev/v1alpha1",
    "kind:",
    "AuthorizationPolicy",
    "metadata:",
    "name:",
    "namespace:",
    "spec:",
    "action:",
    "ALLOW",
    "DENY",
    "AUDIT",
    "CUSTOM",
    "rules:",
    "from:",
    "source:",
    "principals:",
    "namespaces:",
    "ipBlocks:",
    "notPrincipals:",
    "to:",
    "operation:",
    "ports:",
    "paths:",
    "methods:",
    "when:",
    "key:",
    "values:",
    "source.ip",
    "request.headers[x]",
    "selector:",
    "matchLabels:",
    "targetRefs:",
    "group:",
    "Service",
    "\"cluster.local/ns/demo/sa/web\"",
    "10.0.0.0/8",
    "\"8080\"",
];

const ROUTE_WORDS: &[&str] = &[
    "apiVersion:",
    "gateway.networking.k8s.io/v1",
    "networking.istio.io/v1",
    "heddle.dev/v1alpha1",
    "kind:",
    "HTTPRoute",
    "GRPCRoute",
    "VirtualService",
    "DestinationRule",
    "HTTPLocalRateLimitPolicy",
    "RetryBudgetPolicy",
    "ReferenceGrant",
    "metadata:",
    "name:",
    "namespace:",
    "spec:",
    "parentRefs:",
    "group:",
    "\"\"",
    "Service",
    "port:",
    "rules:",
    "matches:",
    "path:",
    "type:",
    "PathPrefix",
    "Exact",
    "RegularExpression",
    "value:",
    "headers:",
    "queryParams:",
    "method:",
    "backendRefs:",
    "weight:",
    "filters:",
    "RequestHeaderModifier",
    "URLRewrite",
    "RequestRedirect",
    "RequestMirror",
    "timeouts:",
    "request:",
    "backendRequest:",
    "10s",
    "0.5s",
    "-1s",
    "retry:",
    "attempts:",
    "codes:",
    "backoff:",
    "hosts:",
    "http:",
    "match:",
    "route:",
    "destination:",
    "host:",
    "subset:",
    "fault:",
    "delay:",
    "abort:",
    "percentage:",
    "fixedDelay:",
    "httpStatus:",
    "mirror:",
    "subsets:",
    "labels:",
    "trafficPolicy:",
    "connectionPool:",
    "outlierDetection:",
    "targetRefs:",
    "total:",
    "requestsPerSecond:",
    "api",
    "(a|b)*c",
    "\"[\"",
];

fn config() -> ProptestConfig {
    ProptestConfig { cases: CASES, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_local_configuration_parser_never_panics(text in yaml_like(CONFIG_WORDS)) {
        fuzzing::config(text.as_bytes());
    }

    #[test]
    fn policy_documents_never_panic_the_loader(text in yaml_like(POLICY_WORDS)) {
        fuzzing::policy(text.as_bytes());
    }

    #[test]
    fn route_documents_never_panic_the_waypoint(text in yaml_like(ROUTE_WORDS)) {
        fuzzing::routes(text.as_bytes());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES_RAW, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics_the_configuration_or_policy_parsers(text in any::<String>()) {
        fuzzing::config(text.as_bytes());
        fuzzing::policy(text.as_bytes());
    }

    #[test]
    fn a_connect_authority_is_a_local_address_or_refused(authority in "[0-9a-z.:\\[\\]%@-]{0,40}") {
        let pods = ["10.0.0.2".parse().expect("an address")];
        if let Ok(uri) = format!("http://{authority}/").parse::<hyper::Uri>() {
            if let Ok(target) = crate::proxy::tunnel::connect_target(&uri, &pods) {
                prop_assert_eq!(target.ip(), pods[0]);
            }
        }
    }

    #[test]
    fn path_normalisation_is_total_and_idempotent(path in "/[a-zA-Z0-9/.%_~-]{0,40}") {
        fuzzing::path(path.as_bytes());
    }

    #[test]
    fn trace_headers_never_panic_the_propagators(
        traceparent in "[0-9a-f-]{0,60}",
        b3 in "[0-9a-fd-]{0,60}",
        sampled in "[0-9a-z]{0,3}",
        flags in "[0-9]{0,2}",
    ) {
        let lines = format!(
            "traceparent: {traceparent}\nb3: {b3}\nx-b3-sampled: {sampled}\nx-b3-traceid: {traceparent}\nx-b3-spanid: {b3}\nx-b3-flags: {flags}\n"
        );
        fuzzing::trace_headers(lines.as_bytes());
    }

    #[test]
    fn admin_query_strings_never_panic(q in any::<String>()) {
        fuzzing::admin_query(q.as_bytes());
    }
}
