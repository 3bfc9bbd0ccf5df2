//! Cluster membership: SWIM gossip (foca) plus every node's metadata, and the ring it
//! implies.
//!
//! One task owns it all (`spawn`): the [`Core`] (foca, its ordered timer queue, the
//! metadata table, this node's state) behind a thin shell that reads packets from a
//! [`Transport`], fires timers, takes [`Cmd`]s and publishes a [`ClusterView`] on a
//! `watch` channel. Readers (routing, admin, readiness) only ever see whole views.
//!
//! - Identity is the gossip address plus an incarnation seeded from the wall clock and
//!   renewed by foca, so a restarted or partitioned node rejoins by itself and wins over
//!   its old identity. The ring is keyed by address only: a `Rename` is not a ring change.
//! - Metadata (name, gRPC and HTTP addresses, joining/active/leaving, the ring checksum
//!   the node computes) is a versioned custom broadcast, re-sent whenever a member comes
//!   up and every few seconds, so members that join later learn it too.
//! - The ring holds this node when it is active, and every alive or suspect member whose
//!   metadata says active. Ring changes are debounced: a burst of changes (a node
//!   restarting, a partition healing) yields one new ring.
//! - With a cluster key, the UDP transport seals every datagram and drops the
//!   unauthentic, stale and replayed ones before foca sees them ([`seal`]).

pub mod seal;
pub mod transport;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroU32};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{AccumulatingRuntime, BroadcastHandler, Config, Foca, Identity, Invalidates, OwnedNotification, Timer};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::ring::Ring;
pub use transport::{Heard, Heartbeats, Transport, UdpTransport};

/// A node's identity in the gossip: its address and an incarnation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId {
    pub addr: SocketAddr,
    pub incarnation: u64,
}

impl Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeId { addr: self.addr, incarnation: self.incarnation + 1 })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, other: &Self) -> bool {
        self.incarnation > other.incarnation
    }
}

/// What a node says it is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Gossiping, but not yet taking keys.
    Joining,
    /// Owns its share of the ring.
    Active,
    /// Giving its keys up before it exits.
    Leaving,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Active => "active",
            NodeState::Leaving => "leaving",
        }
    }
}

/// A node's metadata, as every member learns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    pub name: String,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub state: NodeState,
    /// The checksum of the ring this node currently routes by.
    pub ring_checksum: u64,
}

/// The broadcast payload: a node's metadata with its version.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct MetaMsg {
    addr: SocketAddr,
    /// Process start (wall ms): a restarted node's metadata supersedes the old one's.
    boot: u64,
    seq: u64,
    meta: NodeMeta,
}

impl MetaMsg {
    fn version(&self) -> (u64, u64) {
        (self.boot, self.seq)
    }
}

/// Identifies a broadcast so a newer version of one node's metadata replaces an older
/// one still being disseminated.
pub struct MetaKey {
    addr: SocketAddr,
    version: (u64, u64),
}

impl Invalidates for MetaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.addr == other.addr && self.version >= other.version
    }
}

#[derive(Debug, thiserror::Error)]
#[error("undecodable metadata broadcast: {0}")]
pub struct MetaError(String);

/// The latest metadata of every node, newest version wins.
type MetaTable = Arc<Mutex<HashMap<SocketAddr, MetaMsg>>>;

struct MetaHandler {
    table: MetaTable,
}

impl BroadcastHandler<NodeId> for MetaHandler {
    type Key = MetaKey;
    type Error = MetaError;

    fn receive_item(&mut self, data: &[u8], _sender: Option<&NodeId>) -> Result<Option<MetaKey>, MetaError> {
        let msg: MetaMsg = postcard::from_bytes(data).map_err(|e| MetaError(e.to_string()))?;
        let mut t = self.table.lock().expect("meta lock");
        if t.get(&msg.addr).is_some_and(|old| old.version() >= msg.version()) {
            return Ok(None);
        }
        let key = MetaKey { addr: msg.addr, version: msg.version() };
        t.insert(msg.addr, msg);
        Ok(Some(key))
    }
}

/// How a member looks from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Suspect,
    Down,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspect => "suspect",
            Liveness::Down => "down",
        }
    }
}

/// One member of the cluster, this node included.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberView {
    pub addr: SocketAddr,
    pub incarnation: u64,
    pub liveness: Liveness,
    /// Unknown until its first broadcast arrives.
    pub meta: Option<NodeMeta>,
}

