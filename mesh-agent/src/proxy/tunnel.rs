//! The HBONE server: the destination side of the tunnel, one listener on
//! port 15008 inside each enrolled pod.
//!
//! Per connection: TLS 1.3 with the pod's own certificate, a client
//! certificate required and verified against the trust bundle; the client's
//! SPIFFE ID must be the identity of the workload that owns the connection's
//! source IP (tunnels are opened from inside the source pod). Per HTTP/2
//! stream: only `CONNECT` to one of this pod's own IPs is served; it is
//! authorized ([`crate::authz`], with the verified peer identity), the
//! application is dialled from inside the pod, and only then is `200` sent
//! and the stream spliced. A refusal is a non-200 status with a
//! `heddle-reason` header (`403` and `denied by policy ns/name rule N` for a
//! policy denial); the source agent then resets its client. An admitted
//! stream stays registered as live until it ends; if a policy change denies
//! it, the application side and the stream are reset (`RST_STREAM CANCEL`),
//! so the source agent resets its client too.
//!
//! TCP health: every stream's records carry the RTT of the accepted tunnel
//! connection and its retransmits over the stream's lifetime (the
//! connection is shared by the streams, see [`super::tcp_health`]).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{
    accept_loop, authorize,
    h2splice::{self, H2Stream},
    hbone::{Mesh, CONN_WINDOW, MAX_FRAME, REASON_HEADER, STREAM_WINDOW},
    splice::Spliced,
    tcp_health::{FlowHealth, TcpProbe},
    Pod, ProxyContext,
};
use crate::{
    authz::{Admitted, ConnFacts, Denial, LiveConn},
    flows::{ConnInfo, Direction, Security},
    identity::{tls, SpiffeId},
    metrics::{HandshakeSide, TunnelRefusal},
};

/// Time allowed for a client to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams per tunnel connection.
const MAX_STREAMS: u32 = 4096;

/// Serves the pod's tunnel port until `stop` fires.
pub async fn run(
    listener: TcpListener,
    pod: Arc<Pod>,
    ctx: Arc<ProxyContext>,
    mesh: Arc<Mesh>,
    stop: CancellationToken,
) {
    let handle = Arc::new(mesh.certs.ensure(&pod.identity));
    let acceptor = match tls::server_config_with(handle, mesh.trust.clone()) {
        Ok(c) => TlsAcceptor::from(c),
        Err(e) => {
            tracing::error!(pod = %pod.id, error = %e, "cannot serve the tunnel port");
            return;
        }
    };
    accept_loop(listener, stop, "tunnel", &pod.id.clone(), move |tcp, peer| {
        let (pod, ctx, acceptor) = (pod.clone(), ctx.clone(), acceptor.clone());
        ctx.tracker.clone().spawn(serve_connection(tcp, peer, pod, ctx, acceptor))
    })
    .await;
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
    ctx: Arc<ProxyContext>,
    acceptor: TlsAcceptor,
) {
    let mut info = ConnInfo::new(Direction::Inbound, pod.id.clone());
    info.src = Some(peer);
    info.security = Security::MutualTls;
    info.dst_identity = Some(pod.identity.name());
    let fail = |info: &ConnInfo, why: TunnelRefusal, msg: String| {
        tracing::info!(pod = %pod.id, %peer, error = %msg, "tunnel connection refused");
        refused(&ctx, why);
        ctx.flows.failed(ctx.flows.conn_id(), info, msg);
    };
    let probe = TcpProbe::of(&tcp).map(Arc::new);
    let started = Instant::now();
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            if let Some(m) = ctx.flows.metrics() {
                m.tls_handshake(HandshakeSide::Server, started.elapsed());
            }
            tls
        }
        Ok(Err(e)) => return fail(&info, TunnelRefusal::TlsHandshake, format!("tunnel TLS handshake failed: {e}")),
        Err(_) => return fail(&info, TunnelRefusal::TlsHandshakeTimeout, "tunnel TLS handshake timed out".into()),
    };
    let expected = ctx.registry.borrow().workload_by_ip(peer.ip()).map(|w| w.identity.clone());
    let Some(expected) = expected else {
        return fail(
            &info,
            TunnelRefusal::UnknownSource,
            format!("no mesh workload owns source address {}", peer.ip()),
        );
    };
    let peer_id = match tls::peer_identity(tls.get_ref().1.peer_certificates(), Some(&expected)) {
        Ok(id) => id,
        Err(e) => return fail(&info, TunnelRefusal::PeerIdentity, format!("tunnel client rejected: {e}")),
    };
    info.src_identity = Some(peer_id.name());
    info.peer_cert_serial =
        tls.get_ref().1.peer_certificates().and_then(<[_]>::first).and_then(tls::serial_of).map(Into::into);
    let info = Arc::new(info);
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .handshake::<_, Bytes>(tls)
        .await;
    let mut h2 = match handshake {
        Ok(c) => c,
        Err(e) => return fail(&info, TunnelRefusal::Http2Handshake, format!("tunnel HTTP/2 handshake failed: {e}")),
    };
    // `accept` also drives the connection's I/O for every open stream. When
    // the agent starts draining (a handover, or exit), GOAWAY tells the
    // source agent to open new streams elsewhere; the open ones go on.
    let mut going_away = false;
    loop {
        let next = tokio::select! {
            next = h2.accept() => next,
            () = ctx.draining.cancelled(), if !going_away => {
                going_away = true;
                h2.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { break };
        match next {
            Ok((req, respond)) => {
                let (pod, ctx2, info, peer_id, probe) =
                    (pod.clone(), ctx.clone(), info.clone(), peer_id.clone(), probe.clone());
                ctx.tracker.spawn(async move {
                    let tunnel = Tunnel { info: &info, peer_id: &peer_id, probe: probe.as_ref() };
                    serve_stream(req, respond, &pod, &ctx2, tunnel).await;
                });
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "tunnel connection ended with an error");
                break;
            }
        }
    }
    drop(h2);
    if let Some(p) = probe {
        p.release();
    }
}

