//! The store conformance suite: what every [`Store`] backend must do, written once against the
//! trait and run by each backend's own tests (the in-memory store, redb, etcd).
//!
//! A backend supplies a [`Harness`] that opens a store over its own data (a temp dir, a key
//! prefix); [`run`] makes a fresh harness per case. Reopening is close, drop, open again over
//! the same data, so the cases that reopen test durability for a real backend (for the
//! in-memory store they only test that nothing is lost while the process lives). Panics with a
//! message naming the case and the difference on failure.

use std::sync::Arc;

use super::*;

/// How the suite reaches a backend.
#[async_trait::async_trait]
pub trait Harness: Send {
    /// Opens the store over this harness's data: empty the first time, then whatever the
    /// stores it opened before committed. The suite closes and drops the previous store first.
    async fn open(&mut self) -> Arc<dyn Store>;

    /// Ends `store` as a crash would (no clean close), when the backend can; by default a
    /// clean close. What was acknowledged before must survive either way.
    async fn crash(&mut self, store: Arc<dyn Store>) {
        store.close().await.expect("close");
    }

    /// The largest key plus value the backend takes in one mutation, when it has a limit
    /// (etcd: one request, 1.5 MiB by default); a larger one must be refused, writing nothing.
    fn max_mutation_bytes(&self) -> Option<usize> {
        None
    }
}

/// Runs every case, each against a fresh harness from `new`.
pub async fn run<H: Harness>(mut new: impl FnMut() -> H) {
    basic(&*new().open().await).await;
    load_is_in_byte_order_across_prefixes(&mut new()).await;
    deletes(&mut new()).await;
    batches_apply_in_order_and_whole(&mut new()).await;
    survives_reopen(&mut new()).await;
    large_values_and_keys(&mut new()).await;
    revision_fencing(&mut new()).await;
    large_batches_fence_whole_and_keep_the_last_write(&mut new()).await;
    closed_store_refuses_commits(&mut new()).await;
    change_feed(&mut new()).await;
}

fn put(k: &str, v: &[u8]) -> Mutation {
    Mutation {
        key: k.into(),
        value: Some(v.to_vec()),
    }
}

fn del(k: &str) -> Mutation {
    Mutation {
        key: k.into(),
        value: None,
    }
}

