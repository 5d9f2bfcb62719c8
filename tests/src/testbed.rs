//! The test bed: one isolated cluster (nodes, pods, services, agents) per test.
//!
//! [`Testbed::new`] allocates a unique id (`<pid>-<n>`, claimed with an
//! atomic `mkdir` of the cgroup directory, so it is unique across threads and
//! processes), a temp dir for config and logs, and a bpffs pin root. Nodes
//! and pods are added one by one; each gets a network namespace named
//! `ht-<id>-<name>` and a cgroup (see [`crate::cgroup`]). Everything is torn
//! down when the `Testbed` is dropped, also while unwinding from a panic.
//!
//! All methods take `&self`: the mutable cluster description lives behind a
//! mutex, and [`Node`], [`Pod`] and [`Agent`] are cheap cloneable handles,
//! so tests can hold them while changing enrollment.
//!
//! mTLS is opt-in per test bed: [`Testbed::start_ca`] starts the mesh CA,
//! and every agent started after it gets the CA flags (or a node's own,
//! from [`Testbed::set_agent_ca_flags`], e.g. for the Kubernetes-mode CA of
//! [`crate::kube_ca`]). A test bed without a CA runs its agents in
//! plaintext-forwarding mode.
//!
//! Authorization policies: every agent reads `<temp dir>/policies.yaml`
//! (written empty before the first agent starts);
//! [`Testbed::set_policies`] replaces it and waits until every agent has
//! read the new content.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::admin::Policies;
use crate::agent::Agent;
use crate::ca::{AgentCaFlags, Ca, CaOptions};
use crate::cgroup::{self, CGROUP_ROOT};
use crate::config::{
    write_atomically, ClusterConfig, InboundMode, NamespaceConfig, WorkloadConfig, DEFAULT_TRUST_DOMAIN,
};
use crate::env::{self, BPFFS};
use crate::error::{Result, TestbedError};
use crate::handles::{Node, Pod};
use crate::network;
use crate::podapp::Fnv1a64;
use crate::spec::{PodSpec, ServiceSpec};
use crate::teardown;
use crate::wait::{poll_until, Check};
use crate::wire::WireCapture;

/// How long an agent gets to become ready.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Per-process counter for test bed ids.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A node as recorded in the cluster description.
#[derive(Debug)]
struct NodeRecord {
    handle: Node,
    next_host: u8,
}

/// A pod as recorded in the cluster description.
#[derive(Debug)]
struct PodRecord {
    handle: Pod,
    spec: PodSpec,
}

/// The mutable part of a test bed.
#[derive(Debug, Default)]
pub(crate) struct State {
    nodes: Vec<NodeRecord>,
    pods: Vec<PodRecord>,
    services: Vec<ServiceSpec>,
    /// `trustDomain`, if a test set one.
    trust_domain: Option<String>,
    /// Namespace inbound modes.
    namespaces: BTreeMap<String, InboundMode>,
    /// Network namespaces created, in creation order.
    pub(crate) netns: Vec<String>,
    /// Agents started, in start order.
    pub(crate) agents: Vec<Agent>,
    /// The mesh CA, once started.
    pub(crate) ca: Option<Ca>,
    /// Agents started from now on read the Kubernetes API, not the file.
    pub(crate) kubernetes: Option<KubernetesMode>,
    /// Extra `mesh-agent run` flags for agents started from now on.
    pub(crate) agent_args: Vec<String>,
    /// CA flags per node name, for agents started from now on; they win
    /// over the test bed's CA (see [`Testbed::set_agent_ca_flags`]).
    pub(crate) agent_ca: BTreeMap<String, AgentCaFlags>,
    /// Waypoints, (namespace, name) ([`Testbed::add_waypoint`]).
    pub(crate) waypoints: Vec<(String, String)>,
    /// Namespaces' `useWaypoint`.
    pub(crate) namespace_waypoints: BTreeMap<String, String>,
    pub(crate) torn_down: bool,
}

