//! The replica side: copies of other nodes' partitions, kept in memory. Pure.
//!
//! Each replicated partition has the owner that feeds it, the epoch the owner holds it
//! at, its drivers (applied from driver-log records exactly like a log replay), and its
//! claims and trips (id → stored value). A replica is *in sync* once it has had both a
//! driver reset and a claims/trips reset from its owner in the current session; only
//! in-sync replicas are reported in surveys and promoted.
//!
//! Fencing: a part at an epoch below the one held here is refused; a higher epoch (a new
//! owner) replaces the copy. A new session from an owner (its link broke and changes may
//! be missing) marks every replica it feeds out of sync until reset again.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use crate::drivers::snapshot_ref;
use crate::drivers::{Snapshot, decode_records, encode_upsert};
use crate::storage::apply_record;
use crate::storage::{Arriving, KvChange, PartitionData, ReplicaPart};

/// Why a replica refused a part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The part's epoch is below the one held here (its sender is a stale owner).
    StaleEpoch { sent: u64, held: u64 },
    /// This node serves the partition itself (a move in progress).
    ServedHere,
    /// Applied, but the copy is not in sync yet (no full reset of it in this session):
    /// it could not be promoted, so the change does not count as replicated here.
    NotSynced,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::StaleEpoch { sent, held } => {
                write!(f, "stale epoch {sent}: the partition is at epoch {held} here")
            }
            Refused::ServedHere => write!(f, "the partition is served by this node, not replicated here"),
            Refused::NotSynced => write!(f, "the copy here is not in sync yet (waiting for a full reset)"),
        }
    }
}

struct Copy {
    owner: SocketAddr,
    epoch: u64,
    drivers: HashMap<String, Snapshot>,
    claims: BTreeMap<Vec<u8>, Vec<u8>>,
    trips: BTreeMap<Vec<u8>, Vec<u8>>,
    drivers_synced: bool,
    kv_synced: bool,
    /// The store's [`ReplicaStore::generation`] when the copy was made or last reset.
    touched: u64,
}

impl Copy {
    fn new(owner: SocketAddr, epoch: u64, touched: u64) -> Copy {
        Copy {
            owner,
            epoch,
            touched,
            drivers: HashMap::new(),
            claims: BTreeMap::new(),
            trips: BTreeMap::new(),
            drivers_synced: false,
            kv_synced: false,
        }
    }

    fn synced(&self) -> bool {
        self.drivers_synced && self.kv_synced
    }
}

/// Every replica this node keeps. Owned behind one mutex by the hand-off shell.
#[derive(Default)]
pub struct ReplicaStore {
    parts: HashMap<u16, Copy>,
    sessions: HashMap<SocketAddr, u64>,
    trail_cap: usize,
    /// Counts copies made and resets applied (see [`ReplicaStore::generation`]).
    generation: u64,
}

/// A summary of one replica, for `admin` and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub partition: u16,
    pub epoch: u64,
    pub owner: SocketAddr,
    pub drivers: usize,
    pub claims: usize,
    pub trips: usize,
    pub synced: bool,
    /// The store's generation when the copy was made or last reset.
    pub touched: u64,
}

fn apply_kv(map: &mut BTreeMap<Vec<u8>, Vec<u8>>, reset: bool, changes: Vec<KvChange>) {
    if reset {
        map.clear();
    }
    for c in changes {
        match c.value {
            Some(v) => {
                map.insert(c.id, v);
            }
            None => {
                map.remove(&c.id);
            }
        }
    }
}

impl ReplicaStore {
    pub fn new(trail_cap: usize) -> ReplicaStore {
        ReplicaStore { trail_cap, ..Default::default() }
    }