async fn commit(store: &dyn Store, revision: Revision, mutations: Vec<Mutation>) {
    store
        .commit(Batch {
            revision,
            mutations,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("commit at revision {revision} failed: {e}"));
}

fn dump(store: &dyn Store) -> (Revision, Vec<(String, Vec<u8>)>) {
    let mut out = Vec::new();
    let rev = store
        .load(&mut |k, v| {
            out.push((k.to_string(), v.to_vec()));
            Ok(())
        })
        .expect("load");
    (rev, out)
}

fn keys(store: &dyn Store) -> Vec<String> {
    dump(store).1.into_iter().map(|(k, _)| k).collect()
}

/// Closes `store` (it must be the harness's only live handle) and opens the same data again.
async fn reopen<H: Harness>(h: &mut H, store: Arc<dyn Store>) -> Arc<dyn Store> {
    store.close().await.expect("close");
    drop(store);
    h.open().await
}

/// An empty store loads nothing at revision 0; committed batches load back in key order
/// with their last revision; deletes remove; an empty batch still records its revision.
pub async fn basic(store: &dyn Store) {
    assert_eq!(dump(store), (0, vec![]));
    commit(
        store,
        3,
        vec![put("b", b"2"), put("a", b"1"), put("c", b"3")],
    )
    .await;
    commit(store, 5, vec![del("c"), put("a", b"one"), del("missing")]).await;
    let (rev, kv) = dump(store);
    assert_eq!(rev, 5);
    assert_eq!(
        kv,
        vec![("a".into(), b"one".to_vec()), ("b".into(), b"2".to_vec())]
    );
    commit(store, 6, vec![]).await;
    assert_eq!(dump(store).0, 6, "an empty batch records its revision");
}

/// The key shapes the core writes (`i/<ns>/<svc>/<id>/spec|status`, `s/<ns>/<svc>`) load in
/// byte order, whatever order and batches they were written in: a service whose name is a
/// prefix of another's, `-` (0x2d) before `/` (0x2f) before digits, non-ASCII after ASCII. The
/// trait has no prefix scan; the core's loader relies on this order to meet each service's
/// keys together.
pub async fn load_is_in_byte_order_across_prefixes<H: Harness>(h: &mut H) {
    let mut want: Vec<String> = [
        "i/ns/svc/10.0.0.1:80/spec",
        "i/ns/svc/10.0.0.1:80/status",
        "i/ns/svc/10.0.0.10:80/spec",
        "i/ns/svc/10.0.0.2:80/spec",
        "i/ns/svc-a/x/spec",
        "i/ns/svc.b/x/spec",
        "i/ns/svc0/x/spec",
        "i/ns/sv/x/spec",
        "i/ns2/svc/x/spec",
        "i/n/svc/x/spec",
        "i/ns/svc/é/spec",
        "i/ns/svc/Z/spec",
        "s/ns/svc",
        "s/ns/svc-a",
        "s/ns/svc/",
        "s/ns/sv",
        "s/ns2/svc",
        "s",
        "t",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let store = h.open().await;
    // Written in three batches, reversed and interleaved, so no backend gets them in order.
    let mut rev = 0;
    for part in 0..3 {
        rev += 1;
        let ms = want
            .iter()
            .rev()
            .enumerate()
            .filter(|(i, _)| i % 3 == part)
            .map(|(_, k)| put(k, k.as_bytes()))
            .collect();
        commit(&*store, rev, ms).await;
    }
    want.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    let (got_rev, kv) = dump(&*store);
    assert_eq!(got_rev, rev);
    assert_eq!(
        kv.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        want,
        "load must visit keys in byte order"
    );
    assert!(kv.iter().all(|(k, v)| k.as_bytes() == v.as_slice()));
    let store = reopen(h, store).await;
    assert_eq!(keys(&*store), want, "the same order after reopening");
}

/// A delete removes a key for good (also after reopening); deleting a missing key is not an
/// error; a key deleted and written again holds the new value; an empty value is a value, not
/// a delete.
pub async fn deletes<H: Harness>(h: &mut H) {
    let store = h.open().await;
    commit(
        &*store,
        1,
        vec![put("a", b"1"), put("b", b"1"), put("c", b"1")],
    )
    .await;
    commit(
        &*store,
        2,
        vec![del("b"), del("never-written"), put("e", b"")],
    )
    .await;
    commit(&*store, 3, vec![del("c")]).await;
    commit(&*store, 4, vec![put("c", b"again")]).await;
    commit(&*store, 5, vec![del("a")]).await;
    let want = vec![
        ("c".to_string(), b"again".to_vec()),
        ("e".to_string(), Vec::new()),
    ];
    assert_eq!(dump(&*store), (5, want.clone()));
    let store = reopen(h, store).await;
    assert_eq!(dump(&*store), (5, want), "deletes survive reopening");
    commit(&*store, 6, vec![del("c"), del("e")]).await;
    let store = reopen(h, store).await;
    assert_eq!(dump(&*store), (6, vec![]), "a store can be emptied");
}

/// Within a batch mutations apply in order (the last write of a key wins, put-then-delete
/// removes, delete-then-put keeps); a batch of many mutations commits whole and reads back
/// whole after a crash.
pub async fn batches_apply_in_order_and_whole<H: Harness>(h: &mut H) {
    let store = h.open().await;
    commit(
        &*store,
        1,
        vec![
            put("k", b"1"),
            put("k", b"2"),
            put("gone", b"x"),
            del("gone"),
            del("back"),
            put("back", b"y"),
        ],
    )
    .await;
    assert_eq!(
        dump(&*store).1,
        vec![
            ("back".to_string(), b"y".to_vec()),
            ("k".to_string(), b"2".to_vec())
        ]
    );
    const N: usize = 20_000;
    let many: Vec<Mutation> = (0..N)
        .map(|i| put(&format!("i/ns/svc/{i:06}/spec"), &i.to_le_bytes()))
        .collect();
    commit(&*store, 2, many).await;
    commit(&*store, 3, vec![del("k")]).await;
    h.crash(store).await;
    let store = h.open().await;
    let (rev, kv) = dump(&*store);
    assert_eq!((rev, kv.len()), (3, N + 1));
    assert_eq!(kv[0], ("back".to_string(), b"y".to_vec()));
    for (i, (k, v)) in kv[1..].iter().enumerate() {
        assert_eq!(k, &format!("i/ns/svc/{i:06}/spec"));
        assert_eq!(v.as_slice(), &i.to_le_bytes());
    }
}

/// What was committed survives close and reopen, more than once, with the revision of the last
/// committed batch; an empty store reopens empty at revision 0; commits after a reopen go on
/// from there.
pub async fn survives_reopen<H: Harness>(h: &mut H) {
    let store = h.open().await;
    let store = reopen(h, store).await;
    assert_eq!(dump(&*store), (0, vec![]), "an empty store reopens empty");
    commit(&*store, 7, vec![put("a", b"1")]).await;
    commit(&*store, 8, vec![put("b", b"2")]).await;
    let store = reopen(h, store).await;
    assert_eq!(dump(&*store).0, 8);
    commit(&*store, 9, vec![put("a", b"3")]).await;
    commit(&*store, 12, vec![]).await;
    let store = reopen(h, store).await;
    let store = reopen(h, store).await;
    assert_eq!(
        dump(&*store),
        (
            12,
            vec![
                ("a".to_string(), b"3".to_vec()),
                ("b".to_string(), b"2".to_vec())
            ]
        ),
        "the last batch's revision, even an empty batch's"
    );
    commit(&*store, 13, vec![put("c", b"4")]).await;
    h.crash(store).await;
    let store = h.open().await;
    assert_eq!(dump(&*store).0, 13, "acknowledged before a crash");
    assert_eq!(keys(&*store), ["a", "b", "c"]);
}

/// Values from empty to several MiB and long keys round-trip byte for byte, across a reopen;
/// a backend with a size limit ([`Harness::max_mutation_bytes`]) refuses the larger ones whole.
pub async fn large_values_and_keys<H: Harness>(h: &mut H) {
    let pattern = |n: usize, seed: u8| -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    let long_key = format!("i/ns/svc/{}/spec", "x".repeat(2000));
    let values = [
        ("empty", Vec::new()),
        ("one", vec![0u8]),
        ("page", pattern(4096, 1)),
        ("page+1", pattern(4097, 2)),
        ("mib", pattern(1 << 20, 3)),
        ("big", pattern(6 << 20, 4)),
        (long_key.as_str(), pattern(100, 5)),
    ];
    let limit = h.max_mutation_bytes().unwrap_or(usize::MAX);
    let fits = |k: &str, v: &[u8]| k.len() + v.len() <= limit;
    let store = h.open().await;
    let mut rev = 0;
    for (k, v) in &values {
        rev += 1;
        if fits(k, v) {
            commit(&*store, rev, vec![put(k, v)]).await;
        } else {
            let batch = Batch {
                revision: rev,
                mutations: vec![put("small", b"1"), put(k, v)],
                ..Default::default()
            };
            assert!(
                store.commit(batch).await.is_err(),
                "{} bytes under {k:.40} are over the backend's limit of {limit}: refused",
                k.len() + v.len()
            );
        }
    }
    let mut want: Vec<(String, Vec<u8>)> = values
        .iter()
        .filter(|(k, v)| fits(k, v))
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    want.sort();
    let check = |store: &dyn Store, want: &[(String, Vec<u8>)], when: &str| {
        let (_, kv) = dump(store);
        assert_eq!(kv.len(), want.len(), "{when}");
        for ((gk, gv), (wk, wv)) in kv.iter().zip(want) {
            assert_eq!(gk, wk, "{when}");
            assert!(
                gv == wv,
                "{when}: value of {wk:.40} differs ({} bytes, want {})",
                gv.len(),
                wv.len()
            );
        }
    };
    check(&*store, &want, "before reopening");
    // A large value overwritten by a small one leaves no trace of the old one.
    let largest = want
        .iter()
        .max_by_key(|(_, v)| v.len())
        .map(|(k, _)| k.clone())
        .expect("values");
    commit(&*store, 100, vec![put(&largest, b"small")]).await;
    let store = reopen(h, store).await;
    for w in &mut want {
        if w.0 == largest {
            w.1 = b"small".to_vec();
        }
    }
    check(&*store, &want, "after reopening");
}

/// A batch of hundreds of mutations (more than etcd's default 128 operations per transaction)
/// commits whole and keeps, for a key written several times far apart in it, the last write;
/// a stale batch of hundreds is fenced whole: none of its keys is written.
pub async fn large_batches_fence_whole_and_keep_the_last_write<H: Harness>(h: &mut H) {
    const N: usize = 300;
    let store = h.open().await;
    let mut ms = vec![put("dup", b"first"), del("back"), put("gone", b"x")];
    ms.extend((0..N).map(|i| put(&format!("k{i:04}"), format!("{i}").as_bytes())));
    ms.extend([put("dup", b"last"), put("back", b"y"), del("gone")]);
    commit(&*store, 5, ms).await;
    let stale = Batch {
        revision: 4,
        mutations: (0..N)
            .map(|i| put(&format!("a-stale{i:04}"), b"stale"))
            .chain([put("dup", b"stale"), put("z-stale", b"stale")])
            .collect(),
        ..Default::default()
    };
    match store.commit(stale).await {
        Err(StoreError::Fenced { revision, last }) => assert_eq!((revision, last), (4, 5)),
        other => panic!("a large stale batch must be fenced, got {other:?}"),
    }
    h.crash(store).await;
    let store = h.open().await;
    let (rev, kv) = dump(&*store);
    assert_eq!(rev, 5);
    assert_eq!(
        kv.len(),
        N + 2,
        "the large batch whole, nothing of the stale one"
    );
    assert_eq!(kv[0], ("back".to_string(), b"y".to_vec()));
    assert_eq!(kv[1], ("dup".to_string(), b"last".to_vec()));
    for (i, (k, v)) in kv[2..].iter().enumerate() {
        assert_eq!(
            (k.as_str(), v.as_slice()),
            (format!("k{i:04}").as_str(), format!("{i}").as_bytes())
        );
    }
}

/// Revisions never go backwards: the revision loaded after a reopen is the last committed
/// batch's; a batch below it is refused with [`StoreError::Fenced`] and changes nothing, before
/// and after a reopen; a batch at the same revision is accepted.
pub async fn revision_fencing<H: Harness>(h: &mut H) {
    let store = h.open().await;
    commit(&*store, 10, vec![put("a", b"1")]).await;
    let stale = Batch {
        revision: 9,
        mutations: vec![put("a", b"stale"), put("z", b"stale")],
        ..Default::default()
    };
    match store.commit(stale.clone()).await {
        Err(StoreError::Fenced { revision, last }) => assert_eq!((revision, last), (9, 10)),
        other => panic!("a batch below the last revision must be fenced, got {other:?}"),
    }
    commit(&*store, 10, vec![put("b", b"2")]).await;
    let store = reopen(h, store).await;
    assert_eq!(dump(&*store).0, 10);
    match store.commit(stale).await {
        Err(StoreError::Fenced { revision, last }) => assert_eq!((revision, last), (9, 10)),
        other => panic!("the fence must hold after reopening, got {other:?}"),
    }
    let (rev, kv) = dump(&*store);
    assert_eq!(rev, 10);
    assert_eq!(
        kv,
        vec![
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"2".to_vec())
        ],
        "a fenced batch wrote nothing"
    );
}

/// After `close`, a commit fails and writes nothing: a write the registry sends during or
/// after shutdown is never acknowledged as durable.
pub async fn closed_store_refuses_commits<H: Harness>(h: &mut H) {
    let store = h.open().await;
    commit(&*store, 1, vec![put("a", b"1")]).await;
    store.close().await.expect("close");
    let late = Batch {
        revision: 2,
        mutations: vec![put("b", b"late")],
        ..Default::default()
    };
    assert!(
        store.commit(late).await.is_err(),
        "a closed store must refuse commits"
    );
    drop(store);
    let store = h.open().await;
    assert_eq!(
        dump(&*store),
        (1, vec![("a".to_string(), b"1".to_vec())]),
        "a refused commit wrote nothing"
    );
}

/// The next change of a feed, within a bound.
async fn next_change(feed: &mut Feed) -> Change {
    match tokio::time::timeout(std::time::Duration::from_secs(10), feed.recv()).await {
        Ok(Some(Ok(c))) => c,
        Ok(Some(Err(e))) => panic!("the feed failed: {e}"),
        Ok(None) => panic!("the feed ended"),
        Err(_) => panic!("no change within 10 s"),
    }
}

fn sorted(mut m: Vec<Mutation>) -> Vec<Mutation> {
    m.sort_by(|a, b| a.key.cmp(&b.key));
    m
}

/// A store with a feed (cluster mode) delivers every batch committed after the revision it is
/// asked from, in order, whole (a batch split for the backend's limits arrives as one change),
/// with its revision, mutations and journal; a feed from a delivered revision gets exactly
/// what followed it. A store without a feed (`watch_from` is `None`) passes trivially.
/// (Deletes of keys that do not exist may be left out of a change, so none is made here.)
pub async fn change_feed<H: Harness>(h: &mut H) {
    let store = h.open().await;
    let r0 = dump(&*store).0;
    let Some(mut feed) = store.watch_from(r0) else {
        return;
    };
    let b1 = Batch {
        revision: r0 + 1,
        mutations: vec![put("b", b"2"), put("a", b"1")],
        journal: b"first".to_vec(),
    };
    let b2 = Batch {
        revision: r0 + 3,
        mutations: vec![del("a"), put("c", b"3")],
        journal: Vec::new(),
    };
    store.commit(b1.clone()).await.expect("commit 1");
    store.commit(b2.clone()).await.expect("commit 2");
    let c1 = next_change(&mut feed).await;
    assert_eq!(c1.revision, b1.revision);
    assert_eq!(sorted(c1.mutations.clone()), sorted(b1.mutations));
    assert_eq!(c1.journal, b1.journal);
    let c2 = next_change(&mut feed).await;
    assert_eq!(c2.revision, b2.revision);
    assert_eq!(sorted(c2.mutations.clone()), sorted(b2.mutations.clone()));
    assert!(c2.journal.is_empty());

    let mut again = store.watch_from(c1.revision).expect("a second feed");
    assert_eq!(
        next_change(&mut again).await,
        c2,
        "resumed after the first batch"
    );

    // Larger than etcd's 128 operations per transaction: still one change.
    let many: Vec<Mutation> = (0..300).map(|i| put(&format!("m/{i:03}"), b"x")).collect();
    store
        .commit(Batch {
            revision: r0 + 4,
            mutations: many.clone(),
            journal: b"big".to_vec(),
        })
        .await
        .expect("commit 3");
    for f in [&mut feed, &mut again] {
        let c = next_change(f).await;
        assert_eq!(c.revision, r0 + 4);
        assert_eq!(sorted(c.mutations), sorted(many.clone()));
        assert_eq!(c.journal, b"big");
    }
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(300), feed.recv()).await;
    assert!(quiet.is_err(), "nothing more: {quiet:?}");
}
