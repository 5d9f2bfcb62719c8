//! `cargo xtask soak`: the churn soak (a benchmark-style run, not a test).
//!
//! Two nodes with mTLS; `client` on node-a runs `pod-app churn` against an
//! echo server on node-b (by default 1,200 new connections/s plus 20 long,
//! byte-verified streams) for the whole run, while one of the `churn-*`
//! pods on node-a is enrolled or leaves the mesh every second and the
//! authorization policies change every 10 s (two ALLOW sets, both admitting
//! the load). Every `--sample-seconds` each agent's RSS, open descriptors,
//! CPU time, active connections and map entries are sampled and printed as
//! a time series; at the end the first minute is compared with the last,
//! connections left open after the load stops are counted (a leak), and so
//! are ERROR lines in the agents' logs.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use clap::Parser;
use heddle_tests::churn::ChurnReport;
use heddle_tests::{check_environment, Agent, CaOptions, Pod, PodSpec, Testbed};

#[derive(Parser)]
#[command(about = "Churn soak: connections, enrollment and policy changes for minutes; resources over time")]
struct Args {
    /// Minutes to run.
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// New connections per second.
    #[arg(long, default_value_t = 1200)]
    rate: u32,
    /// Long streams.
    #[arg(long, default_value_t = 20)]
    streams: u32,
    /// Pods that take turns enrolling and leaving (one change per second).
    #[arg(long, default_value_t = 10)]
    churn_pods: usize,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10)]
    sample_seconds: u64,
}

const ECHO_PORT: u16 = 9000;

/// Two policy sets that both admit the load: changing between them makes
/// every agent recompile and re-evaluate, and changes no verdict.
fn policies(turn: u64) -> String {
    let rules = if turn.is_multiple_of(2) {
        "  rules:\n  - from: [{source: {namespaces: [\"demo\"]}}]\n".to_owned()
    } else {
        format!("  rules:\n  - to: [{{operation: {{ports: [\"{ECHO_PORT}\"]}}}}]\n")
    };
    format!(
        "apiVersion: heddle.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: soak-{}\n  namespace: demo\nspec:\n{rules}",
        turn % 2
    )
}

/// One agent at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    rss_mib: f64,
    fds: u64,
    cpu_s: f64,
    active: u64,
    orig_dst: u64,
    pending: u64,
    enrolled: u64,
}

