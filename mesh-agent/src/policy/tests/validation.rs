//! Validation: every rejected field is named with its policy, every problem
//! of a policy is reported at once, the other policies keep working, and
//! accepted-but-surprising policies carry warnings.

use super::{build, policy, set, web, CURL, DEFAULT_ALLOW};
use crate::policy::{Caveat, Problem};

/// The one error of a single-policy set: (field, message).
fn rejected(yaml: &str) -> (String, String) {
    let (set, errors) = build(yaml);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(set.is_empty());
    (errors[0].field.clone(), errors[0].to_string())
}

/// `name: spec => field, message fragment;` each a policy `demo/p` rejected
/// for exactly one field.
macro_rules! rejects {
    ($($name:ident: $spec:expr => $field:expr, $fragment:expr;)*) => {$(
        #[test]
        fn $name() {
            let (field, message) = rejected(&policy("demo/p", $spec));
            assert_eq!(field, $field);
            assert!(message.starts_with(&format!("policy demo/p: {field}: ")), "{message}");
            assert!(message.contains($fragment), "{message}");
        }
    )*};
}

rejects! {
    rejects_an_unknown_spec_field: "{rulez: []}" => "spec.rulez", "unknown field `rulez`";
    rejects_an_unknown_source_field:
        "{rules: [{from: [{source: {principal: [x]}}]}]}" => "spec.rules[0].from[0].source.principal", "unknown field `principal`";
    rejects_an_unknown_operation_field:
        "{rules: [{to: [{operation: {port: ['80']}}]}]}" => "spec.rules[0].to[0].operation.port", "unknown field `port`";
    rejects_an_unknown_condition_field:
        "{rules: [{when: [{key: source.ip, value: [1.2.3.4]}]}]}" => "spec.rules[0].when[0].value", "unknown field `value`";
    rejects_an_unknown_rule_field: "{rules: [{form: []}]}" => "spec.rules[0].form", "unknown field `form`";
    rejects_an_unknown_selector_field: "{selector: {matchLabel: {a: b}}}" => "spec.selector.matchLabel", "unknown field `matchLabel`";
    rejects_an_unknown_action: "{action: REJECT}" => "spec.action", "unknown variant `REJECT`";
    rejects_the_custom_action: "{action: CUSTOM, provider: {name: ext}}" => "spec.action", "CUSTOM is not supported";
    rejects_a_malformed_cidr:
        "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 10.0.0.0/33]}}]}]}" => "spec.rules[0].from[0].source.ipBlocks[1]", "\"10.0.0.0/33\" is not an IP address or CIDR";
    rejects_a_malformed_not_ip_block:
        "{rules: [{from: [{source: {notIpBlocks: [10.0.0]}}]}]}" => "spec.rules[0].from[0].source.notIpBlocks[0]", "not an IP address";
    rejects_a_malformed_remote_ip_block_although_it_is_l7:
        "{rules: [{from: [{source: {remoteIpBlocks: [nope]}}]}]}" => "spec.rules[0].from[0].source.remoteIpBlocks[0]", "not an IP address";
    rejects_a_malformed_source_ip_condition:
        "{rules: [{when: [{key: source.ip, values: [1.2.3.4/40]}]}]}" => "spec.rules[0].when[0].values[0]", "not an IP address";
    rejects_a_malformed_destination_ip_condition:
        "{rules: [{when: [{key: destination.ip, notValues: [x]}]}]}" => "spec.rules[0].when[0].notValues[0]", "not an IP address";
    rejects_port_zero: "{rules: [{to: [{operation: {ports: ['0']}}]}]}" => "spec.rules[0].to[0].operation.ports[0]", "is not a port (1-65535)";
    rejects_a_port_above_65535: "{rules: [{to: [{operation: {notPorts: [65536]}}]}]}" => "spec.rules[0].to[0].operation.notPorts[0]", "\"65536\"";
    rejects_a_descending_port_range:
        "{rules: [{to: [{operation: {ports: ['9000-8000']}}]}]}" => "spec.rules[0].to[0].operation.ports[0]", "\"9000-8000\"";
    rejects_a_named_port: "{rules: [{to: [{operation: {ports: [http]}}]}]}" => "spec.rules[0].to[0].operation.ports[0]", "\"http\"";
    rejects_a_bad_destination_port_condition:
        "{rules: [{when: [{key: destination.port, values: ['99999']}]}]}" => "spec.rules[0].when[0].values[0]", "not a port";
    rejects_an_empty_principal: "{rules: [{from: [{source: {principals: ['']}}]}]}" => "spec.rules[0].from[0].source.principals[0]", "empty string";
    rejects_an_empty_namespace: "{rules: [{from: [{source: {notNamespaces: [a, '']}}]}]}" => "spec.rules[0].from[0].source.notNamespaces[1]", "empty string";
    rejects_an_empty_l7_value: "{rules: [{to: [{operation: {methods: ['']}}]}]}" => "spec.rules[0].to[0].operation.methods[0]", "empty string";
    rejects_an_empty_condition_key: "{rules: [{when: [{key: '', values: [a]}]}]}" => "spec.rules[0].when[0].key", "empty string";
    rejects_an_empty_selector_label_key: "{selector: {matchLabels: {'': x}}}" => "spec.selector.matchLabels[\"\"]", "empty string";
    rejects_a_bad_service_account:
        "{rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]}" => "spec.rules[0].from[0].source.serviceAccounts[0]", "not a service account";
    rejects_a_wildcard_service_account:
        "{rules: [{from: [{source: {notServiceAccounts: ['ns/*']}}]}]}" => "spec.rules[0].from[0].source.notServiceAccounts[0]", "no wildcards";
    rejects_an_empty_source: "{rules: [{from: [{source: {}}]}]}" => "spec.rules[0].from[0].source", "sets no field";
    rejects_a_from_entry_without_source: "{rules: [{from: [{}]}]}" => "spec.rules[0].from[0]", "missing `source`";
    rejects_an_empty_operation: "{rules: [{to: [{operation: {}}]}]}" => "spec.rules[0].to[0].operation", "sets no field";
    rejects_a_to_entry_without_operation: "{rules: [{to: [{}]}]}" => "spec.rules[0].to[0]", "missing `operation`";
    rejects_a_condition_without_values: "{rules: [{when: [{key: source.ip}]}]}" => "spec.rules[0].when[0]", "needs `values` or `notValues`";
    rejects_a_condition_without_key: "{rules: [{when: [{values: [a]}]}]}" => "spec.rules[0].when[0]", "missing field `key`";
    rejects_a_wrongly_typed_field: "{rules: [{from: {source: {}}}]}" => "spec.rules[0].from", "invalid type";
}

