//! sled trees keyed by partition first (`keys::pkey`): claims, trips and the ownership
//! table. One partition's records are one prefix range, so it moves, is discarded or
//! is counted by one scan.

use std::collections::HashMap;

use super::apply_record;
use crate::drivers::{Snapshot, decode_records};
use crate::keys::{partition_prefix, pkey, pkey_bytes};

/// Opens `<name>.v2` (keyed by partition, then id). Records of the earlier `<name>` tree
/// (keyed by id alone) are moved into it once.
pub fn open_partitioned(db: &sled::Db, name: &str) -> sled::Result<sled::Tree> {
    let tree = db.open_tree(format!("{name}.v2"))?;
    if db.tree_names().iter().any(|n| n.as_ref() == name.as_bytes()) {
        let old = db.open_tree(name)?;
        let mut b = sled::Batch::default();
        for (k, v) in old.iter().filter_map(Result::ok) {
            if let Ok(id) = std::str::from_utf8(&k) {
                b.insert(pkey(id), v);
            }
        }
        tree.apply_batch(b)?;
        tree.flush()?;
        db.drop_tree(name)?;
    }
    Ok(tree)
}

/// Deletes partition `p`'s records; returns how many there were.
pub fn delete_prefix(tree: &sled::Tree, p: u16) -> sled::Result<usize> {
    let mut b = sled::Batch::default();
    let mut n = 0;
    for k in tree.scan_prefix(partition_prefix(p)).keys() {
        b.remove(k?);
        n += 1;
    }
    tree.apply_batch(b)?;
    Ok(n)
}

/// Partition `p`'s records as (id, value) pairs.
pub fn scan_partition(tree: &sled::Tree, p: u16) -> Vec<(Vec<u8>, Vec<u8>)> {
    tree.scan_prefix(partition_prefix(p)).filter_map(Result::ok).map(|(k, v)| (k[2..].to_vec(), v.to_vec())).collect()
}

/// Writes (id, value) pairs keyed by their partition (the caller flushes).
pub fn store_pairs(tree: &sled::Tree, pairs: &[(Vec<u8>, Vec<u8>)]) -> sled::Result<()> {
    let mut b = sled::Batch::default();
    for (id, v) in pairs {
        b.insert(pkey_bytes(id), v.as_slice());
    }
    tree.apply_batch(b)
}

/// What one partition's hand-off carries.
pub struct PartitionData {
    pub partition: u16,
    pub epoch: u64,
    /// Drivers as full log records.
    pub drivers: Vec<u8>,
    pub claims: Vec<(Vec<u8>, Vec<u8>)>,
    pub trips: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A partition on its way into this node's shards: pulled (its records decoded) or a
/// replica being promoted (its drivers as the replica store holds them, no re-encoding).
pub struct Arriving {
    pub partition: u16,
    pub drivers: HashMap<String, Snapshot>,
    pub claims: Vec<(Vec<u8>, Vec<u8>)>,
    pub trips: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Arriving {
    /// Decodes a pulled partition's records (each driver's trail capped at `trail_cap`).
    pub fn decode(d: PartitionData, trail_cap: usize) -> Result<Arriving, String> {
        let mut drivers = HashMap::new();
        let (_, err) = decode_records(&d.drivers, |r| apply_record(&mut drivers, r, trail_cap));
        match err {
            Some(e) => Err(e.to_string()),
            None => Ok(Arriving { partition: d.partition, drivers, claims: d.claims, trips: d.trips }),
        }
    }
}
