//! L7 authentication and authorization of one request at the waypoint,
//! before routing (Envoy's `jwt_authn` then `rbac` filters in Istio's
//! waypoint): the JWT check of the `RequestAuthentication`s attached to
//! the request's targets (401 when a token fails), then
//! [`crate::policy::l7::authorize_request`] over the `AuthorizationPolicy`s
//! attached to them (403 `RBAC: access denied`, gRPC `PERMISSION_DENIED`).
//! The decision goes into the request's flow record (`policy` block:
//! deciding policy and rule, audit, dry-run).
//!
//! The client is the original one: its identity is the HBONE peer
//! certificate's, its address the tunnel's. The token is removed from the
//! forwarded request unless `forwardOriginalToken`; `outputClaimToHeaders`
//! and `outputPayloadToHeader` are added.

use std::net::SocketAddr;

use hyper::{
    body::Incoming,
    header::{HeaderMap, HeaderValue, WWW_AUTHENTICATE},
    Request, Response, StatusCode,
};

use super::{forward::local_reply, pool::HttpBody, routes::RouteSet, telemetry::Pending, Downstream, State};
use crate::{
    flows::PolicyMark,
    identity::SpiffeId,
    policy::{
        l7::{self, authn::Location, Authenticated, RequestFacts},
        Decision, PeerIdentity,
    },
    registry::ObjectRef,
};

/// Checks `req`; `Some(response)` when it is refused. Strips or adds the
/// headers its `RequestAuthentication` says.
pub fn check(
    routes: &RouteSet,
    req: &mut Request<Incoming>,
    down: &Downstream,
    state: &State,
    pending: &mut Pending,
    grpc: bool,
) -> Option<Response<HttpBody>> {
    let set = &routes.authz;
    if set.is_empty() {
        return None;
    }
    let service = down.service.as_ref().map(|s| (s.namespace.as_str(), s.name.as_str()));
    let waypoint = (state.waypoint.namespace.as_str(), state.waypoint.name.as_str());
    let auth = match authenticate(set, service, waypoint, req, state) {
        Ok(a) => a,
        Err(message) => {
            let http = pending.info.http.get_or_insert_with(Box::default);
            http.error = Some(message.clone());
            let mut resp = local_reply(StatusCode::UNAUTHORIZED, grpc, &message);
            let realm =
                format!("Bearer realm=\"http://{}{}\", error=\"invalid_token\"", http.authority, req.uri().path());
            if let Ok(v) = HeaderValue::try_from(realm) {
                resp.headers_mut().insert(WWW_AUTHENTICATE, v);
            }
            return Some(resp);
        }
    };
    let authority = pending.info.http.as_ref().map_or("", |h| h.authority.as_str());
    let host: std::borrow::Cow<'_, str> = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
        authority.to_ascii_lowercase().into()
    } else {
        authority.into()
    };
    let facts = RequestFacts {
        service,
        waypoint,
        src_ip: down.peer.ip(),
        peer: Some(&down.identity),
        dst: down.target,
        method: req.method().as_str(),
        host: &host,
        path: req.uri().path(),
        headers: req.headers(),
        auth: auth.as_ref(),
        http: true,
    };
    let decision = l7::authorize_request(set, &facts);
    pending.info.policy = mark(&decision);
    if !decision.is_allowed() {
        pending.info.http.get_or_insert_with(Box::default).error = Some(denial_text(&decision));
        return Some(local_reply(StatusCode::FORBIDDEN, grpc, "RBAC: access denied"));
    }
    if let Some(a) = auth {
        rewrite_for_upstream(req, &a);
    }
    None
}

/// Decides a connection the waypoint passes through as L4 (not HTTP):
/// the same policies, with no HTTP attributes (an ALLOW rule that needs
/// them does not match). `Err` carries the denial's text.
pub fn check_connection(
    state: &State,
    peer: SocketAddr,
    client: &SpiffeId,
    target: SocketAddr,
    service: Option<&ObjectRef>,
) -> (PolicyMark, Result<(), String>) {
    let routes = state.routes.borrow().clone();
    if routes.authz.is_empty() {
        return (PolicyMark::default(), Ok(()));
    }
    let identity = PeerIdentity::new(client.trust_domain(), client.namespace(), client.service_account());
    let facts = RequestFacts {
        service: service.map(|s| (s.namespace.as_str(), s.name.as_str())),
        waypoint: (state.waypoint.namespace.as_str(), state.waypoint.name.as_str()),
        src_ip: peer.ip(),
        peer: Some(&identity),
        dst: target,
        method: "",
        host: "",
        path: "",
        headers: &HeaderMap::new(),
        auth: None,
        http: false,
    };
    let decision = l7::authorize_request(&routes.authz, &facts);
    let verdict = if decision.is_allowed() { Ok(()) } else { Err(denial_text(&decision)) };
    (mark(&decision), verdict)
}

/// The flow record's account of a decision.
fn mark(decision: &Decision) -> PolicyMark {
    PolicyMark {
        denied: !decision.is_allowed(),
        audited: decision.audited.is_some(),
        policy: decision.policy.clone(),
        rule: decision.rule,
        audit_policy: decision.audited.as_ref().map(|a| a.policy.clone()),
        dry_run: decision.dry_run.as_ref().map(crate::authz::dry_run_text),
        closed_by_policy: None,
    }
}

fn denial_text(decision: &Decision) -> String {
    match &decision.policy {
        Some(p) => format!("denied by AuthorizationPolicy {p} ({})", decision.reason.name()),
        None => format!("denied ({})", decision.reason.name()),
    }
}

/// The request's verified token, `Ok(None)` without one, or the 401 text.
fn authenticate(
    set: &l7::WaypointPolicies,
    service: Option<(&str, &str)>,
    waypoint: (&str, &str),
    req: &Request<Incoming>,
    state: &State,
) -> Result<Option<Authenticated>, String> {
    let authns = match set.authns_for(service, waypoint) {
        Ok(a) if a.is_empty() => return Ok(None),
        Ok(a) => a,
        Err(rejected) => {
            let has_token = req.headers().contains_key(hyper::header::AUTHORIZATION)
                || req.uri().query().is_some_and(|q| q.split('&').any(|p| p.starts_with("access_token=")));
            if has_token {
                return Err(format!("Jwt verification fails: RequestAuthentication {rejected} is invalid"));
            }
            return Ok(None);
        }
    };
    let keys = state.jwks.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    l7::authn::authenticate(&authns, req.headers(), req.uri().query(), |uri| keys.get(uri).map(|k| &**k))
        .map_err(|e| e.to_string())
}

/// Removes the token (unless forwarded) and adds the claim headers.
fn rewrite_for_upstream(req: &mut Request<Incoming>, a: &Authenticated) {
    if !a.forward {
        match &a.location {
            Location::Header(name, _) => {
                req.headers_mut().remove(name);
            }
            // A token in the query or a cookie stays: removing it would
            // change the URL or other cookies the backend reads.
            Location::Param(_) | Location::Cookie(_) => {}
        }
    }
    for (name, value) in &a.add_headers {
        if let Ok(v) = HeaderValue::try_from(value.as_str()) {
            req.headers_mut().insert(name.clone(), v);
        }
    }
}
