//! The store's own tests: the shared conformance suite, and what a crash at any point leaves.

use std::collections::BTreeMap;
use std::io::Write;

use proptest::prelude::*;
use sextant_core::store::{conformance, Mutation};

use super::*;

fn put(k: &str, v: &str) -> Mutation {
    Mutation {
        key: k.into(),
        value: Some(v.as_bytes().to_vec()),
    }
}

fn del(k: &str) -> Mutation {
    Mutation {
        key: k.into(),
        value: None,
    }
}

fn dump(s: &RedbStore) -> (Revision, BTreeMap<String, Vec<u8>>) {
    let mut out = BTreeMap::new();
    let rev = s
        .load(&mut |k, v| {
            out.insert(k.to_string(), v.to_vec());
            Ok(())
        })
        .unwrap();
    (rev, out)
}

/// Commits one batch and waits until it is acknowledged (durable).
async fn commit(s: &RedbStore, revision: Revision, mutations: Vec<Mutation>) {
    s.commit(Batch {
        revision,
        mutations,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Reopens the store in `dir` and reads everything back.
fn reopen(dir: &Path) -> (RedbStore, Revision, Vec<String>) {
    let s = RedbStore::open(dir).unwrap();
    let (rev, kv) = dump(&s);
    (s, rev, kv.into_keys().collect())
}

/// Ends the store as kill -9 would: no last checkpoint, the log left as it is.
fn crash(s: RedbStore) {
    if let Some(h) = s.begin_stop(Stop::Abandon) {
        h.join().unwrap();
    }
}

fn wal_files(dir: &Path) -> Vec<u64> {
    wal::segments(&dir.join("wal"))
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

/// Opens redb stores over one temp dir; a crash abandons the store without a checkpoint.
struct Harness {
    dir: tempfile::TempDir,
    last: Option<Arc<RedbStore>>,
}

#[async_trait::async_trait]
impl conformance::Harness for Harness {
    async fn open(&mut self) -> Arc<dyn Store> {
        self.last = None;
        let s = Arc::new(RedbStore::open(self.dir.path()).unwrap());
        self.last = Some(s.clone());
        s
    }

    async fn crash(&mut self, store: Arc<dyn Store>) {
        drop(store);
        let s = self.last.take().expect("a store to crash");
        crash(Arc::into_inner(s).expect("the suite holds no other handle"));
    }
}

#[tokio::test]
async fn conforms() {
    conformance::run(|| Harness {
        dir: tempfile::tempdir().unwrap(),
        last: None,
    })
    .await;
}

#[tokio::test]
async fn survives_reopen_and_locks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path()).unwrap();
    assert!(matches!(
        RedbStore::open(dir.path()),
        Err(StoreError::Unavailable(_))
    ));
    commit(&s, 9, vec![put("k", "v")]).await;
    s.close().await.unwrap();
    assert!(s.commit(Batch::default()).await.is_err());
    // A clean close checkpointed: the log is empty (one fresh segment after reopening).
    let s = RedbStore::open(dir.path()).unwrap();
    assert_eq!(wal_files(dir.path()).len(), 1);
    let (rev, kv) = dump(&s);
    assert_eq!((rev, kv.len()), (9, 1));
    assert_eq!(kv["k"], b"v");
}

#[tokio::test]
async fn a_crash_before_any_checkpoint_loses_no_acknowledged_batch() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path()).unwrap();
    for i in 1..=50u64 {
        let mut m = vec![
            put(&format!("k{i}"), &format!("v{i}")),
            put("svc", &i.to_string()),
        ];
        if i % 10 == 0 {
            m.push(del(&format!("k{}", i - 1)));
        }
        s.commit(Batch {
            revision: i,
            mutations: m,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    crash(s);
    assert!(!wal_files(dir.path()).is_empty());
    let s = RedbStore::open(dir.path()).unwrap();
    let (rev, kv) = dump(&s);
    assert_eq!(rev, 50);
    assert_eq!(kv.len(), 50 - 5 + 1);
    assert_eq!(kv["svc"], b"50");
    assert!(!kv.contains_key("k9") && kv.contains_key("k10"));
    // The replay was folded into redb and its segments deleted.
    assert_eq!(wal_files(dir.path()).len(), 1);
}

#[tokio::test]
async fn a_partial_last_record_is_dropped_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path()).unwrap();
    commit(&s, 1, vec![put("a", "1")]).await;
    crash(s);
    // What a crash mid-append leaves: the start of a record that was never acknowledged.
    let newest = *wal_files(dir.path()).last().unwrap();
    let torn = wal::encode(&Batch {
        revision: 2,
        mutations: vec![put("b", "2")],
        ..Default::default()
    })
    .unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(wal::segment_path(&dir.path().join("wal"), newest))
        .unwrap()
        .write_all(&torn[..torn.len() - 3])
        .unwrap();
    let (s, rev, keys) = reopen(dir.path());
    assert_eq!((rev, keys), (1, vec!["a".to_string()]));
    commit(&s, 2, vec![put("c", "3")]).await;
    crash(s);
    let (_s, rev, keys) = reopen(dir.path());
    assert_eq!((rev, keys), (2, vec!["a".to_string(), "c".to_string()]));
}

#[tokio::test]
async fn damage_before_the_newest_segment_is_refused_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path()).unwrap();
    commit(&s, 1, vec![put("a", "1")]).await;
    crash(s);
    let wal_dir = dir.path().join("wal");
    let first = wal_files(dir.path())[0];
    let path = wal::segment_path(&wal_dir, first);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    // A newer segment behind it: the damaged one is not a cut-short tail.
    std::fs::write(
        wal::segment_path(&wal_dir, first + 1),
        wal::encode(&Batch {
            revision: 2,
            mutations: vec![put("b", "2")],
            ..Default::default()
        })
        .unwrap(),
    )
    .unwrap();
    match RedbStore::open(dir.path()) {
        Err(StoreError::Corrupt { key, reason }) => {
            assert!(key.ends_with(".wal"), "{key}");
            assert!(reason.contains("not the newest"), "{reason}");
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("expected Corrupt, got a store"),
    }
}

