//! Access control, pure: tokens (hashed secrets), policies of rules, and the one
//! [`authorize`] decision every adapter's request goes through.
//!
//! A rule grants rights in a namespace (or every namespace, `*`), optionally only for services
//! whose name starts with a prefix, and optionally, for `write`, only for instance ids that
//! match a pattern ("this service may register and renew only itself"). `admin` implies the
//! other rights in its scope; managing tokens and policies needs `admin` on every namespace.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::InvalidField;

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    /// Reads: get, list, discover, watch.
    Read,
    /// Register, deregister, heartbeat, status of instances.
    Write,
    /// Drain, weight override, checks and other service settings, suspects.
    Operate,
    /// Tokens, policies, the audit log.
    Admin,
}

impl Right {
    pub const ALL: [Right; 4] = [Right::Read, Right::Write, Right::Operate, Right::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::Write => "write",
            Right::Operate => "operate",
            Right::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Result<Right, InvalidField> {
        Right::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                InvalidField::new(
                    "rights",
                    format!("unknown right {s:?}: use read, write, operate or admin"),
                )
            })
    }
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a request touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource<'a> {
    /// The whole namespace (listing its services, a watch of all of it).
    Namespace(&'a str),
    Service(&'a str, &'a str),
    Instance(&'a str, &'a str, &'a str),
    /// Every namespace at once (listing namespaces, tokens and policies).
    Global,
}

impl Resource<'_> {
    fn namespace(&self) -> Option<&str> {
        match self {
            Resource::Namespace(ns) | Resource::Service(ns, _) | Resource::Instance(ns, _, _) => {
                Some(ns)
            }
            Resource::Global => None,
        }
    }
}

impl fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Namespace(ns) => write!(f, "namespace {ns}"),
            Resource::Service(ns, s) => write!(f, "namespace {ns} (service {s})"),
            Resource::Instance(ns, s, i) => write!(f, "namespace {ns} (service {s}, instance {i})"),
            Resource::Global => f.write_str("every namespace"),
        }
    }
}

/// One grant of a policy. (No `skip_serializing_if`: records are postcard, which needs
/// every field.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// A namespace, or `*` for every namespace.
    pub namespace: String,
    /// Only services whose name starts with this.
    #[serde(default)]
    pub service_prefix: Option<String>,
    pub rights: Vec<Right>,
    /// Instance-scoped `write`: only instance ids matching this pattern (`*` matches any run of
    /// characters). Other rights of the rule are not narrowed by it.
    #[serde(default)]
    pub instance_ids: Option<String>,
}

impl Rule {
    fn covers_namespace(&self, ns: Option<&str>) -> bool {
        match ns {
            Some(ns) => self.namespace == "*" || self.namespace == ns,
            None => self.namespace == "*",
        }
    }

    fn grants(&self, right: Right, res: &Resource<'_>) -> bool {
        if !self.covers_namespace(res.namespace()) {
            return false;
        }
        let has = |r: Right| self.rights.contains(&r) || self.rights.contains(&Right::Admin);
        if !has(right) {
            return false;
        }
        // A service prefix scopes the rule to those services: it grants nothing on the
        // namespace as a whole (listing it would show other services).
        let service = match res {
            Resource::Service(_, s) | Resource::Instance(_, s, _) => Some(*s),
            _ => None,
        };
        if let Some(p) = &self.service_prefix {
            match service {
                Some(s) if s.starts_with(p.as_str()) => {}
                _ => return false,
            }
        }
        if let (Some(pattern), Right::Write) = (&self.instance_ids, right) {
            if self.rights.contains(&Right::Admin) {
                return true;
            }
            return match res {
                Resource::Instance(_, _, id) => glob(pattern, id),
                _ => false,
            };
        }
        true
    }

    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.namespace != "*" {
            crate::validate_name("namespace", &self.namespace)?;
        }
        if self.rights.is_empty() {
            return Err(InvalidField::new(
                "rights",
                "a rule needs at least one right",
            ));
        }
        if let Some(p) = &self.service_prefix {
            if p.is_empty() || p.len() > 256 {
                return Err(InvalidField::new(
                    "service_prefix",
                    "must be 1 to 256 characters (leave it out for every service)",
                ));
            }
        }
        if let Some(p) = &self.instance_ids {
            if p.is_empty() || p.len() > 256 {
                return Err(InvalidField::new(
                    "instance_ids",
                    "must be 1 to 256 characters (leave it out for every instance)",
                ));
            }
        }
        Ok(())
    }
}

