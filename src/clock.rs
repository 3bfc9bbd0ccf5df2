//! The wall clock: milliseconds since the Unix epoch, as fixes, TTLs and offer
//! deadlines count them. (Leases and timeouts use the monotonic clock instead,
//! `tokio::time::Instant`.)
//!
//! A process that runs a whole cluster in paused time (the in-process harness,
//! `tests/harness`) calls [`simulate`] first: from then on the wall clock is the moment
//! of that call plus the tokio clock's advance since, so TTLs and offer timeouts run on
//! the same virtual time as every sleep and lease.

use std::sync::OnceLock;

static SIMULATED: OnceLock<(i64, tokio::time::Instant)> = OnceLock::new();

/// Milliseconds since the Unix epoch: the system clock, or the simulated one.
pub fn wall_ms() -> i64 {
    match SIMULATED.get() {
        None => system_ms(),
        Some((base, at)) => base + at.elapsed().as_millis() as i64,
    }
}

fn system_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Makes [`wall_ms`] follow the tokio clock (call it inside a runtime with paused
/// time, before any node starts). Once per process; later calls change nothing.
pub fn simulate() {
    let _ = SIMULATED.set((system_ms(), tokio::time::Instant::now()));
}

/// Whether [`simulate`] was called: blocking work then runs where the paused clock
/// waits for it (`spawn_blocking`), not on a thread it cannot see.
pub fn simulated() -> bool {
    SIMULATED.get().is_some()
}
