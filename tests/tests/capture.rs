//! End-to-end capture tests: real agents, real pods (network namespaces and
//! cgroups), real TCP. Each test builds its own two-node cluster (see
//! `common`), needs root, and is skipped visibly (or fails under `CI=true`)
//! where it cannot run. Assertions are what an operator would observe: bytes
//! delivered, and what each agent's admin API reports.
//!
//! Run with `cargo test -p heddle-tests --test capture` after building the
//! agent (`cargo xtask build`), as root.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{
    addr, expect_delivered, expect_exactly, expect_none, run_e2e, wait_finished, Options, ECHO_PORT, SERVER_VIP,
    SERVER_VIP_PORT, WAIT,
};
use heddle_tests::admin::maps;
use heddle_tests::{poll_until, Agent, Check, ClientSpec, ClientSummary, Direction, FlowEvent, Node, TestbedError};

const MIB: usize = 1 << 20;

#[test]
fn enrolled_client_to_a_pod_on_another_node_is_captured_by_both_agents_and_delivered_byte_exact() {
    run_e2e("cross_node", Options::default(), |c| {
        let to = c.server.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(to).bytes(100))?;
        expect_delivered(&c.client, &ClientSpec::to(to).bytes(MIB))?;

        let out = expect_exactly(&c.agent_a, Direction::Outbound, "demo/client", to, 2)?;
        let client_ip = IpAddr::from(c.client.ip());
        let inb = expect_exactly(&c.agent_b, Direction::Inbound, "demo/server", to, 2)?;
        for (side, flows) in [("outbound", &out), ("inbound", &inb)] {
            for f in flows {
                ensure!(f.event == FlowEvent::Close, "{side} flow did not close cleanly: {f}");
                ensure!(f.src_ip() == Some(client_ip), "{side} flow src is not the client pod: {f}");
                ensure!(f.dst == Some(to) && f.service.is_none(), "{side} flow dst/service wrong: {f}");
            }
            for size in [100, MIB as u64] {
                ensure!(
                    flows.iter().any(|f| f.bytes_sent == size && f.bytes_received == size),
                    "no {side} flow counted {size} bytes each way: {flows:?}"
                );
            }
        }
        expect_none(&c.agent_a, "an inbound flow", |f| f.direction == Direction::Inbound)?;
        expect_none(&c.agent_b, "an outbound flow", |f| f.direction == Direction::Outbound)
    });
}

#[test]
fn enrolled_pods_on_the_same_node_are_captured_outbound_and_inbound_by_their_agent() {
    run_e2e("same_node", Options::peer(), |c| {
        let peer = c.peer.as_ref().context("peer pod")?;
        let to = peer.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(to).bytes(4096))?;

        let out = expect_exactly(&c.agent_a, Direction::Outbound, "demo/client", to, 1)?;
        let inb = expect_exactly(&c.agent_a, Direction::Inbound, "demo/peer", to, 1)?;
        for f in out.iter().chain(&inb) {
            ensure!(f.bytes_sent == 4096 && f.bytes_received == 4096, "byte counts: {f}");
            ensure!(f.src_ip() == Some(c.client.ip().into()), "src is not the client pod: {f}");
        }
        expect_none(&c.agent_b, "a flow of node-a's pods", |_| true)
    });
}

#[test]
fn traffic_between_non_enrolled_pods_is_not_captured_and_still_delivered() {
    run_e2e("not_enrolled", Options::default(), |c| {
        let plain = c.plain.addr(ECHO_PORT);
        expect_delivered(&c.other, &ClientSpec::to(plain).bytes(8192).conns(3))?;

        // Barrier: a captured connection made afterwards is recorded by both
        // agents, so anything recorded for the earlier traffic is there too.
        let server = c.server.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(server))?;
        wait_finished(&c.agent_a, Direction::Outbound, "demo/client", server, 1)?;
        wait_finished(&c.agent_b, Direction::Inbound, "demo/server", server, 1)?;

        let other_ip = IpAddr::from(c.other.ip());
        for agent in [&c.agent_a, &c.agent_b] {
            expect_none(agent, "a flow of other -> plain", |f| {
                f.orig_dst == Some(plain) || f.dst == Some(plain) || f.src_ip() == Some(other_ip)
            })?;
        }
        Ok(())
    });
}

