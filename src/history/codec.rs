//! The history's two encodings: the raw entries a shard appends per accepted fix (flat,
//! no allocation), and the compact blocks they become on disk and on the wire.
//!
//! A **block** holds one partition's fixes from one commit, at consecutive positions:
//!
//! ```text
//! flags u8 (bit 0: starts a segment, so its name table starts empty)
//! epoch varint · first seq varint · count varint · base received ms varint
//! new names: n varint, then n × (len varint, utf-8 bytes)      (driver and trip ids)
//! count × record:
//!   name index varint
//!   received ms − previous record's (the first: − base) varint
//!   device ms − received ms          zigzag varint
//!   lat, lon (1e-7 degree) − previous record's (the first: − 0)  zigzag varints
//!   motion varint (heading 1°, speed 0.1 m/s, accuracy 1 m, packed as in a trail)
//!   status u8 · trip: 0 or name index + 1, varint · trip cost in cents varint
//! ```
//!
//! A block of **state changes** (flag bit 1) has the same header and records of
//! `entity u8 · id index · state index · from-state: 0 or index + 1 · ms − previous
//! record's (zigzag) · lat, lon deltas`: driver and trip events share their
//! partition's positions with its fixes, so one cursor replays both.
//!
//! Names are numbered per segment: a block adds the ones its segment has not seen yet, so
//! a driver's id is written once per segment, and a typical fix takes 12–18 bytes. In a
//! file (and a replication or hand-off payload) every block is framed as
//! `u32 length | u32 crc32 | block`.

use std::sync::Arc;

use super::Pos;

/// Bit 0 of a block's flags: the block starts a new segment (and name table).
pub const STARTS_SEGMENT: u8 = 1;
/// Bit 1: the block holds state changes, not fixes.
pub const EVENTS: u8 = 2;

/// A frame's header: length and checksum.
pub const FRAME_HEADER: usize = 8;

/// Longest id the raw encoding carries (ids are validated to 64 bytes before a fix is
/// applied).
const MAX_NAME: usize = u8::MAX as usize;

/// One accepted fix as the history keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct HistFix {
    pub pos: Pos,
    pub driver_id: Arc<str>,
    pub lat_e7: i32,
    pub lon_e7: i32,
    /// Heading, speed and accuracy, packed as a trail fix's (`drivers::TrailFix`).
    pub motion: u32,
    /// Device time of the fix.
    pub timestamp_ms: i64,
    /// Server time it was accepted.
    pub received_ms: i64,
    /// `drivers::Status` code.
    pub status: u8,
    pub trip_id: Option<Arc<str>>,
    pub trip_cost_cents: u64,
}

/// Raw entry kinds.
const RAW_FIX: u8 = 0;
const RAW_EVENT: u8 = 1;

fn push_name(buf: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(MAX_NAME)];
    buf.push(s.len() as u8);
    buf.extend_from_slice(s);
}

/// Appends one raw entry for an accepted fix to a shard's buffer:
/// `0 u8 | partition u16 | id len u8 | id | lat_e7 i32 | lon_e7 i32 | device ms i64 |
/// received ms i64 | motion u32 | status u8 | trip len u8 | trip | cost cents u32`.
/// Ids longer than 255 bytes are cut (fixes are validated to 64 before).
pub fn push_raw(buf: &mut Vec<u8>, e: &Raw<'_>) {
    let id = &e.driver_id.as_bytes()[..e.driver_id.len().min(MAX_NAME)];
    let trip = &e.trip_id.as_bytes()[..e.trip_id.len().min(MAX_NAME)];
    buf.push(RAW_FIX);
    buf.extend_from_slice(&e.partition.to_le_bytes());
    buf.push(id.len() as u8);
    buf.extend_from_slice(id);
    buf.extend_from_slice(&e.lat_e7.to_le_bytes());
    buf.extend_from_slice(&e.lon_e7.to_le_bytes());
    buf.extend_from_slice(&e.timestamp_ms.to_le_bytes());
    buf.extend_from_slice(&e.received_ms.to_le_bytes());
    buf.extend_from_slice(&e.motion.to_le_bytes());
    buf.push(e.status);
    buf.push(trip.len() as u8);
    buf.extend_from_slice(trip);
    buf.extend_from_slice(&e.trip_cost_cents.to_le_bytes());
}

