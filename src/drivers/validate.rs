//! Stateless validation of one fix: everything that can be checked without the driver's
//! previous state. Stale and implausible fixes are judged by the shard (`shard.rs`).

use super::FixInput;

/// A malformed field: which one, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        FieldError { field, reason: reason.into() }
    }
}

/// Validation limits, from the node configuration.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How far ahead of the server clock a fix's timestamp may be.
    pub max_future_ms: i64,
}

pub const MAX_ID_BYTES: usize = 64;
pub const MAX_VEHICLE_TYPE_BYTES: usize = 32;
/// Speeds above this are not GPS readings of a road vehicle.
pub const MAX_REPORTED_SPEED_MPS: f64 = 1_000.0;
/// Accuracy radii above this are meaningless for tracking.
pub const MAX_ACCURACY_M: f64 = 100_000.0;

/// A string field: present if `required`, at most `max` bytes, no control characters.
pub fn check_str(field: &'static str, v: &str, required: bool, max: usize) -> Result<(), FieldError> {
    if required && v.is_empty() {
        return Err(FieldError::new(field, "required"));
    }
    if v.len() > max {
        return Err(FieldError::new(field, format!("{} bytes, at most {max} allowed", v.len())));
    }
    if v.chars().any(char::is_control) {
        return Err(FieldError::new(field, "contains control characters"));
    }
    Ok(())
}

/// A number field: finite and within `[lo, hi]`.
pub fn check_range(field: &'static str, v: f64, lo: f64, hi: f64) -> Result<(), FieldError> {
    if !v.is_finite() {
        return Err(FieldError::new(field, format!("must be a finite number, got {v}")));
    }
    if v < lo || v > hi {
        return Err(FieldError::new(field, format!("{v} is outside [{lo}, {hi}]")));
    }
    Ok(())
}

/// Checks one fix against `now_ms` (server wall clock).
pub fn validate_fix(f: &FixInput, now_ms: i64, limits: Limits) -> Result<(), FieldError> {
    check_str("driver_id", &f.driver_id, true, MAX_ID_BYTES)?;
    check_range("lat", f.lat, -90.0, 90.0)?;
    check_range("lon", f.lon, -180.0, 180.0)?;
    check_range("heading_deg", f.heading_deg, 0.0, 360.0)?;
    check_range("speed_mps", f.speed_mps, 0.0, MAX_REPORTED_SPEED_MPS)?;
    check_range("accuracy_m", f.accuracy_m, 0.0, MAX_ACCURACY_M)?;
    if f.timestamp_ms == 0 {
        return Err(FieldError::new("timestamp_ms", "required (device time of the fix, ms since the Unix epoch)"));
    }
    if f.timestamp_ms < 0 {
        return Err(FieldError::new("timestamp_ms", format!("{} is before the Unix epoch", f.timestamp_ms)));
    }
    if f.timestamp_ms > now_ms.saturating_add(limits.max_future_ms) {
        return Err(FieldError::new(
            "timestamp_ms",
            format!(
                "{} ms ahead of the server clock (at most {} ms allowed)",
                f.timestamp_ms - now_ms,
                limits.max_future_ms
            ),
        ));
    }
    check_str("vehicle_type", &f.vehicle_type, false, MAX_VEHICLE_TYPE_BYTES)?;
    check_str("cab_number", &f.cab_number, false, MAX_ID_BYTES)?;
    check_str("session", &f.session, false, MAX_ID_BYTES)?;
    check_str("trip_id", &f.trip_id, false, MAX_ID_BYTES)?;
    check_range("trip_cost", f.trip_cost, 0.0, 1e12)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;
    const L: Limits = Limits { max_future_ms: 30_000 };

    fn ok() -> FixInput {
        FixInput { driver_id: "d1".into(), lat: 1.0, lon: 2.0, timestamp_ms: NOW, ..Default::default() }
    }

    fn field_of(f: FixInput) -> &'static str {
        validate_fix(&f, NOW, L).unwrap_err().field
    }

    #[test]
    fn accepts_a_plain_fix() {
        assert_eq!(validate_fix(&ok(), NOW, L), Ok(()));
        assert_eq!(validate_fix(&FixInput { timestamp_ms: NOW + 30_000, ..ok() }, NOW, L), Ok(()));
    }

    #[test]
    fn names_the_bad_field() {
        assert_eq!(field_of(FixInput { driver_id: "".into(), ..ok() }), "driver_id");
        assert_eq!(field_of(FixInput { driver_id: "x".repeat(65), ..ok() }), "driver_id");
        assert_eq!(field_of(FixInput { lat: f64::NAN, ..ok() }), "lat");
        assert_eq!(field_of(FixInput { lat: 90.5, ..ok() }), "lat");
        assert_eq!(field_of(FixInput { lon: f64::INFINITY, ..ok() }), "lon");
        assert_eq!(field_of(FixInput { lon: -180.01, ..ok() }), "lon");
        assert_eq!(field_of(FixInput { heading_deg: -1.0, ..ok() }), "heading_deg");
        assert_eq!(field_of(FixInput { speed_mps: -0.1, ..ok() }), "speed_mps");
        assert_eq!(field_of(FixInput { accuracy_m: f64::NAN, ..ok() }), "accuracy_m");
        assert_eq!(field_of(FixInput { timestamp_ms: 0, ..ok() }), "timestamp_ms");
        assert_eq!(field_of(FixInput { timestamp_ms: -5, ..ok() }), "timestamp_ms");
        assert_eq!(field_of(FixInput { timestamp_ms: NOW + 30_001, ..ok() }), "timestamp_ms");
        assert_eq!(field_of(FixInput { vehicle_type: "v".repeat(33), ..ok() }), "vehicle_type");
        assert_eq!(field_of(FixInput { cab_number: "a\nb".into(), ..ok() }), "cab_number");
        assert_eq!(field_of(FixInput { trip_cost: -1.0, ..ok() }), "trip_cost");
    }
}
