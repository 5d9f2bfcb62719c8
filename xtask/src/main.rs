//! `cargo xtask`: set-up, build, demo and tests for Heddle.
//!
//! * `setup` installs what building the eBPF programs needs, idempotently:
//!   Debian's `rustc-web`/`rust-web-src` (rustc with std sources, linked as
//!   the rustup toolchain `heddle-bpf`) unless a nightly with `rust-src` is
//!   present, `bpf-linker` built against Debian's LLVM 22, and the tools the
//!   test bed drives (iproute2, curl, python3). `demo` and `test` run it
//!   first, so a fresh machine needs nothing else.
//! * `build` builds the agent (with its embedded eBPF object), the CLI and
//!   the test bed binaries.
//! * `demo` runs the two-node, four-pod demo from the local configuration;
//!   `demo bookinfo` runs Istio's Bookinfo walkthrough on Heddle.
//! * `bench` compares direct and meshed connections in the test bed
//!   (throughput with iperf3, ping-pong latency with sockperf, HTTP latency
//!   at a fixed rate, new connections per second, agent CPU and memory).
//! * `fuzz` runs the libFuzzer harnesses of `mesh-agent/fuzz/` for a bounded
//!   time each (cargo-fuzz on nightly) and reports inputs tried and crashes.
//! * `manifests` regenerates the generated Kubernetes manifests of
//!   `daemonset/` (the CRD, from the policy types); `--check` fails on drift.
//! * `test` runs every test: unit tests, the eBPF build, and the
//!   network-namespace end-to-end tests (root required; under `CI=true` they
//!   fail rather than skip when they cannot run).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

mod fuzz;
mod manifests;
mod ztunnel;