/// Appends one raw state change: `1 u8 | partition u16 | entity u8 | id | state |
/// from-state (each: len u8, bytes) | ms i64 | lat_e7 i32 | lon_e7 i32`.
pub fn push_raw_event(buf: &mut Vec<u8>, e: &RawEvent<'_>) {
    buf.push(RAW_EVENT);
    buf.extend_from_slice(&e.partition.to_le_bytes());
    buf.push(e.entity);
    push_name(buf, e.id);
    push_name(buf, e.state);
    push_name(buf, e.from_state);
    buf.extend_from_slice(&e.timestamp_ms.to_le_bytes());
    buf.extend_from_slice(&e.lat_e7.to_le_bytes());
    buf.extend_from_slice(&e.lon_e7.to_le_bytes());
}

/// One state change of a driver or a trip as the history keeps it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RawEvent<'a> {
    pub partition: u16,
    /// 1: driver, 2: trip.
    pub entity: u8,
    pub id: &'a str,
    pub state: &'a str,
    /// Empty for a new entity.
    pub from_state: &'a str,
    pub timestamp_ms: i64,
    pub lat_e7: i32,
    pub lon_e7: i32,
}

/// A raw entry: a fix or a state change.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Entry<'a> {
    Fix(Raw<'a>),
    Event(RawEvent<'a>),
}

impl Entry<'_> {
    pub fn partition(&self) -> u16 {
        match self {
            Entry::Fix(f) => f.partition,
            Entry::Event(e) => e.partition,
        }
    }

    pub fn is_event(&self) -> bool {
        matches!(self, Entry::Event(_))
    }

    /// Server time of the entry (a fix's acceptance, an event's time).
    pub fn time_ms(&self) -> i64 {
        match self {
            Entry::Fix(f) => f.received_ms,
            Entry::Event(e) => e.timestamp_ms,
        }
    }
}

/// One accepted fix as a shard hands it over (borrowed from its buffer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Raw<'a> {
    pub partition: u16,
    pub driver_id: &'a str,
    pub lat_e7: i32,
    pub lon_e7: i32,
    pub timestamp_ms: i64,
    pub received_ms: i64,
    pub motion: u32,
    pub status: u8,
    pub trip_id: &'a str,
    pub trip_cost_cents: u32,
}

/// The raw entries of a buffer, in order (the buffer is this process's own: a malformed
/// one ends the iteration).
pub fn raw_entries(buf: &[u8]) -> impl Iterator<Item = Entry<'_>> + '_ {
    let mut r = Reader { b: buf, at: 0 };
    std::iter::from_fn(move || {
        let kind = r.take(1)?[0];
        let partition = u16::from_le_bytes(r.take(2)?.try_into().ok()?);
        if kind == RAW_EVENT {
            let entity = r.take(1)?[0];
            let mut name = || {
                let n = r.take(1)?[0] as usize;
                std::str::from_utf8(r.take(n)?).ok()
            };
            let (id, state, from_state) = (name()?, name()?, name()?);
            return Some(Entry::Event(RawEvent {
                partition,
                entity,
                id,
                state,
                from_state,
                timestamp_ms: i64::from_le_bytes(r.take(8)?.try_into().ok()?),
                lat_e7: i32::from_le_bytes(r.take(4)?.try_into().ok()?),
                lon_e7: i32::from_le_bytes(r.take(4)?.try_into().ok()?),
            }));
        }
        let n = r.take(1)?[0] as usize;
        let driver_id = std::str::from_utf8(r.take(n)?).ok()?;
        let lat_e7 = i32::from_le_bytes(r.take(4)?.try_into().ok()?);
        let lon_e7 = i32::from_le_bytes(r.take(4)?.try_into().ok()?);
        let timestamp_ms = i64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let received_ms = i64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let motion = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
        let status = r.take(1)?[0];
        let n = r.take(1)?[0] as usize;
        let trip_id = std::str::from_utf8(r.take(n)?).ok()?;
        let trip_cost_cents = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
        Some(Entry::Fix(Raw {
            partition,
            driver_id,
            lat_e7,
            lon_e7,
            timestamp_ms,
            received_ms,
            motion,
            status,
            trip_id,
            trip_cost_cents,
        }))
    })
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1) as i64 ^ -((v & 1) as i64)
}

