//! The embedded store: Sextant's default, durable backend — a write-ahead log in front of a
//! [redb] file.
//!
//! A commit is acknowledged once its batch is appended to the current WAL segment and
//! `fdatasync`ed (`wal`): one sequential write per group commit. A checkpointer thread folds the
//! acknowledged batches into redb in one durable transaction about once a second (sooner when
//! the log grows past [`CHECKPOINT_BYTES`]), records there the last segment it covered, and
//! deletes the covered segments. Opening the store replays what a crash left in the log, so
//! every acknowledged batch survives kill -9; the register path pays one small append instead of
//! a redb commit that rewrites B-tree pages all over the file, and redb sees each hot key (a
//! service's record, rewritten on every change) once per checkpoint instead of once per commit.
//!
//! A checkpoint that fails (a full disk) keeps the log and retries. redb refuses every
//! transaction after an I/O error until the database is reopened, so a failed checkpoint closes
//! redb and the next one opens it again (`sextant_store_reopens`): checkpoints resume once the
//! disk takes writes, with no restart. While appends fail, [`Store::write_outage`] says why, for
//! `/readyz`; the checkpointer probes the disk so that it clears without waiting for a write.
//!
//! redb holds an exclusive lock on its file, so two servers cannot open the same data
//! directory (and its log).
#![forbid(unsafe_code)]

mod wal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sextant_core::model::Revision;
use sextant_core::store::{Batch, Store, StoreError, Visit};

use wal::{AppendError, Segment};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
/// The newest WAL segment whose batches are all in redb.
const WAL_CHECKPOINTED: &str = "wal_checkpointed";
const CACHE_BYTES: usize = 64 * 1024 * 1024;
/// How often the checkpointer folds the log into redb.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// A log this large is checkpointed without waiting for the interval.
pub const CHECKPOINT_BYTES: usize = 16 << 20;
/// Commits are refused while this much is waiting for a checkpoint that keeps failing, rather
/// than holding an unbounded backlog in memory.
const MAX_BACKLOG_BYTES: usize = 1 << 30;
/// What the disk probe writes while appends fail: about a group commit's worth.
const PROBE_BYTES: usize = 64 * 1024;

/// A redb failure: an OS error is kept whole (its kind tells a full disk), anything else as
/// text.
fn db_err(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Io(e) => StoreError::disk("redb", e),
        e => StoreError::Io(format!("redb: {e}")),
    }
}

/// Opens (creating if needed) the redb file.
fn open_db(path: &Path) -> Result<Database, StoreError> {
    // The registry lives in memory; redb's page cache only serves checkpoints (and the one
    // scan at start-up), so it need not be redb's 1 GiB default, which would count against
    // RSS.
    Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Unavailable(format!(
                "{} is in use by another process (is another sextant running on this data dir?)",
                path.display()
            )),
            e => match redb::Error::from(e) {
                redb::Error::Io(e) => {
                    StoreError::disk(format!("cannot open {}", path.display()), e)
                }
                e => StoreError::Io(format!("cannot open {}: {e}", path.display())),
            },
        })
}

/// What the store reports to an operator, under `sextant_store_`.
#[derive(Clone)]
pub struct StoreMetrics {
    pub wal_bytes: Gauge,
    pub wal_append_seconds: Histogram,
    pub checkpoint_seconds: Histogram,
    pub checkpoint_failures: Counter,
    /// Checkpoints that folded the log into redb.
    pub checkpoints: Counter,
    /// Times redb was reopened after a failed checkpoint.
    pub reopens: Counter,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            wal_bytes: Gauge::default(),
            wal_append_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            checkpoint_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            checkpoint_failures: Counter::default(),
            checkpoints: Counter::default(),
            reopens: Counter::default(),
        }
    }
}

impl StoreMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("sextant_store");
        r.register(
            "wal_bytes",
            "Bytes in the write-ahead log not yet checkpointed into redb",
            m.wal_bytes.clone(),
        );
        r.register(
            "wal_append_seconds",
            "Time to append and fdatasync one group commit to the write-ahead log",
            m.wal_append_seconds.clone(),
        );
        r.register(
            "checkpoint_seconds",
            "Time to fold the write-ahead log into redb (one durable transaction)",
            m.checkpoint_seconds.clone(),
        );
        r.register(
            "checkpoint_failures",
            "Checkpoints that failed; the log is kept and the next one retries",
            m.checkpoint_failures.clone(),
        );
        r.register(
            "checkpoints",
            "Checkpoints that folded the write-ahead log into redb",
            m.checkpoints.clone(),
        );
        r.register(
            "reopens",
            "Times redb was closed and reopened after a failed checkpoint (redb refuses every \
             transaction after an I/O error until then)",
            m.reopens.clone(),
        );
        m
    }
}

