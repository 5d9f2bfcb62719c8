//! The mesh CA's two decisions, behind traits so the local mode and the
//! Kubernetes mode share one server ([`super::ca_server`]):
//!
//! * [`NodeAuthenticator`]: who is asking (its bearer token to a
//!   [`Caller`]): a node agent, or in Kubernetes mode also a waypoint pod
//!   with its own service account's token. Local mode: [`NodeTokens`], one
//!   token file per node. Kubernetes mode: a `TokenReview` of the caller's
//!   projected service-account token (`k8s::ca_auth`).
//! * [`IdentityAuthorizer`]: may that caller have a certificate for that
//!   identity: for a node, does a workload with that namespace and service
//!   account run on it; for a waypoint pod, is it its own identity and is
//!   the pod a running waypoint on the node its token is bound to. Local
//!   mode: [`ConfigFile`], the configuration re-read per request (nodes
//!   only). Kubernetes mode: the API's pods (`k8s::ca_auth`).
//!
//! Both fail closed: a source that cannot be consulted is
//! [`CaAuthError::Unavailable`] (503), never a grant.

use std::{
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use hyper::StatusCode;

use super::{ca_client::BoxFuture, SpiffeId};
use crate::config;

/// Why a certificate request is not granted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaAuthError {
    /// The requester could not be authenticated (401).
    #[error("{0}")]
    Unauthenticated(String),
    /// The requester is known but may not have this identity (403); the
    /// message names the node and the identity.
    #[error("{0}")]
    Forbidden(String),
    /// The source of truth could not be consulted (503): fail closed.
    #[error("{0}")]
    Unavailable(String),
}

impl CaAuthError {
    /// The HTTP status the CA answers with.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Who asks the CA for a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node agent, for the workloads scheduled on its node.
    Node(String),
    /// A waypoint pod with its own service account's token (Kubernetes
    /// mode), for that account's identity only.
    Waypoint {
        /// The node its token is bound to.
        node: String,
        /// The pod's namespace.
        namespace: String,
        /// The pod its token is bound to.
        pod: String,
        /// Its service account.
        service_account: String,
    },
}

impl Caller {
    /// The node the caller runs on.
    #[must_use]
    pub fn node(&self) -> &str {
        match self {
            Self::Node(node) | Self::Waypoint { node, .. } => node,
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Node(node) => write!(f, "node {node}"),
            Self::Waypoint { node, namespace, pod, .. } => write!(f, "waypoint pod {namespace}/{pod} on node {node}"),
        }
    }
}

/// Turns a bearer token into who holds it.
pub trait NodeAuthenticator: Send + Sync {
    /// The caller that `bearer` authenticates, or why not.
    fn authenticate<'a>(&'a self, bearer: &'a str) -> BoxFuture<'a, Result<Caller, CaAuthError>>;
}

/// Decides whether a caller may obtain a certificate for `identity`.
pub trait IdentityAuthorizer: Send + Sync {
    /// `Ok(())` if `caller` may hold `identity`.
    fn authorize<'a>(&'a self, caller: &'a Caller, identity: &'a SpiffeId) -> BoxFuture<'a, Result<(), CaAuthError>>;
}

/// The refusal every authorizer gives when no workload matches.
#[must_use]
pub fn not_scheduled(node: &str, identity: &SpiffeId) -> CaAuthError {
    CaAuthError::Forbidden(format!("no workload with identity {identity} is scheduled on node {node}"))
}

/// Local mode: a token per node in `<state-dir>/nodes/<node>.token`.
#[derive(Clone, Debug)]
pub struct NodeTokens {
    state_dir: PathBuf,
}

impl NodeTokens {
    /// Tokens kept under `state_dir`.
    #[must_use]
    pub fn new(state_dir: &Path) -> Self {
        Self { state_dir: state_dir.to_owned() }
    }

    /// Creates the token of `node` (mode 0600) unless it exists.
    pub fn ensure(&self, node: &str) -> std::io::Result<()> {
        let dir = self.state_dir.join("nodes");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let path = token_path(&self.state_dir, node);
        if path.exists() {
            return Ok(());
        }
        let token = super::tls::hex(&rand::random::<[u8; 32]>());
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        std::io::Write::write_all(&mut f, token.as_bytes())
    }

    /// The node whose token this is, comparing in constant time.
    fn lookup(&self, bearer: &str) -> Option<String> {
        let entries = std::fs::read_dir(self.state_dir.join("nodes")).ok()?;
        entries.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().strip_suffix(".token")?.to_owned();
            let token = std::fs::read_to_string(e.path()).ok()?;
            constant_time_eq(token.trim().as_bytes(), bearer.as_bytes()).then_some(name)
        })
    }
}

/// Where the token of `node` is kept.
#[must_use]
pub fn token_path(state_dir: &Path, node: &str) -> PathBuf {
    state_dir.join("nodes").join(format!("{node}.token"))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl NodeAuthenticator for NodeTokens {
    fn authenticate<'a>(&'a self, bearer: &'a str) -> BoxFuture<'a, Result<Caller, CaAuthError>> {
        Box::pin(async move {
            self.lookup(bearer)
                .map(Caller::Node)
                .ok_or_else(|| CaAuthError::Unauthenticated("unknown node token".to_owned()))
        })
    }
}

/// Local mode: the workloads of the configuration file, re-read per request.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    path: PathBuf,
    trust_domain: String,
}

impl ConfigFile {
    /// Authorizes from the configuration at `path`.
    #[must_use]
    pub fn new(path: &Path, trust_domain: &str) -> Self {
        Self { path: path.to_owned(), trust_domain: trust_domain.to_owned() }
    }
}

impl IdentityAuthorizer for ConfigFile {
    fn authorize<'a>(&'a self, caller: &'a Caller, identity: &'a SpiffeId) -> BoxFuture<'a, Result<(), CaAuthError>> {
        Box::pin(async move {
            let Caller::Node(node) = caller else {
                return Err(CaAuthError::Forbidden(format!("{caller}: only node agents hold tokens in local mode")));
            };
            let cfg = config::load(&self.path)
                .map_err(|e| CaAuthError::Unavailable(format!("configuration unavailable: {e}")))?;
            let scheduled = cfg.workloads.iter().any(|w| {
                w.node == *node && SpiffeId::new(&self.trust_domain, &w.namespace, &w.service_account) == *identity
            });
            if scheduled {
                Ok(())
            } else {
                Err(not_scheduled(node, identity))
            }
        })
    }
}
