//! Partition hand-off and failover over real node processes: a node joins a loaded
//! cluster, then another leaves; and a node is killed (`kill -9`) and later restarted.
//! Every driver, trip, claim and share link lives on with its new owner: nothing
//! answers NOT_FOUND, no claimed driver becomes matchable again, Nearby equals brute
//! force, and no driver is held by two nodes.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::cluster::TestCluster;
use common::{CENTRE, booking, by_id, event, fix, home, http_get, match_req, now_ms};
use locus::geo::haversine_m;
use locus::pb;
use locus::pb::dispatch_client::DispatchClient;
use locus::pb::events_client::EventsClient;
use locus::pb::trips_client::TripsClient;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

fn drivers(n: usize) -> Vec<(String, f64, f64)> {
    (0..n)
        .map(|i| {
            let (lat, lon) = home(i);
            (format!("drv-{i}"), lat, lon)
        })
        .collect()
}

/// What the cluster acknowledged, to check after every change.
struct Acked {
    drivers: Vec<(String, f64, f64)>,
    /// trip id → (state name, driver id)
    trips: HashMap<String, (String, String)>,
    /// driver id → the status its claim implies (DISPATCHED or ON_TRIP)
    claimed: HashMap<String, i32>,
    /// trip id → the driver of its pending offer (BOOKED trips a Match claimed for)
    offers: HashMap<String, String>,
    shares: Vec<String>,
}

async fn check(c: &TestCluster, nodes: &[usize], a: &Acked, stage: &str) {
    for &i in nodes {
        // Every trip answers, with the state it was left in, through every node.
        let mut t = TripsClient::connect(c.node(i).grpc.clone()).await.unwrap();
        for (id, (state, driver)) in &a.trips {
            let r = t.get_trip(pb::GetTripRequest { trip_id: id.clone(), include_route: false }).await;
            let trip = r.unwrap_or_else(|s| panic!("{stage}: trip {id} via n{i}: {s:?}")).into_inner();
            assert_eq!((&trip.state_name, &trip.driver_id), (state, driver), "{stage}: trip {id} via n{i}");
            let offer = a.offers.get(id).cloned().unwrap_or_default();
            assert_eq!(trip.offer_driver_id, offer, "{stage}: trip {id}'s offer via n{i}");
        }
        // Claimed drivers keep their claims.
        let mut l = c.client(i).await;
        for (d, status) in &a.claimed {
            let got = l.get_driver(by_id(d)).await.unwrap_or_else(|s| panic!("{stage}: {d} via n{i}: {s:?}"));
            assert_eq!(got.into_inner().status, *status, "{stage}: {d}'s claim via n{i}");
        }
        for token in &a.shares {
            let (code, body) = http_get(&c.node(i).http, &format!("/share/{token}")).await;
            assert_eq!(code, 200, "{stage}: share via n{i}: {body}");
        }
        // Nearby equals brute force over every driver.
        let k = 40;
        let r = l
            .nearby(pb::NearbyRequest { lat: CENTRE.0, lon: CENTRE.1, limit: k, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.partial, "{stage}: partial via n{i}");
        let mut want: Vec<(f64, &String)> =
            a.drivers.iter().map(|d| (haversine_m(CENTRE.0, CENTRE.1, d.1, d.2), &d.0)).collect();
        want.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(y.1)));
        let want: Vec<&String> = want.into_iter().take(k as usize).map(|x| x.1).collect();
        let got: Vec<&String> = r.drivers.iter().map(|d| &d.driver_id).collect();
        assert_eq!(got, want, "{stage}: nearby via n{i}");
    }
    // One holder per driver.
    for (d, _, _) in &a.drivers {
        let mut holders = Vec::new();
        for &i in nodes {
            let mut cl = c.client(i).await;
            let mut req = tonic::Request::new(by_id(d));
            req.metadata_mut().insert("locus-scope", "local".parse().unwrap());
            if cl.get_driver(req).await.is_ok() {
                holders.push(i);
            }
        }
        assert_eq!(holders.len(), 1, "{stage}: {d} held by {holders:?}");
    }
    // No claimed driver can be matched again.
    let mut m = DispatchClient::connect(c.node(nodes[0]).grpc.clone()).await.unwrap();
    for k in 0..5 {
        let trip = format!("probe-{stage}-{k}");
        let mut t = TripsClient::connect(c.node(nodes[0]).grpc.clone()).await.unwrap();
        t.apply(booking(&trip)).await.unwrap();
        let r = m.r#match(match_req(&trip)).await.unwrap().into_inner();
        assert!(!a.claimed.contains_key(&r.driver_id), "{stage}: {} matched twice", r.driver_id);
        // End the probe trip (which frees its driver).
        t.apply(event(&trip, "c", pb::TripEventType::Cancelled, "")).await.unwrap();
    }
}

