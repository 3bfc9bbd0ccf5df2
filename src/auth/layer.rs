//! The shells of [`crate::auth`]: the server layer in front of every gRPC service, and
//! the client channel that sends a bearer token.
//!
//! - [`AuthLayer`]: reads `authorization: Bearer <token>` and the forwarding metadata,
//!   asks [`Auth::check`], and answers a refusal itself (`UNAUTHENTICATED`, or
//!   `PERMISSION_DENIED` naming the role needed) without reaching the service. Refusals
//!   are counted in `locus_auth_refused_total{reason, need}` and logged at debug with the
//!   method, the peer address and the token's name when known, never the token.
//! - [`AuthChannel`]: a [`Channel`] that adds the token to every request: the node
//!   credential on peer channels (`routing::cluster::Peers`), a client token in the CLI
//!   tools (`locus sim`, `admin`, `bench`: `--token-file` or `LOCUS_TOKEN`, set once by
//!   [`set_client_token`]).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http::{self, HeaderValue, header::AUTHORIZATION};
use tonic::transport::Channel;

use super::{Auth, Need, Refused};

/// The layer. Without [`Auth`] (a node without `--auth-file`) every request goes
/// through.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Option<Arc<Auth>>,
    /// Metadata keys only nodes send (routing's hop count and scatter scope).
    node_keys: &'static [&'static str],
    /// Mutual TLS between nodes (`--tls-ca`): node-to-node calls must come with a client
    /// certificate (rustls has verified it against the cluster CA).
    node_cert: bool,
}

impl AuthLayer {
    pub fn new(auth: Option<Arc<Auth>>, node_keys: &'static [&'static str]) -> AuthLayer {
        AuthLayer { auth, node_keys, node_cert: false }
    }

    /// Node-to-node calls need a verified client certificate.
    pub fn with_node_certificates(mut self, on: bool) -> AuthLayer {
        self.node_cert = on;
        self
    }
}

/// Whether the connection presented a client certificate (verified by rustls).
fn has_client_cert<B>(req: &http::Request<B>) -> bool {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .is_some_and(|t| t.peer_certs().is_some_and(|c| !c.is_empty()))
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Authn<S>;

    fn layer(&self, inner: S) -> Authn<S> {
        Authn { inner, layer: self.clone() }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct Authn<S> {
    inner: S,
    layer: AuthLayer,
}

/// The token of an `authorization: Bearer <token>` header.
pub fn bearer(h: &http::HeaderMap) -> Option<&str> {
    let v = h.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

pub(crate) fn need_label(n: Need) -> &'static str {
    match n {
        Need::Public => "public",
        Need::Node => "node",
        Need::Role(r) => r.as_str(),
    }
}

/// The status a refusal answers.
fn refusal(path: &str, r: Refused, name: Option<&str>, peer: Option<std::net::SocketAddr>) -> tonic::Status {
    let (reason, need) = match r {
        Refused::Unauthenticated(_) => ("unauthenticated", "-"),
        Refused::PermissionDenied(n) => ("permission_denied", need_label(n)),
    };
    metrics::counter!("locus_auth_refused_total", "reason" => reason, "need" => need).increment(1);
    tracing::debug!(method = path, reason, need, token_name = name.unwrap_or("-"), peer = ?peer, "request refused");
    match r {
        Refused::Unauthenticated(why) => {
            tonic::Status::unauthenticated(format!("{why}: send `authorization: Bearer <token>`"))
        }
        Refused::PermissionDenied(Need::Node) => tonic::Status::permission_denied(
            "node-to-node method or forwarding metadata: only cluster members may call it",
        ),
        Refused::PermissionDenied(n) => {
            tonic::Status::permission_denied(format!("{path} needs the {} role", need_label(n)))
        }
    }
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for Authn<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = AuthFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if self.layer.auth.is_none() && !self.layer.node_cert {
            return AuthFuture::Inner { fut: self.inner.call(req) };
        }
        let forwarded = self.layer.node_keys.iter().any(|k| req.headers().contains_key(*k));
        if self.layer.node_cert && super::need(req.uri().path(), forwarded) == Need::Node && !has_client_cert(&req) {
            metrics::counter!("locus_auth_refused_total", "reason" => "no_client_certificate", "need" => "node")
                .increment(1);
            let status = tonic::Status::permission_denied(
                "node-to-node method or forwarding metadata: only cluster members (a client certificate from the cluster CA) may call it",
            );
            return AuthFuture::Refused { response: Some(status.into_http()) };
        }
        if let Some(auth) = &self.layer.auth {
            let h = req.headers();
            if let Err((r, name)) = auth.check(req.uri().path(), forwarded, bearer(h)) {
                use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
                let x = req.extensions();
                let peer = x
                    .get::<TcpConnectInfo>()
                    .or_else(|| x.get::<TlsConnectInfo<TcpConnectInfo>>().map(|t| t.get_ref()))
                    .and_then(|c| c.remote_addr());
                let status = refusal(req.uri().path(), r, name.as_deref(), peer);
                return AuthFuture::Refused { response: Some(status.into_http()) };
            }
        }
        AuthFuture::Inner { fut: self.inner.call(req) }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's answer, or a refusal answered at once.
    #[project = AuthFutureProj]
    pub enum AuthFuture<F> {
        Inner { #[pin] fut: F },
        Refused { response: Option<http::Response<Body>> },
    }
}

impl<F, E> std::future::Future for AuthFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AuthFutureProj::Inner { fut } => fut.poll(cx),
            AuthFutureProj::Refused { response } => Poll::Ready(Ok(response.take().expect("polled after completion"))),
        }
    }
}

