//! The waypoint's HBONE listener (port 15008 of its own pod): mTLS with the
//! waypoint's certificate, the client's certificate required and its SPIFFE
//! ID checked against the workload that owns the connection's source IP
//! (as the node agents' tunnel server does), then one HTTP/2 `CONNECT` per
//! client connection. A CONNECT is served only for traffic this waypoint
//! owns (a VIP of one of its services, or a pod of one); the stream's bytes
//! are then detected ([`super::detect`]) and served as HTTP/1.1 or HTTP/2
//! by hyper, or passed through as L4 ([`super::passthrough`]).
//!
//! Limits against hostile clients: TLS handshake 10 s; HTTP/1.1 headers
//! 64 KiB and 10 s to send them (slowloris); HTTP/2 at most
//! [`MAX_STREAMS`] concurrent streams, 64 KiB of headers, at most
//! [`MAX_PENDING_RESETS`] streams reset by the client before they were
//! served (the "rapid reset" flood, CVE-2023-44487: `GOAWAY
//! ENHANCE_YOUR_CALM` beyond it) and [`MAX_ERROR_RESETS`] streams reset for
//! the client's protocol errors. SETTINGS and PING floods cost no memory: h2
//! acknowledges each before reading the next frame, so a client that does
//! not read its acknowledgements stalls only its own connection through
//! flow control. A client breaking the limits gets a 4xx where HTTP allows
//! it, else its connection closed; the others are unaffected.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{server::SendResponse, RecvStream};
use hyper::{
    body::Incoming,
    server::conn::{http1, http2},
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{
    detect::{self, Prefixed, Protocol},
    forward,
    h2io::H2Io,
    passthrough,
    pool::{HttpBody, Version},
    Downstream, State,
};
use crate::{
    identity::{tls, SpiffeId},
    proxy::{
        h2splice::H2Stream,
        hbone::{CONN_WINDOW, MAX_FRAME, STREAM_WINDOW},
        tunnel::refuse,
    },
};

/// Time for a client to finish the TLS and HTTP/2 handshakes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent HBONE streams per client tunnel, and HTTP/2 requests per
/// client connection.
pub const MAX_STREAMS: u32 = 1024;
/// Largest request head (HTTP/1.1 buffer, HTTP/2 header list).
pub const MAX_HEADERS: usize = 64 * 1024;
/// Time a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams a client may reset before they were served, at any one time.
pub const MAX_PENDING_RESETS: usize = 20;
/// Streams the waypoint may reset for a client's protocol errors before it
/// closes the connection.
pub const MAX_ERROR_RESETS: usize = 1024;

/// Serves `listener` until `stop` fires.
pub async fn run(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    let handle = Arc::new(state.mesh.certs.ensure(&state.me_identity));
    let acceptor = match tls::server_config_with(handle, state.mesh.trust.clone()) {
        Ok(c) => TlsAcceptor::from(c),
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the waypoint's HBONE port");
            return;
        }
    };
    while let Some((tcp, peer)) = crate::accept::next(&listener, &"waypoint hbone", &stop).await {
        let _ = tcp.set_nodelay(true);
        let (state, acceptor) = (state.clone(), acceptor.clone());
        state.tracker.clone().spawn(serve_connection(tcp, peer, state, acceptor));
    }
}

async fn serve_connection(tcp: TcpStream, peer: SocketAddr, state: Arc<State>, acceptor: TlsAcceptor) {
    // As on the tunnel port (`proxy::tunnel`): the source is checked before
    // any TLS work, each source IP may hold only its share of connections in
    // their handshake, and one deadline covers the TLS and HTTP/2 handshakes.
    let expected = state.registry.borrow().workload_by_ip(peer.ip()).map(|w| w.identity.clone());
    let Some(expected) = expected else {
        return refused(&state, peer, &format!("no mesh workload owns source address {}", peer.ip()));
    };
    let Some(slot) = state.mesh.handshakes.try_acquire(peer.ip()) else {
        let limit = state.mesh.handshakes.per_source();
        let why = format!("{} already has {limit} connections in their handshake", peer.ip());
        tracing::debug!(%peer, error = %why, "waypoint connection refused");
        return record_refusal(&state, peer, why);
    };
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return refused(&state, peer, &format!("TLS handshake failed: {e}")),
        Err(_) => return refused(&state, peer, "TLS handshake timed out"),
    };
    let client = match tls::peer_identity(tls.get_ref().1.peer_certificates(), Some(&expected)) {
        Ok(id) => id,
        Err(e) => return refused(&state, peer, &format!("client rejected: {e}")),
    };
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADERS as u32)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(MAX_ERROR_RESETS))
        .handshake::<_, Bytes>(tls);
    let mut h2 = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return refused(&state, peer, &format!("HTTP/2 handshake failed: {e}")),
        Err(_) => return refused(&state, peer, "HTTP/2 handshake timed out"),
    };
    drop(slot);
    while let Some(next) = h2.accept().await {
        match next {
            Ok((req, respond)) => {
                let (state2, client) = (state.clone(), client.clone());
                state.tracker.spawn(serve_stream(req, respond, peer, client, state2));
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "waypoint tunnel ended with an error");
                break;
            }
        }
    }
}

