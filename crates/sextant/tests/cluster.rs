//! Cluster mode: one etcd (`sextant_testkit::Etcd`) and three real `sextant serve` nodes on
//! one prefix. Exactly one node leads; writes on it reach both followers' APIs and watches at
//! the same revisions (the lag is measured and printed; SSE and gRPC watches both checked);
//! `/v1/cluster` lists the members. Killing the leader with SIGKILL elects another node, writes
//! go on above the old revisions, nothing acknowledged is lost, and a watcher that moves from
//! one node to another with its last revision gets exactly the events after it.
//!
//! Forwarding: a follower takes writes (native HTTP, the SDK) and heartbeats for the leader —
//! acknowledged, read-your-writes on the follower, visible everywhere; errors keep their status
//! (400, 404, 403 with auth on) and the leader's audit names the token and the follower; an
//! ephemeral instance renewed only through a follower outlives several TTLs; kill -9 of the
//! follower an SDK uses: it fails over and its instance is never removed; with TLS, only a
//! node with a CA for the leader's certificate forwards; the leader's peer service refuses
//! calls without the cluster secret.
//!
//! Health checks: each node probes exactly its rendezvous share of the services, and a killed
//! node's share moves to the survivors (a dead target still gets marked unhealthy).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use sextant_client::{Client, Registration, ServiceName};
use sextant_proto::v1 as pb;
use sextant_proto::v1::watch_event::Kind;
use sextant_testkit::Etcd;

const LEASE_SECONDS: &str = "2";
const FRAME: Duration = Duration::from_secs(10);

fn start_node(etcd: &Etcd) -> Server {
    start_node_with(etcd, &[])
}

/// `serve` flags of a cluster node on `etcd` (the suite's prefix and lease, no extra listeners).
fn node_args(etcd: &Etcd) -> Vec<&str> {
    vec![
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
        "--no-consul",
    ]
}

fn start_node_with(etcd: &Etcd, extra: &[&str]) -> Server {
    let mut args = node_args(etcd);
    args.extend_from_slice(extra);
    Server::start_with_args(&args)
}

/// Polls `check` every 100 ms until it holds; panics with `what` after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn cluster_view(api: &Api) -> Value {
    api.get("/v1/cluster").await.ok()
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

    // Followers take writes and heartbeats for the leader (see the forwarding tests).
    let r = followers[0].register("c", "other", "x", &body(1)).await;
    let hb = followers[1]
        .post(
            "/v1/heartbeats",
            &json!([{"namespace": "c", "service": "other", "id": "x"}]),
        )
        .await
        .ok();
    assert_eq!(hb["persistent"], 1, "{hb}");
    assert!(r > 0);

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

