//! Trips on their owner node: one actor (a tokio task) per live trip.
//!
//! - [`model`]: the pure state machine (transitions, route, distance, fare).
//! - [`actor`]: the actor loop: one message at a time, the TTL timer, persistence,
//!   watchers, share-link rendering, state-change events.
//! - [`share`]: share tokens, the table `GET /share/{token}` reads, the rate limiter.
//! - [`board`]: a sketch of every live trip, kept by its actor, for the live map.
//!
//! The [`Trips`] registry maps a trip id to its actor's mailbox. Trips are persisted in
//! the node's record store (set `trips`, keyed by partition then trip id, one record per trip, written
//! and flushed on every event, and at most every few seconds while a driver moves). A
//! trip's expiry is part of its record, so its TTL timer moves with it: when this node
//! starts serving a partition (hand-off or adoption, see `handoff`), [`Trips::start`]
//! spawns its stored trips and an overdue one expires at once. When the partition moves
//! away, [`Trips::export`] stops its actors (each saves and ends its watchers with
//! `moved`) and returns the records; requests for it meanwhile answer `UNAVAILABLE`.
//!
//! `Match` runs in the trip's actor too (see `dispatch`): one match at a time per trip,
//! so a trip holds at most one offer, kept in its record; a retry gets it back.
//!
//! This module speaks no gRPC: it answers with [`TripView`]s, [`ShareLink`]s and
//! [`TripError`]s; `api` turns them into protobuf and statuses, and carries fixes of
//! drivers on trips to trips owned elsewhere.
//!
//! Trip actors are tasks rather than shard workers: a trip's events are rare but some
//! wait on another node (DRIVER_ASSIGNED confirms the driver's claim on the driver's
//! owner), and a per-trip task can await that without stalling other trips.

pub mod actor;
pub mod board;
pub mod model;
pub mod share;

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::actors::TripFix;
use crate::dispatch::{DispatchError, Dispatcher, MatchAsk, Offer};
use crate::events::Bus;
use crate::keys::partition_of;
use crate::ownership::Lease;
use crate::storage::{RecordError, RecordStore, Records};
pub use actor::TripMsg;
use model::{EventKind, Trip, TripConfig, TripEvent, TripState};
use share::ShareTable;

/// A trip as answered: its state (with its route only when asked for) and the fare so
/// far.
#[derive(Clone, Debug)]
pub struct TripView {
    pub trip: Trip,
    pub fare: f64,
}

/// One update to a trip's watchers.
#[derive(Clone, Debug)]
pub struct TripUpdate {
    pub view: TripView,
    /// False for a driver position update.
    pub state_changed: bool,
}

/// Why a trip's watch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TripEnd {
    /// The trip's partition moved to another node: watch it again there.
    Moved,
    Expired,
}

/// What a watcher receives.
pub type WatchItem = Result<TripUpdate, TripEnd>;

/// A trip's share link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareLink {
    pub token: String,
    pub url: String,
    pub expires_ms: i64,
}

/// A match's answer: the trip's offer, how many claims it took (0 for `existing`), and
/// whether it was already pending (a retry: nobody new was claimed).
#[derive(Clone, Debug, PartialEq)]
pub struct Matched {
    pub offer: Offer,
    pub attempts: u32,
    pub existing: bool,
}

/// Why a trip request did not run.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TripError {
    #[error("trip not found (never booked, or expired)")]
    NotFound,
    #[error("the trip's partition is moving to another node; retry")]
    Moving,
    #[error("the trip's mailbox is full; retry later")]
    Busy,
    /// The event does not follow the trip's state.
    #[error("{message}; the trip is {}", state.name())]
    Transition { state: TripState, message: String },
    #[error("{0}")]
    Storage(String),
    /// Written here, but this node may no longer own the trip (`UNAVAILABLE`).
    #[error("{0}")]
    Unconfirmed(crate::replica::Unconfirmed),
    /// DRIVER_ASSIGNED: the driver's owner refused or could not be reached.
    #[error("{0}")]
    Driver(DispatchError),
}

/// Everything trip actors need, shared.
pub struct Trips {
    actors: Mutex<HashMap<Box<str>, mpsc::Sender<TripMsg>>>,
    /// Per partition: [`NOT_HERE`], [`SERVED`] or [`FROZEN`].
    parts: Vec<AtomicU8>,
    pub shares: ShareTable,
    /// Sketches of the live trips for the live map.
    pub board: board::Board,
    /// Trip records (keyed by partition) and the store they are flushed in.
    pub(crate) records: Arc<dyn Records>,
    pub(crate) store: Arc<dyn RecordStore>,
    pub cfg: TripConfig,
    /// Base of share URLs, e.g. `http://127.0.0.1:7480`.
    pub public_url: String,
    pub(crate) bus: Bus,
    pub(crate) dispatch: Arc<Dispatcher>,
    pub(crate) watch_queue: usize,
    pub(crate) replicator: Arc<crate::replica::Replicator>,
    /// The quorum lease: a trip expires only while it holds.
    pub(crate) lease: Arc<Lease>,
    /// Where trip state changes go to be kept with the history (replayable events).
    pub(crate) history: std::sync::OnceLock<Arc<crate::actors::HistorySink>>,
}

