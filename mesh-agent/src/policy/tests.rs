//! Table-driven tests of the policy semantics: one named case per behaviour,
//! each a set of policies (YAML, as a user writes them), a connection, and
//! the decision line a user would see (`heddle policy eval`).
//!
//! The default connection: peer `cluster.local/ns/client/sa/curl` at
//! 10.1.0.5 connects to workload `demo` {app: web, version: v1} at
//! 10.0.0.2:8080.

mod validation;

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use super::{authorize, load, Connection, Destination, OrigDst, PeerIdentity, PolicyError, PolicySet, SrcIp};

const ROOT: &str = super::DEFAULT_ROOT_NAMESPACE;
const CURL: &str = "cluster.local/ns/client/sa/curl";

/// Builds a set from YAML; panics on any load error (policy errors are returned).
fn build(yaml: &str) -> (PolicySet, Vec<PolicyError>) {
    let mut loaded = load::Loaded::default();
    load::parse_documents(yaml, Path::new("test.yaml"), &mut loaded);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    PolicySet::from_objects(loaded.objects.into_iter().map(|(_, o)| o), ROOT)
}

/// Builds a set that must be free of errors.
fn set(yaml: &str) -> PolicySet {
    let (set, errors) = build(yaml);
    assert!(errors.is_empty(), "{}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"));
    set
}

/// One policy document; `id` is `namespace/name`, `spec` flow-style YAML.
fn policy(id: &str, spec: &str) -> String {
    annotated(id, "{}", spec)
}

fn annotated(id: &str, annotations: &str, spec: &str) -> String {
    let (ns, name) = id.split_once('/').unwrap();
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}, annotations: {annotations}}}\nspec: {spec}\n---\n"
    )
}

/// A connection under test; builder methods change one attribute.
#[derive(Clone)]
struct Conn {
    ns: &'static str,
    labels: Vec<(&'static str, &'static str)>,
    dst: SocketAddr,
    src: &'static str,
    peer: Option<&'static str>,
}

fn web() -> Conn {
    Conn {
        ns: "demo",
        labels: vec![("app", "web"), ("version", "v1")],
        dst: "10.0.0.2:8080".parse().unwrap(),
        src: "10.1.0.5",
        peer: Some(CURL),
    }
}

impl Conn {
    fn plaintext(mut self) -> Self {
        self.peer = None;
        self
    }
    fn peer(mut self, p: &'static str) -> Self {
        self.peer = Some(p);
        self
    }
    fn port(mut self, port: u16) -> Self {
        self.dst.set_port(port);
        self
    }
    fn dst_ip(mut self, ip: &str) -> Self {
        self.dst.set_ip(ip.parse().unwrap());
        self
    }
    fn src(mut self, ip: &'static str) -> Self {
        self.src = ip;
        self
    }
    fn ns(mut self, ns: &'static str) -> Self {
        self.ns = ns;
        self
    }
    fn labels(mut self, labels: &[(&'static str, &'static str)]) -> Self {
        self.labels = labels.to_vec();
        self
    }

    /// The decision line for this connection under `policies`.
    fn decide(&self, policies: &PolicySet) -> String {
        let labels: BTreeMap<String, String> = self.labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        let peer: Option<PeerIdentity> = self.peer.map(|p| p.parse().unwrap());
        let conn = Connection {
            dst: Destination { namespace: self.ns, labels: &labels, addr: OrigDst(self.dst) },
            src: SrcIp(self.src.parse().unwrap()),
            peer: peer.as_ref(),
        };
        authorize(policies, &conn).to_string()
    }
}

const DEFAULT_ALLOW: &str = "ALLOW policy=- reason=allowed_no_allow_policies";

fn allowed(policy: &str, rule: usize) -> String {
    format!("ALLOW policy={policy} rule={rule} reason=allowed_by_policy")
}
fn denied(policy: &str, rule: usize) -> String {
    format!("DENY policy={policy} rule={rule} reason=denied_by_deny_policy")
}
fn unmatched(first_allow_policy: &str) -> String {
    format!("DENY policy={first_allow_policy} reason=no_allow_policy_matched")
}

