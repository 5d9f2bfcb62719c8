//! Trace context as it travels in request headers: W3C Trace Context
//! (`traceparent`, `tracestate`) and Zipkin's B3 (`x-b3-*` and the single
//! `b3` header, which many applications forward, Bookinfo's included).
//!
//! Parsing and writing are the OpenTelemetry project's propagators; this
//! module decides which one wins (W3C, then B3) and what one proxy hop
//! looks like: a server span whose parent is the caller's span, and a
//! client span, child of the server span, whose id the upstream request
//! carries. A sampling decision in the request is kept (parent-based
//! sampling); without one, the hop decides. The context is rewritten
//! whether or not the hop is sampled, so the services behind it agree.

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
    Context,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
// The zipkin crate is deprecated as an exporter (OTLP replaces it); its B3
// propagator is still the OpenTelemetry project's only one for Rust, and
// B3 is what Bookinfo-style applications forward. Replace it when the
// project moves the propagator elsewhere.
#[allow(deprecated)]
use opentelemetry_zipkin::{B3Encoding, Propagator as B3};

/// B3's "sampling deferred" flag, as the zipkin propagator sets it.
const DEFERRED: u8 = 0x02;
/// The single B3 header.
const B3_SINGLE: &str = "b3";
/// B3's parent span header (the zipkin propagator does not write it).
const B3_PARENT: &str = "x-b3-parentspanid";

/// The propagators, made once per process.
#[allow(deprecated)] // B3, see the import
pub struct Propagators {
    w3c: TraceContextPropagator,
    b3_multi: B3,
    b3_single: B3,
}

#[allow(deprecated)] // B3, see the import
impl Default for Propagators {
    fn default() -> Self {
        Self {
            w3c: TraceContextPropagator::new(),
            b3_multi: B3::with_encoding(B3Encoding::MultipleHeader),
            b3_single: B3::with_encoding(B3Encoding::SingleHeader),
        }
    }
}

/// One proxy hop of a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Hop {
    /// The trace.
    pub trace_id: TraceId,
    /// The caller's span, if the request carried one.
    pub parent: Option<SpanId>,
    /// This hop's server span.
    pub server: SpanId,
    /// This hop's client span (the upstream request's parent).
    pub client: SpanId,
    /// Whether the trace is recorded.
    pub sampled: bool,
    /// The caller's `tracestate`, passed on unchanged.
    pub trace_state: TraceState,
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(key), HeaderValue::try_from(value)) {
            self.0.insert(k, v);
        }
    }
}

/// A new span id (never zero).
fn random_span_id() -> SpanId {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return SpanId::from_bytes(id.to_be_bytes());
        }
    }
}

/// A new trace id (never zero).
fn random_trace_id() -> TraceId {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return TraceId::from(id);
        }
    }
}

impl Propagators {
    /// The caller's span context: W3C's if valid, else B3's (single header
    /// first, as B3 says).
    #[must_use]
    pub fn extract(&self, headers: &HeaderMap) -> Option<SpanContext> {
        let h = Headers(headers);
        [&self.w3c as &dyn TextMapPropagator, &self.b3_multi].into_iter().find_map(|p| {
            let cx = p.extract(&h);
            let sc = cx.span().span_context().clone();
            sc.is_valid().then_some(sc)
        })
    }

    /// This hop of the request's trace: the caller's context continued, or
    /// a new trace; `sample` decides when the request carries no decision.
    pub fn begin(&self, headers: &HeaderMap, sample: impl FnOnce() -> bool) -> Hop {
        let parent = self.extract(headers);
        // B3's debug flag forces the trace, whatever else the request says.
        let decided = b3_debug(headers).then_some(true).or_else(|| {
            parent
                .as_ref()
                .filter(|p| p.trace_flags().to_u8() & DEFERRED == 0)
                .map(SpanContext::is_sampled)
                .or_else(|| sampling_only(headers))
        });
        Hop {
            trace_id: parent.as_ref().map_or_else(random_trace_id, SpanContext::trace_id),
            parent: parent.as_ref().map(SpanContext::span_id),
            server: random_span_id(),
            client: random_span_id(),
            sampled: decided.unwrap_or_else(sample),
            trace_state: parent.map_or(TraceState::NONE, |p| p.trace_state().clone()),
        }
    }

