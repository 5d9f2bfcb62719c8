//! Compiles one Gateway API document (`HTTPRoute` or `GRPCRoute`, the
//! upstream types of [`super::gateway_api`]) into rules and a status, and
//! reads `ReferenceGrant`s ([`super::grants`]), which routes resolve their
//! cross-namespace backends against.
//!
//! `GRPCRoute` is compiled as the HTTP/2 requests it describes: a method match
//! `{service, method}` becomes a path match on `/service/method` (Exact, or a
//! prefix `/service/` for a service alone, or a regular expression), and its
//! parentRefs, backendRefs and filters, which have `HTTPRoute`'s shape, are
//! read as `HTTPRoute`'s.

use serde::de::DeserializeOwned;

use super::{
    gateway_api::{grpcroutes as g, httproutes as h},
    grants::{Grants, ReferenceGrant},
    matching::Attachment,
    model::{RequestMatch, RouteKind, Rule, Timeouts},
    RouteStatus,
};
use crate::registry::{ObjectRef, Registry};
use ctx::Ctx;

/// A compiled document.
pub struct Compiled {
    /// Rules and where they attach.
    pub rules: Vec<(Attachment, Rule)>,
    /// Its status.
    pub status: RouteStatus,
}

/// One document, parsed: a `ReferenceGrant` (read before any route, since
/// routes resolve against every grant) or something to compile as a route.
pub enum Document {
    /// A grant, or why it is not honoured (its status).
    Grant(Result<Box<ReferenceGrant>, RouteStatus>),
    /// A route (or a document rejected as one).
    Route(serde_yaml_ng::Value),
    /// An Istio `DestinationRule` (read before any route: routes name its
    /// subsets), with its unknown fields, or why it does not parse.
    DestinationRule(Result<(Box<super::istio_api::destinationrules::DestinationRule>, Vec<String>), RouteStatus>),
    /// A Heddle `RetryBudgetPolicy`, with its unknown fields, or why it
    /// does not parse.
    RetryBudget(Result<(Box<super::retry_budgets::Policy>, Vec<String>), RouteStatus>),
    /// A Heddle `HTTPLocalRateLimitPolicy`, with its unknown fields, or
    /// why it does not parse.
    RateLimit(Result<(Box<super::rate_limits::Policy>, Vec<String>), RouteStatus>),
    /// An `AuthorizationPolicy` (L7 authorization at the waypoint when it
    /// has `targetRefs`; the node agents' otherwise).
    Authorization(Box<crate::policy::AuthorizationPolicy>),
    /// An Istio `RequestAuthentication`.
    Authentication(Box<crate::policy::l7::RequestAuthentication>),
    /// Not YAML: its status.
    Invalid(RouteStatus),
}

fn rejected(route: String, origin: &str, problems: Vec<String>) -> RouteStatus {
    RouteStatus {
        route,
        source: origin.to_owned(),
        accepted: false,
        parents: Vec::new(),
        problems,
        notes: Vec::new(),
        rules: 0,
    }
}

/// The status of a document replaced by a later one of the same object.
#[must_use]
pub fn superseded(route: &str, origin: &str, by: &str) -> RouteStatus {
    let mut s = rejected(route.to_owned(), origin, Vec::new());
    s.notes.push(format!("replaced by the same object in {by}"));
    s
}

/// Parses one YAML document read from `origin`.
#[must_use]
pub fn parse_document(doc: &str, origin: &str) -> Document {
    let value: serde_yaml_ng::Value = match serde_yaml_ng::from_str(doc) {
        Ok(v) => v,
        Err(e) => return Document::Invalid(rejected(origin.to_owned(), origin, vec![format!("invalid YAML: {e}")])),
    };
    let field = |k: &str| value.get(k).and_then(|v| v.as_str()).unwrap_or("");
    if field("kind") == super::rate_limits::KIND && field("apiVersion") == super::rate_limits::API_VERSION {
        return Document::RateLimit(parse_boxed(value, origin, super::rate_limits::KIND));
    }
    if field("kind") == super::retry_budgets::KIND && field("apiVersion") == super::rate_limits::API_VERSION {
        return Document::RetryBudget(parse_boxed(value, origin, super::retry_budgets::KIND));
    }
    if field("kind") == crate::policy::model::KIND || field("kind") == crate::policy::l7::authn::KIND {
        let kind = field("kind").to_owned();
        let parsed = serde_yaml_ng::from_value::<serde_json::Value>(value).map_err(|e| e.to_string()).and_then(|v| {
            if kind == crate::policy::model::KIND {
                serde_json::from_value(v).map(|p| Document::Authorization(Box::new(p))).map_err(|e| e.to_string())
            } else {
                serde_json::from_value(v).map(|p| Document::Authentication(Box::new(p))).map_err(|e| e.to_string())
            }
        });
        return parsed
            .unwrap_or_else(|e| Document::Invalid(rejected(origin.to_owned(), origin, vec![format!("{kind}: {e}")])));
    }
    if field("kind") == "DestinationRule" && super::istio::is_istio_networking(field("apiVersion")) {
        return Document::DestinationRule(parse_boxed(value, origin, "DestinationRule"));
    }
    if field("kind") != "ReferenceGrant" || !is_gateway_api(field("apiVersion")) {
        return Document::Route(value);
    }
    let fallback = format!("referencegrant/{origin}");
    Document::Grant(match parse::<ReferenceGrant>(value) {
        Ok((g, unknown)) if unknown.is_empty() => Ok(Box::new(g)),
        Ok((g, unknown)) => {
            let problems =
                unknown.into_iter().map(|p| format!("{p}: unknown field (not in the ReferenceGrant type)")).collect();
            Err(rejected(format!("referencegrant/{}", g.id()), origin, problems))
        }
        Err(e) => Err(rejected(fallback, origin, vec![format!("ReferenceGrant: {e}")])),
    })
}