/// `name: policies, connection => expected decision line;`
macro_rules! cases {
    ($($name:ident: $policies:expr, $conn:expr => $expect:expr;)*) => {$(
        #[test]
        fn $name() {
            let policies: String = $policies;
            assert_eq!($conn.decide(&set(&policies)), $expect, "policies:\n{policies}");
        }
    )*};
}

/// An ALLOW policy `demo/p` with one rule.
fn allow_rule(rule: &str) -> String {
    policy("demo/p", &format!("{{rules: [{rule}]}}"))
}
/// A DENY policy `demo/d` with one rule.
fn deny_rule(rule: &str) -> String {
    policy("demo/d", &format!("{{action: DENY, rules: [{rule}]}}"))
}
fn src(source: &str) -> String {
    allow_rule(&format!("{{from: [{{source: {source}}}]}}"))
}
fn op(operation: &str) -> String {
    allow_rule(&format!("{{to: [{{operation: {operation}}}]}}"))
}
fn when(key: &str, field: &str, values: &str) -> String {
    allow_rule(&format!("{{when: [{{key: '{key}', {field}: {values}}}]}}"))
}

// --- Decision order: DENY, then default allow, then ALLOW, then deny. ---
cases! {
    allows_when_no_policy_applies: String::new(), web() => DEFAULT_ALLOW;
    allow_policy_with_empty_spec_denies_everything: policy("demo/nothing", "{}"), web() => unmatched("demo/nothing");
    allow_policy_without_spec_denies_everything:
        "apiVersion: heddle.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bare, namespace: demo}\n".into(),
        web() => unmatched("demo/bare");
    allow_policy_with_one_empty_rule_allows_everything: allow_rule("{}"), web().plaintext() => allowed("demo/p", 0);
    matching_deny_wins_over_matching_allow: allow_rule("{}") + &deny_rule("{}"), web() => denied("demo/d", 0);
    deny_that_does_not_match_leaves_the_default_allow: deny_rule("{to: [{operation: {ports: ['9090']}}]}"), web() => DEFAULT_ALLOW;
    deny_policy_without_rules_never_matches: policy("demo/d", "{action: DENY}"), web() => DEFAULT_ALLOW;
    one_matching_allow_policy_is_enough:
        policy("demo/a", "{rules: [{to: [{operation: {ports: ['1']}}]}]}") + &policy("demo/b", "{rules: [{}]}"),
        web() => allowed("demo/b", 0);
    denial_names_the_first_allow_policy_when_none_matches:
        policy("demo/b", "{rules: [{to: [{operation: {ports: ['1']}}]}]}") + &policy("demo/a", "{rules: [{to: [{operation: {ports: ['2']}}]}]}"),
        web() => unmatched("demo/a");
    rules_are_ored_and_the_matching_rule_is_named:
        policy("demo/p", "{rules: [{to: [{operation: {ports: ['1']}}]}, {to: [{operation: {ports: ['8080']}}]}]}"),
        web() => allowed("demo/p", 1);
    sources_of_a_rule_are_ored:
        allow_rule("{from: [{source: {namespaces: [other]}}, {source: {ipBlocks: [10.1.0.0/16]}}]}"), web() => allowed("demo/p", 0);
    operations_of_a_rule_are_ored:
        allow_rule("{to: [{operation: {ports: ['1']}}, {operation: {ports: ['8080']}}]}"), web() => allowed("demo/p", 0);
    fields_of_a_source_are_anded:
        src(&format!("{{principals: ['{CURL}'], ipBlocks: [192.168.0.0/16]}}")), web() => unmatched("demo/p");
    from_and_to_of_a_rule_are_anded:
        allow_rule(&format!("{{from: [{{source: {{principals: ['{CURL}']}}}}], to: [{{operation: {{ports: ['9090']}}}}]}}")),
        web() => unmatched("demo/p");
    conditions_of_a_rule_are_anded:
        allow_rule("{when: [{key: destination.port, values: ['8080']}, {key: source.ip, values: [192.168.0.1]}]}"),
        web() => unmatched("demo/p");
}

