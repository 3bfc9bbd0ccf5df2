//! Drivers: validation of fixes, the per-driver state machine and its compact trail.
//!
//! Pure code. A [`DriverShard`] holds the state machines ("actors") of every driver that
//! hashes to one shard, plus that shard's geo index and expiry schedule; it is owned by
//! exactly one shard worker thread (see `actors`), which feeds it messages one at a time
//! with the current time and performs the effects it leaves behind (watcher
//! notifications, secondary-index changes, storage writes).

mod codec;
pub mod map;
mod shard;
mod trail;
mod validate;

pub use codec::{
    Record, Snapshot, SnapshotError, SnapshotRef, decode_records, encode_delete, encode_upsert, snapshot_ref,
};
pub use shard::{
    Claim, ClaimEnd, ClaimError, ClaimOk, DriverShard, Event, GoneReason, IndexKind, Lookup, NearbyQuery, PersistBatch,
    SessionChange, ShardConfig, ShardCounters, WithinQuery,
};
pub use trail::{Trail, TrailFix};
pub use validate::{FieldError, Limits, MAX_ID_BYTES, MAX_VEHICLE_TYPE_BYTES, check_range, check_str, validate_fix};

/// A driver's availability. The codes are the wire codes of `locus.v1.DriverStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Offline = 1,
    Available = 2,
    OnTrip = 3,
    /// Claimed by dispatch for a trip, waiting for the trip to confirm. Set by the server
    /// only (a fix cannot report it).
    Dispatched = 4,
}

impl Status {
    /// From the wire code; 0 (unspecified) and unknown codes give `None`.
    pub fn from_code(code: i32) -> Option<Status> {
        match code {
            1 => Some(Status::Offline),
            2 => Some(Status::Available),
            3 => Some(Status::OnTrip),
            4 => Some(Status::Dispatched),
            _ => None,
        }
    }

    /// The canonical name, as in `locus.v1.DriverStatus` and state-change events.
    pub fn name(self) -> &'static str {
        match self {
            Status::Offline => "OFFLINE",
            Status::Available => "AVAILABLE",
            Status::OnTrip => "ON_TRIP",
            Status::Dispatched => "DISPATCHED",
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }
}

/// How a UDP session (see `udp`) is recorded as a driver's `session`: this, then the
/// session id in 16 hex digits.
pub const UDP_SESSION_PREFIX: &str = "udp-";

/// One validated GPS fix with the attributes the app sent alongside it.
///
/// Empty `vehicle_type`, `cab_number` and `session` keep the driver's current values;
/// `trip_id` and `trip_cost` describe the current trip as of this fix (empty = none);
/// `status: None` keeps the current status (a new driver starts `Offline`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FixInput {
    pub driver_id: String,
    pub lat: f64,
    pub lon: f64,
    pub heading_deg: f64,
    pub speed_mps: f64,
    pub accuracy_m: f64,
    pub timestamp_ms: i64,
    pub status: Option<Status>,
    pub vehicle_type: String,
    pub cab_number: String,
    pub session: String,
    pub trip_id: String,
    pub trip_cost: f64,
}

/// The position part of a fix, as stored for a driver's last accepted fix (and, on a
/// trip, as the trip saw its driver).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub lat: f64,
    pub lon: f64,
    pub heading_deg: f64,
    pub speed_mps: f64,
    pub accuracy_m: f64,
    pub timestamp_ms: i64,
}

/// A read of one driver's state, detached from the shard.
#[derive(Clone, Debug, PartialEq)]
pub struct DriverView {
    pub driver_id: String,
    pub last: Position,
    pub status: Status,
    pub vehicle_type: String,
    pub cab_number: String,
    pub session: String,
    pub trip_id: String,
    pub trip_cost: f64,
    pub received_ms: i64,
    /// Oldest first, ending with `last`; empty unless asked for.
    pub trail: Vec<Position>,
}

/// One geo query result.
#[derive(Clone, Debug, PartialEq)]
pub struct NearbyHit {
    pub driver_id: String,
    pub pos: Position,
    pub distance_m: f64,
    pub status: Status,
    pub vehicle_type: String,
}

/// Why a fix was not applied.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Reject {
    #[error("{0}")]
    Invalid(#[from] FieldError),
    #[error("stale: fix at {got_ms} ms is not newer than the last accepted fix at {last_ms} ms")]
    Stale { got_ms: i64, last_ms: i64 },
    #[error("implausible_jump: {distance_m:.0} m in {dt_s:.3} s implies {speed_mps:.1} m/s (max {max_mps} m/s)")]
    ImplausibleJump { distance_m: f64, dt_s: f64, speed_mps: f64, max_mps: f64 },
    #[error("overloaded: the driver's shard mailbox is full, retry later")]
    Overloaded,
    #[error("unavailable: the owner is unreachable, changing or shutting down; retry")]
    Unavailable,
    #[error("unavailable: the driver's partition is being handed to another node; retry")]
    Moving,
}

impl Reject {
    /// Machine-readable reason name, also the metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::Invalid(_) => "invalid_argument",
            Reject::Stale { .. } => "stale",
            Reject::ImplausibleJump { .. } => "implausible_jump",
            Reject::Overloaded => "overloaded",
            Reject::Unavailable | Reject::Moving => "unavailable",
        }
    }
}

/// Every reject reason, in a fixed order (index = counter slot).
pub const REJECT_REASONS: [&str; 5] = ["invalid_argument", "stale", "implausible_jump", "overloaded", "unavailable"];
