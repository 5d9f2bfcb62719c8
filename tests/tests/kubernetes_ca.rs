//! The mesh CA in Kubernetes mode against the API-server stand-in: the real
//! `mesh-agent ca --kubernetes` binary (KUBECONFIG pointing at the stand-in
//! on loopback) and the agents' real CA client (`RemoteCa`, TLS 1.3, the
//! CA's SPIFFE ID checked). What is shown: the root Secret and the trust
//! bundle `ConfigMap` are created on first start and reused after; a supplied
//! Secret is used as is and a malformed one stops the CA naming it; a node
//! authenticated by `TokenReview` gets certificates for the pods on its node
//! and only for those; unknown tokens, tokens for another audience and
//! tokens of another service account are refused; an API server that is
//! down gives 503 (fail closed); a repeated token costs one `TokenReview`;
//! the CA's own identity is never issued; a root Secret whose key does not
//! match its certificate stops the CA. Needs no root.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use base64::Engine as _;
use heddle_tests::apiserver::{ApiServer, TokenUser};
use mesh_agent::identity::{
    authority::create_root,
    ca_client::{CaError, CertificateAuthority as _, RemoteCa, TokenSource},
    certs::new_key_and_csr,
    tls, SpiffeId,
};
use serde_json::{json, Value};

use heddle_tests::kube_ca::{
    CA_AUDIENCE, CA_NAMESPACE as NS, NODE_NAME_EXTRA, TRUST_BUNDLE_CONFIGMAP, TRUST_BUNDLE_KEY,
};

/// The agents' service-account user ([`heddle_tests::kube_ca::AGENT_SERVICE_ACCOUNT`] in [`NS`]).
const AGENT_USER: &str = "system:serviceaccount:heddle-system:heddle-agent";

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("heddle-kca-{name}-{}-{}", std::process::id(), rand_suffix()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::from(d.subsec_nanos()))
}

/// `mesh-agent ca --kubernetes` as a child process, killed on drop.
struct CaProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl CaProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The CA's kubeconfig (its own token registered with the stand-in), in a
/// cluster that has the CA's namespace.
fn kubeconfig(api: &ApiServer, dir: &Path) -> Result<PathBuf> {
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))?;
    let path = dir.join("kubeconfig");
    api.add_token(
        "ca-token",
        TokenUser {
            username: "system:serviceaccount:heddle-system:heddle-ca".into(),
            uid: "ca-uid".into(),
            groups: vec!["system:serviceaccounts".into()],
            audiences: vec!["https://kubernetes.default.svc".into()],
            extra: BTreeMap::new(),
        },
    );
    api.write_kubeconfig(&path, "ca-token")?;
    Ok(path)
}

/// Starts the CA; waits until it listens, or fails with its log if it exits.
fn start_ca(kubeconfig: &Path, dir: &Path) -> Result<CaProcess> {
    let mut child = spawn_ca(kubeconfig, dir)?;
    let addr = child.1;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect(addr).is_ok() {
            return Ok(CaProcess { child: child.0, addr, log: dir.join("ca.log") });
        }
        if let Some(status) = child.0.try_wait()? {
            bail!(
                "the CA exited ({status}) before listening:\n{}",
                std::fs::read_to_string(dir.join("ca.log")).unwrap_or_default()
            );
        }
        ensure!(Instant::now() < deadline, "the CA did not listen on {addr} within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_ca(kubeconfig: &Path, dir: &Path) -> Result<(Child, SocketAddr)> {
    let bin = heddle_tests::agent_binary()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = std::fs::File::create(dir.join("ca.log"))?;
    let child = Command::new(bin)
        .args(["ca", "--kubernetes", "--ttl-seconds", "600"])
        .env("HEDDLE_CA_LISTEN", addr.to_string())
        .env("KUBECONFIG", kubeconfig)
        .env("POD_NAMESPACE", NS)
        .env("HEDDLE_TRUST_DOMAIN", "cluster.local")
        .env("HEDDLE_LOG", "info")
        .env("RUST_BACKTRACE", "0")
        .env("HEDDLE_CA_STATE_DIR", dir.join("state"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("HEDDLE_CONFIG")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting mesh-agent ca --kubernetes")?;
    Ok((child, addr))
}

fn b64(v: &Value) -> String {
    let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default()).unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
}

fn pod(ns: &str, name: &str, sa: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.9"}
    })
}

