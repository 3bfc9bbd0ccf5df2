//! `locus.v1.Trips`, `Dispatch`, `Events` and the node-to-node `Internal` service.
//!
//! Trip RPCs run on the trip's owner (forwarded like driver RPCs). So do `Match` and
//! `Decline`, in the trip's actor: a scatter-gather Nearby for AVAILABLE drivers
//! ([`NearbyCandidates`]), then claims in distance order on each candidate's owner until
//! one succeeds, recorded as the trip's one offer. `Subscribe` merges this node's
//! state-change bus with a local-scope subscription to every other ring member, and
//! follows the ring as it changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::debug;

use super::follow::{Opening, Resume, follow};
use super::locations::{BoxStream, Target, forward, forwarded, target};
use super::{END_KEY, check_coord, check_key_str, invalid, position_from_proto, with_meta};
use crate::actors::TripFix;
use crate::clock::wall_ms;
use crate::dispatch::{
    Candidates, ClaimAnswer, ClaimCall, ClaimLink, ClaimOp, DispatchError, Dispatcher, MatchAsk, Pending,
};
use crate::drivers::{FieldError, MAX_VEHICLE_TYPE_BYTES, check_range, check_str};
use crate::events::{Bus, Entity, Filter, StateChange};
use crate::ownership::Route;
use crate::pb;
use crate::pb::dispatch_client::DispatchClient;
use crate::pb::events_client::EventsClient;
use crate::pb::locations_server::Locations;
use crate::pb::trips_client::TripsClient;
use crate::routing::cluster::{Cluster, hops, is_local_scope, set_local_scope};
use crate::trips::model::{EventKind, LatLon, TripEvent, TripState, Vehicle};
use crate::trips::{ShareLink, TripEnd, TripError, TripUpdate, TripView, Trips};

/// Longest estimated drive time a booking may carry.
const MAX_DRIVE_S: u32 = 86_400;
/// Most candidates a Match may try, and its default.
const MAX_CANDIDATES: u32 = 50;
const DEFAULT_CANDIDATES: u32 = 10;
/// Largest Match radius, metres.
const MAX_MATCH_RADIUS_M: f64 = 50_000.0;

fn point(field: &'static str, p: Option<pb::Point>) -> Result<LatLon, FieldError> {
    let p = p.ok_or_else(|| FieldError::new(field, "required"))?;
    let (lat_f, lon_f) = match field {
        "pickup" => ("pickup.lat", "pickup.lon"),
        _ => ("dropoff.lat", "dropoff.lon"),
    };
    check_coord(lat_f, p.lat, lon_f, p.lon)?;
    Ok(LatLon { lat: p.lat, lon: p.lon })
}

