//! A partition's state in transit: what a hand-off carries and what arrives, and what a
//! replication batch carries of it.

use std::collections::HashMap;

use super::apply_record;
use super::records::Pair;
use crate::drivers::{Snapshot, decode_records};
use crate::history::Pos;

/// What one partition's hand-off carries.
pub struct PartitionData {
    pub partition: u16,
    pub epoch: u64,
    /// Drivers as full log records.
    pub drivers: Vec<u8>,
    pub claims: Vec<Pair>,
    pub trips: Vec<Pair>,
    /// Its fix history: the floor and the framed blocks.
    pub history: History,
}

/// A partition's fix history in a hand-off: positions at or before the floor are not in
/// the blocks (`history::HistoryStore::export`).
#[derive(Clone, Debug, Default)]
pub struct History {
    pub floor: Option<Pos>,
    pub blocks: Vec<u8>,
    /// The holder keeps segments older than the blocks (the new owner copies them).
    pub older: bool,
}

/// A partition on its way into this node's shards: pulled (its records decoded) or a
/// replica being promoted (its drivers as the replica store holds them, no re-encoding).
pub struct Arriving {
    pub partition: u16,
    pub drivers: HashMap<String, Snapshot>,
    pub claims: Vec<Pair>,
    pub trips: Vec<Pair>,
    /// `None`: the history is already here (a promoted replica's).
    pub history: Option<History>,
}

impl Arriving {
    /// Decodes a pulled partition's records (each driver's trail capped at `trail_cap`).
    pub fn decode(d: PartitionData, trail_cap: usize) -> Result<Arriving, String> {
        let mut drivers = HashMap::new();
        let (_, err) = decode_records(&d.drivers, |r| apply_record(&mut drivers, r, trail_cap));
        match err {
            Some(e) => Err(e.to_string()),
            None => Ok(Arriving {
                partition: d.partition,
                drivers,
                claims: d.claims,
                trips: d.trips,
                history: Some(d.history),
            }),
        }
    }
}

/// A change to one claim or trip record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvChange {
    pub id: Vec<u8>,
    /// `None`: deleted.
    pub value: Option<Vec<u8>>,
}

/// One partition's changes in a replication batch.
#[derive(Clone, Debug, Default)]
pub struct ReplicaPart {
    pub partition: u16,
    pub epoch: u64,
    pub drivers_reset: bool,
    pub drivers: Vec<u8>,
    pub kv_reset: bool,
    pub claims: Vec<KvChange>,
    pub trips: Vec<KvChange>,
    /// History blocks (`history::codec`), in order.
    pub history: Vec<u8>,
}