/// A redb database file and its write-ahead log under the data directory.
pub struct RedbStore {
    inner: Mutex<Option<Arc<Inner>>>,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
    path: PathBuf,
}

struct Inner {
    /// `None` after a failed checkpoint closed it, until the next one reopens it. The lock also
    /// keeps two checkpoints from interleaving: a later one would delete segments whose batches
    /// an earlier one has not committed yet.
    db: Mutex<Option<Database>>,
    db_path: PathBuf,
    wal_dir: PathBuf,
    log: Mutex<Log>,
    wake: Condvar,
    metrics: StoreMetrics,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    No,
    /// Checkpoint what is logged, then stop (a clean close).
    Checkpoint,
    /// Stop without a checkpoint, as a crash would (tests).
    #[cfg(test)]
    Abandon,
}

struct Log {
    /// `None` once an append failed and the segment could not be cut back: commits fail
    /// until a restart recovers from the log.
    segment: Option<Segment>,
    /// Number of the segment being written (or that was, when `segment` is `None`).
    seq: u64,
    /// Acknowledged records (as appended) not yet in redb: one allocation per group commit,
    /// which goes back to the allocator whole after the checkpoint.
    pending: Vec<Vec<u8>>,
    pending_bytes: usize,
    /// The revision of the last acknowledged batch: a batch below it is fenced.
    revision: Revision,
    /// Why the last append failed, until an append or a disk probe succeeds.
    failed_append: Option<String>,
    stop: Stop,
}

