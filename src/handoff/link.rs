//! The in-memory twin of the protocol's peer link (`peer::PeerLink`); the gRPC one is
//! `api::GrpcPeerLink`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use super::Handoff;
use crate::history::Pos;
use crate::memnet::MemNet;
use crate::ownership::PeerHolding;
use crate::peer::{LinkError, LinkFuture, PeerLink, Pulled, Refusal, Segments};
use crate::replica::ReplicaPart;

/// The in-memory twin of the gRPC link: calls go straight to the peer's [`Handoff`], an
/// in-process service of a [`MemNet`] (`MemNet::serve`), in the peer's task scope (a
/// frozen peer does not answer, a killed one never finishes), over links that can be
/// cut. Nothing is serialised.
#[derive(Clone)]
pub struct MemPeerLink {
    net: MemNet,
    me: SocketAddr,
}

impl MemPeerLink {
    /// The link of the node at gossip address `me`.
    pub fn new(net: MemNet, me: SocketAddr) -> MemPeerLink {
        MemPeerLink { net, me }
    }

    /// Runs `f` on the hand-off at `peer`, as a call over a link that may be cut, to a
    /// node that may be frozen or killed meanwhile.
    async fn call<T, F, Fut>(&self, peer: SocketAddr, timeout: std::time::Duration, f: F) -> Result<T, LinkError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Handoff>) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let refused = || LinkError(format!("{peer}: connection refused"));
        let (host, service, scope) = self.net.service(peer).ok_or_else(refused)?;
        let h = service.downcast::<Handoff>().map_err(|_| refused())?;
        if !self.net.reachable(self.me, host) {
            // A cut link: no answer, as over a real partition.
            tokio::time::sleep(timeout).await;
            return Err(LinkError(format!("{peer}: no answer within {timeout:?} (unreachable)")));
        }
        let fut = f(h);
        let task = match scope {
            Some(s) => s.spawn("memnet_call", fut),
            None => tokio::spawn(fut),
        };
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(v)) if self.net.reachable(self.me, host) => Ok(v),
            Ok(Ok(_)) => Err(LinkError(format!("{peer}: connection broken before the answer"))),
            Ok(Err(_)) => Err(LinkError(format!("{peer}: connection reset (the peer died)"))),
            Err(_) => Err(LinkError(format!("{peer}: no answer within {timeout:?}"))),
        }
    }
}

impl PeerLink for MemPeerLink {
    fn holdings(
        &self,
        peer: SocketAddr,
        me: SocketAddr,
        timeout: std::time::Duration,
    ) -> LinkFuture<'_, Vec<PeerHolding>> {
        Box::pin(self.call(peer, timeout, move |h| async move { h.holdings(Some(me)).await }))
    }

    fn pull(
        &self,
        peer: SocketAddr,
        me: SocketAddr,
        wanted: Vec<(u16, u64)>,
        timeout: std::time::Duration,
    ) -> LinkFuture<'_, Pulled> {
        Box::pin(self.call(peer, timeout, move |h| async move {
            let (partitions, refused) = h.lend(me, &wanted).await;
            Pulled { partitions, refused }
        }))
    }

    fn release(
        &self,
        peer: SocketAddr,
        me: SocketAddr,
        partitions: Vec<u16>,
        timeout: std::time::Duration,
    ) -> LinkFuture<'_, ()> {
        Box::pin(self.call(peer, timeout, move |h| async move {
            h.release(me, &partitions).await;
        }))
    }

    fn replicate(
        &self,
        peer: SocketAddr,
        me: SocketAddr,
        session: u64,
        parts: Vec<ReplicaPart>,
        timeout: std::time::Duration,
    ) -> LinkFuture<'_, Vec<Refusal>> {
        Box::pin(self.call(peer, timeout, move |h| async move { h.replicate(me, session, parts).await }))
    }

    fn history_segments(&self, peer: SocketAddr, partition: u16, upto: Pos, timeout: std::time::Duration) -> Segments {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let link = self.clone();
        tokio::spawn(async move {
            let files = link.call(peer, timeout, move |h| async move { h.history_segments(partition, upto) }).await;
            let files = match files.and_then(|f| f.map_err(LinkError)) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            // After the listing: a slow copy, as a large history's would be.
            tokio::time::sleep(link.net.history_delay()).await;
            for (path, len) in files {
                let item = crate::history::read_range(&path, 0, len).map_err(|e| LinkError(e.to_string()));
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        rx
    }
}
