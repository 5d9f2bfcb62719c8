//! The handover's wire: a Unix `SOCK_SEQPACKET` connection (message
//! boundaries kept), one JSON [`Message`] per packet, with at most one file
//! descriptor attached (`SCM_RIGHTS`). Every call blocks, with a timeout:
//! the handover runs on its own thread (incumbent) or on tokio's blocking
//! pool (successor), never on a runtime worker.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

use super::HandoverError;

/// Largest message; inventory records are a few hundred bytes.
const MAX_MESSAGE: usize = 16 * 1024;

/// What a listening socket is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// The node's admin API (`--admin-addr`).
    Admin,
    /// The node's Prometheus endpoint (`--metrics-addr`).
    Metrics,
    /// A pod's outbound capture listener (`127.0.0.1:15001`).
    Outbound,
    /// A pod's inbound capture listener (`127.0.0.1:15006`).
    Inbound,
    /// A pod's HBONE tunnel listener (`0.0.0.0:15008`).
    Tunnel,
}

/// One packet of the handover conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Message {
    /// Successor to incumbent: "hand me your listeners".
    #[serde(rename_all = "camelCase")]
    Hello {
        /// Protocol version, [`super::VERSION`].
        version: u32,
        /// The successor's process id, for the logs.
        pid: u32,
    },
    /// Incumbent to successor: one listening socket (the attached fd).
    #[serde(rename_all = "camelCase")]
    Listener {
        /// What it is for.
        role: Role,
        /// The pod's netns cookie (pod listeners only).
        cookie: Option<u64>,
        /// The pod, `namespace/name` (pod listeners only; for the logs).
        pod: Option<String>,
    },
    /// Incumbent to successor: the inventory is complete.
    #[serde(rename_all = "camelCase")]
    Done {
        /// How many listeners were sent.
        listeners: usize,
        /// The incumbent's process id.
        pid: u32,
    },
    /// Successor to incumbent: serving from every listener; stop accepting.
    Ready,
    /// Incumbent to successor: accepting stopped; draining this many connections.
    #[serde(rename_all = "camelCase")]
    Released {
        /// Connections still open at the incumbent.
        draining: usize,
    },
    /// Either side: the handover cannot go on.
    #[serde(rename_all = "camelCase")]
    Refused {
        /// Why.
        reason: String,
    },
}

