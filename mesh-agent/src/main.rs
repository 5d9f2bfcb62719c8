//! `mesh-agent`: the Heddle node agent.
//!
//! `mesh-agent run` runs the agent; `mesh-agent check-config FILE` validates a
//! local configuration file and exits.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use mesh_agent::{agent, config};
use mesh_common::{PORT_ADMIN, PORT_METRICS};

#[derive(Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "Heddle node agent: eBPF capture and forwarding of enrolled pods' TCP traffic"
)]
struct Cli {
    /// Log format.
    #[arg(long, env = "HEDDLE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start; boxing buys nothing
enum Command {
    /// Run the agent (needs root: BPF, cgroups, network namespaces).
    Run(RunArgs),
    /// Run the mesh CA (signs workload certificates for node agents).
    Ca(CaArgs),
    /// Run a waypoint: the L7 proxy (HTTP/1.1, HTTP/2, gRPC) for the
    /// services that opt into it, in its own pod.
    Waypoint(WaypointArgs),
    /// Run the waypoint controller (Kubernetes): a Deployment, Service and
    /// `ServiceAccount` for every Gateway of class heddle-waypoint.
    Controller(ControllerArgs),
    /// Probe this container's agent through its state file (`--state-file`
    /// of `run`): exit 0 if it is alive (`live`) or serving (`ready`).
    Probe {
        /// What to check.
        #[arg(value_parser = ["live", "ready"])]
        what: String,
        /// The agent's state file.
        #[arg(long, env = "HEDDLE_STATE_FILE")]
        state_file: PathBuf,
    },
    /// Validate a local configuration file and print what is wrong.
    CheckConfig {
        /// The file.
        file: PathBuf,
    },
    /// Print a CRD of Heddle's heddle.dev/v1alpha1 resources (YAML).
    Crd {
        /// Which: authorizationpolicies, httplocalratelimitpolicies or retrybudgetpolicies.
        #[arg(
            default_value = "authorizationpolicies",
            value_parser = ["authorizationpolicies", "httplocalratelimitpolicies", "retrybudgetpolicies"]
        )]
        plural: String,
    },
}

