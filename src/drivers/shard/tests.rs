use super::*;
use crate::drivers::codec::{Record, decode_records};
use proptest::prelude::*;

const T0: i64 = 1_700_000_000_000;

fn cfg() -> ShardConfig {
    ShardConfig {
        ttl_ms: 900_000,
        trail_len: 4,
        max_speed_mps: 70.0,
        move_slack_m: 25.0,
        max_vehicle_types: 3,
        history: false,
    }
}

fn fix(id: &str, lat: f64, lon: f64, ts: i64) -> FixInput {
    FixInput { driver_id: id.into(), lat, lon, timestamp_ms: ts, status: Some(Status::Available), ..Default::default() }
}

fn id(s: &str) -> Lookup {
    Lookup::Id(s.into())
}

#[test]
fn accepts_then_rejects_stale_and_jumps_without_changing_state() {
    let mut sh = DriverShard::new(cfg());
    sh.apply(fix("d1", 52.5, 13.4, T0), T0).unwrap();
    let before = sh.get(&id("d1"), true).unwrap();
    let err = sh.apply(fix("d1", 52.5001, 13.4, T0), T0 + 10).unwrap_err();
    assert_eq!(err.reason(), "stale");
    // 1.1 km in one second is 1,100 m/s.
    let err = sh.apply(fix("d1", 52.51, 13.4, T0 + 1_000), T0 + 10).unwrap_err();
    assert_eq!(err.reason(), "implausible_jump");
    assert_eq!(sh.get(&id("d1"), true).unwrap(), before);
    assert_eq!((sh.counters.stale, sh.counters.implausible, sh.counters.accepted), (1, 1, 1));
    // 55 m in one second is fine.
    sh.apply(fix("d1", 52.5005, 13.4, T0 + 1_000), T0 + 20).unwrap();
    assert_eq!(sh.get(&id("d1"), false).unwrap().last.lat, 52.5005);
}

#[test]
fn trail_keeps_the_last_n_fixes_oldest_first() {
    let mut sh = DriverShard::new(cfg());
    for i in 0..10 {
        sh.apply(fix("d1", 10.0 + i as f64 * 1e-4, 10.0, T0 + i * 1_000), T0 + i * 1_000).unwrap();
    }
    let v = sh.get(&id("d1"), true).unwrap();
    let ts: Vec<i64> = v.trail.iter().map(|p| p.timestamp_ms).collect();
    assert_eq!(ts, vec![T0 + 6_000, T0 + 7_000, T0 + 8_000, T0 + 9_000]);
    assert_eq!(*v.trail.last().unwrap(), v.last);
    assert!(sh.get(&id("d1"), false).unwrap().trail.is_empty());
}

#[test]
fn expiry_fires_after_ttl_and_fixes_postpone_it() {
    let mut sh = DriverShard::new(ShardConfig { ttl_ms: 10_000, ..cfg() });
    sh.apply(fix("d1", 1.0, 1.0, T0), T0).unwrap();
    sh.apply(fix("d2", 1.0, 1.0, T0), T0).unwrap();
    sh.apply(fix("d2", 1.0, 1.0, T0 + 5_000), T0 + 5_000).unwrap();
    sh.fire_timers(T0 + 9_999);
    assert_eq!(sh.len(), 2);
    sh.fire_timers(T0 + 10_000);
    assert!(sh.get(&id("d1"), false).is_none());
    assert!(sh.get(&id("d2"), false).is_some());
    assert_eq!(sh.next_timer_ms(), Some(T0 + 15_000));
    assert!(sh.drain_events().any(|e| matches!(e, Event::Gone { reason: GoneReason::Expired, .. })));
    sh.fire_timers(T0 + 15_000);
    assert!(sh.is_empty());
    assert_eq!(sh.indexed_points(), 0);
    assert_eq!(sh.counters.expired, 2);
    // Nothing near the old spot any more.
    let q = NearbyQuery { lat: 1.0, lon: 1.0, limit: 5, radius_m: None, statuses: u32::MAX, vehicle_type: None };
    assert!(sh.nearby(&q).is_empty());
}

