//! Storage: the driver log and the persister thread that group-commits into it.
//!
//! Driver state is kept in an append-only log of numbered segment files
//! (`<data-dir>/drivers/<seq>.log`) of framed, checksummed records (see
//! `drivers::codec`). Every `--persist-interval`, each shard hands the persister one batch
//! holding a record per driver that changed (a *delta*: its attributes, last fix and the
//! trail fixes added since its previous record) and one per driver removed. The
//! persister appends every queued batch, then `fdatasync`s once: a group commit. A
//! `kill -9` (or power loss) loses at most the fixes of about one interval plus one sync.
//!
//! Compaction: when the closed segments grow past a threshold, the persister rotates to a
//! new segment `S` and asks every shard to sweep: over the next commits each shard writes
//! a *full* record of every live driver. When all shards have finished, every live driver
//! has a full record in a segment ≥ `S`, so the segments before `S` are deleted. Disk use
//! stays within a few times the live state; the write cost per fix stays about a hundred
//! bytes of sequential IO.
//!
//! Expiry timers need no separate records: a driver's expiry is due at its persisted
//! `received_ms` + TTL, so restoring the drivers restores their timers, and overdue ones
//! fire at startup.
//!
//! Restart: [`replay`] reads the segments oldest first, applying records in order; a torn
//! or corrupt tail (a crash mid-write) ends that segment's replay and is reported.
//!
//! Why a log rather than a key-value store such as sled: every fix must be durable within
//! the persist interval, so the write rate is the fix rate; an append-only log writes a
//! fix as ~120 bytes of sequential IO and keeps no index in memory, where a B-tree store
//! rewrites pages and caches them (sled 0.34 proved far too slow and too large at 1M
//! drivers when tried during design). Claims, trips and the ownership table, which
//! change rarely, are records keyed by partition in a [`RecordStore`] (sled in
//! production, flushed through [`Durable`], a group commit on one thread; or memory).

mod durable;
mod partitioned;
mod records;
pub use durable::Durable;
pub use partitioned::{Arriving, History, KvChange, PartitionData, ReplicaPart};
pub use records::{MemStore, Pair, RecordError, RecordStore, Records, SledStore, StoreFuture};

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::drivers::{PersistBatch, Record, Snapshot, Trail, decode_records};

/// When segments close and compaction starts.
#[derive(Clone, Copy, Debug)]
pub struct LogLimits {
    /// A segment is closed once it holds this many bytes.
    pub segment_bytes: u64,
    /// A compaction sweep starts once closed segments hold more than this, or more than
    /// twice what the last sweep wrote (the live state), whichever is larger.
    pub compact_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("driver log IO on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:012}.log"))
}

/// The segment numbers present in `dir`, ascending.
fn list_segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut seqs = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".log")) else { continue };
        if let Ok(seq) = stem.parse() {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// What a replay found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayStats {
    pub segments: usize,
    pub records: usize,
    pub bytes: u64,
    /// Bytes after a torn or corrupt record, skipped.
    pub skipped_bytes: u64,
}

/// Applies one record to the drivers being rebuilt; `trail_cap` is the trail length
/// (the last fix excluded) of this run, which may differ from the one that wrote it.
pub fn apply_record(drivers: &mut HashMap<String, Snapshot>, r: Record, trail_cap: usize) {
    match r {
        Record::Delete { driver_id } => {
            drivers.remove(&driver_id);
        }
        Record::Upsert { full, mut snap, trail } => {
            let mut t = match drivers.remove(&snap.driver_id) {
                Some(old) if !full => old.trail,
                _ => Trail::default(),
            };
            for p in &trail {
                t.push(p, trail_cap);
            }
            snap.trail = t;
            drivers.insert(snap.driver_id.clone(), snap);
        }
    }
}

/// Reads every segment in `dir`, oldest first, and returns the live drivers.
pub fn replay(dir: &Path, trail_cap: usize) -> Result<(HashMap<String, Snapshot>, ReplayStats), StoreError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut drivers = HashMap::new();
    let mut stats = ReplayStats::default();
    let mut buf = Vec::new();
    for seq in list_segments(dir)? {
        let path = segment_path(dir, seq);
        buf.clear();
        File::open(&path).and_then(|mut f| f.read_to_end(&mut buf)).map_err(io(&path))?;
        let (ok, err) = decode_records(&buf, |r| {
            stats.records += 1;
            apply_record(&mut drivers, r, trail_cap);
        });
        if let Some(e) = err {
            warn!(segment = %path.display(), valid_bytes = ok, dropped_bytes = buf.len() - ok, error = %e, "driver log: torn or corrupt tail skipped");
            stats.skipped_bytes += (buf.len() - ok) as u64;
        }
        stats.segments += 1;
        stats.bytes += ok as u64;
    }
    Ok((drivers, stats))
}

