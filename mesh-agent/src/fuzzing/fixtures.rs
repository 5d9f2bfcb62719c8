//! The fixed state fuzz targets run against, made once per process: a
//! registry with one service, the waypoint's routes and
//! L7 policies for it, a mesh CA with a known node token, and the tunnel's
//! TLS server configuration. The CA keeps its root under the system's temp
//! directory, one directory per process (`heddle-fuzz-<pid>`).

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use crate::{
    config,
    identity::{ca_server, tls, SpiffeId},
    registry::{ObjectRef, Registry},
    waypoint::routes::{RouteSet, Source},
};

/// The node token the fixed CA accepts (for `node-a`): the corpus's
/// requests carry it, so the fuzzer starts past authentication.
pub const NODE_TOKEN: &str = "fuzz-node-a-token";

const REGISTRY: &str = r#"
workloads:
  - {name: web-0, namespace: demo, serviceAccount: web, node: node-a, ips: ["10.0.0.1"], enrolled: false, labels: {app: web}}
  - {name: api-0, namespace: demo, serviceAccount: api, node: node-a, ips: ["10.0.0.2"], enrolled: false, labels: {app: api, version: v1}}
  - {name: api-1, namespace: demo, serviceAccount: api, node: node-a, ips: ["10.0.0.3"], enrolled: false, labels: {app: api, version: v2}}
services:
  - {name: api, namespace: demo, vip: 10.96.0.1, ports: [{port: 80, targetPort: 8080}], selector: {app: api}}
"#;

