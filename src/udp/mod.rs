//! Compact UDP fixes: the datagram format, sessions and their keys.
//!
//! A gateway opens a session for a driver (`Sessions.Open`, on the driver's owner). The
//! session id names the driver's partition in its top 10 bits, so any node can tell a
//! datagram's owner without a lookup; it is recorded as the driver's `session` (and
//! ends with the driver, on `Sessions.Close`, or when a fix names another session). The
//! session key is derived from the id and the cluster key, so every node can check a
//! datagram's MAC before it forwards anything, and no key is stored.
//!
//! A datagram is a `locus.v1.UdpFix` (protobuf, `session_id` first) followed by its MAC:
//! SipHash-2-4 under the 16-byte session key over everything before it, the 64-bit tag
//! little-endian ([`MAC_LEN`] bytes). SipHash is a keyed PRF made for short messages:
//! a 40-byte datagram costs tens of nanoseconds to check, against several hundred for
//! HMAC-SHA256, which only derives the session keys (once per session and node). A fix
//! on a trip is 60 bytes, an idle driver's 44 ([`seal`]; `tests` pins the figures).
//!
//! [`open`] checks a datagram (size, trailer, MAC, protobuf) and [`fix_input`] turns it
//! into the same [`FixInput`] a gRPC fix becomes, for the same validation and ordering
//! on the owner. Nothing here panics on any input (fuzzed in `tests`).

pub mod ingest;
pub mod mmsg;

use prost::Message;
use ring::hmac;
use siphasher::sip::SipHasher24;

use crate::drivers::{FixInput, Status, UDP_SESSION_PREFIX};
use crate::keys::PARTITIONS;
use crate::pb;

/// The MAC's length on the wire: the datagram's last bytes.
pub const MAC_LEN: usize = 8;
/// The longest datagram accepted (a fix with a 64-byte order id is well under).
pub const MAX_DATAGRAM: usize = 256;
/// What every node derives keys from when no cluster key is configured (`--insecure`
/// or loopback): anyone can forge datagrams then, as anyone can call the gRPC API.
const INSECURE_MASTER: &[u8] = b"locus/v1/udp-session-keys/insecure";
const ID_BITS: u32 = 54;
const _: () = assert!(PARTITIONS as u64 == 1 << (64 - ID_BITS), "a session id's top bits are exactly a partition");

/// A UDP session: the driver's partition and 54 random bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64);

impl SessionId {
    pub fn new(partition: u16, random: u64) -> SessionId {
        SessionId(((partition as u64) << ID_BITS) | (random & ((1 << ID_BITS) - 1)))
    }

    /// The driver's partition (so the owner of the datagram).
    pub fn partition(self) -> u16 {
        (self.0 >> ID_BITS) as u16
    }

    /// The session as recorded with the driver (its `session`).
    pub fn recorded(self) -> String {
        self.recorded_in(&mut [0; 20]).to_owned()
    }

    /// [`recorded`](Self::recorded) written into `buf`, without allocating.
    pub fn recorded_in(self, buf: &mut [u8; 20]) -> &str {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        buf[..4].copy_from_slice(UDP_SESSION_PREFIX.as_bytes());
        for i in 0..16 {
            buf[4 + i] = HEX[((self.0 >> (60 - 4 * i)) & 0xF) as usize];
        }
        std::str::from_utf8(buf).expect("ASCII")
    }
}

/// Derives session keys (from the cluster key's UDP secret).
#[derive(Clone)]
pub struct Keys {
    master: hmac::Key,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// `secret`: the cluster key's UDP secret, or `None` for the insecure default.
    pub fn new(secret: Option<&[u8]>) -> Keys {
        Keys { master: hmac::Key::new(hmac::HMAC_SHA256, secret.unwrap_or(INSECURE_MASTER)) }
    }

    /// The 16-byte key of a session.
    pub fn session_key(&self, id: SessionId) -> [u8; 16] {
        let tag = hmac::sign(&self.master, &id.0.to_le_bytes());
        tag.as_ref()[..16].try_into().expect("HMAC-SHA256 is 32 bytes")
    }
}

