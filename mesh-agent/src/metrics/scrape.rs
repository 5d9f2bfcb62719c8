//! The metrics endpoint: agent internals read at scrape time, and the HTTP
//! server on 15020 (`/metrics`, `/healthz`), run by the composition root as
//! one task (one more per scrape connection) until shutdown.
//!
//! Internals are copied into the registry on each scrape, under one lock so
//! concurrent scrapes never double-count: gauges are reset and refilled
//! (a certificate or map that went away disappears), and counters owned by
//! other components (policy decisions, eBPF reasons, evicted flow records,
//! lost access log lines)
//! are advanced by the difference since the last scrape, which keeps them
//! monotonic as Prometheus requires.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Request, Response, StatusCode};
use prometheus::{
    Encoder as _, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry as PromRegistry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{MetricsError, UNKNOWN};
use crate::{authz::Authorizer, datapath::Datapath, flows::FlowLog, identity::certs::CertManager};

/// What the exporter reads at scrape time.
pub struct Sources {
    /// Flow log: open connections and evicted records.
    pub flows: Arc<FlowLog>,
    /// eBPF maps and per-reason counters.
    pub datapath: Arc<Datapath>,
    /// Policy decision counters.
    pub authz: Arc<Authorizer>,
    /// Certificates held, when mTLS is on.
    pub certs: Option<Arc<CertManager>>,
}

/// The registry of every series, and the internals it refreshes.
pub struct Exporter {
    prom: PromRegistry,
    sources: Sources,
    internals: Internals,
    scrape: Mutex<()>,
}

struct Internals {
    decisions: IntCounterVec,
    datapath: IntCounterVec,
    dropped: IntCounter,
    subscriber_dropped: IntCounter,
    subscribers: IntGauge,
    access_log_dropped: IntCounter,
    active: IntGauge,
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    cert_expiry: IntGaugeVec,
}

impl Internals {
    fn new(prom: &PromRegistry) -> Result<Self, MetricsError> {
        fn reg<C: prometheus::core::Collector + Clone + 'static>(prom: &PromRegistry, c: C) -> Result<C, MetricsError> {
            prom.register(Box::new(c.clone()))?;
            Ok(c)
        }
        Ok(Self {
            decisions: reg(prom, IntCounterVec::new(
                Opts::new("heddle_policy_decisions_total", "Authorization decisions on inbound connections: verdict is allow, deny, audit, dry_run_allow, dry_run_deny or close (a live connection closed by a policy change); action and policy are those of the deciding policy, or \"none\"."),
                &["action", "policy", "verdict"],
            )?)?,
            datapath: reg(prom, IntCounterVec::new(
                Opts::new("heddle_datapath_decisions_total", "eBPF datapath decisions by named reason (per-CPU counters summed)."),
                &["reason"],
            )?)?,
            dropped: reg(prom, IntCounter::new(
                "heddle_flow_records_dropped_total",
                "Flow records evicted from the bounded ring (oldest first) before being read; raise --flow-capacity if this grows.",
            )?)?,
            subscriber_dropped: reg(prom, IntCounter::new(
                "heddle_flow_subscriber_dropped_total",
                "Flow records lost by live flow subscribers (heddle flows --follow, GET /flows?follow=true) whose queue was full: a slow reader loses records instead of slowing connections.",
            )?)?,
            subscribers: reg(prom, IntGauge::new(
                "heddle_flow_subscribers",
                "Live flow subscribers now.",
            )?)?,
            access_log_dropped: reg(prom, IntCounter::new(
                "heddle_access_log_dropped_total",
                "Access log lines lost: the queue to the access log writer thread was full (the output is slower than connections end, e.g. a stalled stdout pipe), or the write failed. Connections never wait for the access log.",
            )?)?,
            active: reg(prom, IntGauge::new(
                "heddle_active_connections",
                "Connections the agent is forwarding now.",
            )?)?,
            map_entries: reg(prom, IntGaugeVec::new(
                Opts::new("heddle_ebpf_map_entries", "Entries in each eBPF map now."),
                &["map"],
            )?)?,
            map_capacity: reg(prom, IntGaugeVec::new(
                Opts::new("heddle_ebpf_map_capacity", "Maximum entries of each eBPF map."),
                &["map"],
            )?)?,
            cert_expiry: reg(prom, IntGaugeVec::new(
                Opts::new("heddle_certificate_expiry_timestamp_seconds", "End of validity (Unix seconds) of the workload certificate held for each identity."),
                &["identity"],
            )?)?,
        })
    }
}

/// Advances a counter to `total` (a monotonic count kept elsewhere).
fn advance(counter: &IntCounter, total: u64) {
    let delta = total.saturating_sub(counter.get());
    if delta > 0 {
        counter.inc_by(delta);
    }
}

fn gauge(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

impl Exporter {
    /// An exporter over `prom` (which already holds the per-connection
    /// series) reading `sources` at scrape time.
    pub fn new(prom: PromRegistry, sources: Sources) -> Result<Self, MetricsError> {
        let internals = Internals::new(&prom)?;
        Ok(Self { prom, sources, internals, scrape: Mutex::new(()) })
    }

    /// Every series in the Prometheus text format (version 0.0.4).
    #[must_use]
    pub fn render(&self) -> String {
        let families = {
            let _one_scrape = self.scrape.lock().expect("scrape lock");
            self.refresh();
            self.prom.gather()
        };
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn refresh(&self) {
        let (s, m) = (&self.sources, &self.internals);
        m.active.set(gauge(s.flows.active()));
        advance(&m.dropped, s.flows.dropped());
        let subs = s.flows.subscriber_stats();
        advance(&m.subscriber_dropped, subs.lost_total);
        m.subscribers.set(gauge(subs.subscribers.len()));
        advance(&m.access_log_dropped, s.flows.access_log_dropped());
        for d in s.authz.decisions() {
            let policy = d.policy.map_or_else(|| "none".to_owned(), |p| p.to_string());
            let action = d.action.unwrap_or("none");
            advance(&m.decisions.with_label_values(&[action, policy.as_str(), d.verdict]), d.count);
        }
        for (reason, total) in s.datapath.reasons() {
            advance(&m.datapath.with_label_values(&[reason]), total);
        }
        m.map_entries.reset();
        m.map_capacity.reset();
        for (map, usage) in s.datapath.map_usage() {
            m.map_entries.with_label_values(&[map]).set(gauge(usage.entries));
            m.map_capacity.with_label_values(&[map]).set(i64::from(usage.capacity));
        }
        m.cert_expiry.reset();
        for cert in s.certs.iter().flat_map(|c| c.list()) {
            if let Some(not_after) = cert.not_after {
                let identity = if cert.identity.is_empty() { UNKNOWN } else { cert.identity.as_str() };
                m.cert_expiry.with_label_values(&[identity]).set(gauge(not_after));
            }
        }
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    crate::http_server::bind(addr).await
}

/// Serves `/metrics` and `/healthz` on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, exporter: Arc<Exporter>, stop: CancellationToken) {
    crate::http_server::serve(listener, "metrics", exporter, route, stop).await;
}

fn route(exporter: &Exporter, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (StatusCode::OK, TextEncoder::new().format_type().to_owned(), exporter.render()),
        "/healthz" => (StatusCode::OK, "text/plain".to_owned(), "ok\n".to_owned()),
        _ => (StatusCode::NOT_FOUND, "text/plain".to_owned(), "not found: try /metrics or /healthz\n".to_owned()),
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}
