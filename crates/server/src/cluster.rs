//! Cluster mode (`store = etcd`): joins this node to the cluster on its etcd prefix, turns the
//! election's outcome into the registry's role (leader: takes writes once caught up; follower:
//! applies the store's feed and forwards writes and renewals to the leader — `peer.rs` — or,
//! when it cannot, refuses them naming the leader), and answers `/v1/cluster`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sextant_core::model::Revision;
use sextant_core::{Registry, Role};
use sextant_health::Shard;
use sextant_store_etcd::cluster::{Election, Member, Status};
use sextant_store_etcd::EtcdStore;

use crate::peer::PeerForwarder;

/// What `/v1/cluster` and the election task need of a cluster node.
pub(crate) struct Cluster {
    pub store: Arc<EtcdStore>,
    pub node_id: String,
    /// The cluster's shared secret (peer calls carry it).
    pub secret: String,
    /// How this node forwards while it follows; `None`: it refuses writes instead.
    pub forwarder: Option<Arc<PeerForwarder>>,
}

/// The host other nodes reach this node at: as configured (`advertise_host`), or the HTTP
/// address's IP, or the machine's name when it listens on every address.
pub(crate) fn advertised_host(configured: &str, http: SocketAddr) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    if http.ip().is_unspecified() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into())
    } else {
        http.ip().to_string()
    }
}

/// This node's id: as configured, or `{advertised host}-{http port}-{grpc port}`.
pub(crate) fn node_id(configured: &str, host: &str, http: SocketAddr, grpc: SocketAddr) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    format!("{host}-{}-{}", http.port(), grpc.port())
}

/// The addresses a member record names: `http://{host}:{port}` (`https://` with TLS on) and
/// `{host}:{port}` (IPv6 literals in brackets).
pub(crate) fn member_addresses(
    host: &str,
    http: SocketAddr,
    grpc: SocketAddr,
    tls: bool,
) -> (String, String) {
    let scheme = if tls { "https" } else { "http" };
    let host = match host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{host}]"),
        Err(_) => host.to_string(),
    };
    (
        format!("{scheme}://{host}:{}", http.port()),
        format!("{host}:{}", grpc.port()),
    )
}

/// Joins the cluster and keeps the registry's role in step with the election, until the
/// registry closes. Returns once this node's first role is settled (it leads, or it knows the
/// leader), or after `wait`, so the node starts serving in a known role.
pub(crate) async fn join(
    cluster: &Cluster,
    registry: &Registry,
    (http, grpc): (String, String),
    lease: Duration,
    wait: Duration,
) {
    registry.follow(None);
    let node = Member {
        node_id: cluster.node_id.clone(),
        http,
        grpc,
        role: String::new(),
        revision: 0,
        head: 0,
        updated_ms: 0,
    };
    let r = registry.clone();
    let status: Status = Arc::new(move || (r.role().name().to_string(), r.revision()));
    let mut election = cluster.store.join(node, lease, status);
    let reg = registry.clone();
    let forwarder = cluster.forwarder.clone();
    tokio::spawn(async move {
        loop {
            let outcome = election.borrow_and_update().clone();
            if let Some(f) = &forwarder {
                match &outcome {
                    Election::Follower { leader } => f.set_leader(leader.as_ref()),
                    _ => f.set_leader(None),
                }
            }
            // Acts on the outcome, then waits; a newer outcome interrupts it (a catch-up that
            // has not finished when this node loses again is given up).
            let act = async {
                match outcome {
                    Election::Unknown => {}
                    Election::Leader { head, floor } => match reg.lead(head, floor).await {
                        Ok(from) => tracing::info!(revision = from, "this node leads the cluster"),
                        Err(e) => tracing::warn!(error = %e, "could not take the lead"),
                    },
                    Election::Follower { leader } => {
                        let addr = leader.map(|l| format!("{} (node {})", l.http, l.node_id));
                        tracing::info!(leader = addr.as_deref().unwrap_or("none"), "following");
                        reg.follow(addr);
                    }
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                _ = act => {}
                r = election.changed() => if r.is_err() { return },
                _ = reg.closed() => return,
            }
        }
    });
    let mut roles = registry.role_changes();
    let settled = tokio::time::timeout(
        wait,
        roles.wait_for(|r| matches!(r, Role::Leader | Role::Follower { leader: Some(_) })),
    )
    .await;
    if settled.is_err() {
        tracing::warn!(
            ?wait,
            "no leader known yet; serving reads, refusing writes until one is elected"
        );
    }
}

/// The health scanner's shard: this node and the live members, re-read every `period` until
/// the registry closes. A member that dies leaves the list when its lease lapses, so its
/// services are probed elsewhere within about the lease + `period` + the scanner's reconcile.
pub(crate) fn shard(
    cluster: &Cluster,
    registry: &Registry,
    period: Duration,
) -> tokio::sync::watch::Receiver<Shard> {
    let me = cluster.node_id.clone();
    let (tx, rx) = tokio::sync::watch::channel(Shard::new(me.clone(), Vec::new()));
    let store = cluster.store.clone();
    let reg = registry.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = reg.closed() => return,
            }
            match store.members().await {
                Ok(members) => {
                    let next = Shard::new(me.clone(), members.into_iter().map(|m| m.node_id));
                    tx.send_if_modified(|cur| {
                        if *cur == next {
                            return false;
                        }
                        tracing::info!(members = ?next.members(), "health checks spread over the members");
                        *cur = next;
                        true
                    });
                }
                // The last known members keep their services meanwhile.
                Err(e) => tracing::debug!(error = %e, "cannot read the cluster's members"),
            }
        }
    });
    rx
}

