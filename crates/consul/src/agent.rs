//! What a Consul agent keeps that Sextant's registry does not: the agent's own services by
//! their Consul id (Consul addresses them by id alone), each TTL check's status, output and
//! deadline, maintenance reasons, and how long an instance has been critical (for
//! `DeregisterCriticalServiceAfter`).
//!
//! All of it is in memory and rebuilt from the registry at start ([`Agent::adopt`] for every
//! instance carrying `consul.checks`): a TTL check then gets a fresh deadline from its
//! instance's stored health, as a restarted Consul agent gives its checks, instead of a mass
//! expiry. The registry stays the truth: an instance removed by any protocol is forgotten
//! here on the next sweep.

use std::collections::HashMap;
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use sextant_core::model::{Health, Instance, ServiceKey};
use tokio::time::Instant;

use crate::mapping::{checks_of, worst, CheckDef, Probe, Status};

/// A TTL check's state.
#[derive(Debug, Clone)]
struct Ttl {
    ttl: Duration,
    status: Status,
    output: String,
    deadline: Instant,
}

#[derive(Debug)]
struct Entry {
    key: ServiceKey,
    defs: Vec<CheckDef>,
    ttl: HashMap<String, Ttl>,
    maintenance: Option<String>,
    critical_since: Option<Instant>,
}

impl Entry {
    /// The health the TTL checks decide, if the instance has any.
    fn ttl_health(&self) -> Option<Health> {
        (!self.ttl.is_empty()).then(|| worst(self.ttl.values().map(|t| t.status)).to_health())
    }

    /// The shortest `DeregisterCriticalServiceAfter` of its checks.
    fn deregister_after(&self) -> Option<Duration> {
        self.defs
            .iter()
            .filter_map(|d| d.deregister_after_ms)
            .min()
            .map(Duration::from_millis)
    }
}

#[derive(Default)]
struct State {
    /// Agent-registered instances by Consul service id.
    services: HashMap<String, Entry>,
    /// Check id → service id.
    checks: HashMap<String, String>,
}

/// Why a TTL update was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TtlError {
    Unknown,
    NotTtl,
}

/// A change the adapter must write: an instance's health, as its TTL checks now decide it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthWrite {
    pub key: ServiceKey,
    pub id: String,
    pub health: Health,
}

#[derive(Default)]
pub struct Agent {
    state: Mutex<State>,
    /// Bumped on every change of what answers show but the registry does not version (TTL
    /// outputs and statuses, maintenance reasons, the set of agent services), so a cached
    /// answer is rebuilt.
    generation: AtomicU64,
}

impl Agent {
    /// See the field: a cached answer built at another generation is stale.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes an agent-registered instance (at start, or after a registration) with each
    /// check's initial status; a TTL check it already tracked keeps its state.
    pub fn adopt(
        &self,
        key: &ServiceKey,
        inst: &Instance,
        initial: Option<&[Status]>,
        now: Instant,
    ) {
        let Some(defs) = checks_of(inst) else {
            return;
        };
        let id = inst.spec.id.to_string();
        let from_health = Status::from_health(inst.status.health);
        let mut st = self.state.lock();
        let old = st.services.remove(&id);
        if let Some(old) = &old {
            for d in &old.defs {
                st.checks.remove(&d.id);
            }
        }
        let (mut old_ttl, maintenance) = old.map(|o| (o.ttl, o.maintenance)).unwrap_or_default();
        let mut ttl = HashMap::new();
        for (i, d) in defs.iter().enumerate() {
            st.checks.insert(d.id.clone(), id.clone());
            if let Probe::Ttl { ttl_ms } = d.probe {
                let t = Duration::from_millis(ttl_ms);
                let state = match old_ttl.remove(&d.id) {
                    Some(mut s) => {
                        s.ttl = t;
                        s
                    }
                    None => Ttl {
                        ttl: t,
                        status: initial
                            .and_then(|s| s.get(i).copied())
                            .unwrap_or(from_health),
                        output: String::new(),
                        deadline: now + t,
                    },
                };
                ttl.insert(d.id.clone(), state);
            }
        }
        st.services.insert(
            id,
            Entry {
                key: key.clone(),
                defs,
                ttl,
                maintenance,
                critical_since: None,
            },
        );
        drop(st);
        self.changed();
    }

