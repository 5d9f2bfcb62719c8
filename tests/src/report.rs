//! Plain-text tables of what an agent reports, for the demo and test logs.
//!
//! Pure formatting over the admin API types; no I/O.

use std::fmt::{self, Write as _};

use crate::admin::{show_addr, Certs, Datapath, Direction, Flow, FlowEvent, Security, Verdict, Workload};

/// A left-aligned text table.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    #[must_use]
    pub fn new(headers: &[&str]) -> Self {
        Self { headers: headers.iter().map(|h| (*h).to_owned()).collect(), rows: Vec::new() }
    }

    /// Appends a row (missing cells render empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Whether the table has no rows.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, cells: &[String]| -> fmt::Result {
            let mut out = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                out.push_str(cell);
                out.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
            writeln!(f, "  {}", out.trim_end())
        };
        line(f, &self.headers)?;
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        line(f, &rule)?;
        for row in &self.rows {
            line(f, row)?;
        }
        Ok(())
    }
}

/// One row per finished connection (`close`/`error` records).
#[must_use]
pub fn flow_table(flows: &[Flow]) -> Table {
    let mut t = Table::new(&[
        "id",
        "dir",
        "event",
        "workload",
        "src",
        "orig dst -> dst",
        "service",
        "security",
        "sent",
        "recv",
        "duration",
        "policy",
        "error",
    ]);
    for f in flows.iter().filter(|f| f.is_terminal()) {
        let dir = match f.direction {
            Direction::Outbound => "out",
            Direction::Inbound => "in",
        };
        let event = match f.event {
            FlowEvent::Open => "open",
            FlowEvent::Close => "close",
            FlowEvent::Error => "error",
        };
        let route = if f.orig_dst == f.dst {
            show_addr(f.dst)
        } else {
            format!("{} -> {}", show_addr(f.orig_dst), show_addr(f.dst))
        };
        t.row(vec![
            f.id.to_string(),
            dir.to_owned(),
            event.to_owned(),
            f.workload.clone(),
            show_addr(f.src),
            route,
            f.service.clone().unwrap_or_else(|| "-".to_owned()),
            security(f.security).to_owned(),
            f.bytes_sent.to_string(),
            f.bytes_received.to_string(),
            f.duration_ms.map_or_else(|| "-".to_owned(), |d| format!("{d:.1} ms")),
            policy(f),
            f.error.clone().unwrap_or_default(),
        ]);
    }
    t
}

/// What authorization policy decided, for a table cell: `demo/p rule 0`,
/// `denied: demo/p rule 1`, `... audited by demo/a`; empty when no policy
/// applied.
fn policy(f: &Flow) -> String {
    let denied = f.verdict == Some(Verdict::Denied);
    let mut cell = String::new();
    if denied {
        cell.push_str("denied: ");
    }
    let _ = match (&f.policy, f.policy_rule) {
        (Some(p), Some(rule)) => write!(cell, "{p} rule {rule}"),
        (Some(p), None) => write!(cell, "{p} (no ALLOW rule matched)"),
        (None, _) if denied && f.direction == Direction::Outbound => {
            write!(cell, "by the destination")
        }
        (None, _) if denied => write!(cell, "fail closed"),
        (None, _) => Ok(()),
    };
    if let Some(a) = &f.audit_policy {
        let _ = write!(cell, " audited by {a}");
    }
    cell.trim().to_owned()
}

/// How a flow's security reads in a table.
fn security(s: Security) -> &'static str {
    match s {
        Security::MutualTls => "mTLS",
        Security::Plaintext => "plaintext",
    }
}

/// One row per tunnelled connection (finished `mutual_tls` records): who
/// talked to whom, by SPIFFE ID, and the client certificate's serial.
#[must_use]
pub fn identity_table(flows: &[Flow]) -> Table {
    let mut t = Table::new(&["id", "dir", "client identity", "server identity", "client cert serial"]);
    for f in flows.iter().filter(|f| f.is_terminal() && f.is_mutual_tls()) {
        t.row(vec![
            f.id.to_string(),
            match f.direction {
                Direction::Outbound => "out",
                Direction::Inbound => "in",
            }
            .to_owned(),
            f.src_identity.clone().unwrap_or_else(|| "-".to_owned()),
            f.dst_identity.clone().unwrap_or_else(|| "-".to_owned()),
            f.peer_cert_serial.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    t
}

/// One row per certificate an agent holds.
#[must_use]
pub fn cert_table(certs: &Certs) -> Table {
    let mut t = Table::new(&["identity", "ready", "generation", "valid for", "last error"]);
    for c in &certs.certificates {
        let valid = match (c.issued_at, c.not_after) {
            (Some(from), Some(to)) => format!("{} s", to.saturating_sub(from)),
            _ => "-".to_owned(),
        };
        t.row(vec![
            c.identity.clone(),
            c.ready.to_string(),
            c.generation.map_or_else(|| "-".to_owned(), |g| g.to_string()),
            valid,
            c.last_error.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    t
}

/// One row per workload with its counters.
#[must_use]
pub fn workload_table(workloads: &[Workload]) -> Table {
    let mut t =
        Table::new(&["workload", "node", "ips", "enrolled", "captured", "out conns", "in conns", "sent", "recv"]);
    for w in workloads {
        let ips: Vec<String> = w.ips.iter().map(ToString::to_string).collect();
        t.row(vec![
            w.qualified_name(),
            w.node.clone(),
            ips.join(","),
            w.enrolled.to_string(),
            w.captured.to_string(),
            w.outbound_connections.to_string(),
            w.inbound_connections.to_string(),
            w.bytes_sent.to_string(),
            w.bytes_received.to_string(),
        ]);
    }
    t
}

/// Reason counters (all of them, in the agent's order) and map occupancy.
#[must_use]
pub fn datapath_tables(datapath: &Datapath) -> (Table, Table) {
    let mut reasons = Table::new(&["reason", "count"]);
    for (name, count) in &datapath.reasons {
        reasons.row(vec![name.clone(), count.to_string()]);
    }
    let mut maps = Table::new(&["map", "entries", "capacity"]);
    for (name, m) in &datapath.maps {
        maps.row(vec![name.clone(), m.entries.to_string(), m.capacity.to_string()]);
    }
    (reasons, maps)
}

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn aligns_columns_to_the_widest_cell() {
        let mut t = Table::new(&["a", "bb"]);
        t.row(vec!["long cell".into(), "x".into()]);
        let text = t.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "  a          bb");
        assert_eq!(lines[2], "  long cell  x");
    }
}
