//! One request through the waypoint: match a route, apply its filters,
//! pick a backend by weight and an endpoint by peak EWMA, send it over
//! HBONE, and answer the client, recording the request when its response
//! ends ([`super::telemetry`]).
//!
//! The waypoint answers itself, with Envoy's response flags: a redirect
//! (`RequestRedirect`), `500` for a backend the route names but Heddle
//! cannot resolve (Gateway API's rule), `503 UH` when the backend has no
//! endpoint, `503 UF` when the endpoint cannot be reached, `504 UT` on a
//! timeout (`timeouts.request`, `timeouts.backendRequest`), `503 UO` over a
//! circuit breaker's limits, `429 RL` over a rate limit, and the faults a
//! `VirtualService` injects (`FI`, `DI`). Retries go to another endpoint
//! (`URX` when exhausted); outlier detection keeps ejected endpoints out
//! of the choice. gRPC requests
//! get their failures as `grpc-status` trailers-only responses.

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
    time::Instant,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{
    body::Incoming,
    header::{self, HeaderValue},
    Request, Response, StatusCode, Uri,
};

use hyper_util::rt::TokioIo;

use super::{
    balance::pick_weighted,
    filters, mirror,
    outlier::{self, OutlierConfig},
    pool::{HttpBody, Version},
    ratelimit,
    retry::{self, Budget},
    routes::{
        matching::RequestFacts,
        model::{backend_port, Abort, BackendTarget, Fault, Filters, Mirror, PathMatch, Redirect, RetryPolicy, Subset},
        RouteSet,
    },
    telemetry::{record_local, Counted, Observed, Pending},
    Downstream, State,
};
use crate::{
    flows::{ConnInfo, Direction, HttpInfo, Name, Security},
    identity::SpiffeId,
    registry::ObjectRef,
};

/// Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded.
const HOP_BY_HOP: [&str; 7] =
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"];
/// Header naming the client the waypoint forwards for (Envoy's XFCC form).
pub const FORWARDED_CLIENT: &str = "x-forwarded-client-cert";

/// Where a request goes once a backend is chosen.
struct Target {
    service: ObjectRef,
    port: u16,
    /// Only these endpoints of it.
    subset: Option<Arc<Subset>>,
    /// `service` as the records name it.
    name: Name,
}

/// Handles one request of a downstream connection.
pub async fn handle(mut req: Request<Incoming>, down: Arc<Downstream>, state: Arc<State>) -> Response<HttpBody> {
    let started = Instant::now();
    let grpc = is_grpc(&req);
    let mut unanswered = Unanswered { pending: Some(new_pending(&req, &down, &state, started, grpc)), state: &state };
    let pending = unanswered.pending.as_mut().expect("set above");
    pending.trace = super::spans::begin(&state.telemetry.tracer, req.headers_mut());
    let response = match normalize_path(&mut req) {
        Ok(()) => route_and_send(req, &down, &state, pending, grpc).await,
        Err(e) => {
            http_of(pending).error = Some(format!("bad path: {e}"));
            local_reply(StatusCode::BAD_REQUEST, grpc, "Bad Request")
        }
    };
    let mut pending = unanswered.pending.take().expect("answered once");
    let (parts, body) = response.into_parts();
    if let Some(http) = pending.info.http.as_mut() {
        http.status = parts.status.as_u16();
        if let Some(g) = parts.headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
            http.grpc_status = g.parse().ok();
        }
    }
    pending.resolve_labels(&state.registry.borrow());
    if hyper::body::Body::is_end_stream(&body) {
        record_local(&state.telemetry, &pending);
        return Response::from_parts(parts, body);
    }
    Response::from_parts(parts, HttpBody::new(Observed::new(body, pending, state.telemetry.clone())))
}

/// A request being handled: when the client goes away before it is
/// answered (the handler's future is dropped, during a fault delay or
/// while the upstream has not answered), it is still recorded, with
/// status 0 and flag `DC` as Envoy does, so an abandoned request shows in
/// the flows, the metrics and its trace.
struct Unanswered<'a> {
    pending: Option<Pending>,
    state: &'a State,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let Some(mut pending) = self.pending.take() else {
            return;
        };
        if let Some(http) = pending.info.http.as_mut() {
            http.status = 0;
            http.response_flags = if http.response_flags == "DI" { "DI,DC" } else { "DC" };
            http.error.get_or_insert_with(|| "client went away before the response".into());
        }
        pending.resolve_labels(&self.state.registry.borrow());
        record_local(&self.state.telemetry, &pending);
    }
}

