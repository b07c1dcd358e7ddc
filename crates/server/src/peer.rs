//! Forwarding between the nodes of a cluster: the transport of `sextant_core::forward`.
//!
//! - [`PeerForwarder`] (a follower): the core's [`Forwarder`], calling the leader's internal
//!   `sextant.cluster.v1.Peer` service on its native gRPC listener (the address in its member
//!   record). One lazily connected channel per leader; the election tells it who leads.
//! - [`PeerApi`] (the leader): that service. A call without the cluster's secret (metadata
//!   [`SECRET_HEADER`], shared through the store) is refused before anything is decoded. The
//!   follower has already authorized the caller (it holds the same ACL tables); the leader
//!   applies the operations as that caller, its audit entry's source saying "via" the follower.
//!
//! Errors: no leader, or one that cannot be reached or answers with a transport error, is the
//! core's `NotLeader` (503 naming the leader, as before forwarding); an operation's own error
//! comes back with the kind and message the leader's API would have answered.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sextant_core::forward::{
    decode, encode, ForwardReply, ForwardRequest, Forwarder, RenewKeys, WireError,
};
use sextant_core::model::{Revision, ServiceKey};
use sextant_core::{CoreError, Registry};
use sextant_proto::cluster_v1::peer_client::PeerClient;
use sextant_proto::cluster_v1::peer_server::{Peer, PeerServer};
use sextant_proto::cluster_v1::{PeerMessage, RenewReply};
use sextant_store_etcd::cluster::Member;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Response, Status};

use crate::error::ApiError;

/// The metadata key of the cluster's secret on every peer call.
pub(crate) const SECRET_HEADER: &str = "x-sextant-cluster-secret";
/// A forwarded call's bound: the leader's group commit to etcd is milliseconds; past this the
/// client gets a 503 and retries (possibly elsewhere).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest peer message (a large batch registration, a chunk of renewals).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// How a follower reaches the leader over TLS: the CA it trusts for the leader's certificate,
/// and (mTLS) the certificate it presents itself.
#[derive(Clone)]
pub(crate) struct PeerTls {
    pub ca: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// The leader as this follower knows it, with a channel to it once used.
struct Target {
    node_id: String,
    grpc: String,
    /// How refusals name it (`http://… (node …)`, as the role does).
    shown: String,
    channel: Option<Channel>,
}

/// A follower's [`Forwarder`].
pub(crate) struct PeerForwarder {
    node_id: String,
    secret: MetadataValue<Ascii>,
    /// Swapped whole by a reload of the files.
    tls: Mutex<Option<ClientTlsConfig>>,
    leader: Mutex<Option<Target>>,
}

fn client_tls(t: PeerTls) -> ClientTlsConfig {
    let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(t.ca));
    if let Some((cert, key)) = t.identity {
        c = c.identity(Identity::from_pem(cert, key));
    }
    c
}

impl PeerForwarder {
    pub fn new(node_id: String, secret: &str, tls: Option<PeerTls>) -> Result<Self, String> {
        let secret = secret
            .parse()
            .map_err(|_| "the cluster secret is not valid header text".to_string())?;
        Ok(Self {
            node_id,
            secret,
            tls: Mutex::new(tls.map(client_tls)),
            leader: Mutex::new(None),
        })
    }

    /// New TLS files (a rotation): the next call connects to the leader with them. Refused
    /// when TLS was off (a reload cannot turn it on).
    pub fn set_tls(&self, tls: PeerTls) -> Result<(), String> {
        let mut cur = self.tls.lock();
        if cur.is_none() {
            return Err("peer TLS was off at start".into());
        }
        *cur = Some(client_tls(tls));
        drop(cur);
        if let Some(t) = self.leader.lock().as_mut() {
            t.channel = None;
        }
        Ok(())
    }

    /// Who leads now (`None`: nobody, or this node).
    pub fn set_leader(&self, leader: Option<&Member>) {
        let mut cur = self.leader.lock();
        match leader {
            Some(m) => {
                let same = cur
                    .as_ref()
                    .is_some_and(|t| t.node_id == m.node_id && t.grpc == m.grpc);
                if !same {
                    *cur = Some(Target {
                        node_id: m.node_id.clone(),
                        grpc: m.grpc.clone(),
                        shown: format!("{} (node {})", m.http, m.node_id),
                        channel: None,
                    });
                }
            }
            None => *cur = None,
        }
    }

