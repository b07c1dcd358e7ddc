//! Cluster mode under faults of etcd and of nodes, with real etcd (`sextant_testkit::Etcd`,
//! `EtcdCluster`) and real `sextant serve` nodes on loopback:
//! - etcd down (killed) for three instance TTLs under heartbeats: reads, watches and heartbeats
//!   go on, writes answer 503 with `Retry-After` naming etcd, `/readyz` is 503 (degraded) and
//!   `/healthz` 200, nothing expires; after etcd's restart a client's retried write succeeds,
//!   watchers see later writes in order, and no live instance is removed;
//! - a follower killed (-9) while etcd's history is compacted past it: restarted, it ends in
//!   the leader's state and revision, and a watcher that resumes on it from an old revision
//!   gets a snapshot, never a silent gap;
//! - a 3-member etcd whose raft leader is killed under a write load: writes resume after the
//!   election and every acknowledged write is on every node;
//! - a randomized history (fixed seed, printed; `SEXTANT_HISTORY_SEED` replays another):
//!   clients register, deregister and change status on the leader while watchers on random
//!   nodes follow, and followers are killed and restarted; every watcher's sequence is gapless
//!   against the leader's (resuming on another node with its last revision), and every node
//!   and watcher ends in the state of the last acknowledged writes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use sextant_testkit::{Etcd, EtcdCluster};

const LEASE_SECONDS: &str = "2";
const FRAME: Duration = Duration::from_secs(10);

fn start_node(endpoints: &str, prefix: &str) -> Server {
    Server::start_with_args(&[
        "--store",
        "etcd",
        "--etcd-endpoints",
        endpoints,
        "--etcd-prefix",
        prefix,
        "--cluster-lease-seconds",
        LEASE_SECONDS,
        "--no-nacos",
        "--no-dns",
        "--no-consul",
    ])
}

/// The next `n` change events of a watch: (kind, instance id, revision). Snapshots and
/// bookmarks are skipped.
async fn changes(sse: &mut Sse, n: usize) -> Vec<(String, String, u64)> {
    let mut got = Vec::new();
    while got.len() < n {
        let f = sse.expect(FRAME).await;
        let id = match f.event.as_str() {
            "upsert" => f.data["instance"]["id"].as_str(),
            "status" | "delete" => f.data["id"].as_str(),
            _ => continue,
        };
        got.push((
            f.event.clone(),
            id.unwrap_or("?").to_string(),
            f.data["revision"].as_u64().expect("revision"),
        ));
    }
    got
}

