//! The etcd store: the core's [`Store`] on an etcd v3 cluster, so that a node's registry lives
//! in etcd instead of on its own disk (the first step of cluster mode; one writer per registry
//! still, the node's own, which assigns the revisions). Only one node may use a prefix at a
//! time: the revision fence refuses a batch below the stored revision, but two live writers
//! that both count upwards would interleave; electing the one writer is the cluster's job.
//!
//! **Keys.** Everything lives under a prefix (default `/sextant/`, so several Sextant
//! registries can share one etcd): the store's keys under `{prefix}k/`, and
//! `{prefix}meta/revision`, the revision of the last acknowledged batch as 20 zero-padded
//! decimal digits (so etcd's byte-wise value comparison is numeric).
//!
//! **Commit** is one etcd transaction: if the stored revision is below the batch's revision + 1
//! (that is, at most the batch's), write the batch's puts and deletes and the revision key;
//! otherwise read the stored revision and answer [`StoreError::Fenced`]. Within a batch the last
//! mutation of a key wins (etcd refuses a transaction that writes a key twice).
//!
//! **Split batches.** etcd refuses a transaction of more than `--max-txn-ops` operations
//! (default 128) or a request above `--max-request-bytes` (default 1.5 MiB). A larger batch is
//! written as several transactions of at most [`EtcdConfig::max_txn_ops`] operations and
//! [`EtcdConfig::max_txn_bytes`] bytes, in key order, each fenced the same way; the revision
//! key is written by the last one, so the batch is acknowledged only when all of them are.
//! The first part goes alone, the middle ones together (etcd commits transactions that arrive
//! together in one round of its log), then the last: three rounds for any number of parts.
//! What a split gives up is atomicity under failure: if the node dies, or etcd becomes
//! unreachable, between two of them, part of the batch is in etcd and the rest is not. That
//! batch was never acknowledged (every caller got an error), but its written part is there
//! after a restart, like a write whose answer was lost. So that a restart never reuses a
//! revision such a part carries, the first transaction of a split batch also records its
//! revision in `{prefix}meta/attempted`, and [`Store::load`] returns the higher of the two.
//! A batch of up to 127 mutations is never split (a registration writes two or three: the
//! instance's spec and status, and its service's record), so only a large group commit or
//! batch registration is.
//!
//! A single key and value must fit in one request: a larger value is refused
//! ([`StoreError::Io`] naming the key), not split.
//!
//! **Load** reads the revision keys and then the keys, every page at the etcd revision of the
//! first read, so the scan is one consistent snapshot. The keyspace is read as ranges split at
//! the registry's directories (one per service), several at once, with pages sized to their
//! range: etcd 3.4 walks the rest of a range for every page, which made one paged scan of a
//! large registry quadratic (see `Inner::scan`).
//! If etcd compacts that revision away during the scan, the scan starts again (three times at
//! most).
//!
//! **Failures.** Every call is bounded by [`EtcdConfig::request_timeout`]; an endpoint that does
//! not answer is left for the next one. When no endpoint answers (a read, a commit, or the
//! cluster lease's renewal), the error is [`StoreError::Unavailable`] naming etcd and the
//! endpoints, and the store is *in an outage*: [`Store::write_outage`] reports it (for
//! `/readyz` and the registry's lease sweeper), and commits and [`Store::committed_revision`]
//! fail at once with that error instead of waiting for timeouts again, so a write in an outage
//! gets its 503 promptly. A probe (every [`PROBE_INTERVAL`], a read of the revision key on
//! each endpoint, bounded by [`PROBE_TIMEOUT`]) ends the outage as soon as etcd answers (and
//! makes the endpoint that answered the one tried first); a successful transaction ends it
//! too. All I/O runs on the store's
//! own small runtime (threads `sextant-etcd`), so the store works from any runtime, and
//! [`Store::load`] (blocking) from any thread.
//!
//! **Change feed** ([`Store::watch_from`], module `feed`): one etcd Watch on the registry's
//! keys from the etcd revision that matches the asked Sextant revision. Each transaction's
//! events carry `{prefix}meta/revision` (and `{prefix}meta/journal`, the core's journal), so the
//! Sextant revision of every batch is known; a split batch's transactions are joined until the
//! one that writes the revision (parts of a batch whose writer died before its last part are
//! dropped: their `meta/attempted` is below the next batch's revision). The store knows the etcd revision of each Sextant revision it
//! loaded at, committed or delivered (the most recent thousands); any other start answers
//! `Compacted`, as does a start etcd has compacted away.
//!
//! **Cluster** (module `cluster`): membership, leader election and the leader's fence.
#![forbid(unsafe_code)]

pub mod cluster;
mod feed;
pub mod metrics;
pub mod pb;

pub use metrics::EtcdMetrics;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sextant_core::model::Revision;
use sextant_core::store::Visit;
use sextant_core::{Batch, Feed, Store, StoreError};
use tonic::transport::{Channel, Endpoint};

