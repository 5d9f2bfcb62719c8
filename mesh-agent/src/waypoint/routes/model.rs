//! The compiled route model: what `HTTPRoute` and `GRPCRoute` rules mean once
//! checked, in the waypoint's own types. [`super::load`] builds it from the
//! Gateway API objects; [`super::matching`] evaluates it per request.

use std::{fmt, time::Duration};

use regex::Regex;

use crate::registry::ObjectRef;

/// Which kind of route a rule came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// `HTTPRoute`.
    Http,
    /// `GRPCRoute`.
    Grpc,
    /// Istio's `VirtualService` (its `http` routes, in order).
    Istio,
}

/// A route object, `kind/ns/name` when shown.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteRef {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: RouteKind,
    /// Namespace and name.
    pub id: ObjectRef,
}

impl fmt::Display for RouteRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            RouteKind::Http => "httproute",
            RouteKind::Grpc => "grpcroute",
            RouteKind::Istio => "virtualservice",
        };
        write!(f, "{kind}/{}", self.id)
    }
}

/// How a path is matched (Gateway API `HTTPPathMatch.type`).
#[derive(Clone, Debug)]
pub enum PathMatch {
    /// The whole path, exactly.
    Exact(String),
    /// Element-wise prefix: `/foo` matches `/foo` and `/foo/bar`, not
    /// `/foobar`. Stored without a trailing `/` (except `/` itself).
    Prefix(String),
    /// A regular expression that must match the whole path.
    Regex(Regex),
}

/// How a header or query value is matched.
#[derive(Clone, Debug)]
pub enum ValueMatch {
    /// Exactly this value.
    Exact(String),
    /// A regular expression matching the whole value.
    Regex(Regex),
}

impl ValueMatch {
    /// Whether `v` matches.
    #[must_use]
    pub fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(want) => want == v,
            ValueMatch::Regex(re) => re.is_match(v),
        }
    }
}

/// One `matches[]` entry: every condition must hold.
#[derive(Clone, Debug)]
pub struct RequestMatch {
    /// Path condition (default: prefix `/`).
    pub path: PathMatch,
    /// Header conditions (names lower-cased).
    pub headers: Vec<(String, ValueMatch)>,
    /// Query parameter conditions (names exact).
    pub query: Vec<(String, ValueMatch)>,
    /// Method, upper case.
    pub method: Option<String>,
}

/// A header change (`RequestHeaderModifier`, `ResponseHeaderModifier`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    /// Replace (or add) these.
    pub set: Vec<(String, String)>,
    /// Append these.
    pub add: Vec<(String, String)>,
    /// Remove these names.
    pub remove: Vec<String>,
}

/// How a path is replaced (`HTTPPathModifier`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    /// Replace the whole path.
    Full(String),
    /// Replace the part the rule's prefix match matched.
    Prefix(String),
}

/// `RequestRedirect`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Redirect {
    /// New scheme.
    pub scheme: Option<String>,
    /// New host name.
    pub hostname: Option<String>,
    /// New path.
    pub path: Option<PathModifier>,
    /// New port.
    pub port: Option<u16>,
    /// 301 or 302 (default 302).
    pub status: u16,
}

/// `URLRewrite`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// New `Host`/`:authority`.
    pub hostname: Option<String>,
    /// New path.
    pub path: Option<PathModifier>,
}

/// The filters of a rule that Heddle applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    /// Request header changes.
    pub request_headers: Option<HeaderModifier>,
    /// Response header changes.
    pub response_headers: Option<HeaderModifier>,
    /// Answer with a redirect instead of forwarding.
    pub redirect: Option<Redirect>,
    /// Rewrite before forwarding.
    pub rewrite: Option<Rewrite>,
    /// Copies of the request sent to shadow backends (`RequestMirror`).
    pub mirrors: Vec<Mirror>,
}

/// `RequestMirror`: a copy of a share of the requests, sent fire and forget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// The shadow backend (a Service and port, or why it does not resolve).
    pub target: BackendTarget,
    /// Share of requests mirrored, in millionths (`percent` or `fraction`;
    /// 1,000,000 when neither is given).
    pub per_million: u32,
}

