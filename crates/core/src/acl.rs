//! Access control in the registry: the live token and policy tables, the one check every
//! adapter calls ([`Acl::authenticate`] / [`Principal::authorize`], or [`Acl::check`] for both),
//! the ACL writes (through the registry's single writer, so they are stored with the registry
//! and a cluster shares them) and the audit log's in-memory tail.
//!
//! Secrets are never stored or logged: a token is found by the SHA-256 of the secret a request
//! presents.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use sextant_model::acl::{
    authorize, format_secret, hash_secret, AuditEntry, Denied, Identity, Policy, Resource, Right,
    SecretHash, Token,
};
use sextant_model::{InvalidField, Revision};

use crate::registry::{Op, Registry};
use crate::CoreError;

/// Why a request was not let through: no or a bad credential (401), or a right it lacks (403).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error(transparent)]
    Denied(#[from] Denied),
}

/// An ACL change, applied by the writer like any other write.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum AclOp {
    /// The first admin token and the `global-admin` policy; refused once done.
    Bootstrap(Token),
    CreateToken(Token),
    RevokeToken(String),
    PutPolicy(Policy),
    DeletePolicy(String),
}

impl AclOp {
    pub(crate) fn validate(&self) -> Result<(), CoreError> {
        match self {
            AclOp::PutPolicy(p) => p.validate()?,
            AclOp::CreateToken(t) | AclOp::Bootstrap(t) => {
                if t.description.len() > 1024 {
                    return Err(InvalidField::new("description", "longer than 1024 bytes").into());
                }
                if t.policies.len() > 64 {
                    return Err(InvalidField::new("policies", "more than 64").into());
                }
                if t.tls_identities.len() > 64 {
                    return Err(InvalidField::new("tls_identities", "more than 64").into());
                }
                if let Some(n) = t
                    .tls_identities
                    .iter()
                    .find(|n| n.is_empty() || n.len() > 1024)
                {
                    return Err(InvalidField::new(
                        "tls_identities",
                        format!("{n:?}: a certificate name is 1 to 1024 bytes"),
                    )
                    .into());
                }
            }
            AclOp::RevokeToken(_) | AclOp::DeletePolicy(_) => {}
        }
        Ok(())
    }

    /// The audit log's words for it.
    pub(crate) fn describe(&self) -> String {
        match self {
            AclOp::Bootstrap(t) => format!("acl bootstrap: token {}", t.id),
            AclOp::CreateToken(t) => {
                format!(
                    "acl token create {} (policies {})",
                    t.id,
                    t.policies.join(",")
                )
            }
            AclOp::RevokeToken(id) => format!("acl token revoke {id}"),
            AclOp::PutPolicy(p) => format!("acl policy put {}", p.name),
            AclOp::DeletePolicy(n) => format!("acl policy delete {n}"),
        }
    }
}

/// The tokens and policies, as published. Rebuilt (copy-on-write) by the writer.
#[derive(Debug, Clone, Default)]
pub(crate) struct AclState {
    pub tokens: BTreeMap<String, Token>,
    pub policies: BTreeMap<String, Policy>,
    pub bootstrapped: bool,
    /// Secret hash → the token's identity with its policies' rules resolved.
    identities: HashMap<SecretHash, Arc<Identity>>,
    /// Client-certificate name → the identity of the token it is bound to.
    by_tls: HashMap<String, Arc<Identity>>,
}

impl AclState {
    /// Recomputes the resolved identities after a change of tokens or policies.
    pub fn reindex(&mut self) {
        self.identities = self
            .tokens
            .values()
            .map(|t| {
                let rules = t
                    .policies
                    .iter()
                    .filter_map(|p| self.policies.get(p))
                    .flat_map(|p| p.rules.iter().cloned())
                    .collect();
                let id = Identity {
                    token_id: t.id.clone(),
                    rules,
                };
                (t.secret_hash, Arc::new(id))
            })
            .collect();
        self.by_tls = self
            .tokens
            .values()
            .flat_map(|t| {
                let id = self.identities.get(&t.secret_hash).cloned();
                t.tls_identities
                    .iter()
                    .filter_map(move |n| Some((n.clone(), id.clone()?)))
            })
            .collect();
    }

