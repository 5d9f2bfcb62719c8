//! `mesh-agent ca`: the mesh CA as its own process. It authenticates the
//! requesting node agent ([`NodeAuthenticator`]), signs a CSR only for an
//! identity that has a workload scheduled on that node
//! ([`IdentityAuthorizer`]), and never lets its key leave the process.
//!
//! Two modes share this server: local ([`CaServer::new`]: node tokens in
//! `<state-dir>/nodes/<node>.token`, mode 0600, created on start for every
//! node of the configuration file, which is re-read on each request; the root
//! in `--state-dir`) and Kubernetes (`k8s::ca_root::kubernetes_ca`:
//! `TokenReview` of projected service-account tokens, the node's pods, the
//! root in a Secret and in memory only). Status codes: 401 unauthenticated,
//! 403 not allowed (the message names node and identity), 400 bad request or
//! CSR, 503 when the source of truth cannot be consulted (fail closed).
//!
//! Every pod can reach the CA's port, so the server bounds what one client
//! can hold ([`Limits`]): at most `max_connections` connections at once, and
//! at most `max_connections_per_ip` from one source IP, so that one pod
//! cannot take every slot (excess ones are closed at once, counted in
//! [`CaServer::refused_connections`] and logged at most once a second per
//! kind of limit), a TLS handshake timeout, a
//! request-header timeout (hyper's `header_read_timeout`, which needs a
//! timer), and an overall deadline per connection. Identities the mesh
//! itself relies on ([`reserved_identities`], the CA's own) are never issued.

use std::{
    collections::BTreeSet,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;

pub use super::ca_auth::token_path;
use super::{
    authority::Authority,
    ca_auth::{ConfigFile, IdentityAuthorizer, NodeAuthenticator, NodeTokens},
    ca_client::{ca_identity, ErrorResponse, SignRequest, SignResponse},
    SpiffeId,
};
use crate::config;
use peer_slots::PeerSlots;

/// Largest request body accepted (a CSR is well under 2 KiB).
const MAX_BODY: usize = 64 * 1024;

/// Settings of the CA process in local mode.
#[derive(Clone, Debug)]
pub struct CaSettings {
    /// Where the root key, root certificate, bundle and node tokens live.
    pub state_dir: PathBuf,
    /// The local configuration (who runs where).
    pub config: PathBuf,
    /// Trust domain.
    pub trust_domain: String,
    /// Lifetime of workload certificates.
    pub leaf_ttl: Duration,
}

/// What one client may hold on the CA (every pod can reach its port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; further ones are closed at once.
    /// Default 512: agents open one connection per request and request a
    /// certificate per identity per half TTL.
    pub max_connections: usize,
    /// Connections served at once from one source IP; further ones from it
    /// are closed at once. Default 16: an agent has a handful of requests in
    /// flight at most (one per identity due for renewal), while one pod
    /// opening connections it never finishes must not hold the global
    /// `max_connections`. Behind a SNAT or a proxy every client shares one
    /// IP: raise it there.
    pub max_connections_per_ip: usize,
    /// Time to complete the TLS handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time to send the request headers once TLS is up (hyper
    /// `header_read_timeout`). Default 5 s.
    pub header_read_timeout: Duration,
    /// Longest a connection lives, handshake and all requests included
    /// (bounds a slow body too). Default 30 s.
    pub connection_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            max_connections_per_ip: 16,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(5),
            connection_deadline: Duration::from_secs(30),
        }
    }
}

/// Identities the CA never issues to a workload, whatever runs where: its
/// own (`spiffe://<td>/ns/heddle-system/sa/heddle-ca`, which agents check
/// when they connect to it) and the same service account in the namespace
/// the CA runs in, `ca_namespace`, if that differs. A node that hosts a pod
/// with such a service account would otherwise obtain a certificate agents
/// take for the CA's.
#[must_use]
pub fn reserved_identities(trust_domain: &str, ca_namespace: &str) -> Vec<SpiffeId> {
    let own = ca_identity(trust_domain);
    let here = SpiffeId::new(trust_domain, ca_namespace, own.service_account());
    if here == own {
        vec![own]
    } else {
        vec![own, here]
    }
}

struct State {
    authority: Authority,
    authn: Arc<dyn NodeAuthenticator>,
    authz: Arc<dyn IdentityAuthorizer>,
    /// Identities never issued ([`reserved_identities`]).
    reserved: Vec<SpiffeId>,
    /// Where the decisions come from, for the start-up log line.
    mode: &'static str,
}

