//! Where a waypoint's registry and routes come from, and how changes reach
//! it: the local configuration file and routes directory (re-read every
//! [`RELOAD_POLL`]; a bad file keeps the last good state), or the
//! Kubernetes API (`--kubernetes`: the node agents' source in its waypoint
//! role, [`crate::k8s::source::Role::Waypoint`], and the route watches of
//! [`crate::k8s::route_source`], which also write route status back).
//!
//! Either way every change recompiles the routes against the new registry
//! and drops pooled upstream connections to endpoints that left it.

use std::{collections::HashSet, net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{routes, routes::last_good::LastGood, State};
use crate::{
    config,
    k8s::{
        route_source::{RouteWatch, StatusWriter},
        source::{KubeSettings, KubeSource, Role},
    },
    registry::{ObjectRef, Registry, SharedRegistry},
};

/// How often the configuration and the routes are re-read.
const RELOAD_POLL: Duration = Duration::from_secs(1);
/// How long a waypoint in Kubernetes mode waits for its own Pod to appear
/// in the API (with its IP) before giving up.
const OWN_POD_WAIT: Duration = Duration::from_mins(1);

/// Where the waypoint reads its inputs.
#[derive(Clone, Debug)]
pub enum SourceSettings {
    /// The local configuration.
    File {
        /// The configuration file.
        config: PathBuf,
        /// Routes and waypoint policies: YAML files or directories of
        /// `HTTPRoute`/`GRPCRoute`/... and `AuthorizationPolicy` objects.
        routes: Vec<PathBuf>,
    },
    /// The Kubernetes API.
    Kubernetes {
        /// The mesh's trust domain.
        trust_domain: String,
        /// The node the waypoint's pod runs on.
        node: String,
    },
}

impl SourceSettings {
    /// What the inputs are, for error messages.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::File { config, .. } => config.display().to_string(),
            Self::Kubernetes { .. } => "the Kubernetes API".to_owned(),
        }
    }
}

/// The first inputs, and what keeps them current.
pub struct Started {
    /// The registry.
    pub registry: SharedRegistry,
    /// The route objects.
    pub routes: Vec<routes::Source>,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// Applies later changes ([`Updates::run`]).
    pub updates: Updates,
}

/// What keeps the inputs current.
pub enum Updates {
    /// Re-reads the files.
    File {
        /// The configuration file.
        config: PathBuf,
        /// The routes and policies.
        routes: Vec<PathBuf>,
        /// The last good configuration.
        file: config::LocalConfig,
        /// The last good routes.
        route_text: Vec<routes::Source>,
    },
    /// Follows the API.
    Kubernetes {
        /// Registry snapshots.
        registry: watch::Receiver<SharedRegistry>,
        /// Route objects.
        routes: watch::Receiver<Vec<routes::Source>>,
        /// Route status.
        status: StatusWriter,
    },
}

/// Reads the first inputs. In Kubernetes mode, waits (up to
/// [`OWN_POD_WAIT`]) until the registry has the pod `pod` of the waypoint
/// `waypoint`, which the caller needs for its identity.
pub async fn start(
    settings: &SourceSettings,
    waypoint: &ObjectRef,
    pod: &str,
    home: &Arc<std::fs::File>,
    stop: &CancellationToken,
) -> anyhow::Result<Started> {
    match settings {
        SourceSettings::File { config: path, routes: routes_path } => {
            let file = config::load(path)?;
            let route_text = routes::read(routes_path)?;
            Ok(Started {
                registry: Arc::new(Registry::from_config(&file)),
                routes: route_text.clone(),
                trust_domain: file.trust_domain.clone(),
                updates: Updates::File { config: path.clone(), routes: routes_path.clone(), file, route_text },
            })
        }
        SourceSettings::Kubernetes { trust_domain, node } => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster service account, or KUBECONFIG)")?;
            let kube_settings = KubeSettings {
                role: Role::Waypoint,
                node: node.clone(),
                trust_domain: trust_domain.clone(),
                root_namespace: String::new(),
                netns_dirs: Vec::new(),
            };
            let (source, published) = KubeSource::start(client.clone(), kube_settings, home.clone(), stop).await?;
            tokio::spawn(source.run(stop.clone()));
            let mut registry = published.registry;
            let me = ObjectRef { namespace: waypoint.namespace.clone(), name: pod.to_owned() };
            let found = tokio::time::timeout(OWN_POD_WAIT, registry.wait_for(|r| r.workload(&me).is_some()))
                .await
                .is_ok_and(|r| r.is_ok());
            if !found {
                anyhow::bail!(
                    "pod {me} (this waypoint's, from POD_NAME) did not appear with an IP in the Kubernetes API \
                     within {}s",
                    OWN_POD_WAIT.as_secs()
                );
            }
            let first = registry.borrow_and_update().clone();
            let route_watch = RouteWatch::start(client, stop).await?;
            let first_routes = route_watch.sources();
            let status = route_watch.status_writer();
            let (routes_tx, routes_rx) = watch::channel(first_routes.clone());
            tokio::spawn(route_watch.run(routes_tx, stop.clone()));
            Ok(Started {
                registry: first,
                routes: first_routes,
                trust_domain: trust_domain.clone(),
                updates: Updates::Kubernetes { registry, routes: routes_rx, status },
            })
        }
    }
}