/// Validates one booking event.
pub fn trip_event(e: pb::TripEvent) -> Result<TripEvent, FieldError> {
    check_key_str("trip_id", &e.trip_id)?;
    check_key_str("event_id", &e.event_id)?;
    let kind = match pb::TripEventType::try_from(e.r#type) {
        Ok(pb::TripEventType::BookingCreated) => {
            if e.estimated_drive_s == 0 || e.estimated_drive_s > MAX_DRIVE_S {
                return Err(FieldError::new("estimated_drive_s", format!("must be 1 to {MAX_DRIVE_S} seconds")));
            }
            EventKind::BookingCreated {
                pickup: point("pickup", e.pickup)?,
                dropoff: point("dropoff", e.dropoff)?,
                estimated_drive_s: e.estimated_drive_s,
            }
        }
        Ok(pb::TripEventType::DriverAssigned) => {
            check_key_str("driver_id", &e.driver_id)?;
            let v = e.vehicle.unwrap_or_default();
            for (f, s) in [
                ("vehicle.cab_number", &v.cab_number),
                ("vehicle.model", &v.model),
                ("vehicle.colour", &v.colour),
                ("vehicle.plate", &v.plate),
            ] {
                check_str(f, s, false, 64)?;
            }
            EventKind::DriverAssigned {
                driver_id: e.driver_id,
                vehicle: Vehicle { cab_number: v.cab_number, model: v.model, colour: v.colour, plate: v.plate },
            }
        }
        Ok(pb::TripEventType::DriverArrived) => EventKind::DriverArrived,
        Ok(pb::TripEventType::PassengerCarry) => EventKind::PassengerCarry,
        Ok(pb::TripEventType::PassengerDropped) => EventKind::PassengerDropped,
        Ok(pb::TripEventType::Cancelled) => EventKind::Cancelled,
        _ => return Err(FieldError::new("type", format!("unknown or unspecified event type {}", e.r#type))),
    };
    Ok(TripEvent { trip_id: e.trip_id, event_id: e.event_id, kind })
}

/// The `locus.v1.Trips` service.
#[derive(Clone)]
pub struct TripsApi {
    trips: Arc<Trips>,
    cluster: Arc<Cluster>,
    shutdown: watch::Receiver<bool>,
    /// Watches clients hold open on this node (`--max-watches`, shared with drivers).
    watches: Arc<crate::limits::Slots>,
}

impl TripsApi {
    pub fn new(trips: Arc<Trips>, cluster: Arc<Cluster>, shutdown: watch::Receiver<bool>) -> Self {
        let watches = crate::limits::Slots::new("watches", "--max-watches", usize::MAX);
        TripsApi { trips, cluster, shutdown, watches }
    }

    /// Counts client watches against `slots`.
    pub fn with_watch_slots(mut self, slots: Arc<crate::limits::Slots>) -> Self {
        self.watches = slots;
        self
    }

    fn client(p: &crate::routing::cluster::Peer) -> TripsClient<crate::auth::layer::AuthChannel> {
        TripsClient::new(p.channel.clone())
    }
}

#[tonic::async_trait]
impl pb::trips_server::Trips for TripsApi {
    async fn apply(&self, req: Request<pb::TripEvent>) -> Result<Response<pb::Trip>, Status> {
        let hop = hops(req.metadata());
        let r = req.into_inner();
        let ev = trip_event(r.clone()).map_err(|e| invalid(&e))?;
        match target(&self.cluster, &ev.trip_id, hop).await? {
            Target::Local => {
                metrics::counter!("locus_trip_events_total", "type" => ev.kind.name()).increment(1);
                self.trips.apply(ev).await.map(|v| Response::new(trip_proto(v))).map_err(trip_status)
            }
            Target::Forward(p, hop) => forward(&p.name, Self::client(&p).apply(forwarded(r, hop))).await,
        }
    }

    async fn get_trip(&self, req: Request<pb::GetTripRequest>) -> Result<Response<pb::Trip>, Status> {
        let hop = hops(req.metadata());
        let r = req.into_inner();
        check_key_str("trip_id", &r.trip_id).map_err(|e| invalid(&e))?;
        match target(&self.cluster, &r.trip_id, hop).await? {
            Target::Local => self
                .trips
                .get(&r.trip_id, r.include_route)
                .await
                .map(|v| Response::new(trip_proto(v)))
                .map_err(trip_status),
            Target::Forward(p, hop) => forward(&p.name, Self::client(&p).get_trip(forwarded(r, hop))).await,
        }
    }

    type WatchTripStream = BoxStream<pb::TripUpdate>;

    async fn watch_trip(&self, req: Request<pb::WatchTripRequest>) -> Result<Response<Self::WatchTripStream>, Status> {
        let hop = hops(req.metadata());
        let r = req.into_inner();
        check_key_str("trip_id", &r.trip_id).map_err(|e| invalid(&e))?;
        if hop > 0 {
            return self.open_watch(r.trip_id, hop).await.map(Response::new);
        }
        // The client's entry node follows the trip across moves (see `api::follow`).
        let slot = self.watches.take()?;
        let first = self.open_watch(r.trip_id.clone(), 0).await?;
        let f = FollowTrip { api: self.clone(), trip_id: r.trip_id, version: r.after_version, state: None };
        Ok(Response::new(Box::pin(crate::limits::holding(follow(f, first, self.shutdown.clone()), slot))))
    }

    async fn share_trip(&self, req: Request<pb::ShareTripRequest>) -> Result<Response<pb::ShareLink>, Status> {
        let hop = hops(req.metadata());
        let r = req.into_inner();
        check_key_str("trip_id", &r.trip_id).map_err(|e| invalid(&e))?;
        match target(&self.cluster, &r.trip_id, hop).await? {
            Target::Local => {
                self.trips.share(&r.trip_id).await.map(|l| Response::new(share_proto(l))).map_err(trip_status)
            }
            Target::Forward(p, hop) => forward(&p.name, Self::client(&p).share_trip(forwarded(r, hop))).await,
        }
    }
}

impl TripsApi {
    /// Opens a trip watch on the trip's owner (here, or relayed from it): the trip as it
    /// is now, then its updates.
    async fn open_watch(&self, trip_id: String, hop: u32) -> Result<BoxStream<pb::TripUpdate>, Status> {
        if let Target::Forward(p, hop) = target(&self.cluster, &trip_id, hop).await? {
            let r = pb::WatchTripRequest { trip_id, after_version: 0 };
            let s = forward(&p.name, Self::client(&p).watch_trip(forwarded(r, hop))).await?;
            return Ok(Box::pin(s.into_inner()));
        }
        let (now, mut updates) = self.trips.watch(&trip_id).await.map_err(trip_status)?;
        let (tx, rx) = mpsc::channel(16);
        crate::tasks::spawn("trip_watch", async move {
            if tx.send(Ok(pb::TripUpdate { trip: Some(trip_proto(now)), state_changed: true })).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    u = updates.recv() => match u {
                        Some(u) => if tx.send(u.map(update_proto).map_err(trip_end_status)).await.is_err() { return },
                        None => {
                            // The actor dropped us: we lagged (an expiry sends its own end).
                            let s = with_meta(Status::resource_exhausted("watcher fell too far behind; resubscribe"), END_KEY, "lagged");
                            let _ = tx.send(Err(s)).await;
                            return;
                        }
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// A trip watch as its entry node follows it: resumes after the highest version
/// delivered; a re-opened watch's first update is marked `state_changed` only when the
/// state differs from the last one delivered.
struct FollowTrip {
    api: TripsApi,
    trip_id: String,
    version: u64,
    state: Option<i32>,
}

impl Resume for FollowTrip {
    type Item = pb::TripUpdate;

    fn open(&mut self) -> Opening<pb::TripUpdate> {
        let (api, id) = (self.api.clone(), self.trip_id.clone());
        Box::pin(async move { api.open_watch(id, 0).await })
    }

    fn pass(&mut self, u: &mut pb::TripUpdate, fresh: bool) -> bool {
        let Some(t) = &u.trip else { return true };
        // Never older than what the client has (a stale copy answering a re-open), and a
        // re-open's current state only when it is newer.
        if t.version < self.version || (fresh && t.version == self.version) {
            return false;
        }
        if fresh {
            u.state_changed = self.state != Some(t.state);
        }
        self.version = t.version;
        self.state = Some(t.state);
        true
    }
}

/// Validates a Match request.
fn check_match(r: &pb::MatchRequest) -> Result<u32, FieldError> {
    check_key_str("trip_id", &r.trip_id)?;
    check_coord("lat", r.lat, "lon", r.lon)?;
    check_str("vehicle_type", &r.vehicle_type, false, MAX_VEHICLE_TYPE_BYTES)?;
    if !r.radius_m.is_finite() || r.radius_m <= 0.0 {
        return Err(FieldError::new("radius_m", "required: a positive number of metres"));
    }
    check_range("radius_m", r.radius_m, 0.0, MAX_MATCH_RADIUS_M)?;
    match r.limit {
        0 => Ok(DEFAULT_CANDIDATES),
        n if n <= MAX_CANDIDATES => Ok(n),
        n => Err(FieldError::new("limit", format!("{n} candidates, at most {MAX_CANDIDATES}"))),
    }
}

/// The `locus.v1.Dispatch` service: `Match` and `Decline` run in the trip's actor on
/// the trip's owner (forwarded like trip RPCs).
pub struct DispatchApi {
    trips: Arc<Trips>,
    cluster: Arc<Cluster>,
}

impl DispatchApi {
    pub fn new(trips: Arc<Trips>, cluster: Arc<Cluster>) -> Self {
        DispatchApi { trips, cluster }
    }

    fn client(p: &crate::routing::cluster::Peer) -> DispatchClient<crate::auth::layer::AuthChannel> {
        DispatchClient::new(p.channel.clone())
    }

    async fn match_here(&self, ask: MatchAsk) -> Result<pb::MatchResponse, Status> {
        let m = self.trips.offer(ask).await.map_err(|e| match e {
            TripError::NotFound => {
                Status::not_found("trip not found: Match needs a BOOKED trip (send BOOKING_CREATED first)")
            }
            e => trip_status(e),
        })?;
        let o = m.offer;
        Ok(pb::MatchResponse {
            distance_m: o.distance_m,
            driver_id: o.driver_id,
            lat: o.lat,
            lon: o.lon,
            vehicle_type: o.vehicle_type,
            attempts: m.attempts,
            offer_expires_ms: o.expires_ms,
            existing: m.existing,
        })
    }
}

/// Nearby for AVAILABLE drivers across the cluster, the way `Match` finds candidates.
pub struct NearbyCandidates(pub Arc<super::LocationsApi>);

impl Candidates for NearbyCandidates {
    fn nearest(&self, ask: &MatchAsk, limit: u32) -> Pending<'_, Result<Vec<String>, DispatchError>> {
        let q = pb::NearbyRequest {
            lat: ask.lat,
            lon: ask.lon,
            limit,
            radius_m: Some(ask.radius_m),
            statuses: vec![pb::DriverStatus::Available as i32],
            vehicle_type: ask.vehicle_type.clone(),
            deadline_ms: None,
        };
        Box::pin(async move {
            let near = self.0.nearby(Request::new(q)).await.map_err(dispatch_error)?.into_inner();
            Ok(near.drivers.into_iter().map(|d| d.driver_id).collect())
        })
    }
}

#[tonic::async_trait]
impl pb::dispatch_server::Dispatch for DispatchApi {
    async fn r#match(&self, req: Request<pb::MatchRequest>) -> Result<Response<pb::MatchResponse>, Status> {
        let hop = hops(req.metadata());
        let r = req.into_inner();
        let limit = check_match(&r).map_err(|e| invalid(&e))?;
        let ask = MatchAsk {
            trip_id: r.trip_id.clone(),
            lat: r.lat,
            lon: r.lon,
            radius_m: r.radius_m,
            vehicle_type: r.vehicle_type.clone(),
            limit,
        };
        let (via, target) = match target(&self.cluster, &r.trip_id, hop).await? {
            Target::Local => ("local", None),
            Target::Forward(p, hop) => ("forward", Some((p, hop))),
        };
        let t0 = Instant::now();
        let res = match target {
            None => self.match_here(ask).await,
            Some((p, hop)) => {
                forward(&p.name, Self::client(&p).r#match(forwarded(r, hop))).await.map(Response::into_inner)
            }
        };
        if via == "local" {
            let outcome = match &res {
                Ok(m) if m.existing => "existing",
                Ok(_) => "matched",
                Err(s) if s.code() == tonic::Code::NotFound => "not_found",
                Err(_) => "error",
            };
            metrics::counter!("locus_matches_total", "outcome" => outcome).increment(1);
            metrics::histogram!("locus_match_seconds").record(t0.elapsed().as_secs_f64());
        }
        res.map(Response::new)
    }

    async fn decline(&self, req: Request<pb::DeclineRequest>) -> Result<Response<pb::DeclineResponse>, Status> {
        let hop = hops(req.metadata());
        let r = req.into_inner();
        check_key_str("trip_id", &r.trip_id).map_err(|e| invalid(&e))?;
        check_key_str("driver_id", &r.driver_id).map_err(|e| invalid(&e))?;
        match target(&self.cluster, &r.trip_id, hop).await? {
            Target::Local => {
                self.trips.decline(&r.trip_id, &r.driver_id).await.map_err(trip_status)?;
                metrics::counter!("locus_declines_total").increment(1);
                Ok(Response::new(pb::DeclineResponse {}))
            }
            Target::Forward(p, hop) => forward(&p.name, Self::client(&p).decline(forwarded(r, hop))).await,
        }
    }
}

/// The `locus.v1.Events` service.
pub struct EventsApi {
    bus: Bus,
    cluster: Arc<Cluster>,
    /// Subscriptions clients hold open on this node (`--max-subscriptions`).
    subscriptions: Arc<crate::limits::Slots>,
    /// Replayable subscriptions read the history through it.
    history: Option<Arc<super::FixesApi>>,
}

impl EventsApi {
    pub fn new(bus: Bus, cluster: Arc<Cluster>, max_subscriptions: usize) -> Self {
        let subscriptions = crate::limits::Slots::new("subscriptions", "--max-subscriptions", max_subscriptions);
        EventsApi { bus, cluster, subscriptions, history: None }
    }

    /// Serves replayable subscriptions (`resumable`, a cursor) from the history.
    pub fn with_history(mut self, fixes: Arc<super::FixesApi>) -> Self {
        self.history = Some(fixes);
        self
    }

    /// Counts subscriptions against `slots` (shared with `Fixes.Subscribe`).
    pub fn with_subscription_slots(mut self, slots: Arc<crate::limits::Slots>) -> Self {
        self.subscriptions = slots;
        self
    }
}

fn lagged() -> Status {
    with_meta(Status::resource_exhausted("subscriber fell too far behind; resubscribe"), END_KEY, "lagged")
}

type Out = mpsc::Sender<Result<pb::StateChange, Status>>;

/// This node's bus, filtered, into `tx`.
async fn pump_local(mut sub: broadcast::Receiver<StateChange>, filter: Filter, tx: Out) {
    loop {
        tokio::select! {
            r = sub.recv() => match r {
                Ok(c) => if filter.matches(&c) && tx.send(Ok(state_change_proto(&c))).await.is_err() { return },
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = tx.send(Err(lagged())).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tx.closed() => return,
        }
    }
}

/// One peer's events (its local scope) into `tx`, reconnecting while it is a member.
async fn pump_peer(cluster: Arc<Cluster>, addr: SocketAddr, req: pb::SubscribeRequest, tx: Out) {
    loop {
        if let Some(p) = cluster.peer_in(&cluster.view(), addr) {
            let mut r = Request::new(req.clone());
            set_local_scope(r.metadata_mut());
            match EventsClient::new(p.channel.clone()).subscribe(r).await {
                Ok(s) => {
                    let mut s = s.into_inner();
                    loop {
                        match s.message().await {
                            Ok(Some(c)) => {
                                if tx.send(Ok(c)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                                let _ = tx.send(Err(lagged())).await;
                                return;
                            }
                            Err(e) => {
                                debug!(peer = %p.name, error = %e, "event stream from a peer ended");
                                break;
                            }
                        }
                    }
                }
                Err(e) => debug!(peer = %p.name, error = %e, "cannot subscribe to a peer's events"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = tx.closed() => return,
        }
    }
}

/// Keeps one `pump_peer` per other ring member while the subscriber is there.
async fn pump_cluster(cluster: Arc<Cluster>, req: pb::SubscribeRequest, tx: Out) {
    let mut view = cluster.watch_view();
    let mut running: HashMap<SocketAddr, JoinHandle<()>> = HashMap::new();
    loop {
        let v = view.borrow_and_update().clone();
        // Every member not known to be down: ring members, members still handing their
        // partitions over as they leave, and joining ones, which may start serving a
        // partition before this node's ring has them.
        let wanted: Vec<SocketAddr> = v
            .members
            .iter()
            .filter(|m| m.addr != v.me && m.liveness != crate::membership::Liveness::Down)
            .map(|m| m.addr)
            .collect();
        running.retain(|a, h| {
            let keep = wanted.contains(a);
            if !keep {
                h.abort();
            }
            keep
        });
        for a in wanted {
            running.entry(a).or_insert_with(|| {
                crate::tasks::spawn("events_peer", pump_peer(cluster.clone(), a, req.clone(), tx.clone()))
            });
        }
        tokio::select! {
            r = view.changed() => if r.is_err() { break },
            _ = tx.closed() => break,
        }
    }
    for (_, h) in running {
        h.abort();
    }
}

#[tonic::async_trait]
impl pb::events_server::Events for EventsApi {
    type SubscribeStream = BoxStream<pb::StateChange>;

    async fn subscribe(&self, req: Request<pb::SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let local_only = is_local_scope(req.metadata());
        let r = req.into_inner();
        let filter = event_filter(&r)?;
        if super::history::replayable(&r) {
            let fixes = self.history.as_ref().ok_or_else(|| {
                Status::failed_precondition("replayable events need the history (--history-retention is 0)")
            })?;
            let q = super::history::event_query(&r, filter).map_err(|e| invalid(&e))?;
            let slot = fixes.subscriptions().take()?;
            let rx = fixes.subscribe_merged(q)?;
            let changes = futures_util::StreamExt::flat_map(ReceiverStream::new(rx), |b| {
                let items: Vec<Result<pb::StateChange, Status>> = match b {
                    Err(e) => vec![Err(e)],
                    Ok(b) => {
                        let checkpoint = (!b.positions.is_empty())
                            .then(|| pb::StateChange { positions: b.positions, ..Default::default() });
                        b.events.into_iter().chain(checkpoint).map(Ok).collect()
                    }
                };
                tokio_stream::iter(items)
            });
            return Ok(Response::new(Box::pin(crate::limits::holding(changes, slot))));
        }
        // A client's subscription (a node's part of another's is counted there).
        let slot = if local_only { None } else { Some(self.subscriptions.take()?) };
        let (tx, rx) = mpsc::channel(1024);
        // Subscribe before answering, so nothing published after this call is missed.
        crate::tasks::spawn("events_local", pump_local(self.bus.subscribe(), filter, tx.clone()));
        if !local_only {
            crate::tasks::spawn("events_cluster", pump_cluster(self.cluster.clone(), r, tx));
        }
        let events = ReceiverStream::new(rx);
        Ok(Response::new(match slot {
            Some(slot) => Box::pin(crate::limits::holding(events, slot)),
            None => Box::pin(events),
        }))
    }
}

/// The node-to-node `locus.v1.Internal` service.
pub struct InternalApi {
    dispatch: Arc<Dispatcher>,
    trips: Arc<Trips>,
    map: Arc<crate::map::MapSource>,
    udp: Arc<crate::udp::ingest::OwnerSide>,
    fixes: Option<Arc<super::FixesApi>>,
}

/// Most fixes one `Internal.UdpFixes` call may carry.
const MAX_UDP_FORWARD: usize = 4096;

impl InternalApi {
    pub fn new(
        dispatch: Arc<Dispatcher>,
        trips: Arc<Trips>,
        map: Arc<crate::map::MapSource>,
        udp: Arc<crate::udp::ingest::OwnerSide>,
    ) -> Self {
        InternalApi { dispatch, trips, map, udp, fixes: None }
    }

    /// Serves `FixesPart` with `fixes`.
    pub fn with_fixes(mut self, fixes: Arc<super::FixesApi>) -> Self {
        self.fixes = Some(fixes);
        self
    }
}

/// Sends UDP fixes to their owner over `Internal.UdpFixes`.
pub struct UdpForwarder;

impl crate::udp::ingest::Forward for UdpForwarder {
    fn send(&self, to: crate::routing::cluster::Peer, fixes: Vec<pb::UdpFix>) -> Pending<'static, Option<Vec<String>>> {
        Box::pin(async move {
            let mut c = crate::pb::internal_client::InternalClient::new(to.channel.clone());
            let call = c.udp_fixes(pb::UdpFixBatch { fixes });
            match tokio::time::timeout(Duration::from_secs(2), call).await {
                Ok(Ok(r)) => Some(r.into_inner().reasons),
                Ok(Err(s)) => {
                    debug!(peer = %to.name, status = %s, "UDP fixes not forwarded");
                    None
                }
                Err(_) => None,
            }
        })
    }
}

#[tonic::async_trait]
impl pb::internal_server::Internal for InternalApi {
    async fn claim(&self, req: Request<pb::ClaimRequest>) -> Result<Response<pb::ClaimResponse>, Status> {
        let hop = hops(req.metadata());
        let r = req.into_inner();
        check_key_str("driver_id", &r.driver_id).map_err(|e| invalid(&e))?;
        check_key_str("trip_id", &r.trip_id).map_err(|e| invalid(&e))?;
        check_str("vehicle_type", &r.vehicle_type, false, MAX_VEHICLE_TYPE_BYTES).map_err(|e| invalid(&e))?;
        let call = claim_call(r).map_err(|e| invalid(&e))?;
        self.dispatch.call(call, hop).await.map(|a| Response::new(answer_proto(a))).map_err(dispatch_status)
    }

    async fn feed(&self, req: Request<pb::TripFixes>) -> Result<Response<pb::FeedAck>, Status> {
        for f in req.into_inner().fixes {
            let Some(p) = &f.fix else { continue };
            let pos = position_from_proto(p);
            self.trips.feed(TripFix { trip_id: f.trip_id.into(), driver_id: f.driver_id.into(), pos });
        }
        Ok(Response::new(pb::FeedAck {}))
    }

    async fn share(&self, req: Request<pb::ShareRequest>) -> Result<Response<pb::ShareAnswer>, Status> {
        let token = req.into_inner().token;
        Ok(Response::new(match self.trips.shares.get(&token, wall_ms()) {
            Some(json) => pb::ShareAnswer { http_status: 200, json: json.to_vec() },
            None => pb::ShareAnswer { http_status: 404, json: Vec::new() },
        }))
    }

    async fn map_part(&self, req: Request<pb::MapPartRequest>) -> Result<Response<pb::MapPartResponse>, Status> {
        let q = crate::map::query_of(req.get_ref())
            .map_err(|(field, reason)| invalid(&crate::drivers::FieldError::new(field, reason)))?;
        self.map.local_part(&q).await.map(Response::new).map_err(super::route_status)
    }

    type HistoryPartStream = BoxStream<pb::HistoryPartBatch>;

    async fn history_part(
        &self,
        req: Request<pb::HistoryPartRequest>,
    ) -> Result<Response<Self::HistoryPartStream>, Status> {
        let fixes = self.fixes.as_ref().ok_or_else(|| Status::unimplemented("no fix stream on this node"))?;
        fixes.part(req.into_inner()).map(Response::new)
    }

    async fn udp_fixes(&self, req: Request<pb::UdpFixBatch>) -> Result<Response<pb::UdpFixResults>, Status> {
        let fixes = req.into_inner().fixes;
        if fixes.len() > MAX_UDP_FORWARD {
            let why = format!("{} fixes, at most {MAX_UDP_FORWARD} per call", fixes.len());
            return Err(invalid(&crate::drivers::FieldError::new("fixes", why)));
        }
        let reasons = self.udp.apply(fixes).await;
        Ok(Response::new(pb::UdpFixResults { reasons: reasons.into_iter().map(String::from).collect() }))
    }
}

// Domain ↔ protobuf for trips, dispatch and events, and their errors as statuses: the
// one place these conversions live.

/// A trip error as the client sees it.
pub(crate) fn trip_status(e: TripError) -> Status {
    match e {
        TripError::NotFound => Status::not_found(e.to_string()),
        TripError::Moving | TripError::Unconfirmed(_) => super::locations::unavailable_retry(e.to_string()),
        TripError::Busy => Status::resource_exhausted(e.to_string()),
        TripError::Transition { state, .. } => {
            let mut s = Status::failed_precondition(e.to_string());
            s.metadata_mut().insert("locus-trip-state", tonic::metadata::MetadataValue::from_static(state.name()));
            s
        }
        TripError::Storage(m) => Status::unavailable(m),
        TripError::Driver(d) => dispatch_status(d),
    }
}

/// How a trip watch ended, as the stream's last status.
fn trip_end_status(e: TripEnd) -> Status {
    match e {
        TripEnd::Moved => with_meta(
            super::locations::unavailable_retry("moved: the trip's partition moved to another node; resubscribe"),
            END_KEY,
            "moved",
        ),
        TripEnd::Expired => with_meta(Status::not_found("the trip expired"), END_KEY, "expired"),
    }
}

/// A dispatch error as the client sees it.
pub(crate) fn dispatch_status(e: DispatchError) -> Status {
    match e {
        DispatchError::NotFound(m) => Status::not_found(m),
        DispatchError::Overloaded(m) => with_meta(Status::resource_exhausted(m), super::REASON_KEY, "overloaded"),
        DispatchError::Unavailable(m) => super::locations::unavailable_retry(m),
        DispatchError::Refused(m) => Status::failed_precondition(m),
        DispatchError::Invalid(m) => Status::invalid_argument(m),
    }
}

/// A status from the driver's owner, back as a dispatch error.
fn dispatch_error(s: Status) -> DispatchError {
    let m = s.message().to_string();
    match s.code() {
        tonic::Code::NotFound => DispatchError::NotFound(m),
        tonic::Code::ResourceExhausted => DispatchError::Overloaded(m),
        tonic::Code::FailedPrecondition => DispatchError::Refused(m),
        tonic::Code::InvalidArgument => DispatchError::Invalid(m),
        _ => DispatchError::Unavailable(m),
    }
}

fn state_proto(s: TripState) -> i32 {
    match s {
        TripState::Booked => pb::TripState::TripBooked as i32,
        TripState::DriverAssigned => pb::TripState::TripDriverAssigned as i32,
        TripState::DriverArrived => pb::TripState::TripDriverArrived as i32,
        TripState::PassengerCarry => pb::TripState::TripPassengerCarry as i32,
        TripState::PassengerDropped => pb::TripState::TripPassengerDropped as i32,
        TripState::Cancelled => pb::TripState::TripCancelled as i32,
    }
}

fn point_proto(p: LatLon) -> Option<pb::Point> {
    Some(pb::Point { lat: p.lat, lon: p.lon })
}

pub(crate) fn trip_proto(v: TripView) -> pb::Trip {
    let t = v.trip;
    let offer = t.pending_offer(wall_ms()).cloned();
    let vehicle = t.vehicle;
    pb::Trip {
        state: state_proto(t.state),
        state_name: t.state.name().into(),
        pickup: point_proto(t.pickup),
        dropoff: point_proto(t.dropoff),
        estimated_drive_s: t.estimated_drive_s,
        driver_id: t.driver_id,
        vehicle: Some(pb::Vehicle {
            cab_number: vehicle.cab_number,
            model: vehicle.model,
            colour: vehicle.colour,
            plate: vehicle.plate,
        }),
        driver_position: t.driver_pos.as_ref().map(super::fix_proto),
        route: t
            .route
            .iter()
            .map(|p| pb::RoutePoint { lat: p.lat, lon: p.lon, timestamp_ms: p.timestamp_ms })
            .collect(),
        distance_m: t.distance_m,
        fare: v.fare,
        created_ms: t.created_ms,
        assigned_ms: t.assigned_ms,
        arrived_ms: t.arrived_ms,
        carry_ms: t.carry_ms,
        dropped_ms: t.dropped_ms,
        cancelled_ms: t.cancelled_ms,
        expires_ms: t.expires_ms,
        driver_near_pickup: t.near_pickup,
        version: t.version,
        offer_driver_id: offer.as_ref().map(|o| o.driver_id.clone()).unwrap_or_default(),
        offer_expires_ms: offer.map_or(0, |o| o.expires_ms),
        declined_driver_ids: t.dispatching.declined,
        trip_id: t.trip_id,
    }
}

fn update_proto(u: TripUpdate) -> pb::TripUpdate {
    pb::TripUpdate { trip: Some(trip_proto(u.view)), state_changed: u.state_changed }
}

fn share_proto(l: ShareLink) -> pb::ShareLink {
    pb::ShareLink { token: l.token, url: l.url, expires_ms: l.expires_ms }
}

fn state_change_proto(c: &StateChange) -> pb::StateChange {
    pb::StateChange {
        entity: match c.entity {
            Entity::Driver => pb::EntityKind::EntityDriver,
            Entity::Trip => pb::EntityKind::EntityTrip,
        } as i32,
        id: c.id.clone(),
        state: c.state.into(),
        from_state: c.from_state.into(),
        timestamp_ms: c.timestamp_ms,
        lat: c.lat,
        lon: c.lon,
        position: None,
        positions: Vec::new(),
    }
}

/// The filter of an `Events.Subscribe`.
pub(super) fn event_filter(r: &pb::SubscribeRequest) -> Result<Filter, Status> {
    if r.states.len() > 32 {
        return Err(invalid(&FieldError::new("states", "at most 32 states")));
    }
    for s in &r.states {
        check_str("states", s, true, 32).map_err(|e| invalid(&e))?;
    }
    let entity = match pb::EntityKind::try_from(r.entity) {
        Ok(pb::EntityKind::Unspecified) => None,
        Ok(pb::EntityKind::EntityDriver) => Some(Entity::Driver),
        Ok(pb::EntityKind::EntityTrip) => Some(Entity::Trip),
        Err(_) => return Err(invalid(&FieldError::new("entity", format!("unknown entity kind {}", r.entity)))),
    };
    Ok(Filter { entity, states: r.states.clone() })
}

/// A validated `Internal.Claim` request as a claim call.
fn claim_call(r: pb::ClaimRequest) -> Result<ClaimCall, FieldError> {
    let op = match pb::ClaimOp::try_from(r.op) {
        Ok(pb::ClaimOp::Claim) => ClaimOp::Claim { vehicle_type: r.vehicle_type },
        Ok(pb::ClaimOp::Confirm) => ClaimOp::Confirm,
        Ok(pb::ClaimOp::Release) => ClaimOp::Release,
        _ => return Err(FieldError::new("op", format!("unknown claim operation {}", r.op))),
    };
    Ok(ClaimCall { op, driver_id: r.driver_id, trip_id: r.trip_id })
}

fn claim_request(c: &ClaimCall) -> pb::ClaimRequest {
    let (op, vehicle_type) = match &c.op {
        ClaimOp::Claim { vehicle_type } => (pb::ClaimOp::Claim, vehicle_type.clone()),
        ClaimOp::Confirm => (pb::ClaimOp::Confirm, String::new()),
        ClaimOp::Release => (pb::ClaimOp::Release, String::new()),
    };
    pb::ClaimRequest { op: op as i32, driver_id: c.driver_id.clone(), trip_id: c.trip_id.clone(), vehicle_type }
}

fn answer_proto(a: ClaimAnswer) -> pb::ClaimResponse {
    pb::ClaimResponse {
        ok: a.ok,
        reason: a.reason,
        lat: a.lat,
        lon: a.lon,
        vehicle_type: a.vehicle_type,
        offer_expires_ms: a.offer_expires_ms,
    }
}

fn answer_from_proto(r: pb::ClaimResponse) -> ClaimAnswer {
    ClaimAnswer {
        ok: r.ok,
        reason: r.reason,
        lat: r.lat,
        lon: r.lon,
        vehicle_type: r.vehicle_type,
        offer_expires_ms: r.offer_expires_ms,
    }
}

/// Claims for drivers other nodes own go there over `Internal.Claim`.
pub struct ClaimForwarder {
    cluster: Arc<Cluster>,
}

impl ClaimForwarder {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        ClaimForwarder { cluster }
    }
}

impl ClaimLink for ClaimForwarder {
    fn remote(&self, call: &ClaimCall, hop: u32) -> Pending<'_, Result<Option<ClaimAnswer>, DispatchError>> {
        let req = claim_request(call);
        Box::pin(async move {
            match target(&self.cluster, &req.driver_id, hop).await.map_err(dispatch_error)? {
                Target::Local => Ok(None),
                Target::Forward(p, hop) => {
                    let mut c = pb::internal_client::InternalClient::new(p.channel.clone());
                    let r = forward(&p.name, c.claim(forwarded(req, hop))).await.map_err(dispatch_error)?;
                    Ok(Some(answer_from_proto(r.into_inner())))
                }
            }
        })
    }
}

/// Fixes of drivers on trips travel from shard workers to the trips' owners: batched
/// per owner node, never blocking the shards. A remote batch that cannot be sent at
/// once is dropped (counted); the next fix follows within a second or so.
pub async fn run_feed(mut rx: mpsc::Receiver<TripFix>, trips: Arc<Trips>, cluster: Arc<Cluster>) {
    let inflight = Arc::new(tokio::sync::Semaphore::new(64));
    let mut buf = Vec::with_capacity(1024);
    while rx.recv_many(&mut buf, 1024).await > 0 {
        // One view and routes per batch; a peer is looked up once per owner, not per fix.
        let view = cluster.view();
        let routes = cluster.routes();
        let mut remote: HashMap<std::net::SocketAddr, Vec<pb::TripFix>> = HashMap::new();
        for f in buf.drain(..) {
            match routes.of_key(f.trip_id.as_bytes()) {
                Route::Local => trips.feed(f),
                Route::Remote(a) | Route::Via(a) => remote.entry(a).or_default().push(pb::TripFix {
                    trip_id: f.trip_id.into(),
                    driver_id: f.driver_id.into(),
                    fix: Some(super::fix_proto(&f.pos)),
                }),
                // Moving or unknown: the driver's next fix follows within a second or so.
                Route::Incoming | Route::Unknown => metrics::counter!("locus_trip_fixes_dropped_total").increment(1),
            }
        }
        let remote = remote.into_iter().filter_map(|(a, fixes)| match cluster.peer_in(&view, a) {
            Some(p) => Some((p, fixes)),
            None => {
                metrics::counter!("locus_trip_fixes_dropped_total").increment(fixes.len() as u64);
                None
            }
        });
        for (peer, fixes) in remote {
            let Ok(permit) = inflight.clone().try_acquire_owned() else {
                metrics::counter!("locus_trip_fixes_dropped_total").increment(fixes.len() as u64);
                continue;
            };
            crate::tasks::spawn("trip_feed_send", async move {
                let mut c = pb::internal_client::InternalClient::new(peer.channel);
                let mut r = tonic::Request::new(pb::TripFixes { fixes });
                r.set_timeout(Duration::from_secs(2));
                if let Err(e) = c.feed(r).await {
                    tracing::debug!(peer = %peer.name, error = %e, "trip fixes not delivered");
                }
                drop(permit);
            });
        }
    }
}
