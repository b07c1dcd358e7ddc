//! Sextant's Eureka adapter: Eureka clients (eureka-js-client, Spring Cloud Netflix, Netflix's
//! own Java client) register, renew and discover against Sextant with only an address change.
//!
//! It serves Eureka's REST API under `/eureka/` and `/eureka/v2/` on the native HTTP listener
//! ([`Eureka::router`] is merged into the native router by `sextant-server`): [`http`] holds
//! the handlers, [`mapping`] every rule from Eureka's model to Sextant's and back (pure and
//! property-tested), [`xml`] the XML form of answers. It keeps no state of its own: every
//! request is one or two calls on the core's [`Registry`], and a heartbeat is
//! [`Registry::heartbeat`] (in memory, no disk write).
//!
//! This file owns the error type (its class comes from the core's [`ErrorKind`] table) and the
//! adapter handle.
#![forbid(unsafe_code)]

pub mod http;
pub mod mapping;
mod metrics;
pub mod xml;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use sextant_core::{CoreError, ErrorKind, Registry};

pub use metrics::EurekaMetrics;

/// Everything a Eureka request can fail with; each answers a 4xx (or 503 for a store that
/// cannot make a write durable) with a message, never a 500 for bad input.
#[derive(Debug, thiserror::Error)]
pub enum EurekaError {
    #[error(transparent)]
    Mapping(#[from] mapping::MappingError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    NotFound(String),
    /// Something Eureka has that Sextant does not serve (the message names it).
    #[error("{0}")]
    Unsupported(String),
    /// `GET /apps/delta`: answered as a Eureka server with deltas disabled does (403), so
    /// clients fetch the full registry instead.
    #[error("deltas are not served by Sextant: fetch the full registry (GET /apps/)")]
    DeltaDisabled,
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl EurekaError {
    /// The class of the error (metrics label, HTTP status family).
    pub fn kind(&self) -> ErrorKind {
        match self {
            EurekaError::Mapping(_)
            | EurekaError::BadRequest(_)
            | EurekaError::UnsupportedMediaType(_) => ErrorKind::Invalid,
            EurekaError::NotFound(_) => ErrorKind::NotFound,
            EurekaError::Unsupported(_) | EurekaError::DeltaDisabled => ErrorKind::Unsupported,
            EurekaError::Core(e) => e.kind(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            EurekaError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            EurekaError::DeltaDisabled => StatusCode::FORBIDDEN,
            other => StatusCode::from_u16(other.kind().http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

impl IntoResponse for EurekaError {
    /// The native API's error shape, `{"error": {"code", "message"}}`.
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({"error": {
            "code": self.kind().label(),
            "message": self.to_string(),
        }});
        (status, axum::Json(body)).into_response()
    }
}

/// The adapter: the registry it serves and its metrics.
#[derive(Clone)]
pub struct Eureka {
    pub(crate) registry: Registry,
    pub(crate) metrics: EurekaMetrics,
}

impl Eureka {
    pub fn new(registry: Registry, metrics: EurekaMetrics) -> Self {
        Self { registry, metrics }
    }

    /// The routes under `/eureka/` and `/eureka/v2/`, to merge into an HTTP router of any
    /// state. No fallback of its own: unknown paths under `/eureka` are answered by a
    /// catch-all route (a 404 naming the path).
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        http::routes(self.clone())
    }
}
