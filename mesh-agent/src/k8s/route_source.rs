//! The routes of a waypoint in Kubernetes mode (`mesh-agent waypoint
//! --kubernetes`): reflectors on `gateway.networking.k8s.io/v1` `HTTPRoute`
//! and `GRPCRoute` objects, `v1beta1` `ReferenceGrant`s (which permit
//! cross-namespace backends), `heddle.dev/v1alpha1`
//! `HTTPLocalRateLimitPolicy` and `RetryBudgetPolicy` objects and, when Istio's CRDs are installed,
//! `networking.istio.io/v1` `VirtualService`s and `DestinationRule`s
//! (their status is Istio's to write: Heddle reports them in `heddle
//! routes` only), handed to the same compiler as the local
//! routes directory ([`crate::waypoint::routes`]) as one [`Source`] per
//! object, and the route status written back.
//!
//! Status: for every parentRef this waypoint owns, the route's
//! `status.parents[]` gets an entry with `controllerName`
//! [`CONTROLLER_NAME`] and the conditions `heddle routes` shows (`Accepted`,
//! `ResolvedRefs`), written with a merge patch of the `status` subresource
//! that keeps the entries of other controllers and of other waypoints (an
//! entry is this waypoint's when its parent Service uses this waypoint, or
//! no waypoint any more, which removes it when a label goes), with the
//! object's `resourceVersion` as a precondition so a concurrent writer is
//! never overwritten (a conflict is retried at the next change). A write
//! happens only when this waypoint's entries changed (ignoring
//! `lastTransitionTime`), so replicas of a waypoint computing the same
//! status do not fight. A failed write is logged and retried at the next
//! change; it never changes what is routed. Entries left by a waypoint that
//! was deleted stay until a route or label change touches them.
//!
//! Objects are handed over without `status`, `managedFields` and
//! `resourceVersion`, so a status write does not recompile the routes.

use std::{path::PathBuf, sync::Arc};

use kube::{
    api::{Api, DynamicObject, Patch, PatchParams},
    core::{ApiResource, GroupVersionKind},
    runtime::reflector::Store,
    Client,
};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::source::{crd_installed, wait_synced, ReadyWait, Watch};
use crate::{
    registry::{ObjectRef, Registry},
    waypoint::routes::{RouteSet, RouteStatus, Source},
};

/// The `controllerName` of Heddle's waypoints in route and Gateway status.
pub const CONTROLLER_NAME: &str = "heddle.dev/waypoint-controller";
/// The prefix of a [`Source`]'s `file` for an API object.
pub const ORIGIN_PREFIX: &str = "kubernetes:";

/// A route kind served by the API.
fn resource(kind: &str, plural: &str) -> ApiResource {
    gateway_resource("v1", kind, plural)
}

fn gateway_resource(version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GATEWAY_GROUP, version, kind), plural)
}

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// The route watches.
pub struct RouteWatch {
    stores: Vec<Store<DynamicObject>>,
    changed: Arc<Notify>,
    client: Client,
}

