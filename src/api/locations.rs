//! The `locus.v1.Locations` service on a node of the cluster.
//!
//! Keyed RPCs run on the key's owner: here through the local [`Router`], or forwarded to
//! the owner over gRPC with the hop marked ([`crate::routing::cluster`]). Geo queries and
//! lookups by cab number or session scatter to every node of the ring with a deadline and
//! merge; a node that does not answer in time is named and the answer is `partial`.
//! `UpdateStream` lives in [`super::stream`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::layer::AuthChannel;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::follow::{Opening, Resume, follow};
use super::{
    END_KEY, check_key_str, count_rejects, driver_key, driver_proto, fix_from_proto, fix_to_proto, hit_proto, invalid,
    nearby_query, reject_status, route_status, scatter_deadline, with_meta, within_query,
};
use crate::actors::WatchEnd;
use crate::clock::wall_ms;
use crate::drivers::{Limits, NearbyHit, Reject};
use crate::pb;
use crate::pb::locations_client::LocationsClient;
use crate::routing::cluster::{
    Cluster, MAX_HOPS, Owner, Peer, RETRY_AFTER_MS, RETRY_KEY, hops, is_local_scope, set_hop, set_local_scope,
};
use crate::routing::{DriverKey, RouteError, Router};

/// The `locus.v1.Locations` service.
#[derive(Clone)]
pub struct LocationsApi {
    pub(super) router: Arc<Router>,
    pub(super) cluster: Arc<Cluster>,
    pub(super) limits: Limits,
    watch_queue: usize,
    pub(super) shutdown: watch::Receiver<bool>,
    /// Watches clients hold open on this node (`--max-watches`, shared with trips).
    watches: Arc<crate::limits::Slots>,
    /// Every accepted fix (`GetHistory`); `None` with `--history-retention 0`.
    history: Option<Arc<crate::history::HistoryStore>>,
}

impl LocationsApi {
    /// Counts client watches against `slots`.
    pub fn with_watch_slots(mut self, slots: Arc<crate::limits::Slots>) -> Self {
        self.watches = slots;
        self
    }

    /// Answers `GetHistory` from `history`.
    pub fn with_history(mut self, history: Option<Arc<crate::history::HistoryStore>>) -> Self {
        self.history = history;
        self
    }

    pub fn new(
        router: Arc<Router>,
        cluster: Arc<Cluster>,
        limits: Limits,
        watch_queue: usize,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let watches = crate::limits::Slots::new("watches", "--max-watches", usize::MAX);
        LocationsApi { router, cluster, limits, watch_queue, shutdown, watches, history: None }
    }
}

/// `UNAVAILABLE` with a retry hint: the ring is changing or the owner is unknown.
pub(crate) fn unavailable_retry(msg: impl Into<String>) -> Status {
    let mut s = Status::unavailable(msg);
    s.metadata_mut().insert(RETRY_KEY, RETRY_AFTER_MS.into());
    s
}

/// Where a keyed request goes: here, or a peer with the hop count to send.
pub(crate) enum Target {
    Local,
    Forward(Box<Peer>, u32),
}

pub(crate) use crate::routing::cluster::INCOMING_WAIT;

/// Decides where a keyed request with `hop` forwards so far runs. A request for a
/// partition this node is taking over waits (at most [`INCOMING_WAIT`]) for it.
pub(crate) async fn target(cluster: &Cluster, key: &str, hop: u32) -> Result<Target, Status> {
    let mut owner = cluster.owner(key.as_bytes());
    if matches!(owner, Owner::Incoming | Owner::Unknown) {
        owner = cluster.settled(crate::keys::partition_of(key.as_bytes()) as usize, INCOMING_WAIT).await;
    }
    match owner {
        Owner::Local if !cluster.has_quorum() => Err(unavailable_retry(
            "no_quorum: this node cannot see a majority of the cluster (cut off or just resumed); \
             it serves nothing until it does; retry through another node",
        )),
        Owner::Local => Ok(Target::Local),
        Owner::Remote(p) if hop < MAX_HOPS => Ok(Target::Forward(p, hop + 1)),
        Owner::Remote(p) => Err(unavailable_retry(format!(
            "the owner of {key:?} is {} by this node's ring, but the request was already forwarded {hop} times; \
             the ring is changing",
            p.name
        ))),
        Owner::Unknown => Err(unavailable_retry("no active node owns this key yet (the cluster is forming)")),
        Owner::Incoming => Err(unavailable_retry("this key's partition is moving to this node; retry")),
    }
}

