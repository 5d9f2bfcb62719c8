//! `cargo xtask bench`: direct versus meshed connections, measured in one run
//! on the same two-node test bed.
//!
//! Topology: `client` on node-a, `server` on node-b (a veth/bridge path
//! between two network namespaces, as in the ztunnel baseline).
//! First every measurement runs with no agent (direct); then the CA and both
//! agents start (mTLS, HBONE) and the same measurements run again. Real
//! clients: iperf3 (single-stream throughput), sockperf (1 KiB TCP
//! ping-pong; its figure is one-way, RTT/2), `loadgen` (1 KiB HTTP/1.1
//! requests at a fixed rate, open loop), `pod-app` (new connections: connect,
//! 1-byte echo, close). Agent CPU time and peak RSS are read from /proc.
//!
//! Then the waypoint (L7): the HTTP measurement again to the service VIP,
//! first on the L4 mesh, then with the namespace using a waypoint (a pod on
//! node-b): latency at the fixed rate, requests/s at saturation (h2load,
//! HTTP/1.1, 10 connections), and the waypoint's CPU per 1,000 requests and
//! peak RSS.

use std::{
    fmt::Write as _,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Parser;
use heddle_tests::waypoint::{Waypoint, GATEWAY_NAME_LABEL};
use heddle_tests::{check_environment, Agent, CaOptions, ClientSpec, Pod, PodSpec, ServiceSpec, Testbed};

#[path = "bench/ztunnel.rs"]
mod ztunnel;

#[derive(Parser, Clone)]
#[command(about = "Benchmark Heddle's data path against direct connections")]
struct Args {
    /// Seconds per throughput, ping-pong and HTTP measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// HTTP requests per second (fixed rate).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Connections for the new-connections measurement.
    #[arg(long, default_value_t = 5000)]
    conns: usize,
    /// Run the agents without a CA (plaintext forwarding), to separate the
    /// cost of capture and proxying from the cost of mTLS + HTTP/2.
    #[arg(long)]
    no_mtls: bool,
    /// Only the waypoint phase (skips the direct and L4 measurements).
    #[arg(long, conflicts_with = "no_mtls")]
    only_waypoint: bool,
    /// Also measure Istio's ztunnel (this binary, built with `--features
    /// testing`) in the same bed and run: `cargo xtask bench --vs-ztunnel`.
    #[arg(long, conflicts_with = "only_waypoint")]
    ztunnel: Option<std::path::PathBuf>,
}

const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
/// Connections, one at a time, for the time-to-first-byte figure.
const SERIAL: usize = 300;
/// The `demo/server` service (HTTP), for the waypoint phase.
const SERVER_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 40);

#[derive(Default, Clone, Copy)]
struct Figures {
    gbps: f64,
    /// iperf3 with 8 parallel streams.
    gbps_8: f64,
    pp_avg_us: f64,
    pp_p50_us: f64,
    pp_p99_us: f64,
    pp_p999_us: f64,
    http: [f64; 4],
    http_errors: u64,
    http_requests: u64,
    /// The proxies' CPU seconds during the HTTP phase (mesh only).
    http_cpu_s: f64,
    /// The proxies' CPU seconds during the single-stream iperf3 run.
    iperf_cpu_s: f64,
    /// Bytes iperf3 moved in that run.
    iperf_bytes: f64,
    conns_per_s: f64,
    /// Mean time of one new connection to its first echoed byte, one at a
    /// time (the process start of the client amortised over them), µs.
    first_byte_us: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    check_environment().context("the benchmark needs root and the test bed's tools")?;
    for tool in ["iperf3", "sockperf"] {
        ensure!(
            Command::new(tool).arg("--help").output().is_ok(),
            "{tool} is missing: `apt-get install {tool}` (cargo xtask bench installs it)"
        );
    }
    let tb = Testbed::new("bench")?;
    let a = tb.add_node("node-a")?;
    let b = tb.add_node("node-b")?;
    let client = tb.add_pod(&a, PodSpec::new("client").enrolled(true))?;
    let server = tb.add_pod(&b, PodSpec::new("server").enrolled(true))?;
    let wp_pod = if args.no_mtls {
        None
    } else {
        Some(tb.add_pod(&b, PodSpec::new("waypoint").label(GATEWAY_NAME_LABEL, "waypoint"))?)
    };
    tb.add_service(ServiceSpec::new("server", SERVER_VIP).port(80, HTTP_PORT))?;
    tb.add_waypoint("demo", "waypoint")?;
    let loadgen = heddle_tests::pod_app_binary()?.with_file_name("loadgen");