#[test]
fn rejects_unsupported_api_versions_kinds_and_missing_names() {
    let (_, errors) = build(
        "apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: demo}\n---\n\
         apiVersion: heddle.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {namespace: demo}\n",
    );
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(
        messages[0].starts_with("policy demo/a: apiVersion: apiVersion \"security.istio.io/v2\" is not supported"),
        "{}",
        messages[0]
    );
    assert!(messages[1].starts_with("policy demo/<unnamed>: metadata.name: a policy needs a name"), "{}", messages[1]);
}

#[test]
fn reports_every_problem_of_a_policy_at_once() {
    let (_, errors) = build(&policy(
        "demo/p",
        "{action: CUSTOM, rules: [{from: [{source: {ipBlocks: [x, y]}}], to: [{operation: {ports: ['0']}}]}]}",
    ));
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.action",
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "spec.rules[0].from[0].source.ipBlocks[1]",
            "spec.rules[0].to[0].operation.ports[0]"
        ]
    );
}

#[test]
fn other_policies_keep_working_when_one_is_rejected() {
    let yaml = policy("demo/bad", "{action: DENY, rules: [{from: [{source: {ipBlocks: [10.0.0.0/99]}}]}]}")
        + &policy(
            "demo/deny-curl",
            &format!("{{action: DENY, rules: [{{from: [{{source: {{principals: ['{CURL}']}}}}]}}]}}"),
        )
        + &policy("demo/unknown", "{action: DENY, rules: [{}], extra: true}");
    let (set, errors) = build(&yaml);
    assert_eq!(errors.len(), 2);
    assert_eq!((errors[0].index, errors[0].policy.to_string()), (0, "demo/bad".to_owned()));
    assert_eq!((errors[1].index, errors[1].field.as_str()), (2, "spec.extra"));
    assert_eq!(set.len(), 1);
    assert_eq!(web().decide(&set), "DENY policy=demo/deny-curl rule=0 reason=denied_by_deny_policy");
    assert_eq!(web().peer("td/ns/a/sa/b").decide(&set), DEFAULT_ALLOW);
}

