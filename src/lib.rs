//! Locus: a cluster that tracks vehicles in real time.
//!
//! Gateways stream drivers' GPS fixes in; apps and dispatch services read drivers, ask
//! who is nearest, and follow a driver live. Every operation is keyed by a driver, and
//! each key has exactly one owner that handles its messages one at a time.
//!
//! # Layout
//!
//! ```text
//!  gRPC (api) ──► routing::Router ──► actors (shard workers, tokio tasks)
//!                     │   keyed: to the key's shard      │ owns drivers::DriverShard
//!                     │   geo: scatter to all, merge     │   ├─ per-driver state + trail
//!                     └─ SecondaryIndex (cab, session)   │   ├─ geo::GeoIndex (R-tree per status)
//!                                                        │   └─ expiry schedule
//!                                                        ▼
//!                  storage::Persister (group commit) ──► driver log (append-only segments)
//! ```
//!
//! - [`api`]: the `locus.v1.Locations` service; validation; errors → `Status` in one place.
//! - [`routing`]: key → owner (a local shard today; a node once the cluster lands).
//! - [`actors`]: shard worker tasks, mailboxes, watchers, persistence hand-off.
//! - [`drivers`]: pure driver state machines, validation, trail, snapshot codec.
//! - [`geo`]: pure great-circle geometry and the R-tree index (exact k-NN, circle, box).
//! - [`storage`]: the append-only driver log, its replay and compaction, the persister.
//! - [`keys`]: deterministic key hashing; partitions, the unit shards (and later nodes) own.
//! - [`config`], [`node`]: flags and wiring, startup restore and graceful shutdown.
//! - [`http`]: health, readiness and Prometheus metrics.
//! - [`sim`]: the city simulator and load generator; [`bench`]: the benchmarks.
//! - [`pb`]: generated protobuf/gRPC code.

pub mod actors;
pub mod admin;
pub mod api;
pub mod bench;
pub mod config;
pub mod drivers;
pub mod geo;
pub mod http;
pub mod keys;
pub mod membership;
pub mod node;
pub mod pb;
pub mod ring;
pub mod routing;
pub mod sim;
pub mod storage;
