//! What a waypoint Gateway becomes, as pure functions: the objects the
//! waypoint controller ([`super::waypoint_controller`]) applies for a
//! `gateway.networking.k8s.io/v1` Gateway of class
//! [`super::convert::WAYPOINT_CLASS`] (what `istioctl waypoint apply`
//! gets from istiod's deployment controller), and the Gateway's status.
//!
//! For Gateway `ns/name`: a `ServiceAccount` `name` (the waypoint's SPIFFE
//! identity is `spiffe://<td>/ns/<ns>/sa/<name>`), a `Deployment` `name` running
//! `mesh-agent waypoint --kubernetes` as that account, a `Service` `name`
//! (HBONE 15008, metrics 15020) and a copy of the trust bundle `ConfigMap`
//! in `ns` (a volume cannot mount another namespace's). All but the shared
//! `ConfigMap` are owned by the Gateway (`ownerReferences`), so deleting the
//! Gateway deletes them (the `ConfigMap` stays: it holds only public
//! roots). The
//! pods carry [`crate::config::GATEWAY_NAME_LABEL`]`: name`, which is how the
//! node agents know them (and never capture them).
//!
//! Replicas: with the Gateway annotation [`REPLICAS_ANNOTATION`] the
//! Deployment gets that many; without it the controller leaves
//! `spec.replicas` out of what it applies, so `kubectl scale` or a
//! `HorizontalPodAutoscaler` owns the count (Kubernetes creates one). Each
//! replica is a full waypoint (routes, balancing and limits per replica).

use serde_json::{json, Value};

use crate::config::GATEWAY_NAME_LABEL;

/// The waypoint's HBONE port.
pub const HBONE_PORT: u16 = mesh_common::PORT_TUNNEL;
/// The waypoint's metrics port.
pub const METRICS_PORT: u16 = 15020;
/// The trust bundle `ConfigMap` (the CA's, and the controller's copies).
pub const TRUST_BUNDLE_CONFIGMAP: &str = "heddle-trust-bundle";
/// The trust bundle's key in it.
pub const TRUST_BUNDLE_KEY: &str = "root-cert.pem";
/// The `ClusterRole` every waypoint's account is bound to (read the
/// registry and routes, write route status).
pub const WAYPOINT_CLUSTER_ROLE: &str = "heddle-waypoint";
/// The `ClusterRoleBinding` the controller keeps listing every waypoint's account.
pub const WAYPOINT_BINDING: &str = "heddle-waypoints";

/// The Gateway annotation that sets the waypoint Deployment's replicas.
pub const REPLICAS_ANNOTATION: &str = "heddle.dev/waypoint-replicas";
/// The most replicas the annotation may ask for.
pub const MAX_REPLICAS: i32 = 100;

/// What every waypoint Deployment needs to know about the mesh.
#[derive(Clone, Debug)]
pub struct MeshSettings {
    /// The image (the controller's own, the same binary).
    pub image: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The CA's address, `host:port`.
    pub ca_addr: String,
    /// Trace settings the waypoints get (`HEDDLE_OTLP_*`, `HEDDLE_TRACE_*`).
    pub trace_env: Vec<(&'static str, String)>,
}

/// A Gateway as the controller reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.uid`, for owner references.
    pub uid: String,
    /// `metadata.generation`.
    pub generation: i64,
    /// Replicas asked for by [`REPLICAS_ANNOTATION`] (`None`: not set), or
    /// why its value is refused.
    pub replicas: Result<Option<i32>, String>,
}

impl GatewayRef {
    /// Reads the fields from an unstructured Gateway.
    #[must_use]
    pub fn from_object(obj: &Value) -> Option<Self> {
        let meta = obj.get("metadata")?;
        Some(Self {
            namespace: meta.get("namespace")?.as_str()?.to_owned(),
            name: meta.get("name")?.as_str()?.to_owned(),
            uid: meta.get("uid").and_then(Value::as_str).unwrap_or_default().to_owned(),
            generation: meta.get("generation").and_then(Value::as_i64).unwrap_or(0),
            replicas: replicas(meta.pointer(&format!("/annotations/{}", REPLICAS_ANNOTATION.replace('/', "~1")))),
        })
    }

    fn owner(&self) -> Value {
        json!([{
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "name": self.name, "uid": self.uid,
            "controller": true
        }])
    }

    fn metadata(&self, name: &str) -> Value {
        json!({
            "name": name, "namespace": self.namespace,
            "labels": {GATEWAY_NAME_LABEL: self.name, "app.kubernetes.io/managed-by": "heddle",
                       "app.kubernetes.io/component": "waypoint"},
            "ownerReferences": self.owner()
        })
    }
}

