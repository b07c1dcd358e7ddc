//! The native gRPC adapter (`sextant.v1.Registry`): the same operations as HTTP, batch register
//! and heartbeat, and a server-streaming Watch over many services.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use sextant_core::model::acl::{status_right, Resource, Right};
use sextant_core::model::{Event, EventKind, Health, Metadata, ServiceKey, StatusPatch};
use sextant_core::{
    AuthError, CoreMetrics, Delivery, HeartbeatResult, Principal, ServiceView, Subscription,
};
use sextant_proto::convert;
use sextant_proto::v1 as pb;
use sextant_proto::v1::registry_server::{Registry as RegistryApi, RegistryServer};
use tonic::{Request, Response, Status};

use crate::error::grpc_status;
use crate::views::{RegisterBody, StatusBody};
use crate::Node;

pub(crate) fn service(node: Arc<Node>) -> RegistryServer<GrpcApi> {
    let limit = node.config.max_body_bytes;
    RegistryServer::new(GrpcApi { node })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX)
}

pub(crate) struct GrpcApi {
    node: Arc<Node>,
}

fn key(r: Option<&pb::ServiceRef>) -> Result<ServiceKey, Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("service is required"))?;
    ServiceKey::new(&r.namespace, &r.service).map_err(grpc_status)
}

fn health_from(h: i32) -> Result<Health, Status> {
    convert::health_from_pb(h)
        .ok_or_else(|| Status::invalid_argument(format!("invalid health {h}")))
}

fn registration(r: pb::RegisterRequest) -> Result<sextant_core::model::Registration, Status> {
    let service = key(r.service.as_ref())?;
    let spec = r
        .spec
        .ok_or_else(|| Status::invalid_argument("spec is required"))?;
    let status = match r.status {
        Some(s) => Some(StatusBody {
            health: Some(health_from(s.health)?),
            enabled: Some(s.enabled),
            weight: Some(s.weight),
            weight_override: None,
        }),
        None => None,
    };
    let body = RegisterBody {
        id: (!spec.id.is_empty()).then(|| spec.id.into()),
        host: spec.host.into(),
        port: spec.port,
        protocol: (!spec.protocol.is_empty()).then(|| spec.protocol.into()),
        version: spec.version.into(),
        location: convert::location_from_pb(spec.location.unwrap_or_default()),
        cell: spec.cell.into(),
        lane: spec.lane.into(),
        metadata: spec.metadata.into_iter().collect::<Metadata>(),
        status,
        ttl_seconds: r.ttl_seconds,
    };
    body.into_registration(service, None).map_err(grpc_status)
}

fn service_ref(k: &ServiceKey) -> pb::ServiceRef {
    convert::service_ref(&k.namespace, &k.service)
}

fn service_to(v: &ServiceView) -> pb::Service {
    pb::Service {
        service: Some(service_ref(&v.service)),
        revision: v.revision,
        protected: v.protected,
        protect_threshold: v.config.protect_threshold,
        instances: v.instances.iter().map(convert::instance_to_pb).collect(),
        check: Some(convert::check_to_pb(&v.config.check)),
    }
}

fn event_to(e: &Event) -> pb::WatchEvent {
    use pb::watch_event::Kind;
    let kind = match &e.kind {
        EventKind::Upsert(i) => Kind::Upsert(convert::instance_to_pb(i)),
        EventKind::Status { id, status } => Kind::Status(pb::StatusChange {
            id: id.clone(),
            status: Some(convert::status_to_pb(*status)),
        }),
        EventKind::Delete { id, reason } => Kind::Delete(pb::Deletion {
            id: id.clone(),
            reason: reason.as_str().into(),
        }),
    };
    pb::WatchEvent {
        revision: e.revision,
        service: Some(service_ref(&e.service)),
        kind: Some(kind),
        resync: false,
        resume_revision: 0,
    }
}

/// Events, then snapshots; the last frame carries the delivery's resume revision (a bookmark
/// frame when there is nothing else), so a client cut off mid-delivery resumes from the
/// previous delivery's end and loses nothing.
fn delivery_to(d: &Delivery) -> Vec<Result<pb::WatchEvent, Status>> {
    let mut out: Vec<pb::WatchEvent> = d.events.iter().map(|e| event_to(&e.event)).collect();
    out.extend(d.snapshots.iter().map(|s| pb::WatchEvent {
        revision: d.revision,
        service: Some(service_ref(&s.view.service)),
        kind: Some(pb::watch_event::Kind::Snapshot(service_to(&s.view))),
        resync: s.resync,
        resume_revision: 0,
    }));
    match out.last_mut() {
        Some(last) => last.resume_revision = d.revision,
        None => out.push(pb::WatchEvent {
            revision: d.revision,
            resume_revision: d.revision,
            ..Default::default()
        }),
    }
    out.into_iter().map(Ok).collect()
}