fn agent_token(api: &ApiServer, token: &str, username: &str, audiences: &[&str], node: &str) {
    api.add_token(
        token,
        TokenUser {
            username: username.into(),
            uid: format!("{token}-uid"),
            groups: vec!["system:serviceaccounts".into()],
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
            extra: BTreeMap::from([(NODE_NAME_EXTRA.to_owned(), vec![node.to_owned()])]),
        },
    );
}

/// The agents' client for the CA, with its token in a file (as projected).
fn client(ca: &CaProcess, bundle: &str, dir: &Path, token: &str) -> Result<RemoteCa> {
    let token_file = dir.join(format!("{token}.token"));
    std::fs::write(&token_file, token)?;
    let roots = tls::roots_from_pem(bundle)?;
    Ok(RemoteCa::new(ca.addr.to_string(), TokenSource::File(token_file), roots, "cluster.local")?)
}

fn sign(ca: &RemoteCa, id: &SpiffeId) -> Result<Vec<String>, CaError> {
    let (csr, _key) = new_key_and_csr(id).expect("csr");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(ca.sign(id, csr)).map(|s| s.chain_pem)
}

fn published_bundle(api: &ApiServer) -> Result<String> {
    let cm = api.get("v1", "ConfigMap", Some(NS), TRUST_BUNDLE_CONFIGMAP).context("the trust-bundle ConfigMap")?;
    Ok(cm["data"][TRUST_BUNDLE_KEY].as_str().unwrap_or_default().to_owned())
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa)
}

#[test]
fn the_ca_creates_its_root_secret_and_trust_bundle_on_first_start_and_reuses_them() -> Result<()> {
    let api = ApiServer::start()?;
    let dir = TempDir::new("first");
    let kc = kubeconfig(&api, &dir.0)?;
    let ca = start_ca(&kc, &dir.0)?;

    let secret =
        api.get("v1", "Secret", Some(NS), "heddle-ca-root").context("the CA did not create its root Secret")?;
    ensure!(secret["type"] == "kubernetes.io/tls", "secret type: {secret}");
    let cert = b64(&secret["data"]["tls.crt"]);
    let key = b64(&secret["data"]["tls.key"]);
    ensure!(cert.contains("BEGIN CERTIFICATE") && key.contains("PRIVATE KEY"), "{secret}");
    ensure!(published_bundle(&api)? == cert, "the bundle is the new root");
    ensure!(!dir.0.join("state").exists(), "Kubernetes mode keeps the key in memory: nothing in the state directory");
    drop(ca);

    // A restart (another replica, a new pod) uses the same root.
    let ca = start_ca(&kc, &dir.0)?;
    let again = api.get("v1", "Secret", Some(NS), "heddle-ca-root").context("root Secret")?;
    ensure!(b64(&again["data"]["tls.crt"]) == cert, "the root was replaced on restart");
    ensure!(published_bundle(&api)? == cert);
    ensure!(ca.log().contains("using the mesh root from the Secret"), "{}", ca.log());
    Ok(())
}

#[test]
fn the_ca_uses_a_supplied_root_secret_as_is() -> Result<()> {
    let api = ApiServer::start()?;
    let dir = TempDir::new("supplied");
    let (cert, key) = create_root("cluster.local")?;
    let (old_root, _) = create_root("cluster.local")?;
    let bundle = format!("{old_root}{cert}");
    let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    api.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"namespace": NS, "name": "heddle-ca-root"},
        "data": {"tls.crt": enc(&cert), "tls.key": enc(&key), "ca.crt": enc(&bundle)}
    }))?;
    api.apply(pod("demo", "web-1", "web", "node-a"))?;
    agent_token(&api, "agent-a", AGENT_USER, &[CA_AUDIENCE], "node-a");
    let kc = kubeconfig(&api, &dir.0)?;
    let ca = start_ca(&kc, &dir.0)?;

    ensure!(published_bundle(&api)? == bundle, "ca.crt is the published bundle");
    let secret = api.get("v1", "Secret", Some(NS), "heddle-ca-root").context("root Secret")?;
    ensure!(b64(&secret["data"]["tls.crt"]) == cert, "the supplied Secret was changed");
    // Leaves chain to the supplied root and verify with the old+new bundle.
    let chain = sign(&client(&ca, &bundle, &dir.0, "agent-a")?, &id("demo", "web"))?;
    ensure!(chain[1] == cert, "signed by the supplied root");
    Ok(())
}