#[derive(clap::Args)]
#[allow(clippy::struct_excessive_bools)] // independent process flags
struct RunArgs {
    /// The local configuration file (workloads, services). Required unless
    /// --kubernetes.
    #[arg(long, env = "HEDDLE_CONFIG", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    config: Option<PathBuf>,
    /// Read workloads, services and policies from the Kubernetes API
    /// (in-cluster service account, or KUBECONFIG) instead of --config.
    #[arg(long, env = "HEDDLE_KUBERNETES")]
    kubernetes: bool,
    /// Trust domain of the mesh's SPIFFE IDs (Kubernetes mode; the local
    /// file has its own `trustDomain`).
    #[arg(long, env = "HEDDLE_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Kubernetes mode: find pod network namespaces only among the named
    /// namespaces in this directory (repeatable; trusted, no pod-UID check),
    /// instead of scanning /proc/*/ns/net.
    #[arg(long, env = "HEDDLE_NETNS_DIR", value_delimiter = ',')]
    netns_dir: Vec<PathBuf>,
    /// This node's name [default: `node` from the configuration file].
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// Cgroup v2 directory to attach the `connect4` and `sock_ops` programs to
    /// [default: the node's cgroup v2 root].
    #[arg(long, env = "HEDDLE_CGROUP")]
    cgroup: Option<PathBuf>,
    /// bpffs directory for pinned links [default: /sys/fs/bpf/heddle/NODE].
    #[arg(long, env = "HEDDLE_PIN_DIR")]
    pin_dir: Option<PathBuf>,
    /// Admin API address (keep it on localhost).
    #[arg(long, env = "HEDDLE_ADMIN_ADDR", default_value_t = SocketAddr::from(([127, 0, 0, 1], PORT_ADMIN)))]
    admin_addr: SocketAddr,
    /// Prometheus metrics address (`/metrics` and `/healthz`).
    #[arg(long, env = "HEDDLE_METRICS_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], PORT_METRICS)))]
    metrics_addr: SocketAddr,
    /// Flow records kept in memory.
    #[arg(long, env = "HEDDLE_FLOW_CAPACITY", default_value_t = 16_384)]
    flow_capacity: usize,
    /// Write a JSON access log line per ended connection (its flow record)
    /// to `stdout` or to this file (appended). Off by default.
    #[arg(long, env = "HEDDLE_ACCESS_LOG", value_name = "stdout|PATH")]
    access_log: Option<mesh_agent::access_log::AccessLogTarget>,
    /// Seconds to let open connections finish at shutdown.
    #[arg(long, env = "HEDDLE_DRAIN_SECONDS", default_value_t = 5)]
    drain_seconds: u64,
    /// On SIGTERM/SIGINT, stop accepting and drain but leave enrolled pods
    /// in the datapath and the programs attached and pinned, so those pods
    /// fail closed (no plaintext, no policy bypass) until the next agent
    /// takes over, e.g. during a rollout of the agents. When no pod is enrolled
    /// at exit everything is detached as without the flag (uninstall).
    #[arg(long, env = "HEDDLE_KEEP_ATTACHED_ON_EXIT")]
    keep_attached_on_exit: bool,
    /// Unix socket of the zero-downtime upgrade: a starting agent takes the
    /// running agent's listeners over it, and then serves it for the next
    /// one [default: /run/heddle/NODE/handover.sock].
    #[arg(long, env = "HEDDLE_HANDOVER_SOCKET")]
    handover_socket: Option<PathBuf>,
    /// Seconds an agent that handed over keeps serving its open connections
    /// before ending them cleanly.
    #[arg(long, env = "HEDDLE_HANDOVER_DRAIN_SECONDS", default_value_t = 30)]
    handover_drain_seconds: u64,
    /// Keep this process-local health file current, for `mesh-agent probe`
    /// (the `DaemonSet`'s probes: HTTP probes cannot tell an upgrading pair of
    /// agents apart, they share the listeners).
    #[arg(long, env = "HEDDLE_STATE_FILE")]
    state_file: Option<PathBuf>,
    /// Tokio worker threads.
    #[arg(long, env = "HEDDLE_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
    /// Address of the mesh CA, `host:port` (resolved at every connection,
    /// e.g. heddle-ca.heddle-system.svc:15012). Without it the agent forwards
    /// mesh traffic in plaintext (development only).
    #[arg(long, env = "HEDDLE_CA_ADDR", requires_all = ["ca_token_file", "trust_bundle"])]
    ca_addr: Option<String>,
    /// File holding this node's CA token.
    #[arg(long, env = "HEDDLE_CA_TOKEN_FILE")]
    ca_token_file: Option<PathBuf>,
    /// PEM file of the trusted mesh roots (re-read every 10 s; a changed,
    /// valid bundle applies to new handshakes).
    #[arg(long, env = "HEDDLE_TRUST_BUNDLE")]
    trust_bundle: Option<PathBuf>,
    /// Wait for the trust bundle file to appear instead of failing (it is
    /// published by the CA and mounted by the kubelet).
    #[arg(long, env = "HEDDLE_WAIT_FOR_TRUST_BUNDLE")]
    wait_for_trust_bundle: bool,
    /// Authorization policies: a multi-document YAML file or a directory of
    /// them, reloaded like the configuration. Without it no policy applies.
    #[arg(long, env = "HEDDLE_POLICIES")]
    policies: Option<PathBuf>,
    /// The namespace whose policies apply to every workload.
    #[arg(long, env = "HEDDLE_ROOT_NAMESPACE", default_value = mesh_agent::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// A span per connection (sampled as `--trace-sampling` says), exported
    /// to `--otlp-endpoint`: tracing for L4-only traffic. Off by default.
    #[arg(long, env = "HEDDLE_TRACE_L4", requires = "otlp_endpoint")]
    trace_l4: bool,
    #[command(flatten)]
    trace: mesh_agent::trace::TraceArgs,
}

