//! Authenticated gossip: every datagram (gossip and heartbeats) carries an HMAC under
//! the cluster's gossip key, with a sender boot id, a sequence number and the send time.
//!
//! ```text
//!  0..4   "LCG1"
//!  4..12  boot id (u64 BE; random per process start)
//! 12..20  sequence (u64 BE; +1 per datagram of this boot)
//! 20..28  send time (wall ms, u64 BE)
//! 28..44  HMAC-SHA256(gossip key, bytes 0..28 ‖ payload), first 16 bytes
//! 44..    payload (a foca packet or a heartbeat)
//! ```
//!
//! [`Opener`] drops, by reason: datagrams without the header (`unauthenticated`), with a
//! wrong tag (`bad_mac`: another cluster's key, or tampered), sent more than
//! [`MAX_SKEW_MS`] from now (`stale`), and replays (`replayed`): per source address it
//! keeps the boot id, the highest sequence and a 64-wide window below it, as IPsec's
//! anti-replay does. A new boot id is accepted only with a send time later than every
//! datagram accepted from that address, so a recorded packet of an earlier boot cannot
//! be replayed after a restart either. State is made only for datagrams whose tag
//! verified, and is bounded ([`MAX_SOURCES`]).

use std::collections::HashMap;
use std::net::SocketAddr;

use ring::hmac;

pub const MAGIC: &[u8; 4] = b"LCG1";
pub const HEADER: usize = 28;
pub const TAG: usize = 16;
/// Datagrams sent further than this from the receiver's clock are dropped.
pub const MAX_SKEW_MS: i64 = 30_000;
/// Sources whose replay state is kept (the oldest is forgotten beyond it).
pub const MAX_SOURCES: usize = 4096;
const WINDOW: u64 = 64;

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    Unauthenticated,
    BadMac,
    Stale,
    Replayed,
}

impl Dropped {
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Unauthenticated => "unauthenticated",
            Dropped::BadMac => "bad_mac",
            Dropped::Stale => "stale",
            Dropped::Replayed => "replayed",
        }
    }
}

fn tag(key: &hmac::Key, header: &[u8], payload: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(header);
    ctx.update(payload);
    ctx.sign()
}

/// The sending side: one per process (one boot id, one sequence).
pub struct Sealer {
    key: hmac::Key,
    boot: u64,
    seq: std::sync::atomic::AtomicU64,
}

impl Sealer {
    pub fn new(key: hmac::Key) -> Sealer {
        Sealer { key, boot: rand::random(), seq: std::sync::atomic::AtomicU64::new(0) }
    }

    /// `payload` with the header and tag in front, sent at `now_ms`.
    pub fn seal(&self, payload: &[u8], now_ms: i64) -> Vec<u8> {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut out = Vec::with_capacity(HEADER + TAG + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.boot.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&(now_ms.max(0) as u64).to_be_bytes());
        let t = tag(&self.key, &out[..HEADER], payload);
        out.extend_from_slice(&t.as_ref()[..TAG]);
        out.extend_from_slice(payload);
        out
    }
}

#[derive(Clone, Copy, Debug)]
struct Source {
    boot: u64,
    /// Highest sequence accepted of this boot.
    top: u64,
    /// Bit i: sequence `top - i` accepted.
    seen: u64,
    /// Latest send time accepted from this address (any boot).
    last_ms: i64,
    /// For eviction: when this source was last accepted (ms).
    touched: i64,
}

/// The receiving side: verifies and remembers what each source sent.
pub struct Opener {
    key: hmac::Key,
    sources: HashMap<SocketAddr, Source>,
}

