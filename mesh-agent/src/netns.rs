//! Network namespaces: opening a pod's namespace, reading its cookie, and
//! creating sockets inside it.
//!
//! The agent runs in the node's namespace. A socket belongs to the namespace
//! its creating thread was in when `socket()` ran, so [`Netns::run`] switches
//! the *calling thread* into the pod's namespace, runs a short synchronous
//! closure (socket creation and set-up, never I/O), and switches back. If it
//! cannot switch back the thread would serve other pods from the wrong
//! namespace, so that is a fatal error (abort), as in ztunnel.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

/// `SO_NETNS_COOKIE` from include/uapi/asm-generic/socket.h (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Errors from namespace operations.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        /// Path of the namespace.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `setns` into the namespace failed.
    #[error("cannot enter network namespace {path}: {source}")]
    Enter {
        /// Path of the namespace.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading the namespace cookie failed.
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    Cookie {
        /// Path of the namespace.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// An open network namespace.
#[derive(Clone, Debug)]
pub struct Netns {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    path: PathBuf,
    home: Arc<File>,
}

impl Netns {
    /// Opens the namespace at `path`; `home` is the agent's own namespace,
    /// where threads return after [`Netns::run`].
    pub fn open(path: &Path, home: Arc<File>) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
        Ok(Self { inner: Arc::new(Inner { file, path: path.to_owned(), home }) })
    }

    /// The calling thread's current network namespace.
    pub fn current() -> Result<File, NetnsError> {
        let path = Path::new("/proc/thread-self/ns/net");
        File::open(path).map_err(|source| NetnsError::Open { path: path.to_owned(), source })
    }

    /// Path the namespace was opened from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` with the calling thread inside this namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        setns(self.inner.file.as_fd()).map_err(|source| NetnsError::Enter { path: self.inner.path.clone(), source })?;
        let out = f();
        if let Err(e) = setns(self.inner.home.as_fd()) {
            tracing::error!(error = %e, "cannot return to the agent's network namespace; aborting");
            std::process::abort();
        }
        Ok(out)
    }

    /// The namespace's cookie, as `bpf_get_netns_cookie` returns it.
    pub fn cookie(&self) -> Result<u64, NetnsError> {
        let cookie_err = |source| NetnsError::Cookie { path: self.inner.path.clone(), source };
        let sock = self
            .run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None))?
            .map_err(cookie_err)?;
        netns_cookie_of(&sock).map_err(cookie_err)
    }
}

/// Reads `SO_NETNS_COOKIE` of a socket.
pub fn netns_cookie_of(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid namespace fd; affects only this thread.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
