//! The waypoint's spans: for each sampled request a server span (the
//! client's request, child of the caller's span) and, once an endpoint
//! was chosen, a client span (the request upstream, child of the server
//! span), whose id the upstream request carries in `traceparent` and B3
//! headers ([`crate::trace::context`]). Attributes follow OpenTelemetry's
//! HTTP and gRPC conventions; the mesh's own facts are `heddle.*`: route
//! and rule, response flags, retries, injected faults, identities.
//!
//! [`begin`] runs before routing, on the request task; [`finish`] when the
//! request is recorded ([`super::telemetry`]). Neither waits: spans go to
//! the tracer's bounded queue.

use std::time::{Duration, Instant, SystemTime};

use hyper::header::{HeaderMap, HeaderValue};

use crate::{
    flows::ConnInfo,
    trace::{context::Hop, Kind, SpanRecord, Tracer, Value},
};

/// A request's trace, from its arrival to its record.
pub struct RequestTrace {
    /// This hop's ids.
    pub hop: Hop,
    /// `x-request-id`, as forwarded.
    pub request_id: HeaderValue,
    /// Wall-clock arrival (spans carry Unix times).
    pub wall_start: SystemTime,
    /// When the first attempt upstream started.
    pub upstream_started: Option<Instant>,
}

/// Reads the request's trace context and rewrites it for the upstream:
/// `None` when tracing is off (headers untouched but `x-request-id`).
pub fn begin(tracer: &Tracer, headers: &mut HeaderMap) -> Option<Box<RequestTrace>> {
    let request_id = crate::trace::context::request_id(headers);
    if !tracer.enabled() {
        return None;
    }
    let hop = tracer.propagators.begin(headers, || tracer.sample());
    tracer.propagators.inject(&hop, headers);
    Some(Box::new(RequestTrace { hop, request_id, wall_start: SystemTime::now(), upstream_started: None }))
}

/// Records the spans of a finished request (`info` as recorded, with
/// `started`/`elapsed` its monotonic times).
pub fn finish(tracer: &Tracer, trace: &RequestTrace, info: &ConnInfo, started: Instant, elapsed: Duration) {
    let (Some(http), true) = (info.http.as_deref(), trace.hop.sampled) else { return };
    let end = trace.wall_start + elapsed;
    let target = info.service.as_ref().map_or_else(|| http.authority.clone(), ToString::to_string);
    let path = http.path.split_once('?').map_or(http.path.as_str(), |(p, _)| p);
    let mut common = vec![
        ("http.request.method", Value::Str(http.method.as_str().to_owned())),
        ("http.response.status_code", Value::Int(i64::from(http.status))),
        ("guid:x-request-id", Value::Str(String::from_utf8_lossy(trace.request_id.as_bytes()).into_owned())),
    ];
    if let Some(g) = http.grpc_status {
        common.push(("rpc.grpc.status_code", Value::Int(i64::from(g))));
    }
    if http.response_flags != "-" {
        common.push(("heddle.response_flags", Value::Str(http.response_flags.to_owned())));
    }
    let failed = http.status >= 500 || http.grpc_status.is_some_and(|g| g != 0);
    let error = failed.then(|| http.error.clone().unwrap_or_else(|| format!("status {}", http.status)));
    let mut server = common.clone();
    server.extend([
        ("url.path", Value::Str(path.to_owned())),
        ("server.address", Value::Str(http.authority.clone())),
        ("network.protocol.version", Value::Str(http.protocol.trim_start_matches("HTTP/").to_owned())),
        ("heddle.waypoint", Value::Str(info.waypoint.as_deref().unwrap_or("-").to_owned())),
        ("heddle.destination.service", Value::Str(target.clone())),
    ]);
    if let Some(src) = info.src {
        server.push(("client.address", Value::Str(src.ip().to_string())));
    }
    if let Some(p) = &info.src_identity {
        server.push(("heddle.source.principal", Value::Str(p.to_string())));
    }
    if let (Some(route), Some(rule)) = (&http.route, http.rule) {
        server.push(("heddle.route", Value::Str(route.to_string())));
        server.push(("heddle.rule", Value::Int(i64::try_from(rule).unwrap_or(i64::MAX))));
    }
    if http.response_flags.contains("DI") {
        server.push(("heddle.fault.delay", Value::Bool(true)));
    }
    if http.response_flags.contains("FI") {
        server.push(("heddle.fault.abort", Value::Bool(true)));
    }
    if let Some(p) = &info.policy.policy {
        server.push(("heddle.policy", Value::Str(p.to_string())));
        server.push(("heddle.policy.denied", Value::Bool(info.policy.denied)));
    }
    let trace_state = trace.hop.trace_state.header();
    tracer.record(SpanRecord {
        trace_id: trace.hop.trace_id,
        span_id: trace.hop.server,
        parent: trace.hop.parent,
        trace_state: trace_state.clone(),
        name: format!("{} {target}", http.method),
        kind: Kind::Server,
        start: trace.wall_start,
        end,
        attributes: server,
        error: error.clone(),
    });
    let (Some(upstream), Some(sent)) = (http.upstream, trace.upstream_started) else { return };
    let mut client = common;
    client.extend([
        ("server.address", Value::Str(upstream.ip().to_string())),
        ("server.port", Value::Int(i64::from(upstream.port()))),
        ("heddle.retries", Value::Int(i64::from(http.retries))),
    ]);
    if let Some(b) = &http.backend {
        client.push(("heddle.backend", Value::Str(b.to_string())));
    }
    if let Some(p) = &info.dst_identity {
        client.push(("heddle.upstream.principal", Value::Str(p.to_string())));
    }
    tracer.record(SpanRecord {
        trace_id: trace.hop.trace_id,
        span_id: trace.hop.client,
        parent: Some(trace.hop.server),
        trace_state,
        name: format!("{} {}", http.method, http.backend.as_deref().unwrap_or(&target)),
        kind: Kind::Client,
        start: trace.wall_start + sent.saturating_duration_since(started),
        end,
        attributes: client,
        error,
    });
}
