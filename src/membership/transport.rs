//! How gossip packets travel: UDP in production, an in-process network in tests.
//!
//! A transport only sends; what arrives is delivered into a bounded channel that the
//! membership shell reads. Sends never block: gossip is datagrams, and a packet that
//! cannot be sent now is as good as lost (SWIM tolerates loss).
//!
//! Both transports also carry tiny heartbeats besides gossip ([`Heartbeats`]), each
//! with the sender's ring checksum, and note when each peer last sent one naming this
//! node's ring: what the quorum lease (`ownership::has_quorum`) reads. They never reach
//! foca.
//!
//! The in-process network (the `memnet` module, a layer above this one) serializes
//! nothing away: it carries the same bytes UDP would, and can cut links (one direction
//! or both) to make partitions, as chitchat's test transport does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::seal::{Opener, Sealer};

/// Gossip packets waiting for the membership task. Small: SWIM tolerates drops.
pub const INBOX: usize = 1024;

/// Sends one gossip packet.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, to: SocketAddr, packet: &[u8]);
}

impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn send(&self, to: SocketAddr, packet: &[u8]) {
        (**self).send(to, packet)
    }
}

/// A heartbeat datagram: these 8 bytes, the sender's ring checksum and its previous one
/// (u64 BE each; the previous is 0 once the change is older than [`RING_CHANGE_GRACE`]),
/// 1 if the sender considers the receiver alive, then the sender's wall clock (ms, u64
/// BE). No gossip packet is this short.
///
/// The send time keeps a paused process honest: heartbeats that waited in its socket
/// buffer while it was stopped (SIGSTOP, a VM pause, a long GC-like stall) count as
/// heard when they were sent, not when it reads them on waking, so they cannot renew a
/// quorum lease it lost meanwhile. The lease needs no clock agreement: a heartbeat's age
/// is its (receive − send) time above the smallest seen from that peer lately (the
/// clocks' offset and the network's base delay cancel out; receive times are monotonic).
pub const HEARTBEAT: &[u8] = b"LOCUS-HB";
const HEARTBEAT_LEN: usize = 33;
/// The earlier format (no send time), still read during a rolling upgrade.
const HEARTBEAT_V1_LEN: usize = 25;
/// The window over which the smallest (receive − send) per peer is kept.
const DELAY_WINDOW_MS: i64 = 10_000;
/// How long after a ring change a node still agrees with peers on the ring before it
/// (rings change on every node within a debounce and a gossip round of each other).
pub const RING_CHANGE_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// When each peer (by the address its packets come from: its gossip address) last sent
/// a heartbeat naming the same ring as this node's and this node alive: a peer that
/// agrees with this node on who is in the cluster.
#[derive(Clone)]
pub struct Heard {
    /// Receive times are read on this monotonic clock (ms since `base`): a step of this
    /// node's wall clock does not age every heartbeat at once.
    base: Instant,
    agreed: Arc<Mutex<HashMap<SocketAddr, Instant>>>,
    /// When each peer last sent any heartbeat at all (agreeing or not): a peer heard
    /// lately may still hold its own lease, whatever this node's view says of it.
    any: Arc<Mutex<HashMap<SocketAddr, Instant>>>,
    /// This node's ring checksums (current, previous while within the grace), as the
    /// quorum task last set them.
    mine: Arc<Mutex<Rings>>,
    /// Per peer, the smallest (receive − send) wall time seen in this and the previous
    /// window: the base a heartbeat's age is measured from.
    delays: Arc<Mutex<HashMap<SocketAddr, Delays>>>,
}

impl Default for Heard {
    fn default() -> Heard {
        Heard {
            base: Instant::now(),
            agreed: Arc::default(),
            any: Arc::default(),
            mine: Arc::default(),
            delays: Arc::default(),
        }
    }
}

#[derive(Clone, Copy)]
struct Delays {
    current: i64,
    previous: i64,
    since: i64,
}

#[derive(Default)]
struct Rings {
    current: u64,
    previous: u64,
    changed: Option<Instant>,
}

impl Rings {
    fn previous(&self) -> u64 {
        match self.changed {
            Some(t) if t.elapsed() < RING_CHANGE_GRACE => self.previous,
            _ => 0,
        }
    }
}

impl Heard {
    /// This node's monotonic clock, ms.
    fn mono_ms(&self) -> i64 {
        Instant::now().saturating_duration_since(self.base).as_millis() as i64
    }

