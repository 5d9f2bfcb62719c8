//! Which traffic a waypoint owns, and where its pods are.
//!
//! Built once per snapshot ([`Registry::with_waypoints`]): every VIP of a
//! service that uses a waypoint, and every IP of that service's endpoint
//! pods, maps to the waypoint, so the source agent's check is one hash
//! lookup on the destination IP ([`Registry::waypoint_for`]); a registry
//! without waypoints answers from an empty map. A waypoint's pods are the
//! workloads of its namespace labelled
//! [`crate::config::GATEWAY_NAME_LABEL`] with its name; they are never
//! captured themselves.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use serde::Serialize;

use super::{ObjectRef, Registry, Service, Workload};
use crate::{config::GATEWAY_NAME_LABEL, identity::SpiffeId};

/// A waypoint and the pods that run it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Waypoint {
    /// Namespace and name.
    #[serde(flatten)]
    pub id: ObjectRef,
    /// Its pods, stable order.
    pub pods: Vec<ObjectRef>,
    #[serde(skip)]
    next: AtomicUsize,
}

/// Why a connection cannot be sent to its waypoint.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WaypointError {
    /// The waypoint has no pod with an address of the right family.
    #[error("waypoint {0} has no running pod")]
    NoPods(ObjectRef),
}

impl Workload {
    /// The waypoint this pod runs, if it is a waypoint's pod (such pods
    /// terminate HBONE themselves and are never captured).
    #[must_use]
    pub fn runs_waypoint(&self) -> Option<&str> {
        self.labels.get(GATEWAY_NAME_LABEL).map(String::as_str)
    }
}

impl Registry {
    /// Adds the waypoints `ids` and indexes the traffic they own.
    #[must_use]
    pub fn with_waypoints(mut self, ids: impl IntoIterator<Item = ObjectRef>) -> Self {
        for id in ids {
            let pods = self
                .workloads
                .values()
                .filter(|w| w.id.namespace == id.namespace && w.runs_waypoint() == Some(&id.name))
                .map(|w| w.id.clone())
                .collect();
            self.waypoints.insert(id.clone(), Waypoint { id, pods, next: AtomicUsize::new(0) });
        }
        let mut owned = Vec::new();
        for s in self.services.values() {
            let Some(wp) = self.waypoint_of(s) else {
                continue;
            };
            owned.push((s.vip, wp.clone()));
            for e in &s.endpoints {
                let Some(w) = self.workloads.get(e) else {
                    continue;
                };
                if w.runs_waypoint().is_none() {
                    owned.extend(w.ips.iter().map(|ip| (*ip, wp.clone())));
                }
            }
        }
        self.waypoint_by_ip.extend(owned);
        self
    }

    /// Whether `w` runs a waypoint of this registry: labelled with the name
    /// of a waypoint that exists in its namespace. A pod carrying the label
    /// for anything else (another Gateway implementation's pods carry it
    /// too) is an ordinary workload, captured as any other.
    #[must_use]
    pub fn is_waypoint_pod(&self, w: &Workload) -> bool {
        w.runs_waypoint().is_some_and(|name| {
            self.waypoints.contains_key(&ObjectRef { namespace: w.id.namespace.clone(), name: name.to_owned() })
        })
    }

    /// The waypoint that owns `service`, if it uses one that exists.
    #[must_use]
    pub fn waypoint_of(&self, service: &Service) -> Option<&ObjectRef> {
        let name = service.waypoint.as_ref()?;
        let id = ObjectRef { namespace: service.id.namespace.clone(), name: name.clone() };
        self.waypoints.get_key_value(&id).map(|(k, _)| k)
    }

    /// The waypoint that owns traffic to `ip` (a service VIP, or a pod of a
    /// service), if any: one lookup, empty without waypoints.
    #[must_use]
    pub fn waypoint_for(&self, ip: IpAddr) -> Option<&ObjectRef> {
        if self.waypoint_by_ip.is_empty() {
            return None;
        }
        self.waypoint_by_ip.get(&ip)
    }

    /// A waypoint by namespace/name.
    #[must_use]
    pub fn waypoint(&self, id: &ObjectRef) -> Option<&Waypoint> {
        self.waypoints.get(id)
    }

    /// All waypoints.
    pub fn waypoints(&self) -> impl Iterator<Item = &Waypoint> {
        self.waypoints.values()
    }

