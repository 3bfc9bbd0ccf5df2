//! Driver claims across the cluster: claim, confirm and release, run by the driver's
//! actor on the driver's owner node.
//!
//! A claim is a compare-and-set in the driver's shard (AVAILABLE → DISPATCHED for one
//! trip), so two trips can never hold one driver: the shard handles one message at a
//! time. The shard writes the claim to the `claims` tree in order; the owner flushes it
//! before answering, so an acknowledged claim survives a crash, and its offer timeout (a
//! timer in the shard, rebuilt from the stored due time on restart) releases it unless
//! the trip confirms with DRIVER_ASSIGNED. It is on the partition's replicas before the
//! answer too (`replica`), so the owner's crash does not lose it.
//!
//! `Match` runs in the trip's actor on the trip's owner (see `trips`), so a trip has at
//! most one current [`Offer`]: a retried `Match` gets the pending offer back and claims
//! nobody new. The actor calls [`Dispatcher::find`], which asks for the nearest
//! AVAILABLE drivers (through [`Candidates`]: `api` runs the scatter-gather Nearby) and
//! claims them in order until one succeeds. Trip actors confirm and release through the
//! dispatcher too.
//!
//! This module speaks no gRPC: a claim for a driver another node owns goes through a
//! [`ClaimLink`] (`api` implements it over the `Internal` service), and errors are a
//! [`DispatchError`] that `api` maps to a status in one place.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::actors::decode_claim;
use crate::clock::wall_ms;
use crate::drivers::{Claim, ClaimError, ClaimOk};
use crate::geo::haversine_m;
use crate::replica::{KvTree, Replicator};
use crate::routing::{RouteError, Router};
use crate::storage::{Pair, RecordStore};

/// What a claim call does to a driver's claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOp {
    /// AVAILABLE → DISPATCHED for this trip (of this vehicle type, if not empty).
    Claim { vehicle_type: String },
    /// DRIVER_ASSIGNED: the claim holds from now on.
    Confirm,
    /// The trip ended: free the driver if it is still claimed for it.
    Release,
}

/// One claim operation on one driver for one trip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimCall {
    pub op: ClaimOp,
    pub driver_id: String,
    pub trip_id: String,
}

/// The owner's answer. `ok == false`: `reason` says why (`not_found`,
/// `not_available`, `claimed`, `not_claimed`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClaimAnswer {
    pub ok: bool,
    pub reason: String,
    pub lat: f64,
    pub lon: f64,
    pub vehicle_type: String,
    pub offer_expires_ms: i64,
}

/// Why a claim operation did not run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// The driver is unknown (no recent fix), removed or expired.
    #[error("{0}")]
    NotFound(String),
    /// The driver's owner is busy: retry later.
    #[error("{0}")]
    Overloaded(String),
    /// The driver's owner cannot be reached or is moving: retry.
    #[error("{0}")]
    Unavailable(String),
    /// The driver cannot take this trip (unknown to Locus, or claimed for another).
    #[error("{0}")]
    Refused(String),
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
}

impl From<RouteError> for DispatchError {
    fn from(e: RouteError) -> Self {
        match e {
            RouteError::NotFound => DispatchError::NotFound(e.to_string()),
            RouteError::Overloaded => DispatchError::Overloaded(e.to_string()),
            RouteError::Unavailable => DispatchError::Unavailable(e.to_string()),
        }
    }
}

pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Nearby rounds a match makes when every candidate was taken meanwhile.
const MATCH_ROUNDS: usize = 3;
/// How long a match waits to free a claim whose answer was lost.
const RELEASE_WAIT: Duration = Duration::from_secs(1);

/// A validated `Match`: the pickup, how far to look, for which vehicle type.
#[derive(Clone, Debug, PartialEq)]
pub struct MatchAsk {
    pub trip_id: String,
    pub lat: f64,
    pub lon: f64,
    pub radius_m: f64,
    /// Empty: any.
    pub vehicle_type: String,
    /// How many of the nearest candidates to try per round.
    pub limit: u32,
}

/// A trip's current offer: the driver claimed for it, until `expires_ms` unless
/// DRIVER_ASSIGNED confirms it. Kept in the trip's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub driver_id: String,
    /// The driver's position when claimed.
    pub lat: f64,
    pub lon: f64,
    pub vehicle_type: String,
    /// Great-circle distance from the pickup, metres.
    pub distance_m: f64,
    pub expires_ms: i64,
}

