//! `pod-app`: the application the test bed runs inside pods.
//!
//! - `pod-app echo --listen ADDR`: echoes every byte until the client's
//!   EOF, then shuts down its write side (half-close honoured) and logs one
//!   [`EchoRecord`] line (peer, bytes, FNV-1a checksum of what it received).
//!   A thread per connection; the listen backlog is large so bursts of
//!   connects are not dropped by the application itself.
//! - `pod-app http --listen ADDR --name NAME`: an HTTP/1.1 + h2c server
//!   that answers with what it received and who it is
//!   ([`heddle_tests::httpapp`]).
//! - `pod-app reviews --listen ADDR --name NAME --version v1|v2|v3
//!   [--ratings ADDR]`: Bookinfo's reviews service
//!   ([`heddle_tests::bookinfo::reviews`]).
//! - `pod-app client --to ADDR [--bytes N] [--conns C] [--parallel P] [--hold]
//!   [--pattern TEXT] [--chunks K --interval-ms MS] [--checksum]`:
//!   C connections, at most P at once, each sending N bytes of its
//!   [`Payload`] (the connection's [`heddle_tests::podapp::pattern`], or
//!   TEXT repeated), half-closing, and checking the echo is byte-exact. With
//!   `--hold` each batch of P connections is established before any
//!   transfers (a barrier), which proves P concurrent connections. With
//!   `--chunks` a connection instead sends K chunks of N bytes, MS apart,
//!   verifying each chunk's echo before the next (a long-lived connection).
//!   Prints one JSON [`ClientSummary`] line (with `--checksum`, the FNV-1a of
//!   what each connection sent); exits 0 only if none failed.
//! - `pod-app churn --to ADDR [--rate R] [--streams S] [--seconds T]`: R
//!   short connections per second and S long, byte-verified streams for T
//!   seconds against an echo server; prints one JSON
//!   [`heddle_tests::churn::ChurnReport`] line.
//!
//! Plain threads and std sockets: the point is to behave like an ordinary
//! application, with nothing mesh-aware in it. Large payloads are generated,
//! sent and verified as streams, so memory does not grow with `--bytes`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use heddle_tests::podapp::{ClientSummary, ConnChecksum, EchoRecord, Fnv1a64, Payload};
use socket2::{Domain, Socket, Type};

/// Connect timeout per connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Read and write timeout per connection.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Payloads up to this size are written before reading; larger ones are
/// written from a second thread so a full echo path cannot deadlock.
const INLINE_WRITE_MAX: usize = 64 * 1024;
/// Block size of streamed payloads.
const BLOCK: usize = 64 * 1024;
/// Thread stack size: hundreds of connection threads run at once.
const STACK_SIZE: usize = 256 * 1024;

#[derive(Parser)]
#[command(about = "Test application run inside Heddle test bed pods")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server.
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
    },
    /// HTTP/1.1 and h2c server that says which pod served a request
    /// (see `heddle_tests::httpapp`).
    Http {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// The name it answers with (`x-served-by`).
        #[arg(long)]
        name: String,
        /// Wait this long before every answer (a slow endpoint).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Bookinfo's reviews service (see `heddle_tests::bookinfo::reviews`).
    Reviews {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:9080")]
        listen: SocketAddr,
        /// The pod's name.
        #[arg(long)]
        name: String,
        /// v1 (no stars), v2 (black stars) or v3 (red stars).
        #[arg(long)]
        version: String,
        /// Ratings' address (v2 and v3 call it).
        #[arg(long)]
        ratings: Option<SocketAddr>,
    },
    /// Echo client that verifies every byte.
    Client {
        /// Server address.
        #[arg(long)]
        to: SocketAddr,
        /// Bytes per connection (per chunk with `--chunks`).
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        /// Number of connections.
        #[arg(long, default_value_t = 1)]
        conns: usize,
        /// Connections at once.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Establish each batch of `parallel` connections before transferring.
        #[arg(long)]
        hold: bool,
        /// Send this text repeated instead of the pseudo-random pattern.
        #[arg(long)]
        pattern: Option<String>,
        /// Send this many chunks of `bytes` per connection, one echo at a time.
        #[arg(long, default_value_t = 0)]
        chunks: usize,
        /// Pause between chunks, in milliseconds.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// Report the FNV-1a checksum of what each connection sent.
        #[arg(long)]
        checksum: bool,
    },
    /// Short connections at a fixed rate plus long verified streams
    /// (see `heddle_tests::churn`).
    Churn {
        /// Echo server address.
        #[arg(long)]
        to: SocketAddr,
        /// Short connections per second.
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// Long streams at once.
        #[arg(long, default_value_t = 20)]
        streams: u32,
        /// Seconds to run.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Churn { to, rate, streams, seconds } => {
            let plan = heddle_tests::churn::ChurnPlan { to, rate, streams, duration: Duration::from_secs(seconds) };
            let report = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(heddle_tests::churn::run(plan));
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Cmd::Echo { listen } => echo(listen),
        Cmd::Http { listen, name, delay_ms } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(heddle_tests::httpapp::serve(listen, name, Duration::from_millis(delay_ms)))
            .context("http server"),
        Cmd::Reviews { listen, name, version, ratings } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(heddle_tests::bookinfo::reviews::serve(
                listen,
                heddle_tests::bookinfo::reviews::Reviews { name, version, ratings },
            ))
            .context("reviews server"),
        Cmd::Client { to, bytes, conns, parallel, hold, pattern, chunks, interval_ms, checksum } => {
            let summary = client(&Plan {
                to,
                bytes,
                conns,
                parallel: parallel.max(1),
                hold,
                pattern,
                chunks,
                interval: Duration::from_millis(interval_ms),
                checksum,
            });
            println!("{}", serde_json::to_string(&summary)?);
            std::process::exit(i32::from(!summary.all_ok()));
        }
    }
}