/// One end of a handover connection.
pub struct Conn {
    socket: Socket,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> HandoverError {
    move |source| HandoverError::Io { what, source }
}

fn errno(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> HandoverError {
    move |e| HandoverError::Io { what, source: std::io::Error::from(e) }
}

impl Conn {
    /// Connects to the incumbent at `path`; `None` when nobody listens there
    /// (no socket file, or one left by an agent that is gone).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Option<Self>, HandoverError> {
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(io("socket"))?;
        let addr = SockAddr::unix(path).map_err(io("socket path"))?;
        match socket.connect(&addr) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED)) => return Ok(None),
            Err(e) => return Err(HandoverError::Io { what: "connect", source: e }),
        }
        Self::from_socket(socket, timeout).map(Some)
    }

    /// The user id of the process at the other end.
    pub fn peer_uid(&self) -> Result<u32, HandoverError> {
        nix::sys::socket::getsockopt(&self.socket, nix::sys::socket::sockopt::PeerCredentials)
            .map(|c| c.uid())
            .map_err(errno("SO_PEERCRED"))
    }

    /// Wraps an accepted connection.
    pub fn from_socket(socket: Socket, timeout: Duration) -> Result<Self, HandoverError> {
        socket.set_read_timeout(Some(timeout)).map_err(io("SO_RCVTIMEO"))?;
        socket.set_write_timeout(Some(timeout)).map_err(io("SO_SNDTIMEO"))?;
        Ok(Self { socket })
    }

    /// Sets how long [`Conn::recv`] waits.
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), HandoverError> {
        self.socket.set_read_timeout(Some(timeout)).map_err(io("SO_RCVTIMEO"))
    }

    /// Sends `msg`, with `fd` attached when given.
    pub fn send(&self, msg: &Message, fd: Option<RawFd>) -> Result<(), HandoverError> {
        let body = serde_json::to_vec(msg).expect("messages serialize");
        let iov = [IoSlice::new(&body)];
        let fds = fd.map(|f| [f]);
        let cmsgs: Vec<ControlMessage<'_>> = fds.as_ref().map(|f| ControlMessage::ScmRights(f)).into_iter().collect();
        let sent = loop {
            match sendmsg::<UnixAddr>(self.socket.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
                // A signal: sockets with a timeout are not restarted.
                Err(nix::errno::Errno::EINTR) => {}
                other => break other.map_err(errno("sendmsg"))?,
            }
        };
        if sent != body.len() {
            return Err(HandoverError::Protocol(format!("short send: {sent} of {} bytes", body.len())));
        }
        Ok(())
    }

    /// The next message and the fd attached to it. The peer closing the
    /// connection is [`HandoverError::Closed`].
    pub fn recv(&self) -> Result<(Message, Option<OwnedFd>), HandoverError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let (len, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = loop {
                let got =
                    recvmsg::<UnixAddr>(self.socket.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC);
                match got {
                    // A signal: sockets with a timeout are not restarted.
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(nix::errno::Errno::EAGAIN) => return Err(HandoverError::Timeout),
                    Err(e) => return Err(HandoverError::Io { what: "recvmsg", source: e.into() }),
                    Ok(msg) => break msg,
                }
            };
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(errno("control message"))? {
                if let ControlMessageOwned::ScmRights(got) = c {
                    // SAFETY: the kernel just installed these descriptors in
                    // this process for us; nothing else owns them.
                    fds.extend(got.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            if msg.flags.contains(MsgFlags::MSG_TRUNC) {
                return Err(HandoverError::Protocol("message larger than 16 KiB".into()));
            }
            (msg.bytes, fds)
        };
        if len == 0 {
            return Err(HandoverError::Closed);
        }
        if fds.len() > 1 {
            return Err(HandoverError::Protocol(format!("{} descriptors on one message", fds.len())));
        }
        let msg =
            serde_json::from_slice(&buf[..len]).map_err(|e| HandoverError::Protocol(format!("bad message: {e}")))?;
        Ok((msg, fds.into_iter().next()))
    }
}

/// Binds a listening handover socket at `path` without a moment in which
/// the path is missing: bound at a temporary name, then renamed over `path`
/// (which replaces a predecessor's socket file, or a stale one). The
/// directory is made `0700` and the socket `0600`: only this user can
/// connect (and the incumbent also checks the peer's uid).
pub fn publish(path: &Path) -> Result<Socket, HandoverError> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating the handover directory"))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("restricting the handover directory"))?;
    }
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(io("socket"))?;
    socket.bind(&SockAddr::unix(&tmp).map_err(io("socket path"))?).map_err(io("bind"))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(io("restricting the handover socket"))?;
    socket.listen(4).map_err(io("listen"))?;
    std::fs::rename(&tmp, path).map_err(io("publishing the handover socket"))?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_and_its_descriptor_cross_the_socket() {
        let dir = std::env::temp_dir().join(format!("heddle-wire-{}", std::process::id()));
        let path = dir.join("handover.sock");
        let listener = publish(&path).unwrap();
        let client = Conn::connect(&path, Duration::from_secs(5)).unwrap().expect("someone listens");
        let (accepted, _) = listener.accept().unwrap();
        let server = Conn::from_socket(accepted, Duration::from_secs(5)).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let msg = Message::Listener { role: Role::Tunnel, cookie: Some(7), pod: Some("demo/a".into()) };
        server.send(&msg, Some(tcp.as_raw_fd())).unwrap();
        server.send(&Message::Done { listeners: 1, pid: 1 }, None).unwrap();
        let (got, fd) = client.recv().unwrap();
        assert_eq!(got, msg);
        let received = std::net::TcpListener::from(fd.expect("a descriptor"));
        assert_eq!(received.local_addr().unwrap(), tcp.local_addr().unwrap(), "the same socket");
        assert!(matches!(client.recv().unwrap(), (Message::Done { listeners: 1, .. }, None)));
        drop(server);
        assert!(matches!(client.recv(), Err(HandoverError::Closed)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nobody_listening_is_no_incumbent() {
        let path = std::env::temp_dir().join(format!("heddle-wire-none-{}.sock", std::process::id()));
        assert!(Conn::connect(&path, Duration::from_secs(1)).unwrap().is_none());
        // A socket file whose owner is gone.
        let stale = publish(&path).unwrap();
        drop(stale);
        assert!(Conn::connect(&path, Duration::from_secs(1)).unwrap().is_none());
        std::fs::remove_file(&path).unwrap();
    }
}
