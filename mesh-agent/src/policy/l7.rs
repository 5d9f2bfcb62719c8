//! L7 authorization at the waypoint: `AuthorizationPolicy` objects that
//! attach to a Service or a waypoint with `targetRef(s)` (the ones the node
//! agents skip, [`super::Caveat::TargetRef`]), Istio's `RequestAuthentication`
//! JWT rules, and [`authorize_request`], the pure per-request decision.
//!
//! What this module owns:
//! - [`target`]: what `targetRef(s)` may name (Service, Gateway, the
//!   `heddle-waypoint` `GatewayClass` from the root namespace).
//! - [`compile`]: targeted policies with every attribute (`methods`,
//!   `paths` with `{*}`/`{**}`, `hosts`, `requestPrincipals`, `when` on
//!   `request.headers[...]`, `request.auth.*`, and the L4 ones).
//! - [`path`]: Istio's path normalisation (`BASE`), applied before policy
//!   and routing.
//! - [`authn`]: `RequestAuthentication`: issuers, keys, token locations,
//!   and the pure token check.
//! - [`eval`]: [`RequestFacts`] and [`authorize_request`].
//!
//! Fail closed: a rejected policy (or one whose targets cannot be read)
//! makes its targets (or, failing that, its namespace) deny every request
//! with [`super::Reason::PolicyRejected`] naming it, until it is fixed; a
//! rejected `RequestAuthentication` makes every token on its targets fail.
//! The node agents, which see only L4, keep their own engine
//! ([`super::authorize`]); both use one decision order.

pub mod authn;
pub mod compile;
pub mod eval;
pub mod path;
pub mod target;

#[cfg(test)]
mod tests;

use std::collections::HashMap;

use serde::Deserialize;

pub use authn::{Authenticated, AuthnError, RequestAuthn};
pub use eval::{authorize_request, RequestFacts};
use target::ByTarget;
pub use target::{Target, TargetRef};

use super::{
    compile::policy_ref,
    model::{AuthorizationPolicy, ObjectMeta, Spec},
    PolicyError, PolicyRef, PolicyWarning, Problem,
};
use compile::WaypointPolicy;

/// A `RequestAuthentication` object as written (the spec is parsed
/// strictly by [`WaypointPolicies::build`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthentication {
    /// `security.istio.io/v1` or `v1beta1`.
    #[serde(default)]
    pub api_version: String,
    /// `RequestAuthentication`.
    #[serde(default)]
    pub kind: String,
    /// Name and namespace.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The spec.
    #[serde(default)]
    pub spec: serde_json::Value,
}

/// What became of one object, for `heddle routes` and the admin API.
#[derive(Debug, Clone)]
pub struct ObjectStatus {
    /// `authorizationpolicy/ns/name` or `requestauthentication/ns/name`.
    pub object: String,
    /// Where it was read.
    pub origin: String,
    /// In force.
    pub accepted: bool,
    /// Its targets, as written.
    pub targets: Vec<String>,
    /// Why it is not in force, each naming the field.
    pub problems: Vec<String>,
    /// Caveats.
    pub notes: Vec<String>,
}

/// The waypoint's policies, by target.
#[derive(Debug, Default)]
pub struct WaypointPolicies {
    root_namespace: String,
    policies: Vec<WaypointPolicy>,
    by_target: ByTarget<Vec<usize>>,
    /// Targets denied because a policy attached to them was rejected.
    rejected: ByTarget<PolicyRef>,
    /// Namespaces denied because a rejected policy's targets are unreadable.
    rejected_namespaces: HashMap<String, PolicyRef>,
    authns: Vec<RequestAuthn>,
    authn_by_target: ByTarget<Vec<usize>>,
    /// Targets where every token fails: their `RequestAuthentication` was rejected.
    rejected_authn: ByTarget<PolicyRef>,
    statuses: Vec<ObjectStatus>,
}