impl RouteWatch {
    /// Starts the watches of the three kinds and waits for the first lists of
    /// those whose CRD is installed (a CRD installed later is picked up by
    /// the retrying watch).
    pub async fn start(client: Client, stop: &CancellationToken) -> Result<Self, super::source::SourceError> {
        let changed = Arc::new(Notify::new());
        let mut stores = Vec::new();
        let mut required: Vec<(&'static str, Box<dyn ReadyWait>)> = Vec::new();
        for (name, group, version, kind) in [
            ("httproutes", GATEWAY_GROUP, "v1", "HTTPRoute"),
            ("grpcroutes", GATEWAY_GROUP, "v1", "GRPCRoute"),
            ("referencegrants", GATEWAY_GROUP, "v1beta1", "ReferenceGrant"),
            ("httplocalratelimitpolicies", crate::k8s::crd::GROUP, "v1alpha1", "HTTPLocalRateLimitPolicy"),
            ("retrybudgetpolicies", crate::k8s::crd::GROUP, "v1alpha1", "RetryBudgetPolicy"),
            // Istio's traffic API, read when Istio's CRDs are installed.
            ("virtualservices", "networking.istio.io", "v1", "VirtualService"),
            ("destinationrules", "networking.istio.io", "v1", "DestinationRule"),
            // L7 authorization: policies with targetRefs, JWT rules.
            ("authorizationpolicies", crate::k8s::crd::GROUP, "v1alpha1", "AuthorizationPolicy"),
            ("authorizationpolicies", "security.istio.io", "v1", "AuthorizationPolicy"),
            ("requestauthentications", "security.istio.io", "v1", "RequestAuthentication"),
        ] {
            let res = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), name);
            let installed = crd_installed(&client, &res).await;
            let watch = Watch { name, changed: changed.clone(), stop: stop.clone() };
            let store = watch.start_dynamic(Api::all_with(client.clone(), &res), &res);
            if installed {
                required.push((name, Box::new(store.clone())));
            } else if group == GATEWAY_GROUP {
                tracing::warn!(resource = name, "the Gateway API CRD is not installed; no such routes until it is");
            } else {
                // Istio's and Heddle's optional kinds: absent is normal.
                tracing::info!(resource = name, "CRD not installed; picked up if it is installed later");
            }
            stores.push(store);
        }
        wait_synced(required).await?;
        Ok(Self { stores, changed, client })
    }

    /// The objects as route sources, in a stable order.
    #[must_use]
    pub fn sources(&self) -> Vec<Source> {
        let mut out: Vec<Source> = self.stores.iter().flat_map(Store::state).filter_map(|o| source_of(&o)).collect();
        out.sort_by(|a, b| a.file.cmp(&b.file));
        out
    }

    /// Publishes [`Self::sources`] on every change until `stop`.
    pub async fn run(self, tx: watch::Sender<Vec<Source>>, stop: CancellationToken) {
        loop {
            let now = self.sources();
            tx.send_if_modified(|old| {
                let changed = *old != now;
                if changed {
                    old.clone_from(&now);
                }
                changed
            });
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.changed.notified() => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }

    /// A status writer on the same client.
    #[must_use]
    pub fn status_writer(&self) -> StatusWriter {
        StatusWriter { client: self.client.clone(), last: Arc::default() }
    }
}

