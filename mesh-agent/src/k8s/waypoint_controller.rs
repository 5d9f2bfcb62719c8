//! The waypoint controller (`mesh-agent controller`): turns Gateways of
//! class [`WAYPOINT_CLASS`] into running waypoints, as istiod's deployment
//! controller does for `istio-waypoint`.
//!
//! At start it applies the `GatewayClass` (controller
//! [`CONTROLLER_NAME`]) and marks it accepted. Then, on every change of a
//! Gateway (and every [`RESYNC`]), for each waypoint Gateway it
//! server-side-applies the objects of [`super::waypoint_objects`] (field
//! manager [`FIELD_MANAGER`], forced: the controller owns them), keeps the
//! `ClusterRoleBinding` of the waypoint role listing every waypoint's
//! account, copies the CA's trust bundle into the Gateway's namespace, and
//! writes the Gateway's status (`Accepted`, `Programmed` or why not, and
//! its address). Objects are re-applied only when what the controller
//! wants changed or at a resync, so a quiet cluster sees no writes; a
//! reconcile that hit a problem is retried after [`RETRY`].
//!
//! Deleting a Gateway deletes its objects through their owner references
//! (the API server's garbage collector). One task; runs as its own
//! Deployment with its own account, apart from the CA.

use std::{collections::HashMap, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    api::{Api, DynamicObject, Patch, PatchParams},
    core::{ApiResource, GroupVersionKind},
    Client,
};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    convert::{is_waypoint, WAYPOINT_CLASS},
    route_source::CONTROLLER_NAME,
    source::{crd_installed, gateways, wait_synced, ReadyWait, Watch},
    waypoint_objects::{self as objects, GatewayRef, MeshSettings, TRUST_BUNDLE_CONFIGMAP, TRUST_BUNDLE_KEY},
};

/// The field manager of everything the controller applies.
pub const FIELD_MANAGER: &str = "heddle-waypoint-controller";
/// How often everything is re-applied even without changes.
const RESYNC: Duration = Duration::from_mins(5);
/// How soon a reconcile that hit a problem (an apply refused, the trust
/// bundle not published yet, the `GatewayClass` not applied) is retried.
const RETRY: Duration = Duration::from_secs(5);

/// Controller settings.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// What the waypoint Deployments run with.
    pub mesh: MeshSettings,
    /// The namespace of the CA's trust bundle `ConfigMap`.
    pub ca_namespace: String,
}

/// Why the controller cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The Gateway API CRDs are not installed.
    #[error(
        "the Gateway API CRDs (gateway.networking.k8s.io/v1 Gateway) are not installed: \
         install the standard channel first"
    )]
    NoGatewayApi,
    /// A watch ended before its first list.
    #[error(transparent)]
    Source(#[from] super::source::SourceError),
}

fn resource(api_version: &str, kind: &str, plural: &str) -> ApiResource {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// Runs the controller until `stop`.
pub async fn run(client: Client, settings: ControllerSettings, stop: CancellationToken) -> Result<(), ControllerError> {
    let gw_res = gateways();
    if !crd_installed(&client, &gw_res).await {
        return Err(ControllerError::NoGatewayApi);
    }
    let changed = Arc::new(Notify::new());
    let store = Watch { name: "gateways", changed: changed.clone(), stop: stop.clone() }
        .start_dynamic(Api::all_with(client.clone(), &gw_res), &gw_res);
    wait_synced(vec![("gateways", Box::new(store.clone()) as Box<dyn ReadyWait>)]).await?;
    let mut controller = Controller { client, settings, applied: HashMap::new() };
    let mut class_applied = false;
    let mut last_resync = tokio::time::Instant::now();
    loop {
        let now = tokio::time::Instant::now();
        if now.duration_since(last_resync) >= RESYNC {
            controller.applied.clear();
            last_resync = now;
        }
        let all: Vec<Value> = store.state().iter().filter_map(|g| serde_json::to_value(g.as_ref()).ok()).collect();
        if !class_applied {
            class_applied = controller.apply_class().await;
        }
        let troubled = !controller.reconcile(&all).await || !class_applied;
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = changed.notified() => tokio::time::sleep(Duration::from_millis(50)).await,
            () = tokio::time::sleep(if troubled { RETRY } else { RESYNC }) => {}
        }
    }
}

