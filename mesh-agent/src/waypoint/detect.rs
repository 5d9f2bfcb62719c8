//! Protocol detection on a waypoint stream: the first bytes the client sends
//! say HTTP/2 (the connection preface), HTTP/1.x (a request line's method),
//! or something else, which the waypoint passes through as L4 with the
//! reason recorded. [`classify`] is pure; [`Prefixed`] replays the bytes
//! read for detection before the rest of the stream.
//!
//! A client that sends nothing for [`DETECT_TIMEOUT`] is treated as a
//! server-first protocol (opaque), as Istio's protocol sniffing does.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long to wait for the client's first bytes.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(500);
/// HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token we recognise, plus the space.
const MAX_METHOD: usize = 16;

/// What a stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or 1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// Not HTTP (or not yet known when the client went quiet).
    Opaque(&'static str),
}

/// What the bytes so far say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Classified {
    /// Decided.
    Is(Protocol),
    /// Not enough bytes yet.
    NeedMore,
}

/// Classifies the first bytes of a stream.
#[must_use]
pub fn classify(head: &[u8]) -> Classified {
    if head.is_empty() {
        return Classified::NeedMore;
    }
    let n = head.len().min(H2_PREFACE.len());
    if head[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Classified::Is(Protocol::Http2) } else { Classified::NeedMore };
    }
    // An HTTP/1 request starts with a method token (RFC 9110 §9: tchar;
    // in practice upper-case letters) and a space.
    for (i, b) in head.iter().enumerate().take(MAX_METHOD) {
        match b {
            b' ' if i > 0 => return Classified::Is(Protocol::Http1),
            b'A'..=b'Z' | b'-' | b'_' => {}
            _ => {
                return Classified::Is(Protocol::Opaque(
                    "not HTTP: first bytes are not a request line or the HTTP/2 preface",
                ))
            }
        }
    }
    if head.len() >= MAX_METHOD {
        Classified::Is(Protocol::Opaque("not HTTP: no method token"))
    } else {
        Classified::NeedMore
    }
}

/// Reads from `io` until the protocol is known (or the client is quiet for
/// [`DETECT_TIMEOUT`], or closes), returning it and the bytes read.
pub async fn detect<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<(Protocol, BytesMut)> {
    let mut head = BytesMut::with_capacity(64);
    loop {
        match classify(&head) {
            Classified::Is(p) => return Ok((p, head)),
            Classified::NeedMore => {}
        }
        match tokio::time::timeout(DETECT_TIMEOUT, io.read_buf(&mut head)).await {
            Ok(Ok(0)) => return Ok((Protocol::Opaque("not HTTP: client closed before a request"), head)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok((Protocol::Opaque("not HTTP: client sent nothing (server-first protocol?)"), head)),
        }
    }
}

/// A stream that first yields `prefix`, then reads from `inner`.
pub struct Prefixed<T> {
    prefix: BytesMut,
    inner: T,
}

impl<T> Prefixed<T> {
    /// Replays `prefix` before `inner`.
    pub fn new(prefix: BytesMut, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_http1_request_lines_and_the_h2_preface() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Classified::Is(Protocol::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Classified::Is(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Classified::Is(Protocol::Http2));
    }

    #[test]
    fn waits_for_more_on_a_partial_preface_or_method() {
        assert_eq!(classify(b"PRI * HT"), Classified::NeedMore);
        assert_eq!(classify(b"POS"), Classified::NeedMore);
        assert_eq!(classify(b""), Classified::NeedMore);
    }

    #[test]
    fn anything_else_is_opaque_with_a_reason() {
        for head in [&b"\x16\x03\x01\x02\x00"[..], b"get / HTTP/1.1", b"SSH-2.0-OpenSSH", b"AAAAAAAAAAAAAAAAAAAA"] {
            assert!(matches!(classify(head), Classified::Is(Protocol::Opaque(_))), "{head:?}");
        }
    }

    #[tokio::test]
    async fn replays_the_detected_bytes_before_the_rest() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        drop(a);
        let mut b = b;
        let (p, head) = detect(&mut b).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        let mut all = Vec::new();
        Prefixed::new(head, b).read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n\r\n");
    }
}
