//! The local configuration file: the cluster as the agent sees it without
//! Kubernetes (workloads, their network namespaces, services).
//!
//! [`load`] reads and validates a whole file or nothing: a file with any
//! problem is rejected with every problem listed (file, line where the YAML
//! parser knows it, and the path of the offending field), and the caller keeps
//! its last good state. The validated file becomes a [`crate::registry::Registry`].

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

mod waypoints;
pub use waypoints::{WaypointSpec, GATEWAY_NAME_LABEL, NO_WAYPOINT};

/// The file as written by the user (`serde(deny_unknown_fields)`: a typo is an
/// error, never silently ignored).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalConfig {
    /// Default node name for an agent started without `--node`.
    #[serde(default)]
    pub node: Option<String>,
    /// SPIFFE trust domain of the mesh. Default: `cluster.local`.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Per-namespace settings.
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    /// Every workload (pod) of the cluster, on every node.
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// Services: virtual IPs load-balanced to the workloads their selector picks.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Waypoints (L7 proxies) that namespaces and services opt into with
    /// `useWaypoint`.
    #[serde(default)]
    pub waypoints: Vec<WaypointSpec>,
}

/// How an enrolled pod treats inbound connections that are not mesh mTLS.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InboundMode {
    /// Plaintext from outside the mesh still reaches the pod (default, for adoption).
    #[default]
    Permissive,
    /// Only tunnelled mTLS connections are accepted; plaintext is reset.
    Strict,
}

/// Settings of one namespace.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamespaceSpec {
    /// Namespace name.
    pub name: String,
    /// Inbound mode of its workloads (a workload's own setting wins).
    #[serde(default)]
    pub inbound_mode: Option<InboundMode>,
    /// The waypoint (in this namespace) that owns this namespace's services,
    /// like the label `heddle.dev/use-waypoint` on a Namespace.
    #[serde(default)]
    pub use_waypoint: Option<String>,
}

/// One pod.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// Pod name, unique within its namespace.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account; the workload's identity later. Default: `default`.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Node the pod runs on.
    pub node: String,
    /// Pod IPs.
    pub ips: Vec<IpAddr>,
    /// Path of the pod's network namespace (e.g. `/run/netns/NAME` or
    /// `/proc/PID/ns/net`). Needed for pods on this node only.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Whether the pod is in the mesh. Default: `true`.
    #[serde(default = "default_true")]
    pub enrolled: bool,
    /// Labels, used by service selectors.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Inbound mode of this workload (overrides its namespace's).
    #[serde(default)]
    pub inbound_mode: Option<InboundMode>,
}

/// One service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service name.
    pub name: String,
    /// Namespace of the service and of the workloads it selects.
    pub namespace: String,
    /// Virtual IP.
    pub vip: IpAddr,
    /// Ports served on the virtual IP.
    pub ports: Vec<ServicePortSpec>,
    /// Workloads in the same namespace whose labels include all of these.
    pub selector: BTreeMap<String, String>,
    /// The waypoint (in this namespace) that owns this service; overrides
    /// the namespace's, and `none` opts the service out of it.
    #[serde(default)]
    pub use_waypoint: Option<String>,
}

/// A service port and the workload port it maps to.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePortSpec {
    /// Port on the virtual IP.
    pub port: u16,
    /// Port on the selected workloads. Default: same as `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}

fn default_service_account() -> String {
    "default".to_owned()
}

const fn default_true() -> bool {
    true
}

/// Why a configuration file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML for this schema.
    #[error("invalid config file {path}{}: {message}", location_suffix(*.line, *.column))]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line, when the parser knows it.
        line: Option<usize>,
        /// 1-based column, when the parser knows it.
        column: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// The file parsed but its content is inconsistent.
    #[error("invalid config file {path}:\n{}", Problems(.problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found, each naming the field.
        problems: Vec<String>,
    },
}

fn location_suffix(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" line {l} column {c}"),
        (Some(l), None) => format!(" line {l}"),
        _ => String::new(),
    }
}

struct Problems<'a>(&'a [String]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// Reads, parses and validates `path`.
pub fn load(path: &Path) -> Result<LocalConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse(path, &text)
}

