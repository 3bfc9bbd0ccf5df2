//! The `locus.v1.Handoff` service (node to node): holdings, pull, release, replicate,
//! history segments.
//! Server side: validates what peers send and hands it to [`crate::handoff::Handoff`].
//! Client side: [`GrpcPeerLink`], the protocol's `handoff::PeerLink` over gRPC. The
//! protobuf forms of holdings, partition states and replica parts live here, both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::handoff::Handoff;
use crate::history::Pos;
use crate::keys::PARTITIONS;
use crate::ownership::{Holding, PeerHolding};
use crate::pb;
use crate::pb::handoff_client::HandoffClient;
use crate::peer::{LinkError, LinkFuture, PeerLink, Pulled, Refusal, RefusalKind, Segments};
use crate::replica::{KvChange, ReplicaPart};
use crate::routing::cluster::{Cluster, MAX_HANDOFF_BYTES};
use crate::storage::{History, PartitionData};

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
            refused: refused.into_iter().map(refused_proto).collect(),
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
                part_from_proto(p).ok_or_else(|| Status::invalid_argument(format!("parts: {n} is not a partition")))?,
            );
        }
        let refused = self.handoff.replicate(who, r.session, parts).await;
        Ok(Response::new(pb::ReplicaAck { refused: refused.into_iter().map(refused_proto).collect() }))
    }

    type HistorySegmentsStream = super::locations::BoxStream<pb::HistoryChunk>;

    async fn history_segments(
        &self,
        r: Request<pb::HistorySegmentsRequest>,
    ) -> Result<Response<Self::HistorySegmentsStream>, Status> {
        let r = r.into_inner();
        let p = partitions(&[r.partition])?[0];
        let upto = r.upto.ok_or_else(|| Status::invalid_argument("upto: missing"))?;
        let files =
            self.handoff.history_segments(p, Pos { epoch: upto.epoch, seq: upto.seq }).map_err(Status::unavailable)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        crate::tasks::spawn("history_segments", async move {
            for (path, len) in files {
                let mut at = 0u64;
                while at < len {
                    let n = (len - at).min(SEGMENT_CHUNK);
                    let read = {
                        let path = path.clone();
                        tokio::task::spawn_blocking(move || crate::history::read_range(&path, at, at + n)).await
                    };
                    let item = match read {
                        Ok(Ok(data)) => Ok(pb::HistoryChunk { data, segment_end: at + n == len }),
                        Ok(Err(e)) => Err(Status::unavailable(e.to_string())),
                        Err(e) => Err(Status::internal(e.to_string())),
                    };
                    let failed = item.is_err();
                    if tx.send(item).await.is_err() || failed {
                        return;
                    }
                    at += n;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// A history segment travels in pieces of at most this many bytes.
const SEGMENT_CHUNK: u64 = 1 << 20;

/// The hand-off protocol's peer link over gRPC, on the cluster's pooled channels.
pub struct GrpcPeerLink {
    cluster: Arc<Cluster>,
}

impl GrpcPeerLink {
    pub fn new(cluster: Arc<Cluster>) -> GrpcPeerLink {
        GrpcPeerLink { cluster }
    }

    fn client(&self, peer: SocketAddr) -> HandoffClient<crate::auth::layer::AuthChannel> {
        HandoffClient::new(self.cluster.peers().channel(peer))
            .max_decoding_message_size(MAX_HANDOFF_BYTES)
            .max_encoding_message_size(MAX_HANDOFF_BYTES)
    }
}

fn request<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// A call's outcome, its deadline enforced here too (a peer that accepted the
/// connection and then stopped answering).
async fn within<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<Response<T>, Status>>,
) -> Result<T, LinkError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(LinkError(format!("{:?}: {}", s.code(), s.message()))),
        Err(_) => Err(LinkError(format!("no answer within {timeout:?}"))),
    }
}

fn refused_proto(r: Refusal) -> pb::Refused {
    let kind = match r.kind {
        RefusalKind::StaleEpoch => pb::RefusalKind::StaleEpoch,
        RefusalKind::Other => pb::RefusalKind::Other,
    };
    pb::Refused { partition: r.partition as u32, reason: r.reason, kind: kind as i32 }
}

/// A peer's refusals; a kind this build does not know reads as `Other`.
fn refusals(refused: Vec<pb::Refused>) -> Vec<Refusal> {
    refused
        .into_iter()
        .filter_map(|f| {
            let partition = u16::try_from(f.partition).ok()?;
            let kind = match pb::RefusalKind::try_from(f.kind) {
                Ok(pb::RefusalKind::StaleEpoch) => RefusalKind::StaleEpoch,
                _ => RefusalKind::Other,
            };
            Some(Refusal { partition, kind, reason: f.reason })
        })
        .collect()
}

impl PeerLink for GrpcPeerLink {
    fn holdings(&self, peer: SocketAddr, me: SocketAddr, timeout: Duration) -> LinkFuture<'_, Vec<PeerHolding>> {
        let mut c = self.client(peer);
        Box::pin(async move {
            let r = within(timeout, c.holdings(request(pb::HoldingsRequest { requester: me.to_string() }, timeout)));
            Ok(r.await?.holdings.into_iter().filter_map(peer_holding).collect())
        })
    }

    fn pull(
        &self,
        peer: SocketAddr,
        me: SocketAddr,
        wanted: Vec<(u16, u64)>,
        timeout: Duration,
    ) -> LinkFuture<'_, Pulled> {
        let mut c = self.client(peer);
        Box::pin(async move {
            let req = pb::PullRequest {
                requester: me.to_string(),
                partitions: wanted.iter().map(|(p, _)| *p as u32).collect(),
                epochs: wanted.iter().map(|(_, e)| *e).collect(),
            };
            let r = within(timeout, c.pull(request(req, timeout))).await?;
            Ok(Pulled {
                partitions: r.partitions.into_iter().filter_map(partition_data).collect(),
                refused: refusals(r.refused),
            })
        })
    }

    fn release(&self, peer: SocketAddr, me: SocketAddr, partitions: Vec<u16>, timeout: Duration) -> LinkFuture<'_, ()> {
        let mut c = self.client(peer);
        Box::pin(async move {
            let req = pb::ReleaseRequest {
                requester: me.to_string(),
                partitions: partitions.iter().map(|p| *p as u32).collect(),
            };
            within(timeout, c.release(request(req, timeout))).await.map(|_| ())
        })
    }

    fn replicate(
        &self,
        peer: SocketAddr,
        me: SocketAddr,
        session: u64,
        parts: Vec<ReplicaPart>,
        timeout: Duration,
    ) -> LinkFuture<'_, Vec<Refusal>> {
        let mut c = self.client(peer);
        Box::pin(async move {
            let req =
                pb::ReplicaBatch { from: me.to_string(), session, parts: parts.into_iter().map(part_proto).collect() };
            Ok(refusals(within(timeout, c.replicate(request(req, timeout))).await?.refused))
        })
    }

    fn history_segments(&self, peer: SocketAddr, partition: u16, upto: Pos, timeout: Duration) -> Segments {
        let mut c = self.client(peer);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        crate::tasks::spawn("history_segments_in", async move {
            let req = pb::HistorySegmentsRequest {
                partition: partition as u32,
                upto: Some(pb::HistoryPos { epoch: upto.epoch, seq: upto.seq }),
            };
            let mut stream = match within(timeout, c.history_segments(Request::new(req))).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let mut seg = Vec::new();
            loop {
                let item = match tokio::time::timeout(timeout, stream.message()).await {
                    Ok(Ok(Some(chunk))) => chunk,
                    Ok(Ok(None)) => return,
                    Ok(Err(s)) => {
                        let _ = tx.send(Err(LinkError(format!("{:?}: {}", s.code(), s.message())))).await;
                        return;
                    }
                    Err(_) => {
                        let _ = tx.send(Err(LinkError(format!("no history chunk within {timeout:?}")))).await;
                        return;
                    }
                };
                seg.extend_from_slice(&item.data);
                if seg.len() > crate::history::MAX_COPIED_SEGMENT {
                    let why = format!("a history segment over {} bytes", crate::history::MAX_COPIED_SEGMENT);
                    let _ = tx.send(Err(LinkError(why))).await;
                    return;
                }
                if item.segment_end && tx.send(Ok(std::mem::take(&mut seg))).await.is_err() {
                    return;
                }
            }
        });
        rx
    }
}

