//! Scale-out, drain and failover of a loaded cluster (`locus bench`, section "moves").
//!
//! `move_drivers` drivers (1M by default) are loaded on three nodes. Throughout, a
//! gateway streams fixes of 20,000 of them through n0 (two streams, one round of fixes
//! per second) and a client asks n0 for Nearby k=10 every few milliseconds. Then:
//!
//! 1. **Join.** A fourth node starts; timed until every partition is served by its
//!    ring owner again, nothing incoming or outgoing.
//! 2. **Drain.** `Cluster.Drain` of n1, timed until it answers that n1 is safe to
//!    stop (then it is stopped).
//! 3. **Failover.** `kill -9` of n2; timed until a sample of its drivers all answer
//!    through n0 again (promoted replicas); then how many of a larger sample are missing.
//!
//! Each phase reports the client errors seen during it (failed Nearby calls, gateway
//! stream failures, fixes refused as `unavailable`) and Nearby p50 / p99 during it.

use std::fmt::Write as _;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::cluster::answering;
use super::{BenchConfig, Latency, Proc, Workload, ingest_many, wait_port};
use crate::clock::wall_ms;
use crate::pb;
use crate::pb::cluster_client::ClusterClient;
use crate::sim::{connect, fetch_ring};

/// Drivers whose fixes the background gateway streams, and its streams.
const MOVING: usize = 20_000;
const GATEWAY_STREAMS: usize = 2;

fn ports(cfg: &BenchConfig, i: usize) -> (u16, u16, u16) {
    let b = cfg.port_base + 200 + 10 * i as u16;
    (b, b + 1, b + 2)
}

fn url(cfg: &BenchConfig, i: usize) -> String {
    format!("http://127.0.0.1:{}", ports(cfg, i).0)
}

/// Starts node `i` (named `n{i}`), its log (info) in `dir/n{i}.log`.
fn start(cfg: &BenchConfig, dir: &std::path::Path, i: usize) -> anyhow::Result<Proc> {
    let (grpc, _, gossip) = ports(cfg, i);
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join(format!("n{i}.log")))?;
    let join = format!("127.0.0.1:{}", ports(cfg, 0).2);
    let mut flags = vec!["--trail-len", "4"];
    if i > 0 {
        flags.extend(["--join", &join]);
    }
    let child = super::node_command(cfg, &format!("n{i}"), grpc, Some(gossip), &dir.join(format!("n{i}")), flags)?
        // `LOCUS_BENCH_NODE_LOG` overrides the nodes' filter (their logs are kept in
        // locus-bench-moves-logs under the temp dir).
        .env("RUST_LOG", std::env::var("LOCUS_BENCH_NODE_LOG").unwrap_or_else(|_| "warn,locus::handoff=debug".into()))
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .context("starting a node")?;
    Ok(Proc(child))
}

/// Whether every partition is served by its ring owner among `nodes`, with nothing
/// incoming or outgoing, and the nodes agree on a ring of `nodes.len()` members.
async fn settled(cfg: &BenchConfig, nodes: &[usize]) -> bool {
    let mut owned = 0usize;
    let mut sums = Vec::new();
    for &i in nodes {
        let Ok(mut c) = ClusterClient::connect(url(cfg, i)).await else { return false };
        let Ok(ring) = c.ring_info(pb::RingInfoRequest {}).await else { return false };
        let ring = ring.into_inner();
        if ring.members.len() != nodes.len() {
            return false;
        }
        sums.push(ring.checksum);
        let Ok(r) = c.partitions(pb::PartitionsRequest {}).await else { return false };
        let r = r.into_inner();
        for row in &r.rows {
            match row.state.as_str() {
                "owned" if row.ring_owner == r.node => owned += 1,
                "owned" | "incoming" | "outgoing" | "parked" => return false,
                _ => {}
            }
        }
    }
    sums.windows(2).all(|w| w[0] == w[1]) && owned == crate::keys::PARTITIONS as usize
}

