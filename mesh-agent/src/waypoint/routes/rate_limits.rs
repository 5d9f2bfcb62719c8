//! Heddle's `HTTPLocalRateLimitPolicy` (`heddle.dev/v1alpha1`), read from
//! the routes directory beside the routes: Linkerd's policy of the same
//! name, attached Gateway API style with `targetRefs` to a Service (every
//! request to it through this waypoint) or to an `HTTPRoute`/`GRPCRoute`
//! (the requests its rules match).
//!
//! ```yaml
//! apiVersion: heddle.dev/v1alpha1
//! kind: HTTPLocalRateLimitPolicy
//! metadata: {name: api-limit, namespace: demo}
//! spec:
//!   targetRefs: [{group: "", kind: Service, name: api}]
//!   total: {requestsPerSecond: 100}
//!   identity: {requestsPerSecond: 20}
//!   overrides:
//!   - requestsPerSecond: 50
//!     clientRefs: [{kind: ServiceAccount, name: batch, namespace: demo}]
//! ```
//!
//! Every problem is named by its field, and a policy with any is not
//! applied (its targets keep their other limits).

use std::{collections::HashMap, sync::Arc};

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, ParentStatus, RouteStatus};
use crate::{
    registry::{ObjectRef, Registry},
    waypoint::ratelimit::Limiter,
};

/// The API version and kind this module reads.
pub const API_VERSION: &str = "heddle.dev/v1alpha1";
/// The kind.
pub const KIND: &str = "HTTPLocalRateLimitPolicy";

/// `spec` of a `heddle.dev/v1alpha1` `HTTPLocalRateLimitPolicy`; the CRD
/// (`mesh-agent crd httplocalratelimitpolicies`) is generated from it.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[kube(
    group = "heddle.dev",
    version = "v1alpha1",
    kind = "HTTPLocalRateLimitPolicy",
    root = "Policy",
    plural = "httplocalratelimitpolicies",
    singular = "httplocalratelimitpolicy",
    namespaced,
    category = "heddle",
    doc = "Local rate limits enforced by Heddle's waypoints, per replica (Linkerd's HTTPLocalRateLimitPolicy, attached with targetRefs to a Service or an HTTPRoute/GRPCRoute)."
)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// What the limits apply to: Services (group "") or `HTTPRoute`s and
    /// `GRPCRoute`s (group `gateway.networking.k8s.io`) in the policy's
    /// namespace.
    pub target_refs: Vec<TargetRef>,
    /// Requests per second for all clients together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<Rate>,
    /// Requests per second for each client identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Rate>,
    /// Per-client rates replacing `identity` for the clients named.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<Override>,
}

/// A policy target.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct TargetRef {
    /// `""` for a Service, `gateway.networking.k8s.io` for a route.
    #[serde(default)]
    pub group: String,
    /// `Service`, `HTTPRoute` or `GRPCRoute`.
    pub kind: String,
    /// Its name.
    pub name: String,
}

/// A rate.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    /// At least 1; a burst of one second's worth is let through.
    pub requests_per_second: i64,
}

/// A rate for some clients.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Override {
    /// Their rate, each.
    pub requests_per_second: i64,
    /// Which clients.
    pub client_refs: Vec<ClientRef>,
}

/// A client, by service account.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct ClientRef {
    /// `ServiceAccount`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its namespace (default: the policy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The CRD as the YAML committed in `daemonset/crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    use kube::CustomResourceExt as _;
    crate::k8s::crd::generated_yaml(
        &Policy::crd(),
        "mesh-agent/src/waypoint/routes/rate_limits.rs",
        "crd httplocalratelimitpolicies",
    )
}

/// Where a policy applies.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Every request to this Service.
    Service(ObjectRef),
    /// Requests matched by this route, `httproute/ns/name`.
    Route(String),
}

/// Policies in force, by target (a Heddle policy attaches to Services and
/// routes the same way).
#[derive(Debug)]
pub struct ByTarget<T> {
    by_service: HashMap<ObjectRef, Vec<T>>,
    by_route: HashMap<String, Vec<T>>,
}

impl<T> Default for ByTarget<T> {
    fn default() -> Self {
        Self { by_service: HashMap::new(), by_route: HashMap::new() }
    }
}

impl<T> ByTarget<T> {
    /// Adds `item` at `target`.
    pub fn insert(&mut self, target: Target, item: T) {
        match target {
            Target::Service(s) => self.by_service.entry(s).or_default().push(item),
            Target::Route(r) => self.by_route.entry(r).or_default().push(item),
        }
    }

    /// What attaches to a Service (none: empty).
    #[must_use]
    pub fn of_service(&self, service: &ObjectRef) -> &[T] {
        self.by_service.get(service).map_or(&[], Vec::as_slice)
    }

    /// What attaches to a route, `httproute/ns/name` (none: empty).
    #[must_use]
    pub fn of_route(&self, route: &str) -> &[T] {
        self.by_route.get(route).map_or(&[], Vec::as_slice)
    }

    /// Whether nothing is attached at all (the request path skips the
    /// lookups then).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_service.is_empty() && self.by_route.is_empty()
    }
}

/// The limiters in force, by target.
pub type RateLimits = ByTarget<Arc<Limiter>>;

