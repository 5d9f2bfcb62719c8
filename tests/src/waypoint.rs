//! Waypoints in the test bed: the config's `waypoints:` and `useWaypoint`,
//! the routes directory every waypoint reads, and `mesh-agent waypoint`
//! processes run inside their own pods (as a Deployment's pods would be),
//! with an admin client for their `/flows`, `/routes`, `/stats` and metrics.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::admin::AdminClient;
use crate::config::write_atomically;
use crate::error::{Result, TestbedError};
use crate::exec::Process;
use crate::handles::Pod;
use crate::testbed::Testbed;
use crate::wait::{poll_until, Check};

/// The label naming the waypoint a pod runs (Kubernetes' Gateway label).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// A running waypoint process.
pub struct Waypoint {
    /// `namespace/name`.
    pub name: String,
    /// Its pod.
    pub pod: Pod,
    admin: AdminClient,
    metrics: AdminClient,
    process: Process,
}

impl Testbed {
    /// Adds waypoint `namespace/name` to the config (its pods are the ones
    /// labelled [`GATEWAY_NAME_LABEL`]` = name`).
    pub fn add_waypoint(&self, namespace: &str, name: &str) -> Result<()> {
        self.shared.lock().waypoints.push((namespace.to_owned(), name.to_owned()));
        Ok(())
    }

    /// Sets (or with `None` clears) the namespace's `useWaypoint` and
    /// rewrites the config.
    pub fn set_namespace_waypoint(&self, namespace: &str, waypoint: Option<&str>) -> Result<()> {
        {
            let mut state = self.shared.lock();
            state.check_live()?;
            match waypoint {
                Some(w) => state.namespace_waypoints.insert(namespace.to_owned(), w.to_owned()),
                None => state.namespace_waypoints.remove(namespace),
            };
        }
        self.write_config()?;
        Ok(())
    }

    /// The routes directory every waypoint reads (`--routes`).
    #[must_use]
    pub fn routes_dir(&self) -> PathBuf {
        self.temp_dir().join("routes")
    }

    /// Writes `yaml` (HTTPRoute/GRPCRoute documents) as `routes/<file>.yaml`.
    pub fn set_routes(&self, file: &str, yaml: &str) -> Result<()> {
        let dir = self.routes_dir();
        std::fs::create_dir_all(&dir).map_err(|e| TestbedError::io(format!("mkdir {}", dir.display()), e))?;
        write_atomically(&dir.join(format!("{file}.yaml")), yaml)
    }

    /// Starts `mesh-agent waypoint` for `namespace/name` in `pod` (which must
    /// carry the waypoint label), with the test bed's CA and routes
    /// directory; waits until its admin API answers.
    pub fn start_waypoint(&self, pod: &Pod, waypoint: &str) -> Result<Waypoint> {
        self.start_waypoint_with_env(pod, waypoint, &[])
    }

    /// [`Testbed::start_waypoint`] with more environment (`HEDDLE_*` flags).
    pub fn start_waypoint_with_env(&self, pod: &Pod, waypoint: &str, env: &[(&str, String)]) -> Result<Waypoint> {
        let config = self.write_config()?;
        let dir = self.routes_dir();
        std::fs::create_dir_all(&dir).map_err(|e| TestbedError::io(format!("mkdir {}", dir.display()), e))?;
        let mut source = vec![config.into_os_string(), "--routes".into(), dir.into_os_string()];
        source.insert(0, "--config".into());
        let env: Vec<(&str, &std::ffi::OsStr)> = env.iter().map(|(k, v)| (*k, std::ffi::OsStr::new(v))).collect();
        self.spawn_waypoint(pod, waypoint, &source, &env)
    }

