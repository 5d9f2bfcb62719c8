//! The cluster config file the test bed writes for the agents.
//!
//! One YAML file describes the whole cluster (every node's workloads and all
//! services); each agent picks its node with `--node`. The file is replaced
//! atomically (write a sibling, then rename) because agents poll it every
//! second and must never read half a file.
//!
//! Optional mesh settings (`trustDomain`, `namespaces`, a workload's
//! `inboundMode`) are left out of the file unless a test sets them, so the
//! agent's documented defaults apply (`cluster.local`, PERMISSIVE).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Result, TestbedError};

/// The default SPIFFE trust domain when the file names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The whole file.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterConfig {
    /// SPIFFE trust domain of the mesh; the agent's default if `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// Per-namespace settings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<NamespaceConfig>,
    /// Every pod of every node.
    pub workloads: Vec<WorkloadConfig>,
    /// Every service.
    pub services: Vec<ServiceConfig>,
    /// Waypoints.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waypoints: Vec<WaypointConfig>,
}

/// A waypoint.
#[derive(Debug, Clone, Serialize)]
pub struct WaypointConfig {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
}

/// One pod.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadConfig {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Node the pod runs on.
    pub node: String,
    /// Pod IPs.
    pub ips: Vec<Ipv4Addr>,
    /// Path of the pod's network namespace, e.g. `/run/netns/ht-1-0-client`.
    pub netns: PathBuf,
    /// Whether the mesh captures this pod's traffic.
    pub enrolled: bool,
    /// Pod labels (matched by service selectors).
    pub labels: BTreeMap<String, String>,
    /// The pod's own inbound mode (wins over its namespace's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound_mode: Option<InboundMode>,
}

/// How an enrolled pod treats inbound connections that are not mesh mTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InboundMode {
    /// Plaintext from outside the mesh still reaches the pod (the default).
    Permissive,
    /// Only tunnelled mTLS connections reach the pod; plaintext is reset.
    Strict,
}

/// Settings of one Kubernetes namespace.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceConfig {
    /// Namespace name.
    pub name: String,
    /// Inbound mode of its workloads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound_mode: Option<InboundMode>,
    /// The waypoint of its services.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_waypoint: Option<String>,
}

/// One service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceConfig {
    /// Service name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Cluster IP.
    pub vip: Ipv4Addr,
    /// Port mappings.
    pub ports: Vec<ServicePort>,
    /// Label selector for endpoints.
    pub selector: BTreeMap<String, String>,
    /// The service's own waypoint (`none` opts out).
    #[serde(rename = "useWaypoint", skip_serializing_if = "Option::is_none")]
    pub use_waypoint: Option<String>,
}

/// A service port and the pod port it maps to.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port on the VIP.
    pub port: u16,
    /// Port on the selected pods.
    pub target_port: u16,
}

impl ClusterConfig {
    /// Renders the YAML text.
    pub fn to_yaml(&self) -> Result<String> {
        Ok(serde_yaml_ng::to_string(self)?)
    }

    /// Atomically replaces the file at `path` with this config.
    pub fn write_to(&self, path: &Path) -> Result<()> {
        write_atomically(path, &self.to_yaml()?)
    }
}

/// Writes `text` to `path` through a temp file and a rename, so a reader
/// (an agent re-reading its files) never sees a partial file.
pub(crate) fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).map_err(|e| TestbedError::io(format!("write {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| TestbedError::io(format!("rename {} into place", tmp.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_keys() {
        let cfg = ClusterConfig {
            trust_domain: None,
            namespaces: Vec::new(),
            workloads: vec![WorkloadConfig {
                name: "client".into(),
                namespace: "demo".into(),
                service_account: "client".into(),
                node: "node-a".into(),
                ips: vec![Ipv4Addr::new(10, 44, 1, 2)],
                netns: "/run/netns/ht-1-0-client".into(),
                enrolled: true,
                labels: BTreeMap::from([("app".into(), "client".into())]),
                inbound_mode: None,
            }],
            services: vec![ServiceConfig {
                name: "server".into(),
                namespace: "demo".into(),
                vip: Ipv4Addr::new(10, 96, 0, 10),
                ports: vec![ServicePort { port: 80, target_port: 8080 }],
                selector: BTreeMap::from([("app".into(), "server".into())]),
                use_waypoint: None,
            }],
            waypoints: Vec::new(),
        };
        let yaml = cfg.to_yaml().unwrap();
        for key in [
            "serviceAccount: client",
            "enrolled: true",
            "netns: /run/netns/ht-1-0-client",
            "- 10.44.1.2",
            "vip: 10.96.0.10",
            "targetPort: 8080",
            "app: server",
        ] {
            assert!(yaml.contains(key), "{key:?} missing from:\n{yaml}");
        }
        for absent in ["trustDomain", "namespaces", "inboundMode"] {
            assert!(!yaml.contains(absent), "{absent:?} written by default:\n{yaml}");
        }
    }

    #[test]
    fn renders_mesh_settings_in_the_agent_spelling() {
        let cfg = ClusterConfig {
            trust_domain: Some("heddle.test".into()),
            namespaces: vec![NamespaceConfig {
                name: "vault".into(),
                inbound_mode: Some(InboundMode::Strict),
                use_waypoint: None,
            }],
            workloads: vec![WorkloadConfig {
                name: "open".into(),
                namespace: "vault".into(),
                service_account: "open".into(),
                node: "node-b".into(),
                ips: vec![Ipv4Addr::new(10, 44, 2, 3)],
                netns: "/run/netns/x".into(),
                enrolled: true,
                labels: BTreeMap::new(),
                inbound_mode: Some(InboundMode::Permissive),
            }],
            services: Vec::new(),
            waypoints: Vec::new(),
        };
        let yaml = cfg.to_yaml().unwrap();
        for key in ["trustDomain: heddle.test", "- name: vault\n  inboundMode: STRICT", "inboundMode: PERMISSIVE"] {
            assert!(yaml.contains(key), "{key:?} missing from:\n{yaml}");
        }
    }
}
