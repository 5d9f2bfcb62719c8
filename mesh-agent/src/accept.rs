//! The accept step every listener of the agent and the CA shares: wait for
//! the next connection or for shutdown. An accept error (EMFILE, ENFILE,
//! ECONNABORTED) is logged and retried after a pause, so that running out of
//! descriptors never turns into a busy loop.

use std::{fmt::Display, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The pause after a failed accept.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The next connection on `listener`, or `None` once `stop` fires.
/// `listener_name` names the listener in the logs.
pub async fn next(
    listener: &TcpListener,
    listener_name: &(dyn Display + Sync),
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(c) => return Some(c),
                Err(e) => {
                    tracing::warn!(listener = %listener_name, error = %e, "accept failed");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            },
        }
    }
}
