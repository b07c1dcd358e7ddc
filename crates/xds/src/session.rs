//! What both ADS variants share per stream: the client's node and locality, the slots of the
//! services its subscriptions cover (and the catalog for a wildcard), its status entry, and
//! the loop that drives a protocol engine — read a request or wake on a change, then send
//! what is due. The response stream is polled by the connection itself: no task and no queue
//! per stream, so a client that does not read holds back only its own stream.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::Any;
use futures::Stream;
use parking_lot::Mutex;
use sextant_core::model::{now_ms, Revision, ServiceKey};
use tokio::sync::Notify;
use tonic::{Status, Streaming};

use crate::hub::{Hub, Slot};
use crate::metrics::{StreamLabels, TypeLabels};
use crate::resources::{self, ClientLocality, Kind};
use crate::status::ClientStatus;
use prometheus_client::metrics::counter::Counter;

/// A stream's subscriptions to one resource type, as both variants keep them.
#[derive(Debug, Default)]
pub(crate) struct Subscribed {
    /// Whether the client has asked for this type at all.
    pub requested: bool,
    pub names: BTreeSet<String>,
    pub wildcard: bool,
}

pub(crate) struct Session {
    pub hub: Arc<Hub>,
    pub id: u64,
    pub protocol: &'static str,
    pub wake: Arc<Notify>,
    pub locality: ClientLocality,
    node_seen: bool,
    slots: HashMap<ServiceKey, Arc<Slot>>,
    /// The catalog this stream last covered, while it has a wildcard subscription.
    catalog: Option<Arc<BTreeMap<String, ServiceKey>>>,
    status: Arc<Mutex<ClientStatus>>,
    nonce: u64,
    /// This stream's response and NACK counters per type, looked up once (a labelled
    /// lookup per response was a measurable share of a push).
    responses: [Counter; 4],
    nacks: [Counter; 4],
}

impl Session {
    pub fn new(hub: Arc<Hub>, protocol: &'static str, peer: Option<SocketAddr>) -> Self {
        let id = hub.next_stream_id();
        let status = hub.clients.add(ClientStatus {
            stream: id,
            protocol,
            peer: peer.map(|p| p.to_string()),
            connected_at_ms: now_ms(),
            ..Default::default()
        });
        hub.metrics
            .streams
            .get_or_create(&StreamLabels { protocol })
            .inc();
        let labels = |kind: Kind| TypeLabels {
            protocol,
            r#type: kind.label(),
        };
        let responses = Kind::ALL.map(|k| hub.metrics.responses.get_or_create(&labels(k)).clone());
        let nacks = Kind::ALL.map(|k| hub.metrics.nacks.get_or_create(&labels(k)).clone());
        Self {
            hub,
            id,
            protocol,
            wake: Arc::new(Notify::new()),
            locality: ClientLocality::default(),
            node_seen: false,
            slots: HashMap::new(),
            catalog: None,
            status,
            nonce: 0,
            responses,
            nacks,
        }
    }

    /// Takes the client's identity and locality from the first request that carries a node
    /// (clients send it once per stream).
    pub fn on_node(&mut self, node: Option<&Node>) {
        let Some(node) = node else { return };
        if self.node_seen {
            return;
        }
        self.node_seen = true;
        let loc = node.locality.clone().unwrap_or_default();
        self.locality = ClientLocality {
            region: loc.region.clone(),
            zone: loc.zone.clone(),
        };
        let mut s = self.status.lock();
        s.node_id = node.id.clone();
        s.cluster = node.cluster.clone();
        s.region = loc.region;
        s.zone = loc.zone;
        s.sub_zone = loc.sub_zone;
        s.user_agent = format!(
            "{} {:?}",
            node.user_agent_name, node.user_agent_version_type
        )
        .trim()
        .to_string();
        tracing::info!(stream = self.id, protocol = self.protocol, node = %node.id, zone = %s.zone, "xds client connected");
    }

    pub fn next_nonce(&mut self) -> String {
        self.nonce += 1;
        self.nonce.to_string()
    }

    /// Watches exactly the services that `subs` cover (each type's names, and the catalog
    /// for a wildcard CDS).
    pub fn cover(&mut self, subs: [&Subscribed; 4]) {
        let wildcard = subs[Kind::Cluster.index()].wildcard;
        match (wildcard, self.catalog.is_some()) {
            (true, false) => self.hub.catalog.watch(self.id, self.wake.clone()),
            (false, true) => self.hub.catalog.unwatch(self.id),
            _ => {}
        }
        self.catalog = wildcard.then(|| self.hub.catalog.names());
        let mut wanted: HashSet<ServiceKey> = subs
            .iter()
            .flat_map(|s| &s.names)
            .filter_map(|n| resources::parse_name(n))
            .collect();
        if let Some(c) = &self.catalog {
            wanted.extend(c.values().cloned());
        }
        let id = self.id;
        self.slots.retain(|k, slot| {
            let keep = wanted.contains(k);
            if !keep {
                slot.unwatch(id);
            }
            keep
        });
        for k in wanted {
            if !self.slots.contains_key(&k) {
                let slot = self.hub.slot(&k);
                slot.watch(id, self.wake.clone());
                self.slots.insert(k, slot);
            }
        }
    }

    /// Whether a wildcard stream's catalog moved since it last covered it.
    pub fn catalog_moved(&self) -> bool {
        self.catalog
            .as_ref()
            .is_some_and(|c| !Arc::ptr_eq(c, &self.hub.catalog.names()))
    }