use pb::etcdserverpb::{
    compare, kv_client::KvClient, request_op, response_op, Compare, DeleteRangeRequest, PutRequest,
    RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse,
};

/// Where the store is and how it talks to etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members, `http://host:port` (no TLS yet).
    pub endpoints: Vec<String>,
    /// Every key of this registry starts with it.
    pub prefix: String,
    /// Longest wait for one etcd call (connect included) on one endpoint.
    pub request_timeout: Duration,
    /// Most operations in one transaction; etcd's `--max-txn-ops` (default 128).
    pub max_txn_ops: usize,
    /// Most key and value bytes in one transaction, below etcd's `--max-request-bytes`
    /// (default 1.5 MiB) with room for the request's framing.
    pub max_txn_bytes: usize,
    /// Keys per page when loading.
    pub page_keys: i64,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/sextant/".into(),
            request_timeout: Duration::from_secs(5),
            max_txn_ops: 128,
            max_txn_bytes: 1_400_000,
            page_keys: 1000,
        }
    }
}

/// Why an [`EtcdConfig`] cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no etcd endpoint given")]
    NoEndpoints,
    #[error("etcd endpoint {0:?} is not an http:// URL (TLS is not supported yet)")]
    Endpoint(String),
    #[error("the etcd key prefix must not be empty")]
    EmptyPrefix,
    #[error("max_txn_ops must be at least 2 (a key and the revision), got {0}")]
    TxnOps(usize),
}

impl EtcdConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::NoEndpoints);
        }
        for e in &self.endpoints {
            let ok = e
                .strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty());
            if !ok || Endpoint::from_shared(e.clone()).is_err() {
                return Err(ConfigError::Endpoint(e.clone()));
            }
        }
        if self.prefix.is_empty() {
            return Err(ConfigError::EmptyPrefix);
        }
        if self.max_txn_ops < 2 {
            return Err(ConfigError::TxnOps(self.max_txn_ops));
        }
        Ok(())
    }
}

/// Width of a stored revision: `u64::MAX` has 20 digits.
const REVISION_WIDTH: usize = 20;

/// Largest decoded message (a page of a load); etcd itself allows up to 2 GiB.
const MAX_DECODE_BYTES: usize = 256 * 1024 * 1024;

/// Bytes of framing counted per operation besides its key and value.
const OP_OVERHEAD: usize = 64;

fn encode_revision(r: Revision) -> Vec<u8> {
    format!("{r:0width$}", width = REVISION_WIDTH).into_bytes()
}

fn decode_revision(key: &[u8], v: &[u8]) -> Result<Revision, StoreError> {
    std::str::from_utf8(v)
        .ok()
        .filter(|s| s.len() == REVISION_WIDTH)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: format!(
                "not a {REVISION_WIDTH}-digit revision: {:?}",
                String::from_utf8_lossy(v)
            ),
        })
}

/// The first key after every key that starts with `prefix` (etcd's `range_end` for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// How one call failed.
enum CallError {
    /// No answer (refused, reset, timed out): try another endpoint, count as an outage.
    Unreachable(String),
    /// etcd answered with an error.
    Refused(tonic::Status),
}

fn classify(status: tonic::Status) -> CallError {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
            CallError::Unreachable(status.message().to_string())
        }
        Code::Unknown if status.message().contains("transport") => {
            CallError::Unreachable(status.message().to_string())
        }
        _ => CallError::Refused(status),
    }
}

/// The connections: one lazily connected channel per endpoint, and which one answered last.
struct Conn {
    endpoints: Vec<String>,
    channels: Vec<KvClient<Channel>>,
    /// The same channels, for the Watch and Lease services.
    raw: Vec<Channel>,
    current: AtomicUsize,
    timeout: Duration,
}

