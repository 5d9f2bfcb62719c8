//! Kubernetes objects to the mesh's domain types, as pure functions: Pods
//! and Namespaces become [`Workload`]s, Services and `EndpointSlices` become
//! [`ServiceEntry`]s. The watch tasks in [`super::source`] call these on
//! every change; nothing past this module sees a Kubernetes type.
//!
//! Enrollment (issue 6): a Namespace labelled `heddle.dev/mesh=enabled`
//! enrolls its pods; a Pod labelled `heddle.dev/mesh=disabled` opts out;
//! a `hostNetwork` pod is never enrolled and is left out of the registry
//! altogether (its IP is the node's, which must not resolve to a workload).
//! The inbound mode comes from the annotation `heddle.dev/inbound-mode`
//! (`strict` or `permissive`) on the Pod, else on its Namespace, else
//! permissive.
//!
//! Waypoints (issue 10): a `gateway.networking.k8s.io/v1` Gateway of class
//! [`WAYPOINT_CLASS`] is a waypoint; the label [`USE_WAYPOINT_LABEL`] on a
//! Service, else on its Namespace, names the waypoint (of the same
//! namespace) that owns the Service's traffic, `none` on a Service opting
//! it out of its namespace's. A label naming a Gateway that does not exist
//! leaves the traffic on the L4 path, as in Istio ambient.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, PodSpec, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::api::DynamicObject;

use crate::{
    config::{InboundMode, NO_WAYPOINT},
    identity::SpiffeId,
    registry::{ObjectRef, ServiceEntry, ServicePort, Workload},
};

/// The enrollment label, on Namespaces (`enabled`) and Pods (`disabled`).
pub const MESH_LABEL: &str = "heddle.dev/mesh";
/// The value of [`MESH_LABEL`] that enrolls a Namespace.
pub const ENABLED: &str = "enabled";
/// The value of [`MESH_LABEL`] that opts a Pod out.
pub const DISABLED: &str = "disabled";
/// The inbound mode annotation, on Pods and Namespaces.
pub const INBOUND_MODE_ANNOTATION: &str = "heddle.dev/inbound-mode";
/// The label `EndpointSlices` carry to name their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming the waypoint of a Namespace's or a Service's traffic.
pub const USE_WAYPOINT_LABEL: &str = "heddle.dev/use-waypoint";
/// The `GatewayClass` of Heddle's waypoints.
pub const WAYPOINT_CLASS: &str = "heddle-waypoint";

/// What the mesh needs to know about a namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// `heddle.dev/mesh=enabled`.
    pub enrolled: bool,
    /// `heddle.dev/inbound-mode`, when valid.
    pub inbound_mode: Option<InboundMode>,
    /// `heddle.dev/use-waypoint`.
    pub use_waypoint: Option<String>,
}

/// Namespaces by name.
#[must_use]
pub fn namespaces<'a>(items: impl IntoIterator<Item = &'a Namespace>) -> HashMap<String, NamespaceInfo> {
    items
        .into_iter()
        .filter_map(|ns| {
            let name = ns.metadata.name.clone()?;
            let enrolled = label(ns.metadata.labels.as_ref(), MESH_LABEL) == Some(ENABLED);
            let inbound_mode = inbound_mode(ns.metadata.annotations.as_ref());
            let use_waypoint = label(ns.metadata.labels.as_ref(), USE_WAYPOINT_LABEL)
                .filter(|w| *w != NO_WAYPOINT && !w.is_empty())
                .map(str::to_owned);
            Some((name, NamespaceInfo { enrolled, inbound_mode, use_waypoint }))
        })
        .collect()
}

fn label<'a>(map: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    map?.get(key).map(String::as_str)
}

fn inbound_mode(annotations: Option<&BTreeMap<String, String>>) -> Option<InboundMode> {
    match label(annotations, INBOUND_MODE_ANNOTATION)? {
        "strict" | "STRICT" => Some(InboundMode::Strict),
        "permissive" | "PERMISSIVE" => Some(InboundMode::Permissive),
        other => {
            tracing::debug!(value = other, "ignoring an unknown {INBOUND_MODE_ANNOTATION}");
            None
        }
    }
}