fn records(b: &PersistBatch) -> Vec<Record> {
    let mut out = vec![];
    let (n, err) = decode_records(&b.buf, |r| out.push(r));
    assert_eq!((n, err), (b.buf.len(), None));
    assert_eq!(out.len(), b.records);
    out
}

#[test]
fn writes_coalesce_into_one_record_per_driver_per_commit() {
    let mut sh = DriverShard::new(ShardConfig { ttl_ms: 10_000, ..cfg() });
    let mut b;
    sh.apply(FixInput { cab_number: "CAB".into(), ..fix("d1", 1.0, 1.0, T0) }, T0).unwrap();
    sh.apply(fix("d1", 1.0, 1.0001, T0 + 1_000), T0 + 1_000).unwrap();
    b = PersistBatch::default();
    sh.take_writes(&mut b);
    let r = records(&b);
    assert_eq!(r.len(), 1, "two fixes, one record");
    let Record::Upsert { full: true, snap, trail } = &r[0] else { panic!("a new driver gets a full record: {r:?}") };
    assert_eq!((snap.driver_id.as_str(), snap.last.lon, snap.cab.as_str()), ("d1", 1.0001, "CAB"));
    assert_eq!(trail.len(), 1);
    b = PersistBatch::default();
    sh.take_writes(&mut b);
    assert!(b.is_empty(), "nothing changed");
    // Later commits carry only the trail fixes added since.
    sh.apply(fix("d1", 1.0, 1.0002, T0 + 2_000), T0 + 2_000).unwrap();
    b = PersistBatch::default();
    sh.take_writes(&mut b);
    let r = records(&b);
    let Record::Upsert { full: false, trail, .. } = &r[0] else { panic!("{r:?}") };
    assert_eq!(trail.iter().map(|p| p.timestamp_ms).collect::<Vec<_>>(), vec![T0 + 1_000]);
    // Removal writes a deletion and nothing else.
    sh.apply(fix("d1", 1.0, 1.0003, T0 + 3_000), T0 + 3_000).unwrap();
    assert_eq!(sh.remove(&Lookup::IdWithCab("d1".into(), "CAB".into())), Some("d1".into()));
    b = PersistBatch::default();
    sh.take_writes(&mut b);
    let r = records(&b);
    assert!(matches!(&r[..], [Record::Delete { driver_id }] if driver_id == "d1"), "{r:?}");
}

#[test]
fn a_sweep_writes_full_records_for_every_driver_in_chunks() {
    let mut sh = DriverShard::new(cfg());
    let mut b;
    for i in 0..(SWEEP_CHUNK as usize + 5) {
        sh.apply(fix(&format!("d{i}"), 1.0, 1.0, T0), T0).unwrap();
    }
    b = PersistBatch::default();
    sh.take_writes(&mut b);
    sh.start_sweep(7);
    b = PersistBatch::default();
    sh.take_writes(&mut b);
    assert_eq!((b.records, b.sweep_done), (SWEEP_CHUNK as usize, None));
    b = PersistBatch::default();
    sh.take_writes(&mut b);
    assert_eq!((b.records, b.sweep_done), (5, Some(7)));
    assert!(records(&b).iter().all(|r| matches!(r, Record::Upsert { full: true, .. })));
    b = PersistBatch::default();
    sh.take_writes(&mut b);
    assert!(b.is_empty());
}