/// Parses and validates `text` (named `path` in errors).
pub fn parse(path: &Path, text: &str) -> Result<LocalConfig, ConfigError> {
    let config: LocalConfig = serde_yaml_ng::from_str(text).map_err(|e| {
        let loc = e.location();
        ConfigError::Parse {
            path: path.to_owned(),
            line: loc.as_ref().map(serde_yaml_ng::Location::line),
            column: loc.as_ref().map(serde_yaml_ng::Location::column),
            // The parser appends the location, which is already in the prefix.
            message: loc.as_ref().map_or_else(
                || e.to_string(),
                |l| {
                    let m = e.to_string();
                    let suffix = format!(" at line {} column {}", l.line(), l.column());
                    m.strip_suffix(&suffix).map_or(m.clone(), str::to_owned)
                },
            ),
        }
    })?;
    let problems = config.validate();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid { path: path.to_owned(), problems })
    }
}

/// RFC 1123 label as Kubernetes uses for names and namespaces.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain (pod names may contain dots).
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            node: None,
            trust_domain: default_trust_domain(),
            namespaces: Vec::new(),
            workloads: Vec::new(),
            services: Vec::new(),
            waypoints: Vec::new(),
        }
    }
}

impl LocalConfig {
    /// Every problem in the file, each naming the field (empty when valid).
    #[must_use]
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !is_dns_subdomain(&self.trust_domain) {
            problems.push(format!("trustDomain: {:?} is not a valid trust domain", self.trust_domain));
        }
        let mut ns_seen = HashSet::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            if !is_dns_label(&ns.name) {
                problems.push(format!("namespaces[{i}].name: {:?} is not a valid namespace", ns.name));
            }
            if !ns_seen.insert(ns.name.as_str()) {
                problems.push(format!("namespaces[{i}].name: {} is listed twice", ns.name));
            }
        }
        if let Some(node) = &self.node {
            if !is_dns_subdomain(node) {
                problems.push(format!("node: {node:?} is not a valid node name"));
            }
        }
        let mut names = HashSet::new();
        let mut ip_owner: HashMap<IpAddr, String> = HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
            validate_workload(w, &at, &mut problems);
            if !names.insert((w.namespace.as_str(), w.name.as_str())) {
                problems.push(format!("{at}: duplicate workload {}/{}", w.namespace, w.name));
            }
            for ip in &w.ips {
                if let Some(prev) = ip_owner.insert(*ip, at.clone()) {
                    problems.push(format!("{at}: ip {ip} is already used by {prev}"));
                }
            }
        }
        let mut vips = HashMap::new();
        let mut svc_names = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}] ({}/{})", s.namespace, s.name);
            validate_service(s, &at, &mut problems);
            if !svc_names.insert((s.namespace.as_str(), s.name.as_str())) {
                problems.push(format!("{at}: duplicate service {}/{}", s.namespace, s.name));
            }
            if let Some(owner) = ip_owner.get(&s.vip) {
                problems.push(format!("{at}: vip {} is a workload ip of {owner}", s.vip));
            }
            if let Some(prev) = vips.insert(s.vip, at.clone()) {
                problems.push(format!("{at}: vip {} is already used by {prev}", s.vip));
            }
        }
        waypoints::validate(self, &mut problems);
        problems
    }
}

fn validate_workload(w: &WorkloadSpec, at: &str, problems: &mut Vec<String>) {
    if !is_dns_subdomain(&w.name) {
        problems.push(format!("{at}: name: {:?} is not a valid pod name", w.name));
    }
    if !is_dns_label(&w.namespace) {
        problems.push(format!("{at}: namespace: {:?} is not a valid namespace", w.namespace));
    }
    if !is_dns_subdomain(&w.service_account) {
        problems.push(format!("{at}: serviceAccount: {:?} is not a valid service account name", w.service_account));
    }
    if !is_dns_subdomain(&w.node) {
        problems.push(format!("{at}: node: {:?} is not a valid node name", w.node));
    }
    if w.ips.is_empty() {
        problems.push(format!("{at}: ips: a workload needs at least one IP"));
    }
    for (j, ip) in w.ips.iter().enumerate() {
        if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
            problems.push(format!("{at}: ips[{j}]: {ip} cannot be a pod IP"));
        }
    }
    match &w.netns {
        Some(p) if !p.is_absolute() => {
            problems.push(format!("{at}: netns: {} must be an absolute path", p.display()));
        }
        None if w.enrolled => {
            problems.push(format!("{at}: netns: an enrolled workload needs the path of its network namespace"));
        }
        _ => {}
    }
}

