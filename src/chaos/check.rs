//! The checker: reads the cluster back and holds it to the history.
//!
//! - **Fixes.** Each driver reads back at a fix that was sent and not refused (ok or
//!   unknown), at its position, and no older than its *floor*: the last fix acknowledged
//!   outside every loss zone. A loss zone is the loss window ([`LOSS_WINDOW`]) before a
//!   crash-like fault (kill, pause, partition, bad link) through 1 s after it ends:
//!   replication runs about a second behind, so those fixes may be lost. Graceful
//!   moves (rolling restarts, scaling with drains) have no zone: they lose nothing.
//! - **Trips.** Each trip whose events all had a certain answer reads back in the state
//!   and with the driver its last acknowledged event left it.
//! - **One trip per driver.** A `Match` that ran entirely while the history proves the
//!   driver held by another trip (claim acknowledged, no release sent, offer not yet
//!   lapsed) is a double assignment.
//! - **Timers.** Every short trip past its due time is gone (its TTL timer fired), and
//!   no event subscription saw its `EXPIRED` twice (it fired once).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;

use super::history::{History, Outcome, Targets};
use crate::pb;
use crate::pb::locations_client::LocationsClient;
use crate::pb::trips_client::TripsClient;

/// Fixes acknowledged this long before a crash-like fault may be lost.
pub const LOSS_WINDOW: Duration = Duration::from_millis(1500);
/// ... and those acknowledged until this long after it ended.
pub const AFTER_FAULT: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Verdict {
    pub drivers: usize,
    pub trips: usize,
    pub timers: usize,
    pub lost: u64,
    pub duplicated: u64,
    pub violations: Vec<String>,
}

impl Verdict {
    fn lost(&mut self, what: String) {
        self.lost += 1;
        self.violations.push(what);
    }

    fn duplicated(&mut self, what: String) {
        self.duplicated += 1;
        self.violations.push(what);
    }
}

/// A read as a production client makes it: retried while the answer is uncertain
/// (a partition still moving), for up to 15 s.
async fn patient<T, F, Fut>(mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let t0 = Instant::now();
    loop {
        match f().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if super::history::outcome(&s) == Outcome::Unknown && t0.elapsed() < Duration::from_secs(15) => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(s) => return Err(s),
        }
    }
}

/// A trip through any node, patiently.
async fn read_trip(targets: &Targets, id: &str) -> Result<pb::Trip, tonic::Status> {
    patient(|| {
        let mut c = TripsClient::new(targets.any());
        let req = pb::GetTripRequest { trip_id: id.to_string(), include_route: false };
        async move { c.get_trip(req).await }
    })
    .await
}

pub async fn check(h: &History, targets: &Targets) -> Verdict {
    let mut v = Verdict::default();
    let in_zone = |t: Instant| h.faults.iter().any(|(s, e)| t + LOSS_WINDOW >= *s && t <= *e + AFTER_FAULT);
    let mut drivers: Vec<(&String, &Vec<super::history::FixOp>)> = h.fixes.iter().collect();
    drivers.sort_by(|a, b| a.0.cmp(b.0));
    for (id, ops) in drivers {
        v.drivers += 1;
        let floor = ops.iter().rposition(|f| f.outcome == Outcome::Ok && !in_zone(f.done));
        let r = patient(|| {
            let mut c = LocationsClient::new(targets.any());
            let req = pb::GetDriverRequest {
                key: Some(pb::get_driver_request::Key::DriverId(id.clone())),
                ..Default::default()
            };
            async move { c.get_driver(req).await }
        })
        .await;
        let d = match r {
            Ok(d) => d,
            Err(s) if s.code() == Code::NotFound && floor.is_none() => continue,
            Err(s) => {
                v.lost(format!("{id}: read failed: {} {}", s.code(), s.message()));
                continue;
            }
        };
        let Some(at) = ops.iter().position(|f| f.ts == d.timestamp_ms) else {
            v.violations.push(format!("{id}: reads at ts {} which was never sent", d.timestamp_ms));
            continue;
        };
        let f = &ops[at];
        if f.outcome == Outcome::Failed {
            v.violations.push(format!("{id}: reads a fix the cluster refused (ts {})", f.ts));
        }
        if (f.lat - d.lat).abs() > 1e-6 || (f.lon - d.lon).abs() > 1e-6 {
            v.violations.push(format!("{id}: position of ts {} differs", f.ts));
        }
        if let Some(floor) = floor
            && at < floor
        {
            v.lost(format!(
                "{id}: went back to fix {at} (ts {}) from acknowledged fix {floor} (ts {})",
                f.ts, ops[floor].ts
            ));
        }
    }

    let mut trips: Vec<(&String, &super::history::TripRec)> = h.trips.iter().collect();
    trips.sort_by(|a, b| a.0.cmp(b.0));
    let now = Instant::now();
    for (id, rec) in trips {
        if rec.short {
            let Some(due) = rec.due else { continue };
            if due + Duration::from_secs(3) > now {
                continue;
            }
            v.timers += 1;
            match read_trip(targets, id).await {
                Err(s) if s.code() == Code::NotFound => {}
                Ok(t) => v.lost(format!("trip {id}: due {:?} ago, still {}", now - due, t.state_name)),
                Err(s) => v.lost(format!("trip {id}: read failed: {} {}", s.code(), s.message())),
            }
            if let Some(seen) = h.expired.get(id)
                && let Some(n) = seen.values().max()
                && *n > 1
            {
                v.duplicated(format!("trip {id}: EXPIRED seen {n} times on one subscription"));
            }
            continue;
        }
        let (Some((state, driver)), false) = (&rec.state, rec.uncertain) else { continue };
        v.trips += 1;
        match read_trip(targets, id).await {
            Ok(t) if (&t.state_name, &t.driver_id) == (state, driver) => {}
            Ok(t) => v.lost(format!(
                "trip {id}: reads {} / {:?}, acknowledged {state} / {driver:?}",
                t.state_name, t.driver_id
            )),
            Err(s) => v.lost(format!(
                "trip {id}: read failed: {} {} (acknowledged {state} / {driver:?})",
                s.code(),
                s.message()
            )),
        }
    }

    let mut by_driver: HashMap<&str, Vec<&super::history::Hold>> = HashMap::new();
    for hold in &h.holds {
        by_driver.entry(hold.driver.as_str()).or_default().push(hold);
    }
    for (d, holds) in by_driver {
        for a in &holds {
            for b in &holds {
                if a.trip != b.trip && b.sent >= a.acked && b.acked <= a.until {
                    v.duplicated(format!("driver {d}: matched to {} while held by {}", b.trip, a.trip));
                }
            }
        }
    }
    v
}