/// Istio's path normalisation (`BASE`): what policy, routes and the
/// upstream see ([`crate::policy::l7::path`]); the record keeps the path
/// as the client sent it.
pub(crate) fn normalize_path<B>(req: &mut Request<B>) -> Result<(), crate::policy::l7::path::PathError> {
    let path = req.uri().path();
    if req.method() == hyper::Method::CONNECT || (path == "*" && req.method() == hyper::Method::OPTIONS) {
        return Ok(());
    }
    let std::borrow::Cow::Owned(normalized) = crate::policy::l7::path::normalize(path)? else {
        return Ok(());
    };
    let with_query = match req.uri().query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    // Policy must never see a path other than the one forwarded: a
    // normalised path that does not make a URI refuses the request.
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(with_query.parse().map_err(|_| crate::policy::l7::path::PathError::BadEscape)?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| crate::policy::l7::path::PathError::BadEscape)?;
    Ok(())
}

pub(crate) fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

fn new_pending<B>(req: &Request<B>, down: &Downstream, state: &State, started: Instant, grpc: bool) -> Pending {
    let mut info = ConnInfo::named(Direction::Inbound, state.me.id.clone(), state.me_name.clone());
    info.src = Some(down.peer);
    info.orig_dst = Some(down.target);
    info.security = Security::MutualTls;
    info.src_identity = Some(down.client.name());
    info.waypoint = Some(state.waypoint_name.clone());
    info.service.clone_from(&down.service);
    info.http = Some(Box::new(HttpInfo {
        protocol: match down.version {
            Version::Http1 => "HTTP/1.1",
            Version::Http2 => "HTTP/2",
        },
        method: req.method().clone(),
        authority: authority(req).unwrap_or_default(),
        path: req.uri().path_and_query().map_or_else(|| "/".to_owned(), ToString::to_string),
        response_flags: "-",
        ..HttpInfo::default()
    }));
    Pending {
        conn: down.conn,
        info,
        started,
        request_bytes: Arc::new(AtomicU64::new(0)),
        grpc,
        labels: Default::default(),
        permit: None,
        trace: None,
    }
}

pub(crate) fn authority<B>(req: &Request<B>) -> Option<String> {
    req.uri()
        .authority()
        .map(ToString::to_string)
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned))
}

fn http_of(p: &mut Pending) -> &mut HttpInfo {
    p.info.http.get_or_insert_with(Box::default)
}

