//! The composition root of `mesh-agent run`: loads the configuration and the
//! authorization policies, takes over from a running agent if there is one
//! ([`crate::handover`]), starts the datapath, enrolls pods, serves the
//! admin API and the Prometheus metrics, watches the configuration and policy
//! files, and shuts down in order on SIGTERM/SIGINT, or hands over to a
//! successor and drains.
//!
//! Tasks (all on the tokio runtime): the admin server, the metrics server,
//! the watcher (config
//! and policies), the policy re-evaluation task ([`Authorizer::run`]), the
//! accept loops of each enrolled pod, one task per proxied connection, and
//! the eBPF log reader.

use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, AdminState},
    authz::{
        source::{PolicySource, PolicyStatus},
        Authorizer,
    },
    capture::Capture,
    config,
    datapath::Datapath,
    flows::FlowLog,
    handover::{self, Incumbent, Inventory, Offer, Offered, Role, Takeover},
    identity::{
        bundle::{self, TrustBundle},
        ca_client::{RemoteCa, TokenSource},
        certs::CertManager,
        tls,
    },
    k8s::source::{KubeSettings, KubeSource},
    metrics::{
        scrape::{self, Exporter, Sources},
        ConnMetrics,
    },
    netns::Netns,
    policy::PolicySet,
    proxy::{hbone::Mesh, splice::CLOSE_GRACE, ProxyContext},
    registry::{Registry, SharedRegistry},
    state_file::{Phase, StateFile},
};

/// How often the configuration file is re-read and enrollment retried.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Settings of a running agent (process flags, resolved).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// Where workloads, services and policies come from.
    pub source: SourceSettings,
    /// This node's name.
    pub node: String,
    /// Cgroup v2 directory the cgroup programs attach to.
    pub cgroup: PathBuf,
    /// Directory on bpffs for pinned links (and maps, under `maps/`).
    pub pin_dir: PathBuf,
    /// Unix socket of the zero-downtime upgrade ([`crate::handover`]).
    pub handover_socket: PathBuf,
    /// How long an agent that handed over drains its connections.
    #[serde(with = "secs")]
    pub handover_drain: Duration,
    /// The health file of `mesh-agent probe` ([`crate::state_file`]).
    pub state_file: Option<PathBuf>,
    /// Admin API address.
    pub admin_addr: SocketAddr,
    /// Prometheus metrics address (`/metrics`, `/healthz`).
    pub metrics_addr: SocketAddr,
    /// Flow records kept.
    pub flow_capacity: usize,
    /// Where the JSON access log goes; `None`: off.
    pub access_log: Option<crate::access_log::AccessLogTarget>,
    /// How long shutdown waits for open connections.
    #[serde(with = "secs")]
    pub drain_timeout: Duration,
    /// At exit, leave enrolled pods in the maps and every program attached
    /// and pinned (they fail closed until the next agent), unless no pod is
    /// enrolled then. See ARCHITECTURE.md, "Crash, restart, shutdown".
    pub keep_attached_on_exit: bool,
    /// The mesh CA; `None` runs without mTLS (plaintext forwarding).
    pub ca: Option<CaClientSettings>,
    /// The namespace whose policies apply mesh-wide.
    pub root_namespace: String,
    /// Span export of connections (`--trace-l4`; `None`: no spans).
    pub trace_l4: Option<crate::trace::Settings>,
}

/// Where the registry and the policies come from. Only the composition root
/// knows; every other module reads the same `watch` channels.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum SourceSettings {
    /// The local YAML file, and policy files.
    #[serde(rename_all = "camelCase")]
    Local {
        /// The local configuration file.
        config: PathBuf,
        /// Authorization policies (a file or a directory); `None`: no policies.
        policies: Option<PathBuf>,
    },
    /// The Kubernetes API (in-cluster configuration, or `KUBECONFIG`).
    #[serde(rename_all = "camelCase")]
    Kubernetes {
        /// The mesh's trust domain.
        trust_domain: String,
        /// Directories of named pod network namespaces to search instead
        /// of `/run/netns` and `/proc`.
        netns_dirs: Vec<PathBuf>,
    },
}