#[test]
fn a_malformed_root_secret_stops_the_ca_with_a_message_naming_it() -> Result<()> {
    let api = ApiServer::start()?;
    let dir = TempDir::new("malformed");
    let (cert, _) = create_root("cluster.local")?;
    api.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"namespace": NS, "name": "heddle-ca-root"},
        "data": {"tls.crt": base64::engine::general_purpose::STANDARD.encode(&cert)}
    }))?;
    let kc = kubeconfig(&api, &dir.0)?;
    let log = ca_exit_log(&kc, &dir.0)?;
    ensure!(log.contains("Secret heddle-system/heddle-ca-root is malformed: key tls.key: missing"), "{log}");
    Ok(())
}

/// Starts the CA, expects it to exit unsuccessfully within 20 s, and
/// returns its log.
fn ca_exit_log(kc: &Path, dir: &Path) -> Result<String> {
    let (mut child, _) = spawn_ca(kc, dir)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the CA kept running with an unusable root Secret");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    std::fs::File::open(dir.join("ca.log"))?.read_to_string(&mut log)?;
    ensure!(!status.success(), "exit status {status}");
    Ok(log)
}

#[test]
fn a_root_secret_whose_key_is_not_the_certificates_stops_the_ca_naming_it() -> Result<()> {
    let api = ApiServer::start()?;
    let dir = TempDir::new("mismatch");
    let (cert, _) = create_root("cluster.local")?;
    let (_, other_key) = create_root("cluster.local")?;
    let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    api.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"namespace": NS, "name": "heddle-ca-root"},
        "data": {"tls.crt": enc(&cert), "tls.key": enc(&other_key)}
    }))?;
    let kc = kubeconfig(&api, &dir.0)?;
    let log = ca_exit_log(&kc, &dir.0)?;
    ensure!(
        log.contains(
            "CA root key in Secret heddle-system/heddle-ca-root key tls.key does not match \
             the certificate in Secret heddle-system/heddle-ca-root key tls.crt"
        ),
        "{log}"
    );
    ensure!(
        api.get("v1", "ConfigMap", Some(NS), TRUST_BUNDLE_CONFIGMAP).is_none(),
        "a bundle was published from an unusable root"
    );
    Ok(())
}

#[test]
fn a_node_gets_certificates_only_for_identities_of_pods_on_its_node() -> Result<()> {
    let api = ApiServer::start()?;
    let dir = TempDir::new("authz");
    api.apply(pod("demo", "web-1", "web", "node-a"))?;
    api.apply(pod("demo", "api-1", "api", "node-b"))?;
    agent_token(&api, "agent-a", AGENT_USER, &[CA_AUDIENCE], "node-a");
    let kc = kubeconfig(&api, &dir.0)?;
    let ca = start_ca(&kc, &dir.0)?;
    let bundle = published_bundle(&api)?;
    let agent_a = client(&ca, &bundle, &dir.0, "agent-a")?;

    let chain = sign(&agent_a, &id("demo", "web"))?;
    ensure!(tls::spiffe_id_of_pem(&chain[0])? == id("demo", "web"));

    // The pod of demo/api runs on node-b: node-a may not have its identity.
    match sign(&agent_a, &id("demo", "api")) {
        Err(CaError::Refused { status: 403, message }) => ensure!(
            message.contains("node-a") && message.contains("spiffe://cluster.local/ns/demo/sa/api"),
            "{message}"
        ),
        other => bail!("expected 403, got {other:?}"),
    }
    // Nor an identity no pod has anywhere.
    ensure!(matches!(sign(&agent_a, &id("demo", "ghost")), Err(CaError::Refused { status: 403, .. })));
    // The CA asked the API server with the heddle-ca audience.
    let reviews: Vec<_> =
        api.requests().into_iter().filter(|r| r.method == "POST" && r.path.ends_with("/tokenreviews")).collect();
    ensure!(!reviews.is_empty(), "no TokenReview was made");
    // A pod moving to node-a (deleted on b, created on a) is granted at once.
    api.delete("v1", "Pod", Some("demo"), "api-1")?;
    api.apply(pod("demo", "api-2", "api", "node-a"))?;
    sign(&agent_a, &id("demo", "api")).context("after the pod moved to node-a")?;
    Ok(())
}

