//! TLS with certificates generated here: gRPC and HTTP over TLS, plaintext refused, a
//! client certificate from another CA refused, and two nodes over mutual TLS.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::cluster::free_port;
use common::{CENTRE, NodeProc, fix, home, now_ms};
use locus::pb;
use locus::pb::cluster_client::ClusterClient;
use locus::pb::locations_client::LocationsClient;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let ca = p.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    /// A certificate for 127.0.0.1 and localhost, for servers and clients: (cert, key) PEM.
    fn issue(&self, cn: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a node's files into `dir`; the flags that use them.
    fn node_files(&self, dir: &Path, cn: &str) -> Vec<String> {
        let (cert, key) = self.issue(cn);
        std::fs::write(dir.join("node.crt"), cert).unwrap();
        std::fs::write(dir.join("node.key"), key).unwrap();
        std::fs::write(dir.join("ca.crt"), self.ca.pem()).unwrap();
        let f = |n: &str| dir.join(n).display().to_string();
        vec!["--tls-cert".into(), f("node.crt"), "--tls-key".into(), f("node.key"), "--tls-ca".into(), f("ca.crt")]
    }
}

fn https(n: &NodeProc) -> String {
    n.grpc.replace("http://", "https://")
}

async fn tls_channel(
    url: &str,
    ca: &str,
    identity: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    Endpoint::from_shared(url.to_string())?.tls_config(tls)?.connect_timeout(Duration::from_secs(3)).connect().await
}

/// `GET path` over TLS (verified against `ca`): the response's first line.
async fn https_get(addr: &str, path: &str, ca: &str) -> String {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_http_serve_tls_only_and_check_client_certificates() {
    let pki = Pki::new("locus test CA");
    let files = tempfile::tempdir().unwrap();
    let flags = pki.node_files(files.path(), "n0");
    let d = tempfile::tempdir().unwrap();
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let n = NodeProc::start(d.path(), &args);
    let ca = pki.ca.pem();

    // gRPC over TLS, verified against the CA.
    let mut c = LocationsClient::new(tls_channel(&https(&n), &ca, None).await.unwrap());
    c.update(fix("t1", CENTRE.0, CENTRE.1, now_ms())).await.unwrap();
    c.get_driver(common::by_id("t1")).await.unwrap();
    // With a client certificate from the same CA too.
    let mut c2 = LocationsClient::new(tls_channel(&https(&n), &ca, Some(pki.issue("client"))).await.unwrap());
    c2.get_driver(common::by_id("t1")).await.unwrap();
    // A client certificate from another CA is refused.
    let rogue = Pki::new("rogue CA");
    let refused = match tls_channel(&https(&n), &ca, Some(rogue.issue("mallory"))).await {
        Err(_) => true,
        Ok(ch) => LocationsClient::new(ch).get_driver(common::by_id("t1")).await.is_err(),
    };
    assert!(refused, "a client certificate from another CA was accepted");
    // Node-to-node methods need a client certificate from the cluster CA.
    let mut h = pb::handoff_client::HandoffClient::new(tls_channel(&https(&n), &ca, None).await.unwrap());
    let s = h.holdings(pb::HoldingsRequest::default()).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    let mut h =
        pb::handoff_client::HandoffClient::new(tls_channel(&https(&n), &ca, Some(pki.issue("n9"))).await.unwrap());
    h.holdings(pb::HoldingsRequest::default()).await.unwrap();
    // Plaintext gRPC is refused.
    let plain = match LocationsClient::connect(n.grpc.clone()).await {
        Err(_) => true,
        Ok(mut p) => p.get_driver(common::by_id("t1")).await.is_err(),
    };
    assert!(plain, "plaintext gRPC was served");

    // The CLI tools and the container healthcheck, given the CA.
    let ca_file = files.path().join("ca.crt");
    let admin = std::process::Command::new(common::LOCUS)
        .args(["--client-tls-ca", ca_file.to_str().unwrap(), "admin", "--addr", &https(&n), "members"])
        .output()
        .unwrap();
    assert!(admin.status.success(), "{}", String::from_utf8_lossy(&admin.stderr));
    let probe = |ca: bool| {
        let mut c = std::process::Command::new(common::LOCUS);
        if ca {
            c.args(["--client-tls-ca", ca_file.to_str().unwrap()]);
        }
        c.args(["probe", "--http", &n.http, "--path", "/healthz"])
            .env_remove("LOCUS_TLS_CA")
            .status()
            .unwrap()
            .success()
    };
    assert!(probe(true), "locus probe over TLS failed");
    assert!(!probe(false), "a plaintext probe passed against a TLS node");

    // HTTP over TLS; plaintext HTTP gets no answer.
    assert_eq!(https_get(&n.http, "/healthz", &ca).await, "HTTP/1.1 200 OK");
    let mut s = tokio::net::TcpStream::connect(&n.http).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"), "plaintext HTTP was served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_forward_and_scatter_over_mutual_tls() {
    let pki = Pki::new("locus test CA");
    let ca = pki.ca.pem();
    let (f0, f1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let g0 = format!("127.0.0.1:{}", free_port());
    let a0: Vec<String> =
        [pki.node_files(f0.path(), "n0"), vec!["--node-name".into(), "n0".into(), "--gossip-addr".into(), g0.clone()]]
            .concat();
    let a1: Vec<String> =
        [pki.node_files(f1.path(), "n1"), vec!["--node-name".into(), "n1".into(), "--join".into(), g0]].concat();
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let n0 = NodeProc::start(d0.path(), &a0.iter().map(String::as_str).collect::<Vec<_>>());
    let n1 = NodeProc::start(d1.path(), &a1.iter().map(String::as_str).collect::<Vec<_>>());
    let admin = ClusterClient::new(tls_channel(&https(&n1), &ca, None).await.unwrap());
    let formed = common::eventually(Duration::from_secs(20), || {
        let mut a = admin.clone();
        async move {
            a.members(pb::MembersRequest {})
                .await
                .is_ok_and(|m| m.get_ref().members.iter().filter(|m| m.in_ring).count() == 2)
        }
    })
    .await;
    assert!(formed, "the two nodes did not form a ring");
    // Readiness needs the hand-off survey over mutual TLS.
    let ready = common::eventually(Duration::from_secs(20), || async {
        https_get(&n0.http, "/readyz", &ca).await.contains("200")
            && https_get(&n1.http, "/readyz", &ca).await.contains("200")
    })
    .await;
    assert!(ready, "the nodes never became ready");
    let mut c0 = LocationsClient::new(tls_channel(&https(&n0), &ca, None).await.unwrap());
    let mut c1 = LocationsClient::new(tls_channel(&https(&n1), &ca, None).await.unwrap());
    let ts = now_ms();
    for i in 0..30 {
        let (lat, lon) = home(i);
        c0.update(fix(&format!("m{i}"), lat, lon, ts)).await.unwrap();
    }
    for i in 0..30 {
        c1.get_driver(common::by_id(&format!("m{i}"))).await.unwrap_or_else(|e| panic!("m{i}: {e:?}"));
    }
    let r =
        c1.nearby(pb::NearbyRequest { lat: CENTRE.0, lon: CENTRE.1, limit: 100, ..Default::default() }).await.unwrap();
    let r = r.into_inner();
    assert!(!r.partial, "{r:?}");
    assert_eq!(r.drivers.len(), 30);
}