/// `retry` (GEP-1731, experimental channel): when an attempt fails, try
/// again on another endpoint after a backoff, within the rule's budget.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Response statuses that are retried (connect failures and resets
    /// before a response always are).
    pub codes: Vec<u16>,
    /// `grpc-status` codes of gRPC responses that are retried
    /// (`UNAVAILABLE`, 14, unless Istio's `retryOn` says more).
    pub grpc_codes: Vec<u32>,
    /// Least wait before a retry; later retries double it, up to ten times.
    pub backoff: Duration,
    /// Whether POST, PATCH and other non-idempotent methods are retried
    /// (the route's `heddle.dev/retry-non-idempotent: "true"`).
    pub non_idempotent: bool,
    /// The rule's retry budget (shared by every request of the rule).
    pub budget: std::sync::Arc<crate::waypoint::retry::Budget>,
}

impl PartialEq for RetryPolicy {
    fn eq(&self, o: &Self) -> bool {
        (self.attempts, &self.codes, &self.grpc_codes, self.backoff, self.non_idempotent)
            == (o.attempts, &o.codes, &o.grpc_codes, o.backoff, o.non_idempotent)
    }
}

/// Where a backendRef points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendTarget {
    /// A Service that exists, and its port.
    Service {
        /// The Service.
        id: ObjectRef,
        /// Its port (the service port, not the target port);
        /// [`SAME_PORT`]: the port the client dialled.
        port: u16,
        /// Only the endpoints of this subset (a `DestinationRule` subset).
        subset: Option<std::sync::Arc<Subset>>,
        /// `ns/name` (`ns/name@subset`), as request records name it (made once, here).
        name: crate::flows::Name,
    },
    /// A reference Heddle cannot resolve (missing Service, other kind):
    /// requests sent here get 500, as Gateway API specifies.
    Invalid(String),
}

/// A backend port meaning "the port the client dialled" (a
/// `VirtualService` destination without a port).
pub const SAME_PORT: u16 = 0;

/// The service port a backend's `port` means for a client that dialled
/// `dialled` ([`SAME_PORT`] is that port).
#[must_use]
pub fn backend_port(port: u16, dialled: u16) -> u16 {
    if port == SAME_PORT {
        dialled
    } else {
        port
    }
}

/// A `DestinationRule` subset: the endpoints carrying all these labels.
#[derive(Clone, Debug)]
pub struct Subset {
    /// Its name.
    pub name: String,
    /// The labels its endpoints carry.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its traffic policy (its own fields over the rule's top-level ones).
    pub policy: Option<std::sync::Arc<TrafficPolicy>>,
}

impl PartialEq for Subset {
    fn eq(&self, o: &Self) -> bool {
        (&self.name, &self.labels) == (&o.name, &o.labels)
    }
}

impl Eq for Subset {}

/// A `DestinationRule` `trafficPolicy` as the waypoint applies it.
#[derive(Debug, Default)]
pub struct TrafficPolicy {
    /// `connectionPool` limits, with their counters (one per backend).
    pub breaker: Option<crate::waypoint::outlier::Breaker>,
    /// `outlierDetection`.
    pub outlier: Option<crate::waypoint::outlier::OutlierConfig>,
}

/// Istio's `fault`: delay or abort a share of the requests (per million).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    /// Wait this long first, for this share of requests.
    pub delay: Option<(Duration, u32)>,
    /// Answer with this instead of forwarding, for this share.
    pub abort: Option<(Abort, u32)>,
}

/// What an injected abort answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// An HTTP status.
    Http(u16),
    /// A gRPC status code (trailers-only, HTTP 200).
    Grpc(u32),
}

/// One weighted backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Where.
    pub target: BackendTarget,
    /// Relative weight (0: never).
    pub weight: u32,
    /// Filters of this backendRef (applied after the rule's).
    pub filters: Filters,
}

/// `timeouts`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole request, from the client's point of view.
    pub request: Option<Duration>,
    /// One attempt to the backend.
    pub backend_request: Option<Duration>,
}

/// One rule of one route, compiled.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The route it belongs to.
    pub route: RouteRef,
    /// `kind/ns/name`, as request records name it (made once, here).
    pub route_name: crate::flows::Name,
    /// Its index in the route's `rules`.
    pub index: usize,
    /// Its matches (any may match; empty: everything).
    pub matches: Vec<RequestMatch>,
    /// Its filters.
    pub filters: Filters,
    /// Its backends; empty means the parent Service itself.
    pub backends: Vec<Backend>,
    /// Its timeouts.
    pub timeouts: Timeouts,
    /// Its retry policy.
    pub retry: Option<RetryPolicy>,
    /// Faults it injects (`VirtualService` `fault`).
    pub fault: Option<Fault>,
}
