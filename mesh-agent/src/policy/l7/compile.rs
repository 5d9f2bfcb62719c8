//! Compilation of an `AuthorizationPolicy` that attaches to a waypoint
//! (`targetRef(s)`) into a [`WaypointPolicy`]: every attribute Istio
//! defines, L7 ones included, ready to evaluate per request.
//!
//! The object is first checked by the L4 compiler ([`super::super::compile`],
//! which validates every field the two share); this adds what only a
//! waypoint can see: `hosts` (case-insensitive), `methods`, `paths` (Istio's
//! `{*}`/`{**}` templates included), `requestPrincipals`, `remoteIpBlocks`,
//! and the L7 `when` keys. An unknown `when` key, or one Heddle cannot
//! evaluate, rejects the policy: a key that never matches would turn a DENY
//! into nothing.

use hyper::header::HeaderName;
use ipnet::IpNet;

use super::{
    super::{
        compile::{ip_block, pattern, port, principal, Cx, Named},
        matchers::{Field, PortRange, ServiceAccount, StrMatch},
        model::{Action, Condition, Operation, Rule, Source, Spec},
        Caveat, PolicyError, PolicyRef, Problem,
    },
    target::{self, Target},
};

/// A validated waypoint policy.
#[derive(Debug, Clone)]
pub struct WaypointPolicy {
    pub(crate) id: PolicyRef,
    pub(crate) action: Action,
    pub(crate) dry_run: bool,
    pub(crate) targets: Box<[Target]>,
    /// Same length and order as `spec.rules`.
    pub(crate) rules: Box<[Rule7]>,
    pub(crate) order: u32,
}

/// One rule: one `from`, one `to` and every `when` must match.
#[derive(Debug, Clone, Default)]
pub struct Rule7 {
    /// Uses attributes only HTTP has (hosts, methods, paths, request
    /// principals, headers, JWT claims): on a connection the waypoint
    /// passes through as L4, an ALLOW rule like this never matches and a
    /// DENY or AUDIT rule matches without them (Istio's rule for TCP).
    pub(crate) http_only: bool,
    pub(crate) from: Box<[Source7]>,
    pub(crate) to: Box<[Operation7]>,
    pub(crate) when: Box<[Condition7]>,
}

/// A `source`: every field set must match.
#[derive(Debug, Clone, Default)]
pub struct Source7 {
    pub(crate) principals: Field<StrMatch>,
    pub(crate) namespaces: Field<StrMatch>,
    pub(crate) service_accounts: Field<ServiceAccount>,
    pub(crate) ip_blocks: Field<IpNet>,
    pub(crate) remote_ip_blocks: Field<IpNet>,
    pub(crate) request_principals: Field<StrMatch>,
}

/// An `operation`.
#[derive(Debug, Clone, Default)]
pub struct Operation7 {
    /// Lower-cased patterns.
    pub(crate) hosts: Field<StrMatch>,
    pub(crate) ports: Field<PortRange>,
    pub(crate) methods: Field<StrMatch>,
    pub(crate) paths: Field<PathPattern>,
}

/// A `paths` entry: Istio's string match, or a template with `{*}` (one
/// segment) and a final `{**}` (any number of segments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// `/exact`, `/prefix*`, `*suffix`, `*`.
    Str(StrMatch),
    /// `/api/{*}/items/{**}`.
    Template(Box<[Segment]>),
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Exactly this text.
    Literal(Box<str>),
    /// `{*}`: any one non-empty segment.
    One,
    /// `{**}`: whatever is left (last only).
    Rest,
}

/// A `when` condition.
#[derive(Debug, Clone)]
pub enum Condition7 {
    /// `request.headers[name]`.
    Header(HeaderName, Field<StrMatch>),
    /// `source.ip`.
    SourceIp(Field<IpNet>),
    /// `remote.ip`.
    RemoteIp(Field<IpNet>),
    /// `source.namespace`.
    SourceNamespace(Field<StrMatch>),
    /// `source.principal`.
    SourcePrincipal(Field<StrMatch>),
    /// `destination.ip`.
    DestinationIp(Field<IpNet>),
    /// `destination.port`.
    DestinationPort(Field<PortRange>),
    /// `request.auth.principal`.
    AuthPrincipal(Field<StrMatch>),
    /// `request.auth.audiences`.
    AuthAudiences(Field<StrMatch>),
    /// `request.auth.presenter`.
    AuthPresenter(Field<StrMatch>),
    /// `request.auth.claims[a][b]`.
    AuthClaim(Box<[String]>, Field<StrMatch>),
    /// `connection.sni`: the waypoint's inner streams carry no TLS, so there
    /// is never a value.
    Sni(Field<StrMatch>),
}

