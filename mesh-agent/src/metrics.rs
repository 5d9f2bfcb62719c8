//! Prometheus metrics, served as text on the node's port 15020 (`/metrics`,
//! and `/healthz` for probes) by [`scrape::serve`], a task of the composition
//! root.
//!
//! Two kinds of series:
//! - **Per connection**, counted by [`ConnMetrics`] when [`crate::flows`]
//!   records an open, close or failure: Istio's L4 set renamed `heddle_tcp_*`
//!   with Istio's label names (so ztunnel/Istio dashboards port by renaming
//!   the metric), plus histograms ztunnel lacks:
//!   `heddle_tcp_connection_duration_seconds`, `heddle_tcp_rtt_seconds`
//!   (the kernel's smoothed RTT of the network-facing socket, at close) and
//!   `heddle_tcp_connect_duration_seconds` (upstream connect or tunnel
//!   stream set-up, at open), all with the workload-pair labels.
//! - **TLS handshakes** of node-to-node tunnels,
//!   `heddle_tls_handshake_duration_seconds{side}` (`client`, `server`),
//!   observed by the proxy through [`ConnMetrics::tls_handshake`].
//! - **Agent internals**, read at scrape time by [`scrape::Exporter`] from
//!   the authorizer, the datapath, the certificate manager and the flow log.
//!
//! Cardinality is bounded: every label value is either a fixed enum
//! (`reporter`, `connection_security_policy`, `response_flags`, `verdict`,
//! `action`, `reason`, `map`) or a name from the workload registry or the
//! mesh's own identities (workloads, namespaces, services, SPIFFE
//! principals, policies). Peers that are not in the registry collapse into
//! `unknown`; addresses, ports and error texts are never labels.
//!
//! A connection's labels are resolved once, when it opens (its pod is in the
//! registry then), and kept by connection id until it closes: a connection
//! that outlives its pod (every rollout) is still counted under its
//! workload name, not the pod's. The map holds open connections only (an
//! entry leaves at close, as [`crate::flows::FlowLog::active`] counts down).
//!
//! Invariant: recording is a few atomic increments after one registry
//! lookup per side (at open or failure; a short map lock at open and
//! close); nothing here does I/O on the data path.

pub mod scrape;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry as PromRegistry};
use tokio::sync::watch;

use crate::{
    flows::{ConnInfo, Direction, Security},
    registry::{ObjectRef, SharedRegistry},
};

/// A label value for a peer, principal or service the agent cannot name.
pub const UNKNOWN: &str = "unknown";

/// Errors building the metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be created or registered (a bad name or label,
    /// or a duplicate registration): a programming error.
    #[error("cannot register metric: {0}")]
    Register(#[from] prometheus::Error),
}

/// Istio's L4 label names, in the order [`ConnLabels::values`] fills them.
const CONN_LABELS: [&str; 10] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "connection_security_policy",
    "response_flags",
];

/// Labels of the duration histogram: the workload pair and the security
/// (not principals or flags, to keep buckets x series small).
const DURATION_LABELS: [&str; 6] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "destination_workload",
    "destination_workload_namespace",
    "connection_security_policy",
];

/// Buckets of the RTT histogram, in seconds: 50 µs (same node) to 1.3 s
/// (a congested intercontinental path), about doubling.
const RTT_BUCKETS: [f64; 15] =
    [0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28];

/// Buckets of the connect and handshake histograms, in seconds: 100 µs to
/// 10 s (the connect timeout).
const LATENCY_BUCKETS: [f64; 14] =
    [0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0];

/// Which end of a node-to-node mTLS handshake the agent was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeSide {
    /// The source agent, opening a tunnel.
    Client,
    /// The destination agent, accepting one.
    Server,
}