/// Everything readers need to know about the cluster, published as a whole.
#[derive(Debug)]
pub struct ClusterView {
    /// This node's gossip address (its ring key).
    pub me: SocketAddr,
    pub members: Vec<MemberView>,
    pub ring: Arc<Ring>,
}

impl ClusterView {
    pub fn member(&self, addr: &SocketAddr) -> Option<&MemberView> {
        self.members.iter().find(|m| m.addr == *addr)
    }

    /// The metadata of a ring member (routing needs its gRPC address).
    pub fn meta(&self, addr: &SocketAddr) -> Option<&NodeMeta> {
        self.member(addr)?.meta.as_ref()
    }

    pub fn name_of(&self, addr: &SocketAddr) -> String {
        self.meta(addr).map_or_else(|| addr.to_string(), |m| m.name.clone())
    }
}

/// Which members the ring holds: the active ones that are not known to be down.
pub fn ring_members(members: &[MemberView]) -> Vec<SocketAddr> {
    members
        .iter()
        .filter(|m| m.liveness != Liveness::Down && m.meta.as_ref().is_some_and(|x| x.state == NodeState::Active))
        .map(|m| m.addr)
        .collect()
}

/// Settings of the membership task.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    pub gossip_addr: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    pub name: String,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub vnodes: u32,
    /// Quiet time before a changed member set becomes a new ring.
    pub ring_debounce: Duration,
    /// How long a leaving node waits for peers to drop it from their rings.
    pub leave_wait: Duration,
    pub suspect_to_down: Duration,
    /// How often this node probes one member (foca's probe period); a probe unanswered
    /// within half of it goes indirect.
    pub probe_period: Duration,
    pub rebroadcast_every: Duration,
}

/// Times each membership update and metadata broadcast is sent (foca's
/// `max_transmissions`).
pub const MAX_TRANSMISSIONS: u8 = 6;

impl MembershipConfig {
    /// foca's LAN settings with a shorter probe period and suspicion (a dead member is
    /// declared down within about `probe_period` × 1.5 + `suspect_to_down`, 2.75 s by
    /// default) and frequent announces to down members (partitions heal by themselves).
    pub fn foca_config(&self) -> Config {
        let mut c = Config::new_lan(NonZeroU32::new(3).expect("nonzero"));
        // foca sizes transmissions for a 3-node cluster at 2 per update or broadcast: a
        // metadata broadcast pushed to three peers reached only two of them, and the
        // third learned it from the next rebroadcast, 5 s later (its ring lagged the
        // others' and it lost its quorum lease). Six reach every member of clusters of
        // the size Locus runs, with relays to spare.
        c.max_transmissions = NonZeroU8::new(MAX_TRANSMISSIONS).expect("nonzero");
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_period / 2;
        c.suspect_to_down_after = self.suspect_to_down;
        c.periodic_announce_to_down_members =
            Some(foca::PeriodicParams { frequency: Duration::from_secs(2), num_members: 2.try_into().expect("2") });
        c.periodic_announce =
            Some(foca::PeriodicParams { frequency: Duration::from_secs(5), num_members: 1.try_into().expect("1") });
        c
    }
}

/// Requests to the membership task.
pub enum Cmd {
    /// Leave gracefully: say "leaving", wait for peers to drop this node from their
    /// rings (bounded by `leave_wait`), leave the gossip, then reply.
    Leave { reply: oneshot::Sender<()> },
    /// Say "leaving" (peers drop this node from their rings and take its partitions
    /// over) but stay in the gossip; a `Leave` follows once the hand-off is done.
    AnnounceLeaving,
}

/// The sans-IO membership core: feed it packets, timer expiries and commands with the
/// current time; it accumulates packets to send and keeps the view up to date.
pub struct Core {
    foca: Foca<NodeId, foca::PostcardCodec, StdRng, MetaHandler>,
    rt: AccumulatingRuntime<NodeId>,
    timers: BinaryHeap<Reverse<(Instant, u64, Timer<NodeId>)>>,
    timer_seq: u64,
    cfg: MembershipConfig,
    table: MetaTable,
    boot: u64,
    seq: u64,
    state: NodeState,
    /// Peers know us (foca `Active`); until then we retry joining.
    connected: bool,
    next_join: Option<Instant>,
    join_backoff: Duration,
    next_rebroadcast: Instant,
    /// The member list as last computed, and the ring readers route by.
    members: Vec<MemberView>,
    ring: Arc<Ring>,
    ring_due: Option<Instant>,
    left: bool,
    outbox: Vec<(SocketAddr, Vec<u8>)>,
}

