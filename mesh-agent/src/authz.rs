//! Authorization at the destination agent: turns an inbound connection into
//! the policy engine's [`Connection`], decides it with [`policy::authorize`],
//! and keeps every admitted connection registered so that a policy (or
//! registry) change can close the ones it no longer allows.
//!
//! What this module owns:
//! - [`decide`]: the pure decision for one connection: [`ConnFacts`] (what the
//!   agent knows when it accepts: the destination pod, the original
//!   destination, the source IP, the authenticated peer or `None` for
//!   plaintext), the current [`PolicySet`] and [`Registry`] in, a typed
//!   [`Permit`] or [`Denial`] out. No I/O, no locks.
//! - [`Authorizer`]: the per-agent state around it: the latest policy set and
//!   registry (through `watch` receivers), the table of live connections
//!   ([`live`]), and per-(action, policy, verdict) decision counters for the
//!   admin API. [`Authorizer::run`] is the task that re-evaluates every live
//!   connection when either input changes.
//! - [`source`]: the local policy source (`--policies`), reloaded like the
//!   configuration file.
//!
//! Invariants: a connection is registered and decided under one lock, so a
//! policy change published at any moment is seen either by the admission or
//! by the re-evaluation that follows it (no connection slips between them);
//! an entry leaves the table when its [`LiveConn`] guard drops, however the
//! connection ends. Fail closed: a connection to a pod the registry does not
//! know is refused.

pub mod live;
pub mod source;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use live::LiveConn;

use crate::{
    flows::PolicyMark,
    identity::SpiffeId,
    policy::{
        self, Action, Connection, Decision, Destination, DryRunDecision, OrigDst, PeerIdentity, PolicyRef, PolicySet,
        Reason, SrcIp, Verdict,
    },
    registry::{ObjectRef, Registry, SharedRegistry},
};

/// What the destination agent knows about an inbound connection when it
/// accepts it: everything policy may look at except the destination's
/// labels, which are read from the registry at each evaluation (so a label
/// change re-evaluates live connections).
#[derive(Debug, Clone)]
pub struct ConnFacts {
    /// The enrolled pod the connection is for.
    pub workload: ObjectRef,
    /// The address the peer connected to (pod IP and port).
    pub orig_dst: OrigDst,
    /// The peer's address.
    pub src: SrcIp,
    /// The verified peer identity; `None` for a plaintext peer.
    pub peer: Option<PeerIdentity>,
}

impl ConnFacts {
    /// A stream of an mTLS tunnel from `peer` (verified) at `src`.
    #[must_use]
    pub fn tunnelled(workload: ObjectRef, orig_dst: SocketAddr, src: IpAddr, peer: &SpiffeId) -> Self {
        Self {
            workload,
            orig_dst: OrigDst(orig_dst),
            src: SrcIp(src),
            peer: Some(PeerIdentity::new(peer.trust_domain(), peer.namespace(), peer.service_account())),
        }
    }

    /// A plaintext connection from `src` (PERMISSIVE inbound): no identity.
    #[must_use]
    pub fn plaintext(workload: ObjectRef, orig_dst: SocketAddr, src: IpAddr) -> Self {
        Self { workload, orig_dst: OrigDst(orig_dst), src: SrcIp(src), peer: None }
    }
}

/// An allowed connection and the decision that allowed it (which may name
/// an AUDIT policy and a dry-run outcome).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit(Decision);

/// Why a connection is refused (or, for a live one, closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// The policies deny it; the decision names the policy (and rule).
    #[error("{}", denial_text(.0))]
    Policy(Decision),
    /// The destination pod is not in the registry, so its namespace and
    /// labels (and hence its policies) are unknown: fail closed.
    #[error("denied: destination workload {0} is not in the registry (fail closed)")]
    UnknownWorkload(ObjectRef),
}

/// Decides one connection against `policies`, reading the destination's
/// namespace and labels from `registry`. Pure.
pub fn decide(policies: &PolicySet, registry: &Registry, facts: &ConnFacts) -> Result<Permit, Denial> {
    let Some(workload) = registry.workload(&facts.workload) else {
        return Err(Denial::UnknownWorkload(facts.workload.clone()));
    };
    let conn = Connection {
        dst: Destination { namespace: &workload.id.namespace, labels: &workload.labels, addr: facts.orig_dst },
        src: facts.src,
        peer: facts.peer.as_ref(),
    };
    let decision = policy::authorize(policies, &conn);
    if decision.is_allowed() {
        Ok(Permit(decision))
    } else {
        Err(Denial::Policy(decision))
    }
}

impl Permit {
    /// The engine's decision.
    #[must_use]
    pub fn decision(&self) -> &Decision {
        &self.0
    }