impl HandshakeSide {
    /// The label value.
    #[must_use]
    pub fn reason(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// Why a pod's tunnel port (15008) turned a connection or a stream away,
/// as the `reason` label of `heddle_tunnel_refusals_total`: a fixed set,
/// so hostile input cannot add series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelRefusal {
    /// The TLS handshake failed (not TLS, no or bad client certificate,
    /// no common ALPN protocol).
    TlsHandshake,
    /// The client did not finish the TLS and HTTP/2 handshakes in time
    /// (idle or slowloris connections).
    TlsHandshakeTimeout,
    /// The source address already holds its share of connections in their
    /// handshake ([`crate::proxy::handshakes`]).
    HandshakeLimit,
    /// No mesh workload owns the source address.
    UnknownSource,
    /// The client certificate is not the source workload's identity.
    PeerIdentity,
    /// TLS held, but the client did not speak HTTP/2.
    Http2Handshake,
    /// The client broke the HTTP/2 protocol on an established tunnel
    /// connection (malformed frames, a flood of resets), which ended it.
    Http2Protocol,
    /// A stream that is not `CONNECT`, or whose target is malformed or not
    /// this pod's.
    BadRequest,
    /// Authorization policy denied the stream.
    Denied,
    /// The application could not be reached.
    Upstream,
    /// A stream arrived on a tunnel connection whose peer certificate, or
    /// this pod's own, has expired since the handshake (the connection is
    /// then drained: its open streams go on, new ones need a new
    /// handshake with valid certificates).
    CertificateExpired,
}

impl TunnelRefusal {
    /// The label value.
    #[must_use]
    pub fn reason(self) -> &'static str {
        match self {
            Self::TlsHandshake => "tls_handshake",
            Self::TlsHandshakeTimeout => "tls_handshake_timeout",
            Self::HandshakeLimit => "handshake_limit",
            Self::UnknownSource => "unknown_source",
            Self::PeerIdentity => "peer_identity",
            Self::Http2Handshake => "http2_handshake",
            Self::Http2Protocol => "http2_protocol",
            Self::BadRequest => "bad_request",
            Self::Denied => "denied",
            Self::Upstream => "upstream",
            Self::CertificateExpired => "certificate_expired",
        }
    }
}

/// Buckets of the duration histogram, in seconds: 1 ms to ~17 min.
const DURATION_BUCKETS: [f64; 14] =
    [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1000.0];

/// What went wrong with a connection, as the `response_flags` label: a fixed
/// set, never the error text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFlag {
    /// Nothing: opened, or closed cleanly.
    None,
    /// Refused by authorization policy, or closed by a policy change.
    Denied,
    /// Could not be forwarded (dial, tunnel or certificate failure, a bad
    /// tunnel request).
    ConnectFailed,
    /// Forwarded, then ended with an I/O error.
    Aborted,
}

impl ResponseFlag {
    /// The label value.
    #[must_use]
    pub fn reason(self) -> &'static str {
        match self {
            Self::None => "-",
            Self::Denied => "DENIED",
            Self::ConnectFailed => "CONNECT_FAILED",
            Self::Aborted => "ABORTED",
        }
    }
}

/// The label values of one connection, resolved once when it opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnLabels {
    reporter: &'static str,
    src: Peer,
    src_principal: String,
    dst: Peer,
    dst_principal: String,
    service: String,
    security: &'static str,
}

/// A workload label pair.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Peer {
    name: String,
    namespace: String,
}

impl Peer {
    /// A workload's labels: its stable workload name (its controller, not
    /// the pod), so that rollouts do not add series.
    fn of(w: &crate::registry::Workload) -> Self {
        Self { name: w.workload_name.clone(), namespace: w.id.namespace.clone() }
    }

    /// A workload the registry does not know (only for a connection closed
    /// without having been recorded open, or failed after its pod left).
    fn of_ref(id: &ObjectRef) -> Self {
        Self { name: id.name.clone(), namespace: id.namespace.clone() }
    }

    fn unknown() -> Self {
        Self { name: UNKNOWN.into(), namespace: UNKNOWN.into() }
    }
}

impl ConnLabels {
    /// Labels of `info`: the enrolled pod is one side; the other is looked up
    /// in `registry` by IP (the source address inbound, the resolved
    /// destination outbound), else `unknown`.
    #[must_use]
    pub fn resolve(info: &ConnInfo, registry: &crate::registry::Registry) -> Self {
        let by_ip =
            |ip: Option<IpAddr>| ip.and_then(|ip| registry.workload_by_ip(ip)).map_or_else(Peer::unknown, Peer::of);
        let local = registry.workload(&info.workload).map_or_else(|| Peer::of_ref(&info.workload), Peer::of);
        let (reporter, src, dst) = match info.direction {
            Direction::Outbound => ("source", local, by_ip(info.dst.or(info.orig_dst).map(|a| a.ip()))),
            Direction::Inbound => ("destination", by_ip(info.src.map(|a| a.ip())), local),
        };
        let principal = |p: &Option<crate::flows::Name>| p.as_deref().unwrap_or(UNKNOWN).to_owned();
        Self {
            reporter,
            src,
            src_principal: principal(&info.src_identity),
            dst,
            dst_principal: principal(&info.dst_identity),
            service: info.service.as_ref().map_or_else(|| UNKNOWN.into(), ToString::to_string),
            security: match info.security {
                Security::MutualTls => "mutual_tls",
                Security::Plaintext => "none",
            },
        }
    }