impl WaypointPolicies {
    /// Validates and indexes the targeted policies among `authz` and every
    /// `RequestAuthentication` of `authn` (each with where it was read).
    /// Policies without targets are the node agents' and are skipped.
    #[must_use]
    pub fn build(
        policies: Vec<(String, AuthorizationPolicy)>,
        authentications: Vec<(String, RequestAuthentication)>,
        root_namespace: &str,
    ) -> Self {
        let mut set = Self { root_namespace: root_namespace.to_owned(), ..Self::default() };
        let mut seen: HashMap<PolicyRef, String> = HashMap::new();
        for (index, (origin, obj)) in policies.into_iter().enumerate() {
            let id = policy_ref(&obj);
            let raw_targets = raw_targets(&obj.spec, id.namespace(), root_namespace);
            if raw_targets.is_none() {
                continue;
            }
            let name = format!("authorizationpolicy/{id}");
            if let Some(first) = seen.insert(id.clone(), origin.clone()) {
                set.statuses.push(ObjectStatus {
                    object: name,
                    origin,
                    accepted: false,
                    targets: Vec::new(),
                    problems: vec![format!("defined twice: {first} is in force")],
                    notes: Vec::new(),
                });
                continue;
            }
            let (targets, problems) = raw_targets.unwrap_or_default();
            let outcome = compile_one(index, &id, obj, root_namespace);
            match outcome {
                Ok((policy, warnings)) => {
                    let at = set.policies.len();
                    for t in &policy.targets {
                        set.by_target.entry(t, Vec::new).push(at);
                    }
                    set.statuses.push(ObjectStatus {
                        object: name,
                        origin,
                        accepted: true,
                        targets: policy.targets.iter().map(ToString::to_string).collect(),
                        problems: Vec::new(),
                        notes: warnings.iter().map(|w| format!("{}: {}", w.field, w.caveat)).collect(),
                    });
                    set.policies.push(policy);
                }
                Err(errors) => {
                    set.fail_closed(&id, &targets, problems.is_empty());
                    set.statuses.push(ObjectStatus {
                        object: name,
                        origin,
                        accepted: false,
                        targets: targets.iter().map(ToString::to_string).collect(),
                        problems: errors.iter().map(|e| format!("{}: {}", e.field, e.problem)).collect(),
                        notes: vec![denial_note(&targets, problems.is_empty(), id.namespace())],
                    });
                }
            }
        }
        // Rank as the node agents do: root namespace first, then by name.
        let root = root_namespace.to_owned();
        let mut order: Vec<usize> = (0..set.policies.len()).collect();
        order.sort_by(|&a, &b| {
            let key = |p: &WaypointPolicy| (p.id.namespace() != root, p.id.clone());
            key(&set.policies[a]).cmp(&key(&set.policies[b]))
        });
        for (rank, at) in order.into_iter().enumerate() {
            set.policies[at].order = u32::try_from(rank).unwrap_or(u32::MAX);
        }
        for (index, (origin, obj)) in authentications.into_iter().enumerate() {
            set.add_authn(index, origin, &obj);
        }
        set
    }

