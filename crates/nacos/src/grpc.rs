//! The Nacos 2.x gRPC protocol: unary `Request/request` and the `BiRequestStream` a client
//! keeps open, both carrying `Payload{metadata.type, body: JSON}`.
//!
//! A connection is known by its peer address (Nacos' own servers do the same): the unary
//! requests and the bi-stream of one client share one HTTP/2 connection. This module owns what
//! is bound to a connection and nothing else:
//! - the ephemeral instances it registered: their leases (one grace period long) are renewed
//!   while the connection lives, so they lapse a grace period after it drops;
//! - its subscriptions: one core [`sextant_core::Subscription`] per subscribed service, whose
//!   deliveries become `NotifySubscriberRequest` pushes of the service's whole current state on
//!   the bi-stream (the core coalesces, so a slow client gets the latest state, never a queue).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use sextant_core::model::{Registration, Revision, ServiceKey};
use sextant_core::{HeartbeatResult, Op};
use sextant_proto::nacos::bi_request_stream_server::{BiRequestStream, BiRequestStreamServer};
use sextant_proto::nacos::request_server::{Request as RequestApi, RequestServer};
use sextant_proto::nacos::{Metadata, Payload};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Status, Streaming};

use crate::mapping::{self, InfoOptions, NacosRegistration, NacosService};
use crate::{lease_seconds, now_ms, NacosError, Shared};

/// Pushes queued per connection before the push tasks wait (they coalesce meanwhile).
const PUSH_QUEUE: usize = 256;
/// How long 2.x clients may cache pushed state, in ms.
const PUSH_CACHE_MILLIS: u64 = 10_000;
/// Nacos' error code for "no handler for this request type".
const NO_HANDLER: u16 = 302;

type Outbound = mpsc::Sender<Result<Payload, Status>>;

pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener, stop: watch::Receiver<bool>) {
    let conns = Arc::new(Connections {
        shared: shared.clone(),
        map: Mutex::new(HashMap::new()),
        next_push: AtomicU64::new(1),
        stop: stop.clone(),
    });
    tokio::spawn(renew_leases(conns.clone()));
    let api = Api { conns };
    let mut s = stop;
    let r = tonic::transport::Server::builder()
        // Find dead peers (a killed client's host, a partition) without waiting on TCP.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(RequestServer::new(api.clone()))
        .add_service(BiRequestStreamServer::new(api))
        // No Nagle: a push larger than one HTTP/2 frame would otherwise wait ~40 ms for the
        // client's delayed ACK.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = s.wait_for(|v| *v).await;
            },
        )
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "nacos grpc server failed");
    }
}

/// One client connection.
struct Conn {
    id: String,
    addr: SocketAddr,
    created: Instant,
    /// The bi-stream's sender, once the client opened it.
    outbound: watch::Sender<Option<Outbound>>,
    state: Mutex<ConnState>,
}

#[derive(Default)]
struct ConnState {
    /// Ephemeral instances registered over this connection.
    instances: HashSet<(ServiceKey, String)>,
    /// (service, clusters) → its push task.
    subscriptions: HashMap<SubscriptionKey, JoinHandle<()>>,
    attached: bool,
    /// Bumped by each bi-stream the connection opens: only the latest one's end closes it.
    stream: u64,
    closed: bool,
    client: String,
}

impl Conn {
    fn close(&self, metrics: &crate::NacosMetrics) -> usize {
        let mut st = self.state.lock();
        if st.closed {
            return 0;
        }
        st.closed = true;
        for (_, task) in st.subscriptions.drain() {
            task.abort();
            metrics.subscriptions.dec();
        }
        self.outbound.send_replace(None);
        st.instances.len()
    }
}

struct Connections {
    shared: Arc<Shared>,
    map: Mutex<HashMap<SocketAddr, Arc<Conn>>>,
    next_push: AtomicU64,
    stop: watch::Receiver<bool>,
}

/// A subscribed service and its cluster filter (`a,b`; empty for all).
type SubscriptionKey = (ServiceKey, String);