    let mut servers = Vec::new();
    servers.push(server.spawn(cmd("iperf3", &["-s", "-B", "0.0.0.0", "-p", &IPERF_PORT.to_string()]))?);
    servers.push(server.spawn(cmd("sockperf", &["sr", "--tcp", "-i", "0.0.0.0", "-p", &SOCKPERF_PORT.to_string()]))?);
    let mut serve = Command::new(&loadgen);
    serve.args(["serve", "--listen", &format!("0.0.0.0:{HTTP_PORT}"), "--size", "1024"]);
    servers.push(server.spawn(serve)?);
    servers.push(server.start_echo(ECHO_PORT)?);
    for port in [IPERF_PORT, SOCKPERF_PORT, HTTP_PORT, ECHO_PORT] {
        server.wait_listening(port, Duration::from_secs(10))?;
    }

    let direct = if args.only_waypoint {
        Figures::default()
    } else {
        eprintln!("bench: measuring the direct path ({} s per measurement)…", args.seconds);
        measure(&args, &client, &server, &loadgen, &|| Ok(0.0))?
    };
    // ztunnel before Heddle's agents start (nothing else captures then).
    let ztunnel = match &args.ztunnel {
        Some(bin) => {
            eprintln!("bench: starting ztunnel in the client's and the server's namespaces (dedicated mode)…");
            let z = ztunnel::Ztunnels::start(bin, &tb, &client, &server)?;
            eprintln!("bench: measuring through ztunnel…");
            let f = measure(&args, &client, &server, &loadgen, &|| z.cpu_seconds())?;
            let rss = z.peak_rss_mib()?;
            z.stop(&client)?;
            Some((f, rss))
        }
        None => None,
    };

    if args.no_mtls {
        eprintln!("bench: starting both agents WITHOUT a CA (plaintext forwarding)…");
    } else {
        eprintln!("bench: starting the CA and both agents (mTLS on)…");
        tb.start_ca(&a, CaOptions::default())?;
    }
    let agents = tb.start_agents(&[&a, &b])?;
    // Warm-up: certificates and the pooled tunnel.
    let warm = client.run_client(&ClientSpec::to(server.addr(ECHO_PORT)))?;
    ensure!(warm.all_ok(), "warm-up connection through the mesh failed: {warm:?}");
    if !args.only_waypoint {
        eprintln!("bench: measuring the meshed path…");
        let mesh = measure(&args, &client, &server, &loadgen, &|| agents.iter().map(cpu_seconds).sum::<Result<f64>>())?;
        let rss: Vec<f64> = agents.iter().map(peak_rss_mib).collect::<Result<_>>()?;
        let flows = agents[0].flows()?;
        let want = if args.no_mtls { heddle_tests::Security::Plaintext } else { heddle_tests::Security::MutualTls };
        ensure!(
            flows.iter().any(|f| f.security == want),
            "the meshed run carried no {want:?} flow: the benchmark did not measure the mesh"
        );
        report(&args, &direct, &mesh, &rss);
        if let Some((z, z_rss)) = &ztunnel {
            ztunnel::report(&args, &direct, &mesh, &rss, z, z_rss);
        }
    }
    if let Some(wp_pod) = wp_pod {
        let l7 = waypoint_phase(&args, &tb, &client, &wp_pod, &loadgen, &agents)?;
        report_waypoint(&args, &l7);
    }
    drop(servers);
    Ok(())
}

/// HTTP to the service VIP: L4 mesh, then through the waypoint.
struct L7Figures {
    l4: [f64; 4],
    wp: [f64; 4],
    errors: (u64, u64),
    l4_saturation: f64,
    wp_saturation: f64,
    /// Waypoint CPU seconds per 1,000 requests at the fixed rate.
    wp_cpu_per_k: f64,
    /// Waypoint cores used at saturation.
    wp_cores_at_saturation: f64,
    wp_rss_mib: f64,
    /// Latencies through the bare waypoint, alternating with `configured`.
    bare: [f64; 4],
    /// Latencies through the waypoint with routes, retries and a rate limit.
    configured: [f64; 4],
    configured_errors: u64,
}

