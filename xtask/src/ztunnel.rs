//! `cargo xtask bench --vs-ztunnel[=PATH]`: builds Istio's ztunnel from
//! the source archive in PATH (`../shared/bench/ztunnel` by default), once,
//! following that directory's README, and returns the binary. The build
//! lives under `~/.cache/heddle-bench` (outside the workspace, which cargo
//! would otherwise claim it for); nothing of ztunnel enters the project.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

/// The archive in the source directory.
const ARCHIVE: &str = "ztunnel-62d8265.tar.gz";
/// The git bundle of the optional dependency cargo must resolve.
const BUNDLE: &str = "boring-rustls-provider.bundle";

/// The cached ztunnel binary, built first if missing.
pub fn binary(src: &Path) -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let work = home.join(".cache/heddle-bench");
    let tree = work.join("ztunnel");
    let bin = tree.join("out/rust/release/ztunnel");
    if bin.is_file() {
        return Ok(bin);
    }
    for f in [ARCHIVE, BUNDLE] {
        if !src.join(f).is_file() {
            bail!("--vs-ztunnel: {} has no {f} (see ../shared/bench/ztunnel/README.md)", src.display());
        }
    }
    std::fs::create_dir_all(&work).with_context(|| format!("mkdir {}", work.display()))?;
    if !tree.is_dir() {
        super::run(Command::new("tar").arg("xzf").arg(src.join(ARCHIVE)).arg("-C").arg(&work))?;
    }
    let bare = work.join("brp.git");
    if !bare.is_dir() {
        super::run(Command::new("git").args(["clone", "-q", "--bare"]).arg(src.join(BUNDLE)).arg(&bare))?;
    }
    eprintln!("xtask: building ztunnel (about 13 minutes on 2 cores, once) in {}", tree.display());
    super::run(
        Command::new("cargo")
            .current_dir(&tree)
            .args(["build", "--release", "--features", "testing"])
            .env("CARGO_NET_GIT_FETCH_WITH_CLI", "true")
            .env("GIT_CONFIG_COUNT", "2")
            .env("GIT_CONFIG_KEY_0", format!("url.file://{}.insteadOf", bare.display()))
            .env("GIT_CONFIG_VALUE_0", "https://github.com/janrueth/boring-rustls-provider")
            .env("GIT_CONFIG_KEY_1", "safe.directory")
            .env("GIT_CONFIG_VALUE_1", "*"),
    )
    .context("building ztunnel failed")?;
    if !bin.is_file() {
        bail!("ztunnel's build finished without {}", bin.display());
    }
    Ok(bin)
}
