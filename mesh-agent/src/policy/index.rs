//! [`PolicySet`]: every accepted policy, indexed so that evaluating a
//! connection touches only the policies that can select its destination.
//!
//! Istio: "The selector will match with workloads in the same namespace as the
//! authorization policy. If the authorization policy is in the root namespace,
//! the selector will additionally match with workloads in all namespaces."
//! So the candidates for a workload are those of its namespace and those of
//! the root namespace; within a namespace, policies without a selector apply
//! to every workload, and a policy with a selector is filed under one of its
//! `matchLabels` pairs and looked up through the workload's own labels. A
//! policy in another namespace, or selecting other labels, is never visited:
//! 10,000 of them cost nothing per connection.
//!
//! A set is immutable; the agent builds a new one on every change and swaps
//! an `Arc` (evaluation never waits for a rebuild).

use std::collections::{BTreeMap, HashMap};

use super::{
    compile::{compile, policy_ref, CompiledPolicy},
    model::{Action, AuthorizationPolicy},
    PolicyError, PolicyRef, PolicyWarning, Problem, DEFAULT_ROOT_NAMESPACE,
};

/// One policy in force, as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySummary {
    /// The policy.
    pub policy: PolicyRef,
    /// Its action.
    pub action: Action,
    /// Number of `spec.rules`.
    pub rules: usize,
    /// Whether it is dry-run (evaluated, never enforced).
    pub dry_run: bool,
}

/// Validated, indexed policies.
#[derive(Debug, Clone)]
pub struct PolicySet {
    root_namespace: String,
    namespaces: HashMap<String, NamespaceIndex>,
    warnings: Vec<PolicyWarning>,
    len: usize,
}

/// The policies of one namespace.
#[derive(Debug, Clone, Default)]
struct NamespaceIndex {
    policies: Vec<CompiledPolicy>,
    /// Positions in `policies` of those without a selector.
    unselective: Vec<usize>,
    /// label key → label value → positions of the policies filed under that
    /// pair (the first of their `matchLabels`, which every selected workload
    /// carries).
    by_label: HashMap<String, HashMap<String, Vec<usize>>>,
}

/// What a policy that applies to a workload is: for `heddle policy eval` and
/// the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedPolicy {
    /// The policy.
    pub policy: PolicyRef,
    /// Its action.
    pub action: Action,
    /// Whether it is dry-run (evaluated, never enforced).
    pub dry_run: bool,
    /// Whether some rule looks at the source IP (`ipBlocks`, `source.ip`).
    pub needs_source_ip: bool,
    /// Whether some rule looks at the destination IP (`destination.ip`).
    pub needs_destination_ip: bool,
}

impl Default for PolicySet {
    fn default() -> Self {
        Self::empty(DEFAULT_ROOT_NAMESPACE)
    }
}

impl PolicySet {
    /// A set without policies: every connection is allowed.
    #[must_use]
    pub fn empty(root_namespace: &str) -> Self {
        Self { root_namespace: root_namespace.to_owned(), namespaces: HashMap::new(), warnings: Vec::new(), len: 0 }
    }

