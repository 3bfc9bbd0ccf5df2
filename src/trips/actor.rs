//! One trip's actor: handles its messages one at a time and owns its TTL timer.
//!
//! Events are persisted and flushed before they are answered. Driver fixes change the
//! trip in memory and are saved at most every [`SAVE_EVERY`] (a restart loses at most
//! that much of the route, never a state). When the trip's expiry passes, the actor frees
//! a driver still on it, deletes the trip and its share link, publishes `EXPIRED`, ends
//! its watchers and exits.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, warn};

use super::model::{Applied, ApplyError, EventKind, Trip, TripEvent, TripState};
use super::share::{ShareEntry, new_token};
use super::{Matched, ShareLink, TripEnd, TripError, TripUpdate, TripView, Trips, WatchItem};
use crate::actors::TripFix;
use crate::clock::wall_ms;
use crate::dispatch::{DispatchError, MatchAsk};
use crate::events::{Entity, StateChange};
use crate::replica::KvTree;

/// How often a due trip looks at the quorum lease again while it does not hold.
const LEASE_RECHECK: Duration = Duration::from_millis(100);

/// How often a trip changed only by driver fixes is saved.
pub const SAVE_EVERY: Duration = Duration::from_secs(5);

pub enum TripMsg {
    Apply(Box<TripEvent>, oneshot::Sender<Result<TripView, TripError>>),
    Get {
        include_route: bool,
        reply: oneshot::Sender<TripView>,
    },
    Watch(mpsc::Sender<WatchItem>, oneshot::Sender<TripView>),
    Share(oneshot::Sender<ShareLink>),
    Match(Box<MatchAsk>, oneshot::Sender<Result<Matched, TripError>>),
    Decline {
        driver_id: String,
        reply: oneshot::Sender<Result<(), TripError>>,
    },
    Fix(Box<TripFix>),
    /// The trip's partition moves to another node: save, end watchers (`moved`), exit.
    Stop(oneshot::Sender<()>),
}

type Watchers = Vec<mpsc::Sender<WatchItem>>;

struct Actor {
    trips: Arc<Trips>,
    trip: Trip,
    watchers: Watchers,
    dirty: bool,
    /// When the trip's sketch on the board was last refreshed.
    shown: Instant,
}

/// The actor loop. `trip` is `None` for a trip being created: the first message is its
/// BOOKING_CREATED.
pub async fn run(trips: Arc<Trips>, trip: Option<Trip>, mut rx: mpsc::Receiver<TripMsg>, me: mpsc::Sender<TripMsg>) {
    let trip = match trip {
        Some(t) => t,
        None => match create(&trips, &mut rx).await {
            Some(t) => t,
            None => {
                trips.unregister_all(&me, &mut rx);
                return;
            }
        },
    };
    let id = trip.trip_id.clone();
    let mut a = Actor { trips, trip, watchers: Vec::new(), dirty: false, shown: Instant::now() };
    if let Some(t) = a.trip.share_token.clone() {
        a.publish_share(&t);
    }
    a.show();
    let mut save_at = Instant::now() + SAVE_EVERY;
    // Not before this: the lease did not hold when the trip was due.
    let mut recheck = Instant::now();
    loop {
        let left = (a.trip.expires_ms - wall_ms()).max(0) as u64;
        let expires = (Instant::now() + Duration::from_millis(left)).max(recheck);
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(TripMsg::Stop(reply)) => {
                    a.stop().await;
                    let _ = reply.send(());
                    break;
                }
                Some(m) => a.handle(m).await,
                None => break,
            },
            _ = sleep_until(expires) => {
                // Without the quorum lease the trip may be served elsewhere: it expires
                // there, or here once the lease holds again.
                if !a.trips.lease.holds() {
                    recheck = Instant::now() + LEASE_RECHECK;
                    continue;
                }
                a.expire().await;
                break;
            }
            _ = sleep_until(save_at), if a.dirty => {
                if let Err(e) = a.save(false).await {
                    warn!(trip = %id, error = %e, "saving the trip's route");
                }
                save_at = Instant::now() + SAVE_EVERY;
            }
        }
    }
    a.trips.unregister(&id, &me);
    // Messages that raced with the end are answered NOT_FOUND (their senders drop).
    rx.close();
}

/// Handles the creating BOOKING_CREATED; `None` if the trip could not be created.
async fn create(trips: &Arc<Trips>, rx: &mut mpsc::Receiver<TripMsg>) -> Option<Trip> {
    let Some(TripMsg::Apply(ev, reply)) = rx.recv().await else { return None };
    let trip = match Trip::create(&ev, wall_ms(), &trips.cfg) {
        Ok(t) => t,
        Err(e) => {
            let _ = reply.send(Err(apply_error(&e)));
            return None;
        }
    };
    let mut a = Actor { trips: trips.clone(), trip, watchers: Vec::new(), dirty: true, shown: Instant::now() };
    if let Err(s) = a.save(true).await {
        let _ = reply.send(Err(s));
        return None;
    }
    a.publish(None);
    let _ = reply.send(Ok(a.view(false)));
    Some(a.trip)
}