/// Serves echo forever.
fn echo(listen: SocketAddr) -> Result<()> {
    let socket = Socket::new(Domain::for_address(listen), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&listen.into()).with_context(|| format!("bind {listen}"))?;
    socket.listen(4096)?;
    let listener: TcpListener = socket.into();
    eprintln!("echo: listening on {listen}");
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let spawned = thread::Builder::new().stack_size(STACK_SIZE).spawn(move || match echo_one(&stream) {
                    Ok(record) => eprintln!("{}", record.line()),
                    Err(e) => eprintln!("echo: {e}"),
                });
                if let Err(e) = spawned {
                    eprintln!("echo: cannot spawn a thread: {e}");
                }
            }
            Err(e) => eprintln!("echo: accept: {e}"),
        }
    }
    Ok(())
}

/// Echoes one connection until EOF, then half-closes.
fn echo_one(stream: &TcpStream) -> std::io::Result<EchoRecord> {
    let peer = stream.peer_addr()?;
    let mut buf = vec![0u8; BLOCK];
    let mut reader = stream;
    let mut writer = stream;
    let mut bytes = 0u64;
    let mut sum = Fnv1a64::default();
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
        bytes += n as u64;
        writer.write_all(&buf[..n])?;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(EchoRecord { peer, bytes, fnv1a64: sum.hex() })
}

/// What the client does.
struct Plan {
    to: SocketAddr,
    bytes: usize,
    conns: usize,
    parallel: usize,
    hold: bool,
    pattern: Option<String>,
    chunks: usize,
    interval: Duration,
    checksum: bool,
}

impl Plan {
    /// The byte stream connection `index` sends.
    fn payload(&self, index: usize) -> Payload {
        self.pattern.as_deref().map_or_else(|| Payload::random(index as u64), Payload::text)
    }
}

/// Runs the plan and summarises.
fn client(plan: &Plan) -> ClientSummary {
    let summary = Arc::new(Mutex::new(ClientSummary::default()));
    if plan.hold {
        let mut start = 0;
        while start < plan.conns {
            let batch = plan.parallel.min(plan.conns - start);
            run_batch(plan, start, batch, &summary);
            start += batch;
        }
    } else {
        run_pool(plan, &summary);
    }
    let mut summary = summary.lock().unwrap_or_else(PoisonError::into_inner).clone();
    summary.checksums.sort_by_key(|c| c.conn);
    summary
}

fn record(summary: &Mutex<ClientSummary>, plan: &Plan, index: usize, result: Result<Sent>) {
    let mut s = summary.lock().unwrap_or_else(PoisonError::into_inner);
    match result {
        Ok(sent) => {
            s.ok += 1;
            if plan.checksum {
                s.checksums.push(ConnChecksum { conn: index as u64, bytes: sent.bytes, fnv1a64: sent.sum.hex() });
            }
        }
        Err(e) => s.record_error(format!("conn {index}: {e:#}")),
    }
}

/// One connection from connect to verified echo.
fn run_one(plan: &Plan, index: usize, conn: Result<TcpStream>) -> Result<Sent> {
    let stream = conn?;
    if plan.chunks > 0 {
        trickle(&stream, plan, index)
    } else {
        transfer(&stream, plan, index)
    }
}

/// `parallel` workers taking connection indexes from a shared counter.
fn run_pool(plan: &Plan, summary: &Arc<Mutex<ClientSummary>>) {
    let next = AtomicUsize::new(0);
    thread::scope(|scope| {
        for _ in 0..plan.parallel.min(plan.conns) {
            thread::Builder::new()
                .stack_size(STACK_SIZE)
                .spawn_scoped(scope, || loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= plan.conns {
                        break;
                    }
                    let result = run_one(plan, index, connect(plan.to));
                    record(summary, plan, index, result);
                })
                .expect("spawn client worker");
        }
    });
}