/// A watch stream polled by the connection itself: no task and no queue hop per stream, which
/// is most of the per-delivery cost at tens of thousands of streams. A client that stops
/// reading simply stops being polled: the core keeps only its cursor, HTTP/2 flow control
/// bounds what is buffered, and when it reads again it gets everything it missed coalesced
/// (or a snapshot).
fn watch_stream(
    sub: Subscription,
    metrics: CoreMetrics,
    revoked: crate::stream::Revoked,
) -> impl Stream<Item = Result<pb::WatchEvent, Status>> + Send {
    struct State {
        revoked: crate::stream::Revoked,
        sub: Subscription,
        queue: VecDeque<Result<pb::WatchEvent, Status>>,
        metrics: CoreMetrics,
        done: bool,
    }
    let state = State {
        revoked,
        sub,
        queue: VecDeque::new(),
        metrics,
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(item) = st.queue.pop_front() {
                return Some((item, st));
            }
            if st.done {
                return None;
            }
            let next = tokio::select! {
                d = st.sub.next() => d,
                reason = &mut st.revoked => {
                    st.done = true;
                    st.queue.push_back(Err(Status::unauthenticated(reason)));
                    continue;
                }
            };
            match next {
                Ok(d) => {
                    for e in &d.events {
                        st.metrics
                            .push_seconds
                            .observe(e.published_at.elapsed().as_secs_f64());
                    }
                    st.queue.extend(delivery_to(&d));
                    // Items already handed over are dropped as the client reads; do not
                    // keep the capacity of a large catch-up.
                    st.queue.shrink_to(16);
                }
                Err(closed) => {
                    st.done = true;
                    st.queue.push_back(Err(Status::unavailable(closed.reason)));
                }
            }
        }
    })
}

/// An [`AuthError`] as a gRPC status: UNAUTHENTICATED or PERMISSION_DENIED with the reason.
pub(crate) fn auth_status(e: AuthError) -> Status {
    match e {
        AuthError::Unauthenticated(m) => Status::unauthenticated(format!(
            "{m}: send the metadata authorization: Bearer <secret>"
        )),
        AuthError::Denied(d) => Status::permission_denied(d.to_string()),
    }
}

/// The secret in `authorization: Bearer <secret>` metadata, if any.
pub(crate) fn bearer(md: &tonic::metadata::MetadataMap) -> Option<&str> {
    let v = md.get("authorization")?.to_str().ok()?.trim();
    let (scheme, secret) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(secret.trim())
}

fn allow(who: &Principal, right: Right, res: &Resource<'_>) -> Result<(), Status> {
    who.authorize(right, res).map_err(auth_status)
}

fn allow_service(who: &Principal, right: Right, k: &ServiceKey) -> Result<(), Status> {
    allow(who, right, &Resource::Service(&k.namespace, &k.service))
}

impl GrpcApi {
    fn caller<R>(&self, req: &Request<R>) -> Result<Principal, Status> {
        self.node
            .registry
            .acl()
            .authenticate_peer(bearer(req.metadata()), req.extensions().get())
            .map_err(auth_status)
    }

    /// Labels a call with the HTTP status of its outcome's class (one table, the core's
    /// `ErrorKind`), so a store failure counts as 503, not as bad input.
    fn observe(&self, method: &'static str, started: tokio::time::Instant, err: Option<&Status>) {
        let status = err.map_or(200, |s| {
            sextant_core::ErrorKind::from_grpc_code(s.code() as i32).http_status()
        });
        self.node.api_metrics.observe(
            "grpc",
            "POST",
            method,
            status,
            started.elapsed().as_secs_f64(),
        );
    }

