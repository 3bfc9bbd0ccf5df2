//! Authentication and authorization against real node processes: bearer tokens with
//! roles, the cluster credential between nodes, SIGHUP reload, the loopback rule, and
//! tokens that never reach a log.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::cluster::free_port;
use common::{CENTRE, LOCUS, NodeProc, eventually, fix, home, now_ms};
use locus::auth::{ClusterKey, Role, line_for, new_token};
use locus::pb;
use locus::pb::cluster_client::ClusterClient;
use locus::pb::handoff_client::HandoffClient;
use locus::pb::internal_client::InternalClient;
use locus::pb::locations_client::LocationsClient;
use tonic::{Code, Request};

/// A request carrying `token` (or no token).
fn req<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

struct Tokens {
    gateway: String,
    reader: String,
    dispatch: String,
    admin: String,
}

fn write_secrets(dir: &Path) -> (Tokens, String) {
    let t = Tokens { gateway: new_token(), reader: new_token(), dispatch: new_token(), admin: new_token() };
    let lines = [
        line_for(&t.gateway, &[Role::Gateway], "gw-1"),
        line_for(&t.reader, &[Role::Reader], "app"),
        line_for(&t.dispatch, &[Role::Dispatch, Role::Reader], "dispatch"),
        line_for(&t.admin, &[Role::Admin], "sre"),
    ];
    std::fs::write(dir.join("tokens"), lines.join("\n") + "\n").unwrap();
    let key = "a-cluster-key-for-this-test-only".to_string();
    std::fs::write(dir.join("cluster.key"), &key).unwrap();
    (t, key)
}

fn nearby() -> pb::NearbyRequest {
    pb::NearbyRequest { lat: CENTRE.0, lon: CENTRE.1, limit: 100, ..Default::default() }
}

async fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_credentials_reload_and_no_token_in_logs() {
    let secrets = tempfile::tempdir().unwrap();
    let (t, key) = write_secrets(secrets.path());
    let auth = [
        "--auth-file",
        secrets.path().join("tokens").to_str().unwrap(),
        "--cluster-key-file",
        secrets.path().join("cluster.key").to_str().unwrap(),
        "--shards",
        "2",
    ]
    .map(String::from);
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let g0 = format!("127.0.0.1:{}", free_port());
    let filter = "info,locus::auth=debug";
    let a0: Vec<&str> = auth.iter().map(String::as_str).chain(["--node-name", "n0", "--gossip-addr", &g0]).collect();
    let n0 = NodeProc::start_logged(d0.path(), &a0, filter);
    let a1: Vec<&str> = auth.iter().map(String::as_str).chain(["--node-name", "n1", "--join", &g0]).collect();
    let n1 = NodeProc::start_logged(d1.path(), &a1, filter);

    let mut c0 = LocationsClient::connect(n0.grpc.clone()).await.unwrap();
    let mut c1 = LocationsClient::connect(n1.grpc.clone()).await.unwrap();
    let mut admin1 = ClusterClient::connect(n1.grpc.clone()).await.unwrap();
    // Both nodes on one ring: the admin token reads members.
    assert!(
        eventually(Duration::from_secs(20), || {
            let mut a = admin1.clone();
            let tok = t.admin.clone();
            async move {
                a.members(req(pb::MembersRequest {}, Some(&tok)))
                    .await
                    .is_ok_and(|m| m.get_ref().members.iter().filter(|m| m.in_ring).count() == 2)
            }
        })
        .await,
        "the two nodes did not form a ring (node credential refused?)"
    );

    // No token, an unknown token: UNAUTHENTICATED. The wrong role: PERMISSION_DENIED.
    let ts = now_ms();
    assert_eq!(code(c0.update(req(fix("d0", CENTRE.0, CENTRE.1, ts), None)).await).await, Code::Unauthenticated);
    let s = c0.update(req(fix("d0", CENTRE.0, CENTRE.1, ts), Some("lct_guessed"))).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert_eq!(
        code(c0.update(req(fix("d0", CENTRE.0, CENTRE.1, ts), Some(&t.reader))).await).await,
        Code::PermissionDenied
    );
    let s = c0.nearby(req(nearby(), Some(&t.gateway))).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("reader"), "{s:?}");
    assert_eq!(code(admin1.members(req(pb::MembersRequest {}, Some(&t.reader))).await).await, Code::PermissionDenied);

    // The gateway writes 40 drivers through n0; the reader reads each through n1 (about
    // half forwarded to n0) and Nearby through n1 sees all of them (n0's scatter part):
    // node-to-node calls carry the cluster credential.
    for i in 0..40 {
        let (lat, lon) = home(i);
        c0.update(req(fix(&format!("d{i}"), lat, lon, ts), Some(&t.gateway))).await.unwrap();
    }
    for i in 0..40 {
        let r = common::by_id(&format!("d{i}"));
        c1.get_driver(req(r, Some(&t.reader))).await.unwrap_or_else(|e| panic!("d{i}: {e:?}"));
    }
    let hits = c1.nearby(req(nearby(), Some(&t.dispatch))).await.unwrap().into_inner();
    assert!(!hits.partial, "{hits:?}");
    assert_eq!(hits.drivers.len(), 40);

    // Node-to-node methods and forwarding metadata: not even the admin token.
    let mut internal = InternalClient::connect(n0.grpc.clone()).await.unwrap();
    let s = internal.claim(req(pb::ClaimRequest::default(), Some(&t.admin))).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let mut handoff = HandoffClient::connect(n0.grpc.clone()).await.unwrap();
    let s = handoff.holdings(req(pb::HoldingsRequest::default(), Some(&t.admin))).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let mut scoped = req(nearby(), Some(&t.admin));
    scoped.metadata_mut().insert("locus-scope", "local".parse().unwrap());
    assert_eq!(code(c0.nearby(scoped).await).await, Code::PermissionDenied);
    let mut hop = req(nearby(), Some(&t.reader));
    hop.metadata_mut().insert("locus-hop", "1".parse().unwrap());
    assert_eq!(code(c0.nearby(hop).await).await, Code::PermissionDenied);
    // The real credential does (that is what the nodes send each other).
    let node = ClusterKey::new(key.as_bytes()).unwrap().node_credential();
    assert_ne!(code(internal.claim(req(pb::ClaimRequest::default(), Some(&node))).await).await, Code::PermissionDenied);

    // Refusals are counted by reason.
    let (_, m) = common::http_get(&n0.http, "/metrics").await;
    assert!(m.contains("locus_auth_refused_total{reason=\"unauthenticated\""), "{m}");
    assert!(m.contains("locus_auth_refused_total{reason=\"permission_denied\",need=\"node\"}"), "{m}");

    // The CLI tools send --token-file.
    let tok_file = secrets.path().join("admin.token");
    std::fs::write(&tok_file, format!("{}\n", t.admin)).unwrap();
    let out = Command::new(LOCUS)
        .args(["--token-file", tok_file.to_str().unwrap(), "admin", "--addr", &n1.grpc, "members"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out =
        Command::new(LOCUS).args(["admin", "--addr", &n1.grpc, "members"]).env_remove("LOCUS_TOKEN").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no bearer token"), "{out:?}");

    // SIGHUP reloads the file: a new gateway token works, the removed one does not.
    let new_gw = new_token();
    let file = secrets.path().join("tokens");
    let kept: Vec<String> = std::fs::read_to_string(&file).unwrap().lines().skip(1).map(String::from).collect();
    std::fs::write(&file, [kept, vec![line_for(&new_gw, &[Role::Gateway], "gw-2")]].concat().join("\n")).unwrap();
    assert!(Command::new("kill").args(["-HUP", &n0.pid().to_string()]).status().unwrap().success());
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut c = c0.clone();
            let tok = new_gw.clone();
            async move { c.update(req(fix("r1", CENTRE.0, CENTRE.1, now_ms()), Some(&tok))).await.is_ok() }
        })
        .await,
        "the new token never worked after SIGHUP"
    );
    let s = c0.update(req(fix("r2", CENTRE.0, CENTRE.1, now_ms()), Some(&t.gateway))).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    // A broken file keeps the tokens in force.
    std::fs::write(&file, "not a token line\n").unwrap();
    assert!(Command::new("kill").args(["-HUP", &n0.pid().to_string()]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    c0.update(req(fix("r3", CENTRE.0, CENTRE.1, now_ms()), Some(&new_gw))).await.unwrap();
    let logs = n0.logs.lock().unwrap().join("\n");
    assert!(logs.contains("auth file not reloaded"), "no reload error logged");
    assert!(logs.contains("request refused"), "refusals are logged at debug");

    // No secret ever reached a log line.
    for n in [&n0, &n1] {
        let logs = n.logs.lock().unwrap();
        for secret in [&t.gateway, &t.reader, &t.dispatch, &t.admin, &new_gw, &node, &key] {
            assert!(!logs.iter().any(|l| l.contains(secret.as_str())), "a secret was logged");
        }
    }
}

#[tokio::test]
async fn without_an_auth_file_a_node_serves_only_loopback_unless_insecure() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(LOCUS)
        .args(["node", "--grpc-addr", "0.0.0.0:0", "--http-addr", "127.0.0.1:0", "--gossip-addr"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(d.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--grpc-addr 0.0.0.0:0 is not a loopback address") && err.contains("--insecure"), "{err}");

    // --auth-file without a cluster key is refused too.
    let out =
        Command::new(LOCUS).args(["node", "--auth-file", "/nonexistent", "--data-dir"]).arg(d.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cluster-key-file"));

    // --insecure serves anyway, and says so.
    let n = NodeProc::start(d.path(), &["--grpc-addr", "0.0.0.0:0", "--insecure"]);
    let logs = n.logs.lock().unwrap().join("\n");
    assert!(logs.contains("INSECURE"), "{logs}");
    drop(logs);
    let port = n.grpc.rsplit(':').next().unwrap();
    let mut c = LocationsClient::connect(format!("http://127.0.0.1:{port}")).await.unwrap();
    c.update(fix("d1", CENTRE.0, CENTRE.1, now_ms())).await.unwrap();
}

/// The members node `n` sees in its ring, by name, asked with `admin`.
async fn ring_names(n: &NodeProc, admin: &str) -> Vec<String> {
    let mut c = ClusterClient::connect(n.grpc.clone()).await.unwrap();
    let m = c.members(req(pb::MembersRequest {}, Some(admin))).await.unwrap().into_inner();
    let mut names: Vec<String> = m.members.iter().filter(|m| m.in_ring).map(|m| m.name.clone()).collect();
    names.sort();
    names
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_is_authenticated_another_key_cannot_join_and_replays_are_dropped() {
    let (sa, sb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (ta, key_a) = write_secrets(sa.path());
    let (tb, _) = write_secrets(sb.path());
    std::fs::write(sb.path().join("cluster.key"), "another-cluster-entirely-0000").unwrap();
    let flags = |d: &Path| {
        vec![
            "--auth-file".to_string(),
            d.join("tokens").display().to_string(),
            "--cluster-key-file".into(),
            d.join("cluster.key").display().to_string(),
        ]
    };
    let g0 = format!("127.0.0.1:{}", free_port());
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let start = |i: usize, mut a: Vec<String>, join: bool| {
        a.extend(["--node-name".into(), format!("n{i}"), "--shards".into(), "1".into()]);
        if join {
            a.extend(["--join".into(), g0.clone()]);
        } else {
            a.extend(["--gossip-addr".into(), g0.clone()]);
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        NodeProc::start_logged(dirs[i].path(), &a, "info,locus::membership=debug")
    };
    let n0 = start(0, flags(sa.path()), false);
    let n1 = start(1, flags(sa.path()), true);
    // n2 has another cluster's key; n3 has none at all.
    let n2 = start(2, flags(sb.path()), true);
    let n3 = start(3, vec![], true);

    assert!(
        eventually(Duration::from_secs(15), || async { ring_names(&n0, &ta.admin).await == ["n0", "n1"] }).await,
        "n0 and n1 did not form a ring"
    );
    // Long enough for several join attempts and probe rounds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(ring_names(&n0, &ta.admin).await, ["n0", "n1"]);
    assert_eq!(ring_names(&n1, &ta.admin).await, ["n0", "n1"]);
    // Neither learned of the cluster (a node told to join starts no ring of its own).
    let mut c2 = ClusterClient::connect(n2.grpc.clone()).await.unwrap();
    let m2 = c2.members(req(pb::MembersRequest {}, Some(&tb.admin))).await.unwrap().into_inner();
    assert!(m2.members.iter().all(|m| m.name == "n2"), "{m2:?}");
    let mut c3 = ClusterClient::connect(n3.grpc.clone()).await.unwrap();
    let m3 = c3.members(pb::MembersRequest {}).await.unwrap().into_inner();
    assert!(m3.members.iter().all(|m| m.name == "n3"), "{m3:?}");
    // And the cluster never listed them, not even as down.
    let mut c0 = ClusterClient::connect(n0.grpc.clone()).await.unwrap();
    let m0 = c0.members(req(pb::MembersRequest {}, Some(&ta.admin))).await.unwrap().into_inner();
    assert!(m0.members.iter().all(|m| m.name == "n0" || m.name == "n1"), "{m0:?}");

    // Forged and replayed datagrams, sent straight to n0's gossip socket.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(b"not a sealed datagram", &g0).unwrap();
    let sealer = locus::membership::seal::Sealer::new(ClusterKey::new(key_a.as_bytes()).unwrap().gossip_key());
    let sealed = sealer.seal(b"LOCUS-HB and then some bytes", now_ms());
    sock.send_to(&sealed, &g0).unwrap();
    sock.send_to(&sealed, &g0).unwrap();
    let mut tampered = sealed.clone();
    *tampered.last_mut().unwrap() ^= 0x55;
    sock.send_to(&tampered, &g0).unwrap();
    let t0 = std::time::Instant::now();
    let counts = loop {
        let (_, m) = common::http_get(&n0.http, "/metrics").await;
        let c = (
            metric(&m, "locus_gossip_dropped_total{reason=\"bad_mac\"}"),
            metric(&m, "locus_gossip_dropped_total{reason=\"unauthenticated\"}"),
            metric(&m, "locus_gossip_dropped_total{reason=\"replayed\"}"),
        );
        if (c.0 >= 2.0 && c.1 >= 2.0 && c.2 >= 1.0) || t0.elapsed() > Duration::from_secs(5) {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // bad_mac: n2's packets and the tampered one; unauthenticated: n3's and the plain
    // one; replayed: the second copy.
    assert!(counts.0 >= 2.0 && counts.1 >= 2.0 && counts.2 >= 1.0, "bad_mac, unauthenticated, replayed = {counts:?}");
    // The cluster is unharmed.
    assert_eq!(ring_names(&n0, &ta.admin).await, ["n0", "n1"]);
}