    /// How long ago a heartbeat from `from` sent at `sent_ms` (its wall clock) left, read
    /// at `recv_ms` (this node's monotonic clock): only differences of (receive − send)
    /// count, so the clocks' offset cancels out.
    fn age(&self, from: SocketAddr, sent_ms: i64, recv_ms: i64) -> std::time::Duration {
        let d = recv_ms.saturating_sub(sent_ms);
        let mut m = self.delays.lock().expect("delays lock");
        if m.len() > 1024 {
            // Peers long gone (or, without a cluster key, forged sources).
            m.retain(|_, e| recv_ms - e.since <= 3 * DELAY_WINDOW_MS);
        }
        let e = m.entry(from).or_insert(Delays { current: d, previous: d, since: recv_ms });
        if recv_ms - e.since > DELAY_WINDOW_MS {
            e.previous = e.current;
            e.current = d;
            e.since = recv_ms;
        } else {
            e.current = e.current.min(d);
        }
        let base = e.current.min(e.previous);
        std::time::Duration::from_millis(d.saturating_sub(base).max(0) as u64)
    }

    fn note(&self, from: SocketAddr, theirs: [u64; 2], alive: bool, at: Instant) {
        let agree = {
            let r = self.mine.lock().expect("rings lock");
            let mine = [r.current, r.previous()];
            theirs.iter().any(|t| *t != 0 && mine.contains(t))
        };
        // A late heartbeat (read after a newer one) never moves a time back.
        let later = |t: &mut Instant| *t = (*t).max(at);
        if alive && agree {
            self.agreed.lock().expect("heard lock").entry(from).and_modify(later).or_insert(at);
        }
        self.any.lock().expect("heard lock").entry(from).and_modify(later).or_insert(at);
    }

    /// Peers that sent any heartbeat within `within` of now.
    pub fn heard_within(&self, within: std::time::Duration) -> Vec<SocketAddr> {
        let now = Instant::now();
        let mut any = self.any.lock().expect("heard lock");
        any.retain(|_, t| now.saturating_duration_since(*t) < within * 4);
        any.iter().filter(|(_, t)| now.saturating_duration_since(**t) < within).map(|(a, _)| *a).collect()
    }

    pub fn snapshot(&self) -> HashMap<SocketAddr, Instant> {
        self.agreed.lock().expect("heard lock").clone()
    }
}

/// Sends heartbeats over the gossip transport and reads when peers last agreed.
#[derive(Clone)]
pub struct Heartbeats {
    out: Arc<dyn Transport>,
    pub heard: Heard,
}

impl Heartbeats {
    pub fn new(out: Arc<dyn Transport>, heard: Heard) -> Heartbeats {
        Heartbeats { out, heard }
    }

    /// Sets the ring checksum this node routes by (sent in, and compared with, beats).
    pub fn set_ring(&self, checksum: u64) {
        let mut r = self.heard.mine.lock().expect("rings lock");
        if r.current != checksum {
            r.previous = r.current;
            r.current = checksum;
            r.changed = Some(Instant::now());
        }
    }

    /// `alive`: whether this node considers `to` alive (a suspected or down member must
    /// not count this node towards its quorum).
    pub fn beat(&self, to: SocketAddr, alive: bool) {
        let mut b = [0u8; HEARTBEAT_LEN];
        b[..8].copy_from_slice(HEARTBEAT);
        {
            let r = self.heard.mine.lock().expect("rings lock");
            b[8..16].copy_from_slice(&r.current.to_be_bytes());
            b[16..24].copy_from_slice(&r.previous().to_be_bytes());
        }
        b[24] = u8::from(alive);
        b[25..33].copy_from_slice(&(crate::clock::wall_ms().max(0) as u64).to_be_bytes());
        self.out.send(to, &b);
    }
}

