//! `heddle waypoint apply|delete|list`: the short form of writing a
//! waypoint Gateway (class [`WAYPOINT_CLASS`], one `HBONE` listener on
//! 15008, as `istioctl waypoint apply` writes for `istio-waypoint`), and
//! optionally labelling the namespace [`USE_WAYPOINT_LABEL`]`: <name>` so
//! its services' traffic goes through it. The waypoint controller
//! ([`super::waypoint_controller`]) does the rest.

use kube::{
    api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
    Client,
};
use serde_json::{json, Value};

use super::{
    cli_enroll::{explain, CliKubeError},
    convert::{is_waypoint, USE_WAYPOINT_LABEL, WAYPOINT_CLASS},
    source::gateways,
};

/// The field manager of the CLI's writes.
pub const FIELD_MANAGER: &str = "heddle-cli";

/// The Gateway `heddle waypoint apply` writes.
#[must_use]
pub fn gateway(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"gatewayClassName": WAYPOINT_CLASS,
                 "listeners": [{"name": "mesh", "port": mesh_common::PORT_TUNNEL, "protocol": "HBONE"}]}
    })
}

/// Applies the waypoint Gateway `namespace/name`; with `enroll`, labels the
/// namespace to use it.
pub async fn apply(client: &Client, url: &str, namespace: &str, name: &str, enroll: bool) -> Result<(), CliKubeError> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &gateways());
    api.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(gateway(namespace, name)))
        .await
        .map_err(|e| gateway_error(e, url, "patch"))?;
    if enroll {
        label_namespace(client, url, namespace, Some(name)).await?;
    }
    Ok(())
}

/// Deletes the waypoint Gateway, and the namespace's label if it named it.
pub async fn delete(client: &Client, url: &str, namespace: &str, name: &str) -> Result<bool, CliKubeError> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &gateways());
    if let Some(gw) = api.get_opt(name).await.map_err(|e| gateway_error(e, url, "get"))? {
        let class = gw.data.pointer("/spec/gatewayClassName").and_then(Value::as_str).unwrap_or_default();
        if class != WAYPOINT_CLASS {
            return Err(CliKubeError::Api(format!(
                "Gateway {namespace}/{name} is of class {class:?}, not a waypoint ({WAYPOINT_CLASS}): not deleted"
            )));
        }
    }
    let existed = match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(e) => return Err(gateway_error(e, url, "delete")),
    };
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let labelled = namespaces
        .get_opt(namespace)
        .await
        .map_err(|e| explain(e, url, "get", "namespaces"))?
        .and_then(|n| n.metadata.labels?.get(USE_WAYPOINT_LABEL).cloned());
    if labelled.as_deref() == Some(name) {
        label_namespace(client, url, namespace, None).await?;
    }
    Ok(existed)
}

/// One waypoint as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `Programmed` condition status (`True`, `False`, or `Unknown` before the controller wrote it).
    pub programmed: String,
    /// Its message.
    pub message: String,
}

/// The waypoint Gateways in `namespace`, or everywhere.
pub async fn list(client: &Client, url: &str, namespace: Option<&str>) -> Result<Vec<Listed>, CliKubeError> {
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &gateways()),
        None => Api::all_with(client.clone(), &gateways()),
    };
    let items = api.list(&ListParams::default()).await.map_err(|e| gateway_error(e, url, "list"))?;
    let mut out: Vec<Listed> = items
        .items
        .iter()
        .filter(|g| is_waypoint(&g.data))
        .map(|g| {
            let programmed = g
                .data
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Programmed"));
            let field = |k: &str| programmed.and_then(|c| c[k].as_str()).map(str::to_owned);
            Listed {
                namespace: g.metadata.namespace.clone().unwrap_or_default(),
                name: g.metadata.name.clone().unwrap_or_default(),
                programmed: field("status").unwrap_or_else(|| "Unknown".to_owned()),
                message: field("message").unwrap_or_else(|| "waiting for the waypoint controller".to_owned()),
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(out)
}

async fn label_namespace(
    client: &Client,
    url: &str,
    namespace: &str,
    waypoint: Option<&str>,
) -> Result<(), CliKubeError> {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let patch = json!({"metadata": {"labels": {USE_WAYPOINT_LABEL: waypoint}}});
    match api.patch(namespace, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(CliKubeError::NamespaceNotFound(namespace.to_owned())),
        Err(e) => Err(explain(e, url, "patch", "namespaces")),
    }
}

fn gateway_error(e: kube::Error, url: &str, verb: &'static str) -> CliKubeError {
    match e {
        kube::Error::Api(s)
            if s.code == 404 && s.message.contains("the server could not find the requested resource") =>
        {
            CliKubeError::Api(
                "the Gateway API CRDs are not installed (gateway.networking.k8s.io/v1 Gateway): install them first"
                    .to_owned(),
            )
        }
        other => explain(other, url, verb, "gateways.gateway.networking.k8s.io"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_is_a_waypoint_with_one_hbone_listener() {
        let g = gateway("shop", "waypoint");
        assert_eq!(g["spec"]["gatewayClassName"], "heddle-waypoint");
        assert_eq!(g["spec"]["listeners"][0], json!({"name": "mesh", "port": 15008, "protocol": "HBONE"}));
        assert_eq!(g["metadata"]["namespace"], "shop");
    }
}
