//! The Kubernetes source of `mesh-agent run --kubernetes`: kube-rs
//! reflectors (list, then watch; re-list on `410 Gone`; exponential back-off
//! on errors) on
//! - Namespaces (the enrollment label and the inbound-mode annotation),
//! - Pods on this node (`fieldSelector=spec.nodeName=<node>`: what this
//!   agent captures) and Pods on other nodes (`spec.nodeName!=<node>`: the
//!   identities of remote destinations, as ztunnel learns them from istiod),
//! - Services and `EndpointSlices` (virtual IPs to endpoints),
//! - `AuthorizationPolicies`: `heddle.dev/v1alpha1`, and `security.istio.io/v1`
//!   when that CRD is installed (checked at start; the watch keeps retrying
//!   with back-off, so a CRD installed later is picked up),
//! - `gateway.networking.k8s.io/v1` Gateways (the waypoints), likewise when
//!   the Gateway API CRDs are installed.
//!
//! The same source feeds a waypoint ([`Role::Waypoint`]): the registry
//! only, without policies (enforced by the node agents) or network
//! namespace discovery (a waypoint captures nothing).
//!
//! Every event wakes one rebuild task, which waits [`DEBOUNCE`] for a burst
//! to settle, converts the stores ([`super::convert`]), finds local pods'
//! network namespaces ([`super::netns_discovery`]) and publishes a new
//! [`Registry`] and [`PolicySet`] on the same `watch` channels the local
//! file feeds — only when they changed. A label flip reaches capture in well
//! under a second.
//!
//! Start-up waits until every required store has listed once, so the agent
//! never enforces a partial policy set or enrolls from a partial view; the
//! Istio policies are required too when their CRD exists. If the API server
//! is unreachable later, the stores keep the last state (the agent keeps
//! enforcing it) while the watchers retry.

use std::{
    collections::HashMap,
    fs::File,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{Api, DynamicObject},
    core::{ApiResource, GroupVersionKind},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt as _,
    },
    Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::{
    convert,
    netns_discovery::{NetnsFinder, Wanted},
};
use crate::{
    authz::source::PolicyStatus,
    policy::{model::AuthorizationPolicy, PolicySet},
    registry::{ObjectRef, Registry, ServiceEntry, SharedRegistry, Workload},
};

/// How long a burst of events may last before the rebuild.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// How often a pod whose network namespace was not found is retried.
const NETNS_RETRY: Duration = Duration::from_secs(1);
/// How long start-up waits for the first lists before saying so.
const SYNC_WARN_AFTER: Duration = Duration::from_secs(10);

/// Who runs the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// A node agent: registry with its pods' network namespaces, policies.
    #[default]
    Agent,
    /// A waypoint: the registry only.
    Waypoint,
}

/// What the source needs to know about this agent.
#[derive(Clone, Debug)]
pub struct KubeSettings {
    /// Agent or waypoint.
    pub role: Role,
    /// This node's name (`spec.nodeName` of its pods).
    pub node: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The namespace whose policies apply mesh-wide.
    pub root_namespace: String,
    /// Search only these directories of named network namespaces for pods
    /// (`--netns-dir`); empty: `/run/netns` and every process's namespace.
    pub netns_dirs: Vec<PathBuf>,
}

/// Errors starting the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A store's writer went away before its first list (the watch task
    /// ended).
    #[error("the {0} watch ended before its first list")]
    WatchEnded(&'static str),
}

/// The API resource of Heddle's `AuthorizationPolicy`, from the CRD type.
fn heddle_policies() -> ApiResource {
    ApiResource::erase::<super::crd::HeddleAuthorizationPolicy>(&())
}

/// The API resource of Istio's `AuthorizationPolicy`.
fn istio_policies() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy"),
        "authorizationpolicies",
    )
}

/// The API resource of Gateway API's `Gateway`.
#[must_use]
pub fn gateways() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"), "gateways")
}

/// The reflectors' read sides.
struct Stores {
    gateways: Store<DynamicObject>,
    namespaces: Store<Namespace>,
    local_pods: Store<Pod>,
    remote_pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    policies: Vec<Store<DynamicObject>>,
}