// --- Source identity fields and their `not` twins; plaintext peers. ---
cases! {
    principals_match_the_exact_peer_identity: src(&format!("{{principals: ['{CURL}']}}")), web() => allowed("demo/p", 0);
    principals_do_not_match_another_peer: src(&format!("{{principals: ['{CURL}']}}")), web().peer("cluster.local/ns/client/sa/wget") => unmatched("demo/p");
    principals_match_by_prefix: src("{principals: ['cluster.local/ns/client/*']}"), web() => allowed("demo/p", 0);
    principals_match_by_suffix: src("{principals: ['*/sa/curl']}"), web() => allowed("demo/p", 0);
    principals_star_matches_any_authenticated_peer: src("{principals: ['*']}"), web().peer("td/ns/x/sa/y") => allowed("demo/p", 0);
    principals_star_does_not_match_a_plaintext_peer: src("{principals: ['*']}"), web().plaintext() => unmatched("demo/p");
    principals_never_match_a_plaintext_peer: src(&format!("{{principals: ['{CURL}']}}")), web().plaintext() => unmatched("demo/p");
    principals_written_with_spiffe_prefix_never_match: src(&format!("{{principals: ['spiffe://{CURL}']}}")), web() => unmatched("demo/p");
    not_principals_exclude_the_listed_peer: src(&format!("{{notPrincipals: ['{CURL}']}}")), web() => unmatched("demo/p");
    not_principals_let_other_peers_match: src(&format!("{{notPrincipals: ['{CURL}']}}")), web().peer("td/ns/a/sa/b") => allowed("demo/p", 0);
    not_principals_match_a_plaintext_peer_as_istio_does: src(&format!("{{notPrincipals: ['{CURL}']}}")), web().plaintext() => allowed("demo/p", 0);
    deny_not_principals_star_rejects_plaintext_peers:
        deny_rule("{from: [{source: {notPrincipals: ['*']}}]}"), web().plaintext() => denied("demo/d", 0);
    deny_not_principals_star_lets_authenticated_peers_in:
        deny_rule("{from: [{source: {notPrincipals: ['*']}}]}"), web() => DEFAULT_ALLOW;
    namespaces_match_the_namespace_of_the_peer_identity: src("{namespaces: [client]}"), web() => allowed("demo/p", 0);
    namespaces_match_by_prefix: src("{namespaces: ['cli*']}"), web() => allowed("demo/p", 0);
    namespaces_match_by_suffix: src("{namespaces: ['*ent']}"), web() => allowed("demo/p", 0);
    namespaces_do_not_match_another_namespace: src("{namespaces: [prod]}"), web() => unmatched("demo/p");
    namespaces_never_match_a_plaintext_peer: src("{namespaces: [client]}"), web().plaintext() => unmatched("demo/p");
    not_namespaces_exclude_the_peer_namespace: src("{notNamespaces: [client]}"), web() => unmatched("demo/p");
    not_namespaces_match_a_plaintext_peer_as_istio_does: src("{notNamespaces: [client]}"), web().plaintext() => allowed("demo/p", 0);
    service_accounts_match_namespace_and_name: src("{serviceAccounts: [client/curl]}"), web() => allowed("demo/p", 0);
    service_accounts_without_namespace_mean_the_policy_namespace: src("{serviceAccounts: [curl]}"), web() => unmatched("demo/p");
    service_accounts_short_form_matches_a_peer_of_the_policy_namespace:
        src("{serviceAccounts: [curl]}"), web().peer("cluster.local/ns/demo/sa/curl") => allowed("demo/p", 0);
    service_accounts_match_in_any_trust_domain: src("{serviceAccounts: [client/curl]}"), web().peer("other.td/ns/client/sa/curl") => allowed("demo/p", 0);
    service_accounts_never_match_a_plaintext_peer: src("{serviceAccounts: [client/curl]}"), web().plaintext() => unmatched("demo/p");
    not_service_accounts_exclude_the_peer: src("{notServiceAccounts: [client/curl]}"), web() => unmatched("demo/p");
    not_service_accounts_match_a_plaintext_peer: src("{notServiceAccounts: [client/curl]}"), web().plaintext() => allowed("demo/p", 0);
}