/// What a source publishes, and the task that keeps it current.
struct Inputs {
    registry: watch::Receiver<SharedRegistry>,
    policies: watch::Receiver<Arc<PolicySet>>,
    policy_status: Arc<Mutex<PolicyStatus>>,
    trust_domain: String,
    updater: Updater,
}

/// The task that keeps a source's channels current.
enum Updater {
    Local(LocalWatcher),
    Kubernetes(KubeSource),
}

impl Updater {
    async fn run(self, stop: CancellationToken) {
        match self {
            Updater::Local(w) => w.run(stop).await,
            Updater::Kubernetes(k) => k.run(stop).await,
        }
    }
}

/// Opens the configured source and publishes its first state.
async fn open_source(
    settings: &Settings,
    home: &Arc<std::fs::File>,
    stop: &CancellationToken,
) -> anyhow::Result<Inputs> {
    match &settings.source {
        SourceSettings::Local { config, policies } => {
            let initial_text =
                std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
            let initial = config::parse(config, &initial_text)?;
            let (registry_tx, registry) = watch::channel::<SharedRegistry>(Arc::new(Registry::from_config(&initial)));
            let (policy_source, policies) = PolicySource::open(policies.as_deref(), &settings.root_namespace)
                .context("loading the authorization policies (--policies)")?;
            Ok(Inputs {
                registry,
                policies,
                policy_status: policy_source.status(),
                trust_domain: initial.trust_domain,
                updater: Updater::Local(LocalWatcher {
                    // Installed now, before the agent says it is ready: a
                    // SIGHUP's default action would end the process.
                    hup: signal(SignalKind::hangup())
                        .map_err(|e| tracing::error!(error = %e, "cannot install the SIGHUP handler; polling only"))
                        .ok(),
                    path: config.clone(),
                    last_good: initial_text,
                    last_bad: None,
                    registry_tx,
                    policies: policy_source,
                    config_error: Arc::new(Mutex::new(None)),
                }),
            })
        }
        SourceSettings::Kubernetes { trust_domain, netns_dirs } => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster service account, or KUBECONFIG)")?;
            let (source, published) = KubeSource::start(
                client,
                KubeSettings {
                    role: crate::k8s::source::Role::Agent,
                    node: settings.node.clone(),
                    trust_domain: trust_domain.clone(),
                    root_namespace: settings.root_namespace.clone(),
                    netns_dirs: netns_dirs.clone(),
                },
                home.clone(),
                stop,
            )
            .await?;
            Ok(Inputs {
                registry: published.registry,
                policies: published.policies,
                policy_status: published.policy_status,
                trust_domain: trust_domain.clone(),
                updater: Updater::Kubernetes(source),
            })
        }
    }
}

/// How the agent reaches the mesh CA.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaClientSettings {
    /// CA address, `host:port` (resolved at every connection).
    pub addr: String,
    /// File holding this node's token, re-read for every request.
    pub token_file: PathBuf,
    /// PEM bundle of trusted roots.
    pub trust_bundle: PathBuf,
    /// Wait for the trust bundle to appear instead of failing (Kubernetes
    /// mode: the CA publishes it in a `ConfigMap` the kubelet mounts).
    pub wait_for_trust_bundle: bool,
}

/// How often a missing trust bundle is looked for, and how often that is logged.
const BUNDLE_POLL: Duration = Duration::from_millis(500);
const BUNDLE_LOG_EVERY: Duration = Duration::from_secs(5);

async fn read_trust_bundle(ca: &CaClientSettings) -> anyhow::Result<String> {
    let started = std::time::Instant::now();
    let mut logged = started;
    loop {
        match std::fs::read_to_string(&ca.trust_bundle) {
            Ok(pem) if !pem.trim().is_empty() || !ca.wait_for_trust_bundle => return Ok(pem),
            Err(e) if !ca.wait_for_trust_bundle || e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("reading the trust bundle {}", ca.trust_bundle.display()))
            }
            _ => {}
        }
        if logged.elapsed() >= BUNDLE_LOG_EVERY || logged == started {
            tracing::warn!(path = %ca.trust_bundle.display(), waited_s = started.elapsed().as_secs(), "waiting for the trust bundle (published by the mesh CA in ConfigMap heddle-trust-bundle)");
            logged = std::time::Instant::now();
        }
        tokio::time::sleep(BUNDLE_POLL).await;
    }
}

