//! A process-local health file for the kubelet's exec probes
//! (`mesh-agent probe live|ready`).
//!
//! Why not HTTP probes: during an upgrade ([`crate::handover`]) the old and
//! the new agent share the admin and metrics listening sockets, so an HTTP
//! probe of the new pod may be answered by the old process, and the new pod
//! would be marked started and ready before it serves (the `DaemonSet` would
//! then stop the old one too early). The file lives in the pod's own
//! filesystem (an `emptyDir`), so each pod's probe sees its own process.
//!
//! The agent rewrites it every [`HEARTBEAT`] from a task on its runtime:
//! `live` needs a heartbeat younger than [`STALE`] (a wedged runtime fails
//! it, as a hung metrics server would have); `ready` also needs the state
//! `ready` (set after the first enrollment, and after a takeover completes;
//! `draining` after a handover or at exit).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// How often the file is rewritten.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A heartbeat older than this fails both probes.
pub const STALE: Duration = Duration::from_secs(15);

/// Where the agent is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Loading, taking over, enrolling.
    Starting,
    /// Serving.
    Ready,
    /// Handed over, or exiting: serving what is open only.
    Draining,
}

#[derive(Debug, Serialize, Deserialize)]
struct Content {
    phase: Phase,
    pid: u32,
    /// Seconds since the epoch of the last heartbeat.
    at: f64,
}

/// The agent's side: the file, kept current (nothing, without a path).
#[derive(Clone)]
pub struct StateFile {
    path: Option<PathBuf>,
    phase: Arc<Mutex<Phase>>,
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

impl StateFile {
    /// Writes `starting` to `path` and keeps it fresh until `stop` fires;
    /// without a path, does nothing.
    pub fn start(path: Option<&Path>, stop: CancellationToken) -> std::io::Result<Self> {
        let file = Self { path: path.map(Path::to_owned), phase: Arc::new(Mutex::new(Phase::Starting)) };
        if path.is_none() {
            return Ok(file);
        }
        file.write()?;
        let beat = file.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(HEARTBEAT) => {}
                }
                if let Err(e) = beat.write() {
                    tracing::warn!(error = %e, "cannot write the state file");
                }
            }
        });
        Ok(file)
    }

    /// Records a new phase at once.
    pub fn set(&self, phase: Phase) {
        *self.phase.lock().expect("phase lock") = phase;
        if let Err(e) = self.write() {
            tracing::warn!(error = %e, "cannot write the state file");
        }
    }

    fn write(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        // Held for the whole write: the heartbeat and `set` share the temp name.
        let phase = self.phase.lock().expect("phase lock");
        let content = Content { phase: *phase, pid: std::process::id(), at: now() };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&content).expect("serializes"))?;
        std::fs::rename(&tmp, path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }
}

/// What a probe asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The process runs and its runtime is not wedged.
    Live,
    /// ... and it serves.
    Ready,
}

/// Answers a probe from the file at `path`: `Ok` with what was seen, or
/// why the probe fails.
pub fn probe(path: &Path, probe: Probe) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let content: Content = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let age = now() - content.at;
    let seen = format!("pid {} {:?}, heartbeat {age:.1} s ago", content.pid, content.phase);
    if age > STALE.as_secs_f64() {
        return Err(format!("stale: {seen}"));
    }
    if probe == Probe::Ready && content.phase != Phase::Ready {
        return Err(format!("not ready: {seen}"));
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_only_in_the_ready_phase_and_live_while_the_heartbeat_is_fresh() {
        let path = std::env::temp_dir().join(format!("heddle-state-{}.json", std::process::id()));
        let stop = CancellationToken::new();
        let file = StateFile::start(Some(&path), stop.clone()).unwrap();
        assert!(probe(&path, Probe::Live).is_ok());
        assert!(probe(&path, Probe::Ready).unwrap_err().contains("not ready"));
        file.set(Phase::Ready);
        assert!(probe(&path, Probe::Ready).is_ok());
        file.set(Phase::Draining);
        assert!(probe(&path, Probe::Ready).is_err());
        stop.cancel();
        let stale = Content { phase: Phase::Ready, pid: 1, at: now() - 60.0 };
        std::fs::write(&path, serde_json::to_vec(&stale).unwrap()).unwrap();
        assert!(probe(&path, Probe::Live).unwrap_err().contains("stale"));
        std::fs::remove_file(&path).unwrap();
        assert!(probe(&path, Probe::Live).is_err(), "no file: not alive");
    }
}
