//! The waypoint in Kubernetes mode, end to end: `heddle waypoint apply`
//! writes a Gateway of class `heddle-waypoint`, the waypoint controller
//! (`mesh-agent controller`) turns it into a Deployment, Service and
//! `ServiceAccount` and marks it programmed, the waypoint (`mesh-agent
//! waypoint --kubernetes`, in the pod the Deployment would have started)
//! reads Services, Pods, Gateways and `HTTPRoutes` from the API and writes
//! route status back, and the node agents (`mesh-agent run --kubernetes`)
//! send a Service's traffic through it once the Service is labelled
//! `heddle.dev/use-waypoint`, and back on the L4 path when the label goes.
//! Everything against the API-server stand-in, with real eBPF, real mTLS
//! and real HTTP clients and servers in the test bed.
//!
//! ```text
//! node-a: client (enrolled)             [stand-in API server :6443, mesh CA, controller]
//! node-b: waypoint (sa waypoint), api-v1, api-v2 (app=api, version=v1|v2, HTTP :8080)
//! services demo/api 10.96.0.20:80 (both versions), demo/api-v1 10.96.0.21, demo/api-v2 10.96.0.22
//! ```
//!
//! The test plays the kubelet and the `ReplicaSet` controller: it writes the
//! waypoint's Pod object and starts the process the Deployment describes.

mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::kube::{namespace, pod_object, start_api};
use common::l7::{self, count};
use common::{environment_ready, run_on, TRUST_DOMAIN};
use heddle_tests::apiserver::{ApiServer, Resource};
use heddle_tests::waypoint::{Waypoint, GATEWAY_NAME_LABEL};
use heddle_tests::{poll_until, Agent, CaOptions, Check, KubernetesMode, Node, Pod, PodSpec, Process, Testbed};
use serde_json::{json, Value};

const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const V1_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
const V2_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 22);
const HTTP_PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);
const GATEWAY_API: &str = "gateway.networking.k8s.io/v1";

/// Fields drop in order: processes, then the stand-in, then the test bed.
struct Cluster {
    _servers: Vec<Process>,
    controller: Process,
    _agent_a: Agent,
    _agent_b: Agent,
    client: Pod,
    waypoint_pod: Pod,
    node_a: Node,
    kubeconfig: PathBuf,
    api: ApiServer,
    tb: Testbed,
}

fn service(name: &str, vip: Ipv4Addr, labels: &Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "demo", "labels": labels},
        "spec": {"clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
                 "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT, "protocol": "TCP"}]}
    })
}