/// The workload of a pod, or `None` for a pod the mesh ignores: no IP yet,
/// finished (`Succeeded`/`Failed`), or `hostNetwork`. `netns` is filled in
/// by the caller for pods on its node.
#[must_use]
pub fn workload<S: std::hash::BuildHasher>(
    pod: &Pod,
    namespaces: &HashMap<String, NamespaceInfo, S>,
    trust_domain: &str,
    netns: Option<PathBuf>,
) -> Option<Workload> {
    let meta = &pod.metadata;
    let (name, namespace) = (meta.name.clone()?, meta.namespace.clone()?);
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    if is_finished(pod) {
        return None;
    }
    let ips = pod_ips(pod);
    if ips.is_empty() {
        return None;
    }
    let ns = namespaces.get(&namespace);
    let opted_out = label(meta.labels.as_ref(), MESH_LABEL) == Some(DISABLED);
    let service_account = service_account(spec).to_owned();
    Some(Workload {
        identity: SpiffeId::new(trust_domain, &namespace, &service_account),
        workload_name: workload_name(pod, &name),
        host_ips: host_ips(pod),
        probe_ports: probe_ports(spec),
        id: ObjectRef { namespace, name },
        service_account,
        node: spec.node_name.clone().unwrap_or_default(),
        ips,
        netns,
        enrolled: ns.is_some_and(|n| n.enrolled) && !opted_out,
        labels: meta.labels.clone().unwrap_or_default(),
        inbound_mode: inbound_mode(meta.annotations.as_ref())
            .or_else(|| ns.and_then(|n| n.inbound_mode))
            .unwrap_or_default(),
    })
}

/// Whether the pod has finished (`Succeeded`/`Failed`): it runs nothing and
/// holds no identity. The CA's authorizer applies the same rule.
#[must_use]
pub fn is_finished(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed")
}

/// The pod's service account, `default` when unset (as the API server
/// defaults it).
#[must_use]
pub fn service_account(spec: &PodSpec) -> &str {
    spec.service_account_name.as_deref().filter(|sa| !sa.is_empty()).unwrap_or("default")
}

/// The name metrics use for a pod's workload: its controller's name, with
/// a `ReplicaSet` mapped to its Deployment by removing the
/// `-<pod-template-hash>` suffix (as Istio derives `source_workload`), else
/// the pod's own name.
fn workload_name(pod: &Pod, pod_name: &str) -> String {
    let meta = &pod.metadata;
    let Some(owner) = meta.owner_references.iter().flatten().find(|o| o.controller == Some(true)) else {
        return pod_name.to_owned();
    };
    if owner.kind == "ReplicaSet" {
        if let Some(hash) = label(meta.labels.as_ref(), "pod-template-hash") {
            if let Some(deployment) = owner.name.strip_suffix(&format!("-{hash}")) {
                return deployment.to_owned();
            }
        }
    }
    owner.name.clone()
}

/// The ports the kubelet probes: `httpGet`, `tcpSocket` and `grpc` of every
/// container's liveness, readiness and startup probes, named ports resolved
/// against that container's ports. Exec probes open no connection.
fn probe_ports(spec: &PodSpec) -> Vec<u16> {
    let mut ports: Vec<u16> = spec
        .containers
        .iter()
        .flat_map(|c| {
            let named = |name: &str| {
                c.ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name))
                    .and_then(|p| u16::try_from(p.container_port).ok())
            };
            let port = move |p: &IntOrString| match p {
                IntOrString::Int(n) => u16::try_from(*n).ok(),
                IntOrString::String(name) => named(name),
            };
            [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
                .into_iter()
                .flatten()
                .flat_map(move |probe| {
                    [
                        probe.http_get.as_ref().and_then(|h| port(&h.port)),
                        probe.tcp_socket.as_ref().and_then(|t| port(&t.port)),
                        probe.grpc.as_ref().and_then(|g| u16::try_from(g.port).ok()),
                    ]
                })
                .flatten()
                .collect::<Vec<_>>()
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The IPs of the pod's node (`status.hostIPs`, else `status.hostIP`).
fn host_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let listed: Vec<&str> = match &status.host_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(|p| p.ip.as_str()).collect(),
        _ => status.host_ip.as_deref().into_iter().collect(),
    };
    listed.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// The pod's IPs (`status.podIPs`, else `status.podIP`), unparseable ones
/// left out.
#[must_use]
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let listed: Vec<&str> = match &status.pod_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(|p| p.ip.as_str()).collect(),
        _ => status.pod_ip.as_deref().into_iter().collect(),
    };
    listed.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// The service entry of a `ClusterIP` Service: its first IPv4 cluster IP (the
