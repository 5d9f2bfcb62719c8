//! End-to-end tests of L4 authorization policy enforcement: real agents
//! with mTLS (mesh CA), real pods, `AuthorizationPolicy` objects written to
//! the agents' policies file ([`heddle_tests::Testbed::set_policies`], which
//! SIGHUPs the agents and waits until each has read it).
//!
//! The cluster is the standard one with `peer` (see `common`): on node-a
//! `client` (enrolled, service account `client`), `peer` (enrolled, service
//! account `peer`: a mesh client with another identity) and `other` (not
//! enrolled: a plaintext client); on node-b `server` (enrolled, echo :8080,
//! label `app: server`). Policies are enforced by node-b's agent.
//!
//! What is asserted is what a user observes: whether the client application
//! gets its bytes back or a reset, whether the server application saw the
//! connection, what the destination agent's `/flows` say (`verdict`,
//! `policy`, `policy_rule`, `audit_policy`, `dry_run`, `closed_by_policy`),
//! what the source agent's record says, and `/policies`.
//!
//! Run with `cargo test -p heddle-tests --test policy` after building the
//! agent, as root; skipped visibly (or failing under `CI=true`) elsewhere.

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::mesh::{expect_no_leaks, mentions, warm_up};
use common::{expect_delivered, run_e2e, wait_finished, Cluster, Options, ECHO_PORT, TRUST_DOMAIN};
use heddle_tests::agent::describe_flows;
use heddle_tests::{poll_until, Check, ClientSpec, Direction, Flow, FlowEvent, Pod, Policies, Security, Verdict};

/// The standard cluster with `peer`, mTLS on.
fn options() -> Options {
    Options { peer: true, ..Options::mtls() }
}

/// `<trust domain>/ns/demo/sa/<sa>`: what `principals` match.
fn principal(sa: &str) -> String {
    format!("{TRUST_DOMAIN}/ns/demo/sa/{sa}")
}

/// One `AuthorizationPolicy` document in namespace `demo`.
fn policy(name: &str, extra_metadata: &str, spec: &str) -> String {
    format!(
        "apiVersion: heddle.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata:\n  name: {name}\n  namespace: demo\n{extra_metadata}spec:\n{spec}---\n"
    )
}

/// Runs one connection from `from` to the server's echo port and requires
/// that it fails (the application sees a reset); returns node-b's record.
fn expect_denied(c: &Cluster, from: &Pod, security: Security) -> Result<Flow> {
    let to = c.server.addr(ECHO_PORT);
    let before = last_id(c)?;
    let start = Instant::now();
    let summary = from.run_client(&ClientSpec::to(to))?;
    ensure!(
        summary.failed == 1 && mentions(&summary, &["reset"]),
        "{} was not reset by policy: {summary}",
        from.qualified_name()
    );
    ensure!(start.elapsed() < Duration::from_secs(3), "the denial took {:?}", start.elapsed());
    let flows = c
        .agent_b
        .wait_for_flows("a denied inbound record", common::WAIT, |flows| denied_from(flows, from, before).is_some())?;
    let f = denied_from(&flows, from, before).context("denied record")?;
    ensure!(f.event == FlowEvent::Error && f.security == security && f.orig_dst == Some(to), "denied record: {f}");
    Ok(f.clone())
}

fn denied_from(flows: &[Flow], from: &Pod, after: u64) -> Option<Flow> {
    flows
        .iter()
        .find(|f| {
            f.id > after
                && f.direction == Direction::Inbound
                && f.verdict == Some(Verdict::Denied)
                && f.src_ip() == Some(from.ip().into())
        })
        .cloned()
}

/// The id of node-b's newest flow record.
fn last_id(c: &Cluster) -> Result<u64> {
    Ok(c.agent_b.flows_last(1)?.last().map_or(0, |f| f.id))
}

/// Runs one connection from `from` to the server and requires it to be
/// delivered; returns node-b's close record of it.
fn expect_allowed(c: &Cluster, from: &Pod) -> Result<Flow> {
    let to = c.server.addr(ECHO_PORT);
    let before = last_id(c)?;
    expect_delivered(from, &ClientSpec::to(to))?;
    let what = format!("the close record of {}", from.qualified_name());
    let flows = c.agent_b.wait_for_flows(&what, common::WAIT, |flows| closed_from(flows, from, before).is_some())?;
    closed_from(&flows, from, before).context("close record")
}

