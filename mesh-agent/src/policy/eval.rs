//! [`authorize`]: the decision for one inbound connection, a pure function of
//! a [`PolicySet`] and a [`Connection`]. No I/O, no locks, no allocation
//! (the deciding policy is a reference-counted [`PolicyRef`]).
//!
//! The decision order is Istio's ("Authorization Policy" reference):
//! "1. If there are any DENY policies that match the request, deny the
//! request. 2. If there are no ALLOW policies for the workload, allow the
//! request. 3. If any of the ALLOW policies match the request, allow the
//! request. 4. Deny the request." AUDIT policies never change it ("Audit a
//! request if it matches any of the rules"); dry-run policies
//! (`istio.io/dry-run`) are evaluated into [`Decision::dry_run`] only.

use std::{collections::BTreeMap, fmt, net::IpAddr, net::SocketAddr, str::FromStr};

use super::{
    compile::{CompiledPolicy, CompiledRule, ConditionMatch, OperationMatch, SourceMatch},
    model::Action,
    PolicyRef, PolicySet,
};

/// The connecting peer's IP address (as seen by the destination agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SrcIp(pub IpAddr);

/// The destination the peer connected to: workload IP and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDst(pub SocketAddr);

/// An authenticated peer: its SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>`.
/// Built once per connection (after the mTLS handshake) so that evaluation
/// compares borrowed strings only.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    trust_domain: String,
    namespace: String,
    service_account: String,
    /// `<td>/ns/<ns>/sa/<sa>`: what Istio matches `principals` against.
    principal: String,
}

/// Why a string is not a workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a workload identity (trust-domain/ns/NAMESPACE/sa/SERVICE-ACCOUNT, spiffe:// optional)")]
pub struct ParsePeerIdentityError(String);

impl PeerIdentity {
    /// The identity of service account `service_account` in `namespace`.
    #[must_use]
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            principal: format!("{trust_domain}/ns/{namespace}/sa/{service_account}"),
        }
    }

    /// The trust domain.
    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The peer's namespace (what `namespaces` and `source.namespace` match).
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The peer's service account.
    #[must_use]
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// `<td>/ns/<ns>/sa/<sa>` (what `principals` and `source.principal` match).
    #[must_use]
    pub fn principal(&self) -> &str {
        &self.principal
    }
}

impl FromStr for PeerIdentity {
    type Err = ParsePeerIdentityError;

    /// Parses `cluster.local/ns/x/sa/y`, with or without `spiffe://`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("spiffe://").unwrap_or(s);
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => Ok(Self::new(td, ns, sa)),
            _ => Err(ParsePeerIdentityError(s.to_owned())),
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.principal)
    }
}

/// The destination workload: where policies are selected.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    /// The workload's namespace.
    pub namespace: &'a str,
    /// The workload's labels (what `selector.matchLabels` selects on).
    pub labels: &'a BTreeMap<String, String>,
    /// The address the peer connected to.
    pub addr: OrigDst,
}

/// One inbound connection, as the destination agent sees it before it
/// connects to the application.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The destination workload and address.
    pub dst: Destination<'a>,
    /// The peer's address.
    pub src: SrcIp,
    /// The peer's verified identity; `None` for a plaintext (PERMISSIVE) peer.
    pub peer: Option<&'a PeerIdentity>,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The connection may proceed.
    Allow,
    /// The connection is refused.
    Deny,
}

impl Verdict {
    /// Stable lowercase name, for JSON and metric labels.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

/// Which step of the decision order decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A DENY policy matched.
    DeniedByDenyPolicy,
    /// ALLOW policies apply to the workload and none matched.
    NoAllowPolicyMatched,
    /// An ALLOW policy matched.
    AllowedByPolicy,
    /// No DENY policy matched and no ALLOW policy applies to the workload.
    AllowedNoAllowPolicies,
    /// A policy attached to the destination was rejected: the waypoint
    /// denies what it covers rather than guess (fail closed).
    PolicyRejected,
}

