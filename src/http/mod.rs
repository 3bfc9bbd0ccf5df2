//! The HTTP side of a node: `/healthz` (alive), `/readyz` (on the ring, not draining),
//! `/metrics` (Prometheus text format), and the public Share My Trip endpoints.
//!
//! - `GET /share/{token}`: the trip as JSON, `200` only from PASSENGER_CARRY until the
//!   trip expires, `404` otherwise (the same answer as for a token that never existed).
//!   The token names the trip's partition, so a node that does not own it forwards the
//!   request to the owner (one internal gRPC call, no scatter) and the owner answers from
//!   memory (`trips::share`).
//! - `GET /share/{token}/view`: a self-contained live page.
//! - `GET /map` and `GET /map/data`: the operator's live map ([`map`]), behind the
//!   `reader` role.
//!
//! Both are rate-limited per client address (behind `--trusted-proxies`, the address
//! their `X-Forwarded-For` names: [`proxies`]), and the JSON also per token, answering
//! `429`. Connections are bounded in number and in how slowly they may send headers;
//! no endpoint takes a body ([`serve`]). A malformed token costs one length/hex check and never reaches a map or a peer.

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

pub mod map;
pub mod proxies;

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
    /// Whose `X-Forwarded-For` names the client (`--trusted-proxies`).
    pub proxies: proxies::Trusted,
}

#[derive(Clone)]
pub(crate) struct HttpState {
    ready: Arc<crate::health::Readiness>,
    metrics: PrometheusHandle,
    share: Option<Arc<Share>>,
    map: Option<Arc<map::MapHttp>>,
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

fn client_key(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

/// The share endpoints' common gate: the client's budget, then a well-formed token.
/// Returns the share state and the token's partition, or the refusal to send.
fn admit(
    s: HttpState,
    addr: &SocketAddr,
    headers: &axum::http::HeaderMap,
    token: &str,
) -> Result<(Arc<Share>, usize), StatusCode> {
    let share = s.share.ok_or(StatusCode::NOT_FOUND)?;
    let xff: Vec<&str> = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
    let client = share.proxies.client(addr.ip(), &xff);
    if !share.per_client.allow(&client_key(client)) {
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
    headers: axum::http::HeaderMap,
    Path(token): Path<String>,
) -> Response {
    let (share, partition) = match admit(s, &addr, &headers, &token) {
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
    headers: axum::http::HeaderMap,
    Path(token): Path<String>,
) -> Response {
    if let Err(code) = admit(s, &addr, &headers, &token) {
        return refuse(code);
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")],
        VIEW_HTML,
    )
        .into_response()
}

/// What one client can hold of the HTTP side.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Open connections at once; one more is closed at once, unanswered.
    pub max_connections: usize,
    /// A request's headers must arrive within this long (also the idle time allowed
    /// between requests of a kept-alive connection).
    pub header_timeout: Duration,
}

/// No endpoint here takes a body: one announced is refused at once (413, and the
/// connection closed), so a slowly sent body can hold nothing open.
async fn no_bodies(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let h = req.headers();
    let has_body = h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        metrics::counter!("locus_http_refused_total", "reason" => "body").increment(1);
        return (StatusCode::PAYLOAD_TOO_LARGE, [(header::CONNECTION, "close")], "no endpoint here takes a body\n")
            .into_response();
    }
    next.run(req).await
}

/// Serves one connection (plain or TLS) until it ends or the server stops.
async fn serve_conn<I, S>(io: I, svc: S, limits: HttpLimits, mut stop: tokio::sync::watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as axum::body::HttpBody>::Data: Send,
    <S::ResBody as axum::body::HttpBody>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}

/// Serves HTTP/1.1 on `listener` until `shutdown` resolves: at most
/// `limits.max_connections` connections (the next is closed at once and counted in
/// `locus_http_refused_total{reason="connections"}`), each closed if a request's
/// headers take longer than `limits.header_timeout` (slowloris), no request bodies.
pub fn serve(
    listener: TcpListener,
    ready: Arc<crate::health::Readiness>,
    share: Option<Arc<Share>>,
    map: Option<Arc<map::MapHttp>>,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = std::io::Result<()>> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/share/{token}", get(share_json))
        .route("/share/{token}/view", get(share_view))
        .route("/map", get(map::page))
        .route("/map/data", get(map::data))
        .layer(axum::middleware::from_fn(no_bodies))
        .with_state(HttpState { ready, metrics: metrics_handle(), share, map });
    async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::pin!(shutdown);
        loop {
            let (sock, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, say: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting an HTTP connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                metrics::counter!("locus_http_refused_total", "reason" => "connections").increment(1);
                drop(sock);
                continue;
            };
            metrics::gauge!("locus_http_connections").increment(1.0);
            let svc =
                hyper_util::service::TowerToHyperService::new(app.clone().layer(axum::Extension(ConnectInfo(peer))));
            let stop = stop_rx.clone();
            let tls = tls.clone();
            crate::tasks::spawn("http_conn", async move {
                let _permit = permit;
                match tls {
                    None => serve_conn(sock, svc, limits, stop).await,
                    // The handshake is held to the header timeout too.
                    Some(a) => match tokio::time::timeout(limits.header_timeout, a.accept(sock)).await {
                        Ok(Ok(s)) => serve_conn(s, svc, limits, stop).await,
                        Ok(Err(_)) | Err(_) => {
                            metrics::counter!("locus_http_refused_total", "reason" => "tls_handshake").increment(1)
                        }
                    },
                }
                metrics::gauge!("locus_http_connections").decrement(1.0);
            });
        }
        let _ = stop_tx.send(true);
        Ok(())
    }
}