/// A bounds-checked cursor over bytes from anywhere (a file, a peer).
pub(crate) struct Reader<'a> {
    pub b: &'a [u8],
    pub at: usize,
}

impl<'a> Reader<'a> {
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    pub fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.at)?;
            self.at += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn signed(&mut self) -> Option<i64> {
        self.varint().map(unzigzag)
    }

    pub fn done(&self) -> bool {
        self.at >= self.b.len()
    }
}

/// A block's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHead {
    pub flags: u8,
    pub first: Pos,
    pub count: u64,
    pub base_received_ms: i64,
}

impl BlockHead {
    pub fn last(&self) -> Pos {
        Pos { epoch: self.first.epoch, seq: self.first.seq + self.count.saturating_sub(1) }
    }
}

/// Encodes one block of `entries` (all of one partition) at positions from `first`,
/// numbering names through `names` (the segment's table; new names are added to it).
/// Returns the framed block.
pub fn encode_block<'a>(
    flags: u8,
    first: Pos,
    entries: &[Raw<'a>],
    names: &mut impl FnMut(&'a str) -> (u64, bool),
) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + entries.len() * 20);
    body.push(flags);
    put_varint(&mut body, first.epoch);
    put_varint(&mut body, first.seq);
    put_varint(&mut body, entries.len() as u64);
    let base = entries.first().map_or(0, |e| e.received_ms);
    put_varint(&mut body, base.max(0) as u64);
    let mut fresh: Vec<&str> = Vec::new();
    let mut recs = Vec::with_capacity(entries.len() * 18);
    let (mut prev_recv, mut prev_lat, mut prev_lon) = (base.max(0), 0i64, 0i64);
    for e in entries {
        let (idx, new) = names(e.driver_id);
        if new {
            fresh.push(e.driver_id);
        }
        put_varint(&mut recs, idx);
        let recv = e.received_ms.max(prev_recv);
        put_varint(&mut recs, (recv - prev_recv) as u64);
        prev_recv = recv;
        put_varint(&mut recs, zigzag(e.timestamp_ms - recv));
        put_varint(&mut recs, zigzag(e.lat_e7 as i64 - prev_lat));
        put_varint(&mut recs, zigzag(e.lon_e7 as i64 - prev_lon));
        (prev_lat, prev_lon) = (e.lat_e7 as i64, e.lon_e7 as i64);
        put_varint(&mut recs, e.motion as u64);
        recs.push(e.status);
        if e.trip_id.is_empty() {
            put_varint(&mut recs, 0);
        } else {
            let (idx, new) = names(e.trip_id);
            if new {
                fresh.push(e.trip_id);
            }
            put_varint(&mut recs, idx + 1);
        }
        put_varint(&mut recs, e.trip_cost_cents as u64);
    }
    put_varint(&mut body, fresh.len() as u64);
    for n in fresh {
        put_varint(&mut body, n.len() as u64);
        body.extend_from_slice(n.as_bytes());
    }
    body.extend_from_slice(&recs);
    frame(&body)
}

