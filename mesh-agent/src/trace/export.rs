//! Span records and their export: a bounded queue that never blocks the
//! request that fills it (a full queue drops the span and counts it), and
//! one task that batches spans (up to [`BATCH`], or every
//! [`BATCH_INTERVAL`]), encodes them as one OTLP
//! `ExportTraceServiceRequest` and sends it ([`super::otlp`]). A failed
//! export drops its batch (counted): spans are best effort, requests are
//! not.
//!
//! Metrics: `heddle_trace_spans_exported_total` and
//! `heddle_trace_spans_dropped_total{reason="queue_full"|"export_failed"}`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    resource::v1::Resource,
    trace::v1::{span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, Status},
};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry as PromRegistry};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{context::Propagators, otlp, Settings};

/// Spans waiting for export, at most; more are dropped.
pub const QUEUE: usize = 4096;
/// Spans per export, at most.
pub const BATCH: usize = 512;
/// Longest a span waits for its batch.
pub const BATCH_INTERVAL: Duration = Duration::from_secs(1);

/// A span's kind (OTLP's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The proxy receiving a request or connection.
    Server,
    /// The proxy's request or connection upstream.
    Client,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A flag.
    Bool(bool),
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    /// Its trace.
    pub trace_id: TraceId,
    /// Its id.
    pub span_id: SpanId,
    /// Its parent, if any.
    pub parent: Option<SpanId>,
    /// `tracestate`, W3C's header form.
    pub trace_state: String,
    /// Its name.
    pub name: String,
    /// Server or client.
    pub kind: Kind,
    /// When it started.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// Its attributes (semantic-convention names, `heddle.*` for the mesh's own).
    pub attributes: Vec<(&'static str, Value)>,
    /// An error, with its description.
    pub error: Option<String>,
}

/// The process's tracer: sampling, the propagators and the queue.
pub struct Tracer {
    queue: Option<mpsc::Sender<SpanRecord>>,
    sampling_per_million: u32,
    /// Header propagation.
    pub propagators: Propagators,
    dropped: IntCounterVec,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Tracer {
    /// A tracer that records nothing (no endpoint configured).
    #[must_use]
    pub fn disabled() -> Self {
        Self {
            queue: None,
            sampling_per_million: 0,
            propagators: Propagators::default(),
            dropped: dropped_counter(),
            task: std::sync::Mutex::new(None),
        }
    }

    /// Starts the export task for `settings` (none: [`Tracer::disabled`]),
    /// with `service_name` unless the settings name one, registering the
    /// metrics in `prometheus`. The task ends, after a last export, when
    /// `stop` is cancelled.
    ///
    /// # Errors
    /// The metrics cannot be registered (a second tracer on one registry).
    pub fn start(
        settings: Option<&Settings>,
        service_name: &str,
        prometheus: &PromRegistry,
        stop: CancellationToken,
    ) -> Result<Self, prometheus::Error> {
        let Some(settings) = settings else { return Ok(Self::disabled()) };
        let dropped = dropped_counter();
        let exported =
            IntCounter::new("heddle_trace_spans_exported_total", "Spans the collector accepted (OTLP export).")?;
        prometheus.register(Box::new(dropped.clone()))?;
        prometheus.register(Box::new(exported.clone()))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut resource = settings.resource.clone();
        if !resource.iter().any(|(k, _)| k == "service.name") {
            resource.insert(0, ("service.name".to_owned(), service_name.to_owned()));
        }
        let task = Batcher {
            rx,
            client: otlp::Client::new(settings.endpoint.clone()),
            resource: Resource {
                attributes: resource.into_iter().map(|(k, v)| kv(k, Value::Str(v))).collect(),
                ..Resource::default()
            },
            exported,
            dropped: dropped.clone(),
        };
        let task = tokio::spawn(task.run(stop));
        tracing::info!(
            endpoint = %settings.endpoint.addr,
            protocol = settings.endpoint.protocol.as_str(),
            sampling_percent = f64::from(settings.sampling_per_million) / 10_000.0,
            "exporting traces over OTLP"
        );
        Ok(Self {
            queue: Some(tx),
            sampling_per_million: settings.sampling_per_million,
            propagators: Propagators::default(),
            dropped,
            task: std::sync::Mutex::new(Some(task)),
        })
    }

    /// Waits (up to `limit`) for the export task to send what is queued;
    /// call after cancelling its `stop` token.
    pub async fn flushed(&self, limit: Duration) {
        let task = self.task.lock().expect("task lock").take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(limit, task).await;
        }
    }

    /// Whether spans are exported at all.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// A new trace's sampling decision.
    #[must_use]
    pub fn sample(&self) -> bool {
        crate::chance::per_million(self.sampling_per_million)
    }

    /// Queues a finished span; never waits (a full queue drops it).
    pub fn record(&self, span: SpanRecord) {
        let Some(q) = &self.queue else { return };
        if q.try_send(span).is_err() {
            self.dropped.with_label_values(&["queue_full"]).inc();
        }
    }
}

fn dropped_counter() -> IntCounterVec {
    IntCounterVec::new(
        Opts::new(
            "heddle_trace_spans_dropped_total",
            "Spans not exported: reason=queue_full (the export queue was full) or export_failed (the collector refused or could not be reached).",
        ),
        &["reason"],
    )
    .expect("valid metric")
}