/// Resolves `targetRefs[i]` of a policy in `ns`: a Service this waypoint
/// owns, or a route (`routes`: those accepted).
pub(super) fn resolve_target(
    t: &TargetRef,
    at: &str,
    ns: &str,
    registry: &Registry,
    waypoint: &ObjectRef,
    routes: &[String],
) -> Result<Target, String> {
    let target = ObjectRef { namespace: ns.to_owned(), name: t.name.clone() };
    match (t.group.as_str(), t.kind.as_str()) {
        ("" | "core", "Service") => match registry.service(&target) {
            None => Err(format!("{at}: Service {target} does not exist")),
            Some(svc) if registry.waypoint_of(svc) != Some(waypoint) => {
                Err(format!("{at}: Service {target} does not use waypoint {waypoint}"))
            }
            Some(_) => Ok(Target::Service(target)),
        },
        ("gateway.networking.k8s.io", kind @ ("HTTPRoute" | "GRPCRoute")) => {
            let route = format!("{}/{target}", kind.to_ascii_lowercase());
            if routes.contains(&route) {
                Ok(Target::Route(route))
            } else {
                Err(format!("{at}: {kind} {target} does not exist or is not accepted"))
            }
        }
        (g, k) => Err(format!("{at}: {g}/{k} is not a Service, HTTPRoute or GRPCRoute")),
    }
}

/// A compiled policy: its targets (empty when rejected) and its status.
pub struct Compiled {
    /// Where its limiter applies.
    pub targets: Vec<(Target, Arc<Limiter>)>,
    /// Its status.
    pub status: RouteStatus,
}

fn rate(v: i64, at: &str, problems: &mut Vec<String>) -> Option<u32> {
    match u32::try_from(v) {
        Ok(r) if r >= 1 => Some(r),
        _ => {
            problems.push(format!("{at}.requestsPerSecond: {v} is not a rate of at least 1"));
            None
        }
    }
}

/// Attaches a Heddle policy (in `ns`, with `problems` found so far) to its
/// `targetRefs`: a parent status per target, and the targets it applies to
/// (none when it has problems); what it does is `what` ("limits requests").
pub(super) fn attach(
    target_refs: &[TargetRef],
    ns: &str,
    problems: &[String],
    registry: &Registry,
    waypoint: &ObjectRef,
    routes: &[String],
    what: &str,
) -> (Vec<ParentStatus>, Vec<Target>) {
    let mut parents = Vec::new();
    let mut targets = Vec::new();
    for (i, t) in target_refs.iter().enumerate() {
        let at = format!("spec.targetRefs[{i}]");
        let mut status =
            ParentStatus { parent: format!("{ns}/{}", t.name), port: None, attached: false, conditions: Vec::new() };
        match resolve_target(t, &at, ns, registry, waypoint, routes) {
            Ok(target) if problems.is_empty() => {
                status.attached = true;
                status.conditions.push(Condition::accepted(true, "Accepted", format!("{what} at waypoint {waypoint}")));
                targets.push(target);
            }
            Ok(_) => status.conditions.push(Condition::accepted(false, "Invalid", problems.join("; "))),
            Err(why) => status.conditions.push(Condition::accepted(false, "TargetNotFound", why)),
        }
        parents.push(status);
    }
    (parents, targets)
}

/// The status of a Heddle policy `kind/ns/name`.
pub(super) fn policy_status(
    kind: &str,
    id: &ObjectRef,
    origin: &str,
    parents: Vec<ParentStatus>,
    problems: Vec<String>,
    note: &str,
) -> RouteStatus {
    RouteStatus {
        route: format!("{}/{id}", kind.to_ascii_lowercase()),
        source: origin.to_owned(),
        accepted: parents.iter().any(|p| p.attached),
        parents,
        problems,
        notes: vec![note.to_owned()],
        rules: 0,
    }
}

/// Compiles `p` (read from `origin`, with `unknown` fields) for `waypoint`;
/// `routes` are the route objects known (`httproute/ns/name`), so a policy
/// naming a route that does not exist says so.
#[must_use]
pub fn compile(
    p: &Policy,
    unknown: Vec<String>,
    origin: &str,
    registry: &Registry,
    waypoint: &ObjectRef,
    routes: &[String],
) -> Compiled {
    let ns = p.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned());
    let id = ObjectRef { namespace: ns.clone(), name: p.metadata.name.clone().unwrap_or_default() };
    let mut problems: Vec<String> =
        unknown.into_iter().map(|f| format!("{f}: unknown field (not in {KIND})")).collect();
    let total = p.spec.total.as_ref().and_then(|r| rate(r.requests_per_second, "spec.total", &mut problems));
    let identity = p.spec.identity.as_ref().and_then(|r| rate(r.requests_per_second, "spec.identity", &mut problems));
    let mut overrides = HashMap::new();
    for (i, o) in p.spec.overrides.iter().enumerate() {
        let at = format!("spec.overrides[{i}]");
        let Some(r) = rate(o.requests_per_second, &at, &mut problems) else { continue };
        if o.client_refs.is_empty() {
            problems.push(format!("{at}.clientRefs: names no client"));
        }
        for (j, c) in o.client_refs.iter().enumerate() {
            if c.kind != "ServiceAccount" {
                problems.push(format!("{at}.clientRefs[{j}].kind: {} is not ServiceAccount", c.kind));
                continue;
            }
            overrides.insert((c.namespace.clone().unwrap_or_else(|| ns.clone()), c.name.clone()), r);
        }
    }
    if p.spec.total.is_none() && p.spec.identity.is_none() && p.spec.overrides.is_empty() {
        problems.push("spec: sets no limit (total, identity or overrides)".to_owned());
    }
    if p.spec.target_refs.is_empty() {
        problems.push("spec.targetRefs: names no target".to_owned());
    }
    let (parents, targets) = attach(&p.spec.target_refs, &ns, &problems, registry, waypoint, routes, "limits requests");
    let limiter = Arc::new(Limiter::new(id.to_string().into(), total, identity, overrides));
    Compiled {
        status: policy_status(
            KIND,
            &id,
            origin,
            parents,
            problems,
            "limits are per waypoint replica: N replicas let N times the rate through",
        ),
        targets: targets.into_iter().map(|t| (t, limiter.clone())).collect(),
    }
}
