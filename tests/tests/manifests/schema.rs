//! The CRD's schema as the API server applies it, and the README's policies.

use std::fs;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{json, Value as Json};

use super::load::{documents, repo_root};

/// The CRD's `openAPIV3Schema` as a JSON Schema that behaves like the API
/// server with kubectl's default `--validate=strict`: `nullable` admits null,
/// `x-kubernetes-int-or-string` admits an integer or a string, and an object
/// with declared properties admits no other field (the API server reports
/// such a field as unknown instead of storing it) unless it says
/// `x-kubernetes-preserve-unknown-fields`. The root also admits `apiVersion`,
/// `kind` and `metadata`, which the API server validates itself.
pub fn crd_json_schema(crd: &CustomResourceDefinition) -> Json {
    fn convert(node: &mut Json) {
        let Json::Object(obj) = node else { return };
        if obj.remove("x-kubernetes-int-or-string") == Some(Json::Bool(true)) {
            obj.insert("anyOf".into(), json!([{"type": "integer"}, {"type": "string"}]));
        }
        if obj.remove("nullable") == Some(Json::Bool(true)) {
            if let Some(Json::String(t)) = obj.get("type").cloned() {
                obj.insert("type".into(), json!([t, "null"]));
            }
            if let Some(Json::Array(values)) = obj.get_mut("enum") {
                values.push(Json::Null);
            }
        }
        let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Json::Bool(true));
        if obj.contains_key("properties") && !preserve && !obj.contains_key("additionalProperties") {
            obj.insert("additionalProperties".into(), Json::Bool(false));
        }
        for key in ["properties"] {
            if let Some(Json::Object(props)) = obj.get_mut(key) {
                props.values_mut().for_each(convert);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child) = obj.get_mut(key) {
                convert(child);
            }
        }
    }
    let mut schema =
        serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap())
            .unwrap();
    convert(&mut schema);
    let props = schema["properties"].as_object_mut().unwrap();
    props.insert("apiVersion".into(), json!({"type": "string"}));
    props.insert("kind".into(), json!({"type": "string"}));
    props.insert("metadata".into(), json!({"type": "object"}));
    schema
}

/// Every `kind: AuthorizationPolicy` document in a YAML code block of
/// README.md, as (heading it is under, object).
pub fn readme_policies() -> Vec<(String, Json)> {
    let text = fs::read_to_string(repo_root().join("README.md")).unwrap();
    let (mut heading, mut block, mut in_yaml) = (String::new(), String::new(), false);
    let mut found = Vec::new();
    for line in text.lines() {
        if in_yaml {
            if line.trim_start().starts_with("```") {
                in_yaml = false;
                for doc in documents(&block, &heading).unwrap() {
                    let doc: Json = serde_json::to_value(doc).unwrap();
                    if doc["kind"] == "AuthorizationPolicy" {
                        found.push((heading.clone(), doc));
                    }
                }
                block.clear();
            } else {
                block.push_str(line);
                block.push('\n');
            }
        } else if line.trim_start().starts_with("```yaml") {
            in_yaml = true;
        } else if line.starts_with('#') {
            line.trim_start_matches('#').trim().clone_into(&mut heading);
        }
    }
    found
}

pub fn schema_errors(validator: &jsonschema::Validator, policy: &Json) -> Vec<String> {
    validator.iter_errors(policy).map(|e| format!("{} at {}", e, e.instance_path)).collect()
}