fn slice(service: &str, pods: &[&Pod]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|p| {
            json!({"addresses": [p.ip().to_string()], "conditions": {"ready": true}, "nodeName": p.node_name(),
                   "targetRef": {"kind": "Pod", "name": p.name(), "namespace": "demo"}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-x1"), "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": HTTP_PORT, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

impl Cluster {
    fn new(name: &str) -> Result<Self> {
        let tb = Testbed::new(name)?;
        let node_a = tb.add_node("node-a")?;
        let node_b = tb.add_node("node-b")?;
        let client = tb.add_pod(&node_a, PodSpec::new("client").enrolled(true))?;
        let waypoint_pod = tb.add_pod(&node_b, PodSpec::new("waypoint").label(GATEWAY_NAME_LABEL, "waypoint"))?;
        let version =
            |v: &str| PodSpec::new(&format!("api-{v}")).enrolled(true).label("app", "api").label("version", v);
        let v1 = tb.add_pod(&node_b, version("v1"))?;
        let v2 = tb.add_pod(&node_b, version("v2"))?;
        // The CA (local mode) grants identities from the test bed's file,
        // which must know the waypoint its pod is labelled for.
        tb.add_waypoint("demo", "waypoint")?;
        tb.set_trust_domain(TRUST_DOMAIN)?;
        let servers = vec![v1.start_http(HTTP_PORT)?, v2.start_http(HTTP_PORT)?];

        let api = start_api(&node_a, false)?;
        for (kind, plural, namespaced) in [
            ("Gateway", "gateways", true),
            ("HTTPRoute", "httproutes", true),
            ("GRPCRoute", "grpcroutes", true),
            ("GatewayClass", "gatewayclasses", false),
        ] {
            api.register_crd(Resource {
                api_version: GATEWAY_API.into(),
                kind: kind.into(),
                plural: plural.into(),
                namespaced,
            });
        }
        // Heddle's own rate limit policy, whose CRD ships in daemonset/crds.
        api.register_crd(Resource {
            api_version: "heddle.dev/v1alpha1".into(),
            kind: "HTTPLocalRateLimitPolicy".into(),
            plural: "httplocalratelimitpolicies".into(),
            namespaced: true,
        });
        // Istio's traffic and security APIs, as when Istio's CRDs are installed.
        for (api_version, kind, plural) in [
            ("networking.istio.io/v1", "VirtualService", "virtualservices"),
            ("networking.istio.io/v1", "DestinationRule", "destinationrules"),
            ("security.istio.io/v1", "AuthorizationPolicy", "authorizationpolicies"),
        ] {
            api.register_crd(Resource {
                api_version: api_version.into(),
                kind: kind.into(),
                plural: plural.into(),
                namespaced: true,
            });
        }
        // ReferenceGrant is still v1beta1 upstream; the waypoint watches it.
        api.register_crd(Resource {
            api_version: "gateway.networking.k8s.io/v1beta1".into(),
            kind: "ReferenceGrant".into(),
            plural: "referencegrants".into(),
            namespaced: true,
        });
        api.apply(namespace("heddle-system", &json!({})))?;
        api.apply(namespace("demo", &json!({"heddle.dev/mesh": "enabled"})))?;
        api.apply(pod_object(&client, &json!({"app": "client"})))?;
        for (pod, v) in [(&v1, "v1"), (&v2, "v2")] {
            api.apply(pod_object(pod, &json!({"app": "api", "version": v})))?;
        }
        api.apply(service("api", API_VIP, &json!({})))?;
        api.apply(service("api-v1", V1_VIP, &json!({})))?;
        api.apply(service("api-v2", V2_VIP, &json!({})))?;
        api.apply(slice("api", &[&v1, &v2]))?;
        api.apply(slice("api-v1", &[&v1]))?;
        api.apply(slice("api-v2", &[&v2]))?;

        let ca = tb.start_ca(&node_a, CaOptions::default())?;
        let bundle = std::fs::read_to_string(ca.bundle_path()).context("reading the CA's trust bundle")?;
        // What the CA publishes in Kubernetes mode.
        api.apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "heddle-trust-bundle", "namespace": "heddle-system"},
                         "data": {"root-cert.pem": bundle}}))?;
        let kubeconfig = tb.temp_dir().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, "node-agent-token")?;
        tb.use_kubernetes(KubernetesMode { kubeconfig: kubeconfig.clone(), trust_domain: TRUST_DOMAIN.into() });
        let mut agents = tb.start_agents(&[&node_a, &node_b])?.into_iter();
        let (agent_a, agent_b) = (agents.next().context("agent a")?, agents.next().context("agent b")?);
        agent_b.wait_certificates(&[v1.spiffe_id(), v2.spiffe_id()], Duration::from_secs(10))?;
        agent_a.wait_certificates(&[client.spiffe_id()], Duration::from_secs(10))?;

        let mut cmd = Command::new(heddle_tests::agent_binary()?);
        cmd.arg("controller")
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("HEDDLE_TRUST_DOMAIN", TRUST_DOMAIN)
            .env("POD_NAMESPACE", "heddle-system")
            .env("HEDDLE_LOG", "info,mesh_agent=debug");
        let controller = node_a.spawn(cmd)?;
        Ok(Self {
            _servers: servers,
            controller,
            _agent_a: agent_a,
            _agent_b: agent_b,
            client,
            waypoint_pod,
            node_a,
            kubeconfig,
            api,
            tb,
        })
    }

    /// Runs the `heddle` CLI on node-a (where the API server is).
    fn heddle(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(heddle_tests::heddle_binary()?);
        cmd.args(args).env("KUBECONFIG", &self.kubeconfig).env_remove("KUBERNETES_SERVICE_HOST");
        let out = self.node_a.run(cmd)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(out.status.success(), "heddle {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
        Ok(text)
    }

    fn wait_object(
        &self,
        what: &str,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        Ok(poll_until(what, WAIT, POLL, || {
            Ok(match self.api.get(api_version, kind, ns, name) {
                Some(v) if ok(&v) => Check::Ready(v),
                other => Check::Pending(format!("{other:?}")),
            })
        })?)
    }
}

