//! `locus bench`: the benchmarks behind `make bench` and `BENCHMARKS.md`.
//!
//! `locus bench all` starts real processes on this machine (a `locus node` from the same
//! binary, and `redis-server` when it is installed), drives the same workloads through
//! both, and writes a Markdown report:
//! 1. ingest through `UpdateStream`, distinct drivers, vs pipelined `GEOADD`;
//! 2. Nearby k=10 latency over 1,000,000 drivers in a city, vs `GEOSEARCH ... BYRADIUS
//!    ... ASC COUNT 10`;
//! 3. resident memory per driver at 1,000,000 drivers with full trails;
//! 4. the cluster figures of three nodes (`cluster`);
//! 5. join, drain and failover of a loaded cluster (`moves`; alone: `--only-moves`);
//! 6. compact UDP fixes (`udp`; alone: `--only-udp`);
//! 7. history: ingest with 0 and 4 fix-stream consumers, the PostgreSQL exporter's
//!    rows/s, `GetHistory` of a day of 1 Hz fixes (`history`; alone: `--only-history`).
//!
//! The load generator runs on the same machine, sharing its cores with the server.

mod cluster;
mod history;
mod moves;
pub mod pg;
mod redis;
mod trips;
mod udp;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::clock::wall_ms;
use crate::geo::EARTH_RADIUS_M;
use crate::pb::{self, DriverStatus};
use crate::sim::connect;

#[derive(Args, Clone, Debug)]
pub struct BenchConfig {
    /// Write the Markdown report here.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Distinct drivers in the ingest benchmark.
    #[arg(long, default_value_t = 100_000)]
    pub ingest_drivers: usize,
    /// Fixes per driver in the ingest benchmark.
    #[arg(long, default_value_t = 20)]
    pub ingest_rounds: usize,
    /// Drivers in the query and memory benchmarks.
    #[arg(long, default_value_t = 1_000_000)]
    pub query_drivers: usize,
    /// Fixes per driver loaded before measuring memory (fills the trails).
    #[arg(long, default_value_t = 32)]
    pub trail_fixes: usize,
    /// Nearby queries to time.
    #[arg(long, default_value_t = 20_000)]
    pub queries: usize,
    /// Fixes per batch (and GEOADD pipeline depth).
    #[arg(long, default_value_t = 1_000)]
    pub batch: usize,
    /// Concurrent streams (and Redis connections) for ingest.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Match calls to time (sequential), and to run concurrently for matches/s.
    #[arg(long, default_value_t = 4_000)]
    pub matches: usize,
    /// GEOSEARCH queries to time (Redis answers them more slowly: fewer keep the run short).
    #[arg(long, default_value_t = 5_000)]
    pub redis_queries: usize,
    /// Radius given to Redis GEOSEARCH (Redis needs one; Locus Nearby does not). The
    /// table uses the first; the others are reported below it.
    #[arg(long, value_delimiter = ',', default_value = "1000,200")]
    pub redis_radius_m: Vec<f64>,
    /// Skip the Redis side even if redis-server is installed.
    #[arg(long)]
    pub no_redis: bool,
    /// Extra flags for the benchmarked `locus node` (repeatable), e.g. `--node-arg=--shards=1`.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
    /// Skip the three-node cluster benchmarks.
    #[arg(long)]
    pub no_cluster: bool,
    /// Drivers loaded for the moves section (join, drain, failover under load).
    #[arg(long, default_value_t = 1_000_000)]
    pub move_drivers: usize,
    /// Skip the moves section.
    #[arg(long)]
    pub no_moves: bool,
    /// Run only the moves section (its report goes to `--out` alone).
    #[arg(long)]
    pub only_moves: bool,
    /// Drivers and rounds of the UDP section (one datagram per driver per round).
    #[arg(long, default_value_t = 50_000)]
    pub udp_drivers: usize,
    #[arg(long, default_value_t = 60)]
    pub udp_rounds: usize,
    /// The offered rate of the UDP section's paced run, datagrams per second (its first
    /// run sends as fast as it can). A tenth above the 500,000/s target, so a node that
    /// meets it shows it with room, and one that does not shows its loss.
    #[arg(long, default_value_t = 550_000)]
    pub udp_rate: u64,
    /// Skip the UDP section.
    #[arg(long)]
    pub no_udp: bool,
    /// Run only the UDP section (its report goes to `--out` alone).
    #[arg(long)]
    pub only_udp: bool,
    /// Drivers and rounds of the history section's ingest (each load; run twice: with no
    /// consumer, then with four).
    #[arg(long, default_value_t = 50_000)]
    pub history_drivers: usize,
    #[arg(long, default_value_t = 20)]
    pub history_rounds: usize,
    /// Drivers given a day of 1 Hz fixes (86,400 each) for the GetHistory figures.
    #[arg(long, default_value_t = 50)]
    pub history_day_drivers: usize,
    /// Whole-day GetHistory calls to time.
    #[arg(long, default_value_t = 50)]
    pub history_queries: usize,
    /// Skip the history section.
    #[arg(long)]
    pub no_history: bool,
    /// Run only the history section (its report goes to `--out` alone).
    #[arg(long)]
    pub only_history: bool,
    /// Ports used by the processes the benchmark starts.
    #[arg(long, default_value_t = 7600)]
    pub port_base: u16,
}

