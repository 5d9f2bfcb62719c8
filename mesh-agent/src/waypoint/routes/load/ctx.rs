//! The field-by-field compilation of one route: matches, filters,
//! backendRefs, timeouts and parentRefs, each problem named by its field
//! path (`spec.rules[0].filters[1]: ...`).

use std::time::Duration;

use hyper::header::HeaderName;
use regex::{Regex, RegexBuilder};

use super::{
    super::{
        gateway_api::experimental::HttpRouteRulesRetry,
        gateway_api::{grpcroutes as g, httproutes as h},
        matching::Attachment,
        model::{
            Backend, BackendTarget, Filters, HeaderModifier, Mirror, PathMatch, PathModifier, Redirect, RequestMatch,
            RetryPolicy, Rewrite, RouteKind, RouteRef, Rule, Timeouts, ValueMatch,
        },
        Condition, ParentStatus, RouteStatus,
    },
    reshape, Compiled, Env,
};
use crate::registry::{ObjectRef, Registry};
use crate::waypoint::{retry::Budget, routes::grants::Grants};

/// Retries when `retry.attempts` is not given (Envoy's and Istio's default).
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// gRPC `UNAVAILABLE`, retried whenever a rule retries.
pub const GRPC_UNAVAILABLE: u32 = 14;
/// Most retries a rule may ask for: more only multiplies an outage.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;
/// Backoff when `retry.backoff` is not given (Envoy's base interval).
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Largest compiled regular expression (bytes), so a hostile pattern
/// cannot take the waypoint's memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// What a document compiles against, and what it found.
pub(super) struct Ctx<'a> {
    registry: &'a Registry,
    waypoint: &'a ObjectRef,
    grants: &'a Grants,
    route: RouteRef,
    pub(super) problems: Vec<String>,
    pub(super) notes: Vec<String>,
    /// Unresolved backends: (Gateway API reason, message), for `ResolvedRefs`.
    unresolved: Vec<(&'static str, String)>,
}

fn regex(pattern: &str) -> Result<Regex, regex::Error> {
    // Gateway API regular expressions match the whole value.
    RegexBuilder::new(&format!("^(?:{pattern})$")).size_limit(REGEX_SIZE_LIMIT).build()
}

/// A Gateway API duration (GEP-2257: `1h`, `500ms`, `1m30s`; at most four
/// units, each at most five digits).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    let mut units = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(n), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(n * 3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(n * 60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(n), 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total += unit;
        units += 1;
    }
    (units > 0 && units <= 4).then_some(total)
}

impl<'a> Ctx<'a> {
    pub(super) fn new(env: &Env<'a>, kind: RouteKind, id: ObjectRef, unknown: Vec<String>) -> Self {
        let problems = unknown
            .into_iter()
            .map(|p| format!("{p}: unknown field (not in the Gateway API types Heddle reads)"))
            .collect();
        Self {
            registry: env.registry,
            waypoint: env.waypoint,
            grants: env.grants,
            route: RouteRef { kind, id },
            problems,
            notes: Vec::new(),
            unresolved: Vec::new(),
        }
    }

    fn value_match(&mut self, kind: Option<&str>, value: &str, at: &str) -> Option<ValueMatch> {
        match kind.unwrap_or("Exact") {
            "Exact" => Some(ValueMatch::Exact(value.to_owned())),
            "RegularExpression" => match regex(value) {
                Ok(re) => Some(ValueMatch::Regex(re)),
                Err(e) => {
                    self.problems.push(format!("{at}.value: invalid regular expression: {e}"));
                    None
                }
            },
            other => {
                self.problems.push(format!("{at}.type: {other} is not supported"));
                None
            }
        }
    }

    fn header_name(&mut self, name: &str, at: &str) -> Option<String> {
        if let Ok(h) = HeaderName::try_from(name.to_ascii_lowercase()) {
            Some(h.as_str().to_owned())
        } else {
            self.problems.push(format!("{at}.name: {name:?} is not a valid header name"));
            None
        }
    }

