//! The agent's `DaemonSet` and the CA's `Deployment` and `Service`: what the
//! agent and the CA need from them, and what the API server would refuse.

use std::{collections::BTreeSet, fs};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::load::{
    container, daemonset_dir, env, env_field_ref, manifests, mount_of, pod_spec_of_daemonset, port_number, repo_root,
    volume, NAMESPACE,
};

#[test]
fn agent_runs_on_every_node_with_the_node_pids_and_network() {
    let m = manifests();
    let ds = m.daemonset("heddle-agent");
    let spec = pod_spec_of_daemonset(&m);
    let tolerates_all = spec
        .tolerations
        .iter()
        .flatten()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none());
    assert!(tolerates_all, "a toleration `operator: Exists` with no key or effect");
    assert!(spec.node_selector.is_none() && spec.affinity.is_none(), "every node");
    assert_eq!(spec.host_pid, Some(true), "netns discovery scans /proc/*/ns/net");
    assert_eq!(spec.host_network, Some(true), "admin API on the node's loopback");
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"), "resolves the CA service");
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
    let update = ds.spec.as_ref().unwrap().update_strategy.as_ref().unwrap();
    assert_eq!(update.type_.as_deref(), Some("RollingUpdate"));
    // Upgrades hand over (ARCHITECTURE.md, "Upgrades"): the new pod starts
    // beside the old one, and no node is ever without a serving agent.
    let rolling = update.rolling_update.as_ref().unwrap();
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    let annotations =
        ds.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.clone().unwrap_or_default();
    assert_eq!(annotations.get("prometheus.io/scrape").map(String::as_str), Some("true"));
    assert_eq!(annotations.get("prometheus.io/port").map(String::as_str), Some("15020"));
    assert_eq!(annotations.get("prometheus.io/path").map(String::as_str), Some("/metrics"));
    // `heddle --node NODE` finds the agent's pod by this label.
    let labels = ds.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.clone();
    assert_eq!(labels.unwrap_or_default().get("app.kubernetes.io/name").map(String::as_str), Some("heddle-agent"));
    let agent = container(spec, "agent");
    assert_eq!(
        agent.command.as_deref(),
        Some(&["mesh-agent".to_owned(), "run".to_owned(), "--kubernetes".to_owned()][..])
    );
    assert_eq!(env_field_ref(agent, "NODE_NAME").as_deref(), Some("spec.nodeName"));
    assert_eq!(env_field_ref(agent, "POD_NAMESPACE").as_deref(), Some("metadata.namespace"));
    let resources = agent.resources.as_ref().expect("resources");
    for what in ["cpu", "memory"] {
        assert!(resources.requests.as_ref().is_some_and(|r| r.contains_key(what)), "{what} request");
        assert!(resources.limits.as_ref().is_some_and(|r| r.contains_key(what)), "{what} limit");
    }
}

#[test]
fn agent_probes_ask_the_pods_own_agent_process() {
    let m = manifests();
    let spec = pod_spec_of_daemonset(&m);
    let agent = container(spec, "agent");
    // Exec probes of the pod's own state file: during an upgrade the old and
    // the new agent share the admin and metrics sockets, so an HTTP probe of
    // the new pod could be answered by the old process.
    let exec = |probe: Option<&k8s_openapi::api::core::v1::Probe>, what: &str| {
        let probe = probe.unwrap_or_else(|| panic!("a {what} probe"));
        assert!(probe.http_get.is_none() && probe.tcp_socket.is_none(), "{what} probe: exec, not a shared port");
        probe.exec.as_ref().and_then(|e| e.command.clone()).unwrap_or_else(|| panic!("{what} probe command"))
    };
    let cmd = |what: &str| vec!["mesh-agent".to_owned(), "probe".to_owned(), what.to_owned()];
    assert_eq!(exec(agent.liveness_probe.as_ref(), "liveness"), cmd("live"));
    assert_eq!(exec(agent.startup_probe.as_ref(), "startup"), cmd("live"));
    assert_eq!(exec(agent.readiness_probe.as_ref(), "readiness"), cmd("ready"));
    // The first start waits for the initial lists and the trust bundle: the
    // startup probe allows for that (and holds liveness off until then).
    let startup = agent.startup_probe.as_ref().unwrap();
    assert_eq!((startup.period_seconds, startup.failure_threshold), (Some(5), Some(60)), "startup probe: 60 x 5 s");
    // `mesh-agent probe` reads HEDDLE_STATE_FILE, which `run` keeps current,
    // in a volume of this pod only.
    let state = env(agent).get("HEDDLE_STATE_FILE").cloned().flatten().expect("HEDDLE_STATE_FILE");
    let (vol, _) = mount_of(spec, agent, &state);
    assert!(vol.empty_dir.is_some(), "the state file is the pod's own (emptyDir), got {vol:?}");
    let main = fs::read_to_string(repo_root().join("mesh-agent/src/main.rs")).unwrap();
    assert!(
        main.contains("env = \"HEDDLE_STATE_FILE\"") && main.contains("Probe {"),
        "mesh-agent has probe and --state-file"
    );
    // No declared port: with hostNetwork it would be a hostPort, which two
    // pods of the DaemonSet cannot share on a node (a surge upgrade).
    assert!(agent.ports.as_ref().is_none_or(Vec::is_empty), "declared ports block maxSurge: {:?}", agent.ports);
}

