//! Wires a node together and owns its shutdown.
//!
//! Start: replay the driver log (what it holds is *parked*: never served until the
//! hand-off adopts or hands it over), start the persister thread, empty shard workers,
//! a ticker, the membership task (gossip), the hand-off task (`handoff`: pulls the
//! partitions the ring gives this node, lends the others, publishes the routes every
//! request reads and `/readyz`), the gRPC and HTTP servers, and a task that keeps member
//! metrics and peer channels current.
//!
//! Stop (SIGTERM/SIGINT, or `Cluster.Leave`): say "leaving" while still serving; peers
//! drop this node from their rings and pull its partitions; once it holds none (or no
//! other member is left, or `--handoff-timeout` passed) it leaves the gossip, marks
//! itself not-ready, ends streams, lets tonic finish in-flight RPCs, has every shard
//! drain its mailbox and hand over its last writes, syncs the driver log, exits 0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tokio::time::Instant;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

use crate::actors::{Hooks, ShardHandle, ShardMsg, WorkerConfig, spawn_shard};
use crate::api::{
    ClaimForwarder, ClusterApi, DispatchApi, EventsApi, FixesApi, GrpcPeerLink, HandoffApi, InternalApi, LocationsApi,
    SessionsApi, TripsApi,
};
use crate::auth::layer::{AuthLayer, bearer_value};
use crate::auth::{Auth, ClusterKey};
use crate::config::NodeConfig;
use crate::dispatch::Dispatcher;
use crate::drivers::{DriverShard, Limits, ShardConfig, Snapshot};
use crate::handoff::{Handoff, MAX_HANDOFF_BYTES, MemPeerLink};
use crate::history::{HistoryConfig, HistoryStore};
use crate::membership::{self, ClusterView, MembershipConfig, Transport, UdpTransport};
use crate::ownership::{Lease, Routes};
use crate::pb::cluster_server::ClusterServer;
use crate::pb::dispatch_server::DispatchServer;
use crate::pb::events_server::EventsServer;
use crate::pb::fixes_server::FixesServer;
use crate::pb::handoff_server::HandoffServer;
use crate::pb::internal_server::InternalServer;
use crate::pb::locations_server::LocationsServer;
use crate::pb::sessions_server::SessionsServer;
use crate::pb::trips_server::TripsServer;
use crate::peer::PeerLink;
use crate::replica::Replicator;
use crate::routing::cluster::Cluster;
use crate::routing::{Router, SecondaryIndex};
use crate::storage::{DriverLog, LogLimits, Persister, replay};
use crate::storage::{RecordStore, SledStore};
use crate::trips::Trips;
use crate::trips::model::{Fare, TripConfig};
use crate::trips::share::RateLimiter;

pub use crate::routing::cluster::MAX_MESSAGE_BYTES;

/// Reads the driver log back (the parked copy) and makes empty shard cores.
fn restore(cfg: &NodeConfig, log_dir: &Path) -> anyhow::Result<(Vec<DriverShard>, HashMap<String, Snapshot>)> {
    let t0 = Instant::now();
    let shard_cfg = ShardConfig {
        ttl_ms: cfg.driver_ttl.as_millis() as i64,
        trail_len: cfg.trail_len as usize,
        max_speed_mps: cfg.max_speed_mps,
        move_slack_m: cfg.index_slack_m,
        max_vehicle_types: cfg.max_vehicle_types,
        history: !cfg.history_retention.is_zero(),
    };
    let (drivers, stats) =
        replay(log_dir, shard_cfg.trail_len.saturating_sub(1)).context("replaying the driver log")?;
    let cores: Vec<DriverShard> = (0..cfg.shards).map(|_| DriverShard::new(shard_cfg.clone())).collect();
    info!(
        drivers = drivers.len(),
        segments = stats.segments,
        records = stats.records,
        mib = stats.bytes >> 20,
        skipped_bytes = stats.skipped_bytes,
        ms = t0.elapsed().as_millis() as u64,
        "read the driver log back"
    );
    Ok((cores, drivers))
}

