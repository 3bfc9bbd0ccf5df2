//! The peer link of the hand-off and replication protocol: the calls one node makes on
//! another's hand-off (`handoff::Handoff`), in domain types, behind one trait.
//!
//! `api::GrpcPeerLink` carries them over gRPC (the node-to-node `locus.v1.Handoff`
//! service: validation and protobuf live there); `handoff::MemPeerLink` is its
//! in-memory twin, which calls the peer's `Handoff` directly (inside the peer's task
//! scope, so a frozen peer does not answer) over `memnet` links that can be cut. The
//! protocol code (`handoff`, `replica`) never sees a transport.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use crate::history::Pos;
use crate::ownership::PeerHolding;
use crate::storage::{PartitionData, ReplicaPart};

/// A partition refused, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub partition: u16,
    pub kind: RefusalKind,
    /// For people (logs): what the peer said.
    pub reason: String,
}

/// What the sender of a refused request should make of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    /// The request's epoch is below the one the peer holds the partition at: the
    /// sender's copy is stale (another node owns the partition now).
    StaleEpoch,
    /// Anything else (not held there, lent elsewhere, served there, no such partition).
    Other,
}

impl Refusal {
    pub fn stale(partition: u16, reason: String) -> Refusal {
        Refusal { partition, kind: RefusalKind::StaleEpoch, reason }
    }

    pub fn other(partition: u16, reason: String) -> Refusal {
        Refusal { partition, kind: RefusalKind::Other, reason }
    }
}

/// A call that failed: the peer did not answer in time, refused the request, or is
/// out of reach.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct LinkError(pub String);

pub type LinkFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LinkError>> + Send + 'a>>;

/// History segments as they arrive from a peer, one whole segment file each; an error is
/// the last item, and the channel closes after the last segment.
pub type Segments = tokio::sync::mpsc::Receiver<Result<Vec<u8>, LinkError>>;

/// What a pull brought: the partitions lent, and those refused.
#[derive(Default)]
pub struct Pulled {
    pub partitions: Vec<PartitionData>,
    pub refused: Vec<Refusal>,
}

/// The calls of the protocol. `peer` is the peer's gRPC address (as its metadata
/// advertises it); `me` is the caller's gossip address (its identity in the ring).
/// Each call gives up after `timeout`.
pub trait PeerLink: Send + Sync {
    /// What the peer holds, partition by partition (`me` is recorded as having seen it).
    fn holdings(&self, peer: SocketAddr, me: SocketAddr, timeout: Duration) -> LinkFuture<'_, Vec<PeerHolding>>;

    /// Pull: lend these partitions to `me`, which will own each at the epoch given.
    fn pull(
        &self,
        peer: SocketAddr,
        me: SocketAddr,
        wanted: Vec<(u16, u64)>,
        timeout: Duration,
    ) -> LinkFuture<'_, Pulled>;

    /// Release: `me` installed these partitions; the peer forgets its copies.
    fn release(&self, peer: SocketAddr, me: SocketAddr, partitions: Vec<u16>, timeout: Duration) -> LinkFuture<'_, ()>;

    /// Replicate: apply these parts of `me`'s partitions (session `session`); returns
    /// the partitions refused.
    fn replicate(
        &self,
        peer: SocketAddr,
        me: SocketAddr,
        session: u64,
        parts: Vec<ReplicaPart>,
        timeout: Duration,
    ) -> LinkFuture<'_, Vec<Refusal>>;

    /// The peer's closed history segments of `partition` that end at `upto` and chain
    /// back from it, newest first (`history::HistoryStore::segments_before`); `timeout`
    /// bounds each wait.
    fn history_segments(&self, peer: SocketAddr, partition: u16, upto: Pos, timeout: Duration) -> Segments;
}