#[derive(clap::Args)]
struct CaArgs {
    /// Kubernetes mode: authenticate agents by token review, authorize from
    /// the pods on their node, keep the root in secret heddle-ca-root and
    /// publish the trust bundle in config map heddle-trust-bundle.
    #[arg(long, env = "HEDDLE_KUBERNETES")]
    kubernetes: bool,
    /// The CA's namespace (Kubernetes mode).
    #[arg(long, env = "POD_NAMESPACE", default_value = "heddle-system")]
    namespace: String,
    /// Trust domain [default: the configuration's; cluster.local in Kubernetes mode].
    #[arg(long, env = "HEDDLE_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    /// The node agents' service account (Kubernetes mode).
    #[arg(long, env = "HEDDLE_AGENT_SERVICE_ACCOUNT", default_value = "heddle-agent")]
    agent_service_account: String,
    /// The local configuration (which workloads run on which node); local mode.
    #[arg(long, env = "HEDDLE_CONFIG", required_unless_present = "kubernetes")]
    config: Option<PathBuf>,
    /// Directory for the root key and certificate, trust bundle and node tokens.
    #[arg(long, env = "HEDDLE_CA_STATE_DIR", default_value = "/var/lib/heddle/ca")]
    state_dir: PathBuf,
    /// TLS listen address.
    #[arg(long, env = "HEDDLE_CA_LISTEN", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Lifetime of workload certificates, in seconds.
    #[arg(long, env = "HEDDLE_CERT_TTL_SECONDS", default_value_t = 86_400)]
    ttl_seconds: u64,
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// The image waypoint Deployments run (this controller's own).
    #[arg(long, env = "HEDDLE_IMAGE", default_value = "ghcr.io/heddle-mesh/heddle:0.1.0")]
    image: String,
    /// Trust domain of the mesh's SPIFFE IDs.
    #[arg(long, env = "HEDDLE_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The mesh CA's address, `host:port`, for the waypoints.
    #[arg(long, env = "HEDDLE_CA_ADDR", default_value = "heddle-ca.heddle-system.svc:15012")]
    ca_addr: String,
    /// The namespace where the CA publishes the trust bundle `ConfigMap`.
    #[arg(long, env = "POD_NAMESPACE", default_value = "heddle-system")]
    ca_namespace: String,
    /// Trace settings passed on to every waypoint the controller deploys.
    #[command(flatten)]
    trace: mesh_agent::trace::TraceArgs,
}

fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    use mesh_agent::k8s::{waypoint_controller, waypoint_objects::MeshSettings};
    let settings = waypoint_controller::ControllerSettings {
        mesh: MeshSettings {
            image: args.image,
            trust_domain: args.trust_domain,
            ca_addr: args.ca_addr,
            trace_env: {
                args.trace.settings()?;
                args.trace.to_env()
            },
        },
        ca_namespace: args.ca_namespace,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::select! {
            r = waypoint_controller::run(client, settings, stop.clone()) => r?,
            r = agent::wait_for_shutdown() => {
                stop.cancel();
                r?;
            }
        }
        anyhow::Ok(())
    })
}

