//! What the waypoint records per request: a `request` flow record (the L7
//! facts in `http`), Istio's L7 metrics renamed `heddle_*`
//! (`heddle_requests_total`, `heddle_request_duration_seconds`,
//! `heddle_request_bytes`, `heddle_response_bytes`, `reporter="waypoint"`,
//! Istio's label names), and per-rule hit counters for `heddle routes`.
//!
//! A request is recorded once, when its response ends (the last body frame
//! or trailers, so a streaming gRPC call is recorded when it finishes), or
//! when the client goes away first (flag `DC`). Label values are bounded:
//! names from the registry or `unknown`, status codes, a fixed set of
//! flags; paths never become labels.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry as PromRegistry};

use super::pool::{BoxError, HttpBody};
use crate::{
    flows::{ConnInfo, FlowLog},
    registry::Registry,
};

const UNKNOWN: &str = "unknown";
/// Istio's L7 labels, in order.
const LABELS: [&str; 12] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "response_code",
    "grpc_response_status",
    "request_protocol",
    "response_flags",
];
/// Request duration buckets, seconds: 0.5 ms to 60 s.
const DURATION_BUCKETS: [f64; 16] =
    [0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Body size buckets, bytes.
const SIZE_BUCKETS: [f64; 9] = [64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262_144.0, 1_048_576.0, 16_777_216.0];

/// The waypoint's metrics and flow log.
pub struct Telemetry {
    /// Request records (and L4 passthrough records).
    pub flows: Arc<FlowLog>,
    /// The Prometheus registry served on the metrics port.
    pub prometheus: PromRegistry,
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
    route_requests: IntCounterVec,
    retries: IntCounterVec,
    mirrors: IntCounterVec,
    ejections: IntCounterVec,
    rule_hits: Mutex<BTreeMap<(crate::flows::Name, usize), u64>>,
    /// Spans of sampled requests.
    pub tracer: crate::trace::Tracer,
}

impl Telemetry {
    /// Registers the metrics.
    #[must_use]
    pub fn new(flows: Arc<FlowLog>, prometheus: PromRegistry, tracer: crate::trace::Tracer) -> Self {
        let requests = IntCounterVec::new(
            Opts::new("heddle_requests_total", "Requests handled by the waypoint (Istio's istio_requests_total)."),
            &LABELS,
        )
        .expect("valid metric");
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), &LABELS).expect("valid metric")
        };
        let duration = histogram(
            "heddle_request_duration_seconds",
            "Time from the request to the end of its response, at the waypoint.",
            &DURATION_BUCKETS,
        );
        let request_bytes = histogram("heddle_request_bytes", "Request body sizes.", &SIZE_BUCKETS);
        let response_bytes = histogram("heddle_response_bytes", "Response body sizes.", &SIZE_BUCKETS);
        let route_requests = IntCounterVec::new(
            Opts::new("heddle_route_requests_total", "Requests per route rule, and their response class."),
            &["route", "rule", "response_class"],
        )
        .expect("valid metric");
        let retries = IntCounterVec::new(
            Opts::new(
                "heddle_retries_total",
                "Retries by route: outcome=retried (one more attempt sent) or budget_exhausted (a retry the budget refused).",
            ),
            &["route", "outcome"],
        )
        .expect("valid metric");
        let mirrors = IntCounterVec::new(
            Opts::new(
                "heddle_mirror_requests_total",
                "Request copies for shadow backends (RequestMirror), by outcome: sent, failed, dropped (too many in flight), skipped_body (streamed body), no_backend.",
            ),
            &["backend", "outcome"],
        )
        .expect("valid metric");
        let ejections = IntCounterVec::new(
            Opts::new(
                "heddle_outlier_ejections_total",
                "Endpoints ejected by outlier detection (DestinationRule outlierDetection), by backend.",
            ),
            &["backend"],
        )
        .expect("valid metric");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(retries.clone()),
            Box::new(ejections.clone()),
            Box::new(mirrors.clone()),
            Box::new(duration.clone()),
            Box::new(request_bytes.clone()),
            Box::new(response_bytes.clone()),
            Box::new(route_requests.clone()),
        ] {
            prometheus.register(m).expect("unique metric");
        }
        Self {
            flows,
            prometheus,
            requests,
            duration,
            request_bytes,
            response_bytes,
            route_requests,
            retries,
            mirrors,
            ejections,
            rule_hits: Mutex::new(BTreeMap::new()),
            tracer,
        }
    }

    /// Counts a retry decision for `route`.
    pub fn retried(&self, route: &str, outcome: &str) {
        self.retries.with_label_values(&[route, outcome]).inc();
    }

    /// Counts an endpoint of `backend` ejected by outlier detection.
    pub fn ejected(&self, backend: &str) {
        self.ejections.with_label_values(&[backend]).inc();
    }

    /// Counts what became of a request copy for `backend`.
    pub fn mirrored(&self, backend: &str, outcome: super::mirror::Outcome) {
        self.mirrors.with_label_values(&[backend, outcome.label()]).inc();
    }

    /// How often each rule matched, by (`route`, rule index).
    #[must_use]
    pub fn rule_hits(&self) -> BTreeMap<(crate::flows::Name, usize), u64> {
        self.rule_hits.lock().expect("hits lock").clone()
    }

    #[allow(clippy::cast_precision_loss, reason = "byte counts far below 2^52 observed into a histogram")]
    fn finish(&self, rec: &Pending, response_bytes: u64, flag: Option<&'static str>) {
        let mut info = rec.info.clone();
        let Some(http) = info.http.as_mut() else {
            return;
        };
        if let Some(f) = flag {
            if http.response_flags == "-" {
                http.response_flags = f;
            }
        }
        let request_bytes = rec.request_bytes.load(Ordering::Relaxed);
        let elapsed = rec.started.elapsed();
        let code = http.status.to_string();
        let grpc = http.grpc_status.map_or_else(|| "-".to_owned(), |s| s.to_string());
        let protocol = if rec.grpc { "grpc" } else { "http" };
        let values: [&str; 12] = [
            "waypoint",
            &rec.labels[0],
            &rec.labels[1],
            &rec.labels[2],
            &rec.labels[3],
            &rec.labels[4],
            &rec.labels[5],
            &rec.labels[6],
            &code,
            &grpc,
            protocol,
            http.response_flags,
        ];
        self.requests.with_label_values(&values).inc();
        self.duration.with_label_values(&values).observe(elapsed.as_secs_f64());
        self.request_bytes.with_label_values(&values).observe(request_bytes as f64);
        self.response_bytes.with_label_values(&values).observe(response_bytes as f64);
        if let (Some(route), Some(rule)) = (&http.route, http.rule) {
            let class = format!("{}xx", http.status / 100);
            self.route_requests.with_label_values(&[&**route, &rule.to_string(), &class]).inc();
            *self.rule_hits.lock().expect("hits lock").entry((route.clone(), rule)).or_default() += 1;
        }
        if let Some(trace) = &rec.trace {
            super::spans::finish(&self.tracer, trace, &info, rec.started, elapsed);
        }
        self.flows.request(rec.conn, &info, (request_bytes, response_bytes), elapsed);
    }
}

