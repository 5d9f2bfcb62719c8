//! `bookinfo`: Istio's Bookinfo walkthrough on Heddle, explained
//! (`cargo xtask demo bookinfo`).
//!
//! Starts Bookinfo in the test bed ([`heddle_tests::bookinfo`]: productpage,
//! details and ratings in Python, reviews v1/v2/v3 in Rust, a waypoint for
//! namespace `default`, two nodes, the mesh CA) and runs the five steps of
//! [`heddle_tests::bookinfo::walkthrough`], printing what each did and saw
//! and judging it: mTLS between all services, traffic shifting (all to v1,
//! a 90/10 canary measured, jason to v3), a delay and an abort injected, a
//! DENY policy with its flow record, and `heddle stat`, `heddle graph` (an
//! SVG written to `--out`) and one trace across every service.
//!
//! Everything is removed at the end, on error, on panic and on
//! Ctrl-C/SIGTERM. Exits 1 if the environment cannot run it or if a step
//! did not behave as expected (marked UNEXPECTED).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Mutex, PoisonError};

use anyhow::Result;
use clap::Parser;
use heddle_tests::bookinfo::{walkthrough, Bookinfo};
use heddle_tests::check_environment;

static TEARDOWN: heddle_tests::teardown::InterruptSlot = Mutex::new(None);

#[derive(Parser)]
#[command(about = "Istio's Bookinfo walkthrough on Heddle, in the test bed")]
struct Cli {
    /// Where to write the service graph (`bookinfo-graph.dot`, `.svg`).
    #[arg(long, default_value = "target/bookinfo")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = check_environment() {
        eprintln!("bookinfo: cannot run here: {e}");
        eprintln!(
            "bookinfo: run it as root on Linux with cgroup v2 and iproute2 (`sudo -E cargo xtask demo bookinfo`)"
        );
        return ExitCode::FAILURE;
    }
    if let Err(e) = heddle_tests::teardown::on_interrupt(&TEARDOWN, "bookinfo") {
        eprintln!("bookinfo: cannot install signal handling: {e}");
        return ExitCode::FAILURE;
    }
    match run(&cli) {
        Ok(true) => {
            println!("\nAll five steps behaved as expected.");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            eprintln!("bookinfo: some steps did not behave as expected (marked UNEXPECTED above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bookinfo failed: {e:?}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<bool> {
    println!("Starting Bookinfo: two nodes, the mesh CA, two agents, a waypoint, six services in Python and Rust…");
    let b = Bookinfo::start("bookinfo", &cli.out)?;
    *TEARDOWN.lock().unwrap_or_else(PoisonError::into_inner) = Some(b.tb.teardown_handle());
    println!(
        "  productpage-v1, details-v1 and curl on node-a; reviews-v1/v2/v3, ratings-v1 and the waypoint on node-b\n  \
         namespace default uses waypoint default/waypoint (identity {}); spans go to an OTLP receiver in its pod",
        b.waypoint.pod.spiffe_id()
    );
    let mut ok = true;
    for step in walkthrough::STEPS {
        match step(&b) {
            Ok(s) => {
                print!("{s}");
                ok &= s.ok();
            }
            Err(e) => {
                println!("  [UNEXPECTED] the step failed: {e}");
                eprintln!("{}", b.logs());
                return Ok(false);
            }
        }
    }
    if !ok {
        eprintln!("{}", b.logs());
    }
    Ok(ok)
}