fn validate_service(s: &ServiceSpec, at: &str, problems: &mut Vec<String>) {
    if !is_dns_label(&s.name) {
        problems.push(format!("{at}: name: {:?} is not a valid service name", s.name));
    }
    if !is_dns_label(&s.namespace) {
        problems.push(format!("{at}: namespace: {:?} is not a valid namespace", s.namespace));
    }
    if s.vip.is_loopback() || s.vip.is_unspecified() || s.vip.is_multicast() {
        problems.push(format!("{at}: vip: {} cannot be a service IP", s.vip));
    }
    if s.ports.is_empty() {
        problems.push(format!("{at}: ports: a service needs at least one port"));
    }
    let mut seen = HashSet::new();
    for (j, p) in s.ports.iter().enumerate() {
        if p.port == 0 {
            problems.push(format!("{at}: ports[{j}].port: must be 1-65535"));
        }
        if p.target_port == Some(0) {
            problems.push(format!("{at}: ports[{j}].targetPort: must be 1-65535"));
        }
        if !seen.insert(p.port) {
            problems.push(format!("{at}: ports[{j}].port: {} is listed twice", p.port));
        }
    }
    if s.selector.is_empty() {
        problems.push(format!(
            "{at}: selector: an empty selector would select every workload in the namespace; list labels"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workloads:
  - name: client
    namespace: demo
    serviceAccount: client
    node: node-a
    ips: ["10.44.1.2"]
    netns: /run/netns/client
    labels: {app: client}
  - name: server
    namespace: demo
    node: node-b
    ips: ["10.44.2.2"]
    enrolled: false
    labels: {app: server}
services:
  - name: server
    namespace: demo
    vip: 10.96.0.10
    ports: [{port: 80, targetPort: 8080}]
    selector: {app: server}
"#;

    fn p(text: &str) -> Result<LocalConfig, ConfigError> {
        parse(Path::new("test.yaml"), text)
    }

    #[test]
    fn accepts_a_valid_file_with_defaults() {
        let c = p(GOOD).unwrap();
        assert_eq!(c.workloads.len(), 2);
        assert!(c.workloads[0].enrolled, "enrolled defaults to true");
        assert_eq!(c.workloads[1].service_account, "default");
        assert_eq!(c.services[0].ports[0].target_port, Some(8080));
    }

    #[test]
    fn rejects_unknown_fields_with_the_line() {
        let err = p("workloads:\n  - name: a\n    namespace: demo\n    nod: x\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("test.yaml line 4 column 5: workloads[0]: unknown field `nod`"), "{msg}");
        assert!(msg.contains("nod"), "{msg}");
    }

    #[test]
    fn rejects_a_bad_ip_with_the_line() {
        let text = GOOD.replace("10.44.2.2", "10.44.2");
        let msg = p(&text).unwrap_err().to_string();
        assert!(msg.contains("line"), "{msg}");
        assert!(msg.contains("invalid IP address"), "{msg}");
    }

    #[test]
    fn reports_every_semantic_problem_at_once() {
        let text = GOOD
            .replace("namespace: demo\n    serviceAccount", "namespace: Demo\n    serviceAccount")
            .replace("10.44.2.2", "10.44.1.2")
            .replace("port: 80,", "port: 0,");
        let Err(ConfigError::Invalid { problems, .. }) = p(&text) else { panic!("expected semantic errors") };
        assert!(problems.iter().any(|m| m.contains("workloads[0]") && m.contains("namespace")));
        assert!(problems.iter().any(|m| m.contains("10.44.1.2 is already used")));
        assert!(problems.iter().any(|m| m.contains("ports[0].port")));
    }

    #[test]
    fn requires_a_netns_for_enrolled_workloads() {
        let text = GOOD.replace("    netns: /run/netns/client\n", "");
        let msg = p(&text).unwrap_err().to_string();
        assert!(msg.contains("workloads[0] (demo/client): netns"), "{msg}");
    }

    #[test]
    fn rejects_duplicate_workloads_and_vips() {
        let mut c = p(GOOD).unwrap();
        c.workloads.push(c.workloads[0].clone());
        c.workloads[2].ips = vec!["10.44.9.9".parse().unwrap()];
        c.services.push(c.services[0].clone());
        c.services[1].name = "other".into();
        let problems = c.validate();
        assert!(problems.iter().any(|m| m.contains("duplicate workload demo/client")));
        assert!(problems.iter().any(|m| m.contains("vip 10.96.0.10 is already used")));
    }
}