#[derive(Serialize)]
pub(crate) struct MemberView {
    node_id: String,
    http: String,
    grpc: String,
    role: String,
    /// Revision applied at its last renewal.
    revision: Revision,
    /// How far that was behind the store's head, which it read just before (the same number
    /// as its `sextant_cluster_replication_lag_revisions`).
    lag: Revision,
    /// Milliseconds since its last renewal (by this node's clock).
    last_seen_ms: u64,
}

/// `/v1/cluster`: this node, the members with their lag, the store's health.
pub(crate) async fn view(
    cluster: Option<&Cluster>,
    registry: &Registry,
    store_kind: &str,
    outage: Option<String>,
) -> serde_json::Value {
    let role = registry.role();
    let leader = match &role {
        Role::Follower { leader } => leader.clone(),
        _ => None,
    };
    let Some(c) = cluster else {
        return serde_json::json!({
            "node_id": "",
            "role": role.name(),
            "revision": registry.revision(),
            "leader": leader,
            "members": [],
            "store": {"kind": store_kind, "healthy": outage.is_none(), "error": outage},
        });
    };
    let now = sextant_core::model::now_ms();
    // In an outage the answer is this node's own view, at once (not after etcd's timeouts).
    let (head, members, error) = match outage {
        Some(o) => (None, Vec::new(), Some(o)),
        None => match (c.store.head().await, c.store.members().await) {
            (Ok(h), Ok(m)) => (Some(h), m, None),
            (Err(e), _) | (_, Err(e)) => (None, Vec::new(), Some(e.to_string())),
        },
    };
    let members: Vec<MemberView> = members
        .into_iter()
        .map(|m| MemberView {
            lag: m.head.saturating_sub(m.revision),
            last_seen_ms: now.saturating_sub(m.updated_ms),
            node_id: m.node_id,
            http: m.http,
            grpc: m.grpc,
            role: m.role,
            revision: m.revision,
        })
        .collect();
    serde_json::json!({
        "node_id": c.node_id,
        "role": role.name(),
        "revision": registry.revision(),
        "leader": leader,
        "members": members,
        "store": {
            "kind": store_kind,
            "head": head,
            "healthy": error.is_none(),
            "error": error,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_come_from_the_addresses_unless_set() {
        let h: SocketAddr = "127.0.0.1:8470".parse().unwrap();
        let g: SocketAddr = "127.0.0.1:8471".parse().unwrap();
        let host = advertised_host("", h);
        assert_eq!(node_id("", &host, h, g), "127.0.0.1-8470-8471");
        assert_eq!(node_id("n1", &host, h, g), "n1");
        let any: SocketAddr = "0.0.0.0:8470".parse().unwrap();
        let host = advertised_host("", any);
        assert!(!host.is_empty() && host != "0.0.0.0");
        assert!(node_id("", &host, any, g).ends_with("-8470-8471"));
        assert_eq!(advertised_host("sextant-1.prod", any), "sextant-1.prod");
    }

    #[test]
    fn member_addresses_use_the_advertised_host() {
        let h: SocketAddr = "0.0.0.0:8470".parse().unwrap();
        let g: SocketAddr = "0.0.0.0:8471".parse().unwrap();
        assert_eq!(
            member_addresses("10.1.2.3", h, g, false),
            ("http://10.1.2.3:8470".into(), "10.1.2.3:8471".into())
        );
        assert_eq!(
            member_addresses("::1", h, g, true),
            ("https://[::1]:8470".into(), "[::1]:8471".into())
        );
    }
}