/// City of the benchmark: a 12 km radius around Berlin's centre.
const CITY: (f64, f64, f64) = (52.52, 13.405, 12_000.0);

fn city_point(rng: &mut SmallRng) -> (f64, f64) {
    let r = CITY.2 * rng.random_range(0.0f64..1.0).sqrt();
    let b = rng.random_range(0.0..std::f64::consts::TAU);
    let dlat = (r * b.cos() / EARTH_RADIUS_M).to_degrees();
    let dlon = (r * b.sin() / (EARTH_RADIUS_M * CITY.0.to_radians().cos())).to_degrees();
    (CITY.0 + dlat, CITY.1 + dlon)
}

/// A deterministic workload: `drivers` drivers, `rounds` fixes each, 1 s apart and a few
/// metres apart, timestamps in the recent past. Fixes of driver `i` go to stream
/// `i % streams`, so each driver's fixes stay in order.
pub struct Workload {
    pub drivers: usize,
    pub rounds: usize,
    pub start: Vec<(f64, f64)>,
    pub base_ms: i64,
    /// Driver `i` is `{prefix}-{i}`.
    pub prefix: &'static str,
}

impl Workload {
    pub fn new(drivers: usize, rounds: usize, seed: u64) -> Workload {
        let mut rng = SmallRng::seed_from_u64(seed);
        let start = (0..drivers).map(|_| city_point(&mut rng)).collect();
        Workload { drivers, rounds, start, base_ms: wall_ms() - (rounds as i64 + 10) * 1_000, prefix: "drv" }
    }

    /// The same workload for drivers named `{prefix}-{i}`.
    pub fn named(self, prefix: &'static str) -> Workload {
        Workload { prefix, ..self }
    }

    /// Fix `round` of driver `i`: 8 m further north-east each round.
    pub fn fix(&self, i: usize, round: usize) -> (f64, f64, i64) {
        let (lat, lon) = self.start[i];
        let step = round as f64 * 8.0 / EARTH_RADIUS_M;
        (
            lat + step.to_degrees(),
            lon + (step / CITY.0.to_radians().cos()).to_degrees(),
            self.base_ms + round as i64 * 1_000,
        )
    }

    /// Pre-built batches per stream, in send order, for every round.
    pub fn batches(&self, streams: usize, batch: usize) -> Vec<Vec<pb::LocationBatch>> {
        self.batches_for(streams, batch, 0..self.rounds)
    }

    /// Pre-built batches per stream, in send order, for some rounds.
    pub fn batches_for(
        &self,
        streams: usize,
        batch: usize,
        rounds: std::ops::Range<usize>,
    ) -> Vec<Vec<pb::LocationBatch>> {
        let mut out: Vec<Vec<pb::LocationBatch>> = (0..streams).map(|_| Vec::new()).collect();
        let mut cur: Vec<Vec<pb::LocationUpdate>> = (0..streams).map(|_| Vec::new()).collect();
        let mut id = 0u64;
        for round in rounds {
            for i in 0..self.drivers {
                let s = i % streams;
                let (lat, lon, ts) = self.fix(i, round);
                cur[s].push(pb::LocationUpdate {
                    driver_id: format!("{}-{i}", self.prefix),
                    lat,
                    lon,
                    heading_deg: 45.0,
                    speed_mps: 8.0,
                    accuracy_m: 4.0,
                    timestamp_ms: ts,
                    status: if i % 4 == 0 { DriverStatus::OnTrip } else { DriverStatus::Available } as i32,
                    vehicle_type: ["sedan", "suv", "moto"][i % 3].into(),
                    ..Default::default()
                });
                if cur[s].len() == batch {
                    id += 1;
                    out[s].push(pb::LocationBatch { updates: std::mem::take(&mut cur[s]), batch_id: id });
                }
            }
        }
        for (s, rest) in cur.into_iter().enumerate() {
            if !rest.is_empty() {
                id += 1;
                out[s].push(pb::LocationBatch { updates: rest, batch_id: id });
            }
        }
        out
    }
}