fn condition<'a>(conditions: &'a Value, kind: &str) -> Option<&'a Value> {
    conditions.as_array()?.iter().find(|c| c["type"] == kind)
}

const ROUTE: &str = r#"{
  "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
  "metadata": {"name": "api", "namespace": "demo"},
  "spec": {
    "parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
    "rules": [
      {"matches": [{"headers": [{"name": "x-canary", "value": "yes"}]}],
       "backendRefs": [{"name": "api-v2", "port": 80}]},
      {"backendRefs": [{"name": "api-v1", "port": 80}]}
    ]
  }
}"#;

/// What the controller must have made of the Gateway: the class accepted,
/// the Gateway programmed with its address, its `Deployment`, `Service`,
/// account, trust bundle copy and role binding, and `heddle waypoint list`
/// saying so.
fn expect_deployed(c: &Cluster) -> Result<()> {
    let class = c.wait_object("GatewayClass accepted", GATEWAY_API, "GatewayClass", None, "heddle-waypoint", |g| {
        condition(&g["status"]["conditions"], "Accepted").is_some_and(|a| a["status"] == "True")
    })?;
    ensure!(class["spec"]["controllerName"] == "heddle.dev/waypoint-controller", "{class}");
    let gw = c.wait_object("Gateway programmed", GATEWAY_API, "Gateway", Some("demo"), "waypoint", |g| {
        condition(&g["status"]["conditions"], "Programmed").is_some_and(|p| p["status"] == "True")
    })?;
    ensure!(gw["status"]["addresses"][0]["value"] == "waypoint.demo.svc.cluster.local", "Gateway address: {gw}");
    let deploy = c
        .api
        .get("apps/v1", "Deployment", Some("demo"), "waypoint")
        .context("the controller created no Deployment demo/waypoint")?;
    let spec = &deploy["spec"]["template"]["spec"];
    ensure!(spec["serviceAccountName"] == "waypoint", "Deployment: {deploy}");
    ensure!(spec["containers"][0]["command"] == json!(["mesh-agent", "waypoint", "--kubernetes"]), "{deploy}");
    ensure!(deploy["spec"]["template"]["metadata"]["labels"][GATEWAY_NAME_LABEL] == "waypoint", "{deploy}");
    ensure!(deploy["metadata"]["ownerReferences"][0]["kind"] == "Gateway", "owner: {deploy}");
    let svc = c.api.get("v1", "Service", Some("demo"), "waypoint").context("no Service demo/waypoint")?;
    ensure!(svc["spec"]["ports"][0]["port"] == 15008, "Service: {svc}");
    ensure!(c.api.get("v1", "ServiceAccount", Some("demo"), "waypoint").is_some(), "no ServiceAccount");
    let cm = c.api.get("v1", "ConfigMap", Some("demo"), "heddle-trust-bundle").context("no trust bundle copy")?;
    ensure!(cm["data"]["root-cert.pem"].as_str().is_some_and(|p| p.contains("BEGIN CERTIFICATE")), "{cm}");
    let binding = c
        .api
        .get("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", None, "heddle-waypoints")
        .context("no ClusterRoleBinding heddle-waypoints")?;
    ensure!(binding["subjects"][0]["name"] == "waypoint", "{binding}");
    let list = c.heddle(&["waypoint", "list"])?;
    ensure!(list.lines().any(|l| l.starts_with("demo") && l.contains(" True ")), "heddle waypoint list:\n{list}");

    Ok(())
}