/// datapath captures IPv4, and IPv4-mapped IPv6), its TCP ports with target
/// ports resolved from the `EndpointSlices` (named target ports need them),
/// and its ready endpoints that are pods. Headless and `ExternalName`
/// Services have no VIP and give `None`. `namespace_waypoint` is its
/// Namespace's [`USE_WAYPOINT_LABEL`], which the Service's own overrides.
#[must_use]
pub fn service(svc: &Service, slices: &[&EndpointSlice], namespace_waypoint: Option<&str>) -> Option<ServiceEntry> {
    let (name, namespace) = (svc.metadata.name.clone()?, svc.metadata.namespace.clone()?);
    let spec = svc.spec.as_ref()?;
    let ips = spec.cluster_ips.clone().unwrap_or_else(|| spec.cluster_ip.clone().into_iter().collect());
    let vip = ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()).find(IpAddr::is_ipv4)?;
    let mine: Vec<&EndpointSlice> = slices
        .iter()
        .copied()
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(namespace.as_str())
                && label(s.metadata.labels.as_ref(), SERVICE_NAME_LABEL) == Some(name.as_str())
        })
        .collect();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let target_port = target_port(p.name.as_deref(), p.target_port.as_ref(), &mine).unwrap_or(port);
            Some(ServicePort { port, target_port })
        })
        .collect();
    let mut endpoints: Vec<ObjectRef> = mine
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| {
            let target = e.target_ref.as_ref()?;
            (target.kind.as_deref() == Some("Pod")).then_some(())?;
            Some(ObjectRef {
                namespace: target.namespace.clone().unwrap_or_else(|| namespace.clone()),
                name: target.name.clone()?,
            })
        })
        .collect();
    endpoints.sort();
    endpoints.dedup();
    let waypoint = match label(svc.metadata.labels.as_ref(), USE_WAYPOINT_LABEL) {
        Some(NO_WAYPOINT) => None,
        Some(w) if !w.is_empty() => Some(w.to_owned()),
        _ => namespace_waypoint.map(str::to_owned),
    };
    Some(ServiceEntry { id: ObjectRef { namespace, name }, vip, ports, endpoints, waypoint })
}

/// Whether `gateway` (a `gateway.networking.k8s.io/v1` Gateway, as an
/// unstructured object) is of class [`WAYPOINT_CLASS`].
#[must_use]
pub fn is_waypoint(gateway: &serde_json::Value) -> bool {
    gateway.pointer("/spec/gatewayClassName").and_then(serde_json::Value::as_str) == Some(WAYPOINT_CLASS)
}

