//! Non-HTTP traffic on a waypoint's service: passed through as L4 to one
//! endpoint (round robin, the node agents' resolution) over HBONE as the
//! waypoint's identity, with the reason it was not treated as HTTP in the
//! flow record.

use std::{net::SocketAddr, time::Instant};

use tokio::io::{AsyncRead, AsyncWrite};

use super::{h2io::H2Io, State};
use crate::{
    flows::{ConnInfo, Direction, Security},
    identity::SpiffeId,
    registry::ObjectRef,
};

/// Splices `client` to an endpoint of `target` (a VIP or a pod address).
pub async fn run<T: AsyncRead + AsyncWrite + Unpin>(
    mut client: T,
    peer: SocketAddr,
    client_id: &SpiffeId,
    target: SocketAddr,
    service: Option<ObjectRef>,
    reason: &'static str,
    state: &State,
) {
    let conn = state.telemetry.flows.conn_id();
    let mut info = ConnInfo::new(Direction::Inbound, state.me.id.clone());
    info.src = Some(peer);
    info.orig_dst = Some(target);
    info.security = Security::MutualTls;
    info.src_identity = Some(client_id.name());
    info.waypoint = Some(state.waypoint_name.clone());
    let (policy, verdict) = super::authz::check_connection(state, peer, client_id, target, service.as_ref());
    info.service = service;
    info.passthrough = Some(reason.to_owned());
    info.policy = policy;
    if let Err(why) = verdict {
        return state.telemetry.flows.failed(conn, &info, why);
    }
    let resolved = {
        let reg = state.registry.borrow();
        reg.resolve(target).map(|r| {
            let id = r.workload.as_ref().and_then(|w| reg.workload(w)).map(|w| w.identity.clone());
            (r.addr, id)
        })
    };
    let (addr, identity) = match resolved {
        Ok((addr, Some(id))) => (addr, id),
        Ok((addr, None)) => {
            let why = format!("{addr} is not a mesh workload");
            return state.telemetry.flows.failed(conn, &info, why);
        }
        Err(e) => return state.telemetry.flows.failed(conn, &info, e.to_string()),
    };
    info.dst = Some(addr);
    info.dst_identity = Some(identity.name());
    let started = Instant::now();
    let tunnelled = match state.mesh.connect(&state.me, &state.me_identity, addr, &identity, None).await {
        Ok(t) => t,
        Err(e) => return state.telemetry.flows.failed(conn, &info, e.to_string()),
    };
    info.connect = Some(started.elapsed());
    state.telemetry.flows.opened(conn, &info);
    let mut upstream = H2Io::new(tunnelled.stream);
    let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    let (bytes, error) = match result {
        Ok(b) => (b, None),
        Err(e) => {
            tracing::debug!(%peer, upstream = %addr, error = %e, "passthrough ended with an error");
            ((0, 0), Some(e.to_string()))
        }
    };
    state.telemetry.flows.closed(conn, &info, bytes, started.elapsed(), error);
}