impl Connections {
    fn get(&self, addr: SocketAddr) -> Arc<Conn> {
        let mut map = self.map.lock();
        if let Some(c) = map.get(&addr) {
            if !c.state.lock().closed {
                return c.clone();
            }
        }
        let conn = Arc::new(Conn {
            id: format!("{}_{}_{}", now_ms(), addr.ip(), addr.port()),
            addr,
            created: Instant::now(),
            outbound: watch::Sender::new(None),
            state: Mutex::new(ConnState::default()),
        });
        map.insert(addr, conn.clone());
        conn
    }

    fn remove(&self, conn: &Arc<Conn>) {
        let mut map = self.map.lock();
        if map.get(&conn.addr).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            map.remove(&conn.addr);
        }
    }
}

/// Renews the leases of every live connection's ephemeral instances, and forgets connections
/// that closed or never opened their bi-stream.
async fn renew_leases(conns: Arc<Connections>) {
    let grace = conns.shared.config.connection_grace;
    let every = (grace / 4).max(Duration::from_millis(250));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = conns.stop.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        let all: Vec<Arc<Conn>> = conns.map.lock().values().cloned().collect();
        for conn in all {
            let (live, items) = {
                let st = conn.state.lock();
                let live = !st.closed && (st.attached || conn.created.elapsed() < grace * 2);
                (live, st.instances.iter().cloned().collect::<Vec<_>>())
            };
            if !live {
                let n = conn.close(&conns.shared.metrics);
                conns.remove(&conn);
                if n > 0 {
                    tracing::info!(connection = %conn.id, instances = n, "nacos connection never opened its stream; its instances lapse");
                }
                continue;
            }
            if items.is_empty() {
                continue;
            }
            let results = conns.shared.registry.heartbeat(&items);
            let gone: Vec<_> = items
                .into_iter()
                .zip(results)
                .filter(|(_, r)| *r == HeartbeatResult::Unknown)
                .map(|(k, _)| k)
                .collect();
            if !gone.is_empty() {
                let mut st = conn.state.lock();
                for k in gone {
                    st.instances.remove(&k);
                }
            }
        }
    }
}

#[derive(Clone)]
struct Api {
    conns: Arc<Connections>,
}

/// The fields of the naming requests Sextant reads; everything else is ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct NamingRequest {
    request_id: Option<String>,
    namespace: Option<String>,
    service_name: Option<String>,
    group_name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    instance: Option<WireInstance>,
    instances: Option<Vec<WireInstance>>,
    cluster: Option<String>,
    clusters: Option<String>,
    /// Java sends `healthyOnly`, the Python SDK `healthOnly`.
    #[serde(alias = "healthOnly")]
    healthy_only: Option<bool>,
    subscribe: Option<bool>,
    page_no: Option<usize>,
    page_size: Option<usize>,
}

/// What Sextant reads of a `ConnectionSetupRequest`: who the client is, for the logs.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct SetupRequest {
    client_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct WireInstance {
    ip: Option<String>,
    port: Option<i64>,
    weight: Option<f64>,
    healthy: Option<bool>,
    enabled: Option<bool>,
    cluster_name: Option<String>,
    metadata: Option<BTreeMap<String, Value>>,
}

impl WireInstance {
    fn registration(&self) -> Result<NacosRegistration, NacosError> {
        let port = self.port.ok_or(NacosError::missing("instance.port"))?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| NacosError::invalid("port", format!("must be 1-65535, got {port}")))?;
        Ok(NacosRegistration {
            ip: self
                .ip
                .clone()
                .filter(|ip| !ip.trim().is_empty())
                .ok_or(NacosError::missing("instance.ip"))?,
            port,
            cluster: mapping::cluster(self.cluster_name.as_deref()).to_string(),
            weight: self.weight.unwrap_or(1.0),
            healthy: self.healthy.unwrap_or(true),
            enabled: self.enabled.unwrap_or(true),
            metadata: self
                .metadata
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, mapping::json_text(v)))
                .collect(),
        })
    }
}