/// Loads 150 drivers and 30 trips (16 with claims: 8 on board, 4 of those shared).
async fn load(c: &TestCluster) -> Acked {
    let ts = now_ms() - 1_000;
    let fleet = drivers(150);
    let batch =
        pb::LocationBatch { updates: fleet.iter().map(|(id, la, lo)| fix(id, *la, *lo, ts)).collect(), batch_id: 1 };
    let mut acks = c.client(0).await.update_stream(tokio_stream::iter(vec![batch])).await.unwrap().into_inner();
    assert_eq!(acks.next().await.unwrap().unwrap().accepted, 150);

    let mut t = TripsClient::connect(c.node(1).grpc.clone()).await.unwrap();
    let mut d = DispatchClient::connect(c.node(2).grpc.clone()).await.unwrap();
    let mut a = Acked {
        drivers: fleet.clone(),
        trips: HashMap::new(),
        claimed: HashMap::new(),
        offers: HashMap::new(),
        shares: Vec::new(),
    };
    for k in 0..30 {
        let id = format!("trip-{k}");
        t.apply(booking(&id)).await.unwrap();
        let mut state = ("BOOKING_CREATED".to_string(), String::new());
        if k < 16 {
            let m = d.r#match(match_req(&id)).await.unwrap().into_inner();
            a.claimed.insert(m.driver_id.clone(), pb::DriverStatus::Dispatched as i32);
            if k < 8 {
                t.apply(event(&id, "a", pb::TripEventType::DriverAssigned, &m.driver_id)).await.unwrap();
                t.apply(event(&id, "p", pb::TripEventType::PassengerCarry, "")).await.unwrap();
                a.claimed.insert(m.driver_id.clone(), pb::DriverStatus::OnTrip as i32);
                state = ("PASSENGER_CARRY".into(), m.driver_id.clone());
                if k < 4 {
                    let l = t.share_trip(pb::ShareTripRequest { trip_id: id.clone() }).await.unwrap().into_inner();
                    a.shares.push(l.token);
                }
            } else {
                a.offers.insert(id.clone(), m.driver_id.clone());
            }
        }
        a.trips.insert(id, state);
    }
    a
}

