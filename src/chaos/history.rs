//! The chaos suite's clients and the history they record: every operation with its
//! outcome (ok, failed, unknown) and times, as a production client sees it.
//!
//! - **Gateways**: `drivers` drivers (`chk-d*`), each sending one fix a second (unary
//!   `Update`) through a random node.
//! - **Riders**: trips booked, matched, assigned, carried and dropped through random
//!   nodes; one in four matched trips leaves its offer to lapse (an offer timer); one in
//!   three is booked with a 1 s drive and abandoned, to expire (a trip timer). Trip
//!   events are retried with their event id (idempotent) until an answer is certain;
//!   `Match` is not retried (it is not idempotent yet).
//! - **Event watchers**: one `Events.Subscribe` per node for trips' `EXPIRED`, re-opened
//!   when it ends: a timer that fires twice shows twice on a subscription that saw both.
//!
//! Outcomes: `ok`; `failed` when the answer says nothing was applied (invalid,
//! unauthenticated, overloaded, not found...); `unknown` when it may have been
//! (unavailable, deadline, transport error).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Code;
use tonic::codegen::http::HeaderValue;
use tonic::transport::Endpoint;

use crate::auth::layer::AuthChannel;
use crate::pb;
use crate::pb::dispatch_client::DispatchClient;
use crate::pb::events_client::EventsClient;
use crate::pb::locations_client::LocationsClient;
use crate::pb::trips_client::TripsClient;

/// Where the fleet is.
pub const CENTRE: (f64, f64) = (52.52, 13.405);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Unknown,
}

pub fn outcome(s: &tonic::Status) -> Outcome {
    match s.code() {
        Code::InvalidArgument
        | Code::Unauthenticated
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::ResourceExhausted
        | Code::NotFound
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::Unimplemented => Outcome::Failed,
        _ => Outcome::Unknown,
    }
}

#[derive(Clone, Debug)]
pub struct FixOp {
    pub ts: i64,
    pub lat: f64,
    pub lon: f64,
    pub done: Instant,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Default)]
pub struct TripRec {
    /// Booked with a 1 s drive and abandoned: its TTL timer must fire.
    pub short: bool,
    /// When it is due to expire (short trips, once booked).
    pub due: Option<Instant>,
    /// The state and driver the last acknowledged event left it in.
    pub state: Option<(String, String)>,
    /// An event whose outcome stayed unknown: the state is not certain.
    pub uncertain: bool,
}

/// A claim the history proves: held by `trip` from `from` until at least `until`.
#[derive(Clone, Debug)]
pub struct Hold {
    pub driver: String,
    pub trip: String,
    /// Match sent / answered.
    pub sent: Instant,
    pub acked: Instant,
    /// Certainly held until then (the first release sent, or the offer's lapse).
    pub until: Instant,
}

#[derive(Default)]
pub struct History {
    pub fixes: HashMap<String, Vec<FixOp>>,
    pub trips: HashMap<String, TripRec>,
    pub holds: Vec<Hold>,
    /// Fault windows (start, end): fixes acknowledged within the loss window before a
    /// start, or during a window, may be lost.
    pub faults: Vec<(Instant, Instant)>,
    /// trip -> EXPIRED count per subscription.
    pub expired: HashMap<String, HashMap<u64, u32>>,
    pub ok: u64,
    pub failed: u64,
    pub unknown: u64,
}

impl History {
    fn count(&mut self, o: Outcome) {
        match o {
            Outcome::Ok => self.ok += 1,
            Outcome::Failed => self.failed += 1,
            Outcome::Unknown => self.unknown += 1,
        }
    }
}

/// The nodes clients may send to (changes as the cluster scales).
#[derive(Clone)]
pub struct Targets {
    inner: Arc<RwLock<Vec<(String, AuthChannel)>>>,
    token: HeaderValue,
}

impl Targets {
    pub fn new(token: HeaderValue) -> Targets {
        Targets { inner: Arc::default(), token }
    }

