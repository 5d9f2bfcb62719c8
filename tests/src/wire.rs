//! What crosses the link between nodes: `tcpdump` on a switch port, and what
//! its capture shows.
//!
//! [`crate::Testbed::capture_link`] starts `tcpdump` in the switch namespace
//! on the port of one node (`n<i>`, the other end of that node's `eth0`), so
//! it sees every frame that node exchanges with the other nodes and nothing
//! it does not. (Capturing on the switch's bridge device would miss
//! forwarded unicast frames.) The process runs in the test bed's `tools`
//! cgroup and writes a pcap file in the temp dir; both go away with the test
//! bed. [`WireCapture::stop`] ends it and returns a [`WireReport`]: the TCP
//! segments ([`pcap`]), per-port stream analysis ([`tls`]), and whether a
//! byte pattern appears anywhere in the capture.

pub mod pcap;
pub mod tls;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::env::{find_tool, TCPDUMP};
use crate::error::{Result, TestbedError};
use crate::exec::Process;
use crate::handles::spawn_logged;
use crate::testbed::Shared;
use crate::wait::{poll_until, Check};

use self::pcap::TcpSegment;
use self::tls::{reassemble, Stream, TlsSummary};

/// How long tcpdump gets to open the interface.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long tcpdump gets to flush and exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running `tcpdump`; killed if dropped without [`WireCapture::stop`].
#[derive(Debug)]
pub struct WireCapture {
    process: Process,
    file: PathBuf,
    interface: String,
}

impl WireCapture {
    /// Starts tcpdump on `interface` of the netns `netns` (a path), with the
    /// capture filter `filter` (e.g. `tcp`), and waits until it listens.
    pub(crate) fn start(shared: &Shared, netns: &Path, interface: &str, filter: &str) -> Result<Self> {
        let bin = find_tool(TCPDUMP).ok_or(TestbedError::MissingTool {
            binary: TCPDUMP.binary,
            package: TCPDUMP.package,
            detail: String::new(),
        })?;
        let file = shared.log_file(&format!("capture-{interface}")).with_extension("pcap");
        let mut cmd = Command::new(bin);
        // --immediate-mode: hand each packet over at once (otherwise the
        // kernel ring passes them in blocks, and the last partial block of a
        // capture stopped right after a transfer is lost); -U: write each
        // packet at once; -Z root: keep the right to write into the
        // root-owned temp dir; -B: a 16 MiB kernel buffer, so a burst does
        // not drop packets; -s 0: whole packets.
        cmd.args(["-i", interface, "-n", "-s", "0", "--immediate-mode", "-U"])
            .args(["-Z", "root", "-B", "16384", "-w"])
            .arg(&file)
            .args(filter.split_whitespace());
        let mut process = spawn_logged(shared, cmd, netns, &shared.tools_cgroup(), "tcpdump")?;
        let what = format!("tcpdump to listen on {interface}");
        poll_until(&what, START_TIMEOUT, Duration::from_millis(50), || {
            let log = process.log_text();
            if log.contains("listening on") {
                return Ok(Check::Ready(()));
            }
            if let Some(status) = process.try_wait()? {
                return Err(TestbedError::Environment(format!("tcpdump exited ({status}): {}", log.trim())));
            }
            Ok(Check::Pending(log.trim().to_owned()))
        })?;
        Ok(Self { process, file, interface: interface.to_owned() })
    }

    /// The pcap file being written.
    #[must_use]
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Stops tcpdump (it flushes on SIGTERM) and reads what it captured.
    pub fn stop(mut self) -> Result<WireReport> {
        // Let the last packets of a transfer that just ended reach the ring.
        std::thread::sleep(Duration::from_millis(200));
        self.process.stop(STOP_GRACE)?;
        let log = self.process.log_text();
        let raw =
            std::fs::read(&self.file).map_err(|e| TestbedError::io(format!("read {}", self.file.display()), e))?;
        let packets = pcap::parse(&raw)
            .map_err(|e| TestbedError::Environment(format!("capture {}: {e}", self.file.display())))?;
        Ok(WireReport {
            interface: self.interface.clone(),
            file: self.file.clone(),
            packets: packets.packets,
            kernel_drops: dropped_by_kernel(&log),
            segments: packets.segments,
            raw,
        })
    }
}

