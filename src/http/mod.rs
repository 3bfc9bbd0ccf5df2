//! The HTTP side of a node: `/healthz` (alive), `/readyz` (on the ring, not draining),
//! `/metrics` (Prometheus text format), and the public Share My Trip endpoints.
//!
//! - `GET /share/{token}`: the trip as JSON, `200` only from PASSENGER_CARRY until the
//!   trip expires, `404` otherwise (the same answer as for a token that never existed).
//!   The token names the trip's partition, so a node that does not own it forwards the
//!   request to the owner (one internal gRPC call, no scatter) and the owner answers from
//!   memory (`trips::share`).
//! - `GET /share/{token}/view`: a self-contained live page.
//!
//! Both are rate-limited per client address, and the JSON also per token, answering
//! `429`. A malformed token costs one length/hex check and never reaches a map or a peer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::clock::wall_ms;
use crate::pb;
use crate::routing::cluster::{Cluster, Owner};
use crate::trips::Trips;
use crate::trips::share::{RateLimiter, VIEW_HTML, token_partition};

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

/// What the share endpoints need.
pub struct Share {
    pub trips: Arc<Trips>,
    pub cluster: Arc<Cluster>,
    pub per_client: RateLimiter,
    pub per_token: RateLimiter,
}

#[derive(Clone)]
struct HttpState {
    ready: Arc<crate::health::Readiness>,
    metrics: PrometheusHandle,
    share: Option<Arc<Share>>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, &'static str) {
    if s.ready.get() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

async fn metrics(State(s): State<HttpState>) -> String {
    s.metrics.render()
}

fn plain(code: StatusCode, msg: &'static str) -> Response {
    let counter = match code {
        StatusCode::OK => "200",
        StatusCode::NOT_FOUND => "404",
        StatusCode::TOO_MANY_REQUESTS => "429",
        _ => "other",
    };
    metrics::counter!("locus_share_requests_total", "code" => counter).increment(1);
    (code, [(header::CACHE_CONTROL, "no-store")], msg).into_response()
}

fn not_found() -> Response {
    plain(StatusCode::NOT_FOUND, "not found\n")
}

fn client_key(addr: &SocketAddr) -> Vec<u8> {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

/// The share endpoints' common gate: the client's budget, then a well-formed token.
/// Returns the share state and the token's partition, or the refusal to send.
fn admit(s: HttpState, addr: &SocketAddr, token: &str) -> Result<(Arc<Share>, usize), StatusCode> {
    let share = s.share.ok_or(StatusCode::NOT_FOUND)?;
    if !share.per_client.allow(&client_key(addr)) {
        return Err(StatusCode::TOO_MANY_REQUESTS);
    }
    let partition = token_partition(token).ok_or(StatusCode::NOT_FOUND)?;
    Ok((share, partition))
}

fn refuse(code: StatusCode) -> Response {
    match code {
        StatusCode::TOO_MANY_REQUESTS => plain(code, "too many requests\n"),
        _ => not_found(),
    }
}

async fn share_json(
    State(s): State<HttpState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
) -> Response {
    let (share, partition) = match admit(s, &addr, &token) {
        Ok(v) => v,
        Err(code) => return refuse(code),
    };
    if !share.per_token.allow(token.as_bytes()) {
        return refuse(StatusCode::TOO_MANY_REQUESTS);
    }
    let mut owner = share.cluster.partition_owner(partition);
    if matches!(owner, Owner::Incoming | Owner::Unknown) {
        owner = share.cluster.settled(partition, crate::routing::cluster::INCOMING_WAIT).await;
    }
    let json: Option<Bytes> = match owner {
        Owner::Local => share.trips.shares.get(&token, wall_ms()),
        Owner::Remote(p) => {
            let mut c = pb::internal_client::InternalClient::new(p.channel.clone());
            let mut r = tonic::Request::new(pb::ShareRequest { token });
            r.set_timeout(Duration::from_secs(1));
            match c.share(r).await {
                Ok(a) => {
                    let a = a.into_inner();
                    (a.http_status == 200).then(|| Bytes::from(a.json))
                }
                Err(_) => return plain(StatusCode::SERVICE_UNAVAILABLE, "the trip's node did not answer; retry\n"),
            }
        }
        Owner::Unknown => return plain(StatusCode::SERVICE_UNAVAILABLE, "the cluster is forming; retry\n"),
        Owner::Incoming => return plain(StatusCode::SERVICE_UNAVAILABLE, "the trip is moving between nodes; retry\n"),
    };
    match json {
        Some(body) => {
            metrics::counter!("locus_share_requests_total", "code" => "200").increment(1);
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body)
                .into_response()
        }
        None => not_found(),
    }
}

async fn share_view(
    State(s): State<HttpState>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
) -> Response {
    if let Err(code) = admit(s, &addr, &token) {
        return refuse(code);
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
        VIEW_HTML,
    )
        .into_response()
}

/// Binds the HTTP listener; the returned future serves until `shutdown` resolves.
pub fn serve(
    listener: TcpListener,
    ready: Arc<crate::health::Readiness>,
    share: Option<Arc<Share>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = std::io::Result<()>> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/share/{token}", get(share_json))
        .route("/share/{token}/view", get(share_view))
        .with_state(HttpState { ready, metrics: metrics_handle(), share });
    async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown)
            .await
    }
}
