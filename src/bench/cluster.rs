//! The cluster benchmarks of `locus bench`: three real node processes on this machine.
//!
//! 1. Convergence: time from a third node's start until every node routes by the same
//!    three-member ring.
//! 2. Ingest with the gateway sending each stream to any node (nodes forward to owners),
//!    then the same volume with an owner-aware gateway (fixes split by the ring).
//! 3. Nearby k=10 over `query_drivers` drivers spread over the three nodes, from one
//!    client to one node (every query is a scatter-gather over all three).
//! 4. Dispatch and Share My Trip over the ingest phase's drivers (see `bench::trips`).
//! 5. Failure: time from `kill -9` of one node until both survivors agree on the
//!    two-member ring, and until the victim's drivers are served again from their
//!    replicas (with a count of sampled drivers missing afterwards).
//!
//! Nodes run with `--replicas 1` (the default). The two ingest figures are measured
//! first on a separate cluster with `--replicas 0`, in the same run, for comparison.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tonic::transport::Endpoint;

use super::{
    BenchConfig, IngestResult, Latency, Proc, Workload, ingest_many, nearby_latency, on_one_thread, wait_port,
};
use crate::pb;
use crate::pb::cluster_client::ClusterClient;
use crate::sim::fetch_ring;

struct Ports {
    grpc: u16,
    http: u16,
    gossip: u16,
}

fn ports(cfg: &BenchConfig, i: usize) -> Ports {
    let b = cfg.port_base + 100 + 10 * i as u16;
    Ports { grpc: b, http: b + 1, gossip: b + 2 }
}

fn url(cfg: &BenchConfig, i: usize) -> String {
    format!("http://127.0.0.1:{}", ports(cfg, i).grpc)
}

fn start(cfg: &BenchConfig, dir: &std::path::Path, i: usize, extra: &[&str]) -> anyhow::Result<Proc> {
    let p = ports(cfg, i);
    // The limiter still runs on every request; its budget is not the bottleneck here.
    let mut flags = vec!["--trail-len", "4", "--share-client-rate", "10000000", "--share-token-rate", "10000000"];
    flags.extend_from_slice(extra);
    let join = format!("127.0.0.1:{}", ports(cfg, 0).gossip);
    if i > 0 {
        flags.extend(["--join", &join]);
    }
    let child = super::node_command(cfg, &format!("n{i}"), p.grpc, Some(p.gossip), &dir.join(format!("n{i}")), flags)?
        .spawn()
        .context("starting a node")?;
    Ok(Proc(child))
}

/// Whether every listed node reports a ring of exactly `n` members with one checksum.
async fn agreed(cfg: &BenchConfig, nodes: &[usize], n: usize) -> bool {
    let mut sums = Vec::new();
    for &i in nodes {
        let Ok(ep) = Endpoint::from_shared(url(cfg, i)) else { return false };
        let Ok(ch) = ep.connect_timeout(Duration::from_millis(200)).connect().await else { return false };
        let Ok(m) = ClusterClient::new(ch).members(pb::MembersRequest {}).await else { return false };
        let m = m.into_inner();
        let ring: Vec<_> = m.members.iter().filter(|x| x.in_ring).collect();
        if ring.len() != n || ring.iter().any(|x| x.ring_checksum != m.ring_checksum) {
            return false;
        }
        sums.push(m.ring_checksum);
    }
    sums.windows(2).all(|w| w[0] == w[1])
}

