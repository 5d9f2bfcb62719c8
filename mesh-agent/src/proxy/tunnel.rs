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
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use hyper::{Method, Request, Response, StatusCode};
use mesh_common::PORT_TUNNEL;
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

/// Time allowed for a client to finish the TLS and HTTP/2 handshakes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams per tunnel connection.
const MAX_STREAMS: u32 = 4096;
/// Largest header block of a tunnel request: a `CONNECT` carries its
/// authority and trace context, a few hundred bytes. Larger blocks are
/// answered `431` by the HTTP/2 layer (as hyper's default).
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// How long after refusing a stream for an expired certificate the tunnel
/// connection is told to go away (GOAWAY, open streams go on): the
/// refusal is sent first, as h2 sends GOAWAY ahead of queued responses.
const EXPIRED_GOAWAY_DELAY: Duration = Duration::from_millis(100);

/// Serves the pod's tunnel port until `stop` fires.
pub async fn run(
    listener: TcpListener,
    pod: Arc<Pod>,
    ctx: Arc<ProxyContext>,
    mesh: Arc<Mesh>,
    stop: CancellationToken,
) {
    let handle = Arc::new(mesh.certs.ensure(&pod.identity));
    let acceptor = match tls::server_config_with(handle.clone(), mesh.trust.clone()) {
        Ok(c) => TlsAcceptor::from(c),
        Err(e) => {
            tracing::error!(pod = %pod.id, error = %e, "cannot serve the tunnel port");
            return;
        }
    };
    accept_loop(listener, stop, "tunnel", &pod.id.clone(), move |tcp, peer| {
        let (pod, ctx, mesh, acceptor, own) =
            (pod.clone(), ctx.clone(), mesh.clone(), acceptor.clone(), handle.clone());
        ctx.tracker.clone().spawn(serve_connection(tcp, peer, pod, ctx, mesh, acceptor, own))
    })
    .await;
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    pod: Arc<Pod>,
    ctx: Arc<ProxyContext>,
    mesh: Arc<Mesh>,
    acceptor: TlsAcceptor,
    own: Arc<crate::identity::certs::CertHandle>,
) {
    let mut info = ConnInfo::new(Direction::Inbound, pod.id.clone());
    info.src = Some(peer);
    info.security = Security::MutualTls;
    info.dst_identity = Some(pod.identity.name());
    let probe = TcpProbe::of(&tcp).map(Arc::new);
    let (mut h2, peer_id, peer_not_after) = match admit(tcp, peer, &ctx, &mesh, &acceptor, &mut info).await {
        Ok(admitted) => admitted,
        Err((why, msg)) => {
            if why == TunnelRefusal::HandshakeLimit {
                // One line per connection of a flood would be a flood of
                // logs; the metric and the flow records count them.
                tracing::debug!(pod = %pod.id, %peer, error = %msg, "tunnel connection refused");
            } else {
                tracing::info!(pod = %pod.id, %peer, error = %msg, "tunnel connection refused");
            }
            refused(&ctx, why);
            ctx.flows.failed(ctx.flows.conn_id(), &info, msg);
            if let Some(p) = probe {
                p.release();
            }
            return;
        }
    };
    let info = Arc::new(info);
    // `accept` also drives the connection's I/O for every open stream. When
    // the agent starts draining (a handover, or exit), GOAWAY tells the
    // source agent to open new streams elsewhere; the open ones go on.
    let mut going_away = false;
    // After a stream refused for an expired certificate: when to send
    // GOAWAY (a moment later, so that the refusal reaches the peer first).
    let mut expired_at: Option<tokio::time::Instant> = None;
    loop {
        let shut = async {
            match expired_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            next = h2.accept() => next,
            () = ctx.draining.cancelled(), if !going_away => {
                going_away = true;
                h2.graceful_shutdown();
                continue;
            }
            () = shut, if !going_away => {
                going_away = true;
                h2.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { break };
        match next {
            Ok((req, mut respond)) => {
                if let Some(why) = expired(peer_not_after, &own) {
                    // Certificates are checked at the handshake; a stream
                    // opened after one of them expired needs a new one.
                    refused(&ctx, TunnelRefusal::CertificateExpired);
                    let mut record = (*info).clone();
                    record.orig_dst = connect_target(req.uri(), &pod.ips).ok();
                    ctx.flows.failed(ctx.flows.conn_id(), &record, format!("tunnel stream refused: {why}"));
                    let _ = respond.send_response(refuse(StatusCode::FORBIDDEN, "certificate_expired"), true);
                    expired_at.get_or_insert_with(|| tokio::time::Instant::now() + EXPIRED_GOAWAY_DELAY);
                    continue;
                }
                let (pod, ctx2, info, peer_id, probe) =
                    (pod.clone(), ctx.clone(), info.clone(), peer_id.clone(), probe.clone());
                ctx.tracker.spawn(async move {
                    let tunnel = Tunnel { info: &info, peer_id: &peer_id, probe: probe.as_ref() };
                    serve_stream(req, respond, &pod, &ctx2, tunnel).await;
                });
            }
            Err(e) => {
                if peer_broke_protocol(&e) {
                    tracing::info!(pod = %pod.id, %peer, error = %e, "tunnel connection closed: the peer broke HTTP/2");
                    refused(&ctx, TunnelRefusal::Http2Protocol);
                } else {
                    tracing::debug!(%peer, error = %e, "tunnel connection ended with an error");
                }
                break;
            }
        }
    }
    drop(h2);
    if let Some(p) = probe {
        p.release();
    }
}

/// Why a new stream on a tunnel connection is refused for a certificate
/// that expired since its handshake: the peer's (`peer_not_after`; one
/// whose end could not be read counts as expired) or this pod's own (`own`,
/// the listener's certificate, holds no valid one).
fn expired(peer_not_after: Option<SystemTime>, own: &crate::identity::certs::CertHandle) -> Option<&'static str> {
    if peer_not_after.is_none_or(|t| SystemTime::now() >= t) {
        Some("the peer's certificate has expired")
    } else if own.get().is_none() {
        Some("this pod's certificate has expired")
    } else {
        None
    }
}

/// A tunnel connection that finished its handshakes, its verified peer, and
/// when the peer's certificate expires.
type Admission =
    (h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>, SpiffeId, Option<SystemTime>);

/// The checks and handshakes before a tunnel connection carries streams:
/// the source must be a known workload (checked before any TLS work), hold
/// a handshake slot, finish TLS and HTTP/2 by one deadline (so a client
/// that completes TLS and never sends the HTTP/2 preface is cut off too),
/// and present the certificate of the workload that owns its address.
/// Fills in `info`'s peer identity and certificate serial.
async fn admit(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: &ProxyContext,
    mesh: &Mesh,
    acceptor: &TlsAcceptor,
    info: &mut ConnInfo,
) -> Result<Admission, (TunnelRefusal, String)> {
    let expected = ctx.registry.borrow().workload_by_ip(peer.ip()).map(|w| w.identity.clone());
    let expected = expected
        .ok_or_else(|| (TunnelRefusal::UnknownSource, format!("no mesh workload owns source address {}", peer.ip())))?;
    let slot = mesh.handshakes.try_acquire(peer.ip()).ok_or_else(|| {
        let limit = mesh.handshakes.per_source();
        let msg = format!("{} already has {limit} tunnel connections in their handshake", peer.ip());
        (TunnelRefusal::HandshakeLimit, msg)
    })?;
    let timed_out = |what: &str| {
        let msg = format!("tunnel {what} handshake timed out after {}s", HANDSHAKE_TIMEOUT.as_secs());
        (TunnelRefusal::TlsHandshakeTimeout, msg)
    };
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err((TunnelRefusal::TlsHandshake, format!("tunnel TLS handshake failed: {e}"))),
        Err(_) => return Err(timed_out("TLS")),
    };
    if let Some(m) = ctx.flows.metrics() {
        m.tls_handshake(HandshakeSide::Server, started.elapsed());
    }
    let peer_id = tls::peer_identity(tls.get_ref().1.peer_certificates(), Some(&expected))
        .map_err(|e| (TunnelRefusal::PeerIdentity, format!("tunnel client rejected: {e}")))?;
    info.src_identity = Some(peer_id.name());
    let leaf = tls.get_ref().1.peer_certificates().and_then(<[_]>::first);
    info.peer_cert_serial = leaf.and_then(tls::serial_of).map(Into::into);
    let peer_not_after = leaf.and_then(tls::not_after_of);
    let handshake = server_builder().handshake::<_, Bytes>(tls);
    let h2 = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err((TunnelRefusal::Http2Handshake, format!("tunnel HTTP/2 handshake failed: {e}"))),
        Err(_) => return Err(timed_out("HTTP/2")),
    };
    drop(slot);
    Ok((h2, peer_id, peer_not_after))
}

