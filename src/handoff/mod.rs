//! Partition hand-off: the shell that moves a partition's state to its owner.
//!
//! Pull-based. The node the ring names as a partition's owner pulls it from whichever
//! node holds it; the holder never pushes. Each round (on every ring change, and every
//! few hundred ms while anything is unsettled) the hand-off task:
//!
//! 1. surveys every live member's holdings (`Handoff.Holdings`); a live member that does
//!    not answer (or whose address is not known yet) counts as missing;
//! 2. plans with the pure [`ownership::plan`](crate::ownership::plan);
//! 3. performs the actions: **pull** (the holder freezes the partition, lends it at the
//!    puller's higher epoch and returns drivers with trails, claims and trips; the puller
//!    persists them, installs them with their timers, then asks the holder to
//!    **release**, which forgets its copy; a partition whose older history did not fit
//!    the pull is released by a task that copies that history first, and is not lent
//!    on meanwhile), **adopt** (nobody holds it: serve the parked
//!    copy or start empty; never while a member is missing), **reclaim** (a borrower that
//!    vanished), **discard** (a parked copy a live node serves), **promote** (this
//!    node's replica of a partition whose owner is lost), **stand down** (a copy served
//!    elsewhere at a higher epoch: this one is stale), and drops replicas nobody feeds;
//!    it also checks the survey for missing replicas (`Replicator::verify`);
//! 4. publishes the [`Routes`] every request reads, and `/readyz` (on the ring and
//!    nothing incoming).
//!
//! Order makes it safe: the holder refuses keyed writes from the moment it lends
//! (`UNAVAILABLE`, and its routes point at the borrower, which holds requests until
//! installed); the borrower persists before it serves; the holder forgets only after the
//! borrower installed. So no acknowledged write is lost, a key is served by one node at
//! a time, and reads see a driver on the holder or the borrower (scatter answers
//! de-duplicate the overlap).
//!
//! Epochs: each partition's epoch is persisted with its holding (record set
//! `partitions` of the node's `storage::RecordStore`). A pull names the epoch the
//! puller will own it at, which must be above the holder's; after a restart every
//! holding becomes `Parked` and is only served again through this protocol, so a
//! pre-crash copy never answers.
//!
//! The minority rule (`run_quorum`): heartbeats over the gossip socket keep a quorum
//! lease against the persisted quorum base (`ownership::quorum_until`). Without it the
//! node holds every partition it serves, refuses keyed requests and plans nothing; it
//! serves again only after a round with a full survey (so stale copies stand down first).
//!
//! The table, parked copies and every step that changes them are behind one async mutex,
//! never held across a call to another node (two nodes pulling from each other cannot
//! deadlock).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use tokio::sync::{Mutex, watch};
use tracing::{debug, info, warn};

use crate::dispatch::decode_claims;
use crate::drivers::{Snapshot, encode_upsert, snapshot_ref};
use crate::keys::PARTITIONS;
use crate::membership::{ClusterView, Liveness, NodeState};
use crate::ownership::{
    Action, Holding, LendFrom, LendRefusal, Part, PeerHolding, QuorumBase, Routes, Survey, Table, plan, routes,
};
use crate::peer::{PeerLink, Refusal, RefusalKind};
use crate::replica::{ReplicaPart, ReplicaStore, Replicator};
use crate::ring::Ring;
use crate::routing::Router;
use crate::routing::cluster::Cluster;
use crate::storage::{RecordError, RecordStore, Records};
use crate::trips::Trips;

mod link;
use crate::history::HistoryStore;
pub use crate::ownership::BASE_FORGET;
pub use crate::routing::cluster::MAX_HANDOFF_BYTES;
pub use crate::storage::{Arriving, History, PartitionData};
pub use link::MemPeerLink;

/// Driver bytes of a replica batch applied between two yields (about a millisecond).
const APPLY_STEP_BYTES: usize = 256 << 10;
/// Partitions per `Pull` call: bounds one message and how much is frozen at once.
const PULL_CHUNK: usize = 8;
/// How long one survey answer or pull may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How often replicas look for older history to copy from their owners.
const BACKFILL_EVERY: Duration = Duration::from_secs(2);
/// History copies of pulled partitions (one task per pulled chunk) running at once.
const COPIES_AT_ONCE: usize = 2;
/// Tries at copying a pulled partition's older history before it is released regardless.
const COPY_TRIES: u32 = 5;
const SURVEY_TIMEOUT: Duration = Duration::from_secs(1);

/// One partition as `admin partitions` shows it (see `Cluster.Partitions`).
#[derive(Clone, Debug)]
pub struct PartitionReport {
    pub partition: u16,
    /// owned | incoming | outgoing | parked | replica
    pub state: &'static str,
    pub epoch: u64,
    pub ring_owner: Option<SocketAddr>,
    /// owned: replica targets; outgoing: the borrower; replica: the owner.
    pub peers: Vec<SocketAddr>,
    pub drivers: u32,
    pub trips: u32,
    pub claims: u32,
    pub in_sync: bool,
}

struct State {
    table: Table,
    /// Drivers found in the log at startup, by partition, not served until adopted.
    parked: HashMap<u16, Vec<Snapshot>>,
}

/// See the module docs. Shared by the hand-off task and the `Handoff` gRPC service.
pub struct Handoff {
    me: SocketAddr,
    cluster: Arc<Cluster>,
    router: Arc<Router>,
    trips: Arc<Trips>,
    /// The node's record store (flushed before any hand-off step is acknowledged), its
    /// claims, and the ownership table (`partitions`: each partition's holding and epoch).
    store: Arc<dyn RecordStore>,
    claims: Arc<dyn Records>,
    table_records: Arc<dyn Records>,
    state: Mutex<State>,
    routes: watch::Sender<Arc<Routes>>,
    ready: Arc<crate::health::Readiness>,
    /// Trail fixes kept per driver besides the last (pulled records are cut to it).
    trail_cap: usize,
    /// After each chunk pulled, wait this many hundredths of the time it took
    /// (`--handoff-pace`): the CPU the move leaves to queries.
    pace_pct: std::sync::atomic::AtomicU32,
    /// Sends what this node serves to its replicas.
    replicator: Arc<Replicator>,
    /// Calls on other nodes' hand-off (surveys, pulls, releases).
    link: Arc<dyn PeerLink>,
    /// Replicas this node keeps for other owners (in memory).
    replicas: std::sync::Mutex<ReplicaStore>,
    /// The heartbeats the quorum task reads, and its lease: a node heard within the
    /// lease may still serve what it holds (see [`Handoff::survey`]).
    heard: std::sync::OnceLock<(crate::membership::Heard, Duration)>,
    /// Members whose survey saw this node hold nothing it serves (see [`Handoff::drained`]).
    seen_empty: std::sync::Mutex<HashSet<SocketAddr>>,
    /// Partitions being pulled right now (reported as such in surveys).
    /// (partition → the epoch it will be served at).
    pulling: std::sync::Mutex<HashMap<u16, u64>>,
    /// Pulled partitions whose older history is being copied from their lender: reported
    /// as still being pulled, so the lender keeps its copy (and its history) until the
    /// release.
    /// (partition → the lender it is copied from: a copy task clears only its own.)
    copying: std::sync::Mutex<HashMap<u16, SocketAddr>>,
    /// Room for history copies of pulled partitions running at once.
    copies: tokio::sync::Semaphore,
    /// Who the last survey saw serve each partition (active there). Partitions this node
    /// owns by the ring but has not pulled yet are forwarded to their holder meanwhile
    /// (`Route::Via`), so requests need not wait for the whole move.
    holders: std::sync::Mutex<HashMap<u16, SocketAddr>>,
    /// The quorum base: members this node knew on the ring, left only by leaving
    /// gracefully (store meta `quorum_base`). See `ownership::has_quorum`.
    base: std::sync::Mutex<QuorumBase>,
    /// The lease holds (a majority agreeing on the ring heard within it). The node
    /// serves again (`Cluster::has_quorum`) only after a round with it, so copies taken
    /// over meanwhile stand down first.
    lease_ok: AtomicBool,
    /// The fix history: partitions' histories move with them; served epochs stamp it.
    history: std::sync::OnceLock<Arc<HistoryStore>>,
}

