//! Key hashing and partitions: pure, deterministic across processes and platforms.
//!
//! Every driver key hashes (FNV-1a, 64 bit) to one of [`PARTITIONS`] partitions. Stored
//! state is laid out by partition (see `storage`) so that moving a partition to another
//! node later is one range scan; shards within a node are chosen from the same hash.

/// Number of storage partitions. Fixed forever: it is part of the on-disk layout.
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

/// The storage partition of a key.
#[inline]
pub fn partition_of(key: &[u8]) -> u16 {
    (key_hash(key) % PARTITIONS as u64) as u16
}

/// The shard (of `shards`) on this node that owns a key.
#[inline]
pub fn shard_of(key: &[u8], shards: usize) -> usize {
    ((key_hash(key) >> 16) % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_spread() {
        // The hash is part of the on-disk layout: it must never change.
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
