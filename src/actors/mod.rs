//! Shard workers: the thin shells around [`DriverShard`] cores.
//!
//! A node runs a few shard workers (tokio tasks, about one per core). Every
//! driver key hashes to exactly one shard, whose worker is the only owner of that
//! driver's state machine (its "actor"), of the shard's R-trees and of its expiry
//! schedule. Messages for one shard arrive through one bounded, named mailbox and are
//! handled one at a time, so each driver sees its messages serially and in order.
//!
//! Actors are virtual: an idle driver is just its compact record in the shard (no task,
//! no mailbox, no buffers beyond its trail), yet it stays queryable. A batch of fixes for
//! one shard is one message, so there is no per-fix wake-up and no lock on the hot path.
//!
//! In: [`ShardMsg`] from the router and a `Tick` from the ticker task. Out: replies on
//! oneshot channels, watcher streams, secondary-index updates and [`PersistBatch`]es for
//! the persister thread.

mod index;

pub use index::SecondaryIndex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::clock::wall_ms;
use crate::drivers::{
    Claim, ClaimError, ClaimOk, DriverShard, DriverView, Event, FixInput, GoneReason, Lookup, NearbyHit, NearbyQuery,
    PersistBatch, Position, Reject, ShardCounters, Snapshot, WithinQuery,
};
use crate::events::{Bus, driver_change};
use crate::ownership::Lease;
use crate::storage::SweepControl;

/// Why a watch stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchEnd {
    Removed,
    Expired,
    /// The client did not keep up; fixes would have been dropped.
    Lagged,
    ShuttingDown,
    /// The driver's partition moved to another node: resubscribe through any node.
    Moved,
}

impl WatchEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchEnd::Removed => "removed",
            WatchEnd::Expired => "expired",
            WatchEnd::Lagged => "lagged",
            WatchEnd::ShuttingDown => "shutting_down",
            WatchEnd::Moved => "moved",
        }
    }
}

/// A subscription to one driver's accepted fixes.
pub struct Watcher {
    pub tx: mpsc::Sender<DriverView>,
    pub end: oneshot::Sender<WatchEnd>,
}

