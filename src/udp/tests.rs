use proptest::prelude::*;

use super::*;

fn keys() -> Keys {
    Keys::new(Some(b"a cluster secret of 32 bytes...!"))
}

/// A driver on a trip in Berlin, at 2026 times.
fn typical(session: SessionId) -> pb::UdpFix {
    pb::UdpFix {
        status: 3,
        order_id: "ord-84421".into(),
        trip_cost_cents: 1_250,
        ..quantise(session, 52.520_008, 13.404_954, 1_796_400_000_000, 271.0, 13.9, 6.0, 4_711)
    }
}

#[test]
fn a_typical_fix_is_under_60_bytes_and_reads_back() {
    let k = keys();
    let id = SessionId::new(777, 0x2b_c0ff_ee15_f00d);
    let key = k.session_key(id);
    let d = seal(&typical(id), &key);
    assert!(d.len() <= 60, "{} bytes", d.len());
    let idle = seal(&pb::UdpFix { status: 0, order_id: String::new(), trip_cost_cents: 0, ..typical(id) }, &key);
    assert!(idle.len() <= 44, "{} bytes without a trip", idle.len());
    let acked = seal(&pb::UdpFix { ack: true, ..typical(id) }, &key);
    assert_eq!(acked.len(), d.len() + 2, "an ack request costs 2 bytes");
    let f = open(&k, &d).unwrap();
    assert_eq!(f, typical(id));
    let fix = fix_input(f.clone(), "drv-1".into()).unwrap();
    assert!((fix.lat - 52.520_008).abs() < 1e-7 && (fix.lon - 13.404_954).abs() < 1e-7);
    assert_eq!((fix.heading_deg, fix.speed_mps, fix.accuracy_m), (272.0, 13.9, 6.0));
    assert_eq!((fix.status, fix.trip_id.as_str(), fix.trip_cost), (Some(Status::OnTrip), "ord-84421", 12.5));
    assert_eq!(fix.session, id.recorded());
    let mut buf = [0; 20];
    assert_eq!(id.recorded_in(&mut buf), id.recorded());
    assert_eq!(id.partition(), 777);
    assert_eq!(SessionId(u64::MAX).partition(), PARTITIONS - 1);
}

#[test]
fn forged_corrupted_and_foreign_datagrams_are_dropped_by_reason() {
    let k = keys();
    let id = SessionId::new(3, 99);
    let d = seal(&typical(id), &k.session_key(id));
    // Any flipped bit: never accepted.
    for i in 0..d.len() {
        for bit in 0..8 {
            let mut x = d.clone();
            x[i] ^= 1 << bit;
            assert!(open(&k, &x).is_err(), "byte {i} bit {bit} flipped and accepted");
        }
    }
    let mut x = d.clone();
    *x.last_mut().unwrap() ^= 1;
    assert_eq!(open(&k, &x), Err(Drop::Unauthenticated));
    // Another cluster's key, the insecure default, a truncated or padded datagram.
    assert_eq!(open(&Keys::new(Some(b"another cluster's secret, 32 b.!")), &d), Err(Drop::Unauthenticated));
    assert_eq!(open(&Keys::new(None), &d), Err(Drop::Unauthenticated));
    assert_eq!(open(&k, &d[..d.len() - 1]), Err(Drop::Unauthenticated));
    assert_eq!(open(&k, &d[..12]), Err(Drop::Malformed));
    assert_eq!(open(&k, &[]), Err(Drop::Malformed));
    assert_eq!(open(&k, &vec![0x09; MAX_DATAGRAM + 1]), Err(Drop::Malformed));
    // A second session id after the first (protobuf's last-wins) is refused.
    let mut body = typical(id).encode_to_vec();
    body.push(0x09);
    body.extend_from_slice(&SessionId::new(4, 1).0.to_le_bytes());
    let m = mac(&k.session_key(id), &body);
    body.extend_from_slice(&m);
    assert_eq!(open(&k, &body), Err(Drop::Malformed));
    // An unknown status is invalid, like over gRPC.
    assert_eq!(fix_input(pb::UdpFix { status: 9, ..typical(id) }, "d".into()), Err(Drop::Invalid));
    assert_eq!(fix_input(pb::UdpFix { status: 4, ..typical(id) }, "d".into()), Err(Drop::Invalid), "DISPATCHED");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_are_dropped_or_read_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let k = keys();
        if let Ok(f) = open(&k, &bytes) {
            let _ = fix_input(f, "d".into());
        }
    }

    #[test]
    fn any_bytes_after_a_valid_session_tag_are_dropped_or_read(tail in proptest::collection::vec(any::<u8>(), 0..120)) {
        // Past the cheap checks: a MAC over arbitrary bytes makes them authentic, so
        // the protobuf decoder and the conversion see garbage.
        let k = keys();
        let id = SessionId::new(12, 34);
        let mut body = vec![0x09];
        body.extend_from_slice(&id.0.to_le_bytes());
        body.extend_from_slice(&tail);
        let m = mac(&k.session_key(id), &body);
        body.extend_from_slice(&m);
        if let Ok(f) = open(&k, &body) {
            prop_assert_eq!(f.session_id, id.0);
            let _ = fix_input(f, "d".into());
        }
    }

    #[test]
    fn fixes_round_trip(
        lat in -90.0f64..90.0, lon in -180.0f64..180.0, t in 0i64..4_000_000_000_000,
        heading in 0.0f64..360.0, speed in 0.0f64..100.0, acc in 0.0f64..500.0, seq in any::<u32>(),
        partition in 0u16..PARTITIONS, random in any::<u64>(),
    ) {
        let k = keys();
        let id = SessionId::new(partition, random);
        prop_assert_eq!(id.partition(), partition);
        let f = quantise(id, lat, lon, t, heading, speed, acc, seq);
        let back = open(&k, &seal(&f, &k.session_key(id))).unwrap();
        prop_assert_eq!(&back, &f);
        let mut buf = [0; 20];
        prop_assert_eq!(id.recorded_in(&mut buf), id.recorded());
        let fix = fix_input(back, "d".into()).unwrap();
        prop_assert!((fix.lat - lat).abs() <= 1e-7 && (fix.lon - lon).abs() <= 1e-7);
        prop_assert!((fix.heading_deg - heading).abs() <= 2.0 || (fix.heading_deg - heading).abs() >= 358.0);
        prop_assert!((fix.speed_mps - speed).abs() <= 0.05);
        prop_assert_eq!(fix.timestamp_ms, t);
    }
}

