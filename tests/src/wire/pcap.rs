//! Reads the TCP/IPv4 segments out of a classic pcap file.
//!
//! Only what [`super::WireCapture`] writes is supported: the classic pcap
//! format (tcpdump's `-w` default; either byte order, micro- or nanosecond
//! timestamps) with Ethernet frames (link type 1, what a veth carries),
//! optionally 802.1Q-tagged, IPv4, TCP. Anything else in the file is counted
//! and skipped. A crate (`pcap-file`, `etherparse`) would be the usual
//! choice; this reader exists because adding one would change the
//! workspace's `Cargo.lock`, which the test bed must not touch while the
//! agent crate changes under it, and the subset is small and fixed. Layouts:
//! pcap — <https://www.tcpdump.org/manpages/pcap-savefile.5.html>; IPv4 —
//! RFC 791 §3.1; TCP — RFC 9293 §3.1.

use std::net::{Ipv4Addr, SocketAddrV4};

/// `network` value of Ethernet in the pcap global header.
const LINKTYPE_ETHERNET: u32 = 1;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;

/// One TCP segment seen on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSegment {
    /// Sender.
    pub src: SocketAddrV4,
    /// Receiver.
    pub dst: SocketAddrV4,
    /// Sequence number.
    pub seq: u32,
    /// SYN flag.
    pub syn: bool,
    /// FIN flag.
    pub fin: bool,
    /// RST flag.
    pub rst: bool,
    /// The TCP payload.
    pub payload: Vec<u8>,
}

/// What a pcap file holds.
#[derive(Debug, Clone, Default)]
pub struct Packets {
    /// Every packet record in the file.
    pub packets: usize,
    /// The TCP/IPv4 segments among them, in capture order.
    pub segments: Vec<TcpSegment>,
}

/// Why a file could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PcapError {
    /// Shorter than the 24-byte global header.
    #[error("not a pcap file: {0} bytes")]
    TooShort(usize),
    /// Not a classic pcap magic number (pcapng is not supported).
    #[error("not a classic pcap file (magic {0:#010x})")]
    BadMagic(u32),
    /// A link type other than Ethernet.
    #[error("unsupported link type {0} (expected Ethernet)")]
    LinkType(u32),
}

/// Parses `file`; a truncated last record (capture killed mid-write) ends
/// the list without an error.
pub fn parse(file: &[u8]) -> Result<Packets, PcapError> {
    if file.len() < 24 {
        return Err(PcapError::TooShort(file.len()));
    }
    let magic = u32::from_le_bytes(file[0..4].try_into().expect("4 bytes"));
    let little = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        other => return Err(PcapError::BadMagic(other)),
    };
    let u32_at = |at: usize| {
        let b: [u8; 4] = file[at..at + 4].try_into().expect("4 bytes");
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let link = u32_at(20);
    if link != LINKTYPE_ETHERNET {
        return Err(PcapError::LinkType(link));
    }
    let mut out = Packets::default();
    let mut at = 24;
    while at + 16 <= file.len() {
        let incl = u32_at(at + 8) as usize;
        let start = at + 16;
        let Some(frame) = file.get(start..start + incl) else {
            break;
        };
        out.packets += 1;
        if let Some(seg) = tcp_in_ethernet(frame) {
            out.segments.push(seg);
        }
        at = start + incl;
    }
    Ok(out)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The TCP segment in an Ethernet frame, if it carries one over IPv4.
fn tcp_in_ethernet(frame: &[u8]) -> Option<TcpSegment> {
    let mut ethertype = be16(frame, 12)?;
    let mut ip_at = 14;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(frame, 16)?;
        ip_at = 18;
    }
    if ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    tcp_in_ipv4(frame.get(ip_at..)?)
}

