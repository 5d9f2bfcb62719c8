//! The `heddle.dev/v1alpha1` `AuthorizationPolicy` `CustomResourceDefinition`.
//!
//! The CRD's `OpenAPI` v3 schema is generated (kube's `CustomResource` derive,
//! schemars) from [`crate::policy::model::Spec`], the very type the policy
//! engine parses, so the API server and the engine cannot disagree about
//! which fields exist: a field added to the model appears in the CRD the next
//! time `cargo xtask manifests` runs, and CI fails until the committed
//! `daemonset/crds/authorizationpolicies.heddle.dev.yaml` is regenerated.
//! `mesh-agent crd` prints it.
//!
//! Invariants: the schema is structural (every node has a `type`, or is
//! `x-kubernetes-int-or-string` / `x-kubernetes-preserve-unknown-fields`),
//! which the API server requires of `apiextensions.k8s.io/v1` CRDs; its
//! serde behaviour is the model's, unchanged. Nothing here runs as a task.

use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::model::Spec;

/// API group of Heddle's own resources.
pub const GROUP: &str = "heddle.dev";
/// The CRD's short name (`kubectl get hap`); `ap` is left to Istio's.
pub const SHORT_NAME: &str = "hap";
/// Where `cargo xtask manifests` writes [`crd_yaml`], relative to the repository root.
pub const MANIFEST_PATH: &str = "daemonset/crds/authorizationpolicies.heddle.dev.yaml";

/// `spec` of a `heddle.dev/v1alpha1` `AuthorizationPolicy`: Istio's
/// `security.istio.io/v1` `AuthorizationPolicy` spec, field for field,
/// enforced at L4 by the destination node's agent. L7-only fields
/// (`requestPrincipals`, `remoteIpBlocks`, `hosts`, `methods`, `paths` and
/// their `not` forms; `when` keys such as `request.headers[...]`) are
/// accepted with a warning naming them and handled as Istio ambient does: an
/// ALLOW rule using any of them never matches; a DENY or AUDIT rule drops them
/// and is enforced on its L4 fields alone, a `source`, `operation` or `when`
/// left with no L4 field matching every connection (so it matches more, never
/// less).
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "heddle.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    root = "HeddleAuthorizationPolicy",
    plural = "authorizationpolicies",
    singular = "authorizationpolicy",
    namespaced,
    shortname = "hap",
    category = "heddle",
    doc = "An L4 authorization policy enforced by Heddle's node agents (Istio's AuthorizationPolicy, field for field).",
    printcolumn(
        name = "Action",
        type_ = "string",
        json_path = ".spec.action",
        description = "ALLOW (the default when empty), DENY, AUDIT or CUSTOM (rejected)"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(transparent)]
pub struct AuthorizationPolicySpec(pub Spec);

/// The CRD object.
#[must_use]
pub fn crd() -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    HeddleAuthorizationPolicy::crd()
}

/// The CRD as the YAML committed in `daemonset/crds/`, with a header saying
/// where it comes from.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    generated_yaml(&crd(), "mesh-agent/src/policy/model.rs", "crd")
}

/// A CRD as committed in `daemonset/crds/`: a header naming the `source`
/// file it is generated from and the `mesh-agent` arguments that print it.
pub fn generated_yaml(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    source: &str,
    args: &str,
) -> Result<String, serde_yaml_ng::Error> {
    let body = serde_yaml_ng::to_string(crd)?;
    Ok(format!(
        "# Generated from {source} by `cargo xtask manifests`\n\
         # (`mesh-agent {args}`): do not edit by hand.\n{body}"
    ))
}

/// Schema fragments for model fields whose Rust type says too little for a
/// structural schema; referenced from `#[schemars(schema_with = ...)]` in
/// [`crate::policy::model`].
pub(crate) mod schema {
    use schemars::{json_schema, Schema, SchemaGenerator};

