//! `heddle flows`: its flags, the query they become (filters are applied by
//! the agent, see `flow_filter`), and the output formats: a table that fits
//! 120 columns (identities shortened to `ns/sa`, bytes, durations and the
//! TCP round-trip time humanised, retransmits counted) and JSON / JSON Lines
//! that are stable for scripts (the agent's records as they are: TCP health
//! is `rtt_us` and `retransmits`).
//!
//! `--follow` reads the agent's push stream (`GET /flows?follow=true`,
//! JSON Lines, [`follow`]): the stored matches first, then each new record as
//! it is recorded. When the agent had to drop records because this client
//! read too slowly, the stream carries `{"lost": N}` and the CLI says so on
//! stderr ([`lost_notice`]).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use clap::Args;
use serde_json::Value;

/// Filters and options of `heddle flows`.
#[derive(Args, Debug, Default, Clone)]
pub struct FlowsArgs {
    /// Keep printing new flows as the agent records them (a live stream;
    /// a client too slow to keep up is told how many it lost).
    #[arg(short, long)]
    pub follow: bool,
    /// Show only the newest N matching flows.
    #[arg(long, default_value_t = 100)]
    pub last: usize,
    /// Only flows newer than this (e.g. 30s, 5m, 2h).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// Only flows of pods in this namespace.
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Only flows of this pod (`name` or `namespace/name`).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only flows whose source identity contains this (e.g. `ns/demo/sa/web`).
    #[arg(long)]
    pub from_identity: Option<String>,
    /// Only flows whose destination identity contains this.
    #[arg(long)]
    pub to_identity: Option<String>,
    /// Only flows from this IP.
    #[arg(long)]
    pub from_ip: Option<std::net::IpAddr>,
    /// Only flows to this IP.
    #[arg(long)]
    pub to_ip: Option<std::net::IpAddr>,
    /// Only flows to this port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only flows with this verdict: forwarded, denied, audited, error.
    #[arg(long, value_parser = ["forwarded", "denied", "audited", "error"])]
    pub verdict: Option<String>,
    /// Only flows decided, audited or closed by this policy (`namespace/name`).
    #[arg(long)]
    pub policy: Option<String>,
    /// Only waypoint requests with this HTTP status (`503`) or class (`5xx`).
    #[arg(long)]
    pub http_status: Option<String>,
    /// Only waypoint requests whose path starts with this.
    #[arg(long)]
    pub path: Option<String>,
    /// Only waypoint requests with this method.
    #[arg(long)]
    pub method: Option<String>,
    /// Only waypoint requests carrying this Envoy-style response flag
    /// (`UT` timeout, `URX` retries exhausted, `UH` no healthy upstream, ...).
    #[arg(long)]
    pub response_flag: Option<String>,
}

/// Parses `30s`, `5m`, `2h`, `1d` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 30s, 5m, 2h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(secs))
}

/// The `/flows` query for `args`; `after` continues from a record id.
#[must_use]
pub fn query(args: &FlowsArgs, now: SystemTime, after: Option<u64>) -> String {
    // While following, each page takes everything new, not the newest N.
    let last = if after.is_some() { crate::flow_filter::DEFAULT_LAST } else { args.last };
    let mut q = vec![format!("last={last}")];
    let mut add = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            q.push(format!("{k}={}", encode(&v)));
        }
    };
    add("namespace", args.namespace.clone());
    add("pod", args.pod.clone());
    add("from_identity", args.from_identity.clone());
    add("to_identity", args.to_identity.clone());
    add("from_ip", args.from_ip.map(|ip| ip.to_string()));
    add("to_ip", args.to_ip.map(|ip| ip.to_string()));
    add("port", args.port.map(|p| p.to_string()));
    add("verdict", args.verdict.clone());
    add("policy", args.policy.clone());
    add("http_status", args.http_status.clone());
    add("path", args.path.clone());
    add("method", args.method.clone());
    add("response_flag", args.response_flag.clone());
    add("since", args.since.map(|d| crate::flows::rfc3339(now - d)));
    add("after", after.map(|a| a.to_string()));
    format!("/flows?{}", q.join("&"))
}

/// The streaming query for `args`: the stored matches (newest `--last`),
/// then new ones.
#[must_use]
pub fn follow_query(args: &FlowsArgs, now: SystemTime) -> String {
    format!("{}&follow=true", query(args, now, None))
}