struct Controller {
    client: Client,
    settings: ControllerSettings,
    /// What was last applied, per object key, so unchanged objects are not re-sent.
    applied: HashMap<String, Value>,
}

impl Controller {
    /// Applies the `GatewayClass` and its accepted status; whether it could.
    async fn apply_class(&self) -> bool {
        let res = resource("gateway.networking.k8s.io/v1", "GatewayClass", "gatewayclasses");
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &res);
        let class = json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": WAYPOINT_CLASS, "labels": {"app.kubernetes.io/managed-by": "heddle"}},
            "spec": {"controllerName": CONTROLLER_NAME,
                     "description": "Heddle waypoints: L7 proxies for the services that opt in"}
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        match api.patch(WAYPOINT_CLASS, &pp, &Patch::Apply(&class)).await {
            Ok(obj) => {
                let now = timestamp();
                let status = json!({"status": {"conditions": [{
                    "type": "Accepted", "status": "True", "reason": "Accepted",
                    "message": "handled by Heddle's waypoint controller",
                    "observedGeneration": obj.metadata.generation.unwrap_or(0), "lastTransitionTime": now}]}});
                if let Err(e) = api.patch_status(WAYPOINT_CLASS, &PatchParams::default(), &Patch::Merge(&status)).await
                {
                    tracing::warn!(error = %e, "cannot write the GatewayClass status");
                }
                tracing::info!(class = WAYPOINT_CLASS, "GatewayClass applied");
                true
            }
            Err(e) => {
                tracing::error!(class = WAYPOINT_CLASS, error = %e, "cannot apply the GatewayClass; retrying");
                false
            }
        }
    }

    /// Brings every waypoint Gateway's objects and status up to date;
    /// whether all of them are programmed.
    async fn reconcile(&mut self, all: &[Value]) -> bool {
        let mut all_ok = true;
        let mut waypoints: Vec<(GatewayRef, Value)> = all
            .iter()
            .filter(|g| is_waypoint(g))
            .filter_map(|g| Some((GatewayRef::from_object(g)?, g.clone())))
            .collect();
        waypoints.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
        let bundle = self.trust_bundle().await;
        let mut problems: Vec<Option<String>> = Vec::new();
        let mut bound: Vec<GatewayRef> = Vec::new();
        for (gw, _) in &waypoints {
            let mut problem = gw.replicas.clone().err();
            let mut wanted =
                vec![objects::service_account(gw), objects::service(gw), objects::deployment(gw, &self.settings.mesh)];
            wanted.extend(objects::trust_bundle(gw, bundle.as_deref()));
            for o in &wanted {
                let kind = o["kind"].as_str().unwrap_or_default();
                if let Err(e) = self.apply(o, Some(gw)).await {
                    tracing::error!(gateway = %format!("{}/{}", gw.namespace, gw.name), kind, error = %e, "cannot apply");
                    problem = Some(format!("{kind} {}: {e}", o["metadata"]["name"].as_str().unwrap_or_default()));
                    // Without its own account, the waypoint gets no role.
                    if kind == "ServiceAccount" {
                        break;
                    }
                } else if kind == "ServiceAccount" {
                    bound.push(gw.clone());
                }
            }
            problems.push(problem);
        }
        // Only accounts the controller made for a waypoint get the role.
        let binding_error = self.apply(&objects::binding(&bound), None).await.err();
        if let Some(e) = &binding_error {
            tracing::error!(error = %e, "cannot apply the waypoints' ClusterRoleBinding");
        }
        for ((gw, obj), mut problem) in waypoints.iter().zip(problems) {
            if let Some(e) = &binding_error {
                problem.get_or_insert_with(|| format!("ClusterRoleBinding {}: {e}", objects::WAYPOINT_BINDING));
            }
            if bundle.is_none() {
                problem.get_or_insert_with(|| {
                    format!("the CA has not published {}/{TRUST_BUNDLE_CONFIGMAP} yet", self.settings.ca_namespace)
                });
            }
            all_ok &= problem.is_none();
            self.write_status(gw, obj, problem.as_deref()).await;
        }
        all_ok && binding_error.is_none()
    }

    /// The CA's published bundle.
    async fn trust_bundle(&self) -> Option<String> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.settings.ca_namespace);
        match api.get_opt(TRUST_BUNDLE_CONFIGMAP).await {
            Ok(cm) => cm?.data?.remove(TRUST_BUNDLE_KEY),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the CA's trust bundle");
                None
            }
        }
    }

    /// Server-side applies `obj` unless the same was applied before. With
    /// `owner`, an object of that name that exists and is not controlled by
    /// that Gateway (nor, for the shared `ConfigMap`, managed by Heddle) is
    /// left alone and reported: a Gateway never takes over a user's
    /// Service, Deployment or account by naming itself after it.
    async fn apply(&mut self, obj: &Value, owner: Option<&GatewayRef>) -> Result<(), String> {
        let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or_default();
        let (api_version, kind, ns, name) =
            (s("/apiVersion"), s("/kind"), s("/metadata/namespace"), s("/metadata/name"));
        let key = format!("{api_version}/{kind}/{ns}/{name}");
        if self.applied.get(&key) == Some(obj) {
            return Ok(());
        }
        let plural = match kind {
            "ServiceAccount" => "serviceaccounts",
            "Service" => "services",
            "ConfigMap" => "configmaps",
            "Deployment" => "deployments",
            "ClusterRoleBinding" => "clusterrolebindings",
            other => unreachable!("the controller applies no {other}"),
        };
        let res = resource(api_version, kind, plural);
        let api: Api<DynamicObject> = if ns.is_empty() {
            Api::all_with(self.client.clone(), &res)
        } else {
            Api::namespaced_with(self.client.clone(), ns, &res)
        };
        if let Some(gw) = owner {
            if !self.applied.contains_key(&key) {
                let existing = api.get_opt(name).await.map_err(|e| e.to_string())?;
                if let Some(existing) = existing {
                    if !objects::may_manage(&existing.metadata, gw) {
                        return Err(format!(
                            "{kind} {ns}/{name} exists and is not this waypoint's (not controlled by Gateway {}/{}): \
                             left alone; rename the Gateway",
                            gw.namespace, gw.name
                        ));
                    }
                }
            }
        }
        api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj))
            .await
            .map_err(|e| e.to_string())?;
        self.applied.insert(key, obj.clone());
        Ok(())
    }

    /// Writes the Gateway's status when its conditions changed.
    async fn write_status(&self, gw: &GatewayRef, current: &Value, problem: Option<&str>) {
        let status = objects::gateway_status(gw, problem, &timestamp());
        if objects::same_conditions(current.pointer("/status/conditions"), status.get("conditions"))
            && current.pointer("/status/addresses") == status.get("addresses")
        {
            return;
        }
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &gw.namespace, &gateways());
        match api.patch_status(&gw.name, &PatchParams::default(), &Patch::Merge(&json!({"status": status}))).await {
            Ok(_) => tracing::info!(
                gateway = %format!("{}/{}", gw.namespace, gw.name),
                programmed = problem.is_none(),
                "waypoint Gateway status written"
            ),
            Err(e) => {
                tracing::warn!(gateway = %format!("{}/{}", gw.namespace, gw.name), error = %e, "cannot write status");
            }
        }
    }
}

fn timestamp() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    now.round(k8s_openapi::jiff::Unit::Second).unwrap_or(now).to_string()
}