impl Condition7 {
    /// Whether the key is an HTTP attribute.
    pub(crate) fn is_http_only(&self) -> bool {
        matches!(
            self,
            Condition7::Header(..)
                | Condition7::AuthPrincipal(_)
                | Condition7::AuthAudiences(_)
                | Condition7::AuthPresenter(_)
                | Condition7::AuthClaim(..)
        )
    }
}

/// Compiles the spec of an object the L4 compiler accepted. `Ok(None)`:
/// the policy has no target (it is the node agents').
pub(crate) fn compile(
    index: usize,
    id: PolicyRef,
    annotations: &std::collections::BTreeMap<String, String>,
    spec: &Spec,
    root: &str,
) -> Result<Option<(WaypointPolicy, Vec<super::super::PolicyWarning>)>, Vec<PolicyError>> {
    if spec.target_ref.is_none() && spec.target_refs.is_empty() {
        return Ok(None);
    }
    let mut cx = Cx::new(index, id.clone());
    cx.action = spec.action.unwrap_or_default();
    let dry_run = cx.dry_run(annotations);
    let (targets, problems) = target::parse_all(spec.target_ref.as_ref(), &spec.target_refs, id.namespace(), root);
    for (field, p) in problems {
        cx.error(&field, p);
    }
    if spec.selector.is_some() {
        cx.error(
            "spec.selector",
            Problem::TargetRef("a policy has either a selector or targetRefs, not both (as in Istio)".into()),
        );
    }
    let rules: Box<[Rule7]> =
        spec.rules.iter().enumerate().map(|(i, r)| rule(&mut cx, &format!("spec.rules[{i}]"), r)).collect();
    if cx.errors.is_empty() {
        let policy = WaypointPolicy { id, action: cx.action, dry_run, targets: targets.into(), rules, order: 0 };
        Ok(Some((policy, cx.warnings)))
    } else {
        Err(cx.errors)
    }
}

fn rule(cx: &mut Cx, path: &str, r: &Rule) -> Rule7 {
    let from: Box<[Source7]> = r
        .from
        .iter()
        .enumerate()
        .filter_map(|(j, f)| f.source.as_ref().map(|s| source(cx, &format!("{path}.from[{j}].source"), s)))
        .collect();
    let to: Box<[Operation7]> =
        r.to.iter()
            .enumerate()
            .filter_map(|(j, t)| t.operation.as_ref().map(|o| operation(cx, &format!("{path}.to[{j}].operation"), o)))
            .collect();
    let when: Box<[Condition7]> =
        r.when.iter().enumerate().filter_map(|(j, c)| condition(cx, &format!("{path}.when[{j}]"), c)).collect();
    let http_only = from.iter().any(|s: &Source7| !s.request_principals.is_empty())
        || to.iter().any(|o: &Operation7| !(o.hosts.is_empty() && o.methods.is_empty() && o.paths.is_empty()))
        || when.iter().any(Condition7::is_http_only);
    Rule7 { http_only, from, to, when }
}

fn source(cx: &mut Cx, path: &str, s: &Source) -> Source7 {
    let ns = cx.id.namespace().to_owned();
    Source7 {
        principals: cx.field(path, ("principals", &s.principals), ("notPrincipals", &s.not_principals), principal),
        namespaces: cx.field(path, ("namespaces", &s.namespaces), ("notNamespaces", &s.not_namespaces), pattern),
        service_accounts: cx.field(
            path,
            ("serviceAccounts", &s.service_accounts),
            ("notServiceAccounts", &s.not_service_accounts),
            |v| ServiceAccount::parse(v, &ns).map(|sa| (sa, None)),
        ),
        ip_blocks: cx.field(path, ("ipBlocks", &s.ip_blocks), ("notIpBlocks", &s.not_ip_blocks), ip_block),
        remote_ip_blocks: cx.field(
            path,
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
            ip_block,
        ),
        request_principals: cx.field(
            path,
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            pattern,
        ),
    }
}

fn operation(cx: &mut Cx, path: &str, o: &Operation) -> Operation7 {
    Operation7 {
        hosts: cx.field(path, ("hosts", &o.hosts), ("notHosts", &o.not_hosts), |v| pattern(&v.to_ascii_lowercase())),
        ports: cx.field(path, ("ports", &o.ports), ("notPorts", &o.not_ports), port),
        methods: cx.field(path, ("methods", &o.methods), ("notMethods", &o.not_methods), pattern),
        paths: cx.field(path, ("paths", &o.paths), ("notPaths", &o.not_paths), |v| parse_path(v).map(|p| (p, None))),
    }
}

