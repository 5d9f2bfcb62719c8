//! `targetRef`/`targetRefs` of waypoint policies (Gateway API policy
//! attachment, as Istio ambient reads them): what a policy attaches to.
//!
//! A policy attaches to a `Service` (requests for it, through whichever
//! waypoint owns it), to a `Gateway` (every request through that waypoint)
//! or, in the root namespace, to the `GatewayClass` `heddle-waypoint`
//! (every waypoint). The target is always in the policy's namespace, as in
//! Istio (a `namespace` naming another one is refused).

use std::{collections::HashMap, fmt};

use serde::Deserialize;

use super::super::Problem;

/// The Gateway API group.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The class of Heddle's waypoints.
pub const WAYPOINT_CLASS: &str = "heddle-waypoint";

/// What a waypoint policy attaches to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Requests for the Service `ns/name`.
    Service(String, String),
    /// Every request through the waypoint `ns/name`.
    Gateway(String, String),
    /// Every request through every waypoint (`GatewayClass` heddle-waypoint,
    /// from the root namespace).
    AllWaypoints,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Service(ns, name) => write!(f, "service/{ns}/{name}"),
            Target::Gateway(ns, name) => write!(f, "gateway/{ns}/{name}"),
            Target::AllWaypoints => write!(f, "gatewayclass/{WAYPOINT_CLASS}"),
        }
    }
}

/// A request's target, borrowed from the request (looked up without
/// allocating).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetRef<'a> {
    /// The Service `ns/name`.
    Service(&'a str, &'a str),
    /// The waypoint `ns/name`.
    Gateway(&'a str, &'a str),
    /// Every waypoint.
    AllWaypoints,
}

impl TargetRef<'_> {
    /// Whether `t` is this target.
    #[must_use]
    pub fn is(self, t: &Target) -> bool {
        match (self, t) {
            (TargetRef::Service(ns, n), Target::Service(tns, tn))
            | (TargetRef::Gateway(ns, n), Target::Gateway(tns, tn)) => ns == tns && n == tn,
            (TargetRef::AllWaypoints, Target::AllWaypoints) => true,
            _ => false,
        }
    }
}

/// Values by target, looked up with a [`TargetRef`].
#[derive(Debug)]
pub struct ByTarget<T> {
    services: HashMap<String, HashMap<String, T>>,
    gateways: HashMap<String, HashMap<String, T>>,
    all: Option<T>,
}

impl<T> Default for ByTarget<T> {
    fn default() -> Self {
        Self { services: HashMap::new(), gateways: HashMap::new(), all: None }
    }
}

impl<T> ByTarget<T> {
    /// The value of `t`, made with `make` if there is none.
    pub fn entry(&mut self, t: &Target, make: impl FnOnce() -> T) -> &mut T {
        match t {
            Target::Service(ns, n) => {
                self.services.entry(ns.clone()).or_default().entry(n.clone()).or_insert_with(make)
            }
            Target::Gateway(ns, n) => {
                self.gateways.entry(ns.clone()).or_default().entry(n.clone()).or_insert_with(make)
            }
            Target::AllWaypoints => self.all.get_or_insert_with(make),
        }
    }

    /// The value of `t`.
    #[must_use]
    pub fn get(&self, t: TargetRef<'_>) -> Option<&T> {
        match t {
            TargetRef::Service(ns, n) => self.services.get(ns)?.get(n),
            TargetRef::Gateway(ns, n) => self.gateways.get(ns)?.get(n),
            TargetRef::AllWaypoints => self.all.as_ref(),
        }
    }

    /// Whether no target has a value.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.gateways.is_empty() && self.all.is_none()
    }
}

/// One `targetRef` as written.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Reference {
    #[serde(default)]
    group: String,
    kind: String,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// Reads one reference of a policy in `namespace` (`root` is the mesh's
/// root namespace).
pub(crate) fn parse(value: &serde_json::Value, namespace: &str, root: &str) -> Result<Target, Problem> {
    let r: Reference = serde_json::from_value(value.clone()).map_err(Problem::Schema)?;
    if r.name.is_empty() {
        return Err(Problem::EmptyString);
    }
    if let Some(ns) = r.namespace.as_deref().filter(|ns| *ns != namespace) {
        return Err(Problem::TargetRef(format!(
            "namespace {ns:?}: a policy attaches only to objects of its own namespace ({namespace})"
        )));
    }
    match (r.group.as_str(), r.kind.as_str()) {
        ("" | "core", "Service") => Ok(Target::Service(namespace.to_owned(), r.name)),
        (GATEWAY_GROUP, "Gateway") => Ok(Target::Gateway(namespace.to_owned(), r.name)),
        (GATEWAY_GROUP, "GatewayClass") if r.name == WAYPOINT_CLASS && namespace == root => Ok(Target::AllWaypoints),
        (GATEWAY_GROUP, "GatewayClass") => Err(Problem::TargetRef(format!(
            "GatewayClass {:?}: only GatewayClass {WAYPOINT_CLASS}, from the root namespace {root}, is a target",
            r.name
        ))),
        (group, kind) => Err(Problem::TargetRef(format!(
            "{kind} (group {group:?}) is not a target Heddle supports (Service, or {GATEWAY_GROUP} Gateway/GatewayClass)"
        ))),
    }
}

/// Every target of `targetRef` and `targetRefs`, each problem under its
/// field path.
pub(crate) fn parse_all(
    target_ref: Option<&serde_json::Value>,
    target_refs: &[serde_json::Value],
    namespace: &str,
    root: &str,
) -> (Vec<Target>, Vec<(String, Problem)>) {
    let mut targets = Vec::new();
    let mut problems = Vec::new();
    let single = target_ref.map(|v| ("spec.targetRef".to_owned(), v));
    let many = target_refs.iter().enumerate().map(|(i, v)| (format!("spec.targetRefs[{i}]"), v));
    for (field, value) in single.into_iter().chain(many) {
        match parse(value, namespace, root) {
            Ok(t) => targets.push(t),
            Err(p) => problems.push((field, p)),
        }
    }
    (targets, problems)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn services_gateways_and_the_waypoint_class_are_targets() {
        let p = |v| parse(&v, "shop", "heddle-system");
        assert_eq!(
            p(json!({"kind": "Service", "group": "", "name": "cart"})).unwrap(),
            Target::Service("shop".into(), "cart".into())
        );
        assert_eq!(
            p(json!({"kind": "Gateway", "group": GATEWAY_GROUP, "name": "waypoint"})).unwrap(),
            Target::Gateway("shop".into(), "waypoint".into())
        );
        let class = json!({"kind": "GatewayClass", "group": GATEWAY_GROUP, "name": WAYPOINT_CLASS});
        assert_eq!(parse(&class, "heddle-system", "heddle-system").unwrap(), Target::AllWaypoints);
        assert!(matches!(parse(&class, "shop", "heddle-system"), Err(Problem::TargetRef(_))));
    }

    #[test]
    fn other_kinds_and_namespaces_are_refused_with_the_reason() {
        let p = |v| parse(&v, "shop", "heddle-system");
        let e = p(json!({"kind": "ServiceEntry", "group": "networking.istio.io", "name": "x"})).unwrap_err();
        assert!(e.to_string().contains("ServiceEntry"), "{e}");
        let e = p(json!({"kind": "Service", "name": "x", "namespace": "other"})).unwrap_err();
        assert!(e.to_string().contains("own namespace"), "{e}");
        assert!(matches!(p(json!({"kind": "Service", "name": "x", "port": 80})), Err(Problem::Schema(_))));
    }
}
