//! The fleet on a grid: what a shard contributes to the operator's live map (`GET /map`).
//!
//! - A [`MapQuery`] asks for a box cut into a `cols` × `rows` grid. Every shard counts
//!   its drivers per cell and status ([`MapSlice`]); while a shard has at most
//!   `points_max` drivers in the box it also sends them as points (found through the
//!   R-tree, a descent plus the drivers in view), otherwise it counts them in one pass
//!   over its slots and sends none. So a city-wide view of a million drivers costs a
//!   grid of counts, and a street-level view the few hundred drivers in it.
//! - The top-level `map` module gathers a node's part (its shards, its live trips from
//!   the trips' board, its ingest rate) and every other node's over `Internal.MapPart`.
//!
//! Nothing here runs per fix: the map costs only when a page asks (once a second per
//! open page; a node shares its answer between pages asking the same view).

use super::Status;
use crate::geo::LatLonBox;

/// Most grid cells one query may ask for.
pub const MAX_CELLS: u32 = 128 * 128;
/// Most points one node sends; a page shows points only below this.
pub const MAX_POINTS: u32 = 20_000;
/// Most live trips one node sends.
pub const MAX_TRIPS: u32 = 2_000;

/// The statuses the map counts, in the order of a cell's counts.
pub const STATUSES: [Status; 4] = [Status::Offline, Status::Available, Status::OnTrip, Status::Dispatched];

/// A cell's counts index for a status.
#[inline]
pub fn status_index(s: Status) -> usize {
    s as usize - 1
}

/// A grid over a box (which does not cross the antimeridian).
#[derive(Clone, Debug, PartialEq)]
pub struct MapQuery {
    pub b: LatLonBox,
    pub cols: u32,
    pub rows: u32,
    /// Send points while at most this many drivers are in the box (per shard and node).
    pub points_max: u32,
    /// Send at most this many live trips (those nearest the box centre are not chosen:
    /// any `trips_max` of those in view; the count says how many there were).
    pub trips_max: u32,
}

impl MapQuery {
    /// Checks a query from the network: the field at fault and why.
    pub fn new(
        b: LatLonBox,
        cols: u32,
        rows: u32,
        points_max: u32,
        trips_max: u32,
    ) -> Result<MapQuery, (&'static str, String)> {
        let lat_ok = |v: f64| v.is_finite() && (-90.0..=90.0).contains(&v);
        let lon_ok = |v: f64| v.is_finite() && (-180.0..=180.0).contains(&v);
        if !lat_ok(b.min_lat) || !lat_ok(b.max_lat) || b.min_lat >= b.max_lat {
            return Err((
                "min_lat",
                format!("need -90 <= min_lat < max_lat <= 90, got {} and {}", b.min_lat, b.max_lat),
            ));
        }
        if !lon_ok(b.min_lon) || !lon_ok(b.max_lon) || b.min_lon >= b.max_lon {
            return Err((
                "min_lon",
                format!("need -180 <= min_lon < max_lon <= 180, got {} and {}", b.min_lon, b.max_lon),
            ));
        }
        if cols == 0 || rows == 0 || cols.saturating_mul(rows) > MAX_CELLS {
            return Err(("cols", format!("need 1 to {MAX_CELLS} cells, got {cols} x {rows}")));
        }
        if points_max > MAX_POINTS {
            return Err(("points_max", format!("{points_max} is above {MAX_POINTS}")));
        }
        if trips_max > MAX_TRIPS {
            return Err(("trips_max", format!("{trips_max} is above {MAX_TRIPS}")));
        }
        Ok(MapQuery { b, cols, rows, points_max, trips_max })
    }

    pub fn cells(&self) -> usize {
        (self.cols * self.rows) as usize
    }

    /// The cell (row-major from the south-west corner) of a point inside the box.
    #[inline]
    pub fn cell_of(&self, lat: f64, lon: f64) -> usize {
        let fx = (lon - self.b.min_lon) / (self.b.max_lon - self.b.min_lon);
        let fy = (lat - self.b.min_lat) / (self.b.max_lat - self.b.min_lat);
        let c = ((fx * self.cols as f64) as u32).min(self.cols - 1);
        let r = ((fy * self.rows as f64) as u32).min(self.rows - 1);
        (r * self.cols + c) as usize
    }
}