fn load_table(records: &dyn Records) -> Result<Table, RecordError> {
    let mut t = Table::default();
    for p in records.partitions()?.into_iter().filter(|p| *p < PARTITIONS) {
        if let Some(part) = records.get(p, b"")?.and_then(|v| Table::decode(&v)) {
            t.set(p, part);
        }
    }
    Ok(t)
}

impl Handoff {
    /// Opens the ownership table and parks what this node held before it stopped:
    /// drivers from the log (`drivers`), claims and trips in the store. Nothing is served
    /// until the hand-off task adopts or pulls it.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        me: SocketAddr,
        store: Arc<dyn RecordStore>,
        drivers: HashMap<String, Snapshot>,
        cluster: Arc<Cluster>,
        router: Arc<Router>,
        trips: Arc<Trips>,
        claims: Arc<dyn Records>,
        routes: watch::Sender<Arc<Routes>>,
        ready: Arc<crate::health::Readiness>,
        trail_cap: usize,
        replicator: Arc<Replicator>,
        link: Arc<dyn PeerLink>,
    ) -> Result<Arc<Handoff>, RecordError> {
        let table_records = store.records("partitions")?;
        // Stored under another gossip address: this is a new member now (the others do
        // not know it by that address either); it learns its base from the ring.
        let base = QuorumBase::new(me, store.meta("quorum_base")?.map(|v| QuorumBase::decode(&v)).unwrap_or_default());
        // A member of a larger cluster starts without a quorum until it hears from one.
        cluster.set_quorum(base.alone());
        let lease_ok = AtomicBool::new(cluster.has_quorum());
        let mut table = load_table(&*table_records)?;
        let mut parked: HashMap<u16, Vec<Snapshot>> = HashMap::new();
        for (_, s) in drivers {
            parked.entry(crate::keys::partition_of(s.driver_id.as_bytes())).or_default().push(s);
        }
        let mut with_data: HashSet<u16> = parked.keys().copied().collect();
        with_data.extend(claims.partitions()?);
        with_data.extend(trips.records.partitions()?);
        for p in 0..PARTITIONS {
            let part = table.get(p);
            if part.holding.is_some() || with_data.contains(&p) {
                let parked_part = Part { epoch: part.epoch, holding: Some(Holding::Parked) };
                table.set(p, parked_part);
                table_records.put(p, b"", &Table::encode(&parked_part))?;
            }
        }
        store.flush().await?;
        info!(
            parked = table.count("parked"),
            parked_drivers = parked.values().map(Vec::len).sum::<usize>(),
            "ownership table opened; earlier holdings parked until handed over"
        );
        Ok(Arc::new(Handoff {
            me,
            cluster,
            router,
            trips,
            store,
            claims,
            table_records,
            state: Mutex::new(State { table, parked }),
            routes,
            ready,
            trail_cap,
            pace_pct: std::sync::atomic::AtomicU32::new(0),
            replicator,
            link,
            replicas: std::sync::Mutex::new(ReplicaStore::new(trail_cap)),
            pulling: std::sync::Mutex::new(HashMap::new()),
            copying: std::sync::Mutex::new(HashMap::new()),
            copies: tokio::sync::Semaphore::new(COPIES_AT_ONCE),
            holders: std::sync::Mutex::default(),
            heard: std::sync::OnceLock::new(),
            seen_empty: std::sync::Mutex::default(),
            lease_ok,
            history: std::sync::OnceLock::new(),
            base: std::sync::Mutex::new(base),
        }))
    }

    fn replica_store(&self) -> std::sync::MutexGuard<'_, ReplicaStore> {
        self.replicas.lock().expect("replica store lock")
    }

    /// Replica side of `Replicate`: applies an owner's batch; returns what was refused.
    ///
    /// A batch (up to 8 MiB: a resync sends whole partitions) is applied a few hundred
    /// KiB at a time, yielding in between: applied at once it held a runtime thread
    /// for tens of milliseconds, and every query part on that node waited.
    pub async fn replicate(&self, from: SocketAddr, session: u64, parts: Vec<ReplicaPart>) -> Vec<Refusal> {
        let mut refused = Vec::new();
        let mut parts = parts.into_iter().peekable();
        while parts.peek().is_some() {
            let mut step = Vec::new();
            let mut bytes = 0;
            while let Some(p) = parts.next_if(|p| step.is_empty() || bytes + p.drivers.len() <= APPLY_STEP_BYTES) {
                bytes += p.drivers.len();
                step.push(p);
            }
            let routes = self.routes.borrow().clone();
            let history: Vec<(u16, Vec<u8>)> =
                step.iter_mut().map(|x| (x.partition, std::mem::take(&mut x.history))).collect();
            let no = self
                .replica_store()
                .apply(from, session, step, |p| routes.of(p as usize) == crate::ownership::Route::Local);
            if let Some(h) = self.history.get() {
                for (p, blocks) in history.iter().filter(|(_, b)| !b.is_empty()) {
                    let kept = !no.iter().any(|(q, why)| q == p && !matches!(why, crate::replica::Refused::NotSynced));
                    if kept && let Err(e) = h.append_frames(*p, blocks) {
                        warn!(partition = p, error = %e, "replicated history refused");
                    }
                }
            }
            refused.extend(no);
            if parts.peek().is_some() {
                tokio::task::yield_now().await;
            }
        }
        let refused: Vec<Refusal> = refused
            .into_iter()
            .map(|(p, why)| match why {
                crate::replica::Refused::StaleEpoch { .. } => Refusal::stale(p, why.to_string()),
                crate::replica::Refused::ServedHere | crate::replica::Refused::NotSynced => {
                    Refusal::other(p, why.to_string())
                }
            })
            .collect();
        let stale = refused.iter().filter(|r| r.kind == RefusalKind::StaleEpoch).count();
        if stale > 0 {
            metrics::counter!("locus_epoch_refused_total", "what" => "replica").increment(stale as u64);
        }
        refused
    }

    /// Gives hand-offs and replication the node's fix history.
    pub fn set_history(&self, h: Arc<HistoryStore>) {
        let _ = self.history.set(h);
    }

    /// Holder side of `HistorySegments`: the closed segment files of `p` that end at
    /// `upto` and chain back from it, newest first (none without a history). Refused
    /// while this node still copies the partition's older history itself: a replica
    /// backfilling from it would take what has come so far for all there is.
    pub fn history_segments(
        &self,
        p: u16,
        upto: crate::history::Pos,
    ) -> Result<Vec<(std::path::PathBuf, u64)>, String> {
        if self.copying.lock().expect("copying lock").contains_key(&p) {
            return Err(format!("partition {p}: its older history is still being copied here"));
        }
        Ok(self.history.get().map(|h| h.segments_before(p, upto, crate::clock::wall_ms())).unwrap_or_default())
    }

    /// Copies the older history segments of `parts` from `peer` (newest first, each put
    /// before what is here as it arrives); readers behind their floors wait meanwhile. A
    /// segment that does not fit, or a broken link, ends that partition's copy. Returns
    /// the partitions whose copy a broken link cut short (worth another try); they stay
    /// marked as filling, and the caller clears the mark when it gives up on them.
    async fn copy_history(&self, peer: SocketAddr, peer_name: &str, parts: &[u16]) -> Vec<u16> {
        let Some(h) = self.history.get() else { return Vec::new() };
        let (t0, mut segments, mut bytes) = (Instant::now(), 0usize, 0usize);
        let mut cut = Vec::new();
        for &p in parts {
            if let Some(floor) = h.floor(p) {
                h.set_filling(p, true);
                let mut rx = self.link.history_segments(peer, p, floor, RPC_TIMEOUT);
                while let Some(item) = rx.recv().await {
                    let seg = match item {
                        Ok(seg) => seg,
                        Err(e) => {
                            warn!(from = %peer_name, partition = p, error = %e, "copying older history failed");
                            cut.push(p);
                            break;
                        }
                    };
                    match h.prepend(p, &seg) {
                        Ok(true) => {
                            segments += 1;
                            bytes += seg.len();
                        }
                        Ok(false) => break,
                        Err(e) => {
                            warn!(from = %peer_name, partition = p, error = %e, "a copied history segment refused");
                            break;
                        }
                    }
                }
            }
            // A copy cut short is tried again (its caller clears the flag when it gives
            // up): readers from before it keep waiting meanwhile.
            if !cut.contains(&p) {
                h.set_filling(p, false);
            }
        }
        if segments > 0 {
            info!(
                from = %peer_name,
                partitions = parts.len(),
                segments,
                bytes,
                ms = t0.elapsed().as_millis() as u64,
                "copied older history"
            );
        }
        cut
    }

    /// Copies the older history of pulled partitions from their lender `peer` (a copy a
    /// broken link cut short is tried again, [`COPY_TRIES`] times in all, a second more
    /// apart each time: after the release the lender forgets it), then releases them.
    /// They stay in `copying` until then, so this node's surveys report them as still
    /// being pulled and the lender keeps its copy and its history meanwhile; and they are
    /// not lent on before their history is whole. At most [`COPIES_AT_ONCE`] copy at once.
    async fn copy_then_release(self: Arc<Self>, peer: SocketAddr, peer_name: &str, parts: Vec<u16>) {
        let mut left = parts.clone();
        for attempt in 0..COPY_TRIES {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(attempt as u64)).await;
            }
            let permit = self.copies.acquire().await;
            left = self.copy_history(peer, peer_name, &left).await;
            drop(permit);
            if left.is_empty() {
                break;
            }
        }
        if !left.is_empty() {
            if let Some(h) = self.history.get() {
                for p in &left {
                    h.set_filling(*p, false);
                }
            }
            metrics::counter!("locus_history_copies_failed_total").increment(left.len() as u64);
            warn!(
                from = %peer_name,
                partitions = ?left,
                "older history could not be copied; released anyway (readers from before it are told it is gone)"
            );
        }
        // Reported as served before the lender forgets it: a survey must not find it
        // forgotten there and still being pulled here (nobody serving it).
        self.copying.lock().expect("copying lock").retain(|p, from| !(parts.contains(p) && *from == peer));
        if let Err(e) = self.link.release(peer, self.me, parts, RPC_TIMEOUT).await {
            // The holder forgets its copy once it sees this node serve it.
            warn!(from = %peer_name, error = %e, "release not acknowledged");
        }
    }

    /// Replicas kept here, for `admin` and tests.
    pub fn replica_info(&self) -> Vec<crate::replica::ReplicaInfo> {
        self.replica_store().info()
    }

    /// Every request's routes: a receiver of each new version.
    pub fn routes(&self) -> watch::Receiver<Arc<Routes>> {
        self.routes.subscribe()
    }

    fn set(&self, st: &mut State, p: u16, part: Part) {
        st.table.set(p, part);
        if let Err(e) = self.table_records.put(p, b"", &Table::encode(&part)) {
            warn!(partition = p, error = %e, "cannot persist a partition's holding");
        }
    }

    /// Paces pulls: after each chunk, wait `pace` times as long as it took (0: none).
    pub fn set_pace(&self, pace: f64) {
        self.pace_pct.store((pace.clamp(0.0, 100.0) * 100.0) as u32, Ordering::Relaxed);
    }

    /// The ring hand-off follows: the view's, without this node while it leaves (its own
    /// ring keeps it until it is gone, but it must not take partitions back).
    fn ring(&self, view: &ClusterView) -> Arc<Ring> {
        let leaving = view.meta(&self.me).is_some_and(|m| m.state == NodeState::Leaving);
        if leaving && view.ring.contains(&self.me) {
            let others = view.ring.members().iter().copied().filter(|a| *a != self.me);
            Arc::new(Ring::new(others, view.ring.vnodes()))
        } else {
            view.ring.clone()
        }
    }

    fn publish(&self, view: &ClusterView, st: &State) {
        let ring = self.ring(view);
        let via = {
            let pulling = self.pulling.lock().expect("pulling lock");
            let holders = self.holders.lock().expect("holders lock");
            let live = |a: &SocketAddr| view.member(a).is_some_and(|m| m.liveness != Liveness::Down);
            holders.iter().filter(|(p, a)| !pulling.contains_key(p) && live(a)).map(|(p, a)| (*p, *a)).collect()
        };
        let r = routes(self.me, &ring, &st.table, &via);
        let incoming = r.incoming();
        let on_ring = ring.contains(&self.me);
        self.ready.set(on_ring && incoming == 0);
        metrics::gauge!("locus_partitions", "state" => "incoming").set(incoming as f64);
        for kind in ["active", "lent", "parked"] {
            metrics::gauge!("locus_partitions", "state" => kind).set(st.table.count(kind) as f64);
        }
        self.routes.send_replace(Arc::new(r));
        let active: Vec<(u16, u64)> =
            st.table.held().filter(|(_, x)| x.holding == Some(Holding::Active)).map(|(p, x)| (p, x.epoch)).collect();
        if let Some(h) = self.history.get() {
            for &(p, epoch) in &active {
                h.serve(p, epoch);
            }
        }
        self.replicator.set_placement(view, &ring, &active);
    }

    /// Holdings of this node, as the survey of `requester` reports them.
    pub async fn holdings(&self, requester: Option<SocketAddr>) -> Vec<PeerHolding> {
        let st = self.state.lock().await;
        {
            let mut seen = self.seen_empty.lock().expect("seen lock");
            if st.table.count("active") > 0 || st.table.count("lent") > 0 {
                seen.clear();
            } else if let Some(r) = requester {
                seen.insert(r);
            }
        }
        let copying = self.copying.lock().expect("copying lock").clone();
        let mut out: Vec<PeerHolding> = st
            .table
            .held()
            .map(|(p, part)| {
                let holding = match part.holding.expect("held") {
                    Holding::Active if copying.contains_key(&p) => Holding::Pulling,
                    h => h,
                };
                PeerHolding { partition: p, epoch: part.epoch, holding }
            })
            .collect();
        let pulling = self.pulling.lock().expect("pulling lock").clone();
        out.extend(
            pulling
                .into_iter()
                .filter(|(p, _)| st.table.get(*p).holding != Some(Holding::Active))
                .map(|(p, epoch)| PeerHolding { partition: p, epoch, holding: Holding::Pulling }),
        );
        let reps = self.replica_store();
        let before = out.len();
        out.extend(reps.synced().map(|(p, epoch)| PeerHolding { partition: p, epoch, holding: Holding::Replica }));
        metrics::gauge!("locus_partitions", "state" => "replica").set((out.len() - before) as f64);
        out
    }

    /// What this node holds, partition by partition (`admin partitions`).
    pub async fn report(&self) -> Vec<PartitionReport> {
        let view = self.cluster.view();
        let ring = self.ring(&view);
        let drivers = self.router.partition_counts().await;
        let trips = self.trips.counts();
        let st = self.state.lock().await;
        let routes = self.routes.borrow().clone();
        let mut out = Vec::new();
        for p in 0..PARTITIONS {
            let part = st.table.get(p);
            let ring_owner = ring.partition_owner(p as usize);
            let row = |state, epoch, peers| PartitionReport {
                partition: p,
                state,
                epoch,
                ring_owner,
                peers,
                drivers: 0,
                trips: 0,
                claims: self.claims.count(p) as u32,
                in_sync: false,
            };
            match part.holding {
                Some(Holding::Active) => out.push(PartitionReport {
                    drivers: drivers.get(&p).copied().unwrap_or(0),
                    trips: trips.get(&p).copied().unwrap_or(0),
                    ..row("owned", part.epoch, self.replicator.targets(p))
                }),
                Some(Holding::Lent { to, to_epoch }) => out.push(row("outgoing", to_epoch, vec![to])),
                Some(Holding::Parked) => out.push(PartitionReport {
                    drivers: st.parked.get(&p).map_or(0, Vec::len) as u32,
                    trips: self.trips.records.count(p) as u32,
                    ..row("parked", part.epoch, Vec::new())
                }),
                Some(Holding::Replica) | Some(Holding::Pulling) | None => {
                    if routes.of(p as usize).is_incoming() {
                        out.push(row("incoming", part.epoch, Vec::new()));
                    }
                }
            }
        }
        drop(st);
        for r in self.replica_store().info() {
            out.push(PartitionReport {
                partition: r.partition,
                state: "replica",
                epoch: r.epoch,
                ring_owner: ring.partition_owner(r.partition as usize),
                peers: vec![r.owner],
                drivers: r.drivers as u32,
                trips: r.trips as u32,
                claims: r.claims as u32,
                in_sync: r.synced,
            });
        }
        out
    }

    /// This node's replication links (`admin partitions`).
    pub fn replica_links(&self) -> Vec<crate::replica::LinkInfo> {
        self.replicator.links()
    }

    /// Counts for `admin` and tests: partitions held as active / lent / parked.
    pub async fn counts(&self) -> (usize, usize, usize) {
        let st = self.state.lock().await;
        (st.table.count("active"), st.table.count("lent"), st.table.count("parked"))
    }

    /// Holder side of `Pull`: lends each partition it can to `requester` at the given
    /// epoch and returns their state; refuses the others with the reason.
    pub async fn lend(&self, requester: SocketAddr, wanted: &[(u16, u64)]) -> (Vec<PartitionData>, Vec<Refusal>) {
        let view = self.cluster.view();
        let alive = |a: &SocketAddr| view.member(a).is_some_and(|m| m.liveness != Liveness::Down);
        // Lend only to the partition's owner by this node's ring too: a node whose view
        // is still partial (one just joining sees two members of four) would otherwise
        // pull partitions it does not own, and they would move again moments later.
        let ring = self.ring(&view);
        let mut st = self.state.lock().await;
        let mut refused = Vec::new();
        let (mut from_shards, mut from_parked, mut from_replica) = (HashSet::new(), Vec::new(), Vec::new());
        for &(p, epoch) in wanted {
            if p >= PARTITIONS {
                refused.push(Refusal::other(p, format!("partition {p} does not exist (0..{PARTITIONS})")));
                continue;
            }
            if self.copying.lock().expect("copying lock").contains_key(&p) {
                // Lent on now, the borrower would get a history with a hole in it.
                refused.push(Refusal::other(p, "its older history is still being copied here".to_string()));
                continue;
            }
            let part = st.table.get(p);
            let replica = self.replica_store().synced_epoch(p);
            let owner = ring.partition_owner(p as usize);
            match crate::ownership::lend(requester, owner, part, replica, epoch, alive) {
                Ok(LendFrom::Replica) => from_replica.push(p),
                Ok(from) => {
                    if from == LendFrom::Parked {
                        from_parked.push((p, epoch));
                    } else {
                        from_shards.insert(p);
                    }
                    let lent = Holding::Lent { to: requester, to_epoch: epoch };
                    self.set(&mut st, p, Part { epoch: part.epoch, holding: Some(lent) });
                }
                Err(why) => {
                    refused.push(match why {
                        LendRefusal::NotOwner { owner } => Refusal::other(
                            p,
                            format!(
                                "{} is not its owner by this node's ring ({} is)",
                                view.name_of(&requester),
                                owner.map_or("nobody".into(), |a| view.name_of(&a))
                            ),
                        ),
                        LendRefusal::NotHeld => Refusal::other(p, "not held here".to_string()),
                        LendRefusal::LentTo(to) => Refusal::other(p, format!("lent to {} already", view.name_of(&to))),
                        LendRefusal::StaleEpoch { wanted, held } => {
                            metrics::counter!("locus_epoch_refused_total", "what" => "pull").increment(1);
                            Refusal::stale(p, format!("stale epoch {wanted}: held here at epoch {held}"))
                        }
                    });
                }
            }
        }
        // Routes point at the borrower before the shards freeze, so new requests go there,
        // and batches routed by the old routes are queued on the shards first.
        self.publish(&view, &st);
        drop(self.cluster.gate.write().await);
        let mut out = Vec::new();
        if !from_shards.is_empty() {
            let parts = Arc::new(from_shards);
            let drivers = match self.router.export(parts.clone()).await {
                Ok(d) => d,
                Err(e) => {
                    warn!(error = %e, "exporting partitions failed");
                    HashMap::new()
                }
            };
            let mut trips = self.trips.export(&parts).await;
            // Their trips' state changes are kept with the history that moves with them.
            self.trips.history_barrier().await;
            for p in parts.iter() {
                out.push(PartitionData {
                    partition: *p,
                    epoch: st.table.get(*p).epoch,
                    drivers: drivers.get(p).map(|d| d.0.clone()).unwrap_or_default(),
                    claims: self.claims.scan_or_log(*p),
                    trips: trips.remove(p).unwrap_or_default(),
                    history: History::default(),
                });
            }
        }
        for (p, _) in from_parked {
            let mut buf = Vec::new();
            for s in st.parked.get(&p).map(Vec::as_slice).unwrap_or_default() {
                encode_upsert(&mut buf, &s.driver_id, &snapshot_ref(s), None);
            }
            out.push(PartitionData {
                partition: p,
                epoch: st.table.get(p).epoch,
                drivers: buf,
                claims: self.claims.scan_or_log(p),
                trips: self.trips.records.scan_or_log(p),
                history: History::default(),
            });
        }
        {
            let reps = self.replica_store();
            out.extend(from_replica.into_iter().filter_map(|p| reps.data(p)));
        }
        if let Some(h) = self.history.get() {
            for d in &mut out {
                match h.export(d.partition) {
                    Ok((floor, blocks, older)) => d.history = History { floor, blocks, older },
                    Err(e) => {
                        // The new owner starts the history over: consumers are told.
                        warn!(partition = d.partition, error = %e, "exporting history failed");
                        d.history = History { floor: h.last(d.partition), blocks: Vec::new(), older: false };
                    }
                }
            }
        }
        if let Err(e) = self.store.flush().await {
            warn!(error = %e, "flushing lent holdings");
        }
        let bytes: usize = out.iter().map(|d| d.drivers.len()).sum();
        metrics::counter!("locus_handoff_bytes_total", "role" => "lent").increment(bytes as u64);
        metrics::counter!("locus_handoffs_total", "role" => "lent").increment(out.len() as u64);
        debug!(to = %view.name_of(&requester), partitions = out.len(), refused = refused.len(), bytes, "lent partitions");
        (out, refused)
    }

    /// Holder side of `Release`: `requester` installed these partitions; forget them.
    pub async fn release(&self, requester: SocketAddr, partitions: &[u16]) -> usize {
        let mut st = self.state.lock().await;
        let parts: HashSet<u16> = partitions
            .iter()
            .copied()
            .filter(|p| *p < PARTITIONS)
            .filter(|p| matches!(st.table.get(*p).holding, Some(Holding::Lent { to, .. }) if to == requester))
            .collect();
        // Replicas handed over (their owner is lost): the requester serves them now.
        let dropped = {
            let mut reps = self.replica_store();
            partitions.iter().filter(|p| !parts.contains(p) && reps.drop_below(**p, u64::MAX)).count()
        };
        self.forget(&mut st, &parts).await;
        let view = self.cluster.view();
        self.publish(&view, &st);
        parts.len() + dropped
    }

    async fn forget(&self, st: &mut State, parts: &HashSet<u16>) {
        if parts.is_empty() {
            return;
        }
        let shared = Arc::new(parts.clone());
        let drivers = self.router.forget(shared).await;
        if let Err(e) = self.trips.forget(parts) {
            warn!(error = %e, "deleting released trips");
        }
        for p in parts {
            if let Err(e) = self.claims.delete_partition(*p) {
                warn!(partition = p, error = %e, "deleting released claims");
            }
            // A parked copy that was lent: its drivers were never in the shards.
            if let Some(ids) = st.parked.remove(p) {
                self.router.log_deletes(ids.into_iter().map(|s| s.driver_id).collect()).await;
            }
            let epoch = st.table.get(*p).epoch;
            self.set(st, *p, Part { epoch, holding: None });
            if let Some(h) = self.history.get() {
                h.drop_partition(*p);
            }
        }
        if let Err(e) = self.store.flush().await {
            warn!(error = %e, "flushing released partitions");
        }
        debug!(partitions = parts.len(), drivers, "forgot released partitions");
    }

    /// Installs pulled partitions (new owner side). Returns those installed. Every
    /// partition's records and new holding are written first and flushed once; only then
    /// are they served (shards, trip actors).
    async fn install(&self, expect: &Table, data: Vec<Arriving>, epochs: &HashMap<u16, u64>, slice: usize) -> Vec<u16> {
        let started = Instant::now();
        let mut st = self.state.lock().await;
        let mut stored = Vec::new();
        for d in data {
            let p = d.partition;
            let Some(&epoch) = epochs.get(&p) else { continue };
            let now = st.table.get(p);
            // The table moved on since the plan (e.g. this node lent its parked copy).
            if now != expect.get(p) {
                continue;
            }
            let pulled = d.drivers;
            let merge = now.holding == Some(Holding::Active);
            let (mut claims, mut trips) = (d.claims, d.trips);
            if merge {
                // Two served copies: what this node has wins.
                claims.retain(|(k, _)| self.claims.get(p, k).is_ok_and(|v| v.is_none()));
                trips.retain(|(k, _)| self.trips.records.get(p, k).is_ok_and(|v| v.is_none()));
            } else {
                // This node's parked copy is superseded: log deletions for its drivers
                // that did not come with the pull, and drop its stored claims and trips.
                if let Some(old) = st.parked.remove(&p) {
                    let gone = old.into_iter().map(|s| s.driver_id).filter(|id| !pulled.contains_key(id)).collect();
                    self.router.log_deletes(gone).await;
                }
                for set in [&self.claims, &self.trips.records] {
                    if let Err(e) = set.delete_partition(p) {
                        warn!(partition = p, error = %e, "clearing a parked copy");
                    }
                }
            }
            if let Err(e) = self.claims.put_all(p, &claims).and_then(|_| self.trips.records.put_all(p, &trips)) {
                warn!(partition = p, error = %e, "storing a pulled partition failed; not installed");
                continue;
            }
            if let (false, Some(hist), Some(h)) = (merge, &d.history, self.history.get())
                && let Err(e) = h.import(p, hist.floor, &hist.blocks, hist.older)
            {
                warn!(partition = p, error = %e, "importing a pulled partition's history failed");
            }
            self.set(&mut st, p, Part { epoch, holding: Some(Holding::Active) });
            stored.push((p, epoch, merge, pulled, claims));
        }
        if let Err(e) = self.store.flush().await {
            // Not durable: leave the partitions lent to this node; the next round pulls
            // them again (the holder re-lends to the same borrower).
            warn!(error = %e, "flushing pulled partitions failed; not installed");
            for (p, _, _, _, _) in &stored {
                self.set(&mut st, *p, expect.get(*p));
                if let Some(h) = self.history.get() {
                    h.set_filling(*p, false);
                }
            }
            return Vec::new();
        }
        // Every partition's drivers go to the shards in one install (one message per
        // shard, not one per partition: a promotion installs hundreds of partitions, and
        // each round trip would wait behind the shards' queued fixes).
        let t0 = Instant::now();
        let (mut drivers, mut all_claims) = (Vec::new(), Vec::new());
        for (_, _, _, pulled, claims) in &mut stored {
            drivers.extend(std::mem::take(pulled).into_values());
            all_claims.extend(decode_claims(std::mem::take(claims)));
        }
        let n = self.router.install(drivers, all_claims, slice).await;
        let mut done = Vec::with_capacity(stored.len());
        let mut trips = 0;
        for (p, epoch, merge, _, _) in stored {
            let t = if merge { 0 } else { self.trips.start(p) };
            trips += t;
            debug!(partition = p, epoch, trips = t, merge, "installed a pulled partition");
            self.replica_store().drop_below(p, u64::MAX);
            done.push(p);
        }
        debug!(
            partitions = done.len(),
            drivers = n,
            trips,
            store_ms = (t0 - started).as_millis() as u64,
            shards_ms = t0.elapsed().as_millis() as u64,
            "installed partitions"
        );
        done
    }

    /// Serves a partition nobody else holds: this node's parked copy, or nothing.
    async fn adopt(&self, st: &mut State, p: u16, epoch: u64) {
        let drivers = st.parked.remove(&p).unwrap_or_default();
        let claims = decode_claims(self.claims.scan_or_log(p));
        self.set(st, p, Part { epoch, holding: Some(Holding::Active) });
        if !drivers.is_empty() || !claims.is_empty() {
            self.router.install(drivers, claims, usize::MAX).await;
        }
        self.trips.start(p);
    }

    /// Drops replicas nobody feeds any more: their partition is served at a higher epoch,
    /// or by a node other than their owner, or its owner no longer names this node as a
    /// replica by the ring (this node left it, or the ring moved). A replica whose
    /// partition nobody serves is kept: it is what a lost owner is promoted from.
    ///
    /// A copy made or reset since the round began (`since`: the replica store's
    /// generation then) may come from an owner that already follows a newer ring than
    /// this round's view (a node left mid-survey): it is judged by the ring as it is now,
    /// else it would be dropped fresh and stay out of sync until the owner's next check.
    fn drop_stale_replicas(&self, view: &ClusterView, survey: &Survey, table: &Table, since: u64) {
        let n = self.replicator.replicas();
        let names_me = |ring: &Ring, p: u16, by: &SocketAddr| {
            ring.partition_successors(p as usize, n + 1).into_iter().filter(|a| a != by).take(n).any(|a| a == self.me)
        };
        let ring = self.ring(view);
        let ring_now = self.ring(&self.cluster.view());
        let mut served = survey.serving();
        for (p, part) in table.held().filter(|(_, x)| x.holding == Some(Holding::Active)) {
            served.insert(p, (part.epoch, self.me));
        }
        let mut reps = self.replica_store();
        for r in reps.info() {
            let Some((e, by)) = served.get(&r.partition) else { continue };
            if r.epoch > *e {
                // Reset by a newer owner since the survey.
                continue;
            }
            let stale = if r.touched > since {
                *e > r.epoch || !names_me(&ring_now, r.partition, &r.owner)
            } else {
                *e > r.epoch || *by != r.owner || !names_me(&ring, r.partition, by)
            };
            if stale {
                reps.drop_below(r.partition, u64::MAX);
                if let Some(h) = self.history.get()
                    && table.get(r.partition).holding.is_none()
                {
                    h.drop_partition(r.partition);
                }
            }
        }
    }

    /// One survey of every live member's holdings.
    ///
    /// A node this view counts as down, or does not know, but whose heartbeat arrived
    /// within the lease counts as *missing*: it may still hold its lease and serve, so
    /// nothing it might hold is promoted, adopted or reclaimed this round. (On a heal,
    /// SWIM can declare a live node down at once, relaying a verdict from the other
    /// side; the node rejoins within a round trip or two, and keeps its partitions.)
    async fn survey(&self, view: &ClusterView) -> Survey {
        let mut survey = Survey::default();
        if let Some((heard, lease_for)) = self.heard.get() {
            for a in heard.heard_within(*lease_for) {
                let live = view.member(&a).is_some_and(|m| m.liveness != Liveness::Down && m.meta.is_some());
                if a != self.me && !live {
                    survey.missing.push(a);
                }
            }
        }
        let mut calls = tokio::task::JoinSet::new();
        for m in &view.members {
            if m.addr == self.me || m.liveness == Liveness::Down {
                continue;
            }
            let Some(meta) = &m.meta else {
                survey.missing.push(m.addr);
                continue;
            };
            let (link, grpc, addr, me) = (self.link.clone(), meta.grpc, m.addr, self.me);
            calls.spawn(async move { (addr, link.holdings(grpc, me, SURVEY_TIMEOUT).await) });
        }
        while let Some(Ok((addr, r))) = calls.join_next().await {
            match r {
                Ok(hs) => {
                    survey.answered.insert(addr, hs);
                }
                Err(_) => survey.missing.push(addr),
            }
        }
        survey
    }

    /// One round: survey, plan, act. Returns whether anything is left to do. The node
    /// runs one before it says it serves (a lone node then serves at once).
    pub async fn round(self: &Arc<Self>, view: &ClusterView) -> bool {
        // Routes follow a new ring at once: partitions this node now owns wait here
        // (incoming) instead of going to a member that is gone.
        {
            let st = self.state.lock().await;
            self.publish(view, &st);
        }
        if !self.lease_ok.load(Ordering::Acquire) {
            // Cut off from the majority: take nothing, give nothing back, wait.
            return true;
        }
        // The table as it was before the survey asked anyone: every action below is
        // skipped for a partition whose holding changed since. Taken after the survey, a
        // lend to a node whose answer predates its pull would read as "lent to a node
        // that holds nothing" and be reclaimed while the borrower installs it: two
        // copies served at once (seen under load: a joining node served six partitions
        // at the old epoch for seven seconds until it stood down).
        let table = self.state.lock().await.table.clone();
        let generation = self.replica_store().generation();
        let survey = self.survey(view).await;
        {
            *self.holders.lock().expect("holders lock") =
                survey.serving().into_iter().map(|(p, (_, a))| (p, a)).collect();
            // Requests waiting for partitions still served elsewhere go there now.
            let st = self.state.lock().await;
            self.publish(view, &st);
        }
        self.cluster.set_empty(
            survey
                .answered
                .iter()
                .filter(|(_, hs)| !hs.iter().any(|h| matches!(h.holding, Holding::Active | Holding::Lent { .. })))
                .map(|(a, _)| *a)
                .collect(),
        );
        let replicas: HashMap<u16, u64> = self.replica_store().synced().collect();
        // The serving flag, not the clock: a lease that ran out a moment ago under load
        // (this round runs only while the quorum task says it holds) is not a node
        // regaining service, and must not read a pull from it as a promotion.
        let actions = plan(self.me, &self.ring(view), &table, &replicas, &survey, self.cluster.serving());
        self.drop_stale_replicas(view, &survey, &table, generation);
        self.replicator.verify(&survey);
        let mut pulls: HashMap<SocketAddr, Vec<(u16, u64)>> = HashMap::new();
        let mut local = Vec::new();
        for a in &actions {
            match *a {
                Action::Pull { p, from, epoch } => pulls.entry(from).or_default().push((p, epoch)),
                other => local.push(other),
            }
        }
        if !local.is_empty() {
            let mut st = self.state.lock().await;
            let mut forget = HashSet::new();
            let mut thaw = HashSet::new();
            let (mut adopted, mut discarded) = (0, 0);
            let (mut promote, mut promote_epochs) = (Vec::new(), HashMap::new());
            let mut stood_down = HashSet::new();
            for a in local {
                let part = st.table.get(a.partition());
                if part != table.get(a.partition()) {
                    continue;
                }
                match a {
                    Action::Adopt { p, epoch } => {
                        self.adopt(&mut st, p, epoch).await;
                        adopted += 1;
                    }
                    Action::Reclaim { p, epoch } => {
                        self.set(&mut st, p, Part { epoch, holding: Some(Holding::Active) });
                        thaw.insert(p);
                    }
                    Action::ForgetLent { p } => {
                        forget.insert(p);
                    }
                    Action::Discard { p } => {
                        if let Some(old) = st.parked.remove(&p) {
                            self.router.log_deletes(old.into_iter().map(|s| s.driver_id).collect()).await;
                        }
                        for set in [&self.claims, &self.trips.records] {
                            if let Err(e) = set.delete_partition(p) {
                                warn!(partition = p, error = %e, "discarding a parked copy");
                            }
                        }
                        self.set(&mut st, p, Part { epoch: part.epoch, holding: None });
                        discarded += 1;
                    }
                    Action::Promote { p, epoch } => {
                        if let Some(d) = self.replica_store().promotable(p) {
                            promote.push(d);
                            promote_epochs.insert(p, epoch);
                        }
                    }
                    Action::DropReplica { p, below } => {
                        self.replica_store().drop_below(p, below);
                    }
                    Action::StandDown { p } => {
                        stood_down.insert(p);
                    }
                    Action::Pull { .. } => {}
                }
            }
            if !promote.is_empty() {
                // Serve the replicas as pulled partitions: persisted at the new epoch, then
                // installed with their timers (overdue ones fire at once).
                drop(st);
                let t0 = Instant::now();
                // Reported as being pulled meanwhile: a stale copy elsewhere stands down.
                self.pulling.lock().expect("pulling lock").extend(promote_epochs.iter().map(|(p, e)| (*p, *e)));
                let done = self.install(&table, promote, &promote_epochs, usize::MAX).await;
                self.pulling.lock().expect("pulling lock").retain(|p, _| !promote_epochs.contains_key(p));
                metrics::counter!("locus_promotions_total").increment(done.len() as u64);
                info!(
                    partitions = done.len(),
                    ms = t0.elapsed().as_millis() as u64,
                    "promoted replicas of a lost owner"
                );
                st = self.state.lock().await;
            }
            if !thaw.is_empty() {
                self.router.thaw(Arc::new(thaw.clone())).await;
                for p in &thaw {
                    self.trips.start(*p);
                }
                info!(partitions = thaw.len(), "reclaimed partitions whose borrower is gone");
            }
            self.forget(&mut st, &forget).await;
            if !stood_down.is_empty() {
                // Their trip actors stop first (the records are deleted with the rest).
                self.trips.export(&stood_down).await;
                self.forget(&mut st, &stood_down).await;
                metrics::counter!("locus_stood_down_total").increment(stood_down.len() as u64);
                warn!(
                    partitions = stood_down.len(),
                    "stale copies stood down: another node serves them at a higher epoch"
                );
            }
            if let Err(e) = self.store.flush().await {
                warn!(error = %e, "flushing the ownership table");
            }
            if adopted + discarded > 0 {
                info!(adopted, discarded, "partitions adopted or discarded");
            }
            self.publish(view, &st);
        }
        // Serve again (if the lease was lost) before pulling: stale copies stood down
        // above, and lenders route requests here as soon as they lend.
        {
            let st = self.state.lock().await;
            self.regain(&st, &survey).await;
        }
        let mut pulled_any = false;
        let (t_pull, mut pulled_total, mut pulled_bytes) = (Instant::now(), 0, 0);
        let sources = pulls.len();
        'sources: for (from, wanted) in pulls {
            let Some(meta) = view.meta(&from) else { continue };
            let name = meta.name.clone();
            for chunk in wanted.chunks(PULL_CHUNK) {
                // The ring moved on since this round's plan (a joining node's first
                // view is partial): stop pulling by the old one; the next round plans
                // by the new ring at once (the view change wakes it).
                if self.cluster.view().ring.checksum() != view.ring.checksum() {
                    debug!("the ring changed during the round; pulling by the new one");
                    pulled_any = true;
                    break 'sources;
                }
                let t0 = Instant::now();
                let epochs: HashMap<u16, u64> = chunk.iter().copied().collect();
                metrics::gauge!("locus_handoffs_in_flight").increment(chunk.len() as f64);
                self.pulling.lock().expect("pulling lock").extend(chunk.iter().copied());
                // Requests for these wait here from now on, no longer forwarded to the holder.
                {
                    let st = self.state.lock().await;
                    self.publish(view, &st);
                }
                let resp = self.link.pull(meta.grpc, self.me, chunk.to_vec(), RPC_TIMEOUT).await;
                metrics::gauge!("locus_handoffs_in_flight").decrement(chunk.len() as f64);
                let resp = match resp {
                    Ok(r) => r,
                    Err(e) => {
                        self.pulling.lock().expect("pulling lock").retain(|p, _| !epochs.contains_key(p));
                        warn!(from = %name, error = %e, "pulling partitions failed; retrying next round");
                        break;
                    }
                };
                for r in &resp.refused {
                    debug!(from = %name, partition = r.partition, kind = ?r.kind, reason = %r.reason, "pull refused");
                }
                let bytes: usize = resp.partitions.iter().map(|d| d.drivers.len()).sum();
                let older: Vec<u16> = resp.partitions.iter().filter(|d| d.history.older).map(|d| d.partition).collect();
                // From before they are installed until the copy ends (see `copying`).
                self.copying.lock().expect("copying lock").extend(older.iter().map(|p| (*p, meta.grpc)));
                let data = resp
                    .partitions
                    .into_iter()
                    .filter_map(|d| {
                        let p = d.partition;
                        Arriving::decode(d, self.trail_cap)
                            .map_err(|e| warn!(partition = p, error = %e, "a pulled partition does not decode"))
                            .ok()
                    })
                    .collect();
                let done = self.install(&table, data, &epochs, crate::routing::INSTALL_SLICE).await;
                self.pulling.lock().expect("pulling lock").retain(|p, _| !epochs.contains_key(p));
                // History the pull left out (cut to size) is copied before the holder is
                // released, by a task of its own: a long copy does not hold up the round
                // (its surveys, promotions and other pulls). The rest is released now.
                let fill: Vec<u16> = older.iter().copied().filter(|p| done.contains(p)).collect();
                self.copying
                    .lock()
                    .expect("copying lock")
                    .retain(|p, from| !older.contains(p) || fill.contains(p) || *from != meta.grpc);
                let now: Vec<u16> = done.iter().copied().filter(|p| !fill.contains(p)).collect();
                if !now.is_empty() {
                    let release = self.link.release(meta.grpc, self.me, now, RPC_TIMEOUT).await;
                    if let Err(e) = release {
                        // The holder forgets its copy once it sees this node serve it.
                        warn!(from = %name, error = %e, "release not acknowledged");
                    }
                }
                if !fill.is_empty() {
                    let (me, peer, name) = (self.clone(), meta.grpc, name.clone());
                    crate::tasks::spawn("history_copy", async move { me.copy_then_release(peer, &name, fill).await });
                }
                pulled_any |= !done.is_empty();
                let st = self.state.lock().await;
                self.publish(view, &st);
                drop(st);
                metrics::counter!("locus_handoffs_total", "role" => "pulled").increment(done.len() as u64);
                metrics::counter!("locus_handoff_bytes_total", "role" => "pulled").increment(bytes as u64);
                metrics::histogram!("locus_handoff_seconds").record(t0.elapsed().as_secs_f64());
                debug!(from = %name, partitions = done.len(), bytes, ms = t0.elapsed().as_millis() as u64, "pulled partitions");
                pulled_total += done.len();
                pulled_bytes += bytes;
                let pace = self.pace_pct.load(Ordering::Relaxed);
                if pace > 0 {
                    tokio::time::sleep(t0.elapsed() * pace / 100).await;
                }
            }
        }
        if pulled_total > 0 {
            info!(
                partitions = pulled_total,
                from_nodes = sources,
                bytes = pulled_bytes,
                ms = t_pull.elapsed().as_millis() as u64,
                "pulled partitions"
            );
        }
        let st = self.state.lock().await;
        self.regain(&st, &survey).await;
        self.publish(view, &st);
        let r = self.routes.borrow().clone();
        pulled_any
            || r.incoming() > 0
            || st.table.count("lent") > 0
            || st.table.count("parked") > 0
            || !self.cluster.has_quorum()
    }

    /// Back in a majority, and every live member was asked what it serves (this round's
    /// survey), with stale copies stood down: serve the rest again.
    async fn regain(&self, st: &State, survey: &Survey) {
        if !self.cluster.has_quorum() && survey.missing.is_empty() && self.lease_ok.load(Ordering::Acquire) {
            let active: HashSet<u16> =
                st.table.held().filter(|(_, x)| x.holding == Some(Holding::Active)).map(|(p, _)| p).collect();
            info!(partitions = active.len(), "quorum regained: serving again");
            self.router.thaw(Arc::new(active)).await;
            self.cluster.set_quorum(true);
            metrics::gauge!("locus_quorum").set(1.0);
        }
    }

    /// Follows the view into the quorum base (see `ownership::QuorumBase`), persists it
    /// when it changed, and adds the members that joined within the lease to `heard`.
    fn update_base(
        &self,
        view: &ClusterView,
        heard: &mut HashMap<SocketAddr, Instant>,
        lease_for: Duration,
    ) -> Vec<SocketAddr> {
        let mut base = self.base.lock().expect("base lock");
        let now = Instant::now();
        let leaving = |a: &SocketAddr| view.meta(a).is_some_and(|m| m.state == NodeState::Leaving);
        let confirm_after = crate::membership::transport::RING_CHANGE_GRACE + lease_for;
        if base.update(now, view.ring.members(), leaving, self.cluster.has_quorum(), confirm_after) {
            if let Err(e) = self.store.set_meta("quorum_base", &base.encode()) {
                warn!(error = %e, "cannot persist the quorum base");
            }
            let names: Vec<String> = base.members().iter().map(|a| view.name_of(a)).collect();
            info!(members = base.members().len(), base = ?names, "quorum base changed");
        }
        base.count_joins(now, lease_for, heard);
        base.members().to_vec()
    }

    /// The quorum task: heartbeats (with this node's ring checksum) to every member
    /// every `lease / 5`, and the minority rule. When the lease lapses (no majority of
    /// the base agreeing on the ring heard within it) every partition served here is
    /// held at once: keyed writes and claims answer `UNAVAILABLE`, timers wait, hand-off
    /// planning stops. When it holds again, the next hand-off round (a full survey)
    /// stands down copies another node took over meanwhile, then serves the rest.
    pub async fn run_quorum(
        self: Arc<Self>,
        beats: crate::membership::Heartbeats,
        lease_for: Duration,
        view_rx: watch::Receiver<Arc<ClusterView>>,
    ) {
        let _ = self.heard.set((beats.heard.clone(), lease_for));
        let mut tick = tokio::time::interval(lease_for / 5);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        metrics::gauge!("locus_quorum").set(if self.cluster.has_quorum() { 1.0 } else { 0.0 });
        loop {
            tick.tick().await;
            let view = view_rx.borrow().clone();
            let leaving = view.meta(&self.me).is_some_and(|m| m.state == NodeState::Leaving);
            beats.set_ring(view.ring.checksum());
            let mut heard = beats.heard.snapshot();
            let base = self.update_base(&view, &mut heard, lease_for);
            let mut to: HashSet<SocketAddr> = view.members.iter().map(|m| m.addr).collect();
            to.extend(base.iter().copied());
            to.remove(&self.me);
            for a in &to {
                let alive = view.member(a).is_some_and(|m| m.liveness == Liveness::Alive);
                beats.beat(*a, alive);
            }
            // A leaving node routes by a ring with itself in it until it is gone, unlike
            // the others; it takes nothing any more, so only the others' rule matters.
            let now = Instant::now();
            let far = now + Duration::from_secs(86_400);
            let until = if leaving {
                Some(far)
            } else {
                crate::ownership::quorum_until(self.me, &base, &heard, lease_for, far)
            };
            // Requests check this instant themselves: a node that was frozen past it
            // refuses from its first instruction after it resumes, before this task runs.
            self.cluster.set_lease_until(until.unwrap_or(now));
            let ok = until.is_some_and(|t| t > now);
            let was = self.lease_ok.swap(ok, Ordering::AcqRel);
            if ok == was {
                continue;
            }
            metrics::counter!("locus_quorum_changes_total", "to" => if ok { "gained" } else { "lost" }).increment(1);
            if ok {
                info!("a majority of the cluster is in reach again; serving after the next hand-off round");
                continue;
            }
            let st = self.state.lock().await;
            let active: HashSet<u16> =
                st.table.held().filter(|(_, x)| x.holding == Some(Holding::Active)).map(|(p, _)| p).collect();
            // For whoever reads this at 3 a.m.: each base member, and how long ago it last
            // agreed with this node (on the ring, and that this node is alive) or at all.
            let any = self.heard.get().map(|(h, _)| h.heard_within(lease_for * 4)).unwrap_or_default();
            let members: Vec<String> = base
                .iter()
                .filter(|a| **a != self.me)
                .map(|a| {
                    let agreed =
                        heard.get(a).map_or("never".to_string(), |t| format!("{} ms ago", (now - *t).as_millis()));
                    let state = view.member(a).map_or("unknown", |m| m.liveness.as_str());
                    let beats = if any.contains(a) { "beating" } else { "silent" };
                    format!("{} ({state}, {beats}, agreed {agreed})", view.name_of(a))
                })
                .collect();
            warn!(
                base = base.len(),
                ?members,
                ring = view.ring.checksum(),
                partitions = active.len(),
                "quorum lost: a majority of the cluster is out of reach; refusing writes and claims, timers held"
            );
            self.cluster.set_quorum(false);
            metrics::gauge!("locus_quorum").set(0.0);
            self.router.hold(Arc::new(active)).await;
        }
    }

    /// The replicas' history backfill: a replica's history starts when its copy was made
    /// (or reset), so every few seconds each in-sync replica whose history has a floor
    /// not yet asked about copies the older segments from its owner
    /// (`Handoff.HistorySegments`), one partition at a time. A promoted replica then
    /// serves the partition's whole history, not only what came since it was made.
    pub async fn run_backfill(self: Arc<Self>) {
        let Some(h) = self.history.get().cloned() else { return };
        // Per partition: the floor last asked about (whatever came of it).
        let mut asked: HashMap<u16, crate::history::Pos> = HashMap::new();
        loop {
            tokio::time::sleep(BACKFILL_EVERY).await;
            let infos = self.replica_info();
            asked.retain(|p, _| infos.iter().any(|i| i.partition == *p));
            let mut by_owner: HashMap<SocketAddr, Vec<(u16, crate::history::Pos)>> = HashMap::new();
            let busy: HashSet<u16> = {
                let copying = self.copying.lock().expect("copying lock");
                let pulling = self.pulling.lock().expect("pulling lock");
                copying.keys().copied().chain(pulling.keys().copied()).collect()
            };
            for i in infos.into_iter().filter(|i| i.synced && !busy.contains(&i.partition)) {
                if let Some(floor) = h.floor(i.partition)
                    && asked.get(&i.partition) != Some(&floor)
                {
                    by_owner.entry(i.owner).or_default().push((i.partition, floor));
                }
            }
            for (owner, parts) in by_owner {
                let view = self.cluster.view();
                let Some(meta) = view.meta(&owner) else { continue };
                let (grpc, name) = (meta.grpc, meta.name.clone());
                let ps: Vec<u16> = parts.iter().map(|(p, _)| *p).collect();
                let cut = self.copy_history(grpc, &name, &ps).await;
                for p in &cut {
                    h.set_filling(*p, false);
                }
                // A copy a broken link cut short is tried again at the next look.
                for (p, floor) in parts.into_iter().filter(|(p, _)| !cut.contains(p)) {
                    asked.insert(p, h.floor(p).unwrap_or(floor));
                }
            }
        }
    }

    /// The hand-off task: a round on every view change, then again soon while
    /// unsettled, and every few seconds regardless (a missed release, a late survey).
    pub async fn run(self: Arc<Self>, mut view_rx: watch::Receiver<Arc<ClusterView>>) {
        loop {
            let view = view_rx.borrow_and_update().clone();
            // A leaving member waits for every survey to see it empty: survey often.
            let leaving = view.members.iter().any(|m| {
                m.addr != self.me
                    && m.liveness != Liveness::Down
                    && m.meta.as_ref().is_some_and(|x| x.state == NodeState::Leaving)
            });
            let busy = self.round(&view).await || leaving;
            let wait = if busy { Duration::from_millis(300) } else { Duration::from_secs(3) };
            tokio::select! {
                r = view_rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Whether this node can stop without losing state: it holds nothing that another
    /// ring member could take (nothing active or lent), or no other member remains.
    ///
    /// It also waits until every other live member's survey has seen it hold nothing:
    /// until then a member may still send it scatter parts, which would go unanswered
    /// (`partial`) once it stopped.
    pub async fn drained(&self) -> bool {
        let view = self.cluster.view();
        let others = view.ring.members().iter().any(|a| *a != self.me);
        let st = self.state.lock().await;
        let empty = st.table.count("active") == 0 && st.table.count("lent") == 0;
        let seen = self.seen_empty.lock().expect("seen lock");
        let all_saw = view
            .members
            .iter()
            .filter(|m| m.addr != self.me && m.liveness == Liveness::Alive && m.meta.is_some())
            .all(|m| seen.contains(&m.addr));
        !others || (empty && all_saw)
    }
}

impl Action {
    fn partition(&self) -> u16 {
        match *self {
            Action::Pull { p, .. }
            | Action::Adopt { p, .. }
            | Action::Reclaim { p, .. }
            | Action::Discard { p }
            | Action::ForgetLent { p }
            | Action::Promote { p, .. }
            | Action::DropReplica { p, .. }
            | Action::StandDown { p } => p,
        }
    }
}