/// Parses a `paths` entry.
pub fn parse_path(v: &str) -> Result<PathPattern, Problem> {
    if !v.contains('{') {
        return StrMatch::parse(v).map(|(m, _)| PathPattern::Str(m));
    }
    let bad = |why| Problem::PathPattern(v.to_owned(), why);
    let Some(rest) = v.strip_prefix('/') else {
        return Err(bad("a template starts with /"));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let mut segs = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        segs.push(match *part {
            "{*}" => Segment::One,
            "{**}" if i + 1 == parts.len() => Segment::Rest,
            "{**}" => return Err(bad("{**} must be the last segment")),
            p if p.contains(['{', '}', '*']) => return Err(bad("{*} and {**} must be whole segments")),
            p => Segment::Literal(p.into()),
        });
    }
    Ok(PathPattern::Template(segs.into()))
}

/// Reads a key of the form `prefix[a][b]` into its bracketed parts.
fn bracketed<'a>(key: &'a str, prefix: &str) -> Option<Vec<&'a str>> {
    let mut rest = key.strip_prefix(prefix)?;
    let mut parts = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        parts.push(&inner[..end]);
        rest = &inner[end + 1..];
    }
    (!parts.is_empty() && parts.iter().all(|p| !p.is_empty())).then_some(parts)
}

fn condition(cx: &mut Cx, path: &str, c: &Condition) -> Option<Condition7> {
    let (yes, no): (Named, Named) = (("values", &c.values), ("notValues", &c.not_values));
    let strings = |cx: &mut Cx| cx.field(path, yes, no, pattern);
    Some(match c.key.as_str() {
        "source.ip" => Condition7::SourceIp(cx.field(path, yes, no, ip_block)),
        "remote.ip" => Condition7::RemoteIp(cx.field(path, yes, no, ip_block)),
        "source.namespace" => Condition7::SourceNamespace(strings(cx)),
        "source.principal" => Condition7::SourcePrincipal(cx.field(path, yes, no, principal)),
        "destination.ip" => Condition7::DestinationIp(cx.field(path, yes, no, ip_block)),
        "destination.port" => Condition7::DestinationPort(cx.field(path, yes, no, port)),
        "request.auth.principal" => Condition7::AuthPrincipal(strings(cx)),
        "request.auth.audiences" => Condition7::AuthAudiences(strings(cx)),
        "request.auth.presenter" => Condition7::AuthPresenter(strings(cx)),
        "connection.sni" => {
            cx.warn(
                &format!("{path}.key"),
                Caveat::L7PartsDropped("connection.sni: requests inside HBONE carry no TLS, so it has no value".into()),
            );
            Condition7::Sni(strings(cx))
        }
        "" => return None,
        key => {
            if let Some(parts) = bracketed(key, "request.headers") {
                let [name] = parts.as_slice() else {
                    cx.error(&format!("{path}.key"), Problem::UnknownWhenKey(key.to_owned()));
                    return None;
                };
                let Ok(name) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) else {
                    cx.error(&format!("{path}.key"), Problem::HeaderName((*name).to_owned()));
                    return None;
                };
                return Some(Condition7::Header(name, strings(cx)));
            }
            if let Some(parts) = bracketed(key, "request.auth.claims") {
                let parts = parts.into_iter().map(str::to_owned).collect();
                return Some(Condition7::AuthClaim(parts, strings(cx)));
            }
            cx.error(&format!("{path}.key"), Problem::UnknownWhenKey(key.to_owned()));
            return None;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_templates_take_whole_segments_and_a_final_double_star() {
        assert_eq!(
            parse_path("/api/{*}/x/{**}").unwrap(),
            PathPattern::Template(
                vec![Segment::Literal("api".into()), Segment::One, Segment::Literal("x".into()), Segment::Rest].into()
            )
        );
        for bad in ["/a/{**}/b", "/a{*}", "api/{*}", "/a/{*}x", "/a/*/{*}"] {
            assert!(matches!(parse_path(bad), Err(Problem::PathPattern(..))), "{bad}");
        }
        assert!(matches!(parse_path("/admin*").unwrap(), PathPattern::Str(StrMatch::Prefix(_))));
    }

    #[test]
    fn bracketed_keys_read_nested_claims() {
        assert_eq!(bracketed("request.auth.claims[groups]", "request.auth.claims"), Some(vec!["groups"]));
        assert_eq!(bracketed("request.auth.claims[a][b]", "request.auth.claims"), Some(vec!["a", "b"]));
        assert_eq!(bracketed("request.auth.claims[]", "request.auth.claims"), None);
        assert_eq!(bracketed("request.auth.claims[a", "request.auth.claims"), None);
        assert_eq!(bracketed("request.headersx", "request.headers"), None);
    }
}
