//! A node's side of the live map: its own part of a view, and the whole view gathered
//! from every node (`Internal.MapPart` to each, in parallel, with a deadline), rendered
//! as the JSON `GET /map/data` answers.
//!
//! Counts are per node and not de-duplicated: while a partition moves, its holder and its
//! new owner may both count its drivers for the moment between install and release.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use tokio::task::JoinSet;

use crate::clock::wall_ms;
use crate::drivers::map::{MapQuery, MapSlice};
use crate::geo::LatLonBox;
use crate::membership::{Liveness, NodeState};
use crate::pb;
use crate::routing::Router;
use crate::routing::cluster::Cluster;
use crate::trips::Trips;

/// How long a rendered view is reused for the same query (pages poll once a second;
/// several SREs on the same view cost one gather).
pub const CACHE_FOR: Duration = Duration::from_millis(500);
/// How long a gather waits for every node.
pub const PART_DEADLINE: Duration = Duration::from_secs(1);

/// Fixes accepted per second, from the node's accepted counter at successive map asks
/// (at least half a second apart).
#[derive(Default)]
struct RateMeter {
    last: Option<(Instant, u64)>,
    rate: f64,
}

impl RateMeter {
    fn sample(&mut self, now: Instant, count: u64) -> f64 {
        match self.last {
            None => self.last = Some((now, count)),
            Some((at, n)) => {
                let dt = now.duration_since(at).as_secs_f64();
                if dt >= 0.5 {
                    self.rate = count.saturating_sub(n) as f64 / dt;
                    self.last = Some((now, count));
                }
            }
        }
        self.rate
    }
}

/// See the module docs.
pub struct MapSource {
    router: Arc<Router>,
    trips: Arc<Trips>,
    cluster: Arc<Cluster>,
    meter: Mutex<RateMeter>,
    cache: Mutex<Option<(Instant, MapQuery, Bytes)>>,
}

impl MapSource {
    pub fn new(router: Arc<Router>, trips: Arc<Trips>, cluster: Arc<Cluster>) -> Arc<MapSource> {
        Arc::new(MapSource { router, trips, cluster, meter: Mutex::default(), cache: Mutex::default() })
    }

    /// This node's part of a view.
    pub async fn local_part(&self, q: &MapQuery) -> Result<pb::MapPartResponse, crate::routing::RouteError> {
        let slice = self.router.map(q.clone()).await?;
        let rate = self.meter.lock().expect("meter lock").sample(Instant::now(), slice.accepted);
        let (trips, trips_in_box) = self.trips.board.in_box(&q.b, q.trips_max as usize);
        let v = self.cluster.view();
        Ok(part_proto(v.name_of(&v.me), slice, trips, trips_in_box, self.trips.board.len() as u64, rate))
    }

    /// The whole view as JSON: every node's part (a node that does not answer within
    /// [`PART_DEADLINE`] is named in `missing`), the members and their liveness.
    pub async fn view_json(&self, q: &MapQuery) -> Bytes {
        if let Some((at, cq, body)) = &*self.cache.lock().expect("map cache lock")
            && at.elapsed() < CACHE_FOR
            && cq == q
        {
            return body.clone();
        }
        let (local, peers) = self.cluster.scatter_targets();
        let mut set = JoinSet::new();
        let mut missing = Vec::new();
        let req = part_request(q);
        for p in peers {
            match p {
                Err(name) => missing.push(name),
                Ok(p) => {
                    let mut c =
                        pb::internal_client::InternalClient::new(p.channel.clone()).max_decoding_message_size(64 << 20);
                    let mut r = tonic::Request::new(req);
                    r.set_timeout(PART_DEADLINE);
                    set.spawn(async move {
                        match tokio::time::timeout(PART_DEADLINE, c.map_part(r)).await {
                            Ok(Ok(a)) => Ok(a.into_inner()),
                            Ok(Err(s)) => {
                                tracing::debug!(peer = %p.name, error = %s, "map part failed");
                                Err(p.name)
                            }
                            Err(_) => Err(p.name),
                        }
                    });
                }
            }
        }
        let mut parts = Vec::new();
        if local {
            match self.local_part(q).await {
                Ok(p) => parts.push(p),
                Err(_) => {
                    let v = self.cluster.view();
                    missing.push(v.name_of(&v.me));
                }
            }
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(p)) => parts.push(p),
                Ok(Err(name)) => missing.push(name),
                Err(_) => missing.push("unknown".into()),
            }
        }
        parts.sort_by(|a, b| a.node.cmp(&b.node));
        missing.sort();
        let body = Bytes::from(self.render(q, &parts, &missing));
        *self.cache.lock().expect("map cache lock") = Some((Instant::now(), q.clone(), body.clone()));
        body
    }

    fn render(&self, q: &MapQuery, parts: &[pb::MapPartResponse], missing: &[String]) -> Vec<u8> {
        let v = self.cluster.view();
        let members: Vec<serde_json::Value> = v
            .members
            .iter()
            .map(|m| {
                let meta = m.meta.as_ref();
                serde_json::json!({
                    "name": meta.map_or_else(|| m.addr.to_string(), |x| x.name.clone()),
                    "liveness": match m.liveness {
                        Liveness::Alive => "alive",
                        Liveness::Suspect => "suspect",
                        Liveness::Down => "down",
                    },
                    "state": meta.map_or("unknown", |x| match x.state {
                        NodeState::Joining => "joining",
                        NodeState::Active => "active",
                        NodeState::Leaving => "leaving",
                    }),
                    "in_ring": v.ring.contains(&m.addr),
                    "is_self": m.addr == v.me,
                    "http": meta.map(|x| x.http.to_string()),
                })
            })
            .collect();
        let parts: Vec<serde_json::Value> = parts
            .iter()
            .map(|p| {
                let trips: Vec<serde_json::Value> = p
                    .trips
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "id": t.trip_id, "state": t.state, "driver_id": t.driver_id,
                            "pickup": [t.pickup_lat, t.pickup_lon], "dropoff": [t.dropoff_lat, t.dropoff_lon],
                            "driver": t.has_driver.then_some([t.driver_lat, t.driver_lon]),
                            "route": t.route,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "node": p.node, "cells": p.cells, "counts": p.counts, "in_box": p.in_box,
                    "points_truncated": p.points_truncated, "points": p.points,
                    "status": p.point_status, "ids": p.point_ids,
                    "trips": trips, "trips_in_box": p.trips_in_box,
                    "drivers": p.drivers, "trips_total": p.trips_total,
                    "fixes_per_s": (p.fixes_per_s * 10.0).round() / 10.0,
                })
            })
            .collect();
        let body = serde_json::json!({
            "node": v.name_of(&v.me),
            "now_ms": wall_ms(),
            "ring_checksum": format!("{:016x}", v.ring.checksum()),
            "box": [q.b.min_lat, q.b.min_lon, q.b.max_lat, q.b.max_lon],
            "cols": q.cols, "rows": q.rows, "points_max": q.points_max,
            "members": members,
            "missing": missing,
            "parts": parts,
        });
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// The request for a query.
pub fn part_request(q: &MapQuery) -> pb::MapPartRequest {
    pb::MapPartRequest {
        r#box: Some(pb::Box { min_lat: q.b.min_lat, min_lon: q.b.min_lon, max_lat: q.b.max_lat, max_lon: q.b.max_lon }),
        cols: q.cols,
        rows: q.rows,
        points_max: q.points_max,
        trips_max: q.trips_max,
    }
}

