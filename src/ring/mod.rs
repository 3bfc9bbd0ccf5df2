//! The consistent-hash ring (pure): which node owns a key.
//!
//! Keys map to one of [`PARTITIONS`] partitions (`keys::partition_of`); partitions map to
//! nodes on a hashring of virtual nodes (default [`DEFAULT_VNODES`] per node). Every
//! node computes the same ring from the same member set because both the virtual nodes
//! and the partition points are hashed from fixed bytes (never from std's `Hash` of a
//! `SocketAddr`, which is not portable). Owning whole partitions keeps per-fix routing a
//! table lookup, and gives hand-off a unit to move.
//!
//! A ring is immutable: the membership task builds a new one when the member set changes
//! and publishes it; readers hold an `Arc` to the one they started with.

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::SocketAddr;

use hashring::{DefaultHashBuilder, HashRing};

use crate::keys::{PARTITIONS, key_hash, partition_of};

/// Virtual nodes per member unless configured otherwise.
pub const DEFAULT_VNODES: u32 = 128;

/// A node's stable ring key: its gossip address as 18 fixed bytes (IPv6 form + port).
pub fn addr_bytes(a: &SocketAddr) -> [u8; 18] {
    let ip = match a {
        SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped(),
        SocketAddr::V6(v6) => *v6.ip(),
    };
    let mut b = [0u8; 18];
    b[..16].copy_from_slice(&ip.octets());
    b[16..].copy_from_slice(&a.port().to_be_bytes());
    b
}

/// Members in ring order, without duplicates.
fn canonical(members: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut members: Vec<SocketAddr> = members.into_iter().collect();
    members.sort_by_key(addr_bytes);
    members.dedup();
    members.truncate(u16::MAX as usize);
    members
}

fn checksum_sorted(members: &[SocketAddr], vnodes: u32) -> u64 {
    let mut bytes = vnodes.max(1).to_be_bytes().to_vec();
    for a in members {
        bytes.extend_from_slice(&addr_bytes(a));
    }
    key_hash(&bytes)
}

/// The checksum [`Ring::new`] would give these members, without building the ring.
pub fn checksum(members: impl IntoIterator<Item = SocketAddr>, vnodes: u32) -> u64 {
    checksum_sorted(&canonical(members), vnodes)
}

/// One virtual node. `Copy` because hashring clones points freely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VNode {
    member: u16,
    idx: u32,
    key: [u8; 18],
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write(&self.key);
        h.write(&self.idx.to_be_bytes());
    }
}

/// The point of a partition on the ring.
struct PartitionPoint(u16);

impl Hash for PartitionPoint {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write(b"locus-partition");
        h.write(&self.0.to_be_bytes());
    }
}

/// An immutable ring over a set of members (identified by gossip address).
#[derive(Debug)]
pub struct Ring {
    members: Vec<SocketAddr>,
    vnodes: u32,
    /// Every virtual node's point, sorted: the walk for distinct successors.
    points: Vec<(u64, u16)>,
    /// The owner (index into `members`) of every partition.
    owners: Vec<u16>,
    checksum: u64,
}

impl Ring {
    /// Builds the ring for `members` (order and duplicates do not matter).
    pub fn new(members: impl IntoIterator<Item = SocketAddr>, vnodes: u32) -> Ring {
        let members = canonical(members);
        let vnodes = vnodes.max(1);
        let mut vns = Vec::with_capacity(members.len() * vnodes as usize);
        let mut points = Vec::with_capacity(vns.capacity());
        for (m, a) in members.iter().enumerate() {
            let key = addr_bytes(a);
            for idx in 0..vnodes {
                let v = VNode { member: m as u16, idx, key };
                points.push((DefaultHashBuilder.hash_one(v), m as u16));
                vns.push(v);
            }
        }
        points.sort_unstable();
        // One sort for all points (`add` would re-sort per point).
        let mut ring = HashRing::with_hasher(DefaultHashBuilder);
        ring.batch_add(vns);
        let owners = (0..PARTITIONS).map(|p| ring.get(&PartitionPoint(p)).map_or(0, |v| v.member)).collect();
        let checksum = checksum_sorted(&members, vnodes);
        Ring { members, vnodes, points, owners, checksum }
    }

    /// The members, in ring order (sorted by address bytes).
    pub fn members(&self) -> &[SocketAddr] {
        &self.members
    }

    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    pub fn contains(&self, a: &SocketAddr) -> bool {
        self.members.contains(a)
    }

    /// A digest of the member set and vnode count: equal on every node that agrees.
    pub fn checksum(&self) -> u64 {
        self.checksum
    }

    /// The owner of a partition.
    pub fn partition_owner(&self, p: usize) -> Option<SocketAddr> {
        self.members.get(*self.owners.get(p)? as usize).copied()
    }