fn tcp_in_ipv4(ip: &[u8]) -> Option<TcpSegment> {
    let first = *ip.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || *ip.get(9)? != IPPROTO_TCP {
        return None;
    }
    // Fragment offset non-zero: not the start of a TCP header.
    if be16(ip, 6)? & 0x1fff != 0 {
        return None;
    }
    // Total length bounds the packet (Ethernet may pad short frames); a
    // segmentation-offload frame may carry 0 here, then the frame bounds it.
    let total = usize::from(be16(ip, 2)?);
    let end = if total >= ihl && total <= ip.len() { total } else { ip.len() };
    let tcp = ip.get(ihl..end)?;
    let data_at = usize::from(*tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    let addr = |at: usize| Ipv4Addr::from(be32(ip, at).unwrap_or_default());
    Some(TcpSegment {
        src: SocketAddrV4::new(addr(12), be16(tcp, 0)?),
        dst: SocketAddrV4::new(addr(16), be16(tcp, 2)?),
        seq: be32(tcp, 4)?,
        syn: flags & 0x02 != 0,
        fin: flags & 0x01 != 0,
        rst: flags & 0x04 != 0,
        payload: tcp.get(data_at..)?.to_vec(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An Ethernet/IPv4/TCP frame as a NIC would carry it (checksums 0).
    pub(crate) fn frame(src: &str, dst: &str, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let (src, dst): (SocketAddrV4, SocketAddrV4) = (src.parse().unwrap(), dst.parse().unwrap());
        let mut f = vec![0u8; 12];
        f.extend(ETHERTYPE_IPV4.to_be_bytes());
        let total = u16::try_from(20 + 20 + payload.len()).unwrap();
        f.extend([0x45, 0]);
        f.extend(total.to_be_bytes());
        f.extend([0, 0, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
        f.extend(src.ip().octets());
        f.extend(dst.ip().octets());
        f.extend(src.port().to_be_bytes());
        f.extend(dst.port().to_be_bytes());
        f.extend(seq.to_be_bytes());
        f.extend([0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend(payload);
        f
    }

    /// A little-endian microsecond pcap file of `frames`.
    pub(crate) fn file(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(0xa1b2_c3d4_u32.to_le_bytes());
        out.extend([2, 0, 4, 0]);
        out.extend([0; 8]);
        out.extend(262_144_u32.to_le_bytes());
        out.extend(LINKTYPE_ETHERNET.to_le_bytes());
        for f in frames {
            out.extend([0; 8]);
            let len = u32::try_from(f.len()).unwrap();
            out.extend(len.to_le_bytes());
            out.extend(len.to_le_bytes());
            out.extend(f);
        }
        out
    }

    #[test]
    fn reads_tcp_segments_and_skips_other_frames() {
        let mut arp = vec![0u8; 12];
        arp.extend(0x0806_u16.to_be_bytes());
        arp.extend([0; 28]);
        let mut padded = frame("10.44.1.2:40000", "10.44.2.2:15008", 7, 0x18, b"hi");
        padded.extend([0; 4]); // Ethernet padding after the IP packet
        let bytes = file(&[frame("10.44.1.2:40000", "10.44.2.2:15008", 6, 0x02, b""), arp, padded]);
        let got = parse(&bytes).unwrap();
        assert_eq!(got.packets, 3);
        assert_eq!(got.segments.len(), 2);
        assert!(got.segments[0].syn && got.segments[0].payload.is_empty());
        let data = &got.segments[1];
        assert_eq!(data.payload, b"hi");
        assert_eq!(data.seq, 7);
        assert_eq!(data.dst, "10.44.2.2:15008".parse().unwrap());
    }

    #[test]
    fn a_truncated_last_record_ends_the_file_quietly() {
        let mut bytes = file(&[frame("1.1.1.1:1", "2.2.2.2:2", 1, 0x18, b"abc")]);
        bytes.truncate(bytes.len() - 2);
        assert_eq!(parse(&bytes).unwrap().packets, 0);
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        assert_eq!(parse(&[0; 3]).unwrap_err(), PcapError::TooShort(3));
        let mut bytes = file(&[]);
        bytes[0] = 0x0a; // pcapng starts 0a 0d 0d 0a
        assert!(matches!(parse(&bytes), Err(PcapError::BadMagic(_))));
        let mut bytes = file(&[]);
        bytes[20] = 113; // Linux cooked capture
        assert_eq!(parse(&bytes).unwrap_err(), PcapError::LinkType(113));
    }
}