/// Everything a shard worker can be asked.
pub enum ShardMsg {
    /// Fixes of one batch that belong to this shard, with their index in the batch.
    Fixes {
        fixes: Vec<(u32, FixInput)>,
        reply: oneshot::Sender<Vec<(u32, Reject)>>,
    },
    Get {
        lookup: Lookup,
        include_trail: bool,
        reply: oneshot::Sender<Option<DriverView>>,
    },
    Remove {
        lookup: Lookup,
        reply: oneshot::Sender<Option<String>>,
    },
    /// Opens or closes a driver's UDP session: `None` if the driver is not here, else
    /// whether it changed.
    SetSession {
        driver_id: String,
        change: crate::drivers::SessionChange,
        reply: oneshot::Sender<Option<bool>>,
    },
    Nearby {
        q: Arc<NearbyQuery>,
        reply: oneshot::Sender<Vec<NearbyHit>>,
    },
    Within {
        q: Arc<WithinQuery>,
        reply: oneshot::Sender<Vec<NearbyHit>>,
    },
    /// Subscribe; the reply carries the current state (or `None` if unknown).
    Watch {
        driver_id: String,
        watcher: Watcher,
        reply: oneshot::Sender<Option<DriverView>>,
    },
    /// Dispatch: compare-and-set AVAILABLE → DISPATCHED for a trip.
    Claim {
        driver_id: String,
        trip_id: String,
        vehicle_type: String,
        offer_due_ms: i64,
        reply: oneshot::Sender<Result<ClaimOk, ClaimError>>,
    },
    /// DRIVER_ASSIGNED: the claim holds and the driver's fixes go to the trip.
    Confirm {
        driver_id: String,
        trip_id: String,
        reply: oneshot::Sender<Result<ClaimOk, ClaimError>>,
    },
    /// The trip ended: free the driver if still claimed for it.
    Release {
        driver_id: String,
        trip_id: String,
        reply: oneshot::Sender<bool>,
    },
    /// Wakes an idle worker so timers fire and writes are handed over on time.
    Tick,
    /// Hand-off, holder side: freeze these partitions (keyed writes refused, timers held)
    /// and return their drivers as full log records, per partition (records, count).
    Export {
        partitions: Arc<HashSet<u16>>,
        reply: oneshot::Sender<HashMap<u16, (Vec<u8>, u32)>>,
    },
    /// Replication: give every driver of these partitions a full record in the next
    /// batch and name them in it (their replicas replace their copies).
    Resync {
        partitions: Arc<HashSet<u16>>,
    },
    /// Quorum lost: refuse these partitions' keyed writes and hold their timers.
    Hold {
        partitions: Arc<HashSet<u16>>,
    },
    /// The live map's grid (and points) over a box.
    Map {
        q: Arc<crate::drivers::map::MapQuery>,
        reply: oneshot::Sender<crate::drivers::map::MapSlice>,
    },
    /// Live drivers per partition.
    Counts {
        reply: oneshot::Sender<HashMap<u16, u32>>,
    },
    /// Hand-off, holder side: the new owner has them; drop them here (watchers end moved).
    /// Drop at most `limit` of these partitions' drivers; answers (dropped, all gone).
    Forget {
        partitions: Arc<HashSet<u16>>,
        limit: usize,
        reply: oneshot::Sender<(usize, bool)>,
    },
    /// Hand-off undone: serve these frozen partitions again.
    Thaw {
        partitions: Arc<HashSet<u16>>,
        reply: oneshot::Sender<()>,
    },
    /// Hand-off, new owner side: drivers and claims of partitions now served here.
    Install {
        drivers: Vec<Snapshot>,
        claims: Vec<(String, Claim)>,
        reply: oneshot::Sender<usize>,
    },
    /// Log deletions for drivers of a parked copy that was discarded.
    LogDeletes {
        ids: Vec<String>,
    },
    /// Handle what is queued, persist everything, end watchers, exit.
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// How often a worker encodes its changes into the pending batch.
const ENCODE_EVERY: Duration = Duration::from_millis(25);
/// Most changed drivers encoded at once (about 2 ms of work): a backlog (an install, a
/// replica resync) drains over a few encodes, 160,000 drivers a second per shard,
/// instead of stalling the shard's queries for one long encode.
const ENCODE_SLICE: usize = 4_096;
/// A pending batch this large is not grown further until it has been handed over.
const MAX_PENDING_BYTES: usize = 32 << 20;

/// Worker settings.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Hand pending writes to the persister this often.
    pub persist_interval: Duration,
    /// Per-watcher queue; a watcher this far behind is ended as lagged.
    pub watch_queue: usize,
    /// Messages the shard's mailbox holds.
    pub mailbox: usize,
}

/// One accepted fix of a driver on a trip, on its way to the trip's actor.
#[derive(Clone, Debug)]
pub struct TripFix {
    pub trip_id: Box<str>,
    pub driver_id: Box<str>,
    pub pos: Position,
}

/// Where a worker sends the effects that leave the driver world: persisted claims,
/// fixes of drivers on trips, and state changes. Every part is optional (benchmarks and
/// unit tests run workers without them).
#[derive(Clone, Default)]
pub struct Hooks {
    /// Claims by partition and driver id (the claims store, written in order, flushed by
    /// the caller).
    pub claims: Option<Arc<dyn crate::storage::Records>>,
    /// Fixes of assigned drivers, to the trip feed (dropped and counted when full).
    pub trip_fixes: Option<mpsc::Sender<TripFix>>,
    /// The node's state-change bus.
    pub events: Option<Bus>,
    /// The quorum lease: timers fire only while it holds (`None`: always).
    pub lease: Option<Arc<Lease>>,
}

/// Encodes a claim as stored: offer due time (i64, -1 = confirmed) then the trip id.
pub fn encode_claim(c: &Claim) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + c.trip_id.len());
    v.extend_from_slice(&c.offer_due_ms.unwrap_or(-1).to_be_bytes());
    v.extend_from_slice(c.trip_id.as_bytes());
    v
}