#[derive(clap::Args)]
struct WaypointArgs {
    /// The local configuration file (workloads, services, waypoints).
    #[arg(long, env = "HEDDLE_CONFIG", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    config: Option<PathBuf>,
    /// Read workloads, services, Gateways and routes from the Kubernetes
    /// API (in-cluster service account, or KUBECONFIG), and write route status.
    #[arg(long, env = "HEDDLE_KUBERNETES")]
    kubernetes: bool,
    /// Trust domain of the mesh's SPIFFE IDs (Kubernetes mode).
    #[arg(long, env = "HEDDLE_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The node this waypoint's pod runs on (Kubernetes mode).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node: String,
    /// Routes: a multi-document YAML file or a directory of `HTTPRoute` and
    /// `GRPCRoute` objects, re-read every second.
    #[arg(long, env = "HEDDLE_ROUTES", conflicts_with = "kubernetes")]
    routes: Option<PathBuf>,
    /// The waypoint this process runs, `namespace/name`.
    #[arg(long, env = "HEDDLE_WAYPOINT")]
    waypoint: String,
    /// The pod (workload name, in the waypoint's namespace) this process runs in.
    #[arg(long, env = "POD_NAME")]
    pod: String,
    /// Address of the mesh CA, `host:port`.
    #[arg(long, env = "HEDDLE_CA_ADDR")]
    ca_addr: String,
    /// File holding this node's CA token.
    #[arg(long, env = "HEDDLE_CA_TOKEN_FILE")]
    ca_token_file: PathBuf,
    /// PEM file of the trusted mesh roots (re-read every 10 s).
    #[arg(long, env = "HEDDLE_TRUST_BUNDLE")]
    trust_bundle: PathBuf,
    /// HBONE listen address (inside the waypoint's pod).
    #[arg(long, env = "HEDDLE_WAYPOINT_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], mesh_common::PORT_TUNNEL)))]
    listen: SocketAddr,
    /// Admin API address (keep it on localhost).
    #[arg(long, env = "HEDDLE_ADMIN_ADDR", default_value_t = SocketAddr::from(([127, 0, 0, 1], PORT_ADMIN)))]
    admin_addr: SocketAddr,
    /// Prometheus metrics address.
    #[arg(long, env = "HEDDLE_METRICS_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], PORT_METRICS)))]
    metrics_addr: SocketAddr,
    /// Flow (request) records kept in memory.
    #[arg(long, env = "HEDDLE_FLOW_CAPACITY", default_value_t = 16_384)]
    flow_capacity: usize,
    /// Tokio worker threads.
    #[arg(long, env = "HEDDLE_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
    /// Namespace whose policies may attach to every waypoint (`GatewayClass`
    /// `heddle-waypoint`).
    #[arg(long, env = "HEDDLE_ROOT_NAMESPACE", default_value = mesh_agent::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Authorization policies (`AuthorizationPolicy` with `targetRefs`,
    /// `RequestAuthentication`): a YAML file or directory, re-read every
    /// second like --routes (the node agents' --policies directory can be
    /// given as is: policies without targetRefs are theirs and skipped).
    #[arg(long, env = "HEDDLE_WAYPOINT_POLICIES", conflicts_with = "kubernetes")]
    policies: Option<PathBuf>,
    #[command(flatten)]
    trace: mesh_agent::trace::TraceArgs,
}

fn waypoint(args: WaypointArgs) -> anyhow::Result<()> {
    let (namespace, name) = args.waypoint.split_once('/').context("--waypoint must be namespace/name")?;
    let settings = mesh_agent::waypoint::Settings {
        source: match args.config {
            Some(config) => mesh_agent::waypoint::sources::SourceSettings::File {
                config,
                routes: args.routes.into_iter().chain(args.policies).collect(),
            },
            None => mesh_agent::waypoint::sources::SourceSettings::Kubernetes {
                trust_domain: args.trust_domain,
                node: args.node,
            },
        },
        waypoint: mesh_agent::registry::ObjectRef { namespace: namespace.to_owned(), name: name.to_owned() },
        pod: args.pod,
        ca: agent::CaClientSettings {
            addr: args.ca_addr,
            token_file: args.ca_token_file,
            trust_bundle: args.trust_bundle,
            wait_for_trust_bundle: false,
        },
        listen: args.listen,
        admin_addr: args.admin_addr,
        metrics_addr: args.metrics_addr,
        flow_capacity: args.flow_capacity,
        root_namespace: args.root_namespace,
        trace: args.trace.settings()?,
    };
    agent::raise_fd_limit();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .thread_name("heddle-waypoint")
        .enable_all()
        .build()?
        .block_on(mesh_agent::waypoint::run(settings))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Crd { plural } => {
            let yaml = match plural.as_str() {
                "httplocalratelimitpolicies" => mesh_agent::waypoint::routes::rate_limits::crd_yaml()?,
                "retrybudgetpolicies" => mesh_agent::waypoint::routes::retry_budgets::crd_yaml()?,
                _ => mesh_agent::k8s::crd::crd_yaml()?,
            };
            print!("{yaml}");
            Ok(())
        }
        Command::Probe { what, state_file } => {
            use mesh_agent::state_file::{probe, Probe};
            let which = if what == "ready" { Probe::Ready } else { Probe::Live };
            match probe(&state_file, which) {
                Ok(seen) => {
                    println!("{what}: {seen}");
                    Ok(())
                }
                Err(why) => anyhow::bail!("{what}: {why}"),
            }
        }
        Command::CheckConfig { file } => {
            let cfg = config::load(&file)?;
            println!("{}: ok ({} workloads, {} services)", file.display(), cfg.workloads.len(), cfg.services.len());
            Ok(())
        }
        Command::Run(args) => run(args),
        Command::Ca(args) => ca(args),
        Command::Waypoint(args) => waypoint(args),
        Command::Controller(args) => controller(args),
    }
}

