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
    /// Validate a local configuration file and print what is wrong.
    CheckConfig {
        /// The file.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The local configuration file (workloads, services).
    #[arg(long, env = "HEDDLE_CONFIG")]
    config: PathBuf,
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
    /// Seconds to let open connections finish at shutdown.
    #[arg(long, env = "HEDDLE_DRAIN_SECONDS", default_value_t = 5)]
    drain_seconds: u64,
    /// Tokio worker threads.
    #[arg(long, env = "HEDDLE_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
    /// Address of the mesh CA. Without it the agent forwards mesh traffic in
    /// plaintext (development only).
    #[arg(long, env = "HEDDLE_CA_ADDR", requires_all = ["ca_token_file", "trust_bundle"])]
    ca_addr: Option<SocketAddr>,
    /// File holding this node's CA token.
    #[arg(long, env = "HEDDLE_CA_TOKEN_FILE")]
    ca_token_file: Option<PathBuf>,
    /// PEM file of the trusted mesh roots.
    #[arg(long, env = "HEDDLE_TRUST_BUNDLE")]
    trust_bundle: Option<PathBuf>,
    /// Authorization policies: a multi-document YAML file or a directory of
    /// them, reloaded like the configuration. Without it no policy applies.
    #[arg(long, env = "HEDDLE_POLICIES")]
    policies: Option<PathBuf>,
    /// The namespace whose policies apply to every workload.
    #[arg(long, env = "HEDDLE_ROOT_NAMESPACE", default_value = mesh_agent::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
}

#[derive(clap::Args)]
struct CaArgs {
    /// The local configuration (which workloads run on which node).
    #[arg(long, env = "HEDDLE_CONFIG")]
    config: PathBuf,
    /// Directory for the root key and certificate, trust bundle and node tokens.
    #[arg(
        long,
        env = "HEDDLE_CA_STATE_DIR",
        default_value = "/var/lib/heddle/ca"
    )]
    state_dir: PathBuf,
    /// TLS listen address.
    #[arg(long, env = "HEDDLE_CA_LISTEN", default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Lifetime of workload certificates, in seconds.
    #[arg(long, env = "HEDDLE_CERT_TTL_SECONDS", default_value_t = 86_400)]
    ttl_seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => {
            let cfg = config::load(&file)?;
            println!(
                "{}: ok ({} workloads, {} services)",
                file.display(),
                cfg.workloads.len(),
                cfg.services.len()
            );
            Ok(())
        }
        Command::Run(args) => run(args),
        Command::Ca(args) => {
            let trust_domain = config::load(&args.config)?.trust_domain;
            let settings = mesh_agent::identity::ca_server::CaSettings {
                state_dir: args.state_dir,
                listen: args.listen,
                config: args.config,
                trust_domain,
                leaf_ttl: Duration::from_secs(args.ttl_seconds.max(2)),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?
                .block_on(mesh_agent::identity::ca_server::run(settings))
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let file_node = config::parse(&args.config, &text)?.node;
    let node = args.node.or(file_node).context(
        "no node name: pass --node (or NODE_NAME), or set `node:` in the configuration file",
    )?;
    let settings = agent::Settings {
        pin_dir: args
            .pin_dir
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/heddle").join(&node)),
        node,
        config: args.config,
        cgroup: args.cgroup.unwrap_or_else(agent::default_cgroup_root),
        admin_addr: args.admin_addr,
        metrics_addr: args.metrics_addr,
        flow_capacity: args.flow_capacity,
        drain_timeout: Duration::from_secs(args.drain_seconds),
        ca: match (args.ca_addr, args.ca_token_file, args.trust_bundle) {
            (Some(addr), Some(token_file), Some(trust_bundle)) => Some(agent::CaClientSettings {
                addr,
                token_file,
                trust_bundle,
            }),
            _ => None,
        },
        policies: args.policies,
        root_namespace: args.root_namespace,
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