/// Routes and policies of the waypoint fixture: a route per kind of match
/// and filter, a gRPC route, and L7 authorization on methods, paths and
/// headers.
const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: Exact, value: /exact}, method: GET}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-added, value: "1"}], remove: [x-drop], set: [{name: x-set, value: v}]}
  - matches: [{path: {type: PathPrefix, value: /v2}, headers: [{name: x-canary, value: "yes"}]}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: api.demo, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{name: api, port: 80, weight: 90}, {name: api, port: 80, weight: 10}]
  - matches: [{path: {type: RegularExpression, value: "/re/[a-z]+/(x|y)*"}, queryParams: [{name: q, value: "1"}]}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: other.example, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /moved}}
  - matches: [{path: {type: PathPrefix, value: /}}]
    timeouts: {request: 5s, backendRequest: 1s}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: api-grpc, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  - matches: [{method: {service: demo.Echo, method: Say}, headers: [{name: x-tenant, value: a}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reads, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: api}]
  rules:
  - from: [{source: {namespaces: [demo]}}]
    to: [{operation: {methods: [GET, HEAD, POST], paths: ["/exact", "/v2/*", "/re/*", "/demo.Echo/*", "/"], notPaths: ["/v2/admin*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-debug, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - when: [{key: "request.headers[X-Debug]", values: ["*"]}]
  - to: [{operation: {hosts: ["*.internal"], paths: ["/api/{*}/secret/{**}"]}}]
"#;

/// The registry (`demo/api` at 10.96.0.1:80, two endpoints; `demo/web`).
pub fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| {
        let config = config::parse(std::path::Path::new("fuzz-registry.yaml"), REGISTRY).expect("the fixed registry");
        Registry::from_config(&config)
    })
}

/// The waypoint the fixtures' routes attach to.
pub fn waypoint() -> ObjectRef {
    ObjectRef { namespace: "demo".into(), name: "waypoint".into() }
}

/// `sources` compiled for the fixed waypoint against the fixed registry.
pub fn route_set(sources: &[Source]) -> RouteSet {
    RouteSet::build(sources, registry(), &waypoint(), crate::policy::DEFAULT_ROOT_NAMESPACE)
}

/// The waypoint fixture's routes and policies, compiled.
pub fn waypoint_routes() -> &'static RouteSet {
    static SET: OnceLock<RouteSet> = OnceLock::new();
    SET.get_or_init(|| {
        let set = route_set(&[Source { file: "fuzz-routes.yaml".into(), text: ROUTES.into() }]);
        let rejected = set.rejected();
        assert!(rejected.is_empty(), "the fuzz fixture's routes must all be accepted: {rejected:?}");
        set
    })
}

fn state_dir() -> PathBuf {
    std::env::temp_dir().join(format!("heddle-fuzz-{}", std::process::id()))
}

/// A local-mode mesh CA whose configuration is [`REGISTRY`], accepting
/// [`NODE_TOKEN`] for `node-a`.
pub fn ca() -> &'static ca_server::CaServer {
    static CA: OnceLock<ca_server::CaServer> = OnceLock::new();
    CA.get_or_init(|| {
        let dir = state_dir();
        let _ = std::fs::remove_dir_all(&dir);
        let token = crate::identity::ca_auth::token_path(&dir.join("ca"), "node-a");
        std::fs::create_dir_all(token.parent().expect("a token directory")).expect("the CA's state directory");
        std::fs::write(&token, NODE_TOKEN).expect("the node token");
        let config = dir.join("cluster.yaml");
        std::fs::write(&config, REGISTRY).expect("the CA's configuration");
        let settings = ca_server::CaSettings {
            state_dir: dir.join("ca"),
            config,
            trust_domain: "cluster.local".into(),
            leaf_ttl: Duration::from_mins(10),
        };
        ca_server::CaServer::new(&settings).expect("the fuzz CA")
    })
}

#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl tls::CurrentCert for Fixed {
    fn current(&self) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The tunnel's TLS server configuration, with a certificate of the fixed
/// CA for `demo/api`.
pub fn tunnel_tls() -> Arc<rustls::ServerConfig> {
    static CFG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CFG.get_or_init(|| {
        let authority = crate::identity::authority::Authority::load_or_create(
            &state_dir().join("tunnel-ca"),
            "cluster.local",
            Duration::from_mins(10),
        )
        .expect("the tunnel fixture's CA");
        let (chain, key) = authority.serving_cert(&SpiffeId::new("cluster.local", "demo", "api")).expect("a cert");
        let chain: Vec<CertificateDer<'static>> =
            chain.iter().map(|p| CertificateDer::from_pem_slice(p.as_bytes()).expect("a certificate")).collect();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("a key");
        let signing = tls::provider().key_provider.load_private_key(key).expect("a signing key");
        let cert = Arc::new(Fixed(Arc::new(rustls::sign::CertifiedKey::new(chain, signing))));
        let roots = tls::roots_from_pem(authority.bundle_pem()).expect("the fixture's roots");
        tls::server_config(cert, roots).expect("the tunnel's server configuration")
    })
    .clone()
}

/// Kubernetes objects through the conversions the agent applies to them.
pub fn convert_k8s(items: &[serde_json::Value]) {
    use k8s_openapi::api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    };
    use kube::api::DynamicObject;

    use crate::k8s::convert;

    fn typed<T: serde::de::DeserializeOwned>(v: &serde_json::Value, out: &mut Vec<T>) {
        if let Ok(t) = serde_json::from_value(v.clone()) {
            out.push(t);
        }
    }
    let (mut namespaces, mut pods, mut services, mut slices, mut objects) =
        (Vec::<Namespace>::new(), Vec::<Pod>::new(), Vec::<Service>::new(), Vec::<EndpointSlice>::new(), Vec::new());
    for item in items {
        match item.get("kind").and_then(serde_json::Value::as_str) {
            Some("Namespace") => typed(item, &mut namespaces),
            Some("Pod") => typed(item, &mut pods),
            Some("Service") => typed(item, &mut services),
            Some("EndpointSlice") => typed(item, &mut slices),
            _ => typed::<DynamicObject>(item, &mut objects),
        }
    }
    let namespaces = convert::namespaces(&namespaces);
    for pod in &pods {
        let _ = (convert::workload(pod, &namespaces, "cluster.local", None), convert::pod_ips(pod));
    }
    let slices: Vec<&EndpointSlice> = slices.iter().collect();
    for svc in &services {
        let waypoint = svc.metadata.namespace.as_ref().and_then(|n| namespaces.get(n)?.use_waypoint.as_deref());
        let _ = convert::service(svc, &slices, waypoint);
    }
    let _ = convert::waypoints(&objects);
    let policies: Vec<_> = objects.iter().filter_map(|o| crate::k8s::source::policy_object(o).ok()).collect();
    let _ = crate::policy::PolicySet::from_objects(policies, crate::policy::DEFAULT_ROOT_NAMESPACE);
    let sources: Vec<Source> = objects.iter().filter_map(crate::k8s::route_source::source_of).collect();
    let _ = route_set(&sources);
}