/// Retries a PUT of an instance on whichever node takes it (503: another node, then again),
/// as a client with a server list does; the acknowledged revision.
async fn put_retrying(nodes: &[&Server], path: &str, body: &Value, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        for n in nodes {
            let r = n.api().put(path, body).await;
            match r.status {
                200 => return r.body["revision"].as_u64().expect("revision"),
                503 => {}
                s => panic!("PUT {path}: unexpected {s}: {}", r.text),
            }
        }
        assert!(
            Instant::now() < deadline,
            "PUT {path} not taken within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One heartbeat round's answer from one node: when, its status, how many it renewed.
#[derive(Debug, Clone)]
struct Beat {
    at: Instant,
    node: usize,
    status: u16,
    renewed: u64,
}

const TTL: u64 = 2;

/// `/metrics` of a cluster node: etcd request latency by operation, the replication lag (0
/// once caught up) and the head it was measured against — the lag `/v1/cluster` lists for the
/// member too.
async fn check_metrics(nodes: &[Server], leader: usize) {
    for (i, n) in nodes.iter().enumerate() {
        let api = n.api();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lag = metric(&api, "sextant_cluster_replication_lag_revisions").await;
            let head = metric(&api, "sextant_cluster_store_head_revision").await;
            let view = api.get("/v1/cluster").await.body;
            let me = view["members"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["node_id"] == view["node_id"]).cloned());
            let listed = me.map(|m| m["lag"].clone());
            if lag == 0.0 && head > 0.0 && listed == Some(json!(0)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {i}: lag {lag}, head {head}, listed {listed:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let text = api.get("/metrics").await.text;
        let mut ops = vec!["range", "lease", "campaign", "watch"];
        if i == leader {
            ops.push("commit");
        }
        for op in ops {
            let line = format!("sextant_etcd_request_seconds_count{{op=\"{op}\"}} ");
            let count: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&line)?.trim().parse().ok())
                .unwrap_or(0.0);
            assert!(count > 0.0, "node {i}: no etcd {op} timed in\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_keeps_reads_watches_and_heartbeats_and_expires_nothing() {
    let mut etcd = Etcd::start();
    let nodes = [
        start_node(&etcd.endpoint, "/outage/"),
        start_node(&etcd.endpoint, "/outage/"),
    ];
    let refs: Vec<&Server> = nodes.iter().collect();
    let l = leader_of(&refs, Duration::from_secs(15)).await;
    let leader = nodes[l].api();
    let eph: Vec<String> = (0..3).map(|i| format!("e{i}")).collect();
    for (i, id) in eph.iter().enumerate() {
        leader
            .register(
                "o",
                "s",
                id,
                &json!({"host": "10.2.0.1", "port": 100 + i, "ttl_seconds": TTL}),
            )
            .await;
    }
    // A watcher on each node, from the snapshot.
    let mut watches = Vec::new();
    for n in &nodes {
        let mut sse = Sse::open(&n.api(), "service=o/s", None).await;
        let snap = sse.expect(FRAME).await;
        assert_eq!(snap.event, "snapshot");
        watches.push(sse);
    }
    // Until the node that receives the first frame catches up, the follower's snapshot may
    // miss some: wait until both serve the three.
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        while ids(&n.api().service("o", "s").await).len() < 3 {
            assert!(Instant::now() < deadline, "the follower never caught up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    check_metrics(&nodes, l).await;

    // The clients of the three instances heartbeat every node every 300 ms (a client's server
    // list): a node that takes them renews, one that does not answers 503.
    let beats: Arc<Mutex<Vec<Beat>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let beater = {
        let apis: Vec<Api> = nodes.iter().map(Server::api).collect();
        let (beats, stop) = (beats.clone(), stop.clone());
        let items: Vec<Value> = eph
            .iter()
            .map(|id| json!({"namespace": "o", "service": "s", "id": id}))
            .collect();
        tokio::spawn(async move {
            let body = Value::Array(items);
            while !stop.load(Ordering::SeqCst) {
                for (node, api) in apis.iter().enumerate() {
                    let r = api.post("/v1/heartbeats", &body).await;
                    beats.lock().unwrap().push(Beat {
                        at: Instant::now(),
                        node,
                        status: r.status,
                        renewed: r.body["renewed"].as_u64().unwrap_or(0),
                    });
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;

    // etcd goes away.
    etcd.kill();
    let down = Instant::now();
    for n in &nodes {
        let api = n.api();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = api.get("/readyz").await;
            if r.status == 503 {
                assert!(
                    r.text.contains("degraded") && r.text.contains("etcd"),
                    "{}",
                    r.text
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz stayed {}: {}",
                r.status,
                r.text
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(api.get("/healthz").await.status, 200);
    }
    let degraded = down.elapsed();
    // Writes: 503 at once, Retry-After, naming etcd; on both nodes.
    let mut write_latency = Duration::ZERO;
    for n in &nodes {
        let started = Instant::now();
        let r = n
            .api()
            .put(
                &instance_path("o", "s", "during"),
                &json!({"host": "10.2.0.9", "port": 9}),
            )
            .await;
        write_latency = write_latency.max(started.elapsed());
        r.assert_error(503, &["etcd"]);
        assert_eq!(
            r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1"),
            "{:?}",
            r.headers
        );
    }
    assert!(
        write_latency < Duration::from_secs(2),
        "a write in the outage took {write_latency:?} to be refused"
    );
    // Three TTLs of outage; reads on both nodes all along.
    let outage = Duration::from_secs(3 * TTL);
    while down.elapsed() < outage {
        for n in &nodes {
            let s = n.api().service("o", "s").await;
            assert_eq!(ids(&s), eph, "a read in the outage");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (held_from, restarted) = {
        etcd.restart().expect("etcd comes back");
        (down + degraded, Instant::now())
    };

    // A client's retried write is taken once a leader is elected again.
    let pending = put_retrying(
        &refs,
        &instance_path("o", "s", "after"),
        &json!({"host": "10.2.0.2", "port": 200}),
        Duration::from_secs(25),
    )
    .await;
    let writable_after = restarted.elapsed();
    let l2 = leader_of(&refs, Duration::from_secs(10)).await;
    let r2 = nodes[l2].api().deregister("o", "s", "after").await;
    // Both watchers: exactly these, in order — no delete of a live instance first.
    for sse in &mut watches {
        let got = changes(sse, 2).await;
        assert_eq!(
            got,
            [
                ("upsert".to_string(), "after".to_string(), pending),
                ("delete".to_string(), "after".to_string(), r2),
            ]
        );
    }
    // Two more TTLs after the return: the live instances stay (fresh TTLs, renewed).
    tokio::time::sleep(Duration::from_secs(2 * TTL)).await;
    for sse in &mut watches {
        sse.expect_quiet(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    beater.await.expect("the heartbeat task");
    for n in &nodes {
        let s = n.api().service("o", "s").await;
        assert_eq!(ids(&s), eph, "live instances after the outage");
        assert_eq!(
            metric(&n.api(), "sextant_lease_expiries_total").await,
            0.0,
            "an instance expired"
        );
    }
    // Every heartbeat in the outage was taken, by both nodes, once they knew of it.
    let beats = beats.lock().unwrap().clone();
    let in_outage: Vec<&Beat> = beats
        .iter()
        .filter(|b| b.at > held_from && b.at < restarted)
        .collect();
    assert!(
        in_outage.len() >= 8,
        "{} heartbeats in the outage",
        in_outage.len()
    );
    for b in &in_outage {
        assert_eq!(
            (b.status, b.renewed),
            (200, 3),
            "a heartbeat in the outage was not taken: {b:?}"
        );
    }
    // Before the outage the leader took them (what a follower answers then is not this test's
    // business: followers may forward heartbeats to the leader).
    assert!(beats
        .iter()
        .any(|b| b.at < down && b.node == l && b.status == 200));
    eprintln!(
        "etcd outage {outage:?}: /readyz degraded on both nodes {degraded:?} after the kill; a write refused in {write_latency:?}; {} heartbeats taken in the outage; writes taken again {writable_after:?} after etcd's restart",
        in_outage.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_past_compaction_resyncs_and_its_watchers_get_snapshots() {
    let etcd = Etcd::start();
    let mut nodes = [
        start_node(&etcd.endpoint, "/compact/"),
        start_node(&etcd.endpoint, "/compact/"),
    ];
    let refs: Vec<&Server> = nodes.iter().collect();
    let l = leader_of(&refs, Duration::from_secs(15)).await;
    let f = 1 - l;
    let leader = nodes[l].api();
    // A watcher on the follower sees the first writes; its last revision is its resume point.
    let mut on_f = Sse::open(&nodes[f].api(), "service=c/s", None).await;
    assert_eq!(on_f.expect(FRAME).await.event, "snapshot");
    let mut last = 0;
    for n in 0..5u16 {
        let r = leader
            .register(
                "c",
                "s",
                &format!("a{n}"),
                &json!({"host": "10.3.0.1", "port": n + 1}),
            )
            .await;
        let got = changes(&mut on_f, 1).await;
        assert_eq!(got[0].2, r);
        last = r;
    }
    drop(on_f);
    nodes[f].kill9();

    // Writes while it is down (new instances, a status change, deletes), then compaction.
    for n in 0..30u16 {
        leader
            .register(
                "c",
                "s",
                &format!("b{n}"),
                &json!({"host": "10.3.0.2", "port": n + 1}),
            )
            .await;
    }
    leader
        .set_status("c", "s", "a1", &json!({"enabled": false}))
        .await;
    leader.deregister("c", "s", "a0").await;
    leader.deregister("c", "s", "b0").await;
    let compacted_at = etcd.compact().expect("compact");
    eprintln!("etcd compacted through its revision {compacted_at}");

    // It comes back (a new process on the same prefix) and catches up.
    nodes[f] = start_node(&etcd.endpoint, "/compact/");
    let f_api = nodes[f].api();
    let head = leader.service("c", "s").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = f_api.service("c", "s").await;
        if s["revision"] == head["revision"] {
            assert_eq!(
                s["instances"], head["instances"],
                "same state as the leader"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never caught up: {s} vs {head}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        f_api.get("/v1/cluster").await.body["revision"],
        leader.get("/v1/cluster").await.body["revision"]
    );

    // A watcher resuming on it from before the compaction gets a snapshot of the whole state
    // (never the changes after some later point as if nothing were missing)...
    let mut resumed = Sse::open(&f_api, &format!("service=c/s&since={last}"), None).await;
    let first = resumed.expect(FRAME).await;
    assert_eq!(first.event, "snapshot", "{first:?}");
    assert_eq!(first.data["resync"], true, "{first:?}");
    let mut want_ids = ids(&head);
    want_ids.sort();
    let mut snap_ids = ids(&first.data);
    snap_ids.sort();
    assert_eq!(snap_ids, want_ids, "the snapshot: {}", first.raw);
    // ...and then the leader's next writes, in order.
    let r1 = leader
        .register("c", "s", "c0", &json!({"host": "10.3.0.3", "port": 1}))
        .await;
    let r2 = leader.deregister("c", "s", "b1").await;
    assert_eq!(
        changes(&mut resumed, 2).await,
        [
            ("upsert".to_string(), "c0".to_string(), r1),
            ("delete".to_string(), "b1".to_string(), r2),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_under_load_loses_no_acknowledged_write() {
    let mut etcd = EtcdCluster::start(3);
    let endpoints = etcd.endpoints();
    let nodes = [
        start_node(&endpoints, "/raft/"),
        start_node(&endpoints, "/raft/"),
    ];
    let refs: Vec<&Server> = nodes.iter().collect();
    leader_of(&refs, Duration::from_secs(15)).await;

    // Writers: four clients registering in turn on whichever node takes the write.
    let acked: Arc<Mutex<Vec<(String, u64, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let apis: Vec<Api> = nodes.iter().map(Server::api).collect();
        let (acked, stop) = (acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut refused = 0u32;
            let mut n = 0u32;
            let mut at = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("w{w}-{n}");
                let r = apis[at % apis.len()]
                    .put(
                        &instance_path("r", "s", &id),
                        &json!({"host": "10.4.0.1", "port": 1 + n % 60000}),
                    )
                    .await;
                match r.status {
                    200 => {
                        let rev = r.body["revision"].as_u64().expect("revision");
                        acked.lock().unwrap().push((id, rev, Instant::now()));
                        n += 1;
                    }
                    503 => {
                        refused += 1;
                        at += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    s => panic!("unexpected {s}: {}", r.text),
                }
            }
            refused
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let raft_leader = etcd.leader(Duration::from_secs(5)).expect("an etcd leader");
    let before = acked.lock().unwrap().len();
    etcd.members[raft_leader].kill();
    let killed = Instant::now();
    // Writes resume: 50 more acknowledged after the kill, bounded.
    let deadline = killed + Duration::from_secs(30);
    loop {
        let after = acked
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.2 > killed)
            .count();
        if after >= 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes did not resume: {after} after the kill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut refused = 0;
    for w in writers {
        refused += w.await.expect("writer");
    }
    let acked = acked.lock().unwrap().clone();
    let first_after = acked
        .iter()
        .filter(|a| a.2 > killed)
        .map(|a| a.2 - killed)
        .min()
        .unwrap_or_default();
    let new_leader = etcd.leader(Duration::from_secs(10));
    assert!(new_leader.is_some_and(|i| i != raft_leader));

    // Every acknowledged write on every node, at its revision (bounded: followers apply).
    let by_id: std::collections::BTreeMap<&str, u64> =
        acked.iter().map(|(id, r, _)| (id.as_str(), *r)).collect();
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = n.api().service("r", "s").await;
            let missing: Vec<&&str> = by_id.keys().filter(|id| find(&s, id).is_none()).collect();
            if missing.is_empty() {
                for (id, r) in &by_id {
                    let i = find(&s, id).expect("present");
                    assert_eq!(i["spec_revision"].as_u64(), Some(*r), "{id}");
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} acknowledged writes missing on {}: {:?}",
                missing.len(),
                n.http,
                &missing[..missing.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "etcd leader (member {raft_leader} of 3) killed under load: {before} writes acknowledged before, {} in all; first write acknowledged {first_after:?} after the kill; {refused} answers 503 meanwhile (retried)",
        acked.len()
    );
}

/// A watch that tolerates its node dying: frames until the stream ends or fails.
struct Tolerant {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    parser: sextant_client::sse::SseParser,
    ready: std::collections::VecDeque<sextant_client::sse::Frame>,
}

impl Tolerant {
    async fn open(api: &Api, since: Option<u64>) -> Option<Tolerant> {
        let query = match since {
            Some(s) => format!("service=h/s&since={s}"),
            None => "service=h/s".to_string(),
        };
        let req = api.client.get(api.url(&format!("/v1/watch?{query}")));
        let resp = tokio::time::timeout(Duration::from_secs(5), req.send())
            .await
            .ok()?
            .ok()?;
        (resp.status() == 200).then(|| Tolerant {
            stream: Box::pin(resp.bytes_stream()),
            parser: sextant_client::sse::SseParser::new(),
            ready: Default::default(),
        })
    }

    /// The next frame; `None` when the stream ended, failed or stayed silent for `within`.
    async fn next(&mut self, within: Duration) -> Option<sextant_client::sse::Frame> {
        use futures::StreamExt as _;
        loop {
            if let Some(f) = self.ready.pop_front() {
                return Some(f);
            }
            let chunk = tokio::time::timeout(within, self.stream.next())
                .await
                .ok()??
                .ok()?;
            let mut frames = Vec::new();
            self.parser.push(&chunk, &mut frames);
            self.ready.extend(frames);
        }
    }
}

/// What one watcher saw, in order.
#[derive(Debug, Clone)]
enum Seen {
    /// A snapshot complete through this revision (`resume_revision`).
    Snapshot(u64),
    Event(u64),
    /// A watch opened on a node (its HTTP address) from this revision (0: none); only shown
    /// in failure messages.
    #[allow(dead_code)]
    Open(String, u64),
}

/// id -> (port, enabled)
type State = std::collections::BTreeMap<String, (u64, bool)>;

fn instance_state(i: &Value) -> (String, (u64, bool)) {
    (
        i["id"].as_str().unwrap_or("?").to_string(),
        (
            i["port"].as_u64().unwrap_or(0),
            i["status"]["enabled"].as_bool().unwrap_or(true),
        ),
    )
}

/// Applies one watch frame to `state`; what it was, if a change or a snapshot.
fn apply_frame(state: &mut State, f: &sextant_client::sse::Frame) -> Option<Seen> {
    let data: Value = serde_json::from_str(&f.data).unwrap_or(Value::Null);
    match f.event.as_str() {
        "snapshot" => {
            state.clear();
            for i in data["instances"].as_array().into_iter().flatten() {
                let (id, s) = instance_state(i);
                state.insert(id, s);
            }
            Some(Seen::Snapshot(
                data["resume_revision"].as_u64().unwrap_or(0),
            ))
        }
        "upsert" => {
            let (id, s) = instance_state(&data["instance"]);
            state.insert(id, s);
            Some(Seen::Event(data["revision"].as_u64().unwrap_or(0)))
        }
        "status" => {
            let id = data["id"].as_str().unwrap_or("?");
            if let Some(s) = state.get_mut(id) {
                s.1 = data["status"]["enabled"].as_bool().unwrap_or(true);
            }
            Some(Seen::Event(data["revision"].as_u64().unwrap_or(0)))
        }
        "delete" => {
            state.remove(data["id"].as_str().unwrap_or("?"));
            Some(Seen::Event(data["revision"].as_u64().unwrap_or(0)))
        }
        _ => None,
    }
}

/// Checks one watcher's sequence against the reference (every change revision, from a watch
/// on the leader that never broke): revisions strictly increase, and between two changes the
/// watcher saw, every change it did not see is covered by a snapshot — no gap, no duplicate.
fn gapless(name: &str, seen: &[Seen], reference: &[u64], last_revision: u64) -> Result<(), String> {
    let mut last = 0u64;
    for (i, s) in seen.iter().enumerate() {
        let around = || format!("{:?}", &seen[i.saturating_sub(6)..(i + 3).min(seen.len())]);
        match *s {
            Seen::Open(..) => {}
            Seen::Snapshot(p) => last = last.max(p),
            Seen::Event(r) => {
                if r <= last {
                    return Err(format!(
                        "{name}: event {r} after {last} (duplicate or out of order): {}",
                        around()
                    ));
                }
                if let Some(missed) = reference.iter().find(|&&x| x > last && x < r) {
                    return Err(format!(
                        "{name}: gap: {missed} missing between {last} and {r}: {}",
                        around()
                    ));
                }
                if !reference.contains(&r) {
                    return Err(format!("{name}: event {r} that the leader never sent"));
                }
                last = r;
            }
        }
    }
    if let Some(missed) = reference.iter().find(|&&x| x > last && x <= last_revision) {
        return Err(format!("{name}: ended at {last}, never saw {missed}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_randomized_history_with_follower_restarts_is_gapless_and_ends_as_acknowledged() {
    use sextant_model::XorShift;
    let seed: u64 = std::env::var("SEXTANT_HISTORY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261201);
    eprintln!("randomized history: seed {seed} (set SEXTANT_HISTORY_SEED to replay another)");
    let etcd = Etcd::start();
    let start = |etcd: &Etcd| start_node(&etcd.endpoint, "/history/");
    let mut nodes: Vec<Server> = (0..3).map(|_| start(&etcd)).collect();
    let refs: Vec<&Server> = nodes.iter().collect();
    let l = leader_of(&refs, Duration::from_secs(15)).await;
    let leader = nodes[l].api();
    let live: Arc<Mutex<Vec<Option<Api>>>> =
        Arc::new(Mutex::new(nodes.iter().map(|n| Some(n.api())).collect()));
    let stop = Arc::new(AtomicBool::new(false));

    // The last revision, once the writers stopped (until then: none).
    let final_revision = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    // The reference: a watch on the leader (never killed), which must never break.
    let reference = {
        let api = leader.clone();
        let final_revision = final_revision.clone();
        tokio::spawn(async move {
            let mut w = Tolerant::open(&api, None)
                .await
                .expect("watch on the leader");
            let (mut state, mut seen) = (State::new(), Vec::new());
            let mut at = 0;
            let deadline = Instant::now() + Duration::from_secs(55);
            while at < final_revision.load(Ordering::SeqCst) {
                assert!(
                    Instant::now() < deadline,
                    "the reference watch never caught up"
                );
                // Quiet (`None`) is fine: the writers may pause.
                if let Some(f) = w.next(Duration::from_millis(200)).await {
                    seen.extend(apply_frame(&mut state, &f));
                    at = f.revision_id().unwrap_or(at);
                }
            }
            seen
        })
    };

    // Writers: three clients, each owning four instance ids, doing random registrations (a new
    // port each time), deregistrations and status changes on the leader; each keeps the state
    // its acknowledged writes leave.
    let mut writers = Vec::new();
    for c in 0..3u64 {
        let (api, stop) = (leader.clone(), stop.clone());
        let mut rng = XorShift::new(seed.wrapping_mul(c + 1).wrapping_add(c));
        writers.push(tokio::spawn(async move {
            let mut model = State::new();
            let mut ops = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("c{c}-{}", rng.below(4));
                let path = instance_path("h", "s", &id);
                let cur = model.get(&id).copied();
                match rng.below(10) {
                    0..=4 => {
                        let port = 1 + rng.below(60000);
                        let r = api
                            .put(&path, &json!({"host": "10.5.0.1", "port": port}))
                            .await;
                        assert_eq!(r.status, 200, "{}", r.text);
                        model.insert(id, (port, cur.is_none_or(|c| c.1)));
                    }
                    5..=6 => {
                        let r = api.delete(&path).await;
                        match r.status {
                            200 => assert!(model.remove(&id).is_some(), "deleted {id}, absent"),
                            404 => assert!(cur.is_none(), "{id} present, 404"),
                            s => panic!("{s}: {}", r.text),
                        }
                    }
                    _ => {
                        let enabled = rng.below(2) == 0;
                        let r = api
                            .patch(&format!("{path}/status"), &json!({"enabled": enabled}))
                            .await;
                        match r.status {
                            200 => {
                                let c = model.get_mut(&id).expect("status of an absent one");
                                c.1 = enabled;
                            }
                            404 => assert!(cur.is_none(), "{id} present, 404"),
                            s => panic!("{s}: {}", r.text),
                        }
                    }
                }
                ops += 1;
                tokio::time::sleep(Duration::from_millis(rng.below(40))).await;
            }
            (model, ops)
        }));
    }

    // Watchers: three, each on a random live node, resuming on another random one with the
    // last delivery's revision when its node dies, and every 0.3-1.5 s anyway.
    let mut watchers = Vec::new();
    for w in 0..3u64 {
        let (live, final_revision) = (live.clone(), final_revision.clone());
        let mut rng = XorShift::new(seed ^ (0xabcd + w));
        watchers.push(tokio::spawn(async move {
            let (mut state, mut seen) = (State::new(), Vec::new());
            let mut since: Option<u64> = None;
            let mut resumes = 0u32;
            let deadline = Instant::now() + Duration::from_secs(55);
            loop {
                if since.is_some_and(|s| s >= final_revision.load(Ordering::SeqCst)) {
                    break;
                }
                assert!(Instant::now() < deadline, "watcher {w} never caught up");
                let api = {
                    let nodes = live.lock().unwrap();
                    let up: Vec<&Api> = nodes.iter().flatten().collect();
                    up[rng.below(up.len() as u64) as usize].clone()
                };
                let Some(mut watch) = Tolerant::open(&api, since).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                resumes += 1;
                seen.push(Seen::Open(api.base.clone(), since.unwrap_or(0)));
                // Read until the stream breaks, it is caught up at the end, or it is time to
                // move to another node anyway (as a client behind a balancer may).
                let hop_at = Instant::now() + Duration::from_millis(300 + rng.below(1200));
                // A delivery counts once whole (its last frame carries the SSE id, the resume
                // point): a stream cut in the middle of one is resumed from the one before,
                // which sends it again, so its part seen here is dropped, as a client does.
                let mut delivery = Vec::new();
                while let Some(f) = watch.next(Duration::from_millis(300)).await {
                    if f.event == "close" {
                        break;
                    }
                    let boundary = f.revision_id();
                    delivery.push(f);
                    let Some(id) = boundary else { continue };
                    for f in delivery.drain(..) {
                        seen.extend(apply_frame(&mut state, &f));
                    }
                    since = Some(id);
                    if id >= final_revision.load(Ordering::SeqCst) || Instant::now() >= hop_at {
                        break;
                    }
                }
                // A quiet stream is fine while writes go on; read it again.
                if since.is_some_and(|s| s >= final_revision.load(Ordering::SeqCst)) {
                    break;
                }
            }
            (state, seen, resumes)
        }));
    }

    // Chaos: kill -9 a random follower and start a new one, for 20 s.
    let mut rng = XorShift::new(seed);
    let chaos_until = Instant::now() + Duration::from_secs(20);
    let mut restarts = 0;
    while Instant::now() < chaos_until {
        tokio::time::sleep(Duration::from_millis(1500 + rng.below(2000))).await;
        let i = {
            let followers: Vec<usize> = (0..nodes.len()).filter(|&i| i != l).collect();
            followers[rng.below(followers.len() as u64) as usize]
        };
        live.lock().unwrap()[i] = None;
        nodes[i].kill9();
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1000))).await;
        nodes[i] = tokio::task::block_in_place(|| start(&etcd));
        live.lock().unwrap()[i] = Some(nodes[i].api());
        restarts += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let mut want = State::new();
    let mut ops = 0;
    for w in writers {
        let (model, n) = w.await.expect("writer");
        want.extend(model);
        ops += n;
    }
    let last = leader.get("/v1/cluster").await.body["revision"]
        .as_u64()
        .expect("revision");
    final_revision.store(last, Ordering::SeqCst);
    let reference = reference.await.expect("reference watch");
    assert!(
        matches!(reference.first(), Some(Seen::Snapshot(_)))
            && reference
                .iter()
                .skip(1)
                .all(|s| matches!(s, Seen::Event(_))),
        "the leader's own watch must never resync"
    );
    let ref_revs: Vec<u64> = reference
        .iter()
        .filter_map(|s| match s {
            Seen::Event(r) => Some(*r),
            _ => None,
        })
        .collect();
    gapless("reference", &reference, &ref_revs, last).expect("the reference itself");

    // Every node ends in the acknowledged state, at the leader's revision.
    for n in &nodes {
        let api = n.api();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = api.service("h", "s").await;
            let got: State = s["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .map(instance_state)
                .collect();
            if got == want && s["revision"].as_u64().is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {got:?} instead of the acknowledged {want:?}",
                n.http
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rev = api.get("/v1/cluster").await.body["revision"].as_u64();
        assert_eq!(rev, Some(last), "{} at another revision", n.http);
    }
    let mut resumes = 0;
    for (i, w) in watchers.into_iter().enumerate() {
        let (state, seen, r) = w.await.expect("watcher");
        resumes += r;
        gapless(&format!("watcher {i}"), &seen, &ref_revs, last).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state, want, "watcher {i}'s view");
    }
    eprintln!(
        "randomized history (seed {seed}): {ops} acknowledged writes, {} changes up to revision {last}, {restarts} follower restarts, {resumes} watch connections, final {} instances",
        ref_revs.len(),
        want.len()
    );
}