/// Replicas: left to `kubectl scale` until the Gateway asks, then the
/// annotation's count; a bad count is reported, not applied.
/// A rate limit policy from the API on the route `api`: 3/s in total.
/// `heddle stat --waypoints` finds the waypoint pod in the API and reads
/// its records through the API server's port-forward.
fn stat_gathers_from_the_waypoint_through_the_api_server(c: &Cluster, wp: &Waypoint) -> Result<()> {
    c.api.port_forward_to("demo", c.waypoint_pod.name(), wp.pod.addr(15000));
    let rows: Value = serde_json::from_str(&c.heddle(&["-o", "json", "stat", "svc", "-n", "demo", "--waypoints"])?)?;
    // The route sends to the version Services: their rows count the requests.
    let row = |name: &str| rows.as_array().and_then(|r| r.iter().find(|r| r["name"] == name)).cloned();
    let (v1, v2) = (row("demo/api-v1").unwrap_or_default(), row("demo/api-v2").unwrap_or_default());
    ensure!(
        v1["requests"].as_u64() >= Some(20)
            && v2["requests"].as_u64() >= Some(20)
            && v1["success_rate"] == 1.0
            && v2["success_rate"] == 1.0,
        "the waypoint's requests to api-v1 and api-v2, gathered through the API server: {rows}"
    );
    Ok(())
}

fn a_rate_limit_policy_from_the_api_limits_the_route(c: &Cluster, wp: &Waypoint, url: &str) -> Result<()> {
    c.api.apply(json!({
        "apiVersion": "heddle.dev/v1alpha1", "kind": "HTTPLocalRateLimitPolicy",
        "metadata": {"name": "api-limit", "namespace": "demo"},
        "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "api"}],
                 "total": {"requestsPerSecond": 3}}
    }))?;
    wp.wait_route("httplocalratelimitpolicy/demo/api-limit", true)?;
    let limited = l7::load(&c.client, url, 20, &[])?;
    let ok = limited["status"]["200"].as_u64().unwrap_or(0);
    ensure!((3..=8).contains(&ok) && limited["status"]["429"] == 20 - ok, "3/s from the API policy: {limited}");
    Ok(())
}

