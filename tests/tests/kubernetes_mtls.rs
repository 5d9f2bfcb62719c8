//! The whole in-cluster story over real mTLS: agents in Kubernetes mode
//! (`mesh-agent run --kubernetes`) that get their workload certificates
//! from the mesh CA in Kubernetes mode (`mesh-agent ca --kubernetes`), both
//! against the API-server stand-in ([`heddle_tests::apiserver::ApiServer`]),
//! with real eBPF and real pods of the netns test bed.
//!
//! ```text
//! node-a: client (sa client)           [stand-in API server :6443]
//!                                      [mesh CA --kubernetes :15012]
//! node-b: server (sa server, echo :8080)
//! namespace demo labelled heddle.dev/mesh=enabled; trust domain cluster.local
//! ```
//!
//! The test plays the cluster's control plane and kubelet: it runs the CA as
//! the `heddle-ca` Deployment would (`KUBECONFIG` to the stand-in,
//! `POD_NAMESPACE=heddle-system`), copies the trust bundle the CA publishes
//! (`ConfigMap` `heddle-trust-bundle`, key `root-cert.pem`) into a file as
//! the `ConfigMap` volume would, and issues each agent a projected token
//! (audience `heddle-ca`, service account `heddle-system/heddle-agent`,
//! bound to a pod on its node) that the CA checks with `TokenReview`. It
//! asserts what a user sees: the certificates each agent holds (`/certs`),
//! the identities and security of the flows on both nodes (`/flows`), a DENY
//! policy naming the client's principal taking effect, and, when an agent's
//! token binds it to another node, the CA's refusal (in `/certs`, in the
//! flows of the connection that then fails closed, and in the CA's log).
//!
//! Run with `cargo test -p heddle-tests --test kubernetes_mtls` after
//! building the agent, as root; skipped visibly (failing under `CI=true`)
//! elsewhere.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::kube::{namespace, pod_object, start_api};
use common::{expect_delivered, run_on, ECHO_PORT, WAIT};
use heddle_tests::agent::describe_flows;
use heddle_tests::apiserver::ApiServer;
use heddle_tests::kube_ca::{project_agent_token, KubeCa, KubeCaOptions, CA_NAMESPACE};
use heddle_tests::{
    poll_until, Agent, Check, ClientSpec, Direction, Flow, KubernetesMode, Pod, PodSpec, Process, Security, Testbed,
    Verdict,
};
use serde_json::json;

/// The trust domain (the CA's and the agents').
const TRUST_DOMAIN: &str = "cluster.local";
/// How often to look.
const POLL: Duration = Duration::from_millis(50);

/// The test bed, the stand-in, the CA and the two agents.
/// Fields drop in order: processes, the CA, the stand-in, the test bed.
struct MeshCluster {
    _echo: Process,
    agent_a: Agent,
    agent_b: Agent,
    client: Pod,
    server: Pod,
    ca: KubeCa,
    api: ApiServer,
    tb: Testbed,
}

