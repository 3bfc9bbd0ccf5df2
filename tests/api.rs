//! End-to-end tests of every `locus.v1.Locations` RPC over real gRPC against a real node
//! process.

mod common;

use std::time::Duration;

use common::{NodeProc, by_cab, by_session, eventually, fix, now_ms};
use locus::geo::haversine_m;
use locus::pb::{self, DriverStatus, get_driver_request, remove_driver_request, within_request};
use tokio_stream::StreamExt;
use tonic::Code;

fn by_id(id: &str, trail: bool) -> pb::GetDriverRequest {
    pb::GetDriverRequest { key: Some(get_driver_request::Key::DriverId(id.into())), include_trail: trail }
}

fn reason(s: &tonic::Status) -> String {
    s.metadata().get("locus-reject-reason").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

#[tokio::test]
async fn update_then_get_by_id_cab_and_session_with_trail() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &["--trail-len", "3"]);
    let mut c = node.client().await;
    let t = now_ms() - 10_000;
    for i in 0..5 {
        let f = pb::LocationUpdate {
            cab_number: "CAB-7".into(),
            session: "sess-1".into(),
            vehicle_type: "suv".into(),
            heading_deg: 90.0,
            speed_mps: 5.5,
            accuracy_m: 3.0,
            trip_id: "trip-9".into(),
            trip_cost: 12.5,
            ..fix("d1", 52.5 + i as f64 * 1e-4, 13.4, t + i * 1_000)
        };
        let ack = c.update(f).await.unwrap().into_inner();
        assert!(ack.received_ms >= t);
    }
    let d = c.get_driver(by_id("d1", true)).await.unwrap().into_inner();
    assert_eq!(d.driver_id, "d1");
    assert_eq!((d.lat, d.lon, d.timestamp_ms), (52.5004, 13.4, t + 4_000));
    assert_eq!((d.cab_number.as_str(), d.session.as_str(), d.vehicle_type.as_str()), ("CAB-7", "sess-1", "suv"));
    assert_eq!((d.trip_id.as_str(), d.trip_cost, d.speed_mps, d.heading_deg), ("trip-9", 12.5, 5.5, 90.0));
    assert_eq!(d.status, DriverStatus::Available as i32);
    let ts: Vec<i64> = d.trail.iter().map(|f| f.timestamp_ms).collect();
    assert_eq!(ts, vec![t + 2_000, t + 3_000, t + 4_000], "oldest first, --trail-len 3");
    assert!(c.get_driver(by_id("d1", false)).await.unwrap().into_inner().trail.is_empty());

    assert_eq!(c.get_driver(by_cab("CAB-7")).await.unwrap().into_inner().driver_id, "d1");
    assert_eq!(c.get_driver(by_session("sess-1")).await.unwrap().into_inner().driver_id, "d1");

    // A new cab number replaces the old mapping; another driver taking a cab takes it over.
    c.update(pb::LocationUpdate { cab_number: "CAB-8".into(), ..fix("d1", 52.5004, 13.4, t + 5_000) }).await.unwrap();
    assert_eq!(c.get_driver(by_cab("CAB-7")).await.unwrap_err().code(), Code::NotFound);
    c.update(pb::LocationUpdate { cab_number: "CAB-8".into(), ..fix("d2", 1.0, 1.0, t) }).await.unwrap();
    assert_eq!(c.get_driver(by_cab("CAB-8")).await.unwrap().into_inner().driver_id, "d2");
    // When d2 moves on, CAB-8 answers with d1 again, which still reports it.
    c.update(pb::LocationUpdate { cab_number: "CAB-9".into(), ..fix("d2", 1.0, 1.0, t + 1_000) }).await.unwrap();
    assert_eq!(c.get_driver(by_cab("CAB-8")).await.unwrap().into_inner().driver_id, "d1");

    let e = c.get_driver(by_id("nobody", false)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &[]);
    let mut c = node.client().await;
    let t = now_ms();
    let ok = fix("d1", 10.0, 10.0, t);
    let cases: Vec<(&str, pb::LocationUpdate)> = vec![
        ("driver_id", pb::LocationUpdate { driver_id: "".into(), ..ok.clone() }),
        ("driver_id", pb::LocationUpdate { driver_id: "x".repeat(65), ..ok.clone() }),
        ("lat", pb::LocationUpdate { lat: f64::NAN, ..ok.clone() }),
        ("lat", pb::LocationUpdate { lat: 91.0, ..ok.clone() }),
        ("lon", pb::LocationUpdate { lon: f64::INFINITY, ..ok.clone() }),
        ("lon", pb::LocationUpdate { lon: -181.0, ..ok.clone() }),
        ("timestamp_ms", pb::LocationUpdate { timestamp_ms: 0, ..ok.clone() }),
        ("timestamp_ms", pb::LocationUpdate { timestamp_ms: t + 31_000, ..ok.clone() }),
        ("status", pb::LocationUpdate { status: 42, ..ok.clone() }),
        ("speed_mps", pb::LocationUpdate { speed_mps: -3.0, ..ok.clone() }),
        ("heading_deg", pb::LocationUpdate { heading_deg: 400.0, ..ok.clone() }),
        ("vehicle_type", pb::LocationUpdate { vehicle_type: "v".repeat(40), ..ok.clone() }),
        ("cab_number", pb::LocationUpdate { cab_number: "c".repeat(65), ..ok.clone() }),
    ];
    for (field, bad) in cases {
        let e = c.update(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
        assert_eq!(reason(&e), "invalid_argument");
    }
    // Nothing was stored by the rejected fixes.
    assert_eq!(c.get_driver(by_id("d1", false)).await.unwrap_err().code(), Code::NotFound);

    let e = c.get_driver(pb::GetDriverRequest::default()).await.unwrap_err();
    assert_eq!((e.code(), e.message().starts_with("key")), (Code::InvalidArgument, true), "{e:?}");
    let e = c.get_driver(by_id("", false)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c.remove_driver(pb::RemoveDriverRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let q = pb::NearbyRequest { lat: 1.0, lon: 1.0, limit: 10, ..Default::default() };
    for (field, bad) in [
        ("limit", pb::NearbyRequest { limit: 0, ..q.clone() }),
        ("limit", pb::NearbyRequest { limit: 5_000, ..q.clone() }),
        ("lat", pb::NearbyRequest { lat: 100.0, ..q.clone() }),
        ("radius_m", pb::NearbyRequest { radius_m: Some(f64::NAN), ..q.clone() }),
        ("statuses", pb::NearbyRequest { statuses: vec![77], ..q.clone() }),
    ] {
        let e = c.nearby(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}");
        assert!(e.message().starts_with(field), "{field}: {}", e.message());
    }
    let e = c.within(pb::WithinRequest::default()).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().starts_with("area"), "{e:?}");
    let bx = pb::Box { min_lat: 5.0, min_lon: 0.0, max_lat: -5.0, max_lon: 1.0 };
    let e = c
        .within(pb::WithinRequest { area: Some(within_request::Area::Box(bx)), ..Default::default() })
        .await
        .unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().starts_with("box.min_lat"), "{e:?}");
    let e = c.watch_driver(pb::WatchDriverRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn stale_and_implausible_fixes_are_rejected_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &["--max-speed-mps", "50"]);
    let mut c = node.client().await;
    let t = now_ms() - 60_000;
    c.update(fix("d1", 40.0, -74.0, t)).await.unwrap();
    let before = c.get_driver(by_id("d1", true)).await.unwrap().into_inner();

    let e = c.update(fix("d1", 40.0001, -74.0, t)).await.unwrap_err();
    assert_eq!((e.code(), reason(&e).as_str()), (Code::FailedPrecondition, "stale"), "{e:?}");
    let e = c.update(fix("d1", 40.0001, -74.0, t - 5_000)).await.unwrap_err();
    assert_eq!(reason(&e), "stale");
    // 111 m in 1 s is above 50 m/s.
    let e = c.update(fix("d1", 40.001, -74.0, t + 1_000)).await.unwrap_err();
    assert_eq!((e.code(), reason(&e).as_str()), (Code::FailedPrecondition, "implausible_jump"), "{e:?}");
    assert_eq!(c.get_driver(by_id("d1", true)).await.unwrap().into_inner(), before);
    // The same move over 3 s is fine.
    c.update(fix("d1", 40.001, -74.0, t + 3_000)).await.unwrap();

    assert!(
        eventually(Duration::from_secs(5), || async {
            let m = reqwest_metrics(&node.http).await;
            m.contains("locus_fixes_rejected_total{reason=\"stale\"} 2")
                && m.contains("locus_fixes_rejected_total{reason=\"implausible_jump\"} 1")
        })
        .await,
        "rejections are counted per reason"
    );
}

