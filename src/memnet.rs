//! The in-process network: what lets a whole cluster run in one process, in paused
//! time (the cluster harness in `tests/harness`, membership's scripted tests).
//!
//! Hosts are named by their gossip address. Gossip datagrams (and the quorum
//! heartbeats) travel as [`MemTransport`] sends; gRPC travels over in-memory duplex
//! connections that tonic's client ([`MemConnector`]) and server ([`MemNet::listen`])
//! use exactly as they use TCP, so every node-to-node call (forwards, scatter parts,
//! hand-off, replication) runs the production code. A link can be cut
//! and a host detached (a killed process): both also break every
//! connection the link carried, so calls in flight fail as over a reset TCP connection
//! and new ones are refused until the link heals.
//!
//! With [`MemNet::set_direct_links`], the hand-off protocol skips gRPC altogether: its
//! `handoff::MemPeerLink` finds the peer's `Handoff` among the in-process services
//! ([`MemNet::serve`]) and calls it directly, in the peer's task scope, honouring cuts
//! and kills ([`MemNet::reachable`]). It is the in-memory twin of `api::GrpcPeerLink`.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

use crate::membership::transport::{Heard, Heartbeats, INBOX, Transport, deliver};
use crate::tasks::Scope;

/// Bytes buffered in each direction of a connection.
const CONN_BUFFER: usize = 256 << 10;
/// Connections a listener queues before refusing.
const BACKLOG: usize = 128;

struct Host {
    inbox: mpsc::Sender<Vec<u8>>,
    heard: Heard,
}

struct Conn {
    client: SocketAddr,
    server: SocketAddr,
    ctl: Weak<Ctl>,
}

struct Service {
    host: SocketAddr,
    service: Weak<dyn Any + Send + Sync>,
    scope: Option<Scope>,
}

#[derive(Default)]
struct NetState {
    hosts: HashMap<SocketAddr, Host>,
    /// gRPC address -> (its host, the accept queue).
    listeners: HashMap<SocketAddr, (SocketAddr, mpsc::Sender<MemConn>)>,
    /// Directed links that carry nothing: (from, to).
    cut: HashSet<(SocketAddr, SocketAddr)>,
    conns: Vec<Conn>,
    /// Hand-off calls go straight to the peer (see the module docs).
    direct: bool,
    /// In-process services: address -> (its host, the service, the task scope it runs in).
    services: HashMap<SocketAddr, Service>,
    /// How long a direct history-segments call waits after listing the segments and
    /// before sending them (a slow copy of a large history, for scenarios).
    history_delay: std::time::Duration,
}

impl NetState {
    fn linked(&self, a: SocketAddr, b: SocketAddr) -> bool {
        !self.cut.contains(&(a, b)) && !self.cut.contains(&(b, a))
    }

    /// Both hosts attached and linked.
    fn reachable(&self, a: SocketAddr, b: SocketAddr) -> bool {
        self.hosts.contains_key(&a) && self.hosts.contains_key(&b) && self.linked(a, b)
    }

    /// Breaks every open connection that `keep` rejects, and forgets closed ones.
    fn break_conns(&mut self, keep: impl Fn(&NetState, &Conn) -> bool) {
        let conns = std::mem::take(&mut self.conns);
        for c in conns {
            let Some(ctl) = c.ctl.upgrade() else { continue };
            if keep(self, &c) {
                self.conns.push(c);
            } else {
                ctl.break_now();
            }
        }
    }
}

/// The network (cheap to clone; every clone is the same network).
#[derive(Clone, Default)]
pub struct MemNet {
    state: Arc<Mutex<NetState>>,
}

impl MemNet {
    pub fn new() -> MemNet {
        MemNet::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().expect("memnet lock")
    }

    /// Attaches (or re-attaches, after a simulated restart) a host's gossip socket.
    pub fn endpoint(&self, addr: SocketAddr) -> (MemTransport, mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = mpsc::channel(INBOX);
        let heard = Heard::default();
        self.lock().hosts.insert(addr, Host { inbox: tx, heard: heard.clone() });
        (MemTransport { me: addr, net: self.clone(), heard }, rx)
    }

    /// Listens for gRPC connections at `grpc` on `host`: the stream to hand tonic's
    /// `serve_with_incoming`.
    pub fn listen(&self, grpc: SocketAddr, host: SocketAddr) -> impl Stream<Item = io::Result<MemConn>> + use<> {
        let (tx, rx) = mpsc::channel(BACKLOG);
        self.lock().listeners.insert(grpc, (host, tx));
        ReceiverStream::new(rx).map(Ok)
    }

    /// What `host` connects to others' gRPC addresses with.
    pub fn connector(&self, host: SocketAddr) -> MemConnector {
        MemConnector { net: self.clone(), from: host }
    }

    /// Carries nothing between `a` and `b`, either way; breaks their connections.
    pub fn cut(&self, a: SocketAddr, b: SocketAddr) {
        let mut s = self.lock();
        s.cut.insert((a, b));
        s.cut.insert((b, a));
        s.break_conns(|s, c| s.linked(c.client, c.server));
    }

