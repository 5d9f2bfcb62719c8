//! Upstream connections of the waypoint: HTTP over HBONE to each endpoint,
//! as the waypoint's own identity, pooled per endpoint.
//!
//! Each upstream connection is one HTTP/2 stream of a pooled mTLS tunnel to
//! the endpoint's node-side tunnel port (`CONNECT ip:port`, the peer's SPIFFE
//! ID checked, [`crate::proxy::hbone::Mesh`]), with hyper's HTTP client on
//! it. HTTP/2 upstreams share one client connection per endpoint
//! (multiplexed); HTTP/1.1 keeps idle connections per endpoint and returns
//! one to the pool only when its response body has been read to the end
//! (a response abandoned half-way closes its connection).

use std::{
    collections::HashMap,
    error::Error as StdError,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::h2io::H2Io;
use crate::{
    identity::SpiffeId,
    proxy::{
        hbone::{Mesh, TunnelError},
        Pod,
    },
};

/// Boxed error of request and response bodies.
pub type BoxError = Box<dyn StdError + Send + Sync>;
/// The body type the waypoint passes around.
pub type HttpBody = BoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;
/// How long a pooled HTTP/1.1 connection may take to become ready.
const READY_WAIT: Duration = Duration::from_millis(200);

/// Which HTTP version to speak upstream (the client's, so gRPC stays HTTP/2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (prior knowledge).
    Http2,
}

/// Why an upstream request failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The tunnel to the endpoint could not be opened.
    #[error("upstream tunnel to {addr}: {source}")]
    Tunnel {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: TunnelError,
    },
    /// HTTP failed (handshake, or the request).
    #[error("upstream {addr}: {source}")]
    Http {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Envoy's response flag for this failure.
    #[must_use]
    pub fn flag(&self) -> &'static str {
        match self {
            UpstreamError::Tunnel { .. } => "UF",
            UpstreamError::Http { .. } => "UR",
        }
    }
}

/// The waypoint's upstream connections.
pub struct Upstreams {
    mesh: Arc<Mesh>,
    me: Arc<Pod>,
    h1: Mutex<HashMap<SocketAddr, Vec<http1::SendRequest<HttpBody>>>>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<HttpBody>>>,
}

impl Upstreams {
    /// Upstreams opened from `me` (the waypoint's own pod and identity).
    #[must_use]
    pub fn new(mesh: Arc<Mesh>, me: Arc<Pod>) -> Self {
        Self { mesh, me, h1: Mutex::new(HashMap::new()), h2: Mutex::new(HashMap::new()) }
    }

    /// Sends `req` to `addr` (served by `identity`), speaking `version`;
    /// returns the response and the time from sending the request to its
    /// response head (the endpoint's latency, without any connection set-up,
    /// for the balancer).
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        identity: &SpiffeId,
        version: Version,
        req: Request<HttpBody>,
    ) -> Result<(Response<HttpBody>, Duration), UpstreamError> {
        match version {
            Version::Http2 => {
                let mut sender = self.h2_sender(addr, identity).await?;
                let sent = Instant::now();
                let resp = sender.send_request(req).await.map_err(|source| UpstreamError::Http { addr, source })?;
                Ok((resp.map(|b| HttpBody::new(ErrInto(b))), sent.elapsed()))
            }
            Version::Http1 => {
                let mut sender = self.h1_sender(addr, identity).await?;
                let sent = Instant::now();
                let resp = sender.send_request(req).await.map_err(|source| UpstreamError::Http { addr, source })?;
                let latency = sent.elapsed();
                let pool = self.clone();
                Ok((resp.map(|body| HttpBody::new(ReturnOnEnd { body, slot: Some((pool, addr, sender)) })), latency))
            }
        }
    }

    async fn tunnel(&self, addr: SocketAddr, identity: &SpiffeId) -> Result<TokioIo<H2Io>, UpstreamError> {
        let t = self
            .mesh
            .connect(&self.me, &self.me.identity, addr, identity, None)
            .await
            .map_err(|source| UpstreamError::Tunnel { addr, source })?;
        Ok(TokioIo::new(H2Io::new(t.stream)))
    }

    async fn h2_sender(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
    ) -> Result<http2::SendRequest<HttpBody>, UpstreamError> {
        if let Some(s) = self.h2.lock().expect("pool lock").get(&addr) {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let io = self.tunnel(addr, identity).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(|source| UpstreamError::Http { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        self.h2.lock().expect("pool lock").insert(addr, sender.clone());
        Ok(sender)
    }

    async fn h1_sender(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
    ) -> Result<http1::SendRequest<HttpBody>, UpstreamError> {
        loop {
            let idle = self.h1.lock().expect("pool lock").get_mut(&addr).and_then(Vec::pop);
            let Some(mut s) = idle else { break };
            if s.is_closed() {
                continue;
            }
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, s.ready()).await {
                return Ok(s);
            }
        }
        let io = self.tunnel(addr, identity).await?;
        let (sender, conn) =
            http1::Builder::new().handshake(io).await.map_err(|source| UpstreamError::Http { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    fn give_back(&self, addr: SocketAddr, sender: http1::SendRequest<HttpBody>) {
        if sender.is_closed() {
            return;
        }
        let mut pool = self.h1.lock().expect("pool lock");
        let idle = pool.entry(addr).or_default();
        if idle.len() < MAX_IDLE_PER_ENDPOINT {
            idle.push(sender);
        }
    }

    /// Forgets every pooled connection to endpoints not in `keep` (they left
    /// the registry: a request never goes to an endpoint that is gone).
    pub fn retain(&self, keep: &dyn Fn(&SocketAddr) -> bool) {
        self.h1.lock().expect("pool lock").retain(|a, _| keep(a));
        self.h2.lock().expect("pool lock").retain(|a, _| keep(a));
    }

    /// Pooled connections: (HTTP/1.1 idle, HTTP/2).
    #[must_use]
    pub fn counts(&self) -> (usize, usize) {
        let h1 = self.h1.lock().expect("pool lock").values().map(Vec::len).sum();
        let h2 = self.h2.lock().expect("pool lock").len();
        (h1, h2)
    }
}

/// A response body that returns its HTTP/1.1 connection to the pool once
/// read to the end.
///
/// "The end" is the body reporting end of stream after a frame as well as a
/// final `None`: a consumer that knows the length (hyper's server writing a
/// `content-length` response) stops polling after the last byte and drops
/// the body, and the connection must go back to the pool then too, or every
/// request would open (and reset) a tunnel stream of its own.
struct ReturnOnEnd {
    body: Incoming,
    slot: Option<(Arc<Upstreams>, SocketAddr, http1::SendRequest<HttpBody>)>,
}

impl ReturnOnEnd {
    fn give_back(&mut self) {
        if let Some((pool, addr, sender)) = self.slot.take() {
            pool.give_back(addr, sender);
        }
    }
}

impl Body for ReturnOnEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.give_back(),
            _ => {}
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ReturnOnEnd {
    fn drop(&mut self) {
        // Dropped with the whole body read (or none to read): the connection
        // is clean. Dropped mid-body: it is not, and goes with the body.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}

/// Any body with its error boxed.
pub struct ErrInto<B>(pub B);

impl<B> Body for ErrInto<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}