// --- Source IP blocks: no identity needed. ---
cases! {
    ip_blocks_match_the_source_by_cidr: src("{ipBlocks: [10.1.0.0/16]}"), web() => allowed("demo/p", 0);
    ip_blocks_match_a_single_address: src("{ipBlocks: [10.1.0.5]}"), web() => allowed("demo/p", 0);
    ip_blocks_do_not_match_another_source: src("{ipBlocks: [10.2.0.0/16]}"), web() => unmatched("demo/p");
    ip_blocks_apply_to_plaintext_peers: src("{ipBlocks: [10.1.0.0/16]}"), web().plaintext() => allowed("demo/p", 0);
    not_ip_blocks_exclude_the_source: src("{notIpBlocks: [10.1.0.0/24]}"), web() => unmatched("demo/p");
    not_ip_blocks_let_other_sources_match: src("{notIpBlocks: [10.9.0.0/24]}"), web() => allowed("demo/p", 0);
    ip_blocks_match_ipv6_sources: src("{ipBlocks: ['fd00:1::/64']}"), web().src("fd00:1::7") => allowed("demo/p", 0);
    ipv4_blocks_match_ipv4_mapped_ipv6_sources: src("{ipBlocks: [10.1.0.0/16]}"), web().src("::ffff:10.1.0.5") => allowed("demo/p", 0);
    ipv4_blocks_do_not_match_ipv6_sources: src("{ipBlocks: [0.0.0.0/0]}"), web().src("fd00:1::7") => unmatched("demo/p");
}

// --- Operation ports and ranges. ---
cases! {
    ports_match_the_destination_port: op("{ports: ['8080']}"), web() => allowed("demo/p", 0);
    ports_do_not_match_another_port: op("{ports: ['8080']}"), web().port(8081) => unmatched("demo/p");
    ports_written_as_numbers_match: op("{ports: [8080]}"), web() => allowed("demo/p", 0);
    not_ports_exclude_the_port: op("{notPorts: ['8080']}"), web() => unmatched("demo/p");
    not_ports_let_other_ports_match: op("{notPorts: ['22']}"), web() => allowed("demo/p", 0);
    port_ranges_include_their_first_port: op("{ports: ['8080-8100']}"), web() => allowed("demo/p", 0);
    port_ranges_include_their_last_port: op("{ports: ['8000-8100']}"), web().port(8100) => allowed("demo/p", 0);
    port_ranges_exclude_ports_outside: op("{ports: ['8000-8100']}"), web().port(8101) => unmatched("demo/p");
    not_ports_ranges_exclude_the_whole_range: op("{notPorts: ['8000-9000']}"), web() => unmatched("demo/p");
}

