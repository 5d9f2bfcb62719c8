//! The agent's admin API, as typed answers.
//!
//! Requests are made with `curl` spawned inside the node's network namespace
//! (the API listens on the node's loopback) and inside the test bed's
//! `tools` cgroup, which is outside every node's subtree, so the agent's own
//! cgroup programs never see the probe. The types mirror the contract:
//! flows use `snake_case` keys, everything else `camelCase`. Unknown keys are
//! ignored so the agent can add fields without breaking the tests.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{truncate, Result, TestbedError};
use crate::exec::spawn_in;

/// Map names reported by `GET /datapath`.
pub mod maps {
    /// Connects rewritten by `connect4`, waiting for their handshake.
    pub const PENDING: &str = "HEDDLE_PENDING";
    /// Original destinations not yet taken by the agent.
    pub const ORIG_DST: &str = "HEDDLE_ORIG_DST";
    /// Enrolled pod network namespaces.
    pub const ENROLLED: &str = "HEDDLE_ENROLLED";
    /// Pod IPs whose inbound is captured.
    pub const INBOUND_IPS: &str = "HEDDLE_INBOUND_IPS";
}

/// What happened to a connection, per flow record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowEvent {
    /// The connection was established.
    Open,
    /// The connection ended normally.
    Close,
    /// The connection failed.
    Error,
}

/// Which way the agent handled a connection for its workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The workload was the client.
    Outbound,
    /// The workload was the server.
    Inbound,
}

/// How a connection's bytes crossed the network, per flow record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// Inside the HBONE mTLS tunnel (port 15008).
    MutualTls,
    /// In the clear (also what a record without the field means: agents
    /// before the tunnel only forwarded in plaintext).
    #[default]
    Plaintext,
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MutualTls => "mutual_tls",
            Self::Plaintext => "plaintext",
        })
    }
}

/// What the mesh did with a connection, per flow record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Forwarded (allowed by policy, or not subject to it).
    Forwarded,
    /// Refused, or closed, by authorization policy.
    Denied,
    /// Forwarded, and an AUDIT policy matched.
    Audited,
    /// Failed for another reason.
    Error,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Forwarded => "forwarded",
            Self::Denied => "denied",
            Self::Audited => "audited",
            Self::Error => "error",
        })
    }
}

/// One record of `GET /flows`.
#[derive(Debug, Clone, Deserialize)]
pub struct Flow {
    /// Record id, increasing.
    pub id: u64,
    /// Connection id shared by a connection's records, if the agent reports it.
    #[serde(default)]
    pub conn: Option<u64>,
    /// When it was recorded.
    pub time: String,
    /// What happened.
    pub event: FlowEvent,
    /// Outbound or inbound.
    pub direction: Direction,
    /// The enrolled pod, `namespace/name`.
    pub workload: String,
    /// Outbound: pod IP and the agent's upstream port; inbound: the remote
    /// client. `None` only if the agent could not learn it (error records).
    pub src: Option<SocketAddr>,
    /// What the application connected to (`None` only on error records).
    pub orig_dst: Option<SocketAddr>,
    /// Where the agent sent it (differs from `orig_dst` for a service VIP;
    /// `None` if it was never resolved).
    pub dst: Option<SocketAddr>,
    /// The service, `namespace/name`, if `orig_dst` was a VIP.
    pub service: Option<String>,
    /// Tunnelled or plaintext.
    #[serde(default)]
    pub security: Security,
    /// SPIFFE ID of the client workload, when known.
    #[serde(default)]
    pub src_identity: Option<String>,
    /// SPIFFE ID of the server workload, when known.
    #[serde(default)]
    pub dst_identity: Option<String>,
    /// Hex serial of the client certificate (inbound tunnel records).
    #[serde(default)]
    pub peer_cert_serial: Option<String>,
    /// Bytes from client toward server.
    pub bytes_sent: u64,
    /// Bytes from server toward client.
    pub bytes_received: u64,
    /// Duration, once closed.
    pub duration_ms: Option<f64>,
    /// Error text for `error` records.
    pub error: Option<String>,
    /// What the mesh did (absent from agents before policy enforcement).
    #[serde(default)]
    pub verdict: Option<Verdict>,
    /// The deciding authorization policy, `namespace/name` (inbound).
    #[serde(default)]
    pub policy: Option<String>,
    /// The index of its matching rule.
    #[serde(default)]
    pub policy_rule: Option<usize>,
    /// The AUDIT policy that matched, `namespace/name`.
    #[serde(default)]
    pub audit_policy: Option<String>,
    /// What dry-run policies would have decided.
    #[serde(default)]
    pub dry_run: Option<String>,
    /// Close records of live connections closed by a policy change.
    #[serde(default)]
    pub closed_by_policy: Option<String>,
    /// Smoothed RTT of the agent's network-facing socket, microseconds.
    #[serde(default)]
    pub rtt_us: Option<u32>,
    /// Retransmitted segments during the connection (close records).
    #[serde(default)]
    pub retransmits: Option<u32>,
    /// Time to connect upstream, milliseconds.
    #[serde(default)]
    pub connect_ms: Option<f64>,
}

