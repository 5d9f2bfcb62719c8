//! Heddle's capture datapath: three small programs, one set per node.
//!
//! * `heddle_connect4` (`cgroup/connect4`): a TCP `connect()` from an enrolled
//!   pod's network namespace is rewritten to the agent's in-pod outbound
//!   listener (`127.0.0.1:15001` inside that namespace); the original
//!   destination is saved under the socket cookie.
//! * `heddle_sockops` (`sockops`): when a redirected connection is
//!   established, its saved destination is re-keyed by the client's
//!   (netns, address, port), which is what the agent sees on `accept()`.
//!   The entry is deleted when the client socket closes, so nothing leaks.
//! * `heddle_sk_lookup` (`sk_lookup`, attached per pod netns): a new TCP
//!   connection that arrives from outside the pod is assigned to the agent's
//!   in-pod inbound listener; the accepted socket keeps the original
//!   destination as its local address.
//!
//! Every decision has a named [`Reason`] with a per-CPU counter. Nothing is
//! logged on the per-connection path; `aya-log` is used only when a map is
//! full, which the operator must hear about.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        sk_action::{SK_DROP, SK_PASS},
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
    EbpfContext as _,
};
use aya_log_ebpf::warn;
use mesh_common::{
    capacity, ConnKey, EnrolledNetns, OrigDst, PendingConnect, Reason, AGENT_MARK, PORT_OUTBOUND, PORT_TUNNEL,
};

const AF_INET: u32 = 2;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// `lo` is interface 1 in every network namespace (`LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: u32 = 1;
/// `TCP_CLOSE` from include/net/tcp_states.h.
const TCP_CLOSE: u32 = 7;
/// cgroup/connect4 return value that lets the connect proceed.
const CONNECT_ALLOW: i32 = 1;

#[map(name = "HEDDLE_ENROLLED")]
static ENROLLED: HashMap<u64, EnrolledNetns> = HashMap::with_max_entries(capacity::ENROLLED_NETNS, 0);

#[map(name = "HEDDLE_PENDING")]
static PENDING: LruHashMap<u64, PendingConnect> = LruHashMap::with_max_entries(capacity::PENDING, 0);

#[map(name = "HEDDLE_ORIG_DST")]
static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::with_max_entries(capacity::ORIG_DST, 0);

#[map(name = "HEDDLE_INBOUND")]
static INBOUND_LISTENERS: SockHash<u32> = SockHash::with_max_entries(capacity::INBOUND, 0);

#[map(name = "HEDDLE_INBOUND_IPS")]
static INBOUND_ENROLLED: HashMap<u32, u32> = HashMap::with_max_entries(capacity::INBOUND, 0);

#[map(name = "HEDDLE_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

#[inline(always)]
fn count(reason: Reason) {
    if let Some(slot) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, and programs do not migrate CPUs mid-run.
        unsafe { *slot += 1 };
    }
}

/// `127.0.0.1` as it sits in `bpf_sock_addr.user_ip4` (network byte order).
const LOCALHOST_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

#[cgroup_sock_addr(connect4)]
pub fn heddle_connect4(ctx: SockAddrContext) -> i32 {
    let reason = try_connect4(&ctx);
    if reason == Reason::ConnectMapFull {
        warn!(&ctx, "heddle: pending-connect map full, connection not captured");
    }
    count(reason);
    // A capture failure never blocks the application's connect.
    CONNECT_ALLOW
}

fn try_connect4(ctx: &SockAddrContext) -> Reason {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for this program type.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return Reason::ConnectNotTcp;
    }
    match redirect(ctx, sa.__bindgen_anon_1, sa.user_ip4, sa.user_port) {
        Ok(()) => {
            sa.user_ip4 = LOCALHOST_BE;
            sa.user_port = u32::from(PORT_OUTBOUND.to_be());
            Reason::ConnectRedirected
        }
        Err(reason) => reason,
    }
}

/// Decides whether a connect to `dst_ip:port` (both network byte order) is
/// captured and, if so, saves its original destination. The caller rewrites.
#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    sk: aya_ebpf::bindings::bpf_sock_addr__bindgen_ty_1,
    dst_ip: u32,
    port: u32,
) -> Result<(), Reason> {
    if u32::from_be(dst_ip) >> 24 == 127 {
        return Err(Reason::ConnectLoopback);
    }
    // SAFETY: `sk` is always set (PTR_TO_SOCKET) for cgroup sock_addr hooks.
    let mark = unsafe { (*sk.sk).mark };
    if mark == AGENT_MARK {
        return Err(Reason::ConnectAgentMark);
    }
    // SAFETY: helper valid for cgroup sock_addr programs (Linux 5.7+).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only existence check.
    if unsafe { ENROLLED.get(&netns_cookie) }.is_none() {
        return Err(Reason::ConnectNotEnrolled);
    }
    // SAFETY: helper valid for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let pending = PendingConnect { netns_cookie, orig_dst: OrigDst { ip4: dst_ip, port: port as u16, pad: 0 } };
    PENDING.insert(&cookie, &pending, 0).map_err(|_| Reason::ConnectMapFull)
}

