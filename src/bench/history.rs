//! History, the fix stream and the PostgreSQL exporter on one node (`locus bench`,
//! section "history").
//!
//! 1. Ingest through `UpdateStream` with no consumer, then the same load again with four
//!    `Fixes.Subscribe` consumers reading along (from now); each consumer's count of
//!    fixes received is checked against what was accepted.
//! 2. `locus export postgres` (in-process) copies everything ingested so far into a
//!    throwaway PostgreSQL server (skipped when PostgreSQL is not installed): rows/s.
//! 3. A day of 1 Hz fixes for `--history-day-drivers` drivers (86,400 each, device times
//!    a second apart, sent as fast as the node takes them), then `GetHistory` of one
//!    driver's whole day (9 pages of 10,000) for drivers at random: latency per page and
//!    per day.
//!
//! The bytes of history per fix come from the node's own counters.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use super::{BenchConfig, IngestResult, Latency, Proc, Workload, ingest, metric, wait_port};
use crate::pb;
use crate::sim::{connect, connect_channel};

pub struct HistoryFigures {
    pub plain: IngestResult,
    pub with_consumers: IngestResult,
    /// Fixes each consumer received of the second load.
    pub consumed: Vec<u64>,
    pub history_bytes_per_fix: f64,
    /// (rows, seconds, transactions), if PostgreSQL is installed.
    pub export: Option<(u64, f64, u64)>,
    pub day_drivers: usize,
    pub day_ingest: IngestResult,
    pub page: Latency,
    pub day: Latency,
}

const DAY: usize = 86_400;

async fn consume(target: String, until: u64) -> anyhow::Result<u64> {
    let mut c = pb::fixes_client::FixesClient::new(connect_channel(&target).await?)
        .max_decoding_message_size(crate::routing::cluster::MAX_MESSAGE_BYTES);
    let req = pb::SubscribeFixesRequest { max_batch: 1_000, ..Default::default() };
    let mut s = c.subscribe(req).await?.into_inner();
    let mut n = 0u64;
    while n < until {
        match tokio::time::timeout(Duration::from_secs(10), s.message()).await {
            Ok(Ok(Some(b))) => n += b.fixes.len() as u64,
            _ => break,
        }
    }
    Ok(n)
}