impl Reason {
    /// Stable `snake_case` name, for JSON, logs and metric labels.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Reason::DeniedByDenyPolicy => "denied_by_deny_policy",
            Reason::NoAllowPolicyMatched => "no_allow_policy_matched",
            Reason::AllowedByPolicy => "allowed_by_policy",
            Reason::AllowedNoAllowPolicies => "allowed_no_allow_policies",
            Reason::PolicyRejected => "policy_rejected",
        }
    }
}

/// A policy and the index of one of its `spec.rules`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleRef {
    /// The policy.
    pub policy: PolicyRef,
    /// Index into its `spec.rules`.
    pub rule: usize,
}

/// What [`authorize`] decided, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The verdict to enforce.
    pub verdict: Verdict,
    /// The step of the decision order that gave it.
    pub reason: Reason,
    /// The deciding policy: the matching DENY or ALLOW policy, or for
    /// [`Reason::NoAllowPolicyMatched`] the first ALLOW policy that applies
    /// (the one to look at). `None` when no policy applies.
    pub policy: Option<PolicyRef>,
    /// The matching rule of `policy` (`None` when nothing matched).
    pub rule: Option<usize>,
    /// The first AUDIT policy and rule that matched, if any.
    pub audited: Option<RuleRef>,
    /// What the decision would be if the dry-run policies that apply were
    /// enforced too; `None` when no dry-run policy applies.
    pub dry_run: Option<DryRunDecision>,
}

/// The decision with dry-run policies enforced, recorded next to the real one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DryRunDecision {
    /// The verdict they would give.
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason,
    /// The deciding policy, as in [`Decision::policy`].
    pub policy: Option<PolicyRef>,
    /// The deciding rule.
    pub rule: Option<usize>,
}

impl Decision {
    /// Whether the verdict is [`Verdict::Allow`].
    #[must_use]
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    /// The decision as a JSON object: `verdict`, `reason`, `policy`, `rule`,
    /// `audited` (bool), `audit_policy`, `audit_rule`, `dry_run`.
    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        let dry_run = self.dry_run.as_ref().map(|d| {
            serde_json::json!({
                "verdict": d.verdict.name(), "reason": d.reason.name(), "policy": d.policy, "rule": d.rule,
            })
        });
        serde_json::json!({
            "verdict": self.verdict.name(),
            "reason": self.reason.name(),
            "policy": self.policy,
            "rule": self.rule,
            "audited": self.audited.is_some(),
            "audit_policy": self.audited.as_ref().map(|a| &a.policy),
            "audit_rule": self.audited.as_ref().map(|a| a.rule),
            "dry_run": dry_run,
        })
    }
}

/// One line of `key=value` words after the verdict:
/// `DENY policy=ns/name rule=0 reason=denied_by_deny_policy`, then
/// `audited=ns/name audit-rule=N` and `dry-run=deny dry-run-policy=...
/// dry-run-rule=N dry-run-reason=...` when they apply.
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.is_allowed() { "ALLOW" } else { "DENY" };
        write!(f, "{verdict}")?;
        write_deciding(f, "", self.policy.as_ref(), self.rule, self.reason)?;
        if let Some(a) = &self.audited {
            write!(f, " audited={} audit-rule={}", a.policy, a.rule)?;
        }
        if let Some(d) = &self.dry_run {
            write!(f, " dry-run={}", d.verdict.name())?;
            write_deciding(f, "dry-run-", d.policy.as_ref(), d.rule, d.reason)?;
        }
        Ok(())
    }
}

fn write_deciding(
    f: &mut fmt::Formatter<'_>,
    prefix: &str,
    policy: Option<&PolicyRef>,
    rule: Option<usize>,
    reason: Reason,
) -> fmt::Result {
    match policy {
        Some(p) => write!(f, " {prefix}policy={p}")?,
        None => write!(f, " {prefix}policy=-")?,
    }
    if let Some(r) = rule {
        write!(f, " {prefix}rule={r}")?;
    }
    write!(f, " {prefix}reason={}", reason.name())
}

