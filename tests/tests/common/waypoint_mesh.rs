//! The waypoint test cluster, shared by the waypoint test binaries:
//!
//! ```text
//! node-a: client (enrolled)
//! node-b: waypoint (runs demo/waypoint, sa waypoint)
//!         api-v1, api-v2 (enrolled; app=api, version=v1|v2; HTTP :8080, echo :9090)
//! services demo/api 10.96.0.20 (80->8080, 8000->8080, 9000->9090), demo/api-v1 10.96.0.21, demo/api-v2 10.96.0.22
//! namespace demo: useWaypoint waypoint
//! ```

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use heddle_tests::env::asset;
use heddle_tests::waypoint::{Waypoint, GATEWAY_NAME_LABEL};
use heddle_tests::{Agent, CaOptions, Pod, PodSpec, Process, ServiceSpec, Testbed};
use serde_json::Value;

use super::l7;
use super::{environment_ready, run_on, TRUST_DOMAIN};

pub const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// A second service port of `api` onto the same HTTP servers (GAMMA's
/// mesh-ports case: a route attached to one port only).
pub const ALT_HTTP_PORT: u16 = 8000;
pub const V1_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
pub const V2_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 22);
pub const STORE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 23);
pub const HTTP_PORT: u16 = 8080;
pub const ECHO_PORT: u16 = 9090;
pub const GRPC_PORT: u16 = 50051;

/// The waypoint cluster. Fields drop in order: processes, then the bed.
pub struct Mesh {
    pub _servers: Vec<Process>,
    pub waypoint: Waypoint,
    pub agent_a: Agent,
    pub agent_b: Agent,
    pub client: Pod,
    pub v1: Pod,
    pub v2: Pod,
    pub tb: Testbed,
}

/// What a test needs beyond HTTP and echo servers.
#[derive(Clone, Copy, Default)]
pub struct Extras {
    /// gRPC servers on both versions.
    pub grpc: bool,
    /// api-v2 answers 20 ms late.
    pub slow_v2: bool,
    /// A Service `shared/store` (another namespace) with one pod.
    pub shared_store: bool,
    /// The waypoint exports spans over OTLP/gRPC to `127.0.0.1:`[`OTLP_PORT`]
    /// in its pod, sampling this percentage of new traces.
    pub trace_sampling: Option<u32>,
}

/// Where a tracing waypoint sends its spans (inside its own pod).
pub const OTLP_PORT: u16 = 4317;