impl MeshCluster {
    /// Builds the cluster. Node-b's agent token is bound to node-b; node-a's
    /// to `node_a_token_node` (`node-a`, or another node to see the CA
    /// refuse).
    fn new(name: &str, node_a_token_node: &str) -> Result<Self> {
        let tb = Testbed::new(name)?;
        let node_a = tb.add_node("node-a")?;
        let node_b = tb.add_node("node-b")?;
        let client = tb.add_pod(&node_a, PodSpec::new("client"))?;
        let server = tb.add_pod(&node_b, PodSpec::new("server"))?;
        let echo = server.start_echo(ECHO_PORT)?;
        let api = start_api(&node_a, false)?;
        api.apply(namespace(CA_NAMESPACE, &json!({})))?;
        api.apply(namespace("demo", &json!({"heddle.dev/mesh": "enabled"})))?;
        for pod in [&client, &server] {
            api.apply(pod_object(pod, &json!({"app": pod.name()})))?;
        }

        let dir = tb.temp_dir().to_owned();
        let ca_kubeconfig = dir.join("ca-kubeconfig");
        api.write_kubeconfig(&ca_kubeconfig, "heddle-ca-token")?;
        let ca = KubeCa::start(
            &node_a,
            &KubeCaOptions { kubeconfig: ca_kubeconfig, trust_domain: TRUST_DOMAIN.into(), ttl_seconds: None },
        )?;
        let bundle = dir.join("root-cert.pem");
        ca.write_trust_bundle(&api, &bundle)?;
        for (node, bound_to) in [(&node_a, node_a_token_node), (&node_b, "node-b")] {
            let token_file = dir.join(format!("{}.token", node.name()));
            let token = format!("projected-heddle-agent-{}", node.name());
            project_agent_token(&api, &token, bound_to, &token_file)?;
            tb.set_agent_ca_flags(node, ca.agent_flags(&token_file, &bundle));
        }

        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, "node-agent-token")?;
        tb.use_kubernetes(KubernetesMode { kubeconfig, trust_domain: TRUST_DOMAIN.into() });
        let mut agents = tb.start_agents(&[&node_a, &node_b])?.into_iter();
        let (agent_a, agent_b) = (agents.next().context("a")?, agents.next().context("b")?);
        ensure!(agent_a.mtls() && agent_b.mtls(), "the agents were started without CA flags");
        Ok(Self { _echo: echo, agent_a, agent_b, client, server, ca, api, tb })
    }

    /// A client → server connection that must be reset, recorded on node-b
    /// as denied by `policy`; returns that record.
    fn expect_denied_by(&self, policy: &str) -> Result<Flow> {
        let summary = self.client.run_client(&ClientSpec::to(self.server.addr(ECHO_PORT)))?;
        ensure!(summary.failed == 1, "not denied by {policy}: {summary}");
        let flows = self.agent_b.wait_for_flows(&format!("a record denied by {policy}"), WAIT, |flows| {
            flows.iter().any(|f| f.verdict == Some(Verdict::Denied) && f.policy.as_deref() == Some(policy))
        })?;
        flows
            .into_iter()
            .rev()
            .find(|f| f.verdict == Some(Verdict::Denied) && f.policy.as_deref() == Some(policy))
            .context("the denied record vanished")
    }
}

/// Waits until `agent` holds a certificate for `pod`'s identity, then
/// checks it holds certificates for that identity only.
fn expect_certificates_for_only(agent: &Agent, pod: &Pod) -> Result<()> {
    let id = pod.spiffe_id();
    agent.wait_certificates(std::slice::from_ref(&id), WAIT)?;
    let certs = agent.certs()?;
    ensure!(certs.mtls, "{} reports mTLS off: {certs}", agent.node().name());
    let held: Vec<&str> = certs.certificates.iter().map(|c| c.identity.as_str()).collect();
    ensure!(held == [id.as_str()], "{} should hold a certificate for {id} only: {certs}", agent.node().name());
    Ok(())
}

/// Whether `f` is a finished tunnelled client → server record carrying
/// both SPIFFE identities.
fn is_mtls_record(f: &Flow, c: &MeshCluster, direction: Direction) -> bool {
    f.direction == direction
        && f.is_terminal()
        && f.verdict == Some(Verdict::Forwarded)
        && f.orig_dst == Some(c.server.addr(ECHO_PORT))
        && f.security == Security::MutualTls
        && f.src_identity.as_deref() == Some(c.client.spiffe_id().as_str())
        && f.dst_identity.as_deref() == Some(c.server.spiffe_id().as_str())
}

fn run(name: &str, node_a_token_node: &str, body: impl FnOnce(&MeshCluster) -> Result<()>) {
    run_on(
        name,
        || MeshCluster::new(name, node_a_token_node),
        |c| {
            c.tb.mark_failed();
            eprintln!(
                "----- {name}: last 30 lines of {} -----\n{}\n-----",
                c.ca.log_path().display(),
                c.ca.log_tail(30)
            );
        },
        body,
    );
}

