//! Reassembles captured TCP byte streams and checks that they are TLS.
//!
//! A stream is one direction of one connection, rebuilt from its segments'
//! sequence numbers (retransmissions and overlaps dropped), starting after
//! its SYN. It is then walked as a sequence of TLS records (RFC 8446 §5.1:
//! a 5-byte header — content type, legacy version 0x0303 (0x0301 allowed
//! for the first `ClientHello`), 16-bit length — then that many bytes). A
//! stream whose every byte belongs to a well-formed record is TLS; the
//! first byte that cannot start a record is reported. A stream whose SYN
//! was not captured (the connection predates the capture) cannot be
//! aligned to record boundaries and is only counted.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use super::pcap::TcpSegment;

/// TLS content type of application data (RFC 8446 §5.1).
pub const APPLICATION_DATA: u8 = 23;
/// Largest record payload: 2^14 plus expansion (RFC 8446 §5.2).
const MAX_RECORD: usize = (1 << 14) + 256;

/// One direction of one TCP connection, rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    /// Sender.
    pub src: SocketAddrV4,
    /// Receiver.
    pub dst: SocketAddrV4,
    /// Whether its SYN was captured (so `bytes` starts at its first byte).
    pub from_syn: bool,
    /// The bytes, up to the first gap.
    pub bytes: Vec<u8>,
    /// Whether a gap (lost capture) cut it short.
    pub gap: bool,
}

/// Rebuilds every stream in `segments`, ordered by (src, dst).
#[must_use]
pub fn reassemble<'a>(segments: impl IntoIterator<Item = &'a TcpSegment>) -> Vec<Stream> {
    let mut by_dir: BTreeMap<(SocketAddrV4, SocketAddrV4), Vec<&TcpSegment>> = BTreeMap::new();
    for s in segments {
        by_dir.entry((s.src, s.dst)).or_default().push(s);
    }
    by_dir.into_iter().map(|((src, dst), segs)| rebuild(src, dst, &segs)).collect()
}

fn rebuild(src: SocketAddrV4, dst: SocketAddrV4, segs: &[&TcpSegment]) -> Stream {
    let syn = segs.iter().find(|s| s.syn);
    let base =
        syn.map_or_else(|| segs.iter().find(|s| !s.payload.is_empty()).map_or(0, |s| s.seq), |s| s.seq.wrapping_add(1));
    // Offsets relative to the first byte, modulo 2^32: wrap-safe for
    // streams under 2 GiB; an offset of 2 GiB or more lies before `base`.
    let mut pieces: Vec<(u64, &[u8])> = segs
        .iter()
        .filter(|s| !s.payload.is_empty())
        .filter_map(|s| {
            let off = s.seq.wrapping_sub(base);
            (off < 1 << 31).then_some((u64::from(off), s.payload.as_slice()))
        })
        .collect();
    pieces.sort_by_key(|(off, _)| *off);
    let mut bytes = Vec::new();
    let mut gap = false;
    for (off, data) in pieces {
        let next = bytes.len() as u64;
        if off > next {
            gap = true;
            break;
        }
        let skip = usize::try_from(next - off).unwrap_or(usize::MAX);
        if skip < data.len() {
            bytes.extend_from_slice(&data[skip..]);
        }
    }
    Stream { src, dst, from_syn: syn.is_some(), bytes, gap }
}

/// The records of one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Walk {
    /// Content type of each complete record, in order.
    pub records: Vec<u8>,
    /// Bytes covered by complete records.
    pub covered: usize,
    /// Why the walk stopped before the end, if it did.
    pub problem: Option<String>,
}

/// Walks `bytes` as TLS records; a final record cut short by the end of
/// the capture is not a problem.
#[must_use]
pub fn walk_records(bytes: &[u8]) -> Walk {
    let mut walk = Walk::default();
    let mut at = 0;
    while at + 5 <= bytes.len() {
        let h = &bytes[at..at + 5];
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        let version_ok = h[1] == 3 && (h[2] == 3 || (h[2] == 1 && at == 0));
        if !(20..=23).contains(&h[0]) || !version_ok || len > MAX_RECORD {
            walk.problem = Some(format!(
                "byte {at}: {:02x} {:02x} {:02x} {:02x} {:02x} is not a TLS record header",
                h[0], h[1], h[2], h[3], h[4]
            ));
            return walk;
        }
        if at + 5 + len > bytes.len() {
            return walk;
        }
        walk.records.push(h[0]);
        at += 5 + len;
        walk.covered = at;
    }
    walk
}