/// What [`Dispatcher::find`] claimed, and after how many claims.
#[derive(Clone, Debug, PartialEq)]
pub struct Found {
    pub offer: Offer,
    pub attempts: u32,
}

/// How the dispatcher finds the nearest AVAILABLE drivers for a match (`api` asks every
/// node: a scatter-gather Nearby).
pub trait Candidates: Send + Sync + 'static {
    /// Up to `limit` AVAILABLE drivers of the ask's vehicle type within its radius,
    /// nearest first.
    fn nearest(&self, ask: &MatchAsk, limit: u32) -> Pending<'_, Result<Vec<String>, DispatchError>>;
}

/// How a claim call reaches the driver's owner.
pub trait ClaimLink: Send + Sync + 'static {
    /// `None`: this node owns the driver, run it here. `Some`: the owner's answer, after
    /// the call was forwarded there (with `hop` forwards so far).
    fn remote(&self, call: &ClaimCall, hop: u32) -> Pending<'_, Result<Option<ClaimAnswer>, DispatchError>>;
}

pub struct Dispatcher {
    router: Arc<Router>,
    link: OnceLock<Arc<dyn ClaimLink>>,
    candidates: OnceLock<Arc<dyn Candidates>>,
    store: Arc<dyn RecordStore>,
    replicator: Arc<Replicator>,
    /// How long a claim waits for DRIVER_ASSIGNED.
    pub offer_timeout: Duration,
}

/// Claims as (driver id, stored claim) pairs, decoded; unreadable ones are skipped.
pub fn decode_claims(pairs: Vec<Pair>) -> Vec<(String, Claim)> {
    pairs.into_iter().filter_map(|(k, v)| Some((String::from_utf8(k).ok()?, decode_claim(&v)?))).collect()
}

fn answer(r: Result<ClaimOk, ClaimError>) -> ClaimAnswer {
    match r {
        Ok(ok) => ClaimAnswer {
            ok: true,
            reason: String::new(),
            lat: ok.pos.lat,
            lon: ok.pos.lon,
            vehicle_type: ok.vehicle_type,
            offer_expires_ms: ok.offer_due_ms.unwrap_or(0),
        },
        Err(e) => ClaimAnswer { ok: false, reason: e.reason().into(), ..Default::default() },
    }
}

impl Dispatcher {
    pub fn new(
        router: Arc<Router>,
        store: Arc<dyn RecordStore>,
        replicator: Arc<Replicator>,
        offer_timeout: Duration,
    ) -> Dispatcher {
        Dispatcher { router, link: OnceLock::new(), candidates: OnceLock::new(), store, replicator, offer_timeout }
    }

    /// Connects the dispatcher to the cluster (once, at startup). Until then every
    /// driver counts as local.
    pub fn set_link(&self, link: Arc<dyn ClaimLink>) {
        let _ = self.link.set(link);
    }

    /// Connects the dispatcher to the cluster-wide Nearby (once, at startup).
    pub fn set_candidates(&self, c: Arc<dyn Candidates>) {
        let _ = self.candidates.set(c);
    }

    /// Claims the nearest AVAILABLE driver for the ask, skipping `skip` (drivers that
    /// declined this trip): candidates in distance order, a new Nearby round when every
    /// one was taken meanwhile. `NotFound` when nobody free is within the radius.
    pub async fn find(&self, ask: &MatchAsk, skip: &[String]) -> Result<Found, DispatchError> {
        let near =
            self.candidates.get().ok_or_else(|| DispatchError::Unavailable("the node is starting; retry".into()))?;
        // Drivers whose claim answer was lost and whose release was not confirmed: a
        // late release could free them after a re-claim, so this match leaves them.
        let mut unsure: Vec<String> = Vec::new();
        let mut attempts = 0;
        for round in 0..MATCH_ROUNDS {
            let want = ask.limit + (skip.len() + unsure.len()) as u32;
            let ids = near.nearest(ask, want).await?;
            let ids: Vec<String> =
                ids.into_iter().filter(|d| !skip.contains(d) && !unsure.contains(d)).take(ask.limit as usize).collect();
            if ids.is_empty() {
                let why = match (round, skip.is_empty()) {
                    (0, true) => "no AVAILABLE driver within the radius",
                    (0, false) => "no AVAILABLE driver within the radius but those who declined this trip",
                    _ => "every candidate was taken meanwhile",
                };
                return Err(DispatchError::NotFound(why.into()));
            }
            for id in ids {
                attempts += 1;
                match self.claim(&id, &ask.trip_id, &ask.vehicle_type).await {
                    Ok(c) if c.ok => {
                        let offer = Offer {
                            distance_m: haversine_m(ask.lat, ask.lon, c.lat, c.lon),
                            driver_id: id,
                            lat: c.lat,
                            lon: c.lon,
                            vehicle_type: c.vehicle_type,
                            expires_ms: c.offer_expires_ms,
                        };
                        return Ok(Found { offer, attempts });
                    }
                    Ok(c) => debug!(driver = %id, reason = %c.reason, "claim refused; trying the next"),
                    Err(e) => {
                        debug!(driver = %id, error = %e, "claim failed; trying the next");
                        if matches!(e, DispatchError::Unavailable(_)) {
                            // The claim may have been taken all the same (written on the
                            // owner, not confirmed): free it now rather than at its offer
                            // timeout. Awaited; if unconfirmed, the driver is left alone
                            // for the rest of this match.
                            let freed = tokio::time::timeout(RELEASE_WAIT, self.release(&id, &ask.trip_id)).await;
                            if !matches!(freed, Ok(Ok(()))) {
                                unsure.push(id);
                            }
                        }
                    }
                }
            }
        }
        Err(DispatchError::NotFound("every candidate was taken meanwhile".into()))
    }