impl RedbStore {
    /// Opens (creating if needed) `dir/registry.redb` and `dir/wal/`, replaying into redb what
    /// the log holds beyond redb's last checkpoint.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_metrics(dir, StoreMetrics::default())
    }

    pub fn open_with_metrics(dir: &Path, metrics: StoreMetrics) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::disk(format!("cannot create data dir {}", dir.display()), e)
        })?;
        let path = dir.join("registry.redb");
        let db = open_db(&path)?;
        let checkpointed = {
            let txn = db.begin_write().map_err(db_err)?;
            txn.open_table(KV).map_err(db_err)?;
            let seq = txn
                .open_table(META)
                .map_err(db_err)?
                .get(WAL_CHECKPOINTED)
                .map_err(db_err)?
                .map(|g| g.value())
                .unwrap_or(0);
            txn.commit().map_err(db_err)?;
            seq
        };
        let wal_dir = dir.join("wal");
        std::fs::create_dir_all(&wal_dir)
            .map_err(|e| StoreError::disk(format!("cannot create {}", wal_dir.display()), e))?;
        let seq = recover(&db, &wal_dir, checkpointed, &metrics)?;
        let revision = stored_revision(&db)?;
        let segment = Segment::create(&wal_dir, seq + 1).map_err(|e| {
            StoreError::disk(
                format!("cannot create a log segment in {}", wal_dir.display()),
                e,
            )
        })?;
        let inner = Arc::new(Inner {
            db: Mutex::new(Some(db)),
            db_path: path.clone(),
            wal_dir,
            log: Mutex::new(Log {
                seq: segment.seq,
                segment: Some(segment),
                pending: Vec::new(),
                pending_bytes: 0,
                revision,
                failed_append: None,
                stop: Stop::No,
            }),
            wake: Condvar::new(),
            metrics,
        });
        let worker = inner.clone();
        let checkpointer = std::thread::Builder::new()
            .name("sextant-checkpoint".into())
            .spawn(move || worker.run_checkpointer())
            .map_err(|e| StoreError::disk("cannot start the checkpointer", e))?;
        Ok(Self {
            inner: Mutex::new(Some(inner)),
            checkpointer: Mutex::new(Some(checkpointer)),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn inner(&self) -> Result<Arc<Inner>, StoreError> {
        self.inner
            .lock()
            .clone()
            .ok_or_else(|| StoreError::Unavailable("store is closed".into()))
    }

    /// Tells the checkpointer to stop (after a last checkpoint, unless `stop` says otherwise)
    /// and gives up this handle on the files; they are released when the returned thread ends.
    fn begin_stop(&self, stop: Stop) -> Option<JoinHandle<()>> {
        let inner = self.inner.lock().take()?;
        inner.log.lock().stop = stop;
        inner.wake.notify_all();
        self.checkpointer.lock().take()
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        if let Some(handle) = self.begin_stop(Stop::Checkpoint) {
            let _ = handle.join();
        }
    }
}

/// The revision of the last batch redb holds (0 when empty).
fn stored_revision(db: &Database) -> Result<Revision, StoreError> {
    revision_in(&db.begin_read().map_err(db_err)?)
}

/// The revision of the last batch as `txn` sees it (0 when empty).
fn revision_in(txn: &redb::ReadTransaction) -> Result<Revision, StoreError> {
    let meta = txn.open_table(META).map_err(db_err)?;
    let rev = meta.get(REVISION).map_err(db_err)?.map(|g| g.value());
    Ok(rev.unwrap_or(0))
}

/// Folds the segments after `checkpointed` into redb and deletes every segment; returns the
/// highest segment number seen, after which the new segment is numbered. Only the newest
/// segment may end in a partial record (the append a crash cut short, never acknowledged).
fn recover(
    db: &Database,
    wal_dir: &Path,
    checkpointed: u64,
    metrics: &StoreMetrics,
) -> Result<u64, StoreError> {
    let segments = wal::segments(wal_dir)?;
    let newest = segments
        .last()
        .map_or(checkpointed, |(s, _)| *s)
        .max(checkpointed);
    let live: Vec<_> = segments.iter().filter(|(s, _)| *s > checkpointed).collect();
    let mut contents = Vec::with_capacity(live.len());
    for (seq, path) in &live {
        contents.push((*seq, path, wal::read_segment(path)?));
    }
    let mut records = Vec::new();
    for (i, (seq, path, bytes)) in contents.iter().enumerate() {
        let (got, used, torn) = wal::parse_all(bytes);
        if let Some(why) = torn {
            if i + 1 != live.len() {
                return Err(StoreError::Corrupt {
                    key: path.display().to_string(),
                    reason: format!("log record at byte {used} is unreadable ({why:?}) in a segment that is not the newest"),
                });
            }
            tracing::warn!(segment = seq, dropped_bytes = bytes.len() - used, reason = ?why,
                "the log ends in a partial record (a write cut short by a crash, never acknowledged); dropping it");
        }
        records.extend(got);
    }
    if newest > checkpointed {
        let n = records.len();
        let started = Instant::now();
        checkpoint(db, records, newest, metrics)?;
        if n > 0 {
            tracing::info!(
                batches = n,
                segments = live.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "replayed the write-ahead log into the store"
            );
        }
    }
    remove_segments(wal_dir, newest);
    Ok(newest)
}

/// Applies `records` (in order; the last write of a key wins) in one durable redb transaction
/// that also records `upto` as the newest segment they cover.
fn checkpoint<'a>(
    db: &Database,
    records: impl IntoIterator<Item = wal::Record<'a>>,
    upto: u64,
    metrics: &StoreMetrics,
) -> Result<(), StoreError> {
    let started = Instant::now();
    let mut merged: BTreeMap<&str, Option<&[u8]>> = BTreeMap::new();
    let mut revision = None;
    for r in records {
        merged.extend(r.mutations);
        revision = Some(r.revision);
    }
    let txn = db.begin_write().map_err(db_err)?;
    {
        let mut kv = txn.open_table(KV).map_err(db_err)?;
        for (k, v) in merged {
            match v {
                Some(v) => {
                    kv.insert(k, v).map_err(db_err)?;
                }
                None => {
                    kv.remove(k).map_err(db_err)?;
                }
            }
        }
        let mut meta = txn.open_table(META).map_err(db_err)?;
        if let Some(rev) = revision {
            meta.insert(REVISION, rev).map_err(db_err)?;
        }
        meta.insert(WAL_CHECKPOINTED, upto).map_err(db_err)?;
    }
    txn.commit().map_err(db_err)?;
    metrics
        .checkpoint_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(())
}

/// Deletes the segments numbered up to `upto`; what cannot be deleted is skipped on the next
/// open (redb records what it covers), so a failure here only costs disk space.
fn remove_segments(wal_dir: &Path, upto: u64) {
    let Ok(segments) = wal::segments(wal_dir) else {
        return;
    };
    for (seq, path) in segments.into_iter().filter(|(s, _)| *s <= upto) {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(segment = seq, error = %e, "cannot remove a checkpointed log segment");
        }
    }
}