impl Trips {
    /// A trip that was never created: forget its registration.
    fn unregister_all(&self, me: &mpsc::Sender<TripMsg>, rx: &mut mpsc::Receiver<TripMsg>) {
        rx.close();
        let mut m = self.actors.lock().expect("trips lock");
        m.retain(|_, tx| !tx.same_channel(me));
    }
}

fn apply_error(e: &ApplyError) -> TripError {
    match e {
        ApplyError::NotFound => TripError::NotFound,
        ApplyError::Invalid { state, .. } => TripError::Transition { state: *state, message: e.to_string() },
    }
}

impl Actor {
    /// The trip as answered: without its route unless asked (the route can be long).
    fn view(&mut self, include_route: bool) -> TripView {
        let trip = if include_route {
            self.trip.clone()
        } else {
            let route = std::mem::take(&mut self.trip.route);
            let t = self.trip.clone();
            self.trip.route = route;
            t
        };
        TripView { fare: trip.fare(wall_ms(), &self.trips.cfg), trip }
    }

    async fn handle(&mut self, msg: TripMsg) {
        match msg {
            TripMsg::Apply(ev, reply) => {
                let r = self.apply(&ev).await;
                let _ = reply.send(r);
            }
            TripMsg::Get { include_route, reply } => {
                let _ = reply.send(self.view(include_route));
            }
            TripMsg::Watch(tx, reply) => {
                let _ = reply.send(self.view(false));
                self.watchers.push(tx);
            }
            TripMsg::Share(reply) => {
                let token = match &self.trip.share_token {
                    Some(t) => t.clone(),
                    None => {
                        let t = new_token(&self.trip.trip_id);
                        self.trip.share_token = Some(t.clone());
                        self.trip.version += 1;
                        if let Err(e) = self.save(true).await {
                            warn!(trip = %self.trip.trip_id, error = %e, "share token not persisted");
                        }
                        t
                    }
                };
                self.publish_share(&token);
                let url = format!("{}/share/{token}/view", self.trips.public_url);
                let _ = reply.send(ShareLink { token, url, expires_ms: self.trip.expires_ms });
            }
            TripMsg::Match(ask, reply) => {
                let r = self.offer(&ask).await;
                let _ = reply.send(r);
            }
            TripMsg::Decline { driver_id, reply } => {
                let r = self.decline(&driver_id).await;
                let _ = reply.send(r);
            }
            TripMsg::Stop(reply) => {
                let _ = reply.send(());
            }
            TripMsg::Fix(f) => {
                let out = self.trip.on_fix(&f.driver_id, f.pos, &self.trips.cfg);
                if !out.taken {
                    return;
                }
                self.dirty = true;
                if out.near_pickup {
                    self.event("DRIVER_NEAR_PICKUP", self.trip.state.name());
                }
                self.notify(false);
                if let Some(t) = self.trip.share_token.clone() {
                    self.publish_share(&t);
                }
                if self.shown.elapsed() >= super::board::REFRESH {
                    self.show();
                }
            }
        }
    }

    /// Refreshes the trip's sketch on the live map's board.
    fn show(&mut self) {
        self.trips.board.show(&self.trip);
        self.shown = Instant::now();
    }

    async fn apply(&mut self, ev: &TripEvent) -> Result<TripView, TripError> {
        let from = match self.trip.check(ev).map_err(|e| apply_error(&e))? {
            Applied::Duplicate => {
                // A retry of an event whose first answer was lost or unconfirmed: it is
                // answered only once the replicas have the trip too.
                self.synced().await?;
                return Ok(self.view(false));
            }
            Applied::Changed { from } => from,
        };
        if let EventKind::DriverAssigned { driver_id, .. } = &ev.kind {
            // The driver's owner confirms (or takes) the claim first: a driver is never
            // on two trips.
            self.trips.dispatch.confirm(driver_id, &self.trip.trip_id).await.map_err(TripError::Driver)?;
        }
        let now = wall_ms();
        self.trip.apply(ev, now, &self.trips.cfg).map_err(|e| apply_error(&e))?;
        if let Some(o) = self.trip.settle_offer() {
            // Assigned to someone else, or cancelled: the offered driver goes free now
            // (before the save: a retry of this event would find it applied).
            self.release(&o.driver_id);
        }
        self.dirty = true;
        self.save(true).await?;
        self.publish(from);
        self.notify(true);
        if let Some(t) = self.trip.share_token.clone() {
            self.publish_share(&t);
        }
        self.show();
        if self.trip.state.is_final() && !self.trip.driver_id.is_empty() {
            self.release_driver();
        }
        Ok(self.view(false))
    }