#[test]
fn cab_and_session_changes_emit_index_events() {
    let mut sh = DriverShard::new(cfg());
    sh.apply(FixInput { cab_number: "A".into(), session: "s1".into(), ..fix("d1", 1.0, 1.0, T0) }, T0).unwrap();
    let ev: Vec<Event> = sh.drain_events().collect();
    assert_eq!(ev.len(), 3, "cab, session, and the new driver's status");
    assert!(matches!(&ev[2], Event::StatusChanged { from: None, to: Some(_), .. }), "{:?}", ev[2]);
    sh.apply(FixInput { cab_number: "A".into(), ..fix("d1", 1.0, 1.0, T0 + 1) }, T0).unwrap();
    assert_eq!(sh.drain_events().count(), 0, "same cab, no change");
    sh.apply(FixInput { cab_number: "B".into(), ..fix("d1", 1.0, 1.0, T0 + 2) }, T0).unwrap();
    let ev: Vec<Event> = sh.drain_events().collect();
    assert_eq!(
        ev,
        vec![
            Event::IndexUnset { kind: IndexKind::Cab, key: "A".into(), driver_id: "d1".into() },
            Event::IndexSet { kind: IndexKind::Cab, key: "B".into(), driver_id: "d1".into() },
        ]
    );
    assert!(sh.get(&Lookup::IdWithCab("d1".into(), "A".into()), false).is_none());
    assert!(sh.get(&Lookup::IdWithCab("d1".into(), "B".into()), false).is_some());
    assert!(sh.get(&Lookup::IdWithSession("d1".into(), "s1".into()), false).is_some());
}

#[test]
fn too_many_vehicle_types_is_a_field_error() {
    let mut sh = DriverShard::new(cfg());
    for (i, t) in ["a", "b", "c"].iter().enumerate() {
        sh.apply(FixInput { vehicle_type: t.to_string(), ..fix(&format!("d{i}"), 1.0, 1.0, T0) }, T0).unwrap();
    }
    let err = sh.apply(FixInput { vehicle_type: "d".into(), ..fix("d9", 1.0, 1.0, T0) }, T0).unwrap_err();
    assert!(matches!(err, Reject::Invalid(FieldError { field: "vehicle_type", .. })));
}

#[test]
fn restore_rebuilds_index_secondary_keys_and_expiry() {
    let mut a = DriverShard::new(ShardConfig { ttl_ms: 10_000, ..cfg() });
    let mut b = PersistBatch::default();
    a.apply(FixInput { session: "S".into(), ..fix("d1", 5.0, 5.0, T0) }, T0).unwrap();
    a.take_writes(&mut b);
    let Record::Upsert { snap, .. } = records(&b).remove(0) else { panic!() };

    let mut r = DriverShard::new(ShardConfig { ttl_ms: 10_000, ..cfg() });
    r.restore_driver(snap);
    r.finish_restore();
    assert!(r.drain_events().any(|e| matches!(e, Event::IndexSet { kind: IndexKind::Session, .. })));
    let q = NearbyQuery { lat: 5.0, lon: 5.0, limit: 1, radius_m: None, statuses: u32::MAX, vehicle_type: None };
    assert_eq!(r.nearby(&q)[0].driver_id, "d1");
    r.fire_timers(T0 + 9_999);
    assert_eq!(r.len(), 1);
    r.fire_timers(T0 + 10_000);
    assert!(r.is_empty(), "expiry is due at the persisted received_ms + TTL");
}

/// Brute force: every driver, haversine distance, sorted by (distance, id).
fn brute(pts: &[(f64, f64)], lat: f64, lon: f64, keep: impl Fn(usize, f64) -> bool) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = pts
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("d{i:04}"), haversine_m(lat, lon, p.0, p.1), i))
        .filter(|(_, d, i)| keep(*i, *d))
        .map(|(id, d, _)| (id, d))
        .collect();
    v.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    v
}

fn assert_same(got: &[NearbyHit], want: &[(String, f64)]) {
    let got_ids: Vec<&str> = got.iter().map(|h| h.driver_id.as_str()).collect();
    let want_ids: Vec<&str> = want.iter().map(|w| w.0.as_str()).collect();
    assert_eq!(got_ids, want_ids);
    for (g, w) in got.iter().zip(want) {
        assert!((g.distance_m - w.1).abs() < 1.0, "{} vs {}", g.distance_m, w.1);
    }
}

