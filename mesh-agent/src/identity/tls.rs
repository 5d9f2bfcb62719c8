//! rustls configurations for the mesh: TLS 1.3 only, mutual, peers verified
//! against the trust bundle and then by their SPIFFE URI SAN.
//!
//! Chain verification is done by rustls/webpki during the handshake. The
//! identity check (URI SAN == the identity expected for *this* connection) is
//! done right after the handshake, before a single byte of application data
//! is sent or accepted, with [`peer_identity`]; certificates without a SPIFFE
//! URI SAN are rejected there. DNS names are never consulted.

use std::{fmt, sync::Arc};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    sign::CertifiedKey,
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use super::{bundle::TrustBundle, SpiffeId};

/// ALPN of the HBONE tunnel.
pub const ALPN_H2: &[u8] = b"h2";

/// Errors building TLS configurations or checking peers.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The trust bundle is empty or unparsable.
    #[error("trust bundle: {0}")]
    Bundle(String),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(String),
    /// The peer presented no certificate.
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// The peer certificate carries no workload SPIFFE ID.
    #[error("peer certificate has no SPIFFE URI SAN")]
    NoSpiffeId,
    /// The peer is someone else.
    #[error("peer identity {got} does not match expected {expected}")]
    WrongPeer {
        /// What the peer presented.
        got: Box<SpiffeId>,
        /// What this connection required.
        expected: Box<SpiffeId>,
    },
}

/// The crypto provider used everywhere (ring).
#[must_use]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a PEM trust bundle (one or more roots).
pub fn roots_from_pem(pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::Bundle(e.to_string()))?;
        roots.add(cert).map_err(|e| TlsError::Bundle(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Bundle("no certificate in the trust bundle".into()));
    }
    Ok(Arc::new(roots))
}

/// The SPIFFE ID in a certificate's URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).map_err(|_| TlsError::NoSpiffeId)?;
    let san = parsed.subject_alternative_name().ok().flatten().ok_or(TlsError::NoSpiffeId)?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => u.parse::<SpiffeId>().ok(),
            _ => None,
        })
        .ok_or(TlsError::NoSpiffeId)
}

/// The SPIFFE ID in the URI SAN of the first certificate of `pem`.
pub fn spiffe_id_of_pem(pem: &str) -> Result<SpiffeId, TlsError> {
    use rustls::pki_types::pem::PemObject as _;
    let cert = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::NoSpiffeId)?;
    spiffe_id_of(&cert)
}

/// Serial number of a certificate, lowercase hex.
#[must_use]
pub fn serial_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some(hex(parsed.raw_serial()))
}

/// End of validity of a certificate.
#[must_use]
pub fn not_after_of(cert: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let secs = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// Lowercase hex of `bytes`.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Checks the peer of a finished handshake against `expected`.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>, expected: Option<&SpiffeId>) -> Result<SpiffeId, TlsError> {
    let leaf = certs.and_then(<[_]>::first).ok_or(TlsError::NoPeerCertificate)?;
    let got = spiffe_id_of(leaf)?;
    match expected {
        Some(want) if *want != got => Err(TlsError::WrongPeer { got: Box::new(got), expected: Box::new(want.clone()) }),
        _ => Ok(got),
    }
}

/// Serves a certificate chosen at handshake time (the newest one, so
/// rotation needs no restart).
pub trait CurrentCert: Send + Sync + fmt::Debug {
    /// The certificate to present now, if any.
    fn current(&self) -> Option<Arc<CertifiedKey>>;
}

#[derive(Debug)]
struct ServerResolver(Arc<dyn CurrentCert>);

impl rustls::server::ResolvesServerCert for ServerResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current()
    }
}

#[derive(Debug)]
struct ClientResolver(Arc<dyn CurrentCert>);

impl rustls::client::ResolvesClientCert for ClientResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Server side: requires a client certificate chaining to `roots`.
pub fn server_config(cert: Arc<dyn CurrentCert>, roots: Arc<RootCertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(cert, TrustBundle::new(roots)?)
}

/// Server side: requires a client certificate chaining to the roots in
/// force in `bundle` at each handshake.
pub fn server_config_with(cert: Arc<dyn CurrentCert>, bundle: Arc<TrustBundle>) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(BundleClientVerifier(bundle));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(ServerResolver(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Agents do not resume sessions (each tunnel is long-lived and pooled).
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side: presents `cert`, verifies the server chain against `roots`.
pub fn client_config(cert: Arc<dyn CurrentCert>, roots: Arc<RootCertStore>) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with(cert, TrustBundle::new(roots)?)
}

/// Client side: presents `cert`, verifies the server chain against the
/// roots in force in `bundle` at each handshake.
pub fn client_config_with(cert: Arc<dyn CurrentCert>, bundle: Arc<TrustBundle>) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(ChainOnlyVerifier { bundle, algs: provider.signature_verification_algorithms });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(ClientResolver(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Client config with no client certificate (for the CA's own endpoint,
/// where the agent authenticates with a token).
pub fn anonymous_client_config(roots: Arc<RootCertStore>) -> Result<Arc<ClientConfig>, TlsError> {
    anonymous_client_config_with(TrustBundle::new(roots)?)
}

/// [`anonymous_client_config`] over the roots in force in `bundle`.
pub fn anonymous_client_config_with(bundle: Arc<TrustBundle>) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(ChainOnlyVerifier { bundle, algs: provider.signature_verification_algorithms });
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Verifies the server's chain against the trust bundle and nothing else:
/// the name check is replaced by the SPIFFE ID check of [`peer_identity`],
/// done by the caller before any data flows.
#[derive(Debug)]
struct ChainOnlyVerifier {
    bundle: Arc<TrustBundle>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert =
            webpki::EndEntityCert::try_from(end_entity).map_err(|e| rustls::Error::InvalidCertificate(pki_error(e)))?;
        let roots = self.bundle.roots();
        cert.verify_for_usage(
            self.algs.all,
            &roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::InvalidCertificate(pki_error(e)))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Verifies client certificates against the roots in force at each
/// handshake (rustls's `WebPKI` verifier, rebuilt by the bundle when the
/// roots change). No CA names are sent as hints: agents present their one
/// certificate whatever the hint.
#[derive(Debug)]
struct BundleClientVerifier(Arc<TrustBundle>);

impl ClientCertVerifier for BundleClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.client_verifier().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.client_verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.client_verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.client_verifier().supported_verify_schemes()
    }
}

fn pki_error(e: webpki::Error) -> rustls::CertificateError {
    use rustls::CertificateError as C;
    match e {
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        other => C::Other(rustls::OtherError(Arc::new(other))),
    }
}