/// The node that owns `key` now, by name.
async fn owner_of(c: &TestCluster, via: usize, key: &str) -> String {
    let r = c.admin(via).await.lookup(pb::LookupRequest { key: key.into(), successors: 1 }).await.unwrap();
    r.into_inner().owner.unwrap().name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_and_another_leaves_and_every_key_moves_with_its_state() {
    // Offers must outlive the test: an offer timing out is correct, not a loss.
    let mut c = TestCluster::start_some(4, 3, &["--offer-timeout", "600s"]);
    c.converge(&["n0", "n1", "n2"], Duration::from_secs(20)).await;
    let a = load(&c).await;
    check(&c, &[0, 1, 2], &a, "three nodes").await;
    // Watches opened through n0 now must follow their keys through every move below.
    let mut w = open_watches(&c, &a).await;

    // A fourth node joins: it pulls about a quarter of the partitions.
    c.launch(3);
    c.converge(&["n0", "n1", "n2", "n3"], Duration::from_secs(30)).await;
    let mut moved = 0;
    for id in a.trips.keys() {
        moved += (owner_of(&c, 0, id).await == "n3") as usize;
    }
    assert!(moved > 0, "no trip moved to n3; the test would prove nothing");
    check(&c, &[0, 1, 2, 3], &a, "after n3 joined").await;

    // n1 leaves: its partitions move to the others before it exits.
    c.admin(1).await.leave(pb::LeaveRequest {}).await.unwrap();
    let mut n1 = c.nodes[1].take().unwrap();
    assert!(
        common::eventually(Duration::from_secs(30), || {
            let exited = n1.try_exit().is_some();
            async move { exited }
        })
        .await,
        "n1 did not exit after Leave"
    );
    c.converge(&["n0", "n2", "n3"], Duration::from_secs(20)).await;
    check(&c, &[0, 2, 3], &a, "after n1 left").await;
    replicated(&c, &[0, 2, 3], "after n1 left").await;

    // n2 is drained: it stays up, serving nothing, and says when it is safe to stop.
    let r = c.admin(2).await.drain(pb::DrainRequest { timeout_ms: 30_000 }).await.unwrap().into_inner();
    assert!(r.drained && r.active == 0 && r.lent == 0, "{r:?}");
    // (n2 itself keeps routing by a ring with itself in it until it stops.)
    c.converge_on(&[0, 3], &["n0", "n3"], Duration::from_secs(20)).await;
    check(&c, &[0, 2, 3], &a, "after n2 drained").await;
    let rows = c.admin(2).await.partitions(pb::PartitionsRequest {}).await.unwrap().into_inner().rows;
    assert!(rows.is_empty(), "a drained node holds nothing, not even replicas: {:?}", &rows[..rows.len().min(3)]);
    replicated(&c, &[0, 3], "after n2 drained").await;
    watches_followed(&c, &mut w).await;
}

type Rx<T> = mpsc::UnboundedReceiver<Result<T, tonic::Status>>;

/// Driver and trip watches opened through n0, with each key's owner at the time.
struct Watches {
    drivers: Vec<(String, String, Rx<pb::Driver>)>,
    trips: Vec<(String, String, Rx<pb::TripUpdate>)>,
}

/// Reads a stream into a channel, its end status included.
fn pump<T: Send + 'static>(mut s: tonic::Streaming<T>) -> Rx<T> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match s.message().await {
                Ok(Some(x)) => {
                    if tx.send(Ok(x)).is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

/// Watches 30 unclaimed drivers and the 14 trips without a driver, through n0.
async fn open_watches(c: &TestCluster, a: &Acked) -> Watches {
    let mut l = c.client(0).await;
    let mut t = TripsClient::connect(c.node(0).grpc.clone()).await.unwrap();
    let mut w = Watches { drivers: Vec::new(), trips: Vec::new() };
    for (id, _, _) in a.drivers.iter().filter(|d| !a.claimed.contains_key(&d.0)).take(30) {
        let s = l.watch_driver(pb::WatchDriverRequest { driver_id: id.clone(), include_current: false }).await;
        w.drivers.push((id.clone(), owner_of(c, 0, id).await, pump(s.unwrap().into_inner())));
    }
    for k in 16..30 {
        let id = format!("trip-{k}");
        let s = t.watch_trip(pb::WatchTripRequest { trip_id: id.clone(), after_version: 0 }).await.unwrap();
        let mut rx = pump(s.into_inner());
        let first = rx.recv().await.unwrap().unwrap();
        assert_eq!(first.trip.unwrap().state_name, "BOOKING_CREATED");
        w.trips.push((id.clone(), owner_of(c, 0, &id).await, rx));
    }
    w
}

/// Waits for an item `want` accepts; panics if the stream ended or stayed quiet.
async fn expect<T: std::fmt::Debug>(rx: &mut Rx<T>, what: &str, want: impl Fn(&T) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(x))) if want(&x) => return,
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("{what}: the watch ended across a move: {e:?}"),
            Ok(None) => panic!("{what}: the watch ended without a status"),
            Err(_) => panic!("{what}: the watch went quiet"),
        }
    }
}

