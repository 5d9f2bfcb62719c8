//! What the test bed and the `pod-app` binary agree on.
//!
//! [`ClientSpec`] renders the `pod-app client` command line, [`ClientSummary`]
//! is the JSON line it prints, and [`Payload`] is the deterministic byte
//! stream each connection sends: by default [`pattern`] (seeded by the
//! connection index, so a byte that arrives on the wrong connection or out
//! of order is detected), or a text marker repeated (`--pattern`), which a
//! packet capture can look for. Payloads are generated and verified as
//! streams, so a 100 MB connection needs no 100 MB buffer. [`Fnv1a64`] is
//! the checksum both ends log (`--checksum`, and every echo connection),
//! and [`EchoRecord`] is the echo server's per-connection log line.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

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
    pattern: Option<String>,
    trickle: Option<(usize, Duration)>,
    checksum: bool,
}

impl ClientSpec {
    /// One connection to `to` carrying 1024 bytes each way.
    #[must_use]
    pub fn to(to: SocketAddr) -> Self {
        Self { to, bytes: 1024, conns: 1, parallel: 1, hold: false, pattern: None, trickle: None, checksum: false }
    }

    /// Fill the payload with `text` repeated instead of [`pattern`].
    #[must_use]
    pub fn pattern(mut self, text: &str) -> Self {
        self.pattern = Some(text.to_owned());
        self
    }

    /// Keep each connection open: send `chunks` chunks of [`Self::bytes`]
    /// bytes, `interval` apart, verifying each chunk's echo before the next.
    #[must_use]
    pub fn trickle(mut self, chunks: usize, interval: Duration) -> Self {
        self.trickle = Some((chunks, interval));
        self
    }

    /// Report each connection's [`Fnv1a64`] of the bytes sent.
    #[must_use]
    pub fn checksum(mut self) -> Self {
        self.checksum = true;
        self
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
        if let Some(text) = &self.pattern {
            args.extend(["--pattern".to_owned(), text.clone()]);
        }
        if let Some((chunks, interval)) = self.trickle {
            args.extend([
                "--chunks".to_owned(),
                chunks.to_string(),
                "--interval-ms".to_owned(),
                interval.as_millis().to_string(),
            ]);
        }
        if self.checksum {
            args.push("--checksum".to_owned());
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
    /// Per successful connection, with `--checksum`: what was sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checksums: Vec<ConnChecksum>,
}

/// The checksum of what one connection sent (and got back byte-exact).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnChecksum {
    /// Connection index.
    pub conn: u64,
    /// Bytes sent (and echoed).
    pub bytes: u64,
    /// [`Fnv1a64`] of those bytes, 16 hex digits.
    pub fnv1a64: String,
}

/// The summary in `pod-app client` output: the last line that parses.
#[must_use]
pub fn parse_summary(output: &str) -> Option<ClientSummary> {
    output.lines().rev().filter(|l| !l.trim().is_empty()).find_map(|l| serde_json::from_str(l).ok())
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
    let mut out = vec![0; len];
    Payload::random(index).fill(&mut out);
    out
}

/// An endless deterministic byte stream: what a connection sends.
#[derive(Debug, Clone)]
pub enum Payload {
    /// xorshift64* output seeded by the connection index (see [`pattern`]).
    Random {
        /// Generator state.
        state: u64,
        /// The current 8-byte word and how much of it is used.
        word: [u8; 8],
        /// Bytes of `word` already handed out.
        used: usize,
    },
    /// A text repeated.
    Text {
        /// The text (not empty).
        text: Vec<u8>,
        /// Position in `text` of the next byte.
        pos: usize,
    },
}

impl Payload {
    /// The [`pattern`] stream of connection `index`.
    #[must_use]
    pub fn random(index: u64) -> Self {
        Self::Random {
            state: index.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0x2545_F491_4F6C_DD1D) | 1,
            word: [0; 8],
            used: 8,
        }
    }

    /// `text` repeated forever; an empty text counts as one space.
    #[must_use]
    pub fn text(text: &str) -> Self {
        let text = if text.is_empty() { " " } else { text };
        Self::Text { text: text.as_bytes().to_vec(), pos: 0 }
    }

