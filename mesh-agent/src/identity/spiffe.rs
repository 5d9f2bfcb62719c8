//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::{fmt, str::FromStr};

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
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
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// Trust domain.
    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Namespace.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Service account.
    #[must_use]
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The form Istio policies match principals against: without `spiffe://`.
    #[must_use]
    pub fn principal(&self) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

impl FromStr for SpiffeId {
    type Err = ParseSpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseSpiffeIdError { input: s.to_owned() };
        let rest = s.strip_prefix("spiffe://").ok_or_else(err)?;
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
    }

    #[test]
    fn rejects_ids_that_are_not_workload_ids() {
        for bad in ["cluster.local/ns/a/sa/b", "spiffe://td/ns/a", "spiffe://td/ns//sa/b", "spiffe://td/ns/a/sa/b/c"] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
