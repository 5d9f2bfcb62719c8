//! The CA server's defences on loopback: reserved identities, the
//! connection caps (global and per source IP), the handshake and header timeouts, the connection
//! deadline. What is asserted is what a client observes (a refusal, a
//! closed connection, how soon).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::{pki_types::ServerName, RootCertStore};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

use super::{reserved_identities, token_path, CaServer, CaSettings, Limits};
use crate::identity::{
    ca_client::{ca_identity, CaError, CertificateAuthority as _, RemoteCa, TokenSource},
    tls, SpiffeId,
};

struct Ca {
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    token: String,
    refused: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
    dir: PathBuf,
}

impl Drop for Ca {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Ca {
    fn client(&self) -> RemoteCa {
        RemoteCa::new(
            self.addr.to_string(),
            TokenSource::Static(self.token.clone()),
            self.roots.clone(),
            "cluster.local",
        )
        .unwrap()
    }

    /// A TLS connection that has sent nothing.
    async fn tls_connection(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        self.tls_over(tcp).await.unwrap()
    }

    /// A TCP connection from `source` (any 127/8 address: loopback accepts
    /// them all as sources).
    async fn tcp_from(&self, source: [u8; 4]) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).expect("binding a 127/8 source address");
        socket.connect(self.addr).await.unwrap()
    }

    /// The TLS handshake over `tcp`; fails if the CA closed it.
    async fn tls_over(&self, tcp: TcpStream) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let connector = tokio_rustls::TlsConnector::from(tls::anonymous_client_config(self.roots.clone()).unwrap());
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        connector.connect(name, tcp).await
    }
}

/// A local-mode CA whose configuration puts `demo/web` and the CA's own
/// service account (`heddle-system/heddle-ca`) on node-a.
async fn start(name: &str, limits: Limits) -> Ca {
    let dir = std::env::temp_dir().join(format!("heddle-ca-srv-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("cluster.yaml");
    std::fs::write(
        &config,
        "workloads:\n  - {name: web, namespace: demo, serviceAccount: web, node: node-a, ips: [\"10.0.0.1\"], enrolled: false}\n  - {name: ca, namespace: heddle-system, serviceAccount: heddle-ca, node: node-a, ips: [\"10.0.0.2\"], enrolled: false}\n  - {name: ca2, namespace: mesh, serviceAccount: heddle-ca, node: node-a, ips: [\"10.0.0.3\"], enrolled: false}\n",
    )
    .unwrap();
    let settings = CaSettings {
        state_dir: dir.join("state"),
        config,
        trust_domain: "cluster.local".into(),
        leaf_ttl: Duration::from_mins(10),
    };
    let server =
        CaServer::new(&settings).unwrap().reserve(reserved_identities("cluster.local", "mesh")).with_limits(limits);
    let roots = tls::roots_from_pem(&server.bundle_pem()).unwrap();
    let refused = server.refused_connections();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(listener, stop.clone()));
    let token = std::fs::read_to_string(token_path(&dir.join("state"), "node-a")).unwrap();
    Ca { addr, roots, token, refused, stop, dir }
}

fn csr(identity: &SpiffeId) -> String {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// Reads until the server closes; how long that took (fails after 5 s).
async fn closed_after(mut conn: impl tokio::io::AsyncRead + Unpin) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let Ok(read) = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await else {
            panic!("the CA kept an idle connection open for 5 s");
        };
        // EOF, or a reset / TLS close without close_notify: closed.
        if !matches!(read, Ok(n) if n > 0) {
            return start.elapsed();
        }
    }
}

fn limits() -> Limits {
    Limits {
        max_connections: 64,
        max_connections_per_ip: 64,
        handshake_timeout: Duration::from_secs(10),
        header_read_timeout: Duration::from_secs(10),
        connection_deadline: Duration::from_secs(30),
    }
}

