//! The UDP ingest shell: a node's socket (`--udp-addr`), and the owner's side of a
//! datagram.
//!
//! The receive task drains the socket at each readiness (`recvmmsg`, up to 64
//! datagrams a call, see [`super::mmsg`]), checks every
//! datagram ([`super::open`]: size, MAC, protobuf) and groups the good ones by the
//! owner of their session's partition. This node's are applied at once
//! ([`OwnerSide::apply`]: session → driver through the secondary index, the same
//! validation as a gRPC fix, one batch to the shards, which keep each driver's order:
//! a fix not newer than the driver's last one is a replay); every other owner gets one
//! `Internal.UdpFixes` call per batch (at most [`MAX_IN_FLIGHT`] at once: beyond, the
//! batch is dropped and counted, as the network would). Acks, when asked for, go back
//! from this node's socket. Drops are counted in `locus_udp_dropped_total{reason}`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::mmsg::RecvBatch;
use super::{Drop, KeyCache, Keys, SessionId, fix_input};
use crate::clock::wall_ms;
use crate::drivers::{Limits, Reject, validate_fix};
use crate::pb;
use crate::routing::Router;
use crate::routing::cluster::{Cluster, Owner, Peer};

/// Forward calls to other owners in flight at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Datagrams one drain takes before it hands its batch on.
const DRAIN_MAX: usize = 1024;

/// The owner's side: applies checked fixes of drivers it owns.
pub struct OwnerSide {
    pub router: Arc<Router>,
    pub limits: Limits,
}

fn count_drops(reason: &'static str, n: usize) {
    metrics::counter!("locus_udp_dropped_total", "reason" => reason).increment(n as u64);
}

impl OwnerSide {
    /// Applies a batch; per fix, `""` when applied, else the reason it was not.
    pub async fn apply(&self, fixes: Vec<pb::UdpFix>) -> Vec<&'static str> {
        self.submit(fixes).await.await
    }

    /// Queues a batch to the shards (in order: a later batch's fixes queue behind this
    /// one's) and returns the future of its outcome, which the caller may await
    /// elsewhere.
    pub async fn submit(&self, fixes: Vec<pb::UdpFix>) -> impl Future<Output = Vec<&'static str>> + Send + 'static {
        let now = wall_ms();
        let mut reasons = vec![""; fixes.len()];
        let mut batch = Vec::with_capacity(fixes.len());
        let mut buf = [0u8; 20];
        for (i, f) in fixes.into_iter().enumerate() {
            let Some(driver) = self.router.session_driver(SessionId(f.session_id).recorded_in(&mut buf)) else {
                reasons[i] = Drop::UnknownSession.name();
                continue;
            };
            match fix_input(f, driver) {
                Ok(fix) if validate_fix(&fix, now, self.limits).is_ok() => batch.push((i as u32, fix)),
                _ => reasons[i] = Drop::Invalid.name(),
            }
        }
        let outcome = self.router.dispatch_batch(batch).await;
        async move {
            for (i, why) in outcome.await {
                reasons[i as usize] = match why {
                    Reject::Stale { .. } => Drop::Replayed.name(),
                    Reject::Invalid(e) if e.field == "session" => Drop::UnknownSession.name(),
                    Reject::Invalid(_) => Drop::Invalid.name(),
                    Reject::ImplausibleJump { .. } => "implausible_jump",
                    Reject::Overloaded => "overloaded",
                    Reject::Unavailable | Reject::Moving => "unavailable",
                };
            }
            let accepted = reasons.iter().filter(|r| r.is_empty()).count();
            metrics::counter!("locus_udp_fixes_accepted_total").increment(accepted as u64);
            for r in reasons.iter().filter(|r| !r.is_empty()) {
                count_drops(r, 1);
            }
            reasons
        }
    }
}

/// How a batch reaches another owner (`api` does it over `Internal.UdpFixes`).
pub trait Forward: Send + Sync + 'static {
    fn send(&self, to: Peer, fixes: Vec<pb::UdpFix>) -> crate::dispatch::Pending<'static, Option<Vec<String>>>;
}

/// One received datagram, checked.
struct Got {
    fix: pb::UdpFix,
    from: SocketAddr,
}