/// How agents run in Kubernetes mode ([`Testbed::use_kubernetes`]).
#[derive(Debug, Clone)]
pub struct KubernetesMode {
    /// The kubeconfig the agents read (`KUBECONFIG`).
    pub kubeconfig: PathBuf,
    /// `--trust-domain`.
    pub trust_domain: String,
}

/// What every handle of one test bed shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) cgroup_root: PathBuf,
    pub(crate) pin_root: PathBuf,
    pub(crate) tmp: PathBuf,
    pub(crate) config_path: PathBuf,
    pub(crate) failed: AtomicBool,
    pub(crate) log_seq: AtomicU32,
    pub(crate) state: Mutex<State>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The netns name for a node or pod called `name`.
    pub(crate) fn netns_name(&self, name: &str) -> String {
        format!("ht-{}-{}", self.id, name)
    }

    /// The switch namespace's name (`--` cannot collide with a valid name).
    pub(crate) fn switch_netns(&self) -> String {
        format!("ht-{}--sw", self.id)
    }

    /// The cgroup for admin-API probes and captures, outside every node.
    pub(crate) fn tools_cgroup(&self) -> PathBuf {
        self.cgroup_root.join("tools")
    }

    /// The mesh CA's cgroup, outside every node.
    pub(crate) fn ca_cgroup(&self) -> PathBuf {
        self.cgroup_root.join("ca")
    }

    /// The authorization policies file every agent reads (`--policies`).
    pub(crate) fn policies_path(&self) -> PathBuf {
        self.tmp.join("policies.yaml")
    }

    /// A fresh log file path in the temp dir for `label`.
    pub(crate) fn log_file(&self, label: &str) -> PathBuf {
        let n = self.log_seq.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{label}.{n}.log"))
    }
}

impl State {
    /// The trust domain the agents use.
    pub(crate) fn trust_domain(&self) -> String {
        self.trust_domain.clone().unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned())
    }

    /// The nodes that have pods, sorted, each once.
    pub(crate) fn pod_nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = self.pods.iter().map(|p| p.handle.node_name().to_owned()).collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Fails once the test bed has been torn down.
    pub(crate) fn check_live(&self) -> Result<()> {
        if self.torn_down {
            Err(TestbedError::Environment("the test bed was torn down".into()))
        } else {
            Ok(())
        }
    }
}

/// One isolated cluster; see the module docs.
#[derive(Debug)]
pub struct Testbed {
    pub(crate) shared: Arc<Shared>,
}

/// Tears a test bed down from another thread (e.g. a Ctrl-C handler).
#[derive(Debug, Clone)]
pub struct TeardownHandle {
    shared: Arc<Shared>,
}

impl TeardownHandle {
    /// Stops the agents and removes everything; idempotent.
    pub fn teardown(&self) {
        teardown::teardown(&self.shared);
    }
}