fn is_gateway_api(api: &str) -> bool {
    matches!(
        api,
        "gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1" | "gateway.networking.k8s.io/v1alpha2"
    )
}

/// Compiles one route document (parsed by [`parse_document`]) read from
/// `origin`, its cross-namespace backends resolved against `grants`.
#[must_use]
pub fn compile_route(
    value: serde_yaml_ng::Value,
    origin: &str,
    registry: &Registry,
    waypoint: &ObjectRef,
    grants: &Grants,
    subsets: &super::istio::Subsets,
) -> Compiled {
    let reject =
        |problem: String| Compiled { rules: Vec::new(), status: rejected(origin.to_owned(), origin, vec![problem]) };
    let field = |k: &str| value.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    let (api, kind) = (field("apiVersion"), field("kind"));
    let env = Env { registry, waypoint, grants };
    match kind.as_str() {
        "HTTPRoute" if is_gateway_api(&api) => {
            let mut value = value;
            let retries = take_retries(&mut value);
            match parse::<h::HttpRoute>(value) {
                Ok((r, unknown)) => compile_http(&r, unknown, retries, origin, &env),
                Err(e) => reject(format!("HTTPRoute: {e}")),
            }
        }
        "VirtualService" if super::istio::is_istio_networking(&api) => {
            match parse::<super::istio_api::virtualservices::VirtualService>(value) {
                Ok((vs, unknown)) => {
                    let c = super::istio::compile_virtual_service(&vs, unknown, origin, registry, waypoint, subsets);
                    Compiled { rules: c.rules, status: c.status }
                }
                Err(e) => reject(format!("VirtualService: {e}")),
            }
        }
        "GRPCRoute" if is_gateway_api(&api) => match parse::<g::GrpcRoute>(value) {
            Ok((r, unknown)) => compile_grpc(&r, unknown, origin, &env),
            Err(e) => reject(format!("GRPCRoute: {e}")),
        },
        _ => reject(format!(
            "kind {kind:?} (apiVersion {api:?}) is not a gateway.networking.k8s.io HTTPRoute, GRPCRoute or ReferenceGrant, a networking.istio.io VirtualService or DestinationRule, or a heddle.dev HTTPLocalRateLimitPolicy"
        )),
    }
}

/// Takes `spec.rules[*].retry` (experimental channel, GEP-1731) out of an
/// `HTTPRoute`, so the standard types read the rest and the retries are
/// read with the experimental type; one entry per rule.
fn take_retries(value: &mut serde_yaml_ng::Value) -> Vec<Option<serde_yaml_ng::Value>> {
    let Some(rules) = value.get_mut("spec").and_then(|s| s.get_mut("rules")).and_then(|r| r.as_sequence_mut()) else {
        return Vec::new();
    };
    rules.iter_mut().map(|r| r.as_mapping_mut().and_then(|m| m.remove("retry"))).collect()
}

/// The annotation that lets a route's retries apply to non-idempotent
/// methods (POST, PATCH, ...), which are otherwise never retried.
pub const RETRY_NON_IDEMPOTENT: &str = "heddle.dev/retry-non-idempotent";

/// What routes compile against.
pub(super) struct Env<'a> {
    pub(super) registry: &'a Registry,
    pub(super) waypoint: &'a ObjectRef,
    pub(super) grants: &'a Grants,
}

/// [`parse`] for a document kept boxed, or its status naming `kind` when it
/// does not parse.
#[allow(clippy::result_large_err, reason = "the status is the document's outcome, made once per document")]
fn parse_boxed<T: DeserializeOwned>(
    value: serde_yaml_ng::Value,
    origin: &str,
    kind: &str,
) -> Result<(Box<T>, Vec<String>), RouteStatus> {
    parse(value)
        .map(|(t, unknown)| (Box::new(t), unknown))
        .map_err(|e| rejected(origin.to_owned(), origin, vec![format!("{kind}: {e}")]))
}

