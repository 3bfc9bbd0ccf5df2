//! Exact great-circle geometry and the per-shard geo index.
//!
//! Pure code: no clock, no IO. Owned by a shard worker (see `actors`), which is the only
//! writer of its [`GeoIndex`].
//!
//! Points are indexed in an rstar R-tree as unit-sphere vectors (`[x, y, z]`), so the
//! Euclidean chord the tree prunes with grows monotonically with great-circle distance:
//! k-NN order is exact everywhere, poles and antimeridian included. To keep the R-tree off
//! the ingest hot path, a driver is re-indexed only when it has moved more than
//! `slack_m` from its indexed point; every query widens its search by that slack and
//! ranks candidates by the true (last accepted) position, so answers stay exact.

pub mod index;

pub use index::{Candidate, GeoIndex, Hit, IndexKey, QueryFilter};

/// Mean Earth radius (IUGG), metres. Every distance in Locus uses it.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Great-circle distance in metres between two WGS84 points given in degrees (haversine).
#[inline]
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp * 0.5).sin().powi(2) + p1.cos() * p2.cos() * (dl * 0.5).sin().powi(2);
    2.0 * EARTH_RADIUS_M * a.sqrt().min(1.0).asin()
}

/// The unit-sphere vector of a point given in degrees.
#[inline]
pub fn unit_vector(lat: f64, lon: f64) -> [f64; 3] {
    let (sp, cp) = lat.to_radians().sin_cos();
    let (sl, cl) = lon.to_radians().sin_cos();
    [cp * cl, cp * sl, sp]
}

/// Squared chord (on the unit sphere) of a great-circle distance in metres.
#[inline]
pub fn metres_to_chord2(d_m: f64) -> f64 {
    let half = (d_m / (2.0 * EARTH_RADIUS_M)).min(std::f64::consts::FRAC_PI_2);
    let c = 2.0 * half.sin();
    c * c
}

/// Great-circle distance in metres of a squared chord on the unit sphere.
#[inline]
pub fn chord2_to_metres(c2: f64) -> f64 {
    2.0 * EARTH_RADIUS_M * (c2.max(0.0).sqrt() * 0.5).min(1.0).asin()
}

/// A latitude/longitude box. `min_lon > max_lon` means it crosses the antimeridian.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatLonBox {
    pub min_lat: f64,
    pub min_lon: f64,
    pub max_lat: f64,
    pub max_lon: f64,
}

impl LatLonBox {
    /// Whether the box contains the point (edges included).
    #[inline]
    pub fn contains(&self, lat: f64, lon: f64) -> bool {
        if lat < self.min_lat || lat > self.max_lat {
            return false;
        }
        if self.min_lon <= self.max_lon {
            lon >= self.min_lon && lon <= self.max_lon
        } else {
            lon >= self.min_lon || lon <= self.max_lon
        }
    }

    /// Longitudinal width in degrees, accounting for the antimeridian.
    pub fn lon_span(&self) -> f64 {
        if self.min_lon <= self.max_lon { self.max_lon - self.min_lon } else { 360.0 - self.min_lon + self.max_lon }
    }

    /// The box centre, used to order box results.
    pub fn centre(&self) -> (f64, f64) {
        let lat = (self.min_lat + self.max_lat) * 0.5;
        let mut lon = self.min_lon + self.lon_span() * 0.5;
        if lon > 180.0 {
            lon -= 360.0;
        }
        (lat, lon)
    }

    /// An axis-aligned box in unit-vector space that contains every point of this box.
    pub fn unit_bounds(&self) -> ([f64; 3], [f64; 3]) {
        let (p1, p2) = (self.min_lat.to_radians(), self.max_lat.to_radians());
        // cos(lat) over [p1, p2]; lat in [-90, 90] so cos >= 0.
        let cos_min = p1.cos().min(p2.cos());
        let cos_max = if p1 <= 0.0 && p2 >= 0.0 { 1.0 } else { p1.cos().max(p2.cos()) };
        let (cl_min, cl_max) = self.trig_range(f64::cos);
        let (sl_min, sl_max) = self.trig_range(f64::sin);
        let prod = |a_min: f64, a_max: f64, b_min: f64, b_max: f64| {
            let c = [a_min * b_min, a_min * b_max, a_max * b_min, a_max * b_max];
            (c.iter().copied().fold(f64::INFINITY, f64::min), c.iter().copied().fold(f64::NEG_INFINITY, f64::max))
        };
        let (x0, x1) = prod(cos_min, cos_max, cl_min, cl_max);
        let (y0, y1) = prod(cos_min, cos_max, sl_min, sl_max);
        ([x0, y0, p1.sin()], [x1, y1, p2.sin()])
    }