/// The replica annotation's value: absent, a count in `1..=MAX_REPLICAS`,
/// or refused with a reason naming it.
fn replicas(value: Option<&Value>) -> Result<Option<i32>, String> {
    let Some(v) = value else { return Ok(None) };
    let text = v.as_str().unwrap_or_default();
    match text.trim().parse::<i32>() {
        Ok(n) if (1..=MAX_REPLICAS).contains(&n) => Ok(Some(n)),
        _ => Err(format!("annotation {REPLICAS_ANNOTATION}: {text:?} is not a replica count (1 to {MAX_REPLICAS})")),
    }
}

/// Whether the controller may apply over an existing object with `meta`
/// for `gw`: it is controlled by that Gateway, or (the shared trust bundle
/// `ConfigMap`, which no Gateway owns) labelled as managed by Heddle.
#[must_use]
pub fn may_manage(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, gw: &GatewayRef) -> bool {
    let owned = meta
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Gateway" && o.uid == gw.uid && o.controller == Some(true));
    let shared = meta.name.as_deref() == Some(TRUST_BUNDLE_CONFIGMAP)
        && meta.labels.as_ref().and_then(|l| l.get("app.kubernetes.io/managed-by")).map(String::as_str)
            == Some("heddle");
    owned || shared
}

/// The waypoint's `ServiceAccount`.
#[must_use]
pub fn service_account(gw: &GatewayRef) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": gw.metadata(&gw.name)})
}

/// The waypoint's `Service`.
#[must_use]
pub fn service(gw: &GatewayRef) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service", "metadata": gw.metadata(&gw.name),
        "spec": {
            "type": "ClusterIP",
            "selector": {GATEWAY_NAME_LABEL: gw.name},
            "ports": [
                {"name": "mesh", "port": HBONE_PORT, "targetPort": HBONE_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT, "protocol": "TCP"}
            ]
        }
    })
}

/// The copy of the trust bundle in the waypoint's namespace, or `None` when
/// the CA has not published one yet.
#[must_use]
pub fn trust_bundle(gw: &GatewayRef, bundle: Option<&str>) -> Option<Value> {
    // Shared by every waypoint of the namespace: neither owned by nor
    // labelled for one Gateway (it stays when the last one goes).
    let meta = json!({"name": TRUST_BUNDLE_CONFIGMAP, "namespace": gw.namespace,
                      "labels": {"app.kubernetes.io/managed-by": "heddle"}});
    Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {TRUST_BUNDLE_KEY: bundle?}}))
}

/// The waypoint's `Deployment`.
#[must_use]
pub fn deployment(gw: &GatewayRef, mesh: &MeshSettings) -> Value {
    let env = |name: &str, value: &str| json!({"name": name, "value": value});
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let labels = json!({GATEWAY_NAME_LABEL: gw.name, "app.kubernetes.io/managed-by": "heddle",
                        "app.kubernetes.io/component": "waypoint"});
    let mut d = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": gw.metadata(&gw.name),
        "spec": {
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: gw.name}},
            "template": {
                "metadata": {"labels": labels,
                             "annotations": {"prometheus.io/scrape": "true",
                                             "prometheus.io/port": METRICS_PORT.to_string()}},
                "spec": {
                    "serviceAccountName": gw.name,
                    "terminationGracePeriodSeconds": 10,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "waypoint",
                        "image": mesh.image,
                        "command": ["mesh-agent", "waypoint", "--kubernetes"],
                        "env": [
                            env("HEDDLE_WAYPOINT", &format!("{}/{}", gw.namespace, gw.name)),
                            field("POD_NAME", "metadata.name"),
                            field("NODE_NAME", "spec.nodeName"),
                            env("HEDDLE_TRUST_DOMAIN", &mesh.trust_domain),
                            env("HEDDLE_CA_ADDR", &mesh.ca_addr),
                            env("HEDDLE_CA_TOKEN_FILE", "/var/run/secrets/heddle/ca-token"),
                            env("HEDDLE_TRUST_BUNDLE", "/var/run/heddle/trust/root-cert.pem"),
                            env("HEDDLE_LOG_FORMAT", "json")
                        ],
                        "ports": [
                            {"name": "mesh", "containerPort": HBONE_PORT, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}
                        ],
                        "readinessProbe": {"tcpSocket": {"port": HBONE_PORT}, "periodSeconds": 2},
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                      "limits": {"memory": "256Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [
                            {"name": "ca-token", "mountPath": "/var/run/secrets/heddle", "readOnly": true},
                            {"name": "trust-bundle", "mountPath": "/var/run/heddle/trust", "readOnly": true}
                        ]
                    }],
                    "volumes": [
                        {"name": "ca-token", "projected": {"sources": [{"serviceAccountToken":
                            {"audience": super::ca_auth::CA_AUDIENCE, "expirationSeconds": 3600, "path": "ca-token"}}]}},
                        {"name": "trust-bundle", "configMap": {"name": TRUST_BUNDLE_CONFIGMAP,
                            "items": [{"key": TRUST_BUNDLE_KEY, "path": TRUST_BUNDLE_KEY}]}}
                    ]
                }
            }
        }
    });
    if let Some(env) = d["spec"]["template"]["spec"]["containers"][0]["env"].as_array_mut() {
        env.extend(mesh.trace_env.iter().map(|(k, v)| json!({"name": k, "value": v})));
    }
    if let Ok(Some(n)) = gw.replicas {
        d["spec"]["replicas"] = json!(n);
    }
    d
}