/// An API object as a route source: `kubernetes:<kind>/<ns>/<name>`, its
/// JSON (which is YAML) without status and bookkeeping.
pub(crate) fn source_of(obj: &DynamicObject) -> Option<Source> {
    let mut value = serde_json::to_value(obj).ok()?;
    let kind = value.get("kind")?.as_str()?.to_ascii_lowercase();
    let meta = value.get_mut("metadata")?.as_object_mut()?;
    for k in ["managedFields", "resourceVersion", "uid", "creationTimestamp"] {
        meta.remove(k);
    }
    if let Some(Value::Object(a)) = meta.get_mut("annotations") {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    let ns = meta.get("namespace")?.as_str()?.to_owned();
    let name = meta.get("name")?.as_str()?.to_owned();
    value.as_object_mut()?.remove("status");
    Some(Source { file: PathBuf::from(format!("{ORIGIN_PREFIX}{kind}/{ns}/{name}")), text: value.to_string() })
}

/// Writes route status to the API.
#[derive(Clone)]
pub struct StatusWriter {
    client: Client,
    /// This waypoint's entries last written (or found empty), per route.
    last: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<Value>>>>,
}

impl StatusWriter {
    /// Writes the status of every API route in `set` whose conditions
    /// changed. Errors are logged, never returned: status is a report.
    pub async fn write(&self, set: &RouteSet, registry: &Registry, waypoint: &ObjectRef) {
        // A parent entry of this controller is this waypoint's to manage when
        // its Service uses this waypoint, or no existing waypoint.
        let mine = |entry: &Value| {
            let r = &entry["parentRef"];
            let id = ObjectRef {
                namespace: r["namespace"].as_str().unwrap_or_default().to_owned(),
                name: r["name"].as_str().unwrap_or_default().to_owned(),
            };
            registry.service(&id).is_none_or(|s| registry.waypoint_of(s).is_none_or(|w| w == waypoint))
        };
        for status in set.statuses() {
            let Some((kind, ns, name)) = api_object(status) else {
                continue;
            };
            if let Some(istio) = istio_kind(kind) {
                self.write_istio(status, istio, ns, name).await;
                continue;
            }
            let ours = parent_entries(status);
            {
                let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match last.get(&status.route) {
                    Some(prev) if *prev == ours => continue,
                    None if ours.is_empty() => {
                        last.insert(status.route.clone(), ours);
                        continue;
                    }
                    _ => {}
                }
            }
            let (kind_name, plural) = match kind {
                "httproute" => ("HTTPRoute", "httproutes"),
                "grpcroute" => ("GRPCRoute", "grpcroutes"),
                _ => continue,
            };
            let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &resource(kind_name, plural));
            let current = match api.get_status(name).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::debug!(route = %status.route, error = %e, "cannot read route status");
                    continue;
                }
            };
            let existing: Vec<Value> =
                current.data.pointer("/status/parents").and_then(Value::as_array).cloned().unwrap_or_default();
            let generation = current.metadata.generation;
            let Some(parents) = merged_parents(&existing, ours.clone(), generation, &mine) else {
                self.remember(&status.route, ours);
                continue;
            };
            let patch = json!({"metadata": {"resourceVersion": current.metadata.resource_version},
                               "status": {"parents": parents}});
            match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    tracing::info!(route = %status.route, accepted = status.accepted, "route status written");
                    self.remember(&status.route, ours);
                }
                Err(e) => tracing::warn!(route = %status.route, error = %e, "cannot write route status"),
            }
        }
    }
}

impl StatusWriter {
    /// Istio's status of a `VirtualService` or `DestinationRule`: an
    /// `Accepted` condition (`True`, or `False` naming every problem) and
    /// `observedGeneration`, as an Istio control plane would report what it
    /// did with the object; written only when it changes.
    async fn write_istio(&self, status: &RouteStatus, (kind, plural): (&str, &str), ns: &str, name: &str) {
        let ours = vec![istio_condition(status)];
        if self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&status.route) == Some(&ours) {
            return;
        }
        let res = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("networking.istio.io", "v1", kind), plural);
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &res);
        let current = match api.get_status(name).await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(object = %status.route, error = %e, "cannot read the object's status");
                return;
            }
        };
        let previous = current.data.pointer("/status/conditions/0").cloned();
        let mut condition = ours[0].clone();
        let now = k8s_openapi::jiff::Timestamp::now().round(k8s_openapi::jiff::Unit::Second).map(|t| t.to_string());
        condition["lastTransitionTime"] = previous
            .filter(|p| p.get("status") == condition.get("status"))
            .and_then(|p| p.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| json!(now.unwrap_or_default()));
        let patch = json!({"metadata": {"resourceVersion": current.metadata.resource_version},
                           "status": {"conditions": [condition], "observedGeneration": current.metadata.generation.unwrap_or(0)}});
        match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                tracing::info!(object = %status.route, accepted = status.accepted, "status written");
                self.remember(&status.route, ours);
            }
            Err(e) => tracing::warn!(object = %status.route, error = %e, "cannot write the object's status"),
        }
    }

    fn remember(&self, route: &str, ours: Vec<Value>) {
        self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(route.to_owned(), ours);
    }
}

/// The Istio kinds whose status the waypoint writes: (kind, plural).
fn istio_kind(kind: &str) -> Option<(&'static str, &'static str)> {
    match kind {
        "virtualservice" => Some(("VirtualService", "virtualservices")),
        "destinationrule" => Some(("DestinationRule", "destinationrules")),
        _ => None,
    }
}

