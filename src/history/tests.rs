use proptest::prelude::*;

use super::codec::{Raw, decode_block, push_raw, raw_entries};
use super::*;
use crate::keys::partition_of;

const H: i64 = 3_600_000;

fn cfg() -> HistoryConfig {
    HistoryConfig { retention_ms: 24 * H, pull_max: EXPORT_MAX }
}

/// Heading 90°, 8.4 m/s, 5 m, packed as a trail fix's.
const MOTION: u32 = 90 | 84 << 9 | 5 << 20;

fn push(buf: &mut Vec<u8>, id: &str, ts: i64, recv: i64) {
    let e = Raw {
        partition: partition_of(id.as_bytes()),
        driver_id: id,
        lat_e7: 129_700_000 + (ts / 100 % 1_000_000) as i32,
        lon_e7: 775_900_000,
        timestamp_ms: ts,
        received_ms: recv,
        motion: MOTION,
        status: 2,
        trip_id: "trip-1",
        trip_cost_cents: 1250,
    };
    push_raw(buf, &e);
}

/// Two drivers in one partition.
fn pair() -> (u16, String, String) {
    let a = "driver-a".to_string();
    let p = partition_of(a.as_bytes());
    let b = (0..).map(|i| format!("driver-b{i}")).find(|b| partition_of(b.as_bytes()) == p).unwrap();
    (p, a, b)
}

#[test]
fn a_block_round_trips_and_a_typical_fix_is_small() {
    let (p, a, b) = pair();
    let mut raw = Vec::new();
    for i in 0..50 {
        push(&mut raw, if i % 2 == 0 { &a } else { &b }, 1_700_000_000_000 + i * 1000, 1_700_000_000_100 + i * 1000);
    }
    let entries: Vec<Raw> =
        raw_entries(&raw).filter_map(|e| if let codec::Entry::Fix(f) = e { Some(f) } else { None }).collect();
    assert_eq!(entries.len(), 50);
    assert!(entries.iter().all(|e| e.partition == p));
    let mut names: Vec<&str> = Vec::new();
    let mut lookup = |n: &'static str| -> (u64, bool) {
        match names.iter().position(|x| *x == n) {
            Some(i) => (i as u64, false),
            None => {
                names.push(n);
                (names.len() as u64 - 1, true)
            }
        }
    };
    let raw: &'static [u8] = Box::leak(raw.into_boxed_slice());
    let entries: Vec<Raw<'static>> =
        raw_entries(raw).filter_map(|e| if let codec::Entry::Fix(f) = e { Some(f) } else { None }).collect();
    let block = codec::encode_block(0, Pos { epoch: 3, seq: 10 }, &entries, &mut lookup);
    // 50 fixes, three names written once: the per-fix cost once names are known.
    let per_fix = (block.len() - 8 - 3 * 9) as f64 / 50.0;
    assert!(per_fix < 20.0, "{per_fix} bytes per fix");
    let mut got = Vec::new();
    let (head, new) = decode_block(&block[8..], |pos, r| got.push((pos, *r))).unwrap();
    assert_eq!(head.count, 50);
    assert_eq!(new, vec![a.as_str(), "trip-1", b.as_str()]);
    assert_eq!(got[0].0, Pos { epoch: 3, seq: 10 });
    assert_eq!(got[49].0, Pos { epoch: 3, seq: 59 });
    for ((_, r), e) in got.iter().zip(&entries) {
        assert_eq!((r.lat_e7, r.lon_e7, r.motion, r.status), (e.lat_e7, e.lon_e7, e.motion, e.status));
        assert_eq!((r.timestamp_ms, r.received_ms, r.trip_cost_cents), (e.timestamp_ms, e.received_ms, 1250));
    }
}

