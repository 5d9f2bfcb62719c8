//! Copies bytes both ways between a TCP stream and another byte stream (a
//! TCP stream or an HBONE tunnel stream), honouring half-close (an EOF on one
//! side becomes a shutdown of the other's write side) with bounded buffers,
//! so a slow reader applies back-pressure to the writer. An error on either
//! side resets the TCP side and drops the other, so neither application hangs.
//!
//! [`splice_until`] (TCP to TCP: the plaintext inbound leg) also stops when
//! told to (a policy change revoked the connection): both sides are then
//! reset, and the bytes copied so far are reported.
//!
//! Both also end when `finish` fires (the agent's drain deadline, after a
//! handover or at exit): then cleanly, not with a reset. Each side gets a
//! FIN, and what the peers still send is read and dropped for up to
//! [`CLOSE_GRACE`] while they close their ends, so no unread byte turns the
//! close into a reset. The application sees an orderly end of stream.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{self, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

use super::sockets::reset;

/// Buffer per direction.
const BUF_SIZE: usize = 64 * 1024;
/// How long a connection ended at the drain deadline waits for its peers
/// to close their side.
pub const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The error text of a connection ended at the drain deadline.
#[must_use]
pub fn drain_deadline() -> io::Error {
    io::Error::other("ended cleanly at the agent's drain deadline")
}

/// Reads and drops what `r` still sends until its end of stream.
pub async fn discard(r: &mut (impl AsyncRead + Unpin)) {
    // On the heap: this runs once per connection, at its very end, and must
    // not grow every connection's future.
    let mut buf = vec![0u8; 16 * 1024];
    while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// Result of a finished splice.
pub struct Spliced {
    /// Bytes read from the TCP side and written to the other.
    pub from_tcp: u64,
    /// Bytes read from the other side and written to the TCP side.
    pub to_tcp: u64,
    /// Why it ended, if not by EOF on both sides.
    pub error: Option<io::Error>,
}

/// A splice stopped by [`splice_until`]'s signal: both sides were reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Bytes read from the first stream until then.
    pub from_tcp: u64,
    /// Bytes read from the second stream until then.
    pub to_tcp: u64,
}

/// Splices two TCP streams until both directions are finished, or until
/// `finish` fires (then both end cleanly).
pub async fn splice(tcp: TcpStream, other: TcpStream, finish: &CancellationToken) -> Spliced {
    match splice_until(tcp, other, std::future::pending::<()>(), finish).await {
        Ok(done) => done,
        Err(stopped) => Spliced { from_tcp: stopped.from_tcp, to_tcp: stopped.to_tcp, error: None },
    }
}

/// [`splice`], unless `stop` completes first: then both are reset and the
/// bytes read from each so far are returned.
pub async fn splice_until(
    tcp: TcpStream,
    other: TcpStream,
    stop: impl Future,
    finish: &CancellationToken,
) -> Result<Spliced, Stopped> {
    let mut tcp = Counted::new(tcp);
    let mut other = Counted::new(other);
    let copied = tokio::select! {
        r = io::copy_bidirectional_with_sizes(&mut tcp, &mut other, BUF_SIZE, BUF_SIZE) => r,
        _ = stop => {
            let stopped = Stopped { from_tcp: tcp.read, to_tcp: other.read };
            reset(tcp.inner);
            reset(other.inner);
            return Err(stopped);
        }
        () = finish.cancelled() => {
            let (from_tcp, to_tcp) = (tcp.read, other.read);
            let (mut a, mut b) = (tcp.inner, other.inner);
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                let _ = tokio::join!(a.shutdown(), b.shutdown());
                tokio::join!(discard(&mut a), discard(&mut b));
            })
            .await;
            return Ok(Spliced { from_tcp, to_tcp, error: Some(drain_deadline()) });
        }
    };
    Ok(match copied {
        Ok((from_tcp, to_tcp)) => Spliced { from_tcp, to_tcp, error: None },
        Err(error) => {
            let (from_tcp, to_tcp) = (tcp.read, other.read);
            reset(tcp.inner);
            drop(other);
            Spliced { from_tcp, to_tcp, error: Some(error) }
        }
    })
}

/// A stream that counts the bytes read from it.
struct Counted<S> {
    inner: S,
    read: u64,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Self { inner, read: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.read += (buf.filled().len() - before) as u64;
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn a_stopped_splice_resets_both_peers_and_counts_what_was_copied() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_app, mut app) = pair().await;
        let stop = tokio_util::sync::CancellationToken::new();
        let splice = tokio::spawn({
            let stop = stop.clone();
            async move { splice_until(proxy_client, proxy_app, stop.cancelled_owned(), &CancellationToken::new()).await }
        });
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0; 5];
        app.read_exact(&mut buf).await.unwrap();
        stop.cancel();
        let stopped = splice.await.unwrap().err().expect("stopped");
        assert_eq!(stopped, Stopped { from_tcp: 5, to_tcp: 0 });
        for peer in [&mut client, &mut app] {
            let got = peer.read(&mut buf).await;
            assert_eq!(got.map_err(|e| e.kind()).unwrap_err(), std::io::ErrorKind::ConnectionReset);
        }
    }

    #[tokio::test]
    async fn at_the_drain_deadline_both_peers_see_an_orderly_end_even_while_sending() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_app, mut app) = pair().await;
        let finish = CancellationToken::new();
        let splice = tokio::spawn({
            let finish = finish.clone();
            async move { splice(proxy_client, proxy_app, &finish).await }
        });
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0; 5];
        app.read_exact(&mut buf).await.unwrap();
        finish.cancel();
        // Each peer reads end of stream (not a reset), then closes; bytes
        // sent after the deadline are dropped, not answered with a reset.
        for peer in [&mut client, &mut app] {
            let _ = peer.write_all(b"late").await;
            let mut rest = Vec::new();
            let got = peer.read_to_end(&mut rest).await;
            assert!(got.is_ok(), "orderly end expected, got {got:?}");
            peer.shutdown().await.unwrap();
        }
        let done = splice.await.unwrap();
        assert_eq!(done.from_tcp, 5);
        assert!(done.error.unwrap().to_string().contains("drain deadline"));
    }
}
