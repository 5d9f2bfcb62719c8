//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::{cmp::Ordering, fmt, hash, str::FromStr, sync::Arc};

const SCHEME: &str = "spiffe://";

/// A workload identity. Kept as its URI, shared: cloning one (every
/// connection and request names its peers) is a reference count, and
/// [`SpiffeId::name`] hands the same string to flow records.
#[derive(Clone)]
pub struct SpiffeId {
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    uri: Arc<str>,
    /// Where the trust domain ends in `uri`.
    td_end: usize,
    /// Where the namespace ends in `uri`.
    ns_end: usize,
}

/// Why a string is not a workload SPIFFE ID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?} is not a workload SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")]
pub struct ParseSpiffeIdError {
    input: String,
}

impl SpiffeId {
    /// The identity of service account `sa` in `namespace`.
    #[must_use]
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        let td_end = SCHEME.len() + trust_domain.len();
        let ns_end = td_end + "/ns/".len() + namespace.len();
        Self { uri: uri.into(), td_end, ns_end }
    }

    /// Trust domain.
    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end]
    }

    /// Namespace.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.uri[self.td_end + "/ns/".len()..self.ns_end]
    }

    /// Service account.
    #[must_use]
    pub fn service_account(&self) -> &str {
        &self.uri[self.ns_end + "/sa/".len()..]
    }

    /// The URI as a shared string (no copy).
    #[must_use]
    pub fn name(&self) -> Arc<str> {
        self.uri.clone()
    }

    fn parts(&self) -> (&str, &str, &str) {
        (self.trust_domain(), self.namespace(), self.service_account())
    }

    /// The form Istio policies match principals against: without `spiffe://`.
    #[must_use]
    pub fn principal(&self) -> String {
        self.uri[SCHEME.len()..].to_owned()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SpiffeId").field(&&*self.uri).finish()
    }
}

impl PartialEq for SpiffeId {
    fn eq(&self, other: &Self) -> bool {
        self.uri == other.uri
    }
}

impl Eq for SpiffeId {}

impl hash::Hash for SpiffeId {
    fn hash<H: hash::Hasher>(&self, state: &mut H) {
        self.uri.hash(state);
    }
}

/// By trust domain, then namespace, then service account (as the fields
/// compared before the URI was shared).
impl Ord for SpiffeId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.parts().cmp(&other.parts())
    }
}

impl PartialOrd for SpiffeId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl FromStr for SpiffeId {
    type Err = ParseSpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseSpiffeIdError { input: s.to_owned() };
        let rest = s.strip_prefix(SCHEME).ok_or_else(err)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => Ok(Self::new(td, ns, sa)),
            _ => Err(err()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_workload_id() {
        let id: SpiffeId = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        assert_eq!(id.namespace(), "demo");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.principal(), "cluster.local/ns/demo/sa/web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/demo/sa/web");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(&*id.name(), "spiffe://cluster.local/ns/demo/sa/web");
        assert_eq!(id, SpiffeId::new("cluster.local", "demo", "web"));
    }

    #[test]
    fn orders_by_trust_domain_then_namespace_then_account() {
        let ids = [SpiffeId::new("a", "z", "z"), SpiffeId::new("a.b", "a", "a"), SpiffeId::new("a", "z", "zz")];
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, [ids[0].clone(), ids[2].clone(), ids[1].clone()]);
    }

    #[test]
    fn rejects_ids_that_are_not_workload_ids() {
        for bad in ["cluster.local/ns/a/sa/b", "spiffe://td/ns/a", "spiffe://td/ns//sa/b", "spiffe://td/ns/a/sa/b/c"] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
