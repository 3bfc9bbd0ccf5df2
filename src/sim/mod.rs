//! `locus sim`: a city simulator that is also a load generator.
//!
//! Drivers drive straight lines between random destinations inside a circular city at
//! realistic speeds; each sends a fix every `--interval`. Fixes go out in batches over a
//! few `UpdateStream` streams; a query task runs Nearby k=10 at a steady rate. A status
//! line shows fixes/s, rejections by reason and Nearby latency p50/p99 every second.
//!
//! Riders (`--riders-per-sec`, see [`riders`]) book trips, get matched, ride and share
//! their trips; the status line adds matches/s, match p99 and trip outcomes.
//!
//! A small share of fixes (`--bad-ratio`) is made wrong on purpose (replayed, or a jump
//! across town), so the rejection counters show the validation working.
//!
//! `--target` may list several nodes: streams are spread over them and any node routes
//! each fix to its owner. With `--owner-aware` the simulator acts like a smart gateway:
//! it reads the ring from `Cluster.RingInfo` (refreshed every 2 s), computes each fix's
//! owner itself and sends it straight there, saving the forwarding hop.

pub mod riders;
pub mod udp;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::auth::layer::AuthChannel;

use crate::clock::wall_ms;
use crate::config::parse_duration;
use crate::geo::EARTH_RADIUS_M;
use crate::node::MAX_MESSAGE_BYTES;
use crate::pb::locations_client::LocationsClient;
use crate::pb::{self, DriverStatus};

#[derive(Args, Clone, Debug)]
pub struct SimConfig {
    /// gRPC address of a Locus node, or several separated by commas.
    #[arg(long, env = "LOCUS_SIM_TARGET", default_value = "http://127.0.0.1:7400")]
    pub target: String,
    /// Route each fix to its owner node (reads the ring from the cluster).
    #[arg(long)]
    pub owner_aware: bool,
    /// Number of simulated drivers.
    #[arg(long, default_value_t = 10_000)]
    pub drivers: usize,
    /// Each driver sends a fix this often.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Fixes per streamed batch.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Concurrent UpdateStream streams.
    #[arg(long, default_value_t = 2)]
    pub streams: usize,
    /// City centre and radius.
    #[arg(long, default_value_t = 52.52)]
    pub center_lat: f64,
    #[arg(long, default_value_t = 13.405)]
    pub center_lon: f64,
    #[arg(long, default_value_t = 12.0)]
    pub radius_km: f64,
    /// Nearby (k=10) queries per second.
    #[arg(long, default_value_t = 50)]
    pub queries_per_sec: u32,
    /// Share of fixes made stale or implausible on purpose.
    #[arg(long, default_value_t = 0.002)]
    pub bad_ratio: f64,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Riders starting a trip per second (0: none).
    #[arg(long, default_value_t = 5.0)]
    pub riders_per_sec: f64,
    /// Prefix of the simulated driver ids.
    #[arg(long, default_value = "sim-")]
    pub id_prefix: String,
    /// Send fixes as compact UDP datagrams (after each driver's first fix over gRPC and
    /// a session per driver); the nodes need `--udp-addr`.
    #[arg(long)]
    pub udp: bool,
}

/// The ring as an owner-aware client sees it: owner of every key, and where to send.
pub struct ClientRing {
    pub ring: crate::ring::Ring,
    /// Ring member (gossip address) → its gRPC URL.
    pub grpc: std::collections::HashMap<std::net::SocketAddr, String>,
}

impl ClientRing {
    /// The gRPC URL of the node owning `key`.
    pub fn owner_url(&self, key: &str) -> Option<&str> {
        self.grpc.get(&self.ring.owner(key.as_bytes())?).map(String::as_str)
    }
}

