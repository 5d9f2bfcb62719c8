//! Validation and compilation of one [`AuthorizationPolicy`] into a
//! [`CompiledPolicy`]: parsed matchers, ready to evaluate without allocating.
//!
//! Every problem of a policy is reported at once, each with the path of its
//! field; one problem rejects the whole policy ("rejected as a whole with a
//! message naming the policy and the field", issue 4), and the caller keeps
//! the other policies.
//!
//! L7 attributes follow Istio ambient (istiod's `handleRule` in
//! `pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go`):
//! "L7 policies never match for ALLOW. For DENY they will always match, so it
//! is more restrictive". An ALLOW rule naming one never matches. A DENY (or
//! AUDIT) rule keeps only its L4 parts, and a `source`, `operation` or `when`
//! entry left with nothing matches everything, as the Envoy generator does
//! for TCP (`generatePermission` falls back to `any: true`; AUDIT is widened
//! like DENY, `rule.checkError` in `pilot/pkg/security/authz/model`). Here
//! ztunnel differs (it skips an emptied match and the DENY never fires,
//! istio/istio#61126); that is a fail-open we do not copy, since the issue asks
//! to fail closed.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::{
    matchers::{parse_ip_block, Field, PortRange, ServiceAccount, StrMatch},
    model::{self, Action, AuthorizationPolicy, Condition, Operation, Rule, Source, Spec},
    Caveat, PolicyError, PolicyRef, PolicyWarning, Problem, DEFAULT_NAMESPACE,
};

/// `when` keys an L4 agent can evaluate (istiod's `l4WhenAttributes`).
pub const L4_WHEN_KEYS: [&str; 5] =
    ["source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"];

/// `when` keys Istio knows but only a proxy that parses HTTP can evaluate.
const L7_WHEN_KEYS: [&str; 5] =
    ["remote.ip", "request.auth.principal", "request.auth.audiences", "request.auth.presenter", "connection.sni"];
const L7_WHEN_KEY_PREFIXES: [&str; 3] = ["request.headers[", "request.auth.claims[", "experimental.envoy.filters."];

/// A validated policy, ready for [`super::PolicySet`].
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub(crate) id: PolicyRef,
    pub(crate) action: Action,
    pub(crate) dry_run: bool,
    /// `matchLabels`; empty selects every workload in scope.
    pub(crate) selector: Box<[(String, String)]>,
    /// Same length and order as `spec.rules`, so indices name rules.
    pub(crate) rules: Box<[CompiledRule]>,
    /// Rank among all policies of a set (root namespace first, then by
    /// namespace and name): when several policies match, the lowest decides.
    pub(crate) order: u32,
    pub(crate) needs_source_ip: bool,
    pub(crate) needs_destination_ip: bool,
}