/// The append side of the driver log. Owned by the persister thread.
pub struct DriverLog {
    dir: PathBuf,
    active: File,
    active_seq: u64,
    active_bytes: u64,
    /// Closed segments: (seq, bytes).
    closed: Vec<(u64, u64)>,
}

impl DriverLog {
    /// Opens the log for appending in a fresh segment after every existing one.
    pub fn open(dir: &Path) -> Result<DriverLog, StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut closed = Vec::new();
        for seq in list_segments(dir)? {
            let path = segment_path(dir, seq);
            let len = std::fs::metadata(&path).map_err(io(&path))?.len();
            closed.push((seq, len));
        }
        let next = closed.last().map_or(1, |(s, _)| s + 1);
        let (active, active_seq) = (Self::create(dir, next)?, next);
        Ok(DriverLog { dir: dir.to_path_buf(), active, active_seq, active_bytes: 0, closed })
    }

    fn create(dir: &Path, seq: u64) -> Result<File, StoreError> {
        let path = segment_path(dir, seq);
        let f = OpenOptions::new().create_new(true).append(true).open(&path).map_err(io(&path))?;
        // Make the new file's directory entry durable too.
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
        Ok(f)
    }

    pub fn append(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let path = segment_path(&self.dir, self.active_seq);
        self.active.write_all(bytes).map_err(io(&path))?;
        self.active_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        let path = segment_path(&self.dir, self.active_seq);
        self.active.sync_data().map_err(io(&path))
    }

    /// Closes the active segment and starts the next; returns the new segment's number.
    pub fn rotate(&mut self) -> Result<u64, StoreError> {
        self.sync()?;
        let next = self.active_seq + 1;
        self.active = Self::create(&self.dir, next)?;
        self.closed.push((self.active_seq, self.active_bytes));
        self.active_seq = next;
        self.active_bytes = 0;
        Ok(next)
    }

    /// Deletes every closed segment numbered below `seq`.
    pub fn drop_before(&mut self, seq: u64) -> Result<(), StoreError> {
        let mut kept = Vec::new();
        for (s, b) in std::mem::take(&mut self.closed) {
            if s < seq {
                let path = segment_path(&self.dir, s);
                std::fs::remove_file(&path).map_err(io(&path))?;
            } else {
                kept.push((s, b));
            }
        }
        self.closed = kept;
        Ok(())
    }

    pub fn active_bytes(&self) -> u64 {
        self.active_bytes
    }

    pub fn closed_bytes(&self) -> u64 {
        self.closed.iter().map(|(_, b)| b).sum()
    }
}

/// Shared between the persister and the shards: the current compaction epoch. A shard
/// that sees a newer epoch starts a sweep.
#[derive(Debug, Default)]
pub struct SweepControl {
    epoch: AtomicU64,
}

impl SweepControl {
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
}

/// Handle to the persister thread: shards send batches through [`Persister::sender`].
pub struct Persister {
    tx: Option<mpsc::Sender<PersistBatch>>,
    thread: Option<JoinHandle<()>>,
    pub sweeps: Arc<SweepControl>,
}

struct Sweep {
    epoch: u64,
    /// First segment holding the sweep's full records.
    from_seq: u64,
    done: usize,
    bytes: u64,
}