    /// Validates and indexes `objects`. A bad policy is left out and reported
    /// (each [`PolicyError`] names it, its position and the field); the others
    /// are in the set. Policies in `root_namespace` apply mesh-wide.
    pub fn from_objects(
        objects: impl IntoIterator<Item = AuthorizationPolicy>,
        root_namespace: &str,
    ) -> (Self, Vec<PolicyError>) {
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let mut compiled = Vec::new();
        let mut first_seen: HashMap<PolicyRef, usize> = HashMap::new();
        for (index, object) in objects.into_iter().enumerate() {
            let id = policy_ref(&object);
            if let Some(&first) = first_seen.get(&id) {
                let problem = Problem::Duplicate(first);
                errors.push(PolicyError { index, policy: id, field: "metadata.name".into(), problem });
                continue;
            }
            first_seen.insert(id, index);
            match compile(index, object) {
                Ok(c) => {
                    warnings.extend(c.warnings);
                    compiled.extend(c.policy);
                }
                Err(e) => errors.extend(e),
            }
        }
        // Rank: root namespace first (the mesh operator's policies name the
        // decision when they match), then by namespace and name.
        compiled.sort_by(|a, b| {
            let key = |p: &CompiledPolicy| (p.id.namespace() != root_namespace, p.id.clone());
            key(a).cmp(&key(b))
        });
        let len = compiled.len();
        let mut namespaces: HashMap<String, NamespaceIndex> = HashMap::new();
        for (order, mut policy) in compiled.into_iter().enumerate() {
            policy.order = u32::try_from(order).unwrap_or(u32::MAX);
            namespaces.entry(policy.id.namespace().to_owned()).or_default().insert(policy);
        }
        let set = Self { root_namespace: root_namespace.to_owned(), namespaces, warnings, len };
        (set, errors)
    }

    /// The namespace whose policies apply mesh-wide.
    #[must_use]
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// How many policies are in force (accepted and not waypoint-targeted).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set has no policy.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Caveats about accepted policies (L7 attributes, `targetRef`, ...), to
    /// be logged or shown in the policy's status.
    #[must_use]
    pub fn warnings(&self) -> &[PolicyWarning] {
        &self.warnings
    }

    /// Every policy in force, in rank order (root namespace first, then by
    /// namespace and name).
    #[must_use]
    pub fn summaries(&self) -> Vec<PolicySummary> {
        let mut all: Vec<&CompiledPolicy> = self.namespaces.values().flat_map(|ns| ns.policies.iter()).collect();
        all.sort_by_key(|p| p.order);
        all.into_iter()
            .map(|p| PolicySummary { policy: p.id.clone(), action: p.action, rules: p.rules.len(), dry_run: p.dry_run })
            .collect()
    }

    /// The policies that apply to a workload in `namespace` with `labels`,
    /// in rank order.
    #[must_use]
    pub fn applicable(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<AppliedPolicy> {
        let mut found: Vec<&CompiledPolicy> = Vec::new();
        self.for_each_applicable(namespace, labels, |p| found.push(p));
        found.sort_by_key(|p| p.order);
        found
            .into_iter()
            .map(|p| AppliedPolicy {
                policy: p.id.clone(),
                action: p.action,
                dry_run: p.dry_run,
                needs_source_ip: p.needs_source_ip,
                needs_destination_ip: p.needs_destination_ip,
            })
            .collect()
    }

    /// Calls `f` with every policy that selects the workload, each once, in
    /// no particular order. Does not allocate.
    pub(crate) fn for_each_applicable<'p>(
        &'p self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        mut f: impl FnMut(&'p CompiledPolicy),
    ) {
        if let Some(ns) = self.namespaces.get(namespace) {
            ns.visit(labels, &mut f);
        }
        if namespace != self.root_namespace {
            if let Some(root) = self.namespaces.get(&self.root_namespace) {
                root.visit(labels, &mut f);
            }
        }
    }
}

impl NamespaceIndex {
    fn insert(&mut self, policy: CompiledPolicy) {
        let at = self.policies.len();
        match policy.selector.first() {
            None => self.unselective.push(at),
            Some((k, v)) => self.by_label.entry(k.clone()).or_default().entry(v.clone()).or_default().push(at),
        }
        self.policies.push(policy);
    }

    fn visit<'p>(&'p self, labels: &BTreeMap<String, String>, f: &mut impl FnMut(&'p CompiledPolicy)) {
        for &at in &self.unselective {
            f(&self.policies[at]);
        }
        if self.by_label.is_empty() {
            return;
        }
        for (key, value) in labels {
            let Some(filed) = self.by_label.get(key.as_str()).and_then(|values| values.get(value.as_str())) else {
                continue;
            };
            for &at in filed {
                let policy = &self.policies[at];
                if policy.selects(labels) {
                    f(policy);
                }
            }
        }
    }
}
