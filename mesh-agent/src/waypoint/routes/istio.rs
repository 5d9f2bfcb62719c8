//! Istio's `VirtualService` and `DestinationRule` (`networking.istio.io`,
//! the upstream types of [`super::istio_api`]), compiled into the same
//! rules as Gateway API routes, for users migrating from Istio: a
//! `VirtualService` whose `hosts` name a Service this waypoint owns routes
//! that Service's requests, its `http` routes tried in order; a
//! `DestinationRule` gives the subsets (endpoint labels) its destinations
//! name.
//!
//! Read: `hosts` (short names, `name.namespace`, `name.namespace.svc...`),
//! `http[].match` (`uri`, `headers`, `queryParams` with exact, prefix or
//! regex; `method.exact`), `route[]` (`destination.host/subset/port`,
//! `weight`, `headers`), `headers`, `rewrite` (`uri`, `authority`),
//! `redirect`, `timeout`, `retries` (`attempts`, `perTryTimeout`,
//! `retryOn`), `fault` (`delay`, `abort`), `mirror`/`mirrorPercentage` and
//! `mirrors`. Without `retries` a route gets Istio's default (two retries on
//! connect failures, resets and 503). Every other field is a problem that
//! keeps the object out of force, named by its path. A `DestinationRule`'s
//! `trafficPolicy` gives circuit breaking (`connectionPool`: in-flight and
//! pending limits) and outlier detection ([`crate::waypoint::outlier`]), for
//! the Service and per subset; what Heddle does not apply of it (mTLS is
//! always on; load balancer choice, per-port settings, ...) is a note, so
//! its subsets still work.

use std::{collections::HashMap, sync::Arc, time::Duration};

use regex::{Regex, RegexBuilder};

use super::{
    istio_api::{destinationrules as d, virtualservices as v},
    matching::Attachment,
    model::{
        Abort, Backend, BackendTarget, Fault, Filters, HeaderModifier, Mirror, PathMatch, PathModifier, Redirect,
        RequestMatch, RetryPolicy, Rewrite, RouteKind, RouteRef, Rule, Subset, Timeouts, TrafficPolicy, ValueMatch,
        SAME_PORT,
    },
    Condition, ParentStatus, RouteStatus,
};
use crate::{
    registry::{ObjectRef, Registry},
    waypoint::{
        outlier::{
            Breaker, OutlierConfig, DEFAULT_BASE_EJECTION, DEFAULT_CONSECUTIVE_5XX, DEFAULT_MAX_EJECTION_PERCENT,
        },
        retry::Budget,
    },
};

/// The API versions read (Istio serves the same schema under all three).
#[must_use]
pub fn is_istio_networking(api: &str) -> bool {
    matches!(api, "networking.istio.io/v1" | "networking.istio.io/v1beta1" | "networking.istio.io/v1alpha3")
}

/// Subsets and traffic policies by Service, from every accepted
/// `DestinationRule`.
#[derive(Debug, Default)]
pub struct Subsets {
    by_service: HashMap<ObjectRef, HashMap<String, Arc<Subset>>>,
    /// The top-level `trafficPolicy` of a Service (for requests to it
    /// without a subset).
    policies: HashMap<ObjectRef, Arc<TrafficPolicy>>,
}

impl Subsets {
    fn get(&self, service: &ObjectRef, name: &str) -> Option<Arc<Subset>> {
        self.by_service.get(service)?.get(name).cloned()
    }

    /// The traffic policy of requests to `service` without a subset.
    #[must_use]
    pub fn service_policy(&self, service: &ObjectRef) -> Option<Arc<TrafficPolicy>> {
        self.policies.get(service).cloned()
    }
}

fn status(route: String, origin: &str, problems: Vec<String>, notes: Vec<String>) -> RouteStatus {
    RouteStatus { route, source: origin.to_owned(), accepted: false, parents: Vec::new(), problems, notes, rules: 0 }
}

fn unknown_problems(unknown: Vec<String>, kind: &str) -> Vec<String> {
    unknown.into_iter().map(|f| format!("{f}: unknown field (not in Istio's {kind})")).collect()
}

/// The Service a host names, seen from `namespace`.
fn service_of(host: &str, namespace: &str) -> Option<ObjectRef> {
    if host.contains('*') || host.is_empty() {
        return None;
    }
    let mut parts = host.split('.');
    let name = parts.next()?.to_owned();
    let ns = match parts.next() {
        None => namespace.to_owned(),
        Some(ns) => {
            // `name.ns`, `name.ns.svc`, `name.ns.svc.<cluster domain>`.
            if parts.next().is_some_and(|svc| svc != "svc") {
                return None;
            }
            ns.to_owned()
        }
    };
    Some(ObjectRef { namespace: ns, name })
}

