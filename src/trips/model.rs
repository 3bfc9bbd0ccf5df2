//! The trip state machine: booking events in partial order, the route, distance and fare.
//!
//! Pure code: the trip actor (see `trips::actor`) feeds it events and the assigned
//! driver's fixes with the current time, and persists / publishes what changed.
//!
//! ```text
//!  BOOKING_CREATED ─► DRIVER_ASSIGNED ─► DRIVER_ARRIVED ─► PASSENGER_CARRY ─► PASSENGER_DROPPED
//!        │                 │   └──────────────────────────────────▲
//!        └─────────────────┴──────────► CANCELLED ◄───────── (from ARRIVED too)
//! ```

use serde::{Deserialize, Serialize};

use crate::dispatch::Offer;
use crate::drivers::Position;
use crate::geo::haversine_m;

/// Most drivers a trip remembers as having declined it (the oldest is forgotten).
pub const MAX_DECLINED: usize = 32;

/// A booked trip's dispatch: its current offer (see [`Trip::pending_offer`]) and the
/// drivers who declined it (a new match skips them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Dispatching {
    pub offer: Option<Offer>,
    pub declined: Vec<String>,
}

/// Why a decline was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeclineError {
    #[error("driver {0:?} holds no offer for this trip")]
    NoOffer(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TripState {
    Booked = 1,
    DriverAssigned = 2,
    DriverArrived = 3,
    PassengerCarry = 4,
    PassengerDropped = 5,
    Cancelled = 6,
}

impl TripState {
    /// The canonical name (the event that put the trip here).
    pub fn name(self) -> &'static str {
        match self {
            TripState::Booked => "BOOKING_CREATED",
            TripState::DriverAssigned => "DRIVER_ASSIGNED",
            TripState::DriverArrived => "DRIVER_ARRIVED",
            TripState::PassengerCarry => "PASSENGER_CARRY",
            TripState::PassengerDropped => "PASSENGER_DROPPED",
            TripState::Cancelled => "CANCELLED",
        }
    }

    /// A driver is on this trip (its fixes flow to it).
    pub fn has_driver(self) -> bool {
        matches!(self, TripState::DriverAssigned | TripState::DriverArrived | TripState::PassengerCarry)
    }

    pub fn is_final(self) -> bool {
        matches!(self, TripState::PassengerDropped | TripState::Cancelled)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatLon {
    pub lat: f64,
    pub lon: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Vehicle {
    pub cab_number: String,
    pub model: String,
    pub colour: String,
    pub plate: String,
}

/// One validated booking event.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    BookingCreated { pickup: LatLon, dropoff: LatLon, estimated_drive_s: u32 },
    DriverAssigned { driver_id: String, vehicle: Vehicle },
    DriverArrived,
    PassengerCarry,
    PassengerDropped,
    Cancelled,
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::BookingCreated { .. } => "BOOKING_CREATED",
            EventKind::DriverAssigned { .. } => "DRIVER_ASSIGNED",
            EventKind::DriverArrived => "DRIVER_ARRIVED",
            EventKind::PassengerCarry => "PASSENGER_CARRY",
            EventKind::PassengerDropped => "PASSENGER_DROPPED",
            EventKind::Cancelled => "CANCELLED",
        }
    }

    fn target(&self) -> TripState {
        match self {
            EventKind::BookingCreated { .. } => TripState::Booked,
            EventKind::DriverAssigned { .. } => TripState::DriverAssigned,
            EventKind::DriverArrived => TripState::DriverArrived,
            EventKind::PassengerCarry => TripState::PassengerCarry,
            EventKind::PassengerDropped => TripState::PassengerDropped,
            EventKind::Cancelled => TripState::Cancelled,
        }
    }

    /// The states this event may follow.
    fn allowed_from(&self) -> &'static [TripState] {
        use TripState::*;
        match self {
            EventKind::BookingCreated { .. } => &[],
            EventKind::DriverAssigned { .. } => &[Booked],
            EventKind::DriverArrived => &[DriverAssigned],
            // An app may skip "arrived".
            EventKind::PassengerCarry => &[DriverAssigned, DriverArrived],
            EventKind::PassengerDropped => &[PassengerCarry],
            EventKind::Cancelled => &[Booked, DriverAssigned, DriverArrived],
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TripEvent {
    pub trip_id: String,
    pub event_id: String,
    pub kind: EventKind,
}

/// Tariff: base + per km + per minute of carriage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fare {
    pub base: f64,
    pub per_km: f64,
    pub per_min: f64,
}

/// Behaviour knobs, from the node configuration.
#[derive(Clone, Debug)]
pub struct TripConfig {
    /// Added to the estimated drive time for the TTL of a live trip (15 min).
    pub buffer_ms: i64,
    /// How long a dropped or cancelled trip lingers (5 min).
    pub linger_ms: i64,
    /// Route points kept; beyond it the route is down-sampled (every other point).
    pub route_max: usize,
    /// "Your driver is near": the assigned driver within this distance of the pickup.
    pub near_pickup_m: f64,
    pub fare: Fare,
}

impl Default for TripConfig {
    fn default() -> Self {
        TripConfig {
            buffer_ms: 15 * 60_000,
            linger_ms: 5 * 60_000,
            route_max: 512,
            near_pickup_m: 200.0,
            fare: Fare { base: 3.5, per_km: 1.2, per_min: 0.3 },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoutePoint {
    pub lat: f64,
    pub lon: f64,
    pub timestamp_ms: i64,
}

/// Event ids remembered per trip for de-duplication (a trip sees a handful).
const MAX_EVENT_IDS: usize = 32;
/// Jitter floor: moves shorter than this never count, whatever the reported accuracy.
const MIN_STEP_M: f64 = 2.0;

/// One trip. Persisted whole (postcard) on every event and now and then while driven.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    pub trip_id: String,
    pub state: TripState,
    pub pickup: LatLon,
    pub dropoff: LatLon,
    pub estimated_drive_s: u32,
    pub driver_id: String,
    pub vehicle: Vehicle,
    pub driver_pos: Option<Position>,
    pub route: Vec<RoutePoint>,
    /// Minimum spacing of recorded route points; doubles at each down-sampling.
    pub route_step_m: f64,
    pub distance_m: f64,
    /// The last fix that counted for the distance.
    anchor: Option<Position>,
    pub created_ms: i64,
    pub assigned_ms: i64,
    pub arrived_ms: i64,
    pub carry_ms: i64,
    pub dropped_ms: i64,
    pub cancelled_ms: i64,
    pub expires_ms: i64,
    pub near_pickup: bool,
    pub version: u64,
    pub event_ids: Vec<String>,
    pub share_token: Option<String>,
    /// Stored after the trip in its record (see [`Trip::encode`]).
    #[serde(skip)]
    pub dispatching: Dispatching,
}

/// Why an event was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("trip not found (never booked, or expired)")]
    NotFound,
    #[error("{event} is not a valid transition from {}", state.name())]
    Invalid { state: TripState, event: &'static str },
}

/// What an accepted event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The event id was seen before: nothing changed.
    Duplicate,
    Changed {
        from: Option<TripState>,
    },
}

/// What a driver fix did to the trip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FixOutcome {
    /// The fix was taken (newer than the last, from the assigned driver, while driven).
    pub taken: bool,
    /// The driver just came within the near-pickup distance.
    pub near_pickup: bool,
}

impl Trip {
    /// A new trip from its BOOKING_CREATED event.
    pub fn create(ev: &TripEvent, now_ms: i64, cfg: &TripConfig) -> Result<Trip, ApplyError> {
        let EventKind::BookingCreated { pickup, dropoff, estimated_drive_s } = &ev.kind else {
            return Err(ApplyError::NotFound);
        };
        Ok(Trip {
            trip_id: ev.trip_id.clone(),
            state: TripState::Booked,
            pickup: *pickup,
            dropoff: *dropoff,
            estimated_drive_s: *estimated_drive_s,
            driver_id: String::new(),
            vehicle: Vehicle::default(),
            driver_pos: None,
            route: Vec::new(),
            route_step_m: 0.0,
            distance_m: 0.0,
            anchor: None,
            created_ms: now_ms,
            assigned_ms: 0,
            arrived_ms: 0,
            carry_ms: 0,
            dropped_ms: 0,
            cancelled_ms: 0,
            expires_ms: now_ms + *estimated_drive_s as i64 * 1000 + cfg.buffer_ms,
            near_pickup: false,
            version: 1,
            event_ids: vec![ev.event_id.clone()],
            share_token: None,
            dispatching: Dispatching::default(),
        })
    }

    /// The stored record: the trip, then its dispatching state when it has one (appended,
    /// so a record written without it reads as a trip with no offer).
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        let v = postcard::to_allocvec(self)?;
        if self.dispatching == Dispatching::default() {
            return Ok(v);
        }
        postcard::to_extend(&self.dispatching, v)
    }

    pub fn decode(bytes: &[u8]) -> Result<Trip, postcard::Error> {
        let (mut t, rest) = postcard::take_from_bytes::<Trip>(bytes)?;
        if !rest.is_empty() {
            t.dispatching = postcard::from_bytes(rest)?;
        }
        Ok(t)
    }

    /// The offer a match made that still holds: the trip is waiting for its driver and
    /// the claim has not lapsed.
    pub fn pending_offer(&self, now_ms: i64) -> Option<&Offer> {
        let o = self.dispatching.offer.as_ref()?;
        (self.state == TripState::Booked && o.expires_ms > now_ms).then_some(o)
    }

    /// The offer's driver declined: the offer ends, and later matches skip the driver.
    /// `Ok(Some)`: the offer to release; `Ok(None)`: a repeated decline.
    pub fn decline(&mut self, driver_id: &str) -> Result<Option<Offer>, DeclineError> {
        let d = &mut self.dispatching;
        if d.offer.as_ref().is_some_and(|o| o.driver_id == driver_id) {
            if d.declined.len() == MAX_DECLINED {
                d.declined.remove(0);
            }
            d.declined.push(driver_id.to_string());
            return Ok(d.offer.take());
        }
        if d.declined.iter().any(|x| x == driver_id) {
            return Ok(None);
        }
        Err(DeclineError::NoOffer(driver_id.to_string()))
    }

    /// Once the trip has left BOOKED its offer is over: the offer, unless it was for the
    /// driver now on the trip (whose claim the trip holds), is for the caller to release.
    pub fn settle_offer(&mut self) -> Option<Offer> {
        if self.state == TripState::Booked {
            return None;
        }
        let o = self.dispatching.offer.take()?;
        (o.driver_id != self.driver_id).then_some(o)
    }

    pub fn is_duplicate(&self, ev: &TripEvent) -> bool {
        self.event_ids.contains(&ev.event_id)
    }

    /// Whether `ev` would be accepted now (a duplicate is accepted as a no-op).
    pub fn check(&self, ev: &TripEvent) -> Result<Applied, ApplyError> {
        if self.is_duplicate(ev) {
            return Ok(Applied::Duplicate);
        }
        if !ev.kind.allowed_from().contains(&self.state) {
            return Err(ApplyError::Invalid { state: self.state, event: ev.kind.name() });
        }
        Ok(Applied::Changed { from: Some(self.state) })
    }

    /// Applies one event at server time `now_ms`.
    pub fn apply(&mut self, ev: &TripEvent, now_ms: i64, cfg: &TripConfig) -> Result<Applied, ApplyError> {
        let outcome = self.check(ev)?;
        if outcome == Applied::Duplicate {
            return Ok(outcome);
        }
        match &ev.kind {
            EventKind::BookingCreated { .. } => unreachable!("allowed from no state"),
            EventKind::DriverAssigned { driver_id, vehicle } => {
                self.driver_id = driver_id.clone();
                self.vehicle = vehicle.clone();
                self.assigned_ms = now_ms;
            }
            EventKind::DriverArrived => self.arrived_ms = now_ms,
            EventKind::PassengerCarry => {
                self.carry_ms = now_ms;
                // The trip proper starts here: the route and distance count from the
                // driver's current position.
                self.anchor = self.driver_pos;
                if let Some(p) = self.driver_pos {
                    self.route.push(RoutePoint { lat: p.lat, lon: p.lon, timestamp_ms: p.timestamp_ms });
                }
            }
            EventKind::PassengerDropped => self.dropped_ms = now_ms,
            EventKind::Cancelled => self.cancelled_ms = now_ms,
        }
        self.state = ev.kind.target();
        self.expires_ms = if self.state.is_final() {
            now_ms + cfg.linger_ms
        } else {
            now_ms + self.estimated_drive_s as i64 * 1000 + cfg.buffer_ms
        };
        if self.event_ids.len() >= MAX_EVENT_IDS {
            self.event_ids.remove(0);
        }
        self.event_ids.push(ev.event_id.clone());
        self.version += 1;
        Ok(outcome)
    }

    /// A fix of `driver_id`. Taken only from the assigned driver while the trip has one
    /// and only if newer than the last; during PASSENGER_CARRY it extends the route and
    /// the distance (moves within the fixes' accuracy are jitter and do not count).
    pub fn on_fix(&mut self, driver_id: &str, f: Position, cfg: &TripConfig) -> FixOutcome {
        let mut out = FixOutcome::default();
        if !self.state.has_driver() || driver_id != self.driver_id {
            return out;
        }
        if self.driver_pos.is_some_and(|p| p.timestamp_ms >= f.timestamp_ms) {
            return out;
        }
        out.taken = true;
        self.driver_pos = Some(f);
        self.version += 1;
        if self.state == TripState::DriverAssigned
            && !self.near_pickup
            && haversine_m(f.lat, f.lon, self.pickup.lat, self.pickup.lon) <= cfg.near_pickup_m
        {
            self.near_pickup = true;
            out.near_pickup = true;
        }
        if self.state != TripState::PassengerCarry {
            return out;
        }
        match self.anchor {
            None => {
                self.anchor = Some(f);
                self.push_route(f, cfg);
            }
            Some(a) => {
                let d = haversine_m(a.lat, a.lon, f.lat, f.lon);
                if d > a.accuracy_m.max(f.accuracy_m).max(MIN_STEP_M) {
                    self.distance_m += d;
                    self.anchor = Some(f);
                    self.push_route(f, cfg);
                }
            }
        }
        out
    }

    fn push_route(&mut self, f: Position, cfg: &TripConfig) {
        if let Some(last) = self.route.last()
            && haversine_m(last.lat, last.lon, f.lat, f.lon) < self.route_step_m
        {
            return;
        }
        self.route.push(RoutePoint { lat: f.lat, lon: f.lon, timestamp_ms: f.timestamp_ms });
        if self.route.len() > cfg.route_max.max(4) {
            // Keep every other point (and the newest): the route keeps its shape at
            // half the resolution, and later points are spaced to match.
            let last = *self.route.last().expect("non-empty");
            let mut i = 0;
            self.route.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            if self.route.last() != Some(&last) {
                self.route.push(last);
            }
            self.route_step_m = (self.route_step_m * 2.0).max(10.0);
        }
    }

    /// Fare so far: base + per km driven with the passenger + per minute of carriage.
    pub fn fare(&self, now_ms: i64, cfg: &TripConfig) -> f64 {
        if self.carry_ms == 0 {
            return 0.0;
        }
        let end = if self.dropped_ms > 0 { self.dropped_ms } else { now_ms };
        let minutes = (end - self.carry_ms).max(0) as f64 / 60_000.0;
        let f = cfg.fare;
        ((f.base + f.per_km * self.distance_m / 1000.0 + f.per_min * minutes) * 100.0).round() / 100.0
    }

    /// The public share link answers only from PASSENGER_CARRY until the trip expires.
    pub fn shareable(&self, now_ms: i64) -> bool {
        matches!(self.state, TripState::PassengerCarry | TripState::PassengerDropped) && now_ms < self.expires_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, kind: EventKind) -> TripEvent {
        TripEvent { trip_id: "t1".into(), event_id: id.into(), kind }
    }

    fn booked(cfg: &TripConfig) -> Trip {
        let kind = EventKind::BookingCreated {
            pickup: LatLon { lat: 52.52, lon: 13.40 },
            dropoff: LatLon { lat: 52.50, lon: 13.45 },
            estimated_drive_s: 600,
        };
        Trip::create(&ev("e1", kind), 1_000, cfg).unwrap()
    }

    fn assigned(cfg: &TripConfig) -> Trip {
        let mut t = booked(cfg);
        let kind = EventKind::DriverAssigned { driver_id: "d1".into(), vehicle: Vehicle::default() };
        t.apply(&ev("e2", kind), 2_000, cfg).unwrap();
        t
    }

    fn fix(lat: f64, lon: f64, ts: i64, acc: f64) -> Position {
        Position { lat, lon, accuracy_m: acc, timestamp_ms: ts, ..Default::default() }
    }

    fn offer(driver: &str, expires_ms: i64) -> Offer {
        Offer {
            driver_id: driver.into(),
            lat: 52.53,
            lon: 13.40,
            vehicle_type: String::new(),
            distance_m: 1_100.0,
            expires_ms,
        }
    }

    #[test]
    fn records_without_an_offer_still_read_and_offers_round_trip() {
        let cfg = TripConfig::default();
        let mut t = booked(&cfg);
        // A record written before trips had offers: the trip alone.
        let old = postcard::to_allocvec(&t).unwrap();
        assert_eq!(old, t.encode().unwrap(), "no offer, nothing appended");
        assert_eq!(Trip::decode(&old).unwrap(), t);
        t.dispatching.offer = Some(offer("d1", 5_000));
        t.dispatching.declined = vec!["d0".into()];
        let new = t.encode().unwrap();
        assert_eq!(Trip::decode(&new).unwrap(), t);
        // A reader without offers reads the trip and ignores what follows.
        let plain: Trip = postcard::from_bytes(&new).unwrap();
        assert_eq!(plain.trip_id, t.trip_id);
        assert!(Trip::decode(&new[..new.len() - 1]).is_err(), "a cut record is refused");
    }

    #[test]
    fn one_pending_offer_declines_and_settling() {
        let cfg = TripConfig::default();
        let mut t = booked(&cfg);
        assert_eq!(t.pending_offer(2_000), None);
        t.dispatching.offer = Some(offer("d1", 5_000));
        assert_eq!(t.pending_offer(4_999).map(|o| o.driver_id.as_str()), Some("d1"));
        assert_eq!(t.pending_offer(5_000), None, "lapsed at its expiry");
        // Declines: only the offered driver; repeated, harmless; remembered, bounded.
        assert_eq!(t.decline("d2"), Err(DeclineError::NoOffer("d2".into())));
        assert_eq!(t.decline("d1").unwrap().map(|o| o.driver_id), Some("d1".into()));
        assert_eq!(t.decline("d1"), Ok(None));
        assert_eq!(t.dispatching.offer, None);
        for i in 0..MAX_DECLINED + 3 {
            t.dispatching.offer = Some(offer(&format!("x{i}"), 5_000));
            t.decline(&format!("x{i}")).unwrap();
        }
        assert_eq!(t.dispatching.declined.len(), MAX_DECLINED);
        assert_eq!(t.dispatching.declined[0], "x3", "the oldest are forgotten");
        // Assigned to the offered driver: nothing to release; to another: release it.
        t.dispatching.offer = Some(offer("d1", 5_000));
        assert_eq!(t.settle_offer(), None, "still BOOKED: the offer stands");
        let kind = EventKind::DriverAssigned { driver_id: "d1".into(), vehicle: Vehicle::default() };
        t.apply(&ev("e2", kind), 3_000, &cfg).unwrap();
        assert_eq!(t.settle_offer(), None);
        assert_eq!(t.dispatching.offer, None);
        assert_eq!(t.pending_offer(3_000), None);
        let mut t = booked(&cfg);
        t.dispatching.offer = Some(offer("d1", 5_000));
        let kind = EventKind::DriverAssigned { driver_id: "d9".into(), vehicle: Vehicle::default() };
        t.apply(&ev("e2", kind), 3_000, &cfg).unwrap();
        assert_eq!(t.settle_offer().map(|o| o.driver_id), Some("d1".into()));
        // Cancelled with an offer pending: release it.
        let mut t = booked(&cfg);
        t.dispatching.offer = Some(offer("d1", 5_000));
        t.apply(&ev("c", EventKind::Cancelled), 3_000, &cfg).unwrap();
        assert_eq!(t.settle_offer().map(|o| o.driver_id), Some("d1".into()));
    }

    #[test]
    fn lifecycle_ttls_and_duplicates() {
        let cfg = TripConfig::default();
        let mut t = booked(&cfg);
        assert_eq!(t.expires_ms, 1_000 + 600_000 + cfg.buffer_ms);
        // Out of order: FAILED_PRECONDITION with the current state.
        let err = t.apply(&ev("x", EventKind::PassengerDropped), 1_500, &cfg).unwrap_err();
        assert_eq!(err, ApplyError::Invalid { state: TripState::Booked, event: "PASSENGER_DROPPED" });
        let kind = EventKind::DriverAssigned { driver_id: "d1".into(), vehicle: Vehicle::default() };
        assert_eq!(
            t.apply(&ev("e2", kind.clone()), 2_000, &cfg),
            Ok(Applied::Changed { from: Some(TripState::Booked) })
        );
        let v = t.version;
        assert_eq!(t.apply(&ev("e2", kind), 9_000, &cfg), Ok(Applied::Duplicate));
        assert_eq!(t.version, v, "a duplicate changes nothing");
        assert_eq!(t.expires_ms, 2_000 + 600_000 + cfg.buffer_ms);
        t.apply(&ev("e3", EventKind::DriverArrived), 3_000, &cfg).unwrap();
        assert_eq!(t.expires_ms, 3_000 + 600_000 + cfg.buffer_ms, "pushed forward");
        assert!(!t.shareable(3_000));
        t.apply(&ev("e4", EventKind::PassengerCarry), 4_000, &cfg).unwrap();
        assert!(t.shareable(4_000));
        assert!(t.apply(&ev("e5", EventKind::Cancelled), 4_500, &cfg).is_err(), "no cancel once carried");
        t.apply(&ev("e6", EventKind::PassengerDropped), 5_000, &cfg).unwrap();
        assert_eq!(t.expires_ms, 5_000 + cfg.linger_ms);
        assert!(t.shareable(5_000 + cfg.linger_ms - 1));
        assert!(!t.shareable(5_000 + cfg.linger_ms));
        assert!(Trip::create(&ev("e7", EventKind::DriverArrived), 0, &cfg).is_err());
    }

    #[test]
    fn distance_ignores_jitter_and_fare_adds_up() {
        let cfg = TripConfig::default();
        let mut t = assigned(&cfg);
        // Before carriage: position only.
        assert!(t.on_fix("d1", fix(52.52, 13.40, 10, 5.0), &cfg).taken);
        assert!(!t.on_fix("d2", fix(52.52, 13.40, 11, 5.0), &cfg).taken, "not the assigned driver");
        assert!(!t.on_fix("d1", fix(52.52, 13.40, 10, 5.0), &cfg).taken, "not newer");
        t.apply(&ev("e3", EventKind::PassengerCarry), 60_000, &cfg).unwrap();
        // Jitter: 3 m moves with 10 m accuracy do not count.
        let mut ts = 20;
        for i in 0..20 {
            let d = if i % 2 == 0 { 0.00003 } else { 0.0 };
            t.on_fix("d1", fix(52.52 + d, 13.40, ts, 10.0), &cfg);
            ts += 1;
        }
        assert_eq!(t.distance_m, 0.0);
        // Then 10 steps of about 111 m north.
        for i in 1..=10 {
            t.on_fix("d1", fix(52.52 + 0.001 * i as f64, 13.40, ts, 10.0), &cfg);
            ts += 1;
        }
        assert!((t.distance_m - 1112.0).abs() < 5.0, "{}", t.distance_m);
        assert_eq!(t.route.len(), 11);
        // 1.112 km and 2 minutes: 3.5 + 1.2 * 1.112 + 0.3 * 2.
        let fare = t.fare(180_000, &cfg);
        assert!((fare - (3.5 + 1.2 * 1.112 + 0.6)).abs() < 0.02, "{fare}");
    }

    #[test]
    fn near_pickup_fires_once() {
        let cfg = TripConfig::default();
        let mut t = assigned(&cfg);
        assert!(!t.on_fix("d1", fix(52.53, 13.40, 10, 5.0), &cfg).near_pickup, "1.1 km away");
        assert!(t.on_fix("d1", fix(52.5205, 13.40, 11, 5.0), &cfg).near_pickup);
        assert!(!t.on_fix("d1", fix(52.5204, 13.40, 12, 5.0), &cfg).near_pickup);
    }

    #[test]
    fn route_is_bounded_and_down_sampled() {
        let cfg = TripConfig { route_max: 64, ..TripConfig::default() };
        let mut t = assigned(&cfg);
        t.apply(&ev("e3", EventKind::PassengerCarry), 0, &cfg).unwrap();
        for i in 0..2_000 {
            t.on_fix("d1", fix(52.52 + 0.0002 * i as f64, 13.40, 100 + i, 3.0), &cfg);
        }
        assert!(t.route.len() <= 65, "{}", t.route.len());
        assert!(t.route.len() >= 16, "{}", t.route.len());
        let (last, pos) = (t.route.last().unwrap(), t.driver_pos.unwrap());
        assert_eq!(pos.timestamp_ms, 100 + 1_999);
        let gap = haversine_m(last.lat, last.lon, pos.lat, pos.lon);
        assert!(gap <= t.route_step_m, "the route reaches the driver within its spacing: {gap} m");
        assert!((t.distance_m - 1999.0 * 22.24).abs() < 100.0, "distance is not down-sampled: {}", t.distance_m);
        assert!(t.route.windows(2).all(|w| w[0].timestamp_ms < w[1].timestamp_ms));
    }
}
