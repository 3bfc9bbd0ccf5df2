//! The gRPC API (`locus.v1.Locations`): validates input, converts protobuf to domain
//! types, calls the [`Router`], and maps every error to a `tonic::Status` in one place
//! ([`reject_status`], [`route_status`]).
//!
//! Stateless checks (ranges, lengths, clock skew) happen here, at the entry node; stale
//! and implausible fixes are judged by the driver's actor, which knows its last fix.

mod admin;
mod follow;
mod handoff;
pub mod history;
pub(crate) mod locations;
mod sessions;
mod stream;
mod trips;

use std::time::Duration;

use tokio::sync::watch;
use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::drivers::{
    DriverView, FieldError, FixInput, Limits, MAX_ID_BYTES, MAX_VEHICLE_TYPE_BYTES, NearbyHit, NearbyQuery, Position,
    REJECT_REASONS, Reject, Status as DStatus, WithinQuery, check_range, check_str, validate_fix,
};
use crate::geo::LatLonBox;
use crate::pb;
use crate::routing::{DriverKey, RouteError};
pub use admin::ClusterApi;
pub use handoff::{GrpcPeerLink, HandoffApi};
pub use history::FixesApi;
pub use locations::LocationsApi;
pub use sessions::SessionsApi;
pub use trips::{
    ClaimForwarder, DispatchApi, EventsApi, InternalApi, NearbyCandidates, TripsApi, UdpForwarder, run_feed, trip_event,
};

/// Most fixes one `LocationBatch` may carry.
pub const MAX_BATCH: usize = 10_000;
/// Most results a Nearby query may ask for.
pub const MAX_NEARBY: u32 = 1_000;
/// Most results a Within query may ask for, and its default.
pub const MAX_WITHIN: u32 = 10_000;
pub const DEFAULT_WITHIN: u32 = 1_000;
/// Metadata key carrying the machine-readable reason of a rejection or a stream's end.
pub const REASON_KEY: &str = "locus-reject-reason";
pub const END_KEY: &str = "locus-end-reason";

pub(crate) fn with_meta(mut s: Status, key: &'static str, value: &'static str) -> Status {
    s.metadata_mut().insert(key, MetadataValue::from_static(value));
    s
}

pub(crate) fn invalid(e: &FieldError) -> Status {
    with_meta(Status::invalid_argument(e.to_string()), REASON_KEY, "invalid_argument")
}

/// The status of a rejected unary fix.
pub fn reject_status(r: &Reject) -> Status {
    let s = match r {
        Reject::Invalid(e) => return invalid(e),
        Reject::Stale { .. } | Reject::ImplausibleJump { .. } => Status::failed_precondition(r.to_string()),
        Reject::Overloaded => Status::resource_exhausted(r.to_string()),
        Reject::Unavailable | Reject::Moving => Status::unavailable(r.to_string()),
    };
    with_meta(s, REASON_KEY, r.reason())
}

/// The status of a routing failure.
pub fn route_status(e: RouteError) -> Status {
    match e {
        RouteError::NotFound => Status::not_found(e.to_string()),
        RouteError::Overloaded => with_meta(Status::resource_exhausted(e.to_string()), REASON_KEY, "overloaded"),
        RouteError::Unavailable => Status::unavailable(e.to_string()),
    }
}

fn reject_proto(index: u32, r: &Reject) -> pb::Rejection {
    let (reason, field, detail) = match r {
        Reject::Invalid(e) => (pb::RejectReason::InvalidArgument, e.field.to_string(), e.reason.clone()),
        Reject::Stale { .. } => (pb::RejectReason::Stale, String::new(), r.to_string()),
        Reject::ImplausibleJump { .. } => (pb::RejectReason::ImplausibleJump, String::new(), r.to_string()),
        Reject::Overloaded => (pb::RejectReason::Overloaded, String::new(), r.to_string()),
        Reject::Unavailable | Reject::Moving => (pb::RejectReason::Unavailable, String::new(), r.to_string()),
    };
    pb::Rejection { index, reason: reason as i32, reason_name: r.reason().to_string(), field, detail }
}

fn status_from_proto(code: i32, field: &'static str) -> Result<Option<DStatus>, FieldError> {
    match code {
        0 => Ok(None),
        c => DStatus::from_code(c).map(Some).ok_or_else(|| FieldError::new(field, format!("unknown status {c}"))),
    }
}

