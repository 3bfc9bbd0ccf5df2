//! The state machines of all drivers of one shard, their geo index and expiry schedule.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

use super::codec::{Snapshot, SnapshotRef, encode_delete, encode_upsert};
use super::trail::{Trail, TrailFix};
use super::{DriverView, FieldError, FixInput, NearbyHit, Position, Reject, Status, UDP_SESSION_PREFIX};
use crate::geo::{Candidate, GeoIndex, IndexKey, LatLonBox, QueryFilter, haversine_m, index::index_point};
use crate::keys::{PartitionSet, partition_of};

/// Behaviour knobs of a shard, from the node configuration.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// A driver with no accepted fix for this long expires.
    pub ttl_ms: i64,
    /// Fixes kept per driver, the last one included.
    pub trail_len: usize,
    /// Fixes implying a faster move from the last accepted one are rejected.
    pub max_speed_mps: f64,
    /// Re-index a driver only after it moved this far from its indexed point.
    pub move_slack_m: f64,
    /// Distinct vehicle types a shard accepts (each gets its own R-trees).
    pub max_vehicle_types: usize,
    /// Keep every accepted fix for the history (`history`).
    pub history: bool,
}

/// A change to a driver's UDP session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionChange {
    /// Set it (replacing whatever session the driver had).
    Open(String),
    /// Clear it if it is a UDP session ([`UDP_SESSION_PREFIX`]: a gateway's own session
    /// string stays) and, if given, exactly this one.
    Close(Option<String>),
}

/// How a read or removal finds its driver: the driver id, optionally required to still
/// hold a cab number or session (lookups through the secondary indexes verify here).
#[derive(Clone, Debug, PartialEq)]
pub enum Lookup {
    Id(String),
    IdWithCab(String, String),
    IdWithSession(String, String),
}

impl Lookup {
    pub fn driver_id(&self) -> &str {
        match self {
            Lookup::Id(id) | Lookup::IdWithCab(id, _) | Lookup::IdWithSession(id, _) => id,
        }
    }
}

#[derive(Clone, Debug)]
pub struct NearbyQuery {
    pub lat: f64,
    pub lon: f64,
    pub limit: usize,
    pub radius_m: Option<f64>,
    /// Bit `1 << status code` per accepted status; `u32::MAX` for all.
    pub statuses: u32,
    pub vehicle_type: Option<String>,
}

#[derive(Clone, Debug)]
pub enum WithinQuery {
    Circle { lat: f64, lon: f64, radius_m: f64, limit: usize, statuses: u32, vehicle_type: Option<String> },
    Box { b: LatLonBox, limit: usize, statuses: u32, vehicle_type: Option<String> },
}

impl WithinQuery {
    pub fn limit(&self) -> usize {
        match self {
            WithinQuery::Circle { limit, .. } | WithinQuery::Box { limit, .. } => *limit,
        }
    }
}

/// Which secondary index an [`Event::IndexSet`] / [`Event::IndexUnset`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexKind {
    Cab,
    Session,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoneReason {
    Removed,
    Expired,
    /// Its partition now belongs to another node.
    Moved,
}

/// Effects the shell performs after each message.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A watched driver accepted a fix; its state right after that fix.
    Accepted {
        slot: u32,
        view: Box<DriverView>,
    },
    /// A driver was removed or expired; its watchers end.
    Gone {
        slot: u32,
        reason: GoneReason,
    },
    IndexSet {
        kind: IndexKind,
        key: Box<str>,
        driver_id: Box<str>,
    },
    IndexUnset {
        kind: IndexKind,
        key: Box<str>,
        driver_id: Box<str>,
    },
    /// A driver's status as queries see it changed (`from: None` = new driver, `to:
    /// None` = gone). Drives the driver side of `Events.Subscribe`.
    StatusChanged {
        driver_id: Box<str>,
        from: Option<Status>,
        to: Option<Status>,
        lat: f64,
        lon: f64,
    },
    /// A claim was taken or confirmed: persist it (`offer_due_ms: None` = confirmed).
    ClaimSet {
        driver_id: Box<str>,
        claim: Claim,
    },
    /// A claim ended: forget its persisted record.
    ClaimEnded {
        driver_id: Box<str>,
        trip_id: Box<str>,
        why: ClaimEnd,
    },
    /// An accepted fix of a driver assigned to a trip: the trip records it.
    TripFix {
        trip_id: Box<str>,
        driver_id: Box<str>,
        pos: Position,
    },
}

/// A driver's claim by one trip (few drivers have one: they live beside the records).
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    pub trip_id: Box<str>,
    /// When the offer lapses unless the trip confirms; `None` once confirmed.
    pub offer_due_ms: Option<i64>,
}

/// Why a claim ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimEnd {
    Released,
    OfferTimeout,
    /// The driver was removed, expired or moved to another node.
    DriverGone,
}

/// Why a claim or confirmation was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("not_found: the driver is unknown, removed or expired")]
    NotFound,
    #[error("not_available: the driver is {0}")]
    NotAvailable(&'static str),
    #[error("claimed: the driver is claimed for another trip")]
    Claimed,
}

impl ClaimError {
    pub fn reason(&self) -> &'static str {
        match self {
            ClaimError::NotFound => "not_found",
            ClaimError::NotAvailable(_) => "not_available",
            ClaimError::Claimed => "claimed",
        }
    }
}

/// A successful claim or confirmation: where the driver is.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimOk {
    pub pos: Position,
    pub vehicle_type: String,
    pub offer_due_ms: Option<i64>,
}

/// What a shard hands to the driver log in one group commit: encoded records (deletions
/// first, then every driver changed since the last commit, once each).
#[derive(Debug, Default)]
pub struct PersistBatch {
    pub buf: Vec<u8>,
    pub records: usize,
    /// Set when this batch completes the compaction sweep of that epoch: every live
    /// driver of the shard has a full record in this or an earlier batch of the sweep.
    pub sweep_done: Option<u64>,
    /// Per record, in order: its partition and the end offset of its bytes in `buf`
    /// (how replication splits a batch by partition without decoding it).
    pub parts: Vec<(u16, u32)>,
    /// Partitions being re-sent to their replicas: every live driver of each has a full
    /// record in this batch, so a replica clears its copy before applying the batch.
    pub resync: Vec<u16>,
    /// Every fix accepted since the last commit, as raw history entries
    /// (`history::codec::push_raw`).
    pub history: Vec<u8>,
    /// Filled by the persister once the history is written: one framed block per
    /// partition (for the partitions' replicas).
    pub history_blocks: Vec<(u16, Vec<u8>)>,
    /// The partitions `history` has fixes of.
    pub history_parts: PartitionSet,
    /// Set by the shard's worker on a batch with history: the persister publishes the
    /// number once the history is in the history store (before the sync), so a
    /// hand-off can wait for a partition's history to be there before it reads it.
    pub history_ack: Option<(std::sync::Arc<tokio::sync::watch::Sender<u64>>, u64)>,
    /// Dropped by the persister once the batch is on disk and teed to replication: set
    /// under the simulated clock, where a blocking task waits on it so that virtual time
    /// stands still while the log thread writes (see `clock::simulate`).
    pub done: Option<std::sync::mpsc::SyncSender<()>>,
}

