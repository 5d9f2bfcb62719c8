//! L4 authorization policy: Istio-compatible `AuthorizationPolicy` objects,
//! validated and indexed into a [`PolicySet`], and [`authorize`], the pure
//! function the destination agent runs for every new inbound connection.
//!
//! What this module owns:
//! - [`model`]: the serde types of the objects (`heddle.dev/v1alpha1` and
//!   `security.istio.io/v1`/`v1beta1`, unchanged). The envelope is lenient
//!   (Kubernetes metadata and `status` are accepted and ignored); the `spec`
//!   is strict: an unknown field rejects the policy.
//! - [`matchers`]: string (`exact`, `prefix*`, `*suffix`, `*`), CIDR and port
//!   (`"8080"`, `"8000-8100"`) matchers and their parsers.
//! - [`compile`]: validation and compilation of one object into rules that
//!   evaluate without allocating. A bad policy is rejected as a whole with a
//!   [`PolicyError`] naming the policy and the field; it never takes the other
//!   policies down with it.
//! - [`index`]: the [`PolicySet`], indexed by namespace and by one selector
//!   label so that policies which cannot select a destination cost nothing.
//! - [`eval`]: [`Connection`], [`Decision`] and [`authorize`].
//! - [`load`]: reading files and directories of multi-document YAML (the
//!   offline evaluator, `heddle policy eval`, and tests).
//!
//! Invariants: a [`PolicySet`] is immutable once built (the agent swaps a new
//! `Arc<PolicySet>` in on change); [`authorize`] does no I/O, takes no lock and
//! does not allocate; every [`Decision`] names the policy and rule that decided
//! it. No task runs here: the caller (the inbound proxy, the CLI) calls in.

pub mod compile;
pub mod eval;
pub mod index;
pub mod l7;
pub mod load;
pub mod matchers;
pub mod model;

#[cfg(test)]
mod tests;

use std::{fmt, sync::Arc};

pub use eval::{
    authorize, Connection, Decision, Destination, DryRunDecision, OrigDst, PeerIdentity, Reason, RuleRef, SrcIp,
    Verdict,
};
pub use index::{AppliedPolicy, PolicySet, PolicySummary};
pub use model::{Action, AuthorizationPolicy, ObjectMeta};

/// The root namespace used when none is configured: policies there apply
/// mesh-wide (Istio's `istio-system` plays this role).
pub const DEFAULT_ROOT_NAMESPACE: &str = "heddle-system";

/// The namespace of a policy object that does not name one (as `kubectl`).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Names one policy, `namespace/name`. Cheap to clone (one reference count),
/// so decisions can carry it into flows and metrics without allocating.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef(Arc<(String, String)>);

impl PolicyRef {
    /// The policy `name` in `namespace`.
    #[must_use]
    pub fn new(namespace: &str, name: &str) -> Self {
        Self(Arc::new((namespace.to_owned(), name.to_owned())))
    }

    /// The policy's namespace.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.0 .0
    }

    /// The policy's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.0 .1
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace(), self.name())
    }
}

impl fmt::Debug for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyRef({self})")
    }
}

