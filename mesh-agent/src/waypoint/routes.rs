//! Routes in force at a waypoint: Gateway API `HTTPRoute` and `GRPCRoute`
//! objects whose `parentRefs` name a Service this waypoint owns (GAMMA),
//! with `ReferenceGrant`s permitting backends in other namespaces
//! ([`grants`]), Heddle's local rate limit and retry budget policies
//! ([`rate_limits`], [`retry_budgets`]) and Istio's `VirtualService` and `DestinationRule` ([`istio`]),
//! read from `--routes FILE|DIR` (multi-document YAML, `*.yaml`/`*.yml`, as
//! policies are) and compiled ([`load`]) into the matching table
//! ([`matching`]).
//!
//! Every object gets a status, per parent, with Gateway API's conditions
//! (`Accepted`, `ResolvedRefs`) and reasons, shown by `GET /routes` and
//! `heddle routes`: a route that uses something Heddle does not implement
//! (a filter type, an unknown field) is not accepted and says why; a
//! backend that does not resolve keeps the route accepted but its share of
//! requests gets 500 (Gateway API's rule) and `ResolvedRefs=False` says so.
//! A file that cannot be read keeps the last good routes (the caller's job);
//! a document that does not parse is rejected alone, and an object whose
//! new version is rejected keeps its last good version ([`last_good`]).
//! `AuthorizationPolicy` objects with `targetRefs` and
//! `RequestAuthentication`s read from the same inputs are compiled into
//! [`RouteSet::authz`] ([`crate::policy::l7`]).

pub mod gateway_api;
pub mod grants;
pub mod istio;
pub mod istio_api;
pub mod last_good;
pub mod load;
pub mod matching;
pub mod model;
pub mod rate_limits;
pub mod retry_budgets;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;

use crate::registry::{ObjectRef, Registry};

/// A routes file as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The file.
    pub file: PathBuf,
    /// Its text.
    pub text: String,
}

/// Why the routes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    /// A file or directory could not be read.
    #[error("cannot read routes {path}: {source}")]
    Read {
        /// What.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Reads each of `paths` in turn (a file, or the `*.yaml`/`*.yml` files of
/// a directory in name order).
pub fn read(paths: &[PathBuf]) -> Result<Vec<Source>, RoutesError> {
    let mut all = Vec::new();
    for p in paths {
        all.extend(read_one(p)?);
    }
    Ok(all)
}

fn read_one(path: &Path) -> Result<Vec<Source>, RoutesError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| RoutesError::Read { path, source }
    };
    let files = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(err(path))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).map_err(err(&file))?;
            Ok(Source { file, text })
        })
        .collect()
}

/// A Gateway API condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Condition {
    /// `Accepted` or `ResolvedRefs`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `True` or `False`.
    pub status: &'static str,
    /// Gateway API's reason.
    pub reason: &'static str,
    /// What it means here.
    pub message: String,
}

impl Condition {
    /// A condition of `kind`, `True` when `ok`.
    #[must_use]
    pub fn new(kind: &'static str, ok: bool, reason: &'static str, message: String) -> Self {
        Condition { kind, status: if ok { "True" } else { "False" }, reason, message }
    }

    /// An `Accepted` condition.
    #[must_use]
    pub fn accepted(ok: bool, reason: &'static str, message: String) -> Self {
        Self::new("Accepted", ok, reason, message)
    }
}

/// One parentRef's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParentStatus {
    /// The Service, `ns/name`.
    pub parent: String,
    /// Only this port, if the parentRef names one.
    pub port: Option<u16>,
    /// Whether this waypoint owns the parent (else another component does,
    /// and these conditions are not this waypoint's to set).
    pub attached: bool,
    /// Conditions.
    pub conditions: Vec<Condition>,
}