    /// Applies one batch from `from`; returns the parts refused, with the reason.
    /// `served_here(p)` says whether this node serves `p` itself (then it is no replica).
    pub fn apply(
        &mut self,
        from: SocketAddr,
        session: u64,
        parts: Vec<ReplicaPart>,
        served_here: impl Fn(u16) -> bool,
    ) -> Vec<(u16, Refused)> {
        if self.sessions.get(&from) != Some(&session) {
            for c in self.parts.values_mut().filter(|c| c.owner == from) {
                c.drivers_synced = false;
                c.kv_synced = false;
            }
            self.sessions.insert(from, session);
        }
        let mut refused = Vec::new();
        for part in parts {
            let p = part.partition;
            if served_here(p) {
                refused.push((p, Refused::ServedHere));
                continue;
            }
            let copy = match self.parts.get_mut(&p) {
                Some(c) if part.epoch < c.epoch => {
                    refused.push((p, Refused::StaleEpoch { sent: part.epoch, held: c.epoch }));
                    continue;
                }
                Some(c) if c.epoch == part.epoch && c.owner == from => c,
                _ => {
                    self.generation += 1;
                    self.parts.insert(p, Copy::new(from, part.epoch, self.generation));
                    self.parts.get_mut(&p).expect("inserted")
                }
            };
            if part.drivers_reset || part.kv_reset {
                self.generation += 1;
                copy.touched = self.generation;
            }
            if part.drivers_reset {
                copy.drivers.clear();
                copy.drivers_synced = true;
            }
            let cap = self.trail_cap;
            let (_, err) = decode_records(&part.drivers, |r| apply_record(&mut copy.drivers, r, cap));
            if err.is_some() {
                // Records are missing: wait for the next reset.
                copy.drivers_synced = false;
            }
            if part.kv_reset {
                copy.kv_synced = true;
            }
            // A claim or trip change (what a write waits for) into a copy not in sync.
            // Resets wait for nothing: half of one (claims and trips, then drivers, on
            // their own paths) is the normal way to sync.
            let change = !part.kv_reset && (!part.claims.is_empty() || !part.trips.is_empty());
            apply_kv(&mut copy.claims, part.kv_reset, part.claims);
            apply_kv(&mut copy.trips, part.kv_reset, part.trips);
            if change && !copy.synced() {
                refused.push((p, Refused::NotSynced));
            }
        }
        refused
    }

    /// A counter that grows with every copy made and every reset applied: a copy whose
    /// `touched` is above a generation read earlier was made or reset since, by an owner
    /// that may know a newer ring than the reader (see `handoff`'s stale-replica sweep).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// In-sync replicas: (partition, epoch).
    pub fn synced(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.parts.iter().filter(|(_, c)| c.synced()).map(|(p, c)| (*p, c.epoch))
    }

    /// The epoch of the in-sync replica of `p`, if any.
    pub fn synced_epoch(&self, p: u16) -> Option<u64> {
        self.parts.get(&p).filter(|c| c.synced()).map(|c| c.epoch)
    }

    /// The replica of `p` as hand-off data (drivers as full records), if in sync.
    pub fn data(&self, p: u16) -> Option<PartitionData> {
        let c = self.parts.get(&p).filter(|c| c.synced())?;
        let mut drivers = Vec::new();
        for s in c.drivers.values() {
            encode_upsert(&mut drivers, &s.driver_id, &snapshot_ref(s), None);
        }
        let pairs = |m: &BTreeMap<Vec<u8>, Vec<u8>>| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Some(PartitionData {
            partition: p,
            epoch: c.epoch,
            drivers,
            claims: pairs(&c.claims),
            trips: pairs(&c.trips),
            history: Default::default(),
        })
    }

    /// The replica of `p`, if in sync, ready to be served here (its drivers as held,
    /// not re-encoded: promotion is on the failover's critical path).
    pub fn promotable(&self, p: u16) -> Option<Arriving> {
        let c = self.parts.get(&p).filter(|c| c.synced())?;
        let pairs = |m: &BTreeMap<Vec<u8>, Vec<u8>>| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Some(Arriving {
            partition: p,
            drivers: c.drivers.clone(),
            claims: pairs(&c.claims),
            trips: pairs(&c.trips),
            history: None,
        })
    }

    /// Drops the replica of `p` if its epoch is below `epoch` (`u64::MAX`: always).
    pub fn drop_below(&mut self, p: u16, epoch: u64) -> bool {
        if self.parts.get(&p).is_some_and(|c| c.epoch < epoch) {
            self.parts.remove(&p);
            return true;
        }
        false
    }