/// The running source: publishes into the channels given to [`KubeSource::start`].
pub struct KubeSource {
    settings: KubeSettings,
    stores: Stores,
    changed: Arc<Notify>,
    finder: Arc<Mutex<NetnsFinder>>,
    registry_tx: watch::Sender<SharedRegistry>,
    policies_tx: watch::Sender<Arc<PolicySet>>,
    policy_status: Arc<Mutex<PolicyStatus>>,
    last: Option<(Vec<Workload>, Vec<ServiceEntry>, Vec<ObjectRef>)>,
    last_policies: Option<Vec<AuthorizationPolicy>>,
}

/// The channels a started source publishes on.
pub struct Published {
    /// Registry snapshots.
    pub registry: watch::Receiver<SharedRegistry>,
    /// Policy sets.
    pub policies: watch::Receiver<Arc<PolicySet>>,
    /// What `GET /policies` shows about the source.
    pub policy_status: Arc<Mutex<PolicyStatus>>,
}

impl KubeSource {
    /// Starts the watches, waits for their first lists and publishes the
    /// first snapshot. `home` is the agent's own network namespace.
    pub async fn start(
        client: Client,
        settings: KubeSettings,
        home: Arc<File>,
        stop: &CancellationToken,
    ) -> Result<(Self, Published), SourceError> {
        let changed = Arc::new(Notify::new());
        let spawn = |name: &'static str| Watch { name, changed: changed.clone(), stop: stop.clone() };
        let node = &settings.node;
        let namespaces = spawn("namespaces").start(Api::<Namespace>::all(client.clone()), watcher::Config::default());
        let local_pods = spawn("pods on this node").start(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        );
        let remote_pods = spawn("pods on other nodes").start(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName!={node}")),
        );
        let services = spawn("services").start(Api::<Service>::all(client.clone()), watcher::Config::default());
        let slices =
            spawn("endpointslices").start(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default());
        let gateway = gateways();
        let gateway_api = crd_installed(&client, &gateway).await;
        let gateway_store = spawn("gateways").start_dynamic(Api::all_with(client.clone(), &gateway), &gateway);
        let agent = settings.role == Role::Agent;
        let mut policy_stores = Vec::new();
        let mut istio_installed = false;
        if agent {
            let heddle = heddle_policies();
            policy_stores.push(
                spawn("heddle.dev authorizationpolicies")
                    .start_dynamic(Api::all_with(client.clone(), &heddle), &heddle),
            );
            let istio = istio_policies();
            istio_installed = crd_installed(&client, &istio).await;
            policy_stores.push(
                spawn("security.istio.io authorizationpolicies")
                    .start_dynamic(Api::all_with(client.clone(), &istio), &istio),
            );
        }
        tracing::info!(
            role = ?settings.role,
            istio_policies = istio_installed,
            gateway_api,
            "watching the Kubernetes API (security.istio.io policies are {}, the Gateway API is {} at start)",
            if istio_installed { "installed" } else { "not installed" },
            if gateway_api { "installed" } else { "not installed" },
        );

        let mut required: Vec<(&'static str, Box<dyn ReadyWait>)> = vec![
            ("namespaces", Box::new(namespaces.clone())),
            ("pods on this node", Box::new(local_pods.clone())),
            ("pods on other nodes", Box::new(remote_pods.clone())),
            ("services", Box::new(services.clone())),
            ("endpointslices", Box::new(slices.clone())),
        ];
        if let Some(heddle_store) = policy_stores.first() {
            required.push(("heddle.dev authorizationpolicies", Box::new(heddle_store.clone())));
        }
        if istio_installed {
            required.push(("security.istio.io authorizationpolicies", Box::new(policy_stores[1].clone())));
        }
        if gateway_api {
            required.push(("gateways", Box::new(gateway_store.clone())));
        }
        wait_synced(required).await?;

        let (registry_tx, registry) =
            watch::channel(Arc::new(Registry::from_parts(&settings.trust_domain, Vec::new(), Vec::new())));
        let (policies_tx, policies) = watch::channel(Arc::new(PolicySet::empty(&settings.root_namespace)));
        let policy_status =
            Arc::new(Mutex::new(PolicyStatus { source: Some("kubernetes".to_owned()), ..PolicyStatus::default() }));
        let finder = if settings.netns_dirs.is_empty() {
            NetnsFinder::new(home)
        } else {
            NetnsFinder::in_dirs(home, settings.netns_dirs.clone())
        };
        let mut source = Self {
            settings,
            stores: Stores {
                gateways: gateway_store,
                namespaces,
                local_pods,
                remote_pods,
                services,
                slices,
                policies: policy_stores,
            },
            changed,
            finder: Arc::new(Mutex::new(finder)),
            registry_tx,
            policies_tx,
            policy_status: policy_status.clone(),
            last: None,
            last_policies: None,
        };
        source.rebuild().await;
        Ok((source, Published { registry, policies, policy_status }))
    }

