//! The JSON access log: one line per connection when it ends (its close
//! record, or its error record if it was never forwarded), with the flow
//! record's fields and names (identities, verdict and deciding policy,
//! bytes, duration, RTT, retransmits). Off unless `mesh-agent run
//! --access-log stdout|PATH` (`HEDDLE_ACCESS_LOG`).
//!
//! Emitted through `tracing` as events of target [`TARGET`] on a dispatcher
//! of its own, whose only layer writes each event's message (the record as
//! JSON) as one line. Keeping it off the process's main subscriber means the
//! operator's `HEDDLE_LOG` filter and `--log-format` never drop or reformat
//! it, and diagnostics never land in the access log. Writes happen on the
//! connection's task after the splice has finished, through a line-buffered
//! writer under a std mutex: a file write goes to the page cache; a stdout
//! pipe that nobody drains would hold connection tasks at their close, so
//! prefer a file on busy nodes.

use std::{
    fmt,
    fs::OpenOptions,
    io::{LineWriter, Write},
    path::PathBuf,
    str::FromStr,
    sync::Mutex,
};

use serde::Serialize;
use tracing::{field::Field, Dispatch, Event, Subscriber};
use tracing_subscriber::{layer::Context, prelude::*, Layer};

use crate::flows::FlowRecord;

/// The `tracing` target of access log events.
pub const TARGET: &str = "heddle::access";

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
}

/// The access log writer.
pub struct AccessLog {
    dispatch: Dispatch,
}

impl AccessLog {
    /// Opens `target` (a file is created if missing and appended to).
    pub fn open(target: &AccessLogTarget) -> Result<Self, AccessLogError> {
        let out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AccessLogError::Open {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        Ok(Self::to_writer(out))
    }

    /// An access log writing to `out` (tests).
    #[must_use]
    pub fn to_writer(out: Box<dyn Write + Send>) -> Self {
        let layer = LineLayer {
            out: Mutex::new(LineWriter::new(out)),
        };
        Self {
            dispatch: Dispatch::new(tracing_subscriber::registry().with(layer)),
        }
    }

    /// Writes one line for `record`.
    pub fn write(&self, record: &FlowRecord) {
        let Ok(line) = serde_json::to_string(record) else {
            return;
        };
        tracing::dispatcher::with_default(&self.dispatch, || {
            tracing::info!(target: TARGET, "{line}");
        });
    }
}

/// Writes the message of every [`TARGET`] event as one line.
struct LineLayer {
    out: Mutex<LineWriter<Box<dyn Write + Send>>>,
}

impl<S: Subscriber> Layer<S> for LineLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        let mut out = self.out.lock().expect("access log lock");
        let _ = writeln!(out, "{}", message.0);
    }
}

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::{ConnInfo, Direction, FlowLog};
    use crate::registry::ObjectRef;
    use std::sync::Arc;

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

    #[test]
    fn writes_one_json_line_per_ended_connection_and_none_for_opens() {
        let buf = Shared::default();
        let access = Arc::new(AccessLog::to_writer(Box::new(buf.clone())));
        let log = FlowLog::new(10).with_access_log(Some(access));
        let mut i = ConnInfo::new(
            Direction::Outbound,
            ObjectRef {
                namespace: "demo".into(),
                name: "client".into(),
            },
        );
        i.src_identity = Some("spiffe://t/ns/demo/sa/client".into());
        log.opened(1, &i);
        log.closed(1, &i, (10, 20), std::time::Duration::from_millis(5), None);
        log.failed(2, &i, "refused".into());
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["event"], "close");
        assert_eq!(lines[0]["bytes_sent"], 10);
        assert_eq!(lines[0]["src_identity"], "spiffe://t/ns/demo/sa/client");
        assert_eq!(lines[1]["verdict"], "error");
    }

    #[test]
    fn parses_stdout_or_a_path_as_the_target() {
        assert_eq!("stdout".parse(), Ok(AccessLogTarget::Stdout));
        assert_eq!(
            "/var/log/heddle.jsonl".parse(),
            Ok(AccessLogTarget::File("/var/log/heddle.jsonl".into()))
        );
        assert!("".parse::<AccessLogTarget>().is_err());
    }
}