#[test]
fn non_enrolled_client_to_an_enrolled_server_is_captured_inbound_only() {
    run_e2e("inbound_only", Options::default(), |c| {
        let to = c.server.addr(ECHO_PORT);
        expect_delivered(&c.other, &ClientSpec::to(to).bytes(2048))?;

        let inb = expect_exactly(&c.agent_b, Direction::Inbound, "demo/server", to, 1)?;
        ensure!(inb[0].src_ip() == Some(c.other.ip().into()), "inbound src is not `other`: {}", inb[0]);
        ensure!(inb[0].bytes_sent == 2048 && inb[0].bytes_received == 2048, "bytes: {}", inb[0]);
        expect_none(&c.agent_a, "a flow of the non-enrolled client", |_| true)
    });
}

#[test]
fn enrollment_changes_at_runtime_start_and_stop_outbound_capture() {
    run_e2e("runtime_enroll", Options::default(), |c| {
        let to = c.server.addr(ECHO_PORT);
        let enrolled_entries = |agent: &Agent| -> Result<u64> { Ok(agent.datapath()?.map_entries(maps::ENROLLED)) };
        let before = enrolled_entries(&c.agent_a)?;

        c.tb.apply_enrollment(&c.other, true)?;
        wait_map_entries(&c.agent_a, maps::ENROLLED, before + 1)?;
        expect_delivered(&c.other, &ClientSpec::to(to))?;
        expect_exactly(&c.agent_a, Direction::Outbound, "demo/other", to, 1)?;

        c.tb.apply_enrollment(&c.client, false)?;
        wait_map_entries(&c.agent_a, maps::ENROLLED, before)?;
        expect_delivered(&c.client, &ClientSpec::to(to))?;
        // Barrier: `other` is still captured; once its second flow is in,
        // an outbound flow of `client` would be too.
        expect_delivered(&c.other, &ClientSpec::to(to))?;
        expect_exactly(&c.agent_a, Direction::Outbound, "demo/other", to, 2)?;
        expect_none(&c.agent_a, "an outbound flow of un-enrolled client", |f| {
            f.direction == Direction::Outbound && f.workload == "demo/client"
        })?;
        // The server is still enrolled: its inbound capture is unaffected.
        let inb = wait_finished(&c.agent_b, Direction::Inbound, "demo/server", to, 3)?;
        ensure!(
            inb.iter().any(|f| f.src_ip() == Some(c.client.ip().into())),
            "un-enrolled client's connection was not captured inbound: {inb:?}"
        );
        Ok(())
    });
}

#[test]
fn five_hundred_concurrent_and_ten_thousand_sequential_connections_leave_no_leaks() {
    run_e2e("load", Options::default(), |c| {
        let to = c.server.addr(ECHO_PORT);
        // Warm-up, so lazily created state is not mistaken for a leak.
        expect_delivered(&c.client, &ClientSpec::to(to))?;
        wait_finished(&c.agent_a, Direction::Outbound, "demo/client", to, 1)?;
        wait_finished(&c.agent_b, Direction::Inbound, "demo/server", to, 1)?;
        let baseline = [c.agent_a.open_fds()?, c.agent_b.open_fds()?];

        expect_delivered(&c.client, &ClientSpec::to(to).conns(500).parallel(500).hold())?;
        expect_delivered(&c.client, &ClientSpec::to(to).conns(10_000).parallel(1).bytes(64))?;

        for (agent, base) in [&c.agent_a, &c.agent_b].into_iter().zip(baseline) {
            let what = format!("agent on {} to release every connection", agent.node().name());
            poll_until(&what, Duration::from_secs(10), Duration::from_millis(250), || {
                let fds = agent.open_fds()?;
                let stats = agent.stats()?;
                let dp = agent.datapath()?;
                let (pending, orig) = (dp.map_entries(maps::PENDING), dp.map_entries(maps::ORIG_DST));
                Ok(if fds <= base + 4 && stats.active_connections == 0 && pending == 0 && orig == 0 {
                    Check::Ready(())
                } else {
                    Check::Pending(format!(
                        "fds {fds} (baseline {base}), activeConnections {}, {} {pending}, {} {orig}",
                        stats.active_connections,
                        maps::PENDING,
                        maps::ORIG_DST
                    ))
                })
            })?;
        }
        Ok(())
    });
}