    /// Runs a claim operation on this node (its owner), durable before it answers.
    pub async fn local(&self, c: ClaimCall) -> Result<ClaimAnswer, DispatchError> {
        let id = c.driver_id.clone();
        let resp = match c.op {
            ClaimOp::Claim { vehicle_type } => {
                let due = wall_ms() + self.offer_timeout.as_millis() as i64;
                answer(self.router.claim(c.driver_id, c.trip_id, vehicle_type, due).await?)
            }
            ClaimOp::Confirm => answer(self.router.confirm(c.driver_id, c.trip_id).await?),
            ClaimOp::Release => {
                let freed = self.router.release(c.driver_id, c.trip_id).await?;
                ClaimAnswer { ok: freed, reason: if freed { "" } else { "not_claimed" }.into(), ..Default::default() }
            }
        };
        if resp.ok {
            self.store.flush().await.map_err(|e| DispatchError::Unavailable(format!("persisting the claim: {e}")))?;
            // On the replicas too before the answer: the claim (and its offer timer)
            // survives this node's crash.
            self.replicator
                .sync_kv(KvTree::Claims, id.as_bytes())
                .await
                .map_err(|e| DispatchError::Unavailable(e.to_string()))?;
        }
        Ok(resp)
    }

    /// Runs a claim operation on the driver's owner, wherever it is.
    pub async fn call(&self, c: ClaimCall, hop: u32) -> Result<ClaimAnswer, DispatchError> {
        if let Some(link) = self.link.get()
            && let Some(a) = link.remote(&c, hop).await?
        {
            return Ok(a);
        }
        self.local(c).await
    }

    pub async fn claim(
        &self,
        driver_id: &str,
        trip_id: &str,
        vehicle_type: &str,
    ) -> Result<ClaimAnswer, DispatchError> {
        let op = ClaimOp::Claim { vehicle_type: vehicle_type.into() };
        self.call(ClaimCall { op, driver_id: driver_id.into(), trip_id: trip_id.into() }, 0).await
    }

    /// DRIVER_ASSIGNED: the driver's claim for this trip holds from now on.
    pub async fn confirm(&self, driver_id: &str, trip_id: &str) -> Result<(), DispatchError> {
        let c = ClaimCall { op: ClaimOp::Confirm, driver_id: driver_id.into(), trip_id: trip_id.into() };
        let resp = self.call(c, 0).await?;
        match resp.reason.as_str() {
            _ if resp.ok => Ok(()),
            "not_found" => Err(DispatchError::Refused(format!(
                "driver {driver_id:?} is unknown to Locus (no recent fix); it cannot be assigned"
            ))),
            _ => Err(DispatchError::Refused(format!("driver {driver_id:?} is claimed for another trip"))),
        }
    }

    /// The trip ended: free the driver if it is still claimed for it.
    pub async fn release(&self, driver_id: &str, trip_id: &str) -> Result<(), DispatchError> {
        let c = ClaimCall { op: ClaimOp::Release, driver_id: driver_id.into(), trip_id: trip_id.into() };
        self.call(c, 0).await.map(|_| ())
    }
}
