//! Distributed tracing: trace context in request headers ([`context`]),
//! span records and their bounded, batched OTLP export ([`export`]) over
//! gRPC or HTTP/protobuf ([`otlp`]).
//!
//! The waypoint makes a server and a client span per sampled request
//! ([`crate::waypoint::spans`]); the node agents can make one span per
//! connection (`--trace-l4`, off by default). Nothing here blocks a
//! request: spans go into a bounded queue, and a full queue drops the span
//! and counts it (`heddle_trace_spans_dropped_total`).
//!
//! The settings are process flags (and their `HEDDLE_*` variables), on the
//! node agent, the waypoint and the waypoint controller, which passes its
//! own to the waypoints it deploys.

pub mod context;
pub mod export;
pub mod otlp;

pub use export::{Kind, SpanRecord, Tracer, Value};

/// Where spans go and how many requests are traced.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TraceArgs {
    /// OTLP collector to export spans to, `http://HOST:PORT[/PATH]` (no
    /// export without it). gRPC's default port is 4317, HTTP's 4318 with
    /// path `/v1/traces`.
    #[arg(long, env = "HEDDLE_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport.
    #[arg(long, env = "HEDDLE_OTLP_PROTOCOL", value_enum, default_value_t = otlp::Protocol::Grpc)]
    pub otlp_protocol: otlp::Protocol,
    /// Percentage of new traces sampled (0 to 100; Istio's default is 1).
    /// A request that carries a sampling decision keeps it.
    #[arg(long, env = "HEDDLE_TRACE_SAMPLING", default_value_t = 1.0, value_name = "PERCENT")]
    pub trace_sampling: f64,
    /// Resource attributes of every span, `key=value` (`service.name` has
    /// a default per process).
    #[arg(long = "trace-resource", env = "HEDDLE_TRACE_RESOURCE", value_delimiter = ',', value_name = "KEY=VALUE")]
    pub trace_resource: Vec<String>,
}

/// What is wrong with the trace settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// `--trace-sampling` outside 0..=100.
    #[error("--trace-sampling {0}: must be a percentage from 0 to 100")]
    Sampling(f64),
    /// A `--trace-resource` without `=`.
    #[error("--trace-resource {0:?}: expected key=value")]
    Resource(String),
    /// A bad `--otlp-endpoint`.
    #[error("--otlp-endpoint: {0}")]
    Endpoint(#[from] otlp::EndpointError),
}

/// Checked trace settings (shown by the admin API's effective config).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Settings {
    /// Where spans go.
    pub endpoint: otlp::Endpoint,
    /// Share of new traces sampled, per million.
    pub sampling_per_million: u32,
    /// Resource attributes (`service.name` first if given).
    pub resource: Vec<(String, String)>,
}

impl TraceArgs {
    /// The checked settings, or `None` when no endpoint is set.
    ///
    /// # Errors
    /// A sampling percentage outside 0..=100, a resource attribute without
    /// `=`, or an endpoint that is not `http://HOST:PORT[/PATH]`.
    pub fn settings(&self) -> Result<Option<Settings>, SettingsError> {
        if !(0.0..=100.0).contains(&self.trace_sampling) {
            return Err(SettingsError::Sampling(self.trace_sampling));
        }
        let resource = self
            .trace_resource
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .ok_or_else(|| SettingsError::Resource(kv.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Some(url) = &self.otlp_endpoint else { return Ok(None) };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "0..=100 checked above")]
        let sampling_per_million = (self.trace_sampling * 10_000.0).round() as u32;
        Ok(Some(Settings { endpoint: otlp::Endpoint::parse(url, self.otlp_protocol)?, sampling_per_million, resource }))
    }

    /// The same settings as `HEDDLE_*` variables, for a process this one
    /// deploys (the waypoint controller's waypoints).
    #[must_use]
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let Some(endpoint) = &self.otlp_endpoint else { return Vec::new() };
        let mut env = vec![
            ("HEDDLE_OTLP_ENDPOINT", endpoint.clone()),
            ("HEDDLE_OTLP_PROTOCOL", self.otlp_protocol.as_str().to_owned()),
            ("HEDDLE_TRACE_SAMPLING", self.trace_sampling.to_string()),
        ];
        if !self.trace_resource.is_empty() {
            env.push(("HEDDLE_TRACE_RESOURCE", self.trace_resource.join(",")));
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(endpoint: Option<&str>, sampling: f64, resource: &[&str]) -> TraceArgs {
        TraceArgs {
            otlp_endpoint: endpoint.map(str::to_owned),
            otlp_protocol: otlp::Protocol::Grpc,
            trace_sampling: sampling,
            trace_resource: resource.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn no_endpoint_means_no_export() {
        assert!(args(None, 1.0, &[]).settings().unwrap().is_none());
    }

    #[test]
    fn sampling_is_kept_per_million() {
        let s = args(Some("http://collector:4317"), 12.5, &["env=prod"]).settings().unwrap().unwrap();
        assert_eq!(s.sampling_per_million, 125_000);
        assert_eq!(s.resource, vec![("env".to_owned(), "prod".to_owned())]);
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let e = args(Some("http://c:4317"), 101.0, &[]).settings().unwrap_err();
        assert!(e.to_string().contains("--trace-sampling 101"), "{e}");
        let e = args(Some("http://c:4317"), 1.0, &["novalue"]).settings().unwrap_err();
        assert!(e.to_string().contains("--trace-resource \"novalue\""), "{e}");
        let e = args(Some("https://c:4317"), 1.0, &[]).settings().unwrap_err();
        assert!(e.to_string().starts_with("--otlp-endpoint"), "{e}");
    }

    #[test]
    fn the_controller_passes_the_same_settings_on() {
        let env = args(Some("http://c:4317"), 5.0, &["a=b", "c=d"]).to_env();
        assert!(env.contains(&("HEDDLE_OTLP_ENDPOINT", "http://c:4317".to_owned())));
        assert!(env.contains(&("HEDDLE_TRACE_SAMPLING", "5".to_owned())));
        assert!(env.contains(&("HEDDLE_TRACE_RESOURCE", "a=b,c=d".to_owned())));
        assert!(args(None, 5.0, &[]).to_env().is_empty());
    }
}
