//! The JSON access log: one line per connection when it ends (its close
//! record, or its error record if it was never forwarded), with the flow
//! record's fields and names (identities, verdict and deciding policy,
//! bytes, duration, RTT, retransmits). Off unless `mesh-agent run
//! --access-log stdout|PATH` (`HEDDLE_ACCESS_LOG`).
//!
//! Two sides, so that a slow log never slows traffic:
//! - The **recording side** ([`AccessLog::write`], called by
//!   [`crate::flows::FlowLog`] on the closing connection's task) formats the
//!   record as one JSON line and offers it with `try_send` to a bounded
//!   queue of [`QUEUE_LINES`] lines. It never blocks, awaits or does I/O: a
//!   full queue (the writer is behind) drops the line and counts it
//!   ([`AccessLog::dropped`]; `/stats` `accessLogDropped`,
//!   `heddle_access_log_dropped_total`).
//! - The **writer**, a dedicated std thread named `heddle-access-log`,
//!   owns the file or stdout. It takes every line that is queued, writes
//!   them with one `write_all` and waits for more; a write that blocks (a
//!   stdout pipe nobody drains, a slow disk) blocks this thread only. A
//!   write that fails loses its lines, which are counted as dropped too,
//!   and is logged (once until a write succeeds again).
//!
//! Diagnostics go to the main `tracing` subscriber and never land in the
//! access log, and the operator's `HEDDLE_LOG` filter and `--log-format`
//! never drop or reformat it. Dropping the [`AccessLog`] closes the queue;
//! the writer drains it and exits, and the drop waits for that at most
//! [`SHUTDOWN_FLUSH`], so a stalled stdout cannot hold the agent's exit.

use std::{
    fmt,
    fs::OpenOptions,
    io::Write,
    path::PathBuf,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
        Arc, Mutex,
    },
    time::Duration,
};

use serde::Serialize;

use crate::flows::FlowRecord;

/// Lines the queue between the recording side and the writer holds (about
/// 5 MiB of typical ~600-byte lines); beyond it lines are dropped.
pub const QUEUE_LINES: usize = 8192;

/// How long dropping the access log waits for the writer to drain.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(1);

/// The most bytes the writer gathers into one `write_all`.
const BATCH_BYTES: usize = 64 * 1024;

/// The writer thread's name (visible in `top -H`, `/proc/PID/task`).
pub const THREAD_NAME: &str = "heddle-access-log";

/// Where the access log goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum AccessLogTarget {
    /// The agent's standard output (its logs go to stderr).
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

impl FromStr for AccessLogTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err("empty access log target: use stdout or a file path".into()),
            "stdout" | "-" => Ok(Self::Stdout),
            path => Ok(Self::File(path.into())),
        }
    }
}

impl fmt::Display for AccessLogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl From<AccessLogTarget> for String {
    fn from(t: AccessLogTarget) -> Self {
        t.to_string()
    }
}

/// Errors opening the access log.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    /// The file cannot be opened for appending.
    #[error("cannot open access log {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The writer thread cannot be started.
    #[error("cannot start the access log writer thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// The recording side of the access log; the writer thread owns the output.
pub struct AccessLog {
    /// `None` once dropping has closed the queue.
    tx: Option<SyncSender<String>>,
    /// Lines lost: the queue was full, or their write failed.
    dropped: Arc<AtomicU64>,
    /// Disconnected when the writer thread has exited.
    done: Mutex<Receiver<()>>,
}

impl AccessLog {
    /// Opens `target` (a file is created if missing and appended to) and
    /// starts the writer thread.
    pub fn open(target: &AccessLogTarget) -> Result<Self, AccessLogError> {
        let out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AccessLogError::Open { path: path.clone(), source })?,
            ),
        };
        Self::to_writer(out, QUEUE_LINES)
    }

    /// An access log writing to `out` through a queue of `queue` lines.
    pub fn to_writer(out: Box<dyn Write + Send>, queue: usize) -> Result<Self, AccessLogError> {
        let (tx, rx) = mpsc::sync_channel(queue.max(1));
        let (done_tx, done) = mpsc::channel();
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer { out, lines: rx, dropped: dropped.clone(), failing: false };
        std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                writer.run();
                drop(done_tx);
            })
            .map_err(AccessLogError::Spawn)?;
        Ok(Self { tx: Some(tx), dropped, done: Mutex::new(done) })
    }

    /// Queues one line for `record`; never blocks. If the queue is full the
    /// line is dropped and counted.
    pub fn write(&self, record: &FlowRecord) {
        let Ok(mut line) = serde_json::to_string(record) else {
            return;
        };
        line.push('\n');
        let Some(tx) = &self.tx else { return };
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines lost so far: the queue was full (the writer is behind), or
    /// their write failed.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for AccessLog {
    /// Closes the queue and gives the writer [`SHUTDOWN_FLUSH`] to write
    /// what is queued; a writer stuck in a write is left behind.
    fn drop(&mut self) {
        self.tx = None;
        if let Ok(done) = self.done.get_mut() {
            match done.recv_timeout(SHUTDOWN_FLUSH) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {}
                Err(RecvTimeoutError::Timeout) => {
                    tracing::warn!("access log writer still blocked at shutdown; queued lines are lost");
                }
            }
        }
    }
}