    /// A match: the pending offer if there is one (a retry), else the nearest free
    /// driver claimed, recorded with the trip before the answer.
    async fn offer(&mut self, ask: &MatchAsk) -> Result<Matched, TripError> {
        let state = self.trip.state;
        if state != TripState::Booked {
            let message = if state.has_driver() {
                format!("the trip has its driver {:?}; Match needs a BOOKED trip", self.trip.driver_id)
            } else {
                "Match needs a BOOKED trip".to_string()
            };
            return Err(TripError::Transition { state, message });
        }
        if let Some(o) = self.trip.pending_offer(wall_ms()).cloned() {
            // A retry (or a second dispatcher): the same offer, answered once the
            // replicas have it.
            self.synced().await?;
            return Ok(Matched { offer: o, attempts: 0, existing: true });
        }
        let found = self.trips.dispatch.find(ask, &self.trip.dispatching.declined).await.map_err(TripError::Driver)?;
        let lapsed = self.trip.dispatching.offer.replace(found.offer.clone());
        if let Some(o) = lapsed.filter(|o| o.driver_id != found.offer.driver_id) {
            // Lapsed on the driver's owner already; a no-op unless it was just about to.
            self.release(&o.driver_id);
        }
        self.dirty = true;
        if let Err(e) = self.save(true).await {
            if matches!(e, TripError::Storage(_)) {
                // Not kept: free the driver rather than hold it for nothing.
                self.trip.dispatching.offer = None;
                self.release(&found.offer.driver_id);
            }
            // Unconfirmed: kept here; a retry answers it once the replicas have it.
            return Err(e);
        }
        Ok(Matched { offer: found.offer, attempts: found.attempts, existing: false })
    }

    async fn decline(&mut self, driver_id: &str) -> Result<(), TripError> {
        let state = self.trip.state;
        match self.trip.decline(driver_id) {
            Ok(Some(o)) => {
                // Freed whatever the save says: a retry finds the decline done and would
                // not free it.
                self.release(&o.driver_id);
                self.save(true).await
            }
            // Declined before: answered once the replicas have it.
            Ok(None) => self.synced().await,
            Err(e) => Err(TripError::Transition { state, message: e.to_string() }),
        }
    }

    /// Hands the trip over: saves it, ends its watchers (they resubscribe through any
    /// node and get the new owner) and forgets its share link here.
    async fn stop(&mut self) {
        if let Err(e) = self.save(true).await {
            warn!(trip = %self.trip.trip_id, error = %e, "saving a trip before it moves");
        }
        self.trips.board.remove(&self.trip.trip_id);
        for w in self.watchers.drain(..) {
            let _ = w.try_send(Err(TripEnd::Moved));
        }
        if let Some(t) = &self.trip.share_token {
            self.trips.shares.remove(t);
        }
    }

    /// Writes the trip (and waits for the disk when `durable`).
    async fn save(&mut self, durable: bool) -> Result<(), TripError> {
        let bytes = self.trip.encode().map_err(|e| TripError::Storage(format!("encoding the trip: {e}")))?;
        self.trips
            .records
            .put_keyed(self.trip.trip_id.as_bytes(), &bytes)
            .map_err(|e| TripError::Storage(format!("storing the trip: {e}")))?;
        if durable {
            self.trips.store.flush().await.map_err(|e| TripError::Storage(format!("flushing the trip: {e}")))?;
        }
        self.dirty = false;
        // On the replicas before the caller hears of it (the TTL is in the record).
        self.synced().await
    }

    /// Waits until the trip's stored record is on its replicas (a retry's answer waits
    /// for this too: its first answer may have been unconfirmed).
    async fn synced(&self) -> Result<(), TripError> {
        self.trips.replicator.sync_kv(KvTree::Trips, self.trip.trip_id.as_bytes()).await.map_err(TripError::Unconfirmed)
    }

    fn position(&self) -> (f64, f64) {
        match self.trip.driver_pos {
            Some(p) => (p.lat, p.lon),
            None => (self.trip.pickup.lat, self.trip.pickup.lon),
        }
    }