pub fn decode_claim(b: &[u8]) -> Option<Claim> {
    let due = i64::from_be_bytes(b.get(..8)?.try_into().ok()?);
    let trip_id = std::str::from_utf8(&b[8..]).ok()?.into();
    Some(Claim { trip_id, offer_due_ms: (due >= 0).then_some(due) })
}

/// A running shard worker.
pub struct ShardHandle {
    pub tx: mpsc::Sender<ShardMsg>,
    task: JoinHandle<()>,
}

impl ShardHandle {
    /// Waits for the worker to exit (after a `Shutdown` message).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

struct Worker {
    id: usize,
    core: DriverShard,
    cfg: WorkerConfig,
    index: Arc<SecondaryIndex>,
    persist: mpsc::Sender<PersistBatch>,
    sweeps: Arc<SweepControl>,
    hooks: Hooks,
    /// The last compaction epoch this shard started a sweep for.
    swept_epoch: u64,
    watchers: HashMap<u32, Vec<Watcher>>,
    next_persist: Instant,
    /// Records encoded since the last hand-over; encoded a little at a time (every
    /// `ENCODE_EVERY`) so no single step stalls the mailbox.
    pending: PersistBatch,
    next_encode: Instant,
    next_stats: Instant,
    last_published: ShardCounters,
    /// Batches with history are numbered; the persister publishes here the number of
    /// the last whose history it wrote.
    history_written: Arc<watch::Sender<u64>>,
    history_sent: u64,
    /// Per partition: the number of the last batch sent with its history.
    history_last: Vec<u64>,
}

/// Starts a worker task owning `core`, with a mailbox of `cfg.mailbox` messages. Must
/// be called inside the tokio runtime.
///
/// Workers are tasks, not threads: a query hops to every shard and back, and on a small
/// machine OS threads beyond the core count turned those hops into scheduler waits
/// (`locus bench`, 1M drivers, 2 cores: Nearby p50/p99 430–510 µs / 1.1–3.0 ms over three
/// runs with threads, 360 µs / 1.05 ms with tasks). A message's work is bounded (a batch
/// of at most 10,000 fixes, a sweep step of 2,000 records).
pub fn spawn_shard(
    id: usize,
    core: DriverShard,
    cfg: WorkerConfig,
    index: Arc<SecondaryIndex>,
    persist: mpsc::Sender<PersistBatch>,
    sweeps: Arc<SweepControl>,
    hooks: Hooks,
) -> ShardHandle {
    let (tx, rx) = mpsc::channel(cfg.mailbox);
    let now = Instant::now();
    let worker = Worker {
        id,
        core,
        next_persist: now + cfg.persist_interval,
        pending: PersistBatch::default(),
        history_written: Arc::new(watch::channel(0).0),
        history_sent: 0,
        history_last: vec![0; crate::keys::PARTITIONS as usize],
        next_encode: now,
        next_stats: now,
        cfg,
        index,
        persist,
        swept_epoch: sweeps.epoch(),
        sweeps,
        hooks,
        watchers: HashMap::new(),
        last_published: ShardCounters::default(),
    };
    ShardHandle { tx, task: crate::tasks::spawn("shard", worker.run(rx)) }
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<ShardMsg>) {
        // Restored drivers left index events behind.
        self.perform_events();
        while let Some(msg) = rx.recv().await {
            let now_ms = wall_ms();
            // A node that lost its lease (cut off, or thawed after a pause) fires no
            // timer: the partition may be served elsewhere by now.
            if self.hooks.lease.as_ref().is_none_or(|l| l.holds()) {
                self.core.fire_timers(now_ms);
            }
            if let ShardMsg::Shutdown { reply } = msg {
                self.perform_events();
                self.end_all_watchers(WatchEnd::ShuttingDown);
                self.persist_all().await;
                let _ = reply.send(());
                debug!(shard = self.id, "shard stopped");
                return;
            }
            if let ShardMsg::Export { partitions, reply } = msg {
                let out = self.core.export(&partitions);
                if self.core.keeps_history() {
                    // The partitions' history goes with them: every fix accepted so far
                    // must be in the history store before the hand-off reads it there.
                    self.history_barrier(&partitions).await;
                }
                let _ = reply.send(out);
                continue;
            }
            self.handle(msg, now_ms);
            self.perform_events();
            let now = Instant::now();
            if now >= self.next_encode {
                self.next_encode = now + ENCODE_EVERY;
                self.encode();
            }
            if now >= self.next_persist {
                self.next_persist = now + self.cfg.persist_interval;
                self.persist();
            }
            if now >= self.next_stats {
                self.next_stats = now + Duration::from_secs(1);
                self.publish_stats(&rx);
                self.sweep_watchers();
            }
        }
        // Every sender is gone without a Shutdown: still persist what we have.
        self.persist_all().await;
    }

