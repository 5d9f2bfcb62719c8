//! Copies bytes both ways between a TCP stream and another byte stream (a
//! TCP stream or an HBONE tunnel stream), honouring half-close (an EOF on one
//! side becomes a shutdown of the other's write side) with bounded buffers,
//! so a slow reader applies back-pressure to the writer. An error on either
//! side resets the TCP side and drops the other, so neither application hangs.

use tokio::{
    io::{self, AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::sockets::reset;

/// Buffer per direction.
const BUF_SIZE: usize = 64 * 1024;

/// Result of a finished splice.
pub struct Spliced {
    /// Bytes read from the TCP side and written to the other.
    pub from_tcp: u64,
    /// Bytes read from the other side and written to the TCP side.
    pub to_tcp: u64,
    /// Why it ended, if not by EOF on both sides.
    pub error: Option<io::Error>,
}

/// Splices `tcp` and `other` until both directions are finished.
pub async fn splice<S>(mut tcp: TcpStream, mut other: S) -> Spliced
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match io::copy_bidirectional_with_sizes(&mut tcp, &mut other, BUF_SIZE, BUF_SIZE).await {
        Ok((from_tcp, to_tcp)) => Spliced {
            from_tcp,
            to_tcp,
            error: None,
        },
        Err(error) => {
            reset(tcp);
            drop(other);
            Spliced {
                from_tcp: 0,
                to_tcp: 0,
                error: Some(error),
            }
        }
    }
}
