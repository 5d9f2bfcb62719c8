//! The ABI between Heddle's eBPF programs (`mesh-ebpf`) and its node agent
//! (`mesh-agent`).
//!
//! Everything that crosses the kernel boundary is defined here once: map
//! names, key and value layouts, the agent's socket mark, reserved ports and
//! the named reasons behind every datapath decision. Each type is `#[repr(C)]`,
//! `Copy`, has explicit padding (so no uninitialised bytes reach a map key) and
//! a compile-time size assertion. Byte order is documented per field; the
//! rule is: addresses and ports are kept in the byte order the kernel hands
//! them to the program in, and converted only in the agent.
#![no_std]

/// Socket mark (`SO_MARK`) carried by every socket the agent opens inside a
/// pod's network namespace. The connect hook never redirects a socket with
/// this mark, so the agent's own upstream connections cannot loop back into
/// it. Same value as ztunnel's, so existing tooling recognises it.
pub const AGENT_MARK: u32 = 0x539;

/// Agent admin API (health, workloads, flows); bound to localhost of the node.
pub const PORT_ADMIN: u16 = 15000;
/// In-pod outbound listener (127.0.0.1 inside each enrolled pod).
pub const PORT_OUTBOUND: u16 = 15001;
/// In-pod inbound plaintext listener (127.0.0.1 inside each enrolled pod).
pub const PORT_INBOUND: u16 = 15006;
/// HBONE tunnel port on each enrolled pod's IP. Never steered by `sk_lookup`.
pub const PORT_TUNNEL: u16 = 15008;
/// Metrics and health endpoint (later issue).
pub const PORT_METRICS: u16 = 15020;

/// Map names, shared by both sides so they can never drift apart.
pub mod maps {
    /// `HashMap<u64 netns cookie, EnrolledNetns>`: enrolled pod network namespaces.
    pub const ENROLLED_NETNS: &str = "HEDDLE_ENROLLED";
    /// `LruHashMap<u64 socket cookie, PendingConnect>`: connects rewritten by
    /// `connect4`, waiting for the handshake to learn their source port.
    pub const PENDING: &str = "HEDDLE_PENDING";
    /// `LruHashMap<ConnKey, OrigDst>`: original destinations of redirected
    /// connections, keyed by the client's address; taken by the agent on accept.
    pub const ORIG_DST: &str = "HEDDLE_ORIG_DST";
    /// `SockHash<u32 pod IPv4, listener>`: the agent's in-pod inbound listeners.
    pub const INBOUND_LISTENERS: &str = "HEDDLE_INBOUND";
    /// `HashMap<u32 pod IPv4, u32>`: pod IPs whose inbound is captured. A pod
    /// listed here whose listener is missing (agent down) has its inbound
    /// connections refused rather than delivered around the mesh.
    pub const INBOUND_ENROLLED: &str = "HEDDLE_INBOUND_IPS";
    /// `PerCpuArray<u64>` indexed by [`super::Reason`].
    pub const STATS: &str = "HEDDLE_STATS";
}

/// Capacity of the maps, chosen for a node; the agent reports occupancy.
pub mod capacity {
    /// Enrolled pod network namespaces per node.
    pub const ENROLLED_NETNS: u32 = 4096;
    /// In-flight redirected connects (between `connect()` and the handshake).
    pub const PENDING: u32 = 65_536;
    /// Redirected connections not yet accepted by the agent.
    pub const ORIG_DST: u32 = 65_536;
    /// Enrolled pod IPs.
    pub const INBOUND: u32 = 8192;
}

/// Value of [`maps::ENROLLED_NETNS`]. `flags` is reserved (inbound mode, later).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledNetns {
    /// Reserved, zero.
    pub flags: u32,
    /// Explicit padding, zero.
    pub pad: u32,
}

/// An IPv4 socket address as the kernel gives it to cgroup hooks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigDst {
    /// IPv4 address, network byte order (as in `bpf_sock_addr.user_ip4`).
    pub ip4: u32,
    /// TCP port, network byte order in the low 16 bits.
    pub port: u16,
    /// Explicit padding, zero.
    pub pad: u16,
}

/// Value of [`maps::PENDING`]: what `connect4` saved for a socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingConnect {
    /// Cookie of the client's network namespace.
    pub netns_cookie: u64,
    /// The destination the application asked for.
    pub orig_dst: OrigDst,
}