fn refused(state: &State, peer: SocketAddr, why: &str) {
    tracing::info!(%peer, error = %why, "waypoint connection refused");
    record_refusal(state, peer, why.to_owned());
}

fn record_refusal(state: &State, peer: SocketAddr, why: String) {
    let mut info = crate::flows::ConnInfo::new(crate::flows::Direction::Inbound, state.me.id.clone());
    info.src = Some(peer);
    info.waypoint = Some(state.waypoint_name.clone());
    state.telemetry.flows.failed(state.telemetry.flows.conn_id(), &info, why);
}

/// Why a CONNECT is not served here.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a CONNECT, or no `ip:port` authority.
    #[error("bad request {0:?}: expected CONNECT ip:port")]
    BadRequest(String),
    /// This waypoint does not own the address.
    #[error("{0} is not owned by waypoint {1}")]
    NotOwned(SocketAddr, String),
}

/// The CONNECT target, if this waypoint owns it.
fn target(req: &Request<RecvStream>, state: &State) -> Result<SocketAddr, Refusal> {
    let bad = || Refusal::BadRequest(format!("{} {}", req.method(), req.uri()));
    if req.method() != Method::CONNECT {
        return Err(bad());
    }
    let addr: SocketAddr = req.uri().authority().and_then(|a| a.as_str().parse().ok()).ok_or_else(bad)?;
    if state.registry.borrow().waypoint_for(addr.ip()) == Some(&state.waypoint) {
        Ok(addr)
    } else {
        Err(Refusal::NotOwned(addr, state.waypoint.to_string()))
    }
}

async fn serve_stream(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    client: SpiffeId,
    state: Arc<State>,
) {
    let addr = match target(&req, &state) {
        Ok(a) => a,
        Err(e) => {
            let _ = respond.send_response(refuse(StatusCode::BAD_REQUEST, &e.to_string()), true);
            return refused(&state, peer, &e.to_string());
        }
    };
    let send = match respond.send_response(hyper::Response::new(()), false) {
        Ok(s) => s,
        Err(e) => return tracing::debug!(%peer, error = %e, "client stream gone"),
    };
    let mut io = H2Io::new(H2Stream { send, recv: req.into_body() });
    let (protocol, head) = match detect::detect(&mut io).await {
        Ok(d) => d,
        Err(e) => return tracing::debug!(%peer, error = %e, "client stream failed during detection"),
    };
    let service = state.registry.borrow().service_by_vip(addr.ip()).map(|s| s.id.clone());
    let version = match protocol {
        Protocol::Http1 => Version::Http1,
        Protocol::Http2 => Version::Http2,
        Protocol::Opaque(reason) => {
            return passthrough::run(Prefixed::new(head, io), peer, &client, addr, service, reason, &state).await;
        }
    };
    let down = Arc::new(Downstream {
        conn: state.telemetry.flows.conn_id(),
        peer,
        identity: crate::policy::PeerIdentity::new(client.trust_domain(), client.namespace(), client.service_account()),
        client,
        target: addr,
        service_name: service.as_ref().map(|s| s.to_string().into()),
        service,
        version,
    });
    let svc = {
        let (down, state) = (down.clone(), state.clone());
        service_fn(move |req| {
            let (down, state) = (down.clone(), state.clone());
            async move { Ok::<_, Infallible>(forward::handle(req, down, state).await) }
        })
    };
    if let Err(e) = serve_http(Prefixed::new(head, io), version, svc).await {
        tracing::debug!(%peer, error = %e, "client HTTP connection ended with an error");
    }
}

/// Serves a client's HTTP/1.1 or HTTP/2 connection with the waypoint's
/// limits (header size and time, streams, resets, windows).
pub(crate) async fn serve_http<I, S>(io: I, version: Version, svc: S) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<HttpBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    let io = TokioIo::new(io);
    match version {
        Version::Http1 => {
            http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADERS)
                .serve_connection(io, svc)
                .with_upgrades()
                .await
        }
        Version::Http2 => {
            http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .max_header_list_size(MAX_HEADERS as u32)
                .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
                .max_local_error_reset_streams(MAX_ERROR_RESETS)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONN_WINDOW)
                .serve_connection(io, svc)
                .await
        }
    }
}