    fn handle(&mut self, msg: ShardMsg, now_ms: i64) {
        match msg {
            ShardMsg::Fixes { fixes, reply } => {
                let mut rejected = Vec::new();
                for (i, fix) in fixes {
                    if self.core.is_frozen(&fix.driver_id) {
                        rejected.push((i, Reject::Moving));
                    } else if let Err(e) = self.core.apply(fix, now_ms) {
                        rejected.push((i, e));
                    }
                }
                if rejected.iter().any(|(_, r)| *r == Reject::Moving) {
                    debug!(shard = self.id, "fixes refused: their partition is frozen (lent or held)");
                }
                // Index changes land before the ack, so a caller's next lookup sees them.
                self.perform_events();
                let _ = reply.send(rejected);
            }
            ShardMsg::Get { lookup, include_trail, reply } => {
                let _ = reply.send(self.core.get(&lookup, include_trail));
            }
            // A keyed write to a moving partition: dropping the reply answers UNAVAILABLE.
            ShardMsg::Remove { lookup, .. } if self.core.is_frozen(lookup.driver_id()) => {}
            ShardMsg::SetSession { driver_id, .. } if self.core.is_frozen(&driver_id) => {}
            ShardMsg::SetSession { driver_id, change, reply } => {
                let r = self.core.set_session(&driver_id, change);
                self.perform_events();
                let _ = reply.send(r);
            }
            ShardMsg::Claim { driver_id, .. }
            | ShardMsg::Confirm { driver_id, .. }
            | ShardMsg::Release { driver_id, .. }
                if self.core.is_frozen(&driver_id) => {}
            ShardMsg::Remove { lookup, reply } => {
                let removed = self.core.remove(&lookup);
                self.perform_events();
                let _ = reply.send(removed);
            }
            ShardMsg::Nearby { q, reply } => {
                let _ = reply.send(self.core.nearby(&q));
            }
            ShardMsg::Within { q, reply } => {
                let _ = reply.send(self.core.within(&q));
            }
            ShardMsg::Watch { driver_id, watcher, reply } => match self.core.slot_of(&driver_id) {
                Some(slot) => {
                    let _ = reply.send(Some(self.core.view(slot, false)));
                    self.core.set_watched(slot, true);
                    self.watchers.entry(slot).or_default().push(watcher);
                }
                None => {
                    let _ = reply.send(None);
                }
            },
            // Answered in `run`, after the history is written (it waits on the persister).
            ShardMsg::Export { partitions, reply } => {
                let _ = reply.send(self.core.export(&partitions));
            }
            ShardMsg::Resync { partitions } => self.core.resync(&partitions),
            ShardMsg::Hold { partitions } => self.core.hold(&partitions),
            ShardMsg::Map { q, reply } => {
                let _ = reply.send(self.core.map(&q));
            }
            ShardMsg::Counts { reply } => {
                let _ = reply.send(self.core.partition_counts());
            }
            ShardMsg::Forget { partitions, limit, reply } => {
                let n = self.core.forget_some(&partitions, limit);
                self.perform_events();
                let _ = reply.send(n);
            }
            ShardMsg::Thaw { partitions, reply } => {
                self.core.thaw(&partitions);
                let _ = reply.send(());
            }
            ShardMsg::Install { drivers, claims, reply } => {
                let n = self.core.install(drivers, claims);
                self.perform_events();
                let _ = reply.send(n);
            }
            ShardMsg::LogDeletes { ids } => self.core.log_deletes(ids),
            ShardMsg::Claim { driver_id, trip_id, vehicle_type, offer_due_ms, reply } => {
                let r = self.core.claim(&driver_id, &trip_id, &vehicle_type, offer_due_ms);
                // The claim is written to the store before the caller hears of it.
                self.perform_events();
                let _ = reply.send(r);
            }
            ShardMsg::Confirm { driver_id, trip_id, reply } => {
                let r = self.core.confirm(&driver_id, &trip_id);
                self.perform_events();
                let _ = reply.send(r);
            }
            ShardMsg::Release { driver_id, trip_id, reply } => {
                let r = self.core.release(&driver_id, &trip_id);
                self.perform_events();
                let _ = reply.send(r);
            }
            ShardMsg::Tick | ShardMsg::Shutdown { .. } => {}
        }
    }