#[test]
fn agent_pods_of_a_rollout_meet_at_the_handover_socket_and_drain_within_the_grace_period() {
    let m = manifests();
    let spec = pod_spec_of_daemonset(&m);
    let agent = container(spec, "agent");
    // The default socket is /run/heddle/NODE/handover.sock: on the node, so
    // the old and the new pod both reach it.
    let (vol, _) = mount_of(spec, agent, "/run/heddle/node-1");
    assert_eq!(vol.host_path.as_ref().map(|h| h.path.as_str()), Some("/run/heddle"), "got {vol:?}");
    let main = fs::read_to_string(repo_root().join("mesh-agent/src/main.rs")).unwrap();
    assert!(main.contains("PathBuf::from(\"/run/heddle\").join(&node).join(\"handover.sock\")"));
    let drain: i64 = env(agent).get("HEDDLE_HANDOVER_DRAIN_SECONDS").cloned().flatten().unwrap().parse().unwrap();
    let grace = spec.termination_grace_period_seconds.unwrap();
    assert!(grace > drain, "the old agent is killed before its drain ends: grace {grace} s, drain {drain} s");
}

#[test]
fn agent_keeps_enrolled_pods_failing_closed_across_a_rollout() {
    let m = manifests();
    let agent = container(pod_spec_of_daemonset(&m), "agent");
    assert_eq!(
        env(agent).get("HEDDLE_KEEP_ATTACHED_ON_EXIT").cloned().flatten().as_deref(),
        Some("true"),
        "a rollout must not let enrolled pods bypass the mesh"
    );
    // The variable is the agent's flag, not a typo the agent would ignore.
    let main = fs::read_to_string(repo_root().join("mesh-agent/src/main.rs")).unwrap();
    assert!(
        main.contains("env = \"HEDDLE_KEEP_ATTACHED_ON_EXIT\""),
        "mesh-agent run reads HEDDLE_KEEP_ATTACHED_ON_EXIT"
    );
}

#[test]
fn agent_ca_token_is_a_projected_token_for_the_ca_audience() {
    let m = manifests();
    let spec = pod_spec_of_daemonset(&m);
    let agent = container(spec, "agent");
    let env = env(agent);
    let token_file = env["HEDDLE_CA_TOKEN_FILE"].clone().unwrap();
    assert_eq!(token_file, "/var/run/secrets/heddle/ca-token");
    let (vol, file) = mount_of(spec, agent, &token_file);
    let sources = vol.projected.as_ref().expect("a projected volume").sources.clone().unwrap();
    let token = sources.iter().find_map(|s| s.service_account_token.as_ref()).expect("a serviceAccountToken source");
    assert_eq!(token.audience.as_deref(), Some("heddle-ca"), "the CA's TokenReview audience");
    assert_eq!(token.expiration_seconds, Some(3600));
    assert_eq!(token.path, file);
}

#[test]
fn agent_reaches_the_ca_service_and_mounts_the_bundle_it_publishes() {
    let m = manifests();
    let spec = pod_spec_of_daemonset(&m);
    let agent = container(spec, "agent");
    let env = env(agent);
    let get = |k: &str| env.get(k).cloned().flatten().unwrap_or_else(|| panic!("env {k}"));
    assert_eq!(get("HEDDLE_TRUST_DOMAIN"), "cluster.local");
    assert_eq!(get("HEDDLE_CGROUP"), "/sys/fs/cgroup");

    let ca_addr = get("HEDDLE_CA_ADDR");
    let (host, port) = ca_addr.rsplit_once(':').unwrap();
    let service = m.service("heddle-ca");
    assert_eq!(host, format!("heddle-ca.{NAMESPACE}.svc"));
    let service_port = service.spec.as_ref().unwrap().ports.clone().unwrap();
    assert!(service_port.iter().any(|p| p.port.to_string() == port), "Service heddle-ca port {port}");
    // The Service selects the CA's pods and targets the port the CA listens on.
    let ca = m.deployment("heddle-ca").spec.as_ref().unwrap();
    let pod_labels = ca.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    for (k, v) in service.spec.as_ref().unwrap().selector.clone().unwrap() {
        assert_eq!(pod_labels.get(&k), Some(&v), "Service heddle-ca selector {k}");
    }
    let ca_container = container(ca.template.spec.as_ref().unwrap(), "ca");
    for p in &service_port {
        let target = p.target_port.as_ref().unwrap();
        assert_eq!(port_number(target, ca_container), 15012);
    }

    let bundle = get("HEDDLE_TRUST_BUNDLE");
    let (vol, file) = mount_of(spec, agent, &bundle);
    let cm = vol.config_map.as_ref().expect("a ConfigMap volume");
    assert_eq!(cm.name, "heddle-trust-bundle");
    assert!(
        cm.items.iter().flatten().any(|i| i.key == "root-cert.pem" && i.path == file),
        "key root-cert.pem projected as {file}"
    );
}

