//! `locus export postgres`: every accepted fix into a PostgreSQL table, in batches, once.
//!
//! A consumer of `Fixes.Subscribe` (any node; the next `--target` when one fails). Fixes
//! are cut into transactions of `--batch-rows` (1,000) rows or `--batch-interval` (1 s),
//! whichever comes first ([`batch`]); each transaction is one `COPY` of the rows and
//! an upsert of the cursor they advance to (table `locus_export_cursor`, keyed by
//! `--name` and partition). A crash anywhere loses nothing and repeats nothing: on
//! start the exporter reads its cursor from the same database and resumes after it;
//! a transaction that did not commit left neither its rows nor its cursor.
//!
//! The fixes table is created if missing, keyed by (partition, epoch, seq), with a
//! PostGIS `geom` point when the extension can be created. A partition whose history no
//! longer reaches back to the cursor (retention) stops the exporter with the partition
//! and the oldest cursor it can resume from, rather than skipping silently.

pub mod batch;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures_util::SinkExt;
use tracing::{info, warn};

use self::batch::{Batch, Batcher, COLUMNS, Cursor, Limits};
use crate::clock::wall_ms;
use crate::config::parse_duration;
use crate::pb;

#[derive(Args, Clone, Debug)]
pub struct ExportConfig {
    #[command(subcommand)]
    pub sink: Sink,
}

#[derive(Subcommand, Clone, Debug)]
pub enum Sink {
    /// Into PostgreSQL, with COPY, exactly once.
    Postgres(PostgresConfig),
}

#[derive(Args, Clone, Debug)]
pub struct PostgresConfig {
    /// gRPC addresses of nodes, comma-separated: any node serves the whole stream; the
    /// next is tried when one fails.
    #[arg(long = "target", env = "LOCUS_ADDR", default_value = "http://127.0.0.1:7400", value_delimiter = ',')]
    pub targets: Vec<String>,
    /// PostgreSQL connection string (libpq key=value form, or a postgresql:// URL).
    #[arg(long, env = "LOCUS_PG_DSN", default_value = "host=/var/run/postgresql dbname=locus")]
    pub dsn: String,
    /// This exporter's name: its cursor is stored under it (two exporters with two names
    /// each get every fix).
    #[arg(long, default_value = "locus-export")]
    pub name: String,
    /// The fixes table (created if missing).
    #[arg(long, default_value = "locus_fixes")]
    pub table: String,
    /// Rows per transaction, at most.
    #[arg(long, default_value_t = 1_000)]
    pub batch_rows: usize,
    /// A transaction waits at most this long for more rows.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub batch_interval: Duration,
    /// Partitions without a stored cursor start from now, not from the oldest fix kept.
    #[arg(long)]
    pub from_now: bool,
    /// Exit once nothing new arrived for this long (0: run until stopped).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub exit_idle: Duration,
    /// How often to log rows/s and lag.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub report_every: Duration,
}

/// What a run exported.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub rows: u64,
    pub transactions: u64,
    pub seconds: f64,
}

fn check_table(name: &str) -> anyhow::Result<()> {
    let ok = name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        bail!("--table {name:?}: use a plain lowercase identifier (letters, digits, _)");
    }
    Ok(())
}

/// Creates what is missing; returns whether the table has a PostGIS `geom` column.
async fn setup(db: &tokio_postgres::Client, table: &str) -> anyhow::Result<bool> {
    let postgis = match db.batch_execute("CREATE EXTENSION IF NOT EXISTS postgis").await {
        Ok(()) => true,
        Err(e) => {
            info!(error = %e, "PostGIS not available: points are stored as lat/lon only");
            false
        }
    };
    let geom = if postgis { ",\n  geom geometry(Point, 4326)" } else { "" };
    db.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (
  partition integer NOT NULL,
  epoch bigint NOT NULL,
  seq bigint NOT NULL,
  driver_id text NOT NULL,
  lat double precision NOT NULL,
  lon double precision NOT NULL,
  heading_deg real,
  speed_mps real,
  accuracy_m real,
  device_time timestamptz NOT NULL,
  received_time timestamptz NOT NULL,
  status text NOT NULL,
  trip_id text,
  trip_cost numeric(12, 2){geom},
  PRIMARY KEY (partition, epoch, seq)
);
CREATE INDEX IF NOT EXISTS {table}_driver_time ON {table} (driver_id, received_time);
CREATE TABLE IF NOT EXISTS locus_export_cursor (
  exporter text NOT NULL,
  partition integer NOT NULL,
  epoch bigint NOT NULL,
  seq bigint NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (exporter, partition)
);"
    ))
    .await
    .context("creating the tables")?;
    let has_geom = db
        .query_opt("SELECT 1 FROM information_schema.columns WHERE table_name = $1 AND column_name = 'geom'", &[&table])
        .await?
        .is_some();
    Ok(has_geom)
}