impl Conn {
    /// Builds the channels; must run inside the runtime that will drive them.
    fn new(config: &EtcdConfig) -> Result<Conn, StoreError> {
        let mut channels = Vec::with_capacity(config.endpoints.len());
        let mut raw = Vec::with_capacity(config.endpoints.len());
        for e in &config.endpoints {
            let ep = Endpoint::from_shared(e.clone())
                .map_err(|err| StoreError::Unavailable(format!("bad etcd endpoint {e}: {err}")))?
                .connect_timeout(config.request_timeout)
                .timeout(config.request_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(config.request_timeout)
                .keep_alive_while_idle(true);
            let ch = ep.connect_lazy();
            raw.push(ch.clone());
            channels.push(
                KvClient::new(ch)
                    .max_decoding_message_size(MAX_DECODE_BYTES)
                    .max_encoding_message_size(MAX_DECODE_BYTES),
            );
        }
        Ok(Conn {
            endpoints: config.endpoints.clone(),
            channels,
            raw,
            current: AtomicUsize::new(0),
            timeout: config.request_timeout,
        })
    }

    /// Runs `f` on the endpoint that answered last, then on each other one while they do not
    /// answer; each try bounded by the request timeout. Every call made through here is
    /// idempotent (a read, or a fenced transaction of fixed values), so a try whose answer was
    /// lost may be repeated elsewhere.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, CallError>
    where
        F: Fn(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.channels.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last = String::new();
        for i in 0..n {
            let idx = (first + i) % n;
            let attempt = tokio::time::timeout(self.timeout, f(self.channels[idx].clone())).await;
            match attempt {
                Ok(Ok(r)) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(r.into_inner());
                }
                Ok(Err(status)) => match classify(status) {
                    CallError::Unreachable(m) => last = format!("{}: {m}", self.endpoints[idx]),
                    refused => return Err(refused),
                },
                Err(_) => {
                    last = format!(
                        "{}: no answer within {:?}",
                        self.endpoints[idx], self.timeout
                    )
                }
            }
        }
        Err(CallError::Unreachable(last))
    }
}

/// The keys and names one store uses.
struct Keys {
    data: Vec<u8>,
    revision: Vec<u8>,
    attempted: Vec<u8>,
    journal: Vec<u8>,
    /// Everything of the cluster (members, leader) lives under it.
    cluster: Vec<u8>,
    leader: Vec<u8>,
}

/// How often an outage's probe asks etcd whether it is back.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// Longest wait for one endpoint's answer to the probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Sextant revisions whose etcd revision a store remembers, for feeds (the latest ones).
const POSITIONS: usize = 4096;

/// The shared state, owned by the store and borrowed by the tasks on its runtime.
struct Inner {
    config: EtcdConfig,
    keys: Keys,
    conn: Conn,
    closed: AtomicBool,
    outage: Mutex<Option<String>>,
    /// The highest revision recorded in `{prefix}meta/attempted` (0: none).
    attempted: AtomicU64,
    /// Sextant revision -> the etcd revision at which the registry was exactly at it.
    positions: Mutex<BTreeMap<Revision, i64>>,
    /// While this node leads: the leader key's create revision. Every commit then requires
    /// that key to still be this node's, so a deposed leader cannot write.
    fence: Mutex<Option<i64>>,
    /// This node's cluster lease, while it holds one.
    lease: Mutex<Option<i64>>,
    /// Held across a resignation's revoke, so a second resignation (a close racing the
    /// campaign's own step-down) returns only once the lease and its records are gone.
    resigning: tokio::sync::Mutex<()>,
    /// Leases of this node it could not revoke (etcd was unreachable): revoked once it answers,
    /// so a leader key left under one does not delay the next election by a lease TTL.
    stale_leases: Mutex<Vec<i64>>,
    metrics: EtcdMetrics,
}

/// The etcd-backed [`Store`]. See the crate docs.
pub struct EtcdStore {
    inner: Arc<Inner>,
    /// `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers (a read of the revision key, bounded by the
    /// request timeout per endpoint): an unreachable etcd fails here, with
    /// [`StoreError::Unavailable`] naming the endpoints, not at the first write.
    pub async fn open(config: EtcdConfig) -> Result<EtcdStore, StoreError> {
        Self::open_with_metrics(config, EtcdMetrics::default()).await
    }