#[tokio::test]
async fn checkpoints_delete_covered_segments_and_later_batches_still_replay() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path()).unwrap();
    commit(&s, 1, vec![put("a", "1"), put("b", "1")]).await;
    s.inner().unwrap().checkpoint_now().unwrap();
    let after_first = wal_files(dir.path());
    assert_eq!(after_first.len(), 1, "{after_first:?}");
    commit(&s, 2, vec![del("a"), put("b", "2")]).await;
    crash(s);
    let s = RedbStore::open(dir.path()).unwrap();
    let (rev, kv) = dump(&s);
    assert_eq!(rev, 2);
    assert_eq!(
        kv.into_iter().collect::<Vec<_>>(),
        vec![("b".into(), b"2".to_vec())]
    );
}

#[derive(Debug, Clone)]
enum Step {
    Commit(Vec<(u8, Option<u8>)>),
    Checkpoint,
    Crash,
    Close,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => proptest::collection::vec((0u8..12, proptest::option::of(any::<u8>())), 0..6)
            .prop_map(Step::Commit),
        1 => Just(Step::Checkpoint),
        1 => Just(Step::Crash),
        1 => Just(Step::Close),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Whatever mix of commits, checkpoints, crashes and clean closes, reopening yields exactly
    /// the acknowledged batches applied in order, at the last acknowledged revision.
    #[test]
    fn reopening_yields_every_acknowledged_batch(steps in proptest::collection::vec(step(), 1..30)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut rev = 0;
        let mut s = RedbStore::open(dir.path()).unwrap();
        for st in steps {
            match st {
                Step::Commit(ms) => {
                    rev += 1;
                    let mutations: Vec<Mutation> = ms
                        .iter()
                        .map(|(k, v)| Mutation { key: format!("k{k}"), value: v.map(|v| vec![v]) })
                        .collect();
                    for m in &mutations {
                        match &m.value {
                            Some(v) => { model.insert(m.key.clone(), v.clone()); }
                            None => { model.remove(&m.key); }
                        }
                    }
                    rt.block_on(s.commit(Batch { revision: rev, mutations, ..Default::default() })).unwrap();
                }
                Step::Checkpoint => s.inner().unwrap().checkpoint_now().unwrap(),
                Step::Crash | Step::Close => {
                    if matches!(st, Step::Crash) {
                        crash(s);
                    } else {
                        rt.block_on(s.close()).unwrap();
                    }
                    s = RedbStore::open(dir.path()).unwrap();
                    let (got_rev, got) = dump(&s);
                    prop_assert_eq!(got_rev, rev);
                    prop_assert_eq!(&got, &model);
                }
            }
        }
        crash(s);
        let s = RedbStore::open(dir.path()).unwrap();
        let (got_rev, got) = dump(&s);
        prop_assert_eq!(got_rev, rev);
        prop_assert_eq!(&got, &model);
    }
}

