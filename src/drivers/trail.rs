//! A driver's recent fixes in 16 bytes each.
//!
//! Positions are kept to 1e-7 degree (about 1.1 cm), timestamps as u32 milliseconds after
//! a per-trail base, and heading, speed and accuracy packed into one u32: heading to 1°,
//! speed to 0.1 m/s (up to 204.7 m/s), accuracy to 1 m (up to 4,095 m). The last
//! accepted fix is kept at full precision by the driver record; the trail holds the ones
//! before it.

use std::collections::VecDeque;

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
    fn pack(p: &Position, base_ms: i64) -> TrailFix {
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

/// The bounded history of fixes before the last one, oldest first.
#[derive(Clone, Debug, Default)]
pub struct Trail {
    base_ms: i64,
    fixes: VecDeque<TrailFix>,
}

impl Trail {
    /// Appends `p` (which must be newer than every fix held), keeping at most `cap` fixes.
    pub fn push(&mut self, p: &Position, cap: usize) {
        if cap == 0 {
            return;
        }
        if self.fixes.is_empty() {
            self.base_ms = p.timestamp_ms;
            if self.fixes.capacity() < cap {
                self.fixes.reserve_exact(cap);
            }
        } else if p.timestamp_ms - self.base_ms > u32::MAX as i64 {
            self.rebase(p.timestamp_ms);
        }
        if self.fixes.len() >= cap {
            self.fixes.pop_front();
        }
        self.fixes.push_back(TrailFix::pack(p, self.base_ms));
    }

    /// Moves the base forward so `newest_ms` fits in a u32 offset, dropping fixes that are
    /// more than ~49 days older than it.
    fn rebase(&mut self, newest_ms: i64) {
        let base = self.base_ms;
        let keep_from = newest_ms - u32::MAX as i64;
        self.fixes.retain(|f| base + f.dt_ms as i64 >= keep_from);
        let new_base = self.fixes.front().map_or(newest_ms, |f| base + f.dt_ms as i64);
        for f in &mut self.fixes {
            f.dt_ms = (base + f.dt_ms as i64 - new_base) as u32;
        }
        self.base_ms = new_base;
    }

    pub fn len(&self) -> usize {
        self.fixes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fixes.is_empty()
    }

    /// The fixes, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = Position> + '_ {
        self.fixes.iter().map(|f| f.unpack(self.base_ms))
    }

    /// Frees the buffer when the driver no longer needs it.
    pub fn clear(&mut self) {
        self.fixes = VecDeque::new();
    }

    /// Raw parts for the snapshot codec.
    pub fn raw(&self) -> (i64, &VecDeque<TrailFix>) {
        (self.base_ms, &self.fixes)
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
    }
}
