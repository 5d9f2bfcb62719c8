//! How a node agent asks the mesh CA for certificates: the
//! [`CertificateAuthority`] trait (so tests can use an in-memory CA) and
//! [`RemoteCa`], which speaks to `mesh-agent ca` over HTTPS.
//!
//! Wire protocol (HTTP/1.1 over TLS 1.3): `POST /v1/certificates` with
//! `Authorization: Bearer <node token>` and a JSON body
//! `{"identity": "spiffe://...", "csr": "<PEM>"}`; the answer is
//! `{"chain": ["<leaf PEM>", "<root PEM>"], "notAfter": <unix seconds>}` or
//! `{"error": "..."}` with 400 (bad CSR), 401 (unknown node token) or 403
//! (identity not scheduled on the requesting node). The CA's TLS certificate
//! must carry the CA's own SPIFFE ID.

use std::{
    future::Future,
    net::SocketAddr,
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
    /// Could not reach the CA.
    #[error("CA {addr} unreachable: {source}")]
    Unreachable {
        /// The CA address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The CA's TLS endpoint could not be authenticated.
    #[error("CA {addr} failed authentication: {message}")]
    NotTrusted {
        /// The CA address.
        addr: SocketAddr,
        /// What is wrong.
        message: String,
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
    fn sign<'a>(
        &'a self,
        identity: &'a SpiffeId,
        csr_pem: String,
    ) -> BoxFuture<'a, Result<SignedChain, CaError>>;
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

/// `mesh-agent ca` over the network.
pub struct RemoteCa {
    addr: SocketAddr,
    token: String,
    tls: Arc<rustls::ClientConfig>,
    expected: SpiffeId,
}

impl RemoteCa {
    /// A client for the CA at `addr`, authenticating with the node `token`.
    pub fn new(
        addr: SocketAddr,
        token: String,
        roots: Arc<RootCertStore>,
        trust_domain: &str,
    ) -> Result<Self, tls::TlsError> {
        Ok(Self {
            addr,
            token,
            tls: tls::anonymous_client_config(roots)?,
            expected: ca_identity(trust_domain),
        })
    }

    /// The CA's address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn request(&self, identity: &SpiffeId, csr_pem: String) -> Result<SignedChain, CaError> {
        let addr = self.addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| CaError::Unreachable { addr, source })?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let name = ServerName::try_from("heddle-ca").expect("static name");
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| CaError::NotTrusted {
                addr,
                message: e.to_string(),
            })?;
        tls::peer_identity(stream.get_ref().1.peer_certificates(), Some(&self.expected)).map_err(
            |e| CaError::NotTrusted {
                addr,
                message: e.to_string(),
            },
        )?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| CaError::Protocol(e.to_string()))?;
        tokio::spawn(conn);
        let body = serde_json::to_vec(&SignRequest {
            identity: identity.to_string(),
            csr: csr_pem,
        })
        .map_err(|e| CaError::Protocol(e.to_string()))?;
        let req = hyper::Request::post("/v1/certificates")
            .header(hyper::header::HOST, "heddle-ca")
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CaError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| CaError::Protocol(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CaError::Protocol(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorResponse>(&bytes).map_or_else(
                |_| String::from_utf8_lossy(&bytes).into_owned(),
                |e| e.error,
            );
            return Err(CaError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        let ok: SignResponse =
            serde_json::from_slice(&bytes).map_err(|e| CaError::Protocol(e.to_string()))?;
        Ok(SignedChain {
            chain_pem: ok.chain,
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(ok.not_after),
        })
    }
}

impl CertificateAuthority for RemoteCa {
    fn sign<'a>(
        &'a self,
        identity: &'a SpiffeId,
        csr_pem: String,
    ) -> BoxFuture<'a, Result<SignedChain, CaError>> {
        Box::pin(async move {
            tokio::time::timeout(REQUEST_TIMEOUT, self.request(identity, csr_pem))
                .await
                .unwrap_or(Err(CaError::Timeout))
        })
    }
}
