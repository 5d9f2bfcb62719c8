//! `heddle policy eval` and `heddle policy validate`, run as a user runs
//! them: the built binary on the YAML fixtures in `tests/fixtures/policy/`.
//! What is asserted is what a user sees: the decision line or JSON object,
//! the messages, and the exit status (0 allow/valid, 1 deny, 2 invalid).

use std::{path::PathBuf, process::Command};

use serde_json::Value;

const FRONTEND: &str = "cluster.local/ns/shop/sa/frontend";

fn fixture(name: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", "policy", name].iter().collect();
    path.to_string_lossy().into_owned()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn heddle(args: &[&str]) -> Run {
    let out =
        Command::new(env!("CARGO_BIN_EXE_heddle")).args(args).env_remove("HEDDLE_ROOT_NAMESPACE").output().unwrap();
    Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// `heddle policy eval` against the `shop` fixtures for the backend on `port`.
fn eval_shop(port: &str, extra: &[&str]) -> Run {
    let shop = fixture("shop");
    let mut args =
        vec!["policy", "eval", "--policies", &shop, "--dst-namespace", "shop", "--dst-labels", "app=backend,tier=api"];
    args.extend(["--dst-port", port]);
    args.extend(extra);
    heddle(&args)
}

fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

#[test]
fn eval_allows_the_frontend_and_names_the_policy_and_rule() {
    let run = eval_shop("8080", &["--src-principal", FRONTEND]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), "ALLOW policy=shop/allow-frontend rule=0 reason=allowed_by_policy");
}

#[test]
fn eval_denies_a_plaintext_peer_by_the_deny_policy() {
    let run = eval_shop("8080", &[]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout.trim(), "DENY policy=shop/deny-plaintext rule=0 reason=denied_by_deny_policy");
}

#[test]
fn eval_denies_another_peer_because_no_allow_policy_matches() {
    let run = eval_shop("8080", &["--src-principal", "spiffe://cluster.local/ns/shop/sa/batch"]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout.trim(), "DENY policy=shop/allow-frontend reason=no_allow_policy_matched");
}

#[test]
fn eval_allows_a_workload_no_allow_policy_selects() {
    let shop = fixture("shop");
    let args =
        ["policy", "eval", "-f", &shop, "--dst-namespace", "shop", "--dst-labels", "app=web", "--dst-port", "80"];
    let run = heddle(&[&args[..], &["--src-principal", FRONTEND]].concat());
    assert_eq!(run.code, 0);
    assert_eq!(run.stdout.trim(), "ALLOW policy=- reason=allowed_no_allow_policies");
}

#[test]
fn eval_prints_json_with_verdict_policy_rule_audited_and_reason() {
    let run = eval_shop("9042", &["--src-principal", FRONTEND, "-o", "json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v = json(&run);
    assert_eq!(v["verdict"], "allow");
    assert_eq!(v["policy"], "shop/allow-frontend");
    assert_eq!(v["rule"], 0);
    assert_eq!(v["reason"], "allowed_by_policy");
    assert_eq!(v["audited"], true);
    assert_eq!(v["audit_policy"], "shop/audit-admin-ports");
}

#[test]
fn eval_json_of_a_denial_without_a_matching_rule_has_null_rule() {
    let run = eval_shop("8081", &["--src-principal", FRONTEND, "-o", "json"]);
    assert_eq!(run.code, 1);
    let v = json(&run);
    assert_eq!(v["verdict"], "deny");
    assert_eq!(v["policy"], "shop/allow-frontend");
    assert!(v["rule"].is_null());
    assert_eq!(v["audited"], false);
    assert_eq!(v["reason"], "no_allow_policy_matched");
}

#[test]
fn eval_records_what_a_dry_run_policy_would_decide() {
    let dry = fixture("dry-run");
    let run = eval_shop("8080", &["--src-principal", FRONTEND, "-f", &dry, "-o", "json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v = json(&run);
    assert_eq!(v["verdict"], "allow");
    assert_eq!(v["dry_run"]["verdict"], "deny");
    assert_eq!(v["dry_run"]["policy"], "shop/deny-frontend-canary");
}

#[test]
fn eval_applies_root_namespace_policies_to_every_namespace() {
    let mesh = fixture("mesh");
    let run = eval_shop("8080", &["--src-principal", FRONTEND, "--policies", &mesh, "--src-ip", "203.0.113.9"]);
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stdout.trim(),
        "DENY policy=heddle-system/deny-documentation-net rule=0 reason=denied_by_deny_policy"
    );
    let run = eval_shop("8080", &["--src-principal", FRONTEND, "--policies", &mesh, "--src-ip", "10.1.2.3"]);
    assert_eq!(run.code, 0);
}

#[test]
fn eval_asks_for_the_source_ip_when_a_policy_needs_it() {
    let mesh = fixture("mesh");
    let run = eval_shop("8080", &["--src-principal", FRONTEND, "--policies", &mesh]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("policy heddle-system/deny-documentation-net looks at the source IP: pass --src-ip"),
        "{}",
        run.stderr
    );
}

#[test]
fn eval_exits_2_with_the_validation_message_on_an_invalid_policy() {
    let invalid = fixture("invalid");
    let run = eval_shop("22", &["--src-principal", FRONTEND, "--policies", &invalid]);
    assert_eq!(run.code, 2);
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr.contains("policy shop/broken: spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\""),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("policy shop/typo: spec.rules[0].from[0].source.principal: unknown field `principal`"),
        "{}",
        run.stderr
    );
}

#[test]
fn eval_with_skip_invalid_decides_with_the_valid_policies_as_the_agent_does() {
    let invalid = fixture("invalid");
    let run = eval_shop("22", &["--src-principal", FRONTEND, "--policies", &invalid, "--skip-invalid"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), "DENY policy=shop/deny-ssh rule=0 reason=denied_by_deny_policy");
    assert!(run.stderr.contains("ignoring invalid policy"), "{}", run.stderr);
}

#[test]
fn eval_exits_2_on_bad_arguments() {
    for bad in [&["--src-principal", "frontend"][..], &["--src-ip", "10.0.0.300"], &["--dst-labels", "app"]] {
        let run = eval_shop("8080", bad);
        assert_eq!(run.code, 2, "{bad:?}: {}", run.stderr);
    }
    assert_eq!(eval_shop("0", &[]).code, 2);
    let missing =
        heddle(&["policy", "eval", "--policies", "/nonexistent.yaml", "--dst-namespace", "a", "--dst-port", "1"]);
    assert_eq!(missing.code, 2);
    assert!(missing.stderr.contains("cannot read /nonexistent.yaml"), "{}", missing.stderr);
}

#[test]
fn eval_warns_about_l7_attributes_of_the_policies_it_applies() {
    let l7 = fixture("l7");
    let args = ["policy", "eval", "-f", &l7, "--dst-namespace", "shop", "--dst-port", "8080"];
    let run = heddle(&args);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout.trim(), "DENY policy=shop/allow-get reason=no_allow_policy_matched");
    assert!(run.stderr.contains("warning:") && run.stderr.contains("this ALLOW rule never matches"), "{}", run.stderr);
}

#[test]
fn validate_accepts_valid_files_and_notes_skipped_documents() {
    let run = heddle(&["policy", "validate", &fixture("shop"), &fixture("mesh")]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(run.stdout.contains("skipped, kind \"Deployment\" is not AuthorizationPolicy"), "{}", run.stdout);
    assert!(
        run.stdout.trim_end().ends_with("valid: 4 AuthorizationPolicy objects, 0 problems, 0 warnings"),
        "{}",
        run.stdout
    );
}

#[test]
fn validate_reports_every_problem_in_every_file() {
    let one = fixture("invalid/one.yaml");
    let two = fixture("invalid/two.yaml");
    let run = heddle(&["policy", "validate", &one, &two]);
    assert_eq!(run.code, 2);
    let errors: Vec<&str> = run.stdout.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 3, "{}", run.stdout);
    assert!(
        errors[0].contains("one.yaml (document 1): policy shop/broken: spec.rules[0].from[0].source.ipBlocks[0]"),
        "{}",
        errors[0]
    );
    assert!(errors[1].contains(
        "one.yaml (document 1): policy shop/broken: spec.rules[0].to[0].operation.ports[0]: \"0\" is not a port"
    ));
    assert!(errors[2].contains("two.yaml (document 1): policy shop/typo: spec.rules[0].from[0].source.principal"));
    assert!(run.stdout.contains("invalid: 3 AuthorizationPolicy objects, 3 problems"), "{}", run.stdout);
}

#[test]
fn validate_prints_json_on_request() {
    let run = heddle(&["policy", "validate", &fixture("invalid"), &fixture("l7"), "-o", "json"]);
    assert_eq!(run.code, 2);
    let v = json(&run);
    assert_eq!(v["valid"], false);
    assert_eq!(v["objects"], 4);
    assert_eq!(v["errors"].as_array().unwrap().len(), 3);
    assert_eq!(v["warnings"].as_array().unwrap().len(), 1);
}

#[test]
fn agent_subcommands_are_still_there() {
    let help = heddle(&["--help"]);
    assert_eq!(help.code, 0);
    for sub in ["flows", "workloads", "status", "policy"] {
        assert!(help.stdout.contains(sub), "{}", help.stdout);
    }
    let run = heddle(&["workloads", "--agent", "http://127.0.0.1:1"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("cannot reach the Heddle agent"), "{}", run.stderr);
}
