//! The R-tree index of one shard: one tree per driver status, so a status filter (the
//! selective one: "available drivers") picks whole trees instead of skipping candidates.
//! The vehicle-type filter is checked per candidate. (One tree per (status, type) was
//! measured with `benches/core.rs` at 1M drivers: an unfiltered k=10 query took 81 µs
//! p50 over 6 trees against 54 µs over 2, since every tree pays its own descent.)

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use rstar::{AABB, PointDistance, RStarInsertionStrategy, RTreeObject, RTreeParams};

use super::{LatLonBox, haversine_m, metres_to_chord2, unit_vector};

/// Node sizes of the shard trees: 5 to 16 children (rstar's default is 3 to 6), so a
/// tree is shallower and a re-index (remove + insert) visits fewer nodes. Measured with
/// `benches/core.rs` at 1M drivers, every fix re-indexed (`CORE_BENCH_SLACK=0`): 3.4 µs
/// a fix against 4.9 µs, and a k=10 query 22 µs p50 against 33 µs.
pub struct Params;

impl RTreeParams for Params {
    const MIN_SIZE: usize = 5;
    const MAX_SIZE: usize = 16;
    const REINSERTION_COUNT: usize = 4;
    type DefaultInsertionStrategy = RStarInsertionStrategy;
}

type RTree<T> = rstar::RTree<T, Params>;

/// Which tree a driver lives in: its status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IndexKey {
    pub status: u8,
}

/// What a query accepts: a bit per status code, and optionally one vehicle type.
#[derive(Clone, Copy, Debug)]
pub struct QueryFilter {
    /// Bit `1 << status` set for every accepted status; `u32::MAX` accepts all.
    pub statuses: u32,
    /// `Some(id)` keeps only that interned vehicle type.
    pub vtype: Option<u16>,
}

impl QueryFilter {
    pub const ALL: QueryFilter = QueryFilter { statuses: u32::MAX, vtype: None };

    #[inline]
    fn accepts_tree(&self, key: IndexKey) -> bool {
        self.statuses & (1 << key.status) != 0
    }

    #[inline]
    fn accepts_vtype(&self, vtype: u16) -> bool {
        self.vtype.is_none_or(|v| v == vtype)
    }
}

/// One indexed point: an f32 unit vector (0.4 m resolution, covered by the query slack)
/// and the shard slot of the driver.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Pt {
    p: [f32; 3],
    slot: u32,
}

impl RTreeObject for Pt {
    type Envelope = AABB<[f32; 3]>;
    fn envelope(&self) -> Self::Envelope {
        AABB::from_point(self.p)
    }
}

impl PointDistance for Pt {
    fn distance_2(&self, q: &[f32; 3]) -> f32 {
        let d = [self.p[0] - q[0], self.p[1] - q[1], self.p[2] - q[2]];
        d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    }
}

/// A query result: the driver's slot and its exact great-circle distance in metres.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub slot: u32,
    pub distance_m: f64,
}

/// Converts a point to the f32 vector stored in the tree.
#[inline]
pub fn index_point(lat: f64, lon: f64) -> [f32; 3] {
    let v = unit_vector(lat, lon);
    [v[0] as f32, v[1] as f32, v[2] as f32]
}

/// What a query needs to know of a candidate: its true position, id and vehicle type.
pub struct Candidate<'a> {
    pub lat: f64,
    pub lon: f64,
    pub id: &'a str,
    pub vtype: u16,
}

/// Fewest points [`GeoIndex::insert_many`] rebuilds a tree for.
const REBUILD_MIN: usize = 4_096;

/// Points grouped by the tree they belong to.
fn by_key(points: impl IntoIterator<Item = (IndexKey, u32, [f32; 3])>) -> HashMap<IndexKey, Vec<Pt>> {
    let mut m: HashMap<IndexKey, Vec<Pt>> = HashMap::new();
    for (key, slot, p) in points {
        m.entry(key).or_default().push(Pt { p, slot });
    }
    m
}