/// Resolves `--join` entries, leaving out this node's own address (every node of a
/// compose file may join the same list); one that does not resolve is skipped with a
/// warning. When seeds were given but none but itself resolves (DNS not up yet, say),
/// it retries rather than starting a cluster of its own: a node told to join must never
/// split off alone.
async fn resolve_seeds(join: &[String], me: SocketAddr) -> Vec<SocketAddr> {
    let wanted: Vec<&str> = join.iter().map(|j| j.trim()).filter(|j| !j.is_empty()).collect();
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut out = Vec::new();
        for j in &wanted {
            match tokio::net::lookup_host(*j).await {
                Ok(addrs) => out.extend(addrs.filter(|a| *a != me)),
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

/// Keeps member metrics and the peer channels current as the view changes.
async fn follow_members(mut view: watch::Receiver<Arc<ClusterView>>, cluster: Arc<Cluster>) {
    loop {
        let v = view.borrow_and_update().clone();
        metrics::gauge!("locus_ring_members").set(v.ring.members().len() as f64);
        for l in [membership::Liveness::Alive, membership::Liveness::Suspect, membership::Liveness::Down] {
            let n = v.members.iter().filter(|m| m.liveness == l).count();
            metrics::gauge!("locus_members", "liveness" => l.as_str()).set(n as f64);
        }
        let live: Vec<SocketAddr> = v.members.iter().filter_map(|m| m.meta.as_ref().map(|x| x.grpc)).collect();
        cluster.peers().retain(&live);
        if view.changed().await.is_err() {
            return;
        }
    }
}

/// The network a node talks to its peers over.
#[derive(Clone, Default)]
pub enum Net {
    /// TCP for gRPC and UDP for gossip (production).
    #[default]
    Os,
    /// The in-process network (the cluster harness): `--grpc-addr` and `--gossip-addr`
    /// name the node on it; HTTP still binds a real socket.
    Mem(crate::memnet::MemNet),
}

/// Runs a node until `stop` resolves, then shuts it down gracefully.
/// `on_ready` receives the bound gRPC and HTTP addresses.
pub async fn run(
    cfg: NodeConfig,
    stop: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(SocketAddr, SocketAddr),
) -> anyhow::Result<()> {
    run_on(cfg, Net::Os, stop, on_ready).await
}

/// [`run`] on a given network.
pub async fn run_on(
    cfg: NodeConfig,
    net: Net,
    stop: impl std::future::Future<Output = ()>,
    on_ready: impl FnOnce(SocketAddr, SocketAddr),
) -> anyhow::Result<()> {
    let cfg = match net {
        Net::Os => cfg.resolve_names().await.map_err(anyhow::Error::msg)?,
        Net::Mem(_) => cfg,
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    if matches!(net, Net::Os) {
        cfg.check_exposure().map_err(anyhow::Error::msg)?;
    }
    let key = cfg.cluster_key_file.as_deref().map(ClusterKey::read).transpose().map_err(anyhow::Error::msg)?;
    let tls = crate::tls::files(&cfg.tls_cert, &cfg.tls_key, &cfg.tls_ca)?;
    let auth = match (&cfg.auth_file, &key) {
        (Some(f), Some(k)) => Some(Arc::new(Auth::open(f, k).map_err(anyhow::Error::msg)?)),
        _ => None,
    };
    match &auth {
        Some(a) => {
            info!(tokens = a.tokens(), "authentication on: bearer tokens with roles, node credential between nodes")
        }
        None if cfg.insecure => warn!(
            "INSECURE: no --auth-file; every RPC, the Internal and Handoff services included, is open to anyone who reaches the port"
        ),
        None => info!("no --auth-file: serving on loopback only, every RPC open"),
    }
    let dir = cfg.data_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    let log_dir = dir.join("drivers");
    let (cores, parked) = restore(&cfg, &log_dir)?;
    let log = DriverLog::open(&log_dir).context("opening the driver log")?;
    let limits = LogLimits { segment_bytes: cfg.log_segment_bytes, compact_bytes: cfg.log_compact_bytes };
    // Batches on disk are teed to the replicator (driver fixes to the replicas).
    let (tee_tx, tee_rx) = tokio::sync::mpsc::channel(8 * cfg.shards.max(1));
    let tee_dropped = Arc::new(AtomicBool::new(false));
    let tee = (cfg.replicas > 0).then(|| (tee_tx, tee_dropped.clone()));
    // Every accepted fix, per partition, for `--history-retention`.
    let history = if cfg.history_retention.is_zero() {
        None
    } else {
        let h = HistoryStore::open(
            &dir.join("history"),
            HistoryConfig {
                retention_ms: cfg.history_retention.as_millis() as i64,
                pull_max: (cfg.history_pull_mib as usize) << 20,
            },
        )
        .context("opening the history")?;
        let h = Arc::new(h);
        h.start_upkeep();
        Some(h)
    };
    let persister = Persister::start(log, limits, cfg.shards, 2 * cfg.shards, tee, history.clone());
    let index = Arc::new(SecondaryIndex::default());
    // Claims, trips and their timers: small, low-rate, durable (sled).
    let db = sled::Config::new()
        .path(dir.join("meta"))
        .cache_capacity(16 << 20)
        .open()
        .context("opening the trips/claims store")?;
    let store: Arc<dyn RecordStore> = Arc::new(SledStore::open(db).context("opening the record store")?);
    let claims = store.records("claims").context("opening the claims")?;
    let bus = crate::events::bus();
    let (trip_fix_tx, trip_fix_rx) = tokio::sync::mpsc::channel(8192);
    // The minority rule's lease: keyed requests, shard timers and trip timers read it.
    let quorum = Arc::new(Lease::default());
    let hooks = Hooks {
        claims: Some(claims.clone()),
        trip_fixes: Some(trip_fix_tx),
        events: Some(bus.clone()),
        lease: Some(quorum.clone()),
    };
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
    let ticker = crate::tasks::spawn("ticker", async move {
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
    // Claims, trips and drivers of the parked copy come back through the hand-off task.
    let (sd_tx, sd_rx) = watch::channel(false);
    let limits = Limits { max_future_ms: cfg.max_future_skew.as_millis() as i64 };

    // Addresses first: the gossip metadata carries them.
    let http_listener = TcpListener::bind(cfg.http_addr).await.with_context(|| format!("binding {}", cfg.http_addr))?;
    let http_addr = http_listener.local_addr()?;
    let (incoming, grpc_addr, transport, beats, gossip_addr, inbox): (_, _, Arc<dyn Transport>, _, _, _) = match &net {
        Net::Os => {
            let listener =
                TcpListener::bind(cfg.grpc_addr).await.with_context(|| format!("binding {}", cfg.grpc_addr))?;
            let grpc_addr = listener.local_addr()?;
            let (t, gossip_addr, inbox) = UdpTransport::bind(cfg.gossip_addr, key.as_ref().map(ClusterKey::gossip_key))
                .await
                .with_context(|| format!("binding gossip {}", cfg.gossip_addr))?;
            (Incoming::Tcp(listener), grpc_addr, Arc::new(t.clone()), t.heartbeats(), gossip_addr, inbox)
        }
        Net::Mem(mem) => {
            let incoming = Incoming::Mem(Box::pin(mem.listen(cfg.grpc_addr, cfg.gossip_addr)));
            let (t, inbox) = mem.endpoint(cfg.gossip_addr);
            (incoming, cfg.grpc_addr, Arc::new(t.clone()), t.heartbeats(), cfg.gossip_addr, inbox)
        }
    };
    let seeds = resolve_seeds(&cfg.join, gossip_addr).await;
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
        probe_period: cfg.probe_period,
        rebroadcast_every: Duration::from_secs(5),
    };
    let members = membership::spawn(mcfg, transport, inbox);
    let (routes_tx, routes_rx) = watch::channel(Arc::new(Routes::empty(gossip_addr)));
    let mut cluster = Cluster::new(members.view.clone(), routes_rx, cfg.scatter_timeout, quorum.clone());
    if let Net::Mem(mem) = &net {
        cluster = cluster.with_connector(mem.connector(gossip_addr));
    }
    if let (Some(k), Some(_)) = (&key, &auth) {
        cluster = cluster.with_credential(bearer_value(&k.node_credential())?);
    }
    if let Some(t) = &tls {
        cluster = cluster.with_tls(t.peer_client());
    }
    let cluster = Arc::new(cluster);
    let ready = Arc::new(crate::health::Readiness::default());
    let member_metrics = crate::tasks::spawn("member_metrics", follow_members(members.view.clone(), cluster.clone()));

    // The hand-off protocol's calls on other nodes.
    let link: Arc<dyn PeerLink> = match &net {
        Net::Mem(mem) if mem.direct_links() => Arc::new(MemPeerLink::new(mem.clone(), gossip_addr)),
        _ => Arc::new(GrpcPeerLink::new(cluster.clone())),
    };
    let replicator = Replicator::new(
        gossip_addr,
        cfg.replicas as usize,
        cfg.replica_timeout,
        claims.clone(),
        store.records("trips").context("opening the trips")?,
        router.clone(),
        cluster.clone(),
        link.clone(),
        tee_dropped,
    );
    replicator.set_degraded_writes(cfg.degraded_writes);
    let replication = crate::tasks::spawn("replication", replicator.clone().run(tee_rx));
    let dispatch = Arc::new(Dispatcher::new(router.clone(), store.clone(), replicator.clone(), cfg.offer_timeout));
    // Claims for drivers other nodes own go there over gRPC.
    dispatch.set_link(Arc::new(ClaimForwarder::new(cluster.clone())));
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
        .unwrap_or_else(|| {
            let scheme = if tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}", advertised(http_addr, gossip_addr))
        })
        .trim_end_matches('/')
        .to_string();
    let trips = Trips::new(
        store.clone(),
        trip_cfg,
        public_url,
        bus.clone(),
        dispatch.clone(),
        cfg.watch_queue,
        replicator.clone(),
        quorum,
    )
    .context("opening the trips tree")?;
    if let Some(h) = &history {
        replicator.set_history(h.clone());
        trips.set_history(crate::actors::HistorySink::start(persister.sender()));
    }
    let handoff = Handoff::open(
        gossip_addr,
        store.clone(),
        parked,
        cluster.clone(),
        router.clone(),
        trips.clone(),
        claims.clone(),
        routes_tx,
        ready.clone(),
        (cfg.trail_len as usize).saturating_sub(1),
        replicator,
        link,
    )
    .await
    .context("opening the ownership table")?;
    handoff.set_pace(cfg.handoff_pace);
    if let Some(h) = &history {
        handoff.set_history(h.clone());
    }
    if let Net::Mem(mem) = &net {
        let service: Arc<dyn std::any::Any + Send + Sync> = handoff.clone();
        mem.serve(grpc_addr, gossip_addr, Arc::downgrade(&service));
    }
    let view = members.view.borrow().clone();
    handoff.round(&view).await;
    let handoff_task = crate::tasks::spawn("handoff", handoff.clone().run(members.view.clone()));
    let backfill_task = crate::tasks::spawn("history_backfill", handoff.clone().run_backfill());
    // The minority rule's lease: well inside failure detection (a cut-off node stands
    // down before the others declare it down and promote its replicas).
    let quorum_task =
        crate::tasks::spawn("quorum", handoff.clone().run_quorum(beats, cfg.suspect_timeout / 2, members.view.clone()));
    let feed = crate::tasks::spawn("trip_feed", crate::api::run_feed(trip_fix_rx, trips.clone(), cluster.clone()));

    let leave = Arc::new(Notify::new());
    let watches = crate::limits::Slots::new("watches", "--max-watches", cfg.max_watches);
    let api = Arc::new(
        LocationsApi::new(router.clone(), cluster.clone(), limits, cfg.watch_queue, sd_rx.clone())
            .with_watch_slots(watches.clone())
            .with_history(history.clone()),
    );
    let svc = LocationsServer::from_arc(api.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let trips_svc =
        TripsServer::new(TripsApi::new(trips.clone(), cluster.clone(), sd_rx.clone()).with_watch_slots(watches));
    // Matches find their candidates with a cluster-wide Nearby.
    dispatch.set_candidates(Arc::new(crate::api::NearbyCandidates(api.clone())));
    let dispatch_svc = DispatchServer::new(DispatchApi::new(trips.clone(), cluster.clone()));
    let udp_keys = crate::udp::Keys::new(key.as_ref().map(|k| k.udp_master()).as_ref().map(|m| &m[..]));
    let udp_socket = match (cfg.udp_addr, &net) {
        (Some(a), Net::Os) => Some(Arc::new(
            crate::udp::ingest::bind(a, cfg.udp_recv_buffer_mib << 20)
                .with_context(|| format!("binding --udp-addr {a}"))?,
        )),
        _ => None,
    };
    let udp_addr = udp_socket.as_ref().and_then(|s| s.local_addr().ok());
    let udp_owner = Arc::new(crate::udp::ingest::OwnerSide { router: router.clone(), limits });
    let sessions_svc = SessionsServer::new(SessionsApi::new(
        router.clone(),
        cluster.clone(),
        udp_keys.clone(),
        udp_addr.map(|a| a.to_string()).unwrap_or_default(),
    ));
    let udp_task = udp_socket.map(|s| {
        let fwd = Arc::new(crate::api::UdpForwarder);
        crate::tasks::spawn(
            "udp_receive",
            crate::udp::ingest::run(s, udp_keys, cluster.clone(), udp_owner.clone(), fwd),
        )
    });
    // Event and fix subscriptions count against one `--max-subscriptions`.
    let subscriptions = crate::limits::Slots::new("subscriptions", "--max-subscriptions", cfg.max_subscriptions);
    let fixes = Arc::new(FixesApi::new(history.clone(), cluster.clone(), subscriptions.clone()));
    let events_svc = EventsServer::new(
        EventsApi::new(bus.clone(), cluster.clone(), cfg.max_subscriptions)
            .with_subscription_slots(subscriptions)
            .with_history(fixes.clone()),
    );
    let fixes_svc = FixesServer::from_arc(fixes.clone());
    let map_source = crate::map::MapSource::new(router.clone(), trips.clone(), cluster.clone());
    let internal_svc = InternalServer::new(
        InternalApi::new(dispatch.clone(), trips.clone(), map_source.clone(), udp_owner.clone()).with_fixes(fixes),
    );
    let map_http = crate::http::map::MapHttp::new(map_source, auth.clone());
    let share = Arc::new(crate::http::Share {
        trips: trips.clone(),
        cluster: cluster.clone(),
        per_client: RateLimiter::new(1 << 16, cfg.share_client_rate, 2.0 * cfg.share_client_rate),
        per_token: RateLimiter::new(1 << 16, cfg.share_token_rate, 2.0 * cfg.share_token_rate),
        proxies: crate::http::proxies::Trusted::parse(&cfg.trusted_proxies).map_err(anyhow::Error::msg)?,
    });
    let handoff_svc = HandoffServer::new(HandoffApi::new(handoff.clone()))
        .max_decoding_message_size(MAX_HANDOFF_BYTES)
        .max_encoding_message_size(MAX_HANDOFF_BYTES);
    let admin = ClusterServer::new(ClusterApi::new(cluster.clone(), leave.clone(), handoff.clone(), members.clone()));
    let health = crate::health::serve_health(&ready, sd_rx.clone());
    let (reflection_v1, reflection_v1alpha) = crate::health::reflection()?;
    let mut sd = sd_rx.clone();
    let mut server = tonic::transport::Server::builder();
    if let Some(t) = &tls {
        server = server.tls_config(t.grpc_server(cfg.http_header_timeout)).context("the gRPC TLS configuration")?;
    }
    let grpc = server
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .max_concurrent_streams(Some(cfg.grpc_max_streams))
        // Streams a client resets before the server took them up: h2's default of 20
        // ends the whole connection beyond that, and nodes share one connection per
        // peer, so a burst of cancelled calls (a loaded node, callers giving up) cut
        // every call between two nodes. Still bounded (the rapid-reset attack).
        .http2_max_pending_accept_reset_streams(Some(1024))
        .layer(crate::tasks::ScopeLayer(crate::tasks::Scope::current()))
        .layer(
            AuthLayer::new(auth.clone(), &[crate::routing::cluster::HOP_KEY, crate::routing::cluster::SCOPE_KEY])
                .with_node_certificates(tls.is_some()),
        )
        .add_service(svc)
        .add_service(admin)
        .add_service(trips_svc)
        .add_service(dispatch_svc)
        .add_service(sessions_svc)
        .add_service(events_svc)
        .add_service(fixes_svc)
        .add_service(internal_svc)
        .add_service(handoff_svc)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let stopping = async move {
        let _ = sd.wait_for(|s| *s).await;
    };
    let grpc_task = match incoming {
        Incoming::Tcp(listener) => {
            // serve_with_incoming does not apply the builder's TCP options: set them per socket.
            let conns = TcpListenerStream::new(listener).map(|s| {
                s.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            });
            crate::tasks::spawn("grpc", grpc.serve_with_incoming_shutdown(conns, stopping))
        }
        Incoming::Mem(conns) => crate::tasks::spawn("grpc", grpc.serve_with_incoming_shutdown(conns, stopping)),
    };
    let mut sd = sd_rx.clone();
    let http_limits =
        crate::http::HttpLimits { max_connections: cfg.http_max_connections, header_timeout: cfg.http_header_timeout };
    let acceptor = tls.as_ref().map(|t| t.http_acceptor()).transpose()?;
    let http = crate::http::serve(
        http_listener,
        ready.clone(),
        Some(share),
        Some(map_http),
        http_limits,
        acceptor,
        async move {
            let _ = sd.wait_for(|s| *s).await;
        },
    );
    let http_task = crate::tasks::spawn("http", http);
    let reload = auth.clone().map(|a| crate::tasks::spawn("auth_reload", reload_on_sighup(a)));
    let udp = udp_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
    info!(node = %cfg.node_name, tls = tls.is_some(), grpc = %grpc_addr, http = %http_addr, gossip = %gossip_addr, udp = %udp, shards = cfg.shards, data = %dir.display(), "locus node serving");
    on_ready(grpc_addr, http_addr);

    tokio::select! {
        _ = stop => info!("shutting down: leaving the cluster"),
        _ = leave.notified() => info!("leaving the cluster on request"),
    }
    // Peers take this node's partitions over while it still serves.
    members.announce_leaving().await;
    let t0 = Instant::now();
    while !handoff.drained().await {
        if t0.elapsed() >= cfg.handoff_timeout {
            warn!(
                waited_s = t0.elapsed().as_secs(),
                "partitions not handed over in time; stopping anyway (they stay parked here)"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (active, lent, parked) = handoff.counts().await;
    info!(active, lent, parked, ms = t0.elapsed().as_millis() as u64, "hand-off done; leaving the gossip");
    if tokio::time::timeout(cfg.leave_wait + Duration::from_secs(1), members.leave()).await.is_err() {
        warn!("leaving the gossip took too long; stopping anyway");
    }
    handoff_task.abort();
    backfill_task.abort();
    quorum_task.abort();
    replication.abort();
    member_metrics.abort();
    if let Some(r) = reload {
        r.abort();
    }
    info!("shutting down: draining RPCs");
    // No new UDP fixes from here on (the apps resend to another node).
    if let Some(t) = udp_task {
        t.abort();
    }
    ready.set(false);
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
    trips.close_history().await;
    tokio::task::spawn_blocking(move || persister.stop(Duration::from_secs(30))).await?;
    if let Err(e) = store.flush().await {
        warn!(error = %e, "flushing the trips/claims store");
    }
    // What is still running (long-lived tasks end with the runtime): a leak shows here.
    let live: Vec<String> = crate::tasks::live().into_iter().map(|(k, n)| format!("{k}={n}")).collect();
    info!(tasks = %live.join(" "), "stopped cleanly");
    Ok(())
}

/// Reads the auth file again on every SIGHUP; a file that does not parse leaves the
/// tokens in force as they were.
async fn reload_on_sighup(auth: Arc<Auth>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => return warn!(error = %e, "cannot install the SIGHUP handler: the auth file will not reload"),
    };
    while hup.recv().await.is_some() {
        match auth.reload() {
            Ok(n) => {
                metrics::counter!("locus_auth_reloads_total", "result" => "ok").increment(1);
                info!(tokens = n, "auth file reloaded")
            }
            Err(e) => {
                metrics::counter!("locus_auth_reloads_total", "result" => "error").increment(1);
                warn!(error = %e, "auth file not reloaded; the tokens in force stay")
            }
        }
    }
}

/// Where the gRPC server accepts connections: TCP, or the in-process network.
enum Incoming {
    Tcp(TcpListener),
    Mem(std::pin::Pin<Box<dyn tokio_stream::Stream<Item = std::io::Result<crate::memnet::MemConn>> + Send>>),
}
