//! Unit tests of admission, live re-evaluation and the policy source.

use std::{path::Path, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{source::PolicySource, Authorizer, ConnFacts, Denial};
use crate::{
    config,
    identity::SpiffeId,
    policy::{load, PolicySet},
    registry::{ObjectRef, Registry, SharedRegistry},
};

const SERVER: &str = "10.0.0.2:8080";

fn registry(server_labels: &str) -> SharedRegistry {
    let text = format!(
        "trustDomain: td\nworkloads:\n  - {{name: server, namespace: demo, node: n1, ips: [\"10.0.0.2\"], enrolled: true, netns: /run/netns/s, labels: {{{server_labels}}}}}\n"
    );
    Arc::new(Registry::from_config(&config::parse(Path::new("t"), &text).unwrap()))
}

fn policies(yaml: &str) -> Arc<PolicySet> {
    let mut loaded = load::Loaded::default();
    load::parse_documents(yaml, Path::new("p.yaml"), &mut loaded);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let (set, errors) = PolicySet::from_objects(loaded.objects.into_iter().map(|(_, o)| o), "heddle-system");
    assert!(errors.is_empty(), "{errors:?}");
    Arc::new(set)
}

fn server() -> ObjectRef {
    ObjectRef { namespace: "demo".into(), name: "server".into() }
}

fn from(sa: &str) -> ConnFacts {
    let id = SpiffeId::new("td", "demo", sa);
    ConnFacts::tunnelled(server(), SERVER.parse().unwrap(), "10.0.0.1".parse().unwrap(), &id)
}

fn plaintext(src: &str) -> ConnFacts {
    ConnFacts::plaintext(server(), SERVER.parse().unwrap(), src.parse().unwrap())
}

struct Fixture {
    policies: watch::Sender<Arc<PolicySet>>,
    registry: watch::Sender<SharedRegistry>,
    authz: Arc<Authorizer>,
}

fn fixture(yaml: &str) -> Fixture {
    let (policies, prx) = watch::channel(policies(yaml));
    let (registry, rrx) = watch::channel(registry("app: server"));
    Fixture { policies, registry, authz: Arc::new(Authorizer::new(prx, rrx)) }
}

const ALLOW_CLIENT: &str = "apiVersion: heddle.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: allow-client, namespace: demo}\nspec:\n  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {principals: [td/ns/demo/sa/client]}}]}]\n";
const DENY_OTHER: &str = "apiVersion: heddle.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-other, namespace: demo}\nspec:\n  action: DENY\n  rules: [{from: [{source: {principals: [td/ns/demo/sa/x]}}]}, {from: [{source: {principals: [td/ns/demo/sa/other]}}]}]\n";
const AUDIT_ALL: &str = "apiVersion: heddle.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: watch, namespace: demo}\nspec: {action: AUDIT, rules: [{}]}\n";
const DRY_DENY_ALL: &str = "apiVersion: heddle.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: maybe, namespace: demo, annotations: {heddle.dev/dry-run: \"true\"}}\nspec: {action: DENY, rules: [{}]}\n";

#[test]
fn admits_the_allowed_principal_and_names_the_allow_policy_and_rule() {
    let f = fixture(ALLOW_CLIENT);
    let admitted = f.authz.admit(1, from("client")).unwrap();
    let mark = admitted.permit.mark();
    assert_eq!(
        (mark.policy.unwrap().to_string(), mark.rule, mark.denied),
        ("demo/allow-client".to_owned(), Some(0), false)
    );
    assert_eq!(f.authz.live_count(), 1);
    drop(admitted);
    assert_eq!(f.authz.live_count(), 0, "the guard unregisters");
}

#[test]
fn denies_other_principals_and_plaintext_peers_naming_the_first_allow_policy() {
    let f = fixture(ALLOW_CLIENT);
    for facts in [from("other"), plaintext("10.9.9.9")] {
        let denial = f.authz.admit(2, facts).err().unwrap();
        assert_eq!(
            denial.to_string(),
            "denied: no ALLOW policy matched (first applicable ALLOW policy: demo/allow-client)"
        );
        assert!(denial.mark().denied && denial.mark().rule.is_none());
    }
    assert_eq!(f.authz.live_count(), 0, "a denied connection is not registered");
}

#[test]
fn a_deny_policy_wins_and_its_text_names_policy_and_rule() {
    let f = fixture(&format!("{ALLOW_CLIENT}---\n{DENY_OTHER}"));
    let allow_all = "apiVersion: heddle.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: all, namespace: demo}\nspec: {rules: [{}]}\n";
    f.policies.send_replace(policies(&format!("{allow_all}---\n{DENY_OTHER}")));
    let denial = f.authz.admit(1, from("other")).err().unwrap();
    assert_eq!(denial.to_string(), "denied by policy demo/deny-other rule 1");
    assert_eq!(denial.reason(), "denied_by_deny_policy");
}

#[test]
fn audit_and_dry_run_are_recorded_without_changing_the_verdict() {
    let f = fixture(&format!("{AUDIT_ALL}---\n{DRY_DENY_ALL}"));
    let mark = f.authz.admit(1, from("client")).unwrap().permit.mark();
    assert!(mark.audited && !mark.denied);
    assert_eq!(mark.audit_policy.unwrap().to_string(), "demo/watch");
    assert_eq!(mark.dry_run.as_deref(), Some("deny by policy demo/maybe rule 0"));
    assert!(mark.policy.is_none(), "no ALLOW policy applies: {:?}", mark.policy);
}

#[test]
fn fails_closed_for_a_pod_the_registry_does_not_know() {
    let f = fixture("");
    let mut facts = from("client");
    facts.workload.name = "gone".into();
    let denial = f.authz.admit(1, facts).err().unwrap();
    assert!(matches!(denial, Denial::UnknownWorkload(_)));
    assert!(denial.to_string().contains("not in the registry"), "{denial}");
}

#[tokio::test]
async fn a_policy_change_revokes_exactly_the_live_connections_it_now_denies() {
    let f = fixture("");
    let client = f.authz.admit(1, from("client")).unwrap().live;
    let other = f.authz.admit(2, from("other")).unwrap().live;
    let plain = f.authz.admit(3, plaintext("10.9.9.9")).unwrap().live;
    let task = tokio::spawn(f.authz.clone().run(tokio_util::sync::CancellationToken::new()));
    f.policies.send_replace(policies(&format!("{ALLOW_CLIENT}---\n{DENY_OTHER}")));
    let denial = tokio::time::timeout(Duration::from_secs(1), other.revoked()).await.expect("revoked within a second");
    assert_eq!(denial.to_string(), "denied by policy demo/deny-other rule 1");
    let closing = denial.closing_mark();
    assert_eq!(closing.closed_by_policy.unwrap().to_string(), "demo/deny-other");
    tokio::time::timeout(Duration::from_secs(1), plain.revoked())
        .await
        .expect("the plaintext peer is no longer allowed either");
    assert!(client.denial().is_none(), "the allowed principal stays");
    assert_eq!(f.authz.live_count(), 3, "revoked entries stay until their handler ends");
    drop((other, plain));
    assert_eq!(f.authz.live_count(), 1);
    let closes: u64 = f.authz.decisions().iter().filter(|d| d.verdict == "close").map(|d| d.count).sum();
    assert_eq!(closes, 2);
    task.abort();
}

#[tokio::test]
async fn a_label_change_in_the_registry_re_evaluates_live_connections() {
    let f = fixture(ALLOW_CLIENT);
    let other_admitted_while_unselected = {
        f.registry.send_replace(registry("app: elsewhere"));
        f.authz.admit(1, from("other")).unwrap().live
    };
    let task = tokio::spawn(f.authz.clone().run(tokio_util::sync::CancellationToken::new()));
    f.registry.send_replace(registry("app: server"));
    tokio::time::timeout(Duration::from_secs(1), other_admitted_while_unselected.revoked())
        .await
        .expect("revoked once the ALLOW policy selects the pod");
    task.abort();
}

#[test]
fn counts_decisions_per_action_policy_and_verdict() {
    let f = fixture(&format!("{ALLOW_CLIENT}---\n{AUDIT_ALL}"));
    let _a = f.authz.admit(1, from("client")).unwrap();
    let _b = f.authz.admit(2, from("client")).unwrap();
    let _ = f.authz.admit(3, from("other"));
    let got: Vec<(Option<&str>, Option<String>, &str, u64)> = f
        .authz
        .decisions()
        .into_iter()
        .map(|d| (d.action, d.policy.map(|p| p.to_string()), d.verdict, d.count))
        .collect();
    assert_eq!(
        got,
        [
            (Some("ALLOW"), Some("demo/allow-client".into()), "allow", 2),
            (Some("ALLOW"), Some("demo/allow-client".into()), "deny", 1),
            (Some("AUDIT"), Some("demo/watch".into()), "audit", 3),
        ]
    );
}

const BAD: &str = "apiVersion: heddle.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: demo}\nspec: {rules: [{from: [{source: {ipBlocks: [\"10.0.0.300/8\"]}}]}]}\n";

#[test]
fn the_source_rejects_a_bad_policy_alone_and_keeps_the_last_good_set_when_unreadable() {
    let dir = std::env::temp_dir().join(format!("heddle-authz-src-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("policies.yaml");
    std::fs::write(&file, format!("{ALLOW_CLIENT}---\n{BAD}")).unwrap();
    let (mut source, rx) = PolicySource::open(Some(&file), "heddle-system").unwrap();
    let status = source.status();
    assert_eq!(rx.borrow().len(), 1);
    let errors = status.lock().unwrap().errors.clone();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].starts_with("policy demo/bad: spec.rules[0].from[0].source.ipBlocks[0]: "), "{errors:?}");
    let hash = status.lock().unwrap().content_hash.clone().unwrap();
    assert!(hash.starts_with("fnv1a64:") && hash.len() == 24, "{hash}");

    // A YAML syntax error: nothing of it applies.
    std::fs::write(&file, format!("{DENY_OTHER}---\nspec: [\n")).unwrap();
    source.reload();
    assert_eq!(rx.borrow().len(), 1);
    assert!(rx.borrow().summaries()[0].policy.to_string() == "demo/allow-client");
    assert!(status.lock().unwrap().source_error.is_some());
    assert_ne!(status.lock().unwrap().content_hash.as_deref(), Some(hash.as_str()));

    // Unreadable: the last good set stays.
    std::fs::remove_file(&file).unwrap();
    source.reload();
    assert_eq!(rx.borrow().len(), 1);
    assert!(status.lock().unwrap().source_error.as_deref().unwrap().contains("cannot read"));

    // A valid change applies and clears the error.
    std::fs::write(&file, DENY_OTHER).unwrap();
    source.reload();
    assert_eq!(rx.borrow().summaries()[0].policy.to_string(), "demo/deny-other");
    let st = status.lock().unwrap().clone();
    assert!(st.source_error.is_none() && st.errors.is_empty(), "{st:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unreadable_source_at_start_is_an_error() {
    let missing = std::env::temp_dir().join("heddle-authz-no-such-policies.yaml");
    assert!(PolicySource::open(Some(&missing), "heddle-system").is_err());
    let (_, rx) = PolicySource::open(None, "heddle-system").unwrap();
    assert!(rx.borrow().is_empty());
}
