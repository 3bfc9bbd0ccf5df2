//! Whether this node serves clients, and the standard surfaces that say so.
//!
//! [`Readiness`] is one value with one writer (the hand-off task: on the ring and no
//! partition incoming; shutdown clears it), read by `/readyz` and followed by the
//! `grpc.health.v1.Health` service ([`serve_health`]):
//!
//! - `""` (the whole server) and the client services (`Locations`, `Trips`, `Dispatch`,
//!   `Events`) are `SERVING` only while the node is ready: `NOT_SERVING` while it joins
//!   (partitions still incoming), leaves or drains. `Watch` streams every flip.
//! - `Cluster`, `Handoff` and `Internal` stay `SERVING` until shutdown: an operator asks
//!   a draining node about itself, and peers pull its partitions through them.
//!
//! [`reflection`] serves `grpc.reflection.v1` and `v1alpha` over every `locus.v1` file and
//! the health service, so `grpcurl list` / `describe` work against any node.

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The client-facing services whose health follows readiness (and `""`).
pub const CLIENT_SERVICES: [&str; 7] = [
    "",
    "locus.v1.Locations",
    "locus.v1.Sessions",
    "locus.v1.Trips",
    "locus.v1.Dispatch",
    "locus.v1.Events",
    "locus.v1.Fixes",
];
/// Services that serve until shutdown, readiness or not.
pub const NODE_SERVICES: [&str; 3] = ["locus.v1.Cluster", "locus.v1.Handoff", "locus.v1.Internal"];

/// Whether the node serves clients: on the ring, not leaving, nothing incoming.
#[derive(Debug)]
pub struct Readiness {
    tx: watch::Sender<bool>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self { tx: watch::channel(false).0 }
    }
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.tx.send_if_modified(|r| std::mem::replace(r, ready) != ready);
    }

    pub fn get(&self) -> bool {
        *self.tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

fn status(serving: bool) -> ServingStatus {
    if serving { ServingStatus::Serving } else { ServingStatus::NotServing }
}

/// The `grpc.health.v1.Health` service, kept in step with `ready` by a task that ends
/// when `stopping` turns true (everything is then `NOT_SERVING`).
pub fn serve_health(
    ready: &Readiness,
    mut stopping: watch::Receiver<bool>,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, server) = tonic_health::server::health_reporter();
    let mut ready = ready.subscribe();
    crate::tasks::spawn("health", async move {
        let set = |r: &HealthReporter, names: &'static [&'static str], serving: bool| {
            let r = r.clone();
            async move {
                for n in names {
                    r.set_service_status(n, status(serving)).await;
                }
            }
        };
        set(&reporter, &NODE_SERVICES, true).await;
        loop {
            let now = *ready.borrow_and_update();
            set(&reporter, &CLIENT_SERVICES, now).await;
            tokio::select! {
                r = ready.changed() => if r.is_err() { break },
                _ = stopping.wait_for(|s| *s) => break,
            }
        }
        set(&reporter, &CLIENT_SERVICES, false).await;
        set(&reporter, &NODE_SERVICES, false).await;
    });
    server
}

/// The reflection services (v1 and v1alpha) over `locus.v1` and `grpc.health.v1`.
pub fn reflection() -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
)> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_notifies_only_on_a_change() {
        let r = Readiness::default();
        let mut rx = r.subscribe();
        assert!(!r.get());
        r.set(false);
        assert!(!rx.has_changed().unwrap());
        r.set(true);
        assert!(rx.has_changed().unwrap());
        assert!(*rx.borrow_and_update());
        r.set(true);
        assert!(!rx.has_changed().unwrap());
    }
}
