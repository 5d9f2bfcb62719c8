//! A byte stream over one HTTP/2 stream of an HBONE tunnel, so hyper can
//! speak HTTP inside it: the waypoint serves the client's HTTP over the
//! stream its CONNECT opened, and sends each upstream request over a stream
//! of its own tunnel to the endpoint.
//!
//! Reads take DATA frames and release their flow-control capacity once
//! handed to the reader (back-pressure reaches the remote sender); writes
//! reserve capacity and send what the window allows; shutdown sends
//! `END_STREAM`. A reset stream is an I/O error on both sides.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::h2splice::H2Stream;

/// [`H2Stream`] as `AsyncRead + AsyncWrite`.
pub struct H2Io {
    stream: H2Stream,
    /// The rest of the last DATA frame not yet read.
    pending: Bytes,
    eof: bool,
    /// `END_STREAM` sent: our side finished cleanly.
    shut: bool,
}

impl H2Io {
    /// Wraps an open stream.
    #[must_use]
    pub fn new(stream: H2Stream) -> Self {
        Self { stream, pending: Bytes::new(), eof: false, shut: false }
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for H2Io {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.stream.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.stream.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => this.eof = true,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.stream.send;
        send.reserve_capacity(buf.len());
        let granted = loop {
            if send.capacity() > 0 {
                break send.capacity();
            }
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(n)) if n > 0 => break n,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        };
        let n = granted.min(buf.len());
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames from its connection task; nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            let _ = self.stream.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for H2Io {
    fn drop(&mut self) {
        // A stream dropped before END_STREAM was not finished cleanly: reset
        // it so the other side does not wait. After END_STREAM a reset would
        // discard data h2 has not written yet; h2 itself ends a stream whose
        // peer is still sending (RST_STREAM NO_ERROR, RFC 9113 §8.1) once
        // the queued data is out.
        if !self.shut {
            self.stream.send.send_reset(h2::Reason::CANCEL);
        }
    }
}
