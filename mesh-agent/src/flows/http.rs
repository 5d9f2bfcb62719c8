//! The L7 facts of one request a waypoint handled, as its flow record
//! carries them (`http` in `GET /flows`, the `request` event).

use serde::Serialize;

/// One HTTP request, as a waypoint saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HttpInfo {
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// Request method (no allocation for the standard ones).
    #[serde(serialize_with = "method_str")]
    pub method: hyper::Method,
    /// `:authority` or `Host`.
    pub authority: String,
    /// Path and query as the client sent them.
    pub path: String,
    /// Response status sent to the client (0 when none was sent).
    pub status: u16,
    /// `grpc-status` of a gRPC response (trailers or trailers-only).
    pub grpc_status: Option<u32>,
    /// The route that matched, `kind/ns/name`.
    pub route: Option<super::Name>,
    /// The index of its rule that matched.
    pub rule: Option<usize>,
    /// The backend service chosen, `ns/name`.
    pub backend: Option<super::Name>,
    /// The endpoint the request went to (`ip:port` in JSON).
    pub upstream: Option<std::net::SocketAddr>,
    /// Envoy-style response flags (`-`, `NR` no route, `UH` no healthy
    /// upstream, `UF` upstream connect failure, `UT` upstream timeout, `DC`
    /// downstream reset, `UR` upstream reset, `URX` retries exhausted or
    /// over the retry budget).
    pub response_flags: &'static str,
    /// Retries made (attempts after the first).
    pub retries: u8,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

fn method_str<S: serde::Serializer>(m: &hyper::Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}