/// Points clustered around a centre that may sit on a pole or the antimeridian, then
/// moved a little (less than the index slack, so most are not re-indexed).
type World = ((f64, f64), Vec<(f64, f64)>, Vec<(f64, f64)>);

fn world() -> impl Strategy<Value = World> {
    let centre = prop_oneof![
        Just((0.0, 180.0)),
        Just((89.99, 0.0)),
        Just((-89.99, 45.0)),
        Just((52.5, 13.4)),
        (-80.0..80.0f64, -180.0..180.0f64),
    ];
    (centre, 1usize..300).prop_flat_map(|(c, n)| {
        let pt = (-0.05..0.05f64, -0.05..0.05f64);
        let mv = (-0.0003..0.0003f64, -0.0003..0.0003f64);
        (Just(c), proptest::collection::vec(pt, n), proptest::collection::vec(mv, n))
    })
}

fn wrap(lat: f64, lon: f64) -> (f64, f64) {
    let lat = lat.clamp(-90.0, 90.0);
    let lon = if lon > 180.0 {
        lon - 360.0
    } else if lon < -180.0 {
        lon + 360.0
    } else {
        lon
    };
    (lat, lon)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn nearby_and_within_match_brute_force(
        (c, offs, moves) in world(),
        k in 1usize..40,
        radius in prop_oneof![Just(None), (10.0..8_000.0f64).prop_map(Some)],
        qoff in (-0.05..0.05f64, -0.05..0.05f64),
        half in (0.001..0.06f64, 0.001..0.06f64),
    ) {
        let mut sh = DriverShard::new(ShardConfig { move_slack_m: 30.0, max_speed_mps: 1e9, ..cfg() });
        let mut pts = Vec::new();
        for (i, (o, m)) in offs.iter().zip(&moves).enumerate() {
            let id = format!("d{i:04}");
            let status = if i % 3 == 0 { Status::OnTrip } else { Status::Available };
            let p0 = wrap(c.0 + o.0, c.1 + o.1);
            sh.apply(FixInput { status: Some(status), ..fix(&id, p0.0, p0.1, T0) }, T0).unwrap();
            let p1 = wrap(p0.0 + m.0, p0.1 + m.1);
            sh.apply(FixInput { status: Some(status), ..fix(&id, p1.0, p1.1, T0 + 1_000) }, T0).unwrap();
            pts.push(p1);
        }
        let (qlat, qlon) = wrap(c.0 + qoff.0, c.1 + qoff.1);

        // Nearby, all statuses.
        let q = NearbyQuery { lat: qlat, lon: qlon, limit: k, radius_m: radius, statuses: u32::MAX, vehicle_type: None };
        let mut want = brute(&pts, qlat, qlon, |_, d| radius.is_none_or(|r| d <= r));
        want.truncate(k);
        assert_same(&sh.nearby(&q), &want);

        // Nearby, available only.
        let q = NearbyQuery { statuses: 1 << Status::Available.code(), ..q };
        let mut want = brute(&pts, qlat, qlon, |i, d| i % 3 != 0 && radius.is_none_or(|r| d <= r));
        want.truncate(k);
        assert_same(&sh.nearby(&q), &want);

        // Within a circle.
        let r = radius.unwrap_or(3_000.0);
        let w = WithinQuery::Circle { lat: qlat, lon: qlon, radius_m: r, limit: k, statuses: u32::MAX, vehicle_type: None };
        let mut want = brute(&pts, qlat, qlon, |_, d| d <= r);
        want.truncate(k + 1);
        assert_same(&sh.within(&w), &want);

        // Within a box (possibly across the antimeridian).
        let (min_lat, min_lon) = wrap(qlat - half.0, qlon - half.1);
        let (max_lat, max_lon) = wrap(qlat + half.0, qlon + half.1);
        let b = LatLonBox { min_lat, min_lon, max_lat, max_lon };
        let (clat, clon) = b.centre();
        let w = WithinQuery::Box { b, limit: k, statuses: u32::MAX, vehicle_type: None };
        let mut want = brute(&pts, clat, clon, |i, _| b.contains(pts[i].0, pts[i].1));
        want.truncate(k + 1);
        assert_same(&sh.within(&w), &want);
    }
}