/// The index of a node other than `l`.
fn other_than(l: usize, skip: usize) -> usize {
    (0..3).filter(|&i| i != l).nth(skip).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_takes_writes_and_heartbeats_for_the_leader() {
    let etcd = Etcd::start();
    let nodes = [start_node(&etcd), start_node(&etcd), start_node(&etcd)];
    let refs: Vec<&Server> = nodes.iter().collect();
    let l = leader_of(&refs, Duration::from_secs(15)).await;
    let leader = nodes[l].api();
    let f = nodes[other_than(l, 0)].api();

    // A registration through a follower's native HTTP: acknowledged, and readable on that
    // follower at once (read your writes), then on every node.
    for n in 0..5u16 {
        let id = format!("f{n}");
        let r = f.register("fw", "s", &id, &body(2000 + n)).await;
        let here = f.service("fw", "s").await;
        let i = find(&here, &id).unwrap_or_else(|| {
            panic!("{id} not readable on the follower right after its ack: {here}")
        });
        assert_eq!(i["spec_revision"].as_u64(), Some(r));
        assert!(here["revision"].as_u64().unwrap() >= r);
    }
    let want = f.service("fw", "s").await;
    for n in &nodes {
        let api = n.api();
        let want = want.clone();
        eventually(
            "the follower's writes on every node",
            Duration::from_secs(10),
            || {
                let api = api.clone();
                let want = want.clone();
                async move { api.service("fw", "s").await["instances"] == want["instances"] }
            },
        )
        .await;
    }
    // What forwarding costs: sequential registrations answered by the follower (forward +
    // wait until applied here) against the same on the leader.
    let timed = |samples: &mut Vec<Duration>, t: Instant| samples.push(t.elapsed());
    let (mut via_follower, mut direct) = (Vec::new(), Vec::new());
    for n in 0..20u16 {
        let t = Instant::now();
        f.register("fw", "lat", &format!("f{n}"), &body(n + 1))
            .await;
        timed(&mut via_follower, t);
        let t = Instant::now();
        leader
            .register("fw", "lat", &format!("l{n}"), &body(n + 1))
            .await;
        timed(&mut direct, t);
    }
    via_follower.sort();
    direct.sort();
    eprintln!(
        "registration latency, 20 sequential: through a follower p50 {:?} max {:?}; on the leader p50 {:?} max {:?}",
        via_follower[10], via_follower[19], direct[10], direct[19]
    );

    // Status and deregistration through the follower too.
    f.set_status("fw", "s", "f1", &json!({"enabled": false}))
        .await;
    assert_eq!(
        find(&f.service("fw", "s").await, "f1").unwrap()["status"]["enabled"],
        false
    );
    f.deregister("fw", "s", "f2").await;
    assert!(find(&f.service("fw", "s").await, "f2").is_none());

    // Errors keep their class and message: bad input refused on the follower (400), an
    // instance only the leader finds missing (404, decided by the leader's writer).
    let bad = f
        .put(
            &instance_path("fw", "s", "bad"),
            &json!({"host": "10.0.0.1", "port": 0}),
        )
        .await;
    bad.assert_error(400, &["port"]);
    let missing = f
        .patch(
            &format!("{}/status", instance_path("fw", "s", "nobody")),
            &json!({"enabled": true}),
        )
        .await;
    let on_leader = leader
        .patch(
            &format!("{}/status", instance_path("fw", "s", "nobody")),
            &json!({"enabled": true}),
        )
        .await;
    assert_eq!(
        missing.status, on_leader.status,
        "{} vs {}",
        missing.text, on_leader.text
    );
    assert_eq!(missing.body["error"], on_leader.body["error"]);
    missing.assert_error(404, &["nobody"]);

    // An ephemeral instance (TTL 2 s) registered and heartbeated only through a follower stays
    // alive for several TTLs: the follower sends the renewals to the leader, which keeps
    // the leases. Then, heartbeats stopped, the leader expires it within TTL + sweep.
    let eph = json!({"host": "10.9.0.1", "port": 7, "ttl_seconds": 2});
    f.register("fw", "eph", "e1", &eph).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(7) {
        let hb = f
            .post(
                "/v1/heartbeats",
                &json!([{"namespace": "fw", "service": "eph", "id": "e1"}]),
            )
            .await
            .ok();
        assert_eq!(hb["renewed"], 1, "{hb}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for n in &nodes {
        let s = n.api().service("fw", "eph").await;
        assert!(
            find(&s, "e1").is_some(),
            "expired although renewed through a follower: {s}"
        );
    }
    let renewals = metric(&f, "sextant_forwarded_renewals_total").await;
    let ops = metric(&f, "sextant_forwarded_ops_total").await;
    let received = metric(&leader, "sextant_forward_received_ops_total").await;
    eprintln!(
        "follower forwarded {ops} ops and {renewals} renewals; the leader received {received} ops"
    );
    assert!(
        renewals >= 1.0 && ops >= 29.0 && received >= ops,
        "{ops} {renewals} {received}"
    );
    let stopped = Instant::now();
    eventually(
        "the lapsed instance removed",
        Duration::from_secs(8),
        || {
            let f = f.clone();
            async move { find(&f.service("fw", "eph").await, "e1").is_none() }
        },
    )
    .await;
    eprintln!(
        "heartbeats stopped -> removed on the follower after {:?} (TTL 2 s)",
        stopped.elapsed()
    );
    // A heartbeat for it now says unknown (the client registers again).
    let hb = f
        .post(
            "/v1/heartbeats",
            &json!([{"namespace": "fw", "service": "eph", "id": "e1"}]),
        )
        .await
        .ok();
    assert_eq!(hb["unknown"].as_array().map(Vec::len), Some(1), "{hb}");
}

fn sdk(servers: &[&Server]) -> Client {
    Client::builder()
        .servers(servers.iter().map(|s| format!("http://{}", s.grpc)))
        .call_timeout(Duration::from_secs(3))
        .connect_timeout(Duration::from_secs(1))
        .backoff(Duration::from_millis(50), Duration::from_millis(300))
        .heartbeat_interval(Duration::from_millis(500))
        .build()
        .expect("build the SDK client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_on_a_follower_survives_that_followers_death() {
    let etcd = Etcd::start();
    let mut nodes = [start_node(&etcd), start_node(&etcd), start_node(&etcd)];
    let refs: Vec<&Server> = nodes.iter().collect();
    let l = leader_of(&refs, Duration::from_secs(15)).await;
    let (fa, fb) = (other_than(l, 0), other_than(l, 1));
    let leader = nodes[l].api();

    // Pointed only at a follower: registers (forwarded) and keeps the instance alive.
    let only_follower = sdk(&[&nodes[fa]]);
    let web = ServiceName::new("sdk", "web").unwrap();
    only_follower
        .register(
            Registration::new(web.clone(), "10.2.0.1", 80)
                .id("solo")
                .ttl(Duration::from_secs(2)),
        )
        .await
        .expect("register through a follower");
    // With the whole server list, the follower first: the one it uses.
    let listed = sdk(&[&nodes[fa], &nodes[fb], &nodes[l]]);
    listed
        .register(
            Registration::new(web.clone(), "10.2.0.2", 80)
                .id("moving")
                .ttl(Duration::from_secs(3)),
        )
        .await
        .expect("register through the first follower");
    assert!(
        find(&nodes[fa].api().service("sdk", "web").await, "moving").is_some(),
        "read your writes"
    );

    // Watch the service on the leader: no delete may come.
    let mut watch = Sse::open(&leader, "service=sdk/web", None).await;
    assert_eq!(watch.expect(FRAME).await.event, "snapshot");
    tokio::time::sleep(Duration::from_secs(6)).await; // 3 TTLs of "solo"
    let s = leader.service("sdk", "web").await;
    assert!(
        find(&s, "solo").is_some(),
        "the SDK on a follower kept nothing alive: {s}"
    );

    // kill -9 the follower both clients use: "moving" fails over (another node takes its
    // heartbeats) and stays; "solo" has nowhere to go and lapses.
    let killed = Instant::now();
    nodes[fa].kill9();
    tokio::time::sleep(Duration::from_secs(9)).await; // 3 TTLs of "moving"
    let s = leader.service("sdk", "web").await;
    assert!(
        find(&s, "moving").is_some(),
        "the failed-over client's instance was removed: {s}"
    );
    assert!(
        find(&s, "solo").is_none(),
        "an instance whose only server died outlived its TTL: {s}"
    );
    // The only delete the leader's watcher saw is "solo"'s.
    let mut deletes = Vec::new();
    loop {
        match watch.next(Duration::from_millis(300)).await {
            Next::Frame(f) if f.event == "delete" => {
                deletes.push(f.data["id"].as_str().unwrap_or("?").to_string())
            }
            Next::Frame(_) => {}
            _ => break,
        }
    }
    assert_eq!(
        deletes,
        ["solo"],
        "deletes seen after kill -9 at {:?}",
        killed.elapsed()
    );
    let st = listed.stats();
    eprintln!("SDK after its follower's kill -9: {st:?}");
    drop(only_follower);
    let _ = listed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_a_follower_checks_tokens_and_the_leader_audits_the_caller() {
    let etcd = Etcd::start();
    let args = ["--auth", "on"];
    let nodes = [
        start_node_with(&etcd, &args),
        start_node_with(&etcd, &args),
        start_node_with(&etcd, &args),
    ];
    // `/v1/cluster` needs a token now: the leader is the node whose log says it leads.
    let refs: Vec<&Server> = nodes.iter().collect();
    let l = leader_by_log(&refs, Duration::from_secs(15)).await;
    let fi = other_than(l, 0);
    let anon = nodes[fi].api();

    // Bootstrap through a follower (an ACL write, forwarded; 503 until it knows the leader),
    // and use the token there at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = anon.post("/v1/acl/bootstrap", &json!({})).await;
        if r.status != 503 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.status, 201, "{}", r.text);
    let admin_secret = r.body["secret"].as_str().unwrap().to_string();
    let admin = bearer(&nodes[fi], &admin_secret);
    admin
        .put(
            "/v1/acl/policies/prod-w",
            &json!({"rules": [{"namespace": "prod", "rights": ["read", "write"]}]}),
        )
        .await
        .ok();
    let t = admin
        .post(
            "/v1/acl/tokens",
            &json!({"policies": ["prod-w"], "description": "app"}),
        )
        .await;
    assert_eq!(t.status, 201, "{}", t.text);
    let (app_id, app_secret) = (
        t.body["id"].as_str().unwrap().to_string(),
        t.body["secret"].as_str().unwrap().to_string(),
    );
    let app = bearer(&nodes[fi], &app_secret);
    app.register("prod", "web", "a1", &body(1)).await;
    app.put(&instance_path("staging", "web", "a1"), &body(1))
        .await
        .assert_error(403, &["staging"]);
    anon.put(&instance_path("prod", "web", "a2"), &body(1))
        .await
        .assert_error(401, &[]);

    // The leader's audit log names the token and the follower it came through.
    let on_leader = bearer(&nodes[l], &admin_secret);
    let audit = on_leader.get("/v1/audit?namespace=prod").await.ok();
    let entry = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["change"]
                .as_str()
                .is_some_and(|c| c.contains("register prod/web/a1"))
        })
        .cloned()
        .unwrap_or_else(|| panic!("no audit entry for a1: {audit}"));
    assert_eq!(entry["token_id"], app_id.as_str(), "{entry}");
    assert_eq!(entry["protocol"], "http", "{entry}");
    assert!(
        entry["source"].as_str().unwrap().contains(" via "),
        "{entry}"
    );

    // The leader's peer service takes nothing from outside the cluster: no or a wrong
    // cluster secret is refused before the body is read.
    use sextant_proto::cluster_v1::{peer_client::PeerClient, PeerMessage};
    let mut peer = PeerClient::connect(format!("http://{}", nodes[l].grpc))
        .await
        .expect("connect to the leader's gRPC");
    let msg = || PeerMessage {
        node: "intruder".into(),
        body: Vec::new(),
    };
    let e = peer.forward(msg()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let mut wrong = tonic::Request::new(msg());
    wrong
        .metadata_mut()
        .insert("x-sextant-cluster-secret", "guess".parse().unwrap());
    let e = peer.renew(wrong).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
}

fn bearer(server: &Server, secret: &str) -> Api {
    server.api().with_bearer(secret)
}

/// A TCP listener that counts the connections (probes) it accepts; aborting its task closes
/// it, so its target is dead.
struct Probed {
    port: u16,
    hits: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

async fn probed() -> Probed {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let h = hits.clone();
    let task = tokio::spawn(async move {
        loop {
            if let Ok((s, _)) = l.accept().await {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(s);
            }
        }
    });
    Probed { port, hits, task }
}

fn hits(targets: &[Probed]) -> Vec<u64> {
    targets
        .iter()
        .map(|t| t.hits.load(std::sync::atomic::Ordering::SeqCst))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_are_spread_over_the_live_nodes() {
    const N: usize = 12;
    const INTERVAL_MS: u64 = 300;
    let etcd = Etcd::start();
    let mut nodes = [start_node(&etcd), start_node(&etcd), start_node(&etcd)];
    let refs: Vec<&Server> = nodes.iter().collect();
    let l = leader_of(&refs, Duration::from_secs(15)).await;
    let leader = nodes[l].api();
    let mut ids = Vec::new();
    for n in &nodes {
        ids.push(
            cluster_view(&n.api()).await["node_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut targets = Vec::new();
    let check = json!({"check": {"kind": "tcp", "interval_ms": INTERVAL_MS, "timeout_ms": 200, "rise": 1, "fall": 1}});
    for i in 0..N {
        let t = probed().await;
        let svc = format!("s{i}");
        leader
            .register(
                "hc",
                &svc,
                "i",
                &json!({"host": "127.0.0.1", "port": t.port}),
            )
            .await;
        leader.put(&service_path("hc", &svc), &check).await.ok();
        targets.push(t);
    }
    let owner = |live: &[String], i: usize| {
        let key = sextant_model::ServiceKey::new("hc", &format!("s{i}")).unwrap();
        sextant_health::Shard::new(live[0].clone(), live.to_vec())
            .owner(&key)
            .to_string()
    };
    // How many services each of `live` owns.
    let shares = |live: &[String]| -> Vec<f64> {
        live.iter()
            .map(|id| (0..N).filter(|&i| owner(live, i) == *id).count() as f64)
            .collect()
    };
    // Each node probes exactly the services rendezvous hashing gives it.
    let want = shares(&ids);
    let apis: Vec<Api> = nodes.iter().map(Server::api).collect();
    probing(
        "each node probes its share",
        Duration::from_secs(15),
        &apis,
        &want,
    )
    .await;
    eprintln!("health targets per node: {want:?}");
    // One prober per service: about one probe per interval each, not three.
    let before = hits(&targets);
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let one = window.as_millis() as u64 / INTERVAL_MS;
    for (i, (a, b)) in before.iter().zip(hits(&targets)).enumerate() {
        let d = b - a;
        assert!(
            d >= 1 && d <= one * 3 / 2 + 2,
            "s{i}: {d} probes in {window:?} (one prober: ~{one})"
        );
    }
    for i in 0..N {
        let s = leader.service("hc", &format!("s{i}")).await;
        assert_eq!(s["instances"][0]["status"]["health"], "healthy", "{s}");
    }

    // kill -9 a follower that probes something: its services move to the survivors within an
    // interval plus the membership timeout (the lease) plus the member poll and reconcile.
    let victim = (0..3)
        .filter(|&i| i != l)
        .max_by(|&a, &b| want[a].total_cmp(&want[b]))
        .unwrap();
    let moved: Vec<usize> = (0..N).filter(|&i| owner(&ids, i) == ids[victim]).collect();
    let killed = Instant::now();
    nodes[victim].kill9();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let live: Vec<String> = survivors.iter().map(|&i| ids[i].clone()).collect();
    let want_after = shares(&live);
    // Interval + membership timeout (the lease), plus slack for the member poll (a third of
    // the lease), the reconcile (1 s) and a loaded machine.
    let bound =
        Duration::from_millis(INTERVAL_MS) + Duration::from_secs(2) + Duration::from_secs(5);
    let survivor_apis: Vec<Api> = survivors.iter().map(|&i| apis[i].clone()).collect();
    probing(
        "the dead node's services taken over",
        bound,
        &survivor_apis,
        &want_after,
    )
    .await;
    let taken = killed.elapsed();
    let before = hits(&targets);
    tokio::time::sleep(Duration::from_millis(INTERVAL_MS * 4)).await;
    for (i, (a, b)) in before.iter().zip(hits(&targets)).enumerate() {
        assert!(b > *a, "s{i} unprobed after the kill");
    }
    eprintln!("kill -9 of a node probing {} services: taken over after {taken:?} (lease {LEASE_SECONDS} s)", moved.len());

    // A dead target of a moved service is still marked unhealthy, through a follower's flip
    // if a follower took it.
    let dead = moved.first().copied().unwrap_or(0);
    targets[dead].task.abort();
    let svc = format!("s{dead}");
    let api = leader.clone();
    eventually(
        "the dead target marked unhealthy",
        Duration::from_secs(10),
        || {
            let api = api.clone();
            let svc = svc.clone();
            async move {
                api.service("hc", &svc).await["instances"][0]["status"]["health"] == "unhealthy"
            }
        },
    )
    .await;
    for t in &targets {
        t.task.abort();
    }
}

/// The leader by its log (when `/v1/cluster` is not at hand: auth or TLS).
/// Waits until each node's `sextant_health_targets` is `want`'s, in order.
async fn probing(what: &str, within: Duration, apis: &[Api], want: &[f64]) {
    eventually(what, within, || async {
        let mut got = Vec::new();
        for a in apis {
            got.push(metric(a, "sextant_health_targets").await);
        }
        got == want
    })
    .await;
}

async fn leader_by_log(nodes: &[&Server], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let leading: Vec<usize> = (0..nodes.len())
            .filter(|&i| nodes[i].log().contains("this node leads the cluster"))
            .collect();
        if let [l] = leading.as_slice() {
            return *l;
        }
        assert!(Instant::now() < deadline, "no single leader: {leading:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With TLS on, a follower verifies the leader with `--cluster-peer-ca` and forwards; a node
/// with TLS and no CA to verify the leader with does not forward: it refuses writes (503
/// naming the leader) and says so in its log at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_a_follower_forwards_only_with_a_peer_ca() {
    let ca = sextant_testkit::TestCa::new("cluster test CA");
    let files = ca.server("server", "sextant-test");
    let etcd = Etcd::start();
    let tls = ca.serve_args(&files, false);
    let with_ca = {
        let mut a = tls.clone();
        a.push("--cluster-peer-ca".into());
        a.push(ca.ca_file().display().to_string());
        a
    };
    let a = start_node_with(&etcd, &strs(&with_ca));
    let b = start_node_with(&etcd, &strs(&with_ca));
    let l = leader_by_log(&[&a, &b], Duration::from_secs(15)).await;
    let (leader, follower) = if l == 0 { (&a, &b) } else { (&b, &a) };
    let c = start_node_with(&etcd, &strs(&tls));
    assert!(c.log().contains("do not forward"), "{}", c.log());

    let api = https_api(&ca, None);
    // Through the follower that trusts the leader's certificate: forwarded (503 until it
    // knows the leader).
    let r = put_once_the_leader_is_known(&api(follower), &instance_path("tls", "s", "a")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(find(&api(leader).service("tls", "s").await, "a").is_some());
    // Through the node without a peer CA: refused, naming the leader.
    let r = api(&c).put(&instance_path("tls", "s", "b"), &body(2)).await;
    r.assert_error(503, &["leader"]);
}

/// An HTTPS API client of a node, trusting `ca`, presenting `identity` when given (mTLS).
fn https_api(
    ca: &sextant_testkit::TestCa,
    identity: Option<&sextant_testkit::CertFiles>,
) -> impl Fn(&Server) -> Api {
    let pem = std::fs::read(ca.ca_file()).unwrap();
    let mut b = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .no_proxy();
    if let Some(i) = identity {
        let both = [
            std::fs::read(&i.cert).unwrap(),
            std::fs::read(&i.key).unwrap(),
        ]
        .concat();
        b = b.identity(reqwest::Identity::from_pem(&both).unwrap());
    }
    let https = b.build().unwrap();
    move |s: &Server| Api {
        base: format!("https://{}", s.http),
        client: https.clone(),
    }
}

/// A registration through a follower, again while it answers 503 (it does not know the
/// leader yet), for at most 10 s.
async fn put_once_the_leader_is_known(api: &Api, path: &str) -> Resp {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = api.put(path, &body(1)).await;
        if r.status != 503 || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Node ids are unique: a node whose `--node-id` a live member at other addresses holds exits
/// with an error naming the id and the holder; once the holder stopped (its lease revoked),
/// the id is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_held_by_a_live_member_is_refused() {
    let etcd = Etcd::start();
    let first = start_node_with(&etcd, &["--node-id", "dup"]);
    let view = cluster_view(&first.api()).await;
    assert_eq!(view["node_id"], "dup");

    let dir = tempfile::tempdir().unwrap();
    let mut args = sextant_testkit::loopback_args(dir.path(), 0);
    for a in node_args(&etcd).into_iter().chain(["--node-id", "dup"]) {
        args.push(a.into());
    }
    let mut child =
        sextant_testkit::serve_command(std::ffi::OsStr::new(env!("CARGO_BIN_EXE_sextant")), &args)
            .spawn()
            .expect("run sextant serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a second node under the id \"dup\" started and kept serving");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("node id \"dup\" is held by a live member at")
            && stderr.contains(&format!("http://{}", first.http)),
        "{stderr}"
    );

    first.terminate();
    let mut first = first;
    first.wait_exit(Duration::from_secs(10)).expect("stopped");
    let second = start_node_with(&etcd, &["--node-id", "dup"]);
    assert_eq!(cluster_view(&second.api()).await["node_id"], "dup");
}

/// Under mTLS (every listener requires a client certificate of the CA) a follower forwards
/// with its own node certificate, which the leader verifies like any client's: a write sent
/// to the follower lands on the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_mtls_a_follower_forwards_with_its_node_certificate() {
    let ca = sextant_testkit::TestCa::new("cluster mTLS CA");
    let etcd = Etcd::start();
    let a_files = ca.node("node-a", "node-a");
    let b_files = ca.node("node-b", "node-b");
    let a = start_node_with(&etcd, &strs(&ca.serve_args(&a_files, true)));
    let b = start_node_with(&etcd, &strs(&ca.serve_args(&b_files, true)));
    let l = leader_by_log(&[&a, &b], Duration::from_secs(15)).await;
    let (leader, follower) = if l == 0 { (&a, &b) } else { (&b, &a) };

    let me = ca.client("tester", "tester", vec!["localhost".into()]);
    let api = https_api(&ca, Some(&me));
    let r = put_once_the_leader_is_known(&api(follower), &instance_path("mtls", "s", "a")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(find(&api(leader).service("mtls", "s").await, "a").is_some());

    // A node whose certificate is for serving only cannot be a client: it says so at start.
    let c_files = ca.server("node-c", "node-c");
    let c = start_node_with(&etcd, &strs(&ca.serve_args(&c_files, true)));
    assert!(c.log().contains("lacks the clientAuth"), "{}", c.log());
    assert!(!a.log().contains("lacks the clientAuth"), "{}", a.log());
}

/// A follower reads its peer TLS files again when they change: started with a CA that does not
/// sign the leader's certificate it cannot forward (503 naming the leader); once the operator
/// puts the right CA in the file, forwarding works without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_reloads_its_peer_ca_file() {
    let ca = sextant_testkit::TestCa::new("cluster CA");
    let other = sextant_testkit::TestCa::new("some other CA");
    let files = ca.server("server", "sextant-test");
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let peer_ca = dir.path().join("peer-ca.pem");
    std::fs::copy(other.ca_file(), &peer_ca).unwrap();
    let mut args = ca.serve_args(&files, false);
    args.push("--cluster-peer-ca".into());
    args.push(peer_ca.display().to_string());
    let a = start_node_with(&etcd, &strs(&args));
    let b = start_node_with(&etcd, &strs(&args));
    let l = leader_by_log(&[&a, &b], Duration::from_secs(15)).await;
    let follower = if l == 0 { &b } else { &a };
    let api = https_api(&ca, None);
    eventually(
        "the follower knows the leader",
        Duration::from_secs(10),
        || async { !api(follower).get("/v1/cluster").await.ok()["leader"].is_null() },
    )
    .await;
    let r = api(follower)
        .put(&instance_path("rot", "s", "a"), &body(1))
        .await;
    r.assert_error(503, &["leader"]);

    // The right CA, as an operator fixes the file: picked up within the 2 s poll.
    std::fs::copy(ca.ca_file(), &peer_ca).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = api(follower)
            .put(&instance_path("rot", "s", "a"), &body(1))
            .await;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after the CA file was fixed: {}",
            r.status,
            r.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        follower.log().contains("peer TLS reloaded"),
        "{}",
        follower.log()
    );
}
