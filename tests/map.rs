//! The operator's live map against a real 3-node cluster with auth on: `/map/data`
//! gathers every node's part (grid counts, points, live trips with routes, members),
//! refuses clients without the reader role, and the page, loaded in a real headless
//! Chromium, draws the drivers. The screenshot is kept in `target/artifacts/map.png`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cluster::TestCluster;
use common::{CENTRE, eventually, fix, home, now_ms};
use locus::auth::{Role, line_for, new_token};
use locus::pb;
use locus::pb::dispatch_client::DispatchClient;
use locus::pb::locations_client::LocationsClient;
use locus::pb::trips_client::TripsClient;
use tonic::Request;

const DRIVERS: usize = 3_000;

fn req<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// GET with an optional bearer token: (status, body).
async fn get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let r = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(r.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

async fn view(addr: &str, query: &str, token: &str) -> serde_json::Value {
    let (code, body) = get(addr, &format!("/map/data?{query}"), Some(token)).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Drivers counted in a view's cells, over every node's part.
fn counted(v: &serde_json::Value) -> u64 {
    v["parts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["counts"].as_array().unwrap())
        .map(|c| c.as_u64().unwrap())
        .sum()
}

fn chromium() -> String {
    if let Ok(c) = std::env::var("LOCUS_CHROMIUM") {
        return c;
    }
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if std::process::Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return c.to_string();
        }
    }
    panic!("the live map test needs Chromium: apt-get install chromium (or set LOCUS_CHROMIUM)");
}

/// Runs headless Chromium on `url` for `budget_ms` of virtual time with `extra` flags.
fn headless(url: &str, profile: &Path, extra: &[&str], budget_ms: u32) -> std::process::Output {
    let mut cmd = std::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1400,860",
        &format!("--user-data-dir={}", profile.display()),
        &format!("--virtual-time-budget={budget_ms}"),
    ]);
    cmd.args(extra).arg(url);
    let out = cmd.output().expect("start chromium");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The `data-*` attribute of the dumped page's body.