/// Whether every partition owned among `nodes` has an in-sync replica at its epoch on
/// another of them: a crash now loses nothing beyond the documented lag.
async fn replicated(cfg: &BenchConfig, nodes: &[usize]) -> bool {
    let mut owned = std::collections::HashMap::new();
    let mut copies = std::collections::HashSet::new();
    for &i in nodes {
        let Ok(mut c) = ClusterClient::connect(url(cfg, i)).await else { return false };
        let Ok(r) = c.partitions(pb::PartitionsRequest {}).await else { return false };
        for row in r.into_inner().rows {
            match row.state.as_str() {
                "owned" => {
                    owned.insert(row.partition, row.epoch);
                }
                "replica" if row.in_sync => {
                    copies.insert((row.partition, row.epoch));
                }
                _ => {}
            }
        }
    }
    owned.len() == crate::keys::PARTITIONS as usize && owned.iter().all(|(p, e)| copies.contains(&(*p, *e)))
}

/// Drivers held (owned partitions) over `nodes`: every loaded driver must still be there.
async fn held_drivers(cfg: &BenchConfig, nodes: &[usize]) -> anyhow::Result<u64> {
    let mut n = 0;
    for &i in nodes {
        let r = ClusterClient::connect(url(cfg, i)).await?.partitions(pb::PartitionsRequest {}).await?.into_inner();
        n += r.rows.iter().filter(|r| r.state == "owned").map(|r| r.drivers as u64).sum::<u64>();
    }
    Ok(n)
}

