//! State-of-the-world ADS (`StreamAggregatedResources`, what gRPC clients speak): per type the
//! subscribed names, the versions last sent and the nonce; ACK and NACK told apart by
//! `error_detail`, stale nonces ignored, no push on an ACK, a name that does not exist yet
//! remembered and answered when its service appears, and every LDS/CDS answer carrying every
//! subscribed resource that exists (leaving one out would delete it).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use sextant_core::model::Revision;

use crate::resources::Kind;
use crate::session::{Engine, Session, Subscribed};

#[derive(Default)]
struct TypeState {
    sub: Subscribed,
    /// Name → version of every resource in the last response.
    sent: BTreeMap<String, Revision>,
    /// A request asked for an answer (the first, a reconnect, a new name).
    pending: bool,
    /// `version_info` of the last response: a counter per stream and type.
    version: u64,
    nonce: String,
}

pub(crate) struct Sotw {
    session: Session,
    types: [TypeState; 4],
}

impl Sotw {
    pub fn new(session: Session) -> Self {
        Self {
            session,
            types: Default::default(),
        }
    }
}

impl Engine for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    fn on_request(&mut self, req: DiscoveryRequest) {
        self.session.on_node(req.node.as_ref());
        let Some(kind) = Kind::from_type_url(&req.type_url) else {
            tracing::debug!(stream = self.session.id, type_url = %req.type_url, "xds request for a type Sextant does not serve; ignored");
            return;
        };
        let t = &mut self.types[kind.index()];
        if !req.response_nonce.is_empty() && req.response_nonce != t.nonce {
            // An answer to a response that a newer one has replaced: its names are stale too.
            self.session.hub.metrics.stale.inc();
            return;
        }
        let mut names: std::collections::BTreeSet<String> =
            req.resource_names.into_iter().collect();
        let star = names.remove("*");
        let wildcard = kind.allows_wildcard()
            && (star || (names.is_empty() && (!t.sub.requested || t.sub.wildcard)));
        let added = names.iter().any(|n| !t.sub.names.contains(n)) || (wildcard && !t.sub.wildcard);
        if req.response_nonce.is_empty() || added {
            t.pending = true;
        }
        // An ACK nearly always repeats the names: then nothing about the subscription moves.
        let same = t.sub.requested && t.sub.names == names && t.sub.wildcard == wildcard;
        t.sub = Subscribed {
            requested: true,
            names,
            wildcard,
        };
        if let Some(err) = &req.error_detail {
            self.session.nacked(kind, &req.version_info, &err.message);
        } else if !req.response_nonce.is_empty() {
            self.session.acked(kind, &req.version_info);
        }
        if !same {
            self.session.subscribed(kind, &t.sub);
            self.session.cover(self.types.each_ref().map(|t| &t.sub));
        }
    }

    fn on_change(&mut self) {
        if self.session.catalog_moved() {
            self.session.cover(self.types.each_ref().map(|t| &t.sub));
        }
    }

    fn next_response(&mut self) -> Option<DiscoveryResponse> {
        for kind in Kind::ALL {
            let t = &self.types[kind.index()];
            if !t.sub.requested {
                continue;
            }
            if !t.pending && !self.session.changed_since(kind, &t.sub, &t.sent) {
                continue;
            }
            let current = self.session.versions(kind, &t.sub);
            if current.is_empty() && t.version == 0 && !t.sub.wildcard {
                // Nothing asked for exists yet: stay silent (the client waits) and answer when
                // a service appears, rather than tell it "does not exist".
                continue;
            }
            let mut resources = Vec::with_capacity(current.len());
            let mut sent = BTreeMap::new();
            for name in current.keys() {
                if let Some((v, any)) = self.session.resource(kind, name) {
                    if kind == Kind::Endpoint && t.sent.get(name).is_some_and(|old| *old != v) {
                        self.session.observe_push(name);
                    }
                    sent.insert(name.clone(), v);
                    resources.push(any);
                }
            }
            let nonce = self.session.next_nonce();
            let t = &mut self.types[kind.index()];
            t.version += 1;
            t.nonce = nonce.clone();
            t.sent = sent;
            t.pending = false;
            let version_info = t.version.to_string();
            self.session.sent(kind, &version_info);
            return Some(DiscoveryResponse {
                version_info,
                resources,
                type_url: kind.type_url().to_string(),
                nonce,
                ..Default::default()
            });
        }
        None
    }
}
