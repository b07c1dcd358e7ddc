//! What `/v1/xds/clients` shows (like `istioctl proxy-status`): each open ADS stream, its node,
//! and per resource type what it subscribed to, the last version sent and acknowledged, and
//! its NACKs. Streams update their own entry; the table only lists them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

/// One stream as an operator sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientStatus {
    pub stream: u64,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    pub node_id: String,
    pub cluster: String,
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
    pub user_agent: String,
    pub peer: Option<String>,
    pub connected_at_ms: u64,
    /// By type: `lds`, `rds`, `cds`, `eds`.
    pub types: BTreeMap<&'static str, TypeStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    /// Subscribed names; `*` for a wildcard subscription.
    pub subscribed: Vec<String>,
    /// `version_info` (state of the world) or `system_version_info` (delta) last sent.
    pub sent_version: String,
    pub sent_at_ms: Option<u64>,
    /// The last version the client acknowledged.
    pub acked_version: String,
    pub nacks: u64,
    /// The client's message of its last NACK.
    pub last_nack: Option<String>,
}

/// The open streams.
#[derive(Default)]
pub(crate) struct ClientTable {
    streams: Mutex<HashMap<u64, Arc<Mutex<ClientStatus>>>>,
}

impl ClientTable {
    pub fn add(&self, status: ClientStatus) -> Arc<Mutex<ClientStatus>> {
        let id = status.stream;
        let entry = Arc::new(Mutex::new(status));
        self.streams.lock().insert(id, entry.clone());
        entry
    }

    pub fn remove(&self, stream: u64) {
        self.streams.lock().remove(&stream);
    }

    /// Every open stream, oldest first.
    pub fn list(&self) -> Vec<ClientStatus> {
        let entries: Vec<_> = self.streams.lock().values().cloned().collect();
        let mut out: Vec<ClientStatus> = entries.iter().map(|e| e.lock().clone()).collect();
        out.sort_by_key(|c| c.stream);
        out
    }
}