impl Updates {
    /// Writes the status of the first routes (Kubernetes mode).
    pub async fn initial_status(&self, set: &routes::RouteSet, registry: &Registry, waypoint: &ObjectRef) {
        if let Self::Kubernetes { status, .. } = self {
            status.write(set, registry, waypoint).await;
        }
    }

    /// Applies changes until `stop`; `last_good` holds what the first
    /// build accepted.
    pub async fn run(
        self,
        registry_tx: watch::Sender<SharedRegistry>,
        routes_tx: watch::Sender<Arc<routes::RouteSet>>,
        state: Arc<State>,
        mut last_good: LastGood,
        stop: CancellationToken,
    ) {
        let mut out =
            Outputs { registry_tx: &registry_tx, routes_tx: &routes_tx, state: &state, last_good: &mut last_good };
        match self {
            Self::File { config, routes, file, route_text } => {
                follow_files(&config, &routes, file, route_text, &mut out, &stop).await;
            }
            Self::Kubernetes { registry, routes, status } => {
                follow_api(registry, routes, &status, &mut out, &stop).await;
            }
        }
    }
}

/// Where a rebuild goes, and what it remembers.
struct Outputs<'a> {
    registry_tx: &'a watch::Sender<SharedRegistry>,
    routes_tx: &'a watch::Sender<Arc<routes::RouteSet>>,
    state: &'a State,
    last_good: &'a mut LastGood,
}

/// Compiles and publishes a new registry and routes.
fn apply(registry: SharedRegistry, sources: &[routes::Source], out: &mut Outputs<'_>) -> Arc<routes::RouteSet> {
    let state = out.state;
    let set = out.last_good.build(sources, &registry, &state.waypoint, &state.root_namespace);
    for r in set.rejected() {
        tracing::warn!(route = %r.0, problem = %r.1, "route not (fully) accepted");
    }
    // Endpoints that left the registry lose their pooled connections.
    let live: HashSet<IpAddr> = registry.workloads().flat_map(|w| w.ips.iter().copied()).collect();
    state.upstreams.retain(&|a| live.contains(&a.ip()));
    out.registry_tx.send_replace(registry);
    let set = Arc::new(set);
    out.routes_tx.send_replace(set.clone());
    set
}

async fn follow_files(
    config_path: &std::path::Path,
    routes_path: &[PathBuf],
    mut file: config::LocalConfig,
    mut route_text: Vec<routes::Source>,
    out: &mut Outputs<'_>,
    stop: &CancellationToken,
) {
    let mut last_error = String::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(RELOAD_POLL) => {}
        }
        let loaded = config::load(config_path)
            .map_err(|e| e.to_string())
            .and_then(|f| Ok((f, routes::read(routes_path).map_err(|e| e.to_string())?)));
        let (new_file, new_routes) = match loaded {
            Ok(x) => x,
            Err(e) => {
                if e != last_error {
                    tracing::error!(error = %e, "keeping the last good configuration and routes");
                    last_error = e;
                }
                continue;
            }
        };
        last_error.clear();
        if new_file == file && new_routes == route_text {
            continue;
        }
        apply(Arc::new(Registry::from_config(&new_file)), &new_routes, out);
        tracing::info!("configuration or routes changed: applied");
        file = new_file;
        route_text = new_routes;
    }
}

async fn follow_api(
    mut registry: watch::Receiver<SharedRegistry>,
    mut routes: watch::Receiver<Vec<routes::Source>>,
    status: &StatusWriter,
    out: &mut Outputs<'_>,
    stop: &CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            r = registry.changed() => if r.is_err() { return },
            r = routes.changed() => if r.is_err() { return },
        }
        let reg = registry.borrow_and_update().clone();
        let sources = routes.borrow_and_update().clone();
        let set = apply(reg.clone(), &sources, out);
        tracing::info!(routes = sources.len(), "registry or routes changed in the Kubernetes API: applied");
        status.write(&set, &reg, &out.state.waypoint).await;
    }
}
