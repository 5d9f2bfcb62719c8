//! A process's CPU time and memory, read from `/proc`, for the benchmark
//! and the soak.

use std::io;

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// User plus system CPU seconds `pid` has used.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces): utime is
    // field 14 and stime field 15 of the whole line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> io::Result<f64> {
        fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(|| invalid(format!("/proc/{pid}/stat: {stat}")))
    };
    let ticks = tick(11)? + tick(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks / f64::from(u32::try_from(hz).unwrap_or(100)))
}

/// A memory field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...) in MiB.
pub fn status_mib(pid: u32, field: &str) -> io::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| invalid(format!("/proc/{pid}/status has no {field}")))?;
    Ok(kib / 1024.0)
}
