//! Cluster membership and leader election on etcd, for the nodes that share one prefix.
//!
//! Each node holds one etcd lease (TTL `lease_ttl`), renewed every third of it by a loop of its
//! own (never queued behind a write), and under it:
//! - its member record `{prefix}cluster/members/{node_id}` (JSON [`Member`]: addresses, role,
//!   applied revision), rewritten when its role or revisions change and at least every
//!   [`MEMBER_REFRESH`], so `/v1/cluster` can list the live nodes and their lag;
//! - (not under the lease) `{prefix}cluster/secret`, created once by the first node: the secret
//!   nodes present when a follower forwards to the leader;
//! - if it won the election, `{prefix}cluster/leader` (the leader's [`Member`]). A node
//!   campaigns, when a read finds no leader, with one transaction, `if create_revision(leader)
//!   == 0 then put(leader, me, lease)`; the winner's key has a create revision nobody else's can have, and from then on
//!   every commit of the store also compares it (the *fence*): a leader whose lease lapsed
//!   (etcd deletes the key) or was replaced cannot write any more, whatever it believes.
//!
//! A node that loses its lease (etcd unreachable longer than the TTL, or the renewal refused)
//! stops leading at once, before etcd lets another node win. When it lost it because etcd did
//! not answer, the store is in an outage (see the crate docs): the registry then holds (serves
//! reads, watches and heartbeats from memory, expires nothing, refuses writes naming etcd)
//! until etcd answers and an election — this node's campaign goes on meanwhile — names a
//! leader, which gives every ephemeral instance a fresh TTL as it takes over. A leader that is killed is
//! replaced one TTL after its last renewal (followers watch the leader key and campaign as
//! soon as etcd deletes it); one that shuts down cleanly revokes its lease, so another node
//! takes over at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sextant_core::model::Revision;
use sextant_core::StoreError;
use tokio::sync::{mpsc, watch};

use crate::pb::etcdserverpb::{
    lease_client::LeaseClient, request_op, response_op, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use crate::{absent, prefix_end, EtcdStore, Inner};

/// One node as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node_id: String,
    /// The native HTTP API, `http://host:port`.
    pub http: String,
    /// The native gRPC API, `host:port`.
    pub grpc: String,
    /// `leader` or `follower`, as of its last renewal.
    pub role: String,
    /// The revision it had applied at its last renewal.
    pub revision: Revision,
    /// The store's head revision it read just before (its lag is `head - revision`).
    #[serde(default)]
    pub head: Revision,
    /// When it last renewed (ms since the epoch, its own clock).
    pub updated_ms: u64,
}

/// What the election says about this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Election {
    /// Not decided yet (start-up).
    Unknown,
    /// This node leads; `head` is the store's revision when it won (what it must have applied
    /// before it writes); `floor` the highest revision a batch may have written part of
    /// (`meta/attempted`): its first batch must be above it.
    Leader { head: Revision, floor: Revision },
    /// Another node leads (`None`: none is known, e.g. this node lost its lease).
    Follower { leader: Option<Member> },
}

/// What the node reports of itself at each renewal: its role and applied revision.
pub type Status = Arc<dyn Fn() -> (String, Revision) + Send + Sync>;

impl EtcdStore {
    /// Joins the cluster as `node` (its `role`, `revision` and `updated_ms` are filled in from
    /// `status` at each renewal) and campaigns for leadership until the store closes. The
    /// answer tells every change of this node's standing.
    pub fn join(
        &self,
        node: Member,
        lease_ttl: Duration,
        status: Status,
    ) -> watch::Receiver<Election> {
        let (tx, rx) = watch::channel(Election::Unknown);
        if let Some(rt) = self.runtime.as_ref() {
            rt.spawn(campaign(self.inner.clone(), node, lease_ttl, status, tx));
        }
        rx
    }

    /// The live members, by node id.
    pub async fn members(&self) -> Result<Vec<Member>, StoreError> {
        let inner = self.inner.clone();
        self.run(async move {
            let from = [inner.keys.cluster.as_slice(), b"members/"].concat();
            let req = RangeRequest {
                range_end: prefix_end(&from),
                key: from,
                ..Default::default()
            };
            let resp = inner.range(req).await?;
            let mut members: Vec<Member> = resp
                .kvs
                .iter()
                .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
                .collect();
            // A record's role is as of its last renewal; the leader key is the truth now.
            let leader = read_member(&inner, inner.keys.leader.clone()).await?;
            for m in &mut members {
                let leads = leader.as_ref().is_some_and(|l| l.node_id == m.node_id);
                m.role = if leads { "leader" } else { "follower" }.to_string();
            }
            Ok(members)
        })
        .await
    }

