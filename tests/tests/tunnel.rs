//! End-to-end tests of the zero-trust tunnel: real agents with a real mesh
//! CA (`mesh-agent ca`), real pods, real clients (pod-app, curl, an HTTP/2
//! server), and a packet capture on the link between the nodes. Each test
//! builds its own two-node cluster with mTLS on (see `common`), needs root,
//! and is skipped visibly (or fails under `CI=true`) where it cannot run.
//! Tools beyond the basics (tcpdump, nghttpd, openssl) are installed from
//! Debian if absent; a test whose tool cannot be had fails and names the
//! package.
//!
//! What is asserted is what a user would observe: bytes delivered intact,
//! what crosses the wire, errors an application sees, and what each agent's
//! admin API reports (`/flows` security and identities, `/certs`).
//!
//! Run with `cargo test -p heddle-tests --test tunnel` after building the
//! agent (`cargo xtask build`), as root.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::mesh::{
    expect_no_leaks, expect_tunnel_error, expect_tunnelled, forge_certificate, issue_from_mesh_ca, mentions,
    wait_mesh_recovers, warm_up,
};
use common::scrape::total;
use common::{
    environment_ready, expect_delivered, expect_exactly, expect_none, run_e2e, wait_finished, Cluster, Mtls, Options,
    ECHO_PORT, WAIT,
};
use heddle_tests::agent::describe_flows;
use heddle_tests::env::{NGHTTPD, OPENSSL, TCPDUMP};
use heddle_tests::{require_tool, Agent, ClientSpec, Direction, Flow, FlowEvent, Pod, Security, Tool, TUNNEL_PORT};

const MIB: usize = 1 << 20;
/// What a capture must (not) find: the payload of the marked transfers.
const MARKER: &str = "HEDDLE-PLAINTEXT-MARKER/";
/// python3 -m http.server.
const HTTP1_PORT: u16 = 8081;
/// nghttpd --no-tls (h2c).
const HTTP2_PORT: u16 = 8082;
/// A port nothing listens on.
const CLOSED_PORT: u16 = 9999;
/// The body of the HTTP tests.
const BODY: &str = "hello through the tunnel\n";

/// `heddle_tunnel_refusals_total{reason}` on `agent`'s metrics port.
fn tunnel_refusals(agent: &Agent, reason: &str) -> Result<f64> {
    Ok(total(&agent.metrics()?, "heddle_tunnel_refusals_total", &[("reason", reason)]))
}

/// [`run_e2e`], after making sure `tools` are installed (failing, and
/// naming the Debian package, if one cannot be had).
fn run_tunnel(name: &str, options: Options, tools: &[Tool], body: impl FnOnce(&Cluster) -> Result<()>) {
    if !environment_ready() {
        return;
    }
    for tool in tools {
        if let Err(e) = require_tool(*tool) {
            panic!("{name}: cannot run: {e}");
        }
    }
    run_e2e(name, options, body);
}

#[test]
fn enrolled_pods_on_two_nodes_talk_through_the_mutual_tls_tunnel_and_to_others_in_plaintext() {
    run_tunnel("tunnel_cross_node", Options::mtls(), &[NGHTTPD], |c| {
        exercise_protocols(c, &c.server, &c.agent_b)?;
        // A destination outside the mesh gets plaintext passthrough.
        let plain = c.plain.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(plain).bytes(2048))?;
        let out = expect_exactly(&c.agent_a, Direction::Outbound, "demo/client", plain, 1)?;
        ensure!(
            out[0].event == FlowEvent::Close && out[0].security == Security::Plaintext && out[0].dst_identity.is_none(),
            "flow to a pod outside the mesh: {}",
            out[0]
        );
        expect_none(&c.agent_a, "an inbound flow", |f| f.direction == Direction::Inbound)?;
        expect_none(&c.agent_b, "an outbound flow", |f| f.direction == Direction::Outbound)?;
        let certs = c.agent_a.certs()?;
        ensure!(certs.mtls && certs.pooled_tunnels.unwrap_or(0) >= 1, "node-a /certs after tunnelled traffic: {certs}");
        Ok(())
    });
}