#[test]
fn a_second_definition_of_a_policy_is_rejected() {
    let (set, errors) = build(&(policy("demo/p", "{}") + &policy("demo/p", "{rules: [{}]}")));
    assert_eq!(set.len(), 1);
    assert!(matches!(errors[0].problem, Problem::Duplicate(0)), "{errors:?}");
    assert_eq!(errors[0].index, 1);
}

#[test]
fn kubernetes_metadata_and_status_are_accepted_and_only_spec_is_strict() {
    let set = set(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata:\n  name: p\n  namespace: demo\n  uid: 0d9f\n  resourceVersion: '7'\n  generation: 2\n  labels: {team: a}\n  creationTimestamp: '2025-01-01T00:00:00Z'\n  managedFields: [{manager: kubectl, operation: Apply}]\n\
         spec:\n  rules:\n  - from:\n    to:\n    - operation:\n        ports: [8080]\n\
         status:\n  conditions: [{type: Accepted, status: 'True'}]\n",
    );
    assert_eq!(web().decide(&set), "ALLOW policy=demo/p rule=0 reason=allowed_by_policy");
}

fn caveats(yaml: &str) -> Vec<(String, Caveat)> {
    set(yaml).warnings().iter().map(|w| (w.field.clone(), w.caveat.clone())).collect()
}

#[test]
fn warns_about_l7_attributes_in_allow_and_deny_rules() {
    let got = caveats(
        &(policy("demo/a", "{rules: [{to: [{operation: {methods: [GET], paths: [/x]}}], when: [{key: 'request.headers[a]', values: [b]}]}]}")
            + &policy("demo/d", "{action: DENY, rules: [{}, {from: [{source: {requestPrincipals: ['*']}}], when: [{key: foo, values: [b]}]}]}")),
    );
    assert_eq!(
        got,
        [
            ("spec.rules[0]".into(), Caveat::L7RuleNeverMatches("methods, paths, when key request.headers[a]".into())),
            ("spec.rules[1]".into(), Caveat::L7PartsDropped("requestPrincipals, unknown when key foo".into())),
        ]
    );
}

#[test]
fn a_policy_for_a_waypoint_is_valid_but_not_applied() {
    let yaml = policy("demo/waypoint", "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: w}], rules: [{to: [{operation: {methods: [GET]}}]}]}");
    let set = set(&yaml);
    assert!(set.is_empty());
    assert!(set.warnings().iter().any(|w| w.caveat == Caveat::TargetRef && w.field == "spec.targetRefs"));
    assert_eq!(web().decide(&set), DEFAULT_ALLOW);
}

#[test]
fn warns_about_policies_that_silently_match_nothing() {
    let got = caveats(
        &(policy("demo/d", "{action: DENY}")
            + &policy(
                "demo/s",
                &format!("{{rules: [{{from: [{{source: {{principals: ['spiffe://{CURL}', 'a*b']}}}}]}}]}}"),
            )
            + &super::annotated("demo/r", "{istio.io/dry-run: yes}", "{}")),
    );
    let kinds: Vec<&Caveat> = got.iter().map(|(_, c)| c).collect();
    assert_eq!(
        kinds,
        [
            &Caveat::NoRules("DENY"),
            &Caveat::SpiffePrefix(format!("spiffe://{CURL}")),
            &Caveat::LiteralStar("a*b".into()),
            &Caveat::DryRunValue("yes".into()),
        ]
    );
    assert_eq!(got[3].0, "metadata.annotations[\"istio.io/dry-run\"]");
}
