//! Which node probes which service in a cluster: rendezvous (highest-random-weight) hashing of
//! the service over the live members' ids. Every node computes the same owner from the same
//! member list, with no coordination; when a member joins or leaves only the services it wins
//! or held move. Sharding is by service, not by instance, so each service's mass-failure
//! protection sees all its instances at once.

use sextant_core::model::ServiceKey;

/// This node and the live members (their node ids), as the election's member list says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    me: String,
    members: Vec<String>,
}

impl Shard {
    /// `members` need not contain `me`: a node always counts itself (while its own record is
    /// missing — it lapsed, or is not written yet — it would rather probe a service twice
    /// than leave it unprobed).
    pub fn new(me: impl Into<String>, members: impl IntoIterator<Item = String>) -> Self {
        let me = me.into();
        let mut members: Vec<String> = members.into_iter().collect();
        members.push(me.clone());
        members.sort();
        members.dedup();
        Self { me, members }
    }

    /// The member that probes `service`.
    pub fn owner(&self, service: &ServiceKey) -> &str {
        self.members
            .iter()
            .max_by_key(|m| (weight(m, service), m.as_str()))
            .map_or(self.me.as_str(), String::as_str)
    }

    /// Whether this node probes `service`.
    pub fn owns(&self, service: &ServiceKey) -> bool {
        self.owner(service) == self.me
    }

    pub fn members(&self) -> &[String] {
        &self.members
    }
}

/// A stable 64-bit weight of (member, service): FNV-1a over both, finished with splitmix64's
/// mixer so that near-identical inputs spread. Stable across processes and builds (every node
/// must agree), unlike the standard library's hasher.
fn weight(member: &str, service: &ServiceKey) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let parts: [&[u8]; 5] = [
        member.as_bytes(),
        b"\x00",
        service.namespace.as_bytes(),
        b"\x00",
        service.service.as_bytes(),
    ];
    for part in parts {
        for b in part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(n: usize) -> Vec<ServiceKey> {
        (0..n)
            .map(|i| ServiceKey::new("ns", &format!("svc{i}")).unwrap())
            .collect()
    }

    #[test]
    fn every_node_agrees_on_one_owner_and_the_load_spreads() {
        let ids = ["a".to_string(), "b".to_string(), "c".to_string()];
        let views: Vec<Shard> = ids
            .iter()
            .map(|me| Shard::new(me.clone(), ids.to_vec()))
            .collect();
        let mut per_node = [0usize; 3];
        for s in services(3000) {
            let owners: Vec<usize> = (0..3).filter(|&i| views[i].owns(&s)).collect();
            assert_eq!(owners.len(), 1, "{s}: {owners:?}");
            per_node[owners[0]] += 1;
        }
        for n in per_node {
            assert!((800..1200).contains(&n), "{per_node:?}");
        }
    }

    #[test]
    fn a_leaving_member_moves_only_its_own_services() {
        let all = Shard::new("a", ["a", "b", "c"].map(String::from));
        let without_c = Shard::new("a", ["a", "b"].map(String::from));
        for s in services(1000) {
            let before = all.owner(&s);
            let after = without_c.owner(&s);
            if before != "c" {
                assert_eq!(before, after, "{s} moved although its owner stayed");
            } else {
                assert_ne!(after, "c");
            }
        }
        // A node missing from the list still counts itself.
        assert_eq!(Shard::new("z", Vec::new()).members(), ["z"]);
    }
}
