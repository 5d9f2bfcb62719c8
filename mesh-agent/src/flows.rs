//! Flow records: one per captured connection at open and at close (and one
//! per connection that failed), kept in a bounded ring for the admin API, and
//! per-workload connection and byte counters. Inbound records also say what
//! authorization policy decided ([`PolicyMark`], set by the handler from the
//! [`crate::authz`] decision).
//!
//! Recording never blocks the data path for long: a short critical section
//! on a std mutex, no I/O, bounded memory (the oldest record is dropped when
//! the ring is full, and counted). With [`FlowLog::with_metrics`] every open,
//! close and failure is also counted in [`crate::metrics`]; with
//! [`FlowLog::with_access_log`] every connection's terminal record (close or
//! error) is also queued for the JSON access log ([`crate::access_log`]),
//! whose own thread does the write: a full queue drops the line (counted),
//! it never waits.
//!
//! Live subscribers ([`FlowLog::subscribe`], the admin API's
//! `GET /flows?follow=true`) each get a bounded queue filled with
//! `try_send` under the ring lock: a full queue loses the record (counted
//! per subscriber and in total) and the data path never waits for a reader.
//! Their number and their queues are capped ([`subscribers::MAX_SUBSCRIBERS`],
//! [`subscribers::MAX_QUEUED_TOTAL`]).
//! Because the ring and the subscriber list share one lock, a subscriber's
//! backlog and its live records neither overlap nor leave a gap.

pub mod http;
pub mod spans;
pub mod subscribers;

pub use http::HttpInfo;

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use serde::{Serialize, Serializer};

use crate::{
    access_log::AccessLog, flow_filter::FlowFilter, metrics::ConnMetrics, policy::PolicyRef, registry::ObjectRef,
};
use subscribers::{SubscribeError, Subscribers, Subscription};

/// A name a connection's facts and its records share (a workload, an
/// identity, a waypoint): one allocation per connection rather than one per
/// record, so the ring holds small records.
pub type Name = Arc<str>;

/// When a record was made; serialized as RFC 3339 UTC with microseconds
/// (formatted when read, not when recorded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    /// Now.
    #[must_use]
    pub fn now() -> Self {
        Self(SystemTime::now())
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&rfc3339(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Direction of a captured connection relative to the enrolled pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The pod opened it.
    Outbound,
    /// The pod received it.
    Inbound,
}

/// How the bytes crossed the network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// Inside an HBONE mTLS tunnel.
    MutualTls,
    /// In the clear.
    #[default]
    Plaintext,
}

/// What a record reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Connected to the destination; bytes flow.
    Open,
    /// Both directions finished.
    Close,
    /// The connection could not be forwarded.
    Error,
    /// One HTTP request through a waypoint ended (its `http` says how).
    Request,
    /// A waypoint's outlier detection ejected an endpoint (`dst`; `error`
    /// says why and for how long).
    Ejection,
}

/// What happened to a connection as far as the mesh is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Forwarded (allowed, or not subject to policy: outbound).
    Forwarded,
    /// Refused or closed by authorization policy (or by failing closed).
    Denied,
    /// Forwarded, and an AUDIT policy matched.
    Audited,
    /// Could not be forwarded for another reason.
    Error,
}

/// What authorization policy said about a connection, for its records.
/// The default (not evaluated) fits outbound connections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyMark {
    /// Refused at admission, or closed by a later change.
    pub denied: bool,
    /// An AUDIT policy matched.
    pub audited: bool,
    /// The deciding policy.
    pub policy: Option<PolicyRef>,
    /// Its matching rule.
    pub rule: Option<usize>,
    /// The AUDIT policy that matched.
    pub audit_policy: Option<PolicyRef>,
    /// What the dry-run policies would have decided, as a phrase.
    pub dry_run: Option<String>,
    /// The policy whose change closed this live connection.
    pub closed_by_policy: Option<PolicyRef>,
}