impl NamingRequest {
    fn service(&self) -> Result<(NacosService, ServiceKey), NacosError> {
        let svc = NacosService::parse(
            self.service_name.as_deref().unwrap_or(""),
            self.group_name.as_deref(),
        )?;
        let key = svc.key(mapping::namespace(self.namespace.as_deref()))?;
        Ok((svc, key))
    }
}

fn payload(kind: &str, body: &Value) -> Payload {
    raw_payload(kind, serde_json::to_vec(body).unwrap_or_default())
}

fn raw_payload(kind: &str, body: Vec<u8>) -> Payload {
    Payload {
        metadata: Some(Metadata {
            r#type: kind.to_string(),
            client_ip: String::new(),
            headers: HashMap::new(),
        }),
        body: Some(prost_types::Any {
            type_url: String::new(),
            value: body,
        }),
    }
}

/// A successful response: Nacos' common fields plus the response's own.
fn success(request_id: &str, mut fields: Value) -> Value {
    if let Value::Object(m) = &mut fields {
        m.insert("resultCode".into(), json!(200));
        m.insert("errorCode".into(), json!(0));
        m.insert("message".into(), json!(""));
        m.insert("requestId".into(), json!(request_id));
    }
    fields
}

fn error_body(request_id: &str, code: u16, message: &str) -> Value {
    json!({
        "resultCode": 500,
        "errorCode": code,
        "message": message,
        "requestId": request_id,
    })
}

/// The response type Nacos pairs with a request type.
fn response_type(request: &str) -> Option<&'static str> {
    Some(match request {
        "ServerCheckRequest" => "ServerCheckResponse",
        "HealthCheckRequest" => "HealthCheckResponse",
        "InstanceRequest" | "PersistentInstanceRequest" => "InstanceResponse",
        "BatchInstanceRequest" => "BatchInstanceResponse",
        "ServiceQueryRequest" => "QueryServiceResponse",
        "ServiceListRequest" => "ServiceListResponse",
        "SubscribeServiceRequest" => "SubscribeServiceResponse",
        _ => return None,
    })
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
        let p = request.into_inner();
        let kind = p.metadata.map(|m| m.r#type).unwrap_or_default();
        let body = p.body.map(|b| b.value).unwrap_or_default();
        Ok(tonic::Response::new(self.handle(addr, &kind, &body).await))
    }
}

