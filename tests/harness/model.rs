//! What the cluster acknowledged, recorded by the harness's clients, and the checks
//! that read it back: the invariants of a lossless, single-owner cluster.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use locus::geo::haversine_m;
use locus::pb;
use tokio::time::Instant;

use super::Sim;
pub use crate::common::{CENTRE, by_id, event, fix, home, match_req};

/// Driver fixes acknowledged this long before a crash must survive it (the documented
/// replication lag is about 1 s: a persist interval, a sync and a call).
pub const LOSS_WINDOW: Duration = Duration::from_millis(1500);

#[derive(Clone, Debug)]
pub struct Fix {
    pub ts: i64,
    pub lat: f64,
    pub lon: f64,
    pub acked: Instant,
    /// The node that acknowledged it.
    pub via: usize,
}

/// A match call under way.
type MatchCall = tokio::task::JoinHandle<Result<tonic::Response<pb::MatchResponse>, tonic::Status>>;

#[derive(Default)]
pub struct Model {
    /// Fleet size.
    drivers: usize,
    /// driver id -> every fix acknowledged, in order.
    pub fixes: BTreeMap<String, Vec<Fix>>,
    /// trip id -> (state name, driver id) as last acknowledged.
    pub trips: BTreeMap<String, (String, String)>,
    /// driver id -> the status its claim implies (DISPATCHED or ON_TRIP).
    pub claimed: HashMap<String, i32>,
    crashes: Vec<Instant>,
    next_trip: usize,
    /// Matches sent to a node that was frozen meanwhile: trip id and the call.
    in_flight: Vec<(String, MatchCall)>,
    /// Operations by outcome, for the closing summary.
    pub ok: u64,
    pub failed: u64,
}

fn driver_id(i: usize) -> String {
    format!("drv-{i}")
}

/// A booking that outlives any scenario (2 h drive): trips expire only where a
/// scenario asks for it.
pub fn booking(trip: &str) -> pb::TripEvent {
    pb::TripEvent { estimated_drive_s: 7_200, ..crate::common::booking(trip) }
}

impl Model {
    pub fn new() -> Model {
        Model { drivers: 150, ..Default::default() }
    }

    pub fn crashed(&mut self, at: Instant) {
        self.crashes.push(at);
    }

    /// The latest fix of `d` that no crash followed within the loss window: what a read
    /// must return at least.
    fn floor(&self, fixes: &[Fix]) -> Option<usize> {
        fixes.iter().rposition(|f| !self.crashes.iter().any(|c| *c >= f.acked && *c <= f.acked + LOSS_WINDOW))
    }

    /// `n` fixes through random live nodes, 5 ms apart: each driver moves ~3 m from
    /// where it was.
    pub async fn send_fixes(&mut self, sim: &mut Sim, n: usize, stage: &str) {
        for _ in 0..n {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let i = sim.rand(self.drivers);
            let id = driver_id(i);
            let (mut lat, mut lon) = home(i);
            let mut ts = locus::clock::wall_ms();
            if let Some(last) = self.fixes.get(&id).and_then(|f| f.last()) {
                (lat, lon) = (last.lat + 0.00003 * (sim.rand(3) as f64 - 1.0), last.lon + 0.00003);
                ts = ts.max(last.ts + 200);
            }
            let via = sim.any();
            match sim.locations(via).update(fix(&id, lat, lon, ts)).await {
                Ok(_) => {
                    self.ok += 1;
                    self.fixes.entry(id).or_default().push(Fix { ts, lat, lon, acked: Instant::now(), via });
                }
                Err(s) => {
                    self.failed += 1;
                    let retryable = matches!(s.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted);
                    assert!(retryable, "{stage}: fix for {id} via n{via}: {s:?}");
                }
            }
        }
    }