impl Inner {
    fn append(&self, batch: Batch) -> Result<(), StoreError> {
        let revision = batch.revision;
        let record = wal::encode(&batch)?;
        // Only the encoded record is kept; the batch's many small allocations go back now,
        // outside the log's lock.
        drop(batch);
        let started = Instant::now();
        let mut log = self.log.lock();
        if revision < log.revision {
            return Err(StoreError::Fenced {
                revision,
                last: log.revision,
            });
        }
        if log.pending_bytes > MAX_BACKLOG_BYTES {
            return Err(StoreError::Unavailable(backlog_message(log.pending_bytes)));
        }
        let seq = log.seq;
        let segment = log.segment.as_mut().ok_or_else(|| {
            StoreError::Unavailable(format!(
                "log segment {seq} could not be repaired after a failed write; restart to recover"
            ))
        })?;
        match segment.append(&record) {
            Ok(()) => {}
            Err(AppendError::Failed(e)) => {
                let e = StoreError::disk("cannot append to the log", e);
                if log.failed_append.is_none() {
                    tracing::error!(error = %e, "the log refuses writes; commits fail until it takes them again");
                }
                log.failed_append = Some(e.to_string());
                return Err(e);
            }
            Err(AppendError::Broken(e, e2)) => {
                log.segment = None;
                tracing::error!(segment = seq, error = %e, repair_error = %e2,
                    "a log append failed and the segment could not be cut back; refusing writes until restart");
                return Err(StoreError::Unavailable(format!(
                    "cannot append to the log ({e}) nor repair it ({e2})"
                )));
            }
        }
        if log.failed_append.take().is_some() {
            tracing::info!("the log takes writes again");
        }
        log.revision = revision;
        log.pending_bytes += record.len();
        log.pending.push(record);
        self.metrics.wal_bytes.set(log.pending_bytes as i64);
        self.metrics
            .wal_append_seconds
            .observe(started.elapsed().as_secs_f64());
        if log.pending_bytes >= CHECKPOINT_BYTES {
            self.wake.notify_one();
        }
        Ok(())
    }

    fn write_outage(&self) -> Option<String> {
        let log = self.log.lock();
        if log.segment.is_none() {
            Some(format!(
                "log segment {} could not be repaired after a failed write; restart to recover",
                log.seq
            ))
        } else if log.pending_bytes > MAX_BACKLOG_BYTES {
            Some(backlog_message(log.pending_bytes))
        } else {
            log.failed_append.clone()
        }
    }

    /// While appends fail, checks whether the log's disk takes a write again, so that
    /// readiness comes back without waiting for a client to risk a commit.
    fn probe_disk(&self) {
        if self.log.lock().failed_append.is_none() {
            return;
        }
        let path = self.wal_dir.join("probe.tmp");
        let res = std::fs::File::create(&path).and_then(|mut f| {
            std::io::Write::write_all(&mut f, &[0; PROBE_BYTES])?;
            f.sync_data()
        });
        let _ = std::fs::remove_file(&path);
        if res.is_ok() {
            let mut log = self.log.lock();
            if log.failed_append.take().is_some() {
                tracing::info!("the log's disk takes writes again");
            }
        }
    }

    fn run_checkpointer(&self) {
        loop {
            let stop = {
                let mut log = self.log.lock();
                if log.stop == Stop::No && log.pending_bytes < CHECKPOINT_BYTES {
                    self.wake.wait_for(&mut log, CHECKPOINT_INTERVAL);
                }
                log.stop
            };
            #[cfg(test)]
            if stop == Stop::Abandon {
                return;
            }
            if let Err(e) = self.checkpoint_now() {
                tracing::error!(error = %e, "checkpoint into redb failed; the log is kept and the next checkpoint retries");
                self.metrics.checkpoint_failures.inc();
                if stop == Stop::No {
                    // A failing disk is not retried in a tight loop.
                    std::thread::sleep(CHECKPOINT_INTERVAL);
                }
            }
            if stop != Stop::No {
                return;
            }
            self.probe_disk();
        }
    }

