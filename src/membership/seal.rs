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
//! [`MAX_SKEW_MS`] from now (`stale`), and replays (`replayed`): per sender *boot id*
//! (authenticated, unlike the UDP source address, which anyone can forge) it keeps the
//! highest sequence and a 64-wide window below it, as IPsec's anti-replay does. A copy
//! of a datagram is a replay from whatever address it comes; one older than the skew
//! limit is stale, so a boot's state outlives every datagram of it that could still be
//! replayed. State is made only for datagrams whose tag verified, so only real senders
//! make it, and it is bounded ([`MAX_SOURCES`] boots). The nodes' clocks must agree
//! within [`MAX_SKEW_MS`].

use std::collections::HashMap;

use ring::hmac;

pub const MAGIC: &[u8; 4] = b"LCG1";
pub const HEADER: usize = 28;
pub const TAG: usize = 16;
/// Datagrams sent further than this from the receiver's clock are dropped.
pub const MAX_SKEW_MS: i64 = 30_000;
/// Sender boots whose replay state is kept (the least recently heard is forgotten
/// beyond it; only authenticated datagrams make one).
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
    /// Highest sequence accepted of this boot.
    top: u64,
    /// Bit i: sequence `top - i` accepted.
    seen: u64,
    /// For eviction: when this boot was last accepted (ms).
    touched: i64,
}

/// The receiving side: verifies and remembers what each sender boot sent.
pub struct Opener {
    key: hmac::Key,
    sources: HashMap<u64, Source>,
}

fn be(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

impl Opener {
    pub fn new(key: hmac::Key) -> Opener {
        Opener { key, sources: HashMap::new() }
    }

    /// The payload of an authentic, fresh datagram (from wherever it came), or why it
    /// is dropped.
    pub fn open<'a>(&mut self, datagram: &'a [u8], now_ms: i64) -> Result<&'a [u8], Dropped> {
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
        // `ms` is authenticated: a wrapped (huge) value is just far from now.
        if (now_ms - ms).abs() > MAX_SKEW_MS {
            return Err(Dropped::Stale);
        }
        match self.sources.get_mut(&boot) {
            Some(s) => {
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
                s.touched = now_ms;
            }
            None => {
                if self.sources.len() >= MAX_SOURCES
                    && let Some(oldest) = self.sources.iter().min_by_key(|(_, s)| s.touched).map(|(b, _)| *b)
                {
                    self.sources.remove(&oldest);
                }
                self.sources.insert(boot, Source { top: seq, seen: 1, touched: now_ms });
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

    #[test]
    fn authentic_packets_pass_once_in_any_order_within_the_window() {
        let s = Sealer::new(key(b"k"));
        let mut o = Opener::new(key(b"k"));
        let p: Vec<Vec<u8>> = (0..100).map(|i| s.seal(format!("p{i}").as_bytes(), 1_000_000)).collect();
        assert_eq!(o.open(&p[10], 1_000_000), Ok(&b"p10"[..]));
        // Earlier ones arrive late (reordered): accepted once, within the window.
        assert!(o.open(&p[5], 1_000_000).is_ok());
        assert_eq!(o.open(&p[5], 1_000_000), Err(Dropped::Replayed));
        assert_eq!(o.open(&p[10], 1_000_000), Err(Dropped::Replayed));
        assert!(o.open(&p[99], 1_000_000).is_ok());
        // 99 - 20 = 79 back: outside the 64-wide window.
        assert_eq!(o.open(&p[20], 1_000_000), Err(Dropped::Replayed));
        assert!(o.open(&p[50], 1_000_000).is_ok());
        // The same datagram from another (forged) address is still a replay.
        assert_eq!(o.open(&p[99], 1_000_000), Err(Dropped::Replayed));
    }

    #[test]
    fn wrong_key_tampering_garbage_and_stale_are_dropped() {
        let s = Sealer::new(key(b"k"));
        let mut o = Opener::new(key(b"k"));
        let other = Sealer::new(key(b"another cluster"));
        assert_eq!(o.open(&other.seal(b"x", 0), 0), Err(Dropped::BadMac));
        let mut p = s.seal(b"payload", 0);
        *p.last_mut().unwrap() ^= 1;
        assert_eq!(o.open(&p, 0), Err(Dropped::BadMac));
        let mut p = s.seal(b"payload", 0);
        p[15] ^= 1; // the sequence
        assert_eq!(o.open(&p, 0), Err(Dropped::BadMac));
        assert_eq!(o.open(b"plain foca bytes", 0), Err(Dropped::Unauthenticated));
        assert_eq!(o.open(b"", 0), Err(Dropped::Unauthenticated));
        assert_eq!(o.open(&s.seal(b"old", 0), MAX_SKEW_MS + 1), Err(Dropped::Stale));
        assert_eq!(o.open(&s.seal(b"future", 2 * MAX_SKEW_MS), 0), Err(Dropped::Stale));
    }

    #[test]
    fn a_restart_is_accepted_and_the_old_boot_cannot_be_replayed() {
        let mut o = Opener::new(key(b"k"));
        let before = Sealer::new(key(b"k"));
        let old = before.seal(b"old", 1_000);
        assert!(o.open(&old, 1_000).is_ok());
        // A restart (a new boot), even with its clock a little behind.
        let after = Sealer::new(key(b"k"));
        assert!(o.open(&after.seal(b"new", 900), 2_000).is_ok());
        assert_eq!(o.open(&old, 2_000), Err(Dropped::Replayed));
        // Once older than the skew limit, the old boot's datagrams are stale anyway.
        assert_eq!(o.open(&old, 1_000 + MAX_SKEW_MS + 1), Err(Dropped::Stale));
    }

    #[test]
    fn source_state_is_bounded() {
        let s = Sealer::new(key(b"k"));
        let mut o = Opener::new(key(b"k"));
        for i in 0..(MAX_SOURCES + 10) {
            let boot = Sealer::new(key(b"k"));
            assert!(o.open(&boot.seal(b"x", 5), 5 + i as i64 % 3).is_ok());
        }
        let _ = s;
        assert_eq!(o.sources.len(), MAX_SOURCES);
    }
}