fn meta(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (ObjectRef, String) {
    let id = ObjectRef {
        namespace: m.namespace.clone().unwrap_or_else(|| "default".to_owned()),
        name: m.name.clone().unwrap_or_default(),
    };
    (id, m.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default())
}

/// Compiles one `DestinationRule`: its subsets (added to `subsets` when
/// accepted) and its status.
pub fn compile_destination_rule(
    dr: &d::DestinationRule,
    unknown: Vec<String>,
    origin: &str,
    registry: &Registry,
    subsets: &mut Subsets,
) -> RouteStatus {
    let (id, _) = meta(&dr.metadata);
    let mut problems = unknown_problems(unknown, "DestinationRule");
    let mut notes = Vec::new();
    let spec = &dr.spec;
    let service = service_of(&spec.host, &id.namespace);
    let svc = service.as_ref().and_then(|s| registry.service(s));
    if svc.is_none() {
        problems.push(format!("spec.host: {:?} is not a Service of the mesh", spec.host));
    }
    if spec.workload_selector.is_some() {
        problems.push("spec.workloadSelector: not supported".into());
    }
    if spec.export_to.is_some() {
        problems.push("spec.exportTo: not supported (every namespace sees it)".into());
    }
    let top = spec.traffic_policy.as_ref();
    if let Some(tp) = top {
        notes.extend(traffic_policy_notes("spec.trafficPolicy", tp));
    }
    let service_policy = traffic_policy(top, None, "spec.trafficPolicy", &mut problems);
    let mut found = HashMap::new();
    for (i, s) in spec.subsets.iter().flatten().enumerate() {
        let at = format!("spec.subsets[{i}]");
        let own = s.traffic_policy.as_ref().and_then(as_top);
        if let Some(tp) = &own {
            notes.extend(traffic_policy_notes(&format!("{at}.trafficPolicy"), tp));
        }
        let policy = traffic_policy(top, own.as_ref(), &format!("{at}.trafficPolicy"), &mut problems);
        let labels = s.labels.clone().unwrap_or_default();
        if let Some(svc) = svc {
            let any = svc
                .endpoints
                .iter()
                .filter_map(|e| registry.workload(e))
                .any(|w| labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)));
            if !any {
                notes.push(format!("{at}: subset {} selects no endpoint now (its requests get 503 UH)", s.name));
            }
        }
        if found.insert(s.name.clone(), Arc::new(Subset { name: s.name.clone(), labels, policy })).is_some() {
            problems.push(format!("{at}.name: subset {} is defined twice", s.name));
        }
    }
    let mut st = status(format!("destinationrule/{id}"), origin, problems, notes);
    if let (true, Some(service)) = (st.problems.is_empty(), service) {
        st.accepted = true;
        st.rules = found.len();
        st.parents.push(ParentStatus {
            parent: service.to_string(),
            port: None,
            attached: true,
            conditions: vec![Condition::accepted(
                true,
                "Accepted",
                format!("{} subsets for Service {service}", found.len()),
            )],
        });
        if let Some(p) = service_policy {
            subsets.policies.insert(service.clone(), p);
        }
        subsets.by_service.entry(service).or_default().extend(found);
    }
    st
}

/// Notes for the fields of a `trafficPolicy` Heddle does not apply.
fn traffic_policy_notes(at: &str, tp: &d::DestinationRuleTrafficPolicy) -> Vec<String> {
    let mut notes = Vec::new();
    let mut note = |set: bool, field: &str, what: &str| {
        if set {
            notes.push(format!("{at}.{field}: {what}"));
        }
    };
    note(tp.tls.is_some(), "tls", "ignored: HBONE mutual TLS is always on between mesh workloads");
    note(tp.load_balancer.is_some(), "loadBalancer", "not applied: Heddle balances by peak EWMA");
    note(tp.port_level_settings.is_some(), "portLevelSettings", "not applied yet");
    note(tp.retry_budget.is_some(), "retryBudget", "not applied: Heddle's retry budget is 20% + 10/s per route rule");
    note(tp.proxy_protocol.is_some() || tp.tunnel.is_some(), "proxyProtocol/tunnel", "not supported");
    if let Some(cp) = &tp.connection_pool {
        if let Some(h) = &cp.http {
            note(
                h.max_requests_per_connection.is_some(),
                "connectionPool.http.maxRequestsPerConnection",
                "not applied yet",
            );
            note(
                h.max_retries.is_some(),
                "connectionPool.http.maxRetries",
                "not applied: the retry budget bounds retries",
            );
            note(
                h.idle_timeout.is_some() || h.h2_upgrade_policy.is_some() || h.max_concurrent_streams.is_some(),
                "connectionPool.http (idleTimeout, h2UpgradePolicy, maxConcurrentStreams)",
                "not applied",
            );
        }
        note(
            cp.tcp.as_ref().is_some_and(|t| {
                t.connect_timeout.is_some()
                    || t.tcp_keepalive.is_some()
                    || t.idle_timeout.is_some()
                    || t.max_connection_duration.is_some()
            }),
            "connectionPool.tcp",
            "only maxConnections is applied",
        );
    }
    if let Some(od) = &tp.outlier_detection {
        note(
            od.interval.is_some()
                || od.min_health_percent.is_some()
                || od.consecutive_local_origin_failures.is_some()
                || od.split_external_local_origin_errors.is_some(),
            "outlierDetection (interval, minHealthPercent, local-origin settings)",
            "not applied: ejection is decided at each response",
        );
    }
    notes
}