/// How long a call forwarded to a key's owner may wait for its answer (a watch: for
/// its first response). An owner that is stuck (stopped, overloaded, cut off mid-call)
/// but not yet declared down would otherwise hold the caller until the connection's
/// keep-alive gives up, or for good; past this the caller gets `UNAVAILABLE` with a
/// retry hint, and a retry after failure detection reaches the new owner.
pub(crate) const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn forwarded<T>(msg: T, hop: u32) -> Request<T> {
    let mut r = Request::new(msg);
    set_hop(r.metadata_mut(), hop);
    r.set_timeout(FORWARD_TIMEOUT);
    r
}

/// A forwarded call to the owner named `owner`: its answer, its error (marked with the
/// owner; failures to answer become `UNAVAILABLE`), or `UNAVAILABLE` after
/// [`FORWARD_TIMEOUT`].
pub(crate) async fn forward<T>(
    owner: &str,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    match tokio::time::timeout(FORWARD_TIMEOUT, call).await {
        Ok(r) => r.map_err(|s| peer_error(owner, s)),
        Err(_) => Err(unavailable_retry(format!("owner {owner} did not answer within {FORWARD_TIMEOUT:?}"))),
    }
}

/// A peer's error, as this node answers it: its code and message, marked with the peer.
fn peer_error(owner: &str, s: Status) -> Status {
    match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Internal | Code::Cancelled => {
            unavailable_retry(format!("owner {owner} did not answer: {}", s.message()))
        }
        _ => s,
    }
}

pub(super) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One scatter part's answer: the response, or the name of the node that did not answer.
type Part<R> = Result<R, String>;

/// Sends `req` (marked local-scope) to every peer, in parallel, each bounded by
/// `deadline`; an unknown peer address counts as missing.
async fn scatter<Req, Resp, F, Fut>(
    peers: Vec<Result<Peer, String>>,
    req: Req,
    deadline: Duration,
    call: F,
) -> Vec<Part<Resp>>
where
    Req: Clone + Send + 'static,
    Resp: Send + 'static,
    F: Fn(LocationsClient<AuthChannel>, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>> + Send + 'static,
{
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(peers.len());
    for p in peers {
        let p = match p {
            Ok(p) => p,
            Err(name) => {
                out.push(Err(name));
                continue;
            }
        };
        let mut r = Request::new(req.clone());
        set_local_scope(r.metadata_mut());
        set_hop(r.metadata_mut(), 1);
        r.set_timeout(deadline);
        let fut = call(p.client.clone(), r);
        let name = p.name.clone();
        set.spawn(async move {
            let t0 = tokio::time::Instant::now();
            match tokio::time::timeout(deadline, fut).await {
                Ok(Ok(resp)) => {
                    // Which node slows a query down (an SRE's first question, and the
                    // moves benchmark's breakdown).
                    metrics::histogram!("locus_scatter_part_seconds", "peer" => name)
                        .record(t0.elapsed().as_secs_f64());
                    Ok(resp.into_inner())
                }
                Ok(Err(s)) => {
                    tracing::debug!(peer = %name, error = %s, "scatter part failed");
                    Err((name, s))
                }
                Err(_) => Err((name, Status::deadline_exceeded("scatter deadline"))),
            }
        });
    }
    while let Some(r) = set.join_next().await {
        out.push(match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err((name, s))) => {
                metrics::counter!("locus_scatter_missing_total", "code" => code_name(s.code())).increment(1);
                Err(name)
            }
            Err(_) => Err("unknown".to_string()),
        });
    }
    out
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::Unavailable => "unavailable",
        Code::ResourceExhausted => "resource_exhausted",
        _ => "other",
    }
}

fn by_distance(a: &pb::NearbyHit, b: &pb::NearbyHit) -> std::cmp::Ordering {
    a.distance_m.total_cmp(&b.distance_m).then_with(|| a.driver_id.cmp(&b.driver_id))
}

/// A merged geo answer.
struct Gathered {
    drivers: Vec<pb::NearbyHit>,
    truncated: bool,
    missing_nodes: Vec<String>,
}

