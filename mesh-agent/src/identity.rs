//! Workload identity: SPIFFE IDs, the mesh CA, certificates held by the
//! node agent, and the rustls configurations that authenticate peers by
//! their SPIFFE URI SAN (never by DNS name).
//!
//! Invariants: a workload's private key is generated on its node and never
//! leaves it (only a CSR does); the CA's key never leaves the CA; a peer is
//! accepted only if its chain verifies against the trust bundle *and* its
//! URI SAN is the identity expected for that connection.

pub mod authority;
pub mod bundle;
pub mod ca_auth;
pub mod ca_client;
pub mod ca_server;
pub mod certs;
pub mod spiffe;
pub mod tls;

pub use spiffe::SpiffeId;

#[cfg(test)]
mod tests;
