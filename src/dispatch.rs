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

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::actors::{decode_claim, wall_ms};
use crate::api::locations::{Target, forwarded, peer_status, target};
use crate::api::route_status;
use crate::drivers::{Claim, ClaimError, ClaimOk};
use crate::pb;
use crate::pb::internal_client::InternalClient;
use crate::replica::{KvTree, Replicator};
use crate::routing::Router;
use crate::routing::cluster::Cluster;
use crate::storage::Durable;

pub struct Dispatcher {
    router: Arc<Router>,
    cluster: Arc<Cluster>,
    durable: Durable,
    replicator: Arc<Replicator>,
    /// How long a claim waits for DRIVER_ASSIGNED.
    pub offer_timeout: Duration,
}

/// Partition `p`'s persisted claims, for its shard when this node starts serving it.
pub fn load_claims(tree: &sled::Tree, p: u16) -> Vec<(String, Claim)> {
    decode_claims(crate::storage::scan_partition(tree, p))
}

/// Claims as (driver id, stored claim) pairs, decoded; unreadable ones are skipped.
pub fn decode_claims(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(String, Claim)> {
    pairs.into_iter().filter_map(|(k, v)| Some((String::from_utf8(k).ok()?, decode_claim(&v)?))).collect()
}

fn answer(r: Result<ClaimOk, ClaimError>) -> pb::ClaimResponse {
    match r {
        Ok(ok) => pb::ClaimResponse {
            ok: true,
            reason: String::new(),
            lat: ok.pos.lat,
            lon: ok.pos.lon,
            vehicle_type: ok.vehicle_type,
            offer_expires_ms: ok.offer_due_ms.unwrap_or(0),
        },
        Err(e) => pb::ClaimResponse { ok: false, reason: e.reason().into(), ..Default::default() },
    }
}

impl Dispatcher {
    pub fn new(
        router: Arc<Router>,
        cluster: Arc<Cluster>,
        durable: Durable,
        replicator: Arc<Replicator>,
        offer_timeout: Duration,
    ) -> Dispatcher {
        Dispatcher { router, cluster, durable, replicator, offer_timeout }
    }

    /// Runs a claim operation on this node (its owner), durable before it answers.
    pub async fn local(&self, r: pb::ClaimRequest) -> Result<pb::ClaimResponse, Status> {
        let id = r.driver_id.clone();
        let resp = match pb::ClaimOp::try_from(r.op) {
            Ok(pb::ClaimOp::Claim) => {
                let due = wall_ms() + self.offer_timeout.as_millis() as i64;
                answer(self.router.claim(r.driver_id, r.trip_id, r.vehicle_type, due).await.map_err(route_status)?)
            }
            Ok(pb::ClaimOp::Confirm) => {
                answer(self.router.confirm(r.driver_id, r.trip_id).await.map_err(route_status)?)
            }
            Ok(pb::ClaimOp::Release) => {
                let freed = self.router.release(r.driver_id, r.trip_id).await.map_err(route_status)?;
                pb::ClaimResponse {
                    ok: freed,
                    reason: if freed { "" } else { "not_claimed" }.into(),
                    ..Default::default()
                }
            }
            _ => return Err(Status::invalid_argument("op: unknown claim operation")),
        };
        if resp.ok {
            self.durable.flush().await.map_err(|e| Status::unavailable(format!("persisting the claim: {e}")))?;
            // On the replicas too before the answer: the claim (and its offer timer)
            // survives this node's crash.
            self.replicator.sync_kv(KvTree::Claims, id.as_bytes()).await;
        }
        Ok(resp)
    }

    /// Runs a claim operation on the driver's owner, wherever it is.
    pub async fn call(&self, r: pb::ClaimRequest, hop: u32) -> Result<pb::ClaimResponse, Status> {
        match target(&self.cluster, &r.driver_id, hop).await? {
            Target::Local => self.local(r).await,
            Target::Forward(p, hop) => {
                let mut c = InternalClient::new(p.channel.clone());
                c.claim(forwarded(r, hop)).await.map(|r| r.into_inner()).map_err(|s| peer_status(&p, s))
            }
        }
    }

    pub async fn claim(&self, driver_id: &str, trip_id: &str, vehicle_type: &str) -> Result<pb::ClaimResponse, Status> {
        let r = pb::ClaimRequest {
            op: pb::ClaimOp::Claim as i32,
            driver_id: driver_id.into(),
            trip_id: trip_id.into(),
            vehicle_type: vehicle_type.into(),
        };
        self.call(r, 0).await
    }

    /// DRIVER_ASSIGNED: the driver's claim for this trip holds from now on.
    pub async fn confirm(&self, driver_id: &str, trip_id: &str) -> Result<(), Status> {
        let r = pb::ClaimRequest {
            op: pb::ClaimOp::Confirm as i32,
            driver_id: driver_id.into(),
            trip_id: trip_id.into(),
            vehicle_type: String::new(),
        };
        let resp = self.call(r, 0).await?;
        match resp.reason.as_str() {
            _ if resp.ok => Ok(()),
            "not_found" => Err(Status::failed_precondition(format!(
                "driver {driver_id:?} is unknown to Locus (no recent fix); it cannot be assigned"
            ))),
            _ => Err(Status::failed_precondition(format!("driver {driver_id:?} is claimed for another trip"))),
        }
    }

    /// The trip ended: free the driver if it is still claimed for it.
    pub async fn release(&self, driver_id: &str, trip_id: &str) -> Result<(), Status> {
        let r = pb::ClaimRequest {
            op: pb::ClaimOp::Release as i32,
            driver_id: driver_id.into(),
            trip_id: trip_id.into(),
            vehicle_type: String::new(),
        };
        self.call(r, 0).await.map(|_| ())
    }
}
