//! The in-memory registry of workloads and services: the one view of the
//! cluster every other module reads. The local file (`config`) feeds it now;
//! the Kubernetes source (`k8s::source`) feeds the same type; nothing else
//! knows which source is in use.
//!
//! A [`Registry`] is an immutable snapshot published through a
//! `tokio::sync::watch`; a change builds a new snapshot, so readers never see
//! a half-applied update.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use serde::Serialize;

use crate::{
    config::{InboundMode, LocalConfig, NO_WAYPOINT},
    identity::SpiffeId,
};

mod waypoints;
pub use waypoints::{Waypoint, WaypointError};

/// `namespace/name` of a workload or service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pod as the mesh sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Namespace and name.
    #[serde(flatten)]
    pub id: ObjectRef,
    /// Service account (the identity, later).
    pub service_account: String,
    /// Node it runs on.
    pub node: String,
    /// Pod IPs.
    pub ips: Vec<IpAddr>,
    /// Network namespace path (pods on this node).
    pub netns: Option<PathBuf>,
    /// In the mesh.
    pub enrolled: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Effective inbound mode (workload, else namespace, else permissive).
    pub inbound_mode: InboundMode,
    /// SPIFFE ID (from namespace and service account).
    #[serde(serialize_with = "ser_display")]
    pub identity: SpiffeId,
    /// The workload's stable name for metric labels: its controller (a
    /// Deployment, `StatefulSet`, `DaemonSet`, Job), else the pod's name. Pod
    /// names change on every rollout; this does not, which keeps label
    /// cardinality bounded.
    pub workload_name: String,
    /// IPs of the node the pod runs on (Kubernetes `status.hostIPs`): the
    /// source address of the kubelet's probes.
    pub host_ips: Vec<IpAddr>,
    /// Ports the kubelet probes (liveness, readiness, startup; named ports
    /// resolved), the only ones a connection from the node is exempted on.
    pub probe_ports: Vec<u16>,
}

fn ser_display<S: serde::Serializer>(v: &SpiffeId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A service port mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port on the VIP.
    pub port: u16,
    /// Port on the endpoints.
    pub target_port: u16,
}

/// A service: a VIP and the workloads behind it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Namespace and name.
    #[serde(flatten)]
    pub id: ObjectRef,
    /// Virtual IP.
    pub vip: IpAddr,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Endpoint workloads (selected by labels), stable order.
    pub endpoints: Vec<ObjectRef>,
    /// The waypoint (same namespace) that owns this service's traffic.
    pub waypoint: Option<String>,
    /// Round-robin cursor.
    #[serde(skip)]
    next: AtomicUsize,
}

/// A service as a source describes it, before it goes into a [`Registry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Namespace and name.
    pub id: ObjectRef,
    /// Virtual IP.
    pub vip: IpAddr,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Endpoint workloads, in a stable order.
    pub endpoints: Vec<ObjectRef>,
    /// The waypoint (same namespace) that owns this service's traffic, if
    /// any (already resolved against the namespace's default).
    pub waypoint: Option<String>,
}

/// Where a captured connection should go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Address to connect to.
    pub addr: SocketAddr,
    /// The service whose VIP was dialled, if any.
    pub service: Option<ObjectRef>,
    /// The destination workload, if it is known to the mesh.
    pub workload: Option<ObjectRef>,
}

/// Why a destination could not be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    /// The service exists but has no endpoint.
    #[error("service {service} has no endpoints")]
    NoEndpoints {
        /// The service.
        service: ObjectRef,
    },
    /// The VIP is a service's but the port is not one of its ports.
    #[error("service {service} has no port {port}")]
    NoSuchPort {
        /// The service.
        service: ObjectRef,
        /// The port dialled.
        port: u16,
    },
}

/// An immutable snapshot of the cluster.
#[derive(Debug, Default)]
pub struct Registry {
    workloads: BTreeMap<ObjectRef, Workload>,
    by_ip: HashMap<IpAddr, ObjectRef>,
    services: BTreeMap<ObjectRef, Service>,
    by_vip: HashMap<IpAddr, ObjectRef>,
    trust_domain: String,
    /// Waypoints by namespace/name, with the pods that run them.
    waypoints: BTreeMap<ObjectRef, Waypoint>,
    /// Service VIPs and pod IPs whose traffic a waypoint owns.
    waypoint_by_ip: HashMap<IpAddr, ObjectRef>,
}