/// Result of streaming a workload into a node.
pub struct IngestResult {
    pub fixes: u64,
    pub accepted: u64,
    pub secs: f64,
}

impl IngestResult {
    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.secs
    }
}

/// Streams pre-built batches into a node and waits for every ack.
pub async fn ingest(target: &str, per_stream: Vec<Vec<pb::LocationBatch>>) -> anyhow::Result<IngestResult> {
    ingest_many(vec![(target.to_string(), per_stream)]).await
}

/// Streams pre-built batches into several nodes at once (per node: its streams, each a
/// list of batches in send order) and waits for every ack.
pub async fn ingest_many(targets: Vec<(String, Vec<Vec<pb::LocationBatch>>)>) -> anyhow::Result<IngestResult> {
    let mut clients = Vec::new();
    for (t, per_stream) in targets {
        clients.push((connect(&t).await?, per_stream));
    }
    let fixes: u64 = clients.iter().flat_map(|c| c.1.iter().flatten()).map(|b| b.updates.len() as u64).sum();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (client, per_stream) in clients {
        for batches in per_stream {
            let mut c = client.clone();
            tasks.push(tokio::spawn(async move {
                let (tx, rx) = mpsc::channel(8);
                let n = batches.len();
                let feeder = tokio::spawn(async move {
                    for b in batches {
                        if tx.send(b).await.is_err() {
                            break;
                        }
                    }
                });
                let mut acks = c.update_stream(ReceiverStream::new(rx)).await?.into_inner();
                let (mut accepted, mut seen) = (0u64, 0usize);
                let mut reasons = std::collections::BTreeMap::<String, u64>::new();
                while seen < n {
                    let Some(a) = acks.next().await else { break };
                    let a = a?;
                    accepted += a.accepted as u64;
                    for r in a.rejected {
                        *reasons.entry(r.reason_name).or_default() += 1;
                    }
                    seen += 1;
                }
                feeder.abort();
                if !reasons.is_empty() {
                    eprintln!("rejections: {reasons:?}");
                }
                anyhow::Ok(accepted)
            }));
        }
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await??;
    }
    Ok(IngestResult { fixes, accepted, secs: t0.elapsed().as_secs_f64() })
}

/// Latency percentiles of a run of queries, in microseconds.
pub struct Latency {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub qps: f64,
}

impl Latency {
    pub(crate) fn from(mut us: Vec<f64>, secs: f64) -> Latency {
        us.sort_by(f64::total_cmp);
        let p = |q: f64| us.get(((us.len() - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0);
        Latency { n: us.len(), p50: p(0.5), p99: p(0.99), p999: p(0.999), qps: us.len() as f64 / secs }
    }
}

/// Sequential Nearby k=10 queries at random points of the city, one client.
pub async fn nearby_latency(target: &str, queries: usize, seed: u64) -> anyhow::Result<(Latency, usize)> {
    let mut c = connect(target).await?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut us = Vec::with_capacity(queries);
    let mut results = 0;
    // Warm up connections and caches.
    for _ in 0..200 {
        let (lat, lon) = city_point(&mut rng);
        c.nearby(pb::NearbyRequest { lat, lon, limit: 10, ..Default::default() }).await?;
    }
    let t0 = Instant::now();
    for _ in 0..queries {
        let (lat, lon) = city_point(&mut rng);
        let q0 = Instant::now();
        let r = c.nearby(pb::NearbyRequest { lat, lon, limit: 10, ..Default::default() }).await?;
        us.push(q0.elapsed().as_secs_f64() * 1e6);
        results += r.into_inner().drivers.len();
    }
    Ok((Latency::from(us, t0.elapsed().as_secs_f64()), results))
}

/// Runs a latency client on its own current-thread runtime, so the client's own thread
/// hops do not add to what is measured (the same for Locus and Redis).
async fn on_one_thread<F, Fut, T>(make: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(make())
    })
    .await?
}

