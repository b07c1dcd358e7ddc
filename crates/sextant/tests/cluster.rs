//! Cluster mode: one etcd (`sextant_testkit::Etcd`) and three real `sextant serve` nodes on
//! one prefix. Exactly one node leads; writes on it reach both followers' APIs and watches at
//! the same revisions (the lag is measured and printed); followers refuse writes and
//! heartbeats with a 503 naming the leader (SSE and gRPC watches both checked); `/v1/cluster` lists the members. Killing the
//! leader with SIGKILL elects another node, writes go on above the old revisions, nothing
//! acknowledged is lost, and a watcher that moves from one node to another with its last
//! revision gets exactly the events after it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use sextant_proto::v1 as pb;
use sextant_proto::v1::watch_event::Kind;
use sextant_testkit::Etcd;

const LEASE_SECONDS: &str = "2";
const FRAME: Duration = Duration::from_secs(10);

fn start_node(etcd: &Etcd) -> Server {
    Server::start_with_args(&[
        "--store",
        "etcd",
        "--etcd-endpoints",
        &etcd.endpoint,
        "--etcd-prefix",
        "/cluster-test/",
        "--cluster-lease-seconds",
        LEASE_SECONDS,
        "--no-nacos",
        "--no-dns",
    ])
}

async fn cluster_view(api: &Api) -> Value {
    api.get("/v1/cluster").await.ok()
}