    /// Books `n` trips through random nodes: matches about half, puts half of those on
    /// board. A refused step (UNAVAILABLE during a move) is retried on another node.
    pub async fn trips(&mut self, sim: &mut Sim, n: usize, stage: &str) {
        for _ in 0..n {
            let k = self.next_trip;
            self.next_trip += 1;
            let id = format!("trip-{k}");
            if !retry(sim, stage, &id, |sim, via| {
                let mut t = sim.trips(via);
                let ev = booking(&id);
                async move { t.apply(ev).await.map(|_| ()) }
            })
            .await
            {
                continue;
            }
            self.trips.insert(id.clone(), ("BOOKING_CREATED".into(), String::new()));
            if k % 2 == 1 {
                continue;
            }
            let via = sim.any();
            let m = match sim.dispatch(via).r#match(match_req(&id)).await {
                Ok(m) => m.into_inner(),
                Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted) => {
                    // Unknown outcome: the trip may hold a claim now; leave it out of
                    // the claim checks (the probes still catch a double assignment).
                    self.failed += 1;
                    self.trips.remove(&id);
                    continue;
                }
                Err(s) => panic!("{stage}: match {id} via n{via}: {s:?}"),
            };
            self.ok += 1;
            assert!(
                !self.claimed.contains_key(&m.driver_id),
                "{stage}: {} matched to {id} while claimed for another trip",
                m.driver_id
            );
            self.claimed.insert(m.driver_id.clone(), pb::DriverStatus::Dispatched as i32);
            if !k.is_multiple_of(4) {
                continue;
            }
            let steps = [
                ("a", pb::TripEventType::DriverAssigned, m.driver_id.as_str()),
                ("p", pb::TripEventType::PassengerCarry, ""),
            ];
            let mut done = true;
            for (suffix, ty, driver) in steps {
                let ok = retry(sim, stage, &id, |sim, via| {
                    let mut t = sim.trips(via);
                    let ev = event(&id, suffix, ty, driver);
                    async move { t.apply(ev).await.map(|_| ()) }
                })
                .await;
                done &= ok;
            }
            if done {
                self.claimed.insert(m.driver_id.clone(), pb::DriverStatus::OnTrip as i32);
                self.trips.insert(id, ("PASSENGER_CARRY".into(), m.driver_id));
            } else {
                self.trips.remove(&id);
                self.claimed.remove(&m.driver_id);
            }
        }
    }

    /// Books `n` trips through other nodes, then sends their matches through node `via`
    /// and lets them get under way (the caller freezes `via` next).
    pub async fn matches_in_flight(&mut self, sim: &mut Sim, via: usize, n: usize, stage: &str) {
        for _ in 0..n {
            let id = format!("trip-{}", self.next_trip);
            self.next_trip += 1;
            let booked = retry(sim, stage, &id, |sim, v| {
                let mut t = sim.trips(v);
                let ev = booking(&id);
                async move { t.apply(ev).await.map(|_| ()) }
            })
            .await;
            if booked {
                self.trips.insert(id.clone(), ("BOOKING_CREATED".into(), String::new()));
                let mut d = sim.dispatch(via);
                let req = match_req(&id);
                // Staggered: when the node stops, some are done, some waiting on a
                // scatter, a claim, a flush or a replica, some not yet begun.
                let start = 3 * self.in_flight.len();
                let call = tokio::spawn(async move {
                    for _ in 0..start {
                        tokio::task::yield_now().await;
                    }
                    d.r#match(req).await
                });
                self.in_flight.push((id, call));
            }
        }
        for _ in 0..4 + sim.rand(8) {
            tokio::task::yield_now().await;
        }
        let done = self.in_flight.iter().filter(|c| c.1.is_finished()).count();
        eprintln!("[sim] {done} of {} matches through n{via} done before it stops", self.in_flight.len());
    }

    /// Waits for the matches in flight through a node that was frozen: one that
    /// succeeds holds its driver (who must not be held by another trip); a refused one
    /// leaves its trip's claim unknown, so the trip leaves the claim checks.
    pub async fn settle_in_flight(&mut self, stage: &str) {
        for (id, call) in std::mem::take(&mut self.in_flight) {
            match tokio::time::timeout(Duration::from_secs(60), call).await {
                Ok(Ok(Ok(m))) => {
                    let m = m.into_inner();
                    eprintln!("[sim] {id}: a match in flight through the frozen node got {}", m.driver_id);
                    self.ok += 1;
                    assert!(
                        !self.claimed.contains_key(&m.driver_id),
                        "{stage}: {} matched to {id} by the frozen node while claimed for another trip",
                        m.driver_id
                    );
                    self.claimed.insert(m.driver_id, pb::DriverStatus::Dispatched as i32);
                }
                Ok(Ok(Err(s))) => {
                    eprintln!("[sim] {id}: a match in flight through the frozen node ended with {s:?}");
                    self.failed += 1;
                    self.trips.remove(&id);
                }
                Ok(Err(e)) => panic!("{stage}: match {id} task: {e}"),
                Err(_) => panic!("{stage}: match {id} through a thawed node never answered"),
            }
        }
    }

    /// Every invariant, through every node listed.
    pub async fn check(&self, sim: &mut Sim, nodes: &[usize], stage: &str) {
        // Every driver: present with a fix it was acknowledged at, no older than its
        // floor; held by exactly one node.
        let mut positions: Vec<(String, f64, f64)> = Vec::new();
        for (id, fixes) in &self.fixes {
            let via = nodes[sim.rand(nodes.len())];
            let floor = self.floor(fixes);
            let got = patient(|| {
                let mut c = sim.locations(via);
                async move { c.get_driver(by_id(id)).await }
            })
            .await;
            let d = match got {
                Ok(d) => d.into_inner(),
                Err(s) if s.code() == tonic::Code::NotFound && floor.is_none() => continue,
                Err(s) => panic!("{stage}: {id} via n{via}: {s:?} (acked {fixes:?}, crashes {:?})", self.crashes),
            };
            let at = fixes.iter().position(|f| f.ts == d.timestamp_ms);
            let at = at.unwrap_or_else(|| panic!("{stage}: {id} at ts {} was never acknowledged", d.timestamp_ms));
            if let Some(floor) = floor {
                let p = locus::keys::partition_of(id.as_bytes());
                assert!(at >= floor, "{stage}: {id} (p{p}) went back to fix {at} of {fixes:?} (floor {floor})");
            }
            let f = &fixes[at];
            assert!((f.lat - d.lat).abs() < 1e-6 && (f.lon - d.lon).abs() < 1e-6, "{stage}: {id} position");
            if let Some(status) = self.claimed.get(id) {
                assert_eq!(d.status, *status, "{stage}: {id}'s claim via n{via}");
            }
            positions.push((id.clone(), d.lat, d.lon));
            let mut holders = Vec::new();
            for &i in nodes {
                let mut req = tonic::Request::new(by_id(id));
                req.metadata_mut().insert("locus-scope", "local".parse().unwrap());
                if sim.locations(i).get_driver(req).await.is_ok() {
                    holders.push(i);
                }
            }
            assert_eq!(holders.len(), 1, "{stage}: {id} held by {holders:?}");
        }
        for &i in nodes {
            // Every trip answers with the state it was left in.
            for (id, (state, driver)) in &self.trips {
                let r = patient(|| {
                    let mut c = sim.trips(i);
                    let req = pb::GetTripRequest { trip_id: id.clone(), include_route: false };
                    async move { c.get_trip(req).await }
                })
                .await;
                let trip = r.unwrap_or_else(|s| panic!("{stage}: trip {id} via n{i}: {s:?}")).into_inner();
                assert_eq!((&trip.state_name, &trip.driver_id), (state, driver), "{stage}: trip {id} via n{i}");
            }
            // Nearby equals brute force over what the reads returned.
            let k = 40;
            let r = sim
                .locations(i)
                .nearby(pb::NearbyRequest { lat: CENTRE.0, lon: CENTRE.1, limit: k, ..Default::default() })
                .await
                .unwrap_or_else(|s| panic!("{stage}: nearby via n{i}: {s:?}"))
                .into_inner();
            assert!(!r.partial, "{stage}: partial via n{i}");
            let mut want: Vec<(f64, &String)> =
                positions.iter().map(|d| (haversine_m(CENTRE.0, CENTRE.1, d.1, d.2), &d.0)).collect();
            want.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(y.1)));
            let want: Vec<&String> = want.into_iter().take(k as usize).map(|x| x.1).collect();
            let got: Vec<&String> = r.drivers.iter().map(|d| &d.driver_id).collect();
            assert_eq!(got, want, "{stage}: nearby via n{i}");
        }
        // No claimed driver is matched again.
        for k in 0..3 {
            let via = nodes[k % nodes.len()];
            let tag: String = stage.chars().filter(|c| c.is_ascii_alphanumeric()).take(12).collect();
            let trip = format!("probe-{tag}-{k}");
            sim.trips(via).apply(booking(&trip)).await.unwrap_or_else(|s| panic!("{stage}: probe booking: {s:?}"));
            let r = sim.dispatch(via).r#match(match_req(&trip)).await;
            let r = r.unwrap_or_else(|s| panic!("{stage}: probe match via n{via}: {s:?}")).into_inner();
            assert!(!self.claimed.contains_key(&r.driver_id), "{stage}: {} matched twice", r.driver_id);
            sim.trips(via).apply(event(&trip, "c", pb::TripEventType::Cancelled, "")).await.unwrap();
        }
    }
}

/// A read as a production client makes it: `UNAVAILABLE` (a node regaining its lease,
/// a partition moving) is retried after the server's hint, for up to 5 s of virtual
/// time. The checks are about what is read, not about a moment's availability.
async fn patient<T, F, Fut>(mut f: F) -> Result<tonic::Response<T>, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let t0 = Instant::now();
    loop {
        match f().await {
            Err(s) if s.code() == tonic::Code::Unavailable && t0.elapsed() < Duration::from_secs(5) => {
                eprintln!("[sim] retrying a read: {}", s.message());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            r => return r,
        }
    }
}

/// Runs `f` through random live nodes until it succeeds; UNAVAILABLE and
/// RESOURCE_EXHAUSTED are retried (for up to a minute of virtual time), any other
/// error fails the test. False if it never succeeded.
async fn retry<F, Fut>(sim: &mut Sim, stage: &str, what: &str, mut f: F) -> bool
where
    F: FnMut(&Sim, usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let t0 = Instant::now();
    loop {
        let via = sim.any();
        match f(sim, via).await {
            Ok(()) => return true,
            Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted) => {
                if t0.elapsed() > Duration::from_secs(60) {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("{stage}: {what} via n{via}: {s:?}"),
        }
    }
}
