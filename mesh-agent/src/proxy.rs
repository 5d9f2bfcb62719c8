//! The forwarding legs: accept loops for the in-pod outbound and inbound
//! listeners, and the splice between the accepted and the upstream socket.
//!
//! Each accepted connection runs in its own task, tracked by the agent's
//! [`TaskTracker`] so shutdown can drain them. In this issue the upstream leg
//! goes from inside the pod's network namespace (so it keeps the pod's IP as
//! its source): through an HBONE mTLS tunnel (`hbone`, served by `tunnel` on
//! the destination pod's port 15008) when the destination is an enrolled
//! workload, in plaintext otherwise. Each leg reads the TCP health of its
//! network-facing socket for the flow records (`tcp_health`).

pub mod h2splice;
pub mod handshakes;
pub mod hbone;
pub mod inbound;
pub mod local_ports;
pub mod outbound;
pub mod sockets;
pub mod splice;
pub mod tcp_health;
pub mod to_waypoint;
pub mod tunnel;

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    datapath::Datapath,
    flows::FlowLog,
    netns::Netns,
    registry::{ObjectRef, SharedRegistry},
};

/// What every connection handler needs.
pub struct ProxyContext {
    /// Map access (original destinations).
    pub datapath: Arc<Datapath>,
    /// Flow records and counters.
    pub flows: Arc<FlowLog>,
    /// The latest registry.
    pub registry: watch::Receiver<SharedRegistry>,
    /// Tracks connection tasks for draining at shutdown.
    pub tracker: TaskTracker,
    /// mTLS tunnelling; `None` when no CA is configured (plaintext mode).
    pub mesh: Option<Arc<hbone::Mesh>>,
    /// Authorization of inbound connections and the live-connection table.
    pub authz: Arc<crate::authz::Authorizer>,
    /// Fired when the agent stops accepting (handover or exit): tunnel
    /// connections send `GOAWAY`, so sources open new streams elsewhere.
    pub draining: CancellationToken,
    /// Fired at the drain deadline: connections still open end cleanly
    /// (FIN, `END_STREAM`), not with a reset.
    pub closing: CancellationToken,
}

/// An enrolled pod, as the proxy legs see it.
pub struct Pod {
    /// Namespace and name.
    pub id: ObjectRef,
    /// Its network namespace.
    pub netns: Netns,
    /// Its network namespace cookie.
    pub cookie: u64,
    /// Its IPs.
    pub ips: Vec<std::net::IpAddr>,
    /// Its identity.
    pub identity: crate::identity::SpiffeId,
    /// Source ports for deliveries to its own addresses.
    pub local_ports: local_ports::LocalPorts,
}

impl Pod {
    /// Connects to `addr` for the pod: from the port pool when `addr` is
    /// one of the pod's own addresses (a delivery to the application),
    /// from a kernel-chosen port otherwise.
    ///
    /// # Errors
    /// As [`sockets::connect_in`].
    pub async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, sockets::SocketError> {
        if self.ips.contains(&addr.ip()) {
            self.local_ports.connect(&self.netns, addr).await
        } else {
            sockets::connect_in(&self.netns, addr).await
        }
    }
}

/// Authorizes a connection to an enrolled pod: the decision's mark goes
/// into `info`; a denial is recorded in the flows and returned as its text
/// (the caller resets the client, or refuses the tunnel stream).
fn authorize(
    ctx: &ProxyContext,
    conn: u64,
    facts: crate::authz::ConnFacts,
    info: &mut crate::flows::ConnInfo,
) -> Result<crate::authz::Admitted, String> {
    match ctx.authz.admit(conn, facts) {
        Ok(admitted) => {
            info.policy = admitted.permit.mark();
            Ok(admitted)
        }
        Err(denial) => {
            tracing::debug!(pod = %info.workload, src = ?info.src, dst = ?info.orig_dst, reason = %denial, "connection denied");
            info.policy = denial.mark();
            let text = denial.to_string();
            ctx.flows.failed(conn, info, text.clone());
            Err(text)
        }
    }
}

/// Accepts until `stop` fires, handing each connection to `spawn`
/// ([`crate::accept::next`] retries accept errors).
async fn accept_loop<F, T>(
    listener: TcpListener,
    stop: CancellationToken,
    leg: &'static str,
    pod: &ObjectRef,
    mut spawn: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> T,
{
    let name = format!("{leg} of {pod}");
    while let Some((stream, peer)) = crate::accept::next(&listener, &name, &stop).await {
        let _ = stream.set_nodelay(true);
        drop(spawn(stream, peer));
    }
    tracing::debug!(%pod, leg, "listener closed");
}