impl Registry {
    /// Builds a snapshot from a validated local configuration.
    #[must_use]
    pub fn from_config(config: &LocalConfig) -> Self {
        let ns_modes: HashMap<&str, InboundMode> =
            config.namespaces.iter().filter_map(|n| Some((n.name.as_str(), n.inbound_mode?))).collect();
        let ns_waypoints: HashMap<&str, &str> =
            config.namespaces.iter().filter_map(|n| Some((n.name.as_str(), n.use_waypoint.as_deref()?))).collect();
        let workloads: Vec<Workload> = config
            .workloads
            .iter()
            .map(|w| Workload {
                id: ObjectRef { namespace: w.namespace.clone(), name: w.name.clone() },
                service_account: w.service_account.clone(),
                node: w.node.clone(),
                ips: w.ips.clone(),
                netns: w.netns.clone(),
                enrolled: w.enrolled,
                labels: w.labels.clone(),
                inbound_mode: w
                    .inbound_mode
                    .or_else(|| ns_modes.get(w.namespace.as_str()).copied())
                    .unwrap_or_default(),
                identity: SpiffeId::new(&config.trust_domain, &w.namespace, &w.service_account),
                workload_name: w.name.clone(),
                host_ips: Vec::new(),
                probe_ports: Vec::new(),
            })
            .collect();
        // The local file selects endpoints by labels, as a Service selector does.
        let services: Vec<ServiceEntry> = config
            .services
            .iter()
            .map(|s| ServiceEntry {
                id: ObjectRef { namespace: s.namespace.clone(), name: s.name.clone() },
                vip: s.vip,
                ports: s
                    .ports
                    .iter()
                    .map(|p| ServicePort { port: p.port, target_port: p.target_port.unwrap_or(p.port) })
                    .collect(),
                endpoints: workloads
                    .iter()
                    .filter(|w| {
                        w.id.namespace == s.namespace && s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    })
                    .map(|w| w.id.clone())
                    .collect(),
                waypoint: s
                    .use_waypoint
                    .as_deref()
                    .or_else(|| ns_waypoints.get(s.namespace.as_str()).copied())
                    .filter(|w| *w != NO_WAYPOINT)
                    .map(str::to_owned),
            })
            .collect();
        let waypoints =
            config.waypoints.iter().map(|w| ObjectRef { namespace: w.namespace.clone(), name: w.name.clone() });
        Self::from_parts(&config.trust_domain, workloads, services).with_waypoints(waypoints)
    }

    /// Builds a snapshot from workloads and services whatever their source
    /// (the local file, or the Kubernetes reflectors). A later workload with
    /// the same IP as an earlier one takes the IP over.
    #[must_use]
    pub fn from_parts(
        trust_domain: &str,
        workloads: impl IntoIterator<Item = Workload>,
        services: impl IntoIterator<Item = ServiceEntry>,
    ) -> Self {
        let mut reg = Registry { trust_domain: trust_domain.to_owned(), ..Registry::default() };
        for w in workloads {
            for ip in &w.ips {
                reg.by_ip.insert(*ip, w.id.clone());
            }
            reg.workloads.insert(w.id.clone(), w);
        }
        for s in services {
            reg.by_vip.insert(s.vip, s.id.clone());
            reg.services.insert(
                s.id.clone(),
                Service {
                    id: s.id,
                    vip: s.vip,
                    ports: s.ports,
                    endpoints: s.endpoints,
                    waypoint: s.waypoint,
                    next: AtomicUsize::new(0),
                },
            );
        }
        reg
    }

    /// The mesh's trust domain.
    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A workload by namespace/name.
    #[must_use]
    pub fn workload(&self, id: &ObjectRef) -> Option<&Workload> {
        self.workloads.get(id)
    }