    /// The open database, reopening it if a failed checkpoint closed it.
    fn db_or_reopen<'a>(
        &self,
        slot: &'a mut Option<Database>,
    ) -> Result<&'a mut Database, StoreError> {
        if slot.is_none() {
            let db = open_db(&self.db_path)?;
            self.metrics.reopens.inc();
            tracing::warn!(path = %self.db_path.display(), "reopened redb after a failed checkpoint");
            *slot = Some(db);
        }
        slot.as_mut()
            .ok_or_else(|| StoreError::Unavailable("redb is closed".into()))
    }

    /// Folds every acknowledged batch into redb: rotates the log so that the checkpoint covers
    /// whole segments (every batch taken is in a segment up to `upto`, every later one in a
    /// newer segment), commits them to redb and deletes the covered segments. On failure the
    /// batches go back to the front of the queue and their segments stay.
    fn checkpoint_now(&self) -> Result<(), StoreError> {
        let mut slot = self.db.lock();
        let (upto, writable) = {
            let log = self.log.lock();
            if log.pending.is_empty() {
                return Ok(());
            }
            (log.seq, log.segment.is_some())
        };
        let db = self.db_or_reopen(&mut slot)?;
        // The next segment is created (and its directory entry synced, which can take a while
        // when the disk is busy with the previous checkpoint) before taking the log's lock, so
        // appends do not wait for it; only this function, serialised above, changes `seq`.
        let next = if writable {
            Some(
                Segment::create(&self.wal_dir, upto + 1)
                    .map_err(|e| StoreError::disk("cannot start a new log segment", e))?,
            )
        } else {
            None
        };
        let records = {
            let mut log = self.log.lock();
            if let Some(s) = next {
                log.seq = s.seq;
                log.segment = Some(s);
            }
            log.pending_bytes = 0;
            std::mem::take(&mut log.pending)
        };
        let started = Instant::now();
        let parsed = records
            .iter()
            .map(|r| wal::parse_whole(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|why| StoreError::Corrupt {
                key: format!("log segment {upto} (in memory)"),
                reason: format!("a record appended by this process does not read back: {why:?}"),
            });
        let result = match parsed {
            Ok(parsed) => checkpoint(db, parsed, upto, &self.metrics).inspect_err(|e| {
                // After an I/O error redb answers every transaction with "Previous I/O error
                // occurred" until it is reopened; closing it here lets the next checkpoint
                // start afresh (and releases its memory meanwhile).
                tracing::warn!(error = %e, "closing redb after a failed checkpoint; the next checkpoint reopens it");
                *slot = None;
            }),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                remove_segments(&self.wal_dir, upto);
                self.metrics.checkpoints.inc();
                tracing::debug!(
                    batches = records.len(),
                    segment = upto,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "checkpointed the log into redb"
                );
                self.metrics
                    .wal_bytes
                    .set(self.log.lock().pending_bytes as i64);
                Ok(())
            }
            Err(e) => {
                let mut log = self.log.lock();
                let later = std::mem::take(&mut log.pending);
                log.pending = records;
                log.pending.extend(later);
                log.pending_bytes = log.pending.iter().map(Vec::len).sum();
                Err(e)
            }
        }
    }
}

fn backlog_message(bytes: usize) -> String {
    format!(
        "{} MiB of the log wait for a checkpoint into redb that keeps failing",
        bytes >> 20
    )
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        // Blocks this thread for one disk sync: the core calls commit only from its writer's
        // own thread (see `Store::commit`), where a hop to a blocking pool would only add a
        // thread wake-up to every group commit.
        self.inner()?.append(batch)
    }

    fn load(&self, visit: &mut Visit<'_>) -> Result<Revision, StoreError> {
        let inner = self.inner()?;
        // At start-up nothing is pending; later (tests, tools), redb first takes in the log.
        inner.checkpoint_now()?;
        let mut slot = inner.db.lock();
        let db = inner.db_or_reopen(&mut slot)?;
        let txn = db.begin_read().map_err(db_err)?;
        let kv = txn.open_table(KV).map_err(db_err)?;
        for item in kv.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            visit(k.value(), v.value())?;
        }
        revision_in(&txn)
    }

    async fn close(&self) -> Result<(), StoreError> {
        // A last checkpoint, so the next start replays nothing; then the checkpointer's and our
        // handles drop, which releases redb's file lock.
        let started = Instant::now();
        if let Some(handle) = self.begin_stop(Stop::Checkpoint) {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|e| StoreError::Io(format!("closing the store failed: {e}")))?
                .map_err(|_| StoreError::Io("the checkpointer panicked".into()))?;
        }
        tracing::info!(path = %self.path.display(), elapsed_ms = started.elapsed().as_millis() as u64, "store closed");
        Ok(())
    }

    fn write_outage(&self) -> Option<String> {
        match self.inner() {
            Ok(inner) => inner.write_outage(),
            Err(e) => Some(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests;
