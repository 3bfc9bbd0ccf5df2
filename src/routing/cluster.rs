//! Cluster routing: which node owns a key, and the gRPC channels to reach the others.
//!
//! Reads the latest [`ClusterView`] published by the membership task and the latest
//! [`Routes`] published by the hand-off task (`watch` borrows, never held across an
//! await). Who serves a partition comes from the routes alone (`ownership::routes`: this
//! node, a peer, or incoming: wait); peers' gRPC addresses from their gossiped metadata. Forwarded requests carry [`HOP_KEY`]: the entry node sends
//! with hop 1; a receiver whose routes disagree may re-forward (a ring change can take
//! two: old owner, then the node it lent the partition to; at most hop 3); beyond that
//! the answer is `UNAVAILABLE` with a retry hint, so a request never loops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Endpoint;

use crate::auth::layer::AuthChannel;

use crate::membership::{ClusterView, Liveness, NodeState};
use crate::ownership::{Lease, Route, Routes};
use crate::pb::locations_client::LocationsClient;

/// Largest gRPC message a node accepts or sends (a 10,000-fix batch is about 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// How long a keyed request waits for its partition to arrive on this node.
pub const INCOMING_WAIT: Duration = Duration::from_secs(2);

/// Largest hand-off message (a chunk of partitions with their drivers' trails).
pub const MAX_HANDOFF_BYTES: usize = 256 << 20;

/// Metadata key: how many times a request has been forwarded.
pub const HOP_KEY: &str = "locus-hop";
/// Metadata key: `local` asks a node to answer from its own shards only (scatter parts).
pub const SCOPE_KEY: &str = "locus-scope";
/// Metadata key on `UNAVAILABLE` answers: when to retry.
pub const RETRY_KEY: &str = "locus-retry-after-ms";
/// A request is forwarded at most this many times (the entry hop plus one re-forward).
pub const MAX_HOPS: u32 = 3;
/// The retry hint while the ring is changing: about one debounce plus gossip.
pub const RETRY_AFTER_MS: u32 = 500;

/// The hop count of an incoming request (0 from a client).
pub fn hops(md: &MetadataMap) -> u32 {
    md.get(HOP_KEY).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Whether an incoming request is one node's part of a scatter.
pub fn is_local_scope(md: &MetadataMap) -> bool {
    md.get(SCOPE_KEY).is_some_and(|v| v.as_bytes() == b"local")
}

/// Marks an outgoing request as forwarded `hop` times.
pub fn set_hop(md: &mut MetadataMap, hop: u32) {
    md.insert(HOP_KEY, MetadataValue::from(hop));
}

pub fn set_local_scope(md: &mut MetadataMap) {
    md.insert(SCOPE_KEY, MetadataValue::from_static("local"));
}

/// A node to forward to.
#[derive(Clone)]
pub struct Peer {
    /// Its ring key (gossip address).
    pub addr: SocketAddr,
    pub name: String,
    pub client: LocationsClient<AuthChannel>,
    /// The same connection, for the other services' clients.
    pub channel: AuthChannel,
}

/// Where a key's requests run.
pub enum Owner {
    Local,
    Remote(Box<Peer>),
    /// This node takes the partition over and is installing it: wait.
    Incoming,
    /// The ring is empty or the owner's address is not known yet.
    Unknown,
}

/// One lazily connected channel per peer (HTTP/2 multiplexes every request on it).
#[derive(Default)]
pub struct Peers {
    clients: Mutex<HashMap<SocketAddr, AuthChannel>>,
    /// Set when the node runs on the in-process network (the cluster harness).
    connector: Option<crate::memnet::MemConnector>,
    /// The node credential every call to a peer carries (with `--auth-file`).
    credential: Option<tonic::codegen::http::HeaderValue>,
    /// Mutual TLS to peers (with `--tls-cert`).
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Peers {
    /// The channel to a peer's gRPC address (created lazily, then shared).
    pub fn channel(&self, grpc: SocketAddr) -> AuthChannel {
        let mut m = self.clients.lock().expect("peers lock");
        m.entry(grpc)
            .or_insert_with(|| {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let mut ep =
                    Endpoint::from_shared(format!("{scheme}://{grpc}")).expect("a socket address is a valid URI");
                if let Some(t) = &self.tls {
                    ep = ep.tls_config(t.clone()).expect("a TLS configuration tonic accepted at start");
                }
                let ep = ep
                    .tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(1))
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5));
                let ch = match &self.connector {
                    Some(c) => ep.connect_with_connector_lazy(c.clone()),
                    None => ep.connect_lazy(),
                };
                AuthChannel::new(ch, self.credential.clone())
            })
            .clone()
    }

    pub fn client(&self, grpc: SocketAddr) -> LocationsClient<AuthChannel> {
        LocationsClient::new(self.channel(grpc))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Forgets channels to addresses no member uses any more.
    pub fn retain(&self, live: &[SocketAddr]) {
        self.clients.lock().expect("peers lock").retain(|a, _| live.contains(a));
    }
}

/// The cluster as routing sees it. Cheap to share (`Arc`).
pub struct Cluster {
    view: watch::Receiver<Arc<ClusterView>>,
    routes: watch::Receiver<Arc<Routes>>,
    /// Held (read) by a gateway stream from reading the routes until its batch's local
    /// part is queued on the shards; taken (write) by a hand-off between publishing new
    /// routes and freezing the shards. So every batch routed here by the old routes is
    /// in the shards' mailboxes before the freeze, and none is refused for it.
    pub gate: tokio::sync::RwLock<()>,
    peers: Peers,
    /// Default deadline of a scatter-gather query.
    pub scatter_timeout: Duration,
    /// The quorum lease (`ownership::Lease`), written by the hand-off task. Without it
    /// keyed requests answer `UNAVAILABLE`.
    lease: Arc<Lease>,
    /// Members whose last survey answer (hand-off task) held nothing they serve: a
    /// leaving member among them has handed everything over, and scatters skip it.
    empty: Mutex<std::collections::HashSet<SocketAddr>>,
}