/// Serves `server` on `listen` until SIGTERM/SIGINT.
pub async fn run(server: CaServer, listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding the CA on {listen}"))?;
    let stop = CancellationToken::new();
    let serving = tokio::spawn(server.serve(listener, stop.clone()));
    crate::agent::wait_for_shutdown().await?;
    stop.cancel();
    let _ = serving.await;
    Ok(())
}

/// A CA ready to serve.
pub struct CaServer {
    acceptor: tokio_rustls::TlsAcceptor,
    state: State,
    limits: Limits,
    refused: Arc<AtomicU64>,
}

impl CaServer {
    /// Local mode: loads (or creates) the root in the state directory and
    /// the node tokens; authorizes from the configuration file.
    pub fn new(settings: &CaSettings) -> anyhow::Result<Self> {
        let authority = Authority::load_or_create(&settings.state_dir, &settings.trust_domain, settings.leaf_ttl)?;
        let cfg = config::load(&settings.config)?;
        let tokens = NodeTokens::new(&settings.state_dir);
        let nodes: BTreeSet<&str> = cfg.workloads.iter().map(|w| w.node.as_str()).collect();
        for node in nodes {
            tokens.ensure(node).with_context(|| format!("creating the token of node {node}"))?;
        }
        let authorizer = ConfigFile::new(&settings.config, &settings.trust_domain);
        Self::from_parts(authority, Arc::new(tokens), Arc::new(authorizer), "local")
    }