async fn load_cursor(db: &tokio_postgres::Client, name: &str) -> anyhow::Result<Cursor> {
    let rows = db
        .query("SELECT partition, epoch, seq FROM locus_export_cursor WHERE exporter = $1", &[&name])
        .await
        .context("reading the cursor")?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i32>(0) as u32, (r.get::<_, i64>(1) as u64, r.get::<_, i64>(2) as u64)))
        .collect())
}

/// One transaction: the rows and the cursor they advance to.
async fn commit(db: &mut tokio_postgres::Client, cfg: &PostgresConfig, geom: bool, b: &Batch) -> anyhow::Result<()> {
    let tx = db.transaction().await?;
    if b.rows > 0 {
        let cols = if geom { format!("{COLUMNS}, geom") } else { COLUMNS.to_string() };
        let sink =
            tx.copy_in::<_, std::io::Cursor<Vec<u8>>>(&format!("COPY {} ({cols}) FROM STDIN", cfg.table)).await?;
        let mut sink = std::pin::pin!(sink);
        sink.send(std::io::Cursor::new(b.copy.clone())).await?;
        sink.finish().await?;
    }
    let (mut ps, mut es, mut ss) = (Vec::new(), Vec::new(), Vec::new());
    for (p, (e, s)) in &b.advance {
        ps.push(*p as i32);
        es.push(*e as i64);
        ss.push(*s as i64);
    }
    tx.execute(
        "INSERT INTO locus_export_cursor (exporter, partition, epoch, seq)
         SELECT $1, p, e, s FROM unnest($2::int4[], $3::int8[], $4::int8[]) AS t(p, e, s)
         ON CONFLICT (exporter, partition) DO UPDATE
           SET epoch = EXCLUDED.epoch, seq = EXCLUDED.seq, updated_at = now()",
        &[&cfg.name, &ps, &es, &ss],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Runs the exporter until stopped (or idle for `--exit-idle`).
pub async fn run(cfg: PostgresConfig, stop: impl std::future::Future<Output = ()>) -> anyhow::Result<Totals> {
    check_table(&cfg.table)?;
    if cfg.batch_rows == 0 || cfg.batch_rows > crate::api::history::MAX_HISTORY_PAGE as usize {
        bail!("--batch-rows {}: 1 to {}", cfg.batch_rows, crate::api::history::MAX_HISTORY_PAGE);
    }
    let (mut db, conn) = tokio_postgres::connect(&cfg.dsn, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL ({})", cfg.dsn))?;
    let conn = tokio::spawn(async move {
        if let Err(e) = conn.await {
            warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    let geom = setup(&db, &cfg.table).await?;
    let mut cursor = load_cursor(&db, &cfg.name).await?;
    info!(exporter = %cfg.name, table = %cfg.table, partitions = cursor.len(), geom, "exporting fixes");
    let limits = Limits { rows: cfg.batch_rows, interval_ms: cfg.batch_interval.as_millis() as i64, geom };
    let mut batcher = Batcher::new(limits);
    let mut totals = Totals::default();
    let started = Instant::now();
    let mut last_new = Instant::now();
    let (mut report_rows, mut report_at, mut lag_ms) = (0u64, Instant::now(), 0i64);
    let mut stop = std::pin::pin!(stop);
    let mut attempt = 0usize;
    'connect: loop {
        let target = cfg.targets[attempt % cfg.targets.len()].clone();
        attempt += 1;
        let req = pb::SubscribeFixesRequest {
            after: cursor.iter().map(|(p, (e, s))| pb::HistoryPosition { partition: *p, epoch: *e, seq: *s }).collect(),
            start: if cfg.from_now { pb::StartAt::Latest } else { pb::StartAt::Earliest } as i32,
            max_batch: cfg.batch_rows.min(1_000) as u32,
            ..Default::default()
        };
        let stream = match crate::sim::connect_channel(&target).await {
            Ok(ch) => pb::fixes_client::FixesClient::new(ch)
                .max_decoding_message_size(crate::routing::cluster::MAX_MESSAGE_BYTES)
                .subscribe(req)
                .await
                .map(|r| r.into_inner()),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) if e.code() == tonic::Code::OutOfRange => bail!("{}", e.message()),
            Err(e) => {
                warn!(target = %target, error = %e, "cannot subscribe; trying the next node");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue 'connect,
                    _ = &mut stop => break 'connect,
                }
            }
        };
        loop {
            let due = batcher.due_at().map(|t| Duration::from_millis((t - wall_ms()).max(0) as u64));
            let idle = (!cfg.exit_idle.is_zero()).then(|| cfg.exit_idle.saturating_sub(last_new.elapsed()));
            tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(b)) => {
                        if !b.fixes.is_empty() {
                            last_new = Instant::now();
                        }
                        if batcher.would_overflow(&b) {
                            let t = batcher.take();
                            lag_ms = flush(&mut db, &cfg, geom, t, &mut cursor, &mut totals).await?;
                        }
                        batcher.push(&b, wall_ms());
                        if batcher.due(wall_ms()) {
                            let t = batcher.take();
                            lag_ms = flush(&mut db, &cfg, geom, t, &mut cursor, &mut totals).await?;
                        }
                    }
                    Ok(None) => {
                        warn!(target = %target, "the fix stream ended; resubscribing");
                        break;
                    }
                    Err(e) if e.code() == tonic::Code::OutOfRange => {
                        let t = batcher.take();
                        flush(&mut db, &cfg, geom, t, &mut cursor, &mut totals).await?;
                        bail!("{} (the exporter's cursor is in locus_export_cursor, exporter = {:?})", e.message(), cfg.name);
                    }
                    Err(e) => {
                        warn!(target = %target, error = %e, "the fix stream failed; resubscribing");
                        break;
                    }
                },
                _ = tokio::time::sleep(due.unwrap_or(Duration::from_secs(3600))), if due.is_some() => {
                    let t = batcher.take();
                    lag_ms = flush(&mut db, &cfg, geom, t, &mut cursor, &mut totals).await?;
                }
                _ = tokio::time::sleep(idle.unwrap_or_default()), if idle.is_some() => {
                    let t = batcher.take();
                    flush(&mut db, &cfg, geom, t, &mut cursor, &mut totals).await?;
                    info!(rows = totals.rows, "nothing new for --exit-idle; exiting");
                    break 'connect;
                }
                _ = tokio::time::sleep(cfg.report_every.max(Duration::from_secs(1)).saturating_sub(report_at.elapsed())) => {
                    let secs = report_at.elapsed().as_secs_f64().max(1e-3);
                    info!(
                        rows_per_s = ((totals.rows - report_rows) as f64 / secs).round(),
                        lag_ms,
                        rows = totals.rows,
                        transactions = totals.transactions,
                        "exporting"
                    );
                    (report_rows, report_at) = (totals.rows, Instant::now());
                }
                _ = &mut stop => {
                    let t = batcher.take();
                    flush(&mut db, &cfg, geom, t, &mut cursor, &mut totals).await?;
                    break 'connect;
                }
            }
        }
        // What arrived is committed; the next stream resumes after it.
        let t = batcher.take();
        flush(&mut db, &cfg, geom, t, &mut cursor, &mut totals).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    totals.seconds = started.elapsed().as_secs_f64();
    drop(db);
    let _ = conn.await;
    Ok(totals)
}

/// Commits a batch (if it holds anything) and advances the cursor; returns the lag of
/// its newest row (ms).
async fn flush(
    db: &mut tokio_postgres::Client,
    cfg: &PostgresConfig,
    geom: bool,
    b: Batch,
    cursor: &mut Cursor,
    totals: &mut Totals,
) -> anyhow::Result<i64> {
    if b.rows == 0 && b.advance.is_empty() {
        return Ok(0);
    }
    commit(db, cfg, geom, &b).await.context("committing a batch to PostgreSQL")?;
    cursor.extend(b.advance);
    totals.rows += b.rows as u64;
    totals.transactions += 1;
    metrics::counter!("locus_export_rows_total").increment(b.rows as u64);
    Ok(if b.rows > 0 { wall_ms() - b.newest_received_ms } else { 0 })
}
