//! The history's readers: `Locations.GetHistory` (one driver, on its owner),
//! `locus.v1.Fixes.Subscribe` (every fix, from a cursor) and the replayable
//! `Events.Subscribe` (every state change, from a cursor: they are kept in the same
//! per-partition history), with `Internal.HistoryPart`.
//!
//! A subscription has two halves:
//! - **A node's part** ([`node_part`]) streams the partitions this node serves, each
//!   from the cursor, as the persister appends; partitions it starts serving join in,
//!   from the cursor too.
//! - **The gateway** (the node the client called) runs one part per member, its own
//!   in-process and the others' over `Internal.FixesPart`, and merges them. It keeps the
//!   last position it forwarded per partition and forwards only what is past it: a
//!   partition that moved is read again by its new owner from the cursor (its history
//!   moved with it), and what the client already has is dropped. When the members or
//!   the ring change, or a part fails, the parts restart from the positions forwarded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::debug;

use super::locations::BoxStream;
use super::{check_coord, invalid, status_mask};
use crate::drivers::{FieldError, TrailFix};
use crate::events::{Entity, Filter};
use crate::geo::LatLonBox;
use crate::history::{Behind, HistEvent, HistFix, HistoryStore, Pos};
use crate::keys::PARTITIONS;
use crate::ownership::{Route, Routes};
use crate::pb;
use crate::routing::cluster::{Cluster, set_local_scope};

/// Most fixes per `GetHistory` answer and per subscription batch.
pub const MAX_HISTORY_PAGE: u32 = 10_000;
const DEFAULT_PAGE: u32 = 1_000;

pub fn position_proto(p: u16, pos: Pos) -> pb::HistoryPosition {
    pb::HistoryPosition { partition: p as u32, epoch: pos.epoch, seq: pos.seq }
}

pub fn fix_proto(p: u16, f: &HistFix) -> pb::HistoryFix {
    let packed = TrailFix { lat_e7: f.lat_e7, lon_e7: f.lon_e7, dt_ms: 0, motion: f.motion };
    let pos = packed.unpack(f.timestamp_ms);
    pb::HistoryFix {
        position: Some(position_proto(p, f.pos)),
        driver_id: f.driver_id.to_string(),
        lat: pos.lat,
        lon: pos.lon,
        heading_deg: pos.heading_deg,
        speed_mps: pos.speed_mps,
        accuracy_m: pos.accuracy_m,
        timestamp_ms: f.timestamp_ms,
        received_ms: f.received_ms,
        status: f.status as i32,
        trip_id: f.trip_id.as_deref().unwrap_or("").to_string(),
        trip_cost: f.trip_cost_cents as f64 / 100.0,
    }
}

/// A validated `GetHistory` request.
pub struct HistoryQuery {
    pub driver_id: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub limit: usize,
    pub after: Option<Pos>,
}

pub fn history_query(r: pb::GetHistoryRequest, now_ms: i64) -> Result<HistoryQuery, FieldError> {
    crate::drivers::check_str("driver_id", &r.driver_id, true, crate::drivers::MAX_ID_BYTES)?;
    let to_ms = if r.to_ms == 0 { now_ms } else { r.to_ms };
    if r.from_ms < 0 {
        return Err(FieldError::new("from_ms", format!("{} is before the Unix epoch", r.from_ms)));
    }
    if r.from_ms > to_ms {
        return Err(FieldError::new("from_ms", format!("{} is after to_ms {to_ms}", r.from_ms)));
    }
    let limit = match r.limit {
        0 => DEFAULT_PAGE,
        l if l > MAX_HISTORY_PAGE => {
            return Err(FieldError::new("limit", format!("{l} is above {MAX_HISTORY_PAGE}")));
        }
        l => l,
    } as usize;
    let part = crate::keys::partition_of(r.driver_id.as_bytes());
    let after = match r.after {
        Some(a) if a.partition != part as u32 => {
            return Err(FieldError::new(
                "after",
                format!("partition {} is not the driver's ({part}): pass the `next` of the last answer", a.partition),
            ));
        }
        a => a.map(|a| Pos { epoch: a.epoch, seq: a.seq }),
    };
    Ok(HistoryQuery { driver_id: r.driver_id, from_ms: r.from_ms, to_ms, limit, after })
}