/// The `connectionPool` and `outlierDetection` of a subset (`sub`) over the
/// rule's (`top`): a backend's own limits (one breaker per backend).
fn traffic_policy(
    top: Option<&d::DestinationRuleTrafficPolicy>,
    sub: Option<&d::DestinationRuleTrafficPolicy>,
    at: &str,
    problems: &mut Vec<String>,
) -> Option<Arc<TrafficPolicy>> {
    let pool = sub.and_then(|t| t.connection_pool.as_ref()).or(top.and_then(|t| t.connection_pool.as_ref()));
    let od = sub.and_then(|t| t.outlier_detection.as_ref()).or(top.and_then(|t| t.outlier_detection.as_ref()));
    let mut count = |v: Option<i64>, field: &str| -> Option<usize> {
        let v = v?;
        match usize::try_from(v) {
            Ok(n) if n >= 1 => Some(n),
            _ => {
                problems.push(format!("{at}.{field}: {v} is not a count of at least 1"));
                None
            }
        }
    };
    let breaker = pool.and_then(|cp| {
        let max_conns =
            count(cp.tcp.as_ref().and_then(|t| t.max_connections).map(i64::from), "connectionPool.tcp.maxConnections");
        let max_reqs = count(
            cp.http.as_ref().and_then(|h| h.http2_max_requests).map(i64::from),
            "connectionPool.http.http2MaxRequests",
        );
        let pending = count(
            cp.http.as_ref().and_then(|h| h.http1_max_pending_requests).map(i64::from),
            "connectionPool.http.http1MaxPendingRequests",
        );
        let limit = match (max_conns, max_reqs) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Unset limits are Istio's: unbounded (2^32 - 1).
        limit.map(|l| Breaker::new(l, pending.unwrap_or(u32::MAX as usize)))
    });
    let outlier = od.map(|o| {
        let n = |v: Option<i64>, field: &str, problems: &mut Vec<String>| -> Option<u32> {
            let v = v?;
            u32::try_from(v).ok().filter(|n| *n >= 1).or_else(|| {
                problems.push(format!("{at}.outlierDetection.{field}: {v} is not a count of at least 1"));
                None
            })
        };
        let consecutive_5xx =
            n(o.consecutive5xx_errors.or(o.consecutive_errors.map(i64::from)), "consecutive5xxErrors", problems);
        let consecutive_gateway = n(o.consecutive_gateway_errors, "consecutiveGatewayErrors", problems);
        let base_ejection =
            o.base_ejection_time.as_deref().map_or(Some(DEFAULT_BASE_EJECTION), parse_duration).unwrap_or_else(|| {
                problems.push(format!("{at}.outlierDetection.baseEjectionTime: not a duration"));
                DEFAULT_BASE_EJECTION
            });
        let max_ejection_percent = match o.max_ejection_percent.map(u32::try_from) {
            None => DEFAULT_MAX_EJECTION_PERCENT,
            Some(Ok(p)) if p <= 100 => p,
            Some(_) => {
                problems.push(format!("{at}.outlierDetection.maxEjectionPercent: not a percentage within 0-100"));
                DEFAULT_MAX_EJECTION_PERCENT
            }
        };
        // Istio: without either threshold, 5 consecutive 5xx.
        let consecutive_5xx = if consecutive_5xx.is_none() && consecutive_gateway.is_none() {
            Some(DEFAULT_CONSECUTIVE_5XX)
        } else {
            consecutive_5xx
        };
        OutlierConfig { consecutive_5xx, consecutive_gateway, base_ejection, max_ejection_percent }
    });
    (breaker.is_some() || outlier.is_some()).then(|| Arc::new(TrafficPolicy { breaker, outlier }))
}

/// A subset's `trafficPolicy` in the top-level type (the generated types
/// differ only in name).
fn as_top(tp: &d::DestinationRuleSubsetsTrafficPolicy) -> Option<d::DestinationRuleTrafficPolicy> {
    serde_json::to_value(tp).ok().and_then(|v| serde_json::from_value(v).ok())
}

/// A compiled `VirtualService`.
pub struct Compiled {
    /// Rules and where they attach.
    pub rules: Vec<(Attachment, Rule)>,
    /// Its status.
    pub status: RouteStatus,
}

/// Compiles one `VirtualService` for `waypoint`.
pub fn compile_virtual_service(
    vs: &v::VirtualService,
    unknown: Vec<String>,
    origin: &str,
    registry: &Registry,
    waypoint: &ObjectRef,
    subsets: &Subsets,
) -> Compiled {
    let (id, created) = meta(&vs.metadata);
    let mut c = Vs {
        registry,
        subsets,
        ns: id.namespace.clone(),
        route: RouteRef { kind: RouteKind::Istio, id: id.clone() },
        problems: unknown_problems(unknown, "VirtualService"),
    };
    let spec = &vs.spec;
    if spec.gateways.as_ref().is_some_and(|g| g.iter().any(|g| g != "mesh")) {
        c.problems.push("spec.gateways: only \"mesh\" is served by a waypoint (ingress gateways are not)".into());
    }
    if spec.tcp.is_some() || spec.tls.is_some() {
        c.problems.push("spec.tcp/spec.tls: not supported (the waypoint routes HTTP; TCP keeps the L4 path)".into());
    }
    if spec.export_to.is_some() {
        c.problems.push("spec.exportTo: not supported (every namespace sees it)".into());
    }
    let rules: Vec<Rule> = spec.http.iter().flatten().enumerate().map(|(i, h)| c.http(i, h)).collect();
    let mut parents = Vec::new();
    let mut attachments = Vec::new();
    for (i, host) in spec.hosts.iter().flatten().enumerate() {
        let at = format!("spec.hosts[{i}]");
        let service = service_of(host, &id.namespace);
        let mut st = ParentStatus {
            parent: service.as_ref().map_or_else(|| host.clone(), ToString::to_string),
            port: None,
            attached: false,
            conditions: Vec::new(),
        };
        match service.as_ref().and_then(|s| registry.service(s).map(|svc| (s, svc))) {
            None => st.conditions.push(Condition::accepted(
                false,
                "NoMatchingParent",
                format!("{at}: {host:?} is not a Service of the mesh"),
            )),
            Some((_, svc)) if registry.waypoint_of(svc) != Some(waypoint) => st.conditions.push(Condition::accepted(
                false,
                "NoMatchingParent",
                format!("{at}: Service {} does not use waypoint {waypoint}", svc.id),
            )),
            Some((s, _)) if c.problems.is_empty() => {
                st.attached = true;
                st.conditions.push(Condition::accepted(
                    true,
                    "Accepted",
                    format!("routes Service {s} at waypoint {waypoint}"),
                ));
                attachments.push(Attachment { service: s.clone(), port: None, created: created.clone() });
            }
            Some(_) => {
                st.attached = true;
                st.conditions.push(Condition::accepted(false, "UnsupportedValue", c.problems.join("; ")));
            }
        }
        parents.push(st);
    }
    if spec.hosts.as_ref().is_none_or(Vec::is_empty) {
        c.problems.push("spec.hosts: names no host".into());
    }
    Compiled {
        rules: super::matching::attach_all(&attachments, &rules),
        status: RouteStatus {
            route: c.route.to_string(),
            source: origin.to_owned(),
            accepted: !attachments.is_empty(),
            parents,
            problems: c.problems,
            notes: Vec::new(),
            rules: if attachments.is_empty() { 0 } else { rules.len() },
        },
    }
}