/// Every watch opened before the moves is still open and sees what happens next.
async fn watches_followed(c: &TestCluster, w: &mut Watches) {
    let (mut moved_d, mut moved_t) = (0, 0);
    let mut l = c.client(0).await;
    let ts = now_ms();
    for (id, before, rx) in &mut w.drivers {
        moved_d += (owner_of(c, 0, id).await != *before) as usize;
        let d = by_id(id);
        let now = l.get_driver(d).await.unwrap().into_inner();
        l.update(fix(id, now.lat, now.lon, ts)).await.unwrap();
        expect(rx, &format!("driver {id}"), |d: &pb::Driver| d.timestamp_ms == ts).await;
    }
    let mut t = TripsClient::connect(c.node(0).grpc.clone()).await.unwrap();
    for (id, before, rx) in &mut w.trips {
        moved_t += (owner_of(c, 0, id).await != *before) as usize;
        t.apply(event(id, "cancel", pb::TripEventType::Cancelled, "")).await.unwrap();
        expect(rx, &format!("trip {id}"), |u: &pb::TripUpdate| {
            u.state_changed && u.trip.as_ref().is_some_and(|t| t.state_name == "CANCELLED")
        })
        .await;
    }
    assert!(moved_d > 0 && moved_t > 0, "no watched key moved ({moved_d} drivers, {moved_t} trips): proves nothing");
}