    /// Writes `hop`'s client span as the upstream request's context:
    /// `traceparent` (and `tracestate` if any), `x-b3-traceid`,
    /// `x-b3-spanid`, `x-b3-parentspanid` (the server span), `x-b3-sampled`,
    /// `x-b3-flags: 1` when the request was a B3 debug trace, and the
    /// single `b3` header when the request came with one.
    pub fn inject(&self, hop: &Hop, headers: &mut HeaderMap) {
        let flags = TraceFlags::default().with_sampled(hop.sampled);
        let sc = SpanContext::new(hop.trace_id, hop.client, flags, true, hop.trace_state.clone());
        let cx = Context::new().with_remote_span_context(sc);
        let single = headers.contains_key(B3_SINGLE);
        let debug = b3_debug(headers);
        headers.remove(B3_FLAGS);
        let mut out = HeadersMut(headers);
        if debug {
            out.set(B3_FLAGS, "1".to_owned());
        }
        self.w3c.inject_context(&cx, &mut out);
        self.b3_multi.inject_context(&cx, &mut out);
        out.set(B3_PARENT, hop.server.to_string());
        if single {
            self.b3_single.inject_context(&cx, &mut out);
        }
    }
}

/// The trace of one L4 connection side: its span, and the span of the
/// other side when the source agent sent one in the HBONE `CONNECT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnTrace {
    /// The trace.
    pub trace_id: TraceId,
    /// This side's span.
    pub span_id: SpanId,
    /// The source side's span (destination side only).
    pub parent: Option<SpanId>,
}

impl ConnTrace {
    /// A new trace (the source side, or a connection that came without one).
    #[must_use]
    pub fn root() -> Self {
        Self { trace_id: random_trace_id(), span_id: random_span_id(), parent: None }
    }

    /// The `traceparent` the source side sends in its `CONNECT` (sampled).
    #[must_use]
    pub fn traceparent(&self) -> HeaderValue {
        HeaderValue::try_from(format!("00-{}-{}-01", self.trace_id, self.span_id)).expect("hex ids make a header value")
    }
}

impl Propagators {
    /// The destination side of a connection whose `CONNECT` carried a
    /// sampled W3C context: a child of the source side's span.
    #[must_use]
    pub fn connection_child(&self, headers: &HeaderMap) -> Option<ConnTrace> {
        let h = Headers(headers);
        let cx = self.w3c.extract(&h);
        let sc = cx.span().span_context().clone();
        (sc.is_valid() && sc.is_sampled()).then(|| ConnTrace {
            trace_id: sc.trace_id(),
            span_id: random_span_id(),
            parent: Some(sc.span_id()),
        })
    }
}

/// A sampling decision without ids (`b3: 0`, `x-b3-sampled: 1`).
/// B3's debug flag header: `1` forces the trace and is passed on.
const B3_FLAGS: &str = "x-b3-flags";

/// Whether the request carries B3's debug flag.
fn b3_debug(headers: &HeaderMap) -> bool {
    headers.get(B3_FLAGS).is_some_and(|v| v == "1")
}