fn peer_holding(h: pb::Holding) -> Option<PeerHolding> {
    let holding = match pb::HoldingKind::try_from(h.kind).ok()? {
        pb::HoldingKind::HoldingActive => Holding::Active,
        pb::HoldingKind::HoldingLent => Holding::Lent { to: h.lent_to.parse().ok()?, to_epoch: h.lent_epoch },
        pb::HoldingKind::HoldingParked => Holding::Parked,
        pb::HoldingKind::HoldingReplica => Holding::Replica,
        pb::HoldingKind::HoldingPulling => Holding::Pulling,
        pb::HoldingKind::Unspecified => return None,
    };
    let partition = u16::try_from(h.partition).ok().filter(|p| *p < PARTITIONS)?;
    Some(PeerHolding { partition, epoch: h.epoch, holding })
}

/// A holding as `Holdings` reports it.
fn holding_proto(h: &PeerHolding) -> pb::Holding {
    let (kind, lent_to, lent_epoch) = match h.holding {
        Holding::Active => (pb::HoldingKind::HoldingActive, String::new(), 0),
        Holding::Lent { to, to_epoch } => (pb::HoldingKind::HoldingLent, to.to_string(), to_epoch),
        Holding::Parked => (pb::HoldingKind::HoldingParked, String::new(), 0),
        Holding::Replica => (pb::HoldingKind::HoldingReplica, String::new(), 0),
        Holding::Pulling => (pb::HoldingKind::HoldingPulling, String::new(), 0),
    };
    pb::Holding { partition: h.partition as u32, epoch: h.epoch, kind: kind as i32, lent_to, lent_epoch }
}

