//! The UDP ingest shell: a node's socket (`--udp-addr`), and the owner's side of a
//! datagram.
//!
//! The receive task drains the socket at each readiness (`recvmmsg`, up to 64
//! datagrams a call, see [`super::mmsg`]), checks every
//! datagram ([`super::KeyCache`]: size, MAC, protobuf) and groups the good ones by the
//! owner of their session's partition. This node's are applied at once (session →
//! driver through the task's cache, else the secondary index; the same validation as a
//! gRPC fix, built straight into one [`Batch`] to the shards, which keep each driver's
//! order: a fix not newer than the driver's last one is a replay); every other owner
//! gets one `Internal.UdpFixes` call per batch (at most [`MAX_IN_FLIGHT`] at once:
//! beyond, the batch is dropped and counted, as the network would). Acks, when asked for, go back
//! from this node's socket. Drops are counted in `locus_udp_dropped_total{reason}`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::mmsg::RecvBatch;
use super::{Drop, KeyCache, Keys, SessionId, fix_input};
use crate::clock::wall_ms;
use crate::drivers::{Limits, Reject, validate_fix};
use crate::pb;
use crate::routing::Router;
use crate::routing::cluster::{Cluster, Owner, Peer};

/// Forward calls to other owners in flight at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Datagrams one drain takes before it hands its batch on (a batch is its fixes for
/// this node's shards: large enough that a channel send and a task per batch are
/// nothing per fix).
const DRAIN_MAX: usize = 1024;

/// The owner's side: applies checked fixes of drivers it owns.
pub struct OwnerSide {
    pub router: Arc<Router>,
    pub limits: Limits,
}

fn count_drops(reason: &'static str, n: usize) {
    metrics::counter!("locus_udp_dropped_total", "reason" => reason).increment(n as u64);
}

/// Drops tallied by reason, so a batch touches each counter once.
#[derive(Default)]
struct Drops {
    accepted: u64,
    by: Vec<(&'static str, usize)>,
}

impl Drops {
    /// One outcome: `""` accepted, else the reason it was dropped.
    fn add(&mut self, reason: &'static str) {
        if reason.is_empty() {
            self.accepted += 1;
        } else if let Some(e) = self.by.iter_mut().find(|(r, _)| *r == reason) {
            e.1 += 1;
        } else {
            self.by.push((reason, 1));
        }
    }

    fn count(&self) {
        for (r, n) in &self.by {
            count_drops(r, *n);
        }
    }
}

/// Checked fixes on their way to this node's shards, numbered in arrival order, with
/// the reason of each one refused before the shards.
pub struct Batch {
    reasons: Vec<&'static str>,
    inputs: Vec<(u32, crate::drivers::FixInput)>,
    now: i64,
}

impl Batch {
    pub fn new(capacity: usize) -> Batch {
        Batch { reasons: Vec::with_capacity(capacity), inputs: Vec::with_capacity(capacity), now: wall_ms() }
    }

    pub fn len(&self) -> usize {
        self.reasons.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reasons.is_empty()
    }

    /// Adds a checked datagram's fix for `driver` (the session's, `None` when no driver
    /// here holds it), validated as a gRPC fix is.
    pub fn push(&mut self, f: pb::UdpFix, driver: Option<String>, limits: Limits) {
        let i = self.reasons.len() as u32;
        let why = match driver.map(|d| fix_input(f, d)) {
            None => Drop::UnknownSession.name(),
            Some(Ok(fix)) if validate_fix(&fix, self.now, limits).is_ok() => {
                self.inputs.push((i, fix));
                ""
            }
            Some(_) => Drop::Invalid.name(),
        };
        self.reasons.push(why);
    }
}

impl OwnerSide {
    /// Applies a batch (forwarded by another node); per fix, `""` when applied, else the
    /// reason it was not.
    pub async fn apply(&self, fixes: Vec<pb::UdpFix>) -> Vec<&'static str> {
        let mut batch = Batch::new(fixes.len());
        let mut buf = [0u8; 20];
        for f in fixes {
            let driver = self.router.session_driver(SessionId(f.session_id).recorded_in(&mut buf));
            batch.push(f, driver, self.limits);
        }
        self.submit(batch).await.await
    }

    /// Queues a batch to the shards (in order: a later batch's fixes queue behind this
    /// one's) and returns the future of its outcome, which the caller may await
    /// elsewhere.
    pub async fn submit(&self, batch: Batch) -> impl Future<Output = Vec<&'static str>> + Send + 'static {
        let Batch { mut reasons, inputs, .. } = batch;
        let outcome = self.router.dispatch_batch(inputs).await;
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
            let mut drops = Drops::default();
            for r in &reasons {
                drops.add(r);
            }
            metrics::counter!("locus_udp_fixes_accepted_total").increment(drops.accepted);
            drops.count();
            reasons
        }
    }
}