proptest! {
    #[test]
    fn blocks_round_trip(fixes in prop::collection::vec((0u8..4, -900_000_000i32..900_000_000, -1_800_000_000i32..1_800_000_000, 0i64..10_000_000, -5_000i64..5_000, 0u32..u32::MAX, 1u8..5, 0u32..100_000), 1..40)) {
        let ids = ["a", "bb", "ccc", "dddd"];
        let entries: Vec<Raw> = fixes.iter().scan(1_000_000i64, |recv, f| {
            *recv += f.3 / 100;
            Some(Raw { partition: 1, driver_id: ids[f.0 as usize], lat_e7: f.1, lon_e7: f.2, timestamp_ms: *recv + f.4, received_ms: *recv, motion: f.5, status: f.6, trip_id: if f.7 % 2 == 0 { "" } else { "t" }, trip_cost_cents: f.7 })
        }).collect();
        let mut names: Vec<&str> = Vec::new();
        let mut lookup = |n: &'static str| match names.iter().position(|x| *x == n) {
            Some(i) => (i as u64, false),
            None => { names.push(n); (names.len() as u64 - 1, true) }
        };
        let block = codec::encode_block(0, Pos { epoch: 1, seq: 0 }, &entries, &mut lookup);
        let mut got = Vec::new();
        let (_, new) = decode_block(&block[8..], |_, r| got.push(*r)).unwrap();
        prop_assert_eq!(got.len(), entries.len());
        for (r, e) in got.iter().zip(&entries) {
            prop_assert_eq!(new.get(r.name as usize).copied().or(names.get(r.name as usize).copied()), Some(e.driver_id));
            prop_assert_eq!((r.lat_e7, r.lon_e7, r.motion, r.status, r.timestamp_ms, r.received_ms), (e.lat_e7, e.lon_e7, e.motion, e.status, e.timestamp_ms, e.received_ms));
            prop_assert_eq!(r.trip_cost_cents, e.trip_cost_cents as u64);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_block(&bytes, |_, _| {});
        let dir = tempfile::tempdir().unwrap();
        let s = HistoryStore::open(dir.path(), cfg()).unwrap();
        let mut framed = codec::frame(&bytes);
        framed.extend_from_slice(&bytes);
        let _ = s.append_frames(7, &framed);
        let _ = s.read_after(7, None, 100);
    }
}

#[test]
fn cursors_resume_exactly_after_restart_and_the_driver_query_filters() {
    let dir = tempfile::tempdir().unwrap();
    let (p, a, b) = pair();
    let t0 = 1_700_000_000_000;
    let mut seen = Vec::new();
    let mut cursor = None;
    {
        let s = HistoryStore::open(dir.path(), cfg()).unwrap();
        s.serve(p, 5);
        for round in 0..20 {
            let mut raw = Vec::new();
            for i in 0..10 {
                let t = t0 + (round * 10 + i) * 1000;
                push(&mut raw, if i % 3 == 0 { &b } else { &a }, t, t + 50);
            }
            let blocks = s.append_local(&raw);
            assert_eq!(blocks.len(), 1);
            if round % 7 == 3 {
                let page = s.read_after(p, cursor, 25).unwrap();
                seen.extend(page.fixes.iter().map(|f| f.pos));
                cursor = page.upto;
            }
        }
    }
    // Reopened: the same positions, appends continue after them.
    let s = HistoryStore::open(dir.path(), cfg()).unwrap();
    assert_eq!(s.last(p), Some(Pos { epoch: 5, seq: 199 }));
    let mut raw = Vec::new();
    push(&mut raw, &a, t0 + 500_000, t0 + 500_000);
    s.append_local(&raw);
    loop {
        let page = s.read_after(p, cursor, 25).unwrap();
        if page.fixes.is_empty() {
            break;
        }
        seen.extend(page.fixes.iter().map(|f| f.pos));
        cursor = page.upto;
    }
    let want: Vec<Pos> = (0..=200).map(|seq| Pos { epoch: 5, seq }).collect();
    assert_eq!(seen, want, "every fix once, in order");

    let mut hist = Vec::new();
    s.driver_history(p, &b, t0 + 30_000, t0 + 90_999, None, |f| {
        hist.push(f);
        true
    })
    .unwrap();
    // b's fixes are rounds' i = 0, 3, 6, 9: within 30..=90 s (received +50 ms).
    let want: Vec<i64> = (30..=90).filter(|s| s % 10 % 3 == 0).map(|s| t0 + s * 1000).collect();
    assert_eq!(hist.iter().map(|f| f.timestamp_ms).collect::<Vec<_>>(), want);
    assert!(hist.iter().all(|f| &*f.driver_id == b.as_str() && f.trip_id.as_deref() == Some("trip-1")));
    assert!(hist.iter().all(|f| f.motion == MOTION && f.trip_cost_cents == 1250 && f.status == 2));
}

