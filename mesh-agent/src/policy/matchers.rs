//! The leaf matchers of a rule and their parsers: string patterns, service
//! accounts, CIDR blocks, ports and port ranges, and [`Field`], the
//! "any of these, none of those" pair every policy field is made of.
//!
//! Parsers return a typed [`Problem`] (the caller adds the policy and field
//! path); matchers are allocation-free.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{eval::PeerIdentity, Caveat, Problem};

/// A policy field and its `not` twin. Istio: "each field is a list (any may
/// match) with a `not` twin (none may match)"; an empty list constrains
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<T> {
    any_of: Box<[T]>,
    none_of: Box<[T]>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Self { any_of: Box::new([]), none_of: Box::new([]) }
    }
}

impl<T> Field<T> {
    /// A field with positive values `any_of` and negative values `none_of`.
    #[must_use]
    pub fn new(any_of: Vec<T>, none_of: Vec<T>) -> Self {
        Self { any_of: any_of.into(), none_of: none_of.into() }
    }

    /// Whether neither list has an entry (the field constrains nothing).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.any_of.is_empty() && self.none_of.is_empty()
    }

    /// True if some positive value (or none is listed) and no negative value
    /// satisfies `hit`. Like ztunnel's `matches_internal` (`src/rbac.rs`), an
    /// attribute the connection lacks (no peer identity) is a `hit` for no
    /// value: the positive list fails and the negative list passes.
    pub fn matches(&self, mut hit: impl FnMut(&T) -> bool) -> bool {
        (self.any_of.is_empty() || self.any_of.iter().any(&mut hit)) && !self.none_of.iter().any(hit)
    }
}

/// Istio's string match: "Exact match: `abc` will match on value `abc`.
/// Prefix match: `abc*` will match on value `abc` and `abcd`. Suffix match:
/// `*abc` will match on value `abc` and `xabc`. Presence match: `*` will match
/// when value is not empty." (`security/v1beta1/authorization_policy.proto`)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrMatch {
    /// The whole value.
    Exact(Box<str>),
    /// Values starting with this.
    Prefix(Box<str>),
    /// Values ending with this.
    Suffix(Box<str>),
    /// Any non-empty value.
    Presence,
}

impl StrMatch {
    /// Parses one pattern the way istiod's `stringToMatch` does (`*` alone,
    /// then a leading `*`, then a trailing `*`). A `*` anywhere else is
    /// compared literally, which the returned caveat points out.
    pub fn parse(value: &str) -> Result<(Self, Option<Caveat>), Problem> {
        let m = match value {
            "" => return Err(Problem::EmptyString),
            "*" => StrMatch::Presence,
            v if v.starts_with('*') => StrMatch::Suffix(v[1..].into()),
            v if v.ends_with('*') => StrMatch::Prefix(v[..v.len() - 1].into()),
            v => StrMatch::Exact(v.into()),
        };
        let literal = match &m {
            StrMatch::Exact(s) | StrMatch::Prefix(s) | StrMatch::Suffix(s) => s.contains('*'),
            StrMatch::Presence => false,
        };
        Ok((m, literal.then(|| Caveat::LiteralStar(value.to_owned()))))
    }

    /// Whether `value` matches.
    #[must_use]
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(s) => value == &**s,
            StrMatch::Prefix(s) => value.starts_with(&**s),
            StrMatch::Suffix(s) => value.ends_with(&**s),
            StrMatch::Presence => !value.is_empty(),
        }
    }
}

/// A `serviceAccounts` entry: the peer's namespace and service account, in
/// any trust domain (istiod's `stringToServiceAccountMatch`, ztunnel's
/// `ServiceAccountMatch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    namespace: Box<str>,
    name: Box<str>,
}

impl ServiceAccount {
    /// Parses `ns/sa`, or `sa` which means `policy_namespace/sa`.
    pub fn parse(value: &str, policy_namespace: &str) -> Result<Self, Problem> {
        if value.is_empty() {
            return Err(Problem::EmptyString);
        }
        let (ns, sa) = value.split_once('/').unwrap_or((policy_namespace, value));
        let ok = |s: &str| !s.is_empty() && !s.contains(['/', '*']);
        if ok(ns) && ok(sa) {
            Ok(Self { namespace: ns.into(), name: sa.into() })
        } else {
            Err(Problem::ServiceAccount(value.to_owned()))
        }
    }

    /// Whether `peer` runs as this service account.
    #[must_use]
    pub fn matches(&self, peer: &PeerIdentity) -> bool {
        peer.namespace() == &*self.namespace && peer.service_account() == &*self.name
    }
}