struct Batcher {
    rx: mpsc::Receiver<SpanRecord>,
    client: otlp::Client,
    resource: Resource,
    exported: IntCounter,
    dropped: IntCounterVec,
}

impl Batcher {
    async fn run(mut self, stop: CancellationToken) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let first = tokio::select! {
                s = self.rx.recv() => s,
                () = stop.cancelled() => None,
            };
            let Some(first) = first else { break };
            batch.push(first);
            let deadline = tokio::time::Instant::now() + BATCH_INTERVAL;
            while batch.len() < BATCH {
                tokio::select! {
                    s = self.rx.recv() => match s {
                        Some(s) => batch.push(s),
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                    () = stop.cancelled() => break,
                }
            }
            self.send(&mut batch).await;
        }
        // Stopping: what is queued goes out once more.
        while let Ok(s) = self.rx.try_recv() {
            batch.push(s);
        }
        if !batch.is_empty() {
            self.send(&mut batch).await;
        }
    }

    async fn send(&mut self, batch: &mut Vec<SpanRecord>) {
        let n = batch.len() as u64;
        let message = encode(&self.resource, batch.drain(..));
        match self.client.export(message).await {
            Ok(()) => self.exported.inc_by(n),
            Err(e) => {
                self.dropped.with_label_values(&["export_failed"]).inc_by(n);
                tracing::warn!(error = %e, spans = n, "trace export failed; spans dropped");
            }
        }
    }
}

fn kv(key: impl Into<String>, value: Value) -> KeyValue {
    let value = match value {
        Value::Str(s) => any_value::Value::StringValue(s),
        Value::Int(i) => any_value::Value::IntValue(i),
        Value::Bool(b) => any_value::Value::BoolValue(b),
    };
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..KeyValue::default() }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One `ExportTraceServiceRequest` of `spans`, protobuf-encoded.
pub fn encode(resource: &Resource, spans: impl Iterator<Item = SpanRecord>) -> Bytes {
    let spans = spans
        .map(|s| Span {
            trace_id: s.trace_id.to_bytes().to_vec(),
            span_id: s.span_id.to_bytes().to_vec(),
            parent_span_id: s.parent.map(|p| p.to_bytes().to_vec()).unwrap_or_default(),
            trace_state: s.trace_state,
            name: s.name,
            kind: match s.kind {
                Kind::Server => SpanKind::Server,
                Kind::Client => SpanKind::Client,
            } as i32,
            start_time_unix_nano: unix_nanos(s.start),
            end_time_unix_nano: unix_nanos(s.end),
            attributes: s.attributes.into_iter().map(|(k, v)| kv(k, v)).collect(),
            status: Some(match s.error {
                Some(message) => Status { message, code: StatusCode::Error as i32 },
                None => Status { message: String::new(), code: StatusCode::Unset as i32 },
            }),
            ..Span::default()
        })
        .collect();
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "heddle".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..InstrumentationScope::default()
                }),
                spans,
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    };
    Bytes::from(request.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str) -> SpanRecord {
        SpanRecord {
            trace_id: TraceId::from(7_u128),
            span_id: SpanId::from_bytes([0, 0, 0, 0, 0, 0, 0, 9]),
            parent: Some(SpanId::from_bytes([0, 0, 0, 0, 0, 0, 0, 8])),
            trace_state: String::new(),
            name: name.into(),
            kind: Kind::Server,
            start: UNIX_EPOCH + Duration::from_secs(1),
            end: UNIX_EPOCH + Duration::from_secs(2),
            attributes: vec![("http.response.status_code", Value::Int(503))],
            error: Some("503".into()),
        }
    }

    #[test]
    fn spans_encode_as_one_otlp_request() {
        let resource = Resource { attributes: vec![kv("service.name", Value::Str("w".into()))], ..Resource::default() };
        let bytes = encode(&resource, [span("a"), span("b")].into_iter());
        let back = ExportTraceServiceRequest::decode(bytes).unwrap();
        let rs = &back.resource_spans[0];
        assert_eq!(rs.resource.as_ref().unwrap().attributes[0].key, "service.name");
        let spans = &rs.scope_spans[0].spans;
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].trace_id.len(), 16);
        assert_eq!(spans[0].parent_span_id, vec![0, 0, 0, 0, 0, 0, 0, 8]);
        assert_eq!(spans[0].start_time_unix_nano, 1_000_000_000);
        assert_eq!(spans[0].kind, SpanKind::Server as i32);
        assert_eq!(spans[0].status.as_ref().unwrap().code, StatusCode::Error as i32);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let (tx, _rx) = mpsc::channel(1);
        let tracer = Tracer { queue: Some(tx), ..Tracer::disabled() };
        tracer.record(span("kept"));
        tracer.record(span("dropped"));
        assert_eq!(tracer.dropped.with_label_values(&["queue_full"]).get(), 1);
    }

    #[test]
    fn sampling_all_or_nothing_is_exact() {
        let all = Tracer { sampling_per_million: 1_000_000, ..Tracer::disabled() };
        let none = Tracer::disabled();
        assert!((0..1000).all(|_| all.sample()));
        assert!((0..1000).all(|_| !none.sample()));
    }
}
