//! Fuzz targets that take a connection's bytes: the tunnel's HTTP/2 and
//! CONNECT handling, the tunnel's TLS server up to the end of the
//! handshake, the mesh CA's HTTP API, and the waypoint's HTTP/1.1 and
//! HTTP/2 request handling (detection, hyper with the waypoint's limits,
//! path normalisation, L7 authorization, route matching and filters).
//! Each serves the input over an in-memory pipe, the client's side closed
//! after the last byte, on a runtime of its own (so nothing of one input
//! runs during the next), and must finish within [`HANG`]: a server still
//! waiting after the client has gone is a hang, and fails the target. A
//! panic in any task serving the input fails it too (libFuzzer aborts on
//! any panic; the stable replay counts them, as a panic in a spawned task
//! would not reach it otherwise).

use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use hyper::{body::Incoming, service::service_fn, Method, Request, Response, StatusCode};
use tokio::io::{AsyncWriteExt, DuplexStream};

use mesh_common::PORT_TUNNEL;

use super::fixtures;
use crate::{
    policy::{l7, PeerIdentity},
    proxy::tunnel,
    registry::ObjectRef,
    waypoint::{
        balance::pick_weighted,
        detect::{self, Prefixed, Protocol},
        forward, listener,
        pool::{HttpBody, Version},
        routes::matching,
    },
};

/// Longest a server may take to serve an input and finish.
const HANG: Duration = Duration::from_secs(10);

thread_local! {
    /// Panics on this thread (a current-thread runtime runs its tasks here).
    static PANICS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts every panic on its thread in [`PANICS`], then does what the
/// previous hook did.
fn count_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| p.set(p.get() + 1));
            previous(info);
        }));
    });
}

/// The address the tunnel fixture's pod has.
const POD: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

/// Serves `data` to `serve` over a pipe on a runtime of its own, reading
/// (and dropping) what the server writes; fails if the server has not
/// finished within [`HANG`], or if any of its tasks panicked.
fn over_pipe<F, Fut>(data: &[u8], serve: F)
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = ()>,
{
    count_panics();
    let before = PANICS.with(std::cell::Cell::get);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let feed = async move {
            let _ = to_server.write_all(data).await;
            let _ = to_server.shutdown().await;
        };
        let drain = async move {
            let _ = tokio::io::copy(&mut from_server, &mut tokio::io::sink()).await;
        };
        let ((), (), finished) = tokio::join!(feed, drain, tokio::time::timeout(HANG, serve(server)));
        assert!(finished.is_ok(), "the server was still busy after {HANG:?} (its client's input had ended)");
    });
    drop(runtime);
    let panics = PANICS.with(std::cell::Cell::get) - before;
    assert!(panics == 0, "{panics} task(s) serving the input panicked");
}

/// The tunnel port after TLS: HTTP/2 with the tunnel's settings, each
/// stream put through the checks the tunnel makes before authorization
/// (method, `CONNECT` target, trace context). A target is only ever this
/// pod's address, never the tunnel port.
pub fn tunnel_connect(data: &[u8]) {
    over_pipe(data, |io| async move {
        let Ok(mut conn) = tunnel::server_builder().handshake::<_, Bytes>(io).await else { return };
        let propagators = crate::trace::context::Propagators::default();
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            let _ = propagators.connection_child(req.headers());
            let status = if req.method() == Method::CONNECT {
                match tunnel::connect_target(req.uri(), &[POD]) {
                    Ok(target) => {
                        assert!(target.ip() == POD && target.port() != PORT_TUNNEL, "{target} was admitted");
                        StatusCode::OK
                    }
                    Err(refusal) => {
                        let _ = refusal.reason();
                        StatusCode::BAD_REQUEST
                    }
                }
            } else {
                StatusCode::METHOD_NOT_ALLOWED
            };
            let _ = respond.send_response(tunnel::refuse(status, "fuzz"), true);
        }
    });
}