/// Answers a `GetHistory` from this node's history (the driver's owner).
pub fn get_history(h: &HistoryStore, q: &HistoryQuery) -> Result<pb::HistoryResponse, Status> {
    let p = crate::keys::partition_of(q.driver_id.as_bytes());
    let mut out = pb::HistoryResponse::default();
    let r = h.driver_history(p, &q.driver_id, q.from_ms, q.to_ms, q.after, |f| {
        if out.fixes.len() == q.limit {
            let last = out.fixes.last().and_then(|x| x.position).expect("a full page");
            out.next = Some(last);
            return false;
        }
        out.fixes.push(fix_proto(p, &f));
        true
    });
    r.map_err(|e| Status::internal(format!("reading the history: {e}")))?;
    Ok(out)
}

/// What a subscription reads.
#[derive(Clone, Debug)]
enum What {
    Fixes { area: Option<LatLonBox>, statuses: u32 },
    Events(Filter),
}

/// A validated subscription (to fixes or to state changes).
#[derive(Clone, Debug)]
pub struct Query {
    after: HashMap<u16, Pos>,
    earliest: bool,
    max_batch: usize,
    what: What,
    /// The client's request, for the other nodes' parts.
    original: pb::HistoryPartRequest,
}

impl Query {
    fn keeps_fix(&self, f: &HistFix) -> bool {
        match &self.what {
            What::Fixes { area, statuses } => {
                f.status < 32
                    && statuses & (1 << f.status) != 0
                    && area.is_none_or(|b| b.contains(f.lat_e7 as f64 / 1e7, f.lon_e7 as f64 / 1e7))
            }
            What::Events(_) => false,
        }
    }

    fn keeps_event(&self, e: &HistEvent) -> bool {
        match &self.what {
            What::Fixes { .. } => false,
            What::Events(f) => {
                let entity = if e.entity == 1 { Entity::Driver } else { Entity::Trip };
                f.entity.is_none_or(|x| x == entity)
                    && (f.states.is_empty() || f.states.iter().any(|s| **s == *e.state))
            }
        }
    }

    /// The request a part on another node is asked (with the gateway's cursor).
    fn request(&self, after: &HashMap<u16, Pos>) -> pb::HistoryPartRequest {
        let mut r = self.original.clone();
        let cursor: Vec<pb::HistoryPosition> = after.iter().map(|(p, pos)| position_proto(*p, *pos)).collect();
        if let Some(f) = &mut r.fixes {
            f.after = cursor;
        } else if let Some(e) = &mut r.events {
            e.after = cursor;
        }
        r
    }
}

/// The cursor and start of a request.
fn cursor(after: &[pb::HistoryPosition], start: i32) -> Result<(HashMap<u16, Pos>, bool), FieldError> {
    if after.len() > PARTITIONS as usize {
        return Err(FieldError::new("after", format!("{} positions; there are {PARTITIONS} partitions", after.len())));
    }
    let mut out = HashMap::new();
    for a in after {
        let p = u16::try_from(a.partition)
            .ok()
            .filter(|p| *p < PARTITIONS)
            .ok_or_else(|| FieldError::new("after", format!("partition {} is not below {PARTITIONS}", a.partition)))?;
        if out.insert(p, Pos { epoch: a.epoch, seq: a.seq }).is_some() {
            return Err(FieldError::new("after", format!("partition {p} appears twice")));
        }
    }
    let earliest = match pb::StartAt::try_from(start) {
        Ok(s) => s == pb::StartAt::Earliest,
        Err(_) => return Err(FieldError::new("start", format!("unknown start {start}"))),
    };
    Ok((out, earliest))
}

/// Whether an `Events.Subscribe` request asks for the replayable stream.
pub fn replayable(r: &pb::SubscribeRequest) -> bool {
    r.resumable || !r.after.is_empty() || r.start == pb::StartAt::Earliest as i32
}

/// A replayable `Events.Subscribe` (its filter validated by the caller).
pub fn event_query(r: &pb::SubscribeRequest, filter: Filter) -> Result<Query, FieldError> {
    let (after, earliest) = cursor(&r.after, r.start)?;
    let original = pb::HistoryPartRequest { fixes: None, events: Some(r.clone()) };
    Ok(Query { after, earliest, max_batch: DEFAULT_PAGE as usize, what: What::Events(filter), original })
}

