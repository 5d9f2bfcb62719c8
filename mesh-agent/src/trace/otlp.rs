//! OTLP transport: one `ExportTraceServiceRequest` (protobuf, the
//! `opentelemetry-proto` messages) sent to the collector over gRPC
//! (HTTP/2 without TLS, `TraceService/Export`) or HTTP/protobuf
//! (`POST /v1/traces`, HTTP/1.1), on one kept connection that is made
//! again after a failure. Run by the exporter task only.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::{client::conn, header, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// gRPC method of the OTLP trace service.
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// OTLP/HTTP's trace path.
const HTTP_PATH: &str = "/v1/traces";
/// Time for a connection and for one export.
const TIMEOUT: Duration = Duration::from_secs(10);

/// OTLP transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Protocol {
    /// OTLP/gRPC (port 4317).
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318).
    #[value(name = "http/protobuf")]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl Protocol {
    /// The flag's value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// What is wrong with an endpoint URL.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Not `http://`.
    #[error("{0:?}: only http:// endpoints are supported (a collector on the node or in the cluster)")]
    Scheme(String),
    /// No host.
    #[error("{0:?}: no host")]
    Host(String),
    /// Not a URL.
    #[error("{0:?}: {1}")]
    Url(String, String),
}

/// A collector's address.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    /// `host:port` to connect to.
    pub addr: String,
    /// Request path.
    pub path: String,
    /// Transport.
    pub protocol: Protocol,
}

impl Endpoint {
    /// Parses `http://HOST[:PORT][/PATH]`: the port defaults to 4317 (gRPC)
    /// or 4318 (HTTP), an HTTP path to `/v1/traces`.
    ///
    /// # Errors
    /// Not a URL, not `http://`, or no host.
    pub fn parse(url: &str, protocol: Protocol) -> Result<Self, EndpointError> {
        let uri: hyper::Uri =
            url.parse().map_err(|e: hyper::http::uri::InvalidUri| EndpointError::Url(url.to_owned(), e.to_string()))?;
        if uri.scheme_str() != Some("http") {
            return Err(EndpointError::Scheme(url.to_owned()));
        }
        let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| EndpointError::Host(url.to_owned()))?;
        let default_port = match protocol {
            Protocol::Grpc => 4317,
            Protocol::HttpProtobuf => 4318,
        };
        let path = match (protocol, uri.path()) {
            (Protocol::Grpc, _) => GRPC_PATH.to_owned(),
            (Protocol::HttpProtobuf, "" | "/") => HTTP_PATH.to_owned(),
            (Protocol::HttpProtobuf, p) => p.to_owned(),
        };
        Ok(Self { addr: format!("{host}:{}", uri.port_u16().unwrap_or(default_port)), path, protocol })
    }
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// No connection.
    #[error("connecting to the collector {0}: {1}")]
    Connect(String, String),
    /// The request failed.
    #[error("sending to the collector: {0}")]
    Send(#[from] hyper::Error),
    /// No answer in time.
    #[error("the collector did not answer within {} s", TIMEOUT.as_secs())]
    Timeout,
    /// A refusal.
    #[error("the collector answered {0}")]
    Refused(String),
}

enum Conn {
    H1(conn::http1::SendRequest<Full<Bytes>>),
    H2(conn::http2::SendRequest<Full<Bytes>>),
}

/// The exporter's connection to the collector.
pub struct Client {
    endpoint: Endpoint,
    conn: Option<Conn>,
}

