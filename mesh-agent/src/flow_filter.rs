//! Server-side selection of flow records for `GET /flows` (and so for
//! `heddle flows`): every filter the CLI offers is applied by the agent, so a
//! busy node sends only what was asked for.
//!
//! Query parameters: `namespace`, `pod` (`name` or `ns/name`),
//! `from_identity`, `to_identity` (substring of the SPIFFE ID, so
//! `ns/demo/sa/web` works), `from_ip`, `to_ip`, `port`, `verdict`
//! (`forwarded|denied|audited|error`), `policy` (`ns/name`), `since`
//! (RFC 3339, compared with the record time), `after` (record id, for
//! following), `last` (the newest N matches, applied after filtering).
//! L7 (waypoint `request` records): `http_status` (a code like `503`, or a
//! class like `5xx`), `path` (prefix of the request path), `method`,
//! `response_flag` (one of the record's Envoy-style flags: `UT`, `URX`, ...).
//! Streaming: `follow=true` keeps the response open and sends new matching
//! records as JSON Lines after the stored ones (see `admin`), `queue` sets
//! that subscriber's queue length (default
//! [`crate::flows::subscribers::DEFAULT_QUEUE`]).

use std::{collections::BTreeMap, net::IpAddr};

use crate::flows::{FlowRecord, Verdict};

/// Records returned when `last` is not given.
pub const DEFAULT_LAST: usize = 1000;

/// A bad query parameter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad flow filter {name}={value:?}: {expected}")]
pub struct FilterError {
    name: String,
    value: String,
    expected: &'static str,
}

/// Which records to return.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// Namespace of the enrolled pod the record is about.
    pub namespace: Option<String>,
    /// Pod name, or `ns/name`.
    pub pod: Option<String>,
    /// Substring of the source identity.
    pub from_identity: Option<String>,
    /// Substring of the destination identity.
    pub to_identity: Option<String>,
    /// Source IP.
    pub from_ip: Option<IpAddr>,
    /// Destination IP (original or resolved).
    pub to_ip: Option<IpAddr>,
    /// Destination port (original or resolved).
    pub port: Option<u16>,
    /// Verdict.
    pub verdict: Option<Verdict>,
    /// Deciding, auditing or closing policy (`ns/name`).
    pub policy: Option<String>,
    /// Records at or after this RFC 3339 time.
    pub since: Option<String>,
    /// Records with a larger id.
    pub after: Option<u64>,
    /// The newest N matches.
    pub last: usize,
    /// Keep streaming new matches.
    pub follow: bool,
    /// Queue length of a streaming subscriber.
    pub queue: Option<usize>,
    /// HTTP status: exact code, or the class digit of `Nxx`.
    pub http_status: Option<StatusFilter>,
    /// Prefix of the request path.
    pub path: Option<String>,
    /// Request method (case-insensitive).
    pub method: Option<String>,
    /// One of the record's Envoy-style response flags (`UT`, `URX`, ...).
    pub response_flag: Option<String>,
}

/// An HTTP status filter: `503` or `5xx`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusFilter {
    /// This status.
    Code(u16),
    /// Any status of this class (the hundreds digit).
    Class(u16),
}

impl StatusFilter {
    fn parse(v: &str) -> Option<Self> {
        if let Some(d) = v.strip_suffix("xx").or_else(|| v.strip_suffix("XX")) {
            let d: u16 = d.parse().ok()?;
            return (1..=5).contains(&d).then_some(Self::Class(d));
        }
        let c: u16 = v.parse().ok()?;
        (100..=599).contains(&c).then_some(Self::Code(c))
    }

    fn matches(self, status: u16) -> bool {
        match self {
            Self::Code(c) => status == c,
            Self::Class(d) => status / 100 == d,
        }
    }
}

fn parse<T: std::str::FromStr>(name: &str, value: &str, expected: &'static str) -> Result<T, FilterError> {
    value.parse().map_err(|_| FilterError { name: name.to_owned(), value: value.to_owned(), expected })
}

