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
//! `Match` (see `api::trips`) asks for the nearest AVAILABLE drivers and claims them in
//! order through [`Dispatcher::claim`]; trip actors confirm and release through it.
//!
//! This module speaks no gRPC: a claim for a driver another node owns goes through a
//! [`ClaimLink`] (`api` implements it over the `Internal` service), and errors are a
//! [`DispatchError`] that `api` maps to a status in one place.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::actors::decode_claim;
use crate::clock::wall_ms;
use crate::drivers::{Claim, ClaimError, ClaimOk};
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

/// How a claim call reaches the driver's owner.
pub trait ClaimLink: Send + Sync + 'static {
    /// `None`: this node owns the driver, run it here. `Some`: the owner's answer, after
    /// the call was forwarded there (with `hop` forwards so far).
    fn remote(&self, call: &ClaimCall, hop: u32) -> Pending<'_, Result<Option<ClaimAnswer>, DispatchError>>;
}

pub struct Dispatcher {
    router: Arc<Router>,
    link: OnceLock<Arc<dyn ClaimLink>>,
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
        Dispatcher { router, link: OnceLock::new(), store, replicator, offer_timeout }
    }

    /// Connects the dispatcher to the cluster (once, at startup). Until then every
    /// driver counts as local.
    pub fn set_link(&self, link: Arc<dyn ClaimLink>) {
        let _ = self.link.set(link);
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