#[test]
fn a_driver_record_stays_small() {
    // The per-driver memory budget (≤ 1 KiB with a 32-fix trail) depends on it.
    let size = std::mem::size_of::<Option<Rec>>();
    assert!(size <= 192, "driver record grew to {size} bytes");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A sparse fleet over the whole globe: answers stay exact at any range, up to the
    /// antipode, where f32 rounding is at its worst once converted to metres.
    #[test]
    fn nearby_is_exact_at_global_range(
        pts in proptest::collection::vec((-90.0..90.0f64, -180.0..180.0f64), 1..60),
        q in (-90.0..90.0f64, -180.0..180.0f64),
        k in 1usize..8,
        radius in 1_000_000.0..20_100_000.0f64,
    ) {
        let mut sh = DriverShard::new(ShardConfig { move_slack_m: 30.0, ..cfg() });
        for (i, p) in pts.iter().enumerate() {
            sh.apply(fix(&format!("d{i:04}"), p.0, p.1, T0), T0).unwrap();
        }
        let nq = NearbyQuery { lat: q.0, lon: q.1, limit: k, radius_m: None, statuses: u32::MAX, vehicle_type: None };
        let mut want = brute(&pts, q.0, q.1, |_, _| true);
        want.truncate(k);
        assert_same(&sh.nearby(&nq), &want);
        let w = WithinQuery::Circle { lat: q.0, lon: q.1, radius_m: radius, limit: 100, statuses: u32::MAX, vehicle_type: None };
        let want = brute(&pts, q.0, q.1, |_, d| d <= radius);
        assert_same(&sh.within(&w), &want);
    }
}

#[test]
fn watchers_see_every_fix_of_a_batch_and_junk_vehicle_types_are_recycled() {
    let mut sh = DriverShard::new(cfg());
    sh.apply(fix("w", 1.0, 1.0, T0), T0).unwrap();
    let slot = sh.slot_of("w").unwrap();
    sh.set_watched(slot, true);
    sh.drain_events().for_each(drop);
    for i in 1..=3 {
        sh.apply(fix("w", 1.0, 1.0, T0 + i * 1_000), T0).unwrap();
    }
    let seen: Vec<i64> = sh
        .drain_events()
        .filter_map(|e| match e {
            Event::Accepted { view, .. } => Some(view.last.timestamp_ms),
            _ => None,
        })
        .collect();
    assert_eq!(seen, vec![T0 + 1_000, T0 + 2_000, T0 + 3_000]);

    // max_vehicle_types is 3: types in use count, types nobody uses any more do not.
    for (i, t) in ["a", "b", "c"].iter().enumerate() {
        sh.apply(FixInput { vehicle_type: t.to_string(), ..fix(&format!("v{i}"), 1.0, 1.0, T0) }, T0).unwrap();
    }
    // A stale fix does not intern its type.
    assert!(sh.apply(FixInput { vehicle_type: "junk".into(), ..fix("v0", 1.0, 1.0, T0) }, T0).is_err());
    assert!(sh.apply(FixInput { vehicle_type: "d".into(), ..fix("v9", 1.0, 1.0, T0) }, T0).is_err());
    sh.remove(&Lookup::Id("v1".into()));
    sh.apply(FixInput { vehicle_type: "d".into(), ..fix("v9", 1.0, 1.0, T0) }, T0).unwrap();
    assert_eq!(sh.get(&Lookup::Id("v9".into()), false).unwrap().vehicle_type, "d");
    assert_eq!(sh.get(&Lookup::Id("v2".into()), false).unwrap().vehicle_type, "c");
}