/// What one `VirtualService` compiles against, and its problems.
struct Vs<'a> {
    registry: &'a Registry,
    subsets: &'a Subsets,
    ns: String,
    route: RouteRef,
    problems: Vec<String>,
}

/// Largest compiled regular expression (bytes).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Istio's regular expressions (RE2) match the whole value.
fn regex(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(&format!("^(?:{pattern})$")).size_limit(REGEX_SIZE_LIMIT).build()
}

/// A Go/protobuf duration as Istio writes it: `7s`, `0.5s`, `100ms`, `1m30s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest.bytes().take_while(|b| b.is_ascii_digit() || *b == b'.').count();
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let unit = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let scale = match &rest[..unit] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit..];
        total += value * scale;
    }
    (total.is_finite() && total < 1e9).then(|| Duration::from_secs_f64(total))
}

/// A percentage 0-100 as millionths.
fn per_million(v: Option<f64>, at: &str, problems: &mut Vec<String>) -> u32 {
    let v = v.unwrap_or(100.0);
    if !(0.0..=100.0).contains(&v) {
        problems.push(format!("{at}: {v} is not a percentage within 0-100"));
        return 0;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "0..=1e6 after the check")]
    let p = (v * 10_000.0).round() as u32;
    p
}

impl Vs<'_> {
    fn string_match(
        &mut self,
        exact: Option<&String>,
        prefix: Option<&String>,
        re: Option<&String>,
        at: &str,
    ) -> Option<ValueMatch> {
        match (exact, prefix, re) {
            (Some(e), None, None) => Some(ValueMatch::Exact(e.clone())),
            (None, Some(p), None) => self.regex(&format!("{}.*", regex::escape(p)), at).map(ValueMatch::Regex),
            (None, None, Some(r)) => self.regex(r, at).map(ValueMatch::Regex),
            _ => {
                self.problems.push(format!("{at}: exactly one of exact, prefix or regex"));
                None
            }
        }
    }

    fn regex(&mut self, pattern: &str, at: &str) -> Option<Regex> {
        regex(pattern).map_err(|e| self.problems.push(format!("{at}: invalid regular expression: {e}"))).ok()
    }

    fn unsupported(&mut self, set: bool, at: &str, field: &str) {
        if set {
            self.problems.push(format!("{at}.{field}: not supported"));
        }
    }

    fn http_match(&mut self, m: &v::VirtualServiceHttpMatch, at: &str) -> Option<RequestMatch> {
        let before = self.problems.len();
        self.unsupported(m.authority.is_some(), at, "authority");
        self.unsupported(m.scheme.is_some(), at, "scheme");
        self.unsupported(m.port.is_some(), at, "port");
        self.unsupported(m.source_labels.is_some(), at, "sourceLabels");
        self.unsupported(m.source_namespace.is_some(), at, "sourceNamespace");
        self.unsupported(m.without_headers.is_some(), at, "withoutHeaders");
        self.unsupported(m.gateways.is_some(), at, "gateways");
        self.unsupported(m.ignore_uri_case == Some(true), at, "ignoreUriCase");
        let path = match &m.uri {
            None => PathMatch::Prefix("/".into()),
            Some(u) => match (&u.exact, &u.prefix, &u.regex) {
                (Some(e), None, None) => PathMatch::Exact(e.clone()),
                // Istio's prefix is a string prefix (`/api` matches `/apiv2`).
                (None, Some(p), None) => {
                    PathMatch::Regex(self.regex(&format!("{}.*", regex::escape(p)), &format!("{at}.uri"))?)
                }
                (None, None, Some(r)) => PathMatch::Regex(self.regex(r, &format!("{at}.uri.regex"))?),
                _ => {
                    self.problems.push(format!("{at}.uri: exactly one of exact, prefix or regex"));
                    return None;
                }
            },
        };
        let mut headers = Vec::new();
        for (name, h) in m.headers.iter().flatten() {
            let at = format!("{at}.headers[{name}]");
            if let Some(vm) = self.string_match(h.exact.as_ref(), h.prefix.as_ref(), h.regex.as_ref(), &at) {
                headers.push((name.to_ascii_lowercase(), vm));
            }
        }
        let mut query = Vec::new();
        for (name, q) in m.query_params.iter().flatten() {
            let at = format!("{at}.queryParams[{name}]");
            if let Some(vm) = self.string_match(q.exact.as_ref(), q.prefix.as_ref(), q.regex.as_ref(), &at) {
                query.push((name.clone(), vm));
            }
        }
        let method = match &m.method {
            None => None,
            Some(v::VirtualServiceHttpMatchMethod { exact: Some(e), prefix: None, regex: None }) => {
                Some(e.to_ascii_uppercase())
            }
            Some(_) => {
                self.problems.push(format!("{at}.method: only exact is supported"));
                None
            }
        };
        (self.problems.len() == before).then_some(RequestMatch { path, headers, query, method })
    }

    fn headers(
        add: Option<&std::collections::BTreeMap<String, String>>,
        set: Option<&std::collections::BTreeMap<String, String>>,
        remove: Option<&Vec<String>>,
    ) -> Option<HeaderModifier> {
        let pairs = |m: Option<&std::collections::BTreeMap<String, String>>| -> Vec<(String, String)> {
            m.into_iter().flatten().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect()
        };
        let hm = HeaderModifier { set: pairs(set), add: pairs(add), remove: remove.cloned().unwrap_or_default() };
        (hm != HeaderModifier::default()).then_some(hm)
    }

    /// A destination (`host`, `subset`, `port`) as a backend target.
    fn destination(&mut self, host: &str, subset: Option<&String>, port: Option<i64>, at: &str) -> BackendTarget {
        let Some(service) = service_of(host, &self.ns).filter(|s| self.registry.service(s).is_some()) else {
            let why = format!("{at}.host: {host:?} is not a Service of the mesh");
            self.problems.push(why.clone());
            return BackendTarget::Invalid(why);
        };
        let port = match port.map(u16::try_from) {
            None => SAME_PORT,
            Some(Ok(p)) if self.registry.service(&service).is_some_and(|s| s.ports.iter().any(|sp| sp.port == p)) => p,
            Some(_) => {
                let why = format!("{at}.port: Service {service} has no port {}", port.unwrap_or_default());
                self.problems.push(why.clone());
                return BackendTarget::Invalid(why);
            }
        };
        let subset = subset.map(|name| (name, self.subsets.get(&service, name)));
        if let Some((name, None)) = subset {
            let why = format!("{at}.subset: no DestinationRule defines subset {name} of {service}");
            self.problems.push(why.clone());
            return BackendTarget::Invalid(why);
        }
        let subset = subset.and_then(|(_, s)| s);
        let name = match &subset {
            Some(s) => format!("{service}@{}", s.name),
            None => service.to_string(),
        };
        BackendTarget::Service { id: service, port, subset, name: name.into() }
    }

    fn http(&mut self, i: usize, h: &v::VirtualServiceHttp) -> Rule {
        let at = format!("spec.http[{i}]");
        self.unsupported(h.cors_policy.is_some(), &at, "corsPolicy");
        self.unsupported(h.delegate.is_some(), &at, "delegate");
        self.unsupported(h.direct_response.is_some(), &at, "directResponse");
        let matches: Vec<RequestMatch> = h
            .r#match
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(j, m)| self.http_match(m, &format!("{at}.match[{j}]")))
            .collect();
        let mut filters = Filters::default();
        if let Some(hd) = &h.headers {
            filters.request_headers =
                hd.request.as_ref().and_then(|r| Self::headers(r.add.as_ref(), r.set.as_ref(), r.remove.as_ref()));
            filters.response_headers =
                hd.response.as_ref().and_then(|r| Self::headers(r.add.as_ref(), r.set.as_ref(), r.remove.as_ref()));
        }
        if let Some(rw) = &h.rewrite {
            self.unsupported(rw.uri_regex_rewrite.is_some(), &format!("{at}.rewrite"), "uriRegexRewrite");
            // Istio replaces the matched prefix (the whole path for other matches).
            let prefix_matched = h.r#match.iter().flatten().any(|m| m.uri.as_ref().is_some_and(|u| u.prefix.is_some()));
            let path = rw.uri.as_ref().map(|u| {
                if prefix_matched {
                    PathModifier::Prefix(u.clone())
                } else {
                    PathModifier::Full(u.clone())
                }
            });
            filters.rewrite = Some(Rewrite { hostname: rw.authority.clone(), path });
        }
        if let Some(r) = &h.redirect {
            let at = format!("{at}.redirect");
            self.unsupported(r.derive_port.is_some(), &at, "derivePort");
            self.unsupported(r.prefix_rewrite.is_some(), &at, "prefixRewrite");
            let status = r.redirect_code.unwrap_or(301);
            if ![301, 302, 303, 307, 308].contains(&status) {
                self.problems.push(format!("{at}.redirectCode: {status} is not a redirect status"));
            }
            filters.redirect = Some(Redirect {
                scheme: r.scheme.clone(),
                hostname: r.authority.clone(),
                path: r.uri.clone().map(PathModifier::Full),
                port: r.port.and_then(|p| u16::try_from(p).ok()),
                status: u16::try_from(status).unwrap_or(301),
            });
        }
        self.mirrors(h, &at, &mut filters);
        let mut backends = Vec::new();
        let routes = h.route.as_deref().unwrap_or(&[]);
        for (k, r) in routes.iter().enumerate() {
            let at = format!("{at}.route[{k}]");
            let d = &r.destination;
            let target = self.destination(
                &d.host,
                d.subset.as_ref(),
                d.port.as_ref().and_then(|p| p.number),
                &format!("{at}.destination"),
            );
            let weight = r.weight.unwrap_or(if routes.len() == 1 { 100 } else { 0 });
            let mut bf = Filters::default();
            if let Some(hd) = &r.headers {
                bf.request_headers =
                    hd.request.as_ref().and_then(|x| Self::headers(x.add.as_ref(), x.set.as_ref(), x.remove.as_ref()));
                bf.response_headers =
                    hd.response.as_ref().and_then(|x| Self::headers(x.add.as_ref(), x.set.as_ref(), x.remove.as_ref()));
            }
            backends.push(Backend { target, weight: u32::try_from(weight.max(0)).unwrap_or(0), filters: bf });
        }
        if routes.len() > 1 {
            let sum: i64 = routes.iter().map(|r| i64::from(r.weight.unwrap_or(0))).sum();
            if sum != 100 {
                self.problems.push(format!("{at}.route: weights sum to {sum}, not 100"));
            }
        }
        if routes.is_empty() && h.redirect.is_none() {
            self.problems.push(format!("{at}: needs a route or a redirect"));
        }
        let mut timeouts = Timeouts::default();
        if let Some(t) = &h.timeout {
            timeouts.request = self.duration(t, &format!("{at}.timeout")).filter(|d| !d.is_zero());
        }
        let retry = self.retries(h.retries.as_ref(), &at, &mut timeouts);
        let fault = h.fault.as_ref().and_then(|f| self.fault(f, &format!("{at}.fault")));
        Rule {
            route_name: self.route.to_string().into(),
            route: self.route.clone(),
            index: i,
            matches,
            filters,
            backends,
            timeouts,
            retry,
            fault,
        }
    }

    fn duration(&mut self, s: &str, at: &str) -> Option<Duration> {
        let d = parse_duration(s);
        if d.is_none() {
            self.problems.push(format!("{at}: {s:?} is not a duration like 500ms, 7s or 1m"));
        }
        d
    }

    fn mirrors(&mut self, h: &v::VirtualServiceHttp, at: &str, filters: &mut Filters) {
        if let Some(m) = &h.mirror {
            let target = self.destination(
                &m.host,
                m.subset.as_ref(),
                m.port.as_ref().and_then(|p| p.number),
                &format!("{at}.mirror"),
            );
            #[allow(clippy::cast_precision_loss, reason = "a percentage")]
            let share = h.mirror_percentage.as_ref().and_then(|p| p.value).or(h.mirror_percent.map(|p| p as f64));
            let per_million = per_million(share, &format!("{at}.mirrorPercentage.value"), &mut self.problems);
            filters.mirrors.push(Mirror { target, per_million });
        }
        for (k, m) in h.mirrors.iter().flatten().enumerate() {
            let at = format!("{at}.mirrors[{k}]");
            let d = &m.destination;
            let target = self.destination(
                &d.host,
                d.subset.as_ref(),
                d.port.as_ref().and_then(|p| p.number),
                &format!("{at}.destination"),
            );
            let per_million = per_million(
                m.percentage.as_ref().and_then(|p| p.value),
                &format!("{at}.percentage.value"),
                &mut self.problems,
            );
            filters.mirrors.push(Mirror { target, per_million });
        }
    }

    fn retries(
        &mut self,
        r: Option<&v::VirtualServiceHttpRetries>,
        at: &str,
        timeouts: &mut Timeouts,
    ) -> Option<RetryPolicy> {
        let policy = |attempts: u32, codes: Vec<u16>, grpc_codes: Vec<u32>| RetryPolicy {
            attempts,
            codes,
            grpc_codes,
            backoff: Duration::from_millis(25),
            non_idempotent: false,
            budget: Arc::new(Budget::default()),
        };
        // Istio's default: two retries on connect failures, resets, 503.
        let Some(r) = r else { return Some(policy(2, vec![503], vec![1, 14])) };
        let at = format!("{at}.retries");
        self.unsupported(r.retry_remote_localities.is_some(), &at, "retryRemoteLocalities");
        let attempts = r.attempts.unwrap_or(2);
        if !(0..=10).contains(&attempts) {
            self.problems.push(format!("{at}.attempts: {attempts} is not within 0-10"));
        }
        if let Some(t) = &r.per_try_timeout {
            timeouts.backend_request = self.duration(t, &format!("{at}.perTryTimeout"));
        }
        let mut codes = Vec::new();
        let mut grpc_codes = Vec::new();
        for token in r
            .retry_on
            .as_deref()
            .unwrap_or("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes")
            .split(',')
        {
            match token.trim() {
                "5xx" => codes.extend(500..=599),
                "gateway-error" => codes.extend([502, 503, 504]),
                "retriable-status-codes" => codes.push(503),
                "retriable-4xx" => codes.push(409),
                "cancelled" => grpc_codes.push(1),
                "deadline-exceeded" => grpc_codes.push(4),
                "resource-exhausted" => grpc_codes.push(8),
                "internal" => grpc_codes.push(13),
                "unavailable" => grpc_codes.push(14),
                // Connection failures and resets before a response are always retried.
                "connect-failure" | "refused-stream" | "reset" | "" => {}
                t if t.parse::<u16>().is_ok_and(|c| (400..=599).contains(&c)) => codes.extend(t.parse::<u16>()),
                t => self.problems.push(format!("{at}.retryOn: {t:?} is not supported")),
            }
        }
        codes.sort_unstable();
        codes.dedup();
        grpc_codes.sort_unstable();
        grpc_codes.dedup();
        let mut p = policy(u32::try_from(attempts.clamp(0, 10)).unwrap_or(0), codes, grpc_codes);
        if let Some(b) = &r.backoff {
            p.backoff = self.duration(b, &format!("{at}.backoff")).unwrap_or(p.backoff);
        }
        (attempts > 0).then_some(p)
    }

    fn fault(&mut self, f: &v::VirtualServiceHttpFault, at: &str) -> Option<Fault> {
        let mut fault = Fault::default();
        if let Some(d) = &f.delay {
            let at = format!("{at}.delay");
            self.unsupported(d.exponential_delay.is_some(), &at, "exponentialDelay");
            if d.fixed_delay.is_none() {
                self.problems.push(format!("{at}.fixedDelay: required"));
            }
            let delay = d.fixed_delay.as_ref().and_then(|s| self.duration(s, &format!("{at}.fixedDelay")));
            let share = d.percentage.as_ref().and_then(|p| p.value).or(d.percent.map(f64::from));
            let share = per_million(share, &format!("{at}.percentage.value"), &mut self.problems);
            fault.delay = delay.map(|d| (d, share));
        }
        if let Some(a) = &f.abort {
            let at = format!("{at}.abort");
            self.unsupported(a.http2_error.is_some(), &at, "http2Error");
            let abort = match (a.http_status, &a.grpc_status) {
                (Some(s), None) if (200..=599).contains(&s) => Some(Abort::Http(u16::try_from(s).unwrap_or(503))),
                (None, Some(g)) => {
                    let code = grpc_code(g).map(Abort::Grpc);
                    if code.is_none() {
                        self.problems.push(format!("{at}.grpcStatus: {g:?} is not a gRPC status name"));
                    }
                    code
                }
                _ => {
                    self.problems.push(format!("{at}: needs exactly one of httpStatus (200-599) or grpcStatus"));
                    None
                }
            };
            let share = per_million(
                a.percentage.as_ref().and_then(|p| p.value),
                &format!("{at}.percentage.value"),
                &mut self.problems,
            );
            fault.abort = abort.map(|a| (a, share));
        }
        (fault != Fault::default()).then_some(fault)
    }
}

