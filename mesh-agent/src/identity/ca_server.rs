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

use std::{
    collections::BTreeSet, convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use super::ca_auth::token_path;
use super::{
    authority::Authority,
    ca_auth::{ConfigFile, IdentityAuthorizer, NodeAuthenticator, NodeTokens},
    ca_client::{ca_identity, ErrorResponse, SignRequest, SignResponse},
    SpiffeId,
};
use crate::config;

/// Largest request body accepted (a CSR is well under 2 KiB).
const MAX_BODY: usize = 64 * 1024;

/// Settings of the CA process in local mode.
#[derive(Clone, Debug)]
pub struct CaSettings {
    /// Where the root key, root certificate, bundle and node tokens live.
    pub state_dir: PathBuf,
    /// TLS listen address.
    pub listen: SocketAddr,
    /// The local configuration (who runs where).
    pub config: PathBuf,
    /// Trust domain.
    pub trust_domain: String,
    /// Lifetime of workload certificates.
    pub leaf_ttl: Duration,
}

struct State {
    authority: Authority,
    authn: Arc<dyn NodeAuthenticator>,
    authz: Arc<dyn IdentityAuthorizer>,
    /// Where the decisions come from, for the start-up log line.
    mode: &'static str,
}

/// Serves `server` on `listen` until SIGTERM/SIGINT.
pub async fn run(server: CaServer, listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the CA on {listen}"))?;
    let stop = CancellationToken::new();
    let serving = tokio::spawn(server.serve(listener, stop.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    stop.cancel();
    let _ = serving.await;
    Ok(())
}

/// A CA ready to serve.
pub struct CaServer {
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
}

impl CaServer {
    /// Local mode: loads (or creates) the root in the state directory and
    /// the node tokens; authorizes from the configuration file.
    pub fn new(settings: &CaSettings) -> anyhow::Result<Self> {
        let authority = Authority::load_or_create(
            &settings.state_dir,
            &settings.trust_domain,
            settings.leaf_ttl,
        )?;
        let cfg = config::load(&settings.config)?;
        let tokens = NodeTokens::new(&settings.state_dir);
        let nodes: BTreeSet<&str> = cfg.workloads.iter().map(|w| w.node.as_str()).collect();
        for node in nodes {
            tokens
                .ensure(node)
                .with_context(|| format!("creating the token of node {node}"))?;
        }
        let authorizer = ConfigFile::new(&settings.config, &settings.trust_domain);
        Self::from_parts(authority, Arc::new(tokens), Arc::new(authorizer), "local")
    }

    /// A CA over any root and decision sources; `mode` names them in logs.
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
        Ok(Self {
            acceptor,
            state: Arc::new(State {
                authority,
                authn: authenticator,
                authz: authorizer,
                mode,
            }),
        })
    }

    /// The trust bundle agents need.
    #[must_use]
    pub fn bundle_pem(&self) -> String {
        self.state.authority.bundle_pem().to_owned()
    }

    /// Serves on `listener` until `stop` fires.
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        let Self { acceptor, state } = self;
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(listen = %addr, mode = state.mode, trust_domain = state.authority.trust_domain(), ttl_s = state.authority.leaf_ttl().as_secs(), "mesh CA ready");
        }
        loop {
            let (tcp, peer) = tokio::select! {
                () = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let (acceptor, state) = (acceptor.clone(), state.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                else {
                    tracing::debug!(%peer, "TLS handshake with CA client failed");
                    return;
                };
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, req).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    }
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/v1/bundle") => respond(
            StatusCode::OK,
            state.authority.bundle_pem().as_bytes().to_vec(),
        ),
        ("POST", "/v1/certificates") => match sign(state, req).await {
            Ok(r) => respond(StatusCode::OK, serde_json::to_vec(&r).unwrap_or_default()),
            Err((status, error)) => {
                if status.is_server_error() {
                    tracing::error!(status = status.as_u16(), %error, "cannot decide a certificate request: refusing it (fail closed)");
                } else {
                    tracing::warn!(status = status.as_u16(), %error, "certificate request refused");
                }
                respond(
                    status,
                    serde_json::to_vec(&ErrorResponse { error }).unwrap_or_default(),
                )
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
    let node = state.authn.authenticate(&bearer).await.map_err(refused)?;
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("body: {e}")))?
        .to_bytes();
    let request: SignRequest = serde_json::from_slice(&body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("request: {e}")))?;
    let identity: SpiffeId = request
        .identity
        .parse()
        .map_err(|e: super::spiffe::ParseSpiffeIdError| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let trust_domain = state.authority.trust_domain();
    if identity.trust_domain() != trust_domain {
        return Err((
            StatusCode::FORBIDDEN,
            format!("node {node} asked for {identity}, which is not in trust domain {trust_domain}"),
        ));
    }
    state
        .authz
        .authorize(&node, &identity)
        .await
        .map_err(refused)?;
    let issued = state
        .authority
        .sign_csr(&request.csr, &identity)
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let not_after = issued
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    tracing::info!(%node, %identity, not_after, "certificate issued");
    Ok(SignResponse {
        chain: issued.chain_pem,
        not_after,
    })
}

fn respond(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