impl FlowFilter {
    /// Builds a filter from query parameters; unknown parameters are errors.
    pub fn from_query(query: &BTreeMap<String, String>) -> Result<Self, FilterError> {
        let mut f = FlowFilter { last: DEFAULT_LAST, ..FlowFilter::default() };
        for (k, v) in query {
            let s = Some(v.clone());
            match k.as_str() {
                "namespace" => f.namespace = s,
                "pod" => f.pod = s,
                "from_identity" => f.from_identity = s,
                "to_identity" => f.to_identity = s,
                "policy" => f.policy = s,
                "since" => f.since = s,
                "from_ip" => f.from_ip = Some(parse(k, v, "an IP address")?),
                "to_ip" => f.to_ip = Some(parse(k, v, "an IP address")?),
                "port" => f.port = Some(parse(k, v, "a port 1-65535")?),
                "after" => f.after = Some(parse(k, v, "a flow record id")?),
                "last" => f.last = parse(k, v, "a count")?,
                "follow" => f.follow = parse(k, v, "true or false")?,
                "path" => f.path = s,
                "method" => f.method = Some(v.to_ascii_uppercase()),
                "response_flag" => f.response_flag = Some(v.to_ascii_uppercase()),
                "http_status" => {
                    f.http_status = Some(StatusFilter::parse(v).ok_or_else(|| FilterError {
                        name: k.clone(),
                        value: v.clone(),
                        expected: "an HTTP status (100-599) or a class (1xx-5xx)",
                    })?);
                }
                "queue" => {
                    let n: usize = parse(k, v, "a queue length 1-65536")?;
                    if !(1..=crate::flows::subscribers::MAX_QUEUE).contains(&n) {
                        return Err(FilterError {
                            name: k.clone(),
                            value: v.clone(),
                            expected: "a queue length 1-65536",
                        });
                    }
                    f.queue = Some(n);
                }
                "verdict" => {
                    f.verdict = Some(match v.as_str() {
                        "forwarded" => Verdict::Forwarded,
                        "denied" => Verdict::Denied,
                        "audited" => Verdict::Audited,
                        "error" => Verdict::Error,
                        _ => {
                            return Err(FilterError {
                                name: k.clone(),
                                value: v.clone(),
                                expected: "forwarded|denied|audited|error",
                            })
                        }
                    });
                }
                _ => {
                    return Err(FilterError {
                        name: k.clone(),
                        value: v.clone(),
                        expected: "a known filter (namespace, pod, from_identity, to_identity, from_ip, to_ip, port, verdict, policy, since, after, last, follow, queue, http_status, path, method, response_flag)",
                    })
                }
            }
        }
        Ok(f)
    }

