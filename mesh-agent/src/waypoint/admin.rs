//! The waypoint's admin API (localhost:15000 of its pod, the node agents'
//! port and shape) and its metrics endpoint (15020): `/healthz`, `/ready`,
//! `/flows` (the same filters as the agents', L7 ones included, and
//! `follow=true` streams, on the agents' accept loop), `/routes`
//! (the routes in force, the rejected ones and why, and how often each rule
//! matched), `/stats`; `/metrics` in the Prometheus text format.

use std::{collections::BTreeMap, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, header, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::State;
use crate::admin::AnyBody;

/// Serves the admin API until `stop` fires (which also ends flow streams).
pub async fn serve(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    crate::admin::serve_streaming(listener, "waypoint admin", state, answer, stop).await;
}

fn answer(state: &State, req: &Request<Incoming>, stop: &CancellationToken) -> Response<AnyBody> {
    if req.uri().path() == "/flows" {
        return crate::admin::flows(&state.telemetry.flows, req, stop);
    }
    route(state, req).map(BodyExt::boxed)
}

/// Serves `/metrics` until `stop` fires.
pub async fn serve_metrics(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    crate::http_server::serve(listener, "waypoint metrics", state, metrics, stop).await;
}

fn metrics(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "not found: try /metrics\n".into());
    }
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = prometheus::Encoder::encode(&encoder, &state.telemetry.prometheus.gather(), &mut out) {
        return text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n"));
    }
    Response::builder()
        .header(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)
        .body(Full::new(Bytes::from(out)))
        .expect("static response parts")
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .expect("static response parts")
}

fn route(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" | "/ready" => text(StatusCode::OK, "ok\n".into()),
        "/routes" => json_response(StatusCode::OK, &routes_json(state)),
        "/stats" => {
            let (h1, h2) = state.upstreams.counts();
            json_response(
                StatusCode::OK,
                &json!({
                    "waypoint": state.waypoint.to_string(),
                    "identity": state.me_identity.to_string(),
                    "activeConnections": state.telemetry.flows.active(),
                    "flowRecordsDropped": state.telemetry.flows.dropped(),
                    "upstreamIdleHttp1": h1,
                    "upstreamHttp2": h2,
                    "tunnels": state.mesh.pooled(),
                }),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /flows, /routes, /stats, /healthz\n".into()),
    }
}

/// `GET /routes`: every route read, its status per parent, and rule hits.
#[must_use]
pub fn routes_json(state: &State) -> Value {
    let set = state.routes.borrow().clone();
    let hits = state.telemetry.rule_hits();
    let mut by_route: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for ((route, rule), n) in &hits {
        by_route.entry(route.to_string()).or_default().push(json!({"rule": rule, "requests": n}));
    }
    let routes: Vec<Value> = set
        .statuses()
        .iter()
        .map(|s| {
            let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
            if let Some(obj) = v.as_object_mut() {
                obj.insert("hits".into(), json!(by_route.get(&s.route).cloned().unwrap_or_default()));
            }
            v
        })
        .collect();
    let services: Vec<String> =
        state.registry.borrow().services_of(&state.waypoint).map(|s| s.id.to_string()).collect();
    json!({
        "waypoint": state.waypoint.to_string(),
        "services": services,
        "routes": routes,
    })
}