    fn perform_events(&mut self) {
        let events: Vec<Event> = self.core.drain_events().collect();
        for ev in events {
            match ev {
                Event::Accepted { slot, view } => self.notify_watchers(slot, *view),
                Event::Gone { slot, reason } => {
                    let end = match reason {
                        GoneReason::Removed => WatchEnd::Removed,
                        GoneReason::Expired => WatchEnd::Expired,
                        GoneReason::Moved => WatchEnd::Moved,
                    };
                    for w in self.watchers.remove(&slot).unwrap_or_default() {
                        let _ = w.end.send(end);
                    }
                }
                Event::IndexSet { kind, key, driver_id } => self.index.set(kind, key, driver_id),
                Event::IndexUnset { kind, key, driver_id } => self.index.unset(kind, &key, &driver_id),
                Event::StatusChanged { driver_id, from, to, lat, lon } => {
                    self.core.keep_event(&driver_id, from, to, (lat, lon, wall_ms()));
                    if let Some(bus) = &self.hooks.events
                        && bus.receiver_count() > 0
                    {
                        let _ = bus.send(driver_change(&driver_id, from, to, lat, lon));
                    }
                }
                Event::ClaimSet { driver_id, claim } => {
                    if let Some(t) = &self.hooks.claims
                        && let Err(e) = t.put_keyed(driver_id.as_bytes(), &encode_claim(&claim))
                    {
                        warn!(shard = self.id, error = %e, "cannot store a claim");
                    }
                }
                Event::ClaimEnded { driver_id, trip_id, why } => {
                    debug!(shard = self.id, driver = %driver_id, trip = %trip_id, ?why, "claim ended");
                    metrics::counter!("locus_claims_ended_total", "why" => format!("{why:?}")).increment(1);
                    if let Some(t) = &self.hooks.claims
                        && let Err(e) = t.delete_keyed(driver_id.as_bytes())
                    {
                        warn!(shard = self.id, error = %e, "cannot forget a claim");
                    }
                }
                Event::TripFix { trip_id, driver_id, pos } => {
                    if let Some(tx) = &self.hooks.trip_fixes
                        && tx.try_send(TripFix { trip_id, driver_id, pos }).is_err()
                    {
                        metrics::counter!("locus_trip_fixes_dropped_total").increment(1);
                    }
                }
            }
        }
    }

