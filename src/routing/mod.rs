//! Routing: from a keyed request to the actor that owns the key.
//!
//! Two levels. [`cluster`] picks the owner node from the ring (the API forwards there
//! when it is another node); the [`Router`] here takes a request this node owns to the
//! shard that owns its partition (`keys::shard_of`).
//!
//! - Fixes: a batch is split by shard once and sent as one message per shard, in order,
//!   so consecutive batches of one stream keep each driver's order.
//! - Keyed reads and removals go to the driver's shard. Lookups by cab number or session
//!   go through the [`SecondaryIndex`] and are verified by the owning shard.
//! - Geo queries scatter to every shard and merge nearest first.

pub mod cluster;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use crate::actors::SecondaryIndex;
use crate::actors::{ShardMsg, WatchEnd, Watcher};
use crate::drivers::{
    Claim, ClaimError, ClaimOk, DriverView, FixInput, IndexKind, Lookup, NearbyHit, NearbyQuery, Reject, Snapshot,
    WithinQuery,
};
use crate::keys::shard_of;

/// How a request names a driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriverKey {
    Id(String),
    Cab(String),
    Session(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("driver not found (unknown, removed or expired)")]
    NotFound,
    #[error("overloaded: the owner's mailbox is full, retry later")]
    Overloaded,
    #[error("unavailable: the node is shutting down")]
    Unavailable,
}

/// Routes requests to the shard that owns their key. Cheap to share (`Arc`).
pub struct Router {
    shards: Vec<mpsc::Sender<ShardMsg>>,
    index: Arc<SecondaryIndex>,
    /// How long a streamed batch or a read may wait for mailbox space.
    overload_wait: Duration,
}

/// One shard's part of an install: drivers and their claims.
type ShardInstall = (Vec<Snapshot>, Vec<(String, Claim)>);

/// Most drivers one install message of a hand-off carries to a shard (a few
/// milliseconds of work).
pub const INSTALL_SLICE: usize = 512;

/// Most drivers one message drops from a shard when partitions move away: queries
/// queued behind it wait for one slice of R-tree removals, not a whole chunk's.
pub const FORGET_SLICE: usize = 1_024;

/// The outcome of a dispatched batch: every rejected fix with its index, in index order.
pub type BatchResult = Vec<(u32, Reject)>;

impl Router {
    pub fn new(shards: Vec<mpsc::Sender<ShardMsg>>, index: Arc<SecondaryIndex>, overload_wait: Duration) -> Self {
        Router { shards, index, overload_wait }
    }

    fn shard(&self, driver_id: &str) -> &mpsc::Sender<ShardMsg> {
        &self.shards[shard_of(driver_id.as_bytes(), self.shards.len())]
    }

