//! The exporter's pure part: fix batches from the stream become COPY rows and cursor
//! updates, cut at 1,000 rows or 1 s (whichever comes first), never splitting a batch
//! from the stream (so the cursor committed with a COPY covers exactly its rows).

use std::collections::BTreeMap;

use crate::pb;

/// A cursor: per partition, the last position delivered (epoch, seq).
pub type Cursor = BTreeMap<u32, (u64, u64)>;

/// Rows and the cursor they advance to, ready for one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    /// COPY text rows, each ending in `\n`.
    pub copy: Vec<u8>,
    pub rows: usize,
    /// Cursor entries this batch moves (the new position of each).
    pub advance: Cursor,
    /// Server time the newest row was accepted at (for the lag).
    pub newest_received_ms: i64,
    /// When its first stream batch arrived (ms, the caller's clock).
    pub started_ms: i64,
}

/// How rows are cut into transactions.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub rows: usize,
    pub interval_ms: i64,
    /// Write the `geom` column (PostGIS is present).
    pub geom: bool,
}

/// Accumulates stream batches into the next transaction.
#[derive(Debug)]
pub struct Batcher {
    limits: Limits,
    open: Batch,
}

impl Batcher {
    pub fn new(limits: Limits) -> Self {
        Batcher { limits, open: Batch::default() }
    }

    /// Whether adding `b` would take the open batch past the row limit: take it first.
    pub fn would_overflow(&self, b: &pb::FixBatch) -> bool {
        self.open.rows > 0 && self.open.rows + b.fixes.len() > self.limits.rows
    }

    /// Adds one stream batch, whole.
    pub fn push(&mut self, b: &pb::FixBatch, now_ms: i64) {
        if self.open.rows == 0 && self.open.advance.is_empty() {
            self.open.started_ms = now_ms;
        }
        for f in &b.fixes {
            row(&mut self.open.copy, f, self.limits.geom);
            self.open.rows += 1;
            self.open.newest_received_ms = self.open.newest_received_ms.max(f.received_ms);
            if let Some(p) = f.position {
                self.open.advance.insert(p.partition, (p.epoch, p.seq));
            }
        }
        for p in &b.positions {
            self.open.advance.insert(p.partition, (p.epoch, p.seq));
        }
    }

    /// The open batch is full, or has waited its interval.
    pub fn due(&self, now_ms: i64) -> bool {
        let waiting = self.open.rows > 0 || !self.open.advance.is_empty();
        self.open.rows >= self.limits.rows || (waiting && now_ms - self.open.started_ms >= self.limits.interval_ms)
    }

    /// When the open batch falls due by time (`None`: nothing open).
    pub fn due_at(&self) -> Option<i64> {
        (self.open.rows > 0 || !self.open.advance.is_empty()).then(|| self.open.started_ms + self.limits.interval_ms)
    }

    pub fn take(&mut self) -> Batch {
        std::mem::take(&mut self.open)
    }
}

/// The columns of the fixes table, in COPY order.
pub const COLUMNS: &str = "partition, epoch, seq, driver_id, lat, lon, heading_deg, speed_mps, accuracy_m, \
                           device_time, received_time, status, trip_id, trip_cost";

fn status_name(code: i32) -> &'static str {
    match pb::DriverStatus::try_from(code) {
        Ok(pb::DriverStatus::Offline) => "OFFLINE",
        Ok(pb::DriverStatus::Available) => "AVAILABLE",
        Ok(pb::DriverStatus::OnTrip) => "ON_TRIP",
        Ok(pb::DriverStatus::Dispatched) => "DISPATCHED",
        _ => "UNSPECIFIED",
    }
}