// --- `when` conditions on L4 keys. ---
cases! {
    when_source_ip_values_match: when("source.ip", "values", "[10.1.0.0/16]"), web() => allowed("demo/p", 0);
    when_source_ip_not_values_exclude: when("source.ip", "notValues", "[10.1.0.5]"), web() => unmatched("demo/p");
    when_source_namespace_matches_the_identity: when("source.namespace", "values", "[client]"), web() => allowed("demo/p", 0);
    when_source_namespace_never_matches_plaintext: when("source.namespace", "values", "['*']"), web().plaintext() => unmatched("demo/p");
    when_source_namespace_not_values_match_plaintext: when("source.namespace", "notValues", "[client]"), web().plaintext() => allowed("demo/p", 0);
    when_source_principal_matches_by_prefix: when("source.principal", "values", "['cluster.local/*']"), web() => allowed("demo/p", 0);
    when_source_principal_not_values_exclude: when("source.principal", "notValues", &format!("['{CURL}']")), web() => unmatched("demo/p");
    when_destination_ip_values_match: when("destination.ip", "values", "[10.0.0.0/24]"), web() => allowed("demo/p", 0);
    when_destination_ip_not_values_exclude: when("destination.ip", "notValues", "[10.0.0.2]"), web() => unmatched("demo/p");
    when_destination_ip_of_another_address_does_not_match: when("destination.ip", "values", "[10.0.0.3]"), web().dst_ip("10.0.0.2") => unmatched("demo/p");
    when_destination_port_values_match: when("destination.port", "values", "['8080']"), web() => allowed("demo/p", 0);
    when_destination_port_not_values_exclude: when("destination.port", "notValues", "['8000-8999']"), web() => unmatched("demo/p");
}

// --- L7 attributes fail closed: ALLOW rules never match, DENY rules drop them. ---
cases! {
    allow_rule_with_methods_never_matches: op("{ports: ['8080'], methods: [GET]}"), web() => unmatched("demo/p");
    allow_rule_with_l7_leaves_other_rules_working:
        policy("demo/p", "{rules: [{to: [{operation: {paths: [/api]}}]}, {}]}"), web() => allowed("demo/p", 1);
    allow_rule_with_request_principals_never_matches: src("{requestPrincipals: ['*']}"), web() => unmatched("demo/p");
    allow_rule_with_remote_ip_blocks_never_matches: src("{remoteIpBlocks: [0.0.0.0/0]}"), web() => unmatched("demo/p");
    allow_rule_with_an_l7_when_key_never_matches: when("request.headers[x-user]", "values", "[admin]"), web() => unmatched("demo/p");
    allow_rule_with_an_unknown_when_key_never_matches: when("source.colour", "values", "[blue]"), web() => unmatched("demo/p");
    deny_rule_is_enforced_without_its_l7_parts:
        deny_rule("{to: [{operation: {ports: ['8080'], methods: [POST]}}]}"), web() => denied("demo/d", 0);
    deny_rule_keeps_its_l4_parts_when_l7_ones_are_dropped:
        deny_rule("{to: [{operation: {ports: ['9090'], paths: [/admin]}}]}"), web() => DEFAULT_ALLOW;
    deny_operation_with_only_l7_fields_matches_every_connection:
        deny_rule("{to: [{operation: {methods: [DELETE]}}]}"), web().plaintext() => denied("demo/d", 0);
    deny_source_with_only_l7_fields_matches_every_source:
        deny_rule("{from: [{source: {notRequestPrincipals: ['*']}}]}"), web() => denied("demo/d", 0);
    deny_condition_on_an_l7_key_is_dropped:
        deny_rule("{to: [{operation: {ports: ['8080']}}], when: [{key: 'request.auth.claims[iss]', values: [x]}]}"),
        web() => denied("demo/d", 0);
}

