//! The test bed's error type.
//!
//! Every fallible operation of the library returns [`TestbedError`]. Variants
//! carry what a person debugging a red test needs: the command line and its
//! stderr, the agent's log tail, the last answer seen while waiting.

use std::path::PathBuf;
use std::process::ExitStatus;

/// Why a test bed operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// The environment cannot host the test bed (not root, no `ip netns`,
    /// no cgroup v2 mount).
    #[error("environment unusable: {0}")]
    Environment(String),

    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "create cgroup /sys/fs/cgroup/unified/x".
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A helper command (`ip`, `sysctl`, `curl`, ...) exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line, space-joined.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its trimmed stderr.
        stderr: String,
    },

    /// A binary the test bed launches does not exist.
    #[error("{what} not found at {path}: {hint}")]
    MissingBinary {
        /// Which binary ("mesh-agent", "pod-app").
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        hint: &'static str,
    },

    /// A tool a test needs is not installed and could not be installed.
    #[error("{binary} is not installed: install the Debian package `{package}` (apt-get install {package}){}", if detail.is_empty() { String::new() } else { format!("; automatic install failed: {detail}") })]
    MissingTool {
        /// The executable.
        binary: &'static str,
        /// The Debian package that ships it.
        package: &'static str,
        /// Why installing it failed, if it was tried.
        detail: String,
    },

    /// A name was used twice or is not usable as a netns/cgroup name.
    #[error("invalid name {name:?}: {why}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Why it was rejected.
        why: &'static str,
    },

    /// The agent process exited (or was never started) when it should run.
    #[error("agent on {node} is not running ({status}); log tail:\n{log_tail}")]
    AgentNotRunning {
        /// The node the agent serves.
        node: String,
        /// Its exit status, or "never started".
        status: String,
        /// The last lines of its log.
        log_tail: String,
    },

    /// The agent's admin API answered with an unexpected status or did not
    /// answer at all.
    #[error("agent admin API on {node}: GET {path} {problem}")]
    Admin {
        /// The node whose agent was asked.
        node: String,
        /// The request path.
        path: String,
        /// What went wrong (status code, curl error).
        problem: String,
    },

    /// The admin API answered 200 with a body that does not match the contract.
    #[error(
        "agent admin API on {node}: GET {path} returned JSON that does not match the contract ({source}); body: {body}"
    )]
    AdminBody {
        /// The node whose agent was asked.
        node: String,
        /// The request path.
        path: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
        /// The body, truncated.
        body: String,
    },

    /// A condition was not met in time.
    #[error("timed out after {waited_ms} ms waiting for {what}; last observation: {last}")]
    Timeout {
        /// The awaited condition.
        what: String,
        /// How long was waited.
        waited_ms: u128,
        /// The last observed state, for the test log.
        last: String,
    },

    /// `pod-app client` printed something that is not its JSON summary.
    #[error("pod-app client in {pod} printed no summary ({status}); stdout: {stdout}; stderr: {stderr}")]
    ClientOutput {
        /// The pod it ran in.
        pod: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its stdout.
        stdout: String,
        /// Its stderr.
        stderr: String,
    },

    /// The cluster config could not be rendered.
    #[error("render cluster config: {0}")]
    Config(#[from] serde_yaml_ng::Error),
}

impl TestbedError {
    /// Wraps an [`std::io::Error`] with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}

/// The library's result type.
pub type Result<T, E = TestbedError> = std::result::Result<T, E>;

/// Truncates `s` to at most `max` bytes (on a char boundary), marking the cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes more)", &s[..end], s.len() - end)
}
