//! The record store: claims, trips and the ownership table, behind one trait with two
//! implementations, sled ([`SledStore`], production) and memory ([`MemStore`]).
//!
//! Records are keyed by partition first, then id, so a partition moves, is discarded or
//! is counted by one range scan. These records change rarely (a claim, a trip event, a
//! hand-off), unlike driver fixes, which go to the driver log. Each record has one
//! writer: a claim its driver's shard, a trip its actor, a partition's holding the
//! hand-off task. Whoever answers a client flushes ([`RecordStore::flush`]) before it
//! does; flushes are group commits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};

use super::Durable;
use crate::keys::{partition_of, partition_prefix};

/// A record store failed (IO, corruption); the message says which and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("record store: {0}")]
pub struct RecordError(pub String);

impl From<sled::Error> for RecordError {
    fn from(e: sled::Error) -> RecordError {
        RecordError(e.to_string())
    }
}

/// An (id, value) pair of one partition.
pub type Pair = (Vec<u8>, Vec<u8>);

/// One named set of records (claims, trips, the ownership table), keyed by
/// (partition, id). Writes are visible at once and durable after the store's next flush.
pub trait Records: Send + Sync {
    fn get(&self, p: u16, id: &[u8]) -> Result<Option<Vec<u8>>, RecordError>;
    fn put(&self, p: u16, id: &[u8], value: &[u8]) -> Result<(), RecordError>;
    fn delete(&self, p: u16, id: &[u8]) -> Result<(), RecordError>;
    /// Writes every pair under partition `p` at once.
    fn put_all(&self, p: u16, pairs: &[Pair]) -> Result<(), RecordError>;
    /// Partition `p`'s records as (id, value) pairs, by id.
    fn scan(&self, p: u16) -> Result<Vec<Pair>, RecordError>;
    /// How many records partition `p` holds.
    fn count(&self, p: u16) -> usize;
    /// Deletes partition `p`'s records; returns how many there were.
    fn delete_partition(&self, p: u16) -> Result<usize, RecordError>;
    /// The partitions that hold at least one record.
    fn partitions(&self) -> Result<BTreeSet<u16>, RecordError>;

    /// [`Records::get`] of a record keyed by its id's partition (claims, trips).
    fn get_keyed(&self, id: &[u8]) -> Result<Option<Vec<u8>>, RecordError> {
        self.get(partition_of(id), id)
    }
    fn put_keyed(&self, id: &[u8], value: &[u8]) -> Result<(), RecordError> {
        self.put(partition_of(id), id, value)
    }
    fn delete_keyed(&self, id: &[u8]) -> Result<(), RecordError> {
        self.delete(partition_of(id), id)
    }

    /// [`Records::scan`] for callers that carry on without the records: a failure is
    /// logged and reads as none.
    fn scan_or_log(&self, p: u16) -> Vec<Pair> {
        self.scan(p).unwrap_or_else(|e| {
            tracing::warn!(partition = p, error = %e, "cannot read a partition's records");
            Vec::new()
        })
    }
}

/// A future of the store.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, RecordError>> + Send + 'a>>;

/// The node's record store: its named record sets, a few single values (`meta`) and
/// one flush for all.
pub trait RecordStore: Send + Sync {
    /// The record set `name`, created if missing.
    fn records(&self, name: &str) -> Result<Arc<dyn Records>, RecordError>;
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, RecordError>;
    fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), RecordError>;
    /// Resolves once everything written before the call is durable.
    fn flush(&self) -> StoreFuture<'_, ()>;
}

/// sled: one tree per record set (`<name>.v2`, keys `partition ‖ id`), a `meta` tree,
/// and flushes group-committed on one thread ([`Durable`]).
pub struct SledStore {
    db: sled::Db,
    meta: sled::Tree,
    durable: Durable,
}

impl SledStore {
    pub fn open(db: sled::Db) -> Result<SledStore, RecordError> {
        let meta = db.open_tree("meta")?;
        // Earlier versions kept the quorum base in a tree of its own.
        if db.tree_names().iter().any(|n| n.as_ref() == b"quorum") {
            let old = db.open_tree("quorum")?;
            if let Some(v) = old.get(b"base")? {
                meta.insert("quorum_base", v)?;
            }
            meta.flush()?;
            db.drop_tree("quorum")?;
        }
        let durable = Durable::start(db.clone());
        Ok(SledStore { db, meta, durable })
    }
}