fn status_to_proto(s: DStatus) -> i32 {
    s.code() as i32
}

/// Converts and validates one fix (stateless checks only).
pub fn fix_from_proto(u: pb::LocationUpdate, now_ms: i64, limits: Limits) -> Result<FixInput, FieldError> {
    let status = status_from_proto(u.status, "status")?;
    if status == Some(DStatus::Dispatched) {
        return Err(FieldError::new("status", "DISPATCHED is set by dispatch, not reported by a fix"));
    }
    let fix = FixInput {
        status,
        driver_id: u.driver_id,
        lat: u.lat,
        lon: u.lon,
        heading_deg: u.heading_deg,
        speed_mps: u.speed_mps,
        accuracy_m: u.accuracy_m,
        timestamp_ms: u.timestamp_ms,
        vehicle_type: u.vehicle_type,
        cab_number: u.cab_number,
        session: u.session,
        trip_id: u.trip_id,
        trip_cost: u.trip_cost,
    };
    validate_fix(&fix, now_ms, limits)?;
    Ok(fix)
}

/// A validated fix back as protobuf, to forward it to its owner (moves, no copies).
pub fn fix_to_proto(f: FixInput) -> pb::LocationUpdate {
    pb::LocationUpdate {
        driver_id: f.driver_id,
        lat: f.lat,
        lon: f.lon,
        heading_deg: f.heading_deg,
        speed_mps: f.speed_mps,
        accuracy_m: f.accuracy_m,
        timestamp_ms: f.timestamp_ms,
        status: f.status.map_or(0, status_to_proto),
        vehicle_type: f.vehicle_type,
        cab_number: f.cab_number,
        session: f.session,
        trip_id: f.trip_id,
        trip_cost: f.trip_cost,
    }
}

/// Longest scatter deadline a request may ask for.
pub const MAX_DEADLINE_MS: u32 = 10_000;

/// A query's scatter deadline: the request's, validated, or the node's default.
pub fn scatter_deadline(ms: Option<u32>, default: Duration) -> Result<Duration, FieldError> {
    match ms {
        None => Ok(default),
        Some(d) if d == 0 || d > MAX_DEADLINE_MS => {
            Err(FieldError::new("deadline_ms", format!("{d} is outside 1..={MAX_DEADLINE_MS}")))
        }
        Some(d) => Ok(Duration::from_millis(d as u64)),
    }
}

/// A position sent between nodes (a trip's driver fix) back from protobuf.
pub fn position_from_proto(f: &pb::Fix) -> Position {
    Position {
        lat: f.lat,
        lon: f.lon,
        heading_deg: f.heading_deg,
        speed_mps: f.speed_mps,
        accuracy_m: f.accuracy_m,
        timestamp_ms: f.timestamp_ms,
    }
}

pub fn fix_proto(p: &Position) -> pb::Fix {
    pb::Fix {
        lat: p.lat,
        lon: p.lon,
        heading_deg: p.heading_deg,
        speed_mps: p.speed_mps,
        accuracy_m: p.accuracy_m,
        timestamp_ms: p.timestamp_ms,
    }
}

/// A domain driver as its protobuf message.
pub fn driver_proto(v: DriverView) -> pb::Driver {
    pb::Driver {
        trail: v.trail.iter().map(fix_proto).collect(),
        driver_id: v.driver_id,
        lat: v.last.lat,
        lon: v.last.lon,
        heading_deg: v.last.heading_deg,
        speed_mps: v.last.speed_mps,
        accuracy_m: v.last.accuracy_m,
        timestamp_ms: v.last.timestamp_ms,
        status: status_to_proto(v.status),
        vehicle_type: v.vehicle_type,
        cab_number: v.cab_number,
        session: v.session,
        trip_id: v.trip_id,
        trip_cost: v.trip_cost,
        received_ms: v.received_ms,
    }
}

fn hit_proto(h: NearbyHit) -> pb::NearbyHit {
    pb::NearbyHit {
        driver_id: h.driver_id,
        lat: h.pos.lat,
        lon: h.pos.lon,
        distance_m: h.distance_m,
        status: status_to_proto(h.status),
        vehicle_type: h.vehicle_type,
        timestamp_ms: h.pos.timestamp_ms,
        heading_deg: h.pos.heading_deg,
        speed_mps: h.pos.speed_mps,
    }
}

