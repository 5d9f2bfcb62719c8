//! Istio's ztunnel in the bench (`cargo xtask bench --vs-ztunnel`): the
//! peer Heddle is compared with, in the same bed and the same run.
//!
//! As `../shared/bench/ztunnel/README.md` runs it without Kubernetes or
//! istiod: dedicated mode (`PROXY_MODE=dedicated`), one ztunnel in the
//! client's network namespace and one in the server's, each serving its
//! own workload (`PROXY_WORKLOAD_INFO`), certificates from its built-in
//! fake CA (`FAKE_CA=true`, the `testing` feature), workloads from a local
//! file (`LOCAL_XDS_PATH`, both pods with `protocol: HBONE`). ztunnel does
//! not capture by itself: one iptables rule in the client's namespace
//! redirects its outbound TCP to ztunnel's 15001 (ztunnel's own sockets
//! carry mark 0x539 and are skipped). The client's ztunnel then opens HBONE
//! (HTTP/2 CONNECT in mTLS) to the server's ztunnel on 15008, which
//! connects to the server. Nothing of ztunnel is in the project; the
//! binary is built by xtask from the source beside it. `ZTUNNEL_LOG` sets
//! ztunnel's `RUST_LOG` (default `info`, which logs each connection; the
//! bench counts those lines to prove the traffic went through ztunnel).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use heddle_tests::{ClientSpec, Pod, Process, Testbed};

use super::{pid_cpu_seconds, pid_peak_rss_mib, Args, Figures, ECHO_PORT};

/// The two ztunnels.
pub struct Ztunnels {
    procs: Vec<Process>,
}

/// The iptables rule of the client's namespace: the README's recipe, plus
/// `! --dport 15008`, because here ztunnel's own HBONE connections do not
/// carry the 0x539 mark and would otherwise be redirected back into it.
const REDIRECT: &str =
    "-t nat -A OUTPUT -p tcp ! --dport 15008 ! -d 127.0.0.1 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001";

impl Ztunnels {
    /// Starts both, installs the redirect and checks one echo goes through.
    pub fn start(bin: &Path, tb: &Testbed, client: &Pod, server: &Pod) -> Result<Self> {
        let workloads = tb.temp_dir().join("ztunnel-workloads.yaml");
        let entry = |p: &Pod, node: &str| {
            format!(
                "- uid: bench//v1/Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {sa}\n  \
                 workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  trustDomain: cluster.local\n  node: {node}\n  network: \"\"\n  services: {{}}\n",
                ns = p.namespace(),
                name = p.name(),
                sa = p.service_account(),
                ip = p.ip()
            )
        };
        let yaml = format!("workloads:\n{}{}", entry(client, "node-a"), entry(server, "node-b"));
        std::fs::write(&workloads, yaml).context("writing ztunnel's workloads file")?;
        let mut procs = Vec::new();
        for pod in [client, server] {
            let mut cmd = Command::new(bin);
            cmd.env("PROXY_MODE", "dedicated")
                .env("PROXY_WORKLOAD_INFO", format!("{}/{}/{}", pod.namespace(), pod.name(), pod.service_account()))
                .env("FAKE_CA", "true")
                .env("XDS_ADDRESS", "")
                .env("LOCAL_XDS_PATH", &workloads)
                // The test bed's pods have no IPv6: bind 0.0.0.0, not [::].
                .env("IPV6_ENABLED", "false")
                // Connect to the server from ztunnel's own address: keeping
                // the client's (IP_TRANSPARENT) needs policy routing the
                // bed does not set up.
                .env("ENABLE_ORIG_SRC", "false")
                .env("RUST_LOG", std::env::var("ZTUNNEL_LOG").unwrap_or_else(|_| "info".into()));
            procs.push(pod.spawn(cmd)?);
        }
        for (pod, port, p) in [(client, 15001, &procs[0]), (server, 15008, &procs[1])] {
            pod.wait_listening(port, Duration::from_secs(20))
                .with_context(|| format!("ztunnel in {} did not listen on {port}:\n{}", pod.name(), p.log_text()))?;
        }
        let mut rule = Command::new("iptables");
        rule.args(REDIRECT.split(' '));
        let out = client.run(rule)?;
        ensure!(
            out.status.success(),
            "iptables REDIRECT in the client's namespace: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let z = Self { procs };
        let warm = client.run_client(&ClientSpec::to(server.addr(ECHO_PORT)))?;
        let events = |p: &Process| -> String {
            let log = p.log_text();
            let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("20")).collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        ensure!(
            warm.all_ok(),
            "warm-up connection through ztunnel failed: {warm:?}\nclient's ztunnel:\n{}\nserver's ztunnel:\n{}",
            events(&z.procs[0]),
            events(&z.procs[1])
        );
        ensure!(
            z.procs[1].log_text().contains("connection complete")
                || z.procs[0].log_text().contains("connection complete"),
            "ztunnel logged no connection: the benchmark would not measure it\n{}",
            z.procs[0].log_text()
        );
        Ok(z)
    }

    /// Both ztunnels' CPU seconds so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        self.procs.iter().map(|p| pid_cpu_seconds(p.pid())).sum()
    }