impl Cluster {
    pub fn new(
        view: watch::Receiver<Arc<ClusterView>>,
        routes: watch::Receiver<Arc<Routes>>,
        scatter_timeout: Duration,
        lease: Arc<Lease>,
    ) -> Cluster {
        Cluster {
            view,
            routes,
            gate: tokio::sync::RwLock::new(()),
            peers: Peers::default(),
            scatter_timeout,
            lease,
            empty: Mutex::default(),
        }
    }

    /// Reaches peers over the in-process network instead of TCP.
    /// Peer calls go over mutual TLS.
    pub fn with_tls(mut self, t: tonic::transport::ClientTlsConfig) -> Self {
        self.peers.tls = Some(t);
        self
    }

    /// Peer calls carry the node credential (`auth::ClusterKey::node_credential`).
    pub fn with_credential(mut self, c: tonic::codegen::http::HeaderValue) -> Self {
        self.peers.credential = Some(c);
        self
    }

    pub fn with_connector(mut self, c: crate::memnet::MemConnector) -> Self {
        self.peers.connector = Some(c);
        self
    }

    /// Serving (after a round with a quorum) and the quorum lease not run out, as of
    /// the monotonic clock now.
    pub fn has_quorum(&self) -> bool {
        self.lease.holds()
    }

    pub fn set_lease_until(&self, t: tokio::time::Instant) {
        self.lease.set_until(t);
    }

    /// Serving (not regaining service after losing the lease), whatever the clock says.
    pub fn serving(&self) -> bool {
        self.lease.serving()
    }

    pub fn set_quorum(&self, q: bool) {
        self.lease.set_serving(q);
    }

    /// A receiver of every new version of the routes.
    pub fn watch_routes(&self) -> watch::Receiver<Arc<Routes>> {
        self.routes.clone()
    }

    /// The current routes (a snapshot: hold it for one request or batch).
    pub fn routes(&self) -> Arc<Routes> {
        self.routes.borrow().clone()
    }

    /// Waits until partition `p` is no longer incoming here (nor unknown: the cluster is
    /// forming), for at most `max`.
    pub async fn settled(&self, p: usize, max: Duration) -> Owner {
        let mut rx = self.routes.clone();
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let r = rx.borrow_and_update().of(p);
            if r != Route::Incoming && r != Route::Unknown {
                // Local, elsewhere, or still served by its holder (`Via`): answerable now.
                return self.partition_owner(p);
            }
            if !matches!(tokio::time::timeout_at(deadline, rx.changed()).await, Ok(Ok(()))) {
                return Owner::Incoming;
            }
        }
    }

    /// A receiver of every new view (for tasks that follow the ring).
    pub fn watch_view(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.view.clone()
    }

    /// The current view (a snapshot: hold it for one request).
    pub fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    fn peer(&self, v: &ClusterView, addr: SocketAddr) -> Option<Peer> {
        let meta = v.meta(&addr)?;
        let channel = self.peers.channel(meta.grpc);
        let client = LocationsClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Some(Peer { addr, name: meta.name.clone(), client, channel })
    }

    /// Who serves a partition now, by the routes.
    pub fn partition_owner(&self, partition: usize) -> Owner {
        match self.routes.borrow().of(partition) {
            Route::Local => Owner::Local,
            Route::Incoming => Owner::Incoming,
            Route::Unknown => Owner::Unknown,
            Route::Remote(a) | Route::Via(a) => {
                let v = self.view();
                self.peer(&v, a).map_or(Owner::Unknown, |p| Owner::Remote(Box::new(p)))
            }
        }
    }

    /// Who serves `key` now, by the routes.
    pub fn owner(&self, key: &[u8]) -> Owner {
        self.partition_owner(crate::keys::partition_of(key) as usize)
    }

    /// The peer for a ring member of `v`, if its address is known.
    pub fn peer_in(&self, v: &ClusterView, addr: SocketAddr) -> Option<Peer> {
        self.peer(v, addr)
    }

    /// Who answers a scatter: whether this node serves anything (on the ring, or still
    /// holding partitions), and every other ring member plus every live member that is
    /// leaving (it serves until its partitions are handed over). A member whose address
    /// is unknown is named: it counts as missing. During a hand-off a driver may be
    /// answered by its holder and its new owner: merging de-duplicates by id.
    pub fn scatter_targets(&self) -> (bool, Vec<Result<Peer, String>>) {
        let v = self.view();
        let mut local = v.ring.contains(&v.me) || self.routes.borrow().serves_any();
        let mut remote = Vec::new();
        for a in v.ring.members() {
            if *a == v.me {
                local = true;
            } else {
                remote.push(self.peer(&v, *a).ok_or_else(|| v.name_of(a)));
            }
        }
        let empty = self.empty.lock().expect("empty lock").clone();
        for m in &v.members {
            let leaving = m.meta.as_ref().is_some_and(|x| x.state == NodeState::Leaving);
            if leaving
                && !empty.contains(&m.addr)
                && m.addr != v.me
                && m.liveness != Liveness::Down
                && !v.ring.contains(&m.addr)
                && let Some(p) = self.peer(&v, m.addr)
            {
                remote.push(Ok(p));
            }
        }
        (local, remote)
    }

    /// Records which surveyed members hold nothing they serve (see `empty`).
    pub fn set_empty(&self, members: std::collections::HashSet<SocketAddr>) {
        *self.empty.lock().expect("empty lock") = members;
    }

    pub fn peers(&self) -> &Peers {
        &self.peers
    }
}
