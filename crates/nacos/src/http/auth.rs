//! Access control on the Nacos 1.x HTTP API: the login endpoints Nacos SDKs call
//! (`/nacos/v1/auth/login`, `/nacos/v1/auth/users/login`) and the gate every other route passes
//! through.
//!
//! Nacos users map onto Sextant tokens: the username is the token's id (or `token`), the
//! password its secret; the `accessToken` handed back is that same secret (Sextant keeps no
//! sessions, so it never expires: `tokenTtl` only tells clients when to log in again). Requests
//! then carry it as the `accessToken` parameter (query or form) or header, or as
//! `Authorization: Bearer`. The gate authorizes by route: reads need `read`, instance writes
//! `write`, service settings `operate`, in the namespace of `namespaceId` (`public` if none).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sextant_core::model::acl::{Resource, Right};
use sextant_core::{AuthError, Principal, Registry};

use crate::mapping::{self, NacosService};
use crate::Adapter;

/// What `tokenTtl` says (seconds): Nacos' default; clients log in again before it runs out.
pub const TOKEN_TTL_SECONDS: u64 = 18_000;

pub(crate) const LOGIN_PATHS: [&str; 2] = ["/nacos/v1/auth/login", "/nacos/v1/auth/users/login"];

/// Routes answered without a token.
const PUBLIC: [&str; 2] = [
    "/nacos/v1/console/health/liveness",
    "/nacos/v1/console/health/readiness",
];

fn params(query: Option<&str>, body: &[u8], form: bool) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    if form {
        v.extend(form_urlencoded::parse(body).into_owned());
    }
    v
}

fn param<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

fn refuse(e: &AuthError) -> Response {
    let status = match e {
        AuthError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        AuthError::Denied(_) => StatusCode::FORBIDDEN,
    };
    let hint = match e {
        AuthError::Unauthenticated(_) => {
            " (log in at /nacos/v1/auth/login with the token's id and secret, then send accessToken)"
        }
        AuthError::Denied(_) => "",
    };
    (status, format!("caused: {e}{hint};")).into_response()
}

/// Checks a Nacos username and password (token id or `token`, and its secret).
pub(crate) fn login_check(
    registry: &Registry,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<Principal, AuthError> {
    let p = registry.acl().authenticate(password)?;
    if let (Some(user), Some(id)) = (username, p.token_id()) {
        if user != "token" && user != id {
            return Err(AuthError::Unauthenticated(
                "the username is neither `token` nor the id of the token whose secret is the \
                 password"
                    .into(),
            ));
        }
    }
    if registry.acl().enforced() && p.token_id().is_none() {
        return Err(AuthError::Unauthenticated("no password given".into()));
    }
    Ok(p)
}

/// The gate, and the login endpoints (answered here, before routing).
pub(crate) async fn gate(
    State(adapter): State<Arc<Adapter>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    if PUBLIC.contains(&path.as_str()) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let limit = adapter.config.max_body_bytes;
    let body: Bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("caused: request body over {limit} bytes or unreadable: {e};"),
            )
                .into_response()
        }
    };
    let form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    let p = params(parts.uri.query(), &body, form);
    let registry = &adapter.registry;

    if LOGIN_PATHS.contains(&path.as_str()) {
        return match login_check(registry, param(&p, "username"), param(&p, "password")) {
            Ok(who) => {
                let token = param(&p, "password").unwrap_or_default();
                axum::Json(serde_json::json!({
                    "accessToken": token,
                    "tokenTtl": TOKEN_TTL_SECONDS,
                    "globalAdmin": who.is_global_admin(),
                    "username": param(&p, "username").unwrap_or_default(),
                }))
                .into_response()
            }
            Err(e) => refuse(&e),
        };
    }

    let header_token = parts
        .headers
        .get("accesstoken")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        });
    let token = param(&p, "accessToken").or(header_token);
    let who = match registry
        .acl()
        .authenticate_peer(token, parts.extensions.get::<sextant_core::TlsPeer>())
    {
        Ok(w) => w,
        Err(e) => return refuse(&e),
    };
    let ns = mapping::namespace(param(&p, "namespaceId")).to_owned();
    let service = param(&p, "serviceName")
        .and_then(|s| NacosService::parse(s, param(&p, "groupName")).ok())
        .map(|s| s.sextant_name());
    let right = required_right(&parts.method, &path);
    let global =
        path.starts_with("/nacos/v1/ns/operator") || path == "/nacos/v1/console/namespaces";
    let resource = match service.as_deref() {
        _ if global => Resource::Global,
        Some(s) => Resource::Service(&ns, s),
        None => Resource::Namespace(&ns),
    };
    if let Err(e) = who.authorize(right, &resource) {
        return refuse(&e);
    }
    let actor = who.actor(peer, "nacos-http");
    let req = Request::from_parts(parts, Body::from(body));
    match registry.admitted(actor, next.run(req)).await {
        Ok(resp) => resp,
        Err(e) => crate::NacosError::from(e).into_response(),
    }
}

/// The right a 1.x route needs.
fn required_right(method: &Method, path: &str) -> Right {
    match (method, path) {
        (&Method::GET, _) => Right::Read,
        (_, "/nacos/v1/ns/service") => Right::Operate,
        _ => Right::Write,
    }
}
