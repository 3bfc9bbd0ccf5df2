//! The wall clock: milliseconds since the Unix epoch, as fixes, TTLs and offer
//! deadlines count them. (Leases and timeouts use the monotonic clock instead.)

/// Milliseconds since the Unix epoch, from the system clock.
pub fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
