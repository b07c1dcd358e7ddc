//! Crash safety of the real binary: every write acknowledged before a `kill -9` is there after a
//! restart on the same data directory, revisions continue above everything acknowledged, and
//! ephemeral instances get a fresh lease after a restart and then expire normally. Each kill
//! lands while registrations are in flight (the test waits for that and checks it afterwards).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const WRITERS: usize = 16;
const SERVICES: usize = 4;
/// At most this many registrations are attempted per kill cycle (3 cycles: at most 3000).
const ATTEMPTS_PER_CYCLE: usize = 1000;
const CYCLES: usize = 3;
/// Kills allowed in all to get `CYCLES` that cut registrations short (on a loaded machine a
/// kill can land just after the answers to every outstanding request left the server).
const MAX_KILLS: usize = 3 * CYCLES;
/// Pause of each writer between two registrations.
const PACE: Duration = Duration::from_millis(30);

/// An acknowledged registration: service, instance id, the revision the server answered.
type Acked = (String, String, u64);

/// What one writer saw in a cycle.
struct Written {
    acked: Vec<Acked>,
    unexpected: Vec<String>,
    /// When the request that the server's disappearance cut short was sent, if one was.
    cut_short: Option<Instant>,
}

/// Counters the writers share with the killer.
#[derive(Default)]
struct Progress {
    attempts: AtomicUsize,
    acks: AtomicUsize,
    /// Requests sent and not yet answered.
    outstanding: AtomicUsize,
}

/// Registers unique instances until the cap, the deadline, or the server disappears; returns
/// the ones answered with 200 and a revision.
async fn writer(
    base: String,
    cycle: usize,
    w: usize,
    progress: Arc<Progress>,
    deadline: Instant,
) -> Written {
    let client = http_client();
    let mut acked = Vec::new();
    let mut unexpected = Vec::new();
    let mut cut_short = None;
    let attempts = &progress.attempts;
    loop {
        let n = attempts.fetch_add(1, Ordering::Relaxed);
        if n >= ATTEMPTS_PER_CYCLE || Instant::now() >= deadline {
            break;
        }
        let svc = format!("svc-{}", n % SERVICES);
        let id = format!("c{cycle}-w{w}-n{n}");
        let body = json!({
            "host": "10.0.0.1",
            "port": 1 + n,
            "metadata": {"cycle": cycle.to_string(), "writer": w.to_string()},
        });
        let url = format!("{base}{}", instance_path("crash", &svc, &id));
        let sent = Instant::now();
        progress.outstanding.fetch_add(1, Ordering::SeqCst);
        let resp = async {
            let r = client
                .put(url)
                .json(&body)
                .timeout(Duration::from_secs(5))
                .send()
                .await?;
            let status = r.status();
            let text = r.text().await?;
            Ok::<_, reqwest::Error>((status, text))
        }
        .await;
        progress.outstanding.fetch_sub(1, Ordering::SeqCst);
        match resp {
            Ok((status, text)) if status.as_u16() == 200 => {
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                match v["revision"].as_u64() {
                    Some(rev) => {
                        acked.push((svc, id, rev));
                        progress.acks.fetch_add(1, Ordering::Relaxed);
                    }
                    None => unexpected.push(format!("{id}: 200 without a revision: {text}")),
                }
            }
            Ok((status, text)) => {
                unexpected.push(format!("{id}: HTTP {status}: {text}"));
                break;
            }
            // The server is gone (before or while answering): not acknowledged.
            Err(_) => {
                cut_short = Some(sent);
                break;
            }
        }
        // Paced (at most ~500 attempts/s over all writers) so that the budget lasts past the
        // longest delay and the kill lands while registrations are in flight.
        tokio::time::sleep(PACE).await;
    }
    Written {
        acked,
        unexpected,
        cut_short,
    }
}

