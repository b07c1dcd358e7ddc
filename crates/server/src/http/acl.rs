//! `/v1/acl/...` (bootstrap, tokens, policies) and `/v1/audit` on the native HTTP API. Every
//! route but bootstrap needs `admin` on every namespace (the audit log of one namespace:
//! `admin` there). Secrets appear only in the answer that creates them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use sextant_core::model::acl::{Policy, Resource, Right, Rule, Token};
use sextant_core::NewToken;

use super::{ApiJson, ApiPath, ApiQuery, AppState, Caller};
use crate::error::ApiError;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/acl/bootstrap", post(bootstrap))
        .route("/v1/acl/tokens", get(list_tokens).post(create_token))
        .route("/v1/acl/tokens/{id}", delete(revoke_token))
        .route("/v1/acl/policies", get(list_policies))
        .route(
            "/v1/acl/policies/{name}",
            put(put_policy).delete(delete_policy),
        )
        .route("/v1/audit", get(audit))
}

fn token_json(t: &Token) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "description": t.description,
        "policies": t.policies,
        "created_ms": t.created_ms,
    })
}

fn new_token_json(t: &NewToken) -> serde_json::Value {
    let mut v = token_json(&t.token);
    v["secret"] = serde_json::Value::String(t.secret.clone());
    v
}

fn admin(caller: &Caller) -> Result<(), ApiError> {
    caller.allow(Right::Admin, &Resource::Global)
}

/// Creates the first admin token; refused (409) once done. Public: on a fresh node nobody
/// holds a token yet.
async fn bootstrap(
    State(s): State<AppState>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let t = s.registry().acl().bootstrap().await?;
    tracing::info!(token = %t.token.id, "ACL bootstrap: first admin token created");
    Ok((StatusCode::CREATED, Json(new_token_json(&t))))
}

async fn list_tokens(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    admin(&caller)?;
    let tokens: Vec<_> = s.registry().acl().tokens().iter().map(token_json).collect();
    Ok(Json(serde_json::json!({ "tokens": tokens })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    #[serde(default)]
    description: String,
    policies: Vec<String>,
    /// Client-certificate names (mTLS) that authenticate as this token without its secret.
    #[serde(default)]
    tls_identities: Vec<String>,
}

async fn create_token(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<TokenBody>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    admin(&caller)?;
    if body.policies.is_empty() {
        return Err(ApiError::bad_request(
            "invalid policies: give at least one policy name",
        ));
    }
    let t = s
        .registry()
        .acl()
        .create_token(&body.description, body.policies, body.tls_identities)
        .await?;
    Ok((StatusCode::CREATED, Json(new_token_json(&t))))
}

async fn revoke_token(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    admin(&caller)?;
    let revision = s.registry().acl().revoke_token(&id).await?;
    Ok(Json(serde_json::json!({ "revision": revision })))
}

async fn list_policies(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    admin(&caller)?;
    Ok(Json(
        serde_json::json!({ "policies": s.registry().acl().policies() }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyBody {
    #[serde(default)]
    description: String,
    rules: Vec<Rule>,
}

async fn put_policy(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<PolicyBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    admin(&caller)?;
    let policy = Policy {
        name,
        description: body.description,
        rules: body.rules,
    };
    let revision = s.registry().acl().put_policy(policy).await?;
    Ok(Json(serde_json::json!({ "revision": revision })))
}

async fn delete_policy(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    admin(&caller)?;
    let revision = s.registry().acl().delete_policy(&name).await?;
    Ok(Json(serde_json::json!({ "revision": revision })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    namespace: Option<String>,
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

/// `GET /v1/audit?namespace=&since=&limit=`: entries after revision `since`, oldest first.
async fn audit(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    match &q.namespace {
        Some(ns) => caller.allow(Right::Admin, &Resource::Namespace(ns))?,
        None => admin(&caller)?,
    }
    let limit = q.limit.unwrap_or(1000).min(10_000);
    let entries = s
        .registry()
        .acl()
        .audit(q.namespace.as_deref(), q.since, limit);
    Ok(Json(serde_json::json!({ "entries": entries })))
}