/// The MAC of `body` under a session key (SipHash-2-4, the tag little-endian).
pub fn mac(key: &[u8; 16], body: &[u8]) -> [u8; MAC_LEN] {
    SipHasher24::new_with_key(key).hash(body).to_le_bytes()
}

/// Sessions a [`KeyCache`] generation holds (about 40 bytes each, plus a driver id once
/// looked up: some 10 MiB for both generations when full).
const KEY_CACHE_GENERATION: usize = 1 << 17;

/// What a receive task keeps of a session: its key, and its driver once looked up.
struct Known {
    key: [u8; 16],
    driver: Option<Box<str>>,
}

/// Sessions seen by a receive task (its own, no lock): a datagram of a known session
/// costs one SipHash instead of an HMAC-SHA256 key derivation first, and its driver no
/// trip to the node's session index. A session names one driver for its whole life (its
/// id is random), so a cached driver is never wrong, only possibly gone: the shard
/// applies a fix only while its driver still holds the session. Datagrams with made-up
/// sessions (which fail their MAC) are not cached. Two generations: when the new one
/// is full it becomes the old one (the previous old one is dropped), and a session
/// found in the old one moves back, so the sessions in use stay however many there are.
pub struct KeyCache {
    keys: Keys,
    map: hashbrown::HashMap<u64, Known>,
    old: hashbrown::HashMap<u64, Known>,
}

impl KeyCache {
    pub fn new(keys: Keys) -> KeyCache {
        KeyCache { keys, map: hashbrown::HashMap::new(), old: hashbrown::HashMap::new() }
    }

    /// [`open`], with the session's key from the cache.
    pub fn open(&mut self, datagram: &[u8]) -> Result<pb::UdpFix, Drop> {
        let (id, body, tag) = frame(datagram)?;
        if let Some(k) = self.map.get(&id.0) {
            return check(&k.key, id, body, tag);
        }
        let known = match self.old.remove(&id.0) {
            Some(k) => k,
            None => Known { key: self.keys.session_key(id), driver: None },
        };
        let fix = check(&known.key, id, body, tag)?;
        if self.map.len() >= KEY_CACHE_GENERATION {
            self.old = std::mem::take(&mut self.map);
        }
        self.map.insert(id.0, known);
        Ok(fix)
    }

    /// The driver of a session [`open`](Self::open) let through, from the cache or else
    /// from `lookup` (then cached).
    pub fn driver(&mut self, session: SessionId, lookup: impl FnOnce() -> Option<String>) -> Option<String> {
        let known = self.map.get_mut(&session.0);
        if let Some(d) = known.as_ref().and_then(|k| k.driver.as_deref()) {
            return Some(d.to_owned());
        }
        let d = lookup()?;
        if let Some(k) = known {
            k.driver = Some(d.as_str().into());
        }
        Some(d)
    }

    /// Sessions held (both generations).
    pub fn len(&self) -> usize {
        self.map.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The app's side: a fix as a datagram, sealed with the session key.
pub fn seal(fix: &pb::UdpFix, key: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fix.encoded_len() + MAC_LEN);
    fix.encode(&mut out).expect("a Vec grows");
    let m = mac(key, &out);
    out.extend_from_slice(&m);
    out
}

/// Why a datagram was dropped (`locus_udp_dropped_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Too short or too long, not starting with the session, or not protobuf.
    Malformed,
    /// The MAC does not match: forged, corrupted, or a key from another cluster.
    Unauthenticated,
    /// No driver holds the session (closed, expired, replaced).
    UnknownSession,
    /// Not newer than the driver's last fix (a replay, or reordered in the network).
    Replayed,
    /// A field out of range (the same checks as a gRPC fix).
    Invalid,
}

