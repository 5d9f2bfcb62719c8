//! Identity tests over real TLS handshakes (in memory) and a real CA server
//! on loopback: who is accepted, who is refused, and why.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::{
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    sign::CertifiedKey,
    RootCertStore,
};
use tokio_util::sync::CancellationToken;

use super::{
    authority::Authority,
    ca_client::{CaError, CertificateAuthority, RemoteCa, TokenSource},
    ca_server::{token_path, CaServer, CaSettings},
    certs::CertManager,
    tls::{self, CurrentCert, TlsError},
    SpiffeId,
};

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl CurrentCert for Fixed {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("heddle-id-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn authority(name: &str) -> (Authority, Arc<RootCertStore>) {
    let a = Authority::load_or_create(&temp_dir(name), "cluster.local", Duration::from_hours(1)).unwrap();
    let roots = tls::roots_from_pem(a.bundle_pem()).unwrap();
    (a, roots)
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "demo", sa)
}

fn csr(identity: &SpiffeId) -> (String, KeyPair) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().unwrap())];
    (params.serialize_request(&key).unwrap().pem().unwrap(), key)
}

fn issue(a: &Authority, identity: &SpiffeId, validity: Option<(SystemTime, SystemTime)>) -> Arc<dyn CurrentCert> {
    let (csr, key) = csr(identity);
    let issued = match validity {
        Some((nb, na)) => a.sign_csr_valid(&csr, identity, nb, na),
        None => a.sign_csr(&csr, identity),
    }
    .unwrap();
    let chain: Vec<CertificateDer<'static>> =
        issued.chain_pem.iter().map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap()).collect();
    let signing = tls::provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .unwrap();
    Arc::new(Fixed(Arc::new(CertifiedKey::new(chain, signing))))
}

/// Runs one handshake; returns (server's view of the client, client's view of the server).
async fn handshake(
    server_cert: Arc<dyn CurrentCert>,
    server_roots: Arc<RootCertStore>,
    client_cert: Option<Arc<dyn CurrentCert>>,
    client_roots: Arc<RootCertStore>,
) -> (Result<SpiffeId, String>, Result<SpiffeId, String>) {
    let server = tls::server_config(server_cert, server_roots).unwrap();
    let client = match client_cert {
        Some(cert) => tls::client_config(cert, client_roots).unwrap(),
        None => tls::anonymous_client_config(client_roots).unwrap(),
    };
    handshake_with(server, client).await
}

#[tokio::test]
async fn mutual_tls_authenticates_both_workload_identities() {
    let (a, roots) = authority("mutual");
    let (s, c) = handshake(issue(&a, &id("api"), None), roots.clone(), Some(issue(&a, &id("web"), None)), roots).await;
    assert_eq!(s.unwrap(), id("web"));
    assert_eq!(c.unwrap(), id("api"));
}