/// Waits until [`replicated`]; returns how long that took.
async fn wait_replicated(cfg: &BenchConfig, nodes: &[usize], within: Duration) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    while !replicated(cfg, nodes).await {
        if t0.elapsed() > within {
            bail!("nodes {nodes:?} did not restore their replicas within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(t0.elapsed())
}

async fn wait_settled(cfg: &BenchConfig, nodes: &[usize], within: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while !settled(cfg, nodes).await {
        if t0.elapsed() > within {
            bail!("nodes {nodes:?} did not settle within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Per node, Nearby scatter parts as n0 saw them: (at most 10 ms, all), from n0's
/// `locus_scatter_part_seconds{peer}` histogram (cumulative; phases take differences).
type Parts = std::collections::BTreeMap<String, (u64, u64)>;

async fn scatter_parts(cfg: &BenchConfig) -> Parts {
    let mut out = Parts::new();
    let Ok(text) = http_get(ports(cfg, 0).1, "/metrics").await else { return out };
    let peer = |l: &str| l.split("peer=\"").nth(1).and_then(|r| r.split('"').next()).map(str::to_string);
    let value = |l: &str| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
    for l in text.lines() {
        if l.starts_with("locus_scatter_part_seconds_bucket{") && l.contains("le=\"0.01\"") {
            if let Some(p) = peer(l) {
                out.entry(p).or_default().0 = value(l);
            }
        } else if l.starts_with("locus_scatter_part_seconds_count{")
            && let Some(p) = peer(l)
        {
            out.entry(p).or_default().1 = value(l);
        }
    }
    out
}

/// A plain HTTP/1.1 GET on 127.0.0.1 (the nodes' metrics); the body.
async fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// Parts slower than 10 ms between two scrapes, per node: "n3 12 of 767".
fn slow_parts(before: &Parts, after: &Parts) -> Vec<(String, u64, u64)> {
    after
        .iter()
        .map(|(p, (fast, all))| {
            let (f0, a0) = before.get(p).copied().unwrap_or_default();
            let all = all.saturating_sub(a0);
            (p.clone(), all.saturating_sub(fast.saturating_sub(f0)), all)
        })
        .filter(|(_, _, all)| *all > 0)
        .collect()
}

/// What the background clients saw since the last [`Load::take`].
#[derive(Default)]
struct Seen {
    nearby_us: Vec<f64>,
    nearby_errors: u64,
    nearby_partial: u64,
    fixes: u64,
    fixes_unavailable: u64,
    fixes_other_rejects: u64,
    gateway_errors: u64,
}

/// The background gateway and Nearby client.
struct Load {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(target: String, w: Arc<Workload>) -> Load {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for s in 0..GATEWAY_STREAMS {
            tasks.push(tokio::spawn(gateway(target.clone(), w.clone(), s, seen.clone(), stop.clone())));
        }
        tasks.push(tokio::spawn(nearby(target, seen.clone(), stop.clone())));
        Load { seen, stop, tasks }
    }

    fn take(&self) -> Seen {
        std::mem::take(&mut *self.seen.lock().expect("seen lock"))
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Release);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// One gateway stream: a round of fixes of its drivers every second, acks counted; a
/// broken stream counts an error and is reopened.
async fn gateway(target: String, w: Arc<Workload>, s: usize, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>) {
    let mut round = 1;
    while !stop.load(Ordering::Acquire) {
        let Ok(mut c) = connect(&target).await else {
            seen.lock().expect("seen lock").gateway_errors += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let (tx, rx) = mpsc::channel::<pb::LocationBatch>(4);
        let Ok(acks) = c.update_stream(ReceiverStream::new(rx)).await else {
            seen.lock().expect("seen lock").gateway_errors += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut acks = acks.into_inner();
        let seen2 = seen.clone();
        let reader = tokio::spawn(async move {
            while let Some(a) = acks.next().await {
                let Ok(a) = a else {
                    seen2.lock().expect("seen lock").gateway_errors += 1;
                    return;
                };
                let mut g = seen2.lock().expect("seen lock");
                for r in &a.rejected {
                    if r.reason_name == "unavailable" {
                        g.fixes_unavailable += 1;
                    } else {
                        g.fixes_other_rejects += 1;
                    }
                }
            }
        });
        // One round a second, its batches spread over the second as drivers' phones send
        // them (not one burst a second), and a driver's fixes never less than a second
        // apart: after a batch that went out late (a stalled stream), the next waits a
        // full tick (`Skip` would send it at once, and a driver's two fixes 8 m and a few
        // ms apart are rightly refused as implausible).
        let ids: Vec<usize> = (s..MOVING).step_by(GATEWAY_STREAMS).collect();
        let per_round = ids.len().div_ceil(1_000);
        let mut tick = tokio::time::interval(Duration::from_secs(1) / per_round as u32);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'rounds: while !stop.load(Ordering::Acquire) && !reader.is_finished() {
            for chunk in ids.chunks(1_000) {
                tick.tick().await;
                let ts = wall_ms();
                let updates = chunk
                    .iter()
                    .map(|&i| {
                        let (lat, lon, _) = w.fix(i, round);
                        pb::LocationUpdate {
                            driver_id: format!("drv-{i}"),
                            lat,
                            lon,
                            timestamp_ms: ts,
                            status: pb::DriverStatus::Available as i32,
                            ..Default::default()
                        }
                    })
                    .collect::<Vec<_>>();
                let n = updates.len() as u64;
                if tx.send(pb::LocationBatch { updates, batch_id: round as u64 }).await.is_err() {
                    break 'rounds;
                }
                seen.lock().expect("seen lock").fixes += n;
            }
            round += 1;
        }
        drop(tx);
        let _ = reader.await;
    }
}

/// Nearby k=10 at random city points, one after another with a short pause.
async fn nearby(target: String, seen: Arc<Mutex<Seen>>, stop: Arc<AtomicBool>) {
    let mut rng = SmallRng::seed_from_u64(77);
    let mut c = loop {
        match connect(&target).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    while !stop.load(Ordering::Acquire) {
        let (lat, lon) = super::city_point(&mut rng);
        let t = Instant::now();
        let r = c.nearby(pb::NearbyRequest { lat, lon, limit: 10, ..Default::default() }).await;
        let us = t.elapsed().as_secs_f64() * 1e6;
        {
            let mut g = seen.lock().expect("seen lock");
            match r {
                Ok(r) => {
                    g.nearby_us.push(us);
                    g.nearby_partial += r.into_inner().partial as u64;
                }
                Err(_) => g.nearby_errors += 1,
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One phase's figures.
pub struct Phase {
    pub name: &'static str,
    pub secs: f64,
    pub nearby: Latency,
    pub nearby_errors: u64,
    pub nearby_partial: u64,
    pub fixes: u64,
    pub fixes_unavailable: u64,
    pub fixes_other_rejects: u64,
    pub gateway_errors: u64,
    /// Per node: Nearby parts over 10 ms, of all (as n0 saw them).
    pub slow_parts: Vec<(String, u64, u64)>,
}

impl Phase {
    fn new(name: &'static str, took: Duration, s: Seen, wall: Duration) -> Phase {
        Phase {
            slow_parts: Vec::new(),
            name,
            secs: took.as_secs_f64(),
            nearby: Latency::from(s.nearby_us, wall.as_secs_f64()),
            nearby_errors: s.nearby_errors,
            nearby_partial: s.nearby_partial,
            fixes: s.fixes,
            fixes_unavailable: s.fixes_unavailable,
            fixes_other_rejects: s.fixes_other_rejects,
            gateway_errors: s.gateway_errors,
        }
    }
}

pub struct MovesFigures {
    pub drivers: usize,
    pub phases: Vec<Phase>,
    pub failover_sampled: usize,
    pub failover_missing: usize,
    /// The survivors' own promotion times (ms, from their logs).
    pub promote_ms: Vec<u64>,
    /// After the join and after the drain: until every partition had an in-sync
    /// replica again.
    pub restored: [Duration; 2],
    /// Drivers held by the owners after the join, the drain and the crash.
    pub held: [u64; 3],
}

/// Runs the section in `dir`.
pub async fn run(cfg: &BenchConfig, dir: &std::path::Path) -> anyhow::Result<MovesFigures> {
    let mut procs: Vec<Option<Proc>> = Vec::new();
    for i in 0..3 {
        procs.push(Some(start(cfg, dir, i)?));
        wait_port(ports(cfg, i).0).await?;
    }
    wait_settled(cfg, &[0, 1, 2], Duration::from_secs(60)).await?;
    wait_replicated(cfg, &[0, 1, 2], Duration::from_secs(60)).await?;

    // Load the drivers, owner-aware, in chunks (bounded generator memory).
    let n = cfg.move_drivers;
    eprintln!("[bench] moves: loading {n} drivers on 3 nodes");
    let w = Arc::new(Workload::new(n, 1, 41));
    let chunk = 200_000;
    for first in (0..n).step_by(chunk) {
        let part = Workload {
            drivers: (n - first).min(chunk),
            rounds: 1,
            start: w.start[first..(first + chunk).min(n)].to_vec(),
            base_ms: w.base_ms,
            prefix: w.prefix,
        };
        let mut batches = part.batches_for(4, cfg.batch, 0..1);
        for b in batches.iter_mut().flatten() {
            for u in &mut b.updates {
                let i: usize = u.driver_id[4..].parse().unwrap_or(0);
                u.driver_id = format!("drv-{}", first + i);
            }
        }
        ingest_many(super::cluster::by_owner(&url(cfg, 0), batches).await?).await?;
    }
    // Past the replication lag, then the background clients.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let load = Load::start(url(cfg, 0), w.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _warmup = load.take();
    let mut parts = scatter_parts(cfg).await;
    let mut phases: Vec<Phase> = Vec::new();
    // Each phase's slow scatter parts, by node, since the previous scrape.
    async fn close(cfg: &BenchConfig, phases: &mut [Phase], parts: &mut Parts) {
        let now = scatter_parts(cfg).await;
        if let Some(p) = phases.last_mut() {
            p.slow_parts = slow_parts(parts, &now);
        }
        *parts = now;
    }
    // The same load with nothing moving, for comparison.
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    phases.push(Phase::new("steady, nothing moving (baseline)", t0.elapsed(), load.take(), t0.elapsed()));
    close(cfg, &mut phases, &mut parts).await;

    // 1. A fourth node joins.
    let t0 = Instant::now();
    procs.push(Some(start(cfg, dir, 3)?));
    wait_settled(cfg, &[0, 1, 2, 3], Duration::from_secs(120)).await?;
    let took = t0.elapsed();
    eprintln!("[bench] moves: a fourth node took its share in {took:?}");
    phases.push(Phase::new("a 4th node joins and takes its share", took, load.take(), t0.elapsed()));
    close(cfg, &mut phases, &mut parts).await;
    let restored_join = wait_replicated(cfg, &[0, 1, 2, 3], Duration::from_secs(120)).await?;
    let held_join = held_drivers(cfg, &[0, 1, 2, 3]).await?;
    eprintln!("[bench] moves: replicas restored {restored_join:?} later");

    // 2. n1 is drained, then stopped.
    let t0 = Instant::now();
    let r = ClusterClient::connect(url(cfg, 1))
        .await?
        .drain(pb::DrainRequest { timeout_ms: 120_000 })
        .await
        .context("draining n1")?
        .into_inner();
    if !r.drained {
        bail!("n1 was not drained: {r:?}");
    }
    let took = t0.elapsed();
    eprintln!("[bench] moves: n1 drained in {took:?}");
    procs[1] = None;
    wait_settled(cfg, &[0, 2, 3], Duration::from_secs(60)).await?;
    phases.push(Phase::new("drain one of the 4 (then stop it)", took, load.take(), t0.elapsed()));
    close(cfg, &mut phases, &mut parts).await;
    // One failure at a time: the crash below comes once the replicas are back.
    let restored_drain = wait_replicated(cfg, &[0, 2, 3], Duration::from_secs(120)).await?;
    let held_drain = held_drivers(cfg, &[0, 2, 3]).await?;
    eprintln!("[bench] moves: replicas restored {restored_drain:?} later");

    // 3. kill -9 of n2.
    let ring = fetch_ring(&url(cfg, 0)).await?;
    let victim = url(cfg, 2);
    let sample: Vec<String> = (MOVING..n)
        .map(|i| format!("drv-{i}"))
        .filter(|id| ring.owner_url(id) == Some(victim.as_str()))
        .take(2_000)
        .collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let _ = load.take();
    parts = scatter_parts(cfg).await;
    let t0 = Instant::now();
    if let Some(mut p) = procs[2].take() {
        p.0.kill().context("kill -9")?;
        let _ = p.0.wait();
    }
    let never = answering(&url(cfg, 0), &sample[..sample.len().min(50)], Duration::from_secs(60)).await?;
    let took = t0.elapsed();
    if never > 0 {
        bail!("{never} of n2's drivers never answered after its kill -9");
    }
    eprintln!("[bench] moves: n2's drivers answered again {took:?} after its kill -9");
    let missing = answering(&url(cfg, 0), &sample, Duration::from_secs(2)).await?;
    wait_settled(cfg, &[0, 3], Duration::from_secs(60)).await.ok();
    let held_crash = held_drivers(cfg, &[0, 3]).await?;
    phases.push(Phase::new("kill -9 of one of the 3 left", took, load.take(), t0.elapsed()));
    close(cfg, &mut phases, &mut parts).await;
    load.stop().await;

    let mut promote_ms = Vec::new();
    // The nodes' logs outlive the run's data, for a look at what moved when.
    let logs = std::env::temp_dir().join("locus-bench-moves-logs");
    let _ = std::fs::create_dir_all(&logs);
    for i in 0..4 {
        let _ = std::fs::copy(dir.join(format!("n{i}.log")), logs.join(format!("n{i}.log")));
    }
    for i in [0, 3] {
        let log = std::fs::read_to_string(dir.join(format!("n{i}.log"))).unwrap_or_default();
        for line in log.lines().filter(|l| l.contains("promoted replicas of a lost owner")) {
            if let Some(ms) = line.split_whitespace().find_map(|f| f.strip_prefix("ms=")) {
                promote_ms.extend(ms.parse::<u64>().ok());
            }
        }
    }
    drop(procs);
    Ok(MovesFigures {
        drivers: n,
        phases,
        failover_sampled: sample.len(),
        failover_missing: missing,
        promote_ms,
        restored: [restored_join, restored_drain],
        held: [held_join, held_drain, held_crash],
    })
}

/// The report section.
pub fn report(f: &MovesFigures, out: &mut String) -> std::fmt::Result {
    writeln!(out, "\n## Moves under load: {} drivers on 3 nodes, then 4, then 3, then a crash\n", f.drivers)?;
    writeln!(
        out,
        "| phase | time | client errors (Nearby failed / gateway streams broken / fixes refused `unavailable` of sent) | Nearby p50 / p99 during it | target |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    for p in &f.phases {
        let target = match p.name {
            n if n.starts_with("kill") => "≤ 5 s",
            n if n.starts_with("steady") => "–",
            _ => "0 errors; p99 ≤ 10 ms",
        };
        writeln!(
            out,
            "| {} | **{:.2} s** | **{} / {} / {}** of {} | {:.0} / {:.0} µs ({} queries, {} partial) | {} |",
            p.name,
            p.secs,
            p.nearby_errors,
            p.gateway_errors,
            p.fixes_unavailable,
            p.fixes,
            p.nearby.p50,
            p.nearby.p99,
            p.nearby.n,
            p.nearby_partial,
            target
        )?;
    }
    writeln!(
        out,
        "\nWhich node a slow Nearby waited for: each node's part as n0 saw it, parts over 10 ms of all (`locus_scatter_part_seconds{{peer}}` on n0; `local`: n0's own shards).\n"
    )?;
    writeln!(out, "| phase | slow parts by node |")?;
    writeln!(out, "|---|---|")?;
    for p in &f.phases {
        let parts: Vec<String> =
            p.slow_parts.iter().map(|(node, slow, all)| format!("{node} {slow} of {all}")).collect();
        writeln!(out, "| {} | {} |", p.name, if parts.is_empty() { "–".to_string() } else { parts.join(", ") })?;
    }
    writeln!(
        out,
        "\n- After the `kill -9`: **{} of {}** sampled drivers of the victim missing (target 0). The survivors' promotions took {:?} ms (their logs).",
        f.failover_missing, f.failover_sampled, f.promote_ms
    )?;
    writeln!(
        out,
        "- Throughout, a gateway streams a round of fixes of {MOVING} drivers per second through n0 ({GATEWAY_STREAMS} streams, batches of 1000 spread evenly over the second) and a client asks n0 for Nearby k=10 every ~5 ms. \"Took its share\": every partition served by its ring owner, nothing incoming or outgoing, one ring. Drain: until `Cluster.Drain` answers that the node is safe to stop. Failover: until 50 sampled drivers of the victim all answer through n0 (failure detection included: a probe every 500 ms, a 2 s suspicion, then the ring debounce)."
    )?;
    writeln!(
        out,
        "- Replicas restored (every partition with an in-sync copy at its owner's epoch) {:.2} s after the join settled and {:.2} s after the drain; the crash comes after that (one failure at a time).",
        f.restored[0].as_secs_f64(),
        f.restored[1].as_secs_f64()
    )?;
    writeln!(
        out,
        "- Drivers held by their owners after the join / the drain / the crash: **{} / {} / {}** of {} loaded (the gateway's drivers are among them; nobody is removed).",
        f.held[0], f.held[1], f.held[2], f.drivers
    )?;
    let other: u64 = f.phases.iter().map(|p| p.fixes_other_rejects).sum();
    writeln!(out, "- Fixes refused for other reasons (stale, implausible) over all phases: {other}.")
}
