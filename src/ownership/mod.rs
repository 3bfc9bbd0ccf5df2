//! Partition ownership: who serves partition `p`, at which epoch, in which state. Pure.
//!
//! The ring says who *should* own each partition; this table says who *holds* it here.
//! A partition's state moves between nodes by hand-off (see `handoff`), and exactly one
//! node serves it at a time:
//!
//! - `Active`: served here, at `epoch`.
//! - `Lent { to }`: frozen here and handed to `to`, which installs it at a higher epoch;
//!   requests for it go to `to`. Once `to` releases it, this node forgets its copy.
//! - `Parked`: a copy found on disk at startup. It is never served: it is handed over
//!   (or adopted) only when no live node holds the partition `Active` or `Lent`.
//!
//! Every move raises the partition's epoch (the new owner takes the highest epoch any
//! live node reports, plus one, and persists it with the state), so a copy from before a
//! crash always loses to the current one.
//!
//! [`plan`] turns the ring, this node's table and a survey of every live member's
//! holdings into actions (pull, adopt, reclaim, discard); [`routes`] turns the ring and
//! the table into the per-partition route every request reads: here, wait (incoming),
//! or that node. The `handoff` shell performs the actions and publishes the routes.
//!
//! [`has_quorum`] is the minority rule: a node serves, writes and plans only while it
//! has heard, within a lease, from a strict majority of the members it last knew (its
//! *quorum base*: members leave it only by leaving gracefully). The lease is shorter
//! than failure detection, so a node cut off from the majority (or frozen, then thawed)
//! stands down before the majority declares it down and promotes its replicas.
//! [`QuorumBase`] keeps the base as the view changes; [`lend`] is the holder's side of
//! a pull. All of it is pure: the `handoff` shell feeds it the view, the survey, the
//! lease and `now`, and performs what comes out.

mod base;
mod lease;

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::keys::{PARTITIONS, partition_of};
use crate::ring::Ring;
pub use base::{BASE_FORGET, QuorumBase};
pub use lease::Lease;

/// How this node holds a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holding {
    Active,
    /// Frozen and lent to `to`, which owns it at `to_epoch` once installed.
    Lent {
        to: SocketAddr,
        to_epoch: u64,
    },
    Parked,
    /// Only in surveys (never in the table): an in-sync replica kept for the owner, at
    /// the owner's epoch; promoted when the owner is lost.
    Replica,
    /// Only in surveys: this node is pulling the partition right now (its lender must
    /// not take it back meanwhile).
    Pulling,
}

impl Holding {
    pub fn name(self) -> &'static str {
        match self {
            Holding::Active => "active",
            Holding::Lent { .. } => "lent",
            Holding::Parked => "parked",
            Holding::Replica => "replica",
            Holding::Pulling => "pulling",
        }
    }
}

/// One partition as this node knows it: the highest epoch it has held it at, and how it
/// holds it now (`None`: not at all).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Part {
    pub epoch: u64,
    pub holding: Option<Holding>,
}

/// This node's holdings, one entry per partition. Owned by the hand-off task.
#[derive(Clone, Debug)]
pub struct Table {
    parts: Vec<Part>,
}

impl Default for Table {
    fn default() -> Self {
        Table { parts: vec![Part::default(); PARTITIONS as usize] }
    }
}

impl Table {
    pub fn get(&self, p: u16) -> Part {
        self.parts[p as usize]
    }

    pub fn set(&mut self, p: u16, part: Part) {
        self.parts[p as usize] = part;
    }

