//! Text views of the agent's admin API for `heddle status`, `heddle certs`
//! and `heddle policy list`: pure functions from the API's JSON to what an
//! operator reads, so they are tested without an agent.

use std::{
    fmt::Write as _,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

/// A JSON value as table text: `-` for null, strings without quotes.
#[must_use]
pub fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `86400` → `1d0h`, `5400` → `1h30m`, `90` → `1m30s`.
#[must_use]
pub fn human_secs(secs: i64) -> String {
    let (sign, secs) = if secs < 0 { ("-", -secs) } else { ("", secs) };
    let (d, h, m, s) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    let body = match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    };
    format!("{sign}{body}")
}

/// Seconds since the Unix epoch, now.
#[must_use]
pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `heddle certs`: one line per certificate the agent holds or wants.
#[must_use]
pub fn certs_text(certs: &Value, now: i64) -> String {
    let mut out = String::new();
    if certs["mtls"] == false {
        return "mTLS is off on this agent (no CA configured): it holds no certificates\n".into();
    }
    let _ = writeln!(out, "{:<52} {:<6} {:>11} {:>4}  LAST ERROR", "IDENTITY", "READY", "EXPIRES IN", "GEN");
    for c in certs["certificates"].as_array().into_iter().flatten() {
        let expires = if c["expired"] == true {
            "EXPIRED".into()
        } else {
            c["notAfter"].as_i64().map_or("-".into(), |t| human_secs(t - now))
        };
        let _ = writeln!(
            out,
            "{:<52} {:<6} {:>11} {:>4}  {}",
            s(&c["identity"]),
            s(&c["ready"]),
            expires,
            s(&c["generation"]),
            s(&c["lastError"])
        );
    }
    out
}

/// `heddle policy list`: the policies in force and the rejected ones.
#[must_use]
pub fn policies_text(p: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "root namespace: {}   source: {}", s(&p["rootNamespace"]), s(&p["source"]));
    let _ = writeln!(out, "{:<40} {:<7} {:>5}  DRY-RUN", "POLICY", "ACTION", "RULES");
    for l in p["loaded"].as_array().into_iter().flatten() {
        let _ =
            writeln!(out, "{:<40} {:<7} {:>5}  {}", s(&l["policy"]), s(&l["action"]), s(&l["rules"]), s(&l["dryRun"]));
    }
    let errors: Vec<String> = p["errors"].as_array().into_iter().flatten().map(s).collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "rejected ({}):", errors.len());
        for e in errors {
            let _ = writeln!(out, "  {e}");
        }
    }
    if let Some(e) = p["sourceError"].as_str() {
        let _ = writeln!(out, "source not applied: {e}");
    }
    out
}