    /// Forgets an instance and its checks.
    pub fn forget(&self, id: &str) {
        let mut st = self.state.lock();
        if let Some(e) = st.services.remove(id) {
            for d in e.defs {
                st.checks.remove(&d.id);
            }
        }
        drop(st);
        self.changed();
    }

    /// The service of an agent-registered instance.
    pub fn service_of(&self, id: &str) -> Option<ServiceKey> {
        self.state.lock().services.get(id).map(|e| e.key.clone())
    }

    /// The service and instance id a check belongs to.
    pub fn check_owner(&self, check_id: &str) -> Option<(ServiceKey, String)> {
        let st = self.state.lock();
        let id = st.checks.get(check_id)?;
        st.services.get(id).map(|e| (e.key.clone(), id.clone()))
    }

    /// Every agent-registered instance: (Consul id, service).
    pub fn services(&self) -> Vec<(String, ServiceKey)> {
        self.state
            .lock()
            .services
            .iter()
            .map(|(id, e)| (id.clone(), e.key.clone()))
            .collect()
    }

    /// Whether any agent-registered instance of `key` has a TTL check.
    pub fn has_ttl_checks(&self, key: &ServiceKey) -> bool {
        self.state
            .lock()
            .services
            .values()
            .any(|e| &e.key == key && !e.ttl.is_empty())
    }

    /// A TTL check's status and output.
    pub fn ttl_status(&self, check_id: &str) -> Option<(Status, String)> {
        let st = self.state.lock();
        let id = st.checks.get(check_id)?;
        let t = st.services.get(id)?.ttl.get(check_id)?;
        Some((t.status, t.output.clone()))
    }

    pub fn maintenance_reason(&self, id: &str) -> Option<String> {
        self.state
            .lock()
            .services
            .get(id)
            .and_then(|e| e.maintenance.clone())
    }

    /// Sets (or clears) a service's maintenance reason; returns the one it had, so a caller
    /// whose registry write then fails can put it back.
    pub fn set_maintenance(&self, id: &str, reason: Option<String>) -> Option<String> {
        let old = self
            .state
            .lock()
            .services
            .get_mut(id)
            .and_then(|e| std::mem::replace(&mut e.maintenance, reason));
        self.changed();
        old
    }

    /// Records a TTL check's report and restarts its deadline; returns the instance's health
    /// as its TTL checks now decide it.
    pub fn ttl_update(
        &self,
        check_id: &str,
        status: Status,
        output: String,
        now: Instant,
    ) -> Result<HealthWrite, TtlError> {
        let mut st = self.state.lock();
        let id = st.checks.get(check_id).cloned().ok_or(TtlError::Unknown)?;
        let e = st.services.get_mut(&id).ok_or(TtlError::Unknown)?;
        let t = e.ttl.get_mut(check_id).ok_or(TtlError::NotTtl)?;
        t.status = status;
        t.output = output;
        t.deadline = now + t.ttl;
        let health = e.ttl_health().unwrap_or(Health::Unknown);
        let w = HealthWrite {
            key: e.key.clone(),
            id,
            health,
        };
        drop(st);
        self.changed();
        Ok(w)
    }

    /// Marks every TTL check past its deadline critical; returns how many expired.
    pub fn expire(&self, now: Instant) -> usize {
        let mut st = self.state.lock();
        let mut n = 0;
        for e in st.services.values_mut() {
            for t in e.ttl.values_mut() {
                if now >= t.deadline && t.status != Status::Critical {
                    t.status = Status::Critical;
                    t.output = "TTL expired".into();
                    n += 1;
                }
            }
        }
        drop(st);
        if n > 0 {
            self.changed();
        }
        n
    }

    /// The health each TTL-checked instance should have, for comparison with the registry.
    pub fn ttl_healths(&self) -> Vec<HealthWrite> {
        self.state
            .lock()
            .services
            .iter()
            .filter_map(|(id, e)| {
                e.ttl_health().map(|health| HealthWrite {
                    key: e.key.clone(),
                    id: id.clone(),
                    health,
                })
            })
            .collect()
    }