/// One driver drawn as a point.
#[derive(Clone, Debug, PartialEq)]
pub struct MapPoint {
    pub driver_id: String,
    pub lat: f64,
    pub lon: f64,
    pub status: Status,
    pub heading_deg: f32,
}

/// What shards (and then a node) answer for a [`MapQuery`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MapSlice {
    /// Per cell, row-major from the south-west: drivers per [`STATUSES`] entry.
    pub cells: Vec<[u32; 4]>,
    /// Drivers in the box.
    pub in_box: u64,
    /// The drivers in the box, unless there were more than `points_max`.
    pub points: Vec<MapPoint>,
    pub points_truncated: bool,
    /// Every live driver here, in the box or not.
    pub drivers: u64,
    /// Fixes accepted here since start (the ingest rate is its derivative).
    pub accepted: u64,
}

impl MapSlice {
    pub fn empty(q: &MapQuery) -> MapSlice {
        MapSlice { cells: vec![[0; 4]; q.cells()], ..Default::default() }
    }

    /// Adds another shard's slice (of the same query).
    pub fn merge(&mut self, o: MapSlice, q: &MapQuery) {
        if self.cells.len() != o.cells.len() {
            self.cells.resize(o.cells.len().max(self.cells.len()), [0; 4]);
        }
        for (a, b) in self.cells.iter_mut().zip(&o.cells) {
            for i in 0..4 {
                a[i] += b[i];
            }
        }
        self.in_box += o.in_box;
        self.drivers += o.drivers;
        self.accepted += o.accepted;
        self.points_truncated |= o.points_truncated;
        if !self.points_truncated {
            self.points.extend(o.points);
        }
        if self.points_truncated || self.points.len() > q.points_max as usize {
            self.points_truncated = true;
            self.points = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> MapQuery {
        let b = LatLonBox { min_lat: 10.0, min_lon: 20.0, max_lat: 12.0, max_lon: 24.0 };
        MapQuery::new(b, 4, 2, 2, 10).unwrap()
    }

    #[test]
    fn cells_run_row_major_from_the_south_west_and_edges_stay_inside() {
        let q = q();
        assert_eq!(q.cell_of(10.0, 20.0), 0);
        assert_eq!(q.cell_of(10.5, 23.5), 3);
        assert_eq!(q.cell_of(11.5, 20.5), 4);
        assert_eq!(q.cell_of(12.0, 24.0), 7, "the north-east corner is in the last cell");
    }

    #[test]
    fn bad_queries_name_their_field() {
        let b = LatLonBox { min_lat: 10.0, min_lon: 20.0, max_lat: 12.0, max_lon: 24.0 };
        assert_eq!(MapQuery::new(LatLonBox { min_lat: 13.0, ..b }, 4, 2, 0, 0).unwrap_err().0, "min_lat");
        assert_eq!(MapQuery::new(LatLonBox { max_lon: f64::NAN, ..b }, 4, 2, 0, 0).unwrap_err().0, "min_lon");
        assert_eq!(MapQuery::new(b, 0, 2, 0, 0).unwrap_err().0, "cols");
        assert_eq!(MapQuery::new(b, 1000, 1000, 0, 0).unwrap_err().0, "cols");
        assert_eq!(MapQuery::new(b, 4, 2, MAX_POINTS + 1, 0).unwrap_err().0, "points_max");
        assert_eq!(MapQuery::new(b, 4, 2, 0, MAX_TRIPS + 1).unwrap_err().0, "trips_max");
    }

    #[test]
    fn merged_points_are_dropped_once_there_are_too_many() {
        let q = q();
        let p = |id: &str| MapPoint {
            driver_id: id.into(),
            lat: 11.0,
            lon: 21.0,
            status: Status::Available,
            heading_deg: 0.0,
        };
        let mut a = MapSlice { points: vec![p("a")], in_box: 1, ..MapSlice::empty(&q) };
        a.cells[4][1] = 1;
        let mut b = MapSlice { points: vec![p("b")], in_box: 1, ..MapSlice::empty(&q) };
        b.cells[4][1] = 1;
        a.merge(b.clone(), &q);
        assert_eq!((a.in_box, a.points.len(), a.cells[4][1]), (2, 2, 2));
        a.merge(b, &q);
        assert!(a.points_truncated && a.points.is_empty(), "3 points > points_max 2");
        assert_eq!(a.cells[4][1], 3, "counts still add up");
    }
}
