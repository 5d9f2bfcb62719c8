//! Bookinfo in the test bed: Istio's reference application, rebuilt small
//! in two languages, meshed by Heddle with a waypoint, and the walkthrough
//! that `cargo xtask demo bookinfo` prints and `tests/bookinfo.rs` asserts
//! step by step ([`walkthrough`]).
//!
//! ```text
//! node-a: curl (the user's client), productpage-v1 (Python), details-v1 (Python)
//! node-b: reviews-v1, -v2, -v3 (Rust, pod-app reviews), ratings-v1 (Python),
//!         waypoint (default/waypoint; an OTLP receiver beside it)
//! services (namespace default, port 9080): productpage 10.96.1.1,
//!         reviews 10.96.1.2, ratings 10.96.1.3, details 10.96.1.4
//! namespace default: useWaypoint waypoint; trust domain cluster.local
//! ```
//!
//! Every pod but the waypoint is enrolled; each service has its own
//! service account (`bookinfo-<service>`, as Istio's Bookinfo), so every
//! hop is authenticated as a distinct SPIFFE identity. Namespace `default`,
//! as in Istio's tutorial, so its traffic files apply unchanged.
//! [`Bookinfo::apply`] (the walkthrough's `$ apply FILE`) does to the
//! waypoint's routes directory what `kubectl apply -f FILE` does to the
//! API: each object replaces the one of the same kind, namespace and name.

pub mod reviews;
pub mod walkthrough;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize as _;
use serde_json::Value;

use crate::env::asset;
use crate::error::{Result, TestbedError};
use crate::waypoint::{Waypoint, GATEWAY_NAME_LABEL};
use crate::{Agent, CaOptions, Node, Pod, PodSpec, Process, ServiceSpec, Testbed};

/// Bookinfo's namespace (Istio's tutorial uses `default`).
pub const NAMESPACE: &str = "default";
/// Every Bookinfo service's port.
pub const PORT: u16 = 9080;
/// productpage's Service address.
pub const PRODUCTPAGE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 1, 1), PORT);
/// reviews' Service address.
pub const REVIEWS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 1, 2), PORT);
/// ratings' Service address.
pub const RATINGS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 1, 3), PORT);
/// details' Service address.
pub const DETAILS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 1, 4), PORT);
/// Where the waypoint exports spans (an OTLP/gRPC receiver in its pod).
pub const OTLP_PORT: u16 = 4317;
/// The waypoint's name.
pub const WAYPOINT: &str = "waypoint";

/// The running application. Fields drop in order: processes, then the bed.
pub struct Bookinfo {
    apps: Vec<Process>,
    receiver: Process,
    /// Spans the OTLP receiver decoded, one JSON object per line.
    pub spans_file: PathBuf,
    /// The namespace's waypoint.
    pub waypoint: Waypoint,
    /// node-a's and node-b's agents.
    pub agents: [Agent; 2],
    /// The user's client pod (`curl`, sa `curl`).
    pub curl: Pod,
    /// The application's pods, productpage first.
    pub pods: Vec<Pod>,
    /// Where the walkthrough writes what it renders (the graph's SVG).
    pub out_dir: PathBuf,
    applied: Mutex<BTreeMap<String, Value>>,
    /// The nodes (node-a, node-b).
    pub nodes: [Node; 2],
    /// The test bed.
    pub tb: Testbed,
}

/// One pod of the application: name, service account, labels, node index.
struct PodPlan {
    name: &'static str,
    app: &'static str,
    version: &'static str,
    node: usize,
}

const PODS: [PodPlan; 6] = [
    PodPlan { name: "productpage-v1", app: "productpage", version: "v1", node: 0 },
    PodPlan { name: "details-v1", app: "details", version: "v1", node: 0 },
    PodPlan { name: "reviews-v1", app: "reviews", version: "v1", node: 1 },
    PodPlan { name: "reviews-v2", app: "reviews", version: "v2", node: 1 },
    PodPlan { name: "reviews-v3", app: "reviews", version: "v3", node: 1 },
    PodPlan { name: "ratings-v1", app: "ratings", version: "v1", node: 1 },
];

