//! Scripted cluster scenarios in one process, in virtual time (`tests/harness`): real
//! nodes on the in-process network, checked against what their clients were told.

mod common;
mod harness;

use std::time::Duration;

use harness::{Op, Sim};

/// Flags every scenario's nodes share: drivers and claims outlive the virtual hours a
/// scenario may take.
const FLAGS: &[&str] = &["--driver-ttl", "86400s", "--offer-timeout", "86400s", "--replicas", "1"];

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn three_nodes_start_take_load_and_agree() {
    let mut sim = Sim::new(3, FLAGS, 1);
    use Op::*;
    sim.run(&[
        Start(0),
        Start(1),
        Start(2),
        Converge(vec![0, 1, 2]),
        SendFixes(300),
        Trips(20),
        Wait(Duration::from_secs(2)),
        Check(vec![0, 1, 2]),
    ])
    .await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn scale_three_to_five_and_back_under_load() {
    scale_three_to_five_and_back(Sim::new(5, FLAGS, 2)).await;
}

/// The same over the hand-off protocol's in-memory peer link (`handoff::MemPeerLink`,
/// no gRPC between hand-off and replication peers), and then a kill and a restart.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn scale_and_failover_over_the_in_memory_peer_link() {
    let mut sim = Sim::new(5, FLAGS, 11).direct_links();
    sim = scale_three_to_five_and_back(sim).await;
    use Op::*;
    sim.run(&[Trips(8), SendFixes(100), Kill(1), SendFixes(100), Converge(vec![0, 2]), Check(vec![0, 2])]).await;
    sim.run(&[Restart(1), SendFixes(50), Converge(vec![0, 1, 2]), Check(vec![0, 1, 2])]).await;
}