/// Reads the ring from any node's `Cluster.RingInfo`.
pub async fn fetch_ring(target: &str) -> anyhow::Result<ClientRing> {
    let ch = crate::auth::layer::client_endpoint(target)?.connect_timeout(Duration::from_secs(3)).connect().await?;
    let r = crate::pb::cluster_client::ClusterClient::new(ch).ring_info(pb::RingInfoRequest {}).await?.into_inner();
    let mut grpc = std::collections::HashMap::new();
    for m in &r.members {
        grpc.insert(m.gossip_addr.parse()?, format!("http://{}", m.grpc_addr));
    }
    let ring = crate::ring::Ring::new(grpc.keys().copied(), r.vnodes_per_member);
    anyhow::ensure!(ring.checksum() == r.checksum, "ring checksum mismatch: is this client the same version?");
    Ok(ClientRing { ring, grpc })
}

/// Opens a gateway stream: an UpdateStream to `targets[first]` whose acks feed
/// `stats`; returns its batch sender. Like a production gateway, it never gives up: when
/// the stream breaks (the node died, left, or refused it) it reconnects with backoff,
/// to the next target in turn (any node forwards to owners). Fixes sent on a broken
/// stream and never acknowledged are counted as unacknowledged (their fate is unknown),
/// not silently lost.
fn open_stream(targets: Arc<Vec<String>>, first: usize, stats: Arc<Stats>) -> mpsc::Sender<pb::LocationBatch> {
    let (tx, mut rx) = mpsc::channel::<pb::LocationBatch>(4);
    tokio::spawn(async move {
        let mut i = first;
        let mut backoff = Duration::from_millis(100);
        let mut connected_once = false;
        loop {
            let url = &targets[i % targets.len()];
            let opened = async {
                let mut c = connect(url).await?;
                let (itx, irx) = mpsc::channel::<pb::LocationBatch>(4);
                let acks = c.update_stream(ReceiverStream::new(irx)).await?.into_inner();
                anyhow::Ok((itx, acks))
            };
            let (itx, mut acks) = match opened.await {
                Ok(x) => x,
                Err(_) => {
                    i += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            if connected_once {
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            connected_once = true;
            backoff = Duration::from_millis(100);
            // Fixes sent on this stream and not acknowledged yet.
            let mut in_flight: u64 = 0;
            loop {
                tokio::select! {
                    b = rx.recv() => match b {
                        None => return,
                        Some(b) => {
                            let n = b.updates.len() as u64;
                            if itx.send(b).await.is_err() {
                                stats.unacked.fetch_add(n, Ordering::Relaxed);
                                break;
                            }
                            in_flight += n;
                        }
                    },
                    ack = acks.next() => match ack {
                        Some(Ok(a)) => {
                            in_flight = in_flight.saturating_sub(a.accepted as u64 + a.rejected.len() as u64);
                            stats.accepted.fetch_add(a.accepted as u64, Ordering::Relaxed);
                            let mut m = stats.rejected.lock().expect("stats");
                            for r in a.rejected {
                                *m.entry(r.reason_name).or_default() += 1;
                            }
                        }
                        Some(Err(_)) | None => break,
                    },
                }
            }
            stats.unacked.fetch_add(in_flight, Ordering::Relaxed);
            i += 1;
        }
    });
    tx
}

/// Where the simulator's batches go: streams spread over the targets, or per owner.
struct Outlets {
    /// Target URL → its streams.
    streams: std::collections::HashMap<String, Vec<mpsc::Sender<pb::LocationBatch>>>,
    per_target: usize,
    /// Every stream, for sending to any node.
    flat: Vec<mpsc::Sender<pb::LocationBatch>>,
    ring: Option<ClientRing>,
    next: usize,
    stats: Arc<Stats>,
    /// Every node the simulator was given (failover order).
    targets: Vec<String>,
}

impl Outlets {
    async fn streams_for(&mut self, url: &str) -> anyhow::Result<&mut Vec<mpsc::Sender<pb::LocationBatch>>> {
        if !self.streams.contains_key(url) {
            // This node first, then the others (any node forwards to owners).
            let mut order = vec![url.to_string()];
            order.extend(self.targets.iter().filter(|t| t.as_str() != url).cloned());
            let order = Arc::new(order);
            let v = (0..self.per_target).map(|_| open_stream(order.clone(), 0, self.stats.clone())).collect();
            self.streams.insert(url.to_string(), v);
        }
        Ok(self.streams.get_mut(url).expect("just inserted"))
    }

    /// Sends one batch: whole to the next stream, or split by owner.
    async fn send(&mut self, batch: Vec<pb::LocationUpdate>, batch_id: u64) {
        self.stats.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.next = self.next.wrapping_add(1);
        let Some(ring) = &self.ring else {
            let tx = self.flat[self.next % self.flat.len()].clone();
            let _ = tx.send(pb::LocationBatch { updates: batch, batch_id }).await;
            return;
        };
        let mut parts: std::collections::HashMap<String, Vec<pb::LocationUpdate>> = Default::default();
        for u in batch {
            let url = ring.owner_url(&u.driver_id).unwrap_or_default().to_string();
            parts.entry(url).or_default().push(u);
        }
        let next = self.next;
        for (url, updates) in parts {
            match self.streams_for(&url).await {
                Ok(v) => {
                    let tx = v[next % v.len()].clone();
                    let _ = tx.send(pb::LocationBatch { updates, batch_id }).await;
                }
                Err(e) => eprintln!("\ncannot reach owner {url}: {e}"),
            }
        }
    }
}

/// Connects a client with the node's message limits (and the process's client token).
pub async fn connect(target: &str) -> anyhow::Result<LocationsClient<AuthChannel>> {
    Ok(LocationsClient::new(connect_channel(target).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A connected channel to one node (for any service's client), sending the process's
/// client token (`auth::layer::set_client_token`).
pub async fn connect_channel(target: &str) -> anyhow::Result<AuthChannel> {
    let ch = crate::auth::layer::client_endpoint(target)?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect()
        .await?;
    Ok(AuthChannel::client(ch))
}

/// A channel over every target, balanced: a node that does not answer drops out until
/// it reconnects (what a client of a cluster with no load balancer in front does).
pub fn balanced_channel(targets: &[String]) -> anyhow::Result<AuthChannel> {
    let mut eps = Vec::new();
    for t in targets {
        eps.push(
            crate::auth::layer::client_endpoint(t)?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(2))
                .keep_alive_while_idle(true),
        );
    }
    Ok(AuthChannel::client(Channel::balance_list(eps.into_iter())))
}

/// A point at `d` metres on `bearing` radians from (lat, lon), flat-earth (city scale).
fn offset(lat: f64, lon: f64, d: f64, bearing: f64) -> (f64, f64) {
    let dlat = d * bearing.cos() / EARTH_RADIUS_M;
    let dlon = d * bearing.sin() / (EARTH_RADIUS_M * lat.to_radians().cos());
    (lat + dlat.to_degrees(), lon + dlon.to_degrees())
}

/// A uniformly random point of the city.
fn random_point(cfg: &SimConfig, rng: &mut SmallRng) -> (f64, f64) {
    let r = cfg.radius_km * 1000.0 * rng.random_range(0.0f64..1.0).sqrt();
    offset(cfg.center_lat, cfg.center_lon, r, rng.random_range(0.0..std::f64::consts::TAU))
}

struct SimDriver {
    lat: f64,
    lon: f64,
    dest: (f64, f64),
    speed: f64,
    status: DriverStatus,
    last_ts: i64,
}

/// The simulated city: pure, seeded, advanced by the caller's clock.
pub struct City {
    cfg: SimConfig,
    rng: SmallRng,
    drivers: Vec<SimDriver>,
}

const VEHICLES: [&str; 3] = ["sedan", "suv", "moto"];

impl City {
    pub fn new(cfg: SimConfig) -> City {
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let mut city = City { drivers: Vec::with_capacity(cfg.drivers), rng: SmallRng::seed_from_u64(0), cfg };
        for _ in 0..city.cfg.drivers {
            let (lat, lon) = city.random_point(&mut rng);
            let dest = city.random_point(&mut rng);
            let status = if rng.random_bool(0.7) { DriverStatus::Available } else { DriverStatus::OnTrip };
            city.drivers.push(SimDriver { lat, lon, dest, speed: rng.random_range(4.0..16.0), status, last_ts: 0 });
        }
        city.rng = rng;
        city
    }

    pub fn random_point(&self, rng: &mut SmallRng) -> (f64, f64) {
        random_point(&self.cfg, rng)
    }

    /// Sends driver `i` to `dest` (a rider's pickup or drop-off) at city speed.
    pub fn steer(&mut self, i: usize, dest: (f64, f64)) {
        if let Some(d) = self.drivers.get_mut(i) {
            d.dest = dest;
            d.speed = d.speed.max(10.0);
        }
    }

    /// Moves driver `i` to time `now_ms` and returns its fix.
    pub fn step(&mut self, i: usize, now_ms: i64) -> pb::LocationUpdate {
        let bad = self.rng.random_bool(self.cfg.bad_ratio);
        let replay = bad && self.rng.random_bool(0.5);
        let d = &mut self.drivers[i];
        let ts = if replay && d.last_ts > 0 { d.last_ts } else { now_ms.max(d.last_ts + 1) };
        if d.last_ts > 0 && !replay {
            let dt = (ts - d.last_ts) as f64 / 1000.0;
            let step = d.speed * dt;
            let (dlat, dlon) = (d.dest.0 - d.lat, d.dest.1 - d.lon);
            let dist = crate::geo::haversine_m(d.lat, d.lon, d.dest.0, d.dest.1);
            if dist <= step {
                (d.lat, d.lon) = d.dest;
                d.dest = random_point(&self.cfg, &mut self.rng);
                if self.rng.random_bool(0.3) {
                    d.status = if d.status == DriverStatus::Available {
                        DriverStatus::OnTrip
                    } else {
                        DriverStatus::Available
                    };
                }
            } else {
                d.lat += dlat * step / dist;
                d.lon += dlon * step / dist;
            }
        }
        let (mut lat, lon) = (d.lat, d.lon);
        if bad && !replay {
            lat += 0.5; // about 55 km in one interval
        }
        if !replay {
            d.last_ts = ts;
        }
        pb::LocationUpdate {
            driver_id: format!("{}{i}", self.cfg.id_prefix),
            lat: lat.clamp(-90.0, 90.0),
            lon,
            heading_deg: 0.0,
            speed_mps: d.speed,
            accuracy_m: 5.0,
            timestamp_ms: ts,
            status: d.status as i32,
            vehicle_type: VEHICLES[i % 3].to_string(),
            cab_number: format!("CAB-{i}"),
            session: String::new(),
            trip_id: String::new(),
            trip_cost: 0.0,
        }
    }
}

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    accepted: AtomicU64,
    rejected: std::sync::Mutex<BTreeMap<String, u64>>,
    latencies_us: Mutex<Vec<u64>>,
    query_errors: AtomicU64,
    /// Gateway streams re-opened after breaking.
    reconnects: AtomicU64,
    /// Fixes sent on a stream that broke before acknowledging them.
    unacked: AtomicU64,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A plain HTTP/1.1 GET on a fresh connection: (status, body).
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Runs the simulator until `--duration` passes or Ctrl-C.
pub async fn run(cfg: SimConfig) -> anyhow::Result<()> {
    let targets: Vec<String> = cfg.target.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
    anyhow::ensure!(!targets.is_empty(), "--target: at least one node address is required");
    let stats = Arc::new(Stats::default());
    let mut outlets = Outlets {
        streams: Default::default(),
        per_target: if cfg.owner_aware { 1 } else { cfg.streams.max(1).div_ceil(targets.len()) },
        ring: if cfg.owner_aware { Some(fetch_ring(&targets[0]).await?) } else { None },
        next: 0,
        flat: Vec::new(),
        stats: stats.clone(),
        targets: targets.clone(),
    };
    if !cfg.owner_aware {
        for t in &targets {
            let v = outlets.streams_for(t).await?.clone();
            outlets.flat.extend(v);
        }
    }
    let mut last_ring = Instant::now();
    // Queries.
    let qstats = stats.clone();
    let qcfg = cfg.clone();
    // Queries come from apps, not the gateway: their own connection.
    let qclient = connect(&targets[targets.len() - 1]).await?;
    tokio::spawn(async move {
        if qcfg.queries_per_sec == 0 {
            return;
        }
        let city = City::new(SimConfig { drivers: 0, ..qcfg.clone() });
        let mut rng = SmallRng::seed_from_u64(qcfg.seed ^ 0x9e37);
        let mut iv = tokio::time::interval(Duration::from_secs_f64(1.0 / qcfg.queries_per_sec as f64));
        loop {
            iv.tick().await;
            let (lat, lon) = city.random_point(&mut rng);
            let mut c = qclient.clone();
            let t0 = Instant::now();
            let req = pb::NearbyRequest {
                lat,
                lon,
                limit: 10,
                statuses: vec![DriverStatus::Available as i32],
                ..Default::default()
            };
            match c.nearby(req).await {
                Ok(_) => qstats.latencies_us.lock().await.push(t0.elapsed().as_micros() as u64),
                Err(_) => {
                    qstats.query_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });

    let rider_stats = Arc::new(riders::RiderStats::default());
    let (steer_tx, mut steer_rx) = mpsc::channel(1024);
    // Riders and queries use every node (a dead one drops out of the balance).
    riders::spawn(cfg.clone(), balanced_channel(&targets)?, steer_tx, rider_stats.clone());
    let mut last_matched = 0u64;

    let mut city = City::new(cfg.clone());
    let mut udp = None;
    if cfg.udp {
        // Sessions need known drivers: one fix each over gRPC first.
        let now = wall_ms();
        let first: Vec<pb::LocationUpdate> = (0..cfg.drivers).map(|i| city.step(i, now)).collect();
        let ids: Vec<String> = first.iter().map(|u| u.driver_id.clone()).collect();
        for (k, chunk) in first.chunks(cfg.batch.max(1)).enumerate() {
            outlets.send(chunk.to_vec(), k as u64 + 1).await;
        }
        let t0 = Instant::now();
        while stats.accepted.load(Ordering::Relaxed) < cfg.drivers as u64 * 99 / 100
            && t0.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t0 = Instant::now();
        let outlet = udp::UdpOutlet::open(balanced_channel(&targets)?, ids).await?;
        println!("[sim] {} UDP sessions opened in {:.1} s", cfg.drivers, t0.elapsed().as_secs_f64());
        udp = Some(outlet);
    }
    let start = Instant::now();
    let tick = Duration::from_millis(100);
    let per_tick = ((cfg.drivers as f64) * tick.as_secs_f64() / cfg.interval.as_secs_f64()).ceil() as usize;
    let mut next = 0usize;
    let mut batch_id = 0u64;
    let mut iv = tokio::time::interval(tick);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_report = Instant::now();
    let mut last_accepted = 0u64;
    let tty = std::io::stdout().is_terminal();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = iv.tick() => {}
            _ = &mut ctrl_c => break,
        }
        if cfg.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        while let Ok((i, dest)) = steer_rx.try_recv() {
            city.steer(i, dest);
        }
        let now = wall_ms();
        let mut batch = Vec::with_capacity(cfg.batch);
        for _ in 0..per_tick.min(cfg.drivers) {
            let u = city.step(next, now);
            let sent = udp.as_mut().is_some_and(|o| o.send(next, &u));
            next = (next + 1) % cfg.drivers.max(1);
            if sent {
                continue;
            }
            batch.push(u);
            if batch.len() == cfg.batch {
                batch_id += 1;
                outlets.send(std::mem::take(&mut batch), batch_id).await;
            }
        }
        if !batch.is_empty() {
            batch_id += 1;
            outlets.send(batch, batch_id).await;
        }
        if cfg.owner_aware && last_ring.elapsed() >= Duration::from_secs(2) {
            last_ring = Instant::now();
            match fetch_ring(&targets[0]).await {
                Ok(r) => outlets.ring = Some(r),
                Err(e) => eprintln!("\nring refresh failed (keeping the last ring): {e}"),
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            let secs = last_report.elapsed().as_secs_f64();
            last_report = Instant::now();
            let accepted = stats.accepted.load(Ordering::Relaxed);
            let rate = (accepted - last_accepted) as f64 / secs;
            last_accepted = accepted;
            let mut lat = std::mem::take(&mut *stats.latencies_us.lock().await);
            lat.sort_unstable();
            let rejected = stats.rejected.lock().expect("stats").clone();
            let rej: Vec<String> = rejected.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let r = &rider_stats;
            let matched = r.matched.load(Ordering::Relaxed);
            let mut mlat = std::mem::take(&mut *r.match_us.lock().await);
            mlat.sort_unstable();
            let trips_line = format!(
                " | matches/s={:.1} match p99={:.2}ms no_driver={} done={} cancelled={} share 200={} other={} errors={}",
                (matched - last_matched) as f64 / secs,
                percentile(&mlat, 0.99) as f64 / 1000.0,
                r.no_driver.load(Ordering::Relaxed),
                r.completed.load(Ordering::Relaxed),
                r.cancelled.load(Ordering::Relaxed),
                r.share_ok.load(Ordering::Relaxed),
                r.share_other.load(Ordering::Relaxed),
                r.errors.load(Ordering::Relaxed),
            );
            last_matched = matched;
            let line = format!(
                "[sim {:>4}s] drivers={} fixes/s={:>7.0} accepted={} rejected: {} reconnects={} unacked={} | nearby k=10 n={} p50={:.2}ms p99={:.2}ms errors={}",
                start.elapsed().as_secs(),
                cfg.drivers,
                rate,
                accepted,
                if rej.is_empty() { "none".to_string() } else { rej.join(" ") },
                stats.reconnects.load(Ordering::Relaxed),
                stats.unacked.load(Ordering::Relaxed),
                lat.len(),
                percentile(&lat, 0.5) as f64 / 1000.0,
                percentile(&lat, 0.99) as f64 / 1000.0,
                stats.query_errors.load(Ordering::Relaxed),
            ) + &trips_line
                + &udp.as_ref().map(|o| o.stats.line(secs)).unwrap_or_default();
            if tty {
                print!("\r\x1b[2K{line}");
                std::io::stdout().flush().ok();
            } else {
                println!("{line}");
            }
        }
    }
    println!();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimConfig,
    }

    #[test]
    fn drivers_stay_in_town_at_plausible_speeds() {
        let cfg = Cli::parse_from(["sim", "--drivers", "50", "--bad-ratio", "0"]).sim;
        let mut city = City::new(cfg);
        let mut last: Vec<Option<pb::LocationUpdate>> = vec![None; 50];
        for step in 0..120 {
            for (i, prev) in last.iter_mut().enumerate() {
                let f = city.step(i, 1_700_000_000_000 + step * 1_000);
                let d = crate::geo::haversine_m(52.52, 13.405, f.lat, f.lon);
                assert!(d < 12_100.0, "driver {i} left town: {d} m");
                if let Some(p) = prev {
                    let moved = crate::geo::haversine_m(p.lat, p.lon, f.lat, f.lon);
                    assert!(moved <= 16.5, "{moved} m in 1 s");
                    assert!(f.timestamp_ms > p.timestamp_ms);
                }
                *prev = Some(f);
            }
        }
    }
}