/// Merges this node's hits and every peer's (hits, truncated) into the global `limit`
/// nearest, naming the peers that did not answer.
fn gather(
    here: Option<(Vec<NearbyHit>, bool)>,
    remote: impl Iterator<Item = Part<(Vec<pb::NearbyHit>, bool)>>,
    limit: usize,
) -> Gathered {
    let (hits, mut truncated) = here.unwrap_or_default();
    let mut drivers: Vec<pb::NearbyHit> = hits.into_iter().map(hit_proto).collect();
    let mut missing_nodes = Vec::new();
    for part in remote {
        match part {
            Ok((hits, t)) => {
                truncated |= t;
                drivers.extend(hits);
            }
            Err(name) => missing_nodes.push(name),
        }
    }
    drivers.sort_by(by_distance);
    // A driver moving between nodes may be answered by both: keep its newest position.
    if drivers.len() > 1 {
        let mut newest: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
        for d in &drivers {
            let e = newest.entry(d.driver_id.clone()).or_insert(d.timestamp_ms);
            *e = (*e).max(d.timestamp_ms);
        }
        if newest.len() < drivers.len() {
            drivers
                .retain(|d| newest.get(&d.driver_id) == Some(&d.timestamp_ms) && newest.remove(&d.driver_id).is_some());
        }
    }
    truncated |= drivers.len() > limit;
    drivers.truncate(limit);
    missing_nodes.sort();
    Gathered { drivers, truncated, missing_nodes }
}

impl LocationsApi {
    /// The local part of a lookup by cab number or session, then every other node's;
    /// the most recently heard-from driver wins.
    async fn find_by_secondary(&self, key: DriverKey, include_trail: bool) -> Result<pb::Driver, Status> {
        let (local, peers) = self.cluster.scatter_targets();
        let req = match &key {
            DriverKey::Cab(c) => {
                pb::GetDriverRequest { key: Some(pb::get_driver_request::Key::CabNumber(c.clone())), include_trail }
            }
            DriverKey::Session(s) => {
                pb::GetDriverRequest { key: Some(pb::get_driver_request::Key::Session(s.clone())), include_trail }
            }
            DriverKey::Id(_) => unreachable!("ids are routed, not scattered"),
        };
        let deadline = self.cluster.scatter_timeout;
        let remote = scatter(peers, req, deadline, |mut c, r| async move { c.get_driver(r).await });
        let here = async { if local { Some(self.router.get(key.clone(), include_trail).await) } else { None } };
        let (here, remote) = tokio::join!(here, remote);
        let mut best: Option<pb::Driver> = None;
        let mut missing = Vec::new();
        let mut consider = |d: pb::Driver| {
            if best.as_ref().is_none_or(|b| d.received_ms > b.received_ms) {
                best = Some(d);
            }
        };
        match here {
            Some(Ok(v)) => consider(driver_proto(v)),
            Some(Err(RouteError::NotFound)) | None => {}
            Some(Err(e)) => return Err(route_status(e)),
        }
        for part in remote {
            match part {
                Ok(d) => consider(d),
                Err(name) => missing.push(name),
            }
        }
        // A peer's NOT_FOUND is an answer, not a missing node.
        match best {
            Some(d) => Ok(d),
            None if missing.is_empty() => Err(route_status(RouteError::NotFound)),
            None => {
                Err(unavailable_retry(format!("not found on the nodes that answered; missing: {}", missing.join(", "))))
            }
        }
    }
}

#[tonic::async_trait]
impl pb::locations_server::Locations for LocationsApi {
    async fn update(&self, req: Request<pb::LocationUpdate>) -> Result<Response<pb::UpdateAck>, Status> {
        let hop = hops(req.metadata());
        let fix = fix_from_proto(req.into_inner(), wall_ms(), self.limits).map_err(|e| {
            count_rejects(&[(0, Reject::Invalid(e.clone()))]);
            invalid(&e)
        })?;
        match target(&self.cluster, &fix.driver_id, hop).await? {
            Target::Local => match self.router.update(fix).await {
                Ok(()) => Ok(Response::new(pb::UpdateAck { received_ms: wall_ms() })),
                Err(r) => {
                    count_rejects(&[(0, r.clone())]);
                    Err(reject_status(&r))
                }
            },
            Target::Forward(mut p, hop) => forward(&p.name, p.client.update(forwarded(fix_to_proto(fix), hop))).await,
        }
    }

    type UpdateStreamStream = BoxStream<pb::BatchAck>;

    async fn update_stream(
        &self,
        req: Request<Streaming<pb::LocationBatch>>,
    ) -> Result<Response<Self::UpdateStreamStream>, Status> {
        let hop = hops(req.metadata());
        Ok(Response::new(super::stream::start(self, hop, req.into_inner())))
    }

