//! An object's last good version stays in force when an edit breaks it
//! (the issue's "the last good configuration stays in force"; what an
//! admission webhook gives Istio users, who never see a broken edit
//! applied): a route, `VirtualService`, `DestinationRule`, policy or
//! `AuthorizationPolicy` whose new version is rejected is compiled from
//! the document last accepted under the same `kind/ns/name`, and its
//! status keeps the new version's problems with a note saying so. A new
//! object that never compiled has nothing to fall back on (for
//! authorization policies that means fail closed, [`crate::policy::l7`]);
//! a deleted object is forgotten.

use std::collections::HashMap;

use super::{documents, RouteSet, Source};
use crate::registry::{ObjectRef, Registry};

/// Accepted documents by object.
#[derive(Debug, Default)]
pub struct LastGood {
    /// `kind/ns/name` → the document last accepted.
    docs: HashMap<String, String>,
}

impl LastGood {
    /// Builds the route set from `sources`, falling back to the last good
    /// version of each object its new version breaks, and remembers what
    /// was accepted.
    pub fn build(&mut self, sources: &[Source], registry: &Registry, waypoint: &ObjectRef, root: &str) -> RouteSet {
        let mut docs = documents(sources);
        let first = RouteSet::build_documents(&docs, registry, waypoint, root);
        let mut kept: Vec<(String, Vec<String>)> = Vec::new();
        for status in first.statuses().iter().filter(|s| !s.accepted && !s.problems.is_empty()) {
            let Some(doc) = docs.iter_mut().find(|(origin, _)| *origin == status.source) else { continue };
            let Some(previous) = identity(&doc.1).and_then(|id| self.docs.get(&id)) else { continue };
            if doc.1 != *previous {
                doc.1.clone_from(previous);
                kept.push((status.source.clone(), status.problems.clone()));
            }
        }
        let mut set = if kept.is_empty() { first } else { RouteSet::build_documents(&docs, registry, waypoint, root) };
        for (origin, problems) in kept {
            if let Some(status) = set.status_at_mut(&origin) {
                status.notes.push("the new version is rejected: the last good version stays in force".to_owned());
                // The object's status speaks of the version the user wrote.
                let message = format!(
                    "this version is rejected ({}); the last accepted version stays in force",
                    problems.join("; ")
                );
                for c in
                    status.parents.iter_mut().flat_map(|p| p.conditions.iter_mut()).filter(|c| c.kind == "Accepted")
                {
                    *c = super::Condition::accepted(false, "UnsupportedValue", message.clone());
                }
                status.problems = problems;
            }
        }
        self.docs = set
            .statuses()
            .iter()
            .filter(|s| s.accepted)
            .filter_map(|s| docs.iter().find(|(origin, _)| *origin == s.source))
            .filter_map(|(_, text)| Some((identity(text)?, text.clone())))
            .collect();
        set
    }
}

/// `kind/namespace/name` of a document, read leniently (a version that
/// does not fit the schema still names its object).
fn identity(doc: &str) -> Option<String> {
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc).ok()?;
    let s = |x: Option<&serde_yaml_ng::Value>| x.and_then(serde_yaml_ng::Value::as_str).map(str::to_owned);
    let kind = s(v.get("kind"))?;
    let meta = v.get("metadata");
    let name = s(meta.and_then(|m| m.get("name"))).filter(|n| !n.is_empty())?;
    let ns = s(meta.and_then(|m| m.get("namespace"))).filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
    Some(format!("{}/{ns}/{name}", kind.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: api, port: 80}]
"#;

    fn registry() -> Registry {
        let cluster = r#"
namespaces: [{name: demo, useWaypoint: waypoint}]
waypoints: [{name: waypoint, namespace: demo}]
workloads:
  - {name: v1, namespace: demo, node: n1, ips: ["10.0.0.1"], enrolled: false, labels: {app: api}}
services:
  - {name: api, namespace: demo, vip: 10.96.0.1, ports: [{port: 80, targetPort: 8080}], selector: {app: api}}
"#;
        Registry::from_config(&crate::config::parse(std::path::Path::new("c.yaml"), cluster).unwrap())
    }

    fn build(last: &mut LastGood, text: &str) -> RouteSet {
        let wp = ObjectRef { namespace: "demo".into(), name: "waypoint".into() };
        last.build(&[Source { file: "r.yaml".into(), text: text.into() }], &registry(), &wp, "heddle-system")
    }

    #[test]
    fn a_broken_edit_keeps_the_last_good_version_and_says_so() {
        let mut last = LastGood::default();
        let good = build(&mut last, ROUTE);
        assert!(good.statuses()[0].accepted, "{:?}", good.statuses());
        let broken = build(&mut last, &ROUTE.replace("PathPrefix", "Nonsense"));
        let s = &broken.statuses()[0];
        assert!(s.accepted && !s.problems.is_empty(), "{s:?}");
        assert!(s.notes.iter().any(|n| n.contains("last good version")), "{s:?}");
        assert!(broken.table.has_routes(&ObjectRef { namespace: "demo".into(), name: "api".into() }));
        // Fixed, then deleted: nothing is kept any more.
        assert!(build(&mut last, ROUTE).statuses()[0].problems.is_empty());
        assert!(build(&mut last, "").statuses().is_empty());
        let new_broken = build(&mut last, &ROUTE.replace("PathPrefix", "Nonsense"));
        assert!(!new_broken.statuses()[0].accepted, "a new object has no last good version");
    }
}