/// The mesh side of the agent, and the trust bundle text it started with
/// (for [`bundle::watch_file`]).
async fn build_mesh(ca: &CaClientSettings, trust_domain: &str) -> anyhow::Result<(Arc<Mesh>, String)> {
    let bundle_text = read_trust_bundle(ca).await?;
    let roots =
        tls::roots_from_pem(&bundle_text).with_context(|| format!("trust bundle {}", ca.trust_bundle.display()))?;
    let trust = TrustBundle::new(roots)?;
    // Checked once at start so a wrong path fails fast; re-read per request.
    std::fs::metadata(&ca.token_file).with_context(|| format!("reading the node token {}", ca.token_file.display()))?;
    let token = TokenSource::File(ca.token_file.clone());
    let remote = RemoteCa::with_bundle(ca.addr.clone(), token, trust.clone(), trust_domain)?;
    let mesh = Arc::new(Mesh::new(CertManager::new(Arc::new(remote)), trust));
    Ok((mesh, bundle_text))
}

mod secs {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// The mesh side when a CA is configured, with the task that picks up a
/// rotated trust bundle without a restart; `None` (plaintext, with a
/// warning) without a CA.
pub(crate) async fn start_mesh(
    ca: Option<&CaClientSettings>,
    trust_domain: &str,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Arc<Mesh>>> {
    let Some(ca) = ca else {
        tracing::warn!(
            "no CA configured (--ca-addr): mesh traffic is forwarded in PLAINTEXT; use only for development"
        );
        return Ok(None);
    };
    let (mesh, bundle_text) = build_mesh(ca, trust_domain).await?;
    tokio::spawn(bundle::watch_file(
        ca.trust_bundle.clone(),
        mesh.trust.clone(),
        bundle_text,
        bundle::BUNDLE_POLL,
        stop.clone(),
    ));
    Ok(Some(mesh))
}

/// Time to obtain the certificates of the pods taken over before serving,
/// all together (well inside the incumbent's wait for `Ready`).
const TAKEOVER_CERT_WAIT: Duration = Duration::from_secs(20);

/// Runs the agent until SIGTERM/SIGINT, or until it has handed over to a
/// successor and drained.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let home = Arc::new(Netns::current()?);
    let stop = CancellationToken::new();
    let state = StateFile::start(settings.state_file.as_deref(), stop.clone()).context("writing the state file")?;
    let inputs = open_source(&settings, &home, &stop).await?;
    let registry_rx = inputs.registry.clone();
    let authz = Arc::new(Authorizer::new(inputs.policies.clone(), registry_rx.clone()));
    let mesh = start_mesh(settings.ca.as_ref(), &inputs.trust_domain, &stop).await?;
    // An upgrade: the running agent's listeners, before binding anything.
    let (mut inventory, takeover) = take_over(&settings.handover_socket).await?;
    // Everything that can fail on bad input is done before the programs are
    // attached, so a start that fails leaves no pod redirected to nothing.
    let admin_listener = node_listener(&mut inventory, Role::Admin, settings.admin_addr).await?;
    let datapath =
        Arc::new(Datapath::start(&settings.cgroup, &settings.pin_dir).context("starting the eBPF datapath")?);
    tracing::info!(cgroup = %settings.cgroup.display(), pins = %settings.pin_dir.display(), "eBPF programs attached");

    let prom = prometheus::Registry::new();
    // The exporter outlives the drain, so the last connections' spans go out.
    let trace_stop = CancellationToken::new();
    let (flows, l4_spans) = flow_log(&settings, &prom, &registry_rx, &trace_stop)?;
    let ctx = Arc::new(ProxyContext {
        datapath: datapath.clone(),
        flows: flows.clone(),
        registry: registry_rx.clone(),
        tracker: TaskTracker::new(),
        mesh: mesh.clone(),
        authz: authz.clone(),
        draining: CancellationToken::new(),
        closing: CancellationToken::new(),
    });
    let capture = Arc::new(Mutex::new(Capture::new(settings.node.clone(), home, ctx.clone())));

    let exporter = Arc::new(Exporter::new(
        prom,
        Sources {
            flows: flows.clone(),
            datapath: datapath.clone(),
            authz: authz.clone(),
            certs: mesh.as_ref().map(|m| m.certs.clone()),
        },
    )?);
    let metrics_listener = node_listener(&mut inventory, Role::Metrics, settings.metrics_addr).await?;
    let node_listeners = vec![
        (Role::Admin, admin_listener.as_fd().try_clone_to_owned()?),
        (Role::Metrics, metrics_listener.as_fd().try_clone_to_owned()?),
    ];
    // Admin and metrics stop serving at a handover; the rest runs on while
    // the connections drain (policy changes still apply to them).
    let serving = stop.child_token();
    tokio::spawn(scrape::serve(metrics_listener, exporter, serving.clone()));

    let admin_state = Arc::new(AdminState {
        node: settings.node.clone(),
        ready: false.into(),
        flows,
        datapath: datapath.clone(),
        capture: capture.clone(),
        registry: registry_rx.clone(),
        effective_config: serde_json::to_value(&settings)?,
        config_error: match &inputs.updater {
            Updater::Local(w) => w.config_error.clone(),
            Updater::Kubernetes(_) => Arc::new(Mutex::new(None)),
        },
        mesh: mesh.clone(),
        authz: authz.clone(),
        policy_status: inputs.policy_status.clone(),
    });
    tokio::spawn(admin::serve(admin_listener, admin_state.clone(), serving.clone()));

    if let (Some(_), Some(mesh)) = (&takeover, &mesh) {
        // Both agents accept on the same sockets now: have the pods'
        // certificates before the first handshake lands here.
        certificates_for(mesh, &registry_rx.borrow(), &settings.node).await;
    }
    first_enrollment(&capture, inventory, &registry_rx.borrow());
    // Before saying ready: from then on a SIGTERM must stop us in order.
    let mut signals = ShutdownSignals::install()?;
    admin_state.ready.store(true, Ordering::Release);
    tracing::info!(node = %settings.node, admin = %settings.admin_addr, metrics = %settings.metrics_addr, "agent ready");
    if let Some(t) = takeover {
        // Serving beside an incumbent that did not let go would leave two
        // agents in charge of the same pins: better not to serve at all.
        finish_takeover(t).await?;
    }
    // Only once the previous agent has let go: what it left unused.
    capture.lock().expect("capture lock").sweep();
    state.set(Phase::Ready);
    let offer = AgentOffer { capture: capture.clone(), node_listeners };
    let (incumbent, mut releases) = serve_handover(&settings.handover_socket, Arc::new(offer));

    let reevaluator = tokio::spawn(authz.run(stop.clone()));
    let updater = tokio::spawn(inputs.updater.run(stop.clone()));
    let reconciler = tokio::spawn(reconcile(registry_rx, capture.clone(), stop.clone()));

    let release = tokio::select! { () = signals.recv() => None, Some(r) = releases.recv() => Some(r) };
    admin_state.ready.store(false, Ordering::Release);
    state.set(Phase::Draining);
    let exit = if let Some(release) = release {
        serving.cancel();
        hand_over(&capture, &ctx, release, settings.handover_drain).await;
        stop.cancel();
        Exit::HandedOver
    } else {
        stop.cancel();
        let _ = reconciler.await;
        shut_down(&settings, &capture, &ctx).await
    };
    let _ = tokio::join!(updater, reevaluator);
    trace_stop.cancel();
    incumbent.iter().for_each(Incumbent::withdraw);
    leave_datapath(&datapath, exit, &settings.pin_dir);
    // After the programs are gone: the last connections' spans go out.
    if let Some(t) = &l4_spans {
        t.flushed(Duration::from_secs(2)).await;
    }
    Ok(())
}

/// The flow log, with its metrics, access log and L4 span exporter.
fn flow_log(
    settings: &Settings,
    prom: &prometheus::Registry,
    registry: &watch::Receiver<SharedRegistry>,
    trace_stop: &CancellationToken,
) -> anyhow::Result<(Arc<FlowLog>, Option<Arc<crate::trace::Tracer>>)> {
    let conn_metrics = Arc::new(ConnMetrics::new(prom, registry.clone())?);
    let access_log = match &settings.access_log {
        Some(target) => Some(Arc::new(crate::access_log::AccessLog::open(target)?)),
        None => None,
    };
    let l4_spans = match &settings.trace_l4 {
        Some(t) => Some(Arc::new(crate::trace::Tracer::start(
            Some(t),
            &format!("heddle-agent.{}", settings.node),
            prom,
            trace_stop.clone(),
        )?)),
        None => None,
    };
    let flows = FlowLog::new(settings.flow_capacity)
        .with_metrics(conn_metrics)
        .with_access_log(access_log)
        .with_tracer(l4_spans.clone());
    Ok((Arc::new(flows), l4_spans))
}

/// Serves the handover socket for the next agent; without it (a warning)
/// upgrades are restarts.
fn serve_handover(
    socket: &std::path::Path,
    offer: Arc<AgentOffer>,
) -> (Option<Incumbent>, tokio::sync::mpsc::Receiver<handover::Release>) {
    match Incumbent::serve(socket, offer) {
        Ok((i, rx)) => (Some(i), rx),
        Err(e) => {
            tracing::warn!(socket = %socket.display(), error = %e, "cannot serve the handover socket: the next agent will not take over seamlessly");
            (None, tokio::sync::mpsc::channel(1).1)
        }
    }
}

/// Enrolls this node's pods for the first time, with the listeners taken
/// over where there are ([`Capture::sweep`] follows once any previous agent
/// has let go).
fn first_enrollment(capture: &Mutex<Capture>, inherited: Inventory, registry: &Registry) {
    let mut capture = capture.lock().expect("capture lock");
    capture.inherit(inherited);
    capture.reconcile(registry);
}

/// The admin or metrics listener: the one taken over, or a new one.
async fn node_listener(inventory: &mut Inventory, role: Role, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    match inventory.take(role, None) {
        Some(l) => TcpListener::from_std(l).with_context(|| format!("the {role:?} listener taken over")),
        None => {
            crate::http_server::bind(addr).await.with_context(|| format!("binding the {role:?} listener on {addr}"))
        }
    }
}

/// An exit on SIGTERM/SIGINT: stop capturing (see [`stop_capture`]),
/// send `GOAWAY` on the tunnels, drain.
async fn shut_down(settings: &Settings, capture: &Mutex<Capture>, ctx: &ProxyContext) -> Exit {
    tracing::info!(
        keep_attached_on_exit = settings.keep_attached_on_exit,
        "shutting down: not ready, stopping the pods' listeners, draining connections"
    );
    let exit = stop_capture(capture, settings.keep_attached_on_exit);
    ctx.draining.cancel();
    drain(&ctx.tracker, settings.drain_timeout, &ctx.closing).await;
    exit
}

/// The incumbent's side of a handover, once the successor serves: stop
/// accepting, send `GOAWAY` on the tunnels, say how much is left, drain.
/// The policy watch and re-evaluation keep running meanwhile, so a policy
/// change still closes what it denies.
async fn hand_over(capture: &Mutex<Capture>, ctx: &ProxyContext, release: handover::Release, deadline: Duration) {
    let pods = capture.lock().expect("capture lock").release_to_successor();
    ctx.draining.cancel();
    let open = ctx.tracker.len();
    tracing::info!(
        pods,
        open,
        drain_s = deadline.as_secs(),
        "handed over to the successor: not accepting; draining open connections"
    );
    let _ = release.draining.send(open);
    drain(&ctx.tracker, deadline, &ctx.closing).await;
}

/// Asks a running agent for its listeners (blocking, on tokio's blocking
/// pool). None running: an empty inventory.
async fn take_over(socket: &std::path::Path) -> anyhow::Result<(Inventory, Option<Takeover>)> {
    let path = socket.to_owned();
    let taken = tokio::task::spawn_blocking(move || handover::take_over(&path))
        .await?
        .with_context(|| format!("taking over from the running agent at {}", socket.display()))?;
    Ok(match taken {
        Some(mut t) => {
            tracing::info!(
                incumbent = t.incumbent,
                listeners = t.inventory.len(),
                "taking over from the running agent"
            );
            (std::mem::take(&mut t.inventory), Some(t))
        }
        None => (Inventory::default(), None),
    })
}

/// Tells the previous agent this one serves now; fails if it does not
/// confirm that it stopped accepting.
async fn finish_takeover(takeover: Takeover) -> anyhow::Result<()> {
    let incumbent = takeover.incumbent;
    let draining = tokio::task::spawn_blocking(move || takeover.finish())
        .await?
        .with_context(|| format!("the previous agent (pid {incumbent}) did not confirm the handover"))?;
    tracing::info!(incumbent, draining, "took over: the previous agent stopped accepting and drains");
    Ok(())
}

/// Waits (bounded, all together) for the certificates of this node's
/// enrolled pods.
async fn certificates_for(mesh: &Arc<Mesh>, registry: &Registry, node: &str) {
    let ids: std::collections::HashSet<_> = registry
        .on_node(node)
        .filter(|w| w.enrolled && !registry.is_waypoint_pod(w))
        .map(|w| w.identity.clone())
        .collect();
    for id in &ids {
        mesh.certs.ensure(id);
    }
    let deadline = tokio::time::Instant::now() + TAKEOVER_CERT_WAIT;
    for id in &ids {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Err(e) = mesh.certs.get(id, left).await {
            tracing::warn!(identity = %id, error = %e, "no certificate yet for a pod taken over");
        }
    }
}

/// The listeners this agent hands to a successor.
struct AgentOffer {
    capture: Arc<Mutex<Capture>>,
    node_listeners: Vec<(Role, OwnedFd)>,
}

impl Offer for AgentOffer {
    fn freeze(&self) -> Vec<Offered> {
        let mut offered: Vec<Offered> = self
            .node_listeners
            .iter()
            .filter_map(|(role, fd)| fd.try_clone().ok().map(|fd| Offered { role: *role, cookie: None, pod: None, fd }))
            .collect();
        offered.extend(self.capture.lock().expect("capture lock").offer());
        offered
    }