/// What the streams of one port looked like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSummary {
    /// Streams (connection directions) seen.
    pub streams: usize,
    /// Streams whose SYN was captured, so they could be walked.
    pub walked_streams: usize,
    /// Complete records by content type (20 `change_cipher_spec`, 21
    /// `alert`, 22 `handshake`, 23 `application_data`).
    pub records: BTreeMap<u8, u64>,
    /// Bytes of the walked streams.
    pub stream_bytes: u64,
    /// Bytes inside complete records.
    pub record_bytes: u64,
    /// Streams that are not TLS, with where they stopped parsing, and
    /// streams the capture did not hold completely.
    pub problems: Vec<String>,
}

impl TlsSummary {
    /// Walks every stream of `streams`.
    #[must_use]
    pub fn of(streams: &[Stream]) -> Self {
        let mut out = Self { streams: streams.len(), ..Self::default() };
        for s in streams.iter().filter(|s| s.from_syn) {
            out.walked_streams += 1;
            out.stream_bytes += s.bytes.len() as u64;
            let walk = walk_records(&s.bytes);
            out.record_bytes += walk.covered as u64;
            for t in walk.records {
                *out.records.entry(t).or_default() += 1;
            }
            if let Some(p) = walk.problem {
                out.problems.push(format!("{} -> {}: {p}", s.src, s.dst));
            }
            if s.gap {
                out.problems.push(format!(
                    "{} -> {}: the capture misses bytes after byte {}",
                    s.src,
                    s.dst,
                    s.bytes.len()
                ));
            }
        }
        out
    }

    /// Complete application-data records.
    #[must_use]
    pub fn application_data_records(&self) -> u64 {
        self.records.get(&APPLICATION_DATA).copied().unwrap_or(0)
    }

    /// Whether at least one stream was walked and every walked stream was
    /// captured without gaps and is nothing but TLS records.
    #[must_use]
    pub fn all_tls(&self) -> bool {
        self.walked_streams > 0 && self.problems.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(src: &str, dst: &str, seq: u32, syn: bool, payload: &[u8]) -> TcpSegment {
        TcpSegment {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            seq,
            syn,
            fin: false,
            rst: false,
            payload: payload.to_vec(),
        }
    }

    fn record(kind: u8, len: usize) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend(u16::try_from(len).unwrap().to_be_bytes());
        r.extend(std::iter::repeat_n(0xab, len));
        r
    }

    #[test]
    fn rebuilds_a_stream_from_reordered_and_retransmitted_segments_across_seq_wrap() {
        let isn = u32::MAX - 2; // data starts at MAX-1 and wraps
        let (a, b) = ("10.44.1.2:40000", "10.44.2.2:15008");
        let segs = [
            seg(a, b, isn, true, b""),
            seg(a, b, isn.wrapping_add(5), false, b"ef"),
            seg(a, b, isn.wrapping_add(1), false, b"abc"),
            seg(a, b, isn.wrapping_add(2), false, b"bcd"), // overlap
            seg(b, a, 100, true, b""),
        ];
        let streams = reassemble(&segs);
        assert_eq!(streams.len(), 2);
        let s = streams.iter().find(|s| s.src == a.parse().unwrap()).unwrap();
        assert_eq!(s.bytes, b"abcdef");
        assert!(s.from_syn && !s.gap);
    }

    #[test]
    fn stops_at_a_gap() {
        let (a, b) = ("1.1.1.1:1", "2.2.2.2:2");
        let segs = [seg(a, b, 9, true, b""), seg(a, b, 10, false, b"ab"), seg(a, b, 20, false, b"zz")];
        let s = &reassemble(&segs)[0];
        assert_eq!(s.bytes, b"ab");
        assert!(s.gap);
    }

    #[test]
    fn walks_tls_records_and_flags_plaintext() {
        let mut tls = vec![22, 3, 1, 0, 2, 1, 1]; // ClientHello with 0x0301
        tls.extend(record(20, 1));
        tls.extend(record(23, 300));
        tls.extend(record(23, 10)[..7].to_vec()); // cut by the capture's end
        let walk = walk_records(&tls);
        assert_eq!(walk.records, vec![22, 20, 23]);
        assert!(walk.problem.is_none());
        let plain = walk_records(b"GET / HTTP/1.1\r\n");
        assert!(plain.records.is_empty());
        assert!(plain.problem.unwrap().contains("47 45 54"));
    }

    #[test]
    fn summarises_only_streams_it_could_align() {
        let (a, b) = ("1.1.1.1:1", "2.2.2.2:15008");
        let mut first = record(22, 4);
        first.extend(record(23, 8));
        let segs = [seg(a, b, 0, true, b""), seg(a, b, 1, false, &first), seg(b, a, 500, false, b"mid-stream, no SYN")];
        let summary = TlsSummary::of(&reassemble(&segs));
        assert_eq!((summary.streams, summary.walked_streams), (2, 1));
        assert_eq!(summary.application_data_records(), 1);
        assert!(summary.all_tls());
        assert_eq!(summary.record_bytes, summary.stream_bytes);
    }
}
