//! One handler per Nacos 2.x naming request type: instance (un)registration, batch
//! registration, query, service list and (un)subscription. Each reads the decoded
//! [`NamingRequest`], calls the registry and returns the response's own fields.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{json, Value};
use sextant_core::model::Registration;
use sextant_core::Op;

use super::conn::Conn;
use super::push::push_changes;
use super::wire::{NamingRequest, WireInstance};
use super::{Api, PUSH_CACHE_MILLIS};
use crate::mapping::{self, InfoOptions};
use crate::{commit_ignoring_missing, lease_seconds, now_ms, NacosError};

impl Api {
    /// How a service is rendered for a 2.x client: ungrouped name, push cache time.
    fn info_options(&self, clusters: Option<&str>, healthy_only: bool) -> InfoOptions {
        InfoOptions {
            grouped_name: false,
            clusters: mapping::cluster_filter(clusters),
            healthy_only,
            cache_millis: PUSH_CACHE_MILLIS,
            now_ms: now_ms(),
            beat_timeout_ms: self.conns.adapter.beat_timeout_ms(),
        }
    }

    pub(super) async fn instance(
        &self,
        conn: &Arc<Conn>,
        req: &NamingRequest,
        persistent: bool,
    ) -> Result<Value, NacosError> {
        let (_, key) = req.service()?;
        let kind = req.kind.as_deref().unwrap_or("");
        let inst = req
            .instance
            .as_ref()
            .ok_or(NacosError::missing("instance"))?;
        let reg = inst.registration()?;
        let registry = &self.conns.adapter.registry;
        let existing = mapping::find_instance(registry, &key, &reg.ip, reg.port, &reg.cluster)
            .map(|i| i.spec.id.to_string());
        match kind {
            "registerInstance" => {
                let (spec, status) = reg.to_sextant(existing.as_deref())?;
                let id = spec.id.to_string();
                let ttl_seconds = if persistent {
                    0
                } else {
                    lease_seconds(self.conns.adapter.config.connection_grace)
                };
                // A Nacos 2.x connection holds one instance per service: registering another
                // replaces the one it registered before (clients rely on it to move ports).
                let replaced: Vec<String> = if persistent {
                    Vec::new()
                } else {
                    conn.state
                        .lock()
                        .instances
                        .iter()
                        .filter(|(k, old)| *k == key && *old != id)
                        .map(|(_, old)| old.clone())
                        .collect()
                };
                let mut ops = vec![Op::Register(Registration {
                    service: key.clone(),
                    spec,
                    status: Some(status),
                    ttl_seconds,
                })];
                ops.extend(replaced.iter().map(|old| Op::Deregister {
                    service: key.clone(),
                    id: old.clone(),
                }));
                commit_ignoring_missing(registry, ops).await?;
                if persistent {
                    crate::ensure_checked(registry, &key).await?;
                } else {
                    let mut st = conn.state.lock();
                    for old in replaced {
                        st.instances.remove(&(key.clone(), old));
                    }
                    st.instances.insert((key, id));
                }
            }
            "deregisterInstance" | "deRegisterInstance" => {
                if let Some(id) = existing {
                    conn.state
                        .lock()
                        .instances
                        .remove(&(key.clone(), id.clone()));
                    commit_ignoring_missing(registry, vec![Op::Deregister { service: key, id }])
                        .await?;
                }
            }
            other => {
                return Err(NacosError::invalid(
                    "type",
                    format!("{other:?} is not registerInstance or deregisterInstance"),
                ))
            }
        }
        Ok(json!({"type": kind}))
    }