    /// What the flow records say about it.
    #[must_use]
    pub fn mark(&self) -> PolicyMark {
        decision_mark(&self.0, false)
    }
}

/// The flow-record mark of a policy decision.
fn decision_mark(d: &Decision, denied: bool) -> PolicyMark {
    PolicyMark {
        denied,
        audited: d.audited.is_some(),
        policy: d.policy.clone(),
        rule: d.rule,
        audit_policy: d.audited.as_ref().map(|a| a.policy.clone()),
        dry_run: d.dry_run.as_ref().map(dry_run_text),
        closed_by_policy: None,
    }
}

impl Denial {
    /// The deciding policy, if a policy decided.
    #[must_use]
    pub fn policy(&self) -> Option<&PolicyRef> {
        match self {
            Denial::Policy(d) => d.policy.as_ref(),
            Denial::UnknownWorkload(_) => None,
        }
    }

    /// Short stable name, for logs and counters.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::Policy(d) => d.reason.name(),
            Denial::UnknownWorkload(_) => "unknown_workload",
        }
    }

    /// What the flow record of a refused connection says.
    #[must_use]
    pub fn mark(&self) -> PolicyMark {
        match self {
            Denial::Policy(d) => decision_mark(d, true),
            Denial::UnknownWorkload(_) => PolicyMark { denied: true, ..PolicyMark::default() },
        }
    }

    /// What the close record of a live connection closed by this denial says.
    #[must_use]
    pub fn closing_mark(&self) -> PolicyMark {
        PolicyMark { closed_by_policy: self.policy().cloned(), ..self.mark() }
    }
}

/// `denied by policy ns/name rule N`, or for an ALLOW-only workload
/// `denied: no ALLOW policy matched (first applicable ALLOW policy: ns/name)`.
fn denial_text(d: &Decision) -> String {
    match (&d.policy, d.rule) {
        (Some(p), Some(rule)) => format!("denied by policy {p} rule {rule}"),
        (Some(p), None) => {
            format!("denied: no ALLOW policy matched (first applicable ALLOW policy: {p})")
        }
        (None, _) => format!("denied ({})", d.reason.name()),
    }
}

/// The dry-run outcome as one phrase: `deny by policy ns/name rule 0`,
/// `allow: no ALLOW policy applies`, ...
pub(crate) fn dry_run_text(d: &DryRunDecision) -> String {
    let verdict = d.verdict.name();
    match (&d.policy, d.rule, d.reason) {
        (Some(p), Some(rule), _) => format!("{verdict} by policy {p} rule {rule}"),
        (Some(p), None, _) => {
            format!("{verdict}: no ALLOW policy matched (first applicable ALLOW policy: {p})")
        }
        (None, _, Reason::AllowedNoAllowPolicies) => format!("{verdict}: no ALLOW policy applies"),
        (None, _, reason) => format!("{verdict} ({})", reason.name()),
    }
}

/// The action of the policy that gives a decision for `reason`.
fn deciding_action(reason: Reason) -> Option<Action> {
    match reason {
        Reason::DeniedByDenyPolicy => Some(Action::Deny),
        Reason::NoAllowPolicyMatched | Reason::AllowedByPolicy => Some(Action::Allow),
        Reason::AllowedNoAllowPolicies | Reason::PolicyRejected => None,
    }
}

/// One counter of decisions, as `/policies` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DecisionCount {
    /// `ALLOW`, `DENY` or `AUDIT`; `null` when no policy decided.
    pub action: Option<&'static str>,
    /// The policy, `ns/name`; `null` when no policy decided.
    pub policy: Option<PolicyRef>,
    /// `allow`, `deny`, `audit` (an AUDIT policy matched), `dry_run_allow` /
    /// `dry_run_deny` (what the dry-run policies would have decided), or
    /// `close` (a live connection closed after a change).
    pub verdict: &'static str,
    /// How many.
    pub count: u64,
}

