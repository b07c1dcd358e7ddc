//! Leases of ephemeral instances: a deadline per instance, renewed by heartbeats, checked by a
//! periodic sweep. Deadlines live only in memory: after a restart every ephemeral instance gets
//! a fresh grace of one TTL, so a Sextant restart never makes services vanish.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use sextant_model::ServiceKey;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct LeaseKey {
    pub service: ServiceKey,
    pub id: Arc<str>,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Default)]
pub(crate) struct LeaseTable {
    leases: DashMap<LeaseKey, Lease>,
}

impl LeaseTable {
    pub fn grant(&self, key: LeaseKey, ttl_seconds: u32, now: Instant) {
        let ttl = Duration::from_secs(u64::from(ttl_seconds));
        self.leases.insert(
            key,
            Lease {
                ttl,
                deadline: now + ttl,
            },
        );
    }

    pub fn revoke(&self, key: &LeaseKey) {
        self.leases.remove(key);
    }

    /// Pushes the deadline one TTL ahead. `false` if there is no such lease.
    pub fn renew(&self, key: &LeaseKey, now: Instant) -> bool {
        match self.leases.get_mut(key) {
            Some(mut l) => {
                l.deadline = now + l.ttl;
                true
            }
            None => false,
        }
    }

    pub fn is_expired(&self, key: &LeaseKey, now: Instant) -> bool {
        self.leases.get(key).is_some_and(|l| l.deadline <= now)
    }

    pub fn expired(&self, now: Instant) -> Vec<LeaseKey> {
        self.leases
            .iter()
            .filter(|e| e.value().deadline <= now)
            .map(|e| e.key().clone())
            .collect()
    }

    /// Every deadline one TTL from `now` (a fresh grace after a store outage). Returns how many.
    pub fn refresh(&self, now: Instant) -> usize {
        let mut n = 0;
        for mut l in self.leases.iter_mut() {
            l.deadline = now + l.ttl;
            n += 1;
        }
        n
    }

    pub fn clear(&self) {
        self.leases.clear();
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }
}
