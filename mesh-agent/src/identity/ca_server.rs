//! `mesh-agent ca`: the mesh CA as its own process (a Deployment in
//! Kubernetes later). It authenticates the requesting node agent by its node
//! token, signs a CSR only for an identity that has a workload scheduled on
//! that node (local mode: from the shared configuration file, re-read on each
//! request), and never lets its key leave `--state-dir`.
//!
//! Node tokens: `<state-dir>/nodes/<node>.token` (mode 0600), created on
//! start for every node the configuration names. In local mode the agent of
//! node N is given that file (`--ca-token-file`). The Kubernetes issue
//! replaces tokens with projected service-account tokens and `TokenReview`.

use std::{
    collections::BTreeSet,
    convert::Infallible,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
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

use super::{
    authority::Authority,
    ca_client::{ca_identity, ErrorResponse, SignRequest, SignResponse},
    SpiffeId,
};
use crate::config;

/// Largest request body accepted (a CSR is well under 2 KiB).
const MAX_BODY: usize = 64 * 1024;

/// Settings of the CA process.
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
    settings: CaSettings,
}

/// Runs the CA until SIGTERM/SIGINT.
pub async fn run(settings: CaSettings) -> anyhow::Result<()> {
    let listen = settings.listen;
    let server = CaServer::new(settings)?;
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
    /// Loads (or creates) the root, the node tokens and the serving certificate.
    pub fn new(settings: CaSettings) -> anyhow::Result<Self> {
        let authority = Authority::load_or_create(
            &settings.state_dir,
            &settings.trust_domain,
            settings.leaf_ttl,
        )?;
        let cfg = config::load(&settings.config)?;
        let nodes: BTreeSet<&str> = cfg.workloads.iter().map(|w| w.node.as_str()).collect();
        for node in nodes {
            ensure_token(&settings.state_dir, node)?;
        }
        let (chain, key) = authority.serving_cert(&ca_identity(&settings.trust_domain))?;
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
                settings,
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
            tracing::info!(listen = %addr, state = %state.settings.state_dir.display(), ttl_s = state.settings.leaf_ttl.as_secs(), "mesh CA ready");
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

/// Where the token of `node` is kept.
#[must_use]
pub fn token_path(state_dir: &Path, node: &str) -> PathBuf {
    state_dir.join("nodes").join(format!("{node}.token"))
}

fn ensure_token(state_dir: &Path, node: &str) -> anyhow::Result<()> {
    let dir = state_dir.join("nodes");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let path = token_path(state_dir, node);
    if path.exists() {
        return Ok(());
    }
    let token = super::tls::hex(&rand::random::<[u8; 32]>());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    Ok(())
}

/// The node whose token this is, comparing in constant time.
fn authenticate(state_dir: &Path, bearer: &str) -> Option<String> {
    let entries = std::fs::read_dir(state_dir.join("nodes")).ok()?;
    entries.flatten().find_map(|e| {
        let name = e
            .file_name()
            .to_string_lossy()
            .strip_suffix(".token")?
            .to_owned();
        let token = std::fs::read_to_string(e.path()).ok()?;
        let token = token.trim().as_bytes();
        let given = bearer.as_bytes();
        let same = token.len() == given.len()
            && token
                .iter()
                .zip(given)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        same.then_some(name)
    })
}

/// Whether `identity` belongs to a workload scheduled on `node`.
fn scheduled_on(
    config_path: &Path,
    trust_domain: &str,
    node: &str,
    identity: &SpiffeId,
) -> Result<bool, String> {
    let cfg = config::load(config_path).map_err(|e| e.to_string())?;
    Ok(cfg.workloads.iter().any(|w| {
        w.node == node && SpiffeId::new(trust_domain, &w.namespace, &w.service_account) == *identity
    }))
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
                tracing::warn!(status = status.as_u16(), %error, "certificate request refused");
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
    let settings = &state.settings;
    let bearer = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
        .ok_or((StatusCode::UNAUTHORIZED, "missing bearer token".to_owned()))?;
    let node = authenticate(&settings.state_dir, &bearer)
        .ok_or((StatusCode::UNAUTHORIZED, "unknown node token".to_owned()))?;
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
    if identity.trust_domain() != settings.trust_domain {
        return Err((
            StatusCode::FORBIDDEN,
            format!(
                "{identity} is not in trust domain {}",
                settings.trust_domain
            ),
        ));
    }
    match scheduled_on(&settings.config, &settings.trust_domain, &node, &identity) {
        Ok(true) => {}
        Ok(false) => {
            return Err((
                StatusCode::FORBIDDEN,
                format!("no workload with identity {identity} is scheduled on node {node}"),
            ));
        }
        Err(e) => {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("configuration unavailable: {e}"),
            ))
        }
    }
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
