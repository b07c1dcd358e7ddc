//! JSON shapes of the native HTTP API: request bodies (strict: unknown fields refused) and
//! response views (borrowing from the registry's state, so a large list is not copied twice).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sextant_core::model::{
    DeleteReason, Event, EventKind, Health, HealthCheck, Instance, InstanceSpec, InstanceStatus,
    InvalidField, Location, Metadata, Registration, Revision, ServiceKey, StatusPatch, Text,
};
use sextant_core::{Delivery, ServiceView};

/// Body of `PUT .../instances/{id}` and `POST .../instances`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// Only for `POST .../instances`; defaults to `host:port`.
    #[serde(default)]
    pub id: Option<Text>,
    pub host: Text,
    /// Wider than u16 so that an out-of-range port gets a message naming the field.
    pub port: u32,
    #[serde(default)]
    pub protocol: Option<Text>,
    #[serde(default)]
    pub version: Text,
    #[serde(default)]
    pub location: Location,
    #[serde(default)]
    pub cell: Text,
    #[serde(default)]
    pub lane: Text,
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default)]
    pub status: Option<StatusBody>,
    #[serde(default)]
    pub ttl_seconds: u32,
}

impl RegisterBody {
    pub fn into_registration(
        self,
        service: ServiceKey,
        id: Option<String>,
    ) -> Result<Registration, InvalidField> {
        let port = u16::try_from(self.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                InvalidField::new("port", format!("must be 1-65535, got {}", self.port))
            })?;
        let id = id
            .map(Text::from)
            .or(self.id)
            .unwrap_or_else(|| compact_str::format_compact!("{}:{}", self.host, port));
        let status = self
            .status
            .map(|s| InstanceStatus::default().patched(&s.into(), 0));
        Ok(Registration {
            service,
            spec: InstanceSpec {
                id,
                host: self.host,
                port,
                protocol: self.protocol.unwrap_or_else(|| "http".into()),
                version: self.version,
                location: self.location,
                cell: self.cell,
                lane: self.lane,
                metadata: self.metadata,
            },
            status,
            ttl_seconds: self.ttl_seconds,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusBody {
    pub health: Option<Health>,
    pub enabled: Option<bool>,
    pub weight: Option<u32>,
    /// A number sets the operator's override, `null` clears it, absent leaves it.
    #[serde(default, deserialize_with = "present")]
    pub weight_override: Option<Option<u32>>,
}

/// Tells an explicit `null` (`Some(None)`) from an absent field (`None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u32>>, D::Error> {
    Option::<u32>::deserialize(d).map(Some)
}

impl From<StatusBody> for StatusPatch {
    fn from(s: StatusBody) -> Self {
        StatusPatch {
            health: s.health,
            enabled: s.enabled,
            weight: s.weight,
            weight_override: s.weight_override,
            draining: None,
        }
    }
}

#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct InstanceRefBody {
    pub namespace: String,
    pub service: String,
    pub id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRefBody {
    pub namespace: String,
    pub service: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverBody {
    pub services: Vec<ServiceRefBody>,
    #[serde(default)]
    pub healthy_only: bool,
}

/// `PUT /v1/namespaces/{ns}/services/{svc}`: absent fields stay as they are.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettingsBody {
    pub protect_threshold: Option<f32>,
    pub check: Option<HealthCheck>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuspectBody {
    /// Who reports; rate limits are per reporter. Defaults to the peer address.
    #[serde(default)]
    pub reporter: Option<String>,
    pub instances: Vec<InstanceRefBody>,
}

/// A status as the API shows it: the stored fields plus what they mean now.
#[derive(Serialize)]
pub struct StatusView {
    #[serde(flatten)]
    pub status: InstanceStatus,
    pub effective_weight: u32,
    pub serving: bool,
    /// How long the instance has been draining, if it is.
    pub draining_for_ms: Option<u64>,
}

impl From<InstanceStatus> for StatusView {
    fn from(status: InstanceStatus) -> Self {
        let now = sextant_core::model::now_ms();
        StatusView {
            status,
            effective_weight: status.effective_weight(),
            serving: status.is_serving(),
            draining_for_ms: status.draining_since_ms.map(|t| now.saturating_sub(t)),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RevisionBody {
    pub revision: Revision,
}

#[derive(Serialize)]
pub struct InstanceView<'a> {
    pub id: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub protocol: &'a str,
    pub version: &'a str,
    pub location: &'a Location,
    pub cell: &'a str,
    pub lane: &'a str,
    pub metadata: &'a Metadata,
    pub ttl_seconds: u32,
    pub spec_revision: Revision,
    pub status_revision: Revision,
    pub status: StatusView,
}

impl<'a> From<&'a Instance> for InstanceView<'a> {
    fn from(i: &'a Instance) -> Self {
        let s = &*i.spec;
        InstanceView {
            id: s.id.as_str(),
            host: s.host.as_str(),
            port: s.port,
            protocol: s.protocol.as_str(),
            version: s.version.as_str(),
            location: &s.location,
            cell: s.cell.as_str(),
            lane: s.lane.as_str(),
            metadata: &s.metadata,
            ttl_seconds: i.ttl_seconds,
            spec_revision: i.spec_revision,
            status_revision: i.status_revision,
            status: i.status.into(),
        }
    }
}

#[derive(Serialize)]
pub struct ServiceJson<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    pub revision: Revision,
    pub protected: bool,
    pub protect_threshold: f32,
    pub check: &'a HealthCheck,
    pub instances: Vec<InstanceView<'a>>,
}

impl<'a> From<&'a ServiceView> for ServiceJson<'a> {
    fn from(v: &'a ServiceView) -> Self {
        ServiceJson {
            namespace: &v.service.namespace,
            service: &v.service.service,
            revision: v.revision,
            protected: v.protected,
            protect_threshold: v.config.protect_threshold,
            check: &v.config.check,
            instances: v.instances.iter().map(InstanceView::from).collect(),
        }
    }
}

/// Server-sent-event frames of the watch stream.
pub mod sse {
    use super::*;

    /// A frame without its terminating blank line: the delivery adds it, with the `id` line
    /// on the delivery's last frame only.
    fn frame(event: &str, data: &impl Serialize) -> Bytes {
        let json = serde_json::to_string(data).unwrap_or_else(|_| "{}".into());
        Bytes::from(format!("event: {event}\ndata: {json}\n"))
    }

    #[derive(Serialize)]
    struct EventData<'a> {
        revision: Revision,
        namespace: &'a str,
        service: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        instance: Option<InstanceView<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<StatusView>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<DeleteReason>,
    }

    /// `upsert`, `status` or `delete`; `revision` in the data is the event's.
    pub fn event(e: &Event) -> Bytes {
        let mut d = EventData {
            revision: e.revision,
            namespace: &e.service.namespace,
            service: &e.service.service,
            instance: None,
            id: None,
            status: None,
            reason: None,
        };
        match &e.kind {
            EventKind::Upsert(i) => d.instance = Some(i.into()),
            EventKind::Status { id, status } => {
                d.id = Some(id);
                d.status = Some((*status).into());
            }
            EventKind::Delete { id, reason } => {
                d.id = Some(id);
                d.reason = Some(*reason);
            }
        }
        frame(e.kind.name(), &d)
    }

    #[derive(Serialize)]
    struct SnapshotData<'a> {
        /// The point to resume from (also the SSE id); the service's own last change is in
        /// the flattened `revision`.
        resume_revision: Revision,
        resync: bool,
        #[serde(flatten)]
        service: ServiceJson<'a>,
    }