impl serde::Serialize for PolicyRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A policy rejected as a whole: which object (its position in the input and
/// its name), which field (`spec.rules[0].from[1].source.ipBlocks[2]`) and why.
#[derive(Debug, thiserror::Error)]
#[error("policy {policy}: {field}: {problem}")]
pub struct PolicyError {
    /// Position of the object in the list given to [`PolicySet::from_objects`].
    pub index: usize,
    /// The policy.
    pub policy: PolicyRef,
    /// Path of the offending field, in the YAML spelling.
    pub field: String,
    /// What is wrong with it.
    pub problem: Problem,
}

/// Why a field makes a policy invalid.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The object does not fit the schema: an unknown field, a wrong type, an
    /// unknown `action` (serde's message names the expected fields).
    #[error(transparent)]
    Schema(serde_json::Error),
    /// `apiVersion` is not one of the accepted groups/versions.
    #[error("apiVersion {0:?} is not supported (use heddle.dev/v1alpha1, security.istio.io/v1 or security.istio.io/v1beta1)")]
    ApiVersion(String),
    /// `kind` is not `AuthorizationPolicy`.
    #[error("kind {0:?} is not AuthorizationPolicy")]
    Kind(String),
    /// `metadata.name` is missing or empty.
    #[error("a policy needs a name")]
    MissingName,
    /// A value, label key or condition key is the empty string.
    #[error("empty string (remove the entry, or write \"*\" to require a non-empty value)")]
    EmptyString,
    /// An `ipBlocks`-style entry is neither an IP address nor a CIDR.
    #[error("{value:?} is not an IP address or CIDR (e.g. 10.0.0.0/8, 2001:db8::/32)")]
    IpBlock {
        /// The entry as written.
        value: String,
        /// The parser's complaint.
        #[source]
        source: ipnet::AddrParseError,
    },
    /// A port entry is not `1`–`65535` or an ascending range `"8000-8100"`.
    #[error("{0:?} is not a port (1-65535) or a port range such as \"8000-8100\"")]
    Port(String),
    /// A `serviceAccounts` entry is not `sa` or `namespace/sa`.
    #[error("{0:?} is not a service account (\"name\" or \"namespace/name\", no wildcards)")]
    ServiceAccount(String),
    /// The action is one Heddle does not implement (`CUSTOM`).
    #[error(
        "action {0} is not supported by Heddle (it needs an external authorizer); ztunnel does not support it either"
    )]
    UnsupportedAction(&'static str),
    /// A `from` entry without `source`, or a `to` entry without `operation`.
    #[error("missing `{0}` (Istio rejects an empty entry; delete the entry to match anything)")]
    Missing(&'static str),
    /// `source: {}` or `operation: {}`.
    #[error("sets no field (Istio rejects it; delete the entry to match anything)")]
    EmptyEntry,
    /// A `when` condition with neither `values` nor `notValues`.
    #[error("a condition needs `values` or `notValues`")]
    EmptyCondition,
    /// Another object with the same namespace and name came first.
    #[error("defined twice (the first definition, object #{0}, is kept)")]
    Duplicate(usize),
    /// A `targetRef(s)` entry the waypoint cannot attach to.
    #[error("{0}")]
    TargetRef(String),
    /// A `when` key the waypoint does not know (it would never match: the
    /// policy is refused, as Istio's validation does).
    #[error("unknown when key {0:?} (request.headers[NAME], request.auth.principal|audiences|presenter, request.auth.claims[NAME], source.ip|namespace|principal, remote.ip, destination.ip|port, connection.sni)")]
    UnknownWhenKey(String),
    /// A path pattern with a misplaced `{*}`/`{**}`, or not starting with `/`.
    #[error("{0:?} is not a path pattern: {1}")]
    PathPattern(String, &'static str),
    /// Not an HTTP header name.
    #[error("{0:?} is not an HTTP header name")]
    HeaderName(String),
    /// A `RequestAuthentication` problem (issuer, JWKS, locations).
    #[error("{0}")]
    Jwt(String),
}

/// Something in an accepted policy that does not do what it seems to: L7
/// parts that an L4 engine cannot see, a policy meant for a waypoint. Like
/// Istio's status conditions, these are shown to the user (`heddle policy
/// validate`, the agent's log) and never silently swallowed.
#[derive(Debug, Clone)]
pub struct PolicyWarning {
    /// Position of the object in the list given to [`PolicySet::from_objects`].
    pub index: usize,
    /// The policy.
    pub policy: PolicyRef,
    /// Path of the field concerned.
    pub field: String,
    /// What happens instead.
    pub caveat: Caveat,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy {}: {}: {}", self.policy, self.field, self.caveat)
    }
}

/// The kinds of [`PolicyWarning`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Caveat {
    /// An ALLOW rule uses fields that need L7 (listed): it never matches.
    #[error("uses L7 attributes ({0}) that an L4 agent cannot see: this ALLOW rule never matches (as in Istio ambient without a waypoint)")]
    L7RuleNeverMatches(String),
    /// A DENY/AUDIT rule uses fields that need L7: they are dropped, so the
    /// rule matches more connections than written.
    #[error("uses L7 attributes ({0}) that an L4 agent cannot see: this rule is enforced without them and matches more than written")]
    L7PartsDropped(String),
    /// The policy attaches to a gateway or waypoint (`targetRef(s)`), which an
    /// L4 agent does not run; it is not applied (ztunnel ignores it too).
    #[error(
        "targets a Service or waypoint: enforced by the waypoint (with its L7 attributes), not by the node agents"
    )]
    TargetRef,
    /// A DENY or AUDIT policy with no rules never matches anything.
    #[error("a {0} policy without rules never matches (only ALLOW policies without rules have an effect: they deny everything)")]
    NoRules(&'static str),
    /// A principal written with the `spiffe://` prefix never matches: Istio
    /// compares principals without it.
    #[error(
        "{0:?} starts with spiffe://, which principals never carry (write trust-domain/ns/NS/sa/SA): it never matches"
    )]
    SpiffePrefix(String),
    /// A `*` that is not the first or last character is compared literally.
    #[error("{0:?}: only a leading or trailing `*` is a wildcard; this one is compared literally")]
    LiteralStar(String),
    /// A dry-run annotation whose value is neither `true` nor `false`.
    #[error("value {0:?} is not \"true\" or \"false\": the policy is enforced")]
    DryRunValue(String),
}