    /// [`EtcdStore::open`], counting into `metrics` (registered by the caller).
    pub async fn open_with_metrics(
        config: EtcdConfig,
        metrics: EtcdMetrics,
    ) -> Result<EtcdStore, StoreError> {
        config
            .validate()
            .map_err(|e| StoreError::Unavailable(format!("etcd store: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            // Two: a load decodes a million keys' responses here while leases and commits go on.
            .worker_threads(2)
            .thread_name("sextant-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::disk("start the etcd store's runtime", e))?;
        let conn = {
            let _guard = runtime.enter();
            Conn::new(&config)?
        };
        let p = config.prefix.as_bytes();
        let keys = Keys {
            data: [p, b"k/"].concat(),
            revision: [p, b"meta/revision"].concat(),
            attempted: [p, b"meta/attempted"].concat(),
            journal: [p, b"meta/journal"].concat(),
            cluster: [p, b"cluster/"].concat(),
            leader: [p, b"cluster/leader"].concat(),
        };
        let inner = Arc::new(Inner {
            config,
            keys,
            conn,
            closed: AtomicBool::new(false),
            outage: Mutex::new(None),
            attempted: AtomicU64::new(0),
            positions: Mutex::new(BTreeMap::new()),
            fence: Mutex::new(None),
            lease: Mutex::new(None),
            resigning: tokio::sync::Mutex::new(()),
            stale_leases: Mutex::new(Vec::new()),
            metrics,
        });
        runtime.spawn(probe(inner.clone()));
        let store = EtcdStore {
            inner: inner.clone(),
            runtime: Some(runtime),
        };
        store
            .run(async move {
                let attempted = inner.read_revision(&inner.keys.attempted, 0).await?;
                inner.attempted.store(attempted.0, Ordering::SeqCst);
                Ok(())
            })
            .await?;
        Ok(store)
    }

    /// Runs `f` on the store's runtime and waits for it from any runtime.
    async fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("the etcd store is closed".into()))?;
        rt.spawn(f)
            .await
            .map_err(|e| StoreError::Io(format!("etcd store task failed: {e}")))?
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics on an async thread; this does not.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Inner {
    /// Remembers that the registry was at `revision` at etcd revision `at`.
    fn remember(&self, revision: Revision, at: i64) {
        let mut p = self.positions.lock();
        p.insert(revision, at);
        while p.len() > POSITIONS {
            p.pop_first();
        }
    }

    /// Enters (or stays in) an outage: see the crate docs.
    pub(crate) fn set_outage(&self, why: &str) {
        let mut o = self.outage.lock();
        if o.is_none() {
            tracing::warn!(
                reason = why,
                "etcd unreachable: writes refused until it answers again"
            );
        }
        *o = Some(why.to_string());
    }

    /// Ends an outage (etcd answered).
    fn clear_outage(&self) {
        if self.outage.lock().take().is_some() {
            tracing::info!("etcd answers again: writes taken");
        }
    }

    /// The error of a commit tried during an outage, without asking etcd again.
    fn in_outage(&self) -> Option<StoreError> {
        self.outage
            .lock()
            .as_ref()
            .map(|m| StoreError::Unavailable(m.clone()))
    }

    fn unavailable(&self, detail: &str) -> StoreError {
        StoreError::Unavailable(format!(
            "etcd is unreachable at {} ({detail})",
            self.config.endpoints.join(",")
        ))
    }

    /// One range read, with the store's failover and error mapping.
    pub(crate) async fn range(&self, req: RangeRequest) -> Result<RangeResponse, StoreError> {
        let started = std::time::Instant::now();
        let r = self
            .conn
            .call(|mut c| {
                let req = req.clone();
                async move { c.range(req).await }
            })
            .await
            .map_err(|e| self.map(e, "read"));
        self.metrics.observe("range", started);
        if let Err(StoreError::Unavailable(m)) = &r {
            self.set_outage(m);
        }
        r
    }

    fn map(&self, e: CallError, what: &str) -> StoreError {
        match e {
            CallError::Unreachable(m) => self.unavailable(&m),
            CallError::Refused(s) => StoreError::Io(format!(
                "etcd at {} refused the {what}: {} ({:?})",
                self.config.endpoints.join(","),
                s.message(),
                s.code()
            )),
        }
    }

    /// Reads a revision key (absent: 0) at `at` (0: the latest) and the etcd revision of the
    /// read.
    async fn read_revision(&self, key: &[u8], at: i64) -> Result<(Revision, i64), StoreError> {
        let req = RangeRequest {
            key: key.to_vec(),
            revision: at,
            ..Default::default()
        };
        let resp = self.range(req).await?;
        let header_rev = resp.header.map(|h| h.revision).unwrap_or(at);
        let rev = match resp.kvs.first() {
            Some(kv) => decode_revision(key, &kv.value)?,
            None => 0,
        };
        Ok((rev, header_rev))
    }

    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the etcd store is closed".into()));
        }
        // The last mutation of a key wins; etcd refuses a transaction writing a key twice.
        let mut last: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        for m in batch.mutations {
            last.insert(m.key, m.value);
        }
        let max_value = self.config.max_txn_bytes;
        let mut chunks: Vec<Vec<RequestOp>> = vec![Vec::new()];
        let mut bytes = 0usize;
        // Each chunk leaves room for the revision put (last chunk) or the attempted put (first).
        let per_chunk = self.config.max_txn_ops - 1;
        for (key, value) in last {
            let size = key.len() + value.as_ref().map_or(0, Vec::len) + OP_OVERHEAD;
            if size > max_value {
                return Err(StoreError::Io(format!(
                    "key {key:.60?} with its value ({size} bytes) does not fit in one etcd request (at most {max_value})"
                )));
            }
            let full = chunks.last().is_some_and(|c| {
                !c.is_empty() && (c.len() >= per_chunk || bytes + size > max_value)
            });
            if full {
                chunks.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            let k = [self.keys.data.as_slice(), key.as_bytes()].concat();
            let op = match value {
                Some(value) => request_op::Request::RequestPut(PutRequest {
                    key: k,
                    value,
                    ..Default::default()
                }),
                None => request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                    key: k,
                    ..Default::default()
                }),
            };
            if let Some(c) = chunks.last_mut() {
                c.push(RequestOp { request: Some(op) });
            }
        }
        let revision = batch.revision;
        if !batch.journal.is_empty() {
            let size = self.keys.journal.len() + batch.journal.len() + OP_OVERHEAD;
            if size > max_value {
                return Err(StoreError::Io(format!(
                    "the batch's journal ({size} bytes) does not fit in one etcd request"
                )));
            }
            let full = chunks.last().is_some_and(|c| {
                !c.is_empty() && (c.len() + 1 >= per_chunk || bytes + size > max_value)
            });
            if full {
                chunks.push(Vec::new());
            }
            if let Some(c) = chunks.last_mut() {
                c.push(put_op(self.keys.journal.clone(), batch.journal));
            }
        }
        // The last part writes the revision: the batch is whole once it is in.
        let mut last = chunks.pop().unwrap_or_default();
        if let Some(first) = chunks.first_mut() {
            // See the crate docs: a restart must not reuse a revision a part carries.
            let high = self
                .attempted
                .fetch_max(revision, Ordering::SeqCst)
                .max(revision);
            first.push(put_op(self.keys.attempted.clone(), encode_revision(high)));
        }
        let mut parts = chunks.into_iter();
        if let Some(first) = parts.next() {
            // The first part alone: a feed must meet its `attempted` before any other part
            // (a part it meets first would be taken for the rest of an abandoned batch).
            self.fenced_txn(revision, first).await?;
        }
        // The middle parts together: etcd commits transactions that arrive together in one
        // round of its log (one fsync), so a batch of n parts costs three rounds, not n.
        {
            use futures::{StreamExt, TryStreamExt};
            futures::stream::iter(parts)
                .map(|ops| self.fenced_txn(revision, ops))
                .buffer_unordered(PARTS_IN_FLIGHT)
                .try_for_each(|_| async { Ok(()) })
                .await?;
        }
        last.push(put_op(
            self.keys.revision.clone(),
            encode_revision(revision),
        ));
        let at = self.fenced_txn(revision, last).await?;
        self.remember(revision, at);
        Ok(())
    }

    /// One transaction: `ops` if the stored revision is at most `revision` (and, while this
    /// node leads, the leader key is still its own), else Fenced. Returns etcd's revision.
    async fn fenced_txn(&self, revision: Revision, ops: Vec<RequestOp>) -> Result<i64, StoreError> {
        // No "less or equal" in etcd: stored < revision + 1. Above every 20-digit value: "~".
        let bound = match revision.checked_add(1) {
            Some(r) => encode_revision(r),
            None => b"~".to_vec(),
        };
        let mut compares = vec![Compare {
            result: compare::CompareResult::Less as i32,
            target: compare::CompareTarget::Value as i32,
            key: self.keys.revision.clone(),
            range_end: Vec::new(),
            target_union: Some(compare::TargetUnion::Value(bound)),
        }];
        let fence = *self.fence.lock();
        if let Some(created) = fence {
            compares.push(Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Create as i32,
                key: self.keys.leader.clone(),
                range_end: Vec::new(),
                target_union: Some(compare::TargetUnion::CreateRevision(created)),
            });
        }
        let req = TxnRequest {
            compare: compares,
            success: ops,
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: self.keys.revision.clone(),
                    ..Default::default()
                })),
            }],
        };
        // A missing revision key fails a value comparison: create it (0) once and try again.
        for _ in 0..2 {
            let resp = self.txn(&req, "commit").await?;
            if resp.succeeded {
                return Ok(resp.header.map_or(0, |h| h.revision));
            }
            let stored = resp
                .responses
                .first()
                .and_then(|r| match &r.response {
                    Some(response_op::Response::ResponseRange(rr)) => Some(rr),
                    _ => None,
                })
                .and_then(|rr| rr.kvs.first());
            match stored {
                Some(kv) => {
                    let last = decode_revision(&self.keys.revision, &kv.value)?;
                    if last > revision || fence.is_none() {
                        return Err(StoreError::Fenced { revision, last });
                    }
                    // The revision allowed it: the leader key is no longer this node's.
                    *self.fence.lock() = None;
                    return Err(StoreError::Unavailable(
                        "this node is no longer the cluster's leader (its leader key in etcd is gone or another node's); the write was not made".into(),
                    ));
                }
                None => self.create_revision_key().await?,
            }
        }
        Err(StoreError::Io(format!(
            "etcd revision key {} keeps disappearing",
            String::from_utf8_lossy(&self.keys.revision)
        )))
    }

    /// One transaction, timed as `op` (see [`metrics::OpLabels`]).
    pub(crate) async fn txn(
        &self,
        req: &TxnRequest,
        op: &'static str,
    ) -> Result<TxnResponse, StoreError> {
        let started = std::time::Instant::now();
        let r = self
            .conn
            .call(|mut c| {
                let req = req.clone();
                async move { c.txn(req).await }
            })
            .await;
        self.metrics.observe(op, started);
        match r {
            Ok(resp) => {
                self.clear_outage();
                Ok(resp)
            }
            Err(e) => {
                let err = self.map(e, "transaction");
                if let StoreError::Unavailable(m) = &err {
                    self.set_outage(m);
                } else {
                    self.clear_outage();
                }
                Err(err)
            }
        }
    }

    /// Writes revision 0 unless the revision key exists.
    async fn create_revision_key(&self) -> Result<(), StoreError> {
        let req = TxnRequest {
            compare: vec![absent(self.keys.revision.clone())],
            success: vec![put_op(self.keys.revision.clone(), encode_revision(0))],
            failure: Vec::new(),
        };
        self.txn(&req, "commit").await.map(|_| ())
    }

    /// A consistent scan, handed to the loading thread range by range as it goes: the
    /// revision keys, then every key at the etcd revision of that read, as ranges split at the
    /// registry's directories ([`sextant_core::store::DIRECTORY_INDEX`]), [`LOAD_PARALLEL`]
    /// of them at a time, sent in key order. Returns the revision to load at.
    ///
    /// Why split: etcd 3.4 walks its index over the whole rest of a range for every page it
    /// serves (that walk is the response's `count`), so paging once through a million keys
    /// costs etcd half a million index steps per page. Ranges bounded at the directories cost
    /// it only their own keys, and a page sized to its range ([`Inner::read_range`]) keeps
    /// the walk linear within one large directory too. Small directories are read several to
    /// a range, as many as held about [`EtcdConfig::page_keys`] × 8 keys in the last range
    /// read: a request per service would cost etcd more than the keys.
    async fn scan(&self, out: &std::sync::mpsc::Sender<Scanned>) -> Result<Revision, ScanError> {
        use futures::StreamExt;
        let (revision, at) = self.read_revision(&self.keys.revision, 0).await?;
        let (attempted, _) = self.read_revision(&self.keys.attempted, at).await?;
        let end = prefix_end(&self.keys.data);
        let index = [
            self.keys.data.as_slice(),
            sextant_core::store::DIRECTORY_INDEX.as_bytes(),
        ]
        .concat();
        let index_end = prefix_end(&index);
        let mut edges: Vec<Vec<u8>> = self
            .read_range(index, index_end, at, true, 0)
            .await?
            .iter()
            .filter_map(|kv| {
                let key = std::str::from_utf8(kv.key.strip_prefix(self.keys.data.as_slice())?);
                let dir = sextant_core::store::directory_of(key.ok()?)?;
                Some([self.keys.data.as_slice(), dir.as_bytes()].concat())
            })
            .filter(|k| *k > self.keys.data && *k < end)
            .collect();
        edges.push(self.keys.data.clone());
        edges.push(end);
        edges.sort_unstable();
        edges.dedup();
        let target = self.config.page_keys.max(1).saturating_mul(8);
        let mut group = 1usize;
        let mut next = 0usize;
        let mut inflight = futures::stream::FuturesOrdered::new();
        let (mut ranges, mut keys) = (0usize, 0usize);
        let started = std::time::Instant::now();
        loop {
            while inflight.len() < LOAD_PARALLEL && next + 1 < edges.len() {
                let hi = (next + group).min(edges.len() - 1);
                let (lo_key, hi_key) = (edges[next].clone(), edges[hi].clone());
                let dirs = hi - next;
                inflight.push_back(async move {
                    (
                        dirs,
                        self.read_range(lo_key, hi_key, at, false, target).await,
                    )
                });
                next = hi;
            }
            let Some((dirs, page)) = inflight.next().await else {
                break;
            };
            let page = page?;
            // Aim the next ranges at `target` keys, by what these directories held.
            let per_dir = (page.len() / dirs).max(1);
            group = (usize::try_from(target).unwrap_or(usize::MAX) / per_dir).clamp(1, 4096);
            ranges += 1;
            keys += page.len();
            if out.send(Scanned::Keys(page)).is_err() {
                return Err(StoreError::Io("the load's reader went away".into()).into());
            }
        }
        tracing::debug!(
            ranges,
            keys,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "etcd store read"
        );
        self.remember(revision.max(attempted), at);
        Ok(revision.max(attempted))
    }

    /// Every key in `[lo, hi)` at etcd revision `at`, in pages. The first page asks for
    /// `first_limit` keys (at least [`EtcdConfig::page_keys`]); its `count` tells how many keys the range holds, and later
    /// pages ask for an eighth of that (never fewer than before) (at most [`MAX_PAGE_KEYS`]), so a range costs etcd's
    /// index walk about eight times its size rather than its size squared over the page.
    /// Reads are serializable (answered by the member asked, without a quorum round): a read
    /// at a revision etcd has already served is the same on every member that has it; one
    /// that does not have it yet answers "future revision", and the page is asked again
    /// linearizably.
    async fn read_range(
        &self,
        lo: Vec<u8>,
        hi: Vec<u8>,
        at: i64,
        keys_only: bool,
        first_limit: i64,
    ) -> Result<Vec<pb::mvccpb::KeyValue>, ScanError> {
        let mut from = lo;
        let mut out = Vec::new();
        let mut limit = first_limit.max(self.config.page_keys.max(1));
        let mut ceiling = MAX_PAGE_KEYS.max(limit);
        let mut serializable = true;
        loop {
            let req = RangeRequest {
                key: from.clone(),
                range_end: hi.clone(),
                limit: limit.min(ceiling),
                revision: at,
                keys_only,
                serializable,
                ..Default::default()
            };
            let started = std::time::Instant::now();
            let r = self
                .conn
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.range(req).await }
                })
                .await;
            self.metrics.observe("range", started);
            let page = match r {
                Ok(p) => p,
                // A page too large to decode: smaller pages.
                Err(CallError::Refused(s))
                    if matches!(
                        s.code(),
                        tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
                    ) && req.limit > 1
                        && !s.message().contains("compacted") =>
                {
                    ceiling = (req.limit / 2).max(1);
                    continue;
                }
                Err(CallError::Refused(s)) if s.message().contains("compacted") => {
                    return Err(ScanError::Compacted(s.message().to_string()))
                }
                Err(CallError::Refused(s)) if serializable && s.message().contains("future") => {
                    serializable = false;
                    continue;
                }
                Err(e) => return Err(self.map(e, "read").into()),
            };
            let more = page.more;
            let count = page.count;
            let next = match page.kvs.last() {
                Some(kv) if more => {
                    let mut k = kv.key.clone();
                    k.push(0);
                    Some(k)
                }
                _ => None,
            };
            out.extend(page.kvs);
            match next {
                Some(k) => {
                    from = k;
                    limit = limit.max(count / 8);
                }
                None => return Ok(out),
            }
        }
    }
}

