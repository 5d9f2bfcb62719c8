//! How a node agent asks the mesh CA for certificates: the
//! [`CertificateAuthority`] trait (so tests can use an in-memory CA) and
//! [`RemoteCa`], which speaks to `mesh-agent ca` over HTTPS.
//!
//! Wire protocol (HTTP/1.1 over TLS 1.3): `POST /v1/certificates` with
//! `Authorization: Bearer <node token>` and a JSON body
//! `{"identity": "spiffe://...", "csr": "<PEM>"}`; the answer is
//! `{"chain": ["<leaf PEM>", "<root PEM>"], "notAfter": <unix seconds>}` or
//! `{"error": "..."}` with 400 (bad CSR), 401 (unknown node token) or 403
//! (identity not scheduled on the requesting node), 503 (the CA cannot
//! consult its source of truth). The CA's TLS certificate must carry the CA's
//! own SPIFFE ID.
//!
//! The address is `host:port`, resolved at every connection (a Service name
//! such as `heddle-ca.heddle-system.svc:15012` follows the CA's pods), and a
//! token kept in a file is re-read for every request (the kubelet rotates
//! projected service-account tokens in place).

use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls::{pki_types::ServerName, RootCertStore};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use super::{tls, SpiffeId};

/// Time allowed for one request to the CA.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the CA did not sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Could not reach the CA (or resolve its name).
    #[error("CA {addr} unreachable: {source}")]
    Unreachable {
        /// The CA address, `host:port`.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The CA's TLS endpoint could not be authenticated.
    #[error("CA {addr} failed authentication: {message}")]
    NotTrusted {
        /// The CA address, `host:port`.
        addr: String,
        /// What is wrong.
        message: String,
    },
    /// The node's token could not be read.
    #[error("cannot read the CA token {path}: {source}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The CA answered with an error.
    #[error("CA refused ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The CA's message.
        message: String,
    },
    /// The answer could not be understood.
    #[error("CA protocol error: {0}")]
    Protocol(String),
    /// The request took too long.
    #[error("CA request timed out")]
    Timeout,
}

/// A signed certificate chain for a CSR.
#[derive(Clone, Debug)]
pub struct SignedChain {
    /// Leaf first, PEM.
    pub chain_pem: Vec<String>,
    /// End of validity of the leaf.
    pub not_after: SystemTime,
}

/// Boxed future, to keep the trait object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that signs CSRs for this node.
pub trait CertificateAuthority: Send + Sync {
    /// Asks for a certificate for `identity`.
    fn sign<'a>(&'a self, identity: &'a SpiffeId, csr_pem: String) -> BoxFuture<'a, Result<SignedChain, CaError>>;
}

/// JSON request body.
#[derive(Serialize, Deserialize)]
pub struct SignRequest {
    /// Requested identity.
    pub identity: String,
    /// CSR, PEM.
    pub csr: String,
}

/// JSON answer body.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignResponse {
    /// Chain, leaf first.
    pub chain: Vec<String>,
    /// Unix seconds.
    pub not_after: u64,
}

/// JSON error body.
#[derive(Serialize, Deserialize)]
pub struct ErrorResponse {
    /// What went wrong.
    pub error: String,
}

/// The CA identity a node expects to talk to.
#[must_use]
pub fn ca_identity(trust_domain: &str) -> SpiffeId {
    SpiffeId::new(trust_domain, "heddle-system", "heddle-ca")
}

/// Where the node's bearer token comes from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// A fixed token.
    Static(String),
    /// A file, re-read for every request (projected tokens are rotated in
    /// place by the kubelet); surrounding whitespace is ignored.
    File(PathBuf),
}

impl TokenSource {
    async fn read(&self) -> Result<String, CaError> {
        match self {
            Self::Static(t) => Ok(t.clone()),
            Self::File(path) => tokio::fs::read_to_string(path)
                .await
                .map(|t| t.trim().to_owned())
                .map_err(|source| CaError::Token { path: path.clone(), source }),
        }
    }
}

/// `mesh-agent ca` over the network.
pub struct RemoteCa {
    addr: String,
    token: TokenSource,
    tls: Arc<rustls::ClientConfig>,
    expected: SpiffeId,
}

impl RemoteCa {
    /// A client for the CA at `addr` (`host:port` or `ip:port`),
    /// authenticating with `token`.
    pub fn new(
        addr: impl Into<String>,
        token: TokenSource,
        roots: Arc<RootCertStore>,
        trust_domain: &str,
    ) -> Result<Self, tls::TlsError> {
        Self::with_bundle(addr, token, super::bundle::TrustBundle::new(roots)?, trust_domain)
    }

    /// A client of the CA at `addr` whose certificate is verified against
    /// the roots in force in `bundle`.
    pub fn with_bundle(
        addr: impl Into<String>,
        token: TokenSource,
        bundle: Arc<super::bundle::TrustBundle>,
        trust_domain: &str,
    ) -> Result<Self, tls::TlsError> {
        Ok(Self {
            addr: addr.into(),
            token,
            tls: tls::anonymous_client_config_with(bundle)?,
            expected: ca_identity(trust_domain),
        })
    }

    /// The CA's address.
    #[must_use]
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Resolves the address now and connects to the first address that
    /// answers.
    async fn connect(&self) -> Result<TcpStream, CaError> {
        let unreachable = |source| CaError::Unreachable { addr: self.addr.clone(), source };
        let mut last = None;
        for candidate in tokio::net::lookup_host(self.addr.as_str()).await.map_err(unreachable)? {
            match TcpStream::connect(candidate).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => last = Some(e),
            }
        }
        Err(unreachable(
            last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address")),
        ))
    }

    async fn request(&self, identity: &SpiffeId, csr_pem: String) -> Result<SignedChain, CaError> {
        let token = self.token.read().await?;
        let addr = self.addr.clone();
        let tcp = self.connect().await?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let name = ServerName::try_from("heddle-ca").expect("static name");
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| CaError::NotTrusted { addr: addr.clone(), message: e.to_string() })?;
        tls::peer_identity(stream.get_ref().1.peer_certificates(), Some(&self.expected))
            .map_err(|e| CaError::NotTrusted { addr: addr.clone(), message: e.to_string() })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| CaError::Protocol(e.to_string()))?;
        tokio::spawn(conn);
        let body = serde_json::to_vec(&SignRequest { identity: identity.to_string(), csr: csr_pem })
            .map_err(|e| CaError::Protocol(e.to_string()))?;
        let req = hyper::Request::post("/v1/certificates")
            .header(hyper::header::HOST, "heddle-ca")
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CaError::Protocol(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| CaError::Protocol(e.to_string()))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| CaError::Protocol(e.to_string()))?.to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorResponse>(&bytes)
                .map_or_else(|_| String::from_utf8_lossy(&bytes).into_owned(), |e| e.error);
            return Err(CaError::Refused { status: status.as_u16(), message });
        }
        let ok: SignResponse = serde_json::from_slice(&bytes).map_err(|e| CaError::Protocol(e.to_string()))?;
        Ok(SignedChain { chain_pem: ok.chain, not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(ok.not_after) })
    }
}

impl CertificateAuthority for RemoteCa {
    fn sign<'a>(&'a self, identity: &'a SpiffeId, csr_pem: String) -> BoxFuture<'a, Result<SignedChain, CaError>> {
        Box::pin(async move {
            tokio::time::timeout(REQUEST_TIMEOUT, self.request(identity, csr_pem))
                .await
                .unwrap_or(Err(CaError::Timeout))
        })
    }
}