    /// Every unary call goes through here: the caller is authenticated from the request's
    /// `authorization: Bearer` metadata (UNAUTHENTICATED without a valid token), the call runs
    /// with its actor set for the audit log, and is counted.
    async fn timed<T, R, Fut>(
        &self,
        method: &'static str,
        req: Request<R>,
        f: impl FnOnce(Principal, R) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let started = tokio::time::Instant::now();
        let r = match self.caller(&req) {
            Ok(who) => {
                let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
                let actor = who.actor(peer, "grpc");
                self.node
                    .registry
                    .admitted(actor, f(who, req.into_inner()))
                    .await
                    .unwrap_or_else(|refused| Err(grpc_status(refused)))
            }
            Err(e) => Err(e),
        };
        self.observe(method, started, r.as_ref().err());
        r.map(Response::new)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl RegistryApi for GrpcApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.timed("Register", req, |who, r| async move {
            let reg = registration(r)?;
            let (ns, svc) = (&reg.service.namespace, &reg.service.service);
            allow(
                &who,
                Right::Write,
                &Resource::Instance(ns, svc, &reg.spec.id),
            )?;
            let revision = self
                .node
                .registry
                .register(reg)
                .await
                .map_err(grpc_status)?;
            Ok(pb::WriteResponse { revision })
        })
        .await
    }

