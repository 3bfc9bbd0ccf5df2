//! Dispatch and Share My Trip benchmarks, run inside the three-node cluster benchmark
//! while it holds the ingest phase's drivers (three quarters of them AVAILABLE).
//!
//! 1. `Match`: sequential calls from one client to one node at random city points
//!    (latency), then `MATCH_CLIENTS` concurrent clients spread over the nodes
//!    (throughput). Each trip is booked first (not timed). Every successful call claims
//!    a driver (compare-and-set on its owner, flushed to sled before the answer) and
//!    records the offer with the trip (on the trip's owner, replicated).
//! 2. `GET /share/{token}` on one node: a trip owned by that node, carrying a passenger,
//!    polled over `SHARE_CONNS` keep-alive HTTP/1.1 connections for a few seconds.

use std::time::{Duration, Instant};

use anyhow::Context;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{Latency, city_point};
use crate::pb;
use crate::pb::dispatch_client::DispatchClient;
use crate::pb::trips_client::TripsClient;
use crate::sim::{connect_channel, fetch_ring};

const MATCH_CLIENTS: usize = 16;
const SHARE_CONNS: usize = 32;
const SHARE_SECS: u64 = 4;

pub struct TripFigures {
    pub matched: Latency,
    pub not_found: usize,
    pub matches_per_sec: f64,
    pub concurrent_matches: usize,
    pub share_rps: f64,
    pub share_requests: u64,
}

/// Books trip `k` at a random city point and returns its Match request.
async fn booked(
    trips: &mut TripsClient<crate::auth::layer::AuthChannel>,
    k: usize,
    rng: &mut SmallRng,
) -> anyhow::Result<pb::MatchRequest> {
    let (lat, lon) = city_point(rng);
    let trip_id = format!("bench-trip-{k}");
    let booking = pb::TripEvent {
        trip_id: trip_id.clone(),
        event_id: "b".into(),
        r#type: pb::TripEventType::BookingCreated as i32,
        pickup: Some(pb::Point { lat, lon }),
        dropoff: Some(pb::Point { lat: lat + 0.01, lon }),
        estimated_drive_s: 600,
        ..Default::default()
    };
    trips.apply(booking).await?;
    Ok(pb::MatchRequest { trip_id, lat, lon, radius_m: 3_000.0, ..Default::default() })
}

/// Sequential matches: latency of each call (found or not).
async fn match_latency(target: String, n: usize) -> anyhow::Result<(Latency, usize)> {
    let ch = connect_channel(&target).await?;
    let (mut d, mut trips) = (DispatchClient::new(ch.clone()), TripsClient::new(ch));
    let mut rng = SmallRng::seed_from_u64(41);
    let mut us = Vec::with_capacity(n);
    let mut not_found = 0;
    let t0 = Instant::now();
    for k in 0..n {
        let req = booked(&mut trips, k, &mut rng).await?;
        let q0 = Instant::now();
        match d.r#match(req).await {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::NotFound => not_found += 1,
            Err(s) => return Err(s.into()),
        }
        us.push(q0.elapsed().as_secs_f64() * 1e6);
    }
    Ok((Latency::from(us, t0.elapsed().as_secs_f64()), not_found))
}

/// One keep-alive connection polling `path` until `until`; returns 200s seen.
async fn poll_share(addr: String, path: String, until: Instant) -> anyhow::Result<u64> {
    let s = tokio::net::TcpStream::connect(&addr).await?;
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut ok = 0;
    let mut line = String::new();
    let mut body = Vec::new();
    while Instant::now() < until {
        w.write_all(req.as_bytes()).await?;
        line.clear();
        r.read_line(&mut line).await?;
        anyhow::ensure!(line.starts_with("HTTP/1.1 200"), "share answered {line:?}");
        let mut len = 0usize;
        loop {
            line.clear();
            r.read_line(&mut line).await?;
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse()?;
            }
        }
        body.resize(len, 0);
        r.read_exact(&mut body).await?;
        ok += 1;
    }
    Ok(ok)
}

