//! The HBONE client: mTLS + HTTP/2 `CONNECT` from a source pod to the
//! tunnel port of a destination pod, with pooled connections.
//!
//! A tunnel connection is opened from inside the source pod's namespace
//! (with the agent's mark), presents the source workload's certificate,
//! checks that the server is the destination workload it meant to reach
//! (SPIFFE ID, after chain verification), and carries one HTTP/2 stream per
//! proxied connection, `CONNECT <original destination ip:port>`.
//! Connections are pooled per (source identity, destination IP, destination
//! identity) and tagged with the generation of the source certificate, so
//! after a rotation new streams go over a new connection with the new
//! certificate while old streams finish on the old one.
//!
//! Each pooled connection keeps a [`TcpProbe`] on its TCP socket, so the
//! flows it carries can report the tunnel's RTT and retransmits; the
//! connection's driver task releases it when the connection ends.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use std::sync::atomic::{AtomicBool, Ordering};

use crate::trace::context::ConnTrace;
use bytes::Bytes;
use hyper::{Method, Request, StatusCode, Uri};
use mesh_common::PORT_TUNNEL;
use rustls::{pki_types::ServerName, ClientConfig};

use super::{
    h2splice::H2Stream,
    handshakes::{HandshakeSlots, PER_SOURCE},
    sockets,
    tcp_health::TcpProbe,
    Pod,
};
use crate::identity::{bundle::TrustBundle, certs::CertManager, tls, SpiffeId};

/// Time to obtain a source certificate before failing the connection.
const CERT_WAIT: Duration = Duration::from_secs(5);
/// Time for the TCP + TLS + HTTP/2 set-up of a tunnel connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 flow-control windows: large, so one stream can fill a fast link.
pub const STREAM_WINDOW: u32 = 16 * 1024 * 1024;
/// Connection-level window.
pub const CONN_WINDOW: u32 = 64 * 1024 * 1024;
/// Largest HTTP/2 frame.
pub const MAX_FRAME: u32 = 256 * 1024;
/// Header carrying the reason of a refused CONNECT.
pub const REASON_HEADER: &str = "heddle-reason";