/// The most bytes [`PersistBatch::sized_like`] reserves per buffer.
const SIZED_LIKE_MAX: usize = 4 << 20;

impl PersistBatch {
    /// Under the simulated clock, holds virtual time until the persister is done with
    /// this batch (a no-op otherwise).
    pub fn hold_clock(&mut self) {
        if !crate::clock::simulated() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.done = Some(tx);
        tokio::task::spawn_blocking(move || {
            let _ = rx.recv();
        });
    }

    /// An empty batch with room for as much as `last` held, so a busy shard's next
    /// batch is allocated once at its size instead of grown (and copied) by doubling.
    /// (At most [`SIZED_LIKE_MAX`] bytes each: one large batch, an install, does not
    /// leave an idle shard holding as much.)
    pub fn sized_like(last: &PersistBatch) -> PersistBatch {
        let room = |n: usize, item: usize| n.min(SIZED_LIKE_MAX / item);
        PersistBatch {
            buf: Vec::with_capacity(room(last.buf.len(), 1)),
            parts: Vec::with_capacity(room(last.parts.len(), std::mem::size_of::<(u16, u32)>())),
            history: Vec::with_capacity(room(last.history.len(), 1)),
            ..PersistBatch::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0 && self.sweep_done.is_none() && self.resync.is_empty() && self.history.is_empty()
    }

    fn tag(&mut self, id: &str) {
        self.tag_in(partition_of(id.as_bytes()));
    }

    fn tag_in(&mut self, p: u16) {
        self.parts.push((p, self.buf.len() as u32));
    }
}

/// Counters a shard keeps; the shell publishes them as metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardCounters {
    pub accepted: u64,
    pub stale: u64,
    pub implausible: u64,
    pub reindexed: u64,
    pub expired: u64,
    pub removed: u64,
}

const DIRTY: u8 = 1;
const WATCHED: u8 = 2;
/// The next record of this driver must be a full one (new driver, sweep, or more new
/// trail fixes than the delta counter holds).
const FULL: u8 = 4;
/// Claimed by a trip (an entry in `DriverShard::claims`): DISPATCHED to queries.
const CLAIMED: u8 = 8;
/// The claim was confirmed (DRIVER_ASSIGNED): ON_TRIP to queries, fixes go to the trip.
const ASSIGNED: u8 = 16;

struct Rec {
    id: Box<str>,
    /// `partition_of(id)`, kept: hand-off scans and persistence tags read it per driver.
    partition: u16,
    generation: u32,
    flags: u8,
    /// Trail fixes added since the driver's last record (for delta records).
    unpersisted: u8,
    status: Status,
    vtype: u16,
    indexed: [f32; 3],
    last: Position,
    received_ms: i64,
    trip_cost: f64,
    cab: Option<Box<str>>,
    session: Option<Box<str>>,
    trip_id: Option<Box<str>>,
    trail: Trail,
}

impl Rec {
    /// The status queries see: a claim overrides what the app reports.
    fn effective(&self) -> Status {
        if self.flags & ASSIGNED != 0 {
            Status::OnTrip
        } else if self.flags & CLAIMED != 0 {
            Status::Dispatched
        } else {
            self.status
        }
    }

    fn key(&self) -> IndexKey {
        IndexKey { status: self.effective().code() }
    }

    /// The record as the log codec encodes it (`vtypes`: the shard's interned types).
    fn snapshot<'a>(&'a self, vtypes: &'a [(Box<str>, u32)]) -> SnapshotRef<'a> {
        SnapshotRef {
            status: self.status,
            vehicle_type: &vtypes[self.vtype as usize].0,
            last: &self.last,
            received_ms: self.received_ms,
            trip_cost: self.trip_cost,
            cab: self.cab.as_deref().unwrap_or_default(),
            session: self.session.as_deref().unwrap_or_default(),
            trip_id: self.trip_id.as_deref().unwrap_or_default(),
            trail: &self.trail,
        }
    }
}

fn non_empty(s: String) -> Option<Box<str>> {
    (!s.is_empty()).then(|| s.into_boxed_str())
}

/// See the module docs of `drivers`.
pub struct DriverShard {
    cfg: ShardConfig,
    slots: Vec<Option<Rec>>,
    free: Vec<u32>,
    by_id: HashTable<u32>,
    hasher: DefaultHashBuilder,
    index: GeoIndex,
    /// Interned vehicle types with the number of drivers of each; 0 is "none". An entry
    /// no driver uses any more is recycled, so junk types cannot fill the table for good.
    vtypes: Vec<(Box<str>, u32)>,
    /// Expiry schedule: (due, slot, generation); at most one entry per driver.
    timers: BinaryHeap<Reverse<(i64, u32, u32)>>,
    next_gen: u32,
    events: Vec<Event>,
    /// Drivers removed since the last commit.
    deleted: Vec<Box<str>>,
    dirty: Vec<u32>,
    /// A compaction sweep in progress: (epoch, next slot).
    sweep: Option<(u64, u32)>,
    /// Partitions whose drivers were all marked for a full record for their replicas;
    /// announced in the next batch.
    resync: Vec<u16>,
    /// Claims by trips, by slot (drivers with the CLAIMED flag).
    claims: HashMap<u32, Claim>,
    /// Claims that arrived (hand-off, promotion, restart) for a driver not here: its
    /// record was lost within the fix replication window, the claim was not. Attached
    /// when the driver's next fix creates it, so it is never matched to a second trip.
    orphans: HashMap<Box<str>, Claim>,
    /// Offer timeouts: (due, slot, generation); stale entries are skipped.
    offers: BinaryHeap<Reverse<(i64, u32, u32)>>,
    /// Partitions being handed to another node: their keyed writes are refused and their
    /// timers held (in `held`) until they are forgotten or thawed.
    frozen: PartitionSet,
    /// The slots of each partition's drivers, kept as slots are taken and freed: a
    /// hand-off exports and forgets a few partitions at a time, and `admin partitions`
    /// counts them, without a pass over every slot (which cost a 1M-driver node about a
    /// tenth of its CPU while partitions moved).
    by_partition: Vec<Vec<u32>>,
    /// Timers that came due in a frozen partition: (is offer, due, slot, generation).
    held: Vec<(bool, i64, u32, u32)>,
    /// Fixes accepted since the last commit, for the history (raw entries), and the
    /// partitions they are of.
    history: Vec<u8>,
    history_parts: PartitionSet,
    pub counters: ShardCounters,
}

/// Drivers given a full record per `take_writes` call during a compaction sweep.
pub const SWEEP_CHUNK: u32 = 2_000;
/// Bytes a commit reserves per driver record before encoding them (a delta record of
/// one new fix with a 10-byte id and a UDP session is 135 bytes; a full one with its
/// trail grows the buffer).
const UPSERT_BYTES_HINT: usize = 144;

