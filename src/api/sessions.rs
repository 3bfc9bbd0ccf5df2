//! `locus.v1.Sessions`: UDP sessions for drivers' compact fixes (see `udp`), opened and
//! closed on the driver's owner (forwarded like driver writes) and recorded as the
//! driver's `session`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::locations::{Target, forward, forwarded, target};
use super::{check_key_str, invalid, route_status};
use crate::drivers::SessionChange;
use crate::keys::partition_of;
use crate::pb;
use crate::pb::sessions_client::SessionsClient;
use crate::routing::Router;
use crate::routing::cluster::{Cluster, hops};
use crate::udp::{Keys, SessionId};

/// The `locus.v1.Sessions` service.
pub struct SessionsApi {
    router: Arc<Router>,
    cluster: Arc<Cluster>,
    keys: Keys,
    /// Where this node takes datagrams (`--udp-addr`), told to the app.
    udp_addr: String,
}

impl SessionsApi {
    pub fn new(router: Arc<Router>, cluster: Arc<Cluster>, keys: Keys, udp_addr: String) -> Self {
        SessionsApi { router, cluster, keys, udp_addr }
    }

    fn client(p: &crate::routing::cluster::Peer) -> SessionsClient<crate::auth::layer::AuthChannel> {
        SessionsClient::new(p.channel.clone())
    }
}

#[tonic::async_trait]
impl pb::sessions_server::Sessions for SessionsApi {
    async fn open(&self, req: Request<pb::OpenSessionRequest>) -> Result<Response<pb::UdpSession>, Status> {
        let hop = hops(req.metadata());
        let r = req.into_inner();
        check_key_str("driver_id", &r.driver_id).map_err(|e| invalid(&e))?;
        match target(&self.cluster, &r.driver_id, hop).await? {
            Target::Local => {
                let id = SessionId::new(partition_of(r.driver_id.as_bytes()), rand::random::<u64>());
                self.router.set_session(&r.driver_id, SessionChange::Open(id.recorded())).await.map_err(|e| match e {
                    crate::routing::RouteError::NotFound => Status::not_found(format!(
                        "driver {:?} has no position yet: send a first fix (Locations.Update), then open its session",
                        r.driver_id
                    )),
                    e => route_status(e),
                })?;
                metrics::counter!("locus_udp_sessions_opened_total").increment(1);
                Ok(Response::new(pb::UdpSession {
                    session_id: id.0,
                    key: self.keys.session_key(id).to_vec(),
                    udp_addr: self.udp_addr.clone(),
                }))
            }
            Target::Forward(p, hop) => {
                let mut s = forward(&p.name, Self::client(&p).open(forwarded(r, hop))).await?;
                // The app sends to the node it asked, wherever the driver lives.
                s.get_mut().udp_addr = self.udp_addr.clone();
                Ok(s)
            }
        }
    }

    async fn close(&self, req: Request<pb::CloseSessionRequest>) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let hop = hops(req.metadata());
        let r = req.into_inner();
        check_key_str("driver_id", &r.driver_id).map_err(|e| invalid(&e))?;
        match target(&self.cluster, &r.driver_id, hop).await? {
            Target::Local => {
                // Only a UDP session is closed (a gateway's own session string stays),
                // and only the one named, if one is.
                let only = (r.session_id != 0).then(|| SessionId(r.session_id).recorded());
                let closed =
                    self.router.set_session(&r.driver_id, SessionChange::Close(only)).await.map_err(route_status)?;
                Ok(Response::new(pb::CloseSessionResponse { closed }))
            }
            Target::Forward(p, hop) => forward(&p.name, Self::client(&p).close(forwarded(r, hop))).await,
        }
    }
}