/// `heddle status`: is the agent up and is the mesh healthy, at a glance.
#[must_use]
pub fn status_text(stats: &Value, dp: &Value, certs: &Value, policies: &Value, workloads: &Value) -> String {
    let mut out = String::new();
    let local: Vec<&Value> = workloads.as_array().into_iter().flatten().filter(|w| w["local"] == true).collect();
    let captured = local.iter().filter(|w| w["captured"] == true).count();
    let enrolled = local.iter().filter(|w| w["enrolled"] == true).count();
    let _ = writeln!(out, "agent:         up on node {}", s(&stats["node"]));
    let _ = writeln!(out, "workloads:     {} on this node, {enrolled} enrolled, {captured} captured", local.len());
    for w in local.iter().filter(|w| w["captureError"].is_string()) {
        let _ = writeln!(out, "  ! {}/{}: {}", s(&w["namespace"]), s(&w["name"]), s(&w["captureError"]));
    }
    let _ = writeln!(
        out,
        "connections:   {} open, {} flow records dropped, {} fds",
        s(&stats["activeConnections"]),
        s(&stats["flowsDropped"]),
        s(&stats["openFds"])
    );
    let subscribers = stats["flowSubscribers"].as_array().map_or(0, Vec::len);
    let _ = writeln!(
        out,
        "flow streams:  {subscribers} subscribers, {} records lost by slow subscribers",
        s(&stats["flowSubscriberDropped"])
    );
    let now = now_unix();
    if certs["mtls"] == true {
        let list: Vec<&Value> = certs["certificates"].as_array().into_iter().flatten().collect();
        let soonest = list.iter().filter_map(|c| c["notAfter"].as_i64()).min();
        let not_ready = list.iter().filter(|c| c["ready"] != true).count();
        let expired = list.iter().filter(|c| c["expired"] == true).count();
        let _ = writeln!(
            out,
            "mTLS:          on, {} certificates ({not_ready} not ready, {expired} expired), next expiry in {}",
            list.len(),
            soonest.map_or("-".into(), |t| human_secs(t - now))
        );
    } else {
        let _ = writeln!(out, "mTLS:          OFF (no CA configured: plaintext forwarding)");
    }
    let errors = policies["errors"].as_array().map_or(0, Vec::len);
    let _ = writeln!(
        out,
        "policies:      {} in force, {errors} rejected{}",
        policies["loaded"].as_array().map_or(0, Vec::len),
        if errors > 0 { " (see `heddle policy list`)" } else { "" }
    );
    let _ = writeln!(out, "programs:");
    for p in dp["programs"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  {:<18} {:<16} {}", s(&p["program"]), s(&p["attach"]), s(&p["target"]));
    }
    let _ = writeln!(out, "maps:");
    for (name, m) in dp["maps"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "  {:<20} {:>6} / {}", name, s(&m["entries"]), s(&m["capacity"]));
    }
    let _ = writeln!(out, "datapath decisions:");
    for (name, n) in dp["reasons"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "  {name:<28} {}", s(n));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats_durations_for_humans() {
        assert_eq!(human_secs(45), "45s");
        assert_eq!(human_secs(90), "1m30s");
        assert_eq!(human_secs(5400), "1h30m");
        assert_eq!(human_secs(86_400 + 3600), "1d1h");
        assert_eq!(human_secs(-90), "-1m30s");
    }

    #[test]
    fn certs_show_identity_expiry_and_errors() {
        let certs = json!({"mtls": true, "certificates": [
            {"identity": "spiffe://cluster.local/ns/demo/sa/web", "ready": true, "notAfter": 1_000 + 7200, "generation": 3, "lastError": null},
            {"identity": "spiffe://cluster.local/ns/demo/sa/db", "ready": false, "notAfter": null, "generation": null, "lastError": "CA unreachable"}
        ]});
        let text = certs_text(&certs, 1_000);
        assert!(text.contains("spiffe://cluster.local/ns/demo/sa/web") && text.contains("2h0m"), "{text}");
        assert!(text.contains("CA unreachable"), "{text}");
        assert!(certs_text(&json!({"mtls": false}), 0).contains("mTLS is off"));
    }

    #[test]
    fn status_summarises_workloads_certificates_and_policy_errors() {
        let stats = json!({"node": "node-a", "activeConnections": 2, "openFds": 40, "flowsDropped": 0,
                "flowSubscribers": [{"id": 1, "lost": 5}], "flowSubscriberDropped": 12});
        let workloads = json!([
            {"namespace": "demo", "name": "web", "local": true, "enrolled": true, "captured": true, "captureError": null},
            {"namespace": "demo", "name": "job", "local": true, "enrolled": true, "captured": false, "captureError": "netns missing"},
            {"namespace": "demo", "name": "api", "local": false, "enrolled": true, "captured": false}
        ]);
        let policies = json!({"loaded": [{"policy": "demo/a"}], "errors": ["policy demo/b: spec.action: unknown"]});
        let text = status_text(&stats, &json!({}), &json!({"mtls": false}), &policies, &workloads);
        assert!(text.contains("2 on this node, 2 enrolled, 1 captured"), "{text}");
        assert!(text.contains("demo/job: netns missing"), "{text}");
        assert!(text.contains("1 subscribers, 12 records lost by slow subscribers"), "{text}");
        assert!(text.contains("mTLS:          OFF"), "{text}");
        assert!(text.contains("1 in force, 1 rejected"), "{text}");
    }

    #[test]
    fn policy_list_shows_loaded_and_rejected() {
        let p = json!({"rootNamespace": "heddle-system", "source": "/etc/heddle/policies",
            "loaded": [{"policy": "demo/allow-web", "action": "ALLOW", "rules": 1, "dryRun": false}],
            "errors": ["policy demo/bad: spec.rules[0].from[0].source.ipBlocks[0]: not a CIDR"], "sourceError": null});
        let text = policies_text(&p);
        assert!(text.contains("demo/allow-web") && text.contains("ALLOW"), "{text}");
        assert!(text.contains("rejected (1)") && text.contains("not a CIDR"), "{text}");
    }
}
