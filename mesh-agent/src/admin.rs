//! The admin API (HTTP/1.1 on localhost:15000 of the node): health,
//! readiness, the workload registry with capture status, recent flows, the
//! datapath (attachments, map occupancy, per-reason counters), the effective
//! configuration, the authorization policies in force (with rejected ones
//! and decision counters) and process statistics. The `heddle` CLI and the tests read
//! it; everything is JSON. Read-only: nothing here changes agent state.
//!
//! `GET /flows?follow=true` is the one streaming endpoint ([`stream`]): it
//! stays open and sends new records as JSON Lines, so this module runs its
//! own accept loop (one task per connection, like [`crate::http_server`])
//! with a body type that can stream. Streams beyond the subscriber caps
//! ([`crate::flows::subscribers::MAX_SUBSCRIBERS`] and the total queue
//! budget) are answered 503 with a JSON `error`.

pub mod stream;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{
    authz::{source::PolicyStatus, Authorizer},
    capture::Capture,
    datapath::Datapath,
    flows::FlowLog,
    registry::SharedRegistry,
};

/// Everything the admin API reads.
pub struct AdminState {
    /// This node.
    pub node: String,
    /// Set once programs are attached and the first configuration applied.
    pub ready: AtomicBool,
    /// Flows and counters.
    pub flows: Arc<FlowLog>,
    /// The datapath.
    pub datapath: Arc<Datapath>,
    /// Enrollment state.
    pub capture: Arc<Mutex<Capture>>,
    /// The latest registry.
    pub registry: watch::Receiver<SharedRegistry>,
    /// Process flags, as applied.
    pub effective_config: Value,
    /// The last configuration file error, cleared by a good reload.
    pub config_error: Arc<Mutex<Option<String>>>,
    /// mTLS state, when a CA is configured.
    pub mesh: Option<Arc<crate::proxy::hbone::Mesh>>,
    /// Policy enforcement: the set in force, live connections, counters.
    pub authz: Arc<Authorizer>,
    /// The policy source's status (rejected policies, caveats).
    pub policy_status: Arc<Mutex<PolicyStatus>>,
}

/// Serves the admin API on `listener` until `stop` fires (which also ends
/// open flow streams).
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    serve_streaming(listener, "admin", state, answer, stop).await;
}

/// An admin route table whose answers may stream (flow streams end when the
/// token fires).
pub type StreamingHandler<S> = fn(&S, &Request<Incoming>, &CancellationToken) -> Response<AnyBody>;

/// The admin accept loop, shared with the waypoint's admin API: one task
/// per connection, small buffers so a stalled flow stream holds little.
pub async fn serve_streaming<S: Send + Sync + 'static>(
    listener: TcpListener,
    name: &'static str,
    state: Arc<S>,
    answer: StreamingHandler<S>,
    stop: CancellationToken,
) {
    while let Some((stream, _)) = crate::accept::next(&listener, &name, &stop).await {
        // Bounds what the kernel holds for a stalled flow stream (the
        // admin API is on loopback: a small buffer costs no speed).
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(STREAM_SOCKET_BUFFER);
        let (state, stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let response = answer(&state, &req, &stop);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            // A small write buffer keeps what a stalled flow stream holds
            // bounded: its queue, this buffer and the socket's.
            if let Err(e) = http1::Builder::new()
                .max_buf_size(STREAM_WRITE_BUFFER)
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(endpoint = name, error = %e, "connection error");
            }
        });
    }
}

/// The body of an admin answer: whole, or a flow stream.
pub type AnyBody = BoxBody<Bytes, std::convert::Infallible>;

/// hyper's per-connection buffer limit on the admin API.
const STREAM_WRITE_BUFFER: usize = 64 * 1024;
/// `SO_SNDBUF` of admin API connections.
const STREAM_SOCKET_BUFFER: usize = 128 * 1024;

/// `GET /flows` (the stored records, or with `follow=true` a stream),
/// else the JSON answer of [`route`]. The query is parsed once.
fn answer(state: &AdminState, req: &Request<Incoming>, stop: &CancellationToken) -> Response<AnyBody> {
    if req.uri().path() != "/flows" {
        return route(state, req).map(BodyExt::boxed);
    }
    flows(&state.flows, req, stop)
}