async fn route_and_send(
    mut req: Request<Incoming>,
    down: &Downstream,
    state: &Arc<State>,
    pending: &mut Pending,
    grpc: bool,
) -> Response<HttpBody> {
    // One snapshot of the routes for the whole request: its policies, rule,
    // limits, budget and traffic policy come from the same configuration.
    let routes: Arc<RouteSet> = state.routes.borrow().clone();
    if let Some(refused) = super::authz::check(&routes, &mut req, down, state, pending, grpc) {
        return refused;
    }
    // A pod-addressed request goes to that pod; a service's through its routes.
    let (Some(service), Some(service_name)) = (down.service.clone(), down.service_name.clone()) else {
        let target = down.target;
        return send_to_endpoint(req, down, state, pending, target, None, None, grpc).await;
    };
    let (matched, has_routes) = {
        let client_ns = down.client.namespace();
        let facts = RequestFacts {
            service: &service,
            port: down.target.port(),
            client_namespace: Some(client_ns),
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
            grpc,
        };
        (routes.table.find(&facts), routes.table.has_routes(&service))
    };
    if let Some(m) = &matched {
        http_of(pending).route = Some(m.rule.route_name.clone());
        http_of(pending).rule = Some(m.rule.index);
    }
    if let Some(refused) = rate_limited(&routes, down, &service, matched.as_ref().map(|m| &*m.rule.route_name)) {
        return rate_limit_reply(pending, &refused, grpc);
    }
    let Some(matched) = matched else {
        if has_routes {
            // Routes attach to this Service but none matches: 404, as a
            // Gateway does (Gateway API, HTTPRoute rules).
            http_of(pending).response_flags = "NR";
            return local_reply(StatusCode::NOT_FOUND, grpc, "no route matched");
        }
        // No route at all: the Service itself, as without a waypoint.
        let target = Target { service, port: down.target.port(), subset: None, name: service_name };
        let plan = Plan { routes: &routes, path_match: None, filters: &[], backend_timeout: None, retry: None };
        return send_to_service(req, down, state, pending, &target, &plan, grpc).await;
    };
    let rule = matched.rule.clone();
    let path_match = matched.match_index.map(|i| rule.matches[i].path.clone());
    if let Some(fault) = &rule.fault {
        if let Some(resp) = inject(fault, pending, grpc).await {
            return resp;
        }
    }
    if let Some(r) = &rule.filters.redirect {
        return redirect_reply(&req, r, path_match.as_ref());
    }
    let backend = if rule.backends.is_empty() {
        None
    } else {
        let weights: Vec<u32> = rule.backends.iter().map(|b| b.weight).collect();
        match pick_weighted(&weights, rand::random()) {
            Some(i) => Some(&rule.backends[i]),
            None => {
                // Every weight is 0: Gateway API says 500.
                return local_reply(StatusCode::INTERNAL_SERVER_ERROR, grpc, "every backend has weight 0");
            }
        }
    };
    // A RetryBudgetPolicy on the route, else on the Service, replaces the
    // rule's own budget.
    let budget = rule.retry.as_ref().and_then(|_| {
        routes.budgets.of_route(&rule.route_name).first().or(routes.budgets.of_service(&service).first())
    });
    let (target, backend_filters) = match backend.map(|b| (&b.target, &b.filters)) {
        None => (Target { service, port: down.target.port(), subset: None, name: service_name }, None),
        Some((BackendTarget::Service { id, port, subset, name }, f)) => {
            let port = backend_port(*port, down.target.port());
            (Target { service: id.clone(), port, subset: subset.clone(), name: name.clone() }, Some(f))
        }
        Some((BackendTarget::Invalid(why), _)) => {
            http_of(pending).error = Some(why.clone());
            return local_reply(StatusCode::INTERNAL_SERVER_ERROR, grpc, why);
        }
    };
    let mut filter_list = vec![&rule.filters];
    filter_list.extend(backend_filters);
    let plan = Plan {
        routes: &routes,
        path_match: path_match.as_ref(),
        filters: &filter_list,
        backend_timeout: rule.timeouts.backend_request,
        retry: rule.retry.as_ref().map(|p| (p, budget.map_or(&*p.budget, |b| &**b))),
    };
    let send = send_to_service(req, down, state, pending, &target, &plan, grpc);
    let mut resp = match rule.timeouts.request {
        Some(limit) => match tokio::time::timeout(limit, send).await {
            Ok(r) => r,
            Err(_) => timed_out(pending, grpc),
        },
        None => send.await,
    };
    if let Some(f) = backend_filters.and_then(|f| f.response_headers.as_ref()) {
        filters::modify_headers(resp.headers_mut(), f);
    }
    if let Some(f) = &rule.filters.response_headers {
        filters::modify_headers(resp.headers_mut(), f);
    }
    resp
}

/// `429` for a request a rate limit refused, `Retry-After` in whole seconds.
fn rate_limit_reply(pending: &mut Pending, refused: &ratelimit::Refused, grpc: bool) -> Response<HttpBody> {
    http_of(pending).response_flags = "RL";
    let which = match refused.limit {
        ratelimit::Limit::Total => "total",
        ratelimit::Limit::Identity => "identity",
    };
    http_of(pending).error =
        Some(format!("rate limited by HTTPLocalRateLimitPolicy {} ({which} limit)", refused.policy));
    let mut resp = local_reply(StatusCode::TOO_MANY_REQUESTS, grpc, "local rate limit exceeded");
    let secs = refused.retry_after.as_secs() + u64::from(refused.retry_after.subsec_nanos() > 0);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    resp
}

