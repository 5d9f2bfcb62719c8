//! Outbound to a waypoint: a connection whose destination (a service VIP,
//! or a pod of a service) is owned by a waypoint goes to one of the
//! waypoint's pods through the same HBONE tunnel, as the client's own
//! identity, with `CONNECT <original destination>`; the waypoint picks the
//! endpoint per request. The tunnel checks the waypoint pod's SPIFFE ID.
//!
//! A waypoint without a running pod fails the connection (reset, flow
//! error): traffic the waypoint owns never bypasses it.

use std::{net::SocketAddr, time::Instant};

use tokio::net::TcpStream;

use super::{
    hbone::Mesh,
    outbound::{fail, record_close, splice_tunnelled},
    Pod, ProxyContext,
};
use crate::{
    flows::{ConnInfo, Security},
    registry::ObjectRef,
};

/// Forwards `client` (accepted from `peer`, facts in `info`) to `waypoint`.
#[allow(clippy::too_many_arguments)] // the connection's facts, passed once
pub async fn forward(
    client: TcpStream,
    peer: SocketAddr,
    pod: &Pod,
    ctx: &ProxyContext,
    mesh: &Mesh,
    conn: u64,
    mut info: ConnInfo,
    waypoint: ObjectRef,
) {
    let Some(orig) = info.orig_dst else { return };
    let picked = {
        let reg = ctx.registry.borrow();
        info.service = reg.service_by_vip(orig.ip()).map(|s| s.id.clone());
        reg.waypoint_pod(&waypoint, orig.ip())
    };
    info.waypoint = Some(waypoint.to_string().into());
    info.security = Security::MutualTls;
    let (via, via_id) = match picked {
        Ok(p) => p,
        Err(e) => return fail(ctx, conn, &info, client, &e),
    };
    info.dst = Some(SocketAddr::new(via, mesh_common::PORT_TUNNEL));
    info.dst_identity = Some(via_id.name());
    let started = Instant::now();
    match mesh.connect_via(pod, &pod.identity, via, &via_id, orig, info.trace.as_ref()).await {
        Ok(tunnelled) => {
            let (done, health) = splice_tunnelled(client, peer, pod, ctx, conn, &mut info, started, tunnelled).await;
            record_close(ctx, conn, &mut info, done, health, started);
        }
        Err(e) => {
            info.policy.denied = e.reason() == "denied";
            fail(ctx, conn, &info, client, &e);
        }
    }
}