    /// Rebuilds on every change until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let pending = self.pending_netns();
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.changed.notified() => {
                    tokio::time::sleep(DEBOUNCE).await;
                }
                () = tokio::time::sleep(NETNS_RETRY), if pending => {}
            }
            self.rebuild().await;
        }
    }

    /// Whether an enrolled pod of this node is waiting for its namespace.
    fn pending_netns(&self) -> bool {
        self.settings.role == Role::Agent
            && self.last.as_ref().is_some_and(|(w, _, _)| {
                w.iter().any(|w| w.node == self.settings.node && w.enrolled && w.netns.is_none())
            })
    }

    async fn rebuild(&mut self) {
        let (workloads, services) = self.registry_parts().await;
        let waypoints = convert::waypoints(self.stores.gateways.state().iter().map(AsRef::as_ref));
        let unchanged =
            self.last.as_ref().is_some_and(|(w, s, wp)| *w == workloads && *s == services && *wp == waypoints);
        if !unchanged {
            let enrolled = workloads.iter().filter(|w| w.enrolled).count();
            tracing::info!(
                workloads = workloads.len(),
                enrolled,
                services = services.len(),
                waypoints = waypoints.len(),
                "registry updated from the Kubernetes API"
            );
            let registry = Registry::from_parts(&self.settings.trust_domain, workloads.clone(), services.clone())
                .with_waypoints(waypoints.clone());
            self.registry_tx.send_replace(Arc::new(registry));
            self.last = Some((workloads, services, waypoints));
        }
        if self.settings.role == Role::Agent {
            self.publish_policies();
        }
    }

    async fn registry_parts(&self) -> (Vec<Workload>, Vec<ServiceEntry>) {
        let td = &self.settings.trust_domain;
        let namespaces = convert::namespaces(self.stores.namespaces.state().iter().map(AsRef::as_ref));
        let local: Vec<(Workload, Option<String>)> = self
            .stores
            .local_pods
            .state()
            .iter()
            .filter_map(|p| {
                let w = convert::workload(p, &namespaces, td, None)?;
                Some((w, p.metadata.uid.clone()))
            })
            .collect();
        let local = if self.settings.role == Role::Agent {
            self.with_netns(local).await
        } else {
            local.into_iter().map(|(w, _)| w).collect()
        };
        let remote = self
            .stores
            .remote_pods
            .state()
            .iter()
            .filter_map(|p| convert::workload(p, &namespaces, td, None))
            .collect::<Vec<_>>();
        let mut workloads: Vec<Workload> = remote.into_iter().chain(local).collect();
        workloads.sort_by(|a, b| a.id.cmp(&b.id));
        // Slices grouped by (namespace, service) once, so a rebuild is linear
        // in the number of objects.
        let slices = self.stores.slices.state();
        let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for slice in &slices {
            let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
            if let Some(svc) = slice.metadata.labels.as_ref().and_then(|l| l.get(convert::SERVICE_NAME_LABEL)) {
                by_service.entry((ns, svc.as_str())).or_default().push(slice);
            }
        }
        let mut services: Vec<ServiceEntry> = self
            .stores
            .services
            .state()
            .iter()
            .filter_map(|s| {
                let key = (
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    s.metadata.name.as_deref().unwrap_or_default(),
                );
                let mine = by_service.get(&key).map_or(&[][..], Vec::as_slice);
                let ns_waypoint = namespaces.get(key.0).and_then(|n| n.use_waypoint.as_deref());
                convert::service(s, mine, ns_waypoint)
            })
            .collect();
        services.sort_by(|a, b| a.id.cmp(&b.id));
        (workloads, services)
    }

    /// Fills in the network namespace of enrolled local pods (a blocking
    /// scan, on a blocking thread).
    async fn with_netns(&self, local: Vec<(Workload, Option<String>)>) -> Vec<Workload> {
        let wanted: Vec<Wanted> = local
            .iter()
            .filter(|(w, _)| w.enrolled)
            .flat_map(|(w, uid)| w.ips.iter().map(|ip| Wanted { ip: *ip, pod_uid: uid.clone() }))
            .collect();
        let mut local: Vec<Workload> = local.into_iter().map(|(w, _)| w).collect();
        if wanted.is_empty() {
            return local;
        }
        let finder = self.finder.clone();
        let found = tokio::task::spawn_blocking(move || finder.lock().expect("netns finder lock").find(&wanted))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        for w in local.iter_mut().filter(|w| w.enrolled) {
            w.netns = w.ips.iter().find_map(|ip| found.get(ip).cloned());
            if w.netns.is_none() {
                tracing::debug!(pod = %w.id, "network namespace not found yet");
            }
        }
        local
    }

    fn publish_policies(&mut self) {
        let mut objects: Vec<AuthorizationPolicy> = Vec::new();
        let mut unreadable = Vec::new();
        for store in &self.stores.policies {
            for obj in store.state() {
                match policy_object(&obj) {
                    Ok(p) => objects.push(p),
                    Err(e) => unreadable.push(e),
                }
            }
        }
        objects.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name, &a.api_version).cmp(&(
                &b.metadata.namespace,
                &b.metadata.name,
                &b.api_version,
            ))
        });
        if self.last_policies.as_ref() == Some(&objects) {
            return;
        }
        let (set, errors) = PolicySet::from_objects(objects.clone(), &self.settings.root_namespace);
        let mut errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        errors.extend(unreadable);
        for e in &errors {
            tracing::error!(error = %e, "policy rejected; the other policies apply");
        }
        let warnings: Vec<String> = set.warnings().iter().map(ToString::to_string).collect();
        tracing::info!(policies = set.len(), rejected = errors.len(), "policies updated from the Kubernetes API");
        {
            let mut status = self.policy_status.lock().expect("status lock");
            status.errors = errors;
            status.warnings = warnings;
            status.content_hash = None;
            status.source_error = None;
        }
        self.policies_tx.send_replace(Arc::new(set));
        self.last_policies = Some(objects);
    }
}

