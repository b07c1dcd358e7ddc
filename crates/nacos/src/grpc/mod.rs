//! The Nacos 2.x gRPC protocol: unary `Request/request` and the `BiRequestStream` a client
//! keeps open, both carrying `Payload{metadata.type, body: JSON}`.
//!
//! A connection is known by its peer address (Nacos' own servers do the same): the unary
//! requests and the bi-stream of one client share one HTTP/2 connection. The parts:
//! - this file: the listener, the two gRPC services and the dispatch of a request by type;
//! - [`conn`]: what is bound to a connection — its ephemeral instances (leases renewed while
//!   it lives, so they lapse a grace period after it drops), its subscriptions, its bi-stream;
//! - [`wire`]: the JSON request and response shapes, and decoding them;
//! - [`handlers`]: one function per naming request type;
//! - [`push`]: a subscription's task, turning the core's deliveries into
//!   `NotifySubscriberRequest` pushes of the service's whole state (the core coalesces, so a
//!   slow client gets the latest state, never a queue).

mod conn;
mod handlers;
mod push;
pub(crate) mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::json;
use sextant_proto::nacos::bi_request_stream_server::{BiRequestStream, BiRequestStreamServer};
use sextant_proto::nacos::request_server::{Request as RequestApi, RequestServer};
use sextant_proto::nacos::Payload;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use sextant_core::model::acl::{Resource, Right};

use crate::{mapping, Adapter, NacosError};
use conn::{read_stream, renew_leases, Connections};
use wire::{error_payload, response_type, success_payload, NO_HANDLER};

/// Pushes queued per connection before the push tasks wait (they coalesce meanwhile).
const PUSH_QUEUE: usize = 256;
/// How long 2.x clients may cache pushed state, in ms.
pub(crate) const PUSH_CACHE_MILLIS: u64 = 10_000;

/// The adapter's two gRPC services, for the node to serve on its Nacos gRPC listener (with the
/// keepalive of [`crate::GRPC_KEEPALIVE_INTERVAL`]), and the task renewing its connections'
/// leases.
pub(crate) fn routes(adapter: Arc<Adapter>, stop: watch::Receiver<bool>) -> tonic::service::Routes {
    let api = Api::new(adapter, stop);
    tokio::spawn(renew_leases(api.conns.clone()));
    tonic::service::Routes::new(RequestServer::new(api.clone()))
        .add_service(BiRequestStreamServer::new(api))
}

/// Both gRPC services of the adapter.
#[derive(Clone)]
pub(crate) struct Api {
    conns: Arc<Connections>,
}

impl Api {
    pub(crate) fn new(adapter: Arc<Adapter>, stop: watch::Receiver<bool>) -> Self {
        Api {
            conns: Arc::new(Connections {
                adapter,
                map: Mutex::new(HashMap::new()),
                next_push: AtomicU64::new(1),
                stop,
            }),
        }
    }

