//! The `locus.v1.Cluster` admin service: members, key lookup, ring, graceful leave,
//! drain, and this node's partitions. Answers from this node's [`ClusterView`]; `Leave`
//! asks the node to shut down, which leaves the gossip first (see `node`); `Drain` says
//! "leaving" and waits until peers pulled every partition, but keeps the node up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use super::{check_key_str, invalid};
use crate::handoff::Handoff;
use crate::keys::{PARTITIONS, partition_of};
use crate::membership::{ClusterView, Liveness, MemberView, Membership, NodeState};
use crate::pb;
use crate::routing::cluster::Cluster;

/// The `locus.v1.Cluster` service.
pub struct ClusterApi {
    cluster: Arc<Cluster>,
    /// Notified to start a graceful shutdown (which leaves the cluster first).
    leave: Arc<Notify>,
    handoff: Arc<Handoff>,
    members: Membership,
}

impl ClusterApi {
    pub fn new(cluster: Arc<Cluster>, leave: Arc<Notify>, handoff: Arc<Handoff>, members: Membership) -> Self {
        ClusterApi { cluster, leave, handoff, members }
    }
}

/// Longest a `Drain` call waits, and its default.
const MAX_DRAIN: Duration = Duration::from_secs(600);
const DEFAULT_DRAIN: Duration = Duration::from_secs(60);

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

    async fn drain(&self, req: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        let r = req.into_inner();
        let wait = match r.timeout_ms {
            0 => DEFAULT_DRAIN,
            ms if Duration::from_millis(ms as u64) > MAX_DRAIN => {
                let e =
                    crate::drivers::FieldError::new("timeout_ms", format!("{ms} is above {}", MAX_DRAIN.as_millis()));
                return Err(invalid(&e));
            }
            ms => Duration::from_millis(ms as u64),
        };
        let v = self.cluster.view();
        tracing::info!(wait_ms = wait.as_millis() as u64, "drain requested over the admin API");
        self.members.announce_leaving().await;
        let t0 = Instant::now();
        let mut drained = self.handoff.drained().await;
        while !drained && t0.elapsed() < wait {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drained = self.handoff.drained().await;
        }
        let (active, lent, parked) = self.handoff.counts().await;
        tracing::info!(drained, active, lent, ms = t0.elapsed().as_millis() as u64, "drain finished");
        metrics::counter!("locus_drains_total", "result" => if drained { "drained" } else { "timed_out" }).increment(1);
        Ok(Response::new(pb::DrainResponse {
            node: v.name_of(&v.me),
            drained,
            active: active as u32,
            lent: lent as u32,
            parked: parked as u32,
            elapsed_ms: t0.elapsed().as_millis() as u64,
        }))
    }

    async fn partitions(
        &self,
        _req: Request<pb::PartitionsRequest>,
    ) -> Result<Response<pb::PartitionsResponse>, Status> {
        let v = self.cluster.view();
        let name = |a: &std::net::SocketAddr| v.name_of(a);
        let rows = self
            .handoff
            .report()
            .await
            .into_iter()
            .map(|r| pb::PartitionRow {
                partition: r.partition as u32,
                state: r.state.into(),
                epoch: r.epoch,
                ring_owner: r.ring_owner.map(|a| name(&a)).unwrap_or_default(),
                peers: r.peers.iter().map(name).collect(),
                drivers: r.drivers,
                trips: r.trips,
                claims: r.claims,
                in_sync: r.in_sync,
            })
            .collect();
        let lag = self
            .handoff
            .replica_links()
            .into_iter()
            .map(|l| pb::ReplicaLag {
                peer: name(&l.peer),
                lag_ms: l.lag_ms,
                queued_records: l.queued_records as u64,
                healthy: l.healthy,
            })
            .collect();
        let serving = self.cluster.has_quorum();
        Ok(Response::new(pb::PartitionsResponse { node: v.name_of(&v.me), rows, lag, serving }))
    }
}