fn ca(args: CaArgs) -> anyhow::Result<()> {
    use mesh_agent::{identity::ca_server, k8s::ca_root};
    let leaf_ttl = Duration::from_secs(args.ttl_seconds.max(2));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    if args.kubernetes {
        let settings = ca_root::KubeCaSettings {
            namespace: args.namespace,
            trust_domain: args.trust_domain.unwrap_or_else(|| "cluster.local".into()),
            leaf_ttl,
            agent_service_account: args.agent_service_account,
        };
        return runtime.block_on(async {
            let client = kube::Client::try_default()
                .await
                .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
            let server = ca_root::kubernetes_ca(client, &settings).await?;
            ca_server::run(server, args.listen).await
        });
    }
    let config = args.config.context("--config is required without --kubernetes")?;
    let trust_domain = match args.trust_domain {
        Some(td) => td,
        None => config::load(&config)?.trust_domain,
    };
    let settings = ca_server::CaSettings { state_dir: args.state_dir, config, trust_domain, leaf_ttl };
    runtime.block_on(async { ca_server::run(ca_server::CaServer::new(&settings)?, args.listen).await })
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let (source, file_node) = if let Some(path) = args.config {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let file_node = config::parse(&path, &text)?.node;
        let source = agent::SourceSettings::Local { config: path, policies: args.policies };
        (source, file_node)
    } else {
        anyhow::ensure!(
            args.policies.is_none(),
            "--policies is for the local configuration; in Kubernetes mode policies are AuthorizationPolicy objects"
        );
        let source = agent::SourceSettings::Kubernetes { trust_domain: args.trust_domain, netns_dirs: args.netns_dir };
        (source, None)
    };
    let node = args
        .node
        .or(file_node)
        .context("no node name: pass --node (or NODE_NAME), or set `node:` in the configuration file")?;
    let settings = agent::Settings {
        pin_dir: args.pin_dir.unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/heddle").join(&node)),
        handover_socket: args
            .handover_socket
            .unwrap_or_else(|| PathBuf::from("/run/heddle").join(&node).join("handover.sock")),
        handover_drain: Duration::from_secs(args.handover_drain_seconds),
        state_file: args.state_file,
        node,
        source,
        cgroup: args.cgroup.unwrap_or_else(agent::default_cgroup_root),
        admin_addr: args.admin_addr,
        metrics_addr: args.metrics_addr,
        flow_capacity: args.flow_capacity,
        access_log: args.access_log,
        drain_timeout: Duration::from_secs(args.drain_seconds),
        keep_attached_on_exit: args.keep_attached_on_exit,
        ca: match (args.ca_addr, args.ca_token_file, args.trust_bundle) {
            (Some(addr), Some(token_file), Some(trust_bundle)) => Some(agent::CaClientSettings {
                addr,
                token_file,
                trust_bundle,
                wait_for_trust_bundle: args.wait_for_trust_bundle || args.kubernetes,
            }),
            _ => None,
        },
        root_namespace: args.root_namespace,
        trace_l4: if args.trace_l4 { args.trace.settings()? } else { None },
    };
    agent::raise_fd_limit();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .thread_name("heddle-worker")
        .enable_all()
        .build()?
        .block_on(agent::run(settings))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HEDDLE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: log files and `kubectl logs` get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
