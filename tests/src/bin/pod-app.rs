//! `pod-app`: the application the test bed runs inside pods.
//!
//! - `pod-app echo --listen ADDR`: echoes every byte until the client's
//!   EOF, then shuts down its write side (half-close honoured). A thread per
//!   connection; the listen backlog is large so bursts of connects are not
//!   dropped by the application itself.
//! - `pod-app client --to ADDR [--bytes N] [--conns C] [--parallel P] [--hold]`:
//!   C connections, at most P at once, each sending N bytes of
//!   [`heddle_tests::podapp::pattern`], half-closing, and checking the echo is
//!   byte-exact. With `--hold` each batch of P connections is established
//!   before any transfers (a barrier), which proves P concurrent connections.
//!   Prints one JSON [`ClientSummary`] line; exits 0 only if none failed.
//!
//! Plain threads and std sockets: the point is to behave like an ordinary
//! application, with nothing mesh-aware in it.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use heddle_tests::podapp::{pattern, ClientSummary};
use socket2::{Domain, Socket, Type};

/// Connect timeout per connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Read and write timeout per connection.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Payloads up to this size are written before reading; larger ones are
/// written from a second thread so a full echo path cannot deadlock.
const INLINE_WRITE_MAX: usize = 64 * 1024;
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
    /// Echo client that verifies every byte.
    Client {
        /// Server address.
        #[arg(long)]
        to: SocketAddr,
        /// Bytes per connection.
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
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Echo { listen } => echo(listen),
        Cmd::Client {
            to,
            bytes,
            conns,
            parallel,
            hold,
        } => {
            let summary = client(&Plan {
                to,
                bytes,
                conns,
                parallel: parallel.max(1),
                hold,
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
    socket
        .bind(&listen.into())
        .with_context(|| format!("bind {listen}"))?;
    socket.listen(4096)?;
    let listener: TcpListener = socket.into();
    eprintln!("echo: listening on {listen}");
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let spawned = thread::Builder::new()
                    .stack_size(STACK_SIZE)
                    .spawn(move || {
                        if let Err(e) = echo_one(&stream) {
                            eprintln!("echo: {e}");
                        }
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
fn echo_one(stream: &TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut reader = stream;
    let mut writer = stream;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        writer.write_all(&buf[..n])?;
    }
    stream.shutdown(Shutdown::Write)
}

/// What the client does.
struct Plan {
    to: SocketAddr,
    bytes: usize,
    conns: usize,
    parallel: usize,
    hold: bool,
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
    let summary = summary
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    summary
}

fn record(summary: &Mutex<ClientSummary>, index: usize, result: Result<()>) {
    let mut s = summary.lock().unwrap_or_else(PoisonError::into_inner);
    match result {
        Ok(()) => s.ok += 1,
        Err(e) => s.record_error(format!("conn {index}: {e:#}")),
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
                    let result = connect(plan.to).and_then(|s| transfer(&s, index, plan.bytes));
                    record(summary, index, result);
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
                    let result = conn.and_then(|s| transfer(&s, index, plan.bytes));
                    record(summary, index, result);
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

/// Sends the pattern of connection `index`, half-closes, reads to EOF and
/// compares.
fn transfer(stream: &TcpStream, index: usize, bytes: usize) -> Result<()> {
    let payload = pattern(index as u64, bytes);
    let received = if bytes <= INLINE_WRITE_MAX {
        send_all(stream, &payload)?;
        read_to_end(stream, bytes)?
    } else {
        thread::scope(|scope| {
            let writer = scope.spawn(|| send_all(stream, &payload));
            let read = read_to_end(stream, bytes);
            let written = writer
                .join()
                .map_err(|_| anyhow::anyhow!("writer panicked"))?;
            written?;
            read
        })?
    };
    if received.len() != payload.len() {
        anyhow::bail!("echoed {} bytes, sent {}", received.len(), payload.len());
    }
    if let Some(at) = received.iter().zip(&payload).position(|(a, b)| a != b) {
        anyhow::bail!("echo differs at byte {at} of {bytes}");
    }
    Ok(())
}

fn send_all(mut stream: &TcpStream, payload: &[u8]) -> Result<()> {
    stream.write_all(payload).context("write")?;
    stream.shutdown(Shutdown::Write).context("shutdown(write)")
}

fn read_to_end(mut stream: &TcpStream, expected: usize) -> Result<Vec<u8>> {
    let mut received = Vec::with_capacity(expected);
    stream.read_to_end(&mut received).context("read")?;
    Ok(received)
}
