//! `cargo xtask fuzz`: runs the libFuzzer harnesses of `mesh-agent/fuzz/`
//! (cargo-fuzz, nightly, `AddressSanitizer`) for a bounded time each, and
//! prints per target the inputs tried, the corpus kept and what crashed.
//! cargo-fuzz is installed from crates.io when missing. New corpus entries
//! are minimised back into `mesh-agent/fuzz/corpus/<target>/` (`cmin`); a
//! crashing input is copied to `mesh-agent/fuzz/regressions/<target>/`,
//! which the stable test run replays, and fails the command.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

/// The harnesses: the `[[bin]]` names of `mesh-agent/fuzz/Cargo.toml`.
pub fn targets(root: &Path) -> anyhow::Result<Vec<String>> {
    let manifest = root.join("mesh-agent/fuzz/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "mesh-agent-fuzz")
        .map(str::to_owned)
        .collect())
}

/// One target's run.
struct Outcome {
    target: String,
    runs: u64,
    corpus: usize,
    crash: Option<String>,
}

fn cargo_fuzz(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args(["+nightly", "fuzz"])
        // The harnesses need no eBPF object.
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

fn common_args(cmd: &mut Command) -> &mut Command {
    cmd.args(["-O", "-a", "--fuzz-dir", "mesh-agent/fuzz", "--target-dir", "target/fuzz"])
}

fn ensure_cargo_fuzz(root: &Path) -> anyhow::Result<()> {
    let present = cargo_fuzz(root).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if present.is_ok_and(|s| s.success()) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (crates.io)");
    super::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

fn files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect()).unwrap_or_default()
}

/// Runs `targets` for `seconds` each.
pub fn run(root: &Path, seconds: u64, targets: Vec<String>) -> anyhow::Result<()> {
    ensure_cargo_fuzz(root)?;
    super::run(common_args(cargo_fuzz(root).arg("build")))?;
    let fuzz = root.join("mesh-agent/fuzz");
    let mut outcomes = Vec::new();
    for target in targets {
        let artifacts = fuzz.join("artifacts").join(&target);
        let before: Vec<_> = files_in(&artifacts);
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let out = common_args(cargo_fuzz(root).args(["run", &target]))
            // An input that takes 20 s is a hang (the serving targets give
            // up after 10 s themselves).
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-timeout=20",
                "-print_final_stats=1",
                "-rss_limit_mb=4096",
            ])
            .stdout(Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run cargo fuzz for {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let runs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        // libFuzzer's findings (`slow-unit-*` files are only slow inputs).
        let finding = |p: &std::path::PathBuf| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            ["crash-", "timeout-", "oom-", "leak-"].iter().any(|k| name.starts_with(k))
        };
        let crash = files_in(&artifacts).into_iter().find(|p| !before.contains(p) && finding(p));
        if let Some(c) = &crash {
            let keep = fuzz.join("regressions").join(&target);
            std::fs::create_dir_all(&keep)?;
            std::fs::copy(c, keep.join(c.file_name().expect("an artifact file")))?;
        } else if !out.status.success() {
            bail!("cargo fuzz run {target} failed ({}) without an artifact:\n{log}", out.status);
        }
        // Keep the corpus minimal: only inputs that add coverage.
        super::run(common_args(cargo_fuzz(root).args(["cmin", &target])).stdout(Stdio::null()).stderr(Stdio::null()))?;
        let corpus = files_in(&fuzz.join("corpus").join(&target)).len();
        outcomes.push(Outcome { target, runs, corpus, crash: crash.map(|c| c.display().to_string()) });
    }
    println!("\n{:<16} {:>12} {:>8}  crash", "target", "inputs", "corpus");
    for o in &outcomes {
        println!("{:<16} {:>12} {:>8}  {}", o.target, o.runs, o.corpus, o.crash.as_deref().unwrap_or("none"));
    }
    let crashed: Vec<_> = outcomes.iter().filter(|o| o.crash.is_some()).map(|o| o.target.as_str()).collect();
    if !crashed.is_empty() {
        bail!("crashes found in {crashed:?}: each input is now in mesh-agent/fuzz/regressions/ (fix, then keep it)");
    }
    Ok(())
}