/// `::ffff:0:0/96` prefix word, network byte order.
const V4_MAPPED_BE: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// IPv4 connects made through dual-stack `AF_INET6` sockets (Java, many
/// runtimes) arrive here as IPv4-mapped addresses; without this hook they
/// would bypass the mesh.
#[cgroup_sock_addr(connect6)]
pub fn heddle_connect6(ctx: SockAddrContext) -> i32 {
    let reason = try_connect6(&ctx);
    if reason == Reason::ConnectMapFull {
        warn!(&ctx, "heddle: pending-connect map full, connection not captured");
    }
    count(reason);
    CONNECT_ALLOW
}

fn try_connect6(ctx: &SockAddrContext) -> Reason {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for this program type.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return Reason::ConnectNotTcp;
    }
    let (w0, w1, w2, w3) = (sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]);
    if w0 != 0 || w1 != 0 || w2 != V4_MAPPED_BE {
        return Reason::ConnectIpv6NotCaptured;
    }
    match redirect(ctx, sa.__bindgen_anon_1, w3, sa.user_port) {
        Ok(()) => {
            sa.user_ip6[3] = LOCALHOST_BE;
            sa.user_port = u32::from(PORT_OUTBOUND.to_be());
            Reason::ConnectRedirected
        }
        Err(reason) => reason,
    }
}

#[sock_ops]
pub fn heddle_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(&ctx),
        _ => {}
    }
    1
}

fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: helper valid for sock_ops programs.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// SYN about to be sent: ask for state callbacks on redirected sockets only,
/// so their map entries can be removed when they close, even if the
/// handshake never completes.
fn on_connect(ctx: &SockOpsContext) {
    let cookie = socket_cookie(ctx);
    // SAFETY: read-only existence check.
    if unsafe { PENDING.get(&cookie) }.is_some() {
        let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
        let _ = ctx.set_cb_flags(flags as i32);
    }
}

/// Client side established: its source port is now known. This runs before
/// the final ACK is sent, so the entry exists before the agent can accept.
fn on_established(ctx: &SockOpsContext) {
    let cookie = socket_cookie(ctx);
    // SAFETY: the value is copied out at once.
    let Some(pending) = (unsafe { PENDING.get(&cookie) }).copied() else {
        return;
    };
    let key = ConnKey {
        netns_cookie: pending.netns_cookie,
        src_ip4: ctx.local_ip4(),
        src_port: ctx.local_port() as u16,
        pad: 0,
    };
    if ORIG_DST.insert(&key, &pending.orig_dst, 0).is_ok() {
        count(Reason::SockopsRecorded);
    } else {
        warn!(ctx, "heddle: original-destination map full");
        count(Reason::SockopsMapFull);
    }
    let _ = PENDING.remove(&cookie);
}

/// A redirected client socket is closing: drop whatever is left of it.
fn on_state_change(ctx: &SockOpsContext) {
    if ctx.arg(1) != TCP_CLOSE {
        return;
    }
    let _ = PENDING.remove(&socket_cookie(ctx));
    let key = ConnKey {
        // SAFETY: helper valid for sock_ops programs (Linux 5.15+).
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        src_ip4: ctx.local_ip4(),
        src_port: ctx.local_port() as u16,
        pad: 0,
    };
    let _ = ORIG_DST.remove(&key);
}

#[sk_lookup]
pub fn heddle_sk_lookup(ctx: SkLookupContext) -> u32 {
    let (verdict, reason) = try_sk_lookup(&ctx);
    count(reason);
    verdict
}

fn try_sk_lookup(ctx: &SkLookupContext) -> (u32, Reason) {
    // SAFETY: the kernel passes a valid `bpf_sk_lookup` for this program type.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.family != AF_INET || lookup.protocol != IPPROTO_TCP {
        return (SK_PASS, Reason::LookupNotEnrolled);
    }
    // Pod-local traffic is not meshed. Over `lo`, and to a pod IP from the
    // pod itself: the kernel picks the destination as source for a local
    // route, so remote == local. The latter is how the agent's own
    // connections to the application (made inside the pod) stay unsteered.
    if lookup.ingress_ifindex == LOOPBACK_IFINDEX || lookup.remote_ip4 == lookup.local_ip4 {
        return (SK_PASS, Reason::LookupPodLocal);
    }
    if lookup.local_port == u32::from(PORT_TUNNEL) {
        return (SK_PASS, Reason::LookupTunnelPort);
    }
    let pod_ip = lookup.local_ip4;
    if INBOUND_LISTENERS.redirect_sk_lookup(ctx, pod_ip, 0).is_ok() {
        return (SK_PASS, Reason::LookupSteered);
    }
    // SAFETY: read-only existence check.
    if unsafe { INBOUND_ENROLLED.get(&pod_ip) }.is_some() {
        // Enrolled but no listener: the agent is down. Refuse rather than
        // deliver around the mesh (fail closed).
        return (SK_DROP, Reason::LookupRefusedNoListener);
    }
    (SK_PASS, Reason::LookupNotEnrolled)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
