//! `loadgen`: the HTTP pieces of `cargo xtask bench`, run inside test-bed pods.
//!
//! * `loadgen serve --listen ADDR --size N`: an HTTP/1.1 server (hyper) that
//!   answers every request with N bytes.
//! * `loadgen http --to ADDR --rate R --duration S --conns C --size N`: an
//!   open-loop client: C keep-alive connections share R requests/s; each
//!   request (POST of N bytes) has a scheduled send time; when a slow
//!   response delays the next request, that request's latency is measured
//!   from its scheduled time (no coordinated omission), otherwise from when
//!   it was sent (so the timer's 1 ms granularity is not counted). Prints one JSON line with
//!   the count, errors and the p50/p90/p99/p99.9 latencies in microseconds.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt as _, Full};
use hyper::{service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "HTTP load generator and server for Heddle's benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve fixed-size HTTP/1.1 responses.
    Serve {
        /// Listen address.
        #[arg(long)]
        listen: SocketAddr,
        /// Response body size.
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
    /// Send requests at a fixed rate and report latency percentiles.
    Http {
        /// Server address.
        #[arg(long)]
        to: SocketAddr,
        /// Requests per second, all connections together.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Seconds to run.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Keep-alive connections.
        #[arg(long, default_value_t = 10)]
        conns: u32,
        /// Request body size.
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match cli.command {
        Cmd::Serve { listen, size } => rt.block_on(serve(listen, size)),
        Cmd::Http { to, rate, duration, conns, size } => {
            rt.block_on(load(to, rate, Duration::from_secs(duration), conns.max(1), size))
        }
    }
}

async fn serve(listen: SocketAddr, size: usize) -> Result<()> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
    let body = Bytes::from(vec![b'x'; size]);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    // Read the request body fully before answering.
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn load(to: SocketAddr, rate: u32, duration: Duration, conns: u32, size: usize) -> Result<()> {
    let per_conn = f64::from(rate) / f64::from(conns);
    let interval = Duration::from_secs_f64(1.0 / per_conn);
    let start = Instant::now() + Duration::from_millis(200);
    let body = Bytes::from(vec![b'y'; size]);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let body = body.clone();
        // Stagger connections evenly inside one interval.
        let offset = interval.mul_f64(f64::from(c) / f64::from(conns));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let stream = TcpStream::connect(to).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut k = 0u32;
            let mut prev_done = start;
            loop {
                let due = start + offset + interval * k;
                if due >= start + duration {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                // Charged from the scheduled time when the previous response
                // made this request late (no coordinated omission); from the
                // real send time when only the timer's granularity did.
                let t0 = if prev_done > due { due } else { Instant::now() };
                let req = Request::post(format!("http://{to}/"))
                    .header(hyper::header::HOST, to.to_string())
                    .body(Full::new(body.clone()))?;
                match sender.send_request(req).await {
                    // `to_bytes` consumes the body, so it cannot run in a match guard.
                    Ok(resp) => match resp.into_body().collect().await.map(http_body_util::Collected::to_bytes) {
                        Ok(b) if b.len() == size => {
                            lat.push(u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
                        }
                        _ => errors += 1,
                    },
                    Err(_) => errors += 1,
                }
                prev_done = Instant::now();
                k += 1;
            }
            anyhow::Ok((lat, errors))
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await??;
        all.extend(lat);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| -> u64 {
        if all.is_empty() {
            return 0;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        all[i]
    };
    println!(
        "{}",
        serde_json::json!({
            "requests": all.len(),
            "errors": errors,
            "p50_us": pct(0.50),
            "p90_us": pct(0.90),
            "p99_us": pct(0.99),
            "p999_us": pct(0.999),
        })
    );
    Ok(())
}
