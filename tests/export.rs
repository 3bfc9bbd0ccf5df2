//! `locus export postgres` against a real PostgreSQL server the test starts (Debian's
//! `postgresql` package, installed by `.ci/run`): the exporter is killed with SIGKILL
//! twice while fixes stream in, restarted, and the table ends up holding every
//! acknowledged fix exactly once.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{LOCUS, NodeProc, eventually, fix, home, now_ms};
use locus::pb;

/// A PostgreSQL server in a temporary directory, on a Unix socket there; stopped on drop.
struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
}

fn pg_bin() -> PathBuf {
    if let Ok(b) = std::env::var("LOCUS_PG_BIN") {
        return PathBuf::from(b);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect())
        .unwrap_or_default();
    found.sort();
    found.pop().expect("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
}

impl Postgres {
    fn start() -> Postgres {
        let bin = pg_bin();
        let dir = tempfile::tempdir().unwrap();
        // initdb refuses to run as root: run the server as the package's `postgres` user.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        if as_postgres {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
            assert!(ok.success(), "chown to postgres");
        }
        let pg = Postgres { bin, dir, port: common::cluster::free_port(), as_postgres };
        let data = pg.dir.path().join("data");
        pg.run("initdb", &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "locus", "--no-sync", "-E", "UTF8"]);
        let opts = format!("-k {} -p {} -c listen_addresses='' -c fsync=on", pg.dir.path().display(), pg.port);
        let log = pg.dir.path().join("pg.log");
        pg.run("pg_ctl", &["-D", data.to_str().unwrap(), "-o", &opts, "-l", log.to_str().unwrap(), "-w", "start"]);
        pg
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let out = if self.as_postgres {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&exe).args(args).output().unwrap()
        } else {
            Command::new(&exe).args(args).output().unwrap()
        };
        assert!(out.status.success(), "{tool} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn dsn(&self) -> String {
        format!("host={} port={} user=locus dbname=postgres", self.dir.path().display(), self.port)
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.dsn(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let exe = self.bin.join("pg_ctl");
        let args = ["-D", data.to_str().unwrap(), "-m", "immediate", "stop"];
        let _ = if self.as_postgres {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&exe).args(args).output()
        } else {
            Command::new(&exe).args(args).output()
        };
    }
}

fn exporter(node: &NodeProc, pg: &Postgres, log: &Path, extra: &[&str]) -> Child {
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
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
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
    let db = pg.client().await;
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
