//! End-to-end test of `heddle flows` against a live agent: the real CLI
//! binary, run inside a node's network namespace like an operator on that
//! node, after known traffic; each output format and the server-side filters
//! are checked as a user would read them. Needs root; skipped visibly (or
//! fails under `CI=true`) where it cannot run.

mod common;

use std::process::Command;

use anyhow::{ensure, Context, Result};
use common::{expect_delivered, heddle, run_e2e, wait_finished, Options, ECHO_PORT};
use heddle_tests::{ClientSpec, Direction};

#[test]
fn heddle_flows_shows_the_captured_connections_in_every_format_with_filters() {
    run_e2e("cli", Options::default(), |c| {
        let to = c.server.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(to).conns(3))?;
        wait_finished(&c.agent_a, Direction::Outbound, "demo/client", to, 3)?;

        // JSON Lines: one record per line, filtered by the agent.
        let (code, out, err) = heddle(&c.agent_a, &["flows", "--pod", "client", "--port", "8080", "-o", "jsonl"])?;
        ensure!(code == 0, "heddle flows failed: {err}");
        let records: Vec<serde_json::Value> =
            out.lines().map(serde_json::from_str).collect::<Result<_, _>>().context("jsonl output")?;
        ensure!(records.len() == 6, "3 connections, open and close each: {out}");
        ensure!(
            records.iter().all(|r| r["workload"] == "demo/client" && r["orig_dst"] == to.to_string()),
            "filtered records: {out}"
        );

        // JSON: one array.
        let (code, out, _) = heddle(&c.agent_a, &["flows", "--namespace", "demo", "-o", "json"])?;
        let all: serde_json::Value = serde_json::from_str(&out).context("json output")?;
        ensure!(code == 0 && all.as_array().is_some_and(|a| a.len() >= 6), "json: {out}");

        // Table: a header and one line a flow, within 120 columns.
        let (code, out, _) = heddle(&c.agent_a, &["flows", "--pod", "client", "--last", "2"])?;
        let lines: Vec<&str> = out.lines().collect();
        ensure!(code == 0 && lines.len() == 3, "header + 2 rows: {out}");
        ensure!(lines[0].starts_with("TIME") && lines.iter().all(|l| l.chars().count() <= 120), "{out}");
        ensure!(lines[1..].iter().all(|l| l.contains("forwarded") && l.contains(":8080")), "{out}");

        // Nothing was denied; a bad filter is an error that names it.
        let (code, out, _) = heddle(&c.agent_a, &["flows", "--verdict", "denied", "-o", "jsonl"])?;
        ensure!(code == 0 && out.trim().is_empty(), "denied flows: {out}");
        let (code, _, err) = heddle(&c.agent_a, &["flows", "--verdict", "maybe"])?;
        ensure!(code != 0 && err.contains("maybe"), "bad verdict accepted: {err}");
        // Status, certificates, policies and completions.
        let (code, out, err) = heddle(&c.agent_a, &["status"])?;
        ensure!(code == 0, "heddle status failed: {err}");
        for want in ["up on node", "enrolled", "captured", "mTLS:", "policies:", "heddle_connect4", "HEDDLE_ORIG_DST"] {
            ensure!(out.contains(want), "status lacks {want:?}:\n{out}");
        }
        let (code, out, _) = heddle(&c.agent_a, &["certs"])?;
        ensure!(code == 0 && out.contains("mTLS is off"), "certs without a CA: {out}");
        let (code, out, _) = heddle(&c.agent_a, &["policy", "list"])?;
        ensure!(code == 0 && out.contains("root namespace: heddle-system"), "policy list: {out}");
        let (code, out, _) = heddle(&c.agent_a, &["completion", "bash"])?;
        ensure!(code == 0 && out.contains("heddle"), "completion script missing");
        // The agent unreachable: a clear message.
        let (code, _, err) = heddle(&c.agent_a, &["--agent", "http://127.0.0.1:1", "flows"])?;
        ensure!(code != 0 && err.contains("cannot reach the Heddle agent"), "{err}");
        Ok(())
    });
}

#[test]
fn heddle_flows_follow_prints_new_connections_as_they_happen() {
    run_e2e("cli_follow", Options::default(), |c| {
        let mut cmd = Command::new(heddle_tests::heddle_binary()?);
        cmd.args(["flows", "--follow", "--pod", "client", "--last", "0", "-o", "jsonl"]);
        let mut follower = c.agent_a.node().spawn(cmd)?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        let to = c.server.addr(ECHO_PORT);
        expect_delivered(&c.client, &ClientSpec::to(to).conns(2))?;
        let lines = heddle_tests::poll_until(
            "two close records on the --follow stream",
            std::time::Duration::from_secs(10),
            std::time::Duration::from_millis(100),
            || {
                let text = follower.log_text();
                let closes = text
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|r| r["event"] == "close" && r["orig_dst"] == to.to_string())
                    .count();
                Ok(if closes == 2 { heddle_tests::Check::Ready(text) } else { heddle_tests::Check::Pending(text) })
            },
        )?;
        ensure!(follower.try_wait()?.is_none(), "heddle flows --follow exited: {lines}");
        follower.stop(std::time::Duration::from_secs(2))?;
        Ok(())
    });
}
