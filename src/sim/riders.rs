//! Simulated riders: each books a trip, asks `Dispatch.Match` for a driver, the driver
//! accepts (DRIVER_ASSIGNED) and is steered to the pickup, then to the drop-off; some
//! riders cancel. Riders in the car share their trip and the link is polled over HTTP.
//!
//! Timing is compressed (a leg lasts seconds, not minutes) so a short run shows every
//! state; drivers still drive there on the map, and their fixes build the trip's route.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::auth::layer::AuthChannel;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::{Mutex, mpsc};

use super::{SimConfig, http_get, random_point};
use crate::pb;
use crate::pb::dispatch_client::DispatchClient;
use crate::pb::trips_client::TripsClient;

/// Counters the status line shows.
#[derive(Default)]
pub struct RiderStats {
    pub matched: AtomicU64,
    pub no_driver: AtomicU64,
    pub errors: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub share_ok: AtomicU64,
    pub share_other: AtomicU64,
    pub match_us: Mutex<Vec<u64>>,
}

/// A driver to steer: (driver index, destination).
pub type Steer = mpsc::Sender<(usize, (f64, f64))>;

/// Runs a call again while the cluster answers `UNAVAILABLE` (a node died, a partition
/// is moving, no quorum), after the server's `locus-retry-after-ms` hint or a backoff,
/// a few times: what a production dispatcher does. Only for idempotent calls (trip
/// events carry their event id).
async fn retrying<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut wait = Duration::from_millis(100);
    for _ in 0..8 {
        match call().await {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                let hint = s.metadata().get("locus-retry-after-ms").and_then(|v| v.to_str().ok()?.parse().ok());
                tokio::time::sleep(hint.map_or(wait, Duration::from_millis)).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
    call().await
}

async fn apply(trips: &TripsClient<AuthChannel>, e: pb::TripEvent) -> Result<pb::Trip, tonic::Status> {
    retrying(|| {
        let (mut t, e) = (trips.clone(), e.clone());
        async move { t.apply(e).await.map(|r| r.into_inner()) }
    })
    .await
}

fn ev(trip: &str, n: u32, t: pb::TripEventType) -> pb::TripEvent {
    pb::TripEvent { trip_id: trip.into(), event_id: format!("{trip}-{n}"), r#type: t as i32, ..Default::default() }
}

async fn ride(
    k: u64,
    cfg: SimConfig,
    trips: TripsClient<AuthChannel>,
    dispatch: DispatchClient<AuthChannel>,
    steer: Steer,
    stats: Arc<RiderStats>,
) -> Result<(), tonic::Status> {
    let mut rng = SmallRng::seed_from_u64(cfg.seed ^ k.wrapping_mul(0x9E37_79B9));
    let (pickup, dropoff) = (random_point(&cfg, &mut rng), random_point(&cfg, &mut rng));
    let trip = format!("{}trip-{k}", cfg.id_prefix);
    let booking = pb::TripEvent {
        pickup: Some(pb::Point { lat: pickup.0, lon: pickup.1 }),
        dropoff: Some(pb::Point { lat: dropoff.0, lon: dropoff.1 }),
        estimated_drive_s: 900,
        ..ev(&trip, 1, pb::TripEventType::BookingCreated)
    };
    apply(&trips, booking).await?;
    let t0 = Instant::now();
    let req = pb::MatchRequest {
        trip_id: trip.clone(),
        lat: pickup.0,
        lon: pickup.1,
        radius_m: 5_000.0,
        ..Default::default()
    };
    let m = match retrying(|| {
        let (mut d, r) = (dispatch.clone(), req.clone());
        async move { d.r#match(r).await.map(|r| r.into_inner()) }
    })
    .await
    {
        Ok(m) => m,
        Err(s) if s.code() == tonic::Code::NotFound => {
            stats.no_driver.fetch_add(1, Ordering::Relaxed);
            apply(&trips, ev(&trip, 2, pb::TripEventType::Cancelled)).await?;
            return Ok(());
        }
        Err(s) => return Err(s),
    };
    stats.match_us.lock().await.push(t0.elapsed().as_micros() as u64);
    stats.matched.fetch_add(1, Ordering::Relaxed);
    let idx: Option<usize> = m.driver_id.strip_prefix(&cfg.id_prefix).and_then(|i| i.parse().ok());
    let mut assign = ev(&trip, 2, pb::TripEventType::DriverAssigned);
    assign.driver_id = m.driver_id.clone();
    assign.vehicle = Some(pb::Vehicle {
        cab_number: format!("CAB-{}", idx.unwrap_or(0)),
        model: "Prius".into(),
        colour: "silver".into(),
        plate: format!("B-SM {}", idx.unwrap_or(0) % 10_000),
    });
    apply(&trips, assign).await?;
    if let Some(i) = idx {
        let _ = steer.send((i, pickup)).await;
    }
    tokio::time::sleep(Duration::from_secs(rng.random_range(2..6))).await;
    if rng.random_bool(0.1) {
        apply(&trips, ev(&trip, 3, pb::TripEventType::Cancelled)).await?;
        stats.cancelled.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    apply(&trips, ev(&trip, 3, pb::TripEventType::DriverArrived)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    apply(&trips, ev(&trip, 4, pb::TripEventType::PassengerCarry)).await?;
    if let Some(i) = idx {
        let _ = steer.send((i, dropoff)).await;
    }
    let link = retrying(|| {
        let (mut t, id) = (trips.clone(), trip.clone());
        async move { t.share_trip(pb::ShareTripRequest { trip_id: id }).await.map(|r| r.into_inner()) }
    })
    .await?;
    // http://host:port/share/{token}/view → host:port and the JSON path.
    let host = link.url.trim_start_matches("http://").split('/').next().unwrap_or_default().to_string();
    let path = format!("/share/{}", link.token);
    for _ in 0..rng.random_range(4..10) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match http_get(&host, &path).await {
            Ok((200, _)) => stats.share_ok.fetch_add(1, Ordering::Relaxed),
            _ => stats.share_other.fetch_add(1, Ordering::Relaxed),
        };
    }
    apply(&trips, ev(&trip, 5, pb::TripEventType::PassengerDropped)).await?;
    stats.completed.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Starts `cfg.riders_per_sec` riders a second, each on its own task.
pub fn spawn(cfg: SimConfig, channel: AuthChannel, steer: Steer, stats: Arc<RiderStats>) {
    if cfg.riders_per_sec == 0.0 {
        return;
    }
    tokio::spawn(async move {
        let trips = TripsClient::new(channel.clone());
        let dispatch = DispatchClient::new(channel);
        let mut iv = tokio::time::interval(Duration::from_secs_f64(1.0 / cfg.riders_per_sec));
        for k in 0.. {
            iv.tick().await;
            let (c, t, d, s, st) = (cfg.clone(), trips.clone(), dispatch.clone(), steer.clone(), stats.clone());
            tokio::spawn(async move {
                if let Err(e) = ride(k, c, t, d, s, st.clone()).await {
                    st.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "rider failed");
                }
            });
        }
    });
}