/// Most keys one page of a load asks for (see [`Inner::read_range`]).
const MAX_PAGE_KEYS: i64 = 50_000;

/// Ranges a load reads at once.
const LOAD_PARALLEL: usize = 4;

/// Middle parts of a split batch sent at once.
const PARTS_IN_FLIGHT: usize = 16;

/// While the store is in an outage, asks each endpoint (a read of the revision key) every
/// [`PROBE_INTERVAL`] until one answers, then ends the outage. Runs until the store closes.
async fn probe(inner: Arc<Inner>) {
    let n = inner.conn.channels.len();
    let timeout = PROBE_TIMEOUT.min(inner.config.request_timeout);
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        if inner.outage.lock().is_none() {
            continue;
        }
        let first = inner.conn.current.load(Ordering::Relaxed);
        for i in 0..n {
            let idx = (first + i) % n;
            let mut c = inner.conn.channels[idx].clone();
            let req = RangeRequest {
                key: inner.keys.revision.clone(),
                ..Default::default()
            };
            // A linearizable read: answered only by a member with a quorum behind it.
            if let Ok(Ok(_)) = tokio::time::timeout(timeout, c.range(req)).await {
                inner.conn.current.store(idx, Ordering::Relaxed);
                inner.clear_outage();
                break;
            }
        }
    }
}