/// Asserts every acknowledged instance is present with the revision it was acknowledged at.
/// Returns the highest revision found anywhere in the crash services.
async fn verify(api: &Api, acked: &[Acked]) -> u64 {
    let mut present: HashMap<(String, String), u64> = HashMap::new();
    let mut highest = 0;
    for s in 0..SERVICES {
        let svc = format!("svc-{s}");
        let v = api.service("crash", &svc).await;
        highest = highest.max(v["revision"].as_u64().unwrap());
        for i in v["instances"].as_array().unwrap() {
            let rev = i["spec_revision"].as_u64().unwrap();
            highest = highest.max(rev);
            present.insert((svc.clone(), i["id"].as_str().unwrap().to_string()), rev);
        }
    }
    let missing: Vec<_> = acked
        .iter()
        .filter(|(s, id, _)| !present.contains_key(&(s.clone(), id.clone())))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged registrations lost after kill -9, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    for (s, id, rev) in acked {
        assert_eq!(
            present[&(s.clone(), id.clone())],
            *rev,
            "{s}/{id} is at another revision than acknowledged"
        );
    }
    highest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut jitter = Jitter::from_clock();
    let mut acked: Vec<Acked> = Vec::new();
    let mut server = Server::start_in(dir.path());
    let mut counted = 0;
    let mut cycle = 0;
    while counted < CYCLES {
        assert!(
            cycle < MAX_KILLS,
            "only {counted} of {cycle} kills cut a registration short; \
             the test must kill the server with writes in flight"
        );
        let progress = Arc::new(Progress::default());
        let started = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(10);
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| tokio::spawn(writer(server.base(), cycle, w, progress.clone(), deadline)))
            .collect();
        let delay = jitter.between(Duration::from_millis(300), Duration::from_millis(2000));
        tokio::time::sleep(delay).await;
        // On a slow disk nothing may be durable yet: wait (bounded) for a first acknowledgement,
        // so that every cycle kills a server holding acknowledged writes.
        let waited = Instant::now();
        while progress.acks.load(Ordering::Relaxed) == 0
            && waited.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Then kill the moment several registrations are on the wire, so that the kill cuts
        // writes short rather than landing in the pause between them. Some may have been
        // answered already (the client lags on a loaded machine): what counts is checked below.
        let waited = Instant::now();
        while progress.outstanding.load(Ordering::SeqCst) < 3
            && waited.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let outstanding = progress.outstanding.load(Ordering::SeqCst);
        let log_before = server.log();
        let killed_at = Instant::now();
        server.kill9();

        let mut this_cycle = 0;
        let mut cut_short = 0;
        for h in writers {
            let mine = bounded("a writer", Duration::from_secs(20), h)
                .await
                .unwrap();
            assert!(
                mine.unexpected.is_empty(),
                "unexpected answers: {:?}\nserver log:\n{log_before}",
                mine.unexpected
            );
            // Sent before the kill and never answered: in flight when the server died.
            cut_short += usize::from(mine.cut_short.is_some_and(|t| t < killed_at));
            this_cycle += mine.acked.len();
            acked.extend(mine.acked);
        }
        let tried = progress
            .attempts
            .load(Ordering::Relaxed)
            .min(ATTEMPTS_PER_CYCLE);
        eprintln!(
            "cycle {cycle}: killed {:?} after the start with {outstanding} requests \
             outstanding; {cut_short} cut short; {this_cycle} of ~{tried} registrations acknowledged",
            killed_at - started
        );
        // A kill that cut nothing short still checks recovery below, but does not count.
        counted += usize::from(cut_short > 0);
        assert!(
            this_cycle > 0,
            "nothing was acknowledged in {delay:?} + 10 s; server log:\n{log_before}"
        );

        server = Server::start_in(dir.path());
        let api = server.api();
        let highest_present = verify(&api, &acked).await;
        let max_acked = acked.iter().map(|a| a.2).max().unwrap();
        assert!(highest_present >= max_acked);

        // Revisions continue above everything acknowledged (and everything stored).
        let id = format!("after-restart-{cycle}");
        let r = api
            .register("crash", "svc-0", &id, &inst("10.0.0.2", 1))
            .await;
        assert!(
            r > max_acked && r > highest_present,
            "revision {r} after restart is not above the acknowledged {max_acked} / stored {highest_present}"
        );
        acked.push(("svc-0".into(), id, r));
        cycle += 1;
    }
    // One last restart after a clean registration: everything is still there.
    server.kill9();
    let server = Server::start_in(dir.path());
    verify(&server.api(), &acked).await;
}