impl Api {
    async fn handle(&self, addr: SocketAddr, kind: &str, body: &[u8]) -> Payload {
        let shared = &self.conns.shared;
        let req: NamingRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                shared.metrics.request("grpc", kind, "invalid");
                let msg = format!("{kind} body is not valid JSON for that type: {e}");
                return payload("ErrorResponse", &error_body("", 400, &msg));
            }
        };
        let request_id = req.request_id.clone().unwrap_or_default();
        let Some(response) = response_type(kind) else {
            shared.metrics.request("grpc", "unsupported", "unsupported");
            let msg = if kind.starts_with("Config") {
                format!("{kind}: the Nacos config center is not part of Sextant (naming only)")
            } else {
                format!("{kind:?} is not a request type Sextant's Nacos adapter handles")
            };
            return payload("ErrorResponse", &error_body(&request_id, NO_HANDLER, &msg));
        };
        let conn = self.conns.get(addr);
        let result = match kind {
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
            _ => self.subscribe(&conn, &req),
        };
        match result {
            Ok(fields) => {
                shared.metrics.request("grpc", kind, "ok");
                payload(response, &success(&request_id, fields))
            }
            Err(e) => {
                shared.metrics.request("grpc", kind, e.label());
                tracing::debug!(request = kind, connection = %conn.id, error = %e, "nacos request refused");
                payload(
                    "ErrorResponse",
                    &error_body(&request_id, e.status(), &e.to_string()),
                )
            }
        }
    }

    async fn instance(
        &self,
        conn: &Arc<Conn>,
        req: &NamingRequest,
        persistent: bool,
    ) -> Result<Value, NacosError> {
        let (_, key) = req.service()?;
        let kind = req.kind.as_deref().unwrap_or("");
        let inst = req
            .instance
            .as_ref()
            .ok_or(NacosError::missing("instance"))?;
        let reg = inst.registration()?;
        let registry = &self.conns.shared.registry;
        let existing = mapping::find_instance(registry, &key, &reg.ip, reg.port, &reg.cluster)
            .map(|i| i.spec.id.to_string());
        match kind {
            "registerInstance" => {
                let (spec, status) = reg.to_sextant(existing.as_deref())?;
                let id = spec.id.to_string();
                let ttl_seconds = if persistent {
                    0
                } else {
                    lease_seconds(self.conns.shared.config.connection_grace)
                };
                // A Nacos 2.x connection holds one instance per service: registering another
                // replaces the one it registered before (clients rely on it to move ports).
                let replaced: Vec<String> = if persistent {
                    Vec::new()
                } else {
                    conn.state
                        .lock()
                        .instances
                        .iter()
                        .filter(|(k, old)| *k == key && *old != id)
                        .map(|(_, old)| old.clone())
                        .collect()
                };
                let mut ops = vec![Op::Register(Registration {
                    service: key.clone(),
                    spec,
                    status: Some(status),
                    ttl_seconds,
                })];
                ops.extend(replaced.iter().map(|old| Op::Deregister {
                    service: key.clone(),
                    id: old.clone(),
                }));
                crate::apply(registry, ops).await?;
                if persistent {
                    crate::ensure_checked(registry, &key).await?;
                } else {
                    let mut st = conn.state.lock();
                    for old in replaced {
                        st.instances.remove(&(key.clone(), old));
                    }
                    st.instances.insert((key, id));
                }
            }
            "deregisterInstance" | "deRegisterInstance" => {
                if let Some(id) = existing {
                    conn.state
                        .lock()
                        .instances
                        .remove(&(key.clone(), id.clone()));
                    crate::apply(registry, vec![Op::Deregister { service: key, id }]).await?;
                }
            }
            other => {
                return Err(NacosError::invalid(
                    "type",
                    format!("{other:?} is not registerInstance or deregisterInstance"),
                ))
            }
        }
        Ok(json!({"type": kind}))
    }

    /// `batchRegisterInstance` makes the given list the connection's whole set of instances of
    /// the service (clients send the remaining ones to deregister some); `batchDeregisterInstance`
    /// removes the given ones.
    async fn batch(&self, conn: &Arc<Conn>, req: &NamingRequest) -> Result<Value, NacosError> {
        let (_, key) = req.service()?;
        let kind = req.kind.as_deref().unwrap_or("");
        let regs = req
            .instances
            .as_ref()
            .ok_or(NacosError::missing("instances"))?
            .iter()
            .map(WireInstance::registration)
            .collect::<Result<Vec<_>, _>>()?;
        let registry = &self.conns.shared.registry;
        let ttl_seconds = lease_seconds(self.conns.shared.config.connection_grace);
        let mut ops = Vec::new();
        let mut ids = HashSet::new();
        for reg in &regs {
            let existing = mapping::find_instance(registry, &key, &reg.ip, reg.port, &reg.cluster)
                .map(|i| i.spec.id.to_string());
            match kind {
                "batchRegisterInstance" => {
                    let (spec, status) = reg.to_sextant(existing.as_deref())?;
                    ids.insert(spec.id.to_string());
                    ops.push(Op::Register(Registration {
                        service: key.clone(),
                        spec,
                        status: Some(status),
                        ttl_seconds,
                    }));
                }
                "batchDeregisterInstance" => {
                    if let Some(id) = existing {
                        ids.insert(id.clone());
                        ops.push(Op::Deregister {
                            service: key.clone(),
                            id,
                        });
                    }
                }
                other => {
                    return Err(NacosError::invalid(
                        "type",
                        format!(
                            "{other:?} is not batchRegisterInstance or batchDeregisterInstance"
                        ),
                    ))
                }
            }
        }
        let registering = kind == "batchRegisterInstance";
        let dropped: Vec<String> = if registering {
            let st = conn.state.lock();
            st.instances
                .iter()
                .filter(|(k, id)| *k == key && !ids.contains(id))
                .map(|(_, id)| id.clone())
                .collect()
        } else {
            Vec::new()
        };
        for id in &dropped {
            ops.push(Op::Deregister {
                service: key.clone(),
                id: id.clone(),
            });
        }
        crate::apply(registry, ops).await?;
        let mut st = conn.state.lock();
        for id in dropped {
            st.instances.remove(&(key.clone(), id));
        }
        for id in ids {
            if registering {
                st.instances.insert((key.clone(), id));
            } else {
                st.instances.remove(&(key.clone(), id));
            }
        }
        Ok(json!({"type": kind}))
    }

    fn query(&self, req: &NamingRequest) -> Result<Value, NacosError> {
        let (_, key) = req.service()?;
        let view = self.conns.shared.registry.get(&key, false);
        let opts = InfoOptions {
            grouped_name: false,
            clusters: mapping::cluster_filter(req.cluster.as_deref().or(req.clusters.as_deref())),
            healthy_only: req.healthy_only.unwrap_or(false),
            cache_millis: PUSH_CACHE_MILLIS,
            now_ms: now_ms(),
        };
        Ok(json!({"serviceInfo": mapping::service_info(&view, &opts)}))
    }

    fn list(&self, req: &NamingRequest) -> Result<Value, NacosError> {
        let ns = mapping::namespace(req.namespace.as_deref());
        sextant_core::model::validate_name("namespace", ns)
            .map_err(|e| NacosError::invalid("namespace", e.reason))?;
        let (count, names) = crate::http::services_page(
            &self.conns.shared,
            ns,
            req.group_name.as_deref(),
            req.page_no.unwrap_or(1),
            req.page_size.unwrap_or(10),
        );
        Ok(json!({"count": count, "serviceNames": names}))
    }

    fn subscribe(&self, conn: &Arc<Conn>, req: &NamingRequest) -> Result<Value, NacosError> {
        let (_, key) = req.service()?;
        let shared = &self.conns.shared;
        let clusters = req.clusters.clone().unwrap_or_default();
        let view = shared.registry.get(&key, false);
        let opts = InfoOptions {
            grouped_name: false,
            clusters: mapping::cluster_filter(Some(&clusters)),
            healthy_only: false,
            cache_millis: PUSH_CACHE_MILLIS,
            now_ms: now_ms(),
        };
        let info = mapping::service_info(&view, &opts);
        let sub_key = (key.clone(), clusters);
        let mut st = conn.state.lock();
        if req.subscribe.unwrap_or(true) {
            if !st.closed && !st.subscriptions.contains_key(&sub_key) {
                let task = tokio::spawn(push_changes(
                    self.conns.clone(),
                    conn.clone(),
                    key,
                    opts,
                    view.revision,
                ));
                st.subscriptions.insert(sub_key, task);
                shared.metrics.subscriptions.inc();
            }
        } else if let Some(task) = st.subscriptions.remove(&sub_key) {
            task.abort();
            shared.metrics.subscriptions.dec();
        }
        Ok(json!({"serviceInfo": info}))
    }
}