pub async fn run(cfg: &BenchConfig, dir: &std::path::Path) -> anyhow::Result<HistoryFigures> {
    let port = cfg.port_base + 30;
    let target = format!("http://127.0.0.1:{port}");
    let http = format!("127.0.0.1:{}", port + 1);
    let no_extra: [&str; 0] = [];
    let _node = Proc(
        super::node_command(cfg, "bench-history", port, Some(port + 2), &dir.join("node"), no_extra)?
            .spawn()
            .context("starting locus node")?,
    );
    wait_port(port).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1. Ingest alone, then with four consumers reading along.
    let w = Workload::new(cfg.history_drivers, 2 * cfg.history_rounds, 31);
    eprintln!("[bench] history: ingest with no consumer");
    let plain = ingest(&target, w.batches_for(cfg.streams, cfg.batch, 0..cfg.history_rounds)).await?;
    // The consumers start from now: after the first load is written.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = w.batches_for(cfg.streams, cfg.batch, cfg.history_rounds..2 * cfg.history_rounds);
    let expect: u64 = second.iter().flatten().map(|b| b.updates.len() as u64).sum();
    let consumers: Vec<_> = (0..4).map(|_| tokio::spawn(consume(target.clone(), expect))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    eprintln!("[bench] history: ingest with four consumers");
    let with_consumers = ingest(&target, second).await?;
    let mut consumed = Vec::new();
    for c in consumers {
        consumed.push(c.await??);
    }
    let (_, page) = crate::sim::http_get(&http, "/metrics").await?;
    let bytes = metric(&page, "locus_history_bytes_total").unwrap_or(0.0);
    let fixes = metric(&page, "locus_history_fixes_total").unwrap_or(1.0);

    // 2. Everything so far into PostgreSQL.
    let export = match super::pg::pg_bin() {
        None => {
            eprintln!("[bench] history: PostgreSQL not installed, exporter skipped");
            None
        }
        Some(_) => {
            eprintln!("[bench] history: locus export postgres");
            let pg = super::pg::PgServer::start(&dir.join("pg"), port + 5)?;
            let ecfg = crate::export::PostgresConfig {
                targets: vec![target.clone()],
                dsn: pg.dsn(),
                name: "bench".into(),
                table: "locus_fixes".into(),
                batch_rows: 1_000,
                batch_interval: Duration::from_secs(1),
                from_now: false,
                exit_idle: Duration::from_secs(2),
                report_every: Duration::from_secs(5),
            };
            let t = crate::export::run(ecfg, std::future::pending()).await?;
            // The idle wait at the end is not export time.
            Some((t.rows, (t.seconds - 2.0).max(1e-3), t.transactions))
        }
    };

    // 3. A day of 1 Hz fixes per driver, then whole-day GetHistory calls.
    let day = Workload::new(cfg.history_day_drivers, DAY, 77).named("day");
    eprintln!("[bench] history: a day of 1 Hz fixes for {} drivers", cfg.history_day_drivers);
    let (mut fixes_sent, mut accepted, mut secs) = (0, 0, 0.0);
    for from in (0..DAY).step_by(3_600) {
        let r = ingest(&target, day.batches_for(cfg.streams, cfg.batch, from..(from + 3_600).min(DAY))).await?;
        (fixes_sent, accepted, secs) = (fixes_sent + r.fixes, accepted + r.accepted, secs + r.secs);
    }
    let day_ingest = IngestResult { fixes: fixes_sent, accepted, secs };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut c = connect(&target).await?;
    let mut rng = SmallRng::seed_from_u64(5);
    let (mut pages, mut days) = (Vec::new(), Vec::new());
    let t0 = Instant::now();
    for _ in 0..cfg.history_queries {
        let id = format!("day-{}", rng.random_range(0..cfg.history_day_drivers));
        let start = Instant::now();
        let (mut after, mut n) = (None, 0usize);
        loop {
            let p0 = Instant::now();
            let req = pb::GetHistoryRequest { driver_id: id.clone(), limit: 10_000, after, ..Default::default() };
            let r = c.get_history(req).await?.into_inner();
            pages.push(p0.elapsed().as_secs_f64() * 1e6);
            n += r.fixes.len();
            after = r.next;
            if after.is_none() {
                break;
            }
        }
        days.push(start.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(n == DAY, "{id}: {n} fixes in its history, {DAY} sent");
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(HistoryFigures {
        plain,
        with_consumers,
        consumed,
        history_bytes_per_fix: bytes / fixes.max(1.0),
        export,
        day_drivers: cfg.history_day_drivers,
        day_ingest,
        page: Latency::from(pages, secs),
        day: Latency::from(days, secs),
    })
}

pub fn report(f: &HistoryFigures, out: &mut String) -> std::fmt::Result {
    writeln!(out, "\n## History, the fix stream and the PostgreSQL exporter (one node)\n")?;
    writeln!(out, "| figure | value |")?;
    writeln!(out, "|---|---|")?;
    writeln!(out, "| ingest, no consumer ({} fixes) | **{:.0} fixes/s** |", f.plain.fixes, f.plain.rate())?;
    writeln!(
        out,
        "| ingest with 4 `Fixes.Subscribe` consumers reading along ({} fixes) | **{:.0} fixes/s** |",
        f.with_consumers.fixes,
        f.with_consumers.rate()
    )?;
    writeln!(out, "| fixes each consumer received (of {} accepted) | {:?} |", f.with_consumers.accepted, f.consumed)?;
    writeln!(out, "| history on disk per fix (blocks, framed) | {:.1} bytes |", f.history_bytes_per_fix)?;
    match f.export {
        Some((rows, secs, tx)) => writeln!(
            out,
            "| `locus export postgres`: {rows} rows in {tx} transactions (COPY, 1,000 rows / 1 s) | **{:.0} rows/s** |",
            rows as f64 / secs
        )?,
        None => writeln!(out, "| `locus export postgres` | not run: PostgreSQL not installed |")?,
    }
    writeln!(
        out,
        "| a day of 1 Hz fixes for {} drivers ({} fixes) ingested | {:.0} fixes/s |",
        f.day_drivers,
        f.day_ingest.fixes,
        f.day_ingest.rate()
    )?;
    writeln!(
        out,
        "| `GetHistory` page of 10,000 fixes: p50 / p99 | {:.1} / {:.1} ms |",
        f.page.p50 / 1e3,
        f.page.p99 / 1e3
    )?;
    writeln!(
        out,
        "| `GetHistory` of a driver's whole day (86,400 fixes, 9 pages), {} calls: p50 / p99 | **{:.0} / {:.0} ms** |",
        f.day.n,
        f.day.p50 / 1e3,
        f.day.p99 / 1e3
    )?;
    Ok(())
}