impl Persister {
    /// Starts the thread for a log with `shards` writers. `queue` bounds how many
    /// batches may wait; a shard that finds the queue full keeps coalescing its changes
    /// until the next interval.
    ///
    /// `tee`, when set, receives every batch once it is on disk (replication); a full
    /// tee drops the batch and sets `tee_dropped`, so the receiver re-sends in full.
    /// `history`, when set, gets each batch's accepted fixes (and the batch, the blocks
    /// written, for the replicas).
    pub fn start(
        mut log: DriverLog,
        limits: LogLimits,
        shards: usize,
        queue: usize,
        tee: Option<(mpsc::Sender<PersistBatch>, Arc<AtomicBool>)>,
        history: Option<Arc<crate::history::HistoryStore>>,
    ) -> Persister {
        let (tx, mut rx) = mpsc::channel::<PersistBatch>(queue);
        let sweeps = Arc::new(SweepControl::default());
        let ctl = sweeps.clone();
        let thread = std::thread::Builder::new()
            .name("locus-persist".into())
            .spawn(move || {
                let mut sweep: Option<Sweep> = None;
                let mut last_full_bytes = 0u64;
                let fail = |what: &str, e: StoreError| {
                    error!(error = %e, "driver log: {what} failed");
                    metrics::counter!("locus_persist_errors_total").increment(1);
                };
                while let Some(first) = rx.blocking_recv() {
                    let t0 = Instant::now();
                    let (mut records, mut bytes) = (0usize, 0u64);
                    let mut failed = false;
                    let mut batch = Some(first);
                    let mut written = Vec::new();
                    let mut holds = Vec::new();
                    while let Some(mut b) = batch {
                        holds.extend(b.done.take());
                        records += b.records;
                        bytes += b.buf.len() as u64;
                        if let Err(e) = log.append(&b.buf) {
                            fail("append", e);
                            failed = true;
                            // A partial write would hide every later record of this
                            // segment from replay: continue in a fresh segment.
                            if let Err(e) = log.rotate() {
                                fail("rotate after a failed append", e);
                            }
                        }
                        if let Some(h) = &history
                            && !b.history.is_empty()
                        {
                            b.history_blocks = h.append_local(&b.history);
                            b.history = Vec::new();
                        }
                        if let Some((tx, n)) = b.history_ack.take() {
                            tx.send_replace(n);
                        }
                        if let (Some(s), Some(epoch)) = (sweep.as_mut(), b.sweep_done)
                            && s.epoch == epoch
                        {
                            s.done += 1;
                        }
                        if let Some(s) = sweep.as_mut() {
                            s.bytes += b.buf.len() as u64;
                        }
                        if tee.is_some() {
                            written.push(b);
                        }
                        batch = rx.try_recv().ok();
                    }
                    if let Err(e) = log.sync() {
                        fail("sync", e);
                        failed = true;
                    }
                    if let Some((tx, dropped)) = &tee {
                        for b in written {
                            if tx.try_send(b).is_err() {
                                dropped.store(true, Ordering::Release);
                            }
                        }
                    }
                    drop(holds);
                    if failed && let Some(s) = sweep.take() {
                        // Some full records may be missing: keep the old segments; a
                        // later sweep starts over.
                        warn!(epoch = s.epoch, "driver log: compaction abandoned after an IO error");
                    }
                    metrics::counter!("locus_persist_records_total").increment(records as u64);
                    metrics::counter!("locus_persist_bytes_total").increment(bytes);
                    metrics::histogram!("locus_persist_commit_seconds").record(t0.elapsed().as_secs_f64());
                    if sweep.as_ref().is_some_and(|s| s.done >= shards) {
                        let s = sweep.take().expect("checked");
                        last_full_bytes = s.bytes;
                        match log.drop_before(s.from_seq) {
                            Ok(()) => info!(epoch = s.epoch, full_bytes = s.bytes, "driver log compacted"),
                            Err(e) => fail("compaction", e),
                        }
                    }
                    if log.active_bytes() >= limits.segment_bytes
                        && let Err(e) = log.rotate()
                    {
                        fail("rotate", e);
                    }
                    if sweep.is_none() && log.closed_bytes() > limits.compact_bytes.max(2 * last_full_bytes) {
                        match log.rotate() {
                            Ok(from_seq) => {
                                let epoch = ctl.epoch() + 1;
                                sweep = Some(Sweep { epoch, from_seq, done: 0, bytes: 0 });
                                ctl.epoch.store(epoch, Ordering::Release);
                            }
                            Err(e) => fail("rotate", e),
                        }
                    }
                    metrics::gauge!("locus_driver_log_bytes").set((log.closed_bytes() + log.active_bytes()) as f64);
                    metrics::gauge!("locus_compaction_running").set(if sweep.is_some() { 1.0 } else { 0.0 });
                }
                if let Err(e) = log.sync() {
                    fail("final sync", e);
                }
                info!("persister stopped");
            })
            .expect("spawn persister thread");
        Persister { tx: Some(tx), thread: Some(thread), sweeps }
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
    use crate::drivers::{DriverShard, FixInput, Lookup, ShardConfig, Status};

    fn shard() -> DriverShard {
        DriverShard::new(ShardConfig {
            ttl_ms: 60_000,
            trail_len: 4,
            max_speed_mps: 1e9,
            move_slack_m: 20.0,
            max_vehicle_types: 8,
            history: false,
        })
    }

    fn fix(i: usize, ts: i64) -> FixInput {
        FixInput {
            driver_id: format!("d{i}"),
            lat: 10.0,
            lon: 20.0 + ts as f64 * 1e-6,
            timestamp_ms: ts,
            status: Some(Status::Available),
            cab_number: format!("c{i}"),
            ..Default::default()
        }
    }

    fn commit(sh: &mut DriverShard, log: &mut DriverLog) -> PersistBatch {
        let mut b = PersistBatch::default();
        sh.take_writes(&mut b);
        log.append(&b.buf).unwrap();
        log.sync().unwrap();
        b
    }

    #[test]
    fn deltas_rebuild_trails_and_deletes_stick() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DriverLog::open(dir.path()).unwrap();
        let mut sh = shard();
        for ts in 1..=10 {
            for i in 0..20 {
                sh.apply(fix(i, ts * 1_000), 5_000).unwrap();
            }
            if ts % 3 == 0 {
                let b = commit(&mut sh, &mut log);
                assert_eq!(b.records, 20, "one record per changed driver");
            }
        }
        sh.remove(&Lookup::Id("d7".into()));
        commit(&mut sh, &mut log);
        drop(log);
        let (drivers, stats) = replay(dir.path(), 3).unwrap();
        assert_eq!((stats.segments, stats.skipped_bytes), (1, 0));
        assert_eq!(drivers.len(), 19);
        assert!(!drivers.contains_key("d7"));
        let d3 = &drivers["d3"];
        assert_eq!(d3.last.timestamp_ms, 10_000);
        assert_eq!(d3.cab, "c3");
        let want = sh.get(&Lookup::Id("d3".into()), true).unwrap();
        let got: Vec<i64> = d3.trail.iter().map(|p| p.timestamp_ms).chain([d3.last.timestamp_ms]).collect();
        assert_eq!(got, want.trail.iter().map(|p| p.timestamp_ms).collect::<Vec<_>>());
    }

