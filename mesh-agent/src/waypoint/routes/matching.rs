//! Route matching: a request's facts in, the rule that owns it out. Pure,
//! table-tested without sockets.
//!
//! Gateway API semantics (`HTTPRoute` `rules[].matches`, GEP-1426 for the
//! mesh): a rule matches if any of its matches does; among all matches of
//! all routes attached to the Service (and port), the winner is the first by
//! precedence: an Exact path, then a `RegularExpression` (longest pattern
//! first; their place is implementation-specific, and this is Envoy
//! Gateway's), then the longest Prefix, then a method match, then the
//! most header matches, then the most query matches, then the oldest route
//! (here: its creation time, then `namespace/name`), then rule and match
//! order. Consumer routes (a route in the client's namespace whose parent is
//! a Service of another namespace) replace the producer's routes for that
//! namespace's clients. gRPC requests try `GRPCRoutes` first, then `HTTPRoutes`;
//! other requests only `HTTPRoutes`; then (for both) Istio `VirtualService`
//! routes, whose rules are tried in the order they are written (Istio's
//! semantics), oldest `VirtualService` first.

use std::{collections::HashMap, sync::Arc};

use hyper::HeaderMap;

use super::model::{PathMatch, RequestMatch, RouteKind, Rule};
use crate::registry::ObjectRef;

/// What matching needs to know about a request.
pub struct RequestFacts<'a> {
    /// The Service the client addressed.
    pub service: &'a ObjectRef,
    /// The service port it addressed.
    pub port: u16,
    /// The client's namespace (from its identity), for consumer routes.
    pub client_namespace: Option<&'a str>,
    /// Method.
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// The raw query string.
    pub query: Option<&'a str>,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// A gRPC request (`content-type: application/grpc...`).
    pub grpc: bool,
}

/// The rule (and which of its matches) that owns a request.
#[derive(Clone, Debug)]
pub struct Matched {
    /// The rule.
    pub rule: Arc<Rule>,
    /// The index of the match that matched (`None`: a rule without matches).
    pub match_index: Option<usize>,
}

/// One (rule, match) candidate, with what orders it.
#[derive(Clone, Debug)]
struct Entry {
    rule: Arc<Rule>,
    match_index: Option<usize>,
    port: Option<u16>,
    key: Precedence,
}

/// Sort key: lower wins.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    path_kind: u8,
    path_len: std::cmp::Reverse<usize>,
    no_method: bool,
    headers: std::cmp::Reverse<usize>,
    query: std::cmp::Reverse<usize>,
    created: String,
    route: ObjectRef,
    rule: usize,
    match_index: usize,
}

/// Routes attached to one Service, ordered by precedence, per kind and
/// per consumer namespace (`None`: the producer's).
#[derive(Debug, Default)]
struct Attached {
    lists: HashMap<(RouteKind, Option<String>), Vec<Entry>>,
}

/// Every compiled rule, indexed by parent Service.
#[derive(Debug, Default)]
pub struct Table {
    by_service: HashMap<ObjectRef, Attached>,
}

/// Where a rule attaches.
#[derive(Clone, Debug)]
pub struct Attachment {
    /// The parent Service.
    pub service: ObjectRef,
    /// Only this service port, if given.
    pub port: Option<u16>,
    /// Creation time of the route (RFC 3339; empty if unknown).
    pub created: String,
}

/// Every rule under every attachment (a route's rules apply at each
/// parent it attached to).
#[must_use]
pub fn attach_all(attachments: &[Attachment], rules: &[Rule]) -> Vec<(Attachment, Rule)> {
    attachments.iter().flat_map(|at| rules.iter().map(move |r| (at.clone(), r.clone()))).collect()
}

