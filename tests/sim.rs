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