/// Resident set size of a process, bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    let kb: u64 = line.split_whitespace().nth(1).context("VmRSS value")?.parse()?;
    Ok(kb * 1024)
}

/// CPU time a process has used so far (user and system, all its threads), seconds.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) start at state (3rd);
    // utime and stime are the 14th and 15th.
    let rest = &s[s.rfind(')').context("no command name")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks / hz)
}

/// Waits until the node's driver log is quiet: no compaction sweep running and no
/// bytes written for a second.
async fn wait_idle(http_port: u16) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..600 {
        let (_, m) = crate::sim::http_get(&format!("127.0.0.1:{http_port}"), "/metrics").await?;
        let running = metric(&m, "locus_compaction_running").unwrap_or(0.0);
        let written = metric(&m, "locus_persist_bytes_total");
        if running == 0.0 && written == last {
            return Ok(());
        }
        last = written;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bail!("the node's driver log did not go quiet")
}

/// A metric's value in a Prometheus text page, summed over its label sets; `None` if
/// the page has no sample of it.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = page
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ') || r.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Writes the report to `--out` and shows it; removes the scratch directory.
fn finish(cfg: &BenchConfig, report: &str, tmp: &std::path::Path) -> anyhow::Result<()> {
    std::fs::write(&cfg.out, report).with_context(|| format!("writing {}", cfg.out.display()))?;
    println!("{report}");
    let _ = std::fs::remove_dir_all(tmp);
    Ok(())
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on port {port}")
}

/// `locus node` as the benchmark starts one: named `name`, gRPC on 127.0.0.1:`grpc`,
/// HTTP on the next port, gossip on `gossip` (the default when `None`), its data in
/// `data`, then `extra` and the bench's `--node-args` (last, so they win); warn logs,
/// stdout dropped (a caller may change both before it spawns).
fn node_command<S: AsRef<std::ffi::OsStr>>(
    cfg: &BenchConfig,
    name: &str,
    grpc: u16,
    gossip: Option<u16>,
    data: &std::path::Path,
    extra: impl IntoIterator<Item = S>,
) -> anyhow::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["node", "--node-name", name, "--log-format", "text"])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--http-addr", &format!("127.0.0.1:{}", grpc + 1)])
        .args(["--data-dir", &data.display().to_string()]);
    if let Some(g) = gossip {
        cmd.args(["--gossip-addr", &format!("127.0.0.1:{g}")]);
    }
    cmd.args(extra).args(&cfg.node_args).env("RUST_LOG", "warn").stdout(Stdio::null());
    Ok(cmd)
}