impl Table {
    /// Adds `rule` under `at`.
    pub fn insert(&mut self, at: &Attachment, rule: &Arc<Rule>) {
        let consumer = (rule.route.id.namespace != at.service.namespace).then(|| rule.route.id.namespace.clone());
        let list = self
            .by_service
            .entry(at.service.clone())
            .or_default()
            .lists
            .entry((rule.route.kind, consumer))
            .or_default();
        // A VirtualService's routes are tried in order (Istio's rule): only
        // the route's age and the rule and match order sort them.
        let ordered = rule.route.kind == RouteKind::Istio;
        let mut push = |match_index: Option<usize>, m: Option<&RequestMatch>| {
            let m_for_key = if ordered { None } else { m };
            let (path_kind, path_len) = match m_for_key.map(|m| &m.path) {
                Some(PathMatch::Exact(p)) => (0, p.len()),
                Some(PathMatch::Regex(re)) => (1, re.as_str().len()),
                Some(PathMatch::Prefix(p)) => (2, p.len()),
                None => (2, 1),
            };
            list.push(Entry {
                rule: rule.clone(),
                match_index,
                port: at.port,
                key: Precedence {
                    path_kind,
                    path_len: std::cmp::Reverse(path_len),
                    no_method: m_for_key.is_none_or(|m| m.method.is_none()),
                    headers: std::cmp::Reverse(m_for_key.map_or(0, |m| m.headers.len())),
                    query: std::cmp::Reverse(m_for_key.map_or(0, |m| m.query.len())),
                    created: at.created.clone(),
                    route: rule.route.id.clone(),
                    rule: rule.index,
                    match_index: match_index.unwrap_or(0),
                },
            });
        };
        if rule.matches.is_empty() {
            push(None, None);
        } else {
            for (i, m) in rule.matches.iter().enumerate() {
                push(Some(i), Some(m));
            }
        }
        list.sort_by(|a, b| a.key.cmp(&b.key));
    }

    /// Whether any route attaches to `service`.
    #[must_use]
    pub fn has_routes(&self, service: &ObjectRef) -> bool {
        self.by_service.contains_key(service)
    }

    /// The rule that owns the request, if any route matches it.
    #[must_use]
    pub fn find(&self, req: &RequestFacts<'_>) -> Option<Matched> {
        let attached = self.by_service.get(req.service)?;
        let kinds: &[RouteKind] = if req.grpc {
            &[RouteKind::Grpc, RouteKind::Http, RouteKind::Istio]
        } else {
            &[RouteKind::Http, RouteKind::Istio]
        };
        // Consumer routes of the client's namespace replace the producer's.
        let consumer = req.client_namespace.filter(|ns| *ns != req.service.namespace.as_str()).map(str::to_owned);
        let has_consumer =
            consumer.is_some() && kinds.iter().any(|k| attached.lists.contains_key(&(*k, consumer.clone())));
        let owner = if has_consumer { consumer } else { None };
        kinds.iter().find_map(|kind| {
            attached
                .lists
                .get(&(*kind, owner.clone()))?
                .iter()
                .filter(|e| e.port.is_none_or(|p| p == req.port))
                .find(|e| e.match_index.is_none_or(|i| matches(&e.rule.matches[i], req)))
                .map(|e| Matched { rule: e.rule.clone(), match_index: e.match_index })
        })
    }
}

/// Whether one `matches[]` entry holds for the request.
#[must_use]
pub fn matches(m: &RequestMatch, req: &RequestFacts<'_>) -> bool {
    path_matches(&m.path, req.path)
        && m.method.as_ref().is_none_or(|want| want == req.method)
        && m.headers.iter().all(|(name, want)| {
            // Repeated headers match as their values joined with ",", as
            // Gateway API allows (RFC 9110 §5.3).
            let values: Vec<&str> = req.headers.get_all(name.as_str()).iter().filter_map(|v| v.to_str().ok()).collect();
            !values.is_empty() && want.matches(&values.join(","))
        })
        && m.query.iter().all(|(name, want)| {
            // The first value of a repeated parameter counts (Gateway API
            // leaves this to implementations; Envoy does the same).
            query_value(req.query, name).is_some_and(|v| want.matches(&v))
        })
}

fn path_matches(m: &PathMatch, path: &str) -> bool {
    match m {
        PathMatch::Exact(p) => path == p,
        PathMatch::Prefix(p) if p == "/" => path.starts_with('/'),
        PathMatch::Prefix(p) => {
            path.starts_with(p.as_str()) && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
        }
        PathMatch::Regex(re) => re.is_match(path),
    }
}

fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| v.to_owned())
    })
}

#[cfg(test)]
mod tests;