/// A request from the network, checked: the field at fault and why.
pub fn query_of(r: &pb::MapPartRequest) -> Result<MapQuery, (&'static str, String)> {
    let b = r.r#box.as_ref().ok_or(("box", "required".to_string()))?;
    let b = LatLonBox { min_lat: b.min_lat, min_lon: b.min_lon, max_lat: b.max_lat, max_lon: b.max_lon };
    MapQuery::new(b, r.cols, r.rows, r.points_max, r.trips_max)
}

fn part_proto(
    node: String,
    s: MapSlice,
    trips: Vec<crate::trips::board::TripSketch>,
    trips_in_box: u64,
    trips_total: u64,
    rate: f64,
) -> pb::MapPartResponse {
    let mut cells = Vec::new();
    let mut counts = Vec::new();
    for (i, c) in s.cells.iter().enumerate() {
        if c.iter().any(|&n| n > 0) {
            cells.push(i as u32);
            counts.extend_from_slice(c);
        }
    }
    let mut points = Vec::with_capacity(s.points.len() * 2);
    let mut point_status = Vec::with_capacity(s.points.len());
    let mut point_ids = Vec::with_capacity(s.points.len());
    for p in s.points {
        points.push(p.lat);
        points.push(p.lon);
        point_status.push(p.status as u8);
        point_ids.push(p.driver_id);
    }
    let trips = trips
        .into_iter()
        .map(|t| pb::MapTrip {
            trip_id: t.trip_id,
            state: t.state.name().to_string(),
            driver_id: t.driver_id,
            pickup_lat: t.pickup.0,
            pickup_lon: t.pickup.1,
            dropoff_lat: t.dropoff.0,
            dropoff_lon: t.dropoff.1,
            has_driver: t.driver.is_some(),
            driver_lat: t.driver.map_or(0.0, |d| d.0),
            driver_lon: t.driver.map_or(0.0, |d| d.1),
            route: t.route.iter().flat_map(|&(a, b)| [a, b]).collect(),
        })
        .collect();
    pb::MapPartResponse {
        node,
        cells,
        counts,
        in_box: s.in_box,
        points_truncated: s.points_truncated,
        points,
        point_status,
        point_ids,
        trips,
        trips_in_box,
        drivers: s.drivers,
        trips_total,
        fixes_per_s: rate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_the_counter_slope_over_at_least_half_a_second() {
        let mut m = RateMeter::default();
        let t0 = Instant::now();
        assert_eq!(m.sample(t0, 100), 0.0, "one sample has no slope");
        assert_eq!(m.sample(t0 + Duration::from_millis(100), 500), 0.0, "too soon: kept");
        assert_eq!(m.sample(t0 + Duration::from_secs(2), 2_100), 1_000.0);
        assert_eq!(m.sample(t0 + Duration::from_millis(2_200), 9_999), 1_000.0);
    }

    #[test]
    fn a_request_without_a_box_names_the_field() {
        let r = pb::MapPartRequest { r#box: None, cols: 1, rows: 1, points_max: 0, trips_max: 0 };
        assert_eq!(query_of(&r).unwrap_err().0, "box");
    }
}