/// The per-shard geo index. See the module docs of `geo` for why answers are exact.
pub struct GeoIndex {
    trees: HashMap<IndexKey, RTree<Pt>>,
    /// Re-index a driver once it is this far (squared unit chord) from its indexed point.
    move_chord2: f64,
    /// Widening applied to every search, as a unit chord: the move slack plus f32
    /// rounding. Pruning compares chords (straight-line distances between unit
    /// vectors), where the triangle inequality holds and f32 error stays constant at any
    /// range (converting f32 chords back to metres amplifies it near the antipode).
    slack_chord: f64,
}

/// f32 rounding of an indexed point plus the query point, as a unit chord (~6 m).
const F32_CHORD_EPS: f64 = 1e-6;

#[inline]
fn chord(d_m: f64) -> f64 {
    metres_to_chord2(d_m).sqrt()
}

/// A candidate in a top-k selection, ordered by (distance, id) so ties are deterministic.
struct Cand<'a> {
    d: f64,
    id: &'a str,
    slot: u32,
}

impl PartialEq for Cand<'_> {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Cand<'_> {}
impl PartialOrd for Cand<'_> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand<'_> {
    fn cmp(&self, o: &Self) -> Ordering {
        self.d.total_cmp(&o.d).then_with(|| self.id.cmp(o.id))
    }
}

impl GeoIndex {
    /// `move_slack_m`: how far a driver may drift from its indexed point before it is
    /// re-indexed. Larger means fewer tree updates on ingest and a wider query band.
    pub fn new(move_slack_m: f64) -> Self {
        GeoIndex {
            trees: HashMap::new(),
            move_chord2: metres_to_chord2(move_slack_m),
            slack_chord: chord(move_slack_m) + F32_CHORD_EPS,
        }
    }

    /// The point to re-index a driver at, if (lat, lon) is more than the slack away from
    /// its indexed point `indexed`; `None` while the indexed point is still good enough.
    #[inline]
    pub fn moved_point(&self, indexed: [f32; 3], lat: f64, lon: f64) -> Option<[f32; 3]> {
        let v = unit_vector(lat, lon);
        let d2: f64 = (0..3).map(|i| (v[i] - indexed[i] as f64).powi(2)).sum();
        (d2 > self.move_chord2).then(|| v.map(|c| c as f32))
    }