/// Decides one connection. Pure: same set and connection, same decision.
#[must_use]
pub fn authorize(policies: &PolicySet, conn: &Connection<'_>) -> Decision {
    // An IPv4 peer may reach an IPv6 socket as ::ffff:a.b.c.d; policies
    // write IPv4 blocks, so compare the canonical form.
    let conn = Connection {
        src: SrcIp(conn.src.0.to_canonical()),
        dst: Destination {
            addr: OrigDst(SocketAddr::new(conn.dst.addr.0.ip().to_canonical(), conn.dst.addr.0.port())),
            ..conn.dst
        },
        peer: conn.peer,
    };
    decide_applicable(|observe| {
        policies.for_each_applicable(conn.dst.namespace, conn.dst.labels, |p| {
            observe(p, p.rules.iter().position(|r| r.matches(&conn)));
        });
    })
}

/// The decision over the policies `visit` gives, each with the index of
/// its first matching rule: enforced ones decide, dry-run ones go into
/// [`Decision::dry_run`]. Shared by the node agents' [`authorize`] and the
/// waypoint's [`super::l7::authorize_request`].
pub(crate) fn decide_applicable<'p, P: Ranked + 'p>(
    visit: impl FnOnce(&mut dyn FnMut(&'p P, Option<usize>)),
) -> Decision {
    let mut enforced: Tally<'p, P> = Tally::default();
    let mut with_dry_run: Tally<'p, P> = Tally::default();
    let mut any_dry_run = false;
    visit(&mut |p, hit| {
        any_dry_run |= p.dry_run();
        if !p.dry_run() {
            enforced.observe(p, hit);
        }
        with_dry_run.observe(p, hit);
    });
    let (verdict, reason, policy, rule) = enforced.decide();
    let dry_run = any_dry_run.then(|| {
        let (verdict, reason, policy, rule) = with_dry_run.decide();
        DryRunDecision { verdict, reason, policy, rule }
    });
    Decision { verdict, reason, policy, rule, audited: enforced.audited(), dry_run }
}

/// What the decision order needs of a policy: the L4 engine's and the
/// waypoint's ([`super::l7`]) policies decide the same way.
pub(crate) trait Ranked {
    /// The policy's name.
    fn id(&self) -> &PolicyRef;
    /// Its action.
    fn action(&self) -> Action;
    /// Its rank among the policies of its set (lowest decides).
    fn order(&self) -> u32;
    /// Whether it is evaluated only into the dry-run decision.
    fn dry_run(&self) -> bool;
}

impl Ranked for CompiledPolicy {
    fn id(&self) -> &PolicyRef {
        &self.id
    }
    fn action(&self) -> Action {
        self.action
    }
    fn order(&self) -> u32 {
        self.order
    }
    fn dry_run(&self) -> bool {
        self.dry_run
    }
}

/// The lowest-ranked matching policy of each action, and whether any ALLOW
/// policy applies.
pub(crate) struct Tally<'p, P> {
    deny: Option<(&'p P, usize)>,
    allow: Option<(&'p P, usize)>,
    audit: Option<(&'p P, usize)>,
    /// The lowest-ranked ALLOW policy that applies, matching or not.
    allow_applies: Option<&'p P>,
}

impl<P> Default for Tally<'_, P> {
    fn default() -> Self {
        Self { deny: None, allow: None, audit: None, allow_applies: None }
    }
}

/// The deciding verdict, reason, policy and rule.
pub(crate) type Decided = (Verdict, Reason, Option<PolicyRef>, Option<usize>);

impl<'p, P: Ranked> Tally<'p, P> {
    /// Notes that `p` applies and which of its rules matched, if any.
    pub(crate) fn observe(&mut self, p: &'p P, hit: Option<usize>) {
        let lower = |best: Option<(&P, usize)>| best.is_none_or(|(b, _)| p.order() < b.order());
        let slot = match p.action() {
            Action::Deny => &mut self.deny,
            Action::Audit => &mut self.audit,
            Action::Allow => {
                if self.allow_applies.is_none_or(|b| p.order() < b.order()) {
                    self.allow_applies = Some(p);
                }
                &mut self.allow
            }
            // Rejected by `compile`: never in a set.
            Action::Custom => return,
        };
        if let Some(rule) = hit {
            if lower(*slot) {
                *slot = Some((p, rule));
            }
        }
    }

    /// The first AUDIT policy and rule that matched.
    pub(crate) fn audited(&self) -> Option<RuleRef> {
        self.audit.map(|(p, rule)| RuleRef { policy: p.id().clone(), rule })
    }

    /// Istio's decision order over what was observed.
    pub(crate) fn decide(&self) -> Decided {
        let named = |(p, r): (&P, usize)| (Some(p.id().clone()), Some(r));
        if let Some(hit) = self.deny {
            let (p, r) = named(hit);
            return (Verdict::Deny, Reason::DeniedByDenyPolicy, p, r);
        }
        match (self.allow_applies, self.allow) {
            (None, _) => (Verdict::Allow, Reason::AllowedNoAllowPolicies, None, None),
            (Some(_), Some(hit)) => {
                let (p, r) = named(hit);
                (Verdict::Allow, Reason::AllowedByPolicy, p, r)
            }
            (Some(first), None) => (Verdict::Deny, Reason::NoAllowPolicyMatched, Some(first.id().clone()), None),
        }
    }
}

impl CompiledRule {
    /// Istio: "A match occurs when at least one source, one operation and all
    /// conditions matches the request. An empty rule is always matched."
    fn matches(&self, c: &Connection<'_>) -> bool {
        !self.never
            && (self.from.is_empty() || self.from.iter().any(|s| s.matches(c)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(c)))
            && self.when.iter().all(|w| w.matches(c))
    }
}

impl SourceMatch {
    // "Fields in the source are ANDed together" (`Source`, Istio API).
    // Identity fields need an authenticated peer: for a plaintext peer no
    // principal, namespace or service account matches, so a positive list
    // never matches and a `not` list always does. That is Istio's behaviour (ISTIO-SECURITY-2021-004:
    // "The mTLS-only field notNamespaces will be compared to an empty value
    // when mTLS is not used"; ztunnel's `not_principals` test expects a
    // plaintext connection to match), and what makes the usual
    // `DENY notPrincipals: ["*"]` reject plaintext peers.
    fn matches(&self, c: &Connection<'_>) -> bool {
        self.ip_blocks.matches(|net| net.contains(&c.src.0))
            && self.principals.matches(|m| c.peer.is_some_and(|p| m.matches(p.principal())))
            && self.namespaces.matches(|m| c.peer.is_some_and(|p| m.matches(p.namespace())))
            && self.service_accounts.matches(|sa| c.peer.is_some_and(|p| sa.matches(p)))
    }
}

impl OperationMatch {
    fn matches(&self, c: &Connection<'_>) -> bool {
        let port = c.dst.addr.0.port();
        self.ports.matches(|r| r.contains(port))
    }
}

impl ConditionMatch {
    fn matches(&self, c: &Connection<'_>) -> bool {
        match self {
            ConditionMatch::SourceIp(f) => f.matches(|net| net.contains(&c.src.0)),
            ConditionMatch::SourceNamespace(f) => f.matches(|m| c.peer.is_some_and(|p| m.matches(p.namespace()))),
            ConditionMatch::SourcePrincipal(f) => f.matches(|m| c.peer.is_some_and(|p| m.matches(p.principal()))),
            ConditionMatch::DestinationIp(f) => f.matches(|net| net.contains(&c.dst.addr.0.ip())),
            ConditionMatch::DestinationPort(f) => f.matches(|r| r.contains(c.dst.addr.0.port())),
        }
    }
}
