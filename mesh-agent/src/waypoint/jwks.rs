//! The JWKS of `RequestAuthentication` rules that name a `jwksUri`,
//! fetched by the waypoint: `http://` URLs inside the cluster (plain HTTP/1.1,
//! [`FETCH_TIMEOUT`]) and `file://` paths (a mounted Secret or `ConfigMap`).
//!
//! One task follows the routes in force: a new URI is fetched at once, a
//! fetched one again every [`REFRESH`] (key rotation), a failed one every
//! [`RETRY`]. Until a URI's first fetch succeeds, every token of its
//! issuer fails (401): fail closed. A later failure keeps the last good keys.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::routes::RouteSet;

/// How often fetched keys are fetched again.
pub const REFRESH: Duration = Duration::from_mins(5);
/// How soon a failed fetch is tried again.
pub const RETRY: Duration = Duration::from_secs(2);
/// A fetch's time limit.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest JWKS read.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Key sets by URI.
pub type JwksCache = Arc<RwLock<HashMap<String, Arc<JwkSet>>>>;

/// Keeps `cache` filled for the URIs of the routes in force, until `stop`.
pub async fn run(mut routes: watch::Receiver<Arc<RouteSet>>, cache: JwksCache, stop: CancellationToken) {
    let mut next: HashMap<String, Instant> = HashMap::new();
    loop {
        let uris = routes.borrow_and_update().authz.jwks_uris();
        next.retain(|u, _| uris.contains(u));
        cache.write().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|u, _| uris.contains(u));
        let now = Instant::now();
        for uri in &uris {
            if next.get(uri).is_some_and(|at| *at > now) {
                continue;
            }
            match fetch(uri).await {
                Ok(set) => {
                    tracing::info!(uri, keys = set.keys.len(), "JWKS fetched");
                    cache.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(uri.clone(), Arc::new(set));
                    next.insert(uri.clone(), now + REFRESH);
                }
                Err(e) => {
                    tracing::warn!(
                        uri,
                        error = format!("{e:#}"),
                        "cannot fetch the JWKS; tokens of its issuer fail until it can"
                    );
                    next.insert(uri.clone(), now + RETRY);
                }
            }
        }
        let wake = next.values().min().map_or(REFRESH, |at| at.saturating_duration_since(Instant::now()));
        tokio::select! {
            () = stop.cancelled() => return,
            r = routes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(wake) => {}
        }
    }
}

/// Fetches and parses one JWKS.
pub async fn fetch(uri: &str) -> anyhow::Result<JwkSet> {
    let body = tokio::time::timeout(FETCH_TIMEOUT, read(uri)).await.context("timed out")??;
    anyhow::ensure!(body.len() <= MAX_JWKS_BYTES, "the JWKS is over {MAX_JWKS_BYTES} bytes");
    let set: JwkSet = serde_json::from_slice(&body).context("not a JWKS")?;
    anyhow::ensure!(!set.keys.is_empty(), "the JWKS has no keys");
    Ok(set)
}

async fn read(uri: &str) -> anyhow::Result<Bytes> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(tokio::fs::read(path).await.with_context(|| format!("reading {path}"))?.into());
    }
    let parsed: hyper::Uri = uri.parse().context("not a URL")?;
    let host = parsed.host().context("no host in the URL")?.trim_matches(['[', ']']).to_owned();
    let port = parsed.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let authority = parsed.authority().map(ToString::to_string).unwrap_or(host);
    let req = hyper::Request::get(parsed.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    anyhow::ensure!(resp.status().is_success(), "HTTP status {}", resp.status());
    Ok(http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the body: {e}"))?
        .to_bytes())
}
