//! Loading: rebuilding the per-service states, the ACL tables and the audit log from the
//! store's ordered scan at start-up.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use sextant_model::acl::{AuditEntry, Policy, Token};
use sextant_model::{Instance, Revision, ServiceKey};

use super::table::ServiceState;
use crate::acl::AclState;
use crate::codec;
use crate::store::{Store, StoreError};

/// What the store held at start-up.
pub(super) struct Loaded {
    pub revision: Revision,
    pub states: BTreeMap<ServiceKey, ServiceState>,
    pub acl: AclState,
    /// Oldest first.
    pub audit: VecDeque<AuditEntry>,
}

/// Loads a store asks to start again ([`StoreError::Restart`]) before the error stands.
const LOAD_TRIES: u32 = 3;

/// Reads the store into per-service states, the ACL tables and the audit log, from scratch
/// again when the store says its load must restart. Runs on a blocking thread.
pub(super) fn load(store: &dyn Store) -> Result<Loaded, StoreError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match load_once(store) {
            Err(StoreError::Restart(why)) if tries < LOAD_TRIES => {
                tracing::warn!(%why, tries, "the store's load must start again; loading again");
            }
            r => return r,
        }
    }
}

fn load_once(store: &dyn Store) -> Result<Loaded, StoreError> {
    let mut states: BTreeMap<ServiceKey, ServiceState> = BTreeMap::new();
    let mut acl = AclState::default();
    let mut audit = VecDeque::new();
    let mut pending: Option<(ServiceKey, codec::SpecRecord)> = None;
    fn put(states: &mut BTreeMap<ServiceKey, ServiceState>, key: ServiceKey, inst: Instance) {
        let st = states.entry(key).or_default();
        st.revision = st.revision.max(inst.revision());
        st.instances.insert(inst.spec.id.as_str().into(), inst);
    }
    fn flush(
        states: &mut BTreeMap<ServiceKey, ServiceState>,
        pending: &mut Option<(ServiceKey, codec::SpecRecord)>,
        status: Option<codec::StatusRecord>,
    ) {
        if let Some((key, rec)) = pending.take() {
            let (status, status_revision) = match status {
                Some(s) => (s.status, s.status_revision),
                None => (Default::default(), rec.spec_revision),
            };
            let inst = Instance {
                spec: Arc::new(rec.spec),
                status,
                ttl_seconds: rec.ttl_seconds,
                spec_revision: rec.spec_revision,
                status_revision,
            };
            put(states, key, inst);
        }
    }
    let revision = store.load(&mut |key, value| {
        match codec::parse_key(key)? {
            codec::Key::Spec(svc, id) => {
                flush(&mut states, &mut pending, None);
                let rec = codec::decode_spec(key, value)?;
                if rec.spec.id != id {
                    return Err(StoreError::Corrupt {
                        key: key.to_string(),
                        reason: format!("holds instance {:?}", rec.spec.id),
                    });
                }
                pending = Some((svc, rec));
            }
            codec::Key::Status(svc, id) => {
                let matches = pending
                    .as_ref()
                    .is_some_and(|(k, r)| *k == svc && r.spec.id == id);
                if matches {
                    let rec = codec::decode_status(key, value)?;
                    flush(&mut states, &mut pending, Some(rec));
                } else {
                    tracing::warn!(key, "status without a spec in the store; ignored");
                }
            }
            codec::Key::Service(svc) => {
                let rec = codec::decode_service(key, value)?;
                let st = states.entry(svc).or_default();
                st.config = rec.config;
                st.revision = st.revision.max(rec.revision);
            }
            codec::Key::Token => {
                let t: Token = codec::decode_token(key, value)?;
                acl.tokens.insert(t.id.clone(), t);
            }
            codec::Key::Policy => {
                let p: Policy = codec::decode_v1(key, value)?;
                acl.policies.insert(p.name.clone(), p);
            }
            codec::Key::Bootstrap => acl.bootstrapped = true,
            codec::Key::Audit => audit.push_back(codec::decode_v1::<AuditEntry>(key, value)?),
        }
        Ok(())
    })?;
    flush(&mut states, &mut pending, None);
    acl.reindex();
    Ok(Loaded {
        revision,
        states,
        acl,
        audit,
    })
}