impl Drop {
    pub fn name(self) -> &'static str {
        match self {
            Drop::Malformed => "malformed",
            Drop::Unauthenticated => "unauthenticated",
            Drop::UnknownSession => "unknown_session",
            Drop::Replayed => "replayed",
            Drop::Invalid => "invalid",
        }
    }
}

/// Constant-time equality of two MACs.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A datagram's session, body and MAC, if it is framed right.
fn frame(datagram: &[u8]) -> Result<(SessionId, &[u8], &[u8]), Drop> {
    let n = datagram.len();
    if !(9 + MAC_LEN..=MAX_DATAGRAM).contains(&n) {
        return Err(Drop::Malformed);
    }
    let body = &datagram[..n - MAC_LEN];
    // The session id is the first field (tag 0x09, fixed64): read it before decoding,
    // so a forged datagram costs one key derivation and one MAC, and no allocation.
    if body[0] != 0x09 {
        return Err(Drop::Malformed);
    }
    let id = SessionId(u64::from_le_bytes(body[1..9].try_into().expect("8 bytes")));
    Ok((id, body, &datagram[n - MAC_LEN..]))
}

/// Checks a datagram: its size, session and MAC, then decodes it.
pub fn open(keys: &Keys, datagram: &[u8]) -> Result<pb::UdpFix, Drop> {
    let (id, body, tag) = frame(datagram)?;
    check(&keys.session_key(id), id, body, tag)
}

fn check(key: &[u8; 16], id: SessionId, body: &[u8], tag: &[u8]) -> Result<pb::UdpFix, Drop> {
    if !same(&mac(key, body), tag) {
        return Err(Drop::Unauthenticated);
    }
    let fix = pb::UdpFix::decode(body).map_err(|_| Drop::Malformed)?;
    if fix.session_id != id.0 {
        // A second session_id field later in the body would win in protobuf.
        return Err(Drop::Malformed);
    }
    Ok(fix)
}

/// A checked datagram as the fix the driver's owner validates and applies, for the
/// driver found by its session. The fix names the session: the shard applies it only
/// while the driver still holds it (not closed or replaced meanwhile).
pub fn fix_input(f: pb::UdpFix, driver_id: String) -> Result<FixInput, Drop> {
    let status = match f.status {
        0 => None,
        s => Some(Status::from_code(i32::try_from(s).map_err(|_| Drop::Invalid)?).ok_or(Drop::Invalid)?),
    };
    if status == Some(Status::Dispatched) {
        // Only dispatch sets it (a claim), as over gRPC.
        return Err(Drop::Invalid);
    }
    Ok(FixInput {
        driver_id,
        lat: f.lat_e7 as f64 / 1e7,
        lon: f.lon_e7 as f64 / 1e7,
        heading_deg: f.heading_4deg as f64 * 4.0,
        speed_mps: f.speed_dms as f64 / 10.0,
        accuracy_m: f.accuracy_m as f64,
        timestamp_ms: i64::try_from(f.time_ms).map_err(|_| Drop::Invalid)?,
        status,
        vehicle_type: String::new(),
        cab_number: String::new(),
        session: SessionId(f.session_id).recorded(),
        trip_id: f.order_id,
        trip_cost: f.trip_cost_cents as f64 / 100.0,
    })
}

/// The app's side: a fix quantised into a datagram's fields.
#[allow(clippy::too_many_arguments)]
pub fn quantise(
    session: SessionId,
    lat: f64,
    lon: f64,
    time_ms: i64,
    heading_deg: f64,
    speed_mps: f64,
    accuracy_m: f64,
    seq: u32,
) -> pb::UdpFix {
    pb::UdpFix {
        session_id: session.0,
        lat_e7: (lat * 1e7).round() as i32,
        lon_e7: (lon * 1e7).round() as i32,
        time_ms: time_ms.max(0) as u64,
        heading_4deg: ((heading_deg.rem_euclid(360.0) / 4.0).round() as u32) % 90,
        speed_dms: (speed_mps * 10.0).round().max(0.0) as u32,
        accuracy_m: accuracy_m.round().max(0.0) as u32,
        seq,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
