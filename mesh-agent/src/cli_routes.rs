//! `heddle routes`: a waypoint's routes as a person reads them — per route,
//! whether it is in force, on which Services, its rules and how often each
//! matched, and every problem that keeps it (or a backend) out, from the
//! waypoint's `GET /routes`.

use std::fmt::Write as _;

use serde_json::Value;

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// The text of `heddle routes`.
#[must_use]
pub fn routes_text(r: &Value) -> String {
    let mut out = String::new();
    let services: Vec<&str> = r["services"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let _ = writeln!(
        out,
        "waypoint {}  services: {}",
        s(&r["waypoint"]),
        if services.is_empty() { "(none)".to_owned() } else { services.join(", ") }
    );
    let routes = r["routes"].as_array().cloned().unwrap_or_default();
    if routes.is_empty() {
        let _ = writeln!(out, "no routes: requests go to the Service they were sent to");
        return out;
    }
    let _ = writeln!(out, "{:<40} {:<8} {:<28} {:>5} {:>9}", "ROUTE", "ACCEPTED", "PARENTS", "RULES", "REQUESTS");
    for route in &routes {
        let parents: Vec<String> = route["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["attached"] == true)
            .map(|p| match p["port"].as_u64() {
                Some(port) => format!("{}:{port}", s(&p["parent"])),
                None => s(&p["parent"]).to_owned(),
            })
            .collect();
        let hits = route["hits"].as_array().cloned().unwrap_or_default();
        let total: u64 = hits.iter().filter_map(|h| h["requests"].as_u64()).sum();
        let _ = writeln!(
            out,
            "{:<40} {:<8} {:<28} {:>5} {:>9}",
            s(&route["route"]),
            if route["accepted"] == true { "yes" } else { "NO" },
            if parents.is_empty() { "-".to_owned() } else { parents.join(",") },
            route["rules"].as_u64().unwrap_or(0),
            total
        );
        for h in &hits {
            let _ = writeln!(
                out,
                "    rule {:<3} matched {} requests",
                h["rule"].as_u64().unwrap_or(0),
                h["requests"].as_u64().unwrap_or(0)
            );
        }
        for p in route["parents"].as_array().into_iter().flatten() {
            for c in p["conditions"].as_array().into_iter().flatten() {
                if c["status"] == "False" {
                    let _ = writeln!(
                        out,
                        "    {} {}={} ({}): {}",
                        s(&p["parent"]),
                        s(&c["type"]),
                        s(&c["status"]),
                        s(&c["reason"]),
                        s(&c["message"])
                    );
                }
            }
        }
        for problem in route["problems"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "    problem: {}", s(problem));
        }
        for note in route["notes"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "    note: {}", s(note));
        }
        let _ = writeln!(out, "    from {}", s(&route["source"]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_hits_and_why_a_route_is_not_accepted() {
        let v = serde_json::json!({
            "waypoint": "demo/waypoint",
            "services": ["demo/api"],
            "routes": [
                {"route": "httproute/demo/canary", "source": "r.yaml#1", "accepted": true, "rules": 2,
                 "parents": [{"parent": "demo/api", "port": 80, "attached": true, "conditions": []}],
                 "problems": [], "notes": [], "hits": [{"rule": 0, "requests": 90}, {"rule": 1, "requests": 10}]},
                {"route": "httproute/demo/mirror", "source": "r.yaml#2", "accepted": false, "rules": 0,
                 "parents": [{"parent": "demo/api", "port": null, "attached": true, "conditions": [
                    {"type": "Accepted", "status": "False", "reason": "UnsupportedValue", "message": "spec.rules[0].filters[0]: filter type RequestMirror is not supported yet"}]}],
                 "problems": ["spec.rules[0].filters[0]: filter type RequestMirror is not supported yet"], "notes": [], "hits": []}
            ]
        });
        let t = routes_text(&v);
        assert!(t.contains("httproute/demo/canary"), "{t}");
        assert!(t.contains("demo/api:80"), "{t}");
        assert!(t.contains("rule 1   matched 10 requests"), "{t}");
        assert!(t.contains("NO"), "{t}");
        assert!(t.contains("Accepted=False (UnsupportedValue)"), "{t}");
    }
}