impl Flow {
    /// Whether this record ends a connection (`close` or `error`). Counting
    /// terminal records counts connections, whether or not the agent also
    /// logs `open` records.
    #[must_use]
    pub fn is_terminal(&self) -> bool {
        matches!(self.event, FlowEvent::Close | FlowEvent::Error)
    }

    /// The IP of `src`, if known.
    #[must_use]
    pub fn src_ip(&self) -> Option<IpAddr> {
        self.src.map(|s| s.ip())
    }

    /// Whether the record says the connection went through the mTLS tunnel.
    #[must_use]
    pub fn is_mutual_tls(&self) -> bool {
        self.security == Security::MutualTls
    }
}

/// An optional address for display (`-` when absent).
pub(crate) fn show_addr(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "-".to_owned(), |a| a.to_string())
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} {:?} {:?} {} {} -> {} (orig {}) svc={} sent={} recv={}",
            self.id,
            self.event,
            self.direction,
            self.workload,
            show_addr(self.src),
            show_addr(self.dst),
            show_addr(self.orig_dst),
            self.service.as_deref().unwrap_or("-"),
            self.bytes_sent,
            self.bytes_received,
        )?;
        write!(f, " sec={}", self.security)?;
        if self.src_identity.is_some() || self.dst_identity.is_some() {
            write!(
                f,
                " ids={} -> {}",
                self.src_identity.as_deref().unwrap_or("-"),
                self.dst_identity.as_deref().unwrap_or("-")
            )?;
        }
        if let Some(serial) = &self.peer_cert_serial {
            write!(f, " peer_serial={serial}")?;
        }
        if let Some(v) = self.verdict {
            write!(f, " verdict={v}")?;
        }
        if let Some(p) = &self.policy {
            write!(f, " policy={p}")?;
            if let Some(r) = self.policy_rule {
                write!(f, " rule={r}")?;
            }
        }
        if let Some(p) = &self.audit_policy {
            write!(f, " audited_by={p}")?;
        }
        if let Some(d) = &self.dry_run {
            write!(f, " dry_run={d:?}")?;
        }
        if let Some(p) = &self.closed_by_policy {
            write!(f, " closed_by_policy={p}")?;
        }
        if let Some(e) = &self.error {
            write!(f, " error={e}")?;
        }
        Ok(())
    }
}

/// One entry of `GET /workloads`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Service account.
    pub service_account: String,
    /// Node.
    pub node: String,
    /// Pod IPs.
    pub ips: Vec<IpAddr>,
    /// Enrolled per the config.
    pub enrolled: bool,
    /// Capture active on this agent.
    pub captured: bool,
    /// Cookie of the pod's netns, once known.
    pub netns_cookie: Option<u64>,
    /// Outbound connections handled.
    pub outbound_connections: u64,
    /// Inbound connections handled.
    pub inbound_connections: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
}

impl Workload {
    /// `namespace/name`.
    #[must_use]
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Occupancy of one eBPF map.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct MapOccupancy {
    /// Entries now.
    pub entries: u64,
    /// Maximum entries.
    pub capacity: u64,
}

/// `GET /datapath`.
#[derive(Debug, Clone, Deserialize)]
pub struct Datapath {
    /// Loaded programs (shape left to the agent).
    pub programs: Vec<serde_json::Value>,
    /// Map occupancy by map name.
    pub maps: BTreeMap<String, MapOccupancy>,
    /// Datapath reason counters by reason name.
    pub reasons: BTreeMap<String, u64>,
}

impl Datapath {
    /// Entries of the map `name`, 0 if the agent does not report it.
    #[must_use]
    pub fn map_entries(&self, name: &str) -> u64 {
        self.maps.get(name).map_or(0, |m| m.entries)
    }

