//! Sockets opened inside a pod's network namespace: the in-pod listeners and
//! the agent's upstream connections, which carry [`AGENT_MARK`] so the
//! connect hook never redirects them.

use std::{io, net::SocketAddr, time::Duration};

use mesh_common::AGENT_MARK;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::netns::{Netns, NetnsError};

/// How long an upstream connect may take before the client is reset.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const LISTEN_BACKLOG: i32 = 4096;

/// Errors creating sockets in a pod.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Could not enter the namespace.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A socket call failed.
    #[error("{op} {addr}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The address involved.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The connect did not finish in time.
    #[error("connect {addr}: timed out after {}s", CONNECT_TIMEOUT.as_secs())]
    Timeout {
        /// The address.
        addr: SocketAddr,
    },
}

impl SocketError {
    /// A short stable reason for flow records and metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            SocketError::Netns(_) => "netns",
            SocketError::Io { source, .. } => match source.kind() {
                io::ErrorKind::ConnectionRefused => "connection_refused",
                io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => "unreachable",
                _ => "io",
            },
            SocketError::Timeout { .. } => "connect_timeout",
        }
    }
}

/// Binds a listener at `addr` inside `netns`.
pub fn listen_in(netns: &Netns, addr: SocketAddr) -> Result<TcpListener, SocketError> {
    let io_err = |op| move |source| SocketError::Io { op, addr, source };
    let socket = netns
        .run(|| Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)))?
        .map_err(io_err("socket"))?;
    socket.set_reuse_address(true).map_err(io_err("setsockopt"))?;
    socket.set_nonblocking(true).map_err(io_err("setsockopt"))?;
    socket.bind(&addr.into()).map_err(io_err("bind"))?;
    socket.listen(LISTEN_BACKLOG).map_err(io_err("listen"))?;
    TcpListener::from_std(socket.into()).map_err(io_err("register"))
}

/// Connects to `addr` from inside `netns`, with the agent's mark.
pub async fn connect_in(netns: &Netns, addr: SocketAddr) -> Result<TcpStream, SocketError> {
    finish_connect(upstream_socket(netns, addr)?, addr).await
}

/// Connects to `addr` from `local`, bound explicitly with `SO_REUSEADDR`
/// (see [`super::local_ports`]), from inside `netns`, with the agent's mark.
pub async fn connect_from(netns: &Netns, local: SocketAddr, addr: SocketAddr) -> Result<TcpStream, SocketError> {
    let socket = upstream_socket(netns, addr)?;
    socket.set_reuse_address(true).map_err(|source| SocketError::Io { op: "setsockopt SO_REUSEADDR", addr, source })?;
    socket.bind(&local.into()).map_err(|source| SocketError::Io { op: "bind", addr: local, source })?;
    finish_connect(socket, addr).await
}

/// A non-blocking TCP socket made in `netns`, marked as the agent's.
fn upstream_socket(netns: &Netns, addr: SocketAddr) -> Result<Socket, SocketError> {
    let io_err = |op| move |source| SocketError::Io { op, addr, source };
    let socket = netns
        .run(|| Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)))?
        .map_err(io_err("socket"))?;
    socket.set_mark(AGENT_MARK).map_err(io_err("setsockopt SO_MARK"))?;
    socket.set_nonblocking(true).map_err(io_err("setsockopt"))?;
    socket.set_tcp_nodelay(true).map_err(io_err("setsockopt"))?;
    Ok(socket)
}

async fn finish_connect(socket: Socket, addr: SocketAddr) -> Result<TcpStream, SocketError> {
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr)).await {
        Ok(r) => r.map_err(|source| SocketError::Io { op: "connect", addr, source }),
        Err(_) => Err(SocketError::Timeout { addr }),
    }
}

/// Closes `stream` with a reset (the peer sees ECONNRESET, not EOF).
pub fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