    /// Cuts `a` off from every other host in `others`.
    pub fn isolate(&self, a: SocketAddr, others: &[SocketAddr]) {
        for o in others {
            if *o != a {
                self.cut(a, *o);
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.lock().cut.clear();
    }

    /// Detaches a host (a killed process): its datagrams and connections are gone, its
    /// listeners refuse.
    pub fn detach(&self, host: SocketAddr) {
        let mut s = self.lock();
        s.hosts.remove(&host);
        s.listeners.retain(|_, (h, _)| *h != host);
        s.services.retain(|_, x| x.host != host);
        s.break_conns(|_, c| c.client != host && c.server != host);
    }

    /// Hand-off calls between nodes go straight to the peer's `Handoff` (set before the
    /// nodes start).
    pub fn set_direct_links(&self, on: bool) {
        self.lock().direct = on;
    }

    pub fn direct_links(&self) -> bool {
        self.lock().direct
    }

    /// Direct history-segments calls (copies of older history) wait this long after
    /// listing the segments, as copies of a large history would.
    pub fn set_history_delay(&self, d: std::time::Duration) {
        self.lock().history_delay = d;
    }

    pub fn history_delay(&self) -> std::time::Duration {
        self.lock().history_delay
    }

    /// Offers `service` (held weakly: it dies with its node) at `addr` on `host`; its
    /// calls run in the calling task's scope (the node's).
    pub fn serve(&self, addr: SocketAddr, host: SocketAddr, service: Weak<dyn Any + Send + Sync>) {
        self.lock().services.insert(addr, Service { host, service, scope: Scope::current() });
    }

    /// The service at `addr`, if its host is attached: (host, service, its scope).
    pub fn service(&self, addr: SocketAddr) -> Option<(SocketAddr, Arc<dyn Any + Send + Sync>, Option<Scope>)> {
        let s = self.lock();
        let x = s.services.get(&addr)?;
        Some((x.host, x.service.upgrade()?, x.scope.clone()))
    }

    /// Both hosts attached, and the link between them not cut.
    pub fn reachable(&self, a: SocketAddr, b: SocketAddr) -> bool {
        self.lock().reachable(a, b)
    }

    fn connect(&self, from: SocketAddr, to_grpc: SocketAddr) -> io::Result<MemConn> {
        let mut s = self.lock();
        let refused = || io::Error::new(io::ErrorKind::ConnectionRefused, format!("{to_grpc}: nothing listens"));
        let (host, accept) = s.listeners.get(&to_grpc).cloned().ok_or_else(refused)?;
        if !s.hosts.contains_key(&from) || !s.linked(from, host) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("{to_grpc}: unreachable")));
        }
        let (a, b) = tokio::io::duplex(CONN_BUFFER);
        let ctl = Arc::new(Ctl::default());
        let server = MemConn { io: a, ctl: ctl.clone() };
        accept.try_send(server).map_err(|_| refused())?;
        s.conns.push(Conn { client: from, server: host, ctl: Arc::downgrade(&ctl) });
        Ok(MemConn { io: b, ctl })
    }
}

/// One host's gossip socket on a [`MemNet`].
#[derive(Clone)]
pub struct MemTransport {
    me: SocketAddr,
    net: MemNet,
    heard: Heard,
}

impl MemTransport {
    /// The heartbeat side of this socket (for the quorum lease).
    pub fn heartbeats(&self) -> Heartbeats {
        Heartbeats::new(Arc::new(self.clone()), self.heard.clone())
    }
}

impl Transport for MemTransport {
    fn send(&self, to: SocketAddr, packet: &[u8]) {
        let s = self.net.lock();
        if s.cut.contains(&(self.me, to)) || !s.hosts.contains_key(&self.me) {
            return;
        }
        if let Some(h) = s.hosts.get(&to) {
            deliver(&h.heard, &h.inbox, self.me, packet);
        }
    }
}

/// Both ends of a connection share this: once broken, every read and write fails.
#[derive(Default)]
struct Ctl {
    broken: AtomicBool,
    /// The tasks waiting to read and to write.
    wakers: Mutex<[Option<Waker>; 2]>,
}

impl Ctl {
    fn break_now(&self) {
        self.broken.store(true, Ordering::Release);
        let ws = std::mem::take(&mut *self.wakers.lock().expect("conn wakers"));
        for w in ws.into_iter().flatten() {
            w.wake();
        }
    }

    /// Registers the waiting task in `slot`, then says whether the connection broke.
    fn check(&self, slot: usize, cx: &Context<'_>) -> io::Result<()> {
        {
            let mut ws = self.wakers.lock().expect("conn wakers");
            if !ws[slot].as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                ws[slot] = Some(cx.waker().clone());
            }
        }
        if self.broken.load(Ordering::Acquire) {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "link cut"));
        }
        Ok(())
    }
}

/// One end of an in-memory connection.
pub struct MemConn {
    io: DuplexStream,
    ctl: Arc<Ctl>,
}

impl AsyncRead for MemConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.ctl.check(0, cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for MemConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.ctl.check(1, cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.ctl.check(1, cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for MemConn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// tonic's connector for a host on a [`MemNet`]: `http://ADDR` URIs name gRPC
/// addresses that [`MemNet::listen`] registered.
#[derive(Clone)]
pub struct MemConnector {
    net: MemNet,
    from: SocketAddr,
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<MemConn>>> + Send>>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for MemConnector {
    type Response = TokioIo<MemConn>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let (net, from) = (self.net.clone(), self.from);
        Box::pin(async move {
            let to: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: not host:port")))?;
            net.connect(from, to).map(TokioIo::new)
        })
    }
}
