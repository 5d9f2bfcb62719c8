//! The `heddle` CLI against the API-server stand-in: the real binary, with
//! KUBECONFIG pointing at the stand-in on loopback. `heddle enroll` and
//! `unenroll` set and remove the namespace label (checked in the stand-in's
//! store), with clear messages for the no-op and error cases; `heddle --node
//! NODE status` reaches the agent's admin API through the API server's
//! port-forward (a small HTTP server in the test answers as the agent does).
//! Needs no root.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{ensure, Context as _, Result};
use heddle_tests::apiserver::{ApiServer, TokenUser};
use serde_json::{json, Value};

const LABEL: &str = "heddle.dev/mesh";

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("heddle-kcli-{name}-{}", std::process::id()));
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

/// A stand-in and a kubeconfig for an admin user.
fn cluster(dir: &Path) -> Result<(ApiServer, PathBuf)> {
    let api = ApiServer::start()?;
    api.add_token(
        "admin-token",
        TokenUser {
            username: "kubernetes-admin".into(),
            uid: "admin".into(),
            groups: vec!["system:masters".into()],
            audiences: vec!["https://kubernetes.default.svc".into()],
            extra: BTreeMap::new(),
        },
    );
    let kc = dir.join("kubeconfig");
    api.write_kubeconfig(&kc, "admin-token")?;
    Ok((api, kc))
}

/// Runs `heddle <args>` with `kubeconfig`; returns (exit code, stdout, stderr).
fn heddle(kubeconfig: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(heddle_tests::heddle_binary()?)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("HEDDLE_AGENT")
        .output()
        .context("running heddle")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn namespace(api: &ApiServer, name: &str) -> Result<Value> {
    api.get("v1", "Namespace", None, name).context("namespace")
}

#[test]
fn enroll_sets_the_namespace_label_and_unenroll_removes_it() -> Result<()> {
    let dir = TempDir::new("enroll");
    let (api, kc) = cluster(&dir.0)?;
    api.apply(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "demo", "labels": {"team": "payments"}}
    }))?;

    let (code, out, err) = heddle(&kc, &["enroll", "demo"])?;
    ensure!(code == 0, "enroll failed: {err}");
    ensure!(out.contains("namespace demo enrolled"), "{out}");
    let ns = namespace(&api, "demo")?;
    ensure!(ns["metadata"]["labels"][LABEL] == "enabled", "label not set: {ns}");
    ensure!(ns["metadata"]["labels"]["team"] == "payments", "other labels kept: {ns}");

    let (code, out, _) = heddle(&kc, &["enroll", "demo"])?;
    ensure!(code == 0 && out.contains("already enrolled"), "{out}");

    let (code, out, err) = heddle(&kc, &["unenroll", "demo"])?;
    ensure!(code == 0, "unenroll failed: {err}");
    ensure!(out.contains("namespace demo unenrolled"), "{out}");
    let ns = namespace(&api, "demo")?;
    ensure!(ns["metadata"]["labels"].get(LABEL).is_none(), "label not removed: {ns}");
    ensure!(ns["metadata"]["labels"]["team"] == "payments", "other labels kept: {ns}");

    let (code, out, _) = heddle(&kc, &["unenroll", "demo"])?;
    ensure!(code == 0 && out.contains("is not enrolled"), "{out}");
    // The label was changed with a JSON merge patch.
    ensure!(
        api.requests().iter().any(|r| r.method == "PATCH" && r.path == "/api/v1/namespaces/demo"),
        "no PATCH of the namespace"
    );
    Ok(())
}

#[test]
fn enrolling_an_unknown_namespace_fails_with_a_clear_message() -> Result<()> {
    let dir = TempDir::new("unknown");
    let (api, kc) = cluster(&dir.0)?;
    let (code, _, err) = heddle(&kc, &["enroll", "nope"])?;
    ensure!(code != 0, "exit 0 for an unknown namespace");
    ensure!(err.contains("namespace nope not found"), "{err}");

    // The API server gone: the message names it.
    let url = api.url();
    drop(api);
    let (code, _, err) = heddle(&kc, &["enroll", "demo"])?;
    ensure!(code != 0, "exit 0 without an API server");
    ensure!(err.contains(&format!("cannot reach the API server at {}", url.trim_end_matches('/'))), "{err}");
    Ok(())
}

/// A minimal agent admin API: answers the paths `heddle status` reads.
fn fake_agent(node: &str) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let node = node.to_owned();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let node = node.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut conn = conn;
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                            break;
                        }
                    }
                    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
                    let body = match path {
                        "/stats" => json!({"node": node, "activeConnections": 3, "flowsDropped": 0, "openFds": 12}),
                        "/datapath" => json!({"programs": [{"program": "heddle_connect4", "attach": "cgroup/connect4", "target": "/sys/fs/cgroup"}], "maps": {}}),
                        "/certs" => json!({"mtls": false, "certificates": []}),
                        "/policies" => json!({"loaded": [], "errors": []}),
                        "/workloads" => json!([{"namespace": "demo", "name": "web", "local": true, "enrolled": true, "captured": true}]),
                        _ => json!({"error": "not found"}),
                    }
                    .to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if conn.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

fn agent_pod(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "heddle-system", "name": name,
                     "labels": {"app.kubernetes.io/name": "heddle-agent"}},
        "spec": {"nodeName": node, "serviceAccountName": "heddle-agent", "hostNetwork": true,
                 "containers": [{"name": "agent", "image": "heddle"}]},
        "status": {"phase": "Running"}
    })
}

#[test]
fn status_on_a_node_reaches_its_agent_through_the_api_server_port_forward() -> Result<()> {
    let dir = TempDir::new("node");
    let (api, kc) = cluster(&dir.0)?;
    let agent_a = fake_agent("node-a")?;
    let agent_b = fake_agent("node-b")?;
    api.apply(agent_pod("heddle-agent-aaaaa", "node-a"))?;
    api.apply(agent_pod("heddle-agent-bbbbb", "node-b"))?;
    api.port_forward_to("heddle-system", "heddle-agent-aaaaa", agent_a);
    api.port_forward_to("heddle-system", "heddle-agent-bbbbb", agent_b);

    let (code, out, err) = heddle(&kc, &["--node", "node-a", "status"])?;
    ensure!(code == 0, "heddle --node node-a status failed: {err}");
    ensure!(out.contains("up on node node-a"), "{out}");
    ensure!(out.contains("1 on this node, 1 enrolled, 1 captured"), "{out}");
    ensure!(
        api.requests()
            .iter()
            .any(|r| r.path.ends_with("/namespaces/heddle-system/pods/heddle-agent-aaaaa/portforward")),
        "no port-forward to node-a's agent pod"
    );
    let (code, out, err) = heddle(&kc, &["workloads", "--node", "node-b", "-o", "json"])?;
    ensure!(code == 0, "{err}");
    ensure!(out.contains("\"web\""), "{out}");

    // No agent on the node: said so, by name.
    let (code, _, err) = heddle(&kc, &["--node", "node-c", "status"])?;
    ensure!(code != 0, "exit 0 without an agent pod");
    ensure!(err.contains("no heddle-agent pod on node node-c"), "{err}");
    Ok(())
}