#[test]
fn the_key_cache_answers_as_open_does_and_keeps_no_forged_session() {
    let k = keys();
    let mut cache = KeyCache::new(k.clone());
    let id = SessionId::new(5, 6);
    let d = seal(&typical(id), &k.session_key(id));
    for _ in 0..2 {
        assert_eq!(cache.open(&d), open(&k, &d));
    }
    let forged = SessionId::new(5, 7);
    let bad = seal(&typical(forged), &[0; 16]);
    assert_eq!(cache.open(&bad), Err(Drop::Unauthenticated));
    assert_eq!(cache.len(), 1, "only the authentic session's key is kept");
}

#[test]
fn the_key_cache_rolls_over_to_a_second_generation_and_answers_the_same() {
    let k = keys();
    let mut cache = KeyCache::new(k.clone());
    let sealed = |r: u64| {
        let id = SessionId::new(1, r);
        (id, seal(&typical(id), &k.session_key(id)))
    };
    let (first, d0) = sealed(0);
    cache.open(&d0).unwrap();
    assert_eq!(cache.driver(first, || Some("d-0".into())).as_deref(), Some("d-0"));
    for r in 1..=KEY_CACHE_GENERATION as u64 + 5 {
        cache.open(&sealed(r).1).unwrap();
    }
    assert!(cache.map.len() < KEY_CACHE_GENERATION, "the full generation became the old one");
    assert!(cache.len() <= 2 * KEY_CACHE_GENERATION);
    // The first session is in the old generation: it opens the same and moves back,
    // with its driver.
    assert_eq!(cache.open(&d0), open(&k, &d0));
    assert!(cache.map.contains_key(&first.0));
    assert_eq!(cache.driver(first, || panic!("looked up again")).as_deref(), Some("d-0"));
}

#[test]
fn the_mac_is_siphash_2_4_as_published() {
    // The reference vector of the SipHash paper (appendix A): key 00..0f, message 00..0e.
    let key: [u8; 16] = std::array::from_fn(|i| i as u8);
    let msg: Vec<u8> = (0..15).collect();
    assert_eq!(mac(&key, &msg), 0xa129_ca61_49be_45e5u64.to_le_bytes());
}

/// Receives `count` datagrams; asserts each came from `from`.
async fn receive(rx: &tokio::net::UdpSocket, from: std::net::SocketAddr, count: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut b = mmsg::RecvBatch::default();
    while got.len() < count {
        rx.readable().await.unwrap();
        match b.recv(rx) {
            Ok(n) => {
                assert!(n <= mmsg::BATCH);
                for i in 0..n {
                    let (bytes, sender) = b.get(i);
                    assert_eq!(sender, from);
                    got.push(bytes.to_vec());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    got
}

#[tokio::test]
async fn segmented_send_arrives_as_the_same_single_datagrams() {
    let rx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    mmsg::set_recv_buffer(&rx, 1 << 20);
    // Runs of equal sizes (longer than one send's 64), sizes changing between runs.
    let datagrams: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_le_bytes().repeat(10 + (i as usize / 100) * 3)).collect();
    let sent = mmsg::send_segmented(&tx, rx.local_addr().unwrap(), &datagrams).await.unwrap();
    assert_eq!(sent, datagrams.len());
    let got = receive(&rx, tx.local_addr().unwrap(), datagrams.len()).await;
    assert_eq!(got, datagrams, "all, in order, each its own datagram");
}

#[tokio::test]
async fn batched_send_and_receive_carry_every_datagram_and_its_sender() {
    let rx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    mmsg::set_recv_buffer(&rx, 1 << 20);
    let datagrams: Vec<Vec<u8>> = (0..150u32).map(|i| i.to_le_bytes().repeat(1 + i as usize % 7)).collect();
    let sent = mmsg::send_all(&tx, rx.local_addr().unwrap(), &datagrams).await.unwrap();
    assert_eq!(sent, datagrams.len());
    let got = receive(&rx, tx.local_addr().unwrap(), datagrams.len()).await;
    assert_eq!(got, datagrams, "all, in order, whole");
    let mut b = mmsg::RecvBatch::default();
    // A datagram longer than a slot reads as longer than any accepted one.
    mmsg::send_all(&tx, rx.local_addr().unwrap(), &[vec![7u8; 2_000]]).await.unwrap();
    loop {
        rx.readable().await.unwrap();
        if let Ok(n) = b.recv(&rx) {
            assert_eq!(n, 1);
            assert!(b.get(0).0.len() > MAX_DATAGRAM);
            break;
        }
    }
}