    /// Counter of `reason`, 0 if the agent does not report it.
    #[must_use]
    pub fn reason(&self, reason: &str) -> u64 {
        self.reasons.get(reason).copied().unwrap_or(0)
    }
}

/// `GET /stats`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// File descriptors the agent has open.
    pub open_fds: u64,
    /// Connections being proxied now.
    pub active_connections: u64,
    /// Live flow stream subscribers.
    #[serde(default)]
    pub flow_subscribers: Vec<FlowSubscriber>,
    /// Records lost by slow flow subscribers, in total.
    #[serde(default)]
    pub flow_subscriber_dropped: u64,
}

/// One live flow stream subscriber in `/stats`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowSubscriber {
    /// Its id.
    pub id: u64,
    /// Records queued for it.
    pub queued: u64,
    /// Its queue capacity.
    pub queue: u64,
    /// Records it lost.
    pub lost: u64,
}

/// `GET /certs`: the workload certificates an agent holds.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certs {
    /// Whether the agent runs with a CA (mTLS on).
    pub mtls: bool,
    /// One entry per identity held or wanted, sorted by identity.
    pub certificates: Vec<Certificate>,
    /// Tunnel connections in the client pool (absent without mTLS).
    #[serde(default)]
    pub pooled_tunnels: Option<u64>,
}

impl Certs {
    /// The entry of `identity` (a SPIFFE ID), if listed.
    #[must_use]
    pub fn certificate(&self, identity: &str) -> Option<&Certificate> {
        self.certificates.iter().find(|c| c.identity == identity)
    }
}

impl fmt::Display for Certs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mtls={} pooledTunnels={}",
            self.mtls,
            self.pooled_tunnels.map_or_else(|| "-".to_owned(), |n| n.to_string())
        )?;
        for c in &self.certificates {
            write!(
                f,
                "; {} ready={} generation={}",
                c.identity,
                c.ready,
                c.generation.map_or_else(|| "-".to_owned(), |g| g.to_string())
            )?;
            if let Some(e) = &c.last_error {
                write!(f, " lastError={e}")?;
            }
        }
        Ok(())
    }
}

/// One certificate of `GET /certs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certificate {
    /// The SPIFFE ID it carries.
    pub identity: String,
    /// Whether a valid certificate is held now.
    pub ready: bool,
    /// Whether the certificate held has expired (renewal failed past it).
    #[serde(default)]
    pub expired: bool,
    /// When it was obtained (Unix seconds).
    pub issued_at: Option<u64>,
    /// End of validity (Unix seconds).
    pub not_after: Option<u64>,
    /// The agent's certificate counter at issue (increases with every
    /// certificate the agent obtains, for any identity).
    pub generation: Option<u64>,
    /// Why the last attempt to obtain one failed, if it did.
    pub last_error: Option<String>,
}

/// `GET /policies`: the authorization policies an agent enforces.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policies {
    /// The namespace whose policies apply mesh-wide.
    pub root_namespace: String,
    /// The `--policies` file or directory, if any.
    pub source: Option<PathBuf>,
    /// `fnv1a64:<hex>` of the source content the agent last read.
    pub content_hash: Option<String>,
    /// The policies in force.
    pub loaded: Vec<LoadedPolicy>,
    /// Policies rejected from that content: `policy ns/name: field: problem`.
    pub errors: Vec<String>,
    /// Caveats about accepted policies.
    pub warnings: Vec<String>,
    /// Why the current content is not applied (the previous set is), if so.
    pub source_error: Option<String>,
    /// Inbound connections registered for re-evaluation now.
    pub live_connections: u64,
    /// Decision counters.
    pub decisions: Vec<DecisionCount>,
}

impl Policies {
    /// The loaded policy `ns/name`, if in force.
    #[must_use]
    pub fn policy(&self, qualified_name: &str) -> Option<&LoadedPolicy> {
        self.loaded.iter().find(|p| p.policy == qualified_name)
    }

    /// The counter of (`policy`, `verdict`), 0 if absent.
    #[must_use]
    pub fn decisions_of(&self, policy: &str, verdict: &str) -> u64 {
        self.decisions
            .iter()
            .filter(|d| d.policy.as_deref() == Some(policy) && d.verdict == verdict)
            .map(|d| d.count)
            .sum()
    }
}