    pub fn info(&self) -> Vec<ReplicaInfo> {
        let mut v: Vec<ReplicaInfo> = self
            .parts
            .iter()
            .map(|(p, c)| ReplicaInfo {
                partition: *p,
                epoch: c.epoch,
                owner: c.owner,
                drivers: c.drivers.len(),
                claims: c.claims.len(),
                trips: c.trips.len(),
                synced: c.synced(),
                touched: c.touched,
            })
            .collect();
        v.sort_by_key(|i| i.partition);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::{Position, SnapshotRef, Status, Trail, encode_delete};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn upsert(buf: &mut Vec<u8>, id: &str, ts: i64) {
        let last = Position { lat: 1.0, lon: 2.0, timestamp_ms: ts, heading_deg: 0.0, speed_mps: 0.0, accuracy_m: 5.0 };
        let trail = Trail::default();
        let snap = SnapshotRef {
            status: Status::Available,
            vehicle_type: "car",
            last: &last,
            received_ms: ts,
            trip_cost: 0.0,
            cab: "",
            session: "",
            trip_id: "",
            trail: &trail,
        };
        encode_upsert(buf, id, &snap, None);
    }

    fn kv(id: &str, v: Option<&str>) -> KvChange {
        KvChange { id: id.as_bytes().to_vec(), value: v.map(|v| v.as_bytes().to_vec()) }
    }

    fn reset(p: u16, epoch: u64, ids: &[&str], claims: Vec<KvChange>) -> ReplicaPart {
        let mut drivers = Vec::new();
        for id in ids {
            upsert(&mut drivers, id, 1000);
        }
        ReplicaPart { partition: p, epoch, drivers_reset: true, drivers, kv_reset: true, claims, ..Default::default() }
    }

    #[test]
    fn copies_made_or_reset_since_a_generation_was_read_stand_above_it() {
        let mut s = ReplicaStore::new(8);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let reset =
            |p| ReplicaPart { partition: p, epoch: 1, kv_reset: true, drivers_reset: true, ..Default::default() };
        s.apply(a, 1, vec![reset(3)], |_| false);
        let g = s.generation();
        s.apply(a, 1, vec![ReplicaPart { partition: 3, epoch: 1, ..Default::default() }], |_| false);
        assert!(s.info().iter().all(|i| i.touched <= g), "a plain change is no reset");
        s.apply(a, 1, vec![reset(3), ReplicaPart { partition: 4, epoch: 1, ..Default::default() }], |_| false);
        assert!(s.info().iter().all(|i| i.touched > g), "reset, and made: {:?}", s.info());
    }

    #[test]
    fn synced_only_after_both_resets() {
        let mut s = ReplicaStore::new(8);
        let mut drivers = Vec::new();
        upsert(&mut drivers, "d1", 1);
        let part = ReplicaPart { partition: 3, epoch: 2, drivers, ..Default::default() };
        assert!(s.apply(addr(1), 7, vec![part], |_| false).is_empty());
        assert_eq!(s.synced_epoch(3), None, "records alone are not a replica");
        let part = ReplicaPart {
            partition: 3,
            epoch: 2,
            kv_reset: true,
            claims: vec![kv("d1", Some("c"))],
            ..Default::default()
        };
        s.apply(addr(1), 7, vec![part], |_| false);
        assert_eq!(s.synced_epoch(3), None, "no driver reset yet");
        s.apply(
            addr(1),
            7,
            vec![ReplicaPart { partition: 3, epoch: 2, drivers_reset: true, ..Default::default() }],
            |_| false,
        );
        assert_eq!(s.synced_epoch(3), Some(2));
        let d = s.data(3).expect("in sync");
        assert!(d.drivers.is_empty(), "the reset cleared d1, which was not in it");
        assert_eq!(d.claims, vec![(b"d1".to_vec(), b"c".to_vec())]);
    }

    #[test]
    fn a_change_to_a_copy_not_in_sync_is_refused_so_it_does_not_count_as_stored() {
        let mut s = ReplicaStore::new(8);
        // A trip written before the copy was reset (a move, or the first seconds of a
        // cluster): applied, but the copy could not be promoted, so it is refused.
        let early = ReplicaPart { partition: 4, epoch: 1, trips: vec![kv("t1", Some("x"))], ..Default::default() };
        let refused = s.apply(addr(1), 1, vec![early], |_| false);
        assert_eq!(refused.len(), 1);
        assert!(matches!(refused[0].1, Refused::NotSynced), "{}", refused[0].1);
        // Half a reset is not refused (nothing waits for it), but not in sync either.
        let kv_only = ReplicaPart {
            partition: 4,
            epoch: 1,
            kv_reset: true,
            trips: vec![kv("t1", Some("x"))],
            ..Default::default()
        };
        assert!(s.apply(addr(1), 1, vec![kv_only], |_| false).is_empty());
        let early = ReplicaPart { partition: 4, epoch: 1, trips: vec![kv("t1", Some("x2"))], ..Default::default() };
        assert_eq!(s.apply(addr(1), 1, vec![early], |_| false).len(), 1);
        let drivers = ReplicaPart { partition: 4, epoch: 1, drivers_reset: true, ..Default::default() };
        assert!(s.apply(addr(1), 1, vec![drivers], |_| false).is_empty());
        // In sync: changes count.
        let later = ReplicaPart { partition: 4, epoch: 1, trips: vec![kv("t2", Some("y"))], ..Default::default() };
        assert!(s.apply(addr(1), 1, vec![later], |_| false).is_empty());
        assert_eq!(s.data(4).expect("in sync").trips.len(), 2);
    }

    #[test]
    fn changes_apply_in_order_and_deletes_remove() {
        let mut s = ReplicaStore::new(8);
        s.apply(addr(1), 1, vec![reset(5, 1, &["a", "b"], vec![kv("a", Some("t1"))])], |_| false);
        let mut drivers = Vec::new();
        encode_delete(&mut drivers, "a");
        upsert(&mut drivers, "c", 2000);
        let part = ReplicaPart {
            partition: 5,
            epoch: 1,
            drivers,
            claims: vec![kv("a", None), kv("b", Some("t2"))],
            trips: vec![kv("trip", Some("x"))],
            ..Default::default()
        };
        s.apply(addr(1), 1, vec![part], |_| false);
        let d = s.data(5).expect("in sync");
        let mut got = Vec::new();
        decode_records(&d.drivers, |r| {
            if let crate::drivers::Record::Upsert { snap, .. } = r {
                got.push(snap.driver_id);
            }
        });
        got.sort();
        assert_eq!(got, vec!["b".to_string(), "c".to_string()]);
        assert_eq!(d.claims, vec![(b"b".to_vec(), b"t2".to_vec())]);
        assert_eq!(d.trips, vec![(b"trip".to_vec(), b"x".to_vec())]);
    }

    #[test]
    fn older_epochs_are_refused_newer_replace() {
        let mut s = ReplicaStore::new(8);
        s.apply(addr(1), 1, vec![reset(9, 4, &["a"], vec![])], |_| false);
        let refused = s.apply(addr(2), 1, vec![reset(9, 3, &["zombie"], vec![])], |_| false);
        assert_eq!(refused.len(), 1);
        assert!(refused[0].1.to_string().contains("stale epoch 3"), "{}", refused[0].1);
        assert_eq!(s.info()[0].owner, addr(1));
        // A new owner at a higher epoch: its copy replaces the old one, unsynced until reset.
        s.apply(addr(2), 1, vec![ReplicaPart { partition: 9, epoch: 5, ..Default::default() }], |_| false);
        assert_eq!(s.synced_epoch(9), None);
        s.apply(addr(2), 1, vec![reset(9, 5, &["b"], vec![])], |_| false);
        assert_eq!(s.synced_epoch(9), Some(5));
        assert_eq!(s.info()[0].drivers, 1);
    }

    #[test]
    fn a_new_session_unsyncs_that_owners_replicas_only() {
        let mut s = ReplicaStore::new(8);
        s.apply(addr(1), 1, vec![reset(1, 1, &["a"], vec![])], |_| false);
        s.apply(addr(2), 1, vec![reset(2, 1, &["b"], vec![])], |_| false);
        s.apply(addr(1), 2, vec![], |_| false);
        assert_eq!(s.synced_epoch(1), None, "owner 1's link broke: changes may be missing");
        assert_eq!(s.synced_epoch(2), Some(1));
        s.apply(addr(1), 2, vec![reset(1, 1, &["a"], vec![])], |_| false);
        assert_eq!(s.synced_epoch(1), Some(1));
    }

    #[test]
    fn a_partition_served_here_is_no_replica_and_drop_below_fences() {
        let mut s = ReplicaStore::new(8);
        let refused = s.apply(addr(1), 1, vec![reset(4, 1, &["a"], vec![])], |p| p == 4);
        assert_eq!(refused.len(), 1);
        assert!(s.info().is_empty());
        s.apply(addr(1), 1, vec![reset(6, 3, &["a"], vec![])], |_| false);
        assert!(!s.drop_below(6, 3), "the owner's own epoch keeps it");
        assert!(s.drop_below(6, 4));
        assert!(s.info().is_empty());
    }
}