#[test]
fn enrolled_pods_on_the_same_node_talk_tcp_http1_and_http2_through_the_mutual_tls_tunnel() {
    let options = Options { peer: true, ..Options::mtls() };
    run_tunnel("tunnel_same_node", options, &[NGHTTPD], |c| {
        let peer = c.peer.as_ref().context("peer pod")?;
        exercise_protocols(c, peer, &c.agent_a)?;
        expect_none(&c.agent_b, "a flow of node-a's pods", |_| true)
    });
}

#[test]
fn a_hundred_megabyte_stream_crosses_the_tunnel_byte_exact_with_the_same_checksum_at_both_ends() {
    run_tunnel("tunnel_100mb", Options::mtls(), &[], |c| {
        const BYTES: usize = 100 * 1_000_000;
        let to = c.server.addr(ECHO_PORT);
        let start = Instant::now();
        let summary = expect_delivered(&c.client, &ClientSpec::to(to).bytes(BYTES).checksum())?;
        let took = start.elapsed();
        eprintln!("100 MB each way through the tunnel in {took:.1?} ({:.1} MB/s each way)", 100.0 / took.as_secs_f64());
        let sent = summary.checksums.first().context("no checksum in the summary")?;
        ensure!(sent.bytes == BYTES as u64, "client sent {} bytes", sent.bytes);
        let records = c.echo_records(&c.server);
        ensure!(
            records.iter().any(|r| r.bytes == sent.bytes && r.fnv1a64 == sent.fnv1a64),
            "the server application received something else than the client sent \
             (client: {} bytes, fnv1a64 {}; server saw {records:?})",
            sent.bytes,
            sent.fnv1a64
        );
        let (out, inb) = expect_tunnelled(c, &c.client, &c.server, &c.agent_b, to, 1)?;
        for f in out.iter().chain(&inb) {
            ensure!(f.bytes_sent == BYTES as u64 && f.bytes_received == BYTES as u64, "byte counts: {f}");
        }
        Ok(())
    });
}

#[test]
fn the_link_between_nodes_carries_mesh_traffic_only_as_tls_while_the_same_capture_sees_plaintext() {
    run_tunnel("tunnel_on_the_wire", Options::mtls(), &[TCPDUMP], |c| {
        const BYTES: usize = 256 * 1024;
        let to = c.server.addr(ECHO_PORT);
        let capture = c.tb.capture_link(&c.node_a, "tcp")?;
        expect_delivered(&c.client, &ClientSpec::to(to).bytes(BYTES).pattern(MARKER))?;
        let mesh = capture.stop()?;
        eprintln!("mesh transfer: {}", mesh.describe(TUNNEL_PORT, MARKER));
        ensure!(mesh.kernel_drops.unwrap_or(0) == 0, "the capture lost packets, so it proves nothing: {mesh:?}");
        let tls = mesh.tls_on_port(TUNNEL_PORT);
        ensure!(
            tls.all_tls() && tls.walked_streams >= 2,
            "port {TUNNEL_PORT} did not carry TLS (both directions from their SYN, every byte \
             in a record): {tls:?}"
        );
        ensure!(
            tls.application_data_records() > 0 && mesh.payload_bytes_on_port(TUNNEL_PORT) >= 2 * BYTES as u64,
            "the transfer's bytes did not cross port {TUNNEL_PORT} as application data: {tls:?}"
        );
        ensure!(mesh.packets_on_port(ECHO_PORT) == 0, "mesh traffic went to the application port directly");
        ensure!(
            !mesh.contains(MARKER.as_bytes()),
            "the plaintext marker crossed the wire (pcap {})",
            mesh.file.display()
        );
        expect_tunnelled(c, &c.client, &c.server, &c.agent_b, to, 1)?;

        // Control: the same capture method on a transfer between pods that
        // are not in the mesh must see the marker, or the check above is void.
        let plain = c.plain.addr(ECHO_PORT);
        let capture = c.tb.capture_link(&c.node_a, "tcp")?;
        expect_delivered(&c.other, &ClientSpec::to(plain).bytes(BYTES).pattern(MARKER))?;
        let control = capture.stop()?;
        eprintln!("plaintext control: {}", control.describe(ECHO_PORT, MARKER));
        ensure!(
            control.contains(MARKER.as_bytes()) && control.packets_on_port(ECHO_PORT) > 0,
            "the capture did not see a plaintext transfer's marker: {}",
            control.describe(ECHO_PORT, MARKER)
        );
        ensure!(!control.tls_on_port(ECHO_PORT).all_tls(), "the plaintext transfer parsed as TLS");
        Ok(())
    });
}