impl CompiledPolicy {
    /// Whether the selector selects a workload with `labels`.
    pub(crate) fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// One rule: `from`, `to` and `when` must all match; one entry of `from`
/// (of `to`) is enough.
#[derive(Debug, Clone, Default)]
pub struct CompiledRule {
    /// An ALLOW rule with L7 attributes: never matches.
    pub(crate) never: bool,
    pub(crate) from: Box<[SourceMatch]>,
    pub(crate) to: Box<[OperationMatch]>,
    pub(crate) when: Box<[ConditionMatch]>,
}

/// The L4 part of a `source`; an all-empty one matches every source.
#[derive(Debug, Clone, Default)]
pub struct SourceMatch {
    pub(crate) principals: Field<StrMatch>,
    pub(crate) namespaces: Field<StrMatch>,
    pub(crate) service_accounts: Field<ServiceAccount>,
    pub(crate) ip_blocks: Field<IpNet>,
}

/// The L4 part of an `operation`.
#[derive(Debug, Clone, Default)]
pub struct OperationMatch {
    pub(crate) ports: Field<PortRange>,
}

/// A `when` condition on an L4 attribute.
#[derive(Debug, Clone)]
pub enum ConditionMatch {
    /// `source.ip`
    SourceIp(Field<IpNet>),
    /// `source.namespace` (from the authenticated identity)
    SourceNamespace(Field<StrMatch>),
    /// `source.principal`
    SourcePrincipal(Field<StrMatch>),
    /// `destination.ip`
    DestinationIp(Field<IpNet>),
    /// `destination.port`
    DestinationPort(Field<PortRange>),
}

/// The outcome of compiling one accepted object.
#[derive(Debug)]
pub struct Compiled {
    /// The policy, or `None` if it is valid but not for the node agent
    /// (`targetRef`: it belongs to a waypoint).
    pub policy: Option<CompiledPolicy>,
    /// What the user should know about it.
    pub warnings: Vec<PolicyWarning>,
}

/// The name a policy is reported under: `namespace/name`.
#[must_use]
pub fn policy_ref(obj: &AuthorizationPolicy) -> PolicyRef {
    let ns = obj.metadata.namespace.as_deref().filter(|ns| !ns.is_empty()).unwrap_or(DEFAULT_NAMESPACE);
    let name = if obj.metadata.name.is_empty() { "<unnamed>" } else { &obj.metadata.name };
    PolicyRef::new(ns, name)
}

/// Validates and compiles the object at position `index` of the input.
pub fn compile(index: usize, mut obj: AuthorizationPolicy) -> Result<Compiled, Vec<PolicyError>> {
    let id = policy_ref(&obj);
    let mut cx = Cx::new(index, id);
    if obj.api_version != model::HEDDLE_API_VERSION && !model::ISTIO_API_VERSIONS.contains(&obj.api_version.as_str()) {
        cx.error("apiVersion", Problem::ApiVersion(obj.api_version.clone()));
    }
    if obj.kind != model::KIND {
        cx.error("kind", Problem::Kind(obj.kind.clone()));
    }
    if obj.metadata.name.is_empty() {
        cx.error("metadata.name", Problem::MissingName);
    }
    let spec = match std::mem::take(&mut obj.spec) {
        serde_json::Value::Null => Spec::default(),
        raw => match serde_path_to_error::deserialize::<_, Spec>(raw) {
            Ok(spec) => spec,
            Err(e) => {
                let path = e.path().to_string();
                let field = if path == "." { "spec".to_owned() } else { format!("spec.{path}") };
                cx.error(&field, Problem::Schema(e.into_inner()));
                return Err(cx.errors);
            }
        },
    };
    let policy = cx.policy(&obj.metadata, spec);
    if cx.errors.is_empty() {
        Ok(Compiled { policy, warnings: cx.warnings })
    } else {
        Err(cx.errors)
    }
}

/// A list field of the spec with its YAML name.
pub(super) type Named<'a> = (&'a str, &'a [String]);

/// Collects every problem of one policy (the L4 compiler here, the
/// waypoint's in [`super::l7`]).
pub(super) struct Cx {
    pub(super) index: usize,
    pub(super) id: PolicyRef,
    pub(super) action: Action,
    pub(super) errors: Vec<PolicyError>,
    pub(super) warnings: Vec<PolicyWarning>,
}

impl Cx {
    pub(super) fn new(index: usize, id: PolicyRef) -> Self {
        Cx { index, id, action: Action::Allow, errors: Vec::new(), warnings: Vec::new() }
    }

    pub(super) fn error(&mut self, field: &str, problem: Problem) {
        let (index, policy, field) = (self.index, self.id.clone(), field.to_owned());
        self.errors.push(PolicyError { index, policy, field, problem });
    }

    pub(super) fn warn(&mut self, field: &str, caveat: Caveat) {
        let (index, policy, field) = (self.index, self.id.clone(), field.to_owned());
        self.warnings.push(PolicyWarning { index, policy, field, caveat });
    }

    fn policy(&mut self, meta: &model::ObjectMeta, spec: Spec) -> Option<CompiledPolicy> {
        self.action = spec.action.unwrap_or_default();
        if self.action == Action::Custom {
            self.error("spec.action", Problem::UnsupportedAction("CUSTOM"));
        }
        let dry_run = self.dry_run(&meta.annotations);
        let selector = spec.selector.unwrap_or_default().match_labels;
        for key in selector.keys().filter(|k| k.is_empty()) {
            self.error(&format!("spec.selector.matchLabels[{key:?}]"), Problem::EmptyString);
        }
        let rules: Box<[CompiledRule]> =
            spec.rules.iter().enumerate().map(|(i, rule)| self.rule(&format!("spec.rules[{i}]"), rule)).collect();
        if rules.is_empty() && matches!(self.action, Action::Deny | Action::Audit) {
            self.warn("spec.rules", Caveat::NoRules(self.action.as_str()));
        }
        let targeted = spec.target_ref.is_some() || !spec.target_refs.is_empty();
        if targeted {
            // The waypoint sees L7: the node agents' caveats about it do not apply.
            self.warnings.retain(|w| !matches!(w.caveat, Caveat::L7RuleNeverMatches(_) | Caveat::L7PartsDropped(_)));
            let field = if spec.target_ref.is_some() { "spec.targetRef" } else { "spec.targetRefs" };
            self.warn(field, Caveat::TargetRef);
        }
        let needs_source_ip = rules.iter().any(|r| {
            r.from.iter().any(|s| !s.ip_blocks.is_empty())
                || r.when.iter().any(|c| matches!(c, ConditionMatch::SourceIp(_)))
        });
        let needs_destination_ip =
            rules.iter().any(|r| r.when.iter().any(|c| matches!(c, ConditionMatch::DestinationIp(_))));
        (!targeted).then(|| CompiledPolicy {
            id: self.id.clone(),
            action: self.action,
            dry_run,
            selector: selector.into_iter().collect(),
            rules,
            order: 0,
            needs_source_ip,
            needs_destination_ip,
        })
    }