#[test]
fn the_agent_never_redirects_its_own_connections() {
    run_e2e("no_loops", Options::default(), |c| {
        const CONNS: usize = 5;
        let to = c.server.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(to).conns(CONNS))?;
        expect_exactly(&c.agent_a, Direction::Outbound, "demo/client", to, CONNS)?;
        expect_exactly(&c.agent_b, Direction::Inbound, "demo/server", to, CONNS)?;

        let count = |agent: &Agent, dir: Direction| -> Result<usize> {
            Ok(agent.flows()?.iter().filter(|f| f.is_terminal() && f.direction == dir).count())
        };
        ensure!(count(&c.agent_a, Direction::Outbound)? == CONNS, "node-a outbound flows != {CONNS}");
        ensure!(count(&c.agent_a, Direction::Inbound)? == 0, "node-a captured a connection inbound");
        ensure!(count(&c.agent_b, Direction::Outbound)? == 0, "node-b captured its own connection outbound");
        ensure!(count(&c.agent_b, Direction::Inbound)? == CONNS, "node-b inbound flows != {CONNS}");

        let dp = c.agent_a.datapath()?;
        ensure!(
            dp.reason("connect_agent_mark") > 0,
            "node-a's connect hook never saw the agent's marked upstream connects: {:?}",
            dp.reasons
        );
        ensure!(
            dp.reason("connect_redirected") == CONNS as u64,
            "node-a redirected {} connects for {CONNS} client connections: {:?}",
            dp.reason("connect_redirected"),
            dp.reasons
        );
        Ok(())
    });
}

#[test]
fn a_service_vip_is_sent_to_a_backend_and_recorded_with_the_service() {
    run_e2e("service_vip", Options::default(), |c| {
        let vip = addr(SERVER_VIP, SERVER_VIP_PORT);
        let backend = c.server.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(vip).bytes(2048))?;

        let out = expect_exactly(&c.agent_a, Direction::Outbound, "demo/client", vip, 1)?;
        ensure!(out[0].dst == Some(backend), "VIP flow dst is not the server pod: {}", out[0]);
        ensure!(out[0].service.as_deref() == Some("demo/server"), "service: {}", out[0]);
        ensure!(out[0].bytes_sent == 2048 && out[0].bytes_received == 2048, "bytes: {}", out[0]);
        expect_exactly(&c.agent_b, Direction::Inbound, "demo/server", backend, 1)?;
        Ok(())
    });
}

#[test]
fn a_killed_agent_fails_closed_and_captures_again_after_restart() {
    run_e2e("crash_recovery", Options::default(), |c| {
        let to = c.server.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(to))?;
        expect_exactly(&c.agent_a, Direction::Outbound, "demo/client", to, 1)?;

        c.agent_a.kill()?;
        let down = c.client.run_client(&ClientSpec::to(to))?;
        ensure!(down.failed == 1, "connection succeeded with the agent down: {down}");
        ensure!(
            down.errors.iter().any(|e| e.to_lowercase().contains("refused")),
            "expected `connection refused` with the agent down (fail closed): {down}"
        );

        c.agent_a.restart()?;
        expect_delivered(&c.client, &ClientSpec::to(to).conns(3))?;
        expect_exactly(&c.agent_a, Direction::Outbound, "demo/client", to, 3)?;
        let inb = expect_exactly(&c.agent_b, Direction::Inbound, "demo/server", to, 4)?;
        let client_ip = Some(c.client.ip().into());
        ensure!(inb.iter().all(|f| f.src_ip() == client_ip), "inbound src: {inb:?}");
        Ok(())
    });
}