/// The tunnel's TLS server (TLS 1.3, client certificate required, ALPN
/// `h2`) fed the input as the client's records. Bytes alone can never
/// complete the handshake: that needs a key exchange and a client
/// certificate the mesh CA signed.
pub fn tunnel_tls(data: &[u8]) {
    let Ok(mut conn) = rustls::ServerConnection::new(fixtures::tunnel_tls()) else { return };
    let mut input = data;
    let mut out = Vec::new();
    while !input.is_empty() {
        match conn.read_tls(&mut input) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let failed = conn.process_new_packets().is_err();
        while conn.wants_write() {
            out.clear();
            if conn.write_tls(&mut out).is_err() {
                break;
            }
        }
        if failed {
            break;
        }
    }
    assert!(conn.is_handshaking(), "a handshake completed from bytes alone");
    assert!(conn.peer_certificates().is_none(), "a client certificate was accepted from bytes alone");
}

/// The mesh CA's HTTP API after TLS (`GET /v1/bundle`, `POST
/// /v1/certificates` with a node token and a CSR).
pub fn ca_http(data: &[u8]) {
    over_pipe(data, |io| fixtures::ca().serve_decrypted(io));
}

/// The waypoint's client side: protocol detection, then hyper with the
/// waypoint's HTTP/1.1 or HTTP/2 settings, every request put through the
/// waypoint's own steps before forwarding (path normalisation, L7
/// authorization, route matching, redirects, rewrites, the backend pick),
/// and answered locally instead of forwarded.
pub fn waypoint_http(data: &[u8]) {
    over_pipe(data, |mut io| async move {
        let Ok((protocol, head)) = detect::detect(&mut io).await else { return };
        let version = match protocol {
            Protocol::Http1 => Version::Http1,
            Protocol::Http2 => Version::Http2,
            Protocol::Opaque(_) => return,
        };
        let svc = service_fn(|req| async move { Ok::<_, Infallible>(decide(req)) });
        let _ = listener::serve_http(Prefixed::new(head, io), version, svc).await;
    });
}

/// What the waypoint does with a request before it forwards it, against
/// the fixture's routes and policies for `demo/api`, from `demo/web`.
fn decide(mut req: Request<Incoming>) -> Response<HttpBody> {
    let grpc = forward::is_grpc(&req);
    if let Err(e) = forward::normalize_path(&mut req) {
        return forward::local_reply(StatusCode::BAD_REQUEST, grpc, &e.to_string());
    }
    let routes = fixtures::waypoint_routes();
    let peer = PeerIdentity::new("cluster.local", "demo", "web");
    let host = forward::authority(&req).unwrap_or_default().to_ascii_lowercase();
    let allowed = l7::authorize_request(
        &routes.authz,
        &l7::RequestFacts {
            service: Some(("demo", "api")),
            waypoint: ("demo", "waypoint"),
            src_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            peer: Some(&peer),
            dst: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)), 80),
            method: req.method().as_str(),
            host: &host,
            path: req.uri().path(),
            headers: req.headers(),
            auth: None,
            http: true,
        },
    )
    .is_allowed();
    if !allowed {
        return forward::local_reply(StatusCode::FORBIDDEN, grpc, "RBAC: access denied");
    }
    let service = ObjectRef { namespace: "demo".into(), name: "api".into() };
    let matched = routes.table.find(&matching::RequestFacts {
        service: &service,
        port: 80,
        client_namespace: Some("demo"),
        method: req.method().as_str(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
        grpc,
    });
    let Some(matched) = matched else {
        return forward::local_reply(StatusCode::NOT_FOUND, grpc, "no route");
    };
    let rule = &matched.rule;
    let path_match = matched.match_index.map(|i| rule.matches[i].path.clone());
    if let Some(r) = &rule.filters.redirect {
        return forward::redirect_reply(&req, r, path_match.as_ref());
    }
    forward::apply_request_filters(&mut req, &rule.filters, path_match.as_ref());
    let weights: Vec<u32> = rule.backends.iter().map(|b| b.weight).collect();
    // Deterministic, so that a crash replays: the pick comes from the path.
    let roll = req.uri().path().bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    if let Some(b) = pick_weighted(&weights, roll).map(|i| &rule.backends[i]) {
        forward::apply_request_filters(&mut req, &b.filters, path_match.as_ref());
    }
    forward::local_reply(StatusCode::OK, grpc, req.uri().path())
}
