//! Partition hand-off and failover over real node processes: a node joins a loaded
//! cluster, then another leaves; and a node is killed (`kill -9`) and later restarted.
//! Every driver, trip, claim and share link lives on with its new owner: nothing
//! answers NOT_FOUND, no claimed driver becomes matchable again, Nearby equals brute
//! force, and no driver is held by two nodes.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::cluster::TestCluster;
use common::{by_id, fix, http_get, now_ms};
use locus::geo::haversine_m;
use locus::pb;
use locus::pb::dispatch_client::DispatchClient;
use locus::pb::trips_client::TripsClient;
use tokio_stream::StreamExt;

const CENTRE: (f64, f64) = (52.52, 13.405);

fn drivers(n: usize) -> Vec<(String, f64, f64)> {
    (0..n)
        .map(|i| {
            let a = i as f64 * 0.618;
            (format!("drv-{i}"), CENTRE.0 + 0.02 * a.sin() * (i % 13) as f64 / 13.0, CENTRE.1 + 0.03 * a.cos())
        })
        .collect()
}

fn booking(trip: &str) -> pb::TripEvent {
    pb::TripEvent {
        trip_id: trip.into(),
        event_id: format!("{trip}-b"),
        r#type: pb::TripEventType::BookingCreated as i32,
        pickup: Some(pb::Point { lat: CENTRE.0, lon: CENTRE.1 }),
        dropoff: Some(pb::Point { lat: 52.50, lon: 13.45 }),
        estimated_drive_s: 600,
        ..Default::default()
    }
}

fn event(trip: &str, id: &str, t: pb::TripEventType, driver: &str) -> pb::TripEvent {
    pb::TripEvent {
        trip_id: trip.into(),
        event_id: format!("{trip}-{id}"),
        r#type: t as i32,
        driver_id: driver.into(),
        vehicle: (!driver.is_empty()).then(|| pb::Vehicle { cab_number: "CAB".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// Match the nearest available driver to a trip picked up at the centre.
fn match_req(trip: &str) -> pb::MatchRequest {
    pb::MatchRequest { trip_id: trip.into(), lat: CENTRE.0, lon: CENTRE.1, radius_m: 50_000.0, ..Default::default() }
}

/// What the cluster acknowledged, to check after every change.
struct Acked {
    drivers: Vec<(String, f64, f64)>,
    /// trip id → (state name, driver id)
    trips: HashMap<String, (String, String)>,
    /// driver id → the status its claim implies (DISPATCHED or ON_TRIP)
    claimed: HashMap<String, i32>,
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
        // End the probe trip (its offer times out by itself).
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
    let mut a = Acked { drivers: fleet.clone(), trips: HashMap::new(), claimed: HashMap::new(), shares: Vec::new() };
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

    c.nodes[2].take().unwrap().kill9();
    c.converge(&["n0", "n1"], Duration::from_secs(30)).await;
    check(&c, &[0, 1], &a, "after n2 was killed").await;

    // Change what n2 held while it is down: a removed driver and a cancelled trip must
    // not come back from its disk when it restarts.
    let gone = n2_drivers.iter().find(|d| !a.claimed.contains_key(*d)).expect("an unclaimed driver on n2").clone();
    c.client(0).await.remove_driver(common::remove_by_id(&gone)).await.unwrap();
    a.drivers.retain(|d| d.0 != gone);
    let mut t = TripsClient::connect(c.node(0).grpc.clone()).await.unwrap();
    let mut cancelled = None;
    for (id, st) in a.trips.iter_mut() {
        if st.0 == "BOOKING_CREATED" && st.1.is_empty() && !id.starts_with("probe") {
            t.apply(event(id, "c", pb::TripEventType::Cancelled, "")).await.unwrap();
            st.0 = "CANCELLED".into();
            cancelled = Some(id.clone());
            break;
        }
    }
    assert!(cancelled.is_some(), "no unclaimed trip to cancel");

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
    let c = TestCluster::start_with(3, &["--offer-timeout", "600s"]);
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
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // Freeze n2 for longer than failure detection: the others promote its replicas.
    let pid = c.node(2).pid().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    c.converge_on(&[0, 1], &["n0", "n1"], Duration::from_secs(30)).await;
    // The trip is cancelled on its new owner while n2 sleeps.
    let mut t0 = TripsClient::connect(c.node(0).grpc.clone()).await.unwrap();
    t0.apply(event(&trip, "c", pb::TripEventType::Cancelled, "")).await.unwrap();
    a.trips.insert(trip.clone(), ("CANCELLED".into(), String::new()));

    // n2 thaws still believing it owns the trip (as BOOKING_CREATED). Every write sent
    // straight to it from that instant must be refused or reach the current owner (which
    // answers from the cancelled trip); none may apply to the stale copy.
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
}