#[test]
fn with_keep_attached_on_exit_a_stopped_agent_leaves_its_pods_failing_closed_until_restart() {
    let mut pin_root = None;
    run_e2e("keep_attached", Options::peer(), |c| {
        pin_root = c.node_a.pin_dir().parent().map(Path::to_path_buf);
        let peer = c.peer.as_ref().context("peer pod")?;
        let (to, to_peer) = (c.server.addr(ECHO_PORT), peer.addr(ECHO_PORT));
        c.tb.set_agent_args(&["--keep-attached-on-exit"]);
        c.agent_a.restart()?;
        expect_delivered(&c.client, &ClientSpec::to(to))?;
        expect_exactly(&c.agent_a, Direction::Outbound, "demo/client", to, 1)?;
        let pinned = pins(&c.node_a)?;
        ensure!(pinned.len() == 5, "3 cgroup links + 2 sk_lookup pinned: {pinned:?}");

        c.agent_a.stop()?;
        ensure_clean_exit(&c.agent_a, "left attached and pinned")?;
        let left = pins(&c.node_a)?;
        ensure!(left == pinned, "pins changed at exit: {pinned:?} -> {left:?}");

        // Outbound from the enrolled client: refused, never delivered direct.
        let served = c.echo_records(&c.server).len();
        let down = c.client.run_client(&ClientSpec::to(to).conns(3))?;
        ensure!(down.failed == 3, "connections succeeded with the agent down: {down}");
        ensure_refused(&down)?;
        // Inbound to the enrolled peer: refused by `sk_lookup` (no listener).
        let down = c.other.run_client(&ClientSpec::to(to_peer))?;
        ensure!(down.failed == 1, "inbound succeeded with the agent down: {down}");
        ensure_refused(&down)?;
        ensure!(c.echo_records(peer).is_empty(), "the peer was reached directly: {:?}", c.echo_records(peer));
        // A pod that is not enrolled is not affected.
        expect_delivered(&c.other, &ClientSpec::to(to))?;
        // The server saw that connection only: none of the client's arrived.
        let got = poll_until("the server's echo record", WAIT, Duration::from_millis(50), || {
            let got = c.echo_records(&c.server);
            Ok(if got.len() > served { Check::Ready(got) } else { Check::Pending(format!("{} records", got.len())) })
        })?;
        std::thread::sleep(Duration::from_millis(200));
        let got = c.echo_records(&c.server).len().max(got.len());
        ensure!(got == served + 1, "the server saw {got} connections, expected {served} + 1 (the non-enrolled pod's)");

        c.agent_a.restart()?;
        // The new agent put its programs into the links in place: no moment
        // without a program, and still one set.
        ensure!(
            c.agent_a.log_tail(200).contains("adopted the link left by a previous agent"),
            "the new agent did not adopt the links left pinned:\n{}",
            c.agent_a.log_tail(40)
        );
        expect_delivered(&c.client, &ClientSpec::to(to).conns(3))?;
        expect_exactly(&c.agent_a, Direction::Outbound, "demo/client", to, 3)?;
        expect_delivered(&c.other, &ClientSpec::to(to_peer))?;
        expect_exactly(&c.agent_a, Direction::Inbound, "demo/peer", to_peer, 1)?;
        ensure_one_set_of_attachments(&c.agent_a, 2)?;
        let now = pins(&c.node_a)?;
        ensure!(now.len() == 5, "exactly one set pinned after restart: {now:?}");
        Ok(())
    });
    ensure_pins_removed(pin_root.as_deref());
}

