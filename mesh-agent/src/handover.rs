//! Zero-downtime upgrade of the node agent: a new agent (the successor)
//! takes the listening sockets of the running one (the incumbent) over a
//! Unix socket with `SCM_RIGHTS`, so no listener is ever closed and no
//! connection is ever refused; the incumbent then stops accepting and
//! drains what it already has. The eBPF side needs nothing handed over: the
//! maps are pinned and the links are adopted in place (see
//! [`crate::datapath`]).
//!
//! The conversation ([`wire::Message`], one packet each):
//! 1. successor → `Hello`; the incumbent freezes its enrollment (no pod is
//!    enrolled or removed while its listeners are in two processes);
//! 2. incumbent → one `Listener` per socket (admin, metrics, and each pod's
//!    outbound, inbound and tunnel listeners, keyed by netns cookie), then
//!    `Done`; both processes now accept on the same sockets;
//! 3. the successor starts serving from them (certificates first) and
//!    sends `Ready`;
//! 4. the incumbent stops accepting, sends `GOAWAY` on its tunnel
//!    connections, answers `Released`, and drains until its connections end
//!    or the drain deadline passes (then they end cleanly: FIN or
//!    `END_STREAM`, not a reset).
//!
//! If the successor goes away before `Ready`, the incumbent thaws and goes
//! on serving (on the successor's programs, which it put into the shared
//! links: same maps, same layout; the successor sweeps nothing before it is
//! released). A successor whose `Ready` is not answered exits instead of
//! serving beside a thawed incumbent. See ARCHITECTURE.md, "Upgrades".

pub mod wire;

use std::{
    collections::HashMap,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
pub use wire::Role;
use wire::{Conn, Message};

/// Protocol version; a successor speaking another one is refused.
pub const VERSION: u32 = 1;
/// Time for each step of the conversation, except the one below.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the successor has between `Done` and `Ready` (its certificates).
const READY_TIMEOUT: Duration = Duration::from_mins(1);

/// Why a handover failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// A socket call failed.
    #[error("handover socket ({what}): {source}")]
    Io {
        /// The call.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer sent something unexpected.
    #[error("handover protocol: {0}")]
    Protocol(String),
    /// The peer refused.
    #[error("handover refused by the other agent: {0}")]
    Refused(String),
    /// The peer closed the connection.
    #[error("the other agent closed the handover connection")]
    Closed,
    /// The peer did not answer in time.
    #[error("the other agent did not answer in time")]
    Timeout,
}

/// The listeners received from the incumbent, taken one by one as the
/// successor starts serving them.
#[derive(Default)]
pub struct Inventory {
    listeners: HashMap<(Role, Option<u64>), OwnedFd>,
}

impl Inventory {
    /// The listener for `role` (of the pod with netns `cookie`), as a
    /// non-blocking std listener.
    pub fn take(&mut self, role: Role, cookie: Option<u64>) -> Option<std::net::TcpListener> {
        let listener = std::net::TcpListener::from(self.listeners.remove(&(role, cookie))?);
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    }

    /// How many are left.
    #[must_use]
    pub fn len(&self) -> usize {
        self.listeners.len()
    }

    /// Whether none are left.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }

    /// Closes what nobody took (pods the successor does not enroll) and
    /// says which those were.
    pub fn close_rest(&mut self) -> Vec<(Role, Option<u64>)> {
        self.listeners.drain().map(|(k, _)| k).collect()
    }
}

/// A takeover in progress (successor side).
pub struct Takeover {
    conn: Conn,
    /// The incumbent's process id.
    pub incumbent: u32,
    /// Its listeners.
    pub inventory: Inventory,
}

/// Asks the agent listening at `path` for its listeners. `None`: no agent
/// runs there (a first start, or a restart after a crash). Blocking.
pub fn take_over(path: &Path) -> Result<Option<Takeover>, HandoverError> {
    let Some(conn) = Conn::connect(path, STEP_TIMEOUT)? else {
        return Ok(None);
    };
    conn.send(&Message::Hello { version: VERSION, pid: std::process::id() }, None)?;
    let mut inventory = Inventory::default();
    loop {
        match conn.recv()? {
            (Message::Listener { role, cookie, pod }, Some(fd)) => {
                tracing::debug!(?role, cookie, pod = pod.as_deref().unwrap_or("-"), "listener received");
                inventory.listeners.insert((role, cookie), fd);
            }
            (Message::Done { listeners, pid }, None) => {
                if listeners != inventory.len() {
                    return Err(HandoverError::Protocol(format!(
                        "{listeners} listeners announced, {} received",
                        inventory.len()
                    )));
                }
                return Ok(Some(Takeover { conn, incumbent: pid, inventory }));
            }
            (Message::Refused { reason }, _) => return Err(HandoverError::Refused(reason)),
            (other, _) => return Err(HandoverError::Protocol(format!("unexpected {other:?}"))),
        }
    }
}

impl Takeover {
    /// Tells the incumbent the successor serves now; returns how many
    /// connections it is left draining. Blocking.
    pub fn finish(self) -> Result<usize, HandoverError> {
        self.conn.send(&Message::Ready, None)?;
        match self.conn.recv()?.0 {
            Message::Released { draining } => Ok(draining),
            Message::Refused { reason } => Err(HandoverError::Refused(reason)),
            other => Err(HandoverError::Protocol(format!("unexpected {other:?}"))),
        }
    }
}

/// One listener the incumbent offers.
pub struct Offered {
    /// What it is for.
    pub role: Role,
    /// The pod's netns cookie (pod listeners).
    pub cookie: Option<u64>,
    /// The pod (pod listeners).
    pub pod: Option<String>,
    /// A duplicate of the listening socket.
    pub fd: OwnedFd,
}

/// What the incumbent hands over.
pub trait Offer: Send + Sync + 'static {
    /// Stops enrolling and un-enrolling, and lists every listener.
    fn freeze(&self) -> Vec<Offered>;
    /// Resumes after an abandoned handover.
    fn thaw(&self);
}

