//! `heddle`: the Heddle command-line interface. It talks to a node agent's
//! admin API (default: this node's, `http://127.0.0.1:15000`).
//!
//! This is the first cut (flows, workloads, status); the observability issue
//! grows it into a `hubble observe`-like tool.

use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;

#[derive(Parser)]
#[command(name = "heddle", version, about = "Inspect a Heddle node agent: captured flows, workloads, datapath status")]
struct Cli {
    /// Admin API of the agent to query.
    #[arg(long, env = "HEDDLE_AGENT", default_value = "http://127.0.0.1:15000", global = true)]
    agent: String,
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
}

#[derive(Subcommand)]
enum Command {
    /// Show recent flows (connections the agent captured).
    Flows {
        /// Show only the last N records.
        #[arg(long, default_value_t = 100)]
        last: usize,
    },
    /// Show the workloads the agent knows and whether their traffic is captured.
    Workloads,
    /// Show agent health, attached eBPF programs, map usage and datapath counters.
    Status,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Flows { last } => {
            let flows = get(&cli.agent, &format!("/flows?last={last}"))?;
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
            } else {
                print_flows(&flows);
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
            let dp = get(&cli.agent, "/datapath")?;
            let stats = get(&cli.agent, "/stats")?;
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({"datapath": dp, "stats": stats}))?);
            } else {
                print_status(&dp, &stats);
            }
        }
    }
    Ok(())
}

fn get(agent: &str, path: &str) -> anyhow::Result<Value> {
    let url = format!("{}{path}", agent.trim_end_matches('/'));
    let agent_err = || format!("cannot reach the Heddle agent at {agent} (is mesh-agent running on this node? use --agent URL)");
    let resp = ureq::get(&url)
        .timeout(Duration::from_secs(5))
        .call()
        .with_context(agent_err)?;
    let v: Value = resp.into_json().with_context(|| format!("invalid JSON from {url}"))?;
    if v.is_null() {
        bail!("empty answer from {url}");
    }
    Ok(v)
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[allow(clippy::cast_precision_loss)] // display only
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n}B") } else { format!("{v:.1}{}", UNITS[u]) }
}

fn print_flows(flows: &Value) {
    println!(
        "{:<12} {:<5} {:<8} {:<20} {:<21} {:<21} {:<21} {:>9} {:>9} {:>8}",
        "TIME", "EVENT", "DIR", "WORKLOAD", "SOURCE", "ORIGINAL DST", "SENT TO", "SENT", "RECEIVED", "DURATION"
    );
    for f in flows.as_array().into_iter().flatten() {
        let time = s(&f["time"]);
        let time = time.get(11..23).unwrap_or(&time).to_owned();
        let dur = f["duration_ms"].as_f64().map_or("-".into(), |d| format!("{d:.1}ms"));
        let mut dst = s(&f["dst"]);
        if let Some(svc) = f["service"].as_str() {
            dst = format!("{dst} ({svc})");
        }
        println!(
            "{:<12} {:<5} {:<8} {:<20} {:<21} {:<21} {:<21} {:>9} {:>9} {:>8}{}",
            time,
            s(&f["event"]),
            s(&f["direction"]),
            s(&f["workload"]),
            s(&f["src"]),
            s(&f["orig_dst"]),
            dst,
            human_bytes(f["bytes_sent"].as_u64().unwrap_or(0)),
            human_bytes(f["bytes_received"].as_u64().unwrap_or(0)),
            dur,
            f["error"].as_str().map(|e| format!("  error: {e}")).unwrap_or_default(),
        );
    }
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

fn print_status(dp: &Value, stats: &Value) {
    println!("agent:        up (node {})", s(&stats["node"]));
    println!("connections:  {} open, {} fds", s(&stats["activeConnections"]), s(&stats["openFds"]));
    println!("programs:");
    for p in dp["programs"].as_array().into_iter().flatten() {
        println!("  {:<18} {:<16} {}", s(&p["program"]), s(&p["attach"]), s(&p["target"]));
    }
    println!("maps:");
    for (name, m) in dp["maps"].as_object().into_iter().flatten() {
        println!("  {:<20} {:>6} / {}", name, s(&m["entries"]), s(&m["capacity"]));
    }
    println!("datapath decisions:");
    for (name, n) in dp["reasons"].as_object().into_iter().flatten() {
        println!("  {name:<28} {}", s(n));
    }
}