    fn add_authn(&mut self, index: usize, origin: String, obj: &RequestAuthentication) {
        let ns =
            obj.metadata.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| super::DEFAULT_NAMESPACE.into());
        let id = PolicyRef::new(&ns, if obj.metadata.name.is_empty() { "<unnamed>" } else { &obj.metadata.name });
        let object = format!("requestauthentication/{id}");
        let mut problems = Vec::new();
        if !authn::API_VERSIONS.contains(&obj.api_version.as_str()) {
            problems.push(format!("apiVersion {:?} is not security.istio.io/v1 or v1beta1", obj.api_version));
        }
        let raw = raw_targets(&obj.spec, id.namespace(), &self.root_namespace);
        let parsed = serde_path_to_error::deserialize::<_, authn::Spec>(obj.spec.clone());
        let compiled = match parsed {
            Err(e) => Err(vec![format!("spec.{}: {}", e.path(), e.inner())]),
            Ok(spec) => authn::compile(index, id.clone(), &spec, &self.root_namespace)
                .map_err(|errs| errs.iter().map(|e| format!("{}: {}", e.field, e.problem)).collect()),
        };
        let compiled = match (compiled, problems.is_empty()) {
            (Ok(c), true) => Ok(c),
            (Ok(_), false) => Err(problems),
            (Err(mut e), _) => {
                problems.append(&mut e);
                Err(problems)
            }
        };
        match compiled {
            Ok(None) => self.statuses.push(ObjectStatus {
                object,
                origin,
                accepted: false,
                targets: Vec::new(),
                problems: Vec::new(),
                notes: vec!["no targetRefs: Heddle checks JWTs only at waypoints (attach it to a Service or a waypoint Gateway)".into()],
            }),
            Ok(Some(a)) => {
                let at = self.authns.len();
                for t in &a.targets {
                    self.authn_by_target.entry(t, Vec::new).push(at);
                }
                self.statuses.push(ObjectStatus {
                    object,
                    origin,
                    accepted: true,
                    targets: a.targets.iter().map(ToString::to_string).collect(),
                    problems: Vec::new(),
                    notes: Vec::new(),
                });
                self.authns.push(a);
            }
            Err(problems) => {
                let targets = raw.map(|(t, _)| t).unwrap_or_default();
                for t in &targets {
                    *self.rejected_authn.entry(t, || id.clone()) = id.clone();
                }
                self.statuses.push(ObjectStatus {
                    object,
                    origin,
                    accepted: false,
                    targets: targets.iter().map(ToString::to_string).collect(),
                    problems,
                    notes: vec!["every token on its targets fails (401) until it is fixed".into()],
                });
            }
        }
    }

    fn fail_closed(&mut self, id: &PolicyRef, targets: &[Target], targets_known: bool) {
        if targets_known && !targets.is_empty() {
            for t in targets {
                self.rejected.entry(t, || id.clone());
            }
        } else {
            self.rejected_namespaces.entry(id.namespace().to_owned()).or_insert_with(|| id.clone());
        }
    }

    /// No policy and no `RequestAuthentication`: nothing to do per request.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
            && self.rejected.is_empty()
            && self.rejected_namespaces.is_empty()
            && self.authns.is_empty()
            && self.rejected_authn.is_empty()
    }

    /// What became of every targeted object.
    #[must_use]
    pub fn statuses(&self) -> &[ObjectStatus] {
        &self.statuses
    }

    /// The namespace whose policies may attach to every waypoint.
    #[must_use]
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    fn targets_of<'a>(service: Option<(&'a str, &'a str)>, waypoint: (&'a str, &'a str)) -> [Option<TargetRef<'a>>; 3] {
        [
            service.map(|(ns, n)| TargetRef::Service(ns, n)),
            Some(TargetRef::Gateway(waypoint.0, waypoint.1)),
            Some(TargetRef::AllWaypoints),
        ]
    }

    /// The rejected policy that closes this request's targets, if any.
    pub(crate) fn rejected_for(&self, service: Option<(&str, &str)>, waypoint: (&str, &str)) -> Option<&PolicyRef> {
        if self.rejected.is_empty() && self.rejected_namespaces.is_empty() {
            return None;
        }
        let by_target = Self::targets_of(service, waypoint).into_iter().flatten().find_map(|t| self.rejected.get(t));
        by_target
            .or_else(|| service.and_then(|(ns, _)| self.rejected_namespaces.get(ns)))
            .or_else(|| self.rejected_namespaces.get(waypoint.0))
    }

    /// Calls `f` with every policy attached to the request's targets, once each.
    pub(crate) fn for_each_applicable<'p>(
        &'p self,
        service: Option<(&str, &str)>,
        waypoint: (&str, &str),
        mut f: impl FnMut(&'p WaypointPolicy),
    ) {
        if self.by_target.is_empty() {
            return;
        }
        let targets = Self::targets_of(service, waypoint);
        for (i, t) in targets.iter().enumerate() {
            let Some(t) = *t else { continue };
            for &at in self.by_target.get(t).into_iter().flatten() {
                let p = &self.policies[at];
                // A policy attached to an earlier target was visited there.
                if !targets[..i].iter().flatten().any(|earlier| p.targets.iter().any(|pt| earlier.is(pt))) {
                    f(p);
                }
            }
        }
    }

    /// The `RequestAuthentication`s of the request's targets, or the
    /// rejected one that makes every token fail there.
    pub fn authns_for(
        &self,
        service: Option<(&str, &str)>,
        waypoint: (&str, &str),
    ) -> Result<Vec<&RequestAuthn>, &PolicyRef> {
        if self.authns.is_empty() && self.rejected_authn.is_empty() {
            return Ok(Vec::new());
        }
        let targets = Self::targets_of(service, waypoint);
        if let Some(p) = targets.iter().flatten().find_map(|t| self.rejected_authn.get(*t)) {
            return Err(p);
        }
        let mut found: Vec<usize> = Vec::new();
        for t in targets.iter().flatten() {
            for &at in self.authn_by_target.get(*t).into_iter().flatten() {
                if !found.contains(&at) {
                    found.push(at);
                }
            }
        }
        Ok(found.into_iter().map(|at| &self.authns[at]).collect())
    }

    /// Every `jwksUri` the waypoint must fetch.
    #[must_use]
    pub fn jwks_uris(&self) -> Vec<String> {
        let mut uris: Vec<String> = self
            .authns
            .iter()
            .flat_map(|a| a.rules.iter())
            .filter_map(|r| match &r.keys {
                authn::Keys::Uri(u) => Some(u.clone()),
                authn::Keys::Inline(_) => None,
            })
            .collect();
        uris.sort();
        uris.dedup();
        uris
    }
}

