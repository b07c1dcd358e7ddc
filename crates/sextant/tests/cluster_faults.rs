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
//!   election and every acknowledged write is on every node.

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

/// Waits (bounded) until exactly one of `nodes` leads and the others name it; its index.
async fn leader_of(nodes: &[&Server], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let mut views = Vec::new();
        for n in nodes {
            views.push(n.api().get("/v1/cluster").await.body);
        }
        let leaders: Vec<usize> = (0..nodes.len())
            .filter(|&i| views[i]["role"] == "leader")
            .collect();
        if let [l] = leaders.as_slice() {
            let addr = format!("http://{}", nodes[*l].http);
            let named = views
                .iter()
                .enumerate()
                .all(|(i, v)| i == *l || v["leader"].as_str().is_some_and(|s| s.contains(&addr)));
            if named {
                return *l;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no single leader within {within:?}: {views:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
        assert!(Instant::now() < deadline, "PUT {path} not taken within {within:?}");
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
    let f = 1 - l;
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
                assert!(r.text.contains("degraded") && r.text.contains("etcd"), "{}", r.text);
                break;
            }
            assert!(Instant::now() < deadline, "/readyz stayed {}: {}", r.status, r.text);
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
    assert!(in_outage.len() >= 8, "{} heartbeats in the outage", in_outage.len());
    for b in &in_outage {
        assert_eq!(
            (b.status, b.renewed),
            (200, 3),
            "a heartbeat in the outage was not taken: {b:?}"
        );
    }
    // Before the outage the leader took them and the follower refused them (it is the leader's
    // to renew leases), so both kinds of node are covered.
    assert!(beats.iter().any(|b| b.at < down && b.node == l && b.status == 200));
    assert!(beats.iter().any(|b| b.at < down && b.node == f && b.status == 503));
    eprintln!(
        "etcd outage {outage:?}: /readyz degraded on both nodes {degraded:?} after the kill; a write refused in {write_latency:?}; {} heartbeats taken in the outage; writes taken again {writable_after:?} after etcd's restart",
        in_outage.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_past_compaction_resyncs_and_its_watchers_get_snapshots() {
    let etcd = Etcd::start();
    let mut nodes = vec![
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
            .register("c", "s", &format!("a{n}"), &json!({"host": "10.3.0.1", "port": n + 1}))
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
            .register("c", "s", &format!("b{n}"), &json!({"host": "10.3.0.2", "port": n + 1}))
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
            assert_eq!(s["instances"], head["instances"], "same state as the leader");
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
    let raft_leader = etcd
        .leader(Duration::from_secs(5))
        .expect("an etcd leader");
    let before = acked.lock().unwrap().len();
    etcd.members[raft_leader].kill();
    let killed = Instant::now();
    // Writes resume: 50 more acknowledged after the kill, bounded.
    let deadline = killed + Duration::from_secs(30);
    loop {
        let after = acked.lock().unwrap().iter().filter(|a| a.2 > killed).count();
        if after >= 50 {
            break;
        }
        assert!(Instant::now() < deadline, "writes did not resume: {after} after the kill");
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
            let missing: Vec<&&str> = by_id
                .keys()
                .filter(|id| find(&s, id).is_none())
                .collect();
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
