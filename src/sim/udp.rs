//! `locus sim --udp`: drivers send their fixes as compact UDP datagrams (see `udp`).
//!
//! Each driver's first fix goes over gRPC (a session needs a known driver); then the
//! simulator opens a session per driver (`Sessions.Open`, many at once, spread over the
//! nodes) and sends every later fix as one datagram to the node that opened it. Every
//! [`ACK_EVERY`]th datagram asks for an ack: the status line shows acks received of
//! those asked (the loss, both ways) and refusals by reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

use crate::auth::layer::AuthChannel;
use crate::pb;
use crate::pb::sessions_client::SessionsClient;
use crate::udp::{SessionId, quantise, seal};

/// One datagram in this many asks for an ack.
pub const ACK_EVERY: u32 = 16;
/// Sessions opened at once.
const OPENING: usize = 64;

#[derive(Default)]
pub struct UdpStats {
    pub sent: AtomicU64,
    /// `sent` at the last status line.
    shown: AtomicU64,
    pub asked: AtomicU64,
    pub acked: AtomicU64,
    pub refused: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl UdpStats {
    /// ` | udp fixes/s=… sent=… acks=…/… refused: …` for the status line, `secs` after
    /// the last one.
    pub fn line(&self, secs: f64) -> String {
        let (asked, acked) = (self.asked.load(Ordering::Relaxed), self.acked.load(Ordering::Relaxed));
        let sent = self.sent.load(Ordering::Relaxed);
        let rate = sent.saturating_sub(self.shown.swap(sent, Ordering::Relaxed)) as f64 / secs.max(1e-9);
        let refused = self.refused.lock().expect("stats");
        let r: Vec<String> = refused.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            " | udp fixes/s={rate:.0} sent={sent} acks={acked}/{asked} ({:.2}% lost, in flight included) refused (of those acked): {}",
            if asked == 0 { 0.0 } else { 100.0 * asked.saturating_sub(acked) as f64 / asked as f64 },
            if r.is_empty() { "none".to_string() } else { r.join(" ") }
        )
    }
}

struct Session {
    id: SessionId,
    key: [u8; 16],
    to: SocketAddr,
}

/// The simulator's UDP side: a socket and a session per driver.
pub struct UdpOutlet {
    sock: Arc<UdpSocket>,
    sessions: Vec<Option<Session>>,
    seq: u32,
    pub stats: Arc<UdpStats>,
}

impl UdpOutlet {
    /// Opens a session for each of `ids` (known drivers) through `channel`.
    pub async fn open(channel: AuthChannel, ids: Vec<String>) -> anyhow::Result<UdpOutlet> {
        let mut sessions: Vec<Option<Session>> = (0..ids.len()).map(|_| None).collect();
        let mut set = JoinSet::new();
        let mut it = ids.into_iter().enumerate();
        let mut failed = 0usize;
        loop {
            while set.len() < OPENING {
                let Some((i, id)) = it.next() else { break };
                let mut c = SessionsClient::new(channel.clone());
                set.spawn(async move { (i, c.open(pb::OpenSessionRequest { driver_id: id }).await) });
            }
            let Some(r) = set.join_next().await else { break };
            match r? {
                (i, Ok(s)) => {
                    let s = s.into_inner();
                    anyhow::ensure!(
                        !s.udp_addr.is_empty(),
                        "the node does not take UDP fixes: start it with --udp-addr"
                    );
                    let key: [u8; 16] = s.key.as_slice().try_into()?;
                    sessions[i] = Some(Session { id: SessionId(s.session_id), key, to: s.udp_addr.parse()? });
                }
                (_, Err(_)) => failed += 1,
            }
        }
        if failed > 0 {
            eprintln!("[sim] {failed} sessions did not open; those drivers stay on gRPC");
        }
        let sock = Arc::new(UdpSocket::bind("0.0.0.0:0").await?);
        let stats = Arc::new(UdpStats::default());
        tokio::spawn(read_acks(sock.clone(), stats.clone()));
        Ok(UdpOutlet { sock, sessions, seq: 0, stats })
    }

    /// Sends driver `i`'s fix as a datagram; false if it has no session (send it over
    /// gRPC).
    pub fn send(&mut self, i: usize, u: &pb::LocationUpdate) -> bool {
        let Some(Some(s)) = self.sessions.get(i) else { return false };
        self.seq = self.seq.wrapping_add(1);
        let ack = self.seq.is_multiple_of(ACK_EVERY);
        let f = pb::UdpFix {
            status: u.status.max(0) as u32,
            order_id: u.trip_id.clone(),
            trip_cost_cents: (u.trip_cost * 100.0).round().max(0.0) as u32,
            ack,
            ..quantise(s.id, u.lat, u.lon, u.timestamp_ms, u.heading_deg, u.speed_mps, u.accuracy_m, self.seq)
        };
        // A full socket buffer drops it, as the network would: the acks show it.
        let _ = self.sock.try_send_to(&seal(&f, &s.key), s.to);
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        if ack {
            self.stats.asked.fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

async fn read_acks(sock: Arc<UdpSocket>, stats: Arc<UdpStats>) {
    let mut buf = [0u8; 512];
    while let Ok(n) = sock.recv(&mut buf).await {
        let Ok(a) = pb::UdpAck::decode(&buf[..n]) else { continue };
        if a.seq.is_multiple_of(ACK_EVERY) {
            stats.acked.fetch_add(1, Ordering::Relaxed);
        }
        if !a.accepted {
            *stats.refused.lock().expect("stats").entry(a.reason).or_default() += 1;
        }
    }
}