fn body_attr(dom: &str, name: &str) -> Option<String> {
    let body = &dom[dom.find("<body")?..];
    let body = &body[..body.find('>')?];
    let pat = format!("data-{name}=\"");
    let start = body.find(&pat)? + pat.len();
    Some(body[start..start + body[start..].find('"')?].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_map_gathers_every_node_and_draws_in_a_real_browser() {
    let secrets = tempfile::tempdir().unwrap();
    let (gateway, reader, dispatch) = (new_token(), new_token(), new_token());
    let lines = [
        line_for(&gateway, &[Role::Gateway], "gw"),
        line_for(&reader, &[Role::Reader], "sre"),
        line_for(&dispatch, &[Role::Dispatch, Role::Reader], "dispatch"),
    ];
    std::fs::write(secrets.path().join("tokens"), lines.join("\n") + "\n").unwrap();
    std::fs::write(secrets.path().join("cluster.key"), "a-cluster-key-for-the-map-test").unwrap();
    let tokens = secrets.path().join("tokens");
    let key = secrets.path().join("cluster.key");
    let c = TestCluster::start_with(
        3,
        &["--auth-file", tokens.to_str().unwrap(), "--cluster-key-file", key.to_str().unwrap()],
    );
    let http = c.node(1).http.clone();

    // The page is public (it holds no data); the data needs the reader role.
    let (code, page) = get(&http, "/map", None).await;
    assert_eq!(code, 200);
    assert!(page.contains("<canvas") && !page.contains("src=\"http"), "self-contained page");
    assert_eq!(get(&http, "/map/data", None).await.0, 401);
    assert_eq!(get(&http, "/map/data", Some("lct_guessed")).await.0, 401);
    assert_eq!(get(&http, "/map/data", Some(&gateway)).await.0, 403);
    let (code, body) = get(&http, "/map/data?cols=0", Some(&reader)).await;
    assert_eq!(code, 400);
    assert!(body.starts_with("cols:"), "{body}");
    let (code, body) = get(&http, "/map/data?min_lat=north", Some(&reader)).await;
    assert_eq!((code, body.starts_with("min_lat:")), (400, true), "{body}");

    // Three members on one ring, each answering its part.
    let formed = eventually(Duration::from_secs(30), || {
        let (http, reader) = (http.clone(), reader.clone());
        async move {
            let (code, body) = get(&http, "/map/data?cols=1&rows=1", Some(&reader)).await;
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else { return false };
            code == 200
                && v["members"].as_array().is_some_and(|m| m.iter().filter(|m| m["in_ring"] == true).count() == 3)
                && v["parts"].as_array().is_some_and(|p| p.len() == 3)
                && v["missing"].as_array().is_some_and(|m| m.is_empty())
        }
    })
    .await;
    assert!(formed, "the three nodes did not all answer the map");
    // And the hand-off settled (every node ready): while a partition moves, its holder and
    // its new owner both count its drivers, and this test counts them exactly.
    let settled = eventually(Duration::from_secs(60), || {
        let c = &c;
        async move {
            let mut ready = true;
            for i in 0..3 {
                ready &= get(&c.node(i).http, "/readyz", None).await.0 == 200;
            }
            ready
        }
    })
    .await;
    assert!(settled, "the three nodes did not all become ready");

    // A fleet around the centre, a third of it offline, through one gateway connection.
    let mut loc = LocationsClient::connect(c.node(0).grpc.clone()).await.unwrap();
    let ts = now_ms();
    let batch: Vec<pb::LocationUpdate> = (0..DRIVERS)
        .map(|i| {
            let (lat, lon) = home(i);
            let status = if i % 3 == 0 { pb::DriverStatus::Offline } else { pb::DriverStatus::Available };
            pb::LocationUpdate { status: status as i32, ..fix(&format!("d{i}"), lat, lon, ts) }
        })
        .collect();
    for chunk in batch.chunks(500) {
        let msg = pb::LocationBatch { updates: chunk.to_vec(), batch_id: 1 };
        let mut acks = loc.update_stream(req(tokio_stream::iter(vec![msg]), &gateway)).await.unwrap().into_inner();
        let ack = acks.message().await.unwrap().unwrap();
        assert_eq!(ack.accepted as usize, chunk.len(), "{:?}", ack.rejected.first());
    }

    // A trip with its driver carrying the passenger and a route.
    let trips = TripsClient::connect(c.node(2).grpc.clone()).await.unwrap();
    let mut disp = DispatchClient::connect(c.node(2).grpc.clone()).await.unwrap();
    // Right after forming, replicas may still be syncing: trip writes answer UNAVAILABLE
    // with a retry hint until they are, and a dispatcher retries.
    let apply = |ev: pb::TripEvent| {
        let (mut trips, dispatch) = (trips.clone(), dispatch.clone());
        async move {
            for _ in 0..100 {
                match trips.apply(req(ev.clone(), &dispatch)).await {
                    Err(s) if s.code() == tonic::Code::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    r => return r.unwrap(),
                }
            }
            panic!("the trip write stayed unavailable")
        }
    };
    apply(common::booking("map-trip")).await;
    let m = disp.r#match(req(common::match_req("map-trip"), &dispatch)).await.unwrap().into_inner();
    let driver = m.driver_id;
    assert!(!driver.is_empty(), "a driver matched");
    for (id, t) in [
        ("a", pb::TripEventType::DriverAssigned),
        ("r", pb::TripEventType::DriverArrived),
        ("c", pb::TripEventType::PassengerCarry),
    ] {
        apply(common::event("map-trip", id, t, &driver)).await;
    }
    let mut t = ts;
    for i in 1..=6 {
        t += 5_000;
        let f = pb::LocationUpdate {
            status: pb::DriverStatus::OnTrip as i32,
            ..fix(&driver, CENTRE.0 - 0.002 * i as f64, CENTRE.1, t)
        };
        loc.update(req(f, &gateway)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(350)).await;
    }

    // The world view: every driver counted once, in the grid; too many for points.
    let world = view(&http, "cols=32&rows=16&points_max=100", &reader).await;
    assert_eq!(counted(&world), DRIVERS as u64, "{}", world["missing"]);
    let parts = world["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    for p in parts {
        assert!(p["drivers"].as_u64().unwrap() > 0, "every node owns part of the fleet: {}", p["node"]);
        assert_eq!(p["points_truncated"], true);
        assert!(p["points"].as_array().unwrap().is_empty());
    }
    let offline: u64 = parts
        .iter()
        .map(|p| p["counts"].as_array().unwrap().iter().step_by(4).map(|c| c.as_u64().unwrap()).sum::<u64>())
        .sum();
    assert_eq!(offline, DRIVERS.div_ceil(3) as u64, "counts are per status (offline first)");

    // The trip, with its route, wherever it lives.
    let routed = eventually(Duration::from_secs(10), || {
        let (http, reader) = (http.clone(), reader.clone());
        async move {
            let v = view(&http, "cols=4&rows=4", &reader).await;
            v["parts"].as_array().unwrap().iter().flat_map(|p| p["trips"].as_array().unwrap().clone()).any(|t| {
                t["id"] == "map-trip" && t["state"] == "PASSENGER_CARRY" && t["route"].as_array().unwrap().len() >= 4
            })
        }
    })
    .await;
    assert!(routed, "the live trip and its route are on the map");

    // Zoomed in on one driver: points, with its id, status and position.
    let (lat, lon) = home(7);
    let q = format!("min_lat={}&max_lat={}&min_lon={}&max_lon={}", lat - 1e-4, lat + 1e-4, lon - 1e-4, lon + 1e-4);
    let near = view(&http, &q, &reader).await;
    let ids: Vec<String> = near["parts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["ids"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_string()))
        .collect();
    assert!(ids.contains(&"d7".to_string()), "{near}");
    assert!(near["parts"].as_array().unwrap().iter().all(|p| p["points_truncated"] == false));

    // The page in a real browser: it takes the token from the fragment, fits the fleet
    // and draws it.
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{http}/map#token={reader}");
    let out = headless(&url, profile.path(), &["--dump-dom"], 12_000);
    let dom = String::from_utf8_lossy(&out.stdout);
    let attr = |n: &str| body_attr(&dom, n).unwrap_or_else(|| panic!("no data-{n} on the page's body: {dom}"));
    assert!(body_attr(&dom, "error").is_none(), "the page was refused: {}", attr("error"));
    assert!(attr("updates").parse::<u32>().unwrap() >= 2, "the page did not refresh");
    let drawn: u64 = attr("drivers").parse().unwrap();
    assert!(drawn >= DRIVERS as u64 / 2, "the page drew {drawn} of {DRIVERS} drivers ({})", attr("mode"));
    assert_eq!(attr("members"), "3");
    assert_eq!(attr("nodes"), "3");
    assert!(attr("trips").parse::<u32>().unwrap() >= 1, "the live trip was not drawn");

    // Without a token the page says so instead of drawing.
    let profile2 = tempfile::tempdir().unwrap();
    let out = headless(&format!("http://{http}/map"), profile2.path(), &["--dump-dom"], 3_000);
    assert_eq!(body_attr(&String::from_utf8_lossy(&out.stdout), "error").as_deref(), Some("401"));

    // The screenshot, kept for CI.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("map.png");
    let _ = std::fs::remove_file(&png);
    headless(&url, profile.path(), &[&format!("--screenshot={}", png.display())], 12_000);
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000, "a real screenshot: {} bytes", bytes.len());
}