/// The answer of a `RequestRedirect` (or an Istio `redirect`).
pub(crate) fn redirect_reply<B>(req: &Request<B>, r: &Redirect, path_match: Option<&PathMatch>) -> Response<HttpBody> {
    let location = filters::redirect_location(
        r,
        "http",
        &authority(req).unwrap_or_default(),
        req.uri().path(),
        req.uri().query(),
        path_match,
    );
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::try_from(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Applies a rule's `fault`: waits the delay for its share of requests
/// (flag `DI`), then answers the abort for its share (flag `FI`, with
/// `DI,FI` when both hit).
async fn inject(fault: &Fault, pending: &mut Pending, grpc: bool) -> Option<Response<HttpBody>> {
    let mut delayed = false;
    if let Some((delay, share)) = fault.delay {
        if crate::chance::per_million(share) {
            // Flagged first: a request abandoned during the delay says so.
            http_of(pending).response_flags = "DI";
            tokio::time::sleep(delay).await;
            delayed = true;
        }
    }
    let (abort, share) = fault.abort?;
    if !crate::chance::per_million(share) {
        return None;
    }
    http_of(pending).response_flags = if delayed { "DI,FI" } else { "FI" };
    Some(match abort {
        // An HTTP status answers a gRPC request as gRPC's HTTP mapping says.
        Abort::Http(status) => local_reply(
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            grpc,
            "fault filter abort",
        ),
        Abort::Grpc(code) => grpc_reply(code, "fault filter abort"),
    })
}

/// The first limit refusing this request: the Service's policies, then
/// the matched route's.
fn rate_limited(
    routes: &RouteSet,
    down: &Downstream,
    service: &ObjectRef,
    route: Option<&str>,
) -> Option<ratelimit::Refused> {
    if routes.limits.is_empty() {
        return None;
    }
    let now = Instant::now();
    let by_service = routes.limits.of_service(service);
    let by_route = route.map_or(&[][..], |r| routes.limits.of_route(r));
    by_service.iter().chain(by_route).find_map(|l| l.check(&down.client, now).err())
}

/// What the matched rule asks of the forwarding step.
struct Plan<'a> {
    /// The request's snapshot of the routes.
    routes: &'a RouteSet,
    /// The path match that matched (for `ReplacePrefixMatch`).
    path_match: Option<&'a PathMatch>,
    /// The rule's filters, then the backendRef's.
    filters: &'a [&'a Filters],
    /// `timeouts.backendRequest` (per attempt).
    backend_timeout: Option<std::time::Duration>,
    /// The rule's `retry`, and the budget its retries spend.
    retry: Option<(&'a RetryPolicy, &'a Budget)>,
}

fn timed_out(pending: &mut Pending, grpc: bool) -> Response<HttpBody> {
    http_of(pending).response_flags = "UT";
    local_reply(StatusCode::GATEWAY_TIMEOUT, grpc, "upstream request timeout")
}