    async fn get_driver(&self, req: Request<pb::GetDriverRequest>) -> Result<Response<pb::Driver>, Status> {
        let (hop, local_only) = (hops(req.metadata()), is_local_scope(req.metadata()));
        let r = req.into_inner();
        let key = driver_key(r.key.clone().map(Into::into)).map_err(|e| invalid(&e))?;
        if local_only {
            let v = self.router.get(key, r.include_trail).await.map_err(route_status)?;
            return Ok(Response::new(driver_proto(v)));
        }
        let id = match &key {
            DriverKey::Id(id) => id.clone(),
            _ => return self.find_by_secondary(key, r.include_trail).await.map(Response::new),
        };
        match target(&self.cluster, &id, hop).await? {
            Target::Local => {
                let v = self.router.get(key, r.include_trail).await.map_err(route_status)?;
                Ok(Response::new(driver_proto(v)))
            }
            Target::Forward(mut p, hop) => forward(&p.name, p.client.get_driver(forwarded(r, hop))).await,
        }
    }

    async fn get_history(&self, req: Request<pb::GetHistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let hop = hops(req.metadata());
        let r = req.into_inner();
        let q = super::history::history_query(r.clone(), crate::clock::wall_ms()).map_err(|e| invalid(&e))?;
        match target(&self.cluster, &q.driver_id, hop).await? {
            Target::Local => {
                let h = self.history.clone().ok_or_else(|| {
                    Status::failed_precondition("the history is off on this node (--history-retention 0)")
                })?;
                let read = tokio::task::spawn_blocking(move || super::history::get_history(&h, &q));
                let out = read.await.map_err(|e| Status::internal(format!("history read: {e}")))??;
                Ok(Response::new(out))
            }
            Target::Forward(mut p, hop) => forward(&p.name, p.client.get_history(forwarded(r, hop))).await,
        }
    }

    async fn remove_driver(
        &self,
        req: Request<pb::RemoveDriverRequest>,
    ) -> Result<Response<pb::RemoveDriverResponse>, Status> {
        let hop = hops(req.metadata());
        let key = driver_key(req.into_inner().key.map(Into::into)).map_err(|e| invalid(&e))?;
        // By cab number or session: find the driver first, then remove it at its owner.
        let id = match key {
            DriverKey::Id(id) => id,
            other => self.find_by_secondary(other, false).await?.driver_id,
        };
        match target(&self.cluster, &id, hop).await? {
            Target::Local => {
                let driver_id = self.router.remove(DriverKey::Id(id)).await.map_err(route_status)?;
                Ok(Response::new(pb::RemoveDriverResponse { driver_id }))
            }
            Target::Forward(mut p, hop) => {
                let r = pb::RemoveDriverRequest { key: Some(pb::remove_driver_request::Key::DriverId(id)) };
                forward(&p.name, p.client.remove_driver(forwarded(r, hop))).await
            }
        }
    }

    async fn nearby(&self, req: Request<pb::NearbyRequest>) -> Result<Response<pb::NearbyResponse>, Status> {
        if is_local_scope(req.metadata()) {
            let q = nearby_query(req.into_inner()).map_err(|e| invalid(&e))?;
            let hits = self.router.nearby(q).await.map_err(route_status)?;
            let drivers = hits.into_iter().map(hit_proto).collect();
            return Ok(Response::new(pb::NearbyResponse { drivers, partial: false, missing_nodes: vec![] }));
        }
        let r = req.into_inner();
        let deadline = scatter_deadline(r.deadline_ms, self.cluster.scatter_timeout).map_err(|e| invalid(&e))?;
        let q = nearby_query(r.clone()).map_err(|e| invalid(&e))?;
        let limit = q.limit;
        let (local, peers) = self.cluster.scatter_targets();
        let remote = scatter(peers, r, deadline, |mut c, r| async move { c.nearby(r).await });
        let here = async {
            if !local {
                return None;
            }
            let t0 = tokio::time::Instant::now();
            let r = self.router.nearby(q).await;
            metrics::histogram!("locus_scatter_part_seconds", "peer" => "local").record(t0.elapsed().as_secs_f64());
            Some(r)
        };
        let (here, remote) = tokio::join!(here, remote);
        let here = here.transpose().map_err(route_status)?.map(|hits| (hits, false));
        let remote = remote.into_iter().map(|p| p.map(|r| (r.drivers, false)));
        let g = gather(here, remote, limit);
        Ok(Response::new(pb::NearbyResponse {
            drivers: g.drivers,
            partial: !g.missing_nodes.is_empty(),
            missing_nodes: g.missing_nodes,
        }))
    }