#[tokio::test]
async fn the_ca_refuses_its_own_identity_to_a_node_that_hosts_its_service_account() {
    let ca = start("reserved", limits()).await;
    let client = ca.client();
    // The configuration does put heddle-system/heddle-ca on node-a.
    for own in [ca_identity("cluster.local"), SpiffeId::new("cluster.local", "mesh", "heddle-ca")] {
        match client.sign(&own, csr(&own)).await {
            Err(CaError::Refused { status: 403, message }) => {
                assert!(
                    message.contains("reserved for the mesh CA") && message.contains(&own.to_string()),
                    "{message}"
                );
            }
            other => panic!("expected 403 for {own}, got {other:?}"),
        }
    }
    let web = SpiffeId::new("cluster.local", "demo", "web");
    client.sign(&web, csr(&web)).await.expect("a workload identity is still issued");
}

#[tokio::test]
async fn a_client_that_sends_no_request_is_closed_after_the_header_timeout() {
    let ca = start("header", Limits { header_read_timeout: Duration::from_millis(300), ..limits() }).await;
    let conn = ca.tls_connection().await;
    let after = closed_after(conn).await;
    assert!(after < Duration::from_secs(3), "closed after {after:?}");
}

#[tokio::test]
async fn a_client_that_never_starts_tls_is_closed_after_the_handshake_timeout() {
    let ca = start("handshake", Limits { handshake_timeout: Duration::from_millis(300), ..limits() }).await;
    let tcp = TcpStream::connect(ca.addr).await.unwrap();
    let after = closed_after(tcp).await;
    assert!(after < Duration::from_secs(3), "closed after {after:?}");
}

#[tokio::test]
async fn a_request_trickling_in_is_closed_at_the_connection_deadline() {
    let ca = start("deadline", Limits { connection_deadline: Duration::from_millis(500), ..limits() }).await;
    let mut conn = ca.tls_connection().await;
    // Headers that never end: only the overall deadline can stop this.
    conn.write_all(b"POST /v1/certificates HTTP/1.1\r\nHost: ca\r\n").await.unwrap();
    conn.flush().await.unwrap();
    let after = closed_after(conn).await;
    assert!(after < Duration::from_secs(3), "closed after {after:?}");
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once_and_counted() {
    let ca = start("cap", Limits { max_connections: 2, ..limits() }).await;
    let held = [ca.tls_connection().await, ca.tls_connection().await];
    // The third is closed before any handshake, long before any timeout.
    let tcp = TcpStream::connect(ca.addr).await.unwrap();
    let after = closed_after(tcp).await;
    assert!(after < Duration::from_secs(2), "closed after {after:?}");
    assert_eq!(ca.refused.load(Ordering::Relaxed), 1);

    // Once a held connection goes, a slot is free again.
    drop(held);
    let web = SpiffeId::new("cluster.local", "demo", "web");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match ca.client().sign(&web, csr(&web)).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "no slot freed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_ip_at_its_cap_does_not_stop_another_and_its_slot_frees_on_close() {
    const GREEDY: [u8; 4] = [127, 0, 0, 2];
    const OTHER: [u8; 4] = [127, 0, 0, 3];
    let ca = start("per-ip", Limits { max_connections_per_ip: 2, ..limits() }).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let tcp = ca.tcp_from(GREEDY).await;
        held.push(ca.tls_over(tcp).await.expect("within the per-IP cap"));
    }
    // A third from the same IP is closed before any handshake.
    let after = closed_after(ca.tcp_from(GREEDY).await).await;
    assert!(after < Duration::from_secs(2), "closed after {after:?}");
    assert_eq!(ca.refused.load(Ordering::Relaxed), 1);

    // Another IP is served as usual, well below the global cap.
    let mut other =
        ca.tls_over(ca.tcp_from(OTHER).await).await.expect("another IP is not limited by the first one's cap");
    other.write_all(b"GET /v1/bundle HTTP/1.1\r\nHost: ca\r\nConnection: close\r\n\r\n").await.unwrap();
    // Bytes read before an unclean close are kept in `response`.
    let mut response = Vec::new();
    let _ = other.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(ca.refused.load(Ordering::Relaxed), 1);

    // Once one of its connections closes, the greedy IP has a slot again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if ca.tls_over(ca.tcp_from(GREEDY).await).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no per-IP slot freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