    /// Partitions held in any way, with their entries.
    pub fn held(&self) -> impl Iterator<Item = (u16, Part)> + '_ {
        self.parts.iter().enumerate().filter(|(_, x)| x.holding.is_some()).map(|(p, x)| (p as u16, *x))
    }

    /// How many partitions are held as `h` (compared by kind).
    pub fn count(&self, kind: &str) -> usize {
        self.parts.iter().filter(|x| x.holding.is_some_and(|h| h.name() == kind)).count()
    }

    /// Encodes an entry for the store: epoch (u64 BE), kind (0 none, 1 active, 2 lent,
    /// 3 parked), then for lent the borrower's epoch and address.
    pub fn encode(part: &Part) -> Vec<u8> {
        let mut v = part.epoch.to_be_bytes().to_vec();
        match part.holding {
            None => v.push(0),
            Some(Holding::Active) => v.push(1),
            Some(Holding::Lent { to, to_epoch }) => {
                v.push(2);
                v.extend_from_slice(&to_epoch.to_be_bytes());
                v.extend_from_slice(to.to_string().as_bytes());
            }
            Some(Holding::Parked) => v.push(3),
            Some(Holding::Replica) => v.push(4),
            Some(Holding::Pulling) => v.push(5),
        }
        v
    }

    pub fn decode(b: &[u8]) -> Option<Part> {
        let epoch = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
        let holding = match *b.get(8)? {
            0 => None,
            1 => Some(Holding::Active),
            2 => {
                let to_epoch = u64::from_be_bytes(b.get(9..17)?.try_into().ok()?);
                let to = std::str::from_utf8(b.get(17..)?).ok()?.parse().ok()?;
                Some(Holding::Lent { to, to_epoch })
            }
            3 => Some(Holding::Parked),
            4 => Some(Holding::Replica),
            5 => Some(Holding::Pulling),
            _ => return None,
        };
        Some(Part { epoch, holding })
    }
}

/// What a live member reported holding (see `Handoff.Holdings`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerHolding {
    pub partition: u16,
    pub epoch: u64,
    pub holding: Holding,
}

/// Every live member's holdings, as surveyed for one planning round.
#[derive(Clone, Debug, Default)]
pub struct Survey {
    /// Members that answered, with what they hold.
    pub answered: HashMap<SocketAddr, Vec<PeerHolding>>,
    /// Live members that did not answer: anything they hold is unknown, so nothing may be
    /// adopted or reclaimed this round (it could be theirs).
    pub missing: Vec<SocketAddr>,
}

impl Survey {
    /// Per partition: every (member, holding) reported.
    fn by_partition(&self) -> HashMap<u16, Vec<(SocketAddr, u64, Holding)>> {
        let mut m: HashMap<u16, Vec<(SocketAddr, u64, Holding)>> = HashMap::new();
        for (a, hs) in &self.answered {
            for h in hs {
                m.entry(h.partition).or_default().push((*a, h.epoch, h.holding));
            }
        }
        m
    }

    fn alive(&self, a: &SocketAddr) -> bool {
        self.answered.contains_key(a) || self.missing.contains(a)
    }

    /// Per partition served (active) by a member that answered: its epoch and that
    /// member. Two served copies (a stale one not stood down yet): the higher epoch's.
    pub fn serving(&self) -> HashMap<u16, (u64, SocketAddr)> {
        let mut out: HashMap<u16, (u64, SocketAddr)> = HashMap::new();
        for (a, hs) in &self.answered {
            for h in hs.iter().filter(|h| h.holding == Holding::Active) {
                let e = out.entry(h.partition).or_insert((h.epoch, *a));
                if h.epoch > e.0 {
                    *e = (h.epoch, *a);
                }
            }
        }
        out
    }
}

/// Until when `me` holds a quorum of `base` (itself included) by the times members were
/// last heard from in agreement (`heard`): a strict majority must have been heard within
/// `lease` of that instant. `None`: no majority was heard. A node alone in its base holds
/// it for good (`far`).
pub fn quorum_until(
    me: SocketAddr,
    base: &[SocketAddr],
    heard: &HashMap<SocketAddr, tokio::time::Instant>,
    lease: std::time::Duration,
    far: tokio::time::Instant,
) -> Option<tokio::time::Instant> {
    let others: Vec<&SocketAddr> = base.iter().filter(|a| **a != me).collect();
    if others.is_empty() {
        return Some(far);
    }
    // Others needed besides this node: the least s with 2 (s + 1) > others + 1.
    let need = others.len().div_ceil(2);
    let mut times: Vec<tokio::time::Instant> = others.iter().filter_map(|a| heard.get(*a).copied()).collect();
    times.sort_unstable_by(|a, b| b.cmp(a));
    times.get(need - 1).map(|t| *t + lease)
}

/// Whether `me` holds a quorum at `now` (see [`quorum_until`]).
pub fn has_quorum(
    me: SocketAddr,
    base: &[SocketAddr],
    heard: &HashMap<SocketAddr, tokio::time::Instant>,
    now: tokio::time::Instant,
    lease: std::time::Duration,
) -> bool {
    let far = now + std::time::Duration::from_secs(3600);
    quorum_until(me, base, heard, lease, far).is_some_and(|t| t > now)
}