    /// Applies one change to this working copy, or says why it cannot be applied.
    pub fn apply(&mut self, op: &AclOp) -> Result<(), CoreError> {
        match op {
            AclOp::Bootstrap(t) => {
                if self.bootstrapped {
                    return Err(CoreError::Conflict(
                        "ACL bootstrap was already done: ask an admin for a token, or create one \
                         with an admin token (sextant acl token create)"
                            .into(),
                    ));
                }
                self.bootstrapped = true;
                let admin = Policy::global_admin();
                self.policies.insert(admin.name.clone(), admin);
                self.tokens.insert(t.id.clone(), t.clone());
            }
            AclOp::CreateToken(t) => {
                // One certificate name authenticates as one token.
                if let Some(n) = t
                    .tls_identities
                    .iter()
                    .find(|n| self.by_tls.contains_key(*n))
                {
                    return Err(CoreError::Conflict(format!(
                        "the client certificate name {n:?} is already bound to another token; \
                         revoke that one first"
                    )));
                }
                if let Some(p) = t.policies.iter().find(|p| !self.policies.contains_key(*p)) {
                    return Err(
                        InvalidField::new("policies", format!("no policy named {p:?}")).into(),
                    );
                }
                self.tokens.insert(t.id.clone(), t.clone());
            }
            AclOp::RevokeToken(id) => {
                if self.tokens.remove(id).is_none() {
                    return Err(CoreError::NotFound(format!("token {id}")));
                }
            }
            AclOp::PutPolicy(p) => {
                self.policies.insert(p.name.clone(), p.clone());
            }
            AclOp::DeletePolicy(name) => {
                if let Some(t) = self.tokens.values().find(|t| t.policies.contains(name)) {
                    return Err(CoreError::Conflict(format!(
                        "policy {name} is used by token {}: revoke it first",
                        t.id
                    )));
                }
                if self.policies.remove(name).is_none() {
                    return Err(CoreError::NotFound(format!("policy {name}")));
                }
            }
        }
        self.reindex();
        Ok(())
    }
}

/// Who a request is, once authenticated. With auth off every request is let through, and a
/// request that still sent a valid token keeps its identity for the audit log.
#[derive(Debug, Clone)]
pub struct Principal {
    identity: Option<Arc<Identity>>,
    enforced: bool,
}

impl Principal {
    /// The caller with auth off and no token: everything allowed, audited as anonymous.
    pub fn anonymous() -> Self {
        Self {
            identity: None,
            enforced: false,
        }
    }

    pub fn token_id(&self) -> Option<&str> {
        self.identity.as_ref().map(|i| i.token_id.as_str())
    }

    /// Whether this caller holds `right` on `resource`.
    pub fn authorize(&self, right: Right, resource: &Resource<'_>) -> Result<(), AuthError> {
        match (&self.identity, self.enforced) {
            (_, false) => Ok(()),
            (Some(id), true) => Ok(authorize(id, right, resource)?),
            (None, true) => Err(AuthError::Unauthenticated("no token given".into())),
        }
    }

    /// `admin` on every namespace (Nacos' `globalAdmin`); always with auth off.
    pub fn is_global_admin(&self) -> bool {
        self.authorize(Right::Admin, &Resource::Global).is_ok()
    }

    /// Who to record in the audit log for writes made for this caller.
    pub fn actor(&self, source: impl Into<String>, protocol: &'static str) -> Actor {
        Actor {
            token_id: self.token_id().map(Into::into),
            source: source.into(),
            protocol: protocol.into(),
        }
    }
}

/// The verified client-certificate name of a request's connection (mTLS: the subject CN, else
/// the first SAN). The server's acceptor puts it on every request of such a connection; the
/// adapters hand it to [`Acl::authenticate_peer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPeer(pub String);