#[test]
fn agents_get_certificates_from_the_kubernetes_ca_and_tunnel_over_mtls() {
    run("k8s-mtls", "node-a", |c| {
        let (client_id, server_id) = (c.client.spiffe_id(), c.server.spiffe_id());
        ensure!(client_id == "spiffe://cluster.local/ns/demo/sa/client", "{client_id}");
        ensure!(server_id == "spiffe://cluster.local/ns/demo/sa/server", "{server_id}");
        // Each node gets the identities of its own pods, and nothing else.
        expect_certificates_for_only(&c.agent_a, &c.client)?;
        expect_certificates_for_only(&c.agent_b, &c.server)?;
        let log = c.ca.log();
        for (node, id) in [("node-a", &client_id), ("node-b", &server_id)] {
            ensure!(
                log.lines().any(|l| l.contains("certificate issued")
                    && l.contains(&format!("node={node}"))
                    && l.contains(id.as_str())),
                "the CA log does not show {id} issued to {node}:\n{log}"
            );
        }

        // Across nodes, through the tunnel, with both identities on both sides.
        expect_delivered(&c.client, &ClientSpec::to(c.server.addr(ECHO_PORT)))?;
        c.agent_a.wait_for_flows("the outbound mTLS record", WAIT, |flows| {
            flows.iter().any(|f| is_mtls_record(f, c, Direction::Outbound))
        })?;
        let flows = c.agent_b.wait_for_flows("the inbound mTLS record", WAIT, |flows| {
            flows.iter().any(|f| is_mtls_record(f, c, Direction::Inbound))
        })?;
        let inbound =
            flows.iter().find(|f| is_mtls_record(f, c, Direction::Inbound)).context("the inbound record vanished")?;
        ensure!(
            inbound.peer_cert_serial.is_some() && inbound.src_ip() == Some(IpAddr::V4(c.client.ip())),
            "node-b's record lacks the client's certificate serial or address: {inbound}"
        );

        // A DENY policy on the client's principal, applied through the API.
        c.api.apply(json!({
            "apiVersion": "heddle.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-client", "namespace": "demo"},
            "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "server"}},
                     "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}]}
        }))?;
        poll_until("node-b loads demo/deny-client", WAIT, POLL, || {
            let p = c.agent_b.policies()?;
            Ok(if p.loaded.len() == 1 && p.errors.is_empty() {
                Check::Ready(())
            } else {
                Check::Pending(format!("{} loaded, errors {:?}", p.loaded.len(), p.errors))
            })
        })?;
        let denied = c.expect_denied_by("demo/deny-client")?;
        ensure!(
            denied.src_identity.as_deref() == Some(client_id.as_str()) && denied.security == Security::MutualTls,
            "the denial was not decided on the authenticated client identity: {denied}"
        );
        Ok(())
    });
}

#[test]
fn the_kubernetes_ca_refuses_identities_of_pods_on_another_node() {
    // Node-a's agent presents a token bound to node-b (e.g. node-b's agent
    // token, stolen): to the CA it is node-b asking for the identity of a
    // pod that runs on node-a.
    run("k8s-mtls-refused", "node-b", |c| {
        let client_id = c.client.spiffe_id();
        // Node-b's own token works: the refusal is about the node, not the CA.
        expect_certificates_for_only(&c.agent_b, &c.server)?;

        let entry = poll_until("node-a reports the CA's refusal", WAIT, POLL, || {
            let certs = c.agent_a.certs()?;
            Ok(match certs.certificate(&client_id) {
                Some(e) if e.last_error.is_some() => Check::Ready(e.clone()),
                _ => Check::Pending(certs.to_string()),
            })
        })?;
        let error = entry.last_error.clone().unwrap_or_default();
        ensure!(!entry.ready, "node-a holds a certificate for {client_id}: {entry:?}");
        ensure!(
            error.contains("403") && error.contains("node-b") && error.contains(client_id.as_str()),
            "node-a's /certs should name the refusal (403), the node and the identity: {error}"
        );
        ensure!(
            c.ca.log().lines().any(|l| l.contains("certificate request refused")
                && l.contains("status=403")
                && l.contains(client_id.as_str())),
            "the CA did not log the refusal:\n{}",
            c.ca.log_tail(20)
        );

        // Without a certificate the client's connection fails closed.
        let summary = c.client.run_client(&ClientSpec::to(c.server.addr(ECHO_PORT)))?;
        ensure!(summary.failed == 1 && summary.ok == 0, "not failed closed: {summary}");
        let flows = c.agent_a.wait_for_flows("node-a records the failure", WAIT, |flows| {
            flows.iter().any(|f| {
                f.direction == Direction::Outbound
                    && f.verdict == Some(Verdict::Error)
                    && f.error.as_deref().is_some_and(|e| e.contains(client_id.as_str()))
            })
        })?;
        let inbound = c.agent_b.flows()?;
        ensure!(
            !inbound.iter().any(|f| f.direction == Direction::Inbound && f.verdict == Some(Verdict::Forwarded)),
            "node-b forwarded a connection from a client without a certificate: {}\nnode-a: {}",
            describe_flows(&inbound, 5),
            describe_flows(&flows, 5)
        );
        Ok(())
    });
}