/// A policy object from the API in the engine's envelope (which keeps the
/// spec raw and validates it strictly when compiled).
pub(crate) fn policy_object(obj: &DynamicObject) -> Result<AuthorizationPolicy, String> {
    let value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    serde_json::from_value(value).map_err(|e| {
        format!(
            "policy {}/{}: {e}",
            obj.metadata.namespace.as_deref().unwrap_or(""),
            obj.metadata.name.as_deref().unwrap_or("")
        )
    })
}

/// Waits for the first list of every store, saying so when it takes long.
pub(crate) async fn wait_synced(stores: Vec<(&'static str, Box<dyn ReadyWait>)>) -> Result<(), SourceError> {
    for (name, store) in stores {
        if let Ok(r) = tokio::time::timeout(SYNC_WARN_AFTER, store.ready()).await {
            r.map_err(|()| SourceError::WatchEnded(name))?;
        } else {
            tracing::warn!(resource = name, "still waiting for the first list from the Kubernetes API");
            store.ready().await.map_err(|()| SourceError::WatchEnded(name))?;
        }
    }
    Ok(())
}

/// Whether the API server serves `resource` (its CRD is installed). Only a
/// 404 means "not installed"; any other error is retried, so a transient
/// discovery failure never starts the agent without those policies (fail
/// closed: it waits).
pub(crate) async fn crd_installed(client: &Client, resource: &ApiResource) -> bool {
    let mut attempt: u32 = 0;
    loop {
        match client.list_api_group_resources(&resource.api_version).await {
            Ok(list) => return list.resources.iter().any(|r| r.name == resource.plural),
            Err(kube::Error::Api(status)) if status.code == 404 => return false,
            Err(e) => {
                if attempt.is_multiple_of(10) {
                    tracing::warn!(api = %resource.api_version, error = %e, "cannot tell whether the API group is served; retrying");
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Waiting for a store's first list, whatever its type.
pub(crate) trait ReadyWait: Send {
    fn ready(&self) -> futures::future::BoxFuture<'_, Result<(), ()>>;
}

impl<K> ReadyWait for Store<K>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync,
{
    fn ready(&self) -> futures::future::BoxFuture<'_, Result<(), ()>> {
        Box::pin(async move { self.wait_until_ready().await.map_err(|_| ()) })
    }
}

/// One watch task: a reflector on a resource, waking the rebuild on each
/// event and logging errors (the watcher retries with back-off).
pub(crate) struct Watch {
    pub(crate) name: &'static str,
    pub(crate) changed: Arc<Notify>,
    pub(crate) stop: CancellationToken,
}

impl Watch {
    fn start<K>(self, api: Api<K>, config: watcher::Config) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    {
        let (reader, writer) = reflector::store();
        let stream = watcher(api, config).default_backoff().modify(strip::<K>).reflect(writer);
        self.drive(stream);
        reader
    }

    pub(crate) fn start_dynamic(self, api: Api<DynamicObject>, resource: &ApiResource) -> Store<DynamicObject> {
        let writer = reflector::store::Writer::new(resource.clone());
        let reader = writer.as_reader();
        let stream = watcher(api, watcher::Config::default()).default_backoff().reflect(writer);
        self.drive(stream);
        reader
    }

    fn drive<K, S>(self, stream: S)
    where
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
        K: Send + 'static,
    {
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut errors: HashMap<String, u64> = HashMap::new();
            loop {
                let item = tokio::select! {
                    () = self.stop.cancelled() => return,
                    item = stream.next() => item,
                };
                match item {
                    None => return,
                    Some(Ok(_)) => {
                        errors.clear();
                        self.changed.notify_one();
                    }
                    Some(Err(e)) => {
                        // Logged at warn the first time, then quietly while
                        // the same error repeats under back-off.
                        let msg = e.to_string();
                        let seen = errors.entry(msg.clone()).or_default();
                        if *seen == 0 {
                            tracing::warn!(resource = self.name, error = %msg, "Kubernetes watch failed; retrying with back-off");
                        } else {
                            tracing::debug!(resource = self.name, error = %msg, "Kubernetes watch still failing");
                        }
                        *seen += 1;
                    }
                }
            }
        });
    }
}

/// Drops what the mesh never reads from a cached object, to keep the
/// stores small: managed fields, and the last-applied annotation.
fn strip<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_policy_object_from_the_api_into_the_engine_envelope() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "heddle.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow-web", "namespace": "demo", "resourceVersion": "7", "uid": "u",
                         "managedFields": [], "annotations": {"heddle.dev/dry-run": "true"}},
            "spec": {"action": "ALLOW", "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]},
            "status": {}
        }))
        .unwrap();
        let p = policy_object(&obj).unwrap();
        assert_eq!(p.api_version, "heddle.dev/v1alpha1");
        assert_eq!(p.metadata.name, "allow-web");
        assert_eq!(p.metadata.namespace.as_deref(), Some("demo"));
        assert_eq!(p.spec["action"], "ALLOW");
        let (set, errors) = PolicySet::from_objects([p], "heddle-system");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(set.len(), 1);
    }
}