    /// The live member record under `node_id`, if any (a node holding that id now, or this
    /// node's previous life whose lease has not lapsed yet). Node ids must be unique: two
    /// nodes under one id would overwrite each other's record and one would be invisible.
    pub async fn member(&self, node_id: &str) -> Result<Option<Member>, StoreError> {
        let inner = self.inner.clone();
        let key = [
            inner.keys.cluster.as_slice(),
            b"members/",
            node_id.as_bytes(),
        ]
        .concat();
        self.run(async move { read_member(&inner, key).await })
            .await
    }

    /// The cluster's shared secret, which nodes present to each other when a follower
    /// forwards to the leader: the one under `{prefix}cluster/secret`, created with
    /// `candidate` by the first node that asks (one create-if-absent transaction, so nodes
    /// starting together agree). Whoever can read the prefix owns the registry anyway.
    pub async fn cluster_secret(&self, candidate: String) -> Result<String, StoreError> {
        let inner = self.inner.clone();
        self.run(async move {
            let key = [inner.keys.cluster.as_slice(), b"secret"].concat();
            let value = match put_if_absent(&inner, key, candidate.as_bytes(), 0).await? {
                Ok(_) => return Ok(candidate),
                Err(held) => held.unwrap_or_default(),
            };
            String::from_utf8(value)
                .ok()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| StoreError::Corrupt {
                    key: "cluster/secret".into(),
                    reason: "not a non-empty UTF-8 secret".into(),
                })
        })
        .await
    }

    /// The store's latest revision (the last batch any node committed).
    pub async fn head(&self) -> Result<Revision, StoreError> {
        let inner = self.inner.clone();
        self.run(async move { Ok(inner.read_revision(&inner.keys.revision, 0).await?.0) })
            .await
    }
}

/// Renewals per lease TTL.
const RENEWALS_PER_TTL: u32 = 3;

async fn campaign(
    inner: Arc<Inner>,
    node: Member,
    ttl: Duration,
    status: Status,
    tx: watch::Sender<Election>,
) {
    let tick = (ttl / RENEWALS_PER_TTL).max(Duration::from_millis(100));
    loop {
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        match hold_lease(&inner, &node, ttl, tick, &status, &tx).await {
            Ok(()) => return,
            Err(Lost::Unreachable(e)) => {
                // Before the role changes, so the registry holds from its first moment as a
                // follower without a leader (see the module docs).
                if inner.outage.lock().is_none() {
                    inner.set_outage(&format!(
                        "etcd is unreachable at {} ({e})",
                        inner.config.endpoints.join(",")
                    ));
                }
                // Another endpoint for the next lease (the probe picks one that answers).
                inner.conn.current.fetch_add(1, Ordering::Relaxed);
                if !matches!(*tx.borrow(), Election::Follower { leader: None }) {
                    tracing::warn!(error = %e, "cluster lease lost: etcd does not answer; holding until it does");
                }
            }
            Err(Lost::Other(e)) => {
                tracing::warn!(error = %e, "cluster lease lost; following until a new one is held");
            }
        }
        *inner.fence.lock() = None;
        tx.send_if_modified(|e| {
            let changed = *e != (Election::Follower { leader: None });
            *e = Election::Follower { leader: None };
            changed
        });
        // Best effort: its records go now rather than when the lease lapses.
        resign(&inner).await;
        tokio::time::sleep(tick).await;
    }
}

/// Why a lease was lost.
enum Lost {
    /// etcd did not answer (the store is in an outage).
    Unreachable(String),
    /// etcd answered: the lease expired, the leader key was taken, a call was refused.
    Other(String),
}

impl From<StoreError> for Lost {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => Lost::Unreachable(m),
            e => Lost::Other(e.to_string()),
        }
    }
}

/// A call's failure: no answer (or a transport error) is unreachability, anything else not.
fn lost(what: &str, s: tonic::Status) -> Lost {
    use tonic::Code;
    let m = format!("{what}: {}", s.message());
    match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            Lost::Unreachable(m)
        }
        _ => Lost::Other(m),
    }
}