    /// Number of indexed points.
    pub fn len(&self) -> usize {
        self.trees.values().map(RTree::size).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn insert(&mut self, key: IndexKey, slot: u32, p: [f32; 3]) {
        self.trees.entry(key).or_default().insert(Pt { p, slot });
    }

    /// Removes a point; `p` must be the point it was inserted with.
    pub fn remove(&mut self, key: IndexKey, slot: u32, p: [f32; 3]) -> bool {
        self.trees.get_mut(&key).is_some_and(|t| t.remove(&Pt { p, slot }).is_some())
    }

    /// Adds many points at once (a partition arriving). A tree that grows by a quarter
    /// or more is rebuilt by bulk loading, several times faster than inserting one by
    /// one (a promotion adds a lost owner's share in one go); smaller additions insert.
    pub fn insert_many(&mut self, points: impl IntoIterator<Item = (IndexKey, u32, [f32; 3])>) {
        for (key, mut pts) in by_key(points) {
            let tree = self.trees.entry(key).or_default();
            if pts.len() >= REBUILD_MIN && 4 * pts.len() >= tree.size() {
                pts.extend(tree.iter().copied());
                *tree = RTree::bulk_load_with_params(pts);
            } else {
                for p in pts {
                    tree.insert(p);
                }
            }
        }
    }

    /// Replaces the whole index with `points`, using rstar's bulk loading (restarts).
    pub fn bulk_load(&mut self, points: impl IntoIterator<Item = (IndexKey, u32, [f32; 3])>) {
        self.trees = by_key(points).into_iter().map(|(k, v)| (k, RTree::bulk_load_with_params(v))).collect();
    }

    /// The `k` drivers nearest to (lat, lon), optionally within `radius_m`, nearest first.
    /// `pos(slot)` describes a candidate (true position, id, vehicle type).
    pub fn nearest<'a, F>(
        &self,
        lat: f64,
        lon: f64,
        k: usize,
        radius_m: Option<f64>,
        filter: QueryFilter,
        pos: F,
    ) -> Vec<Hit>
    where
        F: Fn(u32) -> Candidate<'a>,
    {
        if k == 0 {
            return Vec::new();
        }
        let q = index_point(lat, lon);
        let slack = self.slack_chord;
        let radius_chord = radius_m.map(chord);
        // Max-heap of the best k so far, by (distance, id), and the chord of the worst.
        let mut best: BinaryHeap<Cand<'a>> = BinaryHeap::with_capacity(k + 1);
        let mut worst_chord = f64::INFINITY;
        for (key, tree) in &self.trees {
            if !filter.accepts_tree(*key) {
                continue;
            }
            for (pt, d2) in tree.nearest_neighbor_iter_with_distance_2(q) {
                // |q - p'| > bound + slack implies |q - p| > bound for the true point p.
                let c_approx = (d2 as f64).sqrt();
                if radius_chord.is_some_and(|rc| c_approx > rc + slack) || c_approx > worst_chord + slack {
                    break;
                }
                let c = pos(pt.slot);
                if !filter.accepts_vtype(c.vtype) {
                    continue;
                }
                let d = haversine_m(lat, lon, c.lat, c.lon);
                if radius_m.is_some_and(|r| d > r) {
                    continue;
                }
                let c = Cand { d, id: c.id, slot: pt.slot };
                if best.len() < k {
                    best.push(c);
                } else if best.peek().is_some_and(|worst| c < *worst) {
                    best.pop();
                    best.push(c);
                } else {
                    continue;
                }
                if best.len() == k {
                    worst_chord = best.peek().map_or(f64::INFINITY, |w| chord(w.d));
                }
            }
        }
        best.into_sorted_vec().into_iter().map(|c| Hit { slot: c.slot, distance_m: c.d }).collect()
    }

    /// The unit-vector envelope holding every indexed point of a driver inside `b`.
    fn envelope(&self, b: &LatLonBox) -> AABB<[f32; 3]> {
        let (mut lo, mut hi) = b.unit_bounds();
        let pad = self.slack_chord;
        for i in 0..3 {
            lo[i] -= pad;
            hi[i] += pad;
        }
        AABB::from_corners(lo.map(|v| v as f32), hi.map(|v| v as f32))
    }

    /// Calls `visit` with the slot of every driver inside the box (any status, any
    /// type), in no order, until it returns `false`. Returns whether every driver was
    /// visited. Costs a descent plus the drivers visited: the live map asks it for the
    /// points of a small area and stops as soon as there are too many to draw.
    pub fn visit_box<'a, F, V>(&self, b: &LatLonBox, pos: F, mut visit: V) -> bool
    where
        F: Fn(u32) -> Candidate<'a>,
        V: FnMut(u32) -> bool,
    {
        let env = self.envelope(b);
        for tree in self.trees.values() {
            for pt in tree.locate_in_envelope(env) {
                let c = pos(pt.slot);
                if b.contains(c.lat, c.lon) && !visit(pt.slot) {
                    return false;
                }
            }
        }
        true
    }

