//! The `locus.v1.Handoff` service (node to node): holdings, pull, release, replicate. Validates
//! what peers send and hands it to [`crate::handoff::Handoff`].

use std::net::SocketAddr;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::handoff::{Handoff, holding_proto, partition_proto};
use crate::pb;

pub struct HandoffApi {
    handoff: Arc<Handoff>,
}

impl HandoffApi {
    pub fn new(handoff: Arc<Handoff>) -> Self {
        HandoffApi { handoff }
    }
}

fn requester(s: &str) -> Result<SocketAddr, Status> {
    s.parse().map_err(|_| Status::invalid_argument(format!("requester: {s:?} is not a gossip address (ip:port)")))
}

fn partitions(ps: &[u32]) -> Result<Vec<u16>, Status> {
    ps.iter()
        .map(|p| {
            u16::try_from(*p)
                .ok()
                .filter(|p| *p < crate::keys::PARTITIONS)
                .ok_or_else(|| Status::invalid_argument(format!("partitions: {p} is not a partition")))
        })
        .collect()
}

#[tonic::async_trait]
impl pb::handoff_server::Handoff for HandoffApi {
    async fn holdings(&self, req: Request<pb::HoldingsRequest>) -> Result<Response<pb::HoldingsResponse>, Status> {
        let req = req.into_inner();
        let requester = match req.requester.as_str() {
            "" => None,
            r => Some(r.parse().map_err(|_| Status::invalid_argument(format!("requester: {r:?} is not host:port")))?),
        };
        let holdings = self.handoff.holdings(requester).await.iter().map(holding_proto).collect();
        Ok(Response::new(pb::HoldingsResponse { holdings }))
    }

    async fn pull(&self, r: Request<pb::PullRequest>) -> Result<Response<pb::PullResponse>, Status> {
        let r = r.into_inner();
        let who = requester(&r.requester)?;
        let ps = partitions(&r.partitions)?;
        if ps.len() != r.epochs.len() {
            return Err(Status::invalid_argument(format!(
                "epochs: {} epochs for {} partitions (one each)",
                r.epochs.len(),
                ps.len()
            )));
        }
        let wanted: Vec<(u16, u64)> = ps.into_iter().zip(r.epochs).collect();
        let (data, refused) = self.handoff.lend(who, &wanted).await;
        Ok(Response::new(pb::PullResponse {
            partitions: data.into_iter().map(partition_proto).collect(),
            refused: refused.into_iter().map(|(p, reason)| pb::Refused { partition: p as u32, reason }).collect(),
        }))
    }

    async fn release(&self, r: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let r = r.into_inner();
        let who = requester(&r.requester)?;
        let ps = partitions(&r.partitions)?;
        let released = self.handoff.release(who, &ps).await as u32;
        Ok(Response::new(pb::ReleaseResponse { released }))
    }

    async fn replicate(&self, r: Request<pb::ReplicaBatch>) -> Result<Response<pb::ReplicaAck>, Status> {
        let r = r.into_inner();
        let who = requester(&r.from)?;
        let mut parts = Vec::with_capacity(r.parts.len());
        for p in r.parts {
            let n = p.partition;
            parts.push(
                crate::replica::part_from_proto(p)
                    .ok_or_else(|| Status::invalid_argument(format!("parts: {n} is not a partition")))?,
            );
        }
        let refused = self.handoff.replicate(who, r.session, parts);
        Ok(Response::new(pb::ReplicaAck {
            refused: refused.into_iter().map(|(p, reason)| pb::Refused { partition: p as u32, reason }).collect(),
        }))
    }
}