impl RecordStore for SledStore {
    fn records(&self, name: &str) -> Result<Arc<dyn Records>, RecordError> {
        let tree = self.db.open_tree(format!("{name}.v2"))?;
        if self.db.tree_names().iter().any(|n| n.as_ref() == name.as_bytes()) {
            // Earlier versions keyed these trees by id alone (or, for `partitions`, by
            // partition alone): move the records under their partition once.
            let old = self.db.open_tree(name)?;
            let mut b = sled::Batch::default();
            for (k, v) in old.iter().filter_map(Result::ok) {
                if name == "partitions" {
                    b.insert(k, v);
                } else if let Ok(id) = std::str::from_utf8(&k) {
                    b.insert(key(partition_of(id.as_bytes()), id.as_bytes()), v);
                }
            }
            tree.apply_batch(b)?;
            tree.flush()?;
            self.db.drop_tree(name)?;
        }
        Ok(Arc::new(SledRecords(tree)))
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, RecordError> {
        Ok(self.meta.get(key)?.map(|v| v.to_vec()))
    }

    fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), RecordError> {
        self.meta.insert(key, value)?;
        Ok(())
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.durable.flush().await.map_err(RecordError) })
    }
}

fn key(p: u16, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + id.len());
    k.extend_from_slice(&partition_prefix(p));
    k.extend_from_slice(id);
    k
}

struct SledRecords(sled::Tree);

impl Records for SledRecords {
    fn get(&self, p: u16, id: &[u8]) -> Result<Option<Vec<u8>>, RecordError> {
        Ok(self.0.get(key(p, id))?.map(|v| v.to_vec()))
    }

    fn put(&self, p: u16, id: &[u8], value: &[u8]) -> Result<(), RecordError> {
        self.0.insert(key(p, id), value)?;
        Ok(())
    }

    fn delete(&self, p: u16, id: &[u8]) -> Result<(), RecordError> {
        self.0.remove(key(p, id))?;
        Ok(())
    }

    fn put_all(&self, p: u16, pairs: &[Pair]) -> Result<(), RecordError> {
        let mut b = sled::Batch::default();
        for (id, v) in pairs {
            b.insert(key(p, id), v.as_slice());
        }
        Ok(self.0.apply_batch(b)?)
    }

