//! The composition root of `mesh-agent run`: loads the configuration and the
//! authorization policies, starts the datapath, enrolls pods, serves the
//! admin API and the Prometheus metrics, watches the configuration and policy files, and shuts down in
//! order on SIGTERM/SIGINT.
//!
//! Tasks (all on the tokio runtime): the admin server, the metrics server,
//! the watcher (config
//! and policies), the policy re-evaluation task ([`Authorizer::run`]), the
//! accept loops of each enrolled pod, one task per proxied connection, and
//! the eBPF log reader.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, AdminState},
    authz::{source::PolicySource, Authorizer},
    capture::Capture,
    config,
    datapath::Datapath,
    flows::FlowLog,
    identity::{ca_client::RemoteCa, certs::CertManager, tls},
    metrics::{
        scrape::{self, Exporter, Sources},
        ConnMetrics,
    },
    netns::Netns,
    proxy::{hbone::Mesh, ProxyContext},
    registry::{Registry, SharedRegistry},
};

/// How often the configuration file is re-read and enrollment retried.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Settings of a running agent (process flags, resolved).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// The local configuration file.
    pub config: PathBuf,
    /// This node's name.
    pub node: String,
    /// Cgroup v2 directory the cgroup programs attach to.
    pub cgroup: PathBuf,
    /// Directory on bpffs for pinned links.
    pub pin_dir: PathBuf,
    /// Admin API address.
    pub admin_addr: SocketAddr,
    /// Prometheus metrics address (`/metrics`, `/healthz`).
    pub metrics_addr: SocketAddr,
    /// Flow records kept.
    pub flow_capacity: usize,
    /// How long shutdown waits for open connections.
    #[serde(with = "secs")]
    pub drain_timeout: Duration,
    /// The mesh CA; `None` runs without mTLS (plaintext forwarding).
    pub ca: Option<CaClientSettings>,
    /// Authorization policies (a file or a directory); `None`: no policies.
    pub policies: Option<PathBuf>,
    /// The namespace whose policies apply mesh-wide.
    pub root_namespace: String,
}

/// How the agent reaches the mesh CA.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaClientSettings {
    /// CA address.
    pub addr: SocketAddr,
    /// File holding this node's token.
    pub token_file: PathBuf,
    /// PEM bundle of trusted roots.
    pub trust_bundle: PathBuf,
}

