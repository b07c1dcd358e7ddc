//! Sextant's registry core.
//!
//! Owns the in-memory structured snapshot of the registry (namespace → service → instances),
//! the single writer that assigns revisions and group-commits changes through the [`Store`]
//! port, leases of ephemeral instances, the bounded per-service change log, and the fan-out of
//! changes to subscriptions. It knows no wire protocol and does no I/O of its own beyond the
//! store it is handed: adapters call [`Registry`] and render what it returns.
#![forbid(unsafe_code)]

pub mod acl;
pub mod admission;
mod codec;
mod delivery;
pub mod forward;
mod lease;
pub mod metrics;
mod registry;
pub mod snapshot;
pub mod store;

use std::time::Duration;

pub use acl::{with_actor, Acl, Actor, AuthError, NewToken, Principal, TlsPeer};
pub use admission::{ConnectionPermit, Limits, RETRY_AFTER_BUSY};
pub use delivery::{Delivery, ServiceSnapshot, SharedEvent, Subscription, SubscriptionClosed};
pub use forward::Forwarder;
pub use metrics::CoreMetrics;
pub use registry::{
    HeartbeatResult, NamespaceSummary, Op, Registry, Role, ServiceSummary, ServiceView,
};
pub use sextant_model as model;
pub use snapshot::{Snapshot, SnapshotError};
pub use store::{Batch, Change, Feed, FeedError, MemStore, Mutation, Store, StoreError};

/// Tunables of the core. Passed in explicitly; no global state.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Events kept per service for subscribers that resume. A subscriber further behind than
    /// this gets a snapshot of that service instead.
    pub event_log_per_service: usize,
    /// Most operations committed in one store batch.
    pub max_batch_ops: usize,
    /// Bound of the queue of writes waiting for the writer; beyond it callers wait.
    pub write_queue: usize,
    /// How often leases are checked for expiry.
    pub lease_check_interval: Duration,
    /// Run the writer on a thread and runtime of its own (the default). `false` runs it as a
    /// task of the caller's runtime, for tests that pause that runtime's clock: time there
    /// only stands still while every task that can make progress is on it.
    pub writer_thread: bool,
    /// How long a service that a write left vacant (no instances, default settings) and that
    /// nobody watches stays in memory, so that a watcher reconnecting meanwhile resumes with
    /// exact events instead of a snapshot. Vacant services nobody ever wrote go at once.
    pub vacant_retention: Duration,
    /// Refuse requests without a valid token (`auth = "on"`).
    pub auth: bool,
    /// Audit entries kept (in the store and in memory); 0 records none.
    pub audit_retention: usize,
    /// Also handed every audit entry once it is durable (the `audit_log` file).
    pub audit_sink: Option<AuditSink>,
    /// Request rates, requests in flight, connections and write shedding (see `admission`).
    pub limits: Limits,
}

/// A callback for audit entries, called on the writer's thread: keep it short.
#[derive(Clone)]
pub struct AuditSink(pub std::sync::Arc<dyn Fn(&model::acl::AuditEntry) + Send + Sync>);

impl std::ops::Deref for AuditSink {
    type Target = dyn Fn(&model::acl::AuditEntry) + Send + Sync;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditSink")
    }
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            event_log_per_service: 1024,
            max_batch_ops: 4096,
            write_queue: 8192,
            lease_check_interval: Duration::from_millis(250),
            writer_thread: true,
            vacant_retention: Duration::from_secs(60),
            auth: false,
            audit_retention: 0,
            audit_sink: None,
            limits: Limits::default(),
        }
    }
}

