//! Splices a TCP stream with one HTTP/2 stream of an HBONE tunnel, using the
//! `h2` crate's stream halves directly.
//!
//! Why not hyper's upgrade: an upgraded HTTP/2 stream in hyper sends every
//! write through a capacity-1 channel to a helper task that feeds `h2` (one
//! extra task hop and one copy per write, in each agent, each direction).
//! Here the task that reads the TCP socket hands `Bytes` to `h2` itself, and
//! received DATA frames are written straight to the socket, with flow-control
//! capacity released only once written (so a slow application applies
//! back-pressure to the remote sender). Half-close maps to `END_STREAM` both
//! ways; an error, or the stop signal of [`splice_until`] (a policy change
//! revoked the connection), resets the TCP side and the stream
//! (`RST_STREAM CANCEL`), so neither application hangs or mistakes the end
//! for a clean close. The `finish` signal (the agent's drain deadline) ends
//! both cleanly instead: `END_STREAM` to the tunnel peer, FIN to the
//! application, then what they still send is dropped while they close (see
//! [`super::splice`]).

use std::{
    future::{poll_fn, Future},
    pin::pin,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

use super::{
    sockets::reset,
    splice::{discard, drain_deadline, Spliced, Stopped, CLOSE_GRACE},
};

/// Largest read from the TCP side per DATA frame batch.
const READ_CHUNK: usize = 64 * 1024;

/// One tunnelled stream: what we send and what we receive.
pub struct H2Stream {
    /// Our half.
    pub send: SendStream<Bytes>,
    /// Their half.
    pub recv: RecvStream,
}

/// Splices `tcp` and `stream` until both directions are finished, or
/// `finish` fires (then both end cleanly).
pub async fn splice(tcp: TcpStream, stream: H2Stream, finish: &CancellationToken) -> Spliced {
    match splice_until(tcp, stream, std::future::pending::<()>(), finish).await {
        Ok(done) => done,
        Err(stopped) => Spliced { from_tcp: stopped.from_tcp, to_tcp: stopped.to_tcp, error: None },
    }
}

/// [`splice`], unless `stop` completes first: then both sides are reset and
/// the bytes copied so far are returned.
pub async fn splice_until(
    tcp: TcpStream,
    stream: H2Stream,
    stop: impl Future,
    finish: &CancellationToken,
) -> Result<Spliced, Stopped> {
    let H2Stream { mut send, mut recv } = stream;
    let (mut rd, mut wr) = tcp.into_split();
    // Atomics only because the future must be `Send`; one task touches them.
    let (up_n, down_n) = (AtomicU64::new(0), AtomicU64::new(0));
    let (up, down, stopped, finished) = {
        let mut up = pin!(async {
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            loop {
                buf.reserve(READ_CHUNK);
                let n = rd.read_buf(&mut buf).await?;
                if n == 0 {
                    send.send_data(Bytes::new(), true).map_err(h2_io)?;
                    return Ok::<(), std::io::Error>(());
                }
                up_n.fetch_add(n as u64, Relaxed);
                let mut data = buf.split().freeze();
                while !data.is_empty() {
                    send.reserve_capacity(data.len());
                    let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                        Some(Ok(cap)) => cap,
                        // RFC 9113 §8.1: a server that sent its complete
                        // response may stop the request with NO_ERROR; the
                        // upload is over, not failed.
                        Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => return Ok(()),
                        Some(Err(e)) => return Err(h2_io(e)),
                        None => {
                            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "tunnel stream closed"))
                        }
                    };
                    let chunk = data.split_to(cap.min(data.len()));
                    send.send_data(chunk, false).map_err(h2_io)?;
                }
            }
        });
        let mut down = pin!(async {
            while let Some(chunk) = recv.data().await {
                let chunk = chunk.map_err(h2_io)?;
                wr.write_all(&chunk).await?;
                down_n.fetch_add(chunk.len() as u64, Relaxed);
                let _ = recv.flow_control().release_capacity(chunk.len());
            }
            wr.shutdown().await?;
            Ok::<(), std::io::Error>(())
        });
        let mut stop = pin!(stop);
        // Both directions run until done; the first error, or `stop`, ends both.
        let (mut up_res, mut down_res, mut stopped, mut finished) = (None, None, false, false);
        while up_res.is_none() || down_res.is_none() {
            tokio::select! {
                r = &mut up, if up_res.is_none() => {
                    let failed = r.is_err();
                    up_res = Some(r);
                    if failed { break; }
                }
                r = &mut down, if down_res.is_none() => {
                    let failed = r.is_err();
                    down_res = Some(r);
                    if failed { break; }
                }
                _ = &mut stop => {
                    stopped = true;
                    break;
                }
                () = finish.cancelled() => {
                    finished = true;
                    break;
                }
            }
        }
        (up_res, down_res, stopped, finished)
    };
    let (from_tcp, to_tcp) = (up_n.load(Relaxed), down_n.load(Relaxed));
    let abort = |send: &mut SendStream<Bytes>, rd, wr| {
        send.send_reset(h2::Reason::CANCEL);
        if let Ok(tcp) = tokio::net::tcp::OwnedReadHalf::reunite(rd, wr) {
            reset(tcp);
        }
    };
    if stopped {
        abort(&mut send, rd, wr);
        return Err(Stopped { from_tcp, to_tcp });
    }
    if finished {
        Box::pin(end_cleanly(send, recv, rd, wr, (up.is_some(), down.is_some()))).await;
        return Ok(Spliced { from_tcp, to_tcp, error: Some(drain_deadline()) });
    }
    let unfinished = || std::io::Error::other("other direction failed");
    match (up.unwrap_or_else(|| Err(unfinished())), down.unwrap_or_else(|| Err(unfinished()))) {
        (Ok(()), Ok(())) => Ok(Spliced { from_tcp, to_tcp, error: None }),
        (up, down) => {
            abort(&mut send, rd, wr);
            Ok(Spliced { from_tcp, to_tcp, error: up.err().or_else(|| down.err()) })
        }
    }
}

/// Ends a splice at the drain deadline: `END_STREAM` to the tunnel peer and
/// FIN to the application for the directions still open (`done`: up, down),
/// then drops what they still send while they close, for [`CLOSE_GRACE`].
async fn end_cleanly(
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    done: (bool, bool),
) {
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if !done.0 {
            let _ = send.send_data(Bytes::new(), true);
        }
        if !done.1 {
            let _ = wr.shutdown().await;
        }
        let from_peer = async {
            while let Some(Ok(chunk)) = recv.data().await {
                let _ = recv.flow_control().release_capacity(chunk.len());
            }
        };
        tokio::join!(discard(&mut rd), from_peer);
    })
    .await;
}

fn h2_io(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| std::io::Error::other("h2 I/O error"))
    } else {
        std::io::Error::other(e)
    }
}