/// Parses an `ipBlocks` entry: a CIDR (host bits are masked, as Envoy's
/// `CidrRange` does) or a single IPv4/IPv6 address.
pub fn parse_ip_block(value: &str) -> Result<IpNet, Problem> {
    if value.is_empty() {
        return Err(Problem::EmptyString);
    }
    match value.parse::<IpNet>() {
        Ok(net) => Ok(net.trunc()),
        Err(source) => match value.parse::<IpAddr>() {
            Ok(addr) => Ok(IpNet::from(addr)),
            Err(_) => Err(Problem::IpBlock { value: value.to_owned(), source }),
        },
    }
}

/// A destination port or an inclusive range of ports (`"8000-8100"`, the
/// Cilium-style extension; Istio itself takes single ports only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// Parses `"8080"` or `"8000-8100"`; ports are 1–65535 and a range ascends.
    pub fn parse(value: &str) -> Result<Self, Problem> {
        let port = |s: &str| -> Option<u16> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse::<u16>().ok().filter(|p| *p != 0)
        };
        let range = match value.split_once('-') {
            None => port(value).map(|p| (p, p)),
            Some((a, b)) => port(a).zip(port(b)).filter(|(a, b)| a <= b),
        };
        match range {
            Some((first, last)) => Ok(Self { first, last }),
            None if value.is_empty() => Err(Problem::EmptyString),
            None => Err(Problem::Port(value.to_owned())),
        }
    }

    /// Whether `port` is in the range.
    #[must_use]
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_patterns_follow_istio_exact_prefix_suffix_and_presence() {
        let m = |p: &str, v: &str| StrMatch::parse(p).unwrap().0.matches(v);
        assert!(m("abc", "abc") && !m("abc", "abcd"));
        assert!(m("abc*", "abc") && m("abc*", "abcd") && !m("abc*", "xabc"));
        assert!(m("*abc", "abc") && m("*abc", "xabc") && !m("*abc", "abcd"));
        assert!(m("*", "x") && !m("*", ""));
    }

    #[test]
    fn a_star_in_the_middle_is_literal_and_flagged() {
        let (m, caveat) = StrMatch::parse("a*b").unwrap();
        assert!(m.matches("a*b") && !m.matches("axb"));
        assert_eq!(caveat, Some(Caveat::LiteralStar("a*b".into())));
        assert!(StrMatch::parse("").is_err());
    }

    #[test]
    fn ports_and_ranges_parse_only_within_1_to_65535() {
        let r = PortRange::parse("8000-8100").unwrap();
        assert!(r.contains(8000) && r.contains(8100) && !r.contains(8101));
        assert!(PortRange::parse("65535").unwrap().contains(65535));
        for bad in ["0", "65536", "-1", "+80", " 80", "80-", "-80", "9000-8000", "http", "1-2-3"] {
            assert!(matches!(PortRange::parse(bad), Err(Problem::Port(_))), "{bad}");
        }
        assert!(matches!(PortRange::parse(""), Err(Problem::EmptyString)));
    }

    #[test]
    fn ip_blocks_take_cidrs_and_single_addresses_of_both_families() {
        let net = parse_ip_block("10.1.2.3/8").unwrap();
        assert_eq!(net.to_string(), "10.0.0.0/8");
        assert!(parse_ip_block("10.1.2.3").unwrap().contains(&"10.1.2.3".parse::<IpAddr>().unwrap()));
        assert!(parse_ip_block("2001:db8::/32").unwrap().contains(&"2001:db8::1".parse::<IpAddr>().unwrap()));
        for bad in ["10.0.0.0/33", "10.0.0", "host.example", "::g"] {
            assert!(matches!(parse_ip_block(bad), Err(Problem::IpBlock { .. })), "{bad}");
        }
    }

    #[test]
    fn service_accounts_default_to_the_policy_namespace() {
        let peer = PeerIdentity::new("cluster.local", "demo", "web");
        assert!(ServiceAccount::parse("web", "demo").unwrap().matches(&peer));
        assert!(ServiceAccount::parse("demo/web", "other").unwrap().matches(&peer));
        assert!(!ServiceAccount::parse("web", "other").unwrap().matches(&peer));
        for bad in ["a/b/c", "/web", "demo/", "*", "demo/*"] {
            assert!(ServiceAccount::parse(bad, "demo").is_err(), "{bad}");
        }
    }

    #[test]
    fn a_field_needs_one_positive_and_no_negative_value() {
        let f = Field::new(vec![1, 2], vec![2]);
        assert!(f.matches(|v| *v == 1));
        assert!(!f.matches(|v| *v == 2));
        assert!(!f.matches(|v| *v == 3));
        assert!(Field::<u8>::default().matches(|_| false));
        assert!(Field::new(vec![], vec![1]).matches(|_| false));
    }
}
