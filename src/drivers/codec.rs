//! The stored form of drivers: records of the driver log (see `storage`).
//!
//! Every record is framed so a torn tail (a crash in the middle of a write) is detected:
//!
//! ```text
//! u32 payload_len | u32 crc32(payload) | payload
//! payload = u8 kind | u8 id_len | id | body
//!   kind 1 (delta) and 2 (full):
//!     body = u8 status | i64 received_ms | f64 trip_cost
//!          | f64 lat, lon, heading, speed, accuracy | i64 timestamp_ms      (the last fix)
//!          | str vehicle_type | str cab | str session | str trip_id       (str = u8 len + bytes)
//!          | i64 trail_base_ms | u16 n | n x (i32 lat_e7, i32 lon_e7, u32 dt, u32 motion)
//!     full:  the trail entries are the whole trail;
//!     delta: they are the fixes that entered the trail since the driver's previous record.
//!   kind 3 (delete): no body.
//! ```
//! All integers little-endian.

use super::trail::{Trail, TrailFix};
use super::{Position, Status};

const KIND_DELTA: u8 = 1;
const KIND_FULL: u8 = 2;
const KIND_DELETE: u8 = 3;
const HEADER: usize = 8;

/// Borrowed parts of a driver, for encoding without copying.
pub struct SnapshotRef<'a> {
    pub status: Status,
    pub vehicle_type: &'a str,
    pub last: &'a Position,
    pub received_ms: i64,
    pub trip_cost: f64,
    pub cab: &'a str,
    pub session: &'a str,
    pub trip_id: &'a str,
    pub trail: &'a Trail,
}

/// A driver as read back from the log.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub driver_id: String,
    pub status: Status,
    pub vehicle_type: String,
    pub last: Position,
    pub received_ms: i64,
    pub trip_cost: f64,
    pub cab: String,
    pub session: String,
    pub trip_id: String,
    pub trail: Trail,
}

/// One decoded log record.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // Records are decoded one at a time and consumed at once.
pub enum Record {
    /// The driver's state. `full`: `trail` is its whole trail; otherwise `trail` holds the
    /// fixes to append to the trail already known.
    Upsert {
        full: bool,
        snap: Snapshot,
        trail: Vec<Position>,
    },
    Delete {
        driver_id: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("record truncated")]
    Truncated,
    #[error("record checksum mismatch")]
    Checksum,
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("bad status code {0}")]
    Status(u8),
    #[error("string is not UTF-8")]
    Utf8,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Validation caps every string at 64 bytes.
    let n = s.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(&s.as_bytes()[..n]);
}

fn begin(out: &mut Vec<u8>, kind: u8, id: &str) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    out.push(kind);
    put_str(out, id);
    start
}