/// GET /metrics over a plain TCP socket.
async fn reqwest_metrics(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn update_stream_acks_every_batch_with_per_fix_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &[]);
    let mut c = node.client().await;
    let t = now_ms() - 60_000;
    let batch1 = pb::LocationBatch {
        batch_id: 11,
        updates: vec![
            fix("a", 1.0, 1.0, t),
            fix("b", 1.0, 1.0, t),
            fix("", 1.0, 1.0, t),  // 2: invalid driver_id
            fix("a", 1.0, 1.0, t), // 3: stale (same timestamp)
            fix("a", 1.0, 1.0001, t + 1_000),
            fix("c", 95.0, 1.0, t),        // 5: invalid lat
            fix("b", 3.0, 1.0, t + 1_000), // 6: implausible
        ],
    };
    let batch2 = pb::LocationBatch { batch_id: 12, updates: vec![fix("c", 2.0, 2.0, t)] };
    let batch3 =
        pb::LocationBatch { batch_id: 13, updates: (0..10_001).map(|i| fix(&format!("x{i}"), 0.0, 0.0, t)).collect() };
    let out = tokio_stream::iter(vec![batch1, batch2, batch3]);
    let mut acks = c.update_stream(out).await.unwrap().into_inner();
    let a1 = acks.next().await.unwrap().unwrap();
    assert_eq!((a1.batch_id, a1.accepted), (11, 3));
    let got: Vec<(u32, &str, &str)> =
        a1.rejected.iter().map(|r| (r.index, r.reason_name.as_str(), r.field.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (2, "invalid_argument", "driver_id"),
            (3, "stale", ""),
            (5, "invalid_argument", "lat"),
            (6, "implausible_jump", "")
        ]
    );
    assert_eq!(a1.rejected[1].reason, pb::RejectReason::Stale as i32);
    let a2 = acks.next().await.unwrap().unwrap();
    assert_eq!((a2.batch_id, a2.accepted, a2.rejected.len()), (12, 1, 0));
    let e = acks.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("updates"), "{}", e.message());
    let a = c.get_driver(by_id("a", false)).await.unwrap().into_inner();
    assert_eq!(a.lon, 1.0001);
}

