//! Assertions and fixtures for the tunnel tests: what a tunnelled
//! connection must look like in both agents' flow records, tunnel-side
//! error records, fd-leak checks, and client certificates that the mesh
//! must refuse (self-made, or stolen from the CA's state).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use heddle_tests::{poll_until, Agent, Check, ClientSpec, ClientSummary, Direction, Flow, FlowEvent, Pod};

use super::{expect_delivered, expect_exactly, Cluster, ECHO_PORT, TRUST_DOMAIN, WAIT};

/// Requires exactly `count` finished connections from `client` to `orig_dst`
/// (served by `server`) on both agents, each closed normally, tunnelled, and
/// carrying both identities (the destination side also the client's
/// certificate serial and the client pod's address). Returns (outbound,
/// inbound) records.
pub fn expect_tunnelled(
    c: &Cluster,
    client: &Pod,
    server: &Pod,
    server_agent: &Agent,
    orig_dst: SocketAddr,
    count: usize,
) -> Result<(Vec<Flow>, Vec<Flow>)> {
    let (src_id, dst_id) = (client.spiffe_id(), server.spiffe_id());
    ensure!(src_id.starts_with(&format!("spiffe://{TRUST_DOMAIN}/ns/")), "test set-up: {src_id}");
    let client_agent = if client.node_name() == c.node_a.name() { &c.agent_a } else { &c.agent_b };
    let out = expect_exactly(client_agent, Direction::Outbound, &client.qualified_name(), orig_dst, count)?;
    let inb = expect_exactly(server_agent, Direction::Inbound, &server.qualified_name(), orig_dst, count)?;
    for (side, flows) in [("outbound", &out), ("inbound", &inb)] {
        for f in flows {
            ensure!(
                f.is_mutual_tls()
                    && f.src_identity.as_deref() == Some(src_id.as_str())
                    && f.dst_identity.as_deref() == Some(dst_id.as_str()),
                "{side} flow is not mTLS from {src_id} to {dst_id}: {f}"
            );
            ensure!(f.event == FlowEvent::Close || f.error.is_some(), "{side} flow: {f}");
        }
    }
    for f in &inb {
        ensure!(
            f.peer_cert_serial.is_some() && f.src_ip() == Some(client.ip().into()),
            "inbound tunnel flow without the client's certificate serial or address: {f}"
        );
    }
    Ok((out, inb))
}

/// Waits for `count` error records of connections from `from` to `server`'s
/// tunnel port on `agent`, each tunnel-side, with an error starting with
/// `prefix`; returns them.
pub fn expect_tunnel_error(agent: &Agent, server: &Pod, from: &Pod, prefix: &str, count: usize) -> Result<Vec<Flow>> {
    let from_ip = Some(from.ip().into());
    let matching = |flows: &[Flow]| -> Vec<Flow> {
        flows
            .iter()
            .filter(|f| {
                f.event == FlowEvent::Error
                    && f.direction == Direction::Inbound
                    && f.workload == server.qualified_name()
                    && f.src_ip() == from_ip
                    && f.is_mutual_tls()
                    && f.error.as_deref().is_some_and(|e| e.starts_with(prefix))
            })
            .cloned()
            .collect()
    };
    let what = format!("{count} tunnel error records starting {prefix:?}");
    let flows = agent.wait_for_flows(&what, WAIT, |flows| matching(flows).len() >= count)?;
    let errors = matching(&flows);
    if let Some(last) = errors.last() {
        eprintln!("recorded by node-b: {last}");
    }
    Ok(errors)
}

/// One tunnelled connection, so lazily created state (the pooled tunnel,
/// certificates) is in the baseline; returns both agents' open fds.
pub fn warm_up(c: &Cluster) -> Result<[usize; 2]> {
    let to = c.server.addr(ECHO_PORT);
    expect_delivered(&c.client, &ClientSpec::to(to))?;
    expect_tunnelled(c, &c.client, &c.server, &c.agent_b, to, 1)?;
    Ok([c.agent_a.open_fds()?, c.agent_b.open_fds()?])
}

