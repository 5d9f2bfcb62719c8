//! The waypoint: Heddle's optional L7 proxy (`mesh-agent waypoint`), the
//! same binary and image as the node agent.
//!
//! A namespace or a Service opts in (`useWaypoint` in the local file); the
//! node agents then send connections to that traffic (a service VIP, or a
//! pod of the service) to the waypoint's pods through HBONE, as the
//! client's own identity ([`crate::proxy::to_waypoint`]). The waypoint
//! terminates the tunnel ([`listener`]), detects HTTP/1.1, HTTP/2 or
//! neither ([`detect`]), matches Gateway API routes ([`routes`]), applies
//! their filters ([`filters`]), picks a backend by weight and an endpoint by
//! peak EWMA ([`balance`]), and sends each request over HBONE again as its
//! own identity ([`pool`]), so the destination agent's L4 policy and STRICT
//! mode still apply. Every request is a flow record and Istio-style L7
//! metrics ([`telemetry`]), and, when sampled, a server and a client span
//! exported over OTLP ([`spans`], [`crate::trace`]); the admin API serves flows and the routes in
//! force ([`admin`]).
//!
//! Nothing here is imported by the node agent's data path: the agent knows
//! only which IPs a waypoint owns ([`crate::registry::Registry::waypoint_for`]).
//!
//! Tasks: the HBONE accept loop (one task per client tunnel, one per
//! stream, hyper's per-connection tasks), one driver task per upstream
//! connection, the configuration/route watcher, the admin and metrics
//! servers, the trust-bundle watcher and certificate maintenance.

pub mod admin;
pub mod authz;
pub mod balance;
pub mod detect;
pub mod filters;
pub mod forward;
pub mod h2io;
pub mod jwks;
pub mod listener;
pub mod mirror;
pub mod outlier;
pub mod passthrough;
pub mod pool;
pub mod ratelimit;
pub mod retry;
pub mod routes;
pub mod sources;
pub mod spans;
pub mod telemetry;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    agent::CaClientSettings,
    config,
    flows::FlowLog,
    identity::SpiffeId,
    netns::Netns,
    proxy::{hbone::Mesh, Pod},
    registry::{ObjectRef, Registry, SharedRegistry},
};

/// Process settings of `mesh-agent waypoint`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where the registry and the routes come from.
    pub source: sources::SourceSettings,
    /// The waypoint, `namespace/name`.
    pub waypoint: ObjectRef,
    /// The pod running this process (a workload of the configuration).
    pub pod: String,
    /// The CA client settings (mTLS is required).
    pub ca: CaClientSettings,
    /// HBONE listener.
    pub listen: SocketAddr,
    /// Admin API.
    pub admin_addr: SocketAddr,
    /// Prometheus metrics.
    pub metrics_addr: SocketAddr,
    /// Flow records kept.
    pub flow_capacity: usize,
    /// The namespace whose policies may attach to every waypoint.
    pub root_namespace: String,
    /// Span export (`None`: no tracing).
    pub trace: Option<crate::trace::Settings>,
}

/// Everything a request handler reads.
pub struct State {
    /// This waypoint.
    pub waypoint: ObjectRef,
    /// Its `ns/name`, as the records name it.
    pub waypoint_name: crate::flows::Name,
    /// This process's pod, as the tunnel client sees it.
    pub me: Arc<Pod>,
    /// Its `ns/name`, as the records name it.
    pub me_name: crate::flows::Name,
    /// Its identity (`spiffe://<td>/ns/<ns>/sa/<sa>`).
    pub me_identity: SpiffeId,
    /// The namespace whose policies may attach to every waypoint.
    pub root_namespace: String,
    /// The latest registry.
    pub registry: watch::Receiver<SharedRegistry>,
    /// The routes in force.
    pub routes: watch::Receiver<Arc<routes::RouteSet>>,
    /// Certificates, trust and the tunnel pool.
    pub mesh: Arc<Mesh>,
    /// Upstream HTTP connections.
    pub upstreams: Arc<pool::Upstreams>,
    /// Endpoint latency and load.
    pub balancer: balance::Balancer,
    /// Flows and metrics.
    pub telemetry: Arc<telemetry::Telemetry>,
    /// Request copies in flight to shadow backends.
    pub shadows: mirror::Shadows,
    /// Endpoint health for outlier detection.
    pub outliers: outlier::Outliers,
    /// Fetched JWKS of `RequestAuthentication` rules with a `jwksUri`.
    pub jwks: jwks::JwksCache,
    /// Connection tasks.
    pub tracker: TaskTracker,
}

/// One client connection (an HBONE stream), as its requests see it.
pub struct Downstream {
    /// Connection id for the records.
    pub conn: u64,
    /// The client's address (its pod IP).
    pub peer: SocketAddr,
    /// Its verified identity.
    pub client: SpiffeId,
    /// The same, as policies match it (made once per connection).
    pub identity: crate::policy::PeerIdentity,
    /// What it dialled (a VIP or a pod address).
    pub target: SocketAddr,
    /// The Service whose VIP it dialled.
    pub service: Option<ObjectRef>,
    /// The same, as the records name it.
    pub service_name: Option<crate::flows::Name>,
    /// Its HTTP version (the upstream speaks the same).
    pub version: pool::Version,
}