#[test]
fn churn_does_not_grow_the_timer_heap() {
    let mut sh = DriverShard::new(cfg());
    for i in 0..20_000 {
        let id = format!("c{i}");
        sh.apply(fix(&id, 1.0, 1.0, T0), T0).unwrap();
        sh.remove(&Lookup::Id(id));
    }
    assert!(sh.is_empty());
    assert!(sh.timers.len() <= 1_024 + 1, "{} timers for no drivers", sh.timers.len());
}

#[test]
fn batches_tag_each_record_with_its_partition_and_resync_resends_whole_partitions() {
    let mut sh = DriverShard::new(cfg());
    let ids: Vec<String> = (0..40).map(|i| format!("drv-{i}")).collect();
    for id in &ids {
        sh.apply(fix(id, 1.0, 1.0, T0), T0).unwrap();
    }
    let mut b = PersistBatch::default();
    sh.take_writes(&mut b);
    assert_eq!(b.parts.len(), 40);
    // Each tag's range is exactly one record of a driver of that partition.
    let mut start = 0;
    for &(p, end) in &b.parts {
        let mut got = Vec::new();
        let (_, err) = decode_records(&b.buf[start..end as usize], |r| got.push(r));
        assert!(err.is_none());
        let [Record::Upsert { snap, .. }] = got.as_slice() else { panic!("one record per tag") };
        assert_eq!(partition_of(snap.driver_id.as_bytes()), p);
        start = end as usize;
    }
    assert_eq!(start, b.buf.len());
    assert!(b.resync.is_empty());
    // Nothing changed since: a resync of two partitions sends their drivers in full, and
    // names them even when one has no driver here.
    let p0 = partition_of(ids[0].as_bytes());
    let empty = (0..crate::keys::PARTITIONS).find(|p| ids.iter().all(|i| partition_of(i.as_bytes()) != *p)).unwrap();
    // A partition with no driver still announces its resync (its replica must clear).
    sh.resync(&[empty].into_iter().collect());
    assert!(sh.has_pending_writes());
    let mut b = PersistBatch::default();
    sh.take_writes(&mut b);
    assert_eq!((b.resync.clone(), b.records), (vec![empty], 0));
    assert!(!b.is_empty());
    sh.remove(&id(&ids[1])).unwrap();
    sh.resync(&[p0, empty].into_iter().collect());
    let mut b = PersistBatch::default();
    sh.take_writes(&mut b);
    let mut resync = b.resync.clone();
    resync.sort();
    assert_eq!(resync, {
        let mut v = vec![p0, empty];
        v.sort();
        v
    });
    let mut full = Vec::new();
    decode_records(&b.buf, |r| {
        if let Record::Upsert { full: true, snap, .. } = r {
            full.push(snap.driver_id);
        }
    });
    let mut want: Vec<String> =
        ids.iter().filter(|i| partition_of(i.as_bytes()) == p0 && **i != ids[1]).cloned().collect();
    want.sort();
    full.sort();
    assert_eq!(full, want);
    assert!(!b.is_empty());
}

#[test]
fn a_claim_whose_driver_was_lost_waits_for_it_and_is_never_given_twice() {
    let mut sh = DriverShard::new(cfg());
    // A promoted replica brings the claim but not the driver (its first fix was within
    // the replication window when its owner died).
    let claim = Claim { trip_id: "t1".into(), offer_due_ms: Some(T0 + 600_000) };
    assert!(!sh.restore_claim("d1", claim));
    // The driver's next fix creates it: claimed for t1 at once, not matchable.
    sh.apply(fix("d1", 52.5, 13.4, T0), T0).unwrap();
    assert_eq!(sh.get(&id("d1"), false).unwrap().status, Status::Dispatched);
    assert!(matches!(sh.claim("d1", "t2", "", T0 + 600_000), Err(ClaimError::Claimed)));
    assert!(sh.release("d1", "t1"));
    assert_eq!(sh.get(&id("d1"), false).unwrap().status, Status::Available);
    // An orphan the trip releases before the driver returns is gone for good.
    assert!(!sh.restore_claim("d2", Claim { trip_id: "t3".into(), offer_due_ms: None }));
    assert!(sh.release("d2", "t3"));
    sh.apply(fix("d2", 52.5, 13.4, T0), T0).unwrap();
    assert_eq!(sh.get(&id("d2"), false).unwrap().status, Status::Available);
}