/// gRPC status codes by name (Istio writes `UNAVAILABLE`, ...).
fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.iter().position(|n| *n == name).and_then(|i| u32::try_from(i).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::waypoint::routes::{matching::RequestFacts, RouteSet, Source};

    const BOOKINFO: &str = r#"
namespaces: [{name: default, useWaypoint: waypoint}]
waypoints: [{name: waypoint, namespace: default}]
workloads:
  - {name: wp, namespace: default, node: n1, ips: ["10.0.0.9"], enrolled: false, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
  - {name: productpage-v1, namespace: default, node: n1, ips: ["10.0.0.1"], enrolled: false, labels: {app: productpage, version: v1}}
  - {name: reviews-v1, namespace: default, node: n1, ips: ["10.0.0.2"], enrolled: false, labels: {app: reviews, version: v1}}
  - {name: reviews-v2, namespace: default, node: n1, ips: ["10.0.0.3"], enrolled: false, labels: {app: reviews, version: v2}}
  - {name: reviews-v3, namespace: default, node: n1, ips: ["10.0.0.4"], enrolled: false, labels: {app: reviews, version: v3}}
  - {name: ratings-v1, namespace: default, node: n1, ips: ["10.0.0.5"], enrolled: false, labels: {app: ratings, version: v1}}
  - {name: details-v1, namespace: default, node: n1, ips: ["10.0.0.6"], enrolled: false, labels: {app: details, version: v1}}
services:
  - {name: productpage, namespace: default, vip: 10.96.1.1, ports: [{port: 9080}], selector: {app: productpage}}
  - {name: reviews, namespace: default, vip: 10.96.1.2, ports: [{port: 9080}], selector: {app: reviews}}
  - {name: ratings, namespace: default, vip: 10.96.1.3, ports: [{port: 9080}], selector: {app: ratings}}
  - {name: details, namespace: default, vip: 10.96.1.4, ports: [{port: 9080}], selector: {app: details}}
"#;

    fn bookinfo(files: &[(&str, &str)]) -> RouteSet {
        let reg = Registry::from_config(&crate::config::parse(std::path::Path::new("c.yaml"), BOOKINFO).unwrap());
        let wp = ObjectRef { namespace: "default".into(), name: "waypoint".into() };
        let sources: Vec<Source> = files.iter().map(|(f, t)| Source { file: (*f).into(), text: (*t).into() }).collect();
        RouteSet::build(&sources, &reg, &wp, crate::policy::DEFAULT_ROOT_NAMESPACE)
    }

    const DR_ALL: &str = include_str!("../../../../tests/assets/bookinfo/destination-rule-all.yaml");
    const VS_ALL_V1: &str = include_str!("../../../../tests/assets/bookinfo/virtual-service-all-v1.yaml");
    const VS_90_10: &str = include_str!("../../../../tests/assets/bookinfo/virtual-service-reviews-90-10.yaml");
    const VS_DELAY: &str = include_str!("../../../../tests/assets/bookinfo/virtual-service-ratings-test-delay.yaml");
    const VS_ABORT: &str = include_str!("../../../../tests/assets/bookinfo/virtual-service-ratings-test-abort.yaml");

    fn find(set: &RouteSet, service: &str, headers: &[(&'static str, &'static str)]) -> Arc<Rule> {
        let mut hdr = hyper::HeaderMap::new();
        for (k, v) in headers {
            hdr.insert(*k, hyper::header::HeaderValue::from_static(v));
        }
        let svc = ObjectRef { namespace: "default".into(), name: service.into() };
        let facts = RequestFacts {
            service: &svc,
            port: 9080,
            client_namespace: Some("default"),
            method: "GET",
            path: "/ratings/0",
            query: None,
            headers: &hdr,
            grpc: false,
        };
        set.table.find(&facts).expect("a VirtualService rule matches").rule
    }

    #[test]
    fn bookinfo_traffic_files_compile_unchanged() {
        let set = bookinfo(&[("dr.yaml", DR_ALL), ("vs.yaml", VS_ALL_V1)]);
        for s in set.statuses() {
            assert!(s.accepted && s.problems.is_empty(), "{s:?}");
        }
        assert_eq!(set.statuses().len(), 8);
        let reviews = find(&set, "reviews", &[]);
        let BackendTarget::Service { subset: Some(subset), name, port, .. } = &reviews.backends[0].target else {
            panic!("{reviews:?}")
        };
        assert_eq!(
            (subset.labels.get("version").map(String::as_str), &**name, *port),
            (Some("v1"), "default/reviews@v1", SAME_PORT)
        );
        let retry = reviews.retry.as_ref().expect("Istio's default retry policy");
        assert_eq!((retry.attempts, retry.codes.as_slice()), (2, &[503][..]));

        let set = bookinfo(&[("dr.yaml", DR_ALL), ("vs.yaml", VS_ALL_V1), ("canary.yaml", VS_90_10)]);
        let reviews = find(&set, "reviews", &[]);
        let weights: Vec<u32> = reviews.backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [90, 10], "the later document of virtualservice/default/reviews is the object");
        let old = set.statuses().iter().find(|s| s.source == "vs.yaml#2").expect("the replaced document");
        assert!(!old.accepted && old.notes[0].contains("replaced by the same object in canary.yaml#1"), "{old:?}");
    }

    #[test]
    fn the_ratings_delay_and_abort_tests_inject_only_for_jason() {
        let set = bookinfo(&[("dr.yaml", DR_ALL), ("delay.yaml", VS_DELAY)]);
        let jason = find(&set, "ratings", &[("end-user", "jason")]);
        let fault = jason.fault.clone().expect("fault for jason");
        assert_eq!(fault.delay, Some((Duration::from_secs(7), 1_000_000)));
        assert!(find(&set, "ratings", &[("end-user", "bob")]).fault.is_none());
        let set = bookinfo(&[("dr.yaml", DR_ALL), ("abort.yaml", VS_ABORT)]);
        let fault = find(&set, "ratings", &[("end-user", "jason")]).fault.clone().expect("abort for jason");
        assert_eq!(fault.abort, Some((Abort::Http(500), 1_000_000)));
    }

    #[test]
    fn a_bad_virtual_service_is_rejected_naming_every_problem() {
        let bad = VS_90_10
            .replace("weight: 10", "weight: 5")
            .replace("subset: v2", "subset: v9")
            .replace("  http:", "  tcp: [{route: [{destination: {host: reviews}}]}]\n  http:");
        let bad = format!("{bad}    fault: {{abort: {{httpStatus: 503, percentage: {{value: 120}}}}}}\n    match: [{{uri: {{regex: \"(\"}}}}]\n");
        let set = bookinfo(&[("dr.yaml", DR_ALL), ("bad.yaml", &bad)]);
        let s = set.statuses().iter().find(|s| s.route == "virtualservice/default/reviews").expect("status");
        assert!(!s.accepted, "{s:?}");
        let all = s.problems.join("\n");
        for want in [
            "spec.http[0].route: weights sum to 95, not 100",
            "spec.http[0].route[1].destination.subset: no DestinationRule defines subset v9 of default/reviews",
            "spec.tcp/spec.tls: not supported",
            "spec.http[0].fault.abort.percentage.value: 120 is not a percentage within 0-100",
            "spec.http[0].match[0].uri.regex: invalid regular expression",
        ] {
            assert!(all.contains(want), "{want:?} in {all}");
        }
        let svc = ObjectRef { namespace: "default".into(), name: "reviews".into() };
        assert!(!set.table.has_routes(&svc), "nothing applied");
    }

    #[test]
    fn traffic_policies_heddle_does_not_apply_are_named_in_notes() {
        let dr = DR_ALL.replace(
            "  host: reviews\n",
            "  host: reviews\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 3}\n    tls: {mode: ISTIO_MUTUAL}\n",
        );
        let set = bookinfo(&[("dr.yaml", &dr)]);
        let s = set.statuses().iter().find(|s| s.route == "destinationrule/default/reviews").expect("status");
        assert!(s.accepted, "{s:?}");
        let notes = s.notes.join("\n");
        assert!(notes.contains("spec.trafficPolicy.tls: ignored"), "{notes}");
        assert!(!notes.contains("outlierDetection"), "outlier detection is applied: {notes}");
        let reviews = ObjectRef { namespace: "default".into(), name: "reviews".into() };
        let cfg = set.destinations.service_policy(&reviews).and_then(|p| p.outlier).expect("outlier detection");
        assert_eq!(
            (cfg.consecutive_5xx, cfg.base_ejection, cfg.max_ejection_percent),
            (Some(3), Duration::from_secs(30), 10)
        );
        let v1 = set.destinations.get(&reviews, "v1").expect("subset v1");
        assert!(v1.policy.as_ref().is_some_and(|p| p.outlier == Some(cfg)), "a subset inherits the rule's policy");
    }

    #[test]
    fn istio_durations_and_hosts_are_read() {
        assert_eq!(parse_duration("7s"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("soon"), None);
        let id = |ns: &str, n: &str| Some(ObjectRef { namespace: ns.into(), name: n.into() });
        assert_eq!(service_of("reviews", "bookinfo"), id("bookinfo", "reviews"));
        assert_eq!(service_of("reviews.other", "bookinfo"), id("other", "reviews"));
        assert_eq!(service_of("reviews.other.svc.cluster.local", "bookinfo"), id("other", "reviews"));
        assert_eq!(service_of("*.bookinfo", "bookinfo"), None);
        assert_eq!(grpc_code("UNAVAILABLE"), Some(14));
    }
}