    /// Each one's peak RSS (client side, server side).
    pub fn peak_rss_mib(&self) -> Result<Vec<f64>> {
        self.procs.iter().map(|p| pid_peak_rss_mib(p.pid())).collect()
    }

    /// Checks the traffic went through ztunnel's HBONE, removes the
    /// redirect and stops both.
    pub fn stop(mut self, client: &Pod) -> Result<()> {
        let server_log = self.procs[1].log_text();
        ensure!(
            server_log.matches("connection complete").count() > 100,
            "the server's ztunnel saw too few connections: the measurements did not go through it"
        );
        let mut flush = Command::new("iptables");
        flush.args(["-t", "nat", "-F", "OUTPUT"]);
        let out = client.run(flush)?;
        ensure!(out.status.success(), "iptables -F: {}", String::from_utf8_lossy(&out.stderr));
        for p in &mut self.procs {
            p.stop(Duration::from_secs(3))?;
        }
        Ok(())
    }
}

/// The three-way table: direct, Heddle, ztunnel; each mesh's ratio to
/// direct and Heddle over ztunnel (for latencies, the added µs).
pub fn report(args: &Args, d: &Figures, h: &Figures, h_rss: &[f64], z: &Figures, z_rss: &[f64]) {
    let pct = |m: f64, d: f64| if d > 0.0 { format!("{:.0}%", m / d * 100.0) } else { "-".into() };
    let x = |a: f64, b: f64| if b > 0.0 { format!("{:.2}x", a / b) } else { "-".into() };
    println!();
    println!("Heddle vs ztunnel, same bed, same run ({} s per measurement; mTLS HBONE both)", args.seconds);
    println!(
        "{:<42} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "", "direct", "heddle", "ztunnel", "h/direct", "z/direct", "h/z"
    );
    let row = |label: &str, dv: f64, hv: f64, zv: f64, prec: usize| {
        println!(
            "{label:<42} {dv:>9.prec$} {hv:>9.prec$} {zv:>9.prec$} {:>9} {:>9} {:>9}",
            pct(hv, dv),
            pct(zv, dv),
            x(hv, zv)
        );
    };
    row("iperf3 1 stream, Gbit/s", d.gbps, h.gbps, z.gbps, 2);
    row("iperf3 8 streams, Gbit/s", d.gbps_8, h.gbps_8, z.gbps_8, 2);
    let added = |label: &str, dv: f64, hv: f64, zv: f64| {
        println!(
            "{label:<42} {dv:>9.1} {hv:>9.1} {zv:>9.1} {:>9} {:>9} {:>9}",
            format!("{:+.1}", hv - dv),
            format!("{:+.1}", zv - dv),
            x(hv - dv, zv - dv)
        );
    };
    added("1 KiB ping-pong one-way p50, µs (added)", d.pp_p50_us, h.pp_p50_us, z.pp_p50_us);
    added("1 KiB ping-pong one-way p99, µs (added)", d.pp_p99_us, h.pp_p99_us, z.pp_p99_us);
    added("1 KiB ping-pong one-way p99.9, µs (added)", d.pp_p999_us, h.pp_p999_us, z.pp_p999_us);
    for (i, p) in ["p50", "p90", "p99", "p99.9"].iter().enumerate() {
        added(&format!("HTTP 1 KiB at {}/s {p}, µs (added)", args.rate), d.http[i], h.http[i], z.http[i]);
    }
    println!("{:<42} {:>9} {:>9} {:>9}", "HTTP errors", d.http_errors, h.http_errors, z.http_errors);
    row("new connections/s", d.conns_per_s, h.conns_per_s, z.conns_per_s, 0);
    added("new connection to first byte, µs (added)", d.first_byte_us, h.first_byte_us, z.first_byte_us);
    let cpu = |label: &str, hv: f64, zv: f64| {
        println!("{label:<42} {:>9} {hv:>9.3} {zv:>9.3} {:>9} {:>9} {:>9}", "-", "", "", x(hv, zv));
    };
    cpu("proxy CPU s per 1,000 HTTP requests (both)", h.cpu_per_k(), z.cpu_per_k());
    cpu("proxy CPU s per GB, 1 stream (both)", h.cpu_per_gb(), z.cpu_per_gb());
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    cpu("peak RSS of one proxy, MiB (largest)", max(h_rss), max(z_rss));
}