#[test]
fn with_keep_attached_on_exit_an_agent_with_no_enrolled_pod_detaches_everything() {
    let mut pin_root = None;
    run_e2e("keep_attached_uninstall", Options::default(), |c| {
        pin_root = c.node_a.pin_dir().parent().map(Path::to_path_buf);
        let to = c.server.addr(ECHO_PORT);
        c.tb.set_agent_args(&["--keep-attached-on-exit"]);
        c.agent_a.restart()?;
        ensure!(!pins(&c.node_a)?.is_empty(), "nothing pinned");
        // The admin un-enrolls everything before deleting the DaemonSet.
        c.tb.apply_enrollment(&c.client, false)?;
        wait_map_entries(&c.agent_a, maps::ENROLLED, 0)?;

        c.agent_a.stop()?;
        ensure_clean_exit(&c.agent_a, "no pod enrolled: detaching")?;
        let left = pins(&c.node_a)?;
        ensure!(left.is_empty(), "pins left after an uninstall exit: {left:?}");
        ensure!(!c.node_a.pin_dir().exists(), "{} (maps) left after an uninstall exit", c.node_a.pin_dir().display());
        // Pods go direct: nothing of the agent is left on the node.
        expect_delivered(&c.client, &ClientSpec::to(to))?;
        Ok(())
    });
    ensure_pins_removed(pin_root.as_deref());
}

#[test]
fn pods_cannot_reach_addresses_outside_the_test_bed() {
    run_e2e("no_escape", Options::default(), |c| {
        for node in [&c.node_a, &c.node_b] {
            let routes = output(node.run(ip_route_default())?)?;
            ensure!(routes.trim().is_empty(), "{} has a default route: {routes}", node.name());
        }
        let routes = output(c.other.run(ip_route_default())?)?;
        let gateway = c.node_a.gateway_ip().to_string();
        ensure!(
            routes.lines().count() == 1 && routes.contains(&format!("via {gateway} ")),
            "pod default route must point at its node only: {routes}"
        );

        let outside = addr(Ipv4Addr::new(192, 0, 2, 1), 80);
        let start = Instant::now();
        let summary = c.other.run_client(&ClientSpec::to(outside))?;
        let took = start.elapsed();
        ensure!(summary.failed == 1, "reached {outside}: {summary}");
        ensure!(
            summary.errors.iter().any(|e| {
                let e = e.to_lowercase();
                e.contains("unreachable") || e.contains("no route")
            }),
            "expected `unreachable` for {outside}: {summary}"
        );
        ensure!(took < Duration::from_secs(4), "failing took {took:?}; expected an immediate error");
        expect_none(&c.agent_a, "a flow to the outside", |f| f.orig_dst == Some(outside))
    });
}

#[test]
fn an_http_request_with_curl_from_an_enrolled_pod_succeeds_and_is_captured() {
    run_e2e("http_curl", Options::default(), |c| {
        const HTTP_PORT: u16 = 8081;
        const BODY: &str = "hello from the server pod\n";
        let docroot = c.tb.temp_dir().join("www");
        std::fs::create_dir_all(&docroot)?;
        std::fs::write(docroot.join("hello.txt"), BODY)?;
        let mut http = Command::new("python3");
        http.args(["-m", "http.server", &HTTP_PORT.to_string(), "--bind", "0.0.0.0", "--directory"]).arg(&docroot);
        let _http = c.server.spawn(http)?;
        c.server.wait_listening(HTTP_PORT, WAIT)?;

        let to = c.server.addr(HTTP_PORT);
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"]).arg(format!("http://{to}/hello.txt"));
        let text = output(c.client.run(curl)?)?;
        let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
        ensure!(code == "200", "HTTP status {code}, body {body:?}");
        ensure!(body == BODY, "body {body:?}");

        let out = expect_exactly(&c.agent_a, Direction::Outbound, "demo/client", to, 1)?;
        ensure!(out[0].bytes_received >= BODY.len() as u64, "response bytes not counted: {}", out[0]);
        expect_exactly(&c.agent_b, Direction::Inbound, "demo/server", to, 1)?;
        Ok(())
    });
}