    /// A client to the leader, and how to name it; `NotLeader` when none is known.
    fn client(&self) -> Result<(PeerClient<Channel>, String), CoreError> {
        let mut cur = self.leader.lock();
        let Some(t) = cur.as_mut() else {
            return Err(CoreError::NotLeader(None));
        };
        let channel = match &t.channel {
            Some(c) => c.clone(),
            None => {
                let tls = self.tls.lock().clone();
                let scheme = if tls.is_some() { "https" } else { "http" };
                let unusable = |e: String| {
                    tracing::warn!(leader = %t.grpc, error = %e, "cannot address the leader's gRPC listener");
                    CoreError::NotLeader(Some(t.shown.clone()))
                };
                let mut ep = Endpoint::from_shared(format!("{scheme}://{}", t.grpc))
                    .map_err(|e| unusable(e.to_string()))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .timeout(CALL_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5));
                if let Some(tls) = tls {
                    ep = ep.tls_config(tls).map_err(|e| unusable(e.to_string()))?;
                }
                let c = ep.connect_lazy();
                t.channel = Some(c.clone());
                c
            }
        };
        let client = PeerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok((client, t.shown.clone()))
    }

    fn message(&self, body: Vec<u8>) -> Request<PeerMessage> {
        let mut r = Request::new(PeerMessage {
            node: self.node_id.clone(),
            body,
        });
        r.metadata_mut().insert(SECRET_HEADER, self.secret.clone());
        r
    }
}

/// A failed call to the leader, as the follower's client sees it: 503 naming the leader.
fn unreachable(leader: String, s: &Status) -> CoreError {
    if s.code() == tonic::Code::Unauthenticated {
        tracing::error!(%leader, "the leader refused this node's cluster secret");
    } else {
        tracing::debug!(%leader, code = ?s.code(), message = s.message(), "forwarding to the leader failed");
    }
    CoreError::NotLeader(Some(leader))
}

#[tonic::async_trait]
impl Forwarder for PeerForwarder {
    async fn forward(
        &self,
        request: ForwardRequest,
    ) -> Result<Vec<Result<Revision, CoreError>>, CoreError> {
        let n = request.ops.len();
        let (mut client, leader) = self.client()?;
        let answer = client
            .forward(self.message(encode(&request)))
            .await
            .map_err(|s| unreachable(leader.clone(), &s))?
            .into_inner();
        let reply: ForwardReply = decode(&answer.body)
            .map_err(|e| CoreError::Internal(format!("the leader {leader}: {e}")))?;
        let results = reply.map_err(WireError::into_core)?;
        if results.len() != n {
            return Err(CoreError::Internal(format!(
                "the leader {leader} answered {} results for {n} operations",
                results.len()
            )));
        }
        Ok(results
            .into_iter()
            .map(|r| r.map_err(WireError::into_core))
            .collect())
    }

    async fn renew(&self, keys: Vec<(ServiceKey, Arc<str>)>) -> Result<(), CoreError> {
        let (mut client, leader) = self.client()?;
        client
            .renew(self.message(encode(&keys)))
            .await
            .map_err(|s| unreachable(leader, &s))?;
        Ok(())
    }
}

/// The leader's side: the `Peer` service on the native gRPC listener.
pub(crate) struct PeerApi {
    registry: Registry,
    secret: String,
}

pub(crate) fn service(registry: Registry, secret: String) -> PeerServer<PeerApi> {
    PeerServer::new(PeerApi { registry, secret })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

impl PeerApi {
    fn check<T>(&self, r: &Request<T>) -> Result<(), Status> {
        let given = r
            .metadata()
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if same_secret(given, self.secret.as_bytes()) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "not a node of this cluster (no or a wrong cluster secret)",
            ))
        }
    }
}

/// Compares in time independent of where the first difference is.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An error as the leader's own API would have answered it.
fn wire(e: CoreError) -> WireError {
    let kind = e.kind();
    WireError::new(kind, ApiError::from(e).message)
}

#[tonic::async_trait]
impl Peer for PeerApi {
    async fn forward(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        self.check(&request)?;
        let msg = request.into_inner();
        let req: ForwardRequest =
            decode(&msg.body).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let actor = req.actor.map(|mut a| {
            a.source = format!("{} via {}", a.source, msg.node);
            a
        });
        let reply: ForwardReply = match self.registry.apply_forwarded(req.ops, actor).await {
            Ok(results) => Ok(results.into_iter().map(|r| r.map_err(wire)).collect()),
            Err(e) => Err(wire(e)),
        };
        Ok(Response::new(PeerMessage {
            node: String::new(),
            body: encode(&reply),
        }))
    }

    async fn renew(&self, request: Request<PeerMessage>) -> Result<Response<RenewReply>, Status> {
        self.check(&request)?;
        let keys: RenewKeys = decode(&request.into_inner().body)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // A node that no longer leads says so; the follower keeps the keys for the next one.
        let renewed = self
            .registry
            .renew_forwarded(keys)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(RenewReply {
            renewed: renewed as u64,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }
}