pub(crate) fn check_key_str(field: &'static str, v: &str) -> Result<(), FieldError> {
    check_str(field, v, true, MAX_ID_BYTES)
}

pub(crate) fn check_coord(lat_f: &'static str, lat: f64, lon_f: &'static str, lon: f64) -> Result<(), FieldError> {
    check_range(lat_f, lat, -90.0, 90.0)?;
    check_range(lon_f, lon, -180.0, 180.0)
}

fn check_radius(field: &'static str, r: f64) -> Result<(), FieldError> {
    if !r.is_finite() || r <= 0.0 {
        return Err(FieldError::new(field, format!("{r} must be a positive number of metres")));
    }
    Ok(())
}

fn status_mask(statuses: &[i32]) -> Result<u32, FieldError> {
    if statuses.is_empty() {
        return Ok(u32::MAX);
    }
    let mut mask = 0u32;
    for &c in statuses {
        let s = status_from_proto(c, "statuses")?
            .ok_or_else(|| FieldError::new("statuses", "DRIVER_STATUS_UNSPECIFIED is not a filter"))?;
        mask |= 1 << s.code();
    }
    Ok(mask)
}

fn vehicle_filter(v: String) -> Result<Option<String>, FieldError> {
    check_str("vehicle_type", &v, false, MAX_VEHICLE_TYPE_BYTES)?;
    Ok((!v.is_empty()).then_some(v))
}

fn driver_key(key: Option<KeyOneof>) -> Result<DriverKey, FieldError> {
    match key {
        None => Err(FieldError::new("key", "one of driver_id, cab_number or session is required")),
        Some(KeyOneof::DriverId(v)) => check_key_str("driver_id", &v).map(|_| DriverKey::Id(v)),
        Some(KeyOneof::CabNumber(v)) => check_key_str("cab_number", &v).map(|_| DriverKey::Cab(v)),
        Some(KeyOneof::Session(v)) => check_key_str("session", &v).map(|_| DriverKey::Session(v)),
    }
}

/// The `key` oneof of GetDriver and RemoveDriver.
enum KeyOneof {
    DriverId(String),
    CabNumber(String),
    Session(String),
}

impl From<pb::get_driver_request::Key> for KeyOneof {
    fn from(k: pb::get_driver_request::Key) -> Self {
        use pb::get_driver_request::Key;
        match k {
            Key::DriverId(v) => KeyOneof::DriverId(v),
            Key::CabNumber(v) => KeyOneof::CabNumber(v),
            Key::Session(v) => KeyOneof::Session(v),
        }
    }
}

impl From<pb::remove_driver_request::Key> for KeyOneof {
    fn from(k: pb::remove_driver_request::Key) -> Self {
        use pb::remove_driver_request::Key;
        match k {
            Key::DriverId(v) => KeyOneof::DriverId(v),
            Key::CabNumber(v) => KeyOneof::CabNumber(v),
            Key::Session(v) => KeyOneof::Session(v),
        }
    }
}

/// Converts and validates a Nearby request.
pub fn nearby_query(r: pb::NearbyRequest) -> Result<NearbyQuery, FieldError> {
    check_coord("lat", r.lat, "lon", r.lon)?;
    if r.limit == 0 || r.limit > MAX_NEARBY {
        return Err(FieldError::new("limit", format!("{} is outside 1..={MAX_NEARBY}", r.limit)));
    }
    if let Some(rad) = r.radius_m {
        check_radius("radius_m", rad)?;
    }
    Ok(NearbyQuery {
        lat: r.lat,
        lon: r.lon,
        limit: r.limit as usize,
        radius_m: r.radius_m,
        statuses: status_mask(&r.statuses)?,
        vehicle_type: vehicle_filter(r.vehicle_type)?,
    })
}

