//! Waypoints in the local configuration: the `waypoints:` list, and the
//! `useWaypoint` fields of namespaces and services that opt into one.
//!
//! A waypoint is named like a Gateway API `Gateway` of class
//! `heddle-waypoint`; the pods that run it are the workloads of its
//! namespace labelled `gateway.networking.k8s.io/gateway-name: <name>`, the
//! label Kubernetes puts on a Gateway's pods. Those pods are not captured by
//! their node agent: they terminate HBONE themselves.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{is_dns_label, LocalConfig};

/// Label naming the Gateway (waypoint) a pod runs.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// `useWaypoint` value that opts a service out of its namespace's waypoint.
pub const NO_WAYPOINT: &str = "none";

/// One waypoint.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WaypointSpec {
    /// Name (a DNS label), unique within its namespace.
    pub name: String,
    /// Namespace; a waypoint serves services of its own namespace.
    pub namespace: String,
}

/// Appends every problem with waypoints and the references to them.
pub(super) fn validate(config: &LocalConfig, problems: &mut Vec<String>) {
    let mut known = HashSet::new();
    for (i, w) in config.waypoints.iter().enumerate() {
        let at = format!("waypoints[{i}] ({}/{})", w.namespace, w.name);
        if !is_dns_label(&w.name) || w.name == NO_WAYPOINT {
            problems.push(format!("{at}: name: {:?} is not a valid waypoint name", w.name));
        }
        if !is_dns_label(&w.namespace) {
            problems.push(format!("{at}: namespace: {:?} is not a valid namespace", w.namespace));
        }
        if !known.insert((w.namespace.as_str(), w.name.as_str())) {
            problems.push(format!("{at}: waypoint {}/{} is listed twice", w.namespace, w.name));
        }
    }
    let check = |at: String, ns: &str, name: &str, allow_none: bool, problems: &mut Vec<String>| {
        if allow_none && name == NO_WAYPOINT {
            return;
        }
        if !known.contains(&(ns, name)) {
            problems.push(format!(
                "{at}: useWaypoint: no waypoint {ns}/{name} in waypoints (a waypoint serves its own namespace)"
            ));
        }
    };
    for (i, n) in config.namespaces.iter().enumerate() {
        if let Some(w) = &n.use_waypoint {
            check(format!("namespaces[{i}] ({})", n.name), &n.name, w, false, problems);
        }
    }
    for (i, s) in config.services.iter().enumerate() {
        if let Some(w) = &s.use_waypoint {
            let at = format!("services[{i}] ({}/{})", s.namespace, s.name);
            check(at, &s.namespace, w, true, problems);
        }
    }
    for (i, w) in config.workloads.iter().enumerate() {
        if let Some(gw) = w.labels.get(GATEWAY_NAME_LABEL) {
            if !known.contains(&(w.namespace.as_str(), gw.as_str())) {
                problems.push(format!(
                    "workloads[{i}] ({}/{}): labels: {GATEWAY_NAME_LABEL}: no waypoint {}/{gw} in waypoints",
                    w.namespace, w.name, w.namespace
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::parse;

    const FILE: &str = r#"
namespaces:
  - {name: demo, useWaypoint: waypoint}
waypoints:
  - {name: waypoint, namespace: demo}
workloads:
  - {name: wp, namespace: demo, node: n1, ips: ["10.0.0.9"], enrolled: false,
     labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
services:
  - {name: api, namespace: demo, vip: 10.96.0.1, ports: [{port: 80}], selector: {app: api}}
  - {name: raw, namespace: demo, vip: 10.96.0.2, ports: [{port: 80}], selector: {app: raw}, useWaypoint: none}
"#;

    #[test]
    fn accepts_waypoints_and_their_references() {
        let c = parse(Path::new("t.yaml"), FILE).unwrap();
        assert_eq!(c.waypoints[0].name, "waypoint");
        assert_eq!(c.namespaces[0].use_waypoint.as_deref(), Some("waypoint"));
    }

    #[test]
    fn names_every_dangling_waypoint_reference() {
        let text = FILE
            .replace("useWaypoint: waypoint}", "useWaypoint: missing}")
            .replace("useWaypoint: none}", "useWaypoint: other}")
            .replace("gateway-name: waypoint}", "gateway-name: gone}");
        let msg = parse(Path::new("t.yaml"), &text).unwrap_err().to_string();
        assert!(msg.contains("namespaces[0] (demo): useWaypoint: no waypoint demo/missing"), "{msg}");
        assert!(msg.contains("services[1] (demo/raw): useWaypoint: no waypoint demo/other"), "{msg}");
        assert!(
            msg.contains(
                "workloads[0] (demo/wp): labels: gateway.networking.k8s.io/gateway-name: no waypoint demo/gone"
            ),
            "{msg}"
        );
    }
}