/// The writer thread's state.
struct Writer {
    out: Box<dyn Write + Send>,
    lines: Receiver<String>,
    dropped: Arc<AtomicU64>,
    /// The last write failed (and was logged).
    failing: bool,
}

impl Writer {
    /// Writes lines until the recording side is gone and the queue is empty.
    fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH_BYTES);
        while let Ok(first) = self.lines.recv() {
            batch.clear();
            batch.extend_from_slice(first.as_bytes());
            let mut count = 1;
            while batch.len() < BATCH_BYTES {
                let Ok(line) = self.lines.try_recv() else {
                    break;
                };
                batch.extend_from_slice(line.as_bytes());
                count += 1;
            }
            self.write(&batch, count);
        }
    }

    /// Writes `count` lines gathered in `batch`; a failure loses them.
    fn write(&mut self, batch: &[u8], count: u64) {
        match self.out.write_all(batch).and_then(|()| self.out.flush()) {
            Ok(()) => {
                if std::mem::take(&mut self.failing) {
                    tracing::info!("access log writes succeed again");
                }
            }
            Err(e) => {
                self.dropped.fetch_add(count, Ordering::Relaxed);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(error = %e, "cannot write the access log; lines are dropped until a write succeeds");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::{ConnInfo, Direction, FlowLog};
    use crate::registry::ObjectRef;
    use std::time::Instant;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn info() -> ConnInfo {
        let mut i = ConnInfo::new(Direction::Outbound, ObjectRef { namespace: "demo".into(), name: "client".into() });
        i.src_identity = Some("spiffe://t/ns/demo/sa/client".into());
        i
    }

    #[test]
    fn writes_one_json_line_per_ended_connection_and_none_for_opens() {
        let buf = Shared::default();
        let access = Arc::new(AccessLog::to_writer(Box::new(buf.clone()), 16).unwrap());
        let log = FlowLog::new(10).with_access_log(Some(access));
        let i = info();
        log.opened(1, &i);
        log.closed(1, &i, (10, 20), Duration::from_millis(5), None);
        log.failed(2, &i, "refused".into());
        // Dropping the log waits for the writer to drain.
        drop(log);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["event"], "close");
        assert_eq!(lines[0]["bytes_sent"], 10);
        assert_eq!(lines[0]["src_identity"], "spiffe://t/ns/demo/sa/client");
        assert_eq!(lines[1]["verdict"], "error");
        assert!(text.ends_with("}\n"), "{text}");
    }

    #[test]
    fn a_stalled_writer_drops_and_counts_lines_and_recording_never_waits() {
        // A pipe nobody reads: once its buffer is full the writer thread
        // blocks in write(2), as behind a stalled `--access-log stdout`.
        let (reader, writer) = std::io::pipe().unwrap();
        let access = Arc::new(AccessLog::to_writer(Box::new(writer), 4).unwrap());
        let log = FlowLog::new(10).with_access_log(Some(access.clone()));
        let i = info();
        let mut slowest = Duration::ZERO;
        // ~600-byte lines: 2,000 of them are far more than the pipe (64 KiB
        // by default), one batch and the queue hold.
        for conn in 0..2000 {
            let t = Instant::now();
            log.failed(conn, &i, "refused".into());
            slowest = slowest.max(t.elapsed());
        }
        assert!(slowest < Duration::from_millis(100), "a record waited {slowest:?} for the stalled writer");
        let dropped = access.dropped();
        assert!(dropped >= 1000, "only {dropped} lines dropped");
        // Unblock the writer (EPIPE) so dropping the log does not wait.
        drop(reader);
        drop(log);
        let t = Instant::now();
        drop(Arc::into_inner(access).expect("last reference"));
        assert!(t.elapsed() < SHUTDOWN_FLUSH, "writer did not exit");
    }

    #[test]
    fn parses_stdout_or_a_path_as_the_target() {
        assert_eq!("stdout".parse(), Ok(AccessLogTarget::Stdout));
        assert_eq!("/var/log/heddle.jsonl".parse(), Ok(AccessLogTarget::File("/var/log/heddle.jsonl".into())));
        assert!("".parse::<AccessLogTarget>().is_err());
    }
}
