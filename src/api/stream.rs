//! `UpdateStream` across the cluster: one gateway stream in, batches split by owner.
//!
//! Two tasks per gateway stream. The reader validates each batch, splits it by owner
//! (one ring snapshot per batch), queues the local part on the shards and sends each
//! remote part as one sub-batch on a forwarding stream to its owner: one bidirectional
//! `UpdateStream` per (gateway stream, peer), opened on first use and marked with the
//! hop. The writer awaits the parts of each batch in batch order and answers one
//! `BatchAck` with every rejected fix at its original index.
//!
//! Order: a driver's fixes of one gateway stream go to one owner, on one forwarding
//! stream, whose receiver applies them in order; batches are never reordered. A
//! forwarding stream that fails (peer gone, ack late) fails the fixes it carried with
//! `unavailable` and is reopened for the next batch.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status, Streaming};

use super::locations::{BoxStream, INCOMING_WAIT, LocationsApi};
use super::{MAX_BATCH, count_rejects, fix_from_proto, fix_to_proto, invalid, reject_proto};
use crate::clock::wall_ms;
use crate::drivers::{FieldError, FixInput, Reject};
use crate::keys::partition_of;
use crate::ownership::Route;
use crate::pb;
use crate::routing::cluster::{MAX_HOPS, set_hop};

/// How long the writer waits for a peer's ack of one forwarded sub-batch.
const FORWARD_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a forwarding stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(1);
/// After a peer failed to open, how long its fixes fail fast instead of retrying.
const REOPEN_BACKOFF: Duration = Duration::from_millis(500);
/// Sub-batches queued on one forwarding stream.
const LINK_QUEUE: usize = 8;

type PendingBatch = Pin<Box<dyn std::future::Future<Output = Vec<(u32, Reject)>> + Send>>;

/// A remote part of a batch: which forwarding stream carried it and the original index
/// of each of its fixes.
struct RemotePart {
    peer: SocketAddr,
    generation: u64,
    idx: Vec<u32>,
}

enum AckItem {
    /// A new forwarding stream; batches after this item may use it.
    Link {
        peer: SocketAddr,
        generation: u64,
        acks: Streaming<pb::BatchAck>,
    },
    Batch {
        id: u64,
        n: usize,
        early: Vec<(u32, Reject)>,
        local: PendingBatch,
        remote: Vec<RemotePart>,
    },
    End(Status),
}

/// The reader's end of a forwarding stream.
struct LinkTx {
    generation: u64,
    tx: mpsc::Sender<pb::LocationBatch>,
}

/// Forwarding streams the writer found broken: (peer, generation).
type Broken = Arc<Mutex<HashSet<(SocketAddr, u64)>>>;

