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
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
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
        };
        ApiError::new(status, code, message)
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let kind = ErrorKind::from_http_status(e.status.as_u16());
        tonic::Status::new(tonic::Code::from(kind.grpc_code()), e.message)
    }
}

/// Maps any core or validation error to a gRPC status (the orphan rule forbids `From`).
pub fn grpc_status(e: impl Into<ApiError>) -> tonic::Status {
    e.into().into()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}