/// A registry whose runtime goes away without a shutdown still ends its writer thread, which
/// closes the store: the data dir can be opened again (redb's lock is released).
#[test]
fn a_registry_dropped_with_its_runtime_releases_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir.path()).unwrap());
    let registry = rt
        .block_on(sextant_core::Registry::open(
            store,
            sextant_core::CoreConfig::default(),
            sextant_core::CoreMetrics::default(),
        ))
        .unwrap();
    drop(rt);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match RedbStore::open(dir.path()) {
            Ok(_) => break,
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("the store was not released: {e}"),
        }
    }
    drop(registry);
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

/// A full disk: commits are refused (StorageFull) and readiness says why; the checkpoint that
/// hit the full disk leaves redb refusing every transaction until reopened. Once the disk grows,
/// checkpoints resume with no restart (redb reopened, the log folded and its segments deleted),
/// writes are taken again, and every acknowledged batch is there after a final reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn checkpoints_resume_after_a_full_disk_is_grown() {
    let Some(fs) = sextant_testkit::Tmpfs::mount("8m") else {
        return;
    };
    let data = fs.path().join("data");
    let metrics = StoreMetrics::default();
    let s = RedbStore::open_with_metrics(&data, metrics.clone()).unwrap();
    let value = vec![7u8; 64 * 1024];
    let mut model = BTreeMap::new();
    let mut rev = 0;
    // Fill the disk: everything goes to the log (a checkpoint comes only once a second), so the
    // first checkpoint after this finds no room in redb.
    let refused = loop {
        let key = format!("k{:05}", rev + 1);
        let batch = Batch {
            revision: rev + 1,
            mutations: vec![Mutation {
                key: key.clone(),
                value: Some(value.clone()),
            }],
            ..Default::default()
        };
        match s.commit(batch).await {
            Ok(()) => {
                rev += 1;
                model.insert(key, value.clone());
            }
            Err(e) => break e,
        }
        assert!(rev < 1000, "an 8 MiB disk never filled");
    };
    assert_eq!(
        refused.io_kind(),
        Some(std::io::ErrorKind::StorageFull),
        "{refused}"
    );
    assert!(
        s.write_outage().is_some(),
        "readiness must say the disk is full"
    );
    // The first failed checkpoint is the full disk itself; the second is where redb, not
    // reopened, would answer "Previous I/O error occurred" forever.
    wait_for("two failed checkpoints", Duration::from_secs(10), || {
        metrics.checkpoint_failures.get() >= 2
    });
    assert!(s
        .commit(Batch {
            revision: rev + 1,
            mutations: vec![put("x", "y")],
            ..Default::default()
        })
        .await
        .is_err());
    let done_before = metrics.checkpoints.get();

    fs.resize("64m");
    let resumed = wait_for(
        "a checkpoint after growing the disk",
        Duration::from_secs(15),
        || metrics.checkpoints.get() > done_before,
    );
    wait_for(
        "the log folded and its segments deleted",
        Duration::from_secs(15),
        || metrics.wal_bytes.get() == 0 && wal_files(&data).len() == 1,
    );
    let ready = wait_for("readiness back", Duration::from_secs(10), || {
        s.write_outage().is_none()
    });
    eprintln!(
        "checkpoint resumed {resumed:?} after the disk grew; ready {ready:?} later; {} reopens, {} failed checkpoints",
        metrics.reopens.get(),
        metrics.checkpoint_failures.get()
    );
    assert!(metrics.reopens.get() >= 1);
    for _ in 0..20 {
        rev += 1;
        let key = format!("k{rev:05}");
        commit(
            &s,
            rev,
            vec![Mutation {
                key: key.clone(),
                value: Some(value.clone()),
            }],
        )
        .await;
        model.insert(key, value.clone());
    }
    s.close().await.unwrap();
    drop(s);
    let s = RedbStore::open(&data).unwrap();
    let (got_rev, got) = dump(&s);
    assert_eq!(got_rev, rev);
    assert!(got == model, "{} keys, want {}", got.len(), model.len());
    drop(s);
}