/// Waits until each agent is back to its baseline fds (a small margin for
/// pooled tunnels) with no connection in progress.
pub fn expect_no_leaks(agents: &[(&Agent, usize)]) -> Result<()> {
    for (agent, base) in agents {
        let what = format!("agent on {} to release every connection", agent.node().name());
        poll_until(&what, WAIT, Duration::from_millis(250), || {
            let fds = agent.open_fds()?;
            let active = agent.stats()?.active_connections;
            Ok(if fds <= base + 4 && active == 0 {
                Check::Ready(())
            } else {
                Check::Pending(format!("fds {fds} (baseline {base}), activeConnections {active}"))
            })
        })?;
    }
    Ok(())
}

/// Polls (for up to `within`) until a new mesh connection from `c.client`
/// to `c.server`'s echo port succeeds; returns how long that took.
pub fn wait_mesh_recovers(c: &Cluster, what: &str, within: Duration) -> Result<Duration> {
    let to = c.server.addr(ECHO_PORT);
    let start = Instant::now();
    poll_until(what, within, Duration::from_millis(250), || {
        let s = c.client.run_client(&ClientSpec::to(to))?;
        Ok(if s.all_ok() { Check::Ready(()) } else { Check::Pending(s.to_string()) })
    })?;
    Ok(start.elapsed())
}

/// Whether any error of `summary` mentions one of `words`.
pub fn mentions(summary: &ClientSummary, words: &[&str]) -> bool {
    summary.errors.iter().any(|e| {
        let e = e.to_lowercase();
        words.iter().any(|w| e.contains(w))
    })
}

/// A P-256 workload certificate for `identity` signed with the mesh CA's
/// own root key (read from its state dir, as a thief would), written to
/// `<dir>/stolen/{cert,key}.pem`.
pub fn issue_from_mesh_ca(dir: &Path, ca_state: &Path, identity: &str) -> Result<PathBuf> {
    let out = dir.join("stolen");
    std::fs::create_dir_all(&out)?;
    let ext = out.join("ext.cnf");
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth,serverAuth\nsubjectAltName=critical,URI:{identity}\n"
        ),
    )?;
    let csr = out.join("req.csr");
    let steps: [Vec<std::ffi::OsString>; 2] = [
        vec![
            "req".into(),
            "-new".into(),
            "-newkey".into(),
            "ec".into(),
            "-pkeyopt".into(),
            "ec_paramgen_curve:prime256v1".into(),
            "-nodes".into(),
            "-subj".into(),
            "/CN=stolen".into(),
            "-keyout".into(),
            out.join("key.pem").into(),
            "-out".into(),
            csr.clone().into(),
        ],
        vec![
            "x509".into(),
            "-req".into(),
            "-in".into(),
            csr.into(),
            "-CA".into(),
            ca_state.join("root.pem").into(),
            "-CAkey".into(),
            ca_state.join("root.key").into(),
            "-set_serial".into(),
            "4242".into(),
            "-days".into(),
            "1".into(),
            "-extfile".into(),
            ext.into(),
            "-out".into(),
            out.join("cert.pem").into(),
        ],
    ];
    for args in steps {
        let done = Command::new("openssl").args(&args).output()?;
        ensure!(done.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&done.stderr));
    }
    Ok(out)
}

/// A self-signed P-256 end-entity certificate with `identity` as its URI
/// SAN (a well-formed workload certificate in every way but its issuer),
/// written to `<dir>/forged/{cert,key}.pem`.
pub fn forge_certificate(dir: &Path, identity: &str) -> Result<PathBuf> {
    let out = dir.join("forged");
    std::fs::create_dir_all(&out)?;
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-nodes", "-days", "1", "-subj", "/CN=forged"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "keyUsage=critical,digitalSignature"])
        .args(["-addext", "extendedKeyUsage=clientAuth,serverAuth"])
        .arg("-addext")
        .arg(format!("subjectAltName=critical,URI:{identity}"))
        .arg("-keyout")
        .arg(out.join("key.pem"))
        .arg("-out")
        .arg(out.join("cert.pem"))
        .output()?;
    ensure!(status.status.success(), "openssl req failed: {}", String::from_utf8_lossy(&status.stderr));
    Ok(out)
}