/// What a transport does with a packet that arrived from `from`: a heartbeat is noted
/// in `heard`, anything else goes to the membership task's inbox. False once the inbox
/// is closed (the node stopped).
pub fn deliver(heard: &Heard, inbox: &mpsc::Sender<Vec<u8>>, from: SocketAddr, packet: &[u8]) -> bool {
    if (packet.len() == HEARTBEAT_LEN || packet.len() == HEARTBEAT_V1_LEN) && packet.starts_with(HEARTBEAT) {
        let cur = u64::from_be_bytes(packet[8..16].try_into().expect("8 bytes"));
        let prev = u64::from_be_bytes(packet[16..24].try_into().expect("8 bytes"));
        let now = Instant::now();
        let at = match packet.get(25..33) {
            Some(t) => {
                let sent = u64::from_be_bytes(t.try_into().expect("8 bytes")) as i64;
                let age = heard.age(from, sent, heard.mono_ms());
                now.checked_sub(age).unwrap_or(now)
            }
            None => now,
        };
        heard.note(from, [cur, prev], packet[24] == 1, at);
        return true;
    }
    match inbox.try_send(packet.to_vec()) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            metrics::counter!("locus_channel_dropped_total", "channel" => "gossip_inbox").increment(1);
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// Gossip over a UDP socket; with a key, every datagram is sealed and opened
/// (`membership::seal`: HMAC, replay window).
#[derive(Clone)]
pub struct UdpTransport {
    socket: Arc<UdpSocket>,
    heard: Heard,
    sealer: Option<Arc<Sealer>>,
}

impl UdpTransport {
    /// Binds `addr` and starts a receive loop that feeds the returned channel. With
    /// `key` (the cluster's gossip key) only authentic, fresh datagrams get through;
    /// the others are counted in `locus_gossip_dropped_total{reason}`.
    pub async fn bind(
        addr: SocketAddr,
        key: Option<ring::hmac::Key>,
    ) -> std::io::Result<(UdpTransport, SocketAddr, mpsc::Receiver<Vec<u8>>)> {
        let socket = Arc::new(UdpSocket::bind(addr).await?);
        let local = socket.local_addr()?;
        let (tx, rx) = mpsc::channel(INBOX);
        let rsock = socket.clone();
        let heard = Heard::default();
        let noted = heard.clone();
        let sealer = key.clone().map(|k| Arc::new(Sealer::new(k)));
        // The receive loop owns the replay state.
        let mut opener = key.map(Opener::new);
        crate::tasks::spawn("gossip_receive", async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                match rsock.recv_from(&mut buf).await {
                    Ok((n, from)) => {
                        let packet = match &mut opener {
                            None => &buf[..n],
                            Some(o) => match o.open(&buf[..n], crate::clock::wall_ms()) {
                                Ok(p) => p,
                                Err(why) => {
                                    metrics::counter!("locus_gossip_dropped_total", "reason" => why.as_str())
                                        .increment(1);
                                    tracing::debug!(%from, reason = why.as_str(), "gossip datagram dropped");
                                    continue;
                                }
                            },
                        };
                        if !deliver(&noted, &tx, from, packet) {
                            return;
                        }
                    }
                    // ICMP errors from an earlier send surface here on some platforms.
                    Err(e) => tracing::debug!(error = %e, "gossip recv"),
                }
            }
        });
        Ok((UdpTransport { socket, heard, sealer }, local, rx))
    }

    /// The heartbeat side of this socket (for the quorum lease).
    pub fn heartbeats(&self) -> Heartbeats {
        Heartbeats::new(Arc::new(self.clone()), self.heard.clone())
    }
}

impl Transport for UdpTransport {
    fn send(&self, to: SocketAddr, packet: &[u8]) {
        let sealed;
        let packet = match &self.sealer {
            Some(s) => {
                sealed = s.seal(packet, crate::clock::wall_ms());
                &sealed[..]
            }
            None => packet,
        };
        if let Err(e) = self.socket.try_send_to(packet, to) {
            tracing::debug!(error = %e, %to, "gossip send");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeats_age_is_measured_from_the_peers_base_delay_whatever_the_skew() {
        let h = Heard::default();
        let a: SocketAddr = "10.0.0.1:7946".parse().unwrap();
        // The peer's clock is 40 s behind; the network takes 2 to 5 ms.
        let skew = 40_000;
        for (i, delay) in [5, 3, 2, 4].into_iter().enumerate() {
            let recv = 1_000_000 + i as i64 * 100;
            assert!(h.age(a, recv - skew - delay, recv).as_millis() <= 3);
        }
        // Sent 6 s before it was read (it waited in a paused process's socket buffer).
        let recv = 1_001_000;
        assert_eq!(h.age(a, recv - skew - 2 - 6_000, recv).as_millis(), 6_000);
        // Past the window, the base follows the peer (its clock was stepped by 1 s).
        let later = recv + 2 * DELAY_WINDOW_MS + 10;
        h.age(a, later - skew + 1_000 - 2, later);
        let later = later + DELAY_WINDOW_MS + 10;
        assert!(h.age(a, later - skew + 1_000 - 2, later).as_millis() <= 1);
    }

    #[tokio::test]
    async fn heartbeats_read_late_do_not_count_as_heard_now() {
        let h = Heard::default();
        h.mine.lock().unwrap().current = 7;
        let a: SocketAddr = "10.0.0.2:7946".parse().unwrap();
        let (tx, _rx) = mpsc::channel(4);
        let beat = |sent_ms: i64| {
            let mut b = [0u8; HEARTBEAT_LEN];
            b[..8].copy_from_slice(HEARTBEAT);
            b[8..16].copy_from_slice(&7u64.to_be_bytes());
            b[24] = 1;
            b[25..33].copy_from_slice(&(sent_ms as u64).to_be_bytes());
            b
        };
        let now = crate::clock::wall_ms();
        assert!(deliver(&h, &tx, a, &beat(now - 1)));
        let fresh = h.snapshot()[&a];
        // A beat sent 6 s ago, read now: it does not renew the agreement.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(deliver(&h, &tx, a, &beat(crate::clock::wall_ms() - 6_000)));
        assert_eq!(h.snapshot()[&a], fresh, "a stale beat moved the agreement time");
        assert!(h.heard_within(std::time::Duration::from_secs(1)).contains(&a));
    }
}
