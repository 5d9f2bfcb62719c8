//! Heddle's `RetryBudgetPolicy` (`heddle.dev/v1alpha1`), read beside the
//! routes: Linkerd's retry budget (`retryRatio`, `minRetriesPerSecond`,
//! `ttl`), attached with `targetRefs` to a Service (every retrying rule of
//! its routes shares the budget) or an `HTTPRoute` (its rules share it). A
//! rule without one keeps its own default budget (20% + 10/s over 10 s,
//! [`crate::waypoint::retry`]).
//!
//! ```yaml
//! apiVersion: heddle.dev/v1alpha1
//! kind: RetryBudgetPolicy
//! metadata: {name: api, namespace: demo}
//! spec:
//!   targetRefs: [{group: "", kind: Service, name: api}]
//!   retryRatio: 0.1
//!   minRetriesPerSecond: 5
//!   ttl: 10s
//! ```

use std::sync::Arc;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    rate_limits::{attach, policy_status, ByTarget, Target, TargetRef},
    RouteStatus,
};
use crate::{
    registry::{ObjectRef, Registry},
    waypoint::retry::Budget,
};

/// The kind.
pub const KIND: &str = "RetryBudgetPolicy";

/// `spec` of a `heddle.dev/v1alpha1` `RetryBudgetPolicy`; the CRD
/// (`mesh-agent crd retrybudgetpolicies`) is generated from it.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[kube(
    group = "heddle.dev",
    version = "v1alpha1",
    kind = "RetryBudgetPolicy",
    root = "Policy",
    plural = "retrybudgetpolicies",
    singular = "retrybudgetpolicy",
    namespaced,
    category = "heddle",
    doc = "A retry budget for Heddle's waypoints (Linkerd's: retries at most retryRatio of requests plus minRetriesPerSecond, over ttl), attached with targetRefs to a Service or an HTTPRoute/GRPCRoute."
)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudgetSpec {
    /// Services (group "") or routes (group `gateway.networking.k8s.io`)
    /// in the policy's namespace.
    pub target_refs: Vec<TargetRef>,
    /// Retries allowed per request, 0-1 (default 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_ratio: Option<f64>,
    /// Retries allowed per second whatever the request rate (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<i64>,
    /// The window requests and retries are counted over, 1s-60s (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// The budgets in force, by target.
pub type RetryBudgets = ByTarget<Arc<Budget>>;

/// The CRD as the YAML committed in `daemonset/crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    use kube::CustomResourceExt as _;
    crate::k8s::crd::generated_yaml(
        &Policy::crd(),
        "mesh-agent/src/waypoint/routes/retry_budgets.rs",
        "crd retrybudgetpolicies",
    )
}

/// A compiled policy: its targets (empty when rejected) and its status.
pub struct Compiled {
    /// Where its budget applies.
    pub targets: Vec<(Target, Arc<Budget>)>,
    /// Its status.
    pub status: RouteStatus,
}

/// Compiles `p` (read from `origin`) for `waypoint`; `routes` are the
/// accepted route objects.
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
    let ratio = p.spec.retry_ratio.unwrap_or(0.2);
    if !(0.0..=1.0).contains(&ratio) {
        problems.push(format!("spec.retryRatio: {ratio} is not within 0-1"));
    }
    let floor = p.spec.min_retries_per_second.unwrap_or(10);
    if !(0..=100_000).contains(&floor) {
        problems.push(format!("spec.minRetriesPerSecond: {floor} is not within 0-100000"));
    }
    let ttl = match p.spec.ttl.as_deref() {
        None => Some(10),
        Some(t) => super::istio::parse_duration(t)
            .map(|d| d.as_secs())
            .filter(|s| (1..=60).contains(s))
            .and_then(|s| usize::try_from(s).ok()),
    };
    if ttl.is_none() {
        problems.push(format!("spec.ttl: {:?} is not a duration of 1s-60s", p.spec.ttl.as_deref().unwrap_or("")));
    }
    if p.spec.target_refs.is_empty() {
        problems.push("spec.targetRefs: names no target".to_owned());
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "0-100 after the check")]
    let percent = (ratio.clamp(0.0, 1.0) * 100.0).round() as u64;
    let budget = Arc::new(Budget::new(percent, u64::try_from(floor).unwrap_or(0), ttl.unwrap_or(10)));
    let (parents, targets) = attach(&p.spec.target_refs, &ns, &problems, registry, waypoint, routes, "retry budget");
    Compiled {
        status: policy_status(KIND, &id, origin, parents, problems, "budgets are per waypoint replica"),
        targets: targets.into_iter().map(|t| (t, budget.clone())).collect(),
    }
}