impl fmt::Display for Policies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hash={} loaded=[", self.content_hash.as_deref().unwrap_or("-"))?;
        for (i, p) in self.loaded.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{} {} rules={}", p.policy, p.action, p.rules)?;
            if p.dry_run {
                f.write_str(" dry-run")?;
            }
        }
        write!(f, "] errors={:?}", self.errors)?;
        if let Some(e) = &self.source_error {
            write!(f, " sourceError={e:?}")?;
        }
        Ok(())
    }
}

/// One policy in force, per `GET /policies`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadedPolicy {
    /// `namespace/name`.
    pub policy: String,
    /// `ALLOW`, `DENY` or `AUDIT`.
    pub action: String,
    /// Number of rules.
    pub rules: usize,
    /// Evaluated but not enforced.
    pub dry_run: bool,
}

/// One decision counter of `GET /policies`.
#[derive(Debug, Clone, Deserialize)]
pub struct DecisionCount {
    /// The deciding policy's action (`null` if none decided).
    pub action: Option<String>,
    /// The policy, `namespace/name` (`null` if none decided).
    pub policy: Option<String>,
    /// `allow`, `deny`, `audit`, `dry_run_allow`, `dry_run_deny`, `close`.
    pub verdict: String,
    /// How many.
    pub count: u64,
}

/// Talks to one agent's admin API from inside its node's netns.
#[derive(Debug, Clone)]
pub(crate) struct AdminClient {
    pub(crate) node: String,
    pub(crate) netns: PathBuf,
    pub(crate) cgroup: PathBuf,
    pub(crate) addr: String,
}

impl AdminClient {
    /// GETs `path`; returns the status code and body.
    pub(crate) fn get(&self, path: &str) -> Result<(u16, String)> {
        let url = format!("http://{}{}", self.addr, path);
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}", &url])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = spawn_in(cmd, &self.netns, &self.cgroup)?
            .wait_with_output()
            .map_err(|e| TestbedError::io(format!("curl {url}"), e))?;
        let admin_err =
            |problem: String| TestbedError::Admin { node: self.node.clone(), path: path.to_owned(), problem };
        if !out.status.success() {
            return Err(admin_err(format!("failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) =
            text.rsplit_once('\n').ok_or_else(|| admin_err(format!("curl printed no status: {text}")))?;
        let code = code.trim().parse().map_err(|_| admin_err(format!("curl printed a bad status: {code}")))?;
        Ok((code, body.to_owned()))
    }

    /// GETs `path`, requires 200 and decodes the JSON body.
    pub(crate) fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (code, body) = self.get(path)?;
        if code != 200 {
            return Err(TestbedError::Admin {
                node: self.node.clone(),
                path: path.to_owned(),
                problem: format!("returned {code}: {}", truncate(&body, 500)),
            });
        }
        serde_json::from_str(&body).map_err(|source| TestbedError::AdminBody {
            node: self.node.clone(),
            path: path.to_owned(),
            source,
            body: truncate(&body, 2000),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_flow_record_as_documented() {
        let json = r#"{"id":1,"time":"2024-01-01T00:00:00Z","event":"close","direction":"outbound",
            "workload":"demo/client","src":"10.44.1.2:40001","orig_dst":"10.96.0.10:80",
            "dst":"10.44.2.2:8080","service":"demo/server","bytes_sent":3,"bytes_received":4,
            "duration_ms":12,"error":null,"extra":"ignored"}"#;
        let flow: Flow = serde_json::from_str(json).unwrap();
        assert!(flow.is_terminal());
        assert_eq!(flow.direction, Direction::Outbound);
        assert_eq!(flow.orig_dst, Some("10.96.0.10:80".parse().unwrap()));
        let err: Flow = serde_json::from_str(
            r#"{"id":2,"conn":9,"time":"t","event":"error","direction":"inbound","workload":"demo/s",
            "src":null,"orig_dst":null,"dst":null,"service":null,"bytes_sent":0,"bytes_received":0,
            "duration_ms":null,"error":"no original destination"}"#,
        )
        .unwrap();
        assert!(err.is_terminal() && err.src_ip().is_none() && err.conn == Some(9));
        assert_eq!(flow.service.as_deref(), Some("demo/server"));
        assert_eq!(flow.duration_ms, Some(12.0));
    }

    #[test]
    fn decodes_tunnel_fields_and_certs_as_documented() {
        let flow: Flow = serde_json::from_str(
            r#"{"id":3,"conn":4,"time":"t","event":"close","direction":"inbound","workload":"demo/server",
            "src":"10.44.1.2:40000","orig_dst":"10.44.2.2:8080","dst":"10.44.2.2:8080","service":null,
            "security":"mutual_tls","src_identity":"spiffe://cluster.local/ns/demo/sa/client",
            "dst_identity":"spiffe://cluster.local/ns/demo/sa/server","peer_cert_serial":"0a1b",
            "bytes_sent":1,"bytes_received":1,"duration_ms":1.5,"error":null}"#,
        )
        .unwrap();
        assert!(flow.is_mutual_tls());
        assert_eq!(flow.peer_cert_serial.as_deref(), Some("0a1b"));
        assert!(flow.to_string().contains("sec=mutual_tls"), "{flow}");
        let certs: Certs = serde_json::from_str(
            r#"{"mtls":true,"pooledTunnels":2,"certificates":[{"identity":"spiffe://cluster.local/ns/demo/sa/client",
            "ready":true,"issuedAt":10,"notAfter":16,"generation":3,"lastError":null}]}"#,
        )
        .unwrap();
        let c = certs.certificate("spiffe://cluster.local/ns/demo/sa/client").unwrap();
        assert_eq!((c.ready, c.generation, c.not_after), (true, Some(3), Some(16)));
        let off: Certs = serde_json::from_str(r#"{"mtls":false,"certificates":[]}"#).unwrap();
        assert!(!off.mtls && off.pooled_tunnels.is_none());
    }

