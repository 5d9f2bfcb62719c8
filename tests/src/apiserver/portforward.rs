//! Pod port-forward over WebSocket, as `kube::Api::<Pod>::portforward`
//! (and kubectl) speak it to the API server, which proxies to the kubelet.
//!
//! The upgrade is `GET /api/v1/namespaces/{ns}/pods/{name}/portforward?ports=P[,Q]`
//! with subprotocol `v4.channel.k8s.io` (kubelet's
//! `pkg/kubelet/cri/streaming/portforward/websocket.go` offers only the v4
//! binary and base64 protocols for port-forward, so a client offering
//! `v5.channel.k8s.io, v4.channel.k8s.io` gets v4). Each binary message is
//! one channel byte then payload; port i uses channel 2i for data and 2i+1
//! for errors, and the server's first message on each of them is the port,
//! two bytes little-endian. The kubelet then connects to the pod's port;
//! here every port of the pod goes to the address the test gave
//! [`super::ApiServer::port_forward_to`]. A failed connection is reported
//! as text on the error channel ("error forwarding port P to pod ...").
//! When the target closes, the server closes the WebSocket; a WebSocket
//! close shuts the target connection's write side.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{handshake::derive_accept_key, protocol::Role, Message};
use tokio_tungstenite::WebSocketStream;

use super::http::{json_response, Body, Route};
use super::status::ApiError;
use super::store::TypeId;
use super::Shared;

/// The only subprotocol served.
const PROTOCOL: &str = "v4.channel.k8s.io";

fn error(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.body)
}

/// Checks the request and, if it is a well-formed WebSocket upgrade for an
/// existing pod, answers `101 Switching Protocols` and bridges in the
/// background.
pub fn upgrade(
    shared: &Arc<Shared>,
    id: TypeId,
    route: &Route,
    query: &BTreeMap<String, String>,
    req: &mut Request<Incoming>,
) -> Response<Body> {
    let store = shared.store();
    let info = store.types[id].info.clone();
    let (Some(ns), Some(pod)) = (route.namespace.clone(), route.name.clone()) else {
        return error(&ApiError::no_such_resource());
    };
    if !(info.group.is_empty() && info.kind == "Pod") {
        return error(&ApiError::no_such_resource());
    }
    if store.get(id, &ns, &pod).is_none() {
        return error(&ApiError::not_found(&info, &pod));
    }
    drop(store);
    let ports: Result<Vec<u16>, _> =
        query.get("ports").map_or(Ok(Vec::new()), |p| p.split(',').map(|s| s.trim().parse::<u16>()).collect());
    let ports = match ports {
        Ok(p) if !p.is_empty() && !p.contains(&0) => p,
        _ => return error(&ApiError::bad_request("invalid port value: ports must be integers between 1 and 65535")),
    };
    let header =
        |name: hyper::header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let is_ws = header(hyper::header::UPGRADE).is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let offers_v4 =
        header(hyper::header::SEC_WEBSOCKET_PROTOCOL).is_some_and(|p| p.split(',').any(|p| p.trim() == PROTOCOL));
    let Some(key) = header(hyper::header::SEC_WEBSOCKET_KEY).filter(|_| is_ws && offers_v4) else {
        return error(&ApiError::bad_request(format!("port-forward needs a WebSocket upgrade offering {PROTOCOL}")));
    };
    let target = shared.forward_target(&ns, &pod);
    let on_upgrade = hyper::upgrade::on(req);
    let label = format!("pod {ns}/{pod}");
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            bridge(ws, ports, target, label).await;
        }
    });
    let mut res = Response::new(http_body_util::BodyExt::boxed_unsync(http_body_util::Empty::new()));
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(hyper::header::UPGRADE, "websocket".parse().expect("static"));
    h.insert(hyper::header::CONNECTION, "Upgrade".parse().expect("static"));
    h.insert(hyper::header::SEC_WEBSOCKET_PROTOCOL, PROTOCOL.parse().expect("static"));
    if let Ok(accept) = derive_accept_key(key.as_bytes()).parse() {
        h.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    res
}

fn channel_frame(channel: u8, payload: &[u8]) -> Message {
    let mut bin = Vec::with_capacity(payload.len() + 1);
    bin.push(channel);
    bin.extend_from_slice(payload);
    Message::binary(bin)
}

/// What the per-port reader tasks report.
enum FromTarget {
    Data(u8, Bytes),
    Eof,
}

/// Moves bytes between the WebSocket's data channels and one TCP
/// connection per port until either side is done.
async fn bridge<S>(ws: WebSocketStream<S>, ports: Vec<u16>, target: Option<SocketAddr>, label: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut ws_tx, mut ws_rx) = ws.split();
    for (i, port) in ports.iter().enumerate() {
        let data = (2 * i) as u8;
        for ch in [data, data + 1] {
            if ws_tx.send(channel_frame(ch, &port.to_le_bytes())).await.is_err() {
                return;
            }
        }
    }
    let (from_target_tx, mut from_target) = tokio::sync::mpsc::channel::<FromTarget>(16);
    let mut writers = Vec::new();
    let mut open = 0usize;
    for (i, port) in ports.iter().enumerate() {
        let data = (2 * i) as u8;
        let conn = match target {
            Some(addr) => TcpStream::connect(addr).await.map_err(|e| e.to_string()),
            None => Err("no port-forward target registered for this pod".to_owned()),
        };
        match conn {
            Ok(stream) => {
                let (mut r, w) = stream.into_split();
                writers.push(Some(w));
                open += 1;
                let tx = from_target_tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if tx.send(FromTarget::Data(data, Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = tx.send(FromTarget::Eof).await;
                });
            }
            Err(e) => {
                writers.push(None);
                let msg = format!("error forwarding port {port} to {label}: {e}");
                let _ = ws_tx.send(channel_frame(data + 1, msg.as_bytes())).await;
            }
        }
    }
    drop(from_target_tx);
    while open > 0 {
        tokio::select! {
            msg = ws_rx.next() => match msg {
                Some(Ok(Message::Binary(mut bytes))) if bytes.len() > 1 => {
                    let ch = bytes.split_to(1)[0] as usize;
                    if ch.is_multiple_of(2) {
                        if let Some(Some(w)) = writers.get_mut(ch / 2) {
                            if w.write_all(&bytes).await.is_err() {
                                writers[ch / 2] = None;
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    for w in writers.iter_mut().flatten() {
                        let _ = w.shutdown().await;
                    }
                    break;
                }
                Some(Ok(_)) => {}
            },
            from = from_target.recv() => match from {
                Some(FromTarget::Data(ch, bytes)) => {
                    if ws_tx.send(channel_frame(ch, &bytes)).await.is_err() {
                        break;
                    }
                }
                Some(FromTarget::Eof) => open -= 1,
                None => break,
            },
        }
    }
    let _ = ws_tx.send(Message::Close(None)).await;
    let _ = ws_tx.close().await;
}