#[tokio::test]
async fn ephemeral_instance_gets_a_fresh_lease_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path());
    let api = server.api();
    let eph = |port: u16| json!({"host": "10.0.0.1", "port": port, "ttl_seconds": 2});
    api.register("eph", "svc", "lapsing", &eph(1)).await;
    api.register("eph", "svc", "beating", &eph(2)).await;
    api.register("eph", "svc", "persistent", &inst("10.0.0.1", 3))
        .await;
    let registered = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        ids(&api.service("eph", "svc").await),
        ["beating", "lapsing", "persistent"]
    );
    server.kill9();
    // Stay down past the original deadlines, so only a fresh lease can keep them.
    let past_ttl = registered + Duration::from_millis(2600);
    tokio::time::sleep(past_ttl.saturating_duration_since(Instant::now())).await;

    let server = Server::start_in(dir.path());
    let restarted = Instant::now();
    let api = server.api();
    let svc = api.service("eph", "svc").await;
    assert_eq!(
        ids(&svc),
        ["beating", "lapsing", "persistent"],
        "ephemeral instances must survive a restart for one TTL"
    );
    assert_eq!(find(&svc, "lapsing").unwrap()["ttl_seconds"], 2);

    // Heartbeats renew the restored leases; the instance without them expires about one TTL
    // after the restart.
    let beat = json!([{"namespace": "eph", "service": "svc", "id": "beating"}]);
    let mut gone_after = None;
    while restarted.elapsed() < Duration::from_secs(6) {
        let hb = api.post("/v1/heartbeats", &beat).await.ok();
        assert_eq!(hb["renewed"], 1, "restored lease not renewable: {hb}");
        let now = ids(&api.service("eph", "svc").await);
        assert!(now.contains(&"beating".to_string()), "{now:?}");
        assert!(now.contains(&"persistent".to_string()), "{now:?}");
        if !now.contains(&"lapsing".to_string()) {
            gone_after = Some(restarted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = gone_after.expect("the ephemeral instance never expired after the restart");
    assert!(
        gone >= Duration::from_millis(1000),
        "expired {gone:?} after restart: no fresh grace period"
    );
    assert!(
        gone <= Duration::from_millis(4500),
        "expired only after {gone:?}"
    );
    assert_eq!(
        ids(&api.service("eph", "svc").await),
        ["beating", "persistent"]
    );
}

#[tokio::test]
async fn statuses_and_settings_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path());
    let api = server.api();
    let r1 = api.register("keep", "a", "x", &inst("10.0.0.1", 1)).await;
    let r2 = api
        .register(
            "keep",
            "a",
            "y",
            &json!({"host": "10.0.0.2", "port": 2, "version": "v2", "metadata": {"k": "v"}}),
        )
        .await;
    let r3 = api
        .set_status(
            "keep",
            "a",
            "y",
            &json!({"health": "unhealthy", "weight": 5}),
        )
        .await;
    // 1 of 2 serving is under 0.6: protected.
    api.put(
        &service_path("keep", "a"),
        &json!({"protect_threshold": 0.6}),
    )
    .await
    .ok();
    let before = api
        .get(&format!("{}?healthy=true", service_path("keep", "a")))
        .await
        .ok();
    assert_eq!(before["protected"], true);
    server.kill9();

    let server = Server::start_in(dir.path());
    let api = server.api();
    let after = api
        .get(&format!("{}?healthy=true", service_path("keep", "a")))
        .await
        .ok();
    assert_eq!(after["protected"], true, "{after}");
    assert!((after["protect_threshold"].as_f64().unwrap() - 0.6).abs() < 1e-6);
    assert_eq!(ids(&after), ["x", "y"]);
    assert_eq!(
        after["instances"], before["instances"],
        "instances changed across restart"
    );
    let y = find(&after, "y").unwrap();
    assert_eq!(
        (y["spec_revision"].as_u64(), y["status_revision"].as_u64()),
        (Some(r2), Some(r3))
    );
    assert_eq!(find(&after, "x").unwrap()["spec_revision"], r1);
}