/// One batch under `--hold`: every connection is established (or has
/// failed) before any of them transfers.
fn run_batch(plan: &Plan, start: usize, batch: usize, summary: &Arc<Mutex<ClientSummary>>) {
    let barrier = Barrier::new(batch);
    thread::scope(|scope| {
        for index in start..start + batch {
            let barrier = &barrier;
            thread::Builder::new()
                .stack_size(STACK_SIZE)
                .spawn_scoped(scope, move || {
                    let conn = connect(plan.to);
                    barrier.wait();
                    let result = run_one(plan, index, conn);
                    record(summary, plan, index, result);
                })
                .expect("spawn client connection");
        }
    });
}

fn connect(to: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).context("connect")?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// What a connection sent, once its echo was verified.
struct Sent {
    bytes: u64,
    sum: Fnv1a64,
}

/// Sends the connection's payload, half-closes, reads to EOF and compares.
fn transfer(stream: &TcpStream, plan: &Plan, index: usize) -> Result<Sent> {
    let bytes = plan.bytes;
    if bytes <= INLINE_WRITE_MAX {
        let mut payload = vec![0; bytes];
        plan.payload(index).fill(&mut payload);
        send_all(stream, &payload)?;
        let mut received = Vec::with_capacity(bytes);
        let mut reader = stream;
        reader.read_to_end(&mut received).context("read")?;
        if received.len() != payload.len() {
            anyhow::bail!("echoed {} bytes, sent {}", received.len(), payload.len());
        }
        if let Some(at) = received.iter().zip(&payload).position(|(a, b)| a != b) {
            anyhow::bail!("echo differs at byte {at} of {bytes}");
        }
        let mut sum = Fnv1a64::default();
        sum.update(&payload);
        return Ok(Sent { bytes: bytes as u64, sum });
    }
    thread::scope(|scope| {
        let writer = scope.spawn(|| send_stream(stream, plan.payload(index), bytes));
        let read = verify_stream(stream, plan.payload(index), bytes);
        let written = writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))?;
        let sum = written?;
        read?;
        Ok(Sent { bytes: bytes as u64, sum })
    })
}

/// Writes `len` bytes of `payload`, then half-closes; returns their checksum.
fn send_stream(mut stream: &TcpStream, mut payload: Payload, len: usize) -> Result<Fnv1a64> {
    let mut block = vec![0; BLOCK];
    let mut sum = Fnv1a64::default();
    let mut left = len;
    while left > 0 {
        let n = left.min(BLOCK);
        payload.fill(&mut block[..n]);
        sum.update(&block[..n]);
        stream.write_all(&block[..n]).with_context(|| format!("write at byte {}", len - left))?;
        left -= n;
    }
    stream.shutdown(Shutdown::Write).context("shutdown(write)")?;
    Ok(sum)
}

/// Reads to EOF, comparing with `expected` as it arrives.
fn verify_stream(mut stream: &TcpStream, mut expected: Payload, len: usize) -> Result<()> {
    let mut buf = vec![0; BLOCK];
    let mut want = vec![0; BLOCK];
    let mut got = 0usize;
    loop {
        let n = stream.read(&mut buf).with_context(|| format!("read at byte {got}"))?;
        if n == 0 {
            break;
        }
        if got + n > len {
            anyhow::bail!("echoed more than the {len} bytes sent");
        }
        expected.fill(&mut want[..n]);
        if let Some(at) = buf[..n].iter().zip(&want[..n]).position(|(a, b)| a != b) {
            anyhow::bail!("echo differs at byte {} of {len}", got + at);
        }
        got += n;
    }
    if got != len {
        anyhow::bail!("echoed {got} bytes, sent {len}");
    }
    Ok(())
}

/// `--chunks`: one chunk at a time, each echo verified, `interval` apart.
fn trickle(stream: &TcpStream, plan: &Plan, index: usize) -> Result<Sent> {
    let mut payload = plan.payload(index);
    let mut chunk = vec![0; plan.bytes];
    let mut echoed = vec![0; plan.bytes];
    let mut sum = Fnv1a64::default();
    let (mut reader, mut writer) = (stream, stream);
    for i in 0..plan.chunks {
        if i > 0 {
            thread::sleep(plan.interval);
        }
        payload.fill(&mut chunk);
        sum.update(&chunk);
        writer.write_all(&chunk).with_context(|| format!("write chunk {i} of {}", plan.chunks))?;
        reader.read_exact(&mut echoed).with_context(|| format!("read echo of chunk {i} of {}", plan.chunks))?;
        if echoed != chunk {
            anyhow::bail!("echo of chunk {i} differs");
        }
    }
    stream.shutdown(Shutdown::Write).context("shutdown(write)")?;
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).context("read to EOF")?;
    if !rest.is_empty() {
        anyhow::bail!("{} unexpected bytes after the last chunk", rest.len());
    }
    Ok(Sent { bytes: (plan.bytes * plan.chunks) as u64, sum })
}

fn send_all(mut stream: &TcpStream, payload: &[u8]) -> Result<()> {
    stream.write_all(payload).context("write")?;
    stream.shutdown(Shutdown::Write).context("shutdown(write)")
}
