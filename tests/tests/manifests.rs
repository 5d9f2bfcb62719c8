//! The Kubernetes manifests in `daemonset/`, checked as a cluster admin relies
//! on them, without a cluster and without root.
//!
//! Every file that `daemonset/kustomization.yaml` lists is parsed strictly
//! with the Kubernetes API types of k8s-openapi: a field those types do not
//! know (a typo such as `hostPid`, a field of another API version) fails with
//! its path, where `kubectl apply` would either reject it or, worse, drop it.
//! Then what the agent and the CA need is asserted: the `DaemonSet` runs on
//! every node with the node's PIDs and network, its probes hit endpoints the
//! agent serves, its CA token is for the CA's audience, RBAC gives the agent
//! no write verb, the committed CRD is what the agent generates from its
//! policy model, and the CRD's schema accepts the README's example policies
//! and refuses malformed ones.

#[path = "manifests/load.rs"]
mod load;
#[path = "manifests/pods.rs"]
mod pods;
#[path = "manifests/rbac.rs"]
mod rbac;
#[path = "manifests/schema.rs"]
mod schema;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use load::{daemonset_dir, manifests, parse_object, Object, CRD_FILE, NAMESPACE};
use schema::{crd_json_schema, readme_policies, schema_errors};
use serde_json::{json, Value as Json};

#[test]
fn every_manifest_parses_strictly_with_the_kubernetes_types() {
    let m = manifests();
    assert_eq!(m.kustomization.api_version, "kustomize.config.k8s.io/v1beta1");
    assert_eq!(m.kustomization.kind, "Kustomization");
    let kinds: BTreeSet<&str> = m
        .objects
        .iter()
        .map(|(_, o)| match o {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::Role(_) => "Role",
            Object::RoleBinding(_) => "RoleBinding",
            Object::DaemonSet(_) => "DaemonSet",
            Object::Deployment(_) => "Deployment",
            Object::Service(_) => "Service",
            Object::Crd(_) => "CustomResourceDefinition",
        })
        .collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "DaemonSet",
        "Deployment",
        "Service",
        "CustomResourceDefinition",
    ] {
        assert!(kinds.contains(kind), "no {kind} in daemonset/");
    }
}

#[test]
fn strict_parsing_names_the_path_of_an_unknown_field() {
    let text = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x}\n\
                spec:\n  selector: {matchLabels: {a: b}}\n  template:\n    spec:\n      \
                hostPid: true\n      containers: [{name: c, image: i}]\n";
    let err = parse_object(serde_yaml_ng::from_str(text).unwrap(), "typo.yaml").unwrap_err();
    assert!(err.to_string().contains("spec.template.spec.hostPid"), "{err}");
}

#[test]
fn kustomization_lists_every_manifest_and_the_dashboard() {
    let m = manifests();
    let dir = daemonset_dir();
    let listed: BTreeSet<PathBuf> = m.kustomization.resources.iter().map(PathBuf::from).collect();
    // Every YAML file of daemonset/ is installed: none is forgotten.
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let rel = path.strip_prefix(&dir).unwrap().to_owned();
                assert!(
                    rel == Path::new("kustomization.yaml") || listed.contains(&rel),
                    "daemonset/{} is not in kustomization.yaml resources",
                    rel.display()
                );
            }
        }
    }
    let [dashboard] = m.kustomization.config_map_generator.as_slice() else {
        panic!("one configMapGenerator: the Grafana dashboard");
    };
    assert_eq!(dashboard.namespace, NAMESPACE);
    assert_eq!(dashboard.options.labels.get("grafana_dashboard").map(String::as_str), Some("1"));
    assert!(dashboard.options.disable_name_suffix_hash, "{}: a stable name", dashboard.name);
    for file in &dashboard.files {
        let source = file.split_once('=').map_or(file.as_str(), |(_, s)| s);
        let text =
            fs::read_to_string(dir.join(source)).unwrap_or_else(|e| panic!("configMapGenerator file {source}: {e}"));
        serde_json::from_str::<Json>(&text).unwrap_or_else(|e| panic!("{source} is not JSON: {e}"));
    }
}

#[test]
fn namespaced_objects_live_in_heddle_system_which_admits_the_agent() {
    let m = manifests();
    for (origin, object) in &m.objects {
        let ns = match object {
            Object::ServiceAccount(o) => &o.metadata.namespace,
            Object::Role(o) => &o.metadata.namespace,
            Object::RoleBinding(o) => &o.metadata.namespace,
            Object::DaemonSet(o) => &o.metadata.namespace,
            Object::Deployment(o) => &o.metadata.namespace,
            Object::Service(o) => &o.metadata.namespace,
            Object::Namespace(n) => {
                assert_eq!(n.metadata.name.as_deref(), Some(NAMESPACE));
                // hostPID, hostNetwork and hostPath are only admitted at the
                // privileged Pod Security level.
                let labels = n.metadata.labels.clone().unwrap_or_default();
                assert_eq!(labels.get("pod-security.kubernetes.io/enforce").map(String::as_str), Some("privileged"));
                continue;
            }
            _ => continue,
        };
        assert_eq!(ns.as_deref(), Some(NAMESPACE), "{origin}");
    }
}

#[test]
fn the_committed_crd_is_what_the_agent_generates() {
    let bin = heddle_tests::agent_binary().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(&bin).arg("crd").output().expect("run mesh-agent crd");
    assert!(out.status.success(), "mesh-agent crd: {}", String::from_utf8_lossy(&out.stderr));
    let committed = fs::read_to_string(daemonset_dir().join(CRD_FILE)).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "daemonset/{CRD_FILE} differs from `{} crd` (the policy model changed?): \
         run `cargo xtask manifests` and commit the result",
        bin.display()
    );
}