    /// A whole service, complete to the delivery's revision.
    pub fn snapshot(view: &ServiceView, resync: bool, revision: Revision) -> Bytes {
        frame(
            "snapshot",
            &SnapshotData {
                resume_revision: revision,
                resync,
                service: view.into(),
            },
        )
    }

    /// Chunks of one delivery, in the order to send them: events, then snapshots (of other
    /// services). Only the last frame carries an SSE `id` — the delivery's revision — so the
    /// `Last-Event-ID` a client reconnects with is always a delivery boundary, never a point
    /// in the middle of one. A delivery with nothing to send becomes a `sync` frame with that
    /// id (a resume that missed nothing says so).
    pub fn delivery(d: &Delivery) -> Vec<Bytes> {
        let mut frames: Vec<Bytes> = d.events.iter().map(|e| e.encoded(event)).collect();
        frames.extend(
            d.snapshots
                .iter()
                .map(|s| snapshot(&s.view, s.resync, d.revision)),
        );
        if frames.is_empty() {
            let data = serde_json::json!({ "resume_revision": d.revision });
            frames.push(frame("sync", &data));
        }
        let last = frames.len() - 1;
        let mut out = Vec::with_capacity(frames.len() * 2);
        for (i, f) in frames.into_iter().enumerate() {
            out.push(f);
            out.push(if i == last {
                Bytes::from(format!("id: {}\n\n", d.revision))
            } else {
                Bytes::from_static(b"\n")
            });
        }
        out
    }

    pub fn close(reason: &str) -> Bytes {
        let json = serde_json::json!({ "reason": reason });
        Bytes::from(format!("event: close\ndata: {json}\n\n"))
    }
}