    /// Overwrites `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        match self {
            Self::Random { state, word, used } => {
                for b in buf {
                    if *used == 8 {
                        *state ^= *state >> 12;
                        *state ^= *state << 25;
                        *state ^= *state >> 27;
                        *word = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                        *used = 0;
                    }
                    *b = word[*used];
                    *used += 1;
                }
            }
            Self::Text { text, pos } => {
                for b in buf {
                    *b = text[*pos];
                    *pos = (*pos + 1) % text.len();
                }
            }
        }
    }
}

/// 64-bit FNV-1a, a checksum both ends of a stream can compute cheaply.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a64 {
    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The checksum as 16 hex digits.
    #[must_use]
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// One line of the echo server's log: a connection it served to the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoRecord {
    /// The peer the echo server saw.
    pub peer: SocketAddr,
    /// Bytes received (and echoed).
    pub bytes: u64,
    /// [`Fnv1a64`] of the bytes received.
    pub fnv1a64: String,
}

impl EchoRecord {
    /// Prefix of the log line.
    const PREFIX: &'static str = "echo: done ";

    /// The log line `pod-app echo` prints.
    #[must_use]
    pub fn line(&self) -> String {
        format!("{}peer={} bytes={} fnv1a64={}", Self::PREFIX, self.peer, self.bytes, self.fnv1a64)
    }

    /// Every record in an echo server's log.
    #[must_use]
    pub fn parse_log(log: &str) -> Vec<Self> {
        log.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(Self::PREFIX)?;
                let mut peer = None;
                let mut bytes = None;
                let mut fnv = None;
                for field in rest.split_whitespace() {
                    match field.split_once('=')? {
                        ("peer", v) => peer = v.parse().ok(),
                        ("bytes", v) => bytes = v.parse().ok(),
                        ("fnv1a64", v) => fnv = Some(v.to_owned()),
                        _ => {}
                    }
                }
                Some(Self { peer: peer?, bytes: bytes?, fnv1a64: fnv? })
            })
            .collect()
    }
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
    fn streamed_payload_equals_the_pattern_whatever_the_chunking() {
        let whole = pattern(5, 1000);
        let mut stream = Payload::random(5);
        let mut pieces = Vec::new();
        for size in [1, 7, 8, 13, 971] {
            let mut buf = vec![0; size];
            stream.fill(&mut buf);
            pieces.extend(buf);
        }
        assert_eq!(pieces, whole);
        let mut text = Payload::text("abc");
        let mut buf = [0; 7];
        text.fill(&mut buf);
        assert_eq!(&buf, b"abcabca");
    }

    #[test]
    fn fnv1a64_matches_the_reference_values() {
        let mut h = Fnv1a64::default();
        assert_eq!(h.hex(), "cbf29ce484222325");
        h.update(b"a");
        assert_eq!(h.hex(), "af63dc4c8601ec8c");
        let mut split = Fnv1a64::default();
        split.update(b"foo");
        split.update(b"bar");
        let mut whole = Fnv1a64::default();
        whole.update(b"foobar");
        assert_eq!(split.hex(), whole.hex());
    }

    #[test]
    fn echo_records_round_trip_through_the_log() {
        let rec =
            EchoRecord { peer: "10.44.2.2:41000".parse().unwrap(), bytes: 100, fnv1a64: "00000000000000ff".into() };
        let log = format!("echo: listening on 0.0.0.0:8080\n{}\necho: oops\n", rec.line());
        assert_eq!(EchoRecord::parse_log(&log), vec![rec]);
    }

    #[test]
    fn summary_is_the_last_json_line_of_the_output() {
        let out = "noise\n{\"ok\":1,\"failed\":0,\"errors\":[]}\n\n";
        assert_eq!(parse_summary(out).unwrap().ok, 1);
        assert!(parse_summary("nothing").is_none());
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
        assert!(line.starts_with(r#"{"ok":0,"failed":25,"errors":["#), "{line}");
    }

    #[test]
    fn renders_the_client_command_line() {
        let spec = ClientSpec::to("10.44.2.2:8080".parse().unwrap()).conns(500).parallel(500).hold();
        assert_eq!(spec.args().join(" "), "client --to 10.44.2.2:8080 --bytes 1024 --conns 500 --parallel 500 --hold");
        let spec = ClientSpec::to("10.44.2.2:8080".parse().unwrap())
            .pattern("MARK")
            .trickle(20, Duration::from_millis(500))
            .checksum();
        assert!(
            spec.args().join(" ").ends_with("--pattern MARK --chunks 20 --interval-ms 500 --checksum"),
            "{:?}",
            spec.args()
        );
    }
}