    fn scan(&self, p: u16) -> Result<Vec<Pair>, RecordError> {
        let mut out = Vec::new();
        for r in self.0.scan_prefix(partition_prefix(p)) {
            let (k, v) = r?;
            out.push((k[2..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn count(&self, p: u16) -> usize {
        self.0.scan_prefix(partition_prefix(p)).count()
    }

    fn delete_partition(&self, p: u16) -> Result<usize, RecordError> {
        let mut b = sled::Batch::default();
        let mut n = 0;
        for k in self.0.scan_prefix(partition_prefix(p)).keys() {
            b.remove(k?);
            n += 1;
        }
        self.0.apply_batch(b)?;
        Ok(n)
    }

    fn partitions(&self) -> Result<BTreeSet<u16>, RecordError> {
        // One seek per partition present: skip to the next partition's first key.
        let mut out = BTreeSet::new();
        let mut from = 0u32;
        while from <= u16::MAX as u32 {
            let Some(r) = self.0.range((from as u16).to_be_bytes()..).keys().next() else { break };
            let k = r?;
            let Some(p) = k.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else { break };
            out.insert(p);
            from = p as u32 + 1;
        }
        Ok(out)
    }
}

/// Memory: the same contract with nothing on disk (tests of the code above it; a
/// flush has nothing to wait for).
#[derive(Default)]
pub struct MemStore {
    sets: Mutex<HashMap<String, Arc<MemRecords>>>,
    meta: Mutex<HashMap<String, Vec<u8>>>,
}

impl RecordStore for MemStore {
    fn records(&self, name: &str) -> Result<Arc<dyn Records>, RecordError> {
        let mut sets = self.sets.lock().expect("store lock");
        Ok(sets.entry(name.to_string()).or_default().clone())
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, RecordError> {
        Ok(self.meta.lock().expect("store lock").get(key).cloned())
    }

    fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), RecordError> {
        self.meta.lock().expect("store lock").insert(key.to_string(), value.to_vec());
        Ok(())
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// One partition's records in memory, by id.
type MemPartition = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Default)]
struct MemRecords(RwLock<BTreeMap<u16, MemPartition>>);

impl Records for MemRecords {
    fn get(&self, p: u16, id: &[u8]) -> Result<Option<Vec<u8>>, RecordError> {
        Ok(self.0.read().expect("records lock").get(&p).and_then(|m| m.get(id)).cloned())
    }

    fn put(&self, p: u16, id: &[u8], value: &[u8]) -> Result<(), RecordError> {
        self.0.write().expect("records lock").entry(p).or_default().insert(id.to_vec(), value.to_vec());
        Ok(())
    }

    fn delete(&self, p: u16, id: &[u8]) -> Result<(), RecordError> {
        let mut m = self.0.write().expect("records lock");
        if let Some(part) = m.get_mut(&p) {
            part.remove(id);
            if part.is_empty() {
                m.remove(&p);
            }
        }
        Ok(())
    }

    fn put_all(&self, p: u16, pairs: &[Pair]) -> Result<(), RecordError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let mut m = self.0.write().expect("records lock");
        let part = m.entry(p).or_default();
        for (id, v) in pairs {
            part.insert(id.clone(), v.clone());
        }
        Ok(())
    }

    fn scan(&self, p: u16) -> Result<Vec<Pair>, RecordError> {
        let m = self.0.read().expect("records lock");
        Ok(m.get(&p).map(|part| part.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default())
    }

    fn count(&self, p: u16) -> usize {
        self.0.read().expect("records lock").get(&p).map_or(0, BTreeMap::len)
    }

    fn delete_partition(&self, p: u16) -> Result<usize, RecordError> {
        Ok(self.0.write().expect("records lock").remove(&p).map_or(0, |m| m.len()))
    }

    fn partitions(&self) -> Result<BTreeSet<u16>, RecordError> {
        Ok(self.0.read().expect("records lock").keys().copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract both implementations keep.
    async fn contract(store: &dyn RecordStore) {
        let r = store.records("claims").unwrap();
        assert_eq!(r.get(3, b"a").unwrap(), None);
        r.put(3, b"b", b"2").unwrap();
        r.put(3, b"a", b"1").unwrap();
        r.put(4, b"a", b"x").unwrap();
        r.put(u16::MAX, b"", b"end").unwrap();
        r.put_all(9, &[(b"z".to_vec(), b"26".to_vec()), (b"y".to_vec(), b"25".to_vec())]).unwrap();
        r.put_all(10, &[]).unwrap();
        assert_eq!(r.get(3, b"a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(r.get(4, b"a").unwrap().as_deref(), Some(&b"x"[..]));
        assert_eq!(r.scan(3).unwrap(), vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())]);
        assert_eq!(r.scan(u16::MAX).unwrap(), vec![(Vec::new(), b"end".to_vec())]);
        assert_eq!((r.count(3), r.count(9), r.count(5)), (2, 2, 0));
        assert_eq!(r.partitions().unwrap().into_iter().collect::<Vec<_>>(), vec![3, 4, 9, u16::MAX]);
        r.delete(3, b"a").unwrap();
        r.delete(3, b"never").unwrap();
        assert_eq!(r.scan(3).unwrap(), vec![(b"b".to_vec(), b"2".to_vec())]);
        assert_eq!(r.delete_partition(9).unwrap(), 2);
        assert_eq!(r.delete_partition(9).unwrap(), 0);
        assert_eq!(r.partitions().unwrap().into_iter().collect::<Vec<_>>(), vec![3, 4, u16::MAX]);
        r.put_keyed(b"drv-1", b"c").unwrap();
        assert_eq!(r.scan(partition_of(b"drv-1")).unwrap(), vec![(b"drv-1".to_vec(), b"c".to_vec())]);
        assert_eq!(r.get_keyed(b"drv-1").unwrap().as_deref(), Some(&b"c"[..]));
        r.delete_keyed(b"drv-1").unwrap();
        assert_eq!(r.get_keyed(b"drv-1").unwrap(), None);
        // Sets are separate; the same name is the same set.
        let trips = store.records("trips").unwrap();
        assert_eq!(trips.count(3), 0);
        assert_eq!(store.records("claims").unwrap().count(3), 1);
        assert_eq!(store.meta("k").unwrap(), None);
        store.set_meta("k", b"v").unwrap();
        assert_eq!(store.meta("k").unwrap().as_deref(), Some(&b"v"[..]));
        store.flush().await.unwrap();
    }

    #[tokio::test]
    async fn memory_keeps_the_contract() {
        contract(&MemStore::default()).await;
    }

    /// Opens the store in `dir`, waiting while a closed one's flusher thread still
    /// holds the directory's lock.
    async fn reopen(dir: &std::path::Path) -> SledStore {
        for _ in 0..100 {
            if let Ok(db) = sled::Config::new().path(dir).open() {
                return SledStore::open(db).unwrap();
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("{} stayed locked", dir.display());
    }

    #[tokio::test]
    async fn sled_keeps_the_contract_and_its_records_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        contract(&reopen(dir.path()).await).await;
        let store = reopen(dir.path()).await;
        let r = store.records("claims").unwrap();
        assert_eq!(r.scan(3).unwrap(), vec![(b"b".to_vec(), b"2".to_vec())]);
        assert_eq!(store.meta("k").unwrap().as_deref(), Some(&b"v"[..]));
    }

    #[tokio::test]
    async fn sled_moves_records_of_earlier_layouts_under_their_partition() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            db.open_tree("trips").unwrap().insert("trip-1", "t").unwrap();
            db.open_tree("partitions").unwrap().insert(7u16.to_be_bytes(), "held").unwrap();
            db.open_tree("quorum").unwrap().insert("base", "10.0.0.1:1").unwrap();
            db.flush().unwrap();
        }
        let store = reopen(dir.path()).await;
        assert_eq!(store.records("trips").unwrap().get_keyed(b"trip-1").unwrap().as_deref(), Some(&b"t"[..]));
        assert_eq!(store.records("partitions").unwrap().get(7, b"").unwrap().as_deref(), Some(&b"held"[..]));
        assert_eq!(store.meta("quorum_base").unwrap().as_deref(), Some(&b"10.0.0.1:1"[..]));
    }
}