    /// A CA over any root and decision sources; `mode` names them in logs.
    /// It refuses [`ca_identity`]; [`CaServer::reserve`] adds more.
    pub fn from_parts(
        authority: Authority,
        authenticator: Arc<dyn NodeAuthenticator>,
        authorizer: Arc<dyn IdentityAuthorizer>,
        mode: &'static str,
    ) -> anyhow::Result<Self> {
        let (chain, key) = authority.serving_cert(&ca_identity(authority.trust_domain()))?;
        let certs = chain
            .iter()
            .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .context("serving certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).context("serving key")?;
        let tls = rustls::ServerConfig::builder_with_provider(super::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let reserved = vec![ca_identity(authority.trust_domain())];
        Ok(Self {
            acceptor,
            state: State { authority, authn: authenticator, authz: authorizer, reserved, mode },
            limits: Limits::default(),
            refused: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Never issues `identities` either (e.g. the CA's service account in
    /// the namespace it runs in).
    #[must_use]
    pub fn reserve(mut self, identities: impl IntoIterator<Item = SpiffeId>) -> Self {
        for id in identities {
            if !self.state.reserved.contains(&id) {
                self.state.reserved.push(id);
            }
        }
        self
    }

    /// Serves under `limits` instead of [`Limits::default`].
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Connections closed at once because `max_connections` were being
    /// served, or `max_connections_per_ip` from their source IP (a counter
    /// shared with the running server).
    #[must_use]
    pub fn refused_connections(&self) -> Arc<AtomicU64> {
        self.refused.clone()
    }

    /// Serves the CA's HTTP API on `io`, a stream already decrypted (what
    /// follows TLS on a connection): the fuzz target's way in.
    #[cfg(any(test, feature = "fuzzing"))]
    pub async fn serve_decrypted<I>(&self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        serve_http(io, &self.state, self.limits.header_read_timeout).await;
    }

    /// The trust bundle agents need.
    #[must_use]
    pub fn bundle_pem(&self) -> String {
        self.state.authority.bundle_pem().to_owned()
    }

    /// Serves on `listener` until `stop` fires.
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        let Self { acceptor, state, limits, refused } = self;
        let state = Arc::new(state);
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(listen = %addr, mode = state.mode, trust_domain = state.authority.trust_domain(), ttl_s = state.authority.leaf_ttl().as_secs(), max_connections = limits.max_connections, max_connections_per_ip = limits.max_connections_per_ip, "mesh CA ready");
        }
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let peer_slots = PeerSlots::new(limits.max_connections_per_ip);
        let refusals = RefusalLog::new(refused);
        while let Some((tcp, peer)) = crate::accept::next(&listener, &"mesh CA", &stop).await {
            // Closed before the handshake: a flood costs an accept each. The
            // per-IP slot is taken first, so that an IP at its cap does not
            // hold a global slot even for a moment.
            let Some(peer_slot) = peer_slots.try_acquire(peer.ip()) else {
                drop(tcp);
                refusals.record(peer, Refused::PerIp(limits.max_connections_per_ip));
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                drop((tcp, peer_slot));
                refusals.record(peer, Refused::Global(limits.max_connections));
                continue;
            };
            let (acceptor, state) = (acceptor.clone(), state.clone());
            tokio::spawn(async move {
                let conn = serve_connection(acceptor, tcp, state, limits);
                if tokio::time::timeout(limits.connection_deadline, conn).await.is_err() {
                    tracing::debug!(%peer, deadline_s = limits.connection_deadline.as_secs(), "CA connection closed at its deadline");
                }
                drop((permit, peer_slot));
            });
        }
    }
}

/// One client connection: TLS, then HTTP/1 with a header timeout.
async fn serve_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    state: Arc<State>,
    limits: Limits,
) {
    let peer = tcp.peer_addr().ok();
    let Ok(Ok(tls)) = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await else {
        tracing::debug!(?peer, "TLS handshake with CA client failed or timed out");
        return;
    };
    serve_http(tls, &state, limits.header_read_timeout).await;
}

/// HTTP/1 with a header timeout on a decrypted stream.
async fn serve_http<I>(io: I, state: &State, header_read_timeout: Duration)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let svc = service_fn(|req| async move { Ok::<_, Infallible>(handle(state, req).await) });
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

/// Which limit refused a connection, with its value.
#[derive(Clone, Copy, Debug)]
enum Refused {
    /// `max_connections` were being served.
    Global(usize),
    /// `max_connections_per_ip` were being served from the peer's IP.
    PerIp(usize),
}

/// Counts connections refused for want of a slot and logs them at most
/// once a second per kind of limit (a flood must not become a flood of log
/// lines, and one IP at its cap must not hide the global limit's line).
struct RefusalLog {
    count: Arc<AtomicU64>,
    /// When each kind was last logged: global, per IP.
    last_logged: std::sync::Mutex<[Option<Instant>; 2]>,
}

impl RefusalLog {
    fn new(count: Arc<AtomicU64>) -> Self {
        Self { count, last_logged: std::sync::Mutex::new([None, None]) }
    }

    fn record(&self, peer: SocketAddr, refused: Refused) {
        let total = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_logged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let last = &mut last[usize::from(matches!(refused, Refused::PerIp(_)))];
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(Instant::now());
        match refused {
            Refused::Global(max) => {
                tracing::warn!(%peer, max_connections = max, refused_total = total, "CA connection limit reached: closing new connections");
            }
            Refused::PerIp(max) => {
                tracing::warn!(%peer, max_connections_per_ip = max, refused_total = total, "CA per-IP connection limit reached: closing new connections from this IP");
            }
        }
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/v1/bundle") => respond(StatusCode::OK, state.authority.bundle_pem().as_bytes().to_vec()),
        ("POST", "/v1/certificates") => match sign(state, req).await {
            Ok(r) => respond(StatusCode::OK, serde_json::to_vec(&r).unwrap_or_default()),
            Err((status, error)) => {
                if status.is_server_error() {
                    tracing::error!(status = status.as_u16(), %error, "cannot decide a certificate request: refusing it (fail closed)");
                } else {
                    tracing::warn!(status = status.as_u16(), %error, "certificate request refused");
                }
                respond(status, serde_json::to_vec(&ErrorResponse { error }).unwrap_or_default())
            }
        },
        _ => respond(StatusCode::NOT_FOUND, b"{\"error\":\"not found\"}".to_vec()),
    }
}

async fn sign(state: &State, req: Request<Incoming>) -> Result<SignResponse, (StatusCode, String)> {
    let bearer = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
        .ok_or((StatusCode::UNAUTHORIZED, "missing bearer token".to_owned()))?;
    let refused = |e: super::ca_auth::CaAuthError| (e.status(), e.to_string());
    let caller = state.authn.authenticate(&bearer).await.map_err(refused)?;
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("body: {e}")))?
        .to_bytes();
    let request: SignRequest =
        serde_json::from_slice(&body).map_err(|e| (StatusCode::BAD_REQUEST, format!("request: {e}")))?;
    let identity: SpiffeId = request
        .identity
        .parse()
        .map_err(|e: super::spiffe::ParseSpiffeIdError| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let trust_domain = state.authority.trust_domain();
    if identity.trust_domain() != trust_domain {
        return Err((
            StatusCode::FORBIDDEN,
            format!("{caller} asked for {identity}, which is not in trust domain {trust_domain}"),
        ));
    }
    if state.reserved.contains(&identity) {
        return Err((
            StatusCode::FORBIDDEN,
            format!(
                "{caller} asked for {identity}, which is reserved for the mesh CA \
                 and never issued to a workload"
            ),
        ));
    }
    state.authz.authorize(&caller, &identity).await.map_err(refused)?;
    let issued =
        state.authority.sign_csr(&request.csr, &identity).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let not_after = issued.not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    tracing::info!(node = %caller.node(), %caller, %identity, not_after, "certificate issued");
    Ok(SignResponse { chain: issued.chain_pem, not_after })
}

fn respond(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

mod peer_slots;
#[cfg(test)]
mod tests;