impl Mesh {
    pub fn new(name: &str, extras: Extras) -> Result<Self> {
        let tb = Testbed::new(name)?;
        let node_a = tb.add_node("node-a")?;
        let node_b = tb.add_node("node-b")?;
        let client = tb.add_pod(&node_a, PodSpec::new("client").enrolled(true))?;
        let wp_pod = tb.add_pod(&node_b, PodSpec::new("waypoint").label(GATEWAY_NAME_LABEL, "waypoint"))?;
        let version =
            |v: &str| PodSpec::new(&format!("api-{v}")).enrolled(true).label("app", "api").label("version", v);
        let v1 = tb.add_pod(&node_b, version("v1"))?;
        let v2 = tb.add_pod(&node_b, version("v2"))?;
        tb.add_service(
            ServiceSpec::new("api", API_VIP)
                .port(80, HTTP_PORT)
                .port(ALT_HTTP_PORT, HTTP_PORT)
                .port(9000, ECHO_PORT)
                .port(GRPC_PORT, GRPC_PORT),
        )?;
        tb.add_service(
            ServiceSpec::new("api-v1", V1_VIP).port(80, HTTP_PORT).port(GRPC_PORT, GRPC_PORT).selector("version", "v1"),
        )?;
        tb.add_service(
            ServiceSpec::new("api-v2", V2_VIP).port(80, HTTP_PORT).port(GRPC_PORT, GRPC_PORT).selector("version", "v2"),
        )?;
        tb.add_waypoint("demo", "waypoint")?;
        tb.set_namespace_waypoint("demo", Some("waypoint"))?;
        let mut servers = Vec::new();
        if extras.shared_store {
            let store = tb.add_pod(&node_b, PodSpec::new("store").namespace("shared").enrolled(true))?;
            tb.add_service(ServiceSpec::new("store", STORE_VIP).namespace("shared").port(80, HTTP_PORT))?;
            servers.push(store.start_http(HTTP_PORT)?);
        }
        for pod in [&v1, &v2] {
            let delay =
                if extras.slow_v2 && pod.name() == "api-v2" { Duration::from_millis(20) } else { Duration::ZERO };
            servers.push(pod.start_http_delayed(HTTP_PORT, delay)?);
            servers.push(pod.start_echo(ECHO_PORT)?);
            if extras.grpc {
                let mut cmd = Command::new("python3");
                cmd.arg(asset("grpc_app.py")).args(["serve", &GRPC_PORT.to_string(), pod.name()]);
                servers.push(pod.spawn(cmd)?);
                pod.wait_listening(GRPC_PORT, Duration::from_secs(15))?;
            }
        }
        tb.set_trust_domain(TRUST_DOMAIN)?;
        tb.start_ca(&node_a, CaOptions::default())?;
        let mut agents = tb.start_agents(&[&node_a, &node_b])?.into_iter();
        let (agent_a, agent_b) = (agents.next().context("agent a")?, agents.next().context("agent b")?);
        let waypoint = match extras.trace_sampling {
            None => tb.start_waypoint(&wp_pod, "waypoint")?,
            Some(percent) => tb.start_waypoint_with_env(
                &wp_pod,
                "waypoint",
                &[
                    ("HEDDLE_OTLP_ENDPOINT", format!("http://127.0.0.1:{OTLP_PORT}")),
                    ("HEDDLE_TRACE_SAMPLING", percent.to_string()),
                    // Reachable from the node, for `heddle stat --from`.
                    ("HEDDLE_ADMIN_ADDR", "0.0.0.0:15000".to_owned()),
                ],
            )?,
        };
        let ids: Vec<String> = [&v1, &v2].iter().map(|p| p.spiffe_id()).collect();
        agent_b.wait_certificates(&ids, Duration::from_secs(10))?;
        agent_a.wait_certificates(&[client.spiffe_id()], Duration::from_secs(10))?;
        Ok(Self { _servers: servers, waypoint, agent_a, agent_b, client, v1, v2, tb })
    }

    /// Runs `httpc.py ARGS` in the client pod and parses its JSON output.
    pub fn httpc(&self, args: &[&str]) -> Result<Value> {
        l7::httpc(&self.client, args)
    }

    /// `n` keep-alive requests from the client to `url`.
    pub fn load(&self, url: &str, n: usize, headers: &[&str]) -> Result<Value> {
        l7::load(&self.client, url, n, headers)
    }

    /// Writes the routes and waits until the waypoint shows `route` accepted.
    pub fn routes(&self, yaml: &str, route: &str) -> Result<Value> {
        self.tb.set_routes("routes", yaml)?;
        Ok(self.waypoint.wait_route(route, true)?)
    }
}

pub fn run_waypoint(name: &str, extras: Extras, body: impl FnOnce(&Mesh) -> Result<()>) {
    if !environment_ready() {
        return;
    }
    run_on(
        name,
        || Mesh::new(name, extras),
        |m| {
            m.tb.mark_failed();
            eprintln!("--- waypoint log ---\n{}", m.waypoint.log_text());
        },
        body,
    );
}

/// `path` on the `api` Service's port 80, or `path` itself when it is a URL.
pub fn url(path: &str) -> String {
    if path.starts_with("http://") {
        return path.to_owned();
    }
    format!("http://{API_VIP}:80{path}")
}

/// Waypoint request records matching `pred`, waiting up to 10 s until there are `n`.
pub fn requests(wp: &Waypoint, n: usize, pred: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
    l7::requests(wp, n, Duration::from_secs(10), pred)
}