// --- Dry-run and audit never change the verdict. ---
cases! {
    dry_run_deny_is_recorded_but_not_enforced:
        annotated("demo/d", "{heddle.dev/dry-run: 'true'}", "{action: DENY, rules: [{}]}"),
        web() => format!("{DEFAULT_ALLOW} dry-run=deny dry-run-policy=demo/d dry-run-rule=0 dry-run-reason=denied_by_deny_policy");
    istio_dry_run_annotation_is_honoured:
        annotated("demo/d", "{istio.io/dry-run: 'true'}", "{action: DENY, rules: [{}]}"),
        web() => format!("{DEFAULT_ALLOW} dry-run=deny dry-run-policy=demo/d dry-run-rule=0 dry-run-reason=denied_by_deny_policy");
    dry_run_allow_policy_does_not_turn_on_default_deny:
        annotated("demo/a", "{istio.io/dry-run: 'true'}", "{}"),
        web() => format!("{DEFAULT_ALLOW} dry-run=deny dry-run-policy=demo/a dry-run-reason=no_allow_policy_matched");
    dry_run_annotation_set_to_false_is_enforced:
        annotated("demo/d", "{heddle.dev/dry-run: 'false'}", "{action: DENY, rules: [{}]}"), web() => denied("demo/d", 0);
    dry_run_decision_combines_with_enforced_policies:
        allow_rule("{}") + &annotated("demo/q", "{heddle.dev/dry-run: 'true'}", "{action: DENY, rules: [{from: [{source: {notNamespaces: [client]}}]}]}"),
        web() => format!("{} dry-run=allow dry-run-policy=demo/p dry-run-rule=0 dry-run-reason=allowed_by_policy", allowed("demo/p", 0));
    audit_marks_a_matching_connection_and_allows_it:
        policy("demo/audit", "{action: AUDIT, rules: [{}]}"), web() => format!("{DEFAULT_ALLOW} audited=demo/audit audit-rule=0");
    audit_does_not_override_a_deny:
        policy("demo/audit", "{action: AUDIT, rules: [{}]}") + &deny_rule("{}"), web() => format!("{} audited=demo/audit audit-rule=0", denied("demo/d", 0));
    audit_that_does_not_match_marks_nothing:
        policy("demo/audit", "{action: AUDIT, rules: [{to: [{operation: {ports: ['1']}}]}]}"), web() => DEFAULT_ALLOW;
    audit_policy_is_not_an_allow_policy:
        policy("demo/audit", "{action: AUDIT, rules: [{to: [{operation: {ports: ['1']}}]}]}") + &allow_rule("{}"), web() => allowed("demo/p", 0);
}

// --- Selectors, namespaces and the root namespace. ---
cases! {
    policy_without_selector_applies_to_every_workload_of_its_namespace:
        policy("demo/nothing", "{}"), web().labels(&[("app", "db")]) => unmatched("demo/nothing");
    policy_selecting_the_workload_applies:
        policy("demo/nothing", "{selector: {matchLabels: {app: web}}}"), web() => unmatched("demo/nothing");
    selector_needs_every_label:
        policy("demo/nothing", "{selector: {matchLabels: {app: web, version: v2}}}"), web() => DEFAULT_ALLOW;
    allow_policy_of_another_workload_leaves_this_one_default_allow:
        policy("demo/db-only", "{selector: {matchLabels: {app: db}}}"), web() => DEFAULT_ALLOW;
    policy_of_another_namespace_does_not_apply: policy("other/nothing", "{}"), web() => DEFAULT_ALLOW;
    policy_selector_does_not_reach_other_namespaces:
        policy("other/nothing", "{selector: {matchLabels: {app: web}}}"), web() => DEFAULT_ALLOW;
    root_namespace_policy_applies_in_every_namespace:
        policy(&format!("{ROOT}/deny-all"), "{action: DENY, rules: [{}]}"), web().ns("anything") => denied(&format!("{ROOT}/deny-all"), 0);
    root_namespace_selector_matches_workloads_of_any_namespace:
        policy(&format!("{ROOT}/web"), "{action: DENY, selector: {matchLabels: {app: web}}, rules: [{}]}"), web() => denied(&format!("{ROOT}/web"), 0);
    root_namespace_selector_skips_other_workloads:
        policy(&format!("{ROOT}/web"), "{action: DENY, selector: {matchLabels: {app: web}}, rules: [{}]}"), web().labels(&[("app", "db")]) => DEFAULT_ALLOW;
    root_namespace_deny_is_named_before_a_namespace_deny:
        deny_rule("{}") + &policy(&format!("{ROOT}/z"), "{action: DENY, rules: [{}]}"), web() => denied(&format!("{ROOT}/z"), 0);
    root_allow_and_namespace_allow_are_both_allow_policies:
        policy(&format!("{ROOT}/nothing"), "{}") + &allow_rule("{to: [{operation: {ports: ['8080']}}]}"), web() => allowed("demo/p", 0);
    policy_without_namespace_lives_in_default:
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: nothing}\nspec: {}\n".into(),
        web().ns("default") => unmatched("default/nothing");
}