    #[test]
    fn a_torn_tail_loses_only_the_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DriverLog::open(dir.path()).unwrap();
        let mut sh = shard();
        sh.apply(fix(1, 1_000), 5_000).unwrap();
        commit(&mut sh, &mut log);
        sh.apply(fix(2, 1_000), 5_000).unwrap();
        let mut b = PersistBatch::default();
        sh.take_writes(&mut b);
        log.append(&b.buf[..b.buf.len() - 3]).unwrap();
        drop(log);
        let (drivers, stats) = replay(dir.path(), 3).unwrap();
        assert_eq!(drivers.keys().collect::<Vec<_>>(), vec!["d1"]);
        assert!(stats.skipped_bytes > 0);
        // The next run appends to a new segment; the torn one stays readable.
        let mut log = DriverLog::open(dir.path()).unwrap();
        sh.apply(fix(2, 2_000), 5_000).unwrap();
        commit(&mut sh, &mut log);
        let (drivers, _) = replay(dir.path(), 3).unwrap();
        assert_eq!(drivers.len(), 2);
    }

    #[test]
    fn a_sweep_makes_older_segments_unnecessary() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = DriverLog::open(dir.path()).unwrap();
        let mut sh = shard();
        for i in 0..30 {
            sh.apply(fix(i, 1_000), 5_000).unwrap();
        }
        commit(&mut sh, &mut log);
        sh.remove(&Lookup::Id("d0".into()));
        for i in 1..30 {
            sh.apply(fix(i, 2_000), 5_000).unwrap();
        }
        commit(&mut sh, &mut log);
        let from = log.rotate().unwrap();
        sh.start_sweep(1);
        let b = commit(&mut sh, &mut log);
        assert_eq!(b.sweep_done, Some(1), "30 drivers fit in one sweep chunk");
        log.drop_before(from).unwrap();
        let (drivers, stats) = replay(dir.path(), 3).unwrap();
        assert_eq!(stats.segments, 1);
        assert_eq!(drivers.len(), 29);
        assert_eq!(drivers["d5"].trail.len(), 1, "full records carry the trail");
        assert_eq!(drivers["d5"].last.timestamp_ms, 2_000);
    }
}