async fn send_to_service(
    mut req: Request<Incoming>,
    down: &Downstream,
    state: &Arc<State>,
    pending: &mut Pending,
    target: &Target,
    plan: &Plan<'_>,
    grpc: bool,
) -> Response<HttpBody> {
    http_of(pending).backend = Some(target.name.clone());
    for f in plan.filters {
        apply_request_filters(&mut req, f, plan.path_match);
    }
    let endpoints = match service_endpoints(state, &target.service, target.port, target.subset.as_deref()) {
        Ok(e) => e,
        Err(why) => {
            http_of(pending).error = Some(why.clone());
            return local_reply(StatusCode::INTERNAL_SERVER_ERROR, grpc, &why);
        }
    };
    if endpoints.is_empty() {
        http_of(pending).response_flags = "UH";
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, grpc, "no healthy upstream");
    }
    // The DestinationRule's traffic policy of this backend (a subset's, or
    // the Service's): circuit breaking, then outlier detection per attempt.
    let policy = match &target.subset {
        Some(s) => s.policy.clone(),
        None => plan.routes.destinations.service_policy(&target.service),
    };
    if let Some(b) = policy.as_ref().and_then(|p| p.breaker.as_ref()) {
        let Some(permit) = b.admit().await else {
            http_of(pending).response_flags = "UO";
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, grpc, "upstream overflow (circuit breaker open)");
        };
        pending.permit = Some(permit);
    }
    let backend = Pool::new(endpoints, policy.as_ref().and_then(|p| p.outlier), target.name.clone());
    let retry = plan.retry.filter(|(p, _)| p.non_idempotent || retry::is_idempotent(req.method()));
    let mirrors: Vec<&Mirror> = plan.filters.iter().flat_map(|f| f.mirrors.iter()).collect();
    let upgrade = down.version == Version::Http1 && req.headers().contains_key(header::UPGRADE);
    if (retry.is_none() && mirrors.is_empty()) || upgrade {
        let (addr, identity) = backend.choose(state, &[]);
        let resp = send_to_endpoint(req, down, state, pending, addr, Some(identity), plan.backend_timeout, grpc).await;
        backend.observe(state, pending, addr, &resp);
        return resp;
    }
    // Retries and copies need the body again: hold it if it is small.
    let (parts, body) = req.into_parts();
    let held = if hyper::body::Body::is_end_stream(&body) {
        Some(Bytes::new())
    } else if hyper::body::Body::size_hint(&body).upper().is_some_and(|n| n <= MAX_BUFFERED_BODY) {
        match body.collect().await {
            Ok(b) => Some(b.to_bytes()),
            Err(e) => {
                http_of(pending).response_flags = "DC";
                http_of(pending).error = Some(format!("reading the request body: {e}"));
                return local_reply(StatusCode::BAD_REQUEST, grpc, "incomplete request body");
            }
        }
    } else {
        let req = Request::from_parts(parts, body);
        for m in &mirrors {
            state.telemetry.mirrored(mirror_name(m), mirror::Outcome::SkippedBody);
        }
        let (addr, identity) = backend.choose(state, &[]);
        let resp = send_to_endpoint(req, down, state, pending, addr, Some(identity), plan.backend_timeout, grpc).await;
        backend.observe(state, pending, addr, &resp);
        return resp;
    };
    let body = held.unwrap_or_default();
    pending.request_bytes.store(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let mut parts = parts;
    prepare_parts(&mut parts, down, state, grpc, false);
    for m in mirrors {
        mirror::copy(state, down, &parts, &body, m, rand::random());
    }
    let held = Held { parts, body, backend };
    send_held(&held, down, state, pending, plan.backend_timeout, retry, grpc).await
}

/// Largest request body held in memory so it can be retried or mirrored
/// (Linkerd's limit); a larger or unsized body is streamed once.
pub const MAX_BUFFERED_BODY: u64 = 64 * 1024;

/// A request the waypoint holds whole, to send more than once.
struct Held {
    parts: hyper::http::request::Parts,
    body: Bytes,
    backend: Pool,
}

/// The endpoints of the backend chosen for a request, and how their
/// outcomes are judged.
struct Pool {
    endpoints: Vec<(SocketAddr, SpiffeId)>,
    /// Their addresses, made once for every attempt's choice.
    addrs: Vec<SocketAddr>,
    /// `outlierDetection` of the backend, if any.
    outlier: Option<OutlierConfig>,
    /// The backend as records name it.
    name: Name,
}

impl Pool {
    fn new(endpoints: Vec<(SocketAddr, SpiffeId)>, outlier: Option<OutlierConfig>, name: Name) -> Self {
        let addrs = endpoints.iter().map(|(a, _)| *a).collect();
        Self { endpoints, addrs, outlier, name }
    }