    pub fn set(&self, urls: &[String]) {
        let mut v = self.inner.write().expect("targets lock");
        v.retain(|(u, _)| urls.contains(u));
        for u in urls {
            if !v.iter().any(|(x, _)| x == u) {
                let ch = Endpoint::from_shared(u.clone())
                    .expect("a valid URL")
                    .connect_timeout(Duration::from_secs(1))
                    .timeout(Duration::from_secs(3))
                    .tcp_nodelay(true)
                    .connect_lazy();
                v.push((u.clone(), AuthChannel::new(ch, Some(self.token.clone()))));
            }
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.inner.read().expect("targets lock").iter().map(|(u, _)| u.clone()).collect()
    }

    /// A channel to a random node.
    pub fn any(&self) -> AuthChannel {
        let v = self.inner.read().expect("targets lock");
        v[rand::random_range(0..v.len())].1.clone()
    }

    pub fn to(&self, url: &str) -> Option<AuthChannel> {
        self.inner.read().expect("targets lock").iter().find(|(u, _)| u == url).map(|(_, c)| c.clone())
    }

    /// A channel for a long-lived stream (no request deadline).
    pub fn stream_to(&self, url: &str) -> AuthChannel {
        let ch = Endpoint::from_shared(url.to_string())
            .expect("a valid URL")
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        AuthChannel::new(ch, Some(self.token.clone()))
    }
}

/// The workload's settings.
#[derive(Clone, Debug)]
pub struct Load {
    pub drivers: usize,
    pub riders: usize,
    /// The cluster's `--offer-timeout` and `--trip-buffer`.
    pub offer_timeout: Duration,
    pub trip_buffer: Duration,
    /// Trip ids start with this (one prefix per scenario).
    pub prefix: String,
}

fn home(i: usize) -> (f64, f64) {
    let a = i as f64 * 2.399_963; // the golden angle: an even spread
    let r = 0.02 * ((i % 97) as f64 / 97.0).sqrt();
    (CENTRE.0 + r * a.cos(), CENTRE.1 + r * a.sin() * 1.6)
}

/// Runs the workload until `stop` turns true; the history is in `h`.
pub async fn run(load: Load, targets: Targets, h: Arc<Mutex<History>>, stop: watch::Receiver<bool>) {
    let mut tasks = Vec::new();
    let per = load.drivers.div_ceil(4).max(1);
    for g in 0..4 {
        let ids: Vec<usize> = (g * per..((g + 1) * per).min(load.drivers)).collect();
        tasks.push(tokio::spawn(gateway(ids, targets.clone(), h.clone(), stop.clone())));
    }
    for r in 0..load.riders {
        tasks.push(tokio::spawn(rider(r, load.clone(), targets.clone(), h.clone(), stop.clone())));
    }
    for url in targets.urls() {
        tasks.push(tokio::spawn(watch_expiries(url, targets.clone(), h.clone(), stop.clone())));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn gateway(ids: Vec<usize>, targets: Targets, h: Arc<Mutex<History>>, stop: watch::Receiver<bool>) {
    let mut pos: Vec<(f64, f64)> = ids.iter().map(|i| home(*i)).collect();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_ts = 0i64;
    while !*stop.borrow() {
        tick.tick().await;
        for (k, i) in ids.iter().enumerate() {
            if *stop.borrow() {
                return;
            }
            let id = format!("chk-d{i}");
            pos[k].0 += 0.00002 * ((rand::random::<f64>()) - 0.5);
            pos[k].1 += 0.00002 * ((rand::random::<f64>()) - 0.5);
            let ts = crate::clock::wall_ms().max(last_ts + 1);
            last_ts = ts;
            let (lat, lon) = pos[k];
            let fix = pb::LocationUpdate {
                driver_id: id.clone(),
                lat,
                lon,
                timestamp_ms: ts,
                status: pb::DriverStatus::Available as i32,
                ..Default::default()
            };
            let mut c = LocationsClient::new(targets.any());
            let o = match c.update(fix).await {
                Ok(_) => Outcome::Ok,
                Err(s) => outcome(&s),
            };
            let mut hh = h.lock().expect("history lock");
            hh.count(o);
            hh.fixes.entry(id).or_default().push(FixOp { ts, lat, lon, done: Instant::now(), outcome: o });
        }
    }
}

fn trip_event(trip: &str, suffix: &str, t: pb::TripEventType, driver: &str) -> pb::TripEvent {
    pb::TripEvent {
        trip_id: trip.into(),
        event_id: format!("{trip}-{suffix}"),
        r#type: t as i32,
        driver_id: driver.into(),
        vehicle: (!driver.is_empty()).then(|| pb::Vehicle { cab_number: "CHK".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// Applies one trip event, retried with its id (idempotent) through other nodes while
/// the answer is uncertain, for up to 10 s.
async fn apply(targets: &Targets, ev: pb::TripEvent, h: &Mutex<History>) -> Outcome {
    let t0 = Instant::now();
    loop {
        let mut c = TripsClient::new(targets.any());
        let o = match c.apply(ev.clone()).await {
            Ok(_) => Outcome::Ok,
            Err(s) => outcome(&s),
        };
        if o != Outcome::Unknown || t0.elapsed() > Duration::from_secs(10) {
            h.lock().expect("history lock").count(o);
            return o;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn rider(r: usize, load: Load, targets: Targets, h: Arc<Mutex<History>>, stop: watch::Receiver<bool>) {
    let mut n = 0usize;
    let nap = || tokio::time::sleep(Duration::from_millis(150 + rand::random_range(0..200)));
    while !*stop.borrow() {
        n += 1;
        let trip = format!("{}-r{r}-{n}", load.prefix);
        let short = n.is_multiple_of(3);
        let booking = pb::TripEvent {
            pickup: Some(pb::Point { lat: CENTRE.0, lon: CENTRE.1 }),
            dropoff: Some(pb::Point { lat: 52.50, lon: 13.45 }),
            estimated_drive_s: if short { 1 } else { 7_200 },
            ..trip_event(&trip, "b", pb::TripEventType::BookingCreated, "")
        };
        let o = apply(&targets, booking, &h).await;
        {
            let mut hh = h.lock().expect("history lock");
            let rec = hh.trips.entry(trip.clone()).or_default();
            rec.short = short;
            match o {
                Outcome::Ok => {
                    rec.state = Some(("BOOKING_CREATED".into(), String::new()));
                    if short {
                        rec.due = Some(Instant::now() + Duration::from_secs(1) + load.trip_buffer);
                    }
                }
                Outcome::Unknown => rec.uncertain = true,
                Outcome::Failed => {}
            }
        }
        if o != Outcome::Ok || short {
            nap().await;
            continue;
        }
        nap().await;
        let sent = Instant::now();
        let req = pb::MatchRequest {
            trip_id: trip.clone(),
            lat: CENTRE.0,
            lon: CENTRE.1,
            radius_m: 50_000.0,
            ..Default::default()
        };
        let m = DispatchClient::new(targets.any()).r#match(req).await;
        let acked = Instant::now();
        let driver = match m {
            Ok(m) => {
                h.lock().expect("history lock").count(Outcome::Ok);
                m.into_inner().driver_id
            }
            Err(s) => {
                let o = outcome(&s);
                {
                    let mut hh = h.lock().expect("history lock");
                    hh.count(o);
                    if o == Outcome::Unknown {
                        // It may hold a driver: the trip's claim is not known.
                        hh.trips.get_mut(&trip).expect("booked").uncertain = true;
                    }
                }
                nap().await;
                continue;
            }
        };
        let lapse = sent + load.offer_timeout.saturating_sub(Duration::from_millis(200));
        if n.is_multiple_of(4) {
            // The offer lapses (its timer); the trip stays BOOKING_CREATED.
            h.lock().expect("history lock").holds.push(Hold { driver, trip, sent, acked, until: lapse });
            nap().await;
            continue;
        }
        nap().await;
        let assigned = apply(&targets, trip_event(&trip, "a", pb::TripEventType::DriverAssigned, &driver), &h).await;
        let mut state = ("DRIVER_ASSIGNED", driver.as_str());
        let mut outcomes = vec![assigned];
        if assigned == Outcome::Ok {
            nap().await;
            let o = apply(&targets, trip_event(&trip, "p", pb::TripEventType::PassengerCarry, ""), &h).await;
            outcomes.push(o);
            if o == Outcome::Ok {
                state = ("PASSENGER_CARRY", driver.as_str());
                nap().await;
            }
        }
        // The first release sent ends what the history can prove of the claim.
        let until = if assigned == Outcome::Ok { Instant::now() } else { lapse };
        let mut drop_o = None;
        if outcomes.iter().all(|o| *o == Outcome::Ok) {
            let o = apply(&targets, trip_event(&trip, "d", pb::TripEventType::PassengerDropped, ""), &h).await;
            if o == Outcome::Ok {
                state = ("PASSENGER_DROPPED", driver.as_str());
            }
            drop_o = Some(o);
        }
        {
            let mut hh = h.lock().expect("history lock");
            hh.holds.push(Hold { driver: driver.clone(), trip: trip.clone(), sent, acked, until });
            let rec = hh.trips.get_mut(&trip).expect("booked");
            let certain = outcomes.into_iter().chain(drop_o).all(|o| o != Outcome::Unknown);
            if !certain {
                rec.uncertain = true;
            } else if assigned != Outcome::Ok {
                // A refused assignment leaves the trip as booked.
                rec.state = Some(("BOOKING_CREATED".into(), String::new()));
            } else {
                rec.state = Some((state.0.to_string(), state.1.to_string()));
            }
        }
        nap().await;
    }
}

async fn watch_expiries(url: String, targets: Targets, h: Arc<Mutex<History>>, stop: watch::Receiver<bool>) {
    static SUBSCRIPTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    while !*stop.borrow() {
        let id = SUBSCRIPTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ch = targets.stream_to(&url);
        let req = pb::SubscribeRequest {
            entity: pb::EntityKind::EntityTrip as i32,
            states: vec!["EXPIRED".into()],
            ..Default::default()
        };
        if let Ok(s) = EventsClient::new(ch).subscribe(req).await {
            let mut s = s.into_inner();
            let mut stop = stop.clone();
            loop {
                tokio::select! {
                    m = s.message() => match m {
                        Ok(Some(ev)) => {
                            let mut hh = h.lock().expect("history lock");
                            *hh.expired.entry(ev.id).or_default().entry(id).or_default() += 1;
                        }
                        _ => break,
                    },
                    _ = stop.changed() => return,
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
