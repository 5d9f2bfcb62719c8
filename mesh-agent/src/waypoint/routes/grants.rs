//! Gateway API `ReferenceGrant` (`gateway.networking.k8s.io/v1beta1`): which
//! cross-namespace references are permitted. A route's `backendRef` to a
//! Service of another namespace resolves only when a `ReferenceGrant` in the
//! Service's namespace lists the route's kind and namespace in `from` and
//! `Service` (all, or that name) in `to`; otherwise the reference is
//! `ResolvedRefs=False, RefNotPermitted` and its share of requests gets 500.
//!
//! The types follow the upstream CRD's schema (`from[]: {group, kind,
//! namespace}`, `to[]: {group, kind, name?}`); fields it does not have are
//! problems, as for routes. Evaluation is pure: [`Grants::permits`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::model::RouteKind;
use crate::registry::ObjectRef;

/// The Gateway API group, the `group` of route kinds in `from`.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// One `ReferenceGrant` object.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ReferenceGrant {
    /// Its name and namespace (the namespace of what it grants access to).
    pub metadata: ObjectMeta,
    /// What it permits.
    pub spec: ReferenceGrantSpec,
}

/// `spec`: references from any of `from` to any of `to` are permitted.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ReferenceGrantSpec {
    /// Trusted namespaces and kinds (OR).
    pub from: Vec<GrantFrom>,
    /// Kinds (and names) that may be referenced (OR).
    pub to: Vec<GrantTo>,
}

/// `spec.from[]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct GrantFrom {
    /// The referring object's API group.
    pub group: String,
    /// Its kind (`HTTPRoute`, `GRPCRoute`, ...).
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
}

/// `spec.to[]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct GrantTo {
    /// The referent's API group (`""` for the core group).
    pub group: String,
    /// Its kind (`Service`).
    pub kind: String,
    /// One object, or every object of the kind in the grant's namespace.
    #[serde(default)]
    pub name: Option<String>,
}

impl ReferenceGrant {
    /// `ns/name` of the grant.
    #[must_use]
    pub fn id(&self) -> ObjectRef {
        ObjectRef {
            namespace: self.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned()),
            name: self.metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// Every grant in force.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    grants: Vec<ReferenceGrant>,
}

impl Grants {
    /// Adds a grant.
    pub fn add(&mut self, grant: ReferenceGrant) {
        self.grants.push(grant);
    }

    /// Whether a route of `kind` in `from_namespace` may reference the
    /// Service `to`. A reference within one namespace needs no grant.
    #[must_use]
    pub fn permits(&self, kind: RouteKind, from_namespace: &str, to: &ObjectRef) -> bool {
        if from_namespace == to.namespace {
            return true;
        }
        let kind = match kind {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
            // Istio's references cross namespaces without grants (its
            // `exportTo` narrows visibility; Heddle reports it as unsupported).
            RouteKind::Istio => return true,
        };
        self.grants.iter().filter(|g| g.id().namespace == to.namespace).any(|g| {
            g.spec.from.iter().any(|f| f.group == GATEWAY_GROUP && f.kind == kind && f.namespace == from_namespace)
                && g.spec.to.iter().any(|t| {
                    (t.group.is_empty() || t.group == "core")
                        && t.kind == "Service"
                        && t.name.as_deref().is_none_or(|n| n == to.name)
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(ns: &str, from: (&str, &str, &str), to: (&str, &str, Option<&str>)) -> ReferenceGrant {
        ReferenceGrant {
            metadata: ObjectMeta { name: Some("g".into()), namespace: Some(ns.into()), ..ObjectMeta::default() },
            spec: ReferenceGrantSpec {
                from: vec![GrantFrom { group: from.0.into(), kind: from.1.into(), namespace: from.2.into() }],
                to: vec![GrantTo { group: to.0.into(), kind: to.1.into(), name: to.2.map(Into::into) }],
            },
        }
    }

    fn svc(ns: &str, name: &str) -> ObjectRef {
        ObjectRef { namespace: ns.into(), name: name.into() }
    }

    #[test]
    fn same_namespace_needs_no_grant_and_other_namespaces_do() {
        let none = Grants::default();
        assert!(none.permits(RouteKind::Http, "demo", &svc("demo", "api")));
        assert!(!none.permits(RouteKind::Http, "demo", &svc("shared", "store")));
    }

    #[test]
    fn a_grant_permits_exactly_its_from_kind_namespace_and_to_name() {
        let mut g = Grants::default();
        g.add(grant("shared", (GATEWAY_GROUP, "HTTPRoute", "demo"), ("", "Service", Some("store"))));
        assert!(g.permits(RouteKind::Http, "demo", &svc("shared", "store")));
        assert!(!g.permits(RouteKind::Http, "demo", &svc("shared", "other")), "another name");
        assert!(!g.permits(RouteKind::Grpc, "demo", &svc("shared", "store")), "another route kind");
        assert!(!g.permits(RouteKind::Http, "prod", &svc("shared", "store")), "another source namespace");
        assert!(!g.permits(RouteKind::Http, "demo", &svc("third", "store")), "a grant only covers its namespace");
    }

    #[test]
    fn a_grant_without_a_name_covers_every_service_of_its_namespace() {
        let mut g = Grants::default();
        g.add(grant("shared", (GATEWAY_GROUP, "GRPCRoute", "demo"), ("core", "Service", None)));
        assert!(g.permits(RouteKind::Grpc, "demo", &svc("shared", "anything")));
    }

    #[test]
    fn wrong_groups_and_kinds_grant_nothing() {
        let mut g = Grants::default();
        g.add(grant("shared", ("", "HTTPRoute", "demo"), ("", "Service", None)));
        g.add(grant("shared", (GATEWAY_GROUP, "HTTPRoute", "demo"), ("", "Secret", None)));
        g.add(grant("shared", (GATEWAY_GROUP, "HTTPRoute", "demo"), ("apps", "Service", None)));
        assert!(!g.permits(RouteKind::Http, "demo", &svc("shared", "store")));
    }
}
