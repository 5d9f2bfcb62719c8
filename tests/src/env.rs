//! What the test bed needs from the machine, and where its binaries are.
//!
//! [`check_environment`] says whether namespaced tests can run here (root,
//! `ip netns`, cgroup v2); [`ensure_bpffs`] mounts the BPF file system once,
//! under a file lock so parallel test processes never stack two mounts;
//! [`agent_binary`] and [`pod_app_binary`] locate the programs launched
//! into nodes and pods. [`require_tool`] finds a tool some tests need
//! beyond the basics (tcpdump, nghttpd, openssl) and installs its Debian
//! package if it is absent; [`find_tool`] only looks.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cgroup::CGROUP_ROOT;
use crate::error::{Result, TestbedError};
use crate::exec::run_checked;

/// Where the BPF file system is (or gets) mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Environment variable overriding the agent binary.
pub const AGENT_BIN_ENV: &str = "HEDDLE_AGENT_BIN";
/// Environment variable overriding the pod test application binary.
pub const POD_APP_BIN_ENV: &str = "HEDDLE_POD_APP_BIN";

/// A program some tests run, and the Debian package that ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// The executable's name.
    pub binary: &'static str,
    /// The Debian package to install for it.
    pub package: &'static str,
}

/// Packet capture on the link between nodes.
pub const TCPDUMP: Tool = Tool { binary: "tcpdump", package: "tcpdump" };
/// A real HTTP/2 server (`nghttpd --no-tls` serves h2c).
pub const NGHTTPD: Tool = Tool { binary: "nghttpd", package: "nghttp2-server" };
/// An HTTP/2 client (h2c with prior knowledge) and load generator.
pub const NGHTTP: Tool = Tool { binary: "nghttp", package: "nghttp2-client" };
/// An HTTP/1.1 and HTTP/2 load generator (concurrent clients).
pub const H2LOAD: Tool = Tool { binary: "h2load", package: "nghttp2-client" };
/// A TLS toolkit: certificates and a TLS client.
pub const OPENSSL: Tool = Tool { binary: "openssl", package: "openssl" };
/// libfaketime's wrapper (and the library it preloads, [`LIBFAKETIME`]).
pub const FAKETIME: Tool = Tool { binary: "faketime", package: "faketime" };
/// The library that shifts a process's wall clock (`FAKETIME=-240`).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The path of `tool`'s executable, searched in `PATH` and the usual
/// system directories; `None` if it is not installed.
#[must_use]
pub fn find_tool(tool: Tool) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool.binary))
        .find(|p| p.is_file())
}

/// [`find_tool`], installing the tool's Debian package with `apt-get` first
/// if it is absent (once per machine: parallel tests wait on a lock, and the
/// package lists are refreshed only if the first attempt fails). Fails with
/// the package's name if the tool still cannot be found.
pub fn require_tool(tool: Tool) -> Result<PathBuf> {
    if let Some(path) = find_tool(tool) {
        return Ok(path);
    }
    let lock_path = "/run/heddle-test-apt.lock";
    let lock = File::create(lock_path).map_err(|e| TestbedError::io(format!("create {lock_path}"), e))?;
    // SAFETY: flock(2) on a valid fd; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(TestbedError::io(format!("lock {lock_path}"), std::io::Error::last_os_error()));
    }
    if let Some(path) = find_tool(tool) {
        return Ok(path);
    }
    eprintln!("testbed: {} is missing; installing the Debian package `{}`", tool.binary, tool.package);
    let install = || {
        run_checked(
            "env",
            [
                "DEBIAN_FRONTEND=noninteractive",
                "apt-get",
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                tool.package,
            ],
        )
    };
    let detail = match install() {
        Ok(_) => String::new(),
        Err(first) => {
            eprintln!("testbed: {first}; refreshing the package lists and retrying");
            match run_checked("apt-get", ["update", "-q"]).and_then(|_| install()) {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            }
        }
    };
    drop(lock);
    find_tool(tool).ok_or(TestbedError::MissingTool { binary: tool.binary, package: tool.package, detail })
}

/// Checks that this process can build a test bed: running as root, `ip netns`
/// usable, cgroup v2 mounted at [`CGROUP_ROOT`] with `cgroup.kill` support.
/// The error says what is missing.
pub fn check_environment() -> Result<()> {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(TestbedError::Environment(format!(
            "needs root (network namespaces, cgroups, eBPF); running as uid {euid}"
        )));
    }
    let ip_ok = Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ip_ok {
        return Err(TestbedError::Environment("`ip netns list` does not work (is iproute2 installed?)".into()));
    }
    if !Path::new(CGROUP_ROOT).join("cgroup.procs").exists() {
        return Err(TestbedError::Environment(format!("cgroup v2 is not mounted at {CGROUP_ROOT}")));
    }
    Ok(())
}

/// Mounts bpffs at [`BPFFS`] unless one is already mounted there.
pub(crate) fn ensure_bpffs() -> Result<()> {
    let lock_path = "/run/heddle-test-bpffs.lock";
    let lock = File::create(lock_path).map_err(|e| TestbedError::io(format!("create {lock_path}"), e))?;
    // SAFETY: flock(2) on a valid fd; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(TestbedError::io(format!("lock {lock_path}"), std::io::Error::last_os_error()));
    }
    let mounts = fs::read_to_string("/proc/self/mounts").map_err(|e| TestbedError::io("read /proc/self/mounts", e))?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, kind) = (f.next(), f.next(), f.next());
        dir == Some(BPFFS) && kind == Some("bpf")
    });
    if !mounted {
        run_checked("mount", ["-t", "bpf", "bpf", BPFFS])?;
    }
    drop(lock);
    Ok(())
}

/// The workspace root: the parent of this crate's manifest directory.
/// A file of `tests/assets/` (the test bed's scripts: HTTP and gRPC clients).
#[must_use]
pub fn asset(name: &str) -> PathBuf {
    workspace_root().join("tests/assets").join(name)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The agent binary: `$HEDDLE_AGENT_BIN`, else `<workspace>/target/debug/mesh-agent`.
pub fn agent_binary() -> Result<PathBuf> {
    let path =
        std::env::var_os(AGENT_BIN_ENV).map_or_else(|| workspace_root().join("target/debug/mesh-agent"), PathBuf::from);
    if path.is_file() {
        Ok(path)
    } else {
        Err(TestbedError::MissingBinary {
            what: "mesh-agent",
            path,
            hint: "build it with `cargo xtask build` (or set HEDDLE_AGENT_BIN)",
        })
    }
}

/// The `heddle` CLI, built next to the agent binary.
pub fn heddle_binary() -> Result<PathBuf> {
    let path = agent_binary()?.with_file_name("heddle");
    if path.is_file() {
        Ok(path)
    } else {
        Err(TestbedError::MissingBinary { what: "heddle", path, hint: "build it with `cargo xtask build`" })
    }
}

/// The pod test application: `$HEDDLE_POD_APP_BIN`, else a `pod-app` next to
/// the running executable or its parent directory (integration tests run
/// from `target/debug/deps/`).
pub fn pod_app_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(POD_APP_BIN_ENV) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| TestbedError::io("locate current executable", e))?;
    let candidates = exe.ancestors().skip(1).take(2).map(|dir| dir.join("pod-app")).collect::<Vec<_>>();
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| TestbedError::MissingBinary {
        what: "pod-app",
        path: candidates.first().cloned().unwrap_or_default(),
        hint: "build it with `cargo build -p heddle-tests` (or set HEDDLE_POD_APP_BIN)",
    })
}
