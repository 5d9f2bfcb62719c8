//! Copies bytes both ways between two TCP streams, honouring half-close (an
//! EOF on one side becomes a `shutdown(SHUT_WR)` on the other) with bounded
//! buffers, so a slow reader applies back-pressure to the writer.
//! An error on either side resets both, so neither application hangs.

use tokio::{io, net::TcpStream};

use super::sockets::reset;

/// Buffer per direction.
const BUF_SIZE: usize = 64 * 1024;

/// Result of a finished splice.
pub struct Spliced {
    /// Bytes client → server.
    pub to_server: u64,
    /// Bytes server → client.
    pub to_client: u64,
    /// Why it ended, if not by EOF on both sides.
    pub error: Option<io::Error>,
}

/// Splices `client` and `server` until both directions are finished.
pub async fn splice(mut client: TcpStream, mut server: TcpStream) -> Spliced {
    match io::copy_bidirectional_with_sizes(&mut client, &mut server, BUF_SIZE, BUF_SIZE).await {
        Ok((to_server, to_client)) => Spliced {
            to_server,
            to_client,
            error: None,
        },
        Err(error) => {
            reset(client);
            reset(server);
            Spliced {
                to_server: 0,
                to_client: 0,
                error: Some(error),
            }
        }
    }
}