    /// Picks an endpoint by peak EWMA among those not ejected, preferring
    /// ones not yet `tried`.
    fn choose(&self, state: &State, tried: &[SocketAddr]) -> (SocketAddr, SpiffeId) {
        let now = Instant::now();
        let healthy: std::borrow::Cow<'_, [SocketAddr]> = if self.outlier.is_some() {
            state.outliers.healthy(&self.addrs, now).into()
        } else {
            (&self.addrs[..]).into()
        };
        // The first attempt (the common case) allocates nothing here.
        let fresh: Vec<SocketAddr>;
        let candidates: &[SocketAddr] = if tried.is_empty() {
            &healthy
        } else {
            fresh = healthy.iter().copied().filter(|a| !tried.contains(a)).collect();
            if fresh.is_empty() {
                &healthy
            } else {
                &fresh
            }
        };
        let chosen = state.balancer.choose(candidates, rand::random(), rand::random(), now);
        self.endpoints.iter().find(|(a, _)| *a == chosen).cloned().unwrap_or_else(|| self.endpoints[0].clone())
    }

    /// Feeds an attempt's outcome to outlier detection.
    fn observe(&self, state: &State, pending: &mut Pending, addr: SocketAddr, resp: &Response<HttpBody>) {
        let Some(cfg) = &self.outlier else { return };
        let status = (!upstream_failed(http_of(pending).response_flags)).then(|| resp.status().as_u16());
        if let Some(time) = state.outliers.observe(addr, outlier::Outcome::of(status), cfg, &self.addrs, Instant::now())
        {
            state.telemetry.ejected(&self.name);
            tracing::info!(backend = %self.name, endpoint = %addr, seconds = time.as_secs(), "outlier detection ejected an endpoint");
            let mut info = ConnInfo::named(Direction::Outbound, state.me.id.clone(), state.me_name.clone());
            info.dst = Some(addr);
            info.dst_identity.clone_from(&pending.info.dst_identity);
            info.waypoint = Some(state.waypoint_name.clone());
            info.security = Security::MutualTls;
            let why = format!(
                "outlier detection ejected endpoint {addr} of {} for {} s after consecutive errors",
                self.name,
                time.as_secs()
            );
            state.telemetry.flows.ejection(&info, why);
        }
    }
}

fn mirror_name(m: &Mirror) -> &str {
    match &m.target {
        BackendTarget::Service { name, .. } => name,
        BackendTarget::Invalid(_) => "-",
    }
}

/// The endpoints (address of the target port, identity) of `service`'s
/// `port` (only those of `subset`, if given), or why the Service cannot be
/// used.
pub fn service_endpoints(
    state: &State,
    service: &ObjectRef,
    port: u16,
    subset: Option<&Subset>,
) -> Result<Vec<(SocketAddr, SpiffeId)>, String> {
    let reg = state.registry.borrow();
    let svc = reg.service(service).ok_or_else(|| format!("backend service {service} does not exist"))?;
    let port = svc
        .ports
        .iter()
        .find(|p| p.port == port)
        .ok_or_else(|| format!("backend service {service} has no port {port}"))?;
    Ok(svc
        .endpoints
        .iter()
        .filter_map(|e| reg.workload(e))
        .filter(|w| subset.is_none_or(|s| s.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))))
        .filter_map(|w| {
            let ip = w.ips.iter().find(|ip| ip.is_ipv4())?;
            Some((SocketAddr::new(*ip, port.target_port), w.identity.clone()))
        })
        .collect())
}

/// Sends a held request, retrying on another endpoint while `retry` allows.
async fn send_held(
    held: &Held,
    down: &Downstream,
    state: &Arc<State>,
    pending: &mut Pending,
    timeout: Option<std::time::Duration>,
    retry: Option<(&RetryPolicy, &Budget)>,
    grpc: bool,
) -> Response<HttpBody> {
    if let Some((_, budget)) = retry {
        budget.request(Instant::now());
    }
    let mut tried = Vec::new();
    let mut retries = 0;
    loop {
        let (addr, identity) = held.backend.choose(state, &tried);
        tried.push(addr);
        let body = HttpBody::new(Full::new(held.body.clone()).map_err(|never| match never {}));
        let req = Request::from_parts(held.parts.clone(), body);
        let resp = exchange(req, None, down, state, pending, addr, Some(identity), timeout, grpc).await;
        held.backend.observe(state, pending, addr, &resp);
        let Some((p, budget)) = retry else { return resp };
        if !retryable(p, &resp, http_of(pending).response_flags, grpc) {
            return resp;
        }
        let route = http_of(pending).route.clone().unwrap_or_else(|| "-".into());
        if retries >= p.attempts {
            http_of(pending).response_flags = "URX";
            return resp;
        }
        if !budget.try_retry(Instant::now()) {
            state.telemetry.retried(&route, "budget_exhausted");
            http_of(pending).response_flags = "URX";
            return resp;
        }
        drop(resp);
        retries += 1;
        state.telemetry.retried(&route, "retried");
        let http = http_of(pending);
        http.retries = u8::try_from(retries).unwrap_or(u8::MAX);
        // A delay injected before the first attempt stays on the record.
        http.response_flags = if http.response_flags.starts_with("DI") { "DI" } else { "-" };
        http.error = None;
        tokio::time::sleep(retry::backoff(p.backoff, retries, rand::random())).await;
    }
}

