//! The trips' board: a sketch of every live trip on this node for the live map.
//!
//! Each trip actor keeps its own entry current: on every state change, and on driver
//! fixes at most once per [`REFRESH`] (a map asks once a second). A sketch holds the
//! route down-sampled to at most [`ROUTE_POINTS`] points, so reading the board for a
//! map costs a copy of a few hundred bytes per trip in view and never asks an actor.
//! Final trips (dropped, cancelled) leave the board; so do trips that move or expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use super::model::{Trip, TripState};
use crate::geo::LatLonBox;
use crate::keys::key_hash;

/// How often driver fixes refresh a trip's sketch.
pub const REFRESH: Duration = Duration::from_millis(900);
/// Most route points a sketch keeps.
pub const ROUTE_POINTS: usize = 64;

/// One live trip as the map draws it.
#[derive(Clone, Debug, PartialEq)]
pub struct TripSketch {
    pub trip_id: String,
    pub state: TripState,
    pub driver_id: String,
    pub pickup: (f64, f64),
    pub dropoff: (f64, f64),
    pub driver: Option<(f64, f64)>,
    /// (lat, lon), oldest first, the driver's latest position last.
    pub route: Vec<(f32, f32)>,
}

impl TripSketch {
    pub fn of(t: &Trip) -> TripSketch {
        let n = t.route.len();
        let step = n.div_ceil(ROUTE_POINTS).max(1);
        let mut route: Vec<(f32, f32)> = t.route.iter().step_by(step).map(|p| (p.lat as f32, p.lon as f32)).collect();
        if let Some(last) = t.route.last()
            && n > 0
            && !(n - 1).is_multiple_of(step)
        {
            route.push((last.lat as f32, last.lon as f32));
        }
        TripSketch {
            trip_id: t.trip_id.clone(),
            state: t.state,
            driver_id: t.driver_id.clone(),
            pickup: (t.pickup.lat, t.pickup.lon),
            dropoff: (t.dropoff.lat, t.dropoff.lon),
            driver: t.driver_pos.map(|p| (p.lat, p.lon)),
            route,
        }
    }

    /// Whether the map should draw it for a box: its driver, pickup or drop-off is in it.
    pub fn touches(&self, b: &LatLonBox) -> bool {
        self.driver.is_some_and(|(la, lo)| b.contains(la, lo))
            || b.contains(self.pickup.0, self.pickup.1)
            || b.contains(self.dropoff.0, self.dropoff.1)
    }
}

const STRIPES: usize = 16;

/// trip id → sketch, striped so actors of different trips rarely meet.
pub struct Board {
    stripes: Vec<Mutex<HashMap<Box<str>, TripSketch>>>,
}

impl Default for Board {
    fn default() -> Self {
        Board { stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect() }
    }
}

impl Board {
    fn stripe(&self, id: &str) -> &Mutex<HashMap<Box<str>, TripSketch>> {
        &self.stripes[(key_hash(id.as_bytes()) % STRIPES as u64) as usize]
    }

    /// Puts a trip's current sketch up (or takes it down once the trip is final).
    pub fn show(&self, t: &Trip) {
        if t.state.is_final() {
            return self.remove(&t.trip_id);
        }
        let s = TripSketch::of(t);
        self.stripe(&t.trip_id).lock().expect("board lock").insert(t.trip_id.as_str().into(), s);
    }

    pub fn remove(&self, trip_id: &str) {
        self.stripe(trip_id).lock().expect("board lock").remove(trip_id);
    }

    /// Up to `max` trips touching the box, and how many touch it in all.
    pub fn in_box(&self, b: &LatLonBox, max: usize) -> (Vec<TripSketch>, u64) {
        let mut out = Vec::new();
        let mut n = 0;
        for s in &self.stripes {
            for t in s.lock().expect("board lock").values() {
                if t.touches(b) {
                    n += 1;
                    if out.len() < max {
                        out.push(t.clone());
                    }
                }
            }
        }
        (out, n)
    }

    /// Live trips on the board.
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().expect("board lock").len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trips::model::{EventKind, LatLon, RoutePoint, TripConfig, TripEvent};

    fn trip(id: &str) -> Trip {
        let kind = EventKind::BookingCreated {
            pickup: LatLon { lat: 52.52, lon: 13.40 },
            dropoff: LatLon { lat: 52.50, lon: 13.45 },
            estimated_drive_s: 600,
        };
        let ev = TripEvent { trip_id: id.into(), event_id: "b".into(), kind };
        Trip::create(&ev, 1_000, &TripConfig::default()).unwrap()
    }

    #[test]
    fn a_long_route_is_down_sampled_and_keeps_its_last_point() {
        let mut t = trip("t1");
        t.route = (0..1_000).map(|i| RoutePoint { lat: 52.0 + i as f64 * 1e-4, lon: 13.0, timestamp_ms: i }).collect();
        let s = TripSketch::of(&t);
        assert!(s.route.len() <= ROUTE_POINTS + 1, "{}", s.route.len());
        assert_eq!(s.route.first().unwrap().0, 52.0);
        assert_eq!(*s.route.last().unwrap(), ((52.0 + 999e-4) as f32, 13.0), "ends at the driver");
        t.route.truncate(3);
        assert_eq!(TripSketch::of(&t).route.len(), 3, "a short route is kept whole");
    }

    #[test]
    fn the_board_answers_trips_touching_a_box_and_drops_final_ones() {
        let b = Board::default();
        for i in 0..5 {
            b.show(&trip(&format!("t{i}")));
        }
        let near = LatLonBox { min_lat: 52.51, min_lon: 13.39, max_lat: 52.53, max_lon: 13.41 };
        let far = LatLonBox { min_lat: 10.0, min_lon: 10.0, max_lat: 11.0, max_lon: 11.0 };
        let (some, n) = b.in_box(&near, 2);
        assert_eq!((some.len(), n), (2, 5), "two sent, five counted");
        assert_eq!(b.in_box(&far, 10).1, 0);
        let mut done = trip("t0");
        done.state = TripState::Cancelled;
        b.show(&done);
        assert_eq!(b.len(), 4, "a final trip leaves the board");
    }
}