    async fn send(&self, tx: &mpsc::Sender<ShardMsg>, msg: ShardMsg) -> Result<(), RouteError> {
        match tx.send_timeout(msg, self.overload_wait).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(RouteError::Overloaded),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(RouteError::Unavailable),
        }
    }

    /// One fix, for the unary RPC: never waits for mailbox space.
    pub async fn update(&self, fix: FixInput) -> Result<(), Reject> {
        let (reply, rx) = oneshot::channel();
        let tx = self.shard(&fix.driver_id);
        match tx.try_send(ShardMsg::Fixes { fixes: vec![(0, fix)], reply }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(Reject::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Reject::Unavailable),
        }
        match rx.await {
            Ok(mut r) => r.pop().map_or(Ok(()), |(_, e)| Err(e)),
            Err(_) => Err(Reject::Unavailable),
        }
    }

    /// Sends a batch's fixes to their shards (one message per shard) and returns a
    /// future of the result. Returning only after every message is queued keeps the
    /// order of consecutive batches; awaiting the result can then happen concurrently.
    pub async fn dispatch_batch(
        &self,
        fixes: impl IntoIterator<Item = (u32, FixInput)>,
    ) -> impl Future<Output = BatchResult> + Send + 'static {
        let n = self.shards.len();
        let fixes = fixes.into_iter();
        // Room for an even share and a quarter more, so a large batch is rarely copied.
        let each = fixes.size_hint().0 * 5 / (4 * n);
        let mut per: Vec<Vec<(u32, FixInput)>> = (0..n).map(|_| Vec::with_capacity(each)).collect();
        for (i, f) in fixes {
            per[shard_of(f.driver_id.as_bytes(), n)].push((i, f));
        }
        let mut rejected: BatchResult = Vec::new();
        let mut pending = Vec::with_capacity(n);
        for (s, fixes) in per.into_iter().enumerate() {
            if fixes.is_empty() {
                continue;
            }
            let idx: Vec<u32> = fixes.iter().map(|(i, _)| *i).collect();
            let (reply, rx) = oneshot::channel();
            match self.send(&self.shards[s], ShardMsg::Fixes { fixes, reply }).await {
                Ok(()) => pending.push((idx, rx)),
                Err(e) => {
                    let why = if e == RouteError::Overloaded { Reject::Overloaded } else { Reject::Unavailable };
                    rejected.extend(idx.into_iter().map(|i| (i, why.clone())));
                }
            }
        }
        async move {
            for (idx, rx) in pending {
                match rx.await {
                    Ok(r) => rejected.extend(r),
                    Err(_) => rejected.extend(idx.into_iter().map(|i| (i, Reject::Unavailable))),
                }
            }
            rejected.sort_unstable_by_key(|(i, _)| *i);
            rejected
        }
    }

    /// The lookups to try for a key, in order: the id itself, or every driver claiming a
    /// cab number or session (latest claim first), each verified by its shard.
    fn lookups(&self, key: DriverKey) -> Vec<Lookup> {
        match key {
            DriverKey::Id(id) => vec![Lookup::Id(id)],
            DriverKey::Cab(c) => {
                self.index.get(IndexKind::Cab, &c).into_iter().map(|id| Lookup::IdWithCab(id, c.clone())).collect()
            }
            DriverKey::Session(s) => self
                .index
                .get(IndexKind::Session, &s)
                .into_iter()
                .map(|id| Lookup::IdWithSession(id, s.clone()))
                .collect(),
        }
    }

    async fn ask<T>(
        &self,
        driver_id: &str,
        make: impl FnOnce(oneshot::Sender<T>) -> ShardMsg,
    ) -> Result<T, RouteError> {
        let (reply, rx) = oneshot::channel();
        self.send(self.shard(driver_id), make(reply)).await?;
        rx.await.map_err(|_| RouteError::Unavailable)
    }

    pub async fn get(&self, key: DriverKey, include_trail: bool) -> Result<DriverView, RouteError> {
        for lookup in self.lookups(key) {
            let id = lookup.driver_id().to_string();
            if let Some(v) = self.ask(&id, |reply| ShardMsg::Get { lookup, include_trail, reply }).await? {
                return Ok(v);
            }
        }
        Err(RouteError::NotFound)
    }

    pub async fn remove(&self, key: DriverKey) -> Result<String, RouteError> {
        for lookup in self.lookups(key) {
            let id = lookup.driver_id().to_string();
            if let Some(removed) = self.ask(&id, |reply| ShardMsg::Remove { lookup, reply }).await? {
                return Ok(removed);
            }
        }
        Err(RouteError::NotFound)
    }

    /// The driver holding `session` on this node, if any (the latest to claim it).
    pub fn session_driver(&self, session: &str) -> Option<String> {
        self.index.latest(IndexKind::Session, session)
    }

    /// Opens or closes a driver's UDP session; whether it changed. `NotFound` when the
    /// driver is not here.
    pub async fn set_session(
        &self,
        driver_id: &str,
        change: crate::drivers::SessionChange,
    ) -> Result<bool, RouteError> {
        let driver_id = driver_id.to_string();
        let id = driver_id.clone();
        self.ask(&id, |reply| ShardMsg::SetSession { driver_id, change, reply }).await?.ok_or(RouteError::NotFound)
    }

    async fn scatter(
        &self,
        make: impl Fn(oneshot::Sender<Vec<NearbyHit>>) -> ShardMsg,
    ) -> Result<Vec<NearbyHit>, RouteError> {
        let mut pending = Vec::with_capacity(self.shards.len());
        for tx in &self.shards {
            let (reply, rx) = oneshot::channel();
            self.send(tx, make(reply)).await?;
            pending.push(rx);
        }
        let mut all = Vec::new();
        for rx in pending {
            all.extend(rx.await.map_err(|_| RouteError::Unavailable)?);
        }
        all.sort_by(|a, b| a.distance_m.total_cmp(&b.distance_m).then_with(|| a.driver_id.cmp(&b.driver_id)));
        Ok(all)
    }

    /// The `q.limit` nearest drivers over every shard.
    pub async fn nearby(&self, q: NearbyQuery) -> Result<Vec<NearbyHit>, RouteError> {
        let limit = q.limit;
        let q = Arc::new(q);
        let mut all = self.scatter(|reply| ShardMsg::Nearby { q: q.clone(), reply }).await?;
        all.truncate(limit);
        Ok(all)
    }

    /// The drivers in an area over every shard; `true` when more than `limit` matched.
    pub async fn within(&self, q: WithinQuery) -> Result<(Vec<NearbyHit>, bool), RouteError> {
        let limit = q.limit();
        let q = Arc::new(q);
        let mut all = self.scatter(|reply| ShardMsg::Within { q: q.clone(), reply }).await?;
        let truncated = all.len() > limit;
        all.truncate(limit);
        Ok((all, truncated))
    }

    /// Dispatch's compare-and-set AVAILABLE → DISPATCHED in the driver's shard.
    pub async fn claim(
        &self,
        driver_id: String,
        trip_id: String,
        vehicle_type: String,
        offer_due_ms: i64,
    ) -> Result<Result<ClaimOk, ClaimError>, RouteError> {
        let id = driver_id.clone();
        self.ask(&id, |reply| ShardMsg::Claim { driver_id, trip_id, vehicle_type, offer_due_ms, reply }).await
    }

    /// DRIVER_ASSIGNED: confirm (or take) the driver's claim for the trip.
    pub async fn confirm(&self, driver_id: String, trip_id: String) -> Result<Result<ClaimOk, ClaimError>, RouteError> {
        let id = driver_id.clone();
        self.ask(&id, |reply| ShardMsg::Confirm { driver_id, trip_id, reply }).await
    }

    /// Frees the driver if it is still claimed for the trip.
    pub async fn release(&self, driver_id: String, trip_id: String) -> Result<bool, RouteError> {
        let id = driver_id.clone();
        self.ask(&id, |reply| ShardMsg::Release { driver_id, trip_id, reply }).await
    }

    /// Hand-off, holder side: freezes the partitions in every shard and returns their
    /// drivers as full log records, per partition (records, count).
    pub async fn export(&self, parts: Arc<HashSet<u16>>) -> Result<HashMap<u16, (Vec<u8>, u32)>, RouteError> {
        let mut out: HashMap<u16, (Vec<u8>, u32)> = HashMap::new();
        // Every shard exports at once (in parallel), then the answers are merged.
        let mut replies = Vec::with_capacity(self.shards.len());
        for tx in &self.shards {
            let (reply, rx) = oneshot::channel();
            tx.send(ShardMsg::Export { partitions: parts.clone(), reply })
                .await
                .map_err(|_| RouteError::Unavailable)?;
            replies.push(rx);
        }
        for rx in replies {
            for (p, (buf, n)) in rx.await.map_err(|_| RouteError::Unavailable)? {
                let e = out.entry(p).or_default();
                e.0.extend_from_slice(&buf);
                e.1 += n;
            }
        }
        Ok(out)
    }

    /// Replication: the partitions' drivers go to their replicas in full with the next
    /// batch of each shard.
    /// Each shard is told only its own partitions (another shard's empty answer would
    /// clear a replica).
    pub async fn resync(&self, parts: HashSet<u16>) {
        let n = self.shards.len();
        let mut per: Vec<HashSet<u16>> = (0..n).map(|_| HashSet::new()).collect();
        for p in parts {
            per[p as usize % n].insert(p);
        }
        for (tx, parts) in self.shards.iter().zip(per) {
            if !parts.is_empty() {
                let _ = tx.send(ShardMsg::Resync { partitions: Arc::new(parts) }).await;
            }
        }
    }

    /// The live map's slice of this node: every shard's, merged (shards answer in
    /// parallel).
    pub async fn map(&self, q: crate::drivers::map::MapQuery) -> Result<crate::drivers::map::MapSlice, RouteError> {
        let q = Arc::new(q);
        let mut pending = Vec::with_capacity(self.shards.len());
        for tx in &self.shards {
            let (reply, rx) = oneshot::channel();
            self.send(tx, ShardMsg::Map { q: q.clone(), reply }).await?;
            pending.push(rx);
        }
        let mut out = crate::drivers::map::MapSlice::empty(&q);
        for rx in pending {
            out.merge(rx.await.map_err(|_| RouteError::Unavailable)?, &q);
        }
        Ok(out)
    }

    /// Live drivers per partition, over every shard.
    pub async fn partition_counts(&self) -> HashMap<u16, u32> {
        let mut out = HashMap::new();
        for tx in &self.shards {
            let (reply, rx) = oneshot::channel();
            if tx.send(ShardMsg::Counts { reply }).await.is_ok() {
                out.extend(rx.await.unwrap_or_default());
            }
        }
        out
    }

    /// Hand-off, holder side: drops the partitions' drivers; returns how many.
    pub async fn forget(&self, parts: Arc<HashSet<u16>>) -> usize {
        let mut n = 0;
        for tx in &self.shards {
            loop {
                let (reply, rx) = oneshot::channel();
                let msg = ShardMsg::Forget { partitions: parts.clone(), limit: FORGET_SLICE, reply };
                if tx.send(msg).await.is_err() {
                    break;
                }
                let Ok((dropped, done)) = rx.await else { break };
                n += dropped;
                if done {
                    break;
                }
            }
        }
        n
    }

    /// Quorum lost: the partitions' keyed writes are refused and their timers held until
    /// [`thaw`](Self::thaw).
    pub async fn hold(&self, parts: Arc<HashSet<u16>>) {
        for tx in &self.shards {
            let _ = tx.send(ShardMsg::Hold { partitions: parts.clone() }).await;
        }
    }

    /// Hand-off undone: the frozen partitions are served again.
    pub async fn thaw(&self, parts: Arc<HashSet<u16>>) {
        for tx in &self.shards {
            let (reply, rx) = oneshot::channel();
            if tx.send(ShardMsg::Thaw { partitions: parts.clone(), reply }).await.is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Installs drivers and their claims in their shards; returns how many drivers.
    /// `slice`: most drivers per message to a shard ([`INSTALL_SLICE`] keeps queries
    /// flowing during a hand-off; a promotion, on the failover's critical path, sends
    /// everything at once so large additions bulk-load the geo index).
    pub async fn install(&self, drivers: Vec<Snapshot>, claims: Vec<(String, Claim)>, slice: usize) -> usize {
        let n = self.shards.len();
        let mut per: Vec<ShardInstall> = (0..n).map(|_| Default::default()).collect();
        for d in drivers {
            per[shard_of(d.driver_id.as_bytes(), n)].0.push(d);
        }
        for (d, c) in claims {
            per[shard_of(d.as_bytes(), n)].1.push((d, c));
        }
        // Shards install in parallel, each in slices of at most `slice` drivers,
        // one after the other: queries queued meanwhile run between slices instead of
        // waiting for a whole partition set (a promotion brings hundreds of thousands).
        let mut tasks = Vec::with_capacity(n);
        for (tx, (mut drivers, claims)) in self.shards.iter().cloned().zip(per) {
            if drivers.is_empty() && claims.is_empty() {
                continue;
            }
            tasks.push(crate::tasks::spawn("install", async move {
                let mut installed = 0;
                // Each claim goes in the same message as its driver (a driver must never
                // be served, or expire, without its claim); claims of drivers already
                // here go with the first message.
                let mut by_driver: HashMap<String, Vec<Claim>> = HashMap::new();
                for (d, c) in claims {
                    by_driver.entry(d).or_default().push(c);
                }
                let mut first = true;
                while !drivers.is_empty() || first {
                    let rest = drivers.split_off(drivers.len().min(slice.max(1)));
                    let slice = std::mem::replace(&mut drivers, rest);
                    let mut claims: Vec<(String, Claim)> = Vec::new();
                    for d in &slice {
                        for c in by_driver.remove(&d.driver_id).unwrap_or_default() {
                            claims.push((d.driver_id.clone(), c));
                        }
                    }
                    if first {
                        let in_rest: std::collections::HashSet<&str> =
                            drivers.iter().map(|d| d.driver_id.as_str()).collect();
                        let here: Vec<String> =
                            by_driver.keys().filter(|k| !in_rest.contains(k.as_str())).cloned().collect();
                        for k in here {
                            for c in by_driver.remove(&k).unwrap_or_default() {
                                claims.push((k.clone(), c));
                            }
                        }
                        first = false;
                    }
                    let (reply, rx) = oneshot::channel();
                    if tx.send(ShardMsg::Install { drivers: slice, claims, reply }).await.is_err() {
                        break;
                    }
                    installed += rx.await.unwrap_or(0);
                }
                installed
            }));
        }
        let mut installed = 0;
        for t in tasks {
            installed += t.await.unwrap_or(0);
        }
        installed
    }

    /// Logs the deletion of drivers no shard holds (a discarded parked copy).
    pub async fn log_deletes(&self, ids: Vec<String>) {
        let n = self.shards.len();
        let mut per: Vec<Vec<String>> = (0..n).map(|_| Vec::new()).collect();
        for id in ids {
            per[shard_of(id.as_bytes(), n)].push(id);
        }
        for (tx, ids) in self.shards.iter().zip(per) {
            if !ids.is_empty() {
                let _ = tx.send(ShardMsg::LogDeletes { ids }).await;
            }
        }
    }

    /// Subscribes to a driver's accepted fixes: the current state, the stream of later
    /// ones, and a receiver that says why the stream ended.
    pub async fn watch(
        &self,
        driver_id: String,
        queue: usize,
    ) -> Result<(DriverView, mpsc::Receiver<DriverView>, oneshot::Receiver<WatchEnd>), RouteError> {
        let (tx, rx) = mpsc::channel(queue);
        let (end, end_rx) = oneshot::channel();
        let watcher = Watcher { tx, end };
        let id = driver_id.clone();
        let current = self.ask(&id, |reply| ShardMsg::Watch { driver_id, watcher, reply }).await?;
        Ok((current.ok_or(RouteError::NotFound)?, rx, end_rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secondary_index_keeps_every_claimant_latest_first() {
        let ix = SecondaryIndex::default();
        ix.set(IndexKind::Cab, "X".into(), "a".into());
        ix.set(IndexKind::Cab, "X".into(), "b".into());
        ix.set(IndexKind::Session, "X".into(), "c".into());
        assert_eq!(ix.get(IndexKind::Cab, "X"), vec!["b", "a"]);
        // Re-claiming moves a driver to the front.
        ix.set(IndexKind::Cab, "X".into(), "a".into());
        assert_eq!(ix.get(IndexKind::Cab, "X"), vec!["a", "b"]);
        ix.unset(IndexKind::Cab, "X", "a");
        assert_eq!(ix.get(IndexKind::Cab, "X"), vec!["b"]);
        ix.unset(IndexKind::Cab, "X", "b");
        assert!(ix.get(IndexKind::Cab, "X").is_empty());
        assert_eq!(ix.get(IndexKind::Session, "X"), vec!["c"], "kinds are separate");
    }
}