const JOIN_BACKOFF_MIN: Duration = Duration::from_millis(200);
const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Core {
    pub fn new(cfg: MembershipConfig, boot_ms: u64, rng: StdRng, now: Instant) -> Core {
        let table: MetaTable = Arc::default();
        let id = NodeId { addr: cfg.gossip_addr, incarnation: boot_ms };
        let handler = MetaHandler { table: table.clone() };
        let foca = Foca::with_custom_broadcast(id, cfg.foca_config(), rng, foca::PostcardCodec, handler);
        let alone = cfg.seeds.iter().all(|s| *s == cfg.gossip_addr);
        let mut core = Core {
            foca,
            rt: AccumulatingRuntime::new(),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            table,
            boot: boot_ms,
            seq: 0,
            state: if alone { NodeState::Active } else { NodeState::Joining },
            connected: false,
            next_join: (!alone).then_some(now),
            join_backoff: JOIN_BACKOFF_MIN,
            next_rebroadcast: now + cfg.rebroadcast_every,
            members: Vec::new(),
            ring: Arc::new(Ring::new(Vec::new(), cfg.vnodes)),
            ring_due: None,
            left: false,
            outbox: Vec::new(),
            cfg,
        };
        core.refresh(now);
        // The first ring is built at once: there is nothing to debounce yet.
        core.rebuild_ring(now);
        core.broadcast_meta();
        core.ring_due = None;
        core
    }

    fn meta(&self) -> NodeMeta {
        NodeMeta {
            name: self.cfg.name.clone(),
            grpc: self.cfg.grpc,
            http: self.cfg.http,
            state: self.state,
            ring_checksum: self.ring.checksum(),
        }
    }

    /// Publishes this node's metadata (a new version) to the cluster, pushed at once to a
    /// few members (every member of a small cluster) rather than left to ride on the
    /// next probes: peers compare ring checksums for their quorum lease, and a joiner's
    /// metadata or a changed ring that reached a member only with the next 5 s
    /// rebroadcast cost that member its lease. The packets go out with the caller's
    /// next [`Core::after_call`].
    fn broadcast_meta(&mut self) {
        self.seq += 1;
        let msg = MetaMsg { addr: self.cfg.gossip_addr, boot: self.boot, seq: self.seq, meta: self.meta() };
        match postcard::to_allocvec(&msg) {
            Ok(bytes) => {
                if let Err(e) = self.foca.add_broadcast(&bytes) {
                    warn!(error = %e, "metadata broadcast rejected");
                }
            }
            Err(e) => warn!(error = %e, "metadata encoding failed"),
        }
        if let Err(e) = self.foca.gossip(&mut self.rt) {
            debug!(error = %e, "gossip");
        }
    }

    /// Handles one gossip packet.
    pub fn handle_packet(&mut self, data: &[u8], now: Instant) {
        if let Err(e) = self.foca.handle_data(data, &mut self.rt) {
            debug!(error = %e, "gossip packet");
        }
        self.after_call(now);
    }

    /// The earliest instant at which [`Core::handle_due`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
        [timer, self.ring_due, self.next_join, Some(self.next_rebroadcast)].into_iter().flatten().min()
    }

    /// Fires every timer due at `now`, in order, and the core's own periodic work.
    pub fn handle_due(&mut self, now: Instant) {
        while let Some(Reverse((at, _, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Reverse((_, _, t)) = self.timers.pop().expect("peeked");
            if let Err(e) = self.foca.handle_timer(t, &mut self.rt) {
                debug!(error = %e, "gossip timer");
            }
            self.after_call(now);
        }
        if self.next_join.is_some_and(|at| at <= now) {
            self.try_join(now);
        }
        if now >= self.next_rebroadcast {
            self.next_rebroadcast = now + self.cfg.rebroadcast_every;
            if !self.left {
                self.broadcast_meta();
                self.after_call(now);
            }
        }
        if self.ring_due.is_some_and(|at| at <= now) {
            self.ring_due = None;
            self.rebuild_ring(now);
        }
    }

    fn try_join(&mut self, now: Instant) {
        if self.connected || self.left {
            self.next_join = None;
            return;
        }
        for seed in self.cfg.seeds.clone() {
            if seed == self.cfg.gossip_addr {
                continue;
            }
            if let Err(e) = self.foca.announce(NodeId { addr: seed, incarnation: 0 }, &mut self.rt) {
                debug!(error = %e, %seed, "announce");
            }
        }
        self.next_join = Some(now + self.join_backoff);
        self.join_backoff = (self.join_backoff * 2).min(JOIN_BACKOFF_MAX);
        self.after_call(now);
    }

    /// Starts leaving: says so. Peers drop this node from their rings; this node keeps
    /// its own ring (and answers for its keys) until it is gone, so requests peers sent
    /// before they noticed still succeed.
    pub fn start_leave(&mut self, now: Instant) {
        self.set_state(NodeState::Leaving, now);
    }

    /// The members this node's ring should hold now.
    fn ring_input(&self) -> Vec<SocketAddr> {
        let mut want = ring_members(&self.members);
        if self.state == NodeState::Leaving && self.ring.contains(&self.cfg.gossip_addr) {
            want.push(self.cfg.gossip_addr);
        }
        want.sort_by_key(crate::ring::addr_bytes);
        want.dedup();
        want
    }

    /// Whether every alive peer already routes by a ring without this node.
    pub fn peers_dropped_me(&self) -> bool {
        let me = self.cfg.gossip_addr;
        // What a peer's ring should be now: the active members, without this node.
        let expect = Ring::new(ring_members(&self.members).into_iter().filter(|a| *a != me), self.cfg.vnodes);
        self.members.iter().filter(|m| m.addr != me && m.liveness == Liveness::Alive).all(|m| {
            m.meta.as_ref().is_some_and(|x| x.ring_checksum == expect.checksum() || x.state != NodeState::Active)
        })
    }

    /// Leaves the gossip for good.
    pub fn finish_leave(&mut self, now: Instant) {
        if let Err(e) = self.foca.leave_cluster(&mut self.rt) {
            debug!(error = %e, "leave");
        }
        self.left = true;
        self.after_call(now);
    }

    fn set_state(&mut self, s: NodeState, now: Instant) {
        if self.state == s {
            return;
        }
        info!(from = self.state.as_str(), to = s.as_str(), "node state");
        self.state = s;
        self.broadcast_meta();
        self.after_call(now);
    }

    /// Drains what the last foca call produced: timers, notifications; recomputes the
    /// member list.
    fn after_call(&mut self, now: Instant) {
        while let Some((after, t)) = self.rt.to_schedule() {
            self.timer_seq += 1;
            self.timers.push(Reverse((now + after, self.timer_seq, t)));
        }
        let mut rebroadcast = false;
        while let Some(n) = self.rt.to_notify() {
            match n {
                OwnedNotification::MemberUp(id) => {
                    info!(peer = %id.addr, incarnation = id.incarnation, "member up");
                    // It may have missed our metadata: send a new version.
                    rebroadcast = true;
                }
                OwnedNotification::MemberDown(id) => info!(peer = %id.addr, "member down"),
                OwnedNotification::Rename(old, new) => {
                    debug!(peer = %new.addr, from = old.incarnation, to = new.incarnation, "member renamed")
                }
                OwnedNotification::Active => {
                    info!("joined the cluster");
                    self.connected = true;
                    self.next_join = None;
                    self.join_backoff = JOIN_BACKOFF_MIN;
                    if self.state == NodeState::Joining {
                        self.state = NodeState::Active;
                        info!(to = "active", "node state");
                    }
                    rebroadcast = true;
                }
                OwnedNotification::Idle => {
                    info!("no reachable peers; retrying the seeds");
                    self.connected = false;
                    if !self.left {
                        self.next_join = Some(now);
                    }
                }
                OwnedNotification::Rejoin(id) => info!(incarnation = id.incarnation, "rejoined with a new identity"),
                OwnedNotification::Defunct if !self.left => warn!("declared down and cannot rejoin"),
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
        if rebroadcast && !self.left {
            self.broadcast_meta();
        }
        while let Some((dst, bytes)) = self.rt.to_send() {
            self.outbox.push((dst.addr, bytes.to_vec()));
        }
        self.refresh(now);
    }

    /// Recomputes the member list; a change in the ring's member set arms the debounce.
    fn refresh(&mut self, now: Instant) {
        let table = self.table.lock().expect("meta lock");
        let me = self.foca.identity().clone();
        let mut members = vec![MemberView {
            addr: me.addr,
            incarnation: me.incarnation,
            liveness: Liveness::Alive,
            meta: Some(self.meta()),
        }];
        for m in self.foca.iter_membership_state() {
            let id = m.id();
            if id.addr == me.addr {
                continue;
            }
            let liveness = match m.state() {
                foca::State::Alive => Liveness::Alive,
                foca::State::Suspect => Liveness::Suspect,
                foca::State::Down => Liveness::Down,
            };
            let meta = table.get(&id.addr).map(|x| x.meta.clone());
            members.push(MemberView { addr: id.addr, incarnation: id.incarnation, liveness, meta });
        }
        drop(table);
        members.sort_by_key(|m| m.addr);
        self.members = members;
        if self.ring_input() != self.ring.members() && self.ring_due.is_none() {
            self.ring_due = Some(now + self.cfg.ring_debounce);
        }
    }

    fn rebuild_ring(&mut self, now: Instant) {
        let ring = Ring::new(self.ring_input(), self.cfg.vnodes);
        if ring.checksum() != self.ring.checksum() {
            info!(members = ring.members().len(), checksum = format!("{:016x}", ring.checksum()), "ring changed");
            self.ring = Arc::new(ring);
            if !self.left {
                self.broadcast_meta();
            }
            self.after_call(now);
        }
    }

    /// The current view, for publishing.
    pub fn view(&self) -> ClusterView {
        ClusterView { me: self.cfg.gossip_addr, members: self.members.clone(), ring: self.ring.clone() }
    }

    /// Packets to send, drained.
    pub fn take_outbox(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }
}

/// A handle on the membership task.
#[derive(Clone)]
pub struct Membership {
    pub view: watch::Receiver<Arc<ClusterView>>,
    cmd: mpsc::Sender<Cmd>,
}

impl Membership {
    /// Says "leaving" and stays in the gossip (see [`Cmd::AnnounceLeaving`]).
    pub async fn announce_leaving(&self) {
        let _ = self.cmd.send(Cmd::AnnounceLeaving).await;
    }

    /// Leaves the cluster gracefully; returns when done (or the task is gone).
    pub async fn leave(&self) {
        let (reply, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Leave { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the membership task over `transport`, reading packets from `inbox`.
pub fn spawn(cfg: MembershipConfig, transport: impl Transport, inbox: mpsc::Receiver<Vec<u8>>) -> Membership {
    spawn_with(cfg, transport, inbox, rand::make_rng(), crate::clock::wall_ms() as u64)
}

/// [`spawn`] with a given random generator and boot time (tests).
pub fn spawn_with(
    cfg: MembershipConfig,
    transport: impl Transport,
    mut inbox: mpsc::Receiver<Vec<u8>>,
    rng: StdRng,
    boot_ms: u64,
) -> Membership {
    let leave_wait = cfg.leave_wait;
    let mut core = Core::new(cfg, boot_ms, rng, Instant::now());
    let (view_tx, view_rx) = watch::channel(Arc::new(core.view()));
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Cmd>(16);
    crate::tasks::spawn("membership", async move {
        let mut leaving: Option<(Instant, oneshot::Sender<()>)> = None;
        let mut cmds_open = true;
        loop {
            for (to, bytes) in core.take_outbox() {
                transport.send(to, &bytes);
            }
            publish(&view_tx, &core);
            if let Some((deadline, _)) = &leaving
                && (core.peers_dropped_me() || Instant::now() >= *deadline)
            {
                let (_, reply) = leaving.take().expect("leaving");
                core.finish_leave(Instant::now());
                for (to, bytes) in core.take_outbox() {
                    transport.send(to, &bytes);
                }
                publish(&view_tx, &core);
                let _ = reply.send(());
                info!("left the cluster");
                return;
            }
            let next = core.next_deadline().unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            let next = match &leaving {
                Some(_) => next.min(Instant::now() + Duration::from_millis(50)),
                None => next,
            };
            tokio::select! {
                p = inbox.recv() => match p {
                    Some(p) => core.handle_packet(&p, Instant::now()),
                    None => return,
                },
                _ = tokio::time::sleep_until(next) => core.handle_due(Instant::now()),
                c = cmd_rx.recv(), if cmds_open => match c {
                    Some(Cmd::AnnounceLeaving) => core.start_leave(Instant::now()),
                    Some(Cmd::Leave { reply }) => {
                        core.start_leave(Instant::now());
                        leaving = Some((Instant::now() + leave_wait, reply));
                    }
                    None => cmds_open = false,
                },
            }
        }
    });
    Membership { view: view_rx, cmd: cmd_tx }
}

/// Publishes the core's view if it changed.
fn publish(tx: &watch::Sender<Arc<ClusterView>>, core: &Core) {
    let v = core.view();
    tx.send_if_modified(|cur| {
        if cur.members == v.members && Arc::ptr_eq(&cur.ring, &v.ring) {
            return false;
        }
        *cur = Arc::new(v);
        true
    });
}

#[cfg(test)]
mod tests;