/// Runs both benchmarks against `urls` (gRPC) with node 0's HTTP at `http0`.
pub async fn run(urls: &[String], http0: &str, matches: usize) -> anyhow::Result<TripFigures> {
    // Latency, one client.
    let t = urls[0].clone();
    let (matched, not_found) = super::on_one_thread(move || async move { match_latency(t, matches).await }).await?;
    eprintln!("[bench] match p50={:.0}us p99={:.0}us ({not_found} found nobody)", matched.p50, matched.p99);

    // Throughput, concurrent clients over all nodes.
    let per = matches / MATCH_CLIENTS;
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for c in 0..MATCH_CLIENTS {
        let target = urls[c % urls.len()].clone();
        set.spawn(async move {
            let ch = connect_channel(&target).await?;
            let (mut d, mut trips) = (DispatchClient::new(ch.clone()), TripsClient::new(ch));
            let mut rng = SmallRng::seed_from_u64(1_000 + c as u64);
            let mut ok = 0usize;
            for k in 0..per {
                let req = booked(&mut trips, 1_000_000 * (c + 1) + k, &mut rng).await?;
                if d.r#match(req).await.is_ok() {
                    ok += 1;
                }
            }
            anyhow::Ok(ok)
        });
    }
    let mut concurrent_matches = 0;
    while let Some(r) = set.join_next().await {
        concurrent_matches += r??;
    }
    let matches_per_sec = concurrent_matches as f64 / t0.elapsed().as_secs_f64();
    eprintln!("[bench] matches/s={matches_per_sec:.0} with {MATCH_CLIENTS} clients");

    // A trip owned by node 0, carrying a passenger, shared.
    let ring = fetch_ring(&urls[0]).await?;
    let trip = (0..)
        .map(|i| format!("bench-share-{i}"))
        .find(|id| ring.owner_url(id) == Some(urls[0].as_str()))
        .context("no trip id owned by node 0")?;
    let mut trips = TripsClient::new(connect_channel(&urls[0]).await?);
    let ev = |n: u32, t: pb::TripEventType| pb::TripEvent {
        trip_id: trip.clone(),
        event_id: format!("e{n}"),
        r#type: t as i32,
        ..Default::default()
    };
    let (lat, lon) = city_point(&mut SmallRng::seed_from_u64(3));
    trips
        .apply(pb::TripEvent {
            pickup: Some(pb::Point { lat, lon }),
            dropoff: Some(pb::Point { lat: lat + 0.01, lon }),
            estimated_drive_s: 600,
            ..ev(1, pb::TripEventType::BookingCreated)
        })
        .await?;
    let mut d = DispatchClient::new(connect_channel(&urls[0]).await?);
    let m = d
        .r#match(pb::MatchRequest { trip_id: trip.clone(), lat, lon, radius_m: 20_000.0, ..Default::default() })
        .await?
        .into_inner();
    let vehicle =
        pb::Vehicle { cab_number: "CAB-1".into(), model: "Prius".into(), colour: "white".into(), plate: "B-1".into() };
    trips
        .apply(pb::TripEvent {
            driver_id: m.driver_id,
            vehicle: Some(vehicle),
            ..ev(2, pb::TripEventType::DriverAssigned)
        })
        .await?;
    trips.apply(ev(3, pb::TripEventType::PassengerCarry)).await?;
    let link = trips.share_trip(pb::ShareTripRequest { trip_id: trip }).await?.into_inner();
    let path = format!("/share/{}", link.token);
    let until = Instant::now() + Duration::from_secs(SHARE_SECS);
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..SHARE_CONNS {
        set.spawn(poll_share(http0.to_string(), path.clone(), until));
    }
    let mut share_requests = 0;
    while let Some(r) = set.join_next().await {
        share_requests += r??;
    }
    let share_rps = share_requests as f64 / t0.elapsed().as_secs_f64();
    eprintln!("[bench] GET /share: {share_rps:.0} requests/s");
    Ok(TripFigures { matched, not_found, matches_per_sec, concurrent_matches, share_rps, share_requests })
}