/// One lease's life: renew it, and meanwhile keep the member record and campaign or check the
/// leadership. Returns `Ok` when the store closed, an error when the lease is lost.
///
/// Renewal runs on its own ([`renew`]), not after the record's write: under a bulk load etcd's
/// commits can take seconds (fsyncs of 1.5-2 s were seen), and a renewal queued behind them let
/// every node's lease lapse at once, which stopped all writes for an election.
async fn hold_lease(
    inner: &Inner,
    node: &Member,
    ttl: Duration,
    tick: Duration,
    status: &Status,
    tx: &watch::Sender<Election>,
) -> Result<(), Lost> {
    let unreachable = |m: &str| Lost::Unreachable(m.to_string());
    let idx = inner.conn.current.load(Ordering::Relaxed) % inner.conn.raw.len();
    let mut leases = LeaseClient::new(inner.conn.raw[idx].clone());
    let timeout = inner.config.request_timeout;
    let started = std::time::Instant::now();
    let granted = tokio::time::timeout(
        timeout,
        leases.lease_grant(LeaseGrantRequest {
            ttl: ttl.as_secs().max(1) as i64,
            id: 0,
        }),
    )
    .await;
    inner.metrics.observe("lease", started);
    let granted = granted
        .map_err(|_| unreachable("no answer to the lease grant"))?
        .map_err(|s| lost("lease grant", s))?
        .into_inner();
    if !granted.error.is_empty() {
        return Err(Lost::Other(format!("lease grant: {}", granted.error)));
    }
    let lease = granted.id;
    *inner.lease.lock() = Some(lease);
    // etcd answers again: the leases an outage kept from being revoked go now (a leader key
    // under one would hold off every campaign, this node's included, until it lapsed).
    let stale = std::mem::take(&mut *inner.stale_leases.lock());
    for id in stale {
        revoke(inner, &mut leases, id).await;
    }
    let (req_tx, req_rx) = mpsc::channel::<LeaseKeepAliveRequest>(4);
    // The first renewal goes with the call: etcd answers the call (its headers) only then.
    req_tx
        .send(LeaseKeepAliveRequest { id: lease })
        .await
        .map_err(|_| unreachable("keep-alive stream closed"))?;
    let requests =
        futures::stream::unfold(
            req_rx,
            |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
        );
    let answers = tokio::time::timeout(timeout, leases.lease_keep_alive(requests))
        .await
        .map_err(|_| unreachable("no answer to the lease keep-alive"))?
        .map_err(|s| lost("lease keep-alive", s))?
        .into_inner();
    let vacancy = tokio::sync::Notify::new();
    tokio::select! {
        r = renew(inner, lease, tick, req_tx, answers) => r,
        r = keep_records(inner, node, lease, tick, status, tx, &vacancy) => r,
        r = watch_vacancy(inner, &vacancy) => r,
    }
}

