//! Tests of the test bed itself, without any agent: the network it builds
//! delivers traffic, cannot reach off the machine, and leaves nothing behind
//! — also when a test panics. Needs root, like the capture tests.

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use common::{addr, environment_ready, expect_delivered, ECHO_PORT};
use heddle_tests::{ClientSpec, PodSpec, Testbed};

/// What a test bed created, to check it is gone afterwards.
struct Footprint {
    netns: Vec<PathBuf>,
    cgroup: PathBuf,
    pins: PathBuf,
    tmp: PathBuf,
    pid: u32,
}

impl Footprint {
    fn of(tb: &Testbed, pid: u32) -> Self {
        let id = tb.id();
        let mut netns: Vec<PathBuf> = tb.pods().iter().map(heddle_tests::Pod::netns_path).collect();
        netns.extend(tb.nodes().iter().map(heddle_tests::Node::netns_path));
        Self {
            netns,
            cgroup: Path::new("/sys/fs/cgroup/unified").join(format!("heddle-test-{id}")),
            pins: Path::new("/sys/fs/bpf").join(format!("heddle-test-{id}")),
            tmp: tb.temp_dir().to_path_buf(),
            pid,
        }
    }

    fn assert_gone(&self) {
        for path in self.netns.iter().chain([&self.cgroup, &self.pins, &self.tmp]) {
            assert!(!path.exists(), "{} survived teardown", path.display());
        }
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // A killed child may linger as a zombie until its handle reaps it.
        assert!(stat.is_empty() || stat.contains(") Z "), "process {} survived teardown: {stat}", self.pid);
    }
}

fn two_nodes(name: &str) -> Result<(Testbed, heddle_tests::Pod, heddle_tests::Pod, heddle_tests::Pod)> {
    let tb = Testbed::new(name)?;
    let a = tb.add_node("node-a")?;
    let b = tb.add_node("node-b")?;
    let client = tb.add_pod(&a, PodSpec::new("client"))?;
    let near = tb.add_pod(&a, PodSpec::new("near"))?;
    let far = tb.add_pod(&b, PodSpec::new("far"))?;
    Ok((tb, client, near, far))
}

#[test]
fn pods_reach_each_other_on_the_same_and_across_nodes_without_an_agent() {
    if !environment_ready() {
        return;
    }
    let run = || -> Result<()> {
        let (_tb, client, near, far) = two_nodes("plumbing")?;
        let _near_echo = near.start_echo(ECHO_PORT)?;
        let _far_echo = far.start_echo(ECHO_PORT)?;
        expect_delivered(&client, &ClientSpec::to(near.addr(ECHO_PORT)).bytes(1 << 20))?;
        expect_delivered(&client, &ClientSpec::to(far.addr(ECHO_PORT)).bytes(1 << 20))?;
        expect_delivered(&client, &ClientSpec::to(far.addr(ECHO_PORT)).conns(50).parallel(50).hold())?;
        Ok(())
    };
    run().unwrap();
}

#[test]
fn pods_get_an_immediate_unreachable_error_for_addresses_off_the_machine() {
    if !environment_ready() {
        return;
    }
    let run = || -> Result<()> {
        let (_tb, client, _near, _far) = two_nodes("no_escape_bare")?;
        let start = Instant::now();
        let summary = client.run_client(&ClientSpec::to(addr(Ipv4Addr::new(192, 0, 2, 1), 80)))?;
        ensure!(summary.failed == 1, "{summary}");
        ensure!(start.elapsed() < Duration::from_secs(4), "took {:?}", start.elapsed());
        ensure!(summary.errors[0].to_lowercase().contains("unreachable"), "{summary}");
        Ok(())
    };
    run().unwrap();
}

#[test]
fn dropping_the_test_bed_removes_namespaces_cgroups_pins_and_processes() {
    if !environment_ready() {
        return;
    }
    let (tb, _client, near, _far) = two_nodes("teardown").unwrap();
    let echo = near.start_echo(ECHO_PORT).unwrap();
    let footprint = Footprint::of(&tb, echo.pid());
    assert!(footprint.netns.iter().all(|p| p.exists()));
    drop(tb);
    footprint.assert_gone();
    drop(echo);
}

#[test]
fn a_panicking_test_still_tears_its_test_bed_down() {
    if !environment_ready() {
        return;
    }
    let footprint = std::sync::Mutex::new(None);
    let outcome = std::panic::catch_unwind(|| {
        let (tb, _client, near, _far) = two_nodes("panics").unwrap();
        let echo = near.start_echo(ECHO_PORT).unwrap();
        let pid = echo.pid();
        std::mem::forget(echo); // only the test bed can clean this one up
        *footprint.lock().unwrap() = Some(Footprint::of(&tb, pid));
        panic!("deliberate panic with a live test bed");
    });
    assert!(outcome.is_err());
    let footprint = footprint.into_inner().unwrap().expect("test bed was built");
    footprint.assert_gone();
}