    /// Every driver inside the box, with its distance to the box centre, unordered.
    pub fn in_box<'a, F>(&self, b: &LatLonBox, filter: QueryFilter, pos: F) -> Vec<Hit>
    where
        F: Fn(u32) -> Candidate<'a>,
    {
        let env = self.envelope(b);
        let (clat, clon) = b.centre();
        let mut out = Vec::new();
        for (key, tree) in &self.trees {
            if !filter.accepts_tree(*key) {
                continue;
            }
            for pt in tree.locate_in_envelope(env) {
                let c = pos(pt.slot);
                if filter.accepts_vtype(c.vtype) && b.contains(c.lat, c.lon) {
                    out.push(Hit { slot: pt.slot, distance_m: haversine_m(clat, clon, c.lat, c.lon) });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct World {
        pts: Vec<(f64, f64, String, IndexKey)>,
        idx: GeoIndex,
        indexed: Vec<[f32; 3]>,
    }

    impl World {
        fn new(slack: f64) -> Self {
            World { pts: vec![], idx: GeoIndex::new(slack), indexed: vec![] }
        }
        fn add(&mut self, lat: f64, lon: f64, key: IndexKey) {
            let slot = self.pts.len() as u32;
            let p = index_point(lat, lon);
            self.idx.insert(key, slot, p);
            self.indexed.push(p);
            self.pts.push((lat, lon, format!("d{slot:05}"), key));
        }
        fn nearest(&self, lat: f64, lon: f64, k: usize, r: Option<f64>, f: QueryFilter) -> Vec<Hit> {
            self.idx.nearest(lat, lon, k, r, f, |s| {
                let p = &self.pts[s as usize];
                Candidate { lat: p.0, lon: p.1, id: p.2.as_str(), vtype: s as u16 % 2 }
            })
        }
    }

    const K0: IndexKey = IndexKey { status: 2 };
    const K1: IndexKey = IndexKey { status: 3 };

    #[test]
    fn nearest_is_exact_after_small_moves() {
        let mut w = World::new(50.0);
        for i in 0..200 {
            w.add(52.5 + (i as f64) * 0.0003, 13.4 + (i % 7) as f64 * 0.0002, K0);
        }
        // Drivers drift 30 m (less than the slack) without being re-indexed.
        for p in &mut w.pts {
            p.0 += 0.00027;
        }
        assert!(w.idx.moved_point(w.indexed[0], w.pts[0].0, w.pts[0].1).is_none());
        let got = w.nearest(52.5, 13.4, 5, None, QueryFilter::ALL);
        let mut brute: Vec<(f64, &str)> =
            w.pts.iter().map(|p| (haversine_m(52.5, 13.4, p.0, p.1), p.2.as_str())).collect();
        brute.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(b.1)));
        let got_ids: Vec<&str> = got.iter().map(|h| w.pts[h.slot as usize].2.as_str()).collect();
        let want: Vec<&str> = brute.iter().take(5).map(|b| b.1).collect();
        assert_eq!(got_ids, want);
    }

    #[test]
    fn filter_selects_trees_and_radius_cuts() {
        let mut w = World::new(10.0);
        w.add(0.0, 0.0, K0);
        w.add(0.0, 0.001, K1);
        w.add(0.0, 0.002, K0);
        let only_k1 = QueryFilter { statuses: 1 << 3, vtype: None };
        let got = w.nearest(0.0, 0.0, 10, None, only_k1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].slot, 1);
        let got = w.nearest(0.0, 0.0, 10, Some(150.0), QueryFilter::ALL);
        assert_eq!(got.iter().map(|h| h.slot).collect::<Vec<_>>(), vec![0, 1]);
        // Vehicle type (slot parity in this world) is checked per candidate.
        let odd = QueryFilter { statuses: u32::MAX, vtype: Some(1) };
        assert_eq!(w.nearest(0.0, 0.0, 10, None, odd).iter().map(|h| h.slot).collect::<Vec<_>>(), vec![1]);
        assert!(w.idx.remove(K1, 1, w.indexed[1]));
        assert!(!w.idx.remove(K1, 1, w.indexed[1]));
        assert_eq!(w.idx.len(), 2);
    }

    #[test]
    fn equal_distances_tie_break_by_id() {
        let mut w = World::new(10.0);
        w.add(1.0, 1.0, K1);
        w.add(1.0, 1.0, K0);
        w.add(1.0, 1.0, K0);
        let got = w.nearest(1.0, 1.0, 2, None, QueryFilter::ALL);
        assert_eq!(got.iter().map(|h| h.slot).collect::<Vec<_>>(), vec![0, 1]);
    }
}