fn closed_from(flows: &[Flow], from: &Pod, after: u64) -> Option<Flow> {
    flows
        .iter()
        .find(|f| {
            f.id > after
                && f.event == FlowEvent::Close
                && f.direction == Direction::Inbound
                && f.src_ip() == Some(from.ip().into())
        })
        .cloned()
}

#[test]
fn an_allow_policy_on_a_principal_admits_that_client_and_resets_everyone_else_naming_the_policy() {
    run_e2e("policy_allow_principal", options(), |c| {
        let allow_client = policy(
            "allow-client",
            "",
            &format!(
                "  selector: {{matchLabels: {{app: server}}}}\n  rules:\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n",
                principal("client")
            ),
        );
        let shown = c.tb.set_policies(&allow_client)?;
        ensure!(
            shown[1].policy("demo/allow-client").is_some_and(|p| p.action == "ALLOW"),
            "node-b /policies: {}",
            shown[1]
        );

        let ok = expect_allowed(c, &c.client)?;
        ensure!(
            ok.verdict == Some(Verdict::Forwarded)
                && ok.policy.as_deref() == Some("demo/allow-client")
                && ok.policy_rule == Some(0)
                && ok.is_mutual_tls(),
            "allowed record: {ok}"
        );

        // Another mesh identity: refused at the tunnel (403), reset at the source.
        let denied = expect_denied(c, c.peer.as_ref().context("peer")?, Security::MutualTls)?;
        eprintln!("node-b recorded: {denied}");
        ensure!(
            denied.policy.as_deref() == Some("demo/allow-client")
                && denied.policy_rule.is_none()
                && denied.src_identity.as_deref() == Some(c.peer.as_ref().context("peer")?.spiffe_id().as_str())
                && denied.error.as_deref()
                    == Some("denied: no ALLOW policy matched (first applicable ALLOW policy: demo/allow-client)"),
            "denied record: {denied}"
        );
        let out = wait_finished(&c.agent_a, Direction::Outbound, "demo/peer", c.server.addr(ECHO_PORT), 1)?;
        ensure!(
            out[0].event == FlowEvent::Error
                && out[0].verdict == Some(Verdict::Denied)
                && out[0].error.as_deref().is_some_and(|e| e.contains("403") && e.contains("no ALLOW policy matched")),
            "the source agent's record does not carry the denial: {}",
            out[0]
        );
        ensure!(
            c.echo_records(&c.server).len() == 1,
            "the server application saw a denied connection: {:?}",
            c.echo_records(&c.server)
        );

        // A plaintext peer has no identity: the principal rule cannot match.
        let plain = expect_denied(c, &c.other, Security::Plaintext)?;
        ensure!(
            plain.policy.as_deref() == Some("demo/allow-client") && plain.src_identity.is_none(),
            "plaintext denied record: {plain}"
        );

        // An ipBlocks rule lets it in (rule 1); the other identity stays out.
        let with_ip = policy(
            "allow-client",
            "",
            &format!(
                "  selector: {{matchLabels: {{app: server}}}}\n  rules:\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n  - from: [{{source: {{ipBlocks: [\"{}/32\"]}}}}]\n",
                principal("client"),
                c.other.ip()
            ),
        );
        c.tb.set_policies(&with_ip)?;
        let by_ip = expect_allowed(c, &c.other)?;
        ensure!(
            by_ip.policy.as_deref() == Some("demo/allow-client")
                && by_ip.policy_rule == Some(1)
                && by_ip.security == Security::Plaintext,
            "plaintext peer allowed by ipBlocks: {by_ip}"
        );
        expect_denied(c, c.peer.as_ref().context("peer")?, Security::MutualTls)?;

        let p = c.agent_b.policies()?;
        ensure!(
            p.decisions_of("demo/allow-client", "allow") == 2 && p.decisions_of("demo/allow-client", "deny") == 3,
            "decision counters: {:?}",
            p.decisions
        );
        Ok(())
    });
}