#[test]
fn retention_drops_old_segments_and_an_old_cursor_is_told_how_far_it_can_go() {
    let dir = tempfile::tempdir().unwrap();
    let s = HistoryStore::open(dir.path(), HistoryConfig { retention_ms: 8 * 60_000, pull_max: EXPORT_MAX }).unwrap();
    let (p, a, _) = pair();
    let t0 = crate::clock::wall_ms() - 20 * 60_000;
    // One fix a minute for 20 minutes: segments span a minute.
    for m in 0..20 {
        let mut raw = Vec::new();
        push(&mut raw, &a, t0 + m * 60_000, t0 + m * 60_000);
        s.append_local(&raw);
    }
    let dropped = s.prune(crate::clock::wall_ms());
    assert!(dropped >= 10, "{dropped}");
    let floor = s.floor(p).expect("a floor after pruning");
    let err = s.read_after(p, Some(Pos { epoch: 0, seq: 2 }), 10).unwrap_err();
    assert_eq!(err.oldest, floor);
    let page = s.read_after(p, Some(floor), 100).unwrap();
    assert_eq!(page.fixes.first().map(|f| f.pos.seq), Some(floor.seq + 1));
    let page = s.read_after(p, None, 100).unwrap();
    assert_eq!(page.fixes.first().map(|f| f.pos.seq), Some(floor.seq + 1), "from the oldest kept");
}

/// Round `r` of two drivers' fixes (one second apart) appended on `owner`: its blocks.
fn round_of_two(owner: &HistoryStore, a: &str, b: &str, t0: i64, r: i64) -> Vec<(u16, Vec<u8>)> {
    let mut raw = Vec::new();
    push(&mut raw, a, t0 + r * 1000, t0 + r * 1000);
    push(&mut raw, b, t0 + r * 1000, t0 + r * 1000);
    owner.append_local(&raw)
}