/// The receive task.
pub async fn run(
    socket: Arc<UdpSocket>,
    keys: Keys,
    cluster: Arc<Cluster>,
    owner: Arc<OwnerSide>,
    forward: Arc<dyn Forward>,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut batch = RecvBatch::default();
    let mut cache = KeyCache::new(keys);
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let mut local: Vec<Got> = Vec::new();
        let mut remote: HashMap<SocketAddr, (Peer, Vec<Got>)> = HashMap::new();
        let mut received = 0u64;
        while received < DRAIN_MAX as u64 {
            let n = match batch.recv(&socket) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ICMP errors of earlier sends surface here on some systems: handle
                    // what came, then wait for readiness again.
                    debug!(error = %e, "UDP receive");
                    break;
                }
            };
            received += n as u64;
            for i in 0..n {
                let (bytes, from) = batch.get(i);
                let fix = match cache.open(bytes) {
                    Ok(f) => f,
                    Err(d) => {
                        count_drops(d.name(), 1);
                        continue;
                    }
                };
                match cluster.partition_owner(SessionId(fix.session_id).partition() as usize) {
                    Owner::Local => local.push(Got { fix, from }),
                    Owner::Remote(p) => {
                        remote.entry(p.addr).or_insert_with(|| (*p, Vec::new())).1.push(Got { fix, from })
                    }
                    Owner::Incoming | Owner::Unknown => count_drops("unavailable", 1),
                }
            }
        }
        metrics::counter!("locus_udp_datagrams_total").increment(received);
        if !local.is_empty() {
            // Queued in order here; the outcome (acks, counts) is awaited aside, so the
            // next drain does not wait for the shards.
            let (fixes, replies) = split(local);
            let outcome = owner.submit(fixes).await;
            let socket = socket.clone();
            crate::tasks::spawn("udp_outcome", async move {
                ack(&socket, &replies, &outcome.await).await;
            });
        }
        for (_, (peer, got)) in remote {
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                count_drops("overloaded", got.len());
                continue;
            };
            let (socket, forward) = (socket.clone(), forward.clone());
            crate::tasks::spawn("udp_forward", async move {
                let (fixes, replies) = split(got);
                let n = fixes.len();
                match forward.send(peer, fixes).await {
                    Some(reasons) if reasons.len() == n => ack(&socket, &replies, &reasons).await,
                    _ => count_drops("unavailable", n),
                }
                drop(permit);
            });
        }
    }
}

/// Where to ack a fix, if it asked for one.
struct Reply {
    session_id: u64,
    seq: u32,
    to: Option<SocketAddr>,
}

/// The fixes (owned, for the shards) and where to ack them.
fn split(got: Vec<Got>) -> (Vec<pb::UdpFix>, Vec<Reply>) {
    got.into_iter()
        .map(|g| {
            let r = Reply { session_id: g.fix.session_id, seq: g.fix.seq, to: g.fix.ack.then_some(g.from) };
            (g.fix, r)
        })
        .unzip()
}

/// Sends the acks asked for (the only place a reason becomes a `String`).
async fn ack(socket: &UdpSocket, replies: &[Reply], reasons: &[impl AsRef<str>]) {
    use prost::Message;
    for (r, reason) in replies.iter().zip(reasons) {
        let Some(to) = r.to else { continue };
        let reason = reason.as_ref();
        let a = pb::UdpAck { session_id: r.session_id, seq: r.seq, accepted: reason.is_empty(), reason: reason.into() };
        if let Err(e) = socket.try_send_to(&a.encode_to_vec(), to) {
            // A full send buffer loses an ack, as the network could.
            metrics::counter!("locus_udp_acks_dropped_total").increment(1);
            debug!(error = %e, "UDP ack not sent");
        }
    }
}

/// The receive buffer a node asks for: about a second of 100,000 datagrams.
const RECV_BUFFER: usize = 8 << 20;

/// Binds the node's UDP socket.
pub fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = std::net::UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    let s = UdpSocket::from_std(s)?;
    super::mmsg::set_recv_buffer(&s, RECV_BUFFER);
    if let Ok(a) = s.local_addr() {
        debug!(addr = %a, "UDP fixes socket bound");
    } else {
        warn!("UDP socket without a local address");
    }
    Ok(s)
}