/// Converts and validates a Within request.
pub fn within_query(r: pb::WithinRequest) -> Result<WithinQuery, FieldError> {
    let limit = match r.limit {
        0 => DEFAULT_WITHIN,
        l if l > MAX_WITHIN => return Err(FieldError::new("limit", format!("{l} is above {MAX_WITHIN}"))),
        l => l,
    } as usize;
    let statuses = status_mask(&r.statuses)?;
    let vehicle_type = vehicle_filter(r.vehicle_type)?;
    match r.area {
        None => Err(FieldError::new("area", "a circle or a box is required")),
        Some(pb::within_request::Area::Circle(c)) => {
            check_coord("circle.lat", c.lat, "circle.lon", c.lon)?;
            check_radius("circle.radius_m", c.radius_m)?;
            Ok(WithinQuery::Circle { lat: c.lat, lon: c.lon, radius_m: c.radius_m, limit, statuses, vehicle_type })
        }
        Some(pb::within_request::Area::Box(b)) => {
            check_coord("box.min_lat", b.min_lat, "box.min_lon", b.min_lon)?;
            check_coord("box.max_lat", b.max_lat, "box.max_lon", b.max_lon)?;
            if b.min_lat > b.max_lat {
                return Err(FieldError::new("box.min_lat", format!("{} is above max_lat {}", b.min_lat, b.max_lat)));
            }
            let b = LatLonBox { min_lat: b.min_lat, min_lon: b.min_lon, max_lat: b.max_lat, max_lon: b.max_lon };
            Ok(WithinQuery::Box { b, limit, statuses, vehicle_type })
        }
    }
}

/// Resolves once the node starts shutting down.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

pub(crate) fn count_rejects(rejected: &[(u32, Reject)]) {
    let mut counts = [0u64; REJECT_REASONS.len()];
    for (_, r) in rejected {
        let i = REJECT_REASONS.iter().position(|n| *n == r.reason()).unwrap_or(0);
        counts[i] += 1;
    }
    for (i, n) in counts.into_iter().enumerate() {
        // Stale and implausible fixes are counted by their shard.
        if n > 0 && !matches!(REJECT_REASONS[i], "stale" | "implausible_jump") {
            metrics::counter!("locus_fixes_rejected_total", "reason" => REJECT_REASONS[i]).increment(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearby_validation_names_fields() {
        let ok = pb::NearbyRequest { lat: 1.0, lon: 2.0, limit: 10, ..Default::default() };
        assert!(nearby_query(ok.clone()).is_ok());
        let f = |r: pb::NearbyRequest| nearby_query(r).unwrap_err().field;
        assert_eq!(f(pb::NearbyRequest { limit: 0, ..ok.clone() }), "limit");
        assert_eq!(f(pb::NearbyRequest { limit: 1001, ..ok.clone() }), "limit");
        assert_eq!(f(pb::NearbyRequest { lat: f64::NAN, ..ok.clone() }), "lat");
        assert_eq!(f(pb::NearbyRequest { lon: 181.0, ..ok.clone() }), "lon");
        assert_eq!(f(pb::NearbyRequest { radius_m: Some(-1.0), ..ok.clone() }), "radius_m");
        assert_eq!(f(pb::NearbyRequest { statuses: vec![9], ..ok.clone() }), "statuses");
        assert_eq!(f(pb::NearbyRequest { statuses: vec![0], ..ok.clone() }), "statuses");
        let q = nearby_query(pb::NearbyRequest { statuses: vec![2, 3], ..ok }).unwrap();
        assert_eq!(q.statuses, (1 << 2) | (1 << 3));
    }

    #[test]
    fn within_validation_names_fields() {
        let f = |r: pb::WithinRequest| within_query(r).unwrap_err().field;
        assert_eq!(f(pb::WithinRequest::default()), "area");
        let circle = |radius_m| Some(pb::within_request::Area::Circle(pb::Circle { lat: 0.0, lon: 0.0, radius_m }));
        assert_eq!(f(pb::WithinRequest { area: circle(0.0), ..Default::default() }), "circle.radius_m");
        assert_eq!(f(pb::WithinRequest { area: circle(5.0), limit: 10_001, ..Default::default() }), "limit");
        let bx = |min_lat, max_lat| {
            Some(pb::within_request::Area::Box(pb::Box { min_lat, min_lon: 170.0, max_lat, max_lon: -170.0 }))
        };
        assert_eq!(f(pb::WithinRequest { area: bx(10.0, -10.0), ..Default::default() }), "box.min_lat");
        assert!(within_query(pb::WithinRequest { area: bx(-10.0, 10.0), ..Default::default() }).is_ok());
    }
}