/// Starts the reader and writer tasks of one gateway stream; returns the ack stream.
pub(super) fn start(
    api: &LocationsApi,
    hop: u32,
    mut inbound: Streaming<pb::LocationBatch>,
) -> BoxStream<pb::BatchAck> {
    let (out_tx, out_rx) = mpsc::channel::<Result<pb::BatchAck, Status>>(16);
    // Batches dispatched but not yet acknowledged; bounds a stream's work in flight.
    let (ack_tx, ack_rx) = mpsc::channel::<AckItem>(8);
    let router = api.router.clone();
    let cluster = api.cluster.clone();
    let limits = api.limits;
    let mut shutdown = api.shutdown.clone();
    let broken: Broken = Arc::default();
    let broken_w = broken.clone();
    crate::tasks::spawn("stream_reader", async move {
        let mut links: HashMap<SocketAddr, LinkTx> = HashMap::new();
        let mut backoff: HashMap<SocketAddr, Instant> = HashMap::new();
        let mut generation = 0u64;
        let mut sub_id = 0u64;
        loop {
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = super::stopped(&mut shutdown) => {
                    let _ = ack_tx.send(AckItem::End(Status::unavailable("node shutting down"))).await;
                    return;
                }
            };
            let batch = match msg {
                Ok(Some(b)) => b,
                Ok(None) | Err(_) => return,
            };
            if batch.updates.len() > MAX_BATCH {
                let e = FieldError::new(
                    "updates",
                    format!("batch has {} fixes, at most {MAX_BATCH} allowed", batch.updates.len()),
                );
                let _ = ack_tx.send(AckItem::End(invalid(&e))).await;
                return;
            }
            let now = wall_ms();
            let n = batch.updates.len();
            let view = cluster.view();
            let mut early: Vec<(u32, Reject)> = Vec::new();
            // Valid fixes with their partition (hashed once per fix).
            let mut fixes: Vec<(u32, usize, FixInput)> = Vec::with_capacity(n);
            for (i, u) in batch.updates.into_iter().enumerate() {
                match fix_from_proto(u, now, limits) {
                    Ok(f) => fixes.push((i as u32, partition_of(f.driver_id.as_bytes()) as usize, f)),
                    Err(e) => early.push((i as u32, Reject::Invalid(e))),
                }
            }
            // One routes snapshot per batch. Fixes this node cannot place yet wait
            // (briefly, once per batch) for the routes to change: partitions arriving
            // here, and partitions another node would have to forward again past the hop
            // limit (rings disagree for a moment while they change).
            let blocked = |r: Route| match r {
                Route::Local => false,
                Route::Remote(_) | Route::Via(_) => hop >= MAX_HOPS,
                Route::Incoming | Route::Unknown => true,
            };
            let deadline = Instant::now() + INCOMING_WAIT;
            let mut changes = cluster.watch_routes();
            loop {
                let routes = changes.borrow_and_update().clone();
                if !fixes.iter().any(|(_, p, _)| blocked(routes.of(*p))) {
                    break;
                }
                if !matches!(tokio::time::timeout_at(deadline, changes.changed()).await, Ok(Ok(()))) {
                    break;
                }
            }
            let gate = cluster.gate.read().await;
            let routes = cluster.routes();
            let mut local: Vec<(u32, FixInput)> = Vec::with_capacity(n);
            // Remote parts by owner; a handful of owners, so a Vec beats a map.
            let mut parts: Vec<(SocketAddr, Vec<u32>, Vec<pb::LocationUpdate>)> = Vec::new();
            for (i, p, f) in fixes {
                match routes.of(p) {
                    Route::Local => local.push((i, f)),
                    Route::Remote(a) | Route::Via(a) if hop < MAX_HOPS => match parts.iter_mut().find(|p| p.0 == a) {
                        Some(p) => {
                            p.1.push(i);
                            p.2.push(fix_to_proto(f));
                        }
                        None => parts.push((a, vec![i], vec![fix_to_proto(f)])),
                    },
                    Route::Remote(_) | Route::Via(_) => early.push((i, Reject::Unavailable)),
                    Route::Incoming | Route::Unknown => early.push((i, Reject::Moving)),
                }
            }
            let stuck = early.iter().filter(|(_, r)| matches!(r, Reject::Unavailable | Reject::Moving)).count();
            if stuck > 0 {
                tracing::debug!(
                    hop,
                    refused = stuck,
                    "fixes refused: hop limit, or a partition still incoming after the wait"
                );
            }
            let pending = Box::pin(router.dispatch_batch(local).await);
            drop(gate);
            let mut remote = Vec::with_capacity(parts.len());
            for (peer, idx, updates) in parts {
                // A link the writer saw fail is reopened.
                if let Some(l) = links.get(&peer)
                    && broken.lock().expect("broken lock").remove(&(peer, l.generation))
                {
                    links.remove(&peer);
                }
                // Not `entry()`: opening awaits, and the ack queue must learn of the link first.
                #[allow(clippy::map_entry)]
                if !links.contains_key(&peer) {
                    let open_ok = backoff.get(&peer).is_none_or(|t| Instant::now() >= *t);
                    let p = cluster.peer_in(&view, peer);
                    let opened = match (open_ok, p) {
                        (true, Some(mut p)) => {
                            let (tx, rx) = mpsc::channel(LINK_QUEUE);
                            let mut req = Request::new(ReceiverStream::new(rx));
                            set_hop(req.metadata_mut(), hop + 1);
                            match tokio::time::timeout(OPEN_TIMEOUT, p.client.update_stream(req)).await {
                                Ok(Ok(resp)) => Some((tx, resp.into_inner())),
                                Ok(Err(e)) => {
                                    tracing::debug!(peer = %p.name, error = %e, "forwarding stream refused");
                                    None
                                }
                                Err(_) => None,
                            }
                        }
                        _ => None,
                    };
                    match opened {
                        Some((tx, acks)) => {
                            generation += 1;
                            if ack_tx.send(AckItem::Link { peer, generation, acks }).await.is_err() {
                                return;
                            }
                            links.insert(peer, LinkTx { generation, tx });
                            backoff.remove(&peer);
                        }
                        None => {
                            tracing::debug!(peer = %peer, refused = idx.len(), "fixes refused: no forwarding stream to their owner");
                            backoff.insert(peer, Instant::now() + REOPEN_BACKOFF);
                            early.extend(idx.into_iter().map(|i| (i, Reject::Unavailable)));
                            continue;
                        }
                    }
                }
                let link = links.get(&peer).expect("link just ensured");
                sub_id += 1;
                match link.tx.send(pb::LocationBatch { updates, batch_id: sub_id }).await {
                    Ok(()) => remote.push(RemotePart { peer, generation: link.generation, idx }),
                    Err(_) => {
                        tracing::debug!(peer = %peer, refused = idx.len(), "fixes refused: the forwarding stream closed");
                        links.remove(&peer);
                        early.extend(idx.into_iter().map(|i| (i, Reject::Unavailable)));
                    }
                }
            }
            metrics::counter!("locus_fixes_forwarded_total")
                .increment(remote.iter().map(|p| p.idx.len() as u64).sum::<u64>());
            let item = AckItem::Batch { id: batch.batch_id, n, early, local: pending, remote };
            if ack_tx.send(item).await.is_err() {
                return;
            }
        }
    });
    crate::tasks::spawn("stream_writer", write_acks(ack_rx, out_tx, broken_w));
    Box::pin(ReceiverStream::new(out_rx))
}