#[test]
fn a_partition_moves_with_its_positions_and_a_replica_follows_blocks() {
    let (da, db, dc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let owner = HistoryStore::open(da.path(), cfg()).unwrap();
    let replica = HistoryStore::open(db.path(), cfg()).unwrap();
    let (p, a, b) = pair();
    owner.serve(p, 2);
    let t0 = 1_700_000_000_000;
    for r in 0..30 {
        for (bp, block) in round_of_two(&owner, &a, &b, t0, r) {
            // The replica misses blocks 10..15: it waits for a segment start.
            if !(10..15).contains(&r) {
                replica.append_frames(bp, &block).unwrap();
            }
        }
        if r == 20 {
            owner.cut(p);
        }
    }
    // The replica dropped what came before the gap; its floor says so.
    assert_eq!(replica.floor(p), Some(Pos { epoch: 2, seq: 41 }));
    assert_eq!(replica.last(p), owner.last(p));
    let rp = replica.read_after(p, Some(Pos { epoch: 2, seq: 41 }), 1000).unwrap();
    let op = owner.read_after(p, Some(Pos { epoch: 2, seq: 41 }), 1000).unwrap();
    assert_eq!(rp.fixes, op.fixes);
    assert!(replica.read_after(p, Some(Pos { epoch: 2, seq: 30 }), 10).is_err());

    // Hand-off: the new owner gets every block and continues at its epoch.
    let moved = HistoryStore::open(dc.path(), cfg()).unwrap();
    let (floor, frames, older) = owner.export(p).unwrap();
    assert!(!older, "all of it fits in the pull");
    moved.import(p, floor, &frames, older).unwrap();
    moved.serve(p, 3);
    let mut raw = Vec::new();
    push(&mut raw, &a, t0 + 99_000, t0 + 99_000);
    moved.append_local(&raw);
    let all = moved.read_after(p, None, 1000).unwrap();
    assert_eq!(all.fixes.len(), 61);
    assert_eq!(all.fixes[59].pos, Pos { epoch: 2, seq: 59 });
    assert_eq!(all.fixes[60].pos, Pos { epoch: 3, seq: 60 });
    assert_eq!(&all.fixes[..60], &owner.read_after(p, None, 1000).unwrap().fixes[..]);
}

#[test]
fn older_segments_are_copied_newest_first_to_a_late_replica_and_after_a_pull_that_left_them_out() {
    let (da, db, dc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let owner = HistoryStore::open(da.path(), cfg()).unwrap();
    let replica = HistoryStore::open(db.path(), cfg()).unwrap();
    let (p, a, b) = pair();
    owner.serve(p, 2);
    let t0 = 1_700_000_000_000;
    for r in 0..30 {
        for (bp, block) in round_of_two(&owner, &a, &b, t0, r) {
            // The replica starts with the third segment.
            if r >= 20 {
                replica.append_frames(bp, &block).unwrap();
            }
        }
        if r == 9 || r == 19 {
            owner.cut(p);
        }
        if r == 19 {
            // A new epoch with the third segment (a move): the replica's floor, set from
            // the block it starts with, names epoch 3; the entry before it was epoch 2.
            owner.serve(p, 3);
        }
    }
    let floor = replica.floor(p).expect("the replica starts late");
    assert_eq!(floor, Pos { epoch: 3, seq: 39 });
    let segs = owner.segments_before(p, floor, t0 + 60_000);
    assert_eq!(segs.len(), 2, "the two older segments, newest first");
    assert!(owner.segments_before(p, floor, t0 + 48 * H).is_empty(), "past the retention: nothing");
    assert!(owner.segments_before(p, Pos { epoch: 2, seq: 38 }, t0 + 60_000).is_empty(), "not a segment's end");
    let bytes: Vec<Vec<u8>> = segs.iter().map(|(path, len)| read_range(path, 0, *len).unwrap()).collect();
    // Out of order, or cut short: refused, nothing changes.
    assert!(!replica.prepend(p, &bytes[1]).unwrap());
    assert!(replica.prepend(p, &bytes[0][..bytes[0].len() - 3]).is_err());
    assert_eq!(replica.floor(p), Some(floor));
    for seg in &bytes {
        assert!(replica.prepend(p, seg).unwrap());
    }
    assert_eq!(replica.floor(p), None);
    let whole = owner.read_after(p, None, 1000).unwrap().fixes;
    assert_eq!(whole.len(), 60);
    assert_eq!(replica.read_after(p, None, 1000).unwrap().fixes, whole);
    // They stay there across a restart.
    drop(replica);
    let replica = HistoryStore::open(db.path(), cfg()).unwrap();
    assert_eq!(replica.read_after(p, None, 1000).unwrap().fixes, whole);

    // A pull that carries no history (`pull_max` 0): the new owner's readers behind its
    // floor wait (not told it is gone) until the segments are copied in.
    drop(owner);
    let owner = HistoryStore::open(da.path(), HistoryConfig { pull_max: 0, ..cfg() }).unwrap();
    let (floor, frames, older) = owner.export(p).unwrap();
    assert!(frames.is_empty() && older);
    assert_eq!(floor, owner.last(p));
    let moved = HistoryStore::open(dc.path(), cfg()).unwrap();
    moved.import(p, floor, &frames, older).unwrap();
    assert!(moved.read_after(p, Some(Pos { epoch: 2, seq: 3 }), 10).unwrap_err().filling);
    for (path, len) in owner.segments_before(p, floor.unwrap(), t0 + 60_000) {
        assert!(moved.prepend(p, &read_range(&path, 0, len).unwrap()).unwrap());
    }
    moved.set_filling(p, false);
    assert_eq!(moved.read_after(p, None, 1000).unwrap().fixes, whole);
}
