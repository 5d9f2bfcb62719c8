//! Kubernetes objects describing the test bed, for the tests that run
//! agents against the API-server stand-in: what the kubelet and the
//! control plane would have stored for the test bed's namespaces and pods.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use heddle_tests::apiserver::{ApiServer, Resource};
use heddle_tests::{Node, Pod};
use serde_json::{json, Value};

/// The stand-in's port on node-a's transit address.
pub const API_PORT: u16 = 6443;

/// A Namespace object.
pub fn namespace(name: &str, labels: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// The Pod object of a test-bed pod: what the kubelet would report. Its
/// `hostIP` is the address its node uses toward its pods (the test bed's
/// gateway), where the kubelet's probes come from.
pub fn pod_object(pod: &Pod, labels: &Value) -> Value {
    let ip = pod.ip().to_string();
    let host_ip = Ipv4Addr::new(10, 44, pod.ip().octets()[2], 1).to_string();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name(), "namespace": pod.namespace(), "labels": labels,
                     "uid": format!("uid-{}-{}", pod.namespace(), pod.name())},
        "spec": {
            "nodeName": pod.node_name(),
            "serviceAccountName": pod.service_account(),
            "containers": [{"name": "app", "image": "heddle/pod-app"}]
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "hostIP": host_ip, "hostIPs": [{"ip": host_ip}]}
    })
}

/// Heddle's `AuthorizationPolicy` resource.
pub fn heddle_policies() -> Resource {
    Resource {
        api_version: "heddle.dev/v1alpha1".into(),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
        namespaced: true,
    }
}

/// Istio's `AuthorizationPolicy` resource.
pub fn istio_policies() -> Resource {
    Resource {
        api_version: "security.istio.io/v1".into(),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
        namespaced: true,
    }
}

/// The stand-in on `node`'s transit address, port [`API_PORT`], serving
/// Heddle's policies and, with `istio`, Istio's.
pub fn start_api(node: &Node, istio: bool) -> heddle_tests::Result<ApiServer> {
    let api = ApiServer::start_in_netns(&node.netns_path(), SocketAddr::new(IpAddr::V4(node.transit_ip()), API_PORT))?;
    api.register_crd(heddle_policies());
    if istio {
        api.register_crd(istio_policies());
    }
    Ok(api)
}