/// The writer: one ack per batch, in order, merging local and forwarded results.
async fn write_acks(
    mut ack_rx: mpsc::Receiver<AckItem>,
    out_tx: mpsc::Sender<Result<pb::BatchAck, Status>>,
    broken: Broken,
) {
    let mut links: HashMap<SocketAddr, (u64, Streaming<pb::BatchAck>)> = HashMap::new();
    while let Some(item) = ack_rx.recv().await {
        let (id, n, early, local, remote) = match item {
            AckItem::Link { peer, generation, acks } => {
                links.insert(peer, (generation, acks));
                continue;
            }
            AckItem::Batch { id, n, early, local, remote } => (id, n, early, local, remote),
            AckItem::End(status) => {
                let _ = out_tx.send(Err(status)).await;
                return;
            }
        };
        // This node's verdicts (local, early, and remote parts that failed) are counted
        // here; a peer counts the rejections it answers.
        let mut own = local.await;
        own.extend(early);
        let mut from_peers: Vec<pb::Rejection> = Vec::new();
        for part in remote {
            let ack = match links.get_mut(&part.peer) {
                Some((g, acks)) if *g == part.generation => {
                    match tokio::time::timeout(FORWARD_ACK_TIMEOUT, acks.message()).await {
                        Ok(Ok(Some(ack))) => Some(ack),
                        _ => None,
                    }
                }
                _ => None,
            };
            match ack {
                Some(ack) => from_peers.extend(ack.rejected.into_iter().filter_map(|mut r| {
                    r.index = *part.idx.get(r.index as usize)?;
                    Some(r)
                })),
                None => {
                    tracing::debug!(peer = %part.peer, refused = part.idx.len(), "fixes refused: no ack from their owner in time");
                    if links.get(&part.peer).is_some_and(|(g, _)| *g == part.generation) {
                        links.remove(&part.peer);
                        broken.lock().expect("broken lock").insert((part.peer, part.generation));
                    }
                    own.extend(part.idx.iter().map(|i| (*i, Reject::Unavailable)));
                }
            }
        }
        count_rejects(&own);
        let mut rejected: Vec<pb::Rejection> = own.iter().map(|(i, r)| reject_proto(*i, r)).collect();
        rejected.append(&mut from_peers);
        rejected.sort_unstable_by_key(|r| r.index);
        let ack = pb::BatchAck { batch_id: id, accepted: (n - rejected.len()) as u32, rejected };
        if out_tx.send(Ok(ack)).await.is_err() {
            return;
        }
    }
}