/// Key of [`maps::ORIG_DST`]: a client socket, as the agent sees the peer of
/// the connection it accepted in a given pod network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Cookie of the client's network namespace.
    pub netns_cookie: u64,
    /// Client IPv4 address, network byte order.
    pub src_ip4: u32,
    /// Client port, host byte order.
    pub src_port: u16,
    /// Explicit padding, zero.
    pub pad: u16,
}

/// Why a datapath program did what it did. Each reason is a slot in the
/// per-CPU [`maps::STATS`] array, shown by the agent.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `connect4`: rewritten to the agent's outbound listener.
    ConnectRedirected = 0,
    /// `connect4`: the socket's netns is not enrolled.
    ConnectNotEnrolled = 1,
    /// `connect4`: not a TCP socket.
    ConnectNotTcp = 2,
    /// `connect4`: destination in 127.0.0.0/8 (pod-local traffic is not meshed).
    ConnectLoopback = 3,
    /// `connect4`: the socket carries [`AGENT_MARK`] (the agent's own connection).
    ConnectAgentMark = 4,
    /// `connect4`: the pending map was full; the connect goes direct.
    ConnectMapFull = 5,
    /// `sock_ops`: a redirected connection's client address was recorded.
    SockopsRecorded = 6,
    /// `sock_ops`: recording the client address failed (map full).
    SockopsMapFull = 7,
    /// `sk_lookup`: steered to the agent's inbound listener.
    LookupSteered = 8,
    /// `sk_lookup`: pod-local (over loopback, or from the pod's own IP; this
    /// includes the agent's own connections to the application).
    LookupPodLocal = 9,
    /// `sk_lookup`: addressed to the tunnel port.
    LookupTunnelPort = 10,
    /// `sk_lookup`: refused because the pod is enrolled but its inbound
    /// listener is gone (agent down): fail closed.
    LookupRefusedNoListener = 11,
    /// `sk_lookup`: destination IP not enrolled (or not IPv4 TCP).
    LookupNotEnrolled = 12,
    /// `connect6`: a native IPv6 destination (IPv6 capture is not built yet;
    /// IPv4-mapped destinations are captured like `connect4`).
    ConnectIpv6NotCaptured = 13,
}

impl Reason {
    /// Number of reasons, the length of the stats array.
    pub const COUNT: u32 = 14;

    /// Every reason, in index order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::ConnectRedirected,
        Reason::ConnectNotEnrolled,
        Reason::ConnectNotTcp,
        Reason::ConnectLoopback,
        Reason::ConnectAgentMark,
        Reason::ConnectMapFull,
        Reason::SockopsRecorded,
        Reason::SockopsMapFull,
        Reason::LookupSteered,
        Reason::LookupPodLocal,
        Reason::LookupTunnelPort,
        Reason::LookupRefusedNoListener,
        Reason::LookupNotEnrolled,
        Reason::ConnectIpv6NotCaptured,
    ];

    /// Stable `snake_case` name, used as a metric label and in the admin API.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Reason::ConnectRedirected => "connect_redirected",
            Reason::ConnectNotEnrolled => "connect_not_enrolled",
            Reason::ConnectNotTcp => "connect_not_tcp",
            Reason::ConnectLoopback => "connect_loopback",
            Reason::ConnectAgentMark => "connect_agent_mark",
            Reason::ConnectMapFull => "connect_map_full",
            Reason::SockopsRecorded => "sockops_recorded",
            Reason::SockopsMapFull => "sockops_map_full",
            Reason::LookupSteered => "lookup_steered",
            Reason::LookupPodLocal => "lookup_pod_local",
            Reason::LookupTunnelPort => "lookup_tunnel_port",
            Reason::LookupRefusedNoListener => "lookup_refused_no_listener",
            Reason::LookupNotEnrolled => "lookup_not_enrolled",
            Reason::ConnectIpv6NotCaptured => "connect_ipv6_not_captured",
        }
    }
}

const _: () = assert!(core::mem::size_of::<EnrolledNetns>() == 8);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 8);
const _: () = assert!(core::mem::size_of::<PendingConnect>() == 16);
const _: () = assert!(core::mem::size_of::<ConnKey>() == 16);
const _: () = assert!(Reason::ALL.len() == Reason::COUNT as usize);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all four are `repr(C)`, `Copy`, made only of integers with
    // explicit padding fields, so every bit pattern is valid and no byte is
    // uninitialised.
    unsafe impl aya::Pod for super::EnrolledNetns {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PendingConnect {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn reasons_are_indexed_in_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{} out of place", r.name());
        }
    }
}
