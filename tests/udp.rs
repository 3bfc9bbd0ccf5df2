//! Compact UDP fixes end to end, over real node processes and a real UDP socket:
//! sessions opened through any node, datagrams sent to one node for drivers both nodes
//! own (forwarded in batches to the owner), acks, and every drop by reason (forged,
//! replayed, closed session, garbage), with nothing panicking.

mod common;

use std::time::Duration;

use common::cluster::TestCluster;
use common::{by_id, fix, http_get, now_ms};
use locus::pb;
use locus::pb::sessions_client::SessionsClient;
use locus::udp::{Keys, SessionId, quantise, seal};
use prost::Message;
use tokio::net::UdpSocket;
use tonic::Code;

/// Waits for `n` acks; returns them by seq.
async fn acks(sock: &UdpSocket, n: usize) -> std::collections::HashMap<u32, pb::UdpAck> {
    let mut out = std::collections::HashMap::new();
    let mut buf = [0u8; 512];
    while out.len() < n {
        let r = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await;
        let len = r.unwrap_or_else(|_| panic!("{} of {n} acks", out.len())).unwrap();
        let a = pb::UdpAck::decode(&buf[..len]).unwrap();
        out.insert(a.seq, a);
    }
    out
}

/// The count of a Prometheus counter with one label, or 0.
fn counter(metrics: &str, name: &str, label: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_fixes_reach_their_owners_through_any_node_and_bad_datagrams_are_dropped_by_reason() {
    let c = TestCluster::start_with(2, &["--udp-addr", "127.0.0.1:0"]);
    c.converge(&["n0", "n1"], Duration::from_secs(20)).await;
    // Drivers on both nodes, known by a first gRPC fix.
    let ts = now_ms() - 10_000;
    let ids: Vec<String> = (0..40).map(|i| format!("udp-drv-{i}")).collect();
    let mut loc = c.client(0).await;
    for id in &ids {
        loc.update(fix(id, 52.5, 13.4, ts)).await.unwrap();
    }
    // Sessions opened through n0: the app is told n0's UDP address.
    let mut s0 = SessionsClient::connect(c.node(0).grpc.clone()).await.unwrap();
    let mut sessions = Vec::new();
    for id in &ids {
        let s = s0.open(pb::OpenSessionRequest { driver_id: id.clone() }).await.unwrap().into_inner();
        assert_eq!(SessionId(s.session_id).partition(), locus::keys::partition_of(id.as_bytes()));
        assert_eq!(s.key.len(), 16);
        sessions.push(s);
    }
    let target = sessions[0].udp_addr.clone();
    assert!(!target.is_empty() && sessions.iter().all(|s| s.udp_addr == target), "n0's address for every session");
    let e = s0.open(pb::OpenSessionRequest { driver_id: "nobody".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("first fix"), "{}", e.message());
    let e = s0.open(pb::OpenSessionRequest { driver_id: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("driver_id"), "{}", e.message());

    // One datagram per driver, to n0, each asking for an ack.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(&target).await.unwrap();
    let key = |i: usize| -> [u8; 16] { sessions[i].key.clone().try_into().unwrap() };
    let datagram = |i: usize, t: i64| {
        let f = pb::UdpFix {
            ack: true,
            ..quantise(SessionId(sessions[i].session_id), 52.5001 + i as f64 * 1e-5, 13.4, t, 90.0, 8.0, 5.0, i as u32)
        };
        seal(&f, &key(i))
    };
    let t1 = now_ms() - 1_000;
    for i in 0..ids.len() {
        let d = datagram(i, t1);
        assert!(d.len() <= 60, "{} bytes", d.len());
        sock.send(&d).await.unwrap();
    }
    let got = acks(&sock, ids.len()).await;
    assert!(got.values().all(|a| a.accepted), "{got:?}");
    // Read back through the other node: every driver moved, whichever node owns it.
    let mut loc1 = c.client(1).await;
    let mut remote = 0;
    for (i, id) in ids.iter().enumerate() {
        let d = loc1.get_driver(by_id(id)).await.unwrap().into_inner();
        assert!((d.lat - (52.5001 + i as f64 * 1e-5)).abs() < 1e-6, "{id}: {d:?}");
        assert_eq!(d.timestamp_ms, t1, "{id}");
        assert_eq!(d.session, SessionId(sessions[i].session_id).recorded());
        let owner = c.admin(0).await.lookup(pb::LookupRequest { key: id.clone(), successors: 1 }).await.unwrap();
        remote += usize::from(owner.into_inner().owner.unwrap().name == "n1");
    }
    assert!(remote > 0 && remote < ids.len(), "{remote} of the drivers on n1: the test would prove less");

    // A replay is refused (not newer than the driver's last fix); a forged one is dropped
    // unanswered; garbage too; a closed session's fix is refused by name.
    sock.send(&datagram(0, t1)).await.unwrap();
    let mut forged = datagram(1, t1 + 500);
    forged[12] ^= 0x40;
    sock.send(&forged).await.unwrap();
    sock.send(b"not a datagram at all").await.unwrap();
    // A late Close naming an older session ends nothing; naming the current one, it does.
    let close = |session_id: u64| pb::CloseSessionRequest { driver_id: ids[2].clone(), session_id };
    assert!(!s0.close(close(sessions[2].session_id ^ 1)).await.unwrap().into_inner().closed);
    let closed = s0.close(close(sessions[2].session_id)).await.unwrap().into_inner();
    assert!(closed.closed);
    sock.send(&datagram(2, t1 + 500)).await.unwrap();
    let got = acks(&sock, 2).await;
    assert_eq!((got[&0].accepted, got[&0].reason.as_str()), (false, "replayed"));
    assert_eq!((got[&2].accepted, got[&2].reason.as_str()), (false, "unknown_session"));
    // A datagram sealed with another cluster's key.
    let foreign = Keys::new(Some(b"another cluster's secret, 32 b.!"));
    let sid = SessionId(sessions[3].session_id);
    let f = pb::UdpFix { ack: true, ..quantise(sid, 52.5, 13.4, t1 + 500, 0.0, 0.0, 0.0, 3) };
    sock.send(&seal(&f, &foreign.session_key(sid))).await.unwrap();
    // The drops are counted by reason on n0 (the node that received them).
    let ok = common::eventually(Duration::from_secs(3), || async {
        let (_, m) = http_get(&c.node(0).http, "/metrics").await;
        counter(&m, "locus_udp_dropped_total", "reason=\"unauthenticated\"") >= 2
            && counter(&m, "locus_udp_dropped_total", "reason=\"malformed\"") >= 1
    })
    .await;
    assert!(ok, "forged and garbage datagrams counted");
    let d = loc1.get_driver(by_id(&ids[1])).await.unwrap().into_inner();
    assert_eq!(d.timestamp_ms, t1, "the forged fix changed nothing");
    // Closing again is harmless; the driver stays, without a session.
    let again = s0.close(close(0)).await.unwrap().into_inner();
    assert!(!again.closed);
    // No fix sets a UDP session: not over gRPC either.
    let forged = pb::LocationUpdate {
        session: SessionId(sessions[2].session_id).recorded(),
        ..fix(&ids[2], 52.5, 13.4, t1 + 600)
    };
    let e = loc1.update(forged).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("session"), "{}", e.message());
    // A datagram may not claim DISPATCHED (only dispatch sets it).
    let f = pb::UdpFix {
        status: 4,
        ack: true,
        ..quantise(SessionId(sessions[5].session_id), 52.5, 13.4, t1 + 600, 0.0, 0.0, 0.0, 5)
    };
    sock.send(&seal(&f, &key(5))).await.unwrap();
    let got = acks(&sock, 1).await;
    assert_eq!((got[&5].accepted, got[&5].reason.as_str()), (false, "invalid"));
    assert_eq!(loc1.get_driver(by_id(&ids[2])).await.unwrap().into_inner().session, "");
    // A fresh fix after all that still lands.
    sock.send(&datagram(4, t1 + 700)).await.unwrap();
    let got = acks(&sock, 1).await;
    assert!(got[&4].accepted, "{got:?}");
}
