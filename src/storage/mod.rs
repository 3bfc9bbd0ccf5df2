//! Storage: the [`Store`] trait, its sled implementation and an in-memory twin, and the
//! persister thread that group-commits what the shards hand it.
//!
//! Layout (every key starts with the partition, so a partition moves with one range scan):
//! - tree `drivers`: `partition u16 BE | driver_id` → snapshot (see `drivers::codec`)
//! - tree `timers`:  `partition u16 BE | due_ms u64 BE | kind u8 | key` → empty
//!   (kind 1 = driver expiry; the due time in the key lets a range scan find due timers)
//!
//! Durability: shards hand over a batch every `--persist-interval`; the persister applies
//! every queued batch and then flushes once (group commit). A `kill -9` loses at most the
//! fixes accepted since the last flush: one interval plus the time of one flush.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{error, info};

use crate::drivers::{PersistBatch, Snapshot, StoreOp, decode_snapshot};

/// Timer kinds stored in the `timers` tree.
pub const TIMER_DRIVER_EXPIRY: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record {key:?}: {reason}")]
    Corrupt { key: Vec<u8>, reason: String },
}

/// Where driver snapshots and timers live. Implementations must apply a batch's ops in
/// order, before its snapshots.
pub trait Store: Send + Sync + 'static {
    fn apply(&self, batch: &PersistBatch) -> Result<(), StoreError>;
    /// Makes everything applied so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// Calls `f` with every stored driver.
    fn load_drivers(&self, f: &mut dyn FnMut(Snapshot)) -> Result<(), StoreError>;
    /// Calls `f(due_ms, driver_id)` with every stored driver-expiry timer.
    fn load_timers(&self, f: &mut dyn FnMut(i64, String)) -> Result<(), StoreError>;
}

pub fn driver_key(part: u16, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + id.len());
    k.extend_from_slice(&part.to_be_bytes());
    k.extend_from_slice(id);
    k
}

pub fn timer_key(part: u16, due_ms: i64, kind: u8, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(11 + id.len());
    k.extend_from_slice(&part.to_be_bytes());
    k.extend_from_slice(&(due_ms.max(0) as u64).to_be_bytes());
    k.push(kind);
    k.extend_from_slice(id);
    k
}

fn parse_driver_key(k: &[u8]) -> Result<&str, StoreError> {
    k.get(2..)
        .and_then(|id| std::str::from_utf8(id).ok())
        .ok_or_else(|| StoreError::Corrupt { key: k.to_vec(), reason: "bad driver key".into() })
}

fn parse_timer_key(k: &[u8]) -> Result<(i64, u8, &str), StoreError> {
    let bad = || StoreError::Corrupt { key: k.to_vec(), reason: "bad timer key".into() };
    if k.len() < 11 {
        return Err(bad());
    }
    let due = u64::from_be_bytes(k[2..10].try_into().map_err(|_| bad())?) as i64;
    let id = std::str::from_utf8(&k[11..]).map_err(|_| bad())?;
    Ok((due, k[10], id))
}

fn op_key(op: &StoreOp) -> (bool, Vec<u8>, bool) {
    // (is_put, key, is_timer_tree)
    match op {
        StoreOp::PutTimer { part, due_ms, driver_id } => {
            (true, timer_key(*part, *due_ms, TIMER_DRIVER_EXPIRY, driver_id.as_bytes()), true)
        }
        StoreOp::DelTimer { part, due_ms, driver_id } => {
            (false, timer_key(*part, *due_ms, TIMER_DRIVER_EXPIRY, driver_id.as_bytes()), true)
        }
        StoreOp::DelDriver { part, driver_id } => (false, driver_key(*part, driver_id.as_bytes()), false),
    }
}

/// The production store.
pub struct SledStore {
    db: sled::Db,
    drivers: sled::Tree,
    timers: sled::Tree,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. `cache_mb` bounds sled's page cache.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_mb * 1024 * 1024)
            // We flush explicitly after every group commit.
            .flush_every_ms(None)
            .open()?;
        let drivers = db.open_tree("drivers")?;
        let timers = db.open_tree("timers")?;
        Ok(SledStore { db, drivers, timers })
    }
}

