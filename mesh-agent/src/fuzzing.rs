//! Fuzz targets (issue 14): one entry point per parser that takes bytes
//! from outside, each fed raw bytes and required to answer with a value or
//! an error, never a panic or a hang. The libFuzzer harnesses in
//! `mesh-agent/fuzz/` (cargo-fuzz, `cargo xtask fuzz`) call these; the
//! corpus they grew is kept in `mesh-agent/fuzz/corpus/<target>/`, and
//! every input that ever crashed a target in `mesh-agent/fuzz/regressions/`;
//! [`tests`] replays both on stable in every test run.
//!
//! Built with the `fuzzing` feature (and for the tests): the agent itself
//! carries none of it. The targets that need a server ([`wire`]) drive the
//! agent's own hyper/h2/rustls set-up over an in-memory pipe; the fixed
//! state they run against (a CA, a registry, routes, policies) is made once
//! per process ([`fixtures`]).

mod fixtures;
mod wire;

use std::path::Path;

pub use wire::{ca_http, tunnel_connect, tunnel_tls, waypoint_http};

/// A fuzz target: bytes in, a panic for a bug.
pub type Target = fn(&[u8]);

/// Every target, by the name its harness and corpus directory have.
pub const TARGETS: &[(&str, Target)] = &[
    ("config", config),
    ("policy", policy),
    ("routes", routes),
    ("k8s_objects", k8s_objects),
    ("admin_query", admin_query),
    ("trace_headers", trace_headers),
    ("path", path),
    ("tunnel_connect", tunnel_connect),
    ("tunnel_tls", tunnel_tls),
    ("ca_http", ca_http),
    ("waypoint_http", waypoint_http),
];

fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// The local configuration file.
pub fn config(data: &[u8]) {
    let _ = crate::config::parse(Path::new("fuzz.yaml"), &text(data));
}

/// Authorization policy documents, loaded and compiled.
pub fn policy(data: &[u8]) {
    let mut loaded = crate::policy::load::Loaded::default();
    crate::policy::load::parse_documents(&text(data), Path::new("fuzz.yaml"), &mut loaded);
    let objects = loaded.objects.into_iter().map(|(_, o)| o);
    let _ = crate::policy::PolicySet::from_objects(objects, crate::policy::DEFAULT_ROOT_NAMESPACE);
}

/// Waypoint route documents (Gateway API, Istio, Heddle policies), compiled
/// against a fixed registry.
pub fn routes(data: &[u8]) {
    let sources = [crate::waypoint::routes::Source { file: "fuzz.yaml".into(), text: text(data).into_owned() }];
    let set = fixtures::route_set(&sources);
    let _ = (set.statuses(), set.rejected());
}

/// Kubernetes objects as the API server sends them (JSON, one object or a
/// `List`), through the conversions the agent applies to each kind.
pub fn k8s_objects(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let items = match value.get("items").and_then(serde_json::Value::as_array) {
        Some(items) => items.clone(),
        None => vec![value],
    };
    fixtures::convert_k8s(&items);
}

/// The admin API's query strings (`/flows?...`), to a flow filter.
pub fn admin_query(data: &[u8]) {
    let query = crate::admin::parse_query(Some(&text(data)));
    let _ = crate::flow_filter::FlowFilter::from_query(&query);
}

/// Trace context headers (W3C and B3), one `name: value` per line: a
/// request's context continued and written upstream, which must always
/// carry a `traceparent`.
pub fn trace_headers(data: &[u8]) {
    let mut headers = hyper::HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) =
            (hyper::header::HeaderName::from_bytes(name), hyper::header::HeaderValue::from_bytes(value))
        {
            headers.append(n, v);
        }
    }
    let p = crate::trace::context::Propagators::default();
    let _ = p.connection_child(&headers);
    let hop = p.begin(&headers, || false);
    p.inject(&hop, &mut headers);
    assert!(headers.contains_key("traceparent"), "no traceparent written for {headers:?}");
}

/// Istio's path normalisation, which policy and routing rely on: total,
/// and idempotent (a normalised path must normalise to itself).
pub fn path(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else { return };
    if let Ok(once) = crate::policy::l7::path::normalize(path) {
        assert!(once.starts_with('/'), "{path:?} normalised to {once:?}");
        let twice = crate::policy::l7::path::normalize(&once).expect("a normalised path normalises");
        assert_eq!(twice, once, "normalisation of {path:?} is not idempotent");
    }
}

#[cfg(test)]
mod tests {
    //! Replays the kept corpus and every regression input on stable.

    use std::path::PathBuf;

    fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir).join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect())
            .unwrap_or_default();
        files.sort();
        files
    }

    #[test]
    fn every_kept_input_of_every_target_is_answered_without_a_panic() {
        for (name, target) in super::TARGETS {
            let corpus = inputs("corpus", name);
            assert!(!corpus.is_empty(), "fuzz target {name} has no corpus in mesh-agent/fuzz/corpus/{name}");
            for file in corpus.iter().chain(&inputs("regressions", name)) {
                let data = std::fs::read(file).expect("a corpus file reads");
                let run = std::panic::catch_unwind(|| target(&data));
                assert!(run.is_ok(), "fuzz target {name} panicked on {}", file.display());
            }
        }
    }

    #[test]
    fn every_target_has_a_harness() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
        for (name, _) in super::TARGETS {
            let harness = dir.join(format!("{name}.rs"));
            let text = std::fs::read_to_string(&harness).unwrap_or_default();
            assert!(
                text.contains(&format!("mesh_agent::fuzzing::{name}(")),
                "{} does not call mesh_agent::fuzzing::{name}",
                harness.display()
            );
        }
    }
}