    /// One of the waypoint's pods (round robin): its address of the same
    /// family as `like`, and its identity.
    pub fn waypoint_pod(&self, id: &ObjectRef, like: IpAddr) -> Result<(IpAddr, SpiffeId), WaypointError> {
        let none = || WaypointError::NoPods(id.clone());
        let wp = self.waypoints.get(id).ok_or_else(none)?;
        let pods: Vec<(IpAddr, &SpiffeId)> = wp
            .pods
            .iter()
            .filter_map(|p| {
                let w = self.workloads.get(p)?;
                let ip = w.ips.iter().find(|ip| ip.is_ipv4() == like.is_ipv4())?;
                Some((*ip, &w.identity))
            })
            .collect();
        if pods.is_empty() {
            return Err(none());
        }
        let (ip, identity) = pods[wp.next.fetch_add(1, Ordering::Relaxed) % pods.len()];
        Ok((ip, identity.clone()))
    }

    /// Services whose traffic `waypoint` owns.
    pub fn services_of<'a>(&'a self, waypoint: &'a ObjectRef) -> impl Iterator<Item = &'a Service> + 'a {
        self.services.values().filter(move |s| self.waypoint_of(s) == Some(waypoint))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::{config, registry::Registry};

    fn registry(text: &str) -> Registry {
        Registry::from_config(&config::parse(Path::new("t"), text).unwrap())
    }

    const FILE: &str = r#"
namespaces: [{name: demo, useWaypoint: wp}]
waypoints: [{name: wp, namespace: demo}]
workloads:
  - {name: wp-1, namespace: demo, serviceAccount: wp, node: n1, ips: ["10.0.0.9"], enrolled: false,
     labels: {gateway.networking.k8s.io/gateway-name: wp}}
  - {name: api-1, namespace: demo, node: n2, ips: ["10.0.0.1"], enrolled: false, labels: {app: api}}
  - {name: raw-1, namespace: demo, node: n2, ips: ["10.0.0.2"], enrolled: false, labels: {app: raw}}
  - {name: other-1, namespace: other, node: n2, ips: ["10.0.0.3"], enrolled: false, labels: {app: api}}
services:
  - {name: api, namespace: demo, vip: 10.96.0.1, ports: [{port: 80}], selector: {app: api}}
  - {name: raw, namespace: demo, vip: 10.96.0.2, ports: [{port: 80}], selector: {app: raw}, useWaypoint: none}
  - {name: api, namespace: other, vip: 10.96.0.3, ports: [{port: 80}], selector: {app: api}}
"#;

    #[test]
    fn a_namespace_waypoint_owns_its_services_vips_and_endpoint_pods() {
        let reg = registry(FILE);
        for ip in ["10.96.0.1", "10.0.0.1"] {
            assert_eq!(reg.waypoint_for(ip.parse().unwrap()).unwrap().to_string(), "demo/wp", "{ip}");
        }
    }

    #[test]
    fn an_opted_out_service_and_other_namespaces_keep_the_l4_path() {
        let reg = registry(FILE);
        for ip in ["10.96.0.2", "10.0.0.2", "10.96.0.3", "10.0.0.3", "10.0.0.9"] {
            assert!(reg.waypoint_for(ip.parse().unwrap()).is_none(), "{ip}");
        }
    }

    #[test]
    fn picks_the_waypoint_pod_with_its_own_identity() {
        let reg = registry(FILE);
        let id = reg.waypoint_for("10.96.0.1".parse().unwrap()).unwrap().clone();
        let (ip, identity) = reg.waypoint_pod(&id, "10.96.0.1".parse().unwrap()).unwrap();
        assert_eq!(ip.to_string(), "10.0.0.9");
        assert_eq!(identity.to_string(), "spiffe://cluster.local/ns/demo/sa/wp");
        let names: Vec<_> = reg.services_of(&id).map(|s| s.id.to_string()).collect();
        assert_eq!(names, ["demo/api"]);
    }

    #[test]
    fn a_waypoint_without_pods_is_an_error_not_a_bypass() {
        let reg = registry(&FILE.replace("gateway-name: wp}", "app: x}"));
        let id = reg.waypoint_for("10.96.0.1".parse().unwrap()).unwrap().clone();
        let err = reg.waypoint_pod(&id, "10.96.0.1".parse().unwrap()).unwrap_err();
        assert_eq!(err.to_string(), "waypoint demo/wp has no running pod");
    }
}