    /// Values in [`CONN_LABELS`] order.
    fn values(&self, flag: ResponseFlag) -> [&str; 10] {
        [
            self.reporter,
            &self.src.name,
            &self.src.namespace,
            &self.src_principal,
            &self.dst.name,
            &self.dst.namespace,
            &self.dst_principal,
            &self.service,
            self.security,
            flag.reason(),
        ]
    }

    /// Values in [`DURATION_LABELS`] order.
    fn duration_values(&self) -> [&str; 6] {
        [self.reporter, &self.src.name, &self.src.namespace, &self.dst.name, &self.dst.namespace, self.security]
    }
}

/// The per-connection series; [`crate::flows::FlowLog`] calls it.
pub struct ConnMetrics {
    workloads: watch::Receiver<SharedRegistry>,
    /// Labels of open connections by connection id, resolved at open and
    /// reused at close; removed at close.
    open: Mutex<HashMap<u64, ConnLabels>>,
    opened: IntCounterVec,
    closed: IntCounterVec,
    failed: IntCounterVec,
    received_bytes: IntCounterVec,
    sent_bytes: IntCounterVec,
    duration: HistogramVec,
    rtt: HistogramVec,
    connect: HistogramVec,
    handshake: HistogramVec,
    refusals: IntCounterVec,
}