/// This process's pod in `registry`.
fn own_pod(registry: &Registry, settings: &Settings, home: &Arc<std::fs::File>) -> anyhow::Result<(Pod, SpiffeId)> {
    let id = ObjectRef { namespace: settings.waypoint.namespace.clone(), name: settings.pod.clone() };
    let w = registry
        .workload(&id)
        .with_context(|| format!("pod {id} is not a workload of {}", settings.source.describe()))?;
    anyhow::ensure!(
        w.runs_waypoint() == Some(settings.waypoint.name.as_str()),
        "pod {id} does not run waypoint {}: label it {}: {}",
        settings.waypoint,
        config::GATEWAY_NAME_LABEL,
        settings.waypoint.name
    );
    anyhow::ensure!(
        registry.waypoint(&settings.waypoint).is_some(),
        "waypoint {} is not in the waypoints of {} (a Gateway of class heddle-waypoint in Kubernetes)",
        settings.waypoint,
        settings.source.describe()
    );
    let netns = Netns::open(std::path::Path::new("/proc/self/ns/net"), home.clone())?;
    let ips: Vec<IpAddr> = w.ips.clone();
    let local_ports = crate::proxy::local_ports::LocalPorts::read_in(&netns);
    Ok((Pod { id, netns, cookie: 0, ips, identity: w.identity.clone(), local_ports }, w.identity.clone()))
}

/// Runs the waypoint until SIGTERM/SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let home = Arc::new(Netns::current()?);
    let stop = CancellationToken::new();
    let started = sources::start(&settings.source, &settings.waypoint, &settings.pod, &home, &stop).await?;
    let registry = started.registry;
    let (me, me_identity) = own_pod(&registry, &settings, &home)?;
    let mut last_good = routes::last_good::LastGood::default();
    let route_set = Arc::new(last_good.build(&started.routes, &registry, &settings.waypoint, &settings.root_namespace));
    started.updates.initial_status(&route_set, &registry, &settings.waypoint).await;
    let (registry_tx, registry_rx) = watch::channel(registry);
    let (routes_tx, routes_rx) = watch::channel(route_set);
    let mesh = crate::agent::start_mesh(Some(&settings.ca), &started.trust_domain, &stop)
        .await?
        .context("the waypoint needs a CA")?;
    let me = Arc::new(me);
    let flows = Arc::new(FlowLog::new(settings.flow_capacity));
    let prometheus = prometheus::Registry::new();
    // The exporter outlives the drain, so the last requests' spans go out.
    let trace_stop = CancellationToken::new();
    let service_name = format!("{}.{}", settings.waypoint.name, settings.waypoint.namespace);
    let tracer = crate::trace::Tracer::start(settings.trace.as_ref(), &service_name, &prometheus, trace_stop.clone())?;
    let telemetry = Arc::new(telemetry::Telemetry::new(flows, prometheus, tracer));
    let state = Arc::new(State {
        waypoint: settings.waypoint.clone(),
        waypoint_name: settings.waypoint.to_string().into(),
        me_name: me.id.to_string().into(),
        me: me.clone(),
        me_identity,
        root_namespace: settings.root_namespace.clone(),
        registry: registry_rx,
        routes: routes_rx,
        upstreams: Arc::new(pool::Upstreams::new(mesh.clone(), me)),
        mesh,
        balancer: balance::Balancer::default(),
        telemetry,
        shadows: mirror::Shadows::default(),
        outliers: outlier::Outliers::default(),
        jwks: jwks::JwksCache::default(),
        tracker: TaskTracker::new(),
    });
    let hbone = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding the waypoint's HBONE port {}", settings.listen))?;
    let admin = crate::http_server::bind(settings.admin_addr)
        .await
        .with_context(|| format!("binding the admin API {}", settings.admin_addr))?;
    let metrics = crate::http_server::bind(settings.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics port {}", settings.metrics_addr))?;
    tokio::spawn(admin::serve(admin, state.clone(), stop.clone()));
    tokio::spawn(admin::serve_metrics(metrics, state.clone(), stop.clone()));
    tokio::spawn(jwks::run(state.routes.clone(), state.jwks.clone(), stop.clone()));
    tokio::spawn(started.updates.run(registry_tx, routes_tx, state.clone(), last_good, stop.clone()));
    let served = tokio::spawn(listener::run(hbone, state.clone(), stop.clone()));
    tracing::info!(waypoint = %settings.waypoint, listen = %settings.listen, "waypoint serving");
    crate::agent::wait_for_shutdown().await?;
    tracing::info!("stopping: draining requests");
    stop.cancel();
    let _ = served.await;
    state.tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), state.tracker.wait()).await;
    trace_stop.cancel();
    state.telemetry.tracer.flushed(Duration::from_secs(2)).await;
    Ok(())
}