impl Client {
    /// A client for `endpoint` (connects at the first export).
    #[must_use]
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint, conn: None }
    }

    /// Sends one encoded `ExportTraceServiceRequest`.
    ///
    /// # Errors
    /// No connection, a failed request, no answer within 10 s, or a
    /// refusal (an HTTP status other than 200, a gRPC status other than 0).
    pub async fn export(&mut self, message: Bytes) -> Result<(), ExportError> {
        let result = tokio::time::timeout(TIMEOUT, self.try_export(message)).await.unwrap_or(Err(ExportError::Timeout));
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    async fn try_export(&mut self, message: Bytes) -> Result<(), ExportError> {
        if self.conn.as_ref().is_none_or(|c| match c {
            Conn::H1(s) => s.is_closed(),
            Conn::H2(s) => s.is_closed(),
        }) {
            self.conn = Some(self.connect().await?);
        }
        let req = Request::post(&self.endpoint.path).header(header::HOST, &self.endpoint.addr);
        let resp = match self.conn.as_mut().expect("connected above") {
            Conn::H1(s) => {
                s.ready().await?;
                let req = req
                    .header(header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Full::new(message))
                    .expect("valid request parts");
                s.send_request(req).await?
            }
            Conn::H2(s) => {
                // gRPC's length-prefixed message: no compression, 4-byte length.
                let mut framed = BytesMut::with_capacity(message.len() + 5);
                framed.put_u8(0);
                framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
                framed.put(message);
                let uri = format!("http://{}{}", self.endpoint.addr, self.endpoint.path);
                let req = Request::post(uri)
                    .header(header::CONTENT_TYPE, "application/grpc")
                    .header(header::TE, "trailers")
                    .body(Full::new(framed.freeze()))
                    .expect("valid request parts");
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let status = resp.status();
        let head_grpc = grpc_status(resp.headers());
        let body = resp.into_body().collect().await?;
        if status != StatusCode::OK {
            return Err(ExportError::Refused(format!("HTTP {status}")));
        }
        if self.endpoint.protocol == Protocol::Grpc {
            let code = head_grpc.or_else(|| body.trailers().and_then(grpc_status));
            if code != Some(0) {
                return Err(ExportError::Refused(
                    code.map_or_else(|| "no grpc-status".into(), |c| format!("grpc-status {c}")),
                ));
            }
        }
        Ok(())
    }

    async fn connect(&self) -> Result<Conn, ExportError> {
        let addr = &self.endpoint.addr;
        let fail = |e: &dyn std::fmt::Display| ExportError::Connect(addr.clone(), e.to_string());
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| fail(&e))?;
        let _ = tcp.set_nodelay(true);
        let io = TokioIo::new(tcp);
        Ok(match self.endpoint.protocol {
            Protocol::HttpProtobuf => {
                let (send, conn) = conn::http1::handshake(io).await.map_err(|e| fail(&e))?;
                tokio::spawn(conn);
                Conn::H1(send)
            }
            Protocol::Grpc => {
                let (send, conn) = conn::http2::handshake(TokioExecutor::new(), io).await.map_err(|e| fail(&e))?;
                tokio::spawn(conn);
                Conn::H2(send)
            }
        })
    }
}

fn grpc_status(h: &header::HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_protocol_defaults() {
        let g = Endpoint::parse("http://collector.observability", Protocol::Grpc).unwrap();
        assert_eq!(g.addr, "collector.observability:4317");
        assert_eq!(g.path, GRPC_PATH);
        let h = Endpoint::parse("http://127.0.0.1", Protocol::HttpProtobuf).unwrap();
        assert_eq!((h.addr.as_str(), h.path.as_str()), ("127.0.0.1:4318", "/v1/traces"));
        let custom = Endpoint::parse("http://c:9999/otlp/traces", Protocol::HttpProtobuf).unwrap();
        assert_eq!((custom.addr.as_str(), custom.path.as_str()), ("c:9999", "/otlp/traces"));
    }

    #[test]
    fn bad_endpoints_say_why() {
        assert!(matches!(Endpoint::parse("https://c:4317", Protocol::Grpc), Err(EndpointError::Scheme(_))));
        assert!(matches!(Endpoint::parse("c:4317", Protocol::Grpc), Err(EndpointError::Scheme(_))));
        assert!(matches!(
            Endpoint::parse("http://", Protocol::Grpc),
            Err(EndpointError::Url(..) | EndpointError::Host(_))
        ));
    }
}