    /// Whether `r` passes every filter given.
    #[must_use]
    pub fn matches(&self, r: &FlowRecord) -> bool {
        let (ns, name) = r.workload.split_once('/').unwrap_or(("", &r.workload));
        let contains = |have: &Option<crate::flows::Name>, want: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref().is_some_and(|h| h.contains(w.as_str())))
        };
        let dst_ips = [r.orig_dst, r.dst];
        self.namespace.as_ref().is_none_or(|n| n == ns)
            && self.pod.as_ref().is_none_or(|p| p == name || **p == *r.workload)
            && contains(&r.src_identity, &self.from_identity)
            && contains(&r.dst_identity, &self.to_identity)
            && self.from_ip.is_none_or(|ip| r.src.is_some_and(|s| s.ip() == ip))
            && self.to_ip.is_none_or(|ip| dst_ips.iter().flatten().any(|d| d.ip() == ip))
            && self.port.is_none_or(|p| dst_ips.iter().flatten().any(|d| d.port() == p))
            && self.verdict.is_none_or(|v| r.verdict == v)
            && self.policy.as_ref().is_none_or(|p| {
                [&r.policy, &r.audit_policy, &r.closed_by_policy].iter().any(|x| x.as_deref() == Some(p.as_str()))
            })
            && self.since.as_ref().is_none_or(|t| r.time.to_string().as_str() >= t.as_str())
            && self.after.is_none_or(|id| r.id > id)
            && self.matches_http(r)
    }

    fn matches_http(&self, r: &FlowRecord) -> bool {
        if self.http_status.is_none() && self.path.is_none() && self.method.is_none() && self.response_flag.is_none() {
            return true;
        }
        let Some(h) = &r.http else { return false };
        self.http_status.is_none_or(|s| s.matches(h.status))
            && self.path.as_ref().is_none_or(|p| h.path.starts_with(p.as_str()))
            && self.method.as_ref().is_none_or(|m| m == h.method.as_str())
            && self.response_flag.as_ref().is_none_or(|f| h.response_flags.split(',').any(|x| x == f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::{ConnInfo, Direction, FlowLog, Security};
    use crate::registry::ObjectRef;

    fn log() -> FlowLog {
        let log = FlowLog::new(100);
        let mut a = ConnInfo::new(Direction::Inbound, ObjectRef { namespace: "demo".into(), name: "api".into() });
        a.src = Some("10.44.1.2:40000".parse().unwrap());
        a.orig_dst = Some("10.44.2.2:8080".parse().unwrap());
        a.security = Security::MutualTls;
        a.src_identity = Some("spiffe://cluster.local/ns/demo/sa/web".into());
        log.opened(1, &a);
        let mut b = ConnInfo::new(Direction::Outbound, ObjectRef { namespace: "shop".into(), name: "cart".into() });
        b.orig_dst = Some("10.44.2.3:5432".parse().unwrap());
        log.failed(2, &b, "refused".into());
        log
    }

    fn q(pairs: &[(&str, &str)]) -> FlowFilter {
        let map = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        FlowFilter::from_query(&map).unwrap()
    }

    fn ids(log: &FlowLog, f: &FlowFilter) -> Vec<String> {
        log.select(f).iter().map(|r| r.workload.to_string()).collect()
    }

    #[test]
    fn filters_by_namespace_pod_identity_ip_port_and_verdict() {
        let log = log();
        assert_eq!(ids(&log, &q(&[("namespace", "demo")])), ["demo/api"]);
        assert_eq!(ids(&log, &q(&[("pod", "cart")])), ["shop/cart"]);
        assert_eq!(ids(&log, &q(&[("pod", "shop/cart")])), ["shop/cart"]);
        assert_eq!(ids(&log, &q(&[("from_identity", "ns/demo/sa/web")])), ["demo/api"]);
        assert_eq!(ids(&log, &q(&[("from_ip", "10.44.1.2")])), ["demo/api"]);
        assert_eq!(ids(&log, &q(&[("to_ip", "10.44.2.3")])), ["shop/cart"]);
        assert_eq!(ids(&log, &q(&[("port", "8080")])), ["demo/api"]);
        assert_eq!(ids(&log, &q(&[("verdict", "error")])), ["shop/cart"]);
        assert_eq!(ids(&log, &q(&[("verdict", "forwarded"), ("pod", "cart")])), Vec::<String>::new());
    }

    #[test]
    fn follows_with_after_and_keeps_the_newest_matches() {
        let log = log();
        assert_eq!(ids(&log, &q(&[("after", "1")])), ["shop/cart"]);
        assert_eq!(ids(&log, &q(&[("last", "1")])), ["shop/cart"]);
        assert_eq!(ids(&log, &q(&[("since", "2000-01-01T00:00:00Z")])).len(), 2);
        assert!(ids(&log, &q(&[("since", "2999-01-01T00:00:00Z")])).is_empty());
    }

    #[test]
    fn rejects_unknown_filters_and_bad_values_naming_them() {
        let bad = |k: &str, v: &str| {
            let map = [(k.to_owned(), v.to_owned())].into_iter().collect();
            FlowFilter::from_query(&map).unwrap_err().to_string()
        };
        assert!(bad("port", "http").contains("port=\"http\""));
        assert!(bad("verdict", "maybe").contains("forwarded|denied|audited|error"));
        assert!(bad("colour", "red").contains("colour"));
        assert!(bad("queue", "0").contains("queue length"));
        assert!(bad("follow", "yes").contains("true or false"));
    }

    #[test]
    fn follow_and_queue_are_stream_options() {
        let f = q(&[("follow", "true"), ("queue", "16"), ("namespace", "demo")]);
        assert!(f.follow && f.queue == Some(16));
        assert!(!q(&[]).follow);
    }

    #[test]
    fn filters_waypoint_requests_by_status_path_and_method() {
        let log = log();
        for (status, path, method, flags) in
            [(200, "/api/v1/x", "GET", "-"), (503, "/api/v2", "POST", "URX"), (404, "/other", "GET", "NR")]
        {
            let mut r =
                ConnInfo::new(Direction::Inbound, ObjectRef { namespace: "demo".into(), name: "waypoint".into() });
            r.http = Some(Box::new(crate::flows::HttpInfo {
                status,
                path: path.into(),
                method: method.parse().unwrap(),
                response_flags: flags,
                ..Default::default()
            }));
            log.request(9, &r, (0, 0), std::time::Duration::from_millis(1));
        }
        let paths = |f: &FlowFilter| -> Vec<String> {
            log.select(f).iter().filter_map(|r| r.http.as_ref().map(|h| h.path.clone())).collect()
        };
        assert_eq!(paths(&q(&[("http_status", "5xx")])), ["/api/v2"]);
        assert_eq!(paths(&q(&[("http_status", "404")])), ["/other"]);
        assert_eq!(paths(&q(&[("path", "/api")])), ["/api/v1/x", "/api/v2"]);
        assert_eq!(paths(&q(&[("method", "get"), ("path", "/api")])), ["/api/v1/x"]);
        assert_eq!(paths(&q(&[("response_flag", "urx")])), ["/api/v2"]);
        assert!(paths(&q(&[("response_flag", "UT")])).is_empty());
        // L4 records never match an L7 filter.
        assert_eq!(log.select(&q(&[("method", "GET")])).len(), 2);
        let map = [("http_status".to_owned(), "6xx".to_owned())].into_iter().collect();
        assert!(FlowFilter::from_query(&map).unwrap_err().to_string().contains("HTTP status"));
    }
}