fn sample(agent: &Agent) -> Result<Sample> {
    let pid = agent.pid().context("agent not running")?;
    let counters = agent.stats()?;
    let dp = agent.datapath()?;
    Ok(Sample {
        rss_mib: heddle_tests::procfs::status_mib(pid, "VmRSS")?,
        fds: counters.open_fds,
        cpu_s: heddle_tests::procfs::cpu_seconds(pid)?,
        active: counters.active_connections,
        orig_dst: dp.map_entries("HEDDLE_ORIG_DST"),
        pending: dp.map_entries("HEDDLE_PENDING"),
        enrolled: dp.map_entries("HEDDLE_ENROLLED"),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    check_environment().context("the soak needs root and the test bed's tools")?;
    let tb = Testbed::new("soak")?;
    let a = tb.add_node("node-a")?;
    let b = tb.add_node("node-b")?;
    let client = tb.add_pod(&a, PodSpec::new("client").enrolled(true))?;
    let server = tb.add_pod(&b, PodSpec::new("server").enrolled(true))?;
    let churn: Vec<Pod> =
        (0..args.churn_pods).map(|i| tb.add_pod(&a, PodSpec::new(&format!("churn-{i}")))).collect::<Result<_, _>>()?;
    let _echo = server.start_echo(ECHO_PORT)?;
    tb.set_policies(&policies(0))?;
    tb.start_ca(&a, CaOptions::default())?;
    let agents = tb.start_agents(&[&a, &b])?;
    let seconds = args.minutes * 60;
    let mut cmd = client.pod_app()?;
    cmd.args(["churn", "--to", &server.addr(ECHO_PORT).to_string()]);
    cmd.args(["--rate", &args.rate.to_string(), "--streams", &args.streams.to_string()]);
    cmd.args(["--seconds", &seconds.to_string()]);
    eprintln!(
        "soak: {} min, {} new connections/s, {} long streams, one enrollment change/s over {} pods, policies every 10 s",
        args.minutes, args.rate, args.streams, args.churn_pods
    );
    let mut load = client.spawn(cmd)?;
    let started = Instant::now();
    let mut series: Vec<(u64, Vec<Sample>)> = vec![(0, agents.iter().map(sample).collect::<Result<_>>()?)];
    let (mut changes, mut policy_changes, mut change_errors) = (0u64, 0u64, Vec::new());
    let mut enrolled = vec![false; churn.len()];
    let mut tick = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        tick += 1;
        let next = started + Duration::from_secs(tick);
        if !churn.is_empty() {
            let i = usize::try_from(tick).unwrap_or_default() % churn.len();
            enrolled[i] = !enrolled[i];
            match tb.apply_enrollment(&churn[i], enrolled[i]) {
                Ok(()) => changes += 1,
                Err(e) => change_errors.push(format!("t={tick}s {}: {e}", churn[i].qualified_name())),
            }
        }
        if tick.is_multiple_of(10) {
            match tb.set_policies(&policies(tick / 10)) {
                Ok(_) => policy_changes += 1,
                Err(e) => change_errors.push(format!("t={tick}s policies: {e}")),
            }
        }
        if tick.is_multiple_of(args.sample_seconds.max(1)) {
            series.push((tick, agents.iter().map(sample).collect::<Result<_>>()?));
            let s = &series.last().expect("just pushed").1;
            eprintln!(
                "soak: t={tick:>4}s  node-a rss {:.1} MiB fds {} active {}  node-b rss {:.1} MiB fds {} active {}",
                s[0].rss_mib, s[0].fds, s[0].active, s[1].rss_mib, s[1].fds, s[1].active
            );
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let report = finish(&mut load, seconds)?;
    // The load is over: what is still open now leaked.
    std::thread::sleep(Duration::from_secs(5));
    let after: Vec<Sample> = agents.iter().map(sample).collect::<Result<_>>()?;
    let errors: Vec<usize> = agents.iter().map(|a| a.log_count(" ERROR ")).collect();
    print!("{}", render(&args, &series, &after, &report, changes, policy_changes, &errors));
    for e in change_errors.iter().take(10) {
        println!("  change failed: {e}");
    }
    ensure!(report.short.failed.total() == 0, "connections failed: {:?}", report.short.failed);
    Ok(())
}

fn finish(load: &mut heddle_tests::Process, seconds: u64) -> Result<ChurnReport> {
    let deadline = Instant::now() + Duration::from_secs(seconds.min(60) + 60);
    while load.try_wait()?.is_none() {
        ensure!(Instant::now() < deadline, "pod-app churn did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = load.log_text();
    let line = out.lines().rev().find(|l| l.starts_with('{')).with_context(|| format!("no churn report:\n{out}"))?;
    serde_json::from_str(line).context("parsing the churn report")
}

/// Mean of `f` over the samples taken in `[from, to)` seconds.
#[allow(clippy::cast_precision_loss)] // a few hundred samples
fn mean(series: &[(u64, Vec<Sample>)], agent: usize, from: u64, to: u64, f: impl Fn(&Sample) -> f64) -> f64 {
    let picked: Vec<f64> = series.iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, s)| f(&s[agent])).collect();
    if picked.is_empty() {
        0.0
    } else {
        picked.iter().sum::<f64>() / picked.len() as f64
    }
}

#[allow(clippy::cast_precision_loss)] // counters far below 2^52
fn render(
    args: &Args,
    series: &[(u64, Vec<Sample>)],
    after: &[Sample],
    report: &ChurnReport,
    changes: u64,
    policy_changes: u64,
    errors: &[usize],
) -> String {
    let mut out = String::new();
    let end = series.last().map_or(0, |(t, _)| *t);
    let _ = writeln!(out, "\n== soak: {} min at {} new connections/s ==", args.minutes, args.rate);
    let _ = writeln!(
        out,
        "{:>6}  {:>28}  {:>28}",
        "t (s)", "node-a rss MiB / fds / active", "node-b rss MiB / fds / active"
    );
    for (t, s) in series {
        let _ = writeln!(
            out,
            "{t:>6}  {:>12.1} / {:>5} / {:>5}  {:>12.1} / {:>5} / {:>5}   orig_dst {} pending {} enrolled {}",
            s[0].rss_mib,
            s[0].fds,
            s[0].active,
            s[1].rss_mib,
            s[1].fds,
            s[1].active,
            s[0].orig_dst,
            s[0].pending,
            s[0].enrolled
        );
    }
    for (i, node) in ["node-a", "node-b"].iter().enumerate() {
        let first = |f: &dyn Fn(&Sample) -> f64| mean(series, i, 1, 61, f);
        let last = |f: &dyn Fn(&Sample) -> f64| mean(series, i, end.saturating_sub(59), end + 1, f);
        let cpu = (series.last().map_or(0.0, |(_, s)| s[i].cpu_s) - series[0].1[i].cpu_s) / end.max(1) as f64;
        let _ = writeln!(
            out,
            "{node}: rss first minute {:.1} MiB, last minute {:.1} MiB; fds {:.0} -> {:.0}; CPU {cpu:.2} vCPU; \
             after the load: {} connections open, {} fds, orig_dst {} pending {}; ERROR log lines: {}",
            first(&|s| s.rss_mib),
            last(&|s| s.rss_mib),
            first(&|s| s.fds as f64),
            last(&|s| s.fds as f64),
            after[i].active,
            after[i].fds,
            after[i].orig_dst,
            after[i].pending,
            errors[i],
        );
    }
    let _ = writeln!(
        out,
        "load: {} of {} new connections ok, failed {:?}; long streams: {} connections, {} clean ends, {} corrupted bytes, failures {:?}",
        report.short.ok,
        report.short.attempted,
        report.short.failed.by_kind,
        report.streams.connections,
        report.streams.clean_ends,
        report.streams.corrupted_bytes,
        report.streams.failed.by_kind
    );
    let _ = writeln!(out, "changes: {changes} enrollment changes, {policy_changes} policy changes");
    out
}