    #[test]
    fn decodes_policy_fields_of_flows_and_the_policies_endpoint() {
        let flow: Flow = serde_json::from_str(
            r#"{"id":5,"conn":6,"time":"t","event":"close","direction":"inbound","workload":"demo/server",
            "src":"10.44.1.2:40000","orig_dst":"10.44.2.2:8080","dst":"10.44.2.2:8080","service":null,
            "bytes_sent":1,"bytes_received":1,"duration_ms":1.5,"error":"closed by policy change",
            "verdict":"denied","policy":"demo/cut","policy_rule":0,"audit_policy":null,"dry_run":null,
            "closed_by_policy":"demo/cut"}"#,
        )
        .unwrap();
        assert_eq!(flow.verdict, Some(Verdict::Denied));
        assert_eq!(flow.closed_by_policy.as_deref(), Some("demo/cut"));
        assert!(flow.to_string().contains("verdict=denied policy=demo/cut rule=0"), "{flow}");
        let p: Policies = serde_json::from_str(
            r#"{"rootNamespace":"heddle-system","source":"/tmp/p.yaml","contentHash":"fnv1a64:00",
            "loaded":[{"policy":"demo/a","action":"ALLOW","rules":1,"dryRun":false}],
            "errors":["policy demo/b: spec.x: bad"],"warnings":[],"sourceError":null,
            "liveConnections":2,"decisions":[{"action":"ALLOW","policy":"demo/a","verdict":"allow","count":3}]}"#,
        )
        .unwrap();
        assert_eq!(p.policy("demo/a").map(|l| l.rules), Some(1));
        assert_eq!(p.decisions_of("demo/a", "allow"), 3);
        assert_eq!(p.live_connections, 2);
    }

    #[test]
    fn decodes_workloads_and_datapath_in_camel_case() {
        let w: Workload = serde_json::from_str(
            r#"{"namespace":"demo","name":"client","serviceAccount":"client","node":"node-a",
            "ips":["10.44.1.2"],"enrolled":true,"captured":true,"netnsCookie":null,
            "outboundConnections":1,"inboundConnections":0,"bytesSent":5,"bytesReceived":5}"#,
        )
        .unwrap();
        assert_eq!(w.qualified_name(), "demo/client");
        let d: Datapath = serde_json::from_str(
            r#"{"programs":[],"maps":{"HEDDLE_PENDING":{"entries":2,"capacity":65536}},
            "reasons":{"connect_agent_mark":7}}"#,
        )
        .unwrap();
        assert_eq!(d.map_entries(maps::PENDING), 2);
        assert_eq!(d.map_entries(maps::ORIG_DST), 0);
        assert_eq!(d.reason("connect_agent_mark"), 7);
    }
}
