//! `heddle enroll NAMESPACE` / `heddle unenroll NAMESPACE`: set or remove the
//! label [`MESH_LABEL`]`=enabled` on a Namespace through the API server (a
//! JSON merge patch, so no other label or field is touched and no
//! read-modify-write race exists), with the kubeconfig found as kubectl finds
//! it ([`kube_client`]). The agents watch the label: new connections of the
//! namespace's pods go through the mesh within a second.

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    api::{Patch, PatchParams},
    config::KubeConfigOptions,
    Api, Client, Config,
};

pub use super::convert::{ENABLED, MESH_LABEL};

/// Why an API operation of the CLI failed, in words an operator acts on.
#[derive(Debug, thiserror::Error)]
pub enum CliKubeError {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("no Kubernetes configuration: {0} (set KUBECONFIG or use ~/.kube/config)")]
    Config(String),
    /// The API server could not be reached.
    #[error("cannot reach the API server at {url}: {message}")]
    Unreachable {
        /// The API server URL from the kubeconfig.
        url: String,
        /// Cause.
        message: String,
    },
    /// The namespace does not exist.
    #[error("namespace {0} not found")]
    NamespaceNotFound(String),
    /// RBAC refused.
    #[error("forbidden: {message} (the kubeconfig's user needs `{verb}` on {resource})")]
    Forbidden {
        /// The API server's message.
        message: String,
        /// The verb needed.
        verb: &'static str,
        /// The resource, e.g. `namespaces`.
        resource: &'static str,
    },
    /// Any other refusal of the API server.
    #[error("the API server refused: {0}")]
    Api(String),
}

/// A client from the kubeconfig (`KUBECONFIG`, `~/.kube/config`, or the
/// in-cluster service account), optionally for a named context; returns the
/// API server URL too, for error messages.
pub async fn kube_client(context: Option<&str>) -> Result<(Client, String), CliKubeError> {
    let config = match context {
        Some(ctx) => Config::from_kubeconfig(&KubeConfigOptions {
            context: Some(ctx.to_owned()),
            ..KubeConfigOptions::default()
        })
        .await
        .map_err(|e| CliKubeError::Config(format!("context {ctx}: {e}")))?,
        None => Config::infer().await.map_err(|e| CliKubeError::Config(e.to_string()))?,
    };
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| CliKubeError::Config(e.to_string()))?;
    Ok((client, url.trim_end_matches('/').to_owned()))
}

/// Maps a kube error to what the operator should read.
#[must_use]
pub fn explain(e: kube::Error, url: &str, verb: &'static str, resource: &'static str) -> CliKubeError {
    match e {
        kube::Error::Api(s) if s.code == 403 => CliKubeError::Forbidden { message: s.message, verb, resource },
        kube::Error::Api(s) => CliKubeError::Api(format!("{} ({})", s.message, s.code)),
        other => CliKubeError::Unreachable { url: url.to_owned(), message: other.to_string() },
    }
}

/// What `enroll`/`unenroll` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The label was changed.
    Changed,
    /// Nothing to do: already in the wanted state.
    Unchanged,
}

/// Sets (`enroll = true`) or removes the enrollment label of `namespace`.
pub async fn set_enrollment(
    client: &Client,
    url: &str,
    namespace: &str,
    enroll: bool,
) -> Result<Outcome, CliKubeError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let current = api
        .get_opt(namespace)
        .await
        .map_err(|e| explain(e, url, "get", "namespaces"))?
        .ok_or_else(|| CliKubeError::NamespaceNotFound(namespace.to_owned()))?;
    let label = current.metadata.labels.as_ref().and_then(|l| l.get(MESH_LABEL)).cloned();
    let wanted = enroll.then(|| ENABLED.to_owned());
    if label == wanted {
        return Ok(Outcome::Unchanged);
    }
    // JSON merge patch (RFC 7386): a null removes the key.
    let patch = serde_json::json!({ "metadata": { "labels": { MESH_LABEL: wanted } } });
    match api.patch(namespace, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(Outcome::Changed),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(CliKubeError::NamespaceNotFound(namespace.to_owned())),
        Err(e) => Err(explain(e, url, "patch", "namespaces")),
    }
}