    fn event(&self, state: &'static str, from: &'static str) {
        let (lat, lon) = self.position();
        if let Some(h) = self.trips.history.get() {
            let p = crate::keys::partition_of(self.trip.trip_id.as_bytes());
            let mut raw = Vec::with_capacity(64);
            let e = crate::history::RawEvent {
                partition: p,
                entity: 2,
                id: &self.trip.trip_id,
                state,
                from_state: from,
                timestamp_ms: wall_ms(),
                lat_e7: (lat * 1e7).round() as i32,
                lon_e7: (lon * 1e7).round() as i32,
            };
            crate::history::codec::push_raw_event(&mut raw, &e);
            h.log(raw, p);
        }
        let _ = self.trips.bus.send(StateChange {
            entity: Entity::Trip,
            id: self.trip.trip_id.clone(),
            state,
            from_state: from,
            timestamp_ms: wall_ms(),
            lat,
            lon,
        });
    }

    fn publish(&self, from: Option<TripState>) {
        self.event(self.trip.state.name(), from.map_or("", TripState::name));
    }

    fn notify(&mut self, state_changed: bool) {
        if self.watchers.is_empty() {
            return;
        }
        let u = TripUpdate { view: self.view(false), state_changed };
        self.watchers.retain(|w| match w.try_send(Ok(u.clone())) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("locus_trip_watchers_lagged_total").increment(1);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    /// Renders the public JSON (or none, before PASSENGER_CARRY) into the share table.
    fn publish_share(&self, token: &str) {
        let t = &self.trip;
        let json = t.shareable(wall_ms()).then(|| {
            let route: Vec<_> =
                t.route.iter().map(|p| serde_json::json!({"lat": p.lat, "lon": p.lon, "t": p.timestamp_ms})).collect();
            let body = serde_json::json!({
                "status": t.state.name(),
                "vehicle": {
                    "cab_number": t.vehicle.cab_number, "model": t.vehicle.model,
                    "colour": t.vehicle.colour, "plate": t.vehicle.plate,
                },
                "driver": t.driver_pos.map(|p| serde_json::json!({
                    "lat": p.lat, "lon": p.lon, "heading_deg": p.heading_deg,
                    "speed_mps": p.speed_mps, "timestamp_ms": p.timestamp_ms,
                })),
                "dropoff": {"lat": t.dropoff.lat, "lon": t.dropoff.lon},
                "route": route,
                "distance_m": (t.distance_m * 10.0).round() / 10.0,
                "times": {
                    "assigned_ms": t.assigned_ms, "arrived_ms": t.arrived_ms,
                    "carry_ms": t.carry_ms, "dropped_ms": t.dropped_ms,
                    "estimated_drive_s": t.estimated_drive_s, "expires_ms": t.expires_ms,
                },
                "version": t.version,
            });
            axum::body::Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
        });
        self.trips.shares.set(token, ShareEntry { json, expires_ms: t.expires_ms });
    }

    /// Frees the trip's driver in the background.
    fn release_driver(&self) {
        self.release(&self.trip.driver_id);
    }

    /// Frees a driver claimed for this trip in the background (retrying while its owner
    /// is unreachable; a no-op if the driver is no longer claimed for it).
    fn release(&self, driver_id: &str) {
        let (dispatch, driver, trip) = (self.trips.dispatch.clone(), driver_id.to_string(), self.trip.trip_id.clone());
        crate::tasks::spawn("release_driver", async move {
            let mut backoff = Duration::from_millis(100);
            for _ in 0..10 {
                match dispatch.release(&driver, &trip).await {
                    Ok(()) => return,
                    Err(DispatchError::NotFound(_)) => return,
                    Err(e) => debug!(driver = %driver, trip = %trip, error = %e, "release failed; retrying"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            warn!(driver = %driver, trip = %trip, "could not free the driver");
        });
    }

    async fn expire(&mut self) {
        debug!(trip = %self.trip.trip_id, state = self.trip.state.name(), "trip expired");
        metrics::counter!("locus_trips_expired_total").increment(1);
        self.trips.board.remove(&self.trip.trip_id);
        if self.trip.state.has_driver() {
            self.release_driver();
        }
        if let Some(o) = self.trip.dispatching.offer.take() {
            self.release(&o.driver_id);
        }
        if let Some(t) = &self.trip.share_token {
            self.trips.shares.remove(t);
        }
        if let Err(e) = self.trips.records.delete_keyed(self.trip.trip_id.as_bytes()) {
            warn!(trip = %self.trip.trip_id, error = %e, "cannot delete an expired trip");
        }
        // The replicas forget it too, so a promoted copy does not expire it again.
        if let Err(e) = self.trips.replicator.sync_kv(KvTree::Trips, self.trip.trip_id.as_bytes()).await {
            // It expires again wherever a copy of it is served (a trip expires once
            // per copy at most, and only where the lease holds).
            debug!(trip = %self.trip.trip_id, error = %e, "expiry not confirmed");
        }
        self.event("EXPIRED", self.trip.state.name());
        for w in self.watchers.drain(..) {
            let _ = w.try_send(Err(TripEnd::Expired));
        }
    }
}
