//! Unit and property tests of the core's invariants, against the in-memory store.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use sextant_model::*;

use crate::*;

fn svc(name: &str) -> ServiceKey {
    ServiceKey::new("ns", name).unwrap()
}

/// A plain instance spec (shared with the other modules' tests).
pub(crate) fn spec(id: &str) -> InstanceSpec {
    InstanceSpec {
        id: id.into(),
        host: "10.0.0.1".into(),
        port: 80,
        protocol: "http".into(),
        version: "1".into(),
        location: Location::default(),
        cell: Default::default(),
        lane: Default::default(),
        metadata: Default::default(),
    }
}

fn reg(service: &str, id: &str, ttl: u32) -> Registration {
    Registration {
        service: svc(service),
        spec: spec(id),
        status: None,
        ttl_seconds: ttl,
    }
}

async fn open_with(store: Arc<dyn Store>, config: CoreConfig) -> Registry {
    Registry::open(store, config, CoreMetrics::default())
        .await
        .unwrap()
}

fn threshold(t: f32) -> ServiceConfig {
    ServiceConfig {
        protect_threshold: t,
        ..Default::default()
    }
}

fn check(kind: CheckKind) -> HealthCheck {
    HealthCheck {
        kind,
        ..HealthCheck::default()
    }
}

async fn configure(r: &Registry, service: &str, config: ServiceConfig) {
    r.configure(svc(service), config).await.unwrap();
}

async fn open() -> Registry {
    open_with(Arc::new(MemStore::new()), CoreConfig::default()).await
}

/// For tests on a runtime with paused time: the writer runs on that runtime, so the clock only
/// advances when the writer, too, is idle.
fn paused() -> CoreConfig {
    CoreConfig {
        writer_thread: false,
        ..CoreConfig::default()
    }
}

fn kinds(d: &Delivery) -> Vec<(&'static str, Revision)> {
    d.events
        .iter()
        .map(|e| (e.event.kind.name(), e.event.revision))
        .collect()
}

#[tokio::test]
async fn revisions_strictly_increase_under_concurrency() {
    let r = open().await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..50 {
                revs.push(
                    r.register(reg("a", &format!("i-{t}-{i}"), 0))
                        .await
                        .unwrap(),
                );
            }
            revs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let revs = t.await.unwrap();
        assert!(revs.windows(2).all(|w| w[0] < w[1]), "per-caller order");
        all.extend(revs);
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 400, "every change has its own revision");
    assert_eq!(r.revision(), 400);
    assert_eq!(r.get(&svc("a"), false).revision, 400);
}

#[tokio::test]
async fn status_change_emits_only_a_status_event() {
    let r = open().await;
    let mut sub = r.subscribe(vec![svc("a")], None);
    assert!(sub.next().await.unwrap().snapshots.len() == 1);
    r.register(reg("a", "x", 0)).await.unwrap();
    let patch = StatusPatch {
        health: Some(Health::Unhealthy),
        ..Default::default()
    };
    r.update_status(svc("a"), "x".into(), patch).await.unwrap();
    // Same status again: no change, no event, same revision.
    let again = r.update_status(svc("a"), "x".into(), patch).await.unwrap();
    assert_eq!(again, 2);
    // Re-registering the identical spec keeps the status and emits nothing.
    assert_eq!(r.register(reg("a", "x", 0)).await.unwrap(), 2);
    // Re-registering with only a new status emits a status event.
    let mut with_status = reg("a", "x", 0);
    with_status.status = Some(InstanceStatus {
        weight: 5,
        ..Default::default()
    });
    r.register(with_status).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        got.extend(kinds(&sub.next().await.unwrap()));
    }
    assert_eq!(got, vec![("upsert", 1), ("status", 2), ("status", 3)]);
    let view = r.get(&svc("a"), false);
    assert_eq!(view.instances[0].spec_revision, 1);
    assert_eq!(view.instances[0].status_revision, 3);
}

#[tokio::test]
async fn missing_instances_are_not_found() {
    let r = open().await;
    assert!(matches!(
        r.deregister(svc("a"), "nope".into()).await,
        Err(CoreError::NotFound(_))
    ));
    let patch = StatusPatch {
        enabled: Some(false),
        ..Default::default()
    };
    assert!(matches!(
        r.update_status(svc("a"), "nope".into(), patch).await,
        Err(CoreError::NotFound(_))
    ));
    let mut bad = reg("a", "x", 0);
    bad.spec.port = 0;
    match r.register(bad).await {
        Err(CoreError::Invalid(f)) => assert_eq!(f.field, "port"),
        other => panic!("expected invalid port, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn lease_expiry_removes_and_notifies() {
    let r = open_with(Arc::new(MemStore::new()), paused()).await;
    r.register(reg("a", "eph", 2)).await.unwrap();
    r.register(reg("a", "kept", 2)).await.unwrap();
    let mut sub = r.subscribe(vec![svc("a")], None);
    sub.next().await.unwrap();
    // Keep one alive with heartbeats, let the other lapse.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            r.heartbeat(&[(svc("a"), "kept".into())]),
            vec![HeartbeatResult::Renewed]
        );
    }
    let d = sub.next().await.unwrap();
    match &d.events[0].event.kind {
        EventKind::Delete { id, reason } => {
            assert_eq!(id, "eph");
            assert_eq!(*reason, DeleteReason::LeaseExpired);
        }
        other => panic!("expected delete, got {other:?}"),
    }
    let ids: Vec<_> = r
        .get(&svc("a"), false)
        .instances
        .iter()
        .map(|i| i.spec.id.clone())
        .collect();
    assert_eq!(ids, vec!["kept"]);
    assert_eq!(
        r.heartbeat(&[(svc("a"), "eph".into())]),
        vec![HeartbeatResult::Unknown]
    );
}

