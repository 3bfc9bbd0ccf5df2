//! `locus.v1.Trips`, `Dispatch`, `Events` and the node-to-node `Internal` service.
//!
//! Trip RPCs run on the trip's owner (forwarded like driver RPCs). `Match` runs on the
//! entry node: a scatter-gather Nearby for AVAILABLE drivers, then claims in distance
//! order on each candidate's owner until one succeeds. `Subscribe` merges this node's
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
use super::locations::{BoxStream, Target, forwarded, peer_status, target};
use super::{END_KEY, check_coord, check_key_str, invalid, position_from_proto, with_meta};
use crate::actors::{TripFix, wall_ms};
use crate::dispatch::Dispatcher;
use crate::drivers::{FieldError, MAX_VEHICLE_TYPE_BYTES, check_range, check_str};
use crate::events::{Bus, Filter};
use crate::geo::haversine_m;
use crate::pb;
use crate::pb::events_client::EventsClient;
use crate::pb::locations_server::Locations;
use crate::pb::trips_client::TripsClient;
use crate::routing::cluster::{Cluster, hops, is_local_scope, set_local_scope};
use crate::trips::Trips;
use crate::trips::model::{EventKind, LatLon, TripEvent, Vehicle};

/// Longest estimated drive time a booking may carry.
const MAX_DRIVE_S: u32 = 86_400;
/// Most candidates a Match may try, and its default.
const MAX_CANDIDATES: u32 = 50;
const DEFAULT_CANDIDATES: u32 = 10;
/// Largest Match radius, metres.
const MAX_MATCH_RADIUS_M: f64 = 50_000.0;
/// Nearby rounds a Match makes when every candidate was taken meanwhile.
const MATCH_ROUNDS: usize = 3;

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
}

impl TripsApi {
    pub fn new(trips: Arc<Trips>, cluster: Arc<Cluster>, shutdown: watch::Receiver<bool>) -> Self {
        TripsApi { trips, cluster, shutdown }
    }

    fn client(p: &crate::routing::cluster::Peer) -> TripsClient<tonic::transport::Channel> {
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
                self.trips.apply(ev).await.map(Response::new)
            }
            Target::Forward(p, hop) => Self::client(&p).apply(forwarded(r, hop)).await.map_err(|s| peer_status(&p, s)),
        }
    }

    async fn get_trip(&self, req: Request<pb::GetTripRequest>) -> Result<Response<pb::Trip>, Status> {
        let hop = hops(req.metadata());
        let r = req.into_inner();
        check_key_str("trip_id", &r.trip_id).map_err(|e| invalid(&e))?;
        match target(&self.cluster, &r.trip_id, hop).await? {
            Target::Local => self.trips.get(&r.trip_id, r.include_route).await.map(Response::new),
            Target::Forward(p, hop) => {
                Self::client(&p).get_trip(forwarded(r, hop)).await.map_err(|s| peer_status(&p, s))
            }
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
        let first = self.open_watch(r.trip_id.clone(), 0).await?;
        let f = FollowTrip { api: self.clone(), trip_id: r.trip_id, version: r.after_version, state: None };
        Ok(Response::new(follow(f, first, self.shutdown.clone())))
    }

    async fn share_trip(&self, req: Request<pb::ShareTripRequest>) -> Result<Response<pb::ShareLink>, Status> {
        let hop = hops(req.metadata());
        let r = req.into_inner();
        check_key_str("trip_id", &r.trip_id).map_err(|e| invalid(&e))?;
        match target(&self.cluster, &r.trip_id, hop).await? {
            Target::Local => self.trips.share(&r.trip_id).await.map(Response::new),
            Target::Forward(p, hop) => {
                Self::client(&p).share_trip(forwarded(r, hop)).await.map_err(|s| peer_status(&p, s))
            }
        }
    }
}