/// Why following the stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The agent could not be reached or refused the request.
    #[error(
        "cannot reach the Heddle agent at {agent} (is mesh-agent running on this node? use --agent URL): {source}"
    )]
    Connect {
        /// The agent's URL.
        agent: String,
        /// Cause.
        #[source]
        source: Box<ureq::Error>,
    },
    /// The stream broke.
    #[error("flow stream from {agent} broke: {source}")]
    Read {
        /// The agent's URL.
        agent: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// One line of the flow stream.
#[derive(Debug, PartialEq)]
pub enum StreamLine {
    /// A flow record.
    Record(Value),
    /// The agent dropped this many records for this client.
    Lost(u64),
}

/// Parses one line of the stream; `None` for a blank or unreadable line.
#[must_use]
pub fn parse_stream_line(line: &str) -> Option<StreamLine> {
    let v: Value = serde_json::from_str(line.trim()).ok()?;
    match v["lost"].as_u64() {
        Some(n) if v.as_object().is_some_and(|o| o.len() == 1) => Some(StreamLine::Lost(n)),
        _ => Some(StreamLine::Record(v)),
    }
}

/// What `heddle flows --follow` prints on stderr when records were lost.
#[must_use]
pub fn lost_notice(n: u64) -> String {
    format!("heddle: {n} flow records lost: this client read the stream too slowly (the agent drops records rather than slow connections)")
}

/// Follows the agent's flow stream until it ends, handing each line to
/// `on_line`.
pub fn follow(agent: &str, args: &FlowsArgs, mut on_line: impl FnMut(StreamLine)) -> Result<(), FollowError> {
    use std::io::BufRead as _;
    let url = format!("{}{}", agent.trim_end_matches('/'), follow_query(args, SystemTime::now()));
    let resp = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .build()
        .get(&url)
        .call()
        .map_err(|e| FollowError::Connect { agent: agent.to_owned(), source: Box::new(e) })?;
    for line in std::io::BufReader::new(resp.into_reader()).lines() {
        let line = line.map_err(|source| FollowError::Read { agent: agent.to_owned(), source })?;
        if let Some(l) = parse_stream_line(&line) {
            on_line(l);
        }
    }
    Ok(())
}

/// Percent-encodes what a query value may not carry as is.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `spiffe://td/ns/demo/sa/web` → `demo/web`; anything else unchanged.
#[must_use]
pub fn short_identity(id: &str) -> String {
    let parts: Vec<&str> = id.trim_start_matches("spiffe://").split('/').collect();
    match parts.as_slice() {
        [_, "ns", ns, "sa", sa] => format!("{ns}/{sa}"),
        _ => id.to_owned(),
    }
}

/// `1536` → `1.5K`.
#[must_use]
#[allow(clippy::cast_precision_loss)] // display only
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if n < 1024 {
        return n.to_string();
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1}{}", UNITS[u])
}

/// `40123` µs → `40.1ms`.
#[must_use]
#[allow(clippy::cast_precision_loss)] // display only
pub fn human_us(us: u64) -> String {
    if us < 1000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{:.1}s", us as f64 / 1e6)
    }
}

fn human_ms(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.1}s", ms / 1000.0)
    }
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The table header (120 columns).
#[must_use]
pub fn table_header() -> String {
    format!(
        "{:<12} {:<3} {:<9} {:<17} {:<20} {:<4} {:>10} {:>8} {:>7} {:>3} {}",
        "TIME", "DIR", "VERDICT", "SOURCE", "DESTINATION", "SEC", "OUT/IN", "DURATION", "RTT", "RTX", "POLICY / ERROR"
    )
}

/// One table line per record.
#[must_use]
pub fn table_row(f: &Value) -> String {
    let time = text(&f["time"]);
    let time = time.get(11..23).unwrap_or(time);
    let dir = if f["direction"] == "outbound" { "out" } else { "in" };
    let side = |identity: &Value, addr: &Value| match identity.as_str() {
        Some(id) => short_identity(id),
        None => text(addr).to_owned(),
    };
    let src = side(&f["src_identity"], &f["src"]);
    let mut dst = match f["dst_identity"].as_str() {
        Some(id) => format!("{}:{}", short_identity(id), port_of(&f["orig_dst"])),
        None => text(&f["orig_dst"]).to_owned(),
    };
    if let Some(svc) = f["service"].as_str() {
        dst = format!("{svc} → {dst}");
    }
    let sec = if f["security"] == "mutual_tls" { "mTLS" } else { "-" };
    let bytes = format!(
        "{}/{}",
        human_bytes(f["bytes_sent"].as_u64().unwrap_or(0)),
        human_bytes(f["bytes_received"].as_u64().unwrap_or(0))
    );
    let dur = f["duration_ms"].as_f64().map_or("-".to_owned(), human_ms);
    let rtt = f["rtt_us"].as_u64().map_or("-".to_owned(), human_us);
    let rtx = f["retransmits"].as_u64().map_or("-".to_owned(), |n| if n > 999 { "999".into() } else { n.to_string() });
    let mut note = match (f["policy"].as_str(), f["policy_rule"].as_u64()) {
        (Some(p), Some(r)) => format!("{p}#{r}"),
        (Some(p), None) => p.to_owned(),
        _ => String::new(),
    };
    if let Some(h) = f["http"].as_object() {
        // A waypoint request: what was asked, what came back, which rule.
        let mut l7 = format!("{} {} {}", text(&h["method"]), text(&h["path"]), h["status"].as_u64().unwrap_or(0));
        if let Some(g) = h["grpc_status"].as_u64() {
            let _ = write!(l7, " grpc={g}");
        }
        if let (Some(r), Some(i)) = (h["route"].as_str(), h["rule"].as_u64()) {
            let _ = write!(l7, " {r}#{i}");
        }
        if let Some(flags) = h["response_flags"].as_str().filter(|f| *f != "-") {
            let _ = write!(l7, " {flags}");
        }
        if let Some(n) = h["retries"].as_u64().filter(|n| *n > 0) {
            let _ = write!(l7, " retries={n}");
        }
        note = l7;
    } else if let Some(wp) = f["waypoint"].as_str() {
        note = format!("via waypoint {wp}");
    }
    if let Some(e) = f["error"].as_str() {
        note = if note.is_empty() { e.to_owned() } else { format!("{note} {e}") };
    }
    let line = format!(
        "{:<12} {:<3} {:<9} {:<17} {:<20} {:<4} {:>10} {:>8} {:>7} {:>3} {}",
        time,
        dir,
        text(&f["verdict"]),
        fit(&src, 17),
        fit(&dst, 20),
        sec,
        bytes,
        dur,
        rtt,
        rtx,
        note
    );
    fit(&line, 120)
}