    /// `heddle.dev/dry-run: "true"` or Istio's `istio.io/dry-run: "true"`.
    pub(super) fn dry_run(&mut self, annotations: &BTreeMap<String, String>) -> bool {
        let mut dry = false;
        for key in model::DRY_RUN_ANNOTATIONS {
            match annotations.get(key).map(|v| v.trim()) {
                None => {}
                Some(v) if v.eq_ignore_ascii_case("true") => dry = true,
                Some(v) if v.eq_ignore_ascii_case("false") => {}
                Some(v) => self.warn(&format!("metadata.annotations[{key:?}]"), Caveat::DryRunValue(v.to_owned())),
            }
        }
        dry
    }

    fn rule(&mut self, path: &str, rule: &Rule) -> CompiledRule {
        let mut l7 = Vec::new();
        let mut from = Vec::new();
        for (j, entry) in rule.from.iter().enumerate() {
            let path = format!("{path}.from[{j}]");
            match &entry.source {
                None => self.error(&path, Problem::Missing("source")),
                Some(s) => from.push(self.source(&format!("{path}.source"), s, &mut l7)),
            }
        }
        let mut to = Vec::new();
        for (j, entry) in rule.to.iter().enumerate() {
            let path = format!("{path}.to[{j}]");
            match &entry.operation {
                None => self.error(&path, Problem::Missing("operation")),
                Some(op) => to.push(self.operation(&format!("{path}.operation"), op, &mut l7)),
            }
        }
        let mut when = Vec::new();
        for (j, cond) in rule.when.iter().enumerate() {
            if let Some(c) = self.condition(&format!("{path}.when[{j}]"), cond, &mut l7) {
                when.push(c);
            }
        }
        let never = !l7.is_empty() && self.action == Action::Allow;
        if !l7.is_empty() {
            let list = l7.join(", ");
            self.warn(path, if never { Caveat::L7RuleNeverMatches(list) } else { Caveat::L7PartsDropped(list) });
        }
        CompiledRule { never, from: from.into(), to: to.into(), when: when.into() }
    }

    fn source(&mut self, path: &str, s: &Source, l7: &mut Vec<String>) -> SourceMatch {
        let all = [
            &s.principals,
            &s.not_principals,
            &s.request_principals,
            &s.not_request_principals,
            &s.namespaces,
            &s.not_namespaces,
            &s.service_accounts,
            &s.not_service_accounts,
            &s.ip_blocks,
            &s.not_ip_blocks,
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
        ];
        if all.iter().all(|l| l.is_empty()) {
            self.error(path, Problem::EmptyEntry);
        }
        let policy_ns = self.id.namespace().to_owned();
        let m = SourceMatch {
            principals: self.field(
                path,
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
                principal,
            ),
            namespaces: self.field(path, ("namespaces", &s.namespaces), ("notNamespaces", &s.not_namespaces), pattern),
            service_accounts: self.field(
                path,
                ("serviceAccounts", &s.service_accounts),
                ("notServiceAccounts", &s.not_service_accounts),
                |v| ServiceAccount::parse(v, &policy_ns).map(|sa| (sa, None)),
            ),
            ip_blocks: self.field(path, ("ipBlocks", &s.ip_blocks), ("notIpBlocks", &s.not_ip_blocks), ip_block),
        };
        let _: Field<IpNet> = self.field(
            path,
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ip_block,
        );
        self.l7(path, ("requestPrincipals", &s.request_principals), l7);
        self.l7(path, ("notRequestPrincipals", &s.not_request_principals), l7);
        for (name, list) in [("remoteIpBlocks", &s.remote_ip_blocks), ("notRemoteIpBlocks", &s.not_remote_ip_blocks)] {
            if !list.is_empty() {
                l7.push(name.to_owned());
            }
        }
        m
    }