fn sampling_only(headers: &HeaderMap) -> Option<bool> {
    let v = headers.get(B3_SINGLE).or_else(|| headers.get("x-b3-sampled"))?.to_str().ok()?;
    match v {
        "1" | "true" | "d" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// The request's `x-request-id`, made (a random UUID, as Envoy does) when
/// it has none.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get("x-request-id").filter(|v| !v.is_empty()) {
        return v.clone();
    }
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    let v = HeaderValue::from_str(id).expect("a UUID is a header value");
    headers.insert("x-request-id", v.clone());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn continues_a_w3c_trace_and_its_decision() {
        let p = Propagators::default();
        let h = headers(&[("traceparent", PARENT), ("tracestate", "vendor=x")]);
        let hop = p.begin(&h, || panic!("the caller decided"));
        assert_eq!(hop.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hop.parent.unwrap().to_string(), "00f067aa0ba902b7");
        assert!(hop.sampled);
        assert_ne!(hop.server, hop.client);
        let mut out = h.clone();
        p.inject(&hop, &mut out);
        let tp = out["traceparent"].to_str().unwrap();
        assert_eq!(tp, format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", hop.client));
        assert_eq!(out["tracestate"], "vendor=x");
        assert_eq!(out["x-b3-traceid"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(out["x-b3-spanid"].to_str().unwrap(), hop.client.to_string());
        assert_eq!(out["x-b3-parentspanid"].to_str().unwrap(), hop.server.to_string());
        assert_eq!(out["x-b3-sampled"], "1");
        assert!(!out.contains_key("b3"), "no single header unless the caller used it");
    }

    #[test]
    fn an_unsampled_parent_stays_unsampled_and_is_still_propagated() {
        let p = Propagators::default();
        let h = headers(&[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")]);
        let hop = p.begin(&h, || true);
        assert!(!hop.sampled);
        let mut out = h.clone();
        p.inject(&hop, &mut out);
        assert!(out["traceparent"].to_str().unwrap().ends_with("-00"));
        assert_eq!(out["x-b3-sampled"], "0");
    }

    #[test]
    fn continues_b3_multi_and_single_headers() {
        let p = Propagators::default();
        let h = headers(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ]);
        let hop = p.begin(&h, || false);
        assert_eq!(hop.trace_id.to_string(), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(hop.parent.unwrap().to_string(), "e457b5a2e4d86bd1");
        assert!(hop.sampled);
        let h = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0")]);
        let hop = p.begin(&h, || true);
        assert!(!hop.sampled);
        let mut out = h.clone();
        p.inject(&hop, &mut out);
        assert_eq!(out["b3"].to_str().unwrap(), format!("80f198ee56343ba864fe8b2a57d3eff7-{}-0", hop.client));
    }

    #[test]
    fn w3c_wins_over_b3_and_a_bad_traceparent_falls_back() {
        let p = Propagators::default();
        let both = headers(&[
            ("traceparent", PARENT),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ]);
        assert_eq!(p.begin(&both, || true).trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let bad = headers(&[
            ("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ]);
        assert_eq!(p.begin(&bad, || true).trace_id.to_string(), "80f198ee56343ba864fe8b2a57d3eff7");
    }

    #[test]
    fn a_new_trace_takes_the_local_decision_or_a_bare_b3_flag() {
        let p = Propagators::default();
        let hop = p.begin(&HeaderMap::new(), || true);
        assert!(hop.sampled && hop.parent.is_none() && hop.trace_id != TraceId::INVALID);
        assert!(!p.begin(&HeaderMap::new(), || false).sampled);
        assert!(!p.begin(&headers(&[("b3", "0")]), || true).sampled);
        // B3 with ids but no decision (deferred): the hop decides.
        let deferred =
            headers(&[("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"), ("x-b3-spanid", "e457b5a2e4d86bd1")]);
        assert!(p.begin(&deferred, || true).sampled);
        assert!(!p.begin(&deferred, || false).sampled);
    }

    #[test]
    fn a_b3_debug_trace_is_sampled_and_keeps_its_flag() {
        let p = Propagators::default();
        let h = headers(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "0"),
            ("x-b3-flags", "1"),
        ]);
        let hop = p.begin(&h, || false);
        assert!(hop.sampled, "debug forces the trace");
        let mut out = h.clone();
        p.inject(&hop, &mut out);
        assert_eq!(out["x-b3-flags"], "1");
        assert_eq!(out["x-b3-sampled"], "1");
        // Any other flags value is not passed on.
        let mut plain = headers(&[("x-b3-flags", "0")]);
        let hop = p.begin(&plain, || false);
        p.inject(&hop, &mut plain);
        assert!(!plain.contains_key("x-b3-flags"));
    }

    #[test]
    fn a_request_id_is_kept_or_made() {
        let mut h = headers(&[("x-request-id", "abc")]);
        assert_eq!(request_id(&mut h), "abc");
        let mut h = HeaderMap::new();
        let made = request_id(&mut h);
        assert_eq!(made.len(), 36);
        assert_eq!(h["x-request-id"], made);
    }
}
