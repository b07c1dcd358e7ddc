//! Sextant's xDS adapter: an Envoy aggregated discovery service (ADS) that proxyless gRPC
//! clients (`xds:///{service}.{namespace}` targets) and Envoy subscribe to, generated from the
//! registry. Like every adapter it only reads through the core's `Registry` API.
//!
//! - `resources`: the pure mapping from a service to Listener / RouteConfiguration / Cluster /
//!   ClusterLoadAssignment (names, which instances, locality priorities).
//! - `hub`: one shared, debounced feed and encoding per subscribed service; the catalog of all
//!   services for wildcard subscriptions.
//! - `session`: what a stream holds and the loop that drives it; `sotw` and `delta`: the two
//!   protocol variants' rules.
//! - `status`: the open streams for `/v1/xds/clients`; `metrics`; `bootstrap`: the
//!   `GRPC_XDS_BOOTSTRAP` file `sextant xds bootstrap` prints.
#![forbid(unsafe_code)]

pub mod bootstrap;
mod delta;
mod hub;
mod metrics;
pub mod resources;
mod session;
mod sotw;
mod status;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use sextant_core::Registry;
use tonic::{Request, Response, Status, Streaming};

pub use metrics::XdsMetrics;
pub use status::{ClientStatus, TypeStatus};

use hub::Hub;
use session::{drive, Session};

/// The xDS adapter of a node: hand [`XdsServer::service`] to the gRPC listener.
#[derive(Clone)]
pub struct XdsServer {
    hub: Arc<Hub>,
}

impl XdsServer {
    /// `debounce`: how long a service's feed waits after a change before it pushes, so a
    /// burst of changes becomes one push. Must be called inside a Tokio runtime.
    pub fn new(registry: Registry, debounce: Duration, metrics: XdsMetrics) -> Self {
        Self {
            hub: Hub::new(registry, debounce, metrics),
        }
    }

    /// The `envoy.service.discovery.v3.AggregatedDiscoveryService` gRPC service.
    pub fn service(&self, max_message_bytes: usize) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self.clone())
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(usize::MAX)
    }

    /// With auth on, a stream needs `read` on every namespace (it may subscribe to any name,
    /// or to all of them): its `authorization: Bearer <secret>` metadata is checked when it
    /// opens. (Per-name checks and a token in the node's metadata are not done.) The stream
    /// is admitted once, by the rate limits of its address and token.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let md = request.metadata();
        let secret = md
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let right = sextant_core::model::acl::Right::Read;
        let all = sextant_core::model::acl::Resource::Global;
        let tls = request.extensions().get::<sextant_core::TlsPeer>();
        match self.hub.registry.acl().check(secret, tls, right, &all) {
            Ok(who) => {
                let source = request.remote_addr().map(|a| a.to_string());
                let actor = who.actor(source.unwrap_or_default(), "xds");
                self.hub.registry.admit(&actor).map_err(|e| {
                    let mut status = Status::resource_exhausted(e.to_string());
                    if let Some(v) = e
                        .retry_after()
                        .and_then(|w| sextant_core::retry_after_header(w).parse().ok())
                    {
                        status.metadata_mut().insert("retry-after", v);
                    }
                    status
                })
            }
            Err(sextant_core::AuthError::Unauthenticated(m)) => Err(Status::unauthenticated(
                format!("{m}: send the metadata authorization: Bearer <secret>"),
            )),
            Err(sextant_core::AuthError::Denied(d)) => {
                Err(Status::permission_denied(d.to_string()))
            }
        }
    }

    /// Every open ADS stream, for `/v1/xds/clients`.
    pub fn clients(&self) -> Vec<ClientStatus> {
        self.hub.clients.list()
    }
}

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Responses<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.authorize(&request)?;
        let session = Session::new(self.hub.clone(), "sotw", request.remote_addr());
        let engine = sotw::Sotw::new(session);
        Ok(Response::new(Box::pin(drive(engine, request.into_inner()))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.authorize(&request)?;
        let session = Session::new(self.hub.clone(), "delta", request.remote_addr());
        let engine = delta::Delta::new(session);
        Ok(Response::new(Box::pin(drive(engine, request.into_inner()))))
    }
}