async fn time_to_agree(cfg: &BenchConfig, nodes: &[usize], n: usize, t0: Instant) -> anyhow::Result<Duration> {
    while t0.elapsed() < Duration::from_secs(30) {
        if agreed(cfg, nodes, n).await {
            return Ok(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("nodes {nodes:?} did not agree on a {n}-member ring within 30 s")
}

/// Splits per-stream batches by owner: per node URL, the sub-batches in order.
pub(super) async fn by_owner(
    target: &str,
    per_stream: Vec<Vec<pb::LocationBatch>>,
) -> anyhow::Result<Vec<(String, Vec<Vec<pb::LocationBatch>>)>> {
    let ring = fetch_ring(target).await?;
    let mut out: HashMap<String, Vec<Vec<pb::LocationBatch>>> = HashMap::new();
    for (s, batches) in per_stream.into_iter().enumerate() {
        for b in batches {
            let mut parts: HashMap<&str, Vec<pb::LocationUpdate>> = HashMap::new();
            for u in b.updates {
                let owner = ring.owner_url(&u.driver_id).context("empty ring")?;
                parts.entry(owner).or_default().push(u);
            }
            for (owner, updates) in parts {
                let streams = out.entry(owner.to_string()).or_default();
                while streams.len() <= s {
                    streams.push(Vec::new());
                }
                streams[s].push(pb::LocationBatch { updates, batch_id: b.batch_id });
            }
        }
    }
    Ok(out.into_iter().map(|(u, s)| (u, s.into_iter().filter(|v| !v.is_empty()).collect())).collect())
}

pub struct ClusterFigures {
    pub join_converge: Duration,
    pub ingest_any: IngestResult,
    pub ingest_owner: IngestResult,
    /// The same two ingests on a cluster with `--replicas 0`.
    pub ingest_any_r0: IngestResult,
    pub ingest_owner_r0: IngestResult,
    /// `kill -9` → the victim's sampled drivers all answer again (from replicas).
    pub failover: Duration,
    /// Sampled drivers of the victim, and how many were missing after the failover.
    pub failover_sampled: usize,
    pub failover_missing: usize,
    pub nearby: Latency,
    pub results: usize,
    pub kill_converge: Duration,
    pub trips: super::trips::TripFigures,
}

/// Both ingests (streams spread over the nodes, then owner-aware) on the running
/// cluster.
async fn ingest_pair(cfg: &BenchConfig) -> anyhow::Result<(IngestResult, IngestResult)> {
    let w = Workload::new(cfg.ingest_drivers, 2 * cfg.ingest_rounds, 21);
    let half = cfg.ingest_rounds;
    let streams = cfg.streams.max(3);
    let per_stream = w.batches_for(streams, cfg.batch, 0..half);
    let spread: Vec<(String, Vec<Vec<pb::LocationBatch>>)> = {
        let mut m: Vec<(String, Vec<Vec<pb::LocationBatch>>)> = (0..3).map(|i| (url(cfg, i), Vec::new())).collect();
        for (s, b) in per_stream.into_iter().enumerate() {
            m[s % 3].1.push(b);
        }
        m
    };
    let ingest_any = ingest_many(spread).await?;
    eprintln!("[bench] cluster ingest, any node: {:.0} fixes/s", ingest_any.rate());
    let owned = by_owner(&url(cfg, 0), w.batches_for(streams, cfg.batch, half..2 * half)).await?;
    let ingest_owner = ingest_many(owned).await?;
    eprintln!("[bench] cluster ingest, owner-aware: {:.0} fixes/s", ingest_owner.rate());
    Ok((ingest_any, ingest_owner))
}

/// Starts three nodes (two, then a third) with `extra` flags; returns them and how
/// long the third took to join.
async fn start_three(
    cfg: &BenchConfig,
    dir: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<(Vec<Proc>, Duration)> {
    let mut procs = Vec::new();
    for i in 0..2 {
        procs.push(start(cfg, dir, i, extra)?);
        wait_port(ports(cfg, i).grpc).await?;
    }
    time_to_agree(cfg, &[0, 1], 2, Instant::now()).await?;
    let t0 = Instant::now();
    procs.push(start(cfg, dir, 2, extra)?);
    let join = time_to_agree(cfg, &[0, 1, 2], 3, t0).await?;
    Ok((procs, join))
}

/// Polls `ids` through `target` until every one answers; returns how many never did
/// within `within`.
pub(super) async fn answering(target: &str, ids: &[String], within: Duration) -> anyhow::Result<usize> {
    let ch = Endpoint::from_shared(target.to_string())?.connect().await?;
    let mut c = pb::locations_client::LocationsClient::new(ch);
    let t0 = Instant::now();
    let mut left: Vec<&String> = ids.iter().collect();
    while !left.is_empty() && t0.elapsed() < within {
        let mut still = Vec::new();
        for id in left {
            let req = pb::GetDriverRequest {
                key: Some(pb::get_driver_request::Key::DriverId(id.clone())),
                include_trail: false,
            };
            if c.get_driver(req).await.is_err() {
                still.push(id);
            }
        }
        left = still;
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(left.len())
}

/// Runs the cluster benchmarks in `dir`.
pub async fn run(cfg: &BenchConfig, dir: &std::path::Path) -> anyhow::Result<ClusterFigures> {
    // Unreplicated first, for comparison, on its own data.
    let (procs, _) = start_three(cfg, &dir.join("r0"), &["--replicas", "0"]).await?;
    let (ingest_any_r0, ingest_owner_r0) = ingest_pair(cfg).await?;
    eprintln!("[bench] (those two with --replicas 0)");
    drop(procs);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (mut procs, join_converge) = start_three(cfg, dir, &[]).await?;
    eprintln!("[bench] cluster: a third node joined and the ring converged in {join_converge:?}");
    let (ingest_any, ingest_owner) = ingest_pair(cfg).await?;
    let streams = cfg.streams.max(3);

    // Dispatch and share over the ingest drivers.
    let urls: Vec<String> = (0..3).map(|i| url(cfg, i)).collect();
    let http0 = format!("127.0.0.1:{}", ports(cfg, 0).http);
    let trips = super::trips::run(&urls, &http0, cfg.matches).await?;

    // Nearby over many drivers on three nodes.
    let w = Workload::new(cfg.query_drivers, 1, 31);
    let chunk = 200_000;
    for start in (0..cfg.query_drivers).step_by(chunk) {
        let part = Workload {
            drivers: (cfg.query_drivers - start).min(chunk),
            rounds: 1,
            start: w.start[start..(start + chunk).min(cfg.query_drivers)].to_vec(),
            base_ms: w.base_ms,
            prefix: w.prefix,
        };
        let mut batches = part.batches_for(streams, cfg.batch, 0..1);
        // Distinct ids per chunk.
        for b in batches.iter_mut().flatten() {
            for u in &mut b.updates {
                u.driver_id = format!("q{start}-{}", u.driver_id);
            }
        }
        ingest_many(by_owner(&url(cfg, 0), batches).await?).await?;
    }
    let (t, q) = (url(cfg, 0), cfg.queries);
    let (nearby, results) = on_one_thread(move || async move { nearby_latency(&t, q, 5).await }).await?;
    eprintln!("[bench] cluster nearby p50={:.0}us p99={:.0}us", nearby.p50, nearby.p99);

    // Failure: the victim's drivers (a sample) must answer again from their replicas.
    let ring = fetch_ring(&url(cfg, 0)).await?;
    let victim_url = url(cfg, 2);
    let sample: Vec<String> = (0..cfg.ingest_drivers)
        .map(|i| format!("drv-{i}"))
        .filter(|id| ring.owner_url(id) == Some(victim_url.as_str()))
        .take(2_000)
        .collect();
    // Past the documented replication lag (the ingest ended long before anyway).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut victim = procs.pop().expect("three nodes");
    let t0 = Instant::now();
    victim.0.kill().context("kill -9")?;
    let _ = victim.0.wait();
    let kill_converge = time_to_agree(cfg, &[0, 1], 2, t0).await?;
    let (probe, probe_left) = (sample[..sample.len().min(50)].to_vec(), sample.clone());
    let never = answering(&url(cfg, 0), &probe, Duration::from_secs(30)).await?;
    let failover = t0.elapsed();
    if never > 0 {
        bail!("{never} of the victim's drivers never answered after its kill -9");
    }
    eprintln!(
        "[bench] cluster: after kill -9 the survivors agreed in {kill_converge:?}, served the victim's drivers in {failover:?}"
    );
    let failover_missing = answering(&url(cfg, 0), &probe_left, Duration::from_secs(2)).await?;
    eprintln!("[bench] cluster: {failover_missing} of {} sampled drivers missing after the failover", sample.len());
    drop(procs);
    Ok(ClusterFigures {
        join_converge,
        ingest_any,
        ingest_owner,
        ingest_any_r0,
        ingest_owner_r0,
        failover,
        failover_sampled: sample.len(),
        failover_missing,
        nearby,
        results,
        kill_converge,
        trips,
    })
}

/// The report section.
pub fn report(cfg: &BenchConfig, f: &ClusterFigures, out: &mut String) -> std::fmt::Result {
    writeln!(out, "\n## Cluster: three nodes on this machine\n")?;
    writeln!(out, "| benchmark | Locus, 3 nodes | target |")?;
    writeln!(out, "|---|---|---|")?;
    writeln!(
        out,
        "| ingest, gateway streams spread over all nodes ({} drivers × {} fixes, batches of {}) | **{:.0} fixes/s** | ≥ 150,000 fixes/s |",
        cfg.ingest_drivers,
        cfg.ingest_rounds,
        cfg.batch,
        f.ingest_any.rate()
    )?;
    writeln!(
        out,
        "| ingest, owner-aware gateway (same volume, split by the ring) | **{:.0} fixes/s** | ≥ 400,000 fixes/s |",
        f.ingest_owner.rate()
    )?;
    writeln!(
        out,
        "| the same two ingests with `--replicas 0` (no copies), same run | {:.0} / {:.0} fixes/s | replicated ≥ 60% of these: **{:.0}% / {:.0}%** |",
        f.ingest_any_r0.rate(),
        f.ingest_owner_r0.rate(),
        100.0 * f.ingest_any.rate() / f.ingest_any_r0.rate(),
        100.0 * f.ingest_owner.rate() / f.ingest_owner_r0.rate()
    )?;
    writeln!(
        out,
        "| Nearby k=10 over {} drivers on 3 nodes, p50 / p99 / p99.9 (scatter-gather) | **{:.0} / {:.0} / {:.0} µs** | p99 ≤ 5 ms |",
        cfg.query_drivers, f.nearby.p50, f.nearby.p99, f.nearby.p999
    )?;
    let t = &f.trips;
    writeln!(
        out,
        "| `Match` over {} drivers (on the trip's owner: scatter-gather + claim on the driver's owner + the offer stored with the trip), p50 / p99, one client | **{:.0} / {:.0} µs** | p99 ≤ 10 ms |",
        cfg.ingest_drivers, t.matched.p50, t.matched.p99
    )?;
    writeln!(
        out,
        "| `Match` throughput, 16 concurrent clients over the 3 nodes (each books its trip, then matches) | **{:.0} matches/s** | – |",
        t.matches_per_sec
    )?;
    writeln!(
        out,
        "| `GET /share/{{token}}` on one node, 32 keep-alive connections | **{:.0} requests/s** | ≥ 20,000/s |",
        t.share_rps
    )?;
    writeln!(
        out,
        "| `kill -9` of one node → both survivors agree on the new ring | **{:.2} s** | detection ≤ 5 s |",
        f.kill_converge.as_secs_f64()
    )?;
    writeln!(
        out,
        "| `kill -9` of one node → its drivers answer again via a survivor (promoted replicas) | **{:.2} s** | ≤ 5 s |",
        f.failover.as_secs_f64()
    )?;
    writeln!(
        out,
        "| the victim's drivers missing after the failover (a sample of {}) | **{}** | 0 |",
        f.failover_sampled, f.failover_missing
    )?;
    writeln!(
        out,
        "| a new node's start → all three agree on the ring | **{:.2} s** | – |",
        f.join_converge.as_secs_f64()
    )?;
    writeln!(
        out,
        "\n- Ingest, any node: {} fixes, {} accepted in {:.2} s; about two thirds of the fixes take a forwarding hop. Owner-aware: {} fixes, {} accepted in {:.2} s.",
        f.ingest_any.fixes,
        f.ingest_any.accepted,
        f.ingest_any.secs,
        f.ingest_owner.fixes,
        f.ingest_owner.accepted,
        f.ingest_owner.secs
    )?;
    writeln!(
        out,
        "- Nearby: {} sequential queries from one client to one node, {:.0} queries/s, {} results in all; each query asks all three nodes in parallel (default deadline 200 ms) and merges.",
        f.nearby.n, f.nearby.qps, f.results
    )?;
    writeln!(
        out,
        "- Match: {} sequential calls at random city points within 3 km ({} found nobody free: those are timed too), then {} successful claims by 16 clients. Every claim is a compare-and-set in the driver's shard on its owner, flushed to sled before the answer. Share: {} answers of 200 in {} s; the per-client and per-token limiters run on every request (with budgets raised for the benchmark).",
        t.matched.n, t.not_found, t.concurrent_matches, t.share_requests, 4
    )?;
    writeln!(
        out,
        "- Failure detection uses foca's LAN settings with a probe every 500 ms (`--probe-period`), a 2 s suspicion timeout (`--suspect-timeout`) and a 200 ms ring debounce; the figure includes the survivors' debounce and gossip of their new checksums."
    )
}
