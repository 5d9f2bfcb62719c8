//! `pod-app churn`: the traffic an agent upgrade must not disturb, run
//! inside a pod against `pod-app echo`.
//!
//! * **Short connections** at a fixed rate (open loop: one is started every
//!   `1/rate` s whatever the others do): connect, send 64 bytes, half-close,
//!   read the echo to its end, compare, close. Every failure is counted by
//!   kind (refused, reset, timeout, wrong bytes) with a few samples.
//! * **Long streams**: each sends 1 KiB every 10 ms for the whole run and
//!   verifies every echoed byte against the stream's deterministic byte
//!   sequence (so one corrupted, lost or reordered byte is seen). A stream
//!   the mesh ends cleanly (end of stream, not a reset) is counted as such
//!   and replaced by a new connection, as a real client would reconnect.
//!
//! The report ([`ChurnReport`]) is one JSON line on stdout.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Bytes per short connection.
const SHORT_BYTES: usize = 64;
/// A long stream's chunk and pace.
const CHUNK: usize = 1024;
const PACE: Duration = Duration::from_millis(10);
/// Limits per connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Error samples kept per kind.
const SAMPLES: usize = 5;

/// What `pod-app churn` does.
#[derive(Clone, Copy, Debug)]
pub struct ChurnPlan {
    /// The echo server.
    pub to: SocketAddr,
    /// Short connections per second.
    pub rate: u32,
    /// Long streams at once.
    pub streams: u32,
    /// How long.
    pub duration: Duration,
}

/// Failures by kind, with a few messages.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Failures {
    /// Count per kind (`refused`, `reset`, `timeout`, `mismatch`, `other`).
    pub by_kind: BTreeMap<String, u64>,
    /// The first messages of each kind.
    pub samples: Vec<String>,
}

impl Failures {
    fn add(&mut self, kind: &str, message: &str) {
        let n = self.by_kind.entry(kind.to_owned()).or_default();
        *n += 1;
        if *n as usize <= SAMPLES {
            // Wall-clock time, to line failures up with the agents' logs.
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let day = now.as_secs() % 86_400;
            let at = format!("{:02}:{:02}:{:02}.{:03}", day / 3600, day / 60 % 60, day % 60, now.subsec_millis());
            self.samples.push(format!("{at} {kind}: {message}"));
        }
    }

    /// All failures.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }
}

/// The short connections' outcome.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ShortReport {
    /// Started.
    pub attempted: u64,
    /// Echoed byte-exact.
    pub ok: u64,
    /// The rest.
    pub failed: Failures,
}

/// The long streams' outcome.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StreamReport {
    /// Connections opened for long streams (replacements included).
    pub connections: u64,
    /// Connections the mesh ended with an orderly end of stream.
    pub clean_ends: u64,
    /// Connections still open at the end of the run (then closed by us).
    pub open_at_end: u64,
    /// Echoed bytes that matched.
    pub bytes_verified: u64,
    /// Echoed bytes that did not match what was sent at that offset.
    pub corrupted_bytes: u64,
    /// Resets, timeouts, refused reconnects.
    pub failed: Failures,
}

/// What `pod-app churn` prints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChurnReport {
    /// Short connections.
    pub short: ShortReport,
    /// Long streams.
    pub streams: StreamReport,
    /// Seconds run.
    pub seconds: f64,
}

fn kind(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted => "reset",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::InvalidData => "mismatch",
        _ => "other",
    }
}