/// One route object's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteStatus {
    /// `httproute/ns/name` (or `file#doc` when it did not parse).
    pub route: String,
    /// Where it was read.
    pub source: String,
    /// Applied (accepted on at least one parent this waypoint owns).
    pub accepted: bool,
    /// Per parentRef.
    pub parents: Vec<ParentStatus>,
    /// Why it is not (fully) in force, each naming the field.
    pub problems: Vec<String>,
    /// What Heddle does differently from what the object might suggest
    /// (accepted anyway), each naming the field.
    pub notes: Vec<String>,
    /// Rules compiled (for `heddle routes`).
    pub rules: usize,
}

/// The routes in force and every object's status.
#[derive(Debug, Default)]
pub struct RouteSet {
    /// The matching table.
    pub table: matching::Table,
    /// Local rate limits, by Service or route.
    pub limits: rate_limits::RateLimits,
    /// `DestinationRule` subsets and traffic policies.
    pub destinations: istio::Subsets,
    /// Retry budgets given by `RetryBudgetPolicy` objects.
    pub budgets: retry_budgets::RetryBudgets,
    /// L7 authorization: `AuthorizationPolicy` objects with `targetRefs`
    /// and `RequestAuthentication`s.
    pub authz: crate::policy::l7::WaypointPolicies,
    statuses: Vec<RouteStatus>,
}

impl RouteSet {
    /// Compiles `sources` for `waypoint` against `registry`: every
    /// `ReferenceGrant` first, then the routes. (The waypoint builds through
    /// [`last_good::LastGood`], which keeps an object's last good version
    /// when an edit breaks it.)
    #[must_use]
    pub fn build(sources: &[Source], registry: &Registry, waypoint: &ObjectRef, root_namespace: &str) -> Self {
        Self::build_documents(&documents(sources), registry, waypoint, root_namespace)
    }

    /// [`Self::build`] over documents already split, each `(origin, text)`.
    #[must_use]
    pub fn build_documents(
        documents: &[(String, String)],
        registry: &Registry,
        waypoint: &ObjectRef,
        root_namespace: &str,
    ) -> Self {
        let mut set = RouteSet::default();
        let mut grants = grants::Grants::default();
        let mut subsets = istio::Subsets::default();
        // Statuses stay in document order: a route's place is kept while
        // the grants and the DestinationRules' subsets are gathered.
        let mut docs = Vec::new();
        let mut policies = Vec::new();
        let mut budgets = Vec::new();
        let mut authorizations = Vec::new();
        let mut authentications = Vec::new();
        for (origin, doc) in documents {
            let origin = origin.clone();
            {
                match load::parse_document(doc, &origin) {
                    load::Document::Grant(Ok(g)) => grants.add(*g),
                    load::Document::Grant(Err(status)) | load::Document::Invalid(status) => docs.push(Err(status)),
                    load::Document::Route(value) => docs.push(Ok((origin, value))),
                    load::Document::RateLimit(Ok((p, unknown))) => policies.push((origin, p, unknown)),
                    load::Document::RetryBudget(Ok((p, unknown))) => budgets.push((origin, p, unknown)),
                    load::Document::Authorization(p) => authorizations.push((origin, *p)),
                    load::Document::Authentication(a) => authentications.push((origin, *a)),
                    load::Document::RateLimit(Err(status))
                    | load::Document::DestinationRule(Err(status))
                    | load::Document::RetryBudget(Err(status)) => {
                        docs.push(Err(status));
                    }
                    load::Document::DestinationRule(Ok((dr, unknown))) => {
                        docs.push(Err(istio::compile_destination_rule(&dr, unknown, &origin, registry, &mut subsets)));
                    }
                }
            }
        }
        // The same object (kind, namespace, name) written twice: the last
        // document is the object, as a second `kubectl apply` would make it.
        let identity = |v: &serde_yaml_ng::Value| {
            let s = |x: Option<&serde_yaml_ng::Value>| x.and_then(|x| x.as_str()).unwrap_or("").to_owned();
            let meta = v.get("metadata");
            let ns = s(meta.and_then(|m| m.get("namespace")));
            (
                s(v.get("kind")),
                if ns.is_empty() { "default".to_owned() } else { ns },
                s(meta.and_then(|m| m.get("name"))),
            )
        };
        let mut last: HashMap<(String, String, String), String> = HashMap::new();
        for (origin, value) in docs.iter().flatten() {
            last.insert(identity(value), origin.clone());
        }
        for doc in docs {
            let status = match doc {
                Err(status) => status,
                Ok((origin, value)) if last.get(&identity(&value)).is_some_and(|o| *o != origin) => {
                    let id = identity(&value);
                    let (kind, ns, name) = &id;
                    load::superseded(&format!("{}/{ns}/{name}", kind.to_ascii_lowercase()), &origin, &last[&id])
                }
                Ok((origin, value)) => {
                    let compiled = load::compile_route(value, &origin, registry, waypoint, &grants, &subsets);
                    for (at, rule) in compiled.rules {
                        set.table.insert(&at, &Arc::new(rule));
                    }
                    compiled.status
                }
            };
            set.statuses.push(status);
        }
        set.destinations = subsets;
        // Policies attach to routes, so they are compiled once every route is known.
        let routes: Vec<String> = set.statuses.iter().filter(|s| s.accepted).map(|s| s.route.clone()).collect();
        for (origin, p, unknown) in policies {
            let compiled = rate_limits::compile(&p, unknown, &origin, registry, waypoint, &routes);
            for (target, limiter) in compiled.targets {
                set.limits.insert(target, limiter);
            }
            set.statuses.push(compiled.status);
        }
        for (origin, p, unknown) in budgets {
            let compiled = retry_budgets::compile(&p, unknown, &origin, registry, waypoint, &routes);
            for (target, budget) in compiled.targets {
                set.budgets.insert(target, budget);
            }
            set.statuses.push(compiled.status);
        }
        set.authz = crate::policy::l7::WaypointPolicies::build(authorizations, authentications, root_namespace);
        let policy_statuses: Vec<RouteStatus> = set.authz.statuses().iter().map(policy_status).collect();
        set.statuses.extend(policy_statuses);
        set
    }

