//! Least privilege: what the agent and the CA may do with the API.

use k8s_openapi::api::rbac::v1::PolicyRule;

use super::load::{manifests, pod_spec_of_daemonset, AGENT_READ_VERBS};

#[test]
fn agent_rbac_reads_what_the_kubernetes_source_watches_and_writes_nothing() {
    let m = manifests();
    let spec = pod_spec_of_daemonset(&m);
    assert_eq!(spec.service_account_name.as_deref(), Some("heddle-agent"));
    let (cluster, namespaced) = m.rules_of("heddle-agent");
    assert!(namespaced.is_empty(), "the agent needs no namespaced role");
    for rule in &cluster {
        for verb in &rule.verbs {
            assert!(AGENT_READ_VERBS.contains(&verb.as_str()), "agent may {verb} {:?}", rule.resources);
        }
        assert!(rule.non_resource_urls.is_none());
    }
    let grants = |group: &str, resource: &str| {
        cluster.iter().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && AGENT_READ_VERBS.iter().all(|v| r.verbs.iter().any(|x| x == v))
        })
    };
    for (group, resource) in [
        ("", "namespaces"),
        ("", "pods"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("heddle.dev", "authorizationpolicies"),
        ("security.istio.io", "authorizationpolicies"),
        ("gateway.networking.k8s.io", "gateways"),
    ] {
        assert!(grants(group, resource), "agent cannot get/list/watch {group}/{resource}");
    }
}

#[test]
fn ca_rbac_covers_token_reviews_pods_and_only_its_own_secret_and_configmap() {
    let m = manifests();
    let (cluster, namespaced) = m.rules_of("heddle-ca");
    let allowed = |rules: &[PolicyRule], group: &str, resource: &str, verb: &str, name: &str| {
        rules.iter().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
                && r.resource_names.as_ref().is_none_or(|n| n.iter().any(|n| n == name))
        })
    };
    assert!(allowed(&cluster, "authentication.k8s.io", "tokenreviews", "create", ""));
    assert!(allowed(&cluster, "", "pods", "list", ""));
    // The CA lists the node's pods (k8s::ca_auth::PodAuthorizer), nothing else.
    assert!(!allowed(&cluster, "", "pods", "get", ""), "unused: get pods");
    for rule in &cluster {
        for verb in &rule.verbs {
            let ok = verb == "create" && rule.resources.as_deref() == Some(&["tokenreviews".to_owned()][..])
                || AGENT_READ_VERBS.contains(&verb.as_str());
            assert!(ok, "CA may {verb} {:?} cluster-wide", rule.resources);
        }
        assert!(!rule.resources.iter().flatten().any(|r| r == "secrets" || r == "configmaps"));
    }
    // Exactly the calls of k8s::ca_root: get/create the root Secret,
    // get/create/patch (JSON merge) the bundle ConfigMap; never update.
    for verb in ["get", "create"] {
        assert!(allowed(&namespaced, "", "secrets", verb, "heddle-ca-root"), "secrets {verb}");
    }
    for verb in ["get", "create", "patch"] {
        assert!(allowed(&namespaced, "", "configmaps", verb, "heddle-trust-bundle"), "configmaps {verb}");
    }
    for rule in &namespaced {
        assert!(!rule.verbs.iter().any(|v| v == "update"), "the CA never updates its Secret or ConfigMap: {rule:?}");
        if rule.resources.iter().flatten().any(|r| r == "secrets") {
            assert!(!rule.verbs.iter().any(|v| v == "patch"), "the CA never patches a Secret: {rule:?}");
        }
    }
    // Reading or changing any other Secret is not allowed: only create is
    // granted without a name (Kubernetes cannot restrict create by name).
    for rule in &namespaced {
        if rule.resource_names.is_none() {
            assert_eq!(rule.verbs, ["create"], "{rule:?}");
        }
    }
}

fn allows(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups.iter().flatten().any(|g| g == group)
            && r.resources.iter().flatten().any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
    })
}

#[test]
fn the_waypoint_controller_applies_waypoint_objects_and_never_touches_secrets() {
    let m = manifests();
    let (cluster, namespaced) = m.rules_of("heddle-controller");
    assert!(namespaced.is_empty());
    // What k8s::waypoint_controller server-side-applies (get + create + patch).
    for (group, resource) in [
        ("apps", "deployments"),
        ("", "services"),
        ("", "serviceaccounts"),
        ("", "configmaps"),
        ("gateway.networking.k8s.io", "gatewayclasses"),
    ] {
        for verb in ["get", "create", "patch"] {
            assert!(allows(&cluster, group, resource, verb), "controller cannot {verb} {group}/{resource}");
        }
    }
    for verb in ["get", "list", "watch"] {
        assert!(allows(&cluster, "gateway.networking.k8s.io", "gateways", verb), "gateways {verb}");
    }
    assert!(allows(&cluster, "gateway.networking.k8s.io", "gateways/status", "patch"));
    // It may bind the waypoint role, and no other.
    let binds: Vec<&PolicyRule> = cluster.iter().filter(|r| r.verbs.iter().any(|v| v == "bind")).collect();
    assert_eq!(binds.len(), 1);
    assert_eq!(binds[0].resource_names.as_deref(), Some(&["heddle-waypoint".to_owned()][..]));
    for rule in &cluster {
        assert!(!rule.resources.iter().flatten().any(|r| r == "secrets" || r == "pods"), "{rule:?}");
        assert!(!rule.verbs.iter().any(|v| v == "delete" || v == "update" || v == "*" || v == "escalate"), "{rule:?}");
    }
}

#[test]
fn the_waypoint_role_reads_the_registry_and_routes_and_writes_only_route_status() {
    let m = manifests();
    let role = m
        .objects
        .iter()
        .find_map(|(_, o)| match o {
            super::load::Object::ClusterRole(r) if r.metadata.name.as_deref() == Some("heddle-waypoint") => {
                Some(r.rules.clone().unwrap_or_default())
            }
            _ => None,
        })
        .expect("ClusterRole heddle-waypoint");
    for (group, resource) in [
        ("", "namespaces"),
        ("", "pods"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("gateway.networking.k8s.io", "gateways"),
        ("gateway.networking.k8s.io", "httproutes"),
        ("gateway.networking.k8s.io", "grpcroutes"),
        ("gateway.networking.k8s.io", "referencegrants"),
        ("heddle.dev", "httplocalratelimitpolicies"),
        ("heddle.dev", "retrybudgetpolicies"),
        ("networking.istio.io", "virtualservices"),
        ("networking.istio.io", "destinationrules"),
        ("heddle.dev", "authorizationpolicies"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "requestauthentications"),
    ] {
        for verb in AGENT_READ_VERBS {
            assert!(allows(&role, group, resource, verb), "waypoint cannot {verb} {group}/{resource}");
        }
    }
    for rule in &role {
        let writes = rule.verbs.iter().any(|v| !AGENT_READ_VERBS.contains(&v.as_str()));
        if writes {
            let statuses =
                ["httproutes/status", "grpcroutes/status", "virtualservices/status", "destinationrules/status"];
            assert!(rule.resources.iter().flatten().all(|r| statuses.contains(&r.as_str())), "{rule:?}");
            assert!(rule.verbs.iter().all(|v| v == "get" || v == "patch"), "{rule:?}");
        }
    }
}