#[test]
fn an_orphaned_offer_lapses_on_time_without_its_driver() {
    let mut sh = DriverShard::new(cfg());
    assert!(!sh.restore_claim("d1", Claim { trip_id: "t1".into(), offer_due_ms: Some(T0 + 15_000) }));
    assert!(!sh.restore_claim("d2", Claim { trip_id: "t2".into(), offer_due_ms: None }));
    sh.drain_events();
    sh.fire_timers(T0 + 14_999);
    assert_eq!(sh.drain_events().count(), 0);
    sh.fire_timers(T0 + 15_000);
    let ended: Vec<Event> = sh.drain_events().collect();
    assert!(
        matches!(ended.as_slice(), [Event::ClaimEnded { driver_id, why: ClaimEnd::OfferTimeout, .. }] if &**driver_id == "d1"),
        "{ended:?}"
    );
    // The driver comes back later: free. The confirmed orphan still waits for its driver.
    sh.apply(fix("d1", 52.5, 13.4, T0 + 20_000), T0 + 20_000).unwrap();
    assert_eq!(sh.get(&id("d1"), false).unwrap().status, Status::Available);
    sh.apply(fix("d2", 52.5, 13.4, T0 + 20_000), T0 + 20_000).unwrap();
    assert_eq!(sh.get(&id("d2"), false).unwrap().status, Status::OnTrip);
}

/// A shard holding `n` drivers `d0..`, a few metres apart, created at `T0`.
fn fleet(n: usize) -> (DriverShard, Vec<String>) {
    let mut sh = DriverShard::new(cfg());
    let ids: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
    for (i, d) in ids.iter().enumerate() {
        sh.apply(fix(d, 52.5 + i as f64 * 1e-4, 13.4, T0), T0).unwrap();
    }
    (sh, ids)
}

#[test]
fn moved_partitions_are_forgotten_in_slices_and_only_theirs() {
    let (mut sh, ids) = fleet(400);
    let moving: HashSet<u16> = ids.iter().take(200).map(|d| partition_of(d.as_bytes())).collect();
    let leaving: Vec<&String> = ids.iter().filter(|d| moving.contains(&partition_of(d.as_bytes()))).collect();
    sh.export(&moving);
    let mut dropped = 0;
    let mut calls = 0;
    loop {
        let (n, done) = sh.forget_some(&moving, 64);
        assert!(n <= 64);
        dropped += n;
        calls += 1;
        if done {
            break;
        }
        // Between slices the partitions stay frozen: their keyed writes are refused.
        assert!(sh.is_frozen(leaving[0]));
    }
    assert_eq!(dropped, leaving.len());
    assert_eq!(calls, leaving.len().div_ceil(64));
    assert!(!sh.is_frozen(leaving[0]));
    for d in &ids {
        let here = sh.get(&id(d), false).is_some();
        assert_eq!(here, !moving.contains(&partition_of(d.as_bytes())), "{d}");
    }
}

#[test]
fn writes_are_taken_in_slices_oldest_first_and_none_is_lost() {
    let mut sh = DriverShard::new(cfg());
    for i in 0..100 {
        sh.apply(fix(&format!("d{i}"), 52.5, 13.4, T0), T0).unwrap();
    }
    let mut seen = Vec::new();
    let mut rounds = 0;
    while sh.has_pending_writes() {
        let mut b = PersistBatch::default();
        sh.take_writes_some(&mut b, 30);
        assert!(b.records <= 30);
        decode_records(&b.buf, |r| {
            if let Record::Upsert { snap, .. } = r {
                seen.push(snap.driver_id);
            }
        });
        rounds += 1;
    }
    assert_eq!(rounds, 4);
    assert_eq!(seen, (0..100).map(|i| format!("d{i}")).collect::<Vec<_>>());
}