fn partition_data(d: pb::PartitionState) -> Option<PartitionData> {
    let pairs = |kv: Vec<pb::KeyValue>| kv.into_iter().map(|x| (x.key, x.value)).collect();
    Some(PartitionData {
        partition: u16::try_from(d.partition).ok().filter(|p| *p < PARTITIONS)?,
        epoch: d.epoch,
        drivers: d.drivers,
        claims: pairs(d.claims),
        trips: pairs(d.trips),
        history: History {
            floor: d.history_floor.map(|f| Pos { epoch: f.epoch, seq: f.seq }),
            blocks: d.history,
            older: d.history_older,
        },
    })
}

/// A partition's state as `Pull` returns it.
fn partition_proto(d: PartitionData) -> pb::PartitionState {
    let kv = |v: Vec<(Vec<u8>, Vec<u8>)>| v.into_iter().map(|(key, value)| pb::KeyValue { key, value }).collect();
    pb::PartitionState {
        partition: d.partition as u32,
        epoch: d.epoch,
        drivers: d.drivers,
        claims: kv(d.claims),
        trips: kv(d.trips),
        history: d.history.blocks,
        history_floor: d.history.floor.map(|f| pb::HistoryPos { epoch: f.epoch, seq: f.seq }),
        history_older: d.history.older,
    }
}

fn kv_proto(c: KvChange) -> pb::KvChange {
    match c.value {
        Some(value) => pb::KvChange { key: c.id, value, deleted: false },
        None => pb::KvChange { key: c.id, value: Vec::new(), deleted: true },
    }
}

fn part_proto(p: ReplicaPart) -> pb::ReplicaPart {
    pb::ReplicaPart {
        partition: p.partition as u32,
        epoch: p.epoch,
        drivers_reset: p.drivers_reset,
        drivers: p.drivers,
        kv_reset: p.kv_reset,
        claims: p.claims.into_iter().map(kv_proto).collect(),
        trips: p.trips.into_iter().map(kv_proto).collect(),
        history: p.history,
    }
}

/// A replication part as a peer sent it; `None` for a partition that does not exist.
fn part_from_proto(p: pb::ReplicaPart) -> Option<ReplicaPart> {
    let kv = |v: Vec<pb::KvChange>| {
        v.into_iter().map(|c| KvChange { id: c.key, value: (!c.deleted).then_some(c.value) }).collect()
    };
    Some(ReplicaPart {
        partition: u16::try_from(p.partition).ok().filter(|p| *p < PARTITIONS)?,
        epoch: p.epoch,
        drivers_reset: p.drivers_reset,
        drivers: p.drivers,
        kv_reset: p.kv_reset,
        claims: kv(p.claims),
        trips: kv(p.trips),
        history: p.history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_keep_their_kind_across_the_wire() {
        let sent = vec![
            Refusal::stale(7, "stale epoch 3: held here at epoch 5".into()),
            Refusal::other(1023, "not held here".into()),
        ];
        let wire: Vec<pb::Refused> = sent.iter().cloned().map(refused_proto).collect();
        assert_eq!(refusals(wire), sent);
        // A kind from a newer peer reads as `Other`; a partition out of range is dropped.
        let odd = vec![
            pb::Refused { partition: 3, reason: "why".into(), kind: 99 },
            pb::Refused { partition: 70_000, reason: "x".into(), kind: 1 },
        ];
        assert_eq!(refusals(odd), vec![Refusal::other(3, "why".into())]);
    }
}