fn waypoint_phase(
    args: &Args,
    tb: &Testbed,
    client: &Pod,
    wp_pod: &Pod,
    loadgen: &std::path::Path,
    agents: &[Agent],
) -> Result<L7Figures> {
    let vip = std::net::SocketAddr::from((SERVER_VIP, 80));
    eprintln!("bench: HTTP to the service VIP on the L4 mesh…");
    let (l4, l4_errors, _) = http_at_rate(args, client, loadgen, vip, None)?;
    let l4_saturation = saturation(args, client, None)?.0;
    eprintln!("bench: starting a waypoint for namespace demo…");
    tb.set_namespace_waypoint("demo", Some("waypoint"))?;
    for a in agents {
        a.reload()?;
    }
    let wp = tb.start_waypoint(wp_pod, "waypoint")?;
    std::thread::sleep(Duration::from_millis(1500));
    // Warm-up through the waypoint (its tunnels and upstream pool).
    let (_, _, _) = http_at_rate(&Args { seconds: 1, ..args.clone() }, client, loadgen, vip, Some(&wp))?;
    let before = wp.flows("last=1")?.first().and_then(|f| f["id"].as_u64()).unwrap_or(0);
    eprintln!("bench: HTTP to the service VIP through the waypoint…");
    let (wp_lat, wp_errors, cpu) = http_at_rate(args, client, loadgen, vip, Some(&wp))?;
    let after = wp.flows("last=1")?.first().and_then(|f| f["id"].as_u64()).unwrap_or(0);
    ensure!(after > before, "no request went through the waypoint: the benchmark did not measure it");
    let (wp_saturation, wp_cpu_s, secs) = saturation(args, client, Some(&wp))?;
    #[allow(clippy::cast_precision_loss)]
    let requests = f64::from(args.rate) * args.seconds as f64;
    let wp_rss_mib = pid_peak_rss_mib(wp.pid())?;
    // Bare and configured alternate twice, so a noisy minute of the machine
    // falls on both; each figure is the mean of its two runs.
    eprintln!(
        "bench: bare waypoint and the waypoint with 10 route rules, a retry policy and a rate limit, alternating…"
    );
    let (mut bare, mut configured, mut configured_errors) = ([0.0; 4], [0.0; 4], 0);
    for _ in 0..2 {
        for with_config in [false, true] {
            set_bench_routes(tb, &wp, with_config)?;
            let (_, _, _) = http_at_rate(&Args { seconds: 1, ..args.clone() }, client, loadgen, vip, Some(&wp))?;
            let (lat, errors, _) = http_at_rate(args, client, loadgen, vip, Some(&wp))?;
            let route = wp.flows("last=1")?.first().map(|f| f["http"]["route"].clone()).unwrap_or_default();
            ensure!(
                (route == "httproute/demo/bench") == with_config,
                "the {} run went through route {route}",
                if with_config { "configured" } else { "bare" }
            );
            let sum = if with_config { &mut configured } else { &mut bare };
            for (s, l) in sum.iter_mut().zip(lat) {
                *s += l / 2.0;
            }
            if with_config {
                configured_errors += errors;
            }
        }
    }
    Ok(L7Figures {
        l4,
        wp: wp_lat,
        errors: (l4_errors, wp_errors),
        l4_saturation,
        wp_saturation,
        wp_cpu_per_k: cpu / requests * 1000.0,
        wp_cores_at_saturation: wp_cpu_s / secs,
        wp_rss_mib,
        bare,
        configured,
        configured_errors,
    })
}