    /// Every object's status.
    #[must_use]
    pub fn statuses(&self) -> &[RouteStatus] {
        &self.statuses
    }

    /// The status of the object read at `origin` (`file#N`), to annotate.
    pub(crate) fn status_at_mut(&mut self, origin: &str) -> Option<&mut RouteStatus> {
        self.statuses.iter_mut().find(|s| s.source == origin)
    }

    /// (route, problem) of objects not (fully) accepted.
    #[must_use]
    pub fn rejected(&self) -> Vec<(String, String)> {
        self.statuses
            .iter()
            .filter(|s| !s.problems.is_empty())
            .map(|s| (s.route.clone(), s.problems.join("; ")))
            .collect()
    }
}

/// The status of an authorization object, in the routes' shape: one
/// parent per target.
fn policy_status(s: &crate::policy::l7::ObjectStatus) -> RouteStatus {
    let reason = if s.accepted { "Accepted" } else { "Invalid" };
    let message = if s.accepted { String::new() } else { s.problems.join("; ") };
    RouteStatus {
        route: s.object.clone(),
        source: s.origin.clone(),
        accepted: s.accepted,
        parents: s
            .targets
            .iter()
            .map(|t| ParentStatus {
                parent: t.clone(),
                port: None,
                attached: true,
                conditions: vec![Condition::accepted(s.accepted, reason, message.clone())],
            })
            .collect(),
        problems: s.problems.clone(),
        notes: s.notes.clone(),
        rules: 0,
    }
}

/// Every document of `sources`, `(file#N, text)`, in order.
#[must_use]
pub fn documents(sources: &[Source]) -> Vec<(String, String)> {
    sources
        .iter()
        .flat_map(|s| {
            split_documents(&s.text)
                .into_iter()
                .enumerate()
                .map(move |(i, doc)| (format!("{}#{}", s.file.display(), i + 1), doc.to_owned()))
        })
        .collect()
}

/// Splits a multi-document YAML text at `---` lines, dropping empty ones.
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" {
            docs.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs.into_iter().filter(|d| d.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))).collect()
}
