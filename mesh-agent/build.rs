//! Builds the eBPF object (`mesh-ebpf`) with aya-build and the eBPF
//! toolchain, for `datapath.rs` to embed.
//!
//! Toolchain: `HEDDLE_EBPF_TOOLCHAIN` if set; else the rustup toolchain
//! `heddle-bpf` (Debian's rustc-web with std sources, linked by
//! `cargo xtask setup`) when it exists; else `nightly`. With `AYA_BUILD_SKIP=1`
//! the agent builds without eBPF (for editing) and refuses to run.
use std::process::Command;

use anyhow::{anyhow, Context as _};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    println!("cargo::rustc-check-cfg=cfg(heddle_no_ebpf)");
    println!("cargo:rerun-if-env-changed=HEDDLE_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!("cargo:rustc-cfg=heddle_no_ebpf");
        return Ok(());
    }
    let toolchain = std::env::var("HEDDLE_EBPF_TOOLCHAIN").unwrap_or_else(|_| {
        let linked = Command::new("rustup")
            .args(["toolchain", "list"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("heddle-bpf")));
        if linked { "heddle-bpf" } else { "nightly" }.to_owned()
    });
    if toolchain == "heddle-bpf" && std::env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // Debian's rustc is a stable compiler; -Z build-std needs this.
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "mesh-ebpf")
        .ok_or_else(|| anyhow!("mesh-ebpf package not found"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }],
        Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!(
            "building the eBPF programs with toolchain `{toolchain}` failed; run `cargo xtask setup` \
             (installs Debian's rustc-web + rust-web-src and bpf-linker), or set AYA_BUILD_SKIP=1 to \
             build without eBPF"
        )
    })
}