    /// Starts `mesh-agent waypoint --kubernetes` for `namespace/name` in
    /// `pod`, reading the API through `kubeconfig` (as the Deployment the
    /// waypoint controller writes would run it), with the test bed's CA.
    pub fn start_waypoint_kubernetes(
        &self,
        pod: &Pod,
        waypoint: &str,
        kubeconfig: &std::path::Path,
        trust_domain: &str,
    ) -> Result<Waypoint> {
        let args: Vec<std::ffi::OsString> = vec![
            "--kubernetes".into(),
            "--trust-domain".into(),
            trust_domain.into(),
            "--node".into(),
            pod.node_name().into(),
        ];
        // The admin API on the pod's address too: the API-server stand-in's
        // port-forward dials the pod from its own node (a kubelet would
        // dial the pod's localhost).
        let admin = std::ffi::OsStr::new("0.0.0.0:15000");
        self.spawn_waypoint(
            pod,
            waypoint,
            &args,
            &[("KUBECONFIG", kubeconfig.as_os_str()), ("HEDDLE_ADMIN_ADDR", admin)],
        )
    }

    fn spawn_waypoint(
        &self,
        pod: &Pod,
        waypoint: &str,
        source: &[std::ffi::OsString],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Waypoint> {
        let ca = self
            .ca()
            .ok_or_else(|| TestbedError::Environment("a waypoint needs the test bed's CA (start_ca first)".into()))?;
        let mut cmd = std::process::Command::new(crate::env::agent_binary()?);
        cmd.arg("waypoint")
            .args(source)
            .envs(env.iter().copied())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .args(["--waypoint", &format!("{}/{waypoint}", pod.namespace()), "--pod", pod.name()])
            .arg("--ca-addr")
            .arg(ca.addr().to_string())
            .arg("--ca-token-file")
            .arg(ca.token_path(pod.node_name()))
            .arg("--trust-bundle")
            .arg(ca.bundle_path())
            .env(
                "HEDDLE_LOG",
                std::env::var("HEDDLE_TEST_WAYPOINT_LOG").unwrap_or_else(|_| "info,mesh_agent=debug".into()),
            );
        let process = pod.spawn(cmd)?;
        let client = |port: u16| AdminClient {
            node: format!("waypoint pod {}", pod.qualified_name()),
            netns: pod.netns_path(),
            cgroup: self.shared.tools_cgroup(),
            addr: format!("127.0.0.1:{port}"),
        };
        let wp = Waypoint {
            name: format!("{}/{waypoint}", pod.namespace()),
            pod: pod.clone(),
            admin: client(15000),
            metrics: client(15020),
            process,
        };
        poll_until("waypoint admin API", Duration::from_secs(20), Duration::from_millis(100), || {
            Ok(match wp.admin.get("/ready") {
                Ok((200, _)) => Check::Ready(()),
                Ok((code, body)) => Check::Pending(format!("{code} {body}")),
                Err(e) => Check::Pending(e.to_string()),
            })
        })?;
        Ok(wp)
    }
}

impl Waypoint {
    /// `GET /flows?QUERY` (records as JSON values: L7 fields under `http`).
    pub fn flows(&self, query: &str) -> Result<Vec<Value>> {
        self.admin.get_json(&format!("/flows?{query}"))
    }

    /// `GET /routes`.
    pub fn routes(&self) -> Result<Value> {
        self.admin.get_json("/routes")
    }

    /// `GET /stats`.
    pub fn stats(&self) -> Result<Value> {
        self.admin.get_json("/stats")
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> Result<String> {
        let (code, body) = self.metrics.get("/metrics")?;
        if code == 200 {
            Ok(body)
        } else {
            Err(TestbedError::Environment(format!("waypoint /metrics returned {code}")))
        }
    }

    /// Waits until `GET /routes` says `route` (e.g. `httproute/demo/api`)
    /// is in force with `rules` rules (or rejected, with `accepted: false`).
    pub fn wait_route(&self, route: &str, accepted: bool) -> Result<Value> {
        poll_until(
            &format!("route {route} (accepted={accepted})"),
            Duration::from_secs(10),
            Duration::from_millis(100),
            || {
                let routes = self.routes()?;
                let found = routes["routes"].as_array().and_then(|rs| rs.iter().find(|r| r["route"] == route)).cloned();
                Ok(match found {
                    Some(r) if r["accepted"] == accepted => Check::Ready(r),
                    _ => Check::Pending(routes.to_string()),
                })
            },
        )
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.process.try_wait(), Ok(None))
    }

    /// Its process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The waypoint's log so far.
    #[must_use]
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}