/// Who makes a write, for the audit log. (Serde: a follower forwards it with the write, so
/// the leader's audit entry names the original caller.)
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Actor {
    pub token_id: Option<String>,
    pub source: String,
    /// A static name for local callers; an owned one when it came from a follower.
    pub protocol: std::borrow::Cow<'static, str>,
}

tokio::task_local! {
    static ACTOR: Arc<Actor>;
}

/// Runs `f` with every registry write it makes audited as made by `actor` (unless the handle
/// used has its own, from [`Registry::acting`]). Adapters wrap each request in it, so a
/// handler cannot forget to say who it writes for.
pub async fn with_actor<F: std::future::Future>(actor: Actor, f: F) -> F::Output {
    ACTOR.scope(Arc::new(actor), f).await
}

/// The actor of the request being handled, if any.
pub(crate) fn current_actor() -> Option<Arc<Actor>> {
    ACTOR.try_with(Arc::clone).ok()
}

/// The audit log's tail, kept in memory (and in the store under `audit/`).
#[derive(Debug, Default)]
pub(crate) struct AuditLog {
    pub entries: VecDeque<AuditEntry>,
}

/// A new random secret and its hash.
fn new_secret() -> Result<(String, SecretHash), CoreError> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b)
        .map_err(|e| CoreError::Internal(format!("no randomness for a token secret: {e}")))?;
    let secret = format_secret(&b);
    let hash = hash_secret(&secret);
    Ok((secret, hash))
}