/// Wakes `vacancy` whenever the leader key is deleted (its lease lapsed or was revoked), so a
/// follower campaigns at once instead of at its next tick: a dead leader is replaced up to a
/// tick sooner. Best effort: a watch that fails is opened again a second later, and the tick
/// still finds a vacancy. Returns only when the store closes.
async fn watch_vacancy(inner: &Inner, vacancy: &tokio::sync::Notify) -> Result<(), Lost> {
    use crate::pb::etcdserverpb::{
        watch_client::WatchClient, watch_create_request::FilterType, watch_request,
        WatchCreateRequest, WatchRequest,
    };
    use futures::StreamExt as _;
    loop {
        if inner.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let idx = inner.conn.current.load(Ordering::Relaxed) % inner.conn.raw.len();
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: inner.keys.leader.clone(),
                    filters: vec![FilterType::Noput as i32],
                    ..Default::default()
                },
            )),
        };
        // The request stream stays open: closing it would end the watch.
        let requests = futures::stream::iter([create]).chain(futures::stream::pending());
        let mut client = WatchClient::new(inner.conn.raw[idx].clone());
        let opened =
            tokio::time::timeout(inner.config.request_timeout, client.watch(requests)).await;
        if let Ok(Ok(stream)) = opened {
            let mut stream = stream.into_inner();
            while let Ok(Some(resp)) = stream.message().await {
                if resp.canceled || resp.compact_revision > 0 {
                    break;
                }
                if !resp.events.is_empty() {
                    vacancy.notify_one();
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Renews the lease every `tick` (the first renewal was sent with the call) until the store
/// closes or a renewal fails.
async fn renew(
    inner: &Inner,
    lease: i64,
    tick: Duration,
    req_tx: mpsc::Sender<LeaseKeepAliveRequest>,
    mut answers: tonic::Streaming<LeaseKeepAliveResponse>,
) -> Result<(), Lost> {
    let timeout = inner.config.request_timeout;
    let mut first = true;
    loop {
        if inner.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        if !std::mem::take(&mut first) {
            req_tx
                .send(LeaseKeepAliveRequest { id: lease })
                .await
                .map_err(|_| Lost::Unreachable("keep-alive stream closed".into()))?;
        }
        let started = std::time::Instant::now();
        let renewed = tokio::time::timeout(timeout, answers.message()).await;
        inner.metrics.observe("lease", started);
        let renewed: Option<LeaseKeepAliveResponse> = renewed
            .map_err(|_| Lost::Unreachable("no answer to a lease renewal".into()))?
            .map_err(|s| lost("lease renewal", s))?;
        match renewed {
            Some(r) if r.ttl > 0 => {}
            // The stream ended: the member went away (or restarted).
            None => {
                return Err(Lost::Unreachable(
                    "the lease keep-alive stream ended".into(),
                ))
            }
            _ => {
                return Err(Lost::Other(
                    "etcd refused to renew the lease (it expired)".into(),
                ))
            }
        }
        tokio::time::sleep(tick).await;
    }
}

/// How often a member record is rewritten when nothing in it changed (its `updated_ms` is the
/// "last seen" of `/v1/cluster`).
const MEMBER_REFRESH: Duration = Duration::from_secs(5);

/// Every `tick`: campaign while no node leads (or check that this node still does), and
/// rewrite the member record when its role or revisions changed, or [`MEMBER_REFRESH`]
/// passed. A follower that sees a leader only reads, so an idle cluster writes one record
/// per node every few seconds and nothing else.
async fn keep_records(
    inner: &Inner,
    node: &Member,
    lease: i64,
    tick: Duration,
    status: &Status,
    tx: &watch::Sender<Election>,
    vacancy: &tokio::sync::Notify,
) -> Result<(), Lost> {
    let member_key = [
        inner.keys.cluster.as_slice(),
        b"members/",
        node.node_id.as_bytes(),
    ]
    .concat();
    let mut leading: Option<i64> = None;
    let mut written: Option<((String, Revision, Revision), std::time::Instant)> = None;
    loop {
        if inner.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        // The head first, then what this node applied: a write between them counts as no lag.
        let head = inner.read_revision(&inner.keys.revision, 0).await?.0;
        let (role, revision) = status();
        let lag = head.saturating_sub(revision);
        inner
            .metrics
            .head
            .set(i64::try_from(head).unwrap_or(i64::MAX));
        inner
            .metrics
            .lag
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
        let me = Member {
            role: role.clone(),
            revision,
            head,
            updated_ms: sextant_core::model::now_ms(),
            ..node.clone()
        };
        let me_json = serde_json::to_vec(&me).unwrap_or_default();
        // The record before the outcome: whoever learns this node's role can list it.
        let now = std::time::Instant::now();
        let state = (role, revision, head);
        let stale = match &written {
            Some((s, at)) => *s != state || now.duration_since(*at) >= MEMBER_REFRESH,
            None => true,
        };
        if stale {
            let req = TxnRequest {
                compare: Vec::new(),
                success: vec![put(member_key.clone(), me_json.clone(), lease)],
                failure: Vec::new(),
            };
            inner.txn(&req, "campaign").await?;
            written = Some((state, now));
        }
        match leading {
            None => {
                // Campaign (one transaction, which etcd writes through its log) only when no
                // node leads; otherwise a read says who does.
                let leader = match read_member(inner, inner.keys.leader.clone()).await? {
                    Some(l) => Err(Some(l)),
                    None => campaign_once(inner, &me_json, lease).await?,
                };
                match leader {
                    Ok(created) => {
                        *inner.fence.lock() = Some(created);
                        leading = Some(created);
                        let (head, at) = inner.read_revision(&inner.keys.revision, 0).await?;
                        let floor = inner.read_revision(&inner.keys.attempted, at).await?.0;
                        tracing::info!(node = %node.node_id, head, floor, "elected leader");
                        tx.send_replace(Election::Leader { head, floor });
                    }
                    Err(leader) => {
                        let changed = |e: &Election| match (e, &leader) {
                            (Election::Follower { leader: Some(a) }, Some(b)) => {
                                a.node_id != b.node_id || a.http != b.http
                            }
                            (Election::Follower { leader: None }, None) => false,
                            _ => true,
                        };
                        if changed(&tx.borrow()) {
                            tx.send_replace(Election::Follower { leader });
                        }
                    }
                }
            }
            Some(created) => {
                // Still ours? (An operator may have deleted it; etcd may have expired it.)
                let still = create_revision_at(inner, 0).await?;
                if still != created {
                    *inner.fence.lock() = None;
                    return Err(Lost::Other(
                        "the leader key is no longer this node's".into(),
                    ));
                }
            }
        }
        if leading.is_none() {
            // A follower looks again at its next tick, or as soon as the leader key goes.
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = vacancy.notified() => {}
            }
        } else {
            tokio::time::sleep(tick).await;
        }
    }
}

/// One campaign: `if create_revision(leader) == 0 then put(leader, me, lease)`. `Ok(the leader
/// key's create revision)` when this node won, `Err(whoever holds the key)` when not.
async fn campaign_once(
    inner: &Inner,
    me_json: &[u8],
    lease: i64,
) -> Result<Result<i64, Option<Member>>, StoreError> {
    let r = put_if_absent(inner, inner.keys.leader.clone(), me_json, lease).await?;
    Ok(r.map_err(|held| held.and_then(|v| serde_json::from_slice::<Member>(&v).ok())))
}

/// One transaction: `if create_revision(key) == 0 then put(key, value, lease) else
/// get(key)`. `Ok(the revision it was created at)`, or `Err(the value it holds)`.
async fn put_if_absent(
    inner: &Inner,
    key: Vec<u8>,
    value: &[u8],
    lease: i64,
) -> Result<Result<i64, Option<Vec<u8>>>, StoreError> {
    let req = TxnRequest {
        compare: vec![absent(key.clone())],
        success: vec![put(key.clone(), value.to_vec(), lease)],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key,
                ..Default::default()
            })),
        }],
    };
    let resp = inner.txn(&req, "campaign").await?;
    if resp.succeeded {
        return Ok(Ok(resp.header.map_or(0, |h| h.revision)));
    }
    Ok(Err(resp
        .responses
        .into_iter()
        .next()
        .and_then(|r| match r.response {
            Some(response_op::Response::ResponseRange(rr)) => rr.kvs.into_iter().next(),
            _ => None,
        })
        .map(|kv| kv.value)))
}