/// Whether the waypoint's own flag says the attempt got no response: a
/// connect failure, a reset before the response or a per-try timeout.
fn upstream_failed(flag: &str) -> bool {
    matches!(flag, "UF" | "UR" | "UT")
}

/// Whether an attempt's outcome is one `p` retries: a connect failure, a
/// reset before the response or a per-try timeout (the waypoint's own
/// `UF`/`UR`/`UT`), a status in `codes`, or a gRPC status in `grpc_codes`.
fn retryable(p: &RetryPolicy, resp: &Response<HttpBody>, flag: &str, grpc: bool) -> bool {
    upstream_failed(flag)
        || p.codes.contains(&resp.status().as_u16())
        || (grpc
            && resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
                .is_some_and(|c| p.grpc_codes.contains(&c)))
}

pub(crate) fn apply_request_filters(req: &mut Request<Incoming>, f: &Filters, path_match: Option<&PathMatch>) {
    if let Some(m) = &f.request_headers {
        filters::modify_headers(req.headers_mut(), m);
    }
    let Some(rw) = &f.rewrite else { return };
    if let Some(host) = &rw.hostname {
        if let Ok(v) = HeaderValue::try_from(host.as_str()) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    if let Some(pm) = &rw.path {
        let new_path = filters::rewrite_path(req.uri().path(), path_match, pm);
        let pq = match req.uri().query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        let mut b = Uri::builder();
        if let (Some(s), Some(a)) = (req.uri().scheme(), req.uri().authority()) {
            b = b.scheme(s.clone()).authority(a.clone());
        }
        if let Ok(uri) = b.path_and_query(pq).build() {
            *req.uri_mut() = uri;
        }
    }
}

/// Streams `req` to one endpoint (no retry: the body is sent as it comes).
#[allow(clippy::too_many_arguments)] // one request's facts, passed once
async fn send_to_endpoint(
    mut req: Request<Incoming>,
    down: &Downstream,
    state: &Arc<State>,
    pending: &mut Pending,
    addr: SocketAddr,
    identity: Option<SpiffeId>,
    timeout: Option<std::time::Duration>,
    grpc: bool,
) -> Response<HttpBody> {
    // HTTP/1.1 upgrades (WebSocket): the connection is handed over once
    // both sides agreed (101), and bytes are copied both ways.
    let upgrade = (down.version == Version::Http1 && req.headers().contains_key(header::UPGRADE))
        .then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    prepare_parts(&mut parts, down, state, grpc, upgrade.is_some());
    let body = HttpBody::new(Counted::new(body.map_err(Into::into).boxed(), pending.request_bytes.clone()));
    exchange(Request::from_parts(parts, body), upgrade, down, state, pending, addr, identity, timeout, grpc).await
}

/// One attempt: `req` to the endpoint `addr`, its response or the
/// waypoint's own answer (`503 UF/UR`, `504 UT`), with the flag recorded.
#[allow(clippy::too_many_arguments)] // one request's facts, passed once
async fn exchange(
    req: Request<HttpBody>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    down: &Downstream,
    state: &Arc<State>,
    pending: &mut Pending,
    addr: SocketAddr,
    identity: Option<SpiffeId>,
    timeout: Option<std::time::Duration>,
    grpc: bool,
) -> Response<HttpBody> {
    let identity = identity.or_else(|| state.registry.borrow().workload_by_ip(addr.ip()).map(|w| w.identity.clone()));
    let Some(identity) = identity else {
        http_of(pending).response_flags = "UH";
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, grpc, "endpoint is not a mesh workload");
    };
    http_of(pending).upstream = Some(addr);
    pending.info.dst = Some(addr);
    pending.info.dst_identity = Some(identity.name());
    if let Some(t) = pending.trace.as_mut() {
        t.upstream_started.get_or_insert_with(Instant::now);
    }
    let in_flight = state.balancer.start(addr);
    let sent = state.upstreams.send(addr, &identity, down.version, req);
    let result = match timeout {
        Some(limit) => match tokio::time::timeout(limit, sent).await {
            Ok(r) => r,
            Err(_) => return timed_out(pending, grpc),
        },
        None => sent.await,
    };
    match result {
        Ok((mut resp, latency)) => {
            in_flight.finish(latency);
            if let (Some(client_side), StatusCode::SWITCHING_PROTOCOLS) = (upgrade, resp.status()) {
                let upstream_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    if let (Ok(c), Ok(u)) = (client_side.await, upstream_side.await) {
                        let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    }
                });
            }
            resp
        }
        Err(e) => {
            let flag = e.flag();
            http_of(pending).response_flags = flag;
            http_of(pending).error = Some(e.to_string());
            tracing::debug!(upstream = %addr, error = %e, "upstream request failed");
            local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                grpc,
                "upstream connect error or disconnect/reset before headers",
            )
        }
    }
}

