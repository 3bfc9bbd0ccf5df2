//! The quorum lease as every part of a node that acts for a partition reads it.
//!
//! The hand-off task computes the minority rule ([`super::has_quorum`]) and writes two
//! things here: whether the node serves (after a full survey round with a quorum) and
//! until when, on the monotonic clock, the majority was last heard. Keyed requests,
//! shard timers (driver expiry, offer timeouts) and trip timers (TTL) read [`Lease::holds`]
//! at the moment they would act, so a node that was frozen or cut off does nothing for
//! its partitions from its first instruction afterwards, before any task has noticed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::time::Instant;

#[derive(Debug)]
pub struct Lease {
    serving: AtomicBool,
    /// Until when the lease holds, in ns after `born` (u64::MAX: for good).
    until: AtomicU64,
    born: Instant,
}

impl Default for Lease {
    /// Serving, for good: a node alone, or a test or benchmark without a cluster.
    fn default() -> Self {
        Lease { serving: AtomicBool::new(true), until: AtomicU64::new(u64::MAX), born: Instant::now() }
    }
}

impl Lease {
    /// Serving and the lease not run out, as of the monotonic clock now.
    pub fn holds(&self) -> bool {
        let until = self.until.load(Ordering::Acquire);
        self.serving.load(Ordering::Acquire) && (until == u64::MAX || (self.born.elapsed().as_nanos() as u64) < until)
    }

    pub fn set_until(&self, t: Instant) {
        let ns = t.saturating_duration_since(self.born).as_nanos().min(u64::MAX as u128 - 1) as u64;
        self.until.store(ns, Ordering::Release);
    }

    /// Serving, whatever the clock says (false only while regaining service).
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    pub fn set_serving(&self, s: bool) {
        self.serving.store(s, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn holds_until_it_runs_out_or_the_node_stops_serving() {
        let l = Lease::default();
        assert!(l.holds());
        l.set_until(Instant::now() + Duration::from_secs(60));
        assert!(l.holds());
        l.set_serving(false);
        assert!(!l.holds());
        l.set_serving(true);
        l.set_until(Instant::now());
        assert!(!l.holds(), "a lease that ran out (a thawed node) holds nothing");
    }
}