    fn thaw(&self) {
        self.capture.lock().expect("capture lock").thaw();
    }
}

/// The last step of an exit: detach everything, or leave it pinned.
fn leave_datapath(datapath: &Datapath, exit: Exit, pin_dir: &std::path::Path) {
    match exit {
        Exit::Detach => {
            datapath.shutdown();
            tracing::info!(pins = %pin_dir.display(), "eBPF programs detached and unpinned; pods go direct; bye");
        }
        Exit::HandedOver => {
            datapath.release();
            tracing::info!(pins = %pin_dir.display(), "eBPF programs and maps left to the successor; bye");
        }
        Exit::KeepAttached { pods } => {
            datapath.release();
            tracing::warn!(
                pods,
                pins = %pin_dir.display(),
                "eBPF programs left attached and pinned (--keep-attached-on-exit): enrolled pods fail closed until the next agent starts; bye"
            );
        }
    }
}

/// What an exiting agent leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    /// Everything detached and unpinned: pods go direct.
    Detach,
    /// Everything left attached and pinned: `pods` enrolled pods fail closed
    /// until the next agent.
    KeepAttached { pods: usize },
    /// Everything left to the successor, which serves the pods already.
    HandedOver,
}

/// Stops capturing new connections. Without `keep_attached`, or when no pod
/// is enrolled (an uninstall: the admin un-enrolled every namespace first),
/// every pod is un-enrolled and the agent will detach everything. Otherwise
/// the pods' listeners close but they stay enrolled, so the datapath keeps
/// them from bypassing the mesh while no agent runs.
fn stop_capture(capture: &Mutex<Capture>, keep_attached: bool) -> Exit {
    let mut capture = capture.lock().expect("capture lock");
    let enrolled = capture.enrolled_count();
    if capture.is_frozen() {
        // Stopped in the middle of a handover: the successor holds the
        // listeners and has adopted the links; take nothing away from it.
        tracing::info!("stopped during a handover: leaving everything to the successor");
        capture.release_to_successor();
        Exit::HandedOver
    } else if keep_attached && enrolled > 0 {
        tracing::info!(
            pods = enrolled,
            "keeping enrolled pods in the datapath (--keep-attached-on-exit): their new connections fail closed until the next agent"
        );
        Exit::KeepAttached { pods: capture.release() }
    } else {
        if keep_attached {
            tracing::info!(
                "no pod enrolled: detaching and unpinning everything despite --keep-attached-on-exit (uninstall)"
            );
        }
        capture.shutdown();
        Exit::Detach
    }
}