/// Every partition is owned by exactly one of `nodes` and, soon, has an in-sync replica
/// at its owner's epoch on another of them (with two or more ring members).
async fn replicated(c: &TestCluster, nodes: &[usize], stage: &str) {
    let mut last = String::new();
    for _ in 0..200 {
        let mut owners: HashMap<u32, (usize, u64)> = HashMap::new();
        let mut copies: HashMap<(u32, u64), usize> = HashMap::new();
        let mut seen: HashMap<u32, Vec<String>> = HashMap::new();
        let mut twice = Vec::new();
        for &i in nodes {
            let r = c.admin(i).await.partitions(pb::PartitionsRequest {}).await.unwrap().into_inner();
            for row in r.rows {
                seen.entry(row.partition).or_default().push(format!(
                    "n{i}:{}@{}{}",
                    row.state,
                    row.epoch,
                    if row.in_sync { "" } else { "(syncing)" }
                ));
                if row.state == "owned" && owners.insert(row.partition, (i, row.epoch)).is_some() {
                    twice.push(row.partition);
                }
                if row.state == "replica" && row.in_sync {
                    *copies.entry((row.partition, row.epoch)).or_default() += 1;
                }
            }
        }
        assert!(twice.is_empty(), "{stage}: partitions owned twice: {twice:?}");
        let unowned = (0..locus::keys::PARTITIONS as u32).filter(|p| !owners.contains_key(p)).count();
        let bare: Vec<u32> =
            owners.iter().filter(|(p, (_, e))| !copies.contains_key(&(**p, *e))).map(|(p, _)| *p).collect();
        if unowned == 0 && bare.is_empty() {
            return;
        }
        let sample: Vec<String> = bare.iter().take(4).map(|p| format!("p{p}: {:?}", seen.get(p))).collect();
        last = format!("{unowned} unowned, {} without an in-sync replica, e.g. {sample:?}", bare.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{stage}: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_nothing_its_replicas_take_over_and_its_restart_serves_no_stale_copy() {
    let mut c = TestCluster::start_with(3, &["--offer-timeout", "600s", "--replicas", "1"]);
    c.converge(&["n0", "n1", "n2"], Duration::from_secs(20)).await;
    let mut a = load(&c).await;
    // n2's share of the acknowledged state: what a crash would lose without replicas.
    let mut on_n2 = (0, 0, 0);
    for id in a.trips.keys() {
        on_n2.0 += (owner_of(&c, 0, id).await == "n2") as usize;
    }
    for d in a.claimed.keys() {
        on_n2.1 += (owner_of(&c, 0, d).await == "n2") as usize;
    }
    let mut n2_drivers = Vec::new();
    for (d, _, _) in &a.drivers {
        if owner_of(&c, 0, d).await == "n2" {
            n2_drivers.push(d.clone());
        }
    }
    on_n2.2 = n2_drivers.len();
    assert!(on_n2.0 > 0 && on_n2.1 > 0 && on_n2.2 > 0, "n2 owns nothing to lose: {on_n2:?}");
    // Trip events and claims are on the replicas before they are answered; driver fixes
    // follow within the documented lag (about 1 s).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Watches through n0 of a trip and a driver n2 owns must survive its crash.
    let mut watched_trip = None;
    for (id, st) in &a.trips {
        if st.0 == "BOOKING_CREATED" && st.1.is_empty() && owner_of(&c, 0, id).await == "n2" {
            watched_trip = Some(id.clone());
            break;
        }
    }
    let watched_trip = watched_trip.expect("an unclaimed trip on n2");
    let mut tw = TripsClient::connect(c.node(0).grpc.clone()).await.unwrap();
    let s = tw.watch_trip(pb::WatchTripRequest { trip_id: watched_trip.clone(), after_version: 0 }).await.unwrap();
    let mut trip_rx = pump(s.into_inner());
    trip_rx.recv().await.unwrap().unwrap();
    let watched_driver = n2_drivers.iter().rev().find(|d| !a.claimed.contains_key(*d)).unwrap().clone();
    let mut l0 = c.client(0).await;
    let s = l0.watch_driver(pb::WatchDriverRequest { driver_id: watched_driver.clone(), include_current: false }).await;
    let mut driver_rx = pump(s.unwrap().into_inner());

    c.nodes[2].take().unwrap().kill9();
    c.converge(&["n0", "n1"], Duration::from_secs(30)).await;
    check(&c, &[0, 1], &a, "after n2 was killed").await;
    let now = c.client(0).await.get_driver(by_id(&watched_driver)).await.unwrap().into_inner();
    let ts = now_ms();
    c.client(0).await.update(fix(&watched_driver, now.lat, now.lon, ts)).await.unwrap();
    expect(&mut driver_rx, "driver watch across n2's crash", |d: &pb::Driver| d.timestamp_ms == ts).await;

    // Change what n2 held while it is down: a removed driver and a cancelled trip must
    // not come back from its disk when it restarts.
    let gone = n2_drivers.iter().find(|d| !a.claimed.contains_key(*d)).expect("an unclaimed driver on n2").clone();
    c.client(0).await.remove_driver(common::remove_by_id(&gone)).await.unwrap();
    a.drivers.retain(|d| d.0 != gone);
    let mut t = TripsClient::connect(c.node(0).grpc.clone()).await.unwrap();
    t.apply(event(&watched_trip, "c", pb::TripEventType::Cancelled, "")).await.unwrap();
    a.trips.get_mut(&watched_trip).unwrap().0 = "CANCELLED".into();
    // A pending offer ends with the trip: its driver is freed.
    if let Some(d) = a.offers.remove(&watched_trip) {
        a.claimed.remove(&d);
    }
    expect(&mut trip_rx, "trip watch across n2's crash", |u: &pb::TripUpdate| {
        u.state_changed && u.trip.as_ref().is_some_and(|t| t.state_name == "CANCELLED")
    })
    .await;

    c.launch(2);
    c.converge(&["n0", "n1", "n2"], Duration::from_secs(30)).await;
    check(&c, &[0, 1, 2], &a, "after n2 restarted").await;
    for i in 0..3 {
        let r = c.client(i).await.get_driver(by_id(&gone)).await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::NotFound, "removed driver {gone} came back via n{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_stands_down_when_it_thaws_and_never_applies_a_stale_write() {
    // A 2 s trip buffer: a trip booked for a 3 s drive is due 5 s later, during the freeze.
    let c = TestCluster::start_with(3, &["--offer-timeout", "600s", "--trip-buffer", "2s"]);
    c.converge(&["n0", "n1", "n2"], Duration::from_secs(20)).await;
    let mut a = load(&c).await;
    // An unclaimed trip owned by n2: the write to race against the freeze.
    let mut victim = None;
    for (id, st) in &a.trips {
        if st.0 == "BOOKING_CREATED" && owner_of(&c, 0, id).await == "n2" {
            victim = Some(id.clone());
            break;
        }
    }
    let trip = victim.expect("an unclaimed trip on n2");
    // A short trip owned by n2, due while n2 is frozen: it must expire exactly once, on
    // the node that took it over, never again on n2 when it thaws. n2's own events are
    // read straight from it (local scope), the cluster's through n0.
    let mut short = None;
    for k in 0.. {
        let id = format!("short-{k}");
        if owner_of(&c, 0, &id).await == "n2" {
            short = Some(id);
            break;
        }
    }
    let short = short.unwrap();
    let expired = || pb::SubscribeRequest {
        entity: pb::EntityKind::EntityTrip as i32,
        states: vec!["EXPIRED".into()],
        ..Default::default()
    };
    let mut on_n2 = tonic::Request::new(expired());
    on_n2.metadata_mut().insert("locus-scope", "local".parse().unwrap());
    let n2_events =
        pump(EventsClient::connect(c.node(2).grpc.clone()).await.unwrap().subscribe(on_n2).await.unwrap().into_inner());
    let all_events = pump(
        EventsClient::connect(c.node(0).grpc.clone()).await.unwrap().subscribe(expired()).await.unwrap().into_inner(),
    );
    let mut t = TripsClient::connect(c.node(0).grpc.clone()).await.unwrap();
    let booked_ms = now_ms();
    t.apply(pb::TripEvent { estimated_drive_s: 3, ..booking(&short) }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // Freeze n2 for longer than failure detection: the others promote its replicas.
    let pid = c.node(2).pid().to_string();
    let frozen_ms = now_ms();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    c.converge_on(&[0, 1], &["n0", "n1"], Duration::from_secs(30)).await;
    let gone = common::eventually(Duration::from_secs(15), || {
        let mut t = t.clone();
        let id = short.clone();
        async move {
            let r = t.get_trip(pb::GetTripRequest { trip_id: id, include_route: false }).await;
            r.is_err_and(|s| s.code() == tonic::Code::NotFound)
        }
    })
    .await;
    assert!(gone, "the short trip did not expire on its new owner");
    // The trip is cancelled on its new owner while n2 sleeps.
    let mut t0 = TripsClient::connect(c.node(0).grpc.clone()).await.unwrap();
    t0.apply(event(&trip, "c", pb::TripEventType::Cancelled, "")).await.unwrap();
    a.trips.insert(trip.clone(), ("CANCELLED".into(), String::new()));
    // A pending offer ends with the trip: its driver is freed.
    if let Some(d) = a.offers.remove(&trip) {
        a.claimed.remove(&d);
    }

    // n2 thaws still believing it owns the trip (as BOOKING_CREATED). Every write sent
    // straight to it from that instant must be refused or reach the current owner (which
    // answers from the cancelled trip); none may apply to the stale copy.
    let thawed_ms = now_ms();
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let mut t2 = TripsClient::connect(c.node(2).grpc.clone()).await.unwrap();
    let t_thaw = std::time::Instant::now();
    let (mut refused, mut forwarded) = (0, 0);
    let mut k = 0;
    while t_thaw.elapsed() < Duration::from_secs(6) {
        k += 1;
        // A different event id each time: not a duplicate of anything.
        let r = t2.apply(event(&trip, &format!("stale-{k}"), pb::TripEventType::Cancelled, "")).await;
        match r {
            Ok(r) => panic!("a write through the thawed node applied to a stale copy: {:?}", r.into_inner()),
            Err(s) if s.code() == tonic::Code::Unavailable => refused += 1,
            Err(s) if s.code() == tonic::Code::FailedPrecondition => forwarded += 1,
            Err(s) => panic!("unexpected answer from the thawed node: {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused > 0, "the thawed node never stood down ({forwarded} forwarded)");
    c.converge(&["n0", "n1", "n2"], Duration::from_secs(30)).await;
    check(&c, &[0, 1, 2], &a, "after n2 thawed").await;
    // The short trip's TTL fired once in the whole cluster, and never on the thawed node.
    let of_short = |mut rx: Rx<pb::StateChange>| {
        let mut v = Vec::new();
        while let Ok(e) = rx.try_recv() {
            v.extend(e.ok().filter(|e| e.id == short).map(|e| e.timestamp_ms));
        }
        v
    };
    let times = format!("booked at {booked_ms}, frozen at {frozen_ms}, thawed at {thawed_ms}");
    let on_n2 = of_short(n2_events);
    assert!(on_n2.is_empty(), "the thawed node expired a trip another node had taken over, at {on_n2:?}; {times}");
    let all = of_short(all_events);
    assert_eq!(all.len(), 1, "the short trip's expiry, cluster-wide, at {all:?}; {times}");
}