fn brute(
    pts: &[(String, f64, f64, i32)],
    lat: f64,
    lon: f64,
    keep: impl Fn(&(String, f64, f64, i32), f64) -> bool,
) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = pts
        .iter()
        .map(|p| (p, haversine_m(lat, lon, p.1, p.2)))
        .filter(|(p, d)| keep(p, *d))
        .map(|(p, d)| (p.0.clone(), d))
        .collect();
    v.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    v
}

fn same(got: &[pb::NearbyHit], want: &[(String, f64)]) {
    let g: Vec<&str> = got.iter().map(|h| h.driver_id.as_str()).collect();
    let w: Vec<&str> = want.iter().map(|h| h.0.as_str()).collect();
    assert_eq!(g, w);
    for (h, w) in got.iter().zip(want) {
        assert!((h.distance_m - w.1).abs() < 1.0);
    }
}

#[tokio::test]
async fn nearby_and_within_equal_brute_force_across_the_antimeridian() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &[]);
    let mut c = node.client().await;
    let t = now_ms() - 60_000;
    // 400 drivers straddling the antimeridian near Fiji, mixed statuses and types.
    let mut pts = Vec::new();
    let mut updates = Vec::new();
    for i in 0..400u32 {
        let lat = -17.0 + ((i * 37) % 100) as f64 * 0.002;
        let mut lon = 179.9 + ((i * 53) % 100) as f64 * 0.002;
        if lon > 180.0 {
            lon -= 360.0;
        }
        let status = if i % 3 == 0 { DriverStatus::OnTrip } else { DriverStatus::Available } as i32;
        let id = format!("f{i:03}");
        updates.push(pb::LocationUpdate {
            status,
            vehicle_type: if i % 2 == 0 { "moto" } else { "sedan" }.into(),
            ..fix(&id, lat, lon, t)
        });
        pts.push((id, lat, lon, status));
    }
    let mut acks = c
        .update_stream(tokio_stream::iter(vec![pb::LocationBatch { updates, batch_id: 1 }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.next().await.unwrap().unwrap().accepted, 400);

    let (qlat, qlon) = (-16.9, -179.99);
    let r = c
        .nearby(pb::NearbyRequest { lat: qlat, lon: qlon, limit: 15, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut want = brute(&pts, qlat, qlon, |_, _| true);
    want.truncate(15);
    same(&r.drivers, &want);
    assert!(!r.partial);

    let r = c
        .nearby(pb::NearbyRequest {
            lat: qlat,
            lon: qlon,
            limit: 20,
            radius_m: Some(15_000.0),
            statuses: vec![DriverStatus::Available as i32],
            vehicle_type: "moto".into(),
            deadline_ms: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut want = brute(&pts, qlat, qlon, |p, d| {
        d <= 15_000.0 && p.3 == DriverStatus::Available as i32 && p.0[1..].parse::<u32>().unwrap() % 2 == 0
    });
    want.truncate(20);
    same(&r.drivers, &want);
    assert!(r.drivers.iter().all(|h| h.vehicle_type == "moto" && h.status == DriverStatus::Available as i32));

    let circle = pb::Circle { lat: qlat, lon: qlon, radius_m: 12_000.0 };
    let r = c
        .within(pb::WithinRequest { area: Some(within_request::Area::Circle(circle)), limit: 50, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let all = brute(&pts, qlat, qlon, |_, d| d <= 12_000.0);
    same(&r.drivers, &all[..all.len().min(50)]);
    assert_eq!(r.truncated, all.len() > 50);

    let bx = pb::Box { min_lat: -16.95, min_lon: 179.95, max_lat: -16.85, max_lon: -179.95 };
    let r = c
        .within(pb::WithinRequest { area: Some(within_request::Area::Box(bx)), limit: 10_000, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let b = locus::geo::LatLonBox { min_lat: -16.95, min_lon: 179.95, max_lat: -16.85, max_lon: -179.95 };
    let (clat, clon) = b.centre();
    let want = brute(&pts, clat, clon, |p, _| b.contains(p.1, p.2));
    assert!(!want.is_empty());
    same(&r.drivers, &want);
    assert!(!r.truncated);
}

#[tokio::test]
async fn remove_by_id_cab_and_session() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &[]);
    let mut c = node.client().await;
    let t = now_ms() - 1_000;
    c.update(pb::LocationUpdate { cab_number: "K1".into(), ..fix("d1", 1.0, 1.0, t) }).await.unwrap();
    c.update(pb::LocationUpdate { session: "S2".into(), ..fix("d2", 1.0, 1.0, t) }).await.unwrap();
    c.update(fix("d3", 1.0, 1.0, t)).await.unwrap();
    let rm = |k| pb::RemoveDriverRequest { key: Some(k) };
    let r = c.remove_driver(rm(remove_driver_request::Key::CabNumber("K1".into()))).await.unwrap().into_inner();
    assert_eq!(r.driver_id, "d1");
    let r = c.remove_driver(rm(remove_driver_request::Key::Session("S2".into()))).await.unwrap().into_inner();
    assert_eq!(r.driver_id, "d2");
    let r = c.remove_driver(rm(remove_driver_request::Key::DriverId("d3".into()))).await.unwrap().into_inner();
    assert_eq!(r.driver_id, "d3");
    for id in ["d1", "d2", "d3"] {
        assert_eq!(c.get_driver(by_id(id, false)).await.unwrap_err().code(), Code::NotFound);
    }
    let e = c.remove_driver(rm(remove_driver_request::Key::CabNumber("K1".into()))).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let r = c.nearby(pb::NearbyRequest { lat: 1.0, lon: 1.0, limit: 10, ..Default::default() }).await.unwrap();
    assert!(r.into_inner().drivers.is_empty());
}

#[tokio::test]
async fn watch_driver_streams_fixes_in_order_until_removed() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &[]);
    let mut c = node.client().await;
    let t = now_ms() - 60_000;
    c.update(fix("w1", 1.0, 1.0, t)).await.unwrap();
    let e =
        c.watch_driver(pb::WatchDriverRequest { driver_id: "ghost".into(), include_current: false }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let mut s = c
        .watch_driver(pb::WatchDriverRequest { driver_id: "w1".into(), include_current: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.next().await.unwrap().unwrap().timestamp_ms, t, "current state first");
    for i in 1..=20 {
        c.update(fix("w1", 1.0, 1.0 + i as f64 * 1e-5, t + i * 1_000)).await.unwrap();
    }
    // A rejected fix is not streamed.
    assert!(c.update(fix("w1", 1.0, 1.0, t)).await.is_err());
    for i in 1..=20 {
        let d = s.next().await.unwrap().unwrap();
        assert_eq!(d.timestamp_ms, t + i * 1_000);
    }
    c.remove_driver(pb::RemoveDriverRequest { key: Some(remove_driver_request::Key::DriverId("w1".into())) })
        .await
        .unwrap();
    let end = s.next().await.unwrap().unwrap_err();
    assert_eq!(end.code(), Code::NotFound);
    assert_eq!(end.metadata().get("locus-end-reason").unwrap(), "removed");
    assert!(s.next().await.is_none());
}

#[tokio::test]
async fn drivers_expire_after_the_ttl_unless_they_send_fixes() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &["--driver-ttl", "2s"]);
    let mut c = node.client().await;
    let t = now_ms() - 60_000;
    c.update(fix("quiet", 7.0, 7.0, t)).await.unwrap();
    c.update(fix("busy", 7.0, 7.001, t)).await.unwrap();
    let mut watch = c
        .watch_driver(pb::WatchDriverRequest { driver_id: "quiet".into(), include_current: false })
        .await
        .unwrap()
        .into_inner();
    let started = std::time::Instant::now();
    // "busy" keeps sending for 3 s: longer than the TTL.
    for i in 1..=6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.update(fix("busy", 7.0, 7.001, t + i * 1_000)).await.unwrap();
    }
    let end = watch.next().await.unwrap().unwrap_err();
    assert_eq!(end.metadata().get("locus-end-reason").unwrap(), "expired");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(c.get_driver(by_id("quiet", false)).await.unwrap_err().code(), Code::NotFound);
    assert!(c.get_driver(by_id("busy", false)).await.is_ok(), "fixes postpone expiry");
    let r =
        c.nearby(pb::NearbyRequest { lat: 7.0, lon: 7.0, limit: 10, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(r.drivers.iter().map(|h| h.driver_id.as_str()).collect::<Vec<_>>(), vec!["busy"]);
    assert!(
        eventually(Duration::from_secs(4), || {
            let mut c = c.clone();
            async move { c.get_driver(by_id("busy", false)).await.is_err() }
        })
        .await,
        "busy expires once it stops"
    );
}

#[tokio::test]
async fn overload_is_resource_exhausted_and_loses_nothing_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start(dir.path(), &["--shards", "1", "--mailbox-capacity", "1", "--overload-wait", "0ms"]);
    let c = node.client().await;
    let t = now_ms() - 600_000;
    let mut saw_overload = false;
    for attempt in 0..10 {
        // Keep the only shard busy with big batches while unary updates pile up.
        let mut sc = c.clone();
        let base = attempt * 10_000;
        let batches: Vec<pb::LocationBatch> = (0..4)
            .map(|b| pb::LocationBatch {
                batch_id: b,
                updates: (0..10_000)
                    .map(|i| fix(&format!("bulk{}", base + i), 3.0, 3.0, t + b as i64 * 1_000))
                    .collect(),
            })
            .collect();
        let bulk = tokio::spawn(async move {
            let mut acks = sc.update_stream(tokio_stream::iter(batches)).await.unwrap().into_inner();
            let mut out = vec![];
            while let Some(a) = acks.next().await {
                out.push(a.unwrap());
            }
            out
        });
        let mut unary = Vec::new();
        for i in 0..300 {
            let mut c = c.clone();
            unary.push(tokio::spawn(async move { c.update(fix(&format!("u{attempt}-{i}"), 3.0, 3.0, t)).await }));
        }
        for u in unary {
            match u.await.unwrap() {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                    assert_eq!(reason(&e), "overloaded");
                    saw_overload = true;
                }
            }
        }
        for a in bulk.await.unwrap() {
            assert!(a.rejected.iter().all(|r| r.reason_name == "overloaded"), "{:?}", a.rejected.first());
        }
        if saw_overload {
            break;
        }
    }
    assert!(saw_overload, "a 1-message mailbox under load must overflow");
    // Still serving.
    let mut c = c.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut c = c.clone();
            async move { c.update(fix("after", 3.0, 3.0, now_ms())).await.is_ok() }
        })
        .await
    );
    assert!(c.get_driver(by_id("after", false)).await.is_ok());
}