/// Istio objects from the API: a `DestinationRule` subset and a
/// `VirtualService` on `api-v2` (labelled for the waypoint for this step)
/// that aborts `/teapot` with 418 and sends the rest to subset v2.
fn an_istio_virtual_service_from_the_api_routes_its_host(c: &Cluster, wp: &Waypoint) -> Result<()> {
    c.api.apply(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "api-v2", "namespace": "demo"},
        "spec": {"host": "api-v2", "subsets": [{"name": "v2", "labels": {"version": "v2"}}]}
    }))?;
    c.api.apply(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "api-v2", "namespace": "demo"},
        "spec": {"hosts": ["api-v2"], "http": [
            {"match": [{"uri": {"prefix": "/teapot"}}],
             "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
             "route": [{"destination": {"host": "api-v2", "subset": "v2"}}]},
            {"route": [{"destination": {"host": "api-v2", "subset": "v2"}}]}
        ]}
    }))?;
    c.api.apply(service("api-v2", V2_VIP, &json!({"heddle.dev/use-waypoint": "waypoint"})))?;
    wp.wait_route("virtualservice/demo/api-v2", true)?;
    let teapot = format!("http://{V2_VIP}:80/teapot");
    poll_until("the VirtualService in force", WAIT, POLL, || {
        let r = match l7::load(&c.client, &teapot, 2, &[]) {
            Ok(r) => r,
            Err(e) => return Ok(Check::Pending(e.to_string())),
        };
        Ok(if r["status"]["418"] == 2 { Check::Ready(()) } else { Check::Pending(r.to_string()) })
    })?;
    let rest = l7::load(&c.client, &format!("http://{V2_VIP}:80/other"), 10, &[])?;
    ensure!(count(&rest, "api-v2") == 10, "the rest goes to subset v2: {rest}");
    let faults = wp.flows("response_flag=FI&path=/teapot")?;
    ensure!(
        !faults.is_empty() && faults.iter().all(|f| f["http"]["route"] == "virtualservice/demo/api-v2"),
        "aborts flagged FI, naming the VirtualService: {faults:?}"
    );
    // The waypoint writes what it did with them into their status, as an
    // Istio control plane would; a field Heddle does not implement says so.
    c.wait_object(
        "VirtualService accepted",
        "networking.istio.io/v1",
        "VirtualService",
        Some("demo"),
        "api-v2",
        |v| v["status"]["conditions"][0]["type"] == "Accepted" && v["status"]["conditions"][0]["status"] == "True",
    )?;
    c.api.apply(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "cors", "namespace": "demo"},
        "spec": {"hosts": ["api-v2"], "http": [{"corsPolicy": {"allowOrigins": [{"exact": "x"}]},
                 "route": [{"destination": {"host": "api-v2"}}]}]}
    }))?;
    let cors = c.wait_object(
        "VirtualService rejected",
        "networking.istio.io/v1",
        "VirtualService",
        Some("demo"),
        "cors",
        |v| v["status"]["conditions"][0]["status"] == "False",
    )?;
    ensure!(cors["status"]["conditions"][0]["message"].to_string().contains("corsPolicy"), "{cors}");
    c.api.delete("networking.istio.io/v1", "VirtualService", Some("demo"), "cors")?;
    c.api.apply(service("api-v2", V2_VIP, &json!({})))?;
    Ok(())
}

/// An Istio `AuthorizationPolicy` from the API, attached to the `api`
/// Service: the waypoint denies `/hello/admin*` with 403 and names it.
fn an_istio_authorization_policy_from_the_api_denies_a_path(c: &Cluster, wp: &Waypoint, url: &str) -> Result<()> {
    c.api.apply(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-admin", "namespace": "demo"},
        "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "api"}], "action": "DENY",
                 "rules": [{"to": [{"operation": {"paths": ["/hello/admin*"]}}]}]}
    }))?;
    wp.wait_route("authorizationpolicy/demo/no-admin", true)?;
    let admin = l7::load(&c.client, &format!("{url}/admin/x"), 5, &[])?;
    ensure!(admin["status"]["403"] == 5, "the path is denied: {admin}");
    // (The route's 3/s rate limit from the step before still applies.)
    let other = l7::load(&c.client, url, 5, &[])?;
    ensure!(
        other["status"].get("403").is_none() && other["status"]["200"].as_u64() > Some(0),
        "other paths are not: {other}"
    );
    let denied = wp.flows("path=/hello/admin/x")?;
    ensure!(
        !denied.is_empty() && denied.iter().all(|f| f["policy"] == "demo/no-admin" && f["verdict"] == "denied"),
        "records name the policy: {denied:?}"
    );
    c.api.delete("security.istio.io/v1", "AuthorizationPolicy", Some("demo"), "no-admin")?;
    Ok(())
}

