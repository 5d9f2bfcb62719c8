//! What a test creates: pod and service descriptions.
//!
//! Builders with the defaults the tests rely on (namespace `demo`, label
//! `app: <name>`, service account `<name>`, no inbound mode of its own);
//! the test bed turns them into the cluster config ([`crate::config`]).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::config::{InboundMode, ServiceConfig, ServicePort};

/// Default Kubernetes namespace of pods and services.
pub const DEFAULT_NAMESPACE: &str = "demo";

/// What to create for a pod.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) service_account: Option<String>,
    pub(crate) enrolled: bool,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) inbound_mode: Option<InboundMode>,
}

impl PodSpec {
    /// A pod named `name` in namespace `demo`, not enrolled, labelled
    /// `app: <name>`, with service account `<name>`.
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            service_account: None,
            enrolled: false,
            labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
            inbound_mode: None,
        }
    }

    /// Sets whether the mesh captures the pod.
    #[must_use]
    pub fn enrolled(mut self, enrolled: bool) -> Self {
        self.enrolled = enrolled;
        self
    }

    /// Sets the Kubernetes namespace.
    #[must_use]
    pub fn namespace(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.namespace);
        self
    }

    /// Sets the service account.
    #[must_use]
    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = Some(sa.to_owned());
        self
    }

    /// Sets the pod's own inbound mode (it wins over its namespace's; see
    /// [`crate::Testbed::set_namespace_inbound_mode`]).
    #[must_use]
    pub fn inbound_mode(mut self, mode: InboundMode) -> Self {
        self.inbound_mode = Some(mode);
        self
    }

    /// The service account: the one set, else the pod's name.
    #[must_use]
    pub fn service_account_name(&self) -> &str {
        self.service_account.as_deref().unwrap_or(&self.name)
    }

    /// Adds (or replaces) a label.
    #[must_use]
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }
}

/// What to create for a service.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    name: String,
    namespace: String,
    vip: Ipv4Addr,
    ports: Vec<ServicePort>,
    selector: BTreeMap<String, String>,
    use_waypoint: Option<String>,
}

impl ServiceSpec {
    /// A service named `name` in namespace `demo` at `vip`, selecting
    /// `app: <name>` unless [`ServiceSpec::selector`] is called.
    #[must_use]
    pub fn new(name: &str, vip: Ipv4Addr) -> Self {
        Self {
            name: name.to_owned(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            vip,
            ports: Vec::new(),
            selector: BTreeMap::new(),
            use_waypoint: None,
        }
    }

    /// Maps `port` on the VIP to `target_port` on the pods.
    #[must_use]
    pub fn port(mut self, port: u16, target_port: u16) -> Self {
        self.ports.push(ServicePort { port, target_port });
        self
    }

    /// Adds a selector term.
    #[must_use]
    pub fn selector(mut self, key: &str, value: &str) -> Self {
        self.selector.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sets the Kubernetes namespace.
    #[must_use]
    pub fn namespace(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.namespace);
        self
    }

    /// Sets the service's `useWaypoint` (`none` opts it out of its
    /// namespace's waypoint).
    #[must_use]
    pub fn use_waypoint(mut self, waypoint: &str) -> Self {
        self.use_waypoint = Some(waypoint.to_owned());
        self
    }

    pub(crate) fn to_config(&self) -> ServiceConfig {
        let selector = if self.selector.is_empty() {
            BTreeMap::from([("app".to_owned(), self.name.clone())])
        } else {
            self.selector.clone()
        };
        ServiceConfig {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            vip: self.vip,
            ports: self.ports.clone(),
            selector,
            use_waypoint: self.use_waypoint.clone(),
        }
    }
}
