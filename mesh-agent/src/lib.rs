//! Heddle's node agent: transparent capture of enrolled pods' TCP connections
//! with eBPF, and their forwarding. See ARCHITECTURE.md for the data path.
//!
//! Modules, one concern each: [`config`] (the local file), [`registry`] (the
//! cluster view), [`netns`] (namespaces and in-pod sockets), [`datapath`]
//! (eBPF programs and maps), [`capture`] (enrollment), [`proxy`] (the
//! forwarding legs), [`policy`] (the authorization policy engine), [`authz`]
//! (enforcing it on inbound connections), [`flows`] (records and counters),
//! [`admin`] (the admin API), [`agent`] (the composition root).

pub mod accept;
pub mod access_log;
pub mod admin;
pub mod agent;
pub mod authz;
pub mod capture;
pub mod chance;
pub mod cli_agent;
pub mod cli_flows;
pub mod cli_routes;
pub mod cli_stat;
pub mod config;
pub mod datapath;
pub mod flow_filter;
pub mod flows;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod handover;
pub mod http_server;
pub mod identity;
pub mod k8s;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod registry;
pub mod state_file;
pub mod trace;
pub mod waypoint;

#[cfg(test)]
mod hostile_input;