    /// All workloads, ordered by namespace/name.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values()
    }

    /// All services.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    /// A service by namespace/name.
    #[must_use]
    pub fn service(&self, id: &ObjectRef) -> Option<&Service> {
        self.services.get(id)
    }

    /// The service whose VIP is `ip`.
    #[must_use]
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        self.by_vip.get(&ip).and_then(|id| self.services.get(id))
    }

    /// Workloads scheduled on `node`.
    pub fn on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.values().filter(move |w| w.node == node)
    }

    /// The workload that owns `ip`.
    #[must_use]
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).and_then(|id| self.workloads.get(id))
    }

    /// Resolves an original destination: a service VIP becomes one of its
    /// endpoints (round robin); anything else is dialled as it is.
    pub fn resolve(&self, dst: SocketAddr) -> Result<Resolved, ResolveError> {
        let Some(svc) = self.by_vip.get(&dst.ip()).and_then(|id| self.services.get(id)) else {
            return Ok(Resolved { addr: dst, service: None, workload: self.by_ip.get(&dst.ip()).cloned() });
        };
        let Some(port) = svc.ports.iter().find(|p| p.port == dst.port()) else {
            return Err(ResolveError::NoSuchPort { service: svc.id.clone(), port: dst.port() });
        };
        // Endpoints of the same address family as the VIP.
        let candidates: Vec<(&ObjectRef, IpAddr)> = svc
            .endpoints
            .iter()
            .filter_map(|id| {
                let w = self.workloads.get(id)?;
                let ip = w.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4())?;
                Some((id, *ip))
            })
            .collect();
        if candidates.is_empty() {
            return Err(ResolveError::NoEndpoints { service: svc.id.clone() });
        }
        let i = svc.next.fetch_add(1, Ordering::Relaxed) % candidates.len();
        let (id, ip) = candidates[i];
        Ok(Resolved {
            addr: SocketAddr::new(ip, port.target_port),
            service: Some(svc.id.clone()),
            workload: Some(id.clone()),
        })
    }
}

/// The snapshot shared by every task.
pub type SharedRegistry = Arc<Registry>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::path::Path;

    fn registry() -> Registry {
        let text = r#"
workloads:
  - {name: a1, namespace: demo, node: n1, ips: ["10.0.0.1"], enrolled: false, labels: {app: a}}
  - {name: a2, namespace: demo, node: n2, ips: ["10.0.0.2"], enrolled: false, labels: {app: a}}
  - {name: b1, namespace: other, node: n1, ips: ["10.0.0.3"], enrolled: false, labels: {app: a}}
services:
  - {name: a, namespace: demo, vip: 10.96.0.1, ports: [{port: 80, targetPort: 8080}], selector: {app: a}}
  - {name: empty, namespace: demo, vip: 10.96.0.2, ports: [{port: 80}], selector: {app: none}}
"#;
        Registry::from_config(&config::parse(Path::new("t"), text).unwrap())
    }

    #[test]
    fn resolves_a_vip_round_robin_to_endpoints_in_its_namespace() {
        let reg = registry();
        let dst: SocketAddr = "10.96.0.1:80".parse().unwrap();
        let got: Vec<_> = (0..4).map(|_| reg.resolve(dst).unwrap().addr.to_string()).collect();
        assert_eq!(got, ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(reg.resolve(dst).unwrap().service.unwrap().to_string(), "demo/a");
    }

    #[test]
    fn passes_a_pod_ip_through_and_names_its_workload() {
        let reg = registry();
        let r = reg.resolve("10.0.0.3:9000".parse().unwrap()).unwrap();
        assert_eq!(r.addr.to_string(), "10.0.0.3:9000");
        assert_eq!(r.workload.unwrap().to_string(), "other/b1");
        assert!(r.service.is_none());
    }

    #[test]
    fn refuses_unknown_service_ports_and_empty_services() {
        let reg = registry();
        assert!(matches!(reg.resolve("10.96.0.1:81".parse().unwrap()), Err(ResolveError::NoSuchPort { .. })));
        assert!(matches!(reg.resolve("10.96.0.2:80".parse().unwrap()), Err(ResolveError::NoEndpoints { .. })));
    }
}
