//! Heddle's network-namespace test bed.
//!
//! Builds a small isolated cluster on one machine — nodes and pods as
//! network namespaces, each with its own cgroup v2 directory — writes the
//! cluster config the node agents read, runs `mesh-agent` per node and reads
//! its admin API as typed values. With [`Testbed::start_ca`] it also runs
//! the mesh CA, so the agents tunnel mesh traffic over mTLS;
//! [`Testbed::set_policies`] changes the authorization policies every agent
//! enforces (each agent reads the test bed's policies file), and
//! [`Testbed::capture_link`] shows what crosses the link between nodes
//! ([`wire`]). The end-to-end tests (`tests/`) and the demo binary are
//! built on it.
//!
//! ```no_run
//! use heddle_tests::{ClientSpec, PodSpec, Testbed};
//! # fn main() -> Result<(), heddle_tests::TestbedError> {
//! let tb = Testbed::new("example")?;
//! let a = tb.add_node("node-a")?;
//! let b = tb.add_node("node-b")?;
//! let client = tb.add_pod(&a, PodSpec::new("client").enrolled(true))?;
//! let server = tb.add_pod(&b, PodSpec::new("server").enrolled(true))?;
//! let _echo = server.start_echo(8080)?;
//! let agents = tb.start_agents(&[&a, &b])?;
//! let summary = client.run_client(&ClientSpec::to(server.addr(8080)))?;
//! assert!(summary.all_ok());
//! println!("{:?}", agents[0].flows()?);
//! # Ok(()) }
//! ```
//!
//! Safety of the host: nothing is created in the root network namespace,
//! nodes have no default route and pods route only to their node, so no
//! test traffic can leave the machine. Everything a test bed creates is
//! removed when it is dropped (see [`teardown`]).

pub mod admin;
pub mod agent;
pub mod apiserver;
pub mod bookinfo;
pub mod ca;
pub mod cgroup;
pub mod churn;
pub mod config;
mod daemon;
pub mod delay_line;
pub mod env;
pub mod error;
mod exec;
pub mod flow_stream;
pub mod handles;
pub mod httpapp;
pub mod kube_ca;
pub mod network;
pub mod podapp;
pub mod procfs;
pub mod report;
pub mod spec;
pub mod teardown;
pub mod testbed;
pub mod wait;
pub mod waypoint;
pub mod wire;

pub use admin::{
    Certificate, Certs, Datapath, Direction, Flow, FlowEvent, MapOccupancy, Policies, Security, Stats, Verdict,
    Workload,
};
pub use agent::Agent;
pub use ca::{Ca, CaOptions, CA_PORT};
pub use config::InboundMode;
pub use delay_line::{DelayLine, DelaySpec};
pub use env::{agent_binary, check_environment, find_tool, heddle_binary, pod_app_binary, require_tool, Tool};
pub use error::{Result, TestbedError};
pub use exec::Process;
pub use flow_stream::FlowStreamClient;
pub use handles::{BackgroundClient, Node, Pod};
pub use podapp::{ClientSpec, ClientSummary};
pub use spec::{PodSpec, ServiceSpec};
pub use testbed::{KubernetesMode, TeardownHandle, Testbed};
pub use wait::{poll_until, Check};
pub use wire::{WireCapture, WireReport};

/// The port of the HBONE mTLS tunnel on every enrolled pod.
pub const TUNNEL_PORT: u16 = 15008;