/// A request not yet recorded.
pub struct Pending {
    /// Connection id (the downstream stream's).
    pub conn: u64,
    /// The record's facts; `http` must be set.
    pub info: ConnInfo,
    /// When the request arrived.
    pub started: Instant,
    /// Body bytes the client sent (counted by [`Counted`]).
    pub request_bytes: Arc<AtomicU64>,
    /// A gRPC request.
    pub grpc: bool,
    /// Source workload, namespace, principal; destination workload,
    /// namespace, principal; destination service.
    pub labels: [String; 7],
    /// The backend's circuit-breaker permit, held until the response ends.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Its trace, when tracing is on.
    pub trace: Option<Box<super::spans::RequestTrace>>,
}

impl Pending {
    /// Fills the metric labels from the registry (client by its IP,
    /// destination by the endpoint's IP) and the record's identities.
    pub fn resolve_labels(&mut self, registry: &Registry) {
        let peer = |ip: Option<std::net::IpAddr>| {
            ip.and_then(|ip| registry.workload_by_ip(ip)).map_or_else(
                || (UNKNOWN.to_owned(), UNKNOWN.to_owned()),
                |w| (w.workload_name.clone(), w.id.namespace.clone()),
            )
        };
        let upstream = self.info.http.as_ref().and_then(|h| h.upstream);
        let (sw, sns) = peer(self.info.src.map(|s| s.ip()));
        let (dw, dns) = peer(upstream.map(|u| u.ip()));
        let principal = |p: &Option<crate::flows::Name>| p.as_deref().unwrap_or(UNKNOWN).to_owned();
        let service = self
            .info
            .http
            .as_ref()
            .and_then(|h| h.backend.as_deref().map(str::to_owned))
            .or_else(|| self.info.service.as_ref().map(ToString::to_string))
            .unwrap_or_else(|| UNKNOWN.to_owned());
        self.labels =
            [sw, sns, principal(&self.info.src_identity), dw, dns, principal(&self.info.dst_identity), service];
    }
}

