//! The `locus.v1.Cluster` admin service: members, key lookup, ring, graceful leave.
//! Answers from this node's [`ClusterView`]; `Leave` asks the node to shut down, which
//! leaves the gossip first (see `node`).

use std::sync::Arc;

use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use super::{check_key_str, invalid};
use crate::keys::{PARTITIONS, partition_of};
use crate::membership::{ClusterView, Liveness, MemberView, NodeState};
use crate::pb;
use crate::routing::cluster::Cluster;

/// The `locus.v1.Cluster` service.
pub struct ClusterApi {
    cluster: Arc<Cluster>,
    /// Notified to start a graceful shutdown (which leaves the cluster first).
    leave: Arc<Notify>,
}

impl ClusterApi {
    pub fn new(cluster: Arc<Cluster>, leave: Arc<Notify>) -> Self {
        ClusterApi { cluster, leave }
    }
}

/// Most successors a Lookup may ask for.
const MAX_SUCCESSORS: u32 = 16;

fn member_proto(v: &ClusterView, m: &MemberView) -> pb::Member {
    let meta = m.meta.as_ref();
    pb::Member {
        name: meta.map(|x| x.name.clone()).unwrap_or_default(),
        grpc_addr: meta.map(|x| x.grpc.to_string()).unwrap_or_default(),
        gossip_addr: m.addr.to_string(),
        http_addr: meta.map(|x| x.http.to_string()).unwrap_or_default(),
        liveness: match m.liveness {
            Liveness::Alive => pb::Liveness::Alive,
            Liveness::Suspect => pb::Liveness::Suspect,
            Liveness::Down => pb::Liveness::Down,
        } as i32,
        state: meta.map_or(pb::NodeState::Unspecified, |x| match x.state {
            NodeState::Joining => pb::NodeState::Joining,
            NodeState::Active => pb::NodeState::Active,
            NodeState::Leaving => pb::NodeState::Leaving,
        }) as i32,
        incarnation: m.incarnation,
        ring_checksum: meta.map_or(0, |x| x.ring_checksum),
        in_ring: v.ring.contains(&m.addr),
        is_self: m.addr == v.me,
    }
}

fn addr_member(v: &ClusterView, a: &std::net::SocketAddr) -> pb::Member {
    match v.member(a) {
        Some(m) => member_proto(v, m),
        None => pb::Member { gossip_addr: a.to_string(), in_ring: true, ..Default::default() },
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterApi {
    async fn members(&self, _req: Request<pb::MembersRequest>) -> Result<Response<pb::MembersResponse>, Status> {
        let v = self.cluster.view();
        Ok(Response::new(pb::MembersResponse {
            node: v.name_of(&v.me),
            ring_checksum: v.ring.checksum(),
            members: v.members.iter().map(|m| member_proto(&v, m)).collect(),
        }))
    }

    async fn lookup(&self, req: Request<pb::LookupRequest>) -> Result<Response<pb::LookupResponse>, Status> {
        let r = req.into_inner();
        check_key_str("key", &r.key).map_err(|e| invalid(&e))?;
        let n = match r.successors {
            0 => 3,
            n if n > MAX_SUCCESSORS => {
                let e = crate::drivers::FieldError::new("successors", format!("{n} is above {MAX_SUCCESSORS}"));
                return Err(invalid(&e));
            }
            n => n,
        };
        let v = self.cluster.view();
        let succ = v.ring.successors(r.key.as_bytes(), n as usize);
        Ok(Response::new(pb::LookupResponse {
            partition: partition_of(r.key.as_bytes()) as u32,
            owner: succ.first().map(|a| addr_member(&v, a)),
            successors: succ.iter().map(|a| addr_member(&v, a)).collect(),
            ring_checksum: v.ring.checksum(),
            key: r.key,
        }))
    }

    async fn ring_info(&self, _req: Request<pb::RingInfoRequest>) -> Result<Response<pb::RingInfoResponse>, Status> {
        let v = self.cluster.view();
        let members = v
            .ring
            .shares()
            .into_iter()
            .map(|(a, parts, share)| pb::RingMember {
                name: v.name_of(&a),
                gossip_addr: a.to_string(),
                grpc_addr: v.meta(&a).map(|m| m.grpc.to_string()).unwrap_or_default(),
                vnodes: v.ring.vnodes(),
                partitions: parts as u32,
                share,
            })
            .collect();
        Ok(Response::new(pb::RingInfoResponse {
            checksum: v.ring.checksum(),
            vnodes_per_member: v.ring.vnodes(),
            partitions: PARTITIONS as u32,
            members,
        }))
    }

    async fn leave(&self, _req: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveResponse>, Status> {
        let v = self.cluster.view();
        tracing::info!("leave requested over the admin API");
        self.leave.notify_one();
        Ok(Response::new(pb::LeaveResponse { node: v.name_of(&v.me) }))
    }
}
