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
//! ways; an error resets the TCP side and the stream (`RST_STREAM CANCEL`).

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use std::{future::poll_fn, pin::pin};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{sockets::reset, splice::Spliced};

/// Largest read from the TCP side per DATA frame batch.
const READ_CHUNK: usize = 64 * 1024;

/// One tunnelled stream: what we send and what we receive.
pub struct H2Stream {
    /// Our half.
    pub send: SendStream<Bytes>,
    /// Their half.
    pub recv: RecvStream,
}

/// Splices `tcp` and `stream` until both directions are finished.
pub async fn splice(tcp: TcpStream, stream: H2Stream) -> Spliced {
    let H2Stream { mut send, mut recv } = stream;
    let (mut rd, mut wr) = tcp.into_split();
    let (up, down) = {
        let mut up = pin!(async {
        let mut total = 0u64;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buf.reserve(READ_CHUNK);
            let n = rd.read_buf(&mut buf).await?;
            if n == 0 {
                send.send_data(Bytes::new(), true).map_err(h2_io)?;
                return Ok::<u64, std::io::Error>(total);
            }
            total += n as u64;
            let mut data = buf.split().freeze();
            while !data.is_empty() {
                send.reserve_capacity(data.len());
                let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(cap)) => cap,
                    Some(Err(e)) => return Err(h2_io(e)),
                    None => return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "tunnel stream closed")),
                };
                let chunk = data.split_to(cap.min(data.len()));
                send.send_data(chunk, false).map_err(h2_io)?;
            }
        }
        });
        let mut down = pin!(async {
        let mut total = 0u64;
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(h2_io)?;
            wr.write_all(&chunk).await?;
            total += chunk.len() as u64;
            let _ = recv.flow_control().release_capacity(chunk.len());
        }
        wr.shutdown().await?;
        Ok::<u64, std::io::Error>(total)
        });
        // Both directions run until done; the first error stops both.
        let (mut up_res, mut down_res) = (None, None);
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
            }
        }
        (up_res, down_res)
    };
    let unfinished = || std::io::Error::other("other direction failed");
    let up = up.unwrap_or_else(|| Err(unfinished()));
    let down = down.unwrap_or_else(|| Err(unfinished()));
    match (up, down) {
        (Ok(from_tcp), Ok(to_tcp)) => Spliced {
            from_tcp,
            to_tcp,
            error: None,
        },
        (up, down) => {
            send.send_reset(h2::Reason::CANCEL);
            if let Ok(tcp) = rd.reunite(wr) {
                reset(tcp);
            }
            Spliced {
                from_tcp: *up.as_ref().unwrap_or(&0),
                to_tcp: *down.as_ref().unwrap_or(&0),
                error: up.err().or_else(|| down.err()),
            }
        }
    }
}

fn h2_io(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| std::io::Error::other("h2 I/O error"))
    } else {
        std::io::Error::other(e)
    }
}