pub fn fix_query(r: &pb::SubscribeFixesRequest) -> Result<Query, FieldError> {
    let (after, earliest) = cursor(&r.after, r.start)?;
    let area = match &r.area {
        None => None,
        Some(b) => {
            check_coord("area.min_lat", b.min_lat, "area.min_lon", b.min_lon)?;
            check_coord("area.max_lat", b.max_lat, "area.max_lon", b.max_lon)?;
            if b.min_lat > b.max_lat {
                return Err(FieldError::new("area.min_lat", format!("{} is above max_lat {}", b.min_lat, b.max_lat)));
            }
            Some(LatLonBox { min_lat: b.min_lat, min_lon: b.min_lon, max_lat: b.max_lat, max_lon: b.max_lon })
        }
    };
    let max_batch = match r.max_batch {
        0 => DEFAULT_PAGE,
        m if m > MAX_HISTORY_PAGE => {
            return Err(FieldError::new("max_batch", format!("{m} is above {MAX_HISTORY_PAGE}")));
        }
        m => m,
    } as usize;
    let what = What::Fixes { area, statuses: status_mask(&r.statuses)? };
    let original = pb::HistoryPartRequest { fixes: Some(r.clone()), events: None };
    Ok(Query { after, earliest, max_batch, what, original })
}

fn out_of_range(b: Behind) -> Status {
    Status::out_of_range(format!(
        "partition {}: cursor {} is older than the history kept there; the oldest cursor it resumes from is {} \
         (partition {}, epoch {}, seq {})",
        b.partition, b.cursor, b.oldest, b.partition, b.oldest.epoch, b.oldest.seq
    ))
}

type Out = mpsc::Sender<Result<pb::HistoryPartBatch, Status>>;

pub fn event_proto(p: u16, e: &HistEvent) -> pb::StateChange {
    pb::StateChange {
        entity: if e.entity == 1 { pb::EntityKind::EntityDriver } else { pb::EntityKind::EntityTrip } as i32,
        id: e.id.to_string(),
        state: e.state.to_string(),
        from_state: e.from_state.as_deref().unwrap_or("").to_string(),
        timestamp_ms: e.timestamp_ms,
        lat: e.lat_e7 as f64 / 1e7,
        lon: e.lon_e7 as f64 / 1e7,
        position: Some(position_proto(p, e.pos)),
        positions: Vec::new(),
    }
}