async fn scale_three_to_five_and_back(mut sim: Sim) -> Sim {
    use Op::*;
    sim.run(&[
        Start(0),
        Start(1),
        Start(2),
        Converge(vec![0, 1, 2]),
        SendFixes(200),
        Trips(16),
        Start(3),
        SendFixes(100),
        Trips(4),
        Start(4),
        SendFixes(100),
        Converge(vec![0, 1, 2, 3, 4]),
        Check(vec![0, 1, 2, 3, 4]),
        Drain(4),
        SendFixes(100),
        Trips(4),
        Leave(3),
        SendFixes(100),
        Converge(vec![0, 1, 2]),
        Check(vec![0, 1, 2]),
    ])
    .await;
    // Joins, a drain and a leave, nothing else: no fix, trip event or match was refused
    // (requests for a partition on its way follow it to its holder, or wait for it).
    assert_eq!(sim.model.failed, 0, "graceful moves refused requests");
    sim
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_owner_of_live_trips_dies_and_restarts_with_stale_copies() {
    let mut sim = Sim::new(3, FLAGS, 3);
    use Op::*;
    sim.run(&[
        Start(0),
        Start(1),
        Start(2),
        Converge(vec![0, 1, 2]),
        SendFixes(300),
        Trips(24),
        SendFixes(100),
        Kill(1),
        SendFixes(100),
        Trips(8),
        Converge(vec![0, 2]),
        Check(vec![0, 2]),
        // Its copies are stale now: trips moved on, drivers moved, claims were made.
        Restart(1),
        SendFixes(100),
        Trips(4),
        Converge(vec![0, 1, 2]),
        Check(vec![0, 1, 2]),
    ])
    .await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_minority_side_stands_down_and_the_majority_serves() {
    let mut sim = Sim::new(3, FLAGS, 4);
    use Op::*;
    sim.run(&[
        Start(0),
        Start(1),
        Start(2),
        Converge(vec![0, 1, 2]),
        SendFixes(300),
        Trips(16),
        Wait(Duration::from_secs(6)),
        Partition(vec![2], vec![0, 1]),
        Wait(Duration::from_secs(15)),
    ])
    .await;
    // The cut-off node refuses keyed reads, writes and claims: it cannot see a majority.
    let read = sim.locations(2).get_driver(harness::model::by_id("drv-1")).await;
    assert_eq!(read.as_ref().map_err(|s| s.code()).err(), Some(tonic::Code::Unavailable), "{read:?}");
    let writes = sim
        .trips(2)
        .apply(harness::model::booking("minority-trip"))
        .await
        .expect_err("a node without a majority accepted a booking");
    assert_eq!(writes.code(), tonic::Code::Unavailable, "{writes:?}");
    let m = sim.dispatch(2).r#match(harness::model::match_req("minority-trip")).await;
    assert!(m.is_err(), "a node without a majority matched: {m:?}");
    sim.run(&[SendFixes(100), Trips(8), Converge(vec![0, 1]), Check(vec![0, 1]), Heal, Converge(vec![0, 1, 2])]).await;
    sim.run(&[Check(vec![0, 1, 2])]).await;
}

/// A node stopped (SIGSTOP) with matches in flight, for longer than failure detection:
/// the others take its partitions over; when it runs again, mid-way through those
/// matches, with its lease long lapsed, it applies nothing, grants no claim and fires no
/// timer for what it no longer owns, and comes back through the hand-off.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_frozen_owner_thaws_into_a_cluster_that_moved_on() {
    let mut sim = Sim::new(3, FLAGS, 7);
    use Op::*;
    sim.run(&[
        Start(0),
        Start(1),
        Start(2),
        Converge(vec![0, 1, 2]),
        SendFixes(300),
        Trips(16),
        Wait(Duration::from_secs(6)),
        Freeze(1),
        Wait(Duration::from_secs(15)),
        SendFixes(100),
        Trips(8),
        Converge(vec![0, 2]),
        Check(vec![0, 2]),
        Thaw(1),
        SendFixes(100),
        Trips(6),
        Converge(vec![0, 1, 2]),
        Check(vec![0, 1, 2]),
    ])
    .await;
}

/// `LOCUS_SIM_SEED=n` replays one seed; `LOCUS_SIM_STEPS` sets the length.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_seeded_random_sequence_keeps_every_invariant() {
    let seed = std::env::var("LOCUS_SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let steps = std::env::var("LOCUS_SIM_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    eprintln!("[sim] seed {seed}, {steps} steps (replay with LOCUS_SIM_SEED={seed})");
    let mut sim = Sim::new(5, FLAGS, seed);
    sim.random(steps).await;
}

/// Trip TTLs and offer timeouts of a node that dies fire once, on the new owner, and
/// never again when the dead node comes back with its stale copies.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn timers_of_a_dead_owner_fire_once_and_never_again_after_its_restart() {
    timers_fire_once_when_the_owner(Lost::Killed).await;
}

/// The same for a node stopped (SIGSTOP) past failure detection: when it runs again its
/// timers are long overdue, and none of them fires for what it no longer owns.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn timers_of_a_frozen_owner_fire_once_and_never_again_after_it_thaws() {
    timers_fire_once_when_the_owner(Lost::Frozen).await;
}

enum Lost {
    Killed,
    Frozen,
}