fn timeout(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

/// The byte at `offset` of stream `seed`: a mix no proxy bug reproduces by
/// accident (an offset error, a duplicated or dropped chunk all show).
#[must_use]
pub fn stream_byte(seed: u64, offset: u64) -> u8 {
    let x = (offset ^ seed.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

/// Runs the plan and reports.
pub async fn run(plan: ChurnPlan) -> ChurnReport {
    let started = Instant::now();
    let end = started + plan.duration;
    let report = Arc::new(Mutex::new(ChurnReport::default()));
    let mut streams = Vec::new();
    for s in 0..plan.streams {
        streams.push(tokio::spawn(long_stream(plan.to, u64::from(s), end, report.clone())));
    }
    let mut shorts = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / plan.rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while Instant::now() < end {
        tick.tick().await;
        report.lock().expect("report lock").short.attempted += 1;
        shorts.push(tokio::spawn(short(plan.to, report.clone())));
    }
    for t in shorts.into_iter().chain(streams) {
        let _ = t.await;
    }
    let mut out = report.lock().expect("report lock").clone();
    out.seconds = started.elapsed().as_secs_f64();
    out
}

async fn short(to: SocketAddr, report: Arc<Mutex<ChurnReport>>) {
    let got = async {
        let mut s =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await.map_err(|_| timeout("connect"))??;
        let sent: Vec<u8> = (0..SHORT_BYTES as u64).map(|i| stream_byte(u64::MAX, i)).collect();
        s.write_all(&sent).await?;
        s.shutdown().await?;
        let mut back = Vec::new();
        tokio::time::timeout(IO_TIMEOUT, s.read_to_end(&mut back)).await.map_err(|_| timeout("echo"))??;
        if back != sent {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} bytes echoed, not the 64 sent", back.len()),
            ));
        }
        Ok(())
    }
    .await;
    let mut r = report.lock().expect("report lock");
    match got {
        Ok(()) => r.short.ok += 1,
        Err(e) => r.short.failed.add(kind(&e), &e.to_string()),
    }
}

/// How one long-stream connection ended.
enum Ended {
    /// An orderly end of stream from the mesh.
    Clean,
    /// The run is over.
    RunOver,
}

async fn long_stream(to: SocketAddr, stream: u64, end: Instant, report: Arc<Mutex<ChurnReport>>) {
    let mut generation = 0u64;
    while Instant::now() < end {
        let seed = stream << 32 | generation;
        generation += 1;
        report.lock().expect("report lock").streams.connections += 1;
        let ended = one_long_connection(to, seed, end, &report).await;
        let failed = ended.is_err();
        {
            let mut r = report.lock().expect("report lock");
            match ended {
                Ok(Ended::Clean) => r.streams.clean_ends += 1,
                Ok(Ended::RunOver) => r.streams.open_at_end += 1,
                Err(e) => r.streams.failed.add(kind(&e), &format!("stream {stream} connection {generation}: {e}")),
            }
        }
        if failed {
            // Do not spin against a broken path.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn one_long_connection(
    to: SocketAddr,
    seed: u64,
    end: Instant,
    report: &Mutex<ChurnReport>,
) -> io::Result<Ended> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await.map_err(|_| timeout("connect"))??;
    let (mut rd, mut wr) = s.into_split();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut buf = vec![0u8; 16 * 1024];
    let mut pace = tokio::time::interval(PACE);
    let verify = |received: &mut u64, data: &[u8]| {
        let bad = data.iter().enumerate().filter(|(i, b)| **b != stream_byte(seed, *received + *i as u64)).count();
        *received += data.len() as u64;
        let mut r = report.lock().expect("report lock");
        r.streams.bytes_verified += (data.len() - bad) as u64;
        r.streams.corrupted_bytes += bad as u64;
    };
    loop {
        tokio::select! {
            _ = pace.tick() => {
                if Instant::now() >= end {
                    break;
                }
                let chunk: Vec<u8> = (sent..sent + CHUNK as u64).map(|i| stream_byte(seed, i)).collect();
                wr.write_all(&chunk).await?;
                sent += CHUNK as u64;
            }
            n = rd.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    // The mesh ended it: everything echoed before was checked.
                    return Ok(Ended::Clean);
                }
                verify(&mut received, &buf[..n]);
            }
        }
    }
    // The run is over: half-close and take the rest of the echo.
    wr.shutdown().await?;
    let rest = tokio::time::timeout(IO_TIMEOUT, async {
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            verify(&mut received, &buf[..n]);
        }
    })
    .await;
    rest.map_err(|_| timeout("final echo"))??;
    if received != sent {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{received} of {sent} bytes echoed at the end"),
        ));
    }
    Ok(Ended::RunOver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_differ_and_no_short_period_repeats() {
        let a: Vec<u8> = (0..4096).map(|i| stream_byte(1, i)).collect();
        let b: Vec<u8> = (0..4096).map(|i| stream_byte(2 << 32, i)).collect();
        assert_ne!(a, b);
        assert_ne!(a[..1024], a[1024..2048], "a chunk shifted by 1 KiB would go unnoticed");
        assert_ne!(a[..1023], a[1..1024], "a byte shifted by one would go unnoticed");
    }
}