    /// The names a subscription covers: its own, and for a wildcard CDS every service with
    /// instances. (A wildcard LDS covers none: Sextant's listeners are gRPC client listeners,
    /// of no use to an Envoy that asks for every listener.)
    pub fn covered<'a>(&'a self, kind: Kind, sub: &'a Subscribed) -> Vec<&'a str> {
        let mut out: Vec<&str> = sub.names.iter().map(String::as_str).collect();
        if sub.wildcard && kind == Kind::Cluster {
            if let Some(c) = &self.catalog {
                out.extend(c.keys().map(String::as_str));
                out.sort_unstable();
                out.dedup();
            }
        }
        out
    }

    fn slot(&self, name: &str) -> Option<&Arc<Slot>> {
        let key = resources::parse_name(name)?;
        let slot = self.slots.get(&key)?;
        // `parse_name` accepts only the canonical spelling of a key, so this holds; checked
        // because a resource must carry exactly the name it was asked for.
        (slot.name == name).then_some(slot)
    }

    /// The current version of every covered resource that exists.
    pub fn versions(&self, kind: Kind, sub: &Subscribed) -> BTreeMap<String, Revision> {
        self.covered(kind, sub)
            .into_iter()
            .filter_map(|n| Some((n.to_string(), self.slot(n)?.version(kind)?)))
            .collect()
    }

    /// Whether [`Session::versions`] would differ from `sent`, without building it: what
    /// every wake of every stream asks.
    pub fn changed_since(
        &self,
        kind: Kind,
        sub: &Subscribed,
        sent: &BTreeMap<String, Revision>,
    ) -> bool {
        let mut existing = 0;
        for n in self.covered(kind, sub) {
            if let Some(v) = self.slot(n).and_then(|s| s.version(kind)) {
                existing += 1;
                if sent.get(n) != Some(&v) {
                    return true;
                }
            }
        }
        existing != sent.len()
    }

    /// The resource as this client should get it now, encoded once per version and shared.
    pub fn resource(&self, kind: Kind, name: &str) -> Option<(Revision, Any)> {
        self.slot(name)?.resource(kind, &self.locality)
    }

    /// Counts an EDS update reaching this stream, from when the registry changed.
    pub fn observe_push(&self, name: &str) {
        if let Some(slot) = self.slot(name) {
            let c = slot.content();
            self.hub
                .metrics
                .push_latency
                .observe(c.changed_at.elapsed().as_secs_f64());
        }
    }

    pub fn sent(&self, kind: Kind, version: &str) {
        self.responses[kind.index()].inc();
        let mut s = self.status.lock();
        let t = s.types.entry(kind.label()).or_default();
        t.sent_version = version.to_string();
        t.sent_at_ms = Some(now_ms());
    }

    pub fn acked(&self, kind: Kind, version: &str) {
        let mut s = self.status.lock();
        s.types.entry(kind.label()).or_default().acked_version = version.to_string();
    }

    /// A NACK: logged and counted; the stream does not send the same resources again (it
    /// sends again when they change).
    pub fn nacked(&self, kind: Kind, version: &str, message: &str) {
        self.nacks[kind.index()].inc();
        let mut s = self.status.lock();
        tracing::warn!(stream = self.id, node = %s.node_id, r#type = kind.label(), version, message, "xds client rejected a response (NACK)");
        let t = s.types.entry(kind.label()).or_default();
        t.nacks += 1;
        t.last_nack = Some(message.to_string());
    }

    pub fn subscribed(&self, kind: Kind, sub: &Subscribed) {
        let mut s = self.status.lock();
        s.types.entry(kind.label()).or_default().subscribed = subscribed(sub);
    }
}

fn subscribed(sub: &Subscribed) -> Vec<String> {
    let mut v: Vec<String> = sub.names.iter().cloned().collect();
    if sub.wildcard {
        v.insert(0, "*".into());
    }
    v
}

impl Drop for Session {
    fn drop(&mut self) {
        for slot in self.slots.values() {
            slot.unwatch(self.id);
        }
        if self.catalog.is_some() {
            self.hub.catalog.unwatch(self.id);
        }
        self.hub.clients.remove(self.id);
        self.hub
            .metrics
            .streams
            .get_or_create(&StreamLabels {
                protocol: self.protocol,
            })
            .dec();
        tracing::debug!(stream = self.id, "xds stream ended");
    }
}

/// One ADS variant's protocol rules over a [`Session`].
pub(crate) trait Engine: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    fn session(&mut self) -> &mut Session;
    fn on_request(&mut self, request: Self::Request);
    /// Called when a watched slot or the catalog changed.
    fn on_change(&mut self);
    /// The next response that is due, if any.
    fn next_response(&mut self) -> Option<Self::Response>;
}

/// The response stream: answers what is due, else waits for a request, a change or shutdown.
pub(crate) fn drive<E: Engine>(
    engine: E,
    inbound: Streaming<E::Request>,
) -> impl Stream<Item = Result<E::Response, Status>> + Send + 'static
where
    E::Request: prost::Message + Default,
{
    futures::stream::unfold(Some((engine, inbound)), |state| async move {
        let (mut e, mut inbound) = state?;
        loop {
            if let Some(r) = e.next_response() {
                return Some((Ok(r), Some((e, inbound))));
            }
            let wake = e.session().wake.clone();
            let registry = e.session().hub.registry.clone();
            tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(req)) => e.on_request(req),
                    Ok(None) => return None,
                    Err(status) => {
                        tracing::debug!(stream = e.session().id, %status, "xds stream closed by the client");
                        return None;
                    }
                },
                _ = wake.notified() => e.on_change(),
                _ = registry.closed() => {
                    return Some((Err(Status::unavailable("server shutting down")), None));
                }
            }
        }
    })
}
