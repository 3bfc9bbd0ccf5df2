//! Micro-benchmarks of the pure cores, without gRPC: the cost of one fix and of one
//! Nearby query inside a shard, at 1,000,000 drivers in a 12 km city, and of the live
//! map's view of that shard.
//! Run with `cargo bench --bench core` (part of `make bench`).

use std::time::Instant;

use locus::drivers::map::MapQuery;
use locus::drivers::{DriverShard, FixInput, NearbyQuery, PersistBatch, Position, ShardConfig, Snapshot, Status};
use locus::geo::{EARTH_RADIUS_M, LatLonBox};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

fn point(rng: &mut SmallRng) -> (f64, f64) {
    let r = 12_000.0 * rng.random_range(0.0f64..1.0).sqrt();
    let b = rng.random_range(0.0..std::f64::consts::TAU);
    (
        52.52 + (r * b.cos() / EARTH_RADIUS_M).to_degrees(),
        13.405 + (r * b.sin() / (EARTH_RADIUS_M * 0.6085)).to_degrees(),
    )
}

fn main() {
    let n: usize = std::env::var("CORE_BENCH_DRIVERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let mut sh = DriverShard::new(ShardConfig {
        ttl_ms: 900_000,
        trail_len: 32,
        max_speed_mps: 70.0,
        move_slack_m: std::env::var("CORE_BENCH_SLACK").ok().and_then(|v| v.parse().ok()).unwrap_or(30.0),
        max_vehicle_types: 64,
        history: true,
    });
    let mut rng = SmallRng::seed_from_u64(1);
    let pts: Vec<(f64, f64)> = (0..n).map(|_| point(&mut rng)).collect();
    let ids: Vec<String> = (0..n).map(|i| format!("drv-{i}")).collect();
    let fix = |i: usize, round: i64, lat: f64, lon: f64| FixInput {
        driver_id: ids[i].clone(),
        lat,
        lon,
        timestamp_ms: 1_700_000_000_000 + round * 1_000,
        status: Some(if i.is_multiple_of(4) { Status::OnTrip } else { Status::Available }),
        vehicle_type: ["sedan", "suv", "moto"][i % 3].into(),
        speed_mps: 8.0,
        ..Default::default()
    };
    let now = 1_700_000_100_000;
    let t0 = Instant::now();
    for (i, p) in pts.iter().enumerate() {
        sh.apply(fix(i, 0, p.0, p.1), now).unwrap();
    }
    let first = t0.elapsed();
    let mut batch = PersistBatch::default();
    sh.take_writes(&mut batch);
    // Moving fixes: 8 m per round, so about one in four re-indexes with a 30 m slack.
    let rounds = 3;
    let t0 = Instant::now();
    for round in 1..=rounds {
        for (i, p) in pts.iter().enumerate() {
            let d = (round as f64 * 8.0 / EARTH_RADIUS_M).to_degrees();
            sh.apply(fix(i, round, p.0 + d, p.1), now).unwrap();
        }
    }
    let moving = t0.elapsed();
    let t0 = Instant::now();
    sh.take_writes(&mut batch);
    let commit = t0.elapsed();
    // The history's side of a commit: its fixes appended to the partitions' files, in
    // commits of 20,000 fixes (a shard's quarter second at 80,000 fixes/s).
    let hist_dir = tempfile::tempdir().expect("a temporary directory");
    let cfg = locus::history::HistoryConfig { retention_ms: 86_400_000, pull_max: locus::history::EXPORT_MAX };
    let store = locus::history::HistoryStore::open(hist_dir.path(), cfg).expect("open the history");
    let (mut hist, mut hist_fixes) = (std::time::Duration::ZERO, 0usize);
    for c in 0..50usize {
        let mut b = PersistBatch::default();
        for j in 0..20_000 {
            let i = (c * 20_000 + j) % n;
            let d = ((10 + c) as f64 * 8.0 / EARTH_RADIUS_M).to_degrees();
            sh.apply(fix(i, 10 + c as i64, pts[i].0 + d, pts[i].1), now).unwrap();
        }
        sh.take_writes(&mut b);
        let t = Instant::now();
        store.append_local(&b.history);
        hist += t.elapsed();
        hist_fixes += 20_000;
    }
    let queries = 20_000;
    let mut lat_us = Vec::with_capacity(queries);
    let mut hits = 0;
    for _ in 0..queries {
        let (lat, lon) = point(&mut rng);
        let q = NearbyQuery { lat, lon, limit: 10, radius_m: None, statuses: u32::MAX, vehicle_type: None };
        let t = Instant::now();
        hits += sh.nearby(&q).len();
        lat_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat_us.sort_by(f64::total_cmp);
    let mut avail_us = Vec::with_capacity(queries);
    for _ in 0..queries {
        let (lat, lon) = point(&mut rng);
        let q = NearbyQuery {
            lat,
            lon,
            limit: 10,
            radius_m: None,
            statuses: 1 << Status::Available.code(),
            vehicle_type: Some("moto".into()),
        };
        let t = Instant::now();
        hits += sh.nearby(&q).len();
        avail_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    avail_us.sort_by(f64::total_cmp);
    let p = |v: &[f64], q: f64| v[((v.len() - 1) as f64 * q) as usize];
    // A promotion: a third as many drivers again arrive at once (a lost owner's share).
    let extra: Vec<Snapshot> = (0..n / 3)
        .map(|i| {
            let (lat, lon) = point(&mut rng);
            Snapshot {
                driver_id: format!("new-{i}"),
                status: Status::Available,
                vehicle_type: "sedan".into(),
                last: Position { lat, lon, timestamp_ms: now - 1_000, ..Default::default() },
                received_ms: now - 1_000,
                trip_cost: 0.0,
                cab: String::new(),
                session: String::new(),
                trip_id: String::new(),
                trail: Default::default(),
            }
        })
        .collect();
    let t0 = Instant::now();
    let installed = sh.install(extra, Vec::new());
    let install = t0.elapsed();
    // The live map: the whole city on a 64 x 40 grid (a pass over every slot), and a
    // street-level view of about 500 m square (points through the R-tree).
    let n_all = sh.len();
    let city = LatLonBox { min_lat: 52.40, min_lon: 13.20, max_lat: 52.64, max_lon: 13.61 };
    let q = MapQuery::new(city, 64, 40, 5_000, 0).unwrap();
    let t0 = Instant::now();
    let reps = 5;
    let mut counted = 0;
    for _ in 0..reps {
        counted += sh.map(&q).in_box;
    }
    let map_city = t0.elapsed() / reps;
    let mut street_us = Vec::with_capacity(1_000);
    let mut street_points = 0;
    for _ in 0..1_000 {
        let (lat, lon) = point(&mut rng);
        let b =
            LatLonBox { min_lat: lat - 0.00225, min_lon: lon - 0.0037, max_lat: lat + 0.00225, max_lon: lon + 0.0037 };
        let q = MapQuery::new(b, 64, 40, 5_000, 0).unwrap();
        let t = Instant::now();
        street_points += sh.map(&q).points.len();
        street_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    street_us.sort_by(f64::total_cmp);
    println!("core benchmark, one shard, {n} drivers, 32-fix trails");
    println!("  first fix (create):      {:.0} ns/fix", first.as_nanos() as f64 / n as f64);
    println!("  moving fix (update):     {:.0} ns/fix", moving.as_nanos() as f64 / (n * rounds as usize) as f64);
    println!(
        "  group commit encode:     {:.0} ns/driver ({} bytes)",
        commit.as_nanos() as f64 / n as f64,
        batch.buf.len()
    );
    println!(
        "  history append:          {:.0} ns/fix (commits of 20,000 fixes, {:.1} bytes/fix on disk)",
        hist.as_nanos() as f64 / hist_fixes as f64,
        store.bytes() as f64 / hist_fixes as f64
    );
    println!(
        "  install (promotion):     {:.0} ns/driver ({installed} drivers into a shard of {n})",
        install.as_nanos() as f64 / installed.max(1) as f64
    );
    println!("  nearby k=10, no filter:  p50 {:.1} us, p99 {:.1} us", p(&lat_us, 0.5), p(&lat_us, 0.99));
    println!(
        "  nearby k=10, available moto: p50 {:.1} us, p99 {:.1} us ({hits} hits)",
        p(&avail_us, 0.5),
        p(&avail_us, 0.99)
    );
    println!(
        "  live map, city grid:     {:.1} ms per view ({} of {n_all} drivers counted on 64 x 40 cells)",
        map_city.as_secs_f64() * 1e3,
        counted / reps as u64
    );
    println!(
        "  live map, street view:   p50 {:.0} us, p99 {:.0} us ({} points per view on average)",
        p(&street_us, 0.5),
        p(&street_us, 0.99),
        street_points / 1_000
    );
}