#[test]
fn deny_wins_over_allow_audit_and_dry_run_only_mark_and_a_bad_policy_is_reported_while_the_rest_enforce() {
    run_e2e("policy_deny_audit", options(), |c| {
        let shown = c.tb.set_policies(&deny_audit_policies())?;
        expect_loaded_with_one_rejected(&shown[1])?;

        let audited = expect_allowed(c, &c.client)?;
        ensure!(
            audited.verdict == Some(Verdict::Audited)
                && audited.policy.as_deref() == Some("demo/allow-all")
                && audited.policy_rule == Some(0)
                && audited.audit_policy.as_deref() == Some("demo/audit-client")
                && audited.dry_run.as_deref() == Some("deny by policy demo/maybe-deny rule 0"),
            "audited record: {audited}"
        );
        let open = c.agent_b.flows()?.into_iter().find(|f| f.conn == audited.conn && f.event == FlowEvent::Open);
        ensure!(
            open.as_ref().is_some_and(|f| f.verdict == Some(Verdict::Audited)),
            "open record of the audited connection: {open:?}"
        );

        let denied = expect_denied(c, c.peer.as_ref().context("peer")?, Security::MutualTls)?;
        ensure!(
            denied.policy.as_deref() == Some("demo/deny-peer")
                && denied.policy_rule == Some(1)
                && denied.error.as_deref() == Some("denied by policy demo/deny-peer rule 1"),
            "DENY over ALLOW: {denied}"
        );
        let out = wait_finished(&c.agent_a, Direction::Outbound, "demo/peer", c.server.addr(ECHO_PORT), 1)?;
        ensure!(
            out[0].error.as_deref().is_some_and(|e| e.contains("denied by policy demo/deny-peer rule 1")),
            "source agent's record: {}",
            out[0]
        );
        // Plaintext peers are not in the DENY rule: the ALLOW-all admits
        // them, and the dry-run DENY on namespace `demo` cannot match a peer
        // without an identity.
        expect_allowed(c, &c.other)?;
        let p = c.agent_b.policies()?;
        ensure!(
            p.decisions_of("demo/audit-client", "audit") == 1
                && p.decisions_of("demo/deny-peer", "deny") == 1
                && p.decisions_of("demo/maybe-deny", "dry_run_deny") == 1
                && p.decisions_of("demo/allow-all", "dry_run_allow") == 1,
            "decision counters: {:?}",
            p.decisions
        );
        Ok(())
    });
}

/// ALLOW everything to `server`; an invalid policy; DENY `peer` (rule 1);
/// AUDIT `client`; a dry-run DENY of namespace `demo`.
fn deny_audit_policies() -> String {
    [
        policy(
            "allow-all",
            "",
            "  selector: {matchLabels: {app: server}}\n  rules: [{}]\n",
        ),
        policy(
            "broken",
            "",
            "  selector: {matchLabels: {app: server}}\n  rules:\n  - from: [{source: {ipBlocks: [\"10.0.0.300/8\"]}}]\n",
        ),
        policy(
            "deny-peer",
            "",
            &format!(
                "  action: DENY\n  rules:\n  - to: [{{operation: {{ports: [\"9999\"]}}}}]\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n",
                principal("peer")
            ),
        ),
        policy(
            "audit-client",
            "",
            &format!(
                "  action: AUDIT\n  rules:\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n",
                principal("client")
            ),
        ),
        policy(
            "maybe-deny",
            "  annotations: {heddle.dev/dry-run: \"true\"}\n",
            "  action: DENY\n  rules:\n  - from: [{source: {namespaces: [demo]}}]\n",
        ),
    ]
    .concat()
}

/// `/policies` after [`deny_audit_policies`]: four in force (in rank
/// order), the broken one reported with its name and field.
fn expect_loaded_with_one_rejected(p: &Policies) -> Result<()> {
    eprintln!("node-b /policies: {p}");
    let names: Vec<&str> = p.loaded.iter().map(|l| l.policy.as_str()).collect();
    ensure!(
        names == ["demo/allow-all", "demo/audit-client", "demo/deny-peer", "demo/maybe-deny"]
            && p.policy("demo/maybe-deny").is_some_and(|l| l.dry_run)
            && p.policy("demo/deny-peer").is_some_and(|l| l.action == "DENY" && l.rules == 2),
        "loaded: {p}"
    );
    ensure!(
        p.errors.len() == 1
            && p.errors[0]
                .starts_with("policy demo/broken: spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.300/8\""),
        "the bad policy is not reported with its name and field: {:?}",
        p.errors
    );
    Ok(())
}