/// One flow record (see the admin API in ARCHITECTURE.md).
#[derive(Clone, Debug, Serialize)]
pub struct FlowRecord {
    /// Monotonic id of the record.
    pub id: u64,
    /// Connection id; the open and close records of a connection share it.
    pub conn: u64,
    /// When (RFC 3339 UTC in JSON).
    pub time: Timestamp,
    /// Open, close or error.
    pub event: Event,
    /// Outbound or inbound.
    pub direction: Direction,
    /// The enrolled pod on whose behalf the agent handled it (`ns/name`).
    pub workload: Name,
    /// Source address as the destination sees it.
    pub src: Option<SocketAddr>,
    /// The destination the client asked for.
    pub orig_dst: Option<SocketAddr>,
    /// Where the agent sent it (differs from `orig_dst` for a service VIP).
    pub dst: Option<SocketAddr>,
    /// The service whose VIP was dialled.
    pub service: Option<Name>,
    /// `mutual_tls` or `plaintext`.
    pub security: Security,
    /// Authenticated (or, outbound, local) source identity.
    pub src_identity: Option<Name>,
    /// Authenticated destination identity.
    pub dst_identity: Option<Name>,
    /// Serial number (hex) of the certificate the peer authenticated with
    /// (inbound tunnel connections).
    pub peer_cert_serial: Option<Name>,
    /// Bytes from the client toward the server.
    pub bytes_sent: u64,
    /// Bytes from the server back to the client.
    pub bytes_received: u64,
    /// Lifetime of the connection (close records).
    pub duration_ms: Option<f64>,
    /// Time to connect upstream (the TCP connect, or the tunnel stream
    /// set-up including any new tunnel's handshake), milliseconds.
    pub connect_ms: Option<f64>,
    /// Smoothed round-trip time (kernel `tcpi_rtt`) of the agent's
    /// network-facing socket for this connection, microseconds (open
    /// records: as known at open; close records: at close).
    pub rtt_us: Option<u32>,
    /// TCP segments retransmitted on that socket during this connection's
    /// lifetime (close records; a tunnel is shared, so this is the delta
    /// over the flow's lifetime, which may include other streams' segments).
    pub retransmits: Option<u32>,
    /// What went wrong (error records, or a close that ended in an error).
    pub error: Option<String>,
    /// `forwarded`, `denied`, `audited` or `error`.
    pub verdict: Verdict,
    /// The policy that decided (inbound), `ns/name`.
    pub policy: Option<String>,
    /// The index of its rule that matched.
    pub policy_rule: Option<usize>,
    /// The AUDIT policy that matched, `ns/name`.
    pub audit_policy: Option<String>,
    /// What the dry-run policies would have decided.
    pub dry_run: Option<String>,
    /// Close records of live connections closed by a policy change: the
    /// policy, `ns/name` (`policy` and `policy_rule` give the decision).
    pub closed_by_policy: Option<String>,
    /// The waypoint this connection was sent to (source side), or that
    /// handled the request (waypoint records), `ns/name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<Name>,
    /// The request's L7 facts (waypoint `request` records only; boxed, so
    /// L4 records do not carry its space).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<Box<HttpInfo>>,
    /// Why a waypoint passed this connection through as L4 (not HTTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<String>,
}

/// Per-workload totals.
#[derive(Clone, Copy, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadCounters {
    /// Outbound connections captured.
    pub outbound_connections: u64,
    /// Inbound connections captured.
    pub inbound_connections: u64,
    /// Bytes from this pod (outbound client bytes + inbound server replies).
    pub bytes_sent: u64,
    /// Bytes to this pod.
    pub bytes_received: u64,
    /// Connections that could not be forwarded.
    pub failed_connections: u64,
}

/// TCP health of a connection's network-facing socket (see
/// [`crate::proxy::tcp_health`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Smoothed RTT, microseconds.
    pub rtt_us: Option<u32>,
    /// Retransmitted segments during the flow.
    pub retransmits: Option<u32>,
}