#[test]
fn tokens_that_are_unknown_for_another_audience_or_of_another_account_are_refused() -> Result<()> {
    let api = ApiServer::start()?;
    let dir = TempDir::new("authn");
    api.apply(pod("demo", "web-1", "web", "node-a"))?;
    agent_token(&api, "wrong-aud", AGENT_USER, &["https://kubernetes.default.svc"], "node-a");
    agent_token(&api, "other-sa", "system:serviceaccount:demo:web", &[CA_AUDIENCE], "node-a");
    let kc = kubeconfig(&api, &dir.0)?;
    let ca = start_ca(&kc, &dir.0)?;
    let bundle = published_bundle(&api)?;
    for token in ["never-issued", "wrong-aud", "other-sa"] {
        let c = client(&ca, &bundle, &dir.0, token)?;
        match sign(&c, &id("demo", "web")) {
            Err(CaError::Refused { status: 401, .. }) => {}
            other => bail!("token {token}: expected 401, got {other:?}"),
        }
    }
    Ok(())
}

/// A pod-bound token of a pod's own account (what the waypoint
/// Deployment projects), reviewed as the API server would.
fn pod_token(api: &ApiServer, token: &str, ns: &str, sa: &str, pod: &str, node: &str) {
    api.add_token(
        token,
        TokenUser {
            username: format!("system:serviceaccount:{ns}:{sa}"),
            uid: format!("{token}-uid"),
            groups: vec!["system:serviceaccounts".into()],
            audiences: vec![CA_AUDIENCE.to_owned()],
            extra: BTreeMap::from([
                (NODE_NAME_EXTRA.to_owned(), vec![node.to_owned()]),
                ("authentication.kubernetes.io/pod-name".to_owned(), vec![pod.to_owned()]),
            ]),
        },
    );
}

#[test]
fn a_waypoint_pod_gets_its_own_identity_with_its_own_token_and_nothing_else() -> Result<()> {
    let api = ApiServer::start()?;
    let dir = TempDir::new("waypoint");
    let mut wp = pod("demo", "waypoint-7d9c", "waypoint", "node-a");
    wp["metadata"]["labels"] = json!({"gateway.networking.k8s.io/gateway-name": "waypoint"});
    api.apply(wp)?;
    api.apply(pod("demo", "web-1", "web", "node-a"))?;
    pod_token(&api, "waypoint-token", "demo", "waypoint", "waypoint-7d9c", "node-a");
    pod_token(&api, "web-token", "demo", "web", "web-1", "node-a");
    let kc = kubeconfig(&api, &dir.0)?;
    let ca = start_ca(&kc, &dir.0)?;
    let bundle = published_bundle(&api)?;
    let waypoint = client(&ca, &bundle, &dir.0, "waypoint-token")?;
    let chain = sign(&waypoint, &id("demo", "waypoint")).context("the waypoint's own identity")?;
    ensure!(!chain.is_empty(), "no certificate chain");
    // Not another identity, even of a pod on the same node.
    match sign(&waypoint, &id("demo", "web")) {
        Err(CaError::Refused { status: 403, message }) => ensure!(message.contains("its own identity"), "{message}"),
        other => bail!("expected 403 for another identity, got {other:?}"),
    }
    // An ordinary pod's own token gets nothing: its node agent asks for it.
    let web = client(&ca, &bundle, &dir.0, "web-token")?;
    match sign(&web, &id("demo", "web")) {
        Err(CaError::Refused { status: 403, message }) => ensure!(message.contains("waypoint pod"), "{message}"),
        other => bail!("expected 403 for a non-waypoint pod, got {other:?}"),
    }
    // A waypoint pod that is gone gets nothing more.
    api.delete("v1", "Pod", Some("demo"), "waypoint-7d9c")?;
    ensure!(matches!(sign(&waypoint, &id("demo", "waypoint")), Err(CaError::Refused { status: 403, .. })));
    Ok(())
}