    /// A list whose items may be strings or numbers (`ports: [8080, "9000-9100"]`),
    /// as the model's `strings_or_numbers` reads them.
    pub(crate) fn int_or_string_list(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "array",
            "items": { "x-kubernetes-int-or-string": true }
        })
    }

    /// An object the engine keeps as raw JSON (Istio's `targetRef`,
    /// `provider`): kept whole by the API server instead of pruned.
    pub(crate) fn preserve_unknown_object(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }

    /// A list of [`preserve_unknown_object`] (Istio's `targetRefs`).
    pub(crate) fn preserve_unknown_object_list(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "array",
            "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn spec_schema() -> Value {
        let crd = serde_json::to_value(crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
    }

    /// Every schema node has a type or one of the two escape hatches, and no
    /// `$ref`/`anyOf`/`oneOf`/`additionalProperties: false` that the API
    /// server would refuse in a structural schema.
    fn assert_structural(path: &str, node: &Value) {
        let obj = node.as_object().unwrap_or_else(|| panic!("{path}: not an object"));
        for banned in ["$ref", "anyOf", "oneOf", "allOf", "definitions", "$defs"] {
            assert!(!obj.contains_key(banned), "{path}: {banned} in {node}");
        }
        assert!(
            obj.contains_key("type")
                || obj.contains_key("x-kubernetes-int-or-string")
                || obj.contains_key("x-kubernetes-preserve-unknown-fields"),
            "{path}: no type in {node}"
        );
        if obj.contains_key("properties") {
            assert!(!obj.contains_key("additionalProperties"), "{path}: additionalProperties with properties");
        }
        for (name, child) in obj.get("properties").and_then(Value::as_object).into_iter().flatten() {
            assert_structural(&format!("{path}.{name}"), child);
        }
        if let Some(items) = obj.get("items") {
            assert_structural(&format!("{path}[]"), items);
        }
        if let Some(Value::Object(_)) = obj.get("additionalProperties") {
            assert_structural(&format!("{path}{{}}"), &obj["additionalProperties"]);
        }
    }

    #[test]
    fn schema_is_structural() {
        let crd = serde_json::to_value(crd()).unwrap();
        assert_structural("", &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]);
    }

    #[test]
    fn action_is_a_string_enum_with_every_variant() {
        let action = &spec_schema()["properties"]["action"];
        assert_eq!(action["type"], "string");
        assert_eq!(action["enum"], json!(["ALLOW", "DENY", "AUDIT", "CUSTOM"]));
    }

    #[test]
    fn descriptions_come_from_the_model_doc_comments() {
        let principals = &spec_schema()["properties"]["rules"]["items"]["properties"]["from"]["items"]["properties"]
            ["source"]["properties"]["principals"];
        assert!(principals["description"].as_str().unwrap().contains("SPIFFE"), "{principals}");
    }

    #[test]
    fn names_scope_and_printer_columns_are_as_documented() {
        let crd = crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("authorizationpolicies.heddle.dev"));
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec![SHORT_NAME.to_owned()]));
        let columns = crd.spec.versions[0].additional_printer_columns.clone().unwrap();
        assert_eq!(columns[0].json_path, ".spec.action");
    }

    #[test]
    fn a_custom_resource_parses_into_the_engine_model_and_back() {
        let text = r#"{"apiVersion": "heddle.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "api-from-web", "namespace": "demo"},
            "spec": {"selector": {"matchLabels": {"app": "api"}}, "action": "ALLOW",
                     "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/web"]}}],
                                "to": [{"operation": {"ports": ["8080", 9000]}}]}]}}"#;
        let policy: HeddleAuthorizationPolicy = serde_json::from_str(text).unwrap();
        assert_eq!(policy.spec.0.rules[0].to[0].operation.as_ref().unwrap().ports, ["8080", "9000"]);
        let back = serde_json::to_value(&policy).unwrap();
        assert_eq!(back["spec"]["rules"][0]["to"][0]["operation"]["ports"], json!(["8080", "9000"]));
        assert!(back["spec"].get("targetRefs").is_none(), "empty lists are left out: {back}");
    }

    #[test]
    fn crd_yaml_starts_with_the_generated_header() {
        let yaml = crd_yaml().unwrap();
        assert!(yaml.starts_with("# Generated from"));
        assert!(yaml.contains("kind: CustomResourceDefinition"));
    }
}
