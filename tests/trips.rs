//! Trips, dispatch, events and Share My Trip end to end, over real node processes:
//! every transition (valid, invalid, duplicate), claims and offer timeouts, TTL expiry,
//! share link status codes over a trip's life, rate limiting, the events stream, restart
//! keeping trips, claims and their timers, and concurrent matching across three nodes
//! without a double assignment.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::cluster::TestCluster;
use common::{NodeProc, by_id, eventually, fix, http_get, now_ms};
use locus::pb;
use locus::pb::dispatch_client::DispatchClient;
use locus::pb::events_client::EventsClient;
use locus::pb::trips_client::TripsClient;
use tonic::Code;
use tonic::transport::Channel;

const PICKUP: (f64, f64) = (52.5200, 13.4050);

async fn trips(n: &NodeProc) -> TripsClient<Channel> {
    TripsClient::connect(n.grpc.clone()).await.unwrap()
}

async fn dispatch(n: &NodeProc) -> DispatchClient<Channel> {
    DispatchClient::connect(n.grpc.clone()).await.unwrap()
}

fn booking(trip: &str, event: &str, drive_s: u32) -> pb::TripEvent {
    pb::TripEvent {
        trip_id: trip.into(),
        event_id: event.into(),
        r#type: pb::TripEventType::BookingCreated as i32,
        pickup: Some(pb::Point { lat: PICKUP.0, lon: PICKUP.1 }),
        dropoff: Some(pb::Point { lat: 52.50, lon: 13.45 }),
        estimated_drive_s: drive_s,
        ..Default::default()
    }
}

