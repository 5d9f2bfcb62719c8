//! L4 spans (`mesh-agent run --trace-l4`, off by default): one span per
//! connection when it closes, a client span on the source node and a
//! server span on the destination node, so an L4-only mesh can still be
//! traced. The source agent sends its span as `traceparent` in the HBONE
//! `CONNECT`, so the destination side's span is its child: one trace per
//! tunnelled connection. A plaintext connection's sides are separate traces.

use std::time::{Duration, SystemTime};

use super::{ConnInfo, Direction, Security};
use crate::trace::{Kind, SpanRecord, Value};

/// The span of a closed connection.
#[must_use]
pub fn connection(
    info: &ConnInfo,
    trace: &crate::trace::context::ConnTrace,
    bytes: (u64, u64),
    duration: Duration,
    error: Option<&str>,
) -> SpanRecord {
    let end = SystemTime::now();
    let kind = match info.direction {
        Direction::Outbound => Kind::Client,
        Direction::Inbound => Kind::Server,
    };
    let target = info
        .service
        .as_ref()
        .map(ToString::to_string)
        .or_else(|| info.orig_dst.map(|d| d.to_string()))
        .unwrap_or_else(|| "-".to_owned());
    let mut attributes = vec![
        ("network.transport", Value::Str("tcp".into())),
        ("heddle.workload", Value::Str(info.workload_name.to_string())),
        ("heddle.mtls", Value::Bool(info.security == Security::MutualTls)),
        ("heddle.bytes.to_server", Value::Int(i64::try_from(bytes.0).unwrap_or(i64::MAX))),
        ("heddle.bytes.to_client", Value::Int(i64::try_from(bytes.1).unwrap_or(i64::MAX))),
        ("heddle.policy.denied", Value::Bool(info.policy.denied)),
    ];
    let mut push = |key: &'static str, v: Option<String>| {
        if let Some(v) = v {
            attributes.push((key, Value::Str(v)));
        }
    };
    push("client.address", info.src.map(|a| a.ip().to_string()));
    push("server.address", info.orig_dst.map(|a| a.ip().to_string()));
    push("heddle.destination.service", info.service.as_ref().map(ToString::to_string));
    push("heddle.source.principal", info.src_identity.as_ref().map(ToString::to_string));
    push("heddle.destination.principal", info.dst_identity.as_ref().map(ToString::to_string));
    push("heddle.policy", info.policy.policy.as_ref().map(ToString::to_string));
    if let Some(port) = info.orig_dst.map(|a| a.port()) {
        attributes.push(("server.port", Value::Int(i64::from(port))));
    }
    SpanRecord {
        trace_id: trace.trace_id,
        span_id: trace.span_id,
        parent: trace.parent,
        trace_state: String::new(),
        name: format!("tcp {target}"),
        kind,
        start: end.checked_sub(duration).unwrap_or(end),
        end,
        attributes,
        error: error.map(str::to_owned).or_else(|| info.policy.denied.then(|| "denied by policy".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ObjectRef;

    #[test]
    fn a_connection_span_says_who_talked_to_whom() {
        let mut info = ConnInfo::new(Direction::Inbound, ObjectRef { namespace: "demo".into(), name: "api".into() });
        info.src = Some("10.0.0.1:40000".parse().unwrap());
        info.orig_dst = Some("10.0.0.2:8080".parse().unwrap());
        info.security = Security::MutualTls;
        info.src_identity = Some("spiffe://td/ns/demo/sa/client".into());
        let trace = crate::trace::context::ConnTrace::root();
        let s = connection(&info, &trace, (10, 20), Duration::from_millis(5), None);
        assert_eq!((s.trace_id, s.span_id, s.parent), (trace.trace_id, trace.span_id, None));
        assert_eq!(s.kind, Kind::Server);
        assert_eq!(s.name, "tcp 10.0.0.2:8080");
        assert!(s.attributes.contains(&("heddle.mtls", Value::Bool(true))));
        assert!(s.attributes.contains(&("heddle.bytes.to_client", Value::Int(20))));
        assert!(s
            .attributes
            .contains(&("heddle.source.principal", Value::Str("spiffe://td/ns/demo/sa/client".into()))));
        assert_eq!(s.end.duration_since(s.start).unwrap(), Duration::from_millis(5));
        assert!(s.error.is_none());
    }
}