#[test]
fn the_ca_answers_503_when_the_api_server_is_down() -> Result<()> {
    let api = ApiServer::start()?;
    let dir = TempDir::new("down");
    api.apply(pod("demo", "web-1", "web", "node-a"))?;
    agent_token(&api, "agent-a", AGENT_USER, &[CA_AUDIENCE], "node-a");
    let kc = kubeconfig(&api, &dir.0)?;
    let ca = start_ca(&kc, &dir.0)?;
    let bundle = published_bundle(&api)?;
    let agent_a = client(&ca, &bundle, &dir.0, "agent-a")?;
    sign(&agent_a, &id("demo", "web")).context("with the API server up")?;
    drop(api);
    match sign(&agent_a, &id("demo", "web")) {
        Err(CaError::Refused { status: 503, message }) => {
            ensure!(message.contains("API server"), "{message}");
        }
        other => bail!("expected 503, got {other:?}"),
    }
    ensure!(ca.log().contains("fail closed"), "the refusal is logged: {}", ca.log());
    Ok(())
}

fn token_reviews(api: &ApiServer) -> usize {
    api.requests().iter().filter(|r| r.method == "POST" && r.path.ends_with("/tokenreviews")).count()
}

#[test]
fn a_repeated_token_is_answered_from_the_cache_without_a_second_token_review() -> Result<()> {
    let api = ApiServer::start()?;
    let dir = TempDir::new("cache");
    api.apply(pod("demo", "web-1", "web", "node-a"))?;
    api.apply(pod("demo", "api-1", "api", "node-a"))?;
    agent_token(&api, "agent-a", AGENT_USER, &[CA_AUDIENCE], "node-a");
    let kc = kubeconfig(&api, &dir.0)?;
    let ca = start_ca(&kc, &dir.0)?;
    let bundle = published_bundle(&api)?;
    let before = token_reviews(&api);

    // A flood of one bad token: refused every time, reviewed once.
    let bad = client(&ca, &bundle, &dir.0, "never-issued")?;
    for _ in 0..5 {
        match sign(&bad, &id("demo", "web")) {
            Err(CaError::Refused { status: 401, .. }) => {}
            other => bail!("expected 401, got {other:?}"),
        }
    }
    ensure!(
        token_reviews(&api) == before + 1,
        "{} TokenReviews for one bad token repeated 5 times",
        token_reviews(&api) - before
    );

    // An agent asking for each of its identities is reviewed once too.
    let agent_a = client(&ca, &bundle, &dir.0, "agent-a")?;
    sign(&agent_a, &id("demo", "web"))?;
    sign(&agent_a, &id("demo", "api"))?;
    ensure!(token_reviews(&api) == before + 2, "good token reviewed more than once");
    Ok(())
}

#[test]
fn the_ca_never_issues_its_own_identity_even_to_the_node_that_hosts_its_pod() -> Result<()> {
    let api = ApiServer::start()?;
    let dir = TempDir::new("reserved");
    // A pod with the CA's service account on node-a: its agent may not get
    // the identity agents check the CA by.
    api.apply(pod(NS, "heddle-ca-0", "heddle-ca", "node-a"))?;
    agent_token(&api, "agent-a", AGENT_USER, &[CA_AUDIENCE], "node-a");
    let kc = kubeconfig(&api, &dir.0)?;
    let ca = start_ca(&kc, &dir.0)?;
    let bundle = published_bundle(&api)?;
    let agent_a = client(&ca, &bundle, &dir.0, "agent-a")?;
    match sign(&agent_a, &id(NS, "heddle-ca")) {
        Err(CaError::Refused { status: 403, message }) => ensure!(
            message.contains("spiffe://cluster.local/ns/heddle-system/sa/heddle-ca")
                && message.contains("reserved for the mesh CA"),
            "{message}"
        ),
        other => bail!("expected 403, got {other:?}"),
    }
    Ok(())
}