impl Store for SledStore {
    fn apply(&self, b: &PersistBatch) -> Result<(), StoreError> {
        let mut drivers = sled::Batch::default();
        let mut timers = sled::Batch::default();
        for op in &b.ops {
            let (put, key, is_timer) = op_key(op);
            let batch = if is_timer { &mut timers } else { &mut drivers };
            if put { batch.insert(key, &[][..]) } else { batch.remove(key) }
        }
        for (part, id, val) in &b.snapshots {
            drivers.insert(driver_key(*part, &b.buf[id.clone()]), &b.buf[val.clone()]);
        }
        // Timers first: a timer without its driver is harmless (it is deleted when it
        // fires), a driver without a timer is rescheduled on load.
        self.timers.apply_batch(timers)?;
        self.drivers.apply_batch(drivers)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn load_drivers(&self, f: &mut dyn FnMut(Snapshot)) -> Result<(), StoreError> {
        for kv in self.drivers.iter() {
            let (k, v) = kv?;
            let id = parse_driver_key(&k)?;
            let snap =
                decode_snapshot(id, &v).map_err(|e| StoreError::Corrupt { key: k.to_vec(), reason: e.to_string() })?;
            f(snap);
        }
        Ok(())
    }

    fn load_timers(&self, f: &mut dyn FnMut(i64, String)) -> Result<(), StoreError> {
        for kv in self.timers.iter() {
            let (k, _) = kv?;
            let (due, kind, id) = parse_timer_key(&k)?;
            if kind == TIMER_DRIVER_EXPIRY {
                f(due, id.to_string());
            }
        }
        Ok(())
    }
}

/// (drivers, timers), keyed exactly as in sled.
type MemTrees = (BTreeMap<Vec<u8>, Vec<u8>>, BTreeMap<Vec<u8>, ()>);

/// The in-memory twin of [`SledStore`], for tests of the shells without disk.
#[derive(Default)]
pub struct MemStore {
    inner: Mutex<MemTrees>,
}

impl Store for MemStore {
    fn apply(&self, b: &PersistBatch) -> Result<(), StoreError> {
        let mut g = self.inner.lock().expect("mem store lock");
        let (drivers, timers) = &mut *g;
        for op in &b.ops {
            match op_key(op) {
                (true, k, true) => {
                    timers.insert(k, ());
                }
                (false, k, true) => {
                    timers.remove(&k);
                }
                (_, k, false) => {
                    drivers.remove(&k);
                }
            }
        }
        for (part, id, val) in &b.snapshots {
            drivers.insert(driver_key(*part, &b.buf[id.clone()]), b.buf[val.clone()].to_vec());
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn load_drivers(&self, f: &mut dyn FnMut(Snapshot)) -> Result<(), StoreError> {
        let g = self.inner.lock().expect("mem store lock");
        for (k, v) in &g.0 {
            let id = parse_driver_key(k)?;
            f(decode_snapshot(id, v).map_err(|e| StoreError::Corrupt { key: k.clone(), reason: e.to_string() })?);
        }
        Ok(())
    }

    fn load_timers(&self, f: &mut dyn FnMut(i64, String)) -> Result<(), StoreError> {
        let g = self.inner.lock().expect("mem store lock");
        for k in g.1.keys() {
            let (due, _, id) = parse_timer_key(k)?;
            f(due, id.to_string());
        }
        Ok(())
    }
}

/// Handle to the persister thread: shards send batches through [`Persister::sender`].
pub struct Persister {
    tx: Option<mpsc::Sender<PersistBatch>>,
    thread: Option<JoinHandle<()>>,
}

impl Persister {
    /// Starts the thread. `queue` bounds how many batches may wait; a shard that finds
    /// the queue full keeps coalescing its changes until the next interval.
    pub fn start(store: std::sync::Arc<dyn Store>, queue: usize) -> Persister {
        let (tx, mut rx) = mpsc::channel::<PersistBatch>(queue);
        let thread = std::thread::Builder::new()
            .name("locus-persist".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let t0 = Instant::now();
                    let mut n = 0usize;
                    let mut batch = Some(first);
                    while let Some(b) = batch {
                        n += b.snapshots.len();
                        if let Err(e) = store.apply(&b) {
                            error!(error = %e, "persist: applying a batch failed");
                            metrics::counter!("locus_persist_errors_total").increment(1);
                        }
                        batch = rx.try_recv().ok();
                    }
                    if let Err(e) = store.flush() {
                        error!(error = %e, "persist: flush failed");
                        metrics::counter!("locus_persist_errors_total").increment(1);
                    }
                    metrics::counter!("locus_persist_snapshots_total").increment(n as u64);
                    metrics::histogram!("locus_persist_commit_seconds").record(t0.elapsed().as_secs_f64());
                }
                if let Err(e) = store.flush() {
                    error!(error = %e, "persist: final flush failed");
                }
                info!("persister stopped");
            })
            .expect("spawn persister thread");
        Persister { tx: Some(tx), thread: Some(thread) }
    }

    pub fn sender(&self) -> mpsc::Sender<PersistBatch> {
        self.tx.clone().expect("persister running")
    }

    /// Waits until every batch sent so far is durable and the thread has exited. Call
    /// after every shard has stopped (they hold senders).
    pub fn stop(mut self, timeout: Duration) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + timeout;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                error!("persister did not finish in time");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::{DriverShard, FixInput, ShardConfig, Status};

    fn fill(store: &dyn Store) {
        let mut sh = DriverShard::new(ShardConfig {
            ttl_ms: 60_000,
            trail_len: 8,
            max_speed_mps: 70.0,
            move_slack_m: 20.0,
            max_vehicle_types: 8,
        });
        for i in 0..50 {
            let f = FixInput {
                driver_id: format!("d{i}"),
                lat: 10.0,
                lon: 20.0 + i as f64 * 1e-3,
                timestamp_ms: 1_000 + i,
                status: Some(Status::Available),
                ..Default::default()
            };
            sh.apply(f, 5_000).unwrap();
        }
        sh.remove(&crate::drivers::Lookup::Id("d7".into()));
        let mut b = PersistBatch::default();
        sh.take_writes(&mut b);
        store.apply(&b).unwrap();
        store.flush().unwrap();
    }

    fn check(store: &dyn Store) {
        let mut ids = vec![];
        store.load_drivers(&mut |s| ids.push(s.driver_id)).unwrap();
        assert_eq!(ids.len(), 49);
        assert!(!ids.contains(&"d7".to_string()));
        let mut timers = vec![];
        store.load_timers(&mut |due, id| timers.push((due, id))).unwrap();
        assert_eq!(timers.len(), 49);
        assert!(timers.iter().all(|(due, _)| *due == 65_000));
    }

    #[test]
    fn sled_store_round_trip_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path(), 8).unwrap();
            fill(&s);
        }
        let s = SledStore::open(dir.path(), 8).unwrap();
        check(&s);
    }

    #[test]
    fn mem_store_round_trip() {
        let s = MemStore::default();
        fill(&s);
        check(&s);
    }
}
