//! The Nacos 1.x HTTP Open API for naming (`/nacos/v1/ns/...`), as the Java 1.x client, the old
//! Python client and `curl` scripts use it: parameters in the query string or a form body,
//! `ok` for writes, Nacos' JSON shapes for reads, `caused: ...;` text with a 4xx for bad input.
//!
//! The parts: this file (listener, routes, error answers, request metrics), [`params`] (reading
//! parameters), [`instance`] (register, deregister, modify, beat, get, list), [`service`]
//! (service CRUD and listing) and [`operator`] (metrics, switches, servers, namespaces).

pub(crate) mod auth;
mod instance;
pub(crate) mod operator;
mod params;
pub(crate) mod service;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;

use crate::{Adapter, NacosError};
pub use params::Params;

/// How long 1.x clients may cache a list answer, in ms (Nacos 1.x' default).
const LIST_CACHE_MILLIS: u64 = 3000;

type AppState = State<Arc<Adapter>>;

pub(crate) fn router(adapter: Arc<Adapter>) -> Router {
    let limit = adapter.config.max_body_bytes;
    Router::new()
        .route(
            "/nacos/v1/ns/instance",
            post(instance::register)
                .delete(instance::deregister)
                .put(instance::update)
                .patch(instance::update)
                .get(instance::get_instance),
        )
        .route("/nacos/v1/ns/instance/list", get(instance::list))
        .route("/nacos/v1/ns/instance/beat", put(instance::beat))
        .route(
            "/nacos/v1/ns/service",
            post(service::create_service)
                .put(service::update_service)
                .delete(service::delete_service)
                .get(service::get_service),
        )
        .route("/nacos/v1/ns/service/list", get(service::list_services))
        .route("/nacos/v1/ns/health/instance", put(instance::set_health))
        .route("/nacos/v1/ns/operator/metrics", get(operator::metrics))
        .route("/nacos/v1/ns/operator/switches", get(operator::switches))
        .route("/nacos/v1/ns/operator/servers", get(operator::servers))
        .route("/nacos/v1/console/health/liveness", get(|| async { "OK" }))
        .route("/nacos/v1/console/health/readiness", get(|| async { "OK" }))
        .route("/nacos/v1/console/namespaces", get(operator::namespaces))
        .fallback(unsupported)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            adapter.clone(),
            auth::gate,
        ))
        .with_state(adapter)
}

impl IntoResponse for NacosError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.kind().http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let wait = match &self {
            NacosError::Core(e) => e.retry_after(),
            _ => None,
        };
        // Nacos' own error body: plain text, `caused: <message>;`.
        let mut resp = (status, format!("caused: {self};")).into_response();
        if let Some(v) = wait
            .and_then(|w| header::HeaderValue::from_str(&sextant_core::retry_after_header(w)).ok())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

async fn unsupported(method: Method, uri: Uri) -> NacosError {
    let path = uri.path();
    if path.starts_with("/nacos/v1/cs") || path.starts_with("/nacos/v2/cs") {
        NacosError::Unsupported(format!(
            "{method} {path}: the Nacos config center is not part of Sextant (naming only)"
        ))
    } else {
        NacosError::NotFound(format!(
            "{method} {path} is not a Nacos naming endpoint Sextant serves"
        ))
    }
}

pub(super) fn ok() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "ok").into_response()
}

pub(super) fn track<T>(adapter: &Adapter, what: &str, r: &Result<T, NacosError>) {
    let outcome = match r {
        Ok(_) => "ok",
        Err(e) => e.kind().label(),
    };
    adapter.metrics.request("http", what, outcome);
}

#[cfg(test)]
mod tests;
