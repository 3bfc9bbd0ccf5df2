//! TLS for gRPC and HTTP (rustls), and mutual TLS between nodes.
//!
//! - `--tls-cert` / `--tls-key` (PEM): gRPC and HTTP serve TLS only; a plaintext client
//!   fails its handshake. The certificate must name the addresses peers and clients
//!   reach the node at (IP SANs for addresses, DNS SANs for names).
//! - `--tls-ca` (PEM): the CA that signed every node's certificate. A node presents its
//!   own certificate to its peers (mutual TLS) and verifies theirs against this CA; on
//!   its gRPC port a client certificate is optional, but one that is presented must
//!   chain to it. Without it peers cannot verify each other, so a node with
//!   `--tls-cert` needs `--tls-ca`.
//!
//! The HTTP side (share links, health, metrics) takes no client certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The node's TLS material, read once at start.
#[derive(Clone)]
pub struct TlsFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

fn read(p: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {what} {}", p.display()))
}

impl TlsFiles {
    pub fn read(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<TlsFiles> {
        let t = TlsFiles { cert: read(cert, "--tls-cert")?, key: read(key, "--tls-key")?, ca: read(ca, "--tls-ca")? };
        // Fail at start, with the file named, rather than at the first handshake.
        t.http_acceptor().context("--tls-cert / --tls-key")?;
        anyhow::ensure!(
            CertificateDer::pem_slice_iter(&t.ca).next().is_some(),
            "--tls-ca {}: no certificate in it",
            ca.display()
        );
        Ok(t)
    }

    /// The gRPC server's: this node's identity; client certificates optional, verified
    /// against the CA when presented; a handshake must finish within `handshake`.
    pub fn grpc_server(&self, handshake: std::time::Duration) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .timeout(handshake)
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(true)
    }

    /// Peer channels': verify the peer against the CA, present this node's certificate.
    pub fn peer_client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
    }

    /// The HTTP side's acceptor (HTTP/1.1, no client certificates).
    pub fn http_acceptor(&self) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&self.cert).collect::<Result<_, _>>().context("parsing the certificate")?;
        anyhow::ensure!(!certs.is_empty(), "no certificate in it");
        let key = PrivateKeyDer::from_pem_slice(&self.key).context("parsing the private key")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
    }
}

/// The paths of a node's TLS flags, checked together.
pub fn files(cert: &Option<PathBuf>, key: &Option<PathBuf>, ca: &Option<PathBuf>) -> anyhow::Result<Option<TlsFiles>> {
    match (cert, key, ca) {
        (None, None, None) => Ok(None),
        (Some(c), Some(k), Some(a)) => Ok(Some(TlsFiles::read(c, k, a)?)),
        (Some(_), Some(_), None) => {
            anyhow::bail!("--tls-cert needs --tls-ca: the CA peers verify each other with (mutual TLS)")
        }
        _ => anyhow::bail!("--tls-cert and --tls-key go together (and with --tls-ca)"),
    }
}

/// `GET path` over TLS from `addr` (`host:port`), verified against `ca_pem` for the
/// host's name or address: (status, body). `locus probe` against a TLS node.
pub async fn https_get(addr: &str, path: &str, ca_pem: &[u8]) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.map_err(|e| bad(format!("the CA: {e}")))?).map_err(|e| bad(format!("the CA: {e}")))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| bad(e.to_string()))?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}