impl DriverShard {
    pub fn new(cfg: ShardConfig) -> Self {
        DriverShard {
            index: GeoIndex::new(cfg.move_slack_m),
            cfg,
            slots: Vec::new(),
            free: Vec::new(),
            by_id: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            vtypes: vec![("".into(), 0)],
            timers: BinaryHeap::new(),
            next_gen: 0,
            events: Vec::new(),
            deleted: Vec::new(),
            dirty: Vec::new(),
            sweep: None,
            resync: Vec::new(),
            claims: HashMap::new(),
            orphans: HashMap::new(),
            offers: BinaryHeap::new(),
            frozen: PartitionSet::default(),
            by_partition: vec![Vec::new(); crate::keys::PARTITIONS as usize],
            held: Vec::new(),
            history: Vec::new(),
            history_parts: PartitionSet::default(),
            counters: ShardCounters::default(),
        }
    }

    /// Whether accepted fixes are kept for the history.
    pub fn keeps_history(&self) -> bool {
        self.cfg.history
    }

    /// Number of live drivers.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn find(&self, id: &str) -> Option<u32> {
        let h = self.hasher.hash_one(id);
        let slots = &self.slots;
        self.by_id.find(h, |&s| slots[s as usize].as_ref().is_some_and(|r| &*r.id == id)).copied()
    }

    fn rec(&self, slot: u32) -> &Rec {
        self.slots[slot as usize].as_ref().expect("live slot")
    }

    fn rec_mut(&mut self, slot: u32) -> &mut Rec {
        self.slots[slot as usize].as_mut().expect("live slot")
    }

    fn vtype_id(&self, name: &str) -> Option<u16> {
        self.vtypes.iter().position(|(v, _)| &**v == name).map(|i| i as u16)
    }

    fn vtype_name(&self, id: u16) -> &str {
        &self.vtypes[id as usize].0
    }

    /// The id of a vehicle type, interning it (or recycling an unused entry) if new.
    fn intern_vtype(&mut self, name: &str, limit: bool) -> Result<u16, FieldError> {
        if let Some(i) = self.vtype_id(name) {
            return Ok(i);
        }
        if let Some(i) = self.vtypes.iter().skip(1).position(|(_, refs)| *refs == 0) {
            self.vtypes[i + 1].0 = name.into();
            return Ok((i + 1) as u16);
        }
        if limit && self.vtypes.len() > self.cfg.max_vehicle_types {
            return Err(FieldError::new(
                "vehicle_type",
                format!("too many distinct vehicle types in use (at most {})", self.cfg.max_vehicle_types),
            ));
        }
        self.vtypes.push((name.into(), 0));
        Ok((self.vtypes.len() - 1) as u16)
    }

    fn vtype_ref(&mut self, id: u16, delta: i32) {
        let refs = &mut self.vtypes[id as usize].1;
        *refs = refs.saturating_add_signed(delta);
    }

    fn mark_dirty(&mut self, slot: u32) {
        let rec = self.rec_mut(slot);
        if rec.flags & DIRTY == 0 {
            rec.flags |= DIRTY;
            self.dirty.push(slot);
        }
    }

    /// Applies one validated fix at server time `now_ms`.
    pub fn apply(&mut self, fix: FixInput, now_ms: i64) -> Result<(), Reject> {
        let pos = Position {
            lat: fix.lat,
            lon: fix.lon,
            heading_deg: fix.heading_deg,
            speed_mps: fix.speed_mps,
            accuracy_m: fix.accuracy_m,
            timestamp_ms: fix.timestamp_ms,
        };
        // A UDP session is set only by `Sessions.Open`: a fix naming one applies only
        // while its driver holds it (so not after a close, a replacement or expiry).
        let udp = fix.session.starts_with(UDP_SESSION_PREFIX);
        let not_held = || {
            Reject::Invalid(FieldError::new(
                "session",
                "not the driver's current UDP session (closed, replaced, or the driver expired)",
            ))
        };
        let Some(slot) = self.find(&fix.driver_id) else {
            if udp {
                return Err(not_held());
            }
            let vtype = if fix.vehicle_type.is_empty() { 0 } else { self.intern_vtype(&fix.vehicle_type, true)? };
            let slot = self.create(fix, pos, vtype, now_ms);
            self.keep_history(slot);
            self.counters.accepted += 1;
            return Ok(());
        };
        if udp && self.rec(slot).session.as_deref() != Some(fix.session.as_str()) {
            return Err(not_held());
        }
        let max_speed = self.cfg.max_speed_mps;
        let trail_cap = self.cfg.trail_len.saturating_sub(1);
        let last = self.rec(slot).last;
        if pos.timestamp_ms <= last.timestamp_ms {
            self.counters.stale += 1;
            return Err(Reject::Stale { got_ms: pos.timestamp_ms, last_ms: last.timestamp_ms });
        }
        let dt_s = (pos.timestamp_ms - last.timestamp_ms) as f64 / 1000.0;
        let distance_m = haversine_m(last.lat, last.lon, pos.lat, pos.lon);
        if distance_m > max_speed * dt_s {
            self.counters.implausible += 1;
            return Err(Reject::ImplausibleJump { distance_m, dt_s, speed_mps: distance_m / dt_s, max_mps: max_speed });
        }
        let old_vtype = self.rec(slot).vtype;
        let vtype = match fix.vehicle_type.as_str() {
            "" => old_vtype,
            name if name == self.vtype_name(old_vtype) => old_vtype,
            name => self.intern_vtype(name, true)?,
        };
        if vtype != old_vtype {
            self.vtype_ref(old_vtype, -1);
            self.vtype_ref(vtype, 1);
        }
        let rec = self.rec_mut(slot);
        let old_key = rec.key();
        rec.trail.push(&rec.last, trail_cap);
        rec.unpersisted = rec.unpersisted.saturating_add(1);
        rec.last = pos;
        rec.received_ms = now_ms;
        if let Some(s) = fix.status {
            rec.status = s;
        }
        rec.vtype = vtype;
        rec.trip_id = non_empty(fix.trip_id);
        rec.trip_cost = fix.trip_cost;
        let mut index_events = [None, None];
        if !fix.cab_number.is_empty() && rec.cab.as_deref() != Some(fix.cab_number.as_str()) {
            let old = rec.cab.replace(fix.cab_number.into_boxed_str());
            index_events[0] = Some((IndexKind::Cab, old));
        }
        if !fix.session.is_empty() && rec.session.as_deref() != Some(fix.session.as_str()) {
            let old = rec.session.replace(fix.session.into_boxed_str());
            index_events[1] = Some((IndexKind::Session, old));
        }
        let new_key = rec.key();
        let indexed = rec.indexed;
        let watched = rec.flags & WATCHED != 0;
        if rec.flags & ASSIGNED != 0 {
            let driver_id = rec.id.clone();
            if let Some(c) = self.claims.get(&slot) {
                self.events.push(Event::TripFix { trip_id: c.trip_id.clone(), driver_id, pos });
            }
        }
        if new_key != old_key {
            self.status_changed(slot, Status::from_code(old_key.status as i32));
        }
        let moved = self.index.moved_point(indexed, pos.lat, pos.lon);
        if new_key != old_key || moved.is_some() {
            // Within the slack the old indexed point stays valid, even in a new tree.
            let p = moved.unwrap_or(indexed);
            self.index.remove(old_key, slot, indexed);
            self.index.insert(new_key, slot, p);
            self.rec_mut(slot).indexed = p;
            self.counters.reindexed += 1;
        }
        for (kind, old) in index_events.into_iter().flatten() {
            self.index_changed(slot, kind, old);
        }
        self.mark_dirty(slot);
        self.keep_history(slot);
        if watched {
            let view = Box::new(self.view(slot, false));
            self.events.push(Event::Accepted { slot, view });
        }
        self.counters.accepted += 1;
        Ok(())
    }

    fn status_changed(&mut self, slot: u32, from: Option<Status>) {
        let r = self.rec(slot);
        let ev = Event::StatusChanged {
            driver_id: r.id.clone(),
            from,
            to: Some(r.effective()),
            lat: r.last.lat,
            lon: r.last.lon,
        };
        self.events.push(ev);
    }

    /// Moves a driver to the R-tree of its (new) effective status after a claim change.
    fn reindex_claim(&mut self, slot: u32, old_key: IndexKey) {
        let r = self.rec(slot);
        let (new_key, p) = (r.key(), r.indexed);
        if new_key != old_key {
            self.index.remove(old_key, slot, p);
            self.index.insert(new_key, slot, p);
            self.status_changed(slot, Status::from_code(old_key.status as i32));
        }
    }

    fn claim_ok(&self, slot: u32) -> ClaimOk {
        let r = self.rec(slot);
        ClaimOk {
            pos: r.last,
            vehicle_type: self.vtype_name(r.vtype).to_string(),
            offer_due_ms: self.claims.get(&slot).and_then(|c| c.offer_due_ms),
        }
    }

    /// Compare-and-set AVAILABLE → DISPATCHED for `trip_id` (idempotent for the same
    /// trip). The claim lapses at `offer_due_ms` unless [`confirm`](Self::confirm)ed.
    pub fn claim(
        &mut self,
        driver_id: &str,
        trip_id: &str,
        vehicle_type: &str,
        offer_due_ms: i64,
    ) -> Result<ClaimOk, ClaimError> {
        let slot = self.find(driver_id).ok_or(ClaimError::NotFound)?;
        let rec = self.rec(slot);
        if rec.flags & CLAIMED != 0 {
            return match self.claims.get(&slot) {
                Some(c) if &*c.trip_id == trip_id => Ok(self.claim_ok(slot)),
                _ => Err(ClaimError::Claimed),
            };
        }
        if rec.status != Status::Available {
            return Err(ClaimError::NotAvailable(rec.status.name()));
        }
        if !vehicle_type.is_empty() && self.vtype_name(rec.vtype) != vehicle_type {
            return Err(ClaimError::NotAvailable("of another vehicle type"));
        }
        self.set_claim(slot, Claim { trip_id: trip_id.into(), offer_due_ms: Some(offer_due_ms) });
        Ok(self.claim_ok(slot))
    }

    /// The trip confirmed its driver (DRIVER_ASSIGNED): the claim no longer lapses and
    /// the driver's fixes go to the trip. An unclaimed driver is claimed now, whatever
    /// its app reports (dispatch chose it); one claimed for another trip is refused.
    pub fn confirm(&mut self, driver_id: &str, trip_id: &str) -> Result<ClaimOk, ClaimError> {
        let slot = self.find(driver_id).ok_or(ClaimError::NotFound)?;
        if let Some(c) = self.claims.get(&slot) {
            if &*c.trip_id != trip_id {
                return Err(ClaimError::Claimed);
            }
            if c.offer_due_ms.is_none() {
                return Ok(self.claim_ok(slot));
            }
        }
        self.set_claim(slot, Claim { trip_id: trip_id.into(), offer_due_ms: None });
        Ok(self.claim_ok(slot))
    }

    /// Records `claim` on the driver in `slot` (flags, offer timer); returns the index
    /// key it had before, for the caller to re-index.
    fn attach_claim(&mut self, slot: u32, claim: Claim) -> IndexKey {
        let rec = self.rec_mut(slot);
        let (old_key, generation) = (rec.key(), rec.generation);
        rec.flags |= CLAIMED;
        match claim.offer_due_ms {
            Some(due) => self.offers.push(Reverse((due, slot, generation))),
            None => self.rec_mut(slot).flags |= ASSIGNED,
        }
        self.claims.insert(slot, claim);
        old_key
    }

    fn set_claim(&mut self, slot: u32, claim: Claim) {
        let driver_id = self.rec(slot).id.clone();
        self.events.push(Event::ClaimSet { driver_id, claim: claim.clone() });
        let old_key = self.attach_claim(slot, claim);
        self.reindex_claim(slot, old_key);
    }

    /// Frees a driver claimed for `trip_id`; false if it is not (any more).
    pub fn release(&mut self, driver_id: &str, trip_id: &str) -> bool {
        let Some(slot) = self.find(driver_id) else {
            if self.orphans.get(driver_id).is_some_and(|c| &*c.trip_id == trip_id) {
                let c = self.orphans.remove(driver_id).expect("checked");
                let why = ClaimEnd::Released;
                self.events.push(Event::ClaimEnded { driver_id: driver_id.into(), trip_id: c.trip_id, why });
                return true;
            }
            return false;
        };
        if self.claims.get(&slot).is_none_or(|c| &*c.trip_id != trip_id) {
            return false;
        }
        self.end_claim(slot, ClaimEnd::Released);
        true
    }

    fn end_claim(&mut self, slot: u32, why: ClaimEnd) {
        let Some(c) = self.claims.remove(&slot) else { return };
        let old_key = self.rec(slot).key();
        let rec = self.rec_mut(slot);
        rec.flags &= !(CLAIMED | ASSIGNED);
        let driver_id = rec.id.clone();
        self.events.push(Event::ClaimEnded { driver_id, trip_id: c.trip_id, why });
        self.reindex_claim(slot, old_key);
    }

    /// Puts back a persisted claim after a restart; false if the driver is gone. An
    /// offer already past its time lapses at the next [`fire_timers`](Self::fire_timers).
    pub fn restore_claim(&mut self, driver_id: &str, claim: Claim) -> bool {
        let Some(slot) = self.find(driver_id) else {
            self.orphans.insert(driver_id.into(), claim);
            return false;
        };
        let old_key = self.attach_claim(slot, claim);
        let r = self.rec(slot);
        let (new_key, p) = (r.key(), r.indexed);
        self.index.remove(old_key, slot, p);
        self.index.insert(new_key, slot, p);
        true
    }

    fn index_changed(&mut self, slot: u32, kind: IndexKind, old: Option<Box<str>>) {
        let rec = self.rec(slot);
        let new = match kind {
            IndexKind::Cab => rec.cab.clone(),
            IndexKind::Session => rec.session.clone(),
        };
        if old.is_none() && new.is_none() {
            return;
        }
        let id = rec.id.clone();
        if let Some(key) = old {
            self.events.push(Event::IndexUnset { kind, key, driver_id: id.clone() });
        }
        if let Some(key) = new {
            self.events.push(Event::IndexSet { kind, key, driver_id: id });
        }
    }

    /// Orphaned claims whose offer is due lapse too, driver or not (there are few: the
    /// claims a promoted replica brought for drivers whose record it lacked).
    fn lapse_orphan_offers(&mut self, now_ms: i64) {
        let due: Vec<Box<str>> = self
            .orphans
            .iter()
            .filter(|(id, c)| {
                c.offer_due_ms.is_some_and(|d| d <= now_ms) && !self.frozen.contains(partition_of(id.as_bytes()))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(c) = self.orphans.remove(&id) {
                self.events.push(Event::ClaimEnded { driver_id: id, trip_id: c.trip_id, why: ClaimEnd::OfferTimeout });
            }
        }
    }

    /// Attaches the orphaned claim of the driver just created in `slot`, if any (before
    /// it is indexed: the claim decides its index key).
    fn adopt_orphan(&mut self, slot: u32) {
        if self.orphans.is_empty() {
            return;
        }
        let id = self.rec(slot).id.clone();
        if let Some(c) = self.orphans.remove(&id) {
            self.attach_claim(slot, c);
        }
    }

    fn alloc_slot(&mut self, rec: Rec) -> u32 {
        let partition = rec.partition as usize;
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(rec);
                s
            }
            None => {
                self.slots.push(Some(rec));
                (self.slots.len() - 1) as u32
            }
        };
        let h = self.hasher.hash_one(&*self.rec(slot).id);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_id.insert_unique(h, slot, |&s| hasher.hash_one(&*slots[s as usize].as_ref().expect("live slot").id));
        self.by_partition[partition].push(slot);
        slot
    }

    /// Appends the driver's just-accepted fix to the history buffer.
    fn keep_history(&mut self, slot: u32) {
        if !self.cfg.history {
            return;
        }
        let r = self.slots[slot as usize].as_ref().expect("live slot");
        let packed = TrailFix::pack(&r.last, r.last.timestamp_ms);
        let entry = crate::history::Raw {
            partition: r.partition,
            driver_id: &r.id,
            lat_e7: packed.lat_e7,
            lon_e7: packed.lon_e7,
            timestamp_ms: r.last.timestamp_ms,
            received_ms: r.received_ms,
            motion: packed.motion,
            status: r.effective().code(),
            trip_id: r.trip_id.as_deref().unwrap_or(""),
            trip_cost_cents: (r.trip_cost * 100.0).round().clamp(0.0, u32::MAX as f64) as u32,
        };
        crate::history::codec::push_raw(&mut self.history, &entry);
        self.history_parts.insert(r.partition);
    }

    /// Appends a driver's state change (as the bus publishes it) to the history buffer,
    /// so `Events.Subscribe` can replay it from a cursor.
    pub fn keep_event(&mut self, driver_id: &str, from: Option<Status>, to: Option<Status>, at: (f64, f64, i64)) {
        if !self.cfg.history {
            return;
        }
        let (lat, lon, timestamp_ms) = at;
        let e = crate::history::RawEvent {
            partition: partition_of(driver_id.as_bytes()),
            entity: 1,
            id: driver_id,
            state: to.map_or("GONE", Status::name),
            from_state: from.map_or("", Status::name),
            timestamp_ms,
            lat_e7: (lat * 1e7).round() as i32,
            lon_e7: (lon * 1e7).round() as i32,
        };
        crate::history::codec::push_raw_event(&mut self.history, &e);
        self.history_parts.insert(e.partition);
    }

    fn create(&mut self, fix: FixInput, pos: Position, vtype: u16, now_ms: i64) -> u32 {
        self.next_gen = self.next_gen.wrapping_add(1);
        let due = now_ms + self.cfg.ttl_ms;
        let rec = Rec {
            partition: partition_of(fix.driver_id.as_bytes()),
            id: fix.driver_id.into_boxed_str(),
            generation: self.next_gen,
            flags: FULL,
            unpersisted: 0,
            status: fix.status.unwrap_or(Status::Offline),
            vtype,
            indexed: index_point(pos.lat, pos.lon),
            last: pos,
            received_ms: now_ms,
            trip_cost: fix.trip_cost,
            cab: non_empty(fix.cab_number),
            session: non_empty(fix.session),
            trip_id: non_empty(fix.trip_id),
            trail: Trail::default(),
        };
        let slot = self.alloc_slot(rec);
        self.adopt_orphan(slot);
        self.vtype_ref(vtype, 1);
        let rec = self.rec(slot);
        let (key, p, generation) = (rec.key(), rec.indexed, rec.generation);
        self.index.insert(key, slot, p);
        self.timers.push(Reverse((due, slot, generation)));
        self.index_changed(slot, IndexKind::Cab, None);
        self.index_changed(slot, IndexKind::Session, None);
        self.status_changed(slot, None);
        self.mark_dirty(slot);
        slot
    }

    fn resolve(&self, lookup: &Lookup) -> Option<u32> {
        let slot = self.find(lookup.driver_id())?;
        let rec = self.rec(slot);
        let ok = match lookup {
            Lookup::Id(_) => true,
            Lookup::IdWithCab(_, cab) => rec.cab.as_deref() == Some(cab.as_str()),
            Lookup::IdWithSession(_, s) => rec.session.as_deref() == Some(s.as_str()),
        };
        ok.then_some(slot)
    }

    /// Reads one driver. Call [`fire_timers`](Self::fire_timers) first so expired
    /// drivers are gone.
    pub fn get(&self, lookup: &Lookup, include_trail: bool) -> Option<DriverView> {
        self.resolve(lookup).map(|s| self.view(s, include_trail))
    }

    /// The driver in `slot` as a detached view.
    pub fn view(&self, slot: u32, include_trail: bool) -> DriverView {
        let r = self.rec(slot);
        let trail = if include_trail {
            let mut t: Vec<Position> = Vec::with_capacity(r.trail.len() + 1);
            t.extend(r.trail.iter());
            t.push(r.last);
            t
        } else {
            Vec::new()
        };
        DriverView {
            driver_id: r.id.to_string(),
            last: r.last,
            status: r.effective(),
            vehicle_type: self.vtype_name(r.vtype).to_string(),
            cab_number: r.cab.as_deref().unwrap_or_default().to_string(),
            session: r.session.as_deref().unwrap_or_default().to_string(),
            trip_id: r.trip_id.as_deref().unwrap_or_default().to_string(),
            trip_cost: r.trip_cost,
            received_ms: r.received_ms,
            trail,
        }
    }

    /// Opens or closes a driver's UDP session (see [`SessionChange`]). `Some(changed)`
    /// if the driver is here, `None` if not. Persisted like a fix.
    pub fn set_session(&mut self, driver_id: &str, change: SessionChange) -> Option<bool> {
        let slot = self.find(driver_id)?;
        let rec = self.rec_mut(slot);
        let current = rec.session.as_deref();
        let (new, keep) = match change {
            SessionChange::Open(s) => (Some(s.into_boxed_str()), false),
            SessionChange::Close(None) => (None, !current.is_some_and(|s| s.starts_with(UDP_SESSION_PREFIX))),
            SessionChange::Close(Some(s)) => (None, current != Some(s.as_str())),
        };
        if rec.session == new || keep {
            return Some(false);
        }
        let old = std::mem::replace(&mut rec.session, new);
        self.index_changed(slot, IndexKind::Session, old);
        self.mark_dirty(slot);
        Some(true)
    }

    /// Removes a driver now; returns its id, or `None` if no driver matches.
    pub fn remove(&mut self, lookup: &Lookup) -> Option<String> {
        let slot = self.resolve(lookup)?;
        self.counters.removed += 1;
        Some(self.drop_driver(slot, GoneReason::Removed).into())
    }

    /// Drops every driver whose partition `keep` rejects (ownership moved to another
    /// node); returns how many were dropped. Their deletions are persisted like removals.
    /// Logs the deletion of drivers this shard does not hold (a discarded parked copy).
    pub fn log_deletes(&mut self, ids: Vec<String>) {
        self.deleted.extend(ids.into_iter().map(String::into_boxed_str));
    }

    /// Whether keyed writes to this driver are refused (its partition is moving).
    pub fn is_frozen(&self, driver_id: &str) -> bool {
        !self.frozen.is_empty() && self.frozen.contains(partition_of(driver_id.as_bytes()))
    }

    fn slot_frozen(&self, slot: u32) -> bool {
        !self.frozen.is_empty() && self.slots[slot as usize].as_ref().is_some_and(|r| self.frozen.contains(r.partition))
    }

    /// The slots of `parts`' drivers, each partition's in the order they were taken.
    fn slots_in(&self, parts: &HashSet<u16>) -> Vec<u32> {
        parts.iter().filter_map(|p| self.by_partition.get(*p as usize)).flatten().copied().collect()
    }

    /// Hand-off, holder side: freezes `parts` and returns their drivers as full log
    /// records, per partition (records, count). Reads still answer from them.
    pub fn export(&mut self, parts: &HashSet<u16>) -> HashMap<u16, (Vec<u8>, u32)> {
        self.frozen.extend(parts.iter());
        let mut out: HashMap<u16, (Vec<u8>, u32)> = HashMap::new();
        for slot in self.slots_in(parts) {
            let r = self.rec(slot);
            let snap = r.snapshot(&self.vtypes);
            let e = out.entry(r.partition).or_default();
            encode_upsert(&mut e.0, &r.id, &snap, None);
            e.1 += 1;
        }
        out
    }

    /// Hand-off, holder side: the new owner has the partitions: drop their drivers
    /// without status or claim events (they live on there), end their watchers as moved,
    /// log their deletion, and drop their held timers.
    pub fn forget(&mut self, parts: &HashSet<u16>) -> usize {
        self.forget_some(parts, usize::MAX).0
    }

    /// [`forget`](Self::forget) in slices: drops at most `limit` of the partitions'
    /// drivers (each removal is an R-tree update; queries queued behind a slice wait for
    /// it alone). Returns how many it dropped and whether the partitions are gone.
    pub fn forget_some(&mut self, parts: &HashSet<u16>, limit: usize) -> (usize, bool) {
        let gone = self.slots_in(parts);
        let n = gone.len().min(limit);
        // Last first: each is then the last of its partition's slot list.
        for &slot in gone[gone.len() - n..].iter().rev() {
            self.drop_driver(slot, GoneReason::Moved);
        }
        if n < gone.len() {
            return (n, false);
        }
        for p in parts {
            self.frozen.remove(*p);
        }
        self.orphans.retain(|id, _| !parts.contains(&partition_of(id.as_bytes())));
        let slots = &self.slots;
        self.held
            .retain(|&(_, _, s, g)| slots.get(s as usize).and_then(Option::as_ref).is_some_and(|r| r.generation == g));
        (n, true)
    }

    /// Hand-off undone (the borrower is gone): serve the partitions again, with their
    /// held timers (overdue ones fire on the next `fire_timers`).
    pub fn thaw(&mut self, parts: &HashSet<u16>) {
        for p in parts {
            self.frozen.remove(*p);
        }
        for (offer, due, slot, g) in std::mem::take(&mut self.held) {
            if offer {
                self.offers.push(Reverse((due, slot, g)));
            } else {
                self.timers.push(Reverse((due, slot, g)));
            }
        }
    }

    /// Hand-off, new owner side (or a parked copy adopted): adds drivers with their
    /// expiry timers and index entries, then their claims (with offer timers). Every
    /// driver gets a full record in this node's log. An id already here is kept.
    pub fn install(&mut self, drivers: Vec<Snapshot>, claims: Vec<(String, Claim)>) -> usize {
        let ttl = self.cfg.ttl_ms;
        let mut points = Vec::with_capacity(drivers.len());
        for s in drivers {
            let Some(slot) = self.restore_driver(s) else { continue };
            let rec = self.rec(slot);
            let (due, generation) = (rec.received_ms + ttl, rec.generation);
            points.push((rec.key(), slot, rec.indexed));
            self.timers.push(Reverse((due, slot, generation)));
            self.rec_mut(slot).flags |= FULL;
            self.mark_dirty(slot);
        }
        let n = points.len();
        self.index.insert_many(points);
        for (driver_id, claim) in claims {
            self.restore_claim(&driver_id, claim);
        }
        n
    }

    /// Drops a driver. A moved driver lives on at its new owner: its claim and status are
    /// not ended (no events), only its local state goes.
    fn drop_driver(&mut self, slot: u32, reason: GoneReason) -> Box<str> {
        let moved = reason == GoneReason::Moved;
        if let Some(c) = self.claims.remove(&slot)
            && !moved
        {
            let driver_id = self.rec(slot).id.clone();
            self.events.push(Event::ClaimEnded { driver_id, trip_id: c.trip_id, why: ClaimEnd::DriverGone });
        }
        if !moved {
            let r = self.rec(slot);
            let ev = Event::StatusChanged {
                driver_id: r.id.clone(),
                from: Some(r.effective()),
                to: None,
                lat: r.last.lat,
                lon: r.last.lon,
            };
            self.events.push(ev);
        }
        let rec = self.slots[slot as usize].take().expect("live slot");
        // From the end: a partition being forgotten is dropped last slot first.
        let list = &mut self.by_partition[rec.partition as usize];
        if let Some(i) = list.iter().rposition(|&s| s == slot) {
            list.swap_remove(i);
        }
        let h = self.hasher.hash_one(&*rec.id);
        if let Ok(e) = self.by_id.find_entry(h, |&s| s == slot) {
            e.remove();
        }
        self.free.push(slot);
        self.vtype_ref(rec.vtype, -1);
        self.index.remove(rec.key(), slot, rec.indexed);
        self.deleted.push(rec.id.clone());
        if let Some(key) = rec.cab {
            self.events.push(Event::IndexUnset { kind: IndexKind::Cab, key, driver_id: rec.id.clone() });
        }
        if let Some(key) = rec.session {
            self.events.push(Event::IndexUnset { kind: IndexKind::Session, key, driver_id: rec.id.clone() });
        }
        self.events.push(Event::Gone { slot, reason });
        // Timers of removed drivers stay in the heap until due; under heavy churn, sweep
        // them out so the heap stays proportional to the live drivers.
        if self.timers.len() > 2 * self.by_id.len() + 1024 {
            let slots = &self.slots;
            self.timers.retain(|Reverse((_, s, g))| {
                slots.get(*s as usize).and_then(Option::as_ref).is_some_and(|r| r.generation == *g)
            });
        }
        rec.id
    }

    /// Fires every expiry timer due at `now_ms`: expires silent drivers and reschedules
    /// the timers of drivers that sent fixes since. (A driver's due time is a function of
    /// its persisted `received_ms`, so timers survive restarts with the driver log.)
    pub fn fire_timers(&mut self, now_ms: i64) {
        while let Some(&Reverse((due, slot, generation))) = self.offers.peek() {
            if due > now_ms {
                break;
            }
            self.offers.pop();
            if self.slot_frozen(slot) {
                self.held.push((true, due, slot, generation));
                continue;
            }
            let live =
                self.slots.get(slot as usize).and_then(Option::as_ref).is_some_and(|r| r.generation == generation);
            if live && self.claims.get(&slot).is_some_and(|c| c.offer_due_ms == Some(due)) {
                self.end_claim(slot, ClaimEnd::OfferTimeout);
            }
        }
        if !self.orphans.is_empty() {
            self.lapse_orphan_offers(now_ms);
        }
        while let Some(&Reverse((due, slot, generation))) = self.timers.peek() {
            if due > now_ms {
                break;
            }
            self.timers.pop();
            let Some(rec) = self.slots.get(slot as usize).and_then(Option::as_ref) else { continue };
            if rec.generation != generation {
                continue;
            }
            if self.slot_frozen(slot) {
                self.held.push((false, due, slot, generation));
                continue;
            }
            let real_due = rec.received_ms + self.cfg.ttl_ms;
            if real_due <= now_ms {
                self.counters.expired += 1;
                self.drop_driver(slot, GoneReason::Expired);
            } else {
                self.timers.push(Reverse((real_due, slot, generation)));
            }
        }
    }

    /// When the next expiry timer is due, if any.
    pub fn next_timer_ms(&self) -> Option<i64> {
        self.timers.peek().map(|Reverse((due, _, _))| *due)
    }

    fn filter(&self, statuses: u32, vehicle_type: &Option<String>) -> Option<QueryFilter> {
        let vtype = match vehicle_type {
            None => None,
            // A type this shard has never seen matches nothing here.
            Some(name) => Some(self.vtype_id(name)?),
        };
        Some(QueryFilter { statuses, vtype })
    }

    fn hit(&self, slot: u32, distance_m: f64) -> NearbyHit {
        let r = self.rec(slot);
        NearbyHit {
            driver_id: r.id.to_string(),
            pos: r.last,
            distance_m,
            status: r.effective(),
            vehicle_type: self.vtype_name(r.vtype).to_string(),
        }
    }

    fn pos_of<'a>(&'a self) -> impl Fn(u32) -> Candidate<'a> + 'a {
        |s| {
            let r = self.rec(s);
            Candidate { lat: r.last.lat, lon: r.last.lon, id: &r.id, vtype: r.vtype }
        }
    }

    /// This shard's k nearest drivers, nearest first (ties by id).
    pub fn nearby(&self, q: &NearbyQuery) -> Vec<NearbyHit> {
        let Some(filter) = self.filter(q.statuses, &q.vehicle_type) else { return Vec::new() };
        self.index
            .nearest(q.lat, q.lon, q.limit, q.radius_m, filter, self.pos_of())
            .into_iter()
            .map(|h| self.hit(h.slot, h.distance_m))
            .collect()
    }

    /// This shard's drivers inside an area, nearest to its centre first, at most
    /// `limit + 1` of them (so the caller can tell the answer was truncated).
    pub fn within(&self, q: &WithinQuery) -> Vec<NearbyHit> {
        match q {
            WithinQuery::Circle { lat, lon, radius_m, limit, statuses, vehicle_type } => {
                let Some(filter) = self.filter(*statuses, vehicle_type) else { return Vec::new() };
                self.index
                    .nearest(*lat, *lon, limit + 1, Some(*radius_m), filter, self.pos_of())
                    .into_iter()
                    .map(|h| self.hit(h.slot, h.distance_m))
                    .collect()
            }
            WithinQuery::Box { b, limit, statuses, vehicle_type } => {
                let Some(filter) = self.filter(*statuses, vehicle_type) else { return Vec::new() };
                let mut hits = self.index.in_box(b, filter, self.pos_of());
                let cmp = |a: &crate::geo::Hit, b: &crate::geo::Hit| {
                    a.distance_m.total_cmp(&b.distance_m).then_with(|| self.rec(a.slot).id.cmp(&self.rec(b.slot).id))
                };
                if hits.len() > limit + 1 {
                    hits.select_nth_unstable_by(*limit, cmp);
                    hits.truncate(limit + 1);
                }
                hits.sort_unstable_by(cmp);
                hits.into_iter().map(|h| self.hit(h.slot, h.distance_m)).collect()
            }
        }
    }

    /// The live map's view of this shard: drivers per grid cell and status over the box,
    /// and their points while at most `points_max` are in it. A small box is answered
    /// through the R-tree (stopping once there are too many points); a large one by one
    /// pass over the slots, which costs the same however the drivers are spread.
    pub fn map(&self, q: &crate::drivers::map::MapQuery) -> crate::drivers::map::MapSlice {
        use crate::drivers::map::{MapPoint, MapSlice, status_index};
        let mut out = MapSlice::empty(q);
        out.drivers = self.len() as u64;
        out.accepted = self.counters.accepted;
        let cap = q.points_max as usize;
        let mut slots = Vec::new();
        let few = self.index.visit_box(&q.b, self.pos_of(), |s| {
            slots.push(s);
            slots.len() <= cap
        });
        if few {
            for s in slots {
                let r = self.rec(s);
                let st = r.effective();
                out.cells[q.cell_of(r.last.lat, r.last.lon)][status_index(st)] += 1;
                out.points.push(MapPoint {
                    driver_id: r.id.to_string(),
                    lat: r.last.lat,
                    lon: r.last.lon,
                    status: st,
                    heading_deg: r.last.heading_deg as f32,
                });
            }
        } else {
            out.points_truncated = true;
            for r in self.slots.iter().flatten() {
                if q.b.contains(r.last.lat, r.last.lon) {
                    out.cells[q.cell_of(r.last.lat, r.last.lon)][status_index(r.effective())] += 1;
                }
            }
        }
        out.in_box = out.cells.iter().map(|c| c.iter().map(|&n| n as u64).sum::<u64>()).sum();
        out
    }

    /// Starts or stops telling the shell about a driver's accepted fixes.
    pub fn set_watched(&mut self, slot: u32, on: bool) {
        if let Some(r) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) {
            if on { r.flags |= WATCHED } else { r.flags &= !WATCHED }
        }
    }

    /// The slot of a live driver.
    pub fn slot_of(&self, driver_id: &str) -> Option<u32> {
        self.find(driver_id)
    }

    /// Takes the effects produced since the last call.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    /// Whether anything waits to be persisted.
    pub fn has_pending_writes(&self) -> bool {
        !self.history.is_empty()
            || !self.deleted.is_empty()
            || !self.dirty.is_empty()
            || self.sweep.is_some()
            || !self.resync.is_empty()
    }

    /// Starts a compaction sweep: over the next commits every live driver gets a full
    /// record, after which older log segments are no longer needed.
    pub fn start_sweep(&mut self, epoch: u64) {
        self.sweep = Some((epoch, 0));
    }

    /// Appends every pending write to `out`, and marks the next chunk of a sweep.
    pub fn take_writes(&mut self, out: &mut PersistBatch) {
        self.take_writes_some(out, usize::MAX);
    }

    /// [`take_writes`](Self::take_writes), encoding at most `limit` changed drivers; the
    /// rest stay pending, oldest first. A resync or an install marks tens of thousands of
    /// drivers at once: encoded in one go they would hold the shard (and every query
    /// queued on it) for tens of milliseconds.
    pub fn take_writes_some(&mut self, out: &mut PersistBatch, limit: usize) {
        out.resync.append(&mut self.resync);
        out.history.extend_from_slice(&self.history);
        self.history.clear();
        out.history_parts.union_with(&std::mem::take(&mut self.history_parts));
        for id in self.deleted.drain(..) {
            encode_delete(&mut out.buf, &id);
            out.tag(&id);
            out.records += 1;
        }
        if let Some((epoch, from)) = self.sweep {
            let to = from.saturating_add(SWEEP_CHUNK).min(self.slots.len() as u32);
            for slot in from..to {
                if let Some(r) = self.slots[slot as usize].as_mut() {
                    r.flags |= FULL;
                    if r.flags & DIRTY == 0 {
                        r.flags |= DIRTY;
                        self.dirty.push(slot);
                    }
                }
            }
            if to as usize >= self.slots.len() {
                self.sweep = None;
                out.sweep_done = Some(epoch);
            } else {
                self.sweep = Some((epoch, to));
            }
        }
        let take = self.dirty.len().min(limit);
        // Room for the usual record up front, not grown by doubling as they are encoded.
        out.buf.reserve(take * UPSERT_BYTES_HINT);
        out.parts.reserve(take);
        for slot in self.dirty.drain(..take) {
            let Some(r) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else { continue };
            if r.flags & DIRTY == 0 {
                continue;
            }
            let delta =
                (r.flags & FULL == 0 && (r.unpersisted as usize) < u8::MAX as usize).then_some(r.unpersisted as usize);
            r.flags &= !(DIRTY | FULL);
            r.unpersisted = 0;
            let snap = r.snapshot(&self.vtypes);
            encode_upsert(&mut out.buf, &r.id, &snap, delta);
            out.tag_in(r.partition);
            out.records += 1;
        }
    }

    /// Refuses keyed writes to `parts` and holds their timers (as while they move), until
    /// [`thaw`](Self::thaw) or [`forget`](Self::forget).
    pub fn hold(&mut self, parts: &HashSet<u16>) {
        self.frozen.extend(parts.iter());
    }

    /// Live drivers per partition (for `admin partitions`).
    pub fn partition_counts(&self) -> HashMap<u16, u32> {
        (0..crate::keys::PARTITIONS)
            .zip(self.by_partition.iter().map(|l| l.len() as u32))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Re-sends `parts` to their replicas: every driver of them gets a full record in the
    /// next [`take_writes`](Self::take_writes), which also names the partitions (so a
    /// replica replaces its copy, including drivers it holds that are gone here).
    pub fn resync(&mut self, parts: &HashSet<u16>) {
        for slot in self.slots_in(parts) {
            self.rec_mut(slot).flags |= FULL;
            self.mark_dirty(slot);
        }
        self.resync.extend(parts.iter().copied());
    }

    /// Adds a driver read back from the log (its geo index entry and expiry timer come
    /// with [`finish_restore`](Self::finish_restore)). A duplicate id is ignored.
    pub fn restore_driver(&mut self, s: Snapshot) -> Option<u32> {
        if self.find(&s.driver_id).is_some() {
            return None;
        }
        let vtype = self.intern_vtype(&s.vehicle_type, false).unwrap_or(0);
        self.next_gen = self.next_gen.wrapping_add(1);
        let rec = Rec {
            partition: partition_of(s.driver_id.as_bytes()),
            id: s.driver_id.into_boxed_str(),
            generation: self.next_gen,
            flags: 0,
            unpersisted: 0,
            status: s.status,
            vtype,
            indexed: index_point(s.last.lat, s.last.lon),
            last: s.last,
            received_ms: s.received_ms,
            trip_cost: s.trip_cost,
            cab: non_empty(s.cab),
            session: non_empty(s.session),
            trip_id: non_empty(s.trip_id),
            trail: s.trail,
        };
        let slot = self.alloc_slot(rec);
        self.adopt_orphan(slot);
        self.vtype_ref(vtype, 1);
        self.index_changed(slot, IndexKind::Cab, None);
        self.index_changed(slot, IndexKind::Session, None);
        Some(slot)
    }

    /// Schedules the expiry of every restored driver (overdue ones fire on the next
    /// `fire_timers`) and bulk-loads the geo index.
    pub fn finish_restore(&mut self) {
        let ttl = self.cfg.ttl_ms;
        let mut points = Vec::with_capacity(self.by_id.len());
        for slot in 0..self.slots.len() as u32 {
            let Some(rec) = self.slots[slot as usize].as_ref() else { continue };
            self.timers.push(Reverse((rec.received_ms + ttl, slot, rec.generation)));
            points.push((rec.key(), slot, rec.indexed));
        }
        self.index.bulk_load(points);
    }

    /// The geo index, for tests and metrics.
    pub fn indexed_points(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
mod tests;
