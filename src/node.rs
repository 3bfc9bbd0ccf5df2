//! Wires a node together and owns its shutdown.
//!
//! Start: replay the driver log into fresh shard cores (bulk-loading their R-trees),
//! start the persister thread, the shard workers, a ticker, the gRPC and HTTP servers,
//! then the membership task (gossip) and the ownership task, which follows the ring:
//! when this node's partitions change it tells every shard to drop drivers it no longer
//! owns, and it keeps `/readyz` true only while the node is on the ring.
//!
//! Stop (SIGTERM/SIGINT, or `Cluster.Leave`): leave the cluster first (say "leaving",
//! wait until peers route around this node, leave the gossip) while still serving, then
//! mark not-ready, end streams, let tonic finish in-flight RPCs, have every shard drain
//! its mailbox and hand over its last writes, sync the driver log, exit 0.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

use crate::actors::{Hooks, ShardHandle, ShardMsg, WorkerConfig, spawn_shard};
use crate::api::{ClusterApi, DispatchApi, EventsApi, InternalApi, LocationsApi, TripsApi};
use crate::config::NodeConfig;
use crate::dispatch::{Dispatcher, load_claims};
use crate::drivers::{DriverShard, Limits, ShardConfig};
use crate::keys::shard_of;
use crate::membership::{self, ClusterView, MembershipConfig, UdpTransport};
use crate::pb::cluster_server::ClusterServer;
use crate::pb::dispatch_server::DispatchServer;
use crate::pb::events_server::EventsServer;
use crate::pb::internal_server::InternalServer;
use crate::pb::locations_server::LocationsServer;
use crate::pb::trips_server::TripsServer;
use crate::routing::cluster::Cluster;
use crate::routing::{Router, SecondaryIndex};
use crate::storage::{DriverLog, LogLimits, Persister, replay};
use crate::trips::Trips;
use crate::trips::model::{Fare, TripConfig};
use crate::trips::share::RateLimiter;

/// Largest gRPC message a node accepts or sends (a 10,000-fix batch is about 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Rebuilds the shard cores from the driver log.
fn restore(cfg: &NodeConfig, log_dir: &Path) -> anyhow::Result<Vec<DriverShard>> {
    let t0 = Instant::now();
    let n = cfg.shards;
    let shard_cfg = ShardConfig {
        ttl_ms: cfg.driver_ttl.as_millis() as i64,
        trail_len: cfg.trail_len as usize,
        max_speed_mps: cfg.max_speed_mps,
        move_slack_m: cfg.index_slack_m,
        max_vehicle_types: cfg.max_vehicle_types,
    };
    let (drivers, stats) =
        replay(log_dir, shard_cfg.trail_len.saturating_sub(1)).context("replaying the driver log")?;
    let mut cores: Vec<DriverShard> = (0..n).map(|_| DriverShard::new(shard_cfg.clone())).collect();
    let count = drivers.len();
    for (_, s) in drivers {
        cores[shard_of(s.driver_id.as_bytes(), n)].restore_driver(s);
    }
    for core in &mut cores {
        core.finish_restore();
    }
    info!(
        drivers = count,
        segments = stats.segments,
        records = stats.records,
        mib = stats.bytes >> 20,
        skipped_bytes = stats.skipped_bytes,
        ms = t0.elapsed().as_millis() as u64,
        "restored state"
    );
    Ok(cores)
}

