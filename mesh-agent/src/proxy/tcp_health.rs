//! TCP health of a proxied connection: smoothed RTT and retransmits, read
//! from the kernel with `getsockopt(TCP_INFO)` on the agent's
//! network-facing socket (see "TCP health" in ARCHITECTURE.md).
//!
//! `tcpi_rtt` is the kernel's smoothed RTT (`srtt_us >> 3`, the value the
//! `sock_ops` RTT callback reports) and `tcpi_total_retrans` the segments
//! retransmitted over the socket's life. Which socket: the pooled HBONE
//! tunnel connection for a tunnelled outbound stream (shared by every
//! stream of that tunnel, so retransmits are reported as the *delta* over
//! the flow's lifetime), the accepted tunnel connection for an inbound
//! stream, the direct upstream socket for plaintext outbound forwarding and
//! the accepted client socket for plaintext inbound. The sockets between the
//! application and the agent are in-pod loopback: no meaningful RTT.
//!
//! A [`TcpProbe`] holds a `dup` of the socket so it can be read after the
//! proxy has handed the socket to TLS/HTTP/2 or to the splice. The owner
//! calls [`TcpProbe::release`] when the connection ends, which keeps the
//! last sample and closes the duplicate, so the probe never keeps a dead
//! connection open (a pooled tunnel closes when its driver ends, not when
//! its last flow record is written).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    sync::{Arc, Mutex},
};

/// One reading of a socket's TCP health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpHealth {
    /// Smoothed round-trip time, microseconds (`tcpi_rtt`).
    pub rtt_us: u32,
    /// Segments retransmitted over the socket's life (`tcpi_total_retrans`).
    pub total_retrans: u32,
}

/// Reads `TCP_INFO` of `fd`.
pub fn read(fd: BorrowedFd<'_>) -> io::Result<TcpHealth> {
    // SAFETY: `tcp_info` is plain old data, valid when zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).expect("tcp_info fits socklen_t");
    // SAFETY: `fd` is a live descriptor (borrowed for the call); the kernel
    // writes at most `len` bytes into `info`, which is that large, and
    // reports how many it wrote (older kernels write fewer: the rest stays
    // zero).
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpHealth { rtt_us: info.tcpi_rtt, total_retrans: info.tcpi_total_retrans })
}

/// A readable handle on a network-facing TCP socket.
#[derive(Debug)]
pub struct TcpProbe {
    fd: Mutex<Option<OwnedFd>>,
    last: Mutex<Option<TcpHealth>>,
}

impl TcpProbe {
    /// A probe on `socket` (a duplicate descriptor); `None` if it cannot be
    /// duplicated (out of descriptors): the flow then carries no health.
    pub fn of(socket: &impl AsFd) -> Option<Self> {
        let fd = socket.as_fd().try_clone_to_owned().ok()?;
        let probe = Self { fd: Mutex::new(Some(fd)), last: Mutex::new(None) };
        probe.sample();
        Some(probe)
    }

    /// The socket's health now, or the last reading once released.
    pub fn sample(&self) -> Option<TcpHealth> {
        let fd = self.fd.lock().expect("probe lock");
        let mut last = self.last.lock().expect("probe lock");
        if let Some(fd) = fd.as_ref() {
            if let Ok(h) = read(fd.as_fd()) {
                *last = Some(h);
            }
        }
        *last
    }

    /// Takes a last reading and closes the duplicate descriptor.
    pub fn release(&self) {
        self.sample();
        self.fd.lock().expect("probe lock").take();
    }

    /// Starts measuring one flow on this socket.
    #[must_use]
    pub fn flow(self: &Arc<Self>) -> FlowHealth {
        FlowHealth { probe: self.clone(), start_retrans: self.sample().map(|h| h.total_retrans) }
    }
}

/// The health of one flow carried by a probed socket: its RTT, and the
/// retransmits since the flow started.
#[derive(Debug)]
pub struct FlowHealth {
    probe: Arc<TcpProbe>,
    start_retrans: Option<u32>,
}

impl FlowHealth {
    /// `(rtt_us, retransmits since the flow started)`, as far as known.
    #[must_use]
    pub fn now(&self) -> crate::flows::TcpStats {
        let h = self.probe.sample();
        crate::flows::TcpStats {
            rtt_us: h.map(|h| h.rtt_us).filter(|&r| r > 0),
            retransmits: h.zip(self.start_retrans).map(|(h, s)| h.total_retrans.wrapping_sub(s)),
        }
    }

    /// The RTT only (for open records: no retransmits yet).
    #[must_use]
    pub fn at_open(&self) -> crate::flows::TcpStats {
        crate::flows::TcpStats { rtt_us: self.now().rtt_us, retransmits: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn reads_a_nonzero_rtt_from_a_connected_loopback_socket() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _s = l.accept().unwrap();
        let h = read(c.as_fd()).unwrap();
        assert!(h.rtt_us > 0, "{h:?}");
        assert_eq!(h.total_retrans, 0);
    }

    #[test]
    fn a_released_probe_keeps_its_last_reading_and_closes_its_duplicate() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _s = l.accept().unwrap();
        let probe = Arc::new(TcpProbe::of(&c).unwrap());
        let flow = probe.flow();
        let before = flow.now();
        assert!(before.rtt_us.is_some() && before.retransmits == Some(0));
        probe.release();
        assert!(probe.fd.lock().unwrap().is_none());
        assert_eq!(flow.now(), before);
        assert_eq!(flow.at_open().retransmits, None);
    }

    #[test]
    fn a_socket_that_is_not_tcp_gives_an_error_not_a_reading() {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(read(u.as_fd()).is_err());
    }
}