/// Writes the benchmark's routes (or none) and waits until the waypoint
/// has them in force.
fn set_bench_routes(tb: &Testbed, wp: &Waypoint, with_config: bool) -> Result<()> {
    let routes = if with_config { configured_routes() } else { String::new() };
    tb.set_routes("routes", &routes)?;
    if with_config {
        wp.wait_route("httproute/demo/bench", true)?;
        wp.wait_route("httplocalratelimitpolicy/demo/bench", true)?;
        wp.wait_route("destinationrule/demo/server", true)?;
        wp.wait_route("authorizationpolicy/demo/bench-allow", true)?;
        wp.wait_route("authorizationpolicy/demo/bench-deny", true)?;
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while wp.routes()?.to_string().contains("httproute/demo/bench") {
        ensure!(Instant::now() < deadline, "the waypoint still has the benchmark's routes after 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Ten rules on `demo/server` (nine that the benchmark's requests do not
/// match, checked first, and a catch-all with a retry policy that holds the
/// body for a retry: non-idempotent retries are allowed, the load is POST),
/// a circuit breaker and an outlier detector (a `DestinationRule`), and a
/// rate limit, all far above the load, and L7 authorization (an ALLOW on
/// namespace, methods and paths, a DENY on a header the load does not
/// send): everything configured, nothing triggering.
fn configured_routes() -> String {
    let mut rules = String::new();
    for i in 0..9 {
        let _ = write!(
            rules,
            "  - matches: [{{path: {{type: PathPrefix, value: /r{i}}}, headers: [{{name: x-rule, value: \"{i}\"}}]}}]\n    backendRefs: [{{name: server, port: 80}}]\n"
        );
    }
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: bench, namespace: demo, annotations: {{heddle.dev/retry-non-idempotent: \"true\"}}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: server, port: 80}}]
  rules:
{rules}  - matches: [{{path: {{type: PathPrefix, value: /}}}}]
    retry: {{attempts: 2, codes: [503], backoff: 25ms}}
    timeouts: {{request: 10s, backendRequest: 5s}}
    backendRefs: [{{name: server, port: 80}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: server, namespace: demo}}
spec:
  host: server
  trafficPolicy:
    connectionPool: {{tcp: {{maxConnections: 10000}}, http: {{http1MaxPendingRequests: 10000}}}}
    outlierDetection: {{consecutive5xxErrors: 5, baseEjectionTime: 30s}}
---
apiVersion: heddle.dev/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {{name: bench, namespace: demo}}
spec:
  targetRefs: [{{group: \"\", kind: Service, name: server}}]
  total: {{requestsPerSecond: 1000000}}
  identity: {{requestsPerSecond: 1000000}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: bench-allow, namespace: demo}}
spec:
  targetRefs: [{{group: \"\", kind: Service, name: server}}]
  rules:
  - from: [{{source: {{namespaces: [demo]}}}}]
    to: [{{operation: {{methods: [GET, POST], paths: [\"/*\"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: bench-deny, namespace: demo}}
spec:
  targetRefs: [{{group: \"\", kind: Service, name: server}}]
  action: DENY
  rules:
  - when: [{{key: \"request.headers[x-block]\", values: [\"*\"]}}]
"
    )
}

/// What one fixed-rate loadgen run measured.
struct RateRun {
    /// p50, p90, p99, p99.9 latency, µs.
    lat: [f64; 4],
    errors: u64,
    requests: u64,
    /// CPU seconds `cpu` counted during the run.
    cpu_s: f64,
}

/// loadgen (HTTP/1.1, 1 KiB, 10 connections) from `client` to `to` at
/// `args.rate` for the measurement time; `cpu` reads the CPU seconds of the
/// processes measured, before and after.
fn run_at_rate(
    args: &Args,
    client: &Pod,
    loadgen: &std::path::Path,
    to: std::net::SocketAddr,
    cpu: &dyn Fn() -> Result<f64>,
) -> Result<RateRun> {
    let secs = args.seconds.to_string();
    let mut load = Command::new(loadgen);
    load.args([
        "http",
        "--to",
        &to.to_string(),
        "--rate",
        &args.rate.to_string(),
        "--duration",
        &secs,
        "--conns",
        "10",
        "--size",
        "1024",
    ]);
    let cpu_before = cpu()?;
    let out = run_ok(client, load, "loadgen")?;
    let cpu_s = cpu()? - cpu_before;
    let v: serde_json::Value = serde_json::from_str(out.trim()).context("loadgen JSON")?;
    let mut lat = [0.0; 4];
    for (i, k) in ["p50_us", "p90_us", "p99_us", "p999_us"].iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        {
            lat[i] = v[k].as_u64().unwrap_or(0) as f64;
        }
    }
    Ok(RateRun { lat, errors: v["errors"].as_u64().unwrap_or(0), requests: v["requests"].as_u64().unwrap_or(0), cpu_s })
}

/// [`run_at_rate`] with the waypoint's CPU: (latencies, errors, waypoint CPU s).
fn http_at_rate(
    args: &Args,
    client: &Pod,
    loadgen: &std::path::Path,
    to: std::net::SocketAddr,
    wp: Option<&Waypoint>,
) -> Result<([f64; 4], u64, f64)> {
    let r = run_at_rate(args, client, loadgen, to, &|| wp.map_or(Ok(0.0), |w| pid_cpu_seconds(w.pid())))?;
    Ok((r.lat, r.errors, r.cpu_s))
}

/// h2load (HTTP/1.1, 10 connections, closed loop) for the measurement
/// time: (requests/s, waypoint CPU s, seconds).
fn saturation(args: &Args, client: &Pod, wp: Option<&Waypoint>) -> Result<(f64, f64, f64)> {
    let url = format!("http://{SERVER_VIP}/");
    let secs = args.seconds.to_string();
    let cpu_before = wp.map_or(Ok(0.0), |w| pid_cpu_seconds(w.pid()))?;
    let started = Instant::now();
    let out = run_ok(client, cmd("h2load", &["--h1", "-c", "10", "-D", &secs, &url]), "h2load")?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = wp.map_or(Ok(0.0), |w| pid_cpu_seconds(w.pid()))? - cpu_before;
    // "finished in 5.00s, 12345.67 req/s, ..."
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("finished in ")?.split(", ").nth(1)?.strip_suffix(" req/s")?.parse::<f64>().ok())
        .with_context(|| format!("h2load output has no req/s:\n{out}"))?;
    Ok((rps, cpu, elapsed))
}

fn report_waypoint(args: &Args, f: &L7Figures) {
    println!();
    println!("Waypoint (L7), HTTP/1.1 1 KiB to the service VIP, {} s per measurement", args.seconds);
    println!("{:<44} {:>12} {:>12} {:>14}", "", "L4 mesh", "waypoint", "added");
    for (i, p) in ["p50", "p90", "p99", "p99.9"].iter().enumerate() {
        let label = format!("HTTP at {}/s, latency {p}, µs", args.rate);
        println!("{:<44} {:>12.0} {:>12.0} {:>14}", label, f.l4[i], f.wp[i], format!("+{:.0} µs", f.wp[i] - f.l4[i]));
    }
    println!("{:<44} {:>12} {:>12} {:>14}", "HTTP errors", f.errors.0, f.errors.1, "");
    println!(
        "{:<44} {:>12.0} {:>12.0} {:>14}",
        "requests/s at saturation (h2load --h1 -c 10)", f.l4_saturation, f.wp_saturation, ""
    );
    println!(
        "{:<44} {:>12} {:>12.0} {:>14}",
        "waypoint requests/s per core at saturation",
        "-",
        f.wp_saturation / f.wp_cores_at_saturation.max(0.01),
        ""
    );
    println!("{:<44} {:>12} {:>12.3} {:>14}", "waypoint CPU s per 1,000 requests", "-", f.wp_cpu_per_k, "");
    println!(
        "{:<44} {:>12} {:>12.3} {:>14}",
        "waypoint vCPU per 1,000 requests/s", "-", f.wp_cpu_per_k, "(same figure)"
    );
    println!("{:<44} {:>12} {:>12.1} {:>14}", "waypoint peak RSS, MiB", "-", f.wp_rss_mib, "");
    println!();
    println!("Waypoint configured (10 route rules, a retry policy holding the body, a circuit breaker, an outlier");
    println!("detector, a rate limit, an ALLOW and a DENY AuthorizationPolicy), none triggering;");
    println!("bare and configured alternating, two runs each, means");
    println!("{:<44} {:>12} {:>12} {:>14}", "", "bare", "configured", "cost of config");
    for (i, p) in ["p50", "p90", "p99", "p99.9"].iter().enumerate() {
        let (bare, conf) = (f.bare[i], f.configured[i]);
        let pct = if bare > 0.0 { (conf - bare) / bare * 100.0 } else { 0.0 };
        let label = format!("HTTP at {}/s through the waypoint, {p}, µs", args.rate);
        println!("{:<44} {:>12.0} {:>12.0} {:>14}", label, bare, conf, format!("{:+.0} µs ({pct:+.1} %)", conf - bare));
    }
    println!("{:<44} {:>12} {:>12} {:>14}", "HTTP errors", f.errors.1, f.configured_errors, "");
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

fn run_ok(pod: &Pod, c: Command, what: &str) -> Result<String> {
    let out = pod.run(c).with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every measurement from `client` to `server`; `cpu` reads the CPU
/// seconds of the proxies measured (zero for the direct path).
fn measure(
    args: &Args,
    client: &Pod,
    server: &Pod,
    loadgen: &std::path::Path,
    cpu: &dyn Fn() -> Result<f64>,
) -> Result<Figures> {
    let secs = args.seconds.to_string();
    let ip = server.ip().to_string();
    let mut f = Figures::default();

    let port = IPERF_PORT.to_string();
    let cpu_before = cpu()?;
    let out = run_ok(client, cmd("iperf3", &["-c", &ip, "-p", &port, "-t", &secs, "-J"]), "iperf3")?;
    f.iperf_cpu_s = cpu()? - cpu_before;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    f.gbps = v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9;
    f.iperf_bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let out = run_ok(client, cmd("iperf3", &["-c", &ip, "-p", &port, "-t", &secs, "-P", "8", "-J"]), "iperf3 -P 8")?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    f.gbps_8 = v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9;

    let out = run_ok(
        client,
        cmd("sockperf", &["pp", "--tcp", "-i", &ip, "-p", &SOCKPERF_PORT.to_string(), "-t", &secs, "-m", "1024"]),
        "sockperf",
    )?;
    let out = strip_ansi(&out);
    f.pp_avg_us = sockperf_value(&out, "avg-latency=")?;
    f.pp_p50_us = sockperf_value(&out, "percentile 50.000 =")?;
    f.pp_p99_us = sockperf_value(&out, "percentile 99.000 =")?;
    f.pp_p999_us = sockperf_value(&out, "percentile 99.900 =")?;

    let run = run_at_rate(args, client, loadgen, server.addr(HTTP_PORT), cpu)?;
    f.http = run.lat;
    f.http_cpu_s = run.cpu_s;
    f.http_errors = run.errors;
    f.http_requests = run.requests;

    let started = Instant::now();
    let s = client.run_client(&ClientSpec::to(server.addr(ECHO_PORT)).conns(args.conns).parallel(8).bytes(1))?;
    let elapsed = started.elapsed();
    ensure!(s.all_ok(), "new-connections run had failures: {s:?}");
    #[allow(clippy::cast_precision_loss)]
    {
        f.conns_per_s = args.conns as f64 / elapsed.as_secs_f64();
    }
    let started = Instant::now();
    let s = client.run_client(&ClientSpec::to(server.addr(ECHO_PORT)).conns(SERIAL).parallel(1).bytes(1))?;
    ensure!(s.all_ok(), "serial new-connections run had failures: {s:?}");
    #[allow(clippy::cast_precision_loss)]
    {
        f.first_byte_us = started.elapsed().as_secs_f64() * 1e6 / SERIAL as f64;
    }
    Ok(f)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn sockperf_value(out: &str, key: &str) -> Result<f64> {
    out.lines()
        .find_map(|l| {
            let rest = &l[l.find(key)? + key.len()..];
            rest.split_whitespace().next()?.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().ok()
        })
        .with_context(|| format!("sockperf output has no {key:?}:\n{out}"))
}

fn cpu_seconds(agent: &Agent) -> Result<f64> {
    pid_cpu_seconds(agent.pid().context("agent not running")?)
}

fn pid_cpu_seconds(pid: u32) -> Result<f64> {
    Ok(heddle_tests::procfs::cpu_seconds(pid)?)
}

fn peak_rss_mib(agent: &Agent) -> Result<f64> {
    pid_peak_rss_mib(agent.pid().context("agent not running")?)
}

fn pid_peak_rss_mib(pid: u32) -> Result<f64> {
    Ok(heddle_tests::procfs::status_mib(pid, "VmHWM")?)
}

impl Figures {
    /// The proxies' CPU seconds per 1,000 HTTP requests.
    #[allow(clippy::cast_precision_loss)]
    fn cpu_per_k(&self) -> f64 {
        self.http_cpu_s / (self.http_requests.max(1) as f64) * 1000.0
    }

    /// The proxies' CPU seconds per GB of the single-stream run.
    fn cpu_per_gb(&self) -> f64 {
        self.iperf_cpu_s / (self.iperf_bytes / 1e9).max(1e-9)
    }
}

fn report(args: &Args, d: &Figures, m: &Figures, rss: &[f64]) {
    let cpu_per_k = m.cpu_per_k();
    let ratio = |m: f64, d: f64| {
        if d > 0.0 {
            format!("{:.0}%", m / d * 100.0)
        } else {
            "-".into()
        }
    };
    let added = |m: f64, d: f64| format!("+{:.1} µs", m - d);
    println!();
    println!("Heddle benchmark: client on node-a, server on node-b, {} s per measurement", args.seconds);
    let mode = if args.no_mtls { "mesh (plain)" } else { "mesh (mTLS)" };
    println!("{:<44} {:>12} {:>12} {:>14}", "", "direct", mode, "mesh vs direct");
    println!(
        "{:<44} {:>12.2} {:>12.2} {:>14}",
        "single-stream throughput, Gbit/s (iperf3)",
        d.gbps,
        m.gbps,
        ratio(m.gbps, d.gbps)
    );
    println!(
        "{:<44} {:>12.2} {:>12.2} {:>14}",
        "8-stream throughput, Gbit/s (iperf3 -P 8)",
        d.gbps_8,
        m.gbps_8,
        ratio(m.gbps_8, d.gbps_8)
    );
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>14}",
        "1 KiB ping-pong one-way avg, µs (sockperf)",
        d.pp_avg_us,
        m.pp_avg_us,
        added(m.pp_avg_us, d.pp_avg_us)
    );
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>14}",
        "1 KiB ping-pong one-way p50, µs",
        d.pp_p50_us,
        m.pp_p50_us,
        added(m.pp_p50_us, d.pp_p50_us)
    );
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>14}",
        "1 KiB ping-pong one-way p99, µs",
        d.pp_p99_us,
        m.pp_p99_us,
        added(m.pp_p99_us, d.pp_p99_us)
    );
    println!(
        "{:<44} {:>12.1} {:>12.1} {:>14}",
        "1 KiB ping-pong one-way p99.9, µs",
        d.pp_p999_us,
        m.pp_p999_us,
        added(m.pp_p999_us, d.pp_p999_us)
    );
    for (i, p) in ["p50", "p90", "p99", "p99.9"].iter().enumerate() {
        let label = format!("HTTP 1 KiB at {}/s, latency {p}, µs", args.rate);
        println!("{:<44} {:>12.0} {:>12.0} {:>14}", label, d.http[i], m.http[i], ratio(m.http[i], d.http[i]));
    }
    println!("{:<44} {:>12} {:>12} {:>14}", "HTTP errors", d.http_errors, m.http_errors, "");
    println!(
        "{:<44} {:>12.0} {:>12.0} {:>14}",
        "new connections/s (connect, 1 B echo, close)",
        d.conns_per_s,
        m.conns_per_s,
        ratio(m.conns_per_s, d.conns_per_s)
    );
    println!(
        "{:<44} {:>12.0} {:>12.0} {:>14}",
        "new connection to first echoed byte, µs",
        d.first_byte_us,
        m.first_byte_us,
        added(m.first_byte_us, d.first_byte_us)
    );
    println!("{:<44} {:>12} {:>12.3} {:>14}", "agent CPU s per 1,000 HTTP requests (both)", "-", cpu_per_k, "");
    println!("{:<44} {:>12} {:>12.3} {:>14}", "agent CPU s per GB, 1 stream (both)", "-", m.cpu_per_gb(), "");
    let rss_s: Vec<String> = rss.iter().map(|r| format!("{r:.1}")).collect();
    println!("{:<44} {:>12} {:>12} {:>14}", "agent peak RSS, MiB (node-a, node-b)", "-", rss_s.join(" / "), "");
}