/// The waypoints among `gateways`: those of class [`WAYPOINT_CLASS`], sorted.
#[must_use]
pub fn waypoints<'a>(gateways: impl IntoIterator<Item = &'a DynamicObject>) -> Vec<ObjectRef> {
    let mut out: Vec<ObjectRef> = gateways
        .into_iter()
        .filter(|g| is_waypoint(&g.data))
        .filter_map(|g| Some(ObjectRef { namespace: g.metadata.namespace.clone()?, name: g.metadata.name.clone()? }))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The endpoints' port for a service port: the `EndpointSlice` port of the
/// same name (this is how Kubernetes resolves named target ports), else a
/// numeric `targetPort`.
fn target_port(name: Option<&str>, target: Option<&IntOrString>, slices: &[&EndpointSlice]) -> Option<u16> {
    let from_slice = slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|p| p.name.as_deref().unwrap_or("") == name.unwrap_or(""))
        .and_then(|p| u16::try_from(p.port?).ok());
    from_slice.or(match target {
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn ns(name: &str, labels: &serde_json::Value, annotations: &serde_json::Value) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels, "annotations": annotations}}))
            .unwrap()
    }

    fn web(labels: &serde_json::Value, host_network: bool) -> Pod {
        pod(json!({
            "metadata": {"name": "web-1", "namespace": "demo", "labels": labels},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web", "hostNetwork": host_network, "containers": []},
            "status": {"phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}]}
        }))
    }

    #[test]
    fn enrolls_pods_of_a_labelled_namespace_with_their_service_account_identity() {
        let nss = namespaces(&[ns("demo", &json!({"heddle.dev/mesh": "enabled"}), &json!({}))]);
        let w = workload(&web(&json!({"app": "web"}), false), &nss, "cluster.local", None).unwrap();
        assert!(w.enrolled);
        assert_eq!(w.node, "node-a");
        assert_eq!(w.ips, vec!["10.1.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(w.identity.to_string(), "spiffe://cluster.local/ns/demo/sa/web");
        assert_eq!(w.labels.get("app").map(String::as_str), Some("web"));
    }

    #[test]
    fn leaves_pods_of_unlabelled_namespaces_and_opted_out_pods_unenrolled() {
        let plain = namespaces(&[ns("demo", &json!({}), &json!({}))]);
        assert!(!workload(&web(&json!({}), false), &plain, "td", None).unwrap().enrolled);
        let on = namespaces(&[ns("demo", &json!({"heddle.dev/mesh": "enabled"}), &json!({}))]);
        let out = web(&json!({"heddle.dev/mesh": "disabled"}), false);
        assert!(!workload(&out, &on, "td", None).unwrap().enrolled);
        let disabled_ns = namespaces(&[ns("demo", &json!({"heddle.dev/mesh": "disabled"}), &json!({}))]);
        assert!(!workload(&web(&json!({}), false), &disabled_ns, "td", None).unwrap().enrolled);
    }

    #[test]
    fn never_includes_host_network_pods_or_pods_without_ip_or_finished_pods() {
        let on = namespaces(&[ns("demo", &json!({"heddle.dev/mesh": "enabled"}), &json!({}))]);
        assert!(workload(&web(&json!({}), true), &on, "td", None).is_none());
        let pending = pod(json!({
            "metadata": {"name": "p", "namespace": "demo"},
            "spec": {"nodeName": "node-a", "containers": []},
            "status": {"phase": "Pending"}
        }));
        assert!(workload(&pending, &on, "td", None).is_none());
        let done = pod(json!({
            "metadata": {"name": "p", "namespace": "demo"},
            "spec": {"nodeName": "node-a", "containers": []},
            "status": {"phase": "Succeeded", "podIP": "10.1.0.9"}
        }));
        assert!(workload(&done, &on, "td", None).is_none());
    }

    #[test]
    fn names_the_workload_after_its_controller_and_keeps_the_node_ips() {
        let nss = namespaces(&[ns("demo", &json!({"heddle.dev/mesh": "enabled"}), &json!({}))]);
        let p = pod(json!({
            "metadata": {"name": "web-7c9f8d6b5-x2x7q", "namespace": "demo",
                         "labels": {"pod-template-hash": "7c9f8d6b5"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                             "name": "web-7c9f8d6b5", "uid": "u", "controller": true}]},
            "spec": {"nodeName": "n", "containers": []},
            "status": {"podIP": "10.1.0.7", "hostIP": "192.168.0.4", "hostIPs": [{"ip": "192.168.0.4"}]}
        }));
        let w = workload(&p, &nss, "td", None).unwrap();
        assert_eq!(w.workload_name, "web");
        assert!(w.probe_ports.is_empty());
        assert_eq!(w.host_ips, vec!["192.168.0.4".parse::<IpAddr>().unwrap()]);
        let mut sts = p.clone();
        sts.metadata.owner_references.as_mut().unwrap()[0].kind = "StatefulSet".into();
        sts.metadata.owner_references.as_mut().unwrap()[0].name = "db".into();
        assert_eq!(workload(&sts, &nss, "td", None).unwrap().workload_name, "db");
        let mut bare = p;
        bare.metadata.owner_references = None;
        assert_eq!(workload(&bare, &nss, "td", None).unwrap().workload_name, "web-7c9f8d6b5-x2x7q");
    }

    #[test]
    fn collects_the_probed_ports_resolving_named_ones() {
        let nss = namespaces(&[ns("demo", &json!({}), &json!({}))]);
        let p = pod(json!({
            "metadata": {"name": "api", "namespace": "demo"},
            "spec": {"nodeName": "n", "containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"port": "http", "path": "/ready"}},
                 "livenessProbe": {"tcpSocket": {"port": 8081}},
                 "startupProbe": {"exec": {"command": ["true"]}}},
                {"name": "side", "livenessProbe": {"grpc": {"port": 9000}}}
            ]},
            "status": {"podIP": "10.1.0.7"}
        }));
        let w = workload(&p, &nss, "td", None).unwrap();
        assert_eq!(w.probe_ports, vec![8080, 8081, 9000]);
    }

    #[test]
    fn uses_the_default_service_account_and_the_inbound_mode_annotations() {
        let nss = namespaces(&[ns(
            "demo",
            &json!({"heddle.dev/mesh": "enabled"}),
            &json!({"heddle.dev/inbound-mode": "strict"}),
        )]);
        let p = pod(json!({
            "metadata": {"name": "p", "namespace": "demo"},
            "spec": {"nodeName": "n", "containers": []},
            "status": {"podIP": "10.1.0.7"}
        }));
        let w = workload(&p, &nss, "td", None).unwrap();
        assert_eq!(w.service_account, "default");
        assert_eq!(w.inbound_mode, InboundMode::Strict);
        let mut p2 = p.clone();
        p2.metadata.annotations = Some([(INBOUND_MODE_ANNOTATION.to_owned(), "permissive".to_owned())].into());
        assert_eq!(workload(&p2, &nss, "td", None).unwrap().inbound_mode, InboundMode::Permissive);
    }

    fn svc(target_port: &serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "port": 80, "targetPort": target_port}],
                     "selector": {"app": "web"}}
        }))
        .unwrap()
    }

    fn slice(ready: bool) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "namespace": "demo", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.1.0.5"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "demo"}},
                {"addresses": ["10.1.0.6"], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": "web-2", "namespace": "demo"}}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn maps_a_cluster_ip_service_to_its_ready_pod_endpoints_and_named_target_port() {
        let s = slice(false);
        let e = service(&svc(&json!("http")), &[&s], None).unwrap();
        assert_eq!(e.vip.to_string(), "10.96.0.10");
        assert_eq!(e.ports, vec![ServicePort { port: 80, target_port: 8080 }]);
        let names: Vec<String> = e.endpoints.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["demo/web-1"]);
        let s = slice(true);
        assert_eq!(service(&svc(&json!("http")), &[&s], None).unwrap().endpoints.len(), 2);
    }

    #[test]
    fn uses_a_numeric_target_port_without_slices_and_skips_headless_services() {
        let e = service(&svc(&json!(9090)), &[], None).unwrap();
        assert_eq!(e.ports, vec![ServicePort { port: 80, target_port: 9090 }]);
        assert!(e.endpoints.is_empty());
        let mut headless = svc(&json!(80));
        headless.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        headless.spec.as_mut().unwrap().cluster_ips = Some(vec!["None".into()]);
        assert!(service(&headless, &[], None).is_none());
    }

    #[test]
    fn a_service_uses_its_own_waypoint_label_else_its_namespaces_and_none_opts_out() {
        let nss = namespaces(&[ns("demo", &json!({"heddle.dev/use-waypoint": "wp"}), &json!({}))]);
        let ns_wp = nss["demo"].use_waypoint.as_deref();
        assert_eq!(ns_wp, Some("wp"));
        assert_eq!(service(&svc(&json!(80)), &[], ns_wp).unwrap().waypoint.as_deref(), Some("wp"));
        let mut own = svc(&json!(80));
        own.metadata.labels = Some([(USE_WAYPOINT_LABEL.to_owned(), "other".to_owned())].into());
        assert_eq!(service(&own, &[], ns_wp).unwrap().waypoint.as_deref(), Some("other"));
        own.metadata.labels = Some([(USE_WAYPOINT_LABEL.to_owned(), "none".to_owned())].into());
        assert_eq!(service(&own, &[], ns_wp).unwrap().waypoint, None);
        assert_eq!(service(&svc(&json!(80)), &[], None).unwrap().waypoint, None);
    }

    #[test]
    fn only_gateways_of_the_waypoint_class_are_waypoints() {
        let gw = |ns: &str, name: &str, class: &str| {
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                   "metadata": {"name": name, "namespace": ns}, "spec": {"gatewayClassName": class}})
        };
        let all: Vec<DynamicObject> =
            [gw("demo", "wp", "heddle-waypoint"), gw("demo", "ingress", "istio"), gw("a", "wp", "heddle-waypoint")]
                .into_iter()
                .map(|v| serde_json::from_value(v).unwrap())
                .collect();
        let names: Vec<String> = waypoints(&all).iter().map(ToString::to_string).collect();
        assert_eq!(names, ["a/wp", "demo/wp"]);
    }
}