/// The tunnel's HTTP/2 server settings: windows, frame size, streams and
/// header list bounds.
pub(crate) fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST);
    b
}

/// Whether a tunnel connection's error is the peer's fault at the HTTP/2
/// layer (a GOAWAY this side sent for a protocol violation, such as a flood
/// of stream resets), as opposed to the connection simply going away.
fn peer_broke_protocol(e: &h2::Error) -> bool {
    e.is_go_away() && e.is_library() && e.reason().is_some_and(|r| r != h2::Reason::NO_ERROR)
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
    /// The target is the tunnel port itself: a stream into it would only
    /// loop back into the agent.
    #[error("{0} is the tunnel port itself")]
    TunnelPort(SocketAddr),
}

impl Refusal {
    /// Short stable reason, sent in the `heddle-reason` header.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadAuthority(_) => "bad_authority",
            Refusal::NotLocal(_) => "not_local_workload",
            Refusal::TunnelPort(_) => "tunnel_port",
        }
    }
}

/// The address a CONNECT asks for, if this pod serves it.
pub fn connect_target(uri: &hyper::Uri, pod_ips: &[std::net::IpAddr]) -> Result<SocketAddr, Refusal> {
    let target: SocketAddr =
        uri.authority().and_then(|a| a.as_str().parse().ok()).ok_or_else(|| Refusal::BadAuthority(uri.to_string()))?;
    if !pod_ips.contains(&target.ip()) {
        Err(Refusal::NotLocal(target))
    } else if target.port() == PORT_TUNNEL {
        Err(Refusal::TunnelPort(target))
    } else {
        Ok(target)
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
            if let Refusal::NotLocal(t) | Refusal::TunnelPort(t) = &refusal {
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
    fn refuses_a_connect_to_the_tunnel_port_itself() {
        let ips = ["10.44.2.2".parse().unwrap()];
        let got = connect_target(&uri("10.44.2.2:15008"), &ips);
        assert_eq!(got, Err(Refusal::TunnelPort("10.44.2.2:15008".parse().unwrap())));
        assert_eq!(got.unwrap_err().reason(), "tunnel_port");
    }

    #[test]
    fn refuses_a_connect_whose_authority_is_a_name() {
        let ips = ["10.44.2.2".parse().unwrap()];
        assert!(matches!(connect_target(&uri("example.com:80"), &ips), Err(Refusal::BadAuthority(_))));
    }
}
