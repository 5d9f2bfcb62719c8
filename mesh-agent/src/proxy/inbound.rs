//! Inbound leg: connections that arrived at an enrolled pod from outside it,
//! assigned by `sk_lookup` to the pod's `127.0.0.1:15006` listener. The
//! accepted socket's local address is the original destination; the agent
//! connects to it from inside the pod over loopback, which `sk_lookup` does
//! not steer.
//!
//! These peers are plaintext (no identity): after the STRICT check the
//! connection is authorized with `peer = None` and the client's IP
//! ([`crate::authz`]); a denial resets the client. An admitted connection
//! stays registered as live; if a policy change denies it, both the client
//! and the application are reset. TCP health comes from the accepted
//! client socket, the one that faces the network.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    accept_loop, authorize,
    sockets::reset,
    splice::splice_until,
    tcp_health::{FlowHealth, TcpProbe},
    Pod, ProxyContext,
};
use crate::{
    authz::ConnFacts,
    config::InboundMode,
    flows::{ConnInfo, Direction},
};

/// Accepts on the pod's inbound listener until `stop` fires.
pub async fn run(listener: TcpListener, pod: Arc<Pod>, ctx: Arc<ProxyContext>, stop: CancellationToken) {
    accept_loop(listener, stop, "inbound", &pod.id.clone(), move |stream, peer| {
        let (pod, ctx) = (pod.clone(), ctx.clone());
        ctx.tracker.clone().spawn(handle(stream, peer, pod, ctx))
    })
    .await;
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<Pod>, ctx: Arc<ProxyContext>) {
    let conn = ctx.flows.conn_id();
    let orig = client.local_addr().ok();
    let mut info = ConnInfo::new(Direction::Inbound, pod.id.clone());
    info.trace = ctx.flows.l4_trace();
    info.src = Some(peer);
    info.orig_dst = orig;
    info.dst = orig;
    let Some(orig) = orig else {
        ctx.flows.failed(conn, &info, "accepted socket has no local address".into());
        reset(client);
        return;
    };
    let (strict, kubelet_probe) = ctx.registry.borrow().workload(&pod.id).map_or((false, false), |w| {
        let from_node = w.host_ips.contains(&peer.ip());
        (w.inbound_mode == InboundMode::Strict, from_node && w.probe_ports.contains(&orig.port()))
    });
    // The kubelet probes pods from the node's own IP, in plaintext: a
    // connection from there to a port the pod's probes use skips STRICT and
    // policy (as Istio ambient exempts probes), or every probed pod would
    // fail its probes once STRICT or under an ALLOW policy. Nothing else
    // from the node's address is exempt (NodePort traffic SNATed to it).
    let admitted = if kubelet_probe {
        tracing::debug!(pod = %pod.id, %peer, port = orig.port(), "kubelet probe from the node: exempt from STRICT and policy");
        None
    } else if strict {
        tracing::info!(pod = %pod.id, %peer, "plaintext connection refused: inbound mode STRICT");
        ctx.flows.failed(conn, &info, "refused: inbound mode STRICT accepts only mesh mTLS".into());
        reset(client);
        return;
    } else {
        // Plaintext: no identity, only the client's IP.
        let facts = ConnFacts::plaintext(pod.id.clone(), orig, peer.ip());
        let Ok(admitted) = authorize(&ctx, conn, facts, &mut info) else {
            reset(client);
            return;
        };
        Some(admitted)
    };
    let started = Instant::now();
    let upstream = match pod.connect(orig).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(pod = %pod.id, dst = %orig, error = %e, "application connect failed");
            ctx.flows.failed(conn, &info, e.to_string());
            reset(client);
            return;
        }
    };
    info.connect = Some(started.elapsed());
    let probe = TcpProbe::of(&client).map(Arc::new);
    let health = probe.as_ref().map(TcpProbe::flow);
    info.tcp = health.as_ref().map(FlowHealth::at_open).unwrap_or_default();
    ctx.flows.opened(conn, &info);
    let live = admitted.map(|a| a.live);
    let revoked = async {
        match &live {
            Some(live) => live.revoked().await,
            None => std::future::pending().await,
        }
    };
    let (bytes, error) = match splice_until(client, upstream, revoked, &ctx.closing).await {
        Ok(done) => ((done.from_tcp, done.to_tcp), done.error.map(|e| e.to_string())),
        Err(stopped) => {
            let denial = live.as_ref().and_then(|l| l.denial()).expect("a stopped splice was revoked");
            info.policy = denial.closing_mark();
            ((stopped.from_tcp, stopped.to_tcp), Some(format!("closed by policy change: {denial}")))
        }
    };
    info.tcp = health.as_ref().map(FlowHealth::now).unwrap_or_default();
    drop((health, probe));
    ctx.flows.closed(conn, &info, bytes, started.elapsed(), error);
}
