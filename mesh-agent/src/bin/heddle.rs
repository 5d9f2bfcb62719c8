//! `heddle`: the Heddle command-line interface. It talks to a node agent's
//! admin API (default: this node's, `http://127.0.0.1:15000`), except for
//! `heddle policy`, which evaluates and validates authorization policies
//! offline, from files, with the agent's own engine ([`mesh_agent::policy`]).
//!
//! From outside the cluster, `--node NODE` reaches the agent on that node
//! through the API server's port-forward (`mesh_agent::k8s::cli_forward`),
//! and `heddle enroll|unenroll NAMESPACE` sets or removes the namespace's
//! enrollment label (`mesh_agent::k8s::cli_enroll`), both with the kubeconfig
//! found as kubectl finds it (`--context` to pick another context).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use mesh_agent::policy::{self, load, Connection, Destination, OrigDst, PeerIdentity, PolicySet, SrcIp};
use mesh_agent::{
    cli_agent::{self, s},
    k8s,
};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "heddle",
    version,
    about = "Inspect a Heddle node agent (captured flows, workloads, datapath status) and evaluate authorization policies offline"
)]
struct Cli {
    /// Admin API of the agent to query.
    #[arg(long, env = "HEDDLE_AGENT", default_value = "http://127.0.0.1:15000", global = true)]
    agent: String,
    /// Reach the agent on this Kubernetes node through the API server's
    /// port-forward (kubeconfig as kubectl finds it); wins over --agent.
    #[arg(long, global = true)]
    node: Option<String>,
    /// Kubeconfig context for --node, enroll and unenroll [default: the current one].
    #[arg(long, global = true)]
    context: Option<String>,
    /// Namespace of the agent pods, for --node.
    #[arg(long, env = "HEDDLE_AGENT_NAMESPACE", default_value = k8s::cli_forward::AGENT_NAMESPACE, global = true)]
    agent_namespace: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    /// One JSON object per line (flows).
    Jsonl,
    /// Graphviz DOT (graph): `heddle graph -o dot | dot -Tsvg > mesh.svg`.
    Dot,
}