#[test]
fn root_namespace_is_configurable() {
    let yaml = policy("istio-system/deny-all", "{action: DENY, rules: [{}]}");
    let mut loaded = load::Loaded::default();
    load::parse_documents(&yaml, Path::new("t.yaml"), &mut loaded);
    let objects: Vec<_> = loaded.objects.into_iter().map(|(_, o)| o).collect();
    let (istio, _) = PolicySet::from_objects(objects.clone(), "istio-system");
    assert_eq!(web().decide(&istio), denied("istio-system/deny-all", 0));
    let (heddle, _) = PolicySet::from_objects(objects, ROOT);
    assert_eq!(web().decide(&heddle), DEFAULT_ALLOW);
}

#[test]
fn decisions_serialise_to_the_documented_json() {
    let set = set(&(deny_rule("{}") + &policy("demo/audit", "{action: AUDIT, rules: [{}]}")));
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    let conn = Connection {
        dst: Destination { namespace: "demo", labels: &labels, addr: OrigDst("10.0.0.2:80".parse().unwrap()) },
        src: SrcIp("10.1.0.5".parse().unwrap()),
        peer: None,
    };
    let json = authorize(&set, &conn).to_json();
    assert_eq!(json["verdict"], "deny");
    assert_eq!(json["policy"], "demo/d");
    assert_eq!(json["rule"], 0);
    assert_eq!(json["reason"], "denied_by_deny_policy");
    assert_eq!(json["audited"], true);
    assert_eq!(json["audit_policy"], "demo/audit");
    assert!(json["dry_run"].is_null());
}

#[test]
fn thousands_of_policies_elsewhere_do_not_change_the_decision() {
    let mut yaml = String::new();
    for i in 0..2000 {
        yaml += &policy(&format!("ns{}/deny-{i}", i % 50), "{action: DENY, rules: [{}]}");
        yaml += &policy(
            &format!("demo/deny-app-{i}"),
            &format!("{{action: DENY, selector: {{matchLabels: {{app: app{i}}}}}, rules: [{{}}]}}"),
        );
    }
    yaml += &deny_rule(&format!("{{from: [{{source: {{principals: ['{CURL}']}}}}]}}"));
    let set = set(&yaml);
    assert_eq!(set.len(), 4001);
    assert_eq!(web().decide(&set), denied("demo/d", 0));
    assert_eq!(web().peer("td/ns/a/sa/b").decide(&set), DEFAULT_ALLOW);
    assert_eq!(set.applicable("demo", &BTreeMap::from([("app".into(), "app7".into())])).len(), 2);
}

#[test]
fn peer_identities_parse_with_or_without_the_spiffe_scheme() {
    let a: PeerIdentity = CURL.parse().unwrap();
    let b: PeerIdentity = format!("spiffe://{CURL}").parse().unwrap();
    assert_eq!(a, b);
    assert_eq!((a.trust_domain(), a.namespace(), a.service_account()), ("cluster.local", "client", "curl"));
    for bad in ["", "cluster.local/ns/x", "td/ns//sa/y", "td/namespace/x/sa/y", "td/ns/x/sa/y/z"] {
        assert!(bad.parse::<PeerIdentity>().is_err(), "{bad}");
    }
}

#[test]
fn a_policy_set_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<PolicySet>();
    shareable::<super::Decision>();
}
