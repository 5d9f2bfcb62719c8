//! Building the test bed's isolated network with `ip`.
//!
//! Addressing plan (node index `i` starts at 1, pod host `k` at 2):
//! ```text
//! switch netns  ht-<id>--sw    bridge br0, one port n<i> per node, no IP
//! node netns    ht-<id>-<node> eth0 10.250.0.<i>/24 (to the switch)
//!                              br0  10.44.<i>.1/24 (pod gateway), ports p<k>
//!                              10.44.<j>.0/24 via 10.250.0.<j> per other node
//! pod netns     ht-<id>-<pod>  eth0 10.44.<i>.<k>/24, default via 10.44.<i>.1
//! ```
//! Invariants: nothing is created in the root network namespace (every veth
//! is created with both ends already inside their target namespaces), no
//! node has a default route, and a pod's only default route points at its
//! node — so no packet can leave the machine.

use std::net::Ipv4Addr;

use crate::error::Result;
use crate::exec::{ip, run_checked};

/// Name of the bridge in the switch and in every node.
const BRIDGE: &str = "br0";

/// A node's transit address on the switch.
#[must_use]
pub fn transit_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, 0, index)
}

/// A node's pod gateway (its `br0` address).
#[must_use]
pub fn gateway_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 44, index, 1)
}

/// The switch port (in the switch netns) of node `index`: the peer of the
/// node's `eth0`.
#[must_use]
pub fn switch_port(index: u8) -> String {
    format!("n{index}")
}

/// A node's pod CIDR.
#[must_use]
pub fn pod_cidr(index: u8) -> String {
    format!("10.44.{index}.0/24")
}

/// Creates a network namespace with `lo` up.
pub(crate) fn create_netns(name: &str) -> Result<()> {
    ip(["netns", "add", name])?;
    ip(["-n", name, "link", "set", "lo", "up"])
}

/// Deletes a network namespace (and with it every interface inside).
pub(crate) fn delete_netns(name: &str) -> Result<()> {
    ip(["netns", "del", name])
}

/// Creates a bridge named [`BRIDGE`] in `netns`, optionally with an address.
fn create_bridge(netns: &str, addr: Option<&str>) -> Result<()> {
    ip(["-n", netns, "link", "add", BRIDGE, "type", "bridge"])?;
    if let Some(addr) = addr {
        ip(["-n", netns, "addr", "add", addr, "dev", BRIDGE])?;
    }
    ip(["-n", netns, "link", "set", BRIDGE, "up"])
}

/// Creates the switch namespace that joins all nodes.
pub(crate) fn create_switch(netns: &str) -> Result<()> {
    create_netns(netns)?;
    create_bridge(netns, None)
}

/// Creates a veth pair with one end in each namespace, enslaves the `bridged`
/// end to the bridge of its namespace and brings both ends up.
fn bridged_veth(inner_ns: &str, inner_if: &str, bridge_ns: &str, bridge_port: &str) -> Result<()> {
    ip(["link", "add", inner_if, "netns", inner_ns, "type", "veth", "peer", "name", bridge_port, "netns", bridge_ns])?;
    ip(["-n", bridge_ns, "link", "set", bridge_port, "master", BRIDGE, "up"])?;
    ip(["-n", inner_ns, "link", "set", inner_if, "up"])
}

/// Plumbs node `index` (netns `node_ns`, already created) into the switch and
/// gives it its pod bridge and forwarding.
pub(crate) fn setup_node(switch_ns: &str, node_ns: &str, index: u8) -> Result<()> {
    bridged_veth(node_ns, "eth0", switch_ns, &switch_port(index))?;
    ip(["-n", node_ns, "addr", "add", &format!("{}/24", transit_ip(index)), "dev", "eth0"])?;
    create_bridge(node_ns, Some(&format!("{}/24", gateway_ip(index))))?;
    run_checked(
        "ip",
        [
            "netns",
            "exec",
            node_ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ],
    )?;
    Ok(())
}

/// Adds the route on node `from_ns` to node `to_index`'s pods.
pub(crate) fn route_to_node(from_ns: &str, to_index: u8) -> Result<()> {
    ip(["-n", from_ns, "route", "add", &pod_cidr(to_index), "via", &transit_ip(to_index).to_string()])
}

/// Plumbs a pod (netns `pod_ns`, already created) into its node's bridge.
pub(crate) fn setup_pod(node_ns: &str, node_index: u8, pod_ns: &str, host: u8) -> Result<()> {
    bridged_veth(pod_ns, "eth0", node_ns, &format!("p{host}"))?;
    let addr = Ipv4Addr::new(10, 44, node_index, host);
    ip(["-n", pod_ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    ip(["-n", pod_ns, "route", "add", "default", "via", &gateway_ip(node_index).to_string()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_follow_the_plan() {
        assert_eq!(transit_ip(2).to_string(), "10.250.0.2");
        assert_eq!(gateway_ip(1).to_string(), "10.44.1.1");
        assert_eq!(pod_cidr(3), "10.44.3.0/24");
    }
}
