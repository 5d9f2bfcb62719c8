//! The serde types of `AuthorizationPolicy` objects, field for field as
//! Istio's `security.istio.io/v1` API (which `heddle.dev/v1alpha1` copies).
//!
//! [`AuthorizationPolicy`] is the envelope and is lenient on purpose: objects
//! read back from Kubernetes carry `status`, `metadata.uid`, `managedFields`
//! and so on, which have no meaning for enforcement. Its `spec` stays a raw
//! JSON value until [`Spec`] parses it strictly (`deny_unknown_fields`
//! everywhere) in [`super::compile`], so that an unknown field rejects that
//! one policy with a message naming it, instead of failing the whole load.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// `apiVersion` of Heddle's own policy objects.
pub const HEDDLE_API_VERSION: &str = "heddle.dev/v1alpha1";
/// `apiVersion`s of Istio's objects, accepted unchanged.
pub const ISTIO_API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];
/// The `kind` of policy objects.
pub const KIND: &str = "AuthorizationPolicy";
/// Annotations that make a policy dry-run (evaluated and recorded, never enforced).
pub const DRY_RUN_ANNOTATIONS: [&str; 2] = ["heddle.dev/dry-run", "istio.io/dry-run"];

/// One policy object as stored in Kubernetes or written in a YAML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    /// `heddle.dev/v1alpha1`, `security.istio.io/v1` or `security.istio.io/v1beta1`.
    #[serde(default)]
    pub api_version: String,
    /// `AuthorizationPolicy`.
    #[serde(default)]
    pub kind: String,
    /// Name, namespace, annotations; everything else is ignored.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The spec, parsed strictly into [`Spec`] when the policy is compiled.
    #[serde(default)]
    pub spec: serde_json::Value,
}

/// The parts of Kubernetes object metadata that policy uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// Object name.
    #[serde(default)]
    pub name: String,
    /// Namespace; [`super::DEFAULT_NAMESPACE`] when absent.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Annotations, for the dry-run switch.
    #[serde(default, deserialize_with = "null_default")]
    pub annotations: BTreeMap<String, String>,
}

/// `spec` of an `AuthorizationPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    /// Which workloads of the policy's namespace (of every namespace, for the
    /// root namespace) the policy applies to; absent means all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Attaches the policy to a gateway/waypoint instead (not enforced at L4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::k8s::crd::schema::preserve_unknown_object")]
    pub target_ref: Option<serde_json::Value>,
    /// Attaches the policy to gateways/waypoints instead (not enforced at L4).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::k8s::crd::schema::preserve_unknown_object_list")]
    pub target_refs: Vec<serde_json::Value>,
    /// ALLOW (the default), DENY, AUDIT; CUSTOM is rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// The external authorizer of a CUSTOM policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::k8s::crd::schema::preserve_unknown_object")]
    pub provider: Option<serde_json::Value>,
    /// Rules; one matching is enough. Absent: the policy matches nothing.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// `spec.selector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must all carry.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// `spec.action`: what a matching policy does (ALLOW when absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Allow a connection only if some ALLOW policy matches it.
    #[default]
    Allow,
    /// Deny a connection that matches.
    Deny,
    /// Mark a matching connection as audited; never changes the verdict.
    Audit,
    /// Delegate to an external authorizer (not supported).
    Custom,
}

impl Action {
    /// The name as written in YAML.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

/// One entry of `spec.rules`: `from`, `to` and `when` must all match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Sources, one matching is enough; empty means any source.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<From>,
    /// Operations, one matching is enough; empty means any operation.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<To>,
    /// Conditions, all must match.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// One entry of `rules[].from`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    /// The source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// One entry of `rules[].to`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    /// The operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
}

/// `from[].source`: every field set must match; each is a list (any may match) with a `not`
/// twin (none may match).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer SPIFFE IDs without `spiffe://` (`cluster.local/ns/foo/sa/bar`).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Negative twin of `principals`.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// JWT principals (L7).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// Negative twin of `requestPrincipals` (L7).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces, from the authenticated identity.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Negative twin of `namespaces`.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Peer service accounts, `ns/sa` or `sa` (in the policy's namespace).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// Negative twin of `serviceAccounts`.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    /// Source IP address blocks.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    /// Negative twin of `ipBlocks`.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Client IPs from `X-Forwarded-For` (L7).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    /// Negative twin of `remoteIpBlocks` (L7).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// `to[].operation`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// HTTP hosts (L7).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Negative twin of `hosts` (L7).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports or ranges (`"8000-8100"`, a Heddle extension).
    #[serde(default, deserialize_with = "strings_or_numbers", skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::k8s::crd::schema::int_or_string_list")]
    pub ports: Vec<String>,
    /// Negative twin of `ports`.
    #[serde(default, deserialize_with = "strings_or_numbers", skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::k8s::crd::schema::int_or_string_list")]
    pub not_ports: Vec<String>,
    /// HTTP methods (L7).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Negative twin of `methods` (L7).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// HTTP paths (L7).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Negative twin of `paths` (L7).
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// `rules[].when[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// The attribute (`source.ip`, `destination.port`, ...).
    pub key: String,
    /// Accepted values.
    #[serde(default, deserialize_with = "strings_or_numbers", skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::k8s::crd::schema::int_or_string_list")]
    pub values: Vec<String>,
    /// Rejected values.
    #[serde(default, deserialize_with = "strings_or_numbers", skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::k8s::crd::schema::int_or_string_list")]
    pub not_values: Vec<String>,
}

/// `null` (which YAML writes as an empty value, `rules:`) reads as the default.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A list of strings in which bare numbers are accepted too: the API types
/// ports as strings, but `ports: [8080]` is a common way to write them.
fn strings_or_numbers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a string or a number")]
    enum Item {
        String(String),
        Number(u64),
    }
    let items: Option<Vec<Item>> = Option::deserialize(d)?;
    Ok(items
        .unwrap_or_default()
        .into_iter()
        .map(|i| match i {
            Item::String(s) => s,
            Item::Number(n) => n.to_string(),
        })
        .collect())
}
