//! The HTTP side of a node: `/healthz` (alive), `/readyz` (on the ring, not draining) and
//! `/metrics` (Prometheus text format).
//!
//! Owns no state of its own: it reads the readiness flag the node flips and renders the
//! process-wide metrics recorder.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// The process-wide Prometheus recorder (installed once; later calls reuse it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&[0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0])
                .expect("static buckets are valid")
                .install_recorder()
                .expect("install the metrics recorder once")
        })
        .clone()
}

#[derive(Clone)]
struct HttpState {
    ready: Arc<AtomicBool>,
    metrics: PrometheusHandle,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(s): State<HttpState>) -> String {
    s.metrics.render()
}

/// Binds the HTTP listener; the returned future serves until `shutdown` resolves.
pub fn serve(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = std::io::Result<()>> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(HttpState { ready, metrics: metrics_handle() });
    async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await }
}