async fn timers_fire_once_when_the_owner(how: Lost) {
    use harness::model::{booking, match_req};
    use locus::pb;
    use std::collections::HashMap;
    use tokio_stream::StreamExt;

    let flags = ["--driver-ttl", "86400s", "--offer-timeout", "15s", "--trip-buffer", "20s", "--replicas", "1"];
    let mut sim = Sim::new(3, &flags, 9);
    use Op::*;
    sim.run(&[Start(0), Start(1), Start(2), Converge(vec![0, 1, 2]), SendFixes(300)]).await;

    // Every state change in the cluster, through n0 (which stays up).
    let mut events = locus::pb::events_client::EventsClient::new(sim.channel(0))
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(e)) = events.next().await {
            let _ = tx.send(e);
        }
    });

    let mut matched = Vec::new();
    for k in 0..12 {
        let id = format!("ttl-{k}");
        let ev = pb::TripEvent { estimated_drive_s: 10, ..booking(&id) };
        sim.trips(k % 3).apply(ev).await.unwrap();
        if k % 2 == 0 {
            let m = sim.dispatch((k + 1) % 3).r#match(match_req(&id)).await.unwrap().into_inner();
            matched.push(m.driver_id);
        }
    }
    let lose = match how {
        Lost::Killed => Kill(1),
        Lost::Frozen => Freeze(1),
    };
    sim.run(&[Wait(Duration::from_secs(6)), lose, Wait(Duration::from_secs(60)), Converge(vec![0, 2])]).await;

    // Per driver, offers alternate: each claim (AVAILABLE -> DISPATCHED) is released
    // (DISPATCHED -> AVAILABLE) once, by its timer, before the driver is claimed again
    // (a match in flight through a frozen node may claim a driver once more after its
    // first offer lapsed: a new offer, not a second firing).
    let count = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<pb::StateChange>, seen: &mut Vec<pb::StateChange>| {
        while let Ok(e) = rx.try_recv() {
            seen.push(e);
        }
        let mut expired: HashMap<String, usize> = HashMap::new();
        let mut released: HashMap<String, usize> = HashMap::new();
        let mut offered: HashMap<&str, bool> = HashMap::new();
        for e in seen.iter() {
            if e.state == "EXPIRED" {
                *expired.entry(e.id.clone()).or_default() += 1;
            }
            if e.from_state == "AVAILABLE" && e.state == "DISPATCHED" {
                let was = offered.insert(&e.id, true);
                assert_ne!(was, Some(true), "{} claimed twice without a release between: {seen:#?}", e.id);
            }
            if e.from_state == "DISPATCHED" && e.state == "AVAILABLE" {
                *released.entry(e.id.clone()).or_default() += 1;
                let was = offered.insert(&e.id, false);
                assert_eq!(was, Some(true), "{}'s offer released twice: {seen:#?}", e.id);
            }
        }
        (expired, released)
    };
    let mut seen = Vec::new();
    let (expired, released) = count(&mut rx, &mut seen);
    for k in 0..12 {
        let id = format!("ttl-{k}");
        assert_eq!(expired.get(&id), Some(&1), "trip {id} expired {:?} times", expired.get(&id));
    }
    for d in &matched {
        assert_eq!(released.get(d), Some(&1), "{d}'s offer released {:?} times", released.get(d));
        let got = sim.locations(0).get_driver(harness::model::by_id(d)).await.unwrap().into_inner();
        assert_eq!(got.status, pb::DriverStatus::Available as i32, "{d} after its offer lapsed");
    }

    // The lost node comes back with copies of those trips and claims: nothing fires again.
    let back = match how {
        Lost::Killed => Restart(1),
        Lost::Frozen => Thaw(1),
    };
    sim.run(&[back, Converge(vec![0, 1, 2]), Wait(Duration::from_secs(40))]).await;
    let (expired, _) = count(&mut rx, &mut seen);
    assert!(expired.values().all(|n| *n == 1), "a trip expired twice: {expired:?}");
}