impl ConnMetrics {
    /// Creates the series and registers them in `prom`; peers are named from
    /// the latest `workloads` registry.
    pub fn new(prom: &PromRegistry, workloads: watch::Receiver<SharedRegistry>) -> Result<Self, MetricsError> {
        let counter = |name: &str, help: &str| -> Result<IntCounterVec, MetricsError> {
            let c = IntCounterVec::new(Opts::new(name, help), &CONN_LABELS)?;
            prom.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "heddle_tcp_connection_duration_seconds",
                "Lifetime of TCP connections, observed when they close (not for connections that failed before opening).",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &DURATION_LABELS,
        )?;
        prom.register(Box::new(duration.clone()))?;
        let histogram = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)?;
            prom.register(Box::new(h.clone()))?;
            Ok::<_, MetricsError>(h)
        };
        let rtt = histogram(
            "heddle_tcp_rtt_seconds",
            "Smoothed TCP round-trip time (kernel tcpi_rtt) of the agent's network-facing socket of each connection (the node-to-node tunnel, or the direct upstream/client socket in plaintext), observed when the connection closes.",
            &RTT_BUCKETS,
            &DURATION_LABELS,
        )?;
        let connect = histogram(
            "heddle_tcp_connect_duration_seconds",
            "Time to establish the upstream of a connection: the TCP connect (plaintext, or to the application on the destination side), or the tunnel stream including a new tunnel's TCP, TLS and HTTP/2 set-up (source side).",
            &LATENCY_BUCKETS,
            &DURATION_LABELS,
        )?;
        let handshake = histogram(
            "heddle_tls_handshake_duration_seconds",
            "Duration of successful node-to-node mTLS handshakes of HBONE tunnels, by side (client: the source agent, server: the destination agent).",
            &LATENCY_BUCKETS,
            &["side"],
        )?;
        let refusals = IntCounterVec::new(
            Opts::new(
                "heddle_tunnel_refusals_total",
                "Connections and streams the tunnel port (15008) turned away, by reason (tls_handshake, tls_handshake_timeout, unknown_source, peer_identity, http2_handshake, bad_request, denied, upstream).",
            ),
            &["reason"],
        )?;
        prom.register(Box::new(refusals.clone()))?;
        Ok(Self {
            refusals,
            rtt,
            connect,
            handshake,
            workloads,
            open: Mutex::new(HashMap::new()),
            opened: counter(
                "heddle_tcp_connections_opened_total",
                "TCP connections opened (forwarded to their destination), counted by the reporting agent.",
            )?,
            closed: counter(
                "heddle_tcp_connections_closed_total",
                "TCP connections closed after opening; response_flags says how they ended (- is clean).",
            )?,
            failed: counter(
                "heddle_tcp_connections_failed_total",
                "TCP connections that could not be forwarded (DENIED by policy, or CONNECT_FAILED).",
            )?,
            received_bytes: counter(
                "heddle_tcp_received_bytes_total",
                "Bytes from the client toward the server (request direction, as Istio's istio_tcp_received_bytes_total), added when the connection closes.",
            )?,
            sent_bytes: counter(
                "heddle_tcp_sent_bytes_total",
                "Bytes from the server back to the client (response direction, as Istio's istio_tcp_sent_bytes_total), added when the connection closes.",
            )?,
            duration,
        })
    }

    fn labels(&self, info: &ConnInfo) -> ConnLabels {
        ConnLabels::resolve(info, &self.workloads.borrow())
    }

    /// Connection `conn` opened; its labels are kept until
    /// [`ConnMetrics::closed`] for the same `conn`.
    pub fn opened(&self, conn: u64, info: &ConnInfo) {
        let l = self.labels(info);
        self.opened.with_label_values(&l.values(ResponseFlag::None)).inc();
        if let Some(d) = info.connect {
            self.connect.with_label_values(&l.duration_values()).observe(d.as_secs_f64());
        }
        self.open.lock().unwrap_or_else(PoisonError::into_inner).insert(conn, l);
    }

    /// A node-to-node mTLS handshake finished successfully in `duration`.
    pub fn tls_handshake(&self, side: HandshakeSide, duration: Duration) {
        self.handshake.with_label_values(&[side.reason()]).observe(duration.as_secs_f64());
    }

    /// Connection `conn` closed after moving `(to_server, to_client)` bytes;
    /// counted under the labels resolved when it opened (its pod may have
    /// left the registry since).
    pub fn closed(&self, conn: u64, info: &ConnInfo, bytes: (u64, u64), duration: Duration, error: bool) {
        let kept = self.open.lock().unwrap_or_else(PoisonError::into_inner).remove(&conn);
        let l = kept.unwrap_or_else(|| self.labels(info));
        let flag = if info.policy.denied || info.policy.closed_by_policy.is_some() {
            ResponseFlag::Denied
        } else if error {
            ResponseFlag::Aborted
        } else {
            ResponseFlag::None
        };
        let values = l.values(flag);
        self.closed.with_label_values(&values).inc();
        self.received_bytes.with_label_values(&values).inc_by(bytes.0);
        self.sent_bytes.with_label_values(&values).inc_by(bytes.1);
        self.duration.with_label_values(&l.duration_values()).observe(duration.as_secs_f64());
        if let Some(rtt) = info.tcp.rtt_us {
            self.rtt.with_label_values(&l.duration_values()).observe(f64::from(rtt) / 1e6);
        }
    }

    /// The tunnel port turned a connection or stream away.
    pub fn tunnel_refused(&self, why: TunnelRefusal) {
        self.refusals.with_label_values(&[why.reason()]).inc();
    }

    /// A connection could not be forwarded.
    pub fn failed(&self, info: &ConnInfo) {
        let flag = if info.policy.denied { ResponseFlag::Denied } else { ResponseFlag::ConnectFailed };
        let l = self.labels(info);
        self.failed.with_label_values(&l.values(flag)).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config, registry::Registry};
    use std::{path::Path, sync::Arc};

    fn registry() -> Registry {
        let text = r#"
workloads:
  - {name: client, namespace: demo, node: n1, ips: ["10.0.1.2"], enrolled: false}
  - {name: server, namespace: demo, node: n2, ips: ["10.0.2.2"], enrolled: false}
"#;
        Registry::from_config(&config::parse(Path::new("t"), text).unwrap())
    }

    fn outbound() -> ConnInfo {
        let mut i = ConnInfo::new(Direction::Outbound, ObjectRef { namespace: "demo".into(), name: "client".into() });
        i.src = Some("10.0.1.2:40000".parse().unwrap());
        i.dst = Some("10.0.2.2:8080".parse().unwrap());
        i.security = Security::MutualTls;
        i.dst_identity = Some("spiffe://t/ns/demo/sa/server".into());
        i
    }

    fn text(prom: &PromRegistry) -> String {
        let mut out = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &prom.gather(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn outbound_connections_name_the_destination_from_the_registry() {
        let l = ConnLabels::resolve(&outbound(), &registry());
        assert_eq!(
            l.values(ResponseFlag::None),
            [
                "source",
                "client",
                "demo",
                "unknown",
                "server",
                "demo",
                "spiffe://t/ns/demo/sa/server",
                "unknown",
                "mutual_tls",
                "-"
            ]
        );
    }

    #[test]
    fn inbound_sources_outside_the_registry_are_unknown() {
        let mut i = outbound();
        i.direction = Direction::Inbound;
        i.workload = ObjectRef { namespace: "demo".into(), name: "server".into() };
        i.src = Some("192.0.2.9:1234".parse().unwrap());
        i.security = Security::Plaintext;
        let l = ConnLabels::resolve(&i, &registry());
        assert_eq!(
            &l.values(ResponseFlag::Denied)[..6],
            ["destination", "unknown", "unknown", "unknown", "server", "demo"]
        );
        assert_eq!(l.values(ResponseFlag::Denied)[8..], ["none", "DENIED"]);
    }

    #[test]
    fn counts_opens_closes_bytes_and_failures() {
        let prom = PromRegistry::new();
        let (_tx, rx) = watch::channel(Arc::new(registry()));
        let m = ConnMetrics::new(&prom, rx).unwrap();
        let mut i = outbound();
        i.connect = Some(Duration::from_millis(2));
        m.opened(1, &i);
        i.tcp.rtt_us = Some(40_000);
        m.closed(1, &i, (100, 7), Duration::from_millis(20), false);
        m.failed(&i);
        m.tls_handshake(HandshakeSide::Client, Duration::from_millis(3));
        let t = text(&prom);
        for line in [
            "heddle_tcp_connections_opened_total{",
            "heddle_tcp_connections_failed_total{",
            "response_flags=\"CONNECT_FAILED\"",
            "heddle_tcp_connection_duration_seconds_count{",
            "heddle_tcp_connect_duration_seconds_count{",
            "heddle_tls_handshake_duration_seconds_count{side=\"client\"} 1",
            "heddle_tcp_rtt_seconds_bucket{connection_security_policy=\"mutual_tls\",destination_workload=\"server\",destination_workload_namespace=\"demo\",reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"demo\",le=\"0.04\"} 1",
            "le=\"0.02\"} 0",
        ] {
            assert!(t.contains(line), "missing {line} in\n{t}");
        }
        let value = |metric: &str| {
            t.lines().find(|l| l.starts_with(metric)).and_then(|l| l.rsplit(' ').next()).unwrap_or_default().to_owned()
        };
        assert_eq!(value("heddle_tcp_received_bytes_total{"), "100");
        assert_eq!(value("heddle_tcp_sent_bytes_total{"), "7");
    }

    #[test]
    fn a_connection_that_outlives_its_pod_is_closed_under_its_workload_name() {
        // The pod `client-7d9f` of Deployment `client`, as the Kubernetes
        // source would register it.
        let yaml = r#"
workloads:
  - {name: client-7d9f, namespace: demo, node: n1, ips: ["10.0.1.2"], enrolled: false}
  - {name: server, namespace: demo, node: n2, ips: ["10.0.2.2"], enrolled: false}
"#;
        let config = config::parse(Path::new("t"), yaml).unwrap();
        let from_file = Registry::from_config(&config);
        let workloads: Vec<_> = from_file
            .workloads()
            .cloned()
            .map(|mut w| {
                if w.id.name == "client-7d9f" {
                    w.workload_name = "client".into();
                }
                w
            })
            .collect();
        let with_pod = Registry::from_parts("t", workloads, []);
        let prom = PromRegistry::new();
        let (tx, rx) = watch::channel(Arc::new(with_pod));
        let m = ConnMetrics::new(&prom, rx).unwrap();
        let mut i = outbound();
        i.workload.name = "client-7d9f".into();
        m.opened(7, &i);
        // A rollout: the pod leaves the registry while its connection lives.
        tx.send(Arc::new(registry())).unwrap();
        let gone = ObjectRef { namespace: "demo".into(), name: "client-7d9f".into() };
        assert!(m.workloads.borrow().workload(&gone).is_none());
        m.closed(7, &i, (100, 7), Duration::from_millis(20), false);

        let t = text(&prom);
        assert!(!t.contains("client-7d9f"), "a series names the pod:\n{t}");
        for metric in [
            "heddle_tcp_connections_closed_total{",
            "heddle_tcp_received_bytes_total{",
            "heddle_tcp_connection_duration_seconds_count{",
        ] {
            assert!(
                t.lines().any(|l| l.starts_with(metric) && l.contains("source_workload=\"client\"")),
                "{metric} not under the workload name in\n{t}"
            );
        }
        assert!(m.open.lock().unwrap().is_empty(), "the labels of a closed connection are kept");
    }
}
