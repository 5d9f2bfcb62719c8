//! Legacy (non-aggregated) discovery: `/version`, `/api`, `/apis`,
//! `/api/v1` and `/apis/<group>/<version>`, answered from the types the
//! store serves, so `kube::Discovery::run`, `Client::list_api_group_resources`
//! and "does this CRD exist?" checks work. A custom resource appears once
//! the test registers it.
//!
//! Deviation: aggregated discovery (`Accept: ...;g=apidiscovery.k8s.io;v=v2`)
//! is not served; `/api` and `/apis` always answer the v1 documents
//! (kube's `Discovery::run_aggregated` then fails to decode, so use `run`).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::resources::TypeInfo;
use super::store::Store;

/// `/version`: a 1.34 server.
#[must_use]
pub fn version() -> Value {
    json!({
        "major": "1", "minor": "34", "gitVersion": "v1.34.0-heddle-standin",
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2025-08-27T00:00:00Z", "goVersion": "go1.24.6", "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `/api`: `APIVersions`.
#[must_use]
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": server_address }],
    })
}

/// `/apis`: `APIGroupList` of every non-core group.
#[must_use]
pub fn groups(store: &Store) -> Value {
    let mut by_group: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for t in store.types.iter().filter(|t| !t.info.group.is_empty()) {
        let versions = by_group.entry(&t.info.group).or_default();
        if !versions.contains(&t.info.version.as_str()) {
            versions.push(&t.info.version);
        }
    }
    let groups: Vec<Value> = by_group
        .into_iter()
        .map(|(group, versions)| {
            let gv = |v: &str| json!({ "groupVersion": format!("{group}/{v}"), "version": v });
            json!({
                "name": group,
                "versions": versions.iter().map(|v| gv(v)).collect::<Vec<_>>(),
                "preferredVersion": gv(versions[0]),
            })
        })
        .collect();
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
}

fn verbs(info: &TypeInfo) -> Vec<&'static str> {
    if info.stored {
        vec!["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
    } else {
        vec!["create"]
    }
}

/// `/api/v1` or `/apis/<group>/<version>`: `APIResourceList`, with the
/// `status` and (for pods) `portforward` subresources.
#[must_use]
pub fn resources(store: &Store, group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for t in store.types.iter().filter(|t| t.info.group == group && t.info.version == version) {
        let info = &t.info;
        resources.push(json!({
            "name": info.plural,
            "singularName": info.kind.to_lowercase(),
            "namespaced": info.namespaced,
            "kind": info.kind,
            "verbs": verbs(info),
        }));
        if info.has_status_subresource() {
            resources.push(json!({
                "name": format!("{}/status", info.plural), "singularName": "", "namespaced": info.namespaced,
                "kind": info.kind, "verbs": ["get", "patch", "update"],
            }));
        }
        if info.group.is_empty() && info.kind == "Pod" {
            resources.push(json!({
                "name": "pods/portforward", "singularName": "", "namespaced": true,
                "kind": "PodPortForwardOptions", "verbs": ["create", "get"],
            }));
        }
    }
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") },
        "resources": resources,
    })
}