/// Where `heddle stat` and `heddle graph` read flow records.
#[derive(clap::Args, Clone, Debug)]
struct Sources {
    /// Admin API of an agent or waypoint to gather from (repeat for each;
    /// default: --agent).
    #[arg(long = "from", value_name = "URL")]
    from: Vec<String>,
    /// Gather from the agents of these Kubernetes nodes too, through the
    /// API server's port-forward.
    #[arg(long, value_delimiter = ',', value_name = "NODE,...")]
    nodes: Vec<String>,
    /// Gather from every running waypoint pod too (pods labelled
    /// gateway.networking.k8s.io/gateway-name, any namespace), through the
    /// API server's port-forward.
    #[arg(long)]
    waypoints: bool,
    /// Records of this last stretch of time (e.g. 30s, 1m, 10m).
    #[arg(long, default_value = "1m", value_parser = mesh_agent::cli_flows::parse_duration)]
    window: Duration,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once, at start-up
enum Command {
    /// Show flows (connections the agent captured), like `hubble observe`.
    ///
    /// Examples:
    ///   heddle flows --namespace demo --verdict denied
    ///   heddle flows --from-identity ns/demo/sa/web --since 5m -o jsonl
    ///   heddle flows --pod api --follow
    Flows(mesh_agent::cli_flows::FlowsArgs),
    /// Golden signals over a window: success rate, requests/s, p50/p95/p99,
    /// TCP connections and bytes, per workload (`deploy`), Service (`svc`)
    /// or route, from the flow records of every --from agent and waypoint.
    ///
    /// Examples:
    ///   heddle stat svc -n demo --from `http://NODE:15000` --from `http://WAYPOINT:15000`
    ///   heddle stat deploy --window 5m
    ///   heddle stat svc --nodes node-a,node-b --waypoints   (Kubernetes)
    Stat {
        /// What to group by.
        #[arg(value_enum)]
        by: mesh_agent::cli_stat::GroupBy,
        /// Only destinations in this namespace.
        #[arg(short, long)]
        namespace: Option<String>,
        #[command(flatten)]
        sources: Sources,
    },
    /// The service dependency graph from recent flows: edges with request
    /// rate, error ratio, p99 and mTLS or plaintext (`-o dot` for Graphviz,
    /// `-o json`).
    Graph {
        #[command(flatten)]
        sources: Sources,
    },
    /// The busiest paths through a waypoint, live (like `linkerd viz top`):
    /// requests per (source, destination, method, path) over the last
    /// --window, from --agent's flow stream (point it at a waypoint).
    Top {
        /// Requests of this last stretch of time.
        #[arg(long, default_value = "1m", value_parser = mesh_agent::cli_flows::parse_duration)]
        window: Duration,
        /// Rows shown.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Stop after this long and print the table once (default: run
        /// until interrupted, redrawing every second on a terminal).
        #[arg(long, value_parser = mesh_agent::cli_flows::parse_duration)]
        duration: Option<Duration>,
    },
    /// Show a waypoint's routes: the `HTTPRoutes` and `GRPCRoutes` in force per
    /// Service, how often each rule matched, and the routes not accepted and
    /// why (point --agent at the waypoint's admin API).
    Routes,
    /// Show the workloads the agent knows and whether their traffic is captured.
    Workloads,
    /// Show agent health: workloads captured, mTLS and certificate expiry,
    /// policy errors, flows dropped, eBPF programs, maps and datapath counters.
    Status,
    /// Show the workload certificates the agent holds, and when they expire.
    Certs,
    /// Enroll a namespace: label it heddle.dev/mesh=enabled, so the agents
    /// capture its pods' new connections (through the Kubernetes API).
    Enroll {
        /// The namespace.
        namespace: String,
    },
    /// Remove a namespace's heddle.dev/mesh label: its pods' new connections
    /// no longer go through the mesh.
    Unenroll {
        /// The namespace.
        namespace: String,
    },
    /// Waypoints (Kubernetes): apply, delete or list the Gateways of class
    /// heddle-waypoint that the waypoint controller runs.
    #[command(subcommand)]
    Waypoint(WaypointCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Authorization policies, offline: evaluate a connection, validate files.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Subcommand)]
enum WaypointCommand {
    /// Create (or update) a waypoint for a namespace.
    ///
    /// Example: heddle waypoint apply -n shop --enroll-namespace
    Apply {
        /// The namespace.
        #[arg(short = 'n', long)]
        namespace: String,
        /// The waypoint's name.
        #[arg(long, default_value = "waypoint")]
        name: String,
        /// Also label the namespace heddle.dev/use-waypoint=NAME, so its
        /// services' traffic goes through the waypoint.
        #[arg(long)]
        enroll_namespace: bool,
    },
    /// Delete a waypoint (and the namespace's label naming it).
    Delete {
        /// The namespace.
        #[arg(short = 'n', long)]
        namespace: String,
        /// The waypoint's name.
        #[arg(long, default_value = "waypoint")]
        name: String,
    },
    /// List waypoints and whether they are programmed.
    List {
        /// Only this namespace.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
}

fn waypoint_command(context: Option<&str>, cmd: &WaypointCommand, output: Output) -> anyhow::Result<ExitCode> {
    use k8s::{cli_enroll::kube_client, cli_waypoint};
    runtime()?.block_on(async {
        let (client, url) = kube_client(context).await?;
        match cmd {
            WaypointCommand::Apply { namespace, name, enroll_namespace } => {
                cli_waypoint::apply(&client, &url, namespace, name, *enroll_namespace).await?;
                println!("waypoint {namespace}/{name} applied (Gateway of class heddle-waypoint)");
                if *enroll_namespace {
                    println!(
                        "namespace {namespace} labelled {}={name}: its services' traffic goes through the waypoint",
                        k8s::convert::USE_WAYPOINT_LABEL
                    );
                }
            }
            WaypointCommand::Delete { namespace, name } => {
                if cli_waypoint::delete(&client, &url, namespace, name).await? {
                    println!("waypoint {namespace}/{name} deleted");
                } else {
                    println!("no waypoint {namespace}/{name}");
                }
            }
            WaypointCommand::List { namespace } => {
                let listed = cli_waypoint::list(&client, &url, namespace.as_deref()).await?;
                if output == Output::Table {
                    println!("{:<20} {:<20} {:<11} MESSAGE", "NAMESPACE", "NAME", "PROGRAMMED");
                    for w in &listed {
                        println!("{:<20} {:<20} {:<11} {}", w.namespace, w.name, w.programmed, w.message);
                    }
                } else {
                    println!("{}", serde_json::to_string_pretty(&listed)?);
                }
            }
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once, at start-up
enum PolicyCommand {
    /// Decide one inbound connection against policy files, as the destination
    /// agent would: prints ALLOW or DENY, the deciding policy, rule and
    /// reason. Exit status: 0 allow, 1 deny, 2 invalid input.
    Eval(EvalArgs),
    /// List the policies the agent enforces, and the ones it rejected.
    List,
    /// Check policy files and report every problem in every file.
    /// Exit status: 0 if all are valid, 2 otherwise.
    Validate {
        /// Files or directories of (multi-document) YAML.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct EvalArgs {
    /// Policy file or directory (multi-document YAML); may be repeated.
    #[arg(short = 'f', long = "policies", required = true, num_args = 1..)]
    policies: Vec<PathBuf>,
    /// Namespace of the destination workload.
    #[arg(long)]
    dst_namespace: String,
    /// Labels of the destination workload: k=v,k2=v2.
    #[arg(long, value_parser = parse_labels, default_value = "")]
    dst_labels: Labels,
    /// Destination port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    dst_port: u16,
    /// Destination IP (needed only by `destination.ip` conditions).
    #[arg(long)]
    dst_ip: Option<IpAddr>,
    /// Authenticated peer identity, trust-domain/ns/NS/sa/SA; without it the
    /// peer is plaintext (unauthenticated).
    #[arg(long)]
    src_principal: Option<PeerIdentity>,
    /// Source IP (needed only by `ipBlocks` and `source.ip`).
    #[arg(long)]
    src_ip: Option<IpAddr>,
    /// Namespace whose policies apply mesh-wide.
    #[arg(long, env = "HEDDLE_ROOT_NAMESPACE", default_value = policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Evaluate with the valid policies even if some are invalid, as the
    /// agent does (the problems are still printed).
    #[arg(long)]
    skip_invalid: bool,
    /// A request through a waypoint instead of a connection: the Service
    /// it is for (in --dst-namespace). Any of the L7 flags below does the
    /// same; policies with targetRefs decide, as the waypoint would.
    #[arg(long, help_heading = "Requests at a waypoint")]
    service: Option<String>,
    /// The waypoint, NAMESPACE/NAME (default: --dst-namespace/waypoint).
    #[arg(long, help_heading = "Requests at a waypoint")]
    waypoint: Option<String>,
    /// HTTP method.
    #[arg(long, help_heading = "Requests at a waypoint")]
    method: Option<String>,
    /// Request path (normalised as the waypoint does; the query is ignored).
    #[arg(long, help_heading = "Requests at a waypoint")]
    path: Option<String>,
    /// Host (:authority).
    #[arg(long, help_heading = "Requests at a waypoint")]
    host: Option<String>,
    /// A request header, "name: value"; may be repeated.
    #[arg(long = "header", short = 'H', help_heading = "Requests at a waypoint")]
    headers: Vec<String>,
    /// The request principal of a verified JWT, ISSUER/SUBJECT.
    #[arg(long, help_heading = "Requests at a waypoint")]
    request_principal: Option<String>,
    /// A claim of the verified JWT, name=value; may be repeated (a repeated
    /// name makes a list).
    #[arg(long = "claim", help_heading = "Requests at a waypoint")]
    claims: Vec<String>,
}

impl EvalArgs {
    fn is_request(&self) -> bool {
        self.service.is_some()
            || self.waypoint.is_some()
            || self.method.is_some()
            || self.path.is_some()
            || self.host.is_some()
            || !self.headers.is_empty()
            || self.request_principal.is_some()
            || !self.claims.is_empty()
    }
}

/// Workload labels from `--dst-labels`.
#[derive(Clone, Debug, Default)]
struct Labels(BTreeMap<String, String>);

fn parse_labels(s: &str) -> Result<Labels, String> {
    let mut labels = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => labels.insert(k.trim().to_owned(), v.trim().to_owned()),
            _ => return Err(format!("{pair:?} is not key=value")),
        };
    }
    Ok(Labels(labels))
}

/// How the agent is reached when it is not at --agent (set once, for error
/// messages).
static VIA: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The port-forward to the agent and the runtime that drives it, kept alive
/// while the (blocking) HTTP client uses the local end.
struct Forwarding {
    _forward: k8s::cli_forward::AgentForward,
    _runtime: tokio::runtime::Runtime,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Starts forwarding to the agent on `node`; returns its local URL.
fn forward_to_node(cli: &Cli, node: &str) -> anyhow::Result<(String, Forwarding)> {
    let rt = runtime()?;
    let forward = rt.block_on(async {
        let (client, url) = k8s::cli_enroll::kube_client(cli.context.as_deref()).await?;
        anyhow::Ok(
            k8s::cli_forward::forward_to_agent(client, &url, &cli.agent_namespace, node, mesh_common::PORT_ADMIN)
                .await?,
        )
    })?;
    let _ = VIA.set(format!(
        "the agent on node {node} (pod {}/{}, through the API server's port-forward)",
        cli.agent_namespace,
        forward.pod()
    ));
    Ok((forward.local_url(), Forwarding { _forward: forward, _runtime: rt }))
}

/// Forwards to every running waypoint pod: their local URLs.
fn forward_to_waypoints(cli: &Cli) -> anyhow::Result<(Vec<String>, WaypointForwards)> {
    let rt = runtime()?;
    let forwards = rt.block_on(async {
        let (client, url) = k8s::cli_enroll::kube_client(cli.context.as_deref()).await?;
        let pods = k8s::cli_forward::waypoint_pods(client.clone(), &url).await?;
        let mut forwards = Vec::new();
        for (namespace, pod) in pods {
            let api = kube::Api::namespaced(client.clone(), &namespace);
            forwards.push(k8s::cli_forward::forward_to_pod(api, &url, &namespace, pod, mesh_common::PORT_ADMIN).await?);
        }
        anyhow::Ok(forwards)
    })?;
    let urls = forwards.iter().map(k8s::cli_forward::AgentForward::local_url).collect();
    Ok((urls, WaypointForwards { _forwards: forwards, _runtime: rt }))
}

/// Waypoint port-forwards and the runtime that drives them.
struct WaypointForwards {
    _forwards: Vec<k8s::cli_forward::AgentForward>,
    _runtime: tokio::runtime::Runtime,
}

fn enroll(context: Option<&str>, namespace: &str, enroll: bool) -> anyhow::Result<ExitCode> {
    use k8s::cli_enroll::{kube_client, set_enrollment, Outcome};
    let outcome = runtime()?.block_on(async {
        let (client, url) = kube_client(context).await?;
        set_enrollment(&client, &url, namespace, enroll).await
    })?;
    let label = format!("{}={}", k8s::cli_enroll::MESH_LABEL, k8s::cli_enroll::ENABLED);
    match (outcome, enroll) {
        (Outcome::Changed, true) => {
            println!("namespace {namespace} enrolled ({label}): new connections of its pods go through the mesh");
        }
        (Outcome::Unchanged, true) => println!("namespace {namespace} is already enrolled ({label})"),
        (Outcome::Changed, false) => {
            println!("namespace {namespace} unenrolled: new connections of its pods no longer go through the mesh");
        }
        (Outcome::Unchanged, false) => println!("namespace {namespace} is not enrolled"),
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> anyhow::Result<ExitCode> {
    let mut cli = Cli::parse();
    match &cli.command {
        Command::Enroll { namespace } => return enroll(cli.context.as_deref(), namespace, true),
        Command::Unenroll { namespace } => return enroll(cli.context.as_deref(), namespace, false),
        Command::Waypoint(cmd) => return waypoint_command(cli.context.as_deref(), cmd, cli.output),
        _ => {}
    }
    let needs_agent = !matches!(
        cli.command,
        Command::Completion { .. } | Command::Policy(PolicyCommand::Eval(_) | PolicyCommand::Validate { .. })
    );
    let _forwarding = match cli.node.clone() {
        Some(node) if needs_agent => {
            let (url, forwarding) = forward_to_node(&cli, &node)?;
            cli.agent = url;
            Some(forwarding)
        }
        _ => None,
    };
    match cli.command {
        Command::Enroll { .. } | Command::Unenroll { .. } | Command::Waypoint(_) => unreachable!("handled above"),
        Command::Policy(cmd) => return policy_command(cmd, &cli.agent, cli.output),
        Command::Flows(args) => flows(&cli.agent, cli.output, &args)?,
        Command::Stat { by, ref namespace, ref sources } => {
            let records = gather(&cli, sources)?;
            let rows = mesh_agent::cli_stat::stat(&records, by, namespace.as_deref(), sources.window);
            if cli.output == Output::Table {
                print!("{}", mesh_agent::cli_stat::stat_text(&rows, by));
            } else {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            }
        }
        Command::Top { window, limit, duration } => top(&cli.agent, cli.output, window, limit, duration)?,
        Command::Graph { ref sources } => {
            let g = mesh_agent::cli_stat::graph(&gather(&cli, sources)?, sources.window);
            match cli.output {
                Output::Dot => print!("{}", mesh_agent::cli_stat::graph_dot(&g)),
                Output::Json | Output::Jsonl => println!("{}", serde_json::to_string_pretty(&g)?),
                Output::Table => {
                    for e in &g.edges {
                        let err = e.error_ratio.map_or_else(|| "-".to_owned(), |r| format!("{:.1}%", r * 100.0));
                        let p99 = e.p99_ms.map_or_else(|| "-".to_owned(), |p| format!("{p:.1}ms"));
                        let sec = if e.mtls { "mTLS" } else { "plaintext" };
                        let subset = e.subset.as_ref().map_or_else(String::new, |s| format!(" ({s})"));
                        println!(
                            "{} -> {}{subset}  {:.1} rps  err {err}  p99 {p99}  {} conn  {sec}",
                            e.from, e.to, e.rps, e.connections
                        );
                    }
                }
            }
        }
        Command::Routes => {
            let r = get(&cli.agent, "/routes")?;
            if cli.output == Output::Table {
                print!("{}", mesh_agent::cli_routes::routes_text(&r));
            } else {
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
        }
        Command::Workloads => {
            let w = get(&cli.agent, "/workloads")?;
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&w)?);
            } else {
                print_workloads(&w);
            }
        }
        Command::Status => {
            let stats = get(&cli.agent, "/stats")?;
            let dp = get(&cli.agent, "/datapath")?;
            let certs = get(&cli.agent, "/certs")?;
            let policies = get(&cli.agent, "/policies")?;
            let workloads = get(&cli.agent, "/workloads")?;
            if cli.output == Output::Table {
                print!("{}", cli_agent::status_text(&stats, &dp, &certs, &policies, &workloads));
            } else {
                let all = serde_json::json!({"stats": stats, "datapath": dp, "certs": certs, "policies": policies});
                println!("{}", serde_json::to_string_pretty(&all)?);
            }
        }
        Command::Certs => {
            let certs = get(&cli.agent, "/certs")?;
            if cli.output == Output::Table {
                print!("{}", cli_agent::certs_text(&certs, cli_agent::now_unix()));
            } else {
                println!("{}", serde_json::to_string_pretty(&certs)?);
            }
        }
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "heddle",
                &mut std::io::stdout(),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `heddle top`: reads the flow stream on a thread, keeps the window's
/// requests, and draws the table every second (on a terminal) or once at
/// the end of `--duration`.
fn top(agent: &str, output: Output, window: Duration, limit: usize, duration: Option<Duration>) -> anyhow::Result<()> {
    use mesh_agent::cli_flows::{follow, FlowsArgs, StreamLine};
    use std::time::Instant;
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let args = FlowsArgs { since: Some(window), last: 100_000, ..FlowsArgs::default() };
    let agent_url = agent.to_owned();
    let (err_tx, err_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = follow(&agent_url, &args, |line| {
            if let StreamLine::Record(f) = line {
                let _ = tx.send(f);
            }
        });
        if let Err(e) = r {
            let _ = err_tx.send(e);
        }
    });
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let started = Instant::now();
    let mut kept: std::collections::VecDeque<(Instant, Value)> = std::collections::VecDeque::new();
    loop {
        let tick = Instant::now() + Duration::from_secs(1);
        while let Some(left) = tick.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(f) => kept.push_back((Instant::now(), f)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    if let Ok(e) = err_rx.try_recv() {
                        return Err(e.into());
                    }
                    break;
                }
            }
        }
        while kept.front().is_some_and(|(t, _)| t.elapsed() > window) {
            kept.pop_front();
        }
        let records: Vec<Value> = kept.iter().map(|(_, f)| f.clone()).collect();
        let rows = mesh_agent::cli_stat::top(&records, limit);
        let done = duration.is_some_and(|d| started.elapsed() >= d);
        if done || (tty && duration.is_none()) {
            if output == Output::Table {
                if tty && !done {
                    print!("\x1b[2J\x1b[H");
                }
                print!("{}", mesh_agent::cli_stat::top_text(&rows));
            } else {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            }
        }
        if done {
            return Ok(());
        }
    }
}

/// Every flow record of the window from each source (`--from`, else
/// `--agent`, each `--nodes` agent and with `--waypoints` every waypoint,
/// those two through port-forwards), merged.
fn gather(cli: &Cli, sources: &Sources) -> anyhow::Result<Vec<Value>> {
    let mut urls = if sources.from.is_empty() && sources.nodes.is_empty() {
        vec![cli.agent.clone()]
    } else {
        sources.from.clone()
    };
    let mut forwards = Vec::new();
    for node in &sources.nodes {
        let (url, forwarding) = forward_to_node(cli, node)?;
        urls.push(url);
        forwards.push(forwarding);
    }
    let _waypoints = if sources.waypoints {
        let (found, forwarding) = forward_to_waypoints(cli)?;
        urls.extend(found);
        Some(forwarding)
    } else {
        None
    };
    let args = mesh_agent::cli_flows::FlowsArgs { since: Some(sources.window), last: 1_000_000, ..Default::default() };
    let query = mesh_agent::cli_flows::query(&args, std::time::SystemTime::now(), None);
    let mut records = Vec::new();
    for url in &urls {
        match get(url, &query)? {
            Value::Array(list) => records.extend(list),
            other => bail!("{url}{query}: expected a list of flow records, got {other}"),
        }
    }
    Ok(records)
}

fn get(agent: &str, path: &str) -> anyhow::Result<Value> {
    let url = format!("{}{path}", agent.trim_end_matches('/'));
    let agent_err = || {
        match VIA.get() {
        Some(via) => format!("cannot reach {via}"),
        None => format!("cannot reach the Heddle agent at {agent} (is mesh-agent running on this node? use --agent URL or --node NODE)"),
    }
    };
    let resp = ureq::get(&url).timeout(Duration::from_secs(5)).call().with_context(agent_err)?;
    let v: Value = resp.into_json().with_context(|| format!("invalid JSON from {url}"))?;
    if v.is_null() {
        bail!("empty answer from {url}");
    }
    Ok(v)
}

fn flows(agent: &str, output: Output, args: &mesh_agent::cli_flows::FlowsArgs) -> anyhow::Result<()> {
    use mesh_agent::cli_flows::{query, table_header, table_row};
    if output == Output::Table {
        println!("{}", table_header());
    }
    if args.follow {
        // The agent pushes new records (JSON Lines); it drops records for a
        // client that reads too slowly and says how many.
        use mesh_agent::cli_flows::{follow, lost_notice, StreamLine};
        follow(agent, args, |line| match line {
            StreamLine::Record(f) if output == Output::Table => println!("{}", table_row(&f)),
            StreamLine::Record(f) => println!("{f}"),
            StreamLine::Lost(n) => eprintln!("{}", lost_notice(n)),
        })?;
        return Ok(());
    }
    let flows = get(agent, &query(args, std::time::SystemTime::now(), None))?;
    let list = flows.as_array().cloned().unwrap_or_default();
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&flows)?),
        Output::Jsonl => {
            for f in &list {
                println!("{f}");
            }
        }
        Output::Table | Output::Dot => {
            for f in &list {
                println!("{}", table_row(f));
            }
        }
    }
    Ok(())
}

fn print_workloads(w: &Value) {
    println!(
        "{:<28} {:<12} {:<18} {:<9} {:<9} {:>6} {:>6}",
        "WORKLOAD", "NODE", "IPS", "ENROLLED", "CAPTURED", "OUT", "IN"
    );
    for w in w.as_array().into_iter().flatten() {
        let ips: Vec<String> = w["ips"].as_array().into_iter().flatten().map(s).collect();
        println!(
            "{:<28} {:<12} {:<18} {:<9} {:<9} {:>6} {:>6}",
            format!("{}/{}", s(&w["namespace"]), s(&w["name"])),
            s(&w["node"]),
            ips.join(","),
            s(&w["enrolled"]),
            s(&w["captured"]),
            s(&w["outboundConnections"]),
            s(&w["inboundConnections"]),
        );
    }
}

/// Exit status of `heddle policy`: allow, deny, invalid input.
const EXIT_ALLOW: u8 = 0;
const EXIT_DENY: u8 = 1;
const EXIT_INVALID: u8 = 2;

fn policy_command(cmd: PolicyCommand, agent: &str, output: Output) -> anyhow::Result<ExitCode> {
    Ok(ExitCode::from(match cmd {
        PolicyCommand::Eval(args) => policy_eval(&args, output),
        PolicyCommand::Validate { files } => policy_validate(&files, output),
        PolicyCommand::List => {
            let p = get(agent, "/policies")?;
            if output == Output::Table {
                print!("{}", cli_agent::policies_text(&p));
            } else {
                println!("{}", serde_json::to_string_pretty(&p)?);
            }
            0
        }
    }))
}

/// Loaded files, the set built from them, and every problem found, each
/// message prefixed with where its object came from.
struct Checked {
    set: PolicySet,
    errors: Vec<String>,
    warnings: Vec<(policy::PolicyRef, String)>,
    notes: Vec<String>,
    objects: usize,
}

fn check(paths: &[PathBuf], root_namespace: &str) -> Checked {
    let loaded = load::load_paths(paths);
    let origins: Vec<load::Origin> = loaded.objects.iter().map(|(o, _)| o.clone()).collect();
    let objects = origins.len();
    // Policies with targetRefs are the waypoint's: checked as it checks them too.
    let targeted = loaded.objects.iter().map(|(o, p)| (o.to_string(), p.clone())).collect();
    let waypoint = policy::l7::WaypointPolicies::build(targeted, Vec::new(), root_namespace);
    let (set, policy_errors) = PolicySet::from_objects(loaded.objects.into_iter().map(|(_, o)| o), root_namespace);
    let mut errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    errors.extend(policy_errors.iter().map(|e| format!("{}: {e}", origins[e.index])));
    for s in waypoint.statuses().iter().filter(|s| !s.accepted) {
        for p in &s.problems {
            let line = format!(
                "{}: policy {}: {p} (at the waypoint)",
                s.origin,
                s.object.trim_start_matches("authorizationpolicy/")
            );
            // The node agents' compiler may have said it already.
            if !errors.iter().any(|e| e.starts_with(&s.origin) && e.contains(p.split(": ").next().unwrap_or(p))) {
                errors.push(line);
            }
        }
    }
    let warnings = set.warnings().iter().map(|w| (w.policy.clone(), format!("{}: {w}", origins[w.index]))).collect();
    let notes = loaded
        .skipped
        .iter()
        .map(|s| format!("{}: skipped, kind {:?} is not AuthorizationPolicy", s.origin, s.kind))
        .collect();
    Checked { set, errors, warnings, notes, objects }
}

fn policy_eval(args: &EvalArgs, output: Output) -> u8 {
    if args.is_request() {
        return policy_eval_request(args, output);
    }
    let checked = check(&args.policies, &args.root_namespace);
    let labels = &args.dst_labels.0;
    let applied = checked.set.applicable(&args.dst_namespace, labels);
    let mut errors = checked.errors.clone();
    if args.skip_invalid {
        for e in &checked.errors {
            eprintln!("warning: ignoring invalid policy: {e}");
        }
        errors.clear();
    }
    // An address that some applicable rule looks at must be given: a default
    // would silently decide those rules.
    let missing = |needed: fn(&policy::AppliedPolicy) -> bool, what: &str, flag: &str, given: bool| {
        let p = applied.iter().find(|p| needed(p) && !given)?;
        Some(format!("policy {} looks at the {what}: pass {flag}", p.policy))
    };
    errors.extend(missing(|p| p.needs_source_ip, "source IP", "--src-ip", args.src_ip.is_some()));
    errors.extend(missing(|p| p.needs_destination_ip, "destination IP", "--dst-ip", args.dst_ip.is_some()));
    if !errors.is_empty() {
        report_invalid(&errors, output);
        return EXIT_INVALID;
    }
    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let conn = Connection {
        dst: Destination {
            namespace: &args.dst_namespace,
            labels,
            addr: OrigDst(SocketAddr::new(args.dst_ip.unwrap_or(unspecified), args.dst_port)),
        },
        src: SrcIp(args.src_ip.unwrap_or(unspecified)),
        peer: args.src_principal.as_ref(),
    };
    let decision = policy::authorize(&checked.set, &conn);
    let warnings: Vec<&String> =
        checked.warnings.iter().filter(|(p, _)| applied.iter().any(|a| &a.policy == p)).map(|(_, w)| w).collect();
    if output == Output::Json {
        let mut out = decision.to_json();
        out["warnings"] = json!(warnings);
        println!("{out}");
    } else {
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        println!("{decision}");
    }
    if decision.is_allowed() {
        EXIT_ALLOW
    } else {
        EXIT_DENY
    }
}

/// `--header "name: value"` flags as a header map.
fn request_headers(flags: &[String], errors: &mut Vec<String>) -> hyper::header::HeaderMap {
    use hyper::header::{HeaderMap, HeaderName, HeaderValue};
    let mut headers = HeaderMap::new();
    for h in flags {
        let parsed = h.split_once(':').and_then(|(k, v)| {
            Some((
                HeaderName::from_bytes(k.trim().to_ascii_lowercase().as_bytes()).ok()?,
                HeaderValue::try_from(v.trim()).ok()?,
            ))
        });
        match parsed {
            Some((k, v)) => {
                headers.append(k, v);
            }
            None => errors.push(format!("--header {h:?} is not \"name: value\"")),
        }
    }
    headers
}

/// `--claim name=value` flags as JWT claims (a repeated name makes a list).
fn jwt_claims(flags: &[String], errors: &mut Vec<String>) -> serde_json::Map<String, Value> {
    let mut claims = serde_json::Map::new();
    for c in flags {
        let Some((k, v)) = c.split_once('=') else {
            errors.push(format!("--claim {c:?} is not name=value"));
            continue;
        };
        let v = Value::String(v.to_owned());
        match claims.get_mut(k) {
            Some(Value::Array(list)) => list.push(v),
            Some(first) => *first = Value::Array(vec![first.clone(), v]),
            None => {
                claims.insert(k.to_owned(), v);
            }
        }
    }
    claims
}

/// `heddle policy eval` for a request at a waypoint.
fn policy_eval_request(args: &EvalArgs, output: Output) -> u8 {
    use policy::l7::{self, Authenticated, RequestFacts, WaypointPolicies};
    let loaded = load::load_paths(&args.policies);
    let mut errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    let objects = loaded.objects.into_iter().map(|(o, p)| (o.to_string(), p)).collect();
    let set = WaypointPolicies::build(objects, Vec::new(), &args.root_namespace);
    let rejected: Vec<String> = set
        .statuses()
        .iter()
        .filter(|s| !s.accepted)
        .flat_map(|s| s.problems.iter().map(move |p| format!("{} ({}): {p}", s.object, s.origin)))
        .collect();
    if args.skip_invalid {
        for e in &rejected {
            eprintln!("warning: invalid policy (its targets are denied, as at the waypoint): {e}");
        }
    } else {
        errors.extend(rejected);
    }
    let waypoint = args.waypoint.clone().unwrap_or_else(|| format!("{}/waypoint", args.dst_namespace));
    let Some((wp_ns, wp_name)) = waypoint.split_once('/') else {
        errors.push(format!("--waypoint {waypoint:?} is not NAMESPACE/NAME"));
        report_invalid(&errors, output);
        return EXIT_INVALID;
    };
    let headers = request_headers(&args.headers, &mut errors);
    let raw_path = args.path.as_deref().unwrap_or("/");
    let raw_path = raw_path.split_once('?').map_or(raw_path, |(p, _)| p);
    let path = match l7::path::normalize(raw_path) {
        Ok(p) => p.into_owned(),
        Err(e) => {
            errors.push(format!("--path {raw_path:?}: {e} (the waypoint answers 400)"));
            String::new()
        }
    };
    let claims = jwt_claims(&args.claims, &mut errors);
    if !errors.is_empty() {
        report_invalid(&errors, output);
        return EXIT_INVALID;
    }
    let auth = (args.request_principal.is_some() || !claims.is_empty()).then(|| Authenticated {
        principal: args.request_principal.clone().unwrap_or_default(),
        audiences: claims.get("aud").and_then(Value::as_str).map(|a| vec![a.to_owned()]).unwrap_or_default(),
        presenter: claims.get("azp").and_then(Value::as_str).map(str::to_owned),
        claims,
        by: policy::PolicyRef::new("-", "--request-principal"),
        location: l7::authn::Location::Param(String::new()),
        forward: false,
        add_headers: Vec::new(),
    });
    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let host = args.host.clone().unwrap_or_default().to_ascii_lowercase();
    let facts = RequestFacts {
        service: args.service.as_deref().map(|s| (args.dst_namespace.as_str(), s)),
        waypoint: (wp_ns, wp_name),
        src_ip: args.src_ip.unwrap_or(unspecified),
        peer: args.src_principal.as_ref(),
        dst: SocketAddr::new(args.dst_ip.unwrap_or(unspecified), args.dst_port),
        method: args.method.as_deref().unwrap_or("GET"),
        host: &host,
        path: &path,
        headers: &headers,
        auth: auth.as_ref(),
        http: true,
    };
    let decision = l7::authorize_request(&set, &facts);
    if output == Output::Json {
        let mut out = decision.to_json();
        out["path"] = json!(path);
        println!("{out}");
    } else {
        println!("{decision}");
    }
    if decision.is_allowed() {
        EXIT_ALLOW
    } else {
        EXIT_DENY
    }
}

fn report_invalid(errors: &[String], output: Output) {
    if output == Output::Json {
        println!("{}", json!({ "verdict": null, "errors": errors }));
    }
    for e in errors {
        eprintln!("error: {e}");
    }
}

fn policy_validate(files: &[PathBuf], output: Output) -> u8 {
    let checked = check(files, policy::DEFAULT_ROOT_NAMESPACE);
    let valid = checked.errors.is_empty();
    let warnings: Vec<&String> = checked.warnings.iter().map(|(_, w)| w).collect();
    if output == Output::Json {
        let out = json!({
            "valid": valid,
            "objects": checked.objects,
            "errors": checked.errors,
            "warnings": warnings,
            "skipped": checked.notes,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        for e in &checked.errors {
            println!("error: {e}");
        }
        for w in &warnings {
            println!("warning: {w}");
        }
        for n in &checked.notes {
            println!("note: {n}");
        }
        println!(
            "{}: {} AuthorizationPolicy objects, {}, {}",
            if valid { "valid" } else { "invalid" },
            checked.objects,
            counted(checked.errors.len(), "problem"),
            counted(warnings.len(), "warning"),
        );
    }
    if valid {
        EXIT_ALLOW
    } else {
        EXIT_INVALID
    }
}

fn counted(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}
