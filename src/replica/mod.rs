//! Replication: every partition this node serves is copied to its next `--replicas`
//! distinct ring successors, so a crash of this node loses nothing acknowledged.
//!
//! The first distinct successor of a partition is exactly the node the ring gives it to
//! when its owner is removed, so after a crash the new owner usually promotes its own
//! copy at once (see `ownership::plan`: `Promote`).
//!
//! What travels, per target node, over one ordered link (`Handoff.Replicate`, one call in
//! flight at a time, so changes arrive in order):
//!
//! - **Claims and trips, before the answer.** After an owner writes and flushes a claim
//!   or a trip event, it reads the record back and sends it to every replica of its
//!   partition, waiting for their acknowledgements ([`Replicator::sync_kv`], at most
//!   `--replica-timeout`). Timers are data in these records (offer due time, trip TTL),
//!   so they move with them. A replica that does not answer in time leaves the write
//!   acknowledged on the owner's disk only (counted in
//!   `locus_replica_writes_total{result="degraded"}`) and is re-sent in full once it
//!   answers again. A write is confirmed only if this node still holds its quorum
//!   lease afterwards and no replica knows the partition at a newer epoch: otherwise
//!   another node may already serve it without this write (a node frozen or cut off
//!   mid-write), and the caller answers `UNAVAILABLE` ([`Unconfirmed`]) instead.
//! - **Driver fixes, in batches.** The driver log's batches (every `--persist-interval`)
//!   are teed here once on disk, split by partition without decoding (each batch tags
//!   its records with their partitions) and sent to each partition's replicas. The lag
//!   is the local log's window: about one persist interval plus one sync and one call
//!   (under 1 s by default; `locus_replica_lag_ms`).
//! - **Resets.** When a (partition, replica) pair is new (this node started serving it,
//!   the ring moved, the epoch rose) or the link broke, the partition is re-sent: its
//!   claims and trips as a whole set, and its drivers as full records in the next batch
//!   of its shard (which names the partition so the replica replaces its copy).
//!
//! Ordering: a record's read-back and its enqueueing happen under one lock, as does a
//! reset's scan, so a replica never applies an older value after a newer one. A link
//! that broke starts a new session: the replica then treats every copy from this node
//! as out of sync until reset. Every part carries the partition's epoch; a replica that
//! knows a higher one refuses it.

pub mod store;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use rand::Rng;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::clock::wall_ms;
use crate::drivers::PersistBatch;
use crate::keys::{PARTITIONS, partition_of};
use crate::membership::ClusterView;
use crate::peer::PeerLink;
use crate::ring::Ring;
use crate::routing::Router;
use crate::routing::cluster::Cluster;
use crate::storage::Records;
pub use crate::storage::{KvChange, ReplicaPart};
pub use store::{Refused, ReplicaInfo, ReplicaStore};

/// Items a link may queue before it gives up and re-sends in full later.
const LINK_QUEUE: usize = 4096;
/// Bytes a link may queue (driver batches) before it does the same.
const LINK_MAX_BYTES: usize = 64 << 20;
/// Bytes per `Replicate` call.
const CALL_MAX_BYTES: usize = 8 << 20;

/// Which partitioned store a synchronous record lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvTree {
    Claims,
    Trips,
}

struct Item {
    parts: Vec<ReplicaPart>,
    bytes: usize,
    records: usize,
    /// When the oldest change in it was made (lag).
    taken_ms: i64,
    ack: Option<oneshot::Sender<Acked>>,
}

/// How a replica answered one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Acked {
    Stored,
    /// It knows the partition at a newer epoch: another node owns it now.
    Stale,
    /// No answer (timeout, broken link).
    Failed,
}

/// A write this node cannot confirm as its partition's owner (see the module docs):
/// it is on this node's disk, but another node may serve the partition without it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "partition {0}: the write is on this node but not confirmed (not every replica stored it in time, this node's quorum lease ran out, or a replica knows a newer owner); the outcome is unknown: retry"
)]
pub struct Unconfirmed(pub u16);

