//! A client of an agent's live flow stream (`GET /flows?follow=true`),
//! connected from inside the agent's node namespace like `heddle flows
//! --follow` on that node. It can stay stalled (never read) to show that a
//! slow subscriber costs the data path nothing, then read to see what the
//! agent says about the records it lost.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::agent::ADMIN_ADDR;
use crate::error::{Result, TestbedError};
use crate::exec::in_netns;
use crate::handles::Node;

/// An open flow stream.
#[derive(Debug)]
pub struct FlowStreamClient {
    stream: TcpStream,
    read: Vec<u8>,
}

impl FlowStreamClient {
    /// Opens `GET /flows?<query>` on the agent of `node` with a receive
    /// buffer of `rcvbuf` bytes (small, to stall quickly) and sends the
    /// request; reads nothing.
    pub fn open(node: &Node, query: &str, rcvbuf: usize) -> Result<Self> {
        let addr: SocketAddr = ADMIN_ADDR.parse().expect("static address");
        let stream = in_netns(&node.netns_path(), move || -> io::Result<TcpStream> {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.set_recv_buffer_size(rcvbuf)?;
            s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
            Ok(s.into())
        })?
        .map_err(|e| TestbedError::io(format!("connect to the admin API on {}", node.name()), e))?;
        let mut c = Self { stream, read: Vec::new() };
        let request = format!("GET /flows?{query} HTTP/1.1\r\nHost: {ADMIN_ADDR}\r\nAccept: application/jsonl\r\n\r\n");
        c.stream.write_all(request.as_bytes()).map_err(|e| TestbedError::io("send the flow stream request", e))?;
        Ok(c)
    }

    /// Reads until the body so far contains `needle` or `timeout` passes;
    /// returns everything read (headers and chunk framing included).
    pub fn read_until(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 64 * 1024];
        while !String::from_utf8_lossy(&self.read).contains(needle) && Instant::now() < deadline {
            self.stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .map_err(|e| TestbedError::io("set read timeout", e))?;
            match self.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.read.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(TestbedError::io("read the flow stream", e)),
            }
        }
        Ok(String::from_utf8_lossy(&self.read).into_owned())
    }
}
