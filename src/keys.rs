//! Key hashing and partitions: pure, deterministic across processes and platforms.
//!
//! Every driver key hashes (FNV-1a, 64 bit) to one of [`PARTITIONS`] partitions, and a
//! node's shards own whole partitions ([`shard_of`]), and the ring assigns whole
//! partitions to nodes (`ring::Ring`). Ownership moves in these units.

/// Number of partitions. Fixed for the life of a cluster: every node must agree on it.
pub const PARTITIONS: u16 = 1024;

/// FNV-1a 64-bit hash of a key.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche so that low bits are usable for modulo.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The partition of a key.
#[inline]
pub fn partition_of(key: &[u8]) -> u16 {
    (key_hash(key) % PARTITIONS as u64) as u16
}

/// The shard (of `shards`) on this node that owns a key: the owner of its partition.
#[inline]
pub fn shard_of(key: &[u8], shards: usize) -> usize {
    partition_of(key) as usize % shards
}

/// The store key of a record keyed by `id`: its partition (u16, big-endian) then the id,
/// so one partition's records are one prefix range (see [`partition_prefix`]).
pub fn pkey(id: &str) -> Vec<u8> {
    pkey_bytes(id.as_bytes())
}

/// [`pkey`] of an id given as bytes (as it travels in a hand-off).
pub fn pkey_bytes(id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + id.len());
    k.extend_from_slice(&partition_of(id).to_be_bytes());
    k.extend_from_slice(id);
    k
}

/// The key prefix of partition `p`'s records.
pub fn partition_prefix(p: u16) -> [u8; 2] {
    p.to_be_bytes()
}

/// A set of partitions as a bitmap: a test is a shift and a mask (the hot paths ask
/// "is this driver's partition frozen?" once per fix while a move runs).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PartitionSet {
    bits: [u64; PARTITIONS as usize / 64],
    len: u16,
}

impl PartitionSet {
    #[inline]
    pub fn contains(&self, p: u16) -> bool {
        p < PARTITIONS && self.bits[p as usize / 64] >> (p % 64) & 1 == 1
    }

    pub fn insert(&mut self, p: u16) -> bool {
        if p >= PARTITIONS || self.contains(p) {
            return false;
        }
        self.bits[p as usize / 64] |= 1 << (p % 64);
        self.len += 1;
        true
    }

    pub fn remove(&mut self, p: u16) -> bool {
        if !self.contains(p) {
            return false;
        }
        self.bits[p as usize / 64] &= !(1 << (p % 64));
        self.len -= 1;
        true
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// The partitions in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.bits
            .iter()
            .enumerate()
            .flat_map(|(w, &bits)| (0..64u16).filter(move |b| bits >> b & 1 == 1).map(move |b| w as u16 * 64 + b))
    }

    /// Adds every partition of `other`.
    pub fn union_with(&mut self, other: &PartitionSet) {
        let mut len = 0;
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
            len += a.count_ones() as u16;
        }
        self.len = len;
    }
}

impl<'a> FromIterator<&'a u16> for PartitionSet {
    fn from_iter<I: IntoIterator<Item = &'a u16>>(iter: I) -> Self {
        let mut s = PartitionSet::default();
        s.extend(iter);
        s
    }
}

impl<'a> Extend<&'a u16> for PartitionSet {
    fn extend<I: IntoIterator<Item = &'a u16>>(&mut self, iter: I) {
        for p in iter {
            self.insert(*p);
        }
    }
}

impl std::fmt::Debug for PartitionSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries((0..PARTITIONS).filter(|p| self.contains(*p))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_set_holds_what_was_put_in_and_ignores_what_does_not_exist() {
        let mut s = PartitionSet::default();
        assert!(s.is_empty() && !s.contains(0));
        assert!(s.insert(0) && s.insert(63) && s.insert(64) && s.insert(PARTITIONS - 1));
        assert!(!s.insert(63), "already in");
        assert!(!s.insert(PARTITIONS), "no such partition");
        assert_eq!(s.len(), 4);
        assert!(s.contains(63) && s.contains(64) && !s.contains(65) && !s.contains(PARTITIONS));
        assert!(s.remove(63) && !s.remove(63) && !s.remove(PARTITIONS));
        assert_eq!(format!("{s:?}"), format!("{{0, 64, {}}}", PARTITIONS - 1));
        let t: PartitionSet = [5u16, 6, 5].iter().collect();
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn stable_and_spread() {
        // Every node must compute the same partition for a key.
        assert_eq!(key_hash(b""), key_hash(b""));
        assert_eq!(partition_of(b"driver-42"), partition_of(b"driver-42"));
        let mut counts = [0u32; 4];
        for i in 0..40_000 {
            counts[shard_of(format!("d{i}").as_bytes(), 4)] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }
}