/// `*` matches any run of characters; everything else itself.
pub fn glob(pattern: &str, s: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = s.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*` at all
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A named set of rules tokens refer to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub rules: Vec<Rule>,
}

/// The name of the policy bootstrap creates: `admin` on every namespace.
pub const ADMIN_POLICY: &str = "global-admin";

impl Policy {
    pub fn global_admin() -> Policy {
        Policy {
            name: ADMIN_POLICY.into(),
            description: "every right on every namespace (created by bootstrap)".into(),
            rules: vec![Rule {
                namespace: "*".into(),
                service_prefix: None,
                rights: vec![Right::Admin],
                instance_ids: None,
            }],
        }
    }

    pub fn validate(&self) -> Result<(), InvalidField> {
        crate::validate_name("policy name", &self.name)?;
        if self.description.len() > 1024 {
            return Err(InvalidField::new("description", "longer than 1024 bytes"));
        }
        if self.rules.is_empty() || self.rules.len() > 256 {
            return Err(InvalidField::new("rules", "give 1 to 256 rules"));
        }
        self.rules.iter().try_for_each(Rule::validate)
    }
}

/// The SHA-256 of a secret. Secrets are 32 random bytes, so a plain hash is enough: there is
/// nothing to brute-force that a salt or a slow hash would protect.
pub type SecretHash = [u8; 32];

pub fn hash_secret(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// The text form of a secret: 64 lowercase hex digits.
pub fn format_secret(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A token as stored: never its secret, only the secret's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Public: shown in lists and audit entries, used to revoke.
    pub id: String,
    pub secret_hash: SecretHash,
    pub description: String,
    pub policies: Vec<String>,
    pub created_ms: u64,
    /// Client-certificate names (mTLS: the subject CN, else the first SAN) that authenticate
    /// as this token without its secret.
    #[serde(default)]
    pub tls_identities: Vec<String>,
}

/// A token as stored before it could be bound to client certificates (record version 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenV1 {
    pub id: String,
    pub secret_hash: SecretHash,
    pub description: String,
    pub policies: Vec<String>,
    pub created_ms: u64,
}

impl From<TokenV1> for Token {
    fn from(t: TokenV1) -> Self {
        Token {
            id: t.id,
            secret_hash: t.secret_hash,
            description: t.description,
            policies: t.policies,
            created_ms: t.created_ms,
            tls_identities: Vec::new(),
        }
    }
}

/// Who a request is: the token and the rules of its policies (resolved when checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub token_id: String,
    pub rules: Vec<Rule>,
}

impl Identity {
    /// Whether this identity holds `admin` everywhere (what Nacos calls `globalAdmin`).
    pub fn is_global_admin(&self) -> bool {
        authorize(self, Right::Admin, &Resource::Global).is_ok()
    }
}

/// A refusal, naming what was missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token {token_id} lacks the {right} right on {resource}")]
pub struct Denied {
    pub token_id: String,
    pub right: Right,
    pub resource: String,
}

/// The one decision: does `identity` hold `right` on `resource`?
pub fn authorize(identity: &Identity, right: Right, resource: &Resource<'_>) -> Result<(), Denied> {
    if identity.rules.iter().any(|r| r.grants(right, resource)) {
        Ok(())
    } else {
        Err(Denied {
            token_id: identity.token_id.clone(),
            right,
            resource: resource.to_string(),
        })
    }
}

/// The right a status change needs: the operator's levers (weight override, drain) need
/// `operate`; what an instance reports about itself (health, enabled, weight) needs `write`.
pub fn status_right(patch: &crate::StatusPatch) -> Right {
    if patch.weight_override.is_some() || patch.draining.is_some() {
        Right::Operate
    } else {
        Right::Write
    }
}

/// One audited change: who made it, from where, what it was, at which revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub revision: crate::Revision,
    pub time_ms: u64,
    /// The token's id (never its secret); `None` when auth is off and none was sent.
    pub token_id: Option<String>,
    pub source: String,
    pub protocol: String,
    /// The namespace changed; `None` for token and policy changes.
    pub namespace: Option<String>,
    /// What changed, e.g. `register orders/10.0.0.7:8080`.
    pub change: String,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn rule(ns: &str, prefix: Option<&str>, rights: &[Right], ids: Option<&str>) -> Rule {
        Rule {
            namespace: ns.into(),
            service_prefix: prefix.map(Into::into),
            rights: rights.to_vec(),
            instance_ids: ids.map(Into::into),
        }
    }

    fn who(rules: Vec<Rule>) -> Identity {
        Identity {
            token_id: "t1".into(),
            rules,
        }
    }

    #[test]
    fn namespace_scoped_rights() {
        let id = who(vec![rule("prod", None, &[Right::Read, Right::Write], None)]);
        assert!(authorize(&id, Right::Read, &Resource::Service("prod", "a")).is_ok());
        assert!(authorize(&id, Right::Write, &Resource::Instance("prod", "a", "x")).is_ok());
        let d = authorize(&id, Right::Read, &Resource::Service("dev", "a")).unwrap_err();
        assert_eq!(d.right, Right::Read);
        assert!(d.to_string().contains("namespace dev"), "{d}");
        let d = authorize(&id, Right::Operate, &Resource::Service("prod", "a")).unwrap_err();
        assert!(d.to_string().contains("operate"), "{d}");
        assert!(authorize(&id, Right::Read, &Resource::Global).is_err());
        assert!(!id.is_global_admin());
    }

    #[test]
    fn prefixes_and_instance_patterns() {
        let id = who(vec![rule(
            "prod",
            Some("orders"),
            &[Right::Read, Right::Write],
            Some("orders-*"),
        )]);
        assert!(authorize(&id, Right::Read, &Resource::Service("prod", "orders-v2")).is_ok());
        assert!(authorize(&id, Right::Read, &Resource::Service("prod", "users")).is_err());
        assert!(authorize(&id, Right::Read, &Resource::Namespace("prod")).is_err());
        let ok = Resource::Instance("prod", "orders", "orders-1");
        let bad = Resource::Instance("prod", "orders", "users-1");
        assert!(authorize(&id, Right::Write, &ok).is_ok());
        assert!(authorize(&id, Right::Write, &bad).is_err());
        assert!(authorize(&id, Right::Write, &Resource::Service("prod", "orders")).is_err());
    }

    #[test]
    fn admin_implies_everything_in_scope() {
        let g = who(Policy::global_admin().rules);
        assert!(g.is_global_admin());
        for r in Right::ALL {
            assert!(authorize(&g, r, &Resource::Instance("x", "y", "z")).is_ok());
        }
        let ns = who(vec![rule("prod", None, &[Right::Admin], None)]);
        assert!(authorize(&ns, Right::Operate, &Resource::Service("prod", "a")).is_ok());
        assert!(!ns.is_global_admin());
    }

    #[test]
    fn glob_matches() {
        assert!(glob("a*", "abc"));
        assert!(glob("*c", "abc"));
        assert!(glob("a*c", "abc"));
        assert!(glob("abc", "abc"));
        assert!(!glob("abc", "abcd"));
        assert!(glob("*", ""));
        assert!(!glob("a*b*c", "acb"));
        assert!(!glob("ab*ba", "aba"));
    }

    #[test]
    fn secrets_hash_stably() {
        let s = format_secret(&[7; 32]);
        assert_eq!(s.len(), 64);
        assert_eq!(hash_secret(&s), hash_secret(&s));
        assert_ne!(hash_secret(&s), hash_secret("other"));
    }

    fn any_right() -> impl Strategy<Value = Right> {
        prop::sample::select(Right::ALL.to_vec())
    }

    fn any_rule() -> impl Strategy<Value = Rule> {
        (
            prop::sample::select(vec!["*", "a", "b"]),
            prop::option::of(prop::sample::select(vec!["s", "sx"])),
            prop::collection::vec(any_right(), 1..3),
            prop::option::of(prop::sample::select(vec!["i*", "i1"])),
        )
            .prop_map(|(ns, p, rights, ids)| rule(ns, p, &rights, ids))
    }

    fn any_resource() -> impl Strategy<Value = (u8, &'static str, &'static str, &'static str)> {
        (
            0u8..4,
            prop::sample::select(vec!["a", "b", "c"]),
            prop::sample::select(vec!["s", "sx", "t"]),
            prop::sample::select(vec!["i1", "i2", "j"]),
        )
    }

    fn res<'a>(k: u8, ns: &'a str, s: &'a str, i: &'a str) -> Resource<'a> {
        match k {
            0 => Resource::Global,
            1 => Resource::Namespace(ns),
            2 => Resource::Service(ns, s),
            _ => Resource::Instance(ns, s, i),
        }
    }

    proptest! {
        /// No rules, no rights; and a refusal always names the right asked for.
        #[test]
        fn nothing_without_a_rule(right in any_right(), (k, ns, s, i) in any_resource()) {
            let d = authorize(&who(vec![]), right, &res(k, ns, s, i)).unwrap_err();
            prop_assert_eq!(d.right, right);
        }

        /// Adding a rule never takes a right away (grants are a union), and a grant comes from
        /// some single rule.
        #[test]
        fn grants_are_a_union(
            rules in prop::collection::vec(any_rule(), 0..4),
            extra in any_rule(),
            right in any_right(),
            (k, ns, s, i) in any_resource(),
        ) {
            let r = res(k, ns, s, i);
            let before = authorize(&who(rules.clone()), right, &r).is_ok();
            let mut more = rules.clone();
            more.push(extra);
            let after = authorize(&who(more), right, &r).is_ok();
            prop_assert!(!before || after);
            let single = rules.iter().any(|x| authorize(&who(vec![x.clone()]), right, &r).is_ok());
            prop_assert_eq!(before, single);
        }

        /// A rule for one namespace never grants anything in another, or globally.
        #[test]
        fn namespaces_do_not_leak(rule in any_rule(), right in any_right(), (k, ns, s, i) in any_resource()) {
            let r = res(k, ns, s, i);
            if authorize(&who(vec![rule.clone()]), right, &r).is_ok() && rule.namespace != "*" {
                prop_assert_eq!(r.namespace(), Some(rule.namespace.as_str()));
            }
        }

        /// The glob agrees with a regex-free reference on small inputs.
        #[test]
        fn glob_without_star_is_equality(p in "[ab]{0,4}", s in "[ab]{0,4}") {
            prop_assert_eq!(glob(&p, &s), p == s);
            let (head, tail) = (format!("{p}*"), format!("*{p}"));
            let (ps, sp) = (format!("{p}{s}"), format!("{s}{p}"));
            prop_assert!(glob(&head, &ps));
            prop_assert!(glob(&tail, &sp));
        }
    }
}
