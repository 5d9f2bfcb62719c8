//! Random draws at a per-million rate: trace sampling
//! ([`crate::trace::Tracer::sample`]) and fault injection at the waypoint
//! use the same one, so a configured share means the same thing in both.

/// Whether a draw hits a share of `per_million` (1,000,000 or more: always).
#[must_use]
pub fn per_million(per_million: u32) -> bool {
    rand::random::<u32>() % 1_000_000 < per_million
}