fn build_mesh(ca: &CaClientSettings, trust_domain: &str) -> anyhow::Result<Arc<Mesh>> {
    let bundle = std::fs::read_to_string(&ca.trust_bundle)
        .with_context(|| format!("reading the trust bundle {}", ca.trust_bundle.display()))?;
    let roots = tls::roots_from_pem(&bundle)
        .with_context(|| format!("trust bundle {}", ca.trust_bundle.display()))?;
    let token = std::fs::read_to_string(&ca.token_file)
        .with_context(|| format!("reading the node token {}", ca.token_file.display()))?
        .trim()
        .to_owned();
    let remote = RemoteCa::new(ca.addr, token, roots.clone(), trust_domain)?;
    Ok(Arc::new(Mesh::new(
        CertManager::new(Arc::new(remote)),
        roots,
    )))
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let initial_text = std::fs::read_to_string(&settings.config)
        .with_context(|| format!("reading {}", settings.config.display()))?;
    let initial = config::parse(&settings.config, &initial_text)?;
    let (registry_tx, registry_rx) =
        watch::channel::<SharedRegistry>(Arc::new(Registry::from_config(&initial)));
    let (policies, policies_rx) =
        PolicySource::open(settings.policies.as_deref(), &settings.root_namespace)
            .context("loading the authorization policies (--policies)")?;
    let authz = Arc::new(Authorizer::new(policies_rx, registry_rx.clone()));

    let home = Arc::new(Netns::current()?);
    let mesh = if let Some(ca) = &settings.ca {
        Some(build_mesh(ca, &initial.trust_domain)?)
    } else {
        tracing::warn!("no CA configured (--ca-addr): mesh traffic is forwarded in PLAINTEXT; use only for development");
        None
    };
    // Everything that can fail on bad input is done before the programs are
    // attached, so a start that fails leaves no pod redirected to nothing.
    let admin_listener = admin::bind(settings.admin_addr)
        .await
        .with_context(|| format!("binding the admin API on {}", settings.admin_addr))?;
    let datapath = Arc::new(
        Datapath::start(&settings.cgroup, &settings.pin_dir)
            .context("starting the eBPF datapath")?,
    );
    tracing::info!(cgroup = %settings.cgroup.display(), pins = %settings.pin_dir.display(), "eBPF programs attached");

    let prom = prometheus::Registry::new();
    let conn_metrics = Arc::new(ConnMetrics::new(&prom, registry_rx.clone())?);
    let flows = Arc::new(FlowLog::new(settings.flow_capacity).with_metrics(conn_metrics));
    let tracker = TaskTracker::new();
    let ctx = Arc::new(ProxyContext {
        datapath: datapath.clone(),
        flows: flows.clone(),
        registry: registry_rx.clone(),
        tracker: tracker.clone(),
        mesh: mesh.clone(),
        authz: authz.clone(),
    });
    let capture = Arc::new(Mutex::new(Capture::new(settings.node.clone(), home, ctx)));
    let stop = CancellationToken::new();

    let exporter = Arc::new(Exporter::new(
        prom,
        Sources {
            flows: flows.clone(),
            datapath: datapath.clone(),
            authz: authz.clone(),
            certs: mesh.as_ref().map(|m| m.certs.clone()),
        },
    )?);
    let metrics_listener = scrape::bind(settings.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {}", settings.metrics_addr))?;
    tokio::spawn(scrape::serve(metrics_listener, exporter, stop.clone()));

    let admin_state = Arc::new(AdminState {
        node: settings.node.clone(),
        ready: false.into(),
        flows,
        datapath: datapath.clone(),
        capture: capture.clone(),
        registry: registry_rx.clone(),
        effective_config: serde_json::to_value(&settings)?,
        config_error: Mutex::new(None),
        mesh,
        authz: authz.clone(),
        policy_status: policies.status(),
    });
    tokio::spawn(admin::serve(
        admin_listener,
        admin_state.clone(),
        stop.clone(),
    ));

    capture
        .lock()
        .expect("capture lock")
        .reconcile(&registry_rx.borrow());
    admin_state.ready.store(true, Ordering::Release);
    tracing::info!(node = %settings.node, admin = %settings.admin_addr, metrics = %settings.metrics_addr, "agent ready");

    let reevaluator = tokio::spawn(authz.run(stop.clone()));
    let watcher = tokio::spawn(
        Watcher {
            path: settings.config.clone(),
            last_good: initial_text,
            last_bad: None,
            registry_tx,
            policies,
            capture: capture.clone(),
            admin: admin_state.clone(),
        }
        .run(stop.clone()),
    );

    wait_for_shutdown().await?;
    tracing::info!("shutting down: un-enrolling pods, draining connections");
    admin_state.ready.store(false, Ordering::Release);
    stop.cancel();
    let _ = watcher.await;
    let _ = reevaluator.await;
    drain(&capture, &tracker, settings.drain_timeout).await;
    datapath.shutdown();
    tracing::info!("eBPF programs detached; bye");
    Ok(())
}

/// Un-enrolls every pod (no new connections are captured), then lets open
/// connections finish for up to `deadline`.
async fn drain(capture: &Mutex<Capture>, tracker: &TaskTracker, deadline: Duration) {
    capture.lock().expect("capture lock").shutdown();
    tracker.close();
    if tokio::time::timeout(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "drain deadline passed; closing remaining connections"
        );
    }
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

/// Re-reads the configuration file and the policy source on SIGHUP and
/// every [`POLL_INTERVAL`]. A valid configuration change is published and
/// applied; an invalid one is logged (once) and the last good state kept.
/// Policies: see [`PolicySource::reload`]. Every tick also retries pods that
/// failed to enroll.
struct Watcher {
    path: PathBuf,
    last_good: String,
    last_bad: Option<String>,
    registry_tx: watch::Sender<SharedRegistry>,
    policies: PolicySource,
    capture: Arc<Mutex<Capture>>,
    admin: Arc<AdminState>,
}

impl Watcher {
    async fn run(mut self, stop: CancellationToken) {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install the SIGHUP handler; relying on polling");
            return;
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = hup.recv() => tracing::info!(file = %self.path.display(), "SIGHUP: reloading configuration and policies"),
                () = tokio::time::sleep(POLL_INTERVAL) => {},
            }
            self.reload_config();
            self.policies.reload();
            let registry = self.registry_tx.borrow().clone();
            self.capture
                .lock()
                .expect("capture lock")
                .reconcile(&registry);
        }
    }

    fn reload_config(&mut self) {
        let path = &self.path;
        match std::fs::read_to_string(path) {
            Ok(text) if text != self.last_good && Some(&text) != self.last_bad.as_ref() => {
                match config::parse(path, &text) {
                    Ok(cfg) => {
                        tracing::info!(file = %path.display(), "configuration reloaded");
                        self.registry_tx
                            .send_replace(Arc::new(Registry::from_config(&cfg)));
                        *self.admin.config_error.lock().expect("lock") = None;
                        self.last_good = text;
                        self.last_bad = None;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "configuration rejected; keeping the last good one");
                        *self.admin.config_error.lock().expect("lock") = Some(e.to_string());
                        self.last_bad = Some(text);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                let msg = format!("cannot read {}: {e}", path.display());
                let mut error = self.admin.config_error.lock().expect("lock");
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
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } == 0
        && lim.rlim_cur < lim.rlim_max
    {
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