/// Debian packages the build and the test bed need.
const DEBIAN_PACKAGES: &[&str] = &[
    // eBPF toolchain: rustc 1.96 with std sources (for -Z build-std=core).
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    // bpf-linker's build needs LLVM 22.
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    // Test bed and demo: namespaces, real clients, wire captures.
    "iproute2",
    "curl",
    "python3",
    "tcpdump",
    "nghttp2-server",
    // Waypoint tests: an HTTP/2 client (nghttp) and load generator (h2load).
    "nghttp2-client",
    "openssl",
    // The Bookinfo walkthrough renders `heddle graph -o dot` to SVG.
    "graphviz",
];
/// Python packages the tests use: a real gRPC client and server (waypoint
/// tests), OTLP's protobuf messages for the trace receiver, and
/// python-hyper's HTTP/2 stack for the hostile-client test's raw frames.
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("grpc", "grpcio"),
    ("opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc", "opentelemetry-proto"),
    ("h2", "h2"),
];
/// Real clients the benchmark drives (only `cargo xtask bench` installs them).
const BENCH_PACKAGES: &[&str] = &["iperf3", "sockperf"];
/// What `bench --vs-ztunnel` needs: ztunnel's build (protoc) and its capture (iptables).
const ZTUNNEL_PACKAGES: &[&str] = &["protobuf-compiler", "iptables"];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LINKED_TOOLCHAIN: &str = "heddle-bpf";

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Heddle build, set-up, demo and test orchestration")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DemoName {
    /// Productpage, details, reviews v1/v2/v3 and ratings: mTLS, traffic
    /// shifting, faults, a DENY policy, stat, graph and a trace.
    Bookinfo,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain and test tools (idempotent).
    Setup,
    /// Build the agent, CLI and test bed binaries.
    Build {
        /// Optimised build.
        #[arg(long)]
        release: bool,
    },
    /// Run the demo: two nodes, four pods, two agents, traffic, a report.
    /// `demo bookinfo`: Istio's Bookinfo walkthrough on Heddle.
    Demo {
        /// Which demo (the L4 + waypoint tour when omitted).
        #[arg(value_enum)]
        which: Option<DemoName>,
    },
    /// Benchmark direct vs meshed connections in the test bed (release build).
    Bench {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Also measure Istio's ztunnel in the same run, built (once, cached
        /// under ~/.cache/heddle-bench) from the source in PATH.
        #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "../shared/bench/ztunnel")]
        vs_ztunnel: Option<PathBuf>,
        /// More arguments for the bench binary (`-- --only-waypoint`, `-- --help`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The churn soak (release build): minutes of new connections, long
    /// streams, enrollment and policy changes; resources over time.
    Soak {
        /// More arguments for the soak binary (`-- --minutes 2`, `-- --help`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Fuzz every parser fed from outside (cargo-fuzz, nightly): inputs tried,
    /// corpus kept and crashes, per target.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (all when omitted).
        targets: Vec<String>,
    },
    /// Regenerate daemonset/'s generated manifests (the CRD) from the Rust types.
    Manifests {
        /// Change nothing; fail if a generated manifest is out of date.
        #[arg(long)]
        check: bool,
    },
    /// Run all tests (unit, eBPF build, network-namespace end-to-end).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Cmd::Setup => {
            setup()?;
        }
        Cmd::Build { release } => {
            let tc = setup()?;
            build(&root, &tc, release)?;
        }
        Cmd::Demo { which } => {
            let tc = setup()?;
            build(&root, &tc, false)?;
            let bin = root.join("target/debug");
            let mut cmd = match which {
                None => Command::new(bin.join("demo")),
                Some(DemoName::Bookinfo) => {
                    let mut cmd = Command::new(bin.join("bookinfo"));
                    cmd.arg("--out").arg(root.join("target/bookinfo"));
                    cmd
                }
            };
            run(cmd.env("HEDDLE_AGENT_BIN", bin.join("mesh-agent")))?;
        }
        Cmd::Bench { seconds, vs_ztunnel, args } => {
            let tc = setup()?;
            let mut wanted: Vec<&str> = BENCH_PACKAGES.to_vec();
            if vs_ztunnel.is_some() {
                wanted.extend(ZTUNNEL_PACKAGES);
            }
            let missing: Vec<&str> = wanted.into_iter().filter(|p| !dpkg_installed(p)).collect();
            if !missing.is_empty() {
                install_debian(&missing)?;
            }
            let ztunnel = vs_ztunnel.map(|src| ztunnel::binary(&root.join(src))).transpose()?;
            build(&root, &tc, true)?;
            let bin = root.join("target/release");
            let mut cmd = Command::new(bin.join("bench"));
            cmd.arg("--seconds").arg(seconds.to_string());
            if let Some(z) = ztunnel {
                cmd.arg("--ztunnel").arg(z);
            }
            run(cmd.args(&args).env("HEDDLE_AGENT_BIN", bin.join("mesh-agent")))?;
        }
        Cmd::Soak { args } => {
            let tc = setup()?;
            build(&root, &tc, true)?;
            let bin = root.join("target/release");
            run(Command::new(bin.join("soak")).args(&args).env("HEDDLE_AGENT_BIN", bin.join("mesh-agent")))?;
        }
        Cmd::Fuzz { seconds, targets } => {
            let all = fuzz::targets(&root)?;
            let unknown: Vec<&String> = targets.iter().filter(|t| !all.contains(t)).collect();
            if !unknown.is_empty() {
                bail!("unknown fuzz targets {unknown:?}; the targets are {all:?}");
            }
            fuzz::run(&root, seconds, if targets.is_empty() { all } else { targets })?;
        }
        Cmd::Manifests { check } => {
            let tc = setup()?;
            manifests::run(&root, || cargo(&tc), check)?;
        }
        Cmd::Test { args } => {
            let tc = setup()?;
            build(&root, &tc, false)?;
            let mut cmd = cargo(&tc);
            cmd.args(["test", "--workspace", "--exclude", "mesh-ebpf"])
                .args(&args)
                .env("HEDDLE_AGENT_BIN", root.join("target/debug/mesh-agent"));
            run(&mut cmd)?;
        }
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

