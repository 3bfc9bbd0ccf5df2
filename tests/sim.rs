//! Scripted cluster scenarios in one process, in virtual time (`tests/harness`): real
//! nodes on the in-process network, checked against what their clients were told.

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
    let mut sim = Sim::new(5, FLAGS, 2);
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
        Wait(Duration::from_secs(6)),
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
    // The cut-off node refuses keyed writes and claims: it cannot see a majority.
    let refused = sim.locations(2).get_driver(harness::model::by_id("drv-1")).await;
    let writes = sim
        .trips(2)
        .apply(harness::model::booking("minority-trip"))
        .await
        .expect_err("a node without a majority accepted a booking");
    assert_eq!(writes.code(), tonic::Code::Unavailable, "{writes:?}");
    let m = sim.dispatch(2).r#match(harness::model::match_req("minority-trip")).await;
    assert!(m.is_err(), "a node without a majority matched: {m:?} (read: {refused:?})");
    sim.run(&[SendFixes(100), Trips(8), Converge(vec![0, 1]), Check(vec![0, 1]), Heal, Converge(vec![0, 1, 2])]).await;
    sim.run(&[Check(vec![0, 1, 2])]).await;
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