    /// Sends one accepted fix to every watcher of `slot`; a watcher whose queue is full
    /// is ended as lagged rather than silently missing fixes.
    fn notify_watchers(&mut self, slot: u32, view: DriverView) {
        let Some(list) = self.watchers.get_mut(&slot) else { return };
        let mut i = 0;
        while i < list.len() {
            match list[i].tx.try_send(view.clone()) {
                Ok(()) => i += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let w = list.swap_remove(i);
                    let _ = w.end.send(WatchEnd::Lagged);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    list.swap_remove(i);
                }
            }
        }
        if list.is_empty() {
            self.watchers.remove(&slot);
            self.core.set_watched(slot, false);
        }
    }

    fn end_all_watchers(&mut self, why: WatchEnd) {
        for (_, list) in self.watchers.drain() {
            for w in list {
                let _ = w.end.send(why);
            }
        }
    }

    fn sweep_watchers(&mut self) {
        let core = &mut self.core;
        self.watchers.retain(|slot, list| {
            list.retain(|w| !w.tx.is_closed());
            if list.is_empty() {
                core.set_watched(*slot, false);
            }
            !list.is_empty()
        });
    }

    /// Encodes the writes accumulated so far into the pending batch, unless it is
    /// already large (the persister is behind): then changes keep coalescing in the core.
    fn encode(&mut self) {
        let epoch = self.sweeps.epoch();
        if epoch > self.swept_epoch {
            self.swept_epoch = epoch;
            self.core.start_sweep(epoch);
        }
        if self.pending.buf.len() < MAX_PENDING_BYTES && self.core.has_pending_writes() {
            self.core.take_writes_some(&mut self.pending, ENCODE_SLICE);
        }
    }

    /// Hands everything not yet persisted to the persister, waiting for queue space.
    async fn persist_all(&mut self) {
        while self.core.has_pending_writes() {
            self.core.take_writes(&mut self.pending);
        }
        if self.pending.is_empty() {
            return;
        }
        self.stamp();
        self.pending.hold_clock();
        let batch = self.take_pending();
        if self.persist.send(batch).await.is_err() {
            warn!(shard = self.id, "persister gone; pending writes dropped");
        }
    }

    /// The pending batch, to hand over; the next one starts with room for as much.
    fn take_pending(&mut self) -> PersistBatch {
        let next = PersistBatch::sized_like(&self.pending);
        std::mem::replace(&mut self.pending, next)
    }

    /// Numbers the pending batch if it carries history (see `history_written`).
    fn stamp(&mut self) {
        if self.pending.history_parts.is_empty() {
            return;
        }
        self.history_sent += 1;
        for p in self.pending.history_parts.iter() {
            self.history_last[p as usize] = self.history_sent;
        }
        self.pending.history_ack = Some((self.history_written.clone(), self.history_sent));
    }

    /// Returns once every fix of `parts` accepted so far is in the history store:
    /// hands the pending writes over, then waits for the persister to have written the
    /// last batch with history of any of them (no wait if there is none).
    async fn history_barrier(&mut self, parts: &HashSet<u16>) {
        while self.core.has_pending_writes() {
            self.core.take_writes(&mut self.pending);
        }
        if !self.pending.is_empty() {
            self.stamp();
            self.pending.hold_clock();
            let batch = self.take_pending();
            if self.persist.send(batch).await.is_err() {
                warn!(shard = self.id, "persister gone; pending writes dropped");
                return;
            }
        }
        let need = parts.iter().map(|p| self.history_last.get(*p as usize).copied().unwrap_or(0)).max().unwrap_or(0);
        let mut written = self.history_written.subscribe();
        let wait = written.wait_for(|n| *n >= need);
        if tokio::time::timeout(Duration::from_secs(10), wait).await.is_err() {
            warn!(shard = self.id, "the persister did not write the history of moving partitions in time");
        }
    }

    /// Hands the pending batch to the persister. If its queue is full the batch stays
    /// pending (and the core keeps coalescing) until a later interval.
    fn persist(&mut self) {
        self.encode();
        if self.pending.is_empty() {
            return;
        }
        let persist = self.persist.clone();
        match persist.try_reserve() {
            Ok(permit) => {
                self.stamp();
                self.pending.hold_clock();
                permit.send(self.take_pending())
            }
            Err(_) => metrics::counter!("locus_persist_deferred_total").increment(1),
        }
    }

    fn publish_stats(&mut self, rx: &mpsc::Receiver<ShardMsg>) {
        let shard = self.id.to_string();
        let c = self.core.counters;
        let p = self.last_published;
        let pairs = [
            ("locus_fixes_accepted_total", None, c.accepted - p.accepted),
            ("locus_fixes_rejected_total", Some("stale"), c.stale - p.stale),
            ("locus_fixes_rejected_total", Some("implausible_jump"), c.implausible - p.implausible),
            ("locus_geo_reindexed_total", None, c.reindexed - p.reindexed),
            ("locus_drivers_expired_total", None, c.expired - p.expired),
            ("locus_drivers_removed_total", None, c.removed - p.removed),
        ];
        for (name, reason, delta) in pairs {
            if delta == 0 {
                continue;
            }
            match reason {
                Some(r) => metrics::counter!(name, "reason" => r).increment(delta),
                None => metrics::counter!(name, "shard" => shard.clone()).increment(delta),
            }
        }
        self.last_published = c;
        metrics::gauge!("locus_drivers", "shard" => shard.clone()).set(self.core.len() as f64);
        metrics::gauge!("locus_mailbox_depth", "mailbox" => format!("shard-{shard}"))
            .set((rx.max_capacity() - rx.capacity()) as f64);
        metrics::gauge!("locus_watchers", "shard" => shard)
            .set(self.watchers.values().map(Vec::len).sum::<usize>() as f64);
    }
}

