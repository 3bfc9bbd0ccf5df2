//! The node's state-change bus: canonical `StateChange` records of drivers and trips.
//!
//! Shard workers (driver status changes) and trip actors (trip transitions, "driver
//! near pickup", expiry) publish here; `Events.Subscribe` streams read it, filtered, and
//! one subscription merges every node's bus (see `api::trips`). Records carry ids,
//! canonical state names, a time and a position: no personal data. The protobuf form
//! is made in `api`, for subscribers only.
//!
//! A `tokio::sync::broadcast` channel: publishers never wait, and a subscriber that
//! falls more than the capacity behind is told it lagged (its stream ends) rather than
//! slowing anyone down.

use tokio::sync::broadcast;

use crate::clock::wall_ms;
use crate::drivers::Status;

/// What a state change is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entity {
    Driver,
    Trip,
}

/// One canonical state change: state names are the API's (`AVAILABLE`, `GONE`,
/// `PASSENGER_CARRY`, `EXPIRED`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct StateChange {
    pub entity: Entity,
    pub id: String,
    pub state: &'static str,
    /// Empty for a new entity.
    pub from_state: &'static str,
    pub timestamp_ms: i64,
    pub lat: f64,
    pub lon: f64,
}

/// Sender side of the bus; clone it freely.
pub type Bus = broadcast::Sender<StateChange>;

/// Records a subscriber may fall behind before its stream ends as lagged.
pub const BUS_CAPACITY: usize = 16_384;

pub fn bus() -> Bus {
    broadcast::channel(BUS_CAPACITY).0
}

/// A driver's status as seen by queries changed (`None`: it appeared or went away).
pub fn driver_change(id: &str, from: Option<Status>, to: Option<Status>, lat: f64, lon: f64) -> StateChange {
    StateChange {
        entity: Entity::Driver,
        id: id.to_string(),
        state: to.map_or("GONE", Status::name),
        from_state: from.map_or("", Status::name),
        timestamp_ms: wall_ms(),
        lat,
        lon,
    }
}

/// What a subscriber asked for.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `None`: drivers and trips.
    pub entity: Option<Entity>,
    /// Empty: every state.
    pub states: Vec<String>,
}

impl Filter {
    pub fn matches(&self, c: &StateChange) -> bool {
        self.entity.is_none_or(|e| e == c.entity)
            && (self.states.is_empty() || self.states.iter().any(|s| s == c.state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_by_entity_and_state() {
        let c = driver_change("d1", Some(Status::Available), Some(Status::Dispatched), 1.0, 2.0);
        assert_eq!((c.state, c.from_state), ("DISPATCHED", "AVAILABLE"));
        assert!(Filter::default().matches(&c));
        assert!(Filter { entity: Some(Entity::Driver), states: vec![] }.matches(&c));
        assert!(!Filter { entity: Some(Entity::Trip), states: vec![] }.matches(&c));
        assert!(Filter { entity: None, states: vec!["DISPATCHED".into()] }.matches(&c));
        assert!(!Filter { entity: None, states: vec!["AVAILABLE".into()] }.matches(&c));
        let gone = driver_change("d1", Some(Status::Available), None, 1.0, 2.0);
        assert_eq!(gone.state, "GONE");
    }
}