/// This node's part of a subscription: the partitions it serves, from the cursor. A
/// partition's first batch says where it starts (so a gateway that restarts its parts
/// resumes it there, even if nothing passed the filter).
pub async fn node_part(h: Arc<HistoryStore>, mut routes: watch::Receiver<Arc<Routes>>, q: Query, tx: Out) {
    let mut changes = h.changes();
    // Per partition: `None` until first served here, then the position read up to.
    let mut cursor: Vec<Option<Option<Pos>>> = vec![None; PARTITIONS as usize];
    // Where the next scan starts, so no partition waits behind a busy one.
    let mut next = 0u16;
    loop {
        changes.borrow_and_update();
        let r = routes.borrow_and_update().clone();
        let mut batch = pb::HistoryPartBatch::default();
        let mut more = false;
        for p in (next..PARTITIONS).chain(0..next) {
            if r.of(p as usize) != Route::Local {
                continue;
            }
            let c = match &mut cursor[p as usize] {
                Some(c) => c,
                slot => {
                    let start = match q.after.get(&p) {
                        Some(a) => Some(*a),
                        None if q.earliest => None,
                        // From now: after the last fix written (none yet: from the start).
                        None => h.last(p),
                    };
                    if let Some(s) = start {
                        batch.positions.push(position_proto(p, s));
                    }
                    slot.insert(start)
                }
            };
            if h.last(p).is_none_or(|l| c.is_some_and(|c| l <= c)) {
                continue;
            }
            let room = q.max_batch.saturating_sub(batch.fixes.len() + batch.events.len()).max(1);
            let page = match h.read_after(p, *c, room) {
                Ok(page) => page,
                // Older segments are being copied in: read on once they are here.
                Err(b) if b.filling => continue,
                Err(b) => {
                    let _ = tx.send(Err(out_of_range(b))).await;
                    return;
                }
            };
            batch.fixes.extend(page.fixes.iter().filter(|f| q.keeps_fix(f)).map(|f| fix_proto(p, f)));
            batch.events.extend(page.events.iter().filter(|e| q.keeps_event(e)).map(|e| event_proto(p, e)));
            if let Some(u) = page.upto {
                *c = Some(u);
                batch.positions.push(position_proto(p, u));
            }
            if page.more || batch.fixes.len() + batch.events.len() >= q.max_batch {
                more = true;
                next = (p + 1) % PARTITIONS;
                break;
            }
        }
        if !batch.positions.is_empty() && tx.send(Ok(batch)).await.is_err() {
            return;
        }
        if more {
            continue;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            r = routes.changed() => if r.is_err() { return },
            _ = tx.closed() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The `locus.v1.Fixes` service and `Internal.FixesPart`.
pub struct FixesApi {
    history: Option<Arc<HistoryStore>>,
    cluster: Arc<Cluster>,
    subscriptions: Arc<crate::limits::Slots>,
}

impl FixesApi {
    pub fn new(
        history: Option<Arc<HistoryStore>>,
        cluster: Arc<Cluster>,
        subscriptions: Arc<crate::limits::Slots>,
    ) -> Self {
        FixesApi { history, cluster, subscriptions }
    }

    fn store(&self) -> Result<Arc<HistoryStore>, Status> {
        self.history.clone().ok_or_else(|| Status::failed_precondition("the history is off (--history-retention 0)"))
    }

    /// `Internal.HistoryPart`: this node's part, for a gateway.
    pub fn part(&self, r: pb::HistoryPartRequest) -> Result<BoxStream<pb::HistoryPartBatch>, Status> {
        let q = match (&r.fixes, &r.events) {
            (Some(f), _) => fix_query(f).map_err(|e| invalid(&e))?,
            (None, Some(e)) => {
                let filter = super::trips::event_filter(e)?;
                event_query(e, filter).map_err(|e| invalid(&e))?
            }
            (None, None) => return Err(Status::invalid_argument("fixes or events: one is required")),
        };
        let (tx, rx) = mpsc::channel(4);
        crate::tasks::spawn("history_part", node_part(self.store()?, self.cluster.watch_routes(), q, tx));
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// A client's subscription: every node's part, merged (see the module docs).
    pub fn subscribe_merged(&self, q: Query) -> Result<mpsc::Receiver<Result<pb::HistoryPartBatch, Status>>, Status> {
        let h = self.store()?;
        let (tx, rx) = mpsc::channel(4);
        crate::tasks::spawn("history_gateway", gateway(h, self.cluster.clone(), q, tx));
        Ok(rx)
    }

    pub fn subscriptions(&self) -> &Arc<crate::limits::Slots> {
        &self.subscriptions
    }
}

/// What a gateway has forwarded: per partition, the last position.
type Delivered = Arc<Mutex<HashMap<u16, Pos>>>;

/// One other node's part into `tx`, reopened (from what was forwarded) until dropped.
async fn remote_part(cluster: Arc<Cluster>, addr: SocketAddr, q: Query, delivered: Delivered, tx: Out) {
    loop {
        if let Some(peer) = cluster.peer_in(&cluster.view(), addr) {
            let after = delivered.lock().expect("delivered lock").clone();
            let mut req = Request::new(q.request(&after));
            set_local_scope(req.metadata_mut());
            let mut client = pb::internal_client::InternalClient::new(peer.channel.clone())
                .max_decoding_message_size(crate::routing::cluster::MAX_MESSAGE_BYTES);
            match client.history_part(req).await {
                Ok(s) => {
                    let mut s = s.into_inner();
                    loop {
                        match s.message().await {
                            Ok(Some(b)) => {
                                if tx.send(Ok(b)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(e) if e.code() == tonic::Code::OutOfRange => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                            Err(e) => {
                                debug!(peer = %peer.name, error = %e, "a node's fix stream ended");
                                break;
                            }
                        }
                    }
                }
                Err(e) if e.code() == tonic::Code::OutOfRange => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(e) => debug!(peer = %peer.name, error = %e, "cannot open a node's fix stream"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tx.closed() => return,
        }
    }
}

/// The members a gateway reads from, and the ring they follow: parts restart when
/// either changes.
fn shape(cluster: &Cluster) -> (Vec<SocketAddr>, u64) {
    let v = cluster.view();
    let mut members: Vec<SocketAddr> = v
        .members
        .iter()
        .filter(|m| m.addr != v.me && m.liveness != crate::membership::Liveness::Down)
        .map(|m| m.addr)
        .collect();
    members.sort();
    (members, cluster.routes().ring_checksum)
}

/// A client's subscription: every node's part, merged without repeats.
async fn gateway(h: Arc<HistoryStore>, cluster: Arc<Cluster>, q: Query, out: Out) {
    let delivered: Delivered = Arc::new(Mutex::new(q.after.clone()));
    let mut view = cluster.watch_view();
    let mut routes = cluster.watch_routes();
    loop {
        let current = shape(&cluster);
        let (tx, mut rx) = mpsc::channel(8);
        let mut q_now = q.clone();
        q_now.after = delivered.lock().expect("delivered lock").clone();
        let mut tasks = vec![crate::tasks::spawn(
            "fixes_part",
            node_part(h.clone(), cluster.watch_routes(), q_now.clone(), tx.clone()),
        )];
        for a in &current.0 {
            let t = remote_part(cluster.clone(), *a, q_now.clone(), delivered.clone(), tx.clone());
            tasks.push(crate::tasks::spawn("fixes_peer", t));
        }
        drop(tx);
        let end = loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(Ok(b)) => {
                        let b = merge(&delivered, b);
                        if !b.positions.is_empty() && out.send(Ok(b)).await.is_err() {
                            break true;
                        }
                    }
                    Some(Err(e)) => {
                        let _ = out.send(Err(e)).await;
                        break true;
                    }
                    None => break false,
                },
                r = view.changed() => {
                    if r.is_err() { break true }
                    if shape(&cluster) != current { break false }
                },
                r = routes.changed() => {
                    if r.is_err() { break true }
                    if shape(&cluster) != current { break false }
                },
                _ = out.closed() => break true,
            }
        };
        for t in tasks {
            t.abort();
        }
        if end {
            return;
        }
    }
}

/// Keeps what is past the positions forwarded so far, and advances them.
fn merge(delivered: &Delivered, b: pb::HistoryPartBatch) -> pb::HistoryPartBatch {
    let mut d = delivered.lock().expect("delivered lock");
    let mut out = pb::HistoryPartBatch::default();
    let mut touched: Vec<u16> = Vec::new();
    let key = |p: &pb::HistoryPosition| (p.partition as u16, Pos { epoch: p.epoch, seq: p.seq });
    for f in b.fixes {
        let Some((p, pos)) = f.position.as_ref().map(key) else { continue };
        if d.get(&p).is_none_or(|last| pos > *last) {
            d.insert(p, pos);
            touched.push(p);
            out.fixes.push(f);
        }
    }
    for e in b.events {
        let Some((p, pos)) = e.position.as_ref().map(key) else { continue };
        if d.get(&p).is_none_or(|last| pos > *last) {
            d.insert(p, pos);
            touched.push(p);
            out.events.push(e);
        }
    }
    for x in &b.positions {
        let (p, pos) = key(x);
        if d.get(&p).is_none_or(|last| pos > *last) {
            d.insert(p, pos);
            touched.push(p);
        }
    }
    touched.sort_unstable();
    touched.dedup();
    out.positions = touched.into_iter().map(|p| position_proto(p, d[&p])).collect();
    out
}

#[tonic::async_trait]
impl pb::fixes_server::Fixes for FixesApi {
    type SubscribeStream = BoxStream<pb::FixBatch>;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeFixesRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = req.into_inner();
        let q = fix_query(&r).map_err(|e| invalid(&e))?;
        let slot = self.subscriptions.take()?;
        let rx = self.subscribe_merged(q)?;
        let batches =
            ReceiverStream::new(rx).map(|b| b.map(|b| pb::FixBatch { fixes: b.fixes, positions: b.positions }));
        Ok(Response::new(Box::pin(crate::limits::holding(batches, slot))))
    }
}