/// Everything that can go wrong in a registry operation. Adapters do not map the variants
/// themselves: [`CoreError::kind`] gives the one [`ErrorKind`] each stands for.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Invalid(#[from] model::InvalidField),
    #[error("{0} not found")]
    NotFound(String),
    #[error("write not durable: {0}")]
    Store(#[from] StoreError),
    #[error("registry is shutting down")]
    ShuttingDown,
    /// A write sent to a follower of a cluster; the message names the leader when known.
    #[error("{}", not_leader_message(.0))]
    NotLeader(Option<String>),
    /// The change contradicts the current state (a second ACL bootstrap).
    #[error("{0}")]
    Conflict(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// Over a request-rate limit; `what` names the limit and its key (address or token id).
    #[error("too many requests: {what}; retry in {:.1} s", .retry_after.as_secs_f64())]
    RateLimited { what: String, retry_after: Duration },
    /// Refused to protect the node (too many requests in flight, or the writer's queue is
    /// deep); the message says which.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// A write forwarded to the cluster's leader that the leader refused: its kind and message
    /// as the leader said them, so a follower answers exactly what the leader would have.
    #[error("{message}")]
    Remote { kind: ErrorKind, message: String },
}

fn not_leader_message(leader: &Option<String>) -> String {
    match leader {
        Some(l) => {
            format!("this node is a follower (read replica); send writes to the leader at {l}")
        }
        None => "this node is a follower and no leader is elected yet; retry shortly".into(),
    }
}

impl CoreError {
    /// The class of this error, which fixes its HTTP status, gRPC code and Nacos code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CoreError::Invalid(_) => ErrorKind::Invalid,
            CoreError::NotFound(_) => ErrorKind::NotFound,
            // Whatever the store's reason, the write was not made durable: retry later.
            CoreError::Store(_) => ErrorKind::Unavailable,
            CoreError::ShuttingDown => ErrorKind::ShuttingDown,
            CoreError::NotLeader(_) => ErrorKind::Unavailable,
            CoreError::Conflict(_) => ErrorKind::Conflict,
            CoreError::Internal(_) => ErrorKind::Internal,
            CoreError::RateLimited { .. } => ErrorKind::RateLimited,
            CoreError::Overloaded(_) => ErrorKind::Unavailable,
            CoreError::Remote { kind, .. } => *kind,
        }
    }

    /// How long a client should wait before trying again (the `Retry-After` of a 429 or 503),
    /// for the errors that are about the node's state rather than the request.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CoreError::RateLimited { retry_after, .. } => {
                // Whole seconds on the wire; never tell a client to retry at once.
                Some((*retry_after).max(Duration::from_millis(1)))
            }
            CoreError::Overloaded(_) | CoreError::Store(_) | CoreError::NotLeader(_) => {
                Some(RETRY_AFTER_BUSY)
            }
            // The leader's refusal of a forwarded write: it said only its kind.
            CoreError::Remote {
                kind: ErrorKind::Unavailable | ErrorKind::RateLimited,
                ..
            } => Some(RETRY_AFTER_BUSY),
            _ => None,
        }
    }
}

/// A `Retry-After` header value: whole seconds, rounded up, at least 1.
pub fn retry_after_header(wait: Duration) -> String {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1).to_string()
}

/// The class of an error as every adapter reports it: the one table from an error to its HTTP
/// status, gRPC code, Nacos error code and metrics label. Numbers, not the `http` / `tonic`
/// types, so that the core stays free of protocol crates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Bad input; the message names the field.
    Invalid,
    NotFound,
    /// A request body or message over the configured limit.
    TooLarge,
    /// A request this server does not implement (e.g. the Nacos config center).
    Unsupported,
    /// Not done, retry: the store refused the write.
    Unavailable,
    /// Not done: the server is stopping.
    ShuttingDown,
    /// A bug or an impossible state on the server (e.g. an answer that failed to encode).
    Internal,
    /// No or a bad credential.
    Unauthenticated,
    /// A credential that lacks the right asked for.
    PermissionDenied,
    /// The request contradicts the current state (e.g. a second ACL bootstrap).
    Conflict,
    /// Over a request-rate limit (429 with `Retry-After`).
    RateLimited,
}

impl AuthError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AuthError::Unauthenticated(_) => ErrorKind::Unauthenticated,
            AuthError::Denied(_) => ErrorKind::PermissionDenied,
        }
    }
}