/// Facts about a connection known when it is accepted.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// Direction.
    pub direction: Direction,
    /// Enrolled pod.
    pub workload: ObjectRef,
    /// Its `ns/name`, made once for all the connection's records.
    pub workload_name: Name,
    /// Source address.
    pub src: Option<SocketAddr>,
    /// Original destination.
    pub orig_dst: Option<SocketAddr>,
    /// Resolved destination.
    pub dst: Option<SocketAddr>,
    /// Service dialled.
    pub service: Option<ObjectRef>,
    /// Tunnelled or not.
    pub security: Security,
    /// Source identity.
    pub src_identity: Option<Name>,
    /// Destination identity.
    pub dst_identity: Option<Name>,
    /// Peer certificate serial.
    pub peer_cert_serial: Option<Name>,
    /// What authorization policy decided (inbound).
    pub policy: PolicyMark,
    /// TCP health, refreshed by the handler before each record.
    pub tcp: TcpStats,
    /// How long the upstream connect took.
    pub connect: Option<Duration>,
    /// The waypoint involved, `ns/name`.
    pub waypoint: Option<Name>,
    /// L7 facts of a waypoint request.
    pub http: Option<Box<HttpInfo>>,
    /// Why a waypoint passed the connection through as L4.
    pub passthrough: Option<String>,
    /// Its span, when L4 tracing sampled it at the start
    /// ([`FlowLog::l4_trace`], [`FlowLog::l4_trace_from`]).
    pub trace: Option<crate::trace::context::ConnTrace>,
}

impl ConnInfo {
    /// Facts of a new connection of `workload`.
    #[must_use]
    pub fn new(direction: Direction, workload: ObjectRef) -> Self {
        let name = workload.to_string().into();
        Self::named(direction, workload, name)
    }

    /// The same, with the workload's `ns/name` made already (a waypoint
    /// names itself once, not once per request).
    #[must_use]
    pub fn named(direction: Direction, workload: ObjectRef, workload_name: Name) -> Self {
        Self {
            direction,
            workload_name,
            workload,
            src: None,
            orig_dst: None,
            dst: None,
            service: None,
            security: Security::Plaintext,
            src_identity: None,
            dst_identity: None,
            peer_cert_serial: None,
            policy: PolicyMark::default(),
            tcp: TcpStats::default(),
            connect: None,
            waypoint: None,
            http: None,
            passthrough: None,
            trace: None,
        }
    }
}

/// The ring of recent records and the counters.
pub struct FlowLog {
    capacity: usize,
    next_id: AtomicU64,
    next_conn: AtomicU64,
    active: AtomicU64,
    dropped: AtomicU64,
    ring: Mutex<Inner>,
    counters: Mutex<BTreeMap<ObjectRef, WorkloadCounters>>,
    metrics: Option<Arc<ConnMetrics>>,
    access: Option<Arc<AccessLog>>,
    tracer: Option<Arc<crate::trace::Tracer>>,
}

/// What the ring lock guards: the records and the live subscribers.
struct Inner {
    records: VecDeque<FlowRecord>,
    subscribers: Subscribers,
}