fn event(trip: &str, event: &str, t: pb::TripEventType) -> pb::TripEvent {
    pb::TripEvent { trip_id: trip.into(), event_id: event.into(), r#type: t as i32, ..Default::default() }
}

fn assigned(trip: &str, ev_id: &str, driver: &str) -> pb::TripEvent {
    pb::TripEvent {
        driver_id: driver.into(),
        vehicle: Some(pb::Vehicle {
            cab_number: "CAB-7".into(),
            model: "Prius".into(),
            colour: "white".into(),
            plate: "B-LX 42".into(),
        }),
        ..event(trip, ev_id, pb::TripEventType::DriverAssigned)
    }
}

fn match_req(trip: &str, radius_m: f64) -> pb::MatchRequest {
    pb::MatchRequest { trip_id: trip.into(), lat: PICKUP.0, lon: PICKUP.1, radius_m, ..Default::default() }
}

async fn status_of(n: &NodeProc, driver: &str) -> i32 {
    n.client().await.get_driver(by_id(driver)).await.unwrap().into_inner().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_through_its_life_with_claims_events_and_its_share_link() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &["--trip-linger", "2s", "--share-client-rate", "1000"]);
    let mut loc = node.client().await;
    let mut t = trips(&node).await;
    let mut d = dispatch(&node).await;
    let mut ev = EventsClient::connect(node.grpc.clone()).await.unwrap();
    let trip_events = pb::SubscribeRequest { entity: pb::EntityKind::EntityTrip as i32, ..Default::default() };
    let mut sub = ev.subscribe(trip_events).await.unwrap().into_inner();
    // d1 is 1.1 km north of the pickup, d2 much further.
    let ts = now_ms() - 300_000;
    loc.update(fix("d1", PICKUP.0 + 0.01, PICKUP.1, ts)).await.unwrap();
    loc.update(fix("d2", PICKUP.0 + 0.05, PICKUP.1, ts)).await.unwrap();

    // Bad input and unknown trips.
    let e = t.apply(event("nope", "e0", pb::TripEventType::DriverArrived)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = t.apply(pb::TripEvent { pickup: None, ..booking("t1", "e1", 600) }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("pickup"), "{}", e.message());
    let e = t.apply(booking("t1", "e1", 0)).await.unwrap_err();
    assert!(e.message().contains("estimated_drive_s"), "{}", e.message());
    let e = d.r#match(match_req("t1", -5.0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("radius_m"), "{}", e.message());

    // Booking; a duplicate is a no-op; an out-of-order event names the current state.
    let b = t.apply(booking("t1", "e1", 600)).await.unwrap().into_inner();
    assert_eq!(b.state_name, "BOOKING_CREATED");
    let again = t.apply(booking("t1", "e1", 600)).await.unwrap().into_inner();
    assert_eq!(again.version, b.version);
    let e = t.apply(booking("t1", "e1b", 600)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = t.apply(event("t1", "x", pb::TripEventType::PassengerCarry)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("BOOKING_CREATED"), "{}", e.message());
    assert_eq!(e.metadata().get("locus-trip-state").unwrap(), "BOOKING_CREATED");

    // The share link exists but says nothing before PASSENGER_CARRY.
    let link = t.share_trip(pb::ShareTripRequest { trip_id: "t1".into() }).await.unwrap().into_inner();
    assert_eq!(link.token.len(), 36);
    assert!(link.url.ends_with(&format!("/share/{}/view", link.token)));
    let path = format!("/share/{}", link.token);
    assert_eq!(http_get(&node.http, &path).await.0, 404);
    assert_eq!(http_get(&node.http, "/share/not-a-token").await.0, 404);
    let (code, page) = http_get(&node.http, &format!("{path}/view")).await;
    assert_eq!(code, 200);
    assert!(page.contains("<canvas") && !page.contains("src=\"http"), "self-contained page");

    // Match claims the nearest; it leaves AVAILABLE queries at once.
    let m = d.r#match(match_req("t1", 2_000.0)).await.unwrap().into_inner();
    assert_eq!(m.driver_id, "d1");
    assert!((m.distance_m - 1112.0).abs() < 5.0, "{}", m.distance_m);
    assert_eq!(status_of(&node, "d1").await, pb::DriverStatus::Dispatched as i32);
    let near = pb::NearbyRequest {
        lat: PICKUP.0,
        lon: PICKUP.1,
        limit: 10,
        statuses: vec![pb::DriverStatus::Available as i32],
        ..Default::default()
    };
    let hits = loc.nearby(near.clone()).await.unwrap().into_inner().drivers;
    assert_eq!(hits.iter().map(|h| h.driver_id.as_str()).collect::<Vec<_>>(), vec!["d2"]);
    // Nobody else within 2 km.
    t.apply(booking("t-other", "o1", 600)).await.unwrap();
    let e = d.r#match(match_req("t-other", 2_000.0)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("no AVAILABLE driver"), "{}", e.message());
    // A trip is matched only once booked.
    let e = d.r#match(match_req("t-never", 2_000.0)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("BOOKED"), "{}", e.message());
    // A fix reporting AVAILABLE does not undo the claim.
    loc.update(fix("d1", PICKUP.0 + 0.009, PICKUP.1, ts + 10_000)).await.unwrap();
    assert_eq!(status_of(&node, "d1").await, pb::DriverStatus::Dispatched as i32);

    // DRIVER_ASSIGNED confirms; d1 cannot be assigned to another trip.
    let a = t.apply(assigned("t1", "e2", "d1")).await.unwrap().into_inner();
    assert_eq!(a.state_name, "DRIVER_ASSIGNED");
    assert_eq!(status_of(&node, "d1").await, pb::DriverStatus::OnTrip as i32);
    t.apply(booking("t2", "f1", 600)).await.unwrap();
    let e = t.apply(assigned("t2", "f2", "d1")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("claimed"), "{}", e.message());
    let e = t.apply(assigned("t2", "f3", "ghost")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        t.get_trip(pb::GetTripRequest { trip_id: "t2".into(), include_route: false })
            .await
            .unwrap()
            .into_inner()
            .state_name,
        "BOOKING_CREATED"
    );

    // The driver approaches: its fixes reach the trip, and "near pickup" fires once.
    let mut watch =
        t.watch_trip(pb::WatchTripRequest { trip_id: "t1".into(), after_version: 0 }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert!(first.state_changed);
    let mut ts = ts + 20_000;
    for i in 1..=9 {
        ts += 5_000;
        loc.update(fix("d1", PICKUP.0 + 0.009 - 0.001 * i as f64, PICKUP.1, ts)).await.unwrap();
    }
    let got = eventually(Duration::from_secs(5), || {
        let mut t = t.clone();
        async move {
            let trip = t
                .get_trip(pb::GetTripRequest { trip_id: "t1".into(), include_route: false })
                .await
                .unwrap()
                .into_inner();
            trip.driver_near_pickup && trip.driver_position.is_some_and(|p| p.timestamp_ms == ts)
        }
    })
    .await;
    assert!(got, "the trip follows its driver");
    let u = watch.message().await.unwrap().unwrap();
    assert!(!u.state_changed && u.trip.unwrap().driver_position.is_some(), "watchers see positions");

    t.apply(event("t1", "e3", pb::TripEventType::DriverArrived)).await.unwrap();
    let carry = t.apply(event("t1", "e4", pb::TripEventType::PassengerCarry)).await.unwrap().into_inner();
    assert_eq!(carry.state_name, "PASSENGER_CARRY");
    // Drive 10 x 111 m south with jitter in between.
    for i in 1..=10 {
        ts += 5_000;
        loc.update(pb::LocationUpdate { accuracy_m: 8.0, ..fix("d1", PICKUP.0 - 0.001 * i as f64, PICKUP.1, ts) })
            .await
            .unwrap();
        ts += 1_000;
        loc.update(pb::LocationUpdate {
            accuracy_m: 8.0,
            ..fix("d1", PICKUP.0 - 0.001 * i as f64 + 0.00003, PICKUP.1, ts)
        })
        .await
        .unwrap();
    }
    let done = eventually(Duration::from_secs(5), || async {
        let (code, body) = http_get(&node.http, &path).await;
        code == 200 && body.contains("\"plate\":\"B-LX 42\"") && body.contains("PASSENGER_CARRY") && {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["route"].as_array().is_some_and(|r| r.len() == 11)
        }
    })
    .await;
    assert!(done, "the share link answers with the route while carrying");
    let trip = t.get_trip(pb::GetTripRequest { trip_id: "t1".into(), include_route: true }).await.unwrap().into_inner();
    assert!((trip.distance_m - 1112.0).abs() < 10.0, "jitter ignored: {}", trip.distance_m);
    assert!(trip.fare > 3.5 + 1.2, "{}", trip.fare);

    // Drop-off frees the driver; the link answers until the trip expires (2 s), then 404.
    let dropped = t.apply(event("t1", "e5", pb::TripEventType::PassengerDropped)).await.unwrap().into_inner();
    assert_eq!(dropped.state_name, "PASSENGER_DROPPED");
    let e = t.apply(event("t1", "e6", pb::TripEventType::Cancelled)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        eventually(Duration::from_secs(3), || async {
            status_of(&node, "d1").await == pb::DriverStatus::Available as i32
        })
        .await
    );
    assert_eq!(http_get(&node.http, &path).await.0, 200);
    assert!(eventually(Duration::from_secs(5), || async { http_get(&node.http, &path).await.0 == 404 }).await);
    let e = t.get_trip(pb::GetTripRequest { trip_id: "t1".into(), include_route: false }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // A cancelled trip frees its driver too.
    t.apply(booking("t3", "g1", 600)).await.unwrap();
    let m = d.r#match(match_req("t3", 10_000.0)).await.unwrap().into_inner();
    t.apply(assigned("t3", "g2", &m.driver_id)).await.unwrap();
    t.apply(event("t3", "g3", pb::TripEventType::Cancelled)).await.unwrap();
    let id = m.driver_id.clone();
    assert!(
        eventually(Duration::from_secs(3), || async {
            status_of(&node, &id).await == pb::DriverStatus::Available as i32
        })
        .await
    );

    // The events stream saw the trip's canonical changes, in order, without personal data.
    let mut seen = Vec::new();
    while seen.last().is_none_or(|(s, _)| s != "EXPIRED") {
        let c = tokio::time::timeout(Duration::from_secs(5), sub.message()).await.unwrap().unwrap().unwrap();
        if c.id == "t1" {
            seen.push((c.state.clone(), c.from_state.clone()));
        }
    }
    let states: Vec<&str> = seen.iter().map(|(s, _)| s.as_str()).collect();
    let want = [
        "BOOKING_CREATED",
        "DRIVER_ASSIGNED",
        "DRIVER_NEAR_PICKUP",
        "DRIVER_ARRIVED",
        "PASSENGER_CARRY",
        "PASSENGER_DROPPED",
        "EXPIRED",
    ];
    assert_eq!(states, want);
    assert_eq!(seen[3].1, "DRIVER_ASSIGNED", "DRIVER_ARRIVED comes from DRIVER_ASSIGNED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_links_are_rate_limited_per_client_and_per_token() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &["--share-client-rate", "10", "--share-token-rate", "1000"]);
    let mut codes = Vec::new();
    for _ in 0..40 {
        codes.push(http_get(&node.http, "/share/0000ffffffffffffffffffffffffffffffff").await.0);
    }
    assert!(codes[..20].iter().all(|c| *c == 404), "a burst of twice the rate passes: {codes:?}");
    assert!(codes.iter().filter(|c| **c == 429).count() >= 15, "{codes:?}");
    drop(node);
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &["--share-client-rate", "1000", "--share-token-rate", "2"]);
    let mut one = Vec::new();
    for _ in 0..10 {
        one.push(http_get(&node.http, "/share/0001aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").await.0);
    }
    assert_eq!(one.iter().filter(|c| **c == 429).count(), 6, "{one:?}");
    // Another token is not slowed by the flood on the first.
    assert_eq!(http_get(&node.http, "/share/0001bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trips_claims_and_their_timers_survive_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--offer-timeout", "4s", "--trip-buffer", "4s"];
    let mut node = NodeProc::start(dir.path(), &flags);
    let mut loc = node.client().await;
    let ts = now_ms() - 1_000;
    loc.update(fix("d1", PICKUP.0, PICKUP.1 + 0.001, ts)).await.unwrap();
    loc.update(fix("d2", PICKUP.0, PICKUP.1 + 0.002, ts)).await.unwrap();
    // Let the driver log's group commit write the drivers.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut t = trips(&node).await;
    // t1 lives long (600 s + 4 s); t2 expires 5 s from now.
    t.apply(booking("t1", "a1", 600)).await.unwrap();
    let m = dispatch(&node).await.r#match(match_req("t1", 1_000.0)).await.unwrap().into_inner();
    assert_eq!(m.driver_id, "d1");
    t.apply(assigned("t1", "a2", "d1")).await.unwrap();
    t.apply(booking("t2", "b1", 1)).await.unwrap();
    let offer = dispatch(&node).await.r#match(match_req("t2", 1_000.0)).await.unwrap().into_inner();
    assert_eq!(offer.driver_id, "d2");
    node.kill9();

    let node = node.restart();
    let mut t = trips(&node).await;
    let t1 = t.get_trip(pb::GetTripRequest { trip_id: "t1".into(), include_route: false }).await.unwrap().into_inner();
    assert_eq!((t1.state_name.as_str(), t1.driver_id.as_str()), ("DRIVER_ASSIGNED", "d1"));
    assert!(t.get_trip(pb::GetTripRequest { trip_id: "t2".into(), include_route: false }).await.is_ok());
    assert_eq!(status_of(&node, "d1").await, pb::DriverStatus::OnTrip as i32, "the confirmed claim came back");
    assert_eq!(status_of(&node, "d2").await, pb::DriverStatus::Dispatched as i32, "the offer came back");
    // The offer timer still fires (4 s after the claim), and so does t2's TTL.
    assert!(
        eventually(Duration::from_secs(8), || async {
            status_of(&node, "d2").await == pb::DriverStatus::Available as i32
        })
        .await,
        "the offer timed out after the restart"
    );
    assert_eq!(status_of(&node, "d1").await, pb::DriverStatus::OnTrip as i32, "a confirmed claim does not time out");
    let gone = eventually(Duration::from_secs(8), || {
        let mut t = t.clone();
        async move { t.get_trip(pb::GetTripRequest { trip_id: "t2".into(), include_route: false }).await.is_err() }
    })
    .await;
    assert!(gone, "t2's TTL fired after the restart");
    assert!(t.get_trip(pb::GetTripRequest { trip_id: "t1".into(), include_route: false }).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_matches_across_three_nodes_never_assign_a_driver_twice() {
    let c = TestCluster::start(3);
    c.converge(&["n0", "n1", "n2"], Duration::from_secs(20)).await;
    // Subscribe at n0 to every node's DISPATCHED changes.
    let mut ev = EventsClient::connect(c.node(0).grpc.clone()).await.unwrap();
    let filter = pb::SubscribeRequest {
        entity: pb::EntityKind::EntityDriver as i32,
        states: vec!["DISPATCHED".into()],
        ..Default::default()
    };
    let mut sub = ev.subscribe(filter).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let drivers = 20;
    let ts = now_ms() - 1_000;
    let mut loc = c.client(1).await;
    for i in 0..drivers {
        let f = fix(&format!("drv-{i}"), PICKUP.0 + 0.0005 * i as f64, PICKUP.1, ts);
        loc.update(f).await.unwrap();
    }
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push((dispatch(c.node(i)).await, trips(c.node(i)).await));
    }
    let mut set = tokio::task::JoinSet::new();
    for k in 0..300 {
        let (mut d, mut t) = clients[k % 3].clone();
        set.spawn(async move {
            let id = format!("trip-{k}");
            t.apply(booking(&id, "b", 600)).await.unwrap();
            d.r#match(match_req(&id, 5_000.0)).await
        });
    }
    let mut won = Vec::new();
    let mut not_found = 0;
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok(m) => won.push(m.into_inner().driver_id),
            Err(s) if s.code() == Code::NotFound => not_found += 1,
            Err(s) => panic!("unexpected error {s:?}"),
        }
    }
    let distinct: HashSet<&String> = won.iter().collect();
    assert_eq!(distinct.len(), won.len(), "a driver was claimed twice: {won:?}");
    assert_eq!(won.len(), drivers, "every driver claimed once");
    assert_eq!(not_found, 300 - drivers);
    // One subscription at n0 saw every claim, whichever node owns the driver.
    let mut dispatched = HashSet::new();
    while dispatched.len() < drivers {
        let ch = tokio::time::timeout(Duration::from_secs(5), sub.message()).await.unwrap().unwrap().unwrap();
        assert_eq!((ch.state.as_str(), ch.from_state.as_str()), ("DISPATCHED", "AVAILABLE"));
        dispatched.insert(ch.id);
    }

    // A trip booked through one node is read through another and shared over HTTP from a
    // third, its owner answering from memory.
    loc.update(fix("extra", PICKUP.0, PICKUP.1, ts)).await.unwrap();
    let mut t1 = trips(c.node(1)).await;
    t1.apply(booking("shared", "s1", 600)).await.unwrap();
    t1.apply(assigned("shared", "s2", "extra")).await.unwrap();
    let mut t2 = trips(c.node(2)).await;
    t2.apply(event("shared", "s3", pb::TripEventType::PassengerCarry)).await.unwrap();
    let link = t2.share_trip(pb::ShareTripRequest { trip_id: "shared".into() }).await.unwrap().into_inner();
    for i in 0..3 {
        let (code, body) = http_get(&c.node(i).http, &format!("/share/{}", link.token)).await;
        assert_eq!(code, 200, "via n{i}: {body}");
        assert!(body.contains("PASSENGER_CARRY"));
    }
    let trip =
        t2.get_trip(pb::GetTripRequest { trip_id: "shared".into(), include_route: false }).await.unwrap().into_inner();
    assert_eq!(trip.driver_id, "extra");
}

/// Drivers in DISPATCHED among `drivers`, read through node `via`.
async fn dispatched(n: &NodeProc, drivers: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for d in drivers {
        if status_of(n, d).await == pb::DriverStatus::Dispatched as i32 {
            out.push(d.clone());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_match_through_any_node_returns_the_one_offer_and_claims_nobody_new() {
    let c = TestCluster::start_with(3, &["--offer-timeout", "3s"]);
    c.converge(&["n0", "n1", "n2"], Duration::from_secs(20)).await;
    let ts = now_ms() - 1_000;
    let mut loc = c.client(0).await;
    let fleet: Vec<String> = (0..10).map(|i| format!("idem-{i}")).collect();
    for (i, d) in fleet.iter().enumerate() {
        loc.update(fix(d, PICKUP.0 + 0.001 * (i + 1) as f64, PICKUP.1, ts)).await.unwrap();
    }
    let mut t = trips(c.node(1)).await;
    t.apply(booking("idem", "b", 600)).await.unwrap();
    let mut ds = Vec::new();
    for i in 0..3 {
        ds.push(dispatch(c.node(i)).await);
    }

    // A dispatch service retrying hard: 24 concurrent Matches of one trip via 3 nodes.
    let mut set = tokio::task::JoinSet::new();
    for k in 0..24 {
        let mut d = ds[k % 3].clone();
        set.spawn(async move { d.r#match(match_req("idem", 5_000.0)).await.map(|r| r.into_inner()) });
    }
    let mut answers = Vec::new();
    while let Some(r) = set.join_next().await {
        answers.push(r.unwrap().expect("every retry answers"));
    }
    let first = answers.iter().find(|m| !m.existing).expect("one Match claimed").clone();
    assert!(answers.iter().all(|m| m.driver_id == first.driver_id), "one driver for every retry: {answers:?}");
    assert_eq!(answers.iter().filter(|m| !m.existing).count(), 1, "exactly one Match claimed");
    assert!(answers.iter().all(|m| m.offer_expires_ms == first.offer_expires_ms));
    assert!(answers.iter().filter(|m| m.existing).all(|m| m.attempts == 0));
    assert_eq!(dispatched(c.node(2), &fleet).await, vec![first.driver_id.clone()], "nobody else was claimed");
    let trip = t.get_trip(pb::GetTripRequest { trip_id: "idem".into(), include_route: false }).await.unwrap();
    let trip = trip.into_inner();
    assert_eq!(
        (trip.offer_driver_id.as_str(), trip.offer_expires_ms),
        (first.driver_id.as_str(), first.offer_expires_ms)
    );

    // The driver declines: freed at once; the next Match claims someone else, and skips
    // the decliner for good. Declining again is harmless; a driver with no offer can't.
    let mut d0 = ds[0].clone();
    let decline = |driver: &str| pb::DeclineRequest { trip_id: "idem".into(), driver_id: driver.into() };
    d0.decline(decline(&first.driver_id)).await.unwrap();
    assert_eq!(status_of(c.node(0), &first.driver_id).await, pb::DriverStatus::Available as i32);
    d0.decline(decline(&first.driver_id)).await.unwrap();
    let e = ds[1].clone().decline(decline("idem-9")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("no offer"), "{}", e.message());
    let e = d0.decline(pb::DeclineRequest { trip_id: "idem".into(), driver_id: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("driver_id"), "{}", e.message());
    let second = ds[2].clone().r#match(match_req("idem", 5_000.0)).await.unwrap().into_inner();
    assert!(!second.existing);
    assert_ne!(second.driver_id, first.driver_id, "the decliner is skipped");
    assert_eq!(dispatched(c.node(1), &fleet).await, vec![second.driver_id.clone()]);

    // The offer lapses (3 s): the driver's owner frees it, and a new Match claims again.
    let lapsed = eventually(Duration::from_secs(8), || async {
        status_of(c.node(0), &second.driver_id).await == pb::DriverStatus::Available as i32
    })
    .await;
    assert!(lapsed, "the offer timed out");
    let third = ds[1].clone().r#match(match_req("idem", 5_000.0)).await.unwrap().into_inner();
    assert!(!third.existing, "a lapsed offer is not answered again");
    assert_ne!(third.driver_id, first.driver_id);
    assert!(third.offer_expires_ms > second.offer_expires_ms);

    // Assigned: Match refuses (the trip has its driver), and nobody new is claimed.
    t.apply(assigned("idem", "a", &third.driver_id)).await.unwrap();
    let e = ds[0].clone().r#match(match_req("idem", 5_000.0)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains(&third.driver_id), "{}", e.message());
    assert_eq!(dispatched(c.node(0), &fleet).await, Vec::<String>::new());
    assert_eq!(status_of(c.node(0), &third.driver_id).await, pb::DriverStatus::OnTrip as i32);

    // A cancelled trip frees a pending offer at once, not at its timeout.
    t.apply(booking("idem-2", "b", 600)).await.unwrap();
    let m = ds[2].clone().r#match(match_req("idem-2", 5_000.0)).await.unwrap().into_inner();
    t.apply(event("idem-2", "c", pb::TripEventType::Cancelled)).await.unwrap();
    let freed = eventually(Duration::from_secs(2), || async {
        status_of(c.node(1), &m.driver_id).await == pb::DriverStatus::Available as i32
    })
    .await;
    assert!(freed, "the cancelled trip's offer was released");
}