    fn operation(&mut self, path: &str, op: &Operation, l7: &mut Vec<String>) -> OperationMatch {
        let all = [
            &op.hosts,
            &op.not_hosts,
            &op.ports,
            &op.not_ports,
            &op.methods,
            &op.not_methods,
            &op.paths,
            &op.not_paths,
        ];
        if all.iter().all(|l| l.is_empty()) {
            self.error(path, Problem::EmptyEntry);
        }
        let ports = self.field(path, ("ports", &op.ports), ("notPorts", &op.not_ports), port);
        let l7_fields: [Named; 6] = [
            ("hosts", &op.hosts),
            ("notHosts", &op.not_hosts),
            ("methods", &op.methods),
            ("notMethods", &op.not_methods),
            ("paths", &op.paths),
            ("notPaths", &op.not_paths),
        ];
        for named in l7_fields {
            self.l7(path, named, l7);
        }
        OperationMatch { ports }
    }

    /// An L4 condition, or `None` for an L7 (or unknown) key, which is
    /// recorded in `l7` and dropped.
    fn condition(&mut self, path: &str, c: &Condition, l7: &mut Vec<String>) -> Option<ConditionMatch> {
        if c.key.is_empty() {
            self.error(&format!("{path}.key"), Problem::EmptyString);
        }
        if c.values.is_empty() && c.not_values.is_empty() {
            self.error(path, Problem::EmptyCondition);
        }
        let (yes, no): (Named, Named) = (("values", &c.values), ("notValues", &c.not_values));
        Some(match c.key.as_str() {
            "source.ip" => ConditionMatch::SourceIp(self.field(path, yes, no, ip_block)),
            "source.namespace" => ConditionMatch::SourceNamespace(self.field(path, yes, no, pattern)),
            "source.principal" => ConditionMatch::SourcePrincipal(self.field(path, yes, no, principal)),
            "destination.ip" => ConditionMatch::DestinationIp(self.field(path, yes, no, ip_block)),
            "destination.port" => ConditionMatch::DestinationPort(self.field(path, yes, no, port)),
            "" => return None,
            key => {
                let _: Field<StrMatch> = self.field(path, yes, no, pattern);
                let known = L7_WHEN_KEYS.contains(&key) || L7_WHEN_KEY_PREFIXES.iter().any(|p| key.starts_with(p));
                l7.push(if known { format!("when key {key}") } else { format!("unknown when key {key}") });
                return None;
            }
        })
    }

    /// Parses a field and its `not` twin with `parse`, reporting each bad
    /// entry under `path.name[i]`.
    pub(super) fn field<T>(
        &mut self,
        path: &str,
        (yes_name, yes): Named,
        (no_name, no): Named,
        mut parse: impl FnMut(&str) -> Result<(T, Option<Caveat>), Problem>,
    ) -> Field<T> {
        let mut list = |name: &str, values: &[String]| -> Vec<T> {
            let mut out = Vec::with_capacity(values.len());
            for (i, v) in values.iter().enumerate() {
                let field = format!("{path}.{name}[{i}]");
                match parse(v) {
                    Ok((t, caveat)) => {
                        out.push(t);
                        if let Some(c) = caveat {
                            self.warn(&field, c);
                        }
                    }
                    Err(p) => self.error(&field, p),
                }
            }
            out
        };
        let any_of = list(yes_name, yes);
        let none_of = list(no_name, no);
        Field::new(any_of, none_of)
    }

    /// Checks an L7 list (non-empty strings) and records its name in `l7`.
    fn l7(&mut self, path: &str, (name, values): Named, l7: &mut Vec<String>) {
        if values.is_empty() {
            return;
        }
        for i in values.iter().enumerate().filter(|(_, v)| v.is_empty()).map(|(i, _)| i) {
            self.error(&format!("{path}.{name}[{i}]"), Problem::EmptyString);
        }
        l7.push(name.to_owned());
    }
}

pub(super) fn pattern(v: &str) -> Result<(StrMatch, Option<Caveat>), Problem> {
    StrMatch::parse(v)
}

/// A principal pattern; Istio compares principals without `spiffe://`, so a
/// value written with it never matches (kept, as in Istio, but flagged).
pub(super) fn principal(v: &str) -> Result<(StrMatch, Option<Caveat>), Problem> {
    let (m, caveat) = StrMatch::parse(v)?;
    Ok((m, caveat.or_else(|| v.starts_with("spiffe://").then(|| Caveat::SpiffePrefix(v.to_owned())))))
}

pub(super) fn ip_block(v: &str) -> Result<(IpNet, Option<Caveat>), Problem> {
    parse_ip_block(v).map(|n| (n, None))
}

pub(super) fn port(v: &str) -> Result<(PortRange, Option<Caveat>), Problem> {
    PortRange::parse(v).map(|p| (p, None))
}
