//! Forwarding in a cluster: a follower hands the writes and lease renewals it receives to the
//! leader, so a client may talk to any node.
//!
//! The core knows no transport: the server implements [`Forwarder`] (an internal gRPC call to
//! the leader) and installs it with [`crate::Registry::forward_with`]. This module owns what
//! crosses the wire — the request ([`ForwardRequest`]: the operations and who made them), the
//! per-operation answers with each error's kind and message ([`WireResult`]), the renewal
//! keys — and their encoding (postcard, like the store's values). The registry decides *when*
//! to forward (`Registry::apply` on a follower) and batches renewals (`Registry::heartbeat`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sextant_model::{Revision, ServiceKey};

use crate::acl::Actor;
use crate::registry::Op;
use crate::{CoreError, ErrorKind};

/// Sends a follower's writes and renewals to the cluster's leader.
#[async_trait::async_trait]
pub trait Forwarder: Send + Sync {
    /// Applies `request` on the leader; each operation's result as the leader gave it, or the
    /// error that kept the request from being applied at all. No leader known, or the leader
    /// unreachable, must be [`CoreError::NotLeader`] (a 503 naming the leader).
    async fn forward(
        &self,
        request: ForwardRequest,
    ) -> Result<Vec<Result<Revision, CoreError>>, CoreError>;

    /// Renews the leases of `keys` on the leader (in its memory: no store write).
    async fn renew(&self, keys: Vec<(ServiceKey, Arc<str>)>) -> Result<(), CoreError>;
}

/// Writes a follower forwards: the operations in order and who made them (for the audit log).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardRequest {
    pub ops: Vec<Op>,
    pub actor: Option<Actor>,
}

/// An error as it crosses the wire: its kind's label and its message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireError {
    pub kind: String,
    pub message: String,
}

impl WireError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind: kind.label().to_string(),
            message: message.into(),
        }
    }

    /// Back into a core error with the same kind (an unknown label is an internal error).
    pub fn into_core(self) -> CoreError {
        CoreError::Remote {
            kind: ErrorKind::from_label(&self.kind).unwrap_or(ErrorKind::Internal),
            message: self.message,
        }
    }
}

/// One operation's answer on the wire.
pub type WireResult = Result<Revision, WireError>;

/// The leader's answer to a [`ForwardRequest`].
pub type ForwardReply = Result<Vec<WireResult>, WireError>;

/// Why bytes from a peer could not be read.
#[derive(Debug, thiserror::Error)]
#[error("undecodable message from a cluster peer: {0}")]
pub struct DecodeError(String);

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Every type here is plain data that postcard encodes; an empty message would be refused
    // on the other side, never misread.
    postcard::to_stdvec(value).unwrap_or_default()
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, DecodeError> {
    postcard::from_bytes(bytes).map_err(|e| DecodeError(e.to_string()))
}

/// A new random cluster secret (64 hex digits), offered to the store by a starting node.
pub fn new_cluster_secret() -> Result<String, CoreError> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b)
        .map_err(|e| CoreError::Internal(format!("no randomness for the cluster secret: {e}")))?;
    Ok(sextant_model::acl::format_secret(&b))
}

/// Renewal keys on the wire.
pub type RenewKeys = Vec<(ServiceKey, Arc<str>)>;

#[cfg(test)]
mod tests {
    use super::*;
    use sextant_model::{Registration, StatusPatch};

    #[test]
    fn requests_and_replies_survive_the_wire() {
        let service = ServiceKey::new("ns", "svc").unwrap();
        let spec = crate::tests::spec("a");
        let req = ForwardRequest {
            ops: vec![
                Op::Register(Registration {
                    service: service.clone(),
                    spec,
                    status: None,
                    ttl_seconds: 5,
                }),
                Op::Status {
                    service: service.clone(),
                    id: "a".into(),
                    patch: StatusPatch {
                        enabled: Some(false),
                        ..StatusPatch::default()
                    },
                },
            ],
            actor: Some(Actor {
                token_id: Some("t1".into()),
                source: "127.0.0.1:5".into(),
                protocol: "http".into(),
            }),
        };
        let back: ForwardRequest = decode(&encode(&req)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{req:?}"));

        let reply: ForwardReply = Ok(vec![
            Ok(7),
            Err(WireError::new(ErrorKind::NotFound, "instance x not found")),
        ]);
        let back: ForwardReply = decode(&encode(&reply)).unwrap();
        let results = back.unwrap();
        assert_eq!(results[0].as_ref().ok(), Some(&7));
        let e = results[1].clone().unwrap_err().into_core();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.to_string(), "instance x not found");
        assert!(decode::<ForwardReply>(b"\xff\xff\xff").is_err());
    }
}