const NOT_HERE: u8 = 0;
const SERVED: u8 = 1;
const FROZEN: u8 = 2;

/// Messages one trip actor's mailbox holds.
const TRIP_MAILBOX: usize = 64;

impl Trips {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn RecordStore>,
        cfg: TripConfig,
        public_url: String,
        bus: Bus,
        dispatch: Arc<Dispatcher>,
        watch_queue: usize,
        replicator: Arc<crate::replica::Replicator>,
        lease: Arc<Lease>,
    ) -> Result<Arc<Trips>, RecordError> {
        let records = store.records("trips")?;
        Ok(Arc::new(Trips {
            actors: Mutex::new(HashMap::new()),
            parts: (0..crate::keys::PARTITIONS).map(|_| AtomicU8::new(NOT_HERE)).collect(),
            shares: ShareTable::default(),
            board: board::Board::default(),
            records,
            store,
            cfg,
            public_url,
            bus,
            dispatch,
            watch_queue,
            replicator,
            lease,
            history: std::sync::OnceLock::new(),
        }))
    }

    /// Keeps trip state changes with the history, through `sink`.
    pub fn set_history(&self, sink: Arc<crate::actors::HistorySink>) {
        let _ = self.history.set(sink);
    }

    /// Hands the last trip state changes to the persister and lets it stop (shutdown).
    pub async fn close_history(&self) {
        if let Some(h) = self.history.get() {
            h.close().await;
        }
    }

    /// Returns once every trip state change so far is in the history store (a hand-off
    /// reads a partition's history after this).
    pub async fn history_barrier(&self) {
        if let Some(h) = self.history.get() {
            h.barrier().await;
        }
    }

    /// Live trip actors per partition (for `admin partitions`).
    pub fn counts(&self) -> HashMap<u16, u32> {
        let mut m = HashMap::new();
        for id in self.actors.lock().expect("trips lock").keys() {
            *m.entry(partition_of(id.as_bytes())).or_insert(0) += 1;
        }
        m
    }

    fn part(&self, trip_id: &str) -> u8 {
        self.parts[partition_of(trip_id.as_bytes()) as usize].load(Ordering::Acquire)
    }

    /// Why a trip has no actor here: it is moving (retry) or it does not exist.
    fn gone(&self, trip_id: &str) -> TripError {
        match self.part(trip_id) {
            SERVED => TripError::NotFound,
            _ => TripError::Moving,
        }
    }

    /// Starts serving partition `p`: spawns every stored trip of it (overdue ones expire
    /// at once). Its records must be in the store already.
    pub fn start(self: &Arc<Self>, p: u16) -> usize {
        let mut n = 0;
        for (_, v) in self.records.scan_or_log(p) {
            let trip = match Trip::decode(&v) {
                Ok(t) => t,
                Err(e) => {
                    warn!(error = %e, "skipping an unreadable trip record");
                    continue;
                }
            };
            let id: Box<str> = trip.trip_id.as_str().into();
            let tx = self.spawn(Some(trip));
            self.actors.lock().expect("trips lock").insert(id, tx);
            n += 1;
        }
        self.parts[p as usize].store(SERVED, Ordering::Release);
        n
    }

    /// Hand-off, holder side: freezes the partitions (requests answer `UNAVAILABLE`),
    /// stops their actors (each saves its trip) and returns their stored records as
    /// (trip id, record) pairs per partition.
    pub async fn export(&self, parts: &HashSet<u16>) -> HashMap<u16, Vec<(Vec<u8>, Vec<u8>)>> {
        for p in parts {
            self.parts[*p as usize].store(FROZEN, Ordering::Release);
        }
        let stopping: Vec<mpsc::Sender<TripMsg>> = {
            let mut m = self.actors.lock().expect("trips lock");
            let ids: Vec<Box<str>> =
                m.keys().filter(|id| parts.contains(&partition_of(id.as_bytes()))).cloned().collect();
            ids.iter().filter_map(|id| m.remove(id)).collect()
        };
        for tx in stopping {
            let (reply, rx) = oneshot::channel();
            if tx.send(TripMsg::Stop(reply)).await.is_ok() {
                let _ = rx.await;
            }
        }
        parts.iter().map(|p| (*p, self.records.scan_or_log(*p))).collect()
    }

    /// Hand-off, holder side: the new owner has the partitions: delete them here.
    pub fn forget(&self, parts: &HashSet<u16>) -> Result<usize, RecordError> {
        let mut n = 0;
        for p in parts {
            self.parts[*p as usize].store(NOT_HERE, Ordering::Release);
            n += self.records.delete_partition(*p)?;
        }
        Ok(n)
    }

    /// Starts an actor (the caller registers its mailbox).
    fn spawn(self: &Arc<Self>, trip: Option<Trip>) -> mpsc::Sender<TripMsg> {
        let (tx, rx) = mpsc::channel(TRIP_MAILBOX);
        crate::tasks::spawn("trip", actor::run(self.clone(), trip, rx, tx.clone()));
        tx
    }

    fn mailbox(&self, trip_id: &str) -> Option<mpsc::Sender<TripMsg>> {
        self.actors.lock().expect("trips lock").get(trip_id).cloned()
    }

    /// Called by an actor as it ends: forget it unless a newer actor took the id.
    pub(crate) fn unregister(&self, trip_id: &str, me: &mpsc::Sender<TripMsg>) {
        let mut m = self.actors.lock().expect("trips lock");
        if m.get(trip_id).is_some_and(|tx| tx.same_channel(me)) {
            m.remove(trip_id);
        }
    }

    async fn ask<T>(&self, trip_id: &str, make: impl FnOnce(oneshot::Sender<T>) -> TripMsg) -> Result<T, TripError> {
        let tx = self.mailbox(trip_id).ok_or_else(|| self.gone(trip_id))?;
        let (reply, rx) = oneshot::channel();
        match tx.try_send(make(reply)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(TripError::Busy),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(self.gone(trip_id)),
        }
        // The actor ended (expired, or stopped as its partition moved) before answering.
        rx.await.map_err(|_| self.gone(trip_id))
    }

    /// Applies one validated event on this (the owner) node.
    pub async fn apply(self: &Arc<Self>, ev: TripEvent) -> Result<TripView, TripError> {
        let tx = {
            let mut m = self.actors.lock().expect("trips lock");
            match m.get(ev.trip_id.as_str()) {
                Some(tx) => tx.clone(),
                None if self.part(&ev.trip_id) != SERVED => return Err(self.gone(&ev.trip_id)),
                None if matches!(ev.kind, EventKind::BookingCreated { .. }) => {
                    let tx = self.spawn(None);
                    m.insert(ev.trip_id.as_str().into(), tx.clone());
                    tx
                }
                None => return Err(TripError::NotFound),
            }
        };
        let id = ev.trip_id.clone();
        let (reply, rx) = oneshot::channel();
        if tx.send(TripMsg::Apply(Box::new(ev), reply)).await.is_err() {
            return Err(self.gone(&id));
        }
        rx.await.map_err(|_| self.gone(&id))?
    }

    pub async fn get(&self, trip_id: &str, include_route: bool) -> Result<TripView, TripError> {
        self.ask(trip_id, |reply| TripMsg::Get { include_route, reply }).await
    }

    /// Matches a driver to a booked trip, or answers its pending offer.
    pub async fn offer(&self, ask: MatchAsk) -> Result<Matched, TripError> {
        let id = ask.trip_id.clone();
        self.ask(&id, |reply| TripMsg::Match(Box::new(ask), reply)).await?
    }

    /// The offered driver declined the trip: its claim is released and later matches
    /// skip it.
    pub async fn decline(&self, trip_id: &str, driver_id: &str) -> Result<(), TripError> {
        let driver_id = driver_id.to_string();
        self.ask(trip_id, |reply| TripMsg::Decline { driver_id, reply }).await?
    }

    pub async fn share(&self, trip_id: &str) -> Result<ShareLink, TripError> {
        self.ask(trip_id, TripMsg::Share).await
    }

    /// Subscribes to a trip: its current state and a stream of updates.
    pub async fn watch(&self, trip_id: &str) -> Result<(TripView, mpsc::Receiver<WatchItem>), TripError> {
        let (tx, rx) = mpsc::channel(self.watch_queue);
        let now = self.ask(trip_id, |reply| TripMsg::Watch(tx, reply)).await?;
        Ok((now, rx))
    }

    /// A fix of a driver on a trip this node owns (never waits; dropped if the trip's
    /// mailbox is full: the next fix supersedes it).
    pub fn feed(&self, f: TripFix) {
        if let Some(tx) = self.mailbox(&f.trip_id)
            && tx.try_send(TripMsg::Fix(Box::new(f))).is_err()
        {
            metrics::counter!("locus_trip_fixes_dropped_total").increment(1);
        }
    }
}
