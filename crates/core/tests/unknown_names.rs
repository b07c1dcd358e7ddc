//! Asking for names nobody registered must not grow memory: 100,000 blocking reads and
//! 100,000 watches of unknown services, then the entry count and the live heap come back down.
//!
//! The heap is measured with a counting global allocator (live bytes), which is exact for this
//! process, unlike RSS, which a C allocator does not hand back to the system promptly.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sextant_core::model::{InstanceSpec, Registration, ServiceKey};
use sextant_core::{CoreConfig, CoreMetrics, MemStore, Registry};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NAMES: usize = 100_000;
const MIB: isize = 1 << 20;

fn ghost(i: usize) -> ServiceKey {
    ServiceKey::new("prod", &format!("ghost-{i}")).unwrap()
}

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_do_not_stay_in_memory() {
    let r = Registry::open(
        Arc::new(MemStore::new()),
        CoreConfig::default(),
        CoreMetrics::default(),
    )
    .await
    .unwrap();
    // One real service, so "back down" means back to it, not to nothing.
    let reg = Registration {
        service: ServiceKey::new("prod", "orders").unwrap(),
        spec: InstanceSpec {
            id: "i1".into(),
            host: "10.0.0.1".into(),
            port: 80,
            protocol: "http".into(),
            version: "1".into(),
            location: Default::default(),
            cell: Default::default(),
            lane: Default::default(),
            metadata: Default::default(),
        },
        status: None,
        ttl_seconds: 0,
    };
    r.register(reg).await.unwrap();
    let keys: Vec<ServiceKey> = (0..NAMES).map(ghost).collect();
    let baseline = live();
    assert_eq!(r.service_entries(), 1);

    // Blocking reads, 1000 in flight at a time; each times out at once.
    for chunk in keys.chunks(1000) {
        let waits: Vec<_> = chunk
            .iter()
            .map(|k| {
                let r = r.clone();
                let k = k.clone();
                tokio::spawn(async move { r.get_when_changed(&k, 5, Duration::ZERO, false).await })
            })
            .collect();
        for w in waits {
            assert!(w.await.unwrap().instances.is_empty());
        }
    }
    assert_eq!(r.service_entries(), 1, "every blocking read's entry left");
    // A blocking read cancelled mid-wait (a client that hangs up) gives its entry back too.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(20),
        r.get_when_changed(&ghost(0), 5, Duration::from_secs(60), false),
    )
    .await;
    assert!(cancelled.is_err());
    assert_eq!(r.service_entries(), 1, "a cancelled read's entry left");

    // Watches: all held at once (memory really grows), then dropped.
    let subs: Vec<_> = keys
        .iter()
        .map(|k| r.subscribe(vec![k.clone()], None))
        .collect();
    assert_eq!(r.service_entries(), NAMES + 1);
    let held = live() - baseline;
    assert!(
        held > 20 * MIB,
        "100,000 watched names should take real memory, took {held} bytes"
    );
    drop(subs);
    assert_eq!(r.service_entries(), 1, "every watched name's entry left");
    // The names themselves (the test's own `keys`) are still held: what is left over the
    // baseline is what the registry kept.
    let after = live() - baseline;
    eprintln!("live heap over baseline: {held} bytes with {NAMES} watched names, {after} after");
    assert!(
        after < MIB,
        "live heap should come back down: {held} bytes while watched, {after} bytes left after"
    );
    // A name that comes back is a fresh, empty service, and listing never showed the ghosts.
    assert!(r.get(&ghost(7), false).instances.is_empty());
    assert_eq!(r.services("prod").len(), 1);
    drop(keys);
    r.shutdown("test over").await;
}