/// A blocking query holding a revision from before a restart must still see every change made
/// after that revision, and a service's revision never goes back.
#[tokio::test]
async fn blocking_queries_do_not_miss_changes_made_before_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path());
    let api = server.api();
    let seen_a = api.register("keep", "a", "x", &inst("10.0.0.1", 1)).await;
    let rc = api
        .put(
            &service_path("keep", "a"),
            &json!({"protect_threshold": 0.5}),
        )
        .await
        .ok()["revision"]
        .as_u64()
        .unwrap();
    let seen_b = api.register("keep", "b", "z", &inst("10.0.0.2", 1)).await;
    let rd = api.deregister("keep", "b", "z").await;
    assert_eq!(api.service("keep", "a").await["revision"], rc);
    assert_eq!(api.service("keep", "b").await["revision"], rd);
    server.kill9();

    let server = Server::start_in(dir.path());
    let api = server.api();
    let mut problems = Vec::new();
    for (svc, latest, seen) in [("a", rc, seen_a), ("b", rd, seen_b)] {
        let now = api.service("keep", svc).await["revision"].as_u64().unwrap();
        if now < latest {
            problems.push(format!(
                "keep/{svc}: revision {latest} before the restart, {now} after"
            ));
        }
        // A client that saw revision `seen` must be answered at once: there is a newer state.
        let started = Instant::now();
        let resp = api
            .get(&format!(
                "{}?index={seen}&wait=2s",
                service_path("keep", svc)
            ))
            .await;
        let took = started.elapsed();
        if took >= Duration::from_millis(1500) {
            problems.push(format!(
                "keep/{svc}: blocking query at index {seen} waited {took:?} (answered revision {}) \
                 although the service changed at {latest}",
                resp.revision_header()
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The real binary with its data dir on a small tmpfs: registrations get 503 once it is full
/// and `/readyz` says why; after the disk grows, readiness and checkpoints come back with no
/// restart (the log is folded and emptied), writes are taken again, and after a kill -9 every
/// acknowledged registration is there.
#[tokio::test]
async fn a_full_disk_refuses_writes_then_recovers_without_a_restart() {
    let Some(fs) = sextant_testkit::Tmpfs::mount("8m") else {
        return;
    };
    let data = fs.path().join("data");
    let mut server = Server::start_in(&data);
    let api = server.api();
    // ~15 KiB of metadata a registration, so a few hundred fill the disk.
    let metadata: serde_json::Map<String, Value> = (0..15)
        .map(|i| (format!("k{i}"), Value::String("x".repeat(1000))))
        .collect();
    let mut acked: Vec<Acked> = Vec::new();
    let mut n = 0;
    let register = |n: usize| {
        let body = json!({"host": "10.0.0.1", "port": 1 + n, "metadata": metadata});
        let api = &api;
        async move {
            api.put(&instance_path("full", "svc", &format!("i{n}")), &body)
                .await
        }
    };
    let refused = loop {
        n += 1;
        assert!(n < 5000, "an 8 MiB disk never filled");
        let r = register(n).await;
        match r.status {
            200 => acked.push((
                "svc".into(),
                format!("i{n}"),
                r.body["revision"].as_u64().unwrap(),
            )),
            503 => break r,
            s => panic!("unexpected {s}: {}", r.text),
        }
    };
    eprintln!(
        "disk full after {} registrations: {}",
        acked.len(),
        refused.text
    );
    let ready = api.get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert!(ready.text.contains("refuses writes"), "{}", ready.text);
    // Let a checkpoint fail on the full disk (and, unfixed, leave redb refusing for good).
    let failures = metric(&api, "sextant_store_checkpoint_failures_total").await;
    let waited = Instant::now();
    while metric(&api, "sextant_store_checkpoint_failures_total").await < failures + 1.0 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "no checkpoint failed on the full disk"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let checkpoints = metric(&api, "sextant_store_checkpoints_total").await;

    fs.resize("64m");
    let grown = Instant::now();
    while api.get("/readyz").await.status != 200 {
        assert!(
            grown.elapsed() < Duration::from_secs(15),
            "never ready again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready_after = grown.elapsed();
    while metric(&api, "sextant_store_checkpoints_total").await <= checkpoints
        || metric(&api, "sextant_store_wal_bytes").await > 0.0
    {
        assert!(
            grown.elapsed() < Duration::from_secs(20),
            "checkpoints never resumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "after the disk grew: ready in {ready_after:?}, log checkpointed and emptied in {:?}; {} reopens",
        grown.elapsed(),
        metric(&api, "sextant_store_reopens_total").await
    );
    for _ in 0..10 {
        n += 1;
        let r = register(n).await;
        assert_eq!(r.status, 200, "{}", r.text);
        acked.push((
            "svc".into(),
            format!("i{n}"),
            r.body["revision"].as_u64().unwrap(),
        ));
    }
    server.kill9();
    let server = Server::start_in(&data);
    let svc = server.api().service("full", "svc").await;
    let present: std::collections::HashSet<String> = ids(&svc).into_iter().collect();
    let lost: Vec<_> = acked.iter().filter(|a| !present.contains(&a.1)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged registrations lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    drop(server);
}