impl TripsApi {
    /// Opens a trip watch on the trip's owner (here, or relayed from it): the trip as it
    /// is now, then its updates.
    async fn open_watch(&self, trip_id: String, hop: u32) -> Result<BoxStream<pb::TripUpdate>, Status> {
        if let Target::Forward(p, hop) = target(&self.cluster, &trip_id, hop).await? {
            let r = pb::WatchTripRequest { trip_id, after_version: 0 };
            let s = Self::client(&p).watch_trip(forwarded(r, hop)).await.map_err(|s| peer_status(&p, s))?;
            return Ok(Box::pin(s.into_inner()));
        }
        let (now, mut updates) = self.trips.watch(&trip_id).await?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            if tx.send(Ok(pb::TripUpdate { trip: Some(now), state_changed: true })).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    u = updates.recv() => match u {
                        Some(u) => if tx.send(u).await.is_err() { return },
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
        if fresh {
            if t.version <= self.version {
                return false;
            }
            u.state_changed = self.state != Some(t.state);
        }
        self.version = self.version.max(t.version);
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

/// The `locus.v1.Dispatch` service.
pub struct DispatchApi {
    locations: Arc<super::LocationsApi>,
    dispatch: Arc<Dispatcher>,
}

impl DispatchApi {
    pub fn new(locations: Arc<super::LocationsApi>, dispatch: Arc<Dispatcher>) -> Self {
        DispatchApi { locations, dispatch }
    }

    async fn try_match(&self, r: &pb::MatchRequest, limit: u32) -> Result<pb::MatchResponse, Status> {
        let mut attempts = 0;
        for round in 0..MATCH_ROUNDS {
            let q = pb::NearbyRequest {
                lat: r.lat,
                lon: r.lon,
                limit,
                radius_m: Some(r.radius_m),
                statuses: vec![pb::DriverStatus::Available as i32],
                vehicle_type: r.vehicle_type.clone(),
                deadline_ms: None,
            };
            let near = self.locations.nearby(Request::new(q)).await?.into_inner();
            if near.drivers.is_empty() {
                let why = if round == 0 {
                    "no AVAILABLE driver within the radius"
                } else {
                    "every candidate was taken meanwhile"
                };
                return Err(Status::not_found(why));
            }
            for hit in near.drivers {
                attempts += 1;
                match self.dispatch.claim(&hit.driver_id, &r.trip_id, &r.vehicle_type).await {
                    Ok(c) if c.ok => {
                        return Ok(pb::MatchResponse {
                            driver_id: hit.driver_id,
                            distance_m: haversine_m(r.lat, r.lon, c.lat, c.lon),
                            lat: c.lat,
                            lon: c.lon,
                            vehicle_type: c.vehicle_type,
                            attempts,
                            offer_expires_ms: c.offer_expires_ms,
                        });
                    }
                    Ok(c) => debug!(driver = %hit.driver_id, reason = %c.reason, "claim refused; trying the next"),
                    Err(e) => debug!(driver = %hit.driver_id, error = %e, "claim failed; trying the next"),
                }
            }
        }
        Err(Status::not_found("every candidate was taken meanwhile"))
    }
}

#[tonic::async_trait]
impl pb::dispatch_server::Dispatch for DispatchApi {
    async fn r#match(&self, req: Request<pb::MatchRequest>) -> Result<Response<pb::MatchResponse>, Status> {
        let r = req.into_inner();
        let limit = check_match(&r).map_err(|e| invalid(&e))?;
        let t0 = Instant::now();
        let res = self.try_match(&r, limit).await;
        let outcome = match &res {
            Ok(_) => "matched",
            Err(s) if s.code() == tonic::Code::NotFound => "not_found",
            Err(_) => "error",
        };
        metrics::counter!("locus_matches_total", "outcome" => outcome).increment(1);
        metrics::histogram!("locus_match_seconds").record(t0.elapsed().as_secs_f64());
        res.map(Response::new)
    }
}

/// The `locus.v1.Events` service.
pub struct EventsApi {
    bus: Bus,
    cluster: Arc<Cluster>,
}

impl EventsApi {
    pub fn new(bus: Bus, cluster: Arc<Cluster>) -> Self {
        EventsApi { bus, cluster }
    }
}

fn lagged() -> Status {
    with_meta(Status::resource_exhausted("subscriber fell too far behind; resubscribe"), END_KEY, "lagged")
}

type Out = mpsc::Sender<Result<pb::StateChange, Status>>;

/// This node's bus, filtered, into `tx`.
async fn pump_local(mut sub: broadcast::Receiver<pb::StateChange>, filter: Filter, tx: Out) {
    loop {
        tokio::select! {
            r = sub.recv() => match r {
                Ok(c) => if filter.matches(&c) && tx.send(Ok(c)).await.is_err() { return },
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
            running.entry(a).or_insert_with(|| tokio::spawn(pump_peer(cluster.clone(), a, req.clone(), tx.clone())));
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
        if r.states.len() > 32 {
            return Err(invalid(&FieldError::new("states", "at most 32 states")));
        }
        for s in &r.states {
            check_str("states", s, true, 32).map_err(|e| invalid(&e))?;
        }
        let entity = match pb::EntityKind::try_from(r.entity) {
            Ok(pb::EntityKind::Unspecified) => None,
            Ok(k) => Some(k),
            Err(_) => return Err(invalid(&FieldError::new("entity", format!("unknown entity kind {}", r.entity)))),
        };
        let filter = Filter { entity, states: r.states.clone() };
        let (tx, rx) = mpsc::channel(1024);
        // Subscribe before answering, so nothing published after this call is missed.
        tokio::spawn(pump_local(self.bus.subscribe(), filter, tx.clone()));
        if !local_only {
            tokio::spawn(pump_cluster(self.cluster.clone(), r, tx));
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The node-to-node `locus.v1.Internal` service.
pub struct InternalApi {
    dispatch: Arc<Dispatcher>,
    trips: Arc<Trips>,
}

impl InternalApi {
    pub fn new(dispatch: Arc<Dispatcher>, trips: Arc<Trips>) -> Self {
        InternalApi { dispatch, trips }
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
        self.dispatch.call(r, hop).await.map(Response::new)
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
}