fn port_of(addr: &Value) -> String {
    addr.as_str().and_then(|a| a.rsplit_once(':')).map_or("-".to_owned(), |(_, p)| p.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> Value {
        json!({
            "id": 7, "time": "2026-11-22T04:30:00.123456Z", "event": "close", "direction": "inbound",
            "workload": "demo/api", "src": "10.44.1.2:40000", "orig_dst": "10.44.2.2:8080",
            "dst": "10.44.2.2:8080", "service": null, "security": "mutual_tls",
            "src_identity": "spiffe://cluster.local/ns/demo/sa/web-client",
            "dst_identity": "spiffe://cluster.local/ns/demo/sa/api",
            "bytes_sent": 1_048_576, "bytes_received": 100, "duration_ms": 2500.0,
            "error": null, "verdict": "forwarded", "policy": "demo/allow-web", "policy_rule": 0,
            "rtt_us": 40_512, "retransmits": 3
        })
    }

    #[test]
    fn a_table_row_fits_120_columns_with_short_identities_and_human_units() {
        let row = table_row(&record());
        assert!(row.chars().count() <= 120, "{row}");
        assert!(table_header().chars().count() <= 120);
        for part in [
            "04:30:00.123",
            "in",
            "forwarded",
            "demo/web-client",
            "demo/api:8080",
            "mTLS",
            "1.0M/100",
            "2.5s",
            "40.5ms",
            "demo/allow-web#0",
        ] {
            assert!(row.contains(part), "{part} missing from {row}");
        }
        // Right-aligned under its header.
        let header = table_header();
        let end = header[..header.find("RTT").unwrap() + 3].chars().count();
        let cells: String = row.chars().take(end).collect();
        assert!(cells.ends_with("40.5ms"), "{header}\n{row}");
    }

    #[test]
    fn a_row_without_tcp_health_shows_dashes_and_a_long_one_still_fits() {
        let mut r = record();
        r["rtt_us"] = Value::Null;
        r["retransmits"] = Value::Null;
        r["error"] = json!("x".repeat(300));
        let row = table_row(&r);
        assert!(row.chars().count() <= 120, "{row}");
        assert!(row.contains("      -   - "), "{row}");
        assert_eq!(human_us(850), "850µs");
        assert_eq!(human_us(1_250_000), "1.2s");
    }

    #[test]
    fn stream_lines_are_records_or_loss_notices() {
        assert_eq!(parse_stream_line("{\"lost\":7}"), Some(StreamLine::Lost(7)));
        assert!(matches!(parse_stream_line(&record().to_string()), Some(StreamLine::Record(_))));
        assert_eq!(parse_stream_line(""), None);
        assert!(lost_notice(7).contains("7 flow records lost"));
        let args = FlowsArgs { last: 3, ..FlowsArgs::default() };
        assert_eq!(follow_query(&args, SystemTime::UNIX_EPOCH), "/flows?last=3&follow=true");
    }

    #[test]
    fn the_query_carries_every_filter() {
        let args = FlowsArgs {
            last: 5,
            namespace: Some("demo".into()),
            from_identity: Some("ns/demo/sa/web".into()),
            port: Some(8080),
            verdict: Some("denied".into()),
            since: Some(Duration::from_mins(1)),
            ..FlowsArgs::default()
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_312_496);
        let q = query(&args, now, Some(9));
        assert_eq!(
            q,
            "/flows?last=1000&namespace=demo&from_identity=ns/demo/sa/web&port=8080&verdict=denied&since=2026-11-22T01:53:56.000000Z&after=9"
        );
        assert!(query(&args, now, None).starts_with("/flows?last=5&"));
    }

    #[test]
    fn parses_durations_and_rejects_nonsense() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_mins(5)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_hours(2)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5w").is_err());
    }
}
