//! The native HTTP listener's gate: every request but the few public routes ([`PUBLIC`]) is
//! authenticated here before any handler runs (401 without a valid token), Eureka's routes are
//! authorized here too (their scope is in the path), and every request runs with its actor set
//! so the registry audits its writes. Native handlers then authorize what they touch through
//! the [`Caller`] extractor (403 naming the right and the namespace).
//!
//! Credentials: `Authorization: Bearer <secret>`, or HTTP basic auth with the user `token` or
//! the token's id and the secret as password (what Eureka clients can send).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sextant_core::model::acl::{Resource, Right};
use sextant_core::{AuthError, Principal, Registry};

use crate::error::ApiError;

/// Routes answered without a token: probes, metrics and the one-time bootstrap.
pub(crate) const PUBLIC: [(&str, &str); 4] = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/v1/acl/bootstrap"),
];

/// The secret a request presents and the user name it came with (basic auth), if any.
pub(crate) fn credential(
    headers: &HeaderMap,
) -> Result<Option<(String, Option<String>)>, ApiError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "malformed Authorization header: send `Bearer <secret>` (or basic auth with the \
             token's id or `token` as user and the secret as password)",
        )
    };
    let v = v.to_str().map_err(|_| bad())?.trim();
    let (scheme, rest) = v.split_once(' ').ok_or_else(bad)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok(Some((rest.to_string(), None)));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| bad())?;
        let text = String::from_utf8(raw).map_err(|_| bad())?;
        let (user, pass) = text.split_once(':').ok_or_else(bad)?;
        return Ok(Some((pass.to_string(), Some(user.to_string()))));
    }
    Err(bad())
}

/// An [`AuthError`] as the native API answers it.
pub(crate) fn auth_error(e: AuthError) -> ApiError {
    match e {
        AuthError::Unauthenticated(m) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            format!("{m}: send Authorization: Bearer <secret>"),
        ),
        AuthError::Denied(d) => {
            ApiError::new(StatusCode::FORBIDDEN, "permission_denied", d.to_string())
        }
    }
}

/// Authenticates a request's credential against the registry's tokens.
pub(crate) fn authenticate(
    registry: &Registry,
    headers: &HeaderMap,
    tls: Option<&sextant_core::TlsPeer>,
) -> Result<Principal, ApiError> {
    let cred = credential(headers)?;
    let p = registry
        .acl()
        .authenticate_peer(cred.as_ref().map(|c| c.0.as_str()), tls)
        .map_err(auth_error)?;
    // Basic auth names the token too: a mismatch is a bad credential, not a different token.
    if let (Some((_, Some(user))), Some(id)) = (&cred, p.token_id()) {
        if user != "token" && user != id {
            return Err(auth_error(AuthError::Unauthenticated(
                "the basic-auth user is neither `token` nor the token's id".into(),
            )));
        }
    }
    Ok(p)
}

/// The gate (see the module doc). Runs for every route of the native router, Eureka's included.
pub(crate) async fn gate(State(registry): State<Registry>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let public = route
        .as_deref()
        .is_some_and(|r| PUBLIC.iter().any(|(m, p)| *m == req.method() && *p == r));
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let principal = if public {
        Principal::anonymous()
    } else {
        match authenticate(
            &registry,
            req.headers(),
            req.extensions().get::<sextant_core::TlsPeer>(),
        ) {
            Ok(p) => p,
            Err(e) => {
                let mut resp = e.into_response();
                if req.uri().path().starts_with("/eureka") {
                    resp.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Basic realm=\"sextant\""),
                    );
                } else {
                    resp.headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                }
                return resp;
            }
        }
    };
    if req.uri().path().starts_with("/eureka") {
        if let Err(e) = eureka_scope(req.method(), req.uri().path(), &principal) {
            return e.into_response();
        }
    }
    let actor = principal.actor(peer, "http");
    let mut req = req;
    req.extensions_mut().insert(principal);
    match registry.admitted(actor, next.run(req)).await {
        Ok(resp) => resp,
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Eureka's scope is its path: `apps/{app}[/{id}[/status]]` in the `public` namespace.
fn eureka_scope(method: &Method, path: &str, p: &Principal) -> Result<(), ApiError> {
    let ns = sextant_eureka::mapping::NAMESPACE;
    let rest = path
        .strip_prefix("/eureka/v2")
        .or_else(|| path.strip_prefix("/eureka"))
        .unwrap_or("");
    let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let service = match parts.as_slice() {
        ["apps", app, ..] if *app != "delta" => sextant_eureka::mapping::app_to_service(app).ok(),
        _ => None,
    };
    let (right, res_service, id) = match (method, parts.as_slice()) {
        (&Method::GET, _) => (Right::Read, service.as_deref(), None),
        (_, ["apps", _, _, "status"]) => (Right::Operate, service.as_deref(), None),
        (_, ["apps", _, id]) => (Right::Write, service.as_deref(), Some(*id)),
        _ => (Right::Write, service.as_deref(), None),
    };
    let resource = match (res_service, id) {
        (Some(s), Some(id)) => Resource::Instance(ns, s, id),
        (Some(s), None) => Resource::Service(ns, s),
        (None, _) => Resource::Namespace(ns),
    };
    p.authorize(right, &resource).map_err(auth_error)
}

/// The authenticated caller of a native request; handlers authorize through it.
pub(crate) struct Caller(pub Principal);

impl Caller {
    /// 403 unless the caller holds `right` on `resource`.
    pub fn allow(&self, right: Right, resource: &Resource<'_>) -> Result<(), ApiError> {
        self.0.authorize(right, resource).map_err(auth_error)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // The gate inserts it for every request; its absence would be a wiring bug, so it is
        // refused rather than let through.
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| auth_error(AuthError::Unauthenticated("no credential checked".into())))
    }
}
