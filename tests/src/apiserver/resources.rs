//! The resource types the stand-in serves: where they live in the URL
//! space, how their lists are named and which fields can be selected.
//!
//! Built-in types are fixed ([`builtins`]); custom resources are added by
//! [`super::ApiServer::register_crd`]. Field labels per type are the ones
//! the real registry's `GetAttrs`/field-label conversion accepts (for pods,
//! `pkg/registry/core/pod/strategy.go` `ToSelectableFields`); anything
//! else is a `BadRequest`, as upstream ("field label not supported").

use serde_json::Value;

/// A custom resource the test makes servable (see
/// [`super::ApiServer::register_crd`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// `group/version`, e.g. `heddle.dev/v1alpha1`.
    pub api_version: String,
    /// The kind, e.g. `AuthorizationPolicy`.
    pub kind: String,
    /// The plural resource name in URLs, e.g. `authorizationpolicies`.
    pub plural: String,
    /// Namespaced (true) or cluster-scoped (false).
    pub namespaced: bool,
}

impl Resource {
    /// A namespaced custom resource.
    #[must_use]
    pub fn namespaced(api_version: &str, kind: &str, plural: &str) -> Self {
        Self { api_version: api_version.to_owned(), kind: kind.to_owned(), plural: plural.to_owned(), namespaced: true }
    }
}

/// Everything the server knows about one resource type.
#[derive(Debug, Clone)]
#[allow(clippy::struct_excessive_bools)] // independent facts about a type, each read in one place
pub struct TypeInfo {
    /// `v1` or `group/version`.
    pub api_version: String,
    /// Empty for the core group.
    pub group: String,
    /// The version.
    pub version: String,
    /// The kind.
    pub kind: String,
    /// The plural name used in URLs.
    pub plural: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Custom resources are served as unstructured objects: their list items
    /// keep `apiVersion`/`kind` (typed built-in lists do not).
    pub custom: bool,
    /// Extra selectable fields beyond `metadata.name`/`metadata.namespace`:
    /// (field label, JSON pointer, default when absent).
    pub fields: &'static [(&'static str, &'static str, &'static str)],
    /// DELETE answers with the deleted object (registry `ReturnDeletedObject`)
    /// rather than a `Success` Status.
    pub return_deleted_object: bool,
    /// Whether objects are stored (`TokenReview` is create-only, never stored).
    pub stored: bool,
}

/// Pod field labels, from `pkg/registry/core/pod/strategy.go`.
const POD_FIELDS: &[(&str, &str, &str)] = &[
    ("spec.nodeName", "/spec/nodeName", ""),
    ("spec.restartPolicy", "/spec/restartPolicy", ""),
    ("spec.schedulerName", "/spec/schedulerName", ""),
    ("spec.serviceAccountName", "/spec/serviceAccountName", ""),
    ("spec.hostNetwork", "/spec/hostNetwork", "false"),
    ("status.phase", "/status/phase", ""),
    ("status.podIP", "/status/podIP", ""),
    ("status.nominatedNodeName", "/status/nominatedNodeName", ""),
];

/// Secret field labels (`pkg/registry/core/secret/strategy.go`).
const SECRET_FIELDS: &[(&str, &str, &str)] = &[("type", "/type", "")];

/// Namespace field labels (`pkg/registry/core/namespace/strategy.go`).
const NAMESPACE_FIELDS: &[(&str, &str, &str)] = &[("status.phase", "/status/phase", "")];

fn builtin(
    api_version: &str,
    kind: &str,
    plural: &str,
    namespaced: bool,
    fields: &'static [(&'static str, &'static str, &'static str)],
    return_deleted_object: bool,
) -> TypeInfo {
    let (group, version) = split_api_version(api_version);
    TypeInfo {
        api_version: api_version.to_owned(),
        group,
        version,
        kind: kind.to_owned(),
        plural: plural.to_owned(),
        namespaced,
        custom: false,
        fields,
        return_deleted_object,
        stored: true,
    }
}