fn be(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

impl Opener {
    pub fn new(key: hmac::Key) -> Opener {
        Opener { key, sources: HashMap::new() }
    }

    /// The payload of an authentic, fresh datagram from `from`, or why it is dropped.
    pub fn open<'a>(&mut self, from: SocketAddr, datagram: &'a [u8], now_ms: i64) -> Result<&'a [u8], Dropped> {
        if datagram.len() < HEADER + TAG || &datagram[..4] != MAGIC {
            return Err(Dropped::Unauthenticated);
        }
        let (header, rest) = datagram.split_at(HEADER);
        let (sent_tag, payload) = rest.split_at(TAG);
        let want = tag(&self.key, header, payload);
        // Constant-time comparison of the truncated tag.
        let diff = want.as_ref()[..TAG].iter().zip(sent_tag).fold(0u8, |a, (x, y)| a | (x ^ y));
        if diff != 0 {
            return Err(Dropped::BadMac);
        }
        let (boot, seq, ms) = (be(&header[4..12]), be(&header[12..20]), be(&header[20..28]) as i64);
        if (now_ms - ms).abs() > MAX_SKEW_MS {
            return Err(Dropped::Stale);
        }
        match self.sources.get_mut(&from) {
            Some(s) if s.boot == boot => {
                if seq > s.top {
                    let shift = seq - s.top;
                    s.seen = if shift >= WINDOW { 1 } else { (s.seen << shift) | 1 };
                    s.top = seq;
                } else {
                    let back = s.top - seq;
                    if back >= WINDOW || s.seen & (1 << back) != 0 {
                        return Err(Dropped::Replayed);
                    }
                    s.seen |= 1 << back;
                }
                s.last_ms = s.last_ms.max(ms);
                s.touched = now_ms;
            }
            Some(s) => {
                // Another boot: only a later one (a restart), never an earlier one replayed.
                if ms <= s.last_ms {
                    return Err(Dropped::Replayed);
                }
                *s = Source { boot, top: seq, seen: 1, last_ms: ms, touched: now_ms };
            }
            None => {
                if self.sources.len() >= MAX_SOURCES
                    && let Some(oldest) = self.sources.iter().min_by_key(|(_, s)| s.touched).map(|(a, _)| *a)
                {
                    self.sources.remove(&oldest);
                }
                self.sources.insert(from, Source { boot, top: seq, seen: 1, last_ms: ms, touched: now_ms });
            }
        }
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &[u8]) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, s)
    }

    const A: &str = "10.0.0.1:7946";

    #[test]
    fn authentic_packets_pass_once_in_any_order_within_the_window() {
        let s = Sealer::new(key(b"k"));
        let mut o = Opener::new(key(b"k"));
        let from: SocketAddr = A.parse().unwrap();
        let p: Vec<Vec<u8>> = (0..100).map(|i| s.seal(format!("p{i}").as_bytes(), 1_000_000)).collect();
        assert_eq!(o.open(from, &p[10], 1_000_000), Ok(&b"p10"[..]));
        // Earlier ones arrive late (reordered): accepted once, within the window.
        assert!(o.open(from, &p[5], 1_000_000).is_ok());
        assert_eq!(o.open(from, &p[5], 1_000_000), Err(Dropped::Replayed));
        assert_eq!(o.open(from, &p[10], 1_000_000), Err(Dropped::Replayed));
        assert!(o.open(from, &p[99], 1_000_000).is_ok());
        // 99 - 20 = 79 back: outside the 64-wide window.
        assert_eq!(o.open(from, &p[20], 1_000_000), Err(Dropped::Replayed));
        assert!(o.open(from, &p[50], 1_000_000).is_ok());
        // The same datagram from another address is that address's first.
        assert!(o.open("10.0.0.2:7946".parse().unwrap(), &p[99], 1_000_000).is_ok());
    }

    #[test]
    fn wrong_key_tampering_garbage_and_stale_are_dropped() {
        let s = Sealer::new(key(b"k"));
        let mut o = Opener::new(key(b"k"));
        let from: SocketAddr = A.parse().unwrap();
        let other = Sealer::new(key(b"another cluster"));
        assert_eq!(o.open(from, &other.seal(b"x", 0), 0), Err(Dropped::BadMac));
        let mut p = s.seal(b"payload", 0);
        *p.last_mut().unwrap() ^= 1;
        assert_eq!(o.open(from, &p, 0), Err(Dropped::BadMac));
        let mut p = s.seal(b"payload", 0);
        p[15] ^= 1; // the sequence
        assert_eq!(o.open(from, &p, 0), Err(Dropped::BadMac));
        assert_eq!(o.open(from, b"plain foca bytes", 0), Err(Dropped::Unauthenticated));
        assert_eq!(o.open(from, b"", 0), Err(Dropped::Unauthenticated));
        assert_eq!(o.open(from, &s.seal(b"old", 0), MAX_SKEW_MS + 1), Err(Dropped::Stale));
        assert_eq!(o.open(from, &s.seal(b"future", 2 * MAX_SKEW_MS), 0), Err(Dropped::Stale));
    }

    #[test]
    fn a_restart_is_accepted_but_the_old_boot_cannot_be_replayed() {
        let from: SocketAddr = A.parse().unwrap();
        let mut o = Opener::new(key(b"k"));
        let before = Sealer::new(key(b"k"));
        let old = before.seal(b"old", 1_000);
        assert!(o.open(from, &old, 1_000).is_ok());
        let after = Sealer::new(key(b"k"));
        assert!(o.open(from, &after.seal(b"new", 2_000), 2_000).is_ok());
        assert_eq!(o.open(from, &old, 2_000), Err(Dropped::Replayed));
        let old2 = before.seal(b"old again", 1_500);
        assert_eq!(o.open(from, &old2, 2_000), Err(Dropped::Replayed));
    }

    #[test]
    fn source_state_is_bounded() {
        let s = Sealer::new(key(b"k"));
        let mut o = Opener::new(key(b"k"));
        for i in 0..(MAX_SOURCES + 10) {
            let from = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7946));
            assert!(o.open(from, &s.seal(b"x", 5), 5 + i as i64 % 3).is_ok());
        }
        assert_eq!(o.sources.len(), MAX_SOURCES);
    }
}