/// Waits (bounded) until exactly one of `nodes` says it leads and the others name it; returns
/// its index.
async fn leader_of(nodes: &[&Server], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let mut views = Vec::new();
        for n in nodes {
            views.push(cluster_view(&n.api()).await);
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

/// The change events of the next `n` change frames: (kind, instance id, revision); the last
/// delivery boundary (SSE id) seen is returned too.
async fn changes(sse: &mut Sse, n: usize) -> (Vec<(String, String, u64)>, u64) {
    let mut got = Vec::new();
    let mut boundary = 0;
    while got.len() < n {
        let f = sse.expect(FRAME).await;
        if let Some(id) = f.id {
            boundary = id;
        }
        let id = match f.event.as_str() {
            "upsert" => f.data["instance"]["id"].as_str(),
            "status" | "delete" => f.data["id"].as_str(),
            _ => continue, // snapshots and bookmarks
        };
        got.push((
            f.event.clone(),
            id.unwrap_or("?").to_string(),
            f.data["revision"].as_u64().expect("revision"),
        ));
    }
    (got, boundary)
}

fn body(port: u16) -> Value {
    json!({"host": "10.1.0.1", "port": port})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_the_leader_reach_every_follower_at_the_same_revisions() {
    let etcd = Etcd::start();
    let nodes = [start_node(&etcd), start_node(&etcd), start_node(&etcd)];
    let refs: Vec<&Server> = nodes.iter().collect();
    let l = leader_of(&refs, Duration::from_secs(15)).await;
    let leader = nodes[l].api();
    let followers: Vec<Api> = (0..3).filter(|&i| i != l).map(|i| nodes[i].api()).collect();

    // Followers refuse writes and heartbeats, naming the leader.
    let addr = format!("http://{}", nodes[l].http);
    let refused = followers[0]
        .put(&instance_path("c", "s", "x"), &body(1))
        .await;
    refused.assert_error(503, &["follower", &addr]);
    let hb = followers[1]
        .post(
            "/v1/heartbeats",
            &json!([{"namespace": "c", "service": "s", "id": "x"}]),
        )
        .await;
    hb.assert_error(503, &["follower", &addr]);

    // A watcher on every node, then writes on the leader.
    let mut watches = Vec::new();
    for api in std::iter::once(&leader).chain(&followers) {
        let mut sse = Sse::open(api, "service=c/s", None).await;
        assert_eq!(sse.expect(FRAME).await.event, "snapshot");
        watches.push(sse);
    }
    // And a gRPC watch on a follower.
    let follower_grpc = nodes[(0..3).find(|&i| i != l).unwrap_or(0)].grpc;
    let mut grpc_watch = grpc_client(follower_grpc)
        .await
        .watch(pb::WatchRequest {
            services: vec![svc_ref("c", "s")],
            since: None,
        })
        .await
        .expect("gRPC watch")
        .into_inner();
    let first = bounded("the gRPC snapshot", FRAME, grpc_watch.message())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(first.kind, Some(Kind::Snapshot(_))), "{first:?}");
    let mut want = Vec::new();
    let mut lags = Vec::new();
    let mut from_sent = Vec::new();
    for n in 0..20u16 {
        let id = format!("i{n}");
        let sent = Instant::now();
        let r = leader.register("c", "s", &id, &body(1000 + n)).await;
        let acked = Instant::now();
        want.push(("upsert".to_string(), id.clone(), r));
        // The time until each follower's watcher has it: the replication lag.
        for sse in watches.iter_mut().skip(1) {
            let (got, _) = changes(sse, 1).await;
            assert_eq!(got, [want.last().unwrap().clone()]);
            lags.push(acked.elapsed());
            from_sent.push(sent.elapsed());
        }
        let (got, _) = changes(&mut watches[0], 1).await;
        assert_eq!(got, [want.last().unwrap().clone()], "on the leader");
    }
    let r = leader
        .set_status("c", "s", "i3", &json!({"enabled": false}))
        .await;
    want.push(("status".into(), "i3".into(), r));
    let r = leader.deregister("c", "s", "i4").await;
    want.push(("delete".into(), "i4".into(), r));
    for sse in watches.iter_mut() {
        let (got, _) = changes(sse, 2).await;
        assert_eq!(got, want[want.len() - 2..]);
    }
    // The gRPC watcher on a follower got the same events at the same revisions.
    let mut over_grpc = Vec::new();
    while over_grpc.len() < want.len() {
        let e = bounded("a gRPC event", FRAME, grpc_watch.message())
            .await
            .expect("gRPC watch failed")
            .expect("gRPC watch ended");
        let kind = match &e.kind {
            Some(Kind::Upsert(_)) => "upsert",
            Some(Kind::Status(_)) => "status",
            Some(Kind::Delete(_)) => "delete",
            _ => continue,
        };
        over_grpc.push((kind.to_string(), e.revision));
    }
    let want_kinds: Vec<(String, u64)> = want.iter().map(|(k, _, r)| (k.clone(), *r)).collect();
    assert_eq!(over_grpc, want_kinds, "gRPC watch on a follower");

    lags.sort();
    from_sent.sort();
    eprintln!(
        "replication lag, {} samples: ack on the leader -> event on a follower's SSE watch p50 {:?} max {:?}; write sent to the leader -> event on a follower p50 {:?} max {:?}",
        lags.len(),
        lags[lags.len() / 2],
        lags[lags.len() - 1],
        from_sent[from_sent.len() / 2],
        from_sent[from_sent.len() - 1],
    );

    // The same service, revision and instances everywhere.
    let on_leader = leader.service("c", "s").await;
    for f in &followers {
        let s = f.service("c", "s").await;
        assert_eq!(s["revision"], on_leader["revision"]);
        assert_eq!(s["instances"], on_leader["instances"]);
    }
    // A blocking query on a follower wakes on a leader's write.
    let index = on_leader["revision"].as_u64().unwrap();
    let f0 = followers[0].clone();
    let wait = tokio::spawn(async move {
        f0.get(&format!(
            "{}?index={index}&wait=10s",
            service_path("c", "s")
        ))
        .await
        .ok()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = leader.register("c", "s", "late", &body(9)).await;
    let woke = bounded("the blocking query", Duration::from_secs(10), wait)
        .await
        .unwrap();
    assert_eq!(woke["revision"].as_u64(), Some(r));

    // /v1/cluster: three members, one leader, caught up (within a renewal).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = cluster_view(&followers[1]).await;
        let members = v["members"].as_array().cloned().unwrap_or_default();
        let leaders = members.iter().filter(|m| m["role"] == "leader").count();
        let caught_up = members.iter().all(|m| m["lag"] == 0);
        if members.len() == 3 && leaders == 1 && caught_up {
            assert_eq!(v["role"], "follower");
            assert_eq!(v["store"]["healthy"], true, "{v}");
            assert_eq!(v["store"]["head"].as_u64(), Some(r), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "members: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_a_moving_watcher_sees_no_gap() {
    let etcd = Etcd::start();
    let mut nodes = [start_node(&etcd), start_node(&etcd), start_node(&etcd)];
    let refs: Vec<&Server> = nodes.iter().collect();
    let l = leader_of(&refs, Duration::from_secs(15)).await;
    let (a, b) = match l {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let leader = nodes[l].api();
    let mut acked: Vec<(String, u64)> = Vec::new();

    // A watcher on A sees four writes, one delivery each, then goes; six more are written
    // while no watcher is connected; it comes back on B with the last revision it saw.
    let mut on_a = Sse::open(&nodes[a].api(), "service=m/s", None).await;
    assert_eq!(on_a.expect(FRAME).await.event, "snapshot");
    let mut boundary = 0;
    for n in 0..10u16 {
        let id = format!("before{n}");
        let r = leader.register("m", "s", &id, &body(n + 1)).await;
        acked.push((id.clone(), r));
        if n < 4 {
            let (got, b) = changes(&mut on_a, 1).await;
            assert_eq!(got, [("upsert".to_string(), id, r)]);
            assert_eq!(b, r, "one write, one delivery");
            boundary = b;
        } else if n == 4 {
            drop(std::mem::replace(
                &mut on_a,
                Sse::open(&nodes[a].api(), "service=m/none", None).await,
            ));
        }
    }
    let mut on_b = Sse::open(
        &nodes[b].api(),
        &format!("service=m/s&since={boundary}"),
        None,
    )
    .await;
    let rest: Vec<u64> = acked
        .iter()
        .map(|(_, r)| *r)
        .filter(|r| *r > boundary)
        .collect();
    assert_eq!(rest.len(), 6);
    let (got, _) = changes(&mut on_b, rest.len()).await;
    assert_eq!(
        got.iter().map(|g| g.2).collect::<Vec<_>>(),
        rest,
        "exactly the events after {boundary}"
    );
    drop(on_a);

    // Kill -9 the leader: another node is elected and takes writes.
    let killed = Instant::now();
    nodes[l].kill9();
    let survivors = [&nodes[a], &nodes[b]];
    let nl = leader_of(&survivors, Duration::from_secs(20)).await;
    let elected = killed.elapsed();
    let new_leader = survivors[nl].api();
    let mut first_write = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in 0..10u16 {
        let id = format!("after{n}");
        loop {
            let resp = new_leader
                .put(&instance_path("m", "s", &id), &body(100 + n))
                .await;
            if resp.status == 200 {
                let r = resp.body["revision"].as_u64().unwrap();
                first_write.get_or_insert(killed.elapsed());
                acked.push((id.clone(), r));
                break;
            }
            assert_eq!(resp.status, 503, "{}", resp.text);
            assert!(
                Instant::now() < deadline,
                "writes did not resume: {}",
                resp.text
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!(
        "failover after kill -9 of the leader (lease {LEASE_SECONDS} s): new leader seen after {elected:?}, first write acknowledged after {:?}",
        first_write.unwrap()
    );
    // Revisions go on above everything acknowledged before.
    let revs: Vec<u64> = acked.iter().map(|(_, r)| *r).collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");

    // The watcher on B saw the new leader's writes, right after the old ones.
    let after: Vec<u64> = revs[10..].to_vec();
    let (got, _) = changes(&mut on_b, after.len()).await;
    assert_eq!(got.iter().map(|g| g.2).collect::<Vec<_>>(), after);
    on_b.expect_quiet(Duration::from_millis(300)).await;

    // Nothing acknowledged is lost, on either survivor.
    for n in &survivors {
        let s = n.api().service("m", "s").await;
        for (id, r) in &acked {
            let i = find(&s, id).unwrap_or_else(|| panic!("{id} acknowledged, missing: {s}"));
            assert_eq!(i["spec_revision"].as_u64(), Some(*r), "{id}");
        }
    }
}
