//! [`authorize_request`]: the waypoint's decision for one request, a pure
//! function of a [`WaypointPolicies`] and a [`RequestFacts`], in Istio's
//! decision order (the same `Tally` as the node agents': DENY, then no
//! ALLOW policy, then a matching ALLOW, else deny), AUDIT and dry-run
//! included. A policy of the target that was rejected denies (fail closed).

use std::net::{IpAddr, SocketAddr};

use hyper::header::HeaderMap;

use super::{
    super::{
        eval::{decide_applicable, Ranked},
        Action, Decision, PeerIdentity, PolicyRef, Reason, Verdict,
    },
    authn::{claim_values, Authenticated},
    compile::{Condition7, Operation7, PathPattern, Rule7, Segment, Source7, WaypointPolicy},
    WaypointPolicies,
};

/// What the waypoint knows of one request when it decides it.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The Service the request is for (`ns`, `name`); `None` for a pod address.
    pub service: Option<(&'a str, &'a str)>,
    /// The waypoint (`ns`, `name`).
    pub waypoint: (&'a str, &'a str),
    /// The client's address (its pod IP, from the tunnel).
    pub src_ip: IpAddr,
    /// The client's verified identity (the original client, not a hop).
    pub peer: Option<&'a PeerIdentity>,
    /// What the client dialled (VIP or pod, and port).
    pub dst: SocketAddr,
    /// The method.
    pub method: &'a str,
    /// `:authority`/`Host`, lower-cased.
    pub host: &'a str,
    /// The normalised path, without the query.
    pub path: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The verified JWT, if the request carried one.
    pub auth: Option<&'a Authenticated>,
    /// An HTTP request (`false`: a connection passed through as L4, whose
    /// method, host, path and headers are empty).
    pub http: bool,
}

impl Ranked for WaypointPolicy {
    fn id(&self) -> &PolicyRef {
        &self.id
    }
    fn action(&self) -> Action {
        self.action
    }
    fn order(&self) -> u32 {
        self.order
    }
    fn dry_run(&self) -> bool {
        self.dry_run
    }
}

/// Decides one request. Pure: same set and facts, same decision.
#[must_use]
pub fn authorize_request(set: &WaypointPolicies, req: &RequestFacts<'_>) -> Decision {
    if let Some(policy) = set.rejected_for(req.service, req.waypoint) {
        return Decision {
            verdict: Verdict::Deny,
            reason: Reason::PolicyRejected,
            policy: Some(policy.clone()),
            rule: None,
            audited: None,
            dry_run: None,
        };
    }
    let req = RequestFacts { src_ip: req.src_ip.to_canonical(), ..*req };
    decide_applicable(|observe| {
        set.for_each_applicable(req.service, req.waypoint, |p| {
            observe(p, p.rules.iter().position(|r| r.matches(&req, p.action == Action::Allow)));
        });
    })
}

impl Rule7 {
    fn matches(&self, r: &RequestFacts<'_>, allow: bool) -> bool {
        if !r.http && self.http_only && allow {
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(r)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(r)))
            && self.when.iter().all(|w| (!r.http && w.is_http_only()) || w.matches(r))
    }
}

impl Source7 {
    // An attribute the request lacks (no peer identity, no JWT) matches no
    // value: the positive list fails, the negative one passes (Istio).
    fn matches(&self, r: &RequestFacts<'_>) -> bool {
        self.ip_blocks.matches(|n| n.contains(&r.src_ip))
            && self.remote_ip_blocks.matches(|n| n.contains(&r.src_ip))
            && self.principals.matches(|m| r.peer.is_some_and(|p| m.matches(p.principal())))
            && self.namespaces.matches(|m| r.peer.is_some_and(|p| m.matches(p.namespace())))
            && self.service_accounts.matches(|sa| r.peer.is_some_and(|p| sa.matches(p)))
            && (!r.http || self.request_principals.matches(|m| r.auth.is_some_and(|a| m.matches(&a.principal))))
    }
}

impl Operation7 {
    fn matches(&self, r: &RequestFacts<'_>) -> bool {
        let bare_host = strip_port(r.host);
        self.ports.matches(|p| p.contains(r.dst.port()))
            && (!r.http
                || (self.hosts.matches(|m| m.matches(r.host) || m.matches(bare_host))
                    && self.methods.matches(|m| m.matches(r.method))
                    && self.paths.matches(|p| p.matches(r.path))))
    }
}

/// `host` without a trailing `:port` (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    }
}

impl PathPattern {
    /// Whether the (normalised) `path` matches.
    #[must_use]
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Str(m) => m.matches(path),
            PathPattern::Template(segs) => {
                let Some(rest) = path.strip_prefix('/') else { return false };
                let mut parts = rest.split('/');
                for seg in &**segs {
                    match seg {
                        Segment::Rest => return true,
                        Segment::One => {
                            if parts.next().is_none_or(str::is_empty) {
                                return false;
                            }
                        }
                        Segment::Literal(l) => {
                            if parts.next() != Some(&**l) {
                                return false;
                            }
                        }
                    }
                }
                parts.next().is_none()
            }
        }
    }
}

impl Condition7 {
    fn matches(&self, r: &RequestFacts<'_>) -> bool {
        let peer = r.peer;
        match self {
            Condition7::Header(name, f) => {
                let values = r.headers.get_all(name);
                f.matches(|m| values.iter().any(|v| v.to_str().is_ok_and(|v| m.matches(v))))
            }
            Condition7::SourceIp(f) | Condition7::RemoteIp(f) => f.matches(|n| n.contains(&r.src_ip)),
            Condition7::SourceNamespace(f) => f.matches(|m| peer.is_some_and(|p| m.matches(p.namespace()))),
            Condition7::SourcePrincipal(f) => f.matches(|m| peer.is_some_and(|p| m.matches(p.principal()))),
            Condition7::DestinationIp(f) => f.matches(|n| n.contains(&r.dst.ip().to_canonical())),
            Condition7::DestinationPort(f) => f.matches(|p| p.contains(r.dst.port())),
            Condition7::AuthPrincipal(f) => f.matches(|m| r.auth.is_some_and(|a| m.matches(&a.principal))),
            Condition7::AuthAudiences(f) => {
                f.matches(|m| r.auth.is_some_and(|a| a.audiences.iter().any(|x| m.matches(x))))
            }
            Condition7::AuthPresenter(f) => {
                f.matches(|m| r.auth.and_then(|a| a.presenter.as_deref()).is_some_and(|x| m.matches(x)))
            }
            Condition7::AuthClaim(path, f) => {
                f.matches(|m| r.auth.is_some_and(|a| claim_values(&a.claims, path).iter().any(|v| m.matches(v))))
            }
            Condition7::Sni(f) => f.matches(|_| false),
        }
    }
}