/// Waits until `map` on `agent` has exactly `entries` entries.
fn wait_map_entries(agent: &Agent, map: &str, entries: u64) -> Result<()> {
    let what = format!("{map} to hold {entries} entries on {}", agent.node().name());
    poll_until(&what, WAIT, Duration::from_millis(100), || {
        let now = agent.datapath()?.map_entries(map);
        Ok(if now == entries { Check::Ready(()) } else { Check::Pending(format!("{now} entries")) })
    })?;
    Ok(())
}

/// The agent exited by itself with status 0 (not killed after the grace
/// period), and logged `said`.
fn ensure_clean_exit(agent: &Agent, said: &str) -> Result<()> {
    let status = match agent.wait_ready(Duration::ZERO) {
        Err(TestbedError::AgentNotRunning { status, .. }) => status,
        Ok(()) => "still running".to_owned(),
        Err(e) => e.to_string(),
    };
    ensure!(status == "exit status: 0", "agent exit: {status}\n{}", agent.log_tail(30));
    ensure!(agent.log_tail(30).contains(said), "agent did not log {said:?}:\n{}", agent.log_tail(30));
    Ok(())
}

/// Every connection failed as refused (or reset): fail closed.
fn ensure_refused(summary: &ClientSummary) -> Result<()> {
    ensure!(
        !summary.errors.is_empty()
            && summary.errors.iter().all(|e| {
                let e = e.to_lowercase();
                e.contains("refused") || e.contains("reset")
            }),
        "expected `connection refused` (fail closed): {summary}"
    );
    Ok(())
}

/// `GET /datapath` lists each cgroup program once and one `sk_lookup` per
/// enrolled pod, each in its own namespace.
fn ensure_one_set_of_attachments(agent: &Agent, pods: usize) -> Result<()> {
    let programs = agent.datapath()?.programs;
    let field = |p: &serde_json::Value, k: &str| p[k].as_str().unwrap_or_default().to_owned();
    let count = |attach: &str| programs.iter().filter(|p| field(p, "attach") == attach).count();
    for attach in ["cgroup/connect4", "cgroup/connect6", "cgroup/sock_ops"] {
        ensure!(count(attach) == 1, "{attach} attached {} times: {programs:?}", count(attach));
    }
    let targets: BTreeSet<String> =
        programs.iter().filter(|p| field(p, "attach") == "sk_lookup").map(|p| field(p, "target")).collect();
    ensure!(
        count("sk_lookup") == pods && targets.len() == pods,
        "expected one sk_lookup in each of {pods} pods: {programs:?}"
    );
    ensure!(programs.len() == 3 + pods, "unexpected attachments: {programs:?}");
    Ok(())
}

/// The names pinned in the node's pin directory (none if it is gone).
/// The links pinned in the node's pin directory (the maps, pinned in its
/// `maps/`, are not counted).
fn pins(node: &Node) -> Result<BTreeSet<String>> {
    let dir = node.pin_dir();
    match std::fs::read_dir(&dir) {
        Ok(entries) => Ok(entries
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|name| name.as_ref().map_or(true, |n| n != "maps"))
            .collect::<std::io::Result<_>>()?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e).with_context(|| format!("listing {}", dir.display())),
    }
}

/// Teardown removed the test bed's pin root (a kept-attached exit must not
/// leave pins behind the test bed).
fn ensure_pins_removed(pin_root: Option<&Path>) {
    if let Some(root) = pin_root {
        assert!(
            !root.exists(),
            "{} left after teardown: {:?}",
            root.display(),
            std::fs::read_dir(root).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        );
    }
}

fn ip_route_default() -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["-4", "route", "show", "default"]);
    cmd
}

/// Stdout of a finished command, failing with its stderr if it failed.
fn output(out: std::process::Output) -> Result<String> {
    ensure!(out.status.success(), "command failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    String::from_utf8(out.stdout).context("stdout is not UTF-8")
}
