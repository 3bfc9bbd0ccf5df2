//! `locus export postgres` against a real PostgreSQL server the test starts (Debian's
//! `postgresql` package, installed by `.ci/run`): the exporter is killed with SIGKILL
//! twice while fixes stream in, restarted, and the table ends up holding every
//! acknowledged fix exactly once.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::{LOCUS, NodeProc, eventually, fix, home, now_ms};
use locus::bench::pg::PgServer;
use locus::pb;

fn exporter(node: &NodeProc, pg: &PgServer, log: &Path, extra: &[&str]) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(LOCUS)
        .args(["export", "postgres", "--target", &node.grpc, "--dsn", &pg.dsn(), "--name", "crash-test"])
        .args(["--batch-rows", "300", "--batch-interval", "300ms", "--report-every", "1s"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn table_rows(db: &tokio_postgres::Client) -> i64 {
    match db.query_one("SELECT count(*) FROM locus_fixes", &[]).await {
        Ok(r) => r.get(0),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exporter_killed_mid_batch_and_restarted_leaves_every_fix_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PgServer::start(&dir.path().join("pg"), common::cluster::free_port())
        .expect("PostgreSQL (.ci/run installs it)");
    let node = NodeProc::start(dir.path(), &["--persist-interval", "50ms"]);
    let ids: Vec<String> = (0..60).map(|i| format!("pg-{i}")).collect();
    let ts0 = now_ms() - 3_600_000;
    // A gateway: 60 drivers, a fix each every 50 ms, for about 6 s.
    let gateway = {
        let mut cl = node.client().await;
        let ids = ids.clone();
        tokio::spawn(async move {
            let mut acked = HashSet::new();
            for round in 0..120i64 {
                let ts = ts0 + round * 1_000;
                let updates: Vec<_> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| fix(id, home(i).0 + round as f64 * 1e-5, home(i).1, ts))
                    .collect();
                let batch = pb::LocationBatch { updates, batch_id: round as u64 };
                let mut acks = cl.update_stream(tokio_stream::iter([batch])).await.unwrap().into_inner();
                let ack = acks.message().await.unwrap().unwrap();
                let rejected: HashSet<u32> = ack.rejected.iter().map(|r| r.index).collect();
                for (i, id) in ids.iter().enumerate() {
                    if !rejected.contains(&(i as u32)) {
                        acked.insert((id.clone(), ts));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            acked
        })
    };
    let log = dir.path().join("exporter.log");
    let db = pg.client().await.unwrap();
    // Killed twice while rows stream in, each time once it has committed more.
    for _ in 0..2 {
        let mut e = exporter(&node, &pg, &log, &[]);
        let before = table_rows(&db).await;
        let grew = eventually(Duration::from_secs(15), || {
            let db = &db;
            async move { table_rows(db).await > before + 500 }
        })
        .await;
        assert!(grew, "the exporter made no progress: {}", std::fs::read_to_string(&log).unwrap_or_default());
        e.kill().unwrap();
        e.wait().unwrap();
    }
    let acked = gateway.await.unwrap();
    assert!(acked.len() >= 60 * 100, "{} fixes acknowledged", acked.len());
    // Restarted: it resumes from its cursor and exits once caught up.
    let mut e = exporter(&node, &pg, &log, &["--exit-idle", "3s"]);
    let done = eventually(Duration::from_secs(60), || {
        let exited = e.try_wait().unwrap().is_some();
        async move { exited }
    })
    .await;
    assert!(done, "the exporter did not finish: {}", std::fs::read_to_string(&log).unwrap_or_default());
    assert!(e.wait().unwrap().success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());

    let rows = db
        .query("SELECT driver_id, (extract(epoch FROM device_time) * 1000)::bigint, status FROM locus_fixes", &[])
        .await
        .unwrap();
    let mut seen = HashSet::new();
    for r in &rows {
        let key: (String, i64) = (r.get(0), r.get(1));
        assert!(seen.insert(key.clone()), "{key:?} is in the table twice");
        assert_eq!(r.get::<_, String>(2), "AVAILABLE");
    }
    let missing: Vec<_> = acked.iter().filter(|k| !seen.contains(*k)).take(5).collect();
    assert!(missing.is_empty(), "acknowledged fixes missing from the table, e.g. {missing:?}");
    assert_eq!(rows.len(), acked.len(), "every row is an acknowledged fix");
    let cursors: i64 = db
        .query_one("SELECT count(*) FROM locus_export_cursor WHERE exporter = 'crash-test'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(cursors > 0, "the cursor is stored with the rows");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("rows_per_s"), "the exporter reports its rate: {log}");
}