type CounterKey = (Option<Action>, Option<PolicyRef>, &'static str);

/// Admission, live re-evaluation and decision counters of one agent.
pub struct Authorizer {
    policies: watch::Receiver<Arc<PolicySet>>,
    registry: watch::Receiver<SharedRegistry>,
    live: Arc<live::LiveTable>,
    counters: Mutex<HashMap<CounterKey, u64>>,
}

/// An admitted connection: why it was allowed, and its registration (keep
/// it for the connection's lifetime; it says when a change revokes it).
pub struct Admitted {
    /// The decision.
    pub permit: Permit,
    /// The live-connection registration.
    pub live: LiveConn,
}

impl Authorizer {
    /// An authorizer deciding with the latest `policies` and `registry`.
    #[must_use]
    pub fn new(policies: watch::Receiver<Arc<PolicySet>>, registry: watch::Receiver<SharedRegistry>) -> Self {
        Self { policies, registry, live: Arc::new(live::LiveTable::default()), counters: Mutex::new(HashMap::new()) }
    }

    /// The policy set in force.
    #[must_use]
    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies.borrow().clone()
    }

    /// Decides a new connection (`conn` is its flow id) and, if allowed,
    /// registers it as live. Registration and decision happen under the
    /// table's lock (see the module invariants).
    pub fn admit(&self, conn: u64, facts: ConnFacts) -> Result<Admitted, Denial> {
        let mut table = self.live.lock();
        let decided = {
            let policies = self.policies.borrow();
            let registry = self.registry.borrow();
            decide(&policies, &registry, &facts)
        };
        self.count_decision(&decided);
        let permit = decided?;
        let entry = table.insert(conn, facts);
        drop(table);
        Ok(Admitted { permit, live: LiveConn::new(conn, entry, self.live.clone()) })
    }

    /// Re-decides every live connection with the current inputs and revokes
    /// those now denied by a policy. Returns how many it revoked.
    ///
    /// A connection whose pod left the registry is left alone: un-enrolling
    /// lets existing connections finish (see `capture`), and a missing
    /// workload says nothing about policy.
    pub fn reevaluate(&self) -> usize {
        let table = self.live.lock();
        let policies = self.policies.borrow().clone();
        let registry = self.registry.borrow().clone();
        let mut revoked = 0;
        for (conn, entry) in table.iter() {
            if entry.is_revoked() {
                continue;
            }
            if let Err(denial @ Denial::Policy(_)) = decide(&policies, &registry, entry.facts()) {
                tracing::info!(
                    conn,
                    workload = %entry.facts().workload,
                    src = %entry.facts().src.0,
                    reason = %denial,
                    "closing a live connection after a policy change"
                );
                self.count_close(&denial);
                entry.revoke(denial);
                revoked += 1;
            }
        }
        revoked
    }

    /// Re-evaluates live connections whenever the policy set or the registry
    /// changes, until `stop` fires (or an input's sender is gone).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut policies = self.policies.clone();
        let mut registry = self.registry.clone();
        loop {
            let changed = tokio::select! {
                () = stop.cancelled() => return,
                r = policies.changed() => r,
                r = registry.changed() => r,
            };
            if changed.is_err() {
                return;
            }
            let revoked = self.reevaluate();
            tracing::debug!(revoked, live = self.live_count(), "live connections re-evaluated");
        }
    }

    /// Connections registered now.
    #[must_use]
    pub fn live_count(&self) -> usize {
        self.live.lock().len()
    }

    /// The decision counters, sorted by policy, action and verdict.
    #[must_use]
    pub fn decisions(&self) -> Vec<DecisionCount> {
        let counters = self.counters.lock().expect("counters lock");
        let sorted: BTreeMap<(Option<PolicyRef>, Option<&'static str>, &'static str), u64> = counters
            .iter()
            .map(|((action, policy, verdict), n)| ((policy.clone(), action.map(Action::as_str), *verdict), *n))
            .collect();
        sorted
            .into_iter()
            .map(|((policy, action, verdict), count)| DecisionCount { action, policy, verdict, count })
            .collect()
    }

    fn bump(&self, keys: impl IntoIterator<Item = CounterKey>) {
        let mut counters = self.counters.lock().expect("counters lock");
        for key in keys {
            *counters.entry(key).or_default() += 1;
        }
    }

    fn count_decision(&self, decided: &Result<Permit, Denial>) {
        let d = match decided {
            Ok(Permit(d)) | Err(Denial::Policy(d)) => d,
            Err(Denial::UnknownWorkload(_)) => return self.bump([(None, None, "deny")]),
        };
        let mut keys = vec![(deciding_action(d.reason), d.policy.clone(), d.verdict.name())];
        if let Some(a) = &d.audited {
            keys.push((Some(Action::Audit), Some(a.policy.clone()), "audit"));
        }
        if let Some(dry) = &d.dry_run {
            let verdict = match dry.verdict {
                Verdict::Allow => "dry_run_allow",
                Verdict::Deny => "dry_run_deny",
            };
            keys.push((deciding_action(dry.reason), dry.policy.clone(), verdict));
        }
        self.bump(keys);
    }

    fn count_close(&self, denial: &Denial) {
        if let Denial::Policy(d) = denial {
            self.bump([(deciding_action(d.reason), d.policy.clone(), "close")]);
        }
    }
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("policies", &self.policies.borrow().len())
            .field("live", &self.live_count())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
