//! Generated types and service stubs of Sextant's native gRPC API, `sextant.v1`, and of the
//! Nacos 2.x envelope the Nacos adapter speaks. The sources of truth are
//! `proto/sextant/v1/registry.proto`, `proto/sextant/cluster/v1/peer.proto` (between the
//! nodes of a cluster) and `proto/nacos/nacos_grpc_service.proto`. Besides the
//! generated code it owns the one builder of a Nacos envelope ([`nacos::Payload::envelope`]),
//! and, with the `model` feature, [`convert`], which maps `sextant.v1` to and from
//! `sextant-model` for the server and the client SDK alike.
#[cfg(feature = "model")]
pub mod convert;

#[allow(clippy::all, missing_docs, non_camel_case_types)]
pub mod v1 {
    tonic::include_proto!("sextant.v1");
}

/// The cluster's internal peer service (`proto/sextant/cluster/v1/peer.proto`): a follower
/// forwards writes and renewals to the leader.
#[allow(clippy::all, missing_docs, non_camel_case_types)]
pub mod cluster_v1 {
    tonic::include_proto!("sextant.cluster.v1");
}

/// Nacos 2.x's `Payload` envelope and its `Request` / `BiRequestStream` services (the proto has
/// no package, so prost names its output `_`).
#[allow(clippy::all, missing_docs, non_camel_case_types)]
pub mod nacos {
    tonic::include_proto!("_");
}

impl nacos::Payload {
    /// The one way to build a Nacos envelope: `metadata.type` names the request or response
    /// type, `body` is its JSON. Servers leave `clientIp` empty; a client sets it with
    /// [`nacos::Payload::with_client_ip`].
    pub fn envelope(kind: &str, body: Vec<u8>) -> Self {
        nacos::Payload {
            metadata: Some(nacos::Metadata {
                r#type: kind.to_string(),
                client_ip: String::new(),
                headers: Default::default(),
            }),
            body: Some(prost_types::Any {
                type_url: String::new(),
                value: body,
            }),
        }
    }

    /// The same envelope with `metadata.clientIp` set, as Nacos clients send it.
    pub fn with_client_ip(mut self, ip: &str) -> Self {
        if let Some(m) = self.metadata.as_mut() {
            m.client_ip = ip.to_string();
        }
        self
    }

    /// `metadata.type`, empty when there is no metadata.
    pub fn kind(&self) -> &str {
        self.metadata.as_ref().map_or("", |m| m.r#type.as_str())
    }

    /// The body's bytes (JSON), empty when there is none.
    pub fn body_bytes(&self) -> &[u8] {
        self.body.as_ref().map_or(&[], |b| b.value.as_slice())
    }
}