/// Pushes a subscribed service's whole state to the connection once at once, then after every
/// change the core delivers past `since` (the state the subscribe response carried).
async fn push_changes(
    conns: Arc<Connections>,
    conn: Arc<Conn>,
    key: ServiceKey,
    opts: InfoOptions,
    since: Revision,
) {
    let shared = &conns.shared;
    let mut sub = shared.registry.subscribe(vec![key.clone()], Some(since));
    let mut outbound = conn.outbound.subscribe();
    let svc = NacosService::from_sextant(&key.service);
    // Everything of the push body but `serviceInfo`, which is spliced in as encoded bytes.
    let head = |id: &str| {
        let mut v = serde_json::to_vec(&json!({
            "requestId": id,
            "module": "naming",
            "headers": {},
            "namespace": &*key.namespace,
            "serviceName": svc.name,
            "groupName": svc.group,
        }))
        .unwrap_or_default();
        v.pop(); // the closing brace
        v
    };
    // Like Nacos, push the current state once right after subscribing: a client that redoes
    // its registration before its subscription after a reconnect (the Rust SDK may) otherwise
    // never hears of it, as that change precedes the subscription.
    let mut initial = true;
    loop {
        let published = if std::mem::take(&mut initial) {
            None
        } else {
            let Ok(delivery) = sub.next().await else {
                return;
            };
            if delivery.events.is_empty() && delivery.snapshots.is_empty() {
                continue;
            }
            delivery.events.first().map(|e| e.published_at)
        };
        let tx = match outbound.wait_for(Option::is_some).await {
            Ok(tx) => tx.clone(),
            Err(_) => return,
        };
        let Some(tx) = tx else { return };
        let info = shared.infos.get(&shared.registry, &key, &opts);
        let id = conns.next_push.fetch_add(1, Ordering::Relaxed).to_string();
        let mut body = head(&id);
        body.extend_from_slice(b",\"serviceInfo\":");
        body.extend_from_slice(&info);
        body.push(b'}');
        if tx
            .send(Ok(raw_payload("NotifySubscriberRequest", body)))
            .await
            .is_err()
        {
            return;
        }
        shared.metrics.pushes.inc();
        if let Some(at) = published {
            shared
                .metrics
                .push_latency
                .observe(at.elapsed().as_secs_f64());
        }
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
        self.conns.shared.metrics.connections.inc();
        tokio::spawn(read_stream(self.conns.clone(), conn, stream, inbound));
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// Reads what the client sends on its bi-stream (set-up, push acks) until the connection
/// ends, then lets go of everything bound to it.
async fn read_stream(
    conns: Arc<Connections>,
    conn: Arc<Conn>,
    stream: u64,
    mut inbound: Streaming<Payload>,
) {
    let metrics = &conns.shared.metrics;
    let mut stop = conns.stop.clone();
    let why = loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = stop.wait_for(|v| *v) => break "server stopping".to_string(),
        };
        match msg {
            Ok(Some(p)) => {
                let kind = p.metadata.as_ref().map(|m| m.r#type.as_str()).unwrap_or("");
                match kind {
                    "NotifySubscriberResponse" => {
                        metrics.push_acks.inc();
                    }
                    "ConnectionSetupRequest" => {
                        let body = p.body.as_ref().map(|b| b.value.as_slice()).unwrap_or(&[]);
                        let setup: SetupRequest = serde_json::from_slice(body).unwrap_or_default();
                        let client = setup.client_version.unwrap_or_default();
                        tracing::info!(connection = %conn.id, peer = %conn.addr, client = %client, "nacos connection set up");
                        conn.state.lock().client = client;
                    }
                    other => {
                        tracing::debug!(connection = %conn.id, kind = other, "nacos stream message ignored")
                    }
                }
            }
            Ok(None) => break "client closed the stream".to_string(),
            Err(e) => break format!("stream error: {}", e.message()),
        }
    };
    metrics.connections.dec();
    if conn.state.lock().stream != stream {
        // The client opened a newer stream on the same connection; that one carries on.
        tracing::debug!(connection = %conn.id, reason = %why, "superseded nacos stream ended");
        return;
    }
    let instances = conn.close(metrics);
    conns.remove(&conn);
    let client = conn.state.lock().client.clone();
    tracing::info!(
        connection = %conn.id,
        client = %client,
        reason = %why,
        instances,
        grace = ?conns.shared.config.connection_grace,
        "nacos connection closed; its ephemeral instances lapse after the grace period"
    );
}