impl Bookinfo {
    /// Builds the cluster, starts the CA, both agents, the six services,
    /// the waypoint (exporting spans to its receiver) and the `curl` pod;
    /// waits until every workload has its certificate. Renders into
    /// `out_dir` (created).
    pub fn start(name: &str, out_dir: &Path) -> Result<Self> {
        let tb = Testbed::new(name)?;
        let nodes = [tb.add_node("node-a")?, tb.add_node("node-b")?];
        let curl = tb.add_pod(&nodes[0], PodSpec::new("curl").namespace(NAMESPACE).enrolled(true))?;
        let mut pods = Vec::new();
        for p in &PODS {
            let spec = PodSpec::new(p.name)
                .namespace(NAMESPACE)
                .service_account(&format!("bookinfo-{}", p.app))
                .label("app", p.app)
                .label("version", p.version)
                .enrolled(true);
            pods.push(tb.add_pod(&nodes[p.node], spec)?);
        }
        let wp_pod =
            tb.add_pod(&nodes[1], PodSpec::new(WAYPOINT).namespace(NAMESPACE).label(GATEWAY_NAME_LABEL, WAYPOINT))?;
        for (service, addr) in
            [("productpage", PRODUCTPAGE), ("reviews", REVIEWS), ("ratings", RATINGS), ("details", DETAILS)]
        {
            tb.add_service(ServiceSpec::new(service, *addr.ip()).namespace(NAMESPACE).port(PORT, PORT))?;
        }
        tb.add_waypoint(NAMESPACE, WAYPOINT)?;
        tb.set_namespace_waypoint(NAMESPACE, Some(WAYPOINT))?;
        tb.start_ca(&nodes[0], CaOptions::default())?;
        let started = tb.start_agents(&[&nodes[0], &nodes[1]])?;
        let agents: [Agent; 2] =
            started.try_into().map_err(|_| TestbedError::Environment("two agents expected".into()))?;

        let mut apps = Vec::new();
        for (p, pod) in PODS.iter().zip(&pods) {
            apps.push(pod.spawn(app_command(pod, p)?)?);
        }
        for pod in &pods {
            pod.wait_listening(PORT, Duration::from_secs(15))?;
        }
        let spans_file = tb.temp_dir().join("spans.jsonl");
        let mut cmd = Command::new("python3");
        cmd.arg(asset("otlp_receiver.py")).args([
            "grpc",
            &format!("127.0.0.1:{OTLP_PORT}"),
            &spans_file.display().to_string(),
        ]);
        let receiver = wp_pod.spawn(cmd)?;
        wp_pod.wait_listening(OTLP_PORT, Duration::from_secs(15))?;
        let waypoint = tb.start_waypoint_with_env(
            &wp_pod,
            WAYPOINT,
            &[
                ("HEDDLE_OTLP_ENDPOINT", format!("http://127.0.0.1:{OTLP_PORT}")),
                // The CLI on node-b gathers from the waypoint too.
                ("HEDDLE_ADMIN_ADDR", "0.0.0.0:15000".to_owned()),
            ],
        )?;
        for (i, agent) in agents.iter().enumerate() {
            let mut ids: Vec<String> =
                PODS.iter().zip(&pods).filter(|(p, _)| p.node == i).map(|(_, pod)| pod.spiffe_id()).collect();
            if i == 0 {
                ids.push(curl.spiffe_id());
            }
            agent.wait_certificates(&ids, Duration::from_secs(15))?;
        }
        std::fs::create_dir_all(out_dir).map_err(|e| TestbedError::io(format!("mkdir {}", out_dir.display()), e))?;
        Ok(Self {
            apps,
            receiver,
            spans_file,
            waypoint,
            agents,
            curl,
            pods,
            out_dir: out_dir.to_owned(),
            applied: Mutex::new(BTreeMap::new()),
            nodes,
            tb,
        })
    }