/// The tunnel connection a stream arrived on.
struct Tunnel<'a> {
    /// Facts common to its streams (peer, identities).
    info: &'a ConnInfo,
    /// The verified peer identity.
    peer_id: &'a SpiffeId,
    /// Its TCP socket.
    probe: Option<&'a Arc<TcpProbe>>,
}

/// Why a CONNECT target is not served.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The authority is not `ip:port`.
    #[error("bad CONNECT authority {0:?}: must be ip:port")]
    BadAuthority(String),
    /// The address is not one of this pod's.
    #[error("{0} is not a local enrolled workload")]
    NotLocal(SocketAddr),
}

impl Refusal {
    /// Short stable reason, sent in the `heddle-reason` header.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadAuthority(_) => "bad_authority",
            Refusal::NotLocal(_) => "not_local_workload",
        }
    }
}

/// The address a CONNECT asks for, if this pod serves it.
pub fn connect_target(uri: &hyper::Uri, pod_ips: &[std::net::IpAddr]) -> Result<SocketAddr, Refusal> {
    let target: SocketAddr =
        uri.authority().and_then(|a| a.as_str().parse().ok()).ok_or_else(|| Refusal::BadAuthority(uri.to_string()))?;
    if pod_ips.contains(&target.ip()) {
        Ok(target)
    } else {
        Err(Refusal::NotLocal(target))
    }
}

pub(crate) fn refuse(status: StatusCode, reason: &str) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(reason) {
        r.headers_mut().insert(REASON_HEADER, v);
    }
    r
}

/// Serves one CONNECT stream: checks it, authorizes it, dials the
/// application, answers, splices, records.
async fn serve_stream(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    pod: &Arc<Pod>,
    ctx: &Arc<ProxyContext>,
    tunnel: Tunnel<'_>,
) {
    let conn = ctx.flows.conn_id();
    let mut info = tunnel.info.clone();
    info.trace = ctx.flows.l4_trace_from(req.headers());
    let admitted = match check_stream(&req, conn, pod, ctx, &mut info, tunnel.peer_id) {
        Ok(a) => a,
        Err((status, reason)) => {
            let _ = respond.send_response(refuse(status, &reason), true);
            return;
        }
    };
    let target = info.dst.expect("set by check_stream");
    let started = Instant::now();
    let upstream = match pod.connect(target).await {
        Ok(s) => s,
        Err(e) => {
            refused(ctx, TunnelRefusal::Upstream);
            ctx.flows.failed(conn, &info, e.to_string());
            let _ = respond.send_response(refuse(StatusCode::SERVICE_UNAVAILABLE, e.reason()), true);
            return;
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            super::sockets::reset(upstream);
            ctx.flows.failed(conn, &info, format!("tunnel stream: {e}"));
            return;
        }
    };
    info.connect = Some(started.elapsed());
    let health = tunnel.probe.map(TcpProbe::flow);
    info.tcp = health.as_ref().map(FlowHealth::at_open).unwrap_or_default();
    ctx.flows.opened(conn, &info);
    let stream = H2Stream { send, recv: req.into_body() };
    let (bytes, error) = match splice_until_revoked(upstream, stream, &admitted.live, &ctx.closing).await {
        Ok(done) => ((done.to_tcp, done.from_tcp), done.error.map(|e| e.to_string())),
        Err((denial, bytes)) => {
            info.policy = denial.closing_mark();
            (bytes, Some(format!("closed by policy change: {denial}")))
        }
    };
    info.tcp = health.as_ref().map(FlowHealth::now).unwrap_or_default();
    ctx.flows.closed(conn, &info, bytes, started.elapsed(), error);
}

