//! Request mirroring (`RequestMirror`): a copy of a request goes to a shadow
//! Service, fire and forget. The copy's authority gets `-shadow` appended
//! to its host (Istio's and Envoy's convention, so the shadow can tell
//! copies from real traffic); its response is read and dropped.
//!
//! A shadow never slows or fails the request it copies: the copy runs in its
//! own task, at most [`MAX_IN_FLIGHT`] copies are in flight per waypoint
//! (more are dropped and counted, so a slow shadow cannot pile up memory),
//! and each copy is abandoned after [`SHADOW_TIMEOUT`]. Only requests whose
//! body the waypoint holds (empty, or at most
//! [`super::forward::MAX_BUFFERED_BODY`]) are copied; a streamed body is
//! sent once, to the primary, and the skip is counted.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{header, http::request::Parts, Request, Uri};
use tokio::sync::Semaphore;

use super::{
    forward::service_endpoints,
    pool::{HttpBody, Version},
    routes::model::{backend_port, BackendTarget, Mirror},
    Downstream, State,
};

/// Copies in flight per waypoint, at most.
pub const MAX_IN_FLIGHT: usize = 512;
/// A copy still unanswered after this is abandoned.
pub const SHADOW_TIMEOUT: Duration = Duration::from_secs(10);

/// The waypoint's shadow traffic.
#[derive(Debug)]
pub struct Shadows {
    permits: Arc<Semaphore>,
}

impl Default for Shadows {
    fn default() -> Self {
        Self { permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)) }
    }
}

/// What became of one copy, as the metric labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Sent and answered (any status).
    Sent,
    /// Could not be delivered, or timed out.
    Failed,
    /// Too many copies in flight.
    Dropped,
    /// The request body is streamed, not held.
    SkippedBody,
    /// The shadow backend does not resolve or has no endpoint.
    NoBackend,
}

impl Outcome {
    /// The `outcome` label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Failed => "failed",
            Outcome::Dropped => "dropped",
            Outcome::SkippedBody => "skipped_body",
            Outcome::NoBackend => "no_backend",
        }
    }
}

/// `host[:port]` with `-shadow` appended to the host.
#[must_use]
pub fn shadow_authority(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((host, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (host.ends_with(']') || !host.contains(':')) =>
        {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    }
}

/// Sends a copy of the request (`parts` as forwarded, `body` held) to the
/// shadow of `mirror`, if the `per_million` draw `roll` selects it.
pub fn copy(state: &Arc<State>, down: &Downstream, parts: &Parts, body: &Bytes, mirror: &Mirror, roll: u32) {
    if roll % 1_000_000 >= mirror.per_million {
        return;
    }
    let BackendTarget::Service { id, port, subset, name } = &mirror.target else {
        state.telemetry.mirrored("-", Outcome::NoBackend);
        return;
    };
    let version = down.version;
    let port = backend_port(*port, down.target.port());
    let endpoints = match service_endpoints(state, id, port, subset.as_deref()) {
        Ok(e) if !e.is_empty() => e,
        _ => return state.telemetry.mirrored(name, Outcome::NoBackend),
    };
    let Ok(permit) = state.shadows.permits.clone().try_acquire_owned() else {
        return state.telemetry.mirrored(name, Outcome::Dropped);
    };
    let addrs: Vec<_> = endpoints.iter().map(|(a, _)| *a).collect();
    let chosen = state.balancer.choose(&addrs, rand::random(), rand::random(), std::time::Instant::now());
    let Some((addr, identity)) = endpoints.into_iter().find(|(a, _)| *a == chosen) else { return };
    let req = shadow_request(parts, body, version);
    let (state, name) = (state.clone(), name.clone());
    tokio::spawn(async move {
        let _permit = permit;
        let sent = async {
            let (resp, _) = state.upstreams.send(addr, &identity, version, req).await.ok()?;
            resp.into_body().collect().await.ok()
        };
        let outcome = match tokio::time::timeout(SHADOW_TIMEOUT, sent).await {
            Ok(Some(_)) => Outcome::Sent,
            _ => Outcome::Failed,
        };
        state.telemetry.mirrored(&name, outcome);
    });
}

fn shadow_request(parts: &Parts, body: &Bytes, version: Version) -> Request<HttpBody> {
    let mut parts = parts.clone();
    match version {
        Version::Http1 => {
            if let Some(h) = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
                if let Ok(v) = header::HeaderValue::try_from(shadow_authority(h)) {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }
        Version::Http2 => {
            let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
            if let Some(a) = parts.uri.authority() {
                if let Ok(uri) =
                    Uri::builder().scheme("http").authority(shadow_authority(a.as_str())).path_and_query(pq).build()
                {
                    parts.uri = uri;
                }
            }
            parts.headers.remove(header::HOST);
        }
    }
    let body = HttpBody::new(Full::new(body.clone()).map_err(|never| match never {}));
    Request::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shadow_host_gets_a_suffix_and_keeps_its_port() {
        assert_eq!(shadow_authority("api.demo:80"), "api.demo-shadow:80");
        assert_eq!(shadow_authority("api"), "api-shadow");
        assert_eq!(shadow_authority("10.96.0.20:80"), "10.96.0.20-shadow:80");
        assert_eq!(shadow_authority("[fd00::1]:80"), "[fd00::1]-shadow:80");
    }
}