impl Testbed {
    /// Creates an empty test bed; `name` (e.g. the test's name) only labels
    /// logs. Fails if the environment cannot host it (see
    /// [`crate::check_environment`]).
    pub fn new(name: &str) -> Result<Self> {
        env::check_environment()?;
        teardown::reap_stale_once();
        env::ensure_bpffs()?;
        let pid = std::process::id();
        let (id, cgroup_root) = loop {
            let id = format!("{pid}-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
            let dir = Path::new(CGROUP_ROOT).join(format!("heddle-test-{id}"));
            match std::fs::create_dir(&dir) {
                Ok(()) => break (id, dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(TestbedError::io(format!("create cgroup {}", dir.display()), e)),
            }
        };
        let tmp = std::env::temp_dir().join(format!("heddle-test-{id}"));
        let pin_root = Path::new(BPFFS).join(format!("heddle-test-{id}"));
        let shared = Arc::new(Shared {
            config_path: tmp.join("cluster.yaml"),
            id,
            name: name.to_owned(),
            cgroup_root,
            pin_root,
            tmp,
            failed: AtomicBool::new(false),
            log_seq: AtomicU32::new(0),
            state: Mutex::new(State::default()),
        });
        // From here on, dropping `tb` cleans up whatever was created.
        let tb = Self { shared };
        let s = &tb.shared;
        let _ = std::fs::remove_dir_all(&s.tmp);
        for dir in [&s.tmp, &s.pin_root] {
            std::fs::create_dir_all(dir).map_err(|e| TestbedError::io(format!("create {}", dir.display()), e))?;
        }
        cgroup::create(&s.tools_cgroup())?;
        eprintln!("testbed {name}: id {}, files in {}", s.id, s.tmp.display());
        Ok(tb)
    }

    /// The unique id, `<pid>-<n>`.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The name given to [`Testbed::new`].
    #[must_use]
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The temp dir holding the config file and logs.
    #[must_use]
    pub fn temp_dir(&self) -> &Path {
        &self.shared.tmp
    }

    /// The cluster config file the agents read.
    #[must_use]
    pub fn config_path(&self) -> &Path {
        &self.shared.config_path
    }

    /// A handle that can tear this test bed down from another thread.
    #[must_use]
    pub fn teardown_handle(&self) -> TeardownHandle {
        TeardownHandle { shared: Arc::clone(&self.shared) }
    }

    /// Marks the test as failed: teardown then prints every agent's log tail.
    pub fn mark_failed(&self) {
        self.shared.failed.store(true, Ordering::Relaxed);
    }

    /// Stops the agents and removes everything now (also done on drop).
    pub fn teardown(&self) {
        teardown::teardown(&self.shared);
    }

    /// Adds a node: its netns, its link to the switch, its pod bridge, routes
    /// to and from every existing node, its cgroups and its pin dir.
    pub fn add_node(&self, name: &str) -> Result<Node> {
        let s = &self.shared;
        let mut state = s.lock();
        state.check_live()?;
        validate_name(&state, name)?;
        let index = u8::try_from(state.nodes.len() + 1)
            .ok()
            .filter(|i| *i < 250)
            .ok_or(TestbedError::InvalidName { name: name.to_owned(), why: "too many nodes" })?;
        if state.nodes.is_empty() {
            let sw = s.switch_netns();
            state.netns.push(sw.clone());
            network::create_switch(&sw)?;
        }
        let node = Node::new(Arc::clone(s), name, index);
        let ns = node.netns_name().to_owned();
        state.netns.push(ns.clone());
        network::create_netns(&ns)?;
        network::setup_node(&s.switch_netns(), &ns, index)?;
        for other in &state.nodes {
            network::route_to_node(&ns, other.handle.index())?;
            network::route_to_node(other.handle.netns_name(), index)?;
        }
        for dir in ["agent", "host", "pods"] {
            cgroup::create(&node.cgroup().join(dir))?;
        }
        let pins = node.pin_dir();
        std::fs::create_dir_all(&pins).map_err(|e| TestbedError::io(format!("create {}", pins.display()), e))?;
        state.nodes.push(NodeRecord { handle: node.clone(), next_host: 2 });
        Ok(node)
    }

    /// Adds a pod on `node`: its netns plugged into the node's bridge, its
    /// address and default route, and its cgroup.
    pub fn add_pod(&self, node: &Node, spec: PodSpec) -> Result<Pod> {
        let s = &self.shared;
        let mut state = s.lock();
        state.check_live()?;
        validate_name(&state, &spec.name)?;
        let record = state.nodes.iter_mut().find(|n| n.handle.name() == node.name()).ok_or_else(|| {
            TestbedError::InvalidName { name: node.name().to_owned(), why: "not a node of this test bed" }
        })?;
        let host = record.next_host;
        if host == 255 {
            return Err(TestbedError::InvalidName { name: spec.name, why: "node has no pod address left" });
        }
        record.next_host += 1;
        let ip = Ipv4Addr::new(10, 44, node.index(), host);
        let pod = Pod::new(Arc::clone(s), &spec, node, ip);
        state.netns.push(pod.netns_name().to_owned());
        network::create_netns(pod.netns_name())?;
        let dir = node.pod_netns_dir();
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::os::unix::fs::symlink(pod.netns_path(), dir.join(pod.netns_name())))
            .map_err(|e| TestbedError::io(format!("linking {} into {}", pod.netns_name(), dir.display()), e))?;
        network::setup_pod(node.netns_name(), node.index(), pod.netns_name(), host)?;
        cgroup::create(pod.cgroup())?;
        state.pods.push(PodRecord { handle: pod.clone(), spec });
        Ok(pod)
    }

    /// Adds a service (written with the next [`Testbed::write_config`]).
    pub fn add_service(&self, spec: ServiceSpec) -> Result<()> {
        let mut state = self.shared.lock();
        state.check_live()?;
        state.services.push(spec);
        Ok(())
    }

    /// Sets the config's `trustDomain` (default `cluster.local`). Call it
    /// before starting the CA and the agents.
    pub fn set_trust_domain(&self, trust_domain: &str) -> Result<()> {
        let mut state = self.shared.lock();
        state.check_live()?;
        state.trust_domain = Some(trust_domain.to_owned());
        Ok(())
    }

    /// Sets the inbound mode of the Kubernetes namespace `namespace` (a
    /// pod's own mode, [`PodSpec::inbound_mode`], wins). Written with the
    /// next [`Testbed::write_config`].
    pub fn set_namespace_inbound_mode(&self, namespace: &str, mode: InboundMode) -> Result<()> {
        let mut state = self.shared.lock();
        state.check_live()?;
        state.namespaces.insert(namespace.to_owned(), mode);
        Ok(())
    }

    /// The cluster config as it stands.
    #[must_use]
    pub fn config(&self) -> ClusterConfig {
        let state = self.shared.lock();
        ClusterConfig {
            trust_domain: state.trust_domain.clone(),
            namespaces: state
                .namespaces
                .keys()
                .chain(state.namespace_waypoints.keys())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .map(|name| NamespaceConfig {
                    name: name.clone(),
                    inbound_mode: state.namespaces.get(name).copied(),
                    use_waypoint: state.namespace_waypoints.get(name).cloned(),
                })
                .collect(),
            waypoints: state
                .waypoints
                .iter()
                .map(|(namespace, name)| crate::config::WaypointConfig {
                    name: name.clone(),
                    namespace: namespace.clone(),
                })
                .collect(),
            workloads: state
                .pods
                .iter()
                .map(|p| WorkloadConfig {
                    name: p.spec.name.clone(),
                    namespace: p.spec.namespace.clone(),
                    service_account: p.spec.service_account_name().to_owned(),
                    node: p.handle.node_name().to_owned(),
                    ips: vec![p.handle.ip()],
                    netns: p.handle.netns_path(),
                    enrolled: p.spec.enrolled,
                    labels: p.spec.labels.clone(),
                    inbound_mode: p.spec.inbound_mode,
                })
                .collect(),
            services: state.services.iter().map(ServiceSpec::to_config).collect(),
        }
    }

    /// Writes the cluster config file (atomically) and returns its path.
    pub fn write_config(&self) -> Result<PathBuf> {
        self.config().write_to(&self.shared.config_path)?;
        Ok(self.shared.config_path.clone())
    }

    /// Changes a pod's enrollment in the description and rewrites the config
    /// file. Agents pick it up within a second, or at once with
    /// [`Agent::reload`]; [`Testbed::apply_enrollment`] does both and waits.
    pub fn set_enrolled(&self, pod: &Pod, enrolled: bool) -> Result<()> {
        {
            let mut state = self.shared.lock();
            let record = state.pods.iter_mut().find(|p| p.handle.name() == pod.name()).ok_or_else(|| {
                TestbedError::InvalidName { name: pod.name().to_owned(), why: "not a pod of this test bed" }
            })?;
            record.spec.enrolled = enrolled;
        }
        self.write_config().map(|_| ())
    }

    /// [`Testbed::set_enrolled`], then SIGHUP every running agent and wait
    /// until each shows the change in `/workloads` (the pod's own agent must
    /// also report `captured` accordingly).
    pub fn apply_enrollment(&self, pod: &Pod, enrolled: bool) -> Result<()> {
        self.set_enrolled(pod, enrolled)?;
        let agents = self.reload_running_agents()?;
        let qualified = pod.qualified_name();
        for agent in &agents {
            let owner = agent.node().name() == pod.node_name();
            let what = format!("agent on {} to show {qualified} enrolled={enrolled}", agent.node().name());
            poll_until(&what, Duration::from_secs(10), Duration::from_millis(100), || {
                let workloads = match agent.workloads() {
                    Ok(w) => w,
                    Err(e) => return Ok(Check::Pending(e.to_string())),
                };
                Ok(match workloads.iter().find(|w| w.qualified_name() == qualified) {
                    None if !owner => Check::Ready(()),
                    None => Check::Pending(format!("{qualified} not listed")),
                    Some(w) if w.enrolled == enrolled && (!owner || w.captured == enrolled) => Check::Ready(()),
                    Some(w) => Check::Pending(format!("enrolled={} captured={}", w.enrolled, w.captured)),
                })
            })?;
        }
        Ok(())
    }

    /// Writes the config and starts the mesh CA in `node`'s netns on its
    /// transit address (see [`crate::ca`]); waits until it serves. Agents
    /// started afterwards use it (mTLS on). Add every pod first: the CA
    /// makes a token only for nodes that have workloads when it starts.
    pub fn start_ca(&self, node: &Node, options: CaOptions) -> Result<Ca> {
        let bin = env::agent_binary()?;
        self.write_config()?;
        let s = &self.shared;
        let ca = {
            let mut state = s.lock();
            state.check_live()?;
            if state.ca.is_some() {
                return Err(TestbedError::Environment("this test bed already has a CA".into()));
            }
            cgroup::create(&s.ca_cgroup())?;
            let ca = Ca::new(node.clone(), bin, options, s.ca_cgroup());
            state.ca = Some(ca.clone());
            ca
        };
        ca.start()?;
        Ok(ca)
    }

    /// The mesh CA, if one was started.
    #[must_use]
    pub fn ca(&self) -> Option<Ca> {
        self.shared.lock().ca.clone()
    }

    /// Starts `tcpdump` on the link between `node` and the switch (its
    /// switch port), with the capture filter `filter` (e.g. `tcp`), and
    /// waits until it listens. Needs tcpdump installed
    /// ([`crate::env::require_tool`]).
    pub fn capture_link(&self, node: &Node, filter: &str) -> Result<WireCapture> {
        let s = &self.shared;
        s.lock().check_live()?;
        let netns = Path::new("/run/netns").join(s.switch_netns());
        WireCapture::start(s, &netns, &network::switch_port(node.index()), filter)
    }

    /// Delays (and optionally thins) every frame on the link between
    /// `node` and the switch, both ways, until the returned line is dropped
    /// ([`crate::delay_line`]: a userspace stand-in for `netem`).
    pub fn delay_link(&self, node: &Node, spec: crate::delay_line::DelaySpec) -> Result<crate::delay_line::DelayLine> {
        let s = &self.shared;
        s.lock().check_live()?;
        let port = network::switch_port(node.index());
        crate::delay_line::DelayLine::start(&s.switch_netns(), &port, spec)
    }

    /// The authorization policies file the agents read (`--policies`).
    #[must_use]
    pub fn policies_path(&self) -> PathBuf {
        self.shared.policies_path()
    }

    /// Writes `yaml` (multi-document `AuthorizationPolicy` objects; empty for
    /// none) as the policies file, atomically, then SIGHUPs every running
    /// agent and waits until each has read it (its `/policies` content hash
    /// is the text's). Returns what each agent shows, in start order.
    /// Invalid policies are not an error here: the agents report them.
    pub fn set_policies(&self, yaml: &str) -> Result<Vec<Policies>> {
        self.shared.lock().check_live()?;
        write_atomically(&self.policies_path(), yaml)?;
        let mut hash = Fnv1a64::default();
        hash.update(yaml.as_bytes());
        let content_hash = format!("fnv1a64:{}", hash.hex());
        let agents = self.reload_running_agents()?;
        agents.iter().map(|a| a.wait_policies(&content_hash, Duration::from_secs(10))).collect()
    }

    /// Extra `mesh-agent run` flags (e.g. `--access-log PATH`) for the
    /// agents started after this call.
    pub fn set_agent_args(&self, args: &[&str]) {
        self.shared.lock().agent_args = args.iter().map(|&a| a.to_owned()).collect();
    }

    /// The agent of `node`, when started after this call, uses `flags`
    /// (`--ca-addr`, `--ca-token-file`, `--trust-bundle`) instead of the
    /// test bed's CA: e.g. the Kubernetes-mode CA ([`crate::kube_ca`]) with
    /// the node's projected token.
    pub fn set_agent_ca_flags(&self, node: &Node, flags: AgentCaFlags) {
        self.shared.lock().agent_ca.insert(node.name().to_owned(), flags);
    }

    /// Agents started after this call run `mesh-agent run --kubernetes`
    /// with `KUBECONFIG=<kubeconfig>` (an API server, e.g. the test's
    /// stand-in) instead of reading the local file and policies; each
    /// searches its node's [`Node::pod_netns_dir`].
    pub fn use_kubernetes(&self, mode: KubernetesMode) {
        self.shared.lock().kubernetes = Some(mode);
    }

    /// SIGHUPs every running agent (they re-read the config and policies
    /// files) and returns them, in start order.
    fn reload_running_agents(&self) -> Result<Vec<Agent>> {
        let agents: Vec<Agent> = self.agents().into_iter().filter(Agent::is_running).collect();
        for agent in &agents {
            agent.reload()?;
        }
        Ok(agents)
    }

    /// Writes the config, starts the agent for `node` and waits until ready.
    pub fn start_agent(&self, node: &Node) -> Result<Agent> {
        let agents = self.start_agents(&[node])?;
        Ok(agents.into_iter().next().expect("one agent per node given"))
    }

    /// Writes the config, starts one agent per node (all at once) and waits
    /// until every one is ready.
    pub fn start_agents(&self, nodes: &[&Node]) -> Result<Vec<Agent>> {
        let bin = env::agent_binary()?;
        self.write_config()?;
        let policies = self.policies_path();
        if !policies.exists() {
            write_atomically(&policies, "")?;
        }
        let ca = self.ca();
        let mut agents = Vec::with_capacity(nodes.len());
        for node in nodes {
            let own = self.shared.lock().agent_ca.get(node.name()).cloned();
            let flags = own.or_else(|| ca.as_ref().map(|ca| ca.agent_flags(node)));
            let agent = Agent::new((*node).clone(), bin.clone(), flags);
            {
                let mut state = self.shared.lock();
                state.check_live()?;
                state.agents.push(agent.clone());
            }
            agent.start()?;
            agents.push(agent);
        }
        for agent in &agents {
            agent.wait_ready(AGENT_READY_TIMEOUT)?;
        }
        Ok(agents)
    }

    /// Every agent started so far.
    #[must_use]
    pub fn agents(&self) -> Vec<Agent> {
        self.shared.lock().agents.clone()
    }

    /// The nodes, in creation order.
    #[must_use]
    pub fn nodes(&self) -> Vec<Node> {
        self.shared.lock().nodes.iter().map(|n| n.handle.clone()).collect()
    }

    /// The pods, in creation order.
    #[must_use]
    pub fn pods(&self) -> Vec<Pod> {
        self.shared.lock().pods.iter().map(|p| p.handle.clone()).collect()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        teardown::teardown(&self.shared);
    }
}

/// Node and pod names become netns and cgroup names: lowercase letters,
/// digits and inner dashes, short, unique within the test bed.
fn validate_name(state: &State, name: &str) -> Result<()> {
    let invalid = |why| Err(TestbedError::InvalidName { name: name.to_owned(), why });
    if name.is_empty() || name.len() > 20 {
        return invalid("must be 1 to 20 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return invalid("use lowercase letters, digits and inner dashes");
    }
    if ["tools", "ca", "agent", "host", "pods"].contains(&name) {
        return invalid("reserved");
    }
    let taken =
        state.nodes.iter().any(|n| n.handle.name() == name) || state.pods.iter().any(|p| p.handle.name() == name);
    if taken {
        return invalid("already used by a node or pod");
    }
    Ok(())
}
