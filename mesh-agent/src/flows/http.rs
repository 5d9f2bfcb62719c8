//! The L7 facts of one request a waypoint handled, as its flow record
//! carries them (`http` in `GET /flows`, the `request` event).

use serde::Serialize;

/// One HTTP request, as a waypoint saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HttpInfo {
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: String,
    /// Request method.
    pub method: String,
    /// `:authority` or `Host`.
    pub authority: String,
    /// Path and query as the client sent them.
    pub path: String,
    /// Response status sent to the client (0 when none was sent).
    pub status: u16,
    /// `grpc-status` of a gRPC response (trailers or trailers-only).
    pub grpc_status: Option<u32>,
    /// The route that matched, `kind/ns/name`.
    pub route: Option<String>,
    /// The index of its rule that matched.
    pub rule: Option<usize>,
    /// The backend service chosen, `ns/name`.
    pub backend: Option<String>,
    /// The endpoint the request went to, `ip:port`.
    pub upstream: Option<String>,
    /// Envoy-style response flags (`-`, `NR` no route, `UH` no healthy
    /// upstream, `UF` upstream connect failure, `UT` upstream timeout, `DC`
    /// downstream reset, `UR` upstream reset).
    pub response_flags: String,
    /// What went wrong, if anything.
    pub error: Option<String>,
}