/// How a batch reaches another owner (`api` does it over `Internal.UdpFixes`).
pub trait Forward: Send + Sync + 'static {
    fn send(&self, to: Peer, fixes: Vec<pb::UdpFix>) -> crate::dispatch::Pending<'static, Option<Vec<String>>>;
}

/// An ack to send: fix `i` of its batch, asked for by `to`.
struct Ack {
    i: u32,
    session_id: u64,
    seq: u32,
    to: SocketAddr,
}

impl Ack {
    /// The ack `fix` asks for, as fix `i` of its batch.
    fn wanted(i: usize, fix: &pb::UdpFix, from: SocketAddr) -> Option<Ack> {
        fix.ack.then_some(Ack { i: i as u32, session_id: fix.session_id, seq: fix.seq, to: from })
    }
}

/// Fixes for another owner, and the acks they asked for.
#[derive(Default)]
struct ForPeer {
    fixes: Vec<pb::UdpFix>,
    acks: Vec<Ack>,
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
    let mut buf = [0u8; 20];
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let mut local = Batch::new(super::mmsg::BATCH);
        let mut local_acks: Vec<Ack> = Vec::new();
        let mut remote: HashMap<SocketAddr, (Peer, ForPeer)> = HashMap::new();
        let mut received = 0u64;
        let mut drops = Drops::default();
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
                        drops.add(d.name());
                        continue;
                    }
                };
                let session = SessionId(fix.session_id);
                match cluster.partition_owner(session.partition() as usize) {
                    Owner::Local => {
                        local_acks.extend(Ack::wanted(local.len(), &fix, from));
                        let driver =
                            cache.driver(session, || owner.router.session_driver(session.recorded_in(&mut buf)));
                        local.push(fix, driver, owner.limits);
                    }
                    Owner::Remote(p) => {
                        let to = &mut remote.entry(p.addr).or_insert_with(|| (*p, ForPeer::default())).1;
                        to.acks.extend(Ack::wanted(to.fixes.len(), &fix, from));
                        to.fixes.push(fix);
                    }
                    Owner::Incoming | Owner::Unknown => drops.add("unavailable"),
                }
            }
        }
        drops.count();
        metrics::counter!("locus_udp_datagrams_total").increment(received);
        if !local.is_empty() {
            // Queued in order here; the outcome (acks, counts) is awaited aside, so the
            // next drain does not wait for the shards.
            let outcome = owner.submit(local).await;
            let socket = socket.clone();
            crate::tasks::spawn("udp_outcome", async move {
                let reasons = outcome.await;
                ack(&socket, &local_acks, &reasons).await;
            });
        }
        for (_, (peer, to)) in remote {
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                count_drops("overloaded", to.fixes.len());
                continue;
            };
            let (socket, forward) = (socket.clone(), forward.clone());
            crate::tasks::spawn("udp_forward", async move {
                let n = to.fixes.len();
                match forward.send(peer, to.fixes).await {
                    Some(reasons) if reasons.len() == n => ack(&socket, &to.acks, &reasons).await,
                    _ => count_drops("unavailable", n),
                }
                drop(permit);
            });
        }
    }
}

/// Sends the acks asked for (the only place a reason becomes a `String`).
async fn ack(socket: &UdpSocket, acks: &[Ack], reasons: &[impl AsRef<str>]) {
    use prost::Message;
    for a in acks {
        let Some(reason) = reasons.get(a.i as usize) else { continue };
        let reason = reason.as_ref();
        let m = pb::UdpAck { session_id: a.session_id, seq: a.seq, accepted: reason.is_empty(), reason: reason.into() };
        if let Err(e) = socket.try_send_to(&m.encode_to_vec(), a.to) {
            // A full send buffer loses an ack, as the network could.
            metrics::counter!("locus_udp_acks_dropped_total").increment(1);
            debug!(error = %e, "UDP ack not sent");
        }
    }
}

/// Binds the node's UDP socket, asking for a receive buffer of `recv_buffer` bytes.
pub fn bind(addr: SocketAddr, recv_buffer: usize) -> std::io::Result<UdpSocket> {
    let s = std::net::UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    let s = UdpSocket::from_std(s)?;
    // The kernel reports twice what it grants (the other half is its bookkeeping).
    let got = super::mmsg::set_recv_buffer(&s, recv_buffer) / 2;
    match s.local_addr() {
        Ok(a) => info!(addr = %a, recv_buffer_bytes = got, "UDP fixes socket bound"),
        Err(_) => warn!("UDP socket without a local address"),
    }
    if got < recv_buffer {
        warn!(
            asked = recv_buffer,
            got, "UDP receive buffer smaller than asked (raise net.core.rmem_max, or give the node CAP_NET_ADMIN)"
        );
    }
    Ok(s)
}