fn new_token_id() -> Result<String, CoreError> {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b)
        .map_err(|e| CoreError::Internal(format!("no randomness for a token id: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The registry's access control, from [`Registry::acl`].
pub struct Acl<'a> {
    pub(crate) registry: &'a Registry,
}

/// A token just created, with its secret: the only time the secret is seen.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub token: Token,
    pub secret: String,
}

impl Acl<'_> {
    fn state(&self) -> Arc<AclState> {
        self.registry.core.acl.read().clone()
    }

    /// Whether requests without a valid token are refused (`auth = "on"`).
    pub fn enforced(&self) -> bool {
        self.registry.core.config.auth
    }

    /// Finds the caller by the secret it presented. With auth on, no secret or an unknown one
    /// is a 401; with auth off every request passes.
    pub fn authenticate(&self, secret: Option<&str>) -> Result<Principal, AuthError> {
        self.authenticate_peer(secret, None)
    }

    /// [`Acl::authenticate`] for a request that may have come over mTLS: without a secret, the
    /// verified client certificate's name (`tls`) authenticates as the token it is bound to
    /// (`tls_identities`). A secret, when given, always decides.
    pub fn authenticate_peer(
        &self,
        secret: Option<&str>,
        tls: Option<&TlsPeer>,
    ) -> Result<Principal, AuthError> {
        let enforced = self.enforced();
        if secret.is_none_or(str::is_empty) {
            if let Some(TlsPeer(name)) = tls {
                match self.state().by_tls.get(name).cloned() {
                    Some(identity) => {
                        return Ok(Principal {
                            identity: Some(identity),
                            enforced,
                        })
                    }
                    None if enforced => {
                        return Err(AuthError::Unauthenticated(format!(
                            "no token given, and the client certificate {name:?} is bound to no \
                             token"
                        )))
                    }
                    None => {}
                }
            }
        }
        let identity = match secret.filter(|s| !s.is_empty()) {
            Some(s) => {
                let found = self.state().identities.get(&hash_secret(s)).cloned();
                if found.is_none() && enforced {
                    return Err(AuthError::Unauthenticated(
                        "the token is not valid (unknown or revoked)".into(),
                    ));
                }
                found
            }
            None if enforced => {
                return Err(AuthError::Unauthenticated("no token given".into()));
            }
            None => None,
        };
        Ok(Principal { identity, enforced })
    }

    /// [`Acl::authenticate_peer`] and [`Principal::authorize`] in one call.
    pub fn check(
        &self,
        secret: Option<&str>,
        tls: Option<&TlsPeer>,
        right: Right,
        resource: &Resource<'_>,
    ) -> Result<Principal, AuthError> {
        let p = self.authenticate_peer(secret, tls)?;
        p.authorize(right, resource)?;
        Ok(p)
    }

    /// Whether the principal's token still exists (a watch ends when it does not).
    pub fn is_current(&self, p: &Principal) -> bool {
        match p.token_id() {
            None => true,
            Some(id) => self.state().tokens.contains_key(id),
        }
    }

    /// Ticks on every ACL change (watches re-check their token on it).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<Revision> {
        self.registry.core.acl_changed.subscribe()
    }

    /// Resolves, with the reason, once `principal`'s token no longer exists; never for a
    /// caller without a token. Every watch of every adapter ends on it.
    pub fn revoked(&self, principal: Principal) -> impl std::future::Future<Output = String> {
        let registry = self.registry.clone();
        async move {
            let mut changes = registry.acl().changes();
            loop {
                if !registry.acl().is_current(&principal) {
                    return "the watch's token was revoked".to_string();
                }
                if changes.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    pub fn tokens(&self) -> Vec<Token> {
        self.state().tokens.values().cloned().collect()
    }

    pub fn policies(&self) -> Vec<Policy> {
        self.state().policies.values().cloned().collect()
    }

    pub fn bootstrapped(&self) -> bool {
        self.state().bootstrapped
    }

    async fn write(&self, op: AclOp) -> Result<Revision, CoreError> {
        self.registry
            .apply(vec![Op::Acl(op)])
            .await?
            .pop()
            .unwrap_or(Err(CoreError::ShuttingDown))
    }

    fn token(
        description: &str,
        policies: Vec<String>,
        tls_identities: Vec<String>,
    ) -> Result<NewToken, CoreError> {
        let (secret, secret_hash) = new_secret()?;
        Ok(NewToken {
            token: Token {
                id: new_token_id()?,
                secret_hash,
                description: description.into(),
                policies,
                created_ms: sextant_model::now_ms(),
                tls_identities,
            },
            secret,
        })
    }

    /// Creates the first admin token, once.
    pub async fn bootstrap(&self) -> Result<NewToken, CoreError> {
        let t = Self::token(
            "bootstrap admin token",
            vec![sextant_model::acl::ADMIN_POLICY.into()],
            Vec::new(),
        )?;
        self.write(AclOp::Bootstrap(t.token.clone())).await?;
        Ok(t)
    }

    pub async fn create_token(
        &self,
        description: &str,
        policies: Vec<String>,
        tls_identities: Vec<String>,
    ) -> Result<NewToken, CoreError> {
        let t = Self::token(description, policies, tls_identities)?;
        self.write(AclOp::CreateToken(t.token.clone())).await?;
        Ok(t)
    }

    pub async fn revoke_token(&self, id: &str) -> Result<Revision, CoreError> {
        self.write(AclOp::RevokeToken(id.into())).await
    }

    pub async fn put_policy(&self, policy: Policy) -> Result<Revision, CoreError> {
        self.write(AclOp::PutPolicy(policy)).await
    }

    pub async fn delete_policy(&self, name: &str) -> Result<Revision, CoreError> {
        self.write(AclOp::DeletePolicy(name.into())).await
    }

    /// Audit entries after `since`, of one namespace (ACL changes have none) or all, oldest
    /// first, at most `limit`.
    pub fn audit(&self, namespace: Option<&str>, since: Revision, limit: usize) -> Vec<AuditEntry> {
        let log = self.registry.core.audit.lock();
        log.entries
            .iter()
            .filter(|e| e.revision > since)
            .filter(|e| namespace.is_none_or(|ns| e.namespace.as_deref() == Some(ns)))
            .take(limit)
            .cloned()
            .collect()
    }
}