/// Encodes one block of state changes (all of one partition), as [`encode_block`].
pub fn encode_event_block<'a>(
    flags: u8,
    first: Pos,
    entries: &[RawEvent<'a>],
    names: &mut impl FnMut(&'a str) -> (u64, bool),
) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + entries.len() * 16);
    body.push(flags | EVENTS);
    put_varint(&mut body, first.epoch);
    put_varint(&mut body, first.seq);
    put_varint(&mut body, entries.len() as u64);
    let base = entries.first().map_or(0, |e| e.timestamp_ms.max(0));
    put_varint(&mut body, base as u64);
    let mut fresh: Vec<&str> = Vec::new();
    let mut recs = Vec::with_capacity(entries.len() * 16);
    let mut name = |s: &'a str, fresh: &mut Vec<&'a str>| {
        let (idx, new) = names(s);
        if new {
            fresh.push(s);
        }
        idx
    };
    let (mut prev_ts, mut prev_lat, mut prev_lon) = (base, 0i64, 0i64);
    for e in entries {
        recs.push(e.entity);
        put_varint(&mut recs, name(e.id, &mut fresh));
        put_varint(&mut recs, name(e.state, &mut fresh));
        let from = if e.from_state.is_empty() { 0 } else { name(e.from_state, &mut fresh) + 1 };
        put_varint(&mut recs, from);
        put_varint(&mut recs, zigzag(e.timestamp_ms - prev_ts));
        prev_ts = e.timestamp_ms;
        put_varint(&mut recs, zigzag(e.lat_e7 as i64 - prev_lat));
        put_varint(&mut recs, zigzag(e.lon_e7 as i64 - prev_lon));
        (prev_lat, prev_lon) = (e.lat_e7 as i64, e.lon_e7 as i64);
    }
    put_varint(&mut body, fresh.len() as u64);
    for n in fresh {
        put_varint(&mut body, n.len() as u64);
        body.extend_from_slice(n.as_bytes());
    }
    body.extend_from_slice(&recs);
    frame(&body)
}

/// One decoded state change, its names as indices into the segment's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEventRecord {
    pub entity: u8,
    pub id: u64,
    pub state: u64,
    /// 0: none, else name index + 1.
    pub from: u64,
    pub timestamp_ms: i64,
    pub lat_e7: i32,
    pub lon_e7: i32,
}

/// Decodes a block of either kind: fixes to `fix`, state changes to `event`.
pub fn decode_any(
    body: &[u8],
    fix: impl FnMut(Pos, &RawRecord),
    event: impl FnMut(Pos, &RawEventRecord),
) -> Option<(BlockHead, Vec<&str>)> {
    if body.first().is_none_or(|f| f & EVENTS == 0) { decode_fixes(body, fix) } else { decode_events(body, event) }
}

fn decode_events(body: &[u8], mut event: impl FnMut(Pos, &RawEventRecord)) -> Option<(BlockHead, Vec<&str>)> {
    let mut r = Reader { b: body, at: 0 };
    let (head, names) = read_head(&mut r)?;
    let (mut ts, mut lat, mut lon) = (head.base_received_ms, 0i64, 0i64);
    for i in 0..head.count {
        let entity = r.take(1)?[0];
        let (id, state, from) = (r.varint()?, r.varint()?, r.varint()?);
        ts = ts.checked_add(r.signed()?)?;
        lat = lat.checked_add(r.signed()?)?;
        lon = lon.checked_add(r.signed()?)?;
        let rec = RawEventRecord {
            entity,
            id,
            state,
            from,
            timestamp_ms: ts,
            lat_e7: i32::try_from(lat).ok()?,
            lon_e7: i32::try_from(lon).ok()?,
        };
        event(Pos { epoch: head.first.epoch, seq: head.first.seq.checked_add(i)? }, &rec);
    }
    r.done().then_some((head, names))
}

/// `u32 length | u32 crc32 | body`.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("truncated frame at byte {0}")]
    Truncated(usize),
    #[error("checksum mismatch in the frame at byte {0}")]
    Checksum(usize),
    #[error("malformed block at byte {0}")]
    Malformed(usize),
}