    async fn batch_register(
        &self,
        req: Request<pb::BatchRegisterRequest>,
    ) -> Result<Response<pb::BatchWriteResponse>, Status> {
        self.timed("BatchRegister", req, |who, r| async move {
            let ops = r
                .instances
                .into_iter()
                .enumerate()
                .map(|(n, r)| {
                    registration(r)
                        .and_then(|reg| {
                            let (ns, svc) = (&reg.service.namespace, &reg.service.service);
                            let res = Resource::Instance(ns, svc, &reg.spec.id);
                            allow(&who, Right::Write, &res)?;
                            Ok(reg)
                        })
                        .map(sextant_core::Op::Register)
                        .map_err(|s| {
                            Status::new(s.code(), format!("instances[{n}]: {}", s.message()))
                        })
                })
                .collect::<Result<Vec<_>, Status>>()?;
            let results = self.node.registry.apply(ops).await.map_err(grpc_status)?;
            let revisions = results
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(grpc_status)?;
            Ok(pb::BatchWriteResponse { revisions })
        })
        .await
    }

    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.timed("Deregister", req, |who, r| async move {
            let k = key(r.service.as_ref())?;
            allow(
                &who,
                Right::Write,
                &Resource::Instance(&k.namespace, &k.service, &r.id),
            )?;
            let revision = self
                .node
                .registry
                .deregister(k, r.id)
                .await
                .map_err(grpc_status)?;
            Ok(pb::WriteResponse { revision })
        })
        .await
    }

    async fn update_status(
        &self,
        req: Request<pb::UpdateStatusRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.timed("UpdateStatus", req, |who, r| async move {
            let patch = StatusPatch {
                health: r.health.map(health_from).transpose()?,
                enabled: r.enabled,
                weight: r.weight,
                weight_override: if r.clear_weight_override {
                    Some(None)
                } else {
                    r.weight_override.map(Some)
                },
                draining: r.draining,
            };
            let k = key(r.service.as_ref())?;
            let res = Resource::Instance(&k.namespace, &k.service, &r.id);
            allow(&who, status_right(&patch), &res)?;
            let revision = self
                .node
                .registry
                .update_status(k, r.id, patch)
                .await
                .map_err(grpc_status)?;
            Ok(pb::WriteResponse { revision })
        })
        .await
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.timed("Heartbeat", req, |who, r| async move {
            let items = r.instances;
            let keys = items
                .iter()
                .map(|i| {
                    let k = key(i.service.as_ref())?;
                    allow(
                        &who,
                        Right::Write,
                        &Resource::Instance(&k.namespace, &k.service, &i.id),
                    )?;
                    Ok((k, i.id.clone()))
                })
                .collect::<Result<Vec<_>, Status>>()?;
            // A follower that can neither forward renewals nor hold through a store outage
            // refuses (the leader decides expiries).
            self.node.registry.renews_leases().map_err(grpc_status)?;
            let results = self.node.registry.heartbeat(&keys);
            let mut renewed = 0;
            let mut unknown = Vec::new();
            for (item, r) in items.into_iter().zip(results) {
                match r {
                    HeartbeatResult::Renewed | HeartbeatResult::Persistent => renewed += 1,
                    HeartbeatResult::Unknown => unknown.push(item),
                }
            }
            Ok(pb::HeartbeatResponse { renewed, unknown })
        })
        .await
    }

    async fn get_service(
        &self,
        req: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        self.timed("GetService", req, |who, r| async move {
            let k = key(r.service.as_ref())?;
            allow_service(&who, Right::Read, &k)?;
            let view = if r.wait_ms > 0 {
                let wait =
                    Duration::from_millis(u64::from(r.wait_ms)).min(self.node.config.max_wait());
                self.node
                    .registry
                    .get_when_changed(&k, r.wait_index, wait, r.healthy_only)
                    .await
            } else {
                self.node.registry.get(&k, r.healthy_only)
            };
            Ok(service_to(&view))
        })
        .await
    }

    async fn discover(
        &self,
        req: Request<pb::DiscoverRequest>,
    ) -> Result<Response<pb::DiscoverResponse>, Status> {
        self.timed("Discover", req, |who, r| async move {
            let keys = r
                .services
                .iter()
                .map(|s| {
                    let k = key(Some(s))?;
                    allow_service(&who, Right::Read, &k)?;
                    Ok::<_, Status>(k)
                })
                .collect::<Result<Vec<_>, _>>()?;
            let (revision, views) = self.node.registry.discover(&keys, r.healthy_only);
            Ok(pb::DiscoverResponse {
                services: views.iter().map(service_to).collect(),
                revision,
            })
        })
        .await
    }

    async fn list_namespaces(
        &self,
        req: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        self.timed("ListNamespaces", req, |who, _| async move {
            allow(&who, Right::Read, &Resource::Global)?;
            let namespaces = self
                .node
                .registry
                .namespaces()
                .into_iter()
                .map(|n| pb::NamespaceSummary {
                    namespace: n.namespace.to_string(),
                    services: n.services as u32,
                    instances: n.instances as u32,
                })
                .collect();
            Ok(pb::ListNamespacesResponse { namespaces })
        })
        .await
    }

    async fn list_services(
        &self,
        req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        self.timed("ListServices", req, |who, r| async move {
            let ns = r.namespace;
            sextant_core::model::validate_name("namespace", &ns).map_err(grpc_status)?;
            allow(&who, Right::Read, &Resource::Namespace(&ns))?;
            let services = self
                .node
                .registry
                .services(&ns)
                .into_iter()
                .map(|s| pb::ServiceSummary {
                    service: s.service.service.to_string(),
                    revision: s.revision,
                    instances: s.instances as u32,
                    serving: s.serving as u32,
                })
                .collect();
            Ok(pb::ListServicesResponse { services })
        })
        .await
    }

    async fn configure_service(
        &self,
        req: Request<pb::ConfigureServiceRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.timed("ConfigureService", req, |who, r| async move {
            let k = key(r.service.as_ref())?;
            allow_service(&who, Right::Operate, &k)?;
            let mut config = self.node.registry.get(&k, false).config;
            if let Some(t) = r.protect_threshold {
                config.protect_threshold = t;
            }
            if let Some(c) = r.check {
                config.check = convert::check_from_pb(c).map_err(grpc_status)?;
            }
            let revision = self
                .node
                .registry
                .configure(k, config)
                .await
                .map_err(grpc_status)?;
            Ok(pb::WriteResponse { revision })
        })
        .await
    }

    async fn report_suspects(
        &self,
        req: Request<pb::SuspectRequest>,
    ) -> Result<Response<pb::SuspectResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip().to_string());
        self.timed("ReportSuspects", req, |who, r| async move {
            let Some(scanner) = &self.node.scanner else {
                return Err(Status::unavailable(
                    "the health scanner is turned off on this node",
                ));
            };
            let reporter = if r.reporter.is_empty() {
                peer.unwrap_or_else(|| "unknown".into())
            } else {
                r.reporter
            };
            let mut outcomes = Vec::with_capacity(r.instances.len());
            for i in &r.instances {
                let k = key(i.service.as_ref())?;
                allow_service(&who, Right::Read, &k)?;
                outcomes.push(
                    scanner
                        .suspect(k, &i.id, &reporter)
                        .await
                        .as_str()
                        .to_string(),
                );
            }
            Ok(pb::SuspectResponse { outcomes })
        })
        .await
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let who = self.caller(&req)?;
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        self.node
            .registry
            .admit(&who.actor(peer, "grpc"))
            .map_err(grpc_status)?;
        let r = req.into_inner();
        if r.services.is_empty() {
            return Err(Status::invalid_argument(
                "give at least one service to watch",
            ));
        }
        let keys = r
            .services
            .iter()
            .map(|s| {
                let k = key(Some(s))?;
                allow_service(&who, Right::Read, &k)?;
                Ok::<_, Status>(k)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sub = self.node.registry.subscribe(keys, r.since);
        let revoked = crate::stream::revoked(self.node.registry.clone(), who);
        let stream = watch_stream(sub, self.node.registry.metrics().clone(), revoked);
        Ok(Response::new(Box::pin(stream)))
    }
}
