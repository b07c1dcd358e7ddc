//! Incremental ADS (`DeltaAggregatedResources`, what Envoy can speak): per type the subscribed
//! names (subscribe / unsubscribe, `*` for the wildcard) and the version of each resource the
//! client holds (from `initial_resource_versions` on a reconnect, then from what was sent);
//! a response carries only the resources whose version differs and the names that stopped
//! existing.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use sextant_core::model::Revision;

use crate::resources::Kind;
use crate::session::{Engine, Session, Subscribed};

#[derive(Default)]
struct TypeState {
    sub: Subscribed,
    /// Name → the version the client holds (`None`: a version this server did not issue).
    known: BTreeMap<String, Option<Revision>>,
    /// The first request of the type wants an answer even when there is nothing to send.
    pending: bool,
    nonce: String,
    version: u64,
}

pub(crate) struct Delta {
    session: Session,
    types: [TypeState; 4],
}

impl Delta {
    pub fn new(session: Session) -> Self {
        Self {
            session,
            types: Default::default(),
        }
    }
}

impl Engine for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    fn on_request(&mut self, req: DeltaDiscoveryRequest) {
        self.session.on_node(req.node.as_ref());
        let Some(kind) = Kind::from_type_url(&req.type_url) else {
            tracing::debug!(stream = self.session.id, type_url = %req.type_url, "xds request for a type Sextant does not serve; ignored");
            return;
        };
        let t = &mut self.types[kind.index()];
        let first = !t.sub.requested;
        let changes =
            !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty();
        if first {
            t.pending = true;
            for (name, v) in req.initial_resource_versions {
                t.known.insert(name, v.parse().ok());
            }
            // An initial request that names nothing subscribes to everything (legacy wildcard).
            if kind.allows_wildcard() && req.resource_names_subscribe.is_empty() {
                t.sub.wildcard = true;
            }
        }
        t.sub.requested = true;
        for name in req.resource_names_subscribe {
            if name == "*" {
                t.sub.wildcard = kind.allows_wildcard();
            } else {
                if !first {
                    // Asked for again: send it again even if unchanged.
                    t.known.remove(&name);
                }
                t.sub.names.insert(name);
            }
        }
        for name in req.resource_names_unsubscribe {
            if name == "*" {
                t.sub.wildcard = false;
            } else {
                t.sub.names.remove(&name);
                t.known.remove(&name);
            }
        }
        if !req.response_nonce.is_empty() {
            if req.response_nonce != t.nonce {
                self.session.hub.metrics.stale.inc();
            } else if let Some(err) = &req.error_detail {
                let v = t.version.to_string();
                self.session.nacked(kind, &v, &err.message);
            } else {
                let v = t.version.to_string();
                self.session.acked(kind, &v);
            }
        }
        // A plain ACK changes no subscription.
        if first || changes {
            self.session.subscribed(kind, &t.sub);
            self.session.cover(self.types.each_ref().map(|t| &t.sub));
        }
    }

    fn on_change(&mut self) {
        if self.session.catalog_moved() {
            self.session.cover(self.types.each_ref().map(|t| &t.sub));
        }
    }

    fn next_response(&mut self) -> Option<DeltaDiscoveryResponse> {
        for kind in Kind::ALL {
            let t = &self.types[kind.index()];
            if !t.sub.requested {
                continue;
            }
            let current = self.session.versions(kind, &t.sub);
            let changed: Vec<&String> = current
                .iter()
                .filter(|(n, v)| t.known.get(*n) != Some(&Some(**v)))
                .map(|(n, _)| n)
                .collect();
            let covered: BTreeSet<&str> = self.session.covered(kind, &t.sub).into_iter().collect();
            let removed: Vec<String> = t
                .known
                .keys()
                .filter(|n| {
                    !current.contains_key(*n) && (covered.contains(n.as_str()) || t.sub.wildcard)
                })
                .cloned()
                .collect();
            let answer_empty = t.pending && t.sub.wildcard;
            if changed.is_empty() && removed.is_empty() && !answer_empty {
                continue;
            }
            let mut resources = Vec::with_capacity(changed.len());
            let mut now_known = Vec::with_capacity(changed.len());
            for name in changed {
                if let Some((v, any)) = self.session.resource(kind, name) {
                    if kind == Kind::Endpoint && t.known.get(name).is_some_and(Option::is_some) {
                        self.session.observe_push(name);
                    }
                    now_known.push((name.clone(), v));
                    resources.push(Resource {
                        name: name.clone(),
                        version: v.to_string(),
                        resource: Some(any),
                        ..Default::default()
                    });
                }
            }
            let nonce = self.session.next_nonce();
            let t = &mut self.types[kind.index()];
            for (n, v) in now_known {
                t.known.insert(n, Some(v));
            }
            for n in &removed {
                t.known.remove(n);
            }
            t.pending = false;
            t.version += 1;
            t.nonce = nonce.clone();
            let version = t.version.to_string();
            self.session.sent(kind, &version);
            return Some(DeltaDiscoveryResponse {
                system_version_info: version,
                resources,
                type_url: kind.type_url().to_string(),
                removed_resources: removed,
                nonce,
                ..Default::default()
            });
        }
        None
    }
}