    async fn within(&self, req: Request<pb::WithinRequest>) -> Result<Response<pb::WithinResponse>, Status> {
        if is_local_scope(req.metadata()) {
            let q = within_query(req.into_inner()).map_err(|e| invalid(&e))?;
            let (hits, truncated) = self.router.within(q).await.map_err(route_status)?;
            let drivers = hits.into_iter().map(hit_proto).collect();
            return Ok(Response::new(pb::WithinResponse { drivers, truncated, partial: false, missing_nodes: vec![] }));
        }
        let r = req.into_inner();
        let deadline = scatter_deadline(r.deadline_ms, self.cluster.scatter_timeout).map_err(|e| invalid(&e))?;
        let q = within_query(r.clone()).map_err(|e| invalid(&e))?;
        let limit = q.limit();
        let (local, peers) = self.cluster.scatter_targets();
        let remote = scatter(peers, r, deadline, |mut c, r| async move { c.within(r).await });
        let here = async { if local { Some(self.router.within(q).await) } else { None } };
        let (here, remote) = tokio::join!(here, remote);
        let here = here.transpose().map_err(route_status)?;
        let remote = remote.into_iter().map(|p| p.map(|r| (r.drivers, r.truncated)));
        let g = gather(here, remote, limit);
        Ok(Response::new(pb::WithinResponse {
            drivers: g.drivers,
            truncated: g.truncated,
            partial: !g.missing_nodes.is_empty(),
            missing_nodes: g.missing_nodes,
        }))
    }

    type WatchDriverStream = BoxStream<pb::Driver>;

    async fn watch_driver(
        &self,
        req: Request<pb::WatchDriverRequest>,
    ) -> Result<Response<Self::WatchDriverStream>, Status> {
        let hop = hops(req.metadata());
        let r = req.into_inner();
        check_key_str("driver_id", &r.driver_id).map_err(|e| invalid(&e))?;
        if hop > 0 {
            return self.open_watch(r, hop).await.map(Response::new);
        }
        // The client's entry node follows the driver across moves (see `api::follow`).
        let slot = self.watches.take()?;
        let skip_current = !r.include_current;
        let first = self.open_watch(pb::WatchDriverRequest { include_current: true, ..r.clone() }, 0).await?;
        let f = FollowDriver { api: self.clone(), driver_id: r.driver_id, last: None, skip_current };
        Ok(Response::new(Box::pin(crate::limits::holding(follow(f, first, self.shutdown.clone()), slot))))
    }
}

/// A driver watch as its entry node follows it: resumes after the newest fix delivered.
struct FollowDriver {
    api: LocationsApi,
    driver_id: String,
    /// (timestamp_ms, status) of the last state delivered.
    last: Option<(i64, i32)>,
    /// The client did not ask for the current state: the first open's is not delivered.
    skip_current: bool,
}

impl Resume for FollowDriver {
    type Item = pb::Driver;

    fn open(&mut self) -> Opening<pb::Driver> {
        let api = self.api.clone();
        let r = pb::WatchDriverRequest { driver_id: self.driver_id.clone(), include_current: true };
        Box::pin(async move { api.open_watch(r, 0).await })
    }

