//! One error type for both native APIs. Its HTTP status and gRPC code come from the core's
//! [`ErrorKind`] table, the same one the Nacos adapter and the metrics use.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sextant_core::{model::InvalidField, CoreError, ErrorKind};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Sent as `Retry-After` (HTTP) or `retry-after` metadata (gRPC): how long a client
    /// refused by a limit, or by a node that cannot write now, should wait.
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl From<InvalidField> for ApiError {
    fn from(e: InvalidField) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let kind = e.kind();
        let retry_after = e.retry_after();
        let status =
            StatusCode::from_u16(kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = match e {
            CoreError::Invalid(f) => f.to_string(),
            CoreError::NotFound(what) => format!("{what} not found"),
            CoreError::Store(s) => format!("write not durable, retry: {s}"),
            CoreError::ShuttingDown => "server is shutting down".to_string(),
            e @ CoreError::NotLeader(_) => e.to_string(),
            CoreError::Conflict(m) => m,
            CoreError::Internal(m) => m,
            e @ (CoreError::RateLimited { .. } | CoreError::Overloaded(_)) => e.to_string(),
            // Already the leader's words for it (a write forwarded from this follower).
            CoreError::Remote { message, .. } => message,
        };
        // The wire code of the native APIs: clients match on it, so shutting down stays
        // `unavailable` as before.
        let code = match kind {
            ErrorKind::Invalid => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Unavailable | ErrorKind::ShuttingDown => "unavailable",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Internal => "internal",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Conflict => "conflict",
            ErrorKind::RateLimited => "rate_limited",
        };
        ApiError {
            retry_after,
            ..ApiError::new(status, code, message)
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let kind = ErrorKind::from_http_status(e.status.as_u16());
        let mut status = tonic::Status::new(tonic::Code::from(kind.grpc_code()), e.message);
        if let Some(v) = e
            .retry_after
            .and_then(|w| sextant_core::retry_after_header(w).parse().ok())
        {
            status.metadata_mut().insert("retry-after", v);
        }
        status
    }
}

/// Maps any core or validation error to a gRPC status (the orphan rule forbids `From`).
pub fn grpc_status(e: impl Into<ApiError>) -> tonic::Status {
    e.into().into()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        // A 503 always says when to come back; a refusal by a limit says exactly when.
        let wait = self.retry_after.or_else(|| {
            (self.status == StatusCode::SERVICE_UNAVAILABLE)
                .then_some(sextant_core::RETRY_AFTER_BUSY)
        });
        if let Some(v) = wait.and_then(|w| {
            axum::http::HeaderValue::from_str(&sextant_core::retry_after_header(w)).ok()
        }) {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, v);
        }
        resp
    }
}