    /// The owner of a key.
    pub fn owner(&self, key: &[u8]) -> Option<SocketAddr> {
        self.partition_owner(partition_of(key) as usize)
    }

    /// Up to `n` distinct members for a key: its owner first, then the next distinct
    /// members clockwise (the hand-off and replica targets).
    pub fn successors(&self, key: &[u8], n: usize) -> Vec<SocketAddr> {
        self.partition_successors(partition_of(key) as usize, n)
    }

    pub fn partition_successors(&self, p: usize, n: usize) -> Vec<SocketAddr> {
        let n = n.min(self.members.len());
        let mut out: Vec<SocketAddr> = Vec::with_capacity(n);
        if n == 0 {
            return out;
        }
        let h = DefaultHashBuilder.hash_one(PartitionPoint(p as u16));
        let start = self.points.partition_point(|(ph, _)| *ph < h);
        let len = self.points.len();
        for i in 0..len {
            let m = self.members[self.points[(start + i) % len].1 as usize];
            if !out.contains(&m) {
                out.push(m);
                if out.len() == n {
                    break;
                }
            }
        }
        out
    }

    /// The partitions `member` owns.
    pub fn owned_by(&self, member: &SocketAddr) -> Vec<bool> {
        let me = self.members.iter().position(|m| m == member);
        self.owners.iter().map(|o| Some(*o as usize) == me).collect()
    }

    /// Per member: (partitions owned, share of the hash space its virtual nodes cover).
    pub fn shares(&self) -> Vec<(SocketAddr, usize, f64)> {
        let mut parts = vec![0usize; self.members.len()];
        for o in &self.owners {
            parts[*o as usize] += 1;
        }
        let mut arc = vec![0f64; self.members.len()];
        let len = self.points.len();
        for i in 0..len {
            // A point owns the arc from its predecessor (exclusive) to itself.
            let prev = if i == 0 { self.points[len - 1].0 } else { self.points[i - 1].0 };
            let span = self.points[i].0.wrapping_sub(prev);
            arc[self.points[i].1 as usize] += span as f64 / u64::MAX as f64;
        }
        if len == 1 {
            arc[0] = 1.0;
        }
        self.members.iter().enumerate().map(|(i, m)| (*m, parts[i], arc[i])).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n).map(|i| SocketAddr::from(([127, 0, 0, 1], 7000 + i))).collect()
    }

    #[test]
    fn every_node_computes_the_same_ring() {
        let mut a = addrs(5);
        let r1 = Ring::new(a.clone(), 128);
        a.reverse();
        let r2 = Ring::new(a, 128);
        assert_eq!(r1.checksum(), r2.checksum());
        for p in 0..PARTITIONS as usize {
            assert_eq!(r1.partition_owner(p), r2.partition_owner(p));
        }
        assert_eq!(r1.checksum(), checksum(addrs(5), 128), "the checksum needs no ring");
        // Pinned values: nodes of different builds must agree, so a change here breaks
        // mixed-version clusters.
        assert_eq!(r1.checksum(), 0x93c9_c513_3abc_d22b);
        assert_eq!(r1.owner(b"driver-1"), Some(addrs(5)[2]));
        assert_eq!(r1.owner(b"driver-2"), Some(addrs(5)[0]));
    }

    #[test]
    fn successors_are_distinct_and_start_with_the_owner() {
        let r = Ring::new(addrs(4), 64);
        for p in 0..PARTITIONS as usize {
            let s = r.partition_successors(p, 10);
            assert_eq!(s.len(), 4);
            assert_eq!(Some(s[0]), r.partition_owner(p), "the walk agrees with hashring's get");
            let mut d = s.clone();
            d.dedup();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 4);
        }
        assert!(Ring::new(Vec::new(), 8).successors(b"x", 3).is_empty());
    }

    #[test]
    fn vnodes_balance_and_a_join_moves_keys_only_to_the_new_node() {
        let r3 = Ring::new(addrs(3), DEFAULT_VNODES);
        for (_, parts, share) in r3.shares() {
            assert!((250..=440).contains(&parts), "{parts} partitions of 1024");
            assert!((0.22..0.45).contains(&share), "share {share}");
        }
        let total: f64 = r3.shares().iter().map(|s| s.2).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let r4 = Ring::new(addrs(4), DEFAULT_VNODES);
        let new = addrs(4)[3];
        let mut moved = 0;
        for p in 0..PARTITIONS as usize {
            let (a, b) = (r3.partition_owner(p).unwrap(), r4.partition_owner(p).unwrap());
            if a != b {
                assert_eq!(b, new, "a partition moved between old members");
                moved += 1;
            }
        }
        assert!((150..400).contains(&moved), "{moved} partitions moved");
        assert_ne!(r3.checksum(), r4.checksum());
    }
}