/// Lets open connections finish for up to `deadline`, then ends the rest
/// cleanly (`closing`: FIN and `END_STREAM`, see [`crate::proxy::splice`]).
/// New ones are no longer accepted (see [`stop_capture`]).
async fn drain(tracker: &TaskTracker, deadline: Duration, closing: &CancellationToken) {
    tracker.close();
    if tokio::time::timeout(deadline, tracker.wait()).await.is_err() {
        tracing::warn!(open = tracker.len(), "drain deadline passed; ending the remaining connections cleanly");
        closing.cancel();
        if tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(1), tracker.wait()).await.is_err() {
            tracing::warn!(open = tracker.len(), "connections still open after their clean close; exiting");
        }
    }
}

/// Waits for SIGTERM or SIGINT: how every Heddle process (agent, CA,
/// waypoint, controller) is told to stop.
pub async fn wait_for_shutdown() -> anyhow::Result<()> {
    ShutdownSignals::install()?.recv().await;
    Ok(())
}

/// SIGTERM and SIGINT, handled from the moment this is made (their default
/// action, ending the process, no longer applies, for the rest of its life).
pub struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Installs the handlers.
    pub fn install() -> anyhow::Result<Self> {
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// The next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}

/// Keeps capture in line with the registry: at once when a source publishes
/// a change, and every [`POLL_INTERVAL`] to retry pods that failed to enroll.
async fn reconcile(
    mut registry: watch::Receiver<SharedRegistry>,
    capture: Arc<Mutex<Capture>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = registry.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(POLL_INTERVAL) => {},
        }
        let current = registry.borrow_and_update().clone();
        capture.lock().expect("capture lock").reconcile(&current);
    }
}