/// Where the state of a partition being lent comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LendFrom {
    /// Served here (or lent already, to the requester or to a node that is gone: the
    /// frozen state here is current): exported from the shards and trip actors.
    Shards,
    /// The parked copy found on disk at startup.
    Parked,
    /// An in-sync replica of a lost owner, as it is (nothing to freeze).
    Replica,
}

/// Why a holder refuses to lend a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LendRefusal {
    /// The requester is not the partition's owner by the holder's ring (a node whose
    /// view is still partial would pull partitions that move again moments later).
    NotOwner {
        owner: Option<SocketAddr>,
    },
    NotHeld,
    /// Lent to another live node already.
    LentTo(SocketAddr),
    /// The requester's epoch is not above the holder's.
    StaleEpoch {
        wanted: u64,
        held: u64,
    },
}

/// Holder side of a pull: whether this node lends partition `p`, held as `part` (with
/// an in-sync replica at epoch `replica`, if any), to `requester`, which will own it at
/// `epoch`. `ring_owner` is the partition's owner by this node's ring; `alive(a)` says
/// whether member `a` is not down. On `Ok` the holder marks it lent to the requester.
pub fn lend(
    requester: SocketAddr,
    ring_owner: Option<SocketAddr>,
    part: Part,
    replica: Option<u64>,
    epoch: u64,
    alive: impl Fn(&SocketAddr) -> bool,
) -> Result<LendFrom, LendRefusal> {
    if ring_owner != Some(requester) {
        return Err(LendRefusal::NotOwner { owner: ring_owner });
    }
    match part.holding {
        None if replica.is_some_and(|e| e < epoch) => Ok(LendFrom::Replica),
        None => Err(LendRefusal::NotHeld),
        Some(Holding::Lent { to, .. }) if to != requester && alive(&to) => Err(LendRefusal::LentTo(to)),
        Some(_) if epoch <= part.epoch => Err(LendRefusal::StaleEpoch { wanted: epoch, held: part.epoch }),
        Some(Holding::Parked) => Ok(LendFrom::Parked),
        Some(_) => Ok(LendFrom::Shards),
    }
}

/// One step of a hand-off plan, for the shell to perform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Pull the partition from `from` and own it at `epoch`.
    Pull { p: u16, from: SocketAddr, epoch: u64 },
    /// No live node holds it better: serve this node's parked copy (or start empty).
    Adopt { p: u16, epoch: u64 },
    /// It was lent to a node that is gone or lost it: unfreeze and serve it again.
    Reclaim { p: u16, epoch: u64 },
    /// A parked copy of a partition that a live node serves: delete it.
    Discard { p: u16 },
    /// The borrower serves it (its release never arrived): forget the lent copy.
    ForgetLent { p: u16 },
    /// Nobody serves it and this node's replica is the freshest copy: serve it at `epoch`.
    Promote { p: u16, epoch: u64 },
    /// This node's replica is older than the copy someone serves: drop it.
    DropReplica { p: u16, below: u64 },
    /// Another node serves this partition at a higher epoch (it took over while this
    /// node was cut off or frozen): this copy is stale; forget it without any event.
    StandDown { p: u16 },
}