/// A 2–2 split of four nodes: neither side has a majority, so neither serves keyed
/// writes or claims (the rule's cost); after the heal every acknowledged write is there.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_two_two_split_stops_both_halves_and_loses_nothing() {
    let mut sim = Sim::new(4, FLAGS, 5);
    use Op::*;
    sim.run(&[
        Start(0),
        Start(1),
        Start(2),
        Start(3),
        Converge(vec![0, 1, 2, 3]),
        SendFixes(300),
        Trips(16),
        Wait(Duration::from_secs(2)),
        Partition(vec![0, 1], vec![2, 3]),
        Wait(Duration::from_secs(15)),
    ])
    .await;
    for i in 0..4 {
        let r = sim.trips(i).apply(harness::model::booking(&format!("split-{i}"))).await;
        let s = r.expect_err("a half without a majority accepted a booking");
        assert_eq!(s.code(), tonic::Code::Unavailable, "n{i}: {s:?}");
        let m = sim.dispatch(i).r#match(harness::model::match_req(&format!("split-{i}"))).await;
        assert!(m.is_err(), "n{i} matched without a majority: {m:?}");
    }
    sim.run(&[Heal, Converge(vec![0, 1, 2, 3]), Check(vec![0, 1, 2, 3]), SendFixes(100), Trips(4)]).await;
    sim.run(&[Check(vec![0, 1, 2, 3])]).await;
}

/// Rows of `node`'s partition table in `state` ("owned", "outgoing", ...), and of
/// those, how many the ring gives `node`.
async fn rows_in(sim: &Sim, node: usize, state: &str) -> (usize, usize) {
    let rows = sim.admin(node).partitions(locus::pb::PartitionsRequest {}).await.unwrap().into_inner().rows;
    let mine = format!("n{node}");
    let rows: Vec<_> = rows.into_iter().filter(|r| r.state == state).collect();
    (rows.len(), rows.iter().filter(|r| r.ring_owner == mine).count())
}

/// Copies of older history that take long (every partition's older segments arrive
/// 2 s late; with no history in the pulls, every moving partition with fixes has
/// some) hold up no hand-off round: a joining node serves every partition the ring gives it within
/// seconds, while its lenders still lend them for the copies. A node joining meanwhile
/// takes such a partition only once its history is whole, from the node that copied it
/// (it once promoted its own replica, without the older history, in the moment between
/// the lender forgetting the partition and the copier reporting it served). At the end a
/// replay from the earliest cursor has every acknowledged fix exactly once.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn slow_history_copies_hold_up_no_round_and_half_copied_partitions_stay_put() {
    let flags = [FLAGS, &["--history-pull-mib", "0"]].concat();
    let mut sim = Sim::new(4, &flags, 6).direct_links();
    use Op::*;
    sim.run(&[Start(0), Start(1), Converge(vec![0, 1]), SendFixes(600), Wait(Duration::from_secs(2))]).await;
    sim.net.set_history_delay(Duration::from_secs(2));
    sim.run(&[Start(2)]).await;
    let t0 = tokio::time::Instant::now();
    loop {
        let mut installed = 0;
        for n in 0..3 {
            installed += rows_in(&sim, n, "owned").await.1;
        }
        let joined = rows_in(&sim, 2, "owned").await.1;
        let lent = rows_in(&sim, 0, "outgoing").await.0 + rows_in(&sim, 1, "outgoing").await.0;
        // Every partition installed at its ring owner (the new ring's), while copies
        // still go on.
        if joined > 0 && installed == locus::keys::PARTITIONS as usize {
            assert!(lent > 0, "every copy done already: the copies were not slow enough to show anything");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "after {:?} {installed} partitions are installed at their owner: the copies hold up the pulls",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // n3 joins while n2 still copies: it gets n2's partitions once their history is whole.
    sim.run(&[Start(3), SendFixes(200)]).await;
    sim.converge(&[0, 1, 2, 3], Duration::from_secs(3_600)).await;
    sim.net.set_history_delay(Duration::ZERO);
    sim.run(&[Wait(Duration::from_secs(5)), Check(vec![0, 1, 2, 3])]).await;
    let replay = locus::pb::fixes_client::FixesClient::new(sim.channel(0))
        .subscribe(common::replay::request(&Default::default(), true))
        .await
        .unwrap()
        .into_inner();
    let acked: Vec<(String, i64)> =
        sim.model.fixes.iter().flat_map(|(id, fixes)| fixes.iter().map(|f| (id.clone(), f.ts))).collect();
    common::replay::assert_replay_holds(replay, &acked).await;
}