/// Resolves `--join` entries; one that does not resolve is skipped with a warning. When
/// seeds were given but none resolves (DNS not up yet, say), it retries rather than
/// starting a cluster of its own: a node told to join must never split off alone.
async fn resolve_seeds(join: &[String]) -> Vec<SocketAddr> {
    let wanted: Vec<&str> = join.iter().map(|j| j.trim()).filter(|j| !j.is_empty()).collect();
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut out = Vec::new();
        for j in &wanted {
            match tokio::net::lookup_host(*j).await {
                Ok(addrs) => out.extend(addrs),
                Err(e) => warn!(seed = j, error = %e, "cannot resolve a --join address"),
            }
        }
        if wanted.is_empty() || !out.is_empty() {
            return out;
        }
        warn!(retry_in_ms = backoff.as_millis() as u64, "no --join address resolves; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The address peers use for a listener: its own, or the gossip address's IP when the
/// listener is bound to every interface.
fn advertised(listen: SocketAddr, gossip: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() { SocketAddr::new(gossip.ip(), listen.port()) } else { listen }
}

/// The ownership task: follows the published ring. When this node is on it, every shard
/// drops the drivers of partitions the node no longer owns (so a stale copy never
/// answers), and `/readyz` is true. A node off the ring (joining, leaving) keeps its
/// state: it forwards every request, and a restarting single node must not lose data.
async fn follow_ring(
    mut view: watch::Receiver<Arc<ClusterView>>,
    shards: Vec<tokio::sync::mpsc::Sender<ShardMsg>>,
    cluster: Arc<Cluster>,
    ready: Arc<AtomicBool>,
) {
    let mut last_checksum = None;
    loop {
        let v = view.borrow_and_update().clone();
        let on_ring = v.ring.contains(&v.me);
        ready.store(on_ring, Ordering::Relaxed);
        metrics::gauge!("locus_ring_members").set(v.ring.members().len() as f64);
        for l in [membership::Liveness::Alive, membership::Liveness::Suspect, membership::Liveness::Down] {
            let n = v.members.iter().filter(|m| m.liveness == l).count();
            metrics::gauge!("locus_members", "liveness" => l.as_str()).set(n as f64);
        }
        let live: Vec<SocketAddr> = v.members.iter().filter_map(|m| m.meta.as_ref().map(|x| x.grpc)).collect();
        cluster.peers().retain(&live);
        if on_ring && last_checksum != Some(v.ring.checksum()) {
            last_checksum = Some(v.ring.checksum());
            let owned = Arc::new(v.ring.owned_by(&v.me));
            let n = owned.iter().filter(|o| **o).count();
            info!(partitions = n, "this node's partitions");
            metrics::gauge!("locus_partitions_owned").set(n as f64);
            for tx in &shards {
                let _ = tx.send(ShardMsg::Retain { owned: owned.clone() }).await;
            }
        }
        if view.changed().await.is_err() {
            return;
        }
    }
}

/// Runs a node until `stop` resolves, then shuts it down gracefully.
/// `on_ready` receives the bound gRPC and HTTP addresses.
pub async fn run(
    cfg: NodeConfig,
    stop: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(SocketAddr, SocketAddr),
) -> anyhow::Result<()> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let dir = cfg.data_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    let log_dir = dir.join("drivers");
    let cores = restore(&cfg, &log_dir)?;
    let log = DriverLog::open(&log_dir).context("opening the driver log")?;
    let limits = LogLimits { segment_bytes: cfg.log_segment_bytes, compact_bytes: cfg.log_compact_bytes };
    let persister = Persister::start(log, limits, cfg.shards, 2 * cfg.shards);
    let index = Arc::new(SecondaryIndex::default());
    // Claims, trips and their timers: small, low-rate, durable (sled).
    let db = sled::Config::new()
        .path(dir.join("meta"))
        .cache_capacity(16 << 20)
        .open()
        .context("opening the trips/claims store")?;
    let claims_tree = db.open_tree("claims").context("opening the claims tree")?;
    let durable = crate::storage::Durable::start(db.clone());
    let bus = crate::events::bus();
    let (trip_fix_tx, trip_fix_rx) = tokio::sync::mpsc::channel(8192);
    let hooks = Hooks { claims: Some(claims_tree.clone()), trip_fixes: Some(trip_fix_tx), events: Some(bus.clone()) };
    let wcfg = WorkerConfig {
        persist_interval: cfg.persist_interval,
        watch_queue: cfg.watch_queue,
        mailbox: cfg.mailbox_capacity,
    };
    let shards: Vec<ShardHandle> = cores
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let (persist, sweeps) = (persister.sender(), persister.sweeps.clone());
            spawn_shard(i, c, wcfg.clone(), index.clone(), persist, sweeps, hooks.clone())
        })
        .collect();
    let txs: Vec<_> = shards.iter().map(|s| s.tx.clone()).collect();
    let ticker = tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_millis(50));
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            iv.tick().await;
            for tx in &txs {
                // A full mailbox means the worker is busy anyway.
                let _ = tx.try_send(ShardMsg::Tick);
            }
        }
    });

    let router = Arc::new(Router::new(shards.iter().map(|s| s.tx.clone()).collect(), index, cfg.overload_wait));
    let claims = load_claims(&claims_tree);
    info!(claims = claims.len(), "restored driver claims");
    router.restore_claims(claims).await;
    let (sd_tx, sd_rx) = watch::channel(false);
    let limits = Limits { max_future_ms: cfg.max_future_skew.as_millis() as i64 };

    // Addresses first: the gossip metadata carries them.
    let listener = TcpListener::bind(cfg.grpc_addr).await.with_context(|| format!("binding {}", cfg.grpc_addr))?;
    let grpc_addr = listener.local_addr()?;
    let http_listener = TcpListener::bind(cfg.http_addr).await.with_context(|| format!("binding {}", cfg.http_addr))?;
    let http_addr = http_listener.local_addr()?;
    let (transport, gossip_addr, inbox) =
        UdpTransport::bind(cfg.gossip_addr).await.with_context(|| format!("binding gossip {}", cfg.gossip_addr))?;
    let seeds = resolve_seeds(&cfg.join).await;
    let mcfg = MembershipConfig {
        gossip_addr,
        seeds,
        name: cfg.node_name.clone(),
        grpc: advertised(grpc_addr, gossip_addr),
        http: advertised(http_addr, gossip_addr),
        vnodes: cfg.vnodes,
        ring_debounce: cfg.ring_debounce,
        leave_wait: cfg.leave_wait,
        suspect_to_down: cfg.suspect_timeout,
        rebroadcast_every: Duration::from_secs(5),
    };
    let members = membership::spawn(mcfg, transport, inbox);
    let cluster = Arc::new(Cluster::new(members.view.clone(), cfg.scatter_timeout));
    let ready = Arc::new(AtomicBool::new(false));
    let ownership = tokio::spawn(follow_ring(
        members.view.clone(),
        shards.iter().map(|s| s.tx.clone()).collect(),
        cluster.clone(),
        ready.clone(),
    ));

    let dispatch = Arc::new(Dispatcher::new(router.clone(), cluster.clone(), durable.clone(), cfg.offer_timeout));
    let trip_cfg = TripConfig {
        buffer_ms: cfg.trip_buffer.as_millis() as i64,
        linger_ms: cfg.trip_linger.as_millis() as i64,
        route_max: cfg.route_max as usize,
        near_pickup_m: cfg.near_pickup_m,
        fare: Fare { base: cfg.fare_base, per_km: cfg.fare_per_km, per_min: cfg.fare_per_min },
    };
    let public_url = cfg
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", advertised(http_addr, gossip_addr)))
        .trim_end_matches('/')
        .to_string();
    let trips = Trips::new(&db, durable.clone(), trip_cfg, public_url, bus.clone(), dispatch.clone(), cfg.watch_queue)
        .context("opening the trips tree")?;
    trips.load();
    let feed = tokio::spawn(crate::trips::run_feed(trip_fix_rx, trips.clone(), cluster.clone()));

    let leave = Arc::new(Notify::new());
    let api = Arc::new(LocationsApi::new(router, cluster.clone(), limits, cfg.watch_queue, sd_rx.clone()));
    let svc = LocationsServer::from_arc(api.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let trips_svc = TripsServer::new(TripsApi::new(trips.clone(), cluster.clone()));
    let dispatch_svc = DispatchServer::new(DispatchApi::new(api.clone(), dispatch.clone()));
    let events_svc = EventsServer::new(EventsApi::new(bus.clone(), cluster.clone()));
    let internal_svc = InternalServer::new(InternalApi::new(dispatch.clone(), trips.clone()));
    let share = Arc::new(crate::http::Share {
        trips: trips.clone(),
        cluster: cluster.clone(),
        per_client: RateLimiter::new(1 << 16, cfg.share_client_rate, 2.0 * cfg.share_client_rate),
        per_token: RateLimiter::new(1 << 16, cfg.share_token_rate, 2.0 * cfg.share_token_rate),
    });
    let admin = ClusterServer::new(ClusterApi::new(cluster.clone(), leave.clone()));
    // serve_with_incoming does not apply the builder's TCP options: set them per socket.
    let incoming = TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let mut sd = sd_rx.clone();
    let grpc = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(svc)
        .add_service(admin)
        .add_service(trips_svc)
        .add_service(dispatch_svc)
        .add_service(events_svc)
        .add_service(internal_svc)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = sd.wait_for(|s| *s).await;
        });
    let mut sd = sd_rx.clone();
    let http = crate::http::serve(http_listener, ready.clone(), Some(share), async move {
        let _ = sd.wait_for(|s| *s).await;
    });
    let grpc_task = tokio::spawn(grpc);
    let http_task = tokio::spawn(http);
    info!(node = %cfg.node_name, grpc = %grpc_addr, http = %http_addr, gossip = %gossip_addr, shards = cfg.shards, data = %dir.display(), "locus node serving");
    on_ready(grpc_addr, http_addr);

    tokio::select! {
        _ = stop => info!("shutting down: leaving the cluster"),
        _ = leave.notified() => info!("leaving the cluster on request"),
    }
    if tokio::time::timeout(cfg.leave_wait + Duration::from_secs(1), members.leave()).await.is_err() {
        warn!("leaving the gossip took too long; stopping anyway");
    }
    ownership.abort();
    info!("shutting down: draining RPCs");
    ready.store(false, Ordering::Relaxed);
    let _ = sd_tx.send(true);
    match tokio::time::timeout(cfg.shutdown_grace, grpc_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "gRPC server error during shutdown"),
        Ok(Err(e)) => warn!(error = %e, "gRPC server task failed"),
        Err(_) => warn!("in-flight RPCs did not finish within the grace period"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), http_task).await;
    ticker.abort();
    info!("shutting down: draining shard mailboxes");
    for s in &shards {
        let (reply, rx) = oneshot::channel();
        if s.tx.send(ShardMsg::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }
    for s in shards {
        s.join().await;
    }
    feed.abort();
    tokio::task::spawn_blocking(move || persister.stop(Duration::from_secs(30))).await?;
    if let Err(e) = durable.flush().await {
        warn!(error = %e, "flushing the trips/claims store");
    }
    info!("stopped cleanly");
    Ok(())
}
