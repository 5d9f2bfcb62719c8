//! The cluster config file the test bed writes for the agents.
//!
//! One YAML file describes the whole cluster (every node's workloads and all
//! services); each agent picks its node with `--node`. The file is replaced
//! atomically (write a sibling, then rename) because agents poll it every
//! second and must never read half a file.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Result, TestbedError};

/// The whole file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterConfig {
    /// Every pod of every node.
    pub workloads: Vec<WorkloadConfig>,
    /// Every service.
    pub services: Vec<ServiceConfig>,
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
        let text = self.to_yaml()?;
        let tmp = path.with_extension("yaml.new");
        std::fs::write(&tmp, text)
            .map_err(|e| TestbedError::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| TestbedError::io(format!("rename {} into place", tmp.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_keys() {
        let cfg = ClusterConfig {
            workloads: vec![WorkloadConfig {
                name: "client".into(),
                namespace: "demo".into(),
                service_account: "client".into(),
                node: "node-a".into(),
                ips: vec![Ipv4Addr::new(10, 44, 1, 2)],
                netns: "/run/netns/ht-1-0-client".into(),
                enrolled: true,
                labels: BTreeMap::from([("app".into(), "client".into())]),
            }],
            services: vec![ServiceConfig {
                name: "server".into(),
                namespace: "demo".into(),
                vip: Ipv4Addr::new(10, 96, 0, 10),
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                }],
                selector: BTreeMap::from([("app".into(), "server".into())]),
            }],
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
    }
}