#[test]
fn per_partition_counts_follow_creates_removals_expiry_and_moves() {
    let (mut sh, ids) = fleet(400);
    let brute = |sh: &DriverShard, live: &[&String]| {
        let mut m: HashMap<u16, u32> = HashMap::new();
        for d in live {
            assert!(sh.get(&id(d), false).is_some(), "{d} is live");
            *m.entry(partition_of(d.as_bytes())).or_default() += 1;
        }
        m
    };
    let mut live: Vec<&String> = ids.iter().collect();
    assert_eq!(sh.partition_counts(), brute(&sh, &live));
    // Removed drivers, and a re-created one.
    for d in &ids[..50] {
        sh.remove(&id(d));
    }
    sh.apply(fix(&ids[0], 10.0, 10.0, T0 + 1_000), T0 + 1_000).unwrap();
    live.retain(|d| !ids[1..50].contains(d));
    assert_eq!(sh.partition_counts(), brute(&sh, &live));
    // Two partitions handed over and forgotten.
    let gone: HashSet<u16> = live.iter().take(2).map(|d| partition_of(d.as_bytes())).collect();
    sh.export(&gone);
    sh.forget(&gone);
    live.retain(|d| !gone.contains(&partition_of(d.as_bytes())));
    assert_eq!(sh.partition_counts(), brute(&sh, &live));
    // Everything expires but the one refreshed after the others' TTL ran out.
    sh.apply(fix(&ids[60], 52.506, 13.4, T0 + 600_000), T0 + 600_000).unwrap();
    sh.fire_timers(T0 + 900_001);
    live.retain(|d| *d == &ids[0] || *d == &ids[60]);
    live.retain(|d| !gone.contains(&partition_of(d.as_bytes())));
    assert_eq!(sh.partition_counts(), brute(&sh, &live));
    assert_eq!(sh.partition_counts().values().sum::<u32>() as usize, sh.len());
}

#[test]
fn the_map_counts_every_driver_in_its_cell_by_status_and_sends_points_only_while_few() {
    use crate::drivers::map::{MapQuery, status_index};
    let mut s = DriverShard::new(cfg());
    let mut want = std::collections::HashMap::new();
    for i in 0..400 {
        let (lat, lon) = (52.0 + (i % 20) as f64 * 0.01, 13.0 + (i / 20) as f64 * 0.01);
        let mut f = fix(&format!("d{i}"), lat, lon, T0);
        f.status = Some(if i % 4 == 0 { Status::Offline } else { Status::Available });
        s.apply(f, T0).unwrap();
        want.insert(format!("d{i}"), (lat, lon));
    }
    let b = LatLonBox { min_lat: 51.99, min_lon: 12.99, max_lat: 52.2, max_lon: 13.2 };
    let grid = |points_max| MapQuery::new(b, 10, 10, points_max, 0).unwrap();

    // Few enough: found through the index, every one a point, counted in its cell.
    let few = s.map(&grid(1_000));
    assert!(!few.points_truncated);
    assert_eq!((few.in_box, few.points.len(), few.drivers), (400, 400, 400));
    for p in &few.points {
        assert_eq!(want[&p.driver_id], (p.lat, p.lon));
        assert!(few.cells[grid(1_000).cell_of(p.lat, p.lon)][status_index(p.status)] > 0);
    }
    // Too many: the same counts from the pass over the slots, no points.
    let many = s.map(&grid(10));
    assert!(many.points_truncated && many.points.is_empty());
    assert_eq!(many.cells, few.cells, "both ways count alike");
    let offline: u32 = many.cells.iter().map(|c| c[status_index(Status::Offline)]).sum();
    assert_eq!(offline, 100);

    // A box holding part of the fleet counts only that part.
    let part = MapQuery::new(LatLonBox { max_lat: 52.045, ..b }, 2, 2, 0, 0).unwrap();
    assert_eq!(s.map(&part).in_box, 5 * 20, "rows 52.00..52.04, all 20 columns");
}
