//! The quorum base: the members whose majority this node needs to serve. Pure: the
//! view, whether the lease holds and `now` go in; the members come out.
//!
//! Ring members join the base as they appear (and count as heard for a lease as they
//! join: a new member is not a failure). Members leave it by leaving gracefully (they
//! say "leaving"), or, after a crash, once they have been out of the ring for
//! [`BASE_FORGET`] and this node held its lease on a ring without them at least once
//! meanwhile (a majority of the base confirmed them gone): so a node lost for good and
//! replaced does not count against the next failure's majority. A node cut off on a
//! minority side cannot confirm, so it never shrinks its base below the majority that
//! excluded it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

/// How long a crashed member stays in the quorum base while the rest hold a majority
/// without it.
pub const BASE_FORGET: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct QuorumBase {
    me: SocketAddr,
    /// Sorted; always holds `me`.
    members: Vec<SocketAddr>,
    /// Members that joined the base within a lease (they count as heard).
    joined: HashMap<SocketAddr, Instant>,
    /// Members of the base out of the ring: since when, and whether a lease held on a
    /// ring without them has confirmed them gone.
    gone: HashMap<SocketAddr, (Instant, bool)>,
}

impl QuorumBase {
    /// The base as stored (`decode`d); one stored under another address of this node
    /// is a new member's: it learns its base from the ring.
    pub fn new(me: SocketAddr, mut stored: Vec<SocketAddr>) -> QuorumBase {
        if !stored.contains(&me) {
            stored.clear();
            stored.push(me);
        }
        stored.sort();
        stored.dedup();
        QuorumBase { me, members: stored, joined: HashMap::new(), gone: HashMap::new() }
    }

    pub fn members(&self) -> &[SocketAddr] {
        &self.members
    }

    /// This node alone in its base (it serves without hearing anyone).
    pub fn alone(&self) -> bool {
        self.members.iter().all(|a| *a == self.me)
    }

    /// Follows the view: `ring` are the ring's members, `leaving(a)` whether member `a`
    /// says it is leaving, `holds` whether the lease holds now, `confirm_after` how long
    /// a member must have been out of the ring before a held lease confirms it gone (the
    /// ring change grace plus the lease: agreement may still be on the ring with it until
    /// then). Returns whether the members changed (to be persisted).
    pub fn update(
        &mut self,
        now: Instant,
        ring: &[SocketAddr],
        leaving: impl Fn(&SocketAddr) -> bool,
        holds: bool,
        confirm_after: Duration,
    ) -> bool {
        let before = self.members.clone();
        for m in ring {
            if !self.members.contains(m) {
                self.members.push(*m);
                self.joined.insert(*m, now);
            }
        }
        let members = &self.members;
        self.gone.retain(|a, _| members.contains(a) && !ring.contains(a));
        for a in &self.members {
            if *a != self.me && !ring.contains(a) {
                let (since, confirmed) = self.gone.entry(*a).or_insert((now, false));
                if holds && now.saturating_duration_since(*since) >= confirm_after {
                    *confirmed = true;
                }
            }
        }
        let (me, gone) = (self.me, &self.gone);
        self.members.retain(|a| {
            let forgotten = gone
                .get(a)
                .is_some_and(|(t, confirmed)| *confirmed && now.saturating_duration_since(*t) >= BASE_FORGET);
            *a == me || (!forgotten && !leaving(a))
        });
        self.members.sort();
        self.members != before
    }

    /// Adds the members that joined within `lease_for` to `heard` (as heard when they
    /// joined) and forgets older joins.
    pub fn count_joins(&mut self, now: Instant, lease_for: Duration, heard: &mut HashMap<SocketAddr, Instant>) {
        self.joined.retain(|_, t| now.saturating_duration_since(*t) < lease_for);
        for (m, t) in &self.joined {
            let e = heard.entry(*m).or_insert(*t);
            *e = (*e).max(*t);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let v: Vec<String> = self.members.iter().map(|a| a.to_string()).collect();
        v.join(",").into_bytes()
    }

    pub fn decode(b: &[u8]) -> Vec<SocketAddr> {
        std::str::from_utf8(b).map(|s| s.split(',').filter_map(|a| a.parse().ok()).collect()).unwrap_or_default()
    }
}