fn replicas_follow_the_gateway_annotation(c: &Cluster) -> Result<()> {
    let deploy = c.api.get("apps/v1", "Deployment", Some("demo"), "waypoint").context("Deployment")?;
    ensure!(deploy["spec"].get("replicas").is_none_or(|r| r == 1), "replicas before asking: {deploy}");
    let annotate = |value: &str| -> Result<()> {
        let mut gw = c.api.get(GATEWAY_API, "Gateway", Some("demo"), "waypoint").context("Gateway")?;
        gw["metadata"]["annotations"] = json!({"heddle.dev/waypoint-replicas": value});
        c.api.apply(gw)?;
        Ok(())
    };
    annotate("3")?;
    c.wait_object("Deployment with 3 replicas", "apps/v1", "Deployment", Some("demo"), "waypoint", |d| {
        d["spec"]["replicas"] == 3
    })?;
    annotate("many")?;
    let gw = c.wait_object("Gateway not programmed", GATEWAY_API, "Gateway", Some("demo"), "waypoint", |g| {
        condition(&g["status"]["conditions"], "Programmed").is_some_and(|p| p["status"] == "False")
    })?;
    let programmed = condition(&gw["status"]["conditions"], "Programmed").cloned().unwrap_or_default();
    ensure!(
        programmed["message"].as_str().is_some_and(|m| m.contains("heddle.dev/waypoint-replicas")),
        "the refusal names the annotation: {programmed}"
    );
    Ok(())
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario, its steps in order; the long ones are functions
fn a_heddle_waypoint_gateway_is_deployed_by_the_controller_and_routes_a_labelled_service() {
    if !environment_ready() {
        return;
    }
    let name = "k8s_waypoint";
    let waypoint: std::cell::RefCell<Option<Waypoint>> = std::cell::RefCell::new(None);
    run_on(
        name,
        || Cluster::new(name),
        |c| {
            c.tb.mark_failed();
            eprintln!("--- controller log ---\n{}", c.controller.log_text());
            if let Some(w) = waypoint.borrow().as_ref() {
                eprintln!("--- waypoint log ---\n{}", w.log_text());
            }
        },
        |c| {
            let url = format!("http://{API_VIP}:80/hello");
            // Before any waypoint: the L4 path balances connections over both versions.
            let direct = l7::load(&c.client, &url, 1, &[])?;
            ensure!(direct["errors"] == 0, "direct request failed: {direct}");

            // The user's two steps: a waypoint for the namespace ...
            let out = c.heddle(&["waypoint", "apply", "-n", "demo"])?;
            ensure!(out.contains("waypoint demo/waypoint applied"), "{out}");
            expect_deployed(c)?;

            // The kubelet's part: the Deployment's pod runs.
            c.api.apply(pod_object(&c.waypoint_pod, &json!({GATEWAY_NAME_LABEL: "waypoint"})))?;
            let wp = c.tb.start_waypoint_kubernetes(&c.waypoint_pod, "waypoint", &c.kubeconfig, TRUST_DOMAIN)?;
            *waypoint.borrow_mut() = Some(wp);
            let guard = waypoint.borrow();
            let wp = guard.as_ref().context("waypoint")?;

            // ... and a route. The Service does not use the waypoint yet: the
            // waypoint says so and leaves the route alone.
            c.api.apply(serde_json::from_str(ROUTE)?)?;
            let pending = wp.wait_route("httproute/demo/api", false)?;
            ensure!(pending["parents"][0]["conditions"][0]["reason"] == "NoMatchingParent", "{pending}");

            // Not labelled yet: the L4 path, nothing reaches the waypoint.
            let before = wp.flows("last=100000")?.len();
            let l4 = l7::load(&c.client, &url, 20, &["x-canary: yes"])?;
            ensure!(l4["errors"] == 0 && count(&l4, "api-v1") > 0, "without the label the route must not apply: {l4}");
            ensure!(wp.flows("last=100000")?.len() == before, "traffic reached the waypoint before the label");

            // The second step: label the Service. The waypoint accepts the
            // route and reports it in the API; the agents steer the Service's
            // traffic to the waypoint.
            c.api.apply(service("api", API_VIP, &json!({"heddle.dev/use-waypoint": "waypoint"})))?;
            wp.wait_route("httproute/demo/api", true)?;
            let route = c.wait_object("HTTPRoute status", GATEWAY_API, "HTTPRoute", Some("demo"), "api", |r| {
                r["status"]["parents"].as_array().is_some_and(|ps| {
                    ps.iter().any(|p| {
                        p["controllerName"] == "heddle.dev/waypoint-controller"
                            && condition(&p["conditions"], "Accepted").is_some_and(|a| a["status"] == "True")
                    })
                })
            })?;
            ensure!(route["status"]["parents"][0]["parentRef"]["name"] == "api", "{route}");
            poll_until("the header route in force through the waypoint", WAIT, POLL, || {
                let r = match l7::load(&c.client, &url, 4, &["x-canary: yes"]) {
                    Ok(r) => r,
                    Err(e) => return Ok(Check::Pending(e.to_string())),
                };
                Ok(if count(&r, "api-v2") == 4 { Check::Ready(()) } else { Check::Pending(r.to_string()) })
            })?;
            let canary = l7::load(&c.client, &url, 20, &["x-canary: yes"])?;
            ensure!(canary["errors"] == 0 && count(&canary, "api-v2") == 20, "x-canary: yes must reach v2: {canary}");
            let plain = l7::load(&c.client, &url, 20, &[])?;
            ensure!(plain["errors"] == 0 && count(&plain, "api-v1") == 20, "the default rule sends to v1: {plain}");
            let records = l7::requests(wp, 40, WAIT, |_| true)?;
            let matched: Vec<&Value> = records.iter().filter(|f| f["http"]["route"] == "httproute/demo/api").collect();
            ensure!(matched.len() >= 40, "request records naming the route: {} of {}", matched.len(), records.len());
            ensure!(
                records.iter().all(|f| f["src_identity"] == json!(c.client.spiffe_id())),
                "records carry the client's identity: {:?}",
                records.last()
            );

            stat_gathers_from_the_waypoint_through_the_api_server(c, wp)?;
            a_rate_limit_policy_from_the_api_limits_the_route(c, wp, &url)?;
            an_istio_virtual_service_from_the_api_routes_its_host(c, wp)?;
            an_istio_authorization_policy_from_the_api_denies_a_path(c, wp, &url)?;

            // Removing the label returns the Service to the L4 path.
            c.api.apply(service("api", API_VIP, &json!({})))?;
            poll_until("the L4 path again", WAIT, POLL, || {
                let r = match l7::load(&c.client, &url, 10, &["x-canary: yes"]) {
                    Ok(r) => r,
                    Err(e) => return Ok(Check::Pending(e.to_string())),
                };
                Ok(if count(&r, "api-v1") > 0 { Check::Ready(()) } else { Check::Pending(r.to_string()) })
            })?;
            // ... and the waypoint takes its entry out of the route's status.
            c.wait_object(
                "HTTPRoute status without the waypoint's entry",
                GATEWAY_API,
                "HTTPRoute",
                Some("demo"),
                "api",
                |r| {
                    !r["status"]["parents"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|p| p["controllerName"] == "heddle.dev/waypoint-controller"))
                },
            )?;
            let seen = wp.flows("last=100000")?.len();
            let after = l7::load(&c.client, &url, 10, &["x-canary: yes"])?;
            ensure!(after["errors"] == 0, "{after}");
            ensure!(wp.flows("last=100000")?.len() == seen, "traffic still reached the waypoint without the label");

            replicas_follow_the_gateway_annotation(c)?;

            // Deleting the waypoint with the CLI removes its Gateway.
            let out = c.heddle(&["waypoint", "delete", "-n", "demo"])?;
            ensure!(out.contains("deleted"), "{out}");
            ensure!(
                c.api.get(GATEWAY_API, "Gateway", Some("demo"), "waypoint").is_none(),
                "the Gateway is still there"
            );
            Ok(())
        },
    );
}