fn finish(out: &mut [u8], start: usize) {
    let payload = &out[start + HEADER..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends a driver record. `new_trail`: `None` writes the whole trail (a full record);
/// `Some(n)` writes only the newest `n` trail fixes (a delta record).
pub fn encode_upsert(out: &mut Vec<u8>, id: &str, s: &SnapshotRef<'_>, new_trail: Option<usize>) {
    let start = begin(out, if new_trail.is_some() { KIND_DELTA } else { KIND_FULL }, id);
    out.push(s.status.code());
    out.extend_from_slice(&s.received_ms.to_le_bytes());
    out.extend_from_slice(&s.trip_cost.to_le_bytes());
    for v in [s.last.lat, s.last.lon, s.last.heading_deg, s.last.speed_mps, s.last.accuracy_m] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&s.last.timestamp_ms.to_le_bytes());
    for v in [s.vehicle_type, s.cab, s.session, s.trip_id] {
        put_str(out, v);
    }
    let fixes = s.trail.raw_fixes();
    let len = fixes.len();
    let n = new_trail.unwrap_or(len).min(len);
    out.extend_from_slice(&s.trail.base_ms().to_le_bytes());
    out.extend_from_slice(&(n as u16).to_le_bytes());
    for f in fixes.skip(len - n) {
        out.extend_from_slice(&f.lat_e7.to_le_bytes());
        out.extend_from_slice(&f.lon_e7.to_le_bytes());
        out.extend_from_slice(&f.dt_ms.to_le_bytes());
        out.extend_from_slice(&f.motion.to_le_bytes());
    }
    finish(out, start);
}

/// Appends a deletion record.
pub fn encode_delete(out: &mut Vec<u8>, id: &str) {
    let start = begin(out, KIND_DELETE, id);
    finish(out, start);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        if self.0.len() < N {
            return Err(SnapshotError::Truncated);
        }
        let (a, b) = self.0.split_at(N);
        self.0 = b;
        Ok(a.try_into().expect("length checked"))
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take::<1>()?[0])
    }
    fn i64(&mut self) -> Result<i64, SnapshotError> {
        Ok(i64::from_le_bytes(self.take()?))
    }
    fn f64(&mut self) -> Result<f64, SnapshotError> {
        Ok(f64::from_le_bytes(self.take()?))
    }
    fn str(&mut self) -> Result<String, SnapshotError> {
        let n = self.u8()? as usize;
        if self.0.len() < n {
            return Err(SnapshotError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        String::from_utf8(a.to_vec()).map_err(|_| SnapshotError::Utf8)
    }
}

fn decode_payload(p: &[u8]) -> Result<Record, SnapshotError> {
    let mut r = Reader(p);
    let kind = r.u8()?;
    let driver_id = r.str()?;
    if kind == KIND_DELETE {
        return Ok(Record::Delete { driver_id });
    }
    if kind != KIND_DELTA && kind != KIND_FULL {
        return Err(SnapshotError::Kind(kind));
    }
    let sc = r.u8()?;
    let status = Status::from_code(sc as i32).ok_or(SnapshotError::Status(sc))?;
    let received_ms = r.i64()?;
    let trip_cost = r.f64()?;
    let last = Position {
        lat: r.f64()?,
        lon: r.f64()?,
        heading_deg: r.f64()?,
        speed_mps: r.f64()?,
        accuracy_m: r.f64()?,
        timestamp_ms: r.i64()?,
    };
    let vehicle_type = r.str()?;
    let cab = r.str()?;
    let session = r.str()?;
    let trip_id = r.str()?;
    let base = r.i64()?;
    let n = u16::from_le_bytes(r.take()?) as usize;
    let mut trail = Vec::with_capacity(n);
    for _ in 0..n {
        let f = TrailFix {
            lat_e7: i32::from_le_bytes(r.take()?),
            lon_e7: i32::from_le_bytes(r.take()?),
            dt_ms: u32::from_le_bytes(r.take()?),
            motion: u32::from_le_bytes(r.take()?),
        };
        trail.push(f.unpack(base));
    }
    let snap = Snapshot {
        driver_id,
        status,
        vehicle_type,
        last,
        received_ms,
        trip_cost,
        cab,
        session,
        trip_id,
        trail: Trail::default(),
    };
    Ok(Record::Upsert { full: kind == KIND_FULL, snap, trail })
}

/// Decodes the records at the start of `bytes`, calling `f` for each. Returns how many
/// bytes held whole, valid records; anything after that is a torn or corrupt tail.
pub fn decode_records(bytes: &[u8], mut f: impl FnMut(Record)) -> (usize, Option<SnapshotError>) {
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < HEADER {
            return (at, Some(SnapshotError::Truncated));
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        let Some(payload) = rest.get(HEADER..HEADER + len) else {
            return (at, Some(SnapshotError::Truncated));
        };
        if crc32fast::hash(payload) != crc {
            return (at, Some(SnapshotError::Checksum));
        }
        match decode_payload(payload) {
            Ok(r) => f(r),
            Err(e) => return (at, Some(e)),
        }
        at += HEADER + len;
    }
    (at, None)
}

/// A stored driver as the encoder reads it.
pub fn snapshot_ref(s: &Snapshot) -> SnapshotRef<'_> {
    SnapshotRef {
        status: s.status,
        vehicle_type: &s.vehicle_type,
        last: &s.last,
        received_ms: s.received_ms,
        trip_cost: s.trip_cost,
        cab: &s.cab,
        session: &s.session,
        trip_id: &s.trip_id,
        trail: &s.trail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ts: i64) -> Position {
        Position { lat: 1.5, lon: -2.25, heading_deg: 90.0, speed_mps: 3.0, accuracy_m: 5.0, timestamp_ms: ts }
    }

    #[test]
    fn round_trip_full_delta_delete_and_torn_tails() {
        let mut trail = Trail::default();
        for ts in [1_000, 2_000, 3_000] {
            trail.push(&p(ts), 4);
        }
        let last = p(4_000);
        let s = SnapshotRef {
            status: Status::OnTrip,
            vehicle_type: "suv",
            last: &last,
            received_ms: 42,
            trip_cost: 12.5,
            cab: "CAB-1",
            session: "s-9",
            trip_id: "",
            trail: &trail,
        };
        let mut buf = vec![];
        encode_upsert(&mut buf, "d1", &s, None);
        encode_upsert(&mut buf, "d1", &s, Some(1));
        encode_delete(&mut buf, "d2");
        let mut got = vec![];
        assert_eq!(decode_records(&buf, |r| got.push(r)), (buf.len(), None));
        let Record::Upsert { full: true, snap, trail: t } = &got[0] else { panic!("{:?}", got[0]) };
        assert_eq!(snap.driver_id, "d1");
        assert_eq!(snap.status, Status::OnTrip);
        assert_eq!((snap.vehicle_type.as_str(), snap.cab.as_str(), snap.session.as_str()), ("suv", "CAB-1", "s-9"));
        assert_eq!(snap.last, last);
        assert_eq!((snap.received_ms, snap.trip_cost), (42, 12.5));
        assert_eq!(t.iter().map(|p| p.timestamp_ms).collect::<Vec<_>>(), vec![1_000, 2_000, 3_000]);
        let Record::Upsert { full: false, trail: t, .. } = &got[1] else { panic!("{:?}", got[1]) };
        assert_eq!(t.iter().map(|p| p.timestamp_ms).collect::<Vec<_>>(), vec![3_000]);
        assert!(matches!(&got[2], Record::Delete { driver_id } if driver_id == "d2"));

        // Every cut inside the last record leaves the earlier records readable.
        let first_two = {
            let mut n = 0;
            decode_records(&buf, |_| n += 1);
            let mut b = vec![];
            encode_upsert(&mut b, "d1", &s, None);
            encode_upsert(&mut b, "d1", &s, Some(1));
            b.len()
        };
        for cut in first_two..buf.len() {
            let mut n = 0;
            let (ok, err) = decode_records(&buf[..cut], |_| n += 1);
            assert_eq!((ok, n), (first_two, 2), "cut at {cut}");
            assert_eq!(err.is_some(), cut > first_two);
        }
        // A flipped bit is caught by the checksum.
        let mut bad = buf.clone();
        bad[20] ^= 1;
        assert_eq!(decode_records(&bad, |_| {}).1, Some(SnapshotError::Checksum));
    }
}