    /// Min and max of `f` (sin or cos) over the longitude interval of the box.
    fn trig_range(&self, f: fn(f64) -> f64) -> (f64, f64) {
        let start = self.min_lon;
        let span = self.lon_span();
        let mut lo = f(start.to_radians()).min(f((start + span).to_radians()));
        let mut hi = f(start.to_radians()).max(f((start + span).to_radians()));
        // Interior extrema of sin/cos sit at multiples of 90 degrees.
        let mut k = (start / 90.0).ceil() * 90.0;
        while k <= start + span {
            let v = f(k.to_radians());
            lo = lo.min(v);
            hi = hi.max(v);
            k += 90.0;
        }
        (lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haversine_known_distances() {
        // One degree of latitude is about 111.2 km.
        let d = haversine_m(0.0, 0.0, 1.0, 0.0);
        assert!((d - 111_195.0).abs() < 5.0, "{d}");
        // Across the antimeridian the short way round.
        let d = haversine_m(0.0, 179.9, 0.0, -179.9);
        assert!((d - 22_239.0).abs() < 5.0, "{d}");
        // Near the pole, longitude barely matters.
        let d = haversine_m(89.9999, 0.0, 89.9999, 180.0);
        assert!(d < 25.0, "{d}");
    }

    #[test]
    fn chord_round_trip() {
        for d in [0.0, 1.0, 50.0, 12_345.0, 1_000_000.0, 15_000_000.0] {
            let back = chord2_to_metres(metres_to_chord2(d));
            assert!((back - d).abs() < 1e-3 * d.max(1.0), "{d} -> {back}");
        }
    }

    #[test]
    fn chord_matches_haversine() {
        let a = unit_vector(52.5, 13.4);
        let b = unit_vector(48.85, 2.35);
        let c2: f64 = (0..3).map(|i| (a[i] - b[i]).powi(2)).sum();
        let d = haversine_m(52.5, 13.4, 48.85, 2.35);
        assert!((chord2_to_metres(c2) - d).abs() < 0.01);
    }

    #[test]
    fn box_contains_across_antimeridian() {
        let b = LatLonBox { min_lat: -10.0, min_lon: 170.0, max_lat: 10.0, max_lon: -170.0 };
        assert!(b.contains(0.0, 175.0));
        assert!(b.contains(0.0, -175.0));
        assert!(b.contains(0.0, 180.0));
        assert!(!b.contains(0.0, 0.0));
        assert!(!b.contains(11.0, 175.0));
        assert_eq!(b.lon_span(), 20.0);
        assert_eq!(b.centre(), (0.0, 180.0));
    }

    #[test]
    fn unit_bounds_contain_box_points() {
        let boxes = [
            LatLonBox { min_lat: -10.0, min_lon: 170.0, max_lat: 10.0, max_lon: -170.0 },
            LatLonBox { min_lat: 80.0, min_lon: -180.0, max_lat: 90.0, max_lon: 180.0 },
            LatLonBox { min_lat: 52.0, min_lon: 13.0, max_lat: 53.0, max_lon: 14.0 },
            LatLonBox { min_lat: -90.0, min_lon: -45.0, max_lat: -60.0, max_lon: 100.0 },
        ];
        for b in boxes {
            let (lo, hi) = b.unit_bounds();
            for i in 0..=20 {
                for j in 0..=20 {
                    let lat = b.min_lat + (b.max_lat - b.min_lat) * i as f64 / 20.0;
                    let mut lon = b.min_lon + b.lon_span() * j as f64 / 20.0;
                    if lon > 180.0 {
                        lon -= 360.0;
                    }
                    let v = unit_vector(lat, lon);
                    for k in 0..3 {
                        assert!(v[k] >= lo[k] - 1e-12 && v[k] <= hi[k] + 1e-12, "{b:?} {lat} {lon}");
                    }
                }
            }
        }
    }
}
