//! The stored form of a driver (a snapshot): a versioned little-endian byte layout.
//!
//! ```text
//! u8 version (1) | u8 status | i64 received_ms | f64 trip_cost
//! | f64 lat, lon, heading, speed, accuracy | i64 timestamp_ms
//! | str vehicle_type | str cab | str session | str trip_id      (str = u8 len + bytes)
//! | i64 trail_base_ms | u16 n | n x (i32 lat_e7, i32 lon_e7, u32 dt, u16 hdg, u16 spd, u16 acc)
//! ```
//! The driver id is the storage key, not part of the value.

use std::collections::VecDeque;

use super::trail::{Trail, TrailFix};
use super::{Position, Status};

const VERSION: u8 = 1;

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

/// A decoded driver snapshot.
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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("snapshot truncated")]
    Truncated,
    #[error("unknown snapshot version {0}")]
    Version(u8),
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

/// Appends the encoded snapshot to `out`.
pub fn encode_snapshot(s: &SnapshotRef<'_>, out: &mut Vec<u8>) {
    out.push(VERSION);
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
    let (base, fixes) = s.trail.raw();
    out.extend_from_slice(&base.to_le_bytes());
    out.extend_from_slice(&(fixes.len() as u16).to_le_bytes());
    for f in fixes {
        out.extend_from_slice(&f.lat_e7.to_le_bytes());
        out.extend_from_slice(&f.lon_e7.to_le_bytes());
        out.extend_from_slice(&f.dt_ms.to_le_bytes());
        out.extend_from_slice(&f.heading_cdeg.to_le_bytes());
        out.extend_from_slice(&f.speed_dmps.to_le_bytes());
        out.extend_from_slice(&f.accuracy_dm.to_le_bytes());
    }
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

/// Decodes a snapshot stored under `driver_id`.
pub fn decode_snapshot(driver_id: &str, bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    let mut r = Reader(bytes);
    let v = r.u8()?;
    if v != VERSION {
        return Err(SnapshotError::Version(v));
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
    let mut fixes = VecDeque::with_capacity(n);
    for _ in 0..n {
        fixes.push_back(TrailFix {
            lat_e7: i32::from_le_bytes(r.take()?),
            lon_e7: i32::from_le_bytes(r.take()?),
            dt_ms: u32::from_le_bytes(r.take()?),
            heading_cdeg: u16::from_le_bytes(r.take()?),
            speed_dmps: u16::from_le_bytes(r.take()?),
            accuracy_dm: u16::from_le_bytes(r.take()?),
        });
    }
    Ok(Snapshot {
        driver_id: driver_id.to_string(),
        status,
        vehicle_type,
        last,
        received_ms,
        trip_cost,
        cab,
        session,
        trip_id,
        trail: Trail::from_raw(base, fixes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut trail = Trail::default();
        let p = |ts| Position {
            lat: 1.5,
            lon: -2.25,
            heading_deg: 90.0,
            speed_mps: 3.0,
            accuracy_m: 5.0,
            timestamp_ms: ts,
        };
        trail.push(&p(1_000), 4);
        trail.push(&p(2_000), 4);
        let last = p(3_000);
        let mut buf = vec![];
        encode_snapshot(
            &SnapshotRef {
                status: Status::OnTrip,
                vehicle_type: "suv",
                last: &last,
                received_ms: 42,
                trip_cost: 12.5,
                cab: "CAB-1",
                session: "s-9",
                trip_id: "",
                trail: &trail,
            },
            &mut buf,
        );
        let s = decode_snapshot("d1", &buf).unwrap();
        assert_eq!(s.driver_id, "d1");
        assert_eq!(s.status, Status::OnTrip);
        assert_eq!(s.vehicle_type, "suv");
        assert_eq!(s.last, last);
        assert_eq!((s.received_ms, s.trip_cost), (42, 12.5));
        assert_eq!((s.cab.as_str(), s.session.as_str(), s.trip_id.as_str()), ("CAB-1", "s-9", ""));
        assert_eq!(s.trail.iter().map(|p| p.timestamp_ms).collect::<Vec<_>>(), vec![1_000, 2_000]);
        for cut in 0..buf.len() {
            assert!(decode_snapshot("d1", &buf[..cut]).is_err(), "cut at {cut}");
        }
    }
}
