//! Restart persistence and reliable expiry timers, with real processes and real sled
//! files: graceful stop (SIGTERM), `kill -9`, and timers that come due while a node is
//! down.

mod common;

use std::time::{Duration, Instant};

use common::{NodeProc, by_cab, by_session, eventually, fix, now_ms};
use locus::pb::{self, get_driver_request};
use tokio_stream::StreamExt;
use tonic::Code;

fn by_id(id: &str) -> pb::GetDriverRequest {
    pb::GetDriverRequest { key: Some(get_driver_request::Key::DriverId(id.into())), include_trail: true }
}

async fn load(node: &NodeProc, drivers: usize, rounds: i64, t: i64) {
    let mut c = node.client().await;
    let batches: Vec<pb::LocationBatch> = (0..rounds)
        .map(|r| pb::LocationBatch {
            batch_id: r as u64,
            updates: (0..drivers)
                .map(|i| pb::LocationUpdate {
                    cab_number: format!("CAB{i}"),
                    session: format!("S{i}"),
                    ..fix(&format!("p{i}"), 48.0 + i as f64 * 1e-3, 2.0 + r as f64 * 1e-4, t + r * 1_000)
                })
                .collect(),
        })
        .collect();
    let mut acks = c.update_stream(tokio_stream::iter(batches)).await.unwrap().into_inner();
    for _ in 0..rounds {
        let a = acks.next().await.unwrap().unwrap();
        assert_eq!(a.accepted as usize, drivers, "{:?}", a.rejected.first());
    }
}

async fn assert_all_there(node: &NodeProc, drivers: usize, rounds: i64, t: i64) {
    let mut c = node.client().await;
    for i in 0..drivers {
        let d = c.get_driver(by_id(&format!("p{i}"))).await.unwrap().into_inner();
        assert_eq!(d.timestamp_ms, t + (rounds - 1) * 1_000, "driver p{i} lost fixes");
        assert_eq!(d.trail.len(), rounds as usize);
        assert_eq!(d.cab_number, format!("CAB{i}"));
    }
    // Secondary indexes and the geo index are rebuilt too.
    assert_eq!(c.get_driver(by_cab("CAB3")).await.unwrap().into_inner().driver_id, "p3");
    assert_eq!(c.get_driver(by_session("S4")).await.unwrap().into_inner().driver_id, "p4");
    let r =
        c.nearby(pb::NearbyRequest { lat: 48.0, lon: 2.0, limit: 3, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(r.drivers.iter().map(|h| h.driver_id.as_str()).collect::<Vec<_>>(), vec!["p0", "p1", "p2"]);
}

#[tokio::test]
async fn graceful_restart_keeps_every_driver_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProc::start(dir.path(), &["--persist-interval", "5s"]);
    let t = now_ms() - 60_000;
    load(&node, 200, 5, t).await;
    // The interval is long: only the shutdown flush can have written the last fixes.
    let status = node.terminate().await;
    assert!(status.success(), "SIGTERM exit: {status:?}");
    let node = node.restart();
    assert_all_there(&node, 200, 5, t).await;
}

#[tokio::test]
async fn kill_9_loses_at_most_the_persist_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProc::start(dir.path(), &["--persist-interval", "200ms"]);
    let t = now_ms() - 60_000;
    load(&node, 200, 5, t).await;
    // Wait out one persist window plus a flush, then pull the plug.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    node.kill9();
    let node = node.restart();
    assert_all_there(&node, 200, 5, t).await;
}

#[tokio::test]
async fn expiry_timers_fire_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProc::start(dir.path(), &["--driver-ttl", "3s", "--persist-interval", "100ms"]);
    let mut c = node.client().await;
    let t = now_ms() - 60_000;
    c.update(fix("soon", 9.0, 9.0, t)).await.unwrap();
    let sent = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.kill9();
    // Stay down past the due time.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let node = node.restart();
    let mut c = node.client().await;
    let e = c.get_driver(by_id("soon")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "the overdue timer fired at startup");
    assert!(sent.elapsed() < Duration::from_secs(10));

    // A timer that is not yet due survives the restart and fires on time.
    c.update(fix("later", 9.0, 9.0, t + 1_000)).await.unwrap();
    let mut node = node;
    let status = node.terminate().await;
    assert!(status.success());
    let node = node.restart();
    let mut c = node.client().await;
    let r = c.get_driver(by_id("later")).await;
    assert!(r.is_ok(), "not due yet: {r:?}");
    assert!(
        eventually(Duration::from_secs(6), || {
            let mut c = c.clone();
            async move { c.get_driver(by_id("later")).await.is_err() }
        })
        .await,
        "the restored timer fires"
    );
}

fn segments(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("drivers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".log"))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn compaction_drops_old_segments_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--persist-interval", "100ms", "--log-segment-bytes", "20000", "--log-compact-bytes", "60000"];
    let mut node = NodeProc::start(dir.path(), &args);
    let t = now_ms() - 600_000;
    // 300 drivers x 30 rounds, one batch per round, with pauses so commits interleave.
    let mut c = node.client().await;
    for r in 0..30i64 {
        let batch = pb::LocationBatch {
            batch_id: r as u64,
            updates: (0..300)
                .map(|i| fix(&format!("p{i}"), 48.0 + i as f64 * 1e-3, 2.0 + r as f64 * 1e-4, t + r * 1_000))
                .collect(),
        };
        let mut acks = c.update_stream(tokio_stream::iter(vec![batch])).await.unwrap().into_inner();
        assert_eq!(acks.next().await.unwrap().unwrap().accepted, 300);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // 9,000 fixes write far more than 60 kB: the first segment must be compacted away.
    assert!(
        eventually(Duration::from_secs(10), || {
            let dir = dir.path().to_path_buf();
            async move { !segments(&dir).contains(&"000000000001.log".to_string()) }
        })
        .await,
        "no segment was ever dropped: {:?}",
        segments(dir.path())
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.kill9();
    let node = node.restart();
    let mut c = node.client().await;
    for i in 0..300 {
        let d = c.get_driver(by_id(&format!("p{i}"))).await.unwrap().into_inner();
        assert_eq!(d.timestamp_ms, t + 29_000, "driver p{i}");
        let ts: Vec<i64> = d.trail.iter().map(|f| f.timestamp_ms).collect();
        assert_eq!(ts, (0..30).map(|r| t + r * 1_000).collect::<Vec<_>>(), "driver p{i} trail");
    }
}
