//! What a client can hold open, and what it gets past each limit, against a real node:
//! HTTP connections, slow headers (slowloris), request bodies, watches, event
//! subscriptions, gRPC streams per connection, and request size.

mod common;

use std::time::Duration;

use common::{CENTRE, NodeProc, fix, now_ms};
use locus::pb;
use locus::pb::events_client::EventsClient;
use locus::pb::locations_client::LocationsClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;

/// Reads until the server closes the connection (or `within` passes): what it sent.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut buf = Vec::new();
    match tokio::time::timeout(within, s.read_to_end(&mut buf)).await {
        Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_slow_headers_and_bodies_are_bounded() {
    let d = tempfile::tempdir().unwrap();
    let n = NodeProc::start(d.path(), &["--http-max-connections", "20", "--http-header-timeout", "1s"]);
    // 20 connections that send half a request and stall (slowloris).
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(&n.http).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The 21st is closed at once, unanswered.
    let mut extra = TcpStream::connect(&n.http).await.unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let got = read_until_closed(&mut extra, Duration::from_secs(2)).await;
    assert_eq!(got.as_deref(), Some(""), "the connection over the limit was served or left open");
    // The stalled ones are closed once their headers are 1 s late.
    let t0 = std::time::Instant::now();
    for s in &mut slow {
        let got = read_until_closed(s, Duration::from_secs(5)).await;
        assert!(got.is_some(), "a slowloris connection stayed open past the header timeout");
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "closed after {:?}", t0.elapsed());
    // Their slots are free again.
    let (code, _) = common::http_get(&n.http, "/healthz").await;
    assert_eq!(code, 200);
    // A body is refused at once (no endpoint takes one), and the connection closed.
    let mut s = TcpStream::connect(&n.http).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc").await.unwrap();
    let got = read_until_closed(&mut s, Duration::from_secs(2)).await.expect("closed");
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    let (_, m) = common::http_get(&n.http, "/metrics").await;
    assert!(m.contains("locus_http_refused_total{reason=\"connections\"}"), "{m}");
    assert!(m.contains("locus_http_refused_total{reason=\"body\"}"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_and_subscriptions_per_node_are_bounded() {
    let d = tempfile::tempdir().unwrap();
    let n = NodeProc::start(d.path(), &["--max-watches", "3", "--max-subscriptions", "2"]);
    let mut c = n.client().await;
    c.update(fix("w1", CENTRE.0, CENTRE.1, now_ms())).await.unwrap();
    let watch = || pb::WatchDriverRequest { driver_id: "w1".into(), include_current: true };
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(c.watch_driver(watch()).await.unwrap().into_inner());
    }
    let s = c.watch_driver(watch()).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("--max-watches"), "{s:?}");
    // Trip watches share the limit.
    let mut trips = locus::pb::trips_client::TripsClient::connect(n.grpc.clone()).await.unwrap();
    let s = trips.watch_trip(pb::WatchTripRequest { trip_id: "t".into(), after_version: 0 }).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    // A closed watch gives its slot back.
    drop(open.pop());
    assert!(
        common::eventually(Duration::from_secs(5), || {
            let mut c = c.clone();
            async move { c.watch_driver(watch()).await.map(|s| open_keep(s.into_inner())).is_ok() }
        })
        .await
    );

    let mut ev = EventsClient::connect(n.grpc.clone()).await.unwrap();
    let sub = pb::SubscribeRequest::default();
    let _a = ev.subscribe(sub.clone()).await.unwrap().into_inner();
    let _b = ev.subscribe(sub.clone()).await.unwrap().into_inner();
    let s = ev.subscribe(sub.clone()).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("--max-subscriptions"), "{s:?}");
    let (_, m) = common::http_get(&n.http, "/metrics").await;
    assert!(m.contains("locus_limit_refused_total{limit=\"watches\"}"), "{m}");
    assert!(m.contains("locus_limit_refused_total{limit=\"subscriptions\"}"), "{m}");
}

/// Keeps a stream open for the rest of the test (leaks it on purpose: its slot stays taken).
fn open_keep<T: Send + 'static>(s: tonic::Streaming<T>) {
    std::mem::forget(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_and_request_size_are_bounded() {
    let d = tempfile::tempdir().unwrap();
    let n = NodeProc::start(d.path(), &["--grpc-max-streams", "4"]);
    let mut c = LocationsClient::connect(n.grpc.clone()).await.unwrap();
    c.update(fix("s1", CENTRE.0, CENTRE.1, now_ms())).await.unwrap();
    let watch = || pb::WatchDriverRequest { driver_id: "s1".into(), include_current: true };
    // One connection: four streams open, a fifth waits for one of them to end.
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(c.watch_driver(watch()).await.unwrap().into_inner());
    }
    let mut c5 = c.clone();
    let fifth = tokio::spawn(async move { c5.watch_driver(watch()).await.map(|s| s.into_inner()) });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!fifth.is_finished(), "a fifth stream opened on a connection limited to four");
    drop(open.pop());
    let s = tokio::time::timeout(Duration::from_secs(5), fifth).await.expect("the fifth never opened");
    assert!(s.unwrap().is_ok());

    // Request size: a fix over 16 MiB is refused before it is decoded; the node serves on.
    let mut big = fix("big", CENTRE.0, CENTRE.1, now_ms());
    big.driver_id = "x".repeat(17 << 20);
    let s = c.update(big).await.unwrap_err();
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    assert!(s.message().contains("message length too large"), "{s:?}");
    c.update(fix("s2", CENTRE.0, CENTRE.1, now_ms())).await.unwrap();
}

/// `GET path` with an `X-Forwarded-For` header: the status code.
async fn get_as(http: &str, path: &str, xff: &str) -> u16 {
    let mut s = TcpStream::connect(http).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {xff}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let got = read_until_closed(&mut s, Duration::from_secs(5)).await.expect("an answer");
    got.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_share_rate_limit_believes_x_forwarded_for_only_from_trusted_proxies() {
    // A share token that is well-formed but unknown: 404 within the budget, 429 past it.
    let path = format!("/share/{}", "0".repeat(32));
    let rate = ["--share-client-rate", "1", "--share-token-rate", "1000"];
    let d = tempfile::tempdir().unwrap();
    let behind = NodeProc::start(d.path(), &[&rate[..], &["--trusted-proxies", "127.0.0.0/8"]].concat());
    // Two requests of one client pass (the burst), the third is limited...
    assert_eq!(get_as(&behind.http, &path, "198.51.100.1").await, 404);
    assert_eq!(get_as(&behind.http, &path, "198.51.100.1").await, 404);
    assert_eq!(get_as(&behind.http, &path, "198.51.100.1").await, 429);
    // ...while another client behind the same proxy has its own budget, whatever the
    // first one writes left of its own address.
    assert_eq!(get_as(&behind.http, &path, "198.51.100.2").await, 404);
    assert_eq!(get_as(&behind.http, &path, "203.0.113.5, 198.51.100.1").await, 429);

    // Without --trusted-proxies the header is ignored: everyone here is 127.0.0.1.
    let d2 = tempfile::tempdir().unwrap();
    let open = NodeProc::start(d2.path(), &rate);
    assert_eq!(get_as(&open.http, &path, "198.51.100.1").await, 404);
    assert_eq!(get_as(&open.http, &path, "198.51.100.2").await, 404);
    assert_eq!(get_as(&open.http, &path, "198.51.100.3").await, 429);
}