impl FlowLog {
    /// A log keeping at most `capacity` records.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            next_id: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            active: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            ring: Mutex::new(Inner {
                records: VecDeque::with_capacity(capacity.min(4096)),
                subscribers: Subscribers::default(),
            }),
            counters: Mutex::new(BTreeMap::new()),
            metrics: None,
            access: None,
            tracer: None,
        }
    }

    /// Also writes each connection's terminal record to `access`.
    #[must_use]
    pub fn with_access_log(mut self, access: Option<Arc<AccessLog>>) -> Self {
        self.access = access;
        self
    }

    /// The metrics this log counts in, if any (for the proxy's latency
    /// histograms).
    #[must_use]
    pub fn metrics(&self) -> Option<&ConnMetrics> {
        self.metrics.as_deref()
    }

    /// A live subscription to new records passing `filter`, with a queue of
    /// `queue` records, and the backlog (the newest `filter.last` stored
    /// records passing it) taken under the same lock; refused beyond the
    /// subscriber caps.
    pub fn subscribe(&self, filter: FlowFilter, queue: usize) -> Result<Subscription, SubscribeError> {
        let mut inner = self.ring.lock().expect("ring lock");
        let Inner { records, subscribers } = &mut *inner;
        subscribers.add(filter, queue, |f| select_from(records, f))
    }

    /// Live subscribers and what each lost.
    pub fn subscriber_stats(&self) -> subscribers::Stats {
        self.ring.lock().expect("ring lock").subscribers.stats()
    }

    /// Also counts every open, close and failure in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<ConnMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A sampled new connection's span ids (`None`: no L4 tracing, or not
    /// sampled), decided when it starts so the source side can send them.
    #[must_use]
    pub fn l4_trace(&self) -> Option<crate::trace::context::ConnTrace> {
        self.tracer.as_ref().filter(|t| t.sample()).map(|_| crate::trace::context::ConnTrace::root())
    }

    /// The destination side's span of a tunnelled connection: a child of
    /// the source side's (from the `CONNECT`'s `traceparent`), else
    /// [`FlowLog::l4_trace`].
    #[must_use]
    pub fn l4_trace_from(&self, headers: &hyper::HeaderMap) -> Option<crate::trace::context::ConnTrace> {
        let t = self.tracer.as_ref()?;
        t.propagators.connection_child(headers).or_else(|| self.l4_trace())
    }

    /// Also records a span per closed connection ([`spans`]), sampled.
    #[must_use]
    pub fn with_tracer(mut self, tracer: Option<Arc<crate::trace::Tracer>>) -> Self {
        self.tracer = tracer;
        self
    }

    /// Access log lines lost so far (0 without an access log).
    #[must_use]
    pub fn access_log_dropped(&self) -> u64 {
        self.access.as_ref().map_or(0, |a| a.dropped())
    }

    /// Records evicted from the full ring so far.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A new connection id.
    pub fn conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Records that a connection is open; call [`FlowLog::closed`] later.
    pub fn opened(&self, conn: u64, info: &ConnInfo) {
        self.active.fetch_add(1, Ordering::Relaxed);
        {
            let mut counters = self.counters.lock().expect("counters lock");
            let c = counters.entry(info.workload.clone()).or_default();
            match info.direction {
                Direction::Outbound => c.outbound_connections += 1,
                Direction::Inbound => c.inbound_connections += 1,
            }
        }
        if let Some(m) = &self.metrics {
            m.opened(conn, info);
        }
        self.push(conn, info, Event::Open, (0, 0), None, None);
    }

    /// Records the end of a connection opened with [`FlowLog::opened`].
    pub fn closed(&self, conn: u64, info: &ConnInfo, bytes: (u64, u64), duration: Duration, error: Option<String>) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        {
            let mut counters = self.counters.lock().expect("counters lock");
            let c = counters.entry(info.workload.clone()).or_default();
            let (to_server, to_client) = bytes;
            match info.direction {
                Direction::Outbound => {
                    c.bytes_sent += to_server;
                    c.bytes_received += to_client;
                }
                Direction::Inbound => {
                    c.bytes_received += to_server;
                    c.bytes_sent += to_client;
                }
            }
        }
        if let Some(m) = &self.metrics {
            m.closed(conn, info, bytes, duration, error.is_some());
        }
        // Sampled when the connection started ([`FlowLog::l4_trace`]):
        // one decision per connection, the one its tunnel carried.
        if let (Some(t), Some(trace)) = (&self.tracer, &info.trace) {
            t.record(spans::connection(info, trace, bytes, duration, error.as_deref()));
        }
        self.push(conn, info, Event::Close, bytes, Some(duration), error);
    }

    /// Records one HTTP request a waypoint handled (`info.http` set):
    /// bytes are the request and response bodies. Counts nothing in the L4
    /// metrics (the waypoint has its own, [`crate::waypoint`]).
    pub fn request(&self, conn: u64, info: &ConnInfo, bytes: (u64, u64), duration: Duration) {
        let error = info.http.as_ref().and_then(|h| h.error.clone());
        self.push(conn, info, Event::Request, bytes, Some(duration), error);
    }

    /// Records an endpoint ejected by a waypoint's outlier detection.
    pub fn ejection(&self, info: &ConnInfo, why: String) {
        self.push(0, info, Event::Ejection, (0, 0), None, Some(why));
    }

    /// Records a connection that could not be forwarded.
    pub fn failed(&self, conn: u64, info: &ConnInfo, error: String) {
        self.counters.lock().expect("counters lock").entry(info.workload.clone()).or_default().failed_connections += 1;
        if let Some(m) = &self.metrics {
            m.failed(info);
        }
        self.push(conn, info, Event::Error, (0, 0), None, Some(error));
    }

    fn push(
        &self,
        conn: u64,
        info: &ConnInfo,
        event: Event,
        (bytes_sent, bytes_received): (u64, u64),
        duration: Option<Duration>,
        error: Option<String>,
    ) {
        let mark = &info.policy;
        let verdict = match event {
            _ if mark.denied => Verdict::Denied,
            Event::Error | Event::Ejection => Verdict::Error,
            Event::Open | Event::Close | Event::Request if mark.audited => Verdict::Audited,
            Event::Open | Event::Close | Event::Request => Verdict::Forwarded,
        };
        let name = |p: &Option<PolicyRef>| p.as_ref().map(ToString::to_string);
        let record = FlowRecord {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            conn,
            time: Timestamp::now(),
            event,
            direction: info.direction,
            workload: info.workload_name.clone(),
            src: info.src,
            orig_dst: info.orig_dst,
            dst: info.dst,
            service: info.service.as_ref().map(|s| s.to_string().into()),
            security: info.security,
            src_identity: info.src_identity.clone(),
            dst_identity: info.dst_identity.clone(),
            peer_cert_serial: info.peer_cert_serial.clone(),
            bytes_sent,
            bytes_received,
            duration_ms: duration.map(|d| d.as_secs_f64() * 1000.0),
            connect_ms: info.connect.map(|d| d.as_secs_f64() * 1000.0),
            rtt_us: info.tcp.rtt_us,
            retransmits: info.tcp.retransmits,
            error,
            verdict,
            policy: name(&mark.policy),
            policy_rule: mark.rule,
            audit_policy: name(&mark.audit_policy),
            dry_run: mark.dry_run.clone(),
            closed_by_policy: name(&mark.closed_by_policy),
            waypoint: info.waypoint.clone(),
            http: info.http.clone(),
            passthrough: info.passthrough.clone(),
        };
        if event != Event::Open {
            if let Some(access) = &self.access {
                access.write(&record);
            }
        }
        let mut inner = self.ring.lock().expect("ring lock");
        inner.subscribers.publish(&record);
        if inner.records.len() == self.capacity {
            inner.records.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        inner.records.push_back(record);
    }

    /// The newest `filter.last` records that pass `filter`, oldest first.
    pub fn select(&self, filter: &FlowFilter) -> Vec<FlowRecord> {
        select_from(&self.ring.lock().expect("ring lock").records, filter)
    }

    /// The last `n` records, oldest first.
    pub fn recent(&self, n: usize) -> Vec<FlowRecord> {
        let inner = self.ring.lock().expect("ring lock");
        let skip = inner.records.len().saturating_sub(n);
        inner.records.iter().skip(skip).cloned().collect()
    }

    /// Counters of one workload.
    pub fn counters(&self, workload: &ObjectRef) -> WorkloadCounters {
        self.counters.lock().expect("counters lock").get(workload).copied().unwrap_or_default()
    }
}