    fn pass(&mut self, d: &mut pb::Driver, fresh: bool) -> bool {
        let now = (d.timestamp_ms, d.status);
        if fresh && std::mem::take(&mut self.skip_current) {
            self.last = Some(now);
            return false;
        }
        if fresh && self.last.is_some_and(|l| now.0 < l.0 || now == l) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

impl LocationsApi {
    /// Opens a driver watch on the driver's owner: here, or relayed from the owner (its
    /// end status and trailers included).
    async fn open_watch(&self, r: pb::WatchDriverRequest, hop: u32) -> Result<BoxStream<pb::Driver>, Status> {
        if let Target::Forward(mut p, hop) = target(&self.cluster, &r.driver_id, hop).await? {
            let s = forward(&p.name, p.client.watch_driver(forwarded(r, hop))).await?;
            return Ok(Box::pin(s.into_inner()));
        }
        let (current, mut fixes, end) = self.router.watch(r.driver_id, self.watch_queue).await.map_err(route_status)?;
        let (out_tx, out_rx) = mpsc::channel::<Result<pb::Driver, Status>>(16);
        let mut shutdown = self.shutdown.clone();
        crate::tasks::spawn("driver_watch", async move {
            if r.include_current && out_tx.send(Ok(driver_proto(current))).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    v = fixes.recv() => match v {
                        Some(v) => if out_tx.send(Ok(driver_proto(v))).await.is_err() { return },
                        None => break,
                    },
                    // The client went away: drop the subscription now, not at the next fix.
                    _ = out_tx.closed() => return,
                    _ = super::stopped(&mut shutdown) => {
                        let s = with_meta(Status::unavailable("node shutting down"), END_KEY, WatchEnd::ShuttingDown.as_str());
                        let _ = out_tx.send(Err(s)).await;
                        return;
                    }
                }
            }
            let status = match end.await {
                Ok(why @ (WatchEnd::Removed | WatchEnd::Expired)) => {
                    with_meta(Status::not_found(format!("driver {}", why.as_str())), END_KEY, why.as_str())
                }
                Ok(WatchEnd::Lagged) => with_meta(
                    Status::resource_exhausted("watcher fell too far behind; resubscribe"),
                    END_KEY,
                    WatchEnd::Lagged.as_str(),
                ),
                Ok(WatchEnd::Moved) => with_meta(
                    unavailable_retry("the driver's partition moved to another node; resubscribe"),
                    END_KEY,
                    WatchEnd::Moved.as_str(),
                ),
                Ok(WatchEnd::ShuttingDown) | Err(_) => {
                    with_meta(Status::unavailable("node shutting down"), END_KEY, WatchEnd::ShuttingDown.as_str())
                }
            };
            let _ = out_tx.send(Err(status)).await;
        });
        Ok(Box::pin(ReceiverStream::new(out_rx)))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::membership::{ClusterView, Liveness, MemberView, NodeMeta, NodeState};
    use crate::ring::Ring;

    fn member(addr: SocketAddr, name: &str) -> MemberView {
        MemberView {
            addr,
            incarnation: 1,
            liveness: Liveness::Alive,
            meta: Some(NodeMeta {
                name: name.into(),
                grpc: SocketAddr::from(([127, 0, 0, 1], addr.port() + 1)),
                http: SocketAddr::from(([127, 0, 0, 1], addr.port() + 2)),
                state: NodeState::Active,
                ring_checksum: 0,
            }),
        }
    }

    #[tokio::test]
    async fn a_request_is_forwarded_at_most_three_times_then_unavailable_with_a_retry_hint() {
        let (a, b) = (SocketAddr::from(([127, 0, 0, 1], 9000)), SocketAddr::from(([127, 0, 0, 1], 9100)));
        let ring = Arc::new(Ring::new([a, b], 16));
        let view = ClusterView { me: a, members: vec![member(a, "a"), member(b, "b")], ring: ring.clone() };
        let (_tx, rx) = watch::channel(Arc::new(view));
        // `a` serves every partition the ring gives it.
        let mut table = crate::ownership::Table::default();
        for p in 0..crate::keys::PARTITIONS {
            if ring.partition_owner(p as usize) == Some(a) {
                table.set(p, crate::ownership::Part { epoch: 1, holding: Some(crate::ownership::Holding::Active) });
            }
        }
        let (_rtx, routes) =
            watch::channel(Arc::new(crate::ownership::routes(a, &ring, &table, &std::collections::HashMap::new())));
        let cluster = Cluster::new(rx, routes, Duration::from_millis(200), Default::default());
        let key_of = |owner: SocketAddr| {
            (0..1000).map(|i| format!("k{i}")).find(|k| ring.owner(k.as_bytes()) == Some(owner)).expect("a key")
        };
        let (mine, theirs) = (key_of(a), key_of(b));
        for hop in 0..4 {
            assert!(matches!(target(&cluster, &mine, hop).await, Ok(Target::Local)), "own keys run here at hop {hop}");
        }
        assert!(matches!(target(&cluster, &theirs, 0).await, Ok(Target::Forward(p, 1)) if p.name == "b"));
        assert!(matches!(target(&cluster, &theirs, 1).await, Ok(Target::Forward(_, 2))), "a re-forward");
        assert!(matches!(target(&cluster, &theirs, 2).await, Ok(Target::Forward(_, 3))), "and another");
        let Err(s) = target(&cluster, &theirs, 3).await else { panic!("forwarded a fourth time") };
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get(RETRY_KEY).and_then(|v| v.to_str().ok()), Some("500"));
    }
}