/// The request as the endpoint gets it: hop-by-hop headers dropped, the
/// client's identity in `x-forwarded-client-cert` (any value the client
/// sent is replaced).
fn prepare_parts(parts: &mut hyper::http::request::Parts, down: &Downstream, state: &State, grpc: bool, upgrade: bool) {
    for h in HOP_BY_HOP {
        if upgrade && (h == "connection" || h == "upgrade") {
            continue;
        }
        parts.headers.remove(h);
    }
    // `te: trailers` is end-to-end for gRPC over HTTP/2 (RFC 9113 §8.2.2).
    if down.version == Version::Http2 && grpc {
        parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let xfcc = format!("By={};URI={}", state.me_identity, down.client);
    if let Ok(v) = HeaderValue::try_from(xfcc) {
        parts.headers.insert(FORWARDED_CLIENT, v);
    }
    if down.version == Version::Http1 {
        // Origin form on HTTP/1.1; Host carries the authority.
        if let Some(a) = parts.uri.authority().cloned() {
            if !parts.headers.contains_key(header::HOST) {
                if let Ok(v) = HeaderValue::try_from(a.as_str()) {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }
        if let Some(pq) = parts.uri.path_and_query().cloned() {
            if let Ok(uri) = Uri::builder().path_and_query(pq).build() {
                parts.uri = uri;
            }
        }
    } else if parts.uri.authority().is_none() {
        // HTTP/2 needs :scheme and :authority.
        let auth = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map_or_else(|| down.target.to_string(), str::to_owned);
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        if let Ok(uri) = Uri::builder().scheme("http").authority(auth).path_and_query(pq).build() {
            parts.uri = uri;
        }
    }
}

fn empty() -> HttpBody {
    HttpBody::new(Empty::<Bytes>::new().map_err(|never| match never {}))
}

/// A gRPC trailers-only response with `grpc-status: code`.
pub fn grpc_reply(code: u32, message: &str) -> Response<HttpBody> {
    let mut r = Response::new(empty());
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    r.headers_mut().insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::try_from(message) {
        r.headers_mut().insert("grpc-message", v);
    }
    r
}

/// A response the waypoint makes itself; for gRPC a trailers-only response
/// with the matching `grpc-status` (gRPC's HTTP mapping).
pub fn local_reply(status: StatusCode, grpc: bool, message: &str) -> Response<HttpBody> {
    if grpc {
        let code = match status {
            StatusCode::GATEWAY_TIMEOUT => 4,      // DEADLINE_EXCEEDED
            StatusCode::NOT_FOUND => 12,           // UNIMPLEMENTED
            StatusCode::SERVICE_UNAVAILABLE => 14, // UNAVAILABLE
            StatusCode::TOO_MANY_REQUESTS => 8,    // RESOURCE_EXHAUSTED
            StatusCode::FORBIDDEN => 7,            // PERMISSION_DENIED
            StatusCode::UNAUTHORIZED => 16,        // UNAUTHENTICATED
            StatusCode::BAD_REQUEST => 3,          // INVALID_ARGUMENT
            _ => 13,                               // INTERNAL
        };
        return grpc_reply(code, message);
    }
    let mut r =
        Response::new(HttpBody::new(Full::new(Bytes::from(format!("{message}\n"))).map_err(|never| match never {})));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}