/// Re-reads the configuration file and the policy source on SIGHUP and
/// every [`POLL_INTERVAL`]. A valid configuration change is published; an
/// invalid one is logged (once) and the last good state kept. Policies: see
/// [`PolicySource::reload`].
struct LocalWatcher {
    /// SIGHUP, when its handler could be installed.
    hup: Option<tokio::signal::unix::Signal>,
    path: PathBuf,
    last_good: String,
    last_bad: Option<String>,
    registry_tx: watch::Sender<SharedRegistry>,
    policies: PolicySource,
    /// Why the file on disk is not applied, for `GET /config`.
    config_error: Arc<Mutex<Option<String>>>,
}

impl LocalWatcher {
    async fn run(mut self, stop: CancellationToken) {
        let mut hup = self.hup.take();
        loop {
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                _ = hangup => tracing::info!(file = %self.path.display(), "SIGHUP: reloading configuration and policies"),
                () = tokio::time::sleep(POLL_INTERVAL) => {},
            }
            self.reload_config();
            self.policies.reload();
        }
    }

    fn reload_config(&mut self) {
        let path = &self.path;
        match std::fs::read_to_string(path) {
            Ok(text) if text != self.last_good && Some(&text) != self.last_bad.as_ref() => {
                match config::parse(path, &text) {
                    Ok(cfg) => {
                        tracing::info!(file = %path.display(), "configuration reloaded");
                        self.registry_tx.send_replace(Arc::new(Registry::from_config(&cfg)));
                        *self.config_error.lock().expect("lock") = None;
                        self.last_good = text;
                        self.last_bad = None;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "configuration rejected; keeping the last good one");
                        *self.config_error.lock().expect("lock") = Some(e.to_string());
                        self.last_bad = Some(text);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                let msg = format!("cannot read {}: {e}", path.display());
                let mut error = self.config_error.lock().expect("lock");
                if error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(error = %msg, "keeping the last good configuration");
                    *error = Some(msg);
                }
            }
        }
    }
}

/// Raises the soft open-file limit to the hard limit: every proxied
/// connection holds two sockets.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } == 0 && lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) };
    }
}

/// The node's cgroup v2 root: `/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one.
#[must_use]
pub fn default_cgroup_root() -> PathBuf {
    let unified = PathBuf::from("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}
