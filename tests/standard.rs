//! The standard gRPC surfaces, checked with clients no one here wrote: grpcio's health
//! and reflection clients (Python; `tests/py/standard_clients.py`) against real nodes.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cluster::TestCluster;
use locus::pb;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/standard_clients.py");

/// Runs the script to completion; its stdout lines.
fn run(args: &[&str]) -> Vec<String> {
    let out = Command::new("python3").arg(SCRIPT).args(args).output().expect("python3");
    assert!(
        out.status.success(),
        "standard_clients.py {args:?} failed (pip install grpcio grpcio-health-checking grpcio-reflection): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
}

fn host(grpc: &str) -> &str {
    grpc.trim_start_matches("http://")
}

const ALL: [&str; 9] = [
    "-",
    "locus.v1.Locations",
    "locus.v1.Sessions",
    "locus.v1.Trips",
    "locus.v1.Dispatch",
    "locus.v1.Events",
    "locus.v1.Cluster",
    "locus.v1.Handoff",
    "locus.v1.Internal",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_readiness_and_watch_sees_a_drain() {
    let c = TestCluster::start(2);
    c.converge(&["n0", "n1"], Duration::from_secs(20)).await;
    let addr = host(&c.node(1).grpc).to_string();
    let checked = run(&[&["check", &addr], &ALL[..], &["locus.v1.Nope"]].concat());
    for s in ALL {
        assert!(checked.contains(&format!("{s} SERVING")), "{s} not SERVING: {checked:?}");
    }
    // An unknown service is NOT_FOUND, as the protocol says.
    assert!(checked.contains(&"locus.v1.Nope ERROR:NOT_FOUND".to_string()), "{checked:?}");

    // Watch the whole server while n1 drains: SERVING, then NOT_SERVING.
    let mut watch = Command::new("python3")
        .arg(SCRIPT)
        .args(["watch", &addr, "-"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(10)).expect("a first Watch answer");
    assert_eq!(first, "SERVING");
    let drained = c.admin(1).await.drain(pb::DrainRequest { timeout_ms: 20_000 }).await.unwrap().into_inner();
    assert!(drained.drained, "{drained:?}");
    let next = rx.recv_timeout(Duration::from_secs(10)).expect("Watch saw the drain");
    assert_eq!(next, "NOT_SERVING");
    // A drained node still answers its operator and its peers.
    let checked = run(&[&["check", &addr], &ALL[..]].concat());
    for s in &ALL[..6] {
        assert!(checked.contains(&format!("{s} NOT_SERVING")), "{s} still serving while drained: {checked:?}");
    }
    for s in &ALL[6..] {
        assert!(checked.contains(&format!("{s} SERVING")), "{s}: {checked:?}");
    }
    // The other node serves on.
    let other = run(&["check", host(&c.node(0).grpc), "-"]);
    assert_eq!(other, vec!["- SERVING".to_string()]);
    let _ = watch.kill();
    let _ = watch.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_every_service() {
    let c = TestCluster::start(1);
    c.converge(&["n0"], Duration::from_secs(20)).await;
    let addr = host(&c.node(0).grpc).to_string();
    for version in ["v1", "v1alpha"] {
        let lines = run(&["reflect", &addr, version]);
        for s in &ALL[1..] {
            assert!(lines.contains(&format!("service {s}")), "{version}: {s} not listed: {lines:?}");
        }
        assert!(lines.contains(&"service grpc.health.v1.Health".to_string()), "{lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("service grpc.reflection.")), "{lines:?}");
        // `describe`: each service's methods come back from its file descriptor.
        for m in ["locus.v1.Locations.Nearby", "locus.v1.Locations.UpdateStream", "locus.v1.Dispatch.Match"] {
            assert!(lines.contains(&format!("method {m}")), "{version}: {m} not described: {lines:?}");
        }
        let methods = lines.iter().filter(|l| l.starts_with("method ")).count();
        assert!(methods >= 25, "{version}: only {methods} methods described");
    }
}