/// Appends one row in COPY text format.
pub fn row(out: &mut Vec<u8>, f: &pb::HistoryFix, geom: bool) {
    use std::io::Write;
    let p = f.position.unwrap_or_default();
    let _ = write!(out, "{}\t{}\t{}\t", p.partition, p.epoch, p.seq);
    text(out, &f.driver_id);
    let _ = write!(out, "\t{}\t{}\t{}\t{}\t{}\t", f.lat, f.lon, f.heading_deg, f.speed_mps, f.accuracy_m);
    timestamp(out, f.timestamp_ms);
    out.push(b'\t');
    timestamp(out, f.received_ms);
    let _ = write!(out, "\t{}\t", status_name(f.status));
    if f.trip_id.is_empty() {
        out.extend_from_slice(b"\\N");
    } else {
        text(out, &f.trip_id);
    }
    let _ = write!(out, "\t{:.2}", f.trip_cost);
    if geom {
        let _ = write!(out, "\tSRID=4326;POINT({} {})", f.lon, f.lat);
    }
    out.push(b'\n');
}

/// A text value with COPY's escapes.
fn text(out: &mut Vec<u8>, s: &str) {
    for b in s.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS.mmm+00`.
pub fn timestamp(out: &mut Vec<u8>, ms: i64) {
    use std::io::Write;
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil from days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s, milli) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60, ms_of_day / 1_000 % 60, ms_of_day % 1_000);
    let _ = write!(out, "{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}.{milli:03}+00");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fix(p: u32, seq: u64, id: &str) -> pb::HistoryFix {
        pb::HistoryFix {
            position: Some(pb::HistoryPosition { partition: p, epoch: 2, seq }),
            driver_id: id.into(),
            lat: 52.5,
            lon: 13.4,
            timestamp_ms: 1_796_428_800_123,
            received_ms: 1_796_428_800_456,
            status: 2,
            trip_cost: 12.5,
            ..Default::default()
        }
    }

    #[test]
    fn timestamps_and_escapes_are_what_postgres_reads() {
        let mut out = Vec::new();
        timestamp(&mut out, 0);
        out.push(b' ');
        timestamp(&mut out, 951_782_400_000 + 86_399_999); // 2000-02-29, last ms
        out.push(b' ');
        timestamp(&mut out, -1);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1970-01-01 00:00:00.000+00 2000-02-29 23:59:59.999+00 1969-12-31 23:59:59.999+00"
        );
        let mut out = Vec::new();
        row(&mut out, &fix(7, 9, "a\tb\\c\nd"), true);
        let line = String::from_utf8(out).unwrap();
        assert_eq!(
            line,
            "7\t2\t9\ta\\tb\\\\c\\nd\t52.5\t13.4\t0\t0\t0\t2026-12-05 00:00:00.123+00\t2026-12-05 00:00:00.456+00\t\
             AVAILABLE\t\\N\t12.50\tSRID=4326;POINT(13.4 52.5)\n"
        );
    }

    #[test]
    fn batches_cut_at_the_row_limit_or_the_interval_and_carry_their_cursor() {
        let mut b = Batcher::new(Limits { rows: 3, interval_ms: 1_000, geom: false });
        assert!(!b.due(0) && b.due_at().is_none());
        let one = pb::FixBatch {
            fixes: vec![fix(1, 5, "a"), fix(2, 8, "b")],
            positions: vec![pb::HistoryPosition { partition: 1, epoch: 2, seq: 6 }],
        };
        b.push(&one, 100);
        assert!(!b.due(500) && b.due(1_100), "due by time");
        assert!(b.would_overflow(&one), "2 + 2 rows > 3: cut before");
        let t = b.take();
        assert_eq!(t.rows, 2);
        assert_eq!(t.advance, Cursor::from([(1, (2, 6)), (2, (2, 8))]));
        // Positions alone (fixes filtered out) still move the cursor.
        let quiet =
            pb::FixBatch { fixes: vec![], positions: vec![pb::HistoryPosition { partition: 3, epoch: 1, seq: 1 }] };
        b.push(&quiet, 2_000);
        assert!(b.due(3_000));
        assert_eq!(b.take().advance, Cursor::from([(3, (1, 1))]));
    }
}
