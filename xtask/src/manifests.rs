//! `cargo xtask manifests [--check]`: the generated files of `daemonset/`.
//!
//! Today those are the CRDs of Heddle's own kinds, which `mesh-agent crd`
//! generates from the types that read them: `AuthorizationPolicy`
//! (`mesh-agent/src/policy/model.rs`), `HTTPLocalRateLimitPolicy`
//! (`mesh-agent/src/waypoint/routes/rate_limits.rs`) and
//! `RetryBudgetPolicy` (`.../retry_budgets.rs`). Without `--check` the file is
//! rewritten; with it nothing is written and a difference is an error (the
//! same comparison runs in CI as `tests/tests/manifests.rs`).

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context as _};

/// A file of `daemonset/` and the `mesh-agent` arguments that print it.
struct Generated {
    path: &'static str,
    args: &'static [&'static str],
}

const GENERATED: &[Generated] = &[
    Generated { path: "daemonset/crds/authorizationpolicies.heddle.dev.yaml", args: &["crd"] },
    Generated {
        path: "daemonset/crds/httplocalratelimitpolicies.heddle.dev.yaml",
        args: &["crd", "httplocalratelimitpolicies"],
    },
    Generated { path: "daemonset/crds/retrybudgetpolicies.heddle.dev.yaml", args: &["crd", "retrybudgetpolicies"] },
];

/// Regenerates (or, with `check`, compares) every generated manifest.
/// `cargo` is a `cargo` command with the eBPF toolchain set.
pub fn run(root: &Path, mut cargo: impl FnMut() -> Command, check: bool) -> anyhow::Result<()> {
    let mut stale = Vec::new();
    for file in GENERATED {
        let out = cargo()
            .current_dir(root)
            .args(["run", "--quiet", "--package", "mesh-agent", "--bin", "mesh-agent", "--"])
            .args(file.args)
            .output()
            .context("cannot run cargo")?;
        if !out.status.success() {
            bail!(
                "`mesh-agent {}` failed ({}):\n{}",
                file.args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let wanted = String::from_utf8(out.stdout).context("mesh-agent printed non-UTF-8")?;
        let path = root.join(file.path);
        let current = fs::read_to_string(&path).unwrap_or_default();
        if current == wanted {
            eprintln!("xtask: {} is up to date", file.path);
        } else if check {
            stale.push(file.path);
        } else {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            fs::write(&path, wanted).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("xtask: wrote {}", file.path);
        }
    }
    if !stale.is_empty() {
        bail!(
            "out of date: {} (generated from the Rust types): run `cargo xtask manifests` and commit the result",
            stale.join(", ")
        );
    }
    Ok(())
}