/// The `ClusterRoleBinding` of [`WAYPOINT_CLUSTER_ROLE`] to every waypoint's account.
#[must_use]
pub fn binding(gateways: &[GatewayRef]) -> Value {
    let subjects: Vec<Value> =
        gateways.iter().map(|g| json!({"kind": "ServiceAccount", "name": g.name, "namespace": g.namespace})).collect();
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": WAYPOINT_BINDING, "labels": {"app.kubernetes.io/managed-by": "heddle"}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": WAYPOINT_CLUSTER_ROLE},
        "subjects": subjects
    })
}

/// Gateway API conditions of a waypoint Gateway: `Accepted`, and
/// `Programmed` with `problem` as the reason it is not (an apply failed).
#[must_use]
pub fn gateway_status(gw: &GatewayRef, problem: Option<&str>, now: &str) -> Value {
    let condition = |kind: &str, ok: bool, reason: &str, message: String| {
        json!({"type": kind, "status": if ok { "True" } else { "False" }, "reason": reason, "message": message,
               "observedGeneration": gw.generation, "lastTransitionTime": now})
    };
    let programmed = match problem {
        None => condition(
            "Programmed",
            true,
            "Programmed",
            format!("Deployment, Service and ServiceAccount {} applied", gw.name),
        ),
        Some(p) => condition("Programmed", false, "Invalid", p.to_owned()),
    };
    json!({
        "conditions": [
            condition("Accepted", true, "Accepted", "accepted by Heddle's waypoint controller".to_owned()),
            programmed
        ],
        "addresses": [{"type": "Hostname", "value": format!("{}.{}.svc.cluster.local", gw.name, gw.namespace)}]
    })
}