#[test]
fn agent_host_mounts_are_the_nodes_cgroup_bpffs_and_netns() {
    let m = manifests();
    let spec = pod_spec_of_daemonset(&m);
    let agent = container(spec, "agent");
    let host_path = |mount: &str| {
        let m = agent
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == mount)
            .unwrap_or_else(|| panic!("nothing mounted at {mount}"));
        let v = volume(spec, &m.name);
        (v.host_path.as_ref().map(|h| h.path.clone()), m.mount_propagation.clone())
    };
    assert_eq!(host_path("/sys/fs/cgroup").0.as_deref(), Some("/sys/fs/cgroup"));
    assert_eq!(host_path("/sys/fs/bpf"), (Some("/sys/fs/bpf".to_owned()), Some("HostToContainer".to_owned())));
    assert_eq!(host_path("/run/netns"), (Some("/run/netns".to_owned()), Some("HostToContainer".to_owned())));
    // The node's bpffs is mounted (and the mount propagated back) by the
    // privileged init container.
    let init = spec.init_containers.iter().flatten().find(|c| c.name == "mount-bpffs").unwrap();
    let mount = init.volume_mounts.iter().flatten().find(|m| m.name == "bpffs").unwrap();
    assert_eq!(mount.mount_propagation.as_deref(), Some("Bidirectional"));
}

/// What the API server's pod validation would refuse, checked here since
/// there is no API server: mounts of undeclared volumes, Bidirectional
/// propagation outside a privileged container, `allowPrivilegeEscalation:
/// false` together with privileged or `SYS_ADMIN`.
#[test]
fn pod_specs_pass_the_api_servers_container_rules() {
    let m = manifests();
    let ca = m.deployment("heddle-ca").spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    for spec in [pod_spec_of_daemonset(&m), ca] {
        for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
            let sc = c.security_context.clone().unwrap_or_default();
            let privileged = sc.privileged == Some(true);
            for mount in c.volume_mounts.iter().flatten() {
                volume(spec, &mount.name);
                if mount.mount_propagation.as_deref() == Some("Bidirectional") {
                    assert!(privileged, "{}: Bidirectional needs privileged", c.name);
                }
            }
            let adds = sc.capabilities.as_ref().and_then(|c| c.add.clone()).unwrap_or_default();
            if sc.allow_privilege_escalation == Some(false) {
                assert!(!privileged && !adds.iter().any(|a| a.ends_with("SYS_ADMIN")), "{}", c.name);
            }
        }
    }
}

#[test]
fn agent_runs_with_the_justified_capabilities_only() {
    let m = manifests();
    let agent = container(pod_spec_of_daemonset(&m), "agent");
    let sc = agent.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "SYS_RESOURCE"]));
    // Each is justified in a comment next to it.
    let text = fs::read_to_string(daemonset_dir().join("agent-daemonset.yaml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for cap in added {
        let at = lines.iter().position(|l| l.trim() == format!("- {cap}")).unwrap();
        assert!(lines[at - 1].trim_start().starts_with('#'), "{cap} has no comment above it");
    }
}

#[test]
fn images_are_this_release() {
    let m = manifests();
    let want = format!("ghcr.io/heddle-mesh/heddle:{}", env!("CARGO_PKG_VERSION"));
    let ca = m.deployment("heddle-ca").spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    for spec in [pod_spec_of_daemonset(&m), ca] {
        for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
            assert_eq!(c.image.as_deref(), Some(want.as_str()), "{}", c.name);
        }
    }
}

#[test]
fn ca_runs_the_kubernetes_mode_with_probes_on_its_port() {
    let m = manifests();
    let ca = m.deployment("heddle-ca").spec.as_ref().unwrap();
    assert_eq!(ca.replicas, Some(1));
    let spec = ca.template.spec.as_ref().unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("heddle-ca"));
    let c = container(spec, "ca");
    assert_eq!(c.command.as_deref(), Some(&["mesh-agent".to_owned(), "ca".to_owned(), "--kubernetes".to_owned()][..]));
    assert_eq!(env_field_ref(c, "POD_NAMESPACE").as_deref(), Some("metadata.namespace"));
    assert_eq!(env(c).get("HEDDLE_TRUST_DOMAIN").cloned().flatten().as_deref(), Some("cluster.local"));
    let ready = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap();
    assert_eq!(port_number(&ready.port, c), 15012);
    assert_eq!(ready.scheme.as_deref(), Some("HTTPS"));
    let route = ready.path.clone().unwrap();
    let source = fs::read_to_string(repo_root().join("mesh-agent/src/identity/ca_server.rs")).unwrap();
    assert!(source.contains(&format!("\"{route}\"")), "the CA routes {route}");
    let live = c.liveness_probe.as_ref().unwrap();
    assert!(live.http_get.is_some() || live.tcp_socket.is_some());
}