#[test]
fn crd_is_namespaced_with_a_short_name_and_an_action_column() {
    let m = manifests();
    let crd = m.crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("authorizationpolicies.heddle.dev"));
    assert_eq!(crd.spec.group, "heddle.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.kind, "AuthorizationPolicy");
    assert_eq!(crd.spec.names.plural, "authorizationpolicies");
    assert!(crd.spec.names.short_names.as_ref().is_some_and(|s| !s.is_empty()));
    let [version] = crd.spec.versions.as_slice() else { panic!("one version") };
    assert_eq!(version.name, "v1alpha1");
    assert!(version.served && version.storage);
    let columns = version.additional_printer_columns.clone().unwrap_or_default();
    assert!(columns.iter().any(|c| c.name == "Action" && c.json_path == ".spec.action"));
}

#[test]
fn crd_schema_accepts_every_example_policy_of_the_readme() {
    let m = manifests();
    let validator = jsonschema::draft4::new(&crd_json_schema(m.crd())).unwrap();
    let policies = readme_policies();
    assert!(
        policies.iter().any(|(h, p)| h == "Deploy on Kubernetes" && p["apiVersion"] == "heddle.dev/v1alpha1"),
        "the README's Deploy on Kubernetes section has a heddle.dev/v1alpha1 policy"
    );
    assert!(policies.len() >= 2, "{} README policies", policies.len());
    for (heading, policy) in &policies {
        let errors = schema_errors(&validator, policy);
        assert!(errors.is_empty(), "README ({heading}) policy {}: {errors:?}", policy["metadata"]["name"]);
    }
}

#[test]
fn readme_example_policies_are_valid_for_the_policy_engine() {
    let bin = heddle_tests::heddle_binary().unwrap_or_else(|e| panic!("{e}"));
    // One at a time: examples of different sections may share a name.
    for (i, (heading, policy)) in readme_policies().iter().enumerate() {
        let file = std::env::temp_dir().join(format!("heddle-readme-policy-{}-{i}.yaml", std::process::id()));
        fs::write(&file, serde_yaml_ng::to_string(policy).unwrap()).unwrap();
        let out = Command::new(&bin).args(["policy", "validate"]).arg(&file).output().unwrap();
        fs::remove_file(&file).unwrap();
        assert!(
            out.status.success(),
            "README ({heading}): heddle policy validate: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn crd_schema_rejects_unknown_fields_and_bad_actions() {
    let m = manifests();
    let validator = jsonschema::draft4::new(&crd_json_schema(m.crd())).unwrap();
    let base = json!({
        "apiVersion": "heddle.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "demo"},
        "spec": {
            "selector": {"matchLabels": {"app": "api"}},
            "action": "DENY",
            "rules": [{
                "from": [{"source": {"namespaces": ["other"]}}],
                "to": [{"operation": {"ports": ["8080", 9090, "9000-9100"]}}],
                "when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}]
            }],
            "targetRef": {"kind": "Gateway", "name": "waypoint"}
        }
    });
    assert_eq!(schema_errors(&validator, &base), Vec::<String>::new());
    // `value` at `pointer`, replacing what is there or adding a field.
    let mutate = |pointer: &str, value: Json| {
        let mut p = base.clone();
        if let Some(slot) = p.pointer_mut(pointer) {
            *slot = value;
        } else {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            p.pointer_mut(parent).unwrap().as_object_mut().unwrap().insert(key.to_owned(), value);
        }
        p
    };
    for (what, bad) in [
        ("bad action", mutate("/spec/action", json!("PERMIT"))),
        ("unknown spec field", mutate("/spec/rule", json!([]))),
        ("misspelt source field", mutate("/spec/rules/0/from/0/source/principal", json!(["x"]))),
        ("unknown operation field", mutate("/spec/rules/0/to/0/operation/port", json!(["80"]))),
        ("when without key", mutate("/spec/rules/0/when/0", json!({"values": ["1"]}))),
        ("ports not a list", mutate("/spec/rules/0/to/0/operation/ports", json!("8080"))),
        ("label value not a string", mutate("/spec/selector/matchLabels", json!({"app": ["api"]}))),
        ("no spec", {
            let mut p = base.clone();
            p.as_object_mut().unwrap().remove("spec");
            p
        }),
    ] {
        assert!(!validator.is_valid(&bad), "{what} was accepted: {bad}");
    }
}

/// Every source file of the agent crate, concatenated.
fn agent_sources() -> String {
    let mut text = String::new();
    let mut stack = vec![daemonset_dir().join("../mesh-agent/src")];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                text.push_str(&fs::read_to_string(&path).unwrap());
            }
        }
    }
    text
}

#[test]
fn every_metric_the_dashboard_queries_is_one_heddle_exports() {
    let text = fs::read_to_string(daemonset_dir().join("grafana-dashboard.json")).unwrap();
    let dashboard: Json = serde_json::from_str(&text).unwrap();
    let sources = agent_sources();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            for (i, _) in expr.match_indices("heddle_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
                assert!(
                    sources.contains(&format!("\"{base}\"")),
                    "panel {:?} queries {name}, which mesh-agent does not register",
                    panel["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} metric references found");
    let types: Vec<&str> = dashboard["panels"].as_array().unwrap().iter().filter_map(|p| p["type"].as_str()).collect();
    assert!(types.contains(&"nodeGraph"), "a service graph panel: {types:?}");
}