/// The note on a rejected policy: what is denied instead.
fn denial_note(targets: &[Target], known: bool, namespace: &str) -> String {
    if known && !targets.is_empty() {
        let list: Vec<String> = targets.iter().map(ToString::to_string).collect();
        format!("fail closed: every request to {} is denied (403) until the policy is fixed", list.join(", "))
    } else {
        format!("fail closed: its targets cannot be read, so every request to namespace {namespace} through this waypoint is denied (403) until it is fixed")
    }
}

/// Targets read, and the problems of the references that did not read.
type ReadTargets = (Vec<Target>, Vec<(String, Problem)>);

/// `spec.targetRef(s)` read leniently (for a policy that may be invalid):
/// `None` when it has none (the node agents' policy), else the targets
/// that parse and the problems of those that do not.
fn raw_targets(spec: &serde_json::Value, namespace: &str, root: &str) -> Option<ReadTargets> {
    let one = spec.get("targetRef").filter(|v| !v.is_null());
    let many: &[serde_json::Value] = spec.get("targetRefs").and_then(|v| v.as_array()).map_or(&[], Vec::as_slice);
    if one.is_none() && many.is_empty() {
        return None;
    }
    Some(target::parse_all(one, many, namespace, root))
}

/// Validates one targeted policy: the node agents' checks, then the
/// waypoint's.
fn compile_one(
    index: usize,
    id: &PolicyRef,
    obj: AuthorizationPolicy,
    root: &str,
) -> Result<(WaypointPolicy, Vec<PolicyWarning>), Vec<PolicyError>> {
    let annotations = obj.metadata.annotations.clone();
    let raw = obj.spec.clone();
    let l4 = super::compile::compile(index, obj)?;
    // The L4 compiler's notes about L7 fields and targets are not the waypoint's.
    let warnings: Vec<PolicyWarning> = l4
        .warnings
        .into_iter()
        .filter(|w| {
            !matches!(
                w.caveat,
                super::Caveat::TargetRef | super::Caveat::L7RuleNeverMatches(_) | super::Caveat::L7PartsDropped(_)
            )
        })
        .collect();
    let spec: Spec = serde_json::from_value(raw).map_err(|e| {
        vec![PolicyError { index, policy: id.clone(), field: "spec".into(), problem: Problem::Schema(e) }]
    })?;
    let (policy, more) = compile::compile(index, id.clone(), &annotations, &spec, root)?.ok_or_else(|| {
        vec![PolicyError {
            index,
            policy: id.clone(),
            field: "spec.targetRefs".into(),
            problem: Problem::TargetRef("no target".into()),
        }]
    })?;
    Ok((policy, warnings.into_iter().chain(more).collect()))
}