    /// Answers one unary request from `addr`: decodes `body` as the JSON of a `kind` request,
    /// runs its handler and encodes the response, or an `ErrorResponse` whose `errorCode` is
    /// the error's class (4xx for bad input, whatever the bytes).
    pub(crate) async fn handle(
        &self,
        addr: SocketAddr,
        kind: &str,
        body: &[u8],
        token: Option<&str>,
        tls: Option<&sextant_core::TlsPeer>,
    ) -> Payload {
        let adapter = &self.conns.adapter;
        let metrics = &adapter.metrics;
        // The type first: an unknown one is answered "no handler" whatever its body, and
        // only a known type becomes a metrics label (a client's bytes would let it grow the
        // label set without bound).
        let Some(response) = response_type(kind) else {
            metrics.request("grpc", "unsupported", "unsupported");
            let request_id = wire::decode_request(kind, body)
                .ok()
                .and_then(|r| r.request_id)
                .unwrap_or_default();
            let msg = if kind.starts_with("Config") {
                format!("{kind}: the Nacos config center is not part of Sextant (naming only)")
            } else {
                format!("{kind:?} is not a request type Sextant's Nacos adapter handles")
            };
            return wire::error_payload_code(metrics, &request_id, NO_HANDLER, &msg);
        };
        let label = kind;
        let req = match wire::decode_request(kind, body) {
            Ok(r) => r,
            Err(e) => {
                metrics.request("grpc", label, e.kind().label());
                return error_payload(metrics, "", &e);
            }
        };
        let request_id = req.request_id.clone().unwrap_or_default();
        let who = match self.authorize(kind, &req, token, tls) {
            Ok(w) => w,
            Err(e) => {
                metrics.request("grpc", label, e.kind().label());
                return error_payload(metrics, &request_id, &e);
            }
        };
        let conn = self.conns.get(addr);
        let actor = who.actor(addr.to_string(), "nacos-grpc");
        let registry = &self.conns.adapter.registry;
        let result = registry
            .admitted(actor, async {
                match kind {
                    "ServerCheckRequest" => Ok(json!({
                        "connectionId": conn.id,
                        "supportAbilityNegotiation": false,
                    })),
                    "HealthCheckRequest" => Ok(json!({})),
                    "InstanceRequest" => self.instance(&conn, &req, false).await,
                    "PersistentInstanceRequest" => self.instance(&conn, &req, true).await,
                    "BatchInstanceRequest" => self.batch(&conn, &req).await,
                    "ServiceQueryRequest" => self.query(&req),
                    "ServiceListRequest" => self.list(&req),
                    _ => self.subscribe(&conn, &req, &who),
                }
            })
            .await
            .unwrap_or_else(|refused| Err(refused.into()));
        let answer =
            result.and_then(|fields| success_payload(metrics, response, &request_id, fields));
        match answer {
            Ok(p) => {
                metrics.request("grpc", label, "ok");
                p
            }
            Err(e) => {
                metrics.request("grpc", label, e.kind().label());
                tracing::debug!(request = kind, connection = %conn.id, error = %e, "nacos request refused");
                error_payload(metrics, &request_id, &e)
            }
        }
    }
}

impl Api {
    /// The `accessToken` a request carries (Payload metadata header, as the Nacos SDKs send
    /// it) checked for what the request type needs: instance writes `write`, queries and
    /// subscriptions `read` of the service, service lists `read` of the namespace. Server
    /// and health checks pass without one.
    fn authorize(
        &self,
        kind: &str,
        req: &wire::NamingRequest,
        token: Option<&str>,
        tls: Option<&sextant_core::TlsPeer>,
    ) -> Result<sextant_core::Principal, NacosError> {
        let acl = self.conns.adapter.registry.acl();
        if matches!(kind, "ServerCheckRequest" | "HealthCheckRequest") {
            return Ok(sextant_core::Principal::anonymous());
        }
        let who = acl.authenticate_peer(token, tls)?;
        let ns = mapping::namespace(req.namespace.as_deref());
        let right = match kind {
            "InstanceRequest" | "PersistentInstanceRequest" | "BatchInstanceRequest" => {
                Right::Write
            }
            _ => Right::Read,
        };
        if kind == "ServiceListRequest" {
            who.authorize(right, &Resource::Namespace(ns))?;
        } else {
            let (_, key) = req.service()?;
            who.authorize(right, &Resource::Service(&key.namespace, &key.service))?;
        }
        Ok(who)
    }
}

#[tonic::async_trait]
impl RequestApi for Api {
    async fn request(
        &self,
        request: tonic::Request<Payload>,
    ) -> Result<tonic::Response<Payload>, Status> {
        let addr = request
            .remote_addr()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let tls = request.extensions().get::<sextant_core::TlsPeer>().cloned();
        let p = request.into_inner();
        let token = p
            .metadata
            .as_ref()
            .and_then(|m| m.headers.get("accessToken"))
            .map(String::as_str);
        Ok(tonic::Response::new(
            self.handle(addr, p.kind(), p.body_bytes(), token, tls.as_ref())
                .await,
        ))
    }
}

#[tonic::async_trait]
impl BiRequestStream for Api {
    type requestBiStreamStream = ReceiverStream<Result<Payload, Status>>;

    async fn request_bi_stream(
        &self,
        request: tonic::Request<Streaming<Payload>>,
    ) -> Result<tonic::Response<Self::requestBiStreamStream>, Status> {
        let addr = request
            .remote_addr()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        let conn = self.conns.get(addr);
        let stream = {
            let mut st = conn.state.lock();
            st.attached = true;
            st.stream += 1;
            st.stream
        };
        conn.outbound.send_replace(Some(tx));
        self.conns.adapter.metrics.connections.inc();
        tokio::spawn(read_stream(self.conns.clone(), conn, stream, inbound));
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests;