#[derive(Default)]
struct LinkState {
    queued_bytes: AtomicUsize,
    queued_records: AtomicUsize,
    /// Something was dropped or the link broke: re-send every partition once healthy.
    need_resync: AtomicBool,
    /// The last call succeeded.
    healthy: AtomicBool,
    /// Age of the oldest change in the last acknowledged call, ms.
    lag_ms: AtomicU64,
    /// Partitions the peer refused as not in sync or served there (a move): reset again
    /// at the next link check (at most once a second), not at the next survey.
    refused: Mutex<HashSet<u16>>,
}

/// One replication link as `admin partitions` shows it.
#[derive(Clone, Debug)]
pub struct LinkInfo {
    pub peer: SocketAddr,
    pub lag_ms: u64,
    pub queued_records: usize,
    pub healthy: bool,
}

struct Link {
    grpc: SocketAddr,
    tx: mpsc::Sender<Item>,
    state: Arc<LinkState>,
    task: JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link {
    /// Queues an item without waiting; a full queue drops it and marks the link for a
    /// full re-send.
    fn offer(&self, item: Item) -> bool {
        let (bytes, records) = (item.bytes, item.records);
        if self.state.queued_bytes.load(Ordering::Relaxed) + bytes > LINK_MAX_BYTES {
            self.state.need_resync.store(true, Ordering::Release);
            metrics::counter!("locus_replica_dropped_total").increment(1);
            return false;
        }
        match self.tx.try_send(item) {
            Ok(()) => {
                self.state.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
                self.state.queued_records.fetch_add(records, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.state.need_resync.store(true, Ordering::Release);
                metrics::counter!("locus_replica_dropped_total").increment(1);
                false
            }
        }
    }
}

/// Per partition served here: its epoch and its replica targets (gossip addresses).
type Placement = Vec<Option<(u64, Vec<SocketAddr>)>>;

struct Inner {
    placement: Arc<Placement>,
    links: HashMap<SocketAddr, Link>,
    /// Partitions whose drivers must be re-sent in full (asked of the shards).
    pending: HashSet<u16>,
    /// (target, partition) pairs reset and not yet seen in sync in a survey, since when.
    unconfirmed: HashMap<(SocketAddr, u16), Instant>,
}

/// How long a reset may take to show in sync in the surveys before it is sent again.
const CONFIRM_WITHIN: Duration = Duration::from_secs(5);

/// The owner side of replication. See the module docs.
pub struct Replicator {
    me: SocketAddr,
    replicas: usize,
    timeout: Duration,
    claims: Arc<dyn Records>,
    trips: Arc<dyn Records>,
    router: Arc<Router>,
    cluster: Arc<Cluster>,
    /// Calls on the replicas' nodes.
    link: Arc<dyn PeerLink>,
    inner: Mutex<Inner>,
    wake: Notify,
    /// Set by the persister when a batch could not be teed here.
    tee_dropped: Arc<AtomicBool>,
    /// `--degraded-writes`: answer a claim or trip event that no in-sync replica stored
    /// in time anyway (it then lives on this node's disk only until a replica syncs).
    degraded_writes: AtomicBool,
    /// The fix history: a partition reset for a replica starts a new history segment,
    /// whose first block carries every name the replica needs.
    history: std::sync::OnceLock<Arc<crate::history::HistoryStore>>,
}

fn session_id() -> u64 {
    rand::rng().next_u64()
}

fn kv_changes(set: &dyn Records, p: u16) -> Vec<KvChange> {
    set.scan_or_log(p).into_iter().map(|(id, v)| KvChange { id, value: Some(v) }).collect()
}

impl Replicator {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: SocketAddr,
        replicas: usize,
        timeout: Duration,
        claims: Arc<dyn Records>,
        trips: Arc<dyn Records>,
        router: Arc<Router>,
        cluster: Arc<Cluster>,
        link: Arc<dyn PeerLink>,
        tee_dropped: Arc<AtomicBool>,
    ) -> Arc<Replicator> {
        Arc::new(Replicator {
            me,
            replicas,
            timeout,
            claims,
            trips,
            router,
            cluster,
            link,
            inner: Mutex::new(Inner {
                placement: Arc::new(vec![None; PARTITIONS as usize]),
                links: HashMap::new(),
                pending: HashSet::new(),
                unconfirmed: HashMap::new(),
            }),
            wake: Notify::new(),
            tee_dropped,
            degraded_writes: AtomicBool::new(false),
            history: std::sync::OnceLock::new(),
        })
    }

    /// Replicates the node's fix history with the drivers.
    pub fn set_history(&self, h: Arc<crate::history::HistoryStore>) {
        let _ = self.history.set(h);
    }

    /// See `--degraded-writes`.
    pub fn set_degraded_writes(&self, on: bool) {
        self.degraded_writes.store(on, Ordering::Relaxed);
    }

    /// How many copies besides the owner's each partition keeps.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Every open link, for `admin partitions`.
    pub fn links(&self) -> Vec<LinkInfo> {
        let inner = self.inner.lock().expect("replicator lock");
        let mut v: Vec<LinkInfo> = inner
            .links
            .iter()
            .map(|(a, l)| LinkInfo {
                peer: *a,
                lag_ms: l.state.lag_ms.load(Ordering::Relaxed),
                queued_records: l.state.queued_records.load(Ordering::Relaxed),
                healthy: l.state.healthy.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by_key(|l| l.peer);
        v
    }

    /// The replica targets of a partition served here (empty when not served here).
    pub fn targets(&self, p: u16) -> Vec<SocketAddr> {
        let inner = self.inner.lock().expect("replicator lock");
        inner.placement[p as usize].as_ref().map(|(_, t)| t.clone()).unwrap_or_default()
    }

    /// Follows what this node serves (`active`: partition, epoch) and the ring: opens and
    /// closes links, and re-sends every (partition, replica) pair that is new.
    pub fn set_placement(&self, view: &ClusterView, ring: &Ring, active: &[(u16, u64)]) {
        let mut inner = self.inner.lock().expect("replicator lock");
        let old = inner.placement.clone();
        let mut new: Placement = vec![None; PARTITIONS as usize];
        let mut fresh: HashMap<SocketAddr, Vec<(u16, u64)>> = HashMap::new();
        for &(p, epoch) in active {
            let targets: Vec<SocketAddr> = if self.replicas == 0 {
                Vec::new()
            } else {
                ring.partition_successors(p as usize, self.replicas + 1)
                    .into_iter()
                    .filter(|a| *a != self.me && view.meta(a).is_some())
                    .take(self.replicas)
                    .collect()
            };
            for t in &targets {
                let had = old[p as usize].as_ref().is_some_and(|(e, ts)| *e == epoch && ts.contains(t));
                if !had {
                    fresh.entry(*t).or_default().push((p, epoch));
                }
            }
            new[p as usize] = Some((epoch, targets));
        }
        let wanted: HashSet<SocketAddr> = new.iter().flatten().flat_map(|(_, ts)| ts.iter().copied()).collect();
        inner.links.retain(|a, l| wanted.contains(a) && view.meta(a).is_some_and(|m| m.grpc == l.grpc));
        for a in &wanted {
            if !inner.links.contains_key(a)
                && let Some(m) = view.meta(a)
            {
                let link = self.open_link(*a, m.grpc);
                debug!(peer = %a, "replica link opened");
                inner.links.insert(*a, link);
                // A new link is a new session: everything it carries is re-sent.
                for (p, slot) in new.iter().enumerate() {
                    if let Some((e, ts)) = slot
                        && ts.contains(a)
                    {
                        let f = fresh.entry(*a).or_default();
                        if !f.iter().any(|(x, _)| *x == p as u16) {
                            f.push((p as u16, *e));
                        }
                    }
                }
            }
        }
        inner.placement = Arc::new(new);
        let mut any = false;
        for (t, parts) in fresh {
            self.reset_kv(&mut inner, t, &parts);
            any = true;
        }
        drop(inner);
        if any {
            self.wake.notify_one();
        }
    }

    /// Queues the whole claims/trips set of `parts` to `target` and asks the shards to
    /// re-send their drivers. Caller holds the lock (ordering against `sync_kv`).
    fn reset_kv(&self, inner: &mut Inner, target: SocketAddr, parts: &[(u16, u64)]) {
        if let Some(h) = self.history.get() {
            for &(p, _) in parts {
                h.cut(p);
            }
        }
        if let Some(link) = inner.links.get(&target) {
            let mut out = Vec::with_capacity(parts.len());
            let mut bytes = 0;
            for &(p, epoch) in parts {
                let claims = kv_changes(&*self.claims, p);
                let trips = kv_changes(&*self.trips, p);
                bytes += claims
                    .iter()
                    .chain(&trips)
                    .map(|c| c.id.len() + c.value.as_ref().map_or(0, Vec::len))
                    .sum::<usize>();
                out.push(ReplicaPart { partition: p, epoch, kv_reset: true, claims, trips, ..Default::default() });
            }
            link.offer(Item { parts: out, bytes, records: 0, taken_ms: wall_ms(), ack: None });
        }
        inner.pending.extend(parts.iter().map(|(p, _)| *p));
        let now = Instant::now();
        for (p, _) in parts {
            inner.unconfirmed.insert((target, *p), now);
        }
    }

    /// Checks the replica count against a survey of every member's holdings: a target
    /// that does not report an in-sync replica at this node's epoch, some time after its
    /// reset, is reset again (it restarted, dropped the copy, or a reset got lost).
    pub fn verify(&self, survey: &crate::ownership::Survey) {
        let mut inner = self.inner.lock().expect("replicator lock");
        let placement = inner.placement.clone();
        let mut in_sync: HashSet<(SocketAddr, u16, u64)> = HashSet::new();
        for (a, hs) in &survey.answered {
            for h in hs.iter().filter(|h| h.holding == crate::ownership::Holding::Replica) {
                in_sync.insert((*a, h.partition, h.epoch));
            }
        }
        let now = Instant::now();
        let mut redo: HashMap<SocketAddr, Vec<(u16, u64)>> = HashMap::new();
        for (p, slot) in placement.iter().enumerate() {
            let Some((epoch, targets)) = slot else { continue };
            let p = p as u16;
            for t in targets {
                if !survey.answered.contains_key(t) {
                    continue;
                }
                if in_sync.contains(&(*t, p, *epoch)) {
                    inner.unconfirmed.remove(&(*t, p));
                } else if inner.unconfirmed.get(&(*t, p)).is_none_or(|since| now - *since > CONFIRM_WITHIN) {
                    redo.entry(*t).or_default().push((p, *epoch));
                }
            }
        }
        inner.unconfirmed.retain(|(t, p), _| placement[*p as usize].as_ref().is_some_and(|(_, ts)| ts.contains(t)));
        let mut any = false;
        for (t, parts) in redo {
            debug!(peer = %t, partitions = parts.len(), "replicas not in sync: re-sending");
            metrics::counter!("locus_replica_resets_total", "why" => "not_in_sync").increment(parts.len() as u64);
            self.reset_kv(&mut inner, t, &parts);
            any = true;
        }
        drop(inner);
        if any {
            self.wake.notify_one();
        }
    }

    fn open_link(&self, target: SocketAddr, grpc: SocketAddr) -> Link {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let state = Arc::new(LinkState::default());
        state.healthy.store(true, Ordering::Relaxed);
        let name = self.cluster.view().name_of(&target);
        let to = (self.link.clone(), grpc);
        let task = crate::tasks::spawn("replica_link", link_task(self.me, name, to, rx, state.clone(), self.timeout));
        Link { grpc, tx, state, task }
    }

    /// Sends the stored record `id` of `tree` (its value now, or its absence) to every
    /// replica of its partition and waits for them (at most `--replica-timeout`). Call
    /// after the write is flushed locally, before answering the client.
    /// How it went is counted in `locus_replica_writes_total{result}`. Errs if this node
    /// may no longer own the partition (see the module docs).
    pub async fn sync_kv(&self, tree: KvTree, id: &[u8]) -> Result<(), Unconfirmed> {
        let p = partition_of(id);
        let sent = self.send_kv(tree, id, p).await;
        // Not stored by every in-sync replica in time: by default the outcome is unknown
        // to the caller (a crash of this node now would lose it: the replica promoted
        // would not have it); a retry with the same id applies it once.
        let degraded_ok = sent != Some(Acked::Failed) || self.degraded_writes.load(Ordering::Relaxed);
        let quorum = self.cluster.has_quorum();
        let confirmed = sent != Some(Acked::Stale) && degraded_ok && quorum;
        // One result per write.
        let result = match (confirmed, sent) {
            (false, Some(Acked::Failed)) if quorum => "not_replicated",
            (false, _) => "unconfirmed",
            (true, None) => return Ok(()),
            (true, Some(Acked::Stored)) => "acked",
            (true, Some(_)) => "degraded",
        };
        metrics::counter!("locus_replica_writes_total", "result" => result).increment(1);
        if confirmed { Ok(()) } else { Err(Unconfirmed(p)) }
    }

    /// [`Replicator::sync_kv`]'s sending: `None` without replicas, else the worst answer
    /// (`Stale` if a replica knows a newer epoch, `Failed` if one did not answer in time).
    async fn send_kv(&self, tree: KvTree, id: &[u8], p: u16) -> Option<Acked> {
        let waits = {
            let inner = self.inner.lock().expect("replicator lock");
            let (epoch, targets) = inner.placement[p as usize].clone()?;
            if targets.is_empty() {
                return None;
            }
            let store = match tree {
                KvTree::Claims => &self.claims,
                KvTree::Trips => &self.trips,
            };
            let value = store.get(p, id).ok().flatten();
            let change = KvChange { id: id.to_vec(), value };
            let mut waits = Vec::with_capacity(targets.len());
            for t in &targets {
                let Some(link) = inner.links.get(t) else { continue };
                if !link.state.healthy.load(Ordering::Acquire) {
                    // It is re-sent in full once the link works again.
                    link.state.need_resync.store(true, Ordering::Release);
                    continue;
                }
                let (ack, rx) = oneshot::channel();
                let mut part = ReplicaPart { partition: p, epoch, ..Default::default() };
                let bytes = change.id.len() + change.value.as_ref().map_or(0, Vec::len);
                match tree {
                    KvTree::Claims => part.claims.push(change.clone()),
                    KvTree::Trips => part.trips.push(change.clone()),
                }
                let item = Item { parts: vec![part], bytes, records: 1, taken_ms: wall_ms(), ack: Some(ack) };
                if link.offer(item) {
                    waits.push(rx);
                }
            }
            (waits, targets.len())
        };
        let (waits, wanted) = waits;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (mut acked, mut stale) = (0, false);
        for w in waits {
            match tokio::time::timeout_at(deadline, w).await {
                Ok(Ok(Acked::Stored)) => acked += 1,
                Ok(Ok(Acked::Stale)) => stale = true,
                _ => {}
            }
        }
        Some(if stale {
            Acked::Stale
        } else if acked == wanted {
            Acked::Stored
        } else {
            Acked::Failed
        })
    }

    /// Splits a teed driver-log batch by partition and queues each part to its replicas.
    fn fan_out(&self, b: PersistBatch) {
        let placement = self.inner.lock().expect("replicator lock").placement.clone();
        let mut per: HashMap<SocketAddr, (BTreeMap<u16, ReplicaPart>, usize)> = HashMap::new();
        for &p in &b.resync {
            if let Some((epoch, ts)) = &placement[p as usize] {
                for t in ts {
                    let part = ReplicaPart { partition: p, epoch: *epoch, drivers_reset: true, ..Default::default() };
                    per.entry(*t).or_default().0.insert(p, part);
                }
            }
        }
        let mut start = 0usize;
        for &(p, end) in &b.parts {
            let end = end as usize;
            let Some(rec) = b.buf.get(start..end) else { break };
            start = end;
            if let Some((epoch, ts)) = &placement[p as usize] {
                for t in ts {
                    let e = per.entry(*t).or_default();
                    e.0.entry(p)
                        .or_insert_with(|| ReplicaPart { partition: p, epoch: *epoch, ..Default::default() })
                        .drivers
                        .extend_from_slice(rec);
                    e.1 += 1;
                }
            }
        }
        for (p, block) in &b.history_blocks {
            if let Some((epoch, ts)) = &placement[*p as usize] {
                for t in ts {
                    per.entry(*t)
                        .or_default()
                        .0
                        .entry(*p)
                        .or_insert_with(|| ReplicaPart { partition: *p, epoch: *epoch, ..Default::default() })
                        .history
                        .extend_from_slice(block);
                }
            }
        }
        if per.is_empty() {
            return;
        }
        // On disk now; the shard took these records at most one persist interval ago.
        let taken_ms = wall_ms();
        let inner = self.inner.lock().expect("replicator lock");
        for (t, (parts, records)) in per {
            if let Some(link) = inner.links.get(&t) {
                let bytes = parts.values().map(|p| p.drivers.len() + p.history.len()).sum();
                link.offer(Item { parts: parts.into_values().collect(), bytes, records, taken_ms, ack: None });
            }
        }
    }

    /// Re-sends in full what links that broke (or dropped items) carry, once they work.
    fn check_links(&self) {
        let dropped = self.tee_dropped.swap(false, Ordering::AcqRel);
        let mut inner = self.inner.lock().expect("replicator lock");
        let placement = inner.placement.clone();
        let mut todo = Vec::new();
        let mut refresh = Vec::new();
        for (a, l) in &inner.links {
            if dropped {
                l.state.need_resync.store(true, Ordering::Release);
            }
            // A link that broke recovers only by a call: with nothing queued on it (no
            // driver traffic to that peer), queue its reset, which is the call.
            let idle = l.tx.capacity() == l.tx.max_capacity();
            let healthy = l.state.healthy.load(Ordering::Acquire);
            if (healthy || idle) && l.state.need_resync.swap(false, Ordering::AcqRel) {
                let parts: Vec<(u16, u64)> = placement
                    .iter()
                    .enumerate()
                    .filter_map(|(p, s)| s.as_ref().filter(|(_, ts)| ts.contains(a)).map(|(e, _)| (p as u16, *e)))
                    .collect();
                l.state.refused.lock().expect("refused lock").clear();
                todo.push((*a, parts));
            } else {
                let refused = std::mem::take(&mut *l.state.refused.lock().expect("refused lock"));
                let parts: Vec<(u16, u64)> = refused
                    .into_iter()
                    .filter_map(|p| {
                        placement[p as usize].as_ref().filter(|(_, ts)| ts.contains(a)).map(|(e, _)| (p, *e))
                    })
                    .collect();
                if !parts.is_empty() {
                    debug!(peer = %a, partitions = parts.len(), "replicas refused as not in sync: re-sending them");
                    metrics::counter!("locus_replica_resets_total", "why" => "refused").increment(parts.len() as u64);
                    refresh.push((*a, parts));
                }
            }
            let name = l.grpc.to_string();
            metrics::gauge!("locus_replica_lag_records", "peer" => name)
                .set(l.state.queued_records.load(Ordering::Relaxed) as f64);
        }
        for (a, parts) in todo {
            info!(peer = %a, partitions = parts.len(), "re-sending replicas in full");
            self.reset_kv(&mut inner, a, &parts);
        }
        for (a, parts) in refresh {
            self.reset_kv(&mut inner, a, &parts);
        }
    }

    async fn request_resyncs(&self) {
        let parts = std::mem::take(&mut self.inner.lock().expect("replicator lock").pending);
        if !parts.is_empty() {
            debug!(partitions = parts.len(), "asking the shards to re-send drivers to replicas");
            self.router.resync(parts).await;
        }
    }

    /// The replication task: fans out teed batches, asks for driver resets, and checks
    /// the links every second.
    pub async fn run(self: Arc<Self>, mut batches: mpsc::Receiver<PersistBatch>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                b = batches.recv() => match b {
                    Some(b) => self.fan_out(b),
                    None => return,
                },
                _ = self.wake.notified() => self.request_resyncs().await,
                _ = tick.tick() => {
                    self.check_links();
                    self.request_resyncs().await;
                }
            }
        }
    }
}

/// One link's sender: batches what is queued into one call at a time, in order.
async fn link_task(
    me: SocketAddr,
    peer: String,
    (link, grpc): (Arc<dyn PeerLink>, SocketAddr),
    mut rx: mpsc::Receiver<Item>,
    state: Arc<LinkState>,
    timeout: Duration,
) {
    let mut session = session_id();
    let mut backoff = Duration::from_millis(100);
    let mut first_failure: Option<Instant> = None;
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        let mut bytes = items[0].bytes;
        while bytes < CALL_MAX_BYTES {
            match rx.try_recv() {
                Ok(i) => {
                    bytes += i.bytes;
                    items.push(i);
                }
                Err(_) => break,
            }
        }
        let records: usize = items.iter().map(|i| i.records).sum();
        state.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        state.queued_records.fetch_sub(records, Ordering::Relaxed);
        let oldest = items.iter().map(|i| i.taken_ms).min().unwrap_or_else(wall_ms);
        // The partitions of each write waiting for its answer.
        let waiting: Vec<Vec<u16>> = items
            .iter()
            .map(|i| if i.ack.is_some() { i.parts.iter().map(|p| p.partition).collect() } else { Vec::new() })
            .collect();
        let parts = items.iter_mut().flat_map(|i| std::mem::take(&mut i.parts)).collect();
        let r = link.replicate(grpc, me, session, parts, timeout.max(Duration::from_secs(2))).await;
        let mut stale_parts: HashSet<u16> = HashSet::new();
        let mut refused_parts: HashSet<u16> = HashSet::new();
        let ok = match r {
            Ok(refused) => {
                // One line per answer, not per partition: after a heal a whole node's
                // partitions can be refused at once.
                let (stale, moving): (Vec<_>, Vec<_>) =
                    refused.iter().partition(|f| f.kind == crate::peer::RefusalKind::StaleEpoch);
                stale_parts.extend(stale.iter().map(|f| f.partition));
                refused_parts.extend(moving.iter().map(|f| f.partition));
                state.refused.lock().expect("refused lock").extend(moving.iter().map(|f| f.partition));
                if let Some(first) = stale.first() {
                    let ps: Vec<u16> = stale.iter().map(|f| f.partition).collect();
                    metrics::counter!("locus_replica_refused_total", "reason" => "stale_epoch")
                        .increment(ps.len() as u64);
                    warn!(peer = %peer, count = ps.len(), partitions = ?ps, first_reason = %first.reason,
                        "replica refused partitions at an older epoch (this node's copies are stale; it stands down)");
                }
                if let Some(first) = moving.first() {
                    // The peer took the partitions over (a move in progress).
                    let ps: Vec<u16> = moving.iter().map(|f| f.partition).collect();
                    debug!(peer = %peer, count = ps.len(), partitions = ?ps, first_reason = %first.reason,
                        "replica refused partitions it serves");
                }
                if let Some(t0) = first_failure.take() {
                    info!(peer = %peer, down_ms = t0.elapsed().as_millis() as u64, "replica link works again");
                }
                state.healthy.store(true, Ordering::Release);
                backoff = Duration::from_millis(100);
                let lag = (wall_ms() - oldest).max(0);
                state.lag_ms.store(lag as u64, Ordering::Relaxed);
                metrics::gauge!("locus_replica_lag_ms", "peer" => peer.clone()).set(lag as f64);
                metrics::counter!("locus_replica_records_total").increment(records as u64);
                metrics::counter!("locus_replica_bytes_total").increment(bytes as u64);
                true
            }
            Err(e) => {
                fail(&peer, &state, &mut session, &mut first_failure, &e.to_string());
                false
            }
        };
        for (i, ps) in items.into_iter().zip(waiting) {
            if let Some(a) = i.ack {
                // A change the peer refused (not in sync, or it serves the partition) is
                // not a copy that could be promoted: it does not count as stored.
                let answer = match ok {
                    false => Acked::Failed,
                    true if ps.iter().any(|p| stale_parts.contains(p)) => Acked::Stale,
                    true if ps.iter().any(|p| refused_parts.contains(p)) => Acked::Failed,
                    true => Acked::Stored,
                };
                let _ = a.send(answer);
            }
        }
        if !ok {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

fn fail(peer: &str, state: &LinkState, session: &mut u64, first: &mut Option<Instant>, why: &str) {
    if first.is_none() {
        warn!(peer = %peer, error = %why, "replica link broke; its replicas are re-sent once it answers");
        *first = Some(Instant::now());
    }
    state.healthy.store(false, Ordering::Release);
    state.need_resync.store(true, Ordering::Release);
    *session = session_id();
    metrics::counter!("locus_replica_link_failures_total").increment(1);
}