/// The `Accepted` condition of an Istio object (without its time).
fn istio_condition(status: &RouteStatus) -> Value {
    let ok = status.accepted && status.problems.is_empty();
    let (reason, message) = if ok {
        ("Accepted", "in force at the Heddle waypoint".to_owned())
    } else {
        let mut m = status.problems.join("; ");
        if status.accepted {
            m.push_str(" (the last accepted version stays in force)");
        }
        ("Invalid", m)
    };
    json!({"type": "Accepted", "status": if ok { "True" } else { "False" }, "reason": reason, "message": message})
}

/// `(kind, namespace, name)` of a status whose route came from the API.
fn api_object(status: &RouteStatus) -> Option<(&str, &str, &str)> {
    status.source.strip_prefix(ORIGIN_PREFIX)?;
    let mut parts = status.route.splitn(3, '/');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// This waypoint's `status.parents[]` entries for a route (without
/// timestamps and generations, which [`merged_parents`] adds).
#[must_use]
pub fn parent_entries(status: &RouteStatus) -> Vec<Value> {
    status
        .parents
        .iter()
        .filter(|p| p.attached)
        .filter_map(|p| {
            let (ns, name) = p.parent.split_once('/')?;
            let mut parent_ref = json!({"group": "", "kind": "Service", "namespace": ns, "name": name});
            if let Some(port) = p.port {
                parent_ref["port"] = json!(port);
            }
            let conditions: Vec<Value> = p
                .conditions
                .iter()
                .map(|c| json!({"type": c.kind, "status": c.status, "reason": c.reason, "message": c.message}))
                .collect();
            Some(json!({"parentRef": parent_ref, "controllerName": CONTROLLER_NAME, "conditions": conditions}))
        })
        .collect()
}

/// `existing` with this waypoint's entries (this controller's, for which
/// `is_mine` holds) replaced by `ours`, or `None` when that changes nothing
/// but timestamps. Conditions whose status did not change keep their
/// `lastTransitionTime`.
#[must_use]
pub fn merged_parents(
    existing: &[Value],
    ours: Vec<Value>,
    generation: Option<i64>,
    is_mine: &dyn Fn(&Value) -> bool,
) -> Option<Vec<Value>> {
    let mine = |v: &&Value| v.get("controllerName").and_then(Value::as_str) == Some(CONTROLLER_NAME) && is_mine(v);
    let old: Vec<&Value> = existing.iter().filter(mine).collect();
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(cs) = v.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                c.remove("lastTransitionTime");
                c.remove("observedGeneration");
            }
        }
        v
    };
    let old_stripped: Vec<Value> = old.iter().map(|v| strip(v)).collect();
    let same_generation = old.iter().all(|v| {
        v.get("conditions")
            .and_then(Value::as_array)
            .is_none_or(|cs| cs.iter().all(|c| c.get("observedGeneration").and_then(Value::as_i64) == generation))
    });
    if old_stripped == ours && same_generation {
        return None;
    }
    let now = k8s_openapi::jiff::Timestamp::now().round(k8s_openapi::jiff::Unit::Second).ok()?.to_string();
    let previous = |parent: &Value, kind: &Value| -> Option<Value> {
        old.iter()
            .find(|o| o.get("parentRef") == Some(parent))?
            .get("conditions")?
            .as_array()?
            .iter()
            .find(|c| c.get("type") == Some(kind))
            .cloned()
    };
    let mut out: Vec<Value> = existing.iter().filter(|v| !mine(v)).cloned().collect();
    for mut entry in ours {
        let parent = entry["parentRef"].clone();
        if let Some(cs) = entry.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in cs.iter_mut() {
                let since = previous(&parent, &c["type"])
                    .filter(|p| p.get("status") == c.get("status"))
                    .and_then(|p| p.get("lastTransitionTime").cloned())
                    .unwrap_or_else(|| json!(now));
                c["lastTransitionTime"] = since;
                c["observedGeneration"] = json!(generation.unwrap_or(0));
            }
        }
        out.push(entry);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::waypoint::routes::{Condition, ParentStatus};

    fn status(accepted: bool) -> RouteStatus {
        RouteStatus {
            route: "httproute/demo/split".into(),
            source: "kubernetes:httproute/demo/split#1".into(),
            accepted,
            parents: vec![
                ParentStatus {
                    parent: "demo/api".into(),
                    port: Some(80),
                    attached: true,
                    conditions: vec![Condition {
                        kind: "Accepted",
                        status: if accepted { "True" } else { "False" },
                        reason: if accepted { "Accepted" } else { "UnsupportedValue" },
                        message: "m".into(),
                    }],
                },
                ParentStatus { parent: "other/x".into(), port: None, attached: false, conditions: vec![] },
            ],
            problems: vec![],
            notes: vec![],
            rules: 1,
        }
    }

    #[test]
    fn writes_entries_only_for_parents_this_waypoint_owns() {
        let entries = parent_entries(&status(true));
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0]["parentRef"],
            json!({"group": "", "kind": "Service", "namespace": "demo", "name": "api", "port": 80})
        );
        assert_eq!(entries[0]["controllerName"], CONTROLLER_NAME);
        assert_eq!(api_object(&status(true)), Some(("httproute", "demo", "split")));
        let mut file = status(true);
        file.source = "/etc/routes/a.yaml#1".into();
        assert_eq!(api_object(&file), None);
    }

    #[test]
    fn keeps_other_controllers_entries_and_skips_writes_that_change_nothing() {
        let other =
            json!({"parentRef": {"name": "gw"}, "controllerName": "istio.io/gateway-controller", "conditions": []});
        let first =
            merged_parents(std::slice::from_ref(&other), parent_entries(&status(true)), Some(3), &|_| true).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(first[0], other);
        let t = first[1]["conditions"][0]["lastTransitionTime"].clone();
        assert!(t.as_str().is_some_and(|s| s.ends_with('Z')), "{t}");
        assert_eq!(first[1]["conditions"][0]["observedGeneration"], 3);
        assert_eq!(merged_parents(&first, parent_entries(&status(true)), Some(3), &|_| true), None);
        let bumped = merged_parents(&first, parent_entries(&status(true)), Some(4), &|_| true).unwrap();
        assert_eq!(bumped[1]["conditions"][0]["lastTransitionTime"], t, "same status keeps its transition time");
        let flipped = merged_parents(&first, parent_entries(&status(false)), Some(3), &|_| true).unwrap();
        assert_eq!(flipped[1]["conditions"][0]["status"], "False");
    }

    #[test]
    fn hands_objects_over_without_status_or_bookkeeping() {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "split", "namespace": "demo", "resourceVersion": "9", "uid": "u", "generation": 2},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "api"}]},
            "status": {"parents": []}
        }))
        .unwrap();
        let s = source_of(&obj).unwrap();
        assert_eq!(s.file, PathBuf::from("kubernetes:httproute/demo/split"));
        let v: Value = serde_json::from_str(&s.text).unwrap();
        assert!(v.get("status").is_none() && v["metadata"].get("resourceVersion").is_none());
        assert_eq!(v["metadata"]["generation"], 2);
    }

    #[test]
    fn another_waypoints_entries_are_kept_and_an_orphaned_one_is_removed() {
        let theirs = json!({"parentRef": {"group": "", "kind": "Service", "namespace": "demo", "name": "b"},
                            "controllerName": CONTROLLER_NAME, "conditions": []});
        let not_theirs = |v: &Value| v["parentRef"]["name"] != "b";
        let merged =
            merged_parents(std::slice::from_ref(&theirs), parent_entries(&status(true)), Some(1), &not_theirs).unwrap();
        assert_eq!(merged.len(), 2, "{merged:?}");
        assert_eq!(merged[0], theirs);
        // The label went: nothing of ours is wanted, our old entry goes.
        let removed = merged_parents(&merged, Vec::new(), Some(1), &not_theirs).unwrap();
        assert_eq!(removed, vec![theirs]);
    }
}