/// The frames in `bytes`: (offset, body) each, stopping at the first bad one.
pub fn frames(bytes: &[u8]) -> impl Iterator<Item = Result<(usize, &[u8]), CodecError>> + '_ {
    let mut at = 0usize;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || at >= bytes.len() {
            return None;
        }
        let start = at;
        let r = (|| {
            let head = bytes.get(at..at + FRAME_HEADER).ok_or(CodecError::Truncated(start))?;
            let len = u32::from_le_bytes(head[..4].try_into().expect("4")) as usize;
            let crc = u32::from_le_bytes(head[4..].try_into().expect("4"));
            let body = bytes.get(at + FRAME_HEADER..at + FRAME_HEADER + len).ok_or(CodecError::Truncated(start))?;
            if crc32fast::hash(body) != crc {
                return Err(CodecError::Checksum(start));
            }
            at += FRAME_HEADER + len;
            Ok((start, body))
        })();
        failed = r.is_err();
        Some(r)
    })
}

/// Reads a block's header and its new names, leaving the reader at the records.
pub(crate) fn read_head<'a>(r: &mut Reader<'a>) -> Option<(BlockHead, Vec<&'a str>)> {
    let flags = r.take(1)?[0];
    let epoch = r.varint()?;
    let seq = r.varint()?;
    let count = r.varint()?;
    let base = r.varint()?;
    let n = r.varint()?;
    let mut names = Vec::with_capacity((n as usize).min(4096));
    for _ in 0..n {
        let len = r.varint()? as usize;
        names.push(std::str::from_utf8(r.take(len)?).ok()?);
    }
    let head =
        BlockHead { flags, first: Pos { epoch, seq }, count, base_received_ms: base.min(i64::MAX as u64) as i64 };
    Some((head, names))
}

/// A block's header and new names (no records).
pub fn block_head(body: &[u8]) -> Option<(BlockHead, Vec<&str>)> {
    read_head(&mut Reader { b: body, at: 0 })
}

/// One decoded record with its names as indices into the segment's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRecord {
    pub name: u64,
    pub received_ms: i64,
    pub timestamp_ms: i64,
    pub lat_e7: i32,
    pub lon_e7: i32,
    pub motion: u32,
    pub status: u8,
    /// 0: none, else name index + 1.
    pub trip: u64,
    pub trip_cost_cents: u64,
}

/// Decodes a block body: its header, new names, and records (calling `each` with the
/// record's position). `None` if malformed.
pub fn decode_block(body: &[u8], each: impl FnMut(Pos, &RawRecord)) -> Option<(BlockHead, Vec<&str>)> {
    // A block of state changes has no fixes (its names still count).
    decode_any(body, each, |_, _| {})
}

fn decode_fixes(body: &[u8], mut each: impl FnMut(Pos, &RawRecord)) -> Option<(BlockHead, Vec<&str>)> {
    let mut r = Reader { b: body, at: 0 };
    let (head, names) = read_head(&mut r)?;
    let (mut recv, mut lat, mut lon) = (head.base_received_ms, 0i64, 0i64);
    for i in 0..head.count {
        let name = r.varint()?;
        recv = recv.checked_add(i64::try_from(r.varint()?).ok()?)?;
        let timestamp_ms = recv.checked_add(r.signed()?)?;
        lat = lat.checked_add(r.signed()?)?;
        lon = lon.checked_add(r.signed()?)?;
        let motion = u32::try_from(r.varint()?).ok()?;
        let status = r.take(1)?[0];
        let trip = r.varint()?;
        let trip_cost_cents = r.varint()?;
        let rec = RawRecord {
            name,
            received_ms: recv,
            timestamp_ms,
            lat_e7: i32::try_from(lat).ok()?,
            lon_e7: i32::try_from(lon).ok()?,
            motion,
            status,
            trip,
            trip_cost_cents,
        };
        each(Pos { epoch: head.first.epoch, seq: head.first.seq.checked_add(i)? }, &rec);
    }
    r.done().then_some((head, names))
}