/// The [`Member`] record under `key` (a member's, or the leader's), if there is one.
async fn read_member(inner: &Inner, key: Vec<u8>) -> Result<Option<Member>, StoreError> {
    let resp = inner
        .range(RangeRequest {
            key,
            ..Default::default()
        })
        .await?;
    Ok(resp
        .kvs
        .first()
        .and_then(|kv| serde_json::from_slice::<Member>(&kv.value).ok()))
}

/// The leader key's create revision (0: none), at etcd revision `at` (0: now).
pub(crate) async fn create_revision_at(inner: &Inner, at: i64) -> Result<i64, StoreError> {
    let resp = inner
        .range(RangeRequest {
            key: inner.keys.leader.clone(),
            revision: at,
            ..Default::default()
        })
        .await?;
    Ok(resp.kvs.first().map_or(0, |kv| kv.create_revision))
}

fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key,
            value,
            lease,
            ..Default::default()
        })),
    }
}

/// Revokes this node's lease (a clean shutdown: its leadership and member record go at once).
pub(crate) async fn resign(inner: &Inner) {
    let _one_at_a_time = inner.resigning.lock().await;
    let Some(lease) = inner.lease.lock().take() else {
        return;
    };
    *inner.fence.lock() = None;
    let idx = inner.conn.current.load(Ordering::Relaxed) % inner.conn.raw.len();
    let mut leases = LeaseClient::new(inner.conn.raw[idx].clone());
    if !revoke(inner, &mut leases, lease).await && !inner.closed.load(Ordering::SeqCst) {
        inner.stale_leases.lock().push(lease);
    }
}

/// Revokes one lease; `false` when etcd did not answer (a lease etcd no longer knows counts as
/// revoked).
async fn revoke(
    inner: &Inner,
    leases: &mut LeaseClient<tonic::transport::Channel>,
    id: i64,
) -> bool {
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(
        inner.config.request_timeout,
        leases.lease_revoke(LeaseRevokeRequest { id }),
    )
    .await;
    inner.metrics.observe("lease", started);
    match r {
        Ok(Ok(_)) => true,
        Ok(Err(s)) if s.code() == tonic::Code::NotFound || s.message().contains("not found") => {
            true
        }
        _ => {
            tracing::warn!(
                lease = id,
                "could not revoke a cluster lease; revoking it when etcd answers"
            );
            false
        }
    }
}