#[tokio::test]
async fn a_peer_presenting_another_identity_is_rejected() {
    let (a, roots) = authority("wrongid");
    let cert = issue(&a, &id("intruder"), None);
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor =
        tokio_rustls::TlsAcceptor::from(tls::server_config(issue(&a, &id("api"), None), roots.clone()).unwrap());
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(cert, roots).unwrap());
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let (server, _client) = tokio::join!(acceptor.accept(s), connector.connect(name, c));
    let server = server.unwrap();
    let err = tls::peer_identity(server.get_ref().1.peer_certificates(), Some(&id("web"))).unwrap_err();
    assert!(matches!(err, TlsError::WrongPeer { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "peer identity spiffe://cluster.local/ns/demo/sa/intruder does not match expected spiffe://cluster.local/ns/demo/sa/web"
    );
}

#[tokio::test]
async fn a_client_certificate_from_an_untrusted_ca_is_rejected() {
    let (a, roots) = authority("untrusted-client-a");
    let (other, _) = authority("untrusted-client-b");
    let (s, _) =
        handshake(issue(&a, &id("api"), None), roots.clone(), Some(issue(&other, &id("web"), None)), roots).await;
    let err = s.unwrap_err();
    // Both roots have the same subject, so webpki finds a candidate issuer
    // whose signature does not verify; with different subjects: UnknownIssuer.
    assert!(err.contains("UnknownIssuer") || err.contains("BadSignature"), "{err}");
}

#[tokio::test]
async fn a_server_certificate_from_an_untrusted_ca_is_rejected() {
    let (a, roots) = authority("untrusted-server-a");
    let (other, other_roots) = authority("untrusted-server-b");
    let (_, c) =
        handshake(issue(&other, &id("api"), None), other_roots, Some(issue(&a, &id("web"), None)), roots).await;
    let err = c.unwrap_err();
    assert!(err.contains("UnknownIssuer") || err.contains("BadSignature"), "{err}");
}

#[tokio::test]
async fn an_expired_certificate_is_rejected_on_both_sides() {
    let (a, roots) = authority("expired");
    let now = SystemTime::now();
    let past = Some((now - Duration::from_hours(2), now - Duration::from_hours(1)));
    let (s, _) =
        handshake(issue(&a, &id("api"), None), roots.clone(), Some(issue(&a, &id("web"), past)), roots.clone()).await;
    let err = s.unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");
    let (_, c) = handshake(issue(&a, &id("api"), past), roots.clone(), Some(issue(&a, &id("web"), None)), roots).await;
    let err = c.unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_rejected() {
    let (a, roots) = authority("nocert");
    let (s, _) = handshake(issue(&a, &id("api"), None), roots.clone(), None, roots).await;
    let err = s.unwrap_err();
    assert!(err.contains("NoCertificatesPresented") || err.contains("certificate"), "{err}");
}

fn write_config(dir: &std::path::Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("cluster.yaml");
    std::fs::write(
        &path,
        "workloads:\n  - {name: web, namespace: demo, serviceAccount: web, node: node-a, ips: [\"10.0.0.1\"], enrolled: false}\n  - {name: api, namespace: demo, serviceAccount: api, node: node-b, ips: [\"10.0.0.2\"], enrolled: false}\n",
    )
    .unwrap();
    path
}

/// A CA on loopback and a client for `node`.
async fn ca_and_client(name: &str, node: &str) -> (CancellationToken, RemoteCa, PathBuf) {
    let dir = temp_dir(name);
    let settings = CaSettings {
        state_dir: dir.join("state"),
        config: write_config(&dir),
        trust_domain: "cluster.local".into(),
        leaf_ttl: Duration::from_mins(10),
    };
    let server = CaServer::new(&settings).unwrap();
    let roots = tls::roots_from_pem(&server.bundle_pem()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(listener, stop.clone()));
    let token = std::fs::read_to_string(token_path(&dir.join("state"), node)).unwrap();
    (stop, RemoteCa::new(addr.to_string(), TokenSource::Static(token), roots, "cluster.local").unwrap(), dir)
}

#[tokio::test]
async fn the_ca_signs_an_identity_scheduled_on_the_requesting_node() {
    let (stop, ca, _) = ca_and_client("ca-ok", "node-a").await;
    let (csr, _key) = csr(&id("web"));
    let signed = ca.sign(&id("web"), csr).await.unwrap();
    assert_eq!(signed.chain_pem.len(), 2);
    let leaf = CertificateDer::from_pem_slice(signed.chain_pem[0].as_bytes()).unwrap();
    assert_eq!(tls::spiffe_id_of(&leaf).unwrap(), id("web"));
    stop.cancel();
}

#[tokio::test]
async fn the_ca_refuses_an_identity_from_another_node() {
    let (stop, ca, _) = ca_and_client("ca-other-node", "node-a").await;
    let (csr, _key) = csr(&id("api"));
    let err = ca.sign(&id("api"), csr).await.unwrap_err();
    assert!(
        matches!(&err, CaError::Refused { status: 403, message } if message.contains("not") || message.contains("no workload")),
        "{err}"
    );
    stop.cancel();
}

#[tokio::test]
async fn the_ca_refuses_a_csr_for_another_identity_than_requested() {
    let (stop, ca, _) = ca_and_client("ca-mismatch", "node-a").await;
    let (csr, _key) = csr(&id("api"));
    let err = ca.sign(&id("web"), csr).await.unwrap_err();
    assert!(matches!(err, CaError::Refused { status: 400, .. }), "{err}");
    stop.cancel();
}

#[tokio::test]
async fn the_ca_refuses_an_unknown_node_token() {
    let (stop, ca, dir) = ca_and_client("ca-token", "node-a").await;
    let roots = tls::roots_from_pem(&std::fs::read_to_string(dir.join("state/bundle.pem")).unwrap()).unwrap();
    let addr = ca_addr(&ca);
    let forged = RemoteCa::new(addr, TokenSource::Static("f".repeat(64)), roots, "cluster.local").unwrap();
    let (csr, _key) = csr(&id("web"));
    let err = forged.sign(&id("web"), csr).await.unwrap_err();
    assert!(matches!(err, CaError::Refused { status: 401, .. }), "{err}");
    stop.cancel();
}

fn ca_addr(ca: &RemoteCa) -> String {
    ca.addr().to_owned()
}

#[tokio::test]
async fn the_agent_retries_a_ca_that_is_down_and_serves_once_it_is_up() {
    // Reserve a port, then start nothing on it: the CA is down.
    let dir = temp_dir("ca-down");
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let settings = CaSettings {
        state_dir: dir.join("state"),
        config: write_config(&dir),
        trust_domain: "cluster.local".into(),
        leaf_ttl: Duration::from_mins(10),
    };
    let server = CaServer::new(&settings).unwrap();
    let roots = tls::roots_from_pem(&server.bundle_pem()).unwrap();
    let token = TokenSource::File(token_path(&dir.join("state"), "node-a"));
    let mgr = CertManager::new(Arc::new(RemoteCa::new(addr.to_string(), token, roots, "cluster.local").unwrap()));
    let err = mgr.get(&id("web"), Duration::from_millis(500)).await.unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(listener, stop.clone()));
    let cert = mgr.get(&id("web"), Duration::from_secs(5)).await.unwrap();
    assert_eq!(cert.id, id("web"));
    assert!(mgr.list().iter().all(|c| c.ready && c.last_error.is_none()));
    stop.cancel();
}

#[tokio::test]
async fn the_client_resolves_a_host_name_and_rereads_its_token_file() {
    let (stop, ca, dir) = ca_and_client("ca-name", "node-a").await;
    let port = ca.addr().rsplit_once(':').unwrap().1.to_owned();
    let roots = tls::roots_from_pem(&std::fs::read_to_string(dir.join("state/bundle.pem")).unwrap()).unwrap();
    let token_file = dir.join("rotating.token");
    std::fs::write(&token_file, "stale").unwrap();
    let named =
        RemoteCa::new(format!("localhost:{port}"), TokenSource::File(token_file.clone()), roots, "cluster.local")
            .unwrap();
    let (csr1, _key) = csr(&id("web"));
    let err = named.sign(&id("web"), csr1).await.unwrap_err();
    assert!(matches!(err, CaError::Refused { status: 401, .. }), "{err}");
    // The kubelet rotates the token in place: the next request uses it.
    let good = std::fs::read_to_string(token_path(&dir.join("state"), "node-a")).unwrap();
    std::fs::write(&token_file, format!("{good}\n")).unwrap();
    let (csr2, _key) = csr(&id("web"));
    named.sign(&id("web"), csr2).await.unwrap();
    stop.cancel();
}

/// One handshake between two configs; returns (server's view of the
/// client, client's view of the server). Both ends stay open until both
/// handshakes are over.
async fn handshake_with(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> (Result<SpiffeId, String>, Result<SpiffeId, String>) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let connector = tokio_rustls::TlsConnector::from(client);
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let (server, client) = tokio::join!(acceptor.accept(s), connector.connect(name, c));
    let s = server
        .map_err(|e| e.to_string())
        .and_then(|t| tls::peer_identity(t.get_ref().1.peer_certificates(), None).map_err(|e| e.to_string()));
    let c = client
        .map_err(|e| e.to_string())
        .and_then(|t| tls::peer_identity(t.get_ref().1.peer_certificates(), None).map_err(|e| e.to_string()));
    (s, c)
}

#[tokio::test]
async fn a_replaced_trust_bundle_applies_to_the_next_handshake_of_existing_configs() {
    use super::bundle::TrustBundle;
    let (old, old_roots) = authority("bundle-old");
    let (new, new_roots) = authority("bundle-new");
    // The server's certificate comes from the new root; both sides trust
    // only the old one at first.
    let server_bundle = TrustBundle::new(old_roots.clone()).unwrap();
    let client_bundle = TrustBundle::new(old_roots).unwrap();
    let server = tls::server_config_with(issue(&new, &id("api"), None), server_bundle.clone()).unwrap();
    let client = tls::client_config_with(issue(&old, &id("web"), None), client_bundle.clone()).unwrap();
    let (_, c) = handshake_with(server.clone(), client.clone()).await;
    assert!(c.is_err(), "a server from an untrusted root was accepted");

    // Rotation: both bundles now hold both roots; the same configs accept.
    let both = tls::roots_from_pem(&format!("{}{}", old.bundle_pem(), new.bundle_pem())).unwrap();
    server_bundle.replace(both.clone()).unwrap();
    client_bundle.replace(both).unwrap();
    let (s, c) = handshake_with(server.clone(), client.clone()).await;
    assert_eq!(s.unwrap(), id("web"));
    assert_eq!(c.unwrap(), id("api"));

    // The old root removed from the server's bundle: the old-root client is refused.
    server_bundle.replace(new_roots).unwrap();
    let (s, _) = handshake_with(server, client).await;
    assert!(s.is_err(), "a client from a removed root was accepted");
}

#[tokio::test]
async fn the_bundle_watcher_swaps_in_a_changed_file_and_keeps_the_roots_on_a_bad_one() {
    use super::bundle::{watch_file, TrustBundle};
    let (old, old_roots) = authority("watch-old");
    let (new, _) = authority("watch-new");
    let dir = temp_dir("watch-file");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("root-cert.pem");
    std::fs::write(&path, old.bundle_pem()).unwrap();
    let bundle = TrustBundle::new(old_roots).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let every = Duration::from_millis(20);
    let task = tokio::spawn(watch_file(path.clone(), bundle.clone(), old.bundle_pem().to_owned(), every, stop.clone()));
    // Garbage: the roots in force stay.
    std::fs::write(&path, "not a certificate").unwrap();
    tokio::time::sleep(every * 5).await;
    assert_eq!(bundle.roots().len(), 1);
    // Both roots: swapped in.
    std::fs::write(&path, format!("{}{}", old.bundle_pem(), new.bundle_pem())).unwrap();
    for _ in 0..100 {
        tokio::time::sleep(every).await;
        if bundle.roots().len() == 2 {
            break;
        }
    }
    assert_eq!(bundle.roots().len(), 2);
    stop.cancel();
    task.await.unwrap();
}

/// Signs once, with a lifetime of two seconds, then is down for good.
struct OnceThenDown {
    authority: Authority,
    signed: std::sync::atomic::AtomicBool,
}

impl CertificateAuthority for OnceThenDown {
    fn sign<'a>(
        &'a self,
        identity: &'a SpiffeId,
        csr_pem: String,
    ) -> super::ca_client::BoxFuture<'a, Result<super::ca_client::SignedChain, CaError>> {
        Box::pin(async move {
            if self.signed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return Err(CaError::Timeout);
            }
            let now = SystemTime::now();
            let issued = self.authority.sign_csr_valid(&csr_pem, identity, now, now + Duration::from_secs(2)).unwrap();
            Ok(super::ca_client::SignedChain { chain_pem: issued.chain_pem, not_after: issued.not_after })
        })
    }
}

#[tokio::test]
async fn an_expired_certificate_is_never_presented_and_is_reported_expired() {
    let (authority, _) = authority("expiry");
    let mgr = CertManager::new(Arc::new(OnceThenDown { authority, signed: false.into() }));
    let web = id("web");
    let cert = mgr.get(&web, Duration::from_secs(5)).await.unwrap();
    let handle = mgr.ensure(&web);
    assert!(handle.current().is_some() && mgr.list()[0].ready);
    tokio::time::sleep(cert.not_after.duration_since(SystemTime::now()).unwrap_or_default()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(handle.current().is_none(), "an expired certificate is still presented");
    let err = mgr.get(&web, Duration::from_millis(300)).await.unwrap_err();
    assert_eq!(err.reason(), "certificate_expired", "{err}");
    assert!(err.to_string().contains("timed out"), "the renewal's error is not named: {err}");
    let status = &mgr.list()[0];
    assert!(status.expired && !status.ready, "{status:?}");
}