#[tokio::test(start_paused = true)]
async fn restart_reloads_everything_and_gives_leases_a_fresh_grace() {
    let store = Arc::new(MemStore::new());
    let r = open_with(store.clone(), paused()).await;
    r.register(reg("a", "p", 0)).await.unwrap();
    r.register(reg("a", "e", 3)).await.unwrap();
    configure(&r, "a", threshold(0.5)).await;
    r.update_status(
        svc("a"),
        "p".into(),
        StatusPatch {
            weight: Some(7),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    r.shutdown("test restart").await;
    assert!(r.register(reg("a", "late", 0)).await.is_err());

    // Long after the old lease would have lapsed.
    tokio::time::sleep(Duration::from_secs(60)).await;
    store.reopen();
    let r2 = open_with(store, paused()).await;
    assert_eq!(r2.revision(), 4);
    let v = r2.get(&svc("a"), false);
    assert_eq!(v.instances.len(), 2, "ephemeral instance survives restart");
    assert_eq!(v.config.protect_threshold, 0.5);
    assert_eq!(
        v.instances
            .iter()
            .find(|i| i.spec.id == "p")
            .unwrap()
            .status
            .weight,
        7
    );
    assert_eq!(r2.register(reg("a", "next", 0)).await.unwrap(), 5);
    // Without heartbeats it lapses one TTL after start-up.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(r2.get(&svc("a"), false).instances.len(), 2);
    assert!(r2
        .get(&svc("a"), false)
        .instances
        .iter()
        .all(|i| i.spec.id != "e"));
}

#[tokio::test]
async fn failed_commit_is_neither_acknowledged_nor_published() {
    let store = Arc::new(MemStore::new());
    let r = open_with(store.clone(), CoreConfig::default()).await;
    r.register(reg("a", "x", 0)).await.unwrap();
    store.set_failing(true);
    // The caller learns what the disk said (a full disk stays a full disk).
    match r.register(reg("a", "y", 0)).await {
        Err(CoreError::Store(e)) => {
            assert_eq!(e.io_kind(), Some(std::io::ErrorKind::StorageFull), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.get(&svc("a"), false).instances.len(), 1);
    assert_eq!(r.revision(), 1);
    store.set_failing(false);
    assert_eq!(r.register(reg("a", "y", 0)).await.unwrap(), 2);
}

#[tokio::test]
async fn protection_threshold_keeps_the_full_list() {
    let r = open().await;
    for i in 0..4 {
        r.register(reg("a", &format!("i{i}"), 0)).await.unwrap();
    }
    r.configure(svc("a"), threshold(0.6)).await.unwrap();
    let down = StatusPatch {
        health: Some(Health::Unhealthy),
        ..Default::default()
    };
    r.update_status(svc("a"), "i0".into(), down).await.unwrap();
    let v = r.get(&svc("a"), true);
    assert!(!v.protected);
    assert_eq!(v.instances.len(), 3);
    r.update_status(svc("a"), "i1".into(), down).await.unwrap();
    let v = r.get(&svc("a"), true);
    assert!(v.protected, "2 of 4 serving is below 0.6");
    assert_eq!(v.instances.len(), 4);
}

#[tokio::test]
async fn blocking_query_wakes_on_change() {
    let r = open().await;
    let rev = r.register(reg("a", "x", 0)).await.unwrap();
    let r2 = r.clone();
    let waiter = tokio::spawn(async move {
        r2.get_when_changed(&svc("a"), rev, Duration::from_secs(10), false)
            .await
    });
    // The change must come after the waiter parked, or this tests nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while r.waiting_on(&svc("a")) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the waiter never parked"
        );
        tokio::task::yield_now().await;
    }
    let rev2 = r.register(reg("a", "y", 0)).await.unwrap();
    let v = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.revision, rev2);
    // Times out when nothing changes.
    let v = r
        .get_when_changed(&svc("a"), rev2, Duration::from_millis(20), false)
        .await;
    assert_eq!(v.revision, rev2);
}

#[tokio::test]
async fn slow_subscriber_is_resynced_not_buffered() {
    let r = open_with(
        Arc::new(MemStore::new()),
        CoreConfig {
            event_log_per_service: 4,
            ..Default::default()
        },
    )
    .await;
    let mut sub = r.subscribe(vec![svc("a")], None);
    sub.next().await.unwrap();
    for i in 0..10 {
        r.register(reg("a", &format!("i{i}"), 0)).await.unwrap();
    }
    let d = sub.next().await.unwrap();
    assert!(d.events.is_empty());
    assert_eq!(d.snapshots.len(), 1);
    assert!(d.snapshots[0].resync);
    assert_eq!(d.snapshots[0].view.instances.len(), 10);
    assert_eq!(d.revision, 10);
}

#[tokio::test]
async fn shutdown_closes_subscriptions_with_a_reason() {
    let r = open().await;
    let mut sub = r.subscribe(vec![svc("a")], None);
    sub.next().await.unwrap();
    let r2 = r.clone();
    tokio::spawn(async move { r2.shutdown("server shutting down").await });
    let err = sub.next().await.unwrap_err();
    assert_eq!(err.reason, "server shutting down");
}

#[derive(Debug, Clone)]
enum TestOp {
    Register(u8, u8, u8),
    Status(u8, u8, u8),
    Deregister(u8, u8),
}

fn test_op() -> impl Strategy<Value = TestOp> {
    prop_oneof![
        (0..3u8, 0..4u8, 0..3u8).prop_map(|(s, i, v)| TestOp::Register(s, i, v)),
        (0..3u8, 0..4u8, 0..3u8).prop_map(|(s, i, w)| TestOp::Status(s, i, w)),
        (0..3u8, 0..4u8).prop_map(|(s, i)| TestOp::Deregister(s, i)),
    ]
}

/// A change as the write that made it reported it: the event it must have produced.
#[derive(Debug, Clone, PartialEq)]
struct Change {
    revision: Revision,
    service: ServiceKey,
    kind: &'static str,
    id: String,
}

impl Change {
    fn of(e: &Event) -> Self {
        let id = match &e.kind {
            EventKind::Upsert(i) => i.spec.id.to_string(),
            EventKind::Status { id, .. } | EventKind::Delete { id, .. } => id.clone(),
        };
        Change {
            revision: e.revision,
            service: e.service.clone(),
            kind: e.kind.name(),
            id,
        }
    }
}

/// Runs `ops` one by one and returns the changes they made, built only from what each write
/// returned: a revision past every earlier one is a change (the next revision, no gap), any
/// other is an unchanged answer. `head` is the last revision handed out so far.
async fn run_ops(
    r: &Registry,
    ops: &[TestOp],
    head: &mut Revision,
) -> Result<Vec<Change>, TestCaseError> {
    let mut changes = Vec::new();
    for op in ops {
        let (service, id, kind, result) = match *op {
            TestOp::Register(s, i, v) => {
                let mut rg = reg(&format!("s{s}"), &format!("i{i}"), 0);
                rg.spec.version = v.to_string().into();
                // No status given: a change is always a new or changed spec.
                (s, i, "upsert", r.register(rg).await)
            }
            TestOp::Status(s, i, w) => {
                let patch = StatusPatch {
                    weight: Some(u32::from(w)),
                    ..Default::default()
                };
                let result = r
                    .update_status(svc(&format!("s{s}")), format!("i{i}"), patch)
                    .await;
                (s, i, "status", result)
            }
            TestOp::Deregister(s, i) => {
                let result = r.deregister(svc(&format!("s{s}")), format!("i{i}")).await;
                (s, i, "delete", result)
            }
        };
        match result {
            Ok(rev) if rev > *head => {
                prop_assert_eq!(rev, *head + 1, "a change takes the next revision");
                *head = rev;
                changes.push(Change {
                    revision: rev,
                    service: svc(&format!("s{service}")),
                    kind,
                    id: format!("i{id}"),
                });
            }
            Ok(rev) => prop_assert!(rev > 0, "an unchanged answer names an existing revision"),
            Err(CoreError::NotFound(_)) => prop_assert!(kind != "upsert"),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
    Ok(changes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A subscriber that resumes from any retained revision sees exactly the events it missed,
    /// in order; one that resumes from a compacted revision gets a snapshot of the service.
    /// What it should see is built from what the writes returned, not from a subscription.
    #[test]
    fn resume_is_exact(ops in proptest::collection::vec(test_op(), 1..60), cap in 2usize..40) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let r = open_with(
                Arc::new(MemStore::new()),
                CoreConfig { event_log_per_service: cap, ..Default::default() },
            ).await;
            let services = vec![svc("s0"), svc("s1")];
            // Held from the start, so the services stay in memory with their logs even while
            // they are empty.
            let _keep = r.subscribe(services.clone(), None);
            let mut head = 0;
            let history: Vec<Change> = run_ops(&r, &ops, &mut head)
                .await?
                .into_iter()
                .filter(|c| services.contains(&c.service))
                .collect();
            prop_assert_eq!(r.revision(), head);
            for since in 0..=head {
                let mut sub = r.subscribe(services.clone(), Some(since));
                let d = sub.next().await.unwrap();
                prop_assert_eq!(d.revision, head);
                let got: Vec<Change> = d.events.iter().map(|e| Change::of(&e.event)).collect();
                let snap: Vec<&ServiceKey> = d.snapshots.iter().map(|s| &s.view.service).collect();
                let expected: Vec<Change> = history
                    .iter()
                    .filter(|c| c.revision > since && !snap.contains(&&c.service))
                    .cloned()
                    .collect();
                prop_assert_eq!(got, expected);
                // Exactly the services whose log no longer reaches back to `since` are resent
                // whole: those with an evicted event (more than `cap`) after it.
                let compacted = |k: &ServiceKey| {
                    let evs: Vec<&Change> = history.iter().filter(|c| &c.service == k).collect();
                    evs.len().checked_sub(cap + 1).map_or(0, |i| evs[i].revision)
                };
                let resent: Vec<&ServiceKey> = services.iter().filter(|k| since < compacted(k)).collect();
                prop_assert_eq!(&snap, &resent);
                for s in &d.snapshots {
                    prop_assert!(s.resync);
                    prop_assert_eq!(s.view.instances.len(), r.get(&s.view.service, false).instances.len());
                }
            }
            Ok(())
        })?;
    }

    /// Revisions handed to callers strictly increase with no gap, whatever the mix of
    /// operations, and a subscriber sees exactly those changes in that order.
    #[test]
    fn revisions_increase(ops in proptest::collection::vec(test_op(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let r = open().await;
            let mut sub = r.subscribe(vec![svc("s0"), svc("s1"), svc("s2")], None);
            sub.next().await.unwrap();
            let mut head = 0;
            let changes = run_ops(&r, &ops, &mut head).await?;
            prop_assert_eq!(r.revision(), head);
            let mut seen = Vec::new();
            let mut delivered = 0;
            while delivered < head {
                let d = sub.next().await.unwrap();
                prop_assert!(d.snapshots.is_empty());
                seen.extend(d.events.iter().map(|e| Change::of(&e.event)));
                delivered = d.revision;
            }
            prop_assert_eq!(seen, changes);
            Ok(())
        })?;
    }
}

#[tokio::test(start_paused = true)]
async fn identical_reregistration_renews_the_lease() {
    let r = open_with(Arc::new(MemStore::new()), paused()).await;
    r.register(reg("a", "e", 2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Changes nothing (same revision) but pushes the deadline.
    assert_eq!(r.register(reg("a", "e", 2)).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(r.get(&svc("a"), false).instances.len(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(r.get(&svc("a"), false).instances.len(), 0);
    // Re-registering as persistent drops the lease for good.
    r.register(reg("a", "p", 2)).await.unwrap();
    r.register(reg("a", "p", 0)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(r.get(&svc("a"), false).instances.len(), 1);
}

#[tokio::test]
async fn drain_leaves_results_and_registration_brings_it_back() {
    let r = open().await;
    r.register(reg("a", "x", 0)).await.unwrap();
    r.register(reg("a", "y", 0)).await.unwrap();
    let set_override = StatusPatch {
        weight_override: Some(Some(3)),
        ..Default::default()
    };
    r.update_status(svc("a"), "x".into(), set_override)
        .await
        .unwrap();
    let mut sub = r.subscribe(vec![svc("a")], None);
    sub.next().await.unwrap();
    let drain = StatusPatch {
        draining: Some(true),
        ..Default::default()
    };
    let rev = r.update_status(svc("a"), "x".into(), drain).await.unwrap();
    let d = sub.next().await.unwrap();
    assert_eq!(kinds(&d), vec![("status", rev)]);
    let healthy = r.get(&svc("a"), true);
    assert_eq!(
        healthy.instances.len(),
        1,
        "draining instance leaves discovery"
    );
    let all = r.get(&svc("a"), false);
    let x = all.instances.iter().find(|i| i.spec.id == "x").unwrap();
    assert!(x.status.draining_since_ms.is_some());
    // A new registration (the restarted instance) ends the drain; the override stays.
    r.register(reg("a", "x", 0)).await.unwrap();
    let x = r
        .get(&svc("a"), true)
        .instances
        .into_iter()
        .find(|i| i.spec.id == "x")
        .unwrap();
    assert!(!x.status.is_draining());
    assert_eq!(x.status.effective_weight(), 3);
}

#[tokio::test]
async fn point_lookups_read_the_published_state() {
    let r = open().await;
    assert!(r.instance(&svc("a"), "i1").is_none());
    assert_eq!(r.service_config(&svc("a")), ServiceConfig::default());
    assert_eq!(r.service_revision(&svc("a")), 0);
    r.register(reg("a", "i1", 0)).await.unwrap();
    let rev = r.register(reg("a", "i2", 0)).await.unwrap();
    assert_eq!(r.service_revision(&svc("a")), rev);
    assert_eq!(r.instance(&svc("a"), "i2").unwrap().spec.id, "i2");
    let found = r
        .find_instance(&svc("a"), |i| i.spec.id.ends_with('2'))
        .unwrap();
    assert_eq!(found.spec.id, "i2");
    assert!(r.find_instance(&svc("a"), |_| false).is_none());
    let config = threshold(0.5);
    r.configure(svc("a"), config.clone()).await.unwrap();
    assert_eq!(r.service_config(&svc("a")), config);
}

/// Registers and deregisters the only instance of `a` while a watcher is away; returns the
/// revision the watcher had seen.
async fn empty_a_behind_a_watchers_back(r: &Registry) -> Revision {
    let mut sub = r.subscribe(vec![svc("a")], None);
    sub.next().await.unwrap();
    let rev = r.register(reg("a", "x", 0)).await.unwrap();
    assert_eq!(sub.next().await.unwrap().revision, rev);
    drop(sub);
    r.deregister(svc("a"), "x".into()).await.unwrap();
    rev
}

#[tokio::test]
async fn a_service_that_left_memory_is_resent_whole_to_a_watcher_that_missed_its_end() {
    let r = open_with(
        Arc::new(MemStore::new()),
        CoreConfig {
            vacant_retention: Duration::ZERO,
            ..Default::default()
        },
    )
    .await;
    let rev = empty_a_behind_a_watchers_back(&r).await;
    // Emptied and watched by nobody, it left memory.
    assert_eq!(r.service_entries(), 0);
    // Resuming from before the delete cannot be answered from a log that is gone: a snapshot
    // (empty) replaces it, rather than nothing, which would leave `x` in the watcher's cache.
    let mut sub = r.subscribe(vec![svc("a")], Some(rev));
    let d = sub.next().await.unwrap();
    assert!(d.events.is_empty());
    assert_eq!(d.snapshots.len(), 1);
    assert!(d.snapshots[0].resync);
    assert!(d.snapshots[0].view.instances.is_empty());
}

#[tokio::test]
async fn a_service_a_write_emptied_keeps_its_log_a_while_for_watchers_that_resume() {
    let r = open().await;
    let rev = empty_a_behind_a_watchers_back(&r).await;
    assert_eq!(r.service_entries(), 1, "kept for vacant_retention");
    let mut sub = r.subscribe(vec![svc("a")], Some(rev));
    let d = sub.next().await.unwrap();
    assert!(d.snapshots.is_empty());
    assert_eq!(kinds(&d), [("delete", rev + 1)]);
}

#[tokio::test]
async fn a_service_emptied_loses_its_record_and_stays_gone_after_a_restart() {
    let store = Arc::new(MemStore::new());
    let r = open_with(store.clone(), CoreConfig::default()).await;
    r.register(reg("a", "x", 0)).await.unwrap();
    r.register(reg("b", "y", 0)).await.unwrap();
    r.deregister(svc("a"), "x".into()).await.unwrap();
    r.shutdown("restart").await;
    store.reopen();
    // b's spec, status and service record; nothing of a.
    assert_eq!(store.len(), 3);
    let r = open_with(store, CoreConfig::default()).await;
    assert_eq!(r.service_entries(), 1);
    assert_eq!(r.services("ns").len(), 1);
}

#[tokio::test]
async fn a_default_check_never_replaces_a_check_or_other_settings() {
    let r = open().await;
    let tcp = check(CheckKind::Tcp);
    // No check yet: it gets the default one, and keeps its protection threshold.
    configure(&r, "a", threshold(0.5)).await;
    let rev = r.default_check(svc("a"), tcp.clone()).await.unwrap();
    assert!(rev > 0);
    let c = r.service_config(&svc("a"));
    assert_eq!(c.check.kind, CheckKind::Tcp);
    assert_eq!(c.protect_threshold, 0.5);
    // A check set natively stays, whatever the caller read before.
    let http = check(CheckKind::Http);
    configure(
        &r,
        "b",
        ServiceConfig {
            check: http.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(r.default_check(svc("b"), tcp).await.unwrap(), 0);
    assert_eq!(r.service_config(&svc("b")).check, http);
}

/// Cluster roles over one shared store with a feed (the in-memory one): the leader's writes
/// reach a follower's subscribers as the same events at the same revisions (a delete with its
/// reason), a follower refuses writes naming the leader, and a promoted follower continues the
/// revision sequence.
#[tokio::test]
async fn a_follower_applies_the_leaders_feed_and_takes_over() {
    let store = Arc::new(MemStore::new());
    let leader = open_with(store.clone(), CoreConfig::default()).await;
    let follower = open_with(store.clone(), CoreConfig::default()).await;
    follower.follow(Some("http://leader:1".into()));
    assert_eq!(leader.lead(0, 0).await.unwrap(), 0);
    assert_eq!(leader.role(), Role::Leader);

    let err = follower.register(reg("a", "x", 0)).await.unwrap_err();
    assert!(matches!(err, CoreError::NotLeader(_)), "{err}");
    assert!(err.to_string().contains("http://leader:1"), "{err}");
    assert!(follower.writable().is_err());
    assert_eq!(
        follower.heartbeat(&[(svc("a"), "x".into())]),
        vec![HeartbeatResult::Unknown],
        "a follower renews nothing"
    );

    let mut on_leader = leader.subscribe(vec![svc("a")], Some(0));
    let mut on_follower = follower.subscribe(vec![svc("a")], Some(0));
    let r1 = leader.register(reg("a", "x", 30)).await.unwrap();
    let r2 = leader.register(reg("a", "y", 0)).await.unwrap();
    let r3 = leader
        .update_status(
            svc("a"),
            "y".into(),
            StatusPatch {
                enabled: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let r4 = leader.deregister(svc("a"), "x".into()).await.unwrap();
    let want = vec![
        ("upsert", r1),
        ("upsert", r2),
        ("status", r3),
        ("delete", r4),
    ];
    for (name, sub) in [("leader", &mut on_leader), ("follower", &mut on_follower)] {
        let mut got = Vec::new();
        while got.len() < want.len() {
            let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .unwrap_or_else(|_| panic!("{name}: no delivery"))
                .unwrap();
            got.extend(kinds(&d));
        }
        assert_eq!(got, want, "{name}");
    }
    let on_f = follower.get(&svc("a"), false);
    let on_l = leader.get(&svc("a"), false);
    assert_eq!(on_f.revision, on_l.revision);
    assert_eq!(on_f.instances, on_l.instances);
    assert_eq!(follower.revision(), r4);

    // The leader goes; the follower is promoted at the store's head and writes go on.
    leader.shutdown("test").await;
    store.reopen();
    // A dead leader's unfinished batch may have used r4 + 1 and r4 + 2: revisions go on above.
    assert_eq!(follower.lead(r4, r4 + 2).await.unwrap(), r4 + 2);
    let r5 = follower.register(reg("a", "z", 0)).await.unwrap();
    assert_eq!(r5, r4 + 3);
}

/// A follower whose feed position is older than the store's history resyncs with a full load
/// and its subscribers get snapshots, not a gap; then it follows the feed again.
#[tokio::test]
async fn a_follower_behind_compaction_resyncs_with_snapshots() {
    let store = Arc::new(MemStore::new());
    let leader = open_with(store.clone(), CoreConfig::default()).await;
    let follower = open_with(store.clone(), CoreConfig::default()).await;
    let mut sub = follower.subscribe(vec![svc("a")], Some(0));
    leader.lead(0, 0).await.unwrap();
    // More batches than the in-memory store keeps for its feed, before the follower asks.
    let mut last = 0;
    for i in 0..1100 {
        last = leader
            .register(reg("a", &format!("i{i}"), 0))
            .await
            .unwrap();
    }
    follower.follow(None);
    let mut got = None;
    for _ in 0..10 {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        if !d.snapshots.is_empty() {
            got = Some(d);
            break;
        }
        assert!(d.events.is_empty(), "events across a compacted gap");
    }
    let d = got.expect("a snapshot");
    assert_eq!(d.snapshots[0].view.instances.len(), 1100);
    assert_eq!(d.revision, last);
    let next = leader.register(reg("a", "after", 0)).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kinds(&d), vec![("upsert", next)]);
}

/// A shared store that applies each batch and then loses the answer (as etcd may, when a
/// member fails after committing).
struct LosesAnswers(Arc<MemStore>);

#[async_trait::async_trait]
impl Store for LosesAnswers {
    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.0.commit(batch).await?;
        Err(StoreError::Unavailable("the answer was lost".into()))
    }
    fn load(&self, visit: &mut crate::store::Visit<'_>) -> Result<Revision, StoreError> {
        self.0.load(visit)
    }
    async fn close(&self) -> Result<(), StoreError> {
        self.0.close().await
    }
    async fn committed_revision(&self) -> Option<Result<Revision, StoreError>> {
        self.0.committed_revision().await
    }
    fn watch_from(&self, revision: Revision) -> Option<Feed> {
        self.0.watch_from(revision)
    }
}

/// A leader whose commit failed asks the shared store whether it applied the batch anyway, and
/// if so publishes and acknowledges it, so it never differs from its followers (which get the
/// batch from the feed) or reuses its revision.
#[tokio::test]
async fn a_leader_acknowledges_a_batch_the_store_applied_but_whose_answer_was_lost() {
    let mem = Arc::new(MemStore::new());
    let leader = open_with(Arc::new(LosesAnswers(mem.clone())), CoreConfig::default()).await;
    let follower = open_with(mem.clone(), CoreConfig::default()).await;
    follower.follow(None);
    leader.lead(0, 0).await.unwrap();
    let r1 = leader.register(reg("a", "x", 0)).await.unwrap();
    let r2 = leader.register(reg("a", "y", 0)).await.unwrap();
    assert_eq!((r1, r2), (1, 2));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while follower.revision() < r2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        follower.get(&svc("a"), false).instances,
        leader.get(&svc("a"), false).instances
    );
}

mod acl {
    //! Tokens and policies through the writer, their check, restarts and the audit log.

    use sextant_model::acl::{Policy, Resource, Right, Rule};

    use super::*;

    fn cfg() -> CoreConfig {
        CoreConfig {
            auth: true,
            audit_retention: 3,
            ..CoreConfig::default()
        }
    }

    #[tokio::test]
    async fn bootstrap_once_check_revoke_and_survive_a_restart() {
        let store = Arc::new(MemStore::new());
        let r = open_with(store.clone(), cfg()).await;
        let acl = r.acl();
        assert!(matches!(
            acl.authenticate(None),
            Err(AuthError::Unauthenticated(_))
        ));
        let admin = acl.bootstrap().await.unwrap();
        let again = acl.bootstrap().await.unwrap_err();
        assert_eq!(again.kind(), ErrorKind::Conflict, "{again}");
        let who = acl
            .check(Some(&admin.secret), None, Right::Admin, &Resource::Global)
            .unwrap();
        assert_eq!(who.token_id(), Some(admin.token.id.as_str()));

        acl.put_policy(Policy {
            name: "prod-rw".into(),
            description: String::new(),
            rules: vec![Rule {
                namespace: "prod".into(),
                service_prefix: None,
                rights: vec![Right::Read, Right::Write],
                instance_ids: None,
            }],
        })
        .await
        .unwrap();
        let bad = acl
            .create_token("x", vec!["nope".into()], vec![])
            .await
            .unwrap_err();
        assert_eq!(bad.kind(), ErrorKind::Invalid);
        let app = acl
            .create_token("app", vec!["prod-rw".into()], vec![])
            .await
            .unwrap();
        let s = Some(app.secret.as_str());
        assert!(acl
            .check(s, None, Right::Read, &Resource::Namespace("prod"))
            .is_ok());
        let denied = acl
            .check(s, None, Right::Read, &Resource::Namespace("dev"))
            .unwrap_err();
        assert!(matches!(denied, AuthError::Denied(_)), "{denied}");
        assert!(denied.to_string().contains("read"), "{denied}");
        assert!(denied.to_string().contains("dev"), "{denied}");
        let in_use = acl.delete_policy("prod-rw").await.unwrap_err();
        assert_eq!(in_use.kind(), ErrorKind::Conflict);

        // A client certificate's name bound to a token authenticates as it without the
        // secret; an unbound name does not, a secret still decides, a name binds once.
        let cert = acl
            .create_token(
                "orders",
                vec!["prod-rw".into()],
                vec!["orders-client".into()],
            )
            .await
            .unwrap();
        let peer = crate::TlsPeer("orders-client".into());
        let by_cert = acl.authenticate_peer(None, Some(&peer)).unwrap();
        assert_eq!(by_cert.token_id(), Some(cert.token.id.as_str()));
        assert!(by_cert
            .authorize(Right::Write, &Resource::Namespace("prod"))
            .is_ok());
        let stranger = crate::TlsPeer("stranger".into());
        let e = acl.authenticate_peer(None, Some(&stranger)).unwrap_err();
        assert!(e.to_string().contains("stranger"), "{e}");
        let by_secret = acl.authenticate_peer(s, Some(&peer)).unwrap();
        assert_eq!(by_secret.token_id(), Some(app.token.id.as_str()));
        let twice = acl
            .create_token(
                "again",
                vec!["prod-rw".into()],
                vec!["orders-client".into()],
            )
            .await
            .unwrap_err();
        assert_eq!(twice.kind(), ErrorKind::Conflict);

        // Writes made for a token are audited with its id; the oldest entries go past the
        // retention.
        let who = acl.authenticate(s).unwrap();
        r.acting(who.actor("10.1.1.1:5000", "test"))
            .register(Registration {
                service: ServiceKey::new("prod", "orders").unwrap(),
                ..reg("x", "a:1", 0)
            })
            .await
            .unwrap();
        let log = acl.audit(Some("prod"), 0, 100);
        assert_eq!(log.len(), 1, "{log:?}");
        assert_eq!(log[0].token_id.as_deref(), Some(app.token.id.as_str()));
        assert_eq!(log[0].source, "10.1.1.1:5000");
        assert!(
            log[0].change.contains("register prod/orders/a:1"),
            "{log:?}"
        );
        assert_eq!(acl.audit(None, 0, 100).len(), 3);

        let changes = acl.changes();
        acl.revoke_token(&app.token.id).await.unwrap();
        assert!(changes.has_changed().unwrap());
        assert!(!acl.is_current(&who));
        assert!(matches!(
            acl.authenticate(s),
            Err(AuthError::Unauthenticated(_))
        ));

        r.shutdown("test").await;
        store.reopen();
        let r = open_with(store.clone(), cfg()).await;
        let acl = r.acl();
        assert!(acl.bootstrapped());
        assert!(acl
            .check(Some(&admin.secret), None, Right::Admin, &Resource::Global)
            .is_ok());
        assert!(acl.authenticate(s).is_err());
        assert_eq!(
            acl.bootstrap().await.unwrap_err().kind(),
            ErrorKind::Conflict
        );
        let log = acl.audit(None, 0, 100);
        assert_eq!(log.len(), 3, "{log:?}");
        assert!(log[2].change.contains("revoke"), "{log:?}");
        r.shutdown("test").await;
    }
}

/// A shared store that can be told to be unreachable: commits then fail and `write_outage`
/// says why (as the etcd store in an outage does).
#[derive(Default)]
struct OutageStore {
    inner: MemStore,
    outage: parking_lot::Mutex<Option<String>>,
}

impl OutageStore {
    fn set(&self, outage: Option<&str>) {
        *self.outage.lock() = outage.map(String::from);
    }
}

#[async_trait::async_trait]
impl Store for OutageStore {
    async fn commit(&self, batch: store::Batch) -> Result<(), StoreError> {
        if let Some(m) = self.outage.lock().clone() {
            return Err(StoreError::Unavailable(m));
        }
        self.inner.commit(batch).await
    }

    fn load(&self, visit: &mut store::Visit<'_>) -> Result<Revision, StoreError> {
        self.inner.load(visit)
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.inner.close().await
    }

    fn write_outage(&self) -> Option<String> {
        self.outage.lock().clone()
    }

    fn watch_from(&self, revision: Revision) -> Option<store::Feed> {
        self.inner.watch_from(revision)
    }
}

/// A store outage expires nothing however long it lasts, and every lease gets a fresh TTL when
/// it ends (not a mass expiry of the leases that lapsed meanwhile); a follower in the outage
/// holds: it renews heartbeats from memory and refuses writes naming the store's outage.
#[tokio::test(start_paused = true)]
async fn an_outage_expires_nothing_and_ends_with_fresh_leases() {
    let store = Arc::new(OutageStore::default());
    let r = open_with(store.clone(), paused()).await;
    r.register(reg("a", "eph", 2)).await.unwrap();
    store.set(Some("etcd is unreachable at http://x:2379"));
    // Five TTLs without a heartbeat: nothing expires.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(r.get(&svc("a"), false).instances.len(), 1);
    assert_eq!(r.metrics().lease_expiries.get(), 0);
    let err = r.register(reg("a", "new", 0)).await.unwrap_err();
    assert!(err.to_string().contains("etcd is unreachable"), "{err}");
    // The store returns: a fresh TTL from then, not an expiry at the next sweep...
    store.set(None);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        r.get(&svc("a"), false).instances.len(),
        1,
        "expired at once"
    );
    // ...and without heartbeats it lapses one TTL later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(r.get(&svc("a"), false).instances.len(), 0);
    assert_eq!(r.metrics().lease_expiries.get(), 1);

    // A follower in an outage holds.
    r.register(reg("a", "e2", 2)).await.unwrap();
    r.follow(None);
    let hb = [(svc("a"), "e2".to_string()), (svc("a"), "nope".to_string())];
    assert_eq!(
        r.heartbeat(&hb),
        vec![HeartbeatResult::Unknown, HeartbeatResult::Unknown],
        "a follower renews nothing while the store is up"
    );
    assert!(r.renews_leases().is_err());
    store.set(Some("etcd is unreachable at http://x:2379"));
    assert!(r.renews_leases().is_ok());
    assert_eq!(
        r.heartbeat(&hb),
        vec![HeartbeatResult::Renewed, HeartbeatResult::Unknown]
    );
    match r.register(reg("a", "e3", 0)).await.unwrap_err() {
        CoreError::Store(StoreError::Unavailable(m)) => {
            assert!(m.contains("etcd is unreachable"), "{m}")
        }
        other => panic!("expected the store's outage, got {other:?}"),
    }
    r.follow(Some("http://leader:1".into()));
    assert!(matches!(
        r.register(reg("a", "e3", 0)).await.unwrap_err(),
        CoreError::NotLeader(Some(_))
    ));
}

/// A shared store whose feed to one registry is held back until `open` (a follower lagging
/// behind another node).
struct GatedFeed {
    inner: Arc<MemStore>,
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl Store for GatedFeed {
    async fn commit(&self, batch: store::Batch) -> Result<(), StoreError> {
        self.inner.commit(batch).await
    }

    fn load(&self, visit: &mut store::Visit<'_>) -> Result<Revision, StoreError> {
        self.inner.load(visit)
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.inner.close().await
    }

    fn watch_from(&self, revision: Revision) -> Option<store::Feed> {
        let mut from = self.inner.watch_from(revision)?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let gate = self.gate.clone();
        tokio::spawn(async move {
            let _open = gate.acquire().await;
            while let Some(c) = from.recv().await {
                if tx.send(c).await.is_err() {
                    return;
                }
            }
        });
        Some(rx)
    }
}

/// A watcher that moves to a follower which has not applied its resume point yet (another node
/// was ahead) gets exactly the changes after it once the follower catches up — not a snapshot
/// of the follower's older state, which would take it back in time and repeat changes.
#[tokio::test]
async fn a_resume_ahead_of_a_follower_waits_for_it_instead_of_going_back() {
    let mem = Arc::new(MemStore::new());
    let leader = open_with(mem.clone(), CoreConfig::default()).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let lagging = Arc::new(GatedFeed {
        inner: mem.clone(),
        gate: gate.clone(),
    });
    let follower = open_with(lagging, CoreConfig::default()).await;
    follower.follow(Some("http://leader:1".into()));
    leader.lead(0, 0).await.unwrap();
    let mut seen = 0;
    for i in 0..3 {
        seen = leader
            .register(reg("a", &format!("i{i}"), 0))
            .await
            .unwrap();
    }
    assert_eq!(follower.revision(), 0, "held back");
    // The watcher saw `seen` elsewhere and resumes here.
    let mut sub = follower.subscribe(vec![svc("a")], Some(seen));
    let next = tokio::spawn(async move {
        let d = sub.next().await.unwrap();
        (d.snapshots.len(), kinds(&d), d.revision)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.add_permits(1);
    let r = leader.register(reg("a", "after", 0)).await.unwrap();
    let (snapshots, events, at) = tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snapshots, 0, "a snapshot of an older state");
    // The follower may deliver its catch-up with the next change or alone (nothing after
    // `seen`: then the change comes next); either way nothing at or before `seen`.
    assert!(events.iter().all(|(_, rev)| *rev > seen), "{events:?}");
    assert!(at >= seen);
    assert!(
        events.is_empty() || events == vec![("upsert", r)],
        "{events:?}"
    );
}

/// A forwarder that hands a follower's calls straight to the leader's registry (in place of
/// the server's gRPC transport), going through the wire encoding both ways.
struct InProcess(Registry);

#[async_trait::async_trait]
impl crate::Forwarder for InProcess {
    async fn forward(
        &self,
        request: crate::forward::ForwardRequest,
    ) -> Result<Vec<Result<Revision, CoreError>>, CoreError> {
        use crate::forward::{decode, encode, ForwardReply, ForwardRequest, WireError};
        let request: ForwardRequest = decode(&encode(&request)).unwrap();
        let reply: ForwardReply = match self.0.apply_forwarded(request.ops, request.actor).await {
            Ok(r) => Ok(r
                .into_iter()
                .map(|r| r.map_err(|e| WireError::new(e.kind(), e.to_string())))
                .collect()),
            Err(e) => Err(WireError::new(e.kind(), e.to_string())),
        };
        let reply: ForwardReply = decode(&encode(&reply)).unwrap();
        Ok(reply
            .map_err(WireError::into_core)?
            .into_iter()
            .map(|r| r.map_err(WireError::into_core))
            .collect())
    }

    async fn renew(&self, keys: Vec<(ServiceKey, Arc<str>)>) -> Result<(), CoreError> {
        self.0.renew_forwarded(keys).map(|_| ())
    }
}

/// A follower with a forwarder: its writes are applied by the leader (errors keep their
/// kind), it reads its own writes at once, and its heartbeats keep the leader's leases alive
/// (in memory: no revision moves).
#[tokio::test]
async fn a_follower_forwards_writes_and_renewals_to_the_leader() {
    let store = Arc::new(MemStore::new());
    let config = CoreConfig {
        lease_check_interval: Duration::from_millis(50),
        ..CoreConfig::default()
    };
    let leader = open_with(store.clone(), config.clone()).await;
    let follower = open_with(store.clone(), config).await;
    follower.follow(Some("http://leader:1".into()));
    leader.lead(0, 0).await.unwrap();
    follower.forward_with(Arc::new(InProcess(leader.clone())));
    assert!(follower.writable().is_err(), "its own writer still refuses");
    assert!(follower.renews_leases().is_ok());

    let r = follower.register(reg("a", "x", 1)).await.unwrap();
    assert!(
        follower.instance(&svc("a"), "x").is_some(),
        "read your writes"
    );
    assert_eq!(follower.revision(), r);
    assert!(leader.instance(&svc("a"), "x").is_some());
    let err = follower
        .update_status(
            svc("a"),
            "nobody".into(),
            StatusPatch {
                enabled: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), crate::ErrorKind::NotFound, "{err}");

    // TTL 1 s, renewed only through the follower for 3 s: alive, and no revision moved.
    for _ in 0..12 {
        assert_eq!(
            follower.heartbeat(&[(svc("a"), "x".into()), (svc("a"), "none".into())]),
            vec![HeartbeatResult::Renewed, HeartbeatResult::Unknown]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        leader.instance(&svc("a"), "x").is_some(),
        "expired while renewed"
    );
    assert_eq!(leader.revision(), r);
    // Renewals stop: the leader expires it, and the follower learns it through the feed.
    for _ in 0..60 {
        if follower.instance(&svc("a"), "x").is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(leader.instance(&svc("a"), "x").is_none());
    assert_eq!(
        follower.heartbeat(&[(svc("a"), "x".into())]),
        vec![HeartbeatResult::Unknown]
    );
}