/// The newest `filter.last` records of `records` that pass `filter`, oldest
/// first.
fn select_from(records: &VecDeque<FlowRecord>, filter: &FlowFilter) -> Vec<FlowRecord> {
    let mut out: Vec<FlowRecord> =
        records.iter().rev().filter(|r| filter.matches(r)).take(filter.last).cloned().collect();
    out.reverse();
    out
}

/// Formats a time as RFC 3339 UTC with microseconds, without a date crate.
#[must_use]
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days.cast_signed());
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_micros())
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(capacity: usize) -> FlowLog {
        FlowLog::new(capacity)
    }

    fn info() -> ConnInfo {
        let mut i = ConnInfo::new(Direction::Outbound, ObjectRef { namespace: "demo".into(), name: "client".into() });
        i.orig_dst = Some("10.0.0.1:80".parse().unwrap());
        i
    }

    #[test]
    fn keeps_only_the_newest_records() {
        let log = log(3);
        for _ in 0..5 {
            log.failed(log.conn_id(), &info(), "x".into());
        }
        let ids: Vec<u64> = log.recent(10).iter().map(|r| r.id).collect();
        assert_eq!(ids, [3, 4, 5]);
        assert_eq!(log.recent(1)[0].id, 5);
        assert_eq!(log.dropped(), 2);
    }

    #[test]
    fn counts_connections_and_bytes_per_workload() {
        let log = log(10);
        let i = info();
        log.opened(1, &i);
        assert_eq!(log.active(), 1);
        log.closed(1, &i, (100, 7), Duration::from_millis(3), None);
        assert_eq!(log.active(), 0);
        let c = log.counters(&i.workload);
        assert_eq!((c.outbound_connections, c.bytes_sent, c.bytes_received), (1, 100, 7));
    }

    #[test]
    fn records_say_what_policy_decided() {
        let log = log(10);
        let mut i = info();
        log.opened(1, &i);
        log.failed(2, &i, "refused".into());
        i.policy = PolicyMark {
            audited: true,
            policy: Some(PolicyRef::new("demo", "allow")),
            rule: Some(1),
            audit_policy: Some(PolicyRef::new("demo", "watch")),
            ..PolicyMark::default()
        };
        log.opened(3, &i);
        i.policy = PolicyMark {
            denied: true,
            policy: Some(PolicyRef::new("demo", "deny")),
            rule: Some(0),
            closed_by_policy: Some(PolicyRef::new("demo", "deny")),
            ..PolicyMark::default()
        };
        log.closed(3, &i, (1, 1), Duration::from_millis(1), Some("closed".into()));
        let r = log.recent(10);
        let verdicts: Vec<Verdict> = r.iter().map(|r| r.verdict).collect();
        assert_eq!(verdicts, [Verdict::Forwarded, Verdict::Error, Verdict::Audited, Verdict::Denied]);
        assert_eq!(
            (r[2].policy.as_deref(), r[2].policy_rule, r[2].audit_policy.as_deref()),
            (Some("demo/allow"), Some(1), Some("demo/watch"))
        );
        let json = serde_json::to_value(&r[3]).unwrap();
        assert_eq!(json["verdict"], "denied");
        assert_eq!(json["closed_by_policy"], "demo/deny");
        assert_eq!(json["policy_rule"], 0);
        assert!(json["dry_run"].is_null() && json["audit_policy"].is_null());
    }

    /// The ring's memory is capacity × (this + what a record owns on the
    /// heap); ARCHITECTURE.md gives the figure, and a field that grows a
    /// record past it should be boxed or shared instead.
    #[test]
    fn records_stay_small() {
        assert!(size_of::<FlowRecord>() <= 480, "FlowRecord is {} bytes", size_of::<FlowRecord>());
        assert!(size_of::<HttpInfo>() <= 240, "HttpInfo is {} bytes", size_of::<HttpInfo>());
    }

    #[test]
    fn formats_times_as_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_312_496);
        assert_eq!(rfc3339(t), "2026-11-22T01:54:56.000000Z");
    }
}