/// Records a request that never got an upstream response body (answered
/// by the waypoint itself: redirect, no route, 5xx of its own).
pub fn record_local(telemetry: &Telemetry, rec: &Pending) {
    telemetry.finish(rec, 0, None);
}

/// A response body that records its request when it ends.
pub struct Observed {
    inner: HttpBody,
    rec: Option<Pending>,
    telemetry: Arc<Telemetry>,
    bytes: u64,
}

impl Observed {
    /// Observes `inner` for `rec`.
    #[must_use]
    pub fn new(inner: HttpBody, rec: Pending, telemetry: Arc<Telemetry>) -> Self {
        Self { inner, rec: Some(rec), telemetry, bytes: 0 }
    }

    fn done(&mut self, flag: Option<&'static str>) {
        if let Some(rec) = self.rec.take() {
            self.telemetry.finish(&rec, self.bytes, flag);
        }
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                    // hyper stops polling a body that says it has ended.
                    if self.inner.is_end_stream() {
                        self.done(None);
                    }
                }
                if let Some(trailers) = frame.trailers_ref() {
                    let grpc = trailers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
                    if let Some(http) = self.rec.as_mut().and_then(|r| r.info.http.as_mut()) {
                        if grpc.is_some() {
                            http.grpc_status = grpc;
                        }
                    }
                    self.done(None);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let msg = e.to_string();
                if let Some(http) = self.rec.as_mut().and_then(|r| r.info.http.as_mut()) {
                    http.error = Some(format!("upstream response body: {msg}"));
                }
                self.done(Some("UR"));
            }
            Poll::Ready(None) => self.done(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (or the stream was
        // reset) while the response was still coming.
        if self.rec.is_some() && self.inner.is_end_stream() {
            self.done(None);
        }
        if self.rec.is_some() {
            if let Some(http) = self.rec.as_mut().and_then(|r| r.info.http.as_mut()) {
                http.error.get_or_insert_with(|| "client went away before the response ended".into());
            }
            self.done(Some("DC"));
        }
    }
}

/// A request body that counts the bytes it carries.
pub struct Counted {
    inner: HttpBody,
    bytes: Arc<AtomicU64>,
}

impl Counted {
    /// Counts `inner` into `bytes`.
    #[must_use]
    pub fn new(inner: HttpBody, bytes: Arc<AtomicU64>) -> Self {
        Self { inner, bytes }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