    /// `batchRegisterInstance` makes the given list the connection's whole set of instances of
    /// the service (clients send the remaining ones to deregister some); `batchDeregisterInstance`
    /// removes the given ones.
    pub(super) async fn batch(
        &self,
        conn: &Arc<Conn>,
        req: &NamingRequest,
    ) -> Result<Value, NacosError> {
        let (_, key) = req.service()?;
        let kind = req.kind.as_deref().unwrap_or("");
        let regs = req
            .instances
            .as_ref()
            .ok_or(NacosError::missing("instances"))?
            .iter()
            .map(WireInstance::registration)
            .collect::<Result<Vec<_>, _>>()?;
        // The type is checked before anything else, so an empty batch of a bad type is
        // refused too.
        let registering = match kind {
            "batchRegisterInstance" => true,
            "batchDeregisterInstance" => false,
            other => {
                return Err(NacosError::invalid(
                    "type",
                    format!("{other:?} is not batchRegisterInstance or batchDeregisterInstance"),
                ))
            }
        };
        let registry = &self.conns.adapter.registry;
        let ttl_seconds = lease_seconds(self.conns.adapter.config.connection_grace);
        let mut ops = Vec::new();
        let mut ids = HashSet::new();
        for reg in &regs {
            let existing = mapping::find_instance(registry, &key, &reg.ip, reg.port, &reg.cluster)
                .map(|i| i.spec.id.to_string());
            if registering {
                let (spec, status) = reg.to_sextant(existing.as_deref())?;
                ids.insert(spec.id.to_string());
                ops.push(Op::Register(Registration {
                    service: key.clone(),
                    spec,
                    status: Some(status),
                    ttl_seconds,
                }));
            } else if let Some(id) = existing {
                ids.insert(id.clone());
                ops.push(Op::Deregister {
                    service: key.clone(),
                    id,
                });
            }
        }
        let dropped: Vec<String> = if registering {
            let st = conn.state.lock();
            st.instances
                .iter()
                .filter(|(k, id)| *k == key && !ids.contains(id))
                .map(|(_, id)| id.clone())
                .collect()
        } else {
            Vec::new()
        };
        for id in &dropped {
            ops.push(Op::Deregister {
                service: key.clone(),
                id: id.clone(),
            });
        }
        commit_ignoring_missing(registry, ops).await?;
        let mut st = conn.state.lock();
        for id in dropped {
            st.instances.remove(&(key.clone(), id));
        }
        for id in ids {
            if registering {
                st.instances.insert((key.clone(), id));
            } else {
                st.instances.remove(&(key.clone(), id));
            }
        }
        Ok(json!({"type": kind}))
    }

    pub(super) fn query(&self, req: &NamingRequest) -> Result<Value, NacosError> {
        let (_, key) = req.service()?;
        let view = self.conns.adapter.registry.get(&key, false);
        let opts = self.info_options(
            req.cluster.as_deref().or(req.clusters.as_deref()),
            req.healthy_only.unwrap_or(false),
        );
        Ok(json!({"serviceInfo": mapping::service_info(&view, &opts)}))
    }

    pub(super) fn list(&self, req: &NamingRequest) -> Result<Value, NacosError> {
        let ns = mapping::namespace(req.namespace.as_deref());
        sextant_core::model::validate_name("namespace", ns)
            .map_err(|e| NacosError::invalid("namespace", e.reason))?;
        let (count, names) = crate::http::service::services_page(
            &self.conns.adapter,
            ns,
            req.group_name.as_deref(),
            req.page_no.unwrap_or(1),
            req.page_size.unwrap_or(10),
        );
        Ok(json!({"count": count, "serviceNames": names}))
    }

    pub(super) fn subscribe(
        &self,
        conn: &Arc<Conn>,
        req: &NamingRequest,
        who: &sextant_core::Principal,
    ) -> Result<Value, NacosError> {
        let (_, key) = req.service()?;
        let adapter = &self.conns.adapter;
        let clusters = req.clusters.clone().unwrap_or_default();
        let view = adapter.registry.get(&key, false);
        let opts = self.info_options(Some(&clusters), false);
        let info = mapping::service_info(&view, &opts);
        let sub_key = (key.clone(), clusters);
        let mut st = conn.state.lock();
        if req.subscribe.unwrap_or(true) {
            if !st.closed && !st.subscriptions.contains_key(&sub_key) {
                let task = tokio::spawn(push_changes(
                    self.conns.clone(),
                    conn.clone(),
                    key,
                    opts,
                    view.revision,
                    adapter.registry.acl().revoked(who.clone()),
                ));
                st.subscriptions.insert(sub_key, task);
                adapter.metrics.subscriptions.inc();
            }
        } else if let Some(task) = st.subscriptions.remove(&sub_key) {
            task.abort();
            adapter.metrics.subscriptions.dec();
        }
        Ok(json!({"serviceInfo": info}))
    }
}