/// The eBPF toolchain chosen by [`setup`].
struct Toolchain(String);

fn cargo(tc: &Toolchain) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.env("HEDDLE_EBPF_TOOLCHAIN", &tc.0);
    cmd
}

fn build(root: &Path, tc: &Toolchain, release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo(tc);
    cmd.current_dir(root).args(["build", "--package", "mesh-agent", "--package", "heddle-tests", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {}", cmd.get_program().display()))?;
    if !status.success() {
        bail!("{} failed ({status})", cmd.get_program().display());
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes sure everything is installed; returns the eBPF toolchain to use.
fn setup() -> anyhow::Result<Toolchain> {
    let nightly_has_src =
        output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))
            .is_some_and(|s| s.lines().any(|l| l.starts_with("rust-src")));
    let forced = std::env::var("HEDDLE_EBPF_TOOLCHAIN").ok();
    let use_debian = forced.as_deref().map_or(!nightly_has_src, |t| t == LINKED_TOOLCHAIN);

    let mut wanted: Vec<&str> = DEBIAN_PACKAGES.to_vec();
    if !use_debian {
        wanted.retain(|p| !p.contains("-web"));
    }
    let linker_ok = output(Command::new("bpf-linker").arg("--version")).is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if linker_ok {
        // Only bpf-linker's build needs the -dev packages.
        wanted.retain(|p| !p.ends_with("-dev"));
    }
    let missing: Vec<&str> = wanted.into_iter().filter(|p| !dpkg_installed(p)).collect();
    if !missing.is_empty() {
        install_debian(&missing)?;
    }
    if use_debian {
        let linked = output(Command::new("rustup").args(["toolchain", "list"]))
            .is_some_and(|s| s.lines().any(|l| l.starts_with(LINKED_TOOLCHAIN)));
        if !linked {
            eprintln!("xtask: linking Debian's rustc as rustup toolchain `{LINKED_TOOLCHAIN}`");
            run(Command::new("rustup").args(["toolchain", "link", LINKED_TOOLCHAIN, "/usr"]))
                .context("rustup toolchain link failed")?;
        }
    }
    if !linker_ok {
        eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)");
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
        .context("installing bpf-linker failed")?;
    }
    install_python()?;
    let tc = forced.unwrap_or_else(|| if use_debian { LINKED_TOOLCHAIN } else { "nightly" }.into());
    Ok(Toolchain(tc))
}

/// Installs the [`PYTHON_PACKAGES`] whose module does not import (`PyPI`).
fn install_python() -> anyhow::Result<()> {
    for (module, package) in PYTHON_PACKAGES {
        let present = Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if present {
            continue;
        }
        eprintln!("xtask: installing Python package {package} (PyPI)");
        run(Command::new("python3").args(["-m", "pip", "install", "--quiet", package]))
            .with_context(|| format!("pip install {package} failed"))?;
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn install_debian(pkgs: &[&str]) -> anyhow::Result<()> {
    let root = output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0");
    if !root {
        bail!(
            "missing Debian packages: {}. Install them as root: `sudo apt-get install -y {}` \
             (or run `sudo cargo xtask setup`)",
            pkgs.join(" "),
            pkgs.join(" ")
        );
    }
    eprintln!("xtask: installing Debian packages: {}", pkgs.join(" "));
    let apt = |args: &[&str]| {
        Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").status().is_ok_and(|s| s.success())
    };
    // rustc-web 1.96 and LLVM 22 come from bookworm-security: refresh the
    // package lists first so a stale cache does not pick older versions.
    if !apt(&["update", "-q"]) {
        eprintln!("xtask: apt-get update failed; trying with the cached lists");
    }
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend_from_slice(pkgs);
    if !apt(&args) {
        bail!("apt-get install {} failed", pkgs.join(" "));
    }
    Ok(())
}