/// The checks before the application is dialled: the method, the target
/// (which must be this pod's), and authorization. On success `info` has the
/// target and the policy decision; on failure the error record is written
/// and the answer to send is returned (status, `heddle-reason`).
fn check_stream(
    req: &Request<RecvStream>,
    conn: u64,
    pod: &Pod,
    ctx: &ProxyContext,
    info: &mut ConnInfo,
    peer_id: &SpiffeId,
) -> Result<Admitted, (StatusCode, String)> {
    if req.method() != Method::CONNECT {
        refused(ctx, TunnelRefusal::BadRequest);
        let error = format!("tunnel request {} is not CONNECT", req.method());
        ctx.flows.failed(conn, info, error);
        return Err((StatusCode::METHOD_NOT_ALLOWED, "only CONNECT is served".into()));
    }
    let target = match connect_target(req.uri(), &pod.ips) {
        Ok(t) => t,
        Err(refusal) => {
            if let Refusal::NotLocal(t) = &refusal {
                info.orig_dst = Some(*t);
            }
            refused(ctx, TunnelRefusal::BadRequest);
            ctx.flows.failed(conn, info, refusal.to_string());
            return Err((StatusCode::BAD_REQUEST, refusal.reason().into()));
        }
    };
    info.orig_dst = Some(target);
    info.dst = Some(target);
    let src = info.src.map_or(target.ip(), |s| s.ip());
    let facts = ConnFacts::tunnelled(pod.id.clone(), target, src, peer_id);
    authorize(ctx, conn, facts, info).map_err(|text| {
        refused(ctx, TunnelRefusal::Denied);
        (StatusCode::FORBIDDEN, text)
    })
}

/// Counts a refusal in `heddle_tunnel_refusals_total`.
fn refused(ctx: &ProxyContext, why: TunnelRefusal) {
    if let Some(m) = ctx.flows.metrics() {
        m.tunnel_refused(why);
    }
}

/// [`h2splice::splice`], unless `live` is revoked first: then the
/// application's connection and the HTTP/2 stream are reset (`CANCEL`, on
/// which the source agent resets its client) and the bytes copied so far
/// are returned, as (client to server, server to client).
async fn splice_until_revoked(
    upstream: TcpStream,
    stream: H2Stream,
    live: &LiveConn,
    finish: &CancellationToken,
) -> Result<Spliced, (Denial, (u64, u64))> {
    match h2splice::splice_until(upstream, stream, live.revoked(), finish).await {
        Ok(done) => Ok(done),
        Err(stopped) => {
            let denial = live.denial().expect("a stopped splice was revoked").clone();
            Err((denial, (stopped.to_tcp, stopped.from_tcp)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> hyper::Uri {
        s.parse().unwrap()
    }

    #[test]
    fn serves_a_connect_to_one_of_the_pods_own_addresses() {
        let ips = ["10.44.2.2".parse().unwrap()];
        assert_eq!(connect_target(&uri("10.44.2.2:8080"), &ips), Ok("10.44.2.2:8080".parse().unwrap()));
    }

    #[test]
    fn refuses_a_connect_to_an_address_that_is_not_the_pods() {
        let ips = ["10.44.2.2".parse().unwrap()];
        let got = connect_target(&uri("10.44.2.3:8080"), &ips);
        assert_eq!(got, Err(Refusal::NotLocal("10.44.2.3:8080".parse().unwrap())));
        assert_eq!(got.unwrap_err().to_string(), "10.44.2.3:8080 is not a local enrolled workload");
    }

    #[test]
    fn refuses_a_connect_whose_authority_is_a_name() {
        let ips = ["10.44.2.2".parse().unwrap()];
        assert!(matches!(connect_target(&uri("example.com:80"), &ips), Err(Refusal::BadAuthority(_))));
    }
}