/// A channel that sends `authorization: Bearer <token>` on every request (or nothing).
#[derive(Clone, Debug)]
pub struct AuthChannel {
    inner: Channel,
    bearer: Option<HeaderValue>,
}

/// The header value of a token (marked sensitive: never printed by `http`'s Debug).
pub fn bearer_value(token: &str) -> anyhow::Result<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| anyhow::anyhow!("a token must be printable ASCII"))?;
    v.set_sensitive(true);
    Ok(v)
}

impl AuthChannel {
    pub fn new(inner: Channel, bearer: Option<HeaderValue>) -> AuthChannel {
        AuthChannel { inner, bearer }
    }

    /// With the process's client token ([`set_client_token`]), if any.
    pub fn client(inner: Channel) -> AuthChannel {
        AuthChannel { inner, bearer: client_token() }
    }
}

impl tonic::codegen::Service<http::Request<Body>> for AuthChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tonic::codegen::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        match &self.bearer {
            // Replaces whatever a forwarded request carried (a client's token).
            Some(b) => {
                req.headers_mut().insert(AUTHORIZATION, b.clone());
            }
            None => {
                req.headers_mut().remove(AUTHORIZATION);
            }
        }
        self.inner.call(req)
    }
}

static CLIENT_TLS: OnceLock<Option<tonic::transport::ClientTlsConfig>> = OnceLock::new();

/// Sets the CA the CLI tools verify `https://` nodes against (`--tls-ca`); once, first.
pub fn set_client_tls(ca_pem: Option<&[u8]>) {
    let cfg = ca_pem.map(|pem| {
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem))
    });
    let _ = CLIENT_TLS.set(cfg);
}

/// Whether the CLI tools were given a CA (`--tls-ca`): the cluster speaks TLS.
pub fn client_tls() -> bool {
    CLIENT_TLS.get().is_some_and(Option::is_some)
}

/// An endpoint for a node's URL: `https://` ones over TLS, verified against the CA set
/// by [`set_client_tls`].
pub fn client_endpoint(url: &str) -> anyhow::Result<tonic::transport::Endpoint> {
    let ep = tonic::transport::Endpoint::from_shared(url.to_string())?;
    if !url.starts_with("https://") {
        return Ok(ep);
    }
    match CLIENT_TLS.get().cloned().flatten() {
        Some(tls) => Ok(ep.tls_config(tls)?),
        None => anyhow::bail!("{url}: an https:// node needs --tls-ca (the CA its certificate chains to)"),
    }
}

static CLIENT_TOKEN: OnceLock<Option<HeaderValue>> = OnceLock::new();

/// Sets the token every client channel of this process sends (the CLI tools call it
/// once, first). Later calls are ignored.
pub fn set_client_token(token: Option<&str>) -> anyhow::Result<()> {
    let v = token.map(bearer_value).transpose()?;
    let _ = CLIENT_TOKEN.set(v);
    Ok(())
}

/// The process's client token, if one was set.
pub fn client_token() -> Option<HeaderValue> {
    CLIENT_TOKEN.get().cloned().flatten()
}