fn start_node(cfg: &BenchConfig, dir: &std::path::Path, trail: usize) -> anyhow::Result<(Proc, String)> {
    let grpc = cfg.port_base;
    let child = node_command(cfg, "bench", grpc, None, dir, ["--trail-len", &trail.to_string()])?
        .spawn()
        .context("starting locus node")?;
    Ok((Proc(child), format!("http://127.0.0.1:{grpc}")))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0)))
        .unwrap_or(0);
    format!("{cores} cores ({cpu}), {:.0} GiB RAM", mem as f64 / 1024.0 / 1024.0)
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Runs every benchmark and writes the report.
pub async fn run(cfg: BenchConfig) -> anyhow::Result<()> {
    let tmp = tempdir()?;
    let mut report = String::new();
    if cfg.only_history {
        let f = history::run(&cfg, &tmp.join("history")).await?;
        history::report(&f, &mut report)?;
        return finish(&cfg, &report, &tmp);
    }
    if cfg.only_udp {
        let f = udp::run(&cfg, &tmp.join("udp")).await?;
        udp::report(&f, &mut report)?;
        return finish(&cfg, &report, &tmp);
    }
    if cfg.only_moves {
        let f = moves::run(&cfg, &tmp.join("moves")).await?;
        moves::report(&f, &mut report)?;
        return finish(&cfg, &report, &tmp);
    }
    let redis = if cfg.no_redis { None } else { redis::Server::start(cfg.port_base + 10).await? };
    if redis.is_none() {
        eprintln!("redis-server not found (or --no-redis): the Redis columns stay empty");
    }

    // 1. Ingest.
    eprintln!("[bench] ingest: {} drivers x {} fixes", cfg.ingest_drivers, cfg.ingest_rounds);
    let w = Workload::new(cfg.ingest_drivers, cfg.ingest_rounds, 7);
    let (node, target) = start_node(&cfg, &tmp.join("ingest"), 32)?;
    wait_port(cfg.port_base).await?;
    let locus_ingest = ingest(&target, w.batches(cfg.streams, cfg.batch)).await?;
    drop(node);
    eprintln!("[bench] locus ingest: {:.0} fixes/s", locus_ingest.rate());
    let redis_ingest = match &redis {
        Some(r) => {
            r.flush().await?;
            let rate = r.geoadd_pipelined(&w, cfg.streams, cfg.batch).await?;
            eprintln!("[bench] redis ingest: {rate:.0} fixes/s");
            Some(rate)
        }
        None => None,
    };
    drop(w);

    // 2 + 3. One million drivers with full trails: memory, then Nearby latency.
    eprintln!("[bench] loading {} drivers x {} fixes", cfg.query_drivers, cfg.trail_fixes);
    let (node, target) = start_node(&cfg, &tmp.join("query"), cfg.trail_fixes)?;
    wait_port(cfg.port_base).await?;
    let pid = node.0.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = rss_bytes(pid)?;
    let w = Workload::new(cfg.query_drivers, cfg.trail_fixes, 11);
    let mut load_rate = 0.0;
    // Build and send a few rounds at a time to bound the generator's own memory.
    let chunk = 4usize;
    let mut loaded = 0u64;
    let mut secs = 0.0;
    for r0 in (0..w.rounds).step_by(chunk) {
        let batches = w.batches_for(cfg.streams, cfg.batch, r0..(r0 + chunk).min(w.rounds));
        let res = ingest(&target, batches).await?;
        loaded += res.accepted;
        secs += res.secs;
        load_rate = loaded as f64 / secs;
    }
    // Let the last group commits and any compaction sweep finish, then measure.
    wait_idle(cfg.port_base + 1).await?;
    let rss1 = rss_bytes(pid)?;
    let per_driver = (rss1.saturating_sub(rss0)) as f64 / cfg.query_drivers as f64;
    eprintln!(
        "[bench] loaded {loaded} fixes at {load_rate:.0}/s; RSS {} MiB -> {} MiB: {per_driver:.0} B/driver",
        rss0 >> 20,
        rss1 >> 20
    );
    let (t, q) = (target.clone(), cfg.queries);
    let (locus_q, results) = on_one_thread(move || async move { nearby_latency(&t, q, 3).await }).await?;
    eprintln!("[bench] locus nearby p50={:.0}us p99={:.0}us ({} results)", locus_q.p50, locus_q.p99, results);
    drop(node);
    let (redis_q, redis_mem) = match &redis {
        Some(r) => {
            r.flush().await?;
            let used0 = r.used_memory().await?;
            r.geoadd_pipelined(&Workload { rounds: 1, ..w }, cfg.streams, cfg.batch).await?;
            let used1 = r.used_memory().await?;
            let mut lats = Vec::new();
            for &radius in &cfg.redis_radius_m {
                let (port, q) = (r.port(), cfg.redis_queries);
                let lat = on_one_thread(move || redis::geosearch_latency(port, q, radius, 3)).await?;
                eprintln!("[bench] redis geosearch {radius} m p50={:.0}us p99={:.0}us", lat.p50, lat.p99);
                lats.push((radius, lat));
            }
            (Some(lats), Some((used1.saturating_sub(used0)) as f64 / cfg.query_drivers as f64))
        }
        None => (None, None),
    };

    let redis_all = redis_q.unwrap_or_default();
    let redis_q = redis_all.first().map(|(_, l)| l);
    let radius = cfg.redis_radius_m.first().copied().unwrap_or(0.0);
    let ratio = |a: f64, b: Option<f64>| b.map_or("–".to_string(), |b| format!("{:.2}×", a / b));
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("–".to_string(), f);
    writeln!(report, "# Benchmarks\n")?;
    writeln!(report, "Produced by `make bench` (`locus bench`), {}.", date())?;
    writeln!(
        report,
        "Machine: {}. Load generator, server and Redis share the machine; figures move between runs on a shared VM, so compare Locus and Redis within one run.\n",
        machine()
    )?;
    writeln!(report, "| benchmark | Locus | Redis GEO | Locus vs Redis | target |")?;
    writeln!(report, "|---|---|---|---|---|")?;
    writeln!(
        report,
        "| ingest, {} distinct drivers × {} fixes, batches of {} over {} streams (Redis: pipelined GEOADD, {} connections) | **{:.0} fixes/s** | {} | {} faster | ≥ 250,000 fixes/s |",
        cfg.ingest_drivers,
        cfg.ingest_rounds,
        cfg.batch,
        cfg.streams,
        cfg.streams,
        locus_ingest.rate(),
        opt(redis_ingest, &|v| format!("{v:.0} fixes/s")),
        ratio(locus_ingest.rate(), redis_ingest),
    )?;
    writeln!(
        report,
        "| Nearby k=10 over {} drivers, p50 / p99 / p99.9 (Redis: GEOSEARCH BYRADIUS {} m ASC COUNT 10) | **{:.0} / {:.0} / {:.0} µs** | {} | p99 {} lower | p99 ≤ 2 ms |",
        cfg.query_drivers,
        radius,
        locus_q.p50,
        locus_q.p99,
        locus_q.p999,
        opt(redis_q.map(|l| l.p50), &|_| {
            let l = redis_q.expect("some");
            format!("{:.0} / {:.0} / {:.0} µs", l.p50, l.p99, l.p999)
        }),
        redis_q.map_or("–".to_string(), |l| format!("{:.2}×", l.p99 / locus_q.p99)),
    )?;
    writeln!(
        report,
        "| resident memory per driver, {} drivers with {}-fix trails (Redis: used_memory per GEO member, position only) | **{:.0} B** | {} | – | ≤ 1024 B |",
        cfg.query_drivers,
        cfg.trail_fixes,
        per_driver,
        opt(redis_mem, &|v| format!("{v:.0} B")),
    )?;
    writeln!(report, "\nDetails:\n")?;
    writeln!(
        report,
        "- Ingest: {} fixes sent, {} accepted in {:.2} s. Every fix passes validation, the stale/jump checks, the R-tree update rule and the group-committed driver log (fdatasync every 250 ms).",
        locus_ingest.fixes, locus_ingest.accepted, locus_ingest.secs
    )?;
    writeln!(
        report,
        "- Memory load: {} fixes at {:.0} fixes/s; node RSS {} MiB before, {} MiB after (everything the process holds).",
        loaded,
        load_rate,
        rss0 >> 20,
        rss1 >> 20
    )?;
    writeln!(
        report,
        "- Nearby: {} sequential queries from one client over gRPC, {:.0} queries/s, no radius, no filter, {} results in all.",
        locus_q.n, locus_q.qps, results
    )?;
    for (radius, l) in &redis_all {
        writeln!(
            report,
            "- Redis GEOSEARCH BYRADIUS {radius} m ASC COUNT 10: p50 / p99 / p99.9 {:.0} / {:.0} / {:.0} µs over {} sequential queries ({:.0} queries/s); Locus p99 is {:.2}× lower. (Redis needs a radius and its cost grows with the members inside it; a small radius can return fewer than 10.)",
            l.p50,
            l.p99,
            l.p999,
            l.n,
            l.qps,
            l.p99 / locus_q.p99
        )?;
    }
    writeln!(
        report,
        "\nCommand: `make bench` (runs `locus bench --out BENCHMARKS.md` with the defaults shown in `locus bench --help`)."
    )?;
    if !cfg.no_cluster {
        eprintln!("[bench] cluster: three nodes");
        let f = cluster::run(&cfg, &tmp.join("cluster")).await?;
        cluster::report(&cfg, &f, &mut report)?;
    }
    if !cfg.no_moves {
        eprintln!("[bench] moves: join, drain and failover under load");
        let f = moves::run(&cfg, &tmp.join("moves")).await?;
        moves::report(&f, &mut report)?;
    }
    if !cfg.no_udp {
        eprintln!("[bench] udp: compact fixes on one node");
        let f = udp::run(&cfg, &tmp.join("udp")).await?;
        udp::report(&f, &mut report)?;
    }
    if !cfg.no_history {
        eprintln!("[bench] history: the fix stream, the exporter, GetHistory");
        let f = history::run(&cfg, &tmp.join("history")).await?;
        history::report(&f, &mut report)?;
    }
    finish(&cfg, &report, &tmp)
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("locus-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