/// Whether two condition lists say the same thing (ignoring timestamps).
#[must_use]
pub fn same_conditions(a: Option<&Value>, b: Option<&Value>) -> bool {
    let strip = |v: Option<&Value>| -> Vec<(String, String, String, String, i64)> {
        v.and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|c| {
                let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
                let generation = c.get("observedGeneration").and_then(Value::as_i64).unwrap_or(0);
                (s("type"), s("status"), s("reason"), s("message"), generation)
            })
            .collect()
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw() -> GatewayRef {
        GatewayRef::from_object(&json!({
            "metadata": {"name": "waypoint", "namespace": "shop", "uid": "u-1", "generation": 2},
            "spec": {"gatewayClassName": "heddle-waypoint"}
        }))
        .unwrap()
    }

    fn mesh() -> MeshSettings {
        MeshSettings {
            image: "ghcr.io/heddle-mesh/heddle:0.1.0".into(),
            trust_domain: "cluster.local".into(),
            ca_addr: "heddle-ca.heddle-system.svc:15012".into(),
            trace_env: vec![("HEDDLE_OTLP_ENDPOINT", "http://otel-collector.observability:4317".into())],
        }
    }

    #[test]
    fn the_deployment_runs_the_waypoint_as_its_own_account_with_the_gateway_label() {
        let d = deployment(&gw(), &mesh());
        let spec = &d["spec"]["template"]["spec"];
        assert_eq!(spec["serviceAccountName"], "waypoint");
        assert_eq!(d["spec"]["template"]["metadata"]["labels"][GATEWAY_NAME_LABEL], "waypoint");
        assert_eq!(d["spec"]["selector"]["matchLabels"][GATEWAY_NAME_LABEL], "waypoint");
        let c = &spec["containers"][0];
        assert_eq!(c["command"], json!(["mesh-agent", "waypoint", "--kubernetes"]));
        assert!(c["env"].as_array().unwrap().contains(&json!({"name": "HEDDLE_WAYPOINT", "value": "shop/waypoint"})));
        // The controller's trace settings reach its waypoints.
        assert!(c["env"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "HEDDLE_OTLP_ENDPOINT", "value": "http://otel-collector.observability:4317"})));
        assert_eq!(d["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"], "heddle-ca");
    }

    fn with_replicas(value: &str) -> GatewayRef {
        GatewayRef::from_object(&json!({
            "metadata": {"name": "waypoint", "namespace": "shop", "uid": "u-1",
                         "annotations": {REPLICAS_ANNOTATION: value}},
        }))
        .unwrap()
    }

    #[test]
    fn replicas_come_from_the_annotation_or_are_left_to_kubectl_scale_and_autoscalers() {
        assert!(deployment(&gw(), &mesh())["spec"].get("replicas").is_none(), "not owned without the annotation");
        assert_eq!(deployment(&with_replicas("3"), &mesh())["spec"]["replicas"], 3);
        for bad in ["0", "-1", "three", "101", ""] {
            let g = with_replicas(bad);
            let e = g.replicas.clone().unwrap_err();
            assert!(e.contains(REPLICAS_ANNOTATION) && e.contains(&format!("{bad:?}")), "{e}");
            assert!(deployment(&g, &mesh())["spec"].get("replicas").is_none(), "a refused value sets nothing");
        }
    }

    #[test]
    fn the_service_selects_the_waypoint_pods_on_the_hbone_port() {
        let s = service(&gw());
        assert_eq!(s["spec"]["selector"][GATEWAY_NAME_LABEL], "waypoint");
        assert_eq!(s["spec"]["ports"][0]["port"], 15008);
        assert_eq!(service_account(&gw())["metadata"]["name"], "waypoint");
        assert!(trust_bundle(&gw(), None).is_none());
        let cm = trust_bundle(&gw(), Some("PEM")).unwrap();
        assert_eq!(cm["data"][TRUST_BUNDLE_KEY], "PEM");
        assert!(cm["metadata"].get("ownerReferences").is_none());
    }

    #[test]
    fn status_says_programmed_or_why_not_and_compares_without_timestamps() {
        let ok = gateway_status(&gw(), None, "2026-01-01T00:00:00Z");
        assert_eq!(ok["conditions"][1]["status"], "True");
        assert_eq!(ok["conditions"][1]["observedGeneration"], 2);
        let later = gateway_status(&gw(), None, "2026-01-02T00:00:00Z");
        assert!(same_conditions(ok.get("conditions"), later.get("conditions")));
        let bad = gateway_status(&gw(), Some("Deployment: forbidden"), "2026-01-01T00:00:00Z");
        assert_eq!(bad["conditions"][1]["status"], "False");
        assert!(!same_conditions(ok.get("conditions"), bad.get("conditions")));
        let b = binding(&[gw()]);
        assert_eq!(b["subjects"][0], json!({"kind": "ServiceAccount", "name": "waypoint", "namespace": "shop"}));
    }

    #[test]
    fn the_objects_are_valid_kubernetes_objects() {
        use k8s_openapi::api::{
            apps::v1::Deployment,
            core::v1::{ConfigMap, Service, ServiceAccount},
            rbac::v1::ClusterRoleBinding,
        };
        let d: Deployment = serde_json::from_value(deployment(&gw(), &mesh())).unwrap();
        let spec = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(spec.containers[0].ports.as_ref().unwrap()[0].container_port, 15008);
        let _: Service = serde_json::from_value(service(&gw())).unwrap();
        let _: ServiceAccount = serde_json::from_value(service_account(&gw())).unwrap();
        let _: ConfigMap = serde_json::from_value(trust_bundle(&gw(), Some("PEM")).unwrap()).unwrap();
        let _: ClusterRoleBinding = serde_json::from_value(binding(&[gw()])).unwrap();
    }

    #[test]
    fn an_existing_object_is_managed_only_when_this_gateway_controls_it() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        let theirs = ObjectMeta { name: Some("waypoint".into()), ..ObjectMeta::default() };
        assert!(!may_manage(&theirs, &gw()), "a user's object of the same name");
        let ours: ObjectMeta = serde_json::from_value(service(&gw())["metadata"].clone()).unwrap();
        assert!(may_manage(&ours, &gw()));
        let mut other = gw();
        other.uid = "u-2".into();
        assert!(!may_manage(&ours, &other), "a Gateway re-created with the same name but another uid");
        let cm: ObjectMeta =
            serde_json::from_value(trust_bundle(&gw(), Some("P")).unwrap()["metadata"].clone()).unwrap();
        assert!(may_manage(&cm, &gw()));
    }
}