/// The hand-off actions for this node (`me`) by the ring, its table, its in-sync
/// replicas (partition → epoch), the survey, and whether it is serving with its quorum
/// lease (false while it regains service after losing it).
pub fn plan(
    me: SocketAddr,
    ring: &Ring,
    table: &Table,
    replicas: &HashMap<u16, u64>,
    survey: &Survey,
    leased: bool,
) -> Vec<Action> {
    let others = survey.by_partition();
    let none = Vec::new();
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        let mine = table.get(p);
        let my_replica = replicas.get(&p).copied();
        let theirs = others.get(&p).unwrap_or(&none);
        let serving = theirs.iter().find(|(_, _, h)| matches!(h, Holding::Active | Holding::Lent { .. }));
        let max_epoch =
            theirs.iter().map(|(_, e, h)| lent_epoch(*e, *h)).chain([lent_epoch_part(&mine)]).chain(my_replica).max();
        let next = max_epoch.unwrap_or(0) + 1;
        let owner = ring.partition_owner(p as usize) == Some(me);
        if let Some(re) = my_replica {
            let served_at = theirs
                .iter()
                .filter(|(_, _, h)| matches!(h, Holding::Active | Holding::Lent { .. }))
                .map(|(_, e, h)| lent_epoch(*e, *h))
                .chain(
                    matches!(mine.holding, Some(Holding::Active | Holding::Lent { .. }))
                        .then(|| lent_epoch_part(&mine)),
                )
                .max();
            if let Some(e) = served_at.filter(|e| *e > re) {
                out.push(Action::DropReplica { p, below: e });
            }
        }
        // Served elsewhere at a higher epoch, or, while this node regains service after
        // losing its lease, being promoted elsewhere (pulled by a node that does not serve
        // it: not a merge) to a higher epoch. A node serving with its lease sees pulls at a
        // higher epoch when a new owner pulls from it: those are not promotions.
        let newer_elsewhere = theirs.iter().any(|(a, e, h)| match h {
            Holding::Active | Holding::Lent { .. } => lent_epoch(*e, *h) > mine.epoch,
            Holding::Pulling if leased => false,
            Holding::Pulling => *e > mine.epoch && !theirs.iter().any(|(b, _, x)| b == a && *x == Holding::Active),
            _ => false,
        });
        match mine.holding {
            Some(Holding::Active) if newer_elsewhere => out.push(Action::StandDown { p }),
            // Two copies served at one epoch (a node adopted a partition blind, e.g.
            // while the cluster formed): the ring's owner merges the other copy into its own.
            // A copy served at a lower epoch is stale (its node was frozen or cut off while
            // this one took over): merging it would bring back what was deleted since, so
            // it is left to stand down by itself.
            Some(Holding::Active) if owner => {
                let same = |e: u64, h: Holding| h == Holding::Active && e == mine.epoch;
                if let Some((from, _, _)) = theirs.iter().find(|(_, e, h)| same(*e, *h)) {
                    out.push(Action::Pull { p, from: *from, epoch: next });
                }
            }
            Some(Holding::Active) => {}
            Some(Holding::Lent { to, .. }) => {
                let to_holds: Vec<Holding> = theirs.iter().filter(|(a, _, _)| *a == to).map(|(_, _, h)| *h).collect();
                let has = |f: fn(&Holding) -> bool| to_holds.iter().any(f);
                match () {
                    _ if has(|h| matches!(h, Holding::Active | Holding::Lent { .. })) => {
                        out.push(Action::ForgetLent { p })
                    }
                    // Still installing it: wait.
                    _ if has(|h| *h == Holding::Pulling) => {}
                    // The borrower lost it (restarted before installing): take it back if
                    // this node owns it, else wait for the owner to pull it from here.
                    _ if owner
                        && (!survey.alive(&to) || survey.answered.contains_key(&to))
                        && survey.missing.is_empty() =>
                    {
                        out.push(Action::Reclaim { p, epoch: next });
                    }
                    _ => {}
                }
            }
            Some(Holding::Parked) | None if owner => {
                if let Some((from, _, _)) = serving {
                    out.push(Action::Pull { p, from: *from, epoch: next });
                } else if theirs.iter().any(|(_, _, h)| *h == Holding::Pulling) {
                    // Being installed elsewhere (a pull whose lender has just forgotten
                    // it, or a promotion): it is served there in a moment, and pulled
                    // from there. Taking a copy of its own now would serve a second,
                    // older one (a replica without the history being copied there).
                } else if survey.missing.is_empty() {
                    // Nobody serves it: the freshest copy wins, by epoch, then a replica
                    // (kept current until its owner was lost) over a parked copy (the
                    // owner's disk as of its stop), then this node's own copy.
                    let rank = |e: u64, h: Holding| (e, u8::from(h == Holding::Replica));
                    let best = theirs
                        .iter()
                        .filter(|(_, _, h)| matches!(h, Holding::Parked | Holding::Replica))
                        .max_by_key(|(_, e, h)| rank(*e, *h));
                    let local = [
                        my_replica.map(|e| (rank(e, Holding::Replica), true)),
                        (mine.holding == Some(Holding::Parked)).then(|| (rank(mine.epoch, Holding::Parked), false)),
                    ]
                    .into_iter()
                    .flatten()
                    .max();
                    match (best, local) {
                        (Some((from, e, h)), l) if l.is_none_or(|(r, _)| rank(*e, *h) > r) => {
                            out.push(Action::Pull { p, from: *from, epoch: next })
                        }
                        (_, Some((_, true))) => out.push(Action::Promote { p, epoch: next }),
                        _ => out.push(Action::Adopt { p, epoch: next }),
                    }
                }
            }
            Some(Holding::Parked) if serving.is_some() => out.push(Action::Discard { p }),
            Some(Holding::Parked) | Some(Holding::Replica) | Some(Holding::Pulling) | None => {}
        }
    }
    out
}

