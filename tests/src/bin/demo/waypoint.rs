//! The demo's L7 part: a waypoint for namespace `shop`, whose service
//! `shop/cart` has two versions. Shows a 90/10 canary measured over a few
//! hundred requests, then a header match that sends a test user
//! (`end-user: jason`) to v2, with `heddle routes` and the waypoint's L7
//! flow records.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use heddle_tests::env::asset;
use heddle_tests::waypoint::{Waypoint, GATEWAY_NAME_LABEL};
use heddle_tests::{Node, Pod, PodSpec, Process, ServiceSpec, Testbed};
use serde_json::Value;

const CART_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const REQUESTS: usize = 400;

/// What the waypoint part started (dropped at the end of the demo).
pub struct Shop {
    _servers: Vec<Process>,
    waypoint: Waypoint,
}

/// Adds namespace `shop` (cart v1 and v2 on node-b, a waypoint) and starts
/// the waypoint; call after the agents run.
pub fn build(tb: &Testbed, node_b: &Node) -> Result<Shop> {
    let version = |v: &str| {
        PodSpec::new(&format!("cart-{v}")).namespace("shop").enrolled(true).label("app", "cart").label("version", v)
    };
    let v1 = tb.add_pod(node_b, version("v1"))?;
    let v2 = tb.add_pod(node_b, version("v2"))?;
    let wp = tb.add_pod(node_b, PodSpec::new("waypoint").namespace("shop").label(GATEWAY_NAME_LABEL, "waypoint"))?;
    tb.add_service(ServiceSpec::new("cart", CART_VIP).namespace("shop").port(80, 8080))?;
    tb.add_service(
        ServiceSpec::new("cart-v1", Ipv4Addr::new(10, 96, 0, 31))
            .namespace("shop")
            .port(80, 8080)
            .selector("version", "v1"),
    )?;
    tb.add_service(
        ServiceSpec::new("cart-v2", Ipv4Addr::new(10, 96, 0, 32))
            .namespace("shop")
            .port(80, 8080)
            .selector("version", "v2"),
    )?;
    tb.add_waypoint("shop", "waypoint")?;
    tb.set_namespace_waypoint("shop", Some("waypoint"))?;
    let servers = vec![v1.start_http(8080)?, v2.start_http(8080)?];
    for agent in tb.agents() {
        agent.reload()?;
    }
    let ids = [v1.spiffe_id(), v2.spiffe_id()];
    if let Some(agent) = tb.agents().into_iter().find(|a| a.node().name() == node_b.name()) {
        agent.wait_certificates(&ids, Duration::from_secs(15))?;
    }
    let waypoint = tb.start_waypoint(&wp, "waypoint")?;
    Ok(Shop { _servers: servers, waypoint })
}

fn route(v1: u32, v2: u32, jason: bool) -> String {
    let header_rule = if jason {
        "  - matches: [{headers: [{name: end-user, value: jason}]}]\n    backendRefs: [{name: cart-v2, port: 80}]\n"
    } else {
        ""
    };
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: cart, namespace: shop}}\n\
         spec:\n  parentRefs: [{{group: '', kind: Service, name: cart, port: 80}}]\n  rules:\n{header_rule}  \
         - backendRefs:\n    - {{name: cart-v1, port: 80, weight: {v1}}}\n    - {{name: cart-v2, port: 80, weight: {v2}}}\n"
    )
}

fn load(client: &Pod, n: usize, header: Option<&str>) -> Result<Value> {
    let mut cmd = Command::new("python3");
    cmd.arg(asset("httpc.py")).args(["load", &format!("http://{CART_VIP}/cart"), &n.to_string()]);
    if let Some(h) = header {
        cmd.args(["--header", h]);
    }
    let out = client.run(cmd)?;
    anyhow::ensure!(out.status.success(), "httpc: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).context("httpc output")
}

fn served(v: &Value) -> BTreeMap<String, u64> {
    v["served_by"]
        .as_object()
        .map(|m| m.iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

fn heddle(wp: &Waypoint, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(heddle_tests::heddle_binary()?);
    cmd.args(["--agent", "http://127.0.0.1:15000"]).args(args);
    let out = wp.pod.run(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// Runs the L7 steps from `client`; returns whether each behaved.
pub fn run(tb: &Testbed, shop: &Shop, client: &Pod) -> Result<bool> {
    let wp = &shop.waypoint;
    println!(
        "\nWaypoint (L7): namespace shop uses waypoint shop/waypoint (pod {} on {}, identity {})",
        wp.pod.ip(),
        wp.pod.node_name(),
        wp.pod.spiffe_id()
    );
    println!(
        "  service shop/cart {CART_VIP}:80 -> cart-v1, cart-v2; the agents send its traffic to the waypoint over HBONE"
    );
    let mut ok = true;

    tb.set_routes("cart", &route(90, 10, false))?;
    wp.wait_route("httproute/shop/cart", true)?;
    let r = load(client, REQUESTS, None)?;
    let counts = served(&r);
    let v2 = counts.get("cart-v2").copied().unwrap_or(0);
    let share = f64::from(u32::try_from(v2).unwrap_or(u32::MAX)) * 100.0
        / f64::from(u32::try_from(REQUESTS).unwrap_or(u32::MAX));
    // 400 draws at p = 0.1: sd 6; a 4-sd band.
    let fine = r["errors"] == 0 && (16..=64).contains(&v2);
    ok &= fine;
    println!(
        "  [{}] canary 90/10 (HTTPRoute weights): {REQUESTS} requests on one keep-alive connection -> {counts:?}: {share:.1}% to v2",
        if fine { "ok" } else { "UNEXPECTED" }
    );

    tb.set_routes("cart", &route(100, 0, true))?;
    poll_rules(wp, 2)?;
    let jason = served(&load(client, 20, Some("end-user:jason"))?);
    let others = served(&load(client, 20, None)?);
    let fine = jason.get("cart-v2") == Some(&20) && others.get("cart-v1") == Some(&20);
    ok &= fine;
    println!(
        "  [{}] header match: `end-user: jason` -> {jason:?}; everyone else -> {others:?}",
        if fine { "ok" } else { "UNEXPECTED" }
    );

    println!("\n$ heddle routes   (in the waypoint's pod)");
    print!("{}", heddle(wp, &["routes"])?);
    println!("\n$ heddle flows --last 6   (the waypoint's L7 records)");
    print!("{}", heddle(wp, &["flows", "--last", "6"])?);
    Ok(ok)
}

fn poll_rules(wp: &Waypoint, rules: u64) -> Result<()> {
    heddle_tests::poll_until("the new route", Duration::from_secs(10), Duration::from_millis(100), || {
        let r = wp.routes()?;
        let n = r["routes"][0]["rules"].as_u64().unwrap_or(0);
        Ok(if n == rules { heddle_tests::Check::Ready(()) } else { heddle_tests::Check::Pending(r.to_string()) })
    })?;
    Ok(())
}