    /// Instances critical for longer than their `DeregisterCriticalServiceAfter`, given each
    /// one's current health (`None`: gone from the registry, forgotten here).
    pub fn reap(
        &self,
        now: Instant,
        health_of: impl Fn(&ServiceKey, &str) -> Option<Health>,
    ) -> Vec<(ServiceKey, String)> {
        let mut st = self.state.lock();
        let mut gone = Vec::new();
        let mut reap = Vec::new();
        for (id, e) in st.services.iter_mut() {
            let Some(health) = health_of(&e.key, id) else {
                gone.push(id.clone());
                continue;
            };
            let Some(after) = e.deregister_after() else {
                continue;
            };
            if health == Health::Unhealthy {
                let since = *e.critical_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= after {
                    reap.push((e.key.clone(), id.clone()));
                }
            } else {
                e.critical_since = None;
            }
        }
        for id in gone {
            if let Some(e) = st.services.remove(&id) {
                for d in e.defs {
                    st.checks.remove(&d.id);
                }
            }
        }
        reap
    }

    /// TTL checks tracked.
    pub fn ttl_checks(&self) -> usize {
        self.state
            .lock()
            .services
            .values()
            .map(|e| e.ttl.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::parse_registration;
    use serde_json::json;
    use sextant_core::model::InstanceStatus;
    use std::sync::Arc;

    fn inst(body: serde_json::Value, health: Health) -> (ServiceKey, Instance, Vec<Status>) {
        let r = parse_registration(&body, "10.0.0.1", Duration::from_secs(60)).unwrap();
        let key = ServiceKey::new("public", &r.name).unwrap();
        let i = Instance {
            spec: Arc::new(r.spec),
            status: InstanceStatus {
                health,
                ..InstanceStatus::default()
            },
            ttl_seconds: 0,
            spec_revision: 1,
            status_revision: 1,
        };
        (key, i, r.initial)
    }

    #[test]
    fn ttl_checks_expire_and_recover() {
        let a = Agent::default();
        let t0 = Instant::now();
        let (key, i, initial) = inst(
            json!({"Name": "web", "ID": "w1", "Port": 80, "Check": {"TTL": "10s", "Status": "passing"}}),
            Health::Healthy,
        );
        a.adopt(&key, &i, Some(&initial), t0);
        assert_eq!(a.ttl_status("service:w1").unwrap().0, Status::Passing);
        assert_eq!(a.expire(t0 + Duration::from_secs(9)), 0);
        assert_eq!(a.expire(t0 + Duration::from_secs(10)), 1);
        assert_eq!(a.ttl_healths()[0].health, Health::Unhealthy);
        let w = a
            .ttl_update("service:w1", Status::Warning, "slow".into(), t0)
            .unwrap();
        assert_eq!((w.id.as_str(), w.health), ("w1", Health::Warning));
        assert_eq!(
            a.ttl_update("nope", Status::Passing, String::new(), t0),
            Err(TtlError::Unknown)
        );
        // Re-registration keeps the check's state.
        a.adopt(&key, &i, Some(&[Status::Critical]), t0);
        assert_eq!(a.ttl_status("service:w1").unwrap().0, Status::Warning);
        a.forget("w1");
        assert!(a.ttl_status("service:w1").is_none());
    }

    #[test]
    fn reaps_only_after_critical_long_enough_and_forgets_the_gone() {
        let a = Agent::default();
        let t0 = Instant::now();
        let (key, i, initial) = inst(
            json!({"Name": "web", "ID": "w1", "Port": 80,
                   "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": "1m"}}),
            Health::Unhealthy,
        );
        a.adopt(&key, &i, Some(&initial), t0);
        let (key2, i2, init2) = inst(
            json!({"Name": "api", "ID": "a1", "Port": 80}),
            Health::Unknown,
        );
        a.adopt(&key2, &i2, Some(&init2), t0);
        let critical = |_: &ServiceKey, id: &str| (id == "w1").then_some(Health::Unhealthy);
        assert!(a.reap(t0, critical).is_empty());
        assert!(a.service_of("a1").is_none(), "a1 left the registry");
        assert!(a.reap(t0 + Duration::from_secs(59), critical).is_empty());
        assert_eq!(a.reap(t0 + Duration::from_secs(60), critical).len(), 1);
        // Passing again resets the clock.
        let passing = |_: &ServiceKey, _: &str| Some(Health::Healthy);
        assert!(a.reap(t0 + Duration::from_secs(61), passing).is_empty());
        assert!(a.reap(t0 + Duration::from_secs(62), critical).is_empty());
    }
}