#[test]
fn a_connection_stays_up_across_certificate_rotations_and_a_later_one_presents_a_new_certificate() {
    let options = Options { mtls: Some(Mtls { ttl_seconds: Some(6), ..Mtls::default() }), ..Options::default() };
    run_tunnel("tunnel_rotation", options, &[], |c| {
        const CHUNK: usize = 1000;
        const CHUNKS: usize = 20;
        let to = c.server.addr(ECHO_PORT);
        let client_id = c.client.spiffe_id();
        let generation = |agent: &Agent| -> Result<u64> {
            let certs = agent.certs()?;
            certs
                .certificate(&client_id)
                .and_then(|cert| cert.generation)
                .with_context(|| format!("no certificate for {client_id}: {certs}"))
        };
        let first = generation(&c.agent_a)?;
        let baseline = [c.agent_a.open_fds()?, c.agent_b.open_fds()?];
        let mut long =
            c.client.spawn_client(&ClientSpec::to(to).bytes(CHUNK).trickle(CHUNKS, Duration::from_millis(500)))?;
        let mut seen = vec![first];
        while long.is_running()? {
            let now = generation(&c.agent_a)?;
            if !seen.contains(&now) {
                seen.push(now);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let summary = long.wait(Duration::from_secs(5))?;
        ensure!(summary.all_ok() && summary.ok == 1, "the long-lived connection broke: {summary}");
        eprintln!("client certificate generations seen during the connection: {seen:?}");
        let last = *seen.last().unwrap_or(&first);
        ensure!(
            seen.len() >= 3 && last >= first + 2,
            "the source certificate did not rotate at least twice during the connection \
             (generations seen: {seen:?})"
        );

        expect_delivered(&c.client, &ClientSpec::to(to).bytes(4321))?;
        let (out, inb) = expect_tunnelled(c, &c.client, &c.server, &c.agent_b, to, 2)?;
        let long_out = out
            .iter()
            .find(|f| f.bytes_sent == (CHUNK * CHUNKS) as u64)
            .context("no outbound flow of the long-lived connection")?;
        ensure!(
            long_out.duration_ms.unwrap_or(0.0) >= 9000.0,
            "the long-lived connection was not one connection over ~10 s: {long_out}"
        );
        let by_bytes = |bytes: u64| -> Result<&Flow> {
            inb.iter()
                .find(|f| f.bytes_sent == bytes)
                .with_context(|| format!("no inbound flow of {bytes} bytes: {inb:?}"))
        };
        let (old, new) = (by_bytes((CHUNK * CHUNKS) as u64)?, by_bytes(4321)?);
        eprintln!(
            "client certificate serial of the long-lived connection {:?}, of the later one {:?}",
            old.peer_cert_serial, new.peer_cert_serial
        );
        ensure!(
            old.peer_cert_serial.is_some()
                && new.peer_cert_serial.is_some()
                && old.peer_cert_serial != new.peer_cert_serial,
            "the connection made after the rotations did not present a new client \
             certificate:\n  {old}\n  {new}"
        );
        // Each rotation moved new streams to a new tunnel connection; the
        // old ones must have been closed.
        expect_no_leaks(&[(&c.agent_a, baseline[0]), (&c.agent_b, baseline[1])])
    });
}

#[test]
fn strict_pods_reset_plaintext_clients_from_outside_the_mesh_and_accept_mesh_clients() {
    let options = Options { strict: true, ..Options::mtls() };
    run_tunnel("tunnel_strict", options, &[], |c| {
        let strict = c.strict.as_ref().context("strict pods")?;
        // Mesh clients reach the STRICT pods, over mTLS.
        for pod in [&strict.locked, &strict.vault] {
            let to = pod.addr(ECHO_PORT);
            expect_delivered(&c.client, &ClientSpec::to(to).bytes(2048))?;
            expect_tunnelled(c, &c.client, pod, &c.agent_b, to, 1)?;
        }
        // Refused: STRICT by the pod's own mode, and by its namespace's.
        for pod in [&strict.locked, &strict.vault] {
            let to = pod.addr(ECHO_PORT);
            let start = Instant::now();
            let refused = c.other.run_client(&ClientSpec::to(to))?;
            ensure!(
                refused.failed == 1 && mentions(&refused, &["reset"]),
                "a plaintext client outside the mesh was not reset by STRICT {}: {refused}",
                pod.qualified_name()
            );
            ensure!(start.elapsed() < Duration::from_secs(3), "the reset took {:?}", start.elapsed());
            let flows = wait_finished(&c.agent_b, Direction::Inbound, &pod.qualified_name(), to, 2)?;
            let errors: Vec<&Flow> = flows.iter().filter(|f| !f.is_mutual_tls()).collect();
            ensure!(
                errors.len() == 1
                    && errors.iter().all(|f| f.event == FlowEvent::Error
                        && f.src_ip() == Some(c.other.ip().into())
                        && f.error.as_deref().is_some_and(|e| e.starts_with("refused: inbound mode STRICT"))),
                "the refusal was not recorded as documented: {errors:?}"
            );
        }
        // Let through: PERMISSIVE by default, and by the pod's own mode in a
        // STRICT namespace (the workload wins).
        for pod in [&c.server, &strict.vault_open] {
            let to = pod.addr(ECHO_PORT);
            expect_delivered(&c.other, &ClientSpec::to(to))?;
            let inb = expect_exactly(&c.agent_b, Direction::Inbound, &pod.qualified_name(), to, 1)?;
            ensure!(
                inb[0].event == FlowEvent::Close
                    && inb[0].security == Security::Plaintext
                    && inb[0].src_identity.is_none(),
                "PERMISSIVE plaintext flow: {}",
                inb[0]
            );
        }
        Ok(())
    });
}

#[test]
fn garbage_sent_to_the_tunnel_port_is_closed_and_recorded_and_the_agent_keeps_serving() {
    run_tunnel("tunnel_garbage", Options::mtls(), &[], |c| {
        let baseline = warm_up(c)?;
        let tunnel = c.server.addr(TUNNEL_PORT);
        let start = Instant::now();
        // pod-app's payload is pseudo-random bytes: not a TLS record.
        let garbage = c.other.run_client(&ClientSpec::to(tunnel).bytes(4096))?;
        ensure!(garbage.failed == 1, "garbage on the tunnel port was echoed: {garbage}");
        ensure!(start.elapsed() < Duration::from_secs(5), "closing took {:?}", start.elapsed());
        expect_tunnel_error(&c.agent_b, &c.server, &c.other, "tunnel TLS handshake failed", 1)?;
        let refusals = tunnel_refusals(&c.agent_b, "tls_handshake")?;
        ensure!(
            (refusals - 1.0).abs() < 0.5,
            "heddle_tunnel_refusals_total{{reason=\"tls_handshake\"}} is {refusals}, want 1"
        );
        ensure!(c.agent_b.is_running(), "node-b's agent died");
        let to = c.server.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(to).conns(3))?;
        expect_tunnelled(c, &c.client, &c.server, &c.agent_b, to, 4)?;
        expect_no_leaks(&[(&c.agent_a, baseline[0]), (&c.agent_b, baseline[1])])
    });
}

#[test]
fn tls_clients_without_a_mesh_certificate_of_their_own_are_refused_at_the_tunnel_port() {
    run_tunnel("tunnel_no_cert", Options::mtls(), &[OPENSSL], |c| {
        let baseline = warm_up(c)?;
        let url = format!("https://{}/", c.server.addr(TUNNEL_PORT));
        // No client certificate at all.
        let mut curl = Command::new("curl");
        curl.args(["-sS", "-k", "--max-time", "5", &url]);
        let start = Instant::now();
        let out = c.other.run(curl)?;
        ensure!(
            !out.status.success() && start.elapsed() < Duration::from_secs(5),
            "a TLS client without a certificate was served ({}, {:?}): {}",
            out.status,
            start.elapsed(),
            String::from_utf8_lossy(&out.stdout)
        );
        expect_tunnel_error(&c.agent_b, &c.server, &c.other, "tunnel TLS handshake failed", 1)?;

        // A self-made certificate claiming a mesh identity: not signed by
        // the mesh CA, so refused all the same.
        let forged = forge_certificate(c.tb.temp_dir(), &c.client.spiffe_id())?;
        let mut curl = Command::new("curl");
        curl.args(["-sS", "-k", "--max-time", "5", "--cert"])
            .arg(forged.join("cert.pem"))
            .arg("--key")
            .arg(forged.join("key.pem"))
            .arg(&url);
        let out = c.other.run(curl)?;
        ensure!(
            !out.status.success(),
            "a forged client certificate was accepted: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let errors = expect_tunnel_error(&c.agent_b, &c.server, &c.other, "tunnel TLS handshake failed", 2)?;
        let forged_error = errors.last().and_then(|f| f.error.clone()).unwrap_or_default();
        ensure!(
            forged_error.to_lowercase().contains("issuer"),
            "the forged certificate was refused, but not for its issuer: {forged_error}"
        );

        // A certificate really issued by the mesh CA for `client`, presented
        // from `other` (stolen credentials): the chain is valid, so TLS
        // succeeds, but the identity does not own the source address.
        let ca = c.ca.as_ref().context("CA")?;
        let stolen = issue_from_mesh_ca(c.tb.temp_dir(), ca.state_dir(), &c.client.spiffe_id())?;
        let mut curl = Command::new("curl");
        curl.args(["-sS", "-k", "--max-time", "5", "--cert"])
            .arg(stolen.join("cert.pem"))
            .arg("--key")
            .arg(stolen.join("key.pem"))
            .arg(&url);
        let out = c.other.run(curl)?;
        ensure!(
            !out.status.success(),
            "a mesh certificate presented from the wrong pod was accepted: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        expect_tunnel_error(&c.agent_b, &c.server, &c.other, "tunnel client rejected", 1)?;
        expect_none(&c.agent_b, "a flow crediting the forged identity", |f| {
            f.src_identity.as_deref() == Some(c.client.spiffe_id().as_str()) && f.src_ip() == Some(c.other.ip().into())
        })?;
        ensure!(c.agent_b.is_running(), "node-b's agent died");
        expect_no_leaks(&[(&c.agent_a, baseline[0]), (&c.agent_b, baseline[1])])
    });
}

#[test]
fn a_destination_port_without_a_listener_resets_the_source_application_quickly() {
    run_tunnel("tunnel_refused", Options::mtls(), &[], |c| {
        let baseline = warm_up(c)?;
        let to = c.server.addr(CLOSED_PORT);
        let start = Instant::now();
        let refused = c.client.run_client(&ClientSpec::to(to))?;
        let took = start.elapsed();
        ensure!(
            refused.failed == 1 && mentions(&refused, &["reset", "refused"]),
            "expected a reset for a closed port behind the tunnel: {refused}"
        );
        ensure!(took < Duration::from_secs(3), "failing took {took:?}");
        eprintln!("closed port behind the tunnel: the application saw {refused} after {took:.1?}");
        let out = wait_finished(&c.agent_a, Direction::Outbound, "demo/client", to, 1)?;
        ensure!(out[0].event == FlowEvent::Error && out[0].is_mutual_tls(), "source agent's record: {}", out[0]);
        let inb = wait_finished(&c.agent_b, Direction::Inbound, "demo/server", to, 1)?;
        ensure!(
            inb[0].event == FlowEvent::Error && inb[0].src_identity.as_deref() == Some(c.client.spiffe_id().as_str()),
            "destination agent's record: {}",
            inb[0]
        );
        let echo = c.server.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(echo))?;
        expect_no_leaks(&[(&c.agent_a, baseline[0]), (&c.agent_b, baseline[1])])
    });
}

#[test]
fn agents_started_while_the_ca_is_down_fail_mesh_connections_fast_and_recover_once_it_is_up() {
    let options = Options { mtls: Some(Mtls { ca_down_at_start: true, ..Mtls::default() }), ..Options::default() };
    run_tunnel("tunnel_ca_down", options, &[], |c| {
        let ca = c.ca.as_ref().context("CA")?;
        let to = c.server.addr(ECHO_PORT);
        let certs = c.agent_a.certs()?;
        ensure!(certs.mtls, "agent started without mTLS: {certs}");

        let start = Instant::now();
        let down = c.client.run_client(&ClientSpec::to(to))?;
        let took = start.elapsed();
        ensure!(down.failed == 1, "a mesh connection succeeded without certificates: {down}");
        ensure!(took < Duration::from_secs(7), "failing closed took {took:?} (expected at most ~5 s)");
        eprintln!("with the CA down the application saw {down} after {took:.1?}");
        let failed = wait_finished(&c.agent_a, Direction::Outbound, "demo/client", to, 1)?;
        ensure!(failed[0].event == FlowEvent::Error && failed[0].is_mutual_tls(), "{}", failed[0]);

        ca.start()?;
        let recovered =
            wait_mesh_recovers(c, "the same mesh connection to succeed once the CA is up", Duration::from_secs(20))?;
        eprintln!("mesh connection succeeded {recovered:.1?} after the CA came up");
        ensure!(recovered <= Duration::from_secs(15), "recovery took {recovered:?} after the CA came up");
        let flows = c.agent_b.flows()?;
        ensure!(
            flows.iter().any(|f| f.event == FlowEvent::Close
                && f.is_mutual_tls()
                && f.src_identity.as_deref() == Some(c.client.spiffe_id().as_str())),
            "no tunnelled flow on node-b after recovery: {}",
            describe_flows(&flows, 10)
        );
        Ok(())
    });
}

/// TCP (small and 1 MiB), HTTP/1.1 with curl and HTTP/2 with curl, from
/// `client` to `to` (served by `to_agent`), each through the tunnel.
fn exercise_protocols(c: &Cluster, to: &Pod, to_agent: &Agent) -> Result<()> {
    let echo = to.addr(ECHO_PORT);
    expect_delivered(&c.client, &ClientSpec::to(echo).bytes(100))?;
    expect_delivered(&c.client, &ClientSpec::to(echo).bytes(MIB))?;
    let (out, inb) = expect_tunnelled(c, &c.client, to, to_agent, echo, 2)?;
    for size in [100, MIB as u64] {
        ensure!(
            out.iter().chain(&inb).filter(|f| f.bytes_sent == size && f.bytes_received == size).count() == 2,
            "no flow pair counted {size} bytes each way: {out:?} {inb:?}"
        );
    }

    let docroot = c.tb.temp_dir().join(format!("www-{}", to.name()));
    std::fs::create_dir_all(&docroot)?;
    std::fs::write(docroot.join("hello.txt"), BODY)?;
    let mut http1 = Command::new("python3");
    http1.args(["-m", "http.server", &HTTP1_PORT.to_string(), "--bind", "0.0.0.0", "--directory"]).arg(&docroot);
    let _http1 = to.spawn(http1)?;
    let mut http2 = Command::new("nghttpd");
    http2.args(["--no-tls", "--address=0.0.0.0", "--htdocs"]).arg(&docroot).arg(HTTP2_PORT.to_string());
    let _http2 = to.spawn(http2)?;
    to.wait_listening(HTTP1_PORT, WAIT)?;
    to.wait_listening(HTTP2_PORT, WAIT)?;

    // python's http.server answers an HTTP/1.1 request with HTTP/1.0.
    for (port, flags, versions) in [
        (HTTP1_PORT, &["--http1.1"][..], &["1", "1.1"][..]),
        (HTTP2_PORT, &["--http2-prior-knowledge"][..], &["2"][..]),
    ] {
        let addr = to.addr(port);
        let (code, got_version, body) = http_get(&c.client, addr, flags)?;
        ensure!(
            code == "200" && versions.contains(&got_version.as_str()) && body == BODY,
            "GET http://{addr}/hello.txt: status {code}, HTTP/{got_version}, body {body:?}"
        );
        let (out, _) = expect_tunnelled(c, &c.client, to, to_agent, addr, 1)?;
        ensure!(out[0].bytes_received >= BODY.len() as u64, "response bytes not counted: {}", out[0]);
    }
    Ok(())
}

/// GETs `/hello.txt` from `to` with curl in `from`; returns the status, the
/// HTTP version curl used, and the body.
fn http_get(from: &Pod, to: SocketAddr, flags: &[&str]) -> Result<(String, String, String)> {
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "10", "-o", "-"])
        .args(flags)
        .args(["-w", "\n%{http_code} %{http_version}"])
        .arg(format!("http://{to}/hello.txt"));
    let out = from.run(curl)?;
    ensure!(
        out.status.success(),
        "curl {flags:?} http://{to}/ failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8(out.stdout)?;
    let (body, meta) = text.rsplit_once('\n').context("curl printed no status")?;
    let (code, version) = meta.split_once(' ').context("curl printed no version")?;
    Ok((code.to_owned(), version.to_owned(), body.to_owned()))
}
