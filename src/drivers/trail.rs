//! A driver's recent fixes in 16 bytes each.
//!
//! Positions are kept to 1e-7 degree (about 1.1 cm), timestamps as u32 milliseconds after
//! a per-trail base, and heading, speed and accuracy packed into one u32: heading to 1°,
//! speed to 0.1 m/s (up to 204.7 m/s), accuracy to 1 m (up to 4,095 m). The last
//! accepted fix is kept at full precision by the driver record; the trail holds the ones
//! before it.

use super::Position;

/// One compact fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrailFix {
    pub lat_e7: i32,
    pub lon_e7: i32,
    /// Milliseconds after the trail's base timestamp.
    pub dt_ms: u32,
    /// Bits 0–8 heading (degrees), 9–19 speed (0.1 m/s), 20–31 accuracy (m).
    pub motion: u32,
}

fn field(v: f64, max: u32) -> u32 {
    v.round().clamp(0.0, max as f64) as u32
}

impl TrailFix {
    pub(crate) fn pack(p: &Position, base_ms: i64) -> TrailFix {
        let heading = field(p.heading_deg, 360) % 360;
        let speed = field(p.speed_mps * 10.0, (1 << 11) - 1);
        let accuracy = field(p.accuracy_m, (1 << 12) - 1);
        TrailFix {
            lat_e7: (p.lat * 1e7).round() as i32,
            lon_e7: (p.lon * 1e7).round() as i32,
            dt_ms: (p.timestamp_ms - base_ms) as u32,
            motion: heading | speed << 9 | accuracy << 20,
        }
    }

    pub(crate) fn unpack(&self, base_ms: i64) -> Position {
        Position {
            lat: self.lat_e7 as f64 / 1e7,
            lon: self.lon_e7 as f64 / 1e7,
            heading_deg: (self.motion & 0x1ff) as f64,
            speed_mps: ((self.motion >> 9) & 0x7ff) as f64 / 10.0,
            accuracy_m: (self.motion >> 20) as f64,
            timestamp_ms: base_ms + self.dt_ms as i64,
        }
    }
}

/// The bounded history of fixes before the last one, oldest first: a ring in one
/// exactly-sized allocation (no per-trail capacity slack).
#[derive(Clone, Debug, Default)]
pub struct Trail {
    base_ms: i64,
    ring: Box<[TrailFix]>,
    head: u16,
    len: u16,
}

const EMPTY: TrailFix = TrailFix { lat_e7: 0, lon_e7: 0, dt_ms: 0, motion: 0 };

impl Trail {
    /// Appends `p` (which must be newer than every fix held), keeping at most `cap`
    /// (≤ 65,535) fixes.
    pub fn push(&mut self, p: &Position, cap: usize) {
        if cap == 0 {
            return;
        }
        if self.ring.len() != cap {
            self.resize(cap);
        }
        if self.len == 0 {
            self.base_ms = p.timestamp_ms;
        } else if p.timestamp_ms - self.base_ms > u32::MAX as i64 {
            self.rebase(p.timestamp_ms);
        }
        let f = TrailFix::pack(p, self.base_ms);
        let cap16 = cap as u16;
        if self.len < cap16 {
            self.ring[((self.head + self.len) % cap16) as usize] = f;
            self.len += 1;
        } else {
            self.ring[self.head as usize] = f;
            self.head = (self.head + 1) % cap16;
        }
    }

    /// Re-allocates the ring for a new capacity, keeping the newest fixes.
    fn resize(&mut self, cap: usize) {
        let keep: Vec<TrailFix> = self.raw_fixes().copied().collect();
        let skip = keep.len().saturating_sub(cap);
        let mut ring = vec![EMPTY; cap].into_boxed_slice();
        for (slot, f) in ring.iter_mut().zip(&keep[skip..]) {
            *slot = *f;
        }
        self.ring = ring;
        self.head = 0;
        self.len = (keep.len() - skip) as u16;
    }

    /// Moves the base forward so `newest_ms` fits in a u32 offset, dropping fixes that are
    /// more than ~49 days older than it.
    fn rebase(&mut self, newest_ms: i64) {
        let base = self.base_ms;
        let keep_from = newest_ms - u32::MAX as i64;
        let kept: Vec<TrailFix> = self.raw_fixes().filter(|f| base + f.dt_ms as i64 >= keep_from).copied().collect();
        let new_base = kept.first().map_or(newest_ms, |f| base + f.dt_ms as i64);
        for (slot, f) in self.ring.iter_mut().zip(&kept) {
            *slot = TrailFix { dt_ms: (base + f.dt_ms as i64 - new_base) as u32, ..*f };
        }
        self.head = 0;
        self.len = kept.len() as u16;
        self.base_ms = new_base;
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The packed fixes, oldest first.
    pub fn raw_fixes(&self) -> impl ExactSizeIterator<Item = &TrailFix> + '_ {
        let cap = self.ring.len().max(1);
        (0..self.len as usize).map(move |i| &self.ring[(self.head as usize + i) % cap])
    }

    /// The fixes, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = Position> + '_ {
        self.raw_fixes().map(|f| f.unpack(self.base_ms))
    }

    /// The base timestamp the packed fixes are relative to (for the codec).
    pub fn base_ms(&self) -> i64 {
        self.base_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(ts: i64, lat: f64) -> Position {
        Position { lat, lon: -0.1234567, heading_deg: 123.4, speed_mps: 12.34, accuracy_m: 4.6, timestamp_ms: ts }
    }

    #[test]
    fn keeps_the_last_cap_fixes_in_order() {
        let mut t = Trail::default();
        for i in 0..10 {
            t.push(&pos(1_000 + i * 1_000, 50.0 + i as f64 * 1e-4), 4);
        }
        let got: Vec<Position> = t.iter().collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].timestamp_ms, 7_000);
        assert_eq!(got[3].timestamp_ms, 10_000);
        assert!((got[3].lat - 50.0009).abs() < 1e-7);
        assert!((got[3].lon + 0.1234567).abs() < 1e-7);
        assert_eq!((got[3].heading_deg, got[3].speed_mps, got[3].accuracy_m), (123.0, 12.3, 5.0));
        assert_eq!(std::mem::size_of::<TrailFix>(), 16);
    }

    #[test]
    fn rebases_across_long_gaps() {
        let mut t = Trail::default();
        t.push(&pos(1_000, 1.0), 8);
        t.push(&pos(2_000, 1.0), 8);
        let far = 1_000 + u32::MAX as i64 + 500;
        t.push(&pos(far, 1.0), 8);
        let ts: Vec<i64> = t.iter().map(|p| p.timestamp_ms).collect();
        assert_eq!(ts, vec![2_000, far]);
        t.push(&pos(far * 3, 1.0), 8);
        assert_eq!(t.iter().map(|p| p.timestamp_ms).collect::<Vec<_>>(), vec![far * 3]);
        // A smaller capacity (a restart with a shorter --trail-len) keeps the newest.
        for i in 1..=5 {
            t.push(&pos(far * 3 + i, 1.0), 8);
        }
        t.push(&pos(far * 3 + 9, 1.0), 3);
        let ts: Vec<i64> = t.iter().map(|p| p.timestamp_ms - far * 3).collect();
        assert_eq!(ts, vec![4, 5, 9]);
    }
}