    /// `kubectl apply -f` for the waypoint's objects: every document of
    /// `yaml` replaces the one of the same kind, namespace and name.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        let mut applied = self.applied.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let v = serde_json::to_value(
                serde_yaml_ng::Value::deserialize(doc)
                    .map_err(|e| TestbedError::Environment(format!("bad YAML to apply: {e}")))?,
            )
            .map_err(|e| TestbedError::Environment(format!("YAML to apply: {e}")))?;
            if v.is_null() {
                continue;
            }
            let key = format!(
                "{}/{}/{}",
                v["kind"].as_str().unwrap_or("?"),
                v["metadata"]["namespace"].as_str().unwrap_or(NAMESPACE),
                v["metadata"]["name"].as_str().unwrap_or("?")
            );
            applied.insert(key, v);
        }
        let text: Vec<String> = applied.values().map(|v| serde_yaml_ng::to_string(v).unwrap_or_default()).collect();
        self.tb.set_routes("applied", &text.join("---\n"))
    }

    /// The one document of `yaml` of `kind` named `name`, as YAML (to apply
    /// one object of a multi-object file).
    #[must_use]
    pub fn only(yaml: &str, kind: &str, name: &str) -> String {
        yaml.split("\n---")
            .find(|d| d.contains(&format!("kind: {kind}")) && d.contains(&format!("name: {name}\n")))
            .unwrap_or("")
            .to_owned()
    }

    /// Runs `bookinfo.py ARGS` in the `curl` pod and parses its JSON.
    pub fn client(&self, args: &[&str]) -> Result<Value> {
        let mut cmd = Command::new("python3");
        cmd.arg(asset("bookinfo/bookinfo.py")).args(args);
        let out = self.curl.run(cmd)?;
        if !out.status.success() {
            return Err(TestbedError::Environment(format!(
                "bookinfo.py {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            TestbedError::Environment(format!("bookinfo.py output ({e}): {}", String::from_utf8_lossy(&out.stdout)))
        })
    }

    /// `heddle ARGS` on `node` (its agent at 127.0.0.1:15000): whether it
    /// exited 0, and its stdout then stderr.
    pub fn heddle(&self, node: &Node, args: &[&str]) -> Result<(bool, String)> {
        let mut cmd = Command::new(crate::heddle_binary()?);
        cmd.args(args);
        let out = node.run(cmd)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        Ok((out.status.success(), text))
    }

    /// Spans the receiver has written so far.
    pub fn spans(&self) -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(&self.spans_file).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).map_err(|e| TestbedError::Environment(format!("receiver line: {e}"))))
            .collect()
    }

    /// The logs of the application and the receiver (for a failure report).
    #[must_use]
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (p, app) in PODS.iter().zip(&self.apps) {
            let _ = writeln!(out, "--- {} ---\n{}", p.name, app.log_text());
        }
        let _ = writeln!(out, "--- otlp receiver ---\n{}", self.receiver.log_text());
        let _ = writeln!(out, "--- waypoint ---\n{}", self.waypoint.log_text());
        out
    }
}

/// The command that runs `plan`'s service in `pod`.
fn app_command(pod: &Pod, plan: &PodPlan) -> Result<Command> {
    let port = PORT.to_string();
    if plan.app == "reviews" {
        let mut cmd = pod.pod_app()?;
        cmd.args(["reviews", "--listen", &format!("0.0.0.0:{PORT}"), "--name", plan.name, "--version", plan.version]);
        if plan.version != "v1" {
            cmd.args(["--ratings", &RATINGS.to_string()]);
        }
        return Ok(cmd);
    }
    let mut cmd = Command::new("python3");
    cmd.arg(asset("bookinfo/bookinfo.py")).args([plan.app, &port, "--name", plan.name]);
    if plan.app == "productpage" {
        cmd.args(["--details", &DETAILS.to_string(), "--reviews", &REVIEWS.to_string()]);
    }
    Ok(cmd)
}