    pub(super) fn http_match(&mut self, m: &h::HttpRouteRulesMatches, at: &str) -> Option<RequestMatch> {
        let before = self.problems.len();
        let path = match &m.path {
            None => PathMatch::Prefix("/".into()),
            Some(p) => {
                let value = p.value.clone().unwrap_or_else(|| "/".into());
                match p.r#type {
                    Some(h::HttpRouteRulesMatchesPathType::Exact) => PathMatch::Exact(value),
                    Some(h::HttpRouteRulesMatchesPathType::RegularExpression) => match regex(&value) {
                        Ok(re) => PathMatch::Regex(re),
                        Err(e) => {
                            self.problems.push(format!("{at}.path.value: invalid regular expression: {e}"));
                            return None;
                        }
                    },
                    Some(h::HttpRouteRulesMatchesPathType::PathPrefix) | None => {
                        if !value.starts_with('/') {
                            self.problems.push(format!("{at}.path.value: {value:?} must start with /"));
                        }
                        let trimmed = value.trim_end_matches('/');
                        PathMatch::Prefix(if trimmed.is_empty() { "/".into() } else { trimmed.into() })
                    }
                }
            }
        };
        let mut headers = Vec::new();
        for (k, hm) in m.headers.iter().flatten().enumerate() {
            let at = format!("{at}.headers[{k}]");
            let kind = hm.r#type.as_ref().map(|t| match t {
                h::HttpRouteRulesMatchesHeadersType::Exact => "Exact",
                h::HttpRouteRulesMatchesHeadersType::RegularExpression => "RegularExpression",
            });
            if let (Some(name), Some(v)) = (self.header_name(&hm.name, &at), self.value_match(kind, &hm.value, &at)) {
                headers.push((name, v));
            }
        }
        let mut query = Vec::new();
        for (k, q) in m.query_params.iter().flatten().enumerate() {
            let at = format!("{at}.queryParams[{k}]");
            let kind = q.r#type.as_ref().map(|t| match t {
                h::HttpRouteRulesMatchesQueryParamsType::Exact => "Exact",
                h::HttpRouteRulesMatchesQueryParamsType::RegularExpression => "RegularExpression",
            });
            if let Some(v) = self.value_match(kind, &q.value, &at) {
                query.push((q.name.clone(), v));
            }
        }
        let method =
            m.method.as_ref().and_then(|x| serde_json::to_value(x).ok().and_then(|v| v.as_str().map(str::to_owned)));
        (self.problems.len() == before).then_some(RequestMatch { path, headers, query, method })
    }

    pub(super) fn grpc_match(&mut self, m: &g::GrpcRouteRulesMatches, at: &str) -> Option<RequestMatch> {
        let before = self.problems.len();
        let regex_type = m
            .method
            .as_ref()
            .is_some_and(|x| matches!(x.r#type, Some(g::GrpcRouteRulesMatchesMethodType::RegularExpression)));
        let path = match m.method.as_ref().map(|x| (x.service.as_deref(), x.method.as_deref())) {
            None | Some((None, None)) => PathMatch::Prefix("/".into()),
            Some((svc, method)) if regex_type => {
                let pattern = format!("/{}/{}", svc.unwrap_or("[^/]+"), method.unwrap_or("[^/]+"));
                match regex(&pattern) {
                    Ok(re) => PathMatch::Regex(re),
                    Err(e) => {
                        self.problems.push(format!("{at}.method: invalid regular expression: {e}"));
                        return None;
                    }
                }
            }
            Some((Some(svc), Some(method))) => PathMatch::Exact(format!("/{svc}/{method}")),
            Some((Some(svc), None)) => PathMatch::Prefix(format!("/{svc}")),
            Some((None, Some(method))) => {
                PathMatch::Regex(regex(&format!("/[^/]+/{}", regex::escape(method))).expect("escaped pattern"))
            }
        };
        let mut headers = Vec::new();
        for (k, hm) in m.headers.iter().flatten().enumerate() {
            let at = format!("{at}.headers[{k}]");
            let kind = hm.r#type.as_ref().map(|t| match t {
                g::GrpcRouteRulesMatchesHeadersType::Exact => "Exact",
                g::GrpcRouteRulesMatchesHeadersType::RegularExpression => "RegularExpression",
            });
            if let (Some(name), Some(v)) = (self.header_name(&hm.name, &at), self.value_match(kind, &hm.value, &at)) {
                headers.push((name, v));
            }
        }
        (self.problems.len() == before).then_some(RequestMatch {
            path,
            headers,
            query: Vec::new(),
            method: Some("POST".into()),
        })
    }

    fn header_modifier<A, S>(
        &mut self,
        add: Option<&[A]>,
        set: Option<&[S]>,
        remove: Option<&[String]>,
        at: &str,
    ) -> HeaderModifier
    where
        A: serde::Serialize,
        S: serde::Serialize,
    {
        let pairs = |this: &mut Self, list: Option<Vec<serde_json::Value>>, field: &str| -> Vec<(String, String)> {
            list.unwrap_or_default()
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    let name = v.get("name")?.as_str()?.to_owned();
                    let value = v.get("value")?.as_str()?.to_owned();
                    let name = this.header_name(&name, &format!("{at}.{field}[{i}]"))?;
                    if hyper::header::HeaderValue::try_from(value.as_str()).is_err() {
                        this.problems.push(format!("{at}.{field}[{i}].value: not a valid header value"));
                        return None;
                    }
                    Some((name, value))
                })
                .collect()
        };
        let to_json = |l: Option<&[A]>| l.map(|l| l.iter().filter_map(|x| serde_json::to_value(x).ok()).collect());
        let to_json_s = |l: Option<&[S]>| l.map(|l| l.iter().filter_map(|x| serde_json::to_value(x).ok()).collect());
        let add = pairs(self, to_json(add), "add");
        let set = pairs(self, to_json_s(set), "set");
        let remove = remove.unwrap_or_default().iter().map(|r| r.to_ascii_lowercase()).collect();
        HeaderModifier { set, add, remove }
    }

    fn path_modifier(
        &mut self,
        kind: &str,
        full: Option<&String>,
        prefix: Option<&String>,
        matches: &[RequestMatch],
        at: &str,
    ) -> Option<PathModifier> {
        if kind == "ReplaceFullPath" {
            Some(PathModifier::Full(full.cloned().unwrap_or_else(|| "/".into())))
        } else {
            if matches.is_empty() || matches.iter().any(|m| !matches!(m.path, PathMatch::Prefix(_))) {
                self.problems
                    .push(format!("{at}: ReplacePrefixMatch needs every match of the rule to be a PathPrefix match"));
                return None;
            }
            Some(PathModifier::Prefix(prefix.cloned().unwrap_or_default()))
        }
    }

    pub(super) fn filters(&mut self, list: &[h::HttpRouteRulesFilters], matches: &[RequestMatch], at: &str) -> Filters {
        let mut out = Filters::default();
        for (i, f) in list.iter().enumerate() {
            let at = format!("{at}.filters[{i}]");
            match f.r#type {
                h::HttpRouteRulesFiltersType::RequestHeaderModifier => {
                    if let Some(m) = &f.request_header_modifier {
                        out.request_headers = Some(self.header_modifier(
                            m.add.as_deref(),
                            m.set.as_deref(),
                            m.remove.as_deref(),
                            &format!("{at}.requestHeaderModifier"),
                        ));
                    }
                }
                h::HttpRouteRulesFiltersType::ResponseHeaderModifier => {
                    if let Some(m) = &f.response_header_modifier {
                        out.response_headers = Some(self.header_modifier(
                            m.add.as_deref(),
                            m.set.as_deref(),
                            m.remove.as_deref(),
                            &format!("{at}.responseHeaderModifier"),
                        ));
                    }
                }
                h::HttpRouteRulesFiltersType::RequestRedirect => {
                    let Some(r) = &f.request_redirect else {
                        continue;
                    };
                    let status = r.status_code.unwrap_or(302);
                    if ![301, 302, 303, 307, 308].contains(&status) {
                        self.problems
                            .push(format!("{at}.requestRedirect.statusCode: {status} is not a redirect status"));
                    }
                    let path = r.path.as_ref().and_then(|p| {
                        let kind = match p.r#type {
                            h::HttpRouteRulesFiltersRequestRedirectPathType::ReplaceFullPath => "ReplaceFullPath",
                            h::HttpRouteRulesFiltersRequestRedirectPathType::ReplacePrefixMatch => "ReplacePrefixMatch",
                        };
                        self.path_modifier(
                            kind,
                            p.replace_full_path.as_ref(),
                            p.replace_prefix_match.as_ref(),
                            matches,
                            &format!("{at}.requestRedirect.path"),
                        )
                    });
                    out.redirect = Some(Redirect {
                        scheme: r.scheme.as_ref().map(|s| match s {
                            h::HttpRouteRulesFiltersRequestRedirectScheme::Http => "http".into(),
                            h::HttpRouteRulesFiltersRequestRedirectScheme::Https => "https".into(),
                        }),
                        hostname: r.hostname.clone(),
                        path,
                        port: r.port.and_then(|p| u16::try_from(p).ok()),
                        status: u16::try_from(status).unwrap_or(302),
                    });
                }
                h::HttpRouteRulesFiltersType::UrlRewrite => {
                    let Some(r) = &f.url_rewrite else { continue };
                    let path = r.path.as_ref().and_then(|p| {
                        let kind = match p.r#type {
                            h::HttpRouteRulesFiltersUrlRewritePathType::ReplaceFullPath => "ReplaceFullPath",
                            h::HttpRouteRulesFiltersUrlRewritePathType::ReplacePrefixMatch => "ReplacePrefixMatch",
                        };
                        self.path_modifier(
                            kind,
                            p.replace_full_path.as_ref(),
                            p.replace_prefix_match.as_ref(),
                            matches,
                            &format!("{at}.urlRewrite.path"),
                        )
                    });
                    out.rewrite = Some(Rewrite { hostname: r.hostname.clone(), path });
                }
                h::HttpRouteRulesFiltersType::RequestMirror => {
                    if let Some(m) = &f.request_mirror {
                        let m = self.mirror(m, &format!("{at}.requestMirror"));
                        out.mirrors.extend(m);
                    }
                }
                h::HttpRouteRulesFiltersType::ExtensionRef => {
                    self.problems.push(format!("{at}: filter type ExtensionRef is not supported"));
                }
                h::HttpRouteRulesFiltersType::Cors => {
                    self.problems.push(format!("{at}: filter type CORS is not supported"));
                }
            }
        }
        if out.redirect.is_some() && out.rewrite.is_some() {
            self.problems.push(format!("{at}.filters: RequestRedirect and URLRewrite cannot be combined"));
        }
        out
    }

    pub(super) fn backends(
        &mut self,
        refs: &[h::HttpRouteRulesBackendRefs],
        matches: &[RequestMatch],
        at: &str,
    ) -> Vec<Backend> {
        let mut out = Vec::new();
        for (i, b) in refs.iter().enumerate() {
            let at = format!("{at}.backendRefs[{i}]");
            let weight = u32::try_from(b.weight.unwrap_or(1).max(0)).unwrap_or(0);
            let port = b.port.and_then(|p| u16::try_from(p).ok());
            let target =
                self.service_ref(b.group.as_deref(), b.kind.as_deref(), b.namespace.as_ref(), &b.name, port, &at);
            let filters: Vec<h::HttpRouteRulesFilters> =
                b.filters.iter().flatten().filter_map(|f| reshape(f).ok()).collect();
            let filters = self.filters(&filters, matches, &at);
            out.push(Backend { target, weight, filters });
        }
        out
    }

    /// Resolves a reference to a Service port (a backendRef or a mirror's),
    /// recording why it does not resolve for `ResolvedRefs`.
    fn service_ref(
        &mut self,
        group: Option<&str>,
        kind: Option<&str>,
        namespace: Option<&String>,
        name: &str,
        port: Option<u16>,
        at: &str,
    ) -> BackendTarget {
        let group = group.unwrap_or("");
        let kind = kind.unwrap_or("Service");
        let ns = namespace.cloned().unwrap_or_else(|| self.route.id.namespace.clone());
        let id = ObjectRef { namespace: ns, name: name.to_owned() };
        let (reason, why) = if !(group.is_empty() || group == "core") || kind != "Service" {
            ("InvalidKind", format!("{at}: backend kind {group}/{kind} is not supported (only Services)"))
        } else if !self.grants.permits(self.route.kind, &self.route.id.namespace, &id) {
            (
                "RefNotPermitted",
                format!(
                    "{at}: backend Service {id} is in another namespace and no ReferenceGrant in {} permits it",
                    id.namespace
                ),
            )
        } else {
            match (self.registry.service(&id), port) {
                (None, _) => ("BackendNotFound", format!("{at}: backend Service {id} does not exist")),
                (Some(_), None) => ("UnsupportedValue", format!("{at}.port: a Service backend needs a port")),
                (Some(svc), Some(port)) if !svc.ports.iter().any(|p| p.port == port) => {
                    ("BackendNotFound", format!("{at}.port: Service {id} has no port {port}"))
                }
                (Some(_), Some(port)) => {
                    return BackendTarget::Service { name: id.to_string().into(), id, port, subset: None }
                }
            }
        };
        self.unresolved.push((reason, why.clone()));
        BackendTarget::Invalid(why)
    }

    fn mirror(&mut self, m: &h::HttpRouteRulesFiltersRequestMirror, at: &str) -> Option<Mirror> {
        let b = &m.backend_ref;
        let port = b.port.and_then(|p| u16::try_from(p).ok());
        let target = self.service_ref(
            b.group.as_deref(),
            b.kind.as_deref(),
            b.namespace.as_ref(),
            &b.name,
            port,
            &format!("{at}.backendRef"),
        );
        let per_million = match (m.percent, &m.fraction) {
            (Some(_), Some(_)) => {
                self.problems.push(format!("{at}: percent and fraction cannot both be set"));
                return None;
            }
            (Some(p), None) if (0..=100).contains(&p) => p.unsigned_abs() * 10_000,
            (Some(p), None) => {
                self.problems.push(format!("{at}.percent: {p} is not within 0-100"));
                return None;
            }
            (None, Some(f)) => {
                let d = f.denominator.unwrap_or(100);
                if d <= 0 || f.numerator < 0 || f.numerator > d {
                    self.problems.push(format!(
                        "{at}.fraction: {}/{d} is not a fraction within 0-1 with a positive denominator",
                        f.numerator
                    ));
                    return None;
                }
                u32::try_from(i64::from(f.numerator) * 1_000_000 / i64::from(d)).unwrap_or(1_000_000)
            }
            (None, None) => 1_000_000,
        };
        Some(Mirror { target, per_million })
    }

    /// `retry` (experimental, GEP-1731), given as the raw value taken out of
    /// the rule before the standard types read it.
    pub(super) fn retry(
        &mut self,
        raw: Option<serde_yaml_ng::Value>,
        non_idempotent: bool,
        at: &str,
    ) -> Option<RetryPolicy> {
        let raw = raw?;
        let at = format!("{at}.retry");
        let r: HttpRouteRulesRetry = match super::parse(raw) {
            Ok((r, unknown)) => {
                for u in unknown {
                    self.problems.push(format!("{at}.{u}: unknown field (not in GEP-1731's retry)"));
                }
                r
            }
            Err(e) => {
                self.problems.push(format!("{at}: {e}"));
                return None;
            }
        };
        let before = self.problems.len();
        let attempts = r.attempts.unwrap_or(i64::from(DEFAULT_RETRY_ATTEMPTS));
        if !(0..=i64::from(MAX_RETRY_ATTEMPTS)).contains(&attempts) {
            self.problems.push(format!("{at}.attempts: {attempts} is not within 0-{MAX_RETRY_ATTEMPTS}"));
        }
        let mut codes = Vec::new();
        for (i, c) in r.codes.iter().flatten().enumerate() {
            match u16::try_from(*c) {
                Ok(c) if (400..=599).contains(&c) => codes.push(c),
                _ => self.problems.push(format!("{at}.codes[{i}]: {c} is not an HTTP status within 400-599")),
            }
        }
        let backoff = match r.backoff.as_deref().map(|b| (b, parse_duration(b))) {
            None => DEFAULT_RETRY_BACKOFF,
            Some((_, Some(d))) => d,
            Some((b, None)) => {
                self.problems.push(format!("{at}.backoff: {b:?} is not a duration like 25ms or 1s"));
                DEFAULT_RETRY_BACKOFF
            }
        };
        (self.problems.len() == before).then(|| RetryPolicy {
            attempts: u32::try_from(attempts).unwrap_or(0),
            codes,
            grpc_codes: vec![GRPC_UNAVAILABLE],
            backoff,
            non_idempotent,
            budget: std::sync::Arc::new(Budget::default()),
        })
    }

    pub(super) fn timeouts(&mut self, t: Option<&h::HttpRouteRulesTimeouts>, at: &str) -> Timeouts {
        let Some(t) = t else {
            return Timeouts::default();
        };
        let mut parse = |v: Option<&String>, field: &str| {
            let v = v?;
            let d = parse_duration(v);
            if d.is_none() {
                self.problems.push(format!("{at}.timeouts.{field}: {v:?} is not a duration like 500ms, 10s or 1m30s"));
            }
            // Zero disables the timeout (Gateway API).
            d.filter(|d| !d.is_zero())
        };
        let request = parse(t.request.as_ref(), "request");
        let backend_request = parse(t.backend_request.as_ref(), "backendRequest");
        if let (Some(r), Some(b)) = (request, backend_request) {
            if b > r {
                self.problems.push(format!("{at}.timeouts.backendRequest: must not exceed timeouts.request"));
            }
        }
        Timeouts { request, backend_request }
    }

    pub(super) fn rule(
        &self,
        index: usize,
        matches: Vec<RequestMatch>,
        filters: Filters,
        backends: Vec<Backend>,
        timeouts: Timeouts,
        retry: Option<RetryPolicy>,
    ) -> Rule {
        Rule {
            route_name: self.route.to_string().into(),
            route: self.route.clone(),
            index,
            matches,
            filters,
            backends,
            timeouts,
            retry,
            fault: None,
        }
    }

    /// Attaches `rules` to the parents this waypoint owns and builds the status.
    pub(super) fn finish(
        self,
        parents: &[h::HttpRouteParentRefs],
        rules: &[Rule],
        created: &str,
        origin: &str,
    ) -> Compiled {
        let mut statuses = Vec::new();
        let mut attachments = Vec::new();
        let valid = self.problems.is_empty();
        for (i, p) in parents.iter().enumerate() {
            let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
            let kind = p.kind.as_deref().unwrap_or("Gateway");
            let ns = p.namespace.clone().unwrap_or_else(|| self.route.id.namespace.clone());
            let id = ObjectRef { namespace: ns, name: p.name.clone() };
            let port = p.port.and_then(|x| u16::try_from(x).ok());
            let mut status = ParentStatus { parent: id.to_string(), port, attached: false, conditions: Vec::new() };
            if !(group.is_empty() || group == "core") || kind != "Service" {
                status.conditions.push(Condition::new("Accepted", false, "NoMatchingParent", format!("spec.parentRefs[{i}]: {group}/{kind} is not a mesh parent; Heddle's waypoint serves Service parents (GAMMA)")));
                statuses.push(status);
                continue;
            }
            let Some(svc) = self.registry.service(&id) else {
                status.conditions.push(Condition::new(
                    "Accepted",
                    false,
                    "NoMatchingParent",
                    format!("spec.parentRefs[{i}]: Service {id} does not exist"),
                ));
                statuses.push(status);
                continue;
            };
            if self.registry.waypoint_of(svc) != Some(self.waypoint) {
                status.conditions.push(Condition::new(
                    "Accepted",
                    false,
                    "NoMatchingParent",
                    format!("spec.parentRefs[{i}]: Service {id} does not use waypoint {}", self.waypoint),
                ));
                statuses.push(status);
                continue;
            }
            status.attached = true;
            if let Some(port) = port {
                if !svc.ports.iter().any(|sp| sp.port == port) {
                    status.conditions.push(Condition::new(
                        "Accepted",
                        false,
                        "NoMatchingParent",
                        format!("spec.parentRefs[{i}].port: Service {id} has no port {port}"),
                    ));
                    statuses.push(status);
                    continue;
                }
            }
            if valid {
                status.conditions.push(Condition::new(
                    "Accepted",
                    true,
                    "Accepted",
                    format!("attached to Service {id} at waypoint {}", self.waypoint),
                ));
                attachments.push(Attachment { service: id, port, created: created.to_owned() });
            } else {
                status.conditions.push(Condition::new("Accepted", false, "UnsupportedValue", self.problems.join("; ")));
            }
            match self.unresolved.first() {
                None => status.conditions.push(Condition::new(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "every backendRef resolved".into(),
                )),
                Some((reason, msg)) => status.conditions.push(Condition::new(
                    "ResolvedRefs",
                    false,
                    reason,
                    format!("{msg} (its share of requests gets 500)"),
                )),
            }
            statuses.push(status);
        }
        let mut problems = self.problems;
        problems.extend(self.unresolved.into_iter().map(|(_, m)| m));
        let compiled_rules = if attachments.is_empty() { 0 } else { rules.len() };
        Compiled {
            rules: super::super::matching::attach_all(&attachments, rules),
            status: RouteStatus {
                route: self.route.to_string(),
                source: origin.to_owned(),
                accepted: !attachments.is_empty(),
                parents: statuses,
                problems,
                notes: self.notes,
                rules: compiled_rules,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn parses_gateway_api_durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_hours(1)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        for bad in ["", "10", "1.5s", "1d", "123456s", "1h1m1s1ms1s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