fn segment_bytes(first_rev: Revision, keys: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        out.extend(
            wal::encode(&Batch {
                revision: first_rev + i as Revision,
                mutations: vec![put(&format!("k{k}"), &format!("v{i}"))],
                ..Default::default()
            })
            .unwrap(),
        );
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Garbage after the valid records of the newest segment (a torn tail) is dropped and the
    /// records before it recovered; the same garbage in a segment with a newer one behind it is
    /// refused as Corrupt instead of skipping acknowledged batches.
    #[test]
    fn garbage_is_a_torn_tail_only_in_the_newest_segment(
        older in proptest::collection::vec(0u8..8, 0..5),
        newer in proptest::collection::vec(0u8..8, 0..5),
        garbage in proptest::collection::vec(any::<u8>(), 1..200),
    ) {
        let n_older = older.len() as Revision;
        // Newest segment torn: everything before the garbage comes back.
        let dir = tempfile::tempdir().unwrap();
        let wal_dir = dir.path().join("wal");
        std::fs::create_dir_all(&wal_dir).unwrap();
        std::fs::write(wal::segment_path(&wal_dir, 1), segment_bytes(1, &older)).unwrap();
        let mut torn = segment_bytes(n_older + 1, &newer);
        torn.extend(&garbage);
        std::fs::write(wal::segment_path(&wal_dir, 2), torn).unwrap();
        let s = RedbStore::open(dir.path()).unwrap();
        let (rev, kv) = dump(&s);
        let mut want = BTreeMap::new();
        for (i, k) in older.iter().chain(&newer).enumerate() {
            let v = if (i as Revision) < n_older { i } else { i - older.len() };
            want.insert(format!("k{k}"), format!("v{v}").into_bytes());
        }
        prop_assert_eq!(rev, n_older + newer.len() as Revision);
        prop_assert_eq!(&kv, &want);
        drop(s);

        // The same garbage in the older segment: refused.
        let dir = tempfile::tempdir().unwrap();
        let wal_dir = dir.path().join("wal");
        std::fs::create_dir_all(&wal_dir).unwrap();
        let mut bad = segment_bytes(1, &older);
        bad.extend(&garbage);
        std::fs::write(wal::segment_path(&wal_dir, 1), bad).unwrap();
        std::fs::write(wal::segment_path(&wal_dir, 2), segment_bytes(n_older + 1, &newer)).unwrap();
        match RedbStore::open(dir.path()) {
            Err(StoreError::Corrupt { .. }) => {}
            Err(e) => prop_assert!(false, "expected Corrupt, got {}", e),
            Ok(_) => prop_assert!(false, "expected Corrupt, got a store"),
        }
    }
}

/// An OS error reaches the caller whole: its kind and the `io::Error` as the source.
#[test]
fn os_errors_keep_their_kind_and_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let Err(err) = RedbStore::open(&file.join("data")) else {
        panic!("a data dir under a file opened");
    };
    assert_eq!(
        err.io_kind(),
        Some(std::io::ErrorKind::NotADirectory),
        "{err}"
    );
    let source = std::error::Error::source(&err).expect("the io::Error as source");
    assert!(source.downcast_ref::<std::io::Error>().is_some());
}