/// What a scan hands the loading thread.
enum Scanned {
    /// The next keys, in key order.
    Keys(Vec<pb::mvccpb::KeyValue>),
    /// The scan ended: the revision to load at, or why not.
    Done(Result<Revision, ScanError>),
}

/// Why a scan stopped.
enum ScanError {
    /// etcd no longer has the revision the scan reads at.
    Compacted(String),
    Store(StoreError),
}

impl From<StoreError> for ScanError {
    fn from(e: StoreError) -> Self {
        ScanError::Store(e)
    }
}

/// A transaction's condition that `key` does not exist (its create revision is 0).
pub(crate) fn absent(key: Vec<u8>) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key,
        range_end: Vec::new(),
        target_union: Some(compare::TargetUnion::CreateRevision(0)),
    }
}

fn put_op(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the etcd store is closed".into()));
        }
        // In an outage: the 503 now, not after the endpoints' timeouts again (the probe
        // notices etcd's return within its interval).
        if let Some(e) = self.inner.in_outage() {
            return Err(e);
        }
        let inner = self.inner.clone();
        self.run(async move { inner.commit(batch).await }).await
    }

    fn load(&self, visit: &mut Visit<'_>) -> Result<Revision, StoreError> {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("the etcd store is closed".into()))?;
        let prefix = self.inner.keys.data.as_slice();
        let mut tries = 0;
        loop {
            tries += 1;
            let inner = self.inner.clone();
            // Blocking by contract: wait on a plain channel, so this works on any thread (the
            // caller's runtime, if any, is not the one doing the I/O). The keys are visited
            // while the next ranges are read.
            let (tx, rx) = std::sync::mpsc::channel();
            rt.spawn(async move {
                let done = inner.scan(&tx).await;
                let _ = tx.send(Scanned::Done(done));
            });
            let mut visited = false;
            let outcome = loop {
                match rx.recv() {
                    Ok(Scanned::Keys(kvs)) => {
                        for kv in &kvs {
                            let key =
                                kv.key
                                    .strip_prefix(prefix)
                                    .ok_or_else(|| StoreError::Corrupt {
                                        key: String::from_utf8_lossy(&kv.key).into_owned(),
                                        reason: "outside the store's prefix".into(),
                                    })?;
                            let key =
                                std::str::from_utf8(key).map_err(|_| StoreError::Corrupt {
                                    key: String::from_utf8_lossy(&kv.key).into_owned(),
                                    reason: "the key is not UTF-8".into(),
                                })?;
                            visited = true;
                            visit(key, &kv.value)?;
                        }
                    }
                    Ok(Scanned::Done(r)) => break r,
                    Err(_) => {
                        break Err(ScanError::Store(StoreError::Io(
                            "the etcd store's runtime stopped during load".into(),
                        )))
                    }
                }
            };
            match outcome {
                Ok(revision) => return Ok(revision),
                Err(ScanError::Store(e)) => return Err(e),
                // Nothing visited yet: this store can start again by itself.
                Err(ScanError::Compacted(m)) if !visited && tries < 3 => {
                    tracing::warn!(error = %m, "etcd compacted the revision of a load; loading again");
                }
                Err(ScanError::Compacted(m)) => {
                    return Err(StoreError::Restart(format!(
                        "etcd compacted the revision the load read at: {m}"
                    )))
                }
            }
        }
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Closed first, so the campaign does not take a new lease after the resignation.
        self.inner.closed.store(true, Ordering::SeqCst);
        let inner = self.inner.clone();
        // Leadership and membership go now rather than a lease TTL later.
        self.run(async move {
            cluster::resign(&inner).await;
            Ok(())
        })
        .await
    }

    fn write_outage(&self) -> Option<String> {
        self.inner.outage.lock().clone()
    }

    async fn committed_revision(&self) -> Option<Result<Revision, StoreError>> {
        // The commit that just failed put the store in an outage: asking etcd now would only
        // wait for the timeouts again (the writer asks again before its next commit).
        if let Some(e) = self.inner.in_outage() {
            return Some(Err(e));
        }
        let inner = self.inner.clone();
        Some(
            self.run(async move {
                let (revision, at) = inner.read_revision(&inner.keys.revision, 0).await?;
                // Only while this node still leads is a batch at that revision its own.
                let fence = *inner.fence.lock();
                if let Some(created) = fence {
                    let now = cluster::create_revision_at(&inner, at).await?;
                    if now != created {
                        return Err(StoreError::Unavailable(
                            "this node is no longer the cluster's leader".into(),
                        ));
                    }
                }
                Ok(revision)
            })
            .await,
        )
    }

    fn watch_from(&self, revision: Revision) -> Option<Feed> {
        let (tx, rx) = tokio::sync::mpsc::channel(feed::CHANNEL);
        let start = self.inner.positions.lock().get(&revision).copied();
        match (start, self.runtime.as_ref()) {
            (Some(at), Some(rt)) => {
                rt.spawn(feed::run(self.inner.clone(), revision, at, tx));
            }
            _ => {
                let _ = tx.try_send(Err(sextant_core::FeedError::Compacted(revision)));
            }
        }
        Some(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_compare_as_numbers() {
        let mut revs = vec![0u64, 9, 10, 99, 100, 12345, u64::MAX - 1, u64::MAX];
        let enc: Vec<Vec<u8>> = revs.iter().map(|r| encode_revision(*r)).collect();
        let mut sorted = enc.clone();
        sorted.sort();
        assert_eq!(enc, sorted);
        for (r, e) in revs.drain(..).zip(&enc) {
            assert_eq!(e.len(), REVISION_WIDTH);
            assert_eq!(decode_revision(b"k", e).unwrap(), r);
        }
        assert!(decode_revision(b"k", b"12").is_err());
        assert!(b"~".as_slice() > encode_revision(u64::MAX).as_slice());
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/sextant/k/"), b"/sextant/k0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn config_is_checked() {
        assert!(EtcdConfig::default().validate().is_ok());
        let bad = |f: fn(&mut EtcdConfig)| {
            let mut c = EtcdConfig::default();
            f(&mut c);
            c.validate().is_err()
        };
        assert!(bad(|c| c.endpoints.clear()));
        assert!(bad(|c| c.endpoints = vec!["https://x:2379".into()]));
        assert!(bad(|c| c.endpoints = vec!["127.0.0.1:2379".into()]));
        assert!(bad(|c| c.prefix.clear()));
        assert!(bad(|c| c.max_txn_ops = 1));
    }
}