/// Why a tunnel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// No certificate for the source workload.
    #[error("source certificate: {0}")]
    Cert(#[from] crate::identity::certs::CertError),
    /// Socket trouble reaching the destination.
    #[error("tunnel connect: {0}")]
    Connect(#[from] sockets::SocketError),
    /// TLS handshake failed.
    #[error("tunnel TLS handshake with {addr}: {message}")]
    Tls {
        /// Destination tunnel address.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
    /// The server is not who we meant to reach.
    #[error("tunnel to {addr}: {source}")]
    Identity {
        /// Destination tunnel address.
        addr: SocketAddr,
        /// The mismatch.
        #[source]
        source: tls::TlsError,
    },
    /// HTTP/2 failed.
    #[error("tunnel HTTP/2: {0}")]
    Http(#[from] h2::Error),
    /// The destination agent refused the CONNECT.
    #[error("destination refused the tunnel ({status}): {reason}")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// Reason given.
        reason: String,
    },
    /// Set-up took too long.
    #[error("tunnel set-up timed out")]
    Timeout,
    /// TLS configuration problem.
    #[error(transparent)]
    Config(#[from] tls::TlsError),
}

impl TunnelError {
    /// Short stable reason for flows and metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            TunnelError::Cert(e) => e.reason(),
            TunnelError::Connect(e) => e.reason(),
            TunnelError::Tls { .. } => "tls_handshake",
            TunnelError::Identity { .. } => "peer_identity",
            TunnelError::Http(_) => "http2",
            TunnelError::Refused { status, .. } if *status == StatusCode::FORBIDDEN => "denied",
            TunnelError::Refused { .. } => "refused",
            TunnelError::Timeout => "timeout",
            TunnelError::Config(_) => "tls_config",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    src: SpiffeId,
    dst_ip: IpAddr,
    dst_id: SpiffeId,
}

struct Pooled {
    sender: h2::client::SendRequest<Bytes>,
    probe: Option<Arc<TcpProbe>>,
    generation: u64,
    /// When the destination's certificate expires: no new stream after
    /// (none, if it could not be read: no new stream at all).
    peer_not_after: Option<SystemTime>,
    /// Set by the connection's driver task when the connection ends.
    closed: Arc<AtomicBool>,
}

/// A tunnelled stream and what it rides on.
pub struct Tunnelled {
    /// The HTTP/2 stream.
    pub stream: H2Stream,
    /// The tunnel connection's TCP socket (shared with its other streams).
    pub probe: Option<Arc<TcpProbe>>,
    /// The TLS handshake time, when this stream needed a new tunnel.
    pub handshake: Option<Duration>,
}

/// A tunnel connection ready for a request.
struct Opened {
    sender: h2::client::SendRequest<Bytes>,
    probe: Option<Arc<TcpProbe>>,
    handshake: Option<Duration>,
    /// When the destination's certificate expires.
    peer_not_after: Option<SystemTime>,
    /// The pool entry's flag: set when the connection is no use any more.
    closed: Arc<AtomicBool>,
}

/// The mesh side of the agent: certificates, trust, the tunnel pool.
pub struct Mesh {
    /// Certificates of local workloads.
    pub certs: Arc<CertManager>,
    /// Trust bundle (replaceable at run time).
    pub trust: Arc<TrustBundle>,
    /// Tunnel-port connections still in their handshake, per source IP
    /// (the server side's bound, see [`super::handshakes`]).
    pub handshakes: Arc<HandshakeSlots>,
    pool: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    client_configs: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
}

impl Mesh {
    /// A mesh with no tunnels open yet.
    #[must_use]
    pub fn new(certs: Arc<CertManager>, trust: Arc<TrustBundle>) -> Self {
        Self {
            certs,
            trust,
            handshakes: HandshakeSlots::new(PER_SOURCE),
            pool: Mutex::new(HashMap::new()),
            client_configs: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a tunnelled stream from `pod` (identity `src`) to `dst`, which
    /// must be served by a workload with identity `dst_id`.
    pub async fn connect(
        &self,
        pod: &Pod,
        src: &SpiffeId,
        dst: SocketAddr,
        dst_id: &SpiffeId,
        trace: Option<&ConnTrace>,
    ) -> Result<Tunnelled, TunnelError> {
        self.connect_via(pod, src, dst.ip(), dst_id, dst, trace).await
    }

    /// Opens a tunnelled stream from `pod` (identity `src`) to the tunnel
    /// port of `via`, which must be served by `via_id`, asking for
    /// `CONNECT target`: a waypoint (`via`) receives the client's original
    /// destination (`target`), not one of its endpoints.
    pub async fn connect_via(
        &self,
        pod: &Pod,
        src: &SpiffeId,
        via: IpAddr,
        via_id: &SpiffeId,
        target: SocketAddr,
        trace: Option<&ConnTrace>,
    ) -> Result<Tunnelled, TunnelError> {
        let traceparent = trace.map(ConnTrace::traceparent);
        let (dst, dst_id) = (target, via_id);
        let cert = self.certs.get(src, CERT_WAIT).await?;
        let key = PoolKey { src: src.clone(), dst_ip: via, dst_id: dst_id.clone() };
        let uri = Uri::builder()
            .authority(dst.to_string())
            .build()
            .map_err(|e| TunnelError::Refused { status: StatusCode::BAD_REQUEST, reason: e.to_string() })?;
        // A pooled connection may have just died, or be going away (the
        // destination agent was upgraded and drains it): it leaves the pool,
        // and the stream is retried on a new connection (twice at most: a new
        // connection may land on the draining agent just before it stops
        // accepting). The request never reached an application, so nothing
        // is sent twice.
        let mut retries = 0;
        loop {
            let opened = self.sender(pod, &key, cert.generation, retries > 0).await?;
            let closed = opened.closed.clone();
            match Self::request(opened.sender, &uri, traceparent.as_ref()).await {
                Err(TunnelError::Http(e)) if retries < 2 && (e.is_go_away() || e.is_io() || e.reason().is_none()) => {
                    tracing::debug!(error = %e, "tunnel connection failed or going away; retrying on a new one");
                    closed.store(true, Ordering::Release);
                    retries += 1;
                }
                other => {
                    return other.map(|stream| Tunnelled { stream, probe: opened.probe, handshake: opened.handshake })
                }
            }
        }
    }

    async fn request(
        sender: h2::client::SendRequest<Bytes>,
        uri: &Uri,
        traceparent: Option<&hyper::header::HeaderValue>,
    ) -> Result<H2Stream, TunnelError> {
        let mut sender = sender.ready().await?;
        let mut req = Request::builder().method(Method::CONNECT).uri(uri.clone()).body(()).expect("static request");
        if let Some(tp) = traceparent {
            // The source side's L4 span (`--trace-l4`), continued by the
            // destination agent.
            req.headers_mut().insert("traceparent", tp.clone());
        }
        let (response, send) = sender.send_request(req, false)?;
        let resp = response.await?;
        if resp.status() != StatusCode::OK {
            let reason = resp.headers().get(REASON_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            return Err(TunnelError::Refused { status: resp.status(), reason });
        }
        Ok(H2Stream { send, recv: resp.into_body() })
    }

    /// A sender for `key`: a pooled connection made with the current
    /// certificate generation (unless `fresh`), else a new connection.
    async fn sender(&self, pod: &Pod, key: &PoolKey, generation: u64, fresh: bool) -> Result<Opened, TunnelError> {
        if !fresh {
            let mut pool = self.pool.lock().expect("pool lock");
            if let Some(conns) = pool.get_mut(key) {
                let now = SystemTime::now();
                conns.retain(|c| {
                    !c.closed.load(Ordering::Acquire)
                        && c.generation >= generation
                        && c.peer_not_after.is_some_and(|t| now < t)
                });
                if let Some(c) = conns.first() {
                    return Ok(Opened {
                        sender: c.sender.clone(),
                        probe: c.probe.clone(),
                        handshake: None,
                        peer_not_after: c.peer_not_after,
                        closed: c.closed.clone(),
                    });
                }
            }
        }
        let closed = Arc::new(AtomicBool::new(false));
        let opened = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.open(pod, key, closed.clone()))
            .await
            .map_err(|_| TunnelError::Timeout)??;
        self.pool.lock().expect("pool lock").entry(key.clone()).or_default().push(Pooled {
            sender: opened.sender.clone(),
            probe: opened.probe.clone(),
            generation,
            peer_not_after: opened.peer_not_after,
            closed,
        });
        Ok(opened)
    }

    /// Stops maintaining the certificates of identities not in `keep`, and
    /// forgets the client configurations built on them (a configuration
    /// reads its identity's certificate channel, which ends with it: an
    /// identity that comes back gets a new channel, and a new configuration).
    pub fn retain_identities(&self, keep: &std::collections::HashSet<SpiffeId>) {
        self.certs.retain(keep);
        self.client_configs.lock().expect("configs lock").retain(|id, _| keep.contains(id));
    }

    fn client_config(&self, src: &SpiffeId) -> Result<Arc<ClientConfig>, TunnelError> {
        let mut configs = self.client_configs.lock().expect("configs lock");
        if let Some(c) = configs.get(src) {
            return Ok(c.clone());
        }
        let c = tls::client_config_with(Arc::new(self.certs.ensure(src)), self.trust.clone())?;
        configs.insert(src.clone(), c.clone());
        Ok(c)
    }

    async fn open(&self, pod: &Pod, key: &PoolKey, closed: Arc<AtomicBool>) -> Result<Opened, TunnelError> {
        let addr = SocketAddr::new(key.dst_ip, PORT_TUNNEL);
        let tcp = sockets::connect_in(&pod.netns, addr).await?;
        let probe = TcpProbe::of(&tcp).map(Arc::new);
        let connector = tokio_rustls::TlsConnector::from(self.client_config(&key.src)?);
        let name = ServerName::IpAddress(key.dst_ip.into());
        let started = Instant::now();
        let tls = connector.connect(name, tcp).await.map_err(|e| TunnelError::Tls { addr, message: e.to_string() })?;
        let handshake = started.elapsed();
        tls::peer_identity(tls.get_ref().1.peer_certificates(), Some(&key.dst_id))
            .map_err(|source| TunnelError::Identity { addr, source })?;
        let peer_not_after = tls.get_ref().1.peer_certificates().and_then(<[_]>::first).and_then(tls::not_after_of);
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await?;
        let driver_probe = probe.clone();
        let driver_closed = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "tunnel connection ended");
            }
            closed.store(true, Ordering::Release);
            if let Some(p) = driver_probe {
                p.release();
            }
        });
        tracing::debug!(src = %key.src, dst = %addr, "tunnel connection opened");
        Ok(Opened { sender, probe, handshake: Some(handshake), peer_not_after, closed: driver_closed })
    }

    /// Number of pooled tunnel connections.
    #[must_use]
    pub fn pooled(&self) -> usize {
        self.pool
            .lock()
            .expect("pool lock")
            .values()
            .map(|v| v.iter().filter(|c| !c.closed.load(Ordering::Acquire)).count())
            .sum()
    }
}