/// A successor is ready: stop accepting, then send the number of
/// connections left to drain on `draining`.
pub struct Release {
    /// Where to answer.
    pub draining: oneshot::Sender<usize>,
}

/// The incumbent's handover socket, served on the `heddle-handover` thread.
pub struct Incumbent {
    path: PathBuf,
    inode: u64,
}

impl Incumbent {
    /// Publishes the handover socket at `path` and serves successors until
    /// one takes over: its release request then arrives on the returned
    /// channel.
    pub fn serve(path: &Path, offer: Arc<dyn Offer>) -> Result<(Self, mpsc::Receiver<Release>), HandoverError> {
        let listener = wire::publish(path)?;
        let inode = inode(path).unwrap_or_default();
        let (tx, rx) = mpsc::channel(1);
        std::thread::Builder::new()
            .name("heddle-handover".into())
            .spawn(move || accept_successors(&listener, &*offer, &tx))
            .map_err(|source| HandoverError::Io { what: "thread", source })?;
        Ok((Self { path: path.to_owned(), inode }, rx))
    }

    /// Removes the socket file at exit, unless a successor replaced it.
    pub fn withdraw(&self) {
        if inode(&self.path) == Some(self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

fn accept_successors(listener: &socket2::Socket, offer: &dyn Offer, release: &mpsc::Sender<Release>) {
    loop {
        let socket = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "handover accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let conn = match Conn::from_socket(socket, STEP_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "handover connection");
                continue;
            }
        };
        match hand_over(&conn, offer, release) {
            Ok(draining) => {
                tracing::debug!(draining, "handover complete");
                return;
            }
            Err(e) => {
                offer.thaw();
                let _ = conn.send(&Message::Refused { reason: e.to_string() }, None);
                tracing::warn!(error = %e, "handover abandoned; serving on");
            }
        }
    }
}

fn hand_over(conn: &Conn, offer: &dyn Offer, release: &mpsc::Sender<Release>) -> Result<usize, HandoverError> {
    // Only this agent's own user may take its listeners (the socket's mode
    // says so too; this holds even if the file's mode were changed).
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let peer = conn.peer_uid()?;
    if peer != me {
        return Err(HandoverError::Protocol(format!("peer uid {peer} is not this agent's uid {me}")));
    }
    let pid = match conn.recv()?.0 {
        Message::Hello { version: VERSION, pid } => pid,
        Message::Hello { version, .. } => {
            return Err(HandoverError::Protocol(format!("successor speaks version {version}, this agent {VERSION}")))
        }
        other => return Err(HandoverError::Protocol(format!("unexpected {other:?}"))),
    };
    let offered = offer.freeze();
    tracing::info!(successor = pid, listeners = offered.len(), "a successor asks for the listeners; enrollment frozen");
    for o in &offered {
        conn.send(&Message::Listener { role: o.role, cookie: o.cookie, pod: o.pod.clone() }, Some(o.fd.as_raw_fd()))?;
    }
    conn.send(&Message::Done { listeners: offered.len(), pid: std::process::id() }, None)?;
    drop(offered);
    conn.set_timeout(READY_TIMEOUT)?;
    match conn.recv()?.0 {
        Message::Ready => {}
        other => return Err(HandoverError::Protocol(format!("unexpected {other:?}"))),
    }
    let (tx, rx) = oneshot::channel();
    release.blocking_send(Release { draining: tx }).map_err(|_| HandoverError::Closed)?;
    // From here on the agent is releasing: whatever the successor does now,
    // there is no going back.
    let draining = rx.blocking_recv().unwrap_or_default();
    if let Err(e) = conn.send(&Message::Released { draining }, None) {
        tracing::warn!(error = %e, "cannot tell the successor the listeners are released");
    }
    Ok(draining)
}
