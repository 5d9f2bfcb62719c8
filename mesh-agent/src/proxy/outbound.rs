//! Outbound leg: connections an enrolled pod opened, redirected by
//! `connect4` to the pod's `127.0.0.1:15001`. The original destination comes
//! from the `HEDDLE_ORIG_DST` map, keyed by the client's address; a service
//! VIP is resolved to one endpoint; the upstream connection is opened from
//! the pod's namespace.
//!
//! TCP health ([`super::tcp_health`]) comes from the network-facing socket:
//! the pooled tunnel connection for a tunnelled stream, the upstream socket
//! for plaintext.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Instant,
};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    accept_loop,
    sockets::{connect_in, reset},
    splice::splice,
    tcp_health::{FlowHealth, TcpProbe},
    Pod, ProxyContext,
};
use crate::{
    flows::{ConnInfo, Direction, Security},
    metrics::HandshakeSide,
};

/// Accepts on the pod's outbound listener until `stop` fires.
pub async fn run(listener: TcpListener, pod: Arc<Pod>, ctx: Arc<ProxyContext>, stop: CancellationToken) {
    accept_loop(listener, stop, "outbound", &pod.id.clone(), move |stream, peer| {
        let (pod, ctx) = (pod.clone(), ctx.clone());
        ctx.tracker.clone().spawn(handle(stream, peer, pod, ctx))
    })
    .await;
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<Pod>, ctx: Arc<ProxyContext>) {
    let conn = ctx.flows.conn_id();
    let mut info = ConnInfo::new(Direction::Outbound, pod.id.clone());
    // L4 tracing decides once, here: a tunnel carries the span to the
    // destination, and the close records it only if it was sampled.
    info.trace = ctx.flows.l4_trace();
    let orig = match peer {
        SocketAddr::V4(peer) => ctx.datapath.take_orig_dst(pod.cookie, peer),
        SocketAddr::V6(_) => None,
    };
    let Some(orig) = orig else {
        tracing::warn!(pod = %pod.id, %peer, "no original destination for accepted connection");
        ctx.flows.failed(conn, &info, "original destination unknown".into());
        reset(client);
        return;
    };
    let orig = SocketAddr::V4(SocketAddrV4::new(*orig.ip(), orig.port()));
    info.orig_dst = Some(orig);
    info.src_identity = Some(pod.identity.name());
    // One hash lookup (on an empty map without waypoints) keeps the L4 path
    // free of L7 cost.
    if let Some(mesh) = &ctx.mesh {
        let waypoint = ctx.registry.borrow().waypoint_for(orig.ip()).cloned();
        if let Some(waypoint) = waypoint {
            return super::to_waypoint::forward(client, peer, &pod, &ctx, mesh, conn, info, waypoint).await;
        }
    }
    let resolved = ctx.registry.borrow().resolve(orig);
    let resolved = match resolved {
        Ok(r) => r,
        Err(e) => return fail(&ctx, conn, &info, client, &e),
    };
    info.dst = Some(resolved.addr);
    info.service = resolved.service;
    let started = Instant::now();
    let dst_identity = resolved.workload.as_ref().and_then(|id| {
        let reg = ctx.registry.borrow();
        reg.workload(id).filter(|w| w.enrolled).map(|w| w.identity.clone())
    });
    let (done, health) = if let (Some(mesh), Some(dst_id)) = (ctx.mesh.clone(), dst_identity) {
        info.security = Security::MutualTls;
        info.dst_identity = Some(dst_id.name());
        match mesh.connect(&pod, &pod.identity, resolved.addr, &dst_id, info.trace.as_ref()).await {
            Ok(tunnelled) => splice_tunnelled(client, peer, &pod, &ctx, conn, &mut info, started, tunnelled).await,
            Err(e) => {
                // The destination's policy refused it: the source records
                // the same verdict (the reason text names the policy).
                info.policy.denied = e.reason() == "denied";
                return fail(&ctx, conn, &info, client, &e);
            }
        }
    } else {
        match connect_in(&pod.netns, resolved.addr).await {
            Ok(upstream) => {
                info.connect = Some(started.elapsed());
                info.src = upstream.local_addr().ok();
                let probe = TcpProbe::of(&upstream).map(std::sync::Arc::new);
                let health = probe.as_ref().map(TcpProbe::flow);
                info.tcp = health.as_ref().map(FlowHealth::at_open).unwrap_or_default();
                ctx.flows.opened(conn, &info);
                let done = splice(client, upstream, &ctx.closing).await;
                (done, health)
            }
            Err(e) => return fail(&ctx, conn, &info, client, &e),
        }
    };
    record_close(&ctx, conn, &mut info, done, health, started);
}

/// Records a tunnelled connection's open, then splices it until it ends.
#[allow(clippy::too_many_arguments)] // the connection's facts, passed once
pub(super) async fn splice_tunnelled(
    client: TcpStream,
    peer: SocketAddr,
    pod: &Pod,
    ctx: &ProxyContext,
    conn: u64,
    info: &mut ConnInfo,
    started: Instant,
    tunnelled: super::hbone::Tunnelled,
) -> (super::splice::Spliced, Option<FlowHealth>) {
    info.connect = Some(started.elapsed());
    if let (Some(m), Some(d)) = (ctx.flows.metrics(), tunnelled.handshake) {
        m.tls_handshake(HandshakeSide::Client, d);
    }
    // Streams share tunnel connections, so the source is the pod's IP and
    // the application's own source port.
    info.src = pod.ips.first().map(|ip| SocketAddr::new(*ip, peer.port()));
    let health = tunnelled.probe.as_ref().map(TcpProbe::flow);
    info.tcp = health.as_ref().map(FlowHealth::at_open).unwrap_or_default();
    ctx.flows.opened(conn, info);
    (super::h2splice::splice(client, tunnelled.stream, &ctx.closing).await, health)
}

/// Records the end of a forwarded connection.
pub(super) fn record_close(
    ctx: &ProxyContext,
    conn: u64,
    info: &mut ConnInfo,
    done: super::splice::Spliced,
    health: Option<FlowHealth>,
    started: Instant,
) {
    info.tcp = health.as_ref().map(FlowHealth::now).unwrap_or_default();
    // The probe of a plaintext upstream is this flow's own: close its
    // duplicate now (a tunnel's probe is released by the tunnel).
    drop(health);
    ctx.flows.closed(conn, info, (done.from_tcp, done.to_tcp), started.elapsed(), done.error.map(|e| e.to_string()));
}

/// Records a connection that could not be forwarded and resets its client.
pub(super) fn fail(ctx: &ProxyContext, conn: u64, info: &ConnInfo, client: TcpStream, error: &dyn std::fmt::Display) {
    tracing::debug!(pod = %info.workload, dst = ?info.dst, %error, "outbound connection failed");
    ctx.flows.failed(conn, info, error.to_string());
    reset(client);
}