/// State changes from outside the shards (trip actors) into the history: one task takes
/// them in order, hands them to the persister in batches, and answers barriers.
pub struct HistorySink {
    tx: mpsc::Sender<SinkMsg>,
}

enum SinkMsg {
    /// Raw history entries (`history::codec`) and their partition.
    Raw(Vec<u8>, u16),
    /// Answered once everything sent before is in the history store.
    Barrier(oneshot::Sender<()>),
    /// Hand over what is queued and stop (the persister stops once nobody holds it).
    Close(oneshot::Sender<()>),
}

impl HistorySink {
    /// Starts the sink's task (it ends when every handle is dropped).
    pub fn start(persist: mpsc::Sender<PersistBatch>) -> Arc<HistorySink> {
        let (tx, rx) = mpsc::channel(8_192);
        crate::tasks::spawn("history_sink", sink(rx, persist));
        Arc::new(HistorySink { tx })
    }

    /// Queues raw entries of `partition`; false (and counted) if the queue is full.
    pub fn log(&self, raw: Vec<u8>, partition: u16) -> bool {
        let ok = self.tx.try_send(SinkMsg::Raw(raw, partition)).is_ok();
        if !ok {
            metrics::counter!("locus_history_dropped_total", "what" => "trip_event").increment(1);
        }
        ok
    }

    /// Hands over what is queued and ends the task (at shutdown, before the persister
    /// stops: it waits for every sender to be gone).
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(SinkMsg::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Returns once everything logged before the call is in the history store.
    pub async fn barrier(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(SinkMsg::Barrier(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
        }
    }
}

async fn sink(mut rx: mpsc::Receiver<SinkMsg>, persist: mpsc::Sender<PersistBatch>) {
    let written = Arc::new(watch::channel(0u64).0);
    let mut sent = 0u64;
    while let Some(first) = rx.recv().await {
        let mut batch = PersistBatch::default();
        let mut waiters = Vec::new();
        let mut closing = None;
        let mut next = Some(first);
        while let Some(m) = next {
            match m {
                SinkMsg::Raw(raw, p) => {
                    batch.history.extend_from_slice(&raw);
                    batch.history_parts.insert(p);
                }
                SinkMsg::Barrier(w) => waiters.push(w),
                SinkMsg::Close(w) => closing = Some(w),
            }
            next = if closing.is_some() { None } else { rx.try_recv().ok() };
        }
        if !batch.history.is_empty() {
            sent += 1;
            batch.history_ack = Some((written.clone(), sent));
            batch.hold_clock();
            if persist.send(batch).await.is_err() {
                return;
            }
        }
        if let Some(w) = closing {
            drop(persist);
            let _ = w.send(());
            return;
        }
        if !waiters.is_empty() {
            let mut w = written.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(10), w.wait_for(|n| *n >= sent)).await;
            for x in waiters {
                let _ = x.send(());
            }
        }
    }
}
