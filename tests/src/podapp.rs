//! What the test bed and the `pod-app` binary agree on.
//!
//! [`ClientSpec`] renders the `pod-app client` command line, [`ClientSummary`]
//! is the JSON line it prints, and [`pattern`] is the deterministic payload
//! each connection sends (seeded by the connection index, so a byte that
//! arrives on the wrong connection or out of order is detected).

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// At most this many error texts are kept in a [`ClientSummary`].
pub const MAX_ERRORS: usize = 10;

/// A `pod-app client` run.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    to: SocketAddr,
    bytes: usize,
    conns: usize,
    parallel: usize,
    hold: bool,
}

impl ClientSpec {
    /// One connection to `to` carrying 1024 bytes each way.
    #[must_use]
    pub fn to(to: SocketAddr) -> Self {
        Self {
            to,
            bytes: 1024,
            conns: 1,
            parallel: 1,
            hold: false,
        }
    }

    /// Bytes sent (and expected back) per connection.
    #[must_use]
    pub fn bytes(mut self, bytes: usize) -> Self {
        self.bytes = bytes;
        self
    }

    /// Number of connections.
    #[must_use]
    pub fn conns(mut self, conns: usize) -> Self {
        self.conns = conns;
        self
    }

    /// At most this many connections at once.
    #[must_use]
    pub fn parallel(mut self, parallel: usize) -> Self {
        self.parallel = parallel;
        self
    }

    /// Open a whole batch of `parallel` connections before transferring.
    #[must_use]
    pub fn hold(mut self) -> Self {
        self.hold = true;
        self
    }

    /// Number of connections this run makes.
    #[must_use]
    pub fn connection_count(&self) -> usize {
        self.conns
    }

    /// The `pod-app` arguments.
    #[must_use]
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "client".to_owned(),
            "--to".to_owned(),
            self.to.to_string(),
            "--bytes".to_owned(),
            self.bytes.to_string(),
            "--conns".to_owned(),
            self.conns.to_string(),
            "--parallel".to_owned(),
            self.parallel.to_string(),
        ];
        if self.hold {
            args.push("--hold".to_owned());
        }
        args
    }
}

/// The one JSON line `pod-app client` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSummary {
    /// Connections that echoed byte-exact.
    pub ok: u64,
    /// Connections that failed.
    pub failed: u64,
    /// The first [`MAX_ERRORS`] error texts.
    pub errors: Vec<String>,
}

impl ClientSummary {
    /// Whether every connection succeeded.
    #[must_use]
    pub fn all_ok(&self) -> bool {
        self.failed == 0
    }

    /// Records a failure, keeping at most [`MAX_ERRORS`] texts.
    pub fn record_error(&mut self, error: String) {
        self.failed += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(error);
        }
    }
}

impl fmt::Display for ClientSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ok={} failed={}", self.ok, self.failed)?;
        if !self.errors.is_empty() {
            write!(f, " errors={:?}", self.errors)?;
        }
        Ok(())
    }
}

/// The payload of connection `index`: `len` bytes of xorshift64* output.
#[must_use]
pub fn pattern(index: u64, len: usize) -> Vec<u8> {
    let mut state = index
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x2545_F491_4F6C_DD1D)
        | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_differs_per_connection() {
        assert_eq!(pattern(3, 100), pattern(3, 100));
        assert_ne!(pattern(3, 100), pattern(4, 100));
        assert_eq!(pattern(7, 13).len(), 13);
        assert_eq!(&pattern(7, 64)[..13], &pattern(7, 13)[..]);
    }

    #[test]
    fn summary_keeps_at_most_ten_errors() {
        let mut s = ClientSummary::default();
        for i in 0..25 {
            s.record_error(format!("e{i}"));
        }
        assert_eq!(s.failed, 25);
        assert_eq!(s.errors.len(), MAX_ERRORS);
        let line = serde_json::to_string(&s).unwrap();
        assert!(
            line.starts_with(r#"{"ok":0,"failed":25,"errors":["#),
            "{line}"
        );
    }

    #[test]
    fn renders_the_client_command_line() {
        let spec = ClientSpec::to("10.44.2.2:8080".parse().unwrap())
            .conns(500)
            .parallel(500)
            .hold();
        assert_eq!(
            spec.args().join(" "),
            "client --to 10.44.2.2:8080 --bytes 1024 --conns 500 --parallel 500 --hold"
        );
    }
}
