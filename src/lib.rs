//! Locus: a cluster that tracks vehicles in real time.
//!
//! Gateways stream drivers' GPS fixes in; apps and dispatch services read drivers, ask
//! who is nearest, and follow a driver live. Every operation is keyed by a driver, and
//! each key has exactly one owner node, where one shard handles its messages one at a
//! time. Nodes form a SWIM gossip ring; any node accepts any request.
//!
//! # Layout
//!
//! ```text
//!  membership (foca task) ──publishes──► ClusterView { members, ring::Ring }
//!                                              │
//!  handoff (task + Handoff service): survey holdings, ownership::plan, pull / lend /
//!    release partitions at rising epochs (records `partitions`), promote replicas of a
//!    lost owner, stand stale copies down; the quorum lease (minority rule) ──publishes──► Routes
//!  replica: served partitions ──► their next ring successors (claims and trip events
//!    acked before the answer; driver-log batches teed once on disk)
//!                                              │
//!  gRPC (api) ──► routing::cluster: routes(key) ┴─ another node ──► forward (hop ≤ 3)
//!                     │ this node (incoming: via   geo, cab lookups ──► scatter, merge
//!                     │ its holder, or wait)
//!                     ▼
//!                 routing::Router ──► actors (shard workers, tokio tasks)
//!                     │   keyed: to the key's shard      │ owns drivers::DriverShard
//!                     │   geo: scatter to all, merge     │   ├─ per-driver state + trail
//!                     └─ SecondaryIndex (cab, session)   │   ├─ geo::GeoIndex (R-tree per status)
//!                                                        │   └─ expiry schedule
//!                                                        ▼
//!                  storage::Persister (group commit) ──► driver log (append-only segments)
//!
//!  Trips / Dispatch / Events (api::trips; the domain modules below speak no gRPC):
//!    Match ──► trip's owner: trip actor (one offer) ──► dispatch::Dispatcher::find ──►
//!          Nearby(AVAILABLE) ──► ClaimLink ──► driver's owner
//!    Apply ──► trips::Trips ──► one actor task per trip ──► records `trips` (TTL in the record)
//!    shards ──► records `claims` · fixes of assigned drivers ──► trip feed · events::Bus
//!    storage::RecordStore (sled; an in-memory twin): claims, trips, ownership table by partition
//!    http: GET /share/{token} ──► owner's trips::share::ShareTable (pre-rendered JSON)
//!    http: GET /map/data ──► map::MapSource ──► Internal.MapPart on every node ──► shards'
//!          grid counts / points + trips::board (live trips' sketches), merged as JSON
//!
//!  history: shards' accepted fixes ──► Persister ──► history::HistoryStore (per partition,
//!    positions (epoch, seq)) ──► replicas; moved in hand-offs ◄── api::history: GetHistory,
//!    Fixes.Subscribe (each node its partitions, merged on the gateway) ◄── export (PostgreSQL)
//! ```
//!
//! - [`api`]: `locus.v1.Locations` (keyed → owner, geo → scatter), `locus.v1.Cluster`,
//!   and `Sessions`, `Trips`, `Dispatch`, `Events`, `Internal`; validation; domain ↔ protobuf and
//!   errors → `Status`, in one place per service; watches that follow their key across
//!   moves (`api::follow`); the claim link and the trip feed between nodes.
//! - [`trips`]: trip actors on the trip's owner, the pure trip state machine, share
//!   tokens, the share table and rate limiter, the live trips' board; [`dispatch`]: driver claims, on the
//!   driver's owner through a `ClaimLink`; [`events`]: the per-node state-change bus.
//!   These three are domain code: their own types and errors, no gRPC.
//! - [`membership`]: SWIM gossip (foca) core and shell, node metadata, UDP transport and
//!   quorum heartbeats; publishes the cluster view. [`memnet`]: the in-process network
//!   (gossip and gRPC, links that can be cut) a whole cluster runs on in one process.
//! - [`ring`]: pure consistent-hash ring of virtual nodes over partitions.
//! - [`ownership`]: pure: the per-partition holding table with epochs, the hand-off
//!   planner, the holder's side of a pull, the routes every request reads, the quorum
//!   base and the quorum lease that requests and timers check; [`handoff`]: the shell
//!   that feeds it the view, surveys and `now` and moves a partition's drivers, claims
//!   and trips (with their timers) to its new owner; [`replica`]: copies of every
//!   served partition on its ring successors (the owner's links and the in-memory
//!   replica store), promoted when the owner is lost; [`peer`]: the protocol's calls on
//!   other nodes behind one trait (`api::GrpcPeerLink` over gRPC,
//!   `handoff::MemPeerLink` in memory).
//! - [`routing`]: key → owner node (`routing::cluster`, peers, hops) and → local shard.
//! - [`actors`]: shard worker tasks, mailboxes, watchers, persistence hand-off.
//! - [`drivers`]: pure driver state machines, validation, trail, snapshot codec, a
//!   shard's contribution to the live map (`drivers::map`).
//! - [`geo`]: pure great-circle geometry and the R-tree index (exact k-NN, circle, box).
//! - [`storage`]: the append-only driver log, its replay and compaction, the persister;
//!   the record store (a trait; sled and memory) of partition-keyed claims, trips and
//!   ownership table; a partition's state in transit.
//! - [`clock`]: the wall clock (ms since the epoch; simulated in paused time);
//!   [`tasks`]: every spawned task, counted by kind while it lives (`locus_tasks{kind}`),
//!   and grouped by node (`Scope`: killed or frozen together) where one process runs several.
//! - [`map`]: the operator's live map: a node's part and the gather over every node;
//!   the grid counts and points per shard are `drivers::map`; the endpoints and page
//!   are in `http::map`.
//! - [`udp`]: compact UDP fixes: the datagram, session ids and keys (pure), and
//!   `udp::ingest`, the socket shell and the owner's side; `api::SessionsApi` opens
//!   and closes sessions.
//! - [`history`]: every accepted fix per partition for `--history-retention`: the raw
//!   entries shards buffer and the compact blocks (`history::codec`), the per-partition
//!   segment files (`HistoryStore`); read by `api::history` (`GetHistory`,
//!   `Fixes.Subscribe`); [`export`]: `locus export postgres`, a consumer of the stream
//!   that copies it into PostgreSQL exactly once.
//! - [`limits`]: counted slots for what a client holds open (watches, subscriptions).
//! - [`keys`]: deterministic key hashing; partitions, the unit shards and nodes own
//!   (and `PartitionSet`, a bitmap of them).
//! - [`auth`]: bearer tokens with roles (hashed `--auth-file`, SIGHUP reload), the
//!   method → role policy, the cluster key and what derives from it (the node
//!   credential); the server layer and the client channel that carry them.
//! - [`tls`]: TLS for gRPC and HTTP, and mutual TLS between nodes (rustls).
//! - [`config`], [`node`]: flags and wiring (over TCP/UDP, or `memnet`), startup (the log is parked until handed
//!   over) and graceful shutdown (hand every partition over, then leave the gossip).
//! - [`http`]: health, readiness, Prometheus metrics and the public share endpoints, the live map;
//!   [`health`]: readiness (one writer) and the `grpc.health.v1` and reflection services.
//! - [`admin`]: the `locus admin` CLI; [`sim`]: the city simulator and load generator
//!   (owner-aware or not); [`bench`]: the benchmarks; [`chaos`]: the chaos suite (real
//!   processes on network namespaces, faults, a recorded history and its checker).
//! - [`pb`]: generated protobuf/gRPC code.

pub mod actors;
pub mod admin;
pub mod api;
pub mod auth;
pub mod bench;
pub mod chaos;
pub mod clock;
pub mod config;
pub mod dispatch;
pub mod drivers;
pub mod events;
pub mod export;
pub mod geo;
pub mod handoff;
pub mod health;
pub mod history;
pub mod http;
pub mod keys;
pub mod limits;
pub mod map;
pub mod membership;
pub mod memnet;
pub mod node;
pub mod ownership;
pub mod pb;
pub mod peer;
pub mod replica;
pub mod ring;
pub mod routing;
pub mod sim;
pub mod storage;
pub mod tasks;
pub mod tls;
pub mod trips;
pub mod udp;