/// gRPC's canonical status codes used here (numbers from `grpc/status.proto`).
mod grpc_code {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const UNAUTHENTICATED: i32 = 16;
    pub const NOT_FOUND: i32 = 5;
    pub const ALREADY_EXISTS: i32 = 6;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const UNIMPLEMENTED: i32 = 12;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

impl ErrorKind {
    /// Every kind, for tests and tables.
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::RateLimited,
        ErrorKind::Unauthenticated,
        ErrorKind::PermissionDenied,
        ErrorKind::Conflict,
        ErrorKind::Invalid,
        ErrorKind::NotFound,
        ErrorKind::TooLarge,
        ErrorKind::Unsupported,
        ErrorKind::Unavailable,
        ErrorKind::ShuttingDown,
        ErrorKind::Internal,
    ];

    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::Invalid => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::TooLarge => 413,
            ErrorKind::Unsupported => 501,
            ErrorKind::Unavailable | ErrorKind::ShuttingDown => 503,
            ErrorKind::Internal => 500,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::PermissionDenied => 403,
            ErrorKind::Conflict => 409,
            ErrorKind::RateLimited => 429,
        }
    }

    /// The gRPC status code, as its number (`tonic::Code::from(n)`).
    pub fn grpc_code(self) -> i32 {
        match self {
            ErrorKind::Invalid => grpc_code::INVALID_ARGUMENT,
            ErrorKind::NotFound => grpc_code::NOT_FOUND,
            ErrorKind::TooLarge => grpc_code::RESOURCE_EXHAUSTED,
            ErrorKind::Unsupported => grpc_code::UNIMPLEMENTED,
            ErrorKind::Unavailable | ErrorKind::ShuttingDown => grpc_code::UNAVAILABLE,
            ErrorKind::Internal => grpc_code::INTERNAL,
            ErrorKind::Unauthenticated => grpc_code::UNAUTHENTICATED,
            ErrorKind::PermissionDenied => grpc_code::PERMISSION_DENIED,
            ErrorKind::Conflict => grpc_code::ALREADY_EXISTS,
            ErrorKind::RateLimited => grpc_code::RESOURCE_EXHAUSTED,
        }
    }

    /// The `errorCode` of a Nacos 2.x error response. Nacos' codes are HTTP-like (400 bad
    /// parameter, 404, 500 server error, 501, 503 over threshold / unavailable).
    pub fn nacos_code(self) -> u16 {
        self.http_status()
    }

    /// The `outcome` label of request metrics.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not_found",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::Internal => "internal",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Conflict => "conflict",
            ErrorKind::RateLimited => "rate_limited",
        }
    }

    /// The kind whose [`ErrorKind::label`] is `label` (how a forwarded error travels).
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.label() == label)
    }

    /// The kind an HTTP status stands for (for errors made outside the core, e.g. a rejected
    /// body); an unknown 4xx is `Invalid`, anything else `Internal`.
    pub fn from_http_status(status: u16) -> Self {
        match status {
            401 => ErrorKind::Unauthenticated,
            403 => ErrorKind::PermissionDenied,
            409 => ErrorKind::Conflict,
            429 => ErrorKind::RateLimited,
            404 => ErrorKind::NotFound,
            413 => ErrorKind::TooLarge,
            501 => ErrorKind::Unsupported,
            503 => ErrorKind::Unavailable,
            400..=499 => ErrorKind::Invalid,
            _ => ErrorKind::Internal,
        }
    }

    /// The kind a gRPC status code stands for, so a gRPC call's metrics carry the HTTP status
    /// of its class (a store failure counts as 503, not as bad input).
    pub fn from_grpc_code(code: i32) -> Self {
        match code {
            grpc_code::NOT_FOUND => ErrorKind::NotFound,
            grpc_code::RESOURCE_EXHAUSTED => ErrorKind::TooLarge,
            grpc_code::UNIMPLEMENTED => ErrorKind::Unsupported,
            grpc_code::UNAVAILABLE => ErrorKind::Unavailable,
            grpc_code::UNAUTHENTICATED => ErrorKind::Unauthenticated,
            grpc_code::PERMISSION_DENIED => ErrorKind::PermissionDenied,
            grpc_code::ALREADY_EXISTS => ErrorKind::Conflict,
            // The caller's request was wrong.
            grpc_code::INVALID_ARGUMENT
            | grpc_code::FAILED_PRECONDITION
            | grpc_code::OUT_OF_RANGE => ErrorKind::Invalid,
            _ => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod error_kind_tests {
    use super::*;

    /// The HTTP status and gRPC code of a kind lead back to a kind with the same answers, so
    /// an error converted between protocols (e.g. for metrics) keeps its class.
    #[test]
    fn kinds_survive_the_trip_through_status_and_code() {
        for k in ErrorKind::ALL {
            let via_http = ErrorKind::from_http_status(k.http_status());
            let via_grpc = ErrorKind::from_grpc_code(k.grpc_code());
            assert_eq!(via_http.http_status(), k.http_status(), "{k:?}");
            if k == ErrorKind::RateLimited {
                // gRPC has one code for "too large" and "over a quota": it reads back as
                // too large, the code still the same.
                assert_eq!(via_grpc.grpc_code(), k.grpc_code());
                continue;
            }
            assert_eq!(via_grpc.http_status(), k.http_status(), "{k:?}");
            assert_eq!(via_grpc.grpc_code(), k.grpc_code(), "{k:?}");
        }
        assert_eq!(CoreError::ShuttingDown.kind().http_status(), 503);
        assert_eq!(CoreError::NotFound("x".into()).kind().grpc_code(), 5);
    }
}