/// The epoch a holding implies: a lent partition is owned at the borrower's epoch.
fn lent_epoch(epoch: u64, h: Holding) -> u64 {
    match h {
        Holding::Lent { to_epoch, .. } => epoch.max(to_epoch),
        _ => epoch,
    }
}

fn lent_epoch_part(p: &Part) -> u64 {
    p.holding.map_or(p.epoch, |h| lent_epoch(p.epoch, h))
}

/// Where requests for a partition go, from this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Served here.
    Local,
    /// This node owns it by the ring but has not got its state yet: wait.
    Incoming,
    /// This node owns it by the ring and will pull it, but that node still serves it
    /// (this node's last survey saw it active there): forward there until the pull
    /// starts, instead of holding requests for the whole move.
    Via(SocketAddr),
    /// Served (or about to be) by that node (its gossip address).
    Remote(SocketAddr),
    /// Nobody owns it yet (the cluster is forming).
    Unknown,
}

/// The route of every partition: what requests read (one table read per key).
#[derive(Clone, Debug)]
pub struct Routes {
    pub me: SocketAddr,
    /// The checksum of the ring these routes follow.
    pub ring_checksum: u64,
    routes: Vec<Route>,
}

impl Routes {
    /// Routes before anything is known: every request waits or goes by nobody.
    pub fn empty(me: SocketAddr) -> Routes {
        Routes { me, ring_checksum: 0, routes: vec![Route::Unknown; PARTITIONS as usize] }
    }

    pub fn of(&self, p: usize) -> Route {
        self.routes.get(p).copied().unwrap_or(Route::Unknown)
    }

    pub fn of_key(&self, key: &[u8]) -> Route {
        self.of(partition_of(key) as usize)
    }

    /// Whether this node serves any partition.
    pub fn serves_any(&self) -> bool {
        self.routes.contains(&Route::Local)
    }

    /// Partitions this node owns by the ring but has not installed yet.
    pub fn incoming(&self) -> usize {
        self.routes.iter().filter(|r| r.is_incoming()).count()
    }
}

impl Route {
    /// Owned here by the ring, not installed yet (waiting, or forwarded to its holder).
    pub fn is_incoming(self) -> bool {
        matches!(self, Route::Incoming | Route::Via(_))
    }

    /// The node a request is forwarded to, if it is served elsewhere.
    pub fn forward_to(self) -> Option<SocketAddr> {
        match self {
            Route::Remote(a) | Route::Via(a) => Some(a),
            Route::Local | Route::Incoming | Route::Unknown => None,
        }
    }
}

/// The routes for this node (`me`) by the ring and its table.
///
/// `via`: partitions this node owns by the ring and will pull, with the node that still
/// serves them (from the last survey; not those being pulled now, which wait).
pub fn routes(me: SocketAddr, ring: &Ring, table: &Table, via: &HashMap<u16, SocketAddr>) -> Routes {
    let routes = (0..PARTITIONS)
        .map(|p| match table.get(p).holding {
            Some(Holding::Active) => Route::Local,
            Some(Holding::Lent { to, .. }) => Route::Remote(to),
            _ => match ring.partition_owner(p as usize) {
                Some(a) if a == me => match via.get(&p) {
                    Some(holder) if *holder != me => Route::Via(*holder),
                    _ => Route::Incoming,
                },
                Some(a) => Route::Remote(a),
                None => Route::Unknown,
            },
        })
        .collect();
    Routes { me, ring_checksum: ring.checksum(), routes }
}

#[cfg(test)]
mod tests;