/// `GET /flows` over `log`: the records `req`'s query selects, or a stream
/// of them with `follow=true`; 400 with a JSON `error` for a bad query.
pub fn flows(log: &FlowLog, req: &Request<Incoming>, stop: &CancellationToken) -> Response<AnyBody> {
    let query = parse_query(req.uri().query());
    match crate::flow_filter::FlowFilter::from_query(&query) {
        Ok(filter) if filter.follow => stream::open(log, filter, stop),
        Ok(filter) => json_response(&json!(log.select(&filter))).map(BodyExt::boxed),
        Err(e) => {
            let mut r = json_response(&json!({ "error": e.to_string() }));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            r.map(BodyExt::boxed)
        }
    }
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    crate::http_server::bind(addr).await
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/ready" => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/workloads" => json_response(&workloads(state)),
        "/certs" => json_response(&match &state.mesh {
            Some(m) => {
                json!({ "mtls": true, "certificates": m.certs.list(), "pooledTunnels": m.pooled() })
            }
            None => json!({ "mtls": false, "certificates": [] }),
        }),
        "/datapath" => json_response(&datapath(state)),
        "/policies" => json_response(&policies(state)),
        "/config" => json_response(&json!({
            "node": state.node,
            "flags": state.effective_config,
            "configError": *state.config_error.lock().expect("lock"),
        })),
        "/stats" => {
            let subs = state.flows.subscriber_stats();
            json_response(&json!({
                "node": state.node,
                "openFds": open_fds(),
                "activeConnections": state.flows.active(),
                "flowsDropped": state.flows.dropped(),
                "flowSubscribers": subs.subscribers,
                "flowSubscriberDropped": subs.lost_total,
                "accessLogDropped": state.flows.access_log_dropped(),
            }))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz /ready /workloads /flows /certs /datapath /policies /config /stats\n",
        ),
    }
}

fn workloads(state: &AdminState) -> Value {
    let registry = state.registry.borrow().clone();
    let capture = state.capture.lock().expect("capture lock");
    let list: Vec<Value> = registry
        .workloads()
        .map(|w| {
            let mut v = serde_json::to_value(w).unwrap_or(Value::Null);
            let local = w.node == state.node;
            if let Value::Object(m) = &mut v {
                m.insert("local".into(), json!(local));
                let status = local.then(|| capture.status(&w.id));
                m.insert("captured".into(), json!(status.as_ref().is_some_and(|s| s.captured)));
                m.insert("netnsCookie".into(), json!(status.as_ref().and_then(|s| s.netns_cookie)));
                m.insert("captureError".into(), json!(status.and_then(|s| s.error)));
                if let Value::Object(c) = serde_json::to_value(state.flows.counters(&w.id)).unwrap_or(Value::Null) {
                    m.extend(c);
                }
            }
            v
        })
        .collect();
    json!(list)
}

fn datapath(state: &AdminState) -> Value {
    let mut programs: Vec<Value> = state.datapath.attachments().into_iter().map(|a| json!(a)).collect();
    programs.extend(state.capture.lock().expect("capture lock").attachments().into_iter().map(|a| json!(a)));
    let maps: BTreeMap<&str, Value> =
        state.datapath.map_usage().into_iter().map(|(name, u)| (name, json!(u))).collect();
    let reasons: BTreeMap<&str, u64> = state.datapath.reasons().into_iter().collect();
    json!({ "programs": programs, "maps": maps, "reasons": reasons })
}

/// `GET /policies`: the root namespace, the policies in force (`loaded`),
/// those rejected from the current source content (`errors`, each naming the
/// policy and field), caveats (`warnings`), the source and its content hash,
/// why the current content is not applied (`sourceError`), live inbound
/// connections, and decision counters per (action, policy, verdict).
fn policies(state: &AdminState) -> Value {
    let set = state.authz.policies();
    let status = state.policy_status.lock().expect("lock").clone();
    let loaded: Vec<Value> = set
        .summaries()
        .into_iter()
        .map(|p| {
            json!({
                "policy": p.policy,
                "action": p.action.as_str(),
                "rules": p.rules,
                "dryRun": p.dry_run,
            })
        })
        .collect();
    json!({
        "rootNamespace": set.root_namespace(),
        "source": status.source,
        "contentHash": status.content_hash,
        "loaded": loaded,
        "errors": status.errors,
        "warnings": status.warnings,
        "sourceError": status.source_error,
        "liveConnections": state.authz.live_count(),
        "decisions": state.authz.decisions(),
    })
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

pub(crate) fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

fn json_response(v: &Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}