#[test]
fn a_policy_applied_while_connections_are_open_closes_them_within_a_second_and_names_itself() {
    run_e2e("policy_live", options(), |c| {
        const CHUNK: usize = 100;
        let baseline = warm_up(c)?;
        let to = c.server.addr(ECHO_PORT);
        let long = ClientSpec::to(to).bytes(CHUNK).trickle(200, Duration::from_millis(100));
        let mut tunnelled = c.client.spawn_client(&long)?;
        let mut plaintext = c.other.spawn_client(&long)?;
        wait_live(c, 2)?;
        std::thread::sleep(Duration::from_millis(300));
        ensure!(
            tunnelled.is_running()? && plaintext.is_running()?,
            "a long-lived connection ended before the policy change"
        );

        let cut = policy(
            "cut",
            "",
            &format!(
                "  action: DENY\n  rules:\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n  - from: [{{source: {{ipBlocks: [\"{}\"]}}}}]\n",
                principal("client"),
                c.other.ip()
            ),
        );
        let start = Instant::now();
        c.tb.set_policies(&cut)?;
        let applied = start.elapsed();
        let ended = poll_until(
            "both long-lived connections to be closed",
            Duration::from_secs(5),
            Duration::from_millis(20),
            || {
                Ok(if tunnelled.is_running()? || plaintext.is_running()? {
                    Check::Pending("still running".into())
                } else {
                    Check::Ready(start.elapsed())
                })
            },
        )?;
        eprintln!("policy read by both agents after {applied:.0?}; both connections closed after {ended:.0?}");
        ensure!(
            ended <= applied + Duration::from_secs(1),
            "the connections were closed {:?} after the agents read the policy",
            ended.saturating_sub(applied)
        );
        for (who, client) in [("client", tunnelled), ("other", plaintext)] {
            let summary = client.wait(Duration::from_secs(1))?;
            ensure!(
                summary.failed == 1 && mentions(&summary, &["reset", "broken pipe"]),
                "{who}: the application did not see its connection reset: {summary}"
            );
        }
        let resets = c.echo_log(&c.server).lines().filter(|l| l.contains("reset")).count();
        ensure!(
            resets == 2,
            "the server application did not see both connections reset ({resets}):\n{}",
            c.echo_log(&c.server)
        );

        expect_closed_by_cut(c, CHUNK as u64)?;

        // New connections are denied too, and nothing is left behind.
        expect_denied(c, &c.client, Security::MutualTls)?;
        expect_no_leaks(&[(&c.agent_a, baseline[0]), (&c.agent_b, baseline[1])])?;
        let p = c.agent_b.policies()?;
        ensure!(
            p.live_connections == 0 && p.decisions_of("demo/cut", "close") == 2,
            "after the closes: liveConnections {}, decisions {:?}",
            p.live_connections,
            p.decisions
        );
        Ok(())
    });
}

/// Waits until node-b has `n` live inbound connections registered.
fn wait_live(c: &Cluster, n: u64) -> Result<()> {
    poll_until(&format!("{n} live connections on node-b"), common::WAIT, Duration::from_millis(50), || {
        let p = c.agent_b.policies()?;
        Ok(if p.live_connections >= n {
            Check::Ready(())
        } else {
            Check::Pending(format!("liveConnections {}", p.live_connections))
        })
    })?;
    Ok(())
}

/// Node-b's close records of the two long-lived connections: closed by
/// `demo/cut`, with its rule (0: the principal of `client`, tunnelled; 1:
/// the address of `other`, plaintext), and the bytes they carried (at least
/// one `chunk` each way).
fn expect_closed_by_cut(c: &Cluster, chunk: u64) -> Result<()> {
    let flows = c.agent_b.flows()?;
    for (from, rule, security) in [(&c.client, 0, Security::MutualTls), (&c.other, 1, Security::Plaintext)] {
        let closed = flows
            .iter()
            .find(|f| {
                f.event == FlowEvent::Close && f.closed_by_policy.is_some() && f.src_ip() == Some(from.ip().into())
            })
            .with_context(|| {
                format!("no close-by-policy record of {}: {}", from.qualified_name(), describe_flows(&flows, 20))
            })?;
        eprintln!("node-b recorded: {closed}");
        let error = format!("closed by policy change: denied by policy demo/cut rule {rule}");
        ensure!(
            closed.closed_by_policy.as_deref() == Some("demo/cut")
                && closed.verdict == Some(Verdict::Denied)
                && closed.policy.as_deref() == Some("demo/cut")
                && closed.policy_rule == Some(rule)
                && closed.security == security
                && closed.duration_ms.unwrap_or(0.0) >= 300.0
                && closed.error.as_deref() == Some(error.as_str()),
            "close record: {closed}"
        );
        ensure!(
            closed.bytes_sent >= chunk && closed.bytes_received >= chunk,
            "the close record lost its byte counts: {closed}"
        );
    }
    Ok(())
}