/// The built-in types. `return_deleted_object` follows each registry:
/// pods and namespaces answer DELETE with the object, configmaps, secrets,
/// services, endpointslices, serviceaccounts, deployments and
/// clusterrolebindings with a `Success` Status (deployments and service
/// accounts are stored as given: no controller, no token, no status).
#[must_use]
pub fn builtins() -> Vec<TypeInfo> {
    let mut token_review = builtin("authentication.k8s.io/v1", "TokenReview", "tokenreviews", false, &[], false);
    token_review.stored = false;
    vec![
        builtin("v1", "Namespace", "namespaces", false, NAMESPACE_FIELDS, true),
        builtin("v1", "Pod", "pods", true, POD_FIELDS, true),
        builtin("v1", "Service", "services", true, &[], false),
        builtin("v1", "Secret", "secrets", true, SECRET_FIELDS, false),
        builtin("v1", "ConfigMap", "configmaps", true, &[], false),
        builtin("discovery.k8s.io/v1", "EndpointSlice", "endpointslices", true, &[], false),
        builtin("v1", "ServiceAccount", "serviceaccounts", true, &[], false),
        builtin("apps/v1", "Deployment", "deployments", true, &[], false),
        builtin("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "clusterrolebindings", false, &[], false),
        token_review,
    ]
}

/// A custom resource's type: unstructured, deleted objects returned
/// (`apiextensions-apiserver` `customresource/etcd.go` sets
/// `ReturnDeletedObject: true`).
#[must_use]
pub fn custom(resource: &Resource) -> TypeInfo {
    let (group, version) = split_api_version(&resource.api_version);
    TypeInfo {
        api_version: resource.api_version.clone(),
        group,
        version,
        kind: resource.kind.clone(),
        plural: resource.plural.clone(),
        namespaced: resource.namespaced,
        custom: true,
        fields: &[],
        return_deleted_object: true,
        stored: true,
    }
}

/// `v1` → ("", "v1"); `discovery.k8s.io/v1` → ("discovery.k8s.io", "v1").
#[must_use]
pub fn split_api_version(api_version: &str) -> (String, String) {
    match api_version.split_once('/') {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (String::new(), api_version.to_owned()),
    }
}

impl TypeInfo {
    /// The kind of this type's lists, e.g. `PodList`.
    #[must_use]
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The resource as Status messages name it: `pods`, or
    /// `endpointslices.discovery.k8s.io` (schema.GroupResource.String).
    #[must_use]
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Whether the type has a `/status` subresource, so that writes to the
    /// main resource leave `.status` alone: pods, services and namespaces
    /// among the built-ins, and (by assumption, as `kube`'s
    /// `#[kube(status = ..)]` derive declares) every custom resource.
    #[must_use]
    pub fn has_status_subresource(&self) -> bool {
        self.custom || (self.group.is_empty() && matches!(self.kind.as_str(), "Pod" | "Service" | "Namespace"))
    }

    /// Whether `field` can be used in a field selector on this type.
    #[must_use]
    pub fn supports_field(&self, field: &str) -> bool {
        field == "metadata.name"
            || (field == "metadata.namespace" && self.namespaced)
            || self.fields.iter().any(|(f, _, _)| *f == field)
    }

    /// A field's value as the registry's field set renders it; JSON
    /// booleans and numbers become their text (`strconv.FormatBool`).
    #[must_use]
    pub fn field_value(&self, obj: &Value, field: &str) -> Option<String> {
        let (pointer, default) = match field {
            "metadata.name" => ("/metadata/name", ""),
            "metadata.namespace" => ("/metadata/namespace", ""),
            other => self.fields.iter().find(|(f, _, _)| *f == other).map(|(_, p, d)| (*p, *d))?,
        };
        Some(match obj.pointer(pointer) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Number(n)) => n.to_string(),
            _ => default.to_owned(),
        })
    }
}
