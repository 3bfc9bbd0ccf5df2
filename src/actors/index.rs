//! The node's secondary indexes: cab number and session to driver id.

use std::sync::Mutex;

// foldhash (randomly seeded): a session lookup per UDP fix makes SipHash show.
use hashbrown::HashMap;

use crate::drivers::IndexKind;
use crate::keys::key_hash;

/// `cab_number → driver` and `session → driver`. Written by shard workers when a
/// driver's cab or session changes (rare: never per fix); read by lookups. If two
/// drivers report the same cab number, the latest claim answers, and the other still
/// does once the latest moves on.
///
/// It is shared by all shard workers, so it is a striped map behind std mutexes that are
/// never held across an await or for more than one map operation. Entries can be
/// momentarily stale; the driver's shard verifies every hit (see `Lookup`).
pub struct SecondaryIndex {
    stripes: [Vec<Stripe>; 2],
}

const STRIPES: usize = 16;

/// One lock's share of an index: key → the drivers that claim it, latest claim last
/// (almost always exactly one).
type Stripe = Mutex<HashMap<Box<str>, Vec<Box<str>>>>;

impl Default for SecondaryIndex {
    fn default() -> Self {
        let mk = || (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect();
        SecondaryIndex { stripes: [mk(), mk()] }
    }
}

impl SecondaryIndex {
    fn stripe(&self, kind: IndexKind, key: &str) -> &Stripe {
        let s = &self.stripes[kind as usize];
        &s[(key_hash(key.as_bytes()) % STRIPES as u64) as usize]
    }

    /// `driver_id` now claims `key`; the latest claim is tried first by lookups.
    pub fn set(&self, kind: IndexKind, key: Box<str>, driver_id: Box<str>) {
        let mut m = self.stripe(kind, &key).lock().expect("index lock");
        let holders = m.entry(key).or_default();
        holders.retain(|d| *d != driver_id);
        holders.push(driver_id);
    }

    /// `driver_id` no longer claims `key`; other claimants keep it.
    pub fn unset(&self, kind: IndexKind, key: &str, driver_id: &str) {
        let mut m = self.stripe(kind, key).lock().expect("index lock");
        if let Some(holders) = m.get_mut(key) {
            holders.retain(|d| &**d != driver_id);
            if holders.is_empty() {
                m.remove(key);
            }
        }
    }

    /// The driver that claimed `key` last, if any (one lookup, one copy).
    pub fn latest(&self, kind: IndexKind, key: &str) -> Option<String> {
        let m = self.stripe(kind, key).lock().expect("index lock");
        m.get(key).and_then(|h| h.last()).map(|d| d.to_string())
    }

    /// The drivers claiming `key`, latest claim first.
    pub fn get(&self, kind: IndexKind, key: &str) -> Vec<String> {
        let m = self.stripe(kind, key).lock().expect("index lock");
        m.get(key).map(|h| h.iter().rev().map(|d| d.to_string()).collect()).unwrap_or_default()
    }
}