/// "N packets dropped by kernel" from tcpdump's exit statistics.
fn dropped_by_kernel(log: &str) -> Option<u64> {
    log.lines()
        .find(|l| l.contains("dropped by kernel"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// What a capture saw.
#[derive(Debug, Clone)]
pub struct WireReport {
    /// The interface captured on.
    pub interface: String,
    /// The pcap file (in the temp dir; kept with `HEDDLE_KEEP_TMP`).
    pub file: PathBuf,
    /// Packets captured.
    pub packets: usize,
    /// Packets the kernel dropped before tcpdump read them, if it said.
    pub kernel_drops: Option<u64>,
    /// The TCP/IPv4 segments.
    pub segments: Vec<TcpSegment>,
    raw: Vec<u8>,
}

impl WireReport {
    /// Segments to or from TCP `port`.
    pub fn segments_on_port(&self, port: u16) -> impl Iterator<Item = &TcpSegment> {
        self.segments.iter().filter(move |s| s.src.port() == port || s.dst.port() == port)
    }

    /// Packets to or from TCP `port`.
    #[must_use]
    pub fn packets_on_port(&self, port: u16) -> usize {
        self.segments_on_port(port).count()
    }

    /// TCP payload bytes to or from `port`.
    #[must_use]
    pub fn payload_bytes_on_port(&self, port: u16) -> u64 {
        self.segments_on_port(port).map(|s| s.payload.len() as u64).sum()
    }

    /// The streams of connections to or from `port`.
    #[must_use]
    pub fn streams_on_port(&self, port: u16) -> Vec<Stream> {
        reassemble(self.segments_on_port(port))
    }

    /// Whether the streams to and from `port` are TLS, record by record.
    #[must_use]
    pub fn tls_on_port(&self, port: u16) -> TlsSummary {
        TlsSummary::of(&self.streams_on_port(port))
    }

    /// Whether `needle` appears anywhere: in the raw file (any packet,
    /// headers included) or in any reassembled stream (across segments).
    #[must_use]
    pub fn contains(&self, needle: &[u8]) -> bool {
        let found = |hay: &[u8]| !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle);
        found(&self.raw) || reassemble(&self.segments).iter().any(|s| found(&s.bytes))
    }

    /// One line for people: what the capture shows about `port` and
    /// whether `marker` was seen.
    #[must_use]
    pub fn describe(&self, port: u16, marker: &str) -> String {
        let tls = self.tls_on_port(port);
        let mut out = format!(
            "captured {} packets on {} ({} on port {port}), {} TLS application-data records, plaintext marker found: {}",
            self.packets,
            self.interface,
            self.packets_on_port(port),
            tls.application_data_records(),
            if self.contains(marker.as_bytes()) { "yes" } else { "no" },
        );
        if let Some(drops) = self.kernel_drops.filter(|d| *d > 0) {
            let _ = write!(out, " ({drops} packets dropped by the kernel)");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::pcap::tests::{file, frame};
    use super::*;

    #[test]
    fn reads_tcpdump_drop_statistics() {
        let log = "tcpdump: listening on n1\n12 packets captured\n12 packets received by filter\n3 packets dropped by kernel\n";
        assert_eq!(dropped_by_kernel(log), Some(3));
        assert_eq!(dropped_by_kernel("nothing"), None);
    }

    #[test]
    fn finds_a_marker_split_across_segments_and_reports_tls_per_port() {
        let (a, b) = ("10.44.1.2:40000", "10.44.2.2:8080");
        let raw = file(&[frame(a, b, 0, 0x02, b""), frame(a, b, 1, 0x18, b"..SEC"), frame(a, b, 6, 0x18, b"RET..")]);
        let packets = pcap::parse(&raw).unwrap();
        let report = WireReport {
            interface: "n1".into(),
            file: PathBuf::new(),
            packets: packets.packets,
            kernel_drops: None,
            segments: packets.segments,
            raw,
        };
        assert!(report.contains(b"SECRET"));
        assert!(!report.contains(b"PASSWORD"));
        assert_eq!(report.packets_on_port(8080), 3);
        assert_eq!(report.packets_on_port(15008), 0);
        assert!(!report.tls_on_port(8080).all_tls());
        assert!(report
            .describe(15008, "SECRET")
            .ends_with("0 TLS application-data records, plaintext marker found: yes"));
    }
}