/// Deserializes `value`, collecting the paths of fields the type does not
/// have (they are problems, not silently dropped).
fn parse<T: DeserializeOwned>(value: serde_yaml_ng::Value) -> Result<(T, Vec<String>), String> {
    let mut unknown = Vec::new();
    let t = serde_ignored::deserialize(value, |path| {
        let p = field_path(&path);
        // The kube-derived root type reads apiVersion and kind itself.
        if p != "apiVersion" && p != "kind" {
            unknown.push(p);
        }
    })
    .map_err(|e: serde_yaml_ng::Error| e.to_string())?;
    Ok((t, unknown))
}

/// `spec.rules[0].filters[1].x`, as the rest of the status names fields.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => {
            let p = field_path(parent);
            if p.is_empty() {
                key.clone()
            } else {
                format!("{p}.{key}")
            }
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

fn meta_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (ObjectRef, String) {
    let id = ObjectRef {
        namespace: m.namespace.clone().unwrap_or_else(|| "default".to_owned()),
        name: m.name.clone().unwrap_or_default(),
    };
    let created = m.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
    (id, created)
}

/// Converts between the `HTTPRoute` and `GRPCRoute` shapes of the same JSON.
fn reshape<A: serde::Serialize, B: DeserializeOwned>(a: &A) -> Result<B, String> {
    serde_json::to_value(a).and_then(serde_json::from_value).map_err(|e| e.to_string())
}

fn compile_http(
    r: &h::HttpRoute,
    unknown: Vec<String>,
    mut retries: Vec<Option<serde_yaml_ng::Value>>,
    origin: &str,
    env: &Env<'_>,
) -> Compiled {
    let (id, created) = meta_of(&r.metadata);
    let mut ctx = Ctx::new(env, RouteKind::Http, id, unknown);
    let non_idempotent = match r.metadata.annotations.as_ref().and_then(|a| a.get(RETRY_NON_IDEMPOTENT)) {
        None => false,
        Some(v) if v == "true" => true,
        Some(v) if v == "false" => false,
        Some(v) => {
            ctx.problems
                .push(format!("metadata.annotations[{RETRY_NON_IDEMPOTENT}]: {v:?} is not \"true\" or \"false\""));
            false
        }
    };
    if r.spec.hostnames.as_ref().is_some_and(|h| !h.is_empty()) {
        ctx.notes.push("spec.hostnames: ignored for Service parents (GAMMA: the Service is the host)".into());
    }
    let mut rules = Vec::new();
    for (i, rule) in r.spec.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{i}]");
        let matches: Vec<RequestMatch> = rule
            .matches
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(j, m)| ctx.http_match(m, &format!("{at}.matches[{j}]")))
            .collect();
        let filters = ctx.filters(rule.filters.as_deref().unwrap_or(&[]), &matches, &at);
        let backends = ctx.backends(rule.backend_refs.as_deref().unwrap_or(&[]), &matches, &at);
        let timeouts = ctx.timeouts(rule.timeouts.as_ref(), &at);
        let retry = ctx.retry(retries.get_mut(i).and_then(Option::take), non_idempotent, &at);
        rules.push(ctx.rule(i, matches, filters, backends, timeouts, retry));
    }
    let parents = r.spec.parent_refs.clone().unwrap_or_default();
    ctx.finish(&parents, &rules, &created, origin)
}

fn compile_grpc(r: &g::GrpcRoute, unknown: Vec<String>, origin: &str, env: &Env<'_>) -> Compiled {
    let (id, created) = meta_of(&r.metadata);
    let mut ctx = Ctx::new(env, RouteKind::Grpc, id, unknown);
    if r.spec.hostnames.as_ref().is_some_and(|h| !h.is_empty()) {
        ctx.notes.push("spec.hostnames: ignored for Service parents (GAMMA: the Service is the host)".into());
    }
    let mut rules = Vec::new();
    for (i, rule) in r.spec.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{i}]");
        let matches: Vec<RequestMatch> = rule
            .matches
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(j, m)| ctx.grpc_match(m, &format!("{at}.matches[{j}]")))
            .collect();
        let filters: Vec<h::HttpRouteRulesFilters> = rule
            .filters
            .iter()
            .flatten()
            .filter_map(|f| reshape(f).map_err(|e| ctx.problems.push(format!("{at}.filters: {e}"))).ok())
            .collect();
        let filters = ctx.filters(&filters, &matches, &at);
        let backends: Vec<h::HttpRouteRulesBackendRefs> = rule
            .backend_refs
            .iter()
            .flatten()
            .filter_map(|b| reshape(b).map_err(|e| ctx.problems.push(format!("{at}.backendRefs: {e}"))).ok())
            .collect();
        let backends = ctx.backends(&backends, &matches, &at);
        rules.push(ctx.rule(i, matches, filters, backends, Timeouts::default(), None));
    }
    let parents: Vec<h::HttpRouteParentRefs> =
        r.spec.parent_refs.iter().flatten().filter_map(|p| reshape(p).ok()).collect();
    ctx.finish(&parents, &rules, &created, origin)
}

mod ctx;

#[cfg(test)]
mod tests;
